//! What distributed-training frameworks read to find their peers (PyTorch's `env://`
//! rendezvous, torchrun, Lightning, Accelerate, DeepSpeed), derived from a Slurm task's own
//! variables: the same names and meanings as enroot's PyTorch hook sets.

use std::ops::RangeInclusive;

/// The ports `MASTER_PORT` is chosen from unless the site says otherwise: below Linux's
/// ephemeral range (32768 and up), so no outgoing connection holds one by chance, and
/// starting at PyTorch's own default.
pub const DEFAULT_PORTS: RangeInclusive<u16> = 29500..=31499;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameworkEnvError {
    #[error("{name}={value:?} is not what Slurm sets: {why}")]
    Slurm {
        name: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("port range `{0}`: give LOW-HIGH with 1024 <= LOW <= HIGH <= 65535, e.g. 29500-31499")]
    PortRange(String),
}

/// One task of a step, as Slurm describes it in the task's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmTask {
    pub job_id: u32,
    pub step_id: u32,
    /// Rank among all tasks of the step (`SLURM_PROCID`).
    pub rank: u32,
    /// Tasks in the step (`SLURM_NTASKS`, or `SLURM_STEP_NUM_TASKS`).
    pub world_size: u32,
    /// Rank among the step's tasks on this node (`SLURM_LOCALID`).
    pub local_rank: u32,
    /// Tasks of the step on this node (from `SLURM_STEP_TASKS_PER_NODE`).
    pub local_world_size: u32,
    /// This node's index in the step (`SLURM_NODEID`).
    pub node_rank: u32,
    /// The step's first node, where rank 0 runs (from `SLURM_STEP_NODELIST`).
    pub first_node: String,
}

impl SlurmTask {
    /// Reads the task from `var` (the task's environment). `None` where the variables of a
    /// task are absent (not a Slurm task: nothing to derive).
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<SlurmTask>, FrameworkEnvError> {
        let Some(rank) = var("SLURM_PROCID") else {
            return Ok(None);
        };
        let number =
            |name: &'static str, value: Option<String>| -> Result<u32, FrameworkEnvError> {
                let value = value.unwrap_or_default();
                value.trim().parse().map_err(|_| FrameworkEnvError::Slurm {
                    name,
                    value,
                    why: "not a number",
                })
            };
        let node_rank = number("SLURM_NODEID", var("SLURM_NODEID"))?;
        let per_node = var("SLURM_STEP_TASKS_PER_NODE")
            .or_else(|| var("SLURM_TASKS_PER_NODE"))
            .unwrap_or_default();
        let local_world_size =
            tasks_on_node(&per_node, node_rank).ok_or_else(|| FrameworkEnvError::Slurm {
                name: "SLURM_STEP_TASKS_PER_NODE",
                value: per_node.clone(),
                why: "expected counts such as 2(x3),1 with an entry for every node",
            })?;
        let nodes = var("SLURM_STEP_NODELIST")
            .or_else(|| var("SLURM_JOB_NODELIST"))
            .unwrap_or_default();
        let first_node = first_host(&nodes).ok_or_else(|| FrameworkEnvError::Slurm {
            name: "SLURM_STEP_NODELIST",
            value: nodes.clone(),
            why: "expected a host list such as n[01-04],gpu7",
        })?;
        Ok(Some(SlurmTask {
            job_id: number("SLURM_JOB_ID", var("SLURM_JOB_ID"))?,
            step_id: number("SLURM_STEP_ID", var("SLURM_STEP_ID"))?,
            rank: number("SLURM_PROCID", Some(rank))?,
            world_size: number(
                "SLURM_NTASKS",
                var("SLURM_STEP_NUM_TASKS").or_else(|| var("SLURM_NTASKS")),
            )?,
            local_rank: number("SLURM_LOCALID", var("SLURM_LOCALID"))?,
            local_world_size,
            node_rank,
            first_node,
        }))
    }

    /// The port every task of the step agrees on without talking: a function of the job
    /// and step ids, so concurrent steps of one job (consecutive step ids) get different
    /// ports until the range wraps.
    pub fn master_port(&self, ports: &RangeInclusive<u16>) -> u16 {
        let span = u64::from(ports.end() - ports.start()) + 1;
        let key = u64::from(self.job_id) * 7919 + u64::from(self.step_id);
        ports.start() + (key % span) as u16
    }

    /// The variables, in a fixed order.
    pub fn variables(&self, ports: &RangeInclusive<u16>) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world_size.to_string()),
            ("NODE_RANK", self.node_rank.to_string()),
            ("GROUP_RANK", self.node_rank.to_string()),
            ("MASTER_ADDR", self.first_node.clone()),
            ("MASTER_PORT", self.master_port(ports).to_string()),
        ]
    }
}

/// Where ferry records the values it set (`NAME=VALUE` words). A step started from inside
/// another container step (`srun` in a batch script that runs in an image) inherits that
/// step's RANK, WORLD_SIZE…: those describe the outer step and must be replaced, while a
/// value the user set, or changed since, must be kept. The record tells them apart.
pub const RECORD_VARIABLE: &str = "FERRY_FRAMEWORK_ENV";

impl SlurmTask {
    /// What to set in the task, given its environment `var`: every variable it lacks or
    /// holds with the value ferry recorded for an enclosing step, then the new record.
    pub fn assignments(
        &self,
        ports: &RangeInclusive<u16>,
        var: impl Fn(&str) -> Option<String>,
    ) -> Vec<(&'static str, String)> {
        let inherited = var(RECORD_VARIABLE).unwrap_or_default();
        let set_by_ferry = |name: &str, value: &str| {
            inherited
                .split(' ')
                .any(|word| word.split_once('=') == Some((name, value)))
        };
        let mut set: Vec<(&'static str, String)> = self
            .variables(ports)
            .into_iter()
            .filter(|(name, _)| match var(name) {
                Some(current) => set_by_ferry(name, &current),
                None => true,
            })
            .collect();
        let record = set
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join(" ");
        set.push((RECORD_VARIABLE, record));
        set
    }
}

/// `LOW-HIGH`, as a site writes it.
pub fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, FrameworkEnvError> {
    let bad = || FrameworkEnvError::PortRange(text.to_string());
    let (low, high) = text.split_once('-').ok_or_else(bad)?;
    let low: u16 = low.trim().parse().map_err(|_| bad())?;
    let high: u16 = high.trim().parse().map_err(|_| bad())?;
    if low < 1024 || low > high {
        return Err(bad());
    }
    Ok(low..=high)
}

/// Tasks on node `index` from Slurm's compressed counts (`2(x3),1`: three nodes with two
/// tasks, then one with one).
fn tasks_on_node(per_node: &str, index: u32) -> Option<u32> {
    let mut remaining = index;
    for part in per_node.split(',') {
        let (count, times) = match part.split_once("(x") {
            Some((count, rest)) => (count, rest.strip_suffix(')')?.parse::<u32>().ok()?),
            None => (part, 1),
        };
        let count: u32 = count.trim().parse().ok()?;
        if remaining < times {
            return Some(count);
        }
        remaining -= times;
    }
    None
}

/// The first host of a Slurm host list: `n[01-04,07],gpu1` gives `n01`; each bracket
/// contributes its first value, zero padding kept (`rack[2-3]-n[5-6]` gives `rack2-n5`).
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first top-level entry: commas inside brackets belong to the ranges.
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    let mut host = String::new();
    let mut rest = entry;
    while let Some(open) = rest.find('[') {
        host.push_str(&rest[..open]);
        let close = rest[open..].find(']')? + open;
        let first = rest[open + 1..close].split([',', '-']).next()?;
        if first.is_empty() || !first.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        host.push_str(first);
        rest = &rest[close + 1..];
    }
    host.push_str(rest);
    (!host.is_empty() && !host.contains([']', ' '])).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn step_task(rank: u32, world_size: u32) -> SlurmTask {
        SlurmTask {
            job_id: 7,
            step_id: 1,
            rank,
            world_size,
            local_rank: rank,
            local_world_size: world_size,
            node_rank: 0,
            first_node: "n1".into(),
        }
    }

    fn lookup<'a>(vars: &'a [(&'static str, String)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn a_fresh_task_gets_every_variable_and_the_record() {
        let set = step_task(1, 4).assignments(&DEFAULT_PORTS, |_| None);
        let names: Vec<&str> = set.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "NODE_RANK",
                "GROUP_RANK",
                "MASTER_ADDR",
                "MASTER_PORT",
                RECORD_VARIABLE
            ]
        );
        let record = &set.last().unwrap().1;
        assert!(record.starts_with("RANK=1 WORLD_SIZE=4 "), "{record}");
    }

    #[test]
    fn a_step_inside_a_container_step_replaces_what_ferry_set_for_the_outer_one() {
        // The batch step (one task) ran in an image; its script starts a four-task step.
        let outer = step_task(0, 1).assignments(&DEFAULT_PORTS, |_| None);
        let set = step_task(3, 4).assignments(&DEFAULT_PORTS, lookup(&outer));
        assert!(set.contains(&("RANK", "3".into())), "{set:?}");
        assert!(set.contains(&("WORLD_SIZE", "4".into())), "{set:?}");
    }

    #[test]
    fn the_users_values_are_kept_even_inside_a_container_step() {
        let mut env = step_task(0, 1).assignments(&DEFAULT_PORTS, |_| None);
        // The user changed one of ferry's values and set another variable of their own.
        env.retain(|(n, _)| *n != "MASTER_PORT");
        env.push(("MASTER_PORT", "12345".into()));
        let set = step_task(2, 4).assignments(&DEFAULT_PORTS, lookup(&env));
        assert!(!set.iter().any(|(n, _)| *n == "MASTER_PORT"), "{set:?}");
        assert!(set.contains(&("RANK", "2".into())), "{set:?}");
        let fresh = step_task(2, 4).assignments(&DEFAULT_PORTS, |n| {
            (n == "WORLD_SIZE").then(|| "16".to_string())
        });
        assert!(!fresh.iter().any(|(n, _)| *n == "WORLD_SIZE"), "{fresh:?}");
        let record = &fresh.last().unwrap().1;
        assert!(
            !record.split(' ').any(|w| w.starts_with("WORLD_SIZE=")),
            "{record}"
        );
    }

    fn task(vars: &[(&str, &str)]) -> Result<Option<SlurmTask>, FrameworkEnvError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SlurmTask::from_vars(|name| map.get(name).cloned())
    }

    const SIX_ON_THREE: &[(&str, &str)] = &[
        ("SLURM_JOB_ID", "4242"),
        ("SLURM_STEP_ID", "3"),
        ("SLURM_PROCID", "3"),
        ("SLURM_STEP_NUM_TASKS", "6"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NODEID", "1"),
        ("SLURM_STEP_TASKS_PER_NODE", "2(x3)"),
        ("SLURM_STEP_NODELIST", "fmpi[1-3]"),
    ];

    #[test]
    fn a_task_of_six_on_three_nodes() {
        let t = task(SIX_ON_THREE).unwrap().unwrap();
        let vars = t.variables(&DEFAULT_PORTS);
        let get = |n: &str| vars.iter().find(|(k, _)| *k == n).unwrap().1.clone();
        assert_eq!(get("RANK"), "3");
        assert_eq!(get("WORLD_SIZE"), "6");
        assert_eq!(get("LOCAL_RANK"), "1");
        assert_eq!(get("LOCAL_WORLD_SIZE"), "2");
        assert_eq!(get("NODE_RANK"), "1");
        assert_eq!(get("GROUP_RANK"), "1");
        assert_eq!(get("MASTER_ADDR"), "fmpi1");
        let port: u16 = get("MASTER_PORT").parse().unwrap();
        assert!(DEFAULT_PORTS.contains(&port));
    }

    #[test]
    fn outside_slurm_there_is_nothing_to_derive() {
        assert_eq!(task(&[]).unwrap(), None);
    }

    #[test]
    fn malformed_slurm_variables_name_the_variable() {
        let mut vars = SIX_ON_THREE.to_vec();
        vars.retain(|(k, _)| *k != "SLURM_STEP_TASKS_PER_NODE");
        vars.push(("SLURM_STEP_TASKS_PER_NODE", "2(x1)"));
        let err = task(&vars).unwrap_err().to_string();
        assert!(
            err.starts_with("SLURM_STEP_TASKS_PER_NODE=\"2(x1)\""),
            "{err}"
        );
        let mut bad = SIX_ON_THREE.to_vec();
        bad.retain(|(k, _)| *k != "SLURM_PROCID");
        bad.push(("SLURM_PROCID", "one"));
        assert!(task(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("SLURM_PROCID=\"one\""));
    }

    #[test]
    fn uneven_task_counts_per_node() {
        assert_eq!(tasks_on_node("2(x3),1", 0), Some(2));
        assert_eq!(tasks_on_node("2(x3),1", 2), Some(2));
        assert_eq!(tasks_on_node("2(x3),1", 3), Some(1));
        assert_eq!(tasks_on_node("2(x3),1", 4), None);
        assert_eq!(tasks_on_node("4", 0), Some(4));
        assert_eq!(tasks_on_node("", 0), None);
    }

    #[test]
    fn first_host_of_slurm_host_lists() {
        assert_eq!(first_host("n042").as_deref(), Some("n042"));
        assert_eq!(first_host("n[01-04,07],gpu1").as_deref(), Some("n01"));
        assert_eq!(first_host("gpu1,n[01-04]").as_deref(), Some("gpu1"));
        assert_eq!(
            first_host("rack[2-3]-n[05-06]").as_deref(),
            Some("rack2-n05")
        );
        assert_eq!(first_host("n[7]").as_deref(), Some("n7"));
        assert_eq!(first_host("").as_deref(), None);
        assert_eq!(first_host("n[a-b]").as_deref(), None);
        assert_eq!(first_host("n[1-2").as_deref(), None);
    }

    #[test]
    fn the_port_is_the_same_for_every_task_and_differs_between_steps() {
        let t = task(SIX_ON_THREE).unwrap().unwrap();
        let other_rank = SlurmTask {
            rank: 5,
            local_rank: 1,
            node_rank: 2,
            ..t.clone()
        };
        assert_eq!(
            t.master_port(&DEFAULT_PORTS),
            other_rank.master_port(&DEFAULT_PORTS)
        );
        let ports: Vec<u16> = (0..20)
            .map(|step_id| {
                SlurmTask {
                    step_id,
                    ..t.clone()
                }
                .master_port(&DEFAULT_PORTS)
            })
            .collect();
        let mut distinct = ports.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        let narrow = parse_port_range("40000-40000").unwrap();
        assert_eq!(t.master_port(&narrow), 40000);
    }

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("29500-31499").unwrap(), 29500..=31499);
        for bad in ["", "29500", "80-90", "3000-2000", "a-b", "1024-70000"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
    }
}

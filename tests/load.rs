//! Load, as the unprivileged test user: 50 container steps at once on one node and 500 one
//! after another leave the node as it was (mounts, processes, files, slurmd's descriptors
//! and memory); eight nodes starting one cold registry image download each blob once.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_tests::*;

/// slurmd's open descriptors and resident memory (KiB), and how many slurmstepds run.
#[derive(Debug)]
struct Daemons {
    slurmd_fds: usize,
    slurmd_rss_kib: u64,
    slurmstepds: usize,
}

fn pids_of(name: &str) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-x", name])
        .output_within(COMMAND_LIMIT);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn daemons() -> Daemons {
    // The single-node cluster's slurmd, from its pid file beside its slurm.conf.
    let conf = std::env::var("SLURM_CONF").expect("SLURM_CONF is not set: integration/test");
    let run = Path::new(&conf)
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("run/slurmd.pid");
    let pid: u32 = std::fs::read_to_string(&run)
        .unwrap_or_else(|e| panic!("{}: {e}", run.display()))
        .trim()
        .parse()
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    Daemons {
        slurmd_fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count(),
        slurmd_rss_kib: rss,
        slurmstepds: pids_of("slurmstepd").len(),
    }
}

fn assert_node_unchanged(before: &NodeState, daemons_before: &Daemons, what: &str) {
    let after = settle_to(before, Duration::from_secs(20));
    assert_eq!(&after, before, "{what}: the node is as before");
    let mut now = daemons();
    for _ in 0..100 {
        if now.slurmstepds <= daemons_before.slurmstepds
            && now.slurmd_fds <= daemons_before.slurmd_fds
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        now = daemons();
    }
    assert!(
        now.slurmstepds <= daemons_before.slurmstepds,
        "{what}: {} slurmstepds left, {} before",
        now.slurmstepds,
        daemons_before.slurmstepds
    );
    assert!(
        now.slurmd_fds <= daemons_before.slurmd_fds,
        "{what}: slurmd holds {} descriptors, {} before",
        now.slurmd_fds,
        daemons_before.slurmd_fds
    );
    // A leak of a few KiB per step would show as megabytes after hundreds of steps.
    assert!(
        now.slurmd_rss_kib <= daemons_before.slurmd_rss_kib + 4096,
        "{what}: slurmd grew from {} to {} KiB",
        daemons_before.slurmd_rss_kib,
        now.slurmd_rss_kib
    );
}

#[test]
fn fifty_concurrent_container_steps_on_one_node() {
    let _m = exclusive_machine();
    let busybox = image("busybox.sqsh").display().to_string();
    // Warm the page cache and the node: the first step of a run is not what is measured.
    sh(&format!("srun -n1 --container={busybox} true")).ok();
    let before = node_state();
    let daemons_before = daemons();
    // Fifty steps of one job at once on one core (--overlap: they share the allocation).
    let out = sh(&format!(
        "timeout 300 srun -n1 --mem=1G --time=5 bash -c 'for i in $(seq 50); do \
           srun -n1 --overlap --mem=16M --container={busybox} sh -c \"sleep 2; echo $i \\$(cat /etc/ferry-marker)\" & \
         done; wait'"
    ));
    let text = out.ok();
    let mut seen: BTreeMap<u32, String> = BTreeMap::new();
    for line in text.lines() {
        let (i, marker) = line.split_once(' ').unwrap();
        seen.insert(i.parse().unwrap(), marker.to_string());
    }
    assert_eq!(seen.len(), 50, "{text}\n{}", out.stderr);
    assert!(seen.values().all(|m| m == "busybox-image"), "{text}");
    assert_node_unchanged(&before, &daemons_before, "50 concurrent steps");
}

#[test]
fn five_hundred_sequential_container_steps() {
    let _m = exclusive_machine();
    let busybox = image("busybox.sqsh").display().to_string();
    sh(&format!("srun -n1 --container={busybox} true")).ok();
    let before = node_state();
    let daemons_before = daemons();
    let out = sh_as_within(
        USER,
        &format!(
            "timeout 900 srun -n1 --time=15 bash -c 'n=0; for i in $(seq 500); do \
               srun -n1 --overlap --container={busybox} true && n=$((n+1)); done; echo $n'"
        ),
        Duration::from_secs(960),
    );
    assert_eq!(out.ok(), "500\n", "{}", out.stderr);
    assert_node_unchanged(&before, &daemons_before, "500 sequential steps");
}

/// An eight-node cluster of its own (distinct directory, ports, subnet), up while alive.
struct EightNodes {
    env: Vec<(&'static str, String)>,
}

const EIGHT_SUBNET: &str = "10.251.18";

impl EightNodes {
    fn up() -> EightNodes {
        let plugin = std::env::var("FERRY_PLUGIN")
            .expect("FERRY_PLUGIN is not set: run the tests through integration/test");
        let args = format!(
            "ferry_bin={} insecure_registries={EIGHT_SUBNET}.1:15009",
            ferry_bin().display()
        );
        let env = vec![
            (
                "FERRY_CLUSTER_DIR",
                "/var/tmp/ferry-load-cluster".to_string(),
            ),
            ("FERRY_CLUSTER_NODES", "8".into()),
            ("FERRY_CLUSTER_NODE", "fload".into()),
            ("FERRY_CLUSTER_SUBNET", EIGHT_SUBNET.into()),
            ("FERRY_SLURMCTLD_PORT", "16847".into()),
            ("FERRY_SLURMD_PORT", "16848".into()),
            ("FERRY_CLUSTER_GPUS", "0".into()),
            ("FERRY_PLUGIN", plugin),
            ("FERRY_PLUGIN_ARGS", args),
        ];
        let cluster = EightNodes { env };
        let out = cluster.command("up");
        assert!(
            out.status.success(),
            "eight-node cluster: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    fn command(&self, what: &str) -> std::process::Output {
        Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../integration/cluster"
        ))
        .arg(what)
        .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
        .output_within(COMMAND_LIMIT)
    }

    fn slurm_conf(&self) -> String {
        "/var/tmp/ferry-load-cluster/etc/slurm.conf".into()
    }
}

impl Drop for EightNodes {
    fn drop(&mut self) {
        let _ = self.command("down");
    }
}

#[test]
fn eight_nodes_starting_one_cold_registry_image_fetch_each_blob_once() {
    let _m = exclusive_machine();
    let registry = std::env::var("FERRY_TEST_REGISTRY")
        .expect("FERRY_TEST_REGISTRY is not set: integration/test starts the test registry");
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    // An image no cache has seen, pushed under a name of this test's own.
    let name = format!("ferry/load-{}:v1", std::process::id());
    sh(&format!(
        "cd {d} && {MAKE_CONFIGURED_LAYOUT}\n skopeo --insecure-policy copy -q \
         --dest-tls-verify=false oci:{d}/layout:v1 docker://{registry}/{name}"
    ))
    .ok();
    let cluster = EightNodes::up();
    // The nodes reach the registry through a counting proxy on their bridge.
    let proxy = FaultProxy::start_on("pass", 0, "/", &format!("{EIGHT_SUBNET}.1:15009"));
    let out = sh(&format!(
        "export SLURM_CONF={}; timeout 300 srun -N8 -n8 --ntasks-per-node=1 --time=5 \
         --container=docker://{EIGHT_SUBNET}.1:15009/{name} sh -c 'echo $(hostname) $(cat /opt/app/start.sh | wc -l)'",
        cluster.slurm_conf()
    ));
    let text = out.ok().to_string();
    let hosts: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        hosts.len(),
        8,
        "a task on each of the eight nodes:\n{text}\n{}",
        out.stderr
    );
    let log = proxy.log.lock().unwrap().clone();
    let mut blob_gets: BTreeMap<String, usize> = BTreeMap::new();
    for line in &log {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [_, "GET", path] = words[..] {
            if path.contains("/blobs/") {
                *blob_gets.entry(path.to_string()).or_default() += 1;
            }
        }
    }
    assert!(
        !blob_gets.is_empty(),
        "the nodes fetched through the proxy:\n{log:?}"
    );
    assert!(
        blob_gets.values().all(|&n| n == 1),
        "each blob fetched once: {blob_gets:?}"
    );
    // The import is announced by the step's node 0 only, not once per node (node 0 says
    // nothing when it comes late enough to find the image cached).
    let announced = out
        .stderr
        .lines()
        .filter(|l| l.ends_with(" to fetch)") || l.contains("ferry: waiting for another import"))
        .count();
    assert!(announced <= 1, "{}", out.stderr);
}

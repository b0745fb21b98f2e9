//! Slurm's step cgroup, for helpers the plugin starts before the step's tasks exist.
//!
//! proctrack/cgroup (cgroup v1) ends a step by signalling every process in the step's
//! freezer cgroup. A helper forked from slurmstepd (an import during user_init) sits in the
//! job's freezer cgroup instead, so `scancel` or a time limit would wait for it to finish
//! by itself (measured: a stalled import kept a cancelled job completing for 103 s). Moved
//! into the step's freezer cgroup, it is killed with the step.

use std::path::{Path, PathBuf};

/// The freezer cgroup of step `step` (e.g. `0`), given the contents of `/proc/self/cgroup`
/// of slurmstepd and the freezer hierarchy's mount point; `None` where there is none
/// (cgroup v2, or proctrack other than cgroup).
pub fn step_freezer(proc_cgroup: &str, freezer_root: &Path, step: &str) -> Option<PathBuf> {
    let path = proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "freezer")
            .then(|| path.trim_start_matches('/').to_string())
    })?;
    let leaf = format!("step_{step}");
    let base = freezer_root.join(path);
    let dir = if base.file_name().is_some_and(|n| n == leaf.as_str()) {
        base
    } else {
        base.join(leaf)
    };
    dir.join("cgroup.procs").is_file().then_some(dir)
}

/// Move `pid` into the freezer cgroup of step `step` of the calling slurmstepd, where one
/// exists. Failure only means the helper is not killed with the step; it is logged.
pub fn join_step_freezer(pid: u32, step: &str) {
    let Ok(own) = std::fs::read_to_string("/proc/self/cgroup") else {
        return;
    };
    let Some(dir) = step_freezer(&own, Path::new("/sys/fs/cgroup/freezer"), step) else {
        return;
    };
    if let Err(e) = std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
        tracing::debug!("cannot move {pid} into {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_steps_freezer_cgroup_beside_the_jobs() {
        let t = tempfile::tempdir().unwrap();
        let step = t.path().join("slurm_n/uid_1/job_7/step_0");
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(step.join("cgroup.procs"), "").unwrap();
        let own = "9:name=systemd:/\n6:freezer:/slurm_n/uid_1/job_7\n4:memory:/slurm_n/uid_1/job_7/step_0\n0::/\n";
        assert_eq!(step_freezer(own, t.path(), "0"), Some(step.clone()));
        // slurmstepd already in the step's cgroup.
        let own = "6:freezer:/slurm_n/uid_1/job_7/step_0\n";
        assert_eq!(step_freezer(own, t.path(), "0"), Some(step));
        // Another step, cgroup v2 only, no freezer line.
        assert_eq!(
            step_freezer("6:freezer:/slurm_n/uid_1/job_7\n", t.path(), "1"),
            None
        );
        assert_eq!(step_freezer("0::/system.slice\n", t.path(), "0"), None);
    }
}

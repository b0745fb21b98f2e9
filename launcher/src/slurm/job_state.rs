//! Whether a Slurm job has ended, from `scontrol -o show job ID`.
//!
//! On Slurm 22.05, slurmd holds back a job's termination until its steps have started, and
//! a step has not started while a plugin's user_init runs: a `scancel` or time limit that
//! comes during a long import would only take effect once the import ended by itself. The
//! plugin therefore asks, while it waits, whether the job is still running.

/// The state of the job in one line of `scontrol -o show job`, when it says the job is over
/// (cancelled, timed out, failed...); `None` while it runs, or when the line says nothing.
pub fn ended_state(scontrol_line: &str) -> Option<String> {
    let state = scontrol_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("JobState="))?;
    match state {
        "RUNNING" | "PENDING" | "CONFIGURING" | "SUSPENDED" | "REQUEUED" | "RESIZING" => None,
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_and_ended_jobs() {
        let line = "JobId=17 JobName=a UserId=u(1) JobState=RUNNING Reason=None Dependency=(null)";
        assert_eq!(ended_state(line), None);
        let line = "JobId=17 JobName=a JobState=CANCELLED Reason=None";
        assert_eq!(ended_state(line).as_deref(), Some("CANCELLED"));
        let line = "JobId=17 JobState=TIMEOUT Reason=TimeLimit";
        assert_eq!(ended_state(line).as_deref(), Some("TIMEOUT"));
        assert_eq!(
            ended_state("slurm_load_jobs error: Invalid job id specified"),
            None
        );
    }
}

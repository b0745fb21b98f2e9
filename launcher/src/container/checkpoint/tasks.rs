//! Several tasks of a Slurm step on one node in one checkpointable container.
//!
//! CRIU saves process trees, and tasks that share memory must be saved at the same moment
//! and restored together. So the node's first task (local id 0, the *leader*) makes the
//! container and its init, as a single task does; every other task (a *follower*) has its
//! command started by that init, in the same container and PID namespace, and only stands
//! in for it towards Slurm: it copies the command's output to its own, passes signals on
//! and exits with the command's status. They talk through files in the checkpoint
//! directory (`DIR/tasks/K/`), which the container sees too, so that a restored init finds
//! them where the first one left them:
//!
//! - `DIR/run`: the leader's pid and start time, written before anything else of a run; a
//!   follower trusts the files below only once `run` names a sibling of its own (same
//!   parent: the step's slurmstepd), so nothing of an earlier run is taken for this one;
//! - `request.json` ([`TaskRequest`]): the follower's command line and environment;
//! - `output`: the command's stdout and stderr; `from`: where this run's output starts;
//! - `signal`: signal numbers for the command, one a line;
//! - `status` ([`TaskEnd`]): how the command ended (or that it was checkpointed);
//! - `ended`: kept in a checkpoint for a command that had already ended.

use std::fs;
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::SigSet;
use serde::{Deserialize, Serialize};

pub const TASKS_DIR: &str = "tasks";
pub const RUN_FILE: &str = "run";
const REQUEST: &str = "request.json";
const OUTPUT: &str = "output";
const FROM: &str = "from";
const SIGNALS: &str = "signal";
const STATUS: &str = "status";
const ENDED: &str = "ended";

/// How long a follower waits for its leader to start a run.
const LEADER_START: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

/// A follower's command, for the leader's init to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRequest {
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<(String, String)>,
}

/// How a task's command ended, for its follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskEnd {
    /// The exit status the task reports (128+N for signal N).
    Exited(i32),
    /// Saved with the others; the follower ends with 0.
    Checkpointed,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the step's first task on this node did not start the container in {} s (its own error says why)", LEADER_START.as_secs())]
    NoLeader,
    #[error("the step's first task on this node ended before this task's command did (its own error says why)")]
    LeaderGone,
    #[error("bad {path}: {reason}")]
    Bad { path: PathBuf, reason: String },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> TaskError + '_ {
    move |source| TaskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn task_dir(base: &Path, task: u32) -> PathBuf {
    base.join(TASKS_DIR).join(task.to_string())
}

pub fn output_path(base: &Path, task: u32) -> PathBuf {
    task_dir(base, task).join(OUTPUT)
}

/// Write `contents` to `path` through a temporary name, so that a reader never sees half.
fn write_whole(path: &Path, contents: &[u8]) -> Result<(), TaskError> {
    let partial = path.with_extension("partial");
    fs::write(&partial, contents).map_err(io_error(&partial))?;
    fs::rename(&partial, path).map_err(io_error(path))
}

/// The leader, before its container starts (`restore`: before its checkpoint is restored):
/// clear what an earlier run left for `tasks` tasks and say that this run is the current.
pub fn begin_run(dir: &Path, tasks: u32, restore: bool) -> Result<(), TaskError> {
    let _ = fs::remove_file(dir.join(RUN_FILE));
    if !restore {
        let all = dir.join(TASKS_DIR);
        match fs::remove_dir_all(&all) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error(&all)(e)),
            _ => {}
        }
    }
    for task in 0..tasks {
        let here = task_dir(dir, task);
        fs::create_dir_all(&here).map_err(io_error(&here))?;
        for name in [REQUEST, SIGNALS, STATUS] {
            let _ = fs::remove_file(here.join(name));
        }
        let out = here.join(OUTPUT);
        let shown = fs::metadata(&out).map_or(0, |m| m.len());
        if shown == 0 {
            fs::write(&out, b"").map_err(io_error(&out))?;
        }
        write_whole(&here.join(FROM), shown.to_string().as_bytes())?;
    }
    let me = std::process::id();
    let started = super::start_time(me).unwrap_or(0);
    write_whole(&dir.join(RUN_FILE), format!("{me} {started}\n").as_bytes())
}

// ---- init's side (paths under the container's view of the directory) ----

/// A follower's request that init has not taken yet.
pub fn take_request(base: &Path, task: u32) -> Option<Result<TaskRequest, TaskError>> {
    let path = task_dir(base, task).join(REQUEST);
    let text = fs::read(&path).ok()?;
    let _ = fs::remove_file(&path);
    Some(serde_json::from_slice(&text).map_err(|e| TaskError::Bad {
        path,
        reason: e.to_string(),
    }))
}

/// The signals a follower passed on since the last call.
pub fn take_signals(base: &Path, task: u32) -> Vec<i32> {
    let path = task_dir(base, task).join(SIGNALS);
    let taken = path.with_extension("taken");
    if fs::rename(&path, &taken).is_err() {
        return Vec::new();
    }
    let text = fs::read_to_string(&taken).unwrap_or_default();
    let _ = fs::remove_file(&taken);
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

pub fn write_status(base: &Path, task: u32, end: TaskEnd) {
    let text = serde_json::to_vec(&end).unwrap_or_default();
    let _ = write_whole(&task_dir(base, task).join(STATUS), &text);
}

/// At a checkpoint: keep that `task`'s command had ended already.
pub fn keep_ended(base: &Path, task: u32, code: i32) {
    let _ = write_whole(
        &task_dir(base, task).join(ENDED),
        code.to_string().as_bytes(),
    );
}

/// At a restore: the status of a command that had ended before the checkpoint.
pub fn ended_before(base: &Path, task: u32) -> Option<i32> {
    fs::read_to_string(task_dir(base, task).join(ENDED))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Forget what [`keep_ended`] kept (a new checkpoint is being made).
pub fn forget_ended(base: &Path, tasks: u32) {
    for task in 0..tasks {
        let _ = fs::remove_file(task_dir(base, task).join(ENDED));
    }
}

// ---- the follower's side (host paths) ----

/// The leader's pid and start time from `DIR/run`, once it is a sibling of this process.
fn current_leader(dir: &Path) -> Option<(u32, u64)> {
    let text = fs::read_to_string(dir.join(RUN_FILE)).ok()?;
    let mut words = text.split_whitespace();
    let pid: u32 = words.next()?.parse().ok()?;
    let started: u64 = words.next()?.parse().ok()?;
    let ppid = crate::sys::proc::stat_number(pid, 4)?;
    (pid != std::process::id()
        && ppid == u64::from(std::os::unix::process::parent_id())
        && super::start_time(pid) == Some(started))
    .then_some((pid, started))
}

/// Run as follower `task` of the container in `dir`: hand `request` to the leader's init
/// (none when restoring: the leader restores every task), copy the command's output to
/// stdout, pass signals (`mask`, blocked by the caller) on, except `checkpoint` (which the
/// leader gets too), and return the command's status.
pub fn follow(
    dir: &Path,
    task: u32,
    request: Option<&TaskRequest>,
    mask: &SigSet,
    checkpoint: nix::sys::signal::Signal,
) -> Result<i32, TaskError> {
    let waiting = Instant::now();
    let (leader, started) = loop {
        if let Some(found) = current_leader(dir) {
            break found;
        }
        if waiting.elapsed() > LEADER_START {
            return Err(TaskError::NoLeader);
        }
        std::thread::sleep(POLL);
    };
    let here = task_dir(dir, task);
    if let Some(request) = request {
        let text = serde_json::to_vec(request).map_err(|e| TaskError::Bad {
            path: here.join(REQUEST),
            reason: e.to_string(),
        })?;
        write_whole(&here.join(REQUEST), &text)?;
    }
    let from: u64 = fs::read_to_string(here.join(FROM))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    let out_path = here.join(OUTPUT);
    let mut output = fs::File::open(&out_path).map_err(io_error(&out_path))?;
    output
        .seek(io::SeekFrom::Start(from))
        .map_err(io_error(&out_path))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut copy = |output: &mut fs::File| super::copy_to_stdout(output, &mut buf);
    let alive = || super::start_time(leader) == Some(started);
    loop {
        copy(&mut output);
        if let Ok(text) = fs::read(here.join(STATUS)) {
            copy(&mut output);
            let end: TaskEnd = serde_json::from_slice(&text).map_err(|e| TaskError::Bad {
                path: here.join(STATUS),
                reason: e.to_string(),
            })?;
            return Ok(match end {
                TaskEnd::Exited(code) => code,
                TaskEnd::Checkpointed => 0,
            });
        }
        if !alive() {
            // (It may have written the status just before it ended.)
            if fs::metadata(here.join(STATUS)).is_ok() {
                continue;
            }
            copy(&mut output);
            return Err(TaskError::LeaderGone);
        }
        if let Ok(Some(info)) = crate::sys::raw::wait_signal_for(mask, POLL) {
            if info.si_signo != checkpoint as i32 && info.si_signo != libc::SIGCHLD {
                let path = here.join(SIGNALS);
                let _ = fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&path)
                    .and_then(|mut f| writeln!(f, "{}", info.si_signo));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_clears_the_last_runs_requests_and_statuses_but_a_restore_keeps_output() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        begin_run(d, 2, false).unwrap();
        fs::write(output_path(d, 1), b"one\ntwo\n").unwrap();
        write_status(d, 1, TaskEnd::Checkpointed);
        fs::write(task_dir(d, 1).join(REQUEST), b"{}").unwrap();
        begin_run(d, 2, true).unwrap();
        assert!(!task_dir(d, 1).join(STATUS).exists());
        assert!(!task_dir(d, 1).join(REQUEST).exists());
        assert_eq!(fs::read_to_string(task_dir(d, 1).join(FROM)).unwrap(), "8");
        begin_run(d, 2, false).unwrap();
        assert_eq!(fs::read(output_path(d, 1)).unwrap(), b"");
        assert_eq!(fs::read_to_string(task_dir(d, 1).join(FROM)).unwrap(), "0");
        // This process wrote `run`, so it is no sibling of itself.
        assert!(current_leader(d).is_none());
    }

    #[test]
    fn requests_signals_and_ends_pass_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        begin_run(d, 2, false).unwrap();
        assert!(take_request(d, 1).is_none());
        let request = TaskRequest {
            argv: vec![b"python3".to_vec(), b"-c".to_vec(), b"pass".to_vec()],
            env: vec![("SLURM_LOCALID".into(), "1".into())],
        };
        write_whole(
            &task_dir(d, 1).join(REQUEST),
            &serde_json::to_vec(&request).unwrap(),
        )
        .unwrap();
        let taken = take_request(d, 1).unwrap().unwrap();
        assert_eq!(taken.argv, request.argv);
        assert!(take_request(d, 1).is_none(), "taken once");
        fs::write(task_dir(d, 1).join(SIGNALS), "15\n2\n").unwrap();
        assert_eq!(take_signals(d, 1), vec![15, 2]);
        assert!(take_signals(d, 1).is_empty());
        keep_ended(d, 0, 3);
        assert_eq!(ended_before(d, 0), Some(3));
        forget_ended(d, 2);
        assert_eq!(ended_before(d, 0), None);
        write_status(d, 1, TaskEnd::Exited(7));
        let back: TaskEnd =
            serde_json::from_slice(&fs::read(task_dir(d, 1).join(STATUS)).unwrap()).unwrap();
        assert_eq!(back, TaskEnd::Exited(7));
    }
}

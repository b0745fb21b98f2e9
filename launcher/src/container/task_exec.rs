//! `ferry` as the program of a Slurm task that runs the image's entrypoint
//! (`srun --container-entrypoint`).
//!
//! The plugin's task_init runs in the task's process just before slurmstepd execs the
//! task's argv, and it cannot exec that argv itself: slurmstepd still has work to do after
//! task_init (the TaskProlog and `--task-prolog`, TMPDIR, `PATH` resolution of argv[0],
//! the user's resource limits), in Slurm 22.05 and 24.11 alike (`exec_task` in
//! src/slurmd/slurmstepd/task.c). What task_init can change is the argv that slurmstepd
//! execs: it makes the task exec this program (the host's `ferry`, by absolute path)
//! instead, without entering the container itself, and passes the container in the
//! environment variable [`ENV`] (descriptors of its namespaces, inherited through the exec,
//! its working directory and the image's start command). `ferry` then enters the container,
//! removes [`ENV`] from the environment, builds the command with the same rule as
//! `ferry run --entrypoint` ([`crate::spec::entrypoint::command_line`]) and execs it in place: the
//! task's pid, signals and exit status stay the command's.
//!
//! `ferry` runs on the host, before entering the container, because a program run inside
//! it would have to work with whatever the image has (no shell, another C library, none):
//! the host's `ferry` needs nothing from the image.
//!
//! With `--container-save` the task's `ferry` stays on the host as the command's parent
//! (passing signals on), and the last of the node's tasks to end saves the container
//! before it exits: a failed save then fails the task, and with it the step. slurmstepd
//! takes a task's exit status when it reaps it, before any plugin callback could change it.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::container::exit_code;
use crate::container::join::{self, Namespaces};
use crate::container::run::exec_searching_then;
use crate::spec::entrypoint::{self, ImageStart};
use crate::spec::unshare::Namespace;

/// The variable that makes `ferry` a task's program; it holds a [`TaskExec`] as JSON.
pub const ENV: &str = "FERRY_TASK_EXEC";

/// What the plugin hands to the task's `ferry`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskExec {
    /// Inherited descriptors of the container's user and mount namespaces.
    pub user_fd: i32,
    pub mnt_fd: i32,
    /// Inherited descriptors of the network, IPC and UTS namespaces the container has of its
    /// own (`--container-unshare`).
    #[serde(default)]
    pub own_fds: Vec<(Namespace, i32)>,
    /// Where the command starts, inside the container.
    pub workdir: PathBuf,
    /// The image's Entrypoint, Cmd and whether it has enroot's /etc/rc.
    pub start: ImageStart,
    /// The task's own argv[0] when `ferry` took its place in the argv (Slurm before 23.11,
    /// where the argv can only be changed in place), as bytes; `None` when `ferry` was put
    /// in front of the task's whole argv.
    #[serde(default)]
    pub argv0: Option<Vec<u8>>,
    /// Run the image's start command with the task's argv as arguments
    /// (`--container-entrypoint`); else the task's argv as it is.
    #[serde(default = "default_true")]
    pub entrypoint: bool,
    /// Show the entrypoint's own output (`--container-entrypoint-log`); else only the
    /// command's (see [`entrypoint::output_restoring_shim`]).
    #[serde(default)]
    pub entrypoint_log: bool,
    /// `--container-save`, on the node that saves.
    #[serde(default)]
    pub save: Option<SaveAfterTasks>,
    /// Set for the command's process that a saving task's `ferry` starts: the signals that
    /// `ferry` blocked to pass them on are unblocked again before the exec.
    #[serde(default)]
    pub unblock_signals: bool,
}

fn default_true() -> bool {
    true
}

/// The save that the last of a node's tasks does once its command has ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SaveAfterTasks {
    /// The unpacked container to save, and the image to write.
    pub rootfs: PathBuf,
    pub output: PathBuf,
    /// The container's directory, removed after the save (a container of the step alone).
    pub remove: Option<PathBuf>,
    /// A file of the user's (in the container's directory) counting the tasks that ended,
    /// under an exclusive lock; the one that counts `tasks` saves.
    pub counter: PathBuf,
    pub tasks: u32,
    /// Say on the task's stderr (srun's terminal) when the save starts and ends.
    #[serde(default)]
    pub speak: bool,
}

impl TaskExec {
    /// The task's argv, from the argv `ferry` was started with.
    pub fn task_argv(&self, own: &[OsString]) -> Vec<OsString> {
        let rest = own.iter().skip(1).cloned();
        match &self.argv0 {
            Some(first) => std::iter::once(OsString::from_vec(first.clone()))
                .chain(rest)
                .collect(),
            None => rest.collect(),
        }
    }
}

/// When this process was started as a task's program ([`ENV`] is set), enter the container
/// and exec the task's command; does not return then. Must run first in `main`, while the
/// process has one thread (entering a user namespace needs that).
pub fn run_if_asked() {
    if let Some(value) = std::env::var_os(ENV) {
        exec_task(&value)
    }
}

fn fail(message: &str) -> ! {
    eprintln!("ferry: error: {message}");
    std::process::exit(exit_code::SETUP_FAILED)
}

fn exec_task(value: &std::ffi::OsStr) -> ! {
    let task: TaskExec = serde_json::from_slice(value.as_bytes())
        .unwrap_or_else(|e| fail(&format!("bad {ENV} (set by ferry's Slurm plugin): {e}")));
    if let Some(save) = &task.save {
        run_then_save(&task, save)
    }
    if task.unblock_signals {
        let _ = forwarded_signals().thread_unblock();
    }
    if task.user_fd < 3 || task.mnt_fd < 3 || task.user_fd == task.mnt_fd {
        fail(&format!(
            "bad {ENV}: descriptors {} and {}",
            task.user_fd, task.mnt_fd
        ));
    }
    let namespaces = Namespaces::from_inherited_with_own(task.user_fd, task.mnt_fd, &task.own_fds)
        .unwrap_or_else(|e| {
            fail(&format!(
                "bad {ENV}: descriptors {} and {}: {e}",
                task.user_fd, task.mnt_fd
            ))
        });
    if let Err(e) = join::join(&namespaces, &task.workdir) {
        fail(&e.to_string());
    }
    drop(namespaces);

    let own: Vec<OsString> = std::env::args_os().collect();
    let mut task_argv = task.task_argv(&own);
    let mut hidden = None;
    if !task.entrypoint_log && entrypoint::runs_through_image_start(&task.start, task.entrypoint) {
        hidden = hide_output();
        if let Some((stdout, stderr)) = hidden {
            let shim = entrypoint::output_restoring_shim(stdout, stderr);
            task_argv = shim.into_iter().chain(task_argv).collect();
        }
    }
    // ferry's own errors from here on (no such entrypoint) are for the user to see.
    let restore_output = move || {
        if let Some((stdout, stderr)) = hidden {
            let _ = nix::unistd::dup2(stdout.into(), 1);
            let _ = nix::unistd::dup2(stderr.into(), 2);
        }
    };
    let argv = entrypoint::command_line(&task.start, &task_argv, task.entrypoint);
    if argv.is_empty() {
        restore_output();
        fail("no command to run");
    }
    let mut search_path = String::from("/usr/local/bin:/usr/bin:/bin");
    let mut envp = Vec::new();
    for (name, value) in std::env::vars_os() {
        if name == ENV {
            continue;
        }
        if name == "PATH" {
            search_path = value.to_string_lossy().into_owned();
        }
        let mut entry = name.into_vec();
        entry.push(b'=');
        entry.extend(value.into_vec());
        envp.extend(CString::new(entry).ok());
    }
    let args: Vec<CString> = argv
        .into_iter()
        .map(|a| CString::new(a.into_vec()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|_| {
            restore_output();
            fail("an argument holds a NUL byte")
        });
    exec_searching_then(&args, &envp, &search_path, restore_output)
}

/// Inside the container: move stdout and stderr to two free descriptors between 3 and 9
/// (kept across exec) and put /dev/null in their place, for the entrypoint; returns the two
/// numbers. `None`, with the output left as it is (the entrypoint's shows), where the image
/// has no shell to put them back or no such descriptors are free.
fn hide_output() -> Option<(u8, u8)> {
    use nix::fcntl::{fcntl, FcntlArg};
    if !Path::new(entrypoint::DEFAULT_SHELL).exists() {
        return None;
    }
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .ok()?;
    let copy = |fd| fcntl(fd, FcntlArg::F_DUPFD(3)).ok();
    let (stdout, stderr) = (copy(1), copy(2));
    let close = |fd: Option<i32>| {
        if let Some(fd) = fd {
            let _ = nix::unistd::close(fd);
        }
    };
    let digit = |fd: Option<i32>| fd.and_then(|fd| u8::try_from(fd).ok()).filter(|d| *d <= 9);
    let (Some(out), Some(err)) = (digit(stdout), digit(stderr)) else {
        close(stdout);
        close(stderr);
        return None;
    };
    use std::os::fd::AsRawFd;
    for fd in [1, 2] {
        if nix::unistd::dup2(null.as_raw_fd(), fd).is_err() {
            // Put back what was moved already, and show everything.
            let _ = nix::unistd::dup2(out.into(), 1);
            let _ = nix::unistd::dup2(err.into(), 2);
            close(stdout);
            close(stderr);
            return None;
        }
    }
    Some((out, err))
}

/// The signals a saving task's `ferry` passes on to the command (those Slurm and a
/// terminal send a task), and SIGCHLD, which tells it the command ended. slurmstepd's
/// proctrack/cgroup signals only the task's own process (all but SIGKILL), so they must be
/// passed on; proctrack/pgid and linuxproc reach the command as well, which then gets them
/// twice. The command stays in the task's process group, the terminal's with `--pty`.
fn forwarded_signals() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGTERM,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
        Signal::SIGCONT,
        Signal::SIGTSTP,
        Signal::SIGCHLD,
    ] {
        set.add(sig);
    }
    set
}

/// `--container-save`: start the command as a child (this program again, entering the
/// container), pass signals on until it ends, count this task as ended, save if it is the
/// last, and end with the command's status, or 1 when the save failed.
fn run_then_save(task: &TaskExec, save: &SaveAfterTasks) -> ! {
    let signals = forwarded_signals();
    if let Err(e) = signals.thread_block() {
        fail(&format!("cannot block signals: {e}"));
    }
    let command = TaskExec {
        save: None,
        unblock_signals: true,
        ..task.clone()
    };
    let text = serde_json::to_string(&command).unwrap_or_else(|e| fail(&e.to_string()));
    let own: Vec<OsString> = std::env::args_os().collect();
    // The namespaces' descriptors are inherited (not close-on-exec), as they came.
    let mut child = std::process::Command::new("/proc/self/exe")
        .arg0(own.first().cloned().unwrap_or_default())
        .args(own.iter().skip(1))
        .env(ENV, text)
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start the task's command: {e}")));
    let pid = Pid::from_raw(child.id() as i32);
    let mut stopped_by = None;
    let status = loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => fail(&format!("cannot wait for the task's command: {e}")),
            },
            // The child is ours and not reaped yet: its pid cannot name another process.
            Ok(sig) => {
                if matches!(
                    sig,
                    Signal::SIGHUP | Signal::SIGINT | Signal::SIGQUIT | Signal::SIGTERM
                ) {
                    stopped_by = Some(sig);
                }
                let _ = nix::sys::signal::kill(pid, sig);
            }
            Err(e) => fail(&format!("cannot wait for signals: {e}")),
        }
    };
    match stopped_by {
        // A cancelled step (scancel, the time limit, srun interrupted) is not saved: the
        // user did not mean to keep it, and Slurm kills what is left soon after.
        Some(sig) => {
            if std::env::var("SLURM_LOCALID").is_ok_and(|id| id == "0") {
                eprintln!(
                    "ferry: error: --container-save: not saved to {}: the step was stopped ({sig})",
                    save.output.display()
                );
            }
        }
        None => {
            if let Err(e) = save_if_last(save) {
                eprintln!("ferry: error: --container-save: {e}");
                std::process::exit(status.code().filter(|c| *c != 0).unwrap_or(1));
            }
        }
    }
    if let Some(sig) = status.signal() {
        // End the way the command ended, so Slurm reports the signal.
        let _ = forwarded_signals().thread_unblock();
        if let Ok(sig) = Signal::try_from(sig) {
            let _ = nix::sys::signal::raise(sig);
        }
        std::process::exit(exit_code::killed_by(sig));
    }
    std::process::exit(status.code().unwrap_or(1))
}

/// Why the last task's save failed.
#[derive(Debug, thiserror::Error)]
enum SaveError {
    #[error("cannot {what} {path}: {source}")]
    Counter {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Save(#[from] crate::rootfs::unpacked::NamedError),
}

/// Count this task as ended; the last one saves. Errors are for the user, one line.
fn save_if_last(save: &SaveAfterTasks) -> Result<(), SaveError> {
    use std::io::{Read, Seek, Write};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&save.counter)
        .map_err(|source| counter_error("open", save, source))?;
    let mut locked = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| counter_error("lock", save, e.into()))?;
    let mut text = String::new();
    let _ = locked.read_to_string(&mut text);
    let ended = text.trim().parse::<u32>().unwrap_or(0) + 1;
    if ended < save.tasks {
        locked
            .rewind()
            .and_then(|()| locked.set_len(0))
            .and_then(|()| write!(locked, "{ended}"))
            .map_err(|source| counter_error("write", save, source))?;
        return Ok(());
    }
    use crate::image::registry::progress;
    let started = std::time::Instant::now();
    if save.speak {
        eprintln!(
            "ferry: saving the container to {} on {}",
            save.output.display(),
            progress::node_name()
        );
    }
    let saved = if save.speak {
        let mut lines = SaveLines::new(&save.output, started);
        crate::rootfs::unpacked::save_watched(&save.rootfs, &save.output, &mut |p| lines.update(p))
    } else {
        crate::rootfs::unpacked::save(&save.rootfs, &save.output)
    }
    .map_err(SaveError::from);
    if save.speak && saved.is_ok() {
        let size = std::fs::metadata(&save.output).map_or(0, |m| m.len());
        eprintln!(
            "ferry: saved the container to {} in {} ({} squashfs)",
            save.output.display(),
            progress::human_duration(started.elapsed().as_secs_f64()),
            progress::human_bytes(size)
        );
    }
    match &save.remove {
        Some(dir) => {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
        None => {
            let _ = std::fs::remove_file(&save.counter);
        }
    }
    saved
}

fn counter_error(what: &'static str, save: &SaveAfterTasks, source: std::io::Error) -> SaveError {
    SaveError::Counter {
        what,
        path: save.counter.clone(),
        source,
    }
}

/// A save's progress as lines on the task's stderr, one every
/// [`crate::image::registry::progress::LINE_INTERVAL`] at most: stderr is a file or pipe
/// (srun's, a batch job's output), where a redrawn bar would pile up.
struct SaveLines<'a> {
    output: &'a Path,
    started: Instant,
    last: Instant,
}

impl SaveLines<'_> {
    fn new(output: &Path, started: Instant) -> SaveLines<'_> {
        SaveLines {
            output,
            started,
            last: started,
        }
    }

    fn update(&mut self, progress: crate::rootfs::unpacked::SaveProgress) {
        use crate::image::registry::progress::LINE_INTERVAL;
        if self.last.elapsed() < LINE_INTERVAL {
            return;
        }
        self.last = Instant::now();
        eprintln!(
            "ferry: saving the container to {}: {}",
            self.output.display(),
            save_progress_text(progress, self.started.elapsed())
        );
    }
}

/// `40% (120.0 MiB written, 35.0 MiB/s, about 6 s left)`.
fn save_progress_text(
    progress: crate::rootfs::unpacked::SaveProgress,
    elapsed: Duration,
) -> String {
    use crate::image::registry::progress::{human_bytes, human_duration};
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        progress.written as f64 / secs
    } else {
        0.0
    };
    let done = format!(
        "{} written, {}/s",
        human_bytes(progress.written),
        human_bytes(rate as u64)
    );
    match progress.fraction {
        Some(f) if f > 0.0 => format!(
            "{:.0}% ({done}, about {} left)",
            f * 100.0,
            human_duration(secs * (1.0 - f) / f)
        ),
        _ => done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_save_line_gives_the_share_rate_and_estimate() {
        use crate::rootfs::unpacked::SaveProgress;
        let p = SaveProgress {
            written: 120 << 20,
            fraction: Some(0.4),
        };
        assert_eq!(
            save_progress_text(p, Duration::from_secs(4)),
            "40% (120.0 MiB written, 30.0 MiB/s, about 6 s left)"
        );
        let unknown = SaveProgress {
            fraction: None,
            ..p
        };
        assert_eq!(
            save_progress_text(unknown, Duration::from_secs(4)),
            "120.0 MiB written, 30.0 MiB/s"
        );
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn task(argv0: Option<&str>) -> TaskExec {
        TaskExec {
            user_fd: 10,
            mnt_fd: 11,
            own_fds: vec![(Namespace::Net, 12)],
            workdir: "/w".into(),
            start: ImageStart::default(),
            argv0: argv0.map(|a| a.as_bytes().to_vec()),
            entrypoint: true,
            entrypoint_log: false,
            save: None,
            unblock_signals: false,
        }
    }

    #[test]
    fn the_tasks_argv_comes_back_whether_ferry_replaced_or_preceded_argv0() {
        // Slurm 22.05: ferry's path took argv[0]'s place.
        assert_eq!(
            task(Some("hostname")).task_argv(&os(&["/usr/bin/ferry", "-s"])),
            os(&["hostname", "-s"])
        );
        // Slurm >= 23.11: ferry was prepended.
        assert_eq!(
            task(None).task_argv(&os(&["/usr/bin/ferry", "hostname", "-s"])),
            os(&["hostname", "-s"])
        );
    }

    #[test]
    fn travels_as_json() {
        let t = TaskExec {
            start: ImageStart {
                entrypoint: vec!["/e".into()],
                ..ImageStart::default()
            },
            ..task(Some("a\u{e9}"))
        };
        let text = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<TaskExec>(&text).unwrap(), t);
    }
}

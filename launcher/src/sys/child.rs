//! Child processes as root's side of the plugin must treat them inside slurmstepd, which
//! reaps every child (`wait3(-1)`): a child is known by a pidfd taken right after spawn, and
//! signalled, waited for and reaped only through it, never by its pid (which may belong to
//! someone else's process by then). Pipes from a child are read without waiting for their
//! end of file and up to a cap: the child's user can hold them open, or write into them,
//! through `/proc/PID/fd`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

/// A child known by a pidfd.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
}

impl Pidfd {
    /// The pidfd of `child`, spawned just now. The process found at its pid must be a
    /// child of this process (`waitid` on the pidfd answers only for children): had the
    /// child been reaped by another thread meanwhile (slurmstepd's `wait3(-1)`), its pid
    /// could only have gone to another child of this process after a full wrap of the pid
    /// space, in the microseconds since spawn. A child that has ended but is not yet
    /// reaped is still the child.
    pub fn of_spawned(child: &Child) -> io::Result<Pidfd> {
        let not_ours = || io::Error::new(io::ErrorKind::NotFound, "the child was gone at once");
        let pid = Pid::from_raw(child.id() as i32).ok_or_else(not_ours)?;
        let handle = Pidfd {
            fd: rustix::process::pidfd_open(pid, PidfdFlags::empty())?,
        };
        rustix::process::waitid(
            WaitId::PidFd(handle.fd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
        )
        .map_err(|_| not_ours())?;
        Ok(handle)
    }

    /// The pidfd of any process, to tell when it ends (never to reap it: it need not be a
    /// child). Whether `pid` is still the process the caller means must be checked after
    /// this (e.g. its start time): from here on the pid cannot go to another process.
    pub fn of_process(pid: i32) -> io::Result<Pidfd> {
        let pid = Pid::from_raw(pid)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid 0"))?;
        Ok(Pidfd {
            fd: rustix::process::pidfd_open(pid, PidfdFlags::empty())?,
        })
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Whether the process has ended (it may not be reaped yet); does not wait.
    pub fn has_exited(&self) -> bool {
        self.wait_exit(Duration::ZERO)
    }

    /// Wait up to `timeout` for the process to end; whether it has.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match rustix::event::poll(&mut fds, Some(&timespec(left))) {
                Ok(0) if left.is_zero() => return false,
                Ok(0) => continue,
                Ok(_) => return true,
                Err(rustix::io::Errno::INTR) => continue,
                // A pidfd that cannot be polled: treat as gone rather than signal blindly.
                Err(_) => return true,
            }
        }
    }

    /// SIGKILL, to this process only; one that has ended already is left alone.
    pub fn kill(&self) {
        self.signal(Signal::KILL);
    }

    pub fn signal(&self, signal: Signal) {
        match rustix::process::pidfd_send_signal(&self.fd, signal) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => tracing::warn!("cannot signal a child through its pidfd: {e}"),
        }
    }

    /// Collect the process's exit status if it has ended and nobody else (slurmstepd) has
    /// collected it; does not wait.
    pub fn try_reap(&self) -> Option<ExitStatus> {
        let status = rustix::process::waitid(
            WaitId::PidFd(self.fd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        )
        .ok()??;
        if let Some(code) = status.exit_status() {
            Some(ExitStatus::from_raw((code & 0xff) << 8))
        } else {
            status.terminating_signal().map(ExitStatus::from_raw)
        }
    }

    /// Wait (up to `timeout`) for the end and collect the status.
    pub fn reap(&self, timeout: Duration) -> Option<ExitStatus> {
        self.wait_exit(timeout);
        self.try_reap()
    }
}

fn timespec(d: Duration) -> rustix::event::Timespec {
    rustix::event::Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: d.subsec_nanos() as _,
    }
}

/// Bytes read from a pipe, up to a cap.
#[derive(Debug, Default)]
pub struct CappedBuffer {
    pub bytes: Vec<u8>,
    pub eof: bool,
    /// More than the cap was offered: reading stopped.
    pub overflowed: bool,
}

impl CappedBuffer {
    /// Read what `fd` (non-blocking) has now, up to `cap` bytes in all.
    pub fn read_available(&mut self, fd: BorrowedFd<'_>, cap: usize) {
        let mut chunk = [0u8; 16384];
        while !self.eof && !self.overflowed {
            match rustix::io::read(fd, &mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    if self.bytes.len() + n > cap {
                        self.overflowed = true;
                    } else {
                        self.bytes.extend_from_slice(&chunk[..n]);
                    }
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return,
                Err(_) => self.eof = true,
            }
        }
    }
}

/// Make `fd` non-blocking (for [`CappedBuffer::read_available`]).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

/// Make `fd` blocking again.
pub fn set_blocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags - rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

/// How a helper run by [`run_capped`] ended.
#[derive(Debug)]
pub enum HelperEnd {
    Exited {
        status: ExitStatus,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },
    /// `should_stop` said why; the helper's process group was stopped.
    Stopped(String),
    /// Its stdout or stderr offered more than the cap; its process group was killed.
    TooMuchOutput { cap: usize },
}

/// Run `cmd` (its credentials set by the caller) with `stdin`, in a process group of its own, reading
/// its stdout and stderr up to `cap` bytes each; every `check_every`, `should_stop` may ask
/// to stop it (SIGTERM to the group, SIGKILL after `grace`). The output is read until the
/// helper ends, not until end of file: someone holding its pipes open delays nothing.
/// `on_stderr` sees each piece of stderr as it comes (progress to pass on).
pub fn run_capped(
    cmd: &mut Command,
    stdin: Stdio,
    cap: usize,
    check_every: Duration,
    grace: Duration,
    mut should_stop: impl FnMut() -> Option<String>,
    mut on_stderr: impl FnMut(&[u8]),
) -> io::Result<HelperEnd> {
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    let stdout = OwnedFd::from(child.stdout.take().expect("piped"));
    let stderr = OwnedFd::from(child.stderr.take().expect("piped"));
    let pidfd = match Pidfd::of_spawned(&child) {
        Ok(p) => p,
        Err(e) => {
            // Nothing to signal safely: it is gone, or was never ours to find.
            let _ = child.try_wait();
            return Err(e);
        }
    };
    set_nonblocking(stdout.as_fd())?;
    set_nonblocking(stderr.as_fd())?;
    let group = child.id() as i32;
    let (mut out, mut err) = (CappedBuffer::default(), CappedBuffer::default());
    let mut next_check = Instant::now() + check_every;
    loop {
        let left = next_check.saturating_duration_since(Instant::now());
        let mut fds = [
            PollFd::new(&stdout, PollFlags::IN),
            PollFd::new(&stderr, PollFlags::IN),
            PollFd::new(&pidfd.fd, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, Some(&timespec(left))) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        out.read_available(stdout.as_fd(), cap);
        let seen = err.bytes.len();
        err.read_available(stderr.as_fd(), cap);
        on_stderr(&err.bytes[seen..]);
        if out.overflowed || err.overflowed {
            stop_group(group, &pidfd, Duration::ZERO);
            return Ok(HelperEnd::TooMuchOutput { cap });
        }
        if pidfd.has_exited() {
            // What it wrote before its end is in the pipes now; read it, then stop.
            out.read_available(stdout.as_fd(), cap);
            let seen = err.bytes.len();
            err.read_available(stderr.as_fd(), cap);
            on_stderr(&err.bytes[seen..]);
            if out.overflowed || err.overflowed {
                stop_group(group, &pidfd, Duration::ZERO);
                return Ok(HelperEnd::TooMuchOutput { cap });
            }
            let status = pidfd
                .try_reap()
                .ok_or_else(|| io::Error::other("its exit status was collected by another"))?;
            return Ok(HelperEnd::Exited {
                status,
                stdout: out.bytes,
                stderr: err.bytes,
            });
        }
        if Instant::now() >= next_check {
            if let Some(why) = should_stop() {
                stop_group(group, &pidfd, grace);
                return Ok(HelperEnd::Stopped(why));
            }
            next_check = Instant::now() + check_every;
        }
    }
}

/// SIGTERM to the helper's process group (ferry import then removes its work areas), and
/// SIGKILL to what is left after `grace`; then collect the helper. The group's id is the
/// helper's pid, which cannot be reused before the helper is collected, here, at the end.
fn stop_group(group: i32, pidfd: &Pidfd, grace: Duration) {
    use nix::sys::signal::{killpg, Signal};
    let group = nix::unistd::Pid::from_raw(group);
    if !grace.is_zero() {
        let _ = killpg(group, Signal::SIGTERM);
        pidfd.wait_exit(grace);
    }
    let _ = killpg(group, Signal::SIGKILL);
    pidfd.reap(Duration::from_secs(5));
}

/// An external program (mksquashfs, unsquashfs, ldconfig, scontrol, …) that did not do its
/// job, named as the caller named it.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot run {tool}: {error}{}", hint.map(|h| format!(" ({h})")).unwrap_or_default())]
    Start {
        tool: String,
        error: io::Error,
        /// How to get the program, for a missing one.
        hint: Option<&'static str>,
    },
    #[error("{tool} took over {} s", limit.as_secs())]
    TimedOut { tool: String, limit: Duration },
    #[error("{tool} wrote more than {cap} bytes to its output: stopped it")]
    TooMuchOutput { tool: String, cap: usize },
    /// It ended without success; `stderr` is the end of what it said.
    #[error("{tool} failed ({status}){}", colon(last_line(stderr)))]
    Failed {
        tool: String,
        status: ExitStatus,
        stderr: String,
    },
}

fn colon(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl ToolError {
    /// Say how to install the program when it could not be started.
    pub fn with_hint(mut self, how: &'static str) -> ToolError {
        if let ToolError::Start { hint, .. } = &mut self {
            *hint = Some(how);
        }
        self
    }

    /// The program's last line on stderr (its error, for most), when it ran and failed.
    pub fn last_line(&self) -> &str {
        match self {
            ToolError::Failed { stderr, .. } => last_line(stderr),
            _ => "",
        }
    }
}

/// The last non-empty line of `text`, trimmed: where programs put their error.
pub fn last_line(text: &str) -> &str {
    text.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

/// How often [`run_tool_watched`] calls back while the program runs.
pub const TOOL_TICK: Duration = Duration::from_millis(100);

/// How much of a tool's stderr is kept (its end), and of its stdout (more is an error).
const TOOL_STDERR_KEPT: usize = 1 << 20;
const TOOL_STDOUT_CAP: usize = 16 << 20;

/// Run `cmd`, a program ferry waits for, and return its output; an error names it as
/// `tool` and keeps its last stderr line. stdin and stdout are as the caller set them
/// (stdout is returned when piped); stderr is read by this function. With `limit`, a
/// program still running by then is killed. No threads: this also runs in the holder,
/// which may still have to enter a user namespace.
pub fn run_tool(
    tool: &str,
    cmd: &mut Command,
    limit: Option<Duration>,
) -> Result<std::process::Output, ToolError> {
    run_tool_watched(tool, cmd, limit, |_| {})
}

/// [`run_tool`], calling `on_tick` with the program's pid about every
/// [`TOOL_TICK`] while it runs: a caller that shows progress reads the program's state
/// (`/proc/PID/io`, the file it writes) then. The pid is the running child's, not yet
/// collected, so it names no other process.
pub fn run_tool_watched(
    tool: &str,
    cmd: &mut Command,
    limit: Option<Duration>,
    mut on_tick: impl FnMut(u32),
) -> Result<std::process::Output, ToolError> {
    let start_error = |error| ToolError::Start {
        tool: tool.to_string(),
        error,
        hint: None,
    };
    let mut child = cmd.stderr(Stdio::piped()).spawn().map_err(start_error)?;
    let deadline = limit.map(|l| Instant::now() + l);
    let mut stdout = child.stdout.take().map(OwnedFd::from);
    let mut stderr = child.stderr.take().map(OwnedFd::from);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let ended = loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left == Some(Duration::ZERO) {
            break Err(ToolError::TimedOut {
                tool: tool.to_string(),
                limit: limit.unwrap_or_default(),
            });
        }
        if stdout.is_none() && stderr.is_none() {
            // Both pipes closed: it has ended, or is about to.
            break match left {
                None => child.wait().map_err(start_error),
                Some(_) => match child.try_wait() {
                    Ok(Some(status)) => Ok(status),
                    Ok(None) => {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    Err(e) => Err(start_error(e)),
                },
            };
        }
        let slice = left.map_or(TOOL_TICK, |l| l.min(TOOL_TICK));
        let mut fds: Vec<PollFd> = [&stdout, &stderr]
            .into_iter()
            .flatten()
            .map(|fd| PollFd::new(fd, PollFlags::IN))
            .collect();
        match rustix::event::poll(&mut fds, Some(&timespec(slice))) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => break Err(start_error(e.into())),
        }
        drop(fds);
        // A program that left a child holding its pipes has ended all the same: then what
        // it wrote is read to the end (of what is there).
        let exited = child.try_wait().ok().flatten();
        let reads = if exited.is_some() { 1024 } else { 1 };
        read_ready(&mut stderr, &mut err, reads);
        let kept_from = err.len().saturating_sub(TOOL_STDERR_KEPT);
        err.drain(..kept_from);
        read_ready(&mut stdout, &mut out, reads);
        if out.len() > TOOL_STDOUT_CAP {
            break Err(ToolError::TooMuchOutput {
                tool: tool.to_string(),
                cap: TOOL_STDOUT_CAP,
            });
        }
        if let Some(status) = exited {
            break Ok(status);
        }
        on_tick(child.id());
    };
    let status = match ended {
        Ok(status) => status,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    if !status.success() {
        return Err(ToolError::Failed {
            tool: tool.to_string(),
            status,
            stderr: String::from_utf8_lossy(&err).into_owned(),
        });
    }
    Ok(std::process::Output {
        status,
        stdout: out,
        stderr: err,
    })
}

/// Read from `pipe` what is there now, at most `reads` times; close it at its end of file.
fn read_ready(pipe: &mut Option<OwnedFd>, into: &mut Vec<u8>, reads: usize) {
    let mut chunk = [0u8; 16384];
    for _ in 0..reads {
        let Some(fd) = pipe else {
            return;
        };
        let mut fds = [PollFd::new(&*fd, PollFlags::IN)];
        if !matches!(rustix::event::poll(&mut fds, Some(&timespec(Duration::ZERO))), Ok(n) if n > 0)
        {
            return;
        }
        match rustix::io::read(&*fd, &mut chunk) {
            Ok(0) => *pipe = None,
            Ok(n) => into.extend_from_slice(&chunk[..n]),
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => *pipe = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_tool_is_named_with_its_last_line() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo first >&2; echo 'last one  ' >&2; echo >&2; exit 4",
        ]);
        let e = run_tool("the tool", &mut cmd, None).unwrap_err();
        assert_eq!(e.last_line(), "last one");
        assert_eq!(e.to_string(), "the tool failed (exit status: 4): last one");
        let mut cmd = Command::new("/nonexistent/tool");
        let e = run_tool("tool", &mut cmd, None).unwrap_err();
        let e = e.with_hint("install it");
        assert!(e.to_string().starts_with("cannot run tool: "), "{e}");
        assert!(e.to_string().ends_with(" (install it)"), "{e}");
    }

    #[test]
    fn a_tool_gives_its_output_and_is_stopped_at_its_limit() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2"])
            .stdout(Stdio::piped());
        let out = run_tool("sh", &mut cmd, Some(Duration::from_secs(60))).unwrap();
        assert_eq!(
            (&out.stdout[..], &out.stderr[..]),
            (&b"out\n"[..], &b"err\n"[..])
        );
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let e = run_tool("sleep", &mut cmd, Some(Duration::from_millis(200))).unwrap_err();
        assert!(matches!(e, ToolError::TimedOut { .. }), "{e:?}");
        // A child that keeps the pipe open does not hold the caller up.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & echo done >&2"]);
        let started = Instant::now();
        run_tool("sh", &mut cmd, None).unwrap();
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn a_watched_tool_is_called_back_with_its_pid_while_it_runs() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 0.5; echo bad >&2; exit 3"]);
        let mut pids = Vec::new();
        let e = run_tool_watched("sh", &mut cmd, None, |pid| pids.push(pid)).unwrap_err();
        assert_eq!(e.to_string(), "sh failed (exit status: 3): bad");
        assert!(!pids.is_empty());
        assert!(pids.iter().all(|&p| p == pids[0]));
    }

    #[test]
    fn output_past_the_cap_kills_the_helper() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat /dev/zero; echo survived >&2"]);
        let end = run_capped(
            &mut cmd,
            Stdio::null(),
            100_000,
            Duration::from_secs(60),
            Duration::ZERO,
            || None,
            |_| {},
        )
        .unwrap();
        assert!(
            matches!(end, HelperEnd::TooMuchOutput { cap: 100_000 }),
            "{end:?}"
        );
    }

    #[test]
    fn a_helper_that_ends_is_collected_with_its_output() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let end = run_capped(
            &mut cmd,
            Stdio::null(),
            1000,
            Duration::from_secs(60),
            Duration::ZERO,
            || None,
            |_| {},
        )
        .unwrap();
        let HelperEnd::Exited {
            status,
            stdout,
            stderr,
        } = end
        else {
            panic!("{end:?}")
        };
        assert_eq!(status.code(), Some(3));
        assert_eq!(stdout, b"out\n");
        assert_eq!(stderr, b"err\n");
    }

    #[test]
    fn a_helper_whose_pipe_outlives_it_does_not_hold_up_the_caller() {
        // The background sleep keeps stdout open after sh has ended.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & echo done"]);
        let started = Instant::now();
        let end = run_capped(
            &mut cmd,
            Stdio::null(),
            1000,
            Duration::from_secs(60),
            Duration::ZERO,
            || None,
            |_| {},
        )
        .unwrap();
        assert!(matches!(end, HelperEnd::Exited { .. }), "{end:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn should_stop_stops_the_whole_group() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 60; sleep 60"]);
        let end = run_capped(
            &mut cmd,
            Stdio::null(),
            1000,
            Duration::from_millis(50),
            Duration::from_secs(1),
            || Some("asked".into()),
            |_| {},
        )
        .unwrap();
        assert!(
            matches!(end, HelperEnd::Stopped(ref w) if w == "asked"),
            "{end:?}"
        );
    }
}

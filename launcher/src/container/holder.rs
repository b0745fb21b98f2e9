//! The holder: the process that owns a container's namespaces while the container lives.
//!
//! [`prepare`] (caller side) starts `ferry hold`, sends it the spec as one JSON line on its
//! stdin and waits for one JSON line back on its stdout (before it, progress lines while an
//! image is unpacked, passed to the caller's observer). The holder's stdin then stays
//! open: closing it (or the caller dying) tells the holder to stop, so a killed caller never
//! leaves a container behind. [`hold`] is the holder side.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};

use crate::container::namespace;
use crate::container::phases::Phases;
use crate::rootfs::assembly as rootfs;
use crate::rootfs::unpacked::UnpackEvent;
use crate::spec::user::InsideIds;
use crate::spec::ContainerSpec;
use crate::sys::raw::{self, run_as_on_exec, Credentials};

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// The `ferry` binary to exec as `ferry hold`.
    pub holder_program: PathBuf,
    /// Drop to these credentials (setgroups, setresgid, setresuid) between fork and exec.
    pub run_as: Option<Credentials>,
    /// Kill the holder when the thread that started it exits (CLI only, never in slurmstepd,
    /// whose threads come and go).
    pub die_with_parent: bool,
    /// Give up waiting for the holder's report after this long.
    pub timeout: Duration,
    /// The holder's environment; `None` inherits the caller's.
    pub env: Option<Vec<(String, String)>>,
    /// Where the holder's own log lines go: inherited stderr, or nowhere.
    pub quiet: bool,
}

impl PrepareOptions {
    /// Options for a caller that is the user already (the CLI).
    pub fn for_cli(holder_program: PathBuf) -> Self {
        PrepareOptions {
            holder_program,
            run_as: None,
            die_with_parent: true,
            timeout: Duration::from_secs(120),
            env: None,
            quiet: false,
        }
    }
}

/// What the holder reports once the container is ready.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    pub pid: i32,
    /// The image's environment (to apply over the caller's, before explicit `--env`).
    pub env: Vec<(String, String)>,
    /// Where the command starts, inside the container.
    pub workdir: PathBuf,
    /// The image's own start command and WorkingDir.
    #[serde(default)]
    pub start: crate::spec::entrypoint::ImageStart,
    /// How long each phase of building the container took in the holder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<crate::container::phases::Phase>,
}

/// One line of the holder's stdout before the container runs: any number of `Progress`,
/// then `Ready` or `Failed`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Report {
    Ready(Ready),
    Failed {
        message: String,
    },
    /// An unpack (`unpack` provider, named containers) on the way to `Ready`.
    Progress(UnpackEvent),
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The holder refused the spec or could not build the container; the text is for users.
    #[error("{0}")]
    Container(String),
    #[error("cannot start the container holder {program}: {source}")]
    Spawn { program: PathBuf, source: io::Error },
    #[error("the container holder ended without a report ({status})")]
    Died { status: String },
    #[error("the container holder did not report within {0:?}")]
    Timeout(Duration),
    #[error("cannot talk to the container holder: {0}")]
    Io(#[from] io::Error),
    #[error("the container holder's report is longer than {0} bytes: stopped it")]
    ReportTooLong(usize),
}

/// A running holder. Dropping it stops the holder and waits for it.
///
/// The holder's stdout stays open after its report: it says there why it ends when it ends
/// on its own (its image server died). Whether it is gone is read from its pidfd, not from
/// that pipe (its user can hold the pipe open through `/proc/PID/fd/1`), and it is signalled
/// only through the pidfd: slurmstepd reaps every child it has, the holder included, so
/// its pid may belong to another process by then.
pub struct Holder {
    pidfd: crate::sys::child::Pidfd,
    stop: Option<ChildStdin>,
    /// The holder's stdout, non-blocking.
    report: Option<OwnedFd>,
    ready: Ready,
    /// Its end has been waited for ([`Holder::stop`]).
    ended: bool,
    /// It has let go of the container: its report ended ([`Holder::let_go`]).
    released: bool,
}

/// The most the caller reads of the holder's report (the image's environment is in it).
pub const MAX_REPORT: usize = 4 << 20;
/// The most the caller reads of what the holder says when it ends.
const MAX_LAST_WORDS: usize = 64 << 10;

/// How a holder ended.
#[derive(Debug, Default)]
pub struct Ended {
    /// Why it ended on its own; `None`: it ended as asked.
    pub early: Option<EarlyEnd>,
    /// Its exit status, where the caller could still collect it.
    pub status: Option<ExitStatus>,
}

/// What the holder says on its stdout when it ends on its own.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Final {
    ImageServerEnded { status: String },
}

/// Why a holder ended before it was asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EarlyEnd {
    /// Its squashfuse ended (with this status); the holder said so on its own stderr too.
    ImageServerEnded(String),
    /// It went without a word: killed.
    Killed,
}

impl EarlyEnd {
    fn from_last_words(last_words: Option<&str>) -> EarlyEnd {
        match last_words.and_then(|l| serde_json::from_str::<Final>(l).ok()) {
            Some(Final::ImageServerEnded { status }) => EarlyEnd::ImageServerEnded(status),
            None => EarlyEnd::Killed,
        }
    }
}

impl std::fmt::Display for EarlyEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EarlyEnd::ImageServerEnded(status) => write!(
                f,
                "the image server (squashfuse) ended while the container ran ({status}): the \
                 image's files became unreadable (\"Transport endpoint is not connected\", or a \
                 bus error)"
            ),
            EarlyEnd::Killed => f.write_str(
                "the container's holder was killed while the container ran, and its image \
                 mount with it: the image's files became unreadable",
            ),
        }
    }
}

impl Holder {
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// The holder's pid as this process spawned it (not as the holder reported it).
    pub fn pid(&self) -> i32 {
        self.ready.pid
    }

    /// The holder's pidfd: open its namespaces by pid, then check it still runs.
    pub fn pidfd(&self) -> &crate::sys::child::Pidfd {
        &self.pidfd
    }

    /// Whether the holder has ended on its own, and why (it should live until asked to
    /// stop); does not wait.
    pub fn ended_early(&mut self) -> Option<EarlyEnd> {
        if !self.pidfd.has_exited() {
            return None;
        }
        let words = self.report.take().and_then(|out| last_words(&out));
        Some(EarlyEnd::from_last_words(words.as_deref()))
    }

    /// Ask the holder to stop and wait for it (up to `grace`, then kill it).
    pub fn stop(mut self, grace: Duration) -> Ended {
        self.stop_inner(grace)
    }

    /// [`Self::stop`] for a caller that need not wait for the kernel to take the holder's
    /// namespaces down (the CLI, whose user waits for it): returns once the holder has let
    /// go ([`Self::let_go`]), killing it if it has not within `grace`. Its own status is
    /// collected only if it has ended by then; else its new parent collects it.
    pub fn stop_without_teardown(mut self, grace: Duration) -> Ended {
        self.ended = true;
        let early = self.let_go(grace);
        if !self.released && !self.pidfd.has_exited() {
            self.pidfd.kill();
            self.pidfd.wait_exit(Duration::from_secs(5));
        }
        let status = self.pidfd.try_reap();
        Ended { early, status }
    }

    /// Ask the holder to stop, and wait (up to `grace`) only until it has let go of the
    /// container: its running record is gone and its report ended, so no step can attach
    /// any more. The rest of its end (the image server's, the namespaces') is
    /// [`Holder::stop`]'s to wait for, later: a step's last task waits for this much alone.
    /// Returns why it ended on its own, if it did (said once: `stop` then says nothing).
    pub fn let_go(&mut self, grace: Duration) -> Option<EarlyEnd> {
        self.stop.as_ref()?;
        // Gone already, or going with something to say?
        let early = self.ended_early();
        self.stop.take();
        let Some(out) = self.report.take() else {
            return early;
        };
        let said = read_to_end_within(&out, &self.pidfd, grace);
        self.released = said.eof || said.overflowed;
        let text = String::from_utf8_lossy(&said.bytes);
        let words = crate::sys::child::last_line(&text);
        match serde_json::from_str::<Final>(words) {
            Ok(_) => Some(EarlyEnd::from_last_words(Some(words))),
            Err(_) => early,
        }
    }

    fn stop_inner(&mut self, grace: Duration) -> Ended {
        self.ended = true;
        let early = self.let_go(grace);
        if !self.pidfd.wait_exit(grace) {
            self.pidfd.kill();
            self.pidfd.wait_exit(Duration::from_secs(5));
        }
        // Collect it where this process may (not in slurmstepd, which reaps it itself).
        let status = self.pidfd.reap(Duration::from_millis(200));
        Ended { early, status }
    }
}

/// What the holder says from now to the end of its report `out` (non-blocking), waiting up
/// to `grace` for that end, or for the holder's exit.
fn read_to_end_within(
    out: &OwnedFd,
    pidfd: &crate::sys::child::Pidfd,
    grace: Duration,
) -> crate::sys::child::CappedBuffer {
    let mut said = crate::sys::child::CappedBuffer::default();
    let deadline = Instant::now() + grace;
    loop {
        said.read_available(out.as_fd(), MAX_LAST_WORDS);
        let left = deadline.saturating_duration_since(Instant::now());
        if said.eof || said.overflowed || left.is_zero() || pidfd.has_exited() {
            // What it wrote before its exit is in the pipe now.
            said.read_available(out.as_fd(), MAX_LAST_WORDS);
            return said;
        }
        let mut fds = [
            PollFd::new(out.as_fd(), PollFlags::POLLIN),
            PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
        ];
        let wait = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let _ = poll(&mut fds, wait);
    }
}

/// The last line the holder wrote on its stdout before it ended, read from what the pipe
/// holds now (up to [`MAX_LAST_WORDS`]), without waiting for its end of file.
fn last_words(out: &OwnedFd) -> Option<String> {
    let mut said = crate::sys::child::CappedBuffer::default();
    said.read_available(out.as_fd(), MAX_LAST_WORDS);
    let text = String::from_utf8_lossy(&said.bytes);
    Some(crate::sys::child::last_line(&text))
        .filter(|l| !l.is_empty())
        .map(str::to_string)
}

impl Drop for Holder {
    fn drop(&mut self) {
        if !self.ended {
            self.stop_inner(Duration::from_secs(5));
        }
    }
}

/// Start a holder for `spec` and wait for its report.
pub fn prepare(spec: &ContainerSpec, opts: &PrepareOptions) -> Result<Holder, PrepareError> {
    prepare_with(spec, opts, None)
}

/// [`prepare`], with the image already mounted by the kernel (the `kernel` provider, see
/// [`crate::rootfs::kernel`]): the holder starts in a mount namespace of its own where `kernel` is
/// attached, and the caller's descriptor of the mount is closed once the holder runs.
pub fn prepare_with(
    spec: &ContainerSpec,
    opts: &PrepareOptions,
    kernel: Option<crate::rootfs::kernel::KernelMount>,
) -> Result<Holder, PrepareError> {
    prepare_observed(spec, opts, kernel, &mut |_| {})
}

/// [`prepare_with`], passing each [`UnpackEvent`] of the holder to `observe` as it comes
/// (the caller tells the user; the holder's own stderr may reach nobody).
pub fn prepare_observed(
    spec: &ContainerSpec,
    opts: &PrepareOptions,
    kernel: Option<crate::rootfs::kernel::KernelMount>,
    observe: &mut dyn FnMut(&UnpackEvent),
) -> Result<Holder, PrepareError> {
    // The CLI as the user, single-threaded, needs no exec of `ferry hold` (a few ms of a
    // start of ~20): a fork runs the holder's code with the spec it already has. Root's
    // callers (the plugin in slurmstepd, the kernel provider) exec, to change credentials
    // and start from a clean process.
    if opts.run_as.is_none() && opts.env.is_none() && kernel.is_none() && raw::is_single_threaded()
    {
        return finish_prepare(fork_holder(spec, opts)?, spec, opts, observe);
    }
    let mut cmd = Command::new(&opts.holder_program);
    cmd.arg("hold").stdin(Stdio::piped()).stdout(Stdio::piped());
    cmd.stderr(if opts.quiet {
        Stdio::null()
    } else {
        Stdio::inherit()
    });
    if let Some(env) = &opts.env {
        cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    }
    if let Some(k) = &kernel {
        // First: it needs the root that run_as_on_exec then gives up.
        k.attach_on_exec(&mut cmd);
    }
    run_as_on_exec(&mut cmd, opts.run_as.clone(), opts.die_with_parent);
    let spawned = cmd.spawn();
    // The holder's namespace holds the mount now (or, on failure, nothing does, and the
    // loop device detaches itself).
    drop(kernel);
    let mut child = spawned.map_err(|source| PrepareError::Spawn {
        program: opts.holder_program.clone(),
        source,
    })?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = OwnedFd::from(child.stdout.take().expect("piped"));
    // Taken before anything else: from here on the holder is known by its pidfd alone.
    let pidfd = match crate::sys::child::Pidfd::of_spawned(&child) {
        Ok(p) => p,
        Err(_) => {
            let status = child.try_wait().ok().flatten().map(Ok);
            return Err(PrepareError::Died {
                status: status
                    .map(describe)
                    .unwrap_or_else(|| "gone at once".into()),
            });
        }
    };
    // The pid this process spawned, never one the holder reports about itself.
    let pid = child.id() as i32;
    drop(child);
    let started = Started {
        stdin,
        stdout,
        pidfd,
        pid,
        has_spec: false,
    };
    finish_prepare(started, spec, opts, observe)
}

/// A holder just started, before its report.
struct Started {
    stdin: ChildStdin,
    stdout: OwnedFd,
    pidfd: crate::sys::child::Pidfd,
    pid: i32,
    /// Whether it has the spec already (forked), else it reads it on its stdin.
    has_spec: bool,
}

/// Fork the holder: the child runs [`hold_spec`] with `spec`, on pipes as its stdin and
/// stdout, as an exec'd `ferry hold` would.
fn fork_holder(spec: &ContainerSpec, opts: &PrepareOptions) -> Result<Started, PrepareError> {
    use nix::fcntl::OFlag;
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from);
    let (stdin_read, stdin_write) = pipe()?;
    let (stdout_read, stdout_write) = pipe()?;
    let null = if opts.quiet {
        Some(std::fs::OpenOptions::new().write(true).open("/dev/null")?)
    } else {
        None
    };
    let spawn_error = |e: nix::Error| PrepareError::Spawn {
        program: "(fork)".into(),
        source: e.into(),
    };
    let Some(child) = raw::fork_single_threaded().map_err(spawn_error)? else {
        let code = (|| {
            if opts.die_with_parent {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).ok()?;
            }
            use std::os::fd::AsRawFd;
            nix::unistd::dup2(stdin_read.as_raw_fd(), 0).ok()?;
            nix::unistd::dup2(stdout_write.as_raw_fd(), 1).ok()?;
            if let Some(null) = &null {
                nix::unistd::dup2(null.as_raw_fd(), 2).ok()?;
            }
            raw::close_from(3).ok()?;
            show_as_ferry_hold();
            Some(hold_spec(Ok(spec.clone())))
        })();
        std::process::exit(code.unwrap_or(1));
    };
    drop((stdin_read, stdout_write, null));
    // This process's own child, not reaped by anyone yet: its pid is still its own.
    let pidfd = crate::sys::child::Pidfd::of_process(child.as_raw()).map_err(|source| {
        PrepareError::Spawn {
            program: "(fork)".into(),
            source,
        }
    })?;
    Ok(Started {
        stdin: ChildStdin::from(stdin_write),
        stdout: stdout_read,
        pidfd,
        pid: child.as_raw(),
        has_spec: true,
    })
}

/// Make the forked holder's command line read `ferry hold`, as the exec'd one's does, for
/// `ps`, `pgrep -f` and admins: its arguments are rewritten in place, in the process's own
/// memory (the new line is shorter: `ferry run` had an image at least). Cosmetic: a failure
/// leaves the line as it was.
fn show_as_ferry_hold() {
    use std::os::unix::fs::FileExt;
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name in parentheses, from the 3rd; arg_start is the 48th.
    let Some((_, after_name)) = stat.rsplit_once(')') else {
        return;
    };
    let fields: Vec<u64> = after_name
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let (Some(&start), Some(&end)) = (fields.get(48 - 3), fields.get(49 - 3)) else {
        return;
    };
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let mut line = std::os::unix::ffi::OsStrExt::as_bytes(argv0.as_os_str()).to_vec();
    line.extend_from_slice(b"\0hold\0");
    let Some(room) = end.checked_sub(start).and_then(|r| usize::try_from(r).ok()) else {
        return;
    };
    if start == 0 || line.len() > room {
        return;
    }
    line.resize(room, 0);
    if let Ok(mem) = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")
    {
        let _ = mem.write_all_at(&line, start);
    }
}

/// Send the spec where the holder reads it, and wait for its report.
fn finish_prepare(
    started: Started,
    spec: &ContainerSpec,
    opts: &PrepareOptions,
    observe: &mut dyn FnMut(&UnpackEvent),
) -> Result<Holder, PrepareError> {
    let Started {
        mut stdin,
        stdout,
        pidfd,
        pid,
        has_spec,
    } = started;
    let outcome = (|| {
        crate::sys::child::set_nonblocking(stdout.as_fd())?;
        if !has_spec {
            let mut line = serde_json::to_string(spec).map_err(io::Error::other)?;
            line.push('\n');
            stdin.write_all(line.as_bytes())?;
        }
        read_report(&stdout, &pidfd, opts.timeout, observe)
    })();
    let finish = |pidfd: crate::sys::child::Pidfd, err: PrepareError| {
        pidfd.kill();
        let status = pidfd.reap(Duration::from_secs(5));
        match err {
            PrepareError::Died { .. } => PrepareError::Died {
                status: status.map(Ok).map(describe).unwrap_or_default(),
            },
            other => other,
        }
    };
    match outcome {
        Ok(Some(Report::Ready(ready))) => Ok(Holder {
            pidfd,
            stop: Some(stdin),
            report: Some(stdout),
            ready: Ready { pid, ..ready },
            ended: false,
            released: false,
        }),
        Ok(Some(Report::Failed { message })) => {
            drop(stdin);
            if !pidfd.wait_exit(Duration::from_secs(5)) {
                pidfd.kill();
            }
            pidfd.reap(Duration::from_secs(1));
            Err(PrepareError::Container(message))
        }
        // `read_report` passes progress on and never returns it.
        Ok(None) | Ok(Some(Report::Progress(_))) => Err(finish(
            pidfd,
            PrepareError::Died {
                status: String::new(),
            },
        )),
        Err(e) => Err(finish(pidfd, e)),
    }
}

fn describe(status: io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (_, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => e.to_string(),
    }
}

/// The holder's one-line report, read from `stdout` (non-blocking) up to [`MAX_REPORT`]
/// bytes a line; `None` when the holder ended without one (its end is read from `pidfd`, as
/// its user can keep the pipe open). Progress lines before it go to `observe`, never
/// returned.
fn read_report(
    stdout: &OwnedFd,
    pidfd: &crate::sys::child::Pidfd,
    timeout: Duration,
    observe: &mut dyn FnMut(&UnpackEvent),
) -> Result<Option<Report>, PrepareError> {
    let deadline = Instant::now() + timeout;
    let mut buf = crate::sys::child::CappedBuffer::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(PrepareError::Timeout(timeout));
        }
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        let mut fds = [
            PollFd::new(stdout.as_fd(), PollFlags::POLLIN),
            PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, ms) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(PrepareError::Io(e.into())),
        }
        let exited = pidfd.has_exited();
        buf.read_available(stdout.as_fd(), MAX_REPORT);
        while let Some(end) = buf.bytes.iter().position(|b| *b == b'\n') {
            let report = serde_json::from_slice(&buf.bytes[..end])
                .map_err(|e| PrepareError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            match report {
                Report::Progress(event) => {
                    observe(&event);
                    buf.bytes.drain(..=end);
                }
                report => return Ok(Some(report)),
            }
        }
        if buf.overflowed {
            return Err(PrepareError::ReportTooLong(MAX_REPORT));
        }
        if buf.eof || exited {
            return Ok(None);
        }
    }
}

/// The holder side (`ferry hold`): read the spec, build the container, report, then wait
/// until told to stop. Returns the process exit code.
pub fn hold() -> i32 {
    ignore_terminal_signals();
    let mut stdin = BufReader::new(io::stdin().lock());
    let mut line = String::new();
    let spec = match stdin.read_line(&mut line) {
        Ok(0) => return 1,
        Ok(_) => serde_json::from_str::<ContainerSpec>(&line)
            .map_err(|e| format!("bad container spec from the caller: {e}")),
        Err(e) => Err(format!("cannot read the container spec: {e}")),
    };
    drop(stdin);
    hold_spec(spec)
}

fn ignore_terminal_signals() {
    for signal in [
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGPIPE,
    ] {
        // The command, not the holder, answers a terminal's ^C.
        let _ = raw::ignore_signal(signal);
    }
}

/// The holder with its spec (or why there is none): build the container, report, then
/// wait until told to stop. Returns the process exit code.
fn hold_spec(spec: Result<ContainerSpec, String>) -> i32 {
    ignore_terminal_signals();
    let mut stdin = BufReader::new(io::stdin().lock());
    let mut recorder = None;
    let outcome = spec.and_then(|spec| {
        // Opened while the host's file system is still in view.
        recorder = spec.running_record.as_ref().and_then(|place| {
            crate::container::named::Recorder::open(place)
                .map_err(|e| eprintln!("ferry: warning: not attachable: {e}"))
                .ok()
        });
        build(&spec, &mut tell_caller).map_err(|e| e.to_string())
    });
    let mut out = io::stdout().lock();
    let (report, container) = match outcome {
        Ok(mut container) => (
            Report::Ready(Ready {
                pid: std::process::id() as i32,
                env: container.env.clone(),
                workdir: container.workdir.clone(),
                start: container.start.clone(),
                phases: std::mem::take(&mut container.phases),
            }),
            Some(container),
        ),
        Err(message) => (Report::Failed { message }, None),
    };
    // The record first: once the caller hears Ready its tasks run, and a step they start
    // may look for this container at once.
    if let (Some(recorder), Report::Ready(ready)) = (recorder.as_mut(), &report) {
        if let Err(e) = recorder.write(ready) {
            eprintln!("ferry: warning: not attachable: cannot write its record: {e}");
        }
    }
    let text = serde_json::to_string(&report).expect("reports serialise") + "\n";
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    drop(out);
    let Some(mut container) = container else {
        return 1;
    };
    // stdout stays open to the caller: its end of file says the holder is gone.
    let mut ended = wait_for_stop(&mut stdin, &mut container.squashfuse);
    if let Some(recorder) = &recorder {
        recorder.remove();
    }
    if let Some(fuse) = container.squashfuse.as_mut() {
        // Told to stop because the tasks ended, perhaps because their image went away: say so.
        if let Ok(Some(status)) = fuse.try_wait() {
            container.squashfuse.take();
            ended = Stopped::ImageServerEnded(status);
        }
    }
    let code = match ended {
        Stopped::Asked => 0,
        Stopped::ImageServerEnded(status) => {
            let status = describe(Ok(status));
            let last = Final::ImageServerEnded {
                status: status.clone(),
            };
            let line = serde_json::to_string(&last).expect("serialises") + "\n";
            let _ = io::stdout().lock().write_all(line.as_bytes());
            eprintln!("ferry: error: {}", EarlyEnd::ImageServerEnded(status));
            IMAGE_SERVER_ENDED
        }
    };
    if let Some(mut fuse) = container.squashfuse.take() {
        // A read-only image server has nothing to flush: end it at once, so the mount (and
        // with the holder gone, the namespace) disappears without delay.
        let _ = fuse.kill();
        let _ = fuse.wait();
    }
    // A tied background unpack goes before the holder: Slurm removes the step's cgroups
    // once the holder is gone, and cannot while one of its processes is in them.
    if let Some(unpack) = container.unpack_tie.take() {
        unpack.end();
    }
    // Its tree is free for `ferry gc` and others from here.
    drop(container.hold.take());
    // The end of the report tells the caller that the container is let go (no record, no
    // more words, no image server, no lock): it need not wait for the rest, the kernel's
    // teardown of the namespaces as this process exits (Holder::let_go).
    let _ = nix::unistd::close(1);
    code
}

/// The holder's exit status when its squashfuse ended before the container did.
pub const IMAGE_SERVER_ENDED: i32 = 3;

enum Stopped {
    Asked,
    ImageServerEnded(ExitStatus),
}

/// A progress line to the caller, on the holder's stdout; lost ones only cost the user a line.
fn tell_caller(event: UnpackEvent) {
    let line = serde_json::to_string(&Report::Progress(event)).expect("reports serialise") + "\n";
    let mut out = io::stdout().lock();
    let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
}

fn build(
    spec: &ContainerSpec,
    observe: &mut dyn FnMut(UnpackEvent),
) -> Result<rootfs::Container, Box<dyn std::error::Error>> {
    // Nothing the container execs may gain privileges: without that guarantee, no container.
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| format!("cannot set no_new_privs for the container: {e}"))?;
    let mut phases = Phases::new();
    let inputs = crate::rootfs::inputs::open_inputs(spec, observe)?;
    phases.end("inputs");
    let inside = if spec.remap_root {
        InsideIds { uid: 0, gid: 0 }
    } else {
        InsideIds {
            uid: spec.user.uid,
            gid: spec.user.gid,
        }
    };
    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    namespace::enter_new(uid, gid, inside, spec.unshare)?;
    phases.end("user namespace");
    Ok(rootfs::build(spec, inputs, inside, phases)?)
}

/// Block until stdin reaches end of file (the caller closed it or died), SIGTERM arrives,
/// or the image server (`squashfuse`, a child) ends.
fn wait_for_stop(stdin: &mut impl BufRead, squashfuse: &mut Option<Child>) -> Stopped {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGCHLD);
    if mask.thread_block().is_err() {
        return Stopped::Asked;
    }
    let Ok(sfd) = nix::sys::signalfd::SignalFd::new(&mask) else {
        return Stopped::Asked;
    };
    let stdin_fd = io::stdin();
    loop {
        let mut fds = [
            PollFd::new(stdin_fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::Error::EINTR) => continue,
            Err(_) => return Stopped::Asked,
            Ok(_) => {}
        }
        if fds[1].any().unwrap_or(false) {
            match sfd.read_signal() {
                Ok(Some(info)) if info.ssi_signo == libc::SIGCHLD as u32 => {
                    if let Some(Ok(Some(status))) = squashfuse.as_mut().map(Child::try_wait) {
                        squashfuse.take();
                        return Stopped::ImageServerEnded(status);
                    }
                    continue;
                }
                _ => return Stopped::Asked,
            }
        }
        if fds[0].any().unwrap_or(false) {
            let mut sink = String::new();
            match stdin.read_line(&mut sink) {
                Ok(0) | Err(_) => return Stopped::Asked,
                Ok(_) => {}
            }
        }
    }
}

//! The holder: the process that owns a container's namespaces while the container lives.
//!
//! [`prepare`] (caller side) starts `ferry hold`, sends it the spec as one JSON line on its
//! stdin and waits for one JSON line back on its stdout. The holder's stdin then stays
//! open: closing it (or the caller dying) tells the holder to stop, so a killed caller never
//! leaves a container behind. [`hold`] is the holder side.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};

use crate::namespace;
use crate::rootfs;
use crate::spec::ContainerSpec;
use crate::sys;
use crate::user::InsideIds;

/// Who the holder runs as when the caller is root (the plugin in slurmstepd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

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
    pub start: crate::entrypoint::ImageStart,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Report {
    Ready(Ready),
    Failed { message: String },
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
}

/// A running holder. Dropping it stops the holder and waits for it.
pub struct Holder {
    child: Child,
    stop: Option<ChildStdin>,
    ready: Ready,
}

impl Holder {
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    pub fn pid(&self) -> i32 {
        self.ready.pid
    }

    /// Ask the holder to stop and wait for it (up to `grace`, then kill it).
    pub fn stop(mut self, grace: Duration) -> io::Result<ExitStatus> {
        self.stop_inner(grace)
    }

    fn stop_inner(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        self.stop.take();
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                return self.child.wait();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if self.stop.is_some() {
            let _ = self.stop_inner(Duration::from_secs(5));
        }
    }
}

/// Make `cmd` run as `run_as` (when given; the caller is root, maybe with only its
/// effective uid dropped, as in slurmstepd), optionally dying with the thread that starts
/// it, with no inherited descriptor beyond stdio.
pub fn run_as_on_exec(cmd: &mut Command, run_as: Option<Credentials>, die_with_parent: bool) {
    // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
    // (setgroups, setresgid, setresuid, prctl, close_range) on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(c) = &run_as {
                // No allocation here: the caller may be multi-threaded (slurmstepd).
                // slurmstepd runs spank callbacks with only its effective uid dropped to the
                // user; take root back first (the real uid is root) so the drop is complete.
                if libc::getuid() == 0 && libc::geteuid() != 0 {
                    libc::seteuid(0);
                }
                if libc::setgroups(c.groups.len(), c.groups.as_ptr()) != 0
                    || libc::setresgid(c.gid, c.gid, c.gid) != 0
                    || libc::setresuid(c.uid, c.uid, c.uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            if die_with_parent {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                    .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
            }
            sys::cloexec_from(3)
        });
    }
}

/// Start a holder for `spec` and wait for its report.
pub fn prepare(spec: &ContainerSpec, opts: &PrepareOptions) -> Result<Holder, PrepareError> {
    prepare_with(spec, opts, None)
}

/// [`prepare`], with the image already mounted by the kernel (the `kernel` provider, see
/// [`crate::kernel`]): the holder starts in a mount namespace of its own where `kernel` is
/// attached, and the caller's descriptor of the mount is closed once the holder runs.
pub fn prepare_with(
    spec: &ContainerSpec,
    opts: &PrepareOptions,
    kernel: Option<crate::kernel::KernelMount>,
) -> Result<Holder, PrepareError> {
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
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let outcome = (|| {
        let mut line = serde_json::to_string(spec).map_err(io::Error::other)?;
        line.push('\n');
        stdin.write_all(line.as_bytes())?;
        read_report(stdout, opts.timeout)
    })();
    let finish = |mut child: Child, err: PrepareError| {
        let _ = child.kill();
        let status = child.wait();
        match err {
            PrepareError::Died { .. } => PrepareError::Died {
                status: describe(status),
            },
            other => other,
        }
    };
    match outcome {
        Ok(Some(Report::Ready(ready))) => Ok(Holder {
            child,
            stop: Some(stdin),
            ready,
        }),
        Ok(Some(Report::Failed { message })) => {
            drop(stdin);
            let _ = child.wait();
            Err(PrepareError::Container(message))
        }
        Ok(None) => Err(finish(
            child,
            PrepareError::Died {
                status: String::new(),
            },
        )),
        Err(e) => Err(finish(child, e)),
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

fn read_report(stdout: ChildStdout, timeout: Duration) -> Result<Option<Report>, PrepareError> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut stdout = stdout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(PrepareError::Timeout(timeout));
        }
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(stdout.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(PrepareError::Io(e.into())),
        }
        let mut chunk = [0u8; 8192];
        let n = stdout.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let report = serde_json::from_slice(&buf[..end])
                .map_err(|e| PrepareError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            return Ok(Some(report));
        }
    }
}

/// The holder side (`ferry hold`): read the spec, build the container, report, then wait
/// until told to stop. Returns the process exit code.
pub fn hold() -> i32 {
    for signal in [
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGPIPE,
    ] {
        // The command, not the holder, answers a terminal's ^C.
        let _ = sys::ignore_signal(signal);
    }
    let mut stdin = BufReader::new(io::stdin().lock());
    let mut line = String::new();
    let outcome = match stdin.read_line(&mut line) {
        Ok(0) => return 1,
        Ok(_) => serde_json::from_str::<ContainerSpec>(&line)
            .map_err(|e| format!("bad container spec from the caller: {e}"))
            .and_then(|spec| build(&spec).map_err(|e| e.to_string())),
        Err(e) => Err(format!("cannot read the container spec: {e}")),
    };
    let mut out = io::stdout().lock();
    let (report, container) = match outcome {
        Ok(container) => (
            Report::Ready(Ready {
                pid: std::process::id() as i32,
                env: container.env.clone(),
                workdir: container.workdir.clone(),
                start: container.start.clone(),
            }),
            Some(container),
        ),
        Err(message) => (Report::Failed { message }, None),
    };
    let text = serde_json::to_string(&report).expect("reports serialise") + "\n";
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    drop(out);
    let Some(mut container) = container else {
        return 1;
    };
    // Nothing more goes to the caller; a holder must not keep its pipe open either.
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = sys::dup2_raw(null.as_raw_fd(), 1);
    }
    wait_for_stop(&mut stdin);
    if let Some(mut fuse) = container.squashfuse.take() {
        // A read-only image server has nothing to flush: end it at once, so the mount (and
        // with the holder gone, the namespace) disappears without delay.
        let _ = fuse.kill();
        let _ = fuse.wait();
    }
    0
}

fn build(spec: &ContainerSpec) -> Result<rootfs::Container, Box<dyn std::error::Error>> {
    let _ = nix::sys::prctl::set_no_new_privs();
    let inputs = rootfs::open_inputs(spec)?;
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
    namespace::enter_new(uid, gid, inside)?;
    Ok(rootfs::build(spec, inputs, inside)?)
}

/// Block until stdin reaches end of file (the caller closed it or died) or SIGTERM arrives.
fn wait_for_stop(stdin: &mut impl BufRead) {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    if mask.thread_block().is_err() {
        return;
    }
    let Ok(sfd) = nix::sys::signalfd::SignalFd::new(&mask) else {
        return;
    };
    let stdin_fd = io::stdin();
    loop {
        let mut fds = [
            PollFd::new(stdin_fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::Error::EINTR) => continue,
            Err(_) => return,
            Ok(_) => {}
        }
        if fds[1].any().unwrap_or(false) {
            return;
        }
        if fds[0].any().unwrap_or(false) {
            let mut sink = String::new();
            match stdin.read_line(&mut sink) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

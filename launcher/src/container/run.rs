//! `ferry run`: a container for one command, made of the same prepare and join steps the
//! plugin uses, with the command's exit status and signals passed through.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::container::exit_code;
use crate::container::holder::{self, PrepareError, PrepareOptions};
use crate::container::join::{self, JoinError, Namespaces};
pub use crate::container::phases::Phases;
use crate::spec::env;
use crate::spec::ContainerSpec;
use crate::sys::raw;

const FORWARDED: [Signal; 9] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGCONT,
    Signal::SIGALRM,
];

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    Kernel(#[from] crate::rootfs::kernel::KernelError),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: nix::Error,
    },
    #[error("argument or environment holds a NUL byte")]
    Nul,
}

fn cstr(bytes: Vec<u8>) -> Result<CString, RunError> {
    CString::new(bytes).map_err(|_| RunError::Nul)
}

/// Whether `ferry run` prints how long each phase of the container's start took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timings {
    Quiet,
    /// One line a phase on stderr once the command runs (`--timings`).
    Print,
}

/// `ferry run`'s phases so far (reading its options), and whether to print them all.
pub struct RunTimings {
    pub phases: Phases,
    pub timings: Timings,
}

impl RunTimings {
    /// Phases kept (for `FERRY_LOG=debug`) from now, none printed.
    pub fn quiet() -> RunTimings {
        RunTimings {
            phases: Phases::new(),
            timings: Timings::Quiet,
        }
    }
}

/// Run `argv` in a container built from `spec` (an empty `argv`, or `spec.entrypoint`,
/// runs the image's start command, see [`crate::spec::entrypoint`]); returns the exit status for
/// ferry to use.
pub fn run(
    spec: &ContainerSpec,
    argv: &[OsString],
    opts: &PrepareOptions,
    timings: RunTimings,
) -> Result<i32, RunError> {
    let caller = std::env::vars_os().map(|(k, v)| {
        (
            k.to_string_lossy().into_owned(),
            v.to_string_lossy().into_owned(),
        )
    });
    run_timed(spec, argv, opts, caller.collect(), timings)
}

/// [`run`] with `caller` in place of ferry's own environment under the image's (`ferry
/// build` gives its steps only the image's variables and build arguments).
pub fn run_in_env(
    spec: &ContainerSpec,
    argv: &[OsString],
    opts: &PrepareOptions,
    caller: Vec<(String, String)>,
) -> Result<i32, RunError> {
    run_timed(spec, argv, opts, caller, RunTimings::quiet())
}

fn run_timed(
    spec: &ContainerSpec,
    argv: &[OsString],
    opts: &PrepareOptions,
    caller: Vec<(String, String)>,
    timings: RunTimings,
) -> Result<i32, RunError> {
    let remap_root = spec.remap_root;
    let mut prepared = prepare_command(spec, argv, opts, caller, timings)?;
    let status = fork_and_supervise(&mut prepared, |p, mask, entered| {
        let command = CommandLine {
            args: &p.args,
            envp: &p.envp,
            search_path: &p.search_path,
        };
        exec_in_container(
            &p.namespaces,
            &p.workdir,
            remap_root,
            &command,
            mask,
            entered,
        )
    })?;
    Ok(finish(prepared, status))
}

/// A container made for one command, and that command ready to exec inside.
pub(crate) struct Prepared {
    pub holder: holder::Holder,
    pub namespaces: Namespaces,
    pub args: Vec<CString>,
    pub envp: Vec<CString>,
    pub search_path: String,
    pub workdir: PathBuf,
    phases: Phases,
    timings: Timings,
}

/// Make the container (`spec`) and the command line, environment and working directory of
/// `argv` in it.
pub(crate) fn prepare_command(
    spec: &ContainerSpec,
    argv: &[OsString],
    opts: &PrepareOptions,
    caller: Vec<(String, String)>,
    RunTimings {
        mut phases,
        timings,
    }: RunTimings,
) -> Result<Prepared, RunError> {
    let kernel = crate::rootfs::kernel::mount_for(spec, &crate::rootfs::kernel::Probe::InProcess)?;
    if kernel.is_some() {
        phases.end("kernel mount");
    }
    // An unpack before the container (the `unpack` provider's first use) says how far it is.
    let speak = !opts.quiet && crate::image::registry::progress::Progress::auto().speaks();
    let mut reporter = crate::rootfs::unpacked::UnpackReporter::new(
        spec.image.display().to_string(),
        crate::image::registry::progress::node_name(),
        speak,
        spec.unpacked.is_none(),
    );
    let mut tell_user = |event: &crate::rootfs::unpacked::UnpackEvent| {
        for line in reporter.lines(event) {
            eprintln!("{line}");
        }
    };
    let holder = holder::prepare_observed(spec, opts, kernel, &mut tell_user)?;
    // The holder's own phases, and the rest of its time: its start, the spec and report.
    let in_holder = Duration::from_micros(holder.ready().phases.iter().map(|p| p.micros).sum());
    phases.add(
        "holder process",
        phases.since_last().saturating_sub(in_holder),
    );
    phases.extend(&holder.ready().phases);
    phases.restart();
    let namespaces = Namespaces::of_holder(&holder)?;
    let ExecLine {
        args,
        envp,
        search_path,
    } = exec_line(&holder, spec, argv, caller)?;
    let workdir = holder.ready().workdir.clone();
    Ok(Prepared {
        holder,
        namespaces,
        args,
        envp,
        search_path,
        workdir,
        phases,
        timings,
    })
}

/// What a command execs in a container: its arguments, environment and search path.
pub(crate) struct ExecLine {
    pub args: Vec<CString>,
    pub envp: Vec<CString>,
    pub search_path: String,
}

/// `argv` (or the image's start command) with `caller`'s environment under the image's and
/// `spec`'s, for the container `holder` made.
pub(crate) fn exec_line(
    holder: &holder::Holder,
    spec: &ContainerSpec,
    argv: &[OsString],
    caller: Vec<(String, String)>,
) -> Result<ExecLine, RunError> {
    let vars = env::compose(caller, &holder.ready().env, &spec.env);
    let search_path = vars
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let envp = vars
        .into_iter()
        .map(|(k, v)| cstr(format!("{k}={v}").into_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let argv = crate::spec::entrypoint::command_line(&holder.ready().start, argv, spec.entrypoint);
    tracing::debug!("command: {argv:?}");
    let args = argv
        .iter()
        .map(|a| cstr(a.clone().into_vec()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ExecLine {
        args,
        envp,
        search_path,
    })
}

/// Fork a child that runs `in_child` (which should exec or exit; with timings, it writes a
/// byte to the descriptor it gets once in the container, which its exec then closes), pass
/// the forwarded signals on to it and return its exit status for ferry to use.
pub(crate) fn fork_and_supervise(
    prepared: &mut Prepared,
    in_child: impl FnOnce(&Prepared, &SigSet, Option<OwnedFd>),
) -> Result<i32, RunError> {
    fork_and_supervise_then(prepared, in_child, || {})
}

/// [`fork_and_supervise`], calling `after_fork` in the parent once the child runs (threads
/// may start there: the fork is behind).
pub(crate) fn fork_and_supervise_then(
    prepared: &mut Prepared,
    in_child: impl FnOnce(&Prepared, &SigSet, Option<OwnedFd>),
    after_fork: impl FnOnce(),
) -> Result<i32, RunError> {
    // A signal ferry inherited as ignored would never reach sigwaitinfo: take it back to
    // the default (it is blocked, so it only waits there) and give the command the
    // disposition it would have had without ferry.
    let inherited_ignored: Vec<Signal> = FORWARDED
        .into_iter()
        .filter(|s| raw::signal_is_ignored(*s))
        .collect();
    let mask = forwarded_mask();
    mask.thread_block().map_err(|source| RunError::Os {
        what: "blocking signals",
        source,
    })?;
    for s in &inherited_ignored {
        let _ = raw::default_signal(*s);
    }
    // The child says when it has entered the container; the pipe's end (close-on-exec)
    // says when the command's exec is done.
    let watch = (prepared.timings == Timings::Print || tracing::enabled!(tracing::Level::DEBUG))
        .then(|| nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok())
        .flatten();
    prepared.phases.end("prepare command");

    let child = match raw::fork_single_threaded().map_err(|source| RunError::Os {
        what: "fork",
        source,
    })? {
        None => {
            for s in &inherited_ignored {
                let _ = raw::ignore_signal(*s);
            }
            let entered = watch.map(|(read_end, write_end)| {
                drop(read_end);
                write_end
            });
            in_child(prepared, &mask, entered);
            // (`in_child` execs or exits; this only stops a return into ferry's own code.)
            std::process::exit(exit_code::SETUP_FAILED)
        }
        Some(child) => child,
    };
    after_fork();
    if let Some((read_end, write_end)) = watch {
        drop(write_end);
        watch_exec(&read_end, &mut prepared.phases);
    }
    if prepared.timings == Timings::Print {
        for line in crate::container::phases::lines(prepared.phases.list()) {
            eprintln!("{line}");
        }
    }
    Ok(supervise(child, &mask))
}

/// The signals ferry passes on to its child, and SIGCHLD.
pub(crate) fn forwarded_mask() -> SigSet {
    let mut mask = SigSet::empty();
    for s in FORWARDED {
        mask.add(s);
    }
    mask.add(Signal::SIGCHLD);
    mask
}

/// Stop the container once its command has ended with `status`; returns that status.
pub(crate) fn finish(prepared: Prepared, status: i32) -> i32 {
    let Prepared {
        holder,
        namespaces,
        phases,
        timings,
        ..
    } = prepared;
    drop(namespaces);
    let mut after = Phases::new();
    // The command's own run, from its exec (where the phases above end) to its end.
    after.add("command", phases.since_last());
    after.restart();
    let ended = holder.stop_without_teardown(Duration::from_secs(5));
    after.end("stop");
    if timings == Timings::Print {
        // After the command: how long it ran, and how long ferry took to end after it.
        let lines = crate::container::phases::lines(after.list());
        for line in &lines[..lines.len() - 1] {
            eprintln!("{line}");
        }
    }
    // An image server's end the holder has said itself, on this stderr.
    if let Some(early @ holder::EarlyEnd::Killed) = ended.early {
        eprintln!("ferry: error: {early}");
    }
    status
}

/// Time the child's entering the container (a byte on `pipe`) and its exec (the pipe's
/// end: its end is close-on-exec).
fn watch_exec(pipe: &OwnedFd, phases: &mut Phases) {
    let mut byte = [0u8; 1];
    let read = |buf: &mut [u8]| loop {
        match nix::unistd::read(pipe.as_raw_fd(), buf) {
            Err(nix::Error::EINTR) => continue,
            other => return other,
        }
    };
    if read(&mut byte) == Ok(1) {
        phases.end("enter container");
        if read(&mut byte) == Ok(0) {
            phases.end("exec");
        }
    }
}

pub(crate) fn supervise(child: Pid, mask: &SigSet) -> i32 {
    loop {
        let Ok(info) = raw::wait_signal(mask) else {
            return exit_code::SETUP_FAILED;
        };
        if info.si_signo == libc::SIGCHLD {
            loop {
                match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => return code,
                    Ok(WaitStatus::Signaled(_, sig, _)) => return exit_code::killed_by(sig as i32),
                    Ok(WaitStatus::StillAlive) => break,
                    Ok(_) => continue,
                    Err(nix::Error::EINTR) => continue,
                    Err(_) => return exit_code::SETUP_FAILED,
                }
            }
        } else if raw::sent_by_process(&info) {
            if let Ok(sig) = Signal::try_from(info.si_signo) {
                let _ = kill(child, sig);
            }
        }
    }
}

/// The child: enter the container and exec the command; never returns.
/// What the child execs: the arguments, the environment and where to look for the program.
struct CommandLine<'a> {
    args: &'a [CString],
    envp: &'a [CString],
    search_path: &'a str,
}

fn exec_in_container(
    ns: &Namespaces,
    workdir: &Path,
    remap_root: bool,
    command: &CommandLine<'_>,
    mask: &SigSet,
    entered: Option<OwnedFd>,
) -> ! {
    // The command must not outlive ferry: without that guarantee, do not start it.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        eprintln!("ferry: error: cannot make the command end with ferry (PR_SET_PDEATHSIG): {e}");
        std::process::exit(exit_code::SETUP_FAILED);
    }
    let _ = mask.thread_unblock();
    if let Err(e) = join::join(ns, workdir) {
        eprintln!("ferry: error: {e}");
        std::process::exit(exit_code::SETUP_FAILED);
    }
    if remap_root {
        if let Err(e) = crate::container::id_filter::install() {
            eprintln!("ferry: error: {e}");
            std::process::exit(exit_code::SETUP_FAILED);
        }
    }
    // Kept open until the exec closes it.
    if let Some(pipe) = &entered {
        let _ = nix::unistd::write(pipe, b"e");
    }
    exec_searching(command.args, command.envp, command.search_path)
}

/// Exec `args` (its program found through `search_path` unless it names a path) with the
/// environment `envp`; never returns: on failure, one line on stderr and the shell's exit
/// status (126 cannot execute, 127 not found).
pub fn exec_searching(args: &[CString], envp: &[CString], search_path: &str) -> ! {
    exec_searching_then(args, envp, search_path, || {})
}

/// [`exec_searching`], calling `before_failing` (to put stderr back, say) before it says
/// why the exec failed.
pub fn exec_searching_then(
    args: &[CString],
    envp: &[CString],
    search_path: &str,
    before_failing: impl FnOnce(),
) -> ! {
    let program = args[0].as_bytes();
    let candidates: Vec<PathBuf> = if program.contains(&b'/') {
        vec![PathBuf::from(std::ffi::OsStr::from_bytes(program))]
    } else {
        std::env::split_paths(search_path)
            .map(|d| d.join(std::ffi::OsStr::from_bytes(program)))
            .collect()
    };
    let mut denied = false;
    let mut before_failing = Some(before_failing);
    let mut fail_now = || before_failing.take().map(|f| f());
    for path in candidates {
        let Ok(c) = CString::new(path.into_os_string().into_vec()) else {
            continue;
        };
        match nix::unistd::execve(&c, args, envp) {
            Err(nix::Error::EACCES) => denied = true,
            Err(nix::Error::ENOEXEC) => {
                fail_now();
                eprintln!("ferry: error: cannot execute {}: not an executable this system can run (wrong architecture or missing #! line)", c.to_string_lossy());
                std::process::exit(exit_code::CANNOT_EXECUTE);
            }
            _ => {}
        }
    }
    fail_now();
    let name = String::from_utf8_lossy(program);
    if denied {
        eprintln!("ferry: error: permission denied executing `{name}` in the container");
        std::process::exit(exit_code::CANNOT_EXECUTE);
    }
    if program.contains(&b'/') {
        eprintln!("ferry: error: command not found in the container: {name}");
    } else {
        eprintln!("ferry: error: command not found in the container: {name} (searched PATH={search_path})");
    }
    std::process::exit(exit_code::NOT_FOUND);
}

//! `ferry-forward`: installed in a container under the names of Slurm's commands (`srun`,
//! `squeue`…), it asks the step's forward server on the host (`ferry forward-serve`, see
//! `ferry::slurm::forward`) to run the host's command of the same name with this process's
//! arguments, environment, working directory and standard descriptors, forwards the
//! signals it receives, and ends as the host's command ended.
//!
//! The protocol (the server's module documents it too):
//! - client → server: `FWD1` with the descriptors 0, 1 and 2 and one of the working
//!   directory attached (SCM_RIGHTS); a u32
//!   (little endian) length and that many bytes: NUL-terminated strings, the program's
//!   name, the working directory, the number of arguments, the arguments, then the
//!   environment (`NAME=VALUE`); then, at any time, u32 signal numbers;
//! - server → client: `x` and a u32 exit code, `s` and a u32 signal number, or `e`, a u32
//!   length and an error text.

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// Where the plugin puts the server's socket inside the container; `FERRY_FORWARD_SOCKET`
/// overrides it.
const DEFAULT_SOCKET: &str = "/.ferry/run/sock";
const SOCKET_ENV: &str = "FERRY_FORWARD_SOCKET";

/// Exit code when the command could not be forwarded (the shell's "cannot run").
const CANNOT_FORWARD: i32 = 127;

/// The signals passed on to the host's command. SIGTSTP/SIGTTIN/SIGTTOU stay with this
/// process's job control.
const FORWARDED: [Signal; 9] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGCONT,
    Signal::SIGWINCH,
];

fn main() {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let mut program = Path::new(&argv0)
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let mut rest: Vec<std::ffi::OsString> = args.collect();
    // `ferry-forward srun ARGS…` works too (in the container: `/.ferry/forward srun …`).
    if (program == "ferry-forward" || program == "forward") && !rest.is_empty() {
        program = rest.remove(0);
    }
    let name = program.to_string_lossy().into_owned();
    match forward(&program, &rest) {
        Ok(end) => finish(end),
        Err(e) => {
            eprintln!("ferry: {name}: cannot run the host's {name}: {e}");
            std::process::exit(CANNOT_FORWARD);
        }
    }
}

/// How the host's command ended.
enum End {
    Exited(i32),
    Signaled(i32),
}

fn forward(program: &std::ffi::OsStr, args: &[std::ffi::OsString]) -> std::io::Result<End> {
    let socket = std::env::var_os(SOCKET_ENV).unwrap_or_else(|| DEFAULT_SOCKET.into());
    let mut stream = UnixStream::connect(&socket).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "no forward server at {} ({e}); is this the batch script's container?",
                Path::new(&socket).display()
            ),
        )
    })?;
    // Blocked before the signal thread starts, so every thread inherits the mask and the
    // signals wait for that thread.
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.thread_block().map_err(std::io::Error::from)?;

    let mut stdio = standard_descriptors()?;
    // The server compares it with the directory of the same path on the host.
    stdio.push(rustix::fs::open(
        ".",
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?);
    let borrowed: Vec<BorrowedFd<'_>> = stdio.iter().map(|s| s.as_fd()).collect();
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&borrowed));
    rustix::net::sendmsg(
        &stream,
        &[IoSlice::new(b"FWD1")],
        &mut control,
        SendFlags::empty(),
    )?;
    drop(stdio);

    let mut payload = Vec::new();
    let mut field = |bytes: &[u8]| {
        payload.extend_from_slice(bytes);
        payload.push(0);
    };
    field(program.as_bytes());
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    field(cwd.as_os_str().as_bytes());
    field(args.len().to_string().as_bytes());
    for a in args {
        field(a.as_bytes());
    }
    for (k, v) in std::env::vars_os() {
        let mut pair = k.as_bytes().to_vec();
        pair.push(b'=');
        pair.extend_from_slice(v.as_bytes());
        field(&pair);
    }
    let len = u32::try_from(payload.len())
        .map_err(|_| std::io::Error::other("arguments and environment too large"))?;
    stream.write_all(&len.to_le_bytes())?;
    stream.write_all(&payload)?;

    let mut signals = stream.try_clone()?;
    std::thread::spawn(move || loop {
        let Ok(sig) = set.wait() else { return };
        if signals.write_all(&(sig as u32).to_le_bytes()).is_err() {
            return;
        }
    });

    let mut kind = [0u8; 1];
    stream.read_exact(&mut kind).map_err(|e| {
        std::io::Error::new(e.kind(), "the forward server went away (the step ended?)")
    })?;
    let mut value = [0u8; 4];
    stream.read_exact(&mut value)?;
    let value = u32::from_le_bytes(value);
    match kind[0] {
        b'x' => Ok(End::Exited(value as i32)),
        b's' => Ok(End::Signaled(value as i32)),
        b'e' => {
            let mut text = vec![0u8; value.min(4096) as usize];
            stream.read_exact(&mut text)?;
            Err(std::io::Error::other(
                String::from_utf8_lossy(&text).into_owned(),
            ))
        }
        _ => Err(std::io::Error::other(
            "unexpected answer from the forward server",
        )),
    }
}

/// Descriptors 0, 1 and 2, with /dev/null standing in for a closed one.
fn standard_descriptors() -> std::io::Result<Vec<OwnedFd>> {
    let own = [
        std::io::stdin().as_fd().try_clone_to_owned(),
        std::io::stdout().as_fd().try_clone_to_owned(),
        std::io::stderr().as_fd().try_clone_to_owned(),
    ];
    own.into_iter()
        .map(|fd| match fd {
            Ok(fd) => Ok(fd),
            Err(_) => Ok(std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?
                .into()),
        })
        .collect()
}

/// End as the host's command did: with its code, or by its signal.
fn finish(end: End) -> ! {
    match end {
        End::Exited(code) => std::process::exit(code),
        End::Signaled(number) => {
            if let Ok(signal) = Signal::try_from(number) {
                let mut only = SigSet::empty();
                only.add(signal);
                // The signal's disposition is the default one unless this process was
                // started with it ignored: then the exit code below says it.
                let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&only), None);
                let _ = nix::sys::signal::raise(signal);
            }
            std::process::exit(128 + number)
        }
    }
}

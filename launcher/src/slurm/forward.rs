//! Slurm's commands inside a container: the host side.
//!
//! A batch script that runs in its image (`sbatch --container-image`), and any container
//! step, still calls `srun`, `squeue`, `scancel`… The container has no Slurm, or not the
//! host's, so the plugin binds a small static program, `ferry-forward`, into it under those
//! names ([`INSIDE_BIN`], first on PATH) and starts this server on the host, as the job's
//! user, once per step and node, for the step's lifetime (the node's tasks share it). It
//! starts while the container does ([`Server::spawn`], [`Place::Dir`]), so a step does not
//! wait for it. The program connects to the server's socket ([`INSIDE_SOCKET`]) and hands it
//! its arguments, environment, working directory and its descriptors 0, 1 and 2
//! (SCM_RIGHTS); the server runs the host's command of that name with them, as the same
//! user, passes on the signals the program receives, and answers how the command ended.
//!
//! Nothing gains a right: the server runs as the user, serves only peers of the user's own
//! uid (SO_PEERCRED), runs only [`COMMANDS`], and ends when the plugin closes its standard
//! input (the step's end), removing its directory and stopping the commands still running.
//!
//! The protocol: client → server: `FWD1` with four descriptors attached (stdin, stdout,
//! stderr, the working directory); a u32 (little
//! endian) length and that many bytes of NUL-terminated strings: the program's name, the
//! working directory, the number of arguments, the arguments, then the environment
//! (`NAME=VALUE`); then, at any time, u32 signal numbers. Server → client: `x` and a u32
//! exit code, `s` and a u32 signal number, or `e`, a u32 length and an error text.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

use crate::sys::child::Pidfd;

/// The commands forwarded to the host.
pub const COMMANDS: &[&str] = &[
    "srun", "sbatch", "salloc", "scancel", "squeue", "sinfo", "scontrol", "sacct", "sattach",
];

/// Where the plugin binds `ferry-forward` in the container.
pub const INSIDE_PROGRAM: &str = "/.ferry/forward";
/// Where the plugin binds the server's directory in the container.
pub const INSIDE_DIR: &str = "/.ferry/run";
/// The directory of the commands' names in the container, put first on the task's PATH.
pub const INSIDE_BIN: &str = "/.ferry/run/bin";
/// The server's socket in the container.
pub const INSIDE_SOCKET: &str = "/.ferry/run/sock";
/// The variable that tells `ferry-forward` where the socket is.
pub const SOCKET_ENV: &str = "FERRY_FORWARD_SOCKET";

/// Variables whose value a forwarded command takes from the host job (the server's own
/// environment), not from the container: the container's PATH and libraries are the
/// image's, and the host's Slurm commands need the host's.
pub const HOST_VARS: &[&str] = &["PATH", "LD_LIBRARY_PATH", "LD_PRELOAD"];

/// The largest request read (arguments and environment).
const MAX_REQUEST: u32 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot make the forward server's directory in {}: {error}", .dir.display())]
    Dir { dir: PathBuf, error: io::Error },
    #[error("cannot listen on {}: {error}", .path.display())]
    Listen { path: PathBuf, error: io::Error },
    #[error("cannot start the forward server {}: {error}", .program.display())]
    Start { program: PathBuf, error: io::Error },
    #[error("the forward server did not start: {0}")]
    NotReady(String),
}

/// Where the server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// In a new private directory under this one.
    In(PathBuf),
    /// In this empty private directory, which the caller made as the server's user
    /// ([`private_dir`]), so the container can bind it before the server is up.
    Dir(PathBuf),
}

/// A new private directory (mode 0700) for a server, under `parent`, owned by the caller's
/// effective uid.
pub fn private_dir(parent: &Path) -> Result<PathBuf, ForwardError> {
    tempfile::Builder::new()
        .prefix("ferry-forward.")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir_in(parent)
        .map(tempfile::TempDir::keep)
        .map_err(|error| ForwardError::Dir {
            dir: parent.to_path_buf(),
            error,
        })
}

/// Whether `dir` is a private directory of `uid`'s (not a link, nobody else can enter).
fn is_private_dir(dir: &Path, uid: rustix::process::Uid) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == uid.as_raw() && m.mode() & 0o077 == 0)
}

/// Serve in `place`: print the directory's path on stdout once the socket listens, then
/// serve until stdin reaches its end, and remove the directory.
pub fn serve(place: Place) -> Result<(), ForwardError> {
    // The commands inherit this mask: slurmstepd's blocked signals must not keep scancel's
    // SIGTERM from them.
    let _ = nix::sys::signal::SigSet::empty().thread_set_mask();
    // Private: only the user reaches the socket (the server checks the peer's uid too).
    let dir = match place {
        Place::In(parent) => private_dir(&parent)?,
        Place::Dir(dir) if is_private_dir(&dir, rustix::process::geteuid()) => dir,
        Place::Dir(dir) => {
            return Err(ForwardError::Dir {
                error: io::Error::other("not a private directory of this user's"),
                dir,
            })
        }
    };
    let listener = match populate(&dir) {
        Ok(listener) => listener,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };

    let running: Running = Arc::default();
    {
        let running = running.clone();
        let dir_path = dir.clone();
        std::thread::spawn(move || {
            // The plugin holds the other end for the step's lifetime.
            let _ = io::copy(&mut io::stdin(), &mut io::sink());
            for pidfd in running.lock().unwrap_or_else(|p| p.into_inner()).values() {
                pidfd.signal(rustix::process::Signal::TERM);
            }
            let _ = std::fs::remove_dir_all(&dir_path);
            std::process::exit(0);
        });
    }
    let mut out = io::stdout().lock();
    let ready = writeln!(out, "{}", dir.display()).and_then(|()| out.flush());
    drop(out);
    if ready.is_err() {
        // Nobody waits for it.
        return Ok(());
    }
    let own_uid = rustix::process::getuid();
    let host_env: Vec<(&str, Option<OsString>)> = HOST_VARS
        .iter()
        .map(|n| (*n, std::env::var_os(n)))
        .collect();
    let host_env = Arc::new(host_env);
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        next_id += 1;
        let (running, host_env, id) = (running.clone(), host_env.clone(), next_id);
        std::thread::spawn(move || {
            let mut conn = conn;
            if let Err(refused) = handle(&mut conn, own_uid, &host_env, &running, id) {
                let _ = answer_error(&mut conn, &refused.to_string());
            }
        });
    }
    Ok(())
}

/// The commands' names and the socket, in `dir`.
fn populate(dir: &Path) -> Result<UnixListener, ForwardError> {
    let bin = dir.join("bin");
    let made = std::fs::create_dir(&bin).and_then(|()| {
        COMMANDS
            .iter()
            .try_for_each(|name| std::os::unix::fs::symlink(INSIDE_PROGRAM, bin.join(name)))
    });
    made.map_err(|error| ForwardError::Dir {
        dir: dir.to_path_buf(),
        error,
    })?;
    let socket = dir.join("sock");
    UnixListener::bind(&socket).map_err(|error| ForwardError::Listen {
        path: socket.clone(),
        error,
    })
}

type Running = Arc<Mutex<HashMap<u64, Arc<Pidfd>>>>;

fn answer_error(conn: &mut UnixStream, text: &str) -> io::Result<()> {
    let mut msg = vec![b'e'];
    msg.extend_from_slice(&(text.len() as u32).to_le_bytes());
    msg.extend_from_slice(text.as_bytes());
    conn.write_all(&msg)
}

/// A forwarded command's request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub program: OsString,
    pub cwd: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
}

impl Request {
    /// Parse the request's bytes (see the module's documentation).
    pub fn parse(bytes: &[u8]) -> Option<Request> {
        let mut fields = bytes
            .strip_suffix(b"\0")?
            .split(|b| *b == 0)
            .map(|f| OsStr::from_bytes(f).to_os_string());
        let program = fields.next()?;
        let cwd = PathBuf::from(fields.next()?);
        let count: usize = fields.next()?.to_str()?.parse().ok()?;
        let args: Vec<OsString> = fields.by_ref().take(count).collect();
        if args.len() != count {
            return None;
        }
        let env = fields
            .filter_map(|pair| {
                let bytes = pair.into_vec();
                let eq = bytes.iter().position(|b| *b == b'=')?;
                Some((
                    OsString::from_vec(bytes[..eq].to_vec()),
                    OsString::from_vec(bytes[eq + 1..].to_vec()),
                ))
            })
            .collect();
        Some(Request {
            program,
            cwd,
            args,
            env,
        })
    }

    /// The command's environment: the caller's, with [`HOST_VARS`] the host's (`host`) and
    /// without the forwarder's own variable.
    pub fn environment(&self, host: &[(&str, Option<OsString>)]) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = self
            .env
            .iter()
            .filter(|(k, _)| k != SOCKET_ENV && !HOST_VARS.iter().any(|h| k == *h))
            .cloned()
            .collect();
        env.extend(
            host.iter()
                .filter_map(|(k, v)| v.clone().map(|v| (OsString::from(*k), v))),
        );
        env
    }
}

/// The program `name` on the host's PATH (`path`).
fn find_on_path(name: &OsStr, path: Option<&OsStr>) -> Option<PathBuf> {
    let path = path.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(path)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
}

/// Why a connection's command did not run to its end: the line its client prints.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("cannot tell who is asking: {0}")]
    Peer(io::Error),
    #[error("refused: uid {0} is not the job's user")]
    NotTheUser(u32),
    #[error("bad request: {0}")]
    Malformed(&'static str),
    #[error("bad request: {0}")]
    Unreadable(io::Error),
    #[error("request of {0} bytes is too large")]
    TooLarge(u32),
    #[error("{name} is not forwarded to the host (only {})", COMMANDS.join(", "))]
    NotForwarded { name: String },
    #[error("{name} is not installed on the host (not on the job's PATH)")]
    NotInstalled { name: String },
    #[error("cannot run {}: {error}", .program.display())]
    Run { program: PathBuf, error: io::Error },
    #[error("{0}")]
    Lost(io::Error),
}

/// Serve one connection; an error is said to the client.
fn handle(
    conn: &mut UnixStream,
    own_uid: rustix::process::Uid,
    host_env: &[(&str, Option<OsString>)],
    running: &Running,
    id: u64,
) -> Result<(), Refusal> {
    let peer =
        rustix::net::sockopt::socket_peercred(&*conn).map_err(|e| Refusal::Peer(e.into()))?;
    if peer.uid != own_uid {
        return Err(Refusal::NotTheUser(peer.uid.as_raw()));
    }
    let (magic, stdio) = receive_stdio(conn).map_err(Refusal::Unreadable)?;
    if &magic != b"FWD1" {
        return Err(Refusal::Malformed("not ferry-forward's protocol"));
    }
    let [stdin, stdout, stderr, cwd]: [OwnedFd; 4] = stdio
        .try_into()
        .map_err(|_| Refusal::Malformed("not four descriptors"))?;
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).map_err(Refusal::Lost)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_REQUEST {
        return Err(Refusal::TooLarge(len));
    }
    let mut bytes = vec![0u8; len as usize];
    conn.read_exact(&mut bytes).map_err(Refusal::Lost)?;
    let req = Request::parse(&bytes).ok_or(Refusal::Malformed("malformed"))?;
    let name = req.program.to_string_lossy().into_owned();
    if !COMMANDS.iter().any(|c| req.program == *c) {
        return Err(Refusal::NotForwarded { name });
    }
    let host_path = host_env
        .iter()
        .find(|(k, _)| *k == "PATH")
        .and_then(|(_, v)| v.as_deref());
    let program = find_on_path(&req.program, host_path).ok_or(Refusal::NotInstalled { name })?;
    let mut cmd = Command::new(&program);
    cmd.arg0(&req.program)
        .args(&req.args)
        .env_clear()
        .envs(req.environment(host_env))
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    // The container's directory when the host has the same one at that path (home, bound
    // paths), else the job's (the server's own).
    if same_directory(&cwd, &req.cwd) {
        cmd.current_dir(&req.cwd);
    }
    let mut child = cmd.spawn().map_err(|error| Refusal::Run {
        program: program.clone(),
        error,
    })?;
    drop(cmd);
    let pidfd = Arc::new(Pidfd::of_spawned(&child).map_err(Refusal::Lost)?);
    running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, pidfd.clone());
    let status = relay(conn, &pidfd, &mut child);
    running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    let status = status.map_err(Refusal::Lost)?;
    let answer = match (status.code(), status.signal()) {
        (Some(code), _) => [b'x'].into_iter().chain((code as u32).to_le_bytes()),
        (None, Some(sig)) => [b's'].into_iter().chain((sig as u32).to_le_bytes()),
        (None, None) => [b'x'].into_iter().chain(255u32.to_le_bytes()),
    };
    let answer: Vec<u8> = answer.collect();
    // The caller may be gone.
    let _ = conn.write_all(&answer);
    Ok(())
}

/// Pass the client's signals to the child until it ends; its status. A client that goes
/// away (killed) takes the command with it (SIGTERM).
fn relay(
    conn: &mut UnixStream,
    pidfd: &Pidfd,
    child: &mut std::process::Child,
) -> io::Result<ExitStatus> {
    let mut client_open = true;
    let mut pending = Vec::new();
    loop {
        let ended = {
            let pid_fd = pidfd.as_fd();
            let mut fds = vec![PollFd::new(&pid_fd, PollFlags::IN)];
            if client_open {
                fds.push(PollFd::new(&*conn, PollFlags::IN));
            }
            match rustix::event::poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let client_ready = client_open && !fds[1].revents().is_empty();
            (!fds[0].revents().is_empty(), client_ready)
        };
        if ended.0 {
            return child.wait();
        }
        if ended.1 {
            let mut buf = [0u8; 64];
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => {
                    client_open = false;
                    pidfd.signal(rustix::process::Signal::TERM);
                }
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    while pending.len() >= 4 {
                        let number =
                            u32::from_le_bytes([pending[0], pending[1], pending[2], pending[3]]);
                        pending.drain(..4);
                        if let Some(sig) = rustix::process::Signal::from_named_raw(number as i32) {
                            pidfd.signal(sig);
                        }
                    }
                }
            }
        }
    }
}

/// Whether `path` on the host is the directory `fd` (the caller's, in the container).
fn same_directory(fd: &OwnedFd, path: &Path) -> bool {
    match (rustix::fs::fstat(fd), rustix::fs::stat(path)) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// The first message: four bytes and the descriptors attached to them.
fn receive_stdio(conn: &UnixStream) -> io::Result<([u8; 4], Vec<OwnedFd>)> {
    let mut magic = [0u8; 4];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        conn,
        &mut [IoSliceMut::new(&mut magic)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    if got.bytes != 4 {
        return Err(io::Error::other("short first message"));
    }
    Ok((magic, fds))
}

/// The running server, as the plugin holds it: its directory on the host, and its
/// standard input, whose end stops it.
/// How long a step's end waits for its forward server to be gone: slurmstepd removes the
/// step's cgroup soon after, and a process still in it keeps the cgroup (and its job's).
const STOP_WAIT: Duration = Duration::from_secs(5);
/// How long a server never waited for may take to be spawned at all.
const SPAWN_WAIT: Duration = Duration::from_secs(5);

/// What stops a server (its standard input: end of file) and tells when it is gone.
#[derive(Debug)]
struct Lifeline {
    stdin: std::process::ChildStdin,
    exit: Option<crate::sys::child::Pidfd>,
}

impl Lifeline {
    /// Close its input and wait until it has exited; SIGKILL (through its pidfd, never a
    /// bare pid: slurmstepd reaps it) if it has not within [`STOP_WAIT`].
    fn stop(self) {
        drop(self.stdin);
        if let Some(exit) = self.exit {
            if !exit.wait_exit(STOP_WAIT) {
                exit.kill();
                exit.wait_exit(STOP_WAIT);
            }
        }
    }
}

/// A serving forward server; dropping it stops it and waits for it to be gone.
#[derive(Debug)]
pub struct Server {
    pub dir: PathBuf,
    lifeline: Option<Lifeline>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(lifeline) = self.lifeline.take() {
            lifeline.stop();
        }
    }
}

/// A server started but perhaps not serving yet: the caller does its own work meanwhile
/// (the container's start) and then waits with [`Starting::ready`].
#[derive(Debug)]
pub struct Starting {
    dir: Option<PathBuf>,
    /// The server's lifeline, once it is spawned; taken by [`Starting::ready`].
    lifeline: Option<std::sync::mpsc::Receiver<Lifeline>>,
    answer: std::sync::mpsc::Receiver<Result<String, ForwardError>>,
}

impl Server {
    /// Start `program forward-serve` as `run_as`, with `host_env` as its whole environment,
    /// in `place`, without waiting for it: even the fork and exec happen on a thread of
    /// their own, beside the caller's work (they cost a slurmstepd 1–3 ms).
    pub fn spawn(
        program: &Path,
        run_as: Option<crate::sys::raw::Credentials>,
        place: &Place,
        host_env: &[(String, String)],
    ) -> Starting {
        let mut cmd = Command::new(program);
        cmd.arg("forward-serve");
        let dir = match place {
            Place::In(parent) => {
                cmd.arg("--in").arg(parent);
                None
            }
            Place::Dir(dir) => {
                cmd.arg("--dir").arg(dir);
                Some(dir.clone())
            }
        };
        cmd.env_clear()
            .envs(host_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::sys::raw::run_as_on_exec(&mut cmd, run_as, false);
        let program = program.to_path_buf();
        let (tx, answer) = std::sync::mpsc::channel();
        let (give_lifeline, lifeline) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut child = match cmd.spawn() {
                Ok(child) => child,
                Err(error) => {
                    let _ = tx.send(Err(ForwardError::Start { program, error }));
                    return;
                }
            };
            let (Some(stdin), Some(stdout), Some(stderr)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                let _ = tx.send(Err(ForwardError::NotReady("no pipes".into())));
                return;
            };
            // The child is never reaped here (slurmstepd reaps its children itself); its
            // pidfd tells when it has ended.
            let exit = crate::sys::child::Pidfd::of_spawned(&child).ok();
            drop(child);
            // Stopped at once if the caller has gone already.
            if let Err(unwanted) = give_lifeline.send(Lifeline { stdin, exit }) {
                unwanted.0.stop();
                return;
            }
            let mut line = String::new();
            let mut reader = io::BufReader::new(stdout);
            let _ = io::BufRead::read_line(&mut reader, &mut line);
            if line.is_empty() {
                // It ended: its error line, read to its end (it has exited).
                let mut text = String::new();
                let _ = stderr.take(4096).read_to_string(&mut text);
                let last = crate::sys::child::last_line(&text);
                let why = last.trim_start_matches("ferry: error: ");
                let _ = tx.send(Err(ForwardError::NotReady(if why.is_empty() {
                    "it ended at once".into()
                } else {
                    why.to_string()
                })));
            } else {
                // Once serving it writes nothing there; a closed pipe cannot block it.
                drop(stderr);
                let _ = tx.send(Ok(line));
            }
        });
        Starting {
            dir,
            lifeline: Some(lifeline),
            answer,
        }
    }
}

impl Starting {
    /// The directory it serves in, when the caller chose it ([`Place::Dir`]).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Wait (up to `timeout`) until it serves. Dropping a [`Starting`] (also when this
    /// fails) stops the server and waits for it to be gone.
    pub fn ready(mut self, timeout: std::time::Duration) -> Result<Server, ForwardError> {
        let line = self
            .answer
            .recv_timeout(timeout)
            .map_err(|_| ForwardError::NotReady(format!("no answer in {timeout:?}")))??;
        let dir = PathBuf::from(line.trim_end());
        if !dir.is_absolute() || self.dir.as_ref().is_some_and(|d| *d != dir) {
            return Err(ForwardError::NotReady(format!("it said {line:?}")));
        }
        // Sent before the answer.
        let lifeline = self
            .lifeline
            .take()
            .and_then(|r| r.try_recv().ok())
            .ok_or_else(|| ForwardError::NotReady("no standard input".into()))?;
        Ok(Server {
            dir,
            lifeline: Some(lifeline),
        })
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        // Not served from: it may be spawning still (on its thread), and must be gone before
        // the step's cgroup is removed.
        if let Some(lifeline) = self
            .lifeline
            .take()
            .and_then(|r| r.recv_timeout(SPAWN_WAIT).ok())
        {
            lifeline.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_and_refused_when_malformed() {
        let bytes = b"srun\0/work\x002\0-n1\0hostname\0A=1\0PATH=/img/bin\0B=x=y\0";
        let req = Request::parse(bytes).unwrap();
        assert_eq!(req.program, "srun");
        assert_eq!(req.cwd, Path::new("/work"));
        assert_eq!(req.args, vec![OsString::from("-n1"), "hostname".into()]);
        assert_eq!(req.env.len(), 3);
        assert_eq!(req.env[2], ("B".into(), "x=y".into()));
        assert!(Request::parse(b"srun\0/\x003\0a\0").is_none());
        assert!(Request::parse(b"srun\0/\0x\0").is_none());
        assert!(Request::parse(b"srun").is_none());
    }

    #[test]
    fn only_a_private_directory_of_ones_own_is_served_in() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let me = rustix::process::geteuid();
        let dir = private_dir(parent.path()).unwrap();
        assert!(dir.starts_with(parent.path()));
        assert!(is_private_dir(&dir, me));
        let link = parent.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(!is_private_dir(&link, me));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!is_private_dir(&dir, me));
        assert!(!is_private_dir(&parent.path().join("none"), me));
    }

    #[test]
    fn host_variables_replace_the_containers() {
        let req = Request::parse(
            b"srun\0/\x000\0PATH=/img/bin\0LD_LIBRARY_PATH=/img/lib\0FERRY_FORWARD_SOCKET=/s\0X=1\0",
        )
        .unwrap();
        let host = [
            ("PATH", Some(OsString::from("/usr/bin"))),
            ("LD_LIBRARY_PATH", None),
            ("LD_PRELOAD", None),
        ];
        let env = req.environment(&host);
        assert_eq!(
            env,
            vec![("X".into(), "1".into()), ("PATH".into(), "/usr/bin".into())]
        );
    }
}

//! A stage's tree as an overlay: its base (a squashfs: the image or a step's cache entry)
//! mounted by squashfuse as the lower layer, the build's writes in an upper layer on disk.
//! Nothing of the base is unpacked: a cold build's first RUN starts at once instead of
//! after writing the base's thousands of files.
//!
//! RUN mounts the overlay in its own container (`ContainerSpec::overlay_layer`). Steps that
//! the build itself carries out on the tree (COPY, the config, the squashfs of a cache
//! entry or the image) use the same overlay mounted by a helper: a forked child in a user
//! namespace of its own (the caller's uid as root, so that the base's root-owned files are
//! the caller's and copy-up may keep their owner), reached through its `/proc/PID/root`.
//! The helper stays while no RUN runs, so that one squashfs write after another reads the
//! base through a warm cache. The merged view is what they see: a file a RUN deleted is
//! hidden by its whiteout, so a squashfs of the merged view simply lacks it.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::wait::waitpid;

use crate::rootfs::squashfuse;
use crate::sys::raw;

/// The layer directory's parts: the upper layer, overlay's work directory, and the mount
/// points of the base and of the merged view in the helper.
const UPPER: &str = "upper";
const WORK: &str = "work";
const BASE: &str = "base";
const MERGED: &str = "merged";

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot prepare the layer {path}: {source}")]
    Prepare { path: PathBuf, source: io::Error },
    #[error("the build's overlay helper: {0}")]
    Helper(String),
    #[error("the build's overlay helper failed to start: {0}")]
    Fork(nix::Error),
}

/// An empty layer at `dir` (anything there before is removed).
pub fn create(dir: &Path) -> Result<(), LayerError> {
    let fail = |source| LayerError::Prepare {
        path: dir.into(),
        source,
    };
    if fs::symlink_metadata(dir).is_ok() {
        crate::rootfs::unpacked::remove_tree(dir).map_err(fail)?;
    }
    fs::create_dir(dir).map_err(fail)?;
    for part in [UPPER, WORK, BASE, MERGED] {
        fs::create_dir(dir.join(part)).map_err(fail)?;
    }
    Ok(())
}

/// The overlay mounted by a helper process; its merged view at [`Merged::path`]. Dropped,
/// the helper unmounts it and ends.
pub struct Merged {
    helper: nix::unistd::Pid,
    /// Closed on drop: the helper's signal to end.
    stop: Option<OwnedFd>,
    path: PathBuf,
}

impl Merged {
    /// Mount the overlay of `base` (a squashfs at `offset`) and the layer `dir` in a helper.
    /// Only for a single-threaded caller (the ferry CLI).
    pub fn open(base: &Path, offset: u64, dir: &Path) -> Result<Merged, LayerError> {
        if !raw::is_single_threaded() {
            return Err(LayerError::Helper(
                "ferry build runs more than one thread".into(),
            ));
        }
        let squashfuse = crate::image::squashfs::find_squashfuse(None)
            .ok_or_else(|| LayerError::Helper("squashfuse not found: install squashfuse".into()))?;
        let pipe = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| LayerError::Helper(format!("pipe: {e}")))
        };
        let (ready_r, ready_w) = pipe()?;
        let (stop_r, stop_w) = pipe()?;
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        match raw::fork_single_threaded().map_err(LayerError::Fork)? {
            None => {
                drop(ready_r);
                drop(stop_w);
                let code = match keep_only(ready_w, stop_r) {
                    Ok([ready, stop]) => {
                        helper(base, offset, dir, &squashfuse, uid, gid, ready, stop)
                    }
                    Err(_) => 1,
                };
                raw::exit_immediately(code)
            }
            Some(child) => {
                drop(ready_w);
                drop(stop_r);
                let mut message = String::new();
                let _ = File::from(ready_r).read_to_string(&mut message);
                let merged = Merged {
                    helper: child,
                    stop: Some(stop_w),
                    path: PathBuf::from(format!("/proc/{child}/root")).join(
                        std::path::absolute(dir.join(MERGED))
                            .unwrap_or_else(|_| dir.join(MERGED))
                            .strip_prefix("/")
                            .unwrap_or(dir),
                    ),
                };
                if message == READY {
                    return Ok(merged);
                }
                drop(merged);
                Err(LayerError::Helper(if message.is_empty() {
                    "ended before the overlay was mounted".into()
                } else {
                    message
                }))
            }
        }
    }

    /// The merged view, valid while `self` lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Merged {
    fn drop(&mut self) {
        drop(self.stop.take());
        while let Err(nix::Error::EINTR) = waitpid(self.helper, None) {}
    }
}

/// The helper keeps `ready` and `stop` (as descriptors 3 and 4) and closes everything else
/// it inherited: above all the `stop` ends of other stages' helpers, which must see their
/// end of file when the build drops them.
fn keep_only(ready: OwnedFd, stop: OwnedFd) -> io::Result<[OwnedFd; 2]> {
    // Above whatever 3 and 4 are now, so that moving one cannot overwrite the other; the
    // originals close as they are dropped here.
    let high = |fd: OwnedFd| {
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(1000))
            .map_err(io::Error::from)
    };
    let (ready_high, stop_high) = (high(ready)?, high(stop)?);
    nix::unistd::dup2(ready_high, 3)?;
    nix::unistd::dup2(stop_high, 4)?;
    raw::close_from(5)?;
    raw::adopt_inherited_fds([3, 4])
}

/// What the helper writes once the overlay is mounted (else its error).
const READY: &str = "ready";

/// The helper child: mounts, says so on `ready`, waits for `stop` to close, then ends; its
/// mounts vanish with its mount namespace. Returns its exit code.
#[allow(clippy::too_many_arguments)]
fn helper(
    base: &Path,
    offset: u64,
    dir: &Path,
    squashfuse: &Path,
    uid: u32,
    gid: u32,
    ready: OwnedFd,
    stop: OwnedFd,
) -> i32 {
    let mut ready = File::from(ready);
    let mut server = None;
    let mounted = mount_in_child(base, offset, dir, squashfuse, uid, gid, &mut server);
    let code = match mounted {
        Ok(()) => {
            let _ = ready.write_all(READY.as_bytes());
            drop(ready);
            // EOF when the build drops its end (or ends).
            let mut byte = [0u8; 1];
            let _ = File::from(stop).read(&mut byte);
            let _ = umount2(&dir.join(MERGED), MntFlags::MNT_DETACH);
            0
        }
        Err(e) => {
            let _ = ready.write_all(e.to_string().as_bytes());
            1
        }
    };
    let _ = umount2(&dir.join(BASE), MntFlags::MNT_DETACH);
    if let Some(mut server) = server {
        let _ = server.kill();
        let _ = server.wait();
    }
    code
}

fn mount_in_child(
    base: &Path,
    offset: u64,
    dir: &Path,
    squashfuse: &Path,
    uid: u32,
    gid: u32,
    server: &mut Option<Child>,
) -> Result<(), LayerError> {
    let io_fail =
        |what: &'static str| move |e: io::Error| LayerError::Helper(format!("{what}: {e}"));
    let nix_fail =
        |what: &'static str| move |e: nix::Error| LayerError::Helper(format!("{what}: {e}"));
    nix::sched::unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
        .map_err(nix_fail("cannot create a user namespace"))?;
    fs::write("/proc/self/setgroups", "deny").map_err(io_fail("setgroups"))?;
    fs::write("/proc/self/uid_map", format!("0 {uid} 1\n")).map_err(io_fail("uid_map"))?;
    fs::write("/proc/self/gid_map", format!("0 {gid} 1\n")).map_err(io_fail("gid_map"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(nix_fail("making mounts private"))?;
    let base_dir = dir.join(BASE);
    let child = server.insert(mount_base(base, offset, &base_dir, squashfuse)?);
    wait_ready(&base_dir, child)?;
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        base_dir.display(),
        dir.join(UPPER).display(),
        dir.join(WORK).display()
    );
    // userxattr: the same opaque-directory marks as RUN's overlay, which a user namespace's
    // overlay writes as user.overlay.* attributes.
    let mut last = None;
    for extra in [",userxattr", ""] {
        match mount(
            Some("overlay"),
            &dir.join(MERGED),
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("{options}{extra}").as_str()),
        ) {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(nix_fail("mounting the overlay")(
        last.expect("tried at least once"),
    ))
}

/// Mount the FUSE connection at `at` and start squashfuse serving `base` on it.
fn mount_base(base: &Path, offset: u64, at: &Path, program: &Path) -> Result<Child, LayerError> {
    let fail = |what: &str, e: String| LayerError::Helper(format!("{what}: {e}"));
    let fuse: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map_err(|e| fail("/dev/fuse", e.to_string()))?
        .into();
    let image = File::open(base).map_err(|e| fail("opening the base", e.to_string()))?;
    squashfuse::mount_connection(fuse.as_fd(), base, at, 0, 0)
        .map_err(|e| fail("FUSE mount of the base refused", e.to_string()))?;
    let mut cmd =
        squashfuse::server_command(program, offset, image.as_fd(), fuse.as_fd(), Path::new("/"))
            .map_err(|e| fail("preparing squashfuse", e.to_string()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.spawn().map_err(|e| {
        fail(
            &format!("cannot start {}", program.display()),
            e.to_string(),
        )
    })
}

/// Wait until squashfuse serves the base (the first request waits for its answer; if it
/// dies first, the connection is aborted and this fails).
fn wait_ready(at: &Path, server: &mut Child) -> Result<(), LayerError> {
    let started = Instant::now();
    loop {
        match fs::metadata(at) {
            Ok(_) => return Ok(()),
            Err(e) => {
                if server.try_wait().ok().flatten().is_some()
                    || started.elapsed() > Duration::from_secs(30)
                {
                    return Err(LayerError::Helper(format!("squashfuse: {e}")));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

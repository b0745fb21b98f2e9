//! A stage's tree as an overlay: its base (a squashfs: the image or a step's cache entry)
//! mounted by squashfuse as the lower layer, the build's writes in an upper layer on disk.
//! Nothing of the base is unpacked: a cold build's first RUN starts at once instead of
//! after writing the base's thousands of files.
//!
//! RUN mounts the overlay in its own container (`ContainerSpec::overlay_layer`). Steps that
//! the build itself carries out on the tree (COPY, the config, the squashfs of a cache
//! entry or the image) run in a forked child that enters a user namespace of its own (the
//! caller's uid as root, so that the base's root-owned files are the caller's and copy-up
//! may keep their owner) and mounts the same overlay there. The merged view is what they
//! see: a file a RUN deleted is hidden by its whiteout, so a squashfs of the merged view
//! simply lacks it.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::wait::{waitpid, WaitStatus};

use super::StepError;
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

/// Run `f` on the merged view of `base` (a squashfs at `offset`) under the layer `dir`,
/// writable (writes land in the upper layer), in a forked child; its error comes back
/// as text. Only for a single-threaded caller (the ferry CLI).
pub fn with_merged(
    base: &Path,
    offset: u64,
    dir: &Path,
    f: impl FnOnce(&Path) -> Result<(), StepError>,
) -> Result<(), StepError> {
    if !raw::is_single_threaded() {
        return Err(LayerError::Helper("ferry build runs more than one thread".into()).into());
    }
    let squashfuse = crate::image::squashfs::find_squashfuse(None)
        .ok_or_else(|| LayerError::Helper("squashfuse not found: install squashfuse".into()))?;
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| LayerError::Helper(format!("pipe: {e}")))?;
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    match raw::fork_single_threaded().map_err(LayerError::Fork)? {
        None => {
            drop(read_end);
            let outcome = in_child(base, offset, dir, &squashfuse, uid, gid, f);
            let code = match outcome {
                Ok(()) => 0,
                Err(e) => {
                    let mut out = File::from(write_end);
                    let _ = out.write_all(e.to_string().as_bytes());
                    1
                }
            };
            raw::exit_immediately(code)
        }
        Some(child) => {
            drop(write_end);
            let mut message = String::new();
            let _ = File::from(read_end).read_to_string(&mut message);
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::Error::EINTR) => continue,
                    other => break other,
                }
            };
            match status {
                Ok(WaitStatus::Exited(_, 0)) => Ok(()),
                Ok(WaitStatus::Exited(_, _)) if !message.is_empty() => {
                    Err(LayerError::Helper(message).into())
                }
                other => Err(LayerError::Helper(format!("ended: {other:?}")).into()),
            }
        }
    }
}

/// What the helper child does; its mounts vanish with its mount namespace.
fn in_child(
    base: &Path,
    offset: u64,
    dir: &Path,
    squashfuse: &Path,
    uid: u32,
    gid: u32,
    f: impl FnOnce(&Path) -> Result<(), StepError>,
) -> Result<(), StepError> {
    let helper = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| StepError::from(LayerError::Helper(format!("{what}: {e}")))
    };
    let nix_helper = |what: &str| {
        let what = what.to_string();
        move |e: nix::Error| StepError::from(LayerError::Helper(format!("{what}: {e}")))
    };
    nix::sched::unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
        .map_err(nix_helper("cannot create a user namespace"))?;
    fs::write("/proc/self/setgroups", "deny").map_err(helper("setgroups"))?;
    fs::write("/proc/self/uid_map", format!("0 {uid} 1\n")).map_err(helper("uid_map"))?;
    fs::write("/proc/self/gid_map", format!("0 {gid} 1\n")).map_err(helper("gid_map"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(nix_helper("making mounts private"))?;
    let base_dir = dir.join(BASE);
    let merged = dir.join(MERGED);
    let mut server = mount_base(base, offset, &base_dir, squashfuse)?;
    let result = (|| {
        wait_ready(&base_dir, &mut server)?;
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            base_dir.display(),
            dir.join(UPPER).display(),
            dir.join(WORK).display()
        );
        // userxattr: the same opaque-directory marks as RUN's overlay, which a user
        // namespace's overlay writes as user.overlay.* attributes.
        let mut last = None;
        for extra in [",userxattr", ""] {
            match mount(
                Some("overlay"),
                &merged,
                Some("overlay"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(format!("{options}{extra}").as_str()),
            ) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(nix_helper("mounting the overlay")(e));
        }
        let done = f(&merged);
        let _ = umount2(&merged, MntFlags::empty());
        done
    })();
    let _ = umount2(&base_dir, MntFlags::MNT_DETACH);
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// Mount the FUSE connection at `at` and start squashfuse serving `base` on it.
fn mount_base(base: &Path, offset: u64, at: &Path, program: &Path) -> Result<Child, StepError> {
    let fail = |what: &str, e: String| StepError::from(LayerError::Helper(format!("{what}: {e}")));
    let fuse: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map_err(|e| fail("/dev/fuse", e.to_string()))?
        .into();
    let image = File::open(base).map_err(|e| fail("opening the base", e.to_string()))?;
    let options = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions",
        fuse.as_raw_fd()
    );
    mount(
        Some(base.as_os_str()),
        at,
        Some("fuse.squashfuse"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .map_err(|e| fail("FUSE mount of the base refused", e.to_string()))?;
    const IMAGE_FD: i32 = 3;
    const FUSE_FD: i32 = 4;
    let mut cmd = Command::new(program);
    cmd.arg("-f");
    if offset > 0 {
        cmd.arg("-o").arg(format!("offset={offset}"));
    }
    cmd.arg(format!("/proc/self/fd/{IMAGE_FD}"))
        .arg(format!("/dev/fd/{FUSE_FD}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    raw::pass_fds_and_chroot_on_exec(
        &mut cmd,
        &[(image.as_fd(), IMAGE_FD), (fuse.as_fd(), FUSE_FD)],
        Path::new("/"),
        true,
    )
    .map_err(|e| fail("preparing squashfuse", e.to_string()))?;
    cmd.spawn().map_err(|e| {
        fail(
            &format!("cannot start {}", program.display()),
            e.to_string(),
        )
    })
}

/// Wait until squashfuse serves the base (the first request waits for its answer; if it
/// dies first, the connection is aborted and this fails).
fn wait_ready(at: &Path, server: &mut Child) -> Result<(), StepError> {
    let started = Instant::now();
    loop {
        match fs::metadata(at) {
            Ok(_) => return Ok(()),
            Err(e) => {
                if server.try_wait().ok().flatten().is_some()
                    || started.elapsed() > Duration::from_secs(30)
                {
                    return Err(LayerError::Helper(format!("squashfuse: {e}")).into());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

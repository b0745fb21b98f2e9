//! Mounting the image at the staging tree's `/lower`: a directory image by a bind, a
//! squashfs image by squashfuse serving a FUSE connection the holder mounted itself.

use std::fs::{self, File};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use crate::container::phases::Phases;
use crate::image::ImageKind;
use crate::rootfs::error::{setup, RootfsError};
use crate::rootfs::inputs::{open_fuse, Inputs, Source};
use crate::rootfs::staging::{bind_mount, fd_path, host_null, FILES, LOWER, OLD};
use crate::sys::raw;

/// Mount the image at `/lower`; returns squashfuse, which serves it, for a squashfs image.
pub(super) fn mount_image(
    inputs: &Inputs,
    phases: &mut Phases,
) -> Result<Option<Child>, RootfsError> {
    match inputs.kind {
        ImageKind::Directory => {
            let source = Source {
                path: inputs.image_path.clone(),
                fd: inputs
                    .image
                    .try_clone()
                    .map_err(setup("reopening the image"))?
                    .into(),
                is_dir: true,
            };
            let host_root = File::open(OLD).map_err(setup("opening the host's root"))?;
            let fd = source
                .reopen(&host_root)
                .map_err(setup("reopening the image directory"))?;
            bind_mount(&fd_path(&fd), Path::new(LOWER), true).map_err(|source| {
                RootfsError::Mount {
                    what: format!("the image directory {}", inputs.image_path.display()),
                    target: "/".into(),
                    source,
                }
            })?;
            phases.end("image bind");
            Ok(None)
        }
        ImageKind::Squashfs { offset, .. } => {
            let child = mount_squashfs(inputs, offset)?;
            phases.end("squashfuse start");
            Ok(Some(child))
        }
    }
}

/// Mount the image with squashfuse: the holder (which has the capabilities of its user
/// namespace) mounts the FUSE filesystem itself and hands the connection to squashfuse as
/// `/dev/fd/N`, so neither fusermount nor any setuid helper is involved.
fn mount_squashfs(inputs: &Inputs, offset: u64) -> Result<Child, RootfsError> {
    let fuse = open_fuse(
        &inputs.image_path.display().to_string(),
        &Path::new(OLD).join("dev/fuse"),
    )?;
    let program = inputs
        .squashfuse
        .as_ref()
        .expect("found for squashfs images");
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    mount_connection(fuse.as_fd(), &inputs.image_path, Path::new(LOWER), uid, gid).map_err(
        |e| RootfsError::ImageMount {
            path: inputs.image_path.clone(),
            detail: format!("FUSE mount refused: {e}"),
        },
    )?;
    let log_path = Path::new(FILES).join("squashfuse.log");
    let log = File::create(&log_path).map_err(setup("creating the squashfuse log"))?;
    // squashfuse is a host program: it runs in the host tree (its libraries, its loader),
    // while the connection it serves is already mounted in the staging tree.
    let mut cmd = server_command(
        program,
        offset,
        inputs.image.as_fd(),
        fuse.as_fd(),
        Path::new(OLD),
    )
    .map_err(setup("preparing squashfuse"))?;
    cmd.stdin(host_null().map_err(setup("opening /dev/null"))?)
        .stdout(host_null().map_err(setup("opening /dev/null"))?)
        .stderr(log);
    cmd.spawn().map_err(|e| RootfsError::ImageMount {
        path: inputs.image_path.clone(),
        detail: format!("cannot start {}: {e}", program.display()),
    })
}

/// Mount the FUSE connection `fuse` at `at` as squashfuse's (`source` names it in the mount
/// table): read-only, nosuid, nodev, its files owned by `uid`/`gid` of the caller's user
/// namespace.
pub fn mount_connection(
    fuse: BorrowedFd<'_>,
    source: &Path,
    at: &Path,
    uid: u32,
    gid: u32,
) -> nix::Result<()> {
    let options = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions",
        fuse.as_raw_fd()
    );
    mount(
        Some(source.as_os_str()),
        at,
        Some("fuse.squashfuse"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
}

/// `program` (squashfuse) serving the mounted connection `fuse` from `image` (a squashfs
/// at `offset`) in the foreground, both passed as descriptors, so that neither fusermount
/// nor any setuid helper is involved; it runs with `root` as its root directory and dies
/// with the thread that starts it. The caller sets its standard streams.
pub fn server_command(
    program: &Path,
    offset: u64,
    image: BorrowedFd<'_>,
    fuse: BorrowedFd<'_>,
    root: &Path,
) -> std::io::Result<Command> {
    const IMAGE_FD: i32 = 3;
    const FUSE_FD: i32 = 4;
    let mut cmd = Command::new(program);
    cmd.arg("-f");
    if offset > 0 {
        cmd.arg("-o").arg(format!("offset={offset}"));
    }
    cmd.arg(format!("/proc/self/fd/{IMAGE_FD}"))
        .arg(format!("/dev/fd/{FUSE_FD}"));
    raw::pass_fds_and_chroot_on_exec(&mut cmd, &[(image, IMAGE_FD), (fuse, FUSE_FD)], root, true)?;
    Ok(cmd)
}

/// Wait until squashfuse (`child`) serves the image; on failure it is ended, and its last
/// words are the error.
pub(super) fn wait_ready(inputs: &Inputs, child: &mut Child) -> Result<(), RootfsError> {
    let log_path = Path::new(FILES).join("squashfuse.log");
    // The first request waits for squashfuse to answer; if it dies first, the connection is
    // aborted and this fails instead of hanging.
    let started = Instant::now();
    loop {
        match fs::metadata(LOWER) {
            Ok(_) => return Ok(()),
            Err(e) => {
                let exited = child.try_wait().ok().flatten();
                if exited.is_some() || started.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    let detail = Some(crate::sys::child::last_line(&log))
                        .filter(|l| !l.is_empty())
                        .map_or_else(|| e.to_string(), str::to_string);
                    return Err(RootfsError::ImageMount {
                        path: inputs.image_path.clone(),
                        detail: format!("squashfuse: {detail}"),
                    });
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

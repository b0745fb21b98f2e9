//! The `kernel` root filesystem provider, an admin's opt-in: the kernel's own squashfs
//! driver mounts the image (read-only, nosuid, nodev) instead of squashfuse.
//!
//! Who does what:
//! 1. The caller (slurmstepd in user_init, which runs it with the job user's effective uid;
//!    or `ferry run` as root) opens the image **as the user** ([`mount_image`] checks the
//!    effective uid first), so root never reads a file the user could not.
//! 2. Taking root back for the calling thread alone ([`ThreadRoot`]), it attaches that
//!    descriptor to a free loop device (read-only, autoclear, from the squashfs offset of a
//!    SIF) and mounts the device with the new mount API (`fsopen`, `fsconfig`, `fsmount`):
//!    a detached mount, attached nowhere, held by one descriptor ([`KernelMount`]).
//! 3. Between fork and exec of the holder, the child (still root) unshares a mount
//!    namespace of its own and attaches the mount at [`MOUNT_DIR`] there (see
//!    [`KernelMount::attach_on_exec`]). The holder, now the user, makes its user and mount
//!    namespaces from that namespace and binds [`MOUNT_DIR`] as its lower tree, like a
//!    directory image ([`open_mounted`]); the intermediate namespace dies as the holder
//!    leaves it.
//!
//! Why the mount is attached in a namespace before the holder's, rather than handed to the
//! holder as a descriptor to attach itself: the kernel locks a mount's flags (`MNT_LOCK_*`)
//! only when it copies a mount namespace into a less privileged user namespace. A detached
//! mount that a user-namespace process attaches itself carries no locks, and its nodev and
//! read-only flags can then be cleared with `mount_setattr` by anyone who joins the
//! container (measured on Linux 6.18: both succeeded) — and without nodev, a device node in
//! a user's image would be a device the user can open, since the superblock belongs to the
//! initial user namespace. Attached first and then copied by the holder's `unshare`, the
//! flags are locked (measured: EPERM for both).
//!
//! Why the new mount API: the caller makes the mount with root's rights and reports the
//! driver's own messages (`squashfs: ...`), while it is attached only in the child's private
//! namespace, which no other user can see or enter: nothing is ever mounted in the host's
//! namespace, so nothing there needs cleaning up, not even after a crash. The mount lives
//! exactly as long as the holder's namespace (the holder, the tasks that joined it and the
//! plugin's namespace descriptors); the loop device, set to autoclear, detaches itself when
//! its last mount goes. Needs Linux 5.2 (fsopen); loop devices are set up with
//! `LOOP_CONFIGURE` (5.8), else `LOOP_SET_FD` + `LOOP_SET_STATUS64`.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::image::{self, ImageError, ImageKind};
use crate::spec::user::UserInfo;
use crate::spec::{ContainerSpec, RootfsProvider};
use crate::sys::raw;
use rustix::mount::MountAttrFlags;

/// Where the image is attached in the holder's private mount namespace (in the host's, an
/// empty directory that only root can enter; nothing is ever mounted on it there).
pub const MOUNT_DIR: &str = "/run/ferry-kernel";
/// `SQUASHFS_MAGIC` of <linux/magic.h>.
const SQUASHFS_MAGIC: i64 = 0x7371_7368;
/// Free loop devices tried when others take them first.
const LOOP_ATTEMPTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("--rootfs kernel needs root: the kernel's squashfs driver mounts the image, which only root may do; users get it through the Slurm plugin where the site enables it (kernel_squashfs=yes in plugstack.conf), and `ferry run --rootfs kernel` is for admins, as root")]
    NeedsRoot,
    #[error("the kernel provider must open the image as user {user} (uid {uid}), but runs as uid {euid}")]
    NotTheUser { user: String, uid: u32, euid: u32 },
    #[error("cannot prepare {dir} for the kernel provider: {detail}")]
    MountDir {
        dir: PathBuf,
        detail: MountDirProblem,
    },
    #[error("cannot attach the image {path} to a loop device: {detail}")]
    Loop { path: PathBuf, detail: LoopProblem },
    #[error("the kernel cannot mount the image {path} as squashfs: {detail}")]
    Mount { path: PathBuf, detail: MountProblem },
    #[error("cannot check the image {path} for the kernel provider: {detail}")]
    Probe { path: PathBuf, detail: String },
    /// The probe's own one-line error about the image.
    #[error("{0}")]
    Probed(String),
    #[error("the image is not mounted by the kernel at {MOUNT_DIR}: the kernel provider works through the Slurm plugin where the site enables it (kernel_squashfs=yes), or for `ferry run --rootfs kernel` as root")]
    NotMounted,
}

/// Why the directory the kernel's mounts are attached at cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MountDirProblem {
    #[error("{0}")]
    Io(io::Error),
    #[error("it is not a directory owned by uid {owner} that only its owner can write; remove it (ferry makes it again)")]
    NotPrivate { owner: u32 },
}

/// Why no loop device could be backed by the image.
#[derive(Debug, thiserror::Error)]
pub enum LoopProblem {
    #[error("/dev/loop-control: {0} (modprobe loop)")]
    Control(io::Error),
    #[error("no free loop device ({0}); an admin can allow more (the loop module's max_loop)")]
    NoneFree(io::Error),
    #[error("/dev/loop{number}: {error}")]
    Device { number: u32, error: io::Error },
    #[error("every free loop device was taken by others first ({LOOP_ATTEMPTS} tries)")]
    AllTaken,
}

/// Why the kernel did not mount the loop device as squashfs.
#[derive(Debug, thiserror::Error)]
pub enum MountProblem {
    #[error("this kernel has no squashfs driver (modprobe squashfs)")]
    NoDriver,
    #[error("this kernel lacks the mount API (fsopen, Linux 5.2)")]
    NoMountApi,
    #[error("fsopen: {0}")]
    Open(io::Error),
    #[error("cannot map its owners for --remap-root (idmapped mount): {0}")]
    Idmap(io::Error),
    /// `messages`: what the file system context said (`e ...`, `w ...` lines).
    #[error("{}", failure_text(.error, .messages))]
    Refused {
        error: io::Error,
        messages: Vec<String>,
    },
}

/// A squashfs image mounted by the kernel and attached nowhere yet. Dropping it unmounts
/// it (and so frees its loop device), unless a holder has attached it meanwhile.
#[derive(Debug)]
pub struct KernelMount {
    mount: OwnedFd,
    device: String,
}

impl KernelMount {
    /// The loop device behind the mount (`/dev/loopN`).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Make `cmd` (the holder) start in a mount namespace of its own in which this mount is
    /// attached at [`MOUNT_DIR`]. Register before dropping privileges: it needs root. The
    /// caller keeps `self` until `cmd` has been spawned, then drops it.
    pub fn attach_on_exec(&self, cmd: &mut std::process::Command) {
        let target = CString::new(MOUNT_DIR).expect("no NUL");
        raw::attach_in_private_namespace_on_exec(cmd, self.mount.as_raw_fd(), target);
    }
}

/// Root for the calling thread alone, given back when dropped. slurmstepd runs spank
/// callbacks with its effective uid dropped to the job user and its real uid root; the
/// other threads keep the user's effective uid meanwhile.
pub struct ThreadRoot {
    restore: Option<u32>,
}

impl ThreadRoot {
    pub fn take() -> Result<ThreadRoot, KernelError> {
        let (uid, euid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::geteuid().as_raw(),
        );
        if euid == 0 {
            return Ok(ThreadRoot { restore: None });
        }
        if uid != 0 {
            return Err(KernelError::NeedsRoot);
        }
        raw::set_thread_euid(0).map_err(|_| KernelError::NeedsRoot)?;
        Ok(ThreadRoot {
            restore: Some(euid),
        })
    }
}

impl Drop for ThreadRoot {
    fn drop(&mut self) {
        if let Some(euid) = self.restore {
            if let Err(e) = raw::set_thread_euid(euid) {
                // Root may always set its effective uid; this cannot happen.
                tracing::error!("cannot drop back to uid {euid}: {e}");
                std::process::abort();
            }
        }
    }
}

/// The kernel mount for `spec`, when it asks for the kernel provider and its image is a
/// squashfs or SIF (directories are used as they are; named containers and
/// `--container-save` use their unpacked copy).
pub fn mount_for(spec: &ContainerSpec, probe: &Probe) -> Result<Option<KernelMount>, KernelError> {
    if spec.rootfs != RootfsProvider::Kernel || spec.unpacked.is_some() {
        return Ok(None);
    }
    let owners = spec.remap_root.then_some(Owners {
        uid: spec.user.uid,
        gid: spec.user.gid,
    });
    mount_image(&spec.image, &spec.user, owners, probe)
}

/// Who reads the image's headers (the SIF descriptor table, the squashfs superblock) to
/// find the squashfs in it, before root hands the file to the kernel.
#[derive(Debug, Clone)]
pub enum Probe {
    /// This process: `ferry run --rootfs kernel`, which only root may run.
    InProcess,
    /// `PROGRAM probe-image` as the user, given the opened image as its stdin: in
    /// slurmstepd, nothing of a user's file is parsed by root's process.
    AsUser {
        program: PathBuf,
        run_as: crate::sys::raw::Credentials,
    },
}

/// The most the caller reads of `ferry probe-image`'s output, and how long it waits.
const MAX_PROBE_OUTPUT: usize = 64 << 10;
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Probe {
    fn detect(&self, path: &Path, file: &File) -> Result<ImageKind, KernelError> {
        let (program, run_as) = match self {
            Probe::InProcess => return Ok(image::detect(path, file)?),
            Probe::AsUser { program, run_as } => (program, run_as),
        };
        let failed = |detail: String| KernelError::Probe {
            path: path.into(),
            detail,
        };
        let mut cmd = std::process::Command::new(program);
        cmd.arg("probe-image")
            .arg(path)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin");
        crate::sys::raw::run_as_on_exec(&mut cmd, Some(run_as.clone()), false);
        let stdin = file.try_clone().map_err(|e| failed(e.to_string()))?;
        let mut started = Some(std::time::Instant::now());
        let end = crate::sys::child::run_capped(
            &mut cmd,
            stdin.into(),
            MAX_PROBE_OUTPUT,
            PROBE_TIMEOUT,
            std::time::Duration::ZERO,
            || {
                started
                    .take()
                    .map(|_| format!("took longer than {PROBE_TIMEOUT:?}"))
            },
            |_| {},
        )
        .map_err(|e| failed(format!("cannot run {} probe-image: {e}", program.display())))?;
        match end {
            crate::sys::child::HelperEnd::Exited { status, stdout, .. } if status.success() => {
                serde_json::from_slice(&stdout).map_err(|e| failed(format!("bad answer: {e}")))
            }
            crate::sys::child::HelperEnd::Exited { stderr, .. } => {
                let text = String::from_utf8_lossy(&stderr);
                let line = crate::sys::child::last_line(&text);
                Err(KernelError::Probed(
                    line.trim_start_matches("ferry: error: ").to_string(),
                ))
            }
            crate::sys::child::HelperEnd::Stopped(why) => Err(failed(why)),
            crate::sys::child::HelperEnd::TooMuchOutput { cap } => {
                Err(failed(format!("more than {cap} bytes of output")))
            }
        }
    }
}

/// `ferry probe-image PATH` (as the user, for [`Probe::AsUser`]): what the image on stdin
/// is, as one JSON line; `PATH` only names it in messages.
pub fn probe_stdin(path: &Path) -> Result<String, ImageError> {
    let file = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(|source| ImageError::Open {
            path: path.into(),
            source,
        })?;
    let kind = image::detect(path, &file)?;
    Ok(serde_json::to_string(&kind).expect("image kinds serialise"))
}

/// With `--remap-root`: the image's root-owned files appear as the user's (and so as root
/// inside), as they do through squashfuse, whose owners the container's user namespace
/// maps; the kernel's own mount shows the image's real ids, which that namespace lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owners {
    pub uid: u32,
    pub gid: u32,
}

/// Open `path` as `user` (the caller's effective uid must be theirs), then, as root, mount
/// it with the kernel's squashfs driver through a loop device; with `root_owners`, an
/// idmapped mount on which the image's uid and gid 0 are those ids. `None` for a directory.
pub fn mount_image(
    path: &Path,
    user: &UserInfo,
    root_owners: Option<Owners>,
    probe: &Probe,
) -> Result<Option<KernelMount>, KernelError> {
    let euid = nix::unistd::geteuid().as_raw();
    if nix::unistd::getuid().as_raw() != 0 && euid != 0 {
        return Err(KernelError::NeedsRoot);
    }
    if euid != user.uid {
        return Err(KernelError::NotTheUser {
            user: user.name.clone(),
            uid: user.uid,
            euid,
        });
    }
    let file = image::open(path, &user.name)?;
    let offset = match probe.detect(path, &file)? {
        ImageKind::Directory => return Ok(None),
        ImageKind::Squashfs { offset, .. } => offset,
    };
    let _root = ThreadRoot::take()?;
    ensure_mount_dir(Path::new(MOUNT_DIR), 0).map_err(|detail| KernelError::MountDir {
        dir: MOUNT_DIR.into(),
        detail,
    })?;
    let loop_error = |detail: LoopProblem| KernelError::Loop {
        path: path.into(),
        detail,
    };
    let control = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map_err(|e| loop_error(LoopProblem::Control(e)))?;
    let mut loops = SystemLoops {
        control,
        backing: &file,
        name: path.as_os_str().as_bytes(),
    };
    let (device_fd, number) = attach_loop(&mut loops, offset).map_err(loop_error)?;
    let device = format!("/dev/loop{number}");
    let mount = mount_squashfs(&device).map_err(|detail| KernelError::Mount {
        path: path.into(),
        detail,
    })?;
    // The superblock holds the device now; with autoclear it detaches when the mount goes.
    drop(device_fd);
    if let Some(o) = root_owners {
        raw::user_namespace_with_maps(&format!("0 {} 1", o.uid), &format!("0 {} 1", o.gid))
            .and_then(|userns| raw::mount_set_idmap(mount.as_fd(), userns.as_fd()))
            .map_err(|e| KernelError::Mount {
                path: path.into(),
                detail: MountProblem::Idmap(e),
            })?;
    }
    tracing::debug!("{} on {device}, mounted by the kernel", path.display());
    Ok(Some(KernelMount { mount, device }))
}

/// The holder's side: the kernel's mount of the image at [`MOUNT_DIR`] in the namespace the
/// holder started in, opened as the user.
pub fn open_mounted() -> Result<File, KernelError> {
    let dir = File::open(MOUNT_DIR).map_err(|_| KernelError::NotMounted)?;
    // f_type is a C long of the platform's width.
    #[allow(clippy::unnecessary_cast)]
    match nix::sys::statfs::fstatfs(&dir) {
        Ok(st) if st.filesystem_type().0 as i64 == SQUASHFS_MAGIC => Ok(dir),
        _ => Err(KernelError::NotMounted),
    }
}

/// Make `dir` an empty directory that only `owner` can enter and write, or check that it is
/// one: a real directory (not a symlink), owned by `owner`, writable by no one else.
fn ensure_mount_dir(dir: &Path, owner: u32) -> Result<(), MountDirProblem> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(MountDirProblem::Io(e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(MountDirProblem::Io)?;
    if !meta.file_type().is_dir() || meta.uid() != owner || meta.mode() & 0o022 != 0 {
        return Err(MountDirProblem::NotPrivate { owner });
    }
    Ok(())
}

/// Loop devices, behind a trait so that [`attach_loop`]'s choices can be tested.
trait LoopDevices {
    type Device;
    fn get_free(&mut self) -> io::Result<u32>;
    fn open(&mut self, number: u32) -> io::Result<Self::Device>;
    /// Back `dev` by the image from `offset`, read-only, autoclear; `legacy`: with
    /// LOOP_SET_FD + LOOP_SET_STATUS64 instead of LOOP_CONFIGURE.
    fn configure(&mut self, dev: &Self::Device, offset: u64, legacy: bool) -> io::Result<()>;
}

struct SystemLoops<'a> {
    control: File,
    backing: &'a File,
    name: &'a [u8],
}

impl LoopDevices for SystemLoops<'_> {
    type Device = File;

    fn get_free(&mut self) -> io::Result<u32> {
        raw::loop_get_free(self.control.as_fd())
    }

    fn open(&mut self, number: u32) -> io::Result<File> {
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/dev/loop{number}"))
    }

    fn configure(&mut self, dev: &File, offset: u64, legacy: bool) -> io::Result<()> {
        let flags = raw::LO_FLAGS_READ_ONLY | raw::LO_FLAGS_AUTOCLEAR;
        let f = if legacy {
            raw::loop_set_fd_and_status
        } else {
            raw::loop_configure
        };
        f(dev.as_fd(), self.backing.as_fd(), offset, flags, self.name)
    }
}

/// A free loop device backed by the image: the device (its last close detaches it while
/// nothing mounts it) and its number. Devices that others take between LOOP_CTL_GET_FREE
/// and the configuration (EBUSY) are passed over.
fn attach_loop<L: LoopDevices>(
    loops: &mut L,
    offset: u64,
) -> Result<(L::Device, u32), LoopProblem> {
    let mut legacy = false;
    for _ in 0..LOOP_ATTEMPTS {
        let number = loops.get_free().map_err(LoopProblem::NoneFree)?;
        let dev = match loops.open(number) {
            Ok(dev) => dev,
            // Made by LOOP_CTL_GET_FREE, its node not yet there: try again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(LoopProblem::Device { number, error }),
        };
        loop {
            match loops.configure(&dev, offset, legacy) {
                Ok(()) => return Ok((dev, number)),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                // Before Linux 5.8, LOOP_CONFIGURE is an unknown request.
                Err(e)
                    if !legacy && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY)) =>
                {
                    legacy = true
                }
                Err(error) => return Err(LoopProblem::Device { number, error }),
            }
        }
    }
    Err(LoopProblem::AllTaken)
}

/// Mount `device` as squashfs, read-only, nosuid, nodev, attached nowhere.
fn mount_squashfs(device: &str) -> Result<OwnedFd, MountProblem> {
    let fs = raw::fsopen("squashfs").map_err(|e| match e.raw_os_error() {
        Some(libc::ENODEV) => MountProblem::NoDriver,
        Some(libc::ENOSYS) => MountProblem::NoMountApi,
        _ => MountProblem::Open(e),
    })?;
    let made = raw::fsconfig_set(fs.as_fd(), "source", Some(device))
        .and_then(|()| raw::fsconfig_set(fs.as_fd(), "ro", None))
        .and_then(|()| {
            raw::fs_create_and_mount(
                fs.as_fd(),
                MountAttrFlags::MOUNT_ATTR_RDONLY
                    | MountAttrFlags::MOUNT_ATTR_NOSUID
                    | MountAttrFlags::MOUNT_ATTR_NODEV,
            )
        });
    made.map_err(|error| MountProblem::Refused {
        error,
        messages: raw::fs_context_messages(fs.as_fd()),
    })
}

/// The kernel's own messages about a failed mount (`e squashfs: ...`), else the error.
fn failure_text(err: &io::Error, messages: &[String]) -> String {
    let said: Vec<&str> = messages
        .iter()
        .map(|m| m.trim())
        .filter_map(|m| m.strip_prefix("e ").or_else(|| m.strip_prefix("w ")))
        .collect();
    if said.is_empty() {
        err.to_string()
    } else {
        format!("{} ({err})", said.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loop devices as a script: what LOOP_CTL_GET_FREE returns, how each configuration
    /// answers; records what was configured.
    struct Fake {
        free: Vec<io::Result<u32>>,
        answers: Vec<io::Result<()>>,
        configured: Vec<(u32, u64, bool)>,
    }

    impl LoopDevices for Fake {
        type Device = u32;
        fn get_free(&mut self) -> io::Result<u32> {
            self.free.remove(0)
        }
        fn open(&mut self, number: u32) -> io::Result<u32> {
            Ok(number)
        }
        fn configure(&mut self, dev: &u32, offset: u64, legacy: bool) -> io::Result<()> {
            self.configured.push((*dev, offset, legacy));
            self.answers.remove(0)
        }
    }

    fn errno(n: i32) -> io::Error {
        io::Error::from_raw_os_error(n)
    }

    #[test]
    fn a_device_taken_meanwhile_is_passed_over() {
        let mut fake = Fake {
            free: vec![Ok(3), Ok(4)],
            answers: vec![Err(errno(libc::EBUSY)), Ok(())],
            configured: vec![],
        };
        assert_eq!(attach_loop(&mut fake, 4096).unwrap(), (4, 4));
        assert_eq!(fake.configured, [(3, 4096, false), (4, 4096, false)]);
    }

    #[test]
    fn old_kernels_get_set_fd_and_status() {
        let mut fake = Fake {
            free: vec![Ok(0)],
            answers: vec![Err(errno(libc::EINVAL)), Ok(())],
            configured: vec![],
        };
        assert_eq!(attach_loop(&mut fake, 0).unwrap(), (0, 0));
        assert_eq!(fake.configured, [(0, 0, false), (0, 0, true)]);
    }

    #[test]
    fn loop_errors_say_what_failed() {
        let mut fake = Fake {
            free: vec![Err(errno(libc::ENOSPC))],
            answers: vec![],
            configured: vec![],
        };
        let e = attach_loop(&mut fake, 0).unwrap_err().to_string();
        assert!(
            e.contains("no free loop device") && e.contains("max_loop"),
            "{e}"
        );
        let mut fake = Fake {
            free: vec![Ok(7)],
            answers: vec![Err(errno(libc::EINVAL)), Err(errno(libc::EINVAL))],
            configured: vec![],
        };
        let e = attach_loop(&mut fake, 0).unwrap_err().to_string();
        assert!(e.starts_with("/dev/loop7: "), "{e}");
        let mut fake = Fake {
            free: (0..LOOP_ATTEMPTS as u32).map(Ok).collect(),
            answers: (0..LOOP_ATTEMPTS)
                .map(|_| Err(errno(libc::EBUSY)))
                .collect(),
            configured: vec![],
        };
        let e = attach_loop(&mut fake, 0).unwrap_err().to_string();
        assert!(e.contains("taken by others"), "{e}");
    }

    #[test]
    fn the_drivers_messages_explain_a_failed_mount() {
        let err = errno(libc::EINVAL);
        assert_eq!(
            failure_text(&err, &["e squashfs: Unsupported filesystem\n".into()]),
            format!("squashfs: Unsupported filesystem ({err})")
        );
        assert_eq!(failure_text(&err, &[]), err.to_string());
        let refused = MountProblem::Refused {
            error: errno(libc::EINVAL),
            messages: vec!["w squashfs: odd\n".into(), "e squashfs: bad\n".into()],
        };
        assert_eq!(
            refused.to_string(),
            format!("squashfs: odd; squashfs: bad ({err})")
        );
    }

    #[test]
    fn the_mount_directory_is_made_private_and_checked() {
        let base = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let dir = base.path().join("k");
        ensure_mount_dir(&dir, me).unwrap();
        let meta = fs::symlink_metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        ensure_mount_dir(&dir, me).unwrap();
        // Another owner, a mode others can write, a symlink, a file: refused.
        assert!(ensure_mount_dir(&dir, me + 1).is_err());
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        assert!(ensure_mount_dir(&dir, me).is_err());
        let link = base.path().join("l");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(ensure_mount_dir(&link, me).is_err());
        let file = base.path().join("f");
        fs::write(&file, "").unwrap();
        assert!(ensure_mount_dir(&file, me).is_err());
    }

    #[test]
    fn only_the_kernel_provider_of_an_image_mounts() {
        let user = UserInfo::current().unwrap();
        let mut spec = ContainerSpec::new("/nonexistent.sqsh".into(), user);
        assert!(mount_for(&spec, &Probe::InProcess).unwrap().is_none());
        spec.rootfs = RootfsProvider::Kernel;
        spec.unpacked = Some(crate::spec::UnpackedDir {
            owned_from: "/x".into(),
            dir: "/x/y".into(),
        });
        assert!(mount_for(&spec, &Probe::InProcess).unwrap().is_none());
    }
}

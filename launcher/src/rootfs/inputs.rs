//! What a container takes from the host (the image, mount sources, host files, /dev/fuse),
//! opened and checked as the user before any namespace changes.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::image::{self, ImageError, ImageKind};
use crate::rootfs::error::RootfsError;
use crate::rootfs::gpu::{self, HostFiles};
use crate::rootfs::staging::inside_path;
use crate::rootfs::unpacked;
use crate::spec::mounts::MountSpec;
use crate::spec::{ContainerCli, ContainerSpec, FirstUse, RootfsProvider};
use crate::sys::raw;

/// A host path the container binds, opened by the user before any namespace changes so
/// that permissions are the user's and a later swap of the path cannot redirect the mount.
#[derive(Debug)]
pub(super) struct Source {
    pub(super) path: PathBuf,
    pub(super) fd: OwnedFd,
    pub(super) is_dir: bool,
}

impl Source {
    /// The same file, opened again from inside the new mount namespace (the kernel binds
    /// only mounts of the caller's namespace). Refused if the path now names another file.
    /// The host's root is at /oldroot by now: the path is resolved with that as `/`, so
    /// an absolute symlink on the way (a home or scratch directory that is a link) still
    /// means what it meant on the host.
    pub(super) fn reopen(&self, host_root: &File) -> io::Result<OwnedFd> {
        use std::os::unix::fs::MetadataExt;
        let again = raw::open_in_root(
            host_root.as_fd(),
            &inside_path(&self.path),
            libc::O_PATH | libc::O_CLOEXEC,
            0,
        )?;
        let before = File::from(self.fd.try_clone()?).metadata()?;
        let after = File::from(again.try_clone()?).metadata()?;
        if (before.dev(), before.ino()) != (after.dev(), after.ino()) {
            return Err(io::Error::other(
                "it now names another file than the one ferry checked",
            ));
        }
        Ok(again)
    }
}

/// Everything taken from the host, opened with the user's credentials.
pub struct Inputs {
    pub(super) image_path: PathBuf,
    pub(super) image: File,
    pub(super) kind: ImageKind,
    pub(super) squashfuse: Option<PathBuf>,
    /// The home directory: where it goes inside, and its source.
    pub(super) home: Option<(PathBuf, Source)>,
    /// The user's mounts with their sources (none for a tmpfs).
    pub(super) mounts: Vec<(MountSpec, Option<Source>)>,
    /// What the container gets from the host (GPU nodes shown or hidden, driver and site
    /// libraries and tools), with the host files opened, and where each goes inside.
    pub(super) host: HostFiles,
    pub(super) host_binds: Vec<(PathBuf, Source)>,
    /// The shared lock on an unpacked tree (`unpack` provider), kept while the container
    /// lives so that `ferry gc` leaves the tree alone.
    pub(super) hold: Option<nix::fcntl::Flock<File>>,
    /// The write end of the pipe a background unpack tied to this container reads: it
    /// ends when the container's holder does.
    pub(super) unpack_tie: Option<unpacked::TiedUnpack>,
}

fn open_source(path: &Path, user: &str) -> Result<Source, RootfsError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => RootfsError::SourceMissing(path.into()),
            io::ErrorKind::PermissionDenied => RootfsError::SourceNotReadable {
                path: path.into(),
                user: user.into(),
            },
            _ => RootfsError::SourceOpen {
                path: path.into(),
                source,
            },
        })?;
    let is_dir = file
        .metadata()
        .map_err(|source| RootfsError::SourceOpen {
            path: path.into(),
            source,
        })?
        .is_dir();
    let mode = if is_dir {
        libc::R_OK | libc::X_OK
    } else {
        libc::R_OK
    };
    raw::access_fd(file.as_fd(), mode).map_err(|_| RootfsError::SourceNotReadable {
        path: path.into(),
        user: user.into(),
    })?;
    Ok(Source {
        path: path.to_path_buf(),
        fd: file.into(),
        is_dir,
    })
}

/// Open and check every input of `spec` as the calling user; an image unpacked first (the
/// `unpack` provider, named containers) tells `observe` how far it is.
pub fn open_inputs(
    spec: &ContainerSpec,
    observe: &mut dyn FnMut(unpacked::UnpackEvent),
) -> Result<Inputs, RootfsError> {
    let user = spec.user.name.as_str();
    let image_path = spec.image.clone();
    let image = image::open(&image_path, user)?;
    let kind = image::detect(&image_path, &image)?;
    // An unpacked container is a directory image from here on: the user's own copy; so is
    // an image under the `unpack` provider, read-only and shared, and the kernel's mount of
    // it under the `kernel` provider.
    let mut hold = None;
    let mut unpack_later = None;
    let image_bytes = image.metadata().map_or(0, |m| m.len());
    let (image_path, image, kind) = match (&spec.unpacked, &spec.rootfs, &kind) {
        (
            None,
            RootfsProvider::Unpack {
                owned_from,
                dir,
                first_use,
            },
            ImageKind::Squashfs { .. },
        ) if *first_use == FirstUse::Wait
            || unpacked::tree_ready(dir, &image)
            || (*first_use == FirstUse::MountWhileRunning
                && unpacked::unpack_cut_short(dir, &image)
                && unpacked::room_for_tree(dir, image_bytes).is_ok()) =>
        {
            let (rootfs, lock) =
                unpacked::unpack_shared(owned_from, dir, &image_path, &image, &kind, observe)?;
            hold = Some(lock);
            let dir = File::open(&rootfs).map_err(|source| ImageError::Open {
                path: rootfs.clone(),
                source,
            })?;
            (rootfs, dir, ImageKind::Directory)
        }
        // Mounted by root before the holder started, in the namespace it started in.
        (None, RootfsProvider::Kernel, ImageKind::Squashfs { .. }) => {
            let dir = crate::rootfs::kernel::open_mounted()?;
            (
                PathBuf::from(crate::rootfs::kernel::MOUNT_DIR),
                dir,
                ImageKind::Directory,
            )
        }
        // `auto` before the tree exists: this container mounts the image and, once its
        // inputs are checked, sets the unpack going; the next finds the tree (a Slurm step's
        // next, if this step cut the unpack short, unpacks in the foreground).
        (
            None,
            RootfsProvider::Unpack {
                owned_from,
                dir,
                first_use,
            },
            ImageKind::Squashfs { .. },
        ) => {
            let tied = *first_use == FirstUse::MountWhileRunning;
            unpack_later = Some((owned_from, dir, image_path.clone(), tied));
            (image_path, image, kind)
        }
        (None, ..) => (image_path, image, kind),
        (Some(u), ..) => {
            unpacked::make_private_dir(&u.owned_from, &u.dir)?;
            let rootfs = unpacked::prepare_rootfs_observed(&u.dir, &image_path, &kind, observe)?;
            let dir = File::open(&rootfs).map_err(|source| ImageError::Open {
                path: rootfs.clone(),
                source,
            })?;
            (rootfs, dir, ImageKind::Directory)
        }
    };
    let squashfuse = match kind {
        ImageKind::Squashfs { .. } => {
            let program = image::squashfs::find_squashfuse(spec.site.squashfuse.as_deref())
                .ok_or_else(|| match &spec.site.squashfuse {
                    Some(p) => RootfsError::SiteSquashfuseMissing(p.clone()),
                    None => RootfsError::NoSquashfuse,
                })?;
            // Only a check here: the kernel accepts a FUSE connection only from a /dev/fuse
            // opened inside the user namespace that mounts it, so it is opened again there.
            open_fuse(user, Path::new("/dev/fuse"))?;
            Some(program)
        }
        ImageKind::Directory => None,
    };
    let host_home = spec.host_home();
    let home = if spec.mount_home && host_home.is_absolute() && host_home != Path::new("/") {
        // A missing or unreadable home is not worth failing a job for: run without it.
        open_source(host_home, user)
            .map(|source| (spec.home_inside(), source))
            .map_err(|e| tracing::info!("not mounting home: {e}"))
            .ok()
    } else {
        None
    };
    let mounts = spec
        .mounts
        .iter()
        .map(|m| match m.tmpfs {
            Some(_) => Ok((m.clone(), None)),
            None => open_source(&m.source, user).map(|s| (m.clone(), Some(s))),
        })
        .collect::<Result<_, _>>()?;
    let cli = match &spec.site.nvidia_container_cli {
        ContainerCli::Auto => gpu::find_container_cli(),
        ContainerCli::Off => None,
        ContainerCli::Path(p) => Some(p.clone()),
    };
    let host = gpu::host_files(
        &gpu::Host::system(),
        &spec.gpus,
        &spec.site.host_libs,
        cli.as_deref(),
    )?;
    let host_binds = open_host_files(&host, user)?;
    // Only a start whose inputs are all there sets an unpack going.
    let mut unpack_tie = None;
    if let Some((owned_from, dir, image_path, tied)) = unpack_later {
        if let Err(e) = unpacked::room_for_tree(dir, image_bytes) {
            tracing::info!("no unpack in the background: {e}");
        } else {
            match unpacked::start_background_unpack(owned_from, dir, &image_path, tied) {
                Ok(tie) => unpack_tie = tie,
                Err(e) => tracing::info!("no unpack in the background: {e}"),
            }
        }
    }
    Ok(Inputs {
        image_path,
        image,
        kind,
        squashfuse,
        home,
        mounts,
        host,
        host_binds,
        hold,
        unpack_tie,
    })
}

/// The host's files for the container (see [`gpu::host_files`]), opened as the user, with
/// their places inside: libraries in [`gpu::HOST_LIB_DIR`], library directories at their
/// own path, programs in /usr/bin.
fn open_host_files(host: &HostFiles, user: &str) -> Result<Vec<(PathBuf, Source)>, RootfsError> {
    let lib_dir = Path::new(gpu::HOST_LIB_DIR);
    let wanted = host
        .libraries
        .iter()
        .map(|(name, path)| (lib_dir.join(name), path))
        .chain(host.library_dirs.iter().map(|d| (d.clone(), d)))
        .chain(
            host.programs
                .iter()
                .map(|(name, path)| (Path::new("/usr/bin").join(name), path)),
        );
    wanted
        .map(|(target, path)| {
            open_source(path, user)
                .map(|source| (target, source))
                .map_err(|e| RootfsError::HostFile {
                    path: path.clone(),
                    source: io::Error::other(e.to_string()),
                })
        })
        .collect()
}

pub(super) fn open_fuse(user: &str, path: &Path) -> Result<File, RootfsError> {
    fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(path).map_err(|e| {
        let reason = match e.kind() {
            io::ErrorKind::NotFound => "it does not exist; an admin must load the fuse module (modprobe fuse)".to_string(),
            io::ErrorKind::PermissionDenied => {
                "permission denied; an admin must make it usable by users (chmod 0666 /dev/fuse, as distributions ship it)".to_string()
            }
            _ => e.to_string(),
        };
        RootfsError::Fuse { user: user.into(), reason }
    })
}

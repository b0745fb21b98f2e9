//! Building a container's root filesystem inside its new mount namespace.
//!
//! Layout while building (no host directory is created for it):
//! a tmpfs is mounted over the host's `/tmp` and made the root with `pivot_root`, so the
//! host tree is reachable at `/oldroot`; the image is mounted at `/lower`; the container
//! tree is assembled at `/newroot` (a bind of `/lower`, or an overlay with its upper layer
//! on the tmpfs at `/rw`); generated files live in `/files`. A last `pivot_root` makes
//! `/newroot` the root and the rest is detached, so it vanishes with the namespace.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use crate::container::entrypoint::ImageStart;
use crate::container::spec::{ContainerCli, ContainerSpec, RootfsProvider};
use crate::container::user::{self, InsideIds};
use crate::image::{self, ImageError, ImageKind};
use crate::rootfs::gpu::{self, HostFiles};
use crate::rootfs::mounts::MountSpec;
use crate::rootfs::unpacked;
use crate::sys::raw;
use rustix::mount::MountAttrFlags;

const OLD: &str = "/oldroot";
const LOWER: &str = "/lower";
const NEW: &str = "/newroot";
const RW: &str = "/rw";
const FILES: &str = "/files";
/// Largest text file read from an image (passwd, group, environment).
const SMALL_FILE_LIMIT: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Named(#[from] unpacked::NamedError),
    #[error(transparent)]
    Gpu(#[from] gpu::GpuError),
    #[error(transparent)]
    Kernel(#[from] crate::rootfs::kernel::KernelError),
    #[error("cannot open the host file {path} for the container: {source}")]
    HostFile { path: PathBuf, source: io::Error },
    #[error("squashfuse not found: install it (Debian/Ubuntu: apt-get install squashfuse) or set `squashfuse=` in the plugin's plugstack.conf arguments")]
    NoSquashfuse,
    #[error("the site's squashfuse program {0} is missing or not executable: fix `squashfuse=` in plugstack.conf, or leave it out to use squashfuse_ll from PATH")]
    SiteSquashfuseMissing(PathBuf),
    #[error("/dev/fuse is not usable by user {user}: {reason}")]
    Fuse { user: String, reason: String },
    #[error("mount source not found: {0} (check the path given to --mount/--container-mounts)")]
    SourceMissing(PathBuf),
    #[error("mount source not readable by user {user}: {path} (check its permissions and those of its parent directories)")]
    SourceNotReadable { path: PathBuf, user: String },
    #[error("cannot open mount source {path}: {source}")]
    SourceOpen { path: PathBuf, source: io::Error },
    #[error("mount source {path} changed while the container was being set up ({source}); nothing was mounted, run again once it stays put")]
    SourceReplaced { path: PathBuf, source: io::Error },
    #[error("cannot mount the image {path}: {detail}")]
    ImageMount { path: PathBuf, detail: String },
    #[error("cannot mount {what} at {target} in the container: {source}")]
    Mount {
        what: String,
        target: PathBuf,
        source: io::Error,
    },
    #[error("cannot prepare the container ({step}): {source}")]
    Setup {
        step: &'static str,
        source: io::Error,
    },
    #[error(
        "working directory not found in the container: {0} (check --workdir/--container-workdir)"
    )]
    NoWorkdir(PathBuf),
}

fn setup(step: &'static str) -> impl FnOnce(io::Error) -> RootfsError {
    move |source| RootfsError::Setup { step, source }
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A host path the container binds, opened by the user before any namespace changes so
/// that permissions are the user's and a later swap of the path cannot redirect the mount.
#[derive(Debug)]
struct Source {
    path: PathBuf,
    fd: OwnedFd,
    is_dir: bool,
}

impl Source {
    /// The same file, opened again from inside the new mount namespace (the kernel binds
    /// only mounts of the caller's namespace). Refused if the path now names another file.
    /// The host's root is at /oldroot by now: the path is resolved with that as `/`, so
    /// an absolute symlink on the way (a home or scratch directory that is a link) still
    /// means what it meant on the host.
    fn reopen(&self, host_root: &File) -> io::Result<OwnedFd> {
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
    image_path: PathBuf,
    image: File,
    kind: ImageKind,
    squashfuse: Option<PathBuf>,
    home: Option<Source>,
    mounts: Vec<(MountSpec, Source)>,
    /// What the container gets from the host (GPU nodes shown or hidden, driver and site
    /// libraries and tools), with the host files opened, and where each goes inside.
    host: HostFiles,
    host_binds: Vec<(PathBuf, Source)>,
    /// The shared lock on an unpacked tree (`unpack` provider), kept while the container
    /// lives so that `ferry gc` leaves the tree alone.
    hold: Option<nix::fcntl::Flock<File>>,
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

/// Open and check every input of `spec` as the calling user.
pub fn open_inputs(spec: &ContainerSpec) -> Result<Inputs, RootfsError> {
    let user = spec.user.name.as_str();
    let image_path = spec.image.clone();
    let image = image::open(&image_path, user)?;
    let kind = image::detect(&image_path, &image)?;
    // An unpacked container is a directory image from here on: the user's own copy; so is
    // an image under the `unpack` provider, read-only and shared, and the kernel's mount of
    // it under the `kernel` provider.
    let mut hold = None;
    let (image_path, image, kind) = match (&spec.unpacked, &spec.rootfs, &kind) {
        (None, RootfsProvider::Unpack { owned_from, dir }, ImageKind::Squashfs { .. }) => {
            let (rootfs, lock) =
                unpacked::unpack_shared(owned_from, dir, &image_path, &image, &kind)?;
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
        (None, ..) => (image_path, image, kind),
        (Some(u), ..) => {
            unpacked::make_private_dir(&u.owned_from, &u.dir)?;
            let rootfs = unpacked::prepare_rootfs(&u.dir, &image_path, &kind)?;
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
    let home =
        if spec.mount_home && spec.user.home.is_absolute() && spec.user.home != Path::new("/") {
            // A missing or unreadable home is not worth failing a job for: run without it.
            open_source(&spec.user.home, user)
                .map_err(|e| tracing::info!("not mounting home: {e}"))
                .ok()
        } else {
            None
        };
    let mounts = spec
        .mounts
        .iter()
        .map(|m| open_source(&m.source, user).map(|s| (m.clone(), s)))
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

fn open_fuse(user: &str, path: &Path) -> Result<File, RootfsError> {
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

/// A container whose root is in place: what the holder keeps alive and reports.
pub struct Container {
    pub squashfuse: Option<Child>,
    pub env: Vec<(String, String)>,
    pub workdir: PathBuf,
    pub start: ImageStart,
    /// Kept for the container's life (see [`Inputs`]).
    pub hold: Option<nix::fcntl::Flock<File>>,
}

/// The path `rel` names inside the tree at `root`, with every symlink that exists in the
/// tree followed as the container would follow it (absolute targets and `..` stay inside
/// `root`). Components that do not exist are kept as given.
pub fn resolve_in_tree(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<std::ffi::OsString> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut hops = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&name);
        match fs::symlink_metadata(root.join(&candidate)) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "too many symlinks",
                    ));
                }
                let target = fs::read_link(root.join(&candidate))?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved = candidate,
        }
    }
    Ok(resolved)
}

/// One bind into the container tree.
struct Bind {
    what: String,
    source: PathBuf,
    target: PathBuf,
    is_dir: bool,
    recursive: bool,
    flags: MountAttrFlags,
}

fn inside_path(p: &Path) -> PathBuf {
    p.strip_prefix("/").unwrap_or(p).to_path_buf()
}

fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("{OLD}/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Build the container described by `spec` from `inputs`. Runs inside the new user and
/// mount namespaces, as the single thread of the holder.
pub fn build(
    spec: &ContainerSpec,
    mut inputs: Inputs,
    inside: InsideIds,
) -> Result<Container, RootfsError> {
    stage()?;
    let squashfuse = mount_image(&inputs)?;
    let result = assemble(spec, &inputs, inside);
    match result {
        Ok(Assembled {
            env,
            workdir,
            start,
        }) => Ok(Container {
            squashfuse,
            env,
            workdir,
            start,
            hold: inputs.hold.take(),
        }),
        Err(e) => {
            if let Some(mut child) = squashfuse {
                let _ = child.kill();
                let _ = child.wait();
            }
            Err(e)
        }
    }
}

/// What the container tree, once built, tells the caller.
struct Assembled {
    env: Vec<(String, String)>,
    workdir: PathBuf,
    start: ImageStart,
}

fn assemble(
    spec: &ContainerSpec,
    inputs: &Inputs,
    inside: InsideIds,
) -> Result<Assembled, RootfsError> {
    let (binds, _sources) = plan_binds(spec, inputs)?;
    let lower = Path::new(LOWER);
    let mut missing = Vec::new();
    for bind in &binds {
        let resolved = resolve_in_tree(lower, &inside_path(&bind.target))
            .map_err(setup("resolving mount targets"))?;
        if fs::symlink_metadata(lower.join(&resolved)).is_err() {
            missing.push((resolved, bind.is_dir));
        }
    }
    let mut overlay = spec.unpacked.is_none() && (spec.writable || !missing.is_empty());
    if overlay && !spec.writable && inputs.hold.is_some() {
        // The `unpack` provider's tree is the user's own copy, shared by their containers:
        // an empty mount point added to it changes nothing they see, and saves an overlay,
        // whose cold directory cache in every new container made `find /` 7x slower.
        let added = missing
            .iter()
            .try_for_each(|(rel, is_dir)| create_mount_point(lower, rel, *is_dir));
        match added {
            Ok(()) => overlay = false,
            Err(e) => tracing::debug!("mount points not added to the unpacked tree ({e}): overlay"),
        }
    }
    if spec.unpacked.is_some() {
        // The user's own copy: mount points go into it, and writes stay in it.
        for (rel, is_dir) in &missing {
            create_mount_point(lower, rel, *is_dir).map_err(setup("creating mount points"))?;
        }
        bind_mount(Path::new(LOWER), Path::new(NEW), true).map_err(|source| {
            RootfsError::Mount {
                what: "the unpacked container".into(),
                target: "/".into(),
                source,
            }
        })?;
    } else if overlay {
        mount_overlay(spec, &missing)?;
    } else {
        bind_mount(Path::new(LOWER), Path::new(NEW), true).map_err(|source| {
            RootfsError::Mount {
                what: "the image".into(),
                target: "/".into(),
                source,
            }
        })?;
    }
    let newroot = File::open(NEW).map_err(setup("opening the new root"))?;
    write_identity_files(&newroot, spec, inside)?;
    for bind in &binds {
        bind_into(&newroot, bind).map_err(|source| RootfsError::Mount {
            what: bind.what.clone(),
            target: bind.target.clone(),
            source,
        })?;
    }
    let library_path = if inputs.host.has_libraries() {
        register_host_libraries(spec, &inputs.host)
    } else {
        None
    };
    let root_flags = MountAttrFlags::MOUNT_ATTR_NOSUID
        | MountAttrFlags::MOUNT_ATTR_NODEV
        | if spec.writable {
            MountAttrFlags::empty()
        } else {
            MountAttrFlags::MOUNT_ATTR_RDONLY
        };
    raw::mount_set_flags(Path::new(NEW), root_flags, false)
        .map_err(setup("making the root filesystem read-only"))?;
    drop(newroot);
    enter_new_root()?;
    if spec.remap_root && spec.writable {
        let_apt_stay_root();
    }
    let mut env = read_image_env();
    if let Some(dirs) = library_path {
        add_library_path(&mut env, &dirs);
    }
    let start = ImageStart::read(Path::new("/"), SMALL_FILE_LIMIT);
    let workdir = choose_workdir(spec, start.working_dir.as_deref())?;
    Ok(Assembled {
        env,
        workdir,
        start,
    })
}

/// Bind `bind.source` onto `bind.target` inside `newroot` (resolved within it), then set
/// its mount flags.
fn bind_into(newroot: &File, bind: &Bind) -> io::Result<()> {
    let target_fd = raw::open_in_root(newroot.as_fd(), &bind.target, libc::O_PATH, 0)?;
    bind_mount(&bind.source, &fd_path(&target_fd), bind.recursive)?;
    if bind.flags.is_empty() {
        return Ok(());
    }
    // Opened again: the first descriptor names the covered directory, not the new mount.
    let top = raw::open_in_root(newroot.as_fd(), &bind.target, libc::O_PATH, 0)?;
    raw::mount_set_flags(&fd_path(&top), bind.flags, bind.recursive)
}

/// Mount a tmpfs over the host's /tmp and make it the root; the host stays at /oldroot.
fn stage() -> Result<(), RootfsError> {
    mount(
        Some("ferry"),
        "/tmp",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=64m"),
    )
    .map_err(|e| setup("mounting the staging tmpfs")(nix_io(e)))?;
    std::env::set_current_dir("/tmp").map_err(setup("entering the staging tmpfs"))?;
    for dir in ["oldroot", "lower", "newroot", "rw", "files"] {
        fs::create_dir(dir).map_err(setup("creating staging directories"))?;
    }
    nix::unistd::pivot_root(".", "oldroot")
        .map_err(|e| setup("pivot_root into the staging tmpfs")(nix_io(e)))?;
    std::env::set_current_dir("/").map_err(setup("entering the staging root"))?;
    Ok(())
}

fn mount_image(inputs: &Inputs) -> Result<Option<Child>, RootfsError> {
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
            Ok(None)
        }
        ImageKind::Squashfs { offset, .. } => mount_squashfs(inputs, offset).map(Some),
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
    let options = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions",
        fuse.as_raw_fd()
    );
    mount(
        Some(inputs.image_path.as_os_str()),
        LOWER,
        Some("fuse.squashfuse"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .map_err(|e| RootfsError::ImageMount {
        path: inputs.image_path.clone(),
        detail: format!("FUSE mount refused: {e}"),
    })?;

    const IMAGE_FD: i32 = 3;
    const FUSE_FD: i32 = 4;
    let log_path = Path::new(FILES).join("squashfuse.log");
    let log = File::create(&log_path).map_err(setup("creating the squashfuse log"))?;
    let mut cmd = Command::new(program);
    cmd.arg("-f");
    if offset > 0 {
        cmd.arg("-o").arg(format!("offset={offset}"));
    }
    cmd.arg(format!("/proc/self/fd/{IMAGE_FD}"))
        .arg(format!("/dev/fd/{FUSE_FD}"))
        .stdin(host_null()?)
        .stdout(host_null()?)
        .stderr(log);
    // squashfuse is a host program: it runs in the host tree (its libraries, its loader),
    // while the connection it serves is already mounted in the staging tree.
    raw::pass_fds_and_chroot_on_exec(
        &mut cmd,
        &[(inputs.image.as_fd(), IMAGE_FD), (fuse.as_fd(), FUSE_FD)],
        Path::new(OLD),
        true,
    )
    .map_err(setup("preparing squashfuse"))?;
    let mut child = cmd.spawn().map_err(|e| RootfsError::ImageMount {
        path: inputs.image_path.clone(),
        detail: format!("cannot start {}: {e}", program.display()),
    })?;
    // The first request waits for squashfuse to answer; if it dies first, the connection is
    // aborted and this fails instead of hanging.
    let started = Instant::now();
    loop {
        match fs::metadata(LOWER) {
            Ok(_) => return Ok(child),
            Err(e) => {
                let exited = child.try_wait().ok().flatten();
                if exited.is_some() || started.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    let detail = log
                        .lines()
                        .rfind(|l| !l.trim().is_empty())
                        .map(str::to_string)
                        .unwrap_or_else(|| e.to_string());
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

/// /dev/null while the host tree is at /oldroot (`Stdio::null` would look for /dev/null).
fn host_null() -> Result<File, RootfsError> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new(OLD).join("dev/null"))
        .map_err(setup("opening /dev/null"))
}

fn bind_mount(source: &Path, target: &Path, recursive: bool) -> io::Result<()> {
    let flags = MsFlags::MS_BIND
        | if recursive {
            MsFlags::MS_REC
        } else {
            MsFlags::empty()
        };
    mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(nix_io)
}

/// An overlay over the image with its upper layer on a tmpfs. Mount points the image
/// lacks are created in the upper layer first, so the image itself never changes.
fn mount_overlay(spec: &ContainerSpec, missing: &[(PathBuf, bool)]) -> Result<(), RootfsError> {
    let size = spec.site.writable_tmpfs_size.as_deref().unwrap_or("50%");
    let opts = format!("mode=0755,size={size}");
    mount(
        Some("ferry-rw"),
        RW,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|e| setup("mounting the writable layer")(nix_io(e)))?;
    let upper = Path::new(RW).join("upper");
    let work = Path::new(RW).join("work");
    fs::create_dir(&upper).map_err(setup("creating the upper layer"))?;
    fs::create_dir(&work).map_err(setup("creating the overlay work directory"))?;
    fs::set_permissions(
        &upper,
        fs::Permissions::from_mode(
            fs::metadata(LOWER)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o755),
        ),
    )
    .map_err(setup("setting the root's mode"))?;
    for (rel, is_dir) in missing {
        create_mount_point(&upper, rel, *is_dir).map_err(setup("creating mount points"))?;
    }
    let base = format!(
        "lowerdir={LOWER},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    let mut last_err = None;
    for extra in [",userxattr", ""] {
        let opts = format!("{base}{extra}");
        match mount(
            Some("overlay"),
            NEW,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(opts.as_str()),
        ) {
            Ok(()) => return Ok(()),
            Err(e) => last_err = Some(e),
        }
    }
    Err(RootfsError::Mount {
        what: "the writable overlay".into(),
        target: "/".into(),
        source: nix_io(last_err.expect("tried at least once")),
    })
}

/// Create `rel` (and missing parents, with the modes the image gives them) in `upper`.
fn create_mount_point(upper: &Path, rel: &Path, is_dir: bool) -> io::Result<()> {
    let mut prefix = PathBuf::new();
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        prefix.push(part);
        let last = i + 1 == parts.len();
        let path = upper.join(&prefix);
        if fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        // Another container of the same tree may make it at the same moment.
        let made = if last && !is_dir {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path)
                .map(drop)
        } else {
            let mode = fs::metadata(Path::new(LOWER).join(&prefix))
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o755);
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&path)
                .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(mode)))
        };
        match made {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
    }
    Ok(())
}

fn plan_binds(
    spec: &ContainerSpec,
    inputs: &Inputs,
) -> Result<(Vec<Bind>, Vec<OwnedFd>), RootfsError> {
    let mut held = Vec::new();
    let host_root = File::open(OLD).map_err(setup("opening the host's root"))?;
    let name_service = name_service_binds(&host_root, &mut held);
    let mut reopen = |s: &Source| -> Result<PathBuf, RootfsError> {
        // It opened a moment ago, as the user: whatever fails now means it was replaced.
        let fd = s
            .reopen(&host_root)
            .map_err(|e| RootfsError::SourceReplaced {
                path: s.path.clone(),
                source: e,
            })?;
        let path = fd_path(&fd);
        held.push(fd);
        Ok(path)
    };
    let host = |p: &str| PathBuf::from(format!("{OLD}{p}"));
    let guard = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
    let mut binds = vec![
        Bind {
            what: "/proc".into(),
            source: host("/proc"),
            target: "/proc".into(),
            is_dir: true,
            recursive: true,
            flags: MountAttrFlags::empty(),
        },
        Bind {
            what: "/sys".into(),
            source: host("/sys"),
            target: "/sys".into(),
            is_dir: true,
            recursive: true,
            flags: MountAttrFlags::empty(),
        },
        Bind {
            what: "/dev".into(),
            source: if inputs.host.hidden_dev_entries.is_empty() {
                host("/dev")
            } else {
                dev_tree(&inputs.host.hidden_dev_entries)?
            },
            target: "/dev".into(),
            is_dir: true,
            recursive: true,
            flags: MountAttrFlags::MOUNT_ATTR_NOSUID,
        },
        Bind {
            what: "/tmp".into(),
            source: host("/tmp"),
            target: "/tmp".into(),
            is_dir: true,
            recursive: true,
            flags: guard,
        },
    ];
    if let Some(home) = &inputs.home {
        binds.push(Bind {
            what: format!("home {}", spec.user.home.display()),
            source: reopen(home)?,
            target: spec.user.home.clone(),
            is_dir: home.is_dir,
            recursive: true,
            flags: guard,
        });
    }
    binds.extend(name_service);
    for file in ["passwd", "group"] {
        binds.push(Bind {
            what: format!("/etc/{file}"),
            source: Path::new(FILES).join(file),
            target: PathBuf::from("/etc").join(file),
            is_dir: false,
            recursive: false,
            flags: guard | MountAttrFlags::MOUNT_ATTR_RDONLY,
        });
    }
    for (m, source) in &inputs.mounts {
        binds.push(Bind {
            what: m.source.display().to_string(),
            source: reopen(source)?,
            target: m.target.clone(),
            is_dir: source.is_dir,
            recursive: true,
            flags: guard
                | if m.read_only {
                    MountAttrFlags::MOUNT_ATTR_RDONLY
                } else {
                    MountAttrFlags::empty()
                },
        });
    }
    for (target, source) in &inputs.host_binds {
        binds.push(Bind {
            what: format!("host file {}", source.path.display()),
            source: reopen(source)?,
            target: target.clone(),
            is_dir: source.is_dir,
            recursive: source.is_dir,
            flags: guard | MountAttrFlags::MOUNT_ATTR_RDONLY,
        });
    }
    Ok((binds, held))
}

/// The host's name service files, so that names resolve inside as on the host (images
/// ship an empty resolv.conf and a minimal hosts): resolv.conf and hosts always, and
/// nsswitch.conf where the image has none. Looked up with the host's root (at /oldroot
/// by now) as `/`, so a symlinked /etc/resolv.conf (systemd-resolved) means what it means
/// on the host; the descriptors go into `held`.
fn name_service_binds(host_root: &File, held: &mut Vec<OwnedFd>) -> Vec<Bind> {
    let mut binds = Vec::new();
    for (file, only_if_image_lacks) in [
        ("/etc/resolv.conf", false),
        ("/etc/hosts", false),
        ("/etc/nsswitch.conf", true),
    ] {
        let rel = inside_path(Path::new(file));
        if only_if_image_lacks && image_has_file(&rel) {
            continue;
        }
        let opened = raw::open_in_root(host_root.as_fd(), &rel, libc::O_PATH | libc::O_CLOEXEC, 0)
            .and_then(|fd| {
                let meta = File::from(fd.try_clone()?).metadata()?;
                Ok((fd, meta.is_file()))
            });
        match opened {
            Ok((fd, true)) => {
                binds.push(Bind {
                    what: format!("the host's {file}"),
                    source: fd_path(&fd),
                    target: file.into(),
                    is_dir: false,
                    recursive: false,
                    flags: MountAttrFlags::MOUNT_ATTR_NOSUID
                        | MountAttrFlags::MOUNT_ATTR_NODEV
                        | MountAttrFlags::MOUNT_ATTR_RDONLY,
                });
                held.push(fd);
            }
            Ok((_, false)) => tracing::debug!("the host's {file} is not a file: not bound"),
            Err(e) => tracing::debug!("the host's {file} is not bound: {e}"),
        }
    }
    binds
}

/// Whether the image (at /lower) has `rel`, following its symlinks as the container would.
fn image_has_file(rel: &Path) -> bool {
    let lower = Path::new(LOWER);
    resolve_in_tree(lower, rel).is_ok_and(|r| fs::metadata(lower.join(r)).is_ok())
}

/// The container's /dev when some of the host's NVIDIA nodes must not show: a directory on
/// the staging tmpfs with every other entry of the host's /dev bound onto an entry of its
/// own (directories with what is mounted below them: pts, shm, mqueue), symlinks copied.
fn dev_tree(hidden: &[String]) -> Result<PathBuf, RootfsError> {
    use std::os::unix::ffi::OsStrExt;
    let tree = Path::new(FILES).join("dev");
    fs::create_dir(&tree).map_err(setup("creating /dev"))?;
    fs::set_permissions(&tree, fs::Permissions::from_mode(0o755))
        .map_err(setup("creating /dev"))?;
    let host_dev = Path::new(OLD).join("dev");
    let entries = fs::read_dir(&host_dev).map_err(setup("reading the host's /dev"))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if hidden.iter().any(|h| h.as_bytes() == name.as_bytes()) {
            continue;
        }
        let (source, target) = (host_dev.join(&name), tree.join(&name));
        let made = entry.file_type().and_then(|kind| {
            if kind.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&source)?, &target)
            } else if kind.is_dir() {
                fs::create_dir(&target)?;
                bind_mount(&source, &target, true)
            } else {
                File::create(&target)?;
                bind_mount(&source, &target, false)
            }
        });
        if let Err(e) = made {
            // One unusual entry (a node the user may not even stat) must not fail the step.
            tracing::debug!("leaving /dev/{} out: {e}", name.to_string_lossy());
            let _ = fs::remove_file(&target).or_else(|_| fs::remove_dir(&target));
        }
    }
    Ok(tree)
}

/// Make the image's loader find the host libraries bound in: the image's own ldconfig,
/// run in the container tree as the user, writes a cache of the image's libraries and the
/// host's (listed first, so the host's driver wins over any copy in the image), which then
/// stands in for the image's /etc/ld.so.cache. Returns the directories for
/// `LD_LIBRARY_PATH` when that cannot be done (an image without glibc's ldconfig).
fn register_host_libraries(spec: &ContainerSpec, host: &HostFiles) -> Option<String> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if !host.libraries.is_empty() {
        dirs.push(gpu::HOST_LIB_DIR.into());
    }
    dirs.extend(host.library_dirs.iter().cloned());
    let search = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    match run_image_ldconfig(spec, &dirs) {
        Ok(()) => None,
        Err(why) => {
            tracing::info!("host libraries through LD_LIBRARY_PATH: {why}");
            Some(search)
        }
    }
}

fn run_image_ldconfig(spec: &ContainerSpec, dirs: &[PathBuf]) -> Result<(), String> {
    let newroot = Path::new(NEW);
    let ldconfig = ["/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .into_iter()
        .find(|p| {
            resolve_in_tree(newroot, &inside_path(Path::new(p)))
                .is_ok_and(|r| newroot.join(r).is_file())
        })
        .ok_or("the image has no ldconfig")?;
    let work = Path::new(FILES).join("ldconfig");
    fs::create_dir(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    // The host's directories first, so the host's driver wins over any copy in the image.
    let mut conf: String = dirs.iter().map(|d| format!("{}\n", d.display())).collect();
    conf.push_str("include /etc/ld.so.conf\n");
    fs::write(work.join("ld.so.conf"), conf).map_err(|e| e.to_string())?;
    let work_dir = File::open(&work).map_err(|e| e.to_string())?;
    let log = File::create(Path::new(FILES).join("ldconfig.log")).map_err(|e| e.to_string())?;
    const WORK_FD: i32 = 3;
    let via = format!("/proc/self/fd/{WORK_FD}");
    let mut cmd = Command::new(ldconfig);
    cmd.arg("-X")
        .arg("-f")
        .arg(format!("{via}/ld.so.conf"))
        .arg("-C")
        .arg(format!("{via}/ld.so.cache"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(host_null().map_err(|e| e.to_string())?)
        .stdout(host_null().map_err(|e| e.to_string())?)
        .stderr(log);
    // The image's ldconfig, in the image's tree: it reads the image's own configuration
    // and writes its cache format for the image's loader.
    raw::pass_fds_and_chroot_on_exec(
        &mut cmd,
        &[(work_dir.as_fd(), WORK_FD)],
        Path::new(NEW),
        false,
    )
    .map_err(|e| e.to_string())?;
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run the image's {ldconfig}: {e}"))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > Duration::from_secs(60) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the image's {ldconfig} took over 60 s"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(e.to_string()),
        }
    };
    let cache = work.join("ld.so.cache");
    if !status.success() || !cache.is_file() {
        let log = fs::read_to_string(Path::new(FILES).join("ldconfig.log")).unwrap_or_default();
        return Err(format!(
            "the image's {ldconfig} failed ({status}): {}",
            log.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("")
        ));
    }
    tracing::debug!("ldconfig took {:?}", started.elapsed());
    install_loader_cache(spec, &cache)
}

/// Put `cache` at /etc/ld.so.cache in the container tree: written into a writable tree (so
/// that an ldconfig run later inside, e.g. by apt, can replace it), bound over the image's
/// otherwise.
fn install_loader_cache(spec: &ContainerSpec, cache: &Path) -> Result<(), String> {
    let target = Path::new(NEW).join("etc/ld.so.cache");
    if spec.writable || spec.unpacked.is_some() {
        let copied = fs::read(cache).and_then(|data| {
            let _ = fs::remove_file(&target);
            fs::write(&target, data)
        });
        match copied {
            Ok(()) => return Ok(()),
            Err(e) => tracing::debug!("cannot write {}: {e}; binding it", target.display()),
        }
    }
    let newroot = File::open(NEW).map_err(|e| e.to_string())?;
    let bind = Bind {
        what: "the loader cache".into(),
        source: cache.to_path_buf(),
        target: "/etc/ld.so.cache".into(),
        is_dir: false,
        recursive: false,
        flags: MountAttrFlags::MOUNT_ATTR_RDONLY
            | MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV,
    };
    bind_into(&newroot, &bind)
        .map_err(|e| format!("cannot bind the loader cache over /etc/ld.so.cache: {e}"))
}

fn read_from_new_root(newroot: &File, path: &str) -> String {
    raw::open_in_root(newroot.as_fd(), Path::new(path), libc::O_RDONLY, 0)
        .ok()
        .and_then(|fd| image::read_small_text(File::from(fd), SMALL_FILE_LIMIT).ok())
        .unwrap_or_default()
}

fn write_identity_files(
    newroot: &File,
    spec: &ContainerSpec,
    inside: InsideIds,
) -> Result<(), RootfsError> {
    let shell = if raw::open_in_root(newroot.as_fd(), &spec.user.shell, libc::O_PATH, 0).is_ok() {
        spec.user.shell.display().to_string()
    } else {
        "/bin/sh".to_string()
    };
    let passwd = user::passwd_with_user(
        &read_from_new_root(newroot, "/etc/passwd"),
        &spec.user,
        inside,
        &shell,
    );
    let group = user::group_with_user(
        &read_from_new_root(newroot, "/etc/group"),
        &spec.user.group_name(),
        &spec.user.name,
        inside,
    );
    for (name, text) in [("passwd", passwd), ("group", group)] {
        let path = Path::new(FILES).join(name);
        fs::write(&path, text).map_err(setup("writing passwd/group"))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
            .map_err(setup("writing passwd/group"))?;
    }
    Ok(())
}

/// Make /newroot the root and drop every other mount of the staging tree.
fn enter_new_root() -> Result<(), RootfsError> {
    std::env::set_current_dir(NEW).map_err(setup("entering the new root"))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it then
    // leaves only the container tree, with no directory needed for the old root.
    nix::unistd::pivot_root(".", ".")
        .map_err(|e| setup("pivot_root into the container")(nix_io(e)))?;
    nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| setup("detaching the host tree")(nix_io(e)))?;
    std::env::set_current_dir("/").map_err(setup("entering the container root"))?;
    Ok(())
}

/// apt switches to its `_apt` user to download, and that fails where only one uid is
/// mapped (`setgroups: Operation not permitted`). With `--remap-root --writable`, which
/// is how users install packages into an image, tell apt to stay root, as enroot does.
/// `ferry save` leaves the file out of saved images.
fn let_apt_stay_root() {
    let dir = Path::new("/etc/apt/apt.conf.d");
    if !dir.is_dir() {
        return;
    }
    let text = "// Written by ferry for --remap-root: only one uid is mapped, so apt must not\n\
                // switch to its _apt user. Not part of saved images.\n\
                APT::Sandbox::User \"root\";\n";
    if let Err(e) = fs::write(dir.join(unpacked::APT_REMAP_ROOT_FILE), text) {
        tracing::debug!("not configuring apt for --remap-root: {e}");
    }
}

/// Put `dirs` in front of the image's `LD_LIBRARY_PATH`.
fn add_library_path(env: &mut Vec<(String, String)>, dirs: &str) {
    match env.iter_mut().find(|(k, _)| k == "LD_LIBRARY_PATH") {
        Some((_, v)) if !v.is_empty() => *v = format!("{dirs}:{v}"),
        Some((_, v)) => *v = dirs.to_string(),
        None => env.push(("LD_LIBRARY_PATH".into(), dirs.to_string())),
    }
}

fn read_image_env() -> Vec<(String, String)> {
    File::open("/etc/environment")
        .ok()
        .and_then(|f| image::read_small_text(f, SMALL_FILE_LIMIT).ok())
        .map(|t| crate::container::env::parse_environment_file(&t))
        .unwrap_or_default()
}

/// The explicit workdir (which must exist), else the caller's directory when it exists
/// inside, else the image's WorkingDir, else home, else `/`. When the image's own start
/// command runs (`entrypoint`), its WorkingDir comes before the caller's directory, as
/// the image's author meant it to.
fn choose_workdir(spec: &ContainerSpec, image_dir: Option<&Path>) -> Result<PathBuf, RootfsError> {
    if let Some(dir) = &spec.workdir {
        return if dir.is_dir() {
            Ok(dir.clone())
        } else {
            Err(RootfsError::NoWorkdir(dir.clone()))
        };
    }
    let image_dir = image_dir.map(Path::to_path_buf);
    let candidates = if spec.entrypoint {
        [image_dir, spec.cwd.clone(), Some(spec.user.home.clone())]
    } else {
        [spec.cwd.clone(), image_dir, Some(spec.user.home.clone())]
    };
    Ok(candidates
        .into_iter()
        .flatten()
        .find(|d| d.is_absolute() && d.is_dir())
        .unwrap_or_else(|| "/".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn resolve_follows_symlinks_inside_the_tree() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("usr/home")).unwrap();
        symlink("/usr/home", r.join("home")).unwrap();
        symlink("../../etc/shadow-escape", r.join("usr/home/esc")).unwrap();
        symlink("../run/resolve/stub", r.join("usr/resolv")).unwrap();
        assert_eq!(
            resolve_in_tree(r, Path::new("home/alice")).unwrap(),
            PathBuf::from("usr/home/alice")
        );
        assert_eq!(
            resolve_in_tree(r, Path::new("usr/resolv")).unwrap(),
            PathBuf::from("run/resolve/stub")
        );
        // `..` beyond the root stays at the root.
        assert_eq!(
            resolve_in_tree(r, Path::new("usr/home/esc")).unwrap(),
            PathBuf::from("etc/shadow-escape")
        );
        symlink("/../../../..", r.join("up")).unwrap();
        assert_eq!(
            resolve_in_tree(r, Path::new("up/x")).unwrap(),
            PathBuf::from("x")
        );
    }

    #[test]
    fn resolve_stops_symlink_loops() {
        let root = tempfile::tempdir().unwrap();
        symlink("b", root.path().join("a")).unwrap();
        symlink("a", root.path().join("b")).unwrap();
        assert!(resolve_in_tree(root.path(), Path::new("a/x")).is_err());
    }
}

//! Building a container's root filesystem inside its new mount namespace: the image at
//! the staging tree's `/lower`, the container tree at `/newroot` (a bind or a writable
//! overlay), its binds and identity files, then `/newroot` as the root (see
//! [`super::staging`] for the layout).

use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Child;

use nix::mount::{mount, MsFlags};
use rustix::mount::MountAttrFlags;

use crate::container::phases::{Phase, Phases};
use crate::image;
use crate::rootfs::error::{nix_io, setup, RootfsError};
use crate::rootfs::inputs::Inputs;
use crate::rootfs::staging::{
    bind_mount, enter_new_root, inside_path, resolve_in_tree, stage, FILES, LOWER, NEW, OLD, RW,
};
use crate::rootfs::{binds, loader, squashfuse, unpacked};
use crate::spec::entrypoint::ImageStart;
use crate::spec::user::{self, InsideIds};
use crate::spec::{ContainerSpec, DefaultWorkdir};
use crate::sys::raw;

/// Largest text file read from an image (passwd, group, environment).
const SMALL_FILE_LIMIT: u64 = 4 << 20;

/// A container whose root is in place: what the holder keeps alive and reports.
pub struct Container {
    pub squashfuse: Option<Child>,
    pub env: Vec<(String, String)>,
    pub workdir: PathBuf,
    pub start: ImageStart,
    /// Kept for the container's life (see [`Inputs`]).
    pub hold: Option<nix::fcntl::Flock<File>>,
    /// Closed as the holder exits: a background unpack tied to the container ends then.
    pub unpack_tie: Option<crate::rootfs::unpacked::TiedUnpack>,
    /// How long each phase of the build took.
    pub phases: Vec<Phase>,
}

/// Build the container described by `spec` from `inputs`. Runs inside the new user and
/// mount namespaces, as the single thread of the holder.
pub fn build(
    spec: &ContainerSpec,
    mut inputs: Inputs,
    inside: InsideIds,
    mut phases: Phases,
) -> Result<Container, RootfsError> {
    stage()?;
    phases.end("staging tmpfs");
    let mut squashfuse = squashfuse::mount_image(&inputs, &mut phases)?;
    let result = (|| {
        // Made while squashfuse starts: the container's /dev needs nothing of the image.
        let dev = binds::dev_source(&inputs)?;
        if !inputs.host.hidden_dev_entries.is_empty() {
            phases.end("/dev");
        }
        if let Some(child) = squashfuse.as_mut() {
            squashfuse::wait_ready(&inputs, child)?;
            phases.end("squashfuse ready");
        }
        assemble(spec, &inputs, inside, &mut phases, dev)
    })();
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
            unpack_tie: inputs.unpack_tie.take(),
            phases: phases.into_vec(),
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
    phases: &mut Phases,
    dev: PathBuf,
) -> Result<Assembled, RootfsError> {
    let (sources, _held) = binds::open_sources(inputs, dev)?;
    phases.end("binds");
    let mut planned = binds::plan(&sources);
    let lower = Path::new(LOWER);
    let image_identity = keeps_image_identity(spec, lower);
    if image_identity {
        let generated = ["passwd", "group"].map(|f| Path::new(FILES).join(f));
        planned.retain(|b| !generated.contains(&b.source));
    }
    let mut missing = Vec::new();
    for bind in &planned {
        let resolved = resolve_in_tree(lower, &inside_path(&bind.target))
            .map_err(setup("resolving mount targets"))?;
        if fs::symlink_metadata(lower.join(&resolved)).is_err() {
            missing.push((resolved, bind.is_dir));
        }
    }
    phases.end("mount points");
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
    phases.end(if overlay { "overlay" } else { "root bind" });
    if !image_identity {
        write_identity_files(&newroot, spec, inside)?;
    }
    phases.end("passwd/group");
    for bind in &planned {
        let is_dev = bind.target == Path::new("/dev");
        if is_dev {
            phases.end("binds");
        }
        binds::bind_into(&newroot, bind).map_err(|source| RootfsError::Mount {
            what: bind.what.clone(),
            target: bind.target.clone(),
            source,
        })?;
        if is_dev {
            phases.end("/dev");
        }
    }
    phases.end("binds");
    let library_path = if inputs.host.has_libraries() {
        let path = loader::register_host_libraries(spec, &inputs.host);
        phases.end("ldconfig");
        path
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
    phases.end("pivot_root");
    if spec.remap_root && spec.writable {
        let_apt_stay_root();
    }
    let mut env = read_image_env();
    if spec.remap_root {
        // Root's home, where the home directory is mounted (enroot and pyxis do the same).
        crate::spec::env::set(&mut env, "HOME", "/root".into());
    }
    let locales = crate::rootfs::locale::ImageLocales::read(Path::new("/"));
    for (name, value) in locales.replacements(&spec.caller_locale) {
        if !env.iter().any(|(n, _)| *n == name) {
            tracing::debug!("{name}: the image lacks this locale, using {value}");
            crate::spec::env::set(&mut env, &name, value);
        }
    }
    if let Some(dirs) = library_path {
        loader::add_library_path(&mut env, &dirs);
    }
    let start = ImageStart::read(Path::new("/"), SMALL_FILE_LIMIT);
    let workdir = choose_workdir(spec, start.working_dir.as_deref())?;
    phases.end("image config");
    Ok(Assembled {
        env,
        workdir,
        start,
    })
}

/// An overlay over the image with its upper layer on a tmpfs. Mount points the image
/// lacks are created in the upper layer first, so the image itself never changes.
fn mount_overlay(spec: &ContainerSpec, missing: &[(PathBuf, bool)]) -> Result<(), RootfsError> {
    let (upper, work) = match &spec.overlay_layer {
        // The host's tree is at OLD while the container's is assembled.
        Some(layer) => {
            let layer = Path::new(OLD).join(layer.strip_prefix("/").unwrap_or(layer));
            (layer.join("upper"), layer.join("work"))
        }
        None => {
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
            (upper, work)
        }
    };
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

/// Whether a writable remap-root container keeps the image's own passwd and group files,
/// writable like the rest of its tree: root is the only user inside and the image names it
/// already, and package scripts add system users and groups (`addgroup --system crontab`),
/// which a read-only generated file would refuse.
fn keeps_image_identity(spec: &ContainerSpec, lower: &Path) -> bool {
    if !(spec.remap_root && spec.writable) {
        return false;
    }
    let names_id_0 = |file: &str| {
        let text = resolve_in_tree(lower, Path::new(file))
            .ok()
            .and_then(|rel| File::open(lower.join(rel)).ok())
            .and_then(|f| image::read_small_text(f, SMALL_FILE_LIMIT).ok())
            .unwrap_or_default();
        user::names_id_0(&text)
    };
    names_id_0("etc/passwd") && names_id_0("etc/group")
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
        &spec.home_inside(),
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

fn read_image_env() -> Vec<(String, String)> {
    File::open("/etc/environment")
        .ok()
        .and_then(|f| image::read_small_text(f, SMALL_FILE_LIMIT).ok())
        .map(|t| crate::spec::env::parse_environment_file(&t))
        .unwrap_or_default()
}

/// The explicit workdir (which must exist), else the caller's directory when it exists
/// inside, else the image's WorkingDir, else home, else `/`. The image's WorkingDir comes
/// first when the image's own start command runs (`entrypoint`), as the image's author
/// meant it, and where the site prefers pyxis' order (`default_workdir=image`).
fn choose_workdir(spec: &ContainerSpec, image_dir: Option<&Path>) -> Result<PathBuf, RootfsError> {
    if let Some(dir) = &spec.workdir {
        return if dir.is_dir() {
            Ok(dir.clone())
        } else {
            Err(RootfsError::NoWorkdir(dir.clone()))
        };
    }
    let image_dir = image_dir.map(Path::to_path_buf);
    let image_first = spec.entrypoint || spec.site.default_workdir == DefaultWorkdir::Image;
    let (caller_dir, home) = (spec.caller_dir_inside(), Some(spec.home_inside()));
    let candidates = if image_first {
        [image_dir, caller_dir, home]
    } else {
        [caller_dir, image_dir, home]
    };
    Ok(candidates
        .into_iter()
        .flatten()
        .find(|d| d.is_absolute() && d.is_dir())
        .unwrap_or_else(|| "/".into()))
}

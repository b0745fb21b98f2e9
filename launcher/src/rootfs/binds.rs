//! What is bound into the container tree: the plan (which host path goes where, with
//! which mount flags), a pure function of the sources opened for it, and the binding.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::mount::MountAttrFlags;

use crate::rootfs::error::{setup, RootfsError};
use crate::rootfs::inputs::{Inputs, Source};
use crate::rootfs::staging::{
    bind_mount, fd_path, inside_path, resolve_in_tree, FILES, LOWER, OLD,
};
use crate::spec::mounts::MountSpec;
use crate::sys::raw;

/// One bind into the container tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Bind {
    /// What it is, for error messages.
    pub(super) what: String,
    pub(super) source: PathBuf,
    pub(super) target: PathBuf,
    pub(super) is_dir: bool,
    pub(super) recursive: bool,
    pub(super) flags: MountAttrFlags,
    /// Made unbindable after it is mounted (pyxis' `unbindable` mount flag).
    pub(super) unbindable: bool,
}

/// A host path opened again inside the new mount namespace.
#[derive(Debug, Clone)]
pub(super) struct Reopened {
    /// The path as the user gave it (or as found on the host).
    pub(super) host_path: PathBuf,
    /// Where it is now: its descriptor under the host's /proc/self/fd.
    pub(super) source: PathBuf,
    pub(super) is_dir: bool,
}

/// The sources of a container's binds, opened inside its new mount namespace.
#[derive(Debug, Clone)]
pub(super) struct BindSources {
    /// The host's /dev, or a copy without the GPU nodes the container must not see.
    pub(super) dev: PathBuf,
    /// Where the home directory goes inside, and its source.
    pub(super) home: Option<(PathBuf, Reopened)>,
    /// The host's name service files that are bound: (the file, its source).
    pub(super) name_service: Vec<(&'static str, PathBuf)>,
    pub(super) mounts: Vec<(MountSpec, Reopened)>,
    /// The host's files for the container: (the place inside, the file).
    pub(super) host_files: Vec<(PathBuf, Reopened)>,
}

/// Open the sources of the binds of `inputs` from inside the new mount namespace; the
/// descriptors returned must stay open until the binds are made.
pub(super) fn open_sources(
    inputs: &Inputs,
    dev: PathBuf,
) -> Result<(BindSources, Vec<OwnedFd>), RootfsError> {
    let mut held = Vec::new();
    let host_root = File::open(OLD).map_err(setup("opening the host's root"))?;
    let name_service = name_service_sources(&host_root, &mut held);
    let mut reopen = |s: &Source| -> Result<Reopened, RootfsError> {
        // It opened a moment ago, as the user: whatever fails now means it was replaced.
        let fd = s
            .reopen(&host_root)
            .map_err(|e| RootfsError::SourceReplaced {
                path: s.path.clone(),
                source: e,
            })?;
        let reopened = Reopened {
            host_path: s.path.clone(),
            source: fd_path(&fd),
            is_dir: s.is_dir,
        };
        held.push(fd);
        Ok(reopened)
    };
    let home = inputs
        .home
        .as_ref()
        .map(|(target, s)| Ok::<_, RootfsError>((target.clone(), reopen(s)?)))
        .transpose()?;
    let mounts = inputs
        .mounts
        .iter()
        .enumerate()
        .map(|(i, (m, s))| match (s, &m.tmpfs) {
            (Some(s), _) => Ok((m.clone(), reopen(s)?)),
            (None, options) => Ok((m.clone(), new_tmpfs(i, options.as_deref().unwrap_or(""))?)),
        })
        .collect::<Result<_, RootfsError>>()?;
    let host_files = inputs
        .host_binds
        .iter()
        .map(|(target, s)| Ok((target.clone(), reopen(s)?)))
        .collect::<Result<_, RootfsError>>()?;
    let sources = BindSources {
        dev,
        home,
        name_service,
        mounts,
        host_files,
    };
    Ok((sources, held))
}

/// The source of the container's /dev: the host's, or a copy without the GPU nodes it
/// must not see (see [`dev_tree`]).
pub(super) fn dev_source(inputs: &Inputs) -> Result<PathBuf, RootfsError> {
    if inputs.host.hidden_dev_entries.is_empty() {
        Ok(Path::new(OLD).join("dev"))
    } else {
        dev_tree(&inputs.host.hidden_dev_entries)
    }
}

/// A new tmpfs for the user's mount number `index`, on the staging tmpfs, to be bound
/// where the user asked like any other mount.
fn new_tmpfs(index: usize, options: &str) -> Result<Reopened, RootfsError> {
    let dir = Path::new(FILES).join(format!("tmpfs-{index}"));
    fs::create_dir(&dir).map_err(setup("creating a tmpfs"))?;
    nix::mount::mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(options),
    )
    .map_err(|e| RootfsError::Mount {
        what: format!("tmpfs ({options})"),
        target: dir.clone(),
        source: crate::rootfs::error::nix_io(e),
    })?;
    Ok(Reopened {
        host_path: "tmpfs".into(),
        source: dir,
        is_dir: true,
    })
}

/// The binds of a container, in the order they are made: the host's /proc, /sys, /dev and
/// /tmp, the home directory, the host's name service files, the generated passwd and
/// group, the user's mounts, then the host's files (GPU libraries and tools). Nothing is
/// set-uid or a device node except in /dev; the generated and host files are read-only.
pub(super) fn plan(sources: &BindSources) -> Vec<Bind> {
    const NOSUID: MountAttrFlags = MountAttrFlags::MOUNT_ATTR_NOSUID;
    const NODEV: MountAttrFlags = MountAttrFlags::MOUNT_ATTR_NODEV;
    const RDONLY: MountAttrFlags = MountAttrFlags::MOUNT_ATTR_RDONLY;
    let guard = NOSUID | NODEV;
    let host_tree = |dir: &str, source: PathBuf, flags| Bind {
        what: dir.into(),
        source,
        target: dir.into(),
        is_dir: true,
        recursive: true,
        flags,
        unbindable: false,
    };
    let host = |dir: &str| Path::new(OLD).join(inside_path(Path::new(dir)));
    let mut binds = vec![
        host_tree("/proc", host("/proc"), MountAttrFlags::empty()),
        host_tree("/sys", host("/sys"), MountAttrFlags::empty()),
        host_tree("/dev", sources.dev.clone(), NOSUID),
        host_tree("/tmp", host("/tmp"), guard),
    ];
    if let Some((target, home)) = &sources.home {
        binds.push(Bind {
            what: format!("home {}", home.host_path.display()),
            source: home.source.clone(),
            target: target.clone(),
            is_dir: home.is_dir,
            recursive: true,
            flags: guard,
            unbindable: false,
        });
    }
    for (file, source) in &sources.name_service {
        binds.push(Bind {
            what: format!("the host's {file}"),
            source: source.clone(),
            target: file.into(),
            is_dir: false,
            recursive: false,
            flags: guard | RDONLY,
            unbindable: false,
        });
    }
    for file in ["passwd", "group"] {
        binds.push(Bind {
            what: format!("/etc/{file}"),
            source: Path::new(FILES).join(file),
            target: PathBuf::from("/etc").join(file),
            is_dir: false,
            recursive: false,
            flags: guard | RDONLY,
            unbindable: false,
        });
    }
    for (m, source) in &sources.mounts {
        let mut flags = guard;
        flags.set(RDONLY, m.read_only);
        flags.set(MountAttrFlags::MOUNT_ATTR_NOEXEC, m.no_exec);
        binds.push(Bind {
            what: m.source.display().to_string(),
            source: source.source.clone(),
            target: m.target.clone(),
            is_dir: source.is_dir,
            recursive: true,
            flags,
            unbindable: m.unbindable,
        });
    }
    for (target, file) in &sources.host_files {
        binds.push(Bind {
            what: format!("host file {}", file.host_path.display()),
            source: file.source.clone(),
            target: target.clone(),
            is_dir: file.is_dir,
            recursive: file.is_dir,
            flags: guard | RDONLY,
            unbindable: false,
        });
    }
    binds
}

/// Bind `bind.source` onto `bind.target` inside `newroot` (resolved within it), then set
/// its mount flags.
pub(super) fn bind_into(newroot: &File, bind: &Bind) -> io::Result<()> {
    let target_fd = raw::open_in_root(newroot.as_fd(), &bind.target, libc::O_PATH, 0)?;
    bind_mount(&bind.source, &fd_path(&target_fd), bind.recursive)?;
    if bind.flags.is_empty() && !bind.unbindable {
        return Ok(());
    }
    // Opened again: the first descriptor names the covered directory, not the new mount.
    let top = raw::open_in_root(newroot.as_fd(), &bind.target, libc::O_PATH, 0)?;
    raw::mount_set_flags(&fd_path(&top), bind.flags, bind.recursive)?;
    if bind.unbindable {
        use rustix::mount::MountPropagationFlags as Propagation;
        rustix::mount::mount_change(fd_path(&top), Propagation::UNBINDABLE | Propagation::REC)?;
    }
    Ok(())
}

/// The host's name service files, so that names resolve inside as on the host (images
/// ship an empty resolv.conf and a minimal hosts): resolv.conf and hosts always, and
/// nsswitch.conf where the image has none. Looked up with the host's root (at /oldroot
/// by now) as `/`, so a symlinked /etc/resolv.conf (systemd-resolved) means what it means
/// on the host; the descriptors go into `held`. Returns each file with its source.
fn name_service_sources(host_root: &File, held: &mut Vec<OwnedFd>) -> Vec<(&'static str, PathBuf)> {
    let mut sources = Vec::new();
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
                sources.push((file, fd_path(&fd)));
                held.push(fd);
            }
            Ok((_, false)) => tracing::debug!("the host's {file} is not a file: not bound"),
            Err(e) => tracing::debug!("the host's {file} is not bound: {e}"),
        }
    }
    sources
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reopened(host_path: &str, fd: u32, is_dir: bool) -> Reopened {
        Reopened {
            host_path: host_path.into(),
            source: format!("/oldroot/proc/self/fd/{fd}").into(),
            is_dir,
        }
    }

    fn sources() -> BindSources {
        let mount = |source: &str, target: &str, read_only| {
            MountSpec::bind(source.into(), target.into(), read_only)
        };
        BindSources {
            dev: "/oldroot/dev".into(),
            home: Some(("/home/alice".into(), reopened("/home/alice", 10, true))),
            name_service: vec![("/etc/hosts", "/oldroot/proc/self/fd/11".into())],
            mounts: vec![
                (mount("/data", "/in", true), reopened("/data", 12, true)),
                (
                    mount("/scratch/f", "/f", false),
                    reopened("/scratch/f", 13, false),
                ),
            ],
            host_files: vec![
                (
                    "/usr/local/ferry/lib/libcuda.so.1".into(),
                    reopened("/usr/lib/libcuda.so.1", 14, false),
                ),
                ("/opt/site".into(), reopened("/opt/site", 15, true)),
            ],
        }
    }

    fn find<'a>(binds: &'a [Bind], target: &str) -> &'a Bind {
        binds
            .iter()
            .find(|b| b.target == Path::new(target))
            .unwrap_or_else(|| panic!("no bind at {target}"))
    }

    #[test]
    fn binds_come_in_mount_order() {
        let targets: Vec<PathBuf> = plan(&sources()).into_iter().map(|b| b.target).collect();
        let expected = [
            "/proc",
            "/sys",
            "/dev",
            "/tmp",
            "/home/alice",
            "/etc/hosts",
            "/etc/passwd",
            "/etc/group",
            "/in",
            "/f",
            "/usr/local/ferry/lib/libcuda.so.1",
            "/opt/site",
        ];
        assert_eq!(targets, expected.map(PathBuf::from));
    }

    #[test]
    fn every_bind_after_proc_sys_and_dev_is_nosuid_and_nodev() {
        use MountAttrFlags as F;
        let binds = plan(&sources());
        assert_eq!(find(&binds, "/proc").flags, F::empty());
        assert_eq!(find(&binds, "/sys").flags, F::empty());
        assert_eq!(find(&binds, "/dev").flags, F::MOUNT_ATTR_NOSUID);
        for b in &binds[3..] {
            assert!(
                b.flags.contains(F::MOUNT_ATTR_NOSUID | F::MOUNT_ATTR_NODEV),
                "{} may hold set-uid programs or devices",
                b.what
            );
        }
    }

    #[test]
    fn read_only_where_asked_and_for_generated_and_host_files() {
        let binds = plan(&sources());
        let read_only = |target| {
            find(&binds, target)
                .flags
                .contains(MountAttrFlags::MOUNT_ATTR_RDONLY)
        };
        for target in [
            "/in",
            "/etc/passwd",
            "/etc/group",
            "/etc/hosts",
            "/opt/site",
        ] {
            assert!(read_only(target), "{target} is writable");
        }
        for target in ["/f", "/home/alice", "/tmp", "/dev"] {
            assert!(!read_only(target), "{target} is read-only");
        }
    }

    #[test]
    fn sources_and_kinds_are_kept() {
        let binds = plan(&sources());
        let home = find(&binds, "/home/alice");
        assert_eq!(home.what, "home /home/alice");
        assert_eq!(home.source, Path::new("/oldroot/proc/self/fd/10"));
        let file = find(&binds, "/f");
        assert!(!file.is_dir && file.recursive);
        let lib = find(&binds, "/usr/local/ferry/lib/libcuda.so.1");
        assert_eq!(lib.what, "host file /usr/lib/libcuda.so.1");
        assert!(!lib.is_dir && !lib.recursive);
        let dir = find(&binds, "/opt/site");
        assert!(dir.is_dir && dir.recursive);
        assert_eq!(find(&binds, "/tmp").source, Path::new("/oldroot/tmp"));
        assert_eq!(
            find(&binds, "/etc/passwd").source,
            Path::new("/files/passwd")
        );
    }

    #[test]
    fn no_home_no_home_bind() {
        let mut s = sources();
        s.home = None;
        assert!(plan(&s).iter().all(|b| !b.what.starts_with("home ")));
    }

    #[test]
    fn home_goes_where_the_spec_puts_it() {
        let mut s = sources();
        s.home = Some(("/root".into(), reopened("/home/alice", 10, true)));
        let home = find(&plan(&s), "/root").clone();
        assert_eq!(home.what, "home /home/alice");
        assert!(plan(&s)
            .iter()
            .all(|b| b.target != Path::new("/home/alice")));
    }
}

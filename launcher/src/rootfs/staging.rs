//! The staging tree in the container's new mount namespace, its fixed places and the
//! mount helpers the building steps share.
//!
//! Layout while building (no host directory is created for it):
//! a tmpfs is mounted over the host's `/tmp` and made the root with `pivot_root`, so the
//! host tree is reachable at `/oldroot`; the image is mounted at `/lower`; the container
//! tree is assembled at `/newroot` (a bind of `/lower`, or an overlay with its upper layer
//! on the tmpfs at `/rw`); generated files live in `/files`. A last `pivot_root` makes
//! `/newroot` the root and the rest is detached, so it vanishes with the namespace.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, MsFlags};

use crate::rootfs::error::{nix_io, setup, RootfsError};

pub(super) const OLD: &str = "/oldroot";
pub(super) const LOWER: &str = "/lower";
pub(super) const NEW: &str = "/newroot";
pub(super) const RW: &str = "/rw";
pub(super) const FILES: &str = "/files";

/// Mount a tmpfs over the host's /tmp and make it the root; the host stays at /oldroot.
pub(super) fn stage() -> Result<(), RootfsError> {
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

/// Make /newroot the root and drop every other mount of the staging tree.
pub(super) fn enter_new_root() -> Result<(), RootfsError> {
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

/// `p` relative to `/`: the same path inside a tree.
pub(super) fn inside_path(p: &Path) -> PathBuf {
    p.strip_prefix("/").unwrap_or(p).to_path_buf()
}

/// The path of `fd` while the host's /proc is at /oldroot/proc.
pub(super) fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("{OLD}/proc/self/fd/{}", fd.as_raw_fd()))
}

/// /dev/null while the host tree is at /oldroot (`Stdio::null` would look for /dev/null).
pub(super) fn host_null() -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new(OLD).join("dev/null"))
}

pub(super) fn bind_mount(source: &Path, target: &Path, recursive: bool) -> io::Result<()> {
    let flags = MsFlags::MS_BIND
        | if recursive {
            MsFlags::MS_REC
        } else {
            MsFlags::empty()
        };
    mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(nix_io)
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

//! Whiteouts: what a layer deletes from the layers below it (`.wh.NAME`, the opaque
//! marker `.wh..wh..opq`), never reaching outside the tree.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::sys::stat::SFlag;

use super::tree::{kind_at, list_dir, parts_depth, remove_tree_at};
use super::{write_err, LayerError, Unpacker};
use crate::sys::raw;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// A name that deletes rather than adds (in a layer; other archives hold such names as
/// ordinary files).
pub(super) fn is_whiteout(name: &[u8]) -> bool {
    name.starts_with(WHITEOUT_PREFIX.as_bytes())
}

impl Unpacker {
    /// Apply the whiteout entry `name` (raw tar path `raw`) found in `parent_path`.
    pub(super) fn apply_whiteout(
        &mut self,
        raw: &[u8],
        parent_path: &Path,
        name: &[u8],
    ) -> Result<(), LayerError> {
        self.stats.whiteouts += 1;
        if name == OPAQUE_MARKER.as_bytes() {
            return self.make_opaque(parent_path);
        }
        match &name[WHITEOUT_PREFIX.len()..] {
            b"" | b"." | b".." => Err(LayerError::Unsafe {
                path: String::from_utf8_lossy(raw).into_owned(),
                why: "a whiteout must name an entry of its directory",
            }),
            // aufs' own bookkeeping (.wh..wh.plnk, .wh..wh.aufs): nothing to apply.
            t if t.starts_with(WHITEOUT_PREFIX.as_bytes()) => Ok(()),
            t => self.whiteout(parent_path, OsStr::from_bytes(t)),
        }
    }

    /// `.wh.NAME`: remove what lower layers put at `dir/NAME`.
    pub(super) fn whiteout(&mut self, dir: &Path, name: &OsStr) -> Result<(), LayerError> {
        let path = dir.join(name);
        if self.touched.contains(&path) {
            return Ok(());
        }
        let parent = match raw::open_in_root(
            self.root.as_fd(),
            &Path::new(".").join(dir),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        ) {
            Ok(fd) => fd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                return Ok(()); // nothing there to hide
            }
            Err(e) => return Err(write_err(&path)(e)),
        };
        remove_tree_at(parent.as_fd(), name, parts_depth(&path)).map_err(write_err(&path))?;
        self.forget_tree(&path);
        Ok(())
    }

    /// `.wh..wh..opq`: hide everything lower layers put in `dir`; keep this layer's.
    fn make_opaque(&mut self, dir: &Path) -> Result<(), LayerError> {
        let fd = self.ensure_dir(dir)?;
        self.prune(fd.as_fd(), dir)
    }

    fn prune(&mut self, dir_fd: BorrowedFd<'_>, dir: &Path) -> Result<(), LayerError> {
        for child in list_dir(dir_fd).map_err(write_err(dir))? {
            let path = dir.join(&child);
            if !self.touched.contains(&path) {
                remove_tree_at(dir_fd, &child, parts_depth(&path)).map_err(write_err(&path))?;
                self.forget_tree(&path);
            } else if kind_at(dir_fd, &child).map_err(write_err(&path))? == Some(SFlag::S_IFDIR) {
                let sub = raw::open_beneath_nofollow(
                    dir_fd,
                    Path::new(&child),
                    libc::O_RDONLY | libc::O_DIRECTORY,
                    0,
                )
                .map_err(write_err(&path))?;
                self.prune(sub.as_fd(), &path)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_layer::{apply, tree, Layer};

    #[test]
    fn whiteouts_and_opaque_directories() {
        let (_t, root) = tree();
        let lower = Layer::new()
            .dir("a", 0o755)
            .file("a/old", b"1", 0o644)
            .dir("a/sub", 0o555)
            .file("a/sub/deep", b"1", 0o644)
            .file("gone", b"1", 0o644)
            .dir("d", 0o755)
            .file("d/f", b"1", 0o644)
            .bytes();
        let upper = Layer::new()
            .file(".wh.gone", b"", 0o644)
            .dir("a", 0o755)
            .file("a/new", b"2", 0o644)
            .file("a/.wh..wh..opq", b"", 0o644)
            .file("d/.wh.f", b"", 0o644)
            .file(".wh.never-existed", b"", 0o644)
            .bytes();
        let out = apply(&root, &[lower, upper]).unwrap();
        assert!(!root.join("gone").exists());
        assert!(!root.join("a/old").exists());
        assert!(!root.join("a/sub").exists());
        assert_eq!(std::fs::read(root.join("a/new")).unwrap(), b"2");
        assert!(root.join("d").is_dir() && !root.join("d/f").exists());
        assert!(!root.join(".wh.gone").exists());
        assert_eq!(out.stats.whiteouts, 4);
        // The removed read-only directory no longer has a mode to restore.
        assert!(!out.modes.iter().any(|(p, _)| p.starts_with("a/sub")));
    }

    #[test]
    fn hostile_whiteouts() {
        let (t, root) = tree();
        std::fs::write(t.path().join("keep"), b"k").unwrap();
        let e = apply(&root, &[Layer::new().file("a/.wh...", b"", 0o644).bytes()]).unwrap_err();
        assert!(e.to_string().contains("whiteout"), "{e}");
        let l = Layer::new()
            .link(tar::EntryType::Symlink, "up", "..")
            .bytes();
        let l2 = Layer::new().file("up/.wh.keep", b"", 0o644).bytes();
        apply(&root, &[l, l2]).unwrap();
        assert!(t.path().join("keep").exists());
        let l = Layer::new()
            .link(tar::EntryType::Symlink, "out", t.path().to_str().unwrap())
            .bytes();
        let l2 = Layer::new().file("out/.wh..wh..opq", b"", 0o644).bytes();
        let _ = apply(&root, &[l, l2]);
        assert!(t.path().join("keep").exists());
    }
}

//! The entries a layer adds: directories (merged with lower layers'), regular files
//! (holes kept), symlinks (never followed) and hardlinks (only to entries already in the
//! tree), each written relative to its parent's descriptor.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::fcntl::AtFlags;
use nix::sys::stat::{mkdirat, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{linkat, symlinkat};

use super::tree::{copy_keeping_holes, kind_at};
use super::{
    errno_io, file_times, join, normalize, on_disk, write_err, DirMeta, LayerError, Unpacker,
    DIR_OWNER_BITS, FILE_OWNER_BITS,
};
use crate::sys::raw;

impl Unpacker {
    pub(super) fn make_dir(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        mode: u32,
        mtime: u64,
    ) -> Result<(), LayerError> {
        match kind_at(parent, name).map_err(write_err(path))? {
            Some(SFlag::S_IFDIR) => {} // directories merge with what lower layers made
            Some(_) => {
                self.replace(parent, name, path)?;
                mkdirat(
                    Some(parent.as_raw_fd()),
                    name,
                    Mode::from_bits_truncate(0o700),
                )
                .map_err(|e| write_err(path)(errno_io(e)))?;
            }
            None => mkdirat(
                Some(parent.as_raw_fd()),
                name,
                Mode::from_bits_truncate(0o700),
            )
            .map_err(|e| write_err(path)(errno_io(e)))?,
        }
        let fd = raw::open_beneath_nofollow(
            parent,
            Path::new(name),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .map_err(write_err(path))?;
        File::from(fd)
            .set_permissions(PermissionsExt::from_mode(on_disk(mode, DIR_OWNER_BITS)))
            .map_err(write_err(path))?;
        self.dirs.insert(path.into(), DirMeta { mode, mtime });
        Ok(())
    }

    pub(super) fn make_file<R: Read>(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        content: &mut R,
        mode: u32,
        mtime: u64,
    ) -> Result<(), LayerError> {
        self.replace(parent, name, path)?;
        let fd = raw::open_beneath_nofollow(
            parent,
            Path::new(name),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )
        .map_err(write_err(path))?;
        let mut file = File::from(fd);
        copy_keeping_holes(content, &mut file).map_err(|e| {
            // A short or corrupt stream is the layer's fault, not the disk's.
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
            ) {
                LayerError::Read(e)
            } else {
                write_err(path)(e)
            }
        })?;
        let disk_mode = on_disk(mode, FILE_OWNER_BITS);
        file.set_permissions(PermissionsExt::from_mode(disk_mode))
            .map_err(write_err(path))?;
        file.set_times(file_times(mtime)).map_err(write_err(path))?;
        if disk_mode != mode {
            self.modes.insert(path.into(), mode);
        }
        Ok(())
    }

    pub(super) fn make_hardlink(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        target: &[u8],
    ) -> Result<(), LayerError> {
        let target_parts = normalize(target)?;
        let Some((target_name, target_parent)) = target_parts.split_last() else {
            return Err(LayerError::Unsafe {
                path: path.display().to_string(),
                why: "a hardlink to the root directory",
            });
        };
        let target_path = join(&target_parts);
        if target_path == path {
            return Ok(());
        }
        let missing = || LayerError::Unsafe {
            path: path.display().to_string(),
            why: "a hardlink to something not unpacked before it",
        };
        let tparent = raw::open_in_root(
            self.root.as_fd(),
            &Path::new(".").join(join(target_parent)),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(|_| missing())?;
        match kind_at(tparent.as_fd(), target_name).map_err(write_err(path))? {
            None => return Err(missing()),
            Some(SFlag::S_IFDIR) => {
                return Err(LayerError::Unsafe {
                    path: path.display().to_string(),
                    why: "a hardlink to a directory",
                })
            }
            Some(_) => {}
        }
        self.replace(parent, name, path)?;
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        linkat(
            Some(tparent.as_raw_fd()),
            target_name.as_os_str(),
            Some(parent.as_raw_fd()),
            name,
            AtFlags::empty(),
        )
        .map_err(|e| write_err(path)(errno_io(e)))?;
        if let Some(m) = self.modes.get(&target_path).copied() {
            self.modes.insert(path.into(), m);
        }
        Ok(())
    }

    pub(super) fn make_symlink(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        target: &[u8],
        mtime: u64,
    ) -> Result<(), LayerError> {
        self.replace(parent, name, path)?;
        symlinkat(OsStr::from_bytes(target), Some(parent.as_raw_fd()), name)
            .map_err(|e| write_err(path)(errno_io(e)))?;
        let t = TimeSpec::new(mtime as i64, 0);
        let _ = utimensat(
            Some(parent.as_raw_fd()),
            name,
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::super::test_layer::{apply, tree, Layer};
    use super::super::LayerError;

    #[test]
    fn final_symlinks_are_replaced_not_followed() {
        let (t, root) = tree();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let l1 = Layer::new()
            .link(tar::EntryType::Symlink, "f", victim.to_str().unwrap())
            .bytes();
        let l2 = Layer::new()
            .file("f", b"overwritten", 0o644)
            .dir("f2", 0o755)
            .bytes();
        apply(&root, &[l1, l2]).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"overwritten");
        // A directory entry whose name is a symlink to a directory outside replaces it.
        let l3 = Layer::new()
            .link(tar::EntryType::Symlink, "d", t.path().to_str().unwrap())
            .bytes();
        let l4 = Layer::new()
            .dir("d", 0o777)
            .file("d/x", b"x", 0o644)
            .bytes();
        apply(&root, &[l3, l4]).unwrap();
        assert!(!t.path().join("x").exists());
        assert!(root.join("d").symlink_metadata().unwrap().is_dir());
    }

    #[test]
    fn hardlinks_only_to_entries_inside() {
        let (t, root) = tree();
        let secret = t.path().join("secret");
        std::fs::write(&secret, b"s").unwrap();
        let e = apply(
            &root,
            &[Layer::new()
                .link(tar::EntryType::Link, "h", "../secret")
                .bytes()],
        )
        .unwrap_err();
        assert!(matches!(e, LayerError::Unsafe { .. }), "{e}");
        // An absolute target names the tree's own path, which does not exist there.
        let e = apply(
            &root,
            &[Layer::new()
                .link(tar::EntryType::Link, "h", secret.to_str().unwrap())
                .bytes()],
        )
        .unwrap_err();
        assert!(e.to_string().contains("not unpacked before"), "{e}");
        // Through a symlinked parent pointing outside: resolved inside, so missing.
        let l = Layer::new()
            .link(tar::EntryType::Symlink, "out", t.path().to_str().unwrap())
            .link(tar::EntryType::Link, "h", "out/secret")
            .bytes();
        assert!(apply(&root, &[l]).is_err());
        assert_eq!(secret.metadata().unwrap().nlink(), 1);
        // A hardlink to a symlink links the symlink, not what it points to.
        let l = Layer::new()
            .link(tar::EntryType::Symlink, "s", secret.to_str().unwrap())
            .link(tar::EntryType::Link, "h2", "s")
            .bytes();
        apply(&root, &[l]).unwrap();
        assert!(root
            .join("h2")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(secret.metadata().unwrap().nlink(), 1);
    }
}

//! File operations relative to a directory descriptor, following no symlink: what an
//! entry is, removing a tree, listing a directory, and writing content with its holes.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{fstatat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::{errno_io, MAX_DEPTH};
use crate::sys::raw;

pub(super) fn kind_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<SFlag>> {
    match fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(errno_io(e)),
    }
}

/// Remove `name` below `dir` and everything under it, following no symlink. `depth`
/// bounds the recursion (trees are at most as deep as the entries that made them).
pub(super) fn remove_tree_at(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> io::Result<()> {
    match kind_at(dir, name)? {
        None => Ok(()),
        Some(SFlag::S_IFDIR) => {
            if depth > MAX_DEPTH + 1 {
                return Err(io::Error::other("directory tree too deep to remove"));
            }
            let sub = raw::open_beneath_nofollow(
                dir,
                Path::new(name),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )?;
            // A directory the image made read-only must still be emptied.
            let _ = File::from(sub.try_clone()?).set_permissions(PermissionsExt::from_mode(0o700));
            for child in list_dir(sub.as_fd())? {
                remove_tree_at(sub.as_fd(), &child, depth + 1)?;
            }
            unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir).map_err(errno_io)
        }
        Some(_) => {
            unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir).map_err(errno_io)
        }
    }
}

pub(super) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut d = nix::dir::Dir::openat(
        Some(dir.as_raw_fd()),
        ".",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno_io)?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry.map_err(errno_io)?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

/// Copy a file's content, leaving runs of zeros as holes: a layer's sparse file (a tar
/// stores only its data) must not become its full size on disk, and a hostile layer with a
/// terabyte-sized sparse entry must not fill the cache's file system.
pub(super) fn copy_keeping_holes<R: Read>(content: &mut R, file: &mut File) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    let mut ends_in_hole = false;
    loop {
        let n = match content.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        if chunk.iter().all(|&b| b == 0) {
            file.seek(SeekFrom::Current(n as i64))?;
            ends_in_hole = true;
        } else {
            file.write_all(chunk)?;
            ends_in_hole = false;
        }
        len += n as u64;
    }
    if ends_in_hole {
        file.set_len(len)?;
    }
    Ok(len)
}

pub(super) fn parts_depth(path: &Path) -> usize {
    path.components().count()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::super::test_layer::{apply, tree, Layer};

    #[test]
    fn runs_of_zeros_stay_holes_on_disk() {
        let (_t, root) = tree();
        let mut body = vec![0u8; 8 << 20];
        body[4 << 20] = b'x';
        let end = body.len() - 1;
        body[end] = 0;
        apply(&root, &[Layer::new().file("sparse", &body, 0o644).bytes()]).unwrap();
        let m = root.join("sparse").metadata().unwrap();
        assert_eq!(m.len(), 8 << 20);
        assert!(
            m.blocks() * 512 <= 1 << 20,
            "{} bytes on disk",
            m.blocks() * 512
        );
        assert_eq!(std::fs::read(root.join("sparse")).unwrap(), body);
    }
}

//! Applying OCI/docker layer tars onto a directory, as an unprivileged user. This file
//! owns the unpacker (a layer's walk, parent directories, modes and times to record);
//! `entries` the entries a layer adds, `whiteout` what it deletes, `decompress` the layer
//! compressions, `tree` the descriptor-relative file operations they share.
//!
//! Layers are hostile input. Every write is made relative to a directory descriptor whose
//! path was resolved by the kernel with the tree as its root (`openat2` with
//! `RESOLVE_IN_ROOT`), and the last component is never followed (`O_NOFOLLOW`, `*at`
//! calls without `AT_SYMLINK_FOLLOW`); paths holding `..` are refused outright. So neither
//! `..`, absolute names, symlinked parents, hardlinks nor whiteouts can reach outside.
//!
//! Modes are kept, but on disk everything stays readable (and directories writable and
//! searchable) by the importing user, so later layers can write and `mksquashfs` can read,
//! and no set-id or sticky bit is set. [`Unpacked::modes`] lists the modes the image really
//! asked for, for the squashfs to record (or [`Unpacked::restore_modes`] to apply on disk).
//! Ownership is ignored: the tree belongs to the user. Device nodes and fifos cannot be
//! made unprivileged: skipped and counted.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{File, FileTimes};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::sys::stat::{mkdirat, Mode};

use crate::sys::raw;

mod decompress;
mod entries;
#[cfg(test)]
mod test_layer;
mod tree;
mod whiteout;

pub use decompress::decompress;
use tree::{parts_depth, remove_tree_at};

/// Paths deeper than this are refused; it also bounds the recursion of tree removal.
const MAX_DEPTH: usize = 256;
/// On-disk bits the importing user keeps while unpacking.
const DIR_OWNER_BITS: u32 = 0o700;
const FILE_OWNER_BITS: u32 = 0o400;

/// The mode an entry has on disk while unpacking: never setuid, setgid or sticky (the
/// unpacked tree must not hold set-id programs, even briefly), always usable by the owner.
fn on_disk(mode: u32, owner_bits: u32) -> u32 {
    (mode & 0o777) | owner_bits
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("refusing layer entry '{path}': {why}")]
    Unsafe { path: String, why: &'static str },
    #[error("cannot read layer: {0}")]
    Read(io::Error),
    #[error("cannot write '{path}' while unpacking: {error}")]
    Write { path: String, error: io::Error },
    #[error("cannot open the unpack directory {path}: {error}")]
    Root { path: PathBuf, error: io::Error },
}

/// Counts reported after unpacking.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub whiteouts: u64,
    /// Device nodes and fifos, which an unprivileged user cannot create.
    pub skipped_special: u64,
}

/// What unpacking left to do: modes to record, and counts.
#[derive(Debug, Default)]
pub struct Unpacked {
    /// Relative path and the mode the image asked for, where it differs from the mode on
    /// disk (which keeps the owner's read bit, and rwx on directories).
    pub modes: Vec<(PathBuf, u32)>,
    pub stats: Stats,
}

#[derive(Debug, Clone, Copy)]
struct DirMeta {
    mode: u32,
    mtime: u64,
}

/// Applies layers, one after another, onto one directory.
pub struct Unpacker {
    root: OwnedFd,
    root_path: PathBuf,
    dirs: BTreeMap<PathBuf, DirMeta>,
    /// Files whose wanted mode differs from their on-disk mode.
    modes: BTreeMap<PathBuf, u32>,
    /// Paths the current layer created, and their ancestors: opaque markers and whiteouts
    /// act only on what lower layers left.
    touched: HashSet<PathBuf>,
    stats: Stats,
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |error| LayerError::Write {
        path: path.display().to_string(),
        error,
    }
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A tar path as components, with `.` and empty parts dropped; `..` and overlong paths
/// are refused (a legitimate layer never needs them).
fn normalize(raw: &[u8]) -> Result<Vec<OsString>, LayerError> {
    let unsafe_path = |why| LayerError::Unsafe {
        path: String::from_utf8_lossy(raw).into_owned(),
        why,
    };
    let mut parts = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(unsafe_path("the path holds '..'")),
            _ => parts.push(OsStr::from_bytes(c).to_os_string()),
        }
    }
    if parts.len() > MAX_DEPTH {
        return Err(unsafe_path("the path is nested too deeply"));
    }
    Ok(parts)
}

fn join(parts: &[OsString]) -> PathBuf {
    parts.iter().collect()
}

fn mtime_of(header: &tar::Header) -> u64 {
    header.mtime().unwrap_or(0)
}

fn file_times(mtime: u64) -> FileTimes {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(mtime);
    FileTimes::new().set_accessed(t).set_modified(t)
}

impl Unpacker {
    /// Prepare to unpack into the existing directory `root`.
    pub fn new(root: &Path) -> Result<Unpacker, LayerError> {
        let fd = File::open(root)
            .and_then(|f| {
                if f.metadata()?.is_dir() {
                    Ok(OwnedFd::from(f))
                } else {
                    Err(io::Error::from_raw_os_error(libc::ENOTDIR))
                }
            })
            .map_err(|error| LayerError::Root {
                path: root.into(),
                error,
            })?;
        Ok(Unpacker {
            root: fd,
            root_path: root.into(),
            dirs: BTreeMap::new(),
            modes: BTreeMap::new(),
            touched: HashSet::new(),
            stats: Stats::default(),
        })
    }

    /// Apply one layer (gzip, zstd or plain tar) with whiteouts.
    pub fn apply_layer<R: Read>(&mut self, layer: R) -> Result<(), LayerError> {
        let tar = decompress(layer).map_err(LayerError::Read)?;
        self.apply_tar(tar, true)
    }

    /// Apply one uncompressed tar; `whiteouts` says whether `.wh.` names delete (layers)
    /// or are ordinary files (any other archive).
    pub fn apply_tar<R: Read>(&mut self, tar: R, whiteouts: bool) -> Result<(), LayerError> {
        self.touched.clear();
        let mut archive = tar::Archive::new(tar);
        for entry in archive.entries().map_err(LayerError::Read)? {
            let mut entry = entry.map_err(LayerError::Read)?;
            self.stats.entries += 1;
            self.apply_entry(&mut entry, whiteouts)?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        whiteouts: bool,
    ) -> Result<(), LayerError> {
        let raw = entry.path_bytes().into_owned();
        let parts = normalize(&raw)?;
        let header = entry.header().clone();
        let mut kind = header.entry_type();
        if kind == tar::EntryType::Regular && raw.ends_with(b"/") {
            kind = tar::EntryType::Directory; // pre-POSIX tars mark directories so
        }
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let mtime = mtime_of(&header);
        let Some((name, parent_parts)) = parts.split_last() else {
            // The tree's root itself: only its mode and time matter.
            if kind == tar::EntryType::Directory {
                let _ = File::from(self.root.try_clone().map_err(write_err(Path::new("/")))?)
                    .set_permissions(PermissionsExt::from_mode(on_disk(mode, DIR_OWNER_BITS)));
                self.dirs.insert(PathBuf::new(), DirMeta { mode, mtime });
            }
            return Ok(());
        };
        let path = join(&parts);
        let parent_path = join(parent_parts);
        let name_bytes = name.as_bytes();

        if whiteouts && whiteout::is_whiteout(name_bytes) {
            return self.apply_whiteout(&raw, &parent_path, name_bytes);
        }

        let parent = self.ensure_dir(&parent_path)?;
        match kind {
            tar::EntryType::Directory => self.make_dir(parent.as_fd(), name, &path, mode, mtime)?,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.make_file(parent.as_fd(), name, &path, entry, mode, mtime)?
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or(LayerError::Unsafe {
                        path: path.display().to_string(),
                        why: "a symlink without a target",
                    })?
                    .into_owned();
                self.make_symlink(parent.as_fd(), name, &path, &target, mtime)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or(LayerError::Unsafe {
                        path: path.display().to_string(),
                        why: "a hardlink without a target",
                    })?
                    .into_owned();
                self.make_hardlink(parent.as_fd(), name, &path, &target)?;
            }
            tar::EntryType::Char
                if header.device_major().ok().flatten() == Some(0)
                    && header.device_minor().ok().flatten() == Some(0)
                    && whiteouts =>
            {
                // overlayfs' whiteout, as some tools write it into layers.
                self.stats.whiteouts += 1;
                self.whiteout(&parent_path, name)?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.stats.skipped_special += 1;
            }
            // PAX global headers and other metadata-only entries.
            _ => tracing::debug!("skipping tar entry {} of type {kind:?}", path.display()),
        }
        self.touch(&path);
        Ok(())
    }

    fn touch(&mut self, path: &Path) {
        let mut p = Some(path);
        while let Some(q) = p {
            if q.as_os_str().is_empty() || !self.touched.insert(q.to_path_buf()) {
                break;
            }
            p = q.parent();
        }
    }

    fn forget_tree(&mut self, path: &Path) {
        let under = |k: &&PathBuf| k.starts_with(path);
        let dirs: Vec<PathBuf> = self
            .dirs
            .range(path.to_path_buf()..)
            .map(|(k, _)| k)
            .take_while(under)
            .cloned()
            .collect();
        let files: Vec<PathBuf> = self
            .modes
            .range(path.to_path_buf()..)
            .map(|(k, _)| k)
            .take_while(under)
            .cloned()
            .collect();
        for k in dirs {
            self.dirs.remove(&k);
        }
        for k in files {
            self.modes.remove(&k);
        }
    }

    /// Open the directory `rel` inside the tree, creating what is missing (mode 0755, as
    /// tar does for parents an archive does not list). Symlinks on the way are resolved
    /// with the tree as root.
    fn ensure_dir(&mut self, rel: &Path) -> Result<OwnedFd, LayerError> {
        let open = |root: BorrowedFd<'_>| {
            raw::open_in_root(
                root,
                Path::new(".").join(rel).as_path(),
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )
        };
        match open(self.root.as_fd()) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(write_err(rel)(e)),
        }
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Err(write_err(rel)(io::ErrorKind::NotFound.into()));
        };
        let parent_fd = self.ensure_dir(parent)?;
        match mkdirat(
            Some(parent_fd.as_raw_fd()),
            name,
            Mode::from_bits_truncate(0o755),
        ) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(write_err(rel)(errno_io(e))),
        }
        self.dirs.insert(
            rel.into(),
            DirMeta {
                mode: 0o755,
                // As tar does for parents an archive does not list: made now.
                mtime: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            },
        );
        self.touch(rel);
        open(self.root.as_fd()).map_err(|e| {
            let is_link = nix::sys::stat::fstatat(
                Some(parent_fd.as_raw_fd()),
                name,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK);
            if is_link {
                // Followed inside the image only, and its target is not a directory there:
                // an archive that writes through a symlink to leave the tree lands here.
                LayerError::Unsafe {
                    path: rel.display().to_string(),
                    why: "it is a symlink, and entries beneath it would be written through it",
                }
            } else {
                write_err(rel)(e)
            }
        })
    }

    /// Make room for a new non-directory entry `name`.
    fn replace(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
    ) -> Result<(), LayerError> {
        remove_tree_at(parent, name, parts_depth(path)).map_err(write_err(path))?;
        self.forget_tree(path);
        Ok(())
    }

    /// Write a regular file at `rel` inside the tree (replacing whatever is there, never
    /// following a symlink at its place), for files the importer adds to an image.
    pub fn write_file(&mut self, rel: &Path, bytes: &[u8], mode: u32) -> Result<(), LayerError> {
        let parts = normalize(rel.as_os_str().as_bytes())?;
        let Some((name, parent_parts)) = parts.split_last() else {
            return Err(write_err(rel)(io::ErrorKind::InvalidInput.into()));
        };
        let path = join(&parts);
        let parent = self.ensure_dir(&join(parent_parts))?;
        self.replace(parent.as_fd(), name, &path)?;
        let fd = raw::open_beneath_nofollow(
            parent.as_fd(),
            Path::new(name),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )
        .map_err(write_err(&path))?;
        let mut file = File::from(fd);
        io::Write::write_all(&mut file, bytes).map_err(write_err(&path))?;
        file.set_permissions(PermissionsExt::from_mode(on_disk(mode, FILE_OWNER_BITS)))
            .map_err(write_err(&path))?;
        if on_disk(mode, FILE_OWNER_BITS) != mode {
            self.modes.insert(path, mode);
        }
        Ok(())
    }

    /// Read a file of the tree (symlinks resolved inside it), at most `limit` bytes.
    pub fn read_file(&self, rel: &Path, limit: u64) -> Option<Vec<u8>> {
        let fd = raw::open_in_root(
            self.root.as_fd(),
            &Path::new(".").join(rel),
            libc::O_RDONLY,
            0,
        )
        .ok()?;
        let mut bytes = Vec::new();
        File::from(fd).take(limit).read_to_end(&mut bytes).ok()?;
        Some(bytes)
    }

    /// Set directory times (now that nothing more is written in them) and report the
    /// modes the image asked for.
    pub fn finish(self) -> Result<Unpacked, LayerError> {
        let mut modes: Vec<(PathBuf, u32)> = self.modes.into_iter().collect();
        for (path, meta) in &self.dirs {
            if on_disk(meta.mode, DIR_OWNER_BITS) != meta.mode && !path.as_os_str().is_empty() {
                modes.push((path.clone(), meta.mode));
            }
            let opened = raw::open_in_root(
                self.root.as_fd(),
                &Path::new(".").join(path),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            );
            match opened {
                Ok(fd) => File::from(fd)
                    .set_times(file_times(meta.mtime))
                    .map_err(write_err(path))?,
                Err(e) => tracing::debug!("not setting the time of {}: {e}", path.display()),
            }
        }
        modes.sort();
        if self.stats.skipped_special > 0 {
            tracing::warn!(
                "skipped {} device nodes and fifos in {} (an unprivileged user cannot create them; containers get the host's /dev)",
                self.stats.skipped_special,
                self.root_path.display()
            );
        }
        Ok(Unpacked {
            modes,
            stats: self.stats,
        })
    }
}

impl Unpacked {
    /// Give every entry the mode the image asked for, on disk (deepest first, so a
    /// directory losing its owner's write bit does not block its children).
    pub fn restore_modes(&self, root: &Path) -> Result<(), LayerError> {
        let root_fd = File::open(root).map_err(|error| LayerError::Root {
            path: root.into(),
            error,
        })?;
        for (path, mode) in self.modes.iter().rev() {
            let fd = raw::open_in_root(
                root_fd.as_fd(),
                &Path::new(".").join(path),
                libc::O_PATH | libc::O_NOFOLLOW,
                0,
            )
            .map_err(write_err(path))?;
            // fchmod refuses O_PATH descriptors; chmod through /proc does not.
            let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
            std::fs::set_permissions(proc_path, PermissionsExt::from_mode(*mode))
                .map_err(write_err(path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::test_layer::{apply, tree, Layer};
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn files_dirs_links_modes_and_times() {
        let (_t, root) = tree();
        let l = Layer::new()
            .dir("./etc/", 0o755)
            .file("etc/hosts", b"127.0.0.1 localhost\n", 0o644)
            .file("etc/shadow", b"root:*:\n", 0o000)
            .file("bin/tool", b"#!/bin/sh\n", 0o4755)
            .dir("ro", 0o555)
            .file("ro/inside", b"x", 0o644)
            .link(
                tar::EntryType::Symlink,
                "etc/localtime",
                "/usr/share/zoneinfo/UTC",
            )
            .link(tar::EntryType::Link, "etc/hosts2", "etc/hosts")
            .bytes();
        let out = apply(&root, &[l]).unwrap();
        assert_eq!(
            std::fs::read(root.join("etc/hosts2")).unwrap(),
            b"127.0.0.1 localhost\n"
        );
        let m = root.join("etc/hosts").metadata().unwrap();
        assert_eq!(m.nlink(), 2);
        assert_eq!(m.mode() & 0o7777, 0o644);
        assert_eq!(m.mtime(), 1_000_000);
        // No set-id program on disk while unpacking; the mode is recorded.
        assert_eq!(
            root.join("bin/tool").metadata().unwrap().mode() & 0o7777,
            0o755
        );
        assert!(out.modes.contains(&(PathBuf::from("bin/tool"), 0o4755)));
        assert_eq!(
            std::fs::read_link(root.join("etc/localtime")).unwrap(),
            Path::new("/usr/share/zoneinfo/UTC")
        );
        assert_eq!(root.join("ro").metadata().unwrap().mtime(), 1_000_000);
        // Kept readable / writable on disk; the wanted modes are reported.
        assert_eq!(
            root.join("etc/shadow").metadata().unwrap().mode() & 0o777,
            0o400
        );
        assert!(out.modes.contains(&(PathBuf::from("etc/shadow"), 0)));
        assert!(out.modes.contains(&(PathBuf::from("ro"), 0o555)));
        out.restore_modes(&root).unwrap();
        assert_eq!(
            root.join("bin/tool").metadata().unwrap().mode() & 0o7777,
            0o4755
        );
        assert_eq!(root.join("ro").metadata().unwrap().mode() & 0o777, 0o555);
        assert_eq!(
            root.join("etc/shadow").metadata().unwrap().mode() & 0o777,
            0
        );
        std::fs::set_permissions(root.join("ro"), PermissionsExt::from_mode(0o755)).unwrap();
    }

    #[test]
    fn later_layers_replace_types() {
        let (_t, root) = tree();
        let lower = Layer::new()
            .dir("x", 0o755)
            .file("x/f", b"1", 0o644)
            .file("y", b"1", 0o644)
            .bytes();
        let upper = Layer::new()
            .file("x", b"file now", 0o644)
            .dir("y", 0o700)
            .bytes();
        apply(&root, &[lower, upper]).unwrap();
        assert_eq!(std::fs::read(root.join("x")).unwrap(), b"file now");
        assert!(root.join("y").is_dir());
    }

    #[test]
    fn dot_dot_and_absolute_paths_stay_inside() {
        let (t, root) = tree();
        let e = apply(
            &root,
            &[Layer::new().file("../escape", b"x", 0o644).bytes()],
        )
        .unwrap_err();
        assert!(e.to_string().contains("'..'"), "{e}");
        let e = apply(
            &root,
            &[Layer::new().file("a/../../escape", b"x", 0o644).bytes()],
        )
        .unwrap_err();
        assert!(matches!(e, LayerError::Unsafe { .. }));
        assert!(!t.path().join("escape").exists());
        apply(&root, &[Layer::new().file("/abs", b"x", 0o644).bytes()]).unwrap();
        assert!(root.join("abs").exists());
    }

    #[test]
    fn symlinked_parents_resolve_inside_the_tree() {
        let (t, root) = tree();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let out_abs = outside.to_str().unwrap().to_string();
        let l = Layer::new()
            .link(tar::EntryType::Symlink, "abs", &out_abs)
            .link(tar::EntryType::Symlink, "rel", "../../../..")
            .link(tar::EntryType::Symlink, "dotdot", "..")
            .file("rel/f1", b"x", 0o644)
            .file("dotdot/f2", b"x", 0o644)
            .bytes();
        apply(&root, &[l]).unwrap();
        // `rel` and `..` are clamped at the tree's root.
        assert!(root.join("f1").exists() && root.join("f2").exists());
        // A write through an absolute symlink goes inside or fails; never outside.
        let _ = apply(&root, &[Layer::new().file("abs/f3", b"x", 0o644).bytes()]);
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!t.path().join("f1").exists() && !t.path().join("f2").exists());
    }

    #[test]
    fn devices_and_fifos_are_skipped_and_counted() {
        let (_t, root) = tree();
        let l = Layer::new()
            .special(tar::EntryType::Char, "dev/null")
            .special(tar::EntryType::Fifo, "run/fifo")
            .file("ok", b"", 0o644)
            .bytes();
        let out = apply(&root, &[l]).unwrap();
        assert_eq!(out.stats.skipped_special, 2);
        assert!(!root.join("dev/null").exists());
        assert!(root.join("ok").exists());
    }
}

//! Layer tars written by the tests, entry by entry, and a scratch tree to apply them to.

use std::path::{Path, PathBuf};

use super::{LayerError, Unpacked, Unpacker};

/// Builds a layer tar in memory, entry by entry, with raw names (the `tar` crate's
/// own setters refuse `..`, which is what the tests need to write).
pub(super) struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    pub(super) fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }
    pub(super) fn header(kind: tar::EntryType, name: &str, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_000_000);
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_cksum();
        h
    }
    pub(super) fn file(mut self, name: &str, body: &[u8], mode: u32) -> Self {
        let h = Self::header(tar::EntryType::Regular, name, mode, body.len() as u64);
        self.0.append(&h, body).unwrap();
        self
    }
    pub(super) fn dir(mut self, name: &str, mode: u32) -> Self {
        let h = Self::header(tar::EntryType::Directory, name, mode, 0);
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    pub(super) fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Self {
        let mut h = Self::header(kind, name, 0o777, 0);
        let t = target.as_bytes();
        h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
        h.set_cksum();
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    pub(super) fn special(mut self, kind: tar::EntryType, name: &str) -> Self {
        let mut h = Self::header(kind, name, 0o644, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_cksum();
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    pub(super) fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

pub(super) fn apply(root: &Path, layers: &[Vec<u8>]) -> Result<Unpacked, LayerError> {
    let mut u = Unpacker::new(root)?;
    for l in layers {
        u.apply_layer(&l[..])?;
    }
    u.finish()
}

pub(super) fn tree() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    std::fs::create_dir(&root).unwrap();
    (t, root)
}

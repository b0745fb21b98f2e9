//! Tar archives read in place (OCI archives and `docker save` output): one pass over the
//! headers records where each member lies, and blobs are then read where they are. Also
//! what kind of image archive a tar is, from its member names.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What an archive holds, from its member names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    Oci,
    Docker,
}

/// Look at a tar's member names: an OCI layout (`oci-layout`, also written by Docker 25+
/// next to its `manifest.json`) or a `docker save` archive.
pub fn archive_kind(path: &Path) -> Option<ArchiveKind> {
    let index = TarIndex::build(path).ok()?;
    if index.contains("oci-layout") {
        Some(ArchiveKind::Oci)
    } else if index.contains("manifest.json") || index.contains("repositories") {
        Some(ArchiveKind::Docker)
    } else {
        None
    }
}

/// Where each member of a tar lies, found in one pass over its headers; members are then
/// read in place (no disk space, and nothing the archive names is ever written).
#[derive(Debug)]
pub(crate) struct TarIndex {
    file: File,
    /// Member name (normalised) -> (offset of its data, size).
    members: HashMap<String, (u64, u64)>,
}

/// `a/./b/../c` -> `a/c`; only a lookup key, never a path that is opened.
fn clean(name: &[u8]) -> String {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in name.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    String::from_utf8_lossy(&parts.join(&b'/')).into_owned()
}

impl TarIndex {
    /// Index the tar at `path`; a gzip-compressed one is refused with the fix.
    pub(crate) fn build(path: &Path) -> io::Result<TarIndex> {
        let file = File::open(path)?;
        let mut head = [0u8; 2];
        if file.read_at(&mut head, 0)? == 2 && head == [0x1f, 0x8b] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the archive is gzip-compressed; decompress it first (gunzip)",
            ));
        }
        let mut members = HashMap::new();
        let mut links = Vec::new();
        let mut archive = tar::Archive::new(&file);
        for entry in archive.entries_with_seek()? {
            let entry = entry?;
            let name = clean(&entry.path_bytes());
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    members.insert(name, (entry.raw_file_position(), entry.size()));
                }
                // `docker save` links identical layers to one copy.
                tar::EntryType::Symlink => {
                    if let Some(target) = entry.link_name_bytes() {
                        let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                        let joined = if target.starts_with(b"/") {
                            target.to_vec()
                        } else {
                            [dir.as_bytes(), b"/", &target].concat()
                        };
                        links.push((name, clean(&joined)));
                    }
                }
                tar::EntryType::Link => {
                    if let Some(target) = entry.link_name_bytes() {
                        links.push((name, clean(&target)));
                    }
                }
                _ => {}
            }
        }
        // Links to links: a few rounds settle any honest chain; loops stay unresolved.
        for _ in 0..8 {
            for (name, target) in &links {
                if let Some(v) = members.get(target).copied() {
                    members.entry(name.clone()).or_insert(v);
                }
            }
        }
        Ok(TarIndex { file, members })
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.members.contains_key(&clean(name.as_bytes()))
    }

    /// Member `name` (looked up as `clean` normalises it) and its size; `None` if absent.
    pub(crate) fn open(&self, name: &str) -> Option<(Slice<'_>, u64)> {
        self.members
            .get(&clean(name.as_bytes()))
            .map(|&(pos, size)| {
                (
                    Slice {
                        file: &self.file,
                        pos,
                        end: pos + size,
                    },
                    size,
                )
            })
    }
}

/// The bytes of one member, read with positioned reads.
pub(crate) struct Slice<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Slice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let want = (buf.len() as u64).min(left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_found_by_their_clean_names_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "./x/oci-layout", &b"hello"[..])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "y/link", "../x/oci-layout").unwrap();
        b.finish().unwrap();
        drop(b);
        let index = TarIndex::build(&path).unwrap();
        let (mut r, size) = index.open("x/./oci-layout").unwrap();
        let mut text = String::new();
        r.read_to_string(&mut text).unwrap();
        assert_eq!((text.as_str(), size), ("hello", 5));
        assert!(index.contains("y/link"));
        assert!(index.open("missing").is_none());
        assert_eq!(archive_kind(&path), None);
        std::fs::write(&path, [0x1f, 0x8b, 8, 0]).unwrap();
        let e = TarIndex::build(&path).unwrap_err();
        assert!(e.to_string().contains("gunzip"), "{e}");
    }
}

//! SIF (Apptainer/Singularity Image Format): find the primary system partition, a squashfs
//! that squashfuse mounts in place by offset, so a SIF file runs without being copied.
//!
//! Layout (little-endian, packed): a 128-byte global header (launch line, `SIF_MAGIC`,
//! version, arch, id, times, descriptor and data areas), then a table of fixed-size
//! descriptors, each naming one data object by offset and size. A partition descriptor's
//! extra bytes hold its file system type, partition type and arch.

use std::fs::File;

use super::read_at_most;

pub const MAGIC: &[u8; 9] = b"SIF_MAGIC";
const MAGIC_AT: usize = 32;
const HEADER_SIZE: usize = 128;
const DESCRIPTOR_SIZE: u64 = 585;
/// sylabs' tools create 48; far more would only be a way to make us read a lot.
const MAX_DESCRIPTORS: u64 = 4096;

const DATA_PARTITION: i32 = 0x4004;
const FS_SQUASHFS: i32 = 1;
const FS_EXT3: i32 = 2;
const FS_ENCRYPTED_SQUASHFS: i32 = 5;
const PART_PRIMARY_SYSTEM: i32 = 2;

/// Where the root file system lies in a SIF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub offset: u64,
    pub size: u64,
}

/// Why a SIF file cannot be run: the problem only, the caller names the file.
#[derive(Debug, thiserror::Error)]
pub enum SifError {
    #[error("cannot read: {0}")]
    Read(std::io::Error),
    #[error("truncated: {0} bytes, a SIF header needs {HEADER_SIZE}")]
    ShortHeader(usize),
    #[error("no SIF_MAGIC in the header")]
    NoMagic,
    #[error("SIF version {0:?}; only version 01 is supported")]
    Version(String),
    #[error("{0} has a negative offset or size")]
    NegativeRange(String),
    #[error("{what} (offset {offset}, size {size}) lies past the end of the file ({file_len} bytes): the file is truncated or corrupt")]
    PastEnd {
        what: String,
        offset: u64,
        size: u64,
        file_len: u64,
    },
    #[error("implausible descriptor count {0}")]
    DescriptorCount(i64),
    #[error("the descriptor table overlaps the header")]
    TableOverlapsHeader,
    #[error("truncated descriptor table")]
    ShortTable,
    #[error("{0} overlaps the SIF header or descriptor table")]
    ObjectOverlapsTable(String),
    #[error("data objects {0} and {1} overlap: the file is corrupt")]
    ObjectsOverlap(u32, u32),
    #[error("its root file system is encrypted; decrypt it first (apptainer build plain.sif encrypted.sif)")]
    Encrypted,
    #[error(
        "its primary partition is {0}, not squashfs; convert it (apptainer build new.sif old.sif)"
    )]
    NotSquashfs(&'static str),
    #[error("it holds no root file system partition (no partition data object at all)")]
    NoPartition,
    #[error("it holds no primary system partition (only {0} partitions)")]
    NoPrimary(String),
    #[error("its primary partition is not a usable squashfs: {0}")]
    BadSquashfs(super::squashfs::SuperblockError),
}

/// True when `head` (the file's first bytes) is a SIF global header.
pub fn is_sif(head: &[u8]) -> bool {
    head.len() >= MAGIC_AT + MAGIC.len() && &head[MAGIC_AT..MAGIC_AT + MAGIC.len()] == MAGIC
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn i64_at(b: &[u8], at: usize) -> i64 {
    i64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// An offset/size pair from the file, checked to lie inside it.
fn range(offset: i64, size: i64, file_len: u64, what: &str) -> Result<(u64, u64), SifError> {
    let (Ok(offset), Ok(size)) = (u64::try_from(offset), u64::try_from(size)) else {
        return Err(SifError::NegativeRange(what.to_string()));
    };
    match offset.checked_add(size) {
        Some(end) if end <= file_len => Ok((offset, size)),
        _ => Err(SifError::PastEnd {
            what: what.to_string(),
            offset,
            size,
            file_len,
        }),
    }
}

/// Read the header and descriptors of the SIF `file` and return its primary squashfs
/// partition. The error is one line for users.
pub fn primary_partition(file: &File, file_len: u64) -> Result<Partition, SifError> {
    let mut header = [0u8; HEADER_SIZE];
    let n = read_at_most(file, &mut header, 0).map_err(SifError::Read)?;
    if n < HEADER_SIZE {
        return Err(SifError::ShortHeader(n));
    }
    if !is_sif(&header) || header[MAGIC_AT + MAGIC.len()] != 0 {
        return Err(SifError::NoMagic);
    }
    let version = &header[42..45];
    if version != b"01\0" {
        return Err(SifError::Version(
            String::from_utf8_lossy(version)
                .trim_end_matches('\0')
                .to_string(),
        ));
    }
    let total = i64_at(&header, 88);
    let (descr_offset, _) = range(i64_at(&header, 96), 0, file_len, "the descriptor table")?;
    let total = u64::try_from(total)
        .ok()
        .filter(|t| *t <= MAX_DESCRIPTORS)
        .ok_or(SifError::DescriptorCount(total))?;
    let table_len = total * DESCRIPTOR_SIZE;
    range(
        descr_offset as i64,
        table_len as i64,
        file_len,
        "the descriptor table",
    )?;
    if descr_offset < HEADER_SIZE as u64 {
        return Err(SifError::TableOverlapsHeader);
    }

    let mut table = vec![0u8; table_len as usize];
    let n = read_at_most(file, &mut table, descr_offset).map_err(SifError::Read)?;
    if n < table.len() {
        return Err(SifError::ShortTable);
    }
    let mut objects: Vec<(u64, u64, u32)> = Vec::new();
    let mut primary = None;
    let mut seen = Vec::new();
    for d in table.chunks_exact(DESCRIPTOR_SIZE as usize) {
        if d[4] == 0 {
            continue; // unused slot
        }
        let datatype = i32_at(d, 0);
        let id = u32_at(d, 5);
        let what = format!("data object {id}");
        let (offset, size) = range(i64_at(d, 17), i64_at(d, 25), file_len, &what)?;
        if size > 0 && offset < descr_offset + table_len {
            return Err(SifError::ObjectOverlapsTable(what));
        }
        for (o, s, other) in &objects {
            if size > 0 && *s > 0 && offset < o + s && *o < offset + size {
                return Err(SifError::ObjectsOverlap(*other, id));
            }
        }
        objects.push((offset, size, id));
        if datatype == DATA_PARTITION {
            // Extra bytes start after the common fields and the 128-byte name.
            let extra = 17 + 24 + 32 + 128;
            let fstype = i32_at(d, extra);
            let parttype = i32_at(d, extra + 4);
            seen.push(fs_name(fstype));
            if parttype == PART_PRIMARY_SYSTEM && primary.is_none() {
                primary = Some((fstype, offset, size));
            }
        }
    }
    match primary {
        Some((FS_SQUASHFS, offset, size)) => Ok(Partition { offset, size }),
        Some((FS_ENCRYPTED_SQUASHFS, ..)) => Err(SifError::Encrypted),
        Some((other, ..)) => Err(SifError::NotSquashfs(fs_name(other))),
        None if seen.is_empty() => Err(SifError::NoPartition),
        None => Err(SifError::NoPrimary(seen.join(", "))),
    }
}

fn fs_name(fstype: i32) -> &'static str {
    match fstype {
        FS_SQUASHFS => "squashfs",
        FS_EXT3 => "ext3",
        3 => "an immutable object archive",
        4 => "raw data",
        FS_ENCRYPTED_SQUASHFS => "encrypted squashfs",
        _ => "an unknown file system",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sif")
            .join(name)
    }

    fn parse(name: &str) -> Result<Partition, SifError> {
        let f = File::open(fixture(name)).unwrap();
        let len = f.metadata().unwrap().len();
        primary_partition(&f, len)
    }

    fn parse_bytes(bytes: &[u8]) -> Result<Partition, SifError> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        primary_partition(&f, bytes.len() as u64)
    }

    #[test]
    fn finds_the_primary_squashfs_of_real_files() {
        for name in [
            "one-group.sif",
            "two-groups.sif",
            "one-group-signed-pgp.sif",
        ] {
            let p = parse(name).unwrap();
            let f = File::open(fixture(name)).unwrap();
            let mut sb = [0u8; 4];
            read_at_most(&f, &mut sb, p.offset).unwrap();
            assert_eq!(&sb, b"hsqs", "{name}");
            assert!(p.size > 96);
        }
    }

    #[test]
    fn refuses_files_without_a_root_file_system() {
        let e = parse("empty.sif").unwrap_err().to_string();
        assert!(e.contains("no root file system"), "{e}");
        let e = parse("one-object-generic-json.sif")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no root file system"), "{e}");
    }

    fn one_group() -> Vec<u8> {
        std::fs::read(fixture("one-group.sif")).unwrap()
    }

    /// Byte offset of the `i`th descriptor of one-group.sif.
    fn descr(i: usize) -> usize {
        4096 + i * DESCRIPTOR_SIZE as usize
    }

    #[test]
    fn refuses_corrupt_headers_and_descriptors() {
        let good = one_group();
        let mut b = good.clone();
        b[32] = b'X';
        assert!(parse_bytes(&b)
            .unwrap_err()
            .to_string()
            .contains("SIF_MAGIC"));
        let mut b = good.clone();
        b[43] = b'9';
        assert!(parse_bytes(&b).unwrap_err().to_string().contains("version"));
        assert!(parse_bytes(&good[..100])
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        // The squashfs partition (second descriptor) made to run past the end.
        let mut b = good.clone();
        b[descr(1) + 25..descr(1) + 33].copy_from_slice(&(1i64 << 40).to_le_bytes());
        assert!(parse_bytes(&b)
            .unwrap_err()
            .to_string()
            .contains("past the end"));
        let mut b = good.clone();
        b[descr(1) + 17..descr(1) + 25].copy_from_slice(&(-5i64).to_le_bytes());
        assert!(parse_bytes(&b)
            .unwrap_err()
            .to_string()
            .contains("negative"));
        // The two objects made to overlap: the raw partition moved onto the squashfs.
        let mut b = good.clone();
        let sq = i64_at(&good, descr(1) + 17);
        b[descr(0) + 17..descr(0) + 25].copy_from_slice(&sq.to_le_bytes());
        assert!(parse_bytes(&b).unwrap_err().to_string().contains("overlap"));
        // The data made to point into the descriptor table.
        let mut b = good.clone();
        b[descr(1) + 17..descr(1) + 25].copy_from_slice(&4096i64.to_le_bytes());
        assert!(parse_bytes(&b).unwrap_err().to_string().contains("overlap"));
        // The primary partition's file system changed to ext3.
        let mut b = good.clone();
        let extra = descr(1) + 17 + 24 + 32 + 128;
        b[extra..extra + 4].copy_from_slice(&FS_EXT3.to_le_bytes());
        assert!(parse_bytes(&b)
            .unwrap_err()
            .to_string()
            .contains("ext3, not squashfs"));
        // No partition marked primary.
        let mut b = good.clone();
        b[extra + 4..extra + 8].copy_from_slice(&1i32.to_le_bytes());
        assert!(parse_bytes(&b)
            .unwrap_err()
            .to_string()
            .contains("no primary system partition"));
        // A descriptor count that would make us read gigabytes.
        let mut b = good;
        b[88..96].copy_from_slice(&(1i64 << 40).to_le_bytes());
        assert!(parse_bytes(&b)
            .unwrap_err()
            .to_string()
            .contains("descriptor count"));
    }
}

//! Reading glibc's loader cache (`/etc/ld.so.cache`), to find the host's copies of
//! libraries by name (the GPU driver's, a site's MPI) the way the host's loader finds them.
//!
//! Two layouts exist: glibc since 2.32 writes only the "new" one (magic
//! `glibc-ld.so.cache1.1`); older ldconfig wrote the old table (`ld.so-1.7.0`) followed by
//! the new one. Either way the new table is what is read here. Its entries are 24 bytes
//! (flags, key and value string offsets, os version, hwcap); the offsets count from the
//! start of the new table's header.

use std::path::{Path, PathBuf};

const NEW_MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
const OLD_MAGIC: &[u8] = b"ld.so-1.7.0";
const NEW_HEADER_LEN: usize = 48;
const NEW_ENTRY_LEN: usize = 24;
const OLD_HEADER_LEN: usize = 16;
const OLD_ENTRY_LEN: usize = 12;
/// Entry flags: the low byte says ELF/libc6, the next byte the ABI (x86-64, AArch64, ...).
const FLAG_TYPE_MASK: i32 = 0x00ff;
const FLAG_ELF_LIBC6: i32 = 0x0003;
const FLAG_REQUIRED_MASK: i32 = 0xff00;

/// Largest cache read (a host with every package installed has a few hundred KiB).
pub const MAX_CACHE_LEN: u64 = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LdCacheError {
    #[error("not a glibc loader cache (no `glibc-ld.so.cache1.1` table)")]
    NotACache,
    #[error("truncated loader cache ({0})")]
    Truncated(&'static str),
}

/// Why the cache file could not be used; names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Parse { path: PathBuf, error: LdCacheError },
}

/// One library the cache knows: the name programs ask for (usually the soname) and the
/// host path the loader would open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub path: PathBuf,
    flags: i32,
}

impl Entry {
    /// Built for this machine's own ABI (the cache also lists 32-bit and x32 libraries).
    pub fn is_native(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == FLAG_ELF_LIBC6
            && self.flags & FLAG_REQUIRED_MASK == native_abi_flag()
    }
}

impl Entry {
    #[cfg(test)]
    pub fn for_test(name: &str, path: &Path) -> Entry {
        Entry {
            name: name.to_string(),
            path: path.to_path_buf(),
            flags: FLAG_ELF_LIBC6 | native_abi_flag(),
        }
    }
}

/// ldconfig's ABI byte for the architecture ferry was built for.
fn native_abi_flag() -> i32 {
    if cfg!(target_arch = "x86_64") {
        0x0300
    } else if cfg!(target_arch = "aarch64") {
        0x0a00
    } else if cfg!(target_arch = "powerpc64") {
        0x0500
    } else if cfg!(target_arch = "riscv64") {
        0x1000
    } else {
        0
    }
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .map(|b| u32::from_ne_bytes(b.try_into().expect("four bytes")))
}

fn c_string_at(table: &[u8], at: usize) -> Option<&str> {
    let rest = table.get(at..)?;
    let end = rest.iter().position(|b| *b == 0)?;
    std::str::from_utf8(&rest[..end]).ok()
}

/// Where the new table starts: at 0, or after the old table.
fn new_table_offset(data: &[u8]) -> Result<usize, LdCacheError> {
    if data.starts_with(NEW_MAGIC) {
        return Ok(0);
    }
    if !data.starts_with(OLD_MAGIC) {
        return Err(LdCacheError::NotACache);
    }
    let nlibs = u32_at(data, 12).ok_or(LdCacheError::Truncated("old header"))? as usize;
    let end = nlibs
        .checked_mul(OLD_ENTRY_LEN)
        .and_then(|n| n.checked_add(OLD_HEADER_LEN))
        .ok_or(LdCacheError::Truncated("old table"))?;
    // The new table follows, aligned as its header is (8 bytes).
    let start = end.div_ceil(8) * 8;
    match data.get(start..) {
        Some(rest) if rest.starts_with(NEW_MAGIC) => Ok(start),
        Some(_) => Err(LdCacheError::NotACache),
        None => Err(LdCacheError::Truncated("old table")),
    }
}

/// Every entry of the cache `data`, in the cache's order (the loader's preference order).
pub fn parse(data: &[u8]) -> Result<Vec<Entry>, LdCacheError> {
    let base = new_table_offset(data)?;
    let table = &data[base..];
    let nlibs = u32_at(table, 20).ok_or(LdCacheError::Truncated("header"))? as usize;
    let entries_end = nlibs
        .checked_mul(NEW_ENTRY_LEN)
        .and_then(|n| n.checked_add(NEW_HEADER_LEN))
        .filter(|end| *end <= table.len())
        .ok_or(LdCacheError::Truncated("entries"))?;
    let mut out = Vec::with_capacity(nlibs);
    for at in (NEW_HEADER_LEN..entries_end).step_by(NEW_ENTRY_LEN) {
        let flags = u32_at(table, at).expect("inside the entries") as i32;
        let key = u32_at(table, at + 4).expect("inside the entries") as usize;
        let value = u32_at(table, at + 8).expect("inside the entries") as usize;
        let (Some(name), Some(path)) = (c_string_at(table, key), c_string_at(table, value)) else {
            return Err(LdCacheError::Truncated("strings"));
        };
        out.push(Entry {
            name: name.to_string(),
            path: PathBuf::from(path),
            flags,
        });
    }
    Ok(out)
}

/// Read and parse the cache at `path`.
pub fn read(path: &Path) -> Result<Vec<Entry>, ReadError> {
    use std::io::Read;
    let io_error = |error| ReadError::Io {
        path: path.into(),
        error,
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let mut data = Vec::new();
    file.take(MAX_CACHE_LEN)
        .read_to_end(&mut data)
        .map_err(io_error)?;
    parse(&data).map_err(|error| ReadError::Parse {
        path: path.into(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache in the new layout with `entries` (flags, name, path).
    fn new_cache(entries: &[(i32, &str, &str)]) -> Vec<u8> {
        let mut strings = Vec::new();
        let strings_at = NEW_HEADER_LEN + entries.len() * NEW_ENTRY_LEN;
        let mut table = Vec::new();
        for (flags, name, path) in entries {
            let key = strings_at + strings.len();
            strings.extend_from_slice(name.as_bytes());
            strings.push(0);
            let value = strings_at + strings.len();
            strings.extend_from_slice(path.as_bytes());
            strings.push(0);
            table.extend_from_slice(&flags.to_ne_bytes());
            table.extend_from_slice(&(key as u32).to_ne_bytes());
            table.extend_from_slice(&(value as u32).to_ne_bytes());
            table.extend_from_slice(&0u32.to_ne_bytes());
            table.extend_from_slice(&0u64.to_ne_bytes());
        }
        let mut data = Vec::new();
        data.extend_from_slice(b"glibc-ld.so.cache");
        data.extend_from_slice(b"1.1");
        data.extend_from_slice(&(entries.len() as u32).to_ne_bytes());
        data.extend_from_slice(&(strings.len() as u32).to_ne_bytes());
        data.extend_from_slice(&[0u8; 4]);
        data.extend_from_slice(&[0u8; 16]);
        assert_eq!(data.len(), NEW_HEADER_LEN);
        data.extend(table);
        data.extend(strings);
        data
    }

    #[test]
    fn reads_the_new_layout() {
        let native = FLAG_ELF_LIBC6 | native_abi_flag();
        let data = new_cache(&[
            (
                native,
                "libcuda.so.1",
                "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
            ),
            (
                FLAG_ELF_LIBC6,
                "libcuda.so.1",
                "/usr/lib/i386-linux-gnu/libcuda.so.1",
            ),
        ]);
        let entries = parse(&data).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].name, "libcuda.so.1");
        assert_eq!(
            entries[0].path,
            Path::new("/usr/lib/x86_64-linux-gnu/libcuda.so.1")
        );
        assert!(entries[0].is_native());
        assert_eq!(entries[1].is_native(), native_abi_flag() == 0);
    }

    #[test]
    fn reads_the_new_table_behind_an_old_one() {
        let native = FLAG_ELF_LIBC6 | native_abi_flag();
        let mut data = Vec::new();
        data.extend_from_slice(OLD_MAGIC);
        data.push(0);
        data.extend_from_slice(&1u32.to_ne_bytes());
        data.extend_from_slice(&[0u8; OLD_ENTRY_LEN]);
        while data.len() % 8 != 0 {
            data.push(0);
        }
        data.extend(new_cache(&[(native, "libz.so.1", "/lib/libz.so.1")]));
        let entries = parse(&data).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].path, Path::new("/lib/libz.so.1"));
    }

    #[test]
    fn refuses_garbage_and_truncation() {
        assert_eq!(parse(b"hello"), Err(LdCacheError::NotACache));
        let data = new_cache(&[(3, "libz.so.1", "/lib/libz.so.1")]);
        assert!(matches!(
            parse(&data[..NEW_HEADER_LEN + 4]),
            Err(LdCacheError::Truncated(_))
        ));
        // Strings cut off: an offset points past the end.
        assert!(matches!(
            parse(&data[..data.len() - 3]),
            Err(LdCacheError::Truncated(_))
        ));
        // A huge entry count does not overflow or allocate.
        let mut lying = data.clone();
        lying[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(parse(&lying), Err(LdCacheError::Truncated(_))));
    }

    #[test]
    fn reads_what_this_machines_ldconfig_writes() {
        let Some(ldconfig) = ["/sbin/ldconfig", "/usr/sbin/ldconfig"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            panic!("ldconfig is missing: install libc-bin");
        };
        let dir = tempfile::tempdir().unwrap();
        // A real library in a directory of its own, listed in a config of its own.
        let lib = [
            "/lib/x86_64-linux-gnu/libz.so.1",
            "/usr/lib/x86_64-linux-gnu/libz.so.1",
        ]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists());
        let Some(lib) = lib else {
            return; // not an x86-64 Debian layout: the synthetic tests above cover parsing
        };
        let libdir = dir.path().join("lib");
        std::fs::create_dir(&libdir).unwrap();
        std::fs::copy(lib, libdir.join("libz.so.1")).unwrap();
        let conf = dir.path().join("ld.so.conf");
        std::fs::write(&conf, format!("{}\n", libdir.display())).unwrap();
        let cache = dir.path().join("ld.so.cache");
        let status = std::process::Command::new(ldconfig)
            .arg("-X")
            .arg("-f")
            .arg(&conf)
            .arg("-C")
            .arg(&cache)
            .status()
            .unwrap();
        assert!(status.success());
        let entries = read(&cache).unwrap();
        let ours: Vec<_> = entries
            .iter()
            .filter(|e| e.path.starts_with(&libdir))
            .collect();
        assert_eq!(ours.len(), 1, "{entries:?}");
        assert_eq!(ours[0].name, "libz.so.1");
        assert!(ours[0].is_native());
    }
}

//! squashfs images: the superblock checks done before mounting, the squashfuse program, and
//! the mksquashfs command that makes images.

use std::path::{Path, PathBuf};

/// zstd level of imported (and saved) images. mksquashfs' own default, 15, took 12.6 s for a
/// 173 MB tree here against 0.8 s at 3, for a 13% larger image; zstd reads both equally fast,
/// so an import should not spend its time there.
pub const DEFAULT_ZSTD_LEVEL: u32 = 3;

pub const MAGIC: &[u8; 4] = b"hsqs";
const SUPERBLOCK_SIZE: usize = 96;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Compression {
    Gzip,
    Lzma,
    Lzo,
    Xz,
    Lz4,
    Zstd,
}

/// Why a squashfs superblock was refused: the problem only, the caller names the file.
#[derive(Debug, thiserror::Error)]
pub enum SuperblockError {
    #[error("truncated: {0} bytes, a superblock needs {SUPERBLOCK_SIZE}")]
    ShortHeader(usize),
    #[error("no squashfs magic")]
    NoMagic,
    #[error("squashfs version {major}.{minor}; only 4.0 is supported")]
    Version { major: u16, minor: u16 },
    #[error("unknown compression id {0}")]
    Compression(u16),
    #[error("inconsistent block size {block_size} (log {block_log})")]
    BlockSize { block_size: u32, block_log: u16 },
    #[error("truncated: the superblock says {bytes_used} bytes, the file holds {available}")]
    Truncated { bytes_used: u64, available: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub inodes: u32,
    pub block_size: u32,
    pub compression: Compression,
    pub bytes_used: u64,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Superblock {
    /// Check the superblock at the start of `bytes`; `file_len` and `offset` say where the
    /// image lies in its file, so a truncated image is refused before it is mounted.
    pub fn parse(bytes: &[u8], file_len: u64, offset: u64) -> Result<Superblock, SuperblockError> {
        if bytes.len() < SUPERBLOCK_SIZE {
            return Err(SuperblockError::ShortHeader(bytes.len()));
        }
        if &bytes[..4] != MAGIC {
            return Err(SuperblockError::NoMagic);
        }
        let (major, minor) = (u16_at(bytes, 28), u16_at(bytes, 30));
        if (major, minor) != (4, 0) {
            return Err(SuperblockError::Version { major, minor });
        }
        let compression = match u16_at(bytes, 20) {
            1 => Compression::Gzip,
            2 => Compression::Lzma,
            3 => Compression::Lzo,
            4 => Compression::Xz,
            5 => Compression::Lz4,
            6 => Compression::Zstd,
            other => return Err(SuperblockError::Compression(other)),
        };
        let block_size = u32_at(bytes, 12);
        let block_log = u16_at(bytes, 22);
        if !(12..=20).contains(&block_log) || block_size != 1 << block_log {
            return Err(SuperblockError::BlockSize {
                block_size,
                block_log,
            });
        }
        let bytes_used = u64_at(bytes, 40);
        let available = file_len.saturating_sub(offset);
        if bytes_used > available {
            return Err(SuperblockError::Truncated {
                bytes_used,
                available,
            });
        }
        Ok(Superblock {
            inodes: u32_at(bytes, 4),
            block_size,
            compression,
            bytes_used,
        })
    }
}

/// How the images ferry writes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputCompression {
    Lz4,
    Zstd { level: u32 },
}

/// `lz4`, `zstd` or `zstd:LEVEL` refused.
#[derive(Debug, thiserror::Error)]
#[error("`{0}`: expected lz4, zstd or zstd:LEVEL (LEVEL 1-22)")]
pub struct BadCompression(String);

impl OutputCompression {
    /// Imports are read far more often than they are copied: lz4 is about a sixth larger
    /// than zstd but costs squashfuse half the CPU to read (`import torch` in a fresh mount:
    /// 0.62-0.70 s against 1.29-1.45 s; docs/bench/start-phases.txt). enroot's own default
    /// (lzo) makes the same choice.
    pub const IMPORT: OutputCompression = OutputCompression::Lz4;
    /// Images users save or build to pass on (`ferry save`, `--container-save`, `ferry
    /// build -t`): smaller.
    pub const SHARE: OutputCompression = OutputCompression::Zstd {
        level: DEFAULT_ZSTD_LEVEL,
    };

    fn mksquashfs_args(self) -> Vec<String> {
        match self {
            OutputCompression::Lz4 => vec!["lz4".into()],
            OutputCompression::Zstd { level } => {
                vec![
                    "zstd".into(),
                    "-Xcompression-level".into(),
                    level.to_string(),
                ]
            }
        }
    }
}

impl std::str::FromStr for OutputCompression {
    type Err = BadCompression;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadCompression(text.to_string());
        match text.split_once(':') {
            None if text == "lz4" => Ok(OutputCompression::Lz4),
            None if text == "zstd" => Ok(OutputCompression::SHARE),
            Some(("zstd", level)) => match level.parse::<u32>() {
                Ok(level @ 1..=22) => Ok(OutputCompression::Zstd { level }),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for OutputCompression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutputCompression::Lz4 => f.write_str("lz4"),
            OutputCompression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

/// The mksquashfs command that squashes `dir` into the image `out` as ferry makes every
/// image (imports, `ferry save`, `--container-save`, builds): `compression`, every file
/// owned by root (as in images built by root), no xattrs, `out` replaced. Callers add their
/// own options (exclusions, threads, progress) and set stdout.
pub fn mksquashfs_command(
    program: &Path,
    dir: &Path,
    out: &Path,
    compression: OutputCompression,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.arg(dir)
        .arg(out)
        .args(["-noappend", "-comp"])
        .args(compression.mksquashfs_args())
        .args(["-all-root", "-no-xattrs"])
        .stdin(std::process::Stdio::null());
    cmd
}

/// The squashfuse program to use: the site's choice, else `squashfuse_ll` (multi-threaded,
/// low-level API, faster) or `squashfuse` from PATH.
pub fn find_squashfuse(site_choice: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = site_choice {
        return is_executable(p).then(|| p.to_path_buf());
    }
    ["squashfuse_ll", "squashfuse"]
        .iter()
        .find_map(|name| find_in_path(name))
}

/// A program found in PATH (or the usual system directories when PATH is empty).
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").filter(|p| !p.is_empty());
    let dirs = path
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&dirs)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(compression: u16, bytes_used: u64) -> Vec<u8> {
        let mut b = vec![0u8; SUPERBLOCK_SIZE];
        b[..4].copy_from_slice(MAGIC);
        b[12..16].copy_from_slice(&(1u32 << 17).to_le_bytes());
        b[20..22].copy_from_slice(&compression.to_le_bytes());
        b[22..24].copy_from_slice(&17u16.to_le_bytes());
        b[28..30].copy_from_slice(&4u16.to_le_bytes());
        b[40..48].copy_from_slice(&bytes_used.to_le_bytes());
        b
    }

    #[test]
    fn output_compression_reads_and_writes_its_names() {
        for (text, parsed) in [
            ("lz4", OutputCompression::Lz4),
            ("zstd", OutputCompression::Zstd { level: 3 }),
            ("zstd:19", OutputCompression::Zstd { level: 19 }),
        ] {
            assert_eq!(text.parse::<OutputCompression>().unwrap(), parsed);
        }
        assert_eq!(OutputCompression::Zstd { level: 7 }.to_string(), "zstd:7");
        for bad in ["", "gzip", "zstd:0", "zstd:23", "zstd:x", "lz4:1"] {
            assert!(bad.parse::<OutputCompression>().is_err(), "{bad}");
        }
        let args: Vec<String> = mksquashfs_command(
            Path::new("mksquashfs"),
            Path::new("/d"),
            Path::new("/o"),
            OutputCompression::IMPORT,
        )
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
        assert_eq!(args[2..5], ["-noappend", "-comp", "lz4"]);
    }

    #[test]
    fn accepts_a_sane_superblock() {
        let sb = Superblock::parse(&superblock(6, 4096), 4096, 0).unwrap();
        assert_eq!(sb.compression, Compression::Zstd);
        assert_eq!(sb.block_size, 1 << 17);
    }

    #[test]
    fn refuses_truncated_and_odd_images() {
        assert!(Superblock::parse(&superblock(1, 8192), 4096, 0)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(Superblock::parse(&superblock(1, 4096), 8192, 8000)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(Superblock::parse(&superblock(9, 10), 4096, 0)
            .unwrap_err()
            .to_string()
            .contains("compression"));
        assert!(Superblock::parse(&superblock(1, 10)[..50], 4096, 0)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let mut v3 = superblock(1, 10);
        v3[28] = 3;
        assert!(Superblock::parse(&v3, 4096, 0)
            .unwrap_err()
            .to_string()
            .contains("version"));
    }
}

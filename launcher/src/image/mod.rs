//! Images: what a path given as IMAGE holds, checked before anything is mounted.

pub mod archive;
pub mod config;
pub mod digest;
pub mod layers;
pub mod manifest;
pub mod media_type;
pub mod oci;
pub mod platform;
pub mod reference;
pub mod registry;
pub mod sif;
pub mod squashfs;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// What kind of root filesystem an opened image holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ImageKind {
    /// A squashfs image starting at `offset` bytes into the file.
    Squashfs {
        offset: u64,
        compression: squashfs::Compression,
    },
    /// A directory holding a root filesystem.
    Directory,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image not found: {0} (check the path; relative paths are taken from the current directory)")]
    NotFound(PathBuf),
    #[error("image not readable by user {user}: {path} (check its permissions and those of its parent directories)")]
    NotReadable { path: PathBuf, user: String },
    #[error("cannot open image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a squashfs image or root filesystem directory: {path} ({detail})")]
    UnknownFormat { path: PathBuf, detail: String },
    #[error("bad squashfs image {path}: {reason}")]
    BadSquashfs {
        path: PathBuf,
        reason: squashfs::SuperblockError,
    },
    #[error("cannot use SIF image {path}: {reason}")]
    BadSif {
        path: PathBuf,
        reason: sif::SifError,
    },
}

/// Open the image at `path` for `user` (the caller), without blocking: a FIFO or a
/// device given as the image is refused before anything reads from it (opened normally,
/// a FIFO without a writer would block the caller, slurmstepd with the kernel provider).
pub fn open(path: &Path, user: &str) -> Result<File, ImageError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ImageError::NotFound(path.into()),
            std::io::ErrorKind::PermissionDenied => ImageError::NotReadable {
                path: path.into(),
                user: user.into(),
            },
            _ => ImageError::Open {
                path: path.into(),
                source,
            },
        })?;
    let meta = file.metadata().map_err(|source| ImageError::Open {
        path: path.into(),
        source,
    })?;
    if !meta.is_file() && !meta.is_dir() {
        return Err(ImageError::UnknownFormat {
            path: path.into(),
            detail: "neither a regular file nor a directory (a FIFO, socket or device?)".into(),
        });
    }
    // Ordinary reads from here on (O_NONBLOCK means nothing to regular files; cleared for
    // the helpers that inherit the descriptor).
    crate::sys::child::set_blocking(std::os::fd::AsFd::as_fd(&file)).map_err(|source| {
        ImageError::Open {
            path: path.into(),
            source,
        }
    })?;
    Ok(file)
}

/// Look at an already-opened image and say what it is. `file` must be opened for reading.
pub fn detect(path: &Path, file: &File) -> Result<ImageKind, ImageError> {
    let meta = file.metadata().map_err(|source| ImageError::Open {
        path: path.into(),
        source,
    })?;
    if meta.is_dir() {
        return Ok(ImageKind::Directory);
    }
    if !meta.is_file() {
        return Err(ImageError::UnknownFormat {
            path: path.into(),
            detail: "neither a regular file nor a directory".into(),
        });
    }
    let mut head = [0u8; 128];
    let n = read_at_most(file, &mut head, 0).map_err(|source| ImageError::Open {
        path: path.into(),
        source,
    })?;
    if n >= 4 && &head[..4] == squashfs::MAGIC {
        let sb = squashfs::Superblock::parse(&head[..n], meta.len(), 0).map_err(|reason| {
            ImageError::BadSquashfs {
                path: path.into(),
                reason,
            }
        })?;
        return Ok(ImageKind::Squashfs {
            offset: 0,
            compression: sb.compression,
        });
    }
    if sif::is_sif(&head[..n]) {
        let bad = |reason| ImageError::BadSif {
            path: path.into(),
            reason,
        };
        let part = sif::primary_partition(file, meta.len()).map_err(bad)?;
        let mut sb = [0u8; 96];
        let got = read_at_most(file, &mut sb, part.offset).map_err(|source| ImageError::Open {
            path: path.into(),
            source,
        })?;
        // The squashfs must fit in its partition, not merely in the file.
        let sb = squashfs::Superblock::parse(&sb[..got], part.offset + part.size, part.offset)
            .map_err(|reason| bad(sif::SifError::BadSquashfs(reason)))?;
        return Ok(ImageKind::Squashfs {
            offset: part.offset,
            compression: sb.compression,
        });
    }
    let detail = if n == 0 {
        "the file is empty".to_string()
    } else if head.starts_with(&[0x1f, 0x8b]) {
        "it is gzip-compressed: decompress a .tar.gz first, then name it as oci-archive:FILE or docker-archive:FILE".to_string()
    } else {
        format!("starts with bytes {}", hex(&head[..n.min(8)]))
    };
    Err(ImageError::UnknownFormat {
        path: path.into(),
        detail,
    })
}

pub(crate) fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Read at most `limit` bytes of a text file that lives inside an image (hostile input:
/// bounded, and invalid UTF-8 is replaced rather than refused).
pub fn read_small_text(mut file: File, limit: u64) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    (&mut file).take(limit).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sif_is_its_primary_squashfs_in_place() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sif");
        let path = dir.join("one-group.sif");
        let kind = detect(&path, &File::open(&path).unwrap()).unwrap();
        let ImageKind::Squashfs { offset, .. } = kind else {
            panic!("{kind:?}")
        };
        assert!(offset > 0);
        let path = dir.join("empty.sif");
        let e = detect(&path, &File::open(&path).unwrap()).unwrap_err();
        assert!(e.to_string().contains("no root file system"), "{e}");
    }
}

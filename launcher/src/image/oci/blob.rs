//! Verified reading: a source (a layout directory, or a tar read in place), and blobs
//! streamed out of it, every byte through the sha256 their descriptor names.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use oci_spec::image::Descriptor;
use sha2::{Digest as _, Sha256};

use super::{OciError, JSON_LIMIT};
use crate::image::archive::TarIndex;
use crate::image::digest::{check_digest, hex};

/// Where blobs come from: a directory, or members of a tar read in place.
#[derive(Debug)]
pub(super) enum Source {
    Dir(PathBuf),
    Tar(TarIndex),
}

impl Source {
    /// Open member `name` (a fixed name or `blobs/sha256/<checked hex>`): None if absent.
    pub(super) fn open(&self, name: &str) -> io::Result<Option<(Box<dyn Read + '_>, u64)>> {
        match self {
            // O_NONBLOCK: a fifo planted in a layout must not hang the import.
            Source::Dir(dir) => match fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(dir.join(name))
            {
                Ok(f) => {
                    let meta = f.metadata()?;
                    if !meta.is_file() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "not a regular file",
                        ));
                    }
                    Ok(Some((Box::new(f), meta.len())))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            Source::Tar(t) => Ok(t.open(name).map(|(slice, size)| {
                let r: Box<dyn Read + '_> = Box::new(slice);
                (r, size)
            })),
        }
    }
}

/// A blob being read; [`BlobReader::finish`] reads what is left and checks the digest
/// and size. Whatever consumed the bytes, all of them pass through the hash.
pub struct BlobReader<'a> {
    inner: Box<dyn Read + 'a>,
    hasher: Sha256,
    count: u64,
    digest: Option<String>,
    size: Option<u64>,
    origin: String,
}

impl Read for BlobReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self.size.is_some_and(|s| self.count > s) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "blob is longer than its descriptor says",
            ));
        }
        Ok(n)
    }
}

impl BlobReader<'_> {
    pub fn finish(mut self) -> Result<(), OciError> {
        let digest_name = self.digest.clone().unwrap_or_else(|| "layer".into());
        io::copy(&mut self, &mut io::sink()).map_err(|error| OciError::Io {
            what: format!("blob {digest_name}"),
            origin: self.origin.clone(),
            error,
        })?;
        if let Some(expected) = self.size {
            if expected != self.count {
                return Err(OciError::SizeMismatch {
                    digest: digest_name,
                    expected,
                    actual: self.count,
                    origin: self.origin,
                });
            }
        }
        let actual = format!("sha256:{}", hex(&self.hasher.finalize()));
        match self.digest {
            Some(d) if d != actual => Err(OciError::DigestMismatch {
                digest: d,
                actual,
                origin: self.origin,
            }),
            _ => Ok(()),
        }
    }
}

/// Reads members and blobs of one source, naming it in every error.
pub(super) struct Reader<'s> {
    pub source: &'s Source,
    pub origin: String,
}

impl<'s> Reader<'s> {
    pub(super) fn io(&self, what: impl Into<String>) -> impl FnOnce(io::Error) -> OciError + '_ {
        let what = what.into();
        move |error| OciError::Io {
            what,
            origin: self.origin.clone(),
            error,
        }
    }

    pub(super) fn malformed(&self, what: impl Into<String>, detail: impl ToString) -> OciError {
        OciError::Malformed {
            what: what.into(),
            origin: self.origin.clone(),
            detail: detail.to_string(),
        }
    }

    /// A whole member that is not a blob (index.json, manifest.json), size-limited.
    pub(super) fn read_member(&self, name: &str) -> Result<Option<Vec<u8>>, OciError> {
        let Some((r, len)) = self.source.open(name).map_err(self.io(name))? else {
            return Ok(None);
        };
        if len > JSON_LIMIT {
            return Err(self.malformed(name, format!("{len} bytes is too big")));
        }
        let mut bytes = Vec::new();
        r.take(JSON_LIMIT)
            .read_to_end(&mut bytes)
            .map_err(self.io(name))?;
        Ok(Some(bytes))
    }

    pub(super) fn blob_member(&self, digest: &str) -> Result<String, OciError> {
        check_digest(digest).map_err(|d| self.malformed("descriptor", d))?;
        Ok(format!("blobs/sha256/{}", &digest["sha256:".len()..]))
    }

    /// Open a blob for streaming, checked against `digest` (and `size` when known).
    pub(super) fn open_blob(
        &self,
        member: &str,
        digest: Option<&str>,
        size: Option<u64>,
    ) -> Result<BlobReader<'s>, OciError> {
        let what = digest.unwrap_or(member).to_string();
        let (inner, len) = self
            .source
            .open(member)
            .map_err(self.io(what.clone()))?
            .ok_or_else(|| OciError::Missing {
                what: format!("blob {what}"),
                origin: self.origin.clone(),
            })?;
        if let Some(expected) = size {
            if expected != len {
                return Err(OciError::SizeMismatch {
                    digest: what,
                    expected,
                    actual: len,
                    origin: self.origin.clone(),
                });
            }
        }
        Ok(BlobReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
            digest: digest.map(str::to_string),
            size: Some(len),
            origin: self.origin.clone(),
        })
    }

    /// A small blob (manifest, index, config), read whole and verified.
    pub(super) fn read_blob(&self, d: &Descriptor) -> Result<Vec<u8>, OciError> {
        let digest = d.digest().to_string();
        let size = d.size();
        if size > JSON_LIMIT {
            return Err(self.malformed(
                format!("blob {digest}"),
                format!("{size} bytes is too big for a manifest or config"),
            ));
        }
        let member = self.blob_member(&digest)?;
        let mut r = self.open_blob(&member, Some(&digest), Some(size))?;
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes).map_err(self.io(digest))?;
        r.finish()?;
        Ok(bytes)
    }
}

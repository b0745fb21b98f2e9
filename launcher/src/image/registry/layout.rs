//! The OCI image layout a pull writes, and the blob downloads that fill it.
//!
//! Every blob is written under a temporary name (`blobs/sha256/.HEX.partial`), checked
//! against its digest and size while it streams in, and renamed to `blobs/sha256/HEX` only
//! when both match. So a blob under its final name is always complete and correct, an
//! interrupted pull leaves only partial files, and the next pull into the same directory
//! skips the finished blobs and continues the partial ones where they stopped.
//! A lock file (`.ferry-pull.lock`) keeps two pulls out of one directory at a time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use oci_spec::image::{Descriptor, ImageIndex, MediaType};
use sha2::{Digest, Sha256};

use super::progress::Meter;
use super::transport::{header, retry, Attempt, Fetch, Target, Transport};
use super::RegistryError;
use crate::image::digest::hex;
use crate::image::manifest::blob_hex;

pub const LOCK_FILE: &str = ".ferry-pull.lock";
pub use oci_spec::image::ANNOTATION_REF_NAME as REF_NAME_ANNOTATION;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An image layout directory being written; holds the directory's lock while it lives.
pub(super) struct Layout {
    root: PathBuf,
    blobs: PathBuf,
    _lock: Flock<File>,
}

impl Layout {
    pub fn open(root: &Path) -> Result<Layout, RegistryError> {
        let blobs = root.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(io_error(&blobs))?;
        let lock_path = root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                tracing::info!("waiting for another pull into {}", root.display());
                Flock::lock(file, FlockArg::LockExclusive)
                    .map_err(|(_, e)| io_error(&lock_path)(e.into()))?
            }
            Err((_, e)) => return Err(io_error(&lock_path)(e.into())),
        };
        let layout_file = root.join("oci-layout");
        write_atomic(&layout_file, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(Layout {
            root: root.to_path_buf(),
            blobs,
            _lock: lock,
        })
    }

    pub fn blob_path(&self, d: &Descriptor) -> PathBuf {
        self.blobs.join(blob_hex(d))
    }

    fn partial_path(&self, d: &Descriptor) -> PathBuf {
        self.blobs.join(format!(".{}.partial", blob_hex(d)))
    }

    /// A finished blob of the right size is there. Its content was checked before it got
    /// its name; hashing gigabytes again on every resumed pull would cost more than it buys.
    pub fn has_blob(&self, d: &Descriptor) -> bool {
        std::fs::symlink_metadata(self.blob_path(d))
            .is_ok_and(|m| m.is_file() && m.len() == d.size())
    }

    /// Store bytes already in memory (the manifest) under their digest.
    pub fn put_blob(&self, d: &Descriptor, bytes: &[u8]) -> Result<(), RegistryError> {
        if self.has_blob(d) {
            return Ok(());
        }
        write_atomic(&self.blob_path(d), bytes)
    }

    /// Write `index.json` naming the one manifest; last, so a layout with an index is whole.
    pub fn write_index(
        &self,
        manifest: &Descriptor,
        tag: Option<&str>,
    ) -> Result<(), RegistryError> {
        // Only what names the blob, and the tag: no platform (the layout holds one image).
        let mut entry = Descriptor::new(
            manifest.media_type().clone(),
            manifest.size(),
            manifest.digest().clone(),
        );
        entry.set_annotations(
            tag.map(|t| [(REF_NAME_ANNOTATION.to_string(), t.to_string())].into()),
        );
        let mut index = ImageIndex::default();
        index.set_schema_version(2);
        index.set_media_type(Some(MediaType::ImageIndex));
        index.set_manifests(vec![entry]);
        let text = serde_json::to_vec_pretty(&index).unwrap_or_default();
        write_atomic(&self.root.join("index.json"), &text)
    }

    /// Download one blob into the layout (see the module documentation). Returns the bytes
    /// fetched over the network.
    pub fn fetch_blob(
        &self,
        transport: &Transport,
        target: &Target,
        d: &Descriptor,
        meter: &Meter,
    ) -> Result<u64, RegistryError> {
        let final_path = self.blob_path(d);
        let partial_path = self.partial_path(d);
        let what = format!("blob {}", d.digest());
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&partial_path)
            .map_err(io_error(&partial_path))?;
        let mut state = Partial::resume(&mut file, d.size()).map_err(io_error(&partial_path))?;
        if state.have > 0 {
            tracing::info!("continuing {what} at byte {} of {}", state.have, d.size());
        }
        meter.add(state.have);
        let mut fetched = 0u64;
        let mut restarted_after_mismatch = false;
        loop {
            transport.with_retries(target, &what, transport.retries(), || {
                download(
                    transport,
                    target,
                    d,
                    &mut file,
                    &mut state,
                    meter,
                    &mut fetched,
                )
                .map_err(|a| match a {
                    Step::Attempt(a) => a,
                    Step::Io(e) => Attempt::Fatal(io_error(&partial_path)(e)),
                })
            })?;
            let actual = format!("sha256:{}", hex(&state.hasher.clone().finalize()));
            if actual == d.digest().as_ref() {
                break;
            }
            // A partial file left by an earlier run may have been damaged on disk; only a
            // clean download that still does not match is the registry's fault.
            if state.spliced && !restarted_after_mismatch {
                tracing::warn!("{what}: digest mismatch after resuming; downloading it again");
                restarted_after_mismatch = true;
                meter.rewind(state.have);
                state.reset(&mut file).map_err(io_error(&partial_path))?;
                continue;
            }
            let _ = std::fs::remove_file(&partial_path);
            return Err(RegistryError::DigestMismatch {
                registry: target.reference.registry.clone(),
                what,
                expected: d.digest().to_string(),
                actual,
            });
        }
        file.sync_all().map_err(io_error(&partial_path))?;
        drop(file);
        std::fs::rename(&partial_path, &final_path).map_err(io_error(&final_path))?;
        Ok(fetched)
    }
}

/// How far a blob's temporary file has got, and the hash of what it holds.
struct Partial {
    have: u64,
    hasher: Sha256,
    /// What the file holds came in more than one piece (an earlier run's partial file, or a
    /// range request after a broken connection).
    spliced: bool,
}

impl Partial {
    /// Take up what an earlier run left: hash it, unless it is already too long to be right.
    fn resume(file: &mut File, size: u64) -> std::io::Result<Partial> {
        let len = file.metadata()?.len();
        let mut p = Partial {
            have: 0,
            hasher: Sha256::new(),
            spliced: false,
        };
        if len == 0 || len > size {
            file.set_len(0)?;
            return Ok(p);
        }
        file.seek(SeekFrom::Start(0))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut reader = (&mut *file).take(len);
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            p.hasher.update(&buf[..n]);
            p.have += n as u64;
        }
        // Anything after what we could read (a shrinking file) is dropped.
        file.set_len(p.have)?;
        p.spliced = p.have > 0;
        file.seek(SeekFrom::Start(p.have))?;
        Ok(p)
    }

    fn reset(&mut self, file: &mut File) -> std::io::Result<()> {
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        self.have = 0;
        self.hasher = Sha256::new();
        self.spliced = false;
        Ok(())
    }
}

enum Step {
    Attempt(Attempt),
    Io(std::io::Error),
}

impl From<Attempt> for Step {
    fn from(a: Attempt) -> Step {
        Step::Attempt(a)
    }
}

/// One try at getting the rest of a blob: ask for the bytes from `state.have` on (a range
/// when there is something already), and append what comes until the expected size.
fn download(
    transport: &Transport,
    target: &Target,
    d: &Descriptor,
    file: &mut File,
    state: &mut Partial,
    meter: &Meter,
    fetched: &mut u64,
) -> Result<(), Step> {
    if state.have == d.size() {
        return Ok(());
    }
    let path = format!("blobs/{}", d.digest());
    let response = transport.get(
        target,
        &path,
        None,
        state.have,
        Fetch::Blob(d.digest().as_ref()),
    )?;
    let status = response.status().as_u16();
    if status == 416 {
        meter.rewind(state.have);
        state.reset(file).map_err(Step::Io)?;
        return Err(retry("the server refused to continue the download (416)").into());
    }
    if state.have > 0 {
        let continues = status == 206
            && header(&response, "content-range")
                .is_some_and(|r| range_start(&r) == Some(state.have));
        if !continues {
            // No range support (200), or a range we did not ask for: start over.
            tracing::debug!(
                "{}: server sent the whole blob again; starting over",
                d.digest()
            );
            meter.rewind(state.have);
            state.reset(file).map_err(Step::Io)?;
            if status != 200 {
                return Err(
                    retry(format!("the server answered a range request with {status}")).into(),
                );
            }
        } else {
            state.spliced = true;
        }
    }
    let mut body = response.into_body().into_reader();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                return Err(retry(format!(
                    "download broke off after {} of {} bytes ({e})",
                    state.have,
                    d.size()
                ))
                .into())
            }
        };
        if state.have + n as u64 > d.size() {
            return Err(Attempt::Fatal(RegistryError::SizeMismatch {
                registry: target.reference.registry.clone(),
                what: format!("blob {}", d.digest()),
                expected: d.size(),
            })
            .into());
        }
        file.write_all(&buf[..n]).map_err(Step::Io)?;
        state.hasher.update(&buf[..n]);
        state.have += n as u64;
        *fetched += n as u64;
        meter.add(n as u64);
    }
    if state.have < d.size() {
        return Err(retry(format!(
            "download ended after {} of {} bytes",
            state.have,
            d.size()
        ))
        .into());
    }
    Ok(())
}

/// The first byte of `Content-Range: bytes START-END/TOTAL`.
fn range_start(value: &str) -> Option<u64> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    rest.split('-').next()?.trim().parse().ok()
}

/// Write a small file under a temporary name and rename it into place.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(range_start("bytes 100-199/200"), Some(100));
        assert_eq!(range_start("bytes 0-0/*"), Some(0));
        assert_eq!(range_start("items 1-2/3"), None);
        assert_eq!(range_start("bytes x-1/2"), None);
    }

    #[test]
    fn resume_hashes_what_is_there_and_drops_overlong_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        std::fs::write(&path, b"hello").unwrap();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let p = Partial::resume(&mut f, 10).unwrap();
        assert_eq!(p.have, 5);
        assert_eq!(hex(&p.hasher.finalize()), hex(&Sha256::digest(b"hello")));
        let p = Partial::resume(&mut f, 3).unwrap();
        assert_eq!(p.have, 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }
}

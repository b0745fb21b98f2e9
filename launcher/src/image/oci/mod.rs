//! Reading images from OCI image layouts, OCI archives (a tar of a layout) and
//! `docker save` archives, every blob checked against its sha256 as it is read. This file
//! owns the opened [`Image`] and its errors; `blob` the verified reading, `layout` OCI
//! layouts and the choice of a manifest in them, `docker` the `docker save` forms.

mod blob;
mod docker;
mod layout;
#[cfg(test)]
pub(crate) mod test_images;

use std::io;
use std::path::Path;

use oci_spec::image::Platform;
use serde::Serialize;

pub use blob::BlobReader;
use blob::{Reader, Source};

use super::archive::TarIndex;
use super::config::ConfigFile;
use super::platform::PlatformExt;

/// Manifests, indexes and configs are small; a bigger one is not worth reading.
const JSON_LIMIT: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("cannot read {what} in {origin}: {error}")]
    Io {
        what: String,
        origin: String,
        error: io::Error,
    },
    #[error("{origin} is not an OCI image layout: it has no oci-layout file (an OCI layout directory holds oci-layout, index.json and blobs/)")]
    NotLayout { origin: String },
    #[error("image not found: {origin} (check the path; relative paths are taken from the current directory)")]
    NotFound { origin: String },
    #[error("{what} is missing from {origin} (was the image copied completely?)")]
    Missing { what: String, origin: String },
    #[error("blob {digest} in {origin} is corrupt: its content hashes to {actual}")]
    DigestMismatch {
        digest: String,
        actual: String,
        origin: String,
    },
    #[error("blob {digest} in {origin} has {actual} bytes, its descriptor says {expected}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
        origin: String,
    },
    #[error("malformed {what} in {origin}: {detail}")]
    Malformed {
        what: String,
        origin: String,
        detail: String,
    },
    #[error("unsupported {what} in {origin}: media type {media_type}{hint}")]
    Unsupported {
        what: &'static str,
        media_type: String,
        origin: String,
        hint: &'static str,
    },
    #[error("{origin}: {detail}")]
    Select { origin: String, detail: String },
}

/// A layer of an image, bottom first.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    /// Content digest the bytes are checked against; `None` only for legacy docker
    /// archives, which carry no digests.
    pub digest: Option<String>,
    pub size: u64,
    pub media_type: String,
    #[serde(skip)]
    member: String,
}

/// An image found in a layout or archive, ready to have its layers read.
#[derive(Debug)]
pub struct Image {
    /// Where it came from, for messages.
    pub origin: String,
    /// The cache key: the manifest digest (OCI), else the config digest (docker archive).
    pub digest: String,
    pub config_digest: String,
    pub config: ConfigFile,
    /// The raw config blob, kept for `ferry inspect`.
    pub config_bytes: Vec<u8>,
    pub layers: Vec<LayerInfo>,
    source: Source,
}

impl Image {
    /// The image in the OCI layout directory `dir`; `reference` is a tag (`ref.name`
    /// annotation) or `sha256:` manifest digest, needed only when the layout holds several.
    pub fn open_layout(dir: &Path, reference: Option<&str>) -> Result<Image, OciError> {
        let origin = dir.display().to_string();
        if !dir.is_dir() {
            return Err(OciError::NotFound { origin });
        }
        layout::resolve_layout(Source::Dir(dir.into()), origin, reference)
    }

    /// The image in an OCI archive (a tar of a layout).
    pub fn open_oci_archive(file: &Path, reference: Option<&str>) -> Result<Image, OciError> {
        let origin = file.display().to_string();
        let index = TarIndex::build(file).map_err(|error| archive_error(error, &origin))?;
        layout::resolve_layout(Source::Tar(index), origin, reference)
    }

    /// The image in a `docker save` archive (with `manifest.json`, or the legacy form with
    /// only `repositories`); `reference` picks one of several by its `NAME:TAG`.
    pub fn open_docker_archive(file: &Path, reference: Option<&str>) -> Result<Image, OciError> {
        let origin = file.display().to_string();
        let index = TarIndex::build(file).map_err(|error| archive_error(error, &origin))?;
        docker::resolve_docker(Source::Tar(index), origin, reference)
    }

    /// Stream layer `i` (compressed as stored); call [`BlobReader::finish`] after use.
    pub fn layer(&self, i: usize) -> Result<BlobReader<'_>, OciError> {
        let l = &self.layers[i];
        let r = Reader {
            source: &self.source,
            origin: self.origin.clone(),
        };
        r.open_blob(&l.member, l.digest.as_deref(), Some(l.size))
    }

    /// Sum of the stored layer sizes.
    pub fn layers_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

fn archive_error(error: io::Error, origin: &str) -> OciError {
    match error.kind() {
        io::ErrorKind::NotFound => OciError::NotFound {
            origin: origin.into(),
        },
        _ => OciError::Io {
            what: "the archive".into(),
            origin: origin.into(),
            error,
        },
    }
}

pub(super) fn warn_arch(config: &ConfigFile, origin: &str) {
    let host = Platform::host().architecture().to_string();
    if let Some(arch) = &config.architecture {
        if *arch != host {
            tracing::warn!(
                "{origin} is built for {arch}, this machine is {host}: its programs may not run"
            );
        }
    }
}

//! Reading images from OCI image layouts, OCI archives (a tar of a layout) and
//! `docker save` archives, every blob checked against its sha256 as it is read.
//!
//! Archives are not unpacked: one pass over the tar headers records where each member
//! lies, and blobs are then read in place. That costs no disk space and never writes
//! anything the archive names.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::ConfigFile;
use super::media_type;
use super::reference::check_digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Manifests, indexes and configs are small; a bigger one is not worth reading.
const JSON_LIMIT: u64 = 16 << 20;
/// Nested indexes deeper than this are refused (a loop, or an attack).
const MAX_NESTING: usize = 4;

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
    if index.members.contains_key("oci-layout") {
        Some(ArchiveKind::Oci)
    } else if index.members.contains_key("manifest.json")
        || index.members.contains_key("repositories")
    {
        Some(ArchiveKind::Docker)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// Sources: a directory, or members of a tar read in place.

#[derive(Debug)]
enum Source {
    Dir(PathBuf),
    Tar(TarIndex),
}

#[derive(Debug)]
struct TarIndex {
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
    fn build(path: &Path) -> io::Result<TarIndex> {
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
}

struct Slice<'a> {
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

impl Source {
    /// Open member `name` (a fixed name or `blobs/sha256/<checked hex>`): None if absent.
    fn open(&self, name: &str) -> io::Result<Option<(Box<dyn Read + '_>, u64)>> {
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
            Source::Tar(t) => Ok(t.members.get(&clean(name.as_bytes())).map(|&(pos, size)| {
                let r: Box<dyn Read + '_> = Box::new(Slice {
                    file: &t.file,
                    pos,
                    end: pos + size,
                });
                (r, size)
            })),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Verified reading.

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
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

// ---------------------------------------------------------------------------------------
// Documents.

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    size: i64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(default)]
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// This machine's architecture as OCI platforms name it.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        other => other,
    }
}

fn platform_matches(p: &Option<Platform>) -> bool {
    match p {
        None => true,
        Some(p) => p.os == "linux" && p.architecture == host_arch(),
    }
}

fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

fn is_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

fn layer_type_ok(media_type: &str) -> bool {
    media_type::is_layer(media_type) || media_type == media_type::FOREIGN_LAYER
}

struct Reader<'s> {
    source: &'s Source,
    origin: String,
}

impl<'s> Reader<'s> {
    fn io(&self, what: impl Into<String>) -> impl FnOnce(io::Error) -> OciError + '_ {
        let what = what.into();
        move |error| OciError::Io {
            what,
            origin: self.origin.clone(),
            error,
        }
    }

    fn malformed(&self, what: impl Into<String>, detail: impl ToString) -> OciError {
        OciError::Malformed {
            what: what.into(),
            origin: self.origin.clone(),
            detail: detail.to_string(),
        }
    }

    /// A whole member that is not a blob (index.json, manifest.json), size-limited.
    fn read_member(&self, name: &str) -> Result<Option<Vec<u8>>, OciError> {
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

    fn blob_member(&self, digest: &str) -> Result<String, OciError> {
        check_digest(digest).map_err(|d| self.malformed("descriptor", d))?;
        Ok(format!("blobs/sha256/{}", &digest["sha256:".len()..]))
    }

    /// Open a blob for streaming, checked against `digest` (and `size` when known).
    fn open_blob(
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
    fn read_blob(&self, d: &Descriptor) -> Result<Vec<u8>, OciError> {
        let size = u64::try_from(d.size)
            .map_err(|_| self.malformed("descriptor", format!("negative size for {}", d.digest)))?;
        if size > JSON_LIMIT {
            return Err(self.malformed(
                format!("blob {}", d.digest),
                format!("{size} bytes is too big for a manifest or config"),
            ));
        }
        let member = self.blob_member(&d.digest)?;
        let mut r = self.open_blob(&member, Some(&d.digest), Some(size))?;
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes)
            .map_err(self.io(d.digest.clone()))?;
        r.finish()?;
        Ok(bytes)
    }

    fn parse_doc(&self, what: &str, bytes: &[u8]) -> Result<Document, OciError> {
        serde_json::from_slice(bytes).map_err(|e| self.malformed(what, e))
    }
}

fn ref_names(d: &Descriptor) -> Vec<&str> {
    d.annotations
        .iter()
        .flat_map(|a| [a.get(REF_NAME), a.get(CONTAINERD_NAME)])
        .flatten()
        .map(String::as_str)
        .collect()
}

/// `v1` matches `v1` and `example.com/app:v1`; `app:v1` also matches containerd's
/// `docker.io/library/app:v1`.
fn name_matches(name: &str, wanted: &str) -> bool {
    name == wanted
        || name
            .strip_suffix(wanted)
            .is_some_and(|rest| rest.ends_with(':'))
        || (wanted.contains(':') && docker_name_matches(name, wanted))
}

impl Image {
    /// The image in the OCI layout directory `dir`; `reference` is a tag (`ref.name`
    /// annotation) or `sha256:` manifest digest, needed only when the layout holds several.
    pub fn open_layout(dir: &Path, reference: Option<&str>) -> Result<Image, OciError> {
        let origin = dir.display().to_string();
        if !dir.is_dir() {
            return Err(OciError::NotFound { origin });
        }
        resolve_layout(Source::Dir(dir.into()), origin, reference)
    }

    /// The image in an OCI archive (a tar of a layout).
    pub fn open_oci_archive(file: &Path, reference: Option<&str>) -> Result<Image, OciError> {
        let origin = file.display().to_string();
        let index = TarIndex::build(file).map_err(|error| archive_error(error, &origin))?;
        resolve_layout(Source::Tar(index), origin, reference)
    }

    /// The image in a `docker save` archive (with `manifest.json`, or the legacy form with
    /// only `repositories`); `reference` picks one of several by its `NAME:TAG`.
    pub fn open_docker_archive(file: &Path, reference: Option<&str>) -> Result<Image, OciError> {
        let origin = file.display().to_string();
        let index = TarIndex::build(file).map_err(|error| archive_error(error, &origin))?;
        resolve_docker(Source::Tar(index), origin, reference)
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

fn resolve_layout(
    source: Source,
    origin: String,
    reference: Option<&str>,
) -> Result<Image, OciError> {
    let r = Reader {
        source: &source,
        origin: origin.clone(),
    };
    let layout = r
        .read_member("oci-layout")?
        .ok_or_else(|| OciError::NotLayout {
            origin: origin.clone(),
        })?;
    let layout: serde_json::Value =
        serde_json::from_slice(&layout).map_err(|e| r.malformed("oci-layout", e))?;
    if layout.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
        return Err(r.malformed("oci-layout", "imageLayoutVersion is not 1.0.0"));
    }
    let index = r
        .read_member("index.json")?
        .ok_or_else(|| OciError::Missing {
            what: "index.json".into(),
            origin: origin.clone(),
        })?;
    let index = r.parse_doc("index.json", &index)?;
    let top = index
        .manifests
        .ok_or_else(|| r.malformed("index.json", "no manifests list"))?;
    let select = |detail: String| OciError::Select {
        origin: origin.clone(),
        detail,
    };
    let candidates: Vec<&Descriptor> = match reference {
        Some(d) if d.starts_with("sha256:") => top.iter().filter(|m| m.digest == d).collect(),
        Some(tag) => top
            .iter()
            .filter(|m| ref_names(m).iter().any(|n| name_matches(n, tag)))
            .collect(),
        // One image is the one meant, whatever its platform (a registry pull for another
        // platform writes such a layout); among several, this machine's.
        None if top.len() == 1 => top.iter().collect(),
        None => top
            .iter()
            .filter(|m| platform_matches(&m.platform))
            .collect(),
    };
    let chosen = match (candidates.as_slice(), reference) {
        ([one], _) => (*one).clone(),
        ([], Some(d)) if d.starts_with("sha256:") => {
            // A platform manifest inside a top-level index.
            find_nested(&r, &top, d, 0)?
                .ok_or_else(|| select(format!("no manifest {d} in this layout")))?
        }
        ([], _) => {
            let names: Vec<&str> = top.iter().flat_map(ref_names).collect();
            return Err(select(match reference {
                Some(t) => format!(
                    "no image tagged '{t}' in this layout (tags: {})",
                    if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    }
                ),
                None => format!("no image for linux/{} in this layout", host_arch()),
            }));
        }
        (many, _) => {
            let names: Vec<&str> = many.iter().flat_map(|d| ref_names(d)).collect();
            return Err(select(format!(
                "it holds {} images; name one, e.g. oci:{origin}:{} (tags: {})",
                many.len(),
                names.first().copied().unwrap_or("TAG"),
                if names.is_empty() {
                    "none; use @sha256:DIGEST".into()
                } else {
                    names.join(", ")
                }
            )));
        }
    };
    let (digest, manifest) = resolve_manifest(&r, chosen, 0)?;
    build_image(&r, digest, manifest).map(|mut img| {
        img.source = source;
        img
    })
}

fn find_nested(
    r: &Reader<'_>,
    list: &[Descriptor],
    digest: &str,
    depth: usize,
) -> Result<Option<Descriptor>, OciError> {
    if depth > MAX_NESTING {
        return Ok(None);
    }
    for d in list {
        if d.digest == digest {
            return Ok(Some(d.clone()));
        }
        if d.media_type.as_deref().is_some_and(is_index) {
            let doc = r.parse_doc("image index", &r.read_blob(d)?)?;
            if let Some(found) = find_nested(
                r,
                doc.manifests.as_deref().unwrap_or(&[]),
                digest,
                depth + 1,
            )? {
                return Ok(Some(found));
            }
        }
    }
    Ok(None)
}

/// Follow indexes down to one image manifest for this platform.
fn resolve_manifest(
    r: &Reader<'_>,
    d: Descriptor,
    depth: usize,
) -> Result<(String, Document), OciError> {
    if depth > MAX_NESTING {
        return Err(r.malformed("image index", "indexes nested too deeply"));
    }
    let bytes = r.read_blob(&d)?;
    let doc = r.parse_doc(&format!("manifest {}", d.digest), &bytes)?;
    if doc.schema_version == Some(1) {
        return Err(OciError::Unsupported {
            what: "manifest",
            media_type: "docker schema 1".into(),
            origin: r.origin.clone(),
            hint: " (re-push the image with a current docker or skopeo)",
        });
    }
    let media_type = doc
        .media_type
        .clone()
        .or(d.media_type.clone())
        .unwrap_or_else(|| {
            if doc.manifests.is_some() {
                OCI_INDEX.into()
            } else {
                OCI_MANIFEST.into()
            }
        });
    if is_index(&media_type) {
        let list = doc.manifests.unwrap_or_default();
        let pick = list
            .iter()
            .find(|m| m.platform.is_some() && platform_matches(&m.platform))
            .or_else(|| list.iter().find(|m| m.platform.is_none()))
            .cloned()
            .ok_or_else(|| OciError::Select {
                origin: r.origin.clone(),
                detail: format!(
                    "no image for linux/{} (platforms: {})",
                    host_arch(),
                    list.iter()
                        .filter_map(|m| m.platform.as_ref())
                        .map(|p| format!("{}/{}", p.os, p.architecture))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        return resolve_manifest(r, pick, depth + 1);
    }
    if !is_manifest(&media_type) {
        return Err(OciError::Unsupported {
            what: "manifest",
            media_type,
            origin: r.origin.clone(),
            hint: " (not a container image manifest)",
        });
    }
    Ok((d.digest, doc))
}

fn build_image(r: &Reader<'_>, digest: String, manifest: Document) -> Result<Image, OciError> {
    let config = manifest
        .config
        .ok_or_else(|| r.malformed(format!("manifest {digest}"), "no config"))?;
    let config_type = config.media_type.clone().unwrap_or_default();
    if config_type != OCI_CONFIG && config_type != DOCKER_CONFIG {
        return Err(OciError::Unsupported {
            what: "config",
            media_type: config_type,
            origin: r.origin.clone(),
            hint: " (an OCI artifact, not a container image?)",
        });
    }
    let config_bytes = r.read_blob(&config)?;
    let parsed = ConfigFile::parse(&config_bytes)
        .map_err(|e| r.malformed(format!("config {}", config.digest), e))?;
    let mut layers = Vec::new();
    for l in manifest.layers.unwrap_or_default() {
        let media_type = l.media_type.clone().unwrap_or_default();
        if !layer_type_ok(&media_type) {
            return Err(OciError::Unsupported {
                what: "layer",
                media_type,
                origin: r.origin.clone(),
                hint: if l
                    .media_type
                    .as_deref()
                    .unwrap_or("")
                    .ends_with("+encrypted")
                {
                    " (encrypted layers)"
                } else {
                    ""
                },
            });
        }
        let size = u64::try_from(l.size)
            .map_err(|_| r.malformed("manifest", format!("negative size for {}", l.digest)))?;
        layers.push(LayerInfo {
            member: r.blob_member(&l.digest)?,
            digest: Some(l.digest),
            size,
            media_type,
        });
    }
    warn_arch(&parsed, &r.origin);
    Ok(Image {
        origin: r.origin.clone(),
        digest,
        config_digest: config.digest,
        config: parsed,
        config_bytes,
        layers,
        source: Source::Dir(PathBuf::new()),
    })
}

fn warn_arch(config: &ConfigFile, origin: &str) {
    if let Some(arch) = &config.architecture {
        if arch != host_arch() {
            tracing::warn!(
                "{origin} is built for {arch}, this machine is {}: its programs may not run",
                host_arch()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// docker save archives.

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// `busybox` matches `busybox:latest`; `docker.io/library/busybox:1` matches `busybox:1`.
fn docker_name_matches(tag: &str, wanted: &str) -> bool {
    let norm = |s: &str| {
        let s = s
            .strip_prefix("docker.io/")
            .or_else(|| s.strip_prefix("index.docker.io/"))
            .unwrap_or(s);
        let s = s.strip_prefix("library/").unwrap_or(s);
        let has_tag = s.rsplit_once(':').is_some_and(|(_, t)| !t.contains('/'));
        if has_tag {
            s.to_string()
        } else {
            format!("{s}:latest")
        }
    };
    norm(tag) == norm(wanted)
}

fn resolve_docker(
    source: Source,
    origin: String,
    reference: Option<&str>,
) -> Result<Image, OciError> {
    let r = Reader {
        source: &source,
        origin: origin.clone(),
    };
    let select = |detail: String| OciError::Select {
        origin: origin.clone(),
        detail,
    };
    let Some(manifest) = r.read_member("manifest.json")? else {
        let img = resolve_legacy(&r, reference)?;
        return Ok(Image { source, ..img });
    };
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(&manifest).map_err(|e| r.malformed("manifest.json", e))?;
    let all_tags = || {
        entries
            .iter()
            .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let entry = match reference {
        Some(wanted) => entries
            .iter()
            .find(|e| {
                e.repo_tags
                    .iter()
                    .flatten()
                    .any(|t| docker_name_matches(t, wanted))
            })
            .ok_or_else(|| select(format!("no image named '{wanted}' (names: {})", all_tags())))?,
        None => match entries.as_slice() {
            [one] => one,
            [] => return Err(r.malformed("manifest.json", "it lists no images")),
            _ => {
                return Err(select(format!(
                "it holds {} images; name one, e.g. docker-archive:{origin}:NAME:TAG (names: {})",
                entries.len(),
                all_tags()
            )))
            }
        },
    };
    let config_bytes = r
        .read_member(&entry.config)?
        .ok_or_else(|| OciError::Missing {
            what: format!("config {}", entry.config),
            origin: origin.clone(),
        })?;
    let config_digest = sha256_digest(&config_bytes);
    // The config's file name is its digest (the image id): check it when it says so.
    let stem = entry
        .config
        .rsplit('/')
        .next()
        .unwrap_or("")
        .trim_end_matches(".json");
    if stem.len() == 64
        && stem.bytes().all(|b| b.is_ascii_hexdigit())
        && config_digest[7..] != *stem
    {
        return Err(OciError::DigestMismatch {
            digest: format!("sha256:{stem}"),
            actual: config_digest,
            origin,
        });
    }
    let parsed = ConfigFile::parse(&config_bytes)
        .map_err(|e| r.malformed(format!("config {}", entry.config), e))?;
    if parsed.diff_ids.len() != entry.layers.len() {
        return Err(r.malformed(
            "manifest.json",
            format!(
                "{} layers listed but the config has {} diff_ids",
                entry.layers.len(),
                parsed.diff_ids.len()
            ),
        ));
    }
    let mut layers = Vec::new();
    for (member, diff_id) in entry.layers.iter().zip(&parsed.diff_ids) {
        check_digest(diff_id).map_err(|d| r.malformed("config diff_ids", d))?;
        let size = source
            .open(member)
            .map_err(r.io(member.clone()))?
            .map(|(_, len)| len)
            .ok_or_else(|| OciError::Missing {
                what: format!("layer {member}"),
                origin: origin.clone(),
            })?;
        layers.push(LayerInfo {
            digest: Some(diff_id.clone()),
            size,
            media_type: DOCKER_LAYER.into(),
            member: member.clone(),
        });
    }
    warn_arch(&parsed, &origin);
    drop(r);
    Ok(Image {
        origin,
        digest: config_digest.clone(),
        config_digest,
        config: parsed,
        config_bytes,
        layers,
        source,
    })
}

/// The pre-1.10 `docker save` form: `repositories` names a top layer id; each
/// `<id>/json` names its parent; `<id>/layer.tar` holds the layer. No digests to check.
fn resolve_legacy(r: &Reader<'_>, reference: Option<&str>) -> Result<Image, OciError> {
    let repos = r
        .read_member("repositories")?
        .ok_or_else(|| OciError::Missing {
            what: "manifest.json (or the legacy repositories file)".into(),
            origin: r.origin.clone(),
        })?;
    let repos: HashMap<String, HashMap<String, String>> =
        serde_json::from_slice(&repos).map_err(|e| r.malformed("repositories", e))?;
    let mut named: Vec<(String, String)> = repos
        .iter()
        .flat_map(|(repo, tags)| {
            tags.iter()
                .map(move |(t, id)| (format!("{repo}:{t}"), id.clone()))
        })
        .collect();
    named.sort();
    let select = |detail: String| OciError::Select {
        origin: r.origin.clone(),
        detail,
    };
    let names = named
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let top = match reference {
        Some(w) => named
            .iter()
            .find(|(n, _)| docker_name_matches(n, w))
            .ok_or_else(|| select(format!("no image named '{w}' (names: {names})")))?,
        None => match named.as_slice() {
            [one] => one,
            _ => {
                return Err(select(format!(
                    "it holds {} images; name one (names: {names})",
                    named.len()
                )))
            }
        },
    };
    let mut id = top.1.clone();
    let mut chain = Vec::new();
    let mut top_json = None;
    for _ in 0..=256 {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(r.malformed("repositories", format!("bad layer id '{id}'")));
        }
        let bytes = r
            .read_member(&format!("{id}/json"))?
            .ok_or_else(|| OciError::Missing {
                what: format!("{id}/json"),
                origin: r.origin.clone(),
            })?;
        let json: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| r.malformed(format!("{id}/json"), e))?;
        let parent = json
            .get("parent")
            .and_then(|p| p.as_str())
            .map(str::to_string);
        chain.push(id.clone());
        if top_json.is_none() {
            top_json = Some((bytes, json));
        }
        match parent {
            Some(p) if !p.is_empty() => id = p,
            _ => break,
        }
    }
    let (top_bytes, top_json) = top_json.expect("at least one layer was read");
    let mut layers = Vec::new();
    for id in chain.iter().rev() {
        let member = format!("{id}/layer.tar");
        if let Some((_, size)) = r.source.open(&member).map_err(r.io(member.clone()))? {
            layers.push(LayerInfo {
                digest: None,
                size,
                media_type: DOCKER_LAYER.into(),
                member,
            });
        }
    }
    let config = ConfigFile {
        architecture: top_json
            .get("architecture")
            .and_then(|a| a.as_str())
            .map(str::to_string),
        os: top_json
            .get("os")
            .and_then(|a| a.as_str())
            .map(str::to_string),
        config: top_json
            .get("config")
            .map(super::config::ImageConfig::parse_legacy)
            .unwrap_or_default(),
        diff_ids: Vec::new(),
    };
    let digest = sha256_digest(&top_bytes);
    Ok(Image {
        origin: r.origin.clone(),
        digest: digest.clone(),
        config_digest: digest,
        config,
        config_bytes: top_bytes,
        layers,
        source: Source::Dir(PathBuf::new()),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A small OCI layout written by the tests themselves: one gzip layer holding
    /// `/hello` (and whatever else `files` adds).
    pub(crate) struct TestLayout {
        pub dir: tempfile::TempDir,
        pub manifest_digest: String,
        pub layer_digest: String,
    }

    pub(crate) fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, body) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            b.append_data(&mut h, name, *body).unwrap();
        }
        b.into_inner().unwrap()
    }

    pub(crate) fn write_blob(dir: &Path, bytes: &[u8]) -> String {
        let d = sha256_digest(bytes);
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("blobs/sha256").join(&d[7..]), bytes).unwrap();
        d
    }

    pub(crate) fn make_layout(files: &[(&str, &[u8])], tag: &str) -> TestLayout {
        let dir = tempfile::tempdir().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&layer_tar(files)).unwrap();
        let layer = gz.finish().unwrap();
        let layer_digest = write_blob(dir.path(), &layer);
        let config = format!(
            r#"{{"architecture":"{}","os":"linux","config":{{"Env":["PATH=/bin","FOO=bar"],"Cmd":["/bin/sh"],"WorkingDir":"/srv"}},"rootfs":{{"type":"layers","diff_ids":["sha256:{}"]}}}}"#,
            host_arch(),
            "0".repeat(64)
        );
        let config_digest = write_blob(dir.path(), config.as_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{}}}]}}"#,
            config.len(),
            layer.len()
        );
        let manifest_digest = write_blob(dir.path(), manifest.as_bytes());
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{manifest_digest}","size":{},"annotations":{{"{REF_NAME}":"{tag}"}}}}]}}"#,
            manifest.len()
        );
        std::fs::write(dir.path().join("index.json"), index).unwrap();
        std::fs::write(
            dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        TestLayout {
            dir,
            manifest_digest,
            layer_digest,
        }
    }

    fn read_all_layers(img: &Image) -> Result<(), OciError> {
        for i in 0..img.layers.len() {
            let mut r = img.layer(i)?;
            io::copy(&mut r, &mut io::sink()).unwrap();
            r.finish()?;
        }
        Ok(())
    }

    #[test]
    fn reads_a_layout() {
        let l = make_layout(&[("hello", b"hi\n")], "v1");
        let img = Image::open_layout(l.dir.path(), None).unwrap();
        assert_eq!(img.digest, l.manifest_digest);
        assert_eq!(img.config.config.working_dir.as_deref(), Some("/srv"));
        assert_eq!(img.layers.len(), 1);
        read_all_layers(&img).unwrap();
        assert!(Image::open_layout(l.dir.path(), Some("v1")).is_ok());
        assert!(name_matches("docker.io/library/app:v1", "app:v1"));
        assert!(name_matches("example.com/app:v1", "v1"));
        assert!(!name_matches("example.com/app:v11", "v1"));
        assert!(Image::open_layout(l.dir.path(), Some(&l.manifest_digest)).is_ok());
        let e = Image::open_layout(l.dir.path(), Some("v2")).unwrap_err();
        assert!(
            e.to_string().contains("no image tagged 'v2'") && e.to_string().contains("v1"),
            "{e}"
        );
    }

    /// Every layer type a registry download accepts is read by the importer too: a docker
    /// layer compressed with zstd (the registry client took it, the importer used to refuse
    /// it after the whole download).
    #[test]
    fn zstd_docker_layers_are_read() {
        let l = make_layout(&[("hello", b"hi\n")], "v1");
        let blobs = l.dir.path().join("blobs/sha256");
        let zstd = ruzstd::encoding::compress_to_vec(
            &layer_tar(&[("hello", b"zstd\n")])[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let layer_digest = write_blob(l.dir.path(), &zstd);
        let manifest = std::fs::read_to_string(blobs.join(&l.manifest_digest[7..])).unwrap();
        let old_size = std::fs::metadata(blobs.join(&l.layer_digest[7..]))
            .unwrap()
            .len();
        let manifest = manifest
            .replace(&l.layer_digest, &layer_digest)
            .replace(
                &format!("\"size\":{old_size}}}]"),
                &format!("\"size\":{}}}]", zstd.len()),
            )
            .replace(
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "application/vnd.docker.image.rootfs.diff.tar.zstd",
            );
        let manifest_digest = write_blob(l.dir.path(), manifest.as_bytes());
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{manifest_digest}","size":{}}}]}}"#,
            manifest.len()
        );
        std::fs::write(l.dir.path().join("index.json"), index).unwrap();
        let img = Image::open_layout(l.dir.path(), None).unwrap();
        assert_eq!(
            img.layers[0].media_type,
            "application/vnd.docker.image.rootfs.diff.tar.zstd"
        );
        let mut tar = Vec::new();
        let mut r = img.layer(0).unwrap();
        crate::image::layers::decompress(&mut r)
            .unwrap()
            .read_to_end(&mut tar)
            .unwrap();
        r.finish().unwrap();
        assert!(
            tar.windows(5).any(|w| w == b"zstd\n"),
            "the layer decompressed"
        );
        for t in media_type::LAYERS {
            assert!(layer_type_ok(t), "{t}");
        }
    }

    #[test]
    fn corrupt_layouts_are_refused_clearly() {
        let l = make_layout(&[("hello", b"hi\n")], "v1");
        let blob = l.dir.path().join("blobs/sha256").join(&l.layer_digest[7..]);
        let mut bytes = std::fs::read(&blob).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&blob, &bytes).unwrap();
        let img = Image::open_layout(l.dir.path(), None).unwrap();
        let e = read_all_layers(&img).unwrap_err();
        assert!(matches!(e, OciError::DigestMismatch { .. }), "{e}");
        std::fs::remove_file(&blob).unwrap();
        let img = Image::open_layout(l.dir.path(), None).unwrap();
        let e = read_all_layers(&img).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");

        let manifest = l
            .dir
            .path()
            .join("blobs/sha256")
            .join(&l.manifest_digest[7..]);
        std::fs::write(&manifest, b"{not json").unwrap();
        let e = Image::open_layout(l.dir.path(), None).unwrap_err();
        assert!(
            matches!(
                e,
                OciError::SizeMismatch { .. } | OciError::DigestMismatch { .. }
            ),
            "{e}"
        );

        std::fs::write(l.dir.path().join("index.json"), b"{\"manifests\": 3}").unwrap();
        let e = Image::open_layout(l.dir.path(), None).unwrap_err();
        assert!(e.to_string().contains("malformed index.json"), "{e}");
        std::fs::remove_file(l.dir.path().join("oci-layout")).unwrap();
        let e = Image::open_layout(l.dir.path(), None).unwrap_err();
        assert!(matches!(e, OciError::NotLayout { .. }), "{e}");
    }

    #[test]
    fn artifacts_and_bad_digests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_blob(dir.path(), b"{}");
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"{cfg}","size":2}},"layers":[]}}"#
        );
        let md = write_blob(dir.path(), manifest.as_bytes());
        std::fs::write(
            dir.path().join("index.json"),
            format!(
                r#"{{"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{md}","size":{}}}]}}"#,
                manifest.len()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let e = Image::open_layout(dir.path(), None).unwrap_err();
        assert!(e.to_string().contains("unsupported config"), "{e}");
        // A digest that would name a path outside blobs/ is refused before any open.
        std::fs::write(
            dir.path().join("index.json"),
            r#"{"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:../../etc/passwd","size":1}]}"#,
        )
        .unwrap();
        let e = Image::open_layout(dir.path(), None).unwrap_err();
        assert!(e.to_string().contains("64 lowercase hex"), "{e}");
    }

    #[test]
    fn nested_index_picks_this_platform() {
        let l = make_layout(&[("hello", b"hi\n")], "v1");
        let d = l.dir.path();
        let msize = std::fs::metadata(d.join("blobs/sha256").join(&l.manifest_digest[7..]))
            .unwrap()
            .len();
        let inner = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
                {{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{}","size":1,"platform":{{"os":"linux","architecture":"mips"}}}},
                {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{msize},"platform":{{"os":"linux","architecture":"{}"}}}}]}}"#,
            "1".repeat(64),
            l.manifest_digest,
            host_arch()
        );
        let inner_digest = write_blob(d, inner.as_bytes());
        std::fs::write(
            d.join("index.json"),
            format!(r#"{{"manifests":[{{"mediaType":"{OCI_INDEX}","digest":"{inner_digest}","size":{}}}]}}"#, inner.len()),
        )
        .unwrap();
        let img = Image::open_layout(d, None).unwrap();
        assert_eq!(img.digest, l.manifest_digest);
        // A platform manifest can be named by its digest, below the index.
        let img = Image::open_layout(d, Some(&l.manifest_digest)).unwrap();
        assert_eq!(img.digest, l.manifest_digest);
    }

    #[test]
    fn a_lone_image_of_another_platform_is_still_the_one() {
        let l = make_layout(&[("hello", b"hi\n")], "v1");
        let index = l.dir.path().join("index.json");
        let text = std::fs::read_to_string(&index).unwrap().replace(
            "\"annotations\"",
            "\"platform\":{\"os\":\"linux\",\"architecture\":\"mips\"},\"annotations\"",
        );
        std::fs::write(&index, text).unwrap();
        assert_eq!(
            Image::open_layout(l.dir.path(), None).unwrap().digest,
            l.manifest_digest
        );
    }

    #[test]
    fn a_fifo_in_a_layout_does_not_hang() {
        let l = make_layout(&[("hello", b"hi\n")], "v1");
        let blob = l
            .dir
            .path()
            .join("blobs/sha256")
            .join(&l.manifest_digest[7..]);
        std::fs::remove_file(&blob).unwrap();
        nix::unistd::mkfifo(&blob, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = Image::open_layout(l.dir.path(), None).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    fn tar_of_dir(dir: &Path, out: &Path) {
        let mut b = tar::Builder::new(File::create(out).unwrap());
        b.append_dir_all(".", dir).unwrap();
        b.finish().unwrap();
    }

    #[test]
    fn reads_an_oci_archive_in_place() {
        let l = make_layout(&[("hello", b"hi\n")], "v1");
        let t = tempfile::tempdir().unwrap();
        let archive = t.path().join("img.tar");
        tar_of_dir(l.dir.path(), &archive);
        assert_eq!(archive_kind(&archive), Some(ArchiveKind::Oci));
        let img = Image::open_oci_archive(&archive, Some("v1")).unwrap();
        assert_eq!(img.digest, l.manifest_digest);
        read_all_layers(&img).unwrap();
    }

    /// `docker save` output, written by hand: manifest.json, <id>.json, <dir>/layer.tar,
    /// and a symlinked duplicate layer as docker writes it.
    pub(crate) fn make_docker_archive(out: &Path, files: &[(&str, &[u8])]) -> String {
        let layer = layer_tar(files);
        let diff = sha256_digest(&layer);
        let config = format!(
            r#"{{"architecture":"{}","os":"linux","config":{{"Env":["A=1"]}},"rootfs":{{"type":"layers","diff_ids":["{diff}","{diff}"]}}}}"#,
            host_arch()
        );
        let cid = sha256_digest(config.as_bytes());
        let manifest = format!(
            r#"[{{"Config":"{}.json","RepoTags":["busybox:1.36"],"Layers":["aaa/layer.tar","bbb/layer.tar"]}}]"#,
            &cid[7..]
        );
        let mut b = tar::Builder::new(File::create(out).unwrap());
        let mut add = |name: &str, body: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, body).unwrap();
        };
        add("manifest.json", manifest.as_bytes());
        add(&format!("{}.json", &cid[7..]), config.as_bytes());
        add("aaa/layer.tar", &layer);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "bbb/layer.tar", "../aaa/layer.tar")
            .unwrap();
        b.finish().unwrap();
        cid
    }

    #[test]
    fn reads_a_docker_archive() {
        let t = tempfile::tempdir().unwrap();
        let archive = t.path().join("save.tar");
        let cid = make_docker_archive(&archive, &[("hello", b"hi\n")]);
        assert_eq!(archive_kind(&archive), Some(ArchiveKind::Docker));
        let img = Image::open_docker_archive(&archive, None).unwrap();
        assert_eq!(img.digest, cid);
        assert_eq!(img.layers.len(), 2);
        assert_eq!(img.config.config.env, vec!["A=1".to_string()]);
        read_all_layers(&img).unwrap();
        assert!(
            Image::open_docker_archive(&archive, Some("docker.io/library/busybox:1.36")).is_ok()
        );
        let e = Image::open_docker_archive(&archive, Some("alpine")).unwrap_err();
        assert!(e.to_string().contains("busybox:1.36"), "{e}");
    }

    #[test]
    fn reads_a_legacy_docker_archive() {
        let t = tempfile::tempdir().unwrap();
        let archive = t.path().join("old.tar");
        let (base, top) = ("a".repeat(64), "b".repeat(64));
        let mut b = tar::Builder::new(File::create(&archive).unwrap());
        let mut add = |name: &str, body: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, body).unwrap();
        };
        add(
            "repositories",
            format!(r#"{{"old":{{"latest":"{top}"}}}}"#).as_bytes(),
        );
        add(
            &format!("{base}/json"),
            format!(r#"{{"id":"{base}"}}"#).as_bytes(),
        );
        add(&format!("{base}/layer.tar"), &layer_tar(&[("one", b"1")]));
        add(
            &format!("{top}/json"),
            format!(
                r#"{{"id":"{top}","parent":"{base}","config":{{"Env":["X=y"],"WorkingDir":"/x"}}}}"#
            )
            .as_bytes(),
        );
        add(&format!("{top}/layer.tar"), &layer_tar(&[("two", b"2")]));
        b.finish().unwrap();
        drop(b);
        let img = Image::open_docker_archive(&archive, None).unwrap();
        assert_eq!(img.layers.len(), 2);
        assert_eq!(img.layers[0].member, format!("{base}/layer.tar"));
        assert_eq!(img.config.config.working_dir.as_deref(), Some("/x"));
        read_all_layers(&img).unwrap();
    }
}

//! A client for the OCI distribution API (`docker://` images): resolve a tag to a digest,
//! and pull an image into an OCI image layout directory.
//!
//! What a pull leaves in its destination directory (the contract with the importer):
//! - `oci-layout`: `{"imageLayoutVersion":"1.0.0"}`;
//! - `index.json`: an OCI index naming exactly one manifest — the one for this machine's
//!   platform — with the annotation `org.opencontainers.image.ref.name` set to the tag
//!   (absent when the reference had only a digest). Its `mediaType` is the manifest's own,
//!   which may be Docker's schema 2 type as well as OCI's;
//! - `blobs/sha256/<hex>`: that manifest, its config and its layers, byte for byte as the
//!   registry sent them (layers still compressed: gzip, zstd or plain tar), each checked
//!   against its digest and size;
//! - `.ferry-pull.lock` (empty) and, after an interrupted pull, `blobs/sha256/.<hex>.partial`
//!   files that the next pull into the same directory continues.
//!
//! `index.json` is written last: a directory without it is an unfinished pull.

mod auth;
mod layout;
pub mod manifest;
pub mod mirrors;
pub mod progress;
pub mod settings;
mod tls;
mod transport;

#[cfg(test)]
mod test_server;
#[cfg(test)]
mod tests;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use crate::image::platform::PlatformExt;
pub use crate::image::reference::RemoteRef;
pub use auth::{CredentialError, CredentialSources, Credentials};
pub use layout::{LOCK_FILE, REF_NAME_ANNOTATION};
pub use oci_spec::image::{Descriptor, Platform};
pub use progress::Progress;

use crate::image::digest::sha256_digest;
use crate::image::manifest::{media_type_of, Document, ManifestProblem, SchemaVersion};
use layout::Layout;
use transport::{header, Fetch, Target, Transport};

/// `docker://registry/repository:tag` as the user wrote it (a pinned digest is left out
/// where there is a tag: it is long and the user did not write it).
pub(crate) fn user_label(r: &RemoteRef) -> String {
    match (&r.tag, &r.digest) {
        (Some(t), _) => format!("docker://{}/{}:{t}", r.registry, r.repository),
        (None, Some(d)) => format!("docker://{}/{}@{d}", r.registry, r.repository),
        (None, None) => format!("docker://{}/{}", r.registry, r.repository),
    }
}

/// How the client talks to registries.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Registries reached over plain http (`host` or `host:port`); all others use https.
    pub insecure_registries: Vec<String>,
    /// Mirrors tried before a registry (registries.conf files).
    pub mirrors: mirrors::Mirrors,
    pub credentials: CredentialSources,
    /// Blobs downloaded at once.
    pub parallel: usize,
    /// Further tries after a failed one (connection errors, 429, 5xx, cut-off downloads).
    pub retries: u32,
    /// Pause before the first retry; doubled for each further one (at most 30 s).
    pub retry_delay: Duration,
    pub progress: Progress,
    /// Extra PEM CA certificates trusted besides the system's (a site registry's private CA).
    pub ca_file: Option<PathBuf>,
    pub user_agent: String,
    /// Which image of a multi-platform index to pull.
    pub platform: Platform,
    pub connect_timeout: Duration,
    /// A connection that delivers nothing for this long is given up (and retried).
    pub read_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure_registries: Vec::new(),
            mirrors: mirrors::Mirrors::default(),
            credentials: CredentialSources::from_env(),
            parallel: 4,
            retries: 5,
            retry_delay: Duration::from_secs(1),
            progress: Progress::auto(),
            ca_file: None,
            user_agent: concat!("ferry/", env!("CARGO_PKG_VERSION")).to_string(),
            platform: Platform::host(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
        }
    }
}

impl ClientOptions {
    /// The defaults with `settings` applied: the site's (plugstack.conf), or those
    /// `ferry import` read from its environment; and the mirrors of the site's registries
    /// file and of the user's below `home`.
    pub fn with_site(
        settings: &settings::ImportSettings,
        home: Option<&Path>,
    ) -> Result<ClientOptions, mirrors::MirrorsError> {
        let mut opts = ClientOptions {
            insecure_registries: settings.insecure_registries.clone(),
            mirrors: mirrors::Mirrors::load(settings.registries_conf.as_deref(), home)?,
            ca_file: settings.ca_file.clone(),
            ..ClientOptions::default()
        };
        if let Some(n) = settings.retries {
            opts.retries = n;
        }
        if let Some(secs) = settings.timeout_secs {
            opts.read_timeout = Duration::from_secs(secs.max(1));
            opts.connect_timeout = opts.read_timeout;
        }
        Ok(opts)
    }
}

/// The manifest a reference stands for on this client's platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The platform manifest's digest: the identity of the image that would be pulled.
    pub manifest_digest: String,
    pub media_type: String,
    pub size: u64,
    /// The multi-platform index the manifest was chosen from, if the reference named one.
    pub index_digest: Option<String>,
    /// The platform the index entry declared.
    pub platform: Option<Platform>,
}

/// What a pull wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    pub manifest_digest: String,
    pub manifest_media_type: String,
    pub config_digest: String,
    /// Bottom layer first, as in the manifest.
    pub layers: Vec<Descriptor>,
    /// Bytes downloaded in this pull (blobs already present cost nothing).
    pub fetched_bytes: u64,
    /// Blobs that were already complete in the destination.
    pub reused_blobs: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("bad image reference {image}: {reason}")]
    BadReference {
        image: String,
        reason: crate::image::reference::NameError,
    },
    #[error("unknown registry host {host}: the name does not resolve (check the image reference)")]
    UnknownHost { host: String },
    #[error("TLS connection to {host} failed: {reason} (a registry with a private CA needs the site's registry CA file; a plain-http registry must be marked insecure)")]
    Tls { host: String, reason: String },
    #[error("cannot get {what} from registry {registry}: {reason} (gave up after {tries} tries)")]
    GaveUp {
        registry: String,
        what: String,
        reason: String,
        tries: u32,
    },
    #[error("registry {registry} refused anonymous access to {repository}: log in: put credentials in {hint} (`machine {registry} login USER password PASS`); a misspelled image name gets this answer too")]
    LoginNeeded {
        registry: String,
        repository: String,
        hint: String,
    },
    #[error("registry {registry} refused the login `{login}` (from {}) for {repository}: check the password or token, and that this account may pull this image", file.display())]
    CredentialsRejected {
        registry: String,
        repository: String,
        login: String,
        file: PathBuf,
    },
    #[error("no such image or tag: {image} {detail}")]
    NotFound { image: String, detail: String },
    #[error("registry {registry} has no blob {digest} although the manifest of {image} names it")]
    BlobNotFound {
        registry: String,
        image: String,
        digest: String,
    },
    #[error("{image} is a Docker schema 1 image, which ferry does not support (deprecated since 2017): push it again with a current docker, podman or skopeo")]
    Schema1 { image: String },
    #[error("{image} has no image for {wanted}; it has: {}", available.join(", "))]
    NoPlatform {
        image: String,
        wanted: String,
        available: Vec<String>,
    },
    #[error(
        "{what} from registry {registry} is corrupt: expected digest {expected}, got {actual}"
    )]
    DigestMismatch {
        registry: String,
        what: String,
        expected: String,
        actual: String,
    },
    #[error(
        "{what} from registry {registry} is larger than the {expected} bytes its descriptor says"
    )]
    SizeMismatch {
        registry: String,
        what: String,
        expected: u64,
    },
    #[error("bad manifest for {image}: {reason}")]
    BadManifest { image: String, reason: String },
    #[error("{image}: unsupported {what}")]
    Unsupported { image: String, what: String },
    #[error("registry {registry}: {what}: {detail}")]
    Http {
        registry: String,
        what: String,
        detail: String,
    },
    #[error("registry {registry} wants logins sent to {realm} over plain http; refused (mark the registry insecure if that is really intended)")]
    InsecureRealm { registry: String, realm: String },
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error("registry CA file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot get {image} from any of its sources: {}", tried.join("; "))]
    NoSource { image: String, tried: Vec<String> },
}

impl RegistryError {
    /// Whether a mirror that failed this way is passed over for the next source: it cannot
    /// be reached, refuses, or lacks the image. Content that does not match its digest is
    /// not passed over: a mirror serving it is broken or tampered with.
    fn passes_to_next_source(&self) -> bool {
        matches!(
            self,
            RegistryError::UnknownHost { .. }
                | RegistryError::Tls { .. }
                | RegistryError::GaveUp { .. }
                | RegistryError::LoginNeeded { .. }
                | RegistryError::CredentialsRejected { .. }
                | RegistryError::NotFound { .. }
                | RegistryError::BlobNotFound { .. }
                | RegistryError::Http { .. }
                | RegistryError::InsecureRealm { .. }
        )
    }
}

/// A registry client; cheap to share between threads, and it keeps the tokens it got.
pub struct Client {
    options: ClientOptions,
    transport: Transport,
}

/// A fetched manifest: its descriptor, its exact bytes, and what they say.
struct Fetched {
    descriptor: Descriptor,
    bytes: Vec<u8>,
    parsed: Document,
}

impl Client {
    pub fn new(options: ClientOptions) -> Result<Client, RegistryError> {
        let transport = Transport::new(&options)?;
        Ok(Client { options, transport })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    fn insecure(&self, r: &RemoteRef) -> bool {
        let host = r
            .registry
            .rsplit_once(':')
            .map_or(r.registry.as_str(), |(h, _)| h);
        self.options
            .insecure_registries
            .iter()
            .any(|i| i.eq_ignore_ascii_case(&r.registry) || i.eq_ignore_ascii_case(host))
    }

    /// Run `attempt` against `r`'s sources in order (its mirrors, then the registry itself)
    /// until one succeeds; a mirror that cannot help is passed over with a debug line. When
    /// all fail, the error names each source and what it answered.
    fn try_sources<T>(
        &self,
        r: &RemoteRef,
        mut attempt: impl FnMut(&Target) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let bad_reference = |r: &RemoteRef, reason| RegistryError::BadReference {
            image: transport::printable(&r.short_name(), 200),
            reason,
        };
        r.validate().map_err(|reason| bad_reference(r, reason))?;
        let sources = self.options.mirrors.sources(r);
        let mut tried = Vec::new();
        let count = sources.len();
        for (i, source) in sources.into_iter().enumerate() {
            let reference = &source.reference;
            let result = reference
                .validate()
                .map_err(|reason| bad_reference(reference, reason))
                .and_then(|()| {
                    let insecure = source.insecure || self.insecure(reference);
                    let mut target = Target::new(reference, insecure);
                    if source.mirror {
                        // A dead mirror should cost a moment, not the full backoff.
                        target.manifest_retries = Some(self.options.retries.min(1));
                    }
                    attempt(&target)
                });
            let e = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let what = match source.mirror {
                true => format!("mirror {}", reference.registry),
                false => reference.registry.clone(),
            };
            if i + 1 < count && e.passes_to_next_source() {
                tracing::debug!("{what}: {e}; trying the next source");
                tried.push(format!("{what}: {e}"));
                continue;
            }
            if tried.is_empty() || !e.passes_to_next_source() {
                return Err(e);
            }
            tried.push(format!("{what}: {e}"));
            break;
        }
        Err(RegistryError::NoSource {
            image: user_label(r),
            tried,
        })
    }

    /// Which manifest `r` stands for on this client's platform (one or two small requests;
    /// no blob is fetched).
    pub fn resolve(&self, r: &RemoteRef) -> Result<Resolved, RegistryError> {
        self.try_sources(r, |target| {
            let (resolved, _) = self.resolve_inner(target, false)?;
            Ok(resolved)
        })
    }

    /// Follow the reference to a platform manifest; with `fetch`, also download that
    /// manifest when the reference named an index.
    fn resolve_inner(
        &self,
        target: &Target,
        fetch: bool,
    ) -> Result<(Resolved, Option<Fetched>), RegistryError> {
        let r = target.reference;
        let mut current = self.fetch_manifest(target, r.reference(), r.digest.as_deref(), None)?;
        let mut index_digest = None;
        let mut platform = None;
        // An index may (rarely) point at another index; two levels is all anyone builds.
        for _ in 0..3 {
            let manifests = match &current.parsed {
                Document::Manifest { .. } => {
                    let resolved = Resolved {
                        manifest_digest: current.descriptor.digest().to_string(),
                        media_type: media_type_of(&current.descriptor).to_string(),
                        size: current.descriptor.size(),
                        index_digest,
                        platform,
                    };
                    return Ok((resolved, Some(current)));
                }
                Document::Index { index, .. } => index.manifests(),
            };
            let entry = crate::image::platform::select(manifests, &self.options.platform).map_err(
                |missing| RegistryError::NoPlatform {
                    image: target.image.clone(),
                    wanted: missing.wanted,
                    available: missing.available,
                },
            )?;
            let d = entry.clone();
            tracing::debug!(
                "{}: {} is {}",
                target.image,
                self.options.platform.name(),
                d.digest()
            );
            index_digest.get_or_insert_with(|| current.descriptor.digest().to_string());
            platform = entry.platform().clone();
            let media_type = media_type_of(&d).to_string();
            if !fetch && !crate::image::media_type::is_index(&media_type) && !media_type.is_empty()
            {
                let resolved = Resolved {
                    manifest_digest: d.digest().to_string(),
                    media_type,
                    size: d.size(),
                    index_digest,
                    platform,
                };
                return Ok((resolved, None));
            }
            let digest = d.digest().to_string();
            current = self.fetch_manifest(target, &digest, Some(&digest), Some(d.size()))?;
        }
        Err(RegistryError::BadManifest {
            image: target.image.clone(),
            reason: "indexes nested more than two deep".into(),
        })
    }

    /// GET one manifest or index, bounded in size; checked against `digest` when given.
    fn fetch_manifest(
        &self,
        target: &Target,
        reference: &str,
        digest: Option<&str>,
        size: Option<u64>,
    ) -> Result<Fetched, RegistryError> {
        let what = format!("manifest {reference}");
        let retries = target.manifest_retries.unwrap_or(self.options.retries);
        let (bytes, content_type) = self.transport.with_retries(target, &what, retries, || {
            let response = self.transport.get(
                target,
                &format!("manifests/{reference}"),
                Some(manifest::ACCEPT),
                0,
                Fetch::Manifest(reference),
            )?;
            let content_type = header(&response, "content-type");
            let mut bytes = Vec::new();
            response
                .into_body()
                .into_reader()
                .take(manifest::MAX_MANIFEST_BYTES + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| transport::retry(format!("reading the manifest: {e}")))?;
            Ok((bytes, content_type))
        })?;
        if bytes.len() as u64 > manifest::MAX_MANIFEST_BYTES {
            return Err(RegistryError::BadManifest {
                image: target.image.clone(),
                reason: format!("larger than {} bytes", manifest::MAX_MANIFEST_BYTES),
            });
        }
        let actual = sha256_digest(&bytes);
        if let Some(expected) = digest {
            if actual != expected {
                return Err(RegistryError::DigestMismatch {
                    registry: target.reference.registry.clone(),
                    what,
                    expected: expected.to_string(),
                    actual,
                });
            }
        }
        if let Some(expected) = size {
            if expected != bytes.len() as u64 {
                return Err(RegistryError::BadManifest {
                    image: target.image.clone(),
                    reason: format!(
                        "{what} has {} bytes, its index entry says {expected}",
                        bytes.len()
                    ),
                });
            }
        }
        let problem = |p| match p {
            ManifestProblem::Schema1 => RegistryError::Schema1 {
                image: target.image.clone(),
            },
            ManifestProblem::Unsupported(what) => RegistryError::Unsupported {
                image: target.image.clone(),
                what,
            },
            ManifestProblem::Invalid(reason) => RegistryError::BadManifest {
                image: target.image.clone(),
                reason,
            },
        };
        let parsed =
            crate::image::manifest::parse(&bytes, content_type.as_deref(), SchemaVersion::Required)
                .map_err(problem)?;
        if let Document::Manifest { manifest, .. } = &parsed {
            manifest::check_pullable(manifest).map_err(problem)?;
        }
        let digest = crate::image::digest::parse_digest(&actual).map_err(|reason| {
            RegistryError::BadManifest {
                image: target.image.clone(),
                reason: reason.to_string(),
            }
        })?;
        Ok(Fetched {
            descriptor: Descriptor::new(
                crate::image::media_type::model(parsed.media_type()),
                bytes.len() as u64,
                digest,
            ),
            bytes,
            parsed,
        })
    }

    /// Pull `r` into the OCI image layout directory `dest` (created if missing); see the
    /// module documentation for what it holds afterwards. Blobs already in `dest` are not
    /// fetched again, so calling this again after an interruption continues the pull.
    pub fn pull(&self, r: &RemoteRef, dest: &Path) -> Result<Pulled, RegistryError> {
        self.try_sources(r, |target| self.pull_from(target, r, dest))
    }

    /// [`Client::pull`] from one source.
    fn pull_from(
        &self,
        target: &Target,
        r: &RemoteRef,
        dest: &Path,
    ) -> Result<Pulled, RegistryError> {
        let started = Instant::now();
        let (_, fetched) = self.resolve_inner(target, true)?;
        let Some(Fetched {
            descriptor: manifest_desc,
            bytes,
            parsed: Document::Manifest { manifest, .. },
        }) = fetched
        else {
            return Err(RegistryError::BadManifest {
                image: target.image.clone(),
                reason: "no image manifest found".into(),
            });
        };
        let layout = Layout::open(dest)?;
        layout.put_blob(&manifest_desc, &bytes)?;
        let config = manifest.config().clone();
        let layers = manifest.layers().clone();

        // The config first: it is small, and a broken one fails the pull before gigabytes
        // of layers are fetched. Identical layers (it happens) are fetched once.
        let mut blobs: Vec<&Descriptor> = Vec::with_capacity(layers.len() + 1);
        for d in std::iter::once(&config).chain(layers.iter()) {
            if !blobs.iter().any(|b| b.digest() == d.digest()) {
                blobs.push(d);
            }
        }
        let (present, missing): (Vec<&Descriptor>, Vec<&Descriptor>) =
            blobs.iter().partition(|d| layout.has_blob(d));
        let total: u64 = missing.iter().map(|d| d.size()).sum();
        tracing::info!(
            "pulling {} ({}): {} blobs to fetch ({}), {} already here",
            target.image,
            manifest_desc.digest(),
            missing.len(),
            progress::human_bytes(total),
            present.len()
        );
        let label = user_label(r);
        // A mirror (or a moved registry) is named: it is where a failure would come from.
        let via = match target.reference.registry != r.registry {
            true => format!(" from {}", target.reference.registry),
            false => String::new(),
        };
        if self.options.progress.speaks() && !missing.is_empty() {
            eprintln!(
                "ferry: importing {label}{via} on {} ({} layer{}, {} to fetch)",
                progress::node_name(),
                layers.len(),
                if layers.len() == 1 { "" } else { "s" },
                progress::human_bytes(total)
            );
        }
        let mut meter = progress::Meter::new(self.options.progress, &label, total, missing.len());
        let fetched_bytes = self.fetch_all(target, &layout, &missing, &meter)?;
        let reused_blobs = present.len();
        meter.finish();
        layout.write_index(&manifest_desc, r.tag.as_deref())?;
        tracing::info!(
            "pulled {} in {:.1} s ({} fetched)",
            target.image,
            started.elapsed().as_secs_f64(),
            progress::human_bytes(fetched_bytes)
        );
        Ok(Pulled {
            manifest_digest: manifest_desc.digest().to_string(),
            manifest_media_type: media_type_of(&manifest_desc).to_string(),
            config_digest: config.digest().to_string(),
            layers,
            fetched_bytes,
            reused_blobs,
        })
    }

    /// Download blobs on `parallel` threads. The first failure stops the others from
    /// starting new blobs; what finished stays for the next try.
    fn fetch_all(
        &self,
        target: &Target,
        layout: &Layout,
        blobs: &[&Descriptor],
        meter: &progress::Meter,
    ) -> Result<u64, RegistryError> {
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let first_error: Mutex<Option<RegistryError>> = Mutex::new(None);
        let fetched = std::sync::atomic::AtomicU64::new(0);
        let workers = self.options.parallel.clamp(1, 32).min(blobs.len().max(1));
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(d) = blobs.get(i) else { return };
                    match layout.fetch_blob(&self.transport, target, d, meter) {
                        Ok(n) => {
                            fetched.fetch_add(n, Ordering::Relaxed);
                            meter.blob_done(d.digest().as_ref(), d.size());
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                            slot.get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(fetched.into_inner()),
        }
    }
}

//! Manifests and indexes as registries serve them: media types, the fields a pull needs,
//! and the choice of one platform out of an index. Everything here parses hostile input.

use std::fmt;

use serde::Deserialize;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// What we ask for. Schema 1 is left out on purpose: a registry that can convert then sends
/// schema 2, and one that cannot sends schema 1 anyway, which we then name in the error.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The largest manifest or index we read (containerd uses the same bound): a bigger one is
/// not an image anyone built on purpose.
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// More layers than this is hostile or broken (Docker itself stops at 127; OCI sets no limit).
const MAX_LAYERS: usize = 1000;

const CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// A content descriptor: what a manifest says about one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:` and 64 lowercase hex digits (checked).
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    /// The 64 hex digits, which name the blob's file.
    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }
}

/// An OS/architecture pair with an optional variant, written `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// This machine, in the names images use (Go's GOARCH names).
    pub fn host() -> Platform {
        let arch = std::env::consts::ARCH;
        let (architecture, variant) = match arch {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", None),
            // Whether this CPU does v6 or v7 is not known at compile time; v7 is what every
            // 32-bit ARM server distribution targets.
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        }
    }

    /// `OS/ARCH[/VARIANT]`, e.g. `linux/arm64` or `linux/arm/v7`.
    pub fn parse(text: &str) -> Option<Platform> {
        let parts: Vec<&str> = text.split('/').collect();
        let ok =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Some(Platform {
                os: os.to_string(),
                architecture: normalize_arch(arch).to_string(),
                variant: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Some(Platform {
                os: os.to_string(),
                architecture: normalize_arch(arch).to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => None,
        }
    }

    /// Variants acceptable for this platform, best first; `None` stands for "not given".
    /// An empty list means any variant goes (architectures without meaningful variants).
    fn variant_preference(&self) -> Vec<Option<&str>> {
        match (self.architecture.as_str(), self.variant.as_deref()) {
            // arm64 images carry `v8` or nothing; both run on any arm64 machine.
            ("arm64", None | Some("v8")) => vec![Some("v8"), None],
            ("arm64", Some(v)) => vec![Some(v), Some("v8"), None],
            // 32-bit ARM is backwards compatible: a v7 CPU runs v6 and v5 code.
            ("arm", None | Some("v7")) => vec![Some("v7"), Some("v6"), Some("v5"), None],
            ("arm", Some("v6")) => vec![Some("v6"), Some("v5"), None],
            ("arm", Some("v8")) => vec![Some("v8"), Some("v7"), Some("v6"), Some("v5"), None],
            ("arm", Some(v)) => vec![Some(v), None],
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Some indexes use the kernel's names rather than Go's.
fn normalize_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "armhf" | "armel" => "arm",
        other => other,
    }
}

/// A parsed manifest or index, with the fields a pull uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Manifest {
        media_type: String,
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    Index {
        media_type: String,
        manifests: Vec<IndexEntry>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub descriptor: Descriptor,
    pub platform: Option<Platform>,
    /// buildx puts provenance attestations into the index as entries of platform
    /// `unknown/unknown`; they are never an image to run.
    pub attestation: bool,
}

/// Why a manifest was refused; the caller adds which image it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestProblem {
    Schema1,
    Unsupported(String),
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: Option<String>,
    size: Option<i64>,
    platform: Option<RawPlatform>,
    annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct RawPlatform {
    architecture: Option<String>,
    os: Option<String>,
    variant: Option<String>,
}

/// Media type without parameters (`; charset=utf-8`), lower case.
pub fn bare_media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Check a digest string: only sha256, which is what every registry serves.
pub fn check_digest(digest: &str) -> Result<(), String> {
    let Some(hex) = digest.strip_prefix("sha256:") else {
        let algo = digest.split(':').next().unwrap_or(digest);
        return Err(if digest.contains(':') {
            format!("digest algorithm `{algo}` is not supported (only sha256)")
        } else {
            format!("`{}` is not a digest", shorten(digest))
        });
    };
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "`{}` is not a valid sha256 digest",
            shorten(digest)
        ));
    }
    Ok(())
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(80).filter(|c| !c.is_control()).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

fn descriptor(raw: &RawDescriptor, what: &str) -> Result<Descriptor, ManifestProblem> {
    let digest = raw
        .digest
        .clone()
        .ok_or_else(|| ManifestProblem::Invalid(format!("{what} has no digest")))?;
    check_digest(&digest).map_err(|e| ManifestProblem::Invalid(format!("{what}: {e}")))?;
    let size = raw
        .size
        .ok_or_else(|| ManifestProblem::Invalid(format!("{what} has no size")))?;
    let size = u64::try_from(size)
        .map_err(|_| ManifestProblem::Invalid(format!("{what} has a negative size")))?;
    Ok(Descriptor {
        media_type: raw.media_type.clone().unwrap_or_default(),
        digest,
        size,
    })
}

/// Parse a manifest or index. `content_type` is what the registry said it sent; when it is
/// missing or generic the document's own `mediaType` and shape decide.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Parsed, ManifestProblem> {
    let header_type = content_type.map(bare_media_type).unwrap_or_default();
    if header_type == DOCKER_SCHEMA1 || header_type == DOCKER_SCHEMA1_SIGNED {
        return Err(ManifestProblem::Schema1);
    }
    let raw: RawManifest = serde_json::from_slice(bytes)
        .map_err(|e| ManifestProblem::Invalid(format!("not a JSON manifest ({e})")))?;
    if raw.schema_version == Some(1) {
        return Err(ManifestProblem::Schema1);
    }
    if raw.schema_version != Some(2) {
        return Err(ManifestProblem::Invalid(match raw.schema_version {
            Some(v) => format!("schemaVersion {v} (expected 2)"),
            None => "no schemaVersion".into(),
        }));
    }
    let body_type = raw.media_type.as_deref().map(bare_media_type);
    let known = |t: &str| {
        [
            DOCKER_MANIFEST,
            DOCKER_MANIFEST_LIST,
            OCI_MANIFEST,
            OCI_INDEX,
        ]
        .contains(&t)
    };
    let media_type = if known(&header_type) {
        header_type
    } else if let Some(t) = body_type.as_deref().filter(|t| known(t)) {
        t.to_string()
    } else if let Some(t) = body_type.filter(|t| !t.is_empty()) {
        return Err(ManifestProblem::Unsupported(t));
    } else if raw.manifests.is_some() {
        OCI_INDEX.to_string()
    } else if raw.config.is_some() {
        OCI_MANIFEST.to_string()
    } else if !header_type.is_empty() && header_type != "application/json" {
        return Err(ManifestProblem::Unsupported(header_type));
    } else {
        return Err(ManifestProblem::Invalid(
            "neither an image manifest nor an index".into(),
        ));
    };
    if media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST {
        let entries = raw
            .manifests
            .ok_or_else(|| ManifestProblem::Invalid("index without `manifests`".into()))?;
        let mut manifests = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let descriptor = descriptor(e, &format!("index entry {i}"))?;
            let platform = e.platform.as_ref().map(|p| Platform {
                os: p.os.clone().unwrap_or_default(),
                architecture: normalize_arch(p.architecture.as_deref().unwrap_or("")).to_string(),
                variant: p.variant.clone().filter(|v| !v.is_empty()),
            });
            let attestation = e
                .annotations
                .as_ref()
                .and_then(|a| a.get("vnd.docker.reference.type"))
                .is_some_and(|t| t == "attestation-manifest");
            manifests.push(IndexEntry {
                descriptor,
                platform,
                attestation,
            });
        }
        return Ok(Parsed::Index {
            media_type,
            manifests,
        });
    }
    let config = raw
        .config
        .as_ref()
        .ok_or_else(|| ManifestProblem::Invalid("manifest without `config`".into()))?;
    let config = descriptor(config, "config")?;
    if !config.media_type.is_empty() && !CONFIG_TYPES.contains(&config.media_type.as_str()) {
        return Err(ManifestProblem::Unsupported(format!(
            "config of type {} (not a container image: a Helm chart or other artifact?)",
            shorten(&config.media_type)
        )));
    }
    let raw_layers = raw.layers.unwrap_or_default();
    if raw_layers.len() > MAX_LAYERS {
        return Err(ManifestProblem::Invalid(format!(
            "{} layers (more than {MAX_LAYERS})",
            raw_layers.len()
        )));
    }
    let mut layers = Vec::with_capacity(raw_layers.len());
    for (i, l) in raw_layers.iter().enumerate() {
        let d = descriptor(l, &format!("layer {i}"))?;
        if !crate::image::media_type::is_layer(&d.media_type) {
            return Err(ManifestProblem::Unsupported(format!(
                "layer {i} of type `{}`",
                shorten(&d.media_type)
            )));
        }
        layers.push(d);
    }
    Ok(Parsed::Manifest {
        media_type,
        config,
        layers,
    })
}

/// The index entry to run on `want`, or the platforms the index offers.
pub fn select<'a>(
    entries: &'a [IndexEntry],
    want: &Platform,
) -> Result<&'a IndexEntry, Vec<String>> {
    let preference = want.variant_preference();
    let mut best: Option<(usize, &IndexEntry)> = None;
    for entry in entries.iter().filter(|e| !e.attestation) {
        let Some(p) = &entry.platform else { continue };
        if p.os != want.os || p.architecture != want.architecture {
            continue;
        }
        let rank = if preference.is_empty() {
            // Architectures without variants in practice: the same variant as asked, else
            // none, else whatever is there.
            if p.variant == want.variant {
                0
            } else if p.variant.is_none() {
                1
            } else {
                2
            }
        } else {
            match preference.iter().position(|v| *v == p.variant.as_deref()) {
                Some(r) => r,
                None => continue,
            }
        };
        if best.is_none_or(|(r, _)| rank < r) {
            best = Some((rank, entry));
        }
    }
    best.map(|(_, e)| e).ok_or_else(|| {
        let mut available: Vec<String> = entries
            .iter()
            .filter(|e| !e.attestation)
            .map(|e| match &e.platform {
                Some(p) => p.to_string(),
                None => "(no platform)".to_string(),
            })
            .collect();
        available.dedup();
        available
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn manifest_json(layer_type: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":10}},
            "layers":[{{"mediaType":"{layer_type}","digest":"{D2}","size":20}}]}}"#
        )
    }

    fn entry(platform: &str) -> IndexEntry {
        IndexEntry {
            descriptor: Descriptor {
                media_type: OCI_MANIFEST.into(),
                digest: D1.into(),
                size: 1,
            },
            platform: Platform::parse(platform),
            attestation: false,
        }
    }

    #[test]
    fn parses_an_oci_manifest() {
        let p = parse(
            manifest_json("application/vnd.oci.image.layer.v1.tar+zstd").as_bytes(),
            Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
        )
        .unwrap();
        let Parsed::Manifest {
            media_type,
            config,
            layers,
        } = p
        else {
            panic!("not a manifest")
        };
        assert_eq!(media_type, OCI_MANIFEST);
        assert_eq!(config.digest, D1);
        assert_eq!(layers[0].size, 20);
        assert_eq!(layers[0].hex(), &D2[7..]);
    }

    #[test]
    fn media_type_from_the_body_when_the_header_is_generic() {
        let p = parse(
            manifest_json("application/vnd.docker.image.rootfs.diff.tar.gzip").as_bytes(),
            Some("application/json"),
        )
        .unwrap();
        assert!(matches!(p, Parsed::Manifest { media_type, .. } if media_type == OCI_MANIFEST));
    }

    #[test]
    fn refuses_schema1_bad_digests_and_foreign_layers() {
        let s1 = br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        assert_eq!(parse(s1, None), Err(ManifestProblem::Schema1));
        assert_eq!(
            parse(b"{}", Some(DOCKER_SCHEMA1_SIGNED)),
            Err(ManifestProblem::Schema1)
        );
        let foreign = manifest_json("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip");
        assert!(matches!(
            parse(foreign.as_bytes(), None),
            Err(ManifestProblem::Unsupported(_))
        ));
        let bad =
            manifest_json("application/vnd.oci.image.layer.v1.tar").replace(D2, "sha256:../../etc");
        assert!(
            matches!(parse(bad.as_bytes(), None), Err(ManifestProblem::Invalid(m)) if m.contains("layer 0"))
        );
        let neg = manifest_json("application/vnd.oci.image.layer.v1.tar")
            .replace("\"size\":20", "\"size\":-1");
        assert!(matches!(
            parse(neg.as_bytes(), None),
            Err(ManifestProblem::Invalid(_))
        ));
        assert!(matches!(
            parse(b"\xff\x00", None),
            Err(ManifestProblem::Invalid(_))
        ));
        assert!(check_digest("sha512:abcd").unwrap_err().contains("sha512"));
        assert!(check_digest(&format!("sha256:{}", "AB".repeat(32))).is_err());
        assert!(check_digest(&format!("sha256:{}", "ab".repeat(32))).is_ok());
    }

    #[test]
    fn parses_an_index_and_marks_attestations() {
        let json = format!(
            r#"{{"schemaVersion":2,"manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":5,"platform":{{"architecture":"amd64","os":"linux"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":5,"platform":{{"architecture":"unknown","os":"unknown"}},
                "annotations":{{"vnd.docker.reference.type":"attestation-manifest"}}}}]}}"#
        );
        let Parsed::Index {
            media_type,
            manifests,
        } = parse(json.as_bytes(), Some(DOCKER_MANIFEST_LIST)).unwrap()
        else {
            panic!("not an index")
        };
        assert_eq!(media_type, DOCKER_MANIFEST_LIST);
        assert!(!manifests[0].attestation);
        assert!(manifests[1].attestation);
    }

    #[test]
    fn platform_selection() {
        let entries = vec![
            entry("linux/amd64"),
            entry("linux/arm/v6"),
            entry("linux/arm/v7"),
            entry("linux/arm64/v8"),
            entry("windows/amd64"),
        ];
        let pick = |p: &str| {
            select(&entries, &Platform::parse(p).unwrap())
                .map(|e| e.platform.clone().unwrap().to_string())
        };
        assert_eq!(pick("linux/amd64").unwrap(), "linux/amd64");
        assert_eq!(pick("linux/x86_64").unwrap(), "linux/amd64");
        assert_eq!(pick("linux/arm64").unwrap(), "linux/arm64/v8");
        assert_eq!(pick("linux/arm/v7").unwrap(), "linux/arm/v7");
        assert_eq!(pick("linux/arm/v6").unwrap(), "linux/arm/v6");
        let missing = pick("linux/s390x").unwrap_err();
        assert_eq!(
            missing,
            [
                "linux/amd64",
                "linux/arm/v6",
                "linux/arm/v7",
                "linux/arm64/v8",
                "windows/amd64"
            ]
        );
        // A v5-only index still runs on a v7 machine, and arm64 without a variant is fine.
        let old = vec![entry("linux/arm/v5"), entry("linux/arm64")];
        assert!(select(&old, &Platform::parse("linux/arm/v7").unwrap()).is_ok());
        assert!(select(&old, &Platform::parse("linux/arm64").unwrap()).is_ok());
        assert!(select(&old, &Platform::parse("linux/arm/v5").unwrap()).is_ok());
        assert!(select(
            &[entry("linux/arm/v7")],
            &Platform::parse("linux/arm/v6").unwrap()
        )
        .is_err());
    }

    #[test]
    fn host_platform_and_display() {
        let h = Platform::host();
        assert_eq!(h.os, "linux");
        assert!(!h.architecture.is_empty());
        if cfg!(target_arch = "x86_64") {
            assert_eq!(h.to_string(), "linux/amd64");
        }
        assert_eq!(
            Platform::parse("linux/arm/v7").unwrap().to_string(),
            "linux/arm/v7"
        );
        assert!(Platform::parse("linux").is_none());
        assert!(Platform::parse("linux/amd64/v2/x").is_none());
        assert!(Platform::parse("linux/am d64").is_none());
    }
}

//! Manifests and indexes, as registries serve them and layouts hold them: one parse of
//! hostile JSON into the OCI model (`ImageIndex`, `ImageManifest`, `Descriptor`), with
//! every digest checked and the document's media type decided.

use std::collections::{BTreeMap, HashMap};

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, ImageManifestBuilder};
use serde::Deserialize;

use super::digest::{parse_digest, shorten};
use super::media_type::{self as mt, model};
use super::platform;

/// A parsed manifest or index and its media type (OCI's or Docker's: the model's own
/// `media_type` field is what the document said, which may be nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    Manifest {
        media_type: String,
        manifest: Box<ImageManifest>,
    },
    Index {
        media_type: String,
        index: Box<ImageIndex>,
    },
}

impl Document {
    pub fn media_type(&self) -> &str {
        match self {
            Document::Manifest { media_type, .. } | Document::Index { media_type, .. } => {
                media_type
            }
        }
    }
}

/// Why a document was refused; the caller adds which image it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestProblem {
    Schema1,
    Unsupported(String),
    Invalid(String),
}

/// Whether a document must say `schemaVersion: 2`: registries always send it; hand-made
/// layouts' `index.json` files often leave it out, and were always read without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaVersion {
    Required,
    Optional,
}

// The wire form, every field optional so that each gap gets its own message.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDocument {
    schema_version: Option<i64>,
    media_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
    annotations: Option<HashMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: Option<String>,
    size: Option<i64>,
    platform: Option<RawPlatform>,
    annotations: Option<BTreeMap<String, String>>,
    urls: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawPlatform {
    architecture: Option<String>,
    os: Option<String>,
    variant: Option<String>,
}

fn descriptor(raw: &RawDescriptor, what: &str) -> Result<Descriptor, ManifestProblem> {
    let digest = raw
        .digest
        .as_deref()
        .ok_or_else(|| ManifestProblem::Invalid(format!("{what} has no digest")))?;
    let digest =
        parse_digest(digest).map_err(|e| ManifestProblem::Invalid(format!("{what}: {e}")))?;
    let size = raw
        .size
        .ok_or_else(|| ManifestProblem::Invalid(format!("{what} has no size")))?;
    let size = u64::try_from(size)
        .map_err(|_| ManifestProblem::Invalid(format!("{what} has a negative size")))?;
    let mut d = Descriptor::new(model(raw.media_type.as_deref().unwrap_or("")), size, digest);
    d.set_platform(raw.platform.as_ref().map(|p| {
        platform::new(
            p.os.as_deref().unwrap_or(""),
            p.architecture.as_deref().unwrap_or(""),
            p.variant.as_deref(),
        )
    }));
    d.set_annotations(
        raw.annotations
            .as_ref()
            .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
    );
    d.set_urls(raw.urls.clone());
    Ok(d)
}

/// Parse a manifest or index. `declared` is the type it was announced as (a registry's
/// Content-Type, a layout descriptor's mediaType); when it is missing or generic the
/// document's own `mediaType` and shape decide.
pub fn parse(
    bytes: &[u8],
    declared: Option<&str>,
    schema_version: SchemaVersion,
) -> Result<Document, ManifestProblem> {
    let declared = declared.map(mt::bare).unwrap_or_default();
    if declared == mt::DOCKER_SCHEMA1 || declared == mt::DOCKER_SCHEMA1_SIGNED {
        return Err(ManifestProblem::Schema1);
    }
    let raw: RawDocument = serde_json::from_slice(bytes)
        .map_err(|e| ManifestProblem::Invalid(format!("not a JSON manifest ({e})")))?;
    match (raw.schema_version, schema_version) {
        (Some(1), _) => return Err(ManifestProblem::Schema1),
        (Some(2), _) | (None, SchemaVersion::Optional) => {}
        (Some(v), _) => {
            return Err(ManifestProblem::Invalid(format!(
                "schemaVersion {v} (expected 2)"
            )))
        }
        (None, SchemaVersion::Required) => {
            return Err(ManifestProblem::Invalid("no schemaVersion".into()))
        }
    }
    let body_type = raw.media_type.as_deref().map(mt::bare);
    let media_type = if mt::is_known_document(&declared) {
        declared
    } else if let Some(t) = body_type.as_deref().filter(|t| mt::is_known_document(t)) {
        t.to_string()
    } else if let Some(t) = body_type.filter(|t| !t.is_empty()) {
        return Err(ManifestProblem::Unsupported(shorten(&t)));
    } else if raw.manifests.is_some() {
        mt::OCI_INDEX.to_string()
    } else if raw.config.is_some() {
        mt::OCI_MANIFEST.to_string()
    } else if !declared.is_empty() && declared != "application/json" {
        return Err(ManifestProblem::Unsupported(shorten(&declared)));
    } else {
        return Err(ManifestProblem::Invalid(
            "neither an image manifest nor an index".into(),
        ));
    };
    let body_media_type = raw.media_type.as_deref().map(model);
    if mt::is_index(&media_type) {
        let entries = raw
            .manifests
            .ok_or_else(|| ManifestProblem::Invalid("index without `manifests`".into()))?;
        let manifests = entries
            .iter()
            .enumerate()
            .map(|(i, e)| descriptor(e, &format!("index entry {i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut index = ImageIndex::default();
        index.set_schema_version(2);
        index.set_media_type(body_media_type);
        index.set_manifests(manifests);
        index.set_annotations(raw.annotations);
        return Ok(Document::Index {
            media_type,
            index: Box::new(index),
        });
    }
    let config = raw
        .config
        .as_ref()
        .ok_or_else(|| ManifestProblem::Invalid("manifest without `config`".into()))?;
    let config = descriptor(config, "config")?;
    let layers = raw
        .layers
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, l)| descriptor(l, &format!("layer {i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder = ImageManifestBuilder::default()
        .schema_version(2u32)
        .config(config)
        .layers(layers);
    if let Some(t) = body_media_type {
        builder = builder.media_type(t);
    }
    if let Some(a) = raw.annotations {
        builder = builder.annotations(a);
    }
    let manifest = builder
        .build()
        .map_err(|e| ManifestProblem::Invalid(e.to_string()))?;
    Ok(Document::Manifest {
        media_type,
        manifest: Box::new(manifest),
    })
}

/// The 64 hex digits of a descriptor's (checked) digest, which name its blob's file.
pub fn blob_hex(d: &Descriptor) -> &str {
    d.digest().digest()
}

/// A descriptor's media type as text (empty when the document gave none).
pub fn media_type_of(d: &Descriptor) -> &str {
    d.media_type().as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::media_type::{DOCKER_MANIFEST_LIST, OCI_MANIFEST};

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn manifest_json(layer_type: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":10}},
            "layers":[{{"mediaType":"{layer_type}","digest":"{D2}","size":20}}]}}"#
        )
    }

    fn parse_registry(
        bytes: &[u8],
        content_type: Option<&str>,
    ) -> Result<Document, ManifestProblem> {
        parse(bytes, content_type, SchemaVersion::Required)
    }

    #[test]
    fn parses_an_oci_manifest() {
        let p = parse_registry(
            manifest_json("application/vnd.oci.image.layer.v1.tar+zstd").as_bytes(),
            Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
        )
        .unwrap();
        let Document::Manifest {
            media_type,
            manifest,
        } = p
        else {
            panic!("not a manifest")
        };
        assert_eq!(media_type, OCI_MANIFEST);
        assert_eq!(manifest.config().digest().to_string(), D1);
        assert_eq!(manifest.layers()[0].size(), 20);
        assert_eq!(blob_hex(&manifest.layers()[0]), &D2[7..]);
    }

    #[test]
    fn media_type_from_the_body_when_the_header_is_generic() {
        let p = parse_registry(
            manifest_json("application/vnd.docker.image.rootfs.diff.tar.gzip").as_bytes(),
            Some("application/json"),
        )
        .unwrap();
        assert_eq!(p.media_type(), OCI_MANIFEST);
    }

    #[test]
    fn refuses_schema1_bad_digests_and_sizes() {
        let s1 = br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        assert_eq!(parse_registry(s1, None), Err(ManifestProblem::Schema1));
        assert_eq!(
            parse_registry(b"{}", Some(mt::DOCKER_SCHEMA1_SIGNED)),
            Err(ManifestProblem::Schema1)
        );
        let bad =
            manifest_json("application/vnd.oci.image.layer.v1.tar").replace(D2, "sha256:../../etc");
        assert!(
            matches!(parse_registry(bad.as_bytes(), None), Err(ManifestProblem::Invalid(m)) if m.contains("layer 0"))
        );
        let neg = manifest_json("application/vnd.oci.image.layer.v1.tar")
            .replace("\"size\":20", "\"size\":-1");
        assert!(matches!(
            parse_registry(neg.as_bytes(), None),
            Err(ManifestProblem::Invalid(_))
        ));
        assert!(matches!(
            parse_registry(b"\xff\x00", None),
            Err(ManifestProblem::Invalid(_))
        ));
    }

    #[test]
    fn layouts_may_leave_out_the_schema_version() {
        let index = format!(
            r#"{{"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":5}}]}}"#
        );
        assert!(matches!(
            parse_registry(index.as_bytes(), None),
            Err(ManifestProblem::Invalid(m)) if m.contains("schemaVersion")
        ));
        let p = parse(index.as_bytes(), None, SchemaVersion::Optional).unwrap();
        assert!(matches!(p, Document::Index { index, .. } if index.manifests().len() == 1));
    }

    #[test]
    fn parses_an_index_with_platforms_and_attestations() {
        let json = format!(
            r#"{{"schemaVersion":2,"manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":5,"platform":{{"architecture":"x86_64","os":"linux"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":5,"platform":{{"architecture":"unknown","os":"unknown"}},
                "annotations":{{"vnd.docker.reference.type":"attestation-manifest"}}}}]}}"#
        );
        let Document::Index { media_type, index } =
            parse_registry(json.as_bytes(), Some(DOCKER_MANIFEST_LIST)).unwrap()
        else {
            panic!("not an index")
        };
        assert_eq!(media_type, DOCKER_MANIFEST_LIST);
        use crate::image::platform::PlatformExt;
        let m = index.manifests();
        assert_eq!(m[0].platform().as_ref().unwrap().name(), "linux/amd64");
        assert!(!platform::is_attestation(&m[0]));
        assert!(platform::is_attestation(&m[1]));
    }
}

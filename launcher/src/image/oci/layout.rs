//! OCI image layouts (a directory, or the same inside a tar): `index.json`, the choice of
//! one image manifest in it (by tag, digest or this machine's platform, through nested
//! indexes), and the image that manifest describes.

use oci_spec::image::{Descriptor, ImageManifest, Platform};

use super::blob::{Reader, Source};
use super::docker::docker_name_matches;
use super::{warn_arch, Image, LayerInfo, OciError};
use crate::image::config::ConfigFile;
use crate::image::manifest::{self, media_type_of, Document, ManifestProblem, SchemaVersion};
use crate::image::media_type::{self as mt, CONFIGS};
use crate::image::platform::{self, PlatformExt};

use oci_spec::image::ANNOTATION_REF_NAME as REF_NAME;
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Nested indexes deeper than this are refused (a loop, or an attack).
const MAX_NESTING: usize = 4;

fn layer_type_ok(media_type: &str) -> bool {
    mt::is_layer(media_type) || media_type == mt::FOREIGN_LAYER
}

fn ref_names(d: &Descriptor) -> Vec<&str> {
    d.annotations()
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

/// A manifest or index blob, parsed; `d` is the descriptor it was found by.
fn read_document(r: &Reader<'_>, d: &Descriptor) -> Result<Document, OciError> {
    let bytes = r.read_blob(d)?;
    let declared = Some(media_type_of(d)).filter(|t| !t.is_empty());
    manifest::parse(&bytes, declared, SchemaVersion::Optional).map_err(|p| match p {
        ManifestProblem::Schema1 => OciError::Unsupported {
            what: "manifest",
            media_type: "docker schema 1".into(),
            origin: r.origin.clone(),
            hint: " (re-push the image with a current docker or skopeo)",
        },
        ManifestProblem::Unsupported(media_type) => OciError::Unsupported {
            what: "manifest",
            media_type,
            origin: r.origin.clone(),
            hint: " (not a container image manifest)",
        },
        ManifestProblem::Invalid(detail) => r.malformed(format!("manifest {}", d.digest()), detail),
    })
}

pub(super) fn resolve_layout(
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
    let top = match manifest::parse(&index, None, SchemaVersion::Optional) {
        Ok(Document::Index { index, .. }) => index.manifests().clone(),
        Ok(Document::Manifest { .. }) => return Err(r.malformed("index.json", "no manifests list")),
        Err(ManifestProblem::Invalid(detail)) => return Err(r.malformed("index.json", detail)),
        Err(ManifestProblem::Unsupported(t)) => {
            return Err(r.malformed("index.json", format!("media type {t} is not an index")))
        }
        Err(ManifestProblem::Schema1) => {
            return Err(r.malformed("index.json", "a docker schema 1 manifest"))
        }
    };
    let host = Platform::host();
    let select = |detail: String| OciError::Select {
        origin: origin.clone(),
        detail,
    };
    let candidates: Vec<&Descriptor> = match reference {
        Some(d) if d.starts_with("sha256:") => {
            top.iter().filter(|m| m.digest().as_ref() == d).collect()
        }
        Some(tag) => top
            .iter()
            .filter(|m| ref_names(m).iter().any(|n| name_matches(n, tag)))
            .collect(),
        // One image is the one meant, whatever its platform (a registry pull for another
        // platform writes such a layout); among several, this machine's.
        None if top.len() == 1 => top.iter().collect(),
        None => top
            .iter()
            .filter(|m| platform::rank(m.platform().as_ref(), &host).is_some())
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
                None => format!("no image for {} in this layout", host.name()),
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
        if d.digest().as_ref() == digest {
            return Ok(Some(d.clone()));
        }
        if mt::is_index(media_type_of(d)) {
            if let Document::Index { index, .. } = read_document(r, d)? {
                if let Some(found) = find_nested(r, index.manifests(), digest, depth + 1)? {
                    return Ok(Some(found));
                }
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
) -> Result<(String, ImageManifest), OciError> {
    if depth > MAX_NESTING {
        return Err(r.malformed("image index", "indexes nested too deeply"));
    }
    match read_document(r, &d)? {
        Document::Manifest { manifest, .. } => Ok((d.digest().to_string(), *manifest)),
        Document::Index { index, .. } => {
            let host = Platform::host();
            let pick =
                platform::select(index.manifests(), &host).map_err(|missing| OciError::Select {
                    origin: r.origin.clone(),
                    detail: missing.to_string(),
                })?;
            resolve_manifest(r, pick.clone(), depth + 1)
        }
    }
}

fn build_image(r: &Reader<'_>, digest: String, manifest: ImageManifest) -> Result<Image, OciError> {
    let config = manifest.config();
    let config_type = media_type_of(config);
    if !CONFIGS.contains(&config_type) {
        return Err(OciError::Unsupported {
            what: "config",
            media_type: config_type.to_string(),
            origin: r.origin.clone(),
            hint: " (an OCI artifact, not a container image?)",
        });
    }
    let config_bytes = r.read_blob(config)?;
    let parsed = ConfigFile::parse(&config_bytes)
        .map_err(|e| r.malformed(format!("config {}", config.digest()), e))?;
    let mut layers = Vec::new();
    for l in manifest.layers() {
        let media_type = media_type_of(l).to_string();
        if !layer_type_ok(&media_type) {
            return Err(OciError::Unsupported {
                what: "layer",
                hint: if media_type.ends_with("+encrypted") {
                    " (encrypted layers)"
                } else {
                    ""
                },
                media_type,
                origin: r.origin.clone(),
            });
        }
        let digest = l.digest().to_string();
        layers.push(LayerInfo {
            member: r.blob_member(&digest)?,
            digest: Some(digest),
            size: l.size(),
            media_type,
        });
    }
    warn_arch(&parsed, &r.origin);
    Ok(Image {
        origin: r.origin.clone(),
        digest,
        config_digest: config.digest().to_string(),
        config: parsed,
        config_bytes,
        layers,
        source: Source::Dir(Default::default()),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::image::archive::{archive_kind, ArchiveKind};
    use crate::image::media_type::{OCI_INDEX, OCI_MANIFEST};
    use crate::image::oci::test_images::*;

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
        for t in mt::LAYERS {
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

    /// The importer chooses as the registry client does: by variant too (it used to take
    /// the first entry of this machine's architecture, whatever its variant), and an
    /// attestation or an image of another platform is never the one.
    #[test]
    fn nested_index_choice_minds_variants() {
        let l = make_layout(&[("hello", b"hi\n")], "v1");
        let d = l.dir.path();
        let msize = std::fs::metadata(d.join("blobs/sha256").join(&l.manifest_digest[7..]))
            .unwrap()
            .len();
        let arch = host_arch();
        let inner = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
                {{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{}","size":1,"platform":{{"os":"linux","architecture":"{arch}","variant":"v99"}}}},
                {{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{}","size":1,"platform":{{"os":"unknown","architecture":"unknown"}},
                  "annotations":{{"vnd.docker.reference.type":"attestation-manifest"}}}},
                {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{msize},"platform":{{"os":"linux","architecture":"{arch}"}}}}]}}"#,
            "1".repeat(64),
            "2".repeat(64),
            l.manifest_digest,
        );
        let inner_digest = write_blob(d, inner.as_bytes());
        let top = |inner_digest: &str, len: usize| {
            format!(
                r#"{{"manifests":[{{"mediaType":"{OCI_INDEX}","digest":"{inner_digest}","size":{len}}}]}}"#
            )
        };
        std::fs::write(d.join("index.json"), top(&inner_digest, inner.len())).unwrap();
        let img = Image::open_layout(d, None).unwrap();
        assert_eq!(img.digest, l.manifest_digest);

        // Nothing for this machine: the error lists what there is, attestations left out.
        let other = format!(
            r#"{{"schemaVersion":2,"manifests":[
                {{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{}","size":1,"platform":{{"os":"linux","architecture":"mips"}}}},
                {{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{}","size":1,"platform":{{"os":"unknown","architecture":"unknown"}},
                  "annotations":{{"vnd.docker.reference.type":"attestation-manifest"}}}}]}}"#,
            "1".repeat(64),
            "2".repeat(64),
        );
        let other_digest = write_blob(d, other.as_bytes());
        std::fs::write(d.join("index.json"), top(&other_digest, other.len())).unwrap();
        let e = Image::open_layout(d, None).unwrap_err().to_string();
        assert!(
            e.contains(&format!("no image for linux/{arch}"))
                && e.ends_with("(platforms: linux/mips)"),
            "{e}"
        );
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
}

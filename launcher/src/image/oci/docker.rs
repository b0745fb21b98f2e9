//! `docker save` archives: `manifest.json` with its configs and layer tars, and the
//! pre-1.10 form with only `repositories` and a chain of `<id>/json` files.

use std::collections::HashMap;

use serde::Deserialize;

use super::blob::{Reader, Source};
use super::{warn_arch, Image, LayerInfo, OciError};
use crate::image::config::{ConfigFile, ImageConfig};
use crate::image::digest::{check_digest, sha256_digest};
use crate::image::media_type::DOCKER_LAYER;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// `busybox` matches `busybox:latest`; `docker.io/library/busybox:1` matches `busybox:1`.
pub(super) fn docker_name_matches(tag: &str, wanted: &str) -> bool {
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

pub(super) fn resolve_docker(
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
            .map(ImageConfig::parse_legacy)
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
        source: Source::Dir(Default::default()),
    })
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;
    use crate::image::archive::{archive_kind, ArchiveKind};
    use crate::image::oci::test_images::*;

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

//! What the registry client asks for and accepts: the Accept header, the size bound, and
//! the checks on an image manifest before anything of it is downloaded. Parsing and the
//! platform choice are the image model's (`image::manifest`, `image::platform`).

use oci_spec::image::ImageManifest;

use crate::image::digest::shorten;
use crate::image::manifest::{media_type_of, ManifestProblem};
use crate::image::media_type::{is_layer, CONFIGS};

pub use crate::image::media_type::ACCEPT;

/// The largest manifest or index we read (containerd uses the same bound): a bigger one is
/// not an image anyone built on purpose.
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// More layers than this is hostile or broken (Docker itself stops at 127; OCI sets no limit).
const MAX_LAYERS: usize = 1000;

/// An image manifest the client can pull: a container image config, and layers ferry
/// unpacks (foreign layers live elsewhere, which a pull does not reach).
pub fn check_pullable(manifest: &ImageManifest) -> Result<(), ManifestProblem> {
    let config_type = media_type_of(manifest.config());
    if !config_type.is_empty() && !CONFIGS.contains(&config_type) {
        return Err(ManifestProblem::Unsupported(format!(
            "config of type {} (not a container image: a Helm chart or other artifact?)",
            shorten(config_type)
        )));
    }
    let layers = manifest.layers();
    if layers.len() > MAX_LAYERS {
        return Err(ManifestProblem::Invalid(format!(
            "{} layers (more than {MAX_LAYERS})",
            layers.len()
        )));
    }
    for (i, l) in layers.iter().enumerate() {
        if !is_layer(media_type_of(l)) {
            return Err(ManifestProblem::Unsupported(format!(
                "layer {i} of type `{}`",
                shorten(media_type_of(l))
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manifest::{parse, Document, SchemaVersion};
    use crate::image::media_type::OCI_MANIFEST;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn manifest(layer_type: &str, config_type: &str) -> ImageManifest {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"{config_type}","digest":"{D1}","size":10}},
            "layers":[{{"mediaType":"{layer_type}","digest":"{D2}","size":20}}]}}"#
        );
        match parse(json.as_bytes(), None, SchemaVersion::Required).unwrap() {
            Document::Manifest { manifest, .. } => *manifest,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_foreign_layers_and_artifacts() {
        let config = "application/vnd.oci.image.config.v1+json";
        assert!(check_pullable(&manifest(
            "application/vnd.docker.image.rootfs.diff.tar.zstd",
            config
        ))
        .is_ok());
        assert!(matches!(
            check_pullable(&manifest(crate::image::media_type::FOREIGN_LAYER, config)),
            Err(ManifestProblem::Unsupported(_))
        ));
        let helm = check_pullable(&manifest(
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.cncf.helm.config.v1+json",
        ));
        assert!(matches!(helm, Err(ManifestProblem::Unsupported(m)) if m.contains("Helm")));
    }
}

//! Every media type ferry names, OCI's and Docker's: manifests, indexes, configs and the
//! layer types it unpacks. One list for every source of images (registry, OCI layouts and
//! archives, docker archives), so that nothing a registry download accepts is refused by
//! the importer afterwards. The layer reader tells compressions apart by their magic
//! bytes, not by these names.

use oci_spec::image::MediaType;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// What `docker save` layers are (plain tars).
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// Layers of an image, in any compression ferry reads (none, gzip, zstd).
pub const LAYERS: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    DOCKER_LAYER,
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];

/// Docker's foreign layers: a registry only names where they are (ferry fetches nothing
/// from elsewhere), but an archive written by `docker save` holds their bytes.
pub const FOREIGN_LAYER: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// The documents a registry is asked for. Schema 1 is left out on purpose: a registry
/// that can convert then sends schema 2, and one that cannot sends schema 1 anyway, which
/// is then named in the error.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Image configs ferry reads.
pub const CONFIGS: &[&str] = &[OCI_CONFIG, DOCKER_CONFIG];

/// A layer media type ferry unpacks.
pub fn is_layer(media_type: &str) -> bool {
    LAYERS.contains(&media_type)
}

/// A multi-platform index (OCI's or Docker's manifest list).
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// A single-platform image manifest (OCI's or Docker's schema 2).
pub fn is_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// The index and manifest types ferry reads.
pub fn is_known_document(media_type: &str) -> bool {
    is_index(media_type) || is_manifest(media_type)
}

/// Media type without parameters (`; charset=utf-8`), lower case.
pub fn bare(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The OCI model's value for a media type named here (Docker's are `Other`).
pub fn model(media_type: &str) -> MediaType {
    MediaType::from(media_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_the_model() {
        for t in LAYERS.iter().chain(CONFIGS).chain(&[
            OCI_INDEX,
            OCI_MANIFEST,
            DOCKER_MANIFEST,
            DOCKER_MANIFEST_LIST,
        ]) {
            assert_eq!(model(t).to_string(), *t);
        }
        assert!(is_index(OCI_INDEX) && is_index(DOCKER_MANIFEST_LIST));
        assert!(is_manifest(DOCKER_MANIFEST) && !is_manifest(OCI_INDEX));
        assert!(is_layer(
            "application/vnd.docker.image.rootfs.diff.tar.zstd"
        ));
        assert!(!is_layer(FOREIGN_LAYER));
        assert_eq!(bare("Application/JSON; charset=utf-8"), "application/json");
        let accepted: Vec<&str> = ACCEPT.split(", ").collect();
        assert_eq!(
            accepted,
            [
                OCI_INDEX,
                DOCKER_MANIFEST_LIST,
                OCI_MANIFEST,
                DOCKER_MANIFEST
            ]
        );
    }
}

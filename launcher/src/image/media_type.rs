//! The layer media types ferry unpacks: one list for every source of layers (registry,
//! OCI layouts and archives, docker archives), so that nothing a registry download accepts
//! is refused by the importer afterwards. The layer reader tells compressions apart by
//! their magic bytes, not by these names.

/// Layers of an image, in any compression ferry reads (none, gzip, zstd).
pub const LAYERS: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];

/// Docker's foreign layers: a registry only names where they are (ferry fetches nothing
/// from elsewhere), but an archive written by `docker save` holds their bytes.
pub const FOREIGN_LAYER: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// A layer media type ferry unpacks.
pub fn is_layer(media_type: &str) -> bool {
    LAYERS.contains(&media_type)
}

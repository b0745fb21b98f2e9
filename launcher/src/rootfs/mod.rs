//! The file tree a container sees: how the image is mounted (squashfuse, the kernel's
//! driver, an unpacked directory), what is bound over it (user mounts, GPUs, host
//! libraries) and the users' own directories for unpacked trees.

pub mod assembly;
mod binds;
pub mod error;
pub mod gpu;
pub mod inputs;
pub mod kernel;
pub mod ldcache;
mod loader;
pub mod locale;
pub mod squashfuse;
mod staging;
pub mod unpacked;
pub mod user_dir;

/// For `ferry build`, which writes into an image's tree as the container would see it.
pub use staging::resolve_in_tree;

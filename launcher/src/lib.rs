//! ferry: rootless containers for Slurm job steps.
//!
//! The library holds every piece of logic; the `ferry` binary and the SPANK plugin are
//! thin front ends over [`container::holder::prepare`] and [`container::join::join`].
//!
//! Folders by concept, each depending only on those listed after it:
//! `container` (a running container's processes and namespaces), `rootfs` (the file tree a
//! container sees), `store` (the image cache and imports into it), `image` (image formats,
//! references and registries), `slurm` (what Slurm hands the plugin), `doctor` (node checks)
//! and `sys` (the operating system seam: raw calls and child processes).

pub mod container;
pub mod doctor;
pub mod fuzzing;
pub mod image;
pub mod rootfs;
pub mod slurm;
pub mod spec;
pub mod store;
pub mod sys;

//! ferry: rootless containers for Slurm job steps.
//!
//! The library holds every piece of logic; the `ferry` binary and the SPANK plugin are
//! thin front ends over [`container::holder::prepare`] and [`container::join::join`].
//!
//! Folders by concept, each using only those before it: `sys` (the operating system seam:
//! raw calls and child processes), `image` (image formats, references and registries),
//! `spec` (what a container is, as data), then `store` (the image cache and imports into
//! it), `rootfs` (the file tree a container sees) and `slurm` (what Slurm hands the
//! plugin), and on top `container` (a running container's processes and namespaces),
//! `doctor` (node checks) and `build` (images from Dockerfiles).

pub mod build;
pub mod container;
pub mod doctor;
pub mod fuzzing;
pub mod image;
pub mod rootfs;
pub mod slurm;
pub mod spec;
pub mod store;
pub mod sys;

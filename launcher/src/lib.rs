//! ferry: rootless containers for Slurm job steps.
//!
//! The library holds every piece of logic; the `ferry` binary and the SPANK plugin are
//! thin front ends over [`holder::prepare`] and [`join::join`].

pub mod cache;
pub mod doctor;
pub mod entrypoint;
pub mod env;
pub mod framework_env;
pub mod fuzzing;
pub mod gpu;
pub mod holder;
pub mod image;
pub mod import;
pub mod job_state;
pub mod join;
pub mod kernel;
pub mod ldcache;
pub mod mounts;
pub mod named;
pub mod namespace;
pub mod rootfs;
pub mod run;
pub mod site;
pub mod spec;
pub mod srun_args;
pub mod sys;
pub mod task_exec;
pub mod user;

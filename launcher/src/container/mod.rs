//! A container's life: the spec that describes it, the holder process that owns its
//! namespaces, joining them, and what runs inside (`ferry run`, a task's entrypoint, its
//! environment and user).

pub mod entrypoint;
pub mod env;
pub mod exit_code;
pub mod holder;
pub mod join;
pub mod namespace;
pub mod run;
pub mod spec;
pub mod task_exec;
pub mod user;

//! A container's life: the holder process that owns its namespaces, joining them, and
//! what runs inside (`ferry run`, a task's entrypoint through the task's `ferry`), with the
//! exit codes they share.

pub mod checkpoint;
pub mod exit_code;
pub mod holder;
pub mod id_filter;
pub mod join;
pub mod named;
pub mod namespace;
pub mod phases;
pub mod run;
pub mod task_exec;

//! Starting and stopping the holder: the process that owns a container's namespaces.
//! (API outline; the implementation is being written.)

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::ContainerSpec;

/// Who the holder runs as when the caller is root (the plugin in slurmstepd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// The `ferry` binary to exec as `ferry hold`.
    pub holder_program: PathBuf,
    /// Drop to these credentials (setgroups, setresgid, setresuid) between fork and exec.
    pub run_as: Option<Credentials>,
    /// Kill the holder when the thread that started it exits (CLI only, never in slurmstepd).
    pub die_with_parent: bool,
    /// Give up waiting for the holder's report after this long.
    pub timeout: Duration,
}

/// What the holder reports once the container is ready.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    pub pid: i32,
    /// The image's environment (to apply over the caller's, before explicit `--env`).
    pub env: Vec<(String, String)>,
    /// Where the command starts, inside the container.
    pub workdir: PathBuf,
}

pub struct Holder {
    ready: Ready,
}

impl Holder {
    pub fn ready(&self) -> &Ready {
        &self.ready
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{0}")]
    Setup(String),
}

/// Start a holder for `spec` and wait for its report.
pub fn prepare(_spec: &ContainerSpec, _opts: &PrepareOptions) -> Result<Holder, PrepareError> {
    todo!()
}

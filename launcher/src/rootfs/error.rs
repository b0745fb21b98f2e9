//! The errors of building a container's root filesystem, shared by its steps (inputs,
//! staging, image mount, binds, assembly).

use std::io;
use std::path::PathBuf;

use crate::image::ImageError;
use crate::rootfs::{gpu, kernel, unpacked};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Named(#[from] unpacked::NamedError),
    #[error(transparent)]
    Gpu(#[from] gpu::GpuError),
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error("cannot open the host file {path} for the container: {source}")]
    HostFile { path: PathBuf, source: io::Error },
    #[error("squashfuse not found: install it (Debian/Ubuntu: apt-get install squashfuse) or set `squashfuse=` in the plugin's plugstack.conf arguments")]
    NoSquashfuse,
    #[error("the site's squashfuse program {0} is missing or not executable: fix `squashfuse=` in plugstack.conf, or leave it out to use squashfuse_ll from PATH")]
    SiteSquashfuseMissing(PathBuf),
    #[error("/dev/fuse is not usable by user {user}: {reason}")]
    Fuse { user: String, reason: String },
    #[error("mount source not found: {0} (check the path given to --mount/--container-mounts)")]
    SourceMissing(PathBuf),
    #[error("mount source not readable by user {user}: {path} (check its permissions and those of its parent directories)")]
    SourceNotReadable { path: PathBuf, user: String },
    #[error("cannot open mount source {path}: {source}")]
    SourceOpen { path: PathBuf, source: io::Error },
    #[error("mount source {path} changed while the container was being set up ({source}); nothing was mounted, run again once it stays put")]
    SourceReplaced { path: PathBuf, source: io::Error },
    #[error("cannot mount the image {path}: {detail}")]
    ImageMount { path: PathBuf, detail: String },
    #[error("cannot mount {what} at {target} in the container: {source}")]
    Mount {
        what: String,
        target: PathBuf,
        source: io::Error,
    },
    #[error("cannot prepare the container ({step}): {source}")]
    Setup {
        step: &'static str,
        source: io::Error,
    },
    #[error(
        "working directory not found in the container: {0} (check --workdir/--container-workdir)"
    )]
    NoWorkdir(PathBuf),
}

/// A [`RootfsError::Setup`] for `step`, as a `map_err` argument.
pub(super) fn setup(step: &'static str) -> impl FnOnce(io::Error) -> RootfsError {
    move |source| RootfsError::Setup { step, source }
}

/// nix's errno as an I/O error, for the variants that hold one.
pub(super) fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

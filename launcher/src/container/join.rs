//! Moving a process into a holder's namespaces.

use std::fs::File;
use std::io;
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sched::CloneFlags;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cannot open the container's namespaces (holder pid {pid}): {source}; the container is gone")]
    Open { pid: i32, source: io::Error },
    #[error("cannot enter the container's {which} namespace: {source}")]
    Enter {
        which: &'static str,
        source: nix::Error,
    },
    #[error("cannot enter the working directory {dir} in the container: {source}")]
    Workdir { dir: String, source: io::Error },
    #[error("cannot set no_new_privs before entering the container: {0}")]
    NoNewPrivs(nix::Error),
}

/// The namespaces of a holder, opened once so that they stay the same even if the holder's
/// pid were reused later.
#[derive(Debug)]
pub struct Namespaces {
    user: OwnedFd,
    mnt: OwnedFd,
}

impl Namespaces {
    /// The namespaces of `holder`: opened by its pid, then checked to still be its own
    /// through its pidfd (had the holder ended in between, the pid might be another's).
    pub fn of_holder(holder: &crate::container::holder::Holder) -> Result<Namespaces, JoinError> {
        Namespaces::of_process(holder.pid(), holder.pidfd())
    }

    /// The namespaces of process `pid`, known by `pidfd`: opened by pid, then checked to
    /// still be that process's.
    pub fn of_process(pid: i32, pidfd: &crate::sys::child::Pidfd) -> Result<Namespaces, JoinError> {
        let open = |ns: &str| {
            File::open(format!("/proc/{pid}/ns/{ns}"))
                .map(OwnedFd::from)
                .map_err(|source| JoinError::Open { pid, source })
        };
        let namespaces = Namespaces {
            user: open("user")?,
            mnt: open("mnt")?,
        };
        if pidfd.has_exited() {
            return Err(JoinError::Open {
                pid,
                source: io::Error::new(io::ErrorKind::NotFound, "the holder has ended"),
            });
        }
        Ok(namespaces)
    }

    /// Copies of the two descriptors that a program this process execs keeps (no
    /// close-on-exec), for [`crate::container::task_exec`]: (user, mnt).
    pub fn inheritable_fds(&self) -> io::Result<(RawFd, RawFd)> {
        // dup(2) leaves close-on-exec off; the copies are the exec'd program's.
        let user = rustix::io::dup(&self.user)?;
        let mnt = rustix::io::dup(&self.mnt)?;
        Ok((user.into_raw_fd(), mnt.into_raw_fd()))
    }

    /// Take ownership of namespace descriptors inherited across exec (see
    /// [`Self::inheritable_fds`]); once per process. Whether they are a user and a mount
    /// namespace is checked by [`join`].
    pub fn from_inherited(user: RawFd, mnt: RawFd) -> io::Result<Namespaces> {
        let [user, mnt] = crate::sys::raw::adopt_inherited_fds([user, mnt])?;
        Ok(Namespaces { user, mnt })
    }
}

/// Enter the container (user namespace first, which grants the rights to enter its mount
/// namespace) and change to `workdir` inside it. The caller must be single-threaded and
/// run as the container's user.
pub fn join(ns: &Namespaces, workdir: &Path) -> Result<(), JoinError> {
    // Nothing the task execs may gain privileges: without that guarantee, do not enter.
    nix::sys::prctl::set_no_new_privs().map_err(JoinError::NoNewPrivs)?;
    nix::sched::setns(&ns.user, CloneFlags::CLONE_NEWUSER).map_err(|source| JoinError::Enter {
        which: "user",
        source,
    })?;
    nix::sched::setns(&ns.mnt, CloneFlags::CLONE_NEWNS).map_err(|source| JoinError::Enter {
        which: "mount",
        source,
    })?;
    std::env::set_current_dir(workdir)
        .or_else(|_| std::env::set_current_dir("/"))
        .map_err(|source| JoinError::Workdir {
            dir: workdir.display().to_string(),
            source,
        })
}

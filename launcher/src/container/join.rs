//! Moving a process into a holder's namespaces.

use std::fs::File;
use std::io;
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sched::CloneFlags;

use crate::spec::unshare::Namespace;

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
    /// The holder's network, IPC and UTS namespaces that are its own (`--container-unshare`),
    /// not the caller's.
    own: Vec<(Namespace, OwnedFd)>,
}

impl Namespaces {
    /// The namespaces of `holder`: opened by its pid, then checked to still be its own
    /// through its pidfd (had the holder ended in between, the pid might be another's).
    pub fn of_holder(holder: &crate::container::holder::Holder) -> Result<Namespaces, JoinError> {
        let pid = holder.pid();
        let open = |ns: &str| {
            File::open(format!("/proc/{pid}/ns/{ns}"))
                .map(OwnedFd::from)
                .map_err(|source| JoinError::Open { pid, source })
        };
        let mut own = Vec::new();
        for ns in Namespace::ALL {
            let fd = open(ns.name())?;
            if !same_as_callers(&fd, ns) {
                own.push((ns, fd));
            }
        }
        let namespaces = Namespaces {
            user: open("user")?,
            mnt: open("mnt")?,
            own,
        };
        if holder.pidfd().has_exited() {
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

    /// Copies, kept across exec like [`Self::inheritable_fds`], of the descriptors of the
    /// namespaces besides user and mount that the container has of its own.
    pub fn inheritable_own_fds(&self) -> io::Result<Vec<(Namespace, RawFd)>> {
        self.own
            .iter()
            .map(|(ns, fd)| Ok((*ns, rustix::io::dup(fd)?.into_raw_fd())))
            .collect()
    }

    /// Take ownership of namespace descriptors inherited across exec (see
    /// [`Self::inheritable_fds`]); once per process. Whether they are a user and a mount
    /// namespace is checked by [`join`].
    pub fn from_inherited(user: RawFd, mnt: RawFd) -> io::Result<Namespaces> {
        Self::from_inherited_with_own(user, mnt, &[])
    }

    /// [`Self::from_inherited`], with the container's own other namespaces (see
    /// [`Self::inheritable_own_fds`]).
    pub fn from_inherited_with_own(
        user: RawFd,
        mnt: RawFd,
        own: &[(Namespace, RawFd)],
    ) -> io::Result<Namespaces> {
        let numbers: Vec<RawFd> = [user, mnt]
            .into_iter()
            .chain(own.iter().map(|(_, fd)| *fd))
            .collect();
        let mut fds = crate::sys::raw::adopt_inherited_fd_list(&numbers)?.into_iter();
        let (Some(user), Some(mnt)) = (fds.next(), fds.next()) else {
            unreachable!("two descriptors adopted first");
        };
        let own = own.iter().map(|(ns, _)| *ns).zip(fds).collect();
        Ok(Namespaces { user, mnt, own })
    }
}

/// Whether `fd` (a namespace of kind `ns`) is the calling process's own namespace of that
/// kind: the holder has the host's unless the container unshares it.
fn same_as_callers(fd: &OwnedFd, ns: Namespace) -> bool {
    let theirs = rustix::fs::fstat(fd);
    let ours = rustix::fs::stat(format!("/proc/self/ns/{}", ns.name()));
    match (theirs, ours) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        // Not comparable: do not try to enter it (setns would need rights over the host's).
        _ => true,
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
    for (kind, fd) in &ns.own {
        nix::sched::setns(fd, kind.clone_flag()).map_err(|source| JoinError::Enter {
            which: kind.name(),
            source,
        })?;
    }
    std::env::set_current_dir(workdir)
        .or_else(|_| std::env::set_current_dir("/"))
        .map_err(|source| JoinError::Workdir {
            dir: workdir.display().to_string(),
            source,
        })
}

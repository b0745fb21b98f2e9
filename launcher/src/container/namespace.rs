//! The user and mount namespaces of a container.

use std::fs;
use std::io;

use nix::sched::CloneFlags;

use crate::spec::unshare::{Namespace, Unshare};
use crate::spec::user::InsideIds;

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("cannot create a user namespace: {reason}")]
    Disabled { reason: String },
    #[error("cannot set up the user namespace ({what}): {source}")]
    Map {
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot make mounts private to the container: {0}")]
    Propagation(nix::Error),
    #[error("cannot bring up the loopback interface of the container's network namespace: {0}")]
    Loopback(io::Error),
}

/// Move the calling (single-threaded) process into new user and mount namespaces in which
/// `outside` uid/gid appear as `inside`, and into new ones of `unshare`, which the new user
/// namespace owns. Only the one user is mapped: no setuid helper.
pub fn enter_new(
    outside_uid: u32,
    outside_gid: u32,
    inside: InsideIds,
    unshare: Unshare,
) -> Result<(), NamespaceError> {
    let flags = CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS | unshare.clone_flags();
    nix::sched::unshare(flags).map_err(|errno| NamespaceError::Disabled {
        reason: diagnose_unshare(errno),
    })?;
    if unshare.contains(Namespace::Net) {
        // A new network namespace has only `lo`, and down: programs expect 127.0.0.1.
        crate::sys::raw::set_loopback_up().map_err(NamespaceError::Loopback)?;
    }
    write_proc("/proc/self/setgroups", "deny", "setgroups")?;
    write_proc(
        "/proc/self/uid_map",
        &format!("{} {} 1\n", inside.uid, outside_uid),
        "uid_map",
    )?;
    write_proc(
        "/proc/self/gid_map",
        &format!("{} {} 1\n", inside.gid, outside_gid),
        "gid_map",
    )?;
    // Slave, not private: an unmount on the host (a stale NFS mount, say) still reaches us,
    // while nothing we mount leaks out.
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(NamespaceError::Propagation)
}

fn write_proc(path: &str, contents: &str, what: &'static str) -> Result<(), NamespaceError> {
    fs::write(path, contents).map_err(|source| NamespaceError::Map { what, source })
}

/// Say which setting stops unprivileged user namespaces here, and how to change it.
fn diagnose_unshare(errno: nix::Error) -> String {
    let read = |p: &str| fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return "user namespaces are disabled (sysctl user.max_user_namespaces=0); an admin must set it above 0, e.g. `sysctl -w user.max_user_namespaces=65536`".into();
    }
    if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return "unprivileged user namespaces are disabled (sysctl kernel.unprivileged_userns_clone=0); an admin must set it to 1".into();
    }
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        return "AppArmor restricts unprivileged user namespaces (sysctl kernel.apparmor_restrict_unprivileged_userns=1); an admin must set it to 0 or give ferry an AppArmor profile that allows userns".into();
    }
    match errno {
        nix::Error::ENOSPC => "the limit on user namespaces is reached (sysctl user.max_user_namespaces)".into(),
        nix::Error::EPERM => "the kernel refused (EPERM): user namespaces may be blocked by a seccomp filter, a container runtime around this process, or a security module; or this process runs in a chroot (the kernel refuses them where a process's root is not its mount namespace's root: run slurmd in a container or with pivot_root, not chroot)".into(),
        other => format!("unshare failed: {other}"),
    }
}

//! Namespaces: user and mount namespaces, an overlay and a FUSE mount, tried in a child.

use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};

use super::Check;

/// What the child managed to do, step by step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub userns: Option<Result<(), StepError>>,
    pub mountns: Option<Result<(), StepError>>,
    pub overlay: Option<Result<(), StepError>>,
    /// `None`: not tried (no usable /dev/fuse, or an earlier step failed).
    pub fuse_mount: Option<Result<(), StepError>>,
}

/// Why a step of the probe failed. It comes from the child over a pipe as JSON, so it
/// holds the errors as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StepError {
    /// A system call refused, as nix names its errno (`EPERM: Operation not permitted`).
    #[error("{0}")]
    Errno(String),
    /// A part of the step (`what`) failed.
    #[error("{what}: {error}")]
    While { what: String, error: String },
    #[error("the probe process died without a report")]
    NoReport,
}

fn failed_while(what: impl Into<String>) -> impl FnOnce(String) -> StepError {
    let what = what.into();
    move |error| StepError::While { what, error }
}

/// Fork a child that creates a user namespace mapping only the caller's ids (as `ferry
/// run` does), then a mount namespace, and mounts a tmpfs, an overlay and a FUSE
/// connection in it. The child reports on a pipe and exits; its namespaces and mounts die
/// with it.
pub(super) fn probe_namespaces() -> Probe {
    let (read_end, write_end) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => return probe_broken(failed_while("pipe")(e.to_string())),
    };
    match crate::sys::raw::fork_single_threaded() {
        Err(e) => probe_broken(failed_while("fork")(e.to_string())),
        Ok(None) => {
            drop(read_end);
            let probe = probe_in_child();
            let mut out = fs::File::from(write_end);
            let ok = serde_json::to_writer(&mut out, &probe).is_ok();
            crate::sys::raw::exit_immediately(if ok { 0 } else { 1 })
        }
        Ok(Some(child)) => {
            drop(write_end);
            let mut text = String::new();
            let read = fs::File::from(read_end).read_to_string(&mut text);
            let _ = nix::sys::wait::waitpid(child, None);
            match read
                .ok()
                .and_then(|_| serde_json::from_str::<Probe>(&text).ok())
            {
                Some(p) => p,
                None => probe_broken(StepError::NoReport),
            }
        }
    }
}

fn probe_broken(reason: StepError) -> Probe {
    Probe {
        userns: Some(Err(reason)),
        ..Probe::default()
    }
}

fn errno_text(e: nix::Error) -> StepError {
    StepError::Errno(e.to_string())
}

fn probe_in_child() -> Probe {
    let mut p = Probe::default();
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    let userns = nix::sched::unshare(CloneFlags::CLONE_NEWUSER)
        .map_err(errno_text)
        .and_then(|()| {
            let write = |path: &str, text: String| {
                fs::write(path, text)
                    .map_err(|e| failed_while(format!("writing {path}"))(e.to_string()))
            };
            write("/proc/self/setgroups", "deny".into())?;
            write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))?;
            write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))
        });
    let failed = userns.is_err();
    p.userns = Some(userns);
    if failed {
        return p;
    }
    let mountns = nix::sched::unshare(CloneFlags::CLONE_NEWNS)
        .map_err(errno_text)
        .and_then(|()| {
            mount(None, "/", None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)
                .map_err(|e| failed_while("making / private")(e.to_string()))
        })
        .and_then(|()| {
            mount(
                Some("tmpfs"),
                "/tmp",
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                None,
            )
            .map_err(|e| failed_while("mounting a tmpfs")(e.to_string()))
        });
    let failed = mountns.is_err();
    p.mountns = Some(mountns);
    if failed {
        return p;
    }
    let overlay = ["lower", "upper", "work", "merged", "fuse"]
        .iter()
        .try_for_each(|d| fs::create_dir(Path::new("/tmp").join(d)))
        .map_err(|e| failed_while("creating directories on the tmpfs")(e.to_string()))
        .and_then(|()| {
            mount(
                Some("overlay"),
                "/tmp/merged",
                Some("overlay"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("lowerdir=/tmp/lower,upperdir=/tmp/upper,workdir=/tmp/work"),
            )
            .map_err(errno_text)
        })
        .and_then(|()| {
            fs::write("/tmp/merged/written", b"x")
                .map_err(|e| failed_while("writing on it")(e.to_string()))
        });
    p.overlay = Some(overlay);
    // Opened inside the user namespace, as the holder does: the kernel accepts a FUSE
    // connection only from a /dev/fuse opened in the namespace that mounts it.
    let fuse = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse");
    if let Ok(fuse) = fuse {
        use std::os::fd::AsRawFd;
        // A mount with no server behind it: enough to learn whether the kernel accepts an
        // unprivileged FUSE mount; the connection is aborted when the child exits.
        let options = format!(
            "fd={},rootmode=40000,user_id={uid},group_id={gid}",
            fuse.as_raw_fd()
        );
        p.fuse_mount = Some(
            mount(
                Some("ferry-doctor"),
                "/tmp/fuse",
                Some("fuse.ferry-doctor"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY,
                Some(&options),
            )
            .map_err(errno_text),
        );
    }
    p
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> nix::Result<()> {
    nix::mount::mount(source, target, fstype, flags, data)
}

/// The settings that can forbid unprivileged user namespaces (absent files: `None`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sysctls {
    pub max_user_namespaces: Option<String>,
    pub unprivileged_userns_clone: Option<String>,
    pub apparmor_restrict_unprivileged_userns: Option<String>,
}

impl Sysctls {
    pub(super) fn read() -> Sysctls {
        let read = |p: &str| fs::read_to_string(p).ok().map(|s| s.trim().to_string());
        Sysctls {
            max_user_namespaces: read("/proc/sys/user/max_user_namespaces"),
            unprivileged_userns_clone: read("/proc/sys/kernel/unprivileged_userns_clone"),
            apparmor_restrict_unprivileged_userns: read(
                "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            ),
        }
    }

    /// The first setting that stops unprivileged user namespaces: (what, fix).
    pub fn blocker(&self) -> Option<(&'static str, &'static str)> {
        if self.max_user_namespaces.as_deref() == Some("0") {
            return Some((
                "user namespaces are disabled (sysctl user.max_user_namespaces=0)",
                "set it above 0 on every node: `sysctl -w user.max_user_namespaces=65536` and the same in /etc/sysctl.d/ to keep it",
            ));
        }
        if self.unprivileged_userns_clone.as_deref() == Some("0") {
            return Some((
                "unprivileged user namespaces are disabled (sysctl kernel.unprivileged_userns_clone=0)",
                "`sysctl -w kernel.unprivileged_userns_clone=1` on every node, and the same in /etc/sysctl.d/ to keep it",
            ));
        }
        if self.apparmor_restrict_unprivileged_userns.as_deref() == Some("1") {
            return Some((
                "AppArmor restricts unprivileged user namespaces (sysctl kernel.apparmor_restrict_unprivileged_userns=1)",
                "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`, or give the ferry binary an AppArmor profile with `userns,`",
            ));
        }
        None
    }
}

pub fn userns_check(probe: &Probe, sysctls: &Sysctls, euid: u32) -> Check {
    const ID: &str = "userns";
    match (&probe.userns, sysctls.blocker()) {
        (Some(Ok(())), None) => Check::ok(
            ID,
            "unprivileged user namespaces work (created one mapping only this user)",
        ),
        // Root may create one even where users may not.
        (Some(Ok(())), Some((what, fix))) if euid == 0 => Check::fail(
            ID,
            format!("root can create user namespaces, but users cannot: {what}"),
            fix,
        ),
        (Some(Ok(())), Some((what, _))) => Check::ok(
            ID,
            format!("user namespaces work here although {what}"),
        ),
        (_, Some((what, fix))) => Check::fail(ID, format!("cannot create a user namespace: {what}"), fix),
        (Some(Err(e)), None) if e.to_string().contains("ENOSPC") => Check::fail(
            ID,
            format!("cannot create a user namespace ({e}): the limit user.max_user_namespaces is reached"),
            "raise it: `sysctl -w user.max_user_namespaces=65536`",
        ),
        (Some(Err(e)), None) => Check::fail(
            ID,
            format!("cannot create a user namespace ({e})"),
            "user namespaces may be blocked by a seccomp filter, a container around this shell, or a security module (SELinux, AppArmor); allow unprivileged user namespaces for users' jobs",
        ),
        (None, None) => Check::fail(ID, "the user namespace was not tried", "run `ferry doctor` again"),
    }
}

pub fn overlay_check(probe: &Probe) -> Check {
    const ID: &str = "overlayfs";
    match (&probe.mountns, &probe.overlay) {
        (_, Some(Ok(()))) => Check::ok(
            ID,
            "a mount namespace, tmpfs and a writable overlay work inside a user namespace",
        ),
        (Some(Err(e)), _) => Check::fail(
            ID,
            format!("cannot make a mount namespace with a tmpfs inside a user namespace: {e}"),
            "mount namespaces are blocked by a security module or seccomp filter; allow them for users",
        ),
        (_, Some(Err(e))) => Check::fail(
            ID,
            format!("cannot mount an overlay inside a user namespace: {e}"),
            "ferry needs Linux >= 5.11 (overlayfs in user namespaces) with the overlay module loaded (`modprobe overlay`)",
        ),
        _ => Check::fail(
            ID,
            "not tried: no user namespace",
            "fix the user namespace check first",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::{fuse_mount_check, Status};

    fn probe(userns: Result<(), &str>) -> Probe {
        Probe {
            userns: Some(userns.map_err(|e| StepError::Errno(e.into()))),
            ..Probe::default()
        }
    }

    #[test]
    fn userns_names_the_sysctl_that_blocks_it() {
        let zero = Sysctls {
            max_user_namespaces: Some("0".into()),
            ..Sysctls::default()
        };
        let c = userns_check(&probe(Err("EPERM: Operation not permitted")), &zero, 1000);
        assert_eq!(c.status, Status::Fail);
        assert!(c.message.contains("user.max_user_namespaces=0"), "{c:?}");
        assert!(c
            .fix
            .unwrap()
            .contains("sysctl -w user.max_user_namespaces="));

        let clone = Sysctls {
            max_user_namespaces: Some("63000".into()),
            unprivileged_userns_clone: Some("0".into()),
            ..Sysctls::default()
        };
        let c = userns_check(&probe(Err("EPERM")), &clone, 1000);
        assert!(
            c.message.contains("kernel.unprivileged_userns_clone=0"),
            "{c:?}"
        );

        let apparmor = Sysctls {
            apparmor_restrict_unprivileged_userns: Some("1".into()),
            ..Sysctls::default()
        };
        let c = userns_check(&probe(Err("EACCES")), &apparmor, 1000);
        assert!(
            c.message
                .contains("apparmor_restrict_unprivileged_userns=1"),
            "{c:?}"
        );
        assert!(c.fix.unwrap().contains("AppArmor profile"));

        // Root gets a namespace anyway; users still cannot.
        let c = userns_check(&probe(Ok(())), &clone, 0);
        assert_eq!(c.status, Status::Fail);
        assert!(c.message.contains("users cannot"), "{c:?}");

        let c = userns_check(&probe(Ok(())), &Sysctls::default(), 1000);
        assert_eq!(c.status, Status::Ok);
        let c = userns_check(
            &probe(Err("ENOSPC: No space left on device")),
            &Sysctls::default(),
            1000,
        );
        assert!(c.message.contains("limit"), "{c:?}");
        let c = userns_check(&probe(Err("EPERM")), &Sysctls::default(), 1000);
        assert!(c.fix.unwrap().contains("seccomp"));
    }

    #[test]
    fn step_errors_cross_the_pipe_and_read_as_before() {
        let e = StepError::While {
            what: "writing /proc/self/uid_map".into(),
            error: "Permission denied (os error 13)".into(),
        };
        let json = serde_json::to_string(&Some(Err::<(), _>(e.clone()))).unwrap();
        let back: Option<Result<(), StepError>> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Some(Err(e.clone())));
        assert_eq!(
            e.to_string(),
            "writing /proc/self/uid_map: Permission denied (os error 13)"
        );
        assert_eq!(
            StepError::NoReport.to_string(),
            "the probe process died without a report"
        );
    }

    #[test]
    fn overlay_and_fuse_mount_verdicts() {
        let mut p = probe(Ok(()));
        p.mountns = Some(Ok(()));
        p.overlay = Some(Ok(()));
        assert_eq!(overlay_check(&p).status, Status::Ok);
        p.overlay = Some(Err(StepError::Errno("EINVAL".into())));
        let c = overlay_check(&p);
        assert_eq!(c.status, Status::Fail);
        assert!(c.message.contains("overlay") && c.message.contains("EINVAL"));
        assert_eq!(overlay_check(&probe(Err("EPERM"))).status, Status::Fail);
        assert_eq!(fuse_mount_check(&p).status, Status::Fail);
        p.fuse_mount = Some(Ok(()));
        assert_eq!(fuse_mount_check(&p).status, Status::Ok);
    }
}

//! FUSE: /dev/fuse for the calling user, a FUSE mount, squashfuse and squashfs-tools.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::namespaces::Probe;
use super::Check;

/// `/dev/fuse` as found: `None` when missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseDevice {
    pub exists: bool,
    pub mode: u32,
    pub is_fuse_char_device: bool,
    /// Opening it read-write as the calling user: `Err(kind)` on failure.
    pub open: Result<(), io::ErrorKind>,
}

pub(super) fn fuse_device_facts() -> FuseDevice {
    let meta = fs::metadata("/dev/fuse");
    let open = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map(drop)
        .map_err(|e| e.kind());
    match meta {
        Err(_) => FuseDevice {
            exists: false,
            mode: 0,
            is_fuse_char_device: false,
            open,
        },
        Ok(m) => FuseDevice {
            exists: true,
            mode: m.mode() & 0o7777,
            // FUSE's misc device is 10:229 everywhere.
            is_fuse_char_device: m.file_type().is_char_device()
                && libc::major(m.rdev()) == 10
                && libc::minor(m.rdev()) == 229,
            open,
        },
    }
}

pub fn fuse_device_check(dev: &FuseDevice, euid: u32) -> Check {
    const ID: &str = "dev-fuse";
    const CHMOD: &str = "`chmod 0666 /dev/fuse` on every node (the mode distributions ship; FUSE mounts stay confined to the user's own namespace), and make it persist with a udev rule: KERNEL==\"fuse\", MODE=\"0666\"";
    if !dev.exists {
        return Check::fail(
            ID,
            "/dev/fuse does not exist",
            "load the fuse module (`modprobe fuse`; add it to /etc/modules-load.d/) and make sure /dev is not a minimal tmpfs without it",
        );
    }
    if !dev.is_fuse_char_device {
        return Check::fail(
            ID,
            "/dev/fuse is not the FUSE character device (10:229)",
            "recreate it: `rm /dev/fuse && mknod -m 0666 /dev/fuse c 10 229`",
        );
    }
    let users_can = dev.mode & 0o006 == 0o006;
    match &dev.open {
        Err(io::ErrorKind::PermissionDenied) => Check::fail(
            ID,
            format!(
                "/dev/fuse (mode {:04o}) cannot be opened by this user: permission denied",
                dev.mode
            ),
            CHMOD,
        ),
        Err(kind) => Check::fail(
            ID,
            format!("/dev/fuse cannot be opened: {kind}"),
            "check that the fuse module is loaded (`modprobe fuse`)",
        ),
        Ok(()) if euid == 0 && !users_can => Check::fail(
            ID,
            format!(
                "/dev/fuse is mode {:04o}: root can open it, users cannot",
                dev.mode
            ),
            CHMOD,
        ),
        Ok(()) => Check::ok(
            ID,
            format!("/dev/fuse (mode {:04o}) opens read-write", dev.mode),
        ),
    }
}

pub fn fuse_mount_check(probe: &Probe) -> Check {
    const ID: &str = "fuse-mount";
    match &probe.fuse_mount {
        Some(Ok(())) => Check::ok(ID, "FUSE mounts work inside a user namespace"),
        Some(Err(e)) => Check::fail(
            ID,
            format!("the kernel refuses a FUSE mount inside a user namespace: {e}"),
            "ferry needs Linux >= 4.18 (FUSE in user namespaces); check that no security module forbids it",
        ),
        None => Check::fail(
            ID,
            "not tried: /dev/fuse is unusable or there is no user namespace",
            "fix the checks above first",
        ),
    }
}

pub fn squashfuse_check(site: Option<&Path>, found: Option<PathBuf>) -> Check {
    const ID: &str = "squashfuse";
    match (site, found) {
        (Some(_), Some(p)) => Check::ok(
            ID,
            format!("{} (the site's `squashfuse=`)", p.display()),
        ),
        (Some(site), None) => Check::fail(
            ID,
            format!(
                "the site's squashfuse program {} (plugstack.conf `squashfuse=`) is missing or not executable",
                site.display()
            ),
            "install squashfuse there, fix `squashfuse=`, or drop it to use squashfuse_ll from PATH",
        ),
        (None, Some(p)) => Check::ok(ID, format!("{}", p.display())),
        (None, None) => Check::fail(
            ID,
            "neither squashfuse_ll nor squashfuse is in PATH: squashfs images cannot be mounted",
            "install squashfuse (Debian/Ubuntu: `apt-get install squashfuse`; RPM: squashfuse) or set `squashfuse=PATH` in the plugin's plugstack.conf arguments",
        ),
    }
}

pub fn squashfs_tools_check(mksquashfs: Option<PathBuf>, unsquashfs: Option<PathBuf>) -> Check {
    const ID: &str = "squashfs-tools";
    match (mksquashfs, unsquashfs) {
        (Some(m), Some(u)) => Check::ok(ID, format!("{} and {}", m.display(), u.display())),
        (m, u) => {
            let missing: Vec<&str> = [("mksquashfs", m.is_none()), ("unsquashfs", u.is_none())]
                .iter()
                .filter(|(_, missing)| *missing)
                .map(|(n, _)| *n)
                .collect();
            Check::warn(
                ID,
                format!(
                    "{} not in PATH: needed only to import images (running squashfs images works without)",
                    missing.join(" and ")
                ),
                "install squashfs-tools (Debian/Ubuntu: `apt-get install squashfs-tools`)",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    fn fuse(mode: u32, open: Result<(), io::ErrorKind>) -> FuseDevice {
        FuseDevice {
            exists: true,
            mode,
            is_fuse_char_device: true,
            open,
        }
    }

    #[test]
    fn dev_fuse_verdicts() {
        assert_eq!(
            fuse_device_check(&fuse(0o666, Ok(())), 1000).status,
            Status::Ok
        );
        let c = fuse_device_check(&fuse(0o600, Err(io::ErrorKind::PermissionDenied)), 1000);
        assert_eq!(c.status, Status::Fail);
        assert!(c.message.contains("mode 0600"), "{c:?}");
        assert!(c.fix.unwrap().contains("chmod 0666 /dev/fuse"));
        // Root opens a 0600 device, but the users it is for cannot.
        let c = fuse_device_check(&fuse(0o600, Ok(())), 0);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("chmod 0666 /dev/fuse"));
        let missing = FuseDevice {
            exists: false,
            ..fuse(0, Err(io::ErrorKind::NotFound))
        };
        assert!(fuse_device_check(&missing, 1000)
            .fix
            .unwrap()
            .contains("modprobe fuse"));
        let not_fuse = FuseDevice {
            is_fuse_char_device: false,
            ..fuse(0o666, Ok(()))
        };
        assert_eq!(fuse_device_check(&not_fuse, 1000).status, Status::Fail);
    }

    #[test]
    fn squashfuse_verdicts() {
        let c = squashfuse_check(None, None);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("apt-get install squashfuse"));
        let c = squashfuse_check(Some(Path::new("/opt/sq")), None);
        assert_eq!(c.status, Status::Fail);
        assert!(c.message.contains("/opt/sq") && c.message.contains("squashfuse="));
        assert_eq!(
            squashfuse_check(None, Some("/usr/bin/squashfuse_ll".into())).status,
            Status::Ok
        );
        let c = squashfs_tools_check(None, Some("/usr/bin/unsquashfs".into()));
        assert_eq!(c.status, Status::Warn);
        assert!(c.message.starts_with("mksquashfs not in PATH"), "{c:?}");
    }
}

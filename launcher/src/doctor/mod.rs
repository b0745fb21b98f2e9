//! `ferry doctor`: checks a node for everything ferry needs and says how to fix what is
//! missing.
//!
//! Each check gathers facts (by trying the real operation where one exists: a user
//! namespace, an overlay and a FUSE mount are made in a throwaway child) and hands them to
//! a pure function that decides ok / warn / FAIL and words the fix, so the decisions are
//! unit-tested without breaking the machine. Nothing on the machine is changed: the probes
//! live in a child's private namespaces, and a cache directory created to test it is
//! removed again.

mod elf;

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};

use crate::image::squashfs::{find_in_path, find_squashfuse};
use crate::slurm::site::PluginSettings;

pub use elf::{read_u32_symbol, ElfError};

/// Debian's Slurm plugin directory, where sites put spank_ferry.so when slurm.conf does
/// not name a `PluginDir`.
pub const DEBIAN_PLUGIN_DIR: &str = "/usr/lib/x86_64-linux-gnu/slurm-wlm";
const DEFAULT_SLURM_CONF: &str = "/etc/slurm/slurm.conf";
const DEFAULT_VERSION_HEADER: &str = "/usr/include/slurm/slurm_version.h";
/// The Slurm major.minor releases CI runs the plugin and `ferry run` tests against
/// (integration/test: Debian 12's 22.05, Debian 13's 24.11 and Debian unstable's 26.05).
pub const TESTED_SLURM: [u32; 3] = [0x160500, 0x180b00, 0x1a0500];
/// Slurm commands retry a missing configuration for a minute; a doctor must not hang.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
    /// Print the checks as one JSON object (`{"ok": bool, "checks": [...]}`).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable name for scripts (`userns`, `dev-fuse`, `oci-conf`, ...).
    pub id: &'static str,
    pub status: Status,
    /// What was found.
    pub message: String,
    /// What an admin (or the user) does about it; absent when all is well.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(id: &'static str, message: impl Into<String>) -> Check {
        Check {
            id,
            status: Status::Ok,
            message: message.into(),
            fix: None,
        }
    }
    fn warn(id: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            id,
            status: Status::Warn,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(id: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            id,
            status: Status::Fail,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(checks: Vec<Check>) -> Report {
        Report {
            ok: !checks.iter().any(|c| c.status == Status::Fail),
            checks,
        }
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{:<5} {:<15} {}\n",
                c.status.label(),
                c.id,
                c.message
            ));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("{:<21} fix: {fix}\n", ""));
            }
        }
        let count = |s| self.checks.iter().filter(|c| c.status == s).count();
        out.push_str(&format!(
            "{} ok, {} warn, {} FAIL\n",
            count(Status::Ok),
            count(Status::Warn),
            count(Status::Fail)
        ));
        out
    }
}

/// `ferry doctor`: print the report; 0 when nothing failed, 1 otherwise.
pub fn main(args: &DoctorArgs) -> i32 {
    let report = Report::new(run_checks());
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("the report serialises")
        );
    } else {
        print!("{}", report.text());
    }
    if report.ok {
        0
    } else {
        1
    }
}

/// Run every check. Must be called while the process is single-threaded (the probes fork).
pub fn run_checks() -> Vec<Check> {
    let euid = nix::unistd::geteuid().as_raw();
    let mut checks = Vec::new();
    if euid == 0 {
        checks.push(Check::warn(
            "user",
            "running as root: the namespace, /dev/fuse and cache checks show what root gets",
            "also run it as an ordinary user, e.g. `runuser -u USER -- ferry doctor`",
        ));
    }
    let probe = probe_namespaces();
    let sysctls = Sysctls::read();
    checks.push(userns_check(&probe, &sysctls, euid));
    checks.push(overlay_check(&probe));
    checks.push(fuse_device_check(&fuse_device_facts(), euid));
    checks.push(fuse_mount_check(&probe));

    let slurm = SlurmFacts::gather();
    let settings = slurm
        .as_ref()
        .ok()
        .and_then(|s| s.ferry_line.as_ref())
        .and_then(|l| PluginSettings::parse(&l.args).ok());
    let site_squashfuse = settings.as_ref().and_then(|s| s.squashfuse.clone());
    checks.push(squashfuse_check(
        site_squashfuse.as_deref(),
        find_squashfuse(site_squashfuse.as_deref()),
    ));
    checks.push(squashfs_tools_check(
        find_in_path("mksquashfs"),
        find_in_path("unsquashfs"),
    ));
    checks.push(cache_dir_check());
    checks.push(temp_dir_check());
    match slurm {
        Err(check) => checks.push(check),
        Ok(s) => checks.extend(slurm_checks(&s)),
    }
    checks
}

// ---------------------------------------------------------------------------------------
// Namespaces: tried for real in a child.

/// What the child managed to do, step by step; `Err` holds the errno's name or a reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub userns: Option<Result<(), String>>,
    pub mountns: Option<Result<(), String>>,
    pub overlay: Option<Result<(), String>>,
    /// `None`: not tried (no usable /dev/fuse, or an earlier step failed).
    pub fuse_mount: Option<Result<(), String>>,
}

/// Fork a child that creates a user namespace mapping only the caller's ids (as `ferry
/// run` does), then a mount namespace, and mounts a tmpfs, an overlay and a FUSE
/// connection in it. The child reports on a pipe and exits; its namespaces and mounts die
/// with it.
fn probe_namespaces() -> Probe {
    let (read_end, write_end) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => return probe_broken(format!("pipe: {e}")),
    };
    match crate::sys::raw::fork_single_threaded() {
        Err(e) => probe_broken(format!("fork: {e}")),
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
                None => probe_broken("the probe process died without a report".into()),
            }
        }
    }
}

fn probe_broken(reason: String) -> Probe {
    Probe {
        userns: Some(Err(reason)),
        ..Probe::default()
    }
}

fn errno_text(e: nix::Error) -> String {
    format!("{e}")
}

fn probe_in_child() -> Probe {
    let mut p = Probe::default();
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    let userns = nix::sched::unshare(CloneFlags::CLONE_NEWUSER)
        .map_err(errno_text)
        .and_then(|()| {
            let write = |path: &str, text: String| {
                fs::write(path, text).map_err(|e| format!("writing {path}: {e}"))
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
                .map_err(|e| format!("making / private: {e}"))
        })
        .and_then(|()| {
            mount(
                Some("tmpfs"),
                "/tmp",
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                None,
            )
            .map_err(|e| format!("mounting a tmpfs: {e}"))
        });
    let failed = mountns.is_err();
    p.mountns = Some(mountns);
    if failed {
        return p;
    }
    let overlay = ["lower", "upper", "work", "merged", "fuse"]
        .iter()
        .try_for_each(|d| fs::create_dir(Path::new("/tmp").join(d)))
        .map_err(|e| format!("creating directories on the tmpfs: {e}"))
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
            fs::write("/tmp/merged/written", b"x").map_err(|e| format!("writing on it: {e}"))
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
    fn read() -> Sysctls {
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
        (Some(Err(e)), None) if e.contains("ENOSPC") => Check::fail(
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

// ---------------------------------------------------------------------------------------
// FUSE

/// `/dev/fuse` as found: `None` when missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseDevice {
    pub exists: bool,
    pub mode: u32,
    pub is_fuse_char_device: bool,
    /// Opening it read-write as the calling user: `Err(kind)` on failure.
    pub open: Result<(), io::ErrorKind>,
}

fn fuse_device_facts() -> FuseDevice {
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

// ---------------------------------------------------------------------------------------
// Directories

/// Where ferry keeps its per-user cache: `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry`.
pub fn cache_dir(xdg_cache_home: Option<&OsStr>, home: Option<&Path>) -> Option<PathBuf> {
    match xdg_cache_home.map(Path::new) {
        // The XDG spec says to ignore a relative value.
        Some(x) if x.is_absolute() => Some(x.join("ferry")),
        _ => home.map(|h| h.join(".cache/ferry")),
    }
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
        })
}

/// Create `dir` (and missing parents) and a file in it; remove what was created for the
/// test. Returns whether `dir` existed before.
fn try_write(dir: &Path) -> io::Result<bool> {
    let first_missing = dir.ancestors().take_while(|a| !a.exists()).last();
    let existed = first_missing.is_none();
    let result = fs::create_dir_all(dir).and_then(|()| {
        let probe = dir.join(format!(".ferry-doctor-{}", std::process::id()));
        let written = fs::File::create(&probe).and_then(|mut f| f.write_all(b"ok"));
        let _ = fs::remove_file(&probe);
        written
    });
    if let Some(top) = first_missing {
        // Leave the machine as it was: remove the directories made here, innermost first.
        for d in dir.ancestors().take_while(|d| d.starts_with(top)) {
            let _ = fs::remove_dir(d);
        }
    }
    result.map(|()| existed)
}

fn cache_dir_check() -> Check {
    const ID: &str = "cache-dir";
    // FERRY_CACHE is what `ferry import --cache` defaults to.
    let chosen = std::env::var_os("FERRY_CACHE")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let Some(dir) = chosen.or_else(|| {
        cache_dir(
            std::env::var_os("XDG_CACHE_HOME").as_deref(),
            home_dir().as_deref(),
        )
    }) else {
        return Check::fail(
            ID,
            "no cache directory: neither XDG_CACHE_HOME nor HOME is set and the user has no passwd home",
            "set XDG_CACHE_HOME to a writable directory",
        );
    };
    match try_write(&dir) {
        Ok(true) => Check::ok(ID, format!("{} is writable", dir.display())),
        Ok(false) => Check::ok(ID, format!("{} can be created", dir.display())),
        Err(e) => Check::fail(
            ID,
            format!("{} cannot be created or written: {e}", dir.display()),
            "set XDG_CACHE_HOME to a writable directory (ferry uses $XDG_CACHE_HOME/ferry) or fix the permissions",
        ),
    }
}

fn temp_dir_check() -> Check {
    const ID: &str = "temp-dir";
    let dir = std::env::temp_dir();
    match try_write(&dir) {
        Ok(true) => Check::ok(ID, format!("{} is writable", dir.display())),
        Ok(false) | Err(_) => Check::warn(
            ID,
            format!(
                "{} is not a writable directory: imports need scratch space",
                dir.display()
            ),
            "set TMPDIR to a writable directory",
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Slurm

/// One plugin line of plugstack.conf (or a file it includes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginLine {
    pub file: PathBuf,
    pub line: usize,
    pub required: bool,
    pub plugin: PathBuf,
    pub args: Vec<String>,
}

impl PluginLine {
    fn place(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlugstackError {
    #[error("{file}:{line}: cannot read it: {reason}")]
    Unreadable {
        file: PathBuf,
        line: usize,
        reason: String,
    },
    #[error(
        "{file}:{line}: `{text}` is not `required|optional PLUGIN [ARGS]` or `include PATTERN`"
    )]
    Syntax {
        file: PathBuf,
        line: usize,
        text: String,
    },
    #[error("{0}: includes nest too deeply (a loop?)")]
    TooDeep(PathBuf),
}

/// Every plugin line of `file` and the files it includes, in Slurm's order. A relative
/// plugin path is looked up in `plugin_dirs`, as Slurm does.
pub fn read_plugstack(
    file: &Path,
    plugin_dirs: &[PathBuf],
) -> Result<Vec<PluginLine>, PlugstackError> {
    let mut out = Vec::new();
    read_plugstack_into(file, plugin_dirs, 0, (file, 0), &mut out)?;
    Ok(out)
}

fn read_plugstack_into(
    file: &Path,
    plugin_dirs: &[PathBuf],
    depth: usize,
    from: (&Path, usize),
    out: &mut Vec<PluginLine>,
) -> Result<(), PlugstackError> {
    if depth > 16 {
        return Err(PlugstackError::TooDeep(file.to_path_buf()));
    }
    let text = fs::read_to_string(file).map_err(|e| PlugstackError::Unreadable {
        file: from.0.to_path_buf(),
        line: from.1,
        reason: format!("{}: {e}", file.display()),
    })?;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("");
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = words.first() else { continue };
        let syntax = || PlugstackError::Syntax {
            file: file.to_path_buf(),
            line: n + 1,
            text: raw.trim().to_string(),
        };
        match first.to_ascii_lowercase().as_str() {
            "include" => {
                let pattern = words.get(1).ok_or_else(syntax)?;
                let base = file.parent().unwrap_or(Path::new("/"));
                for included in expand_include(&base.join(pattern)) {
                    read_plugstack_into(&included, plugin_dirs, depth + 1, (file, n + 1), out)?;
                }
            }
            kind @ ("required" | "optional") => {
                let plugin = Path::new(words.get(1).ok_or_else(syntax)?);
                let plugin = if plugin.is_absolute() {
                    plugin.to_path_buf()
                } else {
                    plugin_dirs
                        .iter()
                        .map(|d| d.join(plugin))
                        .find(|p| p.exists())
                        .unwrap_or_else(|| plugin.to_path_buf())
                };
                out.push(PluginLine {
                    file: file.to_path_buf(),
                    line: n + 1,
                    required: kind == "required",
                    plugin,
                    args: words[2..].iter().map(|s| s.to_string()).collect(),
                });
            }
            _ => return Err(syntax()),
        }
    }
    Ok(())
}

/// The files an `include` names: wildcards (`*`, `?`) are honoured in the last path
/// component (`plugstack.conf.d/*.conf`, as distributions ship it), in sorted order. A
/// pattern matching nothing includes nothing, as with Slurm's glob.
fn expand_include(pattern: &Path) -> Vec<PathBuf> {
    let name = pattern
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return if pattern.is_file() {
            vec![pattern.to_path_buf()]
        } else {
            Vec::new()
        };
    }
    let dir = pattern.parent().unwrap_or(Path::new("/"));
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    !n.starts_with('.') && wildcard_match(name.as_bytes(), n.as_bytes())
                })
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Shell-style matching of `*` and `?` (no character classes).
pub fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            wildcard_match(&pattern[1..], name)
                || (!name.is_empty() && wildcard_match(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => wildcard_match(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => wildcard_match(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// The value of `key` in slurm.conf text (keys are case-insensitive; the last one wins).
pub fn slurm_conf_value(text: &str, key: &str) -> Option<String> {
    text.lines().rev().find_map(|l| {
        let l = l.split('#').next().unwrap_or("").trim();
        let (k, v) = l.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(key)
            .then(|| v.trim().to_string())
    })
}

/// `0xMMmmuu` from `srun --version` output (`slurm 23.11.4`, `slurm-wlm 22.05.8`).
pub fn parse_slurm_version(text: &str) -> Option<u32> {
    let word = text.split_whitespace().nth(1)?;
    let mut parts = word.split(['.', '-']);
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    let micro: u32 = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    (major <= 0xff && minor <= 0xff && micro <= 0xff)
        .then_some((major << 16) | (minor << 8) | micro)
}

/// `#define SLURM_VERSION_NUMBER 0x......` in slurm_version.h.
pub fn parse_version_header(text: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut w = line.split_whitespace();
        if w.next()? != "#define" || w.next()? != "SLURM_VERSION_NUMBER" {
            return None;
        }
        let v = w.next()?;
        u32::from_str_radix(v.strip_prefix("0x").or_else(|| v.strip_prefix("0X"))?, 16).ok()
    })
}

pub fn version_text(v: u32) -> String {
    format!("{}.{:02}.{}", (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff)
}

fn major_minor(v: u32) -> String {
    format!("{}.{:02}", (v >> 16) & 0xff, (v >> 8) & 0xff)
}

/// What is known about the node's Slurm.
#[derive(Debug, Clone)]
pub struct SlurmFacts {
    pub conf: PathBuf,
    pub plugstack: PathBuf,
    pub plugin_dirs: Vec<PathBuf>,
    pub oci_conf_present: bool,
    /// The plugin lines, or why plugstack.conf could not be read.
    pub lines: Result<Vec<PluginLine>, String>,
    pub ferry_line: Option<PluginLine>,
    /// The running Slurm's version and where it was learnt.
    pub slurm_version: Option<(u32, String)>,
}

impl SlurmFacts {
    /// Find slurm.conf (SLURM_CONF, /etc/slurm/slurm.conf, `scontrol show config`) and
    /// read what the checks need. `Err` is the check to report when there is no Slurm.
    fn gather() -> Result<SlurmFacts, Check> {
        let conf = match std::env::var_os("SLURM_CONF").filter(|v| !v.is_empty()) {
            Some(c) => {
                let c = PathBuf::from(c);
                if !c.is_file() {
                    return Err(Check::fail(
                        "slurm",
                        format!("SLURM_CONF={} does not exist", c.display()),
                        "point SLURM_CONF at the cluster's slurm.conf, or unset it",
                    ));
                }
                c
            }
            None if Path::new(DEFAULT_SLURM_CONF).is_file() => PathBuf::from(DEFAULT_SLURM_CONF),
            None => match scontrol_conf_path() {
                Some(c) => c,
                None => {
                    return Err(Check::warn(
                        "slurm",
                        format!("no Slurm configuration found (SLURM_CONF, {DEFAULT_SLURM_CONF}, `scontrol show config`): Slurm checks skipped"),
                        "nothing to do where only `ferry run` is used; on a Slurm node set SLURM_CONF",
                    ))
                }
            },
        };
        let text = fs::read_to_string(&conf).unwrap_or_default();
        let dir = conf.parent().unwrap_or(Path::new("/")).to_path_buf();
        let plugstack = slurm_conf_value(&text, "PlugStackConfig")
            .map(|p| dir.join(p))
            .unwrap_or_else(|| dir.join("plugstack.conf"));
        let plugin_dirs: Vec<PathBuf> = slurm_conf_value(&text, "PluginDir")
            .map(|v| v.split(':').map(PathBuf::from).collect())
            .unwrap_or_else(|| vec![PathBuf::from(DEBIAN_PLUGIN_DIR)]);
        let lines = read_plugstack(&plugstack, &plugin_dirs).map_err(|e| e.to_string());
        let ferry_line = lines
            .as_ref()
            .ok()
            .and_then(|l| ferry_lines(l).into_iter().next().cloned());
        Ok(SlurmFacts {
            oci_conf_present: dir.join("oci.conf").exists(),
            conf,
            plugstack,
            plugin_dirs,
            lines,
            ferry_line,
            slurm_version: slurm_version(),
        })
    }
}

/// The lines loading ferry's plugin.
pub fn ferry_lines(lines: &[PluginLine]) -> Vec<&PluginLine> {
    lines
        .iter()
        .filter(|l| {
            l.plugin
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains("spank_ferry"))
        })
        .collect()
}

fn scontrol_conf_path() -> Option<PathBuf> {
    let out = run_with_timeout(Command::new("scontrol").args(["show", "config"]))?;
    out.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "SLURM_CONF").then(|| PathBuf::from(v.trim()))
        })
        .filter(|p| p.is_file())
}

/// The Slurm version of this node: `srun --version`, else the installed slurm_version.h.
fn slurm_version() -> Option<(u32, String)> {
    if let Some(v) = run_with_timeout(Command::new("srun").arg("--version"))
        .as_deref()
        .and_then(parse_slurm_version)
    {
        return Some((v, "srun --version".into()));
    }
    let header = fs::read_to_string(DEFAULT_VERSION_HEADER).ok()?;
    parse_version_header(&header).map(|v| (v, DEFAULT_VERSION_HEADER.into()))
}

/// stdout of a command that exited 0 within [`COMMAND_TIMEOUT`].
fn run_with_timeout(cmd: &mut Command) -> Option<String> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = crate::sys::child::run_tool(&tool, cmd, Some(COMMAND_TIMEOUT)).ok()?;
    String::from_utf8(out.stdout).ok()
}

/// The Slurm checks: oci.conf, the plugstack line and its arguments, the plugin's version.
pub fn slurm_checks(s: &SlurmFacts) -> Vec<Check> {
    let mut checks = vec![oci_check(s)];
    let lines = match &s.lines {
        Ok(lines) => lines,
        Err(e) => {
            checks.push(Check::fail(
                "plugstack",
                e.clone(),
                format!(
                    "create {} with the line from /etc/slurm/plugstack.conf.d/ferry.conf (`required {DEBIAN_PLUGIN_DIR}/spank_ferry.so ferry_bin=/usr/local/bin/ferry`)",
                    s.plugstack.display()
                ),
            ));
            return checks;
        }
    };
    let found = ferry_lines(lines);
    let line = match found.as_slice() {
        [] => {
            checks.push(Check::fail(
                "plugstack",
                format!("spank_ferry.so is not in {} or the files it includes", s.plugstack.display()),
                format!("add `required {DEBIAN_PLUGIN_DIR}/spank_ferry.so ferry_bin=/usr/local/bin/ferry` (see conf/plugstack.conf.d/ferry.conf; `make install` puts it in /etc/slurm/plugstack.conf.d/)"),
            ));
            return checks;
        }
        [one] => *one,
        [first, ..] => {
            let places: Vec<String> = found.iter().map(|l| l.place()).collect();
            checks.push(Check::fail(
                "plugstack",
                format!(
                    "spank_ferry.so is loaded {} times ({})",
                    found.len(),
                    places.join(", ")
                ),
                "keep one line: Slurm would load the plugin twice and its options would clash",
            ));
            *first
        }
    };
    checks.push(plugin_line_check(line, PluginSettings::parse(&line.args)));
    let plugin_version = fs::read(&line.plugin)
        .map_err(|e| e.to_string())
        .and_then(|bytes| read_u32_symbol(&bytes, "plugin_version").map_err(|e| e.to_string()));
    checks.push(version_check(
        &line.plugin,
        plugin_version,
        s.slurm_version.clone(),
    ));
    checks
}

fn oci_check(s: &SlurmFacts) -> Check {
    let oci = s.conf.parent().unwrap_or(Path::new("/")).join("oci.conf");
    if s.oci_conf_present {
        Check::fail(
            "oci-conf",
            format!(
                "{} exists: Slurm then runs --container steps through its own OCI runtime hook, and ferry never sees them",
                oci.display()
            ),
            format!("remove (or rename) {} on every node and restart slurmd", oci.display()),
        )
    } else {
        Check::ok(
            "oci-conf",
            format!("no {}: --container reaches ferry", oci.display()),
        )
    }
}

/// The ferry line of plugstack.conf: its plugin file, its arguments, its ferry_bin.
pub fn plugin_line_check(
    line: &PluginLine,
    settings: Result<PluginSettings, crate::slurm::site::SiteError>,
) -> Check {
    const ID: &str = "plugstack";
    let place = line.place();
    if !line.plugin.is_file() {
        return Check::fail(
            ID,
            format!(
                "{place}: the plugin {} does not exist",
                line.plugin.display()
            ),
            "install spank_ferry.so there (`make install`) or fix the path",
        );
    }
    let settings = match settings {
        Ok(s) => s,
        Err(e) => return Check::fail(
            ID,
            format!("{place}: {e}"),
            "fix the arguments (docs/admin-guide.md lists them); until then container steps fail",
        ),
    };
    let bin = &settings.ferry_bin;
    let executable = fs::metadata(bin)
        .map(|m| m.is_file() && m.mode() & 0o111 != 0)
        .unwrap_or(false);
    if !executable {
        return Check::fail(
            ID,
            format!(
                "{place}: ferry_bin {} is missing or not executable",
                bin.display()
            ),
            "install ferry there or set `ferry_bin=` to where it is",
        );
    }
    let text = format!(
        "{place}: {} loaded, arguments parse, ferry_bin {}",
        line.plugin.display(),
        bin.display()
    );
    if line.required {
        Check::ok(ID, text)
    } else {
        Check::warn(
            ID,
            format!("{text}; but the line says `optional`"),
            "use `required`: with `optional`, a plugin that fails to load lets container steps run without their container",
        )
    }
}

pub fn version_check(
    plugin: &Path,
    plugin_version: Result<u32, String>,
    slurm: Option<(u32, String)>,
) -> Check {
    const ID: &str = "plugin-version";
    let built = match plugin_version {
        Ok(v) => v,
        Err(e) => {
            return Check::fail(
                ID,
                format!("cannot read plugin_version from {}: {e}", plugin.display()),
                "reinstall spank_ferry.so (`make install` or the ferry package)",
            )
        }
    };
    let Some((running, source)) = slurm else {
        return Check::warn(
            ID,
            format!(
                "the plugin is built for Slurm {}; this node's Slurm version is unknown (no srun, no slurm_version.h)",
                version_text(built)
            ),
            "check that slurmd's version has the same major.minor",
        );
    };
    // Slurm loads a SPANK plugin only when major.minor match (plugin.c).
    if built & 0xffff00 == running & 0xffff00 {
        let message = format!(
            "the plugin is built for Slurm {}, this node runs {} ({source})",
            version_text(built),
            version_text(running)
        );
        let tested = TESTED_SLURM.map(major_minor).join(", ");
        let newest = TESTED_SLURM[TESTED_SLURM.len() - 1];
        if TESTED_SLURM.contains(&(running & 0xffff00)) {
            Check::ok(
                ID,
                format!("{message}, a release ferry is tested with ({tested})"),
            )
        } else if running & 0xffff00 > newest {
            Check::warn(
                ID,
                format!("{message}, newer than the releases ferry is tested with ({tested})"),
                "try `srun --container=IMAGE` on one node before all: a new Slurm may change what the plugin relies on",
            )
        } else {
            Check::ok(
                ID,
                format!("{message}, between the releases ferry is tested with ({tested}): expected to work"),
            )
        }
    } else {
        Check::fail(
            ID,
            format!(
                "the plugin is built for Slurm {} but this node runs {} ({source}): Slurm refuses to load it (\"Incompatible Slurm plugin version\")",
                version_text(built),
                version_text(running)
            ),
            format!(
                "rebuild it against Slurm {}'s headers (`make install`, with libslurm-dev of that version or FERRY_SLURM_VERSION_H)",
                major_minor(running)
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(userns: Result<(), &str>) -> Probe {
        Probe {
            userns: Some(userns.map_err(String::from)),
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
    fn overlay_and_fuse_mount_verdicts() {
        let mut p = probe(Ok(()));
        p.mountns = Some(Ok(()));
        p.overlay = Some(Ok(()));
        assert_eq!(overlay_check(&p).status, Status::Ok);
        p.overlay = Some(Err("EINVAL".into()));
        let c = overlay_check(&p);
        assert_eq!(c.status, Status::Fail);
        assert!(c.message.contains("overlay") && c.message.contains("EINVAL"));
        assert_eq!(overlay_check(&probe(Err("EPERM"))).status, Status::Fail);
        assert_eq!(fuse_mount_check(&p).status, Status::Fail);
        p.fuse_mount = Some(Ok(()));
        assert_eq!(fuse_mount_check(&p).status, Status::Ok);
    }

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

    #[test]
    fn cache_dir_follows_xdg() {
        let home = Some(Path::new("/home/a"));
        assert_eq!(cache_dir(None, home), Some("/home/a/.cache/ferry".into()));
        assert_eq!(
            cache_dir(Some(OsStr::new("/scratch/c")), home),
            Some("/scratch/c/ferry".into())
        );
        assert_eq!(
            cache_dir(Some(OsStr::new("rel")), home),
            Some("/home/a/.cache/ferry".into())
        );
        assert_eq!(cache_dir(None, None), None);
    }

    #[test]
    fn try_write_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/ferry");
        assert!(!try_write(&dir).unwrap());
        assert!(!tmp.path().join("a").exists());
        fs::create_dir_all(&dir).unwrap();
        assert!(try_write(&dir).unwrap());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn plugstack_with_includes_and_relative_plugins() {
        let tmp = tempfile::tempdir().unwrap();
        let etc = tmp.path();
        fs::create_dir(etc.join("plugstack.conf.d")).unwrap();
        fs::create_dir(etc.join("lib")).unwrap();
        fs::write(etc.join("lib/spank_ferry.so"), b"").unwrap();
        fs::write(
            etc.join("plugstack.conf"),
            "# site plugins\noptional /usr/lib/other.so a=b\n\ninclude plugstack.conf.d/*.conf\nInclude /nonexistent/*.conf\n",
        )
        .unwrap();
        fs::write(
            etc.join("plugstack.conf.d/ferry.conf"),
            "required spank_ferry.so  ferry_bin=/usr/bin/ferry log_level=info # comment\n",
        )
        .unwrap();
        fs::write(
            etc.join("plugstack.conf.d/ferry.conf.dpkg-old"),
            "required /old/spank_ferry.so\n",
        )
        .unwrap();
        let lines = read_plugstack(&etc.join("plugstack.conf"), &[etc.join("lib")]).unwrap();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(!lines[0].required);
        let ferry = ferry_lines(&lines);
        assert_eq!(ferry.len(), 1);
        assert_eq!(ferry[0].plugin, etc.join("lib/spank_ferry.so"));
        assert_eq!(
            ferry[0].args,
            ["ferry_bin=/usr/bin/ferry", "log_level=info"]
        );
        assert_eq!(ferry[0].line, 1);
        assert!(ferry[0].required);

        fs::write(etc.join("plugstack.conf"), "required\n").unwrap();
        let err = read_plugstack(&etc.join("plugstack.conf"), &[]).unwrap_err();
        assert!(
            matches!(err, PlugstackError::Syntax { line: 1, .. }),
            "{err}"
        );
        fs::write(etc.join("plugstack.conf"), "include plugstack.conf\n").unwrap();
        assert!(matches!(
            read_plugstack(&etc.join("plugstack.conf"), &[]),
            Err(PlugstackError::TooDeep(_))
        ));
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match(b"*.conf", b"ferry.conf"));
        assert!(!wildcard_match(b"*.conf", b"ferry.conf.dpkg-old"));
        assert!(wildcard_match(b"a?c*", b"abcdef"));
        assert!(!wildcard_match(b"a?c", b"ac"));
    }

    #[test]
    fn slurm_conf_and_versions() {
        let conf = "ClusterName=x\n#PlugStackConfig=/no\nplugstackconfig = /etc/slurm/ps.conf # here\nPluginDir=/a:/b\n";
        assert_eq!(
            slurm_conf_value(conf, "PlugStackConfig").as_deref(),
            Some("/etc/slurm/ps.conf")
        );
        assert_eq!(
            slurm_conf_value(conf, "PluginDir").as_deref(),
            Some("/a:/b")
        );
        assert_eq!(slurm_conf_value(conf, "SlurmdPort"), None);
        assert_eq!(parse_slurm_version("slurm-wlm 22.05.8\n"), Some(0x160508));
        assert_eq!(parse_slurm_version("slurm 24.11.0-0rc1"), Some(0x180b00));
        assert_eq!(parse_slurm_version("srun: error"), None);
        assert_eq!(
            parse_version_header("#define SLURM_VERSION_NUMBER 0x170b04\n"),
            Some(0x170b04)
        );
        assert_eq!(version_text(0x160508), "22.05.8");
    }

    #[test]
    fn version_verdicts() {
        let so = Path::new("/x/spank_ferry.so");
        let c = version_check(so, Ok(0x160508), Some((0x160502, "srun --version".into())));
        assert_eq!(c.status, Status::Ok);
        assert!(
            c.message
                .contains("a release ferry is tested with (22.05, 24.11, 26.05)"),
            "{c:?}"
        );
        let c = version_check(so, Ok(0x170b04), Some((0x170b04, "srun --version".into())));
        assert_eq!(c.status, Status::Ok);
        assert!(c.message.contains("between the releases"), "{c:?}");
        let c = version_check(so, Ok(0x1a0b00), Some((0x1a0b01, "srun --version".into())));
        assert_eq!(c.status, Status::Warn);
        assert!(c.message.contains("newer than the releases"), "{c:?}");
        let c = version_check(so, Ok(0x160508), Some((0x170b04, "srun --version".into())));
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.message.contains("22.05.8") && c.message.contains("23.11.4"),
            "{c:?}"
        );
        assert!(c.fix.unwrap().contains("23.11"));
        assert_eq!(version_check(so, Ok(0x160508), None).status, Status::Warn);
        assert_eq!(
            version_check(so, Err("not ELF".into()), None).status,
            Status::Fail
        );
        let elf = elf::tests::tiny_elf(&[("plugin_version", 0x160508)]);
        assert_eq!(read_u32_symbol(&elf, "plugin_version"), Ok(0x160508));
    }

    #[test]
    fn plugin_line_verdicts() {
        let tmp = tempfile::tempdir().unwrap();
        let so = tmp.path().join("spank_ferry.so");
        fs::write(&so, b"").unwrap();
        let line = |required, args: &[&str]| PluginLine {
            file: "/etc/slurm/plugstack.conf".into(),
            line: 3,
            required,
            plugin: so.clone(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        let good = line(true, &["ferry_bin=/bin/sh"]);
        let c = plugin_line_check(&good, PluginSettings::parse(&good.args));
        assert_eq!(c.status, Status::Ok, "{c:?}");
        let typo = line(true, &["ferrybin=/bin/sh"]);
        let c = plugin_line_check(&typo, PluginSettings::parse(&typo.args));
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.message.starts_with("/etc/slurm/plugstack.conf:3: ")
                && c.message.contains("unknown key"),
            "{c:?}"
        );
        let nobin = line(true, &["ferry_bin=/nonexistent/ferry"]);
        let c = plugin_line_check(&nobin, PluginSettings::parse(&nobin.args));
        assert!(c.message.contains("/nonexistent/ferry"), "{c:?}");
        let optional = line(false, &["ferry_bin=/bin/sh"]);
        assert_eq!(
            plugin_line_check(&optional, PluginSettings::parse(&optional.args)).status,
            Status::Warn
        );
    }

    #[test]
    fn report_text_and_json() {
        let r = Report::new(vec![
            Check::ok("userns", "fine"),
            Check::fail("dev-fuse", "bad", "chmod 0666 /dev/fuse"),
        ]);
        assert!(!r.ok);
        let text = r.text();
        assert!(text.contains("ok    userns"), "{text}");
        assert!(text.contains("FAIL  dev-fuse        bad\n"), "{text}");
        assert!(text.contains("fix: chmod 0666 /dev/fuse"), "{text}");
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][1]["status"], "fail");
        assert!(json["checks"][0].get("fix").is_none());
        assert!(Report::new(vec![Check::warn("x", "y", "z")]).ok);
    }
}

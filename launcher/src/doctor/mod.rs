//! `ferry doctor`: checks a node for everything ferry needs and says how to fix what is
//! missing.
//!
//! Each check gathers facts (by trying the real operation where one exists: a user
//! namespace, an overlay and a FUSE mount are made in a throwaway child) and hands them to
//! a pure function that decides ok / warn / FAIL and words the fix, so the decisions are
//! unit-tested without breaking the machine. Nothing on the machine is changed: the probes
//! live in a child's private namespaces, and a cache directory created to test it is
//! removed again.
//!
//! One file per group of checks (namespaces, fuse, directories, slurm with plugstack; elf
//! reads the plugin's Slurm version); this file holds the report and runs the checks.

mod directories;
mod elf;
mod fuse;
mod namespaces;
mod plugstack;
mod slurm;

use serde::Serialize;

use crate::image::squashfs::{find_in_path, find_squashfuse};
use crate::slurm::site::PluginSettings;

pub use directories::cache_dir;
pub use elf::{read_u32_symbol, ElfError};
pub use fuse::{
    fuse_device_check, fuse_mount_check, squashfs_tools_check, squashfuse_check, FuseDevice,
};
pub use namespaces::{overlay_check, userns_check, Probe, Sysctls};
pub use plugstack::{ferry_lines, read_plugstack, wildcard_match, PluginLine, PlugstackError};
pub use slurm::{
    parse_slurm_version, parse_version_header, plugin_line_check, slurm_checks, slurm_conf_value,
    version_check, version_text, SlurmFacts, DEBIAN_PLUGIN_DIR, TESTED_SLURM,
};

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

/// `ferry run --checkpoint-dir`: off unless the site enables it; where it does, CRIU must
/// be there and new enough. (CRIU needs no capabilities: it runs in the container's user
/// namespace.)
fn checkpoint_check(
    facts: Result<
        (
            bool,
            Result<
                crate::container::checkpoint::Criu,
                crate::container::checkpoint::CheckpointError,
            >,
        ),
        crate::container::checkpoint::CheckpointError,
    >,
) -> Check {
    use crate::container::checkpoint::SITE_CONF;
    match facts {
        Err(e) => Check::fail("checkpoint", e.to_string(), format!("correct {SITE_CONF}")),
        Ok((false, _)) => Check::ok(
            "checkpoint",
            format!("checkpoints (ferry run --checkpoint-dir) not enabled by the site ({SITE_CONF})"),
        ),
        Ok((true, Ok(criu))) => Check::ok(
            "checkpoint",
            format!(
                "checkpoints enabled; CRIU {} at {}",
                criu.version,
                criu.path.display()
            ),
        ),
        Ok((true, Err(e))) => Check::fail(
            "checkpoint",
            e.to_string(),
            format!("install CRIU 4 or later (Debian 13: apt-get install criu), or set enabled=no in {SITE_CONF}"),
        ),
    }
}

/// Where the default provider (`auto`) would unpack on this node, and whether it can: the
/// plugin's steps under `named_dir`, else `ferry run`'s cache.
fn auto_unpack_check(settings: Option<&PluginSettings>, uid: u32) -> Check {
    use crate::spec::Provider;
    const ID: &str = AUTO_UNPACK;
    let place = match settings {
        Some(s) if s.rootfs != Provider::Auto => {
            return Check::ok(
                ID,
                format!(
                    "the site's provider is {}: steps unpack nothing in the background",
                    s.rootfs
                ),
            )
        }
        Some(s) => s
            .named_dir
            .join(crate::rootfs::user_dir::name(uid))
            .join("unpacked"),
        None => match directories::chosen_cache_dir() {
            Some(root) => root.join(format!("unpacked-{uid}")),
            // The cache-dir check says why.
            None => return Check::warn(ID, "no cache directory", "set HOME or XDG_CACHE_HOME"),
        },
    };
    auto_unpack_verdict(&place, crate::rootfs::unpacked::room_for_tree(&place, 0))
}

const AUTO_UNPACK: &str = "auto-unpack";

fn auto_unpack_verdict(
    place: &std::path::Path,
    room: Result<(), crate::rootfs::unpacked::NoRoom>,
) -> Check {
    const ID: &str = AUTO_UNPACK;
    match room {
        Ok(()) => Check::ok(
            ID,
            format!(
                "images are unpacked in the background under {} (a local disk with room), for \
                 the host's speed from their second start on",
                place.display()
            ),
        ),
        Err(e) => Check::warn(
            ID,
            format!("images stay on squashfuse: {e}"),
            "point named_dir= (plugstack.conf) or the cache at a local disk, or set rootfs=squashfuse to say so",
        ),
    }
}

/// The plugin's settings in this node's plugstack.conf, for commands that must agree with
/// the plugin (`ferry containers`); `None`: no Slurm configuration, or no ferry line in it.
pub fn site_plugin_settings() -> Option<Result<PluginSettings, crate::slurm::site::SiteError>> {
    let facts = slurm::SlurmFacts::gather().ok()?;
    let line = facts.ferry_line?;
    Some(PluginSettings::parse(&line.args))
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
    let probe = namespaces::probe_namespaces();
    let sysctls = Sysctls::read();
    checks.push(userns_check(&probe, &sysctls, euid));
    checks.push(overlay_check(&probe));
    checks.push(fuse_device_check(&fuse::fuse_device_facts(), euid));
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
    checks.push(directories::cache_dir_check());
    checks.push(directories::temp_dir_check());
    checks.push(auto_unpack_check(settings.as_ref(), euid));
    checks.push(checkpoint_check(
        crate::container::checkpoint::SiteCheckpoint::read()
            .map(|site| (site.enabled, crate::container::checkpoint::find_criu(&site))),
    ));
    match slurm {
        Err(check) => checks.push(check),
        Ok(s) => checks.extend(slurm_checks(&s)),
    }
    checks
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_unpack_says_where_images_are_unpacked_or_why_not() {
        use crate::rootfs::unpacked::room_for_tree;
        let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let ok = super::auto_unpack_verdict(disk.path(), room_for_tree(disk.path(), 0));
        assert_eq!(ok.status, super::Status::Ok, "{}", ok.message);
        let shm = std::path::Path::new("/dev/shm/ferry-0/unpacked");
        let warn = super::auto_unpack_verdict(shm, room_for_tree(shm, 0));
        assert_eq!(warn.status, super::Status::Warn);
        assert!(
            warn.message
                .starts_with("images stay on squashfuse: /dev/shm is on tmpfs, not a local disk"),
            "{}",
            warn.message
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

    #[test]
    fn checkpoint_line_passes_when_off_and_fails_when_on_without_criu() {
        use crate::container::checkpoint::{CheckpointError, Criu};
        let missing = || {
            Err(CheckpointError::NoCriu(
                "not on PATH nor in /usr/sbin".into(),
            ))
        };
        assert_eq!(checkpoint_check(Ok((false, missing()))).status, Status::Ok);
        let broken = checkpoint_check(Ok((true, missing())));
        assert_eq!(broken.status, Status::Fail);
        assert!(
            broken.message.starts_with("CRIU not found"),
            "{}",
            broken.message
        );
        let criu = Criu {
            path: "/usr/sbin/criu".into(),
            version: "4.1.1".into(),
            interpreter: None,
        };
        let on = checkpoint_check(Ok((true, Ok(criu))));
        assert_eq!(on.status, Status::Ok);
        assert_eq!(
            on.message,
            "checkpoints enabled; CRIU 4.1.1 at /usr/sbin/criu"
        );
    }
}

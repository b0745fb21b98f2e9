//! `ferry doctor`, run as the unprivileged test user: a healthy node passes, and each
//! broken prerequisite is named with its fix. Prerequisites are broken only where the
//! host does not see it: in a private mount namespace, a nested user namespace, a PATH, or
//! a slurm.conf directory of the test's own.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_tests::*;

/// `status` of check `id` in doctor's text report (`ok`, `warn`, `FAIL`), and its line
/// with the fix line that follows.
fn check<'a>(report: &'a str, id: &str) -> (&'a str, String) {
    let lines: Vec<&str> = report.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.split_whitespace().nth(1) == Some(id))
        .unwrap_or_else(|| panic!("no check `{id}` in the report:\n{report}"));
    let mut text = lines[at].to_string();
    if let Some(next) = lines
        .get(at + 1)
        .filter(|l| l.trim_start().starts_with("fix:"))
    {
        text.push('\n');
        text.push_str(next);
    }
    (lines[at].split_whitespace().next().unwrap(), text)
}

fn assert_check(report: &str, id: &str, status: &str, words: &[&str]) {
    let (found, text) = check(report, id);
    assert_eq!(found, status, "check {id}:\n{report}");
    for w in words {
        assert!(text.contains(w), "check {id} does not say `{w}`:\n{report}");
    }
}

fn doctor(env: &str) -> Run {
    sh(&format!("{env} $FERRY doctor"))
}

/// The SPANK plugin integration/test built (FERRY_PLUGIN).
fn plugin_so() -> PathBuf {
    let p = PathBuf::from(std::env::var("FERRY_PLUGIN").unwrap_or_default());
    assert!(
        p.is_file(),
        "FERRY_PLUGIN={} is not the built spank_ferry.so: run the tests through `integration/test`",
        p.display()
    );
    p
}

/// A slurm.conf directory of the test's own, readable by the test user: slurm.conf (enough
/// for `srun --version`), plugstack.conf with `plugstack_line`, and more files.
struct SlurmDir {
    dir: tempfile::TempDir,
}

impl SlurmDir {
    fn new(plugstack_line: &str) -> SlurmDir {
        let dir = tempfile::Builder::new()
            .prefix("ferry-doctor-")
            .tempdir_in("/var/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = SlurmDir { dir };
        d.write(
            "slurm.conf",
            &format!(
                "ClusterName=doctor\nSlurmctldHost=localhost\nPlugStackConfig={}\n",
                d.path().join("plugstack.conf").display()
            ),
        );
        d.write("plugstack.conf", &format!("{plugstack_line}\n"));
        d
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path().join(name), text).unwrap();
    }
    fn env(&self) -> String {
        format!("SLURM_CONF={}", self.path().join("slurm.conf").display())
    }
}

fn ferry_line(extra: &str) -> String {
    format!(
        "required {} ferry_bin={} {extra}",
        plugin_so().display(),
        ferry_bin().display()
    )
}

#[test]
fn a_healthy_node_passes_every_check() {
    let _m = shared_machine();
    let slurm = SlurmDir::new(&ferry_line(""));
    let out = doctor(&slurm.env());
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    for id in [
        "userns",
        "overlayfs",
        "dev-fuse",
        "fuse-mount",
        "squashfuse",
        "squashfs-tools",
        "cache-dir",
        "oci-conf",
        "plugstack",
        "plugin-version",
    ] {
        assert_check(&out.stdout, id, "ok", &[]);
    }
    assert_check(
        &out.stdout,
        "plugin-version",
        "ok",
        &["the plugin is built for Slurm 2"],
    );
    assert!(!out.stdout.contains("FAIL"), "{}", out.stdout);
    // The cache check leaves no trace behind.
    let probes = dir_entries(&format!("/home/{USER}/.cache/ferry"))
        .into_iter()
        .filter(|n| n.starts_with(".ferry-doctor"))
        .count();
    assert_eq!(probes, 0);

    let json = sh(&format!("{} $FERRY doctor --json", slurm.env()));
    assert_eq!(json.code, 0, "{}", json.stderr);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("doctor --json");
    assert_eq!(v["ok"], true);
    let checks = v["checks"].as_array().unwrap();
    assert!(checks
        .iter()
        .any(|c| c["id"] == "userns" && c["status"] == "ok"));
    assert!(leftovers_after(USER, Duration::from_secs(1)).is_empty());
}

#[test]
fn dev_fuse_mode_0600_is_named_with_its_fix() {
    let _m = shared_machine();
    assert_check(&doctor("").stdout, "dev-fuse", "ok", &["mode 0666"]);
    // A private mount namespace where /dev/fuse is mode 0600, as on some hosts.
    let script = format!(
        "set -e; d=$(mktemp -d); mknod $d/fuse c 10 229; chmod 0600 $d/fuse; mount --bind $d/fuse /dev/fuse; \
         runuser -u {USER} -- env -i HOME=/home/{USER} PATH=/usr/bin:/bin {} doctor; echo code=$?",
        ferry_bin().display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "bash", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "doctor must exit 1 when a check fails:\n{stdout}"
    );
    assert_check(
        &stdout,
        "dev-fuse",
        "FAIL",
        &["mode 0600", "permission denied", "chmod 0666 /dev/fuse"],
    );
    assert_check(&stdout, "userns", "ok", &[]);
}

#[test]
fn disabled_user_namespaces_are_named_with_the_sysctl() {
    let _m = shared_machine();
    assert_check(&doctor("").stdout, "userns", "ok", &[]);
    // user.max_user_namespaces is per user namespace: 0 in a namespace mapping every uid to
    // itself, with doctor run there as the test user (see tests/run.rs).
    let uid = uid_of(USER);
    let script = format!(
        "read go; exec sh -c 'echo 0 > /proc/sys/user/max_user_namespaces && \
         exec setpriv --reuid {uid} --regid {uid} --clear-groups env -i HOME=/home/{USER} PATH=/usr/bin:/bin {} doctor'",
        ferry_bin().display()
    );
    let mut child = Command::new("unshare")
        .args(["--user", "--", "sh", "-c", &script])
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(100));
    std::fs::write(format!("/proc/{pid}/uid_map"), "0 0 65536\n").unwrap();
    std::fs::write(format!("/proc/{pid}/gid_map"), "0 0 65536\n").unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_check(
        &stdout,
        "userns",
        "FAIL",
        &[
            "user.max_user_namespaces=0",
            "sysctl -w user.max_user_namespaces=",
        ],
    );
}

#[test]
fn missing_squashfuse_is_named() {
    let _m = shared_machine();
    let healthy = SlurmDir::new(&ferry_line(""));
    assert_check(
        &doctor(&healthy.env()).stdout,
        "squashfuse",
        "ok",
        &["squashfuse"],
    );

    // Not in PATH.
    let out = doctor("PATH=/nonexistent");
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert_check(
        &out.stdout,
        "squashfuse",
        "FAIL",
        &[
            "neither squashfuse_ll nor squashfuse",
            "apt-get install squashfuse",
        ],
    );
    assert_check(&out.stdout, "squashfs-tools", "warn", &["mksquashfs"]);

    // The site's setting points nowhere.
    let site = SlurmDir::new(&ferry_line("squashfuse=/nonexistent/squashfuse_ll"));
    let out = doctor(&site.env());
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert_check(
        &out.stdout,
        "squashfuse",
        "FAIL",
        &["/nonexistent/squashfuse_ll", "squashfuse="],
    );
}

#[test]
fn an_oci_conf_next_to_slurm_conf_fails() {
    let _m = shared_machine();
    let slurm = SlurmDir::new(&ferry_line(""));
    assert_check(&doctor(&slurm.env()).stdout, "oci-conf", "ok", &[]);
    slurm.write("oci.conf", "RunTimeQuery=\"runc state %n.%u.%j.%s.%t\"\n");
    let out = doctor(&slurm.env());
    assert_eq!(out.code, 1, "{}", out.stdout);
    let oci = slurm.path().join("oci.conf");
    assert_check(
        &out.stdout,
        "oci-conf",
        "FAIL",
        &[
            &format!("{} exists", oci.display()),
            "OCI",
            &format!("remove (or rename) {}", oci.display()),
        ],
    );
}

#[test]
fn plugstack_problems_are_named() {
    let _m = shared_machine();
    // Through an include, as Debian's plugstack.conf does.
    let slurm = SlurmDir::new("");
    slurm.write(
        "plugstack.conf",
        &format!(
            "include {}/plugstack.conf.d/*.conf\n",
            slurm.path().display()
        ),
    );
    std::fs::create_dir(slurm.path().join("plugstack.conf.d")).unwrap();
    std::fs::set_permissions(
        slurm.path().join("plugstack.conf.d"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let out = doctor(&slurm.env());
    assert_check(
        &out.stdout,
        "plugstack",
        "FAIL",
        &["spank_ferry.so is not in", "required "],
    );
    slurm.write("plugstack.conf.d/ferry.conf", &ferry_line(""));
    assert_check(
        &doctor(&slurm.env()).stdout,
        "plugstack",
        "ok",
        &["ferry.conf:1"],
    );
    slurm.write("plugstack.conf.d/ferry.conf", &ferry_line("ferrybin=/x"));
    let out = doctor(&slurm.env());
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert_check(
        &out.stdout,
        "plugstack",
        "FAIL",
        &["ferry.conf:1", "`ferrybin=`: unknown key"],
    );
}

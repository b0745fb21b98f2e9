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
        "auto-unpack",
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
    assert!(
        !out.stdout.lines().any(|l| l.starts_with("FAIL")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.ends_with(", 0 FAIL\n"), "{}", out.stdout);
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
    // The probe's mounts lived in its own namespaces only.
    assert!(!host_mounts().contains("ferry-doctor"));
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
        .output_within(COMMAND_LIMIT);
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
    let out = wait_within(
        child,
        COMMAND_LIMIT,
        "ferry doctor with user namespaces disabled",
    );
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

// ---------------------------------------------------------------------------------------
// Installation: `make install` and the Debian package, from the binaries integration/test
// built (CARGO=true: make builds nothing here).

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn make(target: &str, vars: &[String]) -> String {
    let out = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(repo())
        .arg(target)
        .arg("CARGO=true")
        .arg(format!("FERRY={}", ferry_bin().display()))
        .arg(format!("PLUGIN_SO={}", plugin_so().display()))
        .args(vars)
        .output_within(COMMAND_LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "make {target} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A directory root owns, readable by the test user.
fn scratch_root() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("ferry-install-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Debian's plugin directory of the running architecture.
fn debian_plugin_dir() -> String {
    format!("/usr/lib/{}-linux-gnu/slurm-wlm", std::env::consts::ARCH)
}

/// major.minor of the Slurm headers the plugin is built against.
fn header_major_minor() -> String {
    let text = std::fs::read_to_string("/usr/include/slurm/slurm_version.h").unwrap();
    let hex = text
        .lines()
        .find_map(|l| l.strip_prefix("#define SLURM_VERSION_NUMBER "))
        .unwrap()
        .trim();
    let v = u32::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap();
    format!("{}.{:02}", v >> 16, (v >> 8) & 0xff)
}

#[test]
fn make_install_puts_files_where_slurm_looks_and_uninstall_removes_them() {
    let _m = shared_machine();
    let root = scratch_root();
    let dest = format!("DESTDIR={}", root.path().display());
    let said = make("install", &[dest.clone(), "PREFIX=/opt/ferry".into()]);
    assert!(said.contains("ferry doctor"), "{said}");
    let bin = root.path().join("opt/ferry/bin/ferry");
    // The static program batch scripts' containers run as srun, squeue…
    let forwarder = root.path().join("opt/ferry/libexec/ferry/ferry-forward");
    assert!(forwarder.is_file(), "{} is missing", forwarder.display());
    let so = root
        .path()
        .join(debian_plugin_dir().trim_start_matches('/'))
        .join("spank_ferry.so");
    let conf = root.path().join("etc/slurm/plugstack.conf.d/ferry.conf");
    assert_eq!(
        std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read(&so).unwrap(),
        std::fs::read(plugin_so()).unwrap()
    );
    let line = format!(
        "required {}/spank_ferry.so ferry_bin=/opt/ferry/bin/ferry",
        debian_plugin_dir()
    );
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(text.lines().any(|l| l == line), "{text}");

    // The installed ferry runs its doctor for the test user.
    let out = sh(&format!("{} doctor", bin.display()));
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_check(&out.stdout, "userns", "ok", &[]);

    // A site's edits to ferry.conf survive a second install.
    std::fs::write(&conf, format!("{line} log_level=info\n")).unwrap();
    make("install", &[dest.clone(), "PREFIX=/opt/ferry".into()]);
    assert!(std::fs::read_to_string(&conf)
        .unwrap()
        .contains("log_level=info"));
    assert!(conf.with_extension("conf.new").exists());

    make("uninstall", &[dest, "PREFIX=/opt/ferry".into()]);
    for gone in [&bin, &forwarder, &so, &conf] {
        assert!(!gone.exists(), "{} is left", gone.display());
    }
}

#[test]
fn a_plugin_for_another_slurm_is_refused_before_install() {
    let _m = shared_machine();
    let slurm = SlurmDir::new("");
    slurm.write("slurm_version.h", "#define SLURM_VERSION_NUMBER 0x0e0b04\n");
    let out = Command::new(repo().join("packaging/slurm-info"))
        .arg("check")
        .arg(slurm.path().join("slurm_version.h"))
        .env("SLURM_CONF", slurm.path().join("slurm.conf"))
        .output_within(COMMAND_LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is Slurm 14.11.4 but this machine runs Slurm")
            && stderr.contains("FERRY_SLURM_VERSION_H"),
        "{stderr}"
    );
}

#[test]
fn the_deb_installs_into_a_throwaway_root_and_its_doctor_passes() {
    let _m = shared_machine();
    let work = scratch_root();
    let said = make(
        "deb",
        &[format!("DEB_DIR={}", work.path().join("out").display())],
    );
    let deb = PathBuf::from(said.lines().last().unwrap().trim());
    assert!(deb.is_file(), "{said}");

    let field = |name: &str| {
        let out = Command::new("dpkg-deb")
            .arg("-f")
            .arg(&deb)
            .arg(name)
            .output_within(COMMAND_LIMIT);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let series = header_major_minor();
    let depends = field("Depends");
    assert!(depends.contains("squashfuse"), "{depends}");
    assert!(
        depends.contains(&format!("slurm-wlm-basic-plugins (>= {series})")),
        "{depends}"
    );

    // A root of its own whose dpkg database is a copy of this machine's: dpkg checks the
    // dependencies against the packages really installed here, and changes nothing here.
    let root = work.path().join("root");
    let db = root.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(db.join(d)).unwrap();
    }
    std::fs::copy("/var/lib/dpkg/status", db.join("status")).unwrap();
    let dpkg = |args: &[&str]| {
        let out = Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args(args)
            .output_within(COMMAND_LIMIT);
        let stderr = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.contains("files list file for package"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(out.status.success(), "dpkg {args:?}: {stderr}");
    };
    dpkg(&["-i", deb.to_str().unwrap()]);
    let plugin_dir = debian_plugin_dir();
    let installed = |p: &str| root.join(p.trim_start_matches('/'));
    assert!(installed("/usr/bin/ferry").is_file());
    assert!(installed(&format!("{plugin_dir}/spank_ferry.so")).is_file());
    let conf = installed("/etc/slurm/plugstack.conf.d/ferry.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(
        text.lines()
            .any(|l| l == format!("required {plugin_dir}/spank_ferry.so ferry_bin=/usr/bin/ferry")),
        "{text}"
    );
    let conffiles = std::fs::read_to_string(db.join("info/ferry.conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/slurm/plugstack.conf.d/ferry.conf");

    // The package's files at their real paths, in a private mount namespace only (overlays
    // of the package's directories over the host's), with Debian's own plugstack.conf: the
    // installed ferry's doctor finds the plugin through the include and passes.
    let slurm = SlurmDir::new("");
    slurm.write(
        "slurm.conf",
        "ClusterName=doctor\nSlurmctldHost=localhost\nPlugStackConfig=/etc/slurm/plugstack.conf\n",
    );
    let host_view = || {
        [
            "/usr/bin/ferry".to_string(),
            format!("{plugin_dir}/spank_ferry.so"),
            "/etc/slurm/plugstack.conf.d/ferry.conf".to_string(),
        ]
        .map(|p| Path::new(&p).exists())
    };
    let host_before = host_view();
    let mut script = String::from("set -e; ");
    for dir in ["/usr/bin", &plugin_dir, "/etc/slurm/plugstack.conf.d"] {
        script.push_str(&format!(
            "mount -t overlay overlay -o lowerdir={}:{dir} {dir}; ",
            installed(dir).display()
        ));
    }
    script.push_str(&format!(
        "runuser -u {USER} -- env -i HOME=/home/{USER} PATH=/usr/bin:/bin {} /usr/bin/ferry doctor",
        slurm.env()
    ));
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "bash", "-c", &script])
        .output_within(COMMAND_LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_check(
        &stdout,
        "plugstack",
        "ok",
        &[
            "/etc/slurm/plugstack.conf.d/ferry.conf:",
            "ferry_bin /usr/bin/ferry",
        ],
    );
    assert_check(
        &stdout,
        "plugin-version",
        "ok",
        &[&format!("built for Slurm {series}")],
    );
    assert_eq!(host_view(), host_before, "the host's own paths changed");

    // Removing keeps the site's configuration; purging removes it.
    dpkg(&["-r", "ferry"]);
    assert!(!installed("/usr/bin/ferry").exists());
    assert!(conf.exists());
    dpkg(&["-P", "ferry"]);
    assert!(!conf.exists());
}

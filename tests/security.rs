//! Privilege boundaries, tried as the unprivileged test users: an image's setuid binaries
//! and device nodes give nothing, the container's processes hold no capability of the
//! host's user namespace and cannot gain one, another user cannot see into or join a
//! container, and paths a user cannot read stay unreadable through symlinks and `..`.
//!
//! Runs `ferry run` and, on the test cluster (`SLURM_CONF`), `srun --container`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tests::*;

/// A probe that prints its real and effective uid, then tries setuid(0).
const PROBE_C: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void)
{
    printf("uid=%d euid=%d\n", (int)getuid(), (int)geteuid());
    if (setuid(0) != 0)
        printf("setuid(0): %s\n", strerror(errno));
    else
        printf("setuid(0): ok\n");
    return 0;
}
"#;

/// The busybox image plus what a hostile image author would add: the probe installed
/// setuid root (`/suid-probe`, mode 4755, owner 0) and a device node (`/devnull`, the
/// character device 1:3, mode 0666). Built by root (the test harness), readable by all.
struct HostileImage {
    dir: tempfile::TempDir,
}

impl HostileImage {
    fn build() -> HostileImage {
        let dir = tempfile::Builder::new()
            .prefix("ferry-hostile-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = dir.path();
        std::fs::write(d.join("probe.c"), PROBE_C).unwrap();
        let cc = Command::new("cc")
            .args(["-static", "-O2", "-o"])
            .arg(d.join("probe"))
            .arg(d.join("probe.c"))
            .status_within(COMMAND_LIMIT);
        assert!(cc.success(), "cc -static failed (libc6-dev installed?)");
        let sqsh = d.join("hostile.sqsh");
        let out = Command::new("mksquashfs")
            .arg(image("busybox"))
            .arg(&sqsh)
            .args(["-noappend", "-quiet", "-no-progress", "-p"])
            .arg(format!(
                "/suid-probe f 4755 0 0 cat {}",
                d.join("probe").display()
            ))
            .args(["-p", "/devnull c 666 0 0 1 3"])
            .output_within(COMMAND_LIMIT);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(d)
            .status_within(COMMAND_LIMIT);
        HostileImage { dir }
    }

    fn path(&self) -> String {
        self.dir.path().join("hostile.sqsh").display().to_string()
    }
}

fn slurm_conf() -> String {
    std::env::var("SLURM_CONF").unwrap_or_else(|_| {
        panic!("SLURM_CONF is not set: run through integration/test, which starts the test cluster")
    })
}

#[test]
fn a_setuid_root_binary_in_the_image_gives_no_privilege() {
    let _m = shared_machine();
    let img = HostileImage::build();
    let uid = uid_of(USER);
    let expected = format!("uid={uid} euid={uid}\nsetuid(0): Invalid argument\n");
    let out = sh(&format!("$FERRY run {} /suid-probe", img.path()));
    assert_eq!(out.ok(), expected, "{}", out.stderr);
    // Through Slurm the same.
    let out = sh(&format!(
        "SLURM_CONF={} srun -n1 --container={} /suid-probe",
        slurm_conf(),
        img.path()
    ));
    assert_eq!(out.ok(), expected, "{}", out.stderr);
    // The mount is nosuid: the setuid bit is not even honoured for uid 0 of the
    // container's own namespace (with --remap-root, where uid 0 is the user).
    let out = sh(&format!(
        "$FERRY run --remap-root {} sh -c 'awk \"\\$5 == \\\"/\\\" {{ print \\$6 }}\" /proc/self/mountinfo'",
        img.path()
    ));
    let options = out.ok().trim().to_string();
    assert!(
        options.split(',').any(|o| o == "nosuid") && options.split(',').any(|o| o == "nodev"),
        "the root is mounted nosuid,nodev: {options} {}",
        out.stderr
    );
}

#[test]
fn device_nodes_in_the_image_or_made_inside_are_not_usable() {
    let _m = shared_machine();
    let img = HostileImage::build();
    let out = sh(&format!(
        "$FERRY run {} sh -c 'ls -l /devnull | cut -c1; cat /devnull; echo x > /devnull; echo done'",
        img.path()
    ));
    assert_eq!(out.stdout, "c\ndone\n", "{}", out.stderr);
    assert_eq!(
        out.stderr.matches("Permission denied").count(),
        2,
        "both opens of the image's device node are refused: {}",
        out.stderr
    );
    // Even as uid 0 of the container in a writable one, no device node can be made.
    let out = sh(&format!(
        "$FERRY run --remap-root --writable {} sh -c 'mknod /newdev c 1 3 || echo refused'",
        img.path()
    ));
    assert!(out.ok().contains("refused"), "{}", out.stdout);
    assert!(
        out.stderr.contains("Operation not permitted"),
        "{}",
        out.stderr
    );
}

/// Fields of /proc/PID/status.
fn status_field(pid: &str, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l[key.len()..].trim().to_string())
}

/// The test user's live processes whose command line matches one of `names`, as pids.
fn user_pids(names: &[&str]) -> Vec<(String, String)> {
    live_processes(USER)
        .into_iter()
        .filter_map(|line| {
            let (pid, cmd) = line.split_once(' ')?;
            names
                .iter()
                .any(|n| cmd.contains(n))
                .then(|| (pid.to_string(), cmd.to_string()))
        })
        .collect()
}

/// Start `script` (as the test user, in the background) and wait until a process of the
/// user whose command line contains `sleep 47` runs inside a container.
fn with_running_container(script: &str, check: impl FnOnce()) {
    let child = Command::new("runuser")
        .args([
            "-u",
            USER,
            "--",
            "env",
            "-i",
            "PATH=/usr/local/bin:/usr/bin:/bin",
        ])
        .arg(format!("HOME=/home/{USER}"))
        .arg(format!("SLURM_CONF={}", slurm_conf()))
        .arg(format!("FERRY={}", ferry_bin().display()))
        .arg(PINNED_ROOTFS)
        .args(["bash", "-c", script])
        .current_dir("/")
        .spawn()
        .unwrap();
    let start = Instant::now();
    while user_pids(&["sleep 47"]).iter().all(|(pid, _)| {
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
            == std::fs::read_link("/proc/self/ns/mnt").ok()
    }) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the container did not start: {:?}",
            live_processes(USER)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    check();
    for (pid, _) in user_pids(&["sleep 47"]) {
        let _ = Command::new("kill").arg(&pid).status_within(COMMAND_LIMIT);
    }
    wait_within(
        child,
        COMMAND_LIMIT,
        "the container step after its sleep was killed",
    );
}

fn assert_no_host_capability() {
    let host_userns = std::fs::read_link("/proc/self/ns/user").unwrap();
    let procs = user_pids(&["ferry", "squashfuse", "sleep 47"]);
    assert!(
        procs.iter().any(|(_, c)| c.contains("hold")),
        "the holder runs: {procs:?}"
    );
    assert!(
        procs.iter().any(|(_, c)| c.contains("squashfuse")),
        "squashfuse runs: {procs:?}"
    );
    for (pid, cmd) in &procs {
        let Some(cap_eff) = status_field(pid, "CapEff:") else {
            continue; // gone meanwhile
        };
        let userns = std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
        assert!(
            userns != host_userns || u64::from_str_radix(&cap_eff, 16) == Ok(0),
            "{pid} ({cmd}) holds capabilities {cap_eff} in the host's user namespace"
        );
        // The processes ferry starts (holder, squashfuse) and the tasks it puts in the
        // container cannot gain privileges by exec (srun itself is the user's own client).
        let in_container = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
            != std::fs::read_link("/proc/self/ns/mnt").ok();
        if cmd.contains("hold") || cmd.contains("squashfuse") || in_container {
            assert_eq!(
                status_field(pid, "NoNewPrivs:").as_deref(),
                Some("1"),
                "{pid} ({cmd}) may gain privileges"
            );
        }
    }
}

#[test]
fn container_processes_hold_no_host_capability_and_cannot_gain_one() {
    let _m = exclusive_machine();
    let busybox = image("busybox.sqsh").display().to_string();
    with_running_container(
        &format!("$FERRY run {busybox} sleep 47"),
        assert_no_host_capability,
    );
    with_running_container(
        &format!("srun -n1 --container={busybox} sleep 47"),
        assert_no_host_capability,
    );
    assert!(leftovers_after(USER, Duration::from_secs(5)).is_empty());
}

#[test]
fn another_user_cannot_see_into_or_join_a_container() {
    let _m = exclusive_machine();
    let busybox = image("busybox.sqsh").display().to_string();
    with_running_container(&format!("$FERRY run {busybox} sleep 47"), || {
        let holder = user_pids(&["ferry hold"]);
        let task = user_pids(&["sleep 47"]);
        assert!(!holder.is_empty() && !task.is_empty());
        for (pid, _) in holder.iter().chain(task.iter()) {
            let out = sh_as(
                OTHER_USER,
                &format!(
                    "nsenter -t {pid} -U -m true 2>&1 || echo refused; \
                     ls /proc/{pid}/root/ >/dev/null 2>&1 || echo no root; \
                     cat /proc/{pid}/environ >/dev/null 2>&1 || echo no environ"
                ),
            );
            assert!(
                out.stdout.contains("refused")
                    && out.stdout.contains("no root")
                    && out.stdout.contains("no environ"),
                "{OTHER_USER} reached into {pid}: {}",
                out.stdout
            );
        }
    });
}

#[test]
fn paths_the_user_cannot_read_stay_unreadable_through_symlinks_and_dotdot() {
    let _m = shared_machine();
    // The other user's private directory with an image and a data directory in it.
    let secret = UserDir::new(OTHER_USER);
    let s = secret.path.display().to_string();
    std::fs::copy(image("busybox.sqsh"), secret.path.join("img.sqsh")).unwrap();
    std::fs::create_dir(secret.path.join("data")).unwrap();
    Command::new("chown")
        .args(["-R", &format!("{OTHER_USER}:")])
        .arg(&secret.path)
        .status_within(COMMAND_LIMIT);
    Command::new("chmod")
        .arg("0700")
        .arg(&secret.path)
        .status_within(COMMAND_LIMIT);
    // The test user's own links pointing there, and a `..` path through its own directory.
    let mine = UserDir::new(USER);
    let m = mine.path.display().to_string();
    let link = |name: &str, target: &str| {
        let out = sh(&format!("ln -s {target} {m}/{name}"));
        out.ok();
    };
    link("img-link.sqsh", &format!("{s}/img.sqsh"));
    link("data-link", &format!("{s}/data"));
    sh(&format!("mkdir {m}/sub")).ok();
    let dotdot = format!("{m}/sub/../img-link.sqsh");
    let busybox = image("busybox.sqsh").display().to_string();
    for (script, expected) in [
        (
            format!("$FERRY run {m}/img-link.sqsh true"),
            "image not readable by user ferrytest",
        ),
        (
            format!("$FERRY run {dotdot} true"),
            "image not readable by user ferrytest",
        ),
        (
            format!("$FERRY run -m {m}/data-link:/data {busybox} true"),
            "mount source not readable by user ferrytest",
        ),
        (
            format!("$FERRY run -m {m}/sub/../data-link:/data {busybox} true"),
            "mount source not readable by user ferrytest",
        ),
    ] {
        let out = sh(&script);
        assert_eq!(out.code, 125, "`{script}`: {}", out.stderr);
        assert!(out.stderr.contains(expected), "`{script}`: {}", out.stderr);
    }
    // A save target in the other user's directory, named through a link of the user's.
    let out = sh(&format!(
        "$FERRY run --keep {m}/keep {busybox} true && $FERRY save {m}/keep/rootfs {m}/data-link/stolen.sqsh"
    ));
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(
        !Path::new(&format!("{s}/data/stolen.sqsh")).exists(),
        "nothing was written into the other user's directory"
    );
}

/// A shared library that, when loaded into any process, appends that process's ids and
/// program to a log everyone may write; and programs named like ferry's that leave a mark.
const EVIL_LIB_C: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void record(void)
{
    char exe[512] = "?", line[700];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0)
        exe[n] = 0;
    int fd = open(LOG, O_WRONLY | O_APPEND | O_CREAT, 0666);
    if (fd >= 0) {
        snprintf(line, sizeof line, "uid=%d euid=%d exe=%s\n", (int)getuid(), (int)geteuid(), exe);
        (void)!write(fd, line, strlen(line));
        close(fd);
    }
}
"#;

#[test]
fn the_jobs_environment_cannot_change_what_slurmstepd_runs() {
    let _m = exclusive_machine();
    let evil = tempfile::Builder::new()
        .prefix("ferry-evil-")
        .tempdir_in("/tmp")
        .unwrap();
    let e = evil.path().display().to_string();
    let log = format!("{e}/loaded.log");
    std::fs::write(evil.path().join("evil.c"), EVIL_LIB_C).unwrap();
    let cc = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2"])
        .arg(format!("-DLOG=\"{log}\""))
        .arg("-o")
        .arg(evil.path().join("evil.so"))
        .arg(evil.path().join("evil.c"))
        .status_within(COMMAND_LIMIT);
    assert!(cc.success());
    for name in [
        "ferry",
        "squashfuse_ll",
        "squashfuse",
        "mksquashfs",
        "ldconfig",
    ] {
        let p = evil.path().join(name);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho ran > {e}/ran-{name}\nexit 1\n"),
        )
        .unwrap();
    }
    Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(evil.path())
        .status_within(COMMAND_LIMIT);
    let busybox = image("busybox.sqsh").display().to_string();
    // Everything a job's environment could try: a preload, a PATH whose first entry
    // shadows ferry's helpers, ferry's own variables, the loader's search path.
    let env = format!(
        "LD_PRELOAD={e}/evil.so PATH={e}:/usr/local/bin:/usr/bin:/bin FERRY_BIN={e}/ferry \
         FERRY_SQUASHFUSE={e}/squashfuse_ll LD_LIBRARY_PATH={e} RUST_LOG=trace FERRY_LOG=trace"
    );
    let out = sh(&format!(
        "export SLURM_CONF={}; {env} srun -n1 --container={busybox} cat /etc/ferry-marker; \
         env {env} srun -n1 --export=ALL --container={busybox} sleep 47 & \
         holders() {{ for p in $(pgrep -u $USER -x ferry); do grep -qa hold /proc/$p/cmdline && echo $p; done; }}; \
         for i in $(seq 300); do [ -n \"$(holders)\" ] && pgrep -u $USER -x sleep >/dev/null && break; sleep 0.05; done; \
         for p in $(holders); do readlink /proc/$p/exe; done; \
         pkill -u $USER -x sleep; wait",
        slurm_conf()
    ));
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"busybox-image"), "{}", out.stderr);
    assert!(
        lines[1..]
            .iter()
            .all(|l| *l == ferry_bin().display().to_string()),
        "the holder is the site's ferry: {lines:?}"
    );
    assert!(lines.len() >= 2, "a holder was seen: {lines:?}");
    for name in [
        "ferry",
        "squashfuse_ll",
        "squashfuse",
        "mksquashfs",
        "ldconfig",
    ] {
        assert!(
            !evil.path().join(format!("ran-{name}")).exists(),
            "the job's PATH made something run the fake {name}"
        );
    }
    // The preload reached only the user's own processes, never one running as root.
    let loaded = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !loaded
            .lines()
            .any(|l| l.starts_with("uid=0") || l.contains("euid=0 ")),
        "a root process loaded the job's LD_PRELOAD:\n{loaded}"
    );
    let left = leftovers_after(USER, Duration::from_secs(5));
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A symlink of the test user's that a process of the user's own flips, as fast as it
/// can, between two targets (atomically: a fresh link renamed over the old one). Stopped
/// when dropped; it also gives up by itself after five minutes.
struct FlippingLink {
    flipper: std::process::Child,
}

const FLIPPER_PY: &str = r#"
import os, sys, time
link, targets = sys.argv[1], sys.argv[2:]
spare = link + ".next"
end = time.time() + 300
while time.time() < end:
    for target in targets:
        try:
            os.unlink(spare)
        except FileNotFoundError:
            pass
        os.symlink(target, spare)
        os.rename(spare, link)
"#;

impl FlippingLink {
    fn start(link: &str, a: &str, b: &str) -> FlippingLink {
        let uid = uid_of(USER).to_string();
        // setpriv and env exec python, so the child's pid is the flipper's.
        let flipper = Command::new("setpriv")
            .args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
            .args([
                "env",
                "-i",
                "/usr/bin/python3",
                "-c",
                FLIPPER_PY,
                link,
                a,
                b,
            ])
            .current_dir("/")
            .spawn()
            .expect("setpriv runs");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::symlink_metadata(link).is_err() {
            assert!(Instant::now() < deadline, "the flipper never made {link}");
            std::thread::sleep(Duration::from_millis(10));
        }
        FlippingLink { flipper }
    }
}

impl Drop for FlippingLink {
    fn drop(&mut self) {
        let _ = self.flipper.kill();
        let _ = self.flipper.wait();
    }
}

/// What one run through a flipping path showed: the user's own data, a refusal, or
/// (the failure this test looks for) the other side's data.
#[derive(Debug, Default)]
struct RaceOutcomes {
    own: u32,
    /// Refused when ferry checked the path.
    refused: u32,
    /// Passed the check, then caught as replaced when used.
    caught: u32,
}

/// A swap between ferry's check and its use of a path, as ferry words it.
const CAUGHT: &str = "changed while the container was being set up";

/// One side of a flipping link: where it points and what a run through it prints.
struct Side<'a> {
    target: &'a str,
    prints: &'a str,
}

/// Runs `script`, which names `link`, `runs` times while the link flips between `own` and
/// `secret`: no run may print the secret side. Each side is first run through a link that
/// stays put (the own one must work, the secret one must be refused), so the outcomes the
/// race can have are each shown once whatever the race's timing; the race's own mix of
/// outcomes depends on the machine's load and is only reported.
fn race(what: &str, runs: u32, script: &str, link: &str, own: Side, secret: Side, refusal: &str) {
    for (suffix, side) in [("own", &own), ("secret", &secret)] {
        let (dir, name) = link.rsplit_once('/').unwrap();
        let fixed = format!("{dir}/fixed-{suffix}-{name}");
        sh(&format!("ln -sfn {} {fixed}", side.target)).ok();
        let out = sh(&script.replace(link, &fixed));
        match suffix {
            "own" => assert_eq!(out.ok().trim(), own.prints, "{what} through a fixed link"),
            _ => assert!(
                out.code != 0
                    && out.stderr.contains(refusal)
                    && !format!("{}{}", out.stdout, out.stderr).contains(secret.prints),
                "{what} through a fixed link to the other side: exit {}, {}{}",
                out.code,
                out.stdout,
                out.stderr
            ),
        }
        sh(&format!("rm -f {fixed}")).ok();
    }
    let mut seen = RaceOutcomes::default();
    for _ in 0..runs {
        let out = sh(script);
        let text = format!("{}{}", out.stdout, out.stderr);
        assert!(
            !text.contains(secret.prints),
            "{what}: a run reached the other side of the link: {text}"
        );
        if out.code == 0 && out.stdout.trim() == own.prints {
            seen.own += 1;
        } else if out.code != 0 && out.stderr.contains(refusal) {
            seen.refused += 1;
        } else if out.code != 0 && out.stderr.contains(CAUGHT) {
            seen.caught += 1;
        } else {
            panic!(
                "{what}: neither the user's own data nor the refusal: exit {}, {text}",
                out.code
            );
        }
    }
    eprintln!("{what}: {seen:?}");
}

#[test]
fn a_path_swapped_for_a_symlink_between_check_and_use_never_reaches_the_target() {
    // Counts every process of the test user at the end, and switches on the kernel
    // provider in plugstack.conf.
    let _m = exclusive_machine();
    let conf = slurm_conf();
    // Root's private directory: an image (busybox, whose marker is "busybox-image") and a
    // data file. slurmstepd runs as root; the kernel provider opens the image in there.
    let secret = tempfile::Builder::new()
        .prefix("ferry-secret-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let s = secret.path().display().to_string();
    std::fs::copy(image("busybox.sqsh"), secret.path().join("img.sqsh")).unwrap();
    std::fs::create_dir(secret.path().join("data")).unwrap();
    std::fs::write(secret.path().join("data/file"), "SECRET\n").unwrap();
    Command::new("chmod")
        .arg("0700")
        .arg(&s)
        .status_within(COMMAND_LIMIT);
    // The user's own image (the debian one, "debian-image") and data ("own").
    let mine = UserDir::new(USER);
    let m = mine.path.display().to_string();
    sh(&format!("mkdir {m}/own && echo own > {m}/own/file")).ok();
    let debian = image("debian.sqsh").display().to_string();
    let busybox = image("busybox.sqsh").display().to_string();
    let img_link = format!("{m}/img.sqsh");
    let src_link = format!("{m}/src");
    let img_flip = FlippingLink::start(&img_link, &debian, &format!("{s}/img.sqsh"));
    let src_flip = FlippingLink::start(&src_link, &format!("{m}/own"), &format!("{s}/data"));

    let marker = "cat /etc/ferry-marker";
    let image_refused = "image not readable by user ferrytest";
    let source_refused = "mount source not readable by user ferrytest";
    let own_image = || Side {
        target: &debian,
        prints: "debian-image",
    };
    let secret_image_path = format!("{s}/img.sqsh");
    let secret_image = || Side {
        target: &secret_image_path,
        prints: "busybox-image",
    };
    let own_data_path = format!("{m}/own");
    let own_data = || Side {
        target: &own_data_path,
        prints: "own",
    };
    let secret_data_path = format!("{s}/data");
    let secret_data = || Side {
        target: &secret_data_path,
        prints: "SECRET",
    };
    race(
        "ferry run IMAGE",
        40,
        &format!("$FERRY run {img_link} {marker}"),
        &img_link,
        own_image(),
        secret_image(),
        image_refused,
    );
    race(
        "ferry run -m SRC",
        40,
        &format!("$FERRY run -m {src_link}:/data {busybox} cat /data/file"),
        &src_link,
        own_data(),
        secret_data(),
        source_refused,
    );
    let srun = format!("export SLURM_CONF={conf}; srun -n1");
    race(
        "srun --container=IMAGE",
        30,
        &format!("{srun} --container={img_link} {marker}"),
        &img_link,
        own_image(),
        secret_image(),
        image_refused,
    );
    race(
        "srun --container-mounts=SRC",
        30,
        &format!("{srun} --container={busybox} --container-mounts={src_link}:/data cat /data/file"),
        &src_link,
        own_data(),
        secret_data(),
        source_refused,
    );
    // The kernel provider: slurmstepd, as root, opens the image and sets up a loop device.
    let plugstack = Plugstack::open(&conf);
    plugstack.set_args("kernel_squashfs=yes");
    race(
        "srun --container-rootfs=kernel --container=IMAGE",
        30,
        &format!(
            "{srun} --container-rootfs=kernel --no-container-mount-home --container={img_link} {marker}"
        ),
        &img_link,
        own_image(),
        secret_image(),
        image_refused,
    );
    drop(plugstack);
    drop(img_flip);
    drop(src_flip);
    let left = leftovers_after(USER, Duration::from_secs(5));
    assert!(left.is_empty(), "left behind: {left:?}");
}

// ---- what the plugin does as root (issue 17) ----------------------------------------------
//
// Each test plays a hostile test user against what slurmstepd or the job epilog do as
// root: through the live cluster where the user can reach it, or by calling, as root, the
// launcher functions the plugin calls, where the timing has to be forced.

/// A sysctl set for the test's duration, restored when dropped. Take exclusive_machine().
struct Sysctl {
    path: String,
    old: String,
}

impl Sysctl {
    fn set(name: &str, value: &str) -> Sysctl {
        let path = format!("/proc/sys/{}", name.replace('.', "/"));
        let old = std::fs::read_to_string(&path).unwrap().trim().to_string();
        std::fs::write(&path, value).unwrap();
        Sysctl { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.old);
    }
}

fn credentials(user: &str) -> ferry::sys::raw::Credentials {
    let uid = uid_of(user);
    ferry::sys::raw::Credentials {
        uid,
        gid: uid,
        groups: vec![],
    }
}

/// A holder for the busybox image started as root for `user`, as user_init starts it.
fn holder_as(user: &str) -> ferry::container::holder::Holder {
    let c = credentials(user);
    let info = ferry::spec::user::UserInfo::lookup(c.uid, c.gid, &[]).unwrap();
    let mut spec = ferry::spec::ContainerSpec::new(image("busybox.sqsh"), info);
    spec.mount_home = false;
    let opts = ferry::container::holder::PrepareOptions {
        holder_program: ferry_bin(),
        run_as: Some(c),
        die_with_parent: false,
        timeout: Duration::from_secs(60),
        env: None,
        quiet: true,
    };
    ferry::container::holder::prepare(&spec, &opts).expect("the holder starts")
}

fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Run as root: start `sleep` as uid ARGV[2] at exactly pid ARGV[1] (through
/// kernel.ns_last_pid, retried while other processes of the machine take the pid first),
/// print the pid, and on end of stdin kill it.
const PLACE_AT_PID_PY: &str = r#"
import os, sys
target, uid = int(sys.argv[1]), int(sys.argv[2])
for _ in range(2000):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(target - 1))
    pid = os.fork()
    if pid == 0:
        if os.getpid() != target:
            os._exit(0)
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
        os.execv("/bin/sleep", ["sleep", "120"])
    if pid == target:
        print(pid, flush=True)
        sys.stdin.read()
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        sys.exit(0)
    os.waitpid(pid, 0)
print("missed", flush=True)
"#;

/// Point 1. The user holds the holder's report pipe open (so its end of file never comes),
/// kills the holder, and slurmstepd (here: this process) reaps it; a process of another
/// user then gets the holder's pid. Stopping the holder must not signal that process.
#[test]
fn a_holder_whose_pid_went_to_another_process_is_never_signalled() {
    // Sets kernel.ns_last_pid to place the victim at the freed pid.
    let _m = exclusive_machine();
    let holder = holder_as(USER);
    let pid = holder.pid();
    // The pipe is opened by root and handed to the user's process: a holder started by
    // root is not dumpable, so its user reaches /proc/PID/fd only in some ways (from the
    // step's tasks); how is not what this test is about.
    let mut keeper = Command::new("/bin/sh")
        .args([
            "-c",
            &format!(
                "exec 9>/proc/{pid}/fd/1; exec setpriv --reuid {u} --regid {u} --clear-groups \
                 /bin/sh -c 'kill -9 {pid}; exec sleep 120'",
                u = uid_of(USER)
            ),
        ])
        .spawn()
        .unwrap();
    // slurmstepd's wait3(-1), for the holder.
    nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
    let mut placer = Command::new("/usr/bin/python3")
        .args(["-c", PLACE_AT_PID_PY, &pid.to_string()])
        .arg(uid_of(OTHER_USER).to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(placer.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let placed = line.trim() == pid.to_string();
    let ended = placed.then(|| holder.stop(Duration::from_secs(2)));
    let alive = is_running(pid as u32);
    drop(placer.stdin.take());
    let _ = placer.wait();
    let _ = keeper.kill();
    let _ = keeper.wait();
    assert!(placed, "no process could be placed at pid {pid}: {line}");
    assert!(
        alive,
        "stopping the dead holder killed the process at its pid"
    );
    assert_eq!(
        ended.unwrap().early,
        Some(ferry::container::holder::EarlyEnd::Killed)
    );
}

/// A user directory `ferry-UID` in a sticky `named_dir` that its owner exchanges, as fast
/// as it can, with a symlink to a directory of root's (`renameat2(RENAME_EXCHANGE)`),
/// refilling its own `jobN` meanwhile.
const EXCHANGER_PY: &str = r#"
import ctypes, os, sys, time
named, own, decoy, job = sys.argv[1:5]
libc = ctypes.CDLL(None, use_errno=True)
os.mkdir(os.path.join(named, own), 0o700)
fd = os.open(os.path.join(named, own), os.O_RDONLY | os.O_DIRECTORY)
# A kept container's state, say: the epilog leaves a directory that is not empty.
os.close(os.open("keep", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
a, b = os.path.join(named, own).encode(), os.path.join(named, "decoy").encode()
os.symlink(decoy, b)
end = time.time() + 120
while time.time() < end:
    try:
        os.mkdir(job, 0o700, dir_fd=fd)
    except FileExistsError:
        pass
    libc.renameat2(-100, a, -100, b, 2)
"#;

/// Point 2. The epilog removes `named_dir/ferry-UID/jobN` as root while the user swaps
/// `ferry-UID` for a symlink to root's directory: only the user's own `jobN` ever goes.
#[test]
fn the_epilog_never_removes_through_a_swapped_user_directory() {
    let _m = exclusive_machine();
    let _symlinks = Sysctl::set("fs.protected_symlinks", "0");
    let base = tempfile::Builder::new()
        .prefix("ferry-epilog-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let named = base.path().join("named");
    let victim = base.path().join("victim");
    std::fs::create_dir(&named).unwrap();
    Command::new("chmod")
        .arg("1777")
        .arg(&named)
        .status()
        .unwrap();
    Command::new("chmod")
        .arg("0755")
        .arg(base.path())
        .status()
        .unwrap();
    std::fs::create_dir_all(victim.join("job4242")).unwrap();
    std::fs::write(victim.join("job4242/precious"), "root's\n").unwrap();
    let uid = uid_of(USER);
    let own = ferry::rootfs::user_dir::name(uid);
    let mut exchanger = Command::new("setpriv")
        .args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            &uid.to_string(),
            "--clear-groups",
        ])
        .args(["/usr/bin/python3", "-c", EXCHANGER_PY])
        .arg(&named)
        .arg(&own)
        .arg(&victim)
        .arg("job4242")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::symlink_metadata(named.join(&own).join("job4242")).is_err()
        || std::fs::symlink_metadata(named.join("decoy")).is_err()
    {
        assert!(Instant::now() < deadline, "the exchanger never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let _ = ferry::rootfs::user_dir::remove_job(&named, uid, 4242);
        assert!(
            victim.join("job4242/precious").exists(),
            "the epilog removed root's directory through the swapped name"
        );
    }
    assert!(
        exchanger.try_wait().unwrap().is_none(),
        "the exchanger stopped before the epilog did"
    );
    let _ = exchanger.kill();
    let _ = exchanger.wait();
    // Still the user's own jobN that goes, once the name stays put.
    let own_path = named.join(&own);
    if std::fs::symlink_metadata(&own_path)
        .unwrap()
        .file_type()
        .is_symlink()
    {
        std::fs::remove_file(&own_path).unwrap();
        std::fs::rename(named.join("decoy"), &own_path).unwrap();
    }
    let _ = std::fs::create_dir(own_path.join("job4242"));
    assert!(matches!(
        ferry::rootfs::user_dir::remove_job(&named, uid, 4242),
        Ok(true)
    ));
    assert!(!own_path.join("job4242").exists());
    assert!(
        own_path.join("keep").exists(),
        "the epilog removed a directory that was not empty"
    );
    assert!(victim.join("job4242/precious").exists());
}

/// Point 3. Another user creates `named_dir/ferry-UID` (or a symlink there) before the
/// user's first step on the node: the step still gets a directory of its own, made by root,
/// and the squatter's entry is moved aside, untouched.
#[test]
fn another_user_cannot_squat_the_users_named_dir() {
    let _m = exclusive_machine();
    let conf = slurm_conf();
    let named = tempfile::Builder::new()
        .prefix("ferry-named-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let n = named.path().display().to_string();
    Command::new("chmod").arg("1777").arg(&n).status().unwrap();
    let plugstack = Plugstack::open(&conf);
    plugstack.add_args(&format!("named_dir={n}"));
    let uid = uid_of(USER);
    let busybox = image("busybox.sqsh").display().to_string();
    for squat in [
        format!("mkdir -m 700 {n}/ferry-{uid} && echo mine > {n}/ferry-{uid}/f"),
        format!("ln -s /var/tmp {n}/ferry-{uid}"),
    ] {
        sh_as(OTHER_USER, &squat).ok();
        let out = sh(&format!(
            "export SLURM_CONF={conf}; srun -n1 --container-name=sq --container={busybox} \
             sh -c 'echo kept > /kept; cat /etc/ferry-marker'"
        ));
        assert_eq!(out.ok(), "busybox-image\n", "{}", out.stderr);
        let meta = std::fs::symlink_metadata(named.path().join(format!("ferry-{uid}"))).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(meta.is_dir() && meta.uid() == uid, "{meta:?}");
        let aside: Vec<String> = dir_entries(&n)
            .into_iter()
            .filter(|e| e.starts_with(&format!(".ferry-{uid}.taken-by-{}", uid_of(OTHER_USER))))
            .collect();
        assert_eq!(aside.len(), 1, "{:?}", dir_entries(&n));
        let moved = named.path().join(&aside[0]);
        if std::fs::symlink_metadata(&moved).unwrap().is_dir() {
            assert_eq!(std::fs::read_to_string(moved.join("f")).unwrap(), "mine\n");
        }
        sh_as(OTHER_USER, &format!("rm -rf {}", moved.display())).ok();
        // The job's epilog may already have removed it, once empty.
        match std::fs::remove_dir_all(named.path().join(format!("ferry-{uid}"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{e}"),
            _ => {}
        }
    }
}

/// Point 4. A cache others can write is refused; a site cache that one account fills and
/// users only read works, and an entry in it that belongs to neither the caller, root nor
/// the cache's owner (planted while it was writable) is ignored and reported.
#[test]
fn a_cache_others_can_write_is_refused_and_foreign_entries_are_ignored() {
    let _m = shared_machine();
    let registry = std::env::var("FERRY_TEST_REGISTRY")
        .ok()
        .filter(|r| !r.is_empty())
        .expect("FERRY_TEST_REGISTRY is not set: integration/test starts the test registry");
    let base = tempfile::Builder::new()
        .prefix("ferry-sitecache-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let cache = base.path().join("cache");
    let c = cache.display().to_string();
    Command::new("chmod")
        .arg("0755")
        .arg(base.path())
        .status()
        .unwrap();
    std::fs::create_dir(&cache).unwrap();
    Command::new("chown")
        .arg(format!("{OTHER_USER}:"))
        .arg(&cache)
        .status()
        .unwrap();
    let env = format!("FERRY_INSECURE_REGISTRIES={registry}");
    let reference = format!("docker://{registry}/ferry/busybox:latest");
    // The site's account (here ferrytest2) fills the cache; users only read it.
    sh_as(
        OTHER_USER,
        &format!("{env} $FERRY import --cache {c} {reference} && chmod -R go-w {c}"),
    )
    .ok();
    let run = format!("{env} $FERRY run --cache {c} {reference} cat /etc/ferry-marker");
    assert_eq!(sh(&run).ok(), "busybox-image\n");
    // Writable by others (as a 1777 "shared cache" would be): refused in one line.
    Command::new("chmod").arg("1777").arg(&c).status().unwrap();
    let out = sh(&run);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("can be written by others (mode 1777)"),
        "{}",
        out.stderr
    );
    Command::new("chmod").arg("0755").arg(&c).status().unwrap();
    // An image planted by a third uid under the digest's name: ignored and reported,
    // never run.
    let sqsh: Vec<_> = std::fs::read_dir(cache.join("images"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sqsh"))
        .collect();
    assert_eq!(sqsh.len(), 1, "{sqsh:?}");
    std::fs::copy(image("debian.sqsh"), &sqsh[0]).unwrap();
    Command::new("chown")
        .arg("3002:3002")
        .arg(&sqsh[0])
        .status()
        .unwrap();
    let out = sh(&run);
    assert!(
        !out.stdout.contains("debian-image"),
        "the planted image ran"
    );
    assert!(
        out.stderr.contains("ignoring") && out.stderr.contains("belongs to uid 3002"),
        "{}",
        out.stderr
    );
}

/// Point 5, the holder's end: the user floods the holder's stdout through
/// /proc/PID/fd/1 and keeps it open. Stopping the holder reads a bounded amount, kills
/// the holder, and the writer gets EPIPE once the pipe is closed.
#[test]
fn a_flooded_holder_pipe_is_read_only_up_to_a_cap() {
    let _m = shared_machine();
    let holder = holder_as(USER);
    let pid = holder.pid();
    // Opened by root and handed to the user's writer (see the test above).
    let mut writer = Command::new("/bin/sh")
        .args([
            "-c",
            &format!(
                "exec >/proc/{pid}/fd/1; exec setpriv --reuid {u} --regid {u} --clear-groups \
                 cat /dev/zero",
                u = uid_of(USER)
            ),
        ])
        .spawn()
        .unwrap();
    // Flooding: cat has the pipe as its stdout.
    let comm = format!("/proc/{}/comm", writer.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&comm).unwrap_or_default().trim() != "cat" {
        assert!(Instant::now() < deadline, "the writer never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ended = holder.stop(Duration::from_secs(2));
        let _ = done.send(ended.early);
    });
    let early = finished
        .recv_timeout(Duration::from_secs(120))
        .expect("stopping the holder never returned");
    assert_eq!(early, None, "the flood is no message of the holder's");
    assert!(!is_running(pid as u32), "the holder is gone");
    let status = writer.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGPIPE as i32),
        "{status:?}"
    );
}

/// Point 5, the helpers: output of `ferry import`/`ferry save` (or anything the user writes
/// into their pipes) past the cap kills the helper, and the caller goes on.
#[test]
fn a_helper_flooding_its_output_is_stopped_at_the_cap() {
    let _m = shared_machine();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "cat /dev/zero & cat /dev/zero >&2"]);
    ferry::sys::raw::run_as_on_exec(&mut cmd, Some(credentials(USER)), false);
    let end = ferry::sys::child::run_capped(
        &mut cmd,
        std::process::Stdio::null(),
        1 << 20,
        Duration::from_secs(60),
        Duration::ZERO,
        || None,
        |_| {},
    )
    .unwrap();
    assert!(
        matches!(end, ferry::sys::child::HelperEnd::TooMuchOutput { cap } if cap == 1 << 20),
        "{end:?}"
    );
    let left = leftovers_after(USER, Duration::from_secs(5));
    assert!(
        !left.iter().any(|p| p.contains("cat /dev/zero")),
        "{left:?}"
    );
}

/// Point 5, the image: a FIFO given as the image with the kernel provider (slurmstepd
/// opens it) fails the step in one line instead of blocking user_init; point 6: the
/// kernel provider's look into the image (ferry probe-image) runs as the user, so a
/// corrupt SIF is refused in the user's process with one line.
#[test]
fn a_fifo_or_corrupt_image_with_the_kernel_provider_fails_in_one_line() {
    let _m = exclusive_machine();
    let conf = slurm_conf();
    let dir = UserDir::new(USER);
    let d = dir.path.display().to_string();
    sh(&format!(
        "mkfifo {d}/fifo.sqsh && {{ printf '%-32s' '#!/usr/bin/env run-singularity'; \
         printf SIF_MAGIC; head -c 4096 /dev/zero; }} > {d}/bad.sif"
    ))
    .ok();
    let plugstack = Plugstack::open(&conf);
    plugstack.set_args("kernel_squashfs=yes");
    for (img, says) in [
        ("fifo.sqsh", "neither a regular file nor a directory"),
        ("bad.sif", "bad.sif"),
    ] {
        let out = sh(&format!(
            "export SLURM_CONF={conf}; timeout 120 srun -n1 --container-rootfs=kernel \
             --no-container-mount-home --container={d}/{img} true"
        ));
        assert_eq!(out.code, 125, "{img}: {}", out.stderr);
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("ferry: "))
            .collect();
        assert_eq!(lines.len(), 1, "{img}: {}", out.stderr);
        assert!(lines[0].contains(says), "{img}: {}", lines[0]);
    }
    drop(plugstack);
    let left = leftovers_after(USER, Duration::from_secs(5));
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A step finds a running container to attach to through a record in the user's own
/// directory, which the user can write: a forged record that names another user's running
/// container (its holder's real pid and start time) must not let the user's step in.
#[test]
fn a_forged_running_record_does_not_attach_to_another_users_container() {
    let _m = shared_machine();
    let conf = slurm_conf();
    let busybox = image("busybox.sqsh").display().to_string();
    let sync = UserDir::new(OTHER_USER);
    let s = sync.path.display().to_string();
    let done = format!("{s}/done");
    // The other user's step: a named container that runs until told to stop.
    let victim = {
        let (conf, busybox, s) = (conf.clone(), busybox.clone(), s.clone());
        std::thread::spawn(move || {
            sh_as(
                OTHER_USER,
                &format!(
                    "export SLURM_CONF={conf}; srun -n1 --container={busybox} --container-name=victim \
                     --container-mounts={s}:/sync sh -c 'echo theirs > /etc/victim-mark; touch /sync/ready; \
                     i=0; while [ ! -e /sync/done ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done'"
                ),
            )
        })
    };
    let started = Instant::now();
    while !Path::new(&format!("{s}/ready")).exists() && started.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let holder = Command::new("pgrep")
        .args(["-u", &uid_of(OTHER_USER).to_string(), "-f", "ferry hold"])
        .output_within(COMMAND_LIMIT);
    let pid: i32 = String::from_utf8_lossy(&holder.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("the other user's holder runs");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let start_time = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(19)
        .unwrap()
        .to_string();
    let host = nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let uid = uid_of(USER);
    // In the test user's own job: a record naming the other user's holder, as if its own.
    let forge = format!(
        "{{\"host\":\"{host}\",\"name\":\"victim\",\"job\":$SLURM_JOB_ID,\"step\":\"0\",\"uid\":{uid},\
         \"pid\":{pid},\"start_time\":{start_time},\"ready\":{{\"pid\":{pid},\"env\":[],\"workdir\":\"/\"}}}}"
    );
    let out = sh(&format!(
        "export SLURM_CONF={conf}; salloc -Q bash -c '\
         srun -n1 --container={busybox} true; \
         d=/tmp/ferry-{uid}/job$SLURM_JOB_ID/.running; mkdir -p $d; \
         echo \"{forge_escaped}\" > $d/victim@{pid}; \
         srun -n1 --container-name=victim:exec cat /etc/victim-mark; echo \"exec: $?\"; \
         srun -n1 --container-image={busybox} --container-name=victim cat /etc/victim-mark; echo \"auto: $?\"'",
        forge_escaped = forge.replace('"', "\\\"")
    ));
    std::fs::write(&done, "").unwrap();
    let theirs = victim.join().unwrap();
    assert_eq!(theirs.code, 0, "{}", theirs.stderr);
    assert_eq!(
        out.ok(),
        "exec: 125\nauto: 1\n",
        "the forged record must not let the step in: {}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("--container-name=victim:exec: no step of this job runs"),
        "{}",
        out.stderr
    );
}

//! Faults, as the unprivileged test user: an import killed at random points, a cache on a
//! full file system, the holder or squashfuse killed while a step runs.

use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tests::*;

/// The cache's image entries: (complete pairs, `.sqsh` without `.json`, `.json` without
/// `.sqsh`).
fn cache_entries(cache: &str) -> (usize, usize, usize) {
    let names = dir_entries(&format!("{cache}/images"));
    let stem = |n: &str, ext: &str| n.strip_suffix(ext).map(str::to_string);
    let sqsh: Vec<String> = names.iter().filter_map(|n| stem(n, ".sqsh")).collect();
    let json: Vec<String> = names.iter().filter_map(|n| stem(n, ".json")).collect();
    let pairs = sqsh.iter().filter(|s| json.contains(s)).count();
    (pairs, sqsh.len() - pairs, json.len() - pairs)
}

#[test]
fn an_import_killed_at_random_points_leaves_no_partial_entry() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display().to_string();
    sh(&format!("cd {d} && {MAKE_LAYERED_LAYOUT}")).ok();
    let cache = format!("{d}/cache");
    let import = format!("$FERRY import --cache {cache} oci:{d}/layout:v1");
    // How long a whole import takes here, to spread the kills over it.
    let started = Instant::now();
    sh(&import).ok();
    let whole = started.elapsed().as_millis().max(20) as u64;
    let mut killed_midway = 0;
    for trial in 0..24u64 {
        sh(&format!("$FERRY gc --cache {cache} --max-size 0")).ok();
        assert_eq!(cache_entries(&cache).0, 0, "gc emptied the cache");
        // A spread of points from the start to past the end, the same in every run.
        let delay_ms = (trial * 7919 % 24) * whole / 26;
        let out = sh(&format!(
            "{import} >/dev/null 2>&1 & pid=$!; sleep {}; kill -9 $pid 2>/dev/null && echo killed; wait $pid; true",
            delay_ms as f64 / 1000.0
        ));
        if out.stdout.contains("killed") {
            killed_midway += 1;
        }
        // Whatever was left: never a half entry, and the next import works.
        let (_, orphan_sqsh, orphan_json) = cache_entries(&cache);
        assert_eq!(orphan_json, 0, "trial {trial}: an entry without its image");
        let out = sh(&format!(
            "img=$({import}) && $FERRY run $img sh -c 'cat /data/a; echo; ls /data | wc -l'"
        ));
        assert_eq!(out.ok(), "a2\n6\n", "trial {trial}: {}", out.stderr);
        let (pairs, orphan_sqsh_after, _) = cache_entries(&cache);
        assert_eq!(pairs, 1, "trial {trial}: one complete entry");
        assert!(orphan_sqsh_after <= orphan_sqsh, "trial {trial}");
    }
    assert!(
        killed_midway >= 20,
        "only {killed_midway} imports were killed while running"
    );
    // Leftovers of killed imports go with gc; what stays is complete.
    sh(&format!("$FERRY gc --cache {cache}")).ok();
    let (pairs, orphan_sqsh, orphan_json) = cache_entries(&cache);
    assert_eq!((pairs, orphan_sqsh, orphan_json), (1, 0, 0));
}

#[test]
fn a_full_cache_file_system_is_one_line_and_leaves_no_partial_file() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display().to_string();
    sh(&format!("cd {d} && {MAKE_LAYERED_LAYOUT}")).ok();
    let small = format!("{d}/small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", &small])
        .status()
        .unwrap();
    assert!(mounted.success());
    Command::new("chown")
        .arg(format!("{USER}:"))
        .arg(&small)
        .status()
        .unwrap();
    let out = sh(&format!(
        "$FERRY import --cache {small}/cache oci:{d}/layout:v1"
    ));
    let used = String::from_utf8_lossy(
        &Command::new("du")
            .args(["-sk", &small])
            .output()
            .unwrap()
            .stdout,
    )
    .split_whitespace()
    .next()
    .unwrap_or("0")
    .parse::<u64>()
    .unwrap_or(999);
    let files = String::from_utf8_lossy(
        &Command::new("find")
            .args([&small, "-type", "f", "-size", "+0"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    let _ = Command::new("umount").arg(&small).status();
    assert_ne!(out.code, 0);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("No space left on device"),
        "the error names the cause: {}",
        lines[0]
    );
    assert!(
        files
            .lines()
            .all(|f| f.ends_with(".json") && !f.contains("/images/")),
        "partial files left: {files}"
    );
    assert!(used < 64, "{used} KiB left in the full cache");
}

/// Start a container step (`srun` or `ferry run`) whose task reads the image after 3 s,
/// kill the user's process named `victim` once the task runs, and return what the step
/// printed and how long it took.
fn kill_during_step(launch: &str, victim: &str) -> (Run, Duration) {
    let started = Instant::now();
    let out = sh(&format!(
        "export SLURM_CONF={}; {launch} sh -c 'sleep 3; cat /etc/ferry-marker' & pid=$!; \
         for i in $(seq 300); do pgrep -u $USER -x sleep >/dev/null && break; sleep 0.02; done; \
         pkill -9 -u $USER {victim}; wait $pid; echo \"exit $?\"",
        std::env::var("SLURM_CONF").expect("SLURM_CONF: the test cluster")
    ));
    (out, started.elapsed())
}

#[test]
fn killing_squashfuse_or_the_holder_fails_the_task_clearly_and_ends_the_step() {
    let _m = exclusive_machine();
    let busybox = image("busybox.sqsh").display().to_string();
    for launch in [
        format!("srun -n1 --container={busybox}"),
        format!("$FERRY run {busybox}"),
    ] {
        for victim in ["-x squashfuse_ll", "-f 'ferry hold'"] {
            let (out, took) = kill_during_step(&launch, victim);
            // The task's next read of the image fails (cat: ENOTCONN, or SIGBUS where a page
            // of a mapped binary was missing), and ferry says why.
            assert!(
                !out.stdout.contains("busybox-image") && !out.stdout.trim_end().ends_with("exit 0"),
                "`{launch}` after killing {victim}: {}\n{}",
                out.stdout,
                out.stderr
            );
            let why = if victim.contains("squashfuse") {
                "the image server (squashfuse) ended while the container ran"
            } else {
                "the container's holder was killed while the container ran"
            };
            assert!(
                out.stderr.contains(why),
                "`{launch}` after killing {victim}: ferry says why: {}",
                out.stderr
            );
            assert!(took < Duration::from_secs(20), "{took:?}");
            let left = leftovers_after(USER, Duration::from_secs(5));
            assert!(left.is_empty(), "left behind: {left:?}");
        }
    }
}

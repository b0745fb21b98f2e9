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
    for trial in 0..24u64 {
        sh(&format!("$FERRY gc --cache {cache} --max-size 0")).ok();
        assert_eq!(cache_entries(&cache).0, 0, "gc emptied the cache");
        // A spread of points from the start to past the end, the same in every run.
        let delay_ms = (trial * 7919 % 24) * whole / 26;
        let out = sh(&format!(
            "{import} >/dev/null 2>&1 & pid=$!; sleep {}; kill -9 $pid 2>/dev/null && echo killed; wait $pid; true",
            delay_ms as f64 / 1000.0
        ));
        // (Whether this kill landed before, during or after the import depends on the
        // machine's load; what follows must hold in every case.)
        let _ = out;
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
        .status_within(COMMAND_LIMIT);
    assert!(mounted.success());
    Command::new("chown")
        .arg(format!("{USER}:"))
        .arg(&small)
        .status_within(COMMAND_LIMIT);
    let out = sh(&format!(
        "$FERRY import --cache {small}/cache oci:{d}/layout:v1"
    ));
    let used = String::from_utf8_lossy(
        &Command::new("du")
            .args(["-sk", &small])
            .output_within(COMMAND_LIMIT)
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
            .output_within(COMMAND_LIMIT)
            .stdout,
    )
    .to_string();
    let _ = Command::new("umount")
        .arg(&small)
        .status_within(COMMAND_LIMIT);
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

// ---- registry faults ------------------------------------------------------------------

fn import_through(proxy: &FaultProxy, cache: &str, env: &str) -> (Run, Duration) {
    let started = Instant::now();
    let out = sh(&format!(
        "FERRY_INSECURE_REGISTRIES=127.0.0.1:{p} {env} $FERRY import --cache {cache} \
         docker://127.0.0.1:{p}/ferry/busybox:latest",
        p = proxy.port
    ));
    (out, started.elapsed())
}

#[test]
fn registry_faults_are_retried_with_backoff_then_reported_in_one_line() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display().to_string();
    // Each passing fault: the import succeeds after retries and the image runs.
    for (mode, pattern, env) in [
        ("500", "/v2/", ""),
        ("drop", "/blobs/", ""),
        ("truncate", "/blobs/", ""),
        ("stall", "/blobs/", "FERRY_REGISTRY_TIMEOUT=2"),
    ] {
        let cache = format!("{d}/cache-{mode}");
        let proxy = FaultProxy::start(mode, 2, pattern);
        let (out, took) = import_through(&proxy, &cache, env);
        let image = out.ok().trim().to_string();
        assert_eq!(
            proxy.faults(),
            2,
            "{mode}: two requests faulted: {:?}\n{}",
            proxy.log.lock().unwrap(),
            out.stderr
        );
        // A pause before a retry (1 s; blobs are fetched in parallel, so the two faults
        // may hit two blobs at once).
        assert!(
            took >= Duration::from_secs(1),
            "{mode}: retried after {took:?}"
        );
        let run = sh(&format!("$FERRY run {image} cat /etc/ferry-marker"));
        assert_eq!(run.ok(), "busybox-image\n", "{mode}");
        assert_eq!(cache_entries(&cache), (1, 0, 0), "{mode}");
    }
    // A registry that keeps failing: a clear line once the retries are used up, within a
    // bounded time, and no entry in the cache.
    for (mode, env, words) in [
        ("500", "FERRY_REGISTRY_RETRIES=2", "500"),
        (
            "stall",
            "FERRY_REGISTRY_RETRIES=1 FERRY_REGISTRY_TIMEOUT=2",
            "timed out",
        ),
    ] {
        let cache = format!("{d}/cache-fail-{mode}");
        let proxy = FaultProxy::start(mode, -1, "/v2/");
        let (out, took) = import_through(&proxy, &cache, env);
        assert_ne!(out.code, 0, "{mode}");
        // A warning per retry, saying when the next try comes, then the error.
        let lines: Vec<&str> = out.stderr.lines().collect();
        let (error, retries) = lines.split_last().unwrap();
        assert!(
            error.starts_with("ferry: error: ")
                && error.contains(&format!("127.0.0.1:{}", proxy.port))
                && error.contains(words),
            "{mode}: {}",
            out.stderr
        );
        assert!(
            retries
                .iter()
                .all(|l| l.contains(" WARN ") && l.contains("trying again in")),
            "{mode}: {}",
            out.stderr
        );
        assert!(
            !out.stderr.contains('\x1b'),
            "{mode}: colour codes in a log"
        );
        assert!(
            took < Duration::from_secs(30),
            "{mode}: gave up after {took:?}"
        );
        if mode == "500" {
            // Backoff: 1 s before the first retry, 2 s before the second.
            assert!(
                took >= Duration::from_secs(3),
                "{mode}: gave up after {took:?}"
            );
        }
        assert_eq!(cache_entries(&cache).0, 0, "{mode}");
        assert!(
            dir_entries(&format!("{cache}/images")).is_empty(),
            "{mode}: {:?}",
            dir_entries(&format!("{cache}/images"))
        );
    }
}

// ---- Slurm: scancel, time limits, slurmd restarts ------------------------------------

/// The port plugstack.conf's `insecure_registries` lists for these tests.
const PLUGIN_PROXY_PORT: u16 = 15009;

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn user_jobs(name: &str) -> String {
    sh(&format!("squeue -h -u $USER -n {name} -o '%i %T'")).stdout
}

/// Run `script` as the test user on a thread: for commands that must be interrupted.
fn in_background(script: String) -> std::thread::JoinHandle<(Run, Instant)> {
    std::thread::spawn(move || {
        let out = sh(&script);
        (out, Instant::now())
    })
}

#[test]
fn scancel_and_time_limits_during_setup_and_run_leave_nothing_behind() {
    let _m = exclusive_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display().to_string();
    let busybox = image("busybox.sqsh").display().to_string();
    // Setup that never ends by itself: an import whose blob downloads stall.
    let proxy = FaultProxy::start_on("stall", -1, "/blobs/", &PLUGIN_PROXY_PORT.to_string());
    // An image no cache holds, pushed under a name of this test's own.
    let registry = std::env::var("FERRY_TEST_REGISTRY")
        .expect("FERRY_TEST_REGISTRY is not set: integration/test starts the test registry");
    let name = format!("ferry/setup-{}:v1", std::process::id());
    sh(&format!(
        "cd {d} && {MAKE_CONFIGURED_LAYOUT}\n skopeo --insecure-policy copy -q \
         --dest-tls-verify=false oci:{d}/layout:v1 docker://{registry}/{name}"
    ))
    .ok();
    let stalled = format!("docker://127.0.0.1:{PLUGIN_PROXY_PORT}/{name}");
    let cache = format!("/home/{USER}/.cache/ferry");
    let before = node_state();
    let cache_before = cache_contents(&cache);

    // scancel while the container is being set up.
    let srun = in_background(format!(
        "srun -n1 -J ferry-setup-cancel --container={stalled} true"
    ));
    wait_for(
        "the import reaching a blob",
        Duration::from_secs(60),
        || proxy.faults() >= 1,
    );
    std::thread::sleep(Duration::from_millis(500));
    let cancelled = Instant::now();
    sh("scancel -u $USER -n ferry-setup-cancel").ok();
    let (out, ended) = srun.join().unwrap();
    // (srun 22.05 exits 0 for a step cancelled before it completely launched.)
    assert!(
        out.code != 0 || out.stderr.contains("aborted"),
        "{}",
        out.stderr
    );
    assert!(
        ended - cancelled < Duration::from_secs(20),
        "srun ended {:?} after scancel",
        ended - cancelled
    );

    // Time limits: one job stalls in setup, one runs a long command; a one-minute limit
    // ends both.
    let faults = proxy.faults();
    for (name, command) in [
        ("ferry-limit-setup", format!("--container={stalled} true")),
        (
            "ferry-limit-run",
            format!("--container={busybox} sleep 600"),
        ),
    ] {
        sh(&format!(
            "sbatch -J {name} --time=1 -o {d}/{name}.out --wrap 'srun -n1 {command}'"
        ))
        .ok();
    }
    wait_for("both jobs running", Duration::from_secs(60), || {
        user_jobs("ferry-limit-setup,ferry-limit-run")
            .lines()
            .filter(|l| l.ends_with("RUNNING"))
            .count()
            == 2
    });
    wait_for("the setup job's import", Duration::from_secs(60), || {
        proxy.faults() > faults
    });
    wait_for("the time limit", Duration::from_secs(180), || {
        user_jobs("ferry-limit-setup,ferry-limit-run")
            .trim()
            .is_empty()
    });
    for name in ["ferry-limit-setup", "ferry-limit-run"] {
        let log = std::fs::read_to_string(format!("{d}/{name}.out")).unwrap();
        assert!(log.contains("DUE TO TIME LIMIT"), "{name}: {log}");
    }
    drop(proxy);

    let after = settle_to(&before, Duration::from_secs(20));
    assert_eq!(after, before, "the node is as before");
    let now = cache_contents(&cache);
    let added: Vec<&String> = now.iter().filter(|p| !cache_before.contains(p)).collect();
    assert!(
        added.is_empty(),
        "the stopped imports left files in the cache: {added:?}"
    );
}

#[test]
fn a_slurmd_restart_during_a_container_step_leaves_it_running_and_nothing_behind() {
    let _m = exclusive_machine();
    let busybox = image("busybox.sqsh").display().to_string();
    let before = node_state();
    let step = in_background(format!(
        "srun -n1 -J ferry-slurmd-restart --container={busybox} \
         sh -c 'sleep 5; cat /etc/ferry-marker'"
    ));
    wait_for("the step running", Duration::from_secs(30), || {
        sh("squeue -h -s -u $USER -n ferry-slurmd-restart")
            .stdout
            .contains(".0")
    });
    let restart = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../integration/cluster"
    ))
    .arg("restart-slurmd")
    .output_within(COMMAND_LIMIT);
    assert!(
        restart.status.success(),
        "{}",
        String::from_utf8_lossy(&restart.stderr)
    );
    let (out, _) = step.join().unwrap();
    assert_eq!(out.ok(), "busybox-image\n", "{}", out.stderr);
    // The restarted slurmd runs new container steps.
    let out = sh(&format!(
        "srun -n1 --container={busybox} cat /etc/ferry-marker"
    ));
    assert_eq!(out.ok(), "busybox-image\n");
    let after = settle_to(&before, Duration::from_secs(20));
    assert_eq!(after, before, "the node is as before");
}

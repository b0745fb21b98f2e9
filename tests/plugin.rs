//! The SPANK plugin on a live Slurm cluster: `srun --container`, the pyxis option names,
//! sbatch and salloc, as the unprivileged test user.
//!
//! `integration/test` starts the cluster (integration/cluster, with the plugin in
//! plugstack.conf) and exports SLURM_CONF. Without a running cluster every test here fails
//! with the command that starts one.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tests::*;

/// The cluster's SLURM_CONF, after checking that its node answers.
fn cluster() -> String {
    let conf = match std::env::var("SLURM_CONF") {
        Ok(c) if !c.is_empty() => c,
        _ => panic!(
            "SLURM_CONF is not set: these tests need the test cluster; run them through \
             `integration/test`, or start it with `integration/cluster up` and \
             `eval \"$(integration/cluster env)\"`"
        ),
    };
    let out = Command::new("sinfo")
        .args(["-h", "-o", "%t"])
        .env("SLURM_CONF", &conf)
        .output_within(COMMAND_LIMIT);
    let state = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !state.trim().is_empty(),
        "the test cluster (SLURM_CONF={conf}) does not answer: start it with \
         `integration/cluster up`; sinfo said: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    conf
}

/// A shell line as the test user, with the cluster's SLURM_CONF.
fn slurm(script: &str) -> Run {
    cluster();
    sh(script)
}

fn img(name: &str) -> String {
    image(name).display().to_string()
}

/// stderr without the status lines srun prints for every failed task, and without srun's
/// notice that the job waited for the node (which jobs of other tests may still hold while
/// Slurm finishes them; seen on 24.11 even between tests that take the machine alone).
fn own_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| {
            !l.contains("Exited with exit code")
                && !l.contains("queued and waiting for resources")
                && !l.contains("has been allocated resources")
                && !l.trim().is_empty()
        })
        .collect()
}

/// [`own_lines`] of several steps of one job, without srun's notes that a step waited for
/// the one before to finish.
fn step_lines(stderr: &str) -> Vec<&str> {
    own_lines(stderr)
        .into_iter()
        .filter(|l| {
            !l.contains("step creation temporarily disabled") && !l.contains("Step created")
        })
        .collect()
}

fn daemon_pids() -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-x", "slurmd|slurmctld"])
        .output_within(COMMAND_LIMIT);
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

// ---- 1. both spellings ----------------------------------------------------------------

#[test]
fn container_option_in_both_spellings_and_pyxis_name_print_the_marker() {
    let _m = shared_machine();
    let debian = img("debian.sqsh");
    let busybox = img("busybox.sqsh");
    let out = slurm(&format!(
        "srun -n1 --container={debian} cat /etc/ferry-marker"
    ));
    assert_eq!(out.ok(), "debian-image\n");
    let out = slurm(&format!(
        "srun -n1 --container {busybox} cat /etc/ferry-marker"
    ));
    assert_eq!(out.ok(), "busybox-image\n");
    let out = slurm(&format!(
        "srun -n1 --container-image={busybox} cat /etc/ferry-marker"
    ));
    assert_eq!(out.ok(), "busybox-image\n");
    let out = slurm(&format!(
        "SRUN_CONTAINER={debian} srun -n1 cat /etc/ferry-marker"
    ));
    assert_eq!(out.ok(), "debian-image\n");
    // A relative path is taken from srun's working directory.
    let out =
        slurm("cd \"$FERRY_IMAGES\" && srun -n1 --container=busybox.sqsh cat /etc/ferry-marker");
    assert_eq!(out.ok(), "busybox-image\n");
    // A directory image, and one holding only a static binary and no shell.
    let out = slurm(&format!(
        "srun -n1 --container={} cat /etc/ferry-marker",
        img("debian")
    ));
    assert_eq!(out.ok(), "debian-image\n");
}

#[test]
fn an_image_with_only_a_static_binary_runs_as_a_step() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let root = dir.path.join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(
        image("busybox").join("bin/busybox"),
        root.join("bin/busybox"),
    )
    .unwrap();
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&dir.path)
        .status_within(COMMAND_LIMIT);
    let out = slurm(&format!(
        "srun -n1 --container={} /bin/busybox ls /",
        root.display()
    ));
    let listing: BTreeSet<&str> = out.ok().lines().collect();
    assert!(
        listing.contains("bin") && listing.contains("proc"),
        "{listing:?}"
    );
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        1,
        "image unchanged"
    );
}

#[test]
fn a_step_without_a_container_runs_on_the_host() {
    let _m = shared_machine();
    let out = slurm("srun -n1 bash -c 'cat /etc/ferry-marker 2>/dev/null || echo host; env | grep -c ^SLURM_FERRY_ || true'");
    assert_eq!(out.ok(), "host\n0\n");
    // Nothing from ferry; srun may say that it waited for the node other tests hold.
    let said: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.contains("queued and waiting") && !l.contains("has been allocated"))
        .collect();
    assert!(said.is_empty(), "{}", out.stderr);
}

// ---- 2. tasks share one container -----------------------------------------------------

#[test]
fn four_tasks_share_one_mount_namespace_with_their_own_ranks() {
    let _m = shared_machine();
    let out = slurm(&format!(
        "srun -O -n4 --container={} bash -c 'echo $SLURM_PROCID $(readlink /proc/self/ns/mnt)'; readlink /proc/self/ns/mnt",
        img("debian.sqsh")
    ));
    let text = out.ok();
    let mut lines: Vec<&str> = text.lines().collect();
    let host_ns = lines.pop().unwrap();
    let ranks: BTreeSet<&str> = lines.iter().map(|l| l.split(' ').next().unwrap()).collect();
    let namespaces: BTreeSet<&str> = lines.iter().map(|l| l.split(' ').nth(1).unwrap()).collect();
    assert_eq!(ranks, BTreeSet::from(["0", "1", "2", "3"]), "{text}");
    assert_eq!(namespaces.len(), 1, "one container for the step: {text}");
    assert!(!namespaces.contains(host_ns), "not the host's: {text}");
}

// ---- 3. identity -----------------------------------------------------------------------

#[test]
fn tasks_run_as_the_submitting_user_and_remap_root_gives_no_privilege_outside() {
    let _m = shared_machine();
    let debian = img("debian.sqsh");
    let out = slurm(&format!(
        "id -u; id -g; id -un; srun -n1 --container={debian} sh -c 'id -u; id -g; id -un'"
    ));
    let text = out.ok();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert_eq!(lines[..3], lines[3..], "same ids inside: {text}");
    assert_eq!(lines[2], USER);

    // Inside, root; outside, still the user: a root-owned host directory stays closed, and a
    // file made in the user's own directory belongs to the user.
    let dir = UserDir::new(USER);
    let out = slurm(&format!(
        "srun -n1 --container-remap-root --container={debian} \
         --container-mounts=/var/lib:/hostlib,{d}:/mine \
         sh -c 'id -u; id -g; touch /hostlib/ferry-escape 2>&1 | sed \"s/.*: //\"; touch /mine/made'",
        d = dir.path.display()
    ));
    let text = out.ok();
    assert_eq!(text, "0\n0\nPermission denied\n", "{}", out.stderr);
    assert!(!std::path::Path::new("/var/lib/ferry-escape").exists());
    use std::os::unix::fs::MetadataExt;
    let made = std::fs::metadata(dir.path.join("made")).unwrap();
    assert_eq!(made.uid(), uid_of(USER));
}

// ---- environment ------------------------------------------------------------------------

#[test]
fn tasks_get_slurm_variables_and_the_image_environment() {
    let _m = shared_machine();
    let out = slurm(&format!(
        "export FERRY_ASKED=yes; srun -n1 --container={} --container-env=FERRY_ASKED \
         /bin/sh -c 'echo $SLURM_PROCID $SLURM_LOCALID ${{SLURM_JOB_ID:+job}} $SLURM_NTASKS; echo $PATH; echo $FERRY_IMAGE_VAR; echo $FERRY_ASKED'",
        img("busybox.sqsh")
    ));
    assert_eq!(
        out.ok(),
        // The image's PATH, after the forwarders of Slurm's commands.
        "0 0 job 1\n/.ferry/run/bin:/bin:/usr/bin\nfrom-busybox-image\nyes\n",
        "{}",
        out.stderr
    );
}

#[test]
fn working_directory_and_mounts_follow_the_options() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    std::fs::write(dir.path.join("data.txt"), "host data\n").unwrap();
    Command::new("chmod")
        .args(["a+r"])
        .arg(dir.path.join("data.txt"))
        .status_within(COMMAND_LIMIT);
    let out = slurm(&format!(
        "cd {d} && srun -n1 --container={img} --container-mounts={d}:/data:ro \
         --container-workdir=/data sh -c 'pwd; cat data.txt; touch x 2>&1 | sed \"s/.*: //\"'",
        d = dir.path.display(),
        img = img("debian.sqsh")
    ));
    assert_eq!(out.ok(), "/data\nhost data\nRead-only file system\n");
    // Without --container-workdir the task starts in srun's directory when the container
    // has it (here through the mount at the same path).
    let out = slurm(&format!(
        "cd {d} && srun -n1 --container={img} --container-mounts={d} pwd",
        d = dir.path.display(),
        img = img("debian.sqsh")
    ));
    assert_eq!(out.ok().trim(), dir.path.display().to_string());
}

// ---- 4. cgroups -------------------------------------------------------------------------

/// /proc/self/cgroup with job and step ids replaced, so two steps compare.
fn normalised_cgroups(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let parts: Vec<String> = line
            .split('/')
            .map(|p| {
                if p.starts_with("job_") {
                    "job_N".to_string()
                } else if p.starts_with("step_") {
                    "step_N".to_string()
                } else {
                    p.to_string()
                }
            })
            .collect();
        out.push_str(&parts.join("/"));
        out.push('\n');
    }
    out
}

#[test]
fn tasks_stay_in_the_steps_cgroup() {
    let _m = shared_machine();
    let bare = slurm("srun -n1 cat /proc/self/cgroup");
    let inside = slurm(&format!(
        "srun -n1 --container={} cat /proc/self/cgroup",
        img("debian.sqsh")
    ));
    let bare = normalised_cgroups(bare.ok());
    assert!(bare.contains("memory:/slurm_"), "{bare}");
    assert_eq!(normalised_cgroups(inside.ok()), bare);
}

/// The job cgroups slurmstepd made for a container job, in every controller, once it ended.
/// Slurm removes a step's cgroup before the step's spank `exit`: anything of ferry's still in
/// it then (the holder) keeps it and its job's busy, and a later job given the same id
/// cannot set up its cpuset (`cpuset.cpus: Device or resource busy`).
#[test]
fn a_container_job_leaves_no_cgroup_behind() {
    let _m = shared_machine();
    let out = slurm(&format!(
        "srun -n2 --container={} sh -c 'echo $SLURM_JOB_ID $SLURMD_NODENAME'",
        img("debian.sqsh")
    ));
    let out = out.ok();
    let (job, node) = out
        .lines()
        .next()
        .and_then(|l| l.split_once(' '))
        .unwrap_or_else(|| panic!("no job id and node in {out:?}"));
    let left = || -> Vec<String> {
        let mut found = Vec::new();
        for controller in dir_entries("/sys/fs/cgroup") {
            let users = format!("/sys/fs/cgroup/{controller}/slurm_{node}");
            for uid in dir_entries(&users) {
                let job_dir = format!("{users}/{uid}/job_{job}");
                if Path::new(&job_dir).is_dir() {
                    found.push(job_dir);
                }
            }
        }
        found
    };
    // slurmstepd removes them as it ends, just after srun has returned.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !left().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(left(), Vec::<String>::new(), "job {job} on {node}");
}

#[test]
fn the_memory_limit_holds_inside_the_container() {
    let _m = shared_machine();
    // 150 MiB in one shell variable against --mem=64M.
    let out = slurm(&format!(
        "srun -n1 --mem=64M --container={} bash -c 'x=$(head -c 150M /dev/zero | tr \"\\0\" a); echo survived ${{#x}}'",
        img("debian.sqsh")
    ));
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(!out.stdout.contains("survived"), "{}", out.stdout);
    assert!(
        out.stderr.contains("Out Of Memory") || out.stderr.contains("oom-kill"),
        "srun reports the OOM kill: {}",
        out.stderr
    );
}

// ---- 5. sbatch and salloc ------------------------------------------------------------

#[test]
fn sbatch_container_applies_to_every_step_and_a_step_can_override_it() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let debian = img("debian.sqsh");
    let busybox = img("busybox.sqsh");
    let script = format!(
        "#!/bin/bash\n\
         #SBATCH --container={debian}\n\
         #SBATCH --output={d}/out.txt\n\
         echo \"script: $(cat /etc/ferry-marker 2>/dev/null || echo on the host)\"\n\
         srun -n1 cat /etc/ferry-marker\n\
         srun -n1 --container={busybox} cat /etc/ferry-marker\n\
         srun -n1 --container-image={busybox} cat /etc/ferry-marker\n\
         srun -n1 --export=NONE cat /etc/ferry-marker\n\
         srun -n1 cat /etc/ferry-marker\n",
        d = dir.path.display()
    );
    std::fs::write(dir.path.join("job.sh"), script).unwrap();
    Command::new("chmod")
        .arg("a+rx")
        .arg(dir.path.join("job.sh"))
        .status_within(COMMAND_LIMIT);
    let out = slurm(&format!(
        "cd {} && sbatch --wait job.sh",
        dir.path.display()
    ));
    out.ok();
    let log = batch_output(&dir.path.join("out.txt"));
    // The script runs in the job's image; its sruns (forwarded to the host) too.
    assert_eq!(
        log,
        "script: debian-image\ndebian-image\nbusybox-image\nbusybox-image\ndebian-image\ndebian-image\n"
    );
    // The same with the pyxis name on the command line.
    let out = slurm(&format!(
        "cd {} && sbatch --wait --container-image={busybox} --output=out2.txt --wrap 'srun -n1 cat /etc/ferry-marker'",
        dir.path.display()
    ));
    out.ok();
    let log = batch_output(&dir.path.join("out2.txt"));
    assert_eq!(log, "busybox-image\n");
}

#[test]
fn salloc_container_applies_to_its_steps() {
    let _m = shared_machine();
    for option in ["--container", "--container-image"] {
        let out = slurm(&format!(
            "salloc {option}={} bash -c 'cat /etc/ferry-marker 2>/dev/null || echo on the host; srun -n1 cat /etc/ferry-marker; srun -n1 --container={} cat /etc/ferry-marker' 2>/dev/null",
            img("busybox.sqsh"),
            img("debian.sqsh")
        ));
        assert_eq!(
            out.ok(),
            "on the host\nbusybox-image\ndebian-image\n",
            "salloc {option}"
        );
    }
}

/// Writes `script` as `DIR/job.sh`, readable and executable by the test users.
fn job_script(dir: &UserDir, script: &str) {
    std::fs::write(dir.path.join("job.sh"), script).unwrap();
    Command::new("chmod")
        .arg("a+rx")
        .arg(dir.path.join("job.sh"))
        .status_within(COMMAND_LIMIT);
}

#[test]
fn sbatch_container_image_runs_the_script_in_the_image_with_slurm_commands_forwarded() {
    let _m = exclusive_machine();
    let before = node_state();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let busybox = img("busybox.sqsh");
    let debian = img("debian.sqsh");
    // busybox: no C library in the image, so the forwarders must be static. The job's
    // directory is bound at its own path: forwarded commands run in it.
    job_script(
        &dir,
        &format!(
            "#!/bin/sh\n\
             #SBATCH --container-image={busybox}\n\
             #SBATCH --container-mounts={d}:{d}\n\
             #SBATCH --output={d}/out.txt\n\
             echo \"script: $(cat /etc/ferry-marker)\"\n\
             command -v srun\n\
             srun -n1 cat /etc/ferry-marker\n\
             srun -n1 --container-image={debian} cat /etc/ferry-marker\n\
             squeue -h -j $SLURM_JOB_ID -o 'squeue: %i %u'\n\
             scontrol show job NOPE >/dev/null 2>&1; echo \"scontrol rc=$?\"\n\
             srun -n1 sh -c 'exit 3' 2>/dev/null; echo \"srun rc=$?\"\n\
             echo through stdin | srun -n1 cat\n\
             sbatch --wait -o nested.out --wrap 'cat /etc/ferry-marker' >/dev/null; echo \"sbatch rc=$?\"\n\
             cat nested.out\n\
             /.ferry/forward ls 2>&1; echo \"ls rc=$?\"\n"
        ),
    );
    let out = slurm(&format!("cd {d} && sbatch --parsable --wait job.sh"));
    let job = out.ok().trim().to_string();
    let log = batch_output(&dir.path.join("out.txt"));
    assert_eq!(
        log,
        format!(
            "script: busybox-image\n\
             /.ferry/run/bin/srun\n\
             busybox-image\n\
             debian-image\n\
             squeue: {job} {USER}\n\
             scontrol rc=1\n\
             srun rc=3\n\
             through stdin\n\
             sbatch rc=0\n\
             busybox-image\n\
             ferry: ls: cannot run the host's ls: ls is not forwarded to the host (only srun, \
             sbatch, salloc, scancel, squeue, sinfo, scontrol, sacct, sattach)\n\
             ls rc=127\n"
        )
    );
    // No forward server, socket directory or mount is left.
    let after = settle_to(&before, Duration::from_secs(10));
    assert_eq!(after, before, "the node is as before");
}

#[test]
fn steps_started_from_the_batch_container_stop_on_scancel_and_on_signals() {
    let _m = exclusive_machine();
    let before = node_state();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let busybox = img("busybox.sqsh");
    // scancel of the script's own step (forwarded scancel), then SIGTERM to a forwarded
    // srun, which passes it on to the host's srun: both steps end long before their sleep.
    job_script(
        &dir,
        &format!(
            "#!/bin/sh\n\
             #SBATCH --container-image={busybox}\n\
             #SBATCH --output={d}/out.txt\n\
             running() {{ until squeue -h -s -j $SLURM_JOB_ID -o %i | grep -qx \"$SLURM_JOB_ID.$1\"; do sleep 0.2; done; }}\n\
             srun -n1 sleep 300 2>/dev/null &\n\
             running 0\n\
             scancel $SLURM_JOB_ID.0 && echo cancelled\n\
             wait $!; [ $? -ne 0 ] && echo step 0 ended\n\
             srun -n1 sleep 300 2>/dev/null &\n\
             pid=$!\n\
             running 1\n\
             kill -TERM $pid\n\
             wait $pid; [ $? -ne 0 ] && echo step 1 ended\n\
             echo done\n"
        ),
    );
    slurm(&format!("cd {d} && sbatch --wait --time=3 job.sh")).ok();
    let log = batch_output(&dir.path.join("out.txt"));
    assert_eq!(log, "cancelled\nstep 0 ended\nstep 1 ended\ndone\n");
    let after = settle_to(&before, Duration::from_secs(10));
    assert_eq!(after, before, "the node is as before");
}

#[test]
fn the_batch_script_stays_on_the_host_by_user_or_site_setting() {
    let _m = exclusive_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let busybox = img("busybox.sqsh");
    let run = |env: &str| {
        let out = slurm(&format!(
            "cd {d} && rm -f out.txt && {env} sbatch --wait --container-image={busybox} -o out.txt \
             --wrap 'echo \"script: $(cat /etc/ferry-marker 2>/dev/null || echo on the host)\"; srun -n1 cat /etc/ferry-marker'"
        ));
        out.ok();
        batch_output(&dir.path.join("out.txt"))
    };
    assert_eq!(run(""), "script: busybox-image\nbusybox-image\n");
    // The user's setting, under --export=NONE too.
    assert_eq!(
        run("FERRY_BATCH_SCRIPT=host"),
        "script: on the host\nbusybox-image\n"
    );
    assert_eq!(
        run("FERRY_BATCH_SCRIPT=host SBATCH_EXPORT=NONE"),
        "script: on the host\nbusybox-image\n"
    );
    // A job that names a container but gives no image: its steps make the container.
    let out = slurm(&format!(
        "cd {d} && rm -f out.txt && sbatch --wait --container-name=made-later -o out.txt \
         --wrap 'echo \"script: $(cat /etc/ferry-marker 2>/dev/null || echo on the host)\"; \
         srun -n1 --container-image={busybox} cat /etc/ferry-marker'"
    ));
    out.ok();
    assert_eq!(
        batch_output(&dir.path.join("out.txt")),
        "script: on the host\nbusybox-image\n"
    );
    let out = slurm(&format!(
        "FERRY_BATCH_SCRIPT=maybe sbatch --container-image={busybox} --wrap true"
    ));
    assert_eq!(out.code, 1, "{}", out.stderr);
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("FERRY_BATCH_SCRIPT=maybe: use container"),
        "{}",
        lines[0]
    );
    // The site's default, which the user's setting overrides.
    let plugstack = Plugstack::open(&cluster());
    plugstack.set_args("batch_script=host");
    assert_eq!(run(""), "script: on the host\nbusybox-image\n");
    assert_eq!(
        run("FERRY_BATCH_SCRIPT=container"),
        "script: busybox-image\nbusybox-image\n"
    );
    // Without the forwarder the job fails in one line that names the setting to fix.
    plugstack.set_args("forwarder=/nonexistent/ferry-forward");
    let out = slurm(&format!(
        "cd {d} && rm -f out.txt && sbatch --wait --container-image={busybox} -o out.txt --wrap true"
    ));
    assert_ne!(out.code, 0, "{}", out.stderr);
    let log = batch_output(&dir.path.join("out.txt"));
    assert_eq!(log.lines().count(), 1, "{log}");
    assert!(
        log.contains("ferry-forward program, not found at /nonexistent/ferry-forward")
            && log.contains("forwarder="),
        "{log}"
    );
    drop(plugstack);
}

#[test]
fn another_user_cannot_reach_a_batch_jobs_forward_server() {
    let _m = exclusive_machine();
    let before = node_state();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let busybox = img("busybox.sqsh");
    let job = slurm(&format!(
        "cd {d} && sbatch --parsable --container-image={busybox} -o {d}/out.txt --wrap 'sleep 120'"
    ))
    .ok()
    .trim()
    .to_string();
    // The server's directory appears once the batch step's container is being made.
    let uid = uid_of(USER);
    let started = Instant::now();
    let server_dir = loop {
        let found = dir_entries("/tmp").into_iter().find(|name| {
            name.starts_with("ferry-forward.")
                && std::fs::symlink_metadata(Path::new("/tmp").join(name))
                    .is_ok_and(|m| m.uid() == uid)
        });
        if let Some(name) = found {
            break Path::new("/tmp").join(name);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no forward server for job {job}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mode = std::fs::metadata(&server_dir).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", server_dir.display());
    let forwarder = ferry_bin()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("libexec/ferry/ferry-forward");
    let out = sh_as(
        OTHER_USER,
        &format!(
            "FERRY_FORWARD_SOCKET={}/sock {} squeue",
            server_dir.display(),
            forwarder.display()
        ),
    );
    assert_eq!(out.code, 127, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
    slurm(&format!("scancel {job}")).ok();
    let after = settle_to(&before, Duration::from_secs(30));
    assert_eq!(after, before, "the node is as before");
}

#[test]
fn container_steps_call_slurm_commands_on_the_host() {
    let _m = exclusive_machine();
    let before = node_state();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let busybox = img("busybox.sqsh");
    // An ordinary step (no batch container): its own job seen and changed from inside,
    // a nested step, exit codes; both tasks of the node share one server (same directory).
    let out = slurm(&format!(
        "cd {d} && srun -O -n2 --container-image={busybox} --container-mounts={d}:{d} \
         --output=out.%t sh -c '\
         command -v squeue; \
         squeue -h -j $SLURM_JOB_ID -o \"squeue: %i %u\"; \
         scontrol show job $SLURM_JOB_ID | grep -o \"JobId=$SLURM_JOB_ID \"; \
         scontrol update JobId=$SLURM_JOB_ID Comment=from-step$SLURM_PROCID && echo updated; \
         scontrol show job NOPE >/dev/null 2>&1; echo \"scontrol rc=$?\"; \
         h=$(hostname); [ \"$(srun --overlap -n1 hostname)\" = \"$h\" ] && echo nested srun; \
         srun --overlap -n1 sh -c \"exit 3\" 2>/dev/null; echo \"srun rc=$?\"; \
         stat -c %i /.ferry/run > inode.$SLURM_PROCID'"
    ));
    out.ok();
    for task in 0..2 {
        let log = batch_output(&dir.path.join(format!("out.{task}")));
        let job = log
            .lines()
            .find_map(|l| l.strip_prefix("squeue: "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        assert_eq!(
            log,
            format!(
                "/.ferry/run/bin/squeue\n\
                 squeue: {job} {USER}\n\
                 JobId={job} \n\
                 updated\n\
                 scontrol rc=1\n\
                 nested srun\n\
                 srun rc=3\n"
            ),
            "task {task}"
        );
    }
    let inode = |t: u32| std::fs::read_to_string(dir.path.join(format!("inode.{t}"))).unwrap();
    assert_eq!(
        inode(0),
        inode(1),
        "one forward server for the node's tasks"
    );
    // scancel of its own step from inside: the step ends, long before its sleep.
    let out = slurm(&format!(
        "srun -n1 --container-image={busybox} sh -c 'scancel $SLURM_JOB_ID.$SLURM_STEP_ID; sleep 300'"
    ));
    assert_ne!(out.code, 0, "{}{}", out.stdout, out.stderr);
    // slurmstepd's `*** STEP ... CANCELLED ***` line reaches srun only while the task's output
    // is still connected; srun's own `Job step aborted` says the same.
    assert!(
        out.stderr.contains("CANCELLED") || out.stderr.contains("Job step aborted"),
        "{}",
        out.stderr
    );
    // No forward server, socket directory or mount is left.
    let after = settle_to(&before, Duration::from_secs(10));
    assert_eq!(after, before, "the node is as before");
}

#[test]
fn a_step_attached_to_a_running_container_uses_its_forwarders() {
    let _m = exclusive_machine();
    let before = node_state();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let busybox = img("busybox.sqsh");
    job_script(
        &dir,
        &format!(
            "#!/bin/sh\n\
             #SBATCH --output={d}/out.txt\n\
             srun --overlap -n1 --container-image={busybox} --container-name=keep --container-mounts={d}:{d} \
             sh -c 'touch {d}/up; sleep 120' 2>/dev/null &\n\
             until [ -e {d}/up ]; do sleep 0.2; done\n\
             srun --overlap -n1 --container-name=keep:exec sh -c \
             'command -v squeue; squeue -h -j $SLURM_JOB_ID -o \"attached: %u\"'\n\
             scancel $SLURM_JOB_ID.0\n\
             wait\n"
        ),
    );
    slurm(&format!("cd {d} && sbatch --wait --time=3 job.sh")).ok();
    let log = batch_output(&dir.path.join("out.txt"));
    assert_eq!(log, format!("/.ferry/run/bin/squeue\nattached: {USER}\n"));
    let after = settle_to(&before, Duration::from_secs(10));
    assert_eq!(after, before, "the node is as before");
}

#[test]
fn the_site_can_turn_forwarding_off_for_steps() {
    let _m = exclusive_machine();
    let before = node_state();
    let busybox = img("busybox.sqsh");
    let plugstack = Plugstack::open(&cluster());
    plugstack.set_args("forward_commands=no");
    let out = slurm(&format!(
        "srun -n1 --container-image={busybox} sh -c 'squeue -h >/dev/null 2>&1; echo \"squeue rc=$?\"; \
         ls /.ferry 2>/dev/null || echo no forwarders'"
    ));
    assert_eq!(out.ok(), "squeue rc=127\nno forwarders\n");
    // The batch script's container keeps them: its steps need srun.
    let out = slurm(&format!(
        "sbatch --wait --container-image={busybox} -o /dev/null --wrap 'srun -n1 true' >/dev/null && echo batch ok"
    ));
    assert_eq!(out.ok(), "batch ok\n");
    drop(plugstack);
    let after = settle_to(&before, Duration::from_secs(10));
    assert_eq!(after, before, "the node is as before");
}

// ---- 6. errors ---------------------------------------------------------------------------

#[test]
fn bad_input_gives_one_line_and_leaves_nothing() {
    let _m = exclusive_machine();
    let before = node_state();
    let secret = UserDir::new(OTHER_USER);
    std::fs::copy(image("busybox.sqsh"), secret.path.join("img.sqsh")).unwrap();
    Command::new("chmod")
        .arg("0700")
        .arg(&secret.path)
        .status_within(COMMAND_LIMIT);
    let busybox = img("busybox.sqsh");
    let cases = [
        (
            "srun -n1 --container=/nonexistent/image.sqsh true".to_string(),
            "image not found: /nonexistent/image.sqsh",
            125,
        ),
        (
            format!(
                "srun -n1 --container={} true",
                secret.path.join("img.sqsh").display()
            ),
            "image not readable by user ferrytest",
            125,
        ),
        (
            format!("srun -n1 --container={busybox} --container-mounts=/tmp:/x:bogus true"),
            "unknown flag `bogus`",
            1,
        ),
        (
            format!("srun -O -n2 --container={busybox} --container-mounts=/nonexistent:/x true"),
            "mount source not found: /nonexistent",
            125,
        ),
    ];
    for (command, expected, code) in cases {
        let out = slurm(&command);
        assert_eq!(out.code, code, "{command}: {}", out.stderr);
        let lines = own_lines(&out.stderr);
        assert_eq!(lines.len(), 1, "{command}: one line, got {lines:#?}");
        assert!(lines[0].contains(expected), "{command}: {}", lines[0]);
        assert!(lines[0].contains("ferry"), "{command}: {}", lines[0]);
    }
    drop(secret);
    let after = settle_to(&before, Duration::from_secs(5));
    assert_eq!(after, before, "the node is as before");
}

// ---- 7. many steps, scancel ----------------------------------------------------------

#[test]
fn fifty_container_steps_leave_nothing_behind() {
    let _m = exclusive_machine();
    let daemons = daemon_pids();
    assert!(!daemons.is_empty(), "slurmd and slurmctld run");
    let before = node_state();
    let out = slurm(&format!(
        "n=0; for i in $(seq 50); do srun -n1 --container={} true && n=$((n+1)); done; echo $n",
        img("busybox.sqsh")
    ));
    assert_eq!(out.ok(), "50\n", "{}", out.stderr);
    let after = settle_to(&before, Duration::from_secs(5));
    assert_eq!(after, before, "the node is as before");
    assert_eq!(
        daemon_pids(),
        daemons,
        "slurmd and slurmctld did not restart"
    );
}

#[test]
fn scancel_kills_everything_inside() {
    let _m = exclusive_machine();
    let before = node_state();
    let out = slurm(&format!(
        "srun -n1 -J ferry-scancel --container={} sleep 300 & \
         for i in $(seq 100); do squeue -h -u $USER -n ferry-scancel -t R | grep -q . && break; sleep 0.1; done; \
         sleep 0.5; scancel -u $USER -n ferry-scancel; wait; echo done",
        img("debian.sqsh")
    ));
    assert!(out.stdout.ends_with("done\n"), "{}", out.stdout);
    let after = settle_to(&before, Duration::from_secs(10));
    assert_eq!(after, before, "the node is as before");
}

// ---- site settings ----------------------------------------------------------------------

#[test]
fn plugstack_arguments_take_effect() {
    let _m = exclusive_machine();
    let plugstack = Plugstack::open(&cluster());
    let busybox = img("busybox.sqsh");
    let site = UserDir::new(USER);
    std::fs::write(site.path.join("site.txt"), "site file\n").unwrap();
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&site.path)
        .status_within(COMMAND_LIMIT);

    // default_mounts: every container gets them, read-only here; writable_tmpfs_size bounds
    // a writable container's changes.
    plugstack.set_args(&format!(
        "default_mounts={}:/site:ro writable_tmpfs_size=1m log_level=info squashfuse=/usr/bin/squashfuse_ll",
        site.path.display()
    ));
    let out = slurm(&format!(
        "srun -n1 --container-writable --container={busybox} sh -c \
         'cat /site/site.txt; touch /site/x 2>&1 | sed \"s/.*: //\"; \
          head -c 4000000 /dev/zero 2>/dev/null > /big || echo big refused; rm -f /big; \
          head -c 100000 /dev/zero > /small && echo small ok'"
    ));
    assert_eq!(
        out.ok(),
        "site file\nRead-only file system\nbig refused\nsmall ok\n",
        "{}",
        out.stderr
    );

    // A site squashfuse that is not there: the step says which setting to fix.
    plugstack.set_args("squashfuse=/nonexistent/squashfuse_ll");
    let out = slurm(&format!("srun -n1 --container={busybox} true"));
    assert_eq!(out.code, 125, "{}", out.stderr);
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("/nonexistent/squashfuse_ll"),
        "{}",
        lines[0]
    );

    // A broken configuration: steps without a container still run; container steps fail
    // with a line that names the bad argument.
    plugstack.set_args("no_such_key=1");
    let out = slurm("srun -n1 echo plain");
    assert_eq!(out.ok(), "plain\n");
    let out = slurm(&format!("srun -n1 --container={busybox} true"));
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("no_such_key") && out.stderr.contains("tell your admins"),
        "{}",
        out.stderr
    );
}

/// A node-local directory for the users' unpacked trees (`named_dir=`), as an admin would
/// give: root's, mode 1777; removed with the trees in it (the users', so made writable
/// first).
struct NamedDir(tempfile::TempDir);

impl NamedDir {
    fn new() -> NamedDir {
        let dir = tempfile::Builder::new()
            .prefix("ferry-named-")
            .tempdir_in("/var/tmp")
            .unwrap();
        Command::new("chmod")
            .arg("1777")
            .arg(dir.path())
            .status_within(COMMAND_LIMIT);
        NamedDir(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for NamedDir {
    fn drop(&mut self) {
        let _ = Command::new("chmod")
            .args(["-R", "u+rwX"])
            .arg(self.0.path())
            .status_within(COMMAND_LIMIT);
    }
}

#[test]
fn the_unpack_provider_by_option_and_as_the_site_default() {
    let _m = exclusive_machine();
    let plugstack = Plugstack::open(&cluster());
    let busybox = img("busybox.sqsh");
    let uid = uid_of(USER);
    let named = NamedDir::new();
    let n = named.path().display();
    let inode = "srun -n1 --container={busybox} {opt} stat -c %i /bin/busybox";
    let step_run = |opt: &str| slurm(&inode.replace("{busybox}", &busybox).replace("{opt}", opt));
    let step_inode = |opt: &str| step_run(opt).ok().trim().parse::<u64>().unwrap();
    let tree_inode = || {
        let trees = dir_entries(&format!("{n}/ferry-{uid}/unpacked"));
        assert_eq!(trees.len(), 1, "{trees:?}");
        std::fs::metadata(format!(
            "{n}/ferry-{uid}/unpacked/{}/rootfs/bin/busybox",
            trees[0]
        ))
        .unwrap()
        .ino()
    };

    plugstack.set_args(&format!("named_dir={n}"));
    // Asked for by the step: the task sees the unpacked tree itself. The first use says
    // that it unpacks and how long it took.
    let out = step_run("--container-rootfs=unpack");
    let first = out.ok().trim().parse::<u64>().unwrap();
    assert_eq!(first, tree_inode());
    let lines = own_lines(&out.stderr);
    assert!(
        lines.len() == 2
            && lines[0].starts_with(&format!("ferry: unpacking {busybox} on "))
            && lines[1].starts_with(&format!("ferry: unpacked {busybox} in ")),
        "{lines:#?}"
    );
    // Reused: nothing to say.
    let out = step_run("--container-rootfs=unpack");
    assert_eq!(out.ok().trim().parse::<u64>().unwrap(), first);
    assert_eq!(own_lines(&out.stderr), Vec::<&str>::new());
    // The site default is squashfuse: another file system.
    assert_ne!(step_inode(""), first);
    // The site makes unpack the default; a step may still ask for squashfuse.
    plugstack.set_args(&format!("named_dir={n} rootfs=unpack"));
    assert_eq!(step_inode(""), first, "the tree is reused");
    assert_ne!(step_inode("--container-rootfs=squashfuse"), first);
    // A bad value is refused by srun in one line.
    let out = slurm(&format!(
        "srun -n1 --container={busybox} --container-rootfs=fancy true"
    ));
    assert_eq!(out.code, 1, "{}", out.stderr);
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains(
            "--container-rootfs=fancy: unknown provider (known: squashfuse, unpack, kernel, auto)"
        ),
        "{}",
        lines[0]
    );
    drop(plugstack);
}

/// `auto`, the site's default: the first step starts at once on squashfuse (another file
/// system than the tree's) and says nothing, while ferry unpacks the image's tree in the
/// background; the steps after it run on that tree. A step may ask for it too. A named_dir
/// in memory (tmpfs) gets no tree.
#[test]
fn the_default_provider_starts_on_squashfuse_and_later_steps_use_the_tree() {
    let _m = exclusive_machine();
    let plugstack = Plugstack::open(&cluster());
    let debian = img("debian.sqsh");
    let uid = uid_of(USER);
    let named = NamedDir::new();
    let n = named.path().display();
    let trees = format!("{n}/ferry-{uid}/unpacked");
    let tree_inode = || {
        let found = dir_entries(&trees);
        assert_eq!(found.len(), 1, "{found:?}");
        std::fs::metadata(format!("{trees}/{}/rootfs/bin/ls", found[0]))
            .ok()
            .map(|m| m.ino())
    };
    let step = |opt: &str, then: &str| {
        slurm(&format!(
            "srun -n1 --container={debian} {opt} sh -c 'stat -c %i /bin/ls; {then}'"
        ))
    };
    // No rootfs= (the suites' pin): the default.
    plugstack.set_args_unpinned(&format!("named_dir={n}"));
    // The first step lasts a few seconds, for the unpack behind it (the step's end would
    // end it: the next step would start it again).
    let out = step("", "sleep 5");
    let first: u64 = out.ok().trim().parse().unwrap();
    assert_eq!(
        own_lines(&out.stderr),
        Vec::<&str>::new(),
        "it says nothing"
    );
    let mut tree = None;
    for _ in 0..300 {
        tree = tree_inode();
        if tree.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let tree = tree.expect("the tree is unpacked in the background");
    assert_ne!(first, tree, "the first step ran on squashfuse");
    let out = step("", "true");
    assert_eq!(
        out.ok().trim().parse::<u64>().unwrap(),
        tree,
        "then on the tree"
    );
    assert_eq!(own_lines(&out.stderr), Vec::<&str>::new());
    // Asked for by the step where the site's default is squashfuse: the tree is reused.
    plugstack.set_args(&format!("named_dir={n}"));
    let out = step("--container-rootfs=auto", "true");
    assert_eq!(out.ok().trim().parse::<u64>().unwrap(), tree);
    assert_ne!(step("", "true").ok().trim().parse::<u64>().unwrap(), tree);
    // A named_dir on tmpfs: the step runs on squashfuse and no tree is made.
    let mem = tempfile::Builder::new()
        .prefix("ferry-auto-tmpfs.")
        .tempdir_in("/var/tmp")
        .unwrap();
    let m = mem.path().display();
    assert!(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "mode=0755", "ferry-auto-test"])
        .arg(mem.path())
        .status()
        .unwrap()
        .success());
    plugstack.set_args_unpinned(&format!("named_dir={m}"));
    let out = step("", "sleep 2");
    let made = dir_entries(&format!("{m}/ferry-{uid}/unpacked"));
    let _ = Command::new("umount").arg(mem.path()).status();
    let inode: u64 = out.ok().trim().parse().unwrap();
    assert_ne!(inode, tree);
    assert_eq!(made, Vec::<String>::new(), "no tree in memory");
    drop(plugstack);
}

/// A default (`auto`) step that ends before its background unpack ends the unpack with it:
/// nothing of the user's runs on after the step. The next step finds the unpack cut short
/// and unpacks in the foreground, saying so, so that steps shorter than an unpack still get
/// the tree; the steps after it run on the tree and say nothing.
#[test]
fn a_short_default_step_ends_its_background_unpack_and_the_next_step_unpacks_in_the_foreground() {
    let _m = exclusive_machine();
    let plugstack = Plugstack::open(&cluster());
    // Big enough that its unpack outlasts a step of `true`.
    let mpi = img("mpi.sqsh");
    let uid = uid_of(USER);
    let named = NamedDir::new();
    let n = named.path().display();
    let trees = format!("{n}/ferry-{uid}/unpacked");
    plugstack.set_args_unpinned(&format!("named_dir={n}"));
    let step = || slurm(&format!("srun -n1 --container={mpi} stat -c %i /bin/ls"));
    let first = step();
    let first_inode: u64 = first.ok().trim().parse().unwrap();
    assert_eq!(
        own_lines(&first.stderr),
        Vec::<&str>::new(),
        "it says nothing"
    );
    // The unpack ended with the step, its partial tree left behind.
    let mut running = String::new();
    for _ in 0..100 {
        running = sh(&format!(
            "pgrep -u {USER} -fa 'unpack-in-backgroun[d]|unsquashf[s]'"
        ))
        .stdout;
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(running, "", "the unpack outlived its step");
    let key = dir_entries(&trees);
    assert_eq!(key.len(), 1, "{key:?}");
    let left = dir_entries(&format!("{trees}/{}", key[0]));
    assert!(
        left.contains(&"rootfs.partial".to_string()) && !left.contains(&"rootfs".to_string()),
        "cut short: {left:?}"
    );
    // The next step unpacks first, with the unpack's lines, and runs on the tree.
    let second = step();
    let tree_inode = std::fs::metadata(format!("{trees}/{}/rootfs/bin/ls", key[0]))
        .expect("the tree is in place")
        .ino();
    assert_eq!(second.ok().trim().parse::<u64>().unwrap(), tree_inode);
    assert_ne!(first_inode, tree_inode);
    let lines = own_lines(&second.stderr);
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with(&format!("ferry: unpacking {mpi} on "))),
        "{lines:#?}"
    );
    assert!(
        lines
            .last()
            .is_some_and(|l| l.starts_with(&format!("ferry: unpacked {mpi} in "))),
        "{lines:#?}"
    );
    // Then on the tree, silently.
    let third = step();
    assert_eq!(third.ok().trim().parse::<u64>().unwrap(), tree_inode);
    assert_eq!(own_lines(&third.stderr), Vec::<&str>::new());
    drop(plugstack);
}

/// What the `kernel` provider could leave on the host: loop devices backed by one of
/// `images` (`losetup -a`), and squashfs mounts in the host's mount table (the provider
/// attaches its mount only in the container's own namespace).
fn kernel_traces(images: &[&str]) -> (Vec<String>, Vec<String>) {
    let out = Command::new("losetup")
        .arg("-a")
        .output_within(COMMAND_LIMIT);
    let loops = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| images.iter().any(|i| l.contains(i)))
        .map(str::to_string)
        .collect();
    let mounts = host_mounts()
        .lines()
        .filter(|l| l.contains(" - squashfs "))
        .map(str::to_string)
        .collect();
    (loops, mounts)
}

#[test]
fn the_kernel_provider_only_where_the_site_enables_it() {
    let _m = exclusive_machine();
    let plugstack = Plugstack::open(&cluster());
    let (debian, busybox) = (img("debian.sqsh"), img("busybox.sqsh"));
    let sif = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../launcher/tests/fixtures/sif/one-group.sif"
    );
    // With every mount point (the test image lacks /etc/hosts), so no overlay over it.
    let dir = UserDir::new(USER);
    let with_hosts = debian_with_name_service_files(&dir);
    let images = [debian.as_str(), busybox.as_str(), sif, with_hosts.as_str()];
    let (loops, host_squashfs) = kernel_traces(&images);
    assert!(
        loops.is_empty(),
        "loop devices of the test images: {loops:#?}"
    );
    let before = node_state();
    // The first line of the task's mountinfo is its root.
    let root_line = "head -1 /proc/self/mountinfo";
    let kernel_root = |line: &str| {
        line.contains(" / / ro,nosuid,nodev") && line.contains(" - squashfs /dev/loop")
    };

    // Not enabled by the site (the default): the step is refused in one line, and a site
    // default of rootfs=kernel without the key is a broken configuration.
    plugstack.set_args("");
    let out = slurm(&format!(
        "srun -n1 --container={busybox} --container-rootfs=kernel true"
    ));
    assert_eq!(out.code, 125, "{}", out.stderr);
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("--container-rootfs=kernel")
            && lines[0].contains("an admin must enable it (kernel_squashfs=yes"),
        "{}",
        lines[0]
    );
    plugstack.set_args("rootfs=kernel");
    let out = slurm(&format!("srun -n1 --container={busybox} true"));
    assert_ne!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("`rootfs=kernel` needs `kernel_squashfs=yes`"),
        "{}",
        out.stderr
    );

    // Without the forwarders, whose mount points (/.ferry) no image has.
    plugstack.set_args("kernel_squashfs=yes forward_commands=no");
    // The image, with the kernel's squashfs as the root (no home: every mount point is in
    // the image, so there is no overlay over it); the site's default is still squashfuse.
    let out = slurm(&format!(
        "srun -n1 --container={with_hosts} --container-rootfs=kernel --no-container-mount-home \
         sh -c 'cat /etc/ferry-marker; {root_line}'"
    ));
    let text = out.ok();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "debian-image", "{text}");
    assert!(kernel_root(lines[1]), "{text}");
    let out = slurm(&format!(
        "srun -n1 --container={with_hosts} --no-container-mount-home {root_line}"
    ));
    assert!(out.ok().contains(" - fuse.squashfuse "), "{}", out.stdout);

    // Two tasks share one container on it.
    let out = slurm(&format!(
        "srun -O -n2 --container={debian} --container-rootfs=kernel --no-container-mount-home \
         sh -c 'echo $(readlink /proc/self/ns/mnt) $(head -1 /proc/self/mountinfo | cut -d\" \" -f3)'"
    ));
    let text = out.ok();
    let seen: BTreeSet<&str> = text.lines().collect();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert_eq!(seen.len(), 1, "one container, one mount: {text}");

    // Even with every capability of its user namespace (remap-root), a task cannot lift
    // the mount's nodev, nosuid or read-only flags: the kernel locked them.
    let out = slurm(&format!(
        "srun -n1 --container={with_hosts} --container-rootfs=kernel --no-container-mount-home \
         --container-remap-root sh -c 'for o in dev suid rw; do \
         mount -o remount,bind,$o / 2>/dev/null && echo $o lifted || echo $o locked; done'"
    ));
    assert_eq!(
        out.ok(),
        "dev locked\nsuid locked\nrw locked\n",
        "{}",
        out.stderr
    );

    // Owners as through squashfuse: the image's root files are nobody's, or with
    // --container-remap-root root's (an idmapped mount), and then writable on an overlay
    // whose changes go with the step.
    let owners = |provider: &str| {
        slurm(&format!(
            "for r in no-container-remap-root container-remap-root; do \
             srun -n1 --container={debian} --container-rootfs={provider} --$r \
             stat -c %u:%g /etc/ferry-marker; done"
        ))
        .ok()
        .to_string()
    };
    assert_eq!(owners("kernel"), "65534:65534\n0:0\n");
    assert_eq!(owners("kernel"), owners("squashfuse"));
    let out = slurm(&format!(
        "srun -n1 --container={debian} --container-rootfs=kernel --container-writable \
         --container-remap-root sh -c 'echo changed > /etc/ferry-marker && cat /etc/ferry-marker'; \
         srun -n1 --container={debian} --container-rootfs=kernel cat /etc/ferry-marker"
    ));
    assert_eq!(out.ok(), "changed\ndebian-image\n", "{}", out.stderr);

    // A SIF: its squashfs partition, at its offset in the file.
    let out = slurm(&format!(
        "srun -n1 --container={sif} --container-rootfs=kernel \
         --container-mounts={}/bin:/ferry-tools:ro /ferry-tools/busybox cat /hello.txt",
        img("busybox")
    ));
    assert_eq!(out.ok(), "Hello from Sylabs!\n", "{}", out.stderr);

    // The site's default; a step may still ask for squashfuse.
    plugstack.set_args("kernel_squashfs=yes rootfs=kernel forward_commands=no");
    let out = slurm(&format!(
        "srun -n1 --container={with_hosts} --no-container-mount-home sh -c 'cat /etc/ferry-marker; {root_line}'; \
         srun -n1 --container={with_hosts} --no-container-mount-home --container-rootfs=squashfuse {root_line}"
    ));
    let text = out.ok();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "debian-image", "{text}");
    assert!(kernel_root(lines[1]), "{text}");
    assert!(lines[2].contains(" - fuse.squashfuse "), "{text}");
    drop(plugstack);

    // Nothing is left: no loop device, no squashfs mount, no process, no file.
    let start = Instant::now();
    let traces = loop {
        let now = kernel_traces(&images);
        if (now.0.is_empty() && now.1 == host_squashfs) || start.elapsed() > Duration::from_secs(5)
        {
            break now;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        traces,
        (vec![], host_squashfs),
        "loop devices, squashfs mounts"
    );
    assert_eq!(settle_to(&before, Duration::from_secs(5)), before);
}

// ---- named containers and --container-save ---------------------------------------------

#[test]
fn named_containers_keep_state_across_steps_and_save_makes_an_image() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let debian = img("busybox.sqsh"); // small: the save squashes it whole
    let busybox = img("busybox.sqsh");
    let d = dir.path.display();
    let out = slurm(&format!(
        "cd {d} && salloc -Q bash -c '\
         srun -n1 --container={debian} --container-name=work sh -c \"echo step1 > /etc/state\"; \
         srun -O -n2 --container={debian} --container-name=work cat /etc/state; \
         srun -n1 --container={debian} cat /etc/state 2>/dev/null || echo no state without the name; \
         srun -n1 --container={debian} --container-name=other cat /etc/state 2>/dev/null || echo other name is separate; \
         srun -n1 --container={debian} --container-name=work --container-save=saved.sqsh sh -c \"echo step2 >> /etc/state\"; \
         srun -n1 --container={busybox} --container-save={d}/solo.sqsh sh -c \"echo solo > /etc/solo\"; \
         echo $SLURM_JOB_ID > jobid'"
    ));
    assert_eq!(
        out.ok(),
        "step1\nstep1\nno state without the name\nother name is separate\n",
        "{}",
        out.stderr
    );
    // A save says what it does and how long it took.
    for saved in [format!("{d}/saved.sqsh"), format!("{d}/solo.sqsh")] {
        let start = format!("ferry: saving the container to {saved} on ");
        let end = format!("ferry: saved the container to {saved} in ");
        let lines: Vec<&str> = out.stderr.lines().collect();
        let at = |p: &str| lines.iter().position(|l| l.starts_with(p));
        assert!(
            at(&start).is_some() && at(&end) > at(&start),
            "{}",
            out.stderr
        );
    }
    // The saved images hold the changes, owned by root as in any image.
    let out = slurm(&format!(
        "srun -n1 --container={d}/saved.sqsh --container-remap-root sh -c 'cat /etc/state; stat -c %u /etc/state'; \
         srun -n1 --container={d}/solo.sqsh cat /etc/solo"
    ));
    assert_eq!(out.ok(), "step1\nstep2\n0\nsolo\n", "{}", out.stderr);
    // No temporary file next to them.
    let names = dir_entries(&d.to_string());
    assert_eq!(names, ["jobid", "saved.sqsh", "solo.sqsh"], "{names:?}");
    // The job's unpacked containers are gone once the job is (its epilog removes them).
    let job = std::fs::read_to_string(dir.path.join("jobid")).unwrap();
    let job_dir = format!("/tmp/ferry-{}/job{}", uid_of(USER), job.trim());
    let start = Instant::now();
    while Path::new(&job_dir).exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!Path::new(&job_dir).exists(), "{job_dir} remains");
}

#[test]
fn container_name_and_save_are_checked_before_the_step_starts() {
    let _m = shared_machine();
    let busybox = img("busybox.sqsh");
    let out = slurm(&format!(
        "srun -n1 --container={busybox} --container-name=../x true"
    ));
    assert_eq!(out.code, 1);
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("--container-name=../x"), "{}", lines[0]);
    // A save target the user cannot write: refused before the step starts.
    let out = slurm(&format!(
        "srun -n1 --container={busybox} --container-save=/var/lib/x.sqsh true"
    ));
    assert_eq!(out.code, 1);
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("--container-save=/var/lib/x.sqsh"),
        "{}",
        lines[0]
    );
    assert!(!std::path::Path::new("/var/lib/x.sqsh").exists());
}

#[test]
fn concurrent_first_steps_on_one_name_share_one_container() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let busybox = img("busybox.sqsh");
    let d = dir.path.display();
    // Four steps start at once on a name not yet unpacked: one unpacks, the others wait
    // for it; every step's file must be in the one container afterwards.
    let out = slurm(&format!(
        "cd {d} && salloc -Q bash -c '\
         for i in 1 2 3 4; do \
           srun --overlap -n1 --container={busybox} --container-name=shared sh -c \"echo $i > /etc/step-$i\" & \
         done; wait; \
         srun --overlap -n1 --container={busybox} --container-name=shared sh -c \"cat /etc/step-*\" | sort'"
    ));
    assert_eq!(out.ok(), "1\n2\n3\n4\n", "{}", out.stderr);
}

#[test]
fn a_save_that_fails_leaves_no_file_behind() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let busybox = img("busybox.sqsh");
    let full = dir.path.join("full");
    std::fs::create_dir(&full).unwrap();
    // A 1 MiB file system for the output: the squashed container (with 4 MiB of random
    // data in it) cannot fit.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0755"])
        .arg("tmpfs")
        .arg(&full)
        .status_within(COMMAND_LIMIT);
    assert!(mounted.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount")
                .arg(&self.0)
                .status_within(COMMAND_LIMIT);
        }
    }
    let _unmount = Unmount(full.clone());
    Command::new("chown")
        .arg(format!("{USER}:"))
        .arg(&full)
        .status_within(COMMAND_LIMIT);
    let f = full.display();
    let out = slurm(&format!(
        "srun -n1 --container={busybox} --container-save={f}/out.sqsh \
         sh -c 'head -c 4194304 /dev/urandom > /big'"
    ));
    assert_eq!(out.code, 1, "a failed save fails the step: {}", out.stderr);
    assert!(
        out.stderr.contains("--container-save") && out.stderr.contains(&format!("{f}/out.sqsh")),
        "{}",
        out.stderr
    );
    assert_eq!(dir_entries(&f.to_string()), Vec::<String>::new());
}

// ---- registry images ---------------------------------------------------------------------

#[test]
fn a_registry_image_runs_as_a_step_and_a_missing_tag_is_one_line() {
    let _m = shared_machine();
    let registry = match std::env::var("FERRY_TEST_REGISTRY") {
        Ok(r) if !r.is_empty() => r,
        _ => panic!(
            "FERRY_TEST_REGISTRY is not set: start the test registry with `integration/registry up` \
             and `eval \"$(integration/registry env)\"` (integration/test does)"
        ),
    };
    // Imported into the user's cache on first use, found there after.
    for _ in 0..2 {
        let out = slurm(&format!(
            "srun -n1 --container=docker://{registry}/ferry/busybox:latest cat /etc/ferry-marker"
        ));
        assert_eq!(out.ok(), "busybox-image\n", "{}", out.stderr);
    }
    let out = slurm(&format!(
        "srun -n1 --container=docker://{registry}/ferry/no-such-image:latest true"
    ));
    assert_eq!(out.code, 125, "{}", out.stderr);
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("no such image or tag"), "{}", lines[0]);
}

/// The site's registries file (plugstack.conf `registries_conf=`): `--container-image=NAME:TAG`,
/// a Docker Hub name, is imported from the loopback registry standing in for the site's
/// Docker Hub mirror, after a first mirror that is down; a mirror whose blobs do not match
/// their digests is refused, naming it.
#[test]
fn docker_hub_names_come_from_the_sites_mirrors_and_digests_still_count() {
    let _m = exclusive_machine();
    let registry = test_registry();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let pid = std::process::id();
    let (good, bad) = (
        format!("ferry-mirrored-{pid}"),
        format!("ferry-corrupted-{pid}"),
    );
    // Two images no cache holds: a file named after each goes into its second layer.
    for name in [&good, &bad] {
        sh(&format!(
            "cd {d} && rm -rf layout app l1.tar.gz && mkdir -p app && echo > app/{name} && \
             {MAKE_CONFIGURED_LAYOUT}\n skopeo --insecure-policy copy -q \
             --dest-tls-verify=false oci:{d}/layout:v1 docker://{registry}/library/{name}:24.04"
        ))
        .ok();
    }
    let corrupting = FaultProxy::start("corrupt", -1, "/blobs/");
    let conf = dir.path.join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"docker.io\"\n\
             [[registry.mirror]]\nlocation = \"127.0.0.1:9\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"{registry}\"\ninsecure = true\n\
             [[registry]]\nprefix = \"docker.io/library/{bad}\"\n\
             [[registry.mirror]]\nlocation = \"127.0.0.1:{}/library/{bad}\"\ninsecure = true\n",
            corrupting.port
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("a+r")
        .arg(&conf)
        .status_within(COMMAND_LIMIT);
    let plugstack = Plugstack::open(&cluster());
    plugstack.add_args(&format!("registries_conf={}", conf.display()));

    let out = slurm(&format!(
        "cd {d} && srun -n1 --container-image={good}:24.04 sh -c 'cat /etc/ferry-marker; echo $CFG_VAR'"
    ));
    assert_eq!(out.ok(), "busybox-image\nfrom-config\n", "{}", out.stderr);
    // The import names where it fetches from.
    assert!(
        out.stderr.contains(&format!(
            "ferry: importing docker://registry-1.docker.io/library/{good}:24.04 from {registry} on "
        )),
        "{}",
        out.stderr
    );

    let out = slurm(&format!(
        "cd {d} && srun -n1 --container-image={bad}:24.04 true"
    ));
    assert_eq!(out.code, 125, "{}", out.stderr);
    // Besides the import's start line, one error line.
    let lines: Vec<&str> = own_lines(&out.stderr)
        .into_iter()
        .filter(|l| !l.starts_with("ferry: importing "))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains(&format!(
            "from registry 127.0.0.1:{} is corrupt: expected digest sha256:",
            corrupting.port
        )),
        "{}",
        lines[0]
    );
    assert!(corrupting.faults() >= 1);
}

#[test]
fn a_registry_image_brings_its_environment_and_working_directory() {
    let _m = shared_machine();
    let registry = test_registry();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let repo = format!("ferry/configured-{}", std::process::id());
    sh(&format!(
        "cd {d} && {MAKE_CONFIGURED_LAYOUT}\n skopeo --insecure-policy copy -q --dest-tls-verify=false \
         oci:{d}/layout:v1 docker://{registry}/{repo}:v1"
    ))
    .ok();
    // srun's directory (under /var/tmp) is not in the container: the task starts in the
    // image's WorkingDir, with the image's Env.
    let out = slurm(&format!(
        "cd {d} && srun -n1 --container=docker://{registry}/{repo}:v1 sh -c 'pwd; echo $CFG_VAR'"
    ));
    assert_eq!(out.ok(), "/opt/app\nfrom-config\n", "{}", out.stderr);
    // A directory that exists inside is kept, as without a container.
    let out = slurm(&format!(
        "cd /tmp && srun -n1 --container=docker://{registry}/{repo}:v1 pwd"
    ));
    assert_eq!(out.ok(), "/tmp\n", "{}", out.stderr);
}

#[test]
fn a_jobs_tag_is_resolved_once_and_bare_registry_names_work() {
    let _m = shared_machine();
    let registry = test_registry();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let repo = format!("{registry}/ferry/moving-{}", std::process::id());
    let push = |from: &str| {
        format!(
            "skopeo --insecure-policy copy -q --src-tls-verify=false --dest-tls-verify=false \
             {from} docker://{repo}:t"
        )
    };
    let busybox = push(&format!("docker://{registry}/ferry/busybox:latest"));
    let configured = push(&format!("oci:{d}/layout:v1"));
    sh(&format!("cd {d} && {MAKE_CONFIGURED_LAYOUT}\n {busybox}")).ok();
    // The allocation names the tag; the tag then moves to another image. The job's steps
    // keep running the image the tag named when the job was made; a new srun that names
    // the tag itself gets the new one.
    let which = "sh -c 'test -e /opt/app && echo configured || echo busybox'";
    let script = dir.path.join("job.sh");
    std::fs::write(
        &script,
        format!(
            "srun -n1 {which}\n{configured}\nsrun -n1 {which}\n\
             srun -n1 --container=docker://{repo}:t {which}\n"
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("a+r")
        .arg(&script)
        .status_within(COMMAND_LIMIT);
    let out = slurm(&format!(
        "cd {d} && salloc -Q --container=docker://{repo}:t bash {d}/job.sh"
    ));
    assert_eq!(out.ok(), "busybox\nbusybox\nconfigured\n", "{}", out.stderr);
    // pyxis' spelling without docker://: a registry name, since no such path exists.
    let out = slurm(&format!(
        "cd {d} && srun -n1 --container-image={registry}/ferry/busybox:latest cat /etc/ferry-marker"
    ));
    assert_eq!(out.ok(), "busybox-image\n", "{}", out.stderr);
}

#[test]
fn the_sites_registry_ca_and_the_users_credentials_reach_the_import() {
    let _m = exclusive_machine();
    let var = |n: &str| {
        std::env::var(n).unwrap_or_else(|_| {
            panic!("{n} is not set: integration/test starts the test registries")
        })
    };
    let (addr, ca) = (var("FERRY_TEST_AUTH_REGISTRY"), var("FERRY_TEST_AUTH_CA"));
    let (login, password) = (
        var("FERRY_TEST_AUTH_LOGIN"),
        var("FERRY_TEST_AUTH_PASSWORD"),
    );
    let plugstack = Plugstack::open(&cluster());
    // The user's login, where enroot users keep theirs: a netrc-style file of their own.
    sh(&format!(
        "mkdir -p ~/.config/ferry && umask 077 && \
         printf 'machine {addr} login {login} password {password}\\n' > ~/.config/ferry/credentials"
    ))
    .ok();
    struct Forget;
    impl Drop for Forget {
        fn drop(&mut self) {
            let _ = sh("rm -f ~/.config/ferry/credentials");
        }
    }
    let _forget = Forget;
    let step =
        format!("srun -n1 --container=docker://{addr}/ferry/busybox:latest cat /etc/ferry-marker");
    // Without the site's CA the node cannot trust the registry: one line that says why.
    plugstack.set_args("");
    let out = slurm(&step);
    assert_eq!(out.code, 125, "{}", out.stderr);
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("TLS connection to"), "{}", lines[0]);
    // With it, the import (as the user, with the user's login) works.
    plugstack.set_args(&format!("registry_ca_file={ca}"));
    let out = slurm(&step);
    assert_eq!(out.ok(), "busybox-image\n", "{}", out.stderr);
}

/// Package managers' chown to system users succeeds as a no-op under remap-root (its
/// seccomp filter), in a plain task and in one that ferry starts (--container-entrypoint).
#[test]
fn remap_root_tasks_may_chown_to_system_users() {
    let _m = shared_machine();
    let debian = img("debian.sqsh");
    for how in ["", "--container-entrypoint"] {
        let out = slurm(&format!(
            "srun -n1 --container={debian} --container-remap-root --container-writable {how} \
             sh -c 'touch /f && chown man:man /f && chown 123 /f && stat -c %u:%g /f'"
        ));
        assert_eq!(out.ok(), "0:0\n", "{how}: {}", out.stderr);
    }
    let out = slurm(&format!(
        "srun -n1 --container={debian} --container-writable sh -c 'touch /f && chown 123 /f'"
    ));
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("Invalid argument"), "{}", out.stderr);
}

#[test]
fn packages_install_with_remap_root_and_writable_then_save_into_an_image() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let debian = img("debian.sqsh");
    // Two trivial packages: one for dpkg -i, one served by a file:// apt repository.
    sh(&format!(
        r#"set -e; cd {d}
mkdeb() {{
  mkdir -p "$1/DEBIAN" "$1/usr/bin"
  printf 'Package: %s\nVersion: 1.0\nArchitecture: all\nMaintainer: ferry tests <t@example.org>\nDescription: test\n' "$1" > "$1/DEBIAN/control"
  printf '#!/bin/sh\necho %s works\n' "$1" > "$1/usr/bin/$1"; chmod 755 "$1/usr/bin/$1"
  dpkg-deb --root-owner-group -b "$1" "$1.deb" >/dev/null
}}
mkdeb ferry-local; mkdeb ferry-repo
mkdir repo; mv ferry-repo.deb repo/
printf 'Package: ferry-repo\nVersion: 1.0\nArchitecture: all\nMaintainer: ferry tests <t@example.org>\nDescription: test\nFilename: ./ferry-repo.deb\nSize: %s\nSHA256: %s\n\n' \
  "$(stat -c %s repo/ferry-repo.deb)" "$(sha256sum repo/ferry-repo.deb | cut -d' ' -f1)" > repo/Packages"#
    ))
    .ok();
    std::fs::write(
        dir.path.join("install.sh"),
        "set -e\n\
         dpkg -i /pkgs/ferry-local.deb >/dev/null\n\
         echo 'deb [trusted=yes] file:/pkgs/repo ./' > /etc/apt/sources.list\n\
         apt-get -qq update\n\
         apt-get -qq install -y ferry-repo >/dev/null 2>&1\n\
         ferry-local\nferry-repo\n",
    )
    .unwrap();
    Command::new("chmod")
        .args(["a+r"])
        .arg(dir.path.join("install.sh"))
        .status_within(COMMAND_LIMIT);
    let out = slurm(&format!(
        "srun -n1 --container={debian} --container-remap-root --container-writable \
         --container-mounts={d}:/pkgs:ro --container-save={d}/tools.sqsh sh /pkgs/install.sh"
    ));
    assert_eq!(
        out.ok(),
        "ferry-local works\nferry-repo works\n",
        "{}",
        out.stderr
    );
    // The saved image has both packages installed, and not ferry's apt setting.
    let out = slurm(&format!(
        "srun -n1 --container={d}/tools.sqsh sh -c 'ferry-local; ferry-repo; \
         dpkg -s ferry-repo | grep Status; ls /etc/apt/apt.conf.d | grep -c ferry'"
    ));
    assert_eq!(
        out.stdout, "ferry-local works\nferry-repo works\nStatus: install ok installed\n0\n",
        "{}",
        out.stderr
    );
}

// ---- GPUs ---------------------------------------------------------------------------------

/// What a task sees of the GPUs: Slurm's SLURM_STEP_GPUS, the container's GPU nodes
/// (indexes), and the count the probe gets through the host's libcuda (or `none`).
const STEP_GPU_REPORT: &str = "echo \"step=$SLURM_STEP_GPUS\"; \
    echo \"dev=$(ls /dev | sed -n \"s/^nvidia\\([0-9]*\\)$/\\1/p\" | sort -n | paste -sd, -)\"; \
    /opt/probe/cuda-query | sed -n \"s/^devices: //p; s/^libcuda: not found.*/none/p\"";

#[test]
fn steps_get_their_own_gpus_and_steps_without_gpus_get_none() {
    // The node's four GPUs are shared by this test's jobs only.
    let _m = exclusive_machine();
    let probe = gpu_probe_dir();
    let debian = img("debian.sqsh");
    let mounts = format!("--container-mounts={probe}:/opt/probe:ro");
    // A job holds two GPUs; the step gets the other two, and only those are inside.
    let out = slurm(&format!(
        "sbatch -J ferry-gpu-hold --gres=gpu:2 -o /dev/null --wrap 'sleep 60' >/dev/null; \
         for i in $(seq 100); do squeue -h -u $USER -n ferry-gpu-hold -t R | grep -q . && break; sleep 0.1; done; \
         srun -n1 --gres=gpu:2 {mounts} --container={debian} sh -c '{STEP_GPU_REPORT}'; \
         scancel -u $USER -n ferry-gpu-hold; \
         for i in $(seq 200); do squeue -h -u $USER -n ferry-gpu-hold | grep -q . || break; sleep 0.1; done"
    ));
    let text = out.ok();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}\n{}", out.stderr);
    let step = lines[0].trim_start_matches("step=");
    assert_eq!(lines[1], format!("dev={step}"), "{text}");
    assert!(step == "0,1" || step == "2,3", "{text}");
    assert_eq!(lines[2], "2", "{text}");

    // No gres: no GPU node, no driver library.
    let out = slurm(&format!(
        "srun -n1 {mounts} --container={debian} sh -c '{STEP_GPU_REPORT}'"
    ));
    assert_eq!(out.ok(), "step=\ndev=\nnone\n", "{}", out.stderr);

    // --container-gpus=all asks for the node's GPUs whatever the step has.
    let out = slurm(&format!(
        "srun -n1 --container-gpus=all {mounts} --container={debian} sh -c '{STEP_GPU_REPORT}; nvidia-smi | head -n1'"
    ));
    assert_eq!(
        out.ok(),
        "step=\ndev=0,1,2,3\n4\nstand-in nvidia-smi\n",
        "{}",
        out.stderr
    );

    // Two tasks of a 2-GPU step share one container holding both GPUs.
    let out = slurm(&format!(
        "srun -n2 --gres=gpu:2 {mounts} --container={debian} sh -c 'echo $(ls /dev | grep -c \"^nvidia[0-9]\") $(readlink /proc/self/ns/mnt)'"
    ));
    let lines: BTreeSet<&str> = out.ok().lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.stdout);
    assert!(out.stdout.starts_with("2 mnt:"), "{}", out.stdout);

    // A bad value is refused by srun before the job starts.
    let out = slurm(&format!(
        "srun -n1 --container-gpus=some --container={debian} true"
    ));
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("--container-gpus") && out.stderr.contains("none, all"),
        "{}",
        out.stderr
    );
}

#[test]
fn site_gpu_default_and_host_libraries() {
    let _m = exclusive_machine();
    let plugstack = Plugstack::open(&cluster());
    let probe = gpu_probe_dir();
    let debian = img("debian.sqsh");
    let mounts = format!("--container-mounts={probe}:/opt/probe:ro");

    // gpus=none: a step with gres gets no GPU unless it asks.
    plugstack.set_args("gpus=none");
    let out = slurm(&format!(
        "srun -n1 --gres=gpu:1 {mounts} --container={debian} sh -c '{STEP_GPU_REPORT}'; \
         srun -n1 --gres=gpu:1 --container-gpus=0 {mounts} --container={debian} sh -c 'ls /dev | grep \"^nvidia[0-9]\"'"
    ));
    assert_eq!(out.ok(), "step=0\ndev=\nnone\nnvidia0\n", "{}", out.stderr);

    // host_libs: a directory at its own path and a library by its loader-cache name, both
    // registered with the image's loader, in steps without GPUs too.
    let standin = "/usr/local/lib/ferry-gpu-standin";
    plugstack.set_args(&format!("host_libs={standin},libnvidia-ml.so.1"));
    let out = slurm(&format!(
        "srun -n1 --container={debian} sh -c 'ls {standin} | sort | paste -sd, -; ls /usr/lib/ferry-host; \
         ldconfig -p | sed -n \"s/.*libnvidia-ml.so.1 .*=> //p\" | sort | paste -sd, -'"
    ));
    assert_eq!(
        out.ok(),
        format!(
            "libcuda.so.1,libnvidia-ml.so.1\nlibnvidia-ml.so.1\n/usr/lib/ferry-host/libnvidia-ml.so.1,{standin}/libnvidia-ml.so.1\n"
        ),
        "{}",
        out.stderr
    );

    // nvidia_container_cli=: the driver's files are the ones it lists (the stand-in lists
    // libcuda and nvidia-smi, not libnvidia-ml, which the loader cache also has).
    plugstack.set_args(&format!(
        "nvidia_container_cli={probe}/nvidia-container-cli"
    ));
    let out = slurm(&format!(
        "srun -n1 --container-gpus=0 {mounts} --container={debian} sh -c 'ls /usr/lib/ferry-host; /opt/probe/cuda-query | head -n1; nvidia-smi | head -n1'"
    ));
    assert_eq!(
        out.ok(),
        "libcuda.so.1\nlibcuda: /usr/lib/ferry-host/libcuda.so.1\nstand-in nvidia-smi\n",
        "{}",
        out.stderr
    );

    // A library the node lacks fails the step in one line naming it.
    plugstack.set_args("host_libs=libferry-nothere.so.1");
    let out = slurm(&format!("srun -n1 --container={debian} true"));
    assert_eq!(out.code, 125, "{}", out.stderr);
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("libferry-nothere.so.1"), "{}", lines[0]);
}

#[test]
fn container_scope_global_keeps_named_containers_for_later_jobs() {
    let _m = exclusive_machine();
    let plugstack = Plugstack::open(&cluster());
    let busybox = img("busybox.sqsh");
    let uid = uid_of(USER);
    let named = NamedDir::new();
    let n = named.path().display();
    let two_jobs = format!(
        "srun -n1 --container={busybox} --container-name=tools sh -c 'echo from-job-1 > /etc/tool'; \
         srun -n1 --container={busybox} --container-name=tools sh -c 'cat /etc/tool 2>/dev/null || echo fresh'"
    );
    // Default scope (job): each srun is a job of its own, so the second starts fresh, and
    // nothing stays once the jobs are gone.
    plugstack.set_args(&format!("named_dir={n}"));
    assert_eq!(slurm(&two_jobs).ok(), "fresh\n");
    // global: the second job finds the first's container, which outlives both.
    plugstack.set_args(&format!("named_dir={n} container_scope=global"));
    let out = slurm(&two_jobs);
    assert_eq!(out.ok(), "from-job-1\n", "{}", out.stderr);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        std::path::Path::new(&format!("{n}/ferry-{uid}/named/tools/rootfs/etc/tool")).exists(),
        "the named container stays under named_dir"
    );
    let _ = Command::new("rm")
        .arg("-rf")
        .arg(named.path().join(format!("ferry-{uid}")))
        .status_within(COMMAND_LIMIT);
}

// ---- --container-name flags, attaching, `ferry containers` -------------------------------

/// A shell loop that waits (up to a minute) for the file `path` to appear.
fn wait_for_file(path: &str) -> String {
    format!("i=0; while [ ! -e {path} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done")
}

/// [`wait_for_file`] for a command inside `sh -c "..."` of a `bash -c '...'` script.
fn wait_for_file_inside(path: &str) -> String {
    wait_for_file(path).replace('$', "\\$")
}

#[test]
fn container_name_flags_follow_pyxis() {
    let _m = shared_machine();
    let busybox = img("busybox.sqsh");
    let out = slurm(&format!(
        "salloc -Q bash -c '\
         srun -n1 --container-name=x:exec true; echo \"exec, none: $?\"; \
         srun -n1 --container-name=x:no_create true; echo \"no_create, none: $?\"; \
         srun -n1 --container-image={busybox} --container-name=x:create sh -c \"echo made > /etc/state\"; echo \"create: $?\"; \
         srun -n1 --container-image={busybox} --container-name=x:create true; echo \"create again: $?\"; \
         srun -n1 --container-name=x:no_create cat /etc/state; \
         PYXIS_CONTAINER_NAME=x:no_exec srun -n1 --container-image={busybox} cat /etc/state; \
         srun -n1 --container-name=x:exec true; echo \"exec, stopped: $?\"'"
    ));
    assert_eq!(
        out.ok(),
        "exec, none: 125\nno_create, none: 125\ncreate: 0\ncreate again: 125\nmade\nmade\nexec, stopped: 125\n",
        "{}",
        out.stderr
    );
    let lines = step_lines(&out.stderr);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    for (line, expected) in lines.iter().zip([
        "--container-name=x:exec: no step of this job runs a container of that name",
        "--container-name=x:no_create: no container of that name on this node",
        "--container-name=x:create: a container of that name exists already",
        "--container-name=x:exec: no step of this job runs a container of that name",
    ]) {
        assert!(line.contains(expected), "{line}");
    }
}

#[test]
fn invalid_container_names_are_refused_by_srun_in_one_line() {
    let _m = shared_machine();
    let busybox = img("busybox.sqsh");
    let long = "n".repeat(256);
    for (given, says) in [
        ("a/b".to_string(), "`/`"),
        (long.clone(), "256 characters"),
        ("work:attach".to_string(), "unknown flag `attach`"),
        (":exec".to_string(), "empty"),
    ] {
        for how in ["option", "variable"] {
            let line = match how {
                "option" => format!(
                    "srun -n1 --container-image={busybox} --container-name='{given}' echo ran"
                ),
                _ => format!(
                    "PYXIS_CONTAINER_NAME='{given}' srun -n1 --container-image={busybox} echo ran"
                ),
            };
            let out = slurm(&line);
            assert_eq!(out.code, 1, "{given} ({how}): {}", out.stderr);
            assert_eq!(out.stdout, "", "{given} ({how}): the step must not run");
            let lines = own_lines(&out.stderr);
            assert_eq!(lines.len(), 1, "{given} ({how}): {lines:#?}");
            assert!(
                lines[0].contains(&format!("--container-name={given}: "))
                    && lines[0].contains(says),
                "{given} ({how}): {}",
                lines[0]
            );
        }
    }
}

#[test]
fn a_step_attaches_to_the_running_container_of_its_name() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let busybox = img("busybox.sqsh");
    let d = dir.path.display();
    let ready = wait_for_file(&format!("{d}/ready"));
    let done_inside = wait_for_file_inside("/sync/done");
    // The first step mounts a tmpfs inside its container and waits; the others run while
    // it does.
    let out = slurm(&format!(
        "cd {d} && salloc -Q bash -c '\
         srun -n1 --container-image={busybox} --container-name=x --container-remap-root --container-mounts={d}:/sync \
           sh -c \"mkdir -p /mymnt && mount -t tmpfs none /mymnt && echo secret > /mymnt/f && touch /sync/ready; {done_inside}\" & \
         {ready}; \
         srun --overlap -n1 --container-name=x cat /mymnt/f; \
         srun --overlap -n1 --container-name=x:exec sh -c \"cat /mymnt/f; id -u\"; \
         srun --overlap -n1 --container-name=x:no_exec sh -c \"cat /mymnt/f 2>/dev/null || echo not attached\"; \
         srun --overlap -n1 --container-image={busybox} --container-name=x --container-mounts=/etc:/mnt/etc --container-writable \
           sh -c \"cat /mymnt/f; ls /mnt/etc 2>/dev/null | wc -l\"; \
         echo listing; srun --overlap -n1 $FERRY containers; \
         srun --overlap -n1 $FERRY containers rm x; echo \"rm while running: $?\"; \
         touch {d}/done; wait; \
         srun -n1 $FERRY containers rm x; echo \"rm: $?\"; \
         srun -n1 $FERRY containers'"
    ));
    let stdout = out.ok().to_string();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..6],
        ["secret", "secret", "0", "not attached", "secret", "0"],
        "{stdout}\n{}",
        out.stderr
    );
    // The listing: its name, job, size and that it runs.
    assert_eq!(lines[6], "listing");
    assert!(
        lines[7].starts_with("NAME") && lines[7].contains("STATE"),
        "{stdout}"
    );
    assert!(
        lines[8].starts_with("x ") && lines[8].contains("running (step "),
        "{stdout}"
    );
    assert!(lines[9] == "rm while running: 1", "{stdout}");
    assert!(
        lines[10].starts_with("removed x (") && lines[11] == "rm: 0",
        "{stdout}"
    );
    assert_eq!(lines.len(), 12, "{stdout}");
    // One warning naming what was ignored; the refused removal in one line.
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("ignoring"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", out.stderr);
    for option in [
        "--container-image",
        "--container-mounts",
        "--container-writable",
    ] {
        assert!(warnings[0].contains(option), "{}", warnings[0]);
    }
    assert!(
        out.stderr.contains("ferry: error: x is running (step "),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("no named containers of yours on this node"),
        "{}",
        out.stderr
    );
}

#[test]
fn an_unnamed_running_container_is_attachable_as_jobid_stepid() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let busybox = img("busybox.sqsh");
    let d = dir.path.display();
    let ready = wait_for_file(&format!("{d}/ready"));
    let done_inside = wait_for_file_inside("/sync/done");
    let out = slurm(&format!(
        "cd {d} && salloc -Q bash -c '\
         srun -n1 --container-image={busybox} --container-writable --container-mounts={d}:/sync \
           sh -c \"echo inside > /etc/mark; echo \\$SLURM_JOB_ID.\\$SLURM_STEP_ID > /sync/ready; {done_inside}\" & \
         {ready}; \
         srun --overlap -n1 --container-name=$(cat {d}/ready) cat /etc/mark; \
         srun --overlap -n1 $FERRY containers --all | grep -c \"running (step $(cat {d}/ready))\"; \
         touch {d}/done; wait'"
    ));
    assert_eq!(out.ok(), "inside\n1\n", "{}", out.stderr);
}

#[test]
fn ferry_containers_lists_and_removes_containers_kept_across_jobs() {
    let _m = exclusive_machine();
    let plugstack = Plugstack::open(&cluster());
    let busybox = img("busybox.sqsh");
    let uid = uid_of(USER);
    let named = NamedDir::new();
    let n = named.path().display();
    plugstack.set_args(&format!("named_dir={n} container_scope=global"));
    // Outside any job, `ferry containers` finds named_dir in plugstack.conf.
    let out = slurm(&format!(
        "srun -n1 --container={busybox} --container-name=tools true; \
         $FERRY containers; $FERRY containers rm tools nothere; echo \"rm: $?\"; $FERRY containers"
    ));
    let _ = Command::new("rm")
        .arg("-rf")
        .arg(named.path().join(format!("ferry-{uid}")))
        .status_within(COMMAND_LIMIT);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}\n{}", out.stdout, out.stderr);
    assert!(lines[0].starts_with("NAME"), "{}", out.stdout);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        (row[0], row[1], row[3]),
        ("tools", "-", "stopped"),
        "{}",
        lines[1]
    );
    assert_eq!(
        lines[2],
        format!("removed tools ({n}/ferry-{uid}/named/tools)")
    );
    assert_eq!(lines[3], "rm: 1");
    let errors = own_lines(&out.stderr);
    assert_eq!(
        errors,
        [
            "ferry: error: no container named nothere on this node",
            &*format!("no named containers of yours on this node ({n}/ferry-{uid})")
        ],
        "{}",
        out.stderr
    );
}

// ---- --container-entrypoint ---------------------------------------------------------------

/// `MAKE_CONFIGURED_LAYOUT`'s image (Entrypoint `/bin/sh /opt/app/start.sh`, which prints
/// `entry ARGS`, its directory and `$CFG_VAR`; Cmd `default`; WorkingDir `/opt/app`) as a
/// squashfs of the test user's: `DIR/configured.sqsh`.
fn configured_image(dir: &UserDir) -> String {
    let d = dir.path.display();
    sh(&format!(
        "cd {d} && {MAKE_CONFIGURED_LAYOUT}\n $FERRY import --cache {d}/cache oci:{d}/layout:v1 -o {d}/configured.sqsh >/dev/null"
    ))
    .ok();
    format!("{d}/configured.sqsh")
}

/// A squashfs made from the busybox tree by `script` (run in the tree, as the test user),
/// at `DIR/NAME.sqsh`.
fn busybox_variant(dir: &UserDir, name: &str, script: &str) -> String {
    let d = dir.path.display();
    sh(&format!(
        "set -e; cd {d}; rm -rf {name}; cp -a \"$FERRY_IMAGES/busybox\" {name}; (cd {name}; {script})\n\
         mksquashfs {name} {name}.sqsh -all-root -quiet -no-progress >/dev/null"
    ))
    .ok();
    format!("{d}/{name}.sqsh")
}

/// `/etc/ferry/image.json` (as `ferry import` writes it) and `/entry.sh`, which prints
/// `entry N: ARGS` and then execs its arguments, as entrypoints usually do.
const EXEC_ENTRYPOINT: &str = r#"mkdir -p etc/ferry work
printf '%s\n' 'echo "entry $#: $*"' 'exec "$@"' > entry.sh
printf '{"entrypoint":["/bin/sh","/entry.sh"],"cmd":["default"],"working_dir":"/work"}' > etc/ferry/image.json"#;

fn sorted_lines(text: &str) -> Vec<&str> {
    let mut v: Vec<&str> = text.lines().collect();
    v.sort();
    v
}

#[test]
fn container_entrypoint_runs_the_images_entrypoint_with_the_tasks_command() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let image = configured_image(&dir);
    // From /tmp, which exists inside: the entrypoint starts in the image's WorkingDir all
    // the same, with the command as its arguments (docker's rule: it replaces Cmd).
    let out = slurm(&format!(
        "cd /tmp && srun -n1 --container={image} --container-entrypoint --container-entrypoint-log echo a b"
    ));
    assert_eq!(out.ok(), "entry echo a b\n/opt/app\nfrom-config\n");
    // Every task runs it.
    let out = slurm(&format!(
        "cd /tmp && srun -n2 -O --container={image} --container-entrypoint --container-entrypoint-log echo x"
    ));
    assert_eq!(
        sorted_lines(out.ok()),
        sorted_lines(&"entry echo x\n/opt/app\nfrom-config\n".repeat(2))
    );
    // --container-workdir wins over WorkingDir.
    let out = slurm(&format!(
        "cd /tmp && srun -n1 --container={image} --container-entrypoint --container-entrypoint-log --container-workdir=/bin pwd"
    ));
    assert_eq!(out.ok(), "entry pwd\n/bin\nfrom-config\n");
    // Without the flag (pyxis' default) and with --no-container-entrypoint the command runs
    // directly, in srun's directory.
    for flag in ["", "--no-container-entrypoint"] {
        let out = slurm(&format!(
            "cd /tmp && srun -n1 --container={image} {flag} sh -c 'pwd; echo $CFG_VAR'"
        ));
        assert_eq!(out.ok(), "/tmp\nfrom-config\n", "{flag}");
    }
}

#[test]
fn sbatch_container_entrypoint_applies_to_the_jobs_steps() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let image = configured_image(&dir);
    let d = dir.path.display();
    let script = format!(
        "#!/bin/sh\n\
         #SBATCH --container={image}\n\
         #SBATCH --container-entrypoint\n\
         #SBATCH --container-entrypoint-log\n\
         #SBATCH --output={d}/out.txt\n\
         srun -n1 echo step\n\
         srun -n1 --no-container-entrypoint echo direct\n"
    );
    std::fs::write(dir.path.join("job.sh"), script).unwrap();
    Command::new("chmod")
        .arg("a+rx")
        .arg(dir.path.join("job.sh"))
        .status_within(COMMAND_LIMIT);
    slurm(&format!("cd {d} && sbatch --wait job.sh")).ok();
    let log = batch_output(&dir.path.join("out.txt"));
    assert_eq!(log, "entry echo step\n/opt/app\nfrom-config\ndirect\n");
}

#[test]
fn the_entrypoint_execs_the_task_which_keeps_its_status_and_nothing_of_ferrys() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let image = busybox_variant(&dir, "exec", EXEC_ENTRYPOINT);
    let run = |cmd: &str| {
        slurm(&format!(
            "cd /tmp && srun -n1 --container={image} --container-entrypoint --container-entrypoint-log {cmd}"
        ))
    };
    let out = run("sh -c 'echo $$ $SLURM_TASK_PID; pwd; env; ls -l /proc/self/fd/'");
    let text = out.ok();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("entry 3: sh -c "), "{text}");
    // The command replaced the entrypoint in the task's own process, in the WorkingDir.
    let pids: Vec<&str> = lines[1].split(' ').collect();
    assert_eq!(pids[0], pids[1], "{text}");
    assert_eq!(lines[2], "/work", "{text}");
    // Neither ferry's variable nor the namespace descriptors it was handed reach the task.
    assert!(!text.contains("FERRY_TASK"), "{text}");
    assert!(
        !text.contains("user:[") && !text.contains("mnt:["),
        "{text}"
    );
    assert!(
        text.contains("FERRY_IMAGE_VAR=from-busybox-image"),
        "{text}"
    );
    // The command's exit status is the task's.
    let out = run("sh -c 'exit 7'");
    assert_eq!(out.code, 7, "{}", out.stderr);
    assert_eq!(out.stdout, "entry 3: sh -c exit 7\n");
    // A missing command: the entrypoint's own complaint and status.
    let out = run("no-such-command");
    assert_eq!(out.code, 127, "{} {}", out.stdout, out.stderr);
}

#[test]
fn an_entrypoint_needs_no_shell_in_the_image() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    // Entrypoint by name (found in the image's PATH), and no /bin/sh at all.
    let image = busybox_variant(
        &dir,
        "noshell",
        r#"mkdir -p etc/ferry; rm bin/sh; printf '{"entrypoint":["busybox"]}' > etc/ferry/image.json"#,
    );
    let out = slurm(&format!(
        "srun -n1 --container={image} --container-entrypoint echo no shell"
    ));
    assert_eq!(out.ok(), "no shell\n", "{}", out.stderr);
    // An entrypoint that is not there: one line from ferry, status 127.
    let image = busybox_variant(
        &dir,
        "missing",
        r#"mkdir -p etc/ferry; printf '{"entrypoint":["/no/such/entry"]}' > etc/ferry/image.json"#,
    );
    let out = slurm(&format!(
        "srun -n1 --container={image} --container-entrypoint true"
    ));
    assert_eq!(out.code, 127);
    assert_eq!(
        own_lines(&out.stderr),
        vec!["ferry: error: command not found in the container: /no/such/entry"]
    );
}

#[test]
fn enroot_images_run_etc_rc_and_images_without_an_entrypoint_run_the_command() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let image = busybox_variant(
        &dir,
        "rc",
        r#"printf '%s\n' 'echo "rc $#"' 'if [ $# -gt 0 ]; then exec "$@"; fi' 'echo rc-default' > etc/rc"#,
    );
    let out = slurm(&format!(
        "srun -n1 --container={image} --container-entrypoint --container-entrypoint-log echo hi"
    ));
    assert_eq!(out.ok(), "rc 2\nhi\n");
    let out = slurm(&format!("srun -n1 --container={image} echo hi"));
    assert_eq!(out.ok(), "hi\n");
    // Neither an Entrypoint nor /etc/rc: the command itself, as docker runs it.
    let busybox = img("busybox.sqsh");
    let out = slurm(&format!(
        "srun -n1 --container={busybox} --container-entrypoint cat /etc/ferry-marker"
    ));
    assert_eq!(out.ok(), "busybox-image\n");
}

#[test]
fn container_entrypoint_with_multi_prog() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let image = busybox_variant(&dir, "exec", EXEC_ENTRYPOINT);
    let d = dir.path.display();
    std::fs::write(dir.path.join("mp.conf"), "0 echo zero\n1 echo one\n").unwrap();
    Command::new("chmod")
        .arg("a+r")
        .arg(dir.path.join("mp.conf"))
        .status_within(COMMAND_LIMIT);
    let version = slurm("srun --version").ok().to_string();
    let out = slurm(&format!(
        "cd {d} && srun -n2 -O --container={image} --container-entrypoint --container-entrypoint-log --multi-prog mp.conf"
    ));
    let (major, minor) = {
        let v: Vec<u32> = version
            .split_whitespace()
            .nth(1)
            .unwrap_or("0.0")
            .split('.')
            .take(2)
            .map(|n| n.parse().unwrap_or(0))
            .collect();
        (v[0], v[1])
    };
    if (major, minor) >= (23, 11) {
        // spank_prepend_task_argv reaches each task's own argv.
        assert_eq!(
            sorted_lines(out.ok()),
            sorted_lines("entry 2: echo zero\nzero\nentry 2: echo one\none\n")
        );
    } else {
        // 22.05 can change only the step's argv: refused by srun, before the step starts.
        assert_eq!(out.code, 1, "{}", out.stdout);
        let lines = own_lines(&out.stderr);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("--container-entrypoint does not work with --multi-prog"),
            "{lines:?}"
        );
    }
}

/// An entrypoint that says something on stdout and stderr, then execs its arguments.
const TALKING_ENTRYPOINT: &str = r#"mkdir -p etc/ferry
printf '%s\n' 'echo "entry out $#"' 'echo "entry err" >&2' 'exec "$@"' > entry.sh
printf '{"entrypoint":["/bin/sh","/entry.sh"]}' > etc/ferry/image.json"#;

#[test]
fn the_entrypoints_output_shows_only_with_container_entrypoint_log() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let image = busybox_variant(&dir, "talking", TALKING_ENTRYPOINT);
    let run = |env: &str, flags: &str, cmd: &str| {
        slurm(&format!(
            "cd /tmp && {env} srun -n1 --container={image} --container-entrypoint {flags} {cmd}"
        ))
    };
    // (3: the listing's own descriptor.)
    let cmd = "sh -c 'echo out; echo err >&2; ls /proc/self/fd'";
    // pyxis' default: the entrypoint ran (and ran the command), its own output is gone, the
    // command's is all there, on the task's own stdout and stderr and with nothing more open.
    let out = run("", "", cmd);
    assert_eq!(out.ok(), "out\n0\n1\n2\n3\n", "{}", out.stderr);
    assert_eq!(own_lines(&out.stderr), vec!["err"]);
    // With the flag, or its variables: the entrypoint's too.
    for (env, flags) in [
        ("", "--container-entrypoint-log"),
        ("PYXIS_CONTAINER_ENTRYPOINT_LOG=1", ""),
        ("FERRY_CONTAINER_ENTRYPOINT_LOG=1", ""),
    ] {
        let out = run(env, flags, "sh -c 'echo out; echo err >&2'");
        assert_eq!(out.ok(), "entry out 3\nout\n", "{env} {flags}");
        assert_eq!(
            own_lines(&out.stderr),
            vec!["entry err", "err"],
            "{env} {flags}"
        );
    }
    let out = run("PYXIS_CONTAINER_ENTRYPOINT_LOG=0", "", "echo out");
    assert_eq!(out.ok(), "out\n");
    // The command's exit status is still the task's, and a missing command still says so
    // (the shell that runs it does, on the task's stderr).
    let out = run("", "", "sh -c 'exit 7'");
    assert_eq!(out.code, 7, "{}", out.stderr);
    assert_eq!(out.stdout, "");
    let out = run("", "", "no-such-command");
    assert_eq!(out.code, 127, "{} {}", out.stdout, out.stderr);
    assert!(out.stderr.contains("no-such-command"), "{}", out.stderr);
    // Without the entrypoint, the flag changes nothing.
    let out = slurm(&format!(
        "srun -n1 --container={image} --container-entrypoint-log echo direct"
    ));
    assert_eq!(out.ok(), "direct\n");
}

// ---- --container-unshare ------------------------------------------------------------------

/// The namespaces a task is in (`net:[N]`, `ipc:[N]`, `uts:[N]`, one line each), and its
/// network interfaces as `ip -o link` shows them.
const SHOW_NAMESPACES: &str =
    "sh -c 'for n in net ipc uts; do readlink /proc/self/ns/$n; done; ip -o link'";

fn host_namespace(kind: &str) -> String {
    sh_as(USER, &format!("readlink /proc/self/ns/{kind}"))
        .ok()
        .trim()
        .to_string()
}

#[test]
fn container_unshare_gives_the_steps_tasks_new_namespaces_of_their_own() {
    let _m = shared_machine();
    let busybox = img("busybox.sqsh");
    let host: Vec<String> = ["net", "ipc", "uts"]
        .iter()
        .map(|k| host_namespace(k))
        .collect();
    let out = slurm(&format!(
        "srun -n2 -O --container={busybox} --container-unshare=net,ipc,uts {SHOW_NAMESPACES}"
    ));
    let text = out.ok();
    let lines = sorted_lines(text);
    // Two tasks, the same three namespaces, none of them the host's.
    let namespaces: BTreeSet<&str> = lines.iter().filter(|l| l.contains(":[")).copied().collect();
    assert_eq!(namespaces.len(), 3, "{text}");
    assert_eq!(
        lines.iter().filter(|l| l.contains(":[")).count(),
        6,
        "{text}"
    );
    for h in &host {
        assert!(!namespaces.contains(h.as_str()), "{h} shared: {text}");
    }
    // Only the loopback interface, and it is up.
    let links: Vec<&&str> = lines.iter().filter(|l| l.contains(": <")).collect();
    assert_eq!(links.len(), 2, "{text}");
    for l in links {
        assert!(l.starts_with("1: lo: <LOOPBACK,UP"), "{text}");
    }
    // Tasks run through the entrypoint (the task's `ferry` enters) join them as well.
    let dir = UserDir::new(USER);
    let image = busybox_variant(&dir, "exec", EXEC_ENTRYPOINT);
    let out = slurm(&format!(
        "srun -n1 --container={image} --container-entrypoint --container-unshare=net \
         sh -c 'readlink /proc/self/ns/net; ls -l /proc/self/fd/'"
    ));
    let text = out.ok();
    assert!(text.starts_with("net:["), "{text}");
    assert!(!text.starts_with(&host[0]), "{text}");
    assert!(
        !text.contains("-> net:["),
        "a namespace descriptor leaked: {text}"
    );
    // UTS: a hostname of the container's own, which root inside may change.
    let out = slurm(&format!(
        "srun -n1 --container={busybox} --container-remap-root --container-unshare=uts \
         sh -c 'hostname inside && hostname'"
    ));
    assert_eq!(out.ok(), "inside\n");
    assert_ne!(sh_as(USER, "hostname").ok().trim(), "inside");
    // Default: the host's, as before.
    let out = slurm(&format!("srun -n1 --container={busybox} {SHOW_NAMESPACES}"));
    let text = out.ok();
    for h in &host {
        assert!(text.contains(h.as_str()), "{h} not shared: {text}");
    }
}

#[test]
fn container_unshare_from_variables_the_command_line_wins_and_unknown_names_are_refused() {
    let _m = shared_machine();
    let busybox = img("busybox.sqsh");
    let (net, uts) = (host_namespace("net"), host_namespace("uts"));
    let namespaces = |env: &str, flags: &str| {
        slurm(&format!(
            "{env} srun -n1 --container={busybox} {flags} \
             sh -c 'readlink /proc/self/ns/net; readlink /proc/self/ns/uts'"
        ))
        .ok()
        .to_string()
    };
    let text = namespaces("PYXIS_CONTAINER_UNSHARE=net", "");
    assert!(!text.contains(&net) && text.contains(&uts), "{text}");
    let text = namespaces(
        "FERRY_CONTAINER_UNSHARE=uts PYXIS_CONTAINER_UNSHARE=net",
        "",
    );
    assert!(text.contains(&net) && !text.contains(&uts), "{text}");
    let text = namespaces("PYXIS_CONTAINER_UNSHARE=net", "--container-unshare=uts");
    assert!(text.contains(&net) && !text.contains(&uts), "{text}");
    // An empty list is the default, and wins over the variable too.
    let text = namespaces("PYXIS_CONTAINER_UNSHARE=net", "--container-unshare=");
    assert!(text.contains(&net) && text.contains(&uts), "{text}");
    // An unknown name: one line naming it, and the step does not run.
    for (env, flags) in [
        ("", "--container-unshare=net,pid"),
        ("PYXIS_CONTAINER_UNSHARE=net,pid", ""),
    ] {
        let out = slurm(&format!(
            "{env} srun -n1 --container={busybox} {flags} echo ran"
        ));
        assert_ne!(out.code, 0);
        assert_eq!(out.stdout, "");
        let lines = own_lines(&out.stderr);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("unknown namespace \"pid\""),
            "{}",
            lines[0]
        );
    }
}

// ---- what a pyxis user hits first: names, reuse by name, saves, bad arguments ------------

#[test]
fn names_resolve_through_the_hosts_files_with_every_provider() {
    let _m = exclusive_machine();
    let plugstack = Plugstack::open(&cluster());
    plugstack.add_args("kernel_squashfs=yes");
    let dir = UserDir::new(USER);
    // An image with an empty resolv.conf and hosts and no nsswitch.conf: a name only the
    // host's /etc/hosts knows resolves in every step, read-only or writable, named or not.
    let (sqsh, tree) = debian_without_name_service(&dir);
    let (name, _) = host_only_name();
    let probe = name_service_probe(&name);
    let expected = sh(&probe).ok().to_string();
    let variants = [
        format!("--container-image={sqsh}"),
        format!("--container-image={sqsh} --container-rootfs=unpack"),
        format!("--container-image={sqsh} --container-rootfs=kernel"),
        format!("--container-image={sqsh} --container-writable"),
        format!("--container-image={sqsh} --container-remap-root --container-readonly"),
        format!("--container-image={sqsh} --container-name=dns"),
        format!("--container-image={tree}"),
    ];
    let steps: String = variants
        .iter()
        .map(|v| format!("srun -n1 {v} sh -c '{probe}'; echo ==; "))
        .collect();
    let out = slurm(&format!(
        "salloc -Q bash -c \"{}\"",
        steps.replace('"', "\\\"")
    ));
    let outputs: Vec<&str> = out.ok().split("==\n").collect();
    assert_eq!(outputs.len(), variants.len() + 1, "{}", out.stderr);
    for (variant, got) in variants.iter().zip(outputs) {
        assert_eq!(got, expected, "srun {variant}: {}", out.stderr);
    }
}

#[test]
fn a_container_name_alone_reuses_the_jobs_container_or_fails_in_one_line() {
    let _m = shared_machine();
    let busybox = img("busybox.sqsh");
    // pyxis' habit: make a named container with an image, then use it by its name alone.
    let out = slurm(&format!(
        "salloc -Q bash -c '\
         srun -n1 --container-name=work cat /etc/state; echo \"first: $?\"; \
         srun -n1 --container-image={busybox} --container-name=work sh -c \"echo made > /etc/state\"; \
         srun -n1 --container-name=work sh -c \"cat /etc/state; echo again >> /etc/state\"; \
         srun -n1 --container-name=work cat /etc/state'"
    ));
    assert_eq!(
        out.ok(),
        "first: 125\nmade\nmade\nagain\n",
        "{}",
        out.stderr
    );
    let lines = step_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("--container-name=work")
            && lines[0].contains("no container of that name"),
        "{}",
        lines[0]
    );
    // An srun that makes its own job cannot have one: refused before the step starts.
    let out = slurm("srun -n1 --container-name=work echo ran");
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(out.stdout, "");
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("--container-name=work"), "{}", lines[0]);
}

#[test]
fn a_failed_save_fails_the_step_and_impossible_targets_are_refused_before_it() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let busybox = img("busybox.sqsh");
    // Targets that can never work: refused by srun, the step never runs.
    std::fs::create_dir(dir.path.join("existing")).unwrap();
    for (target, expected) in [
        ("/tmp/".to_string(), "directory"),
        ("/".to_string(), "directory"),
        ("./".to_string(), "directory"),
        (format!("{d}/existing"), "directory"),
        ("/var/lib/x.sqsh".to_string(), "cannot write into /var/lib"),
    ] {
        let out = slurm(&format!(
            "cd {d} && srun -n1 --container-image={busybox} --container-save={target} echo ran"
        ));
        assert_eq!(out.code, 1, "{target}: {}", out.stderr);
        assert_eq!(out.stdout, "", "{target}: the step must not run");
        let lines = own_lines(&out.stderr);
        assert_eq!(lines.len(), 1, "{target}: {lines:#?}");
        assert!(
            lines[0].contains(&format!("--container-save={target}")) && lines[0].contains(expected),
            "{target}: {}",
            lines[0]
        );
    }
    // A save that fails when the step ends (its directory is gone by then): the step fails
    // with one line, and nothing is left.
    std::fs::create_dir(dir.path.join("gone")).unwrap();
    Command::new("chown")
        .arg(format!("{USER}:"))
        .arg(dir.path.join("gone"))
        .status_within(COMMAND_LIMIT);
    let out = slurm(&format!(
        "srun -n1 --container-image={busybox} --container-mounts={d} \
         --container-save={d}/gone/out.sqsh sh -c 'rmdir {d}/gone && echo ran'"
    ));
    assert_eq!(out.stdout, "ran\n");
    assert_eq!(out.code, 1, "{}", out.stderr);
    // The line saying the save begins, then the error.
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[0].starts_with(&format!(
            "ferry: saving the container to {d}/gone/out.sqsh on "
        )),
        "{}",
        lines[0]
    );
    let lines = &lines[1..];
    assert!(
        lines[0].contains("--container-save") && lines[0].contains(&format!("{d}/gone/out.sqsh")),
        "{}",
        lines[0]
    );
    // The command's own failure stays the step's status, and the save still happens.
    let out = slurm(&format!(
        "srun -n1 --container-image={busybox} --container-save={d}/failed.sqsh \
         sh -c 'echo kept > /etc/kept; exit 3'"
    ));
    assert_eq!(out.code, 3, "{}", out.stderr);
    // Several tasks: the last to end saves, with every task's change in the image.
    let out = slurm(&format!(
        "srun -n2 --container-image={busybox} --container-save={d}/two.sqsh \
         sh -c 'sleep $SLURM_PROCID; touch /etc/task-$SLURM_PROCID'; \
         srun -n1 --container-image={d}/failed.sqsh cat /etc/kept; \
         srun -n1 --container-image={d}/two.sqsh ls /etc | grep task-"
    ));
    assert_eq!(out.ok(), "kept\ntask-0\ntask-1\n", "{}", out.stderr);
    // A step stopped by a signal (scancel, the time limit) is not saved. (Its line saying
    // so may not reach srun, which ends as soon as Slurm tells it of the cancellation.)
    let out = slurm(&format!(
        "srun -n1 -J ferry-save-stopped --container-image={busybox} --container-mounts={d} \
         --container-save={d}/stopped.sqsh sh -c 'touch {d}/started; sleep 60' & \
         until test -e {d}/started; do sleep 0.1; done; rm {d}/started; \
         scancel -s TERM -n ferry-save-stopped; wait $!"
    ));
    assert_ne!(out.code, 0, "{}", out.stderr);
    let names = dir_entries(&d.to_string());
    assert_eq!(names, ["existing", "failed.sqsh", "two.sqsh"], "{names:?}");
}

#[test]
fn invalid_arguments_are_refused_in_srun_with_one_line() {
    let _m = shared_machine();
    let busybox = img("busybox.sqsh");
    let cases = [
        (
            "--container-image=".to_string(),
            "--container-image is empty",
        ),
        (
            format!("--container-image={busybox} --container-mounts=/tmp:"),
            "the container path after `:` is empty",
        ),
        (
            format!("--container-image={busybox} --container-env="),
            "--container-env=: a variable name is empty",
        ),
        (
            format!("--container-image={busybox} --container-env FOO,"),
            "--container-env=FOO,: a variable name is empty",
        ),
        (
            "--container-mounts=/tmp:/x".to_string(),
            "container options without an image",
        ),
        (
            "--container-remap-root".to_string(),
            "container options without an image",
        ),
        (
            "--container-save=/tmp/x.sqsh".to_string(),
            "container options without an image",
        ),
    ];
    for (options, expected) in cases {
        let out = slurm(&format!("srun -n1 {options} echo ran"));
        assert_eq!(out.code, 1, "{options}: {}", out.stderr);
        assert_eq!(out.stdout, "", "{options}: the step must not run");
        let lines = own_lines(&out.stderr);
        assert_eq!(lines.len(), 1, "{options}: {lines:#?}");
        assert!(
            lines[0].contains("ferry") && lines[0].contains(expected),
            "{options}: {}",
            lines[0]
        );
    }
}

#[test]
fn the_sites_writable_default_and_the_read_only_remap_root_line() {
    let _m = exclusive_machine();
    let plugstack = Plugstack::open(&cluster());
    let debian = img("debian.sqsh");
    let apt = "rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*; apt-get -qq update && echo apt works";
    // As today: read-only, and remap-root alone says in one line what is missing.
    let out = slurm(&format!(
        "srun -n1 --container-image={debian} --container-remap-root sh -c '{apt}'"
    ));
    assert_ne!(out.code, 0);
    let ours: Vec<&str> = own_lines(&out.stderr)
        .into_iter()
        .filter(|l| l.contains("ferry: "))
        .collect();
    assert_eq!(ours.len(), 1, "{}", out.stderr);
    assert!(ours[0].contains("--container-writable"), "{}", ours[0]);
    // Chosen read-only: no line.
    let out = slurm(&format!(
        "srun -n1 --container-image={debian} --container-remap-root --container-readonly true"
    ));
    assert_eq!(out.code, 0);
    assert!(!out.stderr.contains("ferry"), "{}", out.stderr);
    // writable=yes: remap-root alone installs, and --container-readonly still wins.
    plugstack.add_args("writable=yes");
    let out = slurm(&format!(
        "srun -n1 --container-image={debian} --container-remap-root sh -c '{apt}'; \
         srun -n1 --container-image={debian} --container-readonly touch /x"
    ));
    assert_eq!(out.stdout, "apt works\n", "{}", out.stderr);
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("--container-writable"),
        "{}",
        out.stderr
    );
}

/// The frameworks' variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, …) in a container
/// step: derived from Slurm; a value the user exported wins; the site can turn them off.
#[test]
fn framework_variables_are_set_unless_the_user_or_the_site_says_otherwise() {
    // Rewrites plugstack.conf.
    let _m = exclusive_machine();
    let busybox = img("busybox.sqsh");
    let print = "sh -c 'echo $RANK/$WORLD_SIZE/$LOCAL_RANK/$LOCAL_WORLD_SIZE/$NODE_RANK/$MASTER_ADDR/$MASTER_PORT'";
    let out = slurm(&format!("srun -n2 --container={busybox} {print} | sort"));
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    let node = sh("sinfo -h -N -o %N").ok().trim().to_string();
    let port = lines[0].rsplit('/').next().unwrap().to_string();
    assert_eq!(lines[0], format!("0/2/0/2/0/{node}/{port}"));
    assert_eq!(lines[1], format!("1/2/1/2/0/{node}/{port}"));
    assert!(
        (29500..=31499).contains(&port.parse::<u16>().unwrap()),
        "{port}"
    );
    // Without a container, nothing is added.
    let bare = slurm(&format!("srun -n1 {print}"));
    assert_eq!(bare.ok(), "//////\n");
    // The user's own values win.
    let own = slurm(&format!(
        "MASTER_ADDR=head MASTER_PORT=12345 srun -n1 --container={busybox} {print}"
    ));
    assert_eq!(own.ok(), "0/1/0/1/0/head/12345\n");
    // The site's range, then the site's no.
    let plugstack = Plugstack::open(&cluster());
    plugstack.add_args("framework_ports=40000-40000");
    let ranged = slurm(&format!("srun -n1 --container={busybox} {print}"));
    assert_eq!(ranged.ok(), format!("0/1/0/1/0/{node}/40000\n"));
    plugstack.add_args("framework_env=no");
    let off = slurm(&format!("srun -n1 --container={busybox} {print}"));
    assert_eq!(off.ok(), "//////\n");
}

// ---- Progress of long waits ------------------------------------------------------------

/// Push `MAKE_CONFIGURED_LAYOUT`'s two-layer image as `ferry/progress-PID-CASE:v1`, with
/// a config of its own (so no cache holds it), and return its reference through a proxy
/// that sends every blob slowly (about 6 s each): the import outlasts the progress
/// interval. The proxy's port is the registry's + 9, which the plugin lists as insecure.
fn slow_cold_image(dir: &UserDir, registry: &str, case: &str) -> (FaultProxy, String) {
    let d = dir.path.join(case);
    std::fs::create_dir(&d).unwrap();
    Command::new("chown")
        .arg(format!("{USER}:"))
        .arg(&d)
        .status_within(COMMAND_LIMIT);
    let d = d.display();
    let repo = format!("ferry/progress-{}-{case}", std::process::id());
    let layout = MAKE_CONFIGURED_LAYOUT.replace("from-config", &format!("from-config-{case}"));
    sh(&format!(
        "cd {d} && {layout}\n skopeo --insecure-policy copy -q --dest-tls-verify=false \
         oci:{d}/layout:v1 docker://{registry}/{repo}:v1"
    ))
    .ok();
    let port: u16 = registry.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = FaultProxy::start_on("slow", -1, "/blobs/", &(port + 9).to_string());
    let reference = format!("docker://127.0.0.1:{}/{repo}:v1", port + 9);
    (proxy, reference)
}

/// The import's lines for `reference` in `text`, in order, checked: the first line, at
/// least one progress line with bytes, rate and estimate, and the final line.
fn assert_import_lines(text: &str, reference: &str) {
    assert!(!text.contains('\r'), "carriage returns in {text:?}");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("ferry:")).collect();
    let first = format!("ferry: importing {reference} on ");
    assert!(
        lines.first().is_some_and(|l| l.starts_with(&first)
            && l.ends_with(" to fetch)")
            && l.contains("(2 layers, ")),
        "no first line {first:?}: {lines:#?}"
    );
    let progress = format!("ferry: importing {reference}: ");
    assert!(
        lines.iter().any(|l| l.starts_with(&progress)
            && l.contains(" of ")
            && l.contains("/s, ")
            && (l.contains(" left") || l.contains("no estimate yet"))),
        "no progress line: {lines:#?}"
    );
    let last = format!("ferry: imported {reference} in ");
    assert!(
        lines
            .last()
            .is_some_and(|l| l.starts_with(&last) && l.ends_with(" squashfs)")),
        "no final line {last:?}: {lines:#?}"
    );
}

#[test]
fn a_cold_import_shows_progress_on_the_terminal_and_in_a_batch_jobs_output() {
    let _m = exclusive_machine();
    let registry = test_registry();
    let dir = UserDir::new(USER);
    let d = dir.path.display().to_string();

    // srun on a real terminal (`script`): what the user sees, stdout and stderr together.
    let (proxy, reference) = slow_cold_image(&dir, &registry, "tty");
    let srun = format!("srun -n1 --container={reference} sh -c \"echo \\$SLURMD_NODENAME\"");
    let out = slurm(&format!("cd {d} && script -qec '{srun}' /dev/null"));
    let screen = out.ok().replace("\r\n", "\n");
    assert_import_lines(&screen, &reference);
    // The node, by Slurm's name for it.
    let node = screen.lines().last().unwrap_or_default();
    assert!(
        !node.is_empty()
            && screen.starts_with(&format!("ferry: importing {reference} on {node} (")),
        "{screen}"
    );
    // Warm: nothing but the command's output.
    let out = slurm(&format!("cd {d} && script -qec '{srun}' /dev/null"));
    assert_eq!(out.ok().replace("\r\n", "\n"), format!("{node}\n"));
    drop(proxy);

    // A batch job: the same lines in its output file, one per update.
    let (proxy, reference) = slow_cold_image(&dir, &registry, "batch");
    slurm(&format!(
        "cd {d} && sbatch --wait -o {d}/batch.out --wrap 'srun -n1 --container={reference} echo ran'"
    ))
    .ok();
    let text = sh(&format!("cat {d}/batch.out")).ok().to_string();
    assert_import_lines(&text, &reference);
    assert!(text.ends_with("ran\n"), "{text}");
    drop(proxy);
}

/// The seconds of a `ferry: saved … in N s (…)` or `… in M min N s (…)` line.
fn seconds_in(line: &str) -> u64 {
    let after = line.rsplit_once(" in ").map_or("", |(_, t)| t);
    let words: Vec<&str> = after.split_whitespace().collect();
    match words[..] {
        [m, "min", s, "s", ..] => m.parse::<u64>().unwrap() * 60 + s.parse::<u64>().unwrap(),
        [s, "s", ..] => s.parse().unwrap(),
        _ => panic!("no time in {line:?}"),
    }
}

#[test]
fn a_save_shows_progress_lines_and_ferry_quiet_only_its_errors() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let busybox = img("busybox.sqsh");
    // About 380 MB of text that compresses slowly: a save that takes a few seconds.
    let out = slurm(&format!(
        "cd {d} && srun -n1 --container={busybox} --container-save={d}/big.sqsh \
         sh -c 'head -c 120000000 /dev/urandom | od -x > /big && echo ran'"
    ));
    assert_eq!(out.ok(), "ran\n", "{}", out.stderr);
    let saved = format!("{d}/big.sqsh");
    assert!(!out.stderr.contains('\r'), "{:?}", out.stderr);
    let lines = own_lines(&out.stderr);
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with(&format!("ferry: saving the container to {saved} on "))),
        "{lines:#?}"
    );
    let end = format!("ferry: saved the container to {saved} in ");
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.starts_with(&end) && last.ends_with(" squashfs)"),
        "{lines:#?}"
    );
    let progress: Vec<&&str> = lines[1..lines.len() - 1].iter().collect();
    // Each line in between is progress: share, bytes written, rate, estimate.
    let prefix = format!("ferry: saving the container to {saved}: ");
    for l in &progress {
        assert!(
            l.starts_with(&prefix) && l.contains(" written, ") && l.contains("/s"),
            "{lines:#?}"
        );
    }
    // A save that outlasted the line interval (2 s) said how far it was at least once.
    if seconds_in(last) > 2 {
        assert!(
            progress
                .iter()
                .any(|l| l.contains("% (") && l.ends_with(" left)")),
            "{lines:#?}"
        );
    }

    // Quiet: no lines at all, but a failed save still says why.
    std::fs::create_dir(dir.path.join("gone")).unwrap();
    Command::new("chown")
        .arg(format!("{USER}:"))
        .arg(dir.path.join("gone"))
        .status_within(COMMAND_LIMIT);
    let out = slurm(&format!(
        "cd {d} && FERRY_QUIET=1 srun -n1 --container={busybox} --container-save={d}/quiet.sqsh \
         sh -c 'head -c 100000000 /dev/urandom > /big && echo ran'"
    ));
    assert_eq!(out.ok(), "ran\n");
    assert_eq!(own_lines(&out.stderr), Vec::<&str>::new(), "{}", out.stderr);
    let out = slurm(&format!(
        "FERRY_QUIET=1 srun -n1 --container-image={busybox} --container-mounts={d} \
         --container-save={d}/gone/out.sqsh sh -c 'rmdir {d}/gone && echo ran'"
    ));
    assert_eq!(out.stdout, "ran\n");
    assert_eq!(out.code, 1, "{}", out.stderr);
    let lines = own_lines(&out.stderr);
    assert!(
        lines.len() == 1 && lines[0].contains(&format!("{d}/gone/out.sqsh")),
        "{lines:#?}"
    );
}

/// The lines of a cold unpack of `image` under the `unpack` provider, in `text` (a terminal's
/// screen or a batch job's output): the first at once naming image and node, progress lines
/// with bytes written and rate (at least one when it took longer than the 2 s interval),
/// and the last with its time; no carriage returns.
fn assert_unpack_lines(text: &str, image: &str) {
    assert!(!text.contains('\r'), "carriage returns in {text:?}");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("ferry:")).collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with(&format!("ferry: unpacking {image} on "))
                && l.ends_with(" image)")),
        "no first line: {lines:#?}"
    );
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.starts_with(&format!("ferry: unpacked {image} in ")) && last.ends_with(" written)"),
        "no final line: {lines:#?}"
    );
    let progress = &lines[1..lines.len() - 1];
    let prefix = format!("ferry: unpacking {image}: ");
    for l in progress {
        assert!(
            l.starts_with(&prefix) && l.contains(" written, ") && l.contains("/s"),
            "{lines:#?}"
        );
    }
    if seconds_in(last) > 2 {
        assert!(!progress.is_empty(), "no progress line: {lines:#?}");
    }
}

#[test]
fn a_cold_unpack_shows_progress_on_the_terminal_and_in_a_batch_jobs_output() {
    let _m = exclusive_machine();
    let plugstack = Plugstack::open(&cluster());
    let dir = UserDir::new(USER);
    let d = dir.path.display().to_string();
    // Big enough that its unpack takes a few seconds.
    let mpi = img("mpi.sqsh");
    // Node-local directories for the users' unpacked trees, one per cold start.
    let trees = tempfile::Builder::new()
        .prefix("ferry-unpack-progress-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let cold = |name: &str| {
        let place = trees.path().join(name);
        std::fs::create_dir(&place).unwrap();
        Command::new("chmod")
            .arg("1777")
            .arg(&place)
            .status_within(COMMAND_LIMIT);
        plugstack.set_args(&format!("named_dir={}", place.display()));
    };

    // srun on a real terminal (`script`): what the user sees, stdout and stderr together.
    cold("tty");
    let srun = format!(
        "srun -n1 --container-rootfs=unpack --container-image={mpi} sh -c \"echo \\$SLURMD_NODENAME\""
    );
    let out = slurm(&format!("cd {d} && script -qec '{srun}' /dev/null"));
    let screen = out.ok().replace("\r\n", "\n");
    assert_unpack_lines(&screen, &mpi);
    let node = screen.lines().last().unwrap_or_default();
    assert!(
        !node.is_empty() && screen.starts_with(&format!("ferry: unpacking {mpi} on {node} (")),
        "{screen}"
    );
    // Warm: nothing but the command's output.
    let out = slurm(&format!("cd {d} && script -qec '{srun}' /dev/null"));
    assert_eq!(out.ok().replace("\r\n", "\n"), format!("{node}\n"));

    // A batch job: the same lines in its output file.
    cold("batch");
    slurm(&format!(
        "cd {d} && sbatch --wait -o {d}/batch.out --wrap \
         'srun -n1 --container-rootfs=unpack --container-image={mpi} echo ran'"
    ))
    .ok();
    let text = sh(&format!("cat {d}/batch.out")).ok().to_string();
    assert_unpack_lines(&text, &mpi);
    assert!(text.ends_with("ran\n"), "{text}");

    // Quiet: the unpack happens, nothing is said.
    cold("quiet");
    let out = slurm(&format!(
        "cd {d} && FERRY_QUIET=1 srun -n1 --container-rootfs=unpack --container-image={mpi} echo ran"
    ));
    assert_eq!(out.ok(), "ran\n");
    assert_eq!(own_lines(&out.stderr), Vec::<&str>::new(), "{}", out.stderr);

    // Another unpack of the same image under way (here the test's own, holding the unpack
    // lock until the step says it waits): the step says so, then unpacks once it may.
    cold("wait");
    let key = ferry::rootfs::unpacked::unpack_key(&std::fs::metadata(&mpi).unwrap());
    let tree = trees
        .path()
        .join("wait")
        .join(ferry::rootfs::user_dir::name(uid_of(USER)))
        .join("unpacked")
        .join(key);
    let tree = tree.display();
    let out = slurm(&format!(
        "cd {d} && umask 077 && mkdir -p {tree} && \
         (flock {tree}/.unpack.lock sh -c 'touch {d}/held; \
           for i in $(seq 600); do [ -e {d}/release ] && break; sleep 0.1; done' &); \
         for i in $(seq 100); do [ -e {d}/held ] && break; sleep 0.1; done; \
         srun -n1 --container-rootfs=unpack --container-image={mpi} echo ran 2>{d}/wait.err & \
         for i in $(seq 600); do grep -q waiting {d}/wait.err && break; sleep 0.1; done; \
         touch {d}/release; wait"
    ));
    assert_eq!(out.ok(), "ran\n", "{}", out.stderr);
    let text = sh(&format!("cat {d}/wait.err")).ok().to_string();
    // Only ferry's lines: srun adds its own while the job waits for resources.
    let text: String = text
        .lines()
        .filter(|l| l.starts_with("ferry:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let (first, rest) = text.split_once('\n').unwrap_or_default();
    assert!(
        first.starts_with("ferry: waiting on ")
            && first.ends_with(&format!(" for another step's unpack of {mpi}")),
        "{text}"
    );
    assert_unpack_lines(rest, &mpi);
    drop(plugstack);
    // The trees belong to the user; clean them as root (the test made the directory).
    let _ = Command::new("chmod")
        .args(["-R", "u+rwX"])
        .arg(trees.path())
        .status_within(COMMAND_LIMIT);
}

#[test]
fn ferry_quiet_and_container_quiet_silence_progress_but_not_errors() {
    let _m = exclusive_machine();
    let registry = test_registry();
    let dir = UserDir::new(USER);
    let d = dir.path.display().to_string();
    let (proxy, reference) = slow_cold_image(&dir, &registry, "env");
    let out = slurm(&format!(
        "cd {d} && FERRY_QUIET=1 script -qec 'srun -n1 --container={reference} echo ran' /dev/null"
    ));
    assert_eq!(out.ok().replace("\r\n", "\n"), "ran\n");
    drop(proxy);
    let (proxy, reference) = slow_cold_image(&dir, &registry, "option");
    let out = slurm(&format!(
        "cd {d} && script -qec 'srun -n1 --container-quiet --container={reference} echo ran' /dev/null"
    ));
    assert_eq!(out.ok().replace("\r\n", "\n"), "ran\n");
    drop(proxy);
    // The site's default.
    let plugstack = Plugstack::open(&cluster());
    plugstack.add_args("quiet=yes");
    let (proxy, reference) = slow_cold_image(&dir, &registry, "site");
    let out = slurm(&format!(
        "cd {d} && script -qec 'srun -n1 --container={reference} echo ran' /dev/null"
    ));
    assert_eq!(out.ok().replace("\r\n", "\n"), "ran\n");
    drop(plugstack);
    // Errors still show.
    let missing = reference.replace(":v1", ":no-such-tag");
    let out = slurm(&format!(
        "cd {d} && FERRY_QUIET=1 srun -n1 --container-quiet --container={missing} echo ran"
    ));
    assert_ne!(out.code, 0);
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("no such image or tag"), "{}", lines[0]);
    drop(proxy);
}

#[test]
fn a_step_waiting_for_another_steps_import_of_its_image_says_so() {
    let _m = exclusive_machine();
    let registry = test_registry();
    let dir = UserDir::new(USER);
    let d = dir.path.display().to_string();
    let (proxy, reference) = slow_cold_image(&dir, &registry, "wait");
    let script = format!("cd {d} && srun -n1 --container={reference} echo first");
    let first = std::thread::spawn(move || slurm(&script));
    // The first step holds the digest's lock before it asks for a blob.
    let start = Instant::now();
    while !proxy
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("/blobs/"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no blob asked for"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let second = slurm(&format!(
        "cd {d} && srun -n1 --container={reference} echo second"
    ));
    assert_eq!(second.ok(), "second\n", "{}", second.stderr);
    let lines = own_lines(&second.stderr);
    assert!(
        lines.len() == 2
            && lines[0].starts_with(&format!(
                "ferry: waiting for another import of {reference} (sha256:"
            ))
            && lines[1]
                == format!(
                    "ferry: {reference} was imported meanwhile (by another step or node); using it"
                ),
        "{lines:#?}"
    );
    let first = first.join().unwrap();
    assert_eq!(first.ok(), "first\n", "{}", first.stderr);
    assert_import_lines(&first.stderr, &reference);
    drop(proxy);
}

#[test]
fn import_on_submit_draws_a_bar_on_a_terminal_and_writes_lines_elsewhere() {
    let _m = exclusive_machine();
    let registry = test_registry();
    let dir = UserDir::new(USER);
    let d = dir.path.display().to_string();
    let plugstack = Plugstack::open(&cluster());
    plugstack.add_args("import_on_submit=yes");

    let (proxy, reference) = slow_cold_image(&dir, &registry, "submit-tty");
    let out = slurm(&format!(
        "cd {d} && TERM=xterm script -qec 'srun -n1 --container={reference} echo ran' /dev/null"
    ));
    let screen = out.ok().to_string();
    assert!(
        screen.contains(&format!("ferry: importing {reference} on ")),
        "{screen:?}"
    );
    // indicatif's bar: redrawn in place.
    assert!(
        screen.contains(&format!("pulling {reference} [")) && screen.contains("\x1b[2K"),
        "no bar: {screen:?}"
    );
    assert!(
        screen.contains(&format!("ferry: imported {reference} in ")),
        "{screen:?}"
    );
    // The step finds the image imported: it says nothing.
    assert!(screen.ends_with("ran\r\n"), "{screen:?}");
    drop(proxy);

    let (proxy, reference) = slow_cold_image(&dir, &registry, "submit-file");
    let out = slurm(&format!(
        "cd {d} && srun -n1 --container={reference} echo ran"
    ));
    assert_eq!(out.ok(), "ran\n", "{}", out.stderr);
    assert_import_lines(&out.stderr, &reference);
    drop(proxy);
}

#[test]
fn pyxis_variables_set_the_options_and_the_command_line_wins() {
    let _m = shared_machine();
    let debian = img("debian.sqsh");
    let busybox = img("busybox.sqsh");
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    sh_as(USER, &format!("echo from-the-host > {d}/note")).ok();
    let marker = |env: &str, options: &str| {
        slurm(&format!("{env} srun -n1 {options} cat /etc/ferry-marker"))
            .ok()
            .trim()
            .to_string()
    };
    assert_eq!(
        marker(&format!("PYXIS_CONTAINER_IMAGE={debian}"), ""),
        "debian-image"
    );
    assert_eq!(
        marker(
            &format!("PYXIS_CONTAINER_IMAGE={debian}"),
            &format!("--container-image={busybox}")
        ),
        "busybox-image",
        "the command line wins"
    );
    assert_eq!(
        marker(
            &format!("PYXIS_CONTAINER_IMAGE={debian} FERRY_CONTAINER_IMAGE={busybox}"),
            ""
        ),
        "busybox-image",
        "ferry's variable wins over pyxis'"
    );
    // Values and flags (1/0), as pyxis users export them.
    let out = slurm(&format!(
        "PYXIS_CONTAINER_IMAGE={busybox} PYXIS_CONTAINER_MOUNTS={d}:/data \
         PYXIS_CONTAINER_WORKDIR=/data PYXIS_CONTAINER_REMAP_ROOT=1 \
         srun -n1 sh -c 'id -u; pwd; cat note'"
    ));
    assert_eq!(out.ok(), "0\n/data\nfrom-the-host\n");
    let out = slurm(&format!(
        "PYXIS_CONTAINER_IMAGE={busybox} PYXIS_CONTAINER_REMAP_ROOT=1 \
         srun -n1 --no-container-remap-root id -u"
    ));
    assert_eq!(out.ok().trim(), uid_of(USER).to_string());
    // Variables alone ask for nothing: a plain srun stays on the host.
    let out = slurm(&format!(
        "PYXIS_CONTAINER_MOUNTS={d}:/data PYXIS_CONTAINER_REMAP_ROOT=1 srun -n1 id -u"
    ));
    assert_eq!(out.ok().trim(), uid_of(USER).to_string());
    // A bad flag value is one line, and the step does not run.
    let out = slurm(&format!(
        "PYXIS_CONTAINER_IMAGE={busybox} PYXIS_CONTAINER_WRITABLE=maybe srun -n1 echo ran"
    ));
    assert_ne!(out.code, 0);
    assert_eq!(out.stdout, "");
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("PYXIS_CONTAINER_WRITABLE=\"maybe\": write 1 or 0"),
        "{}",
        lines[0]
    );
}

/// pyxis habits around paths: a relative --container-workdir is taken from the container's
/// `/` (`../` is `/`), a missing one is one line naming it; pyxis' mount flags (`+`-joined
/// `unbindable`, `noexec`), tmpfs mounts, and a relative container path refused.
#[test]
fn pyxis_workdir_and_mount_flags() {
    let _m = shared_machine();
    let debian = img("debian.sqsh");
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    sh_as(
        USER,
        &format!("mkdir {d}/data && printf '#!/bin/sh\\necho ran\\n' > {d}/data/run && chmod +x {d}/data/run"),
    )
    .ok();
    let out = slurm(&format!(
        "srun -n1 --container-image={debian} --container-workdir=../ pwd; \
         srun -n1 --container-image={debian} --container-workdir=usr/../etc pwd"
    ));
    assert_eq!(out.ok(), "/\n/etc\n");
    let out = slurm(&format!(
        "srun -n1 --container-image={debian} --container-workdir=/pyxis true"
    ));
    assert_ne!(out.code, 0);
    let lines = own_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("/pyxis"), "{}", lines[0]);

    // unbindable+ro: read-only, and unbindable as findmnt shows it.
    let out = slurm(&format!(
        "srun -n1 --container-image={debian} --container-mounts={d}/data:/mnt:unbindable+ro \
         sh -c 'findmnt -n -o PROPAGATION /mnt; touch /mnt/x'"
    ));
    assert_ne!(out.code, 0);
    assert!(
        out.stdout.contains("unbindable"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );
    // noexec: the same script runs from a plain mount, not from a noexec one.
    let out = slurm(&format!(
        "srun -n1 --container-image={debian} --container-mounts={d}/data:/a,{d}/data:/b:noexec \
         sh -c '/a/run; /b/run || echo refused'"
    ));
    assert_eq!(out.stdout, "ran\nrefused\n", "{}", out.stderr);
    assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
    // A tmpfs of the asked size, writable in a read-only container, gone with the step.
    let out = slurm(&format!(
        "srun -n1 --container-image={debian} --container-mounts=tmpfs:/scratch:size=8m+mode=1777 \
         sh -c 'findmnt -n -o FSTYPE,OPTIONS /scratch; echo kept > /scratch/f && cat /scratch/f; \
         stat -c %a /scratch'"
    ));
    let text = out.ok();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("tmpfs") && lines[0].contains("size=8192k"),
        "{text}"
    );
    assert_eq!(lines[1..], ["kept", "1777"], "{text}");
    // pyxis' escape attempt: a relative place inside is refused in srun, in one line.
    for spec in ["/home:../home", "tmpfs"] {
        let out = slurm(&format!(
            "srun -n1 --container-image={debian} --container-mounts={spec} true"
        ));
        assert_ne!(out.code, 0, "{spec}");
        let lines = own_lines(&out.stderr);
        assert_eq!(lines.len(), 1, "{spec}: {lines:#?}");
        assert!(lines[0].contains(spec), "{}", lines[0]);
    }
}

/// With --container-remap-root the home directory is at /root (as in pyxis and enroot),
/// and the task's $HOME decides which directory that is; srun's directory below it
/// follows it there.
#[test]
fn remap_root_mounts_the_tasks_home_at_root() {
    let _m = shared_machine();
    let debian = img("debian.sqsh");
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    sh_as(USER, &format!("mkdir {d}/proj && echo mine > {d}/note")).ok();
    let out = slurm(&format!(
        "cd {d}/proj && HOME={d} srun -n1 --container-image={debian} --container-remap-root \
         sh -c 'echo $HOME; pwd; cat /root/note; getent passwd root | cut -d: -f6; id -u'"
    ));
    assert_eq!(out.ok(), "/root\n/root/proj\nmine\n/root\n0\n");
    // Without remap-root: the same $HOME at its own path, the user's own uid.
    let out = slurm(&format!(
        "cd {d}/proj && HOME={d} srun -n1 --container-image={debian} \
         sh -c 'echo $HOME; pwd; cat {d}/note; test -e /root/note || echo no-root-note'"
    ));
    assert_eq!(out.ok(), format!("{d}\n{d}/proj\nmine\nno-root-note\n"));
}

/// A host locale the image lacks is not passed in (perl, python and bash would warn at
/// every start): the image's C.UTF-8 stands in, unless --container-env passes it on.
#[test]
fn host_locales_the_image_lacks_fall_back_to_c_utf8() {
    let _m = shared_machine();
    let debian = img("debian.sqsh");
    let locale = "LANG=en_US.UTF-8 LC_ALL=en_US.UTF-8 LC_TIME=C";
    let out = slurm(&format!(
        "{locale} srun -n1 --container-image={debian} \
         sh -c 'echo $LANG $LC_ALL $LC_TIME; perl -e \"print qq(perl ok\\n)\"'"
    ));
    assert_eq!(out.stdout, "C.UTF-8 C.UTF-8 C\nperl ok\n", "{}", out.stderr);
    assert!(!out.stderr.contains("locale"), "{}", out.stderr);
    let out = slurm(&format!(
        "{locale} srun -n1 --container-image={debian} --container-env=LANG,LC_ALL \
         sh -c 'echo $LANG $LC_ALL; perl -e 1'"
    ));
    assert_eq!(out.stdout, "en_US.UTF-8 en_US.UTF-8\n", "{}", out.stderr);
    assert!(
        out.stderr.contains("perl: warning: Setting locale failed"),
        "{}",
        out.stderr
    );
}

/// `default_workdir=image`: tasks start in the image's WorkingDir, as in pyxis; the
/// default keeps srun's directory; --container-workdir wins over both.
#[test]
fn the_sites_default_workdir_image_starts_tasks_in_the_images_workdir() {
    let _m = exclusive_machine();
    let plugstack = Plugstack::open(&cluster());
    let dir = UserDir::new(USER);
    let (image, _) = debian_variant(
        &dir,
        "ws",
        "mkdir -p workspace etc/ferry && echo '{\"working_dir\":\"/workspace\"}' > etc/ferry/image.json",
    );
    // srun runs from /tmp, which containers have (the host's).
    let run = |options: &str| {
        slurm(&format!(
            "cd /tmp && srun -n1 --container-image={image} {options} pwd"
        ))
        .ok()
        .trim()
        .to_string()
    };
    assert_eq!(run(""), "/tmp", "srun's directory by default");
    plugstack.add_args("default_workdir=image");
    assert_eq!(run(""), "/workspace");
    assert_eq!(run("--container-workdir=/etc"), "/etc");
}

// ---- checkpoints: --container-checkpoint, --container-restore ------------------------------
// (Real checkpoints need CRIU 4: tests/checkpoint.rs, in the Debian 13 stage.)

/// A node without /etc/ferry/checkpoint.conf (this machine's: checkpoints are the site's
/// choice, and its CRIU 3.17 could not make them) refuses both options before the task runs,
/// in one line that says what the admin must enable; options that make no sense together,
/// and checkpoint signals ferry cannot take, are refused by srun.
#[test]
fn container_checkpoint_and_restore_are_refused_in_one_line_where_the_site_has_not_enabled_them() {
    let _m = shared_machine();
    assert!(
        !Path::new("/etc/ferry/checkpoint.conf").exists(),
        "this test needs a node without /etc/ferry/checkpoint.conf"
    );
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let busybox = img("busybox.sqsh");
    for options in [
        format!("--container-image={busybox} --container-checkpoint=ck"),
        format!("--container-restore={d}/ck"),
    ] {
        let out = slurm(&format!("cd {d} && srun -n1 {options} echo ran"));
        assert_ne!(out.code, 0, "{options}: {}", out.stderr);
        assert_eq!(out.stdout, "", "{options}: the task must not run");
        let lines = own_lines(&out.stderr);
        assert_eq!(lines.len(), 1, "{options}: {lines:#?}");
        assert!(
            lines[0].contains("checkpoints are not enabled on this machine")
                && lines[0].contains("`enabled=yes` in /etc/ferry/checkpoint.conf"),
            "{options}: {}",
            lines[0]
        );
        assert!(!dir.path.join("ck").exists(), "{options}: nothing is made");
    }
    for (options, expected) in [
        (
            format!("--container-image={busybox} --container-checkpoint=ck --container-name=w"),
            "--container-checkpoint cannot be combined with --container-name",
        ),
        (
            format!(
                "--container-image={busybox} --container-checkpoint=ck --container-save=s.sqsh"
            ),
            "--container-checkpoint cannot be combined with --container-save",
        ),
        (
            "--container-checkpoint=ck --container-restore=ck".to_string(),
            "--container-checkpoint cannot be combined with --container-restore",
        ),
        (
            format!("--container-image={busybox} --container-checkpoint="),
            "--container-checkpoint is empty",
        ),
        (
            format!("--container-image={busybox} --container-checkpoint=ck --container-checkpoint-signal=STOP"),
            "--container-checkpoint-signal: `STOP` cannot be the checkpoint signal: choose one of USR1",
        ),
        (
            format!("--container-image={busybox} --container-checkpoint-signal=USR2"),
            "--container-checkpoint-signal needs --container-checkpoint",
        ),
    ] {
        let out = slurm(&format!("cd {d} && srun -n1 {options} echo ran"));
        assert_eq!(out.code, 1, "{options}: {}", out.stderr);
        assert_eq!(out.stdout, "", "{options}: the step must not run");
        let lines = own_lines(&out.stderr);
        assert_eq!(lines.len(), 1, "{options}: {lines:#?}");
        assert!(lines[0].contains(expected), "{options}: {}", lines[0]);
    }
    // Refused on the node whatever the site says: GPUs.
    let options = format!("-n1 --gres=gpu:1 --container-image={busybox} --container-checkpoint=ck");
    let out = slurm(&format!("cd {d} && srun {options} echo ran"));
    assert_ne!(out.code, 0, "{options}: {}", out.stderr);
    assert_eq!(out.stdout, "", "{options}: the tasks must not run");
    let lines: Vec<&str> = own_lines(&out.stderr)
        .into_iter()
        .filter(|l| l.contains("ferry"))
        .collect();
    assert_eq!(lines.len(), 1, "{options}: {}", out.stderr);
    assert!(
        lines[0].contains("--container-checkpoint: a step with GPUs cannot be checkpointed"),
        "{options}: {}",
        lines[0]
    );
    assert!(!dir.path.join("ck").exists(), "{options}: nothing is made");
}

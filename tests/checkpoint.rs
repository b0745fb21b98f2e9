//! Checkpoint and restore of `ferry run` containers with CRIU, as the unprivileged test
//! user. Not part of the host's `cargo test`: Debian 12's CRIU 3.17 cannot run on current
//! kernels (docs/bench/criu-evidence.txt), so this binary runs in the Debian 13 stage
//! (`integration/slurm-stage trixie`, with CRIU 4.1 and checkpoints enabled), where a
//! missing CRIU or site switch fails it in one line. Run it by name:
//! `cargo test --release -p ferry-tests --test checkpoint`. The Slurm test needs a cluster
//! of two nodes, as FERRY_MULTI_SLURM_CONF (the stage starts one).

use std::process::Command;
use std::time::Duration;

use ferry_tests::*;

fn img(name: &str) -> String {
    image(name).display().to_string()
}

/// A counter that lives only in a shell variable, checkpointed with `ferry checkpoint`
/// (its `ferry run` then ends), continues after `ferry restore` from the value it had.
/// Needs CRIU 4 and the site's `enabled=yes` in /etc/ferry/checkpoint.conf (the trixie
/// stage has both); where they are missing `ferry run --checkpoint-dir` refuses, and this
/// fails with that line.
#[test]
fn a_checkpointed_counter_continues_from_its_value_after_restore() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let out = sh(&format!(
        r#"cd {d}
        # Whatever fails, nothing started here outlives the test.
        trap 'kill $run $restored 2>/dev/null; wait' EXIT
        $FERRY run --checkpoint-dir {d}/ck {busybox} -- sh -c 'i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done' > run.out 2> run.err &
        run=$!
        counted() {{ for n in $(seq 1200); do [ "$(wc -l < "$1")" -ge "$2" ] && return 0; kill -0 "$3" 2>/dev/null || return 1; sleep 0.1; done; return 1; }}
        counted run.out 5 $run || {{ echo "ferry run did not count to 5: $(cat run.err)"; exit 1; }}
        $FERRY checkpoint {d}/ck 2> checkpoint.err || {{ echo "ferry checkpoint failed: $(cat checkpoint.err)"; exit 1; }}
        wait $run; echo "run exit $?"
        echo "run said: $(cat run.err)"
        echo "last before: $(tail -n 1 run.out)"
        $FERRY restore {d}/ck > restore.out 2> restore.err &
        restored=$!
        counted restore.out 3 $restored || {{ echo "ferry restore did not count on: $(cat restore.err)"; exit 1; }}
        $FERRY checkpoint {d}/ck 2> checkpoint2.err || {{ echo "second checkpoint failed: $(cat checkpoint2.err)"; exit 1; }}
        wait $restored; echo "restore exit $?"
        echo "first after: $(head -n 1 restore.out)"
        "#,
        busybox = img("busybox.sqsh"),
    ))
    .ok()
    .to_string();
    let field = |name: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no `{name}` in:\n{out}"))
            .trim()
            .to_string()
    };
    assert_eq!(field("run exit"), "0", "{out}");
    assert!(
        field("run said:").starts_with("ferry: checkpointed the container to "),
        "{out}"
    );
    assert_eq!(field("restore exit"), "0", "{out}");
    let before: u64 = field("last before:").parse().expect("a number");
    let after: u64 = field("first after:").parse().expect("a number");
    assert!(before >= 5, "{out}");
    assert_eq!(
        after,
        before + 1,
        "the counter must go on from its value: {out}"
    );
    assert!(
        leftovers_after(USER, Duration::from_secs(10)).is_empty(),
        "processes left: {:?}",
        leftovers_after(USER, Duration::from_secs(1))
    );
}

/// The two-node cluster's slurm.conf and its node names, after checking that both answer.
fn two_node_cluster() -> (String, Vec<String>) {
    let conf = match std::env::var("FERRY_MULTI_SLURM_CONF") {
        Ok(c) if !c.is_empty() => c,
        _ => panic!(
            "FERRY_MULTI_SLURM_CONF is not set: this test needs a cluster of two nodes \
             (integration/slurm-stage trixie test starts one)"
        ),
    };
    let out = Command::new("sinfo")
        .args(["-h", "-N", "-o", "%N"])
        .env("SLURM_CONF", &conf)
        .output_within(COMMAND_LIMIT);
    let nodes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert!(
        out.status.success() && nodes.len() >= 2,
        "the cluster of FERRY_MULTI_SLURM_CONF={conf} does not answer with two nodes: {nodes:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (conf, nodes)
}

/// `srun --container-checkpoint=DIR` runs a counter that lives only in a shell variable;
/// `scancel --signal=USR1 JOB.STEP` checkpoints it into DIR, and the step ends with exit 0
/// and one line saying how to continue; a new job's `srun --container-restore=DIR` on the
/// other node continues the counter from its value (and is checkpointed again the same way).
#[test]
fn a_step_checkpointed_at_usr1_continues_in_a_new_job_on_another_node() {
    let _m = shared_machine();
    let (conf, nodes) = two_node_cluster();
    let (first, second) = (&nodes[0], &nodes[1]);
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let tag = d.to_string().rsplit('/').next().unwrap_or("ck").to_string();
    let out = sh(&format!(
        r#"export SLURM_CONF={conf}
        cd {d}
        # Whatever fails, no job of this test outlives it.
        trap 'scancel -n ck-run-{tag} 2>/dev/null; scancel -n ck-restore-{tag} 2>/dev/null; wait' EXIT
        counted() {{ for n in $(seq 1200); do [ "$(wc -l < "$1")" -ge "$2" ] && return 0; kill -0 "$3" 2>/dev/null || return 1; sleep 0.1; done; return 1; }}
        job_of() {{ for n in $(seq 100); do j=$(squeue -h -n "$1" -o %i); [ -n "$j" ] && {{ echo "$j"; return 0; }}; sleep 0.1; done; return 1; }}
        srun -J ck-run-{tag} -w {first} -n1 --container-image={busybox} --container-checkpoint={d}/ck \
          sh -c 'i=0; while :; do i=$((i+1)); echo "$i $(hostname)"; sleep 0.1; done' > run.out 2> run.err &
        run=$!
        counted run.out 5 $run || {{ echo "the step did not count to 5: $(cat run.err)"; exit 1; }}
        job=$(job_of ck-run-{tag}) || {{ echo "no job ck-run-{tag}"; exit 1; }}
        scancel --signal=USR1 "$job.0" || exit 1
        wait $run; echo "run exit $?"
        echo "run said: $(grep -v '^srun: ' run.err | tr '\n' '|')"
        echo "last before: $(tail -n 1 run.out)"
        srun -J ck-restore-{tag} -w {second} -n1 --container-restore={d}/ck true > restore.out 2> restore.err &
        restored=$!
        counted restore.out 3 $restored || {{ echo "the restore did not count on: $(cat restore.err)"; exit 1; }}
        job=$(job_of ck-restore-{tag}) || {{ echo "no job ck-restore-{tag}"; exit 1; }}
        scancel --signal=USR1 "$job.0" || exit 1
        wait $restored; echo "restore exit $?"
        echo "restore said: $(grep -v '^srun: ' restore.err | tr '\n' '|')"
        echo "first after: $(head -n 1 restore.out)"
        "#,
        busybox = img("busybox.sqsh"),
    ))
    .ok()
    .to_string();
    let field = |name: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no `{name}` in:\n{out}"))
            .trim()
            .to_string()
    };
    assert_eq!(field("run exit"), "0", "{out}");
    let said = field("run said:");
    assert!(
        said.starts_with(&format!("ferry: checkpointed the container to {d}/ck ("))
            && said.ends_with(&format!(
                "continue it with `srun --container-restore={d}/ck ...`|"
            )),
        "one line, how to continue: {out}"
    );
    assert_eq!(field("restore exit"), "0", "{out}");
    let (before, before_node) = field("last before:")
        .split_once(' ')
        .map(|(n, h)| (n.parse::<u64>().expect("a number"), h.to_string()))
        .expect("COUNT HOST");
    let (after, after_node) = field("first after:")
        .split_once(' ')
        .map(|(n, h)| (n.parse::<u64>().expect("a number"), h.to_string()))
        .expect("COUNT HOST");
    assert!(before >= 5, "{out}");
    assert_eq!(&before_node, first, "{out}");
    assert_eq!(&after_node, second, "restored on the other node: {out}");
    assert_eq!(
        after,
        before + 1,
        "the counter must go on from its value: {out}"
    );
    assert!(
        leftovers_after(USER, Duration::from_secs(10)).is_empty(),
        "processes left: {:?}",
        leftovers_after(USER, Duration::from_secs(1))
    );
}

/// Where checkpoints are enabled, what cannot be checkpointed is still refused in one line
/// before the task runs: two tasks on a node, a directory that holds a checkpoint already,
/// a directory of another user's; and nothing runs.
#[test]
fn checkpoint_steps_that_cannot_work_are_refused_in_one_line() {
    let _m = shared_machine();
    let (conf, nodes) = two_node_cluster();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let busybox = img("busybox.sqsh");
    let node = &nodes[0];
    sh(&format!(
        "mkdir {d}/held && echo {{}} > {d}/held/container.json"
    ))
    .ok();
    // /var/tmp is root's: not the user's directory.
    for (options, expected) in [
        (
            format!("-n2 --ntasks-per-node=2 --container-image={busybox} --container-checkpoint={d}/two"),
            "--container-checkpoint runs one task per node, and this step has 2 here",
        ),
        (
            format!("-n1 --container-image={busybox} --container-checkpoint={d}/held"),
            "holds a checkpoint already: continue it with --container-restore=",
        ),
        (
            format!("-n1 --container-image={busybox} --container-checkpoint=/var/tmp"),
            "--container-checkpoint=/var/tmp: /var/tmp belongs to uid 0, not to you",
        ),
        (
            format!("-n1 --container-restore={d}/none"),
            "no checkpoint there",
        ),
    ] {
        let out = sh(&format!(
            "export SLURM_CONF={conf}; cd {d} && srun -w {node} {options} echo ran"
        ));
        assert_ne!(out.code, 0, "{options}: {}", out.stderr);
        assert_eq!(out.stdout, "", "{options}: the task must not run");
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.contains("ferry"))
            .collect();
        assert_eq!(lines.len(), 1, "{options}: {}", out.stderr);
        assert!(lines[0].contains(expected), "{options}: {}", lines[0]);
    }
    assert!(!dir.path.join("two").exists());
}

/// Before the time limit: `sbatch --signal=USR1@50` (no `B:`: the job's steps get it, not
/// the script) checkpoints the job's `--container-checkpoint` step, which ends with exit 0,
/// so the script goes on (here: says so) well before its one-minute limit.
#[test]
fn a_jobs_signal_before_its_time_limit_checkpoints_its_step() {
    // Alone: its job runs for half a minute, and the other tests look for processes left.
    let _m = exclusive_machine();
    let (conf, nodes) = two_node_cluster();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let tag = d.to_string().rsplit('/').next().unwrap_or("ck").to_string();
    let out = sh(&format!(
        r#"export SLURM_CONF={conf}
        cd {d}
        trap 'scancel -n ck-limit-{tag} 2>/dev/null' EXIT
        cat > job.sh <<'SCRIPT'
#!/bin/sh
srun -n1 --container-image={busybox} --container-checkpoint={d}/ck \
  sh -c 'i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done' > counted.out
echo "step exit $?"
SCRIPT
        job=$(sbatch --parsable -J ck-limit-{tag} -w {node} -n1 --time=1 --signal=USR1@50 -o {d}/job.out job.sh) || exit 1
        for n in $(seq 1500); do [ -z "$(squeue -h -j "$job" 2>/dev/null)" ] && break; sleep 0.1; done
        echo "job said: $(grep -v '^srun: ' job.out | tr '\n' '|')"
        echo "checkpoint: $(cat {d}/ck/checkpointed 2>/dev/null)"
        echo "counted: $(wc -l < counted.out)"
        "#,
        busybox = img("busybox.sqsh"),
        node = nodes[0],
    ))
    .ok()
    .to_string();
    let field = |name: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no `{name}` in:\n{out}"))
            .trim()
            .to_string()
    };
    let said = field("job said:");
    assert!(
        said.contains(&format!("ferry: checkpointed the container to {d}/ck ("))
            && said.ends_with("step exit 0|"),
        "the step is checkpointed and ends with 0, the script goes on: {out}"
    );
    assert!(!field("checkpoint:").is_empty(), "{out}");
    assert!(field("counted:").parse::<u64>().unwrap_or(0) > 0, "{out}");
}

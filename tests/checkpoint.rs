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

/// The rest of the line of `out` that starts with `name`.
fn field_of(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no `{name}` in:\n{out}"))
        .trim()
        .to_string()
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
    let field = |name: &str| field_of(&out, name);
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
    let field = |name: &str| field_of(&out, name);
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
/// before the task runs: a step on two nodes, a signal ferry cannot take, a signal without
/// a checkpoint, a directory that holds a checkpoint already, a directory of another
/// user's; and nothing runs.
#[test]
fn checkpoint_steps_that_cannot_work_are_refused_in_one_line() {
    let _m = shared_machine();
    let (conf, nodes) = two_node_cluster();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let busybox = img("busybox.sqsh");
    let node = &nodes[0];
    let both = format!("{},{}", nodes[0], nodes[1]);
    sh(&format!(
        "mkdir {d}/held && echo {{}} > {d}/held/container.json"
    ))
    .ok();
    // /var/tmp is root's: not the user's directory.
    for (options, expected) in [
        (
            format!("-N2 -n2 -w {both} --container-image={busybox} --container-checkpoint={d}/two"),
            "--container-checkpoint saves the tasks of one node, and this step runs on 2",
        ),
        (
            format!("-n1 --container-image={busybox} --container-checkpoint={d}/two --container-checkpoint-signal=KILL"),
            "`KILL` cannot be the checkpoint signal: choose one of USR1 (the default), USR2",
        ),
        (
            format!("-n1 --container-image={busybox} --container-checkpoint-signal=USR2"),
            "--container-checkpoint-signal needs --container-checkpoint",
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
        let node = if options.starts_with("-N2") {
            String::new()
        } else {
            format!("-w {node}")
        };
        let out = sh(&format!(
            "export SLURM_CONF={conf}; cd {d} && srun {node} {options} echo ran"
        ));
        assert_ne!(out.code, 0, "{options}: {}", out.stderr);
        assert_eq!(out.stdout, "", "{options}: the task must not run");
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.contains("ferry"))
            .collect();
        // (A step on two nodes is refused by each: one line from each node.)
        let nodes = if options.starts_with("-N2") { 2 } else { 1 };
        assert_eq!(lines.len(), nodes, "{options}: {}", out.stderr);
        for line in lines {
            assert!(line.contains(expected), "{options}: {line}");
        }
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
    let field = |name: &str| field_of(&out, name);
    let said = field("job said:");
    assert!(
        said.contains(&format!("ferry: checkpointed the container to {d}/ck ("))
            && said.ends_with("step exit 0|"),
        "the step is checkpointed and ends with 0, the script goes on: {out}"
    );
    assert!(!field("checkpoint:").is_empty(), "{out}");
    assert!(field("counted:").parse::<u64>().unwrap_or(0) > 0, "{out}");
}

/// Two tasks of one node take turns on a counter in POSIX shared memory (a file in
/// /dev/shm, mapped by both), each also counting its own turns in a variable: with
/// `--container-checkpoint-signal=USR2`, `scancel --signal=USR2` checkpoints both at one
/// moment; a new job's two tasks on the other node continue them: the shared counter goes
/// on from its value, by turns, and each task's own count from its own.
const PING_PONG: &str = "
import mmap, os, socket, time
me = int(os.environ[\"SLURM_LOCALID\"])
path = \"/dev/shm/ping-pong\"
if me == 0:
    with open(path + \".new\", \"wb\") as f:
        f.write(bytes(8))
    os.rename(path + \".new\", path)
while not os.path.exists(path):
    time.sleep(0.05)
shared = mmap.mmap(os.open(path, os.O_RDWR), 8)
mine = 0
while True:
    n = int.from_bytes(shared[:8], \"little\")
    if n % 2 == me:
        mine += 1
        shared[:8] = (n + 1).to_bytes(8, \"little\")
        print(\"task\", me, \"shared\", n + 1, \"mine\", mine, socket.gethostname(), flush=True)
    time.sleep(0.02)
";

#[test]
fn two_tasks_sharing_memory_are_checkpointed_together_and_continue_on_another_node() {
    let _m = shared_machine();
    let (conf, nodes) = two_node_cluster();
    let (first, second) = (&nodes[0], &nodes[1]);
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let tag = d.to_string().rsplit('/').next().unwrap_or("ck").to_string();
    let out = sh(&format!(
        r#"export SLURM_CONF={conf}
        cd {d}
        trap 'scancel -n ck2-run-{tag} 2>/dev/null; scancel -n ck2-restore-{tag} 2>/dev/null; wait' EXIT
        turns() {{ for n in $(seq 1200); do [ "$(grep -c "^$2: task" "$1")" -ge "$3" ] && return 0; kill -0 "$4" 2>/dev/null || return 1; sleep 0.1; done; return 1; }}
        job_of() {{ for n in $(seq 100); do j=$(squeue -h -n "$1" -o %i); [ -n "$j" ] && {{ echo "$j"; return 0; }}; sleep 0.1; done; return 1; }}
        srun -J ck2-run-{tag} -w {first} -n2 --ntasks-per-node=2 -l --container-image={mpi} \
          --container-checkpoint={d}/ck --container-checkpoint-signal=USR2 python3 -c '{prog}' > run.out 2> run.err &
        run=$!
        turns run.out 0 5 $run && turns run.out 1 5 $run || {{ echo "the tasks did not take 5 turns each: $(cat run.err)"; exit 1; }}
        job=$(job_of ck2-run-{tag}) || {{ echo "no job ck2-run-{tag}"; exit 1; }}
        scancel --signal=USR2 "$job.0" || exit 1
        wait $run; echo "run exit $?"
        # (The first use of the image in DIR may say how its unpack goes, before.)
        echo "run said: $(sed 's/^0: //' run.err | grep -v -e '^srun: ' -e '^ferry: unpack' | tr '\n' '|')"
        echo "before 0: $(grep '^0: task' run.out | tail -n 1)"
        echo "before 1: $(grep '^1: task' run.out | tail -n 1)"
        srun -J ck2-restore-{tag} -w {second} -n2 --ntasks-per-node=2 -l --container-restore={d}/ck true > restore.out 2> restore.err &
        restored=$!
        turns restore.out 0 3 $restored && turns restore.out 1 3 $restored || {{ echo "the restore did not go on: $(cat restore.err)"; exit 1; }}
        job=$(job_of ck2-restore-{tag}) || {{ echo "no job ck2-restore-{tag}"; exit 1; }}
        scancel --signal=USR2 "$job.0" || exit 1
        wait $restored; echo "restore exit $?"
        echo "after 0: $(grep '^0: task' restore.out | head -n 1)"
        echo "after 1: $(grep '^1: task' restore.out | head -n 1)"
        echo "then 0: $(grep '^0: task' restore.out | sed -n 3p)"
        "#,
        mpi = img("mpi.sqsh"),
        prog = PING_PONG,
    ))
    .ok()
    .to_string();
    let field = |name: &str| field_of(&out, name);
    // `N: task N shared S mine M HOST`
    let turn = |name: &str| -> (u64, u64, String) {
        let line = field(name);
        let w: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(w.len(), 8, "{name}: {out}");
        (
            w[4].parse().expect("shared"),
            w[6].parse().expect("mine"),
            w[7].to_string(),
        )
    };
    assert_eq!(field("run exit"), "0", "{out}");
    let said = field("run said:");
    assert!(
        said.starts_with(&format!("ferry: checkpointed the container to {d}/ck ("))
            && said.ends_with(&format!(
                "continue it with `srun --ntasks-per-node=2 --container-restore={d}/ck ...`|"
            )),
        "one line, how to continue: {out}"
    );
    assert_eq!(field("restore exit"), "0", "{out}");
    let (b0, m0, h0) = turn("before 0:");
    let (b1, m1, _) = turn("before 1:");
    let (a0, n0, g0) = turn("after 0:");
    let (a1, n1, g1) = turn("after 1:");
    assert_eq!(&h0, first, "{out}");
    assert_eq!(
        (&g0, &g1),
        (second, second),
        "restored on the other node: {out}"
    );
    // The last turn before the checkpoint was the higher of the two; the turns go on from it.
    let last = b0.max(b1);
    assert_eq!(a0.min(a1), last + 1, "the shared counter goes on: {out}");
    assert_eq!(
        a0.max(a1),
        last + 2,
        "by turns, through the shared memory: {out}"
    );
    assert_eq!(a0 % 2, 1, "task 0 makes the odd values: {out}");
    assert_eq!(
        (n0, n1),
        (m0 + 1, m1 + 1),
        "each task's own count goes on: {out}"
    );
    let (t0, k0, _) = turn("then 0:");
    assert_eq!((t0, k0), (a0 + 4, n0 + 2), "and on: {out}");
    assert!(
        leftovers_after(USER, Duration::from_secs(10)).is_empty(),
        "processes left: {:?}",
        leftovers_after(USER, Duration::from_secs(1))
    );
}

/// `#SBATCH --signal=B:USR1@50` signals only the batch script, which runs on the job's
/// first node: its trap runs `ferry checkpoint DIR` for the step on the second node (ferry
/// passes the signal on with scancel and waits for the checkpoint), then the step ends with
/// exit 0 and the script goes on, well before the one-minute limit.
#[test]
fn a_batch_scripts_signal_before_the_time_limit_checkpoints_a_step_on_another_node() {
    // Alone: its job runs for half a minute, and the other tests look for processes left.
    let _m = exclusive_machine();
    let (conf, nodes) = two_node_cluster();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let tag = d.to_string().rsplit('/').next().unwrap_or("ck").to_string();
    let out = sh(&format!(
        r#"export SLURM_CONF={conf}
        cd {d}
        trap 'scancel -n ck-batch-{tag} 2>/dev/null' EXIT
        cat > job.sh <<'SCRIPT'
#!/bin/bash
trap '"$FERRY" checkpoint {d}/ck > {d}/trap.out 2>&1; echo "checkpoint exit $?" >> {d}/trap.out' USR1
srun -N1 -n1 -w {second} --container-image={busybox} --container-checkpoint={d}/ck \
  sh -c 'i=0; while :; do i=$((i+1)); echo "$i $(hostname)"; sleep 0.1; done' > counted.out &
step=$!
wait $step
wait $step
echo "step exit $?"
echo "script on $(hostname)"
SCRIPT
        job=$(sbatch --parsable -J ck-batch-{tag} -w {first},{second} -N2 -n2 --time=1 --signal=B:USR1@50 -o {d}/job.out job.sh) || exit 1
        for n in $(seq 1500); do [ -z "$(squeue -h -j "$job" 2>/dev/null)" ] && break; sleep 0.1; done
        echo "job said: $(grep -v '^srun: ' job.out | tr '\n' '|')"
        echo "trap said: $(tr '\n' '|' < trap.out)"
        echo "last: $(tail -n 1 counted.out)"
        "#,
        busybox = img("busybox.sqsh"),
        first = nodes[0],
        second = nodes[1],
    ))
    .ok()
    .to_string();
    let field = |name: &str| field_of(&out, name);
    let said = field("job said:");
    assert!(
        said.contains("step exit 0|") && said.contains(&format!("script on {}|", nodes[0])),
        "the step ends with 0, the script goes on: {out}"
    );
    let trap = field("trap said:");
    assert!(
        trap.starts_with(&format!("ferry: checkpointed the container to {d}/ck ("))
            && trap.ends_with("checkpoint exit 0|"),
        "ferry checkpoint from the script's node: {out}"
    );
    assert!(field("last:").ends_with(&nodes[1]), "{out}");
    assert!(dir.path.join("ck/checkpointed").exists(), "{out}");
}

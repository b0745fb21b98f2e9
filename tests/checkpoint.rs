//! Checkpoint and restore of `ferry run` containers with CRIU, as the unprivileged test
//! user. Not part of the host's `cargo test`: Debian 12's CRIU 3.17 cannot run on current
//! kernels (docs/bench/criu-evidence.txt), so this binary runs in the Debian 13 stage
//! (`integration/slurm-stage trixie`, with CRIU 4.1 and checkpoints enabled), where a
//! missing CRIU or site switch fails it in one line. Run it by name:
//! `cargo test --release -p ferry-tests --test checkpoint`.

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

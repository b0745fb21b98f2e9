//! `ferry build` end to end, as the unprivileged test user.

use std::time::Duration;

use ferry_tests::*;

fn img(name: &str) -> String {
    image(name).display().to_string()
}

/// A build context in `dir`/ctx holding `Dockerfile` and a data file.
fn context(dir: &UserDir, dockerfile: &str) {
    sh(&format!(
        "cd {} && mkdir -p ctx && echo 'copied from the context' > ctx/data.txt && \
         cat > ctx/Dockerfile <<'EOF'\n{dockerfile}EOF",
        dir.path.display()
    ))
    .ok();
}

fn build(dir: &UserDir, extra: &str) -> Run {
    let d = dir.path.display();
    sh_as_within(
        USER,
        &format!("cd {d} && $FERRY build --cache {d}/cache -t {d}/out.sqsh {extra} ctx"),
        Duration::from_secs(600),
    )
}

/// A Debian image with a package from apt, a copied file, an environment variable and a
/// working directory; a rebuild after changing only the last RUN takes everything before it
/// from the cache, and an unchanged rebuild takes every step from it.
#[test]
fn builds_a_debian_image_with_a_package_and_rebuilds_from_the_cache() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let dockerfile = format!(
        "FROM {}\n\
         # the package's scripts run as root in the container\n\
         RUN apt-get -qq update && \\\n    apt-get -qq install -y --no-install-recommends file >/dev/null\n\
         ENV APP_MODE=production\n\
         WORKDIR /srv/app\n\
         COPY data.txt .\n\
         RUN echo first > marker\n\
         CMD [\"sh\", \"-c\", \"pwd; echo $APP_MODE; cat data.txt marker; file -b data.txt\"]\n",
        img("debian.sqsh")
    );
    context(&dir, &dockerfile);
    let first = build(&dir, "");
    first.ok();
    assert!(
        first.stderr.contains("[2/7] RUN apt-get") && !first.stderr.contains("(cached)"),
        "{}",
        first.stderr
    );
    let run = format!("$FERRY run {d}/out.sqsh");
    assert_eq!(
        sh(&run).ok(),
        "/srv/app\nproduction\ncopied from the context\nfirst\nASCII text\n"
    );

    sh(&format!("sed -i s/first/second/ {d}/ctx/Dockerfile")).ok();
    let second = build(&dir, "");
    second.ok();
    for cached in ["[2/7] RUN apt-get", "[5/7] COPY data.txt ."] {
        let line = second.stderr.lines().find(|l| l.starts_with(cached));
        assert!(
            line.is_some_and(|l| l.ends_with("(cached)")),
            "{cached} not cached:\n{}",
            second.stderr
        );
    }
    let last = second.stderr.lines().find(|l| l.starts_with("[6/7]"));
    assert!(
        last.is_some_and(|l| l.contains("second") && !l.ends_with("(cached)")),
        "{}",
        second.stderr
    );
    assert_eq!(
        sh(&run).ok(),
        "/srv/app\nproduction\ncopied from the context\nsecond\nASCII text\n"
    );

    let third = build(&dir, "");
    third.ok();
    let ran: Vec<&str> = third
        .stderr
        .lines()
        .filter(|l| l.starts_with("[") && (l.contains("] RUN") || l.contains("] COPY")))
        .filter(|l| !l.ends_with("(cached)"))
        .collect();
    assert!(ran.is_empty(), "{}", third.stderr);
    // No work tree stays in the cache.
    let left = sh(&format!("ls {d}/cache/build | grep -v '\\.sqsh$' || true"));
    assert_eq!(left.ok(), "");
}

/// The packages users ask for first, from Debian's mirror: build-essential (the image then
/// compiles and runs C), emacs-nox (pyxis' own test; man-db's scripts chown to `man`) and
/// tzdata (a debconf postinst that writes /etc/localtime). Their scripts run as uid 0 with
/// only the caller's uid mapped, and none may fail.
#[test]
fn apt_installs_build_essential_emacs_and_tzdata_and_the_image_compiles() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let dockerfile = format!(
        "FROM {}\n\
         ENV DEBIAN_FRONTEND=noninteractive\n\
         RUN apt-get -qq update && \\\n    apt-get -qq install -y --no-install-recommends build-essential emacs-nox tzdata man-db >/dev/null\n\
         COPY hello.c /src/\n\
         RUN gcc -O2 -o /usr/local/bin/hello /src/hello.c\n\
         CMD [\"hello\"]\n",
        img("debian.sqsh")
    );
    context(&dir, &dockerfile);
    sh(&format!(
        r#"printf '#include <stdio.h>\nint main(void) {{ puts("compiled in ferry build"); return 0; }}\n' > {d}/ctx/hello.c"#
    ))
    .ok();
    let built = build(&dir, "");
    built.ok();
    assert_eq!(
        sh(&format!("$FERRY run {d}/out.sqsh")).ok(),
        "compiled in ferry build\n"
    );
    let out = sh(&format!(
        "$FERRY run {d}/out.sqsh -- sh -c '\
         dpkg-query -W -f \"\\${{Status}}\\n\" build-essential emacs-nox tzdata man-db; \
         emacs --version | head -1 | cut -d\" \" -f1,2; \
         echo \"int main(void) {{ return 7; }}\" > /tmp/seven.c && cc -o /tmp/seven /tmp/seven.c; /tmp/seven; echo \"cc: $?\"; \
         TZ=Europe/Paris date -d @0 +%H:%M; test -e /usr/share/zoneinfo/Asia/Tokyo && echo zones'"
    ));
    assert_eq!(
        out.ok(),
        "install ok installed\ninstall ok installed\ninstall ok installed\ninstall ok installed\n\
         GNU Emacs\ncc: 7\n01:00\nzones\n"
    );
}

/// dnf in RUN, on the Debian image with Debian's dnf (no RPM distribution's repository is
/// reachable here): it installs from a local repository (integration/build-images' rpmrepo)
/// a package whose files belong to a system user that its %pre creates and its %post chowns
/// to, although only the caller's uid is mapped, with the dependency dnf resolves. The image
/// runs the package's program, and rpm knows both packages.
#[test]
fn dnf_installs_a_package_with_a_system_user_from_a_local_repository() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let dockerfile = format!(
        "FROM {}\n\
         COPY rpmrepo /srv/rpmrepo\n\
         COPY local.repo /etc/yum.repos.d/\n\
         RUN dnf install -y --releasever=12 ferry-hello\n\
         CMD [\"ferry-hello\"]\n",
        img("dnf.sqsh")
    );
    context(&dir, &dockerfile);
    sh(&format!(
        "cp -r {} {d}/ctx/rpmrepo && \
         printf '[local]\\nname=local\\nbaseurl=file:///srv/rpmrepo\\ngpgcheck=0\\n' \
         > {d}/ctx/local.repo && chmod -R a+rX {d}/ctx",
        img("rpmrepo")
    ))
    .ok();
    build(&dir, "").ok();
    assert_eq!(
        sh(&format!("$FERRY run {d}/out.sqsh")).ok(),
        "hello from ferry-hello 1.0\n"
    );
    // One uid is mapped, so the image records the files of the package's user as root's
    // (as `COPY --chown` does), with their modes: --remap-root reads them.
    assert_eq!(
        sh(&format!(
            "$FERRY run --remap-root {d}/out.sqsh -- sh -c 'rpm -q ferry-hello ferry-rpm-base; \
             getent passwd ferryhello | cut -d: -f1,7; cat /etc/ferry-hello.conf; \
             stat -c \"%a %U %n\" /etc/ferry-hello.conf /var/lib/ferry-hello \
             /var/lib/ferry-hello/state'"
        ))
        .ok(),
        "ferry-hello-1.0-1.noarch\nferry-rpm-base-1.0-1.noarch\nferryhello:/usr/sbin/nologin\n\
         greeting=rpm\n640 root /etc/ferry-hello.conf\n750 root /var/lib/ferry-hello\n\
         644 root /var/lib/ferry-hello/state\n"
    );
}

/// A RUN that deletes files of the base (a file, and a directory made again empty) runs on
/// an overlay over the mounted base: the deletions reach its cache entry and the image, and
/// a rebuild that starts from that entry still lacks them. No overlay whiteout (a 0/0
/// character device) is in any entry.
#[test]
fn deletions_in_run_are_gone_from_the_entries_and_the_image() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let dockerfile = format!(
        "FROM {}\n\
         RUN rm /etc/issue && rm -r /usr/share/doc && mkdir /usr/share/doc && \\\n    \
         echo new > /usr/share/doc/only\n\
         COPY data.txt /srv/\n\
         RUN echo first > /srv/marker\n\
         CMD [\"sh\", \"-c\", \"ls /usr/share/doc; test -e /etc/issue && echo issue || echo no issue; \
         cat /srv/data.txt /srv/marker\"]\n",
        img("debian.sqsh")
    );
    context(&dir, &dockerfile);
    build(&dir, "").ok();
    let run = format!("$FERRY run {d}/out.sqsh");
    assert_eq!(
        sh(&run).ok(),
        "only\nno issue\ncopied from the context\nfirst\n"
    );
    sh(&format!("sed -i s/first/second/ {d}/ctx/Dockerfile")).ok();
    let second = build(&dir, "");
    second.ok();
    assert!(
        second
            .stderr
            .lines()
            .any(|l| l.starts_with("[3/5] COPY") && l.ends_with("(cached)")),
        "{}",
        second.stderr
    );
    assert_eq!(
        sh(&run).ok(),
        "only\nno issue\ncopied from the context\nsecond\n"
    );
    let whiteouts = sh(&format!(
        "for f in {d}/cache/build/*.sqsh {d}/out.sqsh; do unsquashfs -lls $f; done | \
         grep -E '^c.* 0, +0 ' || true"
    ));
    assert_eq!(whiteouts.ok(), "");
}

/// A failing RUN ends the build with its status and one line naming the file, the line and
/// the instruction; no image is written and no work tree stays. A bad instruction is one
/// line naming the file and line.
#[test]
fn a_failing_run_names_its_line_and_leaves_nothing_behind() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let dockerfile = format!(
        "FROM {}\nRUN echo one > /one\n\nRUN echo failing && \\\n  exit 3\nRUN echo never\n",
        img("busybox.sqsh")
    );
    context(&dir, &dockerfile);
    let out = build(&dir, "");
    assert_eq!(out.code, 3, "{}", out.stderr);
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(
        errors,
        ["ferry: error: Dockerfile:4: RUN echo failing && exit 3: exited with status 3"],
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("never"), "{}", out.stderr);
    assert_eq!(sh(&format!("ls {d}")).ok(), "cache\nctx\n");
    let left = sh(&format!("ls {d}/cache/build | grep -v '\\.sqsh$' || true"));
    assert_eq!(left.ok(), "");

    context(
        &dir,
        &format!("FROM {}\nFROBNICATE x\n", img("busybox.sqsh")),
    );
    let out = build(&dir, "");
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr,
        "ferry: error: Dockerfile:2: unknown instruction `FROBNICATE`\n"
    );
}

/// Two stages: the second copies what the first built (`COPY --from`), with an ENTRYPOINT
/// and CMD and a build argument; the same with `--no-cache`.
#[test]
fn a_multi_stage_build_copies_from_an_earlier_stage() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let busybox = img("busybox.sqsh");
    context(
        &dir,
        &format!(
            "ARG BASE={busybox}\n\
             FROM $BASE AS builder\n\
             ARG FLAVOUR=plain\n\
             RUN mkdir -p /out && echo \"built $FLAVOUR\" > /out/prog\n\
             FROM ${{BASE}}\n\
             COPY --from=builder /out/prog /usr/local/bin/\n\
             ENTRYPOINT [\"cat\"]\n\
             CMD [\"/usr/local/bin/prog\"]\n"
        ),
    );
    for extra in [
        "--build-arg FLAVOUR=spicy",
        "--no-cache --build-arg FLAVOUR=mild",
    ] {
        build(&dir, extra).ok();
        let flavour = extra.rsplit('=').next().unwrap_or_default();
        assert_eq!(
            sh(&format!("$FERRY run {d}/out.sqsh")).ok(),
            format!("built {flavour}\n")
        );
    }
}

/// The last step that changes the tree shares one squashfs with the image: a rebuild that
/// changes only the configuration after it (ENV, WORKDIR, CMD) takes that step from the
/// cache and gets the new configuration, and a WORKDIR made for the first image is not in
/// the second.
#[test]
fn a_change_after_the_last_step_takes_it_from_the_cache() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    context(
        &dir,
        &format!(
            "FROM {}\n\
             RUN echo built > /made\n\
             ENV MODE=first\n\
             WORKDIR /w1\n\
             CMD [\"sh\", \"-c\", \"cat /made; echo $MODE; pwd; ls -d /w[12]\"]\n",
            img("busybox.sqsh")
        ),
    );
    let run = format!("$FERRY run {d}/out.sqsh");
    let first = build(&dir, "");
    first.ok();
    assert!(
        first.stderr.contains("cache entry with the image"),
        "{}",
        first.stderr
    );
    assert_eq!(sh(&run).ok(), "built\nfirst\n/w1\n/w1\n");
    sh(&format!(
        "sed -i 's/first/second/; s,WORKDIR /w1,WORKDIR /w2,' {d}/ctx/Dockerfile"
    ))
    .ok();
    let second = build(&dir, "");
    second.ok();
    let step = second.stderr.lines().find(|l| l.starts_with("[2/5] RUN"));
    assert!(
        step.is_some_and(|l| l.ends_with("(cached)")),
        "{}",
        second.stderr
    );
    assert_eq!(sh(&run).ok(), "built\nsecond\n/w2\n/w2\n");
}

/// What a build stopped by a signal leaves in the cache (its work tree, named after its
/// process) goes with `ferry gc`; the step entries stay.
#[test]
fn gc_removes_what_a_stopped_build_left() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    // A process id above the kernel's largest names no running process.
    let out = sh(&format!(
        "mkdir -p {d}/cache/build/work-4194305/stage-0/rootfs && chmod 500 {d}/cache/build/work-4194305/stage-0 && \
         touch {d}/cache/build/0123.sqsh && $FERRY gc --cache {d}/cache && ls {d}/cache/build"
    ));
    assert!(
        out.ok().contains("removed 1 leftovers of stopped builds\n"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.ends_with("0123.sqsh\n"), "{}", out.stdout);
}

/// A `.dockerignore` leaves files out of `COPY .` (patterns, `**`, an exception), and a
/// change to a left-out file does not touch the step's cache entry.
#[test]
fn dockerignore_leaves_files_out_of_copies_and_the_cache_key() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    context(
        &dir,
        &format!(
            "FROM {}\nCOPY . /app\nCMD [\"sh\", \"-c\", \"cd /app && find . -type f | LC_ALL=C sort\"]\n",
            img("busybox.sqsh")
        ),
    );
    sh(&format!(
        "cd {d}/ctx && mkdir -p logs src/__pycache__ && echo 1 > logs/1.log && \
         echo k > logs/keep.log && echo s > secret.env && echo c > src/__pycache__/m.pyc && \
         echo m > src/m.py && printf '# build noise\\nlogs\\n!logs/keep.log\\n*.env\\n**/__pycache__\\n' \
         > .dockerignore && chmod -R a+rX {d}/ctx"
    ))
    .ok();
    build(&dir, "").ok();
    assert_eq!(
        sh(&format!("$FERRY run {d}/out.sqsh")).ok(),
        "./.dockerignore\n./Dockerfile\n./data.txt\n./logs/keep.log\n./src/m.py\n"
    );
    sh(&format!("echo changed > {d}/ctx/secret.env")).ok();
    let again = build(&dir, "");
    again.ok();
    let copy = again.stderr.lines().find(|l| l.starts_with("[2/3] COPY"));
    assert!(
        copy.is_some_and(|l| l.ends_with("(cached)")),
        "{}",
        again.stderr
    );
}

/// An Apptainer definition file (`Bootstrap: localimage`) with %files, %post,
/// %environment, %runscript, %labels and %help: `ferry run` with no command runs the
/// runscript, which sees the environment and the files.
#[test]
fn builds_an_apptainer_definition_file() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    context(&dir, "FROM scratch\n");
    let def = format!(
        "Bootstrap: localimage\n\
         From: {}\n\
         \n\
         %help\n    Prints a greeting.\n\
         %files\n    data.txt /opt/app/data.txt\n\
         %post\n    echo \"made in post\" > /opt/app/post.txt\n    chmod 644 /opt/app/post.txt\n\
         %environment\n    export GREETING=\"hello from the def file\"\n    APP_MODE=production\n\
         %runscript\n    echo \"$GREETING ($APP_MODE)\"\n    cat /opt/app/data.txt /opt/app/post.txt\n\
         %labels\n    Author ferry-tests\n",
        img("debian.sqsh")
    );
    sh(&format!(
        "cat > {d}/ctx/app.def <<'EOF'\n{def}EOF\nchmod -R a+rX {d}/ctx"
    ))
    .ok();
    let out = build(&dir, "-f ctx/app.def");
    out.ok();
    assert!(
        out.stderr
            .contains("[2/7] %files data.txt /opt/app/data.txt")
            && out.stderr.contains("[3/7] %post echo \"made in post\""),
        "{}",
        out.stderr
    );
    assert_eq!(
        sh(&format!("$FERRY run {d}/out.sqsh")).ok(),
        "hello from the def file (production)\ncopied from the context\nmade in post\n"
    );
    // The labels and the help are in the image's config.
    let config = sh(&format!(
        "$FERRY run {d}/out.sqsh cat /etc/ferry/image.json"
    ));
    let config = config.ok();
    assert!(
        config.contains("\"Author\": \"ferry-tests\"")
            && config.contains("\"help\": \"Prints a greeting.\""),
        "{config}"
    );
}

/// `--format oci-archive` (named after -t) and `--format docker-archive -o PATH`: besides
/// the squashfs, an archive skopeo reads, with the image's config and its files.
#[test]
fn writes_oci_and_docker_archives_that_skopeo_reads() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    context(
        &dir,
        &format!(
            "FROM {}\nENV APP_MODE=production\nWORKDIR /srv/app\nCOPY data.txt .\n\
             RUN echo made > made.txt\nLABEL org.example.kind=test\n\
             ENTRYPOINT [\"cat\"]\nCMD [\"data.txt\"]\n",
            img("busybox.sqsh")
        ),
    );
    let oci = build(&dir, "--format oci-archive");
    oci.ok();
    assert!(
        oci.stderr.contains(&format!("wrote {d}/out.oci.tar")),
        "{}",
        oci.stderr
    );
    build(&dir, &format!("--format docker-archive -o {d}/app.tar")).ok();
    let over = build(&dir, &format!("--format docker-archive -o {d}/out.sqsh"));
    assert_eq!(
        (over.code, over.stderr.as_str()),
        (
            1,
            format!(
                "ferry: error: -o {d}/out.sqsh: the squashfs (-t) is written there; give the \
                 archive another name\n"
            )
            .as_str()
        )
    );
    assert_eq!(
        sh(&format!("$FERRY run {d}/out.sqsh")).ok(),
        "copied from the context\n"
    );
    for (n, (transport, file)) in [
        ("oci-archive", "out.oci.tar"),
        ("docker-archive", "app.tar"),
    ]
    .into_iter()
    .enumerate()
    {
        let inspect = sh(&format!("skopeo inspect --config {transport}:{d}/{file}"));
        let config: serde_json::Value = serde_json::from_str(inspect.ok()).expect("json");
        let c = &config["config"];
        assert!(
            c["Env"]
                .as_array()
                .is_some_and(|e| e.iter().any(|v| v == "APP_MODE=production")),
            "{config}"
        );
        assert_eq!(c["WorkingDir"], "/srv/app", "{config}");
        assert_eq!(c["Entrypoint"], serde_json::json!(["cat"]), "{config}");
        assert_eq!(c["Cmd"], serde_json::json!(["data.txt"]), "{config}");
        assert_eq!(c["Labels"]["org.example.kind"], "test", "{config}");
        assert!(
            config["created"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{config}"
        );
        // The files: copied out by skopeo, read from its one layer.
        let copy = format!("{d}/copy-{n}");
        sh(&format!("skopeo copy -q {transport}:{d}/{file} dir:{copy}")).ok();
        let manifest: serde_json::Value =
            serde_json::from_str(sh(&format!("cat {copy}/manifest.json")).ok()).expect("json");
        let layer = manifest["layers"][0]["digest"]
            .as_str()
            .and_then(|l| l.strip_prefix("sha256:"))
            .unwrap_or_else(|| panic!("{manifest}"))
            .to_string();
        assert_eq!(
            sh(&format!(
                "tar -xOf {copy}/{layer} srv/app/data.txt srv/app/made.txt && \
                 tar -tvf {copy}/{layer} srv/app/made.txt | cut -d' ' -f2"
            ))
            .ok(),
            "copied from the context\nmade\nroot/root\n"
        );
    }
}

/// `--tmpdir DIR` holds the trees being built (the upper layer of the RUN's root is there)
/// and is left empty;
/// a missing or non-directory DIR is one line, status 125, and nothing is written.
#[test]
fn tmpdir_holds_the_build_trees_and_a_bad_one_is_one_line() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    context(
        &dir,
        &format!(
            "FROM {}\nRUN awk '$5 == \"/\" {{ print $NF }}' /proc/self/mountinfo > /root-was\n",
            img("busybox.sqsh")
        ),
    );
    sh(&format!("mkdir {d}/scratch")).ok();
    build(&dir, &format!("--tmpdir {d}/scratch")).ok();
    let root = sh(&format!("$FERRY run {d}/out.sqsh cat /root-was"));
    assert!(
        root.ok().contains("upperdir=") && root.stdout.contains("/scratch/ferry-build-"),
        "{}",
        root.stdout
    );
    assert_eq!(sh(&format!("ls -A {d}/scratch")).ok(), "");

    sh(&format!("rm -r {d}/out.sqsh {d}/cache && touch {d}/a-file")).ok();
    for (bad, why) in [
        (format!("{d}/missing"), "it does not exist"),
        (format!("{d}/a-file"), "it is not a directory"),
    ] {
        let out = build(&dir, &format!("--tmpdir {bad} --no-cache"));
        // ferry's status for a setup that failed before anything ran.
        assert_eq!(out.code, 125, "{}", out.stderr);
        assert_eq!(
            out.stderr,
            format!(
                "ferry: error: --tmpdir {bad}: {why}; give an existing directory you can \
                 write, on a disk with room for the build\n"
            )
        );
        assert_eq!(sh(&format!("ls {d}")).ok(), "a-file\nctx\nscratch\n");
    }
}

/// `srun ferry build` on a compute node: the RUN steps run in the step's cgroup (their
/// /proc/self/cgroup is the step's own), and the image runs through srun.
#[test]
fn srun_builds_on_a_compute_node_inside_the_steps_cgroup() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    assert!(
        std::env::var("SLURM_CONF").is_ok_and(|c| !c.is_empty()),
        "SLURM_CONF is not set: this test needs the test cluster (integration/cluster up)"
    );
    context(
        &dir,
        &format!(
            "FROM {}\nRUN cat /proc/self/cgroup > /build-cgroup\n",
            img("debian.sqsh")
        ),
    );
    let out = sh_as_within(
        USER,
        &format!(
            "cd {d} && srun -n1 --mem=1G sh -c 'cat /proc/self/cgroup > {d}/step-cgroup && \
             exec $FERRY build --cache {d}/cache -t {d}/out.sqsh ctx'"
        ),
        Duration::from_secs(600),
    );
    out.ok();
    let step = sh(&format!("cat {d}/step-cgroup"));
    let step = step.ok();
    assert!(step.contains("/job_") && step.contains("/step_0"), "{step}");
    let built = sh(&format!(
        "srun -n1 --container={d}/out.sqsh cat /build-cgroup"
    ));
    assert_eq!(built.ok(), step);
}

/// `ferry gc` weighs the build's step entries with the images: without a size it lists them
/// and keeps them, with `--max-size` the least recently used go first, and while a build
/// runs (holds the build cache) they all stay.
#[test]
fn gc_removes_least_recently_used_build_entries_under_max_size() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    context(
        &dir,
        &format!(
            "FROM {}\nRUN echo one > /one\nRUN echo two > /two\n",
            img("busybox.sqsh")
        ),
    );
    build(&dir, "").ok();
    let entries = || {
        sh(&format!("cd {d}/cache/build && ls -t *.sqsh"))
            .ok()
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    // Two steps and the finished image; the newest is last used now, the others earlier.
    let all = entries();
    assert_eq!(all.len(), 3, "{all:?}");
    sh(&format!(
        "cd {d}/cache/build && touch -d '2 days ago' {} && touch -d '1 day ago' {}",
        all[2], all[1]
    ))
    .ok();
    let out = sh(&format!("$FERRY gc --cache {d}/cache"));
    assert!(
        out.ok().contains("build cache: 3 step entries (") && out.stdout.contains("removed 0 ("),
        "{}",
        out.stdout
    );
    assert_eq!(entries().len(), 3);

    let busy = sh(&format!(
        "flock -s {d}/cache/build/.lock $FERRY gc --cache {d}/cache --max-size 0"
    ));
    assert!(
        busy.ok()
            .contains("build cache: kept, a build is running\n"),
        "{}",
        busy.stdout
    );
    assert_eq!(entries().len(), 3);

    // Room for the newest only: the two older go, oldest first.
    let newest = sh(&format!("stat -c %s {d}/cache/build/{}", all[0]));
    let out = sh(&format!(
        "$FERRY gc --cache {d}/cache --max-size {}",
        newest.ok().trim()
    ));
    assert!(out.ok().contains("; removed 2 ("), "{}", out.stdout);
    assert_eq!(entries(), [all[0].clone()]);
}

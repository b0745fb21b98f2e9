//! `ferry run` end to end, as the unprivileged test user.

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

use ferry_tests::*;

fn img(name: &str) -> String {
    image(name).display().to_string()
}

#[test]
fn prints_the_marker_of_squashfs_and_directory_images() {
    let _m = shared_machine();
    assert_eq!(
        sh(&format!(
            "$FERRY run {} cat /etc/ferry-marker",
            img("debian.sqsh")
        ))
        .ok()
        .trim(),
        "debian-image"
    );
    assert_eq!(
        sh(&format!(
            "$FERRY run {} cat /etc/ferry-marker",
            img("debian")
        ))
        .ok()
        .trim(),
        "debian-image"
    );
    for sqsh in [
        "busybox.sqsh",
        "busybox-gzip.sqsh",
        "busybox-xz.sqsh",
        "busybox-lz4.sqsh",
        "busybox",
    ] {
        let out = sh(&format!("$FERRY run {} cat /etc/ferry-marker", img(sqsh)));
        assert_eq!(out.ok().trim(), "busybox-image", "{sqsh}");
    }
}

#[test]
fn the_host_is_not_what_the_command_sees() {
    let _m = shared_machine();
    let out = sh(&format!(
        "$FERRY run {} sh -c 'ls /usr/bin | wc -l; test -e /etc/ferry-marker && echo marker'",
        img("busybox.sqsh")
    ));
    let text = out.ok();
    assert!(text.contains("marker"), "{text}");
    assert!(
        !std::path::Path::new("/etc/ferry-marker").exists(),
        "the host must not carry the marker"
    );
}

#[test]
fn id_inside_equals_id_outside() {
    let _m = shared_machine();
    let outside = sh("id").ok().to_string();
    let inside = sh(&format!("$FERRY run {} id", img("debian.sqsh")))
        .ok()
        .to_string();
    assert_eq!(inside, outside);
    let name = sh(&format!(
        "$FERRY run {} sh -c 'whoami; echo $HOME'",
        img("debian.sqsh")
    ))
    .ok()
    .to_string();
    assert_eq!(name, format!("{USER}\n/home/{USER}\n"));
}

#[test]
fn unshare_gives_new_namespaces_with_loopback_up() {
    let _m = shared_machine();
    let busybox = img("busybox.sqsh");
    let host = sh("for n in net ipc uts; do readlink /proc/self/ns/$n; done")
        .ok()
        .to_string();
    let out = sh(&format!(
        "$FERRY run --remap-root --unshare=net,ipc,uts {busybox} \
         sh -c 'for n in net ipc uts; do readlink /proc/self/ns/$n; done; ip -o link; hostname inside && hostname'"
    ));
    let text = out.ok();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    for ns in &lines[..3] {
        assert!(!host.contains(ns), "{ns} is the host's: {text}");
    }
    assert!(lines[3].starts_with("1: lo: <LOOPBACK,UP"), "{text}");
    assert_eq!(lines[4], "inside");
    let out = sh(&format!("$FERRY run --unshare=net,pid {busybox} true"));
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("unknown namespace \"pid\""),
        "{}",
        out.stderr
    );
}

#[test]
fn remap_root_is_uid_0_inside_and_the_user_outside() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let out = sh(&format!(
        "$FERRY run --remap-root -m {d}:/out {} sh -c 'id -u; id -g; touch /out/made-as-root'",
        img("debian.sqsh")
    ));
    assert_eq!(out.ok(), "0\n0\n");
    let meta =
        std::fs::metadata(dir.path.join("made-as-root")).expect("file created through the bind");
    assert_eq!(
        meta.uid(),
        uid_of(USER),
        "a file created as remapped root belongs to the real user on the host"
    );
}

/// Package managers hand files to system users and drop to them; with one id mapped the
/// kernel refuses, so remap-root's seccomp filter makes those calls succeed as no-ops.
#[test]
fn remap_root_chown_and_setuid_to_unmapped_ids_succeed_and_change_nothing() {
    let _m = shared_machine();
    let image = img("debian.sqsh");
    let out = sh(&format!(
        "$FERRY run --remap-root --writable {image} sh -c 'touch /f && chown 123:456 /f && \
         chown man /f && chown -h man:man /f && echo chowned; stat -c %u:%g /f; \
         setpriv --reuid=6 --regid=12 --clear-groups id -u; su -s /bin/sh man -c \"id -u\"'"
    ));
    assert_eq!(out.ok(), "chowned\n0:0\n0\n0\n", "{}", out.stderr);
    // Without remap-root nothing changes: the kernel's answer, as before.
    let out = sh(&format!(
        "$FERRY run --writable {image} sh -c 'touch /f && chown 123:456 /f'"
    ));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("changing ownership of '/f': Invalid argument"),
        "{}",
        out.stderr
    );
}

/// The Debian image's apt sources (deb.debian.org), reached over the host's network.
#[test]
fn apt_get_installs_a_package_with_chowning_scripts_in_a_writable_remap_root_container() {
    let _m = shared_machine();
    // man-db's scripts chown to the `man` user; emacs-nox (pyxis' test) pulls packages whose
    // scripts add system groups, which needs the image's own /etc/group, writable.
    let out = sh(&format!(
        "$FERRY run --remap-root --writable {} sh -c 'apt-get -qq update && \
         apt-get -qq install -y --no-install-recommends man-db emacs-nox >/dev/null && \
         stat -c %U /var/cache/man && dpkg -s man-db emacs-nox | grep Status && \
         emacs --version | head -1 | cut -d\" \" -f1,2 && \
         addgroup --system crontab >/dev/null && getent group crontab | cut -d: -f1'",
        img("debian.sqsh")
    ));
    assert_eq!(
        out.ok(),
        "root\nStatus: install ok installed\nStatus: install ok installed\nGNU Emacs\ncrontab\n",
        "{}",
        out.stderr
    );
}

/// A user's registries file (~/.config/ferry/registries.conf) puts mirrors before the
/// registry itself: a Docker Hub name (`NAME:TAG`, docker.io/library/NAME) comes from the
/// loopback registry standing in for a Docker Hub mirror, after a mirror that is down. When
/// no source has the image, the one error line names each source and its answer.
#[test]
fn a_users_registries_file_puts_mirrors_before_docker_hub() {
    let _m = shared_machine();
    let registry = test_registry();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let name = format!("ferry-mirrored-{}", std::process::id());
    sh(&format!(
        "cd {d} && {MAKE_CONFIGURED_LAYOUT}\n skopeo --insecure-policy copy -q \
         --dest-tls-verify=false oci:{d}/layout:v1 docker://{registry}/library/{name}:24.04\n\
         mkdir -p .config/ferry && cat > .config/ferry/registries.conf <<'EOF'\n\
[[registry]]\nprefix = \"docker.io\"\n\
[[registry.mirror]]\nlocation = \"127.0.0.1:9\"\ninsecure = true\n\
[[registry.mirror]]\nlocation = \"{registry}\"\ninsecure = true\nEOF"
    ))
    .ok();
    let out = sh(&format!(
        "cd {d} && HOME={d} $FERRY run {name}:24.04 sh -c 'cat /etc/ferry-marker; echo $CFG_VAR'"
    ));
    assert_eq!(out.ok(), "busybox-image\nfrom-config\n", "{}", out.stderr);

    let absent = format!("ferry-absent-{}", std::process::id());
    let out = sh(&format!(
        "cd {d} && HOME={d} FERRY_REGISTRY_RETRIES=0 $FERRY import {absent}:1"
    ));
    assert_ne!(out.code, 0);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.stderr);
    let line = lines[0];
    for part in [
        &format!(
            "cannot get docker://registry-1.docker.io/library/{absent}:1 from any of its sources: "
        ),
        "mirror 127.0.0.1:9: cannot get manifest 1 from registry 127.0.0.1:9: ",
        &format!("; mirror {registry}: no such image or tag: {registry}/library/{absent}:1"),
        "; registry-1.docker.io: ",
    ] {
        assert!(line.contains(part), "{part:?} in {line}");
    }
}

#[test]
fn root_filesystem_is_read_only_unless_writable() {
    let _m = shared_machine();
    let image = img("debian.sqsh");
    let before = sha256(&image);
    let out = sh(&format!("$FERRY run {image} touch /new-file"));
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );

    // The user owns the overlay's root; the image's root-owned directories stay theirs
    // unless --remap-root makes the user root inside.
    let out = sh(&format!(
        "$FERRY run --writable {image} sh -c 'echo data > /new-file && cat /new-file'"
    ));
    assert_eq!(out.ok(), "data\n");
    let out = sh(&format!("$FERRY run --writable --remap-root {image} sh -c 'echo data > /etc/new-file && rm /etc/ferry-marker && echo removed'"));
    assert_eq!(out.ok(), "removed\n");
    let again = sh(&format!("$FERRY run {image} sh -c 'test -e /new-file -o -e /etc/new-file && echo present || echo absent; cat /etc/ferry-marker'"));
    assert_eq!(again.ok(), "absent\ndebian-image\n");
    assert_eq!(sha256(&image), before, "the image file never changes");

    // A directory image: writes land in memory, the directory stays as it was.
    let dir_image = img("debian");
    let out = sh(&format!(
        "$FERRY run -w {dir_image} sh -c 'echo x > /dir-write && cat /dir-write'"
    ));
    assert_eq!(out.ok(), "x\n");
    assert!(!image_path_exists("debian/dir-write"));
}

fn image_path_exists(rel: &str) -> bool {
    std::path::Path::new(&std::env::var("FERRY_IMAGES").unwrap())
        .join(rel)
        .exists()
}

fn sha256(path: &str) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output_within(COMMAND_LIMIT);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn home_is_mounted_unless_asked_not_to() {
    let _m = shared_machine();
    let token = format!("home-{}", std::process::id());
    let out = sh(&format!(
        "echo {token} > ~/ferry-home-check; $FERRY run {} cat /home/{USER}/ferry-home-check",
        img("busybox.sqsh")
    ));
    assert_eq!(out.ok().trim(), token);
    let out = sh(&format!("$FERRY run --no-mount-home {} sh -c 'test -e /home/{USER}/ferry-home-check && echo seen || echo unseen'", img("busybox.sqsh")));
    assert_eq!(out.ok().trim(), "unseen");
    sh("rm -f ~/ferry-home-check");
}

#[test]
fn bind_mounts_read_write_and_read_only() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let image = img("busybox.sqsh");
    let out = sh(&format!("echo host > {d}/in; $FERRY run --mount {d}:/data {image} sh -c 'cat /data/in; echo inside > /data/out'"));
    assert_eq!(out.ok(), "host\n");
    assert_eq!(
        std::fs::read_to_string(dir.path.join("out")).unwrap(),
        "inside\n"
    );

    let out = sh(&format!(
        "$FERRY run --mount {d}:/data:ro {image} sh -c 'cat /data/in; echo no > /data/ro-write'"
    ));
    assert_ne!(out.code, 0);
    assert!(out.stdout.contains("host"));
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );
    assert!(!dir.path.join("ro-write").exists());

    // pyxis' comma-separated list, and a file bind.
    let out = sh(&format!(
        "$FERRY run --mount {d}:/a,{d}/in:/b.txt:ro {image} sh -c 'cat /a/in /b.txt'"
    ));
    assert_eq!(out.ok(), "host\nhost\n");

    // Sources named through absolute symlinks (as a scratch or project directory often
    // is): a linked directory, a linked file, a link in a parent; and a directory image
    // through a link.
    let out = sh(&format!(
        "mkdir {d}/real && echo linked > {d}/real/in && ln -s {d}/real {d}/dirlink && \
         ln -s {d}/real/in {d}/filelink && \
         $FERRY run --mount {d}/dirlink:/a,{d}/filelink:/b.txt,{d}/dirlink/in:/c.txt {image} \
           cat /a/in /b.txt /c.txt"
    ));
    assert_eq!(out.ok(), "linked\nlinked\nlinked\n");
    let tree = img("busybox");
    let out = sh(&format!(
        "ln -s {tree} {d}/treelink && $FERRY run {d}/treelink cat /etc/ferry-marker"
    ));
    assert_eq!(out.ok(), "busybox-image\n");
}

#[test]
fn workdir_cwd_env_and_image_environment() {
    let _m = shared_machine();
    let image = img("busybox.sqsh");
    // cwd is kept when it exists inside.
    assert_eq!(
        sh(&format!("cd /tmp && $FERRY run {image} pwd"))
            .ok()
            .trim(),
        "/tmp"
    );
    // ... else home.
    assert_eq!(
        sh(&format!("cd /usr/share && $FERRY run {image} pwd"))
            .ok()
            .trim(),
        format!("/home/{USER}")
    );
    // --workdir wins.
    assert_eq!(
        sh(&format!("cd /tmp && $FERRY run --workdir /etc {image} pwd"))
            .ok()
            .trim(),
        "/etc"
    );
    let bad = sh(&format!("$FERRY run --workdir /nonexistent {image} pwd"));
    assert_eq!(bad.code, 125);
    assert!(
        bad.stderr
            .contains("working directory not found in the container: /nonexistent"),
        "{}",
        bad.stderr
    );
    // The image's environment applies, PATH included; --env wins over it.
    let out = sh(&format!(
        "FROM_HOST=h $FERRY run {image} sh -c 'echo $FERRY_IMAGE_VAR $PATH $FROM_HOST'"
    ));
    assert_eq!(out.ok().trim(), "from-busybox-image /bin:/usr/bin h");
    let out = sh(&format!(
        "$FERRY run -e FERRY_IMAGE_VAR=mine --env NEW=1 {image} sh -c 'echo $FERRY_IMAGE_VAR $NEW'"
    ));
    assert_eq!(out.ok().trim(), "mine 1");
}

#[test]
fn exit_status_and_signals_propagate() {
    let _m = shared_machine();
    let image = img("busybox.sqsh");
    assert_eq!(sh(&format!("$FERRY run {image} sh -c 'exit 7'")).code, 7);
    assert_eq!(
        sh(&format!("$FERRY run {image} sh -c 'kill -KILL $$'")).code,
        137
    );
    let out = sh(&format!(
        "$FERRY run {image} sh -c 'trap \"echo got-term; exit 3\" TERM; echo ready; while :; do sleep 0.05; done' > /tmp/ferry-sig-$$ & \
         pid=$!; for i in $(seq 100); do grep -q ready /tmp/ferry-sig-$$ && break; sleep 0.05; done; \
         kill -TERM $pid; wait $pid; echo code=$?; cat /tmp/ferry-sig-$$; rm -f /tmp/ferry-sig-$$"
    ));
    let text = out.ok();
    assert!(
        text.contains("code=3") && text.contains("got-term"),
        "{text}"
    );
    // A background job starts with SIGINT ignored (and under `nohup` SIGHUP is ignored from
    // the start); `env --default-signal` undoes that, as an interactive shell's foreground
    // job has it.
    for (sig, want) in [("HUP", "got-hup"), ("INT", "got-int")] {
        let out = sh(&format!(
            "env --default-signal $FERRY run {image} sh -c 'trap \"echo {want}; exit 0\" {sig}; echo ready; while :; do sleep 0.05; done' > /tmp/ferry-sig-$$ & \
             pid=$!; for i in $(seq 100); do grep -q ready /tmp/ferry-sig-$$ && break; sleep 0.05; done; \
             kill -{sig} $pid; wait $pid; cat /tmp/ferry-sig-$$; rm -f /tmp/ferry-sig-$$"
        ));
        assert!(out.ok().contains(want), "{sig}: {}", out.stdout);
    }
}

#[test]
fn kill_9_of_ferry_leaves_nothing_within_a_second() {
    // Checks every process of the test user: no other test may run meanwhile.
    let _m = exclusive_machine();
    let mounts_before = host_mounts();
    let out = sh(&format!(
        "$FERRY run {} sleep 300 & pid=$!; \
         for i in $(seq 200); do pgrep -u {USER} -f squashfuse >/dev/null && pgrep -u {USER} -x sleep >/dev/null && break; sleep 0.02; done; \
         kill -9 $pid; echo killed",
        img("busybox.sqsh")
    ));
    assert!(out.ok().contains("killed"));
    let left = leftovers_after(USER, Duration::from_secs(1));
    assert!(left.is_empty(), "left behind after kill -9: {left:?}");
    assert_eq!(
        host_mounts().matches("squashfuse").count(),
        mounts_before.matches("squashfuse").count()
    );
}

/// Run a failing command and check the one-line error, the exit status and that nothing
/// of it remains.
fn assert_clean_failure(script: &str, code: i32, message: &str) {
    let tmp_before = dir_entries("/tmp");
    let out = sh(script);
    assert_eq!(
        out.code, code,
        "exit status of `{script}`: stderr {}",
        out.stderr
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one error line expected for `{script}`, got: {lines:?}"
    );
    assert!(
        lines[0].starts_with("ferry: error: ") && lines[0].contains(message),
        "`{script}`: {}",
        lines[0]
    );
    let left = leftovers_after(USER, Duration::from_secs(1));
    assert!(left.is_empty(), "left behind after `{script}`: {left:?}");
    let new: Vec<String> = dir_entries("/tmp")
        .into_iter()
        .filter(|e| !tmp_before.contains(e) && e.contains("ferry"))
        .collect();
    assert!(new.is_empty(), "files left in /tmp: {new:?}");
}

#[test]
fn bad_input_fails_with_one_clear_line_and_no_leftovers() {
    // Checks every process of the test user: no other test may run meanwhile.
    let _m = exclusive_machine();
    let image = img("busybox.sqsh");
    assert_clean_failure(
        "$FERRY run /nonexistent/image.sqsh true",
        125,
        "image not found: /nonexistent/image.sqsh",
    );

    let scratch = tempfile::Builder::new()
        .prefix("ferry-root-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let secret = scratch.path().join("secret.sqsh");
    std::fs::copy(&image, &secret).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::set_permissions(
        scratch.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    assert_clean_failure(
        &format!("$FERRY run {} true", secret.display()),
        125,
        &format!("image not readable by user {USER}"),
    );

    let junk = scratch.path().join("junk.img");
    std::fs::write(&junk, b"this is not an image at all").unwrap();
    assert_clean_failure(
        &format!("$FERRY run {} true", junk.display()),
        125,
        "not a squashfs image or root filesystem directory",
    );

    let truncated = scratch.path().join("truncated.sqsh");
    let bytes = std::fs::read(&image).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_failure(
        &format!("$FERRY run {} true", truncated.display()),
        125,
        "truncated",
    );

    assert_clean_failure(
        &format!("PATH=/nonexistent $FERRY run {image} true"),
        125,
        "squashfuse not found",
    );

    assert_clean_failure(
        &format!("$FERRY run -m /nonexistent-src:/x {image} true"),
        125,
        "mount source not found: /nonexistent-src",
    );
    let private = scratch.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    assert_clean_failure(
        &format!("$FERRY run -m {}:/x {image} true", private.display()),
        125,
        &format!(
            "mount source not readable by user {USER}: {}",
            private.display()
        ),
    );
    assert_clean_failure(
        &format!("$FERRY run -m /tmp:/x:bogus {image} true"),
        125,
        "unknown flag `bogus`",
    );
    assert_clean_failure(
        &format!("$FERRY run {image} no-such-command"),
        127,
        "command not found in the container: no-such-command",
    );
}

#[test]
fn unusable_dev_fuse_is_explained() {
    // Checks every process of the test user: no other test may run meanwhile.
    let _m = exclusive_machine();
    // A private mount namespace where /dev/fuse is mode 0600, as on some hosts.
    let script = format!(
        "set -e; d=$(mktemp -d); mknod $d/fuse c 10 229; chmod 0600 $d/fuse; mount --bind $d/fuse /dev/fuse; \
         runuser -u {USER} -- {} run {} true; echo code=$?",
        ferry_bin().display(),
        img("busybox.sqsh")
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "bash", "-c", &script])
        .output_within(COMMAND_LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/dev/fuse is not usable by user ferrytest")
            && stderr.contains("chmod 0666 /dev/fuse"),
        "{stderr}"
    );
    assert!(leftovers_after(USER, Duration::from_secs(1)).is_empty());
}

#[test]
fn disabled_user_namespaces_are_explained() {
    // Checks every process of the test user: no other test may run meanwhile.
    let _m = exclusive_machine();
    // user.max_user_namespaces is per user namespace: set it to 0 in a namespace that maps
    // every uid to itself, and run ferry as the test user in there. (The shell execs again
    // once the map is written: only then is it root, with capabilities, in there.)
    use std::io::Write;
    let uid = uid_of(USER);
    let script = format!(
        "read go; exec sh -c 'echo 0 > /proc/sys/user/max_user_namespaces && \
         exec setpriv --reuid {uid} --regid {uid} --clear-groups env HOME=/home/{USER} {} run {} true'",
        ferry_bin().display(),
        img("busybox.sqsh")
    );
    let mut child = Command::new("unshare")
        .args(["--user", "--", "sh", "-c", &script])
        .current_dir("/")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
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
        "ferry run with user namespaces disabled",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("user.max_user_namespaces=0"), "{stderr}");
    assert!(leftovers_after(USER, Duration::from_secs(1)).is_empty());
}

#[test]
fn an_image_with_only_a_static_binary_runs() {
    let _m = shared_machine();
    // No /etc, /proc, /dev or /home in the image: ferry makes the mount points it needs in
    // memory and the image stays untouched.
    let dir = tempfile::Builder::new()
        .prefix("ferry-static-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(
        image("busybox").join("bin/busybox"),
        root.join("bin/busybox"),
    )
    .unwrap();
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(dir.path())
        .status_within(COMMAND_LIMIT);
    let out = sh(&format!(
        "$FERRY run {} /bin/busybox sh -c 'cat /etc/passwd | grep -c {USER}; /bin/busybox ls /'",
        root.display()
    ));
    let text = out.ok();
    assert!(text.starts_with("1\n"), "{text}");
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        1,
        "the image directory is unchanged"
    );
}

#[test]
fn image_config_sets_the_start_command_workdir_and_environment() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    sh(&format!("cd {d} && {MAKE_CONFIGURED_LAYOUT}")).ok();
    let run = |args: &str| {
        sh(&format!("cd {d} && $FERRY run --cache {d}/cache {args}"))
            .ok()
            .to_string()
    };
    let image = format!("oci:{d}/layout:v1");
    // No command: Entrypoint + Cmd, in WorkingDir, with the config's Env.
    assert_eq!(run(&image), "entry default\n/opt/app\nfrom-config\n");
    // --entrypoint: the arguments replace Cmd.
    assert_eq!(
        run(&format!("--entrypoint {image} -- a b")),
        "entry a b\n/opt/app\nfrom-config\n"
    );
    // A command of the user's runs as it is; the caller's directory is not in the
    // container (/var/tmp), so the image's WorkingDir is where it starts...
    assert_eq!(run(&format!("{image} pwd")), "/opt/app\n");
    // ... while a directory that exists inside is kept, and --workdir wins over both.
    let out = sh(&format!(
        "cd /tmp && $FERRY run --cache {d}/cache {image} pwd"
    ));
    assert_eq!(out.ok(), "/tmp\n");
    assert_eq!(run(&format!("--workdir /bin {image} pwd")), "/bin\n");
    // The config travels inside the image: a copy made with -o starts the same way.
    let copy = sh(&format!(
        "cd {d} && $FERRY import --cache {d}/cache {image} -o {d}/copy.sqsh >/dev/null && $FERRY run {d}/copy.sqsh"
    ));
    assert_eq!(copy.ok(), "entry default\n/opt/app\nfrom-config\n");
    // Imports are lz4 (read fastest) unless asked otherwise; a bad choice is one line.
    let compression = |file: &str| {
        sh(&format!(
            "unsquashfs -s {d}/{file} | sed -n 's/^Compression //p'"
        ))
        .ok()
        .trim()
        .to_string()
    };
    assert_eq!(compression("copy.sqsh"), "lz4");
    sh(&format!(
        "$FERRY import --cache {d}/cache-zstd --compression zstd:5 {image} -o {d}/zstd.sqsh >/dev/null"
    ))
    .ok();
    assert_eq!(compression("zstd.sqsh"), "zstd");
    let out = sh(&format!(
        "$FERRY import --cache {d}/cache-bad --compression brotli {image}"
    ));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("`brotli`: expected lz4, zstd or zstd:LEVEL"),
        "{}",
        out.stderr
    );
}

#[test]
fn enroot_images_start_through_etc_rc() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    sh(&format!(
        r#"set -e; cd {d}; cp -a "$FERRY_IMAGES/busybox" root
        printf '%s\n' 'echo "rc $#"' 'if [ $# -gt 0 ]; then exec "$@"; fi' 'echo rc-default' > root/etc/rc
        mksquashfs root rc.sqsh -all-root -quiet -no-progress >/dev/null"#
    ))
    .ok();
    let run = |args: &str| sh(&format!("$FERRY run {args}")).ok().to_string();
    assert_eq!(run(&format!("{d}/rc.sqsh")), "rc 0\nrc-default\n");
    assert_eq!(
        run(&format!("--entrypoint {d}/rc.sqsh -- echo hi")),
        "rc 2\nhi\n"
    );
    // Without --entrypoint the command runs directly, as pyxis does by default.
    assert_eq!(run(&format!("{d}/rc.sqsh echo hi")), "hi\n");
}

/// `auto`, the default provider: the first run starts at once on squashfuse (another file
/// system than the tree's) and says nothing, while ferry unpacks the image's tree in the
/// background; the runs after it use that tree. A cache in memory (tmpfs) gets no tree.
#[test]
fn the_default_provider_runs_on_squashfuse_until_its_background_unpack_is_done() {
    // Exclusive: the unpack goes on after the first run, which the tests that look for the
    // user's leftover processes must not see.
    let _m = exclusive_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let image = img("debian.sqsh");
    let uid = uid_of(USER);
    // Without FERRY_ROOTFS (the suites' pin) or --rootfs: the default.
    let run =
        format!("env -u FERRY_ROOTFS $FERRY run --cache {d}/cache {image} stat -c %i /bin/ls");
    let out = sh(&run);
    let first: u64 = out.ok().trim().parse().unwrap();
    assert_eq!(out.stderr, "", "the first run says nothing");
    // The tree appears whole (renamed into place), then its unpacker ends. (`[d]`: so that
    // pgrep does not find the shell of this loop.)
    let waited = sh(&format!(
        "for i in $(seq 600); do \
           ls {d}/cache/unpacked-{uid}/*/rootfs/bin/ls >/dev/null 2>&1 \
             && ! pgrep -u {USER} -f 'unpack-in-backgroun[d]' >/dev/null && break; \
           sleep 0.1; done; \
         stat -c %i {d}/cache/unpacked-{uid}/*/rootfs/bin/ls"
    ));
    let tree: u64 = waited.ok().trim().parse().unwrap();
    assert_ne!(first, tree, "the first run was on squashfuse");
    let out = sh(&run);
    assert_eq!(
        out.ok().trim().parse::<u64>().unwrap(),
        tree,
        "then on the tree"
    );
    assert_eq!(out.stderr, "");
    // `--rootfs auto` with the cache on tmpfs: no unpack (it would take the node's memory),
    // and the reason where the log asks for it.
    let shm = sh("mktemp -d -p /dev/shm ferry-auto.XXXXXX")
        .ok()
        .trim()
        .to_string();
    let out = sh(&format!(
        "FERRY_LOG=info $FERRY run --cache {shm}/cache --rootfs auto {image} true;          sleep 1; pgrep -u {USER} -f 'unpack-in-backgroun[d]'; ls {shm}/cache"
    ));
    let _ = sh(&format!("rm -rf {shm}"));
    assert!(
        !out.stdout.contains("unpacked-"),
        "no tree in memory: {}",
        out.stdout
    );
    assert!(
        out.stderr
            .contains(&format!("{shm}/cache is on tmpfs, not a local disk")),
        "{}",
        out.stderr
    );
}

#[test]
fn the_unpack_provider_unpacks_once_shares_read_only_and_gc_spares_trees_in_use() {
    // Exclusive: a container stays up for seconds here, which the tests that look for the
    // user's leftover processes must not see.
    let _m = exclusive_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let image = img("busybox.sqsh");
    let uid = uid_of(USER);
    let run = format!("$FERRY run --cache {d}/cache --rootfs unpack");
    // Four first uses at once: all run, one tree is made.
    let out = sh(&format!(
        "for i in 1 2 3 4; do {run} {image} cat /etc/ferry-marker & done; wait"
    ));
    assert_eq!(out.ok(), "busybox-image\n".repeat(4));
    let trees = dir_entries(&format!("{d}/cache/unpacked-{uid}"));
    assert_eq!(trees.len(), 1, "{trees:?}");
    let tree = format!("{d}/cache/unpacked-{uid}/{}/rootfs", trees[0]);
    // Later containers use that tree itself (the same inode), read-only...
    let host_inode = std::fs::metadata(format!("{tree}/bin/busybox"))
        .unwrap()
        .ino();
    let out = sh(&format!(
        "{run} {image} sh -c 'stat -c %i /bin/busybox; touch /new'"
    ));
    assert_eq!(out.stdout, format!("{host_inode}\n"));
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );
    // ... and with --writable the writes stay out of it.
    sh(&format!(
        "{run} --writable {image} sh -c 'touch /new && rm /bin/ls'"
    ))
    .ok();
    assert!(!std::path::Path::new(&format!("{tree}/new")).exists());
    assert!(std::path::Path::new(&format!("{tree}/bin/ls")).exists());
    // A container using the tree does not hold up the next one: a second run starts and
    // ends while the first is still running (they were serialised once, which deadlocked a
    // multi-node step whose nodes share the directory).
    let out = sh(&format!(
        "{run} {image} sleep 4 & sleep 0.5; s=$(date +%s%N); {run} {image} true; \
         echo $(( ($(date +%s%N) - s) / 1000000 )); wait"
    ));
    let ms: u64 = out.ok().trim().parse().unwrap();
    assert!(
        ms < 2000,
        "the second container waited {ms} ms for the first"
    );
    // gc leaves a tree in use alone and removes it once unused.
    let out = sh(&format!(
        "{run} {image} sleep 3 & sleep 1; $FERRY gc --cache {d}/cache; \
         ls {d}/cache/unpacked-{uid} | wc -l; wait; \
         $FERRY gc --cache {d}/cache | grep -c 'removed 1 unpacked'; ls {d}/cache/unpacked-{uid} | wc -l"
    ));
    assert_eq!(
        out.ok()
            .lines()
            .filter(|l| !l.starts_with("removed 0"))
            .collect::<Vec<_>>(),
        ["1", "1", "0"]
    );
    // An unknown provider is one line.
    let bad = sh(&format!("$FERRY run --rootfs fancy {image} true"));
    assert_eq!(bad.code, 125);
    assert_eq!(bad.stderr.lines().count(), 1, "{}", bad.stderr);
    assert!(bad
        .stderr
        .contains("--rootfs fancy: unknown provider (known: squashfuse, unpack, kernel, auto)"));
}

#[test]
fn sif_images_run_in_place_and_a_sif_without_a_root_filesystem_is_one_line() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let fixtures = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../launcher/tests/fixtures/sif"
    );
    // The Sylabs fixtures hold no programs: a static busybox is bound in to read them.
    let tools = format!("-m {}/bin:/ferry-tools:ro", img("busybox"));
    for sif in [
        "one-group.sif",
        "two-groups.sif",
        "one-group-signed-pgp.sif",
    ] {
        let out = sh(&format!(
            "$FERRY run --cache {d}/cache {tools} {fixtures}/{sif} /ferry-tools/busybox cat /hello.txt"
        ));
        assert_eq!(out.ok(), "Hello from Sylabs!\n", "{sif}");
    }
    // Nothing was copied or imported: the cache holds no image.
    let cached = sh(&format!("find {d} -type f | wc -l"))
        .ok()
        .trim()
        .to_string();
    assert_eq!(cached, "0");
    // The root file system is the SIF's partition, mounted by squashfuse at its offset.
    let out = sh(&format!(
        "$FERRY run {tools} {fixtures}/one-group.sif /ferry-tools/busybox ls /"
    ));
    assert!(out.ok().contains("hello.txt"), "{}", out.stdout);
    for (sif, why) in [
        ("empty.sif", "no root file system partition"),
        (
            "one-object-generic-json.sif",
            "no root file system partition",
        ),
    ] {
        let bad = sh(&format!(
            "$FERRY run {tools} {fixtures}/{sif} /ferry-tools/busybox true"
        ));
        assert_eq!(bad.code, 125, "{sif}: {}", bad.stderr);
        assert_eq!(bad.stderr.lines().count(), 1, "{sif}: {}", bad.stderr);
        assert!(
            bad.stderr.contains(why) && bad.stderr.contains(sif),
            "{}",
            bad.stderr
        );
    }
}

#[test]
fn layers_pushed_with_skopeo_come_back_file_for_file() {
    let _m = shared_machine();
    let registry = std::env::var("FERRY_TEST_REGISTRY")
        .ok()
        .filter(|r| !r.is_empty())
        .expect("FERRY_TEST_REGISTRY is not set: integration/test starts the test registry");
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let repo = format!("{registry}/ferry/layered-{}", std::process::id());
    sh(&format!(
        "cd {d} && {MAKE_LAYERED_LAYOUT}\n \
         skopeo --insecure-policy copy -q --dest-tls-verify=false oci:{d}/layout:v1 docker://{repo}:v1 && \
         skopeo --insecure-policy copy -q oci:{d}/layout:v1 docker-archive:{d}/layered.tar:ferry/layered:v1"
    ))
    .ok();
    let list = |image: &str| {
        sh(&format!(
            "FERRY_INSECURE_REGISTRIES={registry} $FERRY run --cache {d}/cache -m {d}:/t {image} sh /t/list.sh"
        ))
        .ok()
        .to_string()
    };
    // Whiteouts, the opaque directory, the hardlink and the symlink, pulled from a registry
    // and read from a docker-archive that skopeo wrote.
    assert_eq!(list(&format!("docker://{repo}:v1")), LAYERED_DATA);
    assert_eq!(
        list(&format!("docker-archive:{d}/layered.tar")),
        LAYERED_DATA
    );
    assert_eq!(list(&format!("oci:{d}/layout:v1")), LAYERED_DATA);
}

#[test]
fn hostile_layers_are_refused_in_one_line_and_leave_nothing() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    // mklayout NAME LAYER-FILE MEDIA-SUFFIX: a one-layer OCI layout in NAME/ (tag v1). The
    // diff_id is not checked against anything here: these layers must fail before that.
    let setup = format!(
        r#"set -eu; cd {d}; mkdir outside
mklayout() {{
  mkdir -p "$1/blobs/sha256"
  l=$(sha256sum "$2" | cut -d' ' -f1); cp "$2" "$1/blobs/sha256/$l"; ls=$(stat -c %s "$2")
  printf '{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["sha256:%s"]}}}}' "$l" > c.json
  c=$(sha256sum c.json | cut -d' ' -f1); cp c.json "$1/blobs/sha256/$c"
  printf '{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar%s","digest":"sha256:%s","size":%s}}]}}' "$c" "$(stat -c %s c.json)" "$3" "$l" "$ls" > m.json
  m=$(sha256sum m.json | cut -d' ' -f1); cp m.json "$1/blobs/sha256/$m"
  printf '{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{{"org.opencontainers.image.ref.name":"v1"}}}}]}}' "$m" "$(stat -c %s m.json)" > "$1/index.json"
  printf '{{"imageLayoutVersion":"1.0.0"}}' > "$1/oci-layout"
}}
mkdir src; printf evil > src/evil
# ../ in a member name (GNU tar keeps it only with -P).
tar -P --transform 's,^src/,../../outside/,' -cf dotdot.tar src/evil; mklayout dotdot dotdot.tar ""
# A symlink to outside, then a file written through it.
mkdir sl; ln -s {d}/outside sl/esc; tar -C sl -cf sl.tar esc; mkdir -p sl2/esc; printf evil > sl2/esc/pwned
tar -C sl2 -rf sl.tar esc/pwned; mklayout symlink sl.tar ""
# An absolute member name.
tar -P --transform 's,^src/,{d}/outside/abs-,' -cf abs.tar src/evil; mklayout absolute abs.tar ""
# A truncated gzip layer.
tar -C "$FERRY_IMAGES/busybox" -czf full.tgz .; head -c 100000 full.tgz > cut.tgz; mklayout truncated cut.tgz "+gzip"
# A layer blob whose content no longer matches its digest (one byte changed).
tar -cf ok.tar src/evil; mklayout corrupt ok.tar ""
printf X | dd of="corrupt/blobs/sha256/$(sha256sum ok.tar | cut -d' ' -f1)" bs=1 seek=600 conv=notrunc status=none
$FERRY import --cache {d}/cache oci:{d}/symlink:v1 >/dev/null 2>&1 || true
# Lock files are empty and harmless; the entries, refs and work areas must not change.
find {d}/cache -type f ! -path '*/locks/*' | sort > before.txt
"#
    );
    sh(&setup).ok();
    for (layout, why) in [
        ("dotdot", "refusing layer entry '../../outside/evil'"),
        ("symlink", "refusing layer entry 'esc': it is a symlink"),
        ("truncated", "cannot read layer"),
        ("corrupt", "is corrupt: its content hashes to"),
    ] {
        let out = sh(&format!(
            "$FERRY import --cache {d}/cache oci:{d}/{layout}:v1"
        ));
        assert_ne!(out.code, 0, "{layout}: {}", out.stdout);
        assert_eq!(out.stderr.lines().count(), 1, "{layout}: {}", out.stderr);
        assert!(out.stderr.contains(why), "{layout}: {}", out.stderr);
        // Nothing written outside, nothing left in the cache.
        assert_eq!(
            dir_entries(&format!("{d}/outside")),
            Vec::<String>::new(),
            "{layout}"
        );
        let after = sh(&format!(
            "find {d}/cache -type f ! -path '*/locks/*' | sort | diff {d}/before.txt - && echo same"
        ));
        assert_eq!(after.stdout, "same\n", "{layout}: the cache changed");
    }
    // An absolute member name lands inside the image, as docker and OCI have it.
    let out = sh(&format!(
        "$FERRY import --cache {d}/cache oci:{d}/absolute:v1 | xargs -I{{}} unsquashfs -l {{}} | grep -c abs-evil"
    ));
    assert_eq!(out.ok(), "1\n", "{}", out.stderr);
    assert_eq!(dir_entries(&format!("{d}/outside")), Vec::<String>::new());
}

/// What a container shows of the GPUs: its NVIDIA device nodes, then what the probe (which
/// dlopens libcuda.so.1 as the CUDA runtime does) says, then nvidia-smi's first line.
const GPU_REPORT: &str = "ls /dev | grep nvidia | tr '\\n' ' '; echo; \
    /opt/probe/cuda-query; nvidia-smi 2>&1 | head -n1";

#[test]
fn gpus_asked_for_are_the_only_ones_inside_with_the_hosts_driver() {
    let _m = shared_machine();
    let probe = gpu_probe_dir();
    let debian = img("debian.sqsh");
    let out = sh(&format!(
        "$FERRY run --gpus 1,3 -m {probe}:/opt/probe:ro {debian} sh -c \"{GPU_REPORT}\""
    ));
    assert_eq!(
        out.ok(),
        "nvidia-uvm nvidia1 nvidia3 nvidiactl \n\
         libcuda: /usr/lib/ferry-host/libcuda.so.1\n\
         driver version: 12040\n\
         devices: 2\n\
         stand-in nvidia-smi\n",
        "{}",
        out.stderr
    );
    // The loader finds the host's libraries through the image's own cache (no
    // LD_LIBRARY_PATH), and the image itself is unchanged.
    let out = sh(&format!(
        "$FERRY run --gpus all {debian} sh -c 'echo \"LD=$LD_LIBRARY_PATH\"; ldconfig -p | grep -c /usr/lib/ferry-host/; ls /dev | grep -c \"^nvidia[0-9]\"'"
    ));
    assert_eq!(out.ok(), "LD=\n2\n4\n", "{}", out.stderr);
    let out = sh(&format!(
        "$FERRY run {debian} sh -c 'ldconfig -p | grep -c ferry-host; test -e /usr/lib/ferry-host || echo clean'"
    ));
    assert_eq!(out.stdout, "0\nclean\n", "{}", out.stderr);
    // The scheduler's variable chooses when --gpus is not given.
    let out = sh(&format!(
        "CUDA_VISIBLE_DEVICES=2 $FERRY run -m {probe}:/opt/probe:ro {debian} sh -c \"{GPU_REPORT}\""
    ));
    assert!(
        out.ok().starts_with("nvidia-uvm nvidia2 nvidiactl \n"),
        "{}",
        out.stdout
    );
}

#[test]
fn without_gpus_no_nvidia_node_or_driver_file_is_inside() {
    let _m = shared_machine();
    let probe = gpu_probe_dir();
    let out = sh(&format!(
        "$FERRY run -m {probe}:/opt/probe:ro {} sh -c \"{GPU_REPORT}; ls /dev/pts >/dev/null && echo pts; echo shm > /dev/shm/ferry-gpu-test && cat /dev/shm/ferry-gpu-test; rm -f /dev/shm/ferry-gpu-test\"",
        img("debian.sqsh")
    ));
    // The probe finds no library; nvidia-smi is not there; the rest of /dev still works.
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "", "no NVIDIA node: {}", out.stdout);
    assert!(lines[1].starts_with("libcuda: not found"), "{}", out.stdout);
    assert!(lines[2].contains("not found"), "nvidia-smi: {}", out.stdout);
    assert_eq!(&lines[3..], ["pts", "shm"], "{}", out.stdout);
}

#[test]
fn gpu_requests_that_cannot_be_met_are_one_line() {
    let _m = shared_machine();
    gpu_probe_dir();
    assert_clean_failure(
        &format!("$FERRY run --gpus 7 {} true", img("debian.sqsh")),
        125,
        "GPU 7 was asked for, but this node has no /dev/nvidia7",
    );
    assert_clean_failure(
        &format!("$FERRY run --gpus 0,x {} true", img("debian.sqsh")),
        125,
        "GPU list `0,x`",
    );
}

#[test]
fn an_image_without_ldconfig_finds_the_driver_through_ld_library_path() {
    let _m = shared_machine();
    gpu_probe_dir();
    let out = sh(&format!(
        "$FERRY run --gpus 0 {} sh -c 'echo $LD_LIBRARY_PATH; ls /usr/lib/ferry-host'",
        img("busybox.sqsh")
    ));
    assert_eq!(
        out.ok(),
        "/usr/lib/ferry-host\nlibcuda.so.1\nlibnvidia-ml.so.1\n",
        "{}",
        out.stderr
    );
}

#[test]
fn a_saved_gpu_container_keeps_none_of_the_hosts_driver_files() {
    // Saving takes seconds, and the leftover checks of other tests would see it.
    let _m = exclusive_machine();
    let probe = gpu_probe_dir();
    let work = UserDir::new(USER);
    let w = work.path.display();
    let out = sh(&format!(
        "$FERRY run --gpus 0 --keep {w}/c -m {probe}:/opt/probe:ro {} sh -c '/opt/probe/cuda-query | head -n1; echo kept > /kept' && \
         $FERRY save {w}/c/rootfs {w}/saved.sqsh && \
         $FERRY run {w}/saved.sqsh sh -c 'cat /kept; test -e /usr/lib/ferry-host || echo no-lib-dir; test -e /usr/bin/nvidia-smi || echo no-smi'",
        img("debian.sqsh")
    ));
    assert_eq!(
        out.ok(),
        "libcuda: /usr/lib/ferry-host/libcuda.so.1\nkept\nno-lib-dir\nno-smi\n",
        "{}",
        out.stderr
    );
}

#[test]
fn rootfs_kernel_is_for_root_and_leaves_no_loop_device() {
    let _m = shared_machine();
    let (debian, busybox) = (img("debian.sqsh"), img("busybox.sqsh"));
    let sif = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../launcher/tests/fixtures/sif/one-group.sif"
    );
    let images = [debian.as_str(), busybox.as_str(), sif];
    let squashfs_mounts = || -> Vec<String> {
        host_mounts()
            .lines()
            .filter(|l| l.contains(" - squashfs "))
            .map(str::to_string)
            .collect()
    };
    let host_squashfs = squashfs_mounts();
    // A user gets one line: it needs root, or the plugin where the site enables it.
    let bad = sh(&format!("$FERRY run --rootfs kernel {busybox} true"));
    assert_eq!(bad.code, 125, "{}", bad.stderr);
    assert_eq!(bad.stderr.lines().count(), 1, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("--rootfs kernel needs root")
            && bad.stderr.contains("kernel_squashfs=yes"),
        "{}",
        bad.stderr
    );
    // An admin (root) testing it: the kernel's read-only squashfs is the root, a SIF's
    // partition too, and --writable puts an overlay on top.
    let as_root = |args: &[&str]| {
        let out = Command::new(ferry_bin())
            .arg("run")
            .args(args)
            .current_dir("/")
            .output_within(COMMAND_LIMIT);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // An image with every mount point (the test image lacks /etc/hosts), so no overlay.
    let dir = UserDir::new(USER);
    let with_hosts = debian_with_name_service_files(&dir);
    let root = as_root(&[
        "--rootfs",
        "kernel",
        "--no-mount-home",
        &with_hosts,
        "head",
        "-1",
        "/proc/self/mountinfo",
    ]);
    assert!(
        root.contains(" / / ro,nosuid,nodev") && root.contains(" - squashfs /dev/loop"),
        "{root}"
    );
    let tools = format!("{}/bin:/ferry-tools:ro", img("busybox"));
    let hello = as_root(&[
        "--rootfs",
        "kernel",
        "-m",
        &tools,
        sif,
        "/ferry-tools/busybox",
        "cat",
        "/hello.txt",
    ]);
    assert_eq!(hello, "Hello from Sylabs!\n");
    let wrote = as_root(&[
        "--rootfs",
        "kernel",
        "-w",
        &busybox,
        "sh",
        "-c",
        "echo x > /new && cat /new",
    ]);
    assert_eq!(wrote, "x\n");
    // The loop devices went with their mounts; nothing was mounted in the host's namespace.
    let start = std::time::Instant::now();
    let left = loop {
        let out = Command::new("losetup")
            .arg("-a")
            .output_within(COMMAND_LIMIT);
        let left: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| images.iter().any(|i| l.contains(i)))
            .map(str::to_string)
            .collect();
        if left.is_empty() || start.elapsed() > Duration::from_secs(5) {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(left.is_empty(), "{left:#?}");
    assert_eq!(squashfs_mounts(), host_squashfs);
}

#[test]
fn a_test_command_that_hangs_fails_within_its_limit_in_one_line() {
    // Checks every process of the test user: no other test may run meanwhile.
    let _m = exclusive_machine();
    // A command that ignores the signal it would be stopped with and waits: the harness
    // kills it and everything it started, and fails the test with one line.
    let hung = std::panic::catch_unwind(|| {
        sh_as_within(
            USER,
            "trap '' TERM HUP INT; sleep 600 & sleep 601; wait",
            Duration::from_secs(2),
        )
    });
    let message = match hung {
        Ok(run) => panic!("a hung command returned: exit {}", run.code),
        Err(e) => e
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| format!("{e:?}")),
    };
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.starts_with("timed out after 2 s waiting for `trap '' TERM HUP INT; sleep 600"),
        "{message}"
    );
    let left = leftovers_after(USER, Duration::from_secs(5));
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn names_resolve_through_the_hosts_files_whatever_the_image_ships() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    // An image with an empty resolv.conf and hosts and no nsswitch.conf, as registry
    // images ship them: inside, a name only the host's /etc/hosts knows resolves, and the
    // files are the host's, for every kind of image and root filesystem.
    let (sqsh, tree) = debian_without_name_service(&dir);
    let (name, _) = host_only_name();
    let probe = name_service_probe(&name);
    let on_host = sh(&probe);
    let expected = on_host.ok();
    assert!(
        expected
            .trim_end()
            .lines()
            .last()
            .is_some_and(|a| !a.is_empty()),
        "the host resolves {name}: {expected}"
    );
    let unpack = format!("--cache {d}/cache --rootfs unpack");
    let cases = [
        ("", &sqsh),
        ("--writable", &sqsh),
        ("--remap-root --writable", &sqsh),
        ("--remap-root", &sqsh),
        (unpack.as_str(), &sqsh),
        ("", &tree),
        ("--writable", &tree),
    ];
    for (options, image) in cases {
        let out = sh(&format!("$FERRY run {options} {image} sh -c '{probe}'"));
        assert_eq!(
            out.ok(),
            expected,
            "ferry run {options} {image}: {}",
            out.stderr
        );
    }
    // An image's own nsswitch.conf stays: it names what its C library has.
    let own = std::fs::read_to_string(image("debian").join("etc/nsswitch.conf")).unwrap();
    let out = sh(&format!(
        "$FERRY run {} cat /etc/nsswitch.conf",
        img("debian.sqsh")
    ));
    assert_eq!(out.ok(), own);
}

#[test]
fn a_saved_container_leaves_out_the_mount_point_of_the_hosts_nsswitch_conf() {
    // Saving takes seconds, and the leftover checks of other tests would see it.
    let _m = exclusive_machine();
    let work = UserDir::new(USER);
    let w = work.path.display();
    // busybox has no nsswitch.conf: the host's is bound on an empty file made for it,
    // which a saved image must not keep (containers of it would then miss the host's).
    let out = sh(&format!(
        "$FERRY run --keep {w}/c {} true && $FERRY save {w}/c/rootfs {w}/saved.sqsh && \
         unsquashfs -l {w}/saved.sqsh etc/nsswitch.conf | grep -c nsswitch; \
         $FERRY run {w}/saved.sqsh cat /etc/nsswitch.conf",
        img("busybox.sqsh")
    ));
    let host = std::fs::read_to_string("/etc/nsswitch.conf").unwrap();
    assert_eq!(out.ok(), format!("0\n{host}"), "{}", out.stderr);
}

#[test]
fn an_archive_import_says_what_it_does_and_a_refused_one_stays_one_line() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    sh(&format!(
        "cd {d} && {MAKE_LAYERED_LAYOUT}\n \
         tar -C layout -cf layout.tar . && \
         skopeo --insecure-policy copy -q oci:{d}/layout:v1 docker-archive:{d}/docker.tar:ferry/layered:v1 && \
         printf 'not an archive' > bad.tar"
    ))
    .ok();
    let images = [
        format!("oci-archive:{d}/layout.tar"),
        format!("docker-archive:{d}/docker.tar"),
        format!("oci:{d}/layout:v1"),
    ];
    for (n, image) in images.iter().enumerate() {
        // Not a terminal: a start line naming the image, where and how big, then the end
        // line with the time and the squashfs's size (progress lines between when it lasts).
        let import = format!("$FERRY import --cache {d}/cache{n} {image}");
        let out = sh(&import);
        out.ok();
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert!(
            lines.len() >= 2
                && lines[0].starts_with(&format!("ferry: importing {image} on "))
                && lines[0].contains(" (3 layers, "),
            "{lines:#?}"
        );
        let last = lines.last().copied().unwrap_or_default();
        assert!(
            last.starts_with(&format!("ferry: imported {image} in "))
                && last.ends_with(" squashfs)"),
            "{lines:#?}"
        );
        for l in &lines[1..lines.len() - 1] {
            assert!(
                l.starts_with(&format!("ferry: importing {image}: ")),
                "{lines:#?}"
            );
        }
        // Cached: nothing to say.
        let out = sh(&import);
        out.ok();
        assert_eq!(out.stderr, "", "{image}");
    }
    // On a terminal (`script`): the same end line below the bar, then the image's path.
    let out = sh(&format!(
        "TERM=xterm script -qec \"$FERRY import --cache {d}/tty {}\" /dev/null",
        images[0]
    ));
    let screen = out.ok().replace("\r\n", "\n");
    assert!(
        screen.contains(&format!("ferry: imported {} in ", images[0]))
            && screen.trim_end().ends_with(".sqsh"),
        "{screen}"
    );
    // Refused input: one line, on a terminal too, and nothing cached.
    for image in [
        format!("docker-archive:{d}/bad.tar"),
        format!("oci-archive:{d}/bad.tar"),
        format!("oci-archive:{d}/missing.tar"),
    ] {
        let out = sh(&format!("$FERRY import --cache {d}/refused {image}"));
        assert_ne!(out.code, 0, "{image}");
        assert_eq!(out.stderr.lines().count(), 1, "{image}: {}", out.stderr);
        assert!(out.stderr.contains(&format!("{d}/")), "{}", out.stderr);
        let out = sh(&format!(
            "TERM=xterm script -qec \"$FERRY import --cache {d}/refused {image}\" /dev/null"
        ));
        let screen = out.stdout.replace("\r\n", "\n");
        assert_eq!(screen.trim_end().lines().count(), 1, "{image}: {screen:?}");
    }
}

/// What cannot be checkpointed is refused in one line before anything starts, and a
/// directory without a checkpoint is not restored.
#[test]
fn checkpoint_refusals_are_one_line() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display();
    let gpus = sh(&format!(
        "$FERRY run --checkpoint-dir {d}/ck --gpus 0 {} true",
        img("busybox.sqsh")
    ));
    assert_ne!(gpus.code, 0);
    assert_eq!(
        gpus.stderr.trim(),
        format!("ferry: error: --checkpoint-dir {d}/ck: a container with GPUs cannot be checkpointed: CRIU cannot save GPU state (use --gpus none)")
    );
    assert!(
        !dir.path.join("ck").join("container.json").exists(),
        "nothing may be left for a restore"
    );
    let restore = sh(&format!("$FERRY restore {d}"));
    assert_ne!(restore.code, 0);
    assert_eq!(
        restore.stderr.trim(),
        format!("ferry: error: {d} holds no checkpoint (no container.json): make one with `ferry run --checkpoint-dir {d} ...` and `ferry checkpoint {d}`")
    );
}

#[test]
fn timings_name_each_phase_of_the_start_and_the_command_still_runs() {
    let _m = shared_machine();
    // debian lacks the home directory's mount point: the overlay phase is in the start.
    let out = sh(&format!(
        "$FERRY run --timings {} cat /etc/ferry-marker",
        img("debian.sqsh")
    ));
    assert_eq!(out.ok().trim(), "debian-image");
    let phases: Vec<&str> = out
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("ferry: timing: ")?.strip_suffix(" ms"))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(_, ms)| ms.parse::<f64>().is_ok())
        .map(|(name, _)| name.trim())
        .collect();
    for phase in [
        "holder process",
        "user namespace",
        "staging tmpfs",
        "squashfuse start",
        "squashfuse ready",
        "overlay",
        "binds",
        "/dev",
        "passwd/group",
        "pivot_root",
        "enter container",
        "exec",
        "total",
        "command",
        "stop",
    ] {
        assert!(
            phases.contains(&phase),
            "no {phase} in {phases:?}:\n{}",
            out.stderr
        );
    }
    // Without the flag, nothing of it.
    let quiet = sh(&format!("$FERRY run {} true", img("busybox.sqsh")));
    quiet.ok();
    assert!(!quiet.stderr.contains("timing"), "{}", quiet.stderr);
    // The same phases under FERRY_LOG=debug, from the holder and ferry itself.
    let logged = sh(&format!(
        "FERRY_LOG=debug $FERRY run {} true",
        img("busybox.sqsh")
    ));
    logged.ok();
    for phase in ["squashfuse ready", "/dev", "pivot_root", "exec"] {
        assert!(
            logged.stderr.contains(&format!("phase {phase}: ")),
            "no {phase} in {}",
            logged.stderr
        );
    }
}

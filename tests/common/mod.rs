//! Shared helpers for the end-to-end tests.
//!
//! The tests need what `integration/test` prepares: the `ferry` binary at `$FERRY_BIN`,
//! test images under `$FERRY_IMAGES`, and the unprivileged users `ferrytest` and
//! `ferrytest2`. A missing piece fails the test with the command that provides it; a test
//! never skips silently.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

pub const USER: &str = "ferrytest";
pub const OTHER_USER: &str = "ferrytest2";

fn required_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{name} is not set: run the tests through `integration/test`, which builds ferry and the test images"),
    }
}

/// The ferry binary the tests run (readable and executable by the test users).
pub fn ferry_bin() -> PathBuf {
    let p = PathBuf::from(required_env("FERRY_BIN"));
    assert!(
        p.is_file(),
        "FERRY_BIN={} does not exist: run `integration/test`",
        p.display()
    );
    p
}

/// A test image by name (e.g. `busybox.sqsh`, `debian`).
pub fn image(name: &str) -> PathBuf {
    let p = Path::new(&required_env("FERRY_IMAGES")).join(name);
    assert!(
        p.exists(),
        "test image {} is missing: run `integration/build-images`",
        p.display()
    );
    p
}

/// Tests that change machine-wide state (sysctls, /dev/fuse) take the write side; all
/// others the read side, so they never see that state.
static MACHINE: RwLock<()> = RwLock::new(());

pub fn shared_machine() -> RwLockReadGuard<'static, ()> {
    limited::run_cgroup();
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

pub fn exclusive_machine() -> RwLockWriteGuard<'static, ()> {
    limited::run_cgroup();
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        use std::os::unix::process::ExitStatusExt;
        let code = out
            .status
            .code()
            .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0));
        Run {
            code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Assert success and return stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code, 0,
            "command failed (exit {}):\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        &self.stdout
    }
}

/// How long one command of a test may run before the test fails (a hung command must fail
/// its test, not hold CI until its own limit). Longer runs name their limit.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(360);

/// Run a shell command line as `user` (via runuser, with a login-like environment and
/// default signal dispositions, whatever the test command inherited, e.g. under `nohup`),
/// within [`COMMAND_LIMIT`].
/// The suites name the root filesystem provider they test: squashfuse, unless a test says
/// otherwise (`--rootfs`, `--container-rootfs`, `rootfs=`). `auto`, the default, would
/// leave every image's tree behind on the node and unpack each in the background while
/// other tests run; `tests/run.rs` and `tests/plugin.rs` test it where they mean to.
pub const PINNED_ROOTFS: &str = "FERRY_ROOTFS=squashfuse";

pub fn sh_as(user: &str, script: &str) -> Run {
    sh_as_within(user, script, COMMAND_LIMIT)
}

/// [`sh_as`] with its own time limit.
pub fn sh_as_within(user: &str, script: &str, limit: Duration) -> Run {
    assert_user_exists(user);
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", user, "--", "env", "-i", "--default-signal"])
        .arg(format!("HOME=/home/{user}"))
        .arg(format!("USER={user}"))
        .arg(format!("LOGNAME={user}"))
        .arg("PATH=/usr/local/bin:/usr/bin:/bin")
        .arg(format!("FERRY={}", ferry_bin().display()))
        .arg(format!("FERRY_IMAGES={}", required_env("FERRY_IMAGES")))
        .arg(PINNED_ROOTFS)
        .args(extra_env())
        .args(["bash", "-c", script])
        .current_dir("/");
    Run::from(limited::output(cmd, limit, script))
}

/// Test-side limits for commands run directly (not through [`sh_as`]).
pub trait CommandWithin {
    /// `output()`, failing the test after `limit`, with everything the command started
    /// killed.
    fn output_within(&mut self, limit: Duration) -> Output;
    /// `status()` with the same limit (stdout and stderr are captured and dropped).
    fn status_within(&mut self, limit: Duration) -> std::process::ExitStatus;
}

impl CommandWithin for Command {
    fn output_within(&mut self, limit: Duration) -> Output {
        let what = format!("{:?}", self);
        let cmd = std::mem::replace(self, Command::new("true"));
        limited::output(cmd, limit, &what)
    }

    fn status_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        self.output_within(limit).status
    }
}

/// Waits for a child the test spawned itself; fails the test after `limit`.
pub fn wait_within(child: std::process::Child, limit: Duration, what: &str) -> Output {
    limited::wait(child, limit, what, None)
}

pub mod limited {
    //! Commands with a time limit. Each command of a test runs in a cgroup of its own under
    //! `ferry-tests-<pid of the test binary>` (cgroup v2), which nothing it starts can leave
    //! unless Slurm moves it: on timeout every process in it is killed, and a leftover
    //! check can say which command started a process it finds.
    use std::collections::BTreeMap;
    use std::io::Read;
    use std::path::PathBuf;
    use std::process::{Child, Command, Output, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Mutex, OnceLock};
    use std::time::Duration;

    /// This test binary's cgroup directory, where cgroup v2 is mounted (at
    /// /sys/fs/cgroup/unified on a hybrid hierarchy like this machine's, or at
    /// /sys/fs/cgroup). Directories of earlier runs that are empty are removed on the way.
    pub fn run_cgroup() -> Option<PathBuf> {
        static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
        ROOT.get_or_init(|| {
            let base = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.join("cgroup.controllers").exists())?;
            for old in std::fs::read_dir(&base).ok()?.flatten() {
                let name = old.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("ferry-tests-") {
                    if !std::path::Path::new("/proc").join(pid).exists() {
                        let calls = std::fs::read_dir(old.path()).into_iter().flatten();
                        for call in calls.flatten() {
                            let _ = std::fs::remove_dir(call.path());
                        }
                        let _ = std::fs::remove_dir(old.path());
                    }
                }
            }
            let dir = base.join(format!("ferry-tests-{}", std::process::id()));
            // The test binary itself moves into `main`, so that what a test spawns
            // directly is known as the test run's too.
            std::fs::create_dir_all(dir.join("main")).ok()?;
            std::fs::write(
                dir.join("main/cgroup.procs"),
                std::process::id().to_string(),
            )
            .ok()?;
            STARTED
                .lock()
                .unwrap()
                .insert("main".into(), "the test binary".into());
            Some(dir)
        })
        .clone()
    }

    /// Command lines by cgroup name (`c<N>`), for leftover reports.
    static STARTED: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
    static CALLS: AtomicUsize = AtomicUsize::new(0);

    /// Who started the process `pid`: a command of this test run (its line), a Slurm step
    /// of `node_prefixes`' clusters, or none of the tests.
    pub fn origin(pid: &str, node_prefixes: &[String]) -> Origin {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let ours =
            run_cgroup().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
        for line in cgroups.lines() {
            let path = line.splitn(3, ':').nth(2).unwrap_or("");
            if line.starts_with("0::") {
                let mut parts = path.trim_start_matches('/').split('/');
                if let (Some(run), Some(call)) = (parts.next(), parts.next()) {
                    if ours.as_deref() == Some(run) {
                        let what = STARTED.lock().unwrap().get(call).cloned();
                        return Origin::Command(call.to_string(), what.unwrap_or_default());
                    }
                }
            }
            if let Some(rest) = path.strip_prefix("/slurm_") {
                let node = rest.split('/').next().unwrap_or("");
                if node_prefixes.iter().any(|p| node.starts_with(p.as_str())) {
                    let job = rest
                        .split('/')
                        .find(|p| p.starts_with("job_"))
                        .unwrap_or("");
                    return Origin::Slurm(format!("{node} {job}"));
                }
            }
        }
        Origin::Elsewhere
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Origin {
        /// The cgroup of one command (`cN`, or `main`: the test binary) and its line.
        Command(String, String),
        Slurm(String),
        Elsewhere,
    }

    fn one_line(what: &str) -> String {
        let line: String = what.split_whitespace().collect::<Vec<_>>().join(" ");
        match line.char_indices().nth(160) {
            Some((i, _)) => format!("{}…", &line[..i]),
            None => line,
        }
    }

    pub fn output(cmd: Command, limit: Duration, what: &str) -> Output {
        let group = run_cgroup().map(|root| {
            let n = CALLS.fetch_add(1, Ordering::Relaxed);
            let dir = root.join(format!("c{n}"));
            let _ = std::fs::create_dir(&dir);
            STARTED
                .lock()
                .unwrap()
                .insert(format!("c{n}"), one_line(what));
            dir
        });
        let mut wrapped = match &group {
            // The wrapper joins the cgroup, then becomes the command.
            Some(dir) => {
                let mut w = Command::new("sh");
                w.arg("-c")
                    .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                    .arg(dir)
                    .arg(cmd.get_program())
                    .args(cmd.get_args());
                w
            }
            None => {
                let mut w = Command::new(cmd.get_program());
                w.args(cmd.get_args());
                w
            }
        };
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        use std::os::unix::process::CommandExt;
        wrapped
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = wrapped
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", one_line(what)));
        let out = wait(child, limit, what, group.clone());
        if let Some(dir) = group {
            // Left in place (with its note) while something it started still runs.
            let _ = std::fs::remove_dir(&dir);
        }
        out
    }

    fn reader(mut from: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = from.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
        rx
    }

    pub fn wait(mut child: Child, limit: Duration, what: &str, group: Option<PathBuf>) -> Output {
        let stdout = child.stdout.take().map(reader);
        let stderr = child.stderr.take().map(reader);
        let pid = child.id() as i32;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(limit) {
            Ok(status) => status.expect("wait for a test command"),
            Err(_) => {
                if let Some(dir) = &group {
                    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
                }
                for target in [format!("-{pid}"), pid.to_string()] {
                    let _ = Command::new("kill")
                        .args(["-KILL", "--", &target])
                        .stderr(Stdio::null())
                        .status();
                }
                panic!(
                    "timed out after {} s waiting for `{}`; it and what it started were killed",
                    limit.as_secs(),
                    one_line(what)
                );
            }
        };
        // What the command left running may hold its pipes open: take what came.
        let collect = |rx: Option<mpsc::Receiver<Vec<u8>>>| {
            rx.and_then(|rx| rx.recv_timeout(Duration::from_secs(5)).ok())
                .unwrap_or_default()
        };
        Output {
            status,
            stdout: collect(stdout),
            stderr: collect(stderr),
        }
    }
}

fn extra_env() -> Vec<String> {
    ["SLURM_CONF"]
        .iter()
        .filter_map(|n| std::env::var(n).ok().map(|v| format!("{n}={v}")))
        .collect()
}

pub fn sh(script: &str) -> Run {
    sh_as(USER, script)
}

pub fn assert_user_exists(user: &str) {
    let ok = Command::new("id")
        .arg(user)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "test user {user} does not exist: run `integration/test-users`"
    );
}

/// Live (non-zombie) processes of `user` that this test run started (through a command
/// of its own or a step of its Slurm clusters), as "pid command [who started it]" lines.
/// Processes of that user that did not come from the tests (a developer's login, another
/// test run) are left out, and named once on stderr.
pub fn live_processes(user: &str) -> Vec<String> {
    let uid = uid_of(user);
    let nodes = cluster_node_prefixes();
    let mut found = Vec::new();
    let mut elsewhere = Vec::new();
    let mut calls = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .map(|l| l[key.len()..].trim().to_string())
        };
        let Some(uids) = field("Uid:") else { continue };
        let state = field("State:").unwrap_or_default();
        if uids.split_whitespace().next() == Some(uid.to_string().as_str())
            && !state.starts_with('Z')
        {
            let cmd = std::fs::read_to_string(entry.path().join("cmdline"))
                .unwrap_or_default()
                .replace('\0', " ");
            match limited::origin(&name, &nodes) {
                limited::Origin::Command(call, line) => {
                    found.push(format!("{name} {cmd} [test {call}]"));
                    calls.insert(call, line);
                }
                limited::Origin::Slurm(step) => found.push(format!("{name} {cmd} [Slurm {step}]")),
                limited::Origin::Elsewhere => elsewhere.push(name),
            }
        }
    }
    // The command lines behind `[test cN]`, for a failing check's reader (kept out of the
    // lines themselves, which tests match against command names).
    for (call, line) in calls {
        eprintln!("note: test {call} is `{line}`");
    }
    if !elsewhere.is_empty() {
        eprintln!(
            "note: ignoring {} process(es) of {user} that this test run did not start: {}",
            elsewhere.len(),
            elsewhere.join(" ")
        );
    }
    found
}

/// Node names (without a `[1-3]` range) of the test clusters in `SLURM_CONF` and
/// `FERRY_MULTI_SLURM_CONF`: their cgroups are `slurm_<node>`.
fn cluster_node_prefixes() -> Vec<String> {
    ["SLURM_CONF", "FERRY_MULTI_SLURM_CONF"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .filter_map(|conf| std::fs::read_to_string(conf).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("NodeName="))
                .map(|v| v.split([' ', '[']).next().unwrap_or("").to_string())
                .filter(|v| !v.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

pub fn uid_of(user: &str) -> u32 {
    let out = Command::new("id")
        .args(["-u", user])
        .output()
        .expect("id runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric uid")
}

/// Wait up to `limit` for `user` to have no live ferry/squashfuse process; return what is left.
pub fn leftovers_after(user: &str, limit: Duration) -> Vec<String> {
    let start = Instant::now();
    loop {
        let left: Vec<String> = live_processes(user)
            .into_iter()
            .filter(|p| p.contains("ferry") || p.contains("squashfuse") || p.contains("sleep"))
            .collect();
        if left.is_empty() || start.elapsed() > limit {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The host mount table (mounts ferry makes live only in the container's namespace; one
/// showing up here would be a leak).
pub fn host_mounts() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo")
}

/// Entries in a directory (to check nothing new appears).
pub fn dir_entries(dir: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A scratch directory owned by the test user, removed when dropped.
pub struct UserDir {
    pub path: PathBuf,
}

impl UserDir {
    pub fn new(user: &str) -> UserDir {
        let dir = tempfile::Builder::new()
            .prefix("ferry-test-")
            .tempdir_in("/var/tmp")
            .expect("tempdir")
            .keep();
        let status = Command::new("chown")
            .arg(format!("{user}:"))
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(status.success());
        UserDir { path: dir }
    }
}

impl Drop for UserDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// An OCI layout of the busybox tree plus a layer with /opt/app/start.sh, whose config
/// sets Entrypoint, Cmd, WorkingDir and Env. A shell script for the test user, run in an
/// empty directory: leaves the layout in `layout/` with the tag `v1` (tar and sha256sum only).
pub const MAKE_CONFIGURED_LAYOUT: &str = r#"
set -eu
blob() { h=$(sha256sum "$1" | cut -d' ' -f1); mv "$1" "layout/blobs/sha256/$h"; echo "$h"; }
size() { stat -c %s "layout/blobs/sha256/$1"; }
mkdir -p layout/blobs/sha256 app/opt/app
printf '%s\n' 'echo "entry $*"' 'pwd' 'echo "$CFG_VAR"' > app/opt/app/start.sh
tar -C "$FERRY_IMAGES/busybox" -cf l1.tar .
tar -C app -cf l2.tar .
d1=$(sha256sum l1.tar | cut -d' ' -f1); d2=$(sha256sum l2.tar | cut -d' ' -f1)
gzip -n l1.tar
g1=$(blob l1.tar.gz); g2=$(blob l2.tar)
printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin:/usr/bin","CFG_VAR=from-config"],"Entrypoint":["/bin/sh","/opt/app/start.sh"],"Cmd":["default"],"WorkingDir":"/opt/app"},"rootfs":{"type":"layers","diff_ids":["sha256:%s","sha256:%s"]}}' "$d1" "$d2" > config.json
c=$(blob config.json)
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s},{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' "$c" "$(size "$c")" "$g1" "$(size "$g1")" "$g2" "$(size "$g2")" > manifest.json
m=$(blob manifest.json)
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"v1"}}]}' "$m" "$(size "$m")" > layout/index.json
printf '{"imageLayoutVersion":"1.0.0"}' > layout/oci-layout
"#;

/// An OCI layout (tag `v1`, in `layout/`) of three layers that exercise layer application:
/// the busybox tree; then /data with files, a directory, a symlink, a hardlink and a mode;
/// then a layer that replaces a file, deletes one with a whiteout, empties a directory with
/// an opaque marker plus a new file, and whites out a file inside a directory. Also writes
/// `list.sh`, which prints /data as [`LAYERED_DATA`] expects it. For the test user, in an
/// empty directory.
pub const MAKE_LAYERED_LAYOUT: &str = r#"
set -eu
blob() { h=$(sha256sum "$1" | cut -d' ' -f1); mv "$1" "layout/blobs/sha256/$h"; echo "$h"; }
size() { stat -c %s "layout/blobs/sha256/$1"; }
mkdir -p layout/blobs/sha256 l1/data/dir l1/data/opq l2/data/opq l2/data/dir
printf a1 > l1/data/a; printf b > l1/data/b; printf x > l1/data/dir/x; printf old > l1/data/opq/old
printf m > l1/data/mode; chmod 0754 l1/data/mode
ln -s a l1/data/link; ln l1/data/a l1/data/hard
printf a2 > l2/data/a; : > l2/data/.wh.b; : > l2/data/opq/.wh..wh..opq; printf new > l2/data/opq/new
: > l2/data/dir/.wh.x
tar -C "$FERRY_IMAGES/busybox" -cf l0.tar .
tar -C l1 -cf l1.tar data
tar -C l2 -cf l2.tar data
d0=$(sha256sum l0.tar | cut -d' ' -f1); d1=$(sha256sum l1.tar | cut -d' ' -f1); d2=$(sha256sum l2.tar | cut -d' ' -f1)
gzip -n l0.tar; gzip -n l2.tar
g0=$(blob l0.tar.gz); g1=$(blob l1.tar); g2=$(blob l2.tar.gz)
printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin:/usr/bin"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s","sha256:%s","sha256:%s"]}}' "$d0" "$d1" "$d2" > config.json
c=$(blob config.json)
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s},{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s},{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' "$c" "$(size "$c")" "$g0" "$(size "$g0")" "$g1" "$(size "$g1")" "$g2" "$(size "$g2")" > manifest.json
m=$(blob manifest.json)
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"v1"}}]}' "$m" "$(size "$m")" > layout/index.json
printf '{"imageLayoutVersion":"1.0.0"}' > layout/oci-layout
cat > list.sh <<'LIST'
cd /data
find . | sort | while read -r f; do
  if [ -L "$f" ]; then echo "$f -> $(readlink "$f")"
  elif [ -d "$f" ]; then echo "$f/"
  else echo "$f $(stat -c %a "$f") $(cat "$f")"; fi
done
LIST
"#;

/// What `list.sh` prints for the image of [`MAKE_LAYERED_LAYOUT`].
pub const LAYERED_DATA: &str =
    "./\n./a 644 a2\n./dir/\n./hard 644 a1\n./link -> a\n./mode 754 m\n./opq/\n./opq/new 644 new\n";

/// The loopback test registry (`HOST:PORT`) that `integration/registry up` started.
pub fn test_registry() -> String {
    std::env::var("FERRY_TEST_REGISTRY")
        .ok()
        .filter(|r| !r.is_empty())
        .expect("FERRY_TEST_REGISTRY is not set: integration/test starts the test registry")
}

/// The stand-in GPUs of `integration/gpu-standin` (or a machine's real ones): checks that
/// /dev/nvidia0..3 exist and returns the directory holding the `cuda-query` probe, which
/// tests bind into containers.
pub fn gpu_probe_dir() -> String {
    let dir = required_env("FERRY_GPU_PROBE_DIR");
    for i in 0..4 {
        let node = format!("/dev/nvidia{i}");
        assert!(
            Path::new(&node).exists(),
            "{node} is missing: the GPU tests need four GPUs; `integration/gpu-standin up` makes stand-ins"
        );
    }
    assert!(
        Path::new(&dir).join("cuda-query").is_file(),
        "{dir}/cuda-query is missing: run `integration/gpu-standin up`"
    );
    dir
}

/// A batch job's output file without the notes srun prints when a step had to wait for
/// the previous one's resources ("Job step creation temporarily disabled", "Step created
/// for StepId=..."): those depend on timing, not on ferry.
pub fn batch_output(path: &Path) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("batch output {}: {e}", path.display()));
    text.lines()
        .filter(|line| {
            !(line.starts_with("srun: Step created for StepId=")
                || line.starts_with("srun: Job step creation temporarily disabled")
                || line.contains("step creation still disabled, retrying"))
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

/// The things a container step could leave on the node: the user's live processes, the
/// host's mounts of FUSE/overlay file systems, entries in /tmp and /dev/shm.
#[derive(Debug, PartialEq, Eq)]
pub struct NodeState {
    pub processes: Vec<String>,
    pub mounts: Vec<String>,
    pub tmp: Vec<String>,
    pub shm: Vec<String>,
}

/// Entries of `dir` that belong to the test user.
pub fn owned_entries(dir: &str) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let uid = uid_of(USER);
    dir_entries(dir)
        .into_iter()
        .filter(|name| {
            std::fs::symlink_metadata(std::path::Path::new(dir).join(name))
                .is_ok_and(|m| m.uid() == uid)
        })
        .collect()
}

pub fn node_state() -> NodeState {
    let mounts = host_mounts()
        .lines()
        .filter(|l| l.contains("fuse") || l.contains("overlay") || l.contains("ferry"))
        .map(str::to_string)
        .collect();
    NodeState {
        processes: live_processes(USER),
        mounts,
        tmp: owned_entries("/tmp"),
        shm: owned_entries("/dev/shm"),
    }
}

/// Wait up to `limit` for the node to return to `before`; return the last state seen.
pub fn settle_to(before: &NodeState, limit: Duration) -> NodeState {
    let start = Instant::now();
    loop {
        let now = node_state();
        if &now == before || start.elapsed() > limit {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tests/fault_proxy.py` in front of the test registry, faulting `count` requests whose
/// path holds `pattern`; killed when dropped.
pub struct FaultProxy {
    child: std::process::Child,
    pub port: u16,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FaultProxy {
    pub fn start(mode: &str, count: i32, pattern: &str) -> FaultProxy {
        Self::start_on(mode, count, pattern, "0")
    }

    /// On a fixed `[HOST:]PORT`: the plugin's registries must be listed in plugstack.conf,
    /// and integration/test lists 127.0.0.1:15009 and 10.251.17.1:15009 as insecure.
    pub fn start_on(mode: &str, count: i32, pattern: &str, listen: &str) -> FaultProxy {
        use std::io::BufRead;
        let upstream = std::env::var("FERRY_TEST_REGISTRY")
            .expect("FERRY_TEST_REGISTRY is not set: `integration/registry up` and its env");
        let mut child = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/fault_proxy.py"))
            .args([&upstream, mode, &count.to_string(), pattern, listen])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let port: u16 = lines.next().unwrap().unwrap().trim().parse().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        FaultProxy { child, port, log }
    }

    pub fn faults(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("FAULT"))
            .count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// plugstack.conf of the test cluster, rewritten for one test and restored when dropped.
/// srun and each slurmstepd read it afresh, so no daemon restarts.
pub struct Plugstack {
    path: std::path::PathBuf,
    original: String,
}

impl Plugstack {
    pub fn open(slurm_conf: &str) -> Plugstack {
        let conf = std::path::PathBuf::from(slurm_conf);
        let path = conf.parent().unwrap().join("plugstack.conf");
        let original = std::fs::read_to_string(&path).unwrap();
        assert!(
            original.contains("spank_ferry.so"),
            "the test cluster runs without the plugin: {original}"
        );
        Plugstack { path, original }
    }

    /// The plugin line with `args` in place of the current arguments, and the provider
    /// pinned as integration/test pins it (see [`PINNED_ROOTFS`]) unless `args` chooses one.
    pub fn set_args(&self, args: &str) {
        match args.contains("rootfs=") {
            true => self.set_args_unpinned(args),
            false => self.set_args_unpinned(&format!("rootfs=squashfuse {args}")),
        }
    }

    /// The plugin line with only `args` (and ferry_bin): the site's defaults otherwise,
    /// the root filesystem provider's included.
    pub fn set_args_unpinned(&self, args: &str) {
        let line = self
            .original
            .lines()
            .find(|l| l.contains("spank_ferry.so"))
            .unwrap();
        let mut words = line.split_whitespace();
        let (required, so) = (words.next().unwrap(), words.next().unwrap());
        let ferry_bin = words.find(|w| w.starts_with("ferry_bin=")).unwrap_or("");
        std::fs::write(&self.path, format!("{required} {so} {ferry_bin} {args}\n")).unwrap();
    }

    /// The plugin line with `extra` added to its current arguments; other lines kept.
    pub fn add_args(&self, extra: &str) {
        let text: String = self
            .original
            .lines()
            .map(|l| match l.contains("spank_ferry.so") {
                true => format!("{l} {extra}\n"),
                false => format!("{l}\n"),
            })
            .collect();
        std::fs::write(&self.path, text).unwrap();
    }
}

impl Drop for Plugstack {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.original);
    }
}

/// What a cache holds that matters for leftovers: every file and link below `dir` with its
/// size ("path size"). Directories are not listed (ferry's own empty skeleton, made on
/// first use, is no leftover), nor the per-digest lock files under `locks/`, which are
/// empty and stay by design (removing one would race with a process about to take it).
pub fn cache_contents(dir: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from(dir)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                stack.push(p);
            } else if !(p.starts_with(format!("{dir}/locks")) && m.len() == 0) {
                out.push(format!("{} {}", p.display(), m.len()));
            }
        }
    }
    out.sort();
    out
}

/// A variant of the debian test image: `script` runs (as root: the image has files only
/// root may read) in a copy of its tree at `DIR/NAME`, which is then squashed into
/// `DIR/NAME.sqsh`. Returns (squashfs, tree).
pub fn debian_variant(dir: &UserDir, name: &str, script: &str) -> (String, String) {
    let d = dir.path.display();
    let status = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -e; cd {d}; cp -a {} {name}; (cd {name}; {script})\n\
             mksquashfs {name} {name}.sqsh -all-root -quiet -no-progress -noI -noD -noF -noX >/dev/null",
            image("debian").display()
        ))
        .status_within(COMMAND_LIMIT);
    assert!(status.success(), "making the debian variant {name} failed");
    (format!("{d}/{name}.sqsh"), format!("{d}/{name}"))
}

/// The debian test image as most registry images ship it: an empty `/etc/resolv.conf`, an
/// empty `/etc/hosts`, and no `/etc/nsswitch.conf`: (`DIR/deb.sqsh`, `DIR/deb`).
pub fn debian_without_name_service(dir: &UserDir) -> (String, String) {
    debian_variant(
        dir,
        "deb",
        ": > etc/resolv.conf; : > etc/hosts; rm -f etc/nsswitch.conf",
    )
}

/// The debian test image with a mount point for each file of the host's name service
/// (the test image has no `/etc/hosts`), so that a read-only container of it needs no
/// overlay: `DIR/debian-etc.sqsh`.
pub fn debian_with_name_service_files(dir: &UserDir) -> String {
    debian_variant(
        dir,
        "debian-etc",
        "touch etc/hosts etc/resolv.conf etc/nsswitch.conf",
    )
    .0
}

/// A name that the host's `/etc/hosts` gives an address (other than `localhost`, which
/// resolvers may answer without the file, when the file has another), and that address.
pub fn host_only_name() -> (String, String) {
    let hosts = std::fs::read_to_string("/etc/hosts").expect("the host has /etc/hosts");
    let entries: Vec<(String, String)> = hosts
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let addr = words.next()?;
            Some(words.map(move |n| (n.to_string(), addr.to_string())))
        })
        .flatten()
        .collect();
    entries
        .iter()
        .find(|(n, _)| !n.starts_with("localhost") && !n.starts_with("ip6-"))
        .or_else(|| entries.first())
        .cloned()
        .expect("the host's /etc/hosts names a host")
}

/// A shell line that prints the name service as a program sees it: resolv.conf,
/// nsswitch.conf, /etc/hosts, and the address `getent hosts NAME` finds.
pub fn name_service_probe(name: &str) -> String {
    format!(
        "cat /etc/resolv.conf; echo --; cat /etc/nsswitch.conf; echo --; cat /etc/hosts; \
         echo --; getent hosts {name} | cut -d\" \" -f1"
    )
}

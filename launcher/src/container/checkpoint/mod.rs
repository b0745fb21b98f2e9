//! Checkpoint and restore of a `ferry run` container with CRIU (`ferry run
//! --checkpoint-dir DIR`, `ferry checkpoint DIR`, `ferry restore DIR`).
//!
//! CRIU runs inside the container, as the user: in the container's user namespace it has
//! the capabilities it needs (raised into its ambient set) over the container's own
//! namespaces, so it needs no file capabilities and no root. For that the container's
//! namespaces must be the same at the dump as at the restore, so CRIU dumps only processes,
//! never namespaces: the container gets its own PID namespace, whose first process is
//! ferry's [`init`] (never dumped); the command is its child and session leader, with a
//! fresh /proc of that namespace in a mount namespace of its own below the container's.
//! CRIU, a child of the same init, dumps the command's process tree; `ferry restore`
//! builds the same container again from the saved spec, and CRIU restores the tree into
//! the new init's namespace with the same PIDs (clone3 with set_tid, allowed to the
//! namespace's owner). The measurements behind this (what fails as root, with file
//! capabilities, or with the host's PID namespace) are in docs/bench/criu-evidence.txt.
//!
//! Several Slurm tasks on a node share one such container, started by the first ([`tasks`]);
//! a checkpoint stops every process of the namespace, then dumps each task's tree, so that
//! what they share is saved at one moment, and the restore brings every tree back stopped
//! before it lets them all go on.
//!
//! The image is not copied (the saved spec names it by path); the memory, open files and
//! the state of the processes are. The command's standard output and error go to
//! `DIR/output` (a file CRIU can reopen; a terminal or pipe of the host is outside the
//! container), which `ferry run` and `ferry restore` copy to their own stdout as it grows.
//!
//! CRIU's binary comes from the host, and the container's root is the image's: init keeps
//! a descriptor of the host's `/` and starts CRIU through it, with the host's dynamic
//! loader and libraries (`/proc/self/fd/N/...`).

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

pub mod signal;
pub mod tasks;

pub use signal::CheckpointSignal;

use crate::container::exit_code;
use crate::container::holder::PrepareOptions;
use crate::container::join;
use crate::container::run::{self, Prepared, RunError};
use crate::spec::gpus::GpuRequest;
use crate::spec::mounts::MountSpec;
use crate::spec::ContainerSpec;
use crate::sys::raw;

/// The site's switch for checkpoints, and where its CRIU is.
pub const SITE_CONF: &str = "/etc/ferry/checkpoint.conf";
/// Where the checkpoint directory appears inside the container.
pub const INSIDE: &str = "/.ferry-checkpoint";
/// The CRIU series that works on current kernels (3.x fails on their vDSO).
pub const MIN_CRIU_MAJOR: u32 = 4;

// The files of a checkpoint directory.
const SPEC_FILE: &str = "container.json";
const OUTPUT_FILE: &str = "output";
const IMAGES_DIR: &str = "images";
const SUPERVISOR_FILE: &str = "supervisor";
const DONE_FILE: &str = "checkpointed";
const FAILED_FILE: &str = "checkpoint-failed";
/// `/dev/shm` of a checkpointable container: on disk in DIR, so that POSIX shared memory
/// its tasks map outlives them and is there again at the restore.
const SHM_DIR: &str = "shm";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoints are not enabled on this machine: an admin enables them with `enabled=yes` in {SITE_CONF} (see the admin guide)")]
    NotEnabled,
    #[error("cannot read {SITE_CONF}: {0}")]
    ReadSite(io::Error),
    #[error("{SITE_CONF} line {line}: `{text}`: expected enabled=yes|no or criu=/PATH")]
    BadSite { line: usize, text: String },
    #[error("CRIU not found ({0}): install CRIU {MIN_CRIU_MAJOR} or later (Debian 13: apt-get install criu) or name it with criu= in {SITE_CONF}")]
    NoCriu(String),
    #[error("{criu} says its version is `{version}`: checkpoints need CRIU {MIN_CRIU_MAJOR}.0 or later (CRIU 3.x fails on this kernel's vDSO)")]
    OldCriu { criu: String, version: String },
    #[error("a container with GPUs cannot be checkpointed: CRIU cannot save GPU state (use --gpus none)")]
    Gpus,
    #[error("{0} holds a checkpoint already: continue it with `ferry restore {0}` or choose another directory")]
    InUse(String),
    // (`cause`, not `source`: the message says it already, once.)
    #[error("{dir}: {what}: {cause}")]
    Dir {
        dir: String,
        what: &'static str,
        cause: io::Error,
    },
    #[error("{0} holds no checkpoint (no {SPEC_FILE}): make one with `ferry run --checkpoint-dir {0} ...` and `ferry checkpoint {0}`")]
    NoCheckpoint(String),
    #[error("{0} holds a container that is running or was restored already: checkpoint it again first (`ferry checkpoint {0}`)")]
    NotCheckpointed(String),
    #[error("{dir} is another user's checkpoint (uid {owner})")]
    OtherUser { dir: String, owner: u32 },
    #[error("no running container for {0}: its `ferry run` or `ferry restore` has ended")]
    NotRunning(String),
    #[error("the checkpoint of {dir} failed: {reason}")]
    DumpFailed { dir: String, reason: String },
    #[error("the container of {0} ended before its checkpoint was written")]
    EndedFirst(String),
    #[error("bad {file} in {dir}: {reason}")]
    BadFile {
        dir: String,
        file: &'static str,
        reason: String,
    },
    #[error("{dir} holds the checkpoint of {tasks} Slurm tasks: continue it with `srun --ntasks-per-node={tasks} --container-restore={dir} ...`")]
    SlurmTasks { dir: String, tasks: u32 },
    #[error(
        "the container of {dir} runs on {host}, outside Slurm: run `ferry checkpoint {dir}` there"
    )]
    OtherHost { dir: String, host: String },
    #[error("scancel --signal for step {step} failed: {detail}")]
    Scancel { step: String, detail: String },
    #[error(transparent)]
    Tasks(#[from] tasks::TaskError),
    #[error(transparent)]
    Run(#[from] RunError),
}

fn dir_error(dir: &Path, what: &'static str) -> impl FnOnce(io::Error) -> CheckpointError {
    let dir = dir.display().to_string();
    move |cause| CheckpointError::Dir { dir, what, cause }
}

/// What the site allows, from [`SITE_CONF`] (missing: not enabled).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteCheckpoint {
    pub enabled: bool,
    pub criu: Option<PathBuf>,
}

impl SiteCheckpoint {
    pub fn parse(text: &str) -> Result<SiteCheckpoint, CheckpointError> {
        let mut site = SiteCheckpoint::default();
        for (i, raw_line) in text.lines().enumerate() {
            let line = raw_line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || CheckpointError::BadSite {
                line: i + 1,
                text: line.to_string(),
            };
            match line.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                Some(("enabled", "yes")) => site.enabled = true,
                Some(("enabled", "no")) => site.enabled = false,
                Some(("criu", path)) if path.starts_with('/') => site.criu = Some(path.into()),
                _ => return Err(bad()),
            }
        }
        Ok(site)
    }

    pub fn read() -> Result<SiteCheckpoint, CheckpointError> {
        match fs::read_to_string(SITE_CONF) {
            Ok(text) => SiteCheckpoint::parse(&text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(SiteCheckpoint::default()),
            Err(e) => Err(CheckpointError::ReadSite(e)),
        }
    }
}

/// The CRIU program to run, and how to start it from inside a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Criu {
    pub path: PathBuf,
    pub version: String,
    /// Its dynamic loader (PT_INTERP); `None`: a static binary.
    pub interpreter: Option<PathBuf>,
}

/// Find CRIU (the site's, else `criu` on PATH or in /usr/sbin, /sbin) and check its version.
pub fn find_criu(site: &SiteCheckpoint) -> Result<Criu, CheckpointError> {
    let path = match &site.criu {
        Some(p) => p.clone(),
        None => {
            let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default();
            dirs.extend(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
            dirs.into_iter()
                .map(|d| d.join("criu"))
                .find(|p| p.is_file())
                .ok_or_else(|| CheckpointError::NoCriu("not on PATH nor in /usr/sbin".into()))?
        }
    };
    let out = std::process::Command::new(&path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| CheckpointError::NoCriu(format!("{}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_version(&text).unwrap_or_else(|| text.trim().to_string());
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    if major.is_none_or(|m| m < MIN_CRIU_MAJOR) {
        return Err(CheckpointError::OldCriu {
            criu: path.display().to_string(),
            version,
        });
    }
    let bytes =
        fs::read(&path).map_err(|e| CheckpointError::NoCriu(format!("{}: {e}", path.display())))?;
    Ok(Criu {
        path,
        version,
        interpreter: elf_interpreter(&bytes).map(PathBuf::from),
    })
}

/// `Version: 4.1.1` (the first line of `criu --version`) -> `4.1.1`.
fn parse_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
}

/// The program interpreter (PT_INTERP) of a 64-bit little-endian ELF file.
fn elf_interpreter(bytes: &[u8]) -> Option<String> {
    const PT_INTERP: u32 = 3;
    if bytes.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |at: usize| Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    (0..phnum).find_map(|i| {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? != PT_INTERP {
            return None;
        }
        let offset = usize::try_from(u64_at(ph + 8)?).ok()?;
        let size = usize::try_from(u64_at(ph + 32)?).ok()?;
        let raw = bytes.get(offset..offset.checked_add(size)?)?;
        let text = raw.split(|b| *b == 0).next()?;
        Some(String::from_utf8_lossy(text).into_owned())
    })
}

/// Whether this container can be made checkpointable here; returns the CRIU to use.
pub fn allowed(spec: &ContainerSpec) -> Result<Criu, CheckpointError> {
    if spec.gpus != GpuRequest::None {
        return Err(CheckpointError::Gpus);
    }
    let site = SiteCheckpoint::read()?;
    if !site.enabled {
        return Err(CheckpointError::NotEnabled);
    }
    find_criu(&site)
}

/// The variable that makes a Slurm task's `ferry` run the task's command checkpointable,
/// or restore a checkpoint, in place of the command ([`SlurmTask`], set by the plugin's
/// task_init for `--container-checkpoint` and `--container-restore`).
pub const SLURM_TASK_ENV: &str = "FERRY_CHECKPOINT_TASK";

/// What a Slurm task's `ferry` does: the same as `ferry run --checkpoint-dir` (`spec` set)
/// or `ferry restore` (`spec` unset) with `dir`. The task's program, not the step's holder,
/// makes the container: a checkpointable container has a PID namespace of its own, with
/// ferry's init, which only a process that starts the container can give it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlurmTask {
    pub spec: Option<ContainerSpec>,
    pub dir: PathBuf,
    /// The task's argv[0] when `ferry` took its place (as in
    /// [`crate::container::task_exec::TaskExec::argv0`]).
    #[serde(default)]
    pub argv0: Option<Vec<u8>>,
    #[serde(default)]
    pub signal: CheckpointSignal,
    /// This task's index among the step's tasks on this node (`SLURM_LOCALID`), and their
    /// number: the first makes the container, the others run in it ([`tasks`]).
    #[serde(default)]
    pub local_task: u32,
    #[serde(default = "one")]
    pub local_tasks: u32,
}

fn one() -> u32 {
    1
}

/// Why a Slurm step cannot have `--container-checkpoint` or `--container-restore` here.
#[derive(Debug, thiserror::Error)]
pub enum StepRefusal {
    #[error("{option} saves the tasks of one node, and this step runs on {nodes} (CRIU cannot save what passes between nodes): use -N1")]
    Nodes { option: &'static str, nodes: u32 },
    #[error("--container-restore={dir}: the checkpoint holds {saved} tasks, and this step has {here} on this node: use --ntasks-per-node={saved}")]
    TaskCount { dir: String, saved: u32, here: u32 },
    #[error("--container-checkpoint: a step with GPUs cannot be checkpointed (CRIU cannot save GPU state): ask for no GPUs or add --container-gpus=none")]
    Gpus,
    #[error("{option}={dir}: {dir} belongs to uid {owner}, not to you (uid {uid}): choose a directory of your own")]
    NotYours {
        option: &'static str,
        dir: String,
        owner: u32,
        uid: u32,
    },
    #[error("{option}={dir}: {dir} is not a directory")]
    NotADirectory { option: &'static str, dir: String },
    #[error("--container-restore={0}: no checkpoint there (no {SPEC_FILE}): make one with srun --container-checkpoint={0} and scancel --signal=USR1 JOB.STEP")]
    NoCheckpoint(String),
    #[error("--container-checkpoint={0}: {0} holds a checkpoint already: continue it with --container-restore={0}, or choose another directory")]
    InUse(String),
    #[error("{option}: {error}")]
    Site {
        option: &'static str,
        error: CheckpointError,
    },
}

/// Check, on a node, a Slurm step that asks for a checkpointable container in `dir`
/// (`restore`: to restore the one in `dir`) as user `uid`, with `tasks` tasks on this node,
/// of `nodes`. Run with the user's effective ids (slurmstepd's user_init), so that what
/// the user cannot see is refused as the user's task would find it.
pub fn check_slurm_step(
    dir: &Path,
    restore: bool,
    uid: u32,
    tasks: u32,
    nodes: u32,
    gpus: &GpuRequest,
) -> Result<(), StepRefusal> {
    let option = if restore {
        "--container-restore"
    } else {
        "--container-checkpoint"
    };
    if nodes > 1 {
        return Err(StepRefusal::Nodes { option, nodes });
    }
    if !restore && *gpus != GpuRequest::None {
        return Err(StepRefusal::Gpus);
    }
    let site = |error| StepRefusal::Site { option, error };
    let conf = SiteCheckpoint::read().map_err(site)?;
    if !conf.enabled {
        return Err(site(CheckpointError::NotEnabled));
    }
    find_criu(&conf).map_err(site)?;
    let shown = dir.display().to_string();
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(StepRefusal::NotADirectory { option, dir: shown }),
        Ok(m) if std::os::unix::fs::MetadataExt::uid(&m) != uid => Err(StepRefusal::NotYours {
            option,
            dir: shown,
            owner: std::os::unix::fs::MetadataExt::uid(&m),
            uid,
        }),
        Ok(_) if restore && !dir.join(SPEC_FILE).exists() => Err(StepRefusal::NoCheckpoint(shown)),
        Ok(_) if restore => match saved_task_count(dir) {
            Some(saved) if saved != tasks => Err(StepRefusal::TaskCount {
                dir: shown,
                saved,
                here: tasks,
            }),
            _ => Ok(()),
        },
        Ok(_) if !restore && dir.join(SPEC_FILE).exists() => Err(StepRefusal::InUse(shown)),
        Err(_) if restore => Err(StepRefusal::NoCheckpoint(shown)),
        // (A directory that does not exist yet is made by the task, as the user.)
        _ => Ok(()),
    }
}

/// How many tasks the checkpoint in `dir` holds (`None`: unreadable; the restore says why).
fn saved_task_count(dir: &Path) -> Option<u32> {
    read_saved(dir).map(|s| s.tasks)
}

/// `DIR/container.json`, where it is there and readable.
fn read_saved(dir: &Path) -> Option<Saved> {
    serde_json::from_slice(&fs::read(dir.join(SPEC_FILE)).ok()?).ok()
}

/// When this process was started as a Slurm task's program ([`SLURM_TASK_ENV`] is set), run
/// the task's command checkpointable or restore the checkpoint, and exit with its status;
/// does not return then. Runs first in `main`.
pub fn run_slurm_task_if_asked() {
    let Some(value) = std::env::var_os(SLURM_TASK_ENV) else {
        return;
    };
    // Nothing this starts (the holder, CRIU, the command) may take it for its own task.
    std::env::remove_var(SLURM_TASK_ENV);
    let code = slurm_task(&value).unwrap_or_else(|e| {
        eprintln!("ferry: error: {e}");
        exit_code::SETUP_FAILED
    });
    std::process::exit(code)
}

fn slurm_task(value: &std::ffi::OsStr) -> Result<i32, CheckpointError> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let bad = |reason: String| CheckpointError::BadFile {
        dir: "the environment".into(),
        file: SLURM_TASK_ENV,
        reason,
    };
    let task: SlurmTask =
        serde_json::from_slice(value.as_bytes()).map_err(|e| bad(e.to_string()))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| bad(format!("no_new_privs: {e}")))?;
    let program = std::env::current_exe().map_err(|e| bad(format!("no ferry binary: {e}")))?;
    let opts = PrepareOptions::for_cli(program);
    let run = RunAs {
        resume: Resume::Slurm,
        signal: task.signal,
        tasks: task.local_tasks.max(1),
    };
    let own: Vec<OsString> = std::env::args_os().skip(1).collect();
    let argv: Vec<OsString> = match &task.argv0 {
        Some(first) => std::iter::once(OsString::from_vec(first.clone()))
            .chain(own)
            .collect(),
        None => own,
    };
    let caller = caller_env();
    if task.local_task > 0 {
        return follow_leader(&task, argv, caller);
    }
    match &task.spec {
        None => restore_with(&opts, &task.dir, run),
        Some(spec) => run_with(spec, &argv, &opts, &task.dir, caller, run),
    }
}

/// This process's environment, for the command's.
fn caller_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// A Slurm task other than its node's first: its command runs in the first task's
/// container ([`tasks`]); this process stands in for it.
fn follow_leader(
    task: &SlurmTask,
    argv: Vec<OsString>,
    caller: Vec<(String, String)>,
) -> Result<i32, CheckpointError> {
    use std::os::unix::ffi::OsStringExt;
    let request = task.spec.as_ref().map(|_| tasks::TaskRequest {
        argv: argv.into_iter().map(OsStringExt::into_vec).collect(),
        env: caller,
    });
    let mask = run::forwarded_mask();
    mask.thread_block().map_err(|source| RunError::Os {
        what: "blocking signals",
        source,
    })?;
    let dir = fs::canonicalize(&task.dir).unwrap_or_else(|_| task.dir.clone());
    Ok(tasks::follow(
        &dir,
        task.local_task,
        request.as_ref(),
        &mask,
        task.signal.signal(),
    )?)
}

/// What a checkpoint directory keeps of its container, for the restore.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    spec: ContainerSpec,
    criu: Criu,
    #[serde(default)]
    signal: CheckpointSignal,
    /// The Slurm tasks in the container (1 for `ferry run`).
    #[serde(default = "one")]
    tasks: u32,
}

/// The pieces init needs, prepared before the fork.
struct InitPlan {
    /// The host's `/`, for CRIU's binary and libraries.
    host_root: OwnedFd,
    /// The checkpoint directory on the host (for messages).
    dir: PathBuf,
    output_inside: PathBuf,
    saved: Saved,
}

/// `ferry run --checkpoint-dir DIR`: run `argv` in a container from `spec` that `ferry
/// checkpoint DIR` (or `signal` to this process) checkpoints into DIR.
pub fn run(
    spec: &ContainerSpec,
    argv: &[OsString],
    opts: &PrepareOptions,
    dir: &Path,
    signal: CheckpointSignal,
) -> Result<i32, CheckpointError> {
    let run = RunAs {
        resume: Resume::Cli,
        signal,
        tasks: 1,
    };
    run_with(spec, argv, opts, dir, caller_env(), run)
}

/// How the user continues a checkpoint, for the line that says it was made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resume {
    Cli,
    Slurm,
}

impl Resume {
    fn how(self, dir: &Path, tasks: u32) -> String {
        match self {
            Resume::Cli => format!("`ferry restore {}`", dir.display()),
            Resume::Slurm if tasks > 1 => format!(
                "`srun --ntasks-per-node={tasks} --container-restore={} ...`",
                dir.display()
            ),
            Resume::Slurm => format!("`srun --container-restore={} ...`", dir.display()),
        }
    }
}

/// Who runs a checkpointable container: `ferry run` or Slurm's tasks on a node.
#[derive(Clone, Copy)]
struct RunAs {
    resume: Resume,
    signal: CheckpointSignal,
    tasks: u32,
}

fn run_with(
    spec: &ContainerSpec,
    argv: &[OsString],
    opts: &PrepareOptions,
    dir: &Path,
    caller: Vec<(String, String)>,
    run: RunAs,
) -> Result<i32, CheckpointError> {
    let criu = allowed(spec)?;
    let made_here = !dir.exists();
    fs::create_dir_all(dir).map_err(dir_error(dir, "cannot create the directory"))?;
    let dir = fs::canonicalize(dir).map_err(dir_error(dir, "cannot resolve the directory"))?;
    if dir.join(SPEC_FILE).exists() {
        return Err(CheckpointError::InUse(dir.display().to_string()));
    }
    let mut spec = spec.clone();
    // The root must be a plain directory: on an overlay, the dev of a mapped file in
    // /proc/PID/maps is not the one stat gives, and CRIU, without CAP_CHECKPOINT_RESTORE in
    // the host's user namespace (for map_files), cannot tell what is mapped. An unpacked,
    // writable copy in DIR (or the user's --keep DIR) also keeps the container's changes.
    if spec.unpacked.is_none() {
        spec.unpacked = Some(crate::spec::UnpackedDir {
            owned_from: dir.clone(),
            dir: dir.clone(),
        });
    }
    spec.writable = true;
    let bind = |source: PathBuf, target: &str| MountSpec {
        source,
        target: PathBuf::from(target),
        read_only: false,
        no_exec: true,
        unbindable: false,
        tmpfs: None,
    };
    spec.mounts.push(bind(dir.clone(), INSIDE));
    spec.mounts.push(bind(dir.join(SHM_DIR), "/dev/shm"));
    let saved = Saved {
        spec: spec.clone(),
        criu,
        signal: run.signal,
        tasks: run.tasks,
    };
    write_new(
        &dir,
        SPEC_FILE,
        &serde_json::to_vec_pretty(&saved).unwrap_or_default(),
    )?;
    let started = (|| {
        if run.tasks > 1 {
            tasks::begin_run(&dir, run.tasks, false)?;
        }
        fs::create_dir_all(dir.join(IMAGES_DIR))
            .map_err(dir_error(&dir, "cannot create images/"))?;
        fs::create_dir_all(dir.join(SHM_DIR)).map_err(dir_error(&dir, "cannot create shm/"))?;
        write_new(&dir, OUTPUT_FILE, b"")?;
        let prepared = run::prepare_command(&spec, argv, opts, caller, run::RunTimings::quiet())?;
        Ok::<_, CheckpointError>(prepared)
    })();
    let prepared = match started {
        Ok(p) => p,
        Err(e) => {
            // Nothing was checkpointed: leave the directory as it was.
            if made_here {
                let _ = fs::remove_dir_all(&dir);
            } else {
                for f in [SPEC_FILE, OUTPUT_FILE, tasks::RUN_FILE] {
                    let _ = fs::remove_file(dir.join(f));
                }
                for d in [IMAGES_DIR, SHM_DIR] {
                    let _ = fs::remove_dir(dir.join(d));
                }
                let _ = fs::remove_dir_all(dir.join(tasks::TASKS_DIR));
            }
            return Err(e);
        }
    };
    supervise_container(prepared, &dir, saved, 0, Start::Command, run.resume)
}

/// `ferry restore DIR`: continue the container checkpointed into DIR.
pub fn restore(opts: &PrepareOptions, dir: &Path) -> Result<i32, CheckpointError> {
    let run = RunAs {
        resume: Resume::Cli,
        signal: CheckpointSignal::default(),
        tasks: 1,
    };
    restore_with(opts, dir, run)
}

fn restore_with(opts: &PrepareOptions, dir: &Path, run: RunAs) -> Result<i32, CheckpointError> {
    let shown = dir.display().to_string();
    let dir = fs::canonicalize(dir).map_err(dir_error(dir, "cannot open the checkpoint"))?;
    let text = match fs::read(dir.join(SPEC_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CheckpointError::NoCheckpoint(shown))
        }
        Err(e) => return Err(dir_error(&dir, "cannot read container.json")(e)),
    };
    let saved: Saved = serde_json::from_slice(&text).map_err(|e| CheckpointError::BadFile {
        dir: shown.clone(),
        file: SPEC_FILE,
        reason: e.to_string(),
    })?;
    let uid = nix::unistd::getuid().as_raw();
    if saved.spec.user.uid != uid {
        return Err(CheckpointError::OtherUser {
            dir: shown,
            owner: saved.spec.user.uid,
        });
    }
    if !dir.join(DONE_FILE).exists() {
        return Err(CheckpointError::NotCheckpointed(shown));
    }
    if saved.tasks != run.tasks {
        return Err(CheckpointError::SlurmTasks {
            dir: shown,
            tasks: saved.tasks,
        });
    }
    // The site may have turned checkpoints off, or CRIU changed, since the checkpoint.
    allowed(&saved.spec)?;
    if saved.tasks > 1 {
        tasks::begin_run(&dir, saved.tasks, true)?;
    }
    let prepared =
        run::prepare_command(&saved.spec, &[], opts, Vec::new(), run::RunTimings::quiet())?;
    // Only the output written after the restore is new to the caller.
    let shown_up_to = fs::metadata(dir.join(OUTPUT_FILE)).map_or(0, |m| m.len());
    let _ = fs::remove_file(dir.join(DONE_FILE));
    supervise_container(
        prepared,
        &dir,
        saved,
        shown_up_to,
        Start::Restore,
        run.resume,
    )
}

/// How init starts the container's command.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    Command,
    Restore,
}

/// Fork the container's first process (which makes the PID namespace and its init), copy
/// the output to stdout while it runs, and say how it ended.
fn supervise_container(
    mut prepared: Prepared,
    dir: &Path,
    saved: Saved,
    output_from: u64,
    start: Start,
    resume: Resume,
) -> Result<i32, CheckpointError> {
    let host_root = fs::File::open("/")
        .map(OwnedFd::from)
        .map_err(dir_error(Path::new("/"), "cannot open the host's root"))?;
    let tasks = saved.tasks;
    let plan = InitPlan {
        host_root,
        dir: dir.to_path_buf(),
        output_inside: Path::new(INSIDE).join(OUTPUT_FILE),
        saved,
    };
    let _ = fs::remove_file(dir.join(FAILED_FILE));
    write_supervisor(dir)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut follower = None;
    let output = dir.join(OUTPUT_FILE);
    let status = run::fork_and_supervise_then(
        &mut prepared,
        |p, mask, _entered| first_process(p, mask, &plan, start),
        || {
            let stop = stop.clone();
            follower = Some(std::thread::spawn(move || {
                follow(&output, output_from, &stop)
            }));
        },
    )?;
    stop.store(true, Ordering::Relaxed);
    if let Some(f) = follower {
        let _ = f.join();
    }
    let _ = fs::remove_file(dir.join(SUPERVISOR_FILE));
    let status = run::finish(prepared, status);
    if let Ok(text) = fs::read_to_string(dir.join(DONE_FILE)) {
        if status == 0 {
            eprintln!(
                "ferry: checkpointed the container to {} ({}); continue it with {}",
                dir.display(),
                text.trim(),
                resume.how(dir, tasks)
            );
        }
    }
    Ok(status)
}

/// Copy what is appended to `path` after `from` to stdout until `stop`, then the rest.
fn follow(path: &Path, from: u64, stop: &AtomicBool) {
    use std::io::Seek;
    let Ok(mut file) = fs::File::open(path) else {
        return;
    };
    let _ = file.seek(io::SeekFrom::Start(from));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let last = stop.load(Ordering::Relaxed);
        copy_to_stdout(&mut file, &mut buf);
        if last {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Copy what `file` has from its position on to stdout.
fn copy_to_stdout(file: &mut fs::File, buf: &mut [u8]) {
    let mut out = io::stdout();
    loop {
        match file.read(buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let _ = out.write_all(&buf[..n]);
            }
        }
    }
    let _ = out.flush();
}

/// `DIR/supervisor`: who to signal for a checkpoint (`ferry checkpoint DIR`): this
/// process, and in a Slurm step the step, for a request from another node of the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Supervisor {
    pid: u32,
    /// Its start time, which tells it from a later process with the same pid.
    started: u64,
    host: String,
    /// `JOBID.STEPID` of the Slurm step it runs in.
    step: Option<String>,
}

fn this_host() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn write_supervisor(dir: &Path) -> Result<(), CheckpointError> {
    let me = std::process::id();
    let step = match (
        std::env::var("SLURM_JOB_ID"),
        std::env::var("SLURM_STEP_ID"),
    ) {
        (Ok(job), Ok(step)) => Some(format!("{job}.{step}")),
        _ => None,
    };
    let record = Supervisor {
        pid: me,
        started: start_time(me).unwrap_or(0),
        host: this_host(),
        step,
    };
    fs::write(
        dir.join(SUPERVISOR_FILE),
        serde_json::to_vec(&record).unwrap_or_default(),
    )
    .map_err(dir_error(dir, "cannot write supervisor"))
}

/// A process's start time (field 22 of /proc/PID/stat), which tells it from a later
/// process with the same pid.
fn start_time(pid: u32) -> Option<u64> {
    crate::sys::proc::stat_number(pid, 22)
}

fn write_new(dir: &Path, name: &'static str, contents: &[u8]) -> Result<(), CheckpointError> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join(name))
        .and_then(|mut f| f.write_all(contents))
        .map_err(dir_error(dir, "cannot write"))
}

/// A checkpoint that `ferry checkpoint` had made.
pub struct Made {
    /// Its time and size.
    pub summary: String,
    /// How to continue it: `ferry restore DIR`, or srun's option for a Slurm step's.
    pub continue_with: String,
}

/// `ferry checkpoint DIR`: have the container of DIR checkpointed, and wait for the result.
pub fn request(dir: &Path) -> Result<Made, CheckpointError> {
    let shown = dir.display().to_string();
    let path = dir.join(SUPERVISOR_FILE);
    let text = fs::read(&path).map_err(|_| CheckpointError::NotRunning(shown.clone()))?;
    let record: Supervisor =
        serde_json::from_slice(&text).map_err(|e| CheckpointError::BadFile {
            dir: shown.clone(),
            file: SUPERVISOR_FILE,
            reason: e.to_string(),
        })?;
    let saved = read_saved(dir);
    let signal = saved.as_ref().map(|s| s.signal).unwrap_or_default();
    let resume = match record.step {
        Some(_) => Resume::Slurm,
        None => Resume::Cli,
    };
    let made = |summary: String| Made {
        summary: summary.trim().to_string(),
        continue_with: resume.how(dir, saved.as_ref().map_or(1, |s| s.tasks)),
    };
    let here = record.host == this_host();
    let alive = || {
        if here {
            start_time(record.pid) == Some(record.started)
        } else {
            // Elsewhere in the job: the supervisor removes its record when it ends.
            fs::read(&path).is_ok_and(|now| now == text)
        }
    };
    if !alive() {
        return Err(CheckpointError::NotRunning(shown));
    }
    let _ = fs::remove_file(dir.join(FAILED_FILE));
    let _ = fs::remove_file(dir.join(DONE_FILE));
    if here {
        let pid =
            i32::try_from(record.pid).map_err(|_| CheckpointError::NotRunning(shown.clone()))?;
        kill(Pid::from_raw(pid), signal.signal())
            .map_err(|_| CheckpointError::NotRunning(shown.clone()))?;
    } else {
        let Some(step) = &record.step else {
            return Err(CheckpointError::OtherHost {
                dir: shown,
                host: record.host,
            });
        };
        // Slurm passes the signal to the step's tasks on their node.
        let out = std::process::Command::new("scancel")
            .arg(format!("--signal={}", signal.name()))
            .arg(step)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| CheckpointError::Scancel {
                step: step.clone(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(CheckpointError::Scancel {
                step: step.clone(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
    }
    loop {
        if let Ok(reason) = fs::read_to_string(dir.join(FAILED_FILE)) {
            let _ = fs::remove_file(dir.join(FAILED_FILE));
            return Err(CheckpointError::DumpFailed {
                dir: shown,
                reason: reason.trim().to_string(),
            });
        }
        if let Ok(done) = fs::read_to_string(dir.join(DONE_FILE)) {
            return Ok(made(done));
        }
        if !alive() {
            // (It may have written the result just before it ended.)
            if let Ok(done) = fs::read_to_string(dir.join(DONE_FILE)) {
                return Ok(made(done));
            }
            return Err(CheckpointError::EndedFirst(shown));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- inside the container ----

fn die(message: &str) -> ! {
    eprintln!("ferry: error: {message}");
    std::process::exit(exit_code::SETUP_FAILED)
}

/// The child of `ferry run`: enter the container, make the PID namespace, start init in
/// it and pass signals on to it until it ends; exits with init's status.
fn first_process(p: &Prepared, mask: &SigSet, plan: &InitPlan, start: Start) {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        die(&format!(
            "cannot make the container end with ferry (PR_SET_PDEATHSIG): {e}"
        ));
    }
    if let Err(e) = join::join(&p.namespaces, &p.workdir) {
        die(&e.to_string());
    }
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID) {
        die(&format!(
            "cannot make a PID namespace for the container: {e}"
        ));
    }
    match raw::fork_single_threaded() {
        Err(e) => die(&format!("fork: {e}")),
        Ok(None) => init(p, mask, plan, start),
        Ok(Some(init_pid)) => std::process::exit(run::supervise(init_pid, mask)),
    }
}

/// The commands init runs, by their task's index on the node (0 alone for `ferry run`).
#[derive(Default)]
struct Commands {
    running: std::collections::BTreeMap<u32, Pid>,
    ended: std::collections::BTreeMap<u32, i32>,
}

impl Commands {
    /// Note that `pid` ended with `code`; tells a follower's task.
    fn reap(&mut self, pid: Pid, code: i32) {
        let Some(task) = self
            .running
            .iter()
            .find(|(_, p)| **p == pid)
            .map(|(t, _)| *t)
        else {
            return;
        };
        self.running.remove(&task);
        self.ended.insert(task, code);
        if task > 0 {
            tasks::write_status(Path::new(INSIDE), task, tasks::TaskEnd::Exited(code));
        }
    }
}

/// PID 1 of the container's PID namespace: starts the commands (or has CRIU restore them),
/// passes signals on, checkpoints at the plan's signal, reaps, and ends with the first
/// task's status once every task's command has ended.
fn init(p: &Prepared, mask: &SigSet, plan: &InitPlan, start: Start) -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // A mount namespace of init's own, for a /proc of the new PID namespace (CRIU and the
    // processes it dumps must agree on what /proc/self is); the holder keeps the host's.
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS) {
        die(&format!(
            "cannot make the container's init mount namespace: {e}"
        ));
    }
    use nix::mount::MsFlags;
    if let Err(e) = nix::mount::mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        // The kernel refuses it when the node's /proc has mounts over its files (lxcfs, a
        // bound boot_id): a new /proc would reveal what they hide.
        let hint = if e == nix::errno::Errno::EPERM {
            " (the kernel refuses a new /proc where this node's /proc has mounts over its files, such as lxcfs's)"
        } else {
            ""
        };
        die(&format!(
            "cannot mount /proc for the container's PID namespace: {e}{hint}"
        ));
    }
    let _ = std::env::set_current_dir(&p.workdir);
    let base = Path::new(INSIDE);
    let tasks = plan.saved.tasks;
    let mut commands = Commands::default();
    match start {
        Start::Command => {
            let line = run::ExecLine {
                args: p.args.clone(),
                envp: p.envp.clone(),
                search_path: p.search_path.clone(),
            };
            let pid = start_command(plan, &line, &plan.output_inside);
            commands.running.insert(0, pid);
        }
        Start::Restore => {
            for task in 0..tasks {
                if let Some(code) = tasks::ended_before(base, task) {
                    commands.ended.insert(task, code);
                    if task > 0 {
                        tasks::write_status(base, task, tasks::TaskEnd::Exited(code));
                    }
                    continue;
                }
                match restore_with_criu(plan, &images_of(task)) {
                    Ok(pid) => {
                        commands.running.insert(task, pid);
                    }
                    Err(reason) => die(&format!(
                        "the restore from {} failed: {reason}",
                        plan.dir.display()
                    )),
                }
            }
            // They were stopped for the dump (so that all were saved at one moment), and
            // CRIU brings them back stopped.
            let _ = kill(Pid::from_raw(-1), Signal::SIGCONT);
        }
    }
    let checkpoint = plan.saved.signal.signal() as i32;
    loop {
        if commands.running.is_empty() && commands.ended.len() as u32 >= tasks {
            std::process::exit(commands.ended.get(&0).copied().unwrap_or(0));
        }
        let info = if tasks > 1 {
            if start == Start::Command {
                start_requested(p, plan, &mut commands);
            }
            for (task, pid) in &commands.running {
                for signo in tasks::take_signals(base, *task) {
                    if let Ok(sig) = Signal::try_from(signo) {
                        let _ = kill(*pid, sig);
                    }
                }
            }
            match raw::wait_signal_for(mask, Duration::from_millis(50)) {
                Ok(Some(info)) => info,
                Ok(None) => continue,
                Err(_) => std::process::exit(exit_code::SETUP_FAILED),
            }
        } else {
            match raw::wait_signal(mask) {
                Ok(info) => info,
                Err(_) => std::process::exit(exit_code::SETUP_FAILED),
            }
        };
        if info.si_signo == libc::SIGCHLD {
            // Init reaps every orphan of the namespace; the commands' ends are noted.
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) => commands.reap(pid, code),
                    Ok(WaitStatus::Signaled(pid, sig, _)) => {
                        commands.reap(pid, exit_code::killed_by(sig as i32))
                    }
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        } else if info.si_signo == checkpoint {
            match checkpoint_all(plan, &commands) {
                Ok(summary) => {
                    let _ = fs::write(base.join(DONE_FILE), format!("{summary}\n"));
                    for task in 1..tasks {
                        if commands.running.contains_key(&task) {
                            tasks::write_status(base, task, tasks::TaskEnd::Checkpointed);
                        }
                    }
                    // Init's end ends the stopped, saved processes with the namespace;
                    // that end is not an error.
                    std::process::exit(0)
                }
                Err(reason) => {
                    eprintln!(
                        "ferry: error: the checkpoint of {} failed: {reason}",
                        plan.dir.display()
                    );
                    let _ = fs::write(base.join(FAILED_FILE), format!("{reason}\n"));
                }
            }
        } else if let Ok(sig) = Signal::try_from(info.si_signo) {
            // From a process or the terminal alike (^C reaches ferry's process group, init
            // included, but not the command's own session): init is the command's only
            // way. The followers pass on their own task's signals.
            if let Some(pid) = commands.running.get(&0) {
                let _ = kill(*pid, sig);
            }
        }
    }
}

/// Start the commands of the followers that asked since the last call.
fn start_requested(p: &Prepared, plan: &InitPlan, commands: &mut Commands) {
    let base = Path::new(INSIDE);
    for task in 1..plan.saved.tasks {
        if commands.running.contains_key(&task) || commands.ended.contains_key(&task) {
            continue;
        }
        let request = match tasks::take_request(base, task) {
            None => continue,
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                eprintln!("ferry: error: task {task}: {e}");
                commands.ended.insert(task, exit_code::SETUP_FAILED);
                tasks::write_status(base, task, tasks::TaskEnd::Exited(exit_code::SETUP_FAILED));
                continue;
            }
        };
        use std::os::unix::ffi::OsStringExt;
        let argv: Vec<OsString> = request.argv.into_iter().map(OsString::from_vec).collect();
        match run::exec_line(&p.holder, &plan.saved.spec, &argv, request.env) {
            Ok(line) => {
                let pid = start_command(plan, &line, &tasks::output_path(base, task));
                commands.running.insert(task, pid);
            }
            Err(e) => {
                eprintln!("ferry: error: task {task}: {e}");
                commands.ended.insert(task, exit_code::SETUP_FAILED);
                tasks::write_status(base, task, tasks::TaskEnd::Exited(exit_code::SETUP_FAILED));
            }
        }
    }
}

/// Fork a command: its own session (CRIU dumps whole sessions), stdin from /dev/null,
/// stdout and stderr to `output` (in the container), no other inherited descriptor;
/// returns its pid.
fn start_command(plan: &InitPlan, line: &run::ExecLine, output: &Path) -> Pid {
    let open_output = || {
        fs::OpenOptions::new()
            .append(true)
            .open(output)
            .map(OwnedFd::from)
    };
    let (output_fd, null) = match (open_output(), fs::File::open("/dev/null")) {
        (Ok(o), Ok(n)) => (o, OwnedFd::from(n)),
        (Err(e), _) | (_, Err(e)) => die(&format!(
            "cannot open {} in the container: {e}",
            output.display()
        )),
    };
    match raw::fork_single_threaded() {
        Err(e) => die(&format!("fork: {e}")),
        Ok(Some(pid)) => pid,
        Ok(None) => {
            let _ = nix::unistd::setsid();
            for (from, to) in [
                (null.as_raw_fd(), 0),
                (output_fd.as_raw_fd(), 1),
                (output_fd.as_raw_fd(), 2),
            ] {
                if nix::unistd::dup2(from, to).is_err() {
                    std::process::exit(exit_code::SETUP_FAILED);
                }
            }
            drop(output_fd);
            drop(null);
            // Nothing the caller left open goes in: CRIU can save only what the container
            // can reach (a lock file of the host's, say, it cannot).
            if let Err(e) = raw::cloexec_from(3) {
                die(&format!("cannot close inherited descriptors: {e}"));
            }
            let _ = run::forwarded_mask().thread_unblock();
            if plan.saved.spec.remap_root {
                if let Err(e) = crate::container::id_filter::install() {
                    die(&e.to_string());
                }
            }
            run::exec_searching(&line.args, &line.envp, &line.search_path)
        }
    }
}

/// The host's library directories for CRIU, under `prefix` (the host's `/` through init's
/// descriptor).
fn host_library_path(prefix: &str) -> String {
    let triple = format!("{}-linux-gnu", std::env::consts::ARCH);
    [
        format!("/lib/{triple}"),
        format!("/usr/lib/{triple}"),
        "/lib64".into(),
        "/usr/lib64".into(),
        "/lib".into(),
        "/usr/lib".into(),
    ]
    .iter()
    .map(|d| format!("{prefix}{d}"))
    .collect::<Vec<_>>()
    .join(":")
}

/// Run CRIU with `args` from inside the container, with every capability the container's
/// user namespace gives init, through the host's root; returns whether it succeeded.
fn run_criu(plan: &InitPlan, args: &[String]) -> io::Result<bool> {
    // A copy without close-on-exec, for CRIU's exec and its loader's opens.
    let root = nix::fcntl::fcntl(
        plan.host_root.as_raw_fd(),
        nix::fcntl::FcntlArg::F_DUPFD(10),
    )
    .map_err(io::Error::from)?;
    let prefix = format!("/proc/self/fd/{root}");
    let criu = format!("{prefix}{}", plan.saved.criu.path.display());
    let mut command = match &plan.saved.criu.interpreter {
        Some(loader) => {
            let mut c = std::process::Command::new(format!("{prefix}{}", loader.display()));
            c.arg("--inhibit-cache")
                .arg("--library-path")
                .arg(host_library_path(&prefix))
                .arg(&criu);
            c
        }
        None => std::process::Command::new(&criu),
    };
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    raise_ambient_capabilities()?;
    let status = command.status();
    let _ = nix::unistd::close(root);
    Ok(status?.success())
}

/// Raise the permitted capabilities into the inheritable and ambient sets, so that CRIU,
/// exec'd as the (mapped) user, keeps them in the container's user namespace. All but
/// CAP_SETUID: with it, CRIU's restore makes itself uid 0 of the namespace, which is not
/// mapped there (only the user is).
fn raise_ambient_capabilities() -> io::Result<()> {
    use rustix::thread::{
        capabilities, configure_capability_in_ambient_set, set_capabilities, CapabilitySet,
    };
    let mut sets = capabilities(None)?;
    sets.inheritable = sets.permitted;
    set_capabilities(None, sets)?;
    for cap in sets.permitted.iter() {
        if cap == CapabilitySet::SETUID {
            continue;
        }
        // Capabilities this kernel does not know are not in the set to begin with.
        let _ = configure_capability_in_ambient_set(cap, true);
    }
    Ok(())
}

/// The first error lines of a CRIU log (`log`, shown to the user as `shown`), for a
/// one-line reason.
fn criu_reason(log: &Path, shown: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    // (CRIU logs some harmless errors about the host's network when run unprivileged.)
    let harmless = [
        "): tun:",
        "): net:",
        "): rlimit:",
        "kerndat",
        "Unable to get socket network namespace",
    ];
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") && !harmless.iter().any(|h| l.contains(h)))
        .map(|l| l.split_once("): ").map_or(l, |(_, msg)| msg).trim())
        .take(2)
        .collect();
    if errors.is_empty() {
        format!("CRIU failed (see {})", shown.display())
    } else {
        format!("{} (CRIU's log: {})", errors.join("; "), shown.display())
    }
}

/// Why CRIU's dump or restore did not happen (said on one line by init).
#[derive(Debug, thiserror::Error)]
enum CriuError {
    #[error("cannot create {}: {error}", .dir.display())]
    ImagesDir { dir: PathBuf, error: io::Error },
    #[error("cannot start CRIU ({}): {error}", .criu.display())]
    Start { criu: PathBuf, error: io::Error },
    /// The reason its log gives.
    #[error("{0}")]
    Failed(String),
    #[error("no pid from CRIU: {0}")]
    NoPid(io::Error),
    #[error("bad pid from CRIU: `{0}`")]
    BadPid(String),
}

/// Where task `task`'s process tree is dumped, under [`IMAGES_DIR`] in the container:
/// the first task's in it (as for `ferry run`), the others' in `task-N` below.
fn images_of(task: u32) -> PathBuf {
    let images = Path::new(INSIDE).join(IMAGES_DIR);
    match task {
        0 => images,
        n => images.join(format!("task-{n}")),
    }
}

/// Dump every running command's process tree, all stopped first so that what they share
/// is saved at one moment; on success they stay stopped for init's end to kill, on failure
/// they go on. Returns a summary (time and size) or why it failed.
fn checkpoint_all(plan: &InitPlan, commands: &Commands) -> Result<String, CriuError> {
    let images = Path::new(INSIDE).join(IMAGES_DIR);
    let started = Instant::now();
    // Every process of the namespace but init: the commands and whatever they started.
    let _ = kill(Pid::from_raw(-1), Signal::SIGSTOP);
    let dumped = (|| {
        // A dump from an earlier checkpoint (this is a restored container) is replaced.
        let _ = fs::remove_dir_all(&images);
        tasks::forget_ended(Path::new(INSIDE), plan.saved.tasks);
        for (task, pid) in &commands.running {
            dump_tree(plan, *task, *pid)?;
        }
        for (task, code) in &commands.ended {
            tasks::keep_ended(Path::new(INSIDE), *task, *code);
        }
        Ok(())
    })();
    if let Err(e) = dumped {
        let _ = kill(Pid::from_raw(-1), Signal::SIGCONT);
        return Err(e);
    }
    // The saved files must be on disk before the step ends (another node may restore them).
    if let Ok(d) = fs::File::open(INSIDE) {
        let _ = nix::unistd::syncfs(d.as_raw_fd());
    }
    let secs = started.elapsed().as_secs_f64();
    let size = dir_size(&images);
    Ok(format!(
        "{} of images in {secs:.2} s",
        crate::image::registry::progress::human_bytes(size)
    ))
}

/// Dump the process tree of `task`'s command (`pid`), leaving it stopped.
fn dump_tree(plan: &InitPlan, task: u32, pid: Pid) -> Result<(), CriuError> {
    let images = images_of(task);
    fs::create_dir_all(&images).map_err(|error| CriuError::ImagesDir {
        dir: shown_path(plan, &images),
        error,
    })?;
    let args: Vec<String> = [
        "dump",
        "--unprivileged",
        "--leave-stopped",
        "--tree",
        &pid.as_raw().to_string(),
        "--images-dir",
        &images.display().to_string(),
        "--log-file",
        "dump.log",
        "-v4",
    ]
    .map(String::from)
    .to_vec();
    criu_with_log(plan, &args, &images.join("dump.log"))
}

/// `inside` (under [`INSIDE`]) as the user sees it on the host.
fn shown_path(plan: &InitPlan, inside: &Path) -> PathBuf {
    inside
        .strip_prefix(INSIDE)
        .map_or_else(|_| inside.to_path_buf(), |rel| plan.dir.join(rel))
}

/// Run CRIU with `args`, whose log goes to `log` (in the container); a failure says why
/// from that log.
fn criu_with_log(plan: &InitPlan, args: &[String], log: &Path) -> Result<(), CriuError> {
    match run_criu(plan, args) {
        Ok(true) => Ok(()),
        Ok(false) => Err(CriuError::Failed(criu_reason(log, &shown_path(plan, log)))),
        Err(error) => Err(CriuError::Start {
            criu: plan.saved.criu.path.clone(),
            error,
        }),
    }
}

/// The size of the files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.path(), e.file_type().ok()?)))
        .map(|(path, kind)| match kind {
            k if k.is_dir() => dir_size(&path),
            k if k.is_file() => fs::metadata(&path).map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Have CRIU restore the tree dumped into `images` into this PID namespace; returns the
/// pid of its first process (a task's command).
fn restore_with_criu(plan: &InitPlan, images: &Path) -> Result<Pid, CriuError> {
    // CRIU and its helpers take pids far above those of the restored tree (which CRIU sets
    // with clone3's set_tid), so that none is taken when a restored process needs it.
    if let Ok(max) = fs::read_to_string("/proc/sys/kernel/pid_max") {
        if let Ok(max) = max.trim().parse::<u64>() {
            let _ = fs::write(
                "/proc/sys/kernel/ns_last_pid",
                (max.saturating_sub(1000).max(300)).to_string(),
            );
        }
    }
    let pidfile = images.join("restored.pid");
    let args: Vec<String> = [
        "restore",
        "--unprivileged",
        "--restore-detached",
        "--images-dir",
        &images.display().to_string(),
        "--log-file",
        "restore.log",
        "-v4",
        "--pidfile",
        &pidfile.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    criu_with_log(plan, &args, &images.join("restore.log"))?;
    let text = fs::read_to_string(&pidfile).map_err(CriuError::NoPid)?;
    text.trim()
        .parse::<i32>()
        .map(Pid::from_raw)
        .map_err(|_| CriuError::BadPid(text.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_site_switch() {
        assert_eq!(
            SiteCheckpoint::parse("").unwrap(),
            SiteCheckpoint::default()
        );
        let site =
            SiteCheckpoint::parse("# on\nenabled = yes\ncriu=/opt/criu/sbin/criu\n").unwrap();
        assert!(site.enabled);
        assert_eq!(site.criu.as_deref(), Some(Path::new("/opt/criu/sbin/criu")));
        let err = SiteCheckpoint::parse("enabled=maybe")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1: `enabled=maybe`"), "{err}");
        assert!(SiteCheckpoint::parse("criu=relative").is_err());
    }

    #[test]
    fn slurm_steps_on_several_nodes_or_with_gpus_are_refused_first() {
        let dir = Path::new("/nonexistent/ck");
        let e = check_slurm_step(dir, false, 1000, 2, 3, &GpuRequest::None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--container-checkpoint saves the tasks of one node, and this step runs on 3 (CRIU cannot save what passes between nodes): use -N1"
        );
        let e = check_slurm_step(dir, false, 1000, 1, 1, &GpuRequest::All).unwrap_err();
        assert!(matches!(e, StepRefusal::Gpus), "{e}");
        let e = check_slurm_step(dir, true, 1000, 3, 2, &GpuRequest::None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--container-restore saves the tasks of one node"),
            "{e}"
        );
    }

    #[test]
    fn a_slurm_task_travels_as_json() {
        let task = SlurmTask {
            spec: None,
            dir: PathBuf::from("/scratch/ck"),
            argv0: Some(b"/bin/true".to_vec()),
            signal: "USR2".parse().unwrap(),
            local_task: 1,
            local_tasks: 2,
        };
        let text = serde_json::to_string(&task).unwrap();
        let back: SlurmTask = serde_json::from_str(&text).unwrap();
        assert_eq!(back.dir, task.dir);
        assert_eq!(back.argv0, task.argv0);
        assert!(back.spec.is_none());
        assert_eq!(
            (back.signal, back.local_task, back.local_tasks),
            (task.signal, 1, 2)
        );
        // From a plugin before these fields: one task, SIGUSR1.
        let old: SlurmTask = serde_json::from_str(r#"{"spec":null,"dir":"/ck"}"#).unwrap();
        assert_eq!(
            (old.signal.name(), old.local_task, old.local_tasks),
            ("USR1", 0, 1)
        );
    }

    #[test]
    fn a_checkpoint_says_how_to_continue_it() {
        let dir = Path::new("/scratch/ck");
        assert_eq!(Resume::Cli.how(dir, 1), "`ferry restore /scratch/ck`");
        assert_eq!(
            Resume::Slurm.how(dir, 1),
            "`srun --container-restore=/scratch/ck ...`"
        );
        assert_eq!(
            Resume::Slurm.how(dir, 4),
            "`srun --ntasks-per-node=4 --container-restore=/scratch/ck ...`"
        );
    }

    #[test]
    fn a_supervisor_elsewhere_outside_slurm_cannot_be_asked() {
        let dir = tempfile::tempdir().unwrap();
        let record = Supervisor {
            pid: std::process::id(),
            started: start_time(std::process::id()).unwrap(),
            host: "some-other-node".into(),
            step: None,
        };
        fs::write(
            dir.path().join(SUPERVISOR_FILE),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        let e = request(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("runs on some-other-node, outside Slurm: run `ferry checkpoint"),
            "{e}"
        );
        fs::write(dir.path().join(SUPERVISOR_FILE), "1234 5678\n").unwrap();
        let e = request(dir.path()).err().unwrap().to_string();
        assert!(e.starts_with("bad supervisor in "), "{e}");
    }

    #[test]
    fn reads_criu_version_lines() {
        assert_eq!(parse_version("Version: 4.1.1\n").as_deref(), Some("4.1.1"));
        assert_eq!(
            parse_version("Version: 3.17.1\nGitID: v3.17.1\n").as_deref(),
            Some("3.17.1")
        );
        assert_eq!(parse_version("criu: not found"), None);
    }

    #[test]
    fn finds_the_interpreter_of_this_test_binary() {
        let me = fs::read("/proc/self/exe").unwrap();
        let interp = elf_interpreter(&me);
        assert!(
            interp.as_deref().is_some_and(|i| i.contains("ld-")),
            "{interp:?}"
        );
        assert_eq!(elf_interpreter(b"#!/bin/sh\n"), None);
        assert_eq!(elf_interpreter(b"\x7fELF\x02\x01\x01"), None);
    }

    #[test]
    fn keeps_one_line_reasons_from_criu_logs() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dump.log");
        fs::write(
            &log,
            "(00.1) Error (criu/tun.c:85): tun: Unable to create tun: Permission denied\n\
             (00.2) Error (criu/sk-inet.c:188): inet: Connected TCP socket, consider using --tcp-established option.\n",
        )
        .unwrap();
        let reason = criu_reason(&log, &log);
        assert!(
            reason.starts_with("inet: Connected TCP socket, consider using --tcp-established option. (CRIU's log: "),
            "{reason}"
        );
    }
}

//! `ferry build`: an image from a Dockerfile, built by the user alone.
//!
//! Each stage's file tree is an overlay of its base, a squashfs (the image, or the cache
//! entry of the last step) mounted by squashfuse, and an upper layer on disk owned by the
//! user (see [`layer`]): nothing of the base is unpacked. `RUN` runs in a writable
//! remap-root container over that overlay, so package managers work with only the user's
//! uid mapped; COPY and the config are written into the merged view. Without the cache
//! (`--no-cache`, no entries to mount) and over a directory image or `scratch`, the tree is
//! an unpacked copy instead, as `ferry run --keep` makes. The result is squashed with the config inside (Env, WorkingDir, Entrypoint,
//! Cmd, User, Labels, where imports keep it), so `ferry run` and the plugin honour it.
//!
//! Cache: after each `RUN`, `COPY` and `ADD` the tree is squashed into the user's cache
//! under a key made of the previous key, the instruction, the build state (environment,
//! arguments, shell, working directory) and the content of the files it copies. A rebuild
//! takes the longest prefix of steps whose keys are there and mounts only its last one.
//! A squashfs per step (lz4: about a second on a Debian-sized tree) costs far less than the
//! install it saves, and keeps the cache small and its entries immutable. The last step
//! that changes the tree is squashed once with the image (zstd) and its entry copied from it.

pub mod archive;
pub mod deffile;
pub mod dockerfile;
pub mod dockerignore;
pub mod layer;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::container::holder::PrepareOptions;
use crate::image::config::ImageConfig;
use crate::image::reference::ImageRef;
use crate::image::ImageKind;
use crate::rootfs::resolve_in_tree;
use crate::rootfs::unpacked::{self, NamedError, ROOTFS};
use crate::spec::user::UserInfo;
use crate::spec::{ContainerSpec, UnpackedDir};
use crate::store::cache::Cache;
use crate::store::import::{self, ImportOptions};
use crate::sys::child::run_tool;
use dockerfile::{Command, Instruction, Step};
use dockerignore::Ignore;

/// The PATH a step gets when the image sets none (docker's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];
/// The folder of the user's cache holding build steps.
pub const CACHE_DIR: &str = "build";
/// In the build cache: held shared by running builds, alone by `ferry gc`.
const LOCK_FILE: &str = ".lock";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{file}:{line}: {message}")]
    Syntax {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{file}:{line}: {text}: {source}")]
    Step {
        file: String,
        line: usize,
        text: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{file}:{line}: {text}: exited with status {status}")]
    RunFailed {
        file: String,
        line: usize,
        text: String,
        status: i32,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("-o {0}: the squashfs (-t) is written there; give the archive another name")]
    ArchiveOverImage(PathBuf),
    #[error("--tmpdir {path}: {detail}; give an existing directory you can write, on a disk with room for the build")]
    TmpDir { path: PathBuf, detail: String },
    #[error(transparent)]
    Named(#[from] NamedError),
    #[error(transparent)]
    Cache(#[from] crate::store::cache::CacheError),
}

/// Why an instruction could not be carried out (shown after its file, line and text).
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("{0} is not in the build context {1}")]
    OutsideContext(String, PathBuf),
    #[error("{0}: no such file in the build context")]
    NoSource(String),
    #[error("no stage named {0} before this one")]
    NoStage(String),
    #[error("{0}: URLs are not supported yet; download it in a RUN step")]
    Url(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Tool(#[from] crate::sys::child::ToolError),
    #[error(transparent)]
    Reference(#[from] crate::image::reference::ReferenceError),
    #[error(transparent)]
    Import(#[from] import::ImportError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Run(#[from] crate::container::run::RunError),
    #[error(transparent)]
    Named(#[from] NamedError),
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    #[error(transparent)]
    Layer(#[from] layer::LayerError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StepError + 'a {
    move |source| StepError::Io {
        what,
        path: path.into(),
        source,
    }
}

pub struct BuildOptions {
    pub dockerfile: PathBuf,
    pub context: PathBuf,
    pub output: PathBuf,
    /// An image archive to write besides the squashfs (`--format`).
    pub archive: Option<(archive::ArchiveFormat, PathBuf)>,
    /// Where the trees being built live (`--tmpdir`); `None`: the cache's `build/`.
    pub tmpdir: Option<PathBuf>,
    pub build_args: BTreeMap<String, String>,
    pub no_cache: bool,
    pub cache: Cache,
    pub import: ImportOptions,
    pub prepare: PrepareOptions,
    pub user: UserInfo,
}

impl BuildError {
    /// The exit status for ferry: a failing `RUN`'s own, else 1.
    pub fn exit_status(&self) -> i32 {
        match self {
            BuildError::RunFailed { status, .. } => *status,
            _ => 1,
        }
    }
}

/// Where a stage's file tree comes from.
#[derive(Debug, Clone, PartialEq)]
enum Fs {
    Scratch,
    Image(PathBuf),
    Snapshot(PathBuf),
    /// Only in the stage's own tree (no cache): generation number.
    Tree(u64),
}

#[derive(Debug, Clone)]
struct State {
    config: ImageConfig,
    labels: BTreeMap<String, String>,
    shell: Vec<String>,
    fs: Fs,
}

struct Stage {
    name: Option<String>,
    dir: PathBuf,
    state: State,
    key: String,
    args: BTreeMap<String, String>,
    tree_fs: Option<Fs>,
    generation: u64,
    /// A cache entry whose tree is the stage's tree now, not yet written: the last step that
    /// changes the final stage's tree leaves it to [`Builder::finish`], which writes it and the
    /// image with one mksquashfs (they differ only in the config, which no build reads back
    /// from an entry).
    pending: Option<PathBuf>,
    /// The overlay of a squashfs base and the stage's upper layer (see [`layer`]), and the
    /// state it holds.
    layer: Option<Layer>,
    /// The overlay mounted for the build's own writes (none while a RUN runs).
    merged: Option<layer::Merged>,
}

#[derive(Debug, Clone)]
struct Layer {
    base: PathBuf,
    offset: u64,
    holds: Fs,
}

impl Stage {
    fn rootfs(&self) -> PathBuf {
        self.dir.join(ROOTFS)
    }

    fn layer_dir(&self) -> PathBuf {
        self.dir.join("layer")
    }

    /// The overlay, when it holds the stage's state.
    fn current_layer(&self) -> Option<Layer> {
        self.layer.clone().filter(|l| l.holds == self.state.fs)
    }

    fn workdir(&self) -> String {
        self.state
            .config
            .working_dir
            .clone()
            .unwrap_or_else(|| "/".into())
    }

    /// The merged view of the stage's overlay, its helper started on first use.
    fn merged_view(&mut self, layer: &Layer) -> Result<PathBuf, StepError> {
        let merged = match self.merged.take() {
            Some(merged) => merged,
            None => layer::Merged::open(&layer.base, layer.offset, &self.layer_dir())?,
        };
        let path = merged.path().to_path_buf();
        self.merged = Some(merged);
        Ok(path)
    }
}

/// The work directory, removed with everything in it however the build ends.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.0.exists() {
            if let Err(e) = unpacked::remove_tree(&self.0) {
                eprintln!(
                    "ferry: warning: cannot remove the build tree {}: {e}",
                    self.0.display()
                );
            }
        }
    }
}

struct Builder<'a> {
    opts: &'a BuildOptions,
    file: String,
    steps_total: usize,
    cache_dir: PathBuf,
    work: PathBuf,
    stages: Vec<Stage>,
    /// The context's `.dockerignore`.
    ignore: Ignore,
    /// Copies of the context made so far (each a folder of the work directory).
    context_copies: usize,
    /// The step being run is the last one to change the final stage's tree: its cache entry
    /// is written with the image.
    entry_with_image: bool,
}

/// Build the image; returns nothing, the image is at `opts.output`.
pub fn build(opts: &BuildOptions) -> Result<(), BuildError> {
    let text = fs::read_to_string(&opts.dockerfile).map_err(|source| BuildError::Read {
        path: opts.dockerfile.clone(),
        source,
    })?;
    let file = opts
        .dockerfile
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "Dockerfile".into());
    let parse = if deffile::is_definition(&opts.dockerfile, &text) {
        deffile::parse
    } else {
        dockerfile::parse
    };
    let steps = parse(&text).map_err(|e| BuildError::Syntax {
        file: file.clone(),
        line: e.line,
        message: e.message,
    })?;
    if let Some((_, path)) = &opts.archive {
        if *path == opts.output {
            return Err(BuildError::ArchiveOverImage(path.clone()));
        }
    }
    let outputs = std::iter::once(&opts.output).chain(opts.archive.as_ref().map(|a| &a.1));
    for output in outputs {
        if let Some(parent) = output.parent() {
            if !parent.is_dir() {
                return Err(BuildError::Io {
                    what: "cannot write the image into",
                    path: parent.into(),
                    source: io::Error::from(io::ErrorKind::NotFound),
                });
            }
        }
    }
    // Checked before anything is made, so that a bad --tmpdir leaves nothing behind.
    let work_in_tmpdir = opts.tmpdir.as_deref().map(work_dir_in).transpose()?;
    let _cleanup_tmpdir = work_in_tmpdir.clone().map(WorkDir);
    let cache_dir = opts.cache.root().join(CACHE_DIR);
    unpacked::make_private_dir(opts.cache.root(), &cache_dir)?;
    let _in_use = lock_cache_dir(&cache_dir)?;
    let work = match work_in_tmpdir {
        Some(work) => work,
        None => {
            let work = cache_dir.join(format!("work-{}", std::process::id()));
            if work.exists() {
                let _ = unpacked::remove_tree(&work);
            }
            unpacked::make_private_dir(&cache_dir, &work)?;
            work
        }
    };
    let _cleanup = WorkDir(work.clone());
    let ignore_file = opts.context.join(dockerignore::FILE_NAME);
    let ignore = Ignore::load(&opts.context).map_err(|source| BuildError::Read {
        path: ignore_file,
        source,
    })?;
    let mut builder = Builder {
        ignore,
        context_copies: 0,
        opts,
        file,
        steps_total: steps.len(),
        cache_dir,
        work,
        stages: Vec::new(),
        entry_with_image: false,
    };
    let mut global_args: BTreeMap<String, String> = BTreeMap::new();
    for (i, step) in steps.iter().enumerate() {
        let started = Instant::now();
        builder.entry_with_image = steps[i + 1..].iter().all(|s| {
            !matches!(
                s.instruction,
                Instruction::Run(_) | Instruction::Copy { .. } | Instruction::From { .. }
            )
        });
        let note = builder
            .step(i, step, &mut global_args)
            .map_err(|e| match e {
                Failure::Run(status) => BuildError::RunFailed {
                    file: builder.file.clone(),
                    line: step.line,
                    text: step.text.clone(),
                    status,
                },
                Failure::Step(source) => BuildError::Step {
                    file: builder.file.clone(),
                    line: step.line,
                    text: step.text.clone(),
                    source: Box::new(source),
                },
            })?;
        let took = match note {
            Done::Cached => "cached".to_string(),
            Done::Ran { snapshot } => match snapshot {
                Entry::Took(s) => format!(
                    "{:.1} s, cache entry {:.1} s",
                    started.elapsed().as_secs_f64() - s,
                    s
                ),
                Entry::WithImage => format!(
                    "{:.1} s, cache entry with the image",
                    started.elapsed().as_secs_f64()
                ),
                Entry::None => format!("{:.1} s", started.elapsed().as_secs_f64()),
            },
            Done::Note(n) => n.to_string(),
        };
        eprintln!(
            "[{}/{}] {} ({took})",
            i + 1,
            builder.steps_total,
            short(&step.text)
        );
    }
    let started = Instant::now();
    builder.finish().map_err(|source| BuildError::Step {
        file: builder.file.clone(),
        line: steps.last().map_or(1, |s| s.line),
        text: "writing the image".into(),
        source: Box::new(source),
    })?;
    eprintln!(
        "wrote {} ({:.1} s)",
        opts.output.display(),
        started.elapsed().as_secs_f64()
    );
    if let Some((format, path)) = &opts.archive {
        let started = Instant::now();
        builder
            .write_archive(*format, path)
            .map_err(|source| BuildError::Step {
                file: builder.file.clone(),
                line: steps.last().map_or(1, |s| s.line),
                text: "writing the image archive".into(),
                source: Box::new(source),
            })?;
        eprintln!(
            "wrote {} ({:.1} s)",
            path.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn tmpdir_error(dir: &Path, e: &io::Error) -> BuildError {
    let detail = match e.kind() {
        io::ErrorKind::NotFound => "it does not exist".to_string(),
        io::ErrorKind::PermissionDenied => "you cannot write it".to_string(),
        io::ErrorKind::ReadOnlyFilesystem => "it is on a read-only file system".to_string(),
        io::ErrorKind::NotADirectory => "it is not a directory".to_string(),
        _ => e.to_string(),
    };
    BuildError::TmpDir {
        path: dir.into(),
        detail,
    }
}

/// Whether `dir` can be `--tmpdir`: an existing directory (checked before anything,
/// the cache included, is made).
pub fn check_tmpdir(dir: &Path) -> Result<(), BuildError> {
    let meta = fs::metadata(dir).map_err(|e| tmpdir_error(dir, &e))?;
    if !meta.is_dir() {
        return Err(tmpdir_error(dir, &io::ErrorKind::NotADirectory.into()));
    }
    Ok(())
}

/// A private work directory of the build in `dir` (`--tmpdir`), or why it cannot be.
fn work_dir_in(dir: &Path) -> Result<PathBuf, BuildError> {
    check_tmpdir(dir)?;
    let fail = |e: io::Error| tmpdir_error(dir, &e);
    // A fresh name of our own, mode 0700: the directory may be a shared one like /tmp.
    let made = tempfile::Builder::new()
        .prefix("ferry-build-")
        .tempdir_in(dir)
        .map_err(fail)?;
    Ok(made.keep())
}

/// Held shared by every build while it runs: `ferry gc` removes step entries only when it
/// can take it alone, so that no build loses the entry it is about to unpack.
fn lock_cache_dir(cache_dir: &Path) -> Result<nix::fcntl::Flock<fs::File>, BuildError> {
    let path = cache_dir.join(LOCK_FILE);
    let file = fs::File::options()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|source| BuildError::Io {
            what: "cannot open",
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockShared).map_err(|(_, e)| {
        BuildError::Io {
            what: "cannot lock",
            path,
            source: io::Error::from_raw_os_error(e as i32),
        }
    })
}

fn short(text: &str) -> String {
    const MAX: usize = 72;
    // A definition file's sections are scripts: shown on one line.
    let text = &text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if text.chars().count() <= MAX {
        text.to_string()
    } else {
        text.chars().take(MAX - 1).collect::<String>() + "…"
    }
}

enum Failure {
    Run(i32),
    Step(StepError),
}

impl<E: Into<StepError>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Step(e.into())
    }
}

enum Done {
    Cached,
    /// Ran; `snapshot`: its cache entry.
    Ran {
        snapshot: Entry,
    },
    Note(&'static str),
}

/// A step's cache entry.
enum Entry {
    /// No cache (`--no-cache`).
    None,
    /// Written, in that many seconds.
    Took(f64),
    /// Left to be written with the image.
    WithImage,
}

fn hash_parts(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Builder<'_> {
    fn current(&mut self) -> &mut Stage {
        self.stages
            .last_mut()
            .expect("parse checks FROM comes first")
    }

    /// Variables for substitution: the stage's arguments under its environment.
    fn vars(stage: &Stage) -> BTreeMap<String, String> {
        let mut vars = stage.args.clone();
        for e in &stage.state.config.env {
            if let Some((k, v)) = e.split_once('=') {
                vars.insert(k.into(), v.into());
            }
        }
        vars
    }

    /// The key of a step that follows `stage`'s current state.
    fn key_after(stage: &Stage, text: &str, extra: &str) -> String {
        let state = serde_json::json!({
            "config": stage.state.config,
            "labels": stage.state.labels,
            "shell": stage.state.shell,
            "args": stage.args,
        })
        .to_string();
        hash_parts(&[
            stage.key.as_bytes(),
            text.as_bytes(),
            state.as_bytes(),
            extra.as_bytes(),
        ])
    }

    fn snapshot_path(&self, key: &str) -> PathBuf {
        self.cache_dir.join(format!("{key}.sqsh"))
    }

    fn step(
        &mut self,
        index: usize,
        step: &Step,
        global_args: &mut BTreeMap<String, String>,
    ) -> Result<Done, Failure> {
        let text = step.text.as_str();
        match &step.instruction {
            Instruction::Arg { name, default } => {
                let value = self
                    .opts
                    .build_args
                    .get(name)
                    .cloned()
                    .or_else(|| default.clone());
                if self.stages.is_empty() {
                    // Before the first FROM: only FROM lines see it.
                    global_args.insert(name.clone(), value.unwrap_or_default());
                } else {
                    let stage = self.current();
                    let vars = Self::vars(stage);
                    let value = value
                        .map(|v| dockerfile::substitute(&v, &vars))
                        .or_else(|| global_args.get(name).cloned())
                        .unwrap_or_default();
                    stage.key = Self::key_after(stage, text, &value);
                    stage.args.insert(name.clone(), value);
                }
                Ok(Done::Note("set"))
            }
            Instruction::From { image, stage } => {
                let reference = dockerfile::substitute(image, global_args);
                self.from(index, &reference, stage.clone())?;
                Ok(Done::Note("base"))
            }
            Instruction::Run(command) => self.run(text, command),
            Instruction::Copy {
                add,
                from,
                sources,
                dest,
            } => self.copy(text, *add, from.as_deref(), sources, dest),
            other => {
                let stage = self.current();
                let vars = Self::vars(stage);
                let sub = |s: &str| dockerfile::substitute(s, &vars);
                let config = &mut stage.state.config;
                let mut note = "set";
                match other {
                    Instruction::Env(pairs) => {
                        for (k, v) in pairs {
                            let v = sub(v);
                            config
                                .env
                                .retain(|e| e.split_once('=').map(|p| p.0) != Some(k));
                            config.env.push(format!("{k}={v}"));
                        }
                    }
                    Instruction::Workdir(dir) => {
                        let dir = sub(dir);
                        let base = config.working_dir.clone().unwrap_or_else(|| "/".into());
                        let joined = Path::new(&base).join(&dir);
                        config.working_dir = Some(
                            crate::spec::container_path(&joined.to_string_lossy())
                                .to_string_lossy()
                                .into_owned(),
                        );
                    }
                    Instruction::Label(pairs) => {
                        for (k, v) in pairs {
                            stage.state.labels.insert(sub(k), sub(v));
                        }
                    }
                    Instruction::Entrypoint(c) => {
                        config.entrypoint = Some(start_argv(c, &stage.state.shell));
                        // docker: a new ENTRYPOINT drops a CMD inherited from the base.
                        config.cmd = None;
                    }
                    Instruction::Cmd(c) => config.cmd = Some(start_argv(c, &stage.state.shell)),
                    Instruction::User(u) => {
                        config.user = Some(sub(u));
                        note = "recorded; steps still run as root";
                    }
                    Instruction::Shell(argv) => stage.state.shell = argv.clone(),
                    Instruction::Ignored(_) => note = "ignored",
                    _ => {}
                }
                stage.key = Self::key_after(stage, text, "");
                Ok(Done::Note(note))
            }
        }
    }

    fn from(
        &mut self,
        index: usize,
        reference: &str,
        name: Option<String>,
    ) -> Result<(), StepError> {
        let dir = self.work.join(format!("stage-{index}"));
        unpacked::make_private_dir(&self.work, &dir)?;
        let (state, key) = if reference == "scratch" {
            (
                State {
                    config: ImageConfig::default(),
                    labels: BTreeMap::new(),
                    shell: DEFAULT_SHELL.map(String::from).to_vec(),
                    fs: Fs::Scratch,
                },
                hash_parts(&[b"FROM scratch"]),
            )
        } else if let Some(earlier) = self.find_stage(reference) {
            (earlier.state.clone(), earlier.key.clone())
        } else {
            let cwd = self.opts.context.clone();
            let image_ref = ImageRef::parse(reference, &cwd)?;
            let path = match &image_ref {
                ImageRef::Local(path) => path.clone(),
                _ => import::import(&image_ref, &self.opts.cache, &self.opts.import)?.path,
            };
            let file = fs::File::open(&path).map_err(io_err("cannot open", &path))?;
            let kind = crate::image::detect(&path, &file)?;
            let meta = file.metadata().map_err(io_err("cannot read", &path))?;
            let identity = format!(
                "{}:{}:{}:{}:{}.{}",
                path.display(),
                meta.dev(),
                meta.ino(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec()
            );
            let mut config = read_in_image(&path, &kind, crate::spec::entrypoint::CONFIG_PATH)
                .and_then(|bytes| serde_json::from_slice::<ImageConfig>(&bytes).ok())
                .unwrap_or_default();
            // An enroot image keeps its environment in /etc/environment only.
            if let Some(text) = read_in_image(&path, &kind, "/etc/environment") {
                let mut env: Vec<String> =
                    crate::spec::env::parse_environment_file(&String::from_utf8_lossy(&text))
                        .into_iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                for e in config.env.drain(..) {
                    let name = e.split_once('=').map(|p| p.0.to_string());
                    env.retain(|x| x.split_once('=').map(|p| p.0.to_string()) != name);
                    env.push(e);
                }
                config.env = env;
            }
            let labels = read_in_image(&path, &kind, crate::spec::entrypoint::CONFIG_PATH)
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                .and_then(|v| serde_json::from_value(v.get("labels")?.clone()).ok())
                .unwrap_or_default();
            (
                State {
                    config,
                    labels,
                    shell: DEFAULT_SHELL.map(String::from).to_vec(),
                    fs: Fs::Image(path),
                },
                hash_parts(&[b"FROM", identity.as_bytes()]),
            )
        };
        self.stages.push(Stage {
            name,
            dir,
            state,
            key,
            args: BTreeMap::new(),
            tree_fs: None,
            generation: 0,
            pending: None,
            layer: None,
            merged: None,
        });
        Ok(())
    }

    fn find_stage(&self, name: &str) -> Option<&Stage> {
        let lower = name.to_ascii_lowercase();
        match name.parse::<usize>() {
            Ok(n) => self.stages.get(n),
            Err(_) => self
                .stages
                .iter()
                .rev()
                .find(|s| s.name.as_deref() == Some(lower.as_str())),
        }
    }

    /// Make the stage's tree hold its current state.
    fn materialize(stage: &mut Stage) -> Result<(), StepError> {
        if stage.tree_fs.as_ref() == Some(&stage.state.fs) {
            return Ok(());
        }
        let rootfs = stage.rootfs();
        if fs::symlink_metadata(&rootfs).is_ok() {
            unpacked::remove_tree(&rootfs).map_err(io_err("cannot remove", &rootfs))?;
        }
        match &stage.state.fs {
            Fs::Scratch => {
                fs::create_dir(&rootfs).map_err(io_err("cannot create", &rootfs))?;
                fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o755))
                    .map_err(io_err("cannot set the mode of", &rootfs))?;
            }
            Fs::Image(path) | Fs::Snapshot(path) => {
                let file = fs::File::open(path).map_err(io_err("cannot open", path))?;
                let kind = crate::image::detect(path, &file)?;
                unpacked::prepare_rootfs(&stage.dir, path, &kind)?;
            }
            Fs::Tree(_) => {
                return Err(StepError::Io {
                    what: "lost the build tree",
                    path: rootfs,
                    source: io::Error::from(io::ErrorKind::NotFound),
                })
            }
        }
        stage.tree_fs = Some(stage.state.fs.clone());
        Ok(())
    }

    /// The overlay that holds the stage's state, made over its squashfs base when the tree
    /// does not already hold it; `None` where the tree is used: without the cache (no
    /// entry to mount later), or for a directory image or `scratch`.
    fn open_layer(stage: &mut Stage, no_cache: bool) -> Result<Option<Layer>, StepError> {
        if let Some(layer) = stage.current_layer() {
            return Ok(Some(layer));
        }
        if no_cache || stage.tree_fs.as_ref() == Some(&stage.state.fs) {
            return Ok(None);
        }
        let base = match &stage.state.fs {
            Fs::Image(path) | Fs::Snapshot(path) => path.clone(),
            Fs::Scratch | Fs::Tree(_) => return Ok(None),
        };
        let file = fs::File::open(&base).map_err(io_err("cannot open", &base))?;
        let offset = match crate::image::detect(&base, &file)? {
            ImageKind::Squashfs { offset, .. } => offset,
            ImageKind::Directory => return Ok(None),
        };
        stage.merged = None;
        stage.layer = None;
        let dir = stage.layer_dir();
        layer::create(&dir)?;
        // Mounted now, so that a file system that cannot hold an overlay's upper layer (NFS,
        // where the cache often is) falls back to the unpacked tree before any step uses it.
        match layer::Merged::open(&base, offset, &dir) {
            Ok(merged) => stage.merged = Some(merged),
            Err(e) => {
                tracing::debug!("no overlay in {} ({e}): unpacking the base", dir.display());
                let _ = unpacked::remove_tree(&dir);
                return Ok(None);
            }
        }
        let layer = Layer {
            base,
            offset,
            holds: stage.state.fs.clone(),
        };
        stage.layer = Some(layer.clone());
        Ok(Some(layer))
    }

    /// The stage's tree in its current state, with its working directory (default `/`) made
    /// in it: where RUN runs and what COPY's relative destinations start from.
    fn tree_with_workdir(stage: &mut Stage) -> Result<(PathBuf, String), StepError> {
        Self::materialize(stage)?;
        let rootfs = stage.rootfs();
        let workdir = stage
            .state
            .config
            .working_dir
            .clone()
            .unwrap_or_else(|| "/".into());
        make_dir_in(&rootfs, &workdir)?;
        Ok((rootfs, workdir))
    }

    /// After a step changed the tree: its cache entry (or, without the cache, a new
    /// generation of the tree). Entries are lz4: written on every cold build and read only
    /// by later builds, they need speed more than size; the image stays zstd.
    fn changed(&mut self, key: String, layered: bool) -> Result<Entry, StepError> {
        let snapshot = self.snapshot_path(&key);
        let no_cache = self.opts.no_cache;
        let with_image = self.entry_with_image;
        let stage = self.current();
        stage.key = key;
        if no_cache {
            stage.generation += 1;
            stage.state.fs = Fs::Tree(stage.generation);
            stage.tree_fs = Some(stage.state.fs.clone());
            return Ok(Entry::None);
        }
        stage.state.fs = Fs::Snapshot(snapshot.clone());
        let layer = match stage.layer.as_mut().filter(|_| layered) {
            Some(layer) => {
                layer.holds = stage.state.fs.clone();
                Some(layer.clone())
            }
            None => {
                stage.tree_fs = Some(stage.state.fs.clone());
                None
            }
        };
        if with_image {
            stage.pending = Some(snapshot);
            return Ok(Entry::WithImage);
        }
        let started = Instant::now();
        let rootfs = match layer {
            Some(layer) => stage.merged_view(&layer)?,
            None => stage.rootfs(),
        };
        write_config(&rootfs, &stage.state)?;
        unpacked::save_fast(&rootfs, &snapshot)?;
        Ok(Entry::Took(started.elapsed().as_secs_f64()))
    }

    /// A cached step: its entry is the stage's state from here on.
    fn cached(&mut self, key: &str) -> bool {
        if self.opts.no_cache {
            return false;
        }
        let snapshot = self.snapshot_path(key);
        if !snapshot.is_file() {
            return false;
        }
        // Its modification time is its last use, for whoever cleans the cache.
        if let Ok(f) = fs::File::options().append(true).open(&snapshot) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        let stage = self.current();
        stage.key = key.to_string();
        stage.state.fs = Fs::Snapshot(snapshot);
        true
    }

    fn run(&mut self, text: &str, command: &Command) -> Result<Done, Failure> {
        let key = {
            let stage = self.current();
            Self::key_after(stage, text, "")
        };
        if self.cached(&key) {
            return Ok(Done::Cached);
        }
        let opts = self.opts;
        let stage = self.current();
        let layer = Self::open_layer(stage, opts.no_cache)?;
        let (mut spec, workdir) = match &layer {
            // The container mounts the base and the overlay itself, its upper layer the
            // stage's.
            Some(layer) => {
                let workdir = stage.workdir();
                if workdir != "/" {
                    make_dir_in(&stage.merged_view(layer)?, &workdir)?;
                }
                // One overlay at a time on an upper layer: the container mounts its own.
                stage.merged = None;
                let mut spec = ContainerSpec::new(layer.base.clone(), opts.user.clone());
                spec.overlay_layer = Some(stage.layer_dir());
                (spec, workdir)
            }
            None => {
                let (rootfs, workdir) = Self::tree_with_workdir(stage)?;
                let mut spec = ContainerSpec::new(rootfs, opts.user.clone());
                spec.unpacked = Some(UnpackedDir {
                    owned_from: stage.dir.clone(),
                    dir: stage.dir.clone(),
                });
                (spec, workdir)
            }
        };
        spec.writable = true;
        spec.remap_root = true;
        spec.mount_home = false;
        spec.workdir = Some(PathBuf::from(&workdir));
        // Build arguments are the step's variables, the image's environment wins over them.
        for (k, v) in &stage.args {
            spec.env.push((k.clone(), v.clone()));
        }
        for e in &stage.state.config.env {
            if let Some((k, v)) = e.split_once('=') {
                spec.env.retain(|(n, _)| n != k);
                spec.env.push((k.into(), v.into()));
            }
        }
        let base = vec![
            ("PATH".to_string(), DEFAULT_PATH.to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let argv: Vec<OsString> = match command {
            Command::Shell(line) => stage
                .state
                .shell
                .iter()
                .map(OsString::from)
                .chain([OsString::from(line)])
                .collect(),
            Command::Exec(argv) => argv.iter().map(OsString::from).collect(),
        };
        let status = crate::container::run::run_in_env(&spec, &argv, &opts.prepare, base);
        unblock_signals();
        let status = status?;
        if status != 0 {
            return Err(Failure::Run(status));
        }
        let snapshot = self.changed(key, layer.is_some())?;
        Ok(Done::Ran { snapshot })
    }

    fn copy(
        &mut self,
        text: &str,
        add: bool,
        from: Option<&str>,
        sources: &[String],
        dest: &str,
    ) -> Result<Done, Failure> {
        let vars = Self::vars(self.current());
        let sources: Vec<String> = sources
            .iter()
            .map(|s| dockerfile::substitute(s, &vars))
            .collect();
        let dest = dockerfile::substitute(dest, &vars);
        // Where the sources are, and what their content is for the key.
        let (root, identity) = match from {
            None => {
                let root = self.opts.context.clone();
                (root, None)
            }
            Some(name) => {
                let earlier = self.stages.len() - 1;
                let position = match name.parse::<usize>() {
                    Ok(n) => Some(n).filter(|&n| n < earlier),
                    Err(_) => self.stages[..earlier]
                        .iter()
                        .rposition(|s| s.name.as_deref() == Some(name)),
                }
                .ok_or_else(|| StepError::NoStage(name.to_string()))?;
                let source = &mut self.stages[position];
                Self::materialize(source)?;
                (source.rootfs(), Some(source.key.clone()))
            }
        };
        let mut files = Vec::new();
        for s in &sources {
            if s.contains("://") {
                return Err(StepError::Url(s.clone()).into());
            }
            files.extend(expand_source(&root, s, from.is_some())?);
        }
        // With a .dockerignore, the step copies (and its key hashes) a copy of the
        // context's files without what it leaves out.
        let mut root = root;
        let mut _context_copy = None;
        if from.is_none() && !self.ignore.is_empty() {
            self.context_copies += 1;
            let copy = self.work.join(format!("context-{}", self.context_copies));
            unpacked::make_private_dir(&self.work, &copy)?;
            let guard = WorkDir(copy.clone());
            let kept = copy_context(&root, &files, &self.ignore, &copy)?;
            if kept.is_empty() {
                return Err(StepError::NoSource(format!(
                    "{} (left out by {})",
                    sources.join(" "),
                    dockerignore::FILE_NAME
                ))
                .into());
            }
            files = kept;
            root = copy;
            _context_copy = Some(guard);
        }
        let content = match identity {
            Some(stage_key) => hash_parts(&[stage_key.as_bytes(), sources.join("\0").as_bytes()]),
            None => {
                let mut h = Sha256::new();
                for f in &files {
                    hash_tree(&mut h, &root, f)?;
                }
                hex(&h.finalize())
            }
        };
        let key = {
            let stage = self.current();
            Self::key_after(stage, text, &format!("{content}\0{dest}"))
        };
        if self.cached(&key) {
            return Ok(Done::Cached);
        }
        let no_cache = self.opts.no_cache;
        let stage = self.current();
        let layer = Self::open_layer(stage, no_cache)?;
        match &layer {
            Some(layer) => {
                let workdir = stage.workdir();
                let merged = stage.merged_view(layer)?;
                make_dir_in(&merged, &workdir)?;
                copy_files(&merged, &workdir, &dest, &files, add)?;
            }
            None => {
                let (rootfs, workdir) = Self::tree_with_workdir(stage)?;
                copy_files(&rootfs, &workdir, &dest, &files, add)?;
            }
        }
        let snapshot = self.changed(key, layer.is_some())?;
        Ok(Done::Ran { snapshot })
    }

    /// Squash the last stage into the output, its config inside.
    fn finish(&mut self) -> Result<(), StepError> {
        let output = self.opts.output.clone();
        let no_cache = self.opts.no_cache;
        let final_key = hash_parts(&[b"image", self.current().key.as_bytes()]);
        let final_key = {
            let stage = self.current();
            let state = serde_json::json!({
                "config": stage.state.config,
                "labels": stage.state.labels,
            })
            .to_string();
            hash_parts(&[final_key.as_bytes(), state.as_bytes()])
        };
        let cached = self.snapshot_path(&final_key);
        let stage = self.current();
        let pending = stage.pending.take();
        let layer = stage.current_layer().filter(|_| !no_cache);
        let rootfs = match &layer {
            Some(layer) => stage.merged_view(layer)?,
            None => stage.rootfs(),
        };
        if !no_cache && cached.is_file() {
            if let Some(entry) = pending {
                write_config(&rootfs, &stage.state)?;
                unpacked::save_fast(&rootfs, &entry)?;
            }
            return copy_atomically(&cached, &output);
        }
        if layer.is_none() {
            Self::materialize(stage)?;
        }
        let target = if no_cache { &output } else { &cached };
        squash_tree(&rootfs, &stage.state, pending.as_deref(), target)?;
        if no_cache {
            return Ok(());
        }
        // A copy, not a link: each entry keeps its own last-use time for gc.
        if let Some(entry) = pending.filter(|e| !e.is_file()) {
            copy_atomically(&cached, &entry)?;
        }
        copy_atomically(&cached, &output)
    }

    /// The image just written, as an archive: unpacked from the squashfs, so that the
    /// archive holds exactly what the squashfs does.
    fn write_archive(&self, format: archive::ArchiveFormat, path: &Path) -> Result<(), StepError> {
        let dir = self.work.join("archive");
        unpacked::make_private_dir(&self.work, &dir)?;
        let output = &self.opts.output;
        let file = fs::File::open(output).map_err(io_err("cannot open", output))?;
        let kind = crate::image::detect(output, &file)?;
        let rootfs = unpacked::prepare_rootfs(&dir, output, &kind)?;
        let stage = self.stages.last().expect("parse checks FROM comes first");
        let name = archive::image_name(output);
        let image = archive::ArchiveImage {
            config: &stage.state.config,
            labels: &stage.state.labels,
            name: &name,
        };
        archive::write(&rootfs, &image, format, path, &dir)?;
        let _ = unpacked::remove_tree(&dir);
        Ok(())
    }
}

/// The build cache's step entries as `ferry gc` weighs them, while no build runs.
pub struct StepEntries {
    /// Held alone until gc is done: builds wait for it before they start.
    _lock: Option<nix::fcntl::Flock<fs::File>>,
    pub entries: Vec<crate::store::cache::ExtraEntry>,
}

/// The step entries of the build cache under `cache_root` (each `KEY.sqsh`, its
/// modification time its last use), or `None` while a build runs and may need them.
pub fn step_entries(cache_root: &Path) -> Result<Option<StepEntries>, BuildError> {
    let dir = cache_root.join(CACHE_DIR);
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| BuildError::Io { what, path, source }
    };
    let listing = match fs::read_dir(&dir) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Some(StepEntries {
                _lock: None,
                entries: Vec::new(),
            }))
        }
        Err(e) => return Err(io("cannot read", &dir)(e)),
    };
    let lock_path = dir.join(LOCK_FILE);
    let file = match fs::File::options()
        .create(true)
        .append(true)
        .open(&lock_path)
    {
        Ok(f) => f,
        // A cache someone else fills (a site's shared one): its entries are not ours.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            return Ok(Some(StepEntries {
                _lock: None,
                entries: Vec::new(),
            }))
        }
        Err(e) => return Err(io("cannot open", &lock_path)(e)),
    };
    let lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(held) => held,
        Err((_, nix::Error::EWOULDBLOCK)) => return Ok(None),
        Err((_, e)) => {
            return Err(io("cannot lock", &lock_path)(io::Error::from_raw_os_error(
                e as i32,
            )))
        }
    };
    let mut entries = Vec::new();
    for e in listing.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_entry = name
            .strip_suffix(".sqsh")
            .is_some_and(|key| key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()));
        let Ok(meta) = e.metadata() else { continue };
        if !is_entry || !meta.is_file() {
            continue;
        }
        entries.push(crate::store::cache::ExtraEntry {
            path: e.path(),
            size: meta.len(),
            last_used: u64::try_from(meta.mtime()).unwrap_or(0),
        });
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Some(StepEntries {
        _lock: Some(lock),
        entries,
    }))
}

/// Remove what builds killed by a signal left in the cache (their work trees and partial
/// entries, named after a process that no longer runs); returns how many.
pub fn remove_leftovers(cache_root: &Path) -> usize {
    let dir = cache_root.join(CACHE_DIR);
    let Ok(entries) = fs::read_dir(&dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = match name.strip_prefix("work-") {
            Some(pid) => pid,
            None => match name.rsplit_once(".ferry-") {
                Some((_, rest)) => rest.trim_end_matches(".partial"),
                None => continue,
            },
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = e.path();
        let gone = if path.is_dir() {
            unpacked::remove_tree(&path)
        } else {
            fs::remove_file(&path)
        };
        match gone {
            Ok(()) => removed += 1,
            Err(err) => tracing::warn!("cannot remove {}: {err}", path.display()),
        }
    }
    removed
}

/// The argv a start command (ENTRYPOINT, CMD) records: shell form through the shell.
fn start_argv(c: &Command, shell: &[String]) -> Vec<String> {
    match c {
        Command::Exec(argv) => argv.clone(),
        Command::Shell(line) => shell.iter().cloned().chain([line.clone()]).collect(),
    }
}

/// After `ferry run`'s machinery blocked the signals it forwards: Ctrl-C ends the build
/// again between steps.
fn unblock_signals() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    let _ = set.thread_unblock();
}

/// A file of the image, read without unpacking it.
fn read_in_image(path: &Path, kind: &ImageKind, inside: &str) -> Option<Vec<u8>> {
    let rel = inside.trim_start_matches('/');
    match kind {
        ImageKind::Directory => {
            let resolved = resolve_in_tree(path, Path::new(rel)).ok()?;
            fs::read(path.join(resolved)).ok()
        }
        ImageKind::Squashfs { offset, .. } => {
            let out = Process::new("unsquashfs")
                .arg("-o")
                .arg(offset.to_string())
                .arg("-cat")
                .arg(path)
                .arg(rel)
                .stderr(std::process::Stdio::null())
                .output()
                .ok()?;
            out.status.success().then_some(out.stdout)
        }
    }
}

/// The image of the tree at `target`, its config inside and its WORKDIR made; `entry`, the
/// last step's pending cache entry, is written first when the WORKDIR is not in the tree
/// (the entry is the tree as the step left it), else left for the caller to copy.
fn squash_tree(
    rootfs: &Path,
    state: &State,
    entry: Option<&Path>,
    target: &Path,
) -> Result<(), StepError> {
    if let Some(w) = &state.config.working_dir {
        if let Some(entry) = entry.filter(|_| !dir_in_tree(rootfs, w)) {
            write_config(rootfs, state)?;
            unpacked::save_fast(rootfs, entry)?;
        }
        make_dir_in(rootfs, w)?;
    }
    write_config(rootfs, state)?;
    Ok(unpacked::save(rootfs, target)?)
}

/// COPY's files into the tree at `dest` (relative to `workdir`).
fn copy_files(
    rootfs: &Path,
    workdir: &str,
    dest: &str,
    files: &[PathBuf],
    add: bool,
) -> Result<(), StepError> {
    let dest_path = crate::spec::container_path(&Path::new(workdir).join(dest).to_string_lossy());
    let rel_dest = dest_path
        .strip_prefix("/")
        .unwrap_or(&dest_path)
        .to_path_buf();
    let into_dir = dest.ends_with('/')
        || dest == "."
        || dest.ends_with("/.")
        || files.len() > 1
        || files.iter().any(|f| f.is_dir())
        || resolve_in_tree(rootfs, &rel_dest)
            .map(|r| rootfs.join(r).is_dir())
            .unwrap_or(false);
    for f in files {
        copy_one(rootfs, f, &rel_dest, into_dir, add)?;
    }
    Ok(())
}

/// `dir` (absolute inside) made in the tree, symlinks followed inside it.
fn make_dir_in(rootfs: &Path, dir: &str) -> Result<(), StepError> {
    let rel = dir.trim_start_matches('/');
    let resolved = rootfs.join(
        resolve_in_tree(rootfs, Path::new(rel))
            .map_err(io_err("cannot resolve", Path::new(dir)))?,
    );
    fs::create_dir_all(&resolved).map_err(io_err("cannot create", &resolved))
}

/// Write `bytes` at `inside` in the tree, replacing what is there.
fn write_in_tree(rootfs: &Path, inside: &str, bytes: &[u8]) -> Result<(), StepError> {
    let rel = Path::new(inside.trim_start_matches('/'));
    let parent = rel.parent().unwrap_or(Path::new(""));
    let parent =
        rootfs.join(resolve_in_tree(rootfs, parent).map_err(io_err("cannot resolve", rel))?);
    fs::create_dir_all(&parent).map_err(io_err("cannot create", &parent))?;
    let target = parent.join(rel.file_name().unwrap_or_default());
    if fs::symlink_metadata(&target).is_ok() {
        fs::remove_file(&target).map_err(io_err("cannot replace", &target))?;
    }
    fs::write(&target, bytes).map_err(io_err("cannot write", &target))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o644))
        .map_err(io_err("cannot set the mode of", &target))
}

/// The config where imports keep it, and its environment in /etc/environment.
fn write_config(rootfs: &Path, state: &State) -> Result<(), StepError> {
    let mut json = serde_json::to_value(&state.config).expect("configs serialise");
    if !state.labels.is_empty() {
        json["labels"] = serde_json::to_value(&state.labels).expect("labels serialise");
    }
    let text = serde_json::to_vec_pretty(&json).expect("configs serialise");
    write_in_tree(rootfs, crate::spec::entrypoint::CONFIG_PATH, &text)?;
    let env = import::environment_file("", &state.config.env);
    write_in_tree(rootfs, "/etc/environment", env.as_bytes())
}

/// The files a COPY source names under `root` (the context, or a stage's tree), with
/// `*` and `?` in its last part matched.
fn expand_source(root: &Path, source: &str, in_tree: bool) -> Result<Vec<PathBuf>, StepError> {
    let normal = crate::spec::container_path(source);
    let rel = normal.strip_prefix("/").unwrap_or(&normal).to_path_buf();
    let name = rel.file_name().map(|n| n.to_string_lossy().into_owned());
    let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
    let resolve = |p: &Path| -> Result<PathBuf, StepError> {
        if in_tree {
            Ok(root.join(resolve_in_tree(root, p).map_err(io_err("cannot resolve", p))?))
        } else {
            Ok(root.join(p))
        }
    };
    match name {
        Some(pattern) if pattern.contains(['*', '?']) => {
            let dir = resolve(&parent)?;
            let mut found: Vec<PathBuf> = fs::read_dir(&dir)
                .map_err(io_err("cannot read", &dir))?
                .flatten()
                .filter(|e| dockerignore::match_name(&pattern, &e.file_name().to_string_lossy()))
                .map(|e| e.path())
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(StepError::NoSource(source.to_string()));
            }
            Ok(found)
        }
        _ => {
            let path = resolve(&rel)?;
            if !in_tree {
                // A symlink out of the context is not the context's.
                let real =
                    fs::canonicalize(&path).map_err(|_| StepError::NoSource(source.into()))?;
                let context = fs::canonicalize(root).map_err(io_err("cannot read", root))?;
                if !real.starts_with(&context) {
                    return Err(StepError::OutsideContext(source.into(), context));
                }
            }
            if fs::symlink_metadata(&path).is_err() {
                return Err(StepError::NoSource(source.into()));
            }
            Ok(vec![path])
        }
    }
}

/// Copy `files` (under `context`) into `copy` at the same relative paths, leaving out
/// what `ignore` excludes; returns the copies of the files that are kept.
fn copy_context(
    context: &Path,
    files: &[PathBuf],
    ignore: &Ignore,
    copy: &Path,
) -> Result<Vec<PathBuf>, StepError> {
    let mut kept = Vec::new();
    for f in files {
        let rel = f.strip_prefix(context).unwrap_or(f);
        if copy_kept(context, rel, ignore, copy)? {
            kept.push(copy.join(rel));
        }
    }
    Ok(kept)
}

/// One path of the context and what is under it; whether anything of it was kept.
fn copy_kept(context: &Path, rel: &Path, ignore: &Ignore, copy: &Path) -> Result<bool, StepError> {
    let source = context.join(rel);
    let target = copy.join(rel);
    let meta = fs::symlink_metadata(&source).map_err(io_err("cannot read", &source))?;
    let excluded = ignore.excludes(rel);
    if meta.is_dir() {
        // A left-out folder is looked into only for what an exception brings back.
        if excluded && !ignore.has_exceptions() {
            return Ok(false);
        }
        if !excluded {
            fs::create_dir_all(&target).map_err(io_err("cannot create", &target))?;
        }
        let mut entries: Vec<PathBuf> = fs::read_dir(&source)
            .map_err(io_err("cannot read", &source))?
            .flatten()
            .map(|e| rel.join(e.file_name()))
            .collect();
        entries.sort();
        let mut any = !excluded;
        for e in entries {
            any |= copy_kept(context, &e, ignore, copy)?;
        }
        if any {
            fs::set_permissions(&target, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(io_err("cannot set the mode of", &target))?;
        }
        return Ok(any);
    }
    if excluded {
        return Ok(false);
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    }
    if meta.is_symlink() {
        let link = fs::read_link(&source).map_err(io_err("cannot read", &source))?;
        std::os::unix::fs::symlink(&link, &target).map_err(io_err("cannot create", &target))?;
    } else if meta.is_file() {
        fs::copy(&source, &target).map_err(io_err("cannot copy", &source))?;
    }
    // Other kinds (sockets, devices) are not copied, as cp -a would not either unprivileged.
    Ok(true)
}

/// Names, modes and contents of the files at `path`, into `h`.
fn hash_tree(h: &mut Sha256, root: &Path, path: &Path) -> Result<(), StepError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("cannot read", path))?;
    let rel = path.strip_prefix(root).unwrap_or(path);
    h.update(rel.to_string_lossy().as_bytes());
    h.update([0]);
    h.update(meta.mode().to_le_bytes());
    if meta.is_symlink() {
        let target = fs::read_link(path).map_err(io_err("cannot read", path))?;
        h.update(target.to_string_lossy().as_bytes());
    } else if meta.is_dir() {
        let mut entries: Vec<PathBuf> = fs::read_dir(path)
            .map_err(io_err("cannot read", path))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            hash_tree(h, root, &e)?;
        }
    } else if meta.is_file() {
        let mut file = fs::File::open(path).map_err(io_err("cannot read", path))?;
        let mut buf = vec![0; 1 << 16];
        loop {
            let n = file.read(&mut buf).map_err(io_err("cannot read", path))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(())
}

fn is_tar(path: &Path) -> bool {
    let name = path.to_string_lossy();
    [
        ".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// Copy `source` to `dest` (relative to the tree) in the tree: into it when `into_dir`
/// (a directory's contents, as docker does), else as it.
fn copy_one(
    rootfs: &Path,
    source: &Path,
    dest: &Path,
    into_dir: bool,
    add: bool,
) -> Result<(), StepError> {
    let resolve = |p: &Path| -> Result<PathBuf, StepError> {
        Ok(rootfs.join(resolve_in_tree(rootfs, p).map_err(io_err("cannot resolve", p))?))
    };
    let is_dir = fs::metadata(source).is_ok_and(|m| m.is_dir());
    let mut cp = Process::new("cp");
    cp.args(["-a", "--no-preserve=ownership"]);
    if into_dir {
        let target = resolve(dest)?;
        fs::create_dir_all(&target).map_err(io_err("cannot create", &target))?;
        if is_dir {
            cp.arg(source.join(".")).arg(&target);
        } else if add && is_tar(source) {
            let mut tar = Process::new("tar");
            tar.args(["-x", "--no-same-owner", "--no-same-permissions", "-C"])
                .arg(&target)
                .arg("-f")
                .arg(source);
            run_tool("tar", &mut tar, None)?;
            return Ok(());
        } else {
            let name = source.file_name().unwrap_or_default();
            let file = target.join(name);
            if fs::symlink_metadata(&file).is_ok_and(|m| !m.is_dir()) {
                fs::remove_file(&file).map_err(io_err("cannot replace", &file))?;
            }
            cp.arg(source).arg(&file);
        }
    } else {
        let parent = resolve(dest.parent().unwrap_or(Path::new("")))?;
        fs::create_dir_all(&parent).map_err(io_err("cannot create", &parent))?;
        let file = parent.join(dest.file_name().unwrap_or_default());
        if fs::symlink_metadata(&file).is_ok_and(|m| !m.is_dir()) {
            fs::remove_file(&file).map_err(io_err("cannot replace", &file))?;
        }
        cp.arg("-T").arg(source).arg(&file);
    }
    cp.stdin(std::process::Stdio::null());
    run_tool("cp", &mut cp, None)?;
    Ok(())
}

/// Whether `dir` (a path in the container) is a directory in the tree.
fn dir_in_tree(rootfs: &Path, dir: &str) -> bool {
    resolve_in_tree(rootfs, Path::new(dir.trim_start_matches('/')))
        .is_ok_and(|rel| rootfs.join(rel).is_dir())
}

/// Copy `from` to `to`, appearing complete or not at all.
fn copy_atomically(from: &Path, to: &Path) -> Result<(), StepError> {
    let mut partial = to.as_os_str().to_owned();
    partial.push(format!(".ferry-{}.partial", std::process::id()));
    let partial = PathBuf::from(partial);
    let done = fs::copy(from, &partial).and_then(|_| fs::rename(&partial, to));
    if let Err(e) = done {
        let _ = fs::remove_file(&partial);
        return Err(StepError::Io {
            what: "cannot write",
            path: to.into(),
            source: e,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_names() {
        assert!(dockerignore::match_name("*.py", "a.py"));
        assert!(!dockerignore::match_name("*.py", "a.pyc"));
        assert!(dockerignore::match_name("a?c", "abc"));
        assert!(dockerignore::match_name("*", ""));
    }

    #[test]
    fn context_copies_leave_out_what_dockerignore_names() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = tmp.path().join("ctx");
        fs::create_dir_all(ctx.join("src/__pycache__")).unwrap();
        fs::create_dir_all(ctx.join("logs")).unwrap();
        fs::write(ctx.join("src/a.py"), "a\n").unwrap();
        fs::write(ctx.join("src/__pycache__/a.pyc"), "x").unwrap();
        fs::write(ctx.join("logs/1.log"), "1").unwrap();
        fs::write(ctx.join("logs/keep.log"), "k").unwrap();
        fs::write(ctx.join("secret.env"), "s").unwrap();
        let ignore = Ignore::parse("**/__pycache__\nlogs\n!logs/keep.log\n*.env\n");
        let copy = tmp.path().join("copy");
        fs::create_dir(&copy).unwrap();
        let kept = copy_context(&ctx, std::slice::from_ref(&ctx), &ignore, &copy).unwrap();
        assert_eq!(kept, vec![copy.join("")]);
        assert!(copy.join("src/a.py").is_file());
        assert!(!copy.join("src/__pycache__").exists());
        assert!(!copy.join("logs/1.log").exists());
        assert!(copy.join("logs/keep.log").is_file());
        assert!(!copy.join("secret.env").exists());
        let none = copy_context(&ctx, &[ctx.join("secret.env")], &ignore, &copy).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn copies_into_and_onto() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        let ctx = tmp.path().join("ctx");
        fs::create_dir_all(ctx.join("dir/sub")).unwrap();
        fs::write(ctx.join("f"), "f\n").unwrap();
        fs::write(ctx.join("dir/sub/g"), "g\n").unwrap();
        copy_one(
            &root,
            &ctx.join("f"),
            Path::new("link/renamed"),
            false,
            false,
        )
        .unwrap();
        assert_eq!(fs::read_to_string(root.join("etc/renamed")).unwrap(), "f\n");
        copy_one(&root, &ctx.join("dir"), Path::new("app"), true, false).unwrap();
        assert_eq!(fs::read_to_string(root.join("app/sub/g")).unwrap(), "g\n");
        let files = expand_source(&ctx, "../../*", false).unwrap();
        assert_eq!(files, vec![ctx.join("dir"), ctx.join("f")]);
        assert!(matches!(
            expand_source(&ctx, "missing", false),
            Err(StepError::NoSource(_))
        ));
    }
}

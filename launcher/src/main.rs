//! The `ferry` command line.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use ferry::container::exit_code;
use ferry::container::holder::PrepareOptions;
use ferry::container::run::run;
use ferry::image::oci::Image;
use ferry::image::reference::ImageRef;
use ferry::image::registry::settings::ImportSettings;
use ferry::spec::env::parse_assignment;
use ferry::spec::mounts::MountSpec;
use ferry::spec::user::UserInfo;
use ferry::spec::{ContainerSpec, Provider, RootfsProvider, UnknownProvider};
use ferry::store::cache::{format_size, parse_size, Cache};
use ferry::store::import::{self, ImportOptions};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Rootless containers for HPC: run a command in a squashfs, SIF, OCI or directory image, no root and no daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a container made from IMAGE.
    Run(RunArgs),
    /// Build a squashfs image from a Dockerfile, without root: RUN steps run as root in a
    /// writable container of the image so far; each step is cached.
    Build(BuildArgs),
    /// Import an image into the cache (or, with -o, into a squashfs file of your own).
    Import(ImportArgs),
    /// List the images in the cache.
    Images(CacheArgs),
    /// Remove cached images, least recently used first, and leftovers of killed imports.
    Gc(GcArgs),
    /// Show an image's digest, config and layers as JSON.
    Inspect(InspectArgs),
    /// (internal) Hold a container's namespaces; started by `ferry run` and the Slurm plugin.
    #[command(hide = true)]
    Hold,
    /// (internal) Say what the image on stdin is (PATH names it in messages); started by
    /// the Slurm plugin as the user for the kernel provider.
    #[command(hide = true)]
    ProbeImage { path: PathBuf },
    /// (internal) Unpack IMAGE's shared tree under ROOT in the background, for the `auto`
    /// provider; started by a container's holder as the user, returns at once.
    #[command(hide = true)]
    UnpackInBackground {
        owned_from: PathBuf,
        root: PathBuf,
        image: PathBuf,
        #[arg(long)]
        while_stdin_open: bool,
    },
    /// (internal) Run Slurm's commands called inside a container step (or a batch
    /// script's container) on the host; started by the Slurm plugin as the user, ends when
    /// its stdin ends.
    #[command(hide = true)]
    ForwardServe {
        /// Where to make its private directory.
        #[arg(long = "in", required_unless_present = "dir", conflicts_with = "dir")]
        parent: Option<PathBuf>,
        /// Serve in this empty private directory, made by the caller.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Squash an unpacked container (`ferry run --keep DIR`: DIR/rootfs) into a squashfs
    /// image, atomically.
    Save(SaveArgs),
    /// Check this node for what ferry needs (namespaces, FUSE, squashfuse, Slurm setup).
    Doctor(ferry::doctor::DoctorArgs),
    /// List your named containers on this node (`--container-name`), or remove some with
    /// `ferry containers rm NAME...`.
    Containers(ContainersArgs),
    /// Checkpoint the container of `ferry run --checkpoint-dir DIR` into DIR (with CRIU);
    /// its processes end, and `ferry restore DIR` continues them.
    Checkpoint {
        /// The checkpoint directory given to `ferry run --checkpoint-dir`.
        dir: PathBuf,
    },
    /// Continue a container checkpointed into DIR where it stopped; its output follows on
    /// stdout.
    Restore {
        /// The checkpoint directory.
        dir: PathBuf,
    },
}

#[derive(Args)]
struct ContainersArgs {
    /// Also list other jobs' containers (in a job, only its own and those kept across jobs
    /// are listed) and running unnamed ones (attachable as JOBID.STEPID).
    #[arg(long)]
    all: bool,
    /// Where the site keeps named containers (default: the plugin's `named_dir` from
    /// plugstack.conf, else /tmp).
    #[arg(long, value_name = "DIR", global = true)]
    named_dir: Option<PathBuf>,
    #[command(subcommand)]
    action: Option<ContainersAction>,
}

#[derive(Subcommand)]
enum ContainersAction {
    /// Remove named containers (not one that runs).
    Rm {
        /// The job whose container to remove (default: this job's, in a job; else the only
        /// one of that name).
        #[arg(long, value_name = "JOBID")]
        job: Option<u32>,
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
}

#[derive(Args)]
struct SaveArgs {
    /// The root filesystem to save (e.g. DIR/rootfs of `ferry run --keep DIR`).
    rootfs: PathBuf,
    /// The image to write (replaced atomically when it exists).
    output: PathBuf,
    /// Remove this directory (the container's) after saving, whether the save worked or not.
    #[arg(long, hide = true, value_name = "DIR")]
    remove: Option<PathBuf>,
}

#[derive(Args)]
#[command(trailing_var_arg = true)]
struct RunArgs {
    /// Make the root filesystem writable; writes go to memory and vanish at exit.
    #[arg(short = 'w', long)]
    writable: bool,
    /// Appear as root (uid 0) inside; files you create on the host are still yours.
    #[arg(long)]
    remap_root: bool,
    /// Do not mount your home directory inside.
    #[arg(long)]
    no_mount_home: bool,
    /// Bind mount SRC[:DST[:ro|rw]]; repeatable, and a comma-separated list is accepted.
    #[arg(short = 'm', long = "mount", value_name = "SRC[:DST[:FLAGS]]")]
    mounts: Vec<String>,
    /// Working directory inside (default: the current directory if it exists inside, else
    /// the image's WorkingDir, else home, else /).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Run the image's entrypoint (its Entrypoint, or enroot's /etc/rc) with COMMAND as its
    /// arguments, in the image's WorkingDir.
    #[arg(long)]
    entrypoint: bool,
    /// New namespaces for the container instead of the host's: net (only a loopback
    /// interface, up), ipc, uts (a hostname of its own); a comma-separated list.
    #[arg(long, value_name = "net,ipc,uts")]
    unshare: Option<ferry::spec::unshare::Unshare>,
    /// How a squashfs or SIF image becomes the root filesystem: `auto` (the default:
    /// mounted with squashfuse while ferry unpacks it into the cache in the background, where
    /// the cache is on a local disk with room; later runs use the tree, at the host's speed),
    /// `squashfuse` (mounted, nothing copied), `unpack` (unpacked once into the cache and
    /// reused: no FUSE on the read path, costs disk) or `kernel` (mounted by the kernel's
    /// squashfs driver; root only: for admins testing what the plugin does where the site
    /// enables it).
    #[arg(
        long,
        value_name = "PROVIDER",
        value_enum,
        default_value_t,
        env = "FERRY_ROOTFS"
    )]
    rootfs: Provider,
    /// GPUs inside: `all`, `none`, or indexes (0,2: /dev/nvidia0 and /dev/nvidia2), with the
    /// host's driver libraries and nvidia-smi. Default: those the scheduler gave the job
    /// (SLURM_STEP_GPUS, CUDA_VISIBLE_DEVICES), else none.
    #[arg(long, value_name = "all|none|LIST")]
    gpus: Option<String>,
    /// Set NAME=VALUE inside (a bare NAME passes the current value); repeatable.
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Make the container checkpointable into DIR (with CRIU, where the site enables it):
    /// `ferry checkpoint DIR` or SIGUSR1 (--checkpoint-signal) to ferry saves it and ends it, `ferry restore DIR`
    /// continues it. The command gets its own PID namespace, stdin from /dev/null, and its
    /// output goes to DIR/output, which ferry copies to stdout.
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// With --checkpoint-dir: the signal to ferry that checkpoints the container, for
    /// programs that use SIGUSR1 themselves (USR1, USR2, TERM, INT, HUP, QUIT or ALRM).
    #[arg(
        long,
        value_name = "SIGNAL",
        default_value = "USR1",
        requires = "checkpoint_dir"
    )]
    checkpoint_signal: ferry::container::checkpoint::CheckpointSignal,
    /// Run in a writable, unpacked copy of the image kept in DIR (made on first use,
    /// reused after; DIR/rootfs), like a named container. `ferry save DIR/rootfs OUT.sqsh`
    /// makes an image of it.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Print how long each phase of the container's start took (user namespace, image
    /// mount, binds, /dev, passwd files, pivot_root, exec...), one line each on stderr.
    #[arg(long)]
    timings: bool,
    #[command(flatten)]
    cache: CacheArgs,
    /// Image: a squashfs (.sqsh), SIF or root filesystem directory, an OCI layout
    /// (oci:DIR[:TAG]), an archive (oci-archive:FILE, docker-archive:FILE) or docker://REF.
    image: String,
    /// Command and its arguments (default: the image's Entrypoint and Cmd, else enroot's
    /// /etc/rc, else /bin/sh).
    #[arg(allow_hyphen_values = true)]
    command: Vec<OsString>,
}

#[derive(Args)]
struct CacheArgs {
    /// Image cache directory (default: $XDG_CACHE_HOME/ferry or ~/.cache/ferry).
    #[arg(long = "cache", env = "FERRY_CACHE", value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Args)]
struct ImportArgs {
    #[command(flatten)]
    cache: CacheArgs,
    /// Allow plain HTTP and unverified TLS to the registry.
    #[arg(long)]
    insecure: bool,
    /// Also write the image as this squashfs file.
    #[arg(short = 'o', long = "output", value_name = "FILE.sqsh")]
    output: Option<PathBuf>,
    /// Compression of the squashfs: lz4 (read fastest), zstd or zstd:LEVEL (1-22; about a
    /// sixth smaller than lz4 at the default 3, twice the CPU to read) [default: lz4].
    #[arg(long, value_name = "lz4|zstd[:N]", conflicts_with = "zstd_level")]
    compression: Option<ferry::image::squashfs::OutputCompression>,
    /// Same as --compression zstd:N.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=22))]
    zstd_level: Option<u32>,
    /// Image reference (see `ferry run --help`).
    image: String,
}

#[derive(Args)]
struct BuildArgs {
    #[command(flatten)]
    cache: CacheArgs,
    /// The Dockerfile, or an Apptainer definition file (a .def name or a `Bootstrap:` header)
    /// [default: CONTEXT/Dockerfile, else CONTEXT/Containerfile].
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
    /// The squashfs image to write (replaced atomically) [default: image.sqsh].
    #[arg(
        short = 't',
        long = "tag",
        value_name = "OUT.sqsh",
        default_value = "image.sqsh"
    )]
    output: PathBuf,
    /// Set a build argument (ARG NAME) for this build; repeatable.
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    build_args: Vec<String>,
    /// Run every step, neither using nor filling the step cache.
    #[arg(long)]
    no_cache: bool,
    /// Also write the image as an archive other tools load (skopeo, docker load, podman
    /// load), to --output or next to OUT.sqsh (OUT.oci.tar, OUT.docker.tar).
    #[arg(long, value_name = "FORMAT")]
    format: Option<ArchiveFormatArg>,
    /// Where --format writes the archive.
    #[arg(short = 'o', long = "output", value_name = "PATH", requires = "format")]
    archive_output: Option<PathBuf>,
    /// The directory that holds the trees being built (what RUN steps write), e.g. a local
    /// disk of a compute node [default: the build cache, CACHE/build/].
    #[arg(long, value_name = "DIR")]
    tmpdir: Option<PathBuf>,
    /// The directory COPY and ADD take files from.
    #[arg(default_value = ".")]
    context: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ArchiveFormatArg {
    /// An OCI image layout in a tar (`skopeo copy oci-archive:FILE …`).
    OciArchive,
    /// What `docker save` writes (`docker load -i FILE`).
    DockerArchive,
}

#[derive(Args)]
struct GcArgs {
    #[command(flatten)]
    cache: CacheArgs,
    /// Shrink the cache to at most this size (e.g. 50G); without it only leftovers go.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_size: Option<u64>,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    cache: CacheArgs,
    /// Image reference, or the sha256: digest of a cached image.
    image: String,
}

fn main() {
    // A Slurm task's program (`--container-entrypoint`): before anything else, while this
    // process has one thread.
    ferry::container::task_exec::run_if_asked();
    // A Slurm task of `--container-checkpoint` or `--container-restore`.
    ferry::container::checkpoint::run_slurm_task_if_asked();
    init_logging();
    let cli = Cli::try_parse().unwrap_or_else(|e| usage_error(e));
    let code = match cli.command {
        Command::Hold => ferry::container::holder::hold(),
        Command::ProbeImage { path } => report(probe_image(&path)),
        Command::UnpackInBackground {
            owned_from,
            root,
            image,
            while_stdin_open,
        } => ferry::rootfs::unpacked::unpack_in_background(
            &owned_from,
            &root,
            &image,
            while_stdin_open,
        ),
        Command::ForwardServe { parent, dir } => report(
            ferry::slurm::forward::serve(match (dir, parent) {
                (Some(dir), _) => ferry::slurm::forward::Place::Dir(dir),
                (None, parent) => ferry::slurm::forward::Place::In(parent.unwrap_or_default()),
            })
            .map(|()| 0)
            .map_err(anyhow::Error::from),
        ),
        Command::Run(args) => report(run_command(args)),
        Command::Build(args) => build_command(args),
        Command::Save(args) => {
            let saved = ferry::rootfs::unpacked::save(&args.rootfs, &args.output);
            if let Some(dir) = &args.remove {
                if let Err(e) = std::fs::remove_dir_all(dir) {
                    eprintln!("ferry: warning: cannot remove {}: {e}", dir.display());
                }
            }
            match saved {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("ferry: error: {e}");
                    1
                }
            }
        }
        Command::Doctor(args) => ferry::doctor::main(&args),
        Command::Containers(args) => report(containers_command(args)),
        Command::Checkpoint { dir } => match ferry::container::checkpoint::request(&dir) {
            Ok(made) => {
                eprintln!(
                    "ferry: checkpointed the container to {} ({}); continue it with {}",
                    dir.display(),
                    made.summary,
                    made.continue_with
                );
                0
            }
            Err(e) => {
                eprintln!("ferry: error: {e}");
                1
            }
        },
        Command::Restore { dir } => report(restore_command(&dir)),
        Command::Import(args) => {
            clean_up_on_termination();
            report(import_command(args).map(|()| 0))
        }
        Command::Images(args) => report(images_command(args).map(|()| 0)),
        Command::Gc(args) => report(gc_command(args).map(|()| 0)),
        Command::Inspect(args) => report(inspect_command(args).map(|()| 0)),
    };
    std::process::exit(code);
}

/// clap's own usage errors, except an unknown `--rootfs` provider: that is a setup failure
/// of `ferry run` like the others, one line and [`exit_code::SETUP_FAILED`].
fn usage_error(e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() == ErrorKind::InvalidValue {
        if let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
            e.get(ContextKind::InvalidArg),
            e.get(ContextKind::InvalidValue),
        ) {
            if arg.starts_with("--rootfs") {
                let unknown = UnknownProvider(value.clone());
                eprintln!("ferry: error: --rootfs {value}: {unknown}");
                std::process::exit(exit_code::SETUP_FAILED);
            }
        }
    }
    e.exit()
}

fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Batch jobs' output files get plain text, not colour codes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn report(outcome: anyhow::Result<i32>) -> i32 {
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            exit_code::SETUP_FAILED
        }
    }
}

fn open_cache(args: &CacheArgs) -> anyhow::Result<Cache> {
    let root = match &args.dir {
        Some(d) => d.clone(),
        None => Cache::default_root()?,
    };
    Ok(Cache::open(&root)?)
}

/// On SIGTERM, SIGINT or SIGHUP (scancel, a time limit, Ctrl-C), remove this import's
/// partial files before exiting. The signals are blocked here, before any other thread
/// starts, and taken by one thread; the programs ferry starts get the default mask back
/// (std resets it on spawn).
fn clean_up_on_termination() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(sig);
    }
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            let removed = ferry::store::cache::remove_live_work_areas();
            eprintln!("ferry: error: stopped by {sig}; removed {removed} partial work area(s)");
            std::process::exit(exit_code::killed_by(sig as i32));
        }
    });
}

fn import_options() -> anyhow::Result<ImportOptions> {
    // A site's registry settings come this way from the plugin, a user's from their shell.
    let settings = ImportSettings::from_env(|name| std::env::var_os(name))?;
    Ok(ImportOptions {
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr())
            && ferry::image::registry::Progress::auto().speaks(),
        registry: ferry::image::registry::ClientOptions::with_site(
            &settings,
            std::env::var_os("HOME")
                .map(std::path::PathBuf::from)
                .as_deref(),
        )?,
        ..ImportOptions::default()
    })
}

fn probe_image(path: &std::path::Path) -> anyhow::Result<i32> {
    nix::sys::prctl::set_no_new_privs().context("cannot set no_new_privs")?;
    println!("{}", ferry::rootfs::kernel::probe_stdin(path)?);
    Ok(0)
}

fn run_command(args: RunArgs) -> anyhow::Result<i32> {
    let mut phases = ferry::container::phases::Phases::new();
    // Nothing `ferry run` starts (holder, squashfuse, the command) may gain privileges by
    // exec; the holder and the command set it again themselves.
    nix::sys::prctl::set_no_new_privs().context("cannot set no_new_privs")?;
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let user = UserInfo::current()?;
    let image_ref = ImageRef::parse(&args.image, &cwd)?;
    // Imported images stay in the cache while they run: a gc then passes them by.
    let provider = match args.rootfs {
        Provider::Squashfuse => RootfsProvider::Squashfuse,
        Provider::Unpack | Provider::Auto => {
            let dir = open_cache(&args.cache)?.unpack_root(user.uid);
            RootfsProvider::Unpack {
                owned_from: dir.clone(),
                dir,
                first_use: match args.rootfs {
                    Provider::Auto => ferry::spec::FirstUse::Mount,
                    _ => ferry::spec::FirstUse::Wait,
                },
            }
        }
        Provider::Kernel => {
            // Only root may mount with the kernel's driver; users get it through the plugin.
            if !nix::unistd::geteuid().is_root() {
                return Err(ferry::rootfs::kernel::KernelError::NeedsRoot.into());
            }
            RootfsProvider::Kernel
        }
    };
    let (image, _in_use) = if let ImageRef::Local(path) = &image_ref {
        (path.clone(), None)
    } else {
        let cache = open_cache(&args.cache)?;
        let imported = import::import(&image_ref, &cache, &import_options()?)?;
        let held = match &imported.entry {
            Some(e) => Some(cache.hold(&e.digest)?),
            None => None,
        };
        (imported.path, held)
    };
    let mut spec = ContainerSpec::new(image, user);
    spec.writable = args.writable;
    spec.rootfs = provider;
    spec.remap_root = args.remap_root;
    spec.mount_home = !args.no_mount_home;
    spec.workdir = args
        .workdir
        .as_deref()
        .map(|w| ferry::spec::container_path(&w.to_string_lossy()));
    spec.cwd = Some(cwd.clone());
    spec.caller_locale = ferry::rootfs::locale::VARIABLES
        .iter()
        .filter_map(|&name| Some((name.to_string(), std::env::var(name).ok()?)))
        .collect();
    spec.home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|h| h.is_absolute());
    if let Some(dir) = &args.keep {
        let dir = cwd.join(dir);
        spec.unpacked = Some(ferry::spec::UnpackedDir {
            owned_from: dir.clone(),
            dir,
        });
        spec.writable = true;
    }
    for m in &args.mounts {
        spec.mounts.extend(MountSpec::parse_list(m, &cwd)?);
    }
    for e in &args.env {
        spec.env
            .push(parse_assignment(e, |n| std::env::var(n).ok())?);
    }
    // No command: run the image as its author meant (Entrypoint + Cmd, in WorkingDir).
    spec.entrypoint = args.entrypoint || args.command.is_empty();
    spec.unshare = args.unshare.unwrap_or_default();
    spec.gpus = match &args.gpus {
        Some(list) => ferry::spec::gpus::GpuRequest::parse(list).context("--gpus")?,
        None => ferry::spec::gpus::GpuRequest::from_env(|n| std::env::var(n).ok()),
    };
    let command = args.command;
    let program = std::env::current_exe().context("cannot find the ferry binary itself")?;
    if let Some(dir) = &args.checkpoint_dir {
        let dir = cwd.join(dir);
        return ferry::container::checkpoint::run(
            &spec,
            &command,
            &PrepareOptions::for_cli(program),
            &dir,
            args.checkpoint_signal,
        )
        .with_context(|| format!("--checkpoint-dir {}", dir.display()));
    }
    use ferry::container::run::{RunTimings, Timings};
    phases.end("options");
    let timings = RunTimings {
        phases,
        timings: if args.timings {
            Timings::Print
        } else {
            Timings::Quiet
        },
    };
    Ok(run(
        &spec,
        &command,
        &PrepareOptions::for_cli(program),
        timings,
    )?)
}

fn restore_command(dir: &std::path::Path) -> anyhow::Result<i32> {
    nix::sys::prctl::set_no_new_privs().context("cannot set no_new_privs")?;
    let program = std::env::current_exe().context("cannot find the ferry binary itself")?;
    Ok(ferry::container::checkpoint::restore(
        &PrepareOptions::for_cli(program),
        dir,
    )?)
}

fn build_command(args: BuildArgs) -> i32 {
    let options = (|| -> anyhow::Result<ferry::build::BuildOptions> {
        nix::sys::prctl::set_no_new_privs().context("cannot set no_new_privs")?;
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        let context = cwd.join(&args.context);
        if !context.is_dir() {
            anyhow::bail!("the build context {} is not a directory", context.display());
        }
        let dockerfile = match &args.file {
            Some(f) => cwd.join(f),
            None => ["Dockerfile", "Containerfile"]
                .iter()
                .map(|n| context.join(n))
                .find(|p| p.is_file())
                .unwrap_or_else(|| context.join("Dockerfile")),
        };
        let mut build_args = std::collections::BTreeMap::new();
        for a in &args.build_args {
            let (name, value) = parse_assignment(a, |n| std::env::var(n).ok())
                .with_context(|| format!("--build-arg {a}"))?;
            build_args.insert(name, value);
        }
        let program = std::env::current_exe().context("cannot find the ferry binary itself")?;
        let tmpdir = args.tmpdir.as_ref().map(|d| cwd.join(d));
        if let Some(dir) = &tmpdir {
            ferry::build::check_tmpdir(dir)?;
        }
        let output = cwd.join(&args.output);
        let archive = args.format.map(|f| {
            let format = match f {
                ArchiveFormatArg::OciArchive => ferry::build::archive::ArchiveFormat::Oci,
                ArchiveFormatArg::DockerArchive => ferry::build::archive::ArchiveFormat::Docker,
            };
            let path = match &args.archive_output {
                Some(p) => cwd.join(p),
                None => format.default_path(&output),
            };
            (format, path)
        });
        Ok(ferry::build::BuildOptions {
            dockerfile,
            context,
            output,
            archive,
            tmpdir,
            build_args,
            no_cache: args.no_cache,
            cache: open_cache(&args.cache)?,
            import: import_options()?,
            prepare: PrepareOptions::for_cli(program),
            user: UserInfo::current()?,
        })
    })();
    let options = match options {
        Ok(o) => o,
        Err(e) => return report(Err(e)),
    };
    match ferry::build::build(&options) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ferry: error: {e}");
            e.exit_status()
        }
    }
}

/// `ferry containers [--all]` and `ferry containers rm NAME...`.
fn containers_command(args: ContainersArgs) -> anyhow::Result<i32> {
    use ferry::container::named;
    let named_dir = match &args.named_dir {
        Some(dir) => dir.clone(),
        None => match ferry::doctor::site_plugin_settings() {
            Some(settings) => {
                settings
                    .context("the plugin's settings in plugstack.conf")?
                    .named_dir
            }
            None => ferry::slurm::site::PluginSettings::default().named_dir,
        },
    };
    let uid = nix::unistd::getuid().as_raw();
    let user_dir = named_dir.join(ferry::rootfs::user_dir::name(uid));
    let this_job: Option<u32> = std::env::var("SLURM_JOB_ID")
        .ok()
        .and_then(|j| j.parse().ok());
    match args.action {
        Some(ContainersAction::Rm { job, names }) => {
            let mut code = 0;
            for name in &names {
                match named::remove(&user_dir, uid, name, job.or(this_job)) {
                    Ok(dir) => println!("removed {name} ({})", dir.display()),
                    Err(e) => {
                        eprintln!("ferry: error: {e}");
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        None => {
            let listed = named::list(&user_dir, uid)
                .with_context(|| format!("cannot read {}", user_dir.display()))?;
            let shown = listed.into_iter().filter(|l| {
                args.all
                    || (l.dir.is_some()
                        && (this_job.is_none() || l.job.is_none() || l.job == this_job))
            });
            let mut rows = vec![[
                "NAME".to_string(),
                "JOB".to_string(),
                "SIZE".to_string(),
                "STATE".to_string(),
            ]];
            for l in shown {
                rows.push([
                    l.name.clone(),
                    l.job.map_or("-".into(), |j| j.to_string()),
                    l.dir.as_deref().map_or("-".into(), |d| {
                        format_size(ferry::rootfs::unpacked::tree_size(d))
                    }),
                    match &l.running {
                        Some(step) => format!("running (step {step})"),
                        None => "stopped".into(),
                    },
                ]);
            }
            if rows.len() == 1 {
                eprintln!(
                    "no named containers of yours on this node ({})",
                    user_dir.display()
                );
                return Ok(0);
            }
            print_table(&rows);
            Ok(0)
        }
    }
}

fn import_command(args: ImportArgs) -> anyhow::Result<()> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let image_ref = ImageRef::parse(&args.image, &cwd)?;
    if args.insecure && !matches!(image_ref, ImageRef::Registry(_)) {
        tracing::warn!("--insecure only matters for registry images");
    }
    let mut opts = import_options()?;
    opts.compression = args.compression.or(args
        .zstd_level
        .map(|level| ferry::image::squashfs::OutputCompression::Zstd { level }));
    if let (true, ImageRef::Registry(r)) = (args.insecure, &image_ref) {
        opts.registry.insecure_registries.push(r.registry.clone());
    }
    let imported = match &image_ref {
        // Nothing to cache: a local image is run as it is, or converted into the output.
        ImageRef::Local(path) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            ferry::image::detect(path, &file)?;
            import::ImportedImage {
                path: path.clone(),
                entry: None,
                built: false,
            }
        }
        _ => import::import(&image_ref, &open_cache(&args.cache)?, &opts)?,
    };
    match &args.output {
        Some(out) => {
            let out = cwd.join(out);
            import::export(&imported, &out, &opts)?;
            println!("{}", out.display());
        }
        None => println!("{}", imported.path.display()),
    }
    Ok(())
}

fn images_command(args: CacheArgs) -> anyhow::Result<()> {
    let cache = open_cache(&args)?;
    let refs = cache.refs()?;
    let now = ferry::store::cache::now();
    let mut rows = vec![[
        "REFERENCE".to_string(),
        "DIGEST".to_string(),
        "SIZE".to_string(),
        "LAST USE".to_string(),
    ]];
    for e in cache.entries()? {
        let mut names: Vec<&str> = refs
            .iter()
            .filter(|(_, d)| **d == e.digest)
            .map(|(r, _)| r.as_str())
            .collect();
        if names.is_empty() {
            names.push("<none>");
        }
        let short = e.digest.strip_prefix("sha256:").unwrap_or(&e.digest);
        for name in names {
            rows.push([
                name.to_string(),
                short.chars().take(12).collect(),
                format_size(e.size),
                format_age(now.saturating_sub(e.last_used)),
            ]);
        }
    }
    print_table(&rows);
    Ok(())
}

/// Four columns, padded to their widest cell; the third (a size) is right-aligned.
fn print_table(rows: &[[String; 4]]) {
    let widths: Vec<usize> = (0..4)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        println!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
}

fn format_age(secs: u64) -> String {
    match secs {
        0..=59 => "just now".into(),
        60..=3599 => format!("{} minutes ago", secs / 60),
        3600..=86399 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

fn gc_command(args: GcArgs) -> anyhow::Result<()> {
    let cache = open_cache(&args.cache)?;
    // Step entries of `ferry build` count under the same limit, unless a build runs.
    let steps = ferry::build::step_entries(cache.root())?;
    let (step_count, step_bytes) = steps.as_ref().map_or((0, 0), |s| {
        (
            s.entries.len(),
            s.entries.iter().map(|e| e.size).sum::<u64>(),
        )
    });
    let extra = steps
        .as_ref()
        .map(|s| s.entries.clone())
        .unwrap_or_default();
    let report = cache.gc_with(args.max_size, extra)?;
    let unpacked = cache.unpack_root(nix::unistd::getuid().as_raw());
    let (trees, tree_bytes) = ferry::rootfs::unpacked::remove_unused_unpacked(&unpacked)
        .with_context(|| format!("cannot clean {}", unpacked.display()))?;
    if trees > 0 {
        println!(
            "removed {trees} unpacked images ({}) that no container uses",
            format_size(tree_bytes)
        );
    }
    let builds = ferry::build::remove_leftovers(cache.root());
    if builds > 0 {
        println!("removed {builds} leftovers of stopped builds");
    }
    if step_count > 0 {
        println!(
            "build cache: {step_count} step entries ({}); removed {} ({})",
            format_size(step_bytes),
            report.extra_removed.len(),
            format_size(report.extra_freed)
        );
    } else if steps.is_none() {
        println!("build cache: kept, a build is running");
    }
    println!(
        "removed {} images ({}); {} in use kept; {} leftover work areas removed",
        report.removed.len(),
        format_size(report.freed - report.extra_freed),
        report.in_use,
        report.tmp_removed
    );
    if report.not_removable > 0 {
        println!(
            "{} images could not be removed (not yours to remove?)",
            report.not_removable
        );
    }
    Ok(())
}

fn inspect_command(args: InspectArgs) -> anyhow::Result<()> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let cache = open_cache(&args.cache)?;
    let from_entry = |e: ferry::store::cache::Entry| {
        serde_json::json!({
            "digest": e.digest,
            "cached": true,
            "path": cache.image_path(&e.digest).ok(),
            "refs": e.refs,
            "config": e.config,
            "config_digest": e.config_digest,
            "layers": e.layers,
            "size": e.size,
            "created": e.created,
            "last_used": e.last_used,
        })
    };
    let value = if args.image.starts_with("sha256:") {
        let e = cache
            .lookup(&args.image)?
            .with_context(|| format!("no image {} in the cache", args.image))?;
        from_entry(e)
    } else {
        let image_ref = ImageRef::parse(&args.image, &cwd)?;
        let opened = match &image_ref {
            ImageRef::OciLayout { dir, reference } => {
                Some(Image::open_layout(dir, reference.as_deref())?)
            }
            ImageRef::OciArchive { file, reference } => {
                Some(Image::open_oci_archive(file, reference.as_deref())?)
            }
            ImageRef::DockerArchive { file, reference } => {
                Some(Image::open_docker_archive(file, reference.as_deref())?)
            }
            ImageRef::Local(_) | ImageRef::Registry(_) => None,
        };
        match (opened, &image_ref) {
            (Some(img), _) => serde_json::json!({
                "digest": img.digest,
                "cached": cache.lookup(&img.digest)?.is_some(),
                "config": img.config.config,
                "config_digest": img.config_digest,
                "architecture": img.config.architecture,
                "os": img.config.os,
                "layers": img.layers,
                "size": img.layers_size(),
            }),
            (None, ImageRef::Local(path)) => {
                let file = std::fs::File::open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                let kind = ferry::image::detect(path, &file)?;
                let (kind, offset) = match kind {
                    ferry::image::ImageKind::Squashfs { offset, .. } => ("squashfs", offset),
                    ferry::image::ImageKind::Directory => ("directory", 0),
                };
                serde_json::json!({
                    "path": path,
                    "kind": kind,
                    "offset": offset,
                    "size": std::fs::metadata(path)?.len(),
                })
            }
            (None, _) => {
                let digest = cache.resolve_ref(&image_ref.to_string())?.with_context(|| {
                    format!("{image_ref} is not in the cache, and registry inspection is not built into this binary yet")
                })?;
                let e = cache
                    .lookup(&digest)?
                    .with_context(|| format!("{image_ref} is no longer in the cache"))?;
                from_entry(e)
            }
        }
    };
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

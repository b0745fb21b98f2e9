//! The plugin's errors. Each message is the one line a user (or, for the site's settings, an
//! admin) reads on their terminal or in slurmd's log: what failed, which option, the fix.

use std::path::PathBuf;

use ferry::spec::gpus::BadGpuList;
use ferry::spec::mounts::MountSpecError;
use ferry::spec::UnknownProvider;
use slurm_spank::SpankError;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Said already (on the user's terminal): the callback just fails.
    #[error("")]
    Reported,

    // Slurm and the plugin's own state.
    #[error("{callback}: called while another callback runs")]
    Reentered { callback: String },
    #[error("not read yet")]
    SettingsNotRead,
    #[error("plugstack.conf arguments: {0}")]
    PlugstackArgs(String),
    #[error(transparent)]
    Site(#[from] ferry::slurm::site::SiteError),
    #[error("the site configuration of ferry is broken ({0}); tell your admins")]
    BrokenSite(String),
    #[error("cannot register option --{option}: spank error {rc}")]
    RegisterOption { option: String, rc: u32 },
    #[error("unexpected option number {0}")]
    UnexpectedOption(i32),
    #[error("unknown option number {0}")]
    UnknownOption(usize),
    #[error("bad option")]
    BadOption,
    /// Slurm's errors are kept as text: their `Display` calls into Slurm's library, which
    /// the unit tests do not link.
    #[error("{0}")]
    Spank(String),
    #[error("cannot read the step's ids from Slurm: {0}")]
    StepIds(String),

    // The request, as srun, sbatch or salloc resolve it.
    #[error("--{0}: the value is not valid UTF-8")]
    OptionNotUtf8(String),
    #[error("--{0} needs a value")]
    NeedsValue(String),
    #[error(
        "{name}={value}: use container (the batch script runs in the job's container) or host"
    )]
    BadBatchScript { name: &'static str, value: String },
    #[error("{name}={value}: expected 1 or 0")]
    BadFlag { name: String, value: String },
    #[error("cannot read srun's command line (/proc/self/cmdline): {0}")]
    SrunCmdline(std::io::Error),
    #[error("--container={0}: the path is not valid UTF-8")]
    ContainerNotUtf8(String),
    #[error(
        "{option} does not work with --multi-prog on Slurm {major}.{minor:02} (it needs 23.11 or \
         later): run separate steps, or put the entrypoint in front of each command in the \
         multi-prog file"
    )]
    MultiProg {
        option: String,
        major: u32,
        minor: u32,
    },
    #[error("--{0} and --{1} contradict each other: give one of them")]
    Contradiction(&'static str, &'static str),
    #[error("{variable}={value:?}: write 1 or 0")]
    FlagVariable { variable: String, value: String },
    #[error("--container-image is empty: give the image, e.g. --container-image=ubuntu:24.04")]
    EmptyImage,
    #[error("inherited environment: {0}")]
    Inherited(Box<PluginError>),
    #[error("the image is given twice, as --container={container} and --container-image={image}: give it once")]
    ImageTwice { container: String, image: String },
    #[error(
        "container options without an image: add --container-image=IMAGE, or \
         --container-name=NAME of a container an earlier step of this job made"
    )]
    OptionsWithoutImage,
    #[error("{0} is empty: give the checkpoint's directory, e.g. {0}=$HOME/ck")]
    EmptyCheckpointDir(&'static str),
    #[error("{0} cannot be combined with {1}: a checkpointed container is the step's own, made by its tasks (leave out {1})")]
    CheckpointWith(&'static str, &'static str),
    #[error(transparent)]
    Checkpoint(#[from] ferry::container::checkpoint::StepRefusal),
    #[error("--container-checkpoint-signal: {0}")]
    CheckpointSignal(#[from] ferry::container::checkpoint::signal::BadSignal),
    #[error("--container-checkpoint-signal needs --container-checkpoint (the step it names is not checkpointable)")]
    SignalWithoutCheckpoint,
    #[error("--container-mounts: {0}")]
    Mounts(MountSpecError),
    #[error("--container-unshare={list}: {error}")]
    Unshare {
        list: String,
        error: ferry::spec::unshare::UnknownNamespace,
    },
    #[error(transparent)]
    MountList(#[from] MountSpecError),
    #[error("--container-name={given}: {error}")]
    BadName {
        given: String,
        error: ferry::container::named::NameError,
    },
    #[error(transparent)]
    NameChoice(#[from] ferry::container::named::ChoiceError),
    #[error("--container-save is empty: give the image file to write, e.g. --container-save=$HOME/NAME.sqsh")]
    EmptySave,
    #[error("--container-save={path}: that is a directory; give the image file to write, e.g. --container-save={dir}/NAME.sqsh")]
    SaveIsDirectory { path: String, dir: String },
    #[error("--container-save={path}: cannot write into {} ({error}); give a path in a directory of yours", dir.display())]
    SaveNotWritable {
        path: String,
        dir: PathBuf,
        error: std::io::Error,
    },
    #[error("--container-rootfs={name}: {error}")]
    Rootfs {
        name: String,
        error: UnknownProvider,
    },
    #[error("--container-gpus: {0}")]
    Gpus(BadGpuList),
    #[error("--container-env={0}: a variable name is empty (write NAME[,NAME...])")]
    EmptyEnvName(String),
    #[error("--container-env: `{0}` is not a variable name (write NAME[,NAME...])")]
    BadEnvName(String),
    #[error("--container-name={0} without an image: this srun makes a new job, which has no container of that name yet; add --container-image=IMAGE")]
    NamedOnlyNewJob(String),
    #[error("cannot determine the current directory: {0}")]
    NoCwd(std::io::Error),

    // The step, in slurmstepd.
    #[error("image `{image}` (from {origin}) is a relative path, and srun did not pass on its working directory: give an absolute path")]
    RelativeImage { image: String, origin: &'static str },
    #[error(
        "--container-mounts: give absolute host paths (srun did not pass on its working directory)"
    )]
    RelativeMounts,
    #[error("cannot run {}: {error}", program.display())]
    CannotRun {
        program: PathBuf,
        error: std::io::Error,
    },
    /// A `ferry` helper's own one-line error.
    #[error("{0}")]
    Helper(String),
    #[error("the job ended ({state}) while ferry {what} ran")]
    JobEnded { state: String, what: String },
    #[error("ferry {what} wrote more than {cap} bytes to its output: stopped it")]
    HelperTooMuchOutput { what: String, cap: usize },
    #[error("ferry import {image} was stopped ({status})")]
    ImportStopped {
        image: String,
        status: std::process::ExitStatus,
    },
    #[error("cannot import {image}: {error}")]
    Import {
        image: String,
        error: Box<PluginError>,
    },
    #[error("ferry import {0} named no image file")]
    ImportNamedNoFile(String),
    #[error("--container-name={name} without an image: {whose} no container of that name on this node; make it first with --container-image=IMAGE --container-name={name}")]
    NoNamedContainer { name: String, whose: String },
    #[error(
        "--container-rootfs=kernel: the kernel squashfs provider is not enabled on this \
         cluster; an admin must enable it (kernel_squashfs=yes in plugstack.conf), or use \
         squashfuse or unpack"
    )]
    KernelNotEnabled,
    #[error("cannot find the site's ferry_bin={} (tell your admins)", .0.display())]
    NoFerryBin(PathBuf),
    #[error(transparent)]
    User(#[from] ferry::spec::user::UserError),
    #[error(transparent)]
    UserDir(#[from] ferry::rootfs::user_dir::UserDirError),
    #[error(transparent)]
    Kernel(#[from] ferry::rootfs::kernel::KernelError),
    #[error(transparent)]
    Prepare(#[from] ferry::container::holder::PrepareError),
    #[error(transparent)]
    Join(#[from] ferry::container::join::JoinError),
    #[error(transparent)]
    IdFilter(#[from] ferry::container::id_filter::IdFilterError),
    #[error(
        "the batch script's container needs the site's ferry-forward program, not found at {} \
         (tell your admins: forwarder= in plugstack.conf; or set FERRY_BATCH_SCRIPT=host to \
         run the script on the host)",
        .0.display()
    )]
    NoForwarder(PathBuf),
    #[error("Slurm's commands in the batch script's container: {0}")]
    Forward(#[from] ferry::slurm::forward::ForwardError),

    // A task.
    #[error("cannot start the container for this step: {0}")]
    StepFailed(String),
    #[error("the container is gone")]
    ContainerGone,
    #[error("no ferry program")]
    NoFerryProgram,
    #[error("the ferry program's path holds a NUL byte")]
    NulInFerryPath,
    #[error("Slurm gave no argv for this task (S_JOB_ARGV)")]
    NoTaskArgv,
    #[error("cannot pass the container's namespaces on: {0}")]
    PassNamespaces(std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("cannot run the task through ferry: spank_prepend_task_argv failed ({0})")]
    PrependTaskArgv(u32),
}

impl From<SpankError> for PluginError {
    fn from(e: SpankError) -> PluginError {
        PluginError::Spank(e.to_string())
    }
}

//! Remote context (slurmstepd, one per step per node): the step's container, following
//! docs/design.md, "How it works" (first intended in ../shared/DESIGN.md, "The step, on
//! each node").

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry::container::holder::PrepareOptions;
use ferry::slurm::site::{BatchScript, ContainerScope, GpuDefault};
use ferry::spec::gpus::GpuRequest;
use ferry::spec::mounts::MountSpec;
use ferry::spec::user::UserInfo;
use ferry::spec::{ContainerSpec, FirstUse, Provider, RootfsProvider};
use ferry::sys::raw::Credentials;
use slurm_spank::SpankHandle;
use tracing::{debug, error, info, trace, warn};

use crate::error::PluginError;
use crate::options::OptionValues;
use crate::request::{self, StepRequest};
use crate::site::PluginSettings;

/// Step ids Slurm uses for things that are not `srun` steps (slurm.h).
const SLURM_INTERACTIVE_STEP: u32 = 0xffff_fffa;
const SLURM_BATCH_SCRIPT: u32 = 0xffff_fffb;
const SLURM_EXTERN_CONT: u32 = 0xffff_fffc;

/// One step's container on this node.
#[derive(Default)]
pub struct Step {
    pub job_id: u32,
    pub step_id: u32,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub local_tasks: u32,
    /// This node's index in the step (`--container-save` writes from node 0 only).
    pub node_id: u32,
    pub request: StepRequest,
    /// Where the request came from, for the logs.
    pub origin: &'static str,
    /// An error from user_init, reported by every task_init (user_init's errors do not reach
    /// the user's terminal; task_init's do).
    pub failure: Option<PluginError>,
    /// The running holder and its namespaces, opened right after it reported ready (so no
    /// reused pid can stand in for it later).
    pub holder: Option<ferry::container::holder::Holder>,
    /// What the holder of the running container this step attached to reported (no holder
    /// of its own then).
    pub attached: Option<ferry::container::holder::Ready>,
    pub namespaces: Option<ferry::container::join::Namespaces>,
    pub workdir: Option<PathBuf>,
    /// The `ferry` program by absolute path, for tasks that run the image's entrypoint
    /// (see [`task_init`]).
    pub ferry_bin: Option<PathBuf>,
    pub tasks_exited: u32,
    /// `--container-save` on this node: what the tasks' `ferry` saves after the last task.
    pub save_after_tasks: Option<ferry::container::task_exec::SaveAfterTasks>,
    /// Where MASTER_PORT comes from, when the site sets the frameworks' variables
    /// (`framework_env=yes`, the default).
    pub framework_ports: Option<std::ops::RangeInclusive<u16>>,
    /// No progress lines on the user's terminal (asked for, the site's default, or not
    /// the step's node 0: several nodes say it once).
    pub quiet: bool,
    /// Slurm's name of this node, for the user's lines.
    pub node_name: Option<String>,
    /// The server that runs Slurm's commands called in the container on the host
    /// (ferry::slurm::forward); dropping it stops the server.
    pub forward: Option<ferry::slurm::forward::Server>,
    /// `--container-checkpoint` or `--container-restore`: what the task's `ferry` does in
    /// place of joining a holder's container (there is no holder then).
    pub checkpoint_task: Option<ferry::container::checkpoint::SlurmTask>,
}

impl Step {
    /// What the step's container reported when it was ready: its own holder's, or that of
    /// the running container it attached to.
    fn ready(&self) -> Option<&ferry::container::holder::Ready> {
        self.holder
            .as_ref()
            .map(|h| h.ready())
            .or(self.attached.as_ref())
    }

    /// The job user's ids, for what the plugin starts on the user's behalf.
    fn credentials(&self) -> Credentials {
        Credentials {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }
}

/// The most the plugin reads of each of stdout and stderr of `ferry import`/`ferry save`:
/// its user can write into those pipes too (through /proc/PID/fd); past it, the helper
/// is killed.
const MAX_HELPER_OUTPUT: usize = 1 << 20;

/// Run `ferry_bin ARGS` as the step's user, with `env` only, and return its stdout; on
/// failure, its last stderr line (ferry's one-line error, without the prefix).
fn run_ferry_as_user(
    step: &Step,
    settings: &PluginSettings,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &std::ffi::OsStr)],
) -> Result<String, PluginError> {
    let mut cmd = std::process::Command::new(&settings.ferry_bin);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .envs(env.iter().copied());
    if let Some(node) = &step.node_name {
        cmd.env("SLURMD_NODENAME", node);
    }
    if step.quiet {
        cmd.env(ferry::image::registry::progress::QUIET_ENV, "1");
    }
    ferry::sys::raw::run_as_on_exec(&mut cmd, Some(step.credentials()), false);
    let cannot_run = |error| PluginError::CannotRun {
        program: settings.ferry_bin.clone(),
        error,
    };
    // Slurm 22.05 holds a job's termination back until its steps have started, which
    // they have not while user_init runs this: stop it ourselves when the job ends.
    // Its progress lines go to the user's terminal as they come (node 0 only).
    let mut progress = crate::progress::ProgressLines::new(!step.quiet);
    let end = ferry::sys::child::run_capped(
        &mut cmd,
        std::process::Stdio::null(),
        MAX_HELPER_OUTPUT,
        JOB_CHECK_INTERVAL,
        STOP_GRACE,
        || job_ended(step),
        |bytes| progress.feed(bytes),
    )
    .map_err(cannot_run)?;
    progress.finish();
    let what = args[0].to_string_lossy();
    match end {
        ferry::sys::child::HelperEnd::Exited {
            status,
            stdout,
            stderr,
        } => {
            if !status.success() {
                let stderr = String::from_utf8_lossy(&stderr);
                let line = ferry::sys::child::last_line(&stderr);
                return Err(PluginError::Helper(
                    line.trim_start_matches("ferry: error: ").to_string(),
                ));
            }
            Ok(String::from_utf8_lossy(&stdout).into_owned())
        }
        ferry::sys::child::HelperEnd::Stopped(state) => Err(PluginError::JobEnded {
            state,
            what: what.into_owned(),
        }),
        ferry::sys::child::HelperEnd::TooMuchOutput { cap } => {
            Err(PluginError::HelperTooMuchOutput {
                what: what.into_owned(),
                cap,
            })
        }
    }
}

/// How often a long-running helper checks that its job still runs.
const JOB_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// How long a stopped helper gets to remove its partial files before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The job's state if Slurm says it is over; `None` while it runs or when scontrol cannot
/// tell (not installed, controller busy): then the helper is simply waited for.
fn job_ended(step: &Step) -> Option<String> {
    let mut cmd = std::process::Command::new("scontrol");
    cmd.args(["-o", "show", "job", &step.job_id.to_string()])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin");
    if let Some(conf) = std::env::var_os("SLURM_CONF") {
        cmd.env("SLURM_CONF", conf);
    }
    ferry::sys::raw::run_as_on_exec(&mut cmd, Some(step.credentials()), false);
    // As the user, so read as a helper's output is: capped, not waiting for end of file.
    let end = ferry::sys::child::run_capped(
        &mut cmd,
        std::process::Stdio::null(),
        MAX_HELPER_OUTPUT,
        Duration::from_secs(30),
        Duration::ZERO,
        || Some("timeout".into()),
        |_| {},
    )
    .ok()?;
    let ferry::sys::child::HelperEnd::Exited { stdout, .. } = end else {
        return None;
    };
    let state = ferry::slurm::job_state::ended_state(&String::from_utf8_lossy(&stdout));
    if let Some(s) = &state {
        info!("job {} is {s}: stopping its setup", step.job_id);
    }
    state
}

fn step_name(step_id: u32) -> String {
    match step_id {
        SLURM_BATCH_SCRIPT => "batch".into(),
        SLURM_EXTERN_CONT => "extern".into(),
        SLURM_INTERACTIVE_STEP => "interactive".into(),
        n => n.to_string(),
    }
}

/// init_post_opt: what does this step ask for? `None`: no container, and nothing more to do
/// for this step (no later callback does any work). A step that asks for a container but
/// cannot have it gets a [`Step`] with `failure` set: errors here reach only slurmd's log,
/// so task_init repeats them on the user's terminal.
pub fn init_post_opt(
    spank: &SpankHandle,
    opts: &OptionValues,
    settings: &Result<PluginSettings, PluginError>,
) -> Option<Step> {
    let step_id = spank.job_stepid().unwrap_or(0);
    let job_id = spank.job_id().unwrap_or(0);
    let name = format!("{job_id}.{}", step_name(step_id));

    // salloc's interactive step keeps its shell on the host (the user's own login
    // environment, with the site's modules); the extern step is Slurm's, not the user's.
    // The batch script runs in the container unless the site or the user says host.
    if matches!(step_id, SLURM_EXTERN_CONT | SLURM_INTERACTIVE_STEP) {
        return None;
    }
    if step_id == SLURM_BATCH_SCRIPT && batch_script(spank, settings) == BatchScript::Host {
        debug!("{name}: the batch script runs on the host");
        return None;
    }
    if tracing::enabled!(tracing::Level::TRACE) {
        let env = spank.job_env().unwrap_or_default();
        let relevant: Vec<&&str> = env
            .iter()
            .filter(|v| v.contains("FERRY") || v.contains("CONTAINER") || v.contains("SPANK"))
            .collect();
        trace!("step {name}: options {opts:?}, environment {relevant:?}");
    }

    let getenv = |name: &str| spank.getenv(name).ok().flatten();
    let found = match StepRequest::from_env(getenv) {
        // srun's plugin resolved everything (see crate::local).
        Ok(Some(req)) => Ok(Some((req, "srun"))),
        Ok(None) => from_options(opts, &getenv),
        Err(e) => Err(e),
    };
    let mut step = Step {
        job_id,
        step_id,
        ..Step::default()
    };
    match found {
        Ok(None) => {
            debug!("step {name}: no container");
            return None;
        }
        Ok(Some((request, _))) if step_id == SLURM_BATCH_SCRIPT && request.image.is_none() => {
            // A container name alone names what a step of the job makes later: the script
            // has no image to run in.
            debug!("{name}: the job names a container but no image: the script runs on the host");
            return None;
        }
        Ok(Some((mut request, origin))) => {
            if step_id == SLURM_BATCH_SCRIPT {
                // The job's entrypoint, save and checkpoint are for its steps; the script
                // runs as it is.
                request.entrypoint = None;
                request.save = None;
                request.checkpoint = None;
                request.restore = None;
            }
            step.request = request;
            step.origin = origin;
        }
        Err(e) => step.failure = Some(e),
    }
    if let Err(e) = settings {
        step.failure = Some(PluginError::BrokenSite(e.to_string()));
    }
    let ids = (|| -> Result<(), slurm_spank::SpankError> {
        step.uid = spank.job_uid()?;
        step.gid = spank.job_gid()?;
        step.groups = spank.job_supplementary_gids().unwrap_or_default();
        step.local_tasks = spank.job_local_task_count()?;
        step.node_id = spank.job_nodeid().unwrap_or(0);
        Ok(())
    })();
    if let Err(e) = ids {
        step.failure
            .get_or_insert(PluginError::StepIds(e.to_string()));
    }
    // slurmstepd sets SLURMD_NODENAME only for the tasks; node 0, the only one that speaks,
    // is the first of the step's nodes.
    step.node_name = getenv("SLURMD_NODENAME").or_else(|| {
        (step.node_id == 0)
            .then(|| getenv("SLURM_STEP_NODELIST").or_else(|| getenv("SLURM_JOB_NODELIST")))
            .flatten()
            .and_then(|list| ferry::slurm::framework_env::first_host(&list))
    });
    step.quiet = opts.quiet
        || ferry::image::registry::progress::quiet_requested(
            getenv(ferry::image::registry::progress::QUIET_ENV).as_deref(),
        )
        || settings.as_ref().is_ok_and(|s| s.quiet)
        || step.node_id != 0;
    match &step.failure {
        Some(e) => error!("step {name}: {e}"),
        None => {
            info!(
                "step {name}: container {} (from {}), {} local task(s), uid {} gid {}",
                step.request
                    .image
                    .as_deref()
                    .or(step.request.name.as_deref())
                    .unwrap_or("?"),
                step.origin,
                step.local_tasks,
                step.uid,
                step.gid
            );
            debug!("step {name}: request {:?}", step.request);
        }
    }
    Some(step)
}

/// Where this batch job's script runs: the user's choice (`FERRY_BATCH_SCRIPT`, checked
/// by sbatch and passed on as `SLURM_FERRY_BATCH_SCRIPT`), else the site's.
fn batch_script(
    spank: &SpankHandle,
    settings: &Result<PluginSettings, PluginError>,
) -> BatchScript {
    let user = [request::ENV_BATCH_SCRIPT, request::USER_BATCH_SCRIPT]
        .iter()
        .find_map(|name| spank.getenv(name).ok().flatten())
        .and_then(|v| BatchScript::parse(&v));
    user.unwrap_or_else(|| {
        settings
            .as_ref()
            .map(|s| s.batch_script)
            .unwrap_or_default()
    })
}

/// Whether `step`'s container gets Slurm's commands forwarded to the host: the batch
/// script's always (its steps need `srun`), any other step unless the site says
/// `forward_commands=no`.
fn forwards_commands(step: &Step, settings: &PluginSettings) -> bool {
    step.step_id == SLURM_BATCH_SCRIPT || settings.forward_commands
}

/// How long user_init waits for the forward server once the container is up; it has been
/// starting meanwhile and is normally serving already.
const FORWARD_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Start the forward server of `step`'s container (see ferry::slurm::forward) without
/// waiting for it, and bind its directory and `ferry-forward` into `spec`. The directory is
/// made here, as the user (slurmstepd runs user_init with the user's effective uid), so the
/// container can bind it while the server is still starting.
fn start_forwarding(
    spank: &SpankHandle,
    step: &Step,
    settings: &PluginSettings,
    spec: &mut ContainerSpec,
) -> Result<ferry::slurm::forward::Starting, PluginError> {
    use ferry::slurm::forward;
    let forwarder = settings.forwarder_path();
    if !forwarder.is_file() {
        return Err(PluginError::NoForwarder(forwarder));
    }
    let mut host_env: Vec<(String, String)> = forward::HOST_VARS
        .iter()
        .filter_map(|name| {
            let value = spank.getenv(name).ok().flatten()?;
            Some((name.to_string(), value))
        })
        .collect();
    // A job without PATH (`--export=NONE`) finds Slurm's commands where slurmd does.
    if !host_env.iter().any(|(name, _)| name == "PATH") {
        if let Ok(path) = std::env::var("PATH") {
            host_env.push(("PATH".into(), path));
        }
    }
    let began = std::time::Instant::now();
    let dir = forward::private_dir(Path::new("/tmp"))?;
    let starting = forward::Server::spawn(
        &settings.ferry_bin,
        Some(step.credentials()),
        &forward::Place::Dir(dir.clone()),
        &host_env,
    );
    debug!(
        "step {}.{}: forward server starting in {} ({:.2} ms)",
        step.job_id,
        step_name(step.step_id),
        dir.display(),
        began.elapsed().as_secs_f64() * 1000.0
    );
    spec.mounts.push(MountSpec::bind(
        forwarder,
        PathBuf::from(forward::INSIDE_PROGRAM),
        true,
    ));
    spec.mounts.push(MountSpec::bind(
        dir,
        PathBuf::from(forward::INSIDE_DIR),
        false,
    ));
    Ok(starting)
}

/// The batch script is in slurmd's spool directory, which the container lacks: bind it
/// read-only at its own path, where slurmstepd execs it.
fn bind_batch_script(spank: &SpankHandle, spec: &mut ContainerSpec) {
    if let Some(script) = spank
        .job_argv_os()
        .ok()
        .and_then(|argv| argv.first().map(PathBuf::from))
        .filter(|p| p.is_absolute())
    {
        spec.mounts
            .push(MountSpec::bind(script.clone(), script, true));
    }
}

/// Keep the forward server that `starting` is once it serves (the batch script's container
/// fails without it; any other step goes on without Slurm's commands).
fn finish_forwarding(step: &mut Step, starting: ferry::slurm::forward::Starting) {
    let began = std::time::Instant::now();
    let dir = starting.dir().map(Path::to_path_buf);
    let served = starting.ready(FORWARD_READY_TIMEOUT);
    if let (Err(_), Some(dir)) = (&served, dir) {
        // Made for a server that never served in it.
        let _ = std::fs::remove_dir_all(dir);
    }
    match served {
        Ok(server) => {
            debug!(
                "step {}.{}: forward server in {} (waited {:.2} ms for it)",
                step.job_id,
                step_name(step.step_id),
                server.dir.display(),
                began.elapsed().as_secs_f64() * 1000.0
            );
            step.forward = Some(server);
        }
        Err(e) if step.step_id == SLURM_BATCH_SCRIPT => step.failure = Some(e.into()),
        Err(e) => warn!(
            "step {}.{}: no Slurm commands in the container: {e}",
            step.job_id,
            step_name(step.step_id)
        ),
    }
}

/// The request when srun's plugin did not hand one over in the environment (srun without
/// this plugin, or an environment Slurm did not pass on): the options Slurm forwarded
/// itself, then `SLURM_CONTAINER`. Relative paths cannot be resolved here (the submit
/// directory is unknown), so they are refused with a hint.
fn from_options(
    opts: &OptionValues,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(StepRequest, &'static str)>, PluginError> {
    let (image, origin) = match (&opts.image, getenv("SLURM_CONTAINER")) {
        (Some(i), _) if !i.is_empty() => (Some(i.clone()), "--container-image"),
        (_, Some(i)) if !i.is_empty() => (Some(i), "SLURM_CONTAINER"),
        _ if opts.name.is_some() => (None, "--container-name"),
        _ if opts.restore.is_some() => (None, "--container-restore"),
        _ => return Ok(None),
    };
    if let Some(image) = image
        .as_deref()
        .filter(|i| !request::is_reference(i) && !i.starts_with('/'))
    {
        return Err(PluginError::RelativeImage {
            image: image.to_string(),
            origin,
        });
    }
    if let Some(list) = &opts.mounts {
        request::absolute_mounts(list, Path::new("/"))?;
        if list
            .split(',')
            .any(|m| !m.trim().is_empty() && !m.trim().starts_with('/'))
        {
            return Err(PluginError::RelativeMounts);
        }
    }
    let (name, name_flag) = match &opts.name {
        Some(text) => {
            let (name, flag) = request::parse_name(text)?;
            (Some(name), flag)
        }
        None => (None, None),
    };
    let absolute = |dir: &Option<String>| dir.clone().filter(|d| d.starts_with('/'));
    let request = StepRequest {
        image,
        mounts: opts.mounts.clone(),
        workdir: opts.workdir.clone(),
        env_names: opts.env.clone(),
        mount_home: opts.mount_home,
        remap_root: opts.remap_root,
        writable: opts.writable,
        entrypoint: opts.entrypoint,
        name,
        name_flag,
        save: opts.save.clone().filter(|p| p.starts_with('/')),
        rootfs: opts.rootfs.clone(),
        gpus: opts.gpus.clone(),
        unshare: opts
            .unshare
            .as_deref()
            .map(request::parse_unshare)
            .transpose()?,
        entrypoint_log: opts.entrypoint_log,
        checkpoint: absolute(&opts.checkpoint),
        restore: absolute(&opts.restore),
        checkpoint_signal: opts
            .checkpoint_signal
            .as_deref()
            .map(str::parse)
            .transpose()?,
    };
    crate::local::check_checkpoint_combinations(&request)?;
    Ok(Some((request, origin)))
}

/// The launcher's container spec for `step`.
fn container_spec(
    spank: &SpankHandle,
    step: &Step,
    settings: &PluginSettings,
) -> Result<ContainerSpec, PluginError> {
    let req = &step.request;
    let user = UserInfo::lookup(step.uid, step.gid, &step.groups)?;
    let image = match req.image.as_deref() {
        Some(reference) if request::is_reference(reference) => {
            import_as_user(step, settings, &user, reference)?
        }
        Some(path) => PathBuf::from(path),
        None => existing_named_container(step, settings)?,
    };
    let mut spec = ContainerSpec::new(image, user);
    // The holder then prefers the image's WorkingDir to srun's directory.
    spec.entrypoint = req.entrypoint == Some(true);
    spec.unshare = req.unshare.unwrap_or_default();
    spec.writable = req.writable.unwrap_or(settings.writable);
    spec.remap_root = req.remap_root.unwrap_or(false);
    spec.mount_home = req.mount_home.unwrap_or(true);
    spec.mounts = settings.default_mounts.clone();
    if let Some(list) = &req.mounts {
        spec.mounts
            .extend(MountSpec::parse_list(list, Path::new("/")).map_err(PluginError::Mounts)?);
    }
    // After the user's: these are Slurm's own and must not be covered. (Not for a
    // checkpointable container: they are this step's, gone when it is restored.)
    if req.checkpoint.is_none() {
        spec.mounts.extend(mpi_runtime_mounts(
            step,
            |name| std::env::var_os(name),
            |name| spank.getenv(name).ok().flatten(),
        ));
    }
    spec.workdir = req.workdir.as_deref().map(ferry::spec::container_path);
    // slurmstepd runs user_init in the step's working directory (srun's, or --chdir's),
    // also under --export=NONE, where PWD is not in the step's environment.
    spec.cwd = std::env::current_dir().ok();
    // pyxis mounts the task's $HOME, which a job may point elsewhere than the passwd home.
    spec.home = spank
        .getenv("HOME")
        .ok()
        .flatten()
        .map(PathBuf::from)
        .filter(|h| h.is_absolute());
    let explicit: Vec<&str> = req
        .env_names
        .as_deref()
        .map(|n| n.split(',').map(str::trim).collect())
        .unwrap_or_default();
    spec.caller_locale = ferry::rootfs::locale::VARIABLES
        .iter()
        .filter(|name| !explicit.contains(name))
        .filter_map(|&name| Some((name.to_string(), spank.getenv(name).ok().flatten()?)))
        .collect();
    if let Some(names) = &req.env_names {
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if let Some(value) = spank.getenv(name).ok().flatten() {
                spec.env.push((name.to_string(), value));
            }
        }
    }
    spec.site = settings.site_settings();
    let provider = match req.rootfs.as_deref() {
        Some(name) => name.parse().map_err(|error| PluginError::Rootfs {
            name: name.to_string(),
            error,
        })?,
        None => settings.rootfs,
    };
    spec.rootfs = match provider {
        Provider::Squashfuse => RootfsProvider::Squashfuse,
        // Node-local, per user, kept across jobs (the job epilog removes only jobJOB/).
        Provider::Unpack | Provider::Auto => {
            let user_dir = settings
                .named_dir
                .join(ferry::rootfs::user_dir::name(step.uid));
            RootfsProvider::Unpack {
                dir: user_dir.join("unpacked"),
                owned_from: user_dir,
                first_use: match provider {
                    Provider::Auto => FirstUse::MountWhileRunning,
                    _ => FirstUse::Wait,
                },
            }
        }
        // Only where the admin allows it: users cannot turn this on themselves.
        Provider::Kernel if settings.kernel_squashfs => RootfsProvider::Kernel,
        Provider::Kernel => return Err(PluginError::KernelNotEnabled),
    };
    spec.gpus = step_gpus(req.gpus.as_deref(), settings.gpus, |name| {
        spank.getenv(name).ok().flatten()
    })?;
    let unpacks = matches!(spec.rootfs, RootfsProvider::Unpack { .. });
    if unpacks || req.name.is_some() || req.save.is_some() {
        // Root makes the user's directory, so no other user can have taken its name first.
        ferry::rootfs::user_dir::ensure(&settings.named_dir, step.uid, step.gid)?;
        spec.running_record = Some(running_record_place(settings, step));
    } else {
        // Only to be attachable (as JOBID.STEPID): not worth failing the step over.
        match ferry::rootfs::user_dir::ensure(&settings.named_dir, step.uid, step.gid) {
            Ok(()) => spec.running_record = Some(running_record_place(settings, step)),
            Err(e) => warn!(
                "step {}.{}: not attachable: {e}",
                step.job_id,
                step_name(step.step_id)
            ),
        }
    }
    if req.name.is_some() || req.save.is_some() {
        let (owned_from, dir) = unpacked_dir(settings, step);
        spec.unpacked = Some(ferry::spec::UnpackedDir { owned_from, dir });
        // Keeping or saving changes is the point of both; --container-readonly still wins.
        spec.writable = req.writable.unwrap_or(true);
    }
    Ok(spec)
}

/// The unpacked tree of the container named in `step`'s request, for a step that gives
/// the name alone: it must exist on this node (an earlier step of the job made it here).
fn existing_named_container(
    step: &Step,
    settings: &PluginSettings,
) -> Result<PathBuf, PluginError> {
    let name = step.request.name.as_deref().unwrap_or_default();
    let (_, dir) = unpacked_dir(settings, step);
    let rootfs = dir.join(ferry::rootfs::unpacked::ROOTFS);
    if std::fs::symlink_metadata(&rootfs).is_ok_and(|m| m.is_dir()) {
        return Ok(rootfs);
    }
    let whose = match settings.container_scope {
        ContainerScope::Job => format!("job {} has", step.job_id),
        ContainerScope::Global => "you have".into(),
    };
    Err(PluginError::NoNamedContainer {
        name: name.to_string(),
        whose,
    })
}

/// The GPUs of the step's container: `--container-gpus` when given, else the site's
/// default, whose `auto` means the GPUs Slurm gave the step on this node (`step_env`).
fn step_gpus(
    asked: Option<&str>,
    site: GpuDefault,
    step_env: impl Fn(&str) -> Option<String>,
) -> Result<GpuRequest, PluginError> {
    if let Some(text) = asked {
        return GpuRequest::parse(text).map_err(PluginError::Gpus);
    }
    Ok(match site {
        GpuDefault::Auto => GpuRequest::from_env(step_env),
        GpuDefault::All => GpuRequest::All,
        GpuDefault::None => GpuRequest::None,
    })
}

/// The user's directory for unpacked containers on this node, and this step's container in
/// it: the named one, or one for this step alone when it only saves.
fn unpacked_dir(settings: &PluginSettings, step: &Step) -> (PathBuf, PathBuf) {
    let user_dir = settings
        .named_dir
        .join(ferry::rootfs::user_dir::name(step.uid));
    let job_dir = user_dir.join(format!("job{}", step.job_id));
    let dir = match &step.request.name {
        // Outside every job's directory, so no job epilog removes it.
        Some(name) if settings.container_scope == ContainerScope::Global => {
            user_dir.join("named").join(name)
        }
        Some(name) => job_dir.join(name),
        None => job_dir.join(format!(".step{}", step_name(step.step_id))),
    };
    (user_dir, dir)
}

/// Where the job's holders on this node record that they run (in the job's directory, so
/// the job epilog removes stale records with it).
fn running_records_dir(settings: &PluginSettings, step: &Step) -> (PathBuf, PathBuf) {
    let user_dir = settings
        .named_dir
        .join(ferry::rootfs::user_dir::name(step.uid));
    let dir = user_dir
        .join(format!("job{}", step.job_id))
        .join(ferry::container::named::RUNNING_DIR);
    (user_dir, dir)
}

/// The record this step's holder keeps while it runs: under the container's name, or
/// `JOBID.STEPID` for an unnamed container (pyxis' name for it).
fn running_record_place(settings: &PluginSettings, step: &Step) -> ferry::spec::RunningRecordPlace {
    let (owned_from, dir) = running_records_dir(settings, step);
    let step_text = step_name(step.step_id);
    ferry::spec::RunningRecordPlace {
        owned_from,
        dir,
        name: step
            .request
            .name
            .clone()
            .unwrap_or_else(|| format!("{}.{step_text}", step.job_id)),
        job: step.job_id,
        step: step_text,
    }
}

/// For a step that names a container: the running container of that name to attach to,
/// or `None` to start one, as its flag (`NAME:FLAG`) asks.
fn running_to_attach(
    step: &Step,
    settings: &PluginSettings,
) -> Result<Option<ferry::container::named::Running>, PluginError> {
    let Some(name) = step.request.name.as_deref() else {
        return Ok(None);
    };
    let flag = step.request.name_flag.unwrap_or_default();
    let (_, records) = running_records_dir(settings, step);
    let running = ferry::container::named::find_running(&records, name, step.uid);
    let (_, dir) = unpacked_dir(settings, step);
    let exists = std::fs::symlink_metadata(dir.join(ferry::rootfs::unpacked::ROOTFS))
        .is_ok_and(|m| m.is_dir());
    let attach = ferry::container::named::attaches(name, flag, running.is_some(), exists)?;
    Ok(running.filter(|_| attach))
}

/// The options of `req` that only apply when a container starts, as the user gave them.
fn start_only_options(req: &StepRequest) -> Vec<&'static str> {
    let pair =
        |v: Option<bool>, on: &'static str, off: &'static str| v.map(|b| if b { on } else { off });
    [
        req.image.as_ref().map(|_| "--container-image"),
        req.mounts.as_ref().map(|_| "--container-mounts"),
        pair(req.writable, "--container-writable", "--container-readonly"),
        pair(
            req.remap_root,
            "--container-remap-root",
            "--no-container-remap-root",
        ),
        pair(
            req.mount_home,
            "--container-mount-home",
            "--no-container-mount-home",
        ),
        (req.entrypoint == Some(true)).then_some("--container-entrypoint"),
        req.save.as_ref().map(|_| "--container-save"),
        req.rootfs.as_ref().map(|_| "--container-rootfs"),
        req.gpus.as_ref().map(|_| "--container-gpus"),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Join `running` instead of starting a container: the tasks enter its namespaces, with
/// the environment its image gave, in its working directory unless --container-workdir.
fn attach(step: &mut Step, running: ferry::container::named::Running) {
    let record = running.record;
    let ignored = start_only_options(&step.request);
    info!(
        "step {}.{}: attaching to container {} of step {}.{} (holder pid {})",
        step.job_id,
        step_name(step.step_id),
        record.name,
        record.job,
        record.step,
        record.pid
    );
    if !ignored.is_empty() && step.node_id == 0 {
        slurm_spank::slurm_spank_log(&format!(
            "ferry: warning: attaching to the running container {} (step {}.{}): ignoring {}, which only apply when a container starts",
            record.name,
            record.job,
            record.step,
            ignored.join(", ")
        ));
    }
    step.workdir = Some(
        step.request
            .workdir
            .as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(|| record.ready.workdir.clone()),
    );
    // The running container's own start and save are its step's, not this one's.
    step.request.entrypoint = None;
    step.request.save = None;
    step.namespaces = Some(running.namespaces);
    step.attached = Some(record.ready);
}

/// job_epilog (each node of the job, as root, at the job's end): remove the job's unpacked
/// containers, relative to a descriptor of the user's own directory (ferry::rootfs::user_dir).
pub fn remove_job_containers(settings: &PluginSettings, uid: u32, job_id: u32) {
    match ferry::rootfs::user_dir::remove_job(&settings.named_dir, uid, job_id) {
        Ok(true) => info!("removed job {job_id}'s containers of uid {uid}"),
        Ok(false) => {}
        Err(e) => warn!("job {job_id}: {e}"),
    }
}

/// Import a registry or archive reference into the user's cache with `ferry import`, run as
/// the user (so registry credentials and the cache are the user's, and nothing is written
/// as root). Returns the squashfs to run.
fn import_as_user(
    step: &Step,
    settings: &PluginSettings,
    user: &UserInfo,
    image: &str,
) -> Result<PathBuf, PluginError> {
    let site = settings.import_settings().to_env();
    let mut env = vec![
        ("HOME", user.home.as_os_str()),
        ("USER", user.name.as_ref()),
    ];
    env.extend(site.iter().map(|(name, value)| (*name, value.as_os_str())));
    let started = std::time::Instant::now();
    let stdout = run_ferry_as_user(step, settings, &["import".as_ref(), image.as_ref()], &env)
        .map_err(|e| PluginError::Import {
            image: image.to_string(),
            error: Box::new(e),
        })?;
    let path = stdout
        .lines()
        .rfind(|l| l.starts_with('/'))
        .ok_or_else(|| PluginError::ImportNamedNoFile(image.to_string()))?;
    info!(
        "imported {image} as {path} in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(PathBuf::from(path))
}

/// Host directories of Slurm's MPI support that the step's tasks must find at the same path
/// inside the container, for `process_env` (slurmstepd's own environment) and `step_env`
/// (the step's).
///
/// mpi/pmix runs a PMIx server in slurmstepd whose directory, `<SlurmdSpoolDir>/pmix.<job>.<step>/`,
/// holds what the task's PMIx client opens by path: the server's contact files and the
/// shared-memory data store (PMIx's gds/ds21) that every client maps. The spool directory
/// is not in the container, so without this bind MPI_Init fails. mpi/pmix creates the
/// directory before user_init and names it only in slurmstepd's own environment
/// (`PMIX_SERVER_TMPDIR`; the tasks get the same value in theirs later, in task_init).
/// The client's directory (`spmix_appdir_<uid>_<job>.<step>`) is under `SLURM_PMIX_TMPDIR`
/// when the step sets it, else under slurm.conf's TmpFS, which is `/tmp` (bound already)
/// unless the site changed it.
///
/// mpi/pmi2 needs nothing here: its tasks talk to slurmstepd over an inherited descriptor
/// (`PMI_FD`), which the task keeps when it enters the container.
fn mpi_runtime_mounts(
    step: &Step,
    process_env: impl Fn(&str) -> Option<std::ffi::OsString>,
    step_env: impl Fn(&str) -> Option<String>,
) -> Vec<MountSpec> {
    let mut dirs = Vec::new();
    // Only this step's server directory: slurmstepd's environment is inherited from
    // slurmd, and a stale value there must not expose another step's files.
    if let Some(dir) = process_env("PMIX_SERVER_TMPDIR").map(PathBuf::from) {
        let own = format!("pmix.{}.{}", step.job_id, step.step_id);
        if dir.is_absolute() && dir.file_name().is_some_and(|n| n == own.as_str()) {
            dirs.push(dir);
        } else {
            debug!(
                "not binding PMIX_SERVER_TMPDIR={}: not this step's",
                dir.display()
            );
        }
    }
    if let Some(base) = step_env("SLURM_PMIX_TMPDIR").filter(|b| b.starts_with('/')) {
        dirs.push(Path::new(&base).join(format!(
            "spmix_appdir_{}_{}.{}",
            step.uid, step.job_id, step.step_id
        )));
    }
    dirs.into_iter()
        .filter(|d| d.is_dir())
        .map(|d| MountSpec::bind(d.clone(), d, false))
        .collect()
}

/// user_init (once per step per node, slurmstepd as root with the job user's ids in place
/// for this call): start the holder as the job user, keep its namespaces.
pub fn user_init(spank: &SpankHandle, step: &mut Step, settings: &PluginSettings) {
    if step.failure.is_some() {
        return;
    }
    step.framework_ports = settings
        .framework_env
        .then(|| settings.framework_ports.clone());
    if step.request.checkpoint.is_some() || step.request.restore.is_some() {
        if let Err(e) = checkpoint_step(spank, step, settings) {
            info!("step {}.{}: {e}", step.job_id, step_name(step.step_id));
            step.failure = Some(e);
        }
        return;
    }
    match running_to_attach(step, settings) {
        Ok(Some(running)) => return attach(step, running),
        Ok(None) => {}
        Err(e) => {
            info!("step {}.{}: {e}", step.job_id, step_name(step.step_id));
            step.failure = Some(e);
            return;
        }
    }
    let mut forwarding = None;
    let spec = match container_spec(spank, step, settings).and_then(|mut spec| {
        if forwards_commands(step, settings) {
            match start_forwarding(spank, step, settings, &mut spec) {
                Ok(starting) => forwarding = Some(starting),
                Err(e) if step.step_id == SLURM_BATCH_SCRIPT => return Err(e),
                Err(e) => warn!(
                    "step {}.{}: no Slurm commands in the container: {e}",
                    step.job_id,
                    step_name(step.step_id)
                ),
            }
        }
        if step.step_id == SLURM_BATCH_SCRIPT {
            bind_batch_script(spank, &mut spec);
        }
        Ok(spec)
    }) {
        Ok(spec) => spec,
        Err(e) => {
            // For slurmd's log; task_init tells the user.
            info!("step {}.{}: {e}", step.job_id, step_name(step.step_id));
            step.failure = Some(e);
            return;
        }
    };
    let opts = PrepareOptions {
        holder_program: settings.ferry_bin.clone(),
        run_as: Some(step.credentials()),
        die_with_parent: false,
        timeout: Duration::from_secs(300),
        env: None,
        // Any fd shared with slurmstepd (stderr included) makes srun wait for the holder.
        quiet: true,
    };
    debug!(
        "step {}.{}: starting `{} hold` as uid {} with spec {}",
        step.job_id,
        step_name(step.step_id),
        opts.holder_program.display(),
        step.uid,
        serde_json::to_string(&spec).unwrap_or_else(|e| format!("<{e}>"))
    );
    if saves_here(step) {
        let (_, dir) = unpacked_dir(settings, step);
        step.save_after_tasks = step.request.save.as_ref().map(|output| {
            ferry::container::task_exec::SaveAfterTasks {
                rootfs: dir.join(ferry::rootfs::unpacked::ROOTFS),
                output: PathBuf::from(output),
                // A container of this step alone goes once saved.
                remove: step.request.name.is_none().then(|| dir.clone()),
                counter: dir.join(format!(
                    ".save-tasks.{}.{}",
                    step.job_id,
                    step_name(step.step_id)
                )),
                tasks: step.local_tasks,
                speak: !step.quiet,
            }
        });
    }
    if spec.entrypoint || saves_here(step) {
        match absolute_program(&settings.ferry_bin) {
            Some(path) => step.ferry_bin = Some(path),
            None => {
                step.failure = Some(PluginError::NoFerryBin(settings.ferry_bin.clone()));
                return;
            }
        }
    }
    // The `kernel` provider's root part: the image opened as the user (slurmstepd runs this
    // with the user's effective uid), then loop device and mount as root (ferry::rootfs::kernel).
    // Its headers are read by `ferry probe-image` as the user, not by slurmstepd.
    let probe = ferry::rootfs::kernel::Probe::AsUser {
        program: settings.ferry_bin.clone(),
        run_as: step.credentials(),
    };
    let kernel = match ferry::rootfs::kernel::mount_for(&spec, &probe) {
        Ok(k) => k,
        Err(e) => {
            info!("step {}.{}: {e}", step.job_id, step_name(step.step_id));
            step.failure = Some(e.into());
            return;
        }
    };
    if let Some(k) = &kernel {
        debug!(
            "step {}.{}: image on {}",
            step.job_id,
            step_name(step.step_id),
            k.device()
        );
    }
    // The first use of an unpacked tree takes a while: the holder says how far it is.
    let image = (step.request.image.clone()).unwrap_or_else(|| spec.image.display().to_string());
    let node = step.node_name.clone().unwrap_or_else(|| "this node".into());
    let mut reporter = ferry::rootfs::unpacked::UnpackReporter::new(
        image,
        node,
        !step.quiet,
        spec.unpacked.is_none(),
    );
    let mut tell_user = |event: &ferry::rootfs::unpacked::UnpackEvent| {
        for line in reporter.lines(event) {
            slurm_spank::slurm_spank_log(&line);
        }
    };
    match ferry::container::holder::prepare_observed(&spec, &opts, kernel, &mut tell_user) {
        Ok(holder) => {
            match ferry::container::join::Namespaces::of_holder(&holder) {
                Ok(ns) => step.namespaces = Some(ns),
                Err(e) => step.failure = Some(e.into()),
            }
            step.workdir = Some(holder.ready().workdir.clone());
            step.holder = Some(holder);
            if let Some(starting) = forwarding {
                finish_forwarding(step, starting);
            }
        }
        Err(e) => step.failure = Some(e.into()),
    }
}

/// user_init of a `--container-checkpoint` or `--container-restore` step: check it here
/// (with the user's effective ids), and keep what its task's `ferry` needs
/// ([`ferry::container::checkpoint::SlurmTask`]); no holder is started.
fn checkpoint_step(
    spank: &SpankHandle,
    step: &mut Step,
    settings: &PluginSettings,
) -> Result<(), PluginError> {
    let (dir, restore) = match (&step.request.checkpoint, &step.request.restore) {
        (Some(dir), _) => (PathBuf::from(dir), false),
        (None, Some(dir)) => (PathBuf::from(dir), true),
        (None, None) => return Ok(()),
    };
    let spec = if restore {
        None
    } else {
        let mut spec = container_spec(spank, step, settings)?;
        // Not attachable: another step's tasks in its PID namespace would be dumped with it.
        spec.running_record = None;
        Some(spec)
    };
    let gpus = spec.as_ref().map(|s| s.gpus.clone()).unwrap_or_default();
    ferry::container::checkpoint::check_slurm_step(
        &dir,
        restore,
        step.uid,
        step.local_tasks,
        spank.job_nnodes().unwrap_or(1),
        &gpus,
    )?;
    step.ferry_bin = Some(
        absolute_program(&settings.ferry_bin)
            .ok_or_else(|| PluginError::NoFerryBin(settings.ferry_bin.clone()))?,
    );
    step.checkpoint_task = Some(ferry::container::checkpoint::SlurmTask {
        spec,
        dir,
        argv0: None,
        signal: step.request.checkpoint_signal.unwrap_or_default(),
        local_task: 0,
        local_tasks: step.local_tasks,
    });
    Ok(())
}

/// `program` as an absolute path: itself when it names a path, else found in slurmstepd's
/// PATH (as the holder's `Command::new` finds it).
fn absolute_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 || program.is_absolute() {
        return std::fs::canonicalize(program).ok().filter(|p| p.is_file());
    }
    ferry::image::squashfs::find_in_path(program.to_str()?)
        .and_then(|p| std::fs::canonicalize(p).ok())
}

/// task_init (each task, in the task's process, already the job user, just before exec):
/// enter the container, or with `--container-entrypoint` or (on the saving node)
/// `--container-save` have `ferry` enter it (see
/// [`task_through_ferry`]). An error here fails the task with one line on the user's
/// terminal.
pub fn task_init(
    spank: &SpankHandle,
    raw: slurm_spank::spank_sys::spank_t,
    step: &Step,
) -> Result<(), PluginError> {
    if let Some(e) = &step.failure {
        return Err(PluginError::StepFailed(e.to_string()));
    }
    if let Some(task) = &step.checkpoint_task {
        set_framework_env(spank, step)?;
        return checkpoint_task_through_ferry(spank, raw, step, task);
    }
    let (Some(ns), Some(ready)) = (&step.namespaces, step.ready()) else {
        return Err(PluginError::ContainerGone);
    };
    let workdir = step.workdir.clone().unwrap_or_else(|| PathBuf::from("/"));
    set_image_env(spank, step, &ready.env)?;
    set_framework_env(spank, step)?;
    if step.forward.is_some() {
        put_forwarders_on_path(spank)?;
    }
    let entrypoint = step.request.entrypoint == Some(true);
    let remap_root = step.request.remap_root == Some(true);
    let save = step.save_after_tasks.clone();
    if entrypoint || save.is_some() {
        let ferry_bin = step
            .ferry_bin
            .as_deref()
            .ok_or(PluginError::NoFerryProgram)?;
        let how = TaskProgram {
            workdir,
            start: ready.start.clone(),
            entrypoint,
            entrypoint_log: step.request.entrypoint_log == Some(true),
            save,
            remap_root,
        };
        return task_through_ferry(spank, raw, ns, how, ferry_bin);
    }
    ferry::container::join::join(ns, &workdir)?;
    // An attached step uses the forwarders of the container it joined, while the step that
    // started that container (and its server) runs.
    if step.attached.is_some() && Path::new(ferry::slurm::forward::INSIDE_SOCKET).exists() {
        put_forwarders_on_path(spank)?;
    }
    if remap_root {
        ferry::container::id_filter::install()?;
    }
    Ok(())
}

/// Slurm's commands find the forwarder first, whatever the image's PATH.
fn put_forwarders_on_path(spank: &SpankHandle) -> Result<(), PluginError> {
    let path = spank.getenv("PATH").ok().flatten().unwrap_or_default();
    let path = format!("{}:{path}", ferry::slurm::forward::INSIDE_BIN);
    spank.setenv("PATH", path.trim_end_matches(':'), true)?;
    spank.setenv(
        ferry::slurm::forward::SOCKET_ENV,
        ferry::slurm::forward::INSIDE_SOCKET,
        true,
    )?;
    Ok(())
}

/// Whether this node saves the container when the step ends (`--container-save`: node 0).
fn saves_here(step: &Step) -> bool {
    step.request.save.is_some() && step.node_id == 0
}

/// What the task's `ferry` does (see [`task_through_ferry`]).
struct TaskProgram {
    workdir: PathBuf,
    start: ferry::spec::entrypoint::ImageStart,
    entrypoint: bool,
    entrypoint_log: bool,
    save: Option<ferry::container::task_exec::SaveAfterTasks>,
    remap_root: bool,
}

/// `--container-entrypoint` and `--container-save`: make this task exec `ferry` (on the
/// host) in place of its command, and `ferry` enter the container and exec the image's
/// entrypoint with the task's argv, or the argv itself, and save the container after the
/// node's last task (ferry::container::task_exec says why neither can be done here).
///
/// How the argv changes (slurmstepd's exec_task, src/slurmd/slurmstepd/task.c, execs
/// `task->argv` after task_init; argv[0] is made absolute with the PATH of the task's
/// environment only after task_init, and is absolute here already):
/// - Slurm >= 23.11 has `spank_prepend_task_argv`, which puts arguments in front of this
///   task's argv (also under `--multi-prog`, where every task has its own argv).
/// - Slurm 22.05 has no such call; `S_JOB_ARGV` gives the step's argv array itself, which
///   is also the task's (`task->argv = job->argv` in slurmstepd_job.c, except under
///   `--multi-prog`). Its length cannot change, so `ferry` takes argv[0]'s place (in this
///   forked task process only) and argv[0] travels in the environment.
fn task_through_ferry(
    spank: &SpankHandle,
    raw: slurm_spank::spank_sys::spank_t,
    ns: &ferry::container::join::Namespaces,
    how: TaskProgram,
    ferry_bin: &Path,
) -> Result<(), PluginError> {
    let (user_fd, mnt_fd) = ns.inheritable_fds().map_err(PluginError::PassNamespaces)?;
    let own_fds = ns
        .inheritable_own_fds()
        .map_err(PluginError::PassNamespaces)?;
    exec_ferry_in_task(
        spank,
        raw,
        ferry_bin,
        ferry::container::task_exec::ENV,
        |argv0| {
            Ok(serde_json::to_string(
                &ferry::container::task_exec::TaskExec {
                    user_fd,
                    mnt_fd,
                    own_fds,
                    workdir: how.workdir,
                    start: how.start,
                    argv0,
                    entrypoint: how.entrypoint,
                    entrypoint_log: how.entrypoint_log,
                    save: how.save,
                    unblock_signals: false,
                    remap_root: how.remap_root,
                },
            )?)
        },
    )
}

/// `--container-checkpoint` and `--container-restore`: this task execs `ferry` in place of
/// its command, which makes the container (or restores it) as `ferry run --checkpoint-dir`
/// (`ferry restore`) does.
fn checkpoint_task_through_ferry(
    spank: &SpankHandle,
    raw: slurm_spank::spank_sys::spank_t,
    step: &Step,
    task: &ferry::container::checkpoint::SlurmTask,
) -> Result<(), PluginError> {
    let ferry_bin = step
        .ferry_bin
        .as_deref()
        .ok_or(PluginError::NoFerryProgram)?;
    let env = ferry::container::checkpoint::SLURM_TASK_ENV;
    let local_task = spank.task_id().map_err(PluginError::from)?;
    exec_ferry_in_task(spank, raw, ferry_bin, env, |argv0| {
        let mut task = task.clone();
        task.argv0 = argv0;
        task.local_task = u32::try_from(local_task).unwrap_or(0);
        Ok(serde_json::to_string(&task)?)
    })
}

/// Have Slurm exec `ferry_bin` in this task's place, told what to do by `env`, which holds
/// `describe(argv0)`: `argv0` is the task's own first word where this Slurm cannot put
/// `ferry` in front of the task's argv (before 23.11) and `ferry_bin` replaces that word.
fn exec_ferry_in_task(
    spank: &SpankHandle,
    raw: slurm_spank::spank_sys::spank_t,
    ferry_bin: &Path,
    env: &str,
    describe: impl FnOnce(Option<Vec<u8>>) -> Result<String, PluginError>,
) -> Result<(), PluginError> {
    use std::os::unix::ffi::OsStrExt;
    let program = std::ffi::CString::new(ferry_bin.as_os_str().as_bytes())
        .map_err(|_| PluginError::NulInFerryPath)?;
    let prepend = crate::slurm::PrependTask::lookup();
    let argv = crate::slurm::TaskArgv::of_task(raw).ok_or(PluginError::NoTaskArgv)?;
    let argv0 = prepend.is_none().then(|| argv.first());
    spank.setenv(env, &describe(argv0)?, true)?;
    match prepend {
        Some(prepend) => prepend
            .prepend(raw, &program)
            .map_err(PluginError::PrependTaskArgv)?,
        None => argv.replace_first(program),
    }
    Ok(())
}

/// The image's environment over the task's, except where Slurm or `--container-env` set
/// a variable for the task.
fn set_image_env(
    spank: &SpankHandle,
    step: &Step,
    env: &[(String, String)],
) -> Result<(), PluginError> {
    for (name, value) in env {
        // The image's values, except where Slurm or --container-env set one for the task.
        let keep_task_value = name.starts_with("SLURM_")
            || name.starts_with("PMI")
            || step
                .request
                .env_names
                .as_deref()
                .is_some_and(|n| n.split(',').any(|x| x.trim() == name));
        if keep_task_value && spank.getenv(name).ok().flatten().is_some() {
            continue;
        }
        spank.setenv(name, value, true)?;
    }
    Ok(())
}

/// What distributed-training frameworks read to find their peers (RANK, WORLD_SIZE,
/// MASTER_ADDR, MASTER_PORT…: [`ferry::slurm::framework_env`]), from the task's Slurm variables.
/// A value the task already has (the user's, or the image's) wins, unless ferry set it for
/// an enclosing container step (see [`ferry::slurm::framework_env::RECORD_VARIABLE`]).
fn set_framework_env(spank: &SpankHandle, step: &Step) -> Result<(), PluginError> {
    let Some(ports) = &step.framework_ports else {
        return Ok(());
    };
    let getenv = |name: &str| spank.getenv(name).ok().flatten();
    let task = match ferry::slurm::framework_env::SlurmTask::from_vars(getenv) {
        Ok(Some(task)) => task,
        Ok(None) => return Ok(()),
        Err(e) => {
            // Not ferry's to fail a step over: the frameworks' variables are a convenience.
            warn!(
                "step {}.{}: no framework variables: {e}",
                step.job_id,
                step_name(step.step_id)
            );
            return Ok(());
        }
    };
    for (name, value) in task.assignments(ports, getenv) {
        spank.setenv(name, &value, true)?;
    }
    Ok(())
}

/// task_exit (slurmstepd, once per task as it is reaped): after the last local task, stop
/// the holder, before Slurm waits for the step's processes to go.
pub fn task_exit(step: &mut Step) {
    step.tasks_exited += 1;
    if step.tasks_exited < step.local_tasks {
        return;
    }
    // Waited for here, not in `exit`: slurmstepd removes the step's cgroup before it calls
    // `exit`, and a holder still in it would keep the cgroup (and the next job of the same
    // id fails to set its cpuset).
    stop_holder(step, "the step's last task exited");
}

/// exit (slurmstepd, at the end): make sure nothing is left, also for failed steps.
pub fn exit(step: &mut Step) {
    stop_holder(step, "the step ends");
}

fn stop_holder(step: &mut Step, why: &str) {
    step.namespaces = None;
    // Its end of file stops the forward server.
    step.forward = None;
    if let Some(holder) = step.holder.take() {
        let ended = holder.stop(Duration::from_secs(10));
        debug!("holder stopped ({why}): {:?}", ended.status);
        if let Some(early) = ended.early {
            // slurmstepd forwards its errors to srun's terminal while the step lasts.
            error!("step {}.{}: {early}", step.job_id, step_name(step.step_id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step() -> Step {
        Step {
            job_id: 42,
            step_id: 3,
            uid: 2001,
            ..Step::default()
        }
    }

    #[test]
    fn options_that_only_apply_at_a_containers_start_are_named() {
        let req = StepRequest {
            image: Some("/i.sqsh".into()),
            mounts: Some("/a:/b".into()),
            writable: Some(false),
            remap_root: Some(true),
            workdir: Some("/w".into()),
            env_names: Some("A".into()),
            name: Some("x".into()),
            ..StepRequest::default()
        };
        assert_eq!(
            start_only_options(&req),
            [
                "--container-image",
                "--container-mounts",
                "--container-readonly",
                "--container-remap-root"
            ]
        );
        assert!(start_only_options(&StepRequest::default()).is_empty());
    }

    #[test]
    fn pmix_server_dir_of_this_step_is_bound_at_the_same_path() {
        let spool = tempfile::tempdir().unwrap();
        let own = spool.path().join("pmix.42.3");
        std::fs::create_dir(&own).unwrap();
        let env = |name: &str| (name == "PMIX_SERVER_TMPDIR").then(|| own.clone().into());
        let mounts = mpi_runtime_mounts(&step(), env, |_| None);
        assert_eq!(
            mounts,
            vec![MountSpec::bind(own.clone(), own.clone(), false)]
        );
    }

    #[test]
    fn other_steps_and_missing_dirs_are_not_bound() {
        let spool = tempfile::tempdir().unwrap();
        let other = spool.path().join("pmix.42.2");
        std::fs::create_dir(&other).unwrap();
        let env = |name: &str| (name == "PMIX_SERVER_TMPDIR").then(|| other.clone().into());
        assert!(mpi_runtime_mounts(&step(), env, |_| None).is_empty());
        // The right name, but no such directory (mpi/pmix not used by this step).
        let gone = spool.path().join("pmix.42.3");
        let env = |name: &str| (name == "PMIX_SERVER_TMPDIR").then(|| gone.clone().into());
        assert!(mpi_runtime_mounts(&step(), env, |_| None).is_empty());
        assert!(mpi_runtime_mounts(&step(), |_| None, |_| None).is_empty());
    }

    #[test]
    fn client_dir_under_slurm_pmix_tmpdir_is_bound() {
        let base = tempfile::tempdir().unwrap();
        let cli = base.path().join("spmix_appdir_2001_42.3");
        std::fs::create_dir(&cli).unwrap();
        let base_text = base.path().display().to_string();
        let step_env = |name: &str| (name == "SLURM_PMIX_TMPDIR").then(|| base_text.clone());
        let mounts = mpi_runtime_mounts(&step(), |_| None, step_env);
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].source, cli);
        assert_eq!(mounts[0].target, cli);
    }
}

//! Local context (srun) and allocator context (sbatch, salloc): find out which image and
//! options the step or job asks for, check them, and hand them to the remote side (see
//! [`crate::request`] for the transport).
//!
//! Where the image comes from, first match wins:
//! 1. this command's own request: `--container-image` (a ferry option) or, in srun,
//!    srun's own `--container` read from `/proc/self/cmdline` (Slurm owns that option, see
//!    [`ferry::slurm::srun_args`]); giving both with different values is an error;
//! 2. `SRUN_CONTAINER` (srun) / `SBATCH_CONTAINER` (sbatch) / `SALLOC_CONTAINER` (salloc),
//!    Slurm's input variables for `--container`;
//! 3. `SLURM_FERRY_CONTAINER_IMAGE` inherited from the enclosing job (set by the sbatch/salloc
//!    that made it, already resolved against *its* working directory);
//! 4. `SLURM_CONTAINER`: inherited from the job, or set by srun/sbatch themselves from
//!    `--container` when it was not set before.
//!
//! The other options: this command's value, else the job's (inherited `SLURM_FERRY_CONTAINER_*`).
//! Relative paths are made absolute against this command's working directory here, where
//! it is known.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use ferry::slurm::srun_args;
use ferry::spec::Provider;
use slurm_spank::Context;
use tracing::{debug, info, warn};

use crate::error::PluginError;
use crate::options::{self, OptionValues};
use crate::request::{self, StepRequest, ALL_ENV};

/// The `SLURM_FERRY_CONTAINER_*` variables this process started with (before the plugin set any).
#[derive(Debug, Clone, Default)]
pub struct Inherited {
    vars: HashMap<&'static str, String>,
}

impl Inherited {
    pub fn capture() -> Inherited {
        let vars = ALL_ENV
            .iter()
            .filter_map(|name| std::env::var(name).ok().map(|v| (*name, v)))
            .collect();
        Inherited { vars }
    }

    fn request(&self) -> Result<Option<StepRequest>, PluginError> {
        StepRequest::from_env(|name| self.vars.get(name).cloned())
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// srun's `--container` from its command line.
fn srun_container_arg(slurm_version: u32) -> Result<Option<String>, PluginError> {
    let cmdline = std::fs::read("/proc/self/cmdline").map_err(PluginError::SrunCmdline)?;
    let argv = srun_args::split_cmdline(&cmdline);
    let args = argv.get(1..).unwrap_or(&[]);
    let table = options::srun_table();
    let found = srun_args::container(args, slurm_version, &table);
    match found.map(OsString::into_string) {
        None => Ok(None),
        Some(Ok(v)) if v.is_empty() => Ok(None),
        Some(Ok(v)) => Ok(Some(v)),
        Some(Err(v)) => Err(PluginError::ContainerNotUtf8(
            v.to_string_lossy().into_owned(),
        )),
    }
}

/// Whether srun's own options (`/proc/self/cmdline`) hold `--multi-prog`.
fn srun_multi_prog(slurm_version: u32) -> bool {
    let Ok(cmdline) = std::fs::read("/proc/self/cmdline") else {
        return false;
    };
    let argv = srun_args::split_cmdline(&cmdline);
    multi_prog_in(argv.get(1..).unwrap_or(&[]), slurm_version)
}

fn multi_prog_in(args: &[OsString], slurm_version: u32) -> bool {
    let table = options::srun_table();
    srun_args::parse(args, slurm_version, &table)
        .options
        .iter()
        .any(|o| matches!(&o.name, srun_args::OptName::Long(n) if n == "multi-prog"))
}

/// `--container-entrypoint` and `--container-save` change the task's argv, which before
/// Slurm 23.11 only works for the step's one argv, not for the per-task argvs of
/// `--multi-prog` (see crate::remote::task_through_ferry): refuse that here, where it is
/// known. `option` is the option that asks for it, if any.
fn check_entrypoint_multi_prog(
    option: Option<&str>,
    slurm_version: u32,
    multi_prog: impl FnOnce() -> bool,
) -> Result<(), PluginError> {
    let Some(option) = option else {
        return Ok(());
    };
    if slurm_version < srun_args::version(23, 11) && multi_prog() {
        return Err(PluginError::MultiProg {
            option: option.to_string(),
            major: slurm_version >> 16,
            minor: (slurm_version >> 8) & 0xff,
        });
    }
    Ok(())
}

/// Resolve the request of this srun/sbatch/salloc. `None`: no container.
/// `opts` are the command line's options, `variables` those set by `PYXIS_CONTAINER_*` /
/// `FERRY_CONTAINER_*` ([`options::from_variables`]), which fill what the command line
/// leaves unset; variables alone, without an image, ask for nothing (a user may keep them
/// in the environment of every srun).
pub fn resolve(
    context: Context,
    opts: &OptionValues,
    variables: &OptionValues,
    inherited: &Inherited,
    slurm_version: u32,
    cwd: &Path,
) -> Result<Option<StepRequest>, PluginError> {
    let options_given = opts.any();
    let opts = &opts.or(variables);
    if let Some((a, b)) = opts.conflicts.first() {
        return Err(PluginError::Contradiction(a, b));
    }
    if opts.image.as_deref() == Some("") {
        return Err(PluginError::EmptyImage);
    }
    let job = inherited
        .request()
        .map_err(|e| PluginError::Inherited(Box::new(e)))?;

    let own = match context {
        Context::Local => srun_container_arg(slurm_version)?,
        _ => None,
    };
    let input_var = match context {
        Context::Local => "SRUN_CONTAINER",
        _ if is_salloc() => "SALLOC_CONTAINER",
        _ => "SBATCH_CONTAINER",
    };
    let image = match (&opts.image, &own) {
        (Some(a), Some(b)) if a != b => {
            return Err(PluginError::ImageTwice {
                container: b.clone(),
                image: a.clone(),
            })
        }
        (Some(a), _) => Some((a.clone(), "--container-image")),
        (None, Some(b)) => Some((b.clone(), "--container")),
        (None, None) => None,
    }
    .filter(|(i, _)| !i.is_empty())
    .or_else(|| env_nonempty(input_var).map(|i| (i, input_var)))
    .or_else(|| {
        job.as_ref()
            .and_then(|j| j.image.clone())
            .map(|i| (i, request::ENV_IMAGE))
    })
    .or_else(|| env_nonempty("SLURM_CONTAINER").map(|i| (i, "SLURM_CONTAINER")));

    let checkpoint = checkpoint_dir(opts.checkpoint.as_deref(), "--container-checkpoint", cwd)?
        .or(job.as_ref().and_then(|j| j.checkpoint.clone()));
    let restore = checkpoint_dir(opts.restore.as_deref(), "--container-restore", cwd)?
        .or(job.as_ref().and_then(|j| j.restore.clone()));
    let image = match image {
        Some((image, origin)) => Some(image_of_request(image, origin, cwd)),
        // The checkpoint names its image.
        None if restore.is_some() => None,
        // pyxis' reuse of a container by its name alone: the job's named container.
        None if opts.name.is_some() || job.as_ref().is_some_and(|j| j.name.is_some()) => None,
        None if options_given => return Err(PluginError::OptionsWithoutImage),
        None => return Ok(None),
    };
    let job = job.unwrap_or_default();
    let mounts = match opts.mounts.as_deref() {
        Some(list) => Some(request::absolute_mounts(list, cwd).map_err(PluginError::Mounts)?),
        None => job.mounts,
    };
    // A relative directory is taken from the container's `/` (pyxis: `../` is `/`).
    let workdir = opts
        .workdir
        .clone()
        .or(job.workdir)
        .map(|w| ferry::spec::container_path(&w).display().to_string());
    let (name, name_flag) = match &opts.name {
        Some(text) => {
            let (name, flag) = request::parse_name(text)?;
            (Some(name), flag)
        }
        None => (job.name, job.name_flag),
    };
    // Saving is per step: a job-wide --container-save would make every step overwrite it.
    let save = opts
        .save
        .as_deref()
        .map(|p| check_save_target(p, cwd))
        .transpose()?;
    let rootfs = opts.rootfs.clone().or(job.rootfs);
    if let Some(r) = &rootfs {
        r.parse::<Provider>().map_err(|error| PluginError::Rootfs {
            name: r.clone(),
            error,
        })?;
    }
    let gpus = opts.gpus.clone().or(job.gpus);
    if let Some(g) = &gpus {
        ferry::spec::gpus::GpuRequest::parse(g).map_err(PluginError::Gpus)?;
    }
    let env_names = opts.env.clone().or(job.env_names);
    if let Some(list) = &env_names {
        request::check_env_names(list)?;
    }
    let unshare = match &opts.unshare {
        Some(list) => Some(request::parse_unshare(list)?),
        None => job.unshare,
    };
    let req = StepRequest {
        image,
        mounts,
        workdir,
        env_names,
        mount_home: opts.mount_home.or(job.mount_home),
        remap_root: opts.remap_root.or(job.remap_root),
        writable: opts.writable.or(job.writable),
        entrypoint: opts.entrypoint.or(job.entrypoint),
        name,
        name_flag,
        save,
        rootfs,
        gpus,
        unshare,
        entrypoint_log: opts.entrypoint_log.or(job.entrypoint_log),
        checkpoint,
        restore,
        checkpoint_signal: match &opts.checkpoint_signal {
            Some(text) => Some(text.parse()?),
            None => job.checkpoint_signal,
        },
    };
    if opts.checkpoint_signal.is_some() && req.checkpoint.is_none() && req.restore.is_none() {
        return Err(PluginError::SignalWithoutCheckpoint);
    }
    check_checkpoint_combinations(&req)?;
    if context == Context::Local {
        let option = if req.checkpoint.is_some() {
            Some("--container-checkpoint")
        } else if req.restore.is_some() {
            Some("--container-restore")
        } else if req.entrypoint == Some(true) {
            Some("--container-entrypoint")
        } else {
            req.save.as_ref().map(|_| "--container-save")
        };
        check_entrypoint_multi_prog(option, slurm_version, || srun_multi_prog(slurm_version))?;
    }
    match (&req.image, &req.name) {
        (Some(image), _) => info!("container image {image}"),
        (None, name) => info!(
            "the job's container named {}",
            name.as_deref().unwrap_or("?")
        ),
    }
    debug!("request: {req:?}");
    Ok(Some(req))
}

/// A `--container-checkpoint` or `--container-restore` directory made absolute.
fn checkpoint_dir(
    dir: Option<&str>,
    option: &'static str,
    cwd: &Path,
) -> Result<Option<String>, PluginError> {
    match dir {
        None => Ok(None),
        Some("") => Err(PluginError::EmptyCheckpointDir(option)),
        Some(dir) => Ok(Some(
            request::absolute_image(dir, cwd)
                .trim_end_matches('/')
                .to_string(),
        )),
    }
}

/// A checkpointed container is the step's own, started by its one task: it cannot be a
/// named container other steps share, nor be saved as an image at its end (its end is the
/// checkpoint), and a step either starts one or restores one.
pub fn check_checkpoint_combinations(req: &StepRequest) -> Result<(), PluginError> {
    let option = match (&req.checkpoint, &req.restore) {
        (Some(_), Some(_)) => {
            return Err(PluginError::CheckpointWith(
                "--container-checkpoint",
                "--container-restore",
            ))
        }
        (Some(_), None) => "--container-checkpoint",
        (None, Some(_)) => "--container-restore",
        (None, None) => return Ok(()),
    };
    if req.name.is_some() {
        return Err(PluginError::CheckpointWith(option, "--container-name"));
    }
    if req.save.is_some() {
        return Err(PluginError::CheckpointWith(option, "--container-save"));
    }
    Ok(())
}

/// The image of the request as it travels: pyxis' bare registry names (`ubuntu:24.04`,
/// `nvcr.io#nvidia/pytorch:24.05-py3`) in their docker:// form unless such a path exists,
/// paths made absolute.
fn image_of_request(image: String, origin: &str, cwd: &Path) -> String {
    let image = match ferry::image::reference::ImageRef::parse(&image, cwd) {
        Ok(ferry::image::reference::ImageRef::Registry(r)) if !request::is_reference(&image) => {
            debug!("{image} names a registry image: {r}");
            r.to_string()
        }
        _ => image,
    };
    // An inherited SLURM_FERRY_CONTAINER_IMAGE is absolute already, against the job's directory.
    let image = request::absolute_image(&image, cwd);
    if !request::is_reference(&image) && !Path::new(&image).exists() {
        // Not an error: node-local paths (sbcast, a node's /tmp) exist only on the nodes,
        // and the node's error is the one line the user needs when it is missing there too.
        debug!("image {image} (from {origin}) does not exist on this host; the step will look for it on its nodes");
    }
    image
}

/// `--container-save=PATH` made absolute, refused when it can never be written: a
/// directory (`/`, `./`, `dir/`, an existing one) or a file in a directory the user cannot
/// write. A directory that does not exist here is left to the node (a node-local path).
fn check_save_target(path: &str, cwd: &Path) -> Result<String, PluginError> {
    if path.is_empty() {
        return Err(PluginError::EmptySave);
    }
    let absolute = request::absolute_image(path, cwd);
    let as_path = Path::new(&absolute);
    let names_a_directory = path.ends_with('/')
        || path.ends_with("/.")
        || path.ends_with("/..")
        || matches!(path, "." | "..")
        || as_path.is_dir();
    if names_a_directory {
        return Err(PluginError::SaveIsDirectory {
            path: path.to_string(),
            dir: absolute.trim_end_matches('/').to_string(),
        });
    }
    if let Some(dir) = as_path.parent().filter(|d| d.is_dir()) {
        use nix::unistd::{access, AccessFlags};
        if let Err(e) = access(dir, AccessFlags::W_OK | AccessFlags::X_OK) {
            return Err(PluginError::SaveNotWritable {
                path: path.to_string(),
                dir: dir.to_path_buf(),
                error: std::io::Error::from_raw_os_error(e as i32),
            });
        }
    }
    Ok(absolute)
}

/// A container name alone names a container an earlier step of the same job made (unless
/// the site keeps named containers across jobs): an srun that makes its own job has none.
pub fn check_named_only(
    req: &StepRequest,
    settings: &ferry::slurm::site::PluginSettings,
    context: Context,
) -> Result<(), PluginError> {
    let (None, Some(name)) = (&req.image, &req.name) else {
        return Ok(());
    };
    let own_job = context == Context::Local && std::env::var_os("SLURM_JOB_ID").is_none();
    if own_job && settings.container_scope == ferry::slurm::site::ContainerScope::Job {
        return Err(PluginError::NamedOnlyNewJob(name.clone()));
    }
    Ok(())
}

/// `--container-remap-root` is how users install packages, which fails on a read-only
/// root filesystem with errors that do not say why (apt: `setgroups 65534 failed`): say so
/// in one line, unless the step chose read-only itself (`--container-readonly`).
pub fn note_read_only_remap_root(req: &StepRequest, settings: &ferry::slurm::site::PluginSettings) {
    // Named and saved containers are writable unless the step says otherwise.
    let writable = req
        .writable
        .unwrap_or(settings.writable || req.name.is_some() || req.save.is_some());
    if req.remap_root == Some(true) && !writable && req.writable.is_none() {
        warn!(
            "--container-remap-root: the container's root filesystem is read-only, so \
             package installs (apt, dnf, pip) fail; add --container-writable"
        );
    }
}

/// Put `req` (or, for `None`, its absence) into this process's environment, from where Slurm
/// copies it into the step's (or the batch job's) environment.
pub fn export(req: Option<&StepRequest>) {
    // srun and sbatch are single-threaded while they process options, which is when this
    // runs (init_post_opt); nothing else reads the environment concurrently.
    match req {
        Some(req) => {
            for (name, value) in req.to_env() {
                match value {
                    Some(v) => std::env::set_var(name, v),
                    None => std::env::remove_var(name),
                }
            }
        }
        None => {
            for name in ALL_ENV {
                std::env::remove_var(name);
            }
        }
    }
}

/// sbatch: check the user's `FERRY_BATCH_SCRIPT` (where the batch script runs) and pass it
/// on as `SLURM_FERRY_BATCH_SCRIPT`, which reaches the batch step under `--export=NONE`
/// too. salloc's shell stays on the host whatever it says.
pub fn export_batch_script(context: Context) -> Result<(), PluginError> {
    if context != Context::Allocator || is_salloc() {
        return Ok(());
    }
    let Some(value) = env_nonempty(request::USER_BATCH_SCRIPT) else {
        return Ok(());
    };
    if ferry::slurm::site::BatchScript::parse(&value).is_none() {
        return Err(PluginError::BadBatchScript {
            name: request::USER_BATCH_SCRIPT,
            value,
        });
    }
    // sbatch is single-threaded while it processes options (see `export`).
    std::env::set_var(request::ENV_BATCH_SCRIPT, value);
    Ok(())
}

/// Whether this process is salloc (the allocator context is sbatch or salloc).
fn is_salloc() -> bool {
    std::fs::read_link("/proc/self/exe")
        .ok()
        .and_then(|p| p.file_name().map(|n| n == "salloc"))
        .unwrap_or(false)
}

/// This command's working directory.
pub fn cwd() -> Result<PathBuf, PluginError> {
    std::env::current_dir().map_err(PluginError::NoCwd)
}

/// `import_on_submit=yes`: import the image into the user's cache now, as the user (srun
/// and sbatch run as the user), showing ferry's progress on the terminal. The nodes then
/// find it in the cache, when the cache is on a file system they share.
pub fn import_now(
    req: &StepRequest,
    settings: &ferry::slurm::site::PluginSettings,
    quiet: bool,
) -> Result<(), PluginError> {
    let Some(image) = req.image.as_deref() else {
        return Ok(());
    };
    if !settings.import_on_submit || !request::is_reference(image) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut cmd = std::process::Command::new(&settings.ferry_bin);
    // stderr is the user's: `ferry import` draws its bar there on a terminal, writes plain
    // lines into a file, and says its own one-line error.
    cmd.args(["import", image])
        .envs(settings.import_settings().to_env())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    if quiet || settings.quiet {
        cmd.env(ferry::image::registry::progress::QUIET_ENV, "1");
    }
    let status = cmd.status().map_err(|error| PluginError::CannotRun {
        program: settings.ferry_bin.clone(),
        error,
    })?;
    if status.code().is_none() {
        return Err(PluginError::ImportStopped {
            image: image.to_string(),
            status,
        });
    }
    if !status.success() {
        // Its error line is on the user's terminal already.
        return Err(PluginError::Reported);
    }
    info!(
        "imported {image} before the start in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Pin a registry image given by tag to the digest the tag names now, so that every node
/// and every later step of the job runs the same image even if the tag moves. Best effort:
/// a registry this host cannot reach (a login node without access) leaves the tag for the
/// nodes to resolve.
pub fn pin_tag(req: &mut StepRequest, settings: &ferry::slurm::site::PluginSettings) {
    let Some(text) = req.image.as_deref() else {
        return;
    };
    if !request::is_reference(text) {
        return;
    }
    let Ok(image) = ferry::image::reference::ImageRef::parse(text, Path::new("/")) else {
        return;
    };
    // srun runs as the user: their own registries file is in their home.
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let site = match ferry::image::registry::ClientOptions::with_site(
        &settings.import_settings(),
        home.as_deref(),
    ) {
        Ok(site) => site,
        Err(e) => {
            // The nodes' import says it again, as the step's one error line.
            debug!("not pinning {text} here: {e}");
            return;
        }
    };
    let opts = ferry::image::registry::ClientOptions {
        retries: 0,
        connect_timeout: std::time::Duration::from_secs(3),
        read_timeout: std::time::Duration::from_secs(10),
        ..site
    };
    let started = std::time::Instant::now();
    match ferry::store::import::pin_reference(&image, &opts) {
        Ok(Some(pinned)) => {
            info!(
                "{text} is {pinned} ({:.0} ms)",
                started.elapsed().as_secs_f64() * 1000.0
            );
            req.image = Some(pinned);
        }
        Ok(None) => {}
        Err(e) => debug!("not pinning {text} here: {e}; the nodes resolve it"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn checkpoint_options_that_make_no_sense_together_are_refused() {
        let base = StepRequest {
            image: Some("/i.sqsh".into()),
            checkpoint: Some("/ck".into()),
            ..StepRequest::default()
        };
        assert!(check_checkpoint_combinations(&base).is_ok());
        for (req, says) in [
            (
                StepRequest {
                    name: Some("w".into()),
                    ..base.clone()
                },
                "--container-checkpoint cannot be combined with --container-name",
            ),
            (
                StepRequest {
                    save: Some("/s.sqsh".into()),
                    ..base.clone()
                },
                "--container-checkpoint cannot be combined with --container-save",
            ),
            (
                StepRequest {
                    restore: Some("/ck".into()),
                    ..base.clone()
                },
                "--container-checkpoint cannot be combined with --container-restore",
            ),
            (
                StepRequest {
                    checkpoint: None,
                    restore: Some("/ck".into()),
                    name: Some("w".into()),
                    ..base.clone()
                },
                "--container-restore cannot be combined with --container-name",
            ),
        ] {
            let e = check_checkpoint_combinations(&req).unwrap_err().to_string();
            assert!(e.starts_with(says), "{e}");
        }
        assert_eq!(
            checkpoint_dir(Some("ck/"), "--container-checkpoint", Path::new("/home/u"))
                .unwrap()
                .as_deref(),
            Some("/home/u/ck")
        );
        assert!(checkpoint_dir(Some(""), "--container-restore", Path::new("/")).is_err());
    }

    #[test]
    fn save_targets_that_name_a_directory_are_refused() {
        let cwd = Path::new("/nonexistent-cwd");
        for bad in ["/", "./", "/tmp/", "/tmp", "dir/", ".", "..", "x/.", ""] {
            assert!(check_save_target(bad, cwd).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_save_target("out.sqsh", cwd).unwrap(),
            "/nonexistent-cwd/out.sqsh"
        );
        // A directory that does not exist here may exist on the node.
        assert!(check_save_target("/nonexistent-dir/out.sqsh", cwd).is_ok());
    }

    #[test]
    fn multi_prog_is_read_from_sruns_options_only() {
        let v = srun_args::version(22, 5);
        assert!(multi_prog_in(&os(&["-n2", "--multi-prog", "mp.conf"]), v));
        assert!(multi_prog_in(&os(&["--multi", "mp.conf"]), v));
        assert!(!multi_prog_in(&os(&["-n2", "prog", "--multi-prog"]), v));
    }

    #[test]
    fn entrypoint_with_multi_prog_is_refused_before_slurm_23_11_only() {
        let old = srun_args::version(22, 5);
        let new = srun_args::version(24, 11);
        let e =
            check_entrypoint_multi_prog(Some("--container-entrypoint"), old, || true).unwrap_err();
        assert!(e.to_string().contains("on Slurm 22.05"), "{e}");
        let opt = Some("--container-save");
        assert!(check_entrypoint_multi_prog(opt, old, || true).is_err());
        assert!(check_entrypoint_multi_prog(opt, new, || true).is_ok());
        assert!(check_entrypoint_multi_prog(opt, old, || false).is_ok());
        assert!(check_entrypoint_multi_prog(None, old, || true).is_ok());
    }
}

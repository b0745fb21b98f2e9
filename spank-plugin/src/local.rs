//! Local context (srun) and allocator context (sbatch, salloc): find out which image and
//! options the step or job asks for, check them, and hand them to the remote side (see
//! [`crate::request`] for the transport).
//!
//! Where the image comes from, first match wins:
//! 1. this command's own request: `--container-image` (a ferry option) or, in srun,
//!    srun's own `--container` read from `/proc/self/cmdline` (Slurm owns that option, see
//!    [`ferry::srun_args`]); giving both with different values is an error;
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

use ferry::srun_args;
use slurm_spank::Context;
use tracing::{debug, info, warn};

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

    fn request(&self) -> Result<Option<StepRequest>, String> {
        StepRequest::from_env(|name| self.vars.get(name).cloned())
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// srun's `--container` from its command line.
fn srun_container_arg(slurm_version: u32) -> Result<Option<String>, String> {
    let cmdline = std::fs::read("/proc/self/cmdline")
        .map_err(|e| format!("cannot read srun's command line (/proc/self/cmdline): {e}"))?;
    let argv = srun_args::split_cmdline(&cmdline);
    let args = argv.get(1..).unwrap_or(&[]);
    let table = options::srun_table();
    let found = srun_args::container(args, slurm_version, &table);
    match found.map(OsString::into_string) {
        None => Ok(None),
        Some(Ok(v)) if v.is_empty() => Ok(None),
        Some(Ok(v)) => Ok(Some(v)),
        Some(Err(v)) => Err(format!(
            "--container={}: the path is not valid UTF-8",
            v.to_string_lossy()
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

/// `--container-entrypoint` changes the task's argv, which before Slurm 23.11 only works
/// for the step's one argv, not for the per-task argvs of `--multi-prog` (see
/// crate::remote::entrypoint_through_ferry): refuse that here, where it is known.
fn check_entrypoint_multi_prog(
    entrypoint: Option<bool>,
    slurm_version: u32,
    multi_prog: impl FnOnce() -> bool,
) -> Result<(), String> {
    if entrypoint == Some(true) && slurm_version < srun_args::version(23, 11) && multi_prog() {
        return Err(format!(
            "--container-entrypoint does not work with --multi-prog on Slurm {}.{:02} (it \
             needs 23.11 or later): put the entrypoint in front of each command in the \
             multi-prog file instead",
            slurm_version >> 16,
            (slurm_version >> 8) & 0xff
        ));
    }
    Ok(())
}

/// Resolve the request of this srun/sbatch/salloc. `None`: no container.
pub fn resolve(
    context: Context,
    opts: &OptionValues,
    inherited: &Inherited,
    slurm_version: u32,
    cwd: &Path,
) -> Result<Option<StepRequest>, String> {
    if let Some((a, b)) = opts.conflicts.first() {
        return Err(format!(
            "--{a} and --{b} contradict each other: give one of them"
        ));
    }
    let job = inherited
        .request()
        .map_err(|e| format!("inherited environment: {e}"))?;

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
            return Err(format!(
            "the image is given twice, as --container={b} and --container-image={a}: give it once"
        ))
        }
        (Some(a), _) => Some((a.clone(), "--container-image")),
        (None, Some(b)) => Some((b.clone(), "--container")),
        (None, None) => None,
    }
    .filter(|(i, _)| !i.is_empty())
    .or_else(|| env_nonempty(input_var).map(|i| (i, input_var)))
    .or_else(|| job.as_ref().map(|j| (j.image.clone(), request::ENV_IMAGE)))
    .or_else(|| env_nonempty("SLURM_CONTAINER").map(|i| (i, "SLURM_CONTAINER")));

    let Some((image, origin)) = image else {
        if opts.any() {
            warn!("container options without an image have no effect: add --container=IMAGE");
        }
        return Ok(None);
    };
    // pyxis' bare registry names (`ubuntu:24.04`, `nvcr.io#nvidia/pytorch:24.05-py3`) mean
    // registry images, unless such a path exists; they travel in their docker:// form.
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

    let job = job.unwrap_or_default();
    let mounts = match opts.mounts.as_deref() {
        Some(list) => Some(
            request::absolute_mounts(list, cwd).map_err(|e| format!("--container-mounts: {e}"))?,
        ),
        None => job.mounts,
    };
    let workdir = opts.workdir.clone().or(job.workdir);
    if let Some(w) = &workdir {
        if !w.starts_with('/') {
            return Err(format!(
                "--container-workdir={w}: give an absolute path inside the container"
            ));
        }
    }
    let name = opts.name.clone().or(job.name);
    if let Some(n) = &name {
        request::check_name(n)?;
    }
    // Saving is per step: a job-wide --container-save would make every step overwrite it.
    let save = opts
        .save
        .as_deref()
        .map(|p| request::absolute_image(p, cwd));
    let rootfs = opts.rootfs.clone().or(job.rootfs);
    if let Some(r) = &rootfs {
        if !ferry::spec::RootfsProvider::NAMES.contains(&r.as_str()) {
            return Err(format!(
                "--container-rootfs={r}: unknown provider (known: {})",
                ferry::spec::RootfsProvider::NAMES.join(", ")
            ));
        }
    }
    let gpus = opts.gpus.clone().or(job.gpus);
    if let Some(g) = &gpus {
        ferry::gpu::GpuRequest::parse(g).map_err(|e| format!("--container-gpus: {e}"))?;
    }
    let env_names = opts.env.clone().or(job.env_names);
    if let Some(list) = &env_names {
        request::check_env_names(list)?;
    }
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
        save,
        rootfs,
        gpus,
    };
    if context == Context::Local {
        check_entrypoint_multi_prog(req.entrypoint, slurm_version, || {
            srun_multi_prog(slurm_version)
        })?;
    }
    info!("container image {} (from {origin})", req.image);
    debug!("request: {req:?}");
    Ok(Some(req))
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

/// Whether this process is salloc (the allocator context is sbatch or salloc).
fn is_salloc() -> bool {
    std::fs::read_link("/proc/self/exe")
        .ok()
        .and_then(|p| p.file_name().map(|n| n == "salloc"))
        .unwrap_or(false)
}

/// This command's working directory.
pub fn cwd() -> Result<PathBuf, String> {
    std::env::current_dir().map_err(|e| format!("cannot determine the current directory: {e}"))
}

/// `import_on_submit=yes`: import the image into the user's cache now, as the user (srun
/// and sbatch run as the user), showing ferry's progress on the terminal. The nodes then
/// find it in the cache, when the cache is on a file system they share.
pub fn import_now(
    req: &StepRequest,
    settings: &ferry::site::PluginSettings,
    quiet: bool,
) -> Result<(), String> {
    if !settings.import_on_submit || !request::is_reference(&req.image) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut cmd = std::process::Command::new(&settings.ferry_bin);
    // stderr is the user's: `ferry import` draws its bar there on a terminal, writes plain
    // lines into a file, and says its own one-line error.
    cmd.args(["import", &req.image])
        .env(
            "FERRY_INSECURE_REGISTRIES",
            settings.insecure_registries.join(","),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    if let Some(ca) = &settings.registry_ca_file {
        cmd.env("FERRY_REGISTRY_CA_FILE", ca);
    }
    if quiet || settings.quiet {
        cmd.env(ferry::image::registry::progress::QUIET_ENV, "1");
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}", settings.ferry_bin.display()))?;
    if status.code().is_none() {
        return Err(format!("ferry import {} was stopped ({status})", req.image));
    }
    if !status.success() {
        // Its error line is on the user's terminal already.
        return Err(String::new());
    }
    info!(
        "imported {} before the start in {:.1} s",
        req.image,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Pin a registry image given by tag to the digest the tag names now, so that every node
/// and every later step of the job runs the same image even if the tag moves. Best effort:
/// a registry this host cannot reach (a login node without access) leaves the tag for the
/// nodes to resolve.
pub fn pin_tag(req: &mut StepRequest, settings: &ferry::site::PluginSettings) {
    if !request::is_reference(&req.image) {
        return;
    }
    let Ok(image) = ferry::image::reference::ImageRef::parse(&req.image, Path::new("/")) else {
        return;
    };
    let opts = ferry::image::registry::ClientOptions {
        insecure_registries: settings.insecure_registries.clone(),
        ca_file: settings.registry_ca_file.clone(),
        retries: 0,
        connect_timeout: std::time::Duration::from_secs(3),
        read_timeout: std::time::Duration::from_secs(10),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    match ferry::import::pin_reference(&image, &opts) {
        Ok(Some(pinned)) => {
            info!(
                "{} is {pinned} ({:.0} ms)",
                req.image,
                started.elapsed().as_secs_f64() * 1000.0
            );
            req.image = pinned;
        }
        Ok(None) => {}
        Err(e) => debug!("not pinning {} here: {e}; the nodes resolve it", req.image),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
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
        let e = check_entrypoint_multi_prog(Some(true), old, || true).unwrap_err();
        assert!(e.contains("on Slurm 22.05"), "{e}");
        assert!(check_entrypoint_multi_prog(Some(true), new, || true).is_ok());
        assert!(check_entrypoint_multi_prog(Some(true), old, || false).is_ok());
        assert!(check_entrypoint_multi_prog(Some(false), old, || true).is_ok());
        assert!(check_entrypoint_multi_prog(None, old, || true).is_ok());
    }
}

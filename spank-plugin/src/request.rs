//! What a step asks for, as the submit side resolved it, and how it travels to slurmstepd.
//!
//! Plain data with no launcher types, so that the transport between srun/sbatch and
//! slurmstepd stays the same when the launcher's API changes; [`crate::remote`] turns it
//! into a `ferry::spec::ContainerSpec`.
//!
//! Transport: srun/sbatch/salloc (local and allocator context) put the resolved request into
//! their own process environment with plain `setenv()` — the variables below. Slurm copies
//! that environment into the job step's environment, where slurmstepd (remote context)
//! reads it with `spank_getenv`. (`spank_setenv` is refused in local context and
//! `spank_job_control_setenv` does not reach the step's remote callbacks.) The same variables
//! are inherited by the batch script and by the `srun`s in it, which take them as the job's
//! defaults.
//!
//! The names start with `SLURM_` on purpose: with `--export=NONE` (or `--export=VARS`)
//! srun and sbatch still copy every variable whose name starts with `SLURM`
//! (`env_array_merge_slurm`), and nothing else. Measured on 22.05: `FERRY_*` variables
//! did not reach the step under `srun --export=NONE`; `SLURM_*` ones did.

use std::path::Path;

use ferry::container::checkpoint::CheckpointSignal;
use ferry::container::named::{self, NameFlag};
use ferry::spec::mounts::{MountSpec, MountSpecError};
use ferry::spec::unshare::Unshare;

use crate::error::PluginError;

/// The image: an absolute path, or a reference such as `docker://ubuntu:24.04`.
pub const ENV_IMAGE: &str = "SLURM_FERRY_CONTAINER_IMAGE";
/// `--container-mounts`, with relative host paths made absolute.
pub const ENV_MOUNTS: &str = "SLURM_FERRY_CONTAINER_MOUNTS";
pub const ENV_WORKDIR: &str = "SLURM_FERRY_CONTAINER_WORKDIR";
/// `--container-env`: names whose host values win over the image's.
pub const ENV_ENV: &str = "SLURM_FERRY_CONTAINER_ENV";
pub const ENV_MOUNT_HOME: &str = "SLURM_FERRY_CONTAINER_MOUNT_HOME";
pub const ENV_REMAP_ROOT: &str = "SLURM_FERRY_CONTAINER_REMAP_ROOT";
pub const ENV_WRITABLE: &str = "SLURM_FERRY_CONTAINER_WRITABLE";
pub const ENV_ENTRYPOINT: &str = "SLURM_FERRY_CONTAINER_ENTRYPOINT";
/// `--container-name`: the name, without its flag.
pub const ENV_NAME: &str = "SLURM_FERRY_CONTAINER_NAME";
/// `--container-name`'s flag (`NAME:FLAG`), when not `auto`.
pub const ENV_NAME_FLAG: &str = "SLURM_FERRY_CONTAINER_NAME_FLAG";
/// `--container-save`, made absolute.
pub const ENV_SAVE: &str = "SLURM_FERRY_CONTAINER_SAVE";

/// `--container-rootfs`.
pub const ENV_ROOTFS: &str = "SLURM_FERRY_CONTAINER_ROOTFS";

/// `--container-gpus`.
pub const ENV_GPUS: &str = "SLURM_FERRY_CONTAINER_GPUS";

/// `--container-unshare`, as the namespaces' names (`net,uts`).
pub const ENV_UNSHARE: &str = "SLURM_FERRY_CONTAINER_UNSHARE";

/// `--container-entrypoint-log`.
pub const ENV_ENTRYPOINT_LOG: &str = "SLURM_FERRY_CONTAINER_ENTRYPOINT_LOG";

/// `--container-checkpoint` and `--container-restore`, made absolute.
pub const ENV_CHECKPOINT: &str = "SLURM_FERRY_CONTAINER_CHECKPOINT";
pub const ENV_RESTORE: &str = "SLURM_FERRY_CONTAINER_RESTORE";
/// `--container-checkpoint-signal`, by name (`USR2`).
pub const ENV_CHECKPOINT_SIGNAL: &str = "SLURM_FERRY_CONTAINER_CHECKPOINT_SIGNAL";

/// Where the batch script runs (`container` or `host`): the user's `FERRY_BATCH_SCRIPT`,
/// checked and passed on by sbatch (under `--export=NONE` too).
pub const ENV_BATCH_SCRIPT: &str = "SLURM_FERRY_BATCH_SCRIPT";
/// The user's setting of where the batch script runs.
pub const USER_BATCH_SCRIPT: &str = "FERRY_BATCH_SCRIPT";

/// Every variable of the transport, for unsetting them all.
pub const ALL_ENV: &[&str] = &[
    ENV_IMAGE,
    ENV_MOUNTS,
    ENV_WORKDIR,
    ENV_ENV,
    ENV_MOUNT_HOME,
    ENV_REMAP_ROOT,
    ENV_WRITABLE,
    ENV_ENTRYPOINT,
    ENV_NAME,
    ENV_NAME_FLAG,
    ENV_SAVE,
    ENV_ROOTFS,
    ENV_GPUS,
    ENV_UNSHARE,
    ENV_ENTRYPOINT_LOG,
    ENV_CHECKPOINT,
    ENV_RESTORE,
    ENV_CHECKPOINT_SIGNAL,
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepRequest {
    /// `None`: the job's container named `name`, made by an earlier step (pyxis' reuse of a
    /// container by its name alone).
    pub image: Option<String>,
    pub mounts: Option<String>,
    pub workdir: Option<String>,
    pub env_names: Option<String>,
    pub mount_home: Option<bool>,
    pub remap_root: Option<bool>,
    pub writable: Option<bool>,
    pub entrypoint: Option<bool>,
    pub name: Option<String>,
    /// What the step asks of the container of that name (`NAME:FLAG`); `None`: `auto`.
    pub name_flag: Option<NameFlag>,
    pub save: Option<String>,
    pub rootfs: Option<String>,
    pub gpus: Option<String>,
    /// `None`: the default (the host's namespaces).
    pub unshare: Option<Unshare>,
    pub entrypoint_log: Option<bool>,
    /// `--container-checkpoint`: the directory, absolute.
    pub checkpoint: Option<String>,
    /// `--container-restore`: the directory, absolute (the step needs no image then).
    pub restore: Option<String>,
    /// `--container-checkpoint-signal`.
    pub checkpoint_signal: Option<CheckpointSignal>,
}

fn flag_text(v: Option<bool>) -> Option<String> {
    v.map(|b| if b { "1" } else { "0" }.to_string())
}

fn parse_flag(name: &str, v: Option<String>) -> Result<Option<bool>, PluginError> {
    match v.as_deref() {
        None | Some("") => Ok(None),
        Some("1") => Ok(Some(true)),
        Some("0") => Ok(Some(false)),
        Some(other) => Err(PluginError::BadFlag {
            name: name.to_string(),
            value: other.to_string(),
        }),
    }
}

impl StepRequest {
    /// The variables to set (`Some`) and to unset (`None`).
    pub fn to_env(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            (ENV_IMAGE, self.image.clone()),
            (ENV_MOUNTS, self.mounts.clone()),
            (ENV_WORKDIR, self.workdir.clone()),
            (ENV_ENV, self.env_names.clone()),
            (ENV_MOUNT_HOME, flag_text(self.mount_home)),
            (ENV_REMAP_ROOT, flag_text(self.remap_root)),
            (ENV_WRITABLE, flag_text(self.writable)),
            (ENV_ENTRYPOINT, flag_text(self.entrypoint)),
            (ENV_NAME, self.name.clone()),
            (ENV_NAME_FLAG, self.name_flag.map(|f| f.word().to_string())),
            (ENV_SAVE, self.save.clone()),
            (ENV_ROOTFS, self.rootfs.clone()),
            (ENV_GPUS, self.gpus.clone()),
            (ENV_UNSHARE, self.unshare.map(|u| u.to_string())),
            (ENV_ENTRYPOINT_LOG, flag_text(self.entrypoint_log)),
            (ENV_CHECKPOINT, self.checkpoint.clone()),
            (ENV_RESTORE, self.restore.clone()),
            (
                ENV_CHECKPOINT_SIGNAL,
                self.checkpoint_signal.map(|s| s.to_string()),
            ),
        ]
    }

    /// The request in an environment, read through `get`; `None` without an image, a
    /// container name or a checkpoint to restore.
    pub fn from_env(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<StepRequest>, PluginError> {
        let text = |name| get(name).filter(|v: &String| !v.is_empty());
        let image = text(ENV_IMAGE);
        if image.is_none() && text(ENV_NAME).is_none() && text(ENV_RESTORE).is_none() {
            return Ok(None);
        }
        Ok(Some(StepRequest {
            image,
            mounts: text(ENV_MOUNTS),
            workdir: text(ENV_WORKDIR),
            env_names: text(ENV_ENV),
            mount_home: parse_flag(ENV_MOUNT_HOME, get(ENV_MOUNT_HOME))?,
            remap_root: parse_flag(ENV_REMAP_ROOT, get(ENV_REMAP_ROOT))?,
            writable: parse_flag(ENV_WRITABLE, get(ENV_WRITABLE))?,
            entrypoint: parse_flag(ENV_ENTRYPOINT, get(ENV_ENTRYPOINT))?,
            name: text(ENV_NAME),
            name_flag: text(ENV_NAME_FLAG)
                .map(|f| f.parse::<NameFlag>())
                .transpose()
                .map_err(|error| PluginError::BadName {
                    given: get(ENV_NAME).unwrap_or_default(),
                    error,
                })?,
            save: text(ENV_SAVE),
            rootfs: text(ENV_ROOTFS),
            gpus: text(ENV_GPUS),
            unshare: text(ENV_UNSHARE)
                .map(|list| parse_unshare(&list))
                .transpose()?,
            entrypoint_log: parse_flag(ENV_ENTRYPOINT_LOG, get(ENV_ENTRYPOINT_LOG))?,
            checkpoint: text(ENV_CHECKPOINT),
            restore: text(ENV_RESTORE),
            checkpoint_signal: text(ENV_CHECKPOINT_SIGNAL).map(|s| s.parse()).transpose()?,
        }))
    }
}

/// A `--container-unshare` list, typed; unknown names are refused.
pub fn parse_unshare(list: &str) -> Result<Unshare, PluginError> {
    list.parse().map_err(|error| PluginError::Unshare {
        list: list.to_string(),
        error,
    })
}

/// Whether an image names something to fetch (`docker://…`) rather than a path.
pub fn is_reference(image: &str) -> bool {
    image.contains("://")
}

/// `image` with a relative path made absolute against `cwd`; references stay as they are.
pub fn absolute_image(image: &str, cwd: &Path) -> String {
    if is_reference(image) || image.starts_with('/') {
        image.to_string()
    } else {
        cwd.join(image).display().to_string()
    }
}

/// Check a `--container-mounts` list and make its relative host paths absolute against
/// `cwd`, keeping the `SRC:DST[:FLAGS]` text otherwise as it is.
pub fn absolute_mounts(list: &str, cwd: &Path) -> Result<String, MountSpecError> {
    MountSpec::parse_list(list, cwd)?;
    let items: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| match item.split_once(':') {
            Some((src, rest)) if !src.starts_with('/') && src != "tmpfs" => {
                format!("{}:{rest}", cwd.join(src).display())
            }
            _ => item.to_string(),
        })
        .collect();
    Ok(items.join(","))
}

/// Read a `--container-name=NAME[:FLAG]`: the name (it names a directory and a file on each
/// node) and its flag, `None` for `auto`.
pub fn parse_name(text: &str) -> Result<(String, Option<NameFlag>), PluginError> {
    let (name, flag) = named::parse(text).map_err(|error| PluginError::BadName {
        given: text.to_string(),
        error,
    })?;
    Ok((name, (flag != NameFlag::Auto).then_some(flag)))
}

/// Check a `--container-env` list of variable names; an empty name (`--container-env=`,
/// `FOO,`) is refused like pyxis does, as it is most likely a typo.
pub fn check_env_names(list: &str) -> Result<(), PluginError> {
    for name in list.split(',').map(str::trim) {
        if name.is_empty() {
            return Err(PluginError::EmptyEnvName(list.to_string()));
        }
        if !ferry::spec::env::is_valid_name(name) {
            return Err(PluginError::BadEnvName(name.to_string()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The variables `req` sets for the remote side.
    fn set_variables(req: &StepRequest) -> HashMap<&'static str, String> {
        req.to_env()
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect()
    }

    #[test]
    fn a_name_alone_travels_without_an_image() {
        let req = StepRequest {
            name: Some("work".into()),
            ..StepRequest::default()
        };
        let env = set_variables(&req);
        assert!(!env.contains_key(ENV_IMAGE));
        let back = StepRequest::from_env(|n| env.get(n).cloned()).unwrap();
        assert_eq!(back, Some(req));
        assert_eq!(StepRequest::from_env(|_| None).unwrap(), None);
    }

    #[test]
    fn checkpoint_and_restore_directories_travel() {
        let req = StepRequest {
            image: Some("/i.sqsh".into()),
            checkpoint: Some("/home/u/ck".into()),
            ..StepRequest::default()
        };
        let env = set_variables(&req);
        assert_eq!(env[ENV_CHECKPOINT], "/home/u/ck");
        assert_eq!(
            StepRequest::from_env(|n| env.get(n).cloned()).unwrap(),
            Some(req)
        );
        // A restore needs no image: the checkpoint names it.
        let req = StepRequest {
            restore: Some("/home/u/ck".into()),
            ..StepRequest::default()
        };
        let env = set_variables(&req);
        assert_eq!(
            StepRequest::from_env(|n| env.get(n).cloned()).unwrap(),
            Some(req)
        );
    }

    #[test]
    fn unshare_and_the_entrypoint_log_travel() {
        let req = StepRequest {
            image: Some("/i.sqsh".into()),
            unshare: Some(parse_unshare("uts,net").unwrap()),
            entrypoint_log: Some(true),
            ..StepRequest::default()
        };
        let env = set_variables(&req);
        assert_eq!(env[ENV_UNSHARE], "net,uts");
        let back = StepRequest::from_env(|n| env.get(n).cloned()).unwrap();
        assert_eq!(back, Some(req));
        assert_eq!(
            parse_unshare("net,pid").unwrap_err().to_string(),
            "--container-unshare=net,pid: unknown namespace \"pid\" (known: net, ipc, uts)"
        );
    }

    #[test]
    fn container_names_and_their_flags() {
        assert_eq!(parse_name("work").unwrap(), ("work".into(), None));
        assert_eq!(parse_name("work:").unwrap(), ("work".into(), None));
        assert_eq!(parse_name("work:auto").unwrap(), ("work".into(), None));
        for (flag, word) in [
            (NameFlag::Create, "create"),
            (NameFlag::Exec, "exec"),
            (NameFlag::NoExec, "no_exec"),
            (NameFlag::NoCreate, "no_create"),
        ] {
            assert_eq!(
                parse_name(&format!("w-1.x:{word}")).unwrap(),
                ("w-1.x".into(), Some(flag))
            );
        }
        assert_eq!(parse_name("42.3").unwrap(), ("42.3".into(), None));
        let long = "a".repeat(255);
        assert!(parse_name(&long).is_ok());
        for (bad, says) in [
            ("", "empty"),
            (":exec", "empty"),
            ("a/b", "`/`"),
            ("../x", "`/`"),
            (&*"a".repeat(256), "256 characters"),
            ("work:attach", "unknown flag `attach`"),
            ("work:exec:x", "unknown flag `exec:x`"),
            (".hidden", "letters"),
            ("a b", "letters"),
        ] {
            let e = parse_name(bad).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("--container-name={bad}: ")) && e.contains(says),
                "{bad:?}: {e}"
            );
        }
        // The flag travels beside the name.
        let req = StepRequest {
            name: Some("work".into()),
            name_flag: Some(NameFlag::NoExec),
            ..StepRequest::default()
        };
        let env = set_variables(&req);
        assert_eq!(env[ENV_NAME_FLAG], "no_exec");
        assert_eq!(
            StepRequest::from_env(|n| env.get(n).cloned()).unwrap(),
            Some(req)
        );
    }

    #[test]
    fn empty_variable_names_are_refused() {
        assert!(check_env_names("PATH,LD_LIBRARY_PATH").is_ok());
        for bad in ["", "FOO,", ",FOO", "FOO,,BAR", "1X"] {
            assert!(check_env_names(bad).is_err(), "{bad:?}");
        }
    }
}

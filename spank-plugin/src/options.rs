//! The plugin's command-line options: pyxis' names, registered dynamically in every context
//! (sbatch and salloc ignore a static `spank_options` table).
//!
//! There is deliberately no `--container`: Slurm >= 21.08 owns that name (a plugin option of
//! the same name is ignored and makes Slurm print `Ignoring conflicting option "container"`
//! on every srun). Its value is read in [`crate::local`].

use std::ffi::CStr;
use std::os::raw::c_int;

use ferry::slurm::srun_args::Arg;

use crate::error::PluginError;

/// What an option sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Image,
    Mounts,
    Workdir,
    Env,
    MountHome(bool),
    RemapRoot(bool),
    Writable(bool),
    Entrypoint(bool),
    Quiet,
    Name,
    Save,
    Rootfs,
    Gpus,
    Unshare,
    EntrypointLog,
    Checkpoint,
    CheckpointSignal,
    Restore,
}

pub struct OptDef {
    /// NUL-terminated, as Slurm wants it.
    pub name: &'static [u8],
    /// NUL-terminated; `None` for a flag.
    pub arginfo: Option<&'static [u8]>,
    pub usage: &'static [u8],
    pub key: Key,
}

impl OptDef {
    pub fn name(&self) -> &'static str {
        // The table below holds ASCII names with one trailing NUL.
        std::str::from_utf8(&self.name[..self.name.len() - 1]).unwrap_or("?")
    }
}

macro_rules! opt {
    ($name:literal, $arginfo:literal, $usage:literal, $key:expr) => {
        OptDef {
            name: concat!($name, "\0").as_bytes(),
            arginfo: Some(concat!($arginfo, "\0").as_bytes()),
            usage: concat!($usage, "\0").as_bytes(),
            key: $key,
        }
    };
    ($name:literal, $usage:literal, $key:expr) => {
        OptDef {
            name: concat!($name, "\0").as_bytes(),
            arginfo: None,
            usage: concat!($usage, "\0").as_bytes(),
            key: $key,
        }
    };
}

/// The options, in the order `srun --help` lists them. An option's index here is its `val`.
pub static OPTIONS: &[OptDef] = &[
    opt!(
        "container-image",
        "IMAGE",
        "[ferry] run the step in a container of IMAGE: a squashfs (.sqsh), SIF or OCI archive \
         file, a directory, or docker://REF. Same as srun's --container=IMAGE.",
        Key::Image
    ),
    opt!(
        "container-mounts",
        "SRC:DST[:FLAGS][,...]",
        "[ferry] bind host path SRC at DST inside the container; FLAGS: ro or rw (default rw). \
         A relative SRC is relative to the current directory.",
        Key::Mounts
    ),
    opt!(
        "container-workdir",
        "DIR",
        "[ferry] working directory inside the container (default: the current directory if \
         it exists there, else the image's)",
        Key::Workdir
    ),
    opt!(
        "container-mount-home",
        "[ferry] bind the user's home directory into the container (default)",
        Key::MountHome(true)
    ),
    opt!(
        "no-container-mount-home",
        "[ferry] do not bind the user's home directory into the container",
        Key::MountHome(false)
    ),
    opt!(
        "container-remap-root",
        "[ferry] be uid/gid 0 (root) inside the container; no more rights outside",
        Key::RemapRoot(true)
    ),
    opt!(
        "no-container-remap-root",
        "[ferry] keep your own uid/gid inside the container (default)",
        Key::RemapRoot(false)
    ),
    opt!(
        "container-writable",
        "[ferry] make the container's root filesystem writable (changes are discarded at \
         the end of the step and count against the step's memory)",
        Key::Writable(true)
    ),
    opt!(
        "container-readonly",
        "[ferry] keep the container's root filesystem read-only (default)",
        Key::Writable(false)
    ),
    opt!(
        "container-env",
        "NAME[,NAME...]",
        "[ferry] for these environment variables, use the host's value in the container \
         even where the image sets one",
        Key::Env
    ),
    opt!(
        "container-name",
        "NAME[:FLAG]",
        "[ferry] keep the container's changes under NAME for the later steps of the job \
         (unpacked on first use on each node; writable unless --container-readonly); a \
         step naming a container another step of the job runs joins it. FLAG: auto \
         (default), create (must not exist), exec (must run: join it), no_exec (never \
         join), no_create (must exist). A running unnamed container is JOBID.STEPID",
        Key::Name
    ),
    opt!(
        "container-save",
        "PATH",
        "[ferry] when the step ends, save the container's root filesystem (image plus \
         changes) as the squashfs image PATH",
        Key::Save
    ),
    opt!(
        "container-checkpoint",
        "DIR",
        "[ferry] make the step's container checkpointable into DIR (one node, its tasks \
         in one container with a PID namespace of its own; output via DIR): `scancel \
         --signal=USR1 JOB.STEP` saves it there and ends the step; where the site enables \
         checkpoints",
        Key::Checkpoint
    ),
    opt!(
        "container-checkpoint-signal",
        "SIGNAL",
        "[ferry] with --container-checkpoint: the signal that checkpoints the step \
         (default USR1; USR2, TERM, INT, HUP, QUIT or ALRM), for programs that use USR1",
        Key::CheckpointSignal
    ),
    opt!(
        "container-restore",
        "DIR",
        "[ferry] continue the container checkpointed into DIR (by --container-checkpoint) \
         where it stopped, on this step's node; the step's command is not run",
        Key::Restore
    ),
    opt!(
        "container-rootfs",
        "PROVIDER",
        "[ferry] how the image becomes the root filesystem: squashfuse (mounted, nothing \
         copied), unpack (unpacked once per node and reused: faster for metadata-heavy \
         work, costs disk) or auto (squashfuse until the unpack, made in the background, \
         is there); default: the site's",
        Key::Rootfs
    ),
    opt!(
        "container-gpus",
        "all|none|LIST",
        "[ferry] GPUs in the container, with the host's driver libraries and nvidia-smi: \
         all of the node's, none, or indexes (0,2); default: the step's own (--gres, \
         --gpus), unless the site says otherwise",
        Key::Gpus
    ),
    opt!(
        "container-entrypoint",
        "[ferry] run each task's command through the image's entrypoint: its Entrypoint \
         with the command as arguments (the command replaces Cmd), else enroot's /etc/rc; \
         in the image's WorkingDir unless --container-workdir",
        Key::Entrypoint(true)
    ),
    opt!(
        "no-container-entrypoint",
        "[ferry] run each task's command directly, not through the image's entrypoint \
         (default)",
        Key::Entrypoint(false)
    ),
    opt!(
        "container-entrypoint-log",
        "[ferry] with --container-entrypoint, show the entrypoint's own output too (by \
         default only the command's shows)",
        Key::EntrypointLog
    ),
    opt!(
        "container-unshare",
        "net,ipc,uts",
        "[ferry] give the step's container new namespaces of these kinds, shared by its \
         tasks on a node: net (only a loopback interface), ipc, uts (its own hostname); \
         default: the host's",
        Key::Unshare
    ),
    opt!(
        "container-quiet",
        "[ferry] show no progress while the image is imported, unpacked or saved (errors \
         still show); the same as FERRY_QUIET=1",
        Key::Quiet
    ),
];

/// The options as [`ferry::slurm::srun_args`] needs them to read srun's command line.
pub fn srun_table() -> Vec<(&'static str, Arg)> {
    OPTIONS
        .iter()
        .map(|o| {
            (
                o.name(),
                if o.arginfo.is_some() {
                    Arg::Required
                } else {
                    Arg::No
                },
            )
        })
        .collect()
}

/// The option callbacks' calls, in order: (index into [`OPTIONS`], optarg).
///
/// srun, sbatch and salloc call an option's callback for the command line *and* for
/// `SLURM_SPANK__SLURM_SPANK_OPTION_<plugin>_<option>` variables, which Slurm puts into a
/// batch job's environment for the options given to sbatch. So `sbatch --container-image=A`
/// makes every srun in the script see `--container-image=A` as if given to it. Slurm handles
/// these variables before the command line, so a call is inherited when it is the option's
/// first call and its value is the variable's (for flags the variable holds `(null)`, Slurm's
/// printing of a NULL value, while a flag on the command line comes with no value at all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OptionCalls {
    calls: Vec<(usize, Option<String>)>,
}

/// Slurm's variable for option `name` of plugin `ferry` (`_opt_env_name` in plugstack.c:
/// every character that is not alphanumeric becomes `_`).
pub fn inherited_var(name: &str) -> String {
    let canon: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("SLURM_SPANK__SLURM_SPANK_OPTION_ferry_{canon}")
}

impl OptionCalls {
    /// Record a callback's call. Errors are for the user.
    pub fn record(&mut self, index: usize, value: Option<&CStr>) -> Result<(), PluginError> {
        let def = OPTIONS
            .get(index)
            .ok_or(PluginError::UnknownOption(index))?;
        let value = match value {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| PluginError::OptionNotUtf8(def.name().to_string()))?
                    .to_string(),
            ),
        };
        if def.arginfo.is_some() && value.is_none() {
            return Err(PluginError::NeedsValue(def.name().to_string()));
        }
        self.calls.push((index, value));
        Ok(())
    }

    /// The values this command was given, and those it inherited through Slurm's variables
    /// (looked up with `env`).
    pub fn split(&self, env: impl Fn(&str) -> Option<String>) -> (OptionValues, OptionValues) {
        let mut own = OptionValues::default();
        let mut inherited = OptionValues::default();
        let mut seen = vec![false; OPTIONS.len()];
        for (index, value) in &self.calls {
            let first = !std::mem::replace(&mut seen[*index], true);
            let from_env = first
                && env(&inherited_var(OPTIONS[*index].name()))
                    .is_some_and(|v| Some(&v) == value.as_ref());
            let target = if from_env { &mut inherited } else { &mut own };
            target.set(*index, value.as_deref());
        }
        (own, inherited)
    }

    /// All values, as given (remote context: what srun forwarded).
    pub fn all(&self) -> OptionValues {
        self.split(|_| None).0
    }
}

/// Option values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OptionValues {
    pub image: Option<String>,
    pub mounts: Option<String>,
    pub workdir: Option<String>,
    pub env: Option<String>,
    pub mount_home: Option<bool>,
    pub remap_root: Option<bool>,
    pub writable: Option<bool>,
    pub entrypoint: Option<bool>,
    pub quiet: bool,
    pub name: Option<String>,
    pub save: Option<String>,
    pub rootfs: Option<String>,
    pub gpus: Option<String>,
    /// `--container-unshare`, as given: parsed where the request is resolved.
    pub unshare: Option<String>,
    pub entrypoint_log: Option<bool>,
    pub checkpoint: Option<String>,
    pub checkpoint_signal: Option<String>,
    pub restore: Option<String>,
    /// Both options of a pair (`--container-writable` and `--container-readonly`), as
    /// `(first, second)` names; the callbacks see them in different orders in srun and in
    /// slurmstepd, so giving both is refused.
    pub conflicts: Vec<(&'static str, &'static str)>,
}

impl OptionValues {
    pub fn any(&self) -> bool {
        *self != OptionValues::default()
    }

    /// Set option number `index` (< `OPTIONS.len()`) to `value` (`None` for flags).
    fn set(&mut self, index: usize, value: Option<&str>) {
        let def = &OPTIONS[index];
        let text = || value.map(str::to_string);
        match def.key {
            Key::Image => self.image = text(),
            Key::Mounts => self.mounts = text(),
            Key::Workdir => self.workdir = text(),
            Key::Env => self.env = text(),
            Key::Name => self.name = text(),
            Key::Save => self.save = text(),
            Key::Rootfs => self.rootfs = text(),
            Key::Gpus => self.gpus = text(),
            Key::Unshare => self.unshare = text(),
            Key::EntrypointLog => self.entrypoint_log = Some(true),
            Key::Checkpoint => self.checkpoint = text(),
            Key::CheckpointSignal => self.checkpoint_signal = text(),
            Key::Restore => self.restore = text(),
            Key::MountHome(on) => self.mount_home = self.flag(self.mount_home, on, def),
            Key::RemapRoot(on) => self.remap_root = self.flag(self.remap_root, on, def),
            Key::Writable(on) => self.writable = self.flag(self.writable, on, def),
            Key::Entrypoint(on) => self.entrypoint = self.flag(self.entrypoint, on, def),
            Key::Quiet => self.quiet = true,
        }
    }

    /// The new value of a flag pair set to `on` by `def`, noting a conflict with `prev`.
    fn flag(&mut self, prev: Option<bool>, on: bool, def: &OptDef) -> Option<bool> {
        if prev.is_some_and(|p| p != on) {
            let other = OPTIONS
                .iter()
                .find(|o| o.key != def.key && same_pair(o.key, def.key))
                .map(OptDef::name)
                .unwrap_or("?");
            self.conflicts.push((other, def.name()));
        }
        Some(on)
    }
}

/// The prefixes of the variables that set options: ferry's own wins over pyxis'.
pub const VARIABLE_PREFIXES: [&str; 2] = ["FERRY_CONTAINER_", "PYXIS_CONTAINER_"];

/// The options set by variables, as pyxis reads them: `PYXIS_CONTAINER_IMAGE`, `_MOUNTS`,
/// `_WORKDIR`, `_ENV`, `_NAME`, `_SAVE`, and the flags `_MOUNT_HOME`, `_REMAP_ROOT`,
/// `_UNSHARE`, and the flags `_MOUNT_HOME`, `_REMAP_ROOT`, `_WRITABLE`, `_READONLY`,
/// `_ENTRYPOINT`, `_ENTRYPOINT_LOG` as 1 or 0 (`MOUNT_HOME=0` is
/// `--no-container-mount-home`); each also as `FERRY_CONTAINER_*`, which covers ferry's own
/// options too (`_ROOTFS`, `_GPUS`, `_QUIET`). Empty variables are unset.
pub fn from_variables(env: impl Fn(&str) -> Option<String>) -> Result<OptionValues, PluginError> {
    let mut values = OptionValues::default();
    for (index, def) in OPTIONS.iter().enumerate() {
        // `no-container-*` options are the 0 of a flag's variable.
        let Some(suffix) = def.name().strip_prefix("container-") else {
            continue;
        };
        let suffix = suffix.to_ascii_uppercase().replace('-', "_");
        let Some((variable, value)) = VARIABLE_PREFIXES.iter().find_map(|prefix| {
            let variable = format!("{prefix}{suffix}");
            env(&variable)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (variable, v))
        }) else {
            continue;
        };
        if def.arginfo.is_some() {
            values.set(index, Some(&value));
            continue;
        }
        let on = match value.trim() {
            "1" | "true" | "yes" => true,
            "0" | "false" | "no" => false,
            _ => return Err(PluginError::FlagVariable { variable, value }),
        };
        if on {
            values.set(index, None);
        } else if def.key == Key::EntrypointLog {
            // No option says "off": the variable's 0 is the default, said explicitly.
            values.entrypoint_log = Some(false);
        } else if let Some(opposite) = OPTIONS
            .iter()
            .position(|o| o.key != def.key && same_pair(o.key, def.key))
        {
            values.set(opposite, None);
        }
    }
    Ok(values)
}

impl OptionValues {
    /// These values, with `defaults` for what they leave unset (the command line over the
    /// variables).
    pub fn or(&self, defaults: &OptionValues) -> OptionValues {
        let d = defaults.clone();
        OptionValues {
            image: self.image.clone().or(d.image),
            mounts: self.mounts.clone().or(d.mounts),
            workdir: self.workdir.clone().or(d.workdir),
            env: self.env.clone().or(d.env),
            mount_home: self.mount_home.or(d.mount_home),
            remap_root: self.remap_root.or(d.remap_root),
            writable: self.writable.or(d.writable),
            entrypoint: self.entrypoint.or(d.entrypoint),
            quiet: self.quiet || d.quiet,
            name: self.name.clone().or(d.name),
            save: self.save.clone().or(d.save),
            rootfs: self.rootfs.clone().or(d.rootfs),
            gpus: self.gpus.clone().or(d.gpus),
            unshare: self.unshare.clone().or(d.unshare),
            entrypoint_log: self.entrypoint_log.or(d.entrypoint_log),
            checkpoint: self.checkpoint.clone().or(d.checkpoint),
            checkpoint_signal: self.checkpoint_signal.clone().or(d.checkpoint_signal),
            restore: self.restore.clone().or(d.restore),
            conflicts: [self.conflicts.clone(), d.conflicts].concat(),
        }
    }
}

fn same_pair(a: Key, b: Key) -> bool {
    matches!(
        (a, b),
        (Key::MountHome(_), Key::MountHome(_))
            | (Key::RemapRoot(_), Key::RemapRoot(_))
            | (Key::Writable(_), Key::Writable(_))
            | (Key::Entrypoint(_), Key::Entrypoint(_))
    )
}

/// `val` of an option callback back to an index into [`OPTIONS`].
pub fn index_of(val: c_int) -> Option<usize> {
    usize::try_from(val).ok().filter(|i| *i < OPTIONS.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::ffi::CString;

    fn index(name: &str) -> usize {
        OPTIONS.iter().position(|o| o.name() == name).unwrap()
    }

    fn calls(list: &[(&str, Option<&str>)]) -> OptionCalls {
        let mut c = OptionCalls::default();
        for (name, value) in list {
            let v = value.map(|v| CString::new(v).unwrap());
            c.record(index(name), v.as_deref()).unwrap();
        }
        c
    }

    #[test]
    fn table_is_consistent() {
        assert_eq!(OPTIONS.len(), 22);
        for o in OPTIONS {
            assert_eq!(o.name.last(), Some(&0));
            assert_eq!(o.usage.last(), Some(&0));
            assert!(o.arginfo.iter().all(|a| a.last() == Some(&0)));
            assert_ne!(o.name(), "container", "Slurm owns --container");
            assert!(o.name().len() <= 64, "SPANK_OPTION_MAXLEN");
        }
        let table = srun_table();
        assert!(table.contains(&("container-image", Arg::Required)));
        assert!(table.contains(&("no-container-mount-home", Arg::No)));
        assert!(table.contains(&("container-name", Arg::Required)));
        assert!(table.contains(&("container-quiet", Arg::No)));
        assert!(table.contains(&("container-save", Arg::Required)));
        assert!(table.contains(&("container-rootfs", Arg::Required)));
        assert!(table.contains(&("container-gpus", Arg::Required)));
        assert!(table.contains(&("container-unshare", Arg::Required)));
        assert!(table.contains(&("container-entrypoint-log", Arg::No)));
    }

    #[test]
    fn values_and_flags() {
        let v = calls(&[
            ("container-image", Some("a.sqsh")),
            ("container-mounts", Some("/a:/b")),
            ("container-writable", None),
            ("no-container-mount-home", None),
        ])
        .all();
        assert_eq!(v.image.as_deref(), Some("a.sqsh"));
        assert_eq!(v.mounts.as_deref(), Some("/a:/b"));
        assert_eq!(v.writable, Some(true));
        assert_eq!(v.mount_home, Some(false));
        assert_eq!(v.remap_root, None);
        assert!(v.conflicts.is_empty());
    }

    #[test]
    fn both_of_a_pair_conflict() {
        let v = calls(&[("container-writable", None), ("container-readonly", None)]).all();
        assert_eq!(
            v.conflicts,
            vec![("container-writable", "container-readonly")]
        );
        let v = calls(&[("container-writable", None), ("container-writable", None)]).all();
        assert!(v.conflicts.is_empty());
    }

    #[test]
    fn values_need_text() {
        let mut c = OptionCalls::default();
        assert!(c.record(index("container-image"), None).is_err());
        let bad = CString::new(vec![0xffu8]).unwrap();
        assert!(c
            .record(index("container-image"), Some(&bad))
            .unwrap_err()
            .to_string()
            .contains("UTF-8"));
        assert!(c.record(99, None).is_err());
    }

    #[test]
    fn variables_set_options_as_pyxis_reads_them() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            }
        };
        let v = from_variables(vars(&[
            ("PYXIS_CONTAINER_IMAGE", "ubuntu:24.04"),
            ("FERRY_CONTAINER_IMAGE", "debian:12"),
            ("PYXIS_CONTAINER_MOUNTS", "/data:/data"),
            ("PYXIS_CONTAINER_MOUNT_HOME", "0"),
            ("PYXIS_CONTAINER_REMAP_ROOT", "1"),
            ("PYXIS_CONTAINER_READONLY", "1"),
            ("PYXIS_CONTAINER_WORKDIR", ""),
            ("FERRY_CONTAINER_QUIET", "1"),
        ]))
        .unwrap();
        assert_eq!(v.image.as_deref(), Some("debian:12"), "FERRY_ wins");
        assert_eq!(v.mounts.as_deref(), Some("/data:/data"));
        assert_eq!(v.mount_home, Some(false));
        assert_eq!(v.remap_root, Some(true));
        assert_eq!(v.writable, Some(false));
        assert_eq!(v.workdir, None, "empty is unset");
        assert!(v.quiet);
        let both = from_variables(vars(&[
            ("PYXIS_CONTAINER_WRITABLE", "1"),
            ("PYXIS_CONTAINER_READONLY", "1"),
        ]))
        .unwrap();
        assert_eq!(
            both.conflicts,
            [("container-writable", "container-readonly")]
        );
        let bad = from_variables(vars(&[("PYXIS_CONTAINER_WRITABLE", "maybe")])).unwrap_err();
        assert_eq!(
            bad.to_string(),
            "PYXIS_CONTAINER_WRITABLE=\"maybe\": write 1 or 0"
        );
        // The command line wins over the variables.
        let given = calls(&[("container-writable", None), ("container-image", Some("a"))]).all();
        let merged = given.or(&from_variables(vars(&[
            ("PYXIS_CONTAINER_READONLY", "1"),
            ("PYXIS_CONTAINER_IMAGE", "b"),
            ("PYXIS_CONTAINER_NAME", "n"),
        ]))
        .unwrap());
        assert_eq!(merged.writable, Some(true));
        assert_eq!(merged.image.as_deref(), Some("a"));
        assert_eq!(merged.name.as_deref(), Some("n"));
        // Unshare and the entrypoint's log, as pyxis spells them.
        let v = from_variables(vars(&[
            ("PYXIS_CONTAINER_UNSHARE", "net,uts"),
            ("PYXIS_CONTAINER_ENTRYPOINT_LOG", "1"),
        ]))
        .unwrap();
        assert_eq!(v.unshare.as_deref(), Some("net,uts"));
        assert_eq!(v.entrypoint_log, Some(true));
        let v = from_variables(vars(&[("FERRY_CONTAINER_ENTRYPOINT_LOG", "0")])).unwrap();
        assert_eq!(v.entrypoint_log, Some(false));
        let given = calls(&[("container-unshare", Some("ipc"))]).all();
        let merged =
            given.or(&from_variables(vars(&[("PYXIS_CONTAINER_UNSHARE", "net")])).unwrap());
        assert_eq!(merged.unshare.as_deref(), Some("ipc"));
    }

    #[test]
    fn inherited_variable_names() {
        assert_eq!(
            inherited_var("container-image"),
            "SLURM_SPANK__SLURM_SPANK_OPTION_ferry_container_image"
        );
    }

    #[test]
    fn calls_from_slurms_variables_are_inherited() {
        let env: HashMap<String, String> = [
            (inherited_var("container-image"), "a.sqsh".to_string()),
            (inherited_var("container-writable"), "(null)".to_string()),
        ]
        .into_iter()
        .collect();
        let get = |n: &str| env.get(n).cloned();
        // sbatch --container-image=a.sqsh --container-writable, then in the script:
        // srun --container-image=b.sqsh --container-readonly
        let c = calls(&[
            ("container-image", Some("a.sqsh")),
            ("container-writable", Some("(null)")),
            ("container-image", Some("b.sqsh")),
            ("container-readonly", None),
        ]);
        let (own, inherited) = c.split(get);
        assert_eq!(inherited.image.as_deref(), Some("a.sqsh"));
        assert_eq!(inherited.writable, Some(true));
        assert_eq!(own.image.as_deref(), Some("b.sqsh"));
        assert_eq!(own.writable, Some(false));
        assert!(own.conflicts.is_empty() && inherited.conflicts.is_empty());
        // The same value again on the command line is a second call: the command's own.
        let (own, _) = calls(&[
            ("container-image", Some("a.sqsh")),
            ("container-image", Some("a.sqsh")),
        ])
        .split(get);
        assert_eq!(own.image.as_deref(), Some("a.sqsh"));
        // Nothing inherited: all own.
        let (own, inherited) = calls(&[("container-image", Some("a.sqsh"))]).split(|_| None);
        assert_eq!(own.image.as_deref(), Some("a.sqsh"));
        assert!(!inherited.any());
    }
}

//! Site settings of the SPANK plugin: the `key=value` words after the plugin's path in
//! `plugstack.conf`, e.g.
//!
//! ```text
//! required /usr/lib/slurm/spank_ferry.so ferry_bin=/usr/local/bin/ferry default_mounts=/etc/slurm:/etc/slurm:ro
//! ```
//!
//! Only an admin controls these: the plugin never takes them from the job's environment or
//! options.

use std::path::{Path, PathBuf};

use crate::image::registry::settings::ImportSettings;
use crate::spec::mounts::{MountSpec, MountSpecError};
use crate::spec::{ContainerCli, DefaultWorkdir, Provider, SiteSettings};

/// Where the `ferry` program is when plugstack.conf does not say.
pub const DEFAULT_FERRY_BIN: &str = "/usr/local/bin/ferry";

/// How much the plugin logs (through Slurm's own log, which filters again by its level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn parse(word: &str) -> Option<LogLevel> {
        Some(match word.to_ascii_lowercase().as_str() {
            "error" | "quiet" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" | "verbose" => LogLevel::Debug,
            "trace" | "debug2" | "debug3" => LogLevel::Trace,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSettings {
    /// `ferry_bin=`: the `ferry` program the plugin runs as the holder (`ferry hold`).
    pub ferry_bin: PathBuf,
    /// `default_mounts=SRC:DST[:FLAGS][,...]`: bind mounts every container gets, before the
    /// user's `--container-mounts`. May be given more than once; the lists add up.
    pub default_mounts: Vec<MountSpec>,
    /// `squashfuse=`: the squashfuse program (default: `squashfuse_ll`, then `squashfuse`).
    pub squashfuse: Option<PathBuf>,
    /// `writable_tmpfs_size=`: size limit of the tmpfs holding a writable container's changes.
    pub writable_tmpfs_size: Option<String>,
    /// `named_dir=`: where each user's unpacked containers (`--container-name`,
    /// `--container-save`) go on a node, as `ferry-UID/jobJOBID/NAME` (default `/tmp`).
    pub named_dir: PathBuf,
    /// `log_level=error|warn|info|debug|trace` (default `debug`: Slurm's level decides).
    pub log_level: LogLevel,
    /// `registry_ca_file=`: PEM CA certificates trusted for registries besides the system's
    /// (a site registry with a private CA).
    pub registry_ca_file: Option<PathBuf>,
    /// `insecure_registries=HOST[:PORT][,...]`: registries reached over plain http. May be
    /// given more than once; the lists add up.
    pub insecure_registries: Vec<String>,
    /// `registries_conf=`: the site's registries file (mirrors and pull-through caches, see
    /// [`crate::image::registry::mirrors`]), tried before the user's own file.
    pub registries_conf: Option<PathBuf>,
    /// `rootfs=squashfuse|unpack|kernel|auto`: the root filesystem provider of steps that do not
    /// choose one with `--container-rootfs` (default `auto`; `kernel` only with
    /// `kernel_squashfs=yes`).
    pub rootfs: Provider,
    /// `kernel_squashfs=yes|no`: allow the `kernel` provider, where slurmstepd (root) mounts
    /// the image with the kernel's squashfs driver (default `no`: the driver then never
    /// parses a user's image).
    pub kernel_squashfs: bool,
    /// `import_on_submit=yes|no`: srun, sbatch and salloc import registry and archive
    /// images into the user's cache before the job or step starts (default `no`). For a
    /// cache on a shared file system: one import on the submit host instead of one wait
    /// per node, and nodes that need no registry access.
    pub import_on_submit: bool,
    /// `gpus=auto|all|none`: the GPUs of steps that do not choose with `--container-gpus`
    /// (default `auto`: the step's own, from Slurm's gres).
    pub gpus: GpuDefault,
    /// `host_libs=ITEM[,...]`: host libraries every container gets, registered with the
    /// image's loader (absolute directories or files, or loader-cache names such as
    /// `libibverbs.so.1` or `libmlx5.so*`). May be given more than once; the lists add up.
    pub host_libs: Vec<String>,
    /// `nvidia_container_cli=PATH|no`: list the GPU driver's files with this program
    /// (default: `nvidia-container-cli` when installed in /usr/bin or the like; `no`: never).
    pub nvidia_container_cli: ContainerCli,
    /// `container_scope=job|global`: whether a named container (`--container-name`) lives
    /// for its job (removed by the job epilog; the default) or for every later job of the
    /// user on the node (pyxis' setting of the same name).
    pub container_scope: ContainerScope,
    /// `writable=yes|no`: whether containers' root filesystems are writable when a step
    /// does not say (`--container-writable`, `--container-readonly`); default `no`. enroot
    /// sites usually run writable containers (`ENROOT_ROOTFS_WRITABLE`).
    pub writable: bool,
    /// `framework_env=yes|no`: set PyTorch's rendezvous variables (RANK, WORLD_SIZE,
    /// MASTER_ADDR, …: [`crate::slurm::framework_env`]) in every container task; default `yes`.
    pub framework_env: bool,
    /// `framework_ports=LOW-HIGH`: where `MASTER_PORT` is chosen from.
    pub framework_ports: std::ops::RangeInclusive<u16>,
    /// `quiet=yes|no`: steps show no import, unpack or save progress on the user's terminal
    /// unless they ask (default `no`); errors always show.
    pub quiet: bool,
    /// `default_workdir=caller|image`: where tasks start without `--container-workdir`:
    /// srun's directory when the container has it (default), or the image's WorkingDir
    /// first, as pyxis does.
    pub default_workdir: DefaultWorkdir,
    /// `batch_script=container|host`: where a batch job's script runs when the job asks
    /// for a container (`sbatch --container-image`): in it, with Slurm's commands forwarded
    /// to the host (the default), or on the host, its steps in the container (ferry's
    /// behaviour before). A user chooses with `FERRY_BATCH_SCRIPT`.
    pub batch_script: BatchScript,
    /// `forwarder=PATH`: the static `ferry-forward` program bound into batch scripts'
    /// containers as `srun`, `squeue`… (default: `../libexec/ferry/ferry-forward` beside
    /// `ferry_bin`).
    pub forwarder: Option<PathBuf>,
    /// `forward_commands=yes|no`: Slurm's commands (`srun`, `squeue`, `scontrol`…) work in
    /// every container step too, forwarded to the host as in the batch script's container
    /// (default `yes`). `no` leaves steps with the image's own commands, or none; the batch
    /// script's container keeps its forwarders (`batch_script=host` is the way out there).
    pub forward_commands: bool,
}

/// Where a containerized batch job's script runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchScript {
    #[default]
    Container,
    Host,
}

impl BatchScript {
    pub fn parse(word: &str) -> Option<BatchScript> {
        match word {
            "container" => Some(BatchScript::Container),
            "host" => Some(BatchScript::Host),
            _ => None,
        }
    }
}

/// How long named containers live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContainerScope {
    #[default]
    Job,
    Global,
}

/// The site's default for a step's GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuDefault {
    /// The GPUs Slurm gave the step.
    #[default]
    Auto,
    /// Every GPU of the node.
    All,
    /// None, unless the step asks.
    None,
}

impl Default for PluginSettings {
    fn default() -> Self {
        PluginSettings {
            ferry_bin: PathBuf::from(DEFAULT_FERRY_BIN),
            default_mounts: Vec::new(),
            squashfuse: None,
            writable_tmpfs_size: None,
            log_level: LogLevel::Debug,
            named_dir: PathBuf::from("/tmp"),
            registry_ca_file: None,
            insecure_registries: Vec::new(),
            registries_conf: None,
            rootfs: Provider::Auto,
            kernel_squashfs: false,
            import_on_submit: false,
            gpus: GpuDefault::Auto,
            host_libs: Vec::new(),
            nvidia_container_cli: ContainerCli::Auto,
            container_scope: ContainerScope::Job,
            writable: false,
            framework_env: true,
            framework_ports: crate::slurm::framework_env::DEFAULT_PORTS,
            quiet: false,
            default_workdir: DefaultWorkdir::Caller,
            batch_script: BatchScript::Container,
            forwarder: None,
            forward_commands: true,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SiteError {
    #[error("plugstack.conf argument `{0}` is not key=value (known keys: {KEYS})")]
    NotKeyValue(String),
    #[error("plugstack.conf argument `{key}=`: unknown key (known keys: {KEYS})")]
    UnknownKey { key: String },
    #[error("plugstack.conf argument `{key}=` is given twice")]
    Duplicate { key: String },
    #[error("plugstack.conf argument `{key}=` needs a value")]
    Empty { key: String },
    #[error("plugstack.conf argument `{key}={value}`: the path must be absolute")]
    RelativePath { key: String, value: String },
    #[error("plugstack.conf argument `log_level={0}`: use error, warn, info, debug or trace")]
    LogLevel(String),
    #[error("plugstack.conf argument `default_mounts=`: {0}")]
    Mount(MountSpecError),
    #[error("plugstack.conf argument `default_mounts=`: the host path `{0}` must be absolute")]
    RelativeMountSource(String),
    #[error("plugstack.conf argument `insecure_registries=`: `{0}` is not HOST or HOST:PORT")]
    BadRegistry(String),
    #[error("plugstack.conf argument `rootfs={0}`: use auto, squashfuse, unpack or kernel")]
    Rootfs(String),
    #[error("plugstack.conf argument `rootfs=kernel` needs `kernel_squashfs=yes` as well (the admin's choice to let the kernel's squashfs driver, as root, read users' images)")]
    KernelNotEnabled,
    #[error("plugstack.conf argument `gpus={0}`: use auto, all or none")]
    Gpus(String),
    #[error("plugstack.conf argument `container_scope={0}`: use job or global")]
    Scope(String),
    #[error(
        "plugstack.conf argument `host_libs=`: `{0}` is not an absolute path or a library name"
    )]
    HostLib(String),
    #[error("plugstack.conf argument `framework_ports=`: {0}")]
    Ports(String),
    #[error("plugstack.conf argument `default_workdir={0}`: use caller or image")]
    DefaultWorkdir(String),
    #[error("plugstack.conf argument `{key}={value}`: use yes or no")]
    YesNo { key: String, value: String },
    #[error("plugstack.conf argument `batch_script={0}`: use container or host")]
    BatchScript(String),
}

const KEYS: &str =
    "ferry_bin, default_mounts, squashfuse, writable_tmpfs_size, log_level, named_dir, \
registry_ca_file, insecure_registries, registries_conf, rootfs, kernel_squashfs, import_on_submit, gpus, host_libs, nvidia_container_cli, container_scope, writable, \
framework_env, framework_ports, quiet, default_workdir, batch_script, forwarder, forward_commands";

/// Keys that may be repeated, their values adding up.
const LIST_KEYS: &[&str] = &["default_mounts", "insecure_registries", "host_libs"];

fn absolute(key: &str, value: &str) -> Result<PathBuf, SiteError> {
    if value.is_empty() {
        return Err(SiteError::Empty {
            key: key.to_string(),
        });
    }
    if !value.starts_with('/') {
        return Err(SiteError::RelativePath {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
    Ok(PathBuf::from(value))
}

fn yes_no(key: &str, value: &str) -> Result<bool, SiteError> {
    match value {
        "yes" | "true" | "1" => Ok(true),
        "no" | "false" | "0" => Ok(false),
        _ => Err(SiteError::YesNo {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

impl PluginSettings {
    /// The `ferry-forward` program: `forwarder=`, else `../libexec/ferry/ferry-forward`
    /// beside the real `ferry_bin` (symbolic links followed), where `make install` and the
    /// packages put it.
    pub fn forwarder_path(&self) -> PathBuf {
        if let Some(path) = &self.forwarder {
            return path.clone();
        }
        let bin = std::fs::canonicalize(&self.ferry_bin).unwrap_or_else(|_| self.ferry_bin.clone());
        let prefix = bin
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/"));
        prefix.join("libexec/ferry/ferry-forward")
    }

    /// Parse the plugin's plugstack.conf arguments. Unknown keys and bad values are errors, so
    /// that a typo shows up instead of silently running with a default.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<PluginSettings, SiteError> {
        let mut s = PluginSettings::default();
        let mut seen: Vec<&str> = Vec::new();
        for arg in args {
            let arg = arg.as_ref().trim();
            if arg.is_empty() {
                continue;
            }
            let (key, value) = arg
                .split_once('=')
                .ok_or_else(|| SiteError::NotKeyValue(arg.to_string()))?;
            let key = key.trim();
            let value = value.trim();
            if !LIST_KEYS.contains(&key) {
                if seen.contains(&key) {
                    return Err(SiteError::Duplicate {
                        key: key.to_string(),
                    });
                }
                seen.push(key);
            }
            match key {
                "ferry_bin" => s.ferry_bin = absolute(key, value)?,
                "squashfuse" => s.squashfuse = Some(absolute(key, value)?),
                "named_dir" => s.named_dir = absolute(key, value)?,
                "writable_tmpfs_size" => {
                    if value.is_empty() {
                        return Err(SiteError::Empty {
                            key: key.to_string(),
                        });
                    }
                    s.writable_tmpfs_size = Some(value.to_string());
                }
                "log_level" => {
                    s.log_level = LogLevel::parse(value)
                        .ok_or_else(|| SiteError::LogLevel(value.to_string()))?
                }
                "registry_ca_file" => s.registry_ca_file = Some(absolute(key, value)?),
                "registries_conf" => s.registries_conf = Some(absolute(key, value)?),
                "import_on_submit" => s.import_on_submit = yes_no(key, value)?,
                "quiet" => s.quiet = yes_no(key, value)?,
                "default_workdir" => {
                    s.default_workdir = match value {
                        "caller" => DefaultWorkdir::Caller,
                        "image" => DefaultWorkdir::Image,
                        _ => return Err(SiteError::DefaultWorkdir(value.to_string())),
                    }
                }
                "kernel_squashfs" => s.kernel_squashfs = yes_no(key, value)?,
                "batch_script" => {
                    s.batch_script = BatchScript::parse(value)
                        .ok_or_else(|| SiteError::BatchScript(value.to_string()))?
                }
                "forwarder" => s.forwarder = Some(absolute(key, value)?),
                "writable" => s.writable = yes_no(key, value)?,
                "framework_env" => s.framework_env = yes_no(key, value)?,
                "forward_commands" => s.forward_commands = yes_no(key, value)?,
                "framework_ports" => {
                    s.framework_ports = crate::slurm::framework_env::parse_port_range(value)
                        .map_err(|e| SiteError::Ports(e.to_string()))?
                }
                "gpus" => {
                    s.gpus = match value {
                        "auto" => GpuDefault::Auto,
                        "all" => GpuDefault::All,
                        "none" => GpuDefault::None,
                        _ => return Err(SiteError::Gpus(value.to_string())),
                    }
                }
                "host_libs" => {
                    for item in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                        let ok = item.starts_with('/')
                            || (!item.contains('/') && item.starts_with("lib"));
                        if !ok {
                            return Err(SiteError::HostLib(item.to_string()));
                        }
                        s.host_libs.push(item.to_string());
                    }
                }
                "container_scope" => {
                    s.container_scope = match value {
                        "job" => ContainerScope::Job,
                        "global" => ContainerScope::Global,
                        _ => return Err(SiteError::Scope(value.to_string())),
                    }
                }
                "nvidia_container_cli" => {
                    s.nvidia_container_cli = match value {
                        "no" | "none" => ContainerCli::Off,
                        _ => ContainerCli::Path(absolute(key, value)?),
                    }
                }
                "rootfs" => {
                    s.rootfs = value
                        .parse()
                        .map_err(|_| SiteError::Rootfs(value.to_string()))?
                }
                "insecure_registries" => {
                    for host in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                        let ok = host
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
                        if !ok {
                            return Err(SiteError::BadRegistry(host.to_string()));
                        }
                        s.insecure_registries.push(host.to_string());
                    }
                }
                "default_mounts" => {
                    for spec in value.split(',').filter(|v| !v.trim().is_empty()) {
                        let source = spec.trim().split(':').next().unwrap_or("");
                        if !source.starts_with('/') {
                            return Err(SiteError::RelativeMountSource(source.to_string()));
                        }
                        s.default_mounts.push(
                            MountSpec::parse(spec, Path::new("/")).map_err(SiteError::Mount)?,
                        );
                    }
                }
                _ => {
                    return Err(SiteError::UnknownKey {
                        key: key.to_string(),
                    })
                }
            }
        }
        if s.rootfs == Provider::Kernel && !s.kernel_squashfs {
            return Err(SiteError::KernelNotEnabled);
        }
        Ok(s)
    }

    /// The part of these settings that `ferry import` takes (see [`ImportSettings`]).
    pub fn import_settings(&self) -> ImportSettings {
        ImportSettings {
            insecure_registries: self.insecure_registries.clone(),
            ca_file: self.registry_ca_file.clone(),
            registries_conf: self.registries_conf.clone(),
            ..ImportSettings::default()
        }
    }

    /// The part of these settings that goes into a [`crate::spec::ContainerSpec`].
    pub fn site_settings(&self) -> SiteSettings {
        SiteSettings {
            squashfuse: self.squashfuse.clone(),
            writable_tmpfs_size: self.writable_tmpfs_size.clone(),
            host_libs: self.host_libs.clone(),
            nvidia_container_cli: self.nvidia_container_cli.clone(),
            default_workdir: self.default_workdir,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<PluginSettings, SiteError> {
        PluginSettings::parse(args)
    }

    #[test]
    fn batch_script_and_forwarder() {
        let d = parse(&[]).unwrap();
        assert_eq!(d.batch_script, BatchScript::Container);
        assert_eq!(d.forwarder, None);
        assert!(d.forward_commands);
        assert!(!parse(&["forward_commands=no"]).unwrap().forward_commands);
        assert!(parse(&["forward_commands=maybe"]).is_err());
        let s = parse(&["batch_script=host", "forwarder=/opt/ferry-forward"]).unwrap();
        assert_eq!(s.batch_script, BatchScript::Host);
        assert_eq!(s.forwarder, Some(PathBuf::from("/opt/ferry-forward")));
        assert_eq!(
            parse(&["batch_script=login"]),
            Err(SiteError::BatchScript("login".into()))
        );
        assert!(parse(&["forwarder=bin/ferry-forward"]).is_err());
        assert_eq!(s.forwarder_path(), PathBuf::from("/opt/ferry-forward"));
        let d = parse(&["ferry_bin=/nonexistent/prefix/bin/ferry"]).unwrap();
        assert_eq!(
            d.forwarder_path(),
            PathBuf::from("/nonexistent/prefix/libexec/ferry/ferry-forward")
        );
    }

    #[test]
    fn framework_settings() {
        let d = parse(&[]).unwrap();
        assert!(d.framework_env);
        assert_eq!(
            d.framework_ports,
            crate::slurm::framework_env::DEFAULT_PORTS
        );
        let s = parse(&["framework_env=no", "framework_ports=40000-40999"]).unwrap();
        assert!(!s.framework_env);
        assert_eq!(s.framework_ports, 40000..=40999);
        let e = parse(&["framework_ports=80"]).unwrap_err().to_string();
        assert!(
            e.starts_with("plugstack.conf argument `framework_ports=`: port range `80`"),
            "{e}"
        );
    }

    #[test]
    fn defaults() {
        let s = parse(&[]).unwrap();
        assert_eq!(s, PluginSettings::default());
        assert_eq!(s.ferry_bin, PathBuf::from("/usr/local/bin/ferry"));
        assert_eq!(s.log_level, LogLevel::Debug);
        assert_eq!(s.site_settings(), SiteSettings::default());
    }

    #[test]
    fn all_keys() {
        let s = parse(&[
            "ferry_bin=/opt/ferry/bin/ferry",
            "default_mounts=/etc/slurm:/etc/slurm:ro,/scratch",
            "squashfuse=/usr/bin/squashfuse_ll",
            "writable_tmpfs_size=50%",
            "log_level=info",
            "named_dir=/local/ferry",
            "registry_ca_file=/etc/ssl/site-ca.pem",
            "insecure_registries=registry.site:5000, 10.0.0.1",
            "insecure_registries=localhost:5000",
            "gpus=none",
            "host_libs=/opt/mpi/lib,libibverbs.so.1",
            "host_libs=libmlx5.so*",
            "nvidia_container_cli=/usr/bin/nvidia-container-cli",
            "default_workdir=image",
        ])
        .unwrap();
        assert_eq!(s.site_settings().default_workdir, DefaultWorkdir::Image);
        assert!(parse(&["default_workdir=home"])
            .unwrap_err()
            .to_string()
            .contains("use caller or image"));
        assert_eq!(s.gpus, GpuDefault::None);
        assert_eq!(
            s.host_libs,
            ["/opt/mpi/lib", "libibverbs.so.1", "libmlx5.so*"]
        );
        assert_eq!(
            s.nvidia_container_cli,
            ContainerCli::Path("/usr/bin/nvidia-container-cli".into())
        );
        assert_eq!(
            parse(&["nvidia_container_cli=no"])
                .unwrap()
                .nvidia_container_cli,
            ContainerCli::Off
        );
        assert_eq!(
            s.registry_ca_file,
            Some(PathBuf::from("/etc/ssl/site-ca.pem"))
        );
        assert_eq!(
            s.insecure_registries,
            ["registry.site:5000", "10.0.0.1", "localhost:5000"]
        );
        assert_eq!(s.ferry_bin, PathBuf::from("/opt/ferry/bin/ferry"));
        assert_eq!(s.default_mounts.len(), 2);
        assert_eq!(s.default_mounts[0].source, PathBuf::from("/etc/slurm"));
        assert!(s.default_mounts[0].read_only);
        assert_eq!(s.default_mounts[1].target, PathBuf::from("/scratch"));
        assert_eq!(s.squashfuse, Some(PathBuf::from("/usr/bin/squashfuse_ll")));
        assert_eq!(s.log_level, LogLevel::Info);
        assert_eq!(s.named_dir, PathBuf::from("/local/ferry"));
        let site = s.site_settings();
        assert_eq!(site.writable_tmpfs_size.as_deref(), Some("50%"));
    }

    #[test]
    fn default_mounts_add_up_and_may_be_empty() {
        let s = parse(&[
            "default_mounts=/a",
            "default_mounts=/b:/c",
            "default_mounts=",
        ])
        .unwrap();
        let targets: Vec<_> = s.default_mounts.iter().map(|m| m.target.clone()).collect();
        assert_eq!(targets, [PathBuf::from("/a"), PathBuf::from("/c")]);
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            parse(&["ferry_bin"]),
            Err(SiteError::NotKeyValue("ferry_bin".into()))
        );
        assert_eq!(
            parse(&["runtimedir=/x"]),
            Err(SiteError::UnknownKey {
                key: "runtimedir".into()
            })
        );
        assert_eq!(
            parse(&["ferry_bin=ferry"]),
            Err(SiteError::RelativePath {
                key: "ferry_bin".into(),
                value: "ferry".into()
            })
        );
        assert_eq!(
            parse(&["squashfuse="]),
            Err(SiteError::Empty {
                key: "squashfuse".into()
            })
        );
        assert_eq!(
            parse(&["log_level=loud"]),
            Err(SiteError::LogLevel("loud".into()))
        );
        assert_eq!(
            parse(&["log_level=info", "log_level=debug"]),
            Err(SiteError::Duplicate {
                key: "log_level".into()
            })
        );
        assert_eq!(
            parse(&["default_mounts=data:/data"]),
            Err(SiteError::RelativeMountSource("data".into()))
        );
        assert!(matches!(
            parse(&["default_mounts=/a:b"]),
            Err(SiteError::Mount(_))
        ));
        assert_eq!(
            parse(&["insecure_registries=http://x"]),
            Err(SiteError::BadRegistry("http://x".into()))
        );
        assert!(matches!(
            parse(&["registry_ca_file=ca.pem"]),
            Err(SiteError::RelativePath { .. })
        ));
        assert_eq!(parse(&["gpus=some"]), Err(SiteError::Gpus("some".into())));
        assert_eq!(
            parse(&["container_scope=node"]),
            Err(SiteError::Scope("node".into()))
        );
        assert_eq!(
            parse(&["container_scope=global"]).unwrap().container_scope,
            ContainerScope::Global
        );
        assert_eq!(
            parse(&["host_libs=lib/x.so"]),
            Err(SiteError::HostLib("lib/x.so".into()))
        );
        let msg = parse(&["ferrybin=/x"]).unwrap_err().to_string();
        assert!(msg.contains("ferry_bin"), "{msg}");
    }

    #[test]
    fn the_kernel_provider_is_the_admins_choice() {
        assert!(!parse(&[]).unwrap().kernel_squashfs);
        let s = parse(&["kernel_squashfs=yes"]).unwrap();
        assert!(s.kernel_squashfs);
        assert_eq!(s.rootfs, Provider::Auto);
        // As the site default too, in either order, but never without the key.
        let s = parse(&["rootfs=kernel", "kernel_squashfs=yes"]).unwrap();
        assert_eq!((s.rootfs, s.kernel_squashfs), (Provider::Kernel, true));
        assert_eq!(parse(&["rootfs=kernel"]), Err(SiteError::KernelNotEnabled));
        assert_eq!(
            parse(&["rootfs=kernel", "kernel_squashfs=no"]),
            Err(SiteError::KernelNotEnabled)
        );
        assert!(!parse(&[]).unwrap().writable);
        assert!(parse(&["writable=yes"]).unwrap().writable);
        assert!(matches!(
            parse(&["writable=sometimes"]),
            Err(SiteError::YesNo { .. })
        ));
        assert_eq!(
            parse(&["kernel_squashfs=maybe"]),
            Err(SiteError::YesNo {
                key: "kernel_squashfs".into(),
                value: "maybe".into()
            })
        );
        assert_eq!(
            parse(&["rootfs=fancy"]),
            Err(SiteError::Rootfs("fancy".into()))
        );
    }

    #[test]
    fn log_levels() {
        assert_eq!(LogLevel::parse("ERROR"), Some(LogLevel::Error));
        assert_eq!(LogLevel::parse("verbose"), Some(LogLevel::Debug));
        assert_eq!(LogLevel::parse("debug3"), Some(LogLevel::Trace));
        assert!(LogLevel::Error < LogLevel::Info);
    }
}

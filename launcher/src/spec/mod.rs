//! What a container is, as plain data: the spec the holder builds one from (the CLI and the
//! SPANK plugin both fill one and hand it, as JSON, to `ferry hold`; nothing else crosses
//! from the caller to the holder), and its parts: the user it is for, bind mounts, GPUs,
//! the environment and the start command.

pub mod entrypoint;
pub mod env;
pub mod gpus;
pub mod mounts;
pub mod unshare;
pub mod user;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::gpus::GpuRequest;
use crate::spec::mounts::MountSpec;
use crate::spec::user::UserInfo;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Absolute path of the image: a squashfs or SIF file, or a directory holding a root
    /// filesystem.
    pub image: PathBuf,
    /// Put a tmpfs-backed overlay on top of the image so the root filesystem is writable.
    #[serde(default)]
    pub writable: bool,
    /// Map the user to uid/gid 0 inside instead of keeping their own ids.
    #[serde(default)]
    pub remap_root: bool,
    /// Bind the user's home directory inside: at its own path, or at `/root` when the user
    /// is root inside (`remap_root`), as enroot and pyxis do.
    #[serde(default = "default_true")]
    pub mount_home: bool,
    /// The home directory to bind: the caller's `$HOME` when set (pyxis mounts that one),
    /// else the user's home from the password database.
    #[serde(default)]
    pub home: Option<PathBuf>,
    /// Extra bind mounts, in order.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// Working directory asked for explicitly (`--workdir`).
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// The caller's working directory, kept inside when it exists there.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// `NAME=VALUE` pairs asked for explicitly; they win over the image's values.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The caller's locale variables (LANG, LC_*) not asked for explicitly: those the
    /// image cannot honour are replaced by the C locale.
    #[serde(default)]
    pub caller_locale: Vec<(String, String)>,
    /// A directory of the user's holding an unpacked, writable copy of the image that
    /// outlives the step (named containers, `--container-save`): unpacked on first use,
    /// reused after. `None`: the image is mounted as it is.
    #[serde(default)]
    pub unpacked: Option<UnpackedDir>,
    /// With `writable`: a directory of the user's whose `upper` and `work` hold the
    /// overlay's upper layer on disk instead of a tmpfs, so that the writes outlive the
    /// container (`ferry build`'s RUN over its mounted base).
    #[serde(default)]
    pub overlay_layer: Option<PathBuf>,
    /// How a squashfs or SIF image becomes the root filesystem.
    #[serde(default)]
    pub rootfs: RootfsProvider,
    /// Run the image's own start command (Entrypoint, or enroot's /etc/rc) with the
    /// command as its arguments, in the image's WorkingDir unless `workdir` says otherwise.
    #[serde(default)]
    pub entrypoint: bool,
    /// GPUs the container gets: their device nodes (the host's other NVIDIA nodes are
    /// hidden), and the host's driver libraries and tools.
    #[serde(default)]
    pub gpus: GpuRequest,
    /// Namespaces of its own besides user and mount (network, IPC, UTS); default: the host's.
    #[serde(default)]
    pub unshare: unshare::Unshare,
    /// The user the container is for (who runs the holder).
    pub user: UserInfo,
    /// Site overrides of helper programs and limits.
    #[serde(default)]
    pub site: SiteSettings,
    /// Where the holder says, while it runs, that it runs (so that another step of the job
    /// can attach to the container); `None`: nowhere.
    #[serde(default)]
    pub running_record: Option<RunningRecordPlace>,
}

/// How a squashfs or SIF image becomes the container's root filesystem. Directory images
/// are used as they are under each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RootfsProvider {
    /// Mounted with squashfuse in the user's namespace: nothing is copied, start cost does
    /// not depend on image size, reads go through FUSE.
    #[default]
    Squashfuse,
    /// Unpacked once into `dir` (reused by later containers, read-only to them), then
    /// bound: no FUSE on the read path, for metadata-heavy work; costs disk and a first
    /// unpack. `owned_from` down must be the user's own directories.
    Unpack {
        owned_from: PathBuf,
        dir: PathBuf,
        #[serde(default)]
        first_use: FirstUse,
    },
    /// Mounted by the kernel's squashfs driver, read-only, nosuid, nodev, by root before the
    /// holder starts (the `kernel` provider): no FUSE, no copy. Only where the site enables
    /// it, or for `ferry run` as root.
    Kernel,
}

/// What the `unpack` provider does when the image has no tree yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FirstUse {
    /// Unpack it, then start (`unpack`): the first start costs the unpack.
    #[default]
    Wait,
    /// Start on squashfuse at once and unpack it in the background for the containers
    /// after (`auto`): no start waits for an unpack. The unpack goes on after the container
    /// (`ferry run`).
    Mount,
    /// [`FirstUse::Mount`], but the unpack ends with the container: a Slurm step's, which
    /// must leave nothing running on a node its job may no longer have. A start that finds
    /// an unpack cut short that way unpacks in the foreground, once, so that steps shorter
    /// than the unpack still get the tree.
    MountWhileRunning,
}

/// A root filesystem provider by the name users and admins write (`--rootfs`,
/// `--container-rootfs`, `rootfs=`); every such name is parsed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Provider {
    Squashfuse,
    Unpack,
    Kernel,
    // `unpack` without the wait (`FirstUse::Mount`), and only where a tree costs local disk,
    // not memory or a shared file system's space (`unpacked::room_for_tree`). The default:
    // the host's speed from a node's second start of an image on, at no start's expense.
    /// squashfuse at once, the unpacked tree once a background unpack made it
    #[default]
    Auto,
}

impl Provider {
    pub const ALL: [Provider; 4] = [
        Provider::Squashfuse,
        Provider::Unpack,
        Provider::Kernel,
        Provider::Auto,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Provider::Squashfuse => "squashfuse",
            Provider::Unpack => "unpack",
            Provider::Kernel => "kernel",
            Provider::Auto => "auto",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A provider name that is none of [`Provider::ALL`]; callers put the option in front.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown provider (known: {})", Provider::ALL.map(Provider::name).join(", "))]
pub struct UnknownProvider(pub String);

impl std::str::FromStr for Provider {
    type Err = UnknownProvider;

    fn from_str(text: &str) -> Result<Provider, UnknownProvider> {
        Provider::ALL
            .into_iter()
            .find(|p| p.name() == text)
            .ok_or_else(|| UnknownProvider(text.to_string()))
    }
}

/// Where an unpacked container lives: `dir`, made private to the user from `owned_from` down.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnpackedDir {
    pub owned_from: PathBuf,
    pub dir: PathBuf,
}

/// Where and as what a holder records itself while it runs (see
/// [`crate::container::named`]): the file `dir/name`, `dir` made private to the user from
/// `owned_from` down.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunningRecordPlace {
    pub owned_from: PathBuf,
    pub dir: PathBuf,
    /// The container's name: its `--container-name`, or `JOBID.STEPID` for an unnamed one.
    pub name: String,
    pub job: u32,
    pub step: String,
}

/// Settings an admin controls; users cannot change them through the spec in the plugin
/// (the plugin fills them from plugstack arguments, never from the job's environment).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SiteSettings {
    /// squashfuse program to use; default: `squashfuse_ll`, then `squashfuse`, from PATH.
    #[serde(default)]
    pub squashfuse: Option<PathBuf>,
    /// Size limit of the tmpfs that holds writes to a writable container (e.g. "50%", "4g").
    #[serde(default)]
    pub writable_tmpfs_size: Option<String>,
    /// Host libraries every container gets, registered with the image's loader: absolute
    /// directories (bound at their own path), absolute files, or names in the host's
    /// loader cache (`libibverbs.so.1`, `libmlx5.so*`).
    #[serde(default)]
    pub host_libs: Vec<String>,
    /// NVIDIA's `nvidia-container-cli`, to list the driver's files of a GPU container.
    #[serde(default)]
    pub nvidia_container_cli: ContainerCli,
    /// Where tasks start when the step names no working directory.
    #[serde(default)]
    pub default_workdir: DefaultWorkdir,
}

/// Where a task starts when no working directory is asked for. Both have users: pyxis
/// starts tasks in the image's WorkingDir (NGC images: /workspace, where their examples
/// live), while job scripts written as `cd $PROJECT; srun ... ./train.py` expect the
/// directory srun was called from.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DefaultWorkdir {
    /// The caller's directory when it exists inside, else the image's WorkingDir.
    #[default]
    Caller,
    /// The image's WorkingDir when it has one, else the caller's directory (pyxis).
    Image,
}

/// A working directory given for inside the container, as an absolute path there: a
/// relative one is taken from the container's `/`, and `..` never climbs above it, so
/// `../` is `/` (as in pyxis).
pub fn container_path(text: &str) -> PathBuf {
    let mut path = PathBuf::from("/");
    for part in std::path::Path::new(text).components() {
        match part {
            std::path::Component::Normal(name) => path.push(name),
            std::path::Component::ParentDir => {
                path.pop();
            }
            _ => {}
        }
    }
    path
}

/// Whether the driver's files come from `nvidia-container-cli` or the loader cache.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ContainerCli {
    /// Used when installed in a standard directory (/usr/bin, ...).
    #[default]
    Auto,
    /// Never used: the loader cache decides.
    Off,
    /// This program.
    Path(PathBuf),
}

fn default_true() -> bool {
    true
}

impl ContainerSpec {
    /// The home directory on the host: `$HOME` as the caller had it, else the user's.
    pub fn host_home(&self) -> &std::path::Path {
        self.home.as_deref().unwrap_or(&self.user.home)
    }

    /// Where the home directory is inside: `/root` for root inside, else its host path.
    pub fn home_inside(&self) -> PathBuf {
        if self.remap_root {
            PathBuf::from("/root")
        } else {
            self.host_home().to_path_buf()
        }
    }

    /// The caller's directory as the container sees it: below the home directory, it is
    /// below where home is inside (`/root` for root inside).
    pub fn caller_dir_inside(&self) -> Option<PathBuf> {
        let cwd = self.cwd.as_deref()?;
        let inside = self.home_inside();
        match cwd.strip_prefix(self.host_home()) {
            Ok(rest) if self.mount_home && inside != self.host_home() => Some(inside.join(rest)),
            _ => Some(cwd.to_path_buf()),
        }
    }

    /// A spec with the defaults `ferry run` uses, for `image` and `user`.
    pub fn new(image: PathBuf, user: UserInfo) -> Self {
        ContainerSpec {
            image,
            writable: false,
            remap_root: false,
            mount_home: true,
            home: None,
            mounts: Vec::new(),
            workdir: None,
            cwd: None,
            env: Vec::new(),
            caller_locale: Vec::new(),
            unpacked: None,
            overlay_layer: None,
            entrypoint: false,
            gpus: GpuRequest::None,
            unshare: unshare::Unshare::default(),
            rootfs: RootfsProvider::default(),
            user,
            site: SiteSettings::default(),
            running_record: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_and_caller_dir_move_to_root_for_root_inside() {
        let user = crate::spec::user::UserInfo {
            uid: 1000,
            gid: 1000,
            name: "alice".into(),
            home: "/home/alice".into(),
            shell: "/bin/sh".into(),
            groups: vec![],
        };
        let mut spec = ContainerSpec::new("/i.sqsh".into(), user);
        spec.home = Some("/scratch/alice".into());
        spec.cwd = Some("/scratch/alice/proj".into());
        assert_eq!(spec.host_home(), std::path::Path::new("/scratch/alice"));
        assert_eq!(spec.home_inside(), PathBuf::from("/scratch/alice"));
        assert_eq!(spec.caller_dir_inside(), spec.cwd);
        spec.remap_root = true;
        assert_eq!(spec.home_inside(), PathBuf::from("/root"));
        assert_eq!(spec.caller_dir_inside(), Some("/root/proj".into()));
        spec.cwd = Some("/data".into());
        assert_eq!(spec.caller_dir_inside(), Some("/data".into()));
    }

    #[test]
    fn container_paths_stay_inside() {
        for (given, inside) in [
            ("../", "/"),
            ("/a/../../b", "/b"),
            ("work/./x", "/work/x"),
            ("/workspace/", "/workspace"),
            ("", "/"),
        ] {
            assert_eq!(container_path(given), PathBuf::from(inside), "{given}");
        }
    }

    #[test]
    fn provider_names_parse_and_print_alike() {
        for p in Provider::ALL {
            assert_eq!(p.to_string().parse::<Provider>(), Ok(p));
            let value = clap::ValueEnum::to_possible_value(&p).unwrap();
            assert_eq!(value.get_name(), p.name());
        }
        assert_eq!(
            "fancy".parse::<Provider>().unwrap_err().to_string(),
            "unknown provider (known: squashfuse, unpack, kernel, auto)"
        );
    }
}

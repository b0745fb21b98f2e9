//! GPUs and host libraries in containers: which of the host's NVIDIA device nodes a
//! container shows, and which host files (driver libraries and tools, a site's own
//! libraries) are bound in and registered with the image's loader.
//!
//! Everything here runs in the holder as the user, before any namespace is made: it only
//! reads the host (`/dev`, the loader cache, a few program directories) and decides. The
//! mounts themselves are made by `rootfs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::rootfs::ldcache;
use crate::spec::gpus::GpuRequest;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GpuError {
    #[error("GPU {index} was asked for, but this node has no {path}: check the GPU indexes (and the site's gres.conf)")]
    NoSuchGpu { index: u32, path: PathBuf },
    #[error("GPUs were asked for, but this node has no NVIDIA device nodes (/dev/nvidia0, ...): run on a GPU node, or drop the GPU request")]
    NoGpus,
    #[error("site host library `{0}`: give an absolute path or a library name (e.g. libibverbs.so.1 or libmlx5.so*)")]
    BadHostLib(String),
    #[error("site host library `{name}` is not on this node: {detail}")]
    HostLibMissing { name: String, detail: String },
}

/// Library names of the NVIDIA driver's user-space part, by prefix (as listed in the
/// loader cache; `libnvidia-` covers ml, ptxjitcompiler, nvvm, cfg, opencl, allocator...).
const DRIVER_LIBRARY_PREFIXES: &[&str] = &[
    "libcuda.so",
    "libcudadebugger.so",
    "libnvidia-",
    "libnvcuvid.so",
    "libnvoptix.so",
    "libGLX_nvidia.so",
    "libEGL_nvidia.so",
    "libGLESv2_nvidia.so",
    "libGLESv1_CM_nvidia.so",
];

/// The driver's programs users expect inside (`nvidia-smi` above all).
pub const DRIVER_PROGRAMS: &[&str] = &[
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
];

/// Where the host's programs are looked for (not the caller's PATH: the plugin runs with
/// slurmstepd's, and a user's PATH must not choose what is bound).
pub const PROGRAM_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Device nodes every GPU container needs besides the GPUs themselves.
const CONTROL_NODES: &[&str] = &[
    "nvidiactl",
    "nvidia-uvm",
    "nvidia-uvm-tools",
    "nvidia-modeset",
    "nvidia-caps",
];

/// The directory inside the container that holds bound host libraries.
pub const HOST_LIB_DIR: &str = "/usr/lib/ferry-host";

/// What the container gets from the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFiles {
    /// Names directly under /dev to leave out of the container's /dev (NVIDIA nodes that
    /// are not the container's). Empty: the host's /dev is shown as it is.
    pub hidden_dev_entries: Vec<String>,
    /// Libraries to bind into [`HOST_LIB_DIR`]: name there, host file.
    pub libraries: BTreeMap<String, PathBuf>,
    /// Host directories bound at their own path and registered with the loader.
    pub library_dirs: Vec<PathBuf>,
    /// Programs to bind into `/usr/bin` inside: name, host file.
    pub programs: BTreeMap<String, PathBuf>,
}

impl HostFiles {
    /// Anything for the loader to learn about.
    pub fn has_libraries(&self) -> bool {
        !self.libraries.is_empty() || !self.library_dirs.is_empty()
    }
}

/// The GPU index of a /dev entry named `nvidiaN`.
fn gpu_index(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("nvidia")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The NVIDIA entries directly under `dev`: GPUs by index, and control nodes present.
fn nvidia_entries(dev: &Path) -> (BTreeMap<u32, String>, Vec<String>) {
    let mut gpus = BTreeMap::new();
    let mut control = Vec::new();
    if let Ok(dir) = std::fs::read_dir(dev) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(i) = gpu_index(&name) {
                gpus.insert(i, name);
            } else if CONTROL_NODES.contains(&name.as_str()) {
                control.push(name);
            }
        }
    }
    control.sort();
    (gpus, control)
}

/// Where to look on the host; the real host uses [`Host::system`], tests their own trees.
pub struct Host<'a> {
    pub dev: &'a Path,
    pub ld_cache: &'a Path,
    pub program_dirs: &'a [&'a str],
}

impl Host<'static> {
    pub fn system() -> Host<'static> {
        Host {
            dev: Path::new("/dev"),
            ld_cache: Path::new("/etc/ld.so.cache"),
            program_dirs: PROGRAM_DIRS,
        }
    }
}

/// Decide what a container with `request` and the site's `host_libs` gets from `host`.
/// With `container_cli` (NVIDIA's `nvidia-container-cli`, where the site has it), the
/// driver's files are the ones it lists; else those the loader cache names.
pub fn host_files(
    host: &Host<'_>,
    request: &GpuRequest,
    host_libs: &[String],
    container_cli: Option<&Path>,
) -> Result<HostFiles, GpuError> {
    let mut out = HostFiles::default();
    let (gpus, control) = nvidia_entries(host.dev);
    let shown: Vec<u32> = match request {
        GpuRequest::None => Vec::new(),
        GpuRequest::All => {
            if gpus.is_empty() {
                return Err(GpuError::NoGpus);
            }
            gpus.keys().copied().collect()
        }
        GpuRequest::Devices(list) => {
            for &index in list {
                if !gpus.contains_key(&index) {
                    if gpus.is_empty() {
                        return Err(GpuError::NoGpus);
                    }
                    return Err(GpuError::NoSuchGpu {
                        index,
                        path: host.dev.join(format!("nvidia{index}")),
                    });
                }
            }
            list.clone()
        }
    };
    out.hidden_dev_entries = gpus
        .iter()
        .filter(|(i, _)| !shown.contains(i))
        .map(|(_, name)| name.clone())
        .collect();
    if shown.is_empty() {
        out.hidden_dev_entries.extend(control);
    }
    out.hidden_dev_entries.sort();

    let cache = if !shown.is_empty() || !host_libs.is_empty() {
        match ldcache::read(host.ld_cache) {
            Ok(entries) => entries.into_iter().filter(|e| e.is_native()).collect(),
            Err(e) => {
                tracing::warn!("cannot read the host's loader cache: {e}");
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    let listed = match container_cli.filter(|_| !shown.is_empty()) {
        Some(cli) => match container_cli_listing(cli) {
            Ok(listing) => {
                from_container_cli_listing(&listing, &cache, &mut out);
                true
            }
            Err(e) => {
                tracing::warn!("{e}; using the loader cache instead");
                false
            }
        },
        None => false,
    };
    if !shown.is_empty() && !listed {
        for entry in &cache {
            if DRIVER_LIBRARY_PREFIXES
                .iter()
                .any(|p| entry.name.starts_with(p))
                && entry.path.exists()
            {
                out.libraries
                    .entry(entry.name.clone())
                    .or_insert_with(|| entry.path.clone());
            }
        }
    }
    if !shown.is_empty() {
        if !out.libraries.contains_key("libcuda.so.1") {
            tracing::warn!(
                "the GPUs' driver library libcuda.so.1 is not in the host's loader cache {}: only the device nodes are added",
                host.ld_cache.display()
            );
        }
        for name in DRIVER_PROGRAMS {
            if out.programs.contains_key(*name) {
                continue;
            }
            if let Some(path) = find_program(host.program_dirs, name) {
                out.programs.insert(name.to_string(), path);
            }
        }
    }
    for item in host_libs {
        add_host_lib(&mut out, &cache, item)?;
    }
    Ok(out)
}

/// `nvidia-container-cli list --libraries --binaries`, run as the caller.
fn container_cli_listing(cli: &Path) -> Result<String, crate::sys::child::ToolError> {
    let mut cmd = std::process::Command::new(cli);
    cmd.args(["list", "--libraries", "--binaries"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    let tool = format!("{} list", cli.display());
    let out = crate::sys::child::run_tool(&tool, &mut cmd, None)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The site's `nvidia-container-cli`, when installed in a standard directory.
pub fn find_container_cli() -> Option<PathBuf> {
    find_program(PROGRAM_DIRS, "nvidia-container-cli")
}

fn find_program(dirs: &[&str], name: &str) -> Option<PathBuf> {
    dirs.iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// One `host_libs=` item: an absolute directory (bound at its own path), an absolute file
/// (bound into the host library directory), or a name in the loader cache, with a `*` at
/// the end for every name that starts so.
fn add_host_lib(out: &mut HostFiles, cache: &[ldcache::Entry], item: &str) -> Result<(), GpuError> {
    let item = item.trim();
    if item.is_empty() {
        return Ok(());
    }
    if item.starts_with('/') {
        let path = PathBuf::from(item);
        let meta = std::fs::metadata(&path).map_err(|e| GpuError::HostLibMissing {
            name: item.to_string(),
            detail: e.to_string(),
        })?;
        if meta.is_dir() {
            out.library_dirs.push(path);
        } else {
            let name = path
                .file_name()
                .ok_or_else(|| GpuError::BadHostLib(item.to_string()))?
                .to_string_lossy()
                .into_owned();
            out.libraries.insert(name, path);
        }
        return Ok(());
    }
    if item.contains('/') || item.starts_with('.') {
        return Err(GpuError::BadHostLib(item.to_string()));
    }
    let (prefix, whole) = match item.strip_suffix('*') {
        Some(p) => (p, false),
        None => (item, true),
    };
    let mut found = false;
    for entry in cache {
        let matches = if whole {
            entry.name == prefix
        } else {
            entry.name.starts_with(prefix)
        };
        if matches && entry.path.exists() {
            found = true;
            out.libraries
                .entry(entry.name.clone())
                .or_insert_with(|| entry.path.clone());
        }
    }
    if !found {
        return Err(GpuError::HostLibMissing {
            name: item.to_string(),
            detail: "not in the loader cache (/etc/ld.so.cache); run ldconfig, or give its path"
                .into(),
        });
    }
    Ok(())
}

/// Lines of `nvidia-container-cli list --libraries --binaries`: absolute host paths.
/// Libraries go in by their file name and by every name the loader cache gives the same
/// file (its soname links); programs by their name.
pub fn from_container_cli_listing(listing: &str, cache: &[ldcache::Entry], out: &mut HostFiles) {
    for line in listing.lines().map(str::trim) {
        if !line.starts_with('/') {
            continue;
        }
        let path = PathBuf::from(line);
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        if name.contains(".so") {
            let real = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            for entry in cache {
                if std::fs::canonicalize(&entry.path).is_ok_and(|p| p == real) {
                    out.libraries
                        .entry(entry.name.clone())
                        .or_insert_with(|| path.clone());
                }
            }
            out.libraries.entry(name).or_insert(path);
        } else {
            out.programs.entry(name).or_insert(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A host tree: /dev with four GPUs and control nodes (plain files stand in), a loader
    /// cache written by this machine's ldconfig over stand-in libraries, a program dir.
    struct FakeHost {
        root: tempfile::TempDir,
    }

    impl FakeHost {
        fn new() -> FakeHost {
            let root = tempfile::tempdir().unwrap();
            let r = root.path();
            fs::create_dir_all(r.join("dev/nvidia-caps")).unwrap();
            for n in [
                "nvidia0",
                "nvidia1",
                "nvidia2",
                "nvidia3",
                "nvidiactl",
                "nvidia-uvm",
                "null",
            ] {
                fs::write(r.join("dev").join(n), "").unwrap();
            }
            fs::create_dir_all(r.join("bin")).unwrap();
            fs::write(r.join("bin/nvidia-smi"), "#!/bin/sh\n").unwrap();
            FakeHost { root }
        }

        fn dev(&self) -> PathBuf {
            self.root.path().join("dev")
        }

        fn bin(&self) -> String {
            self.root.path().join("bin").display().to_string()
        }
    }

    fn host_files_of(fake: &FakeHost, request: &GpuRequest) -> Result<HostFiles, GpuError> {
        let dev = fake.dev();
        let bin = fake.bin();
        let dirs = [bin.as_str()];
        let cache = fake.root.path().join("no-cache");
        host_files(
            &Host {
                dev: &dev,
                ld_cache: &cache,
                program_dirs: &dirs,
            },
            request,
            &[],
            None,
        )
    }

    #[test]
    fn only_the_asked_gpus_are_shown() {
        let fake = FakeHost::new();
        let files = host_files_of(&fake, &GpuRequest::Devices(vec![1, 3])).unwrap();
        assert_eq!(files.hidden_dev_entries, ["nvidia0", "nvidia2"]);
        assert!(files.programs.contains_key("nvidia-smi"));
        let all = host_files_of(&fake, &GpuRequest::All).unwrap();
        assert!(all.hidden_dev_entries.is_empty());
    }

    #[test]
    fn without_gpus_every_nvidia_node_is_hidden_and_nothing_added() {
        let fake = FakeHost::new();
        let files = host_files_of(&fake, &GpuRequest::None).unwrap();
        assert_eq!(
            files.hidden_dev_entries,
            [
                "nvidia-caps",
                "nvidia-uvm",
                "nvidia0",
                "nvidia1",
                "nvidia2",
                "nvidia3",
                "nvidiactl"
            ]
        );
        assert!(files.programs.is_empty() && !files.has_libraries());
    }

    #[test]
    fn a_missing_gpu_is_one_clear_error() {
        let fake = FakeHost::new();
        let err = host_files_of(&fake, &GpuRequest::Devices(vec![7])).unwrap_err();
        assert!(matches!(err, GpuError::NoSuchGpu { index: 7, .. }), "{err}");
        assert!(err.to_string().contains("nvidia7"));
        let empty = tempfile::tempdir().unwrap();
        let dirs: [&str; 0] = [];
        let none = host_files(
            &Host {
                dev: empty.path(),
                ld_cache: Path::new("/nonexistent"),
                program_dirs: &dirs,
            },
            &GpuRequest::All,
            &[],
            None,
        );
        assert_eq!(none, Err(GpuError::NoGpus));
        // No GPUs on the node and none asked for: nothing to hide, nothing to add.
        let quiet = host_files(
            &Host {
                dev: empty.path(),
                ld_cache: Path::new("/nonexistent"),
                program_dirs: &dirs,
            },
            &GpuRequest::None,
            &[],
            None,
        )
        .unwrap();
        assert_eq!(quiet, HostFiles::default());
    }

    #[test]
    fn site_host_libs_by_path_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let libdir = dir.path().join("mpi/lib");
        fs::create_dir_all(&libdir).unwrap();
        let file = dir.path().join("libsite.so.2");
        fs::write(&file, "").unwrap();
        let mut out = HostFiles::default();
        add_host_lib(&mut out, &[], &libdir.display().to_string()).unwrap();
        add_host_lib(&mut out, &[], &file.display().to_string()).unwrap();
        assert_eq!(out.library_dirs, std::slice::from_ref(&libdir));
        assert_eq!(out.libraries.get("libsite.so.2"), Some(&file));
        assert!(matches!(
            add_host_lib(&mut out, &[], "lib/x.so"),
            Err(GpuError::BadHostLib(_))
        ));
        assert!(matches!(
            add_host_lib(&mut out, &[], "libnothere.so.1"),
            Err(GpuError::HostLibMissing { .. })
        ));
        assert!(matches!(
            add_host_lib(&mut out, &[], "/nonexistent/lib"),
            Err(GpuError::HostLibMissing { .. })
        ));
    }

    #[test]
    fn container_cli_listing_adds_libraries_with_their_cache_names() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("libcuda.so.550.1");
        fs::write(&real, "").unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("libcuda.so.1")).unwrap();
        let smi = dir.path().join("nvidia-smi");
        fs::write(&smi, "").unwrap();
        let cache = vec![ldcache::Entry::for_test(
            "libcuda.so.1",
            &dir.path().join("libcuda.so.1"),
        )];
        let listing = format!("{}\n{}\nnot a path\n", real.display(), smi.display());
        let mut out = HostFiles::default();
        from_container_cli_listing(&listing, &cache, &mut out);
        assert_eq!(out.libraries.get("libcuda.so.1"), Some(&real));
        assert_eq!(out.libraries.get("libcuda.so.550.1"), Some(&real));
        assert_eq!(out.programs.get("nvidia-smi"), Some(&smi));
    }
}

//! Making the image's loader find the host libraries bound in: the image's own ldconfig
//! writes a cache listing them first; `LD_LIBRARY_PATH` is the fallback.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::mount::MountAttrFlags;

use crate::rootfs::binds::{bind_into, Bind};
use crate::rootfs::gpu::{self, HostFiles};
use crate::rootfs::staging::{host_null, inside_path, resolve_in_tree, FILES, NEW};
use crate::spec::ContainerSpec;
use crate::sys::child::{run_tool, ToolError};
use crate::sys::raw;

/// Why the image's ldconfig could not register the host libraries (then they go through
/// `LD_LIBRARY_PATH`).
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("the image has no ldconfig")]
    NoLdconfig,
    #[error("cannot prepare the image's ldconfig ({step}): {source}")]
    Prepare {
        step: &'static str,
        source: io::Error,
    },
    /// Starting, waiting for or the failure of the image's ldconfig, named with its path.
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("the image's {ldconfig} wrote no loader cache")]
    NoCache { ldconfig: &'static str },
    #[error("cannot bind the loader cache over /etc/ld.so.cache: {0}")]
    BindCache(io::Error),
}

fn prepare(step: &'static str) -> impl FnOnce(io::Error) -> LoaderError {
    move |source| LoaderError::Prepare { step, source }
}

/// Make the image's loader find the host libraries bound in: the image's own ldconfig,
/// run in the container tree as the user, writes a cache of the image's libraries and the
/// host's (listed first, so the host's driver wins over any copy in the image), which then
/// stands in for the image's /etc/ld.so.cache. Returns the directories for
/// `LD_LIBRARY_PATH` when that cannot be done (an image without glibc's ldconfig).
pub(super) fn register_host_libraries(spec: &ContainerSpec, host: &HostFiles) -> Option<String> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if !host.libraries.is_empty() {
        dirs.push(gpu::HOST_LIB_DIR.into());
    }
    dirs.extend(host.library_dirs.iter().cloned());
    let search = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    match run_image_ldconfig(spec, &dirs) {
        Ok(()) => None,
        Err(why) => {
            tracing::info!("host libraries through LD_LIBRARY_PATH: {why}");
            Some(search)
        }
    }
}

/// The ldconfig configuration: the host's directories first, so the host's driver wins over
/// any copy in the image, then the image's own.
fn ld_so_conf(dirs: &[PathBuf]) -> String {
    let mut conf: String = dirs.iter().map(|d| format!("{}\n", d.display())).collect();
    conf.push_str("include /etc/ld.so.conf\n");
    conf
}

fn run_image_ldconfig(spec: &ContainerSpec, dirs: &[PathBuf]) -> Result<(), LoaderError> {
    let newroot = Path::new(NEW);
    let ldconfig = ["/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .into_iter()
        .find(|p| {
            resolve_in_tree(newroot, &inside_path(Path::new(p)))
                .is_ok_and(|r| newroot.join(r).is_file())
        })
        .ok_or(LoaderError::NoLdconfig)?;
    let work = Path::new(FILES).join("ldconfig");
    fs::create_dir(&work).map_err(prepare("creating its work directory"))?;
    fs::write(work.join("ld.so.conf"), ld_so_conf(dirs))
        .map_err(prepare("writing its configuration"))?;
    let work_dir = File::open(&work).map_err(prepare("opening its work directory"))?;
    const WORK_FD: i32 = 3;
    let via = format!("/proc/self/fd/{WORK_FD}");
    let mut cmd = Command::new(ldconfig);
    cmd.arg("-X")
        .arg("-f")
        .arg(format!("{via}/ld.so.conf"))
        .arg("-C")
        .arg(format!("{via}/ld.so.cache"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(host_null().map_err(prepare("opening /dev/null"))?)
        .stdout(host_null().map_err(prepare("opening /dev/null"))?);
    // The image's ldconfig, in the image's tree: it reads the image's own configuration
    // and writes its cache format for the image's loader.
    raw::pass_fds_and_chroot_on_exec(
        &mut cmd,
        &[(work_dir.as_fd(), WORK_FD)],
        Path::new(NEW),
        false,
    )
    .map_err(prepare("passing its work directory"))?;
    let started = Instant::now();
    let tool = format!("the image's {ldconfig}");
    run_tool(&tool, &mut cmd, Some(Duration::from_secs(60)))?;
    let cache = work.join("ld.so.cache");
    if !cache.is_file() {
        return Err(LoaderError::NoCache { ldconfig });
    }
    tracing::debug!("ldconfig took {:?}", started.elapsed());
    install_loader_cache(spec, &cache)
}

/// Put `cache` at /etc/ld.so.cache in the container tree: written into a writable tree (so
/// that an ldconfig run later inside, e.g. by apt, can replace it), bound over the image's
/// otherwise.
fn install_loader_cache(spec: &ContainerSpec, cache: &Path) -> Result<(), LoaderError> {
    let target = Path::new(NEW).join("etc/ld.so.cache");
    if spec.writable || spec.unpacked.is_some() {
        let copied = fs::read(cache).and_then(|data| {
            let _ = fs::remove_file(&target);
            fs::write(&target, data)
        });
        match copied {
            Ok(()) => return Ok(()),
            Err(e) => tracing::debug!("cannot write {}: {e}; binding it", target.display()),
        }
    }
    let newroot = File::open(NEW).map_err(prepare("opening the new root"))?;
    let bind = Bind {
        what: "the loader cache".into(),
        source: cache.to_path_buf(),
        target: "/etc/ld.so.cache".into(),
        is_dir: false,
        recursive: false,
        flags: MountAttrFlags::MOUNT_ATTR_RDONLY
            | MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV,
        unbindable: false,
    };
    bind_into(&newroot, &bind).map_err(LoaderError::BindCache)
}

/// Put `dirs` in front of the image's `LD_LIBRARY_PATH`.
pub(super) fn add_library_path(env: &mut Vec<(String, String)>, dirs: &str) {
    match env.iter_mut().find(|(k, _)| k == "LD_LIBRARY_PATH") {
        Some((_, v)) if !v.is_empty() => *v = format!("{dirs}:{v}"),
        Some((_, v)) => *v = dirs.to_string(),
        None => env.push(("LD_LIBRARY_PATH".into(), dirs.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_directories_come_before_the_images_configuration() {
        let dirs = [
            PathBuf::from("/usr/local/ferry/lib"),
            PathBuf::from("/opt/site/lib"),
        ];
        assert_eq!(
            ld_so_conf(&dirs),
            "/usr/local/ferry/lib\n/opt/site/lib\ninclude /etc/ld.so.conf\n"
        );
    }

    #[test]
    fn library_path_goes_in_front_of_the_images() {
        let mut env = vec![("LD_LIBRARY_PATH".to_string(), "/opt/app/lib".to_string())];
        add_library_path(&mut env, "/h");
        assert_eq!(env[0].1, "/h:/opt/app/lib");
        let mut env = vec![("LD_LIBRARY_PATH".to_string(), String::new())];
        add_library_path(&mut env, "/h");
        assert_eq!(env[0].1, "/h");
        let mut env = Vec::new();
        add_library_path(&mut env, "/h");
        assert_eq!(env, [("LD_LIBRARY_PATH".to_string(), "/h".to_string())]);
    }
}

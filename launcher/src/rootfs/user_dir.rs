//! Each user's directory under the site's `named_dir` (`ferry-UID`), as root handles it in
//! the plugin: made by root with the user as owner before the user's step uses it, and its
//! job directories removed by the job epilog.
//!
//! `named_dir` is typically /tmp or another directory every user can write, so any user
//! can create, rename or exchange (`renameat2(RENAME_EXCHANGE)`) entries of their own there
//! at any moment. Root therefore never resolves a path below `named_dir` by name twice: it
//! opens `ferry-UID` once, with `O_NOFOLLOW | O_DIRECTORY`, checks its owner on that
//! descriptor, and works relative to it.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

#[derive(Debug, thiserror::Error)]
pub enum UserDirError {
    #[error("cannot open the site's named_dir {path}: {source}")]
    NamedDir { path: PathBuf, source: io::Error },
    #[error("cannot prepare {path} for uid {uid}: {source}")]
    Prepare {
        path: PathBuf,
        uid: u32,
        source: io::Error,
    },
    #[error("{path} keeps being taken by others (uid {squatter}): ask an admin to look into it")]
    Squatted { path: PathBuf, squatter: u32 },
    #[error("not removing {path}: {why}")]
    Refused { path: PathBuf, why: String },
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("the plugin must be root here: {0}")]
    NotRoot(#[from] crate::rootfs::kernel::KernelError),
}

/// The name of `uid`'s directory in `named_dir`.
pub fn name(uid: u32) -> String {
    format!("ferry-{uid}")
}

fn open_dir_at(parent: impl AsFd, name: &str) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

fn open_named_dir(named_dir: &Path) -> Result<OwnedFd, UserDirError> {
    File::open(named_dir)
        .and_then(|f| {
            if f.metadata()?.is_dir() {
                Ok(OwnedFd::from(f))
            } else {
                Err(io::Error::from_raw_os_error(libc::ENOTDIR))
            }
        })
        .map_err(|source| UserDirError::NamedDir {
            path: named_dir.into(),
            source,
        })
}

/// Make `named_dir/ferry-UID` a directory owned by `uid:gid`, mode 0700, unless it is one
/// of the user's already. Whatever else has the name (another user's directory, a symlink,
/// a file: squatted before the user's first step on this node) is renamed aside to
/// `.ferry-UID.taken-by-OWNER.NANOS`, for the admins to look at, and the directory made
/// anew. Needs root (taken back for this thread where slurmstepd has dropped its
/// effective uid); `named_dir` itself is made, owned by root and mode 0755, when missing
/// (users need not write there: root makes their directories).
pub fn ensure(named_dir: &Path, uid: u32, gid: u32) -> Result<(), UserDirError> {
    let _root = crate::rootfs::kernel::ThreadRoot::take()?;
    if !named_dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(named_dir)
            .map_err(|source| UserDirError::NamedDir {
                path: named_dir.into(),
                source,
            })?;
    }
    let parent = open_named_dir(named_dir)?;
    let own = name(uid);
    let path = named_dir.join(&own);
    let fail = |source: io::Error| UserDirError::Prepare {
        path: path.clone(),
        uid,
        source,
    };
    let mut squatter = None;
    for _ in 0..3 {
        match rustix::fs::mkdirat(&parent, own.as_str(), Mode::from_raw_mode(0o700)) {
            Ok(()) => {
                // Root's until the chown: in a sticky named_dir no user can rename it away
                // meanwhile; the owner check makes sure it is still the one just made.
                let dir = open_dir_at(&parent, &own).map_err(fail)?;
                let st = rustix::fs::fstat(&dir).map_err(|e| fail(e.into()))?;
                if st.st_uid != 0 {
                    squatter = Some(st.st_uid);
                    continue;
                }
                rustix::fs::fchown(
                    &dir,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                )
                .map_err(|e| fail(e.into()))?;
                return Ok(());
            }
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(fail(e.into())),
        }
        let owner = match open_dir_at(&parent, &own) {
            Ok(dir) => {
                let st = rustix::fs::fstat(&dir).map_err(|e| fail(e.into()))?;
                if st.st_uid == uid {
                    return Ok(());
                }
                st.st_uid
            }
            // A symlink, a file or something else in the way.
            Err(_) => rustix::fs::statat(&parent, own.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| st.st_uid)
                .unwrap_or(u32::MAX),
        };
        squatter = Some(owner);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let aside = format!(".{own}.taken-by-{owner}.{nanos}");
        match rustix::fs::renameat(&parent, own.as_str(), &parent, aside.as_str()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(fail(e.into())),
        }
        tracing::warn!(
            "{} was taken by uid {owner}, not uid {uid}'s: moved it to {}",
            path.display(),
            named_dir.join(&aside).display()
        );
    }
    Err(UserDirError::Squatted {
        path,
        squatter: squatter.unwrap_or(u32::MAX),
    })
}

/// Remove `named_dir/ferry-UID/jobJOB` (the job's unpacked containers) as root, at the
/// job's end. Returns whether there was one. `ferry-UID` must be a real directory owned by
/// `uid`, opened without following a symlink; the job directory is removed relative to
/// that descriptor, so a name exchanged meanwhile cannot point the removal elsewhere.
pub fn remove_job(named_dir: &Path, uid: u32, job_id: u32) -> Result<bool, UserDirError> {
    let parent = open_named_dir(named_dir)?;
    let own = name(uid);
    let path = named_dir.join(&own);
    let user_dir = match open_dir_at(&parent, &own) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(UserDirError::Refused {
                path,
                why: format!("not a directory ({e})"),
            })
        }
    };
    let st = rustix::fs::fstat(&user_dir).map_err(|e| UserDirError::Remove {
        path: path.clone(),
        source: e.into(),
    })?;
    if st.st_uid != uid {
        return Err(UserDirError::Refused {
            path,
            why: format!("owned by uid {}, not by uid {uid}", st.st_uid),
        });
    }
    let job = format!("job{job_id}");
    let job_path = path.join(&job);
    match rustix::fs::statat(&user_dir, job.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => {}
        Err(rustix::io::Errno::NOENT) => return Ok(false),
        Err(e) => {
            return Err(UserDirError::Remove {
                path: job_path,
                source: e.into(),
            })
        }
    }
    // The descriptor's own directory, by the kernel's link for it (not by name): std's
    // remove_dir_all then opens jobJOB inside it without following symlinks and removes
    // its contents relative to descriptors (a symlink at jobJOB is removed itself).
    let through_fd = PathBuf::from(format!("/proc/self/fd/{}", user_dir.as_raw_fd())).join(&job);
    let removed = match std::fs::remove_dir_all(&through_fd) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(source) => {
            return Err(UserDirError::Remove {
                path: job_path,
                source,
            })
        }
    };
    // The user's directory goes too once nothing is left in it (every container step makes
    // it, to be attachable): only if empty, so kept containers and other jobs' stay.
    drop(user_dir);
    if let Err(e) = rustix::fs::unlinkat(&parent, own.as_str(), AtFlags::REMOVEDIR) {
        tracing::debug!("{} kept: {e}", path.display());
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_directory_is_removed_only_inside_the_users_own_directory() {
        let base = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let named = base.path().join("named");
        let user = named.join(name(me));
        std::fs::create_dir_all(user.join("job7/c/rootfs/etc")).unwrap();
        std::fs::write(user.join("job7/c/rootfs/etc/f"), "x").unwrap();
        std::fs::create_dir_all(user.join("job8")).unwrap();
        assert!(remove_job(&named, me, 7).unwrap());
        assert!(!user.join("job7").exists());
        assert!(user.join("job8").exists());
        // Emptied by its last job: the user's directory goes as well.
        std::fs::create_dir_all(user.join("job6")).unwrap();
        assert!(remove_job(&named, me, 8).unwrap() && remove_job(&named, me, 6).unwrap());
        assert!(!user.exists());
        std::fs::create_dir_all(user.join("job8")).unwrap();
        assert!(!remove_job(&named, me, 7).unwrap());
        assert!(!remove_job(&named, me + 1, 7).unwrap());
        // A symlink in the user's place: nothing behind it is touched.
        let elsewhere = base.path().join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("job9")).unwrap();
        std::fs::remove_dir_all(&user).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &user).unwrap();
        assert!(remove_job(&named, me, 9).is_err());
        assert!(elsewhere.join("job9").exists());
    }
}

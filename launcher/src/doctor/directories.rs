//! Directories: the per-user cache and the temporary directory, tried by writing to them.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::Check;

/// Where ferry keeps its per-user cache: `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry`.
pub fn cache_dir(xdg_cache_home: Option<&OsStr>, home: Option<&Path>) -> Option<PathBuf> {
    match xdg_cache_home.map(Path::new) {
        // The XDG spec says to ignore a relative value.
        Some(x) if x.is_absolute() => Some(x.join("ferry")),
        _ => home.map(|h| h.join(".cache/ferry")),
    }
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
        })
}

/// Create `dir` (and missing parents) and a file in it; remove what was created for the
/// test. Returns whether `dir` existed before.
fn try_write(dir: &Path) -> io::Result<bool> {
    let first_missing = dir.ancestors().take_while(|a| !a.exists()).last();
    let existed = first_missing.is_none();
    let result = fs::create_dir_all(dir).and_then(|()| {
        let probe = dir.join(format!(".ferry-doctor-{}", std::process::id()));
        let written = fs::File::create(&probe).and_then(|mut f| f.write_all(b"ok"));
        let _ = fs::remove_file(&probe);
        written
    });
    if let Some(top) = first_missing {
        // Leave the machine as it was: remove the directories made here, innermost first.
        for d in dir.ancestors().take_while(|d| d.starts_with(top)) {
            let _ = fs::remove_dir(d);
        }
    }
    result.map(|()| existed)
}

/// The cache `ferry` uses here: FERRY_CACHE (what `ferry import --cache` defaults to),
/// else [`cache_dir`].
pub(super) fn chosen_cache_dir() -> Option<PathBuf> {
    let chosen = std::env::var_os("FERRY_CACHE")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    chosen.or_else(|| {
        cache_dir(
            std::env::var_os("XDG_CACHE_HOME").as_deref(),
            home_dir().as_deref(),
        )
    })
}

pub(super) fn cache_dir_check() -> Check {
    const ID: &str = "cache-dir";
    let Some(dir) = chosen_cache_dir() else {
        return Check::fail(
            ID,
            "no cache directory: neither XDG_CACHE_HOME nor HOME is set and the user has no passwd home",
            "set XDG_CACHE_HOME to a writable directory",
        );
    };
    match try_write(&dir) {
        Ok(true) => Check::ok(ID, format!("{} is writable", dir.display())),
        Ok(false) => Check::ok(ID, format!("{} can be created", dir.display())),
        Err(e) => Check::fail(
            ID,
            format!("{} cannot be created or written: {e}", dir.display()),
            "set XDG_CACHE_HOME to a writable directory (ferry uses $XDG_CACHE_HOME/ferry) or fix the permissions",
        ),
    }
}

pub(super) fn temp_dir_check() -> Check {
    const ID: &str = "temp-dir";
    let dir = std::env::temp_dir();
    match try_write(&dir) {
        Ok(true) => Check::ok(ID, format!("{} is writable", dir.display())),
        Ok(false) | Err(_) => Check::warn(
            ID,
            format!(
                "{} is not a writable directory: imports need scratch space",
                dir.display()
            ),
            "set TMPDIR to a writable directory",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_follows_xdg() {
        let home = Some(Path::new("/home/a"));
        assert_eq!(cache_dir(None, home), Some("/home/a/.cache/ferry".into()));
        assert_eq!(
            cache_dir(Some(OsStr::new("/scratch/c")), home),
            Some("/scratch/c/ferry".into())
        );
        assert_eq!(
            cache_dir(Some(OsStr::new("rel")), home),
            Some("/home/a/.cache/ferry".into())
        );
        assert_eq!(cache_dir(None, None), None);
    }

    #[test]
    fn try_write_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/ferry");
        assert!(!try_write(&dir).unwrap());
        assert!(!tmp.path().join("a").exists());
        fs::create_dir_all(&dir).unwrap();
        assert!(try_write(&dir).unwrap());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    }
}

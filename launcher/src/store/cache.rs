//! The image cache: one squashfs per image digest, with its config, under one directory.
//!
//! ```text
//! ROOT/images/sha256-HEX.sqsh   the root file system
//! ROOT/images/sha256-HEX.json   [`Entry`]: config, refs, size, created, last use
//! ROOT/refs.json                reference -> digest, for `ferry images` and offline reuse
//! ROOT/locks/sha256-HEX.lock    flock: exclusive while building or removing, shared
//!                               while a container uses the image
//! ROOT/tmp/ferry-XXXX/          work areas, each flocked by its owner while alive
//! ```
//!
//! Files appear by rename only, the `.json` last: an entry is complete when its `.json`
//! exists. N importers of one digest take its lock in turn; the first builds, the others
//! then find the entry and reuse it. Lock files are never removed: removing one while
//! another process is about to lock it would let two processes hold "the" lock.
//! flock works across NFS clients only where the server supports it (NFSv4 does).
//!
//! Entries are trusted by name, so a cache must be writable by no one but its owner: a
//! cache directory that others can write (group-writable, or mode 1777) is refused, and
//! entries, locks and the refs index not owned by the caller, root or the cache's owner
//! are ignored, with a warning. A site shares a cache by having one account (or root) fill
//! it and letting users only read it (see docs/admin-guide.md).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::image::config::ImageConfig;
use crate::image::digest::check_digest;

/// Work areas untouched this long and unlocked are leftovers of a killed import.
const STALE_TMP: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("image cache {path}: cannot {what}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("image cache entry {path} is corrupt ({detail}); remove it and import again")]
    Corrupt { path: PathBuf, detail: String },
    #[error("not an image digest: {0}")]
    BadDigest(String),
    #[error("no cache directory: set XDG_CACHE_HOME or HOME, or pass --cache DIR")]
    NoRoot,
    #[error("image cache {path} can be written by others ({detail}): they could replace the images you run; use a cache of your own (--cache or FERRY_CACHE), or have your site share one that only one account fills (see the admin guide)")]
    WritableByOthers { path: PathBuf, detail: String },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |error| CacheError::Io {
        what,
        path: path.into(),
        error,
    }
}

/// What the cache knows about one image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// `sha256:HEX`: the manifest digest (or a docker archive's config digest).
    pub digest: String,
    /// References this image was imported as, oldest first.
    #[serde(default)]
    pub refs: Vec<String>,
    #[serde(default)]
    pub config: ImageConfig,
    #[serde(default)]
    pub config_digest: Option<String>,
    /// Layer digests, bottom first.
    #[serde(default)]
    pub layers: Vec<String>,
    /// Size of the squashfs in bytes.
    pub size: u64,
    /// Seconds since the epoch.
    pub created: u64,
    pub last_used: u64,
}

/// What a build hands to the cache: a squashfs inside the work area, and its metadata.
#[derive(Debug, Clone)]
pub struct Built {
    pub squashfs: PathBuf,
    pub config: ImageConfig,
    pub config_digest: Option<String>,
    pub layers: Vec<String>,
}

/// A held lock on one digest; released when dropped.
/// `None`: the lock file belongs to someone untrusted and was ignored.
#[derive(Debug)]
pub struct DigestLock(#[allow(dead_code)] Option<Flock<File>>);

/// A private directory under `tmp/`, removed when dropped.
#[derive(Debug)]
pub struct WorkArea {
    // Field order matters: the directory goes while the lock is still held.
    dir: tempfile::TempDir,
    _lock: Flock<File>,
}

impl WorkArea {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// This process's work areas, for [`remove_live_work_areas`] when a signal ends it.
static LIVE_WORK_AREAS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

impl Drop for WorkArea {
    fn drop(&mut self) {
        let mut live = LIVE_WORK_AREAS.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|p| p != self.dir.path());
    }
}

/// Remove the work areas this process holds: what a `scancel`, a time limit or Ctrl-C
/// would otherwise leave until the next import or gc. Returns how many went.
pub fn remove_live_work_areas() -> usize {
    let live = LIVE_WORK_AREAS.lock().unwrap_or_else(|e| e.into_inner());
    live.iter()
        .filter(|p| fs::remove_dir_all(p).is_ok())
        .count()
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed: Vec<Entry>,
    pub freed: u64,
    /// Entries that would have gone but are in use (locked).
    pub in_use: usize,
    /// Entries that would have gone but this user may not remove.
    pub not_removable: usize,
    pub tmp_removed: usize,
    /// Files of [`ExtraEntry`]s removed, and their bytes (also counted in `freed`).
    pub extra_removed: Vec<PathBuf>,
    pub extra_freed: u64,
}

/// A file outside `images/` that the cache's size limit also covers (a build's step
/// entries), removed least recently used first among the images; whoever passes it
/// makes sure no one uses it while gc runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraEntry {
    pub path: PathBuf,
    pub size: u64,
    /// Seconds since the epoch.
    pub last_used: u64,
}

pub struct Cache {
    root: PathBuf,
    /// Who may have written what the cache holds: the caller, root, the cache's owner.
    trusted: [u32; 3],
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn file_stem(digest: &str) -> Result<String, CacheError> {
    check_digest(digest).map_err(|_| CacheError::BadDigest(digest.into()))?;
    Ok(digest.replacen(':', "-", 1))
}

/// Write `bytes` to `path` by writing a sibling temp file and renaming it over.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".new-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(dir)?;
    // Readable like the images: in a site's shared cache every user reads the entries.
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

impl Cache {
    /// The per-user default: `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry`.
    pub fn default_root() -> Result<PathBuf, CacheError> {
        let abs = |v: Option<std::ffi::OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
        if let Some(x) = abs(std::env::var_os("XDG_CACHE_HOME")) {
            return Ok(x.join("ferry"));
        }
        abs(std::env::var_os("HOME"))
            .map(|h| h.join(".cache/ferry"))
            .ok_or(CacheError::NoRoot)
    }

    /// Where the `unpack` root filesystem provider keeps this user's unpacked images: per
    /// user, so a shared cache never mixes users' trees.
    pub fn unpack_root(&self, uid: u32) -> PathBuf {
        self.root.join(format!("unpacked-{uid}"))
    }

    /// Open (creating as needed) the cache at `root`. A new root is private to its user;
    /// an existing one (a site's shared cache) keeps the permissions it was given.
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        if !root.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(io_err("create the cache directory", root))?;
        }
        for sub in ["images", "locks", "tmp"] {
            let p = root.join(sub);
            match fs::DirBuilder::new().mode(0o755).create(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                // A site's cache that this user may only read: lookups still work.
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    tracing::debug!("cannot create {}: {e}", p.display())
                }
                Err(e) => return Err(io_err("create a cache directory", &p)(e)),
            }
        }
        let me = nix::unistd::geteuid().as_raw();
        let owner = check_not_writable_by_others(root, me, None)?;
        let cache = Cache {
            root: root.into(),
            trusted: [me, 0, owner],
        };
        for sub in ["images", "locks", "tmp"] {
            check_not_writable_by_others(&root.join(sub), me, Some(&cache.trusted))?;
        }
        Ok(cache)
    }

    /// Whether `path` (not followed if a symlink) may be used: owned by a trusted uid.
    /// An entry or lock of someone else's is reported once per use and passed over.
    fn trusted(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match fs::symlink_metadata(path) {
            Ok(m) if self.trusted.contains(&m.uid()) => true,
            Ok(m) => {
                tracing::warn!(
                    "ignoring {}: it belongs to uid {}, not to you, root or the cache's owner",
                    path.display(),
                    m.uid()
                );
                false
            }
            Err(_) => true,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the squashfs of `digest` lives (whether or not it is there yet).
    pub fn image_path(&self, digest: &str) -> Result<PathBuf, CacheError> {
        Ok(self
            .root
            .join("images")
            .join(format!("{}.sqsh", file_stem(digest)?)))
    }

    fn entry_path(&self, digest: &str) -> Result<PathBuf, CacheError> {
        Ok(self
            .root
            .join("images")
            .join(format!("{}.json", file_stem(digest)?)))
    }

    fn lock(&self, digest: &str, arg: FlockArg) -> Result<Option<DigestLock>, CacheError> {
        let path = self
            .root
            .join("locks")
            .join(format!("{}.lock", file_stem(digest)?));
        // flock needs no write access: a lock file another user made opens read-only.
        let file = File::open(&path)
            .or_else(|_| {
                fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
            })
            .map_err(io_err("open a lock file", &path))?;
        if !self.trusted(&path) {
            // Someone else's lock could be held forever to stall this import.
            return Ok(Some(DigestLock(None)));
        }
        match Flock::lock(file, arg) {
            Ok(l) => Ok(Some(DigestLock(Some(l)))),
            Err((_, Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(io_err("lock", &path)(io::Error::from_raw_os_error(
                e as i32,
            ))),
        }
    }

    /// Whether another process imports `digest` now (holds its lock to build it).
    pub fn import_under_way(&self, digest: &str) -> Result<bool, CacheError> {
        Ok(self.lock(digest, FlockArg::LockSharedNonblock)?.is_none())
    }

    /// Keep `digest` from being collected while the returned lock lives (a running
    /// container). Waits while an import of it is under way.
    pub fn hold(&self, digest: &str) -> Result<DigestLock, CacheError> {
        Ok(self
            .lock(digest, FlockArg::LockShared)?
            .expect("blocking lock returns a lock"))
    }

    /// The complete entry for `digest`, if the cache has one.
    pub fn lookup(&self, digest: &str) -> Result<Option<Entry>, CacheError> {
        let path = self.entry_path(digest)?;
        let image = self.image_path(digest)?;
        if !self.trusted(&path) || !self.trusted(&image) {
            return Ok(None);
        }
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read an entry", &path)(e)),
        };
        let entry: Entry = serde_json::from_slice(&bytes).map_err(|e| CacheError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        if entry.digest != digest {
            return Err(CacheError::Corrupt {
                path,
                detail: format!("it describes {}", entry.digest),
            });
        }
        if !fs::symlink_metadata(&image).is_ok_and(|m| m.is_file()) {
            return Ok(None);
        }
        Ok(Some(entry))
    }

    fn store(&self, entry: &Entry) -> Result<(), CacheError> {
        let path = self.entry_path(&entry.digest)?;
        let json = serde_json::to_vec_pretty(entry).expect("entries serialise");
        write_atomically(&path, &json).map_err(io_err("write an entry", &path))
    }

    /// Record a use of `digest` now (for least-recently-used collection).
    pub fn touch(&self, digest: &str) -> Result<(), CacheError> {
        if let Some(mut e) = self.lookup(digest)? {
            e.last_used = now();
            self.store(&e)?;
        }
        Ok(())
    }

    /// A fresh private work area under `tmp/`.
    pub fn work_area(&self) -> Result<WorkArea, CacheError> {
        let tmp = self.root.join("tmp");
        let dir = tempfile::Builder::new()
            .prefix("ferry-")
            .tempdir_in(&tmp)
            .map_err(io_err("create a work area", &tmp))?;
        let file = File::open(dir.path()).map_err(io_err("open a work area", &tmp))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| {
            io_err("lock a work area", &tmp)(io::Error::from_raw_os_error(e as i32))
        })?;
        LIVE_WORK_AREAS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(dir.path().to_path_buf());
        Ok(WorkArea { dir, _lock: lock })
    }

    /// The entry for `digest`, built once: the first caller runs `build` in a work area
    /// while holding the digest's lock; concurrent callers wait and then reuse its result.
    /// `reference` is recorded as a name of the image. Returns the entry and whether this
    /// call built it.
    pub fn get_or_build<E, F>(
        &self,
        digest: &str,
        reference: Option<&str>,
        build: F,
    ) -> Result<(Entry, bool), E>
    where
        E: From<CacheError>,
        F: FnOnce(&WorkArea) -> Result<Built, E>,
    {
        // A complete entry never changes, so finding one needs no lock (and must not
        // wait for the containers that hold it shared).
        if let Some(entry) = self.lookup(digest)? {
            return Ok((self.reuse(entry, reference)?, false));
        }
        let _lock = self
            .lock(digest, FlockArg::LockExclusive)?
            .expect("blocking lock returns a lock");
        if let Some(entry) = self.lookup(digest)? {
            return Ok((self.reuse(entry, reference)?, false));
        }
        // Leftovers of killed imports are big (an unpacked image): clear them before
        // adding another.
        if let Err(e) = self.clean_tmp(STALE_TMP) {
            tracing::debug!("not clearing old work areas: {e}");
        }
        let area = self.work_area()?;
        let built = build(&area)?;
        let target = self.image_path(digest)?;
        let size = fs::metadata(&built.squashfs)
            .map_err(io_err("read the built image", &built.squashfs))?
            .len();
        fs::rename(&built.squashfs, &target)
            .map_err(io_err("move the built image into place", &target))?;
        let t = now();
        let entry = Entry {
            digest: digest.into(),
            refs: reference.map(|r| vec![r.to_string()]).unwrap_or_default(),
            config: built.config,
            config_digest: built.config_digest,
            layers: built.layers,
            size,
            created: t,
            last_used: t,
        };
        self.store(&entry)?;
        if let Some(r) = reference {
            self.set_ref(r, digest)?;
        }
        Ok((entry, true))
    }

    /// Record a use of a complete entry (and `reference` as one of its names). Best
    /// effort: in a shared cache the entry may belong to someone else, and using it must
    /// not fail for that.
    pub fn reuse(&self, mut entry: Entry, reference: Option<&str>) -> Result<Entry, CacheError> {
        entry.last_used = now();
        if let Some(r) = reference {
            if !entry.refs.iter().any(|x| x == r) {
                entry.refs.push(r.into());
            }
        }
        if let Err(e) = self.store(&entry) {
            tracing::debug!("not recording the use of {}: {e}", entry.digest);
        }
        if let Some(r) = reference {
            if let Err(e) = self.set_ref(r, &entry.digest) {
                tracing::debug!("not recording {r} as {}: {e}", entry.digest);
            }
        }
        Ok(entry)
    }

    fn refs_path(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    /// Reference -> digest, as last imported.
    pub fn refs(&self) -> Result<BTreeMap<String, String>, CacheError> {
        let path = self.refs_path();
        if !self.trusted(&path) {
            return Ok(BTreeMap::new());
        }
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| CacheError::Corrupt {
                path,
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io_err("read the refs index", &path)(e)),
        }
    }

    /// The cached digest last imported as `reference`.
    pub fn resolve_ref(&self, reference: &str) -> Result<Option<String>, CacheError> {
        Ok(self.refs()?.get(reference).cloned())
    }

    fn update_refs(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> Result<(), CacheError> {
        let lock_path = self.root.join("locks/refs.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open a lock file", &lock_path))?;
        let _lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err("lock", &lock_path)(io::Error::from_raw_os_error(e as i32)))?;
        let mut refs = self.refs().unwrap_or_default();
        change(&mut refs);
        let path = self.refs_path();
        let json = serde_json::to_vec_pretty(&refs).expect("refs serialise");
        write_atomically(&path, &json).map_err(io_err("write the refs index", &path))
    }

    fn set_ref(&self, reference: &str, digest: &str) -> Result<(), CacheError> {
        self.update_refs(|refs| {
            refs.insert(reference.into(), digest.into());
        })
    }

    /// Every complete entry, most recently used first.
    pub fn entries(&self) -> Result<Vec<Entry>, CacheError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for item in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let item = item.map_err(io_err("list", &dir))?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            let Some(digest) = stem.strip_prefix("sha256-").map(|h| format!("sha256:{h}")) else {
                continue;
            };
            match self.lookup(&digest) {
                Ok(Some(e)) => out.push(e),
                Ok(None) | Err(CacheError::BadDigest(_)) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        }
        out.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.digest.cmp(&b.digest)));
        Ok(out)
    }

    /// Remove least-recently-used images until the cache holds at most `max_size` bytes
    /// (`None`: remove only leftovers), skipping images in use; also remove leftover work
    /// areas and half-stored images.
    pub fn gc(&self, max_size: Option<u64>) -> Result<GcReport, CacheError> {
        self.gc_with(max_size, Vec::new())
    }

    /// [`Cache::gc`], with `extra` files counted and removed under the same limit, in the
    /// same least-recently-used order.
    pub fn gc_with(
        &self,
        max_size: Option<u64>,
        extra: Vec<ExtraEntry>,
    ) -> Result<GcReport, CacheError> {
        let mut report = GcReport {
            tmp_removed: self.clean_tmp(STALE_TMP)?,
            ..GcReport::default()
        };
        self.remove_orphans()?;
        let mut entries = self.entries()?;
        entries.reverse(); // least recently used first
        let mut total: u64 =
            entries.iter().map(|e| e.size).sum::<u64>() + extra.iter().map(|e| e.size).sum::<u64>();
        let Some(max) = max_size else {
            return Ok(report);
        };
        let mut candidates: Vec<Result<Entry, ExtraEntry>> = entries
            .into_iter()
            .map(Ok)
            .chain(extra.into_iter().map(Err))
            .collect();
        // Stable: images of one age keep their order.
        candidates.sort_by_key(|c| match c {
            Ok(e) => e.last_used,
            Err(x) => x.last_used,
        });
        for c in candidates {
            if total <= max {
                break;
            }
            let e = match c {
                Ok(e) => e,
                Err(x) => {
                    match fs::remove_file(&x.path) {
                        Ok(()) => {
                            total = total.saturating_sub(x.size);
                            report.freed += x.size;
                            report.extra_freed += x.size;
                            report.extra_removed.push(x.path);
                        }
                        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                        Err(err) => {
                            tracing::warn!("cannot remove {}: {err}", x.path.display());
                            report.not_removable += 1;
                        }
                    }
                    continue;
                }
            };
            let Some(_lock) = self.lock(&e.digest, FlockArg::LockExclusiveNonblock)? else {
                report.in_use += 1;
                continue;
            };
            // The .json first: without it the entry is incomplete, so never half-used.
            let json = self.entry_path(&e.digest)?;
            if let Err(x) = fs::remove_file(&json) {
                // Someone else's image in a shared cache, say: theirs to remove.
                tracing::warn!("cannot remove {}: {x}", json.display());
                report.not_removable += 1;
                continue;
            }
            let sqsh = self.image_path(&e.digest)?;
            match fs::remove_file(&sqsh) {
                Ok(()) => {}
                Err(x) if x.kind() == io::ErrorKind::NotFound => {}
                Err(x) => return Err(io_err("remove an image", &sqsh)(x)),
            }
            let digest = e.digest.clone();
            self.update_refs(|refs| refs.retain(|_, d| *d != digest))?;
            total = total.saturating_sub(e.size);
            report.freed += e.size;
            report.removed.push(e);
        }
        Ok(report)
    }

    /// `.sqsh` files without their `.json` (an import killed between the two renames).
    fn remove_orphans(&self) -> Result<(), CacheError> {
        let dir = self.root.join("images");
        for item in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let item = item.map_err(io_err("list", &dir))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let Some(hex) = name
                .strip_suffix(".sqsh")
                .and_then(|s| s.strip_prefix("sha256-"))
            else {
                continue;
            };
            let digest = format!("sha256:{hex}");
            if check_digest(&digest).is_err() || self.entry_path(&digest)?.exists() {
                continue;
            }
            if let Some(_lock) = self.lock(&digest, FlockArg::LockExclusiveNonblock)? {
                if !self.entry_path(&digest)?.exists() {
                    let _ = fs::remove_file(item.path());
                }
            }
        }
        Ok(())
    }

    /// Remove work areas no live process holds, untouched for `older_than`.
    pub fn clean_tmp(&self, older_than: Duration) -> Result<usize, CacheError> {
        let tmp = self.root.join("tmp");
        let mut removed = 0;
        for item in fs::read_dir(&tmp).map_err(io_err("list", &tmp))? {
            let item = item.map_err(io_err("list", &tmp))?;
            let path = item.path();
            let Ok(meta) = path.symlink_metadata() else {
                continue;
            };
            let age = meta
                .modified()
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .unwrap_or_default();
            if age < older_than {
                continue;
            }
            if meta.is_dir() {
                let Ok(f) = File::open(&path) else { continue };
                let Ok(_held) = Flock::lock(f, FlockArg::LockExclusiveNonblock) else {
                    continue; // its importer is alive
                };
                if fs::remove_dir_all(&path).is_ok() {
                    removed += 1;
                }
            } else if fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// `1048576`, `512M`, `10G`, `1.5T` (binary units; a trailing `B`/`iB` is accepted).
/// Refuse `dir` (followed if `trusted` is `None`: the cache's own root may be a symlink)
/// when others can write it, or when `trusted` is given and its owner is not among them;
/// returns its owner. A missing directory passes (a read-only cache without `tmp/`).
fn check_not_writable_by_others(
    dir: &Path,
    me: u32,
    trusted: Option<&[u32; 3]>,
) -> Result<u32, CacheError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match trusted {
        None => fs::metadata(dir),
        Some(_) => fs::symlink_metadata(dir),
    };
    let meta = match meta {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(me),
        Err(e) => return Err(io_err("read the cache directory", dir)(e)),
    };
    let refuse = |detail: String| CacheError::WritableByOthers {
        path: dir.into(),
        detail,
    };
    if !meta.is_dir() {
        return Err(refuse("it is not a directory".into()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(refuse(format!("mode {mode:o}")));
    }
    if let Some(t) = trusted {
        if !t.contains(&meta.uid()) {
            return Err(refuse(format!("it belongs to uid {}", meta.uid())));
        }
    }
    Ok(meta.uid())
}

/// A size the user wrote (`--max-size`) that is not one.
#[derive(Debug, thiserror::Error)]
pub enum SizeError {
    #[error("bad size '{0}': use a number with K, M, G or T (e.g. 50G)")]
    Syntax(String),
    #[error("bad size '{0}': must be zero or more")]
    Negative(String),
}

pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(SizeError::Syntax(text.to_string())),
            };
            (&t[..t.len() - 1], (1u64 << shift) as f64)
        }
        _ => (t, 1.0),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| SizeError::Syntax(text.to_string()))?;
    if !(n >= 0.0 && n.is_finite()) {
        return Err(SizeError::Negative(text.to_string()));
    }
    Ok((n * mult) as u64)
}

/// `12.3G`-style, for tables.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn fake_build(area: &WorkArea, size: usize) -> Result<Built, CacheError> {
        let p = area.path().join("out.sqsh");
        fs::write(&p, vec![0u8; size]).unwrap();
        Ok(Built {
            squashfs: p,
            config: ImageConfig::default(),
            config_digest: None,
            layers: vec![],
        })
    }

    #[test]
    fn concurrent_importers_build_once() {
        let t = tempfile::tempdir().unwrap();
        let builds = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let root = t.path().to_path_buf();
                let builds = builds.clone();
                std::thread::spawn(move || {
                    let cache = Cache::open(&root).unwrap();
                    let (entry, _) = cache
                        .get_or_build(&digest('a'), Some("docker://x/y:1"), |area| {
                            builds.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(200));
                            fake_build(area, 10)
                        })
                        .unwrap();
                    entry
                })
            })
            .collect();
        for th in threads {
            let e = th.join().unwrap();
            assert_eq!(e.size, 10);
        }
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        let cache = Cache::open(t.path()).unwrap();
        assert_eq!(
            cache.resolve_ref("docker://x/y:1").unwrap(),
            Some(digest('a'))
        );
        assert_eq!(fs::read_dir(t.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_failed_build_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let cache = Cache::open(t.path()).unwrap();
        let r: Result<_, CacheError> = cache.get_or_build(&digest('b'), None, |area| {
            fs::write(area.path().join("half"), b"x").unwrap();
            Err(CacheError::BadDigest("boom".into()))
        });
        assert!(r.is_err());
        assert_eq!(cache.lookup(&digest('b')).unwrap(), None);
        assert_eq!(fs::read_dir(t.path().join("tmp")).unwrap().count(), 0);
        assert!(cache.image_path("sha256:../x").is_err());
    }

    #[test]
    fn gc_removes_least_recently_used_first_and_spares_images_in_use() {
        let t = tempfile::tempdir().unwrap();
        let cache = Cache::open(t.path()).unwrap();
        for (i, c) in ['1', '2', '3', '4'].into_iter().enumerate() {
            cache
                .get_or_build(&digest(c), Some(&format!("ref{c}")), |a| fake_build(a, 100))
                .unwrap();
            let mut e = cache.lookup(&digest(c)).unwrap().unwrap();
            e.last_used = 1000 + i as u64;
            cache.store(&e).unwrap();
        }
        // '1' is the oldest but in use.
        let held = cache.hold(&digest('1')).unwrap();
        let report = cache.gc(Some(250)).unwrap();
        let gone: Vec<_> = report.removed.iter().map(|e| e.digest.clone()).collect();
        assert_eq!(gone, vec![digest('2'), digest('3')]);
        assert_eq!(report.in_use, 1);
        assert_eq!(report.freed, 200);
        assert!(cache.lookup(&digest('1')).unwrap().is_some());
        assert!(!cache.image_path(&digest('2')).unwrap().exists());
        assert_eq!(cache.resolve_ref("ref2").unwrap(), None);
        assert_eq!(cache.resolve_ref("ref4").unwrap(), Some(digest('4')));
        drop(held);
        let listed: Vec<_> = cache
            .entries()
            .unwrap()
            .into_iter()
            .map(|e| e.digest)
            .collect();
        assert_eq!(listed, vec![digest('4'), digest('1')]);
        cache.touch(&digest('1')).unwrap();
        assert_eq!(cache.entries().unwrap()[0].digest, digest('1'));
    }

    #[test]
    fn gc_removes_extra_entries_in_the_same_order_as_images() {
        let t = tempfile::tempdir().unwrap();
        let cache = Cache::open(t.path()).unwrap();
        for (c, used) in [('1', 1000), ('2', 3000)] {
            cache
                .get_or_build(&digest(c), None, |a| fake_build(a, 100))
                .unwrap();
            let mut e = cache.lookup(&digest(c)).unwrap().unwrap();
            e.last_used = used;
            cache.store(&e).unwrap();
        }
        let extra: Vec<ExtraEntry> = [("old", 500), ("new", 4000), ("mid", 2000)]
            .into_iter()
            .map(|(name, used)| {
                let path = t.path().join(name);
                fs::write(&path, [0; 100]).unwrap();
                ExtraEntry {
                    path,
                    size: 100,
                    last_used: used,
                }
            })
            .collect();
        // 500 bytes, at most 250: old (500), image 1 (1000), mid (2000) go.
        let report = cache.gc_with(Some(250), extra.clone()).unwrap();
        assert_eq!(
            report.extra_removed,
            vec![t.path().join("old"), t.path().join("mid")]
        );
        assert_eq!(report.removed.len(), 1);
        assert_eq!(report.removed[0].digest, digest('1'));
        assert_eq!((report.freed, report.extra_freed), (300, 200));
        assert!(t.path().join("new").exists());
        // Without a size, only leftovers go.
        let report = cache.gc_with(None, extra[1..2].to_vec()).unwrap();
        assert!(report.extra_removed.is_empty() && t.path().join("new").exists());
    }

    #[test]
    fn stale_work_areas_and_orphans_are_removed() {
        let t = tempfile::tempdir().unwrap();
        let cache = Cache::open(t.path()).unwrap();
        let live = cache.work_area().unwrap();
        fs::create_dir(t.path().join("tmp/ferry-dead")).unwrap();
        fs::write(t.path().join("tmp/ferry-dead/x"), b"x").unwrap();
        assert_eq!(cache.clean_tmp(Duration::ZERO).unwrap(), 1);
        assert!(live.path().exists());
        let orphan = cache.image_path(&digest('c')).unwrap();
        fs::write(&orphan, b"x").unwrap();
        cache.gc(None).unwrap();
        assert!(!orphan.exists());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("2K").unwrap(), 2048);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert!(parse_size("ten")
            .unwrap_err()
            .to_string()
            .contains("e.g. 50G"));
        assert_eq!(
            parse_size("-1G").unwrap_err().to_string(),
            "bad size '-1G': must be zero or more"
        );
        assert!(parse_size("5X").is_err());
        assert_eq!(format_size(1536), "1.5K");
        assert_eq!(format_size(12), "12B");
    }
}

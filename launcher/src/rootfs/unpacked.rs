//! Unpacked containers: a writable copy of an image in a directory of the user's, made on
//! first use and kept between steps. Slurm's named containers (`--container-name`) use one
//! per job and name; `--container-save` squashes one back into an image.
//!
//! Unpacking is the price pyxis and enroot pay on every start; ferry pays it only where
//! state must outlive a step. Everything here runs as the user (in the holder, before it
//! leaves the host's namespaces, or as a helper the plugin starts as the user), so no file
//! is written with more rights than the user has.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The apt setting `assembly::let_apt_stay_root` writes, under /etc/apt/apt.conf.d.
pub const APT_REMAP_ROOT_FILE: &str = "99ferry-remap-root";

use nix::fcntl::Flock;

use crate::image::squashfs::{mksquashfs_command, OutputCompression};
use crate::image::ImageKind;
use crate::sys::child::{run_tool_watched, ToolError};

/// The unpacked root filesystem inside a container directory.
pub const ROOTFS: &str = "rootfs";
const PARTIAL: &str = "rootfs.partial";
/// Held shared by every container that uses a tree (`unpack` provider), exclusive by gc.
const LOCK: &str = ".lock";
/// Held exclusive while a tree is made: a separate file, so that making one never waits for
/// the containers that use another's (a multi-node step whose nodes share the directory
/// would wait for itself).
const UNPACK_LOCK: &str = ".unpack.lock";

#[derive(Debug, thiserror::Error)]
pub enum NamedError {
    #[error(
        "{path} belongs to uid {owner}, not to you (uid {uid}): remove it or ask its owner to"
    )]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
    #[error("{0} is not a directory (a symlink or file is in the way): remove it")]
    NotADirectory(PathBuf),
    #[error("cannot create the container directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot unpack the image into {path}: {detail}")]
    Unpack { path: PathBuf, detail: String },
    #[error("cannot save the container to {path}: {detail}")]
    Save { path: PathBuf, detail: String },
}

/// Why copying an image into a directory failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("unsquashfs made no root directory")]
    NoRoot,
    #[error("{0}")]
    Create(io::Error),
}

/// Make `dir` (and missing parents) as the calling user, mode 0700, and check that every
/// component from `owned_from` down is a real directory of the user's: a directory planted by
/// someone else in a shared place like /tmp must not receive the user's files.
pub fn make_private_dir(owned_from: &Path, dir: &Path) -> Result<(), NamedError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| NamedError::Create {
            path: dir.into(),
            source,
        })?;
    let uid = nix::unistd::getuid().as_raw();
    let mut check = dir.to_path_buf();
    loop {
        let meta = fs::symlink_metadata(&check).map_err(|source| NamedError::Create {
            path: check.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(NamedError::NotADirectory(check));
        }
        if meta.uid() != uid {
            return Err(NamedError::NotOwned {
                path: check,
                owner: meta.uid(),
                uid,
            });
        }
        if check == owned_from || !check.pop() || !check.starts_with(owned_from) {
            return Ok(());
        }
    }
}

/// What an unpack tells whoever waits for it (the holder passes each on to its caller, which
/// tells the user; see [`UnpackEvent::line`]). A warm start has none.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnpackEvent {
    /// Another process is unpacking the same image into the same place: this one waits.
    Waiting,
    /// This one unpacks an image of `image_bytes`.
    Started { image_bytes: u64 },
    /// How far it is, at most every [`UNPACK_LINE_INTERVAL`].
    Progress {
        /// Bytes written into the tree so far.
        written: u64,
        /// The share of the image read so far, 0 to 1; `None` for a directory copy.
        fraction: Option<f64>,
        seconds: f64,
    },
    /// The tree is complete.
    Done { written: u64, seconds: f64 },
}

/// How often an unpack reports how far it is: as often as an import's lines.
pub const UNPACK_LINE_INTERVAL: std::time::Duration =
    crate::image::registry::progress::LINE_INTERVAL;

impl UnpackEvent {
    /// The user's line for this event: `image` as the user named it, `node` where it runs.
    pub fn line(&self, image: &str, node: &str) -> String {
        use crate::image::registry::progress::{human_bytes, human_duration};
        match self {
            UnpackEvent::Waiting => {
                format!("ferry: waiting on {node} for another step's unpack of {image}")
            }
            UnpackEvent::Started { image_bytes } => format!(
                "ferry: unpacking {image} on {node} ({} image)",
                human_bytes(*image_bytes)
            ),
            UnpackEvent::Progress {
                written,
                fraction,
                seconds,
            } => {
                let rate = if *seconds > 0.0 {
                    (*written as f64 / seconds) as u64
                } else {
                    0
                };
                let share = match fraction {
                    Some(f) if *f > 0.0 => {
                        let left = seconds * (1.0 - f) / f;
                        format!(
                            " ({:.0}% of the image, about {} left)",
                            f * 100.0,
                            human_duration(left)
                        )
                    }
                    _ => String::new(),
                };
                format!(
                    "ferry: unpacking {image}: {} written, {}/s{share}",
                    human_bytes(*written),
                    human_bytes(rate)
                )
            }
            UnpackEvent::Done { written, seconds } => format!(
                "ferry: unpacked {image} in {} ({} written)",
                human_duration(*seconds),
                human_bytes(*written)
            ),
        }
    }
}

/// What the user is told of an unpack, from its events. The `unpack` provider's first use
/// of an image is told at once (`at_once`); a named container's or a save's own tree only
/// once its unpack has lasted [`UNPACK_LINE_INTERVAL`] (from its first progress event), so
/// that a small image's quick unpack adds no lines to a step's output.
#[derive(Debug)]
pub struct UnpackReporter {
    image: String,
    node: String,
    speak: bool,
    at_once: bool,
    said_start: bool,
    held_start: Option<UnpackEvent>,
}

impl UnpackReporter {
    /// `image` as the user named it, `node` where it runs; `speak` false: nothing at all.
    pub fn new(image: String, node: String, speak: bool, at_once: bool) -> UnpackReporter {
        UnpackReporter {
            image,
            node,
            speak,
            at_once,
            said_start: false,
            held_start: None,
        }
    }

    /// The lines to say for `event`, in order.
    pub fn lines(&mut self, event: &UnpackEvent) -> Vec<String> {
        if !self.speak {
            return Vec::new();
        }
        let mut out = Vec::new();
        match event {
            UnpackEvent::Waiting if !self.at_once => {}
            UnpackEvent::Started { .. } if !self.at_once => self.held_start = Some(event.clone()),
            UnpackEvent::Started { .. } => {
                self.said_start = true;
                out.push(event.line(&self.image, &self.node));
            }
            UnpackEvent::Progress { .. } => {
                if let Some(start) = self.held_start.take() {
                    self.said_start = true;
                    out.push(start.line(&self.image, &self.node));
                }
                out.push(event.line(&self.image, &self.node));
            }
            UnpackEvent::Done { .. } if !self.said_start => {}
            _ => out.push(event.line(&self.image, &self.node)),
        }
        out
    }
}

/// The unpacked root filesystem in the container directory `dir`, unpacking the image first
/// when this is the container's first use. Concurrent first uses (several steps, several
/// nodes sharing a file system) unpack once: the others wait on the lock and find it done.
pub fn prepare_rootfs(
    dir: &Path,
    image_path: &Path,
    kind: &ImageKind,
) -> Result<PathBuf, NamedError> {
    prepare_rootfs_observed(dir, image_path, kind, &mut |_| {})
}

/// [`prepare_rootfs`], telling `observe` when it waits, starts, how far it is and when it
/// is done.
pub fn prepare_rootfs_observed(
    dir: &Path,
    image_path: &Path,
    kind: &ImageKind,
    observe: &mut dyn FnMut(UnpackEvent),
) -> Result<PathBuf, NamedError> {
    let rootfs = dir.join(ROOTFS);
    // The tree appears only complete (renamed into place), so its presence needs no lock;
    // the exclusive lock below would wait for every container that uses the tree (they hold
    // it shared), which for a multi-node step whose nodes share this directory is forever.
    if is_tree(&rootfs) {
        return Ok(rootfs);
    }
    let lock = File::create(dir.join(UNPACK_LOCK)).map_err(|source| NamedError::Create {
        path: dir.join(UNPACK_LOCK),
        source,
    })?;
    let lock_error = |e: nix::Error| NamedError::Create {
        path: dir.join(UNPACK_LOCK),
        source: io::Error::from_raw_os_error(e as i32),
    };
    // Held until this function returns: the unpack is what must happen once. Taken without
    // waiting first, so that a wait for another's unpack can be told.
    let _lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(held) => held,
        Err((lock, nix::Error::EWOULDBLOCK)) => {
            observe(UnpackEvent::Waiting);
            nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| lock_error(e))?
        }
        Err((_, e)) => return Err(lock_error(e)),
    };
    if is_tree(&rootfs) {
        return Ok(rootfs);
    }
    let partial = dir.join(PARTIAL);
    if partial.exists() {
        // Left by an unpack that was killed.
        fs::remove_dir_all(&partial).map_err(|e| NamedError::Unpack {
            path: partial.clone(),
            detail: format!("cannot remove a partial unpack: {e}"),
        })?;
    }
    let started = std::time::Instant::now();
    let image_bytes = match kind {
        ImageKind::Squashfs { .. } => fs::metadata(image_path).map_or(0, |m| m.len()),
        ImageKind::Directory => 0,
    };
    observe(UnpackEvent::Started { image_bytes });
    let mut written = 0;
    let mut last_report = started;
    let mut tick = |pid: u32| {
        let Some(io) = io_of(pid) else { return };
        written = io.written;
        if last_report.elapsed() < UNPACK_LINE_INTERVAL {
            return;
        }
        last_report = std::time::Instant::now();
        observe(UnpackEvent::Progress {
            written,
            // unsquashfs reads the image about once, front to back.
            fraction: (image_bytes > 0).then(|| (io.read as f64 / image_bytes as f64).min(0.99)),
            seconds: started.elapsed().as_secs_f64(),
        });
    };
    let result = match kind {
        ImageKind::Squashfs { offset, .. } => unsquash(image_path, *offset, &partial, &mut tick),
        ImageKind::Directory => copy_tree(image_path, &partial, &mut tick),
    };
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&partial);
        return Err(NamedError::Unpack {
            path: dir.into(),
            detail: e.to_string(),
        });
    }
    fs::rename(&partial, &rootfs).map_err(|e| NamedError::Unpack {
        path: dir.into(),
        detail: e.to_string(),
    })?;
    tracing::info!(
        "unpacked {} into {} in {:.1} s",
        image_path.display(),
        rootfs.display(),
        started.elapsed().as_secs_f64()
    );
    observe(UnpackEvent::Done {
        written,
        seconds: started.elapsed().as_secs_f64(),
    });
    Ok(rootfs)
}

/// The `unpack` root filesystem provider: an image unpacked once into `root` (a directory
/// of the user's, checked from `owned_from` down), shared read-only by every later container
/// of that image. Returns the unpacked tree and a shared lock on it that the caller keeps
/// for the container's life, so [`remove_unused_unpacked`] never removes a tree in use.
///
/// The key is the image file's identity (device, inode, size, modification time): cached
/// imports never change, and an image file replaced by a new one gets a new tree.
pub fn unpack_shared(
    owned_from: &Path,
    root: &Path,
    image_path: &Path,
    image: &File,
    kind: &ImageKind,
    observe: &mut dyn FnMut(UnpackEvent),
) -> Result<(PathBuf, Flock<File>), NamedError> {
    let meta = image.metadata().map_err(|e| NamedError::Unpack {
        path: image_path.into(),
        detail: e.to_string(),
    })?;
    let dir = root.join(unpack_key(&meta));
    make_private_dir(owned_from, &dir)?;
    // A tree removed by `ferry gc` between the unpack and the shared lock is unpacked again.
    for _ in 0..3 {
        let rootfs = prepare_rootfs_observed(&dir, image_path, kind, observe)?;
        let lock = lock_file(&dir, nix::fcntl::FlockArg::LockShared)?;
        if rootfs.is_dir() {
            // Its modification time is the tree's last use, for whoever looks.
            let _ = lock.set_modified(std::time::SystemTime::now());
            return Ok((rootfs, lock));
        }
    }
    Err(NamedError::Unpack {
        path: dir,
        detail: "the unpacked tree keeps disappearing (is `ferry gc` running in a loop?)".into(),
    })
}

/// Whether `root` holds the finished shared tree of `image` (an open image file).
pub fn tree_ready(root: &Path, image: &File) -> bool {
    image
        .metadata()
        .is_ok_and(|m| is_tree(&root.join(unpack_key(&m)).join(ROOTFS)))
}

/// Whether the last unpack of `image`'s shared tree under `root` was cut short (a Slurm step
/// that ended first ends its background unpack) and no one is unpacking it now. `auto` then
/// unpacks in the foreground, once: steps shorter than the unpack would otherwise each start
/// it again, and none would ever find the tree.
pub fn unpack_cut_short(root: &Path, image: &File) -> bool {
    let Ok(meta) = image.metadata() else {
        return false;
    };
    let dir = root.join(unpack_key(&meta));
    if !dir.join(PARTIAL).exists() {
        return false;
    }
    // Held by a live unpack (a `ferry run`'s goes on after it): that one will finish.
    lock_named(
        &dir,
        UNPACK_LOCK,
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .is_ok()
}

/// Whether an unpacked tree is in place (it appears whole, renamed into place).
fn is_tree(rootfs: &Path) -> bool {
    fs::symlink_metadata(rootfs).is_ok_and(|m| m.is_dir())
}

/// How much larger than its image a tree is taken to be before it is made: PyTorch's lz4
/// image of 3.65 GB unpacks to 5.5 GB, zstd images of Python trees to about 2.5 times theirs.
const TREE_PER_IMAGE_BYTE: u64 = 3;
/// The share of its file system that a background unpack leaves free.
const MIN_FREE_PERCENT: u64 = 5;

/// Local disks, by `statfs` type: ext2/3/4, XFS, Btrfs, F2FS, ZFS, bcachefs.
const LOCAL_DISKS: [u64; 6] = [
    0xEF53,
    0x5846_5342,
    0x9123_683E,
    0xF2F5_2010,
    0x2FC1_2FC1,
    0xCA45_1A4E,
];

/// Why `auto` leaves an image on squashfuse instead of unpacking it.
#[derive(Debug, thiserror::Error)]
pub enum NoRoom {
    #[error("{path} is on {fs}, not a local disk: a tree there would take {what} (set named_dir= in plugstack.conf, or ferry run --cache, to a local disk; or choose the unpack provider)")]
    NotLocalDisk {
        path: PathBuf,
        fs: String,
        what: &'static str,
    },
    #[error("{path} has {free} free: the tree of a {image} image needs about {needed} and must leave {MIN_FREE_PERCENT}% of the file system free (ferry gc removes unused trees)")]
    Full {
        path: PathBuf,
        free: String,
        image: String,
        needed: String,
    },
    #[error("cannot check the file system of {path}: {source}")]
    Check { path: PathBuf, source: io::Error },
}

/// Whether a tree of an image of `image_bytes` may be unpacked under `root` in the
/// background (`auto`): on a local disk only, and leaving room there. The `unpack`
/// provider, which the user or admin chose, is not held to this.
pub fn room_for_tree(root: &Path, image_bytes: u64) -> Result<(), NoRoom> {
    use crate::image::registry::progress::human_bytes;
    // The user's directory is made on first use: its nearest existing parent tells.
    let path = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let fs = rustix::fs::statfs(path).map_err(|e| NoRoom::Check {
        path: path.into(),
        source: e.into(),
    })?;
    let kind = fs.f_type as u64;
    if !LOCAL_DISKS.contains(&kind) {
        let (fs, what) = match kind {
            0x0102_1994 => ("tmpfs".to_string(), "the node's memory"),
            0x8584_58F6 => ("ramfs".to_string(), "the node's memory"),
            0x6969 => ("NFS".to_string(), "space on a shared file system"),
            0x0BD0_0BD0 => ("Lustre".to_string(), "space on a shared file system"),
            0x4750_4653 => ("GPFS".to_string(), "space on a shared file system"),
            other => (
                format!("a file system of type {other:#x}"),
                "space that is not a local disk's",
            ),
        };
        return Err(NoRoom::NotLocalDisk {
            path: path.into(),
            fs,
            what,
        });
    }
    let block = fs.f_bsize as u64;
    let free = (fs.f_bavail as u64).saturating_mul(block);
    let keep = (fs.f_blocks as u64).saturating_mul(block) / 100 * MIN_FREE_PERCENT;
    let needed = image_bytes.saturating_mul(TREE_PER_IMAGE_BYTE);
    if free < needed.saturating_add(keep) {
        return Err(NoRoom::Full {
            path: path.into(),
            free: human_bytes(free),
            image: human_bytes(image_bytes),
            needed: human_bytes(needed),
        });
    }
    Ok(())
}

/// The hidden `ferry` command that unpacks an image's shared tree in the background.
pub const BACKGROUND_COMMAND: &str = "unpack-in-background";

/// The argument that ties a background unpack to its caller: it ends when its stdin does.
pub const WHILE_STDIN_OPEN: &str = "--while-stdin-open";

/// Have `ferry` unpack the shared tree of `image_path` under `root` (`owned_from` down the
/// user's) in the background, for the `auto` provider; returns once it has gone off on its
/// own, at the lowest priority, in a session of its own. `tied`: it ends when the returned
/// pipe end is closed (by the caller's exit), leaving its partial tree for
/// [`unpack_cut_short`] to find.
pub fn start_background_unpack(
    owned_from: &Path,
    root: &Path,
    image_path: &Path,
    tied: bool,
) -> io::Result<Option<TiedUnpack>> {
    let program = std::env::current_exe()?;
    let mut cmd = Command::new(program);
    cmd.arg(BACKGROUND_COMMAND)
        .arg(owned_from)
        .arg(root)
        .arg(image_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let tie = if tied {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        cmd.arg(WHILE_STDIN_OPEN)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)));
        Some(TiedUnpack { socket: ours })
    } else {
        cmd.stdin(Stdio::null());
        None
    };
    let status = cmd.status()?;
    if status.success() {
        Ok(tie)
    } else {
        Err(io::Error::other(format!(
            "ferry {BACKGROUND_COMMAND}: {status}"
        )))
    }
}

/// A background unpack that ends with its caller: its stdin is the other end of `socket`,
/// and it sends its process group's id there first.
pub struct TiedUnpack {
    socket: std::os::unix::net::UnixStream,
}

impl TiedUnpack {
    /// End the unpack and wait (up to two seconds) until its processes are gone, so that
    /// none of them is left in the step's cgroups when Slurm removes them.
    pub fn end(mut self) {
        use std::io::Read;
        let _ = self
            .socket
            .set_read_timeout(Some(std::time::Duration::from_millis(500)));
        let mut id = [0u8; 4];
        let group = self
            .socket
            .read_exact(&mut id)
            .ok()
            .map(|()| i32::from_le_bytes(id));
        drop(self.socket);
        let Some(group) = group else { return };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while group_alive(group) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Whether a process of the group `group` still runs (a zombie has left its cgroups).
fn group_alive(group: i32) -> bool {
    use crate::sys::proc::{read_stat, stat_field};
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    let group = group.to_string();
    entries.flatten().any(|e| {
        let pid = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok());
        pid.and_then(read_stat).is_some_and(|stat| {
            stat_field(&stat, 5) == Some(group.as_str()) && stat_field(&stat, 3) != Some("Z")
        })
    })
}

/// `ferry unpack-in-background OWNED_FROM ROOT IMAGE [--while-stdin-open]`: the parent
/// exits at once; its child unpacks, unless another process is unpacking the same tree
/// already. Tied (a Slurm step's), it and its unsquashfs end when stdin ends, and the next
/// `auto` start of the image unpacks in the foreground.
pub fn unpack_in_background(
    owned_from: &Path,
    root: &Path,
    image_path: &Path,
    while_stdin_open: bool,
) -> i32 {
    match crate::sys::raw::fork_single_threaded() {
        Ok(Some(_)) => return 0,
        Ok(None) => {}
        Err(_) => return 1,
    }
    let _ = nix::unistd::setsid();
    let _ = rustix::process::setpriority_process(None, 19);
    if while_stdin_open {
        let group = nix::unistd::getpgrp().as_raw();
        let _ = nix::unistd::write(io::stdin(), &group.to_le_bytes());
        std::thread::spawn(|| {
            use std::io::Read;
            let mut sink = [0u8; 64];
            while matches!(io::stdin().read(&mut sink), Ok(n) if n > 0) {}
            // Its own session's process group: this process and its unsquashfs.
            let _ = nix::sys::signal::killpg(nix::unistd::getpgrp(), nix::sys::signal::SIGKILL);
        });
    }
    let opened = File::open(image_path).ok().and_then(|image| {
        let kind = crate::image::detect(image_path, &image).ok()?;
        Some((image, kind))
    });
    let Some((image, kind)) = opened else {
        return 1;
    };
    // Someone else unpacks it: nothing to do here.
    let mut quit_if_waiting = |event: UnpackEvent| {
        if matches!(event, UnpackEvent::Waiting) {
            std::process::exit(0);
        }
    };
    match unpack_shared(
        owned_from,
        root,
        image_path,
        &image,
        &kind,
        &mut quit_if_waiting,
    ) {
        Ok(_) => {
            // Trees this user has not used for long go, so that `auto` keeps a node's disk
            // to the images in use.
            let _ = remove_unused_unpacked_older(root, AUTO_TREE_KEEP);
            0
        }
        Err(e) => {
            tracing::info!("background unpack of {}: {e}", image_path.display());
            1
        }
    }
}

/// The directory name of an image's shared unpacked tree: the image file's identity.
pub fn unpack_key(meta: &fs::Metadata) -> String {
    format!(
        "{:x}-{:x}-{:x}-{:x}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    )
}

fn lock_file(dir: &Path, how: nix::fcntl::FlockArg) -> Result<Flock<File>, NamedError> {
    lock_named(dir, LOCK, how)
}

fn lock_named(
    dir: &Path,
    name: &str,
    how: nix::fcntl::FlockArg,
) -> Result<Flock<File>, NamedError> {
    let path = dir.join(name);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| NamedError::Create {
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, how).map_err(|(_, e)| NamedError::Create {
        path,
        source: io::Error::from_raw_os_error(e as i32),
    })
}

/// Remove the unpacked trees under `root` that no container uses now; returns how many
/// were removed and the bytes they held (as far as they could be counted).
pub fn remove_unused_unpacked(root: &Path) -> io::Result<(usize, u64)> {
    remove_unused_unpacked_older(root, std::time::Duration::ZERO)
}

/// How long an `auto` tree that nothing uses stays on the node: a tree unused that long is
/// removed by the next background unpack of the same user.
pub const AUTO_TREE_KEEP: std::time::Duration = std::time::Duration::from_secs(14 * 24 * 3600);

/// [`remove_unused_unpacked`] of the trees last used longer than `unused_for` ago.
pub fn remove_unused_unpacked_older(
    root: &Path,
    unused_for: std::time::Duration,
) -> io::Result<(usize, u64)> {
    let mut removed = (0, 0);
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let Ok(lock) = lock_file(&dir, nix::fcntl::FlockArg::LockExclusiveNonblock) else {
            continue; // in use (or not ours to lock)
        };
        // The lock file's modification time is the tree's last use (see `unpack_shared`).
        let idle = lock
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if idle < unused_for {
            continue;
        }
        let Ok(_making) = lock_named(
            &dir,
            UNPACK_LOCK,
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        ) else {
            continue; // being made
        };
        let bytes = tree_size(&dir);
        // Make the tree writable to us first: images hold read-only directories.
        let _ = Command::new("chmod")
            .args(["-R", "u+rwX"])
            .arg(&dir)
            .status();
        match fs::remove_dir_all(&dir) {
            Ok(()) => {
                removed.0 += 1;
                removed.1 += bytes;
            }
            Err(e) => tracing::warn!("cannot remove {}: {e}", dir.display()),
        }
    }
    Ok(removed)
}

/// Remove the container directory `dir`, with the read-only directories an image holds.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    let _ = Command::new("chmod")
        .args(["-R", "u+rwX"])
        .arg(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status();
    fs::remove_dir_all(dir)
}

/// The bytes the regular files under `dir` hold (their length, not their blocks): what
/// mksquashfs reads to squash them.
fn file_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
}

/// What process `pid` has read so far (`rchar` of `/proc/PID/io`, all its threads).
fn bytes_read_by(pid: u32) -> Option<u64> {
    io_of(pid).map(|io| io.read)
}

/// The bytes a process has read and written so far (all its threads).
struct ProcessIo {
    read: u64,
    written: u64,
}

fn io_of(pid: u32) -> Option<ProcessIo> {
    let text = fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|n| n.trim().parse().ok())
    };
    Some(ProcessIo {
        read: field("rchar:")?,
        written: field("wchar:")?,
    })
}

/// The bytes the files under `dir` take on disk.
pub fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// Lines a user's unpack prints for what only root can make; device nodes are not wanted
/// in a container anyway (its /dev is the host's).
fn is_harmless(line: &str) -> bool {
    line.trim().is_empty()
        || line.contains("because you're not superuser")
        || line.contains("cannot create special file")
        || line.contains("failed to preserve ownership")
        || line.starts_with("Exit status")
}

fn run_tolerant(
    cmd: &mut Command,
    what: &str,
    on_tick: &mut dyn FnMut(u32),
) -> Result<(), ToolError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    match run_tool_watched(what, cmd, None, on_tick) {
        Err(ToolError::Failed { stderr, .. }) if stderr.lines().all(is_harmless) => Ok(()),
        Err(ToolError::Failed {
            tool,
            status,
            stderr,
        }) => {
            // Its first real complaint, not the harmless lines before or after it.
            let line = stderr.lines().find(|l| !is_harmless(l)).unwrap_or("");
            Err(ToolError::Failed {
                tool,
                status,
                stderr: line.to_string(),
            })
        }
        other => other.map(drop),
    }
}

fn unsquash(
    image: &Path,
    offset: u64,
    into: &Path,
    on_tick: &mut dyn FnMut(u32),
) -> Result<(), CopyError> {
    let mut cmd = Command::new("unsquashfs");
    cmd.args(["-q", "-n", "-no-xattrs", "-ignore-errors", "-d"])
        .arg(into)
        .arg("-o")
        .arg(offset.to_string())
        .arg(image);
    run_tolerant(&mut cmd, "unsquashfs", on_tick)
        .map_err(|e| e.with_hint("install squashfs-tools"))?;
    if !into.is_dir() {
        return Err(CopyError::NoRoot);
    }
    Ok(())
}

fn copy_tree(from: &Path, into: &Path, on_tick: &mut dyn FnMut(u32)) -> Result<(), CopyError> {
    let mut cmd = Command::new("cp");
    cmd.args(["-a", "--no-preserve=ownership"])
        .arg(from.join("."))
        .arg(into);
    fs::create_dir(into).map_err(CopyError::Create)?;
    Ok(run_tolerant(&mut cmd, "cp", on_tick)?)
}

/// Squash the root filesystem `rootfs` into the image `output`, atomically: the image
/// appears complete under its name or not at all. Files are owned by root in the image, as
/// in images built by root, so a later `--container-remap-root` sees them as its own.
pub fn save(rootfs: &Path, output: &Path) -> Result<(), NamedError> {
    save_inner(rootfs, output, None, false)
}

/// [`save`] with fast compression (lz4 instead of zstd): for copies that only ferry reads
/// back, such as `ferry build`'s step cache entries.
pub fn save_fast(rootfs: &Path, output: &Path) -> Result<(), NamedError> {
    save_inner(rootfs, output, None, true)
}

/// How far a save is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SaveProgress {
    /// Bytes of the image written so far.
    pub written: u64,
    /// The share of the container's file data that mksquashfs has read, 0 to 1; `None`
    /// when it cannot be told. An estimate: mksquashfs 4.5 redraws its own bar only on a
    /// terminal, so its reads (`/proc/PID/io`) are counted against the files' sizes.
    pub fraction: Option<f64>,
}

/// [`save`], calling `on_progress` about every [`crate::sys::child::TOOL_TICK`] while
/// mksquashfs runs.
pub fn save_watched(
    rootfs: &Path,
    output: &Path,
    on_progress: &mut dyn FnMut(SaveProgress),
) -> Result<(), NamedError> {
    save_inner(rootfs, output, Some(on_progress), false)
}

fn save_inner(
    rootfs: &Path,
    output: &Path,
    mut on_progress: Option<&mut dyn FnMut(SaveProgress)>,
    fast: bool,
) -> Result<(), NamedError> {
    let fail = |detail: String| NamedError::Save {
        path: output.into(),
        detail,
    };
    let name = output
        .file_name()
        .ok_or_else(|| fail("give a file name".into()))?;
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(fail(format!(
            "the directory {} does not exist",
            parent.display()
        )));
    }
    let mut partial_name = std::ffi::OsString::from(".");
    partial_name.push(name);
    partial_name.push(format!(".ferry-{}.partial", std::process::id()));
    let partial = parent.join(partial_name);
    let compression = if fast {
        OutputCompression::Lz4
    } else {
        OutputCompression::SHARE
    };
    let mut cmd = mksquashfs_command(Path::new("mksquashfs"), rootfs, &partial, compression);
    cmd.args(["-quiet", "-no-progress"]);
    if on_progress.is_some() {
        // By default mksquashfs 4.5 may buffer a quarter of the memory ahead of what it
        // has squashed; with less, what it has read tells how far it is.
        cmd.args(["-mem", "128M"]);
    }
    // `-e` comes last: mksquashfs takes every argument after it as a path to leave out.
    cmd
        // ferry's own apt setting for --remap-root is not part of the image.
        .arg("-e")
        .arg(format!("etc/apt/apt.conf.d/{}", APT_REMAP_ROOT_FILE))
        // Nor are the mount points of the host's GPU driver files in a named container.
        .args(
            host_mount_points(rootfs)
                .iter()
                .flat_map(|p| ["-e".as_ref(), p.as_os_str()]),
        )
        .stdout(Stdio::null());
    // Only worth a walk of the tree when someone is told.
    let to_read = on_progress.as_ref().map_or(0, |_| file_bytes(rootfs));
    let tick = |pid: u32| {
        if let Some(report) = on_progress.as_mut() {
            let read = bytes_read_by(pid);
            report(SaveProgress {
                written: fs::metadata(&partial).map_or(0, |m| m.len()),
                fraction: read
                    .filter(|_| to_read > 0)
                    .map(|r| (r as f64 / to_read as f64).min(0.99)),
            });
        }
    };
    if let Err(e) = run_tool_watched("mksquashfs", &mut cmd, None, tick) {
        let _ = fs::remove_file(&partial);
        return Err(fail(e.with_hint("install squashfs-tools").to_string()));
    }
    fs::rename(&partial, output).map_err(|e| {
        let _ = fs::remove_file(&partial);
        fail(e.to_string())
    })
}

/// Mount points ferry made in an unpacked container for host files (see `crate::rootfs::gpu`):
/// the host library directory, and empty files where the driver's programs or the host's
/// nsswitch.conf were bound.
fn host_mount_points(rootfs: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let lib_dir = Path::new(crate::rootfs::gpu::HOST_LIB_DIR.trim_start_matches('/')).to_path_buf();
    if fs::symlink_metadata(rootfs.join(&lib_dir)).is_ok_and(|m| m.is_dir()) {
        out.push(lib_dir);
    }
    let driver_programs = crate::rootfs::gpu::DRIVER_PROGRAMS
        .iter()
        .map(|name| Path::new("usr/bin").join(name));
    // The host's nsswitch.conf is bound where the image has none: an empty one saved in
    // its place would make later containers of the image keep glibc's defaults instead.
    let name_service = std::iter::once(PathBuf::from("etc/nsswitch.conf"));
    for rel in driver_programs.chain(name_service) {
        if fs::symlink_metadata(rootfs.join(&rel)).is_ok_and(|m| m.is_file() && m.len() == 0) {
            out.push(rel);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) {
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/marker"), "one\n").unwrap();
    }

    #[test]
    fn auto_unpacks_only_onto_a_local_disk_with_room() {
        // The tests' own directory is on the build machine's disk.
        let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let not_yet = disk.path().join("ferry-1000/unpacked");
        room_for_tree(&not_yet, 1 << 20).unwrap();
        match room_for_tree(&not_yet, u64::MAX / 8) {
            Err(e @ NoRoom::Full { .. }) => {
                let line = e.to_string();
                assert!(
                    line.contains("must leave 5% of the file system free"),
                    "{line}"
                );
                assert!(
                    line.starts_with(&disk.path().display().to_string()),
                    "{line}"
                );
            }
            other => panic!("{other:?}"),
        }
        // /dev/shm is memory.
        match room_for_tree(Path::new("/dev/shm/ferry-1000/unpacked"), 1) {
            Err(e @ NoRoom::NotLocalDisk { .. }) => {
                assert!(e.to_string().starts_with("/dev/shm is on tmpfs, not a local disk: a tree there would take the node's memory"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_background_unpack_removes_the_trees_unused_for_long() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for name in ["old", "recent", "old-in-use"] {
            tree(&root.join(name).join(ROOTFS));
        }
        let lock_at = |name: &str, age: std::time::Duration| {
            let lock = lock_file(&root.join(name), nix::fcntl::FlockArg::LockShared).unwrap();
            lock.set_modified(std::time::SystemTime::now() - age)
                .unwrap();
            lock
        };
        let long = AUTO_TREE_KEEP + std::time::Duration::from_secs(60);
        drop(lock_at("old", long));
        drop(lock_at("recent", std::time::Duration::from_secs(60)));
        let _in_use = lock_at("old-in-use", long);
        let (count, _) = remove_unused_unpacked_older(root, AUTO_TREE_KEEP).unwrap();
        assert_eq!(count, 1);
        let mut left: Vec<_> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["old-in-use", "recent"]);
    }

    #[test]
    fn unpacks_once_and_saves_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        tree(&src);
        let image = tmp.path().join("img.sqsh");
        let ok = Command::new("mksquashfs")
            .arg(&src)
            .arg(&image)
            .args(["-quiet", "-no-progress", "-noappend"])
            .status()
            .unwrap();
        assert!(ok.success());
        let dir = tmp.path().join("named/job1/c");
        make_private_dir(tmp.path(), &dir).unwrap();
        let kind = ImageKind::Squashfs {
            offset: 0,
            compression: crate::image::squashfs::Compression::Gzip,
        };
        let rootfs = prepare_rootfs(&dir, &image, &kind).unwrap();
        assert_eq!(
            fs::read_to_string(rootfs.join("etc/marker")).unwrap(),
            "one\n"
        );
        // The second use keeps what the first wrote.
        fs::write(rootfs.join("etc/marker"), "two\n").unwrap();
        let again = prepare_rootfs(&dir, &image, &kind).unwrap();
        assert_eq!(
            fs::read_to_string(again.join("etc/marker")).unwrap(),
            "two\n"
        );

        let saved = tmp.path().join("saved.sqsh");
        save(&rootfs, &saved).unwrap();
        let cat = Command::new("unsquashfs")
            .args(["-cat"])
            .arg(&saved)
            .arg("etc/marker")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&cat.stdout), "two\n");
        let leftovers: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_first_unpack_tells_its_start_and_end_and_a_waiter_that_it_waits() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        tree(&src);
        let dir = tmp.path().join("c");
        make_private_dir(tmp.path(), &dir).unwrap();
        // Another unpack under way: this one waits for it, says so, then unpacks.
        let other = lock_named(&dir, UNPACK_LOCK, nix::fcntl::FlockArg::LockExclusive).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let (dir, src) = (dir.clone(), src.clone());
            std::thread::spawn(move || {
                prepare_rootfs_observed(&dir, &src, &ImageKind::Directory, &mut |e| {
                    tx.send(e).unwrap()
                })
                .unwrap()
            })
        };
        assert_eq!(rx.recv().unwrap(), UnpackEvent::Waiting);
        drop(other);
        let rootfs = waiter.join().unwrap();
        let events: Vec<_> = rx.iter().collect();
        assert!(
            matches!(
                events[..],
                [UnpackEvent::Started { .. }, .., UnpackEvent::Done { .. }]
            ),
            "{events:?}"
        );
        assert!(rootfs.join("etc/marker").is_file());
        // Warm: nothing to tell.
        let mut told = Vec::new();
        prepare_rootfs_observed(&dir, &src, &ImageKind::Directory, &mut |e| told.push(e)).unwrap();
        assert_eq!(told, []);
    }

    #[test]
    fn unpack_lines_say_what_where_how_far_and_how_long() {
        let line = |e: UnpackEvent| e.line("img.sqsh", "n1");
        assert_eq!(
            line(UnpackEvent::Started {
                image_bytes: 3 << 30
            }),
            "ferry: unpacking img.sqsh on n1 (3.0 GiB image)"
        );
        assert_eq!(
            line(UnpackEvent::Progress {
                written: 400 << 20,
                fraction: Some(0.25),
                seconds: 4.0
            }),
            "ferry: unpacking img.sqsh: 400.0 MiB written, 100.0 MiB/s (25% of the image, \
             about 12 s left)"
        );
        assert_eq!(
            line(UnpackEvent::Progress {
                written: 10,
                fraction: None,
                seconds: 0.0
            }),
            "ferry: unpacking img.sqsh: 10 B written, 0 B/s"
        );
        assert_eq!(
            line(UnpackEvent::Done {
                written: 5 << 30,
                seconds: 15.2
            }),
            "ferry: unpacked img.sqsh in 15 s (5.0 GiB written)"
        );
        assert!(line(UnpackEvent::Waiting).starts_with("ferry: waiting on n1 for another"));
    }

    #[test]
    fn a_quick_unpack_of_a_named_container_says_nothing() {
        let started = UnpackEvent::Started { image_bytes: 1 };
        let progress = UnpackEvent::Progress {
            written: 1,
            fraction: None,
            seconds: 2.0,
        };
        let done = UnpackEvent::Done {
            written: 1,
            seconds: 2.5,
        };
        let said = |at_once: bool, events: &[&UnpackEvent]| {
            let mut r = UnpackReporter::new("i".into(), "n".into(), true, at_once);
            events.iter().flat_map(|e| r.lines(e)).count()
        };
        assert_eq!(said(false, &[&UnpackEvent::Waiting, &started, &done]), 0);
        assert_eq!(said(false, &[&started, &progress, &done]), 3);
        assert_eq!(said(true, &[&UnpackEvent::Waiting, &started, &done]), 3);
        let mut quiet = UnpackReporter::new("i".into(), "n".into(), false, true);
        assert!(quiet.lines(&started).is_empty());
    }

    #[test]
    fn directory_images_are_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        tree(&src);
        let dir = tmp.path().join("c");
        make_private_dir(tmp.path(), &dir).unwrap();
        let rootfs = prepare_rootfs(&dir, &src, &ImageKind::Directory).unwrap();
        fs::write(rootfs.join("etc/marker"), "changed\n").unwrap();
        assert_eq!(fs::read_to_string(src.join("etc/marker")).unwrap(), "one\n");
    }

    #[test]
    fn a_symlink_in_the_way_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/", tmp.path().join("link")).unwrap();
        let err = make_private_dir(tmp.path(), &tmp.path().join("link")).unwrap_err();
        assert!(matches!(err, NamedError::NotADirectory(_)), "{err}");
    }

    #[test]
    fn saving_into_a_missing_directory_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let err = save(tmp.path(), &tmp.path().join("nope/out.sqsh")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}

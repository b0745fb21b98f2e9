//! The few raw system calls ferry needs that `nix` does not wrap safely.
//!
//! Every `unsafe` block of the launcher lives here, each with the reason it is sound.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::unistd::{ForkResult, Pid};

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

/// `openat2(dirfd, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: resolve `path`
/// as if `dirfd` were `/`, so `..` and absolute symlinks in an image cannot lead outside it.
pub fn open_in_root(
    dirfd: BorrowedFd<'_>,
    path: &Path,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    openat2(
        dirfd,
        path,
        flags,
        mode,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )
}

/// `openat2(dirfd, name, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: open an entry
/// directly below `dirfd` without following any symlink, the last component included.
pub fn open_beneath_nofollow(
    dirfd: BorrowedFd<'_>,
    name: &Path,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    openat2(
        dirfd,
        name,
        flags | libc::O_NOFOLLOW,
        mode,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    )
}

fn openat2(
    dirfd: BorrowedFd<'_>,
    path: &Path,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let path = cstring(path)?;
    // SAFETY: open_how is plain integers; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = mode as u64;
    how.resolve = resolve;
    // SAFETY: `path` is a valid NUL-terminated string and `how` a fully initialised
    // open_how whose size we pass; the kernel only reads both.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
const AT_RECURSIVE: u32 = 0x8000;

/// `mount_setattr(2)`: add mount flags to the mount at `path` (and, with `recursive`, to
/// every mount below it) without restating flags the kernel has locked.
pub fn mount_set_flags(path: &Path, set: u64, recursive: bool) -> io::Result<()> {
    let path = cstring(path)?;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: `path` is NUL-terminated, `attr` is a mount_attr of the size we pass, and
    // the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mark every descriptor from `first` up as close-on-exec, so a program we exec keeps
/// nothing it inherited from its parent (slurmstepd waits for holders of its fds).
pub fn cloexec_from(first: u32) -> io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC changes only descriptor flags.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clear close-on-exec on `fd` so an exec'd helper inherits it.
pub fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on a descriptor number only changes its flags; a bad number fails.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `dup2` for use between fork and exec (async-signal-safe).
pub fn dup2_raw(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: dup2 on integer descriptors; failure is reported through errno.
    let rc = unsafe { libc::dup2(from, to) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// End the calling process at once with `code`, running no exit handlers and flushing no
/// buffers: for a task process forked by slurmstepd, whose atexit handlers and stdio
/// buffers are slurmstepd's.
pub fn exit_immediately(code: i32) -> ! {
    // SAFETY: _exit takes no pointers and never returns.
    unsafe { libc::_exit(code) }
}

/// Fork the calling process. Only for single-threaded callers (the `ferry` CLI): the child
/// may then run ordinary Rust code before it execs.
pub fn fork_single_threaded() -> nix::Result<Option<Pid>> {
    // SAFETY: callers are single-threaded (the ferry CLI), so the child holds no lock
    // another thread owned at fork time.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(Some(child)),
        ForkResult::Child => Ok(None),
    }
}

/// Set a signal's disposition back to the default (between fork and exec).
pub fn default_signal(signal: nix::sys::signal::Signal) -> nix::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let action = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: installing SIG_DFL involves no handler code at all.
    unsafe { sigaction(signal, &action) }.map(|_| ())
}

/// Ignore a signal (SIG_IGN).
pub fn ignore_signal(signal: nix::sys::signal::Signal) -> nix::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let action = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: installing SIG_IGN involves no handler code at all.
    unsafe { sigaction(signal, &action) }.map(|_| ())
}

/// Who sent a signal received with `sigwaitinfo`: true when a process sent it (kill,
/// sigqueue, tkill), false when the kernel did (a terminal's ^C reaches the whole
/// foreground process group, the command included, so it must not be sent twice).
pub fn sent_by_process(info: &libc::siginfo_t) -> bool {
    info.si_code <= 0
}

/// Wait for one of the blocked signals in `set`, with the sender's details.
pub fn wait_signal(set: &nix::sys::signal::SigSet) -> io::Result<libc::siginfo_t> {
    // SAFETY: siginfo_t is plain data; zeroed is a valid value for the kernel to overwrite.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `set` points to a valid sigset_t and `info` to writable siginfo_t.
        let rc = unsafe { libc::sigwaitinfo(set.as_ref(), &mut info) };
        if rc >= 0 {
            return Ok(info);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `faccessat(fd, "", mode, AT_EMPTY_PATH)`-style check through /proc, for an O_PATH fd.
pub fn access_fd(fd: BorrowedFd<'_>, mode: i32) -> io::Result<()> {
    let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
    // SAFETY: `path` is a valid C string; access only reads it.
    let rc = unsafe { libc::access(path.as_ptr(), mode) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `signal` is ignored (SIG_IGN) in this process, as a shell leaves SIGINT for a
/// background job or `nohup` leaves SIGHUP.
pub fn signal_is_ignored(signal: nix::sys::signal::Signal) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal as i32, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

// ---- the `kernel` root filesystem provider ---------------------------------------------

/// Set only the calling thread's effective uid (the raw system call: glibc's `seteuid`
/// changes every thread of the process). A caller whose real uid is root (slurmstepd with
/// its effective uid dropped to the job user) takes root back for itself alone.
pub fn set_thread_euid(uid: u32) -> io::Result<()> {
    // SAFETY: setresuid takes integers; -1 (as u32::MAX) leaves the real and saved uid.
    let rc = unsafe { libc::syscall(libc::SYS_setresuid, u32::MAX, uid, u32::MAX) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
pub const LO_FLAGS_READ_ONLY: u32 = 1;
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` of <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of <linux/loop.h> (LOOP_CONFIGURE, Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn loop_info(offset: u64, flags: u32, name: &[u8]) -> LoopInfo64 {
    // SAFETY: loop_info64 is plain integers and byte arrays; all-zero is "no setting".
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    info.lo_offset = offset;
    info.lo_flags = flags;
    let n = name.len().min(info.lo_file_name.len() - 1);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);
    info
}

/// `ioctl(LOOP_CTL_GET_FREE)` on /dev/loop-control: the number of a free loop device.
pub fn loop_get_free(control: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number or -1.
    let rc = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as u32)
}

/// `ioctl(LOOP_CONFIGURE)`: back the loop device `dev` by `backing` from `offset`, with
/// `flags` (LO_FLAGS_*), in one step; `name` is what the kernel shows as its file name.
pub fn loop_configure(
    dev: BorrowedFd<'_>,
    backing: BorrowedFd<'_>,
    offset: u64,
    flags: u32,
    name: &[u8],
) -> io::Result<()> {
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: loop_info(offset, flags, name),
        reserved: [0; 8],
    };
    // SAFETY: `config` is a fully initialised loop_config that the kernel only reads.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_CONFIGURE,
            &config as *const LoopConfig,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The older two-step form of [`loop_configure`] (`LOOP_SET_FD`, then `LOOP_SET_STATUS64`),
/// for kernels before 5.8. A read-only `backing` makes the device read-only. The device is
/// released again when the second step fails.
pub fn loop_set_fd_and_status(
    dev: BorrowedFd<'_>,
    backing: BorrowedFd<'_>,
    offset: u64,
    flags: u32,
    name: &[u8],
) -> io::Result<()> {
    // SAFETY: LOOP_SET_FD takes a descriptor number.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD, backing.as_raw_fd()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let info = loop_info(offset, flags, name);
    // SAFETY: `info` is a fully initialised loop_info64 that the kernel only reads.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_SET_STATUS64,
            &info as *const LoopInfo64,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        // SAFETY: LOOP_CLR_FD takes no argument.
        unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD, 0) };
        return Err(err);
    }
    Ok(())
}

const FSOPEN_CLOEXEC: u32 = 1;
const FSCONFIG_SET_FLAG: u32 = 0;
const FSCONFIG_SET_STRING: u32 = 1;
const FSCONFIG_CMD_CREATE: u32 = 6;
const FSMOUNT_CLOEXEC: u32 = 1;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 4;

/// `fsopen(fstype)`: a file system context, whose descriptor also carries the kernel's
/// messages about it (see [`fs_context_messages`]).
pub fn fsopen(fstype: &str) -> io::Result<OwnedFd> {
    let name = CString::new(fstype).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is NUL-terminated; the kernel only reads it.
    let fd = unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `fsconfig(FSCONFIG_SET_STRING, key, value)`, or `FSCONFIG_SET_FLAG` for `value: None`.
pub fn fsconfig_set(fs: BorrowedFd<'_>, key: &str, value: Option<&str>) -> io::Result<()> {
    let key = CString::new(key).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let value = value
        .map(CString::new)
        .transpose()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let (cmd, ptr) = match &value {
        Some(v) => (FSCONFIG_SET_STRING, v.as_ptr()),
        None => (FSCONFIG_SET_FLAG, std::ptr::null()),
    };
    // SAFETY: `key` and `value` are NUL-terminated (or null for a flag); the kernel only
    // reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            cmd,
            key.as_ptr(),
            ptr,
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fsconfig(FSCONFIG_CMD_CREATE)` then `fsmount(attrs)`: the file system, mounted nowhere
/// yet: a detached mount whose descriptor is returned (close-on-exec).
pub fn fs_create_and_mount(fs: BorrowedFd<'_>, attrs: u64) -> io::Result<OwnedFd> {
    // SAFETY: FSCONFIG_CMD_CREATE takes no key or value.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fsmount takes a descriptor and integer flags.
    let fd = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The kernel's messages about a file system context (`e squashfs: ...` lines), read from
/// its descriptor after a failed [`fsconfig_set`] or [`fs_create_and_mount`].
pub fn fs_context_messages(fs: BorrowedFd<'_>) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    for _ in 0..16 {
        // SAFETY: `buf` is writable for its length; read fails with ENODATA when empty.
        let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.push(String::from_utf8_lossy(&buf[..n as usize]).into_owned());
    }
    out
}

/// Between fork and exec of a holder: take root back (when the real uid is root), give the
/// child a mount namespace of its own whose mounts receive the host's changes but send none
/// (`MS_SLAVE`), and attach the detached mount `mount_fd` at `target` there.
pub fn attach_in_private_namespace_on_exec(
    cmd: &mut std::process::Command,
    mount_fd: RawFd,
    target: CString,
) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
    // (getuid, seteuid, unshare, mount, move_mount) on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::getuid() == 0 && libc::geteuid() != 0 && libc::seteuid(0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let rc = libc::syscall(
                libc::SYS_move_mount,
                mount_fd,
                c"".as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            );
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A user namespace whose only mappings are `uid_map` and `gid_map` (`/proc/PID/uid_map`
/// lines), for an idmapped mount: a child is cloned into a new user namespace, doing
/// nothing but wait on a pipe; the maps are written from here, its namespace opened, and
/// the child let go. Safe in a multi-threaded caller: the child runs no Rust code that
/// could take a lock (`close`, `read`, then the exit system call).
pub fn user_namespace_with_maps(uid_map: &str, gid_map: &str) -> io::Result<OwnedFd> {
    use nix::sched::CloneFlags;
    let (wait_r, wait_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (raw_r, raw_w) = (wait_r.as_raw_fd(), wait_w.as_raw_fd());
    let mut stack = vec![0u8; 16 * 1024];
    let child = Box::new(move || {
        let mut byte = 0u8;
        // SAFETY: close the child's copy of the write end (else the read below never ends),
        // then read into a one-byte buffer: end of file when the parent lets go.
        unsafe {
            libc::close(raw_w);
            libc::read(raw_r, (&mut byte as *mut u8).cast(), 1)
        };
        0
    });
    // SAFETY: without CLONE_VM the child has its own copy of memory; it only makes a read
    // system call and returns, which ends it with the exit system call (no atexit handlers).
    let pid = unsafe {
        nix::sched::clone(
            child,
            &mut stack,
            CloneFlags::CLONE_NEWUSER,
            Some(libc::SIGCHLD),
        )
    }?;
    drop(wait_r);
    let opened = (|| {
        let proc = format!("/proc/{pid}");
        std::fs::write(format!("{proc}/setgroups"), "deny")?;
        std::fs::write(format!("{proc}/uid_map"), uid_map)?;
        std::fs::write(format!("{proc}/gid_map"), gid_map)?;
        std::fs::File::open(format!("{proc}/ns/user")).map(OwnedFd::from)
    })();
    drop(wait_w);
    let _ = nix::sys::wait::waitpid(pid, None);
    opened
}

/// `mount_setattr(MOUNT_ATTR_IDMAP)` on a detached mount: file owners appear through the
/// mappings of the user namespace `userns`.
pub fn mount_set_idmap(mount: BorrowedFd<'_>, userns: BorrowedFd<'_>) -> io::Result<()> {
    const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: an empty NUL-terminated path with AT_EMPTY_PATH names `mount` itself; `attr`
    // is a mount_attr of the size we pass, which the kernel only reads.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---- dropping to the user between fork and exec ---------------------------------------

/// Who the holder runs as when the caller is root (the plugin in slurmstepd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Make `cmd` run as `run_as` (when given; the caller is root, maybe with only its
/// effective uid dropped, as in slurmstepd), optionally dying with the thread that starts
/// it, with no inherited descriptor beyond stdio.
pub fn run_as_on_exec(
    cmd: &mut std::process::Command,
    run_as: Option<Credentials>,
    die_with_parent: bool,
) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
    // (setgroups, setresgid, setresuid, prctl, close_range) on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(c) = &run_as {
                // No allocation here: the caller may be multi-threaded (slurmstepd).
                // slurmstepd runs spank callbacks with only its effective uid dropped to the
                // user; take root back first (the real uid is root) so the drop is complete.
                if libc::getuid() == 0 && libc::geteuid() != 0 {
                    libc::seteuid(0);
                }
                if libc::setgroups(c.groups.len(), c.groups.as_ptr()) != 0
                    || libc::setresgid(c.gid, c.gid, c.gid) != 0
                    || libc::setresuid(c.uid, c.uid, c.uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            if die_with_parent {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
            }
            cloexec_from(3)
        });
    }
}

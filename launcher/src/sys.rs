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

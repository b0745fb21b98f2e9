//! The system calls ferry needs with the kernel flags it uses: through `rustix` where it
//! has them, raw where neither it nor `nix` does (mount_setattr, close_range, loop devices,
//! and what runs between fork and exec).
//!
//! Every `unsafe` block of the launcher lives here, each with a `// SAFETY:` line.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::unistd::{ForkResult, Pid};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::mount::{self, MountAttrFlags};
use rustix::process::{Gid, Uid};

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
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
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
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

fn openat2(
    dirfd: BorrowedFd<'_>,
    path: &Path,
    flags: i32,
    mode: u32,
    resolve: ResolveFlags,
) -> io::Result<OwnedFd> {
    let flags = OFlags::from_bits_retain(flags as u32) | OFlags::CLOEXEC;
    Ok(rustix::fs::openat2(
        dirfd,
        path,
        flags,
        Mode::from_raw_mode(mode),
        resolve,
    )?)
}

/// `mount_setattr(2)`: add mount flags to the mount at `path` (and, with `recursive`, to
/// every mount below it) without restating flags the kernel has locked.
pub fn mount_set_flags(path: &Path, set: MountAttrFlags, recursive: bool) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 };
    mount_setattr(libc::AT_FDCWD, &path, flags as u32, set, None)
}

/// `mount_setattr(MOUNT_ATTR_IDMAP)` on a detached mount: file owners appear through the
/// mappings of the user namespace `userns`.
pub fn mount_set_idmap(mount: BorrowedFd<'_>, userns: BorrowedFd<'_>) -> io::Result<()> {
    mount_setattr(
        mount.as_raw_fd(),
        c"",
        libc::AT_EMPTY_PATH as u32,
        MountAttrFlags::MOUNT_ATTR_IDMAP,
        Some(userns),
    )
}

/// `mount_setattr(2)` (neither rustix nor nix has it), with the kernel's own `mount_attr`.
fn mount_setattr(
    dirfd: RawFd,
    path: &CStr,
    flags: u32,
    set: MountAttrFlags,
    userns: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let attr = linux_raw_sys::general::mount_attr {
        attr_set: u64::from(set.bits()),
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map_or(0, |fd| fd.as_raw_fd() as u64),
    };
    // SAFETY: `path` is NUL-terminated and `attr` a mount_attr of the size passed; the
    // kernel only reads both.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            &attr as *const linux_raw_sys::general::mount_attr,
            std::mem::size_of_val(&attr),
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
    // The system call, not glibc's close_range (2.34): the plugin loads into older glibcs.
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC changes only descriptor flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clear close-on-exec on `fd` so an exec'd helper inherits it.
fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on a descriptor number only changes its flags; a bad number fails.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `dup2` for use between fork and exec (async-signal-safe).
fn dup2_raw(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: dup2 on integer descriptors; failure is reported through errno.
    let rc = unsafe { libc::dup2(from, to) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Take ownership of descriptors this process inherited across exec under numbers its
/// parent chose (and passed on in the environment). Once per process, before it opens
/// anything else (`ferry`'s main does this first); refused for stdio, for repeated
/// numbers and for numbers not open.
pub fn adopt_inherited_fds<const N: usize>(fds: [RawFd; N]) -> io::Result<[OwnedFd; N]> {
    let owned = adopt_inherited_fd_list(&fds)?;
    Ok(owned
        .try_into()
        .unwrap_or_else(|_| unreachable!("one descriptor for each number")))
}

/// [`adopt_inherited_fds`] for a list of any length.
pub fn adopt_inherited_fd_list(fds: &[RawFd]) -> io::Result<Vec<OwnedFd>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static ADOPTED: AtomicBool = AtomicBool::new(false);
    let invalid = |why: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, why.to_string()));
    if fds.iter().any(|fd| *fd < 3) {
        return invalid("not an inherited descriptor (0, 1 and 2 are stdio)");
    }
    if (1..fds.len()).any(|i| fds[..i].contains(&fds[i])) {
        return invalid("the same descriptor twice");
    }
    for &fd in fds {
        // SAFETY: F_GETFD only reads the flags of a descriptor number; a closed one fails.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if ADOPTED.swap(true, Ordering::SeqCst) {
        return invalid("inherited descriptors were taken already");
    }
    // SAFETY: the numbers are open and distinct, and taken once per process at its start,
    // when only what was inherited across exec is open: nothing else owns them.
    Ok(fds
        .iter()
        // SAFETY: as said above.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect())
}

/// Close every descriptor from `first` up: a process forked to run on without exec (the
/// CLI's holder) keeps nothing of its parent's but what it was given below `first`.
pub fn close_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range closes descriptors only; the caller (a freshly forked child that
    // never returns into its parent's code) holds no object owning one of them that it
    // will use or drop.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the calling process has one thread (it may then fork and run on without exec).
pub fn is_single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1)
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

/// [`wait_signal`] for at most `timeout`: `None` when none came.
pub fn wait_signal_for(
    set: &nix::sys::signal::SigSet,
    timeout: std::time::Duration,
) -> io::Result<Option<libc::siginfo_t>> {
    // SAFETY: siginfo_t is plain data; zeroed is a valid value for the kernel to overwrite.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let limit = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `set`, `info` and `limit` point to valid, live values of their C types.
    let rc = unsafe { libc::sigtimedwait(set.as_ref(), &mut info, &limit) };
    if rc >= 0 {
        return Ok(Some(info));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
        _ => Err(err),
    }
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
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(rustix::fs::access(
        path.as_str(),
        rustix::fs::Access::from_bits_retain(mode as u32),
    )?)
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

/// glibc's `getopt_long` over `argv` (the program's name first) with `optstring` and the
/// long options `longs` (name, has_arg, val): where the operands start and the last
/// argument of the option whose val is `wanted`, or `None` when getopt reports an error.
/// For the test that compares ferry's reading of srun's command line with srun's own.
#[cfg(test)]
pub fn glibc_getopt_long(
    argv: &[CString],
    optstring: &CStr,
    longs: &[(CString, libc::c_int, libc::c_int)],
    wanted: libc::c_int,
) -> Option<(usize, Option<String>)> {
    use libc::{c_char, c_int};
    extern "C" {
        static mut optind: c_int;
        static mut opterr: c_int;
        static mut optarg: *mut c_char;
    }
    // getopt keeps its state in globals: one caller at a time.
    static GETOPT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = GETOPT.lock().unwrap_or_else(|e| e.into_inner());
    let mut table: Vec<libc::option> = longs
        .iter()
        .map(|(name, has_arg, val)| libc::option {
            name: name.as_ptr(),
            has_arg: *has_arg,
            flag: std::ptr::null_mut(),
            val: *val,
        })
        .collect();
    table.push(libc::option {
        name: std::ptr::null(),
        has_arg: 0,
        flag: std::ptr::null_mut(),
        val: 0,
    });
    let mut ptrs: Vec<*mut c_char> = argv.iter().map(|c| c.as_ptr() as *mut c_char).collect();
    ptrs.push(std::ptr::null_mut());
    let mut value = None;
    // SAFETY: getopt's globals are used under the lock above; `ptrs`, `optstring` and
    // `table` (NUL-terminated strings, a null-terminated array and option table) outlive
    // the calls, and optarg points into `argv` when set.
    unsafe {
        optind = 0;
        opterr = 0;
        loop {
            let r = libc::getopt_long(
                argv.len() as c_int,
                ptrs.as_ptr(),
                optstring.as_ptr(),
                table.as_ptr(),
                std::ptr::null_mut(),
            );
            if r == -1 {
                return Some((optind as usize, value));
            }
            if r == '?' as c_int || r == ':' as c_int {
                return None;
            }
            if r == wanted {
                value = Some(CStr::from_ptr(optarg).to_string_lossy().into_owned());
            }
        }
    }
}

// ---- the `kernel` root filesystem provider ---------------------------------------------

/// Set only the calling thread's effective uid (the raw system call: glibc's `seteuid`
/// changes every thread of the process). A caller whose real uid is root (slurmstepd with
/// its effective uid dropped to the job user) takes root back for itself alone.
pub fn set_thread_euid(uid: u32) -> io::Result<()> {
    Ok(rustix::thread::set_thread_res_uid(
        None::<Uid>,
        Some(Uid::from_raw(uid)),
        None::<Uid>,
    )?)
}

use linux_raw_sys::loop_device::{
    loop_config, loop_info64, LOOP_CLR_FD, LOOP_CONFIGURE, LOOP_CTL_GET_FREE, LOOP_SET_FD,
    LOOP_SET_STATUS64,
};
pub const LO_FLAGS_READ_ONLY: u32 = linux_raw_sys::loop_device::LO_FLAGS_READ_ONLY as u32;
pub const LO_FLAGS_AUTOCLEAR: u32 = linux_raw_sys::loop_device::LO_FLAGS_AUTOCLEAR as u32;

fn loop_info(offset: u64, flags: u32, name: &[u8]) -> loop_info64 {
    let mut info = loop_info64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: offset,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: flags,
        lo_file_name: [0; 64],
        lo_crypt_name: [0; 64],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    };
    let n = name.len().min(info.lo_file_name.len() - 1);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);
    info
}

/// `ioctl(LOOP_CTL_GET_FREE)` on /dev/loop-control: the number of a free loop device.
pub fn loop_get_free(control: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number or -1.
    let rc = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE.into()) };
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
    let config = loop_config {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: loop_info(offset, flags, name),
        __reserved: [0; 8],
    };
    // SAFETY: `config` is a fully initialised loop_config that the kernel only reads.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_CONFIGURE.into(),
            &config as *const loop_config,
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
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD.into(), backing.as_raw_fd()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let info = loop_info(offset, flags, name);
    // SAFETY: `info` is a fully initialised loop_info64 that the kernel only reads.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_SET_STATUS64.into(),
            &info as *const loop_info64,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        // SAFETY: LOOP_CLR_FD takes no argument.
        unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD.into(), 0) };
        return Err(err);
    }
    Ok(())
}

/// `fsopen(fstype)`: a file system context, whose descriptor also carries the kernel's
/// messages about it (see [`fs_context_messages`]).
pub fn fsopen(fstype: &str) -> io::Result<OwnedFd> {
    Ok(mount::fsopen(fstype, mount::FsOpenFlags::FSOPEN_CLOEXEC)?)
}

/// `fsconfig(FSCONFIG_SET_STRING, key, value)`, or `FSCONFIG_SET_FLAG` for `value: None`.
pub fn fsconfig_set(fs: BorrowedFd<'_>, key: &str, value: Option<&str>) -> io::Result<()> {
    match value {
        Some(value) => mount::fsconfig_set_string(fs, key, value)?,
        None => mount::fsconfig_set_flag(fs, key)?,
    }
    Ok(())
}

/// `fsconfig(FSCONFIG_CMD_CREATE)` then `fsmount(attrs)`: the file system, mounted nowhere
/// yet: a detached mount whose descriptor is returned (close-on-exec).
pub fn fs_create_and_mount(fs: BorrowedFd<'_>, attrs: MountAttrFlags) -> io::Result<OwnedFd> {
    mount::fsconfig_create(fs)?;
    Ok(mount::fsmount(
        fs,
        mount::FsMountFlags::FSMOUNT_CLOEXEC,
        attrs,
    )?)
}

/// The kernel's messages about a file system context (`e squashfs: ...` lines), read from
/// its descriptor after a failed [`fsconfig_set`] or [`fs_create_and_mount`].
pub fn fs_context_messages(fs: BorrowedFd<'_>) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    for _ in 0..16 {
        // Fails with ENODATA once no message is left.
        match rustix::io::read(fs, &mut buf) {
            Ok(n) if n > 0 => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => break,
        }
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
    // SAFETY: between fork and exec the closure makes only system calls (rustix's, which
    // neither allocate nor lock) on data prepared before fork; `mount_fd` stays open in the
    // parent until the child has exec'd, so borrowing it is sound, and unshare(CLONE_NEWNS)
    // touches no descriptor table.
    unsafe {
        cmd.pre_exec(move || {
            take_root_back()?;
            rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS)?;
            mount::mount_change(
                c"/",
                mount::MountPropagationFlags::DOWNSTREAM | mount::MountPropagationFlags::REC,
            )?;
            mount::move_mount(
                BorrowedFd::borrow_raw(mount_fd),
                c"",
                rustix::fs::CWD,
                target.as_c_str(),
                mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
            )?;
            Ok(())
        });
    }
}

/// slurmstepd runs spank callbacks with only its effective uid dropped to the user: take
/// root back (the real uid is root) before changing credentials or namespaces, so that
/// what follows is done with root's rights; a failure stops the exec. For between fork and
/// exec: the error is the bare errno (nothing may allocate there).
fn take_root_back() -> io::Result<()> {
    if rustix::process::getuid().is_root() && !rustix::process::geteuid().is_root() {
        rustix::thread::set_thread_res_uid(None::<Uid>, Some(Uid::ROOT), None::<Uid>)?;
    }
    Ok(())
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
    // Converted before fork: the caller may be multi-threaded (slurmstepd), so nothing
    // between fork and exec may allocate.
    let run_as = run_as.map(|c| {
        let groups: Vec<Gid> = c.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        (Uid::from_raw(c.uid), Gid::from_raw(c.gid), groups)
    });
    // SAFETY: between fork and exec the closure makes only system calls (rustix's, which
    // neither allocate nor lock, prctl and close_range) on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid, groups)) = &run_as {
                take_root_back()?;
                rustix::thread::set_thread_groups(groups)?;
                rustix::thread::set_thread_res_gid(*gid, *gid, *gid)?;
                rustix::thread::set_thread_res_uid(*uid, *uid, *uid)?;
            }
            if die_with_parent {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
            }
            cloexec_from(3)
        });
    }
}

/// Make `cmd`, between fork and exec, find each descriptor of `pass` at its number
/// (no close-on-exec), optionally die with the thread that starts it, and run with `root`
/// as its root directory (and working directory).
pub fn pass_fds_and_chroot_on_exec(
    cmd: &mut std::process::Command,
    pass: &[(BorrowedFd<'_>, RawFd)],
    root: &Path,
    die_with_parent: bool,
) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    const MAX: usize = 4;
    if pass.len() > MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors to pass",
        ));
    }
    let mut moves = [(-1, -1); MAX];
    for (slot, (from, to)) in moves.iter_mut().zip(pass) {
        *slot = (from.as_raw_fd(), *to);
    }
    let count = pass.len();
    let root = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
    // (dup, dup2, fcntl, prctl, chroot, chdir) on data prepared before fork, into a fixed
    // array; the descriptors passed are open in the parent until the child has exec'd.
    unsafe {
        cmd.pre_exec(move || {
            // Copies first, so that moving one descriptor cannot overwrite another.
            let mut copies = [-1; MAX];
            for (copy, (from, _)) in copies.iter_mut().zip(&moves[..count]) {
                *copy = libc::dup(*from);
                if *copy < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (copy, (_, to)) in copies.iter().zip(&moves[..count]) {
                dup2_raw(*copy, *to)?;
                clear_cloexec(*to)?;
            }
            if die_with_parent {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
            }
            rustix::process::chroot(root.as_c_str())?;
            rustix::process::chdir(c"/")?;
            Ok(())
        });
    }
    Ok(())
}

/// Bring the loopback interface `lo` of this process's network namespace up (a new network
/// namespace has it down). Needs CAP_NET_ADMIN over the namespace: its user namespace's
/// creator has it. Neither nix nor rustix sets interface flags; this is `ip link set lo up`.
pub fn set_loopback_up() -> io::Result<()> {
    // SAFETY: socket takes no pointers; a new descriptor is returned or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened above and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS writes the flags into the ifreq passed, which outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union just above.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS only reads the ifreq passed (name and flags set above).
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_credential_drop_stops_the_program() {
        // More supplementary groups than the kernel takes (NGROUPS_MAX is 65536): setgroups
        // fails, for root too, and the program must not run with the caller's credentials.
        let mut cmd = std::process::Command::new("true");
        let run_as = Credentials {
            uid: 65534,
            gid: 65534,
            groups: vec![65534; 65537],
        };
        run_as_on_exec(&mut cmd, Some(run_as), false);
        assert!(cmd.status().is_err(), "the program ran");
    }

    #[test]
    fn inherited_descriptors_must_be_open_distinct_and_not_stdio() {
        for fds in [[1, 7], [7, 7], [1 << 20, (1 << 20) + 1]] {
            assert!(adopt_inherited_fds(fds).is_err(), "{fds:?} taken");
        }
    }
}

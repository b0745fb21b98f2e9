//! Slurm calls the slurm-spank crate does not wrap: the task's argv itself, and
//! `spank_prepend_task_argv` where this Slurm has it.

use std::os::raw::{c_char, c_int};

use slurm_spank::spank_sys::{self, spank_err_t, spank_t};

/// `spank_prepend_task_argv(spank, argc, argv)` (spank.h, Slurm >= 23.11).
pub type PrependTaskArgv =
    unsafe extern "C" fn(spank_t, c_int, *const *const c_char) -> spank_err_t;

/// `spank_prepend_task_argv`, when the slurmstepd that loaded the plugin has it. Looked up
/// at run time rather than linked: the plugin builds against 22.05's headers too, which do
/// not declare it.
pub fn prepend_task_argv() -> Option<PrependTaskArgv> {
    // SAFETY: dlsym with a NUL-terminated name; a non-null result is that function, whose
    // C type is the one above.
    unsafe {
        let sym = libc::dlsym(libc::RTLD_DEFAULT, c"spank_prepend_task_argv".as_ptr());
        (!sym.is_null()).then(|| std::mem::transmute::<*mut libc::c_void, PrependTaskArgv>(sym))
    }
}

/// `S_JOB_ARGV` as Slurm keeps it: the array itself (writable; slurmstepd's own in this
/// process) and its length; `None` when Slurm has none or it is empty.
///
/// # Safety
/// `spank` must be the handle of the running callback.
pub unsafe fn job_argv(spank: spank_t) -> Option<(*mut *mut c_char, usize)> {
    let mut argc: c_int = 0;
    let mut argv: *mut *mut c_char = std::ptr::null_mut();
    let rc = spank_sys::spank_get_item(
        spank,
        spank_sys::spank_item_S_JOB_ARGV,
        &mut argc as *mut c_int,
        &mut argv as *mut *mut *mut c_char,
    );
    if rc != spank_sys::ESPANK_SUCCESS || argv.is_null() || argc < 1 || (*argv).is_null() {
        return None;
    }
    Some((argv, argc as usize))
}

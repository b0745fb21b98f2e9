//! The plugin's FFI edge beyond the slurm-spank crate's safe API: option registration and
//! option arguments, the task's argv itself, and `spank_prepend_task_argv` where this Slurm
//! has it. Every `unsafe` of the plugin is in this module, each with a `// SAFETY:` line.

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};

use slurm_spank::spank_sys::{self, spank_err_t, spank_t};

/// `spank_prepend_task_argv(spank, argc, argv)` (spank.h, Slurm >= 23.11).
type PrependTaskArgv = unsafe extern "C" fn(spank_t, c_int, *const *const c_char) -> spank_err_t;

/// `spank_prepend_task_argv`, when the slurmstepd that loaded the plugin has it. Looked up
/// at run time rather than linked: the plugin builds against 22.05's headers too, which do
/// not declare it.
pub struct PrependTask(PrependTaskArgv);

impl PrependTask {
    pub fn lookup() -> Option<PrependTask> {
        // SAFETY: dlsym with a NUL-terminated name; a non-null result is that function,
        // whose C type is the one above.
        unsafe {
            let sym = libc::dlsym(libc::RTLD_DEFAULT, c"spank_prepend_task_argv".as_ptr());
            (!sym.is_null()).then(|| {
                PrependTask(std::mem::transmute::<*mut libc::c_void, PrependTaskArgv>(
                    sym,
                ))
            })
        }
    }

    /// Put `program` in front of the task's argv. `spank` is the handle of the running
    /// task_init callback.
    pub fn prepend(&self, spank: spank_t, program: &CStr) -> Result<(), spank_err_t> {
        let args = [program.as_ptr()];
        // SAFETY: the call Slurm declares in spank.h, with the callback's handle and one
        // NUL-terminated string, which it copies.
        let rc = unsafe { (self.0)(spank, 1, args.as_ptr()) };
        if rc == spank_sys::ESPANK_SUCCESS {
            Ok(())
        } else {
            Err(rc)
        }
    }
}

/// `S_JOB_ARGV` as Slurm keeps it in task_init: the array itself (writable; slurmstepd's
/// own, in this forked task process), never empty.
pub struct TaskArgv(*mut *mut c_char);

impl TaskArgv {
    /// The task's argv; `None` when Slurm has none or it is empty. `spank` is the handle of
    /// the running task_init callback.
    pub fn of_task(spank: spank_t) -> Option<TaskArgv> {
        let mut argc: c_int = 0;
        let mut argv: *mut *mut c_char = std::ptr::null_mut();
        // SAFETY: spank_get_item(S_JOB_ARGV) with the callback's handle writes an int and a
        // pointer into the two locals; the first entry is read only when the array is
        // non-null and not empty.
        unsafe {
            let rc = spank_sys::spank_get_item(
                spank,
                spank_sys::spank_item_S_JOB_ARGV,
                &mut argc as *mut c_int,
                &mut argv as *mut *mut *mut c_char,
            );
            if rc != spank_sys::ESPANK_SUCCESS || argv.is_null() || argc < 1 || (*argv).is_null() {
                return None;
            }
        }
        Some(TaskArgv(argv))
    }

    /// The program the task was to run (argv[0]).
    pub fn first(&self) -> Vec<u8> {
        // SAFETY: of_task checked that the array has a non-null first C string.
        unsafe { CStr::from_ptr(*self.0) }.to_bytes().to_vec()
    }

    /// Make `program` the task's argv[0]. The string is leaked: slurmstepd reads it (and
    /// frees nothing) before its execve.
    pub fn replace_first(self, program: CString) {
        // SAFETY: the array is the task's argv, whose first entry slurmstepd reads before
        // its execve; the leaked string lives until then.
        unsafe { *self.0 = program.into_raw() };
    }
}

/// The optarg of an option callback: Slurm passes NULL or a NUL-terminated string valid
/// for the callback's duration, copied here.
pub fn option_argument(optarg: *const c_char) -> Option<CString> {
    // SAFETY: as above: NULL is checked, otherwise a C string that outlives this call.
    (!optarg.is_null()).then(|| unsafe { CStr::from_ptr(optarg) }.to_owned())
}

/// `spank_option_register(spank, option)`. `spank` is the handle of the running callback
/// and `option` points to 'static NUL-terminated strings (Slurm copies the struct).
pub fn register_option(spank: spank_t, option: &mut spank_sys::spank_option) -> spank_err_t {
    // SAFETY: as above; Slurm only reads the struct and keeps copies.
    unsafe { spank_sys::spank_option_register(spank, option) }
}

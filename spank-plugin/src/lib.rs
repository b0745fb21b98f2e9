//! ferry's SPANK plugin: `--container` / pyxis' `--container-*` options for srun, sbatch and
//! salloc, and the per-node container of each step (see docs/design.md, "How it works").
//!
//! Install as `spank_ferry.so` and add to plugstack.conf:
//!
//! ```text
//! required /usr/lib/x86_64-linux-gnu/slurm/spank_ferry.so ferry_bin=/usr/local/bin/ferry
//! ```
//!
//! # The FFI edge
//!
//! This file owns everything Slurm sees: the plugin symbols and the `slurm_spank_*`
//! callbacks. It uses the `slurm-spank` crate's bindings and its [`SpankHandle`] API, but not
//! its `SPANK_PLUGIN!` macro, because:
//! - the macro's option callback (`spank_option_callback`) is not guarded against panics:
//!   a panic there would abort srun or slurmstepd. Options are registered here with
//!   [`option_callback`], which catches panics;
//! - `plugin_version` must carry the version of the Slurm the plugin runs under, read from
//!   its headers at build time (see `build.rs`), not the crate's bundled bindings' version;
//! - a step without a container should cost nothing: only the callbacks ferry needs are
//!   exported, and they return at once when there is no container.
//!
//! Every callback runs inside [`guard`]: a panic becomes an error return code and a line in
//! Slurm's log, never an unwind into C.

use std::os::raw::{c_char, c_int, c_uint};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, TryLockError};

use slurm_spank::spank_sys;
use slurm_spank::{spank_log, Context, LogLevel, OptionCache, SpankHandle};

mod error;
mod local;
mod log;
mod options;
mod progress;
mod remote;
mod request;
mod slurm;

use ferry::slurm::site;

use error::PluginError;
use options::OptionCalls;
use site::PluginSettings;

include!(concat!(env!("OUT_DIR"), "/slurm_version.rs"));

// ---------------------------------------------------------------------------------------
// Plugin symbols. Slurm's plugin loader (src/common/plugin.c) requires `plugin_name`,
// `plugin_type` and `plugin_version`; for type "spank" it accepts the plugin when
// `plugin_version`'s major.minor equal its own. `spank_plugin_version` is what C's
// `SPANK_PLUGIN(name, 1)` also defines.

/// The plugin's name: Slurm logs it and names option variables after it
/// (`_SLURM_SPANK_OPTION_ferry_container_image`).
#[no_mangle]
pub static plugin_name: [u8; 6] = *b"ferry\0";
#[no_mangle]
pub static plugin_type: [u8; 6] = *b"spank\0";
#[no_mangle]
pub static plugin_version: c_uint = SLURM_VERSION_NUMBER;
#[no_mangle]
pub static spank_plugin_version: c_uint = 1;

// ---------------------------------------------------------------------------------------
// State. Slurm calls a plugin from one thread at a time; the mutex only makes that
// explicit. It is never held across a fork by another thread, so task callbacks (which run
// in a forked child of slurmstepd) find it free.

struct Plugin {
    context: Option<Context>,
    settings: Result<PluginSettings, PluginError>,
    options: OptionCalls,
    /// Option callbacks' errors, reported from init_post_opt (the callback's own return
    /// value only makes Slurm print a generic line).
    option_errors: Vec<PluginError>,
    inherited: local::Inherited,
    step: Option<remote::Step>,
}

static STATE: Mutex<Option<Plugin>> = Mutex::new(None);

thread_local! {
    /// The last panic's message and place, for [`guard`] to log.
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Replace the default panic hook, which would print to srun's or the task's stderr (with a
/// backtrace when RUST_BACKTRACE is set), by one that keeps the message for [`guard`]. The
/// hook belongs to this library's copy of std: it does not touch other plugins.
fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let what = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let place = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{what}{place}")));
        }));
    });
}

/// Run `f` with the plugin state, catching panics. Returns Slurm's return code.
fn guard(
    callback: &str,
    f: impl FnOnce(&mut Plugin, &mut OptionCache) -> Result<(), PluginError>,
) -> c_int {
    quiet_panics();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut lock = match STATE.try_lock() {
            Ok(lock) => lock,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(PluginError::Reentered {
                    callback: callback.to_string(),
                });
            }
        };
        let plugin = lock.get_or_insert_with(|| Plugin {
            context: None,
            settings: Err(PluginError::SettingsNotRead),
            options: OptionCalls::default(),
            option_errors: Vec::new(),
            inherited: local::Inherited::default(),
            step: None,
        });
        // slurm-spank's option cache, unused (ferry keeps its options in `Plugin::options`),
        // but a SpankHandle needs one.
        let mut cache = OptionCache::default();
        f(plugin, &mut cache)
    }));
    match outcome {
        Ok(Ok(())) => 0,
        Ok(Err(PluginError::Reported)) => -1,
        Ok(Err(msg)) => {
            if tracing::dispatcher::has_been_set() {
                tracing::error!("{msg}");
            } else {
                // Before init set up logging.
                spank_log(LogLevel::Error, &format!("ferry: {msg}"));
            }
            -1
        }
        Err(_) => {
            let what = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_else(|| "panic".into());
            spank_log(
                LogLevel::Error,
                &format!("ferry: internal error in {callback}: {what}"),
            );
            -1
        }
    }
}

/// Whether this is srun, sbatch or salloc (local or allocator context).
fn in_submit_command() -> bool {
    let lock = match STATE.try_lock() {
        Ok(lock) => lock,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return false,
    };
    matches!(
        lock.as_ref().and_then(|p| p.context),
        Some(Context::Local | Context::Allocator)
    )
}

/// A [`SpankHandle`] for a callback's arguments.
fn handle<'a>(
    spank: spank_sys::spank_t,
    ac: c_int,
    av: *const *const c_char,
    cache: &'a mut OptionCache,
) -> SpankHandle<'a> {
    slurm_spank::init_spank_handle(spank, ac, av, cache)
}

// ---------------------------------------------------------------------------------------
// Options.

/// Slurm calls this for each of ferry's options: in srun/sbatch/salloc while parsing the
/// command line (and `SLURM_SPANK_*` variables), in slurmstepd for the values srun
/// forwarded. `val` is the option's index in [`options::OPTIONS`].
extern "C" fn option_callback(val: c_int, optarg: *const c_char, _remote: c_int) -> c_int {
    let rc = guard("option", |plugin, _| {
        let Some(index) = options::index_of(val) else {
            return Err(PluginError::UnexpectedOption(val));
        };
        let value = slurm::option_argument(optarg);
        if let Err(e) = plugin.options.record(index, value.as_deref()) {
            plugin.option_errors.push(e);
            return Err(PluginError::BadOption);
        }
        Ok(())
    });
    // A non-zero return makes srun/sbatch exit with "Invalid --OPTION argument".
    if rc == 0 {
        0
    } else {
        -1
    }
}

fn register_options(spank: spank_sys::spank_t) -> Result<(), PluginError> {
    for (index, def) in options::OPTIONS.iter().enumerate() {
        let mut opt = spank_sys::spank_option {
            name: def.name.as_ptr().cast(),
            arginfo: def.arginfo.map_or(std::ptr::null(), |a| a.as_ptr().cast()),
            usage: def.usage.as_ptr().cast(),
            has_arg: c_int::from(def.arginfo.is_some()),
            val: index as c_int,
            cb: Some(option_callback),
        };
        let rc = slurm::register_option(spank, &mut opt);
        if rc != spank_sys::ESPANK_SUCCESS {
            return Err(PluginError::RegisterOption {
                option: def.name().to_string(),
                rc,
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Callbacks.

#[no_mangle]
pub extern "C" fn slurm_spank_init(
    spank: spank_sys::spank_t,
    ac: c_int,
    av: *const *const c_char,
) -> c_int {
    guard("init", |plugin, cache| {
        let sh = handle(spank, ac, av, cache);
        let context = sh.context()?;
        plugin.context = Some(context);
        let args = sh
            .plugin_argv()
            .map_err(|e| PluginError::PlugstackArgs(e.to_string()))?;
        plugin.settings = PluginSettings::parse(&args).map_err(PluginError::from);
        let level = plugin
            .settings
            .as_ref()
            .map(|s| s.log_level)
            .unwrap_or(site::LogLevel::Debug);
        log::init(
            level,
            matches!(context, Context::Local | Context::Allocator),
        );
        if let Err(e) = &plugin.settings {
            // Steps without a container go on; those with one fail with this message.
            tracing::error!("{e}");
        }
        match context {
            Context::Local | Context::Allocator => {
                plugin.inherited = local::Inherited::capture();
                register_options(spank)
            }
            Context::Remote => register_options(spank),
            // slurmd and prolog/epilog: nothing to do.
            Context::Slurmd | Context::JobScript => Ok(()),
        }
    })
}

#[no_mangle]
pub extern "C" fn slurm_spank_init_post_opt(
    spank: spank_sys::spank_t,
    ac: c_int,
    av: *const *const c_char,
) -> c_int {
    let rc = guard("init_post_opt", |plugin, cache| {
        if plugin.context != Some(Context::Remote) && !plugin.option_errors.is_empty() {
            return Err(plugin.option_errors.remove(0));
        }
        let sh = handle(spank, ac, av, cache);
        match plugin.context {
            Some(context @ (Context::Local | Context::Allocator)) => {
                let cwd = local::cwd()?;
                let (own, inherited) = plugin.options.split(|name| std::env::var(name).ok());
                if inherited.any() {
                    // The job's options; its resolved request is in SLURM_FERRY_CONTAINER_*.
                    tracing::debug!("options inherited from the job: {inherited:?}");
                }
                let variables = options::from_variables(|name| std::env::var(name).ok())?;
                let mut req = local::resolve(
                    context,
                    &own,
                    &variables,
                    &plugin.inherited,
                    SLURM_VERSION_NUMBER,
                    &cwd,
                )?;
                if let Some(r) = req.as_mut() {
                    match &plugin.settings {
                        Err(e) => return Err(PluginError::BrokenSite(e.to_string())),
                        Ok(settings) => {
                            local::check_named_only(r, settings, context)?;
                            local::note_read_only_remap_root(r, settings);
                            local::pin_tag(r, settings);
                            let quiet = own.quiet || inherited.quiet || variables.quiet;
                            local::import_now(r, settings, quiet)?;
                        }
                    }
                }
                local::export(req.as_ref());
                local::export_batch_script(context)
            }
            Some(Context::Remote) => {
                // Errors are kept in the step and reported by task_init.
                plugin.step = remote::init_post_opt(&sh, &plugin.options.all(), &plugin.settings);
                Ok(())
            }
            _ => Ok(()),
        }
    });
    // srun, sbatch and salloc have printed ferry's line already; a failed callback would
    // make them add two generic lines of their own. Nothing has been submitted yet.
    if rc != 0 && in_submit_command() {
        std::process::exit(1);
    }
    rc
}

#[no_mangle]
pub extern "C" fn slurm_spank_user_init(
    spank: spank_sys::spank_t,
    ac: c_int,
    av: *const *const c_char,
) -> c_int {
    guard("user_init", |plugin, cache| {
        let (Some(step), Ok(settings)) = (plugin.step.as_mut(), plugin.settings.as_ref()) else {
            return Ok(());
        };
        let sh = handle(spank, ac, av, cache);
        remote::user_init(&sh, step, settings);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn slurm_spank_task_init(
    spank: spank_sys::spank_t,
    ac: c_int,
    av: *const *const c_char,
) -> c_int {
    guard("task_init", |plugin, cache| {
        let Some(step) = plugin.step.as_ref() else {
            return Ok(());
        };
        let sh = handle(spank, ac, av, cache);
        let Err(e) = remote::task_init(&sh, spank, step) else {
            return Ok(());
        };
        // A failed callback would add Slurm's own lines ("task_init() failed", "Failed to
        // invoke spank plugin stack") to ours; this process is the task, forked to exec the
        // user's command, so end it the way a failed exec would, with one line on the
        // task's stderr (srun's terminal), once per node.
        if sh.task_id().unwrap_or(0) == 0 {
            let node = sh
                .getenv("SLURMD_NODENAME")
                .ok()
                .flatten()
                .unwrap_or_default();
            let line = format!("ferry: error on node {node}: {e}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        }
        tracing::debug!("task_init: {e}");
        ferry::sys::raw::exit_immediately(ferry::container::exit_code::SETUP_FAILED)
    })
}

#[no_mangle]
pub extern "C" fn slurm_spank_task_exit(
    _spank: spank_sys::spank_t,
    _ac: c_int,
    _av: *const *const c_char,
) -> c_int {
    guard("task_exit", |plugin, _| {
        if let Some(step) = plugin.step.as_mut() {
            remote::task_exit(step);
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn slurm_spank_exit(
    _spank: spank_sys::spank_t,
    _ac: c_int,
    _av: *const *const c_char,
) -> c_int {
    guard("exit", |plugin, _| {
        if let Some(step) = plugin.step.as_mut() {
            remote::exit(step);
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn slurm_spank_job_epilog(
    spank: spank_sys::spank_t,
    ac: c_int,
    av: *const *const c_char,
) -> c_int {
    guard("job_epilog", |plugin, cache| {
        let sh = handle(spank, ac, av, cache);
        // Slurm calls no slurm_spank_init before a job prolog or epilog: read the arguments here.
        if plugin.context.is_none() {
            let args = sh.plugin_argv().unwrap_or_default();
            plugin.settings = PluginSettings::parse(&args).map_err(PluginError::from);
        }
        let Ok(settings) = plugin.settings.as_ref() else {
            return Ok(());
        };
        let (uid, job_id) = match (sh.job_uid(), sh.job_id()) {
            (Ok(uid), Ok(job_id)) => (uid, job_id),
            (uid, job) => {
                spank_log(
                    LogLevel::Error,
                    &format!("ferry: job_epilog: no job uid or id ({uid:?}, {job:?})"),
                );
                return Ok(());
            }
        };
        remote::remove_job_containers(settings, uid, job_id);
        Ok(())
    })
}

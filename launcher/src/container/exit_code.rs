//! The exit statuses ferry gives instead of the command's own, as podman and docker do:
//! `ferry run`, a task's `ferry` and the plugin's failed tasks all use these.

/// ferry could not set up the container (or was used wrongly).
pub const SETUP_FAILED: i32 = 125;
/// The command exists but cannot be executed.
pub const CANNOT_EXECUTE: i32 = 126;
/// The command is not found.
pub const NOT_FOUND: i32 = 127;

/// The status of a process that died by signal `signal`, as shells report it.
pub fn killed_by(signal: i32) -> i32 {
    128 + signal
}

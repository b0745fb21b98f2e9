//! `ferry` as the program of a Slurm task that runs the image's entrypoint
//! (`srun --container-entrypoint`).
//!
//! The plugin's task_init runs in the task's process just before slurmstepd execs the
//! task's argv, and it cannot exec that argv itself: slurmstepd still has work to do after
//! task_init (the TaskProlog and `--task-prolog`, TMPDIR, `PATH` resolution of argv[0],
//! the user's resource limits), in Slurm 22.05 and 24.11 alike (`exec_task` in
//! src/slurmd/slurmstepd/task.c). What task_init can change is the argv that slurmstepd
//! execs: it makes the task exec this program (the host's `ferry`, by absolute path)
//! instead, without entering the container itself, and passes the container in the
//! environment variable [`ENV`] (descriptors of its namespaces, inherited through the exec,
//! its working directory and the image's start command). `ferry` then enters the container,
//! removes [`ENV`] from the environment, builds the command with the same rule as
//! `ferry run --entrypoint` ([`crate::entrypoint::command_line`]) and execs it in place: the
//! task's pid, signals and exit status stay the command's.
//!
//! `ferry` runs on the host, before entering the container, because a program run inside
//! it would have to work with whatever the image has (no shell, another C library, none):
//! the host's `ferry` needs nothing from the image.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::entrypoint::{self, ImageStart};
use crate::join::{self, Namespaces};
use crate::run::{exec_searching, EXIT_SETUP_FAILED};

/// The variable that makes `ferry` a task's program; it holds a [`TaskExec`] as JSON.
pub const ENV: &str = "FERRY_TASK_EXEC";

/// What the plugin hands to the task's `ferry`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskExec {
    /// Inherited descriptors of the container's user and mount namespaces.
    pub user_fd: i32,
    pub mnt_fd: i32,
    /// Where the command starts, inside the container.
    pub workdir: PathBuf,
    /// The image's Entrypoint, Cmd and whether it has enroot's /etc/rc.
    pub start: ImageStart,
    /// The task's own argv[0] when `ferry` took its place in the argv (Slurm before 23.11,
    /// where the argv can only be changed in place), as bytes; `None` when `ferry` was put
    /// in front of the task's whole argv.
    #[serde(default)]
    pub argv0: Option<Vec<u8>>,
}

impl TaskExec {
    /// The task's argv, from the argv `ferry` was started with.
    pub fn task_argv(&self, own: &[OsString]) -> Vec<OsString> {
        let rest = own.iter().skip(1).cloned();
        match &self.argv0 {
            Some(first) => std::iter::once(OsString::from_vec(first.clone()))
                .chain(rest)
                .collect(),
            None => rest.collect(),
        }
    }
}

/// When this process was started as a task's program ([`ENV`] is set), enter the container
/// and exec the task's command; does not return then. Must run first in `main`, while the
/// process has one thread (entering a user namespace needs that).
pub fn run_if_asked() {
    if let Some(value) = std::env::var_os(ENV) {
        exec_task(&value)
    }
}

fn fail(message: &str) -> ! {
    eprintln!("ferry: error: {message}");
    std::process::exit(EXIT_SETUP_FAILED)
}

fn exec_task(value: &std::ffi::OsStr) -> ! {
    let task: TaskExec = serde_json::from_slice(value.as_bytes())
        .unwrap_or_else(|e| fail(&format!("bad {ENV} (set by ferry's Slurm plugin): {e}")));
    if task.user_fd < 3 || task.mnt_fd < 3 || task.user_fd == task.mnt_fd {
        fail(&format!(
            "bad {ENV}: descriptors {} and {}",
            task.user_fd, task.mnt_fd
        ));
    }
    // SAFETY: nothing else in this fresh process owns these inherited descriptors.
    let namespaces = unsafe { Namespaces::from_raw_fds(task.user_fd, task.mnt_fd) };
    if let Err(e) = join::join(&namespaces, &task.workdir) {
        fail(&e.to_string());
    }
    drop(namespaces);

    let own: Vec<OsString> = std::env::args_os().collect();
    let argv = entrypoint::command_line(&task.start, &task.task_argv(&own), true);
    if argv.is_empty() {
        fail("no command to run");
    }
    let mut search_path = String::from("/usr/local/bin:/usr/bin:/bin");
    let mut envp = Vec::new();
    for (name, value) in std::env::vars_os() {
        if name == ENV {
            continue;
        }
        if name == "PATH" {
            search_path = value.to_string_lossy().into_owned();
        }
        let mut entry = name.into_vec();
        entry.push(b'=');
        entry.extend(value.into_vec());
        envp.extend(CString::new(entry).ok());
    }
    let args: Vec<CString> = argv
        .into_iter()
        .map(|a| CString::new(a.into_vec()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|_| fail("an argument holds a NUL byte"));
    exec_searching(&args, &envp, &search_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn task(argv0: Option<&str>) -> TaskExec {
        TaskExec {
            user_fd: 10,
            mnt_fd: 11,
            workdir: "/w".into(),
            start: ImageStart::default(),
            argv0: argv0.map(|a| a.as_bytes().to_vec()),
        }
    }

    #[test]
    fn the_tasks_argv_comes_back_whether_ferry_replaced_or_preceded_argv0() {
        // Slurm 22.05: ferry's path took argv[0]'s place.
        assert_eq!(
            task(Some("hostname")).task_argv(&os(&["/usr/bin/ferry", "-s"])),
            os(&["hostname", "-s"])
        );
        // Slurm >= 23.11: ferry was prepended.
        assert_eq!(
            task(None).task_argv(&os(&["/usr/bin/ferry", "hostname", "-s"])),
            os(&["hostname", "-s"])
        );
    }

    #[test]
    fn travels_as_json() {
        let t = TaskExec {
            start: ImageStart {
                entrypoint: vec!["/e".into()],
                ..ImageStart::default()
            },
            ..task(Some("a\u{e9}"))
        };
        let text = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<TaskExec>(&text).unwrap(), t);
    }
}

//! Named containers on a node: `--container-name=NAME[:FLAG]` (pyxis' flags), the records
//! by which a step finds the container another step of its job runs right now (to attach
//! to it), and the listing and removal behind `ferry containers`.
//!
//! A running holder records itself in `named_dir/ferry-UID/jobJOB/.running/NAME` (written
//! and removed by the holder, as the user). The file is the user's, so nothing in it is
//! trusted: a step that finds one checks that the process it names runs on this node, was
//! started when the record says (not a reused pid), and belongs to the user; and the join
//! itself is done by the user's task, which the kernel lets into user namespaces of that
//! user only.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::container::holder::Ready;
use crate::container::join::Namespaces;
use crate::spec::RunningRecordPlace;
use crate::sys::child::Pidfd;

/// The longest name: one file name.
pub const MAX_NAME: usize = 255;

/// The directory of a job's running-container records, in the job's directory.
pub const RUNNING_DIR: &str = ".running";

/// The most read of a record (the image's environment is in it).
const MAX_RECORD: u64 = crate::container::holder::MAX_REPORT as u64 + (64 << 10);

/// What `--container-name=NAME:FLAG` asks of a container of that name (pyxis 0.24's flags,
/// and `no_create`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NameFlag {
    /// Attach to it when running, else start it from its saved state, else create it.
    #[default]
    Auto,
    /// It must not exist yet.
    Create,
    /// It must be running: attach to it.
    Exec,
    /// Never attach: start it from its saved state (or create it) even while it runs.
    NoExec,
    /// It must exist (running or saved): never create it.
    NoCreate,
}

impl NameFlag {
    pub const ALL: [NameFlag; 5] = [
        NameFlag::Auto,
        NameFlag::Create,
        NameFlag::Exec,
        NameFlag::NoExec,
        NameFlag::NoCreate,
    ];

    pub fn word(self) -> &'static str {
        match self {
            NameFlag::Auto => "auto",
            NameFlag::Create => "create",
            NameFlag::Exec => "exec",
            NameFlag::NoExec => "no_exec",
            NameFlag::NoCreate => "no_create",
        }
    }
}

impl FromStr for NameFlag {
    type Err = NameError;
    fn from_str(word: &str) -> Result<NameFlag, NameError> {
        NameFlag::ALL
            .into_iter()
            .find(|f| f.word() == word)
            .ok_or_else(|| NameError::UnknownFlag(word.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty; write NAME or NAME:FLAG, e.g. --container-name=build")]
    Empty,
    #[error("the name has a `/`; a name is one word, e.g. --container-name=build")]
    Slash,
    #[error("the name is {0} characters long; the most is 255")]
    TooLong(usize),
    #[error("use letters, digits, `.`, `_` and `-` (not first), e.g. --container-name=build")]
    BadCharacter,
    #[error("unknown flag `{0}`; the flags are auto, create, exec, no_exec and no_create")]
    UnknownFlag(String),
}

/// Split `NAME[:FLAG]` and check both.
pub fn parse(text: &str) -> Result<(String, NameFlag), NameError> {
    let (name, flag) = match text.split_once(':') {
        Some((name, "")) => (name, NameFlag::Auto),
        Some((name, flag)) => (name, flag.parse()?),
        None => (text, NameFlag::Auto),
    };
    check_name(name)?;
    Ok((name.to_string(), flag))
}

/// Check a container name: it names a directory and a file on each node.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.contains('/') {
        return Err(NameError::Slash);
    }
    let len = name.chars().count();
    if len > MAX_NAME {
        return Err(NameError::TooLong(len));
    }
    let ok = !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(NameError::BadCharacter)
    }
}

/// Why a step cannot have the container its `--container-name` flag asks for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChoiceError {
    #[error("--container-name={name}:create: a container of that name exists already{}; drop :create to use it, or remove it first (`ferry containers rm {name}`)", if *.running { " and runs" } else { "" })]
    Exists { name: String, running: bool },
    #[error("--container-name={name}:exec: no step of this job runs a container of that name on this node now; start that step first, or drop :exec")]
    NotRunning { name: String },
    #[error("--container-name={name}:no_create: no container of that name on this node; make it first with --container-image=IMAGE --container-name={name}")]
    Missing { name: String },
}

/// Whether a step attaches to the running container (`true`) or starts one (from the saved
/// state when `exists`, else from the image), given its flag.
pub fn attaches(
    name: &str,
    flag: NameFlag,
    running: bool,
    exists: bool,
) -> Result<bool, ChoiceError> {
    let name = name.to_string();
    match flag {
        NameFlag::Create if running || exists => Err(ChoiceError::Exists { name, running }),
        NameFlag::Exec if !running => Err(ChoiceError::NotRunning { name }),
        NameFlag::NoCreate if !running && !exists => Err(ChoiceError::Missing { name }),
        NameFlag::NoExec | NameFlag::Create => Ok(false),
        NameFlag::Auto | NameFlag::Exec | NameFlag::NoCreate => Ok(running),
    }
}

/// What a running holder says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunningRecord {
    /// The node's name (uname), so that a record on a shared `named_dir` names no process
    /// of another node.
    pub host: String,
    /// The container's name (the record's file is `NAME@PID`).
    pub name: String,
    pub job: u32,
    pub step: String,
    pub uid: u32,
    pub pid: i32,
    /// The holder's start time (`/proc/PID/stat`), which a reused pid does not have.
    pub start_time: u64,
    pub ready: Ready,
}

/// This node's name, as the kernel has it.
pub fn host_name() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.nodename().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// When process `pid` started, in clock ticks since boot (field 22 of `/proc/PID/stat`).
pub fn start_time(pid: i32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: count after its end.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no ) in stat"))?;
    after
        .split_whitespace()
        .nth(19)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no start time in stat"))
}

/// Whether every uid of process `pid` (real, effective, saved, file system) is `uid`.
fn runs_as(pid: i32, uid: u32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|ids| {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            ids.len() == 4 && ids.iter().all(|i| i.parse() == Ok(uid))
        })
}

/// The holder's side: its record, written once the container is ready and removed when the
/// holder ends.
pub struct Recorder {
    dir: OwnedFd,
    /// The record's file name.
    file: String,
    record: RunningRecord,
}

impl Recorder {
    /// Make the records directory (as the user, private) and open it, before the holder
    /// leaves the host's file system.
    pub fn open(
        place: &RunningRecordPlace,
    ) -> Result<Recorder, crate::rootfs::unpacked::NamedError> {
        crate::rootfs::unpacked::make_private_dir(&place.owned_from, &place.dir)?;
        let dir = rustix::fs::open(
            &place.dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| crate::rootfs::unpacked::NamedError::Create {
            path: place.dir.clone(),
            source: e.into(),
        })?;
        let pid = std::process::id() as i32;
        Ok(Recorder {
            dir,
            file: record_file(&place.name, pid),
            record: RunningRecord {
                host: host_name(),
                name: place.name.clone(),
                job: place.job,
                step: place.step.clone(),
                uid: nix::unistd::getuid().as_raw(),
                pid,
                start_time: start_time(pid).unwrap_or(0),
                ready: Ready {
                    pid,
                    env: Vec::new(),
                    workdir: PathBuf::from("/"),
                    start: Default::default(),
                    phases: Vec::new(),
                },
            },
        })
    }

    /// Say that the container is ready: written aside, then renamed over the name, so a
    /// reader sees a whole record or none.
    pub fn write(&mut self, ready: &Ready) -> io::Result<()> {
        self.record.ready = Ready {
            pid: self.record.pid,
            ..ready.clone()
        };
        let text = serde_json::to_vec(&self.record).map_err(io::Error::other)?;
        let aside = format!(".{}.tmp", self.file);
        let fd = rustix::fs::openat(
            &self.dir,
            aside.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let mut file = fs::File::from(fd);
        let written = file.write_all(&text);
        drop(file);
        if let Err(e) = written.and_then(|()| {
            rustix::fs::renameat(&self.dir, aside.as_str(), &self.dir, self.file.as_str())
                .map_err(io::Error::from)
        }) {
            let _ = rustix::fs::unlinkat(&self.dir, aside.as_str(), rustix::fs::AtFlags::empty());
            return Err(e);
        }
        Ok(())
    }

    /// Remove the record.
    pub fn remove(&self) {
        let _ = rustix::fs::unlinkat(&self.dir, self.file.as_str(), rustix::fs::AtFlags::empty());
    }
}

/// Read the record `name` in the directory `dir`: a regular file (not followed through a
/// symlink, not a FIFO that would block), read up to a cap.
fn read_record_at(dir: impl AsFd, name: &str) -> io::Result<RunningRecord> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let file = fs::File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a file"));
    }
    let mut text = Vec::new();
    file.take(MAX_RECORD).read_to_end(&mut text)?;
    let record: RunningRecord =
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if meta.uid() != record.uid || record_file(&record.name, record.pid) != name {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not its owner's",
        ));
    }
    Ok(record)
}

/// A container another step runs now, as a step that attaches to it finds it.
pub struct Running {
    pub record: RunningRecord,
    pub namespaces: Namespaces,
}

/// The container `name` that a holder of user `uid` runs now on this node, from the records
/// in `dir` (`None`: no record, or only stale or foreign ones). Where several holders of the
/// name run (a step with `:no_exec` started its own), the earliest is the one to join. Its
/// namespaces are opened here and checked to be the recorded holder's.
pub fn find_running(dir: &Path, name: &str, uid: u32) -> Option<Running> {
    let mut live: Vec<(RunningRecord, Pidfd)> = records_in(dir)
        .into_iter()
        .filter(|r| r.name == name)
        .filter_map(|r| live_holder(&r, uid).map(|p| (r, p)))
        .collect();
    live.sort_by_key(|(r, _)| r.start_time);
    let (record, pidfd) = live.into_iter().next()?;
    let namespaces = Namespaces::of_process(record.pid, &pidfd).ok()?;
    Some(Running { record, namespaces })
}

/// A record's file name: the container's name and the holder's pid, joined by a character
/// no name has.
fn record_file(name: &str, pid: i32) -> String {
    format!("{name}@{pid}")
}

/// The records in `dir` that can be read (live or not).
fn records_in(dir: &Path) -> Vec<RunningRecord> {
    let Ok(dir_fd) = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            n.split_once('@')
                .is_some_and(|(name, _)| check_name(name).is_ok())
        })
        .filter_map(|n| read_record_at(&dir_fd, &n).ok())
        .collect()
}

/// The recorded holder's pidfd, when it runs on this node now, as `uid`, since the
/// recorded time.
fn live_holder(record: &RunningRecord, uid: u32) -> Option<Pidfd> {
    if record.uid != uid || record.host != host_name() || record.pid <= 1 {
        return None;
    }
    let pidfd = Pidfd::of_process(record.pid).ok()?;
    // Checked after taking the pidfd: from here on the pid cannot go to another process.
    let same = start_time(record.pid).is_ok_and(|t| t == record.start_time)
        && runs_as(record.pid, uid)
        && !pidfd.has_exited();
    same.then_some(pidfd)
}

/// One container of `ferry containers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    /// The job it belongs to; `None`: kept across jobs (`container_scope=global`).
    pub job: Option<u32>,
    /// Its saved state, when it has one (unnamed running containers have none).
    pub dir: Option<PathBuf>,
    /// The step (`JOB.STEP`) running it now.
    pub running: Option<String>,
}

/// The user's containers under `user_dir` (`named_dir/ferry-UID`): named ones of every job
/// and those kept across jobs, and the ones running now (unnamed ones as `JOBID.STEPID`).
pub fn list(user_dir: &Path, uid: u32) -> io::Result<Vec<Listed>> {
    let mut out = Vec::new();
    let mut running: Vec<RunningRecord> = Vec::new();
    let entries = match fs::read_dir(user_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        if file_name == "named" {
            for name in container_dirs(&path) {
                out.push(Listed {
                    dir: Some(path.join(&name)),
                    name,
                    job: None,
                    running: None,
                });
            }
        } else if let Some(job) = file_name.strip_prefix("job").and_then(|j| j.parse().ok()) {
            for name in container_dirs(&path) {
                out.push(Listed {
                    dir: Some(path.join(&name)),
                    name,
                    job: Some(job),
                    running: None,
                });
            }
            running.extend(live_records(&path.join(RUNNING_DIR), uid));
        }
    }
    for record in running {
        let step = format!("{}.{}", record.job, record.step);
        let name = record.name.clone();
        let mine = |l: &&mut Listed| l.name == name && l.job.is_none_or(|j| j == record.job);
        match out.iter_mut().find(mine) {
            Some(l) => l.running = Some(step),
            None => out.push(Listed {
                name,
                job: Some(record.job),
                dir: None,
                running: Some(step),
            }),
        }
    }
    out.sort_by(|a, b| (a.job, &a.name).cmp(&(b.job, &b.name)));
    Ok(out)
}

/// The container directories in `dir` (not the job's own files, which start with `.`).
fn container_dirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| check_name(n).is_ok())
        .collect()
}

/// The records in `dir` whose holders run now.
fn live_records(dir: &Path, uid: u32) -> Vec<RunningRecord> {
    records_in(dir)
        .into_iter()
        .filter(|r| live_holder(r, uid).is_some())
        .collect()
}

/// Why `ferry containers rm NAME` removed nothing.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("{name}: {error}")]
    BadName { name: String, error: NameError },
    #[error("no container named {name} on this node{}", match .job { Some(j) => format!(" in job {j}"), None => String::new() })]
    Missing { name: String, job: Option<u32> },
    #[error("{name} is in several jobs here ({}): give one with --job", .jobs.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))]
    Ambiguous { name: String, jobs: Vec<u32> },
    #[error("{name} is running (step {step}): end that step first")]
    Running { name: String, step: String },
    #[error("cannot remove {}: {source}", path.display())]
    Remove { path: PathBuf, source: io::Error },
}

/// Remove the user's container `name` under `user_dir` (of `job` when given; else the only
/// one of that name), refusing one that runs. Returns its directory.
pub fn remove(
    user_dir: &Path,
    uid: u32,
    name: &str,
    job: Option<u32>,
) -> Result<PathBuf, RemoveError> {
    check_name(name).map_err(|error| RemoveError::BadName {
        name: name.to_string(),
        error,
    })?;
    let all = list(user_dir, uid).map_err(|source| RemoveError::Remove {
        path: user_dir.to_path_buf(),
        source,
    })?;
    let matches: Vec<&Listed> = all
        .iter()
        .filter(|l| l.name == name && l.dir.is_some())
        .filter(|l| job.is_none() || l.job.is_none() || l.job == job)
        .collect();
    let found = match matches.as_slice() {
        [] => {
            return Err(RemoveError::Missing {
                name: name.to_string(),
                job,
            })
        }
        [one] => *one,
        several => {
            return Err(RemoveError::Ambiguous {
                name: name.to_string(),
                jobs: several.iter().filter_map(|l| l.job).collect(),
            })
        }
    };
    // A container kept across jobs may run in any job: every job's records count.
    let running = all.iter().find(|l| {
        l.name == name && l.running.is_some() && (found.job.is_none() || l.job == found.job)
    });
    if let Some(step) = running.and_then(|l| l.running.clone()) {
        return Err(RemoveError::Running {
            name: name.to_string(),
            step,
        });
    }
    let dir = found.dir.clone().expect("filtered on dir");
    crate::rootfs::unpacked::remove_tree(&dir).map_err(|source| RemoveError::Remove {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_decide_between_attaching_and_starting() {
        use NameFlag::*;
        // (flag, running, exists) -> attach?
        for (flag, running, exists, attach) in [
            (Auto, true, true, true),
            (Auto, false, true, false),
            (Auto, false, false, false),
            (NoExec, true, true, false),
            (NoExec, false, false, false),
            (Exec, true, false, true),
            (NoCreate, true, true, true),
            (NoCreate, false, true, false),
            (Create, false, false, false),
        ] {
            assert_eq!(
                attaches("w", flag, running, exists),
                Ok(attach),
                "{flag:?} {running} {exists}"
            );
        }
        assert!(matches!(
            attaches("w", Create, false, true),
            Err(ChoiceError::Exists { running: false, .. })
        ));
        assert!(matches!(
            attaches("w", Create, true, true),
            Err(ChoiceError::Exists { running: true, .. })
        ));
        assert!(matches!(
            attaches("w", Exec, false, true),
            Err(ChoiceError::NotRunning { .. })
        ));
        assert!(matches!(
            attaches("w", NoCreate, false, false),
            Err(ChoiceError::Missing { .. })
        ));
    }

    #[test]
    fn names_and_flags_parse() {
        assert_eq!(parse("a").unwrap(), ("a".into(), NameFlag::Auto));
        assert_eq!(
            parse("a:no_create").unwrap(),
            ("a".into(), NameFlag::NoCreate)
        );
        assert_eq!(parse("a:").unwrap(), ("a".into(), NameFlag::Auto));
        assert_eq!(parse(""), Err(NameError::Empty));
        assert_eq!(parse("a/b:exec"), Err(NameError::Slash));
        assert_eq!(parse(&"x".repeat(256)), Err(NameError::TooLong(256)));
        assert_eq!(parse("a:nope"), Err(NameError::UnknownFlag("nope".into())));
        assert_eq!(parse("a@1"), Err(NameError::BadCharacter));
    }

    #[test]
    fn start_time_of_this_process_is_read() {
        let pid = std::process::id() as i32;
        assert_eq!(start_time(pid).unwrap(), start_time(pid).unwrap());
        assert!(runs_as(pid, nix::unistd::getuid().as_raw()));
    }

    #[test]
    fn records_name_live_holders_only() {
        let base = tempfile::tempdir().unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let user_dir = base.path().join("ferry-me");
        let place = RunningRecordPlace {
            owned_from: user_dir.clone(),
            dir: user_dir.join("job7").join(RUNNING_DIR),
            name: "work".into(),
            job: 7,
            step: "2".into(),
        };
        std::fs::create_dir_all(user_dir.join("job7/work/rootfs")).unwrap();
        std::fs::create_dir_all(user_dir.join("named/tools/rootfs")).unwrap();
        let mut recorder = Recorder::open(&place).unwrap();
        let ready = Ready {
            pid: 1,
            env: vec![("A".into(), "1".into())],
            workdir: "/w".into(),
            start: Default::default(),
            phases: Vec::new(),
        };
        recorder.write(&ready).unwrap();
        // This process stands in for the holder: it runs, so the record is live.
        let running = find_running(&place.dir, "work", uid).unwrap();
        assert_eq!(running.record.ready.env, ready.env);
        assert_eq!(running.record.ready.workdir, PathBuf::from("/w"));
        assert!(find_running(&place.dir, "other", uid).is_none());
        assert!(find_running(&place.dir, "work", uid + 1).is_none());
        let listed = list(&user_dir, uid).unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|l| (l.name.as_str(), l.job, l.running.as_deref()))
                .collect::<Vec<_>>(),
            [("tools", None, None), ("work", Some(7), Some("7.2"))]
        );
        // A running container is not removed; a stopped one is.
        assert!(matches!(
            remove(&user_dir, uid, "work", None),
            Err(RemoveError::Running { .. })
        ));
        assert!(matches!(
            remove(&user_dir, uid, "nope", None),
            Err(RemoveError::Missing { .. })
        ));
        assert_eq!(
            remove(&user_dir, uid, "tools", None).unwrap(),
            user_dir.join("named/tools")
        );
        // A record whose start time is not the process's: stale (a reused pid).
        let stale = RunningRecord {
            start_time: recorder.record.start_time + 1,
            ..recorder.record.clone()
        };
        std::fs::write(
            place.dir.join(record_file("work", recorder.record.pid)),
            serde_json::to_vec(&stale).unwrap(),
        )
        .unwrap();
        assert!(find_running(&place.dir, "work", uid).is_none());
        recorder.remove();
        assert!(records_in(&place.dir).is_empty());
        assert!(remove(&user_dir, uid, "work", Some(7)).is_ok());
    }
}

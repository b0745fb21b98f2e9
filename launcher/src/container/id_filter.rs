//! The seccomp filter of `--container-remap-root` containers: ownership and identity calls
//! to ids the container does not map succeed without doing anything.
//!
//! A remap-root container maps one id, the user's, to 0. Package managers run as that root
//! and hand files to system users (`chown man`, `chown _apt`) or drop to them (`setuid`),
//! and the kernel refuses every id that is not mapped: `apt-get install` then fails in a
//! postinst script. With this filter those calls return 0 and change nothing, so the files
//! stay the user's and the process stays the user: the calls lie, nobody gains a privilege.
//! Calls that only name mapped ids (0, or -1 for "unchanged") reach the kernel as before.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum IdFilterError {
    #[error("cannot build the remap-root seccomp filter: {0}")]
    Build(seccompiler::BackendError),
    #[error("cannot install the remap-root seccomp filter (--container-remap-root): {0}")]
    Install(seccompiler::Error),
    #[error("the remap-root seccomp filter is not available on this architecture")]
    Architecture,
}

/// The only ids a remap-root container maps: 0, and -1, which the calls read as "unchanged".
const MAPPED: [u64; 2] = [0, u32::MAX as u64];

/// Install the filter on the calling thread, and so on everything it execs and starts.
/// Needs no_new_privs, which [`crate::container::join::join`] sets.
pub fn install() -> Result<(), IdFilterError> {
    let program = program()?;
    seccompiler::apply_filter(&program).map_err(IdFilterError::Install)
}

fn target_arch() -> Result<TargetArch, IdFilterError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else if cfg!(target_arch = "riscv64") {
        Ok(TargetArch::riscv64)
    } else {
        Err(IdFilterError::Architecture)
    }
}

/// Rules that match when any of the id arguments `args` is not a mapped id (the rules of
/// one call are alternatives; the conditions of one rule must all hold).
fn unmapped_in(args: &[u8]) -> Result<Vec<SeccompRule>, IdFilterError> {
    args.iter()
        .map(|&arg| {
            let conditions = MAPPED
                .iter()
                .map(|&id| {
                    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, id)
                })
                .collect::<Result<Vec<_>, _>>()?;
            SeccompRule::new(conditions)
        })
        .collect::<Result<_, _>>()
        .map_err(IdFilterError::Build)
}

fn program() -> Result<BpfProgram, IdFilterError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // (call, positions of its uid and gid arguments)
    let mut calls: Vec<(libc::c_long, &[u8])> = vec![
        (libc::SYS_fchown, &[1, 2]),
        (libc::SYS_fchownat, &[2, 3]),
        (libc::SYS_setuid, &[0]),
        (libc::SYS_setgid, &[0]),
        (libc::SYS_setreuid, &[0, 1]),
        (libc::SYS_setregid, &[0, 1]),
        (libc::SYS_setresuid, &[0, 1, 2]),
        (libc::SYS_setresgid, &[0, 1, 2]),
        (libc::SYS_setfsuid, &[0]),
        (libc::SYS_setfsgid, &[0]),
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        (libc::SYS_chown, &[1u8, 2][..]),
        (libc::SYS_lchown, &[1, 2][..]),
    ]);
    for (call, args) in calls {
        rules.insert(call, unmapped_in(args)?);
    }
    // The group list is behind a pointer, out of the filter's reach; and a user namespace
    // that an unprivileged process set up refuses setgroups altogether.
    rules.insert(libc::SYS_setgroups, Vec::new());
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(0),
        target_arch()?,
    )
    .map_err(IdFilterError::Build)?;
    let mut program: BpfProgram = filter.try_into().map_err(IdFilterError::Build)?;
    allow_other_architectures(&mut program);
    Ok(program)
}

/// seccompiler's program starts by killing any process whose call comes in through another
/// architecture's entry (a 32-bit program on x86_64). This filter restricts nothing, so such
/// calls pass unfiltered instead: they fail for unmapped ids as without the filter.
fn allow_other_architectures(program: &mut BpfProgram) {
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    if let Some(kill) = program
        .iter_mut()
        .take(3)
        .find(|i| i.code == RET_K && i.k == libc::SECCOMP_RET_KILL_PROCESS)
    {
        kill.k = libc::SECCOMP_RET_ALLOW;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_builds_and_lets_other_architectures_pass() {
        let program = program().unwrap();
        assert!(program.len() > 20, "{}", program.len());
        assert!(
            !program.iter().any(|i| i.k == libc::SECCOMP_RET_KILL_PROCESS
                && i.code == (libc::BPF_RET | libc::BPF_K) as u16)
        );
    }

    /// On a thread of its own: seccomp filters and no_new_privs belong to the thread that
    /// sets them (the id-changing calls are left out: the C library applies those to every
    /// thread of the test process). A chown to an unmapped id "succeeds" and changes
    /// nothing; one to the owner's own ids is real.
    #[test]
    fn chown_to_an_unmapped_id_succeeds_and_changes_nothing() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let before = std::fs::metadata(&file).unwrap();
        let path = file.clone();
        let result = std::thread::spawn(move || -> Result<(), String> {
            nix::sys::prctl::set_no_new_privs().map_err(|e| e.to_string())?;
            install().map_err(|e| e.to_string())?;
            let ours = nix::unistd::getuid().as_raw();
            std::os::unix::fs::chown(&path, Some(123), Some(456)).map_err(|e| e.to_string())?;
            std::os::unix::fs::lchown(&path, Some(ours), None).map_err(|e| e.to_string())?;
            Ok(())
        })
        .join()
        .unwrap();
        assert_eq!(result, Ok(()));
        let after = std::fs::metadata(&file).unwrap();
        assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
    }
}

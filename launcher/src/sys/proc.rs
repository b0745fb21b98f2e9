//! Other processes as /proc shows them.

use std::fs;

/// The text of /proc/PID/stat; `None` once the process is gone.
pub fn read_stat(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// Field `n` of a /proc/PID/stat text, numbered from 1 as in proc(5) (3 the state, 4 the
/// parent, 5 the process group, 22 the start time), from field 3 on: the command name
/// before it may hold spaces and parentheses.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let after_name = stat.get(stat.rfind(')')? + 2..)?;
    after_name.split(' ').nth(n.checked_sub(3)?)
}

/// Field `n` of process `pid`'s /proc/PID/stat, as a number.
pub fn stat_number(pid: u32, n: usize) -> Option<u64> {
    stat_field(&read_stat(pid)?, n)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_past_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (a (b) c) S 17 4242 4242 0 -1";
        assert_eq!(stat_field(stat, 3), Some("S"));
        assert_eq!(stat_field(stat, 4), Some("17"));
        assert_eq!(stat_field(stat, 5), Some("4242"));
        assert_eq!(stat_field(stat, 2), None);
        let me = std::process::id();
        assert_eq!(
            stat_number(me, 5),
            Some(u64::from(nix::unistd::getpgrp().as_raw() as u32))
        );
    }
}

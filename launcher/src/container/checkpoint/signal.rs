//! The signal that checkpoints a container: SIGUSR1 unless the user names another
//! (`--container-checkpoint-signal`, `ferry run --checkpoint-signal`), for programs that
//! use SIGUSR1 themselves or batch scripts that pass another one on.

use std::fmt;
use std::str::FromStr;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

/// A signal ferry can take as the checkpoint request: one that its supervisor catches and
/// passes on (so not KILL or STOP), and that nothing sends on its own (not CHLD, CONT,
/// WINCH, or the terminal's stop signals).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CheckpointSignal(Signal);

/// Those signals, by their names without `SIG`.
pub const CHOICES: [Signal; 7] = [
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGALRM,
];

#[derive(Debug, thiserror::Error)]
#[error("`{0}` cannot be the checkpoint signal: choose one of USR1 (the default), USR2, TERM, INT, HUP, QUIT or ALRM")]
pub struct BadSignal(String);

impl CheckpointSignal {
    pub fn signal(self) -> Signal {
        self.0
    }

    /// The name Slurm's `--signal` and `scancel --signal` take, e.g. `USR1`.
    pub fn name(self) -> &'static str {
        let full = self.0.as_str();
        full.strip_prefix("SIG").unwrap_or(full)
    }
}

impl Default for CheckpointSignal {
    fn default() -> Self {
        CheckpointSignal(Signal::SIGUSR1)
    }
}

impl FromStr for CheckpointSignal {
    type Err = BadSignal;

    /// `USR2`, `SIGUSR2`, `usr2` or its number (`12`).
    fn from_str(text: &str) -> Result<Self, BadSignal> {
        let wanted = text.trim().to_ascii_uppercase();
        let wanted = wanted.strip_prefix("SIG").unwrap_or(&wanted);
        let number = wanted.parse::<i32>().ok();
        CHOICES
            .into_iter()
            .find(|s| number.map_or(s.as_str()[3..] == *wanted, |n| *s as i32 == n))
            .map(CheckpointSignal)
            .ok_or_else(|| BadSignal(text.to_string()))
    }
}

impl fmt::Display for CheckpointSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<String> for CheckpointSignal {
    type Error = BadSignal;
    fn try_from(text: String) -> Result<Self, BadSignal> {
        text.parse()
    }
}

impl From<CheckpointSignal> for String {
    fn from(s: CheckpointSignal) -> String {
        s.name().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_names_with_or_without_sig_and_numbers() {
        for text in ["USR2", "SIGUSR2", "usr2", "12"] {
            let s: CheckpointSignal = text.parse().unwrap();
            assert_eq!(s.signal(), Signal::SIGUSR2, "{text}");
        }
        assert_eq!(CheckpointSignal::default().name(), "USR1");
        assert_eq!(
            "term".parse::<CheckpointSignal>().unwrap().to_string(),
            "TERM"
        );
    }

    #[test]
    fn refuses_signals_it_cannot_catch_or_that_come_by_themselves() {
        for text in ["KILL", "STOP", "CHLD", "CONT", "WINCH", "9", "", "USR3"] {
            let e = text.parse::<CheckpointSignal>().unwrap_err().to_string();
            assert!(e.contains("cannot be the checkpoint signal"), "{text}: {e}");
        }
    }

    #[test]
    fn travels_as_its_name() {
        let s: CheckpointSignal = "HUP".parse().unwrap();
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"HUP\"");
        let back: CheckpointSignal = serde_json::from_str("\"SIGHUP\"").unwrap();
        assert_eq!(back, s);
        assert!(serde_json::from_str::<CheckpointSignal>("\"KILL\"").is_err());
    }
}

//! Where a container's start spends its time: each step of the start is a phase, timed from
//! the end of the one before. The holder sends its phases with its report; `ferry run
//! --timings` prints them with its own, and `FERRY_LOG=debug` logs each one as it ends.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One phase of a container's start and how long it took.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Phase {
    pub name: String,
    pub micros: u64,
}

impl Phase {
    pub fn ms(&self) -> f64 {
        self.micros as f64 / 1000.0
    }
}

/// The phases of a start so far, in the order they first ended; a phase that ends again
/// (a bind before and after /dev) adds to its first entry.
#[derive(Debug)]
pub struct Phases {
    last: Instant,
    done: Vec<Phase>,
}

impl Default for Phases {
    fn default() -> Self {
        Phases::new()
    }
}

impl Phases {
    pub fn new() -> Phases {
        Phases {
            last: Instant::now(),
            done: Vec::new(),
        }
    }

    /// End the phase `name` now: it took the time since the last phase ended.
    pub fn end(&mut self, name: &str) {
        let now = Instant::now();
        let took = now.duration_since(self.last);
        self.last = now;
        self.add(name, took);
    }

    /// Count `took` to the phase `name`, measured elsewhere (the holder's, a child's).
    pub fn add(&mut self, name: &str, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        tracing::debug!("phase {name}: {:.2} ms", micros as f64 / 1000.0);
        self.push(name, micros);
    }

    fn push(&mut self, name: &str, micros: u64) {
        match self.done.iter_mut().find(|p| p.name == name) {
            Some(p) => p.micros = p.micros.saturating_add(micros),
            None => self.done.push(Phase {
                name: name.to_string(),
                micros,
            }),
        }
    }

    /// The time since the last phase ended.
    pub fn since_last(&self) -> Duration {
        self.last.elapsed()
    }

    /// Start timing the next phase from now (the time since the last one belongs to none).
    pub fn restart(&mut self) {
        self.last = Instant::now();
    }

    pub fn into_vec(self) -> Vec<Phase> {
        self.done
    }

    pub fn list(&self) -> &[Phase] {
        &self.done
    }

    /// Take the phases of `other` (the holder's, logged there) in as they are.
    pub fn extend(&mut self, other: &[Phase]) {
        for p in other {
            self.push(&p.name, p.micros);
        }
    }
}

/// The lines `ferry run --timings` prints: one a phase, then the total.
pub fn lines(phases: &[Phase]) -> Vec<String> {
    let total: f64 = phases.iter().map(Phase::ms).sum();
    phases
        .iter()
        .map(|p| format!("ferry: timing: {:<18} {:8.2} ms", p.name, p.ms()))
        .chain(std::iter::once(format!(
            "ferry: timing: {:<18} {total:8.2} ms",
            "total"
        )))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_ending_twice_adds_up_in_its_first_place() {
        let mut p = Phases::new();
        p.add("binds", Duration::from_millis(2));
        p.add("/dev", Duration::from_millis(1));
        p.add("binds", Duration::from_millis(3));
        let names: Vec<_> = p.list().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["binds", "/dev"]);
        assert_eq!(p.list()[0].micros, 5000);
    }

    #[test]
    fn lines_name_each_phase_and_the_total() {
        let phases = vec![
            Phase {
                name: "user namespace".into(),
                micros: 500,
            },
            Phase {
                name: "pivot_root".into(),
                micros: 250,
            },
        ];
        assert_eq!(
            lines(&phases),
            [
                "ferry: timing: user namespace         0.50 ms",
                "ferry: timing: pivot_root             0.25 ms",
                "ferry: timing: total                  0.75 ms",
            ]
        );
    }
}

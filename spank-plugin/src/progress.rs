//! What `ferry import` and `ferry save` say while a step waits for them, passed on to the
//! user's terminal (srun's, or the job's output file).
//!
//! `slurm_spank_log` is how: in slurmstepd it writes to slurmstepd's stderr, which Slurm
//! points at the step's first task's stderr before user_init, so the line reaches srun
//! (pyxis prints its "importing" line the same way). `slurm_info` would only reach
//! slurmd's log.
//!
//! The helper runs as the user, who can write anything into its pipe: lines are cut at
//! [`MAX_LINE`] bytes and control characters are dropped (the whole output, kept for the
//! error message, is capped by `ferry::sys::child::run_capped`).

/// The longest line passed on; the rest of a longer line is dropped.
pub const MAX_LINE: usize = 512;
/// Progress lines cut out of a helper's stderr as it arrives in pieces (from
/// `ferry::sys::child::run_capped`, which keeps the whole output within its cap): each whole
/// line that is progress goes to the user's terminal when `speak`.
pub struct ProgressLines {
    speak: bool,
    partial: Vec<u8>,
    /// The current line was longer than [`MAX_LINE`]: the rest of it is dropped.
    overlong: bool,
}

impl ProgressLines {
    pub fn new(speak: bool) -> ProgressLines {
        ProgressLines {
            speak,
            partial: Vec::new(),
            overlong: false,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.feed_to(bytes, slurm_spank::slurm_spank_log);
    }

    /// A last line without its newline, once the helper has ended.
    pub fn finish(&mut self) {
        self.feed(b"\n");
    }

    fn feed_to(&mut self, bytes: &[u8], mut say: impl FnMut(&str)) {
        for piece in bytes.split_inclusive(|&b| b == b'\n') {
            let (body, ends) = match piece.strip_suffix(b"\n") {
                Some(body) => (body, true),
                None => (piece, false),
            };
            let room = MAX_LINE.saturating_sub(self.partial.len());
            self.overlong |= body.len() > room;
            self.partial
                .extend_from_slice(&body[..body.len().min(room)]);
            if ends {
                let line: String = String::from_utf8_lossy(&self.partial)
                    .chars()
                    .filter(|c| !c.is_control())
                    .collect();
                if self.speak && is_progress(&line) {
                    say(&line);
                }
                self.partial.clear();
                self.overlong = false;
            }
        }
    }
}

/// A line the user should see while waiting.
fn is_progress(line: &str) -> bool {
    line.starts_with("ferry: ") && !line.starts_with("ferry: error:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_fed_in_pieces_are_said_whole_and_bounded() {
        let mut p = ProgressLines::new(true);
        let mut said = Vec::new();
        p.feed_to(b"ferry: impo", |l| said.push(l.to_string()));
        p.feed_to(b"rting x\nnoise\nferry: error: bad\nferry: ", |l| {
            said.push(l.to_string())
        });
        let long = vec![b'a'; 3 * MAX_LINE];
        p.feed_to(&long, |l| said.push(l.to_string()));
        p.feed_to(b"\nferry: \x1b[2Jdone\n", |l| said.push(l.to_string()));
        assert_eq!(said.len(), 3, "{said:?}");
        assert_eq!(said[0], "ferry: importing x");
        assert_eq!(said[1].len(), MAX_LINE);
        assert_eq!(said[2], "ferry: [2Jdone");
        let mut quiet = ProgressLines::new(false);
        quiet.feed_to(b"ferry: importing x\n", |l| said.push(l.to_string()));
        assert_eq!(said.len(), 3);
    }

    #[test]
    fn progress_lines_go_on_errors_and_noise_stay() {
        let input = b"ferry: importing docker://x on n1 (2 layers, 3 MiB to fetch)\n\
            2026-01-01 WARN something\n\
            ferry: imported docker://x in 3 s (2.0 MiB squashfs)\n\
            ferry: error: cannot import docker://y: no such image\n";
        let mut said = Vec::new();
        ProgressLines::new(true).feed_to(input, |l| said.push(l.to_string()));
        assert_eq!(
            said,
            [
                "ferry: importing docker://x on n1 (2 layers, 3 MiB to fetch)",
                "ferry: imported docker://x in 3 s (2.0 MiB squashfs)"
            ]
        );
    }

    #[test]
    fn long_lines_are_cut_and_control_characters_dropped() {
        let mut input = b"ferry: ".to_vec();
        input.extend(std::iter::repeat_n(b'a', 100_000));
        input.extend_from_slice(b"\nferry: x\x1b[2K\ry\nferry: last\n");
        let mut said = Vec::new();
        ProgressLines::new(true).feed_to(&input, |l| said.push(l.to_string()));
        assert_eq!(said.len(), 3);
        assert_eq!(said[0].len(), MAX_LINE);
        assert_eq!(said[1], "ferry: x[2Ky");
        assert_eq!(said[2], "ferry: last");
    }
}

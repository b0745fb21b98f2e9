//! What `ferry import` and `ferry save` say while a step waits for them, passed on to the
//! user's terminal (srun's, or the job's output file).
//!
//! `slurm_spank_log` is how: in slurmstepd it writes to slurmstepd's stderr, which Slurm
//! points at the step's first task's stderr before user_init, so the line reaches srun
//! (pyxis prints its "importing" line the same way). `slurm_info` would only reach
//! slurmd's log.
//!
//! The helper runs as the user, who can write anything into its pipe: lines are cut at
//! [`MAX_LINE`] bytes, control characters are dropped, and only [`MAX_KEPT`] bytes of
//! the output are kept for the error message.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};

/// The longest line passed on; the rest of a longer line is dropped.
pub const MAX_LINE: usize = 512;
/// How much of the helper's stderr is kept (its end) for the error line.
pub const MAX_KEPT: usize = 16 * 1024;

/// Read a helper's stderr to its end on a thread of its own. With `speak`, its progress
/// lines (`ferry: …`, not errors: task_init reports those) go to the user's terminal as
/// they come. Returns the end of the output, at most [`MAX_KEPT`] bytes of whole lines.
pub fn forward_stderr<R: Read + Send + 'static>(
    pipe: Option<R>,
    speak: bool,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || match pipe {
        Some(p) => forward_lines(p, |line| {
            if speak {
                slurm_spank::slurm_spank_log(line);
            }
        }),
        None => Vec::new(),
    })
}

/// The loop of [`forward_stderr`], with `say` for the user's terminal.
pub fn forward_lines(pipe: impl Read, mut say: impl FnMut(&str)) -> Vec<u8> {
    let mut reader = BufReader::new(pipe);
    let mut kept: VecDeque<String> = VecDeque::new();
    let mut kept_bytes = 0;
    while let Some(line) = read_bounded_line(&mut reader) {
        let line: String = String::from_utf8_lossy(&line)
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        if is_progress(&line) {
            say(&line);
        }
        kept_bytes += line.len() + 1;
        kept.push_back(line);
        while kept_bytes > MAX_KEPT {
            match kept.pop_front() {
                Some(old) => kept_bytes -= old.len() + 1,
                None => break,
            }
        }
    }
    let mut out = Vec::with_capacity(kept_bytes);
    for line in kept {
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

/// A line the user should see while waiting.
fn is_progress(line: &str) -> bool {
    line.starts_with("ferry: ") && !line.starts_with("ferry: error:")
}

/// The next line without its newline, cut at [`MAX_LINE`] bytes (the rest of it is read
/// and dropped); `None` at the end or on a read error.
fn read_bounded_line(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    let mut any = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return any.then_some(line),
        };
        if buf.is_empty() {
            return any.then_some(line);
        }
        any = true;
        let (chunk, ends) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = ends.unwrap_or(buf.len());
        reader.consume(used);
        if ends.is_some() {
            return Some(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_go_on_errors_and_noise_stay() {
        let input = b"ferry: importing docker://x on n1 (2 layers, 3 MiB to fetch)\n\
            2026-01-01 WARN something\n\
            ferry: imported docker://x in 3 s (2.0 MiB squashfs)\n\
            ferry: error: cannot import docker://y: no such image\n";
        let mut said = Vec::new();
        let kept = forward_lines(&input[..], |l| said.push(l.to_string()));
        assert_eq!(
            said,
            [
                "ferry: importing docker://x on n1 (2 layers, 3 MiB to fetch)",
                "ferry: imported docker://x in 3 s (2.0 MiB squashfs)"
            ]
        );
        let kept = String::from_utf8(kept).unwrap();
        assert_eq!(
            kept.lines().last(),
            Some("ferry: error: cannot import docker://y: no such image")
        );
    }

    #[test]
    fn long_lines_are_cut_and_control_characters_dropped() {
        let mut input = b"ferry: ".to_vec();
        input.extend(std::iter::repeat_n(b'a', 100_000));
        input.extend_from_slice(b"\nferry: x\x1b[2K\ry\nferry: last");
        let mut said = Vec::new();
        forward_lines(&input[..], |l| said.push(l.to_string()));
        assert_eq!(said.len(), 3);
        assert_eq!(said[0].len(), MAX_LINE);
        assert_eq!(said[1], "ferry: x[2Ky");
        assert_eq!(said[2], "ferry: last");
    }

    #[test]
    fn only_the_end_of_a_flood_is_kept() {
        let line = b"noise noise noise noise noise noise\n";
        let input: Vec<u8> = line
            .iter()
            .copied()
            .cycle()
            .take(line.len() * 10_000)
            .chain(b"ferry: error: the end\n".iter().copied())
            .collect();
        let kept = forward_lines(&input[..], |_| {});
        assert!(kept.len() <= MAX_KEPT);
        assert!(String::from_utf8(kept)
            .unwrap()
            .ends_with("ferry: error: the end\n"));
    }
}

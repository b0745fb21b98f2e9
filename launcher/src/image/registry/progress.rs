//! What a pull shows while it runs: a bar on a terminal; in a file or pipe (a batch job's
//! output, the plugin reading `ferry import`), one plain line every [`LINE_INTERVAL`].

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a pull writes a progress line when stderr is not a terminal: often enough to
/// tell a slow import from a hang, rarely enough not to flood a job's output file.
pub const LINE_INTERVAL: Duration = Duration::from_secs(2);

/// `FERRY_QUIET=1` (or any value but empty and `0`): no progress, only errors.
pub const QUIET_ENV: &str = "FERRY_QUIET";

/// How a pull reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A progress bar on stderr.
    Terminal,
    /// Plain `ferry:` lines on stderr, one per update: no carriage returns in files.
    Lines,
    /// Nothing but `tracing` info lines, one per blob (`FERRY_QUIET`, library callers).
    Quiet,
}

impl Progress {
    /// Quiet under `FERRY_QUIET`, else a bar when stderr is a terminal that can draw one,
    /// else lines.
    pub fn auto() -> Progress {
        // indicatif draws nothing without TERM or with TERM=dumb: lines then.
        let drawable = std::env::var("TERM").is_ok_and(|t| !t.is_empty() && t != "dumb");
        if quiet_requested(std::env::var(QUIET_ENV).ok().as_deref()) {
            Progress::Quiet
        } else if drawable && std::io::stderr().is_terminal() {
            Progress::Terminal
        } else {
            Progress::Lines
        }
    }

    /// Whether the user sees what happens (the start and end lines of an import).
    pub fn speaks(self) -> bool {
        self != Progress::Quiet
    }
}

/// Whether a `FERRY_QUIET` value asks for quiet.
pub fn quiet_requested(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.trim().is_empty() && v.trim() != "0")
}

/// Where this runs, for the user's lines: Slurm's name of the node, else the host name.
pub fn node_name() -> String {
    std::env::var("SLURMD_NODENAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "this node".into())
}

/// Bytes done, shared by the download threads and the line writer.
struct Counters {
    done: AtomicU64,
    total: u64,
    started: Instant,
}

/// Shared by the download threads.
pub(super) struct Meter {
    bar: Option<ProgressBar>,
    counters: Arc<Counters>,
    /// Stops the line writer (by being dropped) and waits for it.
    lines: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    blobs: usize,
    blobs_done: AtomicUsize,
}

impl Meter {
    pub fn new(mode: Progress, label: &str, total_bytes: u64, blobs: usize) -> Meter {
        let counters = Arc::new(Counters {
            done: AtomicU64::new(0),
            total: total_bytes,
            started: Instant::now(),
        });
        let bar = (mode == Progress::Terminal && blobs > 0).then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(format!("pulling {label}"));
            bar
        });
        let lines = (mode == Progress::Lines && blobs > 0).then(|| {
            let (stop, stopped) = mpsc::channel::<()>();
            let counters = counters.clone();
            let label = label.to_string();
            let writer = std::thread::spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(LINE_INTERVAL)
                {
                    let done = counters.done.load(Ordering::Relaxed);
                    eprintln!(
                        "ferry: importing {label}: {}",
                        progress_text(done, counters.total, counters.started.elapsed())
                    );
                }
            });
            (stop, writer)
        });
        Meter {
            bar,
            counters,
            lines,
            blobs,
            blobs_done: AtomicUsize::new(0),
        }
    }

    pub fn add(&self, n: u64) {
        let now = self.counters.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(bar) = &self.bar {
            bar.set_position(now);
        }
    }

    /// A blob restarted from the beginning: its bytes so far no longer count.
    pub fn rewind(&self, n: u64) {
        let now = self
            .counters
            .done
            .fetch_sub(n, Ordering::Relaxed)
            .saturating_sub(n);
        if let Some(bar) = &self.bar {
            bar.set_position(now);
        }
    }

    pub fn blob_done(&self, digest: &str, size: u64) {
        let n = self.blobs_done.fetch_add(1, Ordering::Relaxed) + 1;
        if self.bar.is_none() {
            tracing::info!(
                "blob {} done ({}, {n} of {})",
                short_digest(digest),
                human_bytes(size),
                self.blobs
            );
        }
    }

    pub fn finish(&mut self) {
        self.stop_lines();
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn stop_lines(&mut self) {
        if let Some((stop, writer)) = self.lines.take() {
            drop(stop);
            let _ = writer.join();
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.stop_lines();
        // An error path must not leave a half-drawn bar above the error line.
        if let Some(bar) = &self.bar {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

/// `12.0 MiB of 30.0 MiB (40%), 2.1 MiB/s, about 9 s left`.
pub fn progress_text(done: u64, total: u64, elapsed: Duration) -> String {
    let percent = (done.saturating_mul(100)).checked_div(total).unwrap_or(100);
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let estimate = if rate >= 1.0 {
        let left = total.saturating_sub(done) as f64 / rate;
        format!("about {} left", human_duration(left))
    } else {
        "no estimate yet".to_string()
    };
    format!(
        "{} of {} ({percent}%), {}/s, {estimate}",
        human_bytes(done),
        human_bytes(total),
        human_bytes(rate as u64)
    )
}

/// `42 s`, `3 min 5 s`.
pub fn human_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s < 60 {
        format!("{s} s")
    } else {
        format!("{} min {} s", s / 60, s % 60)
    }
}

/// `sha256:0123456789ab`: enough to tell blobs apart in a log.
pub fn short_digest(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_digests() {
        assert_eq!(human_bytes(5), "5 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(
            short_digest("sha256:0123456789abcdef"),
            "sha256:0123456789ab"
        );
        assert_eq!(short_digest("x"), "x");
    }

    #[test]
    fn progress_lines_say_bytes_rate_and_estimate() {
        let text = progress_text(30 << 20, 120 << 20, Duration::from_secs(10));
        assert_eq!(
            text,
            "30.0 MiB of 120.0 MiB (25%), 3.0 MiB/s, about 30 s left"
        );
        let text = progress_text(0, 5, Duration::ZERO);
        assert_eq!(text, "0 B of 5 B (0%), 0 B/s, no estimate yet");
        assert_eq!(human_duration(185.0), "3 min 5 s");
    }

    #[test]
    fn quiet_values() {
        assert!(quiet_requested(Some("1")));
        assert!(quiet_requested(Some("yes")));
        assert!(!quiet_requested(Some("0")));
        assert!(!quiet_requested(Some("")));
        assert!(!quiet_requested(None));
    }

    #[test]
    fn meter_counts_and_rewinds() {
        let mut m = Meter::new(Progress::Lines, "x", 100, 2);
        m.add(60);
        m.rewind(60);
        m.add(100);
        assert_eq!(m.counters.done.load(Ordering::Relaxed), 100);
        m.blob_done("sha256:00", 100);
        m.finish();
    }
}

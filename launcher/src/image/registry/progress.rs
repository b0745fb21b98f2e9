//! What a pull shows while it runs: a bar on a terminal, log lines in a batch job.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How a pull reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A progress bar on stderr.
    Terminal,
    /// `tracing` info lines, one per blob: what a batch job's log should hold.
    Quiet,
}

impl Progress {
    /// A bar when stderr is a terminal, else quiet.
    pub fn auto() -> Progress {
        if std::io::stderr().is_terminal() {
            Progress::Terminal
        } else {
            Progress::Quiet
        }
    }
}

/// Shared by the download threads.
pub(super) struct Meter {
    bar: Option<ProgressBar>,
    done: AtomicU64,
    blobs: usize,
    blobs_done: AtomicUsize,
}

impl Meter {
    pub fn new(mode: Progress, label: &str, total_bytes: u64, blobs: usize) -> Meter {
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
        Meter {
            bar,
            done: AtomicU64::new(0),
            blobs,
            blobs_done: AtomicUsize::new(0),
        }
    }

    pub fn add(&self, n: u64) {
        let now = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(bar) = &self.bar {
            bar.set_position(now);
        }
    }

    /// A blob restarted from the beginning: its bytes so far no longer count.
    pub fn rewind(&self, n: u64) {
        let now = self.done.fetch_sub(n, Ordering::Relaxed).saturating_sub(n);
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

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // An error path must not leave a half-drawn bar above the error line.
        if let Some(bar) = &self.bar {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

/// `sha256:0123456789ab`: enough to tell blobs apart in a log.
pub(super) fn short_digest(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

pub(super) fn human_bytes(n: u64) -> String {
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
    fn meter_counts_and_rewinds() {
        let m = Meter::new(Progress::Quiet, "x", 100, 2);
        m.add(60);
        m.rewind(60);
        m.add(100);
        assert_eq!(m.done.load(Ordering::Relaxed), 100);
        m.blob_done("sha256:00", 100);
        m.finish();
    }
}

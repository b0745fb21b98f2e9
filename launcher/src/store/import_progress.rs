//! What an import of an archive or an OCI layout (`docker-archive:`, `oci-archive:`,
//! `oci:DIR`) shows while it runs: a bar on a terminal, plain lines every
//! [`LINE_INTERVAL`] otherwise (a batch job's output, the plugin reading `ferry import`).
//!
//! Refused input must stay one error line, and layers are checked only as they are read: so
//! the start line waits until the import has run for [`LINE_INTERVAL`] (a long import says
//! so in time) or has succeeded. A bad layer found at once leaves the error line alone; the
//! bar, drawn at once on a terminal, is cleared on the way to the error.

use std::io::Read;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::image::registry::progress::{
    human_bytes, human_duration, node_name, progress_text, Progress, LINE_INTERVAL,
};

pub(super) struct ImportProgress {
    mode: Progress,
    label: String,
    start_line: String,
    said_start: bool,
    started: Instant,
    last_line: Instant,
    /// The stored (compressed) bytes of all layers, and how many have been read.
    total: u64,
    done: u64,
    bar: Option<ProgressBar>,
}

impl ImportProgress {
    pub fn new(mode: Progress, label: &str, layers: usize, total: u64) -> ImportProgress {
        let bar = (mode == Progress::Terminal).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(format!("importing {label}"));
            bar
        });
        let now = Instant::now();
        ImportProgress {
            mode,
            label: label.to_string(),
            start_line: format!(
                "ferry: importing {label} on {} ({layers} layer{}, {})",
                node_name(),
                if layers == 1 { "" } else { "s" },
                human_bytes(total)
            ),
            said_start: false,
            started: now,
            last_line: now,
            total,
            done: 0,
            bar,
        }
    }

    /// Layer `i` (from 0) of `n` begins.
    pub fn layer(&mut self, i: usize, n: usize) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("importing {}: layer {}/{n}", self.label, i + 1));
        }
    }

    /// `n` more bytes of the layers were read.
    pub fn read(&mut self, n: u64) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
        }
        if self.due() {
            let text = progress_text(self.done, self.total, self.started.elapsed());
            self.say(&format!("ferry: importing {}: {text}", self.label));
        }
    }

    /// The layers are unpacked; mksquashfs comes next (on a terminal it draws its own bar).
    pub fn layers_done(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// mksquashfs has written `written` bytes of the image so far.
    pub fn squashing(&mut self, written: u64) {
        if self.due() {
            self.say(&format!(
                "ferry: importing {}: squashing, {} written",
                self.label,
                human_bytes(written)
            ));
        }
    }

    /// The import succeeded with a squashfs of `size` bytes.
    pub fn finish(&mut self, size: u64) {
        self.layers_done();
        if self.mode.speaks() {
            self.say_start();
            eprintln!(
                "ferry: imported {} in {} ({} squashfs)",
                self.label,
                human_duration(self.started.elapsed().as_secs_f64()),
                human_bytes(size)
            );
        }
    }

    /// Whether a progress line is due now (lines only; a bar draws itself).
    fn due(&mut self) -> bool {
        if self.mode != Progress::Lines || self.last_line.elapsed() < LINE_INTERVAL {
            return false;
        }
        self.last_line = Instant::now();
        true
    }

    fn say(&mut self, line: &str) {
        self.say_start();
        eprintln!("{line}");
    }

    fn say_start(&mut self) {
        if self.said_start || !self.mode.speaks() {
            return;
        }
        self.said_start = true;
        match &self.bar {
            Some(bar) => bar.println(&self.start_line),
            None => eprintln!("{}", self.start_line),
        }
    }

    /// Whether it has said anything yet (for tests).
    #[cfg(test)]
    fn spoke(&self) -> bool {
        self.said_start
    }
}

impl Drop for ImportProgress {
    fn drop(&mut self) {
        // On an error: no half-drawn bar above the error line.
        self.layers_done();
    }
}

/// A layer's reader that counts what is read of it.
pub(super) struct Counted<'a, R> {
    pub inner: R,
    pub progress: &'a mut ImportProgress,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.read(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quick_import_says_nothing_before_its_end() {
        let mut p = ImportProgress::new(Progress::Lines, "oci:x", 2, 100);
        p.read(60);
        p.squashing(10);
        assert!(
            !p.spoke(),
            "a quick failure would be preceded by a start line"
        );
        p.finish(50);
        assert!(p.spoke());
        let mut quiet = ImportProgress::new(Progress::Quiet, "oci:x", 1, 1);
        quiet.finish(1);
        assert!(!quiet.spoke());
        assert!(ImportProgress::new(Progress::Lines, "l", 1, 9)
            .start_line
            .ends_with(" (1 layer, 9 B)"));
    }

    #[test]
    fn counted_reads_add_up() {
        let mut p = ImportProgress::new(Progress::Quiet, "oci:x", 1, 5);
        let mut out = Vec::new();
        Counted {
            inner: &b"hello"[..],
            progress: &mut p,
        }
        .read_to_end(&mut out)
        .unwrap();
        assert_eq!(p.done, 5);
    }
}

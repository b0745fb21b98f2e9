//! `tracing` events to Slurm's log (`slurm_error`, `slurm_info`, `slurm_verbose`, `slurm_debug`).
//!
//! slurm-spank's own subscriber sends every level to `slurm_info`; this one keeps the level,
//! so Slurm's own filter (`SlurmdDebug`, `srun -v`) applies. In srun/sbatch/salloc the log
//! is the user's terminal, where Slurm prints `slurm_info` unconditionally: there, `info`
//! events go to `slurm_verbose` (shown by `srun -v`) and only warnings and errors show
//! without `-v`.

use std::fmt::Write as _;

use crate::site::LogLevel;
use slurm_spank::{spank_log, LogLevel as SlurmLevel};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

pub struct SlurmLayer {
    max: Level,
    /// srun/sbatch/salloc: the log is the user's terminal.
    user_facing: bool,
}

fn to_tracing(level: LogLevel) -> Level {
    match level {
        LogLevel::Error => Level::ERROR,
        LogLevel::Warn => Level::WARN,
        LogLevel::Info => Level::INFO,
        LogLevel::Debug => Level::DEBUG,
        LogLevel::Trace => Level::TRACE,
    }
}

struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let mut text = String::new();
            let _ = write!(text, "{value:?}");
            self.0.insert_str(0, &text);
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for SlurmLayer {
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        *metadata.level() <= self.max
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > self.max {
            return;
        }
        let mut msg = Message(String::new());
        event.record(&mut msg);
        let text = format!("ferry: {}", msg.0);
        let slurm_level = match level {
            Level::ERROR => SlurmLevel::Error,
            Level::WARN => {
                spank_log(SlurmLevel::Info, &format!("ferry: warning: {}", msg.0));
                return;
            }
            Level::INFO if self.user_facing => SlurmLevel::Verbose,
            Level::INFO => SlurmLevel::Info,
            Level::DEBUG => SlurmLevel::Debug,
            _ => SlurmLevel::Debug2,
        };
        spank_log(slurm_level, &text);
    }
}

/// Route `tracing` to Slurm's log for the rest of this process. Later calls do nothing.
pub fn init(level: LogLevel, user_facing: bool) {
    let layer = SlurmLayer {
        max: to_tracing(level),
        user_facing,
    };
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer));
}

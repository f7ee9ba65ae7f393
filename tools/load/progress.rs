//! The progress line on stderr while a run is under way.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::args::Target;
use crate::shared::Shared;

/// A one-line progress display on stderr (rewritten in place on a
/// terminal, a line every few seconds otherwise).
pub struct Progress {
    tty: bool,
    label: &'static str,
    last: std::cell::Cell<Option<Instant>>,
}

impl Progress {
    pub fn new(target: Target) -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            label: match target {
                Target::Server => "server",
                Target::Sink => "raw sink",
            },
            last: std::cell::Cell::new(None),
        }
    }

    fn show(&self, line: &str) {
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            let due = self
                .last
                .get()
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
            if due {
                self.last.set(Some(Instant::now()));
                eprintln!("{line}");
            }
        }
    }

    pub fn opening(&self, welcomed: usize, n: usize) {
        self.show(&format!(
            "[{}] opening sessions: {welcomed}/{n} welcomed",
            self.label
        ));
    }

    pub fn beating(&self, shared: &Shared, now_us: u64, until_us: u64, sent: u64) {
        let secs = now_us as f64 / 1e6;
        let bar_width = 30;
        let filled = ((now_us as f64 / until_us as f64) * bar_width as f64) as usize;
        self.show(&format!(
            "[{}] [{}{}] {:>5.1}s/{:.0}s  {:>9.0} hb/s  false expiries {}  silent detected {}",
            self.label,
            "#".repeat(filled.min(bar_width)),
            " ".repeat(bar_width - filled.min(bar_width)),
            secs,
            until_us as f64 / 1e6,
            sent as f64 / secs.max(1e-3),
            shared.false_expiries.load(Ordering::Acquire),
            shared.detected.load(Ordering::Acquire),
        ));
    }

    pub fn done(&self) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }
}

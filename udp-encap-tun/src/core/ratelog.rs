//! Logging that a remote sender can trigger, bounded: at most one line a
//! second per call site, with how many were suppressed. Pure: `now` is an
//! argument.

use std::time::{Duration, Instant};

/// Logs a recurring I/O problem at most once a second, with how many were
/// suppressed: a flood must not turn into a flood of log lines.
#[derive(Default)]
pub struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn log(&mut self, now: Instant, msg: impl FnOnce() -> String) {
        if self.last.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1)) {
            self.suppressed += 1;
            return;
        }
        let s = std::mem::take(&mut self.suppressed);
        if s > 0 {
            log::warn!("{} ({s} similar suppressed)", msg());
        } else {
            log::warn!("{}", msg());
        }
        self.last = Some(now);
    }
}


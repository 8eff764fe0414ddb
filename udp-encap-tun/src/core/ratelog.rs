//! Logging that a remote sender can trigger, bounded: at most `burst` lines
//! a second per call site, then one line with how many were suppressed.
//! Pure: `now` is an argument.
//!
//! SPEC decision 9: every log line a remote sender can trigger is rate
//! limited. Each call site owns its own [`RateLimitedLog`], so a flood of one
//! kind (a spoofed source per datagram, say) cannot hide the lines of
//! another (a real client's failed authentication).

use std::time::{Duration, Instant};

/// The window a burst is counted in.
const WINDOW: Duration = Duration::from_secs(1);

/// Logs a recurring event at most `burst` times a second, with how many
/// were suppressed: a flood must not turn into a flood of log lines.
#[derive(Debug, Clone)]
pub struct RateLimitedLog {
    level: log::Level,
    burst: u32,
    window: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Default for RateLimitedLog {
    /// A warning, once a second.
    fn default() -> RateLimitedLog {
        RateLimitedLog::new(log::Level::Warn, 1)
    }
}

impl RateLimitedLog {
    /// At most `burst` (at least 1) lines at `level` a second.
    pub const fn new(level: log::Level, burst: u32) -> RateLimitedLog {
        RateLimitedLog {
            level,
            burst: if burst == 0 { 1 } else { burst },
            window: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Logs `msg()` unless this second's burst is spent; `msg` is only
    /// called for a line that is written. Returns whether it was written.
    pub fn log(&mut self, now: Instant, msg: impl FnOnce() -> String) -> bool {
        if !log::log_enabled!(self.level) {
            return false;
        }
        let fresh = self
            .window
            .is_none_or(|t| now.saturating_duration_since(t) >= WINDOW);
        if fresh {
            self.window = Some(now);
            self.in_window = 0;
        }
        if self.in_window >= self.burst {
            self.suppressed = self.suppressed.saturating_add(1);
            return false;
        }
        self.in_window += 1;
        let s = std::mem::take(&mut self.suppressed);
        if s > 0 {
            log::log!(self.level, "{} ({s} similar suppressed)", msg());
        } else {
            log::log!(self.level, "{}", msg());
        }
        true
    }

    /// Lines suppressed since the last one written.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// A call site's own [`RateLimitedLog`], for edge code that has nowhere to
/// keep one: `bounded_log!(Level::Warn, 1, now, "format {}", args)`. The
/// limiter is a static of the call site (one per process: one daemon).
#[macro_export]
macro_rules! bounded_log {
    ($level:expr, $burst:expr, $now:expr, $($arg:tt)+) => {{
        static SITE: std::sync::Mutex<$crate::core::ratelog::RateLimitedLog> =
            std::sync::Mutex::new($crate::core::ratelog::RateLimitedLog::new($level, $burst));
        SITE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .log($now, || format!($($arg)+))
    }};
}

/// For unit tests: a global logger that keeps each thread's lines, so a
/// test can count what it made the code log (tests run on threads of
/// their own, in parallel).
#[cfg(test)]
pub(crate) mod testlog {
    use std::cell::RefCell;

    thread_local! {
        static LINES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            let line = format!("{} {}", r.level(), r.args());
            LINES.with(|l| l.borrow_mut().push(line));
        }
        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture;

    /// Installs the logger (once per process) at every level.
    pub fn init() {
        let _ = log::set_logger(&CAPTURE);
        log::set_max_level(log::LevelFilter::Trace);
    }

    /// The lines this thread logged since the last call.
    pub fn take() -> Vec<String> {
        LINES.with(|l| std::mem::take(&mut *l.borrow_mut()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::testlog::init;

    #[test]
    fn a_flood_writes_burst_lines_a_second_then_says_how_many_it_held_back() {
        init();
        let t0 = Instant::now();
        let mut l = RateLimitedLog::new(log::Level::Info, 3);
        let mut written = 0;
        // 10 000 events in the first second: 3 lines.
        for i in 0..10_000u32 {
            if l.log(t0 + Duration::from_micros(u64::from(i) * 90), || "refused".into()) {
                written += 1;
            }
        }
        assert_eq!(written, 3);
        assert_eq!(l.suppressed(), 9_997);
        assert_eq!(super::testlog::take().len(), 3);
        // The next second: the first line carries the count, and it resets.
        let mut carried = String::new();
        assert!(l.log(t0 + Duration::from_millis(1000), || {
            carried = "refused".into();
            carried.clone()
        }));
        assert_eq!(l.suppressed(), 0);
        // The message is only built for lines that are written.
        let mut built = 0;
        for _ in 0..100 {
            l.log(t0 + Duration::from_millis(1001), || {
                built += 1;
                String::new()
            });
        }
        assert_eq!(built, 2, "only the rest of this second's burst is formatted");
    }

    #[test]
    fn default_is_one_warning_a_second_and_zero_burst_means_one() {
        init();
        let t0 = Instant::now();
        for mut l in [RateLimitedLog::default(), RateLimitedLog::new(log::Level::Warn, 0)] {
            assert!(l.log(t0, String::new));
            assert!(!l.log(t0 + Duration::from_millis(999), String::new));
            assert!(l.log(t0 + Duration::from_millis(1000), String::new));
        }
    }

    #[test]
    fn a_clock_that_goes_back_does_not_open_the_gate() {
        init();
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut l = RateLimitedLog::default();
        assert!(l.log(t0, String::new));
        assert!(!l.log(t0 - Duration::from_secs(5), String::new));
    }
}

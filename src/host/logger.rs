//! A minimal `log` backend writing `minivmm: <level>: <message>` lines to stderr.
//!
//! Warnings and info lines are rate-limited (a burst of 200, then 20 a second),
//! because a guest can cause them (`_OST` reports, ejects, resets) as fast as it likes, and the
//! lines go to stderr synchronously: a guest must not be able to flood a supervisor's log or,
//! with a slow reader, stall minivmm on a full pipe. Lines held back are counted and reported
//! with the next line that passes. Errors always pass; debug and trace (opt-in, for debugging)
//! are not limited.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

/// Lines that may pass at once.
const BURST: f64 = 200.0;
/// Lines that may pass per second after a burst.
const PER_SECOND: f64 = 20.0;

/// A token bucket for log lines.
#[derive(Debug)]
struct Budget {
    tokens: f64,
    last: Option<Instant>,
    held_back: u64,
}

impl Budget {
    const fn new() -> Self {
        Budget {
            tokens: BURST,
            last: None,
            held_back: 0,
        }
    }

    /// Whether a line may pass at `now`; if it may, how many were held back before it.
    fn take(&mut self, now: Instant) -> Option<u64> {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * PER_SECOND;
            self.tokens = (self.tokens + refill).min(BURST);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.held_back))
        } else {
            self.held_back += 1;
            None
        }
    }
}

struct StderrLogger {
    budget: Mutex<Budget>,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let limited = matches!(record.level(), log::Level::Warn | log::Level::Info);
        let held_back = if limited {
            let mut budget = self.budget.lock().unwrap_or_else(|e| e.into_inner());
            match budget.take(Instant::now()) {
                Some(n) => n,
                None => return,
            }
        } else {
            0
        };
        let level = record.level().as_str().to_ascii_lowercase();
        let mut err = std::io::stderr().lock();
        // "\r" first: the terminal may be in raw mode, where "\n" does not return the carriage.
        if held_back > 0 {
            let _ = writeln!(
                err,
                "\rminivmm: warn: {held_back} log lines held back (more than {PER_SECOND} a second)\r"
            );
        }
        let _ = writeln!(err, "\rminivmm: {level}: {}\r", record.args());
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger {
    budget: Mutex::new(Budget::new()),
};

/// Installs the logger with the given maximum level (idempotent).
pub fn init(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_the_rate_and_the_held_back_are_counted() {
        let mut b = Budget::new();
        let t0 = Instant::now();
        for _ in 0..BURST as u32 {
            assert_eq!(b.take(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(b.take(t0), None);
        }
        // A tenth of a second later two lines' worth has come back; the first says 1000.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.take(t1), Some(1000));
        assert_eq!(b.take(t1), Some(0));
        assert_eq!(b.take(t1), None);
        // After a long quiet spell the whole burst is back, no more.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..BURST as u32 {
            assert!(b.take(t2).is_some());
        }
        assert_eq!(b.take(t2), None);
    }
}

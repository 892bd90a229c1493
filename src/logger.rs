//! A minimal `log` backend writing `minivmm: <level>: <message>` lines to stderr.

use std::io::Write;

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = record.level().as_str().to_ascii_lowercase();
            // "\r" first: the terminal may be in raw mode, where "\n" does not return the carriage.
            let _ = writeln!(
                std::io::stderr().lock(),
                "\rminivmm: {level}: {}\r",
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger with the given maximum level (idempotent).
pub fn init(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

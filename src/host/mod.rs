//! Facilities of the host process: the seccomp filters, the terminal, the logger.

pub mod logger;
pub mod seccomp;
pub mod terminal;

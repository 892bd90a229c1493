//! Facilities of the host process: the seccomp filters, the terminal, the logger.

pub mod logger;
pub(crate) mod seccomp;
pub(crate) mod terminal;

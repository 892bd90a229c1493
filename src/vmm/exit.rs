//! How a run of minivmm ends, and the process exit code for each outcome.
//!
//! | code | outcome |
//! |---|---|
//! | 0 | the guest powered off, `shutdown` was requested, or a termination signal arrived |
//! | 1 | an error: bad arguments, setup failure, reboot failure |
//! | 2 | the guest reset the machine and `--no-reboot` was given |
//! | 3 | guest fault: KVM internal error, failed entry, unexpected exit |
//! | 4 | the guest panicked (pvpanic) |
//! | 124 | `--timeout` expired (the code `timeout(1)` uses) |
//! | 159 | a thread was killed by its seccomp filter (128 + SIGSYS) |
//! | odd `(v << 1) \| 1` | the guest wrote `v` to the exit device (QEMU `isa-debug-exit` mapping) |

use std::time::Duration;

use crate::devices::debug_exit::exit_code_for;
use crate::devices::ResetCause;

/// Exit code: guest powered off, `shutdown` requested, or SIGTERM/SIGINT/SIGHUP.
pub const EXIT_OK: i32 = 0;
/// Exit code: bad arguments or a setup error.
pub const EXIT_ERROR: i32 = 1;
/// Exit code: the guest rebooted and `--no-reboot` was given.
pub const EXIT_REBOOT: i32 = 2;
/// Exit code: the guest faulted (KVM internal error, failed entry, unexpected exit).
pub const EXIT_GUEST_FAULT: i32 = 3;
/// Exit code: the guest panicked and told minivmm through pvpanic.
pub const EXIT_PANIC: i32 = 4;
/// Exit code: `--timeout` expired.
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit code of a process killed by its seccomp filter (128 + SIGSYS).
pub const EXIT_SECCOMP: i32 = crate::host::seccomp::SECCOMP_EXIT_CODE;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The guest powered off, or `shutdown` was requested on the control pipe.
    PowerOff,
    /// The guest reset and `--no-reboot` was given.
    Reset(ResetCause),
    /// The guest wrote this value to the exit device.
    GuestExit(u32),
    /// The guest panicked (pvpanic).
    Panic,
    /// `--timeout` expired after this long.
    Timeout(Duration),
    /// The guest or KVM failed; the message says how (exit reason, RIP).
    Fatal(String),
    /// A termination signal arrived.
    Signal(i32),
}

impl Exit {
    /// The process exit code for this outcome.
    pub fn code(&self) -> i32 {
        match self {
            Exit::PowerOff | Exit::Signal(_) => EXIT_OK,
            Exit::Reset(_) => EXIT_REBOOT,
            Exit::GuestExit(value) => exit_code_for(*value),
            Exit::Panic => EXIT_PANIC,
            Exit::Timeout(_) => EXIT_TIMEOUT,
            Exit::Fatal(_) => EXIT_GUEST_FAULT,
        }
    }

    /// A one-word name for event lines: `poweroff`, `reboot`, `guest-exit`, `panic`, `timeout`,
    /// `fault` or `signal`.
    pub fn token(&self) -> &'static str {
        match self {
            Exit::PowerOff => "poweroff",
            Exit::Reset(_) => "reboot",
            Exit::GuestExit(_) => "guest-exit",
            Exit::Panic => "panic",
            Exit::Timeout(_) => "timeout",
            Exit::Fatal(_) => "fault",
            Exit::Signal(_) => "signal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_from_the_fixed_ones() {
        let fixed = [
            EXIT_OK,
            EXIT_ERROR,
            EXIT_REBOOT,
            EXIT_GUEST_FAULT,
            EXIT_PANIC,
            EXIT_TIMEOUT,
            EXIT_SECCOMP,
        ];
        for (i, a) in fixed.iter().enumerate() {
            assert!(!fixed[i + 1..].contains(a), "{a} twice");
        }
        assert_eq!(EXIT_SECCOMP, 159);
        // Exit-device codes are odd: they never collide with 0, 2, 4 or 124; the values that
        // give 1, 3 and 159 are documented.
        assert_eq!(Exit::GuestExit(0).code(), EXIT_ERROR);
        assert_eq!(Exit::GuestExit(1).code(), EXIT_GUEST_FAULT);
        assert_eq!(Exit::GuestExit(79).code(), EXIT_SECCOMP);
        assert_eq!(Exit::GuestExit(0x10).code(), 33);
        assert_eq!(Exit::Panic.code(), 4);
        assert_eq!(Exit::Timeout(Duration::from_secs(1)).code(), 124);
        assert_eq!(Exit::Reset(ResetCause::Keyboard).code(), 2);
    }
}

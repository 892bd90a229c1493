//! Typed VM events, and their one-line form on the control pipe (`event <name> [key=value...]`),
//! sent to clients that asked for them with `watch`.

use std::fmt;

use crate::config::size::format_size;

/// Something that happened to the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A boot started (the first, or one after a reboot).
    Boot {
        /// Boot number, from 1.
        n: u32,
        /// vCPUs at boot.
        cpus: u32,
        /// RAM at boot, in bytes.
        mem: u64,
    },
    /// The guest's first write to the debug port this boot.
    BootMarker {
        /// Value written.
        value: u8,
        /// Milliseconds since this boot started.
        boot_ms: u64,
    },
    /// A vCPU was hot-added (the guest was notified).
    CpuAdded(u32),
    /// A vCPU entered 64-bit mode after being brought up (the guest onlined it).
    CpuOnline(u32),
    /// The guest was asked to eject a vCPU.
    CpuRemoving(u32),
    /// The guest ejected a vCPU; its thread has stopped.
    CpuEjected(u32),
    /// A memory slot was hot-added (the guest was notified).
    MemAdded {
        /// Slot index.
        slot: usize,
        /// Guest-physical start.
        start: u64,
        /// Size in bytes.
        size: u64,
    },
    /// The guest was asked to eject a memory slot.
    MemRemoving {
        /// Slot index.
        slot: usize,
        /// Guest-physical start.
        start: u64,
        /// Size in bytes.
        size: u64,
    },
    /// The guest ejected a memory slot; its memory is unmapped.
    MemRemoved {
        /// Slot index.
        slot: usize,
        /// Size in bytes.
        size: u64,
    },
    /// A memory slot's removal was given up (the guest refused it, or did not answer in
    /// time); the slot stays and the rest of the shrink waits for the next reboot.
    MemRemoveWithdrawn {
        /// Slot index.
        slot: usize,
        /// Why: the guest's `_OST` report (e.g. `eject:busy`) or `timeout`.
        reason: String,
    },
    /// The guest reported a hotplug status (`_OST`), e.g. device `cpu2`, report `eject:busy`.
    Ost {
        /// `cpuN` or `memN`.
        device: String,
        /// What the guest said, as in `info`'s `last_ost`.
        report: String,
    },
    /// The ACPI power button was pressed.
    PowerButton,
    /// The guest reset the machine and minivmm is rebuilding it.
    Reboot {
        /// One-word cause, see [`crate::ResetCause::token`].
        cause: &'static str,
    },
    /// The guest panicked (pvpanic).
    Panic,
    /// minivmm is exiting with this code.
    Exit {
        /// Process exit code.
        code: i32,
        /// One-word reason, see [`crate::Exit::token`].
        reason: &'static str,
    },
}

impl fmt::Display for Event {
    /// The control-pipe line, without the trailing newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Boot { n, cpus, mem } => {
                write!(f, "event boot n={n} cpus={cpus} mem={}", format_size(*mem))
            }
            Event::BootMarker { value, boot_ms } => {
                write!(f, "event boot-marker value={value:#04x} boot_ms={boot_ms}")
            }
            Event::CpuAdded(cpu) => write!(f, "event cpu-added cpu={cpu}"),
            Event::CpuOnline(cpu) => write!(f, "event cpu-online cpu={cpu}"),
            Event::CpuRemoving(cpu) => write!(f, "event cpu-removing cpu={cpu}"),
            Event::CpuEjected(cpu) => write!(f, "event cpu-ejected cpu={cpu}"),
            Event::MemAdded { slot, start, size } => write!(
                f,
                "event mem-added slot={slot} start={start:#x} size={}",
                format_size(*size)
            ),
            Event::MemRemoving { slot, start, size } => write!(
                f,
                "event mem-removing slot={slot} start={start:#x} size={}",
                format_size(*size)
            ),
            Event::MemRemoved { slot, size } => {
                write!(
                    f,
                    "event mem-removed slot={slot} size={}",
                    format_size(*size)
                )
            }
            Event::MemRemoveWithdrawn { slot, reason } => {
                write!(f, "event mem-remove-withdrawn slot={slot} reason={reason}")
            }
            Event::Ost { device, report } => {
                write!(f, "event ost device={device} report={report}")
            }
            Event::PowerButton => write!(f, "event powerbutton"),
            Event::Reboot { cause } => write!(f, "event reboot cause={cause}"),
            Event::Panic => write!(f, "event panic"),
            Event::Exit { code, reason } => write!(f, "event exit code={code} reason={reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let cases = [
            (
                Event::Boot {
                    n: 2,
                    cpus: 3,
                    mem: 512 << 20,
                },
                "event boot n=2 cpus=3 mem=512M",
            ),
            (
                Event::BootMarker {
                    value: 1,
                    boot_ms: 812,
                },
                "event boot-marker value=0x01 boot_ms=812",
            ),
            (Event::CpuAdded(1), "event cpu-added cpu=1"),
            (Event::CpuOnline(1), "event cpu-online cpu=1"),
            (Event::CpuRemoving(3), "event cpu-removing cpu=3"),
            (Event::CpuEjected(3), "event cpu-ejected cpu=3"),
            (
                Event::MemAdded {
                    slot: 0,
                    start: 1 << 32,
                    size: 1 << 30,
                },
                "event mem-added slot=0 start=0x100000000 size=1G",
            ),
            (
                Event::MemRemoving {
                    slot: 3,
                    start: 0x1_3000_0000,
                    size: 128 << 20,
                },
                "event mem-removing slot=3 start=0x130000000 size=128M",
            ),
            (
                Event::MemRemoved {
                    slot: 3,
                    size: 128 << 20,
                },
                "event mem-removed slot=3 size=128M",
            ),
            (
                Event::MemRemoveWithdrawn {
                    slot: 3,
                    reason: "eject:busy".into(),
                },
                "event mem-remove-withdrawn slot=3 reason=eject:busy",
            ),
            (
                Event::Ost {
                    device: "cpu2".into(),
                    report: "eject:busy".into(),
                },
                "event ost device=cpu2 report=eject:busy",
            ),
            (Event::PowerButton, "event powerbutton"),
            (Event::Reboot { cause: "kbd" }, "event reboot cause=kbd"),
            (Event::Panic, "event panic"),
            (
                Event::Exit {
                    code: 33,
                    reason: "guest-exit",
                },
                "event exit code=33 reason=guest-exit",
            ),
        ];
        for (event, line) in cases {
            assert_eq!(event.to_string(), line);
        }
    }
}

//! The guest's `_OST` reports (ACPI 6.5 §6.3.5, table 6.157): short names for logs, events and
//! `info`, and which reports are final failures.

/// `_OST` source event: device insertion (the VMM's device-check notification).
pub const EVENT_INSERT: u32 = 1;
/// `_OST` source event: eject request (the VMM's eject notification).
pub const EVENT_EJECT: u32 = 3;
/// `_OST` source event: an eject the guest started itself.
const EVENT_OSPM_EJECT: u32 = 0x103;
/// `_OST` source event: an insertion the guest started itself.
const EVENT_OSPM_INSERT: u32 = 0x200;

/// Whether `event` is one of the two eject events.
pub fn is_eject(event: u32) -> bool {
    matches!(event, EVENT_EJECT | EVENT_OSPM_EJECT)
}

/// A short name for an `_OST` event and status, e.g. `eject:busy`; unknown codes keep their
/// numbers (`event0x7:unknown0x99`).
pub fn describe(event: u32, status: u32) -> String {
    let ev = match event {
        EVENT_INSERT => "insert",
        EVENT_EJECT => "eject",
        EVENT_OSPM_EJECT => "ospm-eject",
        EVENT_OSPM_INSERT => "ospm-insert",
        _ => "event",
    };
    let st = match (is_eject(event), status) {
        (_, 0) => "success",
        (_, 1) => "failure",
        (_, 2) => "unrecognized",
        (true, 0x80) => "not-supported",
        (true, 0x81) => "in-use",
        (true, 0x82) => "busy",
        (true, 0x83) => "dependency-busy",
        (true, 0x84) => "in-progress",
        (false, 0x80) => "in-progress",
        (false, 0x81) => "insert-failure",
        (false, 0x82) => "attach-failure",
        (false, 0x83) => "unsupported-config",
        _ => "unknown",
    };
    if ev == "event" || st == "unknown" {
        format!("{ev}{event:#x}:{st}{status:#x}")
    } else {
        format!("{ev}:{st}")
    }
}

/// Whether a report is final and not a success (an in-progress report is neither).
pub fn failed(event: u32, status: u32) -> bool {
    let in_progress = matches!(
        (event, status),
        (EVENT_EJECT | EVENT_OSPM_EJECT, 0x84) | (EVENT_INSERT | EVENT_OSPM_INSERT, 0x80)
    );
    status != 0 && !in_progress
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_named_and_classified() {
        assert_eq!(describe(3, 0x84), "eject:in-progress");
        assert_eq!(describe(3, 0x82), "eject:busy");
        assert_eq!(describe(0x103, 0x81), "ospm-eject:in-use");
        assert_eq!(describe(1, 0), "insert:success");
        assert_eq!(describe(1, 0x81), "insert:insert-failure");
        assert_eq!(describe(7, 0x99), "event0x7:unknown0x99");
        assert!(!failed(3, 0x84));
        assert!(!failed(1, 0x80));
        assert!(!failed(3, 0));
        assert!(failed(3, 0x82));
        assert!(failed(1, 1));
        assert!(is_eject(3) && is_eject(0x103) && !is_eject(1));
    }
}

//! The pvpanic device (QEMU's ISA `pvpanic`, found by Linux's `pvpanic-mmio` driver through the
//! ACPI id `QEMU0001`): the guest reads the events the device supports and writes an event when
//! it panics.
//!
//! Only PVPANIC_PANICKED is offered. Linux then writes 1 from its panic notifier, before any
//! `panic=` reboot; with a kdump kernel loaded it would send CRASH_LOADED, which is not offered,
//! so kdump proceeds untouched.

use super::{BusDevice, DeviceEvent};

/// Event bit: the guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit: the guest panicked and a crash kernel is loaded (not offered).
#[cfg(test)]
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The pvpanic register (len 1).
#[derive(Debug, Default)]
pub struct PvPanic;

impl PvPanic {
    /// Creates the device.
    pub fn new() -> Self {
        PvPanic
    }
}

impl BusDevice for PvPanic {
    /// Reads the supported events.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PVPANIC_PANICKED;
        }
    }

    /// A write with PVPANIC_PANICKED returns [`DeviceEvent::Panic`]; other bits are ignored.
    fn write(&mut self, _offset: u64, data: &[u8]) -> DeviceEvent {
        match data.first() {
            Some(v) if v & PVPANIC_PANICKED != 0 => DeviceEvent::Panic,
            _ => DeviceEvent::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_panicked_and_reports_it() {
        let mut d = PvPanic::new();
        let mut b = [0xff; 1];
        d.read(0, &mut b);
        assert_eq!(b[0], PVPANIC_PANICKED);
        assert_eq!(d.write(0, &[PVPANIC_PANICKED]), DeviceEvent::Panic);
        assert_eq!(d.write(0, &[PVPANIC_CRASH_LOADED]), DeviceEvent::None);
        assert_eq!(d.write(0, &[0]), DeviceEvent::None);
        assert_eq!(d.write(0, &[3]), DeviceEvent::Panic);
        assert_eq!(d.write(0, &[]), DeviceEvent::None);
    }
}

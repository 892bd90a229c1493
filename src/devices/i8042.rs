//! The i8042 keyboard controller, just enough for Linux's `reboot=k` path: vm-superio's
//! [`I8042Device`] behind a [`BusDevice`] adapter.
//!
//! Every read returns 0, so the status register reports an empty input buffer and Linux's
//! keyboard-controller reset proceeds at once. The pulse-reset command 0xFE written to the
//! command port (0x64) resets the machine; everything else is ignored. vm-superio signals the
//! reset through a trigger; here the trigger only raises a flag that the adapter turns into
//! [`DeviceEvent::Reset`], so the device stays a plain state machine.

use std::cell::Cell;
use std::convert::Infallible;

use vm_superio::I8042Device;

use super::{BusDevice, DeviceEvent, ResetCause};

/// The reset line of the controller: set by vm-superio, taken by the adapter.
#[derive(Debug, Default)]
pub struct ResetLine(Cell<bool>);

impl vm_superio::Trigger for ResetLine {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.set(true);
        Ok(())
    }
}

/// The i8042 at ports 0x60..=0x64.
#[derive(Debug)]
pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    /// Creates the controller.
    pub fn new() -> Self {
        I8042(I8042Device::new(ResetLine::default()))
    }
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for I8042 {
    /// Registers read as vm-superio's device reads them (0); wider reads are zero-filled.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(offset), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.0.read(offset);
        }
    }

    /// The reset command returns [`DeviceEvent::Reset`]; other writes are ignored.
    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceEvent {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return DeviceEvent::None;
        };
        // The trigger cannot fail (`Infallible`).
        let _ = self.0.write(offset, value);
        if self.0.reset_evt().0.replace(false) {
            DeviceEvent::Reset(ResetCause::Keyboard)
        } else {
            DeviceEvent::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command() {
        let mut dev = I8042::new();
        assert_eq!(
            dev.write(4, &[0xfe]),
            DeviceEvent::Reset(ResetCause::Keyboard)
        );
        // The line is taken: the next unrelated write is not a second reset.
        assert_eq!(dev.write(4, &[0xd1]), DeviceEvent::None);
        assert_eq!(dev.write(0, &[0xfe]), DeviceEvent::None);
        assert_eq!(dev.write(4, &[]), DeviceEvent::None);
        assert_eq!(dev.write(0x104, &[0xfe]), DeviceEvent::None);
        assert_eq!(
            dev.write(4, &[0xfe]),
            DeviceEvent::Reset(ResetCause::Keyboard)
        );
    }

    #[test]
    fn reads_are_zero() {
        let mut dev = I8042::new();
        for offset in 0..5 {
            let mut data = [0xffu8; 2];
            dev.read(offset, &mut data);
            assert_eq!(data, [0, 0]);
        }
    }
}

//! Minimal i8042 keyboard controller: just enough for Linux's `reboot=k` path.
//!
//! Every read returns 0, so the status register reports an empty input buffer and Linux's
//! keyboard-controller reset proceeds at once. Writing the pulse-reset command 0xFE to the
//! command port resets the machine; everything else is ignored.

use super::{BusDevice, DeviceEvent, ResetCause};

/// Offset of the command/status port (0x64) from the device base (0x60).
const COMMAND_OFFSET: u64 = 4;
/// i8042 command: pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 at ports 0x60..=0x64.
#[derive(Debug, Default)]
pub struct I8042 {}

impl I8042 {
    /// Creates the controller.
    pub fn new() -> Self {
        Self {}
    }
}

impl BusDevice for I8042 {
    /// All registers read as 0.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// 0xFE written to the command port returns [`DeviceEvent::Reset`]; other writes are ignored.
    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceEvent {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            return DeviceEvent::Reset(ResetCause::Keyboard);
        }
        DeviceEvent::None
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
        assert_eq!(dev.write(0, &[0xfe]), DeviceEvent::None);
        assert_eq!(dev.write(4, &[0xd1]), DeviceEvent::None);
        assert_eq!(dev.write(4, &[]), DeviceEvent::None);
    }

    #[test]
    fn reads_are_zero() {
        let mut dev = I8042::new();
        for offset in 0..5 {
            let mut data = [0xffu8];
            dev.read(offset, &mut data);
            assert_eq!(data, [0]);
        }
    }
}

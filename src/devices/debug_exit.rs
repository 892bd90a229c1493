//! The guest exit device, compatible with QEMU's `isa-debug-exit`: a write of any width and
//! value `v` at any offset ends minivmm with exit code `((v << 1) | 1) & 0xff` (the process exit
//! status keeps 8 bits), so test images built for QEMU work unchanged. Reads return 0.

use super::{BusDevice, DeviceEvent};

/// The exit code QEMU's `isa-debug-exit` gives a written value: `(value << 1) | 1`, cut to the
/// 8 bits a process exit status has. Always odd.
pub fn exit_code_for(value: u32) -> i32 {
    (((value << 1) | 1) & 0xff) as i32
}

/// The exit device (stateless).
#[derive(Debug, Default)]
pub struct DebugExit;

impl DebugExit {
    /// Creates the device.
    pub fn new() -> Self {
        DebugExit
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Any write returns [`DeviceEvent::GuestExit`] with the little-endian value written.
    fn write(&mut self, _offset: u64, data: &[u8]) -> DeviceEvent {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        DeviceEvent::GuestExit(u32::from_le_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_qemu() {
        assert_eq!(exit_code_for(0), 1);
        assert_eq!(exit_code_for(1), 3);
        assert_eq!(exit_code_for(0x10), 33);
        assert_eq!(exit_code_for(0x11), 35);
        assert_eq!(exit_code_for(0x7f), 255);
        // Only the low 7 bits survive the 8-bit exit status.
        assert_eq!(exit_code_for(0x80), 1);
        assert_eq!(exit_code_for(0xffff_ffff), 255);
    }

    #[test]
    fn writes_of_every_width_exit() {
        let mut d = DebugExit::new();
        assert_eq!(d.write(0, &[0x10]), DeviceEvent::GuestExit(0x10));
        assert_eq!(d.write(1, &[0x34, 0x12]), DeviceEvent::GuestExit(0x1234));
        assert_eq!(
            d.write(0, &[1, 0, 0, 0x80]),
            DeviceEvent::GuestExit(0x8000_0001)
        );
        assert_eq!(d.write(0, &[]), DeviceEvent::GuestExit(0));
        let mut buf = [0xaa; 2];
        d.read(0, &mut buf);
        assert_eq!(buf, [0, 0]);
    }
}

//! The PIIX/ICH reset control register at port 0xCF9, which Linux uses for `reboot=pci`.
//!
//! Bit 1 (SYS_RST) selects a hard reset and bit 2 (RST_CPU) performs it; Linux writes the
//! register twice: first with bit 1, then with bits 1-3. Any write with bit 2 set resets the VM.
//! Reads return the last value written without bit 2, as the hardware does.

use super::{BusDevice, DeviceEvent, ResetCause};

/// RST_CPU: writing 1 resets the machine.
const RST_CPU: u8 = 1 << 2;

/// The reset control register (len 1).
#[derive(Debug, Default)]
pub struct ResetControl {
    value: u8,
}

impl ResetControl {
    /// Creates the register with value 0.
    pub fn new() -> Self {
        Self::default()
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.value;
        }
    }

    /// A write with RST_CPU set returns [`DeviceEvent::Reset`].
    fn write(&mut self, _offset: u64, data: &[u8]) -> DeviceEvent {
        let Some(&value) = data.first() else {
            return DeviceEvent::None;
        };
        self.value = value & !RST_CPU;
        if value & RST_CPU != 0 {
            return DeviceEvent::Reset(ResetCause::ResetControl);
        }
        DeviceEvent::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_cf9_sequence_resets_on_the_second_write() {
        let mut dev = ResetControl::new();
        let mut v = [0xffu8];
        dev.read(0, &mut v);
        assert_eq!(v, [0]);
        // Linux: cf9 = inb(0xcf9) & ~0x0e; outb(cf9 | 2); outb(cf9 | 0x0e).
        assert_eq!(dev.write(0, &[0x02]), DeviceEvent::None);
        dev.read(0, &mut v);
        assert_eq!(v, [0x02]);
        assert_eq!(
            dev.write(0, &[0x0e]),
            DeviceEvent::Reset(ResetCause::ResetControl)
        );
        // Warm reset code (0x06) resets too.
        assert_eq!(
            dev.write(0, &[0x06]),
            DeviceEvent::Reset(ResetCause::ResetControl)
        );
        dev.read(0, &mut v);
        assert_eq!(v[0] & RST_CPU, 0, "RST_CPU never reads back");
        assert_eq!(dev.write(0, &[]), DeviceEvent::None);
    }
}

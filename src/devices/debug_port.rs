//! The POST/debug port 0x80. Linux never writes it under minivmm (CPUID offers
//! KVM_FEATURE_NOP_IO_DELAY), so the guest's first write after a boot starts is its own
//! "ready" marker, e.g. from an init script: `printf '\1' | dd of=/dev/port bs=1 seek=128`.
//! The device reports that first write once per boot; later writes are counted only.

use super::{BusDevice, DeviceEvent};

/// The debug port (len 1); a new one is created for every boot.
#[derive(Debug, Default)]
pub struct DebugPort {
    writes: u64,
    last: u8,
}

impl DebugPort {
    /// Creates the port with no write seen.
    pub fn new() -> Self {
        Self::default()
    }

    #[cfg(test)]
    /// Writes seen this boot.
    pub fn writes(&self) -> u64 {
        self.writes
    }
}

impl BusDevice for DebugPort {
    /// Reads the last value written (0 before any write).
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(self.last);
    }

    /// The first write returns [`DeviceEvent::BootMarker`]; later ones return nothing.
    fn write(&mut self, _offset: u64, data: &[u8]) -> DeviceEvent {
        let value = data.first().copied().unwrap_or(0);
        self.last = value;
        self.writes = self.writes.saturating_add(1);
        if self.writes == 1 {
            DeviceEvent::BootMarker(value)
        } else {
            DeviceEvent::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_write_is_a_marker() {
        let mut d = DebugPort::new();
        assert_eq!(d.write(0, &[0x42]), DeviceEvent::BootMarker(0x42));
        assert_eq!(d.write(0, &[0x43]), DeviceEvent::None);
        assert_eq!(d.writes(), 2);
        let mut b = [0; 1];
        d.read(0, &mut b);
        assert_eq!(b, [0x43]);
    }
}

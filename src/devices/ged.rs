//! ACPI Generic Event Device (GED): one read-to-clear event byte plus an edge interrupt.
//!
//! The VMM ORs event bits into the register and pulses the GED's GSI; the guest's `_EVT`
//! method (`\_SB_.GEC_.ESCN`) reads the byte once, which clears it, and dispatches on the bits.
//! Bits stay set until that read, so events raised while the guest is busy are never lost.

use std::sync::Arc;

use super::regs::Field;
use super::{BusDevice, DeviceEvent, Trigger};

/// Event bit: CPU devices changed (AML calls `\_SB_.CPUS.CSCN`).
pub const GED_CPU: u8 = 1;
/// Event bit: memory devices changed (AML calls `\_SB_.MHPC.MSCN`).
pub const GED_MEMORY: u8 = 2;
/// Event bit: power button pressed (AML notifies `\_SB_.PWRB` with 0x80).
pub const GED_POWER_BUTTON: u8 = 8;

/// The register block as the DSDT declares it: the event byte `GDAT` at offset 0.
pub const FIELDS: [Field; 1] = [Field::reg(*b"GDAT", 0, 8)];

/// The GED register block (1 byte at offset 0).
pub struct Ged {
    irq: Arc<dyn Trigger>,
    pending: u8,
}

impl Ged {
    /// Creates a GED that raises its (edge-triggered) interrupt through `irq`.
    pub fn new(irq: Arc<dyn Trigger>) -> Self {
        Self { irq, pending: 0 }
    }

    /// ORs `flags` into the event register and raises the interrupt once.
    ///
    /// The flags stay set even when raising the interrupt fails, so a later successful
    /// notification still delivers them.
    pub fn notify(&mut self, flags: u8) -> std::io::Result<()> {
        self.pending |= flags;
        self.irq.trigger()
    }

    #[cfg(test)]
    /// Event bits the guest has not read yet.
    pub fn pending(&self) -> u8 {
        self.pending
    }
}

impl BusDevice for Ged {
    /// A 1-byte read at offset 0 returns the event bits and clears them; other reads return 0.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 && data.len() == 1 {
            data[0] = std::mem::take(&mut self.pending);
        }
    }

    /// Writes are ignored.
    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceEvent {
        log::debug!("GED: ignoring guest write of {data:?} at offset {offset:#x}");
        DeviceEvent::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_util::{CountingTrigger, FailingTrigger};

    #[test]
    fn notify_ors_flags_and_triggers_once_per_call() {
        let irq = Arc::new(CountingTrigger::default());
        let mut ged = Ged::new(irq.clone());
        ged.notify(GED_CPU).unwrap();
        assert_eq!(irq.count(), 1);
        ged.notify(GED_MEMORY | GED_POWER_BUTTON).unwrap();
        assert_eq!(irq.count(), 2);
        assert_eq!(ged.pending(), GED_CPU | GED_MEMORY | GED_POWER_BUTTON);
    }

    #[test]
    fn byte_read_returns_and_clears() {
        let irq = Arc::new(CountingTrigger::default());
        let mut ged = Ged::new(irq.clone());
        ged.notify(GED_CPU | GED_MEMORY).unwrap();

        // Wrong width or offset: reads 0 and leaves the bits alone.
        let mut wide = [0xffu8; 4];
        ged.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
        let mut byte = [0xffu8; 1];
        ged.read(1, &mut byte);
        assert_eq!(byte, [0]);
        assert_eq!(ged.pending(), 3);

        ged.read(0, &mut byte);
        assert_eq!(byte, [3]);
        assert_eq!(ged.pending(), 0);
        ged.read(0, &mut byte);
        assert_eq!(byte, [0]);

        // Writes never change the register.
        ged.notify(GED_POWER_BUTTON).unwrap();
        assert_eq!(ged.write(0, &[0]), DeviceEvent::None);
        assert_eq!(ged.pending(), GED_POWER_BUTTON);
        assert_eq!(irq.count(), 2);
    }

    #[test]
    fn failed_trigger_keeps_bits() {
        let mut ged = Ged::new(Arc::new(FailingTrigger));
        assert!(ged.notify(GED_MEMORY).is_err());
        assert_eq!(ged.pending(), GED_MEMORY);
    }
}

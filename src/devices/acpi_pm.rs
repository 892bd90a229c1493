//! ACPI hardware-reduced sleep control/status and reset registers.
//!
//! Three byte registers at `layout::ports::ACPI_SLEEP_CONTROL`: +0 sleep control, +1 sleep
//! status, +2 reset. The FADT points at them; the DSDT's `\_S5_` package gives the S5 sleep type.

use super::{BusDevice, DeviceEvent, ResetCause};
use crate::arch::x86_64::layout;

/// Offset of the sleep control register.
const SLEEP_CONTROL: u64 = 0;
/// Offset of the reset register.
const RESET: u64 = 2;
/// SLP_EN bit of the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// Position of the 3-bit SLP_TYP field in the sleep control register.
const SLP_TYP_SHIFT: u8 = 2;
/// Mask of SLP_TYP after shifting.
const SLP_TYP_MASK: u8 = 0x7;

/// The sleep control, sleep status and reset registers (len 3).
#[derive(Debug, Default)]
pub struct AcpiPm {}

impl AcpiPm {
    /// Creates the register block.
    pub fn new() -> Self {
        Self {}
    }
}

impl BusDevice for AcpiPm {
    /// All registers read as 0 (in particular, sleep status never reports a wake).
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Sleep control with SLP_EN and SLP_TYP = S5 returns [`DeviceEvent::PowerOff`]; the reset
    /// value written to the reset register returns [`DeviceEvent::Reset`]. Only the first byte
    /// of an access counts; anything else is ignored.
    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceEvent {
        let Some(&value) = data.first() else {
            return DeviceEvent::None;
        };
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if slp_typ == layout::S5_SLEEP_TYPE {
                    log::info!("ACPI: guest entered S5");
                    DeviceEvent::PowerOff
                } else {
                    log::warn!("ACPI: ignoring request for unsupported sleep type {slp_typ}");
                    DeviceEvent::None
                }
            }
            RESET if value == layout::ACPI_RESET_VALUE => {
                DeviceEvent::Reset(ResetCause::AcpiResetRegister)
            }
            _ => DeviceEvent::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_decode() {
        let mut pm = AcpiPm::new();
        assert_eq!(pm.write(0, &[0x34]), DeviceEvent::PowerOff);
        // SLP_TYP 5 without SLP_EN, and SLP_EN with another sleep type.
        assert_eq!(pm.write(0, &[0x14]), DeviceEvent::None);
        assert_eq!(pm.write(0, &[0x20 | (3 << 2)]), DeviceEvent::None);
        // Bits outside SLP_TYP/SLP_EN don't matter.
        assert_eq!(pm.write(0, &[0x34 | 0x80 | 0x3]), DeviceEvent::PowerOff);
        // The status register does not decode sleep requests.
        assert_eq!(pm.write(1, &[0x34]), DeviceEvent::None);
    }

    #[test]
    fn reset_register() {
        let mut pm = AcpiPm::new();
        assert_eq!(
            pm.write(2, &[layout::ACPI_RESET_VALUE]),
            DeviceEvent::Reset(ResetCause::AcpiResetRegister)
        );
        assert_eq!(pm.write(2, &[0x42]), DeviceEvent::None);
        assert_eq!(pm.write(0, &[layout::ACPI_RESET_VALUE]), DeviceEvent::None);
        assert_eq!(pm.write(2, &[]), DeviceEvent::None);
    }

    #[test]
    fn reads_are_zero() {
        let mut pm = AcpiPm::new();
        pm.write(0, &[0x34]);
        for offset in 0..3 {
            let mut data = [0xffu8];
            pm.read(offset, &mut data);
            assert_eq!(data, [0]);
        }
    }
}

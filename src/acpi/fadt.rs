//! FADT ("FACP") for a hardware-reduced platform: reset and sleep registers in I/O space,
//! no 8042, no VGA, DSDT through X_DSDT.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};

use super::{aml_bytes, OEM_ID, OEM_REVISION};
use crate::arch::x86_64::layout;

/// IAPC_BOOT_ARCH bit 2: VGA not present. Bit 1 (8042) and bit 5 (no CMOS RTC) stay clear.
pub(super) const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// A byte-wide system I/O register at `port`.
fn io_byte_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Builds the FADT pointing at the DSDT at `dsdt_addr`.
pub(super) fn build(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"MVMFACP ", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::TmrValExt)
        .dsdt_64(dsdt_addr);
    fadt.reset_reg = io_byte_register(layout::ports::ACPI_RESET);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_byte_register(layout::ports::ACPI_SLEEP_CONTROL);
    fadt.sleep_status_reg = io_byte_register(layout::ports::ACPI_SLEEP_STATUS);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT.into();
    aml_bytes(&fadt.finalize())
}

/// Byte offsets of the FADT fields the tests and callers inspect.
#[cfg(test)]
pub(super) mod offsets {
    /// 32-bit DSDT address.
    pub const DSDT: usize = 40;
    /// IAPC_BOOT_ARCH (u16).
    pub const IAPC_BOOT_ARCH: usize = 109;
    /// Flags (u32).
    pub const FLAGS: usize = 112;
    /// RESET_REG (GAS).
    pub const RESET_REG: usize = 116;
    /// RESET_VALUE.
    pub const RESET_VALUE: usize = 128;
    /// FADT minor version.
    pub const MINOR_VERSION: usize = 131;
    /// 64-bit X_DSDT address.
    pub const X_DSDT: usize = 140;
    /// SLEEP_CONTROL_REG (GAS).
    pub const SLEEP_CONTROL: usize = 244;
    /// SLEEP_STATUS_REG (GAS).
    pub const SLEEP_STATUS: usize = 256;
    /// Total length.
    pub const LEN: usize = 276;
}

#[cfg(test)]
mod tests {
    use super::offsets::*;
    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn fields() {
        let f = build(0xe1230);
        assert_eq!(f.len(), LEN);
        assert_eq!(&f[0..4], b"FACP");
        assert_eq!(u32_at(&f, 4) as usize, LEN);
        assert_eq!(f.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        // Revision 6, minor >= 3: the online-capable MADT bit is honoured.
        assert_eq!(f[8], 6);
        assert!(f[MINOR_VERSION] >= 3);
        assert_eq!(u64_at(&f, X_DSDT), 0xe1230);
        assert_eq!(u32_at(&f, DSDT), 0);

        let flags = u32_at(&f, FLAGS);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");

        let boot_arch = u16_at(&f, IAPC_BOOT_ARCH);
        assert_ne!(boot_arch & (1 << 2), 0, "VGA not present");
        assert_eq!(boot_arch & (1 << 1), 0, "8042 bit must stay clear");
        assert_eq!(boot_arch & (1 << 5), 0, "NO_CMOS_RTC must stay clear");

        // GAS: space 1 (I/O), width 8, offset 0, access 1 (byte), address.
        let gas = |off: usize, port: u16| {
            assert_eq!(&f[off..off + 4], &[1, 8, 0, 1], "GAS at {off}");
            assert_eq!(u64_at(&f, off + 4), u64::from(port));
        };
        gas(RESET_REG, layout::ports::ACPI_RESET);
        gas(SLEEP_CONTROL, layout::ports::ACPI_SLEEP_CONTROL);
        gas(SLEEP_STATUS, layout::ports::ACPI_SLEEP_STATUS);
        assert_eq!(f[RESET_VALUE], layout::ACPI_RESET_VALUE);
    }
}

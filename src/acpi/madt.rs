//! MADT ("APIC"): one Local APIC entry per possible CPU, the IOAPIC and the COM1 interrupt
//! source override.

use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::sdt::Sdt;

use super::{aml_bytes, AcpiError, OEM_ID, OEM_REVISION};
use crate::arch::x86_64::layout;

/// MADT revision: 5 makes older kernels honour the online-capable flag.
pub(super) const MADT_REVISION: u8 = 5;
/// Size of the MADT header (SDT header + local APIC address + flags).
pub(super) const MADT_HEADER_LEN: usize = 44;
/// Length of a type-0 Processor Local APIC entry.
pub(super) const LOCAL_APIC_ENTRY_LEN: usize = 8;
/// MADT type-0 flags bit 0: the CPU is enabled.
#[cfg(test)]
pub(super) const MADT_ENABLED: u32 = 1 << 0;
/// MADT type-0 flags bit 1: the CPU can be enabled at run time.
#[cfg(test)]
pub(super) const MADT_ONLINE_CAPABLE: u32 = 1 << 1;
/// MADT entry type 2: interrupt source override.
const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
/// Length of an interrupt source override entry.
const INTERRUPT_SOURCE_OVERRIDE_LEN: u8 = 10;

/// Local APIC address as the 32-bit MADT header field.
const LAPIC_ADDR: u32 = layout::APIC_START as u32;
/// IOAPIC address as the 32-bit MADT entry field.
const IOAPIC_ADDR: u32 = layout::IOAPIC_START as u32;
const _: () = assert!(layout::APIC_START <= u32::MAX as u64);
const _: () = assert!(layout::IOAPIC_START <= u32::MAX as u64);

/// Converts a validated CPU count to the byte that MADT type-0 entries use for IDs.
pub(super) fn cpu_count(count: u32) -> Result<u8, AcpiError> {
    u8::try_from(count).map_err(|_| AcpiError::TooManyCpus {
        max: count,
        limit: layout::MAX_VCPUS,
    })
}

/// The type-0 Local APIC entry for `cpu` (ACPI UID = APIC ID = index).
///
/// `_MAT` uses this with `enabled` = true even for CPUs the MADT lists as disabled: Linux
/// rejects a `_MAT` entry without the Enabled bit.
pub(super) fn local_apic_entry(cpu: u8, enabled: bool) -> Vec<u8> {
    let status = if enabled {
        EnabledStatus::Enabled
    } else {
        EnabledStatus::DisabledOnlineCapable
    };
    aml_bytes(&ProcessorLocalApic::new(cpu, cpu, status))
}

/// Interrupt source override entry: ISA `irq` delivered on `gsi`, flags "conforms to bus".
fn interrupt_source_override(irq: u8, gsi: u32) -> Vec<u8> {
    let mut entry = vec![
        TYPE_INTERRUPT_SOURCE_OVERRIDE,
        INTERRUPT_SOURCE_OVERRIDE_LEN,
        0,
        irq,
    ];
    entry.extend_from_slice(&gsi.to_le_bytes());
    entry.extend_from_slice(&0u16.to_le_bytes());
    entry
}

/// Builds the MADT: CPUs `0..boot_cpus` Enabled, `boot_cpus..max_cpus` DisabledOnlineCapable.
pub(super) fn build(boot_cpus: u8, max_cpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN as u32,
        MADT_REVISION,
        OEM_ID,
        *b"MVMAPIC ",
        OEM_REVISION,
    );
    madt.write_u32(36, LAPIC_ADDR);
    madt.write_u32(40, 0); // Flags: no dual 8259 setup to disable.
    let mut entries = Vec::with_capacity(usize::from(max_cpus) * LOCAL_APIC_ENTRY_LEN + 32);
    for cpu in 0..max_cpus {
        entries.extend_from_slice(&local_apic_entry(cpu, cpu < boot_cpus));
    }
    entries.extend_from_slice(&aml_bytes(&IoApic::new(0, IOAPIC_ADDR, 0)));
    // The only override: COM1's ISA IRQ on the identical GSI.
    entries.extend_from_slice(&interrupt_source_override(
        layout::irq::COM1 as u8,
        layout::irq::COM1,
    ));
    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn local_apic_entry_layout() {
        assert_eq!(local_apic_entry(3, true), vec![0, 8, 3, 3, 1, 0, 0, 0]);
        assert_eq!(local_apic_entry(7, false), vec![0, 8, 7, 7, 2, 0, 0, 0]);
    }

    #[test]
    fn header_and_entries() {
        let madt = build(2, 5);
        assert_eq!(&madt[0..4], b"APIC");
        assert_eq!(madt[8], MADT_REVISION);
        assert_eq!(sum(&madt), 0);
        let len = u32::from_le_bytes(madt[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, madt.len());
        assert_eq!(len, MADT_HEADER_LEN + 5 * 8 + 12 + 10);
        assert_eq!(
            u32::from_le_bytes(madt[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        assert_eq!(u32::from_le_bytes(madt[40..44].try_into().unwrap()), 0);
        for cpu in 0..5usize {
            let e = &madt[MADT_HEADER_LEN + cpu * 8..MADT_HEADER_LEN + cpu * 8 + 8];
            let flags = u32::from_le_bytes(e[4..8].try_into().unwrap());
            assert_eq!((e[0], e[1], e[2], e[3]), (0, 8, cpu as u8, cpu as u8));
            let want = if cpu < 2 {
                MADT_ENABLED
            } else {
                MADT_ONLINE_CAPABLE
            };
            assert_eq!(flags, want, "cpu {cpu}");
        }
        let ioapic = &madt[MADT_HEADER_LEN + 40..MADT_HEADER_LEN + 52];
        assert_eq!(&ioapic[0..4], &[1, 12, 0, 0]);
        assert_eq!(
            u32::from_le_bytes(ioapic[4..8].try_into().unwrap()),
            0xfec0_0000
        );
        assert_eq!(u32::from_le_bytes(ioapic[8..12].try_into().unwrap()), 0);
        let iso = &madt[MADT_HEADER_LEN + 52..];
        assert_eq!(iso, &[2, 10, 0, 4, 4, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn cpu_count_rejects_values_past_a_byte() {
        assert_eq!(cpu_count(254).unwrap(), 254);
        assert!(matches!(
            cpu_count(256),
            Err(AcpiError::TooManyCpus { max: 256, .. })
        ));
    }
}

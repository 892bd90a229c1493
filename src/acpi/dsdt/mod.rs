//! DSDT: `\_S5_`, legacy devices, the GED and the CPU and memory hotplug controllers.
//!
//! Object names follow Cloud Hypervisor/QEMU (`GED_`, `GEC_`, `PRES`, `CPUS`, `Cnnn`, `MHPC`,
//! `Mnnn`) so guest logs compare one-to-one. The register layouts are the ones the VMM-side
//! devices emulate at [`layout::GED_START`], [`layout::CPU_HOTPLUG_START`] and
//! [`layout::MEM_HOTPLUG_START`].

mod cpus;
mod memory;

#[cfg(test)]
pub(super) use cpus::cpu_device_name;
use cpus::*;
#[cfg(test)]
pub(super) use memory::memory_device_name;
use memory::*;

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, OpRegionSpace, Path,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{aml_bytes, madt, RawAml, OEM_ID, OEM_REVISION};
use crate::arch::x86_64::layout;

/// DSDT revision: 2 or more makes AML integers 64 bits wide (needed by `MCRS`).
pub(super) const DSDT_REVISION: u8 = 2;
/// Size of an SDT header.
const SDT_HEADER_LEN: u32 = 36;
/// Timeout meaning "wait forever" for `Acquire`.
const WAIT_FOREVER: u16 = 0xffff;

// GED event bits and CPU controller commands: the devices' own constants, so the AML and the
// device models cannot drift apart.
use crate::devices::cpu_hotplug::{
    CMD_NEXT_EVENT as CCMD_NEXT_EVENT, CMD_OST_EVENT as CCMD_OST_EVENT,
    CMD_OST_STATUS as CCMD_OST_STATUS,
};
use crate::devices::ged::{
    GED_CPU as GED_CPU_BIT, GED_MEMORY as GED_MEMORY_BIT, GED_POWER_BUTTON as GED_POWER_BUTTON_BIT,
};
// Register fields: the devices' own lists, so offsets are written once.
use crate::devices::regs::Field;
use crate::devices::{cpu_hotplug, ged, mem_hotplug};

/// Byte-wide fields of `region` (flag bits and commands): bits not written read back as zero.
fn byte_fields(region: &str, fields: &[Field]) -> aml::Field {
    aml::Field::new(
        region.into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        field_entries(fields),
    )
}

/// Dword-wide fields of `region` (selectors, addresses, data registers).
fn dword_fields(region: &str, fields: &[Field]) -> aml::Field {
    aml::Field::new(
        region.into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::Preserve,
        field_entries(fields),
    )
}

/// `Field` entries for `fields` (ascending and disjoint, which the devices' tests check),
/// with `Reserved` entries for the gaps between them.
fn field_entries(fields: &[Field]) -> Vec<FieldEntry> {
    let mut at = 0;
    let mut entries = Vec::with_capacity(fields.len() * 2);
    for f in fields {
        if f.start_bit() > at {
            entries.push(FieldEntry::Reserved((f.start_bit() - at) as usize));
        }
        entries.push(FieldEntry::Named(f.name, usize::from(f.bits)));
        at = f.end_bit();
    }
    entries
}

/// ACPI notify values.
const NOTIFY_DEVICE_CHECK: u8 = 1;
const NOTIFY_EJECT_REQUEST: u8 = 3;
const NOTIFY_POWER_BUTTON: u8 = 0x80;

/// `_STA` value of a present, enabled, shown and functioning device.
const STA_PRESENT: u8 = 0xf;

/// `Name(name, value)`.
fn name(name: &str, value: &dyn Aml) -> aml::Name {
    aml::Name::new(name.into(), value)
}

/// A `_CRS` with one QWord memory range covering `[start, start + len - 1]`.
fn memory_crs(start: u64, len: u64) -> aml::Name {
    name(
        "_CRS",
        &aml::ResourceTemplate::new(vec![&AddressSpace::<u64>::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            start,
            start + len - 1,
            None,
        )]),
    )
}

/// `If (LEqual (field, One)) { body }`.
fn if_field_set(field: &str, body: Vec<&dyn Aml>) -> RawAml {
    RawAml(aml_bytes(&aml::If::new(
        &aml::Equal::new(&Path::new(field), &aml::ONE),
        body,
    )))
}

/// `If (LEqual (And (Local0, bit), bit)) { body }`.
fn if_local0_bit(bit: u8, body: Vec<&dyn Aml>) -> RawAml {
    RawAml(aml_bytes(&aml::If::new(
        &aml::Equal::new(&aml::And::new(&aml::ZERO, &aml::Local(0), &bit), &bit),
        body,
    )))
}

/// A method `notifier(Arg0 = index, Arg1 = event)` with one `Notify` per device.
fn notify_method(method: &str, devices: impl Iterator<Item = (u64, String)>) -> RawAml {
    let mut body = Vec::new();
    for (index, device) in devices {
        aml::If::new(
            &aml::Equal::new(&aml::Arg(0), &index),
            vec![&aml::Notify::new(&Path::new(&device), &aml::Arg(1))],
        )
        .to_aml_bytes(&mut body);
    }
    RawAml(aml_bytes(&aml::Method::new(
        method.into(),
        2,
        true,
        vec![&RawAml(body)],
    )))
}

/// An event-directed scan `method`: `find_next` selects the first device at or after index
/// `Local0` that has an event and leaves its index in `Local1` (the controller finds it, so a scan
/// costs a few register accesses per device with an event instead of three per possible
/// device); for it, `notifier(Local1, 1)` on an insert and `notifier(Local1, 3)` on a removal,
/// each acknowledged. The scan ends at the first selected device without an event, and after
/// at most `count` rounds whatever the registers read.
fn scan_method(
    method: &str,
    count: u64,
    lock: &str,
    find_next: Vec<&dyn Aml>,
    (inserting, removing): (&str, &str),
    notifier: &str,
) -> RawAml {
    let on_insert = if_field_set(
        inserting,
        vec![
            &aml::MethodCall::new(notifier.into(), vec![&aml::Local(1), &NOTIFY_DEVICE_CHECK]),
            &aml::Store::new(&Path::new(inserting), &aml::ONE),
            &aml::Store::new(&aml::Local(3), &aml::ONE),
        ],
    );
    let on_remove = if_field_set(
        removing,
        vec![
            &aml::MethodCall::new(notifier.into(), vec![&aml::Local(1), &NOTIFY_EJECT_REQUEST]),
            &aml::Store::new(&Path::new(removing), &aml::ONE),
            &aml::Store::new(&aml::Local(3), &aml::ONE),
        ],
    );
    let find_next = RawAml(find_next.iter().flat_map(|a| aml_bytes(*a)).collect());
    RawAml(aml_bytes(&aml::Method::new(
        method.into(),
        0,
        true,
        vec![
            &aml::Acquire::new(lock.into(), WAIT_FOREVER),
            &aml::Store::new(&aml::Local(0), &aml::ZERO),
            &aml::Store::new(&aml::Local(2), &aml::ZERO),
            &aml::While::new(
                &aml::LessThan::new(&aml::Local(2), &count),
                vec![
                    &find_next,
                    &aml::Store::new(&aml::Local(3), &aml::ZERO),
                    &on_insert,
                    &on_remove,
                    &aml::Add::new(&aml::Local(0), &aml::Local(1), &aml::ONE),
                    &aml::Add::new(&aml::Local(2), &aml::Local(2), &aml::ONE),
                    // No event at the selected device: nothing is left, end the loop.
                    &aml::If::new(
                        &aml::Equal::new(&aml::Local(3), &aml::ZERO),
                        vec![&aml::Store::new(&aml::Local(2), &count)],
                    ),
                ],
            ),
            &aml::Release::new(lock.into()),
        ],
    )))
}

/// A status method `(Arg0 = index)`: under `lock`, select it and return 0xF if `enabled`.
fn status_method(method: &str, lock: &str, select: &str, enabled: &str) -> RawAml {
    RawAml(aml_bytes(&aml::Method::new(
        method.into(),
        1,
        true,
        vec![
            &aml::Acquire::new(lock.into(), WAIT_FOREVER),
            &aml::Store::new(&Path::new(select), &aml::Arg(0)),
            &aml::Store::new(&aml::Local(0), &aml::ZERO),
            &if_field_set(
                enabled,
                vec![&aml::Store::new(&aml::Local(0), &STA_PRESENT)],
            ),
            &aml::Release::new(lock.into()),
            &aml::Return::new(&aml::Local(0)),
        ],
    )))
}

/// `Method(name, 0) { Return (target(index)) }`.
fn forward0(method: &str, target: &str, index: &dyn Aml) -> RawAml {
    RawAml(aml_bytes(&aml::Method::new(
        method.into(),
        0,
        false,
        vec![&aml::Return::new(&aml::MethodCall::new(
            target.into(),
            vec![index],
        ))],
    )))
}

/// `Method(_OST, 3) { target(index, Arg0, Arg1) }`.
fn ost_method(target: &str, index: &dyn Aml) -> RawAml {
    RawAml(aml_bytes(&aml::Method::new(
        "_OST".into(),
        3,
        false,
        vec![&aml::MethodCall::new(
            target.into(),
            vec![index, &aml::Arg(0), &aml::Arg(1)],
        )],
    )))
}

/// `\_S5_`: SLP_TYP for soft-off.
fn s5() -> Vec<u8> {
    aml_bytes(&name(
        "\\_S5_",
        &aml::Package::new(vec![
            &layout::S5_SLEEP_TYPE,
            &aml::ZERO,
            &aml::ZERO,
            &aml::ZERO,
        ]),
    ))
}

/// COM1 (16550 at 0x3f8, IRQ 4 edge/active-high).
fn com1() -> Vec<u8> {
    const COM1_LEN: u8 = layout::ports::COM1_SIZE as u8;
    const _: () = assert!(layout::ports::COM1_SIZE <= u8::MAX as u16);
    aml_bytes(&aml::Device::new(
        "COM1".into(),
        vec![
            &name("_HID", &aml::EISAName::new("PNP0501")),
            &name("_UID", &aml::ZERO),
            &name("_STA", &STA_PRESENT),
            &name(
                "_CRS",
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(layout::ports::COM1, layout::ports::COM1, 1, COM1_LEN),
                    &aml::Interrupt::new(true, true, false, false, layout::irq::COM1),
                ]),
            ),
        ],
    ))
}

/// CMOS RTC (index/data at 0x70/0x71, IRQ 8), so Linux's rtc_cmos binds through PNP.
fn rtc() -> Vec<u8> {
    const RTC_LEN: u8 = (layout::ports::RTC_DATA - layout::ports::RTC_INDEX + 1) as u8;
    aml_bytes(&aml::Device::new(
        "RTC_".into(),
        vec![
            &name("_HID", &aml::EISAName::new("PNP0B00")),
            &name(
                "_CRS",
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(
                        layout::ports::RTC_INDEX,
                        layout::ports::RTC_INDEX,
                        1,
                        RTC_LEN,
                    ),
                    &aml::Interrupt::new(true, true, false, false, layout::irq::RTC),
                ]),
            ),
        ],
    ))
}

/// The pvpanic device: Linux's `pvpanic-mmio` driver binds `QEMU0001` and takes its I/O port
/// from `_CRS`.
fn pvpanic() -> Vec<u8> {
    const _: () = assert!(layout::ports::PVPANIC_SIZE <= u8::MAX as u16);
    aml_bytes(&aml::Device::new(
        "PEVT".into(),
        vec![
            &name("_HID", &"QEMU0001"),
            &name(
                "_CRS",
                &aml::ResourceTemplate::new(vec![&aml::IO::new(
                    layout::ports::PVPANIC,
                    layout::ports::PVPANIC,
                    1,
                    layout::ports::PVPANIC_SIZE as u8,
                )]),
            ),
            &name("_STA", &STA_PRESENT),
        ],
    ))
}

/// virtio-mmio device `i` (`VR0n`): Linux's virtio_mmio driver binds `LNRO0005` and takes the
/// register page and the interrupt line from `_CRS`.
fn virtio_mmio(i: usize) -> Vec<u8> {
    let base = layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE;
    let (Ok(base), Ok(size)) = (u32::try_from(base), u32::try_from(layout::VIRTIO_MMIO_SIZE))
    else {
        return Vec::new();
    };
    aml_bytes(&aml::Device::new(
        format!("VR{i:02X}").as_str().into(),
        vec![
            &name("_HID", &"LNRO0005"),
            &name("_UID", &(i as u64)),
            &name("_STA", &STA_PRESENT),
            &name(
                "_CRS",
                &aml::ResourceTemplate::new(vec![
                    &aml::Memory32Fixed::new(true, base, size),
                    &aml::Interrupt::new(true, true, false, false, layout::irq::VIRTIO[i]),
                ]),
            ),
        ],
    ))
}

/// Power button, notified through GED bit 3.
fn power_button() -> Vec<u8> {
    aml_bytes(&aml::Device::new(
        "PWRB".into(),
        vec![
            &name("_HID", &aml::EISAName::new("PNP0C0C")),
            &name("_UID", &aml::ZERO),
        ],
    ))
}

/// The Generic Event Device and its event controller `GEC_`.
fn ged() -> Vec<u8> {
    let mut bytes = aml_bytes(&aml::Device::new(
        "GED_".into(),
        vec![
            &name("_HID", &"ACPI0013"),
            &name("_UID", &aml::ZERO),
            &name(
                "_CRS",
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true,
                    true,
                    false,
                    false,
                    layout::irq::GED,
                )]),
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![&aml::MethodCall::new("\\_SB_.GEC_.ESCN".into(), vec![])],
            ),
        ],
    ));

    let cpu_scan = aml::MethodCall::new("\\_SB_.CPUS.CSCN".into(), vec![]);
    let memory_scan = aml::MethodCall::new("\\_SB_.MHPC.MSCN".into(), vec![]);
    let power_notify = RawAml(aml_bytes(&aml::Notify::new(
        &Path::new("\\_SB_.PWRB"),
        &NOTIFY_POWER_BUTTON,
    )));
    // Exactly one read of GDAT: the read clears the register.
    let escn = RawAml(aml_bytes(&aml::Method::new(
        "ESCN".into(),
        0,
        true,
        vec![
            &aml::Store::new(&aml::Local(0), &Path::new("GDAT")),
            &if_local0_bit(GED_CPU_BIT, vec![&cpu_scan]),
            &if_local0_bit(GED_MEMORY_BIT, vec![&memory_scan]),
            &if_local0_bit(GED_POWER_BUTTON_BIT, vec![&power_notify]),
        ],
    )));
    aml::Device::new(
        "GEC_".into(),
        vec![
            &name("_HID", &aml::EISAName::new("PNP0A06")),
            &name("_UID", &"Generic Event Controller"),
            &memory_crs(layout::GED_START, layout::GED_SIZE),
            &aml::OpRegion::new(
                "GDST".into(),
                OpRegionSpace::SystemMemory,
                &layout::GED_START,
                &layout::GED_SIZE,
            ),
            &byte_fields("GDST", &ged::FIELDS),
            &escn,
        ],
    )
    .to_aml_bytes(&mut bytes);
    bytes
}

/// The memory devices the DSDT describes.
#[derive(Debug, Clone, Copy)]
pub(super) struct MemoryDevices {
    /// Number of PNP0C80 slots.
    pub(super) slots: usize,
    /// Whether each has an `_EJ0` (hot-added memory is removable).
    pub(super) ejectable: bool,
}

/// Builds the complete DSDT for `max_cpus` possible CPUs and the `memory` devices, with the
/// pvpanic device if `pvpanic_device`.
pub(super) fn build(
    max_cpus: u8,
    memory: MemoryDevices,
    pvpanic_device: bool,
    virtio_devices: usize,
) -> Vec<u8> {
    let mut sb = Vec::new();
    sb.extend(com1());
    sb.extend(rtc());
    for i in 0..virtio_devices {
        sb.extend(virtio_mmio(i));
    }
    if pvpanic_device {
        sb.extend(pvpanic());
    }
    sb.extend(power_button());
    sb.extend(ged());
    sb.extend(cpu_controller());
    sb.extend(cpu_container(max_cpus));
    sb.extend(memory_controller(memory.slots, memory.ejectable));

    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        *b"MVMDSDT ",
        OEM_REVISION,
    );
    dsdt.append_slice(&s5());
    dsdt.append_slice(&aml::Scope::raw(Path::new("\\_SB_"), sb));
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory devices without `_EJ0`.
    fn fixed(slots: usize) -> MemoryDevices {
        MemoryDevices {
            slots,
            ejectable: false,
        }
    }

    #[test]
    fn patched_cpu_devices_equal_built_ones() {
        // The template is used: two name digits, _UID, _STA, _EJ0 and _OST arguments, and the
        // UID and APIC ID bytes of _MAT vary.
        let slots = cpu_device_template().1.expect("a usable template");
        assert_eq!(slots.len(), 8, "{slots:?}");
        for max in [1u8, 2, 3, 17, 33, 254] {
            let built: Vec<u8> = (0..max).flat_map(cpu_device).collect();
            assert_eq!(cpu_devices(max), built, "max {max}");
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn device_names() {
        assert_eq!(cpu_device_name(0), "C000");
        assert_eq!(cpu_device_name(10), "C00A");
        assert_eq!(cpu_device_name(253), "C0FD");
        assert_eq!(memory_device_name(7), "M007");
        assert_eq!(memory_device_name(63), "M063");
    }

    #[test]
    fn header_revision_and_checksum() {
        let dsdt = build(4, fixed(2), true, 0);
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert_eq!(dsdt[8], DSDT_REVISION);
        assert_eq!(
            u32::from_le_bytes(dsdt[4..8].try_into().unwrap()) as usize,
            dsdt.len()
        );
        assert_eq!(dsdt.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn mat_buffers_have_enabled_bit() {
        let dsdt = build(6, fixed(0), true, 0);
        for cpu in 0..6u8 {
            // Name(_MAT, Buffer(8) { type 0, len 8, uid, apic id, flags = Enabled })
            let mut mat = b"_MAT".to_vec();
            mat.extend_from_slice(&[0x11, 0x0b, 0x0a, 0x08, 0, 8, cpu, cpu, 1, 0, 0, 0]);
            assert!(contains(&dsdt, &mat), "_MAT of CPU {cpu}");
        }
    }

    #[test]
    fn cpu_devices_and_eject() {
        let dsdt = build(3, fixed(0), true, 0);
        for cpu in 0..3u8 {
            assert!(contains(&dsdt, cpu_device_name(cpu).as_bytes()));
        }
        assert!(!contains(&dsdt, b"C003"));
        // C001 and C002 have _EJ0, C000 does not.
        assert_eq!(dsdt.windows(4).filter(|w| w == b"_EJ0").count(), 2);
    }

    #[test]
    fn memory_slots() {
        let none = build(1, fixed(0), true, 0);
        assert!(contains(&none, b"MSCN"));
        assert!(!contains(&none, b"M000"));
        // No PNP0C80 (EISA id bytes 41 D0 0C 80) device without slots.
        assert!(!contains(&none, &[0x41, 0xd0, 0x0c, 0x80]));
        let some = build(1, fixed(3), true, 0);
        for slot in 0..3 {
            assert!(contains(&some, memory_device_name(slot).as_bytes()));
        }
        assert!(!contains(&some, b"M003"));
        assert!(!contains(&some, b"_EJ0"), "not removable: no memory eject");
        let removable = build(
            1,
            MemoryDevices {
                slots: 3,
                ejectable: true,
            },
            true,
            0,
        );
        assert_eq!(removable.windows(4).filter(|w| w == b"_EJ0").count(), 3);
        assert!(contains(&removable, b"MDEJ"));
    }

    #[test]
    fn s5_package() {
        let dsdt = build(1, fixed(0), true, 0);
        // Name(\_S5_, Package(4) { 5, 0, 0, 0 })
        assert!(contains(
            &dsdt,
            &[0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0, 0, 0]
        ));
    }

    #[test]
    fn pvpanic_device_only_when_asked() {
        let with = build(1, fixed(0), true, 0);
        assert!(contains(&with, b"PEVT"));
        assert!(contains(&with, b"QEMU0001"));
        // IO descriptor: 0x47, decode16, min = max = 0x505, align 1, len 1.
        assert!(contains(
            &with,
            &[0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01]
        ));
        let without = build(1, fixed(0), false, 0);
        assert!(!contains(&without, b"PEVT"));
        assert!(!contains(&without, b"QEMU0001"));
    }
}

//! CPU hotplug controller (the QEMU "modern" / Cloud Hypervisor register layout, 12 bytes).
//!
//! | Offset | Width | Read | Write |
//! |---|---|---|---|
//! | 0x0 | dword | 0 | CSEL: select a CPU index |
//! | 0x4 | byte | bit0 CPEN, bit1 CINS, bit2 CRMV of the selected CPU | bit1 ack insert, bit2 ack remove, bit3 CEJ0 eject |
//! | 0x5 | byte | 0 | CCMD: 0 next CPU with an event, 1 `_OST` event, 2 `_OST` status, 3 APIC ID |
//! | 0x8 | dword | CDAT: index after CCMD 0, APIC ID after CCMD 3 | CDAT: `_OST` event (CCMD 1) or status (CCMD 2) |
//!
//! Accesses of any width are accepted: reads return the covered bytes of the register image
//! and writes update every register they overlap. While the selector is out of range, reads
//! return 0 and writes other than CSEL and CCMD are ignored.
//!
//! A removal keeps a separate `pending_removal` flag that only the guest's eject clears, so the
//! eject is still accepted after the guest's scan has acknowledged the remove event (the ack
//! clears CRMV before Linux evaluates `_EJ0`).

use super::regs::{merge_write, read_image, Field};
use super::{BusDevice, DeviceEvent};

/// Offset of the CPU selector (CSEL).
const CSEL: u64 = 0x0;
/// Offset of the flags byte.
const FLAGS: u64 = 0x4;
/// Offset of the command byte (CCMD).
const CCMD: u64 = 0x5;
/// Offset of the command data dword (CDAT).
const CDAT: u64 = 0x8;
/// Size of the register block.
const REGS_SIZE: usize = 0xc;

/// Flags bit: CPU enabled (present).
const FLAG_CPEN: u8 = 1 << 0;
/// Flags bit: insert event pending (read) / acknowledge it (write).
const FLAG_CINS: u8 = 1 << 1;
/// Flags bit: remove event pending (read) / acknowledge it (write).
const FLAG_CRMV: u8 = 1 << 2;
/// Flags write bit: eject the selected CPU.
const FLAG_CEJ0: u8 = 1 << 3;

/// The byte-wide fields of the block as the DSDT declares them (flags, then the command).
pub const BYTE_FIELDS: [Field; 5] = [
    Field::flag(*b"CPEN", FLAGS, FLAG_CPEN),
    Field::flag(*b"CINS", FLAGS, FLAG_CINS),
    Field::flag(*b"CRMV", FLAGS, FLAG_CRMV),
    Field::flag(*b"CEJ0", FLAGS, FLAG_CEJ0),
    Field::reg(*b"CCMD", CCMD, 8),
];
/// The dword-wide fields of the block as the DSDT declares them.
pub const DWORD_FIELDS: [Field; 2] = [
    Field::reg(*b"CSEL", CSEL, 32),
    Field::reg(*b"CDAT", CDAT, 32),
];

/// CCMD: select the next CPU with a pending insert/remove event.
pub const CMD_NEXT_EVENT: u8 = 0;
/// CCMD: the next CDAT write is the `_OST` event.
pub const CMD_OST_EVENT: u8 = 1;
/// CCMD: the next CDAT write is the `_OST` status.
pub const CMD_OST_STATUS: u8 = 2;
/// CCMD: CDAT reads the selected CPU's APIC ID.
const CMD_GET_APIC_ID: u8 = 3;

#[derive(Debug, Default, Clone, Copy)]
struct CpuSlot {
    /// Present: `_STA` reports 0xF.
    enabled: bool,
    /// Insert notification not yet acknowledged by the guest.
    inserting: bool,
    /// Remove notification not yet acknowledged by the guest.
    removing: bool,
    /// Removal requested by the VMM, waiting for the guest's eject.
    pending_removal: bool,
}

/// CPU hotplug controller state for `max_cpus` possible CPUs (index = APIC ID = ACPI UID).
#[derive(Debug)]
pub struct CpuHotplug {
    cpus: Vec<CpuSlot>,
    selector: u32,
    command: u8,
    /// `_OST` event latched by CCMD 1 + CDAT write, reported with the status.
    ost_event: u32,
}

impl CpuHotplug {
    /// Creates a controller for `max_cpus` CPUs, of which `0..boot_cpus` are enabled and no
    /// events are pending.
    pub fn new(max_cpus: u32, boot_cpus: u32) -> Self {
        let cpus = (0..max_cpus)
            .map(|i| CpuSlot {
                enabled: i < boot_cpus,
                ..CpuSlot::default()
            })
            .collect();
        Self {
            cpus,
            selector: 0,
            command: CMD_NEXT_EVENT,
            ost_event: 0,
        }
    }

    fn slot(&self, cpu: u32) -> Option<&CpuSlot> {
        self.cpus.get(usize::try_from(cpu).ok()?)
    }

    fn slot_mut(&mut self, cpu: u32) -> Option<&mut CpuSlot> {
        self.cpus.get_mut(usize::try_from(cpu).ok()?)
    }

    /// Marks `cpu` enabled with an insert event pending (the VMM then raises GED [`GED_CPU`]).
    ///
    /// Ignored, with a warning, for an index out of range, a CPU that is already enabled, or
    /// one still waiting for the guest's eject.
    ///
    /// [`GED_CPU`]: super::ged::GED_CPU
    pub fn insert(&mut self, cpu: u32) {
        let Some(slot) = self.slot_mut(cpu) else {
            log::warn!("CPU hotplug: cannot insert CPU {cpu}: index out of range");
            return;
        };
        if slot.pending_removal {
            log::warn!("CPU hotplug: cannot insert CPU {cpu}: its removal is still pending");
        } else if slot.enabled {
            log::warn!("CPU hotplug: CPU {cpu} is already present");
        } else {
            slot.enabled = true;
            slot.inserting = true;
        }
    }

    /// Marks `cpu` with a remove event and a pending removal (the VMM then raises GED
    /// [`GED_CPU`]); the CPU stays enabled until the guest ejects it.
    ///
    /// Ignored, with a warning, for CPU 0, an index out of range or a CPU that is not present.
    /// Requesting the removal of a CPU already pending removal changes nothing.
    ///
    /// [`GED_CPU`]: super::ged::GED_CPU
    pub fn request_removal(&mut self, cpu: u32) {
        if cpu == 0 {
            log::warn!("CPU hotplug: CPU 0 cannot be removed");
            return;
        }
        match self.slot_mut(cpu) {
            Some(slot) if slot.pending_removal => {}
            Some(slot) if slot.enabled => {
                slot.removing = true;
                slot.pending_removal = true;
            }
            Some(_) => log::warn!("CPU hotplug: cannot remove CPU {cpu}: it is not present"),
            None => log::warn!("CPU hotplug: cannot remove CPU {cpu}: index out of range"),
        }
    }

    /// Withdraws a pending removal (the guest refused the eject, see `_OST`): the CPU stays
    /// present. Returns whether a removal was pending.
    pub fn cancel_removal(&mut self, cpu: u32) -> bool {
        match self.slot_mut(cpu) {
            Some(slot) if slot.pending_removal => {
                slot.pending_removal = false;
                slot.removing = false;
                true
            }
            _ => false,
        }
    }

    /// Whether `cpu` is present (including a CPU whose removal waits for the guest's eject).
    pub fn is_enabled(&self, cpu: u32) -> bool {
        self.slot(cpu).is_some_and(|s| s.enabled)
    }

    /// Number of present CPUs (including those waiting for the guest's eject).
    pub fn enabled_count(&self) -> u32 {
        // At most `max_cpus` (a u32), so the count fits.
        self.cpus.iter().filter(|s| s.enabled).count() as u32
    }

    /// CPUs whose removal was requested and that the guest has not ejected yet, ascending.
    pub fn pending_removals(&self) -> Vec<u32> {
        self.cpus
            .iter()
            .zip(0u32..)
            .filter(|(s, _)| s.pending_removal)
            .map(|(_, i)| i)
            .collect()
    }

    #[cfg(test)]
    /// Number of possible CPUs.
    pub fn max_cpus(&self) -> u32 {
        // Built from a u32 in `new`.
        self.cpus.len() as u32
    }

    /// Current register image for the selected CPU (all zero if the selector is out of range).
    fn image(&self) -> [u8; REGS_SIZE] {
        let mut image = [0u8; REGS_SIZE];
        let Some(slot) = self.slot(self.selector) else {
            return image;
        };
        let mut flags = 0;
        if slot.enabled {
            flags |= FLAG_CPEN;
        }
        if slot.inserting {
            flags |= FLAG_CINS;
        }
        if slot.removing {
            flags |= FLAG_CRMV;
        }
        image[FLAGS as usize] = flags;
        let cdat = match self.command {
            // After command 0 the selector points at the CPU with the event; index = APIC ID.
            CMD_NEXT_EVENT | CMD_GET_APIC_ID => self.selector,
            _ => 0,
        };
        image[CDAT as usize..].copy_from_slice(&cdat.to_le_bytes());
        image
    }

    /// Moves the selector to the first CPU at or after it with an insert or remove event.
    /// Leaves it unchanged if there is none.
    fn select_next_event(&mut self) {
        let start = usize::try_from(self.selector).unwrap_or(usize::MAX);
        let found = self
            .cpus
            .iter()
            .zip(0u32..)
            .skip(start)
            .find(|(s, _)| s.inserting || s.removing);
        if let Some((_, cpu)) = found {
            self.selector = cpu;
        }
    }

    fn write_flags(&mut self, value: u8) -> DeviceEvent {
        let cpu = self.selector;
        let Some(slot) = self.slot_mut(cpu) else {
            return DeviceEvent::None;
        };
        if value & FLAG_CINS != 0 {
            slot.inserting = false;
        }
        if value & FLAG_CRMV != 0 {
            slot.removing = false;
        }
        if value & FLAG_CEJ0 == 0 {
            return DeviceEvent::None;
        }
        if cpu == 0 || !slot.pending_removal {
            log::warn!("CPU hotplug: refusing the guest's eject of CPU {cpu}: no removal pending");
            return DeviceEvent::None;
        }
        *slot = CpuSlot::default();
        log::info!("CPU hotplug: guest ejected CPU {cpu}");
        DeviceEvent::CpuEject(cpu)
    }

    fn write_cdat(&mut self, value: u32) -> DeviceEvent {
        let cpu = self.selector;
        if self.slot(cpu).is_none() {
            return DeviceEvent::None;
        }
        match self.command {
            CMD_OST_EVENT => {
                self.ost_event = value;
                DeviceEvent::None
            }
            CMD_OST_STATUS => DeviceEvent::CpuOst {
                cpu,
                event: self.ost_event,
                status: value,
            },
            cmd => {
                log::debug!("CPU hotplug: ignoring CDAT write {value:#x} under command {cmd}");
                DeviceEvent::None
            }
        }
    }
}

impl BusDevice for CpuHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_image(&self.image(), offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceEvent {
        let mut event = DeviceEvent::None;
        if let Some(sel) = merge_write(self.selector, CSEL, 4, offset, data) {
            self.selector = sel;
        }
        if let Some(value) = merge_write(0, FLAGS, 1, offset, data) {
            // Only the low byte was merged.
            event = self.write_flags(value as u8);
        }
        if let Some(cmd) = merge_write(0, CCMD, 1, offset, data) {
            self.command = cmd as u8;
            if self.command == CMD_NEXT_EVENT {
                self.select_next_event();
            }
        }
        if let Some(value) = merge_write(0, CDAT, 4, offset, data) {
            let cdat_event = self.write_cdat(value);
            if event == DeviceEvent::None {
                event = cdat_event;
            }
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(dev: &mut CpuHotplug, cpu: u32) {
        assert_eq!(dev.write(CSEL, &cpu.to_le_bytes()), DeviceEvent::None);
    }

    fn flags(dev: &mut CpuHotplug) -> u8 {
        let mut data = [0u8; 1];
        dev.read(FLAGS, &mut data);
        data[0]
    }

    fn cdat(dev: &mut CpuHotplug) -> u32 {
        let mut data = [0u8; 4];
        dev.read(CDAT, &mut data);
        u32::from_le_bytes(data)
    }

    fn command(dev: &mut CpuHotplug, cmd: u8) {
        assert_eq!(dev.write(CCMD, &[cmd]), DeviceEvent::None);
    }

    #[test]
    fn the_aml_fields_reach_the_registers() {
        use crate::devices::regs::{aml_read, aml_write, assert_fields_fit};
        assert_fields_fit(&BYTE_FIELDS, REGS_SIZE);
        assert_fields_fit(&DWORD_FIELDS, REGS_SIZE);
        let (b, d) = (&BYTE_FIELDS[..], &DWORD_FIELDS[..]);
        let mut dev = CpuHotplug::new(4, 2);
        dev.insert(2);
        aml_write(&mut dev, d, b"CSEL", 1);
        assert_eq!(aml_read(&mut dev, b, b"CPEN"), 1);
        assert_eq!(aml_read(&mut dev, b, b"CINS"), 0);
        // CCMD 0 + CDAT: the next CPU with an event, as the scan method finds it.
        aml_write(&mut dev, b, b"CCMD", u64::from(CMD_NEXT_EVENT));
        assert_eq!(aml_read(&mut dev, d, b"CDAT"), 2);
        aml_write(&mut dev, d, b"CSEL", 2);
        assert_eq!(aml_read(&mut dev, b, b"CINS"), 1);
        aml_write(&mut dev, b, b"CINS", 1);
        assert_eq!(aml_read(&mut dev, b, b"CINS"), 0);
        aml_write(&mut dev, b, b"CCMD", u64::from(CMD_GET_APIC_ID));
        assert_eq!(aml_read(&mut dev, d, b"CDAT"), 2);
        dev.request_removal(2);
        assert_eq!(aml_read(&mut dev, b, b"CRMV"), 1);
        assert_eq!(aml_write(&mut dev, b, b"CEJ0", 1), DeviceEvent::CpuEject(2));
        assert_eq!(aml_read(&mut dev, b, b"CPEN"), 0);
        // _OST: event then status through CCMD + CDAT.
        aml_write(&mut dev, b, b"CCMD", u64::from(CMD_OST_EVENT));
        aml_write(&mut dev, d, b"CDAT", 3);
        aml_write(&mut dev, b, b"CCMD", u64::from(CMD_OST_STATUS));
        assert_eq!(
            aml_write(&mut dev, d, b"CDAT", 0),
            DeviceEvent::CpuOst {
                cpu: 2,
                event: 3,
                status: 0
            }
        );
    }

    #[test]
    fn boot_state() {
        let mut dev = CpuHotplug::new(4, 2);
        assert_eq!(dev.max_cpus(), 4);
        assert_eq!(dev.enabled_count(), 2);
        assert!(dev.is_enabled(1) && !dev.is_enabled(2) && !dev.is_enabled(99));
        assert!(dev.pending_removals().is_empty());
        select(&mut dev, 1);
        assert_eq!(flags(&mut dev), FLAG_CPEN);
        select(&mut dev, 2);
        assert_eq!(flags(&mut dev), 0);
    }

    #[test]
    fn insert_then_ack() {
        let mut dev = CpuHotplug::new(4, 1);
        dev.insert(2);
        assert!(dev.is_enabled(2));
        assert_eq!(dev.enabled_count(), 2);
        select(&mut dev, 2);
        assert_eq!(flags(&mut dev), FLAG_CPEN | FLAG_CINS);
        assert_eq!(dev.write(FLAGS, &[FLAG_CINS]), DeviceEvent::None);
        assert_eq!(flags(&mut dev), FLAG_CPEN);
        // Inserting a present CPU or an index out of range changes nothing.
        dev.insert(2);
        dev.insert(4);
        assert_eq!(flags(&mut dev), FLAG_CPEN);
        assert_eq!(dev.enabled_count(), 2);
    }

    #[test]
    fn eject_still_accepted_after_remove_ack() {
        let mut dev = CpuHotplug::new(4, 3);
        dev.request_removal(2);
        assert_eq!(dev.pending_removals(), vec![2]);
        select(&mut dev, 2);
        assert_eq!(flags(&mut dev), FLAG_CPEN | FLAG_CRMV);
        // The guest's scan acknowledges the remove event first ...
        dev.write(FLAGS, &[FLAG_CRMV]);
        assert_eq!(flags(&mut dev), FLAG_CPEN);
        assert_eq!(dev.pending_removals(), vec![2]);
        assert!(dev.is_enabled(2));
        // ... and ejects later.
        assert_eq!(dev.write(FLAGS, &[FLAG_CEJ0]), DeviceEvent::CpuEject(2));
        assert_eq!(flags(&mut dev), 0);
        assert!(!dev.is_enabled(2));
        assert!(dev.pending_removals().is_empty());
        assert_eq!(dev.enabled_count(), 2);
        // A second eject is refused.
        assert_eq!(dev.write(FLAGS, &[FLAG_CEJ0]), DeviceEvent::None);
        // The CPU can be inserted again.
        dev.insert(2);
        assert_eq!(flags(&mut dev), FLAG_CPEN | FLAG_CINS);
    }

    #[test]
    fn eject_refused_for_cpu0_and_cpus_not_pending() {
        let mut dev = CpuHotplug::new(4, 4);
        dev.request_removal(0);
        assert!(dev.pending_removals().is_empty());
        select(&mut dev, 0);
        assert_eq!(flags(&mut dev), FLAG_CPEN);
        assert_eq!(dev.write(FLAGS, &[FLAG_CEJ0]), DeviceEvent::None);
        assert!(dev.is_enabled(0));
        select(&mut dev, 3);
        assert_eq!(dev.write(FLAGS, &[FLAG_CEJ0]), DeviceEvent::None);
        assert!(dev.is_enabled(3));
        assert_eq!(dev.enabled_count(), 4);
    }

    #[test]
    fn removal_of_absent_cpu_ignored_and_insert_blocked_while_pending() {
        let mut dev = CpuHotplug::new(4, 2);
        dev.request_removal(3);
        dev.request_removal(9);
        assert!(dev.pending_removals().is_empty());
        dev.request_removal(1);
        dev.insert(1);
        select(&mut dev, 1);
        assert_eq!(flags(&mut dev), FLAG_CPEN | FLAG_CRMV);
    }

    #[test]
    fn eject_with_ack_in_same_write() {
        let mut dev = CpuHotplug::new(2, 2);
        dev.request_removal(1);
        select(&mut dev, 1);
        assert_eq!(
            dev.write(FLAGS, &[FLAG_CRMV | FLAG_CEJ0]),
            DeviceEvent::CpuEject(1)
        );
    }

    #[test]
    fn command_0_selects_next_cpu_with_event() {
        let mut dev = CpuHotplug::new(8, 2);
        dev.insert(3);
        dev.request_removal(1);
        dev.insert(6);
        select(&mut dev, 0);
        command(&mut dev, CMD_NEXT_EVENT);
        assert_eq!(cdat(&mut dev), 1);
        assert_eq!(flags(&mut dev), FLAG_CPEN | FLAG_CRMV);
        dev.write(FLAGS, &[FLAG_CRMV]);
        command(&mut dev, CMD_NEXT_EVENT);
        assert_eq!(cdat(&mut dev), 3);
        dev.write(FLAGS, &[FLAG_CINS]);
        // Scanning from the next index finds CPU 6.
        select(&mut dev, 4);
        command(&mut dev, CMD_NEXT_EVENT);
        assert_eq!(cdat(&mut dev), 6);
        dev.write(FLAGS, &[FLAG_CINS]);
        // No more events: the selector stays where it is.
        select(&mut dev, 7);
        command(&mut dev, CMD_NEXT_EVENT);
        assert_eq!(cdat(&mut dev), 7);
        select(&mut dev, 0);
        command(&mut dev, CMD_NEXT_EVENT);
        assert_eq!(cdat(&mut dev), 0);
    }

    #[test]
    fn command_3_reads_apic_id() {
        let mut dev = CpuHotplug::new(8, 8);
        select(&mut dev, 5);
        command(&mut dev, CMD_GET_APIC_ID);
        assert_eq!(cdat(&mut dev), 5);
        // Offset 0 reads 0.
        let mut data = [0xffu8; 4];
        dev.read(CSEL, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn ost_through_cdat() {
        let mut dev = CpuHotplug::new(4, 2);
        select(&mut dev, 1);
        command(&mut dev, CMD_OST_EVENT);
        assert_eq!(dev.write(CDAT, &3u32.to_le_bytes()), DeviceEvent::None);
        command(&mut dev, CMD_OST_STATUS);
        assert_eq!(
            dev.write(CDAT, &0x82u32.to_le_bytes()),
            DeviceEvent::CpuOst {
                cpu: 1,
                event: 3,
                status: 0x82
            }
        );
        // CDAT writes under other commands are ignored.
        command(&mut dev, CMD_GET_APIC_ID);
        assert_eq!(dev.write(CDAT, &[1, 0, 0, 0]), DeviceEvent::None);
    }

    #[test]
    fn selector_out_of_range() {
        let mut dev = CpuHotplug::new(2, 2);
        dev.request_removal(1);
        select(&mut dev, 2);
        let mut data = [0xffu8; REGS_SIZE];
        dev.read(0, &mut data);
        assert_eq!(data, [0; REGS_SIZE]);
        assert_eq!(dev.write(FLAGS, &[0xff]), DeviceEvent::None);
        command(&mut dev, CMD_OST_STATUS);
        assert_eq!(dev.write(CDAT, &[0; 4]), DeviceEvent::None);
        command(&mut dev, CMD_NEXT_EVENT);
        dev.read(CDAT, &mut data[..4]);
        assert_eq!(data[..4], [0; 4]);
        assert_eq!(dev.pending_removals(), vec![1]);
        select(&mut dev, u32::MAX);
        command(&mut dev, CMD_NEXT_EVENT);
        assert_eq!(cdat(&mut dev), 0);
    }

    #[test]
    fn tolerant_access_widths() {
        let mut dev = CpuHotplug::new(300, 300);
        dev.request_removal(258);
        // Byte-wise selector writes merge into the dword.
        dev.write(CSEL, &[0x02]);
        dev.write(CSEL + 1, &[0x01]);
        assert_eq!(flags(&mut dev), FLAG_CPEN | FLAG_CRMV);
        // A dword read at the flags offset sees flags in the low byte.
        let mut data = [0u8; 4];
        dev.read(FLAGS, &mut data);
        assert_eq!(data, [FLAG_CPEN | FLAG_CRMV, 0, 0, 0]);
        // A word write covering flags and CCMD acks and runs the command.
        dev.write(FLAGS, &[FLAG_CRMV, CMD_GET_APIC_ID]);
        assert_eq!(flags(&mut dev), FLAG_CPEN);
        assert_eq!(cdat(&mut dev), 258);
        // Eject through a dword write at offset 4.
        assert_eq!(
            dev.write(FLAGS, &[FLAG_CEJ0, CMD_GET_APIC_ID, 0, 0]),
            DeviceEvent::CpuEject(258)
        );
    }

    #[test]
    fn cancelled_removal_keeps_the_cpu_and_refuses_its_eject() {
        let mut hp = CpuHotplug::new(4, 3);
        hp.request_removal(2);
        assert!(hp.cancel_removal(2));
        assert!(!hp.cancel_removal(2));
        assert!(hp.is_enabled(2));
        assert!(hp.pending_removals().is_empty());
        hp.write(CSEL, &2u32.to_le_bytes());
        assert_eq!(hp.write(FLAGS, &[FLAG_CEJ0]), DeviceEvent::None);
        assert!(hp.is_enabled(2));
    }
}

//! Memory hotplug controller (QEMU / Cloud Hypervisor register layout, 24 bytes).
//!
//! | Offset | Read (selected slot) | Write |
//! |---|---|---|
//! | 0x00 | base, low 32 bits | MSEL: slot selector |
//! | 0x04 | base, high 32 bits | MOEV: `_OST` event |
//! | 0x08 | length, low 32 bits | MOSC: `_OST` status (reports [`DeviceEvent::MemOst`]) |
//! | 0x0C | length, high 32 bits | - |
//! | 0x10 | proximity domain (0) | - |
//! | 0x14 | byte: bit0 enabled, bit1 inserting, bit2 removing | bit1 ack insert, bit2 ack remove, bit3 eject |
//! | 0x18 | MNEV: the first slot at or after the selector with an insert or remove event, or the number of slots if none (minivmm's extension, so the guest's scan does not visit every slot) | - |
//!
//! Accesses of any width are accepted (reads return the covered bytes, writes update each
//! register they overlap). While the selector is out of range, reads return 0 and writes other
//! than MSEL are ignored.
//!
//! A removal keeps a separate `pending_removal` flag that only the guest's eject (or the VMM's
//! withdrawal) clears, so the eject is still accepted after the guest's scan acknowledged the
//! remove event. An eject of a slot without a pending removal is refused: the slot stays enabled
//! (the guest then sees `_STA` still present and reports the eject incomplete).

use super::regs::{merge_write, read_image, Field};
use super::{BusDevice, DeviceEvent};

/// Offset of MSEL (write) / base low (read).
const MSEL: u64 = 0x0;
/// Offset of MOEV (write) / base high (read).
const MOEV: u64 = 0x4;
/// Offset of MOSC (write) / length low (read).
const MOSC: u64 = 0x8;
/// Offset of the selected slot's base (read, 64 bits as two dwords).
const BASE: u64 = 0x0;
/// Offset of the selected slot's length (read, 64 bits as two dwords).
const LENGTH: u64 = 0x8;
/// Offset of the proximity domain (read).
const PROXIMITY: u64 = 0x10;
/// Offset of the flags byte.
const FLAGS: u64 = 0x14;
/// Offset of MNEV, the next slot with an event (read).
const MNEV: u64 = 0x18;
/// Size of the register block.
const REGS_SIZE: usize = 0x1c;

/// Flags bit: slot enabled (populated).
const FLAG_ENABLED: u8 = 1 << 0;
/// Flags bit: insert event pending (read) / acknowledge it (write).
const FLAG_INSERTING: u8 = 1 << 1;
/// Flags bit: remove event pending (read) / acknowledge it (write).
const FLAG_REMOVING: u8 = 1 << 2;
/// Flags write bit: eject the slot's memory.
const FLAG_EJECT: u8 = 1 << 3;

/// The dword-wide read fields as the DSDT declares them (base, length, proximity).
pub const READ_FIELDS: [Field; 5] = [
    Field::reg(*b"MHBL", BASE, 32),
    Field::reg(*b"MHBH", BASE + 4, 32),
    Field::reg(*b"MHLL", LENGTH, 32),
    Field::reg(*b"MHLH", LENGTH + 4, 32),
    Field::reg(*b"MHPX", PROXIMITY, 32),
];
/// The byte-wide flag fields as the DSDT declares them.
pub const FLAG_FIELDS: [Field; 4] = [
    Field::flag(*b"MEN_", FLAGS, FLAG_ENABLED),
    Field::flag(*b"MINS", FLAGS, FLAG_INSERTING),
    Field::flag(*b"MRMV", FLAGS, FLAG_REMOVING),
    Field::flag(*b"MEJ0", FLAGS, FLAG_EJECT),
];
/// The dword-wide write fields as the DSDT declares them (selector, `_OST`).
pub const WRITE_FIELDS: [Field; 3] = [
    Field::reg(*b"MSEL", MSEL, 32),
    Field::reg(*b"MOEV", MOEV, 32),
    Field::reg(*b"MOSC", MOSC, 32),
];

/// The dword-wide event field as the DSDT declares it (next slot with an event).
pub const EVENT_FIELDS: [Field; 1] = [Field::reg(*b"MNEV", MNEV, 32)];

/// Errors from filling a memory hotplug slot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemHotplugError {
    /// The slot index is not below the number of slots.
    #[error("memory hotplug insert: slot {slot} out of range ({slots} slots)")]
    SlotOutOfRange {
        /// Requested slot.
        slot: usize,
        /// Number of slots of the controller.
        slots: usize,
    },
    /// The slot already holds memory.
    #[error("memory hotplug insert: slot {0} is already in use")]
    SlotInUse(usize),
    /// The size is zero or `base + size` overflows.
    #[error("memory hotplug insert into slot {slot}: invalid range {base:#x}+{size:#x}")]
    InvalidRange {
        /// Requested slot.
        slot: usize,
        /// Guest-physical base of the memory.
        base: u64,
        /// Size of the memory in bytes.
        size: u64,
    },
}

#[derive(Debug, Default, Clone, Copy)]
struct MemSlot {
    base: u64,
    size: u64,
    enabled: bool,
    inserting: bool,
    removing: bool,
    /// Removal requested by the VMM, waiting for the guest's eject.
    pending_removal: bool,
}

/// Memory hotplug controller state: a fixed number of slots (ACPI `Mnnn` devices).
#[derive(Debug)]
pub struct MemHotplug {
    slots: Vec<MemSlot>,
    selector: u32,
    /// `_OST` event written to MOEV, reported with the next MOSC write.
    ost_event: u32,
}

impl MemHotplug {
    /// Creates a controller with `slots` empty slots.
    pub fn new(slots: usize) -> Self {
        Self {
            slots: vec![MemSlot::default(); slots],
            selector: 0,
            ost_event: 0,
        }
    }

    /// Fills `slot` with `size` bytes at guest-physical `base`, marked enabled with an insert
    /// event pending (the VMM then raises GED [`GED_MEMORY`]).
    ///
    /// Fails if the slot is out of range or already used, or the range is empty or wraps.
    ///
    /// [`GED_MEMORY`]: super::ged::GED_MEMORY
    pub fn insert(&mut self, slot: usize, base: u64, size: u64) -> Result<(), MemHotplugError> {
        let slots = self.slots.len();
        let entry = self
            .slots
            .get_mut(slot)
            .ok_or(MemHotplugError::SlotOutOfRange { slot, slots })?;
        if entry.enabled || entry.pending_removal {
            return Err(MemHotplugError::SlotInUse(slot));
        }
        if size == 0 || base.checked_add(size).is_none() {
            return Err(MemHotplugError::InvalidRange { slot, base, size });
        }
        *entry = MemSlot {
            base,
            size,
            enabled: true,
            inserting: true,
            ..MemSlot::default()
        };
        Ok(())
    }

    /// Marks `slot` with a remove event and a pending removal (the VMM then raises GED
    /// [`GED_MEMORY`]); the slot stays enabled until the guest ejects it. Returns false, and
    /// changes nothing, for a slot out of range or not enabled.
    ///
    /// [`GED_MEMORY`]: super::ged::GED_MEMORY
    pub fn request_removal(&mut self, slot: usize) -> bool {
        match self.slots.get_mut(slot) {
            Some(s) if s.enabled => {
                s.removing = true;
                s.pending_removal = true;
                true
            }
            _ => false,
        }
    }

    /// Withdraws a pending removal (the guest refused it, or did not answer in time): the slot
    /// stays enabled and a later eject is refused. Returns whether a removal was pending.
    pub fn cancel_removal(&mut self, slot: usize) -> bool {
        match self.slots.get_mut(slot) {
            Some(s) if s.pending_removal => {
                s.pending_removal = false;
                s.removing = false;
                true
            }
            _ => false,
        }
    }

    /// Whether `slot` holds memory (including a slot whose removal waits for the guest).
    pub fn is_enabled(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(|s| s.enabled)
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    #[cfg(test)]
    /// Number of filled slots (the VMM fills them in order 0, 1, 2, ..., so this is also the
    /// index of the next free slot).
    pub fn used_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.enabled).count()
    }

    fn selected(&self) -> Option<&MemSlot> {
        self.slots.get(usize::try_from(self.selector).ok()?)
    }

    fn selected_mut(&mut self) -> Option<&mut MemSlot> {
        self.slots.get_mut(usize::try_from(self.selector).ok()?)
    }

    /// The first slot at or after the selector with a pending event, or the slot count.
    fn next_event(&self) -> u32 {
        let start = usize::try_from(self.selector).unwrap_or(usize::MAX);
        let found = self
            .slots
            .iter()
            .enumerate()
            .skip(start)
            .find(|(_, s)| s.inserting || s.removing)
            .map_or(self.slots.len(), |(i, _)| i);
        u32::try_from(found).unwrap_or(u32::MAX)
    }

    /// Current register image for the selected slot (all zero but MNEV if the selector is out
    /// of range).
    fn image(&self) -> [u8; REGS_SIZE] {
        let mut image = [0u8; REGS_SIZE];
        image[MNEV as usize..].copy_from_slice(&self.next_event().to_le_bytes());
        let Some(slot) = self.selected() else {
            return image;
        };
        image[BASE as usize..LENGTH as usize].copy_from_slice(&slot.base.to_le_bytes());
        image[LENGTH as usize..PROXIMITY as usize].copy_from_slice(&slot.size.to_le_bytes());
        // Proximity domain 0: already zero.
        let mut flags = 0;
        if slot.enabled {
            flags |= FLAG_ENABLED;
        }
        if slot.inserting {
            flags |= FLAG_INSERTING;
        }
        if slot.removing {
            flags |= FLAG_REMOVING;
        }
        image[FLAGS as usize] = flags;
        image
    }

    fn write_flags(&mut self, value: u8) -> DeviceEvent {
        let selector = self.selector;
        let Some(slot) = self.selected_mut() else {
            return DeviceEvent::None;
        };
        if value & FLAG_INSERTING != 0 {
            slot.inserting = false;
        }
        if value & FLAG_REMOVING != 0 {
            slot.removing = false;
        }
        if value & FLAG_EJECT == 0 {
            return DeviceEvent::None;
        }
        if !slot.pending_removal {
            log::warn!(
                "memory hotplug: refusing the guest's eject of slot {selector}: no removal pending"
            );
            return DeviceEvent::None;
        }
        *slot = MemSlot::default();
        log::info!("memory hotplug: guest ejected slot {selector}");
        DeviceEvent::MemEject(selector)
    }

    fn write_status(&mut self, status: u32) -> DeviceEvent {
        if self.selected().is_none() {
            return DeviceEvent::None;
        }
        DeviceEvent::MemOst {
            slot: self.selector,
            event: self.ost_event,
            status,
        }
    }
}

impl BusDevice for MemHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_image(&self.image(), offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceEvent {
        let mut event = DeviceEvent::None;
        if let Some(sel) = merge_write(self.selector, MSEL, 4, offset, data) {
            self.selector = sel;
        }
        if let Some(ev) = merge_write(self.ost_event, MOEV, 4, offset, data) {
            if self.selected().is_some() {
                self.ost_event = ev;
            }
        }
        if let Some(status) = merge_write(0, MOSC, 4, offset, data) {
            event = self.write_status(status);
        }
        if let Some(value) = merge_write(0, FLAGS, 1, offset, data) {
            // Only the low byte was merged. MOSC (0x8..0xc) and FLAGS (0x14) are too far apart
            // for one access of at most 8 bytes to reach both.
            let flags_event = self.write_flags(value as u8);
            if flags_event != DeviceEvent::None {
                event = flags_event;
            }
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_u32(dev: &mut MemHotplug, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        dev.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn flags(dev: &mut MemHotplug) -> u8 {
        let mut data = [0u8; 1];
        dev.read(FLAGS, &mut data);
        data[0]
    }

    fn select(dev: &mut MemHotplug, slot: u32) {
        assert_eq!(dev.write(MSEL, &slot.to_le_bytes()), DeviceEvent::None);
    }

    #[test]
    fn the_aml_fields_reach_the_registers() {
        use crate::devices::regs::{aml_read, aml_write, assert_fields_fit};
        for fields in [&READ_FIELDS[..], &FLAG_FIELDS, &WRITE_FIELDS] {
            assert_fields_fit(fields, REGS_SIZE);
        }
        let (r, f, w) = (&READ_FIELDS[..], &FLAG_FIELDS[..], &WRITE_FIELDS[..]);
        let mut dev = MemHotplug::new(3);
        let base = 0x1_2000_0000u64;
        dev.insert(1, base, 3 << 27).unwrap();
        aml_write(&mut dev, w, b"MSEL", 1);
        assert_eq!(aml_read(&mut dev, r, b"MHBL"), base & 0xffff_ffff);
        assert_eq!(aml_read(&mut dev, r, b"MHBH"), base >> 32);
        assert_eq!(aml_read(&mut dev, r, b"MHLL"), 3 << 27);
        assert_eq!(aml_read(&mut dev, r, b"MHLH"), 0);
        assert_eq!(aml_read(&mut dev, r, b"MHPX"), 0);
        assert_eq!(aml_read(&mut dev, f, b"MEN_"), 1);
        assert_eq!(aml_read(&mut dev, f, b"MINS"), 1);
        aml_write(&mut dev, f, b"MINS", 1);
        assert_eq!(aml_read(&mut dev, f, b"MINS"), 0);
        assert_eq!(aml_read(&mut dev, f, b"MRMV"), 0);
        aml_write(&mut dev, w, b"MOEV", 1);
        assert_eq!(
            aml_write(&mut dev, w, b"MOSC", 0),
            DeviceEvent::MemOst {
                slot: 1,
                event: 1,
                status: 0
            }
        );
        aml_write(&mut dev, w, b"MSEL", 0);
        assert_eq!(aml_read(&mut dev, f, b"MEN_"), 0);
    }

    #[test]
    fn mnev_finds_the_next_slot_with_an_event() {
        use crate::devices::regs::{aml_read, aml_write};
        let (e, f, w) = (&EVENT_FIELDS[..], &FLAG_FIELDS[..], &WRITE_FIELDS[..]);
        let mut dev = MemHotplug::new(4);
        assert_eq!(
            aml_read(&mut dev, e, b"MNEV"),
            4,
            "no event: the slot count"
        );
        dev.insert(0, 1 << 32, 1 << 27).unwrap();
        dev.insert(2, (1 << 32) + (1 << 27), 1 << 27).unwrap();
        assert_eq!(aml_read(&mut dev, e, b"MNEV"), 0);
        aml_write(&mut dev, w, b"MSEL", 1);
        assert_eq!(aml_read(&mut dev, e, b"MNEV"), 2);
        aml_write(&mut dev, w, b"MSEL", 2);
        aml_write(&mut dev, f, b"MINS", 1);
        assert_eq!(aml_read(&mut dev, e, b"MNEV"), 4, "acknowledged");
        aml_write(&mut dev, w, b"MSEL", 0);
        assert_eq!(aml_read(&mut dev, e, b"MNEV"), 0);
        aml_write(&mut dev, w, b"MSEL", u32::MAX.into());
        assert_eq!(aml_read(&mut dev, e, b"MNEV"), 4, "selector past the end");
    }

    #[test]
    fn insert_validation() {
        let mut dev = MemHotplug::new(2);
        assert_eq!(dev.slots(), 2);
        assert_eq!(dev.used_slots(), 0);
        assert_eq!(
            dev.insert(2, 1 << 32, 1 << 27),
            Err(MemHotplugError::SlotOutOfRange { slot: 2, slots: 2 })
        );
        assert!(matches!(
            dev.insert(0, 1 << 32, 0),
            Err(MemHotplugError::InvalidRange { .. })
        ));
        assert!(matches!(
            dev.insert(0, u64::MAX - 10, 1 << 27),
            Err(MemHotplugError::InvalidRange { .. })
        ));
        dev.insert(0, 1 << 32, 1 << 27).unwrap();
        assert_eq!(dev.used_slots(), 1);
        assert_eq!(
            dev.insert(0, 1 << 33, 1 << 27),
            Err(MemHotplugError::SlotInUse(0))
        );
        dev.insert(1, (1 << 32) + (1 << 27), 1 << 30).unwrap();
        assert_eq!(dev.used_slots(), 2);
    }

    #[test]
    fn base_and_length_split_into_dwords() {
        let mut dev = MemHotplug::new(4);
        dev.insert(0, 0x1_0000_0000, 0x4000_0000).unwrap();
        dev.insert(1, 0x2_4800_0000, 0x1_2800_0000).unwrap();
        select(&mut dev, 1);
        assert_eq!(read_u32(&mut dev, 0x0), 0x4800_0000);
        assert_eq!(read_u32(&mut dev, 0x4), 0x2);
        assert_eq!(read_u32(&mut dev, 0x8), 0x2800_0000);
        assert_eq!(read_u32(&mut dev, 0xc), 0x1);
        assert_eq!(read_u32(&mut dev, 0x10), 0);
        assert_eq!(flags(&mut dev), FLAG_ENABLED | FLAG_INSERTING);
        // A qword read returns the whole base.
        let mut data = [0u8; 8];
        dev.read(0, &mut data);
        assert_eq!(u64::from_le_bytes(data), 0x2_4800_0000);
        select(&mut dev, 0);
        assert_eq!(read_u32(&mut dev, 0x4), 0x1);
        assert_eq!(read_u32(&mut dev, 0x8), 0x4000_0000);
        // An empty slot reads as zeros, but for MNEV (no event at or after it: the slot count).
        select(&mut dev, 2);
        let mut all = [0xffu8; REGS_SIZE];
        dev.read(0, &mut all);
        let mut want = [0; REGS_SIZE];
        want[MNEV as usize] = dev.slots() as u8;
        assert_eq!(all, want);
    }

    #[test]
    fn an_eject_without_a_pending_removal_is_refused() {
        let mut dev = MemHotplug::new(1);
        dev.insert(0, 1 << 32, 1 << 27).unwrap();
        select(&mut dev, 0);
        assert_eq!(dev.write(FLAGS, &[FLAG_INSERTING]), DeviceEvent::None);
        assert_eq!(flags(&mut dev), FLAG_ENABLED);
        assert_eq!(dev.write(FLAGS, &[FLAG_EJECT]), DeviceEvent::None);
        assert_eq!(flags(&mut dev), FLAG_ENABLED);
        assert_eq!(dev.used_slots(), 1);
        assert_eq!(read_u32(&mut dev, 0x8), 1 << 27);
    }

    #[test]
    fn a_requested_removal_is_ejected_after_the_ack() {
        use crate::devices::regs::{aml_read, aml_write};
        let (e, f, w) = (&EVENT_FIELDS[..], &FLAG_FIELDS[..], &WRITE_FIELDS[..]);
        let mut dev = MemHotplug::new(3);
        dev.insert(0, 1 << 32, 1 << 27).unwrap();
        dev.insert(1, (1 << 32) + (1 << 27), 1 << 27).unwrap();
        for slot in [0, 1] {
            aml_write(&mut dev, w, b"MSEL", slot);
            aml_write(&mut dev, f, b"MINS", 1);
        }
        assert!(!dev.request_removal(2), "an empty slot");
        assert!(!dev.request_removal(7), "out of range");
        assert!(dev.request_removal(1));
        aml_write(&mut dev, w, b"MSEL", 0);
        assert_eq!(aml_read(&mut dev, e, b"MNEV"), 1, "the scan finds it");
        aml_write(&mut dev, w, b"MSEL", 1);
        assert_eq!(aml_read(&mut dev, f, b"MRMV"), 1);
        aml_write(&mut dev, f, b"MRMV", 1);
        assert_eq!(aml_read(&mut dev, f, b"MRMV"), 0, "acknowledged");
        assert_eq!(aml_read(&mut dev, e, b"MNEV"), 3, "no event left");
        // The eject still works after the ack, and empties the slot.
        assert_eq!(aml_write(&mut dev, f, b"MEJ0", 1), DeviceEvent::MemEject(1));
        assert_eq!(aml_read(&mut dev, f, b"MEN_"), 0);
        assert!(!dev.is_enabled(1) && dev.is_enabled(0));
        assert_eq!(dev.used_slots(), 1);
        // A second eject is refused; the slot can be filled again.
        assert_eq!(aml_write(&mut dev, f, b"MEJ0", 1), DeviceEvent::None);
        dev.insert(1, (1 << 32) + (1 << 27), 1 << 28).unwrap();
        assert_eq!(dev.used_slots(), 2);
    }

    #[test]
    fn a_withdrawn_removal_refuses_the_late_eject() {
        let mut dev = MemHotplug::new(1);
        dev.insert(0, 1 << 32, 1 << 27).unwrap();
        assert!(dev.request_removal(0));
        assert_eq!(
            dev.insert(0, 1 << 32, 1 << 27),
            Err(MemHotplugError::SlotInUse(0))
        );
        assert!(dev.cancel_removal(0));
        assert!(!dev.cancel_removal(0));
        select(&mut dev, 0);
        assert_eq!(flags(&mut dev), FLAG_ENABLED | FLAG_INSERTING);
        assert_eq!(dev.write(FLAGS, &[FLAG_EJECT]), DeviceEvent::None);
        assert!(dev.is_enabled(0));
    }

    #[test]
    fn ost_reports_event_and_status() {
        let mut dev = MemHotplug::new(3);
        dev.insert(0, 1 << 32, 1 << 27).unwrap();
        dev.insert(1, (1 << 32) + (1 << 27), 1 << 27).unwrap();
        select(&mut dev, 1);
        assert_eq!(dev.write(MOEV, &1u32.to_le_bytes()), DeviceEvent::None);
        assert_eq!(
            dev.write(MOSC, &0u32.to_le_bytes()),
            DeviceEvent::MemOst {
                slot: 1,
                event: 1,
                status: 0
            }
        );
        // Writes to MOEV/MOSC do not change what reads return.
        assert_eq!(read_u32(&mut dev, 0x4), 1);
        assert_eq!(read_u32(&mut dev, 0x8), 1 << 27);
    }

    #[test]
    fn selector_out_of_range() {
        let mut dev = MemHotplug::new(1);
        dev.insert(0, 1 << 32, 1 << 27).unwrap();
        select(&mut dev, 1);
        let mut all = [0xffu8; REGS_SIZE];
        dev.read(0, &mut all);
        let mut want = [0; REGS_SIZE];
        want[MNEV as usize] = 1;
        assert_eq!(all, want, "zeros, and MNEV = the slot count");
        assert_eq!(dev.write(MOSC, &[1, 0, 0, 0]), DeviceEvent::None);
        dev.write(FLAGS, &[FLAG_INSERTING]);
        select(&mut dev, 0);
        assert_eq!(flags(&mut dev), FLAG_ENABLED | FLAG_INSERTING);
    }
}

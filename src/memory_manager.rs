//! The guest memory of one boot as the VMM accounts for it: boot RAM, the hotplug window above
//! it, what has been hot-added, and the memory hotplug controller that describes each hot-added
//! slot to the guest. KVM memory slots themselves live in [`crate::vm::Vm`]; a resize maps them
//! first ([`crate::resize::prepare`]) and commits here once every part of the request succeeded.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::arch::x86_64::{layout, memory};
use crate::devices::lock;
use crate::devices::mem_hotplug::MemHotplug;
use crate::events::Event;

/// ACPI memory devices (`Mnnn`) for a hotplug window: one per 128 MiB step, capped at
/// [`layout::MAX_MEMORY_HOTPLUG_SLOTS`].
pub(crate) fn hotplug_slots(window: &Range<u64>) -> usize {
    let steps = (window.end - window.start) / layout::MEMORY_HOTPLUG_ALIGN;
    (steps as usize).min(layout::MAX_MEMORY_HOTPLUG_SLOTS)
}

/// Boot RAM, the hotplug window and its controller, for one boot.
pub(crate) struct MemoryManager {
    boot: u64,
    window: Range<u64>,
    hotplugged: u64,
    device: Arc<Mutex<MemHotplug>>,
}

impl MemoryManager {
    /// `boot` bytes of boot RAM and a window reaching up to `max` bytes of RAM in all.
    pub(crate) fn new(boot: u64, max: u64) -> Self {
        let window = memory::hotplug_window(boot, max.saturating_sub(boot));
        let device = Arc::new(Mutex::new(MemHotplug::new(hotplug_slots(&window))));
        MemoryManager {
            boot,
            window,
            hotplugged: 0,
            device,
        }
    }

    /// The controller, for the MMIO bus.
    pub(crate) fn device(&self) -> Arc<Mutex<MemHotplug>> {
        self.device.clone()
    }

    /// Boot RAM.
    pub(crate) fn boot_size(&self) -> u64 {
        self.boot
    }

    /// RAM the guest has now: boot RAM plus what was hot-added.
    pub(crate) fn size(&self) -> u64 {
        self.boot + self.hotplugged
    }

    /// Bytes hot-added this boot (the window fills from its start).
    pub(crate) fn hotplugged(&self) -> u64 {
        self.hotplugged
    }

    /// The hotplug window (guest-physical).
    pub(crate) fn window(&self) -> Range<u64> {
        self.window.clone()
    }

    /// (slots, used slots) of the controller.
    pub(crate) fn slots(&self) -> (usize, usize) {
        let hp = lock(&self.device);
        (hp.slots(), hp.used_slots())
    }

    /// Announces `size` bytes at `start`, already mapped into the VM, as slot `slot`; the caller
    /// raises the GED interrupt.
    pub(crate) fn commit_add(&mut self, slot: usize, start: u64, size: u64) -> Event {
        if let Err(e) = lock(&self.device).insert(slot, start, size) {
            log::error!("memory hotplug slot {slot}: {e}");
        }
        self.hotplugged += size;
        Event::MemAdded { slot, start, size }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    #[test]
    fn hotplug_slots_follow_the_window_with_a_cap() {
        assert_eq!(hotplug_slots(&(4 * G..6 * G)), 16);
        assert_eq!(hotplug_slots(&(4 * G..4 * G)), 0);
        assert_eq!(
            hotplug_slots(&(4 * G..100 * G)),
            layout::MAX_MEMORY_HOTPLUG_SLOTS
        );
    }

    #[test]
    fn a_committed_slot_grows_the_size_and_fills_the_controller() {
        let mut m = MemoryManager::new(G / 2, G / 2 + 2 * G);
        assert_eq!(
            (m.size(), m.window(), m.slots()),
            (G / 2, 4 * G..6 * G, (16, 0))
        );
        let event = m.commit_add(0, 4 * G, G);
        assert_eq!(
            event,
            Event::MemAdded {
                slot: 0,
                start: 4 * G,
                size: G
            }
        );
        assert_eq!(
            (m.size(), m.hotplugged(), m.slots()),
            (G / 2 + G, G, (16, 1))
        );
        // A boot without a window has no slots.
        assert_eq!(MemoryManager::new(G, G).slots(), (0, 0));
    }
}

//! The guest memory of one boot as the VMM accounts for it: boot RAM, the hotplug window above
//! it, what has been hot-added, the memory hotplug controller that describes each hot-added
//! slot to the guest, and a live removal in progress. KVM memory slots themselves live in
//! [`crate::kvm::vm::Vm`]; a resize maps them first ([`crate::vmm::resize::prepare`]) and commits here once
//! every part of the request succeeded; a live removal unmaps a slot only after the guest has
//! ejected it ([`MemoryManager::reap`]).

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::arch::x86_64::{layout, memory};
use crate::config::size::format_size;
use crate::config::MemoryConfig;
use crate::control::events::Event;
use crate::devices::lock;
use crate::devices::mem_hotplug::MemHotplug;
use crate::kvm::vm::VmError;

/// ACPI memory devices (`Mnnn`) for a hotplug window: one per 128 MiB step, capped at
/// [`layout::MAX_MEMORY_HOTPLUG_SLOTS`].
pub fn hotplug_slots(window: &Range<u64>) -> usize {
    let steps = (window.end - window.start) / layout::MEMORY_HOTPLUG_ALIGN;
    (steps as usize).min(layout::MAX_MEMORY_HOTPLUG_SLOTS)
}

/// Size of the slots a removable window is hot-added in: 128 MiB, or more where the window
/// has more 128 MiB steps than there are slots, so that slots of this size fill the whole window.
pub fn removable_slot_size(window: &Range<u64>) -> u64 {
    let len = window.end - window.start;
    let per_slot = len.div_ceil(layout::MAX_MEMORY_HOTPLUG_SLOTS as u64);
    per_slot
        .next_multiple_of(layout::MEMORY_HOTPLUG_ALIGN)
        .max(layout::MEMORY_HOTPLUG_ALIGN)
}

/// Unregisters and unmaps the hot-added memory that starts at the given guest-physical address
/// (for a machine, [`crate::kvm::vm::Vm::remove_memory`]).
pub type Unmap<'a> = &'a mut dyn FnMut(u64) -> Result<(), VmError>;

/// A hot-added slot present now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    start: u64,
    size: u64,
}

/// The live removal in progress: one slot at a time, from the top.
#[derive(Debug, Clone, Copy)]
struct Removal {
    /// Slot the guest is asked to eject (always the top one).
    slot: usize,
    /// When it was asked.
    since: Instant,
    /// Live size to stop at: the next slot is only asked for if removing it keeps this much.
    target: u64,
}

/// What [`MemoryManager`] asks its caller to do after a step of a live removal.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Events for the front ends.
    pub events: Vec<Event>,
    /// The controller has a new removal request: raise GED [`crate::devices::ged::GED_MEMORY`].
    pub notify: bool,
}

/// Boot RAM, the hotplug window and its controller, for one boot.
///
/// Hot-added slots form a stack from the window's start: a grow pushes slots on top, a live
/// removal (with `removable`) pops them from the top, one at a time, each only after the guest
/// has offlined and ejected it. Slot `i` of the controller is the `i`-th slot of the stack.
pub struct MemoryManager {
    boot: u64,
    window: Range<u64>,
    slots: Vec<Slot>,
    /// Size of the slots a grow is split into when hot-added memory is removable.
    removable: Option<u64>,
    remove_timeout: Duration,
    removal: Option<Removal>,
    device: Arc<Mutex<MemHotplug>>,
}

impl MemoryManager {
    /// `boot` bytes of boot RAM and the window, removability and removal timeout of `config`
    /// (whose `size` is the first boot's RAM; later boots may have another).
    pub fn new(boot: u64, config: &MemoryConfig) -> Self {
        let window = memory::hotplug_window(boot, config.max().saturating_sub(boot));
        let device = Arc::new(Mutex::new(MemHotplug::new(hotplug_slots(&window))));
        MemoryManager {
            boot,
            removable: config.removable.then(|| removable_slot_size(&window)),
            window,
            slots: Vec::new(),
            remove_timeout: config.remove_timeout,
            removal: None,
            device,
        }
    }

    /// The controller, for the MMIO bus.
    pub fn device(&self) -> Arc<Mutex<MemHotplug>> {
        self.device.clone()
    }

    /// Boot RAM.
    pub fn boot_size(&self) -> u64 {
        self.boot
    }

    /// RAM the guest has now: boot RAM plus the hot-added slots (including one being removed).
    pub fn size(&self) -> u64 {
        self.boot + self.hotplugged()
    }

    /// Bytes hot-added and present now (the window fills from its start).
    pub fn hotplugged(&self) -> u64 {
        self.slots.iter().map(|s| s.size).sum()
    }

    /// Sizes of the hot-added slots present now, bottom first.
    pub fn slot_sizes(&self) -> Vec<u64> {
        self.slots.iter().map(|s| s.size).collect()
    }

    /// The slot size grows are split into, if hot-added memory is removable live.
    pub fn removable_slot_size(&self) -> Option<u64> {
        self.removable
    }

    /// The hotplug window (guest-physical).
    pub fn window(&self) -> Range<u64> {
        self.window.clone()
    }

    /// (slots, used slots) of the controller.
    pub fn slots(&self) -> (usize, usize) {
        (lock(&self.device).slots(), self.slots.len())
    }

    /// The slot whose removal waits for the guest's eject, if any.
    pub fn removing(&self) -> Option<usize> {
        self.removal.map(|r| r.slot)
    }

    /// Seconds the pending removal has waited (0 without one).
    pub fn removal_waited_secs(&self) -> u64 {
        self.removal.map_or(0, |r| r.since.elapsed().as_secs())
    }

    /// When the pending removal is given up if the guest has not ejected the slot by then.
    pub fn removal_deadline(&self) -> Option<Instant> {
        self.removal.map(|r| r.since + self.remove_timeout)
    }

    /// Announces `size` bytes at `start`, already mapped into the VM, as slot `slot` (the next
    /// one on the stack); the caller raises the GED interrupt.
    pub fn commit_add(&mut self, slot: usize, start: u64, size: u64) -> Event {
        if let Err(e) = lock(&self.device).insert(slot, start, size) {
            log::error!("memory hotplug slot {slot}: {e}");
        }
        self.slots.push(Slot { start, size });
        Event::MemAdded { slot, start, size }
    }

    /// Starts a live shrink towards `target` bytes: asks the guest to eject the top slot if
    /// removing it keeps at least `target`. Without removable memory, or when the top slot does
    /// not fit, nothing happens (the shrink waits for the next reboot).
    pub fn start_removal(&mut self, target: u64) -> Step {
        if self.removable.is_none() || self.removal.is_some() {
            return Step::default();
        }
        self.request_next(target)
    }

    /// Asks for the top slot if it fits above `target`.
    fn request_next(&mut self, target: u64) -> Step {
        let Some(top) = self.slots.last().copied() else {
            return Step::default();
        };
        if self.size() - top.size < target {
            return Step::default();
        }
        let slot = self.slots.len() - 1;
        if !lock(&self.device).request_removal(slot) {
            log::error!("memory hotplug: cannot request the removal of slot {slot}");
            return Step::default();
        }
        self.removal = Some(Removal {
            slot,
            since: Instant::now(),
            target,
        });
        Step {
            events: vec![Event::MemRemoving {
                slot,
                start: top.start,
                size: top.size,
            }],
            notify: true,
        }
    }

    /// After the guest ejected `slot`: unmaps its memory through `unmap` (given the slot's
    /// guest-physical start) and asks for the next slot while the target allows. A stale or
    /// unexpected eject changes nothing.
    pub fn reap(&mut self, slot: usize, unmap: Unmap<'_>) -> Step {
        let Some(removal) = self.removal.filter(|r| r.slot == slot) else {
            return Step::default();
        };
        if lock(&self.device).is_enabled(slot) {
            return Step::default();
        }
        self.removal = None;
        let Some(gone) = self.slots.pop() else {
            return Step::default();
        };
        let waited = removal.since.elapsed();
        if let Err(e) = unmap(gone.start) {
            // The guest no longer uses it; a later grow over this range fails cleanly.
            log::error!("memory slot {slot} ejected by the guest, but unmapping it failed: {e}");
        }
        log::info!(
            "memory slot {slot} ({}) ejected by the guest after {waited:?} and unmapped",
            format_size(gone.size)
        );
        let mut step = self.request_next(removal.target);
        step.events.insert(
            0,
            Event::MemRemoved {
                slot,
                size: gone.size,
            },
        );
        step
    }

    /// Reaps the slot being removed if the guest has already ejected it (its eject event may
    /// still be queued).
    pub fn reap_ejected(&mut self, unmap: Unmap<'_>) -> Step {
        match self.removal {
            Some(r) if !lock(&self.device).is_enabled(r.slot) => self.reap(r.slot, unmap),
            _ => Step::default(),
        }
    }

    /// Gives up the removal of `slot` (the guest refused it, `reason` is its `_OST` report, or
    /// `timeout`): the slot stays, a late eject is refused, and the rest of the shrink waits
    /// for the next reboot. None if no removal of `slot` was pending.
    pub fn withdraw(&mut self, slot: usize, reason: &str) -> Option<Event> {
        self.removal.filter(|r| r.slot == slot)?;
        self.removal = None;
        lock(&self.device).cancel_removal(slot);
        log::warn!(
            "removal of memory slot {slot} withdrawn ({reason}); the rest of the shrink waits for the next reboot"
        );
        Some(Event::MemRemoveWithdrawn {
            slot,
            reason: reason.to_string(),
        })
    }

    /// Withdraws the pending removal if its deadline has passed by `now`.
    pub fn check_timeout(&mut self, now: Instant) -> Option<Event> {
        let deadline = self.removal_deadline()?;
        if now < deadline {
            return None;
        }
        let slot = self.removing()?;
        self.withdraw(slot, "timeout")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    /// 512 MiB of boot RAM and a `window`, removable or not.
    fn config(window: u64, removable: bool) -> MemoryConfig {
        MemoryConfig {
            size: G / 2,
            hotplug_size: window,
            removable,
            ..MemoryConfig::default()
        }
    }

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
        let mut m = MemoryManager::new(G / 2, &config(2 * G, false));
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
        // Not removable: a shrink asks the guest for nothing.
        assert_eq!(m.start_removal(G / 2), Step::default());
        assert_eq!(m.removing(), None);
        // A boot without a window has no slots.
        assert_eq!(MemoryManager::new(G, &config(0, false)).slots(), (0, 0));
    }

    #[test]
    fn removable_slots_fill_the_window_with_at_most_the_slot_cap() {
        const M: u64 = 1 << 20;
        assert_eq!(removable_slot_size(&(4 * G..6 * G)), 128 * M);
        assert_eq!(removable_slot_size(&(4 * G..12 * G)), 128 * M);
        assert_eq!(removable_slot_size(&(4 * G..13 * G)), 256 * M);
        assert_eq!(removable_slot_size(&(4 * G..(4 * G + 128 * M))), 128 * M);
        let w = 4 * G..(4 * G + 1000 * G);
        let size = removable_slot_size(&w);
        assert!(size * layout::MAX_MEMORY_HOTPLUG_SLOTS as u64 >= 1000 * G);
        assert_eq!(size % layout::MEMORY_HOTPLUG_ALIGN, 0);
    }

    /// A removable manager with `n` slots of 128 MiB over 512 MiB of boot RAM.
    fn removable(n: usize) -> MemoryManager {
        let mut m = MemoryManager::new(G / 2, &config(2 * G, true));
        for i in 0..n {
            let start = 4 * G + (i as u64) * (G / 8);
            m.commit_add(i, start, G / 8);
            // The guest acknowledges the insert.
            let mut dev = lock(&m.device);
            crate::devices::BusDevice::write(&mut *dev, 0, &(i as u32).to_le_bytes());
            crate::devices::BusDevice::write(&mut *dev, 0x14, &[2]);
        }
        m
    }

    /// The guest ejects the selected slot through the controller, as its `_EJ0` does.
    fn guest_ejects(m: &MemoryManager, slot: usize) -> crate::devices::DeviceEvent {
        let mut dev = lock(&m.device);
        crate::devices::BusDevice::write(&mut *dev, 0, &(slot as u32).to_le_bytes());
        crate::devices::BusDevice::write(&mut *dev, 0x14, &[4 | 8])
    }

    #[test]
    fn a_live_shrink_removes_slots_from_the_top_one_at_a_time() {
        let mut m = removable(4);
        assert_eq!(m.size(), G);
        // To 700M: slots 3 and 2 go (a third would go below the target), one at a time.
        let step = m.start_removal(700 << 20);
        assert!(step.notify);
        assert_eq!(
            step.events,
            [Event::MemRemoving {
                slot: 3,
                start: 4 * G + 3 * G / 8,
                size: G / 8
            }]
        );
        assert_eq!(m.removing(), Some(3));
        assert!(m.removal_deadline().is_some());
        // A second start while one is pending changes nothing.
        assert_eq!(m.start_removal(G / 2), Step::default());
        let mut unmapped = Vec::new();
        let mut unmap = |start: u64| -> Result<(), VmError> {
            unmapped.push(start);
            Ok(())
        };
        // An eject of another slot is refused by the controller; a stale event changes nothing.
        assert_eq!(guest_ejects(&m, 1), crate::devices::DeviceEvent::None);
        assert_eq!(m.reap(1, &mut unmap), Step::default());
        // Before the eject, nothing is reaped.
        assert_eq!(m.reap(3, &mut unmap), Step::default());
        assert_eq!(
            guest_ejects(&m, 3),
            crate::devices::DeviceEvent::MemEject(3)
        );
        let step = m.reap(3, &mut unmap);
        assert_eq!(
            step.events,
            [
                Event::MemRemoved {
                    slot: 3,
                    size: G / 8
                },
                Event::MemRemoving {
                    slot: 2,
                    start: 4 * G + 2 * G / 8,
                    size: G / 8
                }
            ]
        );
        assert!(step.notify);
        assert_eq!(
            (m.size(), m.slots().1, m.removing()),
            (G - G / 8, 3, Some(2))
        );
        // The queued eject event of slot 2 arrives after a resize reaped it already.
        guest_ejects(&m, 2);
        let step = m.reap_ejected(&mut unmap);
        assert_eq!(
            step.events,
            [Event::MemRemoved {
                slot: 2,
                size: G / 8
            }]
        );
        assert!(!step.notify, "768M - 128M would go below the target");
        assert_eq!(m.reap(2, &mut unmap), Step::default());
        assert_eq!(unmapped, [4 * G + 3 * G / 8, 4 * G + 2 * G / 8]);
        assert_eq!(
            (m.size(), m.removing(), m.removal_deadline()),
            (G / 2 + G / 4, None, None)
        );
        // Grow again: the freed slots are reused in order.
        assert_eq!(
            m.commit_add(2, 4 * G + 2 * G / 8, G / 8),
            Event::MemAdded {
                slot: 2,
                start: 4 * G + 2 * G / 8,
                size: G / 8
            }
        );
        assert_eq!(m.slots().1, 3);
    }

    #[test]
    fn a_refused_or_timed_out_removal_is_withdrawn_and_keeps_the_slot() {
        let mut m = removable(2);
        m.start_removal(G / 2);
        assert_eq!(m.withdraw(0, "eject:busy"), None, "not the slot asked for");
        assert_eq!(
            m.withdraw(1, "eject:busy"),
            Some(Event::MemRemoveWithdrawn {
                slot: 1,
                reason: "eject:busy".into()
            })
        );
        assert_eq!((m.removing(), m.size()), (None, G / 2 + G / 4));
        // A late eject is refused by the controller and reaps nothing.
        assert_eq!(guest_ejects(&m, 1), crate::devices::DeviceEvent::None);
        assert_eq!(m.reap_ejected(&mut |_| Ok(())), Step::default());

        // A new shrink asks again; without an answer it times out.
        m.start_removal(G / 2);
        let deadline = m.removal_deadline().unwrap();
        assert_eq!(m.check_timeout(deadline - Duration::from_millis(1)), None);
        assert_eq!(
            m.check_timeout(deadline),
            Some(Event::MemRemoveWithdrawn {
                slot: 1,
                reason: "timeout".into()
            })
        );
        assert_eq!(m.check_timeout(deadline), None);
        assert_eq!(m.slots().1, 2);
    }

    #[test]
    fn a_failed_unmap_still_ends_the_removal() {
        let mut m = removable(1);
        m.start_removal(G / 2);
        guest_ejects(&m, 0);
        let step = m.reap(0, &mut |_| {
            Err(VmError::Ioctl(
                "KVM_SET_USER_MEMORY_REGION",
                kvm_ioctls::Error::new(libc::EINVAL),
            ))
        });
        assert_eq!(
            step.events,
            [Event::MemRemoved {
                slot: 0,
                size: G / 8
            }]
        );
        assert_eq!((m.size(), m.removing()), (G / 2, None));
    }
}

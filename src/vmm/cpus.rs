//! The vCPUs of one boot as the VMM manages them: their threads ([`Vcpus`]), the CPU hotplug
//! controller the guest sees, the vCPU count last asked for, and the state of a pending removal.
//!
//! A hot-add starts threads first ([`crate::vmm::resize::prepare`]) and then [`CpuManager::commit`]s
//! the controller; a hot-remove only asks the guest, and the thread stops when the guest ejects
//! the CPU ([`CpuManager::reap`]) or the removal is withdrawn on a failed `_OST`
//! ([`CpuManager::withdraw_removal`]).

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;


use crate::control::events::Event;
use crate::devices::cpu_hotplug::CpuHotplug;
use crate::devices::lock;
use crate::kvm::vcpus::Vcpus;

/// vCPU threads, the CPU hotplug controller and the removal state of one boot.
pub struct CpuManager {
    /// The vCPU threads (and parked fds) of this boot, started and stopped by the machine.
    pub vcpus: Vcpus,
    device: Arc<Mutex<CpuHotplug>>,
    target: u32,
    removal_since: Option<Instant>,
}

impl CpuManager {
    /// `max` possible vCPUs of which `0..boot` are present (their threads start with [`Vcpus::run`]).
    pub fn new(max: u32, boot: u32) -> Self {
        CpuManager {
            vcpus: Vcpus::new(max),
            device: Arc::new(Mutex::new(CpuHotplug::new(max, boot))),
            target: boot,
            removal_since: None,
        }
    }

    /// The controller, for the MMIO bus.
    pub fn device(&self) -> Arc<Mutex<CpuHotplug>> {
        self.device.clone()
    }

    /// vCPUs present for the guest now (including those it is asked to remove).
    pub fn present(&self) -> u32 {
        lock(&self.device).enabled_count()
    }

    /// vCPUs waiting for the guest's eject, ascending.
    pub fn removing(&self) -> Vec<u32> {
        lock(&self.device).pending_removals()
    }

    /// The vCPU count last asked for (the next boot's count).
    pub fn target(&self) -> u32 {
        self.target
    }

    /// Seconds since the pending removal was requested (0 without one).
    pub fn removal_waited_secs(&self) -> u64 {
        self.removal_since.map_or(0, |t| t.elapsed().as_secs())
    }

    /// Announces the planned change to the controller (threads of `add` already run); the
    /// caller raises the GED interrupt if the returned events are not empty.
    pub fn commit(
        &mut self,
        add: Range<u32>,
        remove: Range<u32>,
        target: Option<u32>,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        let mut hp = lock(&self.device);
        for id in add {
            hp.insert(id);
            events.push(Event::CpuAdded(id));
        }
        // Highest first, the order the guest is asked in.
        for id in remove.clone().rev() {
            hp.request_removal(id);
            events.push(Event::CpuRemoving(id));
        }
        if !remove.is_empty() {
            self.removal_since = Some(Instant::now());
        }
        if let Some(n) = target {
            self.target = n;
        }
        events
    }

    /// Stops the thread of `cpu` if the guest ejected it (its fd is kept for a later add).
    /// Returns the `cpu-ejected` event, or None for a stale eject (the CPU was added again).
    pub fn reap(&mut self, cpu: u32) -> Option<Event> {
        if lock(&self.device).is_enabled(cpu) {
            return None;
        }
        let stopped = self.vcpus.stop(cpu);
        if self.removing().is_empty() {
            self.removal_since = None;
        }
        stopped.then(|| {
            log::info!("vCPU {cpu} ejected by the guest");
            Event::CpuEjected(cpu)
        })
    }

    /// Reaps every CPU the guest has ejected whose eject event may still be queued.
    pub fn reap_all_ejected(&mut self) -> Vec<Event> {
        let ejected: Vec<u32> = {
            let hp = lock(&self.device);
            self.vcpus
                .running()
                .filter(|&i| !hp.is_enabled(i))
                .collect()
        };
        ejected
            .into_iter()
            .filter_map(|cpu| self.reap(cpu))
            .collect()
    }

    /// Withdraws the pending removal of `cpu` after the guest refused it: the CPU stays
    /// present and later resizes are not blocked. False if no removal of `cpu` was pending.
    pub fn withdraw_removal(&mut self, cpu: u32) -> bool {
        let mut hp = lock(&self.device);
        if !hp.cancel_removal(cpu) {
            return false;
        }
        let removing = hp.pending_removals().len() as u32;
        self.target = hp.enabled_count() - removing;
        if removing == 0 {
            self.removal_since = None;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_marks_the_controller_and_orders_the_events() {
        let mut c = CpuManager::new(4, 1);
        let events = c.commit(1..3, 0..0, Some(3));
        assert_eq!(events, [Event::CpuAdded(1), Event::CpuAdded(2)]);
        assert_eq!((c.present(), c.target(), c.removing()), (3, 3, vec![]));
        let events = c.commit(0..0, 1..3, Some(1));
        assert_eq!(events, [Event::CpuRemoving(2), Event::CpuRemoving(1)]);
        assert_eq!((c.present(), c.target(), c.removing()), (3, 1, vec![1, 2]));
    }

    #[test]
    fn a_refused_removal_is_withdrawn_and_sets_the_target() {
        let mut c = CpuManager::new(4, 3);
        c.commit(0..0, 1..3, Some(1));
        assert!(c.withdraw_removal(2));
        assert!(!c.withdraw_removal(2));
        assert!(!c.withdraw_removal(0));
        assert_eq!((c.present(), c.target(), c.removing()), (3, 2, vec![1]));
        assert!(c.withdraw_removal(1));
        assert_eq!((c.target(), c.removal_waited_secs()), (3, 0));
    }

    #[test]
    fn a_cpu_still_present_is_not_reaped() {
        let mut c = CpuManager::new(2, 2);
        // No thread runs here, so nothing is stopped and no event is produced either way.
        assert_eq!(c.reap(1), None);
        assert_eq!(c.reap_all_ejected(), []);
    }
}

//! The vCPUs of one boot: per index, a running thread or a parked KVM fd. KVM cannot destroy a
//! vCPU, so a fd, once created, is kept and reused when the CPU is added again.

use kvm_ioctls::VcpuFd;

use crate::kvm::vcpu::{VcpuContext, VcpuError, VcpuThread};
use crate::kvm::vm::Vm;

/// One vCPU index.
#[derive(Default)]
struct Slot {
    parked: Option<VcpuFd>,
    thread: Option<VcpuThread>,
}

/// Every possible vCPU index (`0..max`) of one boot.
pub struct Vcpus {
    slots: Vec<Slot>,
    max: u32,
}

impl Vcpus {
    /// `max` empty slots.
    pub fn new(max: u32) -> Self {
        Vcpus {
            slots: (0..max).map(|_| Slot::default()).collect(),
            max,
        }
    }

    /// Runs `fd` as vCPU `id` (a fd the caller created, e.g. the boot vCPU with its registers).
    /// An `id` at or above `max` is an error (the VMM only plans indices below it).
    pub fn run(&mut self, id: u32, fd: VcpuFd, ctx: &VcpuContext) -> Result<(), VcpuError> {
        let max = self.max;
        let slot = self
            .slots
            .get_mut(id as usize)
            .ok_or(VcpuError::OutOfRange(id, max))?;
        slot.thread = Some(VcpuThread::spawn(id, fd, ctx.clone())?);
        Ok(())
    }

    /// Starts vCPU `id`, reusing its parked fd or creating one in `vm`.
    pub fn start(&mut self, id: u32, vm: &Vm, ctx: &VcpuContext) -> Result<(), VcpuError> {
        let max = self.max;
        let slot = self
            .slots
            .get_mut(id as usize)
            .ok_or(VcpuError::OutOfRange(id, max))?;
        let fd = match slot.parked.take() {
            Some(fd) => fd,
            None => vm.create_vcpu(id, max)?,
        };
        self.run(id, fd, ctx)
    }

    /// Stops vCPU `id`'s thread and parks its fd; false if it was not running.
    pub fn stop(&mut self, id: u32) -> bool {
        let Some(slot) = self.slots.get_mut(id as usize) else {
            return false;
        };
        let Some(thread) = slot.thread.take() else {
            return false;
        };
        match thread.stop() {
            Ok(fd) => slot.parked = Some(fd),
            Err(e) => log::error!("{e}"),
        }
        true
    }

    /// Indices with a running thread.
    pub fn running(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.thread.is_some())
            .map(|(i, _)| i as u32)
    }

    /// Stops every thread: all are signalled first, then joined.
    pub fn stop_all(&mut self) {
        for slot in &self.slots {
            if let Some(t) = &slot.thread {
                t.signal_stop();
            }
        }
        for slot in &mut self.slots {
            if let Some(t) = slot.thread.take() {
                if let Err(e) = t.stop() {
                    log::error!("{e}");
                }
            }
        }
    }
}

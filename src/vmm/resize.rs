//! The resize transaction, over plain numbers and two small traits, so every rule and every
//! rollback path is tested without KVM (unit tests here, and the control-line fuzz target, which
//! runs [`transact`] on the real managers with a backend that maps nothing).
//!
//! A resize is: reap what the guest has ejected → [`plan`] (validate against the machine's state,
//! pure) → [`prepare`] (map memory, start vCPU threads; on any failure undo what was done) →
//! commit to the hotplug controllers through the CPU and memory managers → one GED interrupt.

use std::ops::Range;
use std::time::Instant;

use crate::arch::x86_64::layout::MEMORY_HOTPLUG_ALIGN;
use crate::config::size::format_size;
use crate::config::{MEMORY_SIZE_ALIGN, MIN_MEMORY_SIZE};
use crate::control::events::Event;
use crate::control::protocol::format_ids;
use crate::kvm::vcpu::VcpuError;
use crate::kvm::vm::VmError;
use crate::devices::ged::{GED_CPU, GED_MEMORY};
use crate::vmm::cpus::CpuManager;
use crate::vmm::memory::{MemoryManager, Step};

/// What the planner needs to know about the running machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeState {
    /// Most vCPUs (`--cpus max=`).
    pub max_cpus: u32,
    /// vCPUs present now (including those being removed).
    pub present_cpus: u32,
    /// vCPUs waiting for the guest's eject.
    pub removing: Vec<u32>,
    /// The vCPU count last requested.
    pub target_cpus: u32,
    /// How long the pending removal has waited, in seconds.
    pub removal_waited_secs: u64,
    /// Boot RAM of this boot.
    pub boot_mem: u64,
    /// Boot RAM plus the hotplug window.
    pub max_mem: u64,
    /// The hotplug window this boot (guest-physical).
    pub window: Range<u64>,
    /// Sizes of the hot-added slots present now, bottom first (slot `i` is the `i`-th; the
    /// window is filled from its start).
    pub mem_slot_sizes: Vec<u64>,
    /// Memory hotplug slots this boot.
    pub mem_slots: usize,
    /// Hot-added memory is removable live; grows are split into slots of this size.
    pub removable_slot_size: Option<u64>,
    /// The memory slot waiting for the guest's eject, if any.
    pub removing_mem: Option<usize>,
    /// How long that removal has waited, in seconds.
    pub mem_removal_waited_secs: u64,
    /// The RAM size last requested (the next boot's size).
    pub target_mem: u64,
}

/// A validated resize.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// vCPU indices to hot-add.
    pub add_cpus: Range<u32>,
    /// vCPU indices to ask the guest to eject.
    pub remove_cpus: Range<u32>,
    /// Memory slots to hot-add, in order: (slot, guest-physical start, size).
    pub add_mem: Vec<(usize, u64, u64)>,
    /// A live shrink: the size to remove hot-added slots down to (from the top, while each
    /// removal keeps at least this much), starting with the top slot.
    pub remove_mem_to: Option<u64>,
    /// The RAM size for the next boot.
    pub pending_mem: Option<u64>,
}

impl ResizeState {
    /// RAM the guest has now: boot RAM plus what was hot-added.
    pub fn current_mem(&self) -> u64 {
        self.boot_mem + self.hotplugged()
    }

    /// Bytes hot-added and present now.
    pub fn hotplugged(&self) -> u64 {
        self.mem_slot_sizes.iter().sum()
    }
}

/// Why a resize was refused or failed. The message is what a client sees after `error `.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// `cpus=0`.
    #[error("cpus=0 is invalid: a VM needs at least one vCPU")]
    ZeroCpus,
    /// More vCPUs than `--cpus max=`.
    #[error("cpus={cpus} exceeds max_cpus={max} (set at start with --cpus max=)")]
    CpusAboveMax {
        /// The count asked for.
        cpus: u32,
        /// The most the VM may have.
        max: u32,
    },
    /// A different vCPU count while a removal waits for the guest.
    #[error(
        "removal of vCPU {} still pending for {waited_secs}s: the guest has not ejected it yet; retry when info shows removing=none",
        format_ids(.cpus)
    )]
    CpuRemovalPending {
        /// The vCPUs being removed.
        cpus: Vec<u32>,
        /// How long the removal has waited.
        waited_secs: u64,
    },
    /// A different RAM size while a live removal waits for the guest.
    #[error(
        "removal of memory slot {slot} still pending for {waited_secs}s: the guest has not ejected it yet; retry when info shows removing_mem=none"
    )]
    MemRemovalPending {
        /// The slot being removed.
        slot: usize,
        /// How long the removal has waited.
        waited_secs: u64,
    },
    /// More RAM than boot RAM plus the hotplug window.
    #[error(
        "mem={} exceeds max_mem={} (size + hotplug_size at start)",
        format_size(*.mem),
        format_size(*.max)
    )]
    MemAboveMax {
        /// The size asked for.
        mem: u64,
        /// The most the VM may have.
        max: u64,
    },
    /// A growth that is not a whole number of hotplug blocks.
    #[error(
        "mem={}: growth by {} from {} is not a multiple of {}",
        format_size(*.mem),
        format_size(*.delta),
        format_size(*.current),
        format_size(MEMORY_HOTPLUG_ALIGN)
    )]
    UnalignedGrowth {
        /// The size asked for.
        mem: u64,
        /// The growth it means.
        delta: u64,
        /// RAM now.
        current: u64,
    },
    /// A growth past the end of the hotplug window.
    #[error(
        "mem={}: only {} of the hotplug window is left this boot (reboot to reclaim alignment)",
        format_size(*.mem),
        format_size(*.left)
    )]
    WindowFull {
        /// The size asked for.
        mem: u64,
        /// What is left of the window.
        left: u64,
    },
    /// Every memory hotplug slot is in use.
    #[error("all {slots} memory hotplug slots are used this boot; grow in larger steps or reboot")]
    NoSlotLeft {
        /// Slots this boot.
        slots: usize,
    },
    /// A growth that needs more slots than are left.
    #[error(
        "mem={}: growing by {} needs {needed} memory hotplug slots of {}, only {left} are left this boot",
        format_size(*.mem),
        format_size(*.delta),
        format_size(*.piece)
    )]
    TooFewSlots {
        /// The size asked for.
        mem: u64,
        /// The growth it means.
        delta: u64,
        /// Slots it needs.
        needed: usize,
        /// The slot size.
        piece: u64,
        /// Slots left.
        left: usize,
    },
    /// A shrink below the smallest RAM size.
    #[error("mem={} is below the minimum of {}", format_size(*.0), format_size(MIN_MEMORY_SIZE))]
    MemBelowMin(u64),
    /// A shrink to a size that is not a whole number of MiB.
    #[error("mem={} is not a multiple of {}", format_size(*.0), format_size(MEMORY_SIZE_ALIGN))]
    UnalignedMem(u64),
    /// A KVM-side step failed; everything done before it was undone.
    #[error("resize failed, nothing changed: {0}")]
    Failed(#[source] BackendError),
}

/// A KVM-side step of a resize that failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Mapping or registering guest RAM.
    #[error(transparent)]
    Memory(#[from] VmError),
    /// Creating a vCPU or starting its thread.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// Validates a request for `cpus` vCPUs and/or `mem` bytes against `s`. The error is the message
/// a front end returns to the client.
pub fn plan(s: &ResizeState, cpus: Option<u32>, mem: Option<u64>) -> Result<Plan, ResizeError> {
    let mut plan = Plan::default();
    if let Some(n) = cpus {
        if n == 0 {
            return Err(ResizeError::ZeroCpus);
        }
        if n > s.max_cpus {
            return Err(ResizeError::CpusAboveMax {
                cpus: n,
                max: s.max_cpus,
            });
        }
        if !s.removing.is_empty() && n != s.target_cpus {
            return Err(ResizeError::CpuRemovalPending {
                cpus: s.removing.clone(),
                waited_secs: s.removal_waited_secs,
            });
        }
        if s.removing.is_empty() {
            if n > s.present_cpus {
                plan.add_cpus = s.present_cpus..n;
            } else if n < s.present_cpus {
                plan.remove_cpus = n..s.present_cpus;
            }
        }
    }
    if let Some(want) = mem {
        plan_memory(s, want, &mut plan)?;
    }
    Ok(plan)
}

/// The memory half of [`plan`].
fn plan_memory(s: &ResizeState, want: u64, plan: &mut Plan) -> Result<(), ResizeError> {
    let current = s.current_mem();
    if let Some(slot) = s.removing_mem {
        if want != s.target_mem {
            return Err(ResizeError::MemRemovalPending {
                slot,
                waited_secs: s.mem_removal_waited_secs,
            });
        }
        // The shrink under way already heads for this size.
        plan.pending_mem = Some(want);
        return Ok(());
    }
    if want > s.max_mem {
        return Err(ResizeError::MemAboveMax {
            mem: want,
            max: s.max_mem,
        });
    }
    if want > current {
        let delta = want - current;
        if !delta.is_multiple_of(MEMORY_HOTPLUG_ALIGN) {
            return Err(ResizeError::UnalignedGrowth {
                mem: want,
                delta,
                current,
            });
        }
        let mut start = s.window.start + s.hotplugged();
        if start + delta > s.window.end {
            return Err(ResizeError::WindowFull {
                mem: want,
                left: s.window.end.saturating_sub(start),
            });
        }
        // Removable memory comes in slots small enough to give back one by one.
        let piece = s.removable_slot_size.unwrap_or(delta);
        let needed = delta.div_ceil(piece) as usize;
        let used = s.mem_slot_sizes.len();
        if used >= s.mem_slots {
            return Err(ResizeError::NoSlotLeft { slots: s.mem_slots });
        }
        if used + needed > s.mem_slots {
            return Err(ResizeError::TooFewSlots {
                mem: want,
                delta,
                needed,
                piece,
                left: s.mem_slots - used,
            });
        }
        let mut left = delta;
        for slot in used..used + needed {
            let size = left.min(piece);
            plan.add_mem.push((slot, start, size));
            start += size;
            left -= size;
        }
    } else if want < current {
        if want < MIN_MEMORY_SIZE {
            return Err(ResizeError::MemBelowMin(want));
        }
        if !want.is_multiple_of(MEMORY_SIZE_ALIGN) {
            return Err(ResizeError::UnalignedMem(want));
        }
        let top_fits = s
            .mem_slot_sizes
            .last()
            .is_some_and(|&top| current - top >= want);
        if s.removable_slot_size.is_some() && top_fits {
            plan.remove_mem_to = Some(want);
        }
    }
    plan.pending_mem = Some(want);
    Ok(())
}

/// The VMM-side operations a resize needs before it is announced.
pub trait Backend {
    /// Maps and registers `size` bytes of RAM at `start`.
    fn add_memory(&mut self, start: u64, size: u64) -> Result<(), BackendError>;
    /// Unregisters and unmaps the RAM added last.
    fn remove_last_memory(&mut self) -> Result<(), BackendError>;
    /// Creates (or reuses) vCPU `id` and starts its thread.
    fn start_vcpu(&mut self, id: u32) -> Result<(), BackendError>;
    /// Stops the thread of vCPU `id` again (its fd is kept for reuse).
    fn stop_vcpu(&mut self, id: u32);
}

/// Does the VMM-side work of `plan` through `backend`: memory first, then the vCPUs. If a step
/// fails, everything done so far is undone in reverse order and the error says nothing changed.
pub fn prepare(plan: &Plan, backend: &mut dyn Backend) -> Result<(), ResizeError> {
    let failed = ResizeError::Failed;
    let unmap = |backend: &mut dyn Backend, count: usize| {
        for _ in 0..count {
            if let Err(e) = backend.remove_last_memory() {
                log::error!("rolling back hot-added memory: {e}");
            }
        }
    };
    for (added, &(_, start, size)) in plan.add_mem.iter().enumerate() {
        if let Err(e) = backend.add_memory(start, size) {
            unmap(backend, added);
            return Err(failed(e));
        }
    }
    for id in plan.add_cpus.clone() {
        if let Err(e) = backend.start_vcpu(id) {
            for started in (plan.add_cpus.start..id).rev() {
                backend.stop_vcpu(started);
            }
            unmap(backend, plan.add_mem.len());
            return Err(failed(e));
        }
    }
    Ok(())
}

/// A running machine as the resize transaction sees it: its KVM side ([`Backend`]) and its
/// managers.
pub trait Machine: Backend {
    /// The vCPUs and the CPU hotplug controller.
    fn cpus(&mut self) -> &mut CpuManager;
    /// Boot RAM, the hotplug window and the memory hotplug controller.
    fn memory(&mut self) -> &mut MemoryManager;
    /// Unmaps the memory slots the guest has ejected (and asks for the next removal).
    fn reap_memory(&mut self) -> Step;
    /// Raises the GED interrupt with `flags` (a failure is logged: the guest then sees the
    /// change at its next scan).
    fn notify(&mut self, flags: u8);
}

/// The limits a resize is checked against: the configuration's and the next boot's.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most vCPUs (`--cpus max=`).
    pub max_cpus: u32,
    /// Boot RAM plus the hotplug window.
    pub max_mem: u64,
    /// The RAM size last requested (the next boot's size).
    pub target_mem: u64,
}

/// The planner's view of machine `m`.
pub fn state(m: &mut dyn Machine, limits: &Limits) -> ResizeState {
    let (present_cpus, removing, target_cpus, removal_waited_secs) = {
        let c = m.cpus();
        (
            c.present(),
            c.removing(),
            c.target(),
            c.removal_waited_secs(),
        )
    };
    let mem = m.memory();
    let (mem_slots, _) = mem.slots();
    ResizeState {
        max_cpus: limits.max_cpus,
        present_cpus,
        removing,
        target_cpus,
        removal_waited_secs,
        boot_mem: mem.boot_size(),
        max_mem: limits.max_mem,
        window: mem.window(),
        mem_slot_sizes: mem.slot_sizes(),
        mem_slots,
        removable_slot_size: mem.removable_slot_size(),
        removing_mem: mem.removing(),
        mem_removal_waited_secs: mem.removal_waited_secs(),
        target_mem: limits.target_mem,
    }
}

/// Resizes machine `m` to `cpus` vCPUs and/or `mem` bytes: reaps what the guest has ejected,
/// plans, prepares, commits to the controllers and raises one GED interrupt. Events go to
/// `events` as they happen (reaped devices even when the request is then refused). Returns the
/// next boot's RAM size when the request changes it.
pub fn transact(
    m: &mut dyn Machine,
    limits: &Limits,
    cpus: Option<u32>,
    mem: Option<u64>,
    events: &mut Vec<Event>,
) -> Result<Option<u64>, ResizeError> {
    events.extend(m.cpus().reap_all_ejected());
    let reaped = m.reap_memory();
    events.extend(reaped.events);
    if reaped.notify {
        m.notify(GED_MEMORY);
    }
    let plan = plan(&state(m, limits), cpus, mem)?;
    // VMM-side work first; undone if any part fails, since nothing has been announced yet.
    let started = Instant::now();
    prepare(&plan, m)?;
    let prepared = started.elapsed();

    // Commit to the controllers and announce with a single GED interrupt.
    let mut flags = 0u8;
    for &(slot, start, size) in &plan.add_mem {
        events.push(m.memory().commit_add(slot, start, size));
        flags |= GED_MEMORY;
    }
    if let Some(target) = plan.remove_mem_to {
        let step = m.memory().start_removal(target);
        if step.notify {
            flags |= GED_MEMORY;
        }
        events.extend(step.events);
    }
    let cpu_events = m
        .cpus()
        .commit(plan.add_cpus.clone(), plan.remove_cpus.clone(), cpus);
    if !cpu_events.is_empty() {
        flags |= GED_CPU;
    }
    events.extend(cpu_events);
    if flags != 0 {
        m.notify(flags);
    }
    log::info!(
        "resize: {plan:?} prepared in {prepared:?}, announced {:?} after the request",
        started.elapsed()
    );
    Ok(plan.pending_mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;

    fn state() -> ResizeState {
        ResizeState {
            max_cpus: 4,
            present_cpus: 1,
            removing: vec![],
            target_cpus: 1,
            removal_waited_secs: 0,
            boot_mem: 512 * M,
            max_mem: 512 * M + 2 * G,
            window: 4 * G..6 * G,
            mem_slot_sizes: vec![],
            mem_slots: 16,
            removable_slot_size: None,
            removing_mem: None,
            mem_removal_waited_secs: 0,
            target_mem: 512 * M,
        }
    }

    #[test]
    fn cpu_plans() {
        let s = state();
        assert_eq!(plan(&s, Some(3), None).unwrap().add_cpus, 1..3);
        assert_eq!(plan(&s, Some(1), None).unwrap(), Plan::default());
        let s3 = ResizeState {
            present_cpus: 3,
            target_cpus: 3,
            ..state()
        };
        assert_eq!(plan(&s3, Some(1), None).unwrap().remove_cpus, 1..3);
        assert_eq!(
            plan(&s, Some(0), None).unwrap_err().to_string(),
            "cpus=0 is invalid: a VM needs at least one vCPU"
        );
        assert_eq!(
            plan(&s, Some(5), None).unwrap_err().to_string(),
            "cpus=5 exceeds max_cpus=4 (set at start with --cpus max=)"
        );
    }

    #[test]
    fn a_pending_removal_blocks_other_cpu_counts_only() {
        let s = ResizeState {
            present_cpus: 3,
            removing: vec![1, 2],
            target_cpus: 1,
            removal_waited_secs: 7,
            ..state()
        };
        assert_eq!(
            plan(&s, Some(2), None).unwrap_err().to_string(),
            "removal of vCPU 1,2 still pending for 7s: the guest has not ejected it yet; retry when info shows removing=none"
        );
        // Asking for the count already requested changes nothing; memory still works.
        let p = plan(&s, Some(1), Some(640 * M)).unwrap();
        assert_eq!((p.add_cpus, p.remove_cpus), (0..0, 0..0));
        assert_eq!(p.add_mem, [(0, 4 * G, 128 * M)]);
    }

    #[test]
    fn memory_plans() {
        let s = state();
        let p = plan(&s, None, Some(1536 * M)).unwrap();
        assert_eq!(p.add_mem, [(0, 4 * G, G)]);
        assert_eq!(p.pending_mem, Some(1536 * M));
        // Without removable memory, shrinks only change the next boot.
        let grown = ResizeState {
            mem_slot_sizes: vec![G],
            ..state()
        };
        let p = plan(&grown, None, Some(256 * M)).unwrap();
        assert_eq!(p.add_mem, []);
        assert_eq!((p.remove_mem_to, p.pending_mem), (None, Some(256 * M)));
        // The window fills from its start; slots are numbered in order.
        assert_eq!(
            plan(&grown, None, Some(1664 * M)).unwrap().add_mem,
            [(1, 5 * G, 128 * M)]
        );
    }

    fn removable(slots: Vec<u64>) -> ResizeState {
        ResizeState {
            mem_slot_sizes: slots,
            removable_slot_size: Some(128 * M),
            ..state()
        }
    }

    #[test]
    fn removable_memory_grows_in_small_slots_and_shrinks_live() {
        let s = removable(vec![]);
        let p = plan(&s, None, Some(896 * M)).unwrap();
        assert_eq!(
            p.add_mem,
            [
                (0, 4 * G, 128 * M),
                (1, 4 * G + 128 * M, 128 * M),
                (2, 4 * G + 256 * M, 128 * M)
            ]
        );
        // 2 GiB in 128M slots is all 16: the whole window.
        assert_eq!(plan(&s, None, Some(2560 * M)).unwrap().add_mem.len(), 16);
        // Larger slots: the last one takes the rest.
        let big = ResizeState {
            removable_slot_size: Some(512 * M),
            ..removable(vec![])
        };
        let sizes: Vec<u64> = plan(&big, None, Some(1664 * M))
            .unwrap()
            .add_mem
            .iter()
            .map(|a| a.2)
            .collect();
        assert_eq!(sizes, [512 * M, 512 * M, 128 * M]);

        // A shrink that the top slot fits starts a live removal.
        let grown = removable(vec![128 * M; 4]);
        let p = plan(&grown, None, Some(768 * M)).unwrap();
        assert_eq!(
            (p.remove_mem_to, p.pending_mem),
            (Some(768 * M), Some(768 * M))
        );
        // One below boot RAM removes what it can live; the rest waits for the reboot.
        let p = plan(&grown, None, Some(256 * M)).unwrap();
        assert_eq!(p.remove_mem_to, Some(256 * M));
        // The top slot does not fit: only the next boot changes.
        let coarse = removable(vec![512 * M]);
        let p = plan(&coarse, None, Some(768 * M)).unwrap();
        assert_eq!((p.remove_mem_to, p.pending_mem), (None, Some(768 * M)));
        // CPUs and memory in one request.
        let p = plan(&grown, Some(3), Some(896 * M)).unwrap();
        assert_eq!((p.add_cpus, p.remove_mem_to), (1..3, Some(896 * M)));
    }

    #[test]
    fn a_pending_memory_removal_blocks_other_sizes_only() {
        let s = ResizeState {
            removing_mem: Some(3),
            mem_removal_waited_secs: 4,
            target_mem: 768 * M,
            ..removable(vec![128 * M; 4])
        };
        for mem in [640 * M, 2 * G, 768 * M + 128 * M] {
            assert_eq!(
                plan(&s, None, Some(mem)).unwrap_err().to_string(),
                "removal of memory slot 3 still pending for 4s: the guest has not ejected it yet; retry when info shows removing_mem=none"
            );
        }
        let p = plan(&s, Some(2), Some(768 * M)).unwrap();
        assert_eq!(p.add_mem, []);
        assert_eq!(
            (p.add_cpus, p.remove_mem_to, p.pending_mem),
            (1..2, None, Some(768 * M))
        );
        assert_eq!(plan(&s, Some(2), None).unwrap().add_cpus, 1..2);
    }

    #[test]
    fn memory_errors() {
        let s = state();
        let err = |mem, st: &ResizeState| plan(st, None, Some(mem)).unwrap_err().to_string();
        assert_eq!(
            err(4 * G, &s),
            "mem=4G exceeds max_mem=2560M (size + hotplug_size at start)"
        );
        assert_eq!(
            err(600 * M, &s),
            "mem=600M: growth by 88M from 512M is not a multiple of 128M"
        );
        assert_eq!(err(32 * M, &s), "mem=32M is below the minimum of 64M");
        assert_eq!(
            err(100 * M + 1, &s),
            "mem=104857601 is not a multiple of 1M"
        );
        let full = ResizeState {
            mem_slot_sizes: vec![1 << 20; 16],
            ..state()
        };
        assert_eq!(
            err(656 * M, &full),
            "all 16 memory hotplug slots are used this boot; grow in larger steps or reboot"
        );
        let nearly = removable(vec![M; 14]);
        assert_eq!(
            err(910 * M, &nearly),
            "mem=910M: growing by 384M needs 3 memory hotplug slots of 128M, only 2 are left this boot"
        );
        let tight = ResizeState {
            window: 4 * G..4 * G + 256 * M,
            ..state()
        };
        assert_eq!(
            err(1024 * M, &tight),
            "mem=1G: only 256M of the hotplug window is left this boot (reboot to reclaim alignment)"
        );
        // Nothing is planned when either half is wrong.
        assert!(plan(&s, Some(2), Some(600 * M)).is_err());
        assert!(plan(&s, Some(9), Some(640 * M)).is_err());
    }

    /// Records calls; fails the n-th vCPU start or the memory add.
    #[derive(Default)]
    struct Fake {
        fail_vcpu: Option<u32>,
        fail_mem: bool,
        fail_unmap: bool,
        mem: Vec<(u64, u64)>,
        running: Vec<u32>,
        calls: Vec<String>,
    }

    impl Backend for Fake {
        fn add_memory(&mut self, start: u64, size: u64) -> Result<(), BackendError> {
            self.calls.push(format!("add_memory {start:#x}"));
            if self.fail_mem {
                let einval = kvm_ioctls::Error::new(libc::EINVAL);
                return Err(VmError::Ioctl("KVM_SET_USER_MEMORY_REGION", einval).into());
            }
            self.mem.push((start, size));
            Ok(())
        }
        fn remove_last_memory(&mut self) -> Result<(), BackendError> {
            self.calls.push("remove_last_memory".into());
            if self.fail_unmap {
                return Err(VmError::Memory {
                    addr: 0,
                    size: 0,
                    reason: "munmap failed".into(),
                }
                .into());
            }
            self.mem.pop();
            Ok(())
        }
        fn start_vcpu(&mut self, id: u32) -> Result<(), BackendError> {
            self.calls.push(format!("start_vcpu {id}"));
            if self.fail_vcpu == Some(id) {
                let eagain = std::io::Error::from_raw_os_error(libc::EAGAIN);
                return Err(VcpuError::Spawn(id, eagain).into());
            }
            self.running.push(id);
            Ok(())
        }
        fn stop_vcpu(&mut self, id: u32) {
            self.calls.push(format!("stop_vcpu {id}"));
            self.running.retain(|&r| r != id);
        }
    }

    fn both() -> Plan {
        plan(&state(), Some(4), Some(1536 * M)).unwrap()
    }

    #[test]
    fn a_failed_second_memory_slot_unmaps_the_first() {
        struct FailSecond(Fake);
        impl Backend for FailSecond {
            fn add_memory(&mut self, start: u64, size: u64) -> Result<(), BackendError> {
                if !self.0.mem.is_empty() {
                    self.0.fail_mem = true;
                }
                self.0.add_memory(start, size)
            }
            fn remove_last_memory(&mut self) -> Result<(), BackendError> {
                self.0.remove_last_memory()
            }
            fn start_vcpu(&mut self, id: u32) -> Result<(), BackendError> {
                self.0.start_vcpu(id)
            }
            fn stop_vcpu(&mut self, id: u32) {
                self.0.stop_vcpu(id)
            }
        }
        let p = plan(&removable(vec![]), Some(2), Some(768 * M)).unwrap();
        let mut f = FailSecond(Fake::default());
        assert!(prepare(&p, &mut f).is_err());
        assert_eq!(
            f.0.calls,
            [
                "add_memory 0x100000000",
                "add_memory 0x108000000",
                "remove_last_memory"
            ]
        );
        assert!(f.0.mem.is_empty() && f.0.running.is_empty());
    }

    #[test]
    fn prepare_does_memory_then_vcpus() {
        let mut f = Fake::default();
        prepare(&both(), &mut f).unwrap();
        assert_eq!(f.mem, vec![(4 * G, G)]);
        assert_eq!(f.running, vec![1, 2, 3]);
    }

    #[test]
    fn a_failed_vcpu_rolls_back_the_started_ones_and_the_memory() {
        let mut f = Fake {
            fail_vcpu: Some(3),
            ..Fake::default()
        };
        let err = prepare(&both(), &mut f).unwrap_err().to_string();
        assert_eq!(
            err,
            "resize failed, nothing changed: cannot spawn the thread for vCPU 3: Resource temporarily unavailable (os error 11)"
        );
        assert!(f.mem.is_empty() && f.running.is_empty(), "{:?}", f.calls);
        assert_eq!(
            f.calls,
            [
                "add_memory 0x100000000",
                "start_vcpu 1",
                "start_vcpu 2",
                "start_vcpu 3",
                "stop_vcpu 2",
                "stop_vcpu 1",
                "remove_last_memory"
            ]
        );
    }

    #[test]
    fn a_failed_first_vcpu_or_memory_leaves_nothing() {
        let mut f = Fake {
            fail_vcpu: Some(1),
            ..Fake::default()
        };
        assert!(prepare(&plan(&state(), Some(2), None).unwrap(), &mut f).is_err());
        assert_eq!(f.calls, ["start_vcpu 1"]);
        let mut f = Fake {
            fail_mem: true,
            ..Fake::default()
        };
        let err = prepare(&both(), &mut f).unwrap_err().to_string();
        assert_eq!(
            err,
            "resize failed, nothing changed: KVM_SET_USER_MEMORY_REGION failed: Invalid argument (os error 22)"
        );
        assert_eq!(f.calls, ["add_memory 0x100000000"], "no vCPU started");
    }

    #[test]
    fn a_failed_unmap_during_rollback_still_reports_the_first_error() {
        let mut f = Fake {
            fail_vcpu: Some(2),
            fail_unmap: true,
            ..Fake::default()
        };
        let err = prepare(&both(), &mut f).unwrap_err().to_string();
        assert!(
            err.starts_with("resize failed, nothing changed: cannot spawn the thread for vCPU 2:"),
            "{err}"
        );
        assert!(f.running.is_empty());
    }
}

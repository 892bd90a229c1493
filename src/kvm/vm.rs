//! The KVM virtual machine: VM fd, guest memory slots, in-kernel irqchip (and optional PIT),
//! irqfds and vCPU creation. Nothing here knows about devices or the guest's boot.

use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_CAP_X86_USER_SPACE_MSR,
    KVM_MAX_CPUID_ENTRIES, KVM_MSR_EXIT_REASON_FILTER, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{
    Cap, IoEventAddress, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd,
    VmFd,
};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{cpuid, layout, msr, regs};
use crate::kvm::ram::{self, HostMapping};

/// VM-level errors; each names the failing operation.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open /dev/kvm: {0} (is the kvm module loaded and do you have access to /dev/kvm?)"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API version is not 12.
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// A required KVM capability is absent.
    #[error("KVM lacks the required capability {0:?}")]
    MissingCap(Cap),
    /// A VM ioctl failed.
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be mapped.
    #[error("cannot map {size} bytes of guest memory at {addr:#x}: {reason}")]
    Memory {
        /// Guest-physical start.
        addr: u64,
        /// Length in bytes.
        size: u64,
        /// What went wrong.
        reason: String,
    },
    /// Too many memory slots.
    #[error("no KVM memory slot left (limit {0})")]
    NoSlot(u32),
    /// vCPU register, CPUID or MSR setup failed.
    #[error("setting up vCPU {0}: {1}")]
    VcpuSetup(u32, String),
}

/// Capabilities minivmm relies on.
const REQUIRED_CAPS: [Cap; 8] = [
    Cap::Irqchip,
    Cap::Ioeventfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Irqfd,
    Cap::ImmediateExit,
    Cap::ExtCpuid,
    Cap::MpState,
];

/// Opens `/dev/kvm` and checks the API version and the capabilities minivmm needs.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::ApiVersion(version));
    }
    for cap in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(cap));
        }
    }
    Ok(kvm)
}

/// One VM: its fd, memory and the CPUID template for its vCPUs.
pub struct Vm {
    // Declared first, so dropped first: the VM (and its memory slots) go before the mappings.
    fd: VmFd,
    memory: GuestMemoryMmap,
    /// KVM slot numbers of the regions in `memory`, in insertion order.
    slots: Vec<(u32, GuestAddress, u64)>,
    /// The host mappings behind `slots`, in the same order.
    mappings: Vec<HostMapping>,
    max_slots: u32,
    supported_cpuid: CpuId,
    huge_pages: bool,
}

/// Optional parts of a VM.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmFeatures {
    /// An in-kernel i8254 PIT. Linux on KVM needs none (kvmclock gives the TSC rate, the LAPIC
    /// runs in TSC-deadline mode, and KVM guests skip the timer-IRQ check); KVM's teardown of
    /// one waits for SRCU grace periods, ~24 ms on a Debian host, at every exit and reboot.
    pub pit: bool,
    /// Advise transparent huge pages for guest RAM (`MADV_HUGEPAGE`). Guest RAM is 2 MiB-aligned
    /// either way, so hosts whose THP mode is `always` use huge pages regardless.
    pub huge_pages: bool,
    /// vCPUs report coming online (an MSR filter on IA32_LSTAR writes, installed before the
    /// irqchip: there it costs ~12 µs, after it an SRCU grace period, ~13 ms on PVM).
    pub report_online: bool,
}

impl Vm {
    /// Creates a VM with an in-kernel irqchip (and PIT if asked) and `ram` as boot memory
    /// regions.
    pub fn new(
        kvm: &Kvm,
        ram: &[(GuestAddress, usize)],
        features: VmFeatures,
    ) -> Result<Vm, VmError> {
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VM", e))?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(|e| VmError::Ioctl("KVM_SET_TSS_ADDR", e))?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        let max_slots = u32::try_from(kvm.get_nr_memslots()).unwrap_or(32);
        let mut vm = Vm {
            fd,
            memory: GuestMemoryMmap::default(),
            slots: Vec::new(),
            mappings: Vec::new(),
            max_slots,
            supported_cpuid,
            huge_pages: features.huge_pages,
        };
        if features.report_online {
            vm.trap_lstar_writes();
        }
        // Memory before the irqchip: the first memory slot installed after KVM_CREATE_IRQCHIP
        // waits for an SRCU grace period (6-10 ms on PVM; 0.1-0.3 ms in this order).
        for &(addr, size) in ram {
            vm.add_memory(addr, size as u64)?;
        }
        let fd = &vm.fd;
        fd.create_irq_chip()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_IRQCHIP", e))?;
        if features.pit {
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit)
                .map_err(|e| VmError::Ioctl("KVM_CREATE_PIT2", e))?;
        }
        Ok(vm)
    }

    /// Sends guest writes of IA32_LSTAR to userspace (`KVM_EXIT_X86_WRMSR`): every CPU writes it
    /// once while the kernel brings it up, which is how minivmm sees a vCPU come online. Reads
    /// and every other MSR stay in KVM. Optional: without `KVM_CAP_X86_USER_SPACE_MSR` there are
    /// simply no online events.
    fn trap_lstar_writes(&self) {
        let cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            args: [u64::from(KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
            ..Default::default()
        };
        if let Err(e) = self.fd.enable_cap(&cap) {
            log::debug!(
                "KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR) failed: {e}; no cpu-online events"
            );
            return;
        }
        // One MSR, write-filtered, bit 0 clear: denied in KVM, so it exits to userspace.
        let deny = [0u8; 1];
        let range = MsrFilterRange {
            flags: MsrFilterRangeFlags::WRITE,
            base: msr::MSR_LSTAR,
            msr_count: 1,
            bitmap: &deny,
        };
        if let Err(e) = self
            .fd
            .set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
        {
            log::debug!("KVM_X86_SET_MSR_FILTER failed: {e}; no cpu-online events");
        }
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Maps `size` bytes of anonymous, lazily backed memory at `addr` and registers it with KVM.
    pub fn add_memory(&mut self, addr: GuestAddress, size: u64) -> Result<(), VmError> {
        let err = |reason: String| VmError::Memory {
            addr: addr.0,
            size,
            reason,
        };
        let slot = self.free_slot()?;
        let len = usize::try_from(size).map_err(|_| err("size overflows usize".into()))?;
        // Huge pages from 2 MiB up: the first 2 MiB of guest RAM (real-mode area, boot data, ACPI
        // tables) stay in small pages, so a tiny guest does not pay a whole huge page for them.
        let huge_from = self
            .huge_pages
            .then_some(if addr.0 == 0 { ram::ALIGN } else { 0 });
        let mapping = HostMapping::new(len, huge_from).map_err(|e| err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping.region().map_err(|e| err(e.to_string()))?, addr)
            .ok_or_else(|| err("address overflow".into()))?;
        let host = region.as_ptr() as u64;
        let memory = self
            .memory
            .insert_region(Arc::new(region))
            .map_err(|e| err(e.to_string()))?;
        let mem_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: addr.0,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the host range [host, host + size) is `mapping`, which this Vm keeps (and so
        // keeps mapped) for as long as the slot exists: until remove_memory deletes the slot,
        // or the VM fd is closed (the field order makes `fd` drop first).
        unsafe { self.fd.set_user_memory_region(mem_region) }
            .map_err(|e| VmError::Ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        self.memory = memory;
        self.slots.push((slot, addr, size));
        self.mappings.push(mapping);
        Ok(())
    }

    /// Undoes the last [`Vm::add_memory`] (used to roll back a failed resize).
    pub fn remove_last_memory(&mut self) -> Result<(), VmError> {
        match self.slots.last() {
            Some(&(_, addr, _)) => self.remove_memory(addr),
            None => Ok(()),
        }
    }

    /// Unregisters the memory added at `addr` by [`Vm::add_memory`] from KVM and unmaps it (its
    /// host memory is returned to the system). Nothing changes on error.
    pub fn remove_memory(&mut self, addr: GuestAddress) -> Result<(), VmError> {
        let Some(index) = self.slots.iter().position(|&(_, a, _)| a == addr) else {
            return Err(VmError::Memory {
                addr: addr.0,
                size: 0,
                reason: "no memory was added at this address".into(),
            });
        };
        let (slot, _, size) = self.slots[index];
        let mem_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: addr.0,
            memory_size: 0,
            userspace_addr: 0,
        };
        let (memory, _) = self
            .memory
            .remove_region(addr, size)
            .map_err(|e| VmError::Memory {
                addr: addr.0,
                size,
                reason: e.to_string(),
            })?;
        // SAFETY: a zero-sized region deletes the slot; no host memory is referenced.
        unsafe { self.fd.set_user_memory_region(mem_region) }
            .map_err(|e| VmError::Ioctl("KVM_SET_USER_MEMORY_REGION (delete)", e))?;
        self.memory = memory;
        self.slots.remove(index);
        // The slot and the region are gone: nothing refers to the mapping any more.
        self.mappings.remove(index);
        Ok(())
    }

    /// The lowest KVM slot number not in use.
    fn free_slot(&self) -> Result<u32, VmError> {
        let slot = (0..self.max_slots)
            .find(|n| self.slots.iter().all(|&(s, _, _)| s != *n))
            .ok_or(VmError::NoSlot(self.max_slots))?;
        Ok(slot)
    }

    /// Routes `evt` to interrupt line `gsi` (`KVM_IRQFD`).
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Ioctl("KVM_IRQFD", e))
    }

    /// Makes KVM signal `evt` instead of exiting when the guest writes the 32-bit `value` to the
    /// MMIO address `addr` (`KVM_IOEVENTFD`): how virtqueue kicks reach the main thread.
    pub fn register_ioeventfd(&self, evt: &EventFd, addr: u64, value: u32) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), value)
            .map_err(|e| VmError::Ioctl("KVM_IOEVENTFD", e))
    }

    /// Creates vCPU `id` and gives it the CPUID, MSRs and LAPIC setup every vCPU needs
    /// (boot-time and hot-added alike). Registers for the boot vCPU are set separately.
    pub fn create_vcpu(&self, id: u32, max_vcpus: u32) -> Result<VcpuFd, VmError> {
        let vcpu = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VCPU", e))?;
        let mut cpuid = self.supported_cpuid.clone();
        cpuid::patch_cpuid(&mut cpuid, id, max_vcpus);
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| VmError::Ioctl("KVM_SET_CPUID2", e))?;
        msr::setup_msrs(&vcpu).map_err(|e| VmError::VcpuSetup(id, e.to_string()))?;
        regs::setup_lapic(&vcpu).map_err(|e| VmError::VcpuSetup(id, e.to_string()))?;
        Ok(vcpu)
    }
}

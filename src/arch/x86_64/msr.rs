//! Model-specific registers set on every vCPU before it first runs (boot and hot-added vCPUs).
//!
//! `IA32_TSC` is deliberately absent: writing it on a vCPU created after the guest booted makes
//! KVM treat the write as a new TSC and the guest may mark its TSC unstable.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// `IA32_SYSENTER_CS`.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `IA32_MISC_ENABLE`.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MTRR_DEF_TYPE`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// `IA32_STAR` (SYSCALL target segments).
pub const MSR_STAR: u32 = 0xc000_0081;
/// `IA32_LSTAR` (64-bit SYSCALL target).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `IA32_CSTAR` (compatibility-mode SYSCALL target).
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `IA32_FMASK` (SYSCALL RFLAGS mask).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `IA32_KERNEL_GS_BASE`.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
#[cfg(test)]
/// `IA32_TSC`: never part of the boot list.
pub const MSR_IA32_TSC: u32 = 0x10;

/// `IA32_MISC_ENABLE` bit 0: fast string operations enabled.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `IA32_MTRR_DEF_TYPE` value: MTRRs enabled (bit 11), default memory type write-back (6).
pub const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

/// Errors from programming the boot MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The MSR list could not be turned into a `kvm_msrs` structure.
    #[error("building the kvm_msrs list for KVM_SET_MSRS failed: {0}")]
    Build(#[source] vmm_sys_util::fam::Error),
    /// The `KVM_SET_MSRS` ioctl itself failed.
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM stopped at an MSR it refused.
    #[error("KVM_SET_MSRS set only {set} of {total} MSRs; KVM refused MSR {rejected:#x}")]
    Partial {
        /// Number of MSRs KVM accepted.
        set: usize,
        /// Number of MSRs requested.
        total: usize,
        /// Index of the first MSR KVM refused.
        rejected: u32,
    },
}

/// Boot MSRs (SYSENTER_CS/ESP/EIP, STAR, CSTAR, KERNEL_GS_BASE, SYSCALL_MASK, LSTAR = 0,
/// MISC_ENABLE = FAST_STRING, MTRRdefType = (1<<11)|6). NEVER IA32_TSC (harmful for hot-added
/// vCPUs).
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let entry = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
}

/// Writes [`boot_msr_entries`] with `KVM_SET_MSRS`; an error if KVM set fewer than all of them.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    set_msrs(vcpu, &boot_msr_entries())
}

/// Writes `entries` with `KVM_SET_MSRS`; an error if KVM set fewer than all of them.
pub fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), MsrError> {
    let msrs = Msrs::from_entries(entries).map_err(MsrError::Build)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::SetMsrs)?;
    if set != entries.len() {
        return Err(MsrError::Partial {
            set,
            total: entries.len(),
            rejected: entries.get(set).map_or(0, |e| e.index),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of(index: u32) -> Option<u64> {
        boot_msr_entries()
            .iter()
            .find(|e| e.index == index)
            .map(|e| e.data)
    }

    #[test]
    fn list_contents() {
        for zero in [
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_CSTAR,
            MSR_KERNEL_GS_BASE,
            MSR_SYSCALL_MASK,
            MSR_LSTAR,
        ] {
            assert_eq!(value_of(zero), Some(0), "MSR {zero:#x}");
        }
        assert_eq!(value_of(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(value_of(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(boot_msr_entries().len(), 10);
    }

    #[test]
    fn never_writes_tsc() {
        assert_eq!(value_of(MSR_IA32_TSC), None);
    }

    #[test]
    fn indices_are_unique() {
        let mut idx: Vec<u32> = boot_msr_entries().iter().map(|e| e.index).collect();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), boot_msr_entries().len());
    }

    #[test]
    fn fits_in_a_kvm_msrs() {
        let msrs = Msrs::from_entries(&boot_msr_entries()).expect("fam struct");
        assert_eq!(msrs.as_slice().len(), 10);
    }
}

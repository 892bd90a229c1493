//! Boot vCPU register state (GPRs, segments, control registers, FPU), the boot GDT/IDT and
//! identity-map page tables in guest memory, and the LAPIC LINT pins of every vCPU.
//!
//! The state is computed by pure functions ([`boot_regs`], [`configure_sregs`], [`boot_fpu`],
//! [`identity_map_tables`], [`set_lint_modes`]) so it can be tested without KVM; the ioctl
//! wrappers only move it in and out of the vCPU.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::{BootProtocol, KernelEntry};
use super::gdt::{boot_segments, gdt_bytes, LINUX64_GDT, PVH_GDT};
use super::layout::{
    BOOT_GDT_MAX, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START,
    PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};

/// CR0.PE: protected mode.
pub const X86_CR0_PE: u64 = 1;
/// CR0.ET: extension type (hard-wired to 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0.PG: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS with only the reserved bit 1 set.
pub const RFLAGS_RESERVED: u64 = 0x2;
/// x87 control word after FNINIT.
pub const FPU_FCW: u16 = 0x37f;
/// MXCSR reset value (all exceptions masked).
pub const MXCSR_DEFAULT: u32 = 0x1f80;

/// Page-table entry bits: present | writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry bits: present | writable | page size (2 MiB page).
const PDE_2M_PAGE: u64 = 0x83;
/// Number of entries in one page-table page.
const ENTRIES_PER_TABLE: usize = 512;

/// Offset of LVT LINT0 in the LAPIC register page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of LVT LINT1 in the LAPIC register page.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// LVT delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;

/// Errors from setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// `KVM_GET_SREGS` failed.
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_SREGS` failed.
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_REGS` failed.
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_FPU` failed.
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// `KVM_GET_LAPIC` failed.
    #[error("KVM_GET_LAPIC failed: {0}")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// `KVM_SET_LAPIC` failed.
    #[error("KVM_SET_LAPIC failed: {0}")]
    SetLapic(#[source] kvm_ioctls::Error),
    /// Writing a boot table into guest memory failed.
    #[error("writing the boot {what} at {addr:#x} into guest memory failed: {source}")]
    WriteGuestMemory {
        /// Which table.
        what: &'static str,
        /// Guest address written.
        addr: u64,
        /// Underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// General-purpose registers at the kernel entry.
pub fn boot_regs(entry: &KernelEntry) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.entry.0,
        ..Default::default()
    };
    match entry.protocol {
        BootProtocol::Linux64 => {
            regs.rsi = ZERO_PAGE_START;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// The boot GDT of `protocol`.
pub fn boot_gdt(protocol: BootProtocol) -> &'static [u64; BOOT_GDT_MAX] {
    match protocol {
        BootProtocol::Linux64 => &LINUX64_GDT,
        BootProtocol::Pvh => &PVH_GDT,
    }
}

/// Rewrites the segment, descriptor-table and control registers of `sregs` (as read from
/// `KVM_GET_SREGS`) for the entry `protocol`; everything else (APIC base, interrupt bitmap) is
/// kept.
pub fn configure_sregs(sregs: &mut kvm_sregs, protocol: BootProtocol) {
    let gdt = boot_gdt(protocol);
    let (code, data, tss) = boot_segments(gdt);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match protocol {
        BootProtocol::Linux64 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

/// FPU state at entry: FCW 0x37F, MXCSR 0x1F80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_FCW,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

/// Identity map of the first 1 GiB with 2 MiB pages: (`PML4[0]`, `PDPTE[0]`, `PDE[0..512]`).
pub fn identity_map_tables() -> (u64, u64, Vec<u64>) {
    let pde = (0..ENTRIES_PER_TABLE as u64)
        .map(|i| (i << 21) | PDE_2M_PAGE)
        .collect();
    (
        PDPTE_START | PTE_PRESENT_RW,
        PDE_START | PTE_PRESENT_RW,
        pde,
    )
}

fn write_bytes(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), RegsError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| RegsError::WriteGuestMemory { what, addr, source })
}

/// Writes the GDT, the one-entry null IDT and, for [`BootProtocol::Linux64`], the identity-map
/// page tables into guest memory.
pub fn write_boot_tables(mem: &GuestMemoryMmap, protocol: BootProtocol) -> Result<(), RegsError> {
    write_bytes(mem, "GDT", BOOT_GDT_START, &gdt_bytes(boot_gdt(protocol)))?;
    write_bytes(mem, "IDT", BOOT_IDT_START, &0u64.to_le_bytes())?;
    if protocol == BootProtocol::Linux64 {
        let (pml4, pdpte, pde) = identity_map_tables();
        write_bytes(mem, "PML4", PML4_START, &pml4.to_le_bytes())?;
        write_bytes(mem, "PDPTE", PDPTE_START, &pdpte.to_le_bytes())?;
        let pde_bytes: Vec<u8> = pde.iter().flat_map(|e| e.to_le_bytes()).collect();
        write_bytes(mem, "PDE", PDE_START, &pde_bytes)?;
    }
    Ok(())
}

/// Full BSP setup for `entry` (regs, sregs incl. GDT/IDT written to guest memory and page
/// tables for Linux64, FPU).
///
/// CPUID and MSRs must already be set (KVM checks CR4/EFER bits against the guest CPUID).
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: &KernelEntry,
) -> Result<(), RegsError> {
    write_boot_tables(mem, entry.protocol)?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(RegsError::SetRegs)?;
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    configure_sregs(&mut sregs, entry.protocol);
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)?;
    vcpu.set_fpu(&boot_fpu()).map_err(RegsError::SetFpu)?;
    Ok(())
}

/// Reads the 32-bit LAPIC register at `offset` (0 when `offset` is outside the register page).
pub fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    lapic
        .regs
        .get(offset..offset.saturating_add(4))
        .map_or(0, |b| {
            u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
        })
}

/// Writes the 32-bit LAPIC register at `offset` (ignored outside the register page).
fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    if let Some(dst) = lapic.regs.get_mut(offset..offset.saturating_add(4)) {
        for (d, v) in dst.iter_mut().zip(value.to_le_bytes()) {
            *d = v as std::os::raw::c_char;
        }
    }
}

/// Sets LVT LINT0 to ExtINT and LINT1 to NMI (delivery mode bits 10:8), keeping other bits.
pub fn set_lint_modes(lapic: &mut kvm_lapic_state) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let v = lapic_reg(lapic, offset);
        set_lapic_reg(lapic, offset, (v & !0x700) | (mode << 8));
    }
}

/// LAPIC LINT0 = ExtINT, LINT1 = NMI (KVM_GET_LAPIC/KVM_SET_LAPIC) — for every vCPU incl.
/// hot-added.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(RegsError::GetLapic)?;
    set_lint_modes(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(RegsError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::memory::ram_regions;

    pub(super) fn entry(protocol: BootProtocol, rip: u64) -> KernelEntry {
        KernelEntry {
            entry: GuestAddress(rip),
            protocol,
            setup_header: None,
            kernel_end: 0x200_0000,
        }
    }

    #[test]
    fn linux64_regs() {
        let r = boot_regs(&entry(BootProtocol::Linux64, 0x100_0000));
        assert_eq!(r.rip, 0x100_0000);
        assert_eq!(r.rsi, 0x7000);
        assert_eq!((r.rsp, r.rbp), (0x8ff0, 0x8ff0));
        assert_eq!(r.rflags, 2);
        assert_eq!(r.rbx, 0);
    }

    #[test]
    fn pvh_regs() {
        let r = boot_regs(&entry(BootProtocol::Pvh, 0x100_0850));
        assert_eq!(r.rip, 0x100_0850);
        assert_eq!(r.rbx, 0x6000);
        assert_eq!(r.rflags, 2);
        assert_eq!(r.rsi, 0);
    }

    #[test]
    fn linux64_sregs() {
        let mut s = kvm_sregs {
            apic_base: 0xfee0_0900,
            cr0: 0x6000_0010,
            ..Default::default()
        };
        configure_sregs(&mut s, BootProtocol::Linux64);
        assert_eq!(s.cr0, 0x8000_0011);
        assert_eq!(s.cr3, 0x9000);
        assert_eq!(s.cr4, 0x20);
        assert_eq!(s.efer, 0x500);
        assert_eq!((s.gdt.base, s.gdt.limit), (0x500, 31));
        assert_eq!((s.idt.base, s.idt.limit), (0x520, 7));
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x08, 1, 0));
        for seg in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!((seg.selector, seg.type_, seg.present), (0x10, 3, 1));
        }
        assert_eq!((s.tr.selector, s.tr.type_), (0x18, 0xb));
        assert_eq!(s.apic_base, 0xfee0_0900, "kept");
    }

    #[test]
    fn pvh_sregs() {
        let mut s = kvm_sregs {
            cr0: 0x6000_0010,
            efer: EFER_LME,
            ..Default::default()
        };
        configure_sregs(&mut s, BootProtocol::Pvh);
        assert_eq!(s.cr0, 0x11);
        assert_eq!((s.cr3, s.cr4, s.efer), (0, 0, 0));
        assert_eq!(
            (s.cs.selector, s.cs.l, s.cs.db, s.cs.limit),
            (0x08, 0, 1, 0xffff_ffff)
        );
        assert_eq!((s.ss.selector, s.ss.db), (0x10, 1));
        assert_eq!((s.tr.selector, s.tr.limit, s.tr.type_), (0x18, 0x67, 0xb));
    }

    #[test]
    fn fpu_state() {
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn page_table_values() {
        let (pml4, pdpte, pde) = identity_map_tables();
        assert_eq!(pml4, 0xa003);
        assert_eq!(pdpte, 0xb003);
        assert_eq!(pde.len(), 512);
        assert_eq!(pde[0], 0x83);
        assert_eq!(pde[1], 0x20_0083);
        assert_eq!(pde[8], 0x100_0083);
        assert_eq!(pde[511], (511 << 21) | 0x83);
        for (i, e) in pde.iter().enumerate() {
            assert_eq!(
                e & !0xfff,
                (i as u64) * 0x20_0000,
                "PDE {i} maps 2 MiB page {i}"
            );
        }
    }

    #[test]
    fn tables_in_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&ram_regions(16 << 20)).unwrap();
        write_boot_tables(&mem, BootProtocol::Linux64).unwrap();
        let gdt: [u64; 4] =
            [0, 1, 2, 3].map(|i| mem.read_obj(GuestAddress(0x500 + 8 * i)).unwrap());
        assert_eq!(gdt, LINUX64_GDT);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x520)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x9000)).unwrap(), 0xa003);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0xa000)).unwrap(), 0xb003);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0xb000)).unwrap(), 0x83);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0xb000 + 8 * 511)).unwrap(),
            0x3fe0_0083
        );

        let mem = GuestMemoryMmap::from_ranges(&ram_regions(16 << 20)).unwrap();
        write_boot_tables(&mem, BootProtocol::Pvh).unwrap();
        let gdt: [u64; 4] =
            [0, 1, 2, 3].map(|i| mem.read_obj(GuestAddress(0x500 + 8 * i)).unwrap());
        assert_eq!(gdt, PVH_GDT);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x9000)).unwrap(),
            0,
            "no page tables"
        );
    }

    #[test]
    fn boot_tables_fail_cleanly_without_low_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 0x10_0000)]).unwrap();
        let err = write_boot_tables(&mem, BootProtocol::Linux64).unwrap_err();
        assert!(err.to_string().contains("GDT at 0x500"), "{err}");
    }

    #[test]
    fn lint_modes() {
        let mut lapic = kvm_lapic_state::default();
        // Masked LINT0 in fixed mode, LINT1 with vector bits set.
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0000);
        set_lapic_reg(&mut lapic, APIC_LVT1, 0x0001_04ff);
        set_lint_modes(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0x0001_04ff);
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT1, 0x700);
        set_lint_modes(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0x400);
        assert_eq!((lapic_reg(&lapic, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!(lapic_reg(&lapic, 1022), 0, "out of range reads 0");
        set_lapic_reg(&mut lapic, 1022, 0xffff_ffff);
        assert_eq!(lapic.regs[1022], 0, "out of range writes are ignored");
    }
}

/// Tests against the real `/dev/kvm`: they fail (never skip) when it is unavailable.
#[cfg(test)]
mod kvm_tests {
    use super::tests::entry;
    use super::*;
    use crate::arch::x86_64::cpuid::patch_cpuid;
    use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
    use crate::arch::x86_64::memory::ram_regions;
    use crate::arch::x86_64::msr::setup_msrs;
    use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
    use kvm_ioctls::{Kvm, VcpuExit, VmFd};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    const MEM_SIZE: u64 = 64 << 20;

    fn vm_with_memory() -> (Kvm, VmFd, GuestMemoryMmap) {
        let kvm = Kvm::new().expect("opening /dev/kvm (required for this test)");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.set_tss_address(KVM_TSS_ADDRESS as usize)
            .expect("KVM_SET_TSS_ADDR");
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        let mem = GuestMemoryMmap::from_ranges(&ram_regions(MEM_SIZE)).unwrap();
        for (slot, region) in mem.iter().enumerate() {
            let host = mem.get_host_address(region.start_addr()).unwrap();
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the test keeps alive for
            // as long as the VM (both are dropped together at the end of the test).
            unsafe { vm.set_user_memory_region(r) }.expect("KVM_SET_USER_MEMORY_REGION");
        }
        (kvm, vm, mem)
    }

    fn configure_vcpu(kvm: &Kvm, vcpu: &VcpuFd, id: u32, max: u32) {
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        patch_cpuid(&mut cpuid, id, max);
        vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
        setup_msrs(vcpu).expect("boot MSRs");
        setup_lapic(vcpu).expect("LAPIC LINT0/1");
        let lapic = vcpu.get_lapic().unwrap();
        assert_eq!((lapic_reg(&lapic, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&lapic, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }

    /// Runs `vcpu` until its first port write; returns (port, data).
    fn run_to_io_out(vcpu: &mut VcpuFd) -> (u16, Vec<u8>) {
        loop {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut(port, data) => return (port, data.to_vec()),
                VcpuExit::IoIn(_, data) => data.fill(0),
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }

    #[test]
    fn linux64_boot_state_runs_64bit_code() {
        let (kvm, vm, mem) = vm_with_memory();
        let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        configure_vcpu(&kvm, &vcpu, 0, 2);
        // mov eax, [rsi + 0x202]; mov dx, 0x80; out dx, eax; mov rax, cr0 ... ; hlt
        // Reads the "HdrS" magic through the identity map from the zero page pointed to by RSI.
        let code = [
            0x8b, 0x86, 0x02, 0x02, 0x00, 0x00, // mov eax, [rsi+0x202]
            0x66, 0xba, 0x80, 0x00, // mov dx, 0x80
            0xef, // out dx, eax
            0xf4, // hlt
        ];
        let rip = 0x100_0000;
        mem.write_slice(&code, GuestAddress(rip)).unwrap();
        mem.write_obj(0x5372_6448u32, GuestAddress(ZERO_PAGE_START + 0x202))
            .unwrap();
        let e = entry(BootProtocol::Linux64, rip);
        setup_boot_vcpu(&vcpu, &mem, &e).expect("setup_boot_vcpu");

        let s = vcpu.get_sregs().unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        let r = vcpu.get_regs().unwrap();
        assert_eq!(
            (r.rip, r.rsi, r.rsp),
            (rip, ZERO_PAGE_START, BOOT_STACK_POINTER)
        );

        let (port, data) = run_to_io_out(&mut vcpu);
        assert_eq!(port, 0x80);
        assert_eq!(data, 0x5372_6448u32.to_le_bytes());

        // A second vCPU as the hot-add path configures it (no registers).
        let vcpu1 = vm.create_vcpu(1).expect("KVM_CREATE_VCPU 1");
        configure_vcpu(&kvm, &vcpu1, 1, 2);
    }

    #[test]
    fn pvh_boot_state_runs_32bit_code() {
        let (kvm, vm, mem) = vm_with_memory();
        let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        configure_vcpu(&kvm, &vcpu, 0, 1);
        // mov eax, [ebx]; mov dx, 0x80; out dx, eax; hlt — reads the start-info magic via RBX.
        let code = [0x8b, 0x03, 0x66, 0xba, 0x80, 0x00, 0xef, 0xf4];
        let rip = 0x100_0000;
        mem.write_slice(&code, GuestAddress(rip)).unwrap();
        mem.write_obj(0x336e_c578u32, GuestAddress(PVH_INFO_START))
            .unwrap();
        let e = entry(BootProtocol::Pvh, rip);
        setup_boot_vcpu(&vcpu, &mem, &e).expect("setup_boot_vcpu");

        let s = vcpu.get_sregs().unwrap();
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!(s.efer & EFER_LMA, 0);
        assert_eq!(vcpu.get_regs().unwrap().rbx, PVH_INFO_START);

        let (port, data) = run_to_io_out(&mut vcpu);
        assert_eq!(port, 0x80);
        assert_eq!(data, 0x336e_c578u32.to_le_bytes());
    }
}

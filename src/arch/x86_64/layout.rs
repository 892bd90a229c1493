//! Guest-physical memory map, I/O ports and interrupt lines of a minivmm guest.
//!
//! Every address the VMM and the guest agree on is a constant here, so the map can be
//! read in one place. Low memory follows the Linux/x86 boot protocol conventions.

/// GDT used for the 64-bit and PVH entry (4 entries of 8 bytes).
pub const BOOT_GDT_START: u64 = 0x500;
/// Maximum number of GDT entries written at [`BOOT_GDT_START`].
pub const BOOT_GDT_MAX: usize = 4;
/// A single empty IDT entry (the kernel installs its own IDT at once).
pub const BOOT_IDT_START: u64 = 0x520;

/// PVH `hvm_start_info` structure (RBX at PVH entry points here).
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH `hvm_modlist_entry` array (the initramfs is module 0).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_START: u64 = 0x7000;

/// Linux zero page (`boot_params`); RSI points here at the 64-bit entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Identity-mapping page tables for the 64-bit entry (PML4, PDPTE, PDE).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory: 512 entries of 2 MiB pages map the first 1 GiB.
pub const PDE_START: u64 = 0xb000;

/// Kernel command line (NUL-terminated).
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum length of the kernel command line including the NUL (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// End of the usable low RAM reported in E820 (start of the EBDA area).
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the area holding the ACPI tables (E820-reserved together with the EBDA).
pub const ACPI_START: u64 = 0xe0000;
/// RSDP location (also passed in `boot_params.acpi_rsdp_addr` / PVH `rsdp_paddr`).
pub const RSDP_START: u64 = ACPI_START;
/// End (exclusive) of the ACPI table area.
pub const ACPI_END: u64 = HIMEM_START;

/// The x86 reset vector as real-mode code reaches it (`F000:FFF0`). Linux's `BOOT_BIOS` reboot
/// (its default on hardware-reduced ACPI without EFI, and `reboot=bios|efi`) jumps here in real
/// mode; minivmm places a 16-byte stub here that writes the ACPI reset register. It lies in the
/// E820-reserved area below [`HIMEM_START`].
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// Room for the reset-vector stub: up to the 1 MiB boundary.
pub const RESET_VECTOR_SIZE: u64 = HIMEM_START - RESET_VECTOR;

/// Start of high memory: a bzImage's protected-mode code is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; guest RAM below 4 GiB ends here at the latest.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole (up to 4 GiB).
pub const MMIO_HOLE_SIZE: u64 = FIRST_ADDR_PAST_32BITS - MMIO_HOLE_START;
/// First address above the 32-bit space; RAM beyond [`MMIO_HOLE_START`] continues here.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;

/// Platform MMIO page holding the ACPI hotplug devices (not RAM, not in E820).
pub const PLATFORM_MMIO_START: u64 = 0xfeb0_0000;
/// Size of the platform MMIO page.
pub const PLATFORM_MMIO_SIZE: u64 = 0x1000;
const _: () = assert!(
    MEM_HOTPLUG_START + MEM_HOTPLUG_SIZE <= PLATFORM_MMIO_START + PLATFORM_MMIO_SIZE,
    "the hotplug controllers fit the platform MMIO page"
);
const _: () = assert!(
    PLATFORM_MMIO_START >= MMIO_HOLE_START
        && PLATFORM_MMIO_START + PLATFORM_MMIO_SIZE <= MMIO_HOLE_START + MMIO_HOLE_SIZE,
    "the platform MMIO page lies in the 32-bit MMIO hole"
);
/// ACPI Generic Event Device: one read-to-clear event byte.
pub const GED_START: u64 = PLATFORM_MMIO_START;
/// Size of the GED register block.
pub const GED_SIZE: u64 = 1;
/// CPU hotplug controller (QEMU/Cloud Hypervisor "modern" layout).
pub const CPU_HOTPLUG_START: u64 = PLATFORM_MMIO_START + 0x100;
/// Size of the CPU hotplug controller register block.
pub const CPU_HOTPLUG_SIZE: u64 = 0xc;
/// Memory hotplug controller (QEMU/Cloud Hypervisor layout).
pub const MEM_HOTPLUG_START: u64 = PLATFORM_MMIO_START + 0x200;
/// Size of the memory hotplug controller register block.
pub const MEM_HOTPLUG_SIZE: u64 = 0x1c;

/// virtio-mmio devices: one 4 KiB page each from here, in the order of the command line (disks
/// first, then vsock), described to the guest as ACPI `LNRO0005` devices.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device's register page.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Most virtio-mmio devices (one interrupt line each, [`irq::VIRTIO`]).
pub const MAX_VIRTIO_DEVICES: usize = irq::VIRTIO.len();
const _: () = assert!(
    VIRTIO_MMIO_START >= MMIO_HOLE_START
        && VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE * MAX_VIRTIO_DEVICES as u64 <= PLATFORM_MMIO_START,
    "the virtio-mmio pages lie in the 32-bit MMIO hole, below the platform page"
);

/// In-kernel IOAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC of every vCPU.
pub const APIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for the TSS on Intel hosts (`KVM_SET_TSS_ADDR`).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Granularity and alignment of hot-added memory (the x86-64 Linux memory block size).
pub const MEMORY_HOTPLUG_ALIGN: u64 = 128 << 20;
/// Upper bound on memory hotplug slots (ACPI `Mnnn` devices) per boot.
pub const MAX_MEMORY_HOTPLUG_SLOTS: usize = 64;

/// Legacy I/O ports handled in userspace.
pub mod ports {
    /// i8042 keyboard controller data port.
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 status (read) / command (write) port.
    pub const I8042_COMMAND: u16 = 0x64;
    /// Ports covered by the i8042 (0x60..=0x64).
    pub const I8042_SIZE: u16 = I8042_COMMAND - I8042_DATA + 1;
    /// CMOS RTC index port.
    pub const RTC_INDEX: u16 = 0x70;
    /// CMOS RTC data port.
    pub const RTC_DATA: u16 = 0x71;
    /// Ports covered by the RTC.
    pub const RTC_SIZE: u16 = RTC_DATA - RTC_INDEX + 1;
    /// COM1 16550 UART base (8 registers).
    pub const COM1: u16 = 0x3f8;
    /// Number of COM1 registers.
    pub const COM1_SIZE: u16 = 8;
    /// ACPI sleep control register (FADT SLEEP_CONTROL_REG); 0x34 = enter S5.
    pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
    /// ACPI sleep status register (FADT SLEEP_STATUS_REG); reads 0.
    pub const ACPI_SLEEP_STATUS: u16 = 0x601;
    /// ACPI reset register (FADT RESET_REG); writing [`super::ACPI_RESET_VALUE`] resets.
    pub const ACPI_RESET: u16 = 0x602;
    /// Ports covered by the ACPI sleep and reset registers.
    pub const ACPI_PM_SIZE: u16 = ACPI_RESET - ACPI_SLEEP_CONTROL + 1;
    /// PIIX/ICH reset control register (Linux `reboot=pci`): bit 2 resets the machine.
    pub const RESET_CONTROL: u16 = 0xcf9;
    /// Ports covered by the reset control register.
    pub const RESET_CONTROL_SIZE: u16 = 1;
    /// POST/debug port: the guest's first write after a boot starts is its boot-time marker
    /// (Linux itself never writes it: minivmm's CPUID offers KVM_FEATURE_NOP_IO_DELAY).
    pub const DEBUG_PORT: u16 = 0x80;
    /// Ports covered by the debug port.
    pub const DEBUG_PORT_SIZE: u16 = 1;
    /// pvpanic device (QEMU's `pvpanic` ISA device, ACPI `QEMU0001`).
    pub const PVPANIC: u16 = 0x505;
    /// Ports covered by the pvpanic device.
    pub const PVPANIC_SIZE: u16 = 1;
    /// Default base of the guest exit device (QEMU's `isa-debug-exit` default `iobase`).
    pub const EXIT_DEVICE_DEFAULT: u16 = 0x501;
    /// Default width of the guest exit device (QEMU's `isa-debug-exit` default `iosize`).
    pub const EXIT_DEVICE_DEFAULT_SIZE: u16 = 2;

    /// Every fixed port range minivmm emulates, as (name, base, size): the exit device, whose
    /// base the user chooses, must not overlap any of them.
    pub const FIXED: [(&str, u16, u16); 7] = [
        ("i8042", I8042_DATA, I8042_SIZE),
        ("RTC", RTC_INDEX, RTC_SIZE),
        ("debug port", DEBUG_PORT, DEBUG_PORT_SIZE),
        ("COM1", COM1, COM1_SIZE),
        ("pvpanic", PVPANIC, PVPANIC_SIZE),
        ("ACPI PM", ACPI_SLEEP_CONTROL, ACPI_PM_SIZE),
        ("reset control", RESET_CONTROL, RESET_CONTROL_SIZE),
    ];

    /// The fixed range that `[base, base + size)` overlaps, if any.
    pub fn overlapping(base: u16, size: u16) -> Option<&'static str> {
        let end = u32::from(base) + u32::from(size);
        FIXED
            .iter()
            .find(|(_, b, s)| {
                u32::from(*b) < end && u32::from(base) < u32::from(*b) + u32::from(*s)
            })
            .map(|(name, _, _)| *name)
    }
}

/// Value the guest writes to [`ports::ACPI_RESET`] to reset the machine.
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP of the `\_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Interrupt lines (GSIs on the in-kernel IOAPIC).
pub mod irq {
    /// COM1.
    pub const COM1: u32 = 4;
    /// RTC.
    pub const RTC: u32 = 8;
    /// GED: edge-triggered, active-high; 16..23 are routed to the IOAPIC only.
    pub const GED: u32 = 16;
    /// virtio-mmio devices, edge-triggered, active-high, one line each (IOAPIC-only lines).
    pub const VIRTIO: [u32; 7] = [17, 18, 19, 20, 21, 22, 23];
}

/// Highest number of vCPUs: APIC IDs are bytes in MADT type-0 entries and 0xff is broadcast.
pub const MAX_VCPUS: u32 = 254;

#[cfg(test)]
mod tests {
    use super::ports;

    #[test]
    fn fixed_port_ranges_are_disjoint() {
        for (i, (name, base, size)) in ports::FIXED.iter().enumerate() {
            for (other, b, s) in &ports::FIXED[i + 1..] {
                let disjoint = u32::from(*base) + u32::from(*size) <= u32::from(*b)
                    || u32::from(*b) + u32::from(*s) <= u32::from(*base);
                assert!(disjoint, "{name} overlaps {other}");
            }
        }
    }

    #[test]
    fn overlap_lookup() {
        assert_eq!(
            ports::overlapping(ports::EXIT_DEVICE_DEFAULT, ports::EXIT_DEVICE_DEFAULT_SIZE),
            None
        );
        assert_eq!(ports::overlapping(0xf4, 4), None);
        assert_eq!(ports::overlapping(0x3ff, 1), Some("COM1"));
        assert_eq!(ports::overlapping(0x3f0, 8), None);
        assert_eq!(ports::overlapping(0x3f0, 9), Some("COM1"));
        assert_eq!(ports::overlapping(0x504, 2), Some("pvpanic"));
        assert_eq!(ports::overlapping(0x7e, 4), Some("debug port"));
        assert_eq!(ports::overlapping(0xfffe, 4), None);
    }
}

//! ACPI table generation.
//!
//! Input: 4 bytes making an arbitrary valid [`AcpiConfig`] (boot vCPUs `1..=max`, max
//! vCPUs `1..=254`, memory slots `0..=64`, removable memory, pvpanic, virtio-mmio devices).
//!
//! Invariants: [`build`] succeeds; the tables written into guest memory are found again from
//! the RSDP alone: the RSDP and every table checksum to 0, header lengths match, the XSDT
//! lists the FADT and the MADT, the FADT points at the DSDT, tables lie inside the ACPI
//! area without overlapping; the MADT lists exactly the possible CPUs with the boot ones
//! enabled; the DSDT declares one device per possible CPU and memory slot.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use minivmm::acpi::{build, write, AcpiConfig};
use minivmm::arch::x86_64::layout;

/// Offset of the 64-bit DSDT address in the FADT (ACPI 6.x, `X_DSDT`).
const FADT_X_DSDT: usize = 140;
/// Offset of the 32-bit DSDT address in the FADT (0 when only `X_DSDT` is used).
const FADT_DSDT: usize = 40;
/// Length of the MADT header (standard header, local APIC address and flags).
const MADT_HEADER_LEN: usize = 44;

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Reads the table at `addr` from guest memory and checks its header: signature, length
/// (at least the 36-byte header, inside the ACPI area) and checksum.
fn read_table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    let mut header = [0u8; 36];
    mem.read_slice(&mut header, GuestAddress(addr))
        .unwrap_or_else(|e| panic!("table at {addr:#x}: {e}"));
    assert_eq!(&header[..4], signature, "signature at {addr:#x}");
    let len = u32_at(&header, 4) as u64;
    assert!(len >= 36, "{signature:?} length {len}");
    assert!(
        addr >= layout::RSDP_START && addr + len <= layout::ACPI_END,
        "{signature:?} at {addr:#x}+{len:#x} outside the ACPI area"
    );
    let mut bytes = vec![0u8; len as usize];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    assert_eq!(sum(&bytes), 0, "{signature:?} checksum");
    bytes
}

/// The configuration encoded by the first 4 bytes of `data`.
pub fn config(data: &[u8]) -> AcpiConfig {
    let mut input = crate::Input::new(data);
    let max_cpus = 1 + u32::from(input.u8()) % layout::MAX_VCPUS;
    let boot_cpus = 1 + u32::from(input.u8()) % max_cpus;
    let memory_slots = usize::from(input.u8()) % (layout::MAX_MEMORY_HOTPLUG_SLOTS + 1);
    let flags = input.u8();
    AcpiConfig {
        boot_cpus,
        max_cpus,
        memory_slots,
        memory_removable: flags & 1 != 0,
        pvpanic: flags & 2 != 0,
        virtio_devices: usize::from(flags >> 2) % (layout::MAX_VIRTIO_DEVICES + 1),
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let cfg = config(data);
    let tables = build(&cfg).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
    // Guest memory below 1 MiB, reused (and cleared) across inputs.
    static MEM: std::sync::OnceLock<GuestMemoryMmap> = std::sync::OnceLock::new();
    let mem = MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), layout::HIMEM_START as usize)]).unwrap()
    });
    let area = (layout::ACPI_END - layout::RSDP_START) as usize;
    mem.write_slice(&vec![0u8; area], GuestAddress(layout::RSDP_START))
        .unwrap();
    write(mem, &tables).unwrap();

    // Placement as reported: aligned, ascending, not overlapping, inside the area.
    let mut end = tables.rsdp.addr + tables.rsdp.bytes.len() as u64;
    for t in &tables.tables {
        assert_eq!(t.addr % 16, 0, "{} alignment", t.signature);
        assert!(t.addr >= end, "{} overlaps", t.signature);
        assert_eq!(
            u32_at(&t.bytes, 4) as usize,
            t.bytes.len(),
            "{}",
            t.signature
        );
        end = t.addr + t.bytes.len() as u64;
    }
    assert!(end <= layout::ACPI_END);

    // From the RSDP alone, as the guest finds them.
    assert_eq!(tables.rsdp.addr, layout::RSDP_START);
    let mut rsdp = [0u8; 36];
    mem.read_slice(&mut rsdp, GuestAddress(layout::RSDP_START))
        .unwrap();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    let xsdt = read_table(mem, u64_at(&rsdp, 24), b"XSDT");
    assert_eq!((xsdt.len() - 36) % 8, 0, "XSDT entries");
    let mut found = Vec::new();
    for off in (36..xsdt.len()).step_by(8) {
        let addr = u64_at(&xsdt, off);
        let mut signature = [0u8; 4];
        mem.read_slice(&mut signature, GuestAddress(addr)).unwrap();
        found.push((signature, read_table(mem, addr, &signature)));
    }
    let signatures: Vec<&[u8; 4]> = found.iter().map(|(s, _)| s).collect();
    assert_eq!(signatures, [b"FACP", b"APIC"], "XSDT entries");
    let fadt = &found[0].1;
    let dsdt_addr = u64_at(fadt, FADT_X_DSDT);
    let dsdt32 = u64::from(u32_at(fadt, FADT_DSDT));
    assert!(dsdt32 == 0 || dsdt32 == dsdt_addr, "FADT DSDT {dsdt32:#x}");
    let dsdt = read_table(mem, dsdt_addr, b"DSDT");

    // Every table the builder made is reachable, and nothing else.
    let mut reached = vec![dsdt_addr, u64_at(&rsdp, 24)];
    reached.extend((36..xsdt.len()).step_by(8).map(|off| u64_at(&xsdt, off)));
    reached.sort_unstable();
    let mut built: Vec<u64> = tables.tables.iter().map(|t| t.addr).collect();
    built.sort_unstable();
    assert_eq!(reached, built, "tables reachable from the RSDP");

    // MADT: one local APIC per possible CPU, the boot ones enabled.
    let madt = &found[1].1;
    let mut off = MADT_HEADER_LEN;
    let mut cpus = Vec::new();
    while off < madt.len() {
        assert!(off + 2 <= madt.len(), "MADT entry header past the end");
        let (kind, len) = (madt[off], usize::from(madt[off + 1]));
        assert!(len >= 2 && off + len <= madt.len(), "MADT entry at {off}");
        if kind == 0 {
            assert_eq!(len, 8);
            assert_eq!(madt[off + 2], madt[off + 3], "UID = APIC ID");
            cpus.push((madt[off + 3], u32_at(madt, off + 4)));
        }
        off += len;
    }
    assert_eq!(cpus.len(), cfg.max_cpus as usize, "MADT CPUs");
    for (i, &(id, flags)) in cpus.iter().enumerate() {
        assert_eq!(usize::from(id), i);
        let want = if (i as u32) < cfg.boot_cpus { 1 } else { 2 };
        assert_eq!(flags, want, "MADT flags of CPU {i}");
    }

    // DSDT: a device per possible CPU and per memory slot, no more.
    let has = |name: &str| dsdt.windows(name.len()).any(|w| w == name.as_bytes());
    let cpu_name = |cpu: u32| format!("C{cpu:03X}");
    let mem_name = |slot: usize| format!("M{slot:03}");
    assert!(
        has(&cpu_name(0)) && has(&cpu_name(cfg.max_cpus - 1)),
        "CPU devices"
    );
    assert!(!has(&cpu_name(cfg.max_cpus)), "CPU device past max_cpus");
    if cfg.memory_slots > 0 {
        assert!(has(&mem_name(cfg.memory_slots - 1)), "memory devices");
    }
    assert!(
        !has(&mem_name(cfg.memory_slots)),
        "memory device past the slots"
    );
    assert_eq!(has("QEMU0001"), cfg.pvpanic, "pvpanic");
    assert_eq!(
        has("LNRO0005"),
        cfg.virtio_devices > 0,
        "virtio-mmio devices"
    );
}

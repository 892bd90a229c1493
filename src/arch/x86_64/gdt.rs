//! Boot-time global descriptor tables and their translation into KVM segment registers.
//!
//! A descriptor is built from a 16-bit "flags" word laid out like bits 40..55 of the
//! descriptor itself (type in bits 0..3, S bit 4, DPL bits 5..6, P bit 7, AVL bit 12, L bit 13,
//! D/B bit 14, G bit 15; bits 8..11 are ignored because they hold limit bits 16..19).

use kvm_bindings::kvm_segment;

/// Selector of the code segment in both boot GDTs.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment (DS, ES, FS, GS, SS) in both boot GDTs.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the task-state segment (TR) in both boot GDTs.
pub const TSS_SELECTOR: u16 = 0x18;

/// Flags word bits 8..11 overlap the limit bits 16..19 and are masked out.
const FLAGS_MASK: u64 = 0xf0ff;

/// Encodes a segment descriptor from its flags word, 32-bit base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | (((flags as u64) & FLAGS_MASK) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Base address stored in a descriptor.
pub const fn entry_base(entry: u64) -> u64 {
    ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff)
}

/// Limit of a descriptor in bytes (scaled to 4 KiB granularity when G is set).
pub const fn entry_limit(entry: u64) -> u32 {
    let raw = (((entry >> 32) & 0x000f_0000) | (entry & 0x0000_ffff)) as u32;
    if (entry >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// Builds the KVM segment register that loading `entry` through `selector` would produce.
///
/// A non-present descriptor gives an unusable segment, as the CPU would report it.
pub fn kvm_segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let present = bit(47);
    kvm_segment {
        base: entry_base(entry),
        limit: entry_limit(entry),
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// GDT for the Linux 64-bit boot protocol: null, 64-bit code (L=1), flat data, busy 64-bit TSS.
pub const LINUX64_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// GDT for the PVH entry: null, flat 32-bit code, flat data, busy 32-bit TSS (base 0, limit 0x67).
pub const PVH_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// Serializes a GDT into the little-endian bytes written to guest memory.
pub fn gdt_bytes(gdt: &[u64]) -> Vec<u8> {
    gdt.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// The code, data and TSS segments of `gdt` (indices 1, 2, 3) as KVM segment registers.
pub fn boot_segments(gdt: &[u64; 4]) -> (kvm_segment, kvm_segment, kvm_segment) {
    (
        kvm_segment_from_gdt(gdt[1], CODE_SELECTOR),
        kvm_segment_from_gdt(gdt[2], DATA_SELECTOR),
        kvm_segment_from_gdt(gdt[3], TSS_SELECTOR),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux64_gdt_exact_values() {
        assert_eq!(LINUX64_GDT[0], 0);
        assert_eq!(LINUX64_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(LINUX64_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(LINUX64_GDT[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn pvh_gdt_exact_values() {
        assert_eq!(PVH_GDT[0], 0);
        assert_eq!(PVH_GDT[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(PVH_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(PVH_GDT[3], 0x0000_8b00_0000_0067);
    }

    #[test]
    fn gdt_bytes_are_little_endian() {
        let bytes = gdt_bytes(&LINUX64_GDT);
        assert_eq!(bytes.len(), 32);
        assert_eq!(&bytes[0..8], &[0; 8]);
        assert_eq!(
            &bytes[8..16],
            &[0xff, 0xff, 0x00, 0x00, 0x00, 0x9b, 0xaf, 0x00]
        );
        assert_eq!(
            &bytes[16..24],
            &[0xff, 0xff, 0x00, 0x00, 0x00, 0x93, 0xcf, 0x00]
        );
        assert_eq!(
            &bytes[24..32],
            &[0xff, 0xff, 0x00, 0x00, 0x00, 0x8b, 0x8f, 0x00]
        );
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        assert_eq!(entry_base(e), 0x1234_5678);
        assert_eq!(entry_limit(e), 0xabcde);
        let g = gdt_entry(0x8093, 0xfedc_ba98, 0x12345);
        assert_eq!(entry_base(g), 0xfedc_ba98);
        assert_eq!(entry_limit(g), 0x1234_5fff);
    }

    #[test]
    fn limit_bits_in_flags_are_ignored() {
        assert_eq!(gdt_entry(0xaf9b, 0, 0xfffff), gdt_entry(0xa09b, 0, 0xfffff));
    }

    #[test]
    fn linux64_segments() {
        let (cs, ds, tr) = boot_segments(&LINUX64_GDT);
        assert_eq!(
            (cs.selector, cs.type_, cs.s, cs.l, cs.db, cs.g, cs.present),
            (0x08, 0xb, 1, 1, 0, 1, 1)
        );
        assert_eq!(
            (cs.base, cs.limit, cs.dpl, cs.unusable),
            (0, 0xffff_ffff, 0, 0)
        );
        assert_eq!(
            (ds.selector, ds.type_, ds.s, ds.l, ds.db, ds.g, ds.present),
            (0x10, 0x3, 1, 0, 1, 1, 1)
        );
        assert_eq!(ds.limit, 0xffff_ffff);
        assert_eq!(
            (tr.selector, tr.type_, tr.s, tr.present, tr.g),
            (0x18, 0xb, 0, 1, 1)
        );
    }

    #[test]
    fn pvh_segments() {
        let (cs, ds, tr) = boot_segments(&PVH_GDT);
        assert_eq!((cs.l, cs.db, cs.g, cs.limit), (0, 1, 1, 0xffff_ffff));
        assert_eq!(cs.type_, 0xb);
        assert_eq!((ds.db, ds.limit, ds.type_), (1, 0xffff_ffff, 0x3));
        assert_eq!(
            (tr.type_, tr.limit, tr.base, tr.g, tr.s),
            (0xb, 0x67, 0, 0, 0)
        );
    }

    #[test]
    fn null_entry_is_unusable() {
        let s = kvm_segment_from_gdt(0, 0);
        assert_eq!((s.present, s.unusable), (0, 1));
    }
}

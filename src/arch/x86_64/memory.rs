//! Guest RAM placement: the boot RAM regions, the memory hotplug window and the E820 map.
//!
//! Everything here is pure arithmetic on [`super::layout`] constants, so it can be tested
//! without KVM. Boot RAM fills guest-physical space from 0 up to the 32-bit MMIO hole and
//! continues at 4 GiB; the hotplug window follows it and is never reported in E820.

use std::ops::Range;

use vm_memory::GuestAddress;

use super::layout::{
    EBDA_START, FIRST_ADDR_PAST_32BITS, HIMEM_START, MEMORY_HOTPLUG_ALIGN, MMIO_HOLE_START,
};

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory (not to be used by the guest).
pub const E820_RESERVED: u32 = 2;

/// One entry of the E820 memory map handed to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest-physical start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Entry type: [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// End (exclusive) of the boot RAM below 4 GiB: `min(size, MMIO_HOLE_START)`.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// Bytes of boot RAM placed above 4 GiB (0 when everything fits below the MMIO hole).
fn high_ram_size(size: u64) -> u64 {
    size.saturating_sub(MMIO_HOLE_START)
}

/// Guest RAM regions for `size` bytes of boot RAM: [0, min(size, MMIO_HOLE_START)) and, if larger,
/// the rest from FIRST_ADDR_PAST_32BITS. Returns (start, len) pairs.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let mut regions = Vec::with_capacity(2);
    let low = low_ram_end(size);
    if low > 0 {
        regions.push((GuestAddress(0), low as usize));
    }
    let high = high_ram_size(size);
    if high > 0 {
        regions.push((GuestAddress(FIRST_ADDR_PAST_32BITS), high as usize));
    }
    regions
}

/// End (exclusive) of boot RAM in guest-physical space.
pub fn ram_end(size: u64) -> u64 {
    match high_ram_size(size) {
        0 => size,
        high => FIRST_ADDR_PAST_32BITS.saturating_add(high),
    }
}

/// Rounds `value` up to a multiple of `align` (a power of two), saturating at the top of u64.
fn align_up(value: u64, align: u64) -> u64 {
    match value.checked_add(align - 1) {
        Some(v) => v & !(align - 1),
        None => !(align - 1),
    }
}

/// The memory hotplug window: starts at max(4 GiB, ram_end(size) aligned up to
/// MEMORY_HOTPLUG_ALIGN), len hotplug_size.
pub fn hotplug_window(size: u64, hotplug_size: u64) -> Range<u64> {
    let start = FIRST_ADDR_PAST_32BITS.max(align_up(ram_end(size), MEMORY_HOTPLUG_ALIGN));
    start..start.saturating_add(hotplug_size)
}

/// E820 map: RAM [0, EBDA_START), reserved [EBDA_START, HIMEM_START) (holds the ACPI tables),
/// RAM [HIMEM_START, low end), RAM above 4 GiB if any. The hotplug window is never listed.
///
/// Entries are clipped to the RAM that exists, so a (degenerate) boot RAM smaller than 1 MiB
/// yields a shorter map.
pub fn e820_entries(size: u64) -> Vec<E820Entry> {
    let low = low_ram_end(size);
    let mut entries = Vec::with_capacity(4);
    let mut push = |start: u64, end: u64, kind: u32| {
        if end > start {
            entries.push(E820Entry {
                addr: start,
                size: end - start,
                kind,
            });
        }
    };
    push(0, low.min(EBDA_START), E820_RAM);
    push(EBDA_START, low.min(HIMEM_START), E820_RESERVED);
    push(HIMEM_START, low, E820_RAM);
    let high = high_ram_size(size);
    push(
        FIRST_ADDR_PAST_32BITS,
        FIRST_ADDR_PAST_32BITS.saturating_add(high),
        E820_RAM,
    );
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn regions_512m() {
        assert_eq!(
            ram_regions(512 * MIB),
            vec![(GuestAddress(0), (512 * MIB) as usize)]
        );
        assert_eq!(ram_end(512 * MIB), 512 * MIB);
        assert_eq!(low_ram_end(512 * MIB), 512 * MIB);
    }

    #[test]
    fn regions_3g_exactly_fill_low_memory() {
        assert_eq!(
            ram_regions(3 * GIB),
            vec![(GuestAddress(0), (3 * GIB) as usize)]
        );
        assert_eq!(ram_end(3 * GIB), 3 * GIB);
    }

    #[test]
    fn regions_3g_plus_one_spill_above_4g() {
        assert_eq!(
            ram_regions(3 * GIB + 1),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), 1)
            ]
        );
        assert_eq!(ram_end(3 * GIB + 1), 4 * GIB + 1);
    }

    #[test]
    fn regions_8g() {
        assert_eq!(
            ram_regions(8 * GIB),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (5 * GIB) as usize)
            ]
        );
        assert_eq!(ram_end(8 * GIB), 9 * GIB);
        assert_eq!(low_ram_end(8 * GIB), 3 * GIB);
    }

    #[test]
    fn regions_zero() {
        assert!(ram_regions(0).is_empty());
        assert_eq!(ram_end(0), 0);
    }

    #[test]
    fn window_starts_at_4g_for_small_ram() {
        assert_eq!(hotplug_window(512 * MIB, 2 * GIB), 4 * GIB..6 * GIB);
        assert_eq!(
            hotplug_window(3 * GIB, 128 * MIB),
            4 * GIB..4 * GIB + 128 * MIB
        );
        assert_eq!(hotplug_window(512 * MIB, 0), 4 * GIB..4 * GIB);
    }

    #[test]
    fn window_follows_aligned_ram_end_for_large_ram() {
        // 8 GiB of boot RAM ends at 9 GiB, already 128 MiB aligned.
        assert_eq!(hotplug_window(8 * GIB, GIB), 9 * GIB..10 * GIB);
        // 3 GiB + 1 byte ends at 4 GiB + 1: the window starts at the next 128 MiB boundary.
        assert_eq!(
            hotplug_window(3 * GIB + 1, GIB),
            4 * GIB + 128 * MIB..5 * GIB + 128 * MIB
        );
        // 3 GiB + 200 MiB ends at 4 GiB + 200 MiB -> 4 GiB + 256 MiB.
        let w = hotplug_window(3 * GIB + 200 * MIB, 256 * MIB);
        assert_eq!(w.start, 4 * GIB + 256 * MIB);
        assert_eq!(w.end - w.start, 256 * MIB);
        assert_eq!(w.start % MEMORY_HOTPLUG_ALIGN, 0);
    }

    #[test]
    fn window_never_overlaps_boot_ram() {
        for size in [
            MIB,
            512 * MIB,
            3 * GIB - 1,
            3 * GIB,
            3 * GIB + 1,
            8 * GIB + 5,
        ] {
            let w = hotplug_window(size, GIB);
            assert!(w.start >= ram_end(size), "size {size:#x}");
            assert!(w.start >= FIRST_ADDR_PAST_32BITS);
        }
    }

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry {
            addr,
            size,
            kind: E820_RAM,
        }
    }

    fn reserved(addr: u64, size: u64) -> E820Entry {
        E820Entry {
            addr,
            size,
            kind: E820_RESERVED,
        }
    }

    #[test]
    fn e820_512m() {
        assert_eq!(
            e820_entries(512 * MIB),
            vec![
                ram(0, EBDA_START),
                reserved(EBDA_START, HIMEM_START - EBDA_START),
                ram(HIMEM_START, 512 * MIB - HIMEM_START),
            ]
        );
    }

    #[test]
    fn e820_8g_has_high_ram_and_no_window() {
        assert_eq!(
            e820_entries(8 * GIB),
            vec![
                ram(0, 0x9fc00),
                reserved(0x9fc00, 0x10_0000 - 0x9fc00),
                ram(0x10_0000, 3 * GIB - 0x10_0000),
                ram(4 * GIB, 5 * GIB),
            ]
        );
    }

    #[test]
    fn e820_3g_and_3g_plus_one() {
        assert_eq!(e820_entries(3 * GIB).len(), 3);
        let e = e820_entries(3 * GIB + 1);
        assert_eq!(e.len(), 4);
        assert_eq!(e[3], ram(4 * GIB, 1));
    }

    #[test]
    fn e820_covers_acpi_area_as_reserved() {
        let e = e820_entries(256 * MIB);
        let acpi = super::super::layout::ACPI_START;
        let r = e
            .iter()
            .find(|e| e.addr <= acpi && acpi < e.addr + e.size)
            .expect("ACPI area listed");
        assert_eq!(r.kind, E820_RESERVED);
        assert!(r.addr + r.size >= super::super::layout::ACPI_END);
    }

    #[test]
    fn e820_entries_are_sorted_and_disjoint() {
        for size in [2 * MIB, 512 * MIB, 3 * GIB + 1, 8 * GIB] {
            let e = e820_entries(size);
            for pair in e.windows(2) {
                assert!(pair[0].addr + pair[0].size <= pair[1].addr);
            }
            let ram_total: u64 = e
                .iter()
                .filter(|e| e.kind == E820_RAM)
                .map(|e| e.size)
                .sum();
            assert_eq!(ram_total, size - (HIMEM_START - EBDA_START));
        }
    }
}

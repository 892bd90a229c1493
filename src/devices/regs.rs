//! Helpers for register blocks that tolerate accesses of any width.
//!
//! ACPI AML reaches a register block through fields whose access width differs per field (byte
//! for flag bits, dword for selectors and data). Rather than rejecting unexpected widths, the
//! hotplug controllers treat an access as covering a byte range: reads copy the covered bytes of
//! a little-endian register image, and writes merge the covered bytes into each register they
//! overlap.

/// Fills `data` with the bytes of `image` starting at `offset`; bytes past the image read as 0.
pub(crate) fn read_image(image: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = offset
            .checked_add(i as u64)
            .and_then(|addr| usize::try_from(addr).ok())
            .and_then(|addr| image.get(addr).copied())
            .unwrap_or(0);
    }
}

/// If the write of `data` at `offset` overlaps the register at `reg_off..reg_off + width`
/// (`width` <= 4), returns `old` with the covered bytes replaced (little-endian); otherwise None.
pub(crate) fn merge_write(
    old: u32,
    reg_off: u64,
    width: u64,
    offset: u64,
    data: &[u8],
) -> Option<u32> {
    let mut value = old;
    let mut touched = false;
    for (i, &byte) in data.iter().enumerate() {
        let Some(addr) = offset.checked_add(i as u64) else {
            break;
        };
        if addr >= reg_off && addr - reg_off < width.min(4) {
            let shift = 8 * (addr - reg_off);
            value = (value & !(0xff << shift)) | (u32::from(byte) << shift);
            touched = true;
        }
    }
    touched.then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_image_copies_and_zero_fills() {
        let image = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_image(&image, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_image(&image, u64::MAX, &mut data);
        assert_eq!(data, [0, 0, 0, 0]);
    }

    #[test]
    fn merge_write_replaces_covered_bytes_only() {
        assert_eq!(
            merge_write(0x1122_3344, 0, 4, 0, &[0xaa, 0xbb, 0xcc, 0xdd]),
            Some(0xddcc_bbaa)
        );
        assert_eq!(
            merge_write(0x1122_3344, 0, 4, 1, &[0xaa]),
            Some(0x1122_aa44)
        );
        // A write starting before the register covers its low bytes.
        assert_eq!(merge_write(0, 4, 1, 3, &[0x11, 0x22]), Some(0x22));
        assert_eq!(merge_write(7, 8, 4, 0, &[1, 2, 3, 4]), None);
    }
}

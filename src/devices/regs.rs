//! Helpers for register blocks that tolerate accesses of any width.
//!
//! ACPI AML reaches a register block through fields whose access width differs per field (byte
//! for flag bits, dword for selectors and data). Rather than rejecting unexpected widths, the
//! hotplug controllers treat an access as covering a byte range: reads copy the covered bytes of
//! a little-endian register image, and writes merge the covered bytes into each register they
//! overlap.
//!
//! Each controller also lists its registers as [`Field`]s: the ACPI tables build their
//! `Field` declarations from these lists, so the AML and the device model share one set of
//! offsets (and tests beside each device drive it through its own list).

/// Fills `data` with the bytes of `image` starting at `offset`; bytes past the image read as 0.
pub fn read_image(image: &[u8], offset: u64, data: &mut [u8]) {
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
pub fn merge_write(
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

/// One named register field as the guest's AML reaches it: `bits` bits starting at bit `bit`
/// of the byte at `offset` of the register block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// The four-character AML name.
    pub name: [u8; 4],
    /// Byte offset in the register block.
    pub offset: u64,
    /// First bit within that byte.
    pub bit: u8,
    /// Width in bits.
    pub bits: u8,
}

impl Field {
    /// A whole register of `bits` bits at `offset`.
    pub const fn reg(name: [u8; 4], offset: u64, bits: u8) -> Field {
        Field {
            name,
            offset,
            bit: 0,
            bits,
        }
    }

    /// The one-bit flag `mask` of the byte at `offset`.
    pub const fn flag(name: [u8; 4], offset: u64, mask: u8) -> Field {
        Field {
            name,
            offset,
            bit: mask.trailing_zeros() as u8,
            bits: 1,
        }
    }

    /// Position of the first bit from the start of the block.
    pub const fn start_bit(&self) -> u64 {
        self.offset * 8 + self.bit as u64
    }

    /// Position just past the last bit.
    pub const fn end_bit(&self) -> u64 {
        self.start_bit() + self.bits as u64
    }
}

/// Checks that `fields` are in ascending order, do not overlap and lie within `size` bytes.
#[cfg(test)]
pub fn assert_fields_fit(fields: &[Field], size: usize) {
    let mut end = 0;
    for f in fields {
        assert!(
            f.start_bit() >= end,
            "field {:?} overlaps its predecessor",
            f.name
        );
        end = f.end_bit();
    }
    assert!(
        end <= size as u64 * 8,
        "fields end past the {size}-byte block"
    );
}

/// Reads field `name` of `fields` from `dev` as AML would: the bytes it covers, then its bits.
#[cfg(test)]
pub fn aml_read(dev: &mut dyn super::BusDevice, fields: &[Field], name: &[u8; 4]) -> u64 {
    let f = find_field(fields, name);
    let len = (f.end_bit() - f.offset * 8).div_ceil(8) as usize;
    let mut data = vec![0u8; len];
    dev.read(f.offset, &mut data);
    let mut value = 0u64;
    for (i, b) in data.iter().enumerate() {
        value |= u64::from(*b) << (8 * i);
    }
    (value >> f.bit) & ((1u64 << f.bits) - 1)
}

/// Writes `value` to field `name` of `fields` as AML would with `WriteAsZeroes`: the bytes the
/// field covers, other bits zero.
#[cfg(test)]
pub fn aml_write(
    dev: &mut dyn super::BusDevice,
    fields: &[Field],
    name: &[u8; 4],
    value: u64,
) -> super::DeviceEvent {
    let f = find_field(fields, name);
    let len = (f.end_bit() - f.offset * 8).div_ceil(8) as usize;
    let bytes = (value << f.bit).to_le_bytes();
    dev.write(f.offset, &bytes[..len])
}

#[cfg(test)]
fn find_field(fields: &[Field], name: &[u8; 4]) -> Field {
    *fields
        .iter()
        .find(|f| &f.name == name)
        .unwrap_or_else(|| panic!("no field {}", String::from_utf8_lossy(name)))
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

    #[test]
    fn fields_know_their_bit_positions() {
        let f = Field::flag(*b"TEST", 4, 1 << 3);
        assert_eq!((f.bit, f.bits, f.start_bit(), f.end_bit()), (3, 1, 35, 36));
        let r = Field::reg(*b"REGS", 8, 32);
        assert_eq!((r.start_bit(), r.end_bit()), (64, 96));
        assert_fields_fit(&[f, r], 12);
    }
}

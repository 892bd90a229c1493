//! The reset-vector stub: the only "firmware" a minivmm guest has.
//!
//! Linux's `BOOT_BIOS` reboot path switches the CPU back to real mode and jumps to `F000:FFF0`,
//! where a PC's BIOS would restart the machine. Linux 6.x takes that path by default on a
//! hardware-reduced ACPI platform without EFI (it first picks `reboot=efi`, which falls back to
//! `bios`), and for `reboot=bios` / `reboot=efi`. Without code there the vCPU executes zeroed RAM
//! forever and the VMM never learns about the reboot. The stub writes the ACPI reset value to the
//! ACPI reset register, which minivmm handles as a reset like every other path.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{ports, ACPI_RESET_VALUE, RESET_VECTOR, RESET_VECTOR_SIZE};

/// The 16-bit real-mode code placed at [`RESET_VECTOR`].
///
/// ```text
/// mov dx, ACPI_RESET      ; BA lo hi
/// mov al, ACPI_RESET_VALUE; B0 v
/// out dx, al              ; EE
/// cli                     ; FA
/// hlt                     ; F4       (never reached: the reset stops this vCPU)
/// jmp $-1                 ; EB FD    (back to hlt)
/// ```
pub fn reset_vector_stub() -> [u8; 10] {
    let [lo, hi] = ports::ACPI_RESET.to_le_bytes();
    [
        0xba,
        lo,
        hi,
        0xb0,
        ACPI_RESET_VALUE,
        0xee,
        0xfa,
        0xf4,
        0xeb,
        0xfd,
    ]
}

/// Whether a vCPU executing at `rip` (with a real-mode CS base of `0xF0000`, or flat) is inside
/// the stub: a reset requested from there came through the BIOS reboot path.
pub fn in_reset_vector_stub(cs_base: u64, rip: u64) -> bool {
    let linear = cs_base.wrapping_add(rip);
    (RESET_VECTOR..RESET_VECTOR + RESET_VECTOR_SIZE).contains(&linear)
}

/// Writes the stub at [`RESET_VECTOR`].
pub fn write_reset_vector_stub(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    mem.write_slice(&reset_vector_stub(), GuestAddress(RESET_VECTOR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_writes_the_acpi_reset_value_to_the_reset_port() {
        let code = reset_vector_stub();
        assert!(code.len() as u64 <= RESET_VECTOR_SIZE);
        // mov dx, imm16
        assert_eq!(code[0], 0xba);
        assert_eq!(u16::from_le_bytes([code[1], code[2]]), ports::ACPI_RESET);
        // mov al, imm8; out dx, al
        assert_eq!(&code[3..6], &[0xb0, ACPI_RESET_VALUE, 0xee]);
        // A jmp rel8 of -3 from the end of the stub lands on the hlt.
        let hlt = code.iter().position(|&b| b == 0xf4).unwrap();
        assert_eq!(code[code.len() - 2], 0xeb);
        let target = code.len() as i64 + i64::from(code[code.len() - 1] as i8);
        assert_eq!(target, hlt as i64);
    }

    #[test]
    fn the_stub_is_reported_where_real_mode_reaches_it() {
        assert!(in_reset_vector_stub(0xf0000, 0xfff5));
        assert!(in_reset_vector_stub(0, RESET_VECTOR));
        assert!(!in_reset_vector_stub(0, 0x10_0000));
        assert!(!in_reset_vector_stub(0xf0000, 0xffe0));
    }

    #[test]
    fn stub_lands_in_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write_reset_vector_stub(&mem).unwrap();
        let mut back = [0u8; 10];
        mem.read_slice(&mut back, GuestAddress(RESET_VECTOR))
            .unwrap();
        assert_eq!(back, reset_vector_stub());
    }
}

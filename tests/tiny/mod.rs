//! Tiny freestanding PVH guests: a 64-bit ELF with a Xen PVH entry note around a few bytes of
//! 32-bit code. Shared by tests/tiny_guest.rs and benches/startup.rs.

#![allow(dead_code)]

/// Guest-physical load address (and PVH entry point) of the code.
pub const LOAD_ADDR: u32 = 0x10_0000;

/// Builds a 64-bit ELF with one PT_LOAD of `code` at 1 MiB and a Xen PVH entry note.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let ehdr_size = 64u64;
    let phdr_size = 56u64;
    let note_off = ehdr_size + 2 * phdr_size;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz ("Xen\0")
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&LOAD_ADDR.to_le_bytes());
    let code_off = (note_off + note.len() as u64 + 15) & !15;

    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&u64::from(LOAD_ADDR).to_le_bytes()); // e_entry
    f.extend_from_slice(&ehdr_size.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // flags
    f.extend_from_slice(&(ehdr_size as u16).to_le_bytes());
    f.extend_from_slice(&(phdr_size as u16).to_le_bytes());
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    // (PT_NOTE is 4-aligned like Linux's: readers such as QEMU's pad the note name to p_align.)
    let phdr = |f: &mut Vec<u8>, kind: u32, flags: u32, off: u64, addr: u64, size: u64| {
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&flags.to_le_bytes());
        f.extend_from_slice(&off.to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes());
        f.extend_from_slice(&size.to_le_bytes());
        f.extend_from_slice(&size.to_le_bytes());
        f.extend_from_slice(&(if kind == 4 { 4u64 } else { 16 }).to_le_bytes());
    };
    phdr(
        &mut f,
        1,
        7,
        code_off,
        u64::from(LOAD_ADDR),
        code.len() as u64,
    ); // PT_LOAD
    phdr(&mut f, 4, 4, note_off, 0, note.len() as u64); // PT_NOTE
    f.extend_from_slice(&note);
    f.resize(code_off as usize, 0);
    f.extend_from_slice(code);
    f
}

/// 32-bit code: print the NUL-terminated string that follows the code on COM1, then run `tail`.
pub fn print_then(msg: &str, tail: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    let msg_at_patch = c.len() + 1;
    c.extend_from_slice(&[0xbe, 0, 0, 0, 0]); // mov esi, msg
    c.extend_from_slice(&[0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]); // lodsb; test; jz; out; jmp
    c.extend_from_slice(tail);
    let msg_addr = LOAD_ADDR + c.len() as u32;
    c[msg_at_patch..msg_at_patch + 4].copy_from_slice(&msg_addr.to_le_bytes());
    c.extend_from_slice(msg.as_bytes());
    c.push(0);
    c
}

/// 32-bit code that plays a cooperative guest's part of memory hotplug by polling the memory
/// hotplug controller at 0xfeb0_0200 (no interrupts, no ACPI): it selects the next slot with an
/// event (MNEV), acknowledges an insert, and acknowledges and ejects a slot being removed.
///
/// ```text
///        mov ebx, 0xfeb00200
/// scan:  mov dword [ebx], 0        ; MSEL = 0
///        mov eax, [ebx+0x18]       ; MNEV: next slot with an event (the slot count if none)
///        mov [ebx], eax            ; select it
///        mov cl, [ebx+0x14]        ; its flags
///        test cl, 4                ; removing?
///        jz ins
///        mov byte [ebx+0x14], 0xc  ; ack the remove event and eject
///        jmp scan
/// ins:   mov byte [ebx+0x14], 2    ; ack an insert (ignored past the last slot)
///        jmp scan
/// ```
pub const EJECTING_GUEST: &[u8] = &[
    0xbb, 0x00, 0x02, 0xb0, 0xfe, // mov ebx, 0xfeb00200
    0xc7, 0x03, 0, 0, 0, 0, // mov dword [ebx], 0
    0x8b, 0x43, 0x18, // mov eax, [ebx+0x18]
    0x89, 0x03, // mov [ebx], eax
    0x8a, 0x4b, 0x14, // mov cl, [ebx+0x14]
    0xf6, 0xc1, 0x04, // test cl, 4
    0x74, 0x06, // jz ins
    0xc6, 0x43, 0x14, 0x0c, // mov byte [ebx+0x14], 0xc
    0xeb, 0xe7, // jmp scan
    0xc6, 0x43, 0x14, 0x02, // ins: mov byte [ebx+0x14], 2
    0xeb, 0xe1, // jmp scan
];

/// Writes 0x34 (SLP_TYP 5 | SLP_EN) to the ACPI sleep control port: S5.
pub const POWER_OFF: &[u8] = &[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd];
/// Writes 1 to the ACPI reset port.
pub const RESET: &[u8] = &[0x66, 0xba, 0x02, 0x06, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd];
/// Writes the i8042 pulse-reset command 0xFE to port 0x64 (Linux `reboot=kbd`).
pub const KBD_RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];
/// Writes 0x02 then 0x0E to the reset control register 0xCF9, as Linux `reboot=pci` does.
pub const CF9_RESET: &[u8] = &[
    0x66, 0xba, 0xf9, 0x0c, 0xb0, 0x02, 0xee, 0xb0, 0x0e, 0xee, 0xf4, 0xeb, 0xfd,
];
/// `ud2` with no IDT: the exception cannot be delivered and the vCPU triple-faults.
pub const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];

/// Echo loop: copy COM1 input to COM1 output until a '!' arrives, then power off.
pub fn echo_until_bang() -> Vec<u8> {
    let mut c = vec![
        0x66, 0xba, 0xfd, 0x03, // wait: mov dx, 0x3fd (LSR)
        0xec, // in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0xf8, // jz wait (-8)
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx
        0xee, // out dx, al
        0x3c, b'!', // cmp al, '!'
        0x75, 0xed, // jne wait (-19)
    ];
    c.extend_from_slice(POWER_OFF);
    c
}

/// Writes byte `value` to I/O port `port`, then halts (forever if the write does not stop the VM).
pub fn out_byte_then_halt(port: u16, value: u8) -> Vec<u8> {
    let [lo, hi] = port.to_le_bytes();
    vec![0x66, 0xba, lo, hi, 0xb0, value, 0xee, 0xf4, 0xeb, 0xfd]
}

/// Writes 16-bit `value` to I/O port `port` (`out dx, ax`), then halts.
pub fn out_word_then_halt(port: u16, value: u16) -> Vec<u8> {
    let [lo, hi] = port.to_le_bytes();
    let [vlo, vhi] = value.to_le_bytes();
    vec![
        0x66, 0xba, lo, hi, 0x66, 0xb8, vlo, vhi, 0x66, 0xef, 0xf4, 0xeb, 0xfd,
    ]
}

/// Writes byte `value` to I/O port `port` and falls through to the code that follows.
pub fn out_byte(port: u16, value: u8) -> Vec<u8> {
    let mut c = out_byte_then_halt(port, value);
    c.truncate(7);
    c
}

/// Halts forever (interrupts are off at the PVH entry, so nothing wakes the vCPU).
pub const HALT_FOREVER: &[u8] = &[0xf4, 0xeb, 0xfd];

/// Writes 0x11223344 to IA32_LSTAR (what a kernel does when it brings a CPU up), reads it back
/// and writes the low byte it read (0x44 if the write took effect) to the exit device at 0x501.
pub const LSTAR_ROUND_TRIP: &[u8] = &[
    0xb9, 0x82, 0x00, 0x00, 0xc0, // mov ecx, 0xc0000082 (IA32_LSTAR)
    0xb8, 0x44, 0x33, 0x22, 0x11, // mov eax, 0x11223344
    0xba, 0x00, 0x00, 0x00, 0x00, // mov edx, 0
    0x0f, 0x30, // wrmsr
    0x31, 0xc0, // xor eax, eax
    0x0f, 0x32, // rdmsr
    0x66, 0xba, 0x01, 0x05, // mov dx, 0x501
    0xee, // out dx, al
    0xf4, 0xeb, 0xfd, // hlt loop
];

/// Writes a non-canonical address to IA32_LSTAR with no IDT: the #GP it must raise cannot be
/// delivered, so the vCPU triple-faults (a reset). Without the #GP it would go on to the exit
/// device write (0x501 = 0x44).
pub const LSTAR_NON_CANONICAL: &[u8] = &[
    0xb9, 0x82, 0x00, 0x00, 0xc0, // mov ecx, 0xc0000082 (IA32_LSTAR)
    0xb8, 0x00, 0x00, 0x00, 0x00, // mov eax, 0
    0xba, 0x00, 0x00, 0x00, 0x80, // mov edx, 0x80000000 (address 0x8000_0000_0000_0000)
    0x0f, 0x30, // wrmsr
    0x66, 0xba, 0x01, 0x05, // mov dx, 0x501
    0xb0, 0x44, // mov al, 0x44
    0xee, // out dx, al
    0xf4, 0xeb, 0xfd, // hlt loop
];

/// A hostile guest (`tests/tiny/hostile.S`): random-width reads and writes of random values at
/// every port and platform MMIO register minivmm emulates, forever, on one vCPU. Rebuild with
/// `as --32 -o h.o tests/tiny/hostile.S && ld -m elf_i386 -Ttext=0x100000 -o h.elf h.o &&
/// objcopy -O binary -j .text h.elf h.bin` (it is linked at [`LOAD_ADDR`]).
pub const HOSTILE: &[u8] = &[
    0x0f, 0x31, 0x89, 0xc3, 0x83, 0xcb, 0x01, 0x89, 0xd8, 0xc1, 0xe0, 0x0d, 0x31, 0xc3, 0x89, 0xd8,
    0xc1, 0xe8, 0x11, 0x31, 0xc3, 0x89, 0xd8, 0xc1, 0xe0, 0x05, 0x31, 0xc3, 0x89, 0xd9, 0xc1, 0xe9,
    0x1c, 0x83, 0xf9, 0x0c, 0x0f, 0x83, 0x85, 0x00, 0x00, 0x00, 0x89, 0xda, 0xc1, 0xea, 0x08, 0x83,
    0xe2, 0x0f, 0x0f, 0xb7, 0x14, 0x55, 0xf3, 0x00, 0x10, 0x00, 0x89, 0xd8, 0x66, 0x81, 0xfa, 0x00,
    0x06, 0x75, 0x02, 0x24, 0xdf, 0xf7, 0xc3, 0x00, 0x00, 0xf0, 0x0f, 0x74, 0x1a, 0x66, 0x81, 0xfa,
    0x02, 0x06, 0x75, 0x02, 0x0c, 0x02, 0x66, 0x81, 0xfa, 0xf9, 0x0c, 0x75, 0x02, 0x24, 0xfb, 0x66,
    0x83, 0xfa, 0x64, 0x75, 0x02, 0x24, 0x7f, 0xf7, 0xc1, 0x01, 0x00, 0x00, 0x00, 0x75, 0x1d, 0xf7,
    0xc1, 0x02, 0x00, 0x00, 0x00, 0x75, 0x03, 0xee, 0xeb, 0x8d, 0xf7, 0xc1, 0x04, 0x00, 0x00, 0x00,
    0x75, 0x04, 0x66, 0xef, 0xeb, 0x81, 0xef, 0xe9, 0x7b, 0xff, 0xff, 0xff, 0xf7, 0xc1, 0x02, 0x00,
    0x00, 0x00, 0x75, 0x06, 0xec, 0xe9, 0x6d, 0xff, 0xff, 0xff, 0xf7, 0xc1, 0x04, 0x00, 0x00, 0x00,
    0x75, 0x07, 0x66, 0xed, 0xe9, 0x5e, 0xff, 0xff, 0xff, 0xed, 0xe9, 0x58, 0xff, 0xff, 0xff, 0x89,
    0xdf, 0xc1, 0xef, 0x04, 0x81, 0xe7, 0xff, 0x03, 0x00, 0x00, 0x81, 0xc7, 0x00, 0x00, 0xb0, 0xfe,
    0x89, 0xd8, 0xc1, 0xc0, 0x07, 0x83, 0xf9, 0x0d, 0x74, 0x20, 0x83, 0xf9, 0x0e, 0x74, 0x0c, 0x83,
    0xf9, 0x0f, 0x74, 0x0f, 0x88, 0x07, 0xe9, 0x2c, 0xff, 0xff, 0xff, 0x66, 0x89, 0x07, 0xe9, 0x24,
    0xff, 0xff, 0xff, 0x89, 0x07, 0xe9, 0x1d, 0xff, 0xff, 0xff, 0x8b, 0x07, 0x8a, 0x07, 0xe9, 0x14,
    0xff, 0xff, 0xff, 0xf8, 0x03, 0xf9, 0x03, 0xfa, 0x03, 0xfb, 0x03, 0xfc, 0x03, 0xfd, 0x03, 0xff,
    0x03, 0x70, 0x00, 0x71, 0x00, 0x60, 0x00, 0x64, 0x00, 0x80, 0x00, 0x00, 0x06, 0x01, 0x06, 0x02,
    0x06, 0xf9, 0x0c,
];

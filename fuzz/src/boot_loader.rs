//! The kernel loader.
//!
//! Input: a mode byte, then the image. Mode 0 loads the bytes as they are; mode 1 patches
//! them into a bzImage (boot flag, "HdrS", protocol 2.15, `loadflags` LOADED_HIGH,
//! `xloadflags` XLF_KERNEL_64, `code32_start` 1 MiB where the image leaves them invalid)
//! and mode 2 into an ELF64 header with program headers, so the fuzzer starts past the magic
//! checks.
//!
//! Invariants: [`load_kernel`] returns, never panics; guest memory is 64 MiB surrounded by
//! inaccessible guard pages (a write past it faults); every page the loader wrote lies in
//! what it reports loaded (bzImage: `code32_start..kernel_end`, ELF: the PT_LOAD segments),
//! and the loaded bytes are the image's; a loaded kernel gets its boot data
//! ([`configure_system`]) and a page-aligned initramfs above the kernel, inside RAM.

use std::io::{Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use minivmm::arch::x86_64::boot::{configure_system, load_initramfs, load_kernel, BootProtocol};
use minivmm::arch::x86_64::layout::HIMEM_START;

/// Guest RAM of the loader target.
pub const MEM_SIZE: usize = 64 << 20;
const PAGE: usize = 4096;

/// Guest memory with a guard page below and above, reused across inputs.
struct Guarded {
    base: *mut u8,
    mem: GuestMemoryMmap,
    kernel: std::fs::File,
    initrd: std::fs::File,
}

// SAFETY: the raw pointer names a mapping that lives for the whole process and is only
// used while the `STATE` mutex is held.
unsafe impl Send for Guarded {}

fn memfd(name: &std::ffi::CStr) -> std::fs::File {
    // SAFETY: memfd_create returns a new descriptor we own, or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    unsafe { std::fs::File::from_raw_fd(fd) }
}

impl Guarded {
    fn new() -> Self {
        let total = MEM_SIZE + 2 * PAGE;
        // SAFETY: a fresh anonymous mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        // SAFETY: inside the mapping just made.
        let base = unsafe { (ptr as *mut u8).add(PAGE) };
        // SAFETY: `base..base + MEM_SIZE` lies inside the mapping.
        let rc = unsafe {
            libc::mprotect(
                base as *mut libc::c_void,
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        assert_eq!(rc, 0, "mprotect");
        // SAFETY: the range is mapped read-write, stays mapped for the process's lifetime
        // (this value is leaked in a static) and is used through this region only.
        let region = unsafe {
            MmapRegion::<()>::build_raw(
                base,
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .expect("raw region");
        let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("guest region");
        let mem = GuestMemoryMmap::from_regions(vec![region]).expect("guest memory");
        Guarded {
            base,
            mem,
            kernel: memfd(c"fuzz-kernel"),
            initrd: memfd(c"fuzz-initrd"),
        }
    }

    /// Zeroes guest memory again (drops its pages).
    fn reset(&mut self) {
        // SAFETY: the guest range of our own mapping; MADV_DONTNEED on a private
        // anonymous mapping reads back as zeros.
        let rc = unsafe {
            libc::madvise(
                self.base as *mut libc::c_void,
                MEM_SIZE,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0, "madvise");
    }

    /// Which guest pages are backed (were written).
    fn resident(&self) -> Vec<bool> {
        let mut vec = vec![0u8; MEM_SIZE / PAGE];
        // SAFETY: the range is mapped; `vec` has one byte per page.
        let rc =
            unsafe { libc::mincore(self.base as *mut libc::c_void, MEM_SIZE, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore");
        vec.iter().map(|b| b & 1 != 0).collect()
    }
}

static STATE: std::sync::Mutex<Option<Guarded>> = std::sync::Mutex::new(None);

fn put(image: &mut [u8], off: usize, bytes: &[u8]) {
    if let Some(dst) = image.get_mut(off..off + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Makes `image` a plausible bzImage: magics, a supported protocol and 64-bit entry, and a
/// load address the loader accepts, keeping whatever else the fuzzer chose.
pub fn patch_bzimage(image: &mut Vec<u8>) {
    let setup_sects = image.get(0x1f1).copied().unwrap_or(0) % 8;
    let min = (usize::from(setup_sects.max(4)) + 1) * 512;
    if image.len() < min {
        image.resize(min, 0);
    }
    image[0x1f1] = setup_sects;
    put(image, 0x1fe, &0xaa55u16.to_le_bytes());
    put(image, 0x202, b"HdrS");
    if u16_at(image, 0x206) < 0x020c {
        put(image, 0x206, &0x020fu16.to_le_bytes());
    }
    image[0x211] |= 1; // loadflags: LOADED_HIGH
    if u32_at(image, 0x214) < HIMEM_START as u32 || u32_at(image, 0x214) >= MEM_SIZE as u32 {
        put(image, 0x214, &(HIMEM_START as u32).to_le_bytes());
    }
    image[0x236] |= 1; // xloadflags: XLF_KERNEL_64
}

/// Makes `image` a plausible ELF64 x86-64 executable: a valid identification and header,
/// program headers right after it, and a 64-bit entry above 1 MiB; segments keep the
/// fuzzer's values.
pub fn patch_elf(image: &mut Vec<u8>) {
    if image.len() < 64 {
        image.resize(64, 0);
    }
    put(image, 0, b"\x7fELF\x02\x01\x01");
    put(image, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(image, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(image, 20, &1u32.to_le_bytes());
    let entry = u64_at(image, 24);
    if !(HIMEM_START..MEM_SIZE as u64).contains(&entry) {
        put(image, 24, &(HIMEM_START + entry % 0x10_0000).to_le_bytes());
    }
    put(image, 32, &64u64.to_le_bytes()); // e_phoff
    put(image, 52, &64u16.to_le_bytes()); // e_ehsize
    put(image, 54, &56u16.to_le_bytes()); // e_phentsize
    let phnum = (image.len().saturating_sub(64) / 56).min(8) as u16;
    let phnum = phnum.min(u16_at(image, 56).max(1));
    put(image, 56, &phnum.to_le_bytes());
    for i in 0..usize::from(phnum) {
        let ph = 64 + 56 * i;
        if image.len() < ph + 56 {
            break;
        }
        // Mostly PT_LOAD (1) or PT_NOTE (4) segments that start inside the file and RAM.
        let kind = match image[ph] % 4 {
            0 | 1 => 1,
            2 => 4,
            _ => u32_at(image, ph),
        };
        put(image, ph, &kind.to_le_bytes());
        let len = image.len() as u64;
        let off = u64_at(image, ph + 8) % len;
        put(image, ph + 8, &off.to_le_bytes());
        let paddr = u64_at(image, ph + 24);
        if image[ph + 1] & 1 == 0 {
            put(image, ph + 24, &(paddr % MEM_SIZE as u64).to_le_bytes());
        }
        if image[ph + 1] & 2 == 0 {
            let filesz = u64_at(image, ph + 32) % (len - off + 1);
            put(image, ph + 32, &filesz.to_le_bytes());
            let memsz = u64_at(image, ph + 40);
            put(image, ph + 40, &(filesz + memsz % 0x10_0000).to_le_bytes());
        }
    }
}

/// Byte ranges of the guest the image asks to be written to: (guest address, file offset,
/// length) of each loaded piece.
fn pieces(image: &[u8]) -> Vec<(u64, u64, u64)> {
    if image.starts_with(b"\x7fELF") {
        if image.len() < 64 {
            return Vec::new();
        }
        let phoff = u64_at(image, 32) as usize;
        let phnum = usize::from(u16_at(image, 56));
        (0..phnum)
            .filter_map(|i| {
                let ph = phoff.checked_add(56 * i)?;
                let h = image.get(ph..ph.checked_add(56)?)?;
                (u32_at(h, 0) == 1 && u64_at(h, 32) != 0)
                    .then(|| (u64_at(h, 24), u64_at(h, 8), u64_at(h, 32)))
            })
            .collect()
    } else {
        let sects = image[0x1f1];
        let setup = (u64::from(if sects == 0 { 4 } else { sects }) + 1) * 512;
        let load = u64::from(u32_at(image, 0x214));
        vec![(load, setup, (image.len() as u64).saturating_sub(setup))]
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let (mode, rest) = data.split_first().unwrap_or((&0, &[]));
    let mut image = rest.to_vec();
    match mode % 3 {
        1 => patch_bzimage(&mut image),
        2 => patch_elf(&mut image),
        _ => {}
    }
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let g = state.get_or_insert_with(Guarded::new);
    g.reset();
    g.kernel.set_len(0).unwrap();
    g.kernel.seek(SeekFrom::Start(0)).unwrap();
    g.kernel.write_all(&image).unwrap();

    let result = load_kernel(&g.mem, &mut g.kernel);

    // Only pages inside what the image asks to load were written, loaded or not.
    let is_elf = image.starts_with(b"\x7fELF");
    let pieces = if is_elf || image.len() >= 0x218 {
        pieces(&image)
    } else {
        Vec::new()
    };
    let resident = g.resident();
    for (page, _) in resident.iter().enumerate().filter(|(_, r)| **r) {
        let (start, end) = ((page * PAGE) as u64, ((page + 1) * PAGE) as u64);
        assert!(
            pieces
                .iter()
                .any(|&(addr, _, len)| addr < end && addr.saturating_add(len) > start),
            "page {start:#x} written outside the image's pieces {pieces:x?} ({result:?})"
        );
    }
    let Ok(kernel) = result else {
        return;
    };
    // (An ELF without PT_LOAD segments loads "successfully": nothing to check then.)

    // The loaded bytes are the image's (the last piece to cover a byte wins).
    for &(addr, off, len) in &pieces {
        let later_overlap = pieces
            .iter()
            .skip_while(|p| **p != (addr, off, len))
            .skip(1)
            .any(|&(a, _, l)| a < addr + len && a + l > addr);
        if later_overlap {
            continue;
        }
        let mut buf = vec![0u8; len as usize];
        g.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        let src = &image[off as usize..(off + len) as usize];
        assert!(
            buf == src,
            "piece {addr:#x}+{len:#x} differs from the image"
        );
    }
    match kernel.protocol {
        BootProtocol::Linux64 => assert_eq!(kernel.setup_header.is_none(), is_elf),
        BootProtocol::Pvh => assert!(is_elf, "PVH entry of a bzImage"),
    }
    // kernel_end covers every loaded byte: the initramfs goes above it (an ELF segment
    // smaller in memory than in the file once broke this: fuzz/regressions/boot_loader/).
    for &(addr, _, len) in &pieces {
        assert!(
            kernel.kernel_end >= addr + len,
            "kernel_end {:#x} below the piece {addr:#x}+{len:#x}",
            kernel.kernel_end
        );
    }

    // Boot data and an initramfs fit the loaded kernel.
    configure_system(
        &g.mem,
        &kernel,
        "console=ttyS0 panic=1",
        None,
        MEM_SIZE as u64,
    )
    .unwrap_or_else(|e| panic!("configure_system: {e}"));
    let initrd_len = 1 + usize::from(rest.first().copied().unwrap_or(0)) * 64;
    g.initrd.set_len(initrd_len as u64).unwrap();
    match load_initramfs(&g.mem, &mut g.initrd, &kernel, MEM_SIZE as u64) {
        Ok((addr, len)) => {
            assert_eq!(len, initrd_len);
            assert_eq!(addr.0 % PAGE as u64, 0);
            assert!(addr.0 >= kernel.kernel_end && addr.0 >= HIMEM_START);
            assert!(addr.0 + len as u64 <= MEM_SIZE as u64);
            let end = addr.0 + len as u64;
            assert!(
                !pieces.iter().any(|&(a, _, l)| a < end && a + l > addr.0),
                "initramfs at {addr:#x}+{len:#x} overlaps the kernel {pieces:x?}",
                addr = addr.0
            );
        }
        Err(minivmm::arch::x86_64::boot::BootError::InitramfsTooLarge { .. }) => {}
        Err(e) => panic!("load_initramfs: {e}"),
    }
}

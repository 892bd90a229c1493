//! Loading the guest kernel and initramfs and writing the boot data (zero page or PVH start info).
//!
//! The kernel format is detected from the file contents: an ELF `vmlinux` (booted through its
//! PVH entry when it has one, otherwise through its 64-bit ELF entry) or a bzImage (booted
//! through the 64-bit boot protocol at load address + 0x200).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, RESET_VECTOR, RSDP_START, ZERO_PAGE_START,
};
use super::memory::{e820_entries, low_ram_end, E820Entry};
use super::reset_vector::write_reset_vector_stub;

/// Offset of the setup header in a bzImage file.
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// Offset of the "HdrS" magic in a bzImage file.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
/// "HdrS", the setup header magic.
pub const BZIMAGE_MAGIC: u32 = 0x5372_6448;
/// Boot sector signature stored in `setup_header.boot_flag`.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader` for a loader without an assigned id.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Oldest boot protocol whose 64-bit entry minivmm uses (2.12: `xloadflags`).
pub const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// `xloadflags` bit 0: the kernel has the 64-bit entry at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry from a bzImage's protected-mode load address.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Kernel alignment advertised for images without a setup header (16 MiB).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Magic of `hvm_start_info`.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Page size used to align the initramfs.
const PAGE_SIZE: u64 = 0x1000;
/// Entries in the zero page's E820 table.
const E820_MAX_ZEROPAGE: usize = 128;

/// Errors from loading the guest and writing its boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Reading the kernel file to detect its format failed.
    #[error("reading the kernel image header failed: {0}")]
    ReadKernel(#[source] std::io::Error),
    /// The kernel is neither an ELF nor a bzImage.
    #[error(
        "the kernel is neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" at 0x202)"
    )]
    UnknownKernelFormat,
    /// The bzImage boot protocol predates 2.12.
    #[error("bzImage boot protocol {major}.{minor:02} is too old: 2.12 or later is required")]
    BootProtocolTooOld {
        /// Major protocol version.
        major: u16,
        /// Minor protocol version.
        minor: u16,
    },
    /// The bzImage has no 64-bit entry point.
    #[error("bzImage lacks XLF_KERNEL_64 in xloadflags: it has no 64-bit entry point")]
    NotA64BitKernel,
    /// An ELF kernel whose loadable segments cannot be loaded as they are described.
    #[error("the ELF kernel is malformed: {0}")]
    BadElf(&'static str),
    /// linux-loader failed to place the kernel in guest memory.
    #[error("loading the kernel into guest memory failed: {0}")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// Reading the initramfs failed.
    #[error("reading the initramfs failed: {0}")]
    ReadInitramfs(#[source] std::io::Error),
    /// The initramfs file is empty.
    #[error("the initramfs file is empty")]
    EmptyInitramfs,
    /// The initramfs does not fit between the kernel and the upper limit.
    #[error("initramfs ({size} bytes) does not fit below {limit:#x} above the kernel end {kernel_end:#x}")]
    InitramfsTooLarge {
        /// Size of the initramfs.
        size: u64,
        /// Exclusive upper bound (low RAM end or initrd_addr_max + 1).
        limit: u64,
        /// Lowest usable address (page-aligned end of the kernel).
        kernel_end: u64,
    },
    /// Copying the initramfs into guest memory failed.
    #[error("copying the initramfs into guest memory at {addr:#x} failed: {source}")]
    CopyInitramfs {
        /// Guest address of the initramfs.
        addr: u64,
        /// Underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The command line is too long.
    #[error("kernel command line is {len} bytes; at most {} fit", CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong {
        /// Length without the terminating NUL.
        len: usize,
    },
    /// linux-loader rejected the command line.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line to guest memory failed.
    #[error("writing the kernel command line at {CMDLINE_START:#x} failed: {0}")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// The E820 map does not fit the zero page.
    #[error("the E820 map has {0} entries; the zero page holds at most 128")]
    TooManyE820Entries(usize),
    /// The initramfs is above 4 GiB but the boot data only has 32-bit fields.
    #[error("the initramfs at {0:#x} is out of 32-bit reach")]
    InitramfsAbove4G(u64),
    /// Writing the zero page (Linux boot protocol) failed.
    #[error("writing the zero page at {ZERO_PAGE_START:#x} failed: {0}")]
    WriteZeroPage(#[source] linux_loader::configurator::Error),
    /// Writing the reset-vector stub failed.
    #[error("writing the reset-vector stub at {RESET_VECTOR:#x} failed: {0}")]
    WriteResetVector(#[source] vm_memory::GuestMemoryError),
    /// Writing the PVH start info, module list or memory map failed.
    #[error("writing the PVH start info at {PVH_INFO_START:#x} failed: {0}")]
    WritePvhInfo(#[source] linux_loader::configurator::Error),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode without paging, RBX = `hvm_start_info`.
    Pvh,
}

/// Where and how the loaded kernel is entered.
#[derive(Clone, Copy, Debug)]
pub struct KernelEntry {
    /// Guest-physical entry point.
    pub entry: GuestAddress,
    /// Entry protocol.
    pub protocol: BootProtocol,
    /// The bzImage's setup header (`None` for an ELF).
    pub setup_header: Option<setup_header>,
    /// End (exclusive) of the memory the kernel occupies, including a bzImage's in-place
    /// decompression area (`pref_address + init_size`).
    pub kernel_end: u64,
}

/// Kernel formats recognised by [`load_kernel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

/// Reads exactly `buf.len()` bytes at `offset`; `Ok(false)` when the file is too short.
fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> Result<bool, BootError> {
    file.seek(SeekFrom::Start(offset))
        .map_err(BootError::ReadKernel)?;
    match file.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(BootError::ReadKernel(e)),
    }
}

/// Checks what linux-loader takes on trust in an ELF64 kernel's program headers: there is a
/// loadable segment, and none has fewer bytes in memory than in the file (the kernel's end is
/// computed from the memory sizes, so such a segment would let the initramfs overwrite it).
fn check_elf_segments(kernel: &mut File) -> Result<(), BootError> {
    const PT_LOAD: u32 = 1;
    let mut ehdr = [0u8; 64];
    if !read_at(kernel, 0, &mut ehdr)? {
        return Err(BootError::BadElf("the ELF header is truncated"));
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(v)
    };
    let phoff = u64_at(&ehdr, 0x20);
    let phentsize = u16_at(&ehdr, 0x36);
    let phnum = u16_at(&ehdr, 0x38);
    if phentsize < 56 {
        // linux-loader reports the class, size and header errors itself.
        return Ok(());
    }
    let mut loads = 0;
    let mut ph = [0u8; 56];
    for i in 0..u64::from(phnum) {
        let at = phoff.saturating_add(i * u64::from(phentsize));
        if !read_at(kernel, at, &mut ph)? {
            return Err(BootError::BadElf(
                "a program header lies past the end of the file",
            ));
        }
        let p_type = u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]);
        if p_type != PT_LOAD {
            continue;
        }
        loads += 1;
        if u64_at(&ph, 0x28) < u64_at(&ph, 0x20) {
            return Err(BootError::BadElf(
                "a loadable segment is smaller in memory than in the file",
            ));
        }
    }
    if loads == 0 {
        return Err(BootError::BadElf("it has no loadable segment"));
    }
    Ok(())
}

fn detect_format(kernel: &mut File) -> Result<KernelFormat, BootError> {
    let mut magic = [0u8; 4];
    if read_at(kernel, 0, &mut magic)? && magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if read_at(kernel, BZIMAGE_MAGIC_OFFSET, &mut magic)?
        && u32::from_le_bytes(magic) == BZIMAGE_MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownKernelFormat)
}

/// Checks the protocol version and 64-bit capability of a bzImage setup header.
pub fn check_bzimage_header(hdr: &setup_header) -> Result<(), BootError> {
    let version = hdr.version;
    if version < MIN_BOOT_PROTOCOL {
        return Err(BootError::BootProtocolTooOld {
            major: version >> 8,
            minor: version & 0xff,
        });
    }
    let xloadflags = hdr.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::NotA64BitKernel);
    }
    Ok(())
}

/// End of the memory a bzImage uses while decompressing itself: the kernel relocates to
/// `max(load address aligned to kernel_alignment, pref_address)` and needs `init_size` there.
pub fn bzimage_footprint_end(hdr: &setup_header, load_addr: u64, load_end: u64) -> u64 {
    let align = u64::from(hdr.kernel_alignment);
    let aligned_load = if align.is_power_of_two() {
        load_addr.saturating_add(align - 1) & !(align - 1)
    } else {
        load_addr
    };
    let run_addr = aligned_load.max(hdr.pref_address);
    load_end.max(run_addr.saturating_add(u64::from(hdr.init_size)))
}

/// Detects bzImage vs ELF (by magic, not file name), loads it. ELF: PVH entry when the Xen PVH
/// note is present (linux-loader's ElfLoader reports it), else the ELF 64-bit entry. bzImage:
/// 64-bit boot protocol, entry = load address + 0x200; require protocol >= 2.12 and
/// XLF_KERNEL_64 with a clear error otherwise.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<KernelEntry, BootError> {
    let himem = Some(GuestAddress(HIMEM_START));
    match detect_format(kernel)? {
        KernelFormat::Elf => {
            check_elf_segments(kernel)?;
            let res = Elf::load(mem, None, kernel, himem).map_err(BootError::LoadKernel)?;
            let (entry, protocol) = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (addr, BootProtocol::Pvh),
                _ => (res.kernel_load, BootProtocol::Linux64),
            };
            Ok(KernelEntry {
                entry,
                protocol,
                setup_header: None,
                kernel_end: res.kernel_end,
            })
        }
        KernelFormat::BzImage => {
            let mut hdr = setup_header::default();
            if !read_at(kernel, SETUP_HEADER_OFFSET, hdr.as_mut_slice())? {
                return Err(BootError::UnknownKernelFormat);
            }
            check_bzimage_header(&hdr)?;
            let res = BzImage::load(mem, None, kernel, himem).map_err(BootError::LoadKernel)?;
            let hdr = res.setup_header.unwrap_or(hdr);
            let load = res.kernel_load.0;
            Ok(KernelEntry {
                entry: GuestAddress(load + BZIMAGE_64BIT_ENTRY_OFFSET),
                protocol: BootProtocol::Linux64,
                setup_header: Some(hdr),
                kernel_end: bzimage_footprint_end(&hdr, load, res.kernel_end),
            })
        }
    }
}

/// Chooses the initramfs address: page-aligned, as high as possible below `limit`, not below
/// `kernel_end`. Pure; used by [`load_initramfs`].
pub fn initramfs_placement(size: u64, limit: u64, kernel_end: u64) -> Result<u64, BootError> {
    let low = kernel_end.max(HIMEM_START).saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    let too_large = || BootError::InitramfsTooLarge {
        size,
        limit,
        kernel_end: low,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < low {
        return Err(too_large());
    }
    Ok(addr)
}

/// Exclusive upper bound for the initramfs: low RAM end, capped by the header's
/// `initrd_addr_max` (the highest address the initramfs may occupy).
pub fn initramfs_limit(kernel: &KernelEntry, ram_size: u64) -> u64 {
    let low_end = low_ram_end(ram_size);
    match kernel.setup_header {
        Some(hdr) if hdr.initrd_addr_max != 0 => low_end.min(u64::from(hdr.initrd_addr_max) + 1),
        _ => low_end,
    }
}

/// Loads the initramfs page-aligned as high as possible in low RAM below min(initrd_addr_max,
/// low RAM end) and above the kernel; error "initramfs (N bytes) does not fit below ..." if it
/// doesn't fit.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    initrd: &mut File,
    kernel: &KernelEntry,
    ram_size: u64,
) -> Result<(GuestAddress, usize), BootError> {
    let size = initrd
        .seek(SeekFrom::End(0))
        .map_err(BootError::ReadInitramfs)?;
    if size == 0 {
        return Err(BootError::EmptyInitramfs);
    }
    let limit = initramfs_limit(kernel, ram_size);
    let addr = initramfs_placement(size, limit, kernel.kernel_end)?;
    initrd.rewind().map_err(BootError::ReadInitramfs)?;
    // `size` is below the low RAM end (< 3 GiB), so it fits a usize.
    let len = size as usize;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len)
        .map_err(|source| BootError::CopyInitramfs { addr, source })?;
    Ok((GuestAddress(addr), len))
}

/// Builds the zero page for the Linux 64-bit boot protocol. Pure; used by [`configure_system`].
pub fn build_boot_params(
    setup_header: Option<setup_header>,
    cmdline_len_with_nul: usize,
    initrd: Option<(GuestAddress, usize)>,
    e820: &[E820Entry],
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    let has_header = setup_header.is_some();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = BZIMAGE_MAGIC;
    if !has_header {
        params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
        params.hdr.cmdline_size = cmdline_len_with_nul as u32;
    }
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    if let Some((addr, len)) = initrd {
        let image = u32::try_from(addr.0).map_err(|_| BootError::InitramfsAbove4G(addr.0))?;
        let size = u32::try_from(len).map_err(|_| BootError::InitramfsAbove4G(addr.0))?;
        params.hdr.ramdisk_image = image;
        params.hdr.ramdisk_size = size;
    }
    params.acpi_rsdp_addr = RSDP_START;
    if e820.len() > E820_MAX_ZEROPAGE {
        return Err(BootError::TooManyE820Entries(e820.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// Builds the PVH start info, its module list and memory map. Pure; used by
/// [`configure_system`].
pub fn build_pvh_info(
    initrd: Option<(GuestAddress, usize)>,
    e820: &[E820Entry],
) -> (
    hvm_start_info,
    Vec<hvm_modlist_entry>,
    Vec<hvm_memmap_table_entry>,
) {
    let modules: Vec<hvm_modlist_entry> = initrd
        .into_iter()
        .map(|(addr, len)| hvm_modlist_entry {
            paddr: addr.0,
            size: len as u64,
            ..Default::default()
        })
        .collect();
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: RSDP_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    (info, modules, memmap)
}

/// Writes the cmdline at CMDLINE_START and the zero page (Linux64, starting from the bzImage's
/// own setup header when present, with type_of_loader 0xff, cmd_line_ptr, ramdisk,
/// acpi_rsdp_addr = RSDP_START, e820 from e820_entries) or the PVH hvm_start_info + modlist +
/// memmap (Pvh), through linux-loader's configurators; and the reset-vector stub that Linux's
/// BIOS reboot path jumps to.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    kernel: &KernelEntry,
    cmdline: &str,
    initrd: Option<(GuestAddress, usize)>,
    ram_size: u64,
) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong { len: cmdline.len() });
    }
    let cl = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    let cmdline_len = cl
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes_with_nul()
        .len();
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(BootError::WriteCmdline)?;
    write_reset_vector_stub(mem).map_err(BootError::WriteResetVector)?;

    let e820 = e820_entries(ram_size);
    match kernel.protocol {
        BootProtocol::Linux64 => {
            let params = build_boot_params(kernel.setup_header, cmdline_len, initrd, &e820)?;
            let bp = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(BootError::WriteZeroPage)
        }
        BootProtocol::Pvh => {
            let (info, modules, memmap) = build_pvh_info(initrd, &e820);
            let mut bp = BootParams::new(&info, GuestAddress(PVH_INFO_START));
            bp.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            if !modules.is_empty() {
                bp.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
            }
            PvhBootConfigurator::write_bootparams(&bp, mem).map_err(BootError::WritePvhInfo)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::memory::ram_regions;
    use std::io::Write;

    const MIB: u64 = 1 << 20;

    fn guest_mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_regions(size)).unwrap()
    }

    /// An unlinked temporary file holding `bytes`, positioned at its start.
    fn temp_file(bytes: &[u8]) -> File {
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.write_all(bytes).unwrap();
        file.rewind().unwrap();
        file
    }

    /// Builds a minimal little-endian ELF64 executable: one PT_LOAD segment with `code` at
    /// physical `paddr`, and optionally a PT_NOTE holding a Xen PHYS32_ENTRY note.
    fn build_elf(entry: u64, paddr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
        const EHDR: usize = 64;
        const PHDR: usize = 56;
        let phnum = if pvh_entry.is_some() { 2 } else { 1 };
        // A harmless note first ("GNU" type 3) so the parser has to walk past it.
        let mut notes = Vec::new();
        let mut note = |name: &[u8], ty: u32, desc: &[u8]| {
            notes.extend_from_slice(&(name.len() as u32).to_le_bytes());
            notes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            notes.extend_from_slice(&ty.to_le_bytes());
            notes.extend_from_slice(name);
            while notes.len() % 4 != 0 {
                notes.push(0);
            }
            notes.extend_from_slice(desc);
            while notes.len() % 4 != 0 {
                notes.push(0);
            }
        };
        if let Some(pvh) = pvh_entry {
            note(b"GNU\0", 3, &[1, 2, 3, 4, 5, 6, 7, 8]);
            note(b"Xen\0", 18, &pvh.to_le_bytes());
        }
        let code_off = EHDR + PHDR * phnum;
        let note_off = code_off + code.len();

        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF");
        f.extend_from_slice(&[2, 1, 1, 0]); // ELFCLASS64, little endian, version 1, SysV
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&entry.to_le_bytes());
        f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        f.extend_from_slice(&(EHDR as u16).to_le_bytes());
        f.extend_from_slice(&(PHDR as u16).to_le_bytes());
        f.extend_from_slice(&(phnum as u16).to_le_bytes());
        f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
        f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
        f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
        assert_eq!(f.len(), EHDR);
        let mut phdr = |ty: u32, off: usize, addr: u64, filesz: usize, memsz: usize| {
            f.extend_from_slice(&ty.to_le_bytes());
            f.extend_from_slice(&5u32.to_le_bytes()); // R+X
            f.extend_from_slice(&(off as u64).to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes()); // vaddr
            f.extend_from_slice(&addr.to_le_bytes()); // paddr
            f.extend_from_slice(&(filesz as u64).to_le_bytes());
            f.extend_from_slice(&(memsz as u64).to_le_bytes());
            f.extend_from_slice(&4u64.to_le_bytes());
        };
        phdr(1, code_off, paddr, code.len(), code.len() + 0x1000); // PT_LOAD with bss
        if pvh_entry.is_some() {
            phdr(4, note_off, 0, notes.len(), notes.len()); // PT_NOTE
        }
        f.extend_from_slice(code);
        f.extend_from_slice(&notes);
        f
    }

    const CODE: [u8; 4] = [0xf4, 0xeb, 0xfd, 0x90]; // hlt; jmp .-1; nop

    /// Found by the boot_loader fuzz target (fuzz/regressions/boot_loader): a PT_LOAD with
    /// p_memsz < p_filesz made the kernel end before the bytes it wrote, so an initramfs
    /// placed above it could overwrite the kernel. An ELF with no PT_LOAD "loaded" nothing.
    #[test]
    fn elf_segments_smaller_in_memory_than_in_the_file_or_absent_are_refused() {
        let mem = guest_mem(64 * MIB);
        let mut elf = build_elf(0x100_0000, 0x100_0000, &CODE, None);
        // The PT_LOAD's p_memsz (offset 0x28 in the first program header) below its p_filesz.
        elf[64 + 0x28..64 + 0x30].copy_from_slice(&0u64.to_le_bytes());
        let mut t = temp_file(&elf);
        let e = load_kernel(&mem, &mut t).unwrap_err();
        assert!(e.to_string().contains("smaller in memory"), "{e}");
        // The same segment as PT_NULL: no loadable segment at all.
        let mut elf = build_elf(0x100_0000, 0x100_0000, &CODE, None);
        elf[64..68].copy_from_slice(&0u32.to_le_bytes());
        let mut t = temp_file(&elf);
        let e = load_kernel(&mem, &mut t).unwrap_err();
        assert!(e.to_string().contains("no loadable segment"), "{e}");
        // The fuzzer's input itself.
        let input = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/regressions/boot_loader/elf-memsz-below-filesz"
        ))
        .unwrap();
        let mut t = temp_file(&input);
        assert!(load_kernel(&mem, &mut t).is_err());
    }

    #[test]
    fn elf_with_pvh_note_uses_pvh_entry() {
        let mem = guest_mem(64 * MIB);
        let mut t = temp_file(&build_elf(0x20_0000, 0x20_0000, &CODE, Some(0x20_0001)));
        let k = load_kernel(&mem, &mut t).unwrap();
        assert_eq!(k.protocol, BootProtocol::Pvh);
        assert_eq!(k.entry, GuestAddress(0x20_0001));
        assert!(k.setup_header.is_none());
        assert_eq!(k.kernel_end, 0x20_0000 + 4 + 0x1000);
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(got, CODE);
    }

    #[test]
    fn plain_elf_uses_64bit_entry() {
        let mem = guest_mem(64 * MIB);
        let mut t = temp_file(&build_elf(0x100_0000, 0x100_0000, &CODE, None));
        let k = load_kernel(&mem, &mut t).unwrap();
        assert_eq!(k.protocol, BootProtocol::Linux64);
        assert_eq!(k.entry, GuestAddress(0x100_0000));
        assert!(k.setup_header.is_none());
    }

    #[test]
    fn unknown_format_is_rejected() {
        let mem = guest_mem(16 * MIB);
        let mut t = temp_file(&[0x55u8; 0x400]);
        let err = load_kernel(&mem, &mut t).unwrap_err();
        assert!(matches!(err, BootError::UnknownKernelFormat), "{err}");
        let mut short = temp_file(b"\x7fEL");
        assert!(matches!(
            load_kernel(&mem, &mut short),
            Err(BootError::UnknownKernelFormat)
        ));
    }

    /// A fake bzImage: boot sector + 1 setup sector + payload.
    fn build_bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut img = vec![0u8; 1024 + 4096];
        let hdr = setup_header {
            setup_sects: 1,
            boot_flag: 0xaa55,
            header: BZIMAGE_MAGIC,
            version,
            loadflags: 1,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags,
            cmdline_size: 2047,
            pref_address: 0x100_0000,
            init_size: 0x80_0000,
            ..Default::default()
        };
        img[0x1f1..0x1f1 + std::mem::size_of::<setup_header>()].copy_from_slice(hdr.as_slice());
        img[1024..1028].copy_from_slice(&[1, 2, 3, 4]);
        img
    }

    #[test]
    fn fake_bzimage_loads_with_64bit_entry() {
        let mem = guest_mem(64 * MIB);
        let mut t = temp_file(&build_bzimage(0x020f, 0x7f));
        let k = load_kernel(&mem, &mut t).unwrap();
        assert_eq!(k.protocol, BootProtocol::Linux64);
        assert_eq!(k.entry, GuestAddress(0x10_0200));
        let hdr = k.setup_header.unwrap();
        assert_eq!({ hdr.version }, 0x020f);
        // Decompression runs at pref_address (16 MiB) for init_size bytes.
        assert_eq!(k.kernel_end, 0x180_0000);
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got, [1, 2, 3, 4]);
    }

    #[test]
    fn old_or_32bit_bzimage_is_rejected() {
        let mem = guest_mem(64 * MIB);
        let mut old = temp_file(&build_bzimage(0x020b, 1));
        let err = load_kernel(&mem, &mut old).unwrap_err();
        assert!(matches!(
            err,
            BootError::BootProtocolTooOld {
                major: 2,
                minor: 11
            }
        ));
        assert!(err.to_string().contains("2.11"), "{err}");
        let mut no64 = temp_file(&build_bzimage(0x020f, 0x2));
        assert!(matches!(
            load_kernel(&mem, &mut no64),
            Err(BootError::NotA64BitKernel)
        ));
    }

    #[test]
    fn footprint_respects_alignment_and_pref_address() {
        let hdr = setup_header {
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            init_size: 0x1000,
            ..Default::default()
        };
        assert_eq!(
            bzimage_footprint_end(&hdr, 0x10_0000, 0x50_0000),
            0x100_1000
        );
        // Loaded above pref_address: runs at the aligned load address.
        assert_eq!(
            bzimage_footprint_end(&hdr, 0x210_0000, 0x230_0000),
            0x230_0000
        );
        assert_eq!(
            bzimage_footprint_end(&hdr, 0x210_0000, 0x210_0100),
            0x220_1000
        );
    }

    #[test]
    fn initramfs_goes_to_top_of_low_ram() {
        let mem = guest_mem(64 * MIB);
        let k = KernelEntry {
            entry: GuestAddress(0x100_0000),
            protocol: BootProtocol::Linux64,
            setup_header: None,
            kernel_end: 0x200_0000,
        };
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut t = temp_file(&data);
        let (addr, len) = load_initramfs(&mem, &mut t, &k, 64 * MIB).unwrap();
        assert_eq!(len, data.len());
        assert_eq!(addr.0 % 4096, 0);
        assert_eq!(addr.0, (64 * MIB - 10_000) & !0xfff);
        let mut got = vec![0u8; data.len()];
        mem.read_slice(&mut got, addr).unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn initramfs_respects_initrd_addr_max() {
        let hdr = setup_header {
            initrd_addr_max: 0x1ff_ffff,
            ..Default::default()
        };
        let k = KernelEntry {
            entry: GuestAddress(0x10_0200),
            protocol: BootProtocol::Linux64,
            setup_header: Some(hdr),
            kernel_end: 0x10_0000,
        };
        assert_eq!(initramfs_limit(&k, 64 * MIB), 0x200_0000);
        assert_eq!(initramfs_limit(&k, 16 * MIB), 0x100_0000);
        let addr = initramfs_placement(0x1800, initramfs_limit(&k, 64 * MIB), k.kernel_end);
        assert_eq!(addr.unwrap(), 0x200_0000 - 0x2000);
    }

    #[test]
    fn initramfs_too_large_error() {
        let err = initramfs_placement(60 * MIB, 64 * MIB, 0x500_0000).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("initramfs (62914560 bytes) does not fit below 0x4000000"),
            "{msg}"
        );
        assert!(initramfs_placement(128 * MIB, 64 * MIB, 0).is_err());
        // Exactly fits between the page-aligned kernel end and the limit.
        assert_eq!(
            initramfs_placement(0x1000, 0x20_1000, 0x20_0000).unwrap(),
            0x20_0000
        );
    }

    #[test]
    fn empty_initramfs_rejected() {
        let mem = guest_mem(16 * MIB);
        let k = KernelEntry {
            entry: GuestAddress(0x10_0000),
            protocol: BootProtocol::Pvh,
            setup_header: None,
            kernel_end: 0x20_0000,
        };
        let mut t = temp_file(&[]);
        assert!(matches!(
            load_initramfs(&mem, &mut t, &k, 16 * MIB),
            Err(BootError::EmptyInitramfs)
        ));
    }

    #[test]
    fn zero_page_contents() {
        let mem = guest_mem(128 * MIB);
        let hdr = setup_header {
            version: 0x020f,
            header: BZIMAGE_MAGIC,
            boot_flag: 0xaa55,
            kernel_alignment: 0x20_0000,
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            xloadflags: 1,
            ..Default::default()
        };
        let k = KernelEntry {
            entry: GuestAddress(0x10_0200),
            protocol: BootProtocol::Linux64,
            setup_header: Some(hdr),
            kernel_end: 0x200_0000,
        };
        let initrd = Some((GuestAddress(0x700_0000), 0x1234));
        configure_system(&mem, &k, "console=ttyS0 quiet", initrd, 128 * MIB).unwrap();

        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.hdr.version }, 0x020f, "image header kept");
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000, "image header kept");
        assert_eq!({ p.hdr.cmdline_size }, 2047, "image header kept");
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, BZIMAGE_MAGIC);
        assert_eq!({ p.acpi_rsdp_addr }, RSDP_START);
        let e820 = e820_entries(128 * MIB);
        assert_eq!(p.e820_entries as usize, e820.len());
        for (i, e) in e820.iter().enumerate() {
            let t = p.e820_table[i];
            assert_eq!(
                ({ t.addr }, { t.size }, { t.r#type }),
                (e.addr, e.size, e.kind)
            );
        }
        let mut cl = [0u8; 20];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cl, b"console=ttyS0 quiet\0");
    }

    #[test]
    fn zero_page_for_elf_without_header() {
        let p = build_boot_params(None, 7, None, &e820_entries(64 * MIB)).unwrap();
        assert_eq!({ p.hdr.kernel_alignment }, 0x100_0000);
        assert_eq!({ p.hdr.cmdline_size }, 7);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn pvh_start_info_contents() {
        let mem = guest_mem(64 * MIB);
        let k = KernelEntry {
            entry: GuestAddress(0x100_0850),
            protocol: BootProtocol::Pvh,
            setup_header: None,
            kernel_end: 0x200_0000,
        };
        let initrd = Some((GuestAddress(0x300_0000), 0x4321));
        configure_system(&mem, &k, "console=ttyS0", initrd, 64 * MIB).unwrap();

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.rsdp_paddr, RSDP_START);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(info.memmap_entries, 3);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((m.paddr, m.size), (0x300_0000, 0x4321));
        let e820 = e820_entries(64 * MIB);
        for (i, e) in e820.iter().enumerate() {
            let got: hvm_memmap_table_entry = mem
                .read_obj(GuestAddress(PVH_MEMMAP_START + 24 * i as u64))
                .unwrap();
            assert_eq!((got.addr, got.size, got.type_), (e.addr, e.size, e.kind));
        }
        // The start info must not overlap the module list.
        assert!(PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64 <= PVH_MODLIST_START);
    }

    #[test]
    fn pvh_without_initrd_has_no_modules() {
        let (info, modules, memmap) = build_pvh_info(None, &e820_entries(32 * MIB));
        assert_eq!(info.nr_modules, 0);
        assert_eq!(info.modlist_paddr, 0);
        assert!(modules.is_empty());
        assert_eq!(memmap.len(), 3);
    }

    #[test]
    fn cmdline_length_limit() {
        let mem = guest_mem(16 * MIB);
        let k = KernelEntry {
            entry: GuestAddress(0x100_0000),
            protocol: BootProtocol::Linux64,
            setup_header: None,
            kernel_end: 0x200_0000,
        };
        let ok = "a".repeat(CMDLINE_MAX_SIZE - 1);
        configure_system(&mem, &k, &ok, None, 16 * MIB).unwrap();
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        let err = configure_system(&mem, &k, &long, None, 16 * MIB).unwrap_err();
        assert!(
            matches!(err, BootError::CmdlineTooLong { len: 2048 }),
            "{err}"
        );
    }

    /// The first of the cached Debian image locations that exists (the brief names
    /// `tests/.cache/<name>`; the image scripts store it under `tests/.cache/kernel/`).
    fn cached_image(name: &str) -> Option<std::path::PathBuf> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/.cache");
        let candidates = [root.join(name), root.join("kernel").join(name)];
        let found = candidates.iter().find(|p| p.exists()).cloned();
        if found.is_none() {
            eprintln!(
                "SKIPPED: neither {} nor {} exists; cached-image load test not run",
                candidates[0].display(),
                candidates[1].display()
            );
        }
        found
    }

    /// Loads the Debian bzImage cached by the test-image scripts, when present.
    #[test]
    fn debian_bzimage_if_cached() {
        let Some(path) = cached_image("vmlinuz") else {
            return;
        };
        let mem = guest_mem(512 * MIB);
        let mut f = File::open(&path).unwrap();
        let k = load_kernel(&mem, &mut f).unwrap();
        assert_eq!(k.protocol, BootProtocol::Linux64);
        let hdr = k.setup_header.unwrap();
        assert!({ hdr.version } >= MIN_BOOT_PROTOCOL);
        assert_ne!({ hdr.xloadflags } & XLF_KERNEL_64, 0);
        assert_eq!(k.entry.0, u64::from(hdr.code32_start) + 0x200);
        assert_eq!(k.entry.0, 0x10_0200);
        assert!(k.kernel_end >= { hdr.pref_address } + u64::from(hdr.init_size));
        // The payload was copied to the protected-mode load address.
        let mut first = [0u8; 16];
        mem.read_slice(&mut first, GuestAddress(0x10_0000)).unwrap();
        let mut file_bytes = [0u8; 16];
        let sects = match hdr.setup_sects {
            0 => 4,
            n => u64::from(n),
        };
        let setup = (sects + 1) * 512;
        f.seek(SeekFrom::Start(setup)).unwrap();
        f.read_exact(&mut file_bytes).unwrap();
        assert_eq!(first, file_bytes);

        let data = vec![0xa5u8; 3 << 20];
        let mut initrd = temp_file(&data);
        let (addr, len) = load_initramfs(&mem, &mut initrd, &k, 512 * MIB).unwrap();
        assert!(addr.0 >= k.kernel_end && addr.0 + len as u64 <= 512 * MIB);
        configure_system(&mem, &k, "console=ttyS0", Some((addr, len)), 512 * MIB).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.version }, { hdr.version });
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.ramdisk_image } as u64, addr.0);
    }

    /// Loads the Debian vmlinux cached by the test-image scripts, when present: it carries the
    /// Xen PVH note, so it must be entered through PVH.
    #[test]
    fn debian_vmlinux_if_cached() {
        let Some(path) = cached_image("vmlinux") else {
            return;
        };
        let mem = guest_mem(512 * MIB);
        let mut f = File::open(&path).unwrap();
        let k = load_kernel(&mem, &mut f).unwrap();
        assert_eq!(k.protocol, BootProtocol::Pvh);
        assert!(k.setup_header.is_none());
        assert!(
            (0x100_0000..k.kernel_end).contains(&k.entry.0),
            "{:#x}",
            k.entry.0
        );
    }
}

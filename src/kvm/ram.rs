//! Host memory that backs guest RAM: anonymous, lazily backed, and 2 MiB-aligned, so that KVM
//! can map it into the guest with 2 MiB pages where the host backs it with transparent huge
//! pages (KVM only does so when the host address and the guest address agree modulo 2 MiB; a
//! plain `mmap` of a large size gives no such alignment on older kernels).

use std::io;

use vm_memory::MmapRegion;

/// Alignment of every mapping: the x86-64 huge page size.
pub const ALIGN: usize = 2 << 20;

/// How guest RAM is mapped: private, anonymous, lazily backed.
const MAP_FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// One mapping, unmapped on drop.
#[derive(Debug)]
pub struct HostMapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain process memory with no thread affinity; all guest-memory access
// goes through vm-memory's bounds-checked accessors, and only the owning `Vm` unmaps it.
unsafe impl Send for HostMapping {}
// SAFETY: as above; `HostMapping` itself has no interior state besides the two fields.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Maps `len` bytes (a multiple of the page size) at a 2 MiB-aligned address. With
    /// `huge_from = Some(offset)`, the range from `offset` on is marked for transparent huge
    /// pages (`MADV_HUGEPAGE`), which hosts whose THP mode is `madvise` need; a refusal is not
    /// an error.
    pub fn new(len: usize, huge_from: Option<usize>) -> io::Result<HostMapping> {
        let reserve = len
            .checked_add(ALIGN)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a new anonymous mapping at an address the kernel chooses; nothing else is
        // touched. The result is checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                MAP_FLAGS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base as usize;
        let start = base.next_multiple_of(ALIGN);
        let head = start - base;
        let tail = reserve - head - len;
        // SAFETY: both ranges lie inside the mapping made above and outside [start, start+len),
        // and nothing refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(base as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        if let Some(offset) = huge_from.filter(|&o| o < len) {
            // SAFETY: advice on a range of our own mapping; it changes no memory contents.
            let _ = unsafe {
                libc::madvise(
                    (start + offset) as *mut libc::c_void,
                    len - offset,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
        Ok(HostMapping {
            addr: start as *mut u8,
            len,
        })
    }

    /// A vm-memory region over the mapping. It does not own the mapping: the caller keeps this
    /// `HostMapping` alive for as long as the region (or KVM) uses the memory.
    pub fn region(&self) -> Result<MmapRegion, vm_memory::mmap::MmapRegionError> {
        // SAFETY: [addr, addr + len) is a live read-write mapping owned by `self`, and the
        // caller keeps `self` alive while the region is used (see above).
        unsafe {
            MmapRegion::build_raw(
                self.addr,
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                MAP_FLAGS,
            )
        }
    }

    /// The host address of the mapping.
    #[cfg(test)]
    fn host_addr(&self) -> u64 {
        self.addr as u64
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this value mapped; its owner drops it only after the
        // guest-memory regions over it and the KVM slot using it are gone.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_are_aligned_usable_and_unmapped() {
        for len in [4096, ALIGN, 3 * ALIGN + 4096, 64 << 20] {
            let m = HostMapping::new(len, Some(ALIGN)).unwrap();
            assert_eq!(m.host_addr() % ALIGN as u64, 0, "len {len}");
            let region = m.region().unwrap();
            assert_eq!(region.size(), len);
            // SAFETY: the first and last bytes of the live mapping.
            unsafe {
                *region.as_ptr() = 1;
                *region.as_ptr().add(len - 1) = 2;
            }
        }
        assert!(HostMapping::new(usize::MAX - 10, None).is_err());
    }
}

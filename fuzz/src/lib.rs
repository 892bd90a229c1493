//! The harnesses of the fuzz targets in `fuzz_targets/`. They drive minivmm's own code through
//! its crate-internal layers, which the `fuzzing` feature makes public (hidden, not a stable
//! API). Each `run` function takes one fuzz input, drives the code with it and panics when an
//! invariant is broken (a panic is what libFuzzer reports as a crash).
//!
//! - [`control_line`]: framing, parsing and dispatch of control lines against a model VM made
//!   of the real resize transaction, CPU manager and memory manager, with a model of KVM.
//! - [`devices`]: register accesses to every legacy and hotplug device through the buses,
//!   interleaved with the VMM-side calls, checked against shadow models.
//! - [`acpi`]: table generation for arbitrary valid configurations, checked by parsing the
//!   tables back from guest memory.
//! - [`boot_loader`]: kernel images (raw, or patched into bzImage/ELF skeletons) loaded into a
//!   64 MiB guest memory with guard pages on both sides.
//! - [`virtio`]: the virtio-mmio transport over virtio-blk (an in-memory disk) or virtio-vsock
//!   (a muxer on a socket in a per-process temp dir), driven by register traffic, guest
//!   memory writes and queue kicks.

/// Reads a fuzz input front to back; past its end every read returns zeros.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The bytes not consumed yet.
    pub fn rest(&self) -> &'a [u8] {
        self.data
    }

    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
}

/// A small deterministic generator (xorshift64*) for choices derived from one seed.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A [`minivmm::devices::Trigger`] that counts how often it fired.
#[derive(Debug, Default)]
struct CountingTrigger(std::sync::atomic::AtomicUsize);

impl CountingTrigger {
    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl minivmm::devices::Trigger for CountingTrigger {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

pub mod acpi;
pub mod boot_loader;
pub mod control_line;
pub mod devices;
pub mod virtio;

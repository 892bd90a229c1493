//! virtio 1.x devices over the MMIO transport.
//!
//! A device ([`VirtioDevice`]) is a state machine over its virtqueues: it never owns the queues
//! (the [`mmio::MmioTransport`] does) and never waits. The main thread calls it when the guest
//! kicks a queue (an ioeventfd) or when a host-side fd of the device is ready, with the guest
//! memory of the current boot; a device reports whether it added used buffers, and the
//! transport raises the interrupt. Guest memory is only reached through vm-memory and
//! virtio-queue, which bounds-check every descriptor.

pub mod block;
pub mod mmio;
pub mod vsock;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: the device is modern (virtio 1.x); the only mode minivmm offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`: used/avail event indices suppress needless kicks and interrupts.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// virtio device type of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// virtio device type of a socket (vsock) device.
pub const TYPE_VSOCK: u32 = 19;

/// What woke a device up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The guest kicked queue `n`.
    Queue(usize),
    /// A host-side fd of the device is ready (the device's own token and readiness).
    Host {
        /// The device's token for the fd.
        token: u64,
        /// Readable.
        readable: bool,
        /// Writable.
        writable: bool,
        /// Hung up or in error.
        hangup: bool,
    },
    /// Periodic housekeeping (timeouts).
    Tick,
}

/// A request the device could not serve in a way the guest can be told about: the transport
/// marks the device as needing a reset (`DEVICE_NEEDS_RESET`).
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A virtqueue is unusable (bad addresses or indices).
    #[error("virtqueue {queue}: {source}")]
    Queue {
        /// Queue index.
        queue: usize,
        /// What virtio-queue reported.
        source: virtio_queue::Error,
    },
}

/// One virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device type ([`TYPE_BLOCK`], [`TYPE_VSOCK`]).
    fn device_type(&self) -> u32;
    /// The largest size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers ([`VIRTIO_F_VERSION_1`] is added by the transport).
    fn features(&self) -> u64;
    /// Reads the device configuration space at `offset`; bytes past its end read as zero.
    /// Called on a vCPU thread: pure, no host I/O.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK with these features: the device may start. Called on the main
    /// thread, after the status write that asked for it.
    fn activate(&mut self, _features: u64) {}
    /// The driver reset the device (status 0). Called on the main thread, after the status
    /// write that asked for it and before anything else reaches the device, so it may release
    /// host resources (close sockets).
    fn reset(&mut self) {}
    /// Serves what `wake` is about; returns whether used buffers were added to any queue.
    fn process(
        &mut self,
        wake: Wake,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError>;
}

/// Copies `src` into `data` from `offset`, zero-filling what lies past `src`'s end (for
/// configuration-space reads of any width at any offset).
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| src.get(at))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let src = [1, 2, 3, 4];
        let mut data = [0xff; 4];
        read_config_bytes(&src, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&src, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}

//! The virtio devices of a VM: their host resources (disk files, the vsock muxer), which outlive
//! reboots, and each boot's transports with their interrupt and queue-kick eventfds.
//!
//! Device `i` (disks first, in command-line order, then vsock) has the register page
//! `VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE` and interrupt line `irq::VIRTIO[i]`; the ACPI
//! tables describe the same list (`acpi_config` counts it from the configuration).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::{self, irq};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::vsock::muxer::{Interest, VsockMuxer};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{VirtioDevice, Wake};
use crate::devices::{lock, Bus, BusError, Trigger};
use crate::kvm::vm::{Vm, VmError};

/// Errors while setting up a boot's virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioSetupError {
    /// An eventfd could not be created.
    #[error("virtio device {0}: cannot create an eventfd: {1}")]
    EventFd(usize, #[source] std::io::Error),
    /// A queue could not be created.
    #[error("virtio device {0}: {1}")]
    Queue(usize, #[source] virtio_queue::Error),
    /// Registering an irqfd or ioeventfd failed.
    #[error("virtio device {0}: {1}")]
    Vm(usize, #[source] VmError),
    /// The register page could not be placed on the MMIO bus.
    #[error("virtio device {0}: {1}")]
    Bus(usize, #[source] BusError),
}

/// A disk image, opened at start.
pub struct HostDisk {
    pub file: Arc<File>,
    /// Image size in bytes.
    pub size: u64,
    pub readonly: bool,
}

/// What the virtio devices use on the host, for every boot.
#[derive(Default)]
pub struct VirtioHost {
    pub disks: Vec<HostDisk>,
    /// The guest CID and the host side of the vsock device.
    pub vsock: Option<(u64, Arc<Mutex<VsockMuxer>>)>,
}

impl VirtioHost {
    /// The vsock muxer's epoll changes since the last call.
    pub fn vsock_interest_changes(&self) -> Vec<Interest> {
        match &self.vsock {
            Some((_, muxer)) => lock(muxer).take_interest_changes(),
            None => Vec::new(),
        }
    }

    /// Whether the vsock muxer has connections whose timeouts need a periodic tick.
    pub fn vsock_needs_tick(&self) -> bool {
        self.vsock
            .as_ref()
            .is_some_and(|(_, muxer)| lock(muxer).connections() > 0)
    }
}

/// One device of a boot.
struct Slot {
    transport: Arc<Mutex<MmioTransport>>,
    /// One kick eventfd per queue.
    kicks: Vec<EventFd>,
}

/// The virtio devices of one boot.
#[derive(Default)]
pub struct VirtioDevices {
    slots: Vec<Slot>,
    /// Index of the vsock device in `slots`.
    vsock: Option<usize>,
}

impl VirtioDevices {
    /// Creates the devices for `host` on `vm`: transports on `mmio`, interrupt lines as irqfds,
    /// queue kicks as ioeventfds. The vsock muxer drops the connections of the previous boot.
    pub fn new(
        host: &VirtioHost,
        vm: &Vm,
        mmio: &mut Bus,
    ) -> Result<VirtioDevices, VirtioSetupError> {
        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        for (i, disk) in host.disks.iter().enumerate() {
            let id = format!("minivmm-vd{i}");
            devices.push(Box::new(Block::new(
                disk.file.clone(),
                disk.size,
                disk.readonly,
                &id,
            )));
        }
        let mut vsock = None;
        if let Some((cid, muxer)) = &host.vsock {
            lock(muxer).reset();
            vsock = Some(devices.len());
            devices.push(Box::new(Vsock::new(*cid, muxer.clone())));
        }
        let mut slots = Vec::with_capacity(devices.len());
        for (i, device) in devices.into_iter().enumerate() {
            let base = layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE;
            let gsi = irq::VIRTIO[i];
            // The interrupt line's irqfd; the transport's trigger keeps it alive.
            let irq_evt =
                EventFd::new(EFD_NONBLOCK).map_err(|e| VirtioSetupError::EventFd(i, e))?;
            vm.register_irqfd(&irq_evt, gsi)
                .map_err(|e| VirtioSetupError::Vm(i, e))?;
            let trigger: Arc<dyn Trigger> = Arc::new(irq_evt);
            let transport =
                MmioTransport::new(device, trigger).map_err(|e| VirtioSetupError::Queue(i, e))?;
            let mut kicks = Vec::with_capacity(transport.queue_count());
            for q in 0..transport.queue_count() {
                let evt =
                    EventFd::new(EFD_NONBLOCK).map_err(|e| VirtioSetupError::EventFd(i, e))?;
                vm.register_ioeventfd(&evt, base + QUEUE_NOTIFY_OFFSET, q as u32)
                    .map_err(|e| VirtioSetupError::Vm(i, e))?;
                kicks.push(evt);
            }
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(base, layout::VIRTIO_MMIO_SIZE, transport.clone())
                .map_err(|e| VirtioSetupError::Bus(i, e))?;
            slots.push(Slot { transport, kicks });
        }
        Ok(VirtioDevices { slots, vsock })
    }

    /// Every queue-kick eventfd with its (device, queue) index, for the event loop.
    pub fn kick_fds(&self) -> Vec<(RawFd, usize, usize)> {
        let mut fds = Vec::new();
        for (d, slot) in self.slots.iter().enumerate() {
            for (q, evt) in slot.kicks.iter().enumerate() {
                fds.push((evt.as_raw_fd(), d, q));
            }
        }
        fds
    }

    /// The guest kicked queue `queue` of device `device`.
    pub fn kick(&self, device: usize, queue: usize, mem: &GuestMemoryMmap) {
        let Some(slot) = self.slots.get(device) else {
            return;
        };
        if let Some(evt) = slot.kicks.get(queue) {
            // Drain the counter; several kicks are served by one pass.
            let _ = evt.read();
        }
        lock(&slot.transport).process(Wake::Queue(queue), mem);
    }

    /// Carries out the device resets and activations the guest's status writes asked for
    /// (on the main thread: a vsock reset closes host connections).
    pub fn settle(&self) {
        for slot in &self.slots {
            lock(&slot.transport).settle();
        }
    }

    /// A host fd of the vsock device is ready (or, with `wake` = [`Wake::Tick`], its timeouts).
    pub fn vsock_wake(&self, wake: Wake, mem: &GuestMemoryMmap) {
        if let Some(slot) = self.vsock.and_then(|i| self.slots.get(i)) {
            lock(&slot.transport).process(wake, mem);
        }
    }
}

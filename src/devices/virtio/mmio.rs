//! The virtio-mmio transport (virtio 1.2 §4.2, version 2 "modern" register layout only).
//!
//! The transport is a [`BusDevice`] on the MMIO bus: vCPU threads read and write its registers,
//! and the main thread calls [`MmioTransport::process`] when a queue is kicked (KVM signals the
//! queue's ioeventfd on a `QueueNotify` write, so kicks never exit to userspace) or when a host
//! fd of the device is ready. Both run under the transport's mutex.
//!
//! A register write only changes transport state. What a status write asks of the device itself
//! (a reset, which for vsock closes host connections; an activation) is recorded and carried out
//! on the main thread by [`MmioTransport::settle`]: the write returns
//! [`DeviceEvent::VirtioStatus`] so the event loop settles the device at once, and `process`
//! settles first, so the device always sees the driver's steps in order. Host resources (sockets,
//! files) are thus touched only by the thread whose seccomp filter allows it.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{VirtioDevice, Wake, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::{BusDevice, DeviceEvent, Trigger};

/// `MagicValue`: "virt".
const MAGIC: u32 = 0x7472_6976;
/// `Version` of the modern transport.
const VERSION: u32 = 2;
/// `VendorID`: "MVMM".
const VENDOR_ID: u32 = 0x4d4d_564d;

/// Register offsets (virtio 1.2 §4.2.2).
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of `QueueNotify` in the register page (where the queue ioeventfds are registered).
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest found the device.
    #[allow(dead_code)] // set by drivers; named for the reader and the tests
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: queues are set up.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error the driver must recover from by a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// `InterruptStatus` bit: a queue has new used buffers.
const INT_VRING: u32 = 1;
/// `InterruptStatus` bit: the configuration (or the device status) changed.
const INT_CONFIG: u32 = 2;

/// One virtio device with its queues and transport registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    irq: Arc<dyn Trigger>,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    status: u32,
    interrupt_status: u32,
    /// The queues were checked against guest memory since DRIVER_OK.
    queues_checked: bool,
    /// Device work the guest's status writes asked for, not yet done (see [`Self::settle`]).
    pending: Pending,
}

/// Device calls a status write asked for, left to the main thread.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Pending {
    /// The driver wrote status 0: the device must drop its state (and host connections).
    reset: bool,
    /// The driver set DRIVER_OK with these features: the device may start.
    activate: Option<u64>,
}

impl Pending {
    fn any(&self) -> bool {
        self.reset || self.activate.is_some()
    }
}

impl MmioTransport {
    /// A transport for `device`, interrupting through `irq`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        irq: Arc<dyn Trigger>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            queues,
            irq,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            interrupt_status: 0,
            queues_checked: false,
            pending: Pending::default(),
        })
    }

    /// Number of queues (one ioeventfd each).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn running(&self) -> bool {
        self.status & status::DRIVER_OK != 0
            && self.status & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queues are configured only before DRIVER_OK (virtio 1.2 §4.2.3.2).
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        let index = usize::try_from(self.queue_select).ok()?;
        self.queues.get_mut(index)
    }

    /// Serves `wake` with the guest memory of this boot, raising the interrupt when the device
    /// used buffers. A device error (a queue the guest set up outside its memory, say) marks the
    /// device `DEVICE_NEEDS_RESET` and tells the driver with a configuration interrupt.
    pub fn process(&mut self, wake: Wake, mem: &GuestMemoryMmap) {
        self.settle();
        let running = self.running();
        if running && !self.queues_checked {
            self.queues_checked = true;
            if let Some(bad) = self
                .queues
                .iter()
                .position(|q| q.ready() && !q.is_valid(mem))
            {
                log::warn!(
                    "virtio device type {}: queue {bad} lies outside guest memory or is misaligned; \
                     the device needs a reset",
                    self.device.device_type()
                );
                self.needs_reset();
                return;
            }
        }
        if matches!(wake, Wake::Queue(_)) && !running {
            return;
        }
        // Before DRIVER_OK (and after an error) host events still reach the device, without
        // queues, so it can keep its host side moving.
        let queues: &mut [Queue] = if running { &mut self.queues } else { &mut [] };
        match self.device.process(wake, queues, mem) {
            Ok(false) => {}
            Ok(true) => self.interrupt(INT_VRING),
            Err(e) => {
                log::warn!(
                    "virtio device type {}: {e}; the device needs a reset",
                    self.device.device_type()
                );
                self.needs_reset();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt(INT_CONFIG);
    }

    fn interrupt(&mut self, bit: u32) {
        self.interrupt_status |= bit;
        if let Err(e) = self.irq.trigger() {
            log::warn!("virtio interrupt: {e}");
        }
    }

    /// Carries out the device calls the guest's status writes asked for, in order: a reset,
    /// then an activation. Main thread only: a reset may close host sockets.
    pub fn settle(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        if pending.reset {
            self.device.reset();
        }
        if let Some(features) = pending.activate {
            self.device.activate(features);
        }
    }

    /// Resets the transport's registers and queues; the device's own reset waits for
    /// [`Self::settle`] (an activation asked for before it is void).
    fn reset(&mut self) {
        self.pending = Pending {
            reset: true,
            activate: None,
        };
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.queues_checked = false;
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        let rising = value & !self.status;
        if rising & status::FEATURES_OK != 0 {
            let offered = self.offered_features();
            let acceptable = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !acceptable {
                log::info!(
                    "virtio device type {}: driver features {:#x} refused (offered {offered:#x})",
                    self.device.device_type(),
                    self.driver_features
                );
                value &= !status::FEATURES_OK;
            }
        }
        if rising & status::DRIVER_OK != 0 {
            if value & status::FEATURES_OK == 0 {
                // DRIVER_OK without negotiated features: not a usable device.
                value &= !status::DRIVER_OK;
            } else {
                let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
                for q in &mut self.queues {
                    q.set_event_idx(event_idx);
                }
                self.queues_checked = false;
                self.pending.activate = Some(self.driver_features);
            }
        }
        // The device's own error bit stays until a reset.
        self.status = value | (self.status & status::DEVICE_NEEDS_RESET);
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = usize::try_from(self.queue_select)
            .ok()
            .and_then(|i| self.queues.get(i));
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => {
                // Features are written between DRIVER and FEATURES_OK only.
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    return;
                }
                let shift = match self.driver_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features =
                    (self.driver_features & !(0xffff_ffff << shift)) | (u64::from(value) << shift);
            }
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    // An invalid size is remembered as is and fails the queue's validity check.
                    let size = u16::try_from(value).unwrap_or(0);
                    q.set_size(size);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW => {
                self.set_queue_address(|q| q.set_desc_table_address(Some(value), None))
            }
            reg::QUEUE_DESC_HIGH => {
                self.set_queue_address(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::QUEUE_DRIVER_LOW => {
                self.set_queue_address(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.set_queue_address(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::QUEUE_DEVICE_LOW => {
                self.set_queue_address(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.set_queue_address(|q| q.set_used_ring_address(None, Some(value)))
            }
            reg::INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::STATUS => self.write_status(value),
            // Kicks normally end in the queue's ioeventfd; one that reaches the bus (a value no
            // queue matches) has nothing to kick.
            reg::QUEUE_NOTIFY => {}
            _ => {}
        }
    }

    fn set_queue_address(&mut self, set: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            // Addresses of a live queue stay as they are (virtio 1.2 §4.2.2.1).
            if !q.ready() {
                set(q);
            }
        }
    }

    /// Guest-physical address of the selected queue's descriptor table (for tests).
    #[cfg(test)]
    fn selected_desc_table(&self) -> vm_memory::GuestAddress {
        let i = self.queue_select as usize;
        vm_memory::GuestAddress(self.queues.get(i).map_or(0, |q| q.desc_table()))
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and aligned; anything else reads as zero.
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                *bytes = self.read_register(offset).to_le_bytes()
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceEvent {
        // The configuration spaces minivmm offers are read-only; narrow or unaligned register
        // writes are ignored.
        let had_pending = self.pending.any();
        if offset < reg::CONFIG && offset.is_multiple_of(4) {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                self.write_register(offset, u32::from_le_bytes(bytes));
            }
        }
        // One event per batch of pending work: the main thread settles all of it at once.
        if self.pending.any() && !had_pending {
            DeviceEvent::VirtioStatus
        } else {
            DeviceEvent::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_util::CountingTrigger;
    use vm_memory::GuestAddress;

    /// A device with two queues that uses every chain it is kicked with, and records its
    /// resets and activations in a log the test keeps.
    struct Echo {
        calls: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl VirtioDevice for Echo {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_RING_F_EVENT_IDX | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[0xaa, 0xbb], offset, data);
        }
        fn activate(&mut self, features: u64) {
            self.calls
                .lock()
                .unwrap()
                .push(format!("activate {features:#x}"));
        }
        fn reset(&mut self) {
            self.calls.lock().unwrap().push("reset".into());
        }
        fn process(
            &mut self,
            wake: Wake,
            queues: &mut [Queue],
            mem: &GuestMemoryMmap,
        ) -> Result<bool, super::super::VirtioError> {
            let Wake::Queue(i) = wake else {
                return Ok(false);
            };
            let Some(q) = queues.get_mut(i) else {
                return Ok(false);
            };
            let mut used = false;
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                q.add_used(mem, chain.head_index(), 0)
                    .map_err(|source| super::super::VirtioError::Queue { queue: i, source })?;
                used = true;
            }
            Ok(used)
        }
    }

    fn transport() -> (MmioTransport, Arc<CountingTrigger>) {
        let (t, irq, _) = transport_with_log();
        (t, irq)
    }

    type CallLog = Arc<std::sync::Mutex<Vec<String>>>;

    fn transport_with_log() -> (MmioTransport, Arc<CountingTrigger>, CallLog) {
        let irq = Arc::new(CountingTrigger::default());
        let calls = CallLog::default();
        let dev = Echo {
            calls: calls.clone(),
        };
        let t = MmioTransport::new(Box::new(dev), irq.clone()).unwrap();
        (t, irq, calls)
    }

    /// A status write (on a vCPU thread) only records the device's reset or activation and
    /// asks the main thread to settle; the device sees them there, in the driver's order.
    #[test]
    fn status_writes_leave_the_device_call_to_the_main_thread() {
        let (mut t, _, calls) = transport_with_log();
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        assert_eq!(
            t.write(reg::STATUS, &0u32.to_le_bytes()),
            DeviceEvent::VirtioStatus
        );
        assert!(calls.lock().unwrap().is_empty(), "reset on the vCPU thread");
        t.settle();
        assert_eq!(*calls.lock().unwrap(), ["reset"]);
        t.settle();
        assert_eq!(calls.lock().unwrap().len(), 1, "settled once");

        // Reset, re-negotiate and start before the main thread got to it: one event, and the
        // device sees the reset before the activation.
        calls.lock().unwrap().clear();
        assert_eq!(
            t.write(reg::STATUS, &0u32.to_le_bytes()),
            DeviceEvent::VirtioStatus
        );
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        assert_eq!(t.write(reg::STATUS, &ok.to_le_bytes()), DeviceEvent::None);
        assert!(calls.lock().unwrap().is_empty());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        t.process(Wake::Queue(0), &mem);
        assert_eq!(*calls.lock().unwrap(), ["reset", "activate 0x100000000"]);

        // An activation dropped by a reset before it was settled never reaches the device.
        calls.lock().unwrap().clear();
        wr(&mut t, reg::STATUS, 0);
        t.settle();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        assert_eq!(
            t.write(reg::STATUS, &ok.to_le_bytes()),
            DeviceEvent::VirtioStatus
        );
        assert_eq!(t.write(reg::STATUS, &0u32.to_le_bytes()), DeviceEvent::None);
        t.settle();
        assert_eq!(*calls.lock().unwrap(), ["reset", "reset"]);
    }

    fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        wr(t, reg::STATUS, status::ACKNOWLEDGE);
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, features as u32);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        wr(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 42);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is offered");
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), (1 << 29) | 1);
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 16);
        wr(&mut t, reg::QUEUE_SEL, 7);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0, "no such queue");
        let mut cfg = [0u8; 4];
        t.read(reg::CONFIG + 1, &mut cfg);
        assert_eq!(cfg, [0xbb, 0, 0, 0]);
        let mut narrow = [0xffu8; 2];
        t.read(reg::MAGIC, &mut narrow);
        assert_eq!(narrow, [0, 0], "narrow register reads are zero");
    }

    #[test]
    fn features_without_version_1_or_unknown_bits_are_refused() {
        let (mut t, _) = transport();
        negotiate(&mut t, 1);
        assert_eq!(
            rd(&mut t, reg::STATUS) & status::FEATURES_OK,
            0,
            "legacy driver"
        );
        wr(&mut t, reg::STATUS, 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 5));
        assert_eq!(
            rd(&mut t, reg::STATUS) & status::FEATURES_OK,
            0,
            "unoffered bit"
        );
        wr(&mut t, reg::STATUS, 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 1);
        assert_ne!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, base: u64) {
        wr(t, reg::QUEUE_SEL, index);
        wr(t, reg::QUEUE_NUM, 16);
        wr(t, reg::QUEUE_DESC_LOW, base as u32);
        wr(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
        wr(t, reg::QUEUE_DRIVER_LOW, (base + 0x100) as u32);
        wr(t, reg::QUEUE_DRIVER_HIGH, 0);
        wr(t, reg::QUEUE_DEVICE_LOW, (base + 0x200) as u32);
        wr(t, reg::QUEUE_DEVICE_HIGH, 0);
        wr(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn a_kick_uses_buffers_and_interrupts_until_acked() {
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let desc = RawDescriptor::from(Descriptor::new(0x8000, 16, 0, 0));
        mock.build_desc_chain(&[desc]).unwrap();

        let (mut t, irq) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 16);
        let q = mock.create_queue::<Queue>().unwrap();
        for (lo, hi, v) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, q.desc_table()),
            (
                reg::QUEUE_DRIVER_LOW,
                reg::QUEUE_DRIVER_HIGH,
                q.avail_ring(),
            ),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, q.used_ring()),
        ] {
            wr(&mut t, lo, v as u32);
            wr(&mut t, hi, (v >> 32) as u32);
        }
        wr(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(t.selected_desc_table(), GuestAddress(q.desc_table()));

        t.process(Wake::Queue(0), &mem);
        assert_eq!(irq.count(), 0, "kicks before DRIVER_OK are ignored");
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        t.process(Wake::Queue(0), &mem);
        assert_eq!(irq.count(), 1);
        assert_eq!(mock.used().idx().load(), 1, "the chain was used");
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
        wr(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);

        // Queue addresses cannot change under a running device.
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_DESC_LOW, 0x4000);
        assert_eq!(t.selected_desc_table(), GuestAddress(q.desc_table()));
    }

    #[test]
    fn a_queue_outside_guest_memory_needs_a_reset_and_status_0_resets() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let (mut t, irq) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0xffff_0000);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        t.process(Wake::Queue(0), &mem);
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(irq.count(), 1);
        t.process(Wake::Queue(0), &mem);
        assert_eq!(irq.count(), 1, "a broken device stays quiet");
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0, "reset clears the queues");
    }

    #[test]
    fn random_register_traffic_never_panics() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let (mut t, _) = transport();
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let offset = (x >> 8) % 0x200;
            let len = [1usize, 2, 4, 8][(x & 3) as usize];
            let value = (x >> 32).to_le_bytes();
            if x & 0x10 == 0 {
                let mut buf = [0u8; 8];
                t.read(offset, &mut buf[..len]);
            } else {
                t.write(offset, &value[..len]);
            }
            if x & 0xf00 == 0 {
                t.process(Wake::Queue((x >> 40) as usize % 3), &mem);
            }
        }
    }
}

//! COM1: a 16550A UART, emulated by `vm_superio::Serial`.
//!
//! Guest output goes to an injected writer. Host input is pushed by the VMM main loop with
//! [`SerialDevice::enqueue_input`] into the UART's 64-byte receive FIFO; whenever the guest
//! drains the FIFO, the device fires its `input_room` trigger so the main loop can feed more.
//! Input is therefore never dropped: what does not fit stays with the caller.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::serial::{Error as SerialError, SerialEvents};
use vm_superio::Serial;

use super::{BusDevice, DeviceEvent, Trigger};

/// Number of UART registers.
const REGS: u64 = 8;
/// Offset of the modem control register.
const MCR_OFFSET: u64 = 4;
/// MCR bit: loopback mode (transmitted bytes are received, host input is not).
const MCR_LOOP: u8 = 0x10;

/// Adapts our [`Trigger`] to vm-superio's trigger trait (the UART interrupt line).
struct IrqTrigger(Arc<dyn Trigger>);

impl vm_superio::Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// UART event callbacks: reports a drained receive FIFO and counts lost output bytes.
struct InputEvents {
    input_room: Arc<dyn Trigger>,
    lost_output: AtomicU64,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}

    fn out_byte(&self) {}

    fn tx_lost_byte(&self) {
        if self.lost_output.fetch_add(1, Ordering::Relaxed) == 0 {
            log::warn!("serial: guest output could not be written; dropping bytes");
        }
    }

    fn in_buffer_empty(&self) {
        if let Err(e) = self.input_room.trigger() {
            log::warn!("serial: failed to signal free receive FIFO room: {e}");
        }
    }
}

/// The COM1 UART (8 one-byte registers).
pub struct SerialDevice {
    serial: Serial<IrqTrigger, InputEvents, Box<dyn Write + Send>>,
    /// Mirrors MCR bit 4; in loopback mode the UART refuses host input.
    loopback: bool,
}

impl SerialDevice {
    /// Creates the UART.
    ///
    /// `irq` raises the UART's interrupt (GSI 4, an irqfd `EventFd`). `input_room` fires whenever
    /// the guest drains the receive FIFO, so the VMM main loop can feed more host input. `out`
    /// receives guest output (for example a non-blocking stdout writer, a file or a sink); bytes
    /// it fails to take are dropped and counted.
    pub fn new(
        irq: Arc<dyn Trigger>,
        input_room: Arc<dyn Trigger>,
        out: Box<dyn Write + Send>,
    ) -> Self {
        let events = InputEvents {
            input_room,
            lost_output: AtomicU64::new(0),
        };
        Self {
            serial: Serial::with_events(IrqTrigger(irq), events, out),
            loopback: false,
        }
    }

    /// Queues host input for the guest and returns how many leading bytes of `bytes` were
    /// accepted (0 up to [`Self::input_room`]). Never blocks; bytes not accepted are left to the
    /// caller to retry once `input_room` fires.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let count = bytes.len().min(self.input_room());
        if count == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&bytes[..count]) {
            Ok(accepted) => accepted,
            // The bytes are in the FIFO; only raising the interrupt failed.
            Err(SerialError::Trigger(e)) => {
                log::warn!("serial: failed to raise the receive interrupt: {e}");
                count
            }
            Err(e) => {
                log::warn!("serial: failed to queue input: {e}");
                0
            }
        }
    }

    /// Free space in the receive FIFO (0 while the guest has the UART in loopback mode).
    pub fn input_room(&self) -> usize {
        if self.loopback {
            0
        } else {
            self.serial.fifo_capacity()
        }
    }

    #[cfg(test)]
    /// Number of guest output bytes the writer failed to take since creation.
    pub fn lost_output_bytes(&self) -> u64 {
        self.serial.events().lost_output.load(Ordering::Relaxed)
    }
}

impl BusDevice for SerialDevice {
    /// Reads the register at `offset`; only the first byte of an access is served, the rest
    /// reads 0.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset < REGS {
            if let Some(byte) = data.first_mut() {
                // offset < 8.
                *byte = self.serial.read(offset as u8);
            }
        }
    }

    /// Writes the first byte of an access to the register at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceEvent {
        let Some(&value) = data.first() else {
            return DeviceEvent::None;
        };
        if offset >= REGS {
            return DeviceEvent::None;
        }
        // offset < 8.
        match self.serial.write(offset as u8, value) {
            Ok(()) => {}
            // Lost output is counted (and reported once) through the events.
            Err(SerialError::IOError(_)) => {}
            Err(e) => log::warn!("serial: register write at offset {offset}: {e}"),
        }
        if offset == MCR_OFFSET {
            let was_loopback = self.loopback;
            self.loopback = value & MCR_LOOP != 0;
            if was_loopback && !self.loopback && self.input_room() > 0 {
                // Host input can flow again; wake the feeder.
                self.serial.events().in_buffer_empty();
            }
        }
        DeviceEvent::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_util::{CountingTrigger, FailingTrigger};
    use std::sync::Mutex;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const IER_RDA: u8 = 0x01;
    const LSR_DATA_READY: u8 = 0x01;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct BrokenWriter;

    impl Write for BrokenWriter {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Fixture {
        dev: SerialDevice,
        irq: Arc<CountingTrigger>,
        room: Arc<CountingTrigger>,
        out: SharedBuf,
    }

    fn fixture() -> Fixture {
        let irq = Arc::new(CountingTrigger::default());
        let room = Arc::new(CountingTrigger::default());
        let out = SharedBuf::default();
        let dev = SerialDevice::new(irq.clone(), room.clone(), Box::new(out.clone()));
        Fixture {
            dev,
            irq,
            room,
            out,
        }
    }

    fn read_reg(dev: &mut SerialDevice, offset: u64) -> u8 {
        let mut data = [0xffu8];
        dev.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn guest_output_reaches_writer() {
        let mut f = fixture();
        for &b in b"hi\n" {
            assert_eq!(f.dev.write(DATA, &[b]), DeviceEvent::None);
        }
        assert_eq!(f.out.0.lock().unwrap().as_slice(), b"hi\n");
        assert_eq!(f.dev.lost_output_bytes(), 0);
    }

    #[test]
    fn lost_output_is_counted() {
        let mut dev = SerialDevice::new(
            Arc::new(CountingTrigger::default()),
            Arc::new(CountingTrigger::default()),
            Box::new(BrokenWriter),
        );
        dev.write(DATA, b"a");
        dev.write(DATA, b"b");
        assert_eq!(dev.lost_output_bytes(), 2);
    }

    #[test]
    fn enqueue_respects_fifo_room_and_drain_signals_room() {
        let mut f = fixture();
        f.dev.write(IER, &[IER_RDA]);
        assert_eq!(f.dev.input_room(), 64);
        let input: Vec<u8> = (0..100).collect();
        assert_eq!(f.dev.enqueue_input(&input), 64);
        assert_eq!(f.dev.input_room(), 0);
        assert_eq!(f.dev.enqueue_input(&input[64..]), 0);
        assert_eq!(f.dev.enqueue_input(&[]), 0);
        assert_eq!(f.irq.count(), 1);
        assert_eq!(read_reg(&mut f.dev, LSR) & LSR_DATA_READY, LSR_DATA_READY);

        for expected in 0..63u8 {
            assert_eq!(read_reg(&mut f.dev, DATA), expected);
        }
        assert_eq!(
            f.room.count(),
            0,
            "room signalled before the FIFO was drained"
        );
        assert_eq!(f.dev.input_room(), 63);
        assert_eq!(read_reg(&mut f.dev, DATA), 63);
        assert_eq!(f.room.count(), 1);
        assert_eq!(f.dev.input_room(), 64);
        assert_eq!(read_reg(&mut f.dev, LSR) & LSR_DATA_READY, 0);

        // The remaining bytes fit now.
        assert_eq!(f.dev.enqueue_input(&input[64..]), 36);
        assert_eq!(read_reg(&mut f.dev, DATA), 64);
    }

    #[test]
    fn partial_enqueue_keeps_order() {
        let mut f = fixture();
        assert_eq!(f.dev.enqueue_input(&[1u8; 60]), 60);
        assert_eq!(f.dev.enqueue_input(&[2, 3, 4, 5, 6, 7]), 4);
        assert_eq!(f.dev.input_room(), 0);
        for _ in 0..60 {
            assert_eq!(read_reg(&mut f.dev, DATA), 1);
        }
        for expected in 2..=5 {
            assert_eq!(read_reg(&mut f.dev, DATA), expected);
        }
    }

    #[test]
    fn failing_irq_does_not_lose_input() {
        let mut dev = SerialDevice::new(
            Arc::new(FailingTrigger),
            Arc::new(CountingTrigger::default()),
            Box::new(io::sink()),
        );
        dev.write(IER, &[IER_RDA]);
        assert_eq!(dev.enqueue_input(b"xy"), 2);
        assert_eq!(read_reg(&mut dev, DATA), b'x');
        assert_eq!(read_reg(&mut dev, DATA), b'y');
    }

    #[test]
    fn loopback_refuses_host_input() {
        let mut f = fixture();
        f.dev.write(MCR_OFFSET, &[MCR_LOOP]);
        assert_eq!(f.dev.input_room(), 0);
        assert_eq!(f.dev.enqueue_input(b"abc"), 0);
        // Bytes the guest transmits come back on the receive side.
        f.dev.write(DATA, b"z");
        assert_eq!(read_reg(&mut f.dev, DATA), b'z');
        assert!(f.out.0.lock().unwrap().is_empty());
        let before = f.room.count();
        f.dev.write(MCR_OFFSET, &[0x08]);
        assert_eq!(f.room.count(), before + 1);
        assert_eq!(f.dev.enqueue_input(b"abc"), 3);
    }

    #[test]
    fn out_of_range_and_wide_accesses() {
        let mut f = fixture();
        let mut data = [0xffu8; 2];
        f.dev.read(8, &mut data);
        assert_eq!(data, [0, 0]);
        // Scratch register: only the first byte of a wide write counts.
        f.dev.write(7, &[0x5a, 0xa5]);
        f.dev.read(7, &mut data);
        assert_eq!(data, [0x5a, 0]);
        assert_eq!(f.dev.write(9, &[1]), DeviceEvent::None);
        assert_eq!(f.dev.write(0, &[]), DeviceEvent::None);
    }
}

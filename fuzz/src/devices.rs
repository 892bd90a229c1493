//! Guest register accesses to every device through the PIO and MMIO buses, interleaved
//! with the VMM-side calls (GED notifications, hotplug inserts and removal requests, serial
//! input).
//!
//! Input: 4 header bytes (max vCPUs, boot vCPUs, memory slots, RTC clock seed), an 8-byte
//! clock value, then operations: a tag byte (bits 0-1 width 1/2/4/8, bit 2 write, bits
//! 3-7 the device or VMM call), an offset byte and an 8-byte value.
//!
//! Invariants: the bus serves exactly the accesses inside a device and zero-fills the
//! others; side-effect-free reads fill the whole buffer deterministically; the GED event
//! byte is read-clear and holds exactly the notified flags; the hotplug controllers report
//! only in-range CPUs and slots, eject only what the VMM asked to remove, and agree with a
//! shadow model; the ACPI PM, reset, pvpanic, exit and debug ports raise exactly the events
//! their registers define; the RTC's CMOS RAM keeps what was written and its clock
//! registers are valid.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use crate::CountingTrigger;
use minivmm::arch::x86_64::layout::{self, ports};
use minivmm::devices::acpi_pm::AcpiPm;
use minivmm::devices::cpu_hotplug::CpuHotplug;
use minivmm::devices::debug_exit::DebugExit;
use minivmm::devices::debug_port::DebugPort;
use minivmm::devices::ged::Ged;
use minivmm::devices::i8042::I8042;
use minivmm::devices::mem_hotplug::MemHotplug;
use minivmm::devices::pvpanic::PvPanic;
use minivmm::devices::reset_control::ResetControl;
use minivmm::devices::rtc::Rtc;
use minivmm::devices::serial::SerialDevice;
use minivmm::devices::{lock, Bus, BusDevice, DeviceEvent, ResetCause};

/// The RTC's clock in this process (seconds since the epoch), set per input.
static CLOCK: AtomicI64 = AtomicI64::new(0);

fn clock() -> i64 {
    CLOCK.load(Ordering::Relaxed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dev {
    Serial,
    Rtc,
    I8042,
    AcpiPm,
    ResetControl,
    DebugPort,
    PvPanic,
    DebugExit,
    Ged,
    CpuHotplug,
    MemHotplug,
}

const DEVICES: [(Dev, bool, u64, u64); 11] = [
    (
        Dev::Serial,
        true,
        ports::COM1 as u64,
        ports::COM1_SIZE as u64,
    ),
    (
        Dev::Rtc,
        true,
        ports::RTC_INDEX as u64,
        ports::RTC_SIZE as u64,
    ),
    (
        Dev::I8042,
        true,
        ports::I8042_DATA as u64,
        ports::I8042_SIZE as u64,
    ),
    (
        Dev::AcpiPm,
        true,
        ports::ACPI_SLEEP_CONTROL as u64,
        ports::ACPI_PM_SIZE as u64,
    ),
    (
        Dev::ResetControl,
        true,
        ports::RESET_CONTROL as u64,
        ports::RESET_CONTROL_SIZE as u64,
    ),
    (
        Dev::DebugPort,
        true,
        ports::DEBUG_PORT as u64,
        ports::DEBUG_PORT_SIZE as u64,
    ),
    (
        Dev::PvPanic,
        true,
        ports::PVPANIC as u64,
        ports::PVPANIC_SIZE as u64,
    ),
    (
        Dev::DebugExit,
        true,
        ports::EXIT_DEVICE_DEFAULT as u64,
        ports::EXIT_DEVICE_DEFAULT_SIZE as u64,
    ),
    (Dev::Ged, false, layout::GED_START, layout::GED_SIZE),
    (
        Dev::CpuHotplug,
        false,
        layout::CPU_HOTPLUG_START,
        layout::CPU_HOTPLUG_SIZE,
    ),
    (
        Dev::MemHotplug,
        false,
        layout::MEM_HOTPLUG_START,
        layout::MEM_HOTPLUG_SIZE,
    ),
];

/// VMM-side calls, after the devices in the tag's operation number.
const HOST_OPS: u8 = 8;

/// Shadow of a hotplug controller's VMM-visible state: (enabled, removal pending).
type Shadow = Vec<(bool, bool)>;

/// What the RTC should hold.
struct RtcShadow {
    index: u8,
    cmos: [u8; 128],
}

struct Machine {
    pio: Bus,
    mmio: Bus,
    ged: Arc<Mutex<Ged>>,
    cpu: Arc<Mutex<CpuHotplug>>,
    mem: Arc<Mutex<MemHotplug>>,
    serial: Arc<Mutex<SerialDevice>>,
    ged_irq: Arc<CountingTrigger>,
    ged_notifies: usize,
    ged_pending: u8,
    cpus: Shadow,
    slots: Shadow,
    rtc: RtcShadow,
    debug_port_writes: u64,
    debug_port_last: u8,
}

fn shared<T: BusDevice + 'static>(dev: T) -> Arc<Mutex<T>> {
    Arc::new(Mutex::new(dev))
}

impl Machine {
    fn new(max_cpus: u32, boot_cpus: u32, slots: usize) -> Self {
        let ged_irq = Arc::new(CountingTrigger::default());
        let ged = shared(Ged::new(ged_irq.clone()));
        let cpu = shared(CpuHotplug::new(max_cpus, boot_cpus));
        let mem = shared(MemHotplug::new(slots));
        let serial = shared(SerialDevice::new(
            Arc::new(CountingTrigger::default()),
            Arc::new(CountingTrigger::default()),
            Box::new(std::io::sink()),
        ));
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        for (dev, is_pio, base, len) in DEVICES {
            let device: Arc<Mutex<dyn BusDevice>> = match dev {
                Dev::Serial => serial.clone(),
                Dev::Rtc => shared(Rtc::new(clock)),
                Dev::I8042 => shared(I8042::new()),
                Dev::AcpiPm => shared(AcpiPm::new()),
                Dev::ResetControl => shared(ResetControl::new()),
                Dev::DebugPort => shared(DebugPort::new()),
                Dev::PvPanic => shared(PvPanic::new()),
                Dev::DebugExit => shared(DebugExit::new()),
                Dev::Ged => ged.clone(),
                Dev::CpuHotplug => cpu.clone(),
                Dev::MemHotplug => mem.clone(),
            };
            let bus = if is_pio { &mut pio } else { &mut mmio };
            bus.insert(base, len, device).expect("device layout");
        }
        let mut cmos = [0u8; 128];
        cmos[0x0a] = 0x26;
        cmos[0x0b] = 0x02;
        Machine {
            pio,
            mmio,
            ged,
            cpu,
            mem,
            serial,
            ged_irq,
            ged_notifies: 0,
            ged_pending: 0,
            cpus: (0..max_cpus).map(|i| (i < boot_cpus, false)).collect(),
            slots: vec![(false, false); slots],
            rtc: RtcShadow { index: 0, cmos },
            debug_port_writes: 0,
            debug_port_last: 0,
        }
    }

    fn host_op(&mut self, op: u8, offset: u8, value: u64) {
        let index = u32::from(offset);
        let i = usize::from(offset);
        match op {
            0 => {
                let flags = value as u8;
                lock(&self.ged).notify(flags).unwrap();
                self.ged_notifies += 1;
                self.ged_pending |= flags;
            }
            1 => {
                lock(&self.cpu).insert(index);
                if let Some(s) = self.cpus.get_mut(i) {
                    if !s.0 && !s.1 {
                        s.0 = true;
                    }
                }
            }
            2 => {
                lock(&self.cpu).request_removal(index);
                if let Some(s) = self.cpus.get_mut(i) {
                    if i != 0 && s.0 {
                        s.1 = true;
                    }
                }
            }
            3 => {
                let was = lock(&self.cpu).cancel_removal(index);
                let s = self
                    .cpus
                    .get_mut(i)
                    .map(|s| std::mem::replace(&mut s.1, false));
                assert_eq!(was, s == Some(true), "cancel_removal of CPU {index}");
            }
            4 => {
                let base = value & !0xfff;
                let size = (value >> 48) << 20;
                let result = lock(&self.mem).insert(i, base, size);
                let ok = self.slots.get(i).is_some_and(|s| !s.0 && !s.1)
                    && size != 0
                    && base.checked_add(size).is_some();
                assert_eq!(result.is_ok(), ok, "insert into slot {i}: {result:?}");
                if ok {
                    self.slots[i] = (true, false);
                }
            }
            5 => {
                let ok = lock(&self.mem).request_removal(i);
                let s = self.slots.get_mut(i);
                assert_eq!(ok, s.as_ref().is_some_and(|s| s.0), "removal of slot {i}");
                if let (true, Some(s)) = (ok, s) {
                    s.1 = true;
                }
            }
            6 => {
                let was = lock(&self.mem).cancel_removal(i);
                let s = self
                    .slots
                    .get_mut(i)
                    .map(|s| std::mem::replace(&mut s.1, false));
                assert_eq!(was, s == Some(true), "cancel_removal of slot {i}");
            }
            _ => {
                let bytes = value.to_le_bytes();
                let bytes = &bytes[..usize::from(offset % 9)];
                let mut serial = lock(&self.serial);
                let room = serial.input_room();
                assert!(room <= 64, "FIFO room {room}");
                let taken = serial.enqueue_input(bytes);
                assert!(taken <= bytes.len().min(room), "took {taken} of {bytes:?}");
            }
        }
    }

    fn access(&mut self, dev_index: usize, write: bool, width: usize, offset: u8, value: u64) {
        let (dev, is_pio, base, len) = DEVICES[dev_index];
        let offset = u64::from(offset) % (len + 2);
        let addr = base + offset;
        let inside = offset + width as u64 <= len;
        let bus = if is_pio { &self.pio } else { &self.mmio };
        if write {
            let data = &value.to_le_bytes()[..width];
            let Some(event) = bus.write(addr, data) else {
                assert!(!inside, "{dev:?}+{offset:#x}/{width}: write not served");
                return;
            };
            assert!(inside, "{dev:?}+{offset:#x}/{width}: write past the device");
            self.check_write(dev, offset, data, event);
        } else {
            let mut data = [0xa5u8; 8];
            let data = &mut data[..width];
            let served = bus.read(addr, data);
            assert_eq!(served, inside, "{dev:?}+{offset:#x}/{width}: read served");
            if !served {
                assert!(data.iter().all(|&b| b == 0), "unserved read not zeroed");
                return;
            }
            self.check_read(dev, offset, data);
        }
    }

    fn check_write(&mut self, dev: Dev, offset: u64, data: &[u8], event: DeviceEvent) {
        let first = data[0];
        let expected = match dev {
            Dev::AcpiPm => match offset {
                0 if first & 0x20 != 0 && (first >> 2) & 7 == layout::S5_SLEEP_TYPE => {
                    DeviceEvent::PowerOff
                }
                2 if first == layout::ACPI_RESET_VALUE => {
                    DeviceEvent::Reset(ResetCause::AcpiResetRegister)
                }
                _ => DeviceEvent::None,
            },
            Dev::ResetControl if first & 4 != 0 => DeviceEvent::Reset(ResetCause::ResetControl),
            Dev::PvPanic if first & 1 != 0 => DeviceEvent::Panic,
            Dev::DebugExit => {
                let mut bytes = [0u8; 4];
                let n = data.len().min(4);
                bytes[..n].copy_from_slice(&data[..n]);
                DeviceEvent::GuestExit(u32::from_le_bytes(bytes))
            }
            Dev::DebugPort => {
                self.debug_port_writes += 1;
                self.debug_port_last = first;
                if self.debug_port_writes == 1 {
                    DeviceEvent::BootMarker(first)
                } else {
                    DeviceEvent::None
                }
            }
            Dev::Rtc => {
                match offset {
                    0 => self.rtc.index = first & 0x7f,
                    1 => {
                        let i = self.rtc.index;
                        if !matches!(i, 0 | 2 | 4 | 6..=9 | 0x32 | 0x0c | 0x0d) {
                            self.rtc.cmos[usize::from(i)] = first;
                        }
                    }
                    _ => {}
                }
                DeviceEvent::None
            }
            Dev::I8042 => {
                // Only the command port's pulse-reset command resets the machine.
                if event != DeviceEvent::None {
                    assert_eq!(event, DeviceEvent::Reset(ResetCause::Keyboard));
                    assert_eq!(offset, 4, "i8042 reset from port offset {offset}");
                }
                event
            }
            Dev::CpuHotplug => {
                match event {
                    DeviceEvent::CpuEject(cpu) => {
                        let s = self.cpus.get_mut(cpu as usize);
                        assert!(
                            cpu != 0 && s.as_ref().is_some_and(|s| s.1),
                            "eject of CPU {cpu} without a pending removal"
                        );
                        if let Some(s) = s {
                            *s = (false, false);
                        }
                    }
                    DeviceEvent::CpuOst { cpu, .. } => {
                        assert!((cpu as usize) < self.cpus.len(), "_OST of CPU {cpu}")
                    }
                    DeviceEvent::None => {}
                    other => panic!("CPU hotplug raised {other:?}"),
                }
                event
            }
            Dev::MemHotplug => {
                match event {
                    DeviceEvent::MemEject(slot) => {
                        let s = self.slots.get_mut(slot as usize);
                        assert!(
                            s.as_ref().is_some_and(|s| s.1),
                            "eject of slot {slot} without a pending removal"
                        );
                        if let Some(s) = s {
                            *s = (false, false);
                        }
                    }
                    DeviceEvent::MemOst { slot, .. } => {
                        assert!((slot as usize) < self.slots.len(), "_OST of slot {slot}")
                    }
                    DeviceEvent::None => {}
                    other => panic!("memory hotplug raised {other:?}"),
                }
                event
            }
            _ => DeviceEvent::None,
        };
        assert_eq!(event, expected, "{dev:?}+{offset:#x} write {data:?}");
    }

    fn check_read(&mut self, dev: Dev, offset: u64, data: &[u8]) {
        let rest_zero = |data: &[u8]| data[1..].iter().all(|&b| b == 0);
        match dev {
            Dev::Ged => {
                assert_eq!(data[0], std::mem::take(&mut self.ged_pending), "GED byte");
            }
            Dev::CpuHotplug | Dev::MemHotplug => {
                // Reads have no side effects: a second read with another fill is equal.
                let mut again = [0x5au8; 8];
                let again = &mut again[..data.len()];
                let bus = &self.mmio;
                let base = if dev == Dev::CpuHotplug {
                    layout::CPU_HOTPLUG_START
                } else {
                    layout::MEM_HOTPLUG_START
                };
                assert!(bus.read(base + offset, again));
                assert_eq!(data, again, "{dev:?}+{offset:#x} read not filled");
                let mut image = [0u8; 0x1c];
                for (i, b) in image.iter_mut().enumerate() {
                    let mut byte = [0u8];
                    bus.read(base + i as u64, &mut byte);
                    *b = byte[0];
                }
                let u32_at = |o: usize| u32::from_le_bytes(image[o..o + 4].try_into().unwrap());
                if dev == Dev::CpuHotplug {
                    let flags = image[4];
                    assert_eq!(flags & !7, 0, "CPU flags {flags:#x}");
                    assert!(flags & 6 == 0 || flags & 1 != 0, "event on an absent CPU");
                    let cdat = u32_at(8);
                    assert!(
                        cdat == 0 || (cdat as usize) < self.cpus.len(),
                        "CDAT {cdat}"
                    );
                    assert!(image[0x0c..].iter().all(|&b| b == 0));
                } else {
                    let flags = image[0x14];
                    assert_eq!(flags & !7, 0, "memory flags {flags:#x}");
                    assert!(flags & 6 == 0 || flags & 1 != 0, "event on an empty slot");
                    let next = u32_at(0x18) as usize;
                    assert!(next <= self.slots.len(), "MNEV {next}");
                }
            }
            Dev::Rtc => {
                assert!(rest_zero(data));
                if offset == 1 {
                    self.check_rtc(data[0]);
                } else {
                    assert_eq!(data[0], 0);
                }
            }
            Dev::Serial | Dev::I8042 => assert!(rest_zero(data)),
            Dev::AcpiPm | Dev::DebugExit => assert!(data.iter().all(|&b| b == 0)),
            Dev::PvPanic => assert!(data[0] == 1 && rest_zero(data)),
            Dev::DebugPort => {
                assert!(data.iter().all(|&b| b == self.debug_port_last))
            }
            Dev::ResetControl => assert!(data[0] & 4 == 0 && rest_zero(data)),
        }
    }

    fn check_rtc(&self, value: u8) {
        let index = self.rtc.index;
        let reg_b = self.rtc.cmos[0x0b];
        let binary = reg_b & 0x04 != 0;
        let decode = |v: u8| {
            if binary {
                Some(v)
            } else if v >> 4 < 10 && v & 0xf < 10 {
                Some((v >> 4) * 10 + (v & 0xf))
            } else {
                None
            }
        };
        let in_range = |v: u8, lo: u8, hi: u8| decode(v).is_some_and(|v| (lo..=hi).contains(&v));
        let ok = match index {
            0 => in_range(value, 0, 59),
            2 => in_range(value, 0, 59),
            4 if reg_b & 0x02 != 0 => in_range(value, 0, 23),
            4 => in_range(value & 0x7f, 1, 12),
            6 => in_range(value, 1, 7),
            7 => in_range(value, 1, 31),
            8 => in_range(value, 1, 12),
            9 | 0x32 => in_range(value, 0, 99),
            0x0a => value == self.rtc.cmos[0x0a] & 0x7f,
            0x0c => value == 0,
            0x0d => value == 0x80,
            i => value == self.rtc.cmos[usize::from(i)],
        };
        assert!(
            ok,
            "RTC register {index:#x} reads {value:#x} (B={reg_b:#x})"
        );
    }

    fn check_end(&self) {
        assert_eq!(
            self.ged_irq.count(),
            self.ged_notifies,
            "one GED edge per notify"
        );
        let cpu = lock(&self.cpu);
        let enabled = self.cpus.iter().filter(|s| s.0).count() as u32;
        assert_eq!(cpu.enabled_count(), enabled);
        let pending: Vec<u32> = (0u32..)
            .zip(&self.cpus)
            .filter(|(_, s)| s.1)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(cpu.pending_removals(), pending);
        for (i, s) in self.cpus.iter().enumerate() {
            assert_eq!(cpu.is_enabled(i as u32), s.0, "CPU {i}");
        }
        let mem = lock(&self.mem);
        for (i, s) in self.slots.iter().enumerate() {
            assert_eq!(mem.is_enabled(i), s.0, "slot {i}");
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = crate::Input::new(data);
    let max_cpus = 1 + u32::from(input.u8()) % layout::MAX_VCPUS;
    let boot_cpus = 1 + u32::from(input.u8()) % max_cpus;
    let slots = usize::from(input.u8()) % (layout::MAX_MEMORY_HOTPLUG_SLOTS + 1);
    let clock_kind = input.u8();
    let raw_clock = input.u64() as i64;
    CLOCK.store(
        match clock_kind % 3 {
            // Around today, then the whole range the arithmetic must survive.
            0 => 1_700_000_000 + (raw_clock & 0xfff_ffff),
            1 => raw_clock % (400 * 366 * 86_400 * 1000),
            _ => raw_clock,
        },
        Ordering::Relaxed,
    );
    let mut m = Machine::new(max_cpus, boot_cpus, slots);
    let ops = DEVICES.len() as u8 + HOST_OPS;
    while !input.is_empty() {
        let tag = input.u8();
        let offset = input.u8();
        let value = input.u64();
        let op = (tag >> 3) % ops;
        let width = 1usize << (tag & 3);
        let write = tag & 4 != 0;
        if usize::from(op) < DEVICES.len() {
            m.access(usize::from(op), write, width, offset, value);
        } else {
            m.host_op(op - DEVICES.len() as u8, offset, value);
        }
    }
    m.check_end();
}

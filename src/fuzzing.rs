//! Entry points for the fuzz targets in `fuzz/`: thin wrappers over crate-internal code.
//!
//! Compiled only with the `fuzzing` feature; not a stable API. Each `run` function takes one
//! fuzz input, drives the crate's own code with it and panics when an invariant is broken (a
//! panic is what libFuzzer reports as a crash). The harnesses live here rather than in `fuzz/`
//! because the code they drive is crate-internal.
//!
//! - [`control_line`]: framing, parsing and dispatch of control lines against a model VM made
//!   of the real resize planner, CPU manager and memory manager (no KVM).
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

/// A [`crate::devices::Trigger`] that counts how often it fired.
#[derive(Debug, Default)]
struct CountingTrigger(std::sync::atomic::AtomicUsize);

impl CountingTrigger {
    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl crate::devices::Trigger for CountingTrigger {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

pub mod control_line {
    //! The control pipe: bytes → [`LineReader`] (in fuzzer-chosen chunks) → [`handle`] against
    //! [`ModelVm`].
    //!
    //! Input: 6 header bytes (max vCPUs, boot vCPUs, boot RAM with the removable and KVM-fails
    //! bits, hotplug window, chunking seed, guest-behaviour seed), then the client's byte stream.
    //!
    //! Resizes run through [`resize::transact`], the transaction minivmm runs, on the real CPU
    //! and memory managers; only KVM is a model, whose memory and vCPU operations fail now and
    //! then when the input asks, so the rollback paths are fuzzed too.
    //!
    //! Invariants: framing does not depend on how the stream is split into reads; every framed
    //! line gets exactly one reply line (`ok...` or `error...`, no control characters); a line
    //! that does not parse never reaches the target; the model's state stays within its limits
    //! (vCPUs in `1..=max`, RAM within `64M..=max`, hot-added slots inside the window and below
    //! the slot count), KVM's mapped RAM is exactly the managers' slots, a refused resize leaves
    //! KVM as it was (but for slots the guest had ejected) and `info` reports the state.

    use std::time::Duration;

    use crate::config::{MemoryConfig, MEMORY_SIZE_ALIGN, MIN_MEMORY_SIZE};
    use crate::control::protocol::{
        error_reply, handle, parse_request, ControlTarget, Line, LineReader, Request, VmInfo,
        MAX_LINE,
    };
    use crate::devices::{lock, BusDevice, DeviceEvent};
    use crate::vmm::cpus::CpuManager;
    use crate::vmm::memory::MemoryManager;
    use crate::vmm::resize;

    /// One boot of the model: the real CPU and memory managers, with a model of KVM's side
    /// (memory slots and vCPU threads) that fails when the input says so.
    struct Boot {
        cpus: CpuManager,
        memory: MemoryManager,
        kvm: FakeKvm,
    }

    /// What a resize asks of KVM, recorded; every `fail_every`-th operation fails.
    #[derive(Default)]
    struct FakeKvm {
        /// Mapped hot-added RAM, (start, size), in mapping order.
        mapped: Vec<(u64, u64)>,
        /// vCPUs the resize in progress has started.
        started: std::collections::BTreeSet<u32>,
        ops: u32,
        fail_every: u32,
    }

    impl FakeKvm {
        fn op(&mut self, what: &str) -> Result<(), String> {
            self.ops += 1;
            if self.fail_every != 0 && self.ops.is_multiple_of(self.fail_every) {
                return Err(format!("{what}: injected failure"));
            }
            Ok(())
        }
    }

    impl resize::Backend for Boot {
        fn add_memory(&mut self, start: u64, size: u64) -> Result<(), String> {
            self.kvm.op("add_memory")?;
            let end = start + size;
            assert!(
                self.kvm
                    .mapped
                    .iter()
                    .all(|&(s, n)| end <= s || start >= s + n),
                "{start:#x}+{size:#x} overlaps mapped RAM {:x?}",
                self.kvm.mapped
            );
            self.kvm.mapped.push((start, size));
            Ok(())
        }

        fn remove_last_memory(&mut self) -> Result<(), String> {
            assert!(
                self.kvm.mapped.pop().is_some(),
                "unmapping with none mapped"
            );
            Ok(())
        }

        fn start_vcpu(&mut self, id: u32) -> Result<(), String> {
            self.kvm.op("start_vcpu")?;
            assert!(
                !lock(&self.cpus.device()).is_enabled(id),
                "vCPU {id} started while present"
            );
            self.kvm.started.insert(id);
            Ok(())
        }

        fn stop_vcpu(&mut self, id: u32) {
            assert!(
                self.kvm.started.remove(&id),
                "vCPU {id} stopped but not started"
            );
        }
    }

    impl resize::Machine for Boot {
        fn cpus(&mut self) -> &mut CpuManager {
            &mut self.cpus
        }

        fn memory(&mut self) -> &mut MemoryManager {
            &mut self.memory
        }

        fn reap_memory(&mut self) -> crate::vmm::memory::Step {
            let mapped = &mut self.kvm.mapped;
            self.memory.reap_ejected(&mut |start| {
                let i = mapped
                    .iter()
                    .position(|&(s, _)| s == start)
                    .ok_or_else(|| format!("unmapping {start:#x}: not mapped"))?;
                assert_eq!(i + 1, mapped.len(), "only the top slot is unmapped");
                mapped.pop();
                Ok(())
            })
        }

        fn notify(&mut self, _flags: u8) {}
    }

    /// A VM as the control pipe sees it: validation by [`resize::plan`], state kept by the
    /// crate's [`CpuManager`] and [`MemoryManager`] and their hotplug controllers, guest
    /// behaviour simulated through the controllers' registers.
    pub struct ModelVm {
        max_cpus: u32,
        config: MemoryConfig,
        boot: Option<Boot>,
        next_cpus: u32,
        next_mem: u64,
        reboot_requested: bool,
        /// Every this many KVM operations of a resize fails (0: none).
        fail_every: u32,
        /// Calls into the target (any method but `info`).
        pub calls: usize,
    }

    impl ModelVm {
        /// A running VM with `boot_cpus` of `max_cpus` vCPUs and `config`'s memory.
        pub fn new(max_cpus: u32, boot_cpus: u32, config: MemoryConfig, fail_every: u32) -> Self {
            let mut vm = ModelVm {
                fail_every,
                max_cpus,
                next_cpus: boot_cpus,
                next_mem: config.size,
                config,
                boot: None,
                reboot_requested: false,
                calls: 0,
            };
            vm.start();
            vm
        }

        fn start(&mut self) {
            self.boot = Some(Boot {
                cpus: CpuManager::new(self.max_cpus, self.next_cpus),
                memory: MemoryManager::new(self.next_mem, &self.config),
                kvm: FakeKvm {
                    fail_every: self.fail_every,
                    ..FakeKvm::default()
                },
            });
        }

        /// Performs a requested reboot (the event loop does it after the reply is sent).
        pub fn after_reply(&mut self) {
            if std::mem::take(&mut self.reboot_requested) && self.boot.is_some() {
                self.start();
            }
        }

        /// The guest's reaction between two requests, chosen by `action`: nothing, eject what
        /// is pending (through the controllers' registers, as the guest's AML does), or refuse
        /// it (as after an `_OST` failure report).
        pub fn guest_step(&mut self, action: u8) {
            let Some(b) = self.boot.as_mut() else {
                return;
            };
            match action % 4 {
                1 => {
                    for cpu in b.cpus.removing() {
                        let dev = b.cpus.device();
                        let mut dev = lock(&dev);
                        dev.write(0, &cpu.to_le_bytes());
                        let event = dev.write(4, &[1 << 3]);
                        assert_eq!(event, DeviceEvent::CpuEject(cpu), "eject of vCPU {cpu}");
                        drop(dev);
                        b.cpus.reap(cpu);
                    }
                }
                2 => {
                    for cpu in b.cpus.removing() {
                        assert!(b.cpus.withdraw_removal(cpu));
                    }
                    if let Some(slot) = b.memory.removing() {
                        assert!(b.memory.withdraw(slot, "busy").is_some());
                    }
                }
                3 => {
                    if let Some(slot) = b.memory.removing() {
                        let dev = b.memory.device();
                        let mut dev = lock(&dev);
                        dev.write(0, &(slot as u32).to_le_bytes());
                        let event = dev.write(0x14, &[1 << 3]);
                        assert_eq!(event, DeviceEvent::MemEject(slot as u32), "eject of slot");
                        drop(dev);
                        resize::Machine::reap_memory(b);
                    }
                }
                _ => {}
            }
        }

        /// Panics unless the state is within the configured limits.
        pub fn check_limits(&self) {
            let max_mem = self.config.max();
            assert!((1..=self.max_cpus).contains(&self.next_cpus));
            assert!(
                (MIN_MEMORY_SIZE..=max_mem).contains(&self.next_mem)
                    && self.next_mem.is_multiple_of(MEMORY_SIZE_ALIGN),
                "pending RAM {:#x} (max {max_mem:#x})",
                self.next_mem
            );
            let Some(b) = &self.boot else {
                return;
            };
            let (present, target) = (b.cpus.present(), b.cpus.target());
            assert!((1..=self.max_cpus).contains(&present), "{present} vCPUs");
            assert!((1..=self.max_cpus).contains(&target), "target {target}");
            let removing = b.cpus.removing();
            assert!(
                removing.iter().all(|&c| c > 0 && c < present),
                "removing {removing:?} of {present}"
            );
            assert!(lock(&b.cpus.device()).is_enabled(0), "vCPU 0 is present");

            let size = b.memory.size();
            assert!(size >= MIN_MEMORY_SIZE && size <= max_mem, "RAM {size:#x}");
            let window = b.memory.window();
            assert!(b.memory.hotplugged() <= window.end - window.start);
            let (slots, used) = b.memory.slots();
            assert!(used <= slots, "{used} of {slots} memory slots");
            for slot in 0..slots {
                assert_eq!(
                    lock(&b.memory.device()).is_enabled(slot),
                    slot < used,
                    "memory slot {slot} of {used} used"
                );
            }
            if let Some(slot) = b.memory.removing() {
                assert_eq!(slot + 1, used, "only the top slot is removed");
            }
            let mapped: Vec<u64> = b.kvm.mapped.iter().map(|&(_, size)| size).collect();
            assert_eq!(
                mapped,
                b.memory.slot_sizes(),
                "KVM's RAM is the managers' slots"
            );
        }
    }

    impl ControlTarget for ModelVm {
        fn info(&self) -> VmInfo {
            let stopped = VmInfo {
                state: "stopped",
                cpus: 0,
                pending_cpus: self.next_cpus,
                max_cpus: self.max_cpus,
                mem: 0,
                pending_mem: self.next_mem,
                max_mem: self.config.max(),
                hotplug_slots_free: 0,
                removing: Vec::new(),
                removing_mem: Vec::new(),
                last_ost: Some("cpu1:eject:busy".into()),
                uptime: Duration::from_millis(1234),
                boot_marker: None,
            };
            let Some(b) = &self.boot else {
                return stopped;
            };
            let (slots, used) = b.memory.slots();
            VmInfo {
                state: "running",
                cpus: b.cpus.present(),
                pending_cpus: b.cpus.target(),
                mem: b.memory.size(),
                hotplug_slots_free: (slots - used) as u32,
                removing: b.cpus.removing(),
                removing_mem: b.memory.removing().map(|s| s as u32).into_iter().collect(),
                boot_marker: Some(Duration::from_millis(42)),
                ..stopped
            }
        }

        fn resize(&mut self, cpus: Option<u32>, mem: Option<u64>) -> Result<VmInfo, String> {
            self.calls += 1;
            let Some(b) = self.boot.as_mut() else {
                return Err("the VM is not running".into());
            };
            let limits = resize::Limits {
                max_cpus: self.max_cpus,
                max_mem: self.config.max(),
                target_mem: self.next_mem,
            };
            let before = b.kvm.mapped.clone();
            b.kvm.started.clear();
            let mut events = Vec::new();
            match resize::transact(b, &limits, cpus, mem, &mut events) {
                Ok(pending) => {
                    if let Some(want) = pending {
                        self.next_mem = want;
                    }
                }
                Err(e) => {
                    // Reaping may have unmapped ejected slots; nothing else may change.
                    let mapped = &b.kvm.mapped;
                    assert!(
                        before.starts_with(mapped),
                        "a refused resize ({e}) left {mapped:x?} mapped, was {before:x?}"
                    );
                    let started = &b.kvm.started;
                    assert!(
                        started.is_empty(),
                        "a refused resize ({e}) left {started:?} running"
                    );
                    return Err(e);
                }
            }
            Ok(self.info())
        }

        fn reboot(&mut self) -> Result<(), String> {
            self.calls += 1;
            if let Some(b) = &self.boot {
                self.next_cpus = b.cpus.target();
            }
            self.reboot_requested = true;
            Ok(())
        }

        fn shutdown(&mut self) -> Result<(), String> {
            self.calls += 1;
            self.boot = None;
            Ok(())
        }

        fn power_button(&mut self) -> Result<(), String> {
            self.calls += 1;
            match self.boot {
                Some(_) => Ok(()),
                None => Err("the VM is not running".into()),
            }
        }
    }

    /// Frames `stream` pushing it in chunks whose sizes come from `seed` (`None`: in one push).
    fn frame(stream: &[u8], seed: Option<u8>) -> (Vec<Line>, bool) {
        let mut reader = LineReader::new();
        let mut lines = Vec::new();
        let mut rng = super::Rng::new(u64::from(seed.unwrap_or(0)));
        let mut rest = stream;
        while !rest.is_empty() {
            let max = match seed.map(|s| s & 3) {
                None => u64::MAX - 1,
                Some(0) => 64,
                Some(1) => 8,
                Some(2) => 600,
                _ => 2 * MAX_LINE as u64,
            };
            let n = (1 + rng.below(max)).min(rest.len() as u64) as usize;
            let (chunk, tail) = rest.split_at(n);
            lines.extend(reader.push(chunk));
            rest = tail;
        }
        (lines, reader.has_partial())
    }

    /// The value of `key=` in an `ok` reply.
    fn field<'a>(reply: &'a str, key: &str) -> Option<&'a str> {
        reply
            .split([' ', '\n'])
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    /// Runs one input.
    pub fn run(data: &[u8]) {
        let mut input = super::Input::new(data);
        let max_cpus = 1 + u32::from(input.u8()) % crate::arch::x86_64::layout::MAX_VCPUS;
        let boot_cpus = 1 + u32::from(input.u8()) % max_cpus;
        let mem = input.u8();
        let window = input.u8();
        let chunk_seed = input.u8();
        let guest_seed = input.u8();
        let config = MemoryConfig {
            size: MIN_MEMORY_SIZE + u64::from(mem & 0x3f) * (32 << 20),
            hotplug_size: u64::from(window % 80) * (128 << 20),
            removable: mem & 0x40 != 0,
            ..MemoryConfig::default()
        };
        let stream = input.rest();

        // Framing: the same lines whatever the read sizes; lines are bounded and '\n'-free.
        let (lines, partial) = frame(stream, Some(chunk_seed));
        let (whole, whole_partial) = frame(stream, None);
        assert_eq!(lines, whole, "framing depends on the read sizes");
        assert_eq!(partial, whole_partial);
        let newlines = stream.iter().filter(|&&b| b == b'\n').count();
        let tail = &stream[stream
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)..];
        let tail_too_long = tail.len() >= MAX_LINE;
        assert_eq!(lines.len(), newlines + usize::from(tail_too_long));
        assert_eq!(partial, !tail.is_empty() && !tail_too_long);
        for line in &lines {
            if let Line::Complete(bytes) = line {
                assert!(bytes.len() < MAX_LINE && !bytes.contains(&b'\n'));
            }
        }

        // Boot RAM bit 7: KVM fails now and then, every 2nd to 8th operation.
        let fail_every = if mem & 0x80 != 0 {
            2 + u32::from(chunk_seed >> 2) % 7
        } else {
            0
        };
        let mut vm = ModelVm::new(max_cpus, boot_cpus, config, fail_every);
        vm.check_limits();
        for (i, line) in lines.iter().enumerate() {
            let calls = vm.calls;
            let reply = handle(line, &mut vm);
            let text = reply.line.as_str();
            let body = text
                .strip_suffix('\n')
                .unwrap_or_else(|| panic!("reply {text:?} does not end a line"));
            assert!(
                !body.chars().any(char::is_control),
                "reply {text:?} is not one clean line"
            );
            assert!(
                body == "ok" || body.starts_with("ok ") || body.starts_with("error"),
                "reply {text:?}"
            );
            let parsed = match line {
                Line::Complete(bytes) => parse_request(bytes),
                Line::TooLong => Err(crate::control::protocol::RequestError::TooLong),
            };
            match parsed {
                Err(e) => {
                    assert_eq!(text, error_reply(&e.to_string()));
                    assert_eq!(vm.calls, calls, "a refused line reached the target");
                    assert!(!reply.subscribe);
                }
                Ok(request) => {
                    assert_eq!(reply.subscribe, request == Request::Watch);
                    match request {
                        Request::Ping => assert_eq!(text, "ok pong\n"),
                        Request::Info => {
                            let info = vm.info();
                            assert_eq!(field(text, "state"), Some(info.state));
                            assert_eq!(field(text, "cpus"), Some(&*info.cpus.to_string()));
                            assert_eq!(field(text, "max_cpus"), Some(&*info.max_cpus.to_string()));
                        }
                        Request::Resize { .. } if body.starts_with("ok") => {
                            let info = vm.info();
                            assert_eq!(field(text, "cpus"), Some(&*info.cpus.to_string()));
                            assert_eq!(
                                field(text, "pending_cpus"),
                                Some(&*info.pending_cpus.to_string())
                            );
                        }
                        _ => {}
                    }
                }
            }
            vm.after_reply();
            vm.guest_step(guest_seed.rotate_right(2 * (i as u32 % 4)));
            vm.check_limits();
        }
    }
}

pub mod devices {
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

    use super::CountingTrigger;
    use crate::arch::x86_64::layout::{self, ports};
    use crate::devices::acpi_pm::AcpiPm;
    use crate::devices::cpu_hotplug::CpuHotplug;
    use crate::devices::debug_exit::DebugExit;
    use crate::devices::debug_port::DebugPort;
    use crate::devices::ged::Ged;
    use crate::devices::i8042::I8042;
    use crate::devices::mem_hotplug::MemHotplug;
    use crate::devices::pvpanic::PvPanic;
    use crate::devices::reset_control::ResetControl;
    use crate::devices::rtc::Rtc;
    use crate::devices::serial::SerialDevice;
    use crate::devices::{lock, Bus, BusDevice, DeviceEvent, ResetCause};

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
            let in_range =
                |v: u8, lo: u8, hi: u8| decode(v).is_some_and(|v| (lo..=hi).contains(&v));
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
        let mut input = super::Input::new(data);
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
}

pub mod acpi {
    //! ACPI table generation.
    //!
    //! Input: 4 bytes making an arbitrary valid [`AcpiConfig`] (boot vCPUs `1..=max`, max
    //! vCPUs `1..=254`, memory slots `0..=64`, removable memory, pvpanic, virtio-mmio devices).
    //!
    //! Invariants: [`build`] succeeds; the tables written into guest memory are found again from
    //! the RSDP alone: the RSDP and every table checksum to 0, header lengths match, the XSDT
    //! lists the FADT and the MADT, the FADT points at the DSDT, tables lie inside the ACPI
    //! area without overlapping; the MADT lists exactly the possible CPUs with the boot ones
    //! enabled; the DSDT declares one device per possible CPU and memory slot.

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use crate::acpi::{build, write, AcpiConfig};
    use crate::arch::x86_64::layout;

    /// Offset of the 64-bit DSDT address in the FADT (ACPI 6.x, `X_DSDT`).
    const FADT_X_DSDT: usize = 140;
    /// Offset of the 32-bit DSDT address in the FADT (0 when only `X_DSDT` is used).
    const FADT_DSDT: usize = 40;
    /// Length of the MADT header (standard header, local APIC address and flags).
    const MADT_HEADER_LEN: usize = 44;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Reads the table at `addr` from guest memory and checks its header: signature, length
    /// (at least the 36-byte header, inside the ACPI area) and checksum.
    fn read_table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let mut header = [0u8; 36];
        mem.read_slice(&mut header, GuestAddress(addr))
            .unwrap_or_else(|e| panic!("table at {addr:#x}: {e}"));
        assert_eq!(&header[..4], signature, "signature at {addr:#x}");
        let len = u32_at(&header, 4) as u64;
        assert!(len >= 36, "{signature:?} length {len}");
        assert!(
            addr >= layout::RSDP_START && addr + len <= layout::ACPI_END,
            "{signature:?} at {addr:#x}+{len:#x} outside the ACPI area"
        );
        let mut bytes = vec![0u8; len as usize];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&bytes), 0, "{signature:?} checksum");
        bytes
    }

    /// The configuration encoded by the first 4 bytes of `data`.
    pub fn config(data: &[u8]) -> AcpiConfig {
        let mut input = super::Input::new(data);
        let max_cpus = 1 + u32::from(input.u8()) % layout::MAX_VCPUS;
        let boot_cpus = 1 + u32::from(input.u8()) % max_cpus;
        let memory_slots = usize::from(input.u8()) % (layout::MAX_MEMORY_HOTPLUG_SLOTS + 1);
        let flags = input.u8();
        AcpiConfig {
            boot_cpus,
            max_cpus,
            memory_slots,
            memory_removable: flags & 1 != 0,
            pvpanic: flags & 2 != 0,
            virtio_devices: usize::from(flags >> 2) % (layout::MAX_VIRTIO_DEVICES + 1),
        }
    }

    /// Runs one input.
    pub fn run(data: &[u8]) {
        let cfg = config(data);
        let tables = build(&cfg).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
        // Guest memory below 1 MiB, reused (and cleared) across inputs.
        static MEM: std::sync::OnceLock<GuestMemoryMmap> = std::sync::OnceLock::new();
        let mem = MEM.get_or_init(|| {
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), layout::HIMEM_START as usize)])
                .unwrap()
        });
        let area = (layout::ACPI_END - layout::RSDP_START) as usize;
        mem.write_slice(&vec![0u8; area], GuestAddress(layout::RSDP_START))
            .unwrap();
        write(mem, &tables).unwrap();

        // Placement as reported: aligned, ascending, not overlapping, inside the area.
        let mut end = tables.rsdp.addr + tables.rsdp.bytes.len() as u64;
        for t in &tables.tables {
            assert_eq!(t.addr % 16, 0, "{} alignment", t.signature);
            assert!(t.addr >= end, "{} overlaps", t.signature);
            assert_eq!(
                u32_at(&t.bytes, 4) as usize,
                t.bytes.len(),
                "{}",
                t.signature
            );
            end = t.addr + t.bytes.len() as u64;
        }
        assert!(end <= layout::ACPI_END);

        // From the RSDP alone, as the guest finds them.
        assert_eq!(tables.rsdp.addr, layout::RSDP_START);
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(layout::RSDP_START))
            .unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        let xsdt = read_table(mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!((xsdt.len() - 36) % 8, 0, "XSDT entries");
        let mut found = Vec::new();
        for off in (36..xsdt.len()).step_by(8) {
            let addr = u64_at(&xsdt, off);
            let mut signature = [0u8; 4];
            mem.read_slice(&mut signature, GuestAddress(addr)).unwrap();
            found.push((signature, read_table(mem, addr, &signature)));
        }
        let signatures: Vec<&[u8; 4]> = found.iter().map(|(s, _)| s).collect();
        assert_eq!(signatures, [b"FACP", b"APIC"], "XSDT entries");
        let fadt = &found[0].1;
        let dsdt_addr = u64_at(fadt, FADT_X_DSDT);
        let dsdt32 = u64::from(u32_at(fadt, FADT_DSDT));
        assert!(dsdt32 == 0 || dsdt32 == dsdt_addr, "FADT DSDT {dsdt32:#x}");
        let dsdt = read_table(mem, dsdt_addr, b"DSDT");

        // Every table the builder made is reachable, and nothing else.
        let mut reached = vec![dsdt_addr, u64_at(&rsdp, 24)];
        reached.extend((36..xsdt.len()).step_by(8).map(|off| u64_at(&xsdt, off)));
        reached.sort_unstable();
        let mut built: Vec<u64> = tables.tables.iter().map(|t| t.addr).collect();
        built.sort_unstable();
        assert_eq!(reached, built, "tables reachable from the RSDP");

        // MADT: one local APIC per possible CPU, the boot ones enabled.
        let madt = &found[1].1;
        let mut off = MADT_HEADER_LEN;
        let mut cpus = Vec::new();
        while off < madt.len() {
            assert!(off + 2 <= madt.len(), "MADT entry header past the end");
            let (kind, len) = (madt[off], usize::from(madt[off + 1]));
            assert!(len >= 2 && off + len <= madt.len(), "MADT entry at {off}");
            if kind == 0 {
                assert_eq!(len, 8);
                assert_eq!(madt[off + 2], madt[off + 3], "UID = APIC ID");
                cpus.push((madt[off + 3], u32_at(madt, off + 4)));
            }
            off += len;
        }
        assert_eq!(cpus.len(), cfg.max_cpus as usize, "MADT CPUs");
        for (i, &(id, flags)) in cpus.iter().enumerate() {
            assert_eq!(usize::from(id), i);
            let want = if (i as u32) < cfg.boot_cpus { 1 } else { 2 };
            assert_eq!(flags, want, "MADT flags of CPU {i}");
        }

        // DSDT: a device per possible CPU and per memory slot, no more.
        let has = |name: &str| dsdt.windows(name.len()).any(|w| w == name.as_bytes());
        let cpu_name = |cpu: u32| format!("C{cpu:03X}");
        let mem_name = |slot: usize| format!("M{slot:03}");
        assert!(
            has(&cpu_name(0)) && has(&cpu_name(cfg.max_cpus - 1)),
            "CPU devices"
        );
        assert!(!has(&cpu_name(cfg.max_cpus)), "CPU device past max_cpus");
        if cfg.memory_slots > 0 {
            assert!(has(&mem_name(cfg.memory_slots - 1)), "memory devices");
        }
        assert!(
            !has(&mem_name(cfg.memory_slots)),
            "memory device past the slots"
        );
        assert_eq!(has("QEMU0001"), cfg.pvpanic, "pvpanic");
        assert_eq!(
            has("LNRO0005"),
            cfg.virtio_devices > 0,
            "virtio-mmio devices"
        );
    }
}

pub mod boot_loader {
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

    use crate::arch::x86_64::boot::{configure_system, load_initramfs, load_kernel, BootProtocol};
    use crate::arch::x86_64::layout::HIMEM_START;

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
            let rc = unsafe {
                libc::mincore(self.base as *mut libc::c_void, MEM_SIZE, vec.as_mut_ptr())
            };
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
            Err(crate::arch::x86_64::boot::BootError::InitramfsTooLarge { .. }) => {}
            Err(e) => panic!("load_initramfs: {e}"),
        }
    }
}

pub mod virtio {
    //! The virtio-mmio transport over a virtio-blk device (an in-memory disk, sometimes
    //! read-only, sometimes with a failing sector) or a virtio-vsock device (a muxer listening
    //! in a temp dir made once per process), with 1 MiB of guest memory at 0 and sometimes a
    //! second region above a hole.
    //!
    //! Input: a config byte (bit 0 vsock, bit 1 read-only disk, bit 2 second memory region,
    //! bits 3-4 disk sectors, bits 5-6 a partial last sector, bit 7 a failing disk sector), then
    //! operations: a tag byte and its arguments (register reads and writes of any offset and
    //! width; "negotiate and set up every queue" and "set up queue N at A/B/C" shortcuts; raw
    //! guest memory writes; descriptors, avail-ring pushes and whole requests written into a
    //! queue the harness set up; kicks; for vsock, host clients connecting and writing).
    //!
    //! Invariants: `process` returns (libFuzzer's `-timeout` catches a hang); `InterruptStatus`
    //! holds only bits 0-1; after a status-0 write the device reads as reset (status 0, every
    //! `QueueReady` 0); on a queue whose rings the harness knows, a kick advances the used index
    //! by at most the chains that were available, and each new used element names a head inside
    //! the queue and has length 0 or at most the bytes its chain's writable descriptors cover
    //! (checked only where nothing else the device writes, another queue's used ring or a buffer
    //! of a pending chain, lies over that used ring); a
    //! read-only disk's bytes never change, the disk never changes size, and bytes past its
    //! last whole sector never change. A register write (a vCPU thread's part) never changes the
    //! vsock muxer's connections; a reset drops them all once the harness settles the device, as
    //! the event loop does on `DeviceEvent::VirtioStatus`.

    use std::io::Write as _;
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex, OnceLock};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::{CountingTrigger, Input};
    use crate::devices::virtio::block::{Block, Disk};
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::vsock::muxer::{Interest, VsockMuxer};
    use crate::devices::virtio::vsock::Vsock;
    use crate::devices::virtio::{Wake, VIRTIO_F_VERSION_1};
    use crate::devices::{lock, BusDevice, DeviceEvent};

    const MAGIC: u64 = 0x000;
    const DEVICE_FEATURES: u64 = 0x010;
    const DEVICE_FEATURES_SEL: u64 = 0x014;
    const DRIVER_FEATURES: u64 = 0x020;
    const DRIVER_FEATURES_SEL: u64 = 0x024;
    const QUEUE_SEL: u64 = 0x030;
    const QUEUE_NUM_MAX: u64 = 0x034;
    const QUEUE_NUM: u64 = 0x038;
    const QUEUE_READY: u64 = 0x044;
    const INTERRUPT_STATUS: u64 = 0x060;
    const STATUS: u64 = 0x070;
    const QUEUE_DESC_LOW: u64 = 0x080;
    const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    const CONFIG: u64 = 0x100;

    const DRIVER_OK: u32 = 4;
    const FEATURES_OK: u32 = 8;
    const NEEDS_RESET: u32 = 0x40;
    const FAILED: u32 = 0x80;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    /// Guest memory: 1 MiB at 0, and with config bit 2 256 KiB at 1 MiB + 64 KiB.
    const LOW_SIZE: u64 = 0x10_0000;
    const HIGH_START: u64 = 0x11_0000;
    const HIGH_SIZE: u64 = 0x4_0000;
    /// Where request buffers go (the rings stay below).
    const DATA: u64 = 0x8_0000;
    /// The guest CID of the vsock device.
    const CID: u64 = 3;

    /// An in-memory disk that, like a file, grows when written past its end; `fail` is a byte
    /// offset whose sector fails every read and write.
    struct MemDisk {
        bytes: Mutex<Vec<u8>>,
        fail: Option<u64>,
    }

    impl MemDisk {
        fn check(&self, offset: u64, len: usize) -> std::io::Result<()> {
            match self.fail {
                Some(f) if f >= offset && f < offset.saturating_add(len as u64) => {
                    Err(std::io::Error::other("injected disk error"))
                }
                _ => Ok(()),
            }
        }
    }

    impl Disk for MemDisk {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.check(offset, buf.len())?;
            let d = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
            let o = usize::try_from(offset).map_err(std::io::Error::other)?;
            let src = o
                .checked_add(buf.len())
                .and_then(|end| d.get(o..end))
                .ok_or(std::io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            Ok(())
        }

        fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.check(offset, buf.len())?;
            let mut d = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
            let o = usize::try_from(offset).map_err(std::io::Error::other)?;
            let end = o
                .checked_add(buf.len())
                .ok_or(std::io::ErrorKind::InvalidInput)?;
            assert!(end <= 1 << 24, "disk write at {o:#x}+{:#x}", buf.len());
            if d.len() < end {
                d.resize(end, 0);
            }
            d[o..end].copy_from_slice(buf);
            Ok(())
        }

        fn flush(&self) -> std::io::Result<()> {
            self.check(0, 1)
        }
    }

    /// The per-process vsock socket directory and muxer.
    struct VsockHost {
        path: PathBuf,
        muxer: Arc<Mutex<VsockMuxer>>,
    }

    fn vsock_host() -> &'static VsockHost {
        static HOST: OnceLock<VsockHost> = OnceLock::new();
        HOST.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!(
                "minivmm-fuzz-virtio-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            std::fs::create_dir_all(&dir).expect("vsock temp dir");
            let path = dir.join("v.sock");
            let muxer = VsockMuxer::new(CID, &path).expect("vsock muxer");
            extern "C" fn remove_dir() {
                if let Some(host) = HOST.get() {
                    if let Some(dir) = host.path.parent() {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                }
            }
            // SAFETY: registers a plain function with no arguments, run once at exit.
            unsafe { libc::atexit(remove_dir) };
            VsockHost {
                path,
                muxer: Arc::new(Mutex::new(muxer)),
            }
        })
    }

    /// What the harness knows about one queue.
    #[derive(Debug, Clone, Copy)]
    struct QueueShadow {
        max: u16,
        /// Set up by a shortcut (size and ring addresses below are the device's), and no raw
        /// write to a queue register since.
        known: bool,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        /// The device's used index (next_used), when known.
        next_used: Option<u16>,
    }

    impl QueueShadow {
        fn reset(&mut self) {
            *self = QueueShadow {
                max: self.max,
                known: false,
                size: self.max,
                desc: 0,
                avail: 0,
                used: 0,
                next_used: Some(0),
            };
        }
    }

    struct Harness {
        t: MmioTransport,
        mem: GuestMemoryMmap,
        queues: Vec<QueueShadow>,
        vsock: bool,
        offered: u64,
        /// Host clients of the vsock muxer, and the connection tokens the muxer reported.
        clients: Vec<UnixStream>,
        tokens: Vec<u64>,
    }

    fn u16_at(mem: &GuestMemoryMmap, addr: u64) -> Option<u16> {
        mem.read_obj::<u16>(GuestAddress(addr)).ok()
    }

    fn u32_at(mem: &GuestMemoryMmap, addr: u64) -> Option<u32> {
        mem.read_obj::<u32>(GuestAddress(addr)).ok()
    }

    fn bytes_at(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        if mem.read_slice(&mut v, GuestAddress(addr)).is_err() {
            v.clear();
        }
        v
    }

    /// An upper bound of the writable bytes of the chain at `head`, walked as virtio-queue's
    /// `DescriptorChain` does (ttl = queue size, one level of indirect tables, a chain ends at
    /// 2^32 bytes).
    fn writable_bytes(mem: &GuestMemoryMmap, desc: u64, size: u16, head: u16) -> u64 {
        let mut writable = 0u64;
        walk_writable(mem, desc, size, head, |_, len| writable += u64::from(len));
        writable
    }

    /// Calls `f(addr, len)` for each writable descriptor of the chain at `head`, walked as
    /// [`writable_bytes`] walks it.
    fn walk_writable(
        mem: &GuestMemoryMmap,
        desc: u64,
        size: u16,
        head: u16,
        mut f: impl FnMut(u64, u32),
    ) {
        let (mut table, mut qsize, mut ttl, mut next) = (desc, size, size, head);
        let (mut indirect, mut yielded) = (false, 0u32);
        while ttl > 0 && next < qsize {
            let at = table + u64::from(next) * 16;
            let (Ok(addr), Ok(len), Ok(flags), Ok(nxt)) = (
                mem.read_obj::<u64>(GuestAddress(at)),
                mem.read_obj::<u32>(GuestAddress(at + 8)),
                mem.read_obj::<u16>(GuestAddress(at + 12)),
                mem.read_obj::<u16>(GuestAddress(at + 14)),
            ) else {
                break;
            };
            if flags & F_INDIRECT != 0 {
                if indirect || len % 16 != 0 || len / 16 > u32::from(u16::MAX) {
                    break;
                }
                (table, qsize, ttl, next, indirect) =
                    (addr, (len / 16) as u16, (len / 16) as u16, 0, true);
                continue;
            }
            let Some(y) = yielded.checked_add(len) else {
                break;
            };
            yielded = y;
            if flags & F_WRITE != 0 {
                f(addr, len);
            }
            if flags & F_NEXT != 0 {
                next = nxt;
                ttl -= 1;
            } else {
                ttl = 0;
            }
        }
    }

    impl Harness {
        fn rd(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.t.read(offset, &mut b);
            u32::from_le_bytes(b)
        }

        fn wr(&mut self, offset: u64, value: u32) {
            self.bus_write(offset, &value.to_le_bytes());
            if offset == STATUS && value == 0 {
                self.after_reset();
            }
        }

        /// A register write as a vCPU thread makes it: it must leave the host side alone (the
        /// vCPU filter forbids socket calls), so the vsock muxer keeps every connection until
        /// the main thread settles the device, as the event loop does on `VirtioStatus`; a
        /// reset then drops them all.
        fn bus_write(&mut self, offset: u64, bytes: &[u8]) {
            let conns = |h: &Self| h.vsock.then(|| lock(&vsock_host().muxer).connections());
            let before = conns(self);
            let event = self.t.write(offset, bytes);
            assert_eq!(
                conns(self),
                before,
                "a register write changed the host side"
            );
            if event == DeviceEvent::VirtioStatus {
                let reset = self.rd(STATUS) == 0;
                self.t.settle();
                if reset && self.vsock {
                    assert_eq!(conns(self), Some(0), "connections left after a reset");
                }
            } else {
                assert_eq!(event, DeviceEvent::None, "register write at {offset:#x}");
            }
        }

        /// Forgets the queues after a reset and checks the device reads as reset.
        fn after_reset(&mut self) {
            for q in &mut self.queues {
                q.reset();
            }
            assert_eq!(self.rd(STATUS), 0, "status after a reset");
            for i in 0..self.queues.len() as u32 + 1 {
                self.t.write(QUEUE_SEL, &i.to_le_bytes());
                assert_eq!(
                    self.rd(QUEUE_READY),
                    0,
                    "QueueReady of queue {i} after a reset"
                );
            }
            self.t.write(QUEUE_SEL, &0u32.to_le_bytes());
        }

        fn running(&mut self) -> bool {
            let s = self.rd(STATUS);
            s & DRIVER_OK != 0 && s & (NEEDS_RESET | FAILED) == 0
        }

        fn check_interrupt_status(&mut self) {
            let isr = self.rd(INTERRUPT_STATUS);
            assert_eq!(isr & !3, 0, "InterruptStatus {isr:#x}");
        }

        /// A raw register access through the bus.
        fn access(&mut self, write: bool, offset: u64, width: usize, value: u64) {
            let bytes = value.to_le_bytes();
            if !write {
                let mut buf = [0u8; 8];
                self.t.read(offset, &mut buf[..width]);
                let v = u64::from_le_bytes(buf);
                if width == 4 && offset == INTERRUPT_STATUS {
                    assert_eq!(v & !3, 0, "InterruptStatus {v:#x}");
                }
                if width == 4 && offset == MAGIC {
                    assert_eq!(v, 0x7472_6976, "MagicValue");
                }
                if width != 4 && offset < CONFIG {
                    assert_eq!(v, 0, "a {width}-byte read of register {offset:#x}");
                }
                return;
            }
            self.bus_write(offset, &bytes[..width]);
            if width == 4 && offset.is_multiple_of(4) && offset < CONFIG {
                if offset == STATUS && value as u32 == 0 {
                    self.after_reset();
                } else if (QUEUE_NUM..=QUEUE_DEVICE_HIGH).contains(&offset) && offset != 0x50 {
                    // Size, readiness or addresses changed behind the harness's back.
                    for q in &mut self.queues {
                        q.known = false;
                    }
                }
            }
        }

        /// Sets up queue `i` (size, rings, ready), as a driver does before DRIVER_OK.
        fn setup_queue(&mut self, i: usize, size: u16, desc: u64, avail: u64, used: u64) {
            let driver_ok = self.rd(STATUS) & DRIVER_OK != 0;
            self.wr(QUEUE_SEL, i as u32);
            self.wr(QUEUE_READY, 0);
            self.wr(QUEUE_NUM, u32::from(size));
            for (reg, addr) in [(QUEUE_DESC_LOW, desc), (0x90, avail), (0xa0, used)] {
                self.wr(reg, addr as u32);
                self.wr(reg + 4, (addr >> 32) as u32);
            }
            self.wr(QUEUE_READY, 1);
            let Some(q) = self.queues.get_mut(i) else {
                return;
            };
            if driver_ok {
                return; // every write was ignored
            }
            assert!(size.is_power_of_two() && size <= q.max);
            *q = QueueShadow {
                known: true,
                size,
                desc,
                avail,
                used,
                ..*q
            };
            assert_eq!(self.rd(QUEUE_READY), 1, "queue {i} ready after its setup");
        }

        /// Resets, negotiates `features` (plus VERSION_1) and sets up every queue from `base`.
        fn bringup(&mut self, flags: u8, features: u32, base: u64) {
            self.wr(STATUS, 0);
            self.wr(STATUS, 1);
            self.wr(STATUS, 3);
            let want = if flags & 0x80 != 0 {
                u64::from(features) | VIRTIO_F_VERSION_1
            } else {
                (u64::from(features) & self.offered) | VIRTIO_F_VERSION_1
            };
            self.wr(DRIVER_FEATURES_SEL, 0);
            self.wr(DRIVER_FEATURES, want as u32);
            self.wr(DRIVER_FEATURES_SEL, 1);
            self.wr(DRIVER_FEATURES, (want >> 32) as u32);
            self.wr(STATUS, 3 | FEATURES_OK);
            for i in 0..self.queues.len() {
                let max = self.queues[i].max;
                let size = (max >> (((flags >> (2 * (i % 3))) & 3) * 2)).max(1);
                // Each queue gets 16 KiB: descriptors, avail ring at +4K, used ring at +8K.
                let at = base + i as u64 * 0x4000;
                self.setup_queue(i, size, at, at + 0x1000, at + 0x2000);
            }
            if flags & 0x40 == 0 {
                self.wr(STATUS, 3 | FEATURES_OK | DRIVER_OK);
            }
        }

        fn known_queue(&self, q: u8) -> Option<(usize, QueueShadow)> {
            let n = self.queues.len();
            let i = usize::from(q) % n;
            let s = self.queues[i];
            s.known.then_some((i, s))
        }

        fn put_desc(&self, q: &QueueShadow, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            let at = q.desc + u64::from(idx % q.size) * 16;
            let _ = self.mem.write_slice(&d, GuestAddress(at));
        }

        fn push(&self, q: &QueueShadow, head: u16) {
            let Some(idx) = u16_at(&self.mem, q.avail + 2) else {
                return;
            };
            let slot = q.avail + 4 + u64::from(idx % q.size) * 2;
            let _ = self.mem.write_obj(head, GuestAddress(slot));
            let _ = self
                .mem
                .write_obj(idx.wrapping_add(1), GuestAddress(q.avail + 2));
        }

        /// A whole request on queue `q`: for the block device a header, data and status byte;
        /// for vsock a TX packet (header and payload) or an RX buffer.
        fn request(&self, input: &mut Input) {
            let (qsel, head, kind) = (input.u8(), input.u8(), input.u8());
            let (sector, data_off, data_len) = (input.u8(), input.u16(), input.u16());
            let Some((qi, q)) = self.known_queue(qsel) else {
                return;
            };
            let head = u16::from(head) % q.size;
            let hdr_at = DATA + u64::from(data_off % 0x800) * 16;
            let data_at = hdr_at + 64;
            let next = |i: u16| (head + i) % q.size;
            if !self.vsock {
                let t = [0u32, 1, 4, 8, 0, 1, 2, u32::from(kind)][usize::from(kind & 7)];
                let mut h = [0u8; 16];
                h[..4].copy_from_slice(&t.to_le_bytes());
                h[8..].copy_from_slice(&u64::from(sector).to_le_bytes());
                let _ = self.mem.write_slice(&h, GuestAddress(hdr_at));
                let len = if kind & 0x80 != 0 {
                    u32::from(data_len)
                } else {
                    u32::from(data_len % 9) * 512
                };
                let data_flags = if t == 1 { 0 } else { F_WRITE };
                self.put_desc(&q, next(0), hdr_at, 16, F_NEXT, next(1));
                if len > 0 && kind & 0x40 == 0 {
                    self.put_desc(&q, next(1), data_at, len, data_flags | F_NEXT, next(2));
                    self.put_desc(&q, next(2), data_at + u64::from(len), 1, F_WRITE, 0);
                } else {
                    self.put_desc(&q, next(1), data_at, 1, F_WRITE, 0);
                }
            } else if qi == 1 {
                let len = u32::from(data_len % 0x200);
                let mut h = [0u8; 44];
                h[..8].copy_from_slice(&CID.to_le_bytes());
                h[8..16].copy_from_slice(&2u64.to_le_bytes());
                h[16..20].copy_from_slice(&u32::from(sector).to_le_bytes());
                h[20..24].copy_from_slice(&(u32::from(kind >> 3) + 1000).to_le_bytes());
                h[24..28].copy_from_slice(&len.to_le_bytes());
                h[28..30].copy_from_slice(&1u16.to_le_bytes());
                h[30..32].copy_from_slice(&u16::from(kind & 7).to_le_bytes());
                h[32..36].copy_from_slice(&u32::from(kind >> 6).to_le_bytes());
                h[36..40].copy_from_slice(&(256u32 << 10).to_le_bytes());
                let _ = self.mem.write_slice(&h, GuestAddress(hdr_at));
                self.put_desc(&q, next(0), hdr_at, 44 + len, 0, 0);
            } else {
                let len = 44 + u32::from(data_len % 0x400);
                self.put_desc(&q, next(0), hdr_at, len, F_WRITE, 0);
            }
            self.push(&q, head);
        }

        /// Kicks queue `qi` (or wakes the device for a host event) and checks the used rings.
        fn kick(&mut self, wake: Wake) {
            let running = self.running();
            // Before: per known queue, (avail idx, used idx, avail ring bytes, bounds of the
            // chains that are available).
            let mut before = Vec::new();
            for q in &self.queues {
                let (Some(a), Some(u)) = (
                    u16_at(&self.mem, q.avail + 2),
                    u16_at(&self.mem, q.used + 2),
                ) else {
                    before.push(None);
                    continue;
                };
                let ring = bytes_at(&self.mem, q.avail, 4 + 2 * u64::from(q.size));
                let mut bounds = Vec::new();
                if q.known && q.next_used == Some(u) && a.wrapping_sub(u) <= q.size {
                    for k in 0..a.wrapping_sub(u) {
                        let slot = q.avail + 4 + u64::from(u.wrapping_add(k) % q.size) * 2;
                        let head = u16_at(&self.mem, slot).unwrap_or(u16::MAX);
                        bounds.push(writable_bytes(&self.mem, q.desc, q.size, head));
                    }
                }
                before.push(Some((a, u, ring, bounds)));
            }

            // Where the device may write data this kick: every writable buffer of the chains
            // between each queue's used and avail index (what it may pop). A queue the harness
            // does not know, or whose indices are out of step, may have buffers anywhere.
            let mut written: Vec<(u64, u64)> = Vec::new();
            let mut anywhere = false;
            for q in &self.queues {
                let (Some(a), Some(u)) = (
                    u16_at(&self.mem, q.avail + 2),
                    q.next_used.or_else(|| u16_at(&self.mem, q.used + 2)),
                ) else {
                    anywhere = true;
                    continue;
                };
                let pending = a.wrapping_sub(u);
                if !q.known || pending > q.size {
                    anywhere = true;
                    continue;
                }
                for k in 0..pending {
                    let slot = q.avail + 4 + u64::from(u.wrapping_add(k) % q.size) * 2;
                    let head = u16_at(&self.mem, slot).unwrap_or(u16::MAX);
                    walk_writable(&self.mem, q.desc, q.size, head, |addr, len| {
                        written.push((addr, addr.saturating_add(u64::from(len))));
                    });
                }
            }

            self.t.process(wake, &self.mem);

            let broken = self.rd(STATUS) & NEEDS_RESET != 0;
            for (i, b) in before.into_iter().enumerate() {
                let q = self.queues[i];
                let Some((a0, u0, ring0, bounds)) = b else {
                    self.queues[i].next_used = None;
                    continue;
                };
                let u1 = u16_at(&self.mem, q.used + 2).unwrap_or(u0);
                let trusted = q.known && q.next_used == Some(u0);
                self.queues[i].next_used = if broken {
                    None
                } else if u1 != u0 {
                    Some(u1)
                } else if trusted {
                    Some(u0)
                } else {
                    None
                };
                // Another queue's used ring, or a buffer the device may fill, over this one's
                // used ring: the device's other writes move this used index and elements too, so
                // they tell nothing about this queue.
                let used_end = q.used + 4 + 8 * u64::from(q.size) + 2;
                let shared_used = self.queues.iter().enumerate().any(|(j, o)| {
                    j != i && o.used < used_end && q.used < o.used + 4 + 8 * u64::from(o.size) + 2
                });
                let overwritten = anywhere
                    || written
                        .iter()
                        .any(|&(start, end)| start < used_end && q.used < end);
                if shared_used || overwritten {
                    self.queues[i].next_used = None;
                    continue;
                }
                if !(running && trusted) || u1 == u0 {
                    continue;
                }
                // The device may have written into the avail ring itself (a data buffer or the
                // used ring over it): then what was available is not what the harness saw.
                let ring1 = bytes_at(&self.mem, q.avail, 4 + 2 * u64::from(q.size));
                let overlap =
                    q.used < q.avail + 4 + 2 * u64::from(q.size) + 2 && q.avail < used_end;
                if ring1 != ring0 || overlap {
                    continue;
                }
                let advanced = u1.wrapping_sub(u0);
                let available = a0.wrapping_sub(u0);
                assert!(
                    advanced <= available,
                    "queue {i}: used index {u0} -> {u1} with avail index {a0} (queues {:x?})",
                    self.queues
                );
                for k in 0..advanced {
                    let at = q.used + 4 + u64::from(u0.wrapping_add(k) % q.size) * 8;
                    let (Some(id), Some(len)) = (u32_at(&self.mem, at), u32_at(&self.mem, at + 4))
                    else {
                        continue;
                    };
                    if q.used + 4 + u64::from(q.size) * 8 > q.desc
                        && q.desc + 16 * u64::from(q.size) > q.used
                    {
                        continue; // the used ring overwrote descriptors
                    }
                    assert!(
                        id < u32::from(q.size),
                        "queue {i}: used head {id} of {}",
                        q.size
                    );
                    let after = writable_bytes(&self.mem, q.desc, q.size, id as u16);
                    let bound = bounds.get(usize::from(k)).copied().unwrap_or(0).max(after);
                    assert!(
                        len == 0 || u64::from(len) <= bound,
                        "queue {i}: used element {k} (head {id}) has length {len}, its chain \
                         has {bound} writable bytes"
                    );
                }
            }
        }

        fn host_connect(&mut self, port: u32, extra: &[u8]) {
            let host = vsock_host();
            let Ok(mut c) = UnixStream::connect(&host.path) else {
                return;
            };
            let _ = c.set_nonblocking(true);
            let _ = writeln!(c, "CONNECT {port}");
            let _ = c.write_all(extra);
            self.clients.push(c);
            self.kick(Wake::Host {
                token: 0,
                readable: true,
                writable: false,
                hangup: false,
            });
            self.learn_tokens();
        }

        fn learn_tokens(&mut self) {
            let changes = lock(&vsock_host().muxer).take_interest_changes();
            for c in changes {
                if let Interest::Add { token, .. } = c {
                    if token != 0 && !self.tokens.contains(&token) {
                        self.tokens.push(token);
                    }
                }
            }
        }
    }

    /// Runs one input.
    pub fn run(data: &[u8]) {
        let mut input = Input::new(data);
        let cfg = input.u8();
        let vsock = cfg & 1 != 0;
        let readonly = cfg & 2 != 0;
        let mut ranges = vec![(GuestAddress(0), LOW_SIZE as usize)];
        if cfg & 4 != 0 {
            ranges.push((GuestAddress(HIGH_START), HIGH_SIZE as usize));
        }
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("guest memory");
        let mem_end = if cfg & 4 != 0 {
            HIGH_START + HIGH_SIZE
        } else {
            LOW_SIZE
        };

        let sectors = [1u64, 2, 4, 8][usize::from((cfg >> 3) & 3)];
        let tail = [0u64, 1, 100, 511][usize::from((cfg >> 5) & 3)];
        let disk_len = sectors * 512 + tail;
        let fail = (cfg & 0x80 != 0).then(|| u64::from(input.u16()) % disk_len);
        let original: Vec<u8> = (0..disk_len).map(|i| (i * 7 % 251) as u8).collect();
        let disk = Arc::new(MemDisk {
            bytes: Mutex::new(original.clone()),
            fail,
        });
        let irq = Arc::new(CountingTrigger::default());
        let device: Box<dyn crate::devices::virtio::VirtioDevice> = if vsock {
            let host = vsock_host();
            {
                let mut m = lock(&host.muxer);
                m.reset();
                m.take_interest_changes();
                m.take_interest_changes();
            }
            Box::new(Vsock::new(CID, host.muxer.clone()))
        } else {
            Box::new(Block::new(disk.clone(), disk_len, readonly, "fuzz-disk"))
        };
        let t = MmioTransport::new(device, irq.clone()).expect("transport");
        let mut h = Harness {
            t,
            mem,
            queues: Vec::new(),
            vsock,
            offered: 0,
            clients: Vec::new(),
            tokens: Vec::new(),
        };
        for i in 0..h.t.queue_count() as u32 {
            h.wr(QUEUE_SEL, i);
            let max = h.rd(QUEUE_NUM_MAX) as u16;
            let mut q = QueueShadow {
                max,
                known: false,
                size: max,
                desc: 0,
                avail: 0,
                used: 0,
                next_used: Some(0),
            };
            q.reset();
            h.queues.push(q);
        }
        h.wr(QUEUE_SEL, 0);
        h.wr(DEVICE_FEATURES_SEL, 0);
        let lo = h.rd(DEVICE_FEATURES);
        h.wr(DEVICE_FEATURES_SEL, 1);
        let hi = h.rd(DEVICE_FEATURES);
        h.offered = u64::from(lo) | (u64::from(hi) << 32);
        assert_ne!(h.offered & VIRTIO_F_VERSION_1, 0, "VERSION_1 offered");
        if !vsock {
            let mut cap = [0u8; 8];
            h.t.read(CONFIG, &mut cap);
            assert_eq!(u64::from_le_bytes(cap), sectors, "capacity");
        }

        let mut ops = 0;
        while !input.is_empty() && ops < 256 {
            ops += 1;
            let tag = input.u8();
            match tag % 12 {
                0 | 1 => {
                    let offset = u64::from(input.u16()) % 0x180;
                    let width = [1usize, 2, 4, 8][usize::from(tag >> 6)];
                    let value = if tag % 12 == 1 { input.u64() } else { 0 };
                    h.access(tag % 12 == 1, offset, width, value);
                }
                2 => {
                    let (flags, features, base) = (input.u8(), input.u32(), input.u16());
                    // Rings 16 KiB apart per queue, below the data area (or anywhere, rarely).
                    let base = if tag & 0x80 != 0 {
                        u64::from(base) * 16
                    } else {
                        u64::from(base % 0x70) * 0x1000
                    };
                    h.bringup(flags, features, base);
                }
                3 => {
                    let (q, size) = (input.u8(), input.u8());
                    let (d, a, u) = (input.u32(), input.u32(), input.u32());
                    let i = usize::from(q) % h.queues.len();
                    let size = (h.queues[i].max >> (size % 9)).max(1);
                    let fit = |x: u32, align: u64| {
                        if tag & 0x80 != 0 {
                            u64::from(x) & !(align - 1)
                        } else {
                            (u64::from(x) % mem_end) & !(align - 1)
                        }
                    };
                    h.setup_queue(i, size, fit(d, 16), fit(a, 2), fit(u, 4));
                }
                4 => {
                    let s = h.rd(STATUS);
                    h.wr(STATUS, s | DRIVER_OK);
                }
                5 => {
                    let addr = u64::from(input.u32()) % (mem_end + 0x1000);
                    let len = usize::from(input.u8());
                    let bytes = input.bytes(len);
                    let _ = h.mem.write_slice(bytes, GuestAddress(addr));
                }
                6 => {
                    let (q, idx) = (input.u8(), input.u16());
                    let (addr, len) = (input.u32(), input.u32());
                    let (flags, next) = (input.u16(), input.u16());
                    if let Some((_, s)) = h.known_queue(q) {
                        let addr = if tag & 0x80 != 0 {
                            u64::from(addr)
                        } else {
                            DATA + u64::from(addr) % (LOW_SIZE - DATA)
                        };
                        h.put_desc(&s, idx, addr, len, flags, next);
                    }
                }
                7 => {
                    let (q, head) = (input.u8(), input.u16());
                    if let Some((_, s)) = h.known_queue(q) {
                        h.push(&s, head);
                    }
                }
                8 => h.request(&mut input),
                9 | 10 => {
                    let q = input.u8();
                    let wake = match q >> 6 {
                        3 if vsock => Wake::Tick,
                        2 if vsock => Wake::Host {
                            token: h
                                .tokens
                                .get(usize::from(q & 7))
                                .copied()
                                .unwrap_or(u64::from(q & 7)),
                            readable: q & 8 != 0,
                            writable: q & 16 != 0,
                            hangup: q & 32 != 0,
                        },
                        _ => Wake::Queue(usize::from(q) % (h.queues.len() + 1)),
                    };
                    h.kick(wake);
                    if vsock {
                        h.learn_tokens();
                    }
                }
                _ => {
                    if !vsock {
                        continue;
                    }
                    let (port, len) = (input.u8(), input.u8());
                    let bytes = input.bytes(usize::from(len % 64));
                    if port & 0x80 != 0 && !h.clients.is_empty() {
                        let n = h.clients.len();
                        let c = &mut h.clients[usize::from(port) % n];
                        let _ = c.write_all(bytes);
                        if port & 0x40 != 0 {
                            let _ = c.shutdown(std::net::Shutdown::Write);
                        }
                    } else {
                        h.host_connect(u32::from(port & 0x7f) + 1000, bytes);
                    }
                }
            }
            h.check_interrupt_status();
            let d = disk.bytes.lock().unwrap_or_else(|e| e.into_inner());
            assert_eq!(d.len() as u64, disk_len, "the disk changed size");
            if readonly && !vsock {
                assert!(*d == original, "a read-only disk was written");
            }
            assert!(
                d[(sectors * 512) as usize..] == original[(sectors * 512) as usize..],
                "bytes past the last whole sector changed"
            );
        }
        if vsock {
            lock(&vsock_host().muxer).reset();
        }
        drop(h);
    }
}

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

use minivmm::config::{MemoryConfig, MEMORY_SIZE_ALIGN, MIN_MEMORY_SIZE};
use minivmm::control::protocol::{
    error_reply, handle, parse_request, ControlTarget, Line, LineReader, Request, VmInfo, MAX_LINE,
};
use minivmm::devices::{lock, BusDevice, DeviceEvent};
use minivmm::kvm::vcpu::VcpuError;
use minivmm::kvm::vm::VmError;
use minivmm::vmm::cpus::CpuManager;
use minivmm::vmm::memory::MemoryManager;
use minivmm::vmm::resize;
use minivmm::{BackendError, RequestError};

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
    /// Counts an operation; true when it is to fail.
    fn fails(&mut self) -> bool {
        self.ops += 1;
        self.fail_every != 0 && self.ops.is_multiple_of(self.fail_every)
    }
}

impl resize::Backend for Boot {
    fn add_memory(&mut self, start: u64, size: u64) -> Result<(), BackendError> {
        if self.kvm.fails() {
            let reason = "injected failure".to_string();
            return Err(VmError::Memory {
                addr: start,
                size,
                reason,
            }
            .into());
        }
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

    fn remove_last_memory(&mut self) -> Result<(), BackendError> {
        assert!(
            self.kvm.mapped.pop().is_some(),
            "unmapping with none mapped"
        );
        Ok(())
    }

    fn start_vcpu(&mut self, id: u32) -> Result<(), BackendError> {
        if self.kvm.fails() {
            let injected = std::io::Error::other("injected failure");
            return Err(VcpuError::Spawn(id, injected).into());
        }
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

    fn reap_memory(&mut self) -> minivmm::vmm::memory::Step {
        let mapped = &mut self.kvm.mapped;
        self.memory.reap_ejected(&mut |start| {
            let i = mapped.iter().position(|&(s, _)| s == start);
            assert_eq!(
                i.map(|i| i + 1),
                Some(mapped.len()),
                "unmapping {start:#x}: not the top slot"
            );
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
    type Error = RequestError;

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

    fn resize(&mut self, cpus: Option<u32>, mem: Option<u64>) -> Result<VmInfo, RequestError> {
        self.calls += 1;
        let Some(b) = self.boot.as_mut() else {
            return Err(RequestError::NotRunning);
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
                return Err(e.into());
            }
        }
        Ok(self.info())
    }

    fn reboot(&mut self) -> Result<(), RequestError> {
        self.calls += 1;
        if let Some(b) = &self.boot {
            self.next_cpus = b.cpus.target();
        }
        self.reboot_requested = true;
        Ok(())
    }

    fn shutdown(&mut self) -> Result<(), RequestError> {
        self.calls += 1;
        self.boot = None;
        Ok(())
    }

    fn power_button(&mut self) -> Result<(), RequestError> {
        self.calls += 1;
        match self.boot {
            Some(_) => Ok(()),
            None => Err(RequestError::NotRunning),
        }
    }
}

/// Frames `stream` pushing it in chunks whose sizes come from `seed` (`None`: in one push).
fn frame(stream: &[u8], seed: Option<u8>) -> (Vec<Line>, bool) {
    let mut reader = LineReader::new();
    let mut lines = Vec::new();
    let mut rng = crate::Rng::new(u64::from(seed.unwrap_or(0)));
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
    let mut input = crate::Input::new(data);
    let max_cpus = 1 + u32::from(input.u8()) % minivmm::arch::x86_64::layout::MAX_VCPUS;
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
            Line::TooLong => Err(minivmm::control::protocol::RequestError::TooLong),
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

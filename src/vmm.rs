//! The VMM: builds a machine (VM, devices, guest image, vCPU threads) from the configuration,
//! rebuilds it on reboot, and applies runtime resize requests (CPU and memory hotplug).
//!
//! A `Machine` lives for one boot. The [`Vmm`] outlives reboots and keeps what must persist:
//! the configuration, the open kernel files, the event channels and the sizes for the next boot.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::ops::Range;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, AcpiConfig};
use crate::arch::x86_64::layout::{self, ports};
use crate::arch::x86_64::{boot, memory, regs};
use crate::config::VmConfig;
use crate::control::{ControlTarget, VmInfo};
use crate::cpus::Vcpus;
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::cpu_hotplug::CpuHotplug;
use crate::devices::debug_exit::DebugExit;
use crate::devices::debug_port::DebugPort;
use crate::devices::ged::{Ged, GED_CPU, GED_MEMORY, GED_POWER_BUTTON};
use crate::devices::i8042::I8042;
use crate::devices::mem_hotplug::MemHotplug;
use crate::devices::pvpanic::PvPanic;
use crate::devices::reset_control::ResetControl;
use crate::devices::rtc::Rtc;
use crate::devices::serial::SerialDevice;
use crate::devices::{Bus, BusDevice, DeviceEvent, ResetCause, Trigger};
use crate::events::Event;
use crate::resize::{self, ResizeState};
use crate::seccomp::BpfProgram;
use crate::size::format_size;
use crate::vcpu::{EventSink, VcpuContext, VcpuEvent};
use crate::vm::{Vm, VmError};

/// Errors while building or changing the machine.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A KVM VM operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Loading the guest failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// ACPI table generation failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Boot vCPU register setup failed.
    #[error("setting up the boot vCPU: {0}")]
    Regs(#[from] regs::RegsError),
    /// A vCPU thread could not be started or stopped.
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    /// A device could not be placed on a bus.
    #[error("device bus: {0}")]
    Bus(#[from] crate::devices::BusError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// Rewinding a kernel or initramfs file failed.
    #[error("cannot read {0}: {1}")]
    Image(String, #[source] std::io::Error),
}

/// Sizes of the next boot.
#[derive(Debug, Clone, Copy)]
struct BootSpec {
    cpus: u32,
    mem: u64,
}

/// A device as the buses hold it.
type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Devices of one boot that the VMM drives directly (besides the buses).
struct Devices {
    serial: Arc<Mutex<SerialDevice>>,
    ged: Arc<Mutex<Ged>>,
    cpu_hp: Arc<Mutex<CpuHotplug>>,
    mem_hp: Arc<Mutex<MemHotplug>>,
}

/// One boot of the guest.
struct Machine {
    vm: Vm,
    devices: Devices,
    ctx: VcpuContext,
    vcpus: Vcpus,
    boot_mem: u64,
    window: Range<u64>,
    hotplugged: u64,
    /// When this boot started (before the VM was created).
    started: Instant,
    /// Time from `started` to the guest's first debug-port write.
    boot_marker: Option<Duration>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything that outlives a reboot.
pub struct Vmm {
    config: VmConfig,
    kvm: Kvm,
    kernel: File,
    initramfs: Option<File>,
    cmdline: String,
    serial_out: SharedWriter,
    serial_irq: EventFd,
    ged_irq: EventFd,
    input_room: Arc<EventFd>,
    events_rx: Receiver<VcpuEvent>,
    events_wake: Arc<EventFd>,
    sink: EventSink,
    vcpu_filter: Option<Arc<BpfProgram>>,
    next: BootSpec,
    target_cpus: u32,
    removal_since: Option<Instant>,
    machine: Option<Machine>,
    boots: u32,
    requested: Option<Lifecycle>,
    last_ost: Option<String>,
    /// When minivmm started (for `uptime` and the boot marker).
    process_started: Instant,
    /// Events not yet handed to the front ends (drained by [`Vmm::take_events`]).
    events: Vec<Event>,
}

/// A lifecycle change asked for by a front end, carried out after the reply is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Rebuild the VM.
    Reboot,
    /// Stop and exit 0.
    Shutdown,
}

/// A cloneable writer shared by successive serial devices (one per boot).
#[derive(Clone)]
pub struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl SharedWriter {
    /// Wraps `w`.
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        SharedWriter(Arc::new(Mutex::new(w)))
    }
}

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).flush()
    }
}

fn hotplug_slots(window: &Range<u64>) -> usize {
    let steps = (window.end - window.start) / layout::MEMORY_HOTPLUG_ALIGN;
    (steps as usize).min(layout::MAX_MEMORY_HOTPLUG_SLOTS)
}

/// ACPI configuration for a boot.
pub fn acpi_config(config: &VmConfig, cpus: u32, mem: u64) -> AcpiConfig {
    let window = memory::hotplug_window(mem, config.memory.max() - mem);
    AcpiConfig {
        boot_cpus: cpus,
        max_cpus: config.cpus.max,
        memory_slots: hotplug_slots(&window),
        pvpanic: config.pvpanic,
    }
}

impl Vmm {
    /// Prepares a VMM; nothing runs until [`Vmm::boot`].
    ///
    /// `serial_out` receives the guest's console output; `vcpu_filter` is installed on every vCPU
    /// thread; `process_started` is when minivmm started (`uptime` and boot times count from it).
    pub fn new(
        config: VmConfig,
        kvm: Kvm,
        kernel: File,
        initramfs: Option<File>,
        serial_out: SharedWriter,
        vcpu_filter: Option<Arc<BpfProgram>>,
        process_started: Instant,
    ) -> Result<Vmm, VmmError> {
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd);
        let (tx, events_rx) = channel();
        let events_wake = Arc::new(eventfd()?);
        let next = BootSpec {
            cpus: config.cpus.boot,
            mem: config.memory.size,
        };
        Ok(Vmm {
            cmdline: config.kernel_cmdline(),
            kvm,
            kernel,
            initramfs,
            serial_out,
            serial_irq: eventfd()?,
            ged_irq: eventfd()?,
            input_room: Arc::new(eventfd()?),
            sink: EventSink::new(tx, events_wake.clone()),
            events_rx,
            events_wake,
            vcpu_filter,
            target_cpus: next.cpus,
            next,
            removal_since: None,
            machine: None,
            boots: 0,
            requested: None,
            last_ost: None,
            process_started,
            events: Vec::new(),
            config,
        })
    }

    /// Event fd the loop watches for vCPU events.
    pub fn events_fd(&self) -> &EventFd {
        &self.events_wake
    }

    /// Event fd signalled when the guest drained the serial receive FIFO.
    pub fn input_room_fd(&self) -> &EventFd {
        &self.input_room
    }

    /// Largest RAM size: boot size plus the hotplug window, fixed at start.
    pub fn max_mem(&self) -> u64 {
        self.config.memory.max()
    }

    /// Builds the machine for the next boot and starts its vCPUs.
    pub fn boot(&mut self) -> Result<(), VmmError> {
        let started = Instant::now();
        let spec = self.next;
        let max_cpus = self.config.cpus.max;
        // Opt-in: the MSR filter costs ~13 ms at VM creation on PVM, and guests in the nested
        // emulated test host hung or triple-faulted now and then with it.
        let vm = Vm::new(
            &self.kvm,
            &memory::ram_regions(spec.mem),
            self.config.cpu_online_events,
        )?;

        let kernel = self.load_guest(&vm, spec)?;

        vm.register_irqfd(&self.serial_irq, layout::irq::COM1)?;
        vm.register_irqfd(&self.ged_irq, layout::irq::GED)?;
        let window = memory::hotplug_window(spec.mem, self.max_mem() - spec.mem);
        let (devices, ctx) = self.build_devices(spec, &window)?;

        // vCPUs: the BSP gets the boot registers; APs wait in KVM for the guest's INIT/SIPI.
        let mut fds = Vec::with_capacity(spec.cpus as usize);
        for id in 0..spec.cpus {
            let fd = vm.create_vcpu(id, max_cpus)?;
            if id == 0 {
                regs::setup_boot_vcpu(&fd, vm.memory(), &kernel)?;
            }
            fds.push(fd);
        }
        let mut machine = Machine {
            vm,
            devices,
            ctx,
            vcpus: Vcpus::new(max_cpus),
            boot_mem: spec.mem,
            window,
            hotplugged: 0,
            started,
            boot_marker: None,
        };
        for (id, fd) in fds.into_iter().enumerate() {
            if let Err(e) = machine.vcpus.run(id as u32, fd, &machine.ctx) {
                machine.vcpus.stop_all();
                return Err(e.into());
            }
        }
        self.machine = Some(machine);
        self.target_cpus = spec.cpus;
        self.removal_since = None;
        self.boots += 1;
        self.events.push(Event::Boot {
            n: self.boots,
            cpus: spec.cpus,
            mem: spec.mem,
        });
        log::info!(
            "boot {}: {} vCPUs (max {}), {} RAM (max {}), set up in {:?}",
            self.boots,
            spec.cpus,
            max_cpus,
            format_size(spec.mem),
            format_size(self.max_mem()),
            started.elapsed()
        );
        Ok(())
    }

    /// Loads the kernel, the initramfs, the boot parameters and the ACPI tables into `vm`.
    fn load_guest(&mut self, vm: &Vm, spec: BootSpec) -> Result<boot::KernelEntry, VmmError> {
        self.kernel
            .seek(SeekFrom::Start(0))
            .map_err(|e| VmmError::Image(self.config.kernel.display().to_string(), e))?;
        let kernel = boot::load_kernel(vm.memory(), &mut self.kernel)?;
        let initrd = match (&mut self.initramfs, &self.config.initramfs) {
            (Some(file), Some(path)) => {
                file.seek(SeekFrom::Start(0))
                    .map_err(|e| VmmError::Image(path.display().to_string(), e))?;
                Some(boot::load_initramfs(vm.memory(), file, &kernel, spec.mem)?)
            }
            _ => None,
        };
        boot::configure_system(vm.memory(), &kernel, &self.cmdline, initrd, spec.mem)?;
        let tables = acpi::build(&acpi_config(&self.config, spec.cpus, spec.mem))?;
        acpi::write(vm.memory(), &tables)?;
        Ok(kernel)
    }

    /// Creates the devices of one boot and the PIO and MMIO buses the vCPUs dispatch to.
    fn build_devices(
        &self,
        spec: BootSpec,
        window: &Range<u64>,
    ) -> Result<(Devices, VcpuContext), VmmError> {
        let trigger = |e: &EventFd| -> Result<Arc<dyn Trigger>, VmmError> {
            Ok(Arc::new(e.try_clone().map_err(VmmError::EventFd)?))
        };
        let devices = Devices {
            serial: Arc::new(Mutex::new(SerialDevice::new(
                trigger(&self.serial_irq)?,
                trigger(&self.input_room)?,
                Box::new(self.serial_out.clone()),
            ))),
            ged: Arc::new(Mutex::new(Ged::new(trigger(&self.ged_irq)?))),
            cpu_hp: Arc::new(Mutex::new(CpuHotplug::new(self.config.cpus.max, spec.cpus))),
            mem_hp: Arc::new(Mutex::new(MemHotplug::new(hotplug_slots(window)))),
        };
        let mut pio = Bus::new();
        let mut pio_devices: Vec<(u16, u16, SharedDevice)> = vec![
            (ports::COM1, ports::COM1_SIZE, devices.serial.clone()),
            (
                ports::RTC_INDEX,
                ports::RTC_SIZE,
                Arc::new(Mutex::new(Rtc::with_system_clock())),
            ),
            (
                ports::I8042_DATA,
                ports::I8042_SIZE,
                Arc::new(Mutex::new(I8042::new())),
            ),
            (
                ports::ACPI_SLEEP_CONTROL,
                ports::ACPI_PM_SIZE,
                Arc::new(Mutex::new(AcpiPm::new())),
            ),
            (
                ports::RESET_CONTROL,
                ports::RESET_CONTROL_SIZE,
                Arc::new(Mutex::new(ResetControl::new())),
            ),
            (
                ports::DEBUG_PORT,
                ports::DEBUG_PORT_SIZE,
                Arc::new(Mutex::new(DebugPort::new())),
            ),
        ];
        if self.config.pvpanic {
            pio_devices.push((
                ports::PVPANIC,
                ports::PVPANIC_SIZE,
                Arc::new(Mutex::new(PvPanic::new())),
            ));
        }
        if let Some(exit) = self.config.exit_device {
            pio_devices.push((
                exit.iobase,
                exit.iosize,
                Arc::new(Mutex::new(DebugExit::new())),
            ));
        }
        for (base, len, dev) in pio_devices {
            pio.insert(u64::from(base), u64::from(len), dev)?;
        }
        let mut mmio = Bus::new();
        let mmio_devices: [(u64, u64, SharedDevice); 3] = [
            (layout::GED_START, layout::GED_SIZE, devices.ged.clone()),
            (
                layout::CPU_HOTPLUG_START,
                layout::CPU_HOTPLUG_SIZE,
                devices.cpu_hp.clone(),
            ),
            (
                layout::MEM_HOTPLUG_START,
                layout::MEM_HOTPLUG_SIZE,
                devices.mem_hp.clone(),
            ),
        ];
        for (base, len, dev) in mmio_devices {
            mmio.insert(base, len, dev)?;
        }
        let ctx = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            events: self.sink.clone(),
            seccomp: self.vcpu_filter.clone(),
        };
        Ok((devices, ctx))
    }

    /// Takes the lifecycle change requested on the control pipe, if any.
    pub fn take_request(&mut self) -> Option<Lifecycle> {
        self.requested.take()
    }

    /// Whether `--no-reboot` was given.
    pub fn no_reboot(&self) -> bool {
        self.config.no_reboot
    }

    /// Stops every vCPU and drops the machine.
    pub fn teardown(&mut self) {
        if let Some(mut machine) = self.machine.take() {
            machine.vcpus.stop_all();
        }
        // Events of the old machine's vCPUs must not reach the next one.
        while self.events_rx.try_recv().is_ok() {}
    }

    /// Rebuilds the VM for the next boot (current vCPU count, pending RAM size).
    pub fn reboot(&mut self) -> Result<(), VmmError> {
        self.next.cpus = self.target_cpus;
        self.teardown();
        self.boot()
    }

    /// Handles the vCPU events that are queued; returns an exit reason if the VM must stop
    /// or reboot.
    pub fn process_vcpu_events(&mut self) -> Option<VcpuEvent> {
        // Reading clears the eventfd; the channel holds the events themselves.
        let _ = self.events_wake.read();
        while let Ok(event) = self.events_rx.try_recv() {
            match event {
                VcpuEvent::Ejected(cpu) => self.reap_vcpu(cpu),
                VcpuEvent::Ost(ost) => self.on_ost(ost),
                VcpuEvent::BootMarker { value, at } => self.on_boot_marker(value, at),
                VcpuEvent::Online(cpu) => {
                    log::info!("vCPU {cpu} is online");
                    self.events.push(Event::CpuOnline(cpu));
                }
                other => {
                    // Drain the rest so they do not leak into the next boot.
                    while self.events_rx.try_recv().is_ok() {}
                    return Some(other);
                }
            }
        }
        None
    }

    /// Records the guest's first debug-port write of this boot.
    fn on_boot_marker(&mut self, value: u8, at: Instant) {
        let Some(m) = self.machine.as_mut() else {
            return;
        };
        if at < m.started || m.boot_marker.is_some() {
            // A write from the previous boot's vCPUs, or a repeat.
            return;
        }
        let since_boot = at - m.started;
        m.boot_marker = Some(since_boot);
        log::info!(
            "boot {}: the guest wrote {value:#04x} to the debug port {:.1} ms after the boot \
             started, {:.1} ms after minivmm started",
            self.boots,
            since_boot.as_secs_f64() * 1e3,
            at.saturating_duration_since(self.process_started)
                .as_secs_f64()
                * 1e3,
        );
        self.events.push(Event::BootMarker {
            value,
            boot_ms: since_boot.as_millis() as u64,
        });
    }

    /// Events that happened since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Queues an event for the front ends.
    pub fn push_event(&mut self, event: Event) {
        self.events.push(event);
    }

    /// Handles a guest reset without `--no-reboot`: logs it, announces it and rebuilds the VM.
    pub fn guest_reset(&mut self, cause: ResetCause) -> Result<(), VmmError> {
        log::log!(cause.log_level(), "guest reset through {cause}: rebooting");
        self.announced_reboot(cause.token())
    }

    /// Announces a reboot (`event reboot cause=...`) and rebuilds the VM.
    pub fn announced_reboot(&mut self, cause: &'static str) -> Result<(), VmmError> {
        self.events.push(Event::Reboot { cause });
        self.reboot()
    }

    /// Records a guest `_OST` report; a refused eject withdraws the removal, so the CPU stays
    /// and later CPU resizes are not blocked by a removal that will never complete.
    fn on_ost(&mut self, ost: DeviceEvent) {
        let (what, event, status) = match ost {
            DeviceEvent::CpuOst { cpu, event, status } => (format!("cpu{cpu}"), event, status),
            DeviceEvent::MemOst {
                slot,
                event,
                status,
            } => (format!("mem{slot}"), event, status),
            _ => return,
        };
        let report = describe_ost(event, status);
        let text = format!("{what}:{report}");
        self.events.push(Event::Ost {
            device: what,
            report,
        });
        if !ost_failed(event, status) {
            log::info!("guest _OST {text}");
            if status == 0 {
                self.last_ost = Some(text);
            }
            return;
        }
        log::warn!("guest _OST {text}: the guest refused the request");
        if let (DeviceEvent::CpuOst { cpu, .. }, OST_EVENT_EJECT | 0x103) = (ost, event) {
            if let Some(m) = &self.machine {
                let mut hp = lock(&m.devices.cpu_hp);
                if hp.cancel_removal(cpu) {
                    self.target_cpus = hp.enabled_count() - hp.pending_removals().len() as u32;
                    log::warn!("removal of vCPU {cpu} withdrawn; it stays present");
                    if hp.pending_removals().is_empty() {
                        self.removal_since = None;
                    }
                }
            }
        }
        self.last_ost = Some(text);
    }

    /// Stops the thread of an ejected vCPU and keeps its fd for reuse.
    fn reap_vcpu(&mut self, cpu: u32) {
        let Some(machine) = self.machine.as_mut() else {
            return;
        };
        if lock(&machine.devices.cpu_hp).is_enabled(cpu) {
            // A stale event: the CPU was added again since the guest ejected it.
            return;
        }
        if machine.vcpus.stop(cpu) {
            log::info!("vCPU {cpu} ejected by the guest");
            self.events.push(Event::CpuEjected(cpu));
        }
        if lock(&machine.devices.cpu_hp).pending_removals().is_empty() {
            self.removal_since = None;
        }
    }

    /// Threads of CPUs the guest has ejected (their eject events may still be queued).
    fn reap_all_ejected(&mut self) {
        let ejected: Vec<u32> = match &self.machine {
            Some(m) => {
                let hp = lock(&m.devices.cpu_hp);
                m.vcpus.running().filter(|&i| !hp.is_enabled(i)).collect()
            }
            None => Vec::new(),
        };
        for cpu in ejected {
            self.reap_vcpu(cpu);
        }
    }

    /// Feeds host input to the guest's UART; returns how many bytes it accepted.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        match &self.machine {
            Some(m) => lock(&m.devices.serial).enqueue_input(bytes),
            None => 0,
        }
    }

    /// The planner's view of machine `m`.
    fn resize_state(&self, m: &Machine) -> ResizeState {
        let hp = lock(&m.devices.cpu_hp);
        let mem_hp = lock(&m.devices.mem_hp);
        ResizeState {
            max_cpus: self.config.cpus.max,
            present_cpus: hp.enabled_count(),
            removing: hp.pending_removals(),
            target_cpus: self.target_cpus,
            removal_waited_secs: self
                .removal_since
                .map(|t| t.elapsed().as_secs())
                .unwrap_or(0),
            current_mem: m.boot_mem + m.hotplugged,
            max_mem: self.max_mem(),
            window: m.window.clone(),
            hotplugged: m.hotplugged,
            mem_slots: mem_hp.slots(),
            used_mem_slots: mem_hp.used_slots(),
        }
    }

    fn info_of(&self, m: &Machine) -> VmInfo {
        let hp = lock(&m.devices.cpu_hp);
        let mem_hp = lock(&m.devices.mem_hp);
        VmInfo {
            state: "running",
            cpus: hp.enabled_count(),
            pending_cpus: self.target_cpus,
            max_cpus: self.config.cpus.max,
            mem: m.boot_mem + m.hotplugged,
            pending_mem: self.next.mem,
            max_mem: self.max_mem(),
            hotplug_slots_free: (mem_hp.slots() - mem_hp.used_slots()) as u32,
            removing: hp.pending_removals(),
            last_ost: self.last_ost.clone(),
            uptime: self.process_started.elapsed(),
            boot_marker: m.boot_marker,
        }
    }
}

/// `_OST` source events (ACPI 6.5 table 6.157).
const OST_EVENT_INSERT: u32 = 1;
const OST_EVENT_EJECT: u32 = 3;

/// A short name for an `_OST` event and status, e.g. `eject:busy`.
pub fn describe_ost(event: u32, status: u32) -> String {
    let ev = match event {
        OST_EVENT_INSERT => "insert",
        OST_EVENT_EJECT => "eject",
        0x103 => "ospm-eject",
        0x200 => "ospm-insert",
        _ => "event",
    };
    let st = match (event, status) {
        (_, 0) => "success",
        (_, 1) => "failure",
        (_, 2) => "unrecognized",
        (OST_EVENT_EJECT | 0x103, 0x80) => "not-supported",
        (OST_EVENT_EJECT | 0x103, 0x81) => "in-use",
        (OST_EVENT_EJECT | 0x103, 0x82) => "busy",
        (OST_EVENT_EJECT | 0x103, 0x83) => "dependency-busy",
        (OST_EVENT_EJECT | 0x103, 0x84) => "in-progress",
        (_, 0x80) => "in-progress",
        (_, 0x81) => "insert-failure",
        (_, 0x82) => "attach-failure",
        (_, 0x83) => "unsupported-config",
        _ => "unknown",
    };
    if ev == "event" || st == "unknown" {
        format!("{ev}{event:#x}:{st}{status:#x}")
    } else {
        format!("{ev}:{st}")
    }
}

/// Whether an `_OST` status is final and not a success.
fn ost_failed(event: u32, status: u32) -> bool {
    let in_progress = matches!(
        (event, status),
        (OST_EVENT_EJECT | 0x103, 0x84) | (OST_EVENT_INSERT | 0x200, 0x80)
    );
    status != 0 && !in_progress
}

/// [`resize::Backend`] over one machine: KVM memory slots and vCPU threads.
struct MachineBackend<'a> {
    m: &'a mut Machine,
}

impl resize::Backend for MachineBackend<'_> {
    fn add_memory(&mut self, start: u64, size: u64) -> Result<(), String> {
        self.m
            .vm
            .add_memory(GuestAddress(start), size)
            .map_err(|e| e.to_string())
    }

    fn remove_last_memory(&mut self) -> Result<(), String> {
        self.m.vm.remove_last_memory().map_err(|e| e.to_string())
    }

    fn start_vcpu(&mut self, id: u32) -> Result<(), String> {
        let m = &mut *self.m;
        m.vcpus.start(id, &m.vm, &m.ctx)
    }

    fn stop_vcpu(&mut self, id: u32) {
        self.m.vcpus.stop(id);
    }
}

impl ControlTarget for Vmm {
    fn info(&self) -> VmInfo {
        match &self.machine {
            Some(m) => self.info_of(m),
            None => VmInfo {
                state: "stopped",
                cpus: 0,
                pending_cpus: self.target_cpus,
                max_cpus: self.config.cpus.max,
                mem: 0,
                pending_mem: self.next.mem,
                max_mem: self.max_mem(),
                hotplug_slots_free: 0,
                removing: Vec::new(),
                last_ost: self.last_ost.clone(),
                uptime: self.process_started.elapsed(),
                boot_marker: None,
            },
        }
    }

    fn resize(&mut self, cpus: Option<u32>, mem: Option<u64>) -> Result<VmInfo, String> {
        self.reap_all_ejected();
        let Some(m) = self.machine.as_ref() else {
            return Err("the VM is not running".into());
        };
        let plan = resize::plan(&self.resize_state(m), cpus, mem)?;
        let Some(m) = self.machine.as_mut() else {
            return Err("the VM is not running".into());
        };
        // VMM-side work first; undone if any part fails, since nothing has been announced yet.
        resize::prepare(&plan, &mut MachineBackend { m })?;

        // Commit and announce with a single GED interrupt.
        let mut flags = 0u8;
        if let Some((slot, start, size)) = plan.add_mem {
            if let Err(e) = lock(&m.devices.mem_hp).insert(slot, start, size) {
                log::error!("memory hotplug slot {slot}: {e}");
            }
            m.hotplugged += size;
            flags |= GED_MEMORY;
            self.events.push(Event::MemAdded { slot, start, size });
        }
        {
            let mut hp = lock(&m.devices.cpu_hp);
            for id in plan.add_cpus.clone() {
                hp.insert(id);
                flags |= GED_CPU;
                self.events.push(Event::CpuAdded(id));
            }
            for id in plan.remove_cpus.clone().rev() {
                hp.request_removal(id);
                flags |= GED_CPU;
                self.events.push(Event::CpuRemoving(id));
            }
        }
        if !plan.remove_cpus.is_empty() {
            self.removal_since = Some(Instant::now());
        }
        if let Some(n) = cpus {
            self.target_cpus = n;
        }
        if let Some(want) = plan.pending_mem {
            self.next.mem = want;
        }
        if flags != 0 {
            if let Err(e) = lock(&m.devices.ged).notify(flags) {
                log::error!("raising the GED interrupt: {e}");
            }
        }
        let m = self.machine.as_ref().ok_or("the VM is not running")?;
        Ok(self.info_of(m))
    }

    fn reboot(&mut self) -> Result<(), String> {
        // The event loop performs the reboot after the reply is sent.
        self.requested = Some(Lifecycle::Reboot);
        Ok(())
    }

    fn shutdown(&mut self) -> Result<(), String> {
        self.requested = Some(Lifecycle::Shutdown);
        Ok(())
    }

    fn power_button(&mut self) -> Result<(), String> {
        let m = self.machine.as_ref().ok_or("the VM is not running")?;
        lock(&m.devices.ged)
            .notify(GED_POWER_BUTTON)
            .map_err(|e| format!("raising the GED interrupt: {e}"))?;
        self.events.push(Event::PowerButton);
        Ok(())
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ost_reports_are_named_and_classified() {
        assert_eq!(describe_ost(3, 0x84), "eject:in-progress");
        assert_eq!(describe_ost(3, 0x82), "eject:busy");
        assert_eq!(describe_ost(1, 0), "insert:success");
        assert_eq!(describe_ost(7, 0x99), "event0x7:unknown0x99");
        assert!(!ost_failed(3, 0x84));
        assert!(!ost_failed(1, 0x80));
        assert!(!ost_failed(3, 0));
        assert!(ost_failed(3, 0x82));
        assert!(ost_failed(1, 1));
    }

    #[test]
    fn hotplug_slots_follow_the_window_with_a_cap() {
        let g = 1u64 << 30;
        assert_eq!(hotplug_slots(&(4 * g..6 * g)), 16);
        assert_eq!(hotplug_slots(&(4 * g..4 * g)), 0);
        assert_eq!(
            hotplug_slots(&(4 * g..100 * g)),
            layout::MAX_MEMORY_HOTPLUG_SLOTS
        );
        let mut config = VmConfig::new("k".into());
        config.cpus.max = 4;
        config.memory.hotplug_size = 2 * g;
        let acpi = acpi_config(&config, 1, 512 << 20);
        assert_eq!(
            (acpi.memory_slots, acpi.max_cpus, acpi.pvpanic),
            (16, 4, true)
        );
    }
}

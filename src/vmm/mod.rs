//! The VMM: what outlives reboots (the [`Host`] a boot is built from, the sizes of the next
//! boot, the events for the front ends) and the one [`Machine`] that runs now. It carries out the
//! front ends' requests ([`ControlTarget`]) and reacts to what the vCPUs report.
//!
//! A resize, step by step: [`resize::plan`] validates it over plain numbers,
//! [`resize::prepare`] maps memory and starts vCPU threads (rolled back on failure), then the
//! memory and CPU managers commit it to the hotplug controllers and one GED interrupt tells the
//! guest.

pub mod cpus;
pub mod event_loop;
pub mod exit;
pub mod launch;
pub mod machine;
pub mod memory;
pub mod ost;
pub mod resize;
pub mod virtio;

use std::fs::File;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::size::format_size;
use crate::config::VmConfig;
use crate::control::events::Event;
use crate::control::protocol::{ControlTarget, VmInfo};
use crate::devices::ged::{GED_MEMORY, GED_POWER_BUTTON};
use crate::devices::virtio::Wake;
use crate::devices::{lock, DeviceEvent, ResetCause};
use crate::host::seccomp::BpfProgram;
use crate::kvm::vcpu::{EventSink, VcpuEvent};
use crate::vmm::machine::{BootSpec, Host, Machine, MachineError, SharedWriter};
use crate::vmm::memory::Step;
use crate::vmm::virtio::VirtioHost;

/// What the guest uses from the file system, opened before the seccomp filters go on.
pub struct GuestFiles {
    /// The kernel image.
    pub kernel: File,
    /// The initramfs image, if any.
    pub initramfs: Option<File>,
    /// The disk images and the vsock socket.
    pub virtio: VirtioHost,
}

/// A lifecycle change asked for by a front end, carried out after the reply is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Rebuild the VM.
    Reboot,
    /// Stop and exit 0.
    Shutdown,
}

/// Everything that outlives a reboot, and the machine of the current boot.
pub struct Vmm {
    host: Host,
    events_rx: Receiver<VcpuEvent>,
    events_wake: Arc<EventFd>,
    /// Sizes of the next boot (the vCPU count is taken from the machine at teardown).
    next: BootSpec,
    machine: Option<Machine>,
    boots: u32,
    requested: Option<Lifecycle>,
    last_ost: Option<String>,
    /// When minivmm started (for `uptime` and the boot marker).
    process_started: Instant,
    /// Events not yet handed to the front ends (drained by [`Vmm::take_events`]).
    events: Vec<Event>,
    /// When the vsock muxer last had its housekeeping tick.
    last_tick: Instant,
}

/// How often the vsock muxer's timeouts are checked while it has connections.
const VSOCK_TICK: std::time::Duration = std::time::Duration::from_secs(1);

impl Vmm {
    /// Prepares a VMM; nothing runs until [`Vmm::boot`].
    ///
    /// `files` are the opened kernel, initramfs, disks and vsock socket; `serial_out` receives
    /// the guest's console output; `vcpu_filter` is installed on every vCPU
    /// thread; `process_started` is when minivmm started (`uptime` and boot times count from it).
    pub fn new(
        config: VmConfig,
        kvm: Kvm,
        files: GuestFiles,
        serial_out: SharedWriter,
        vcpu_filter: Option<Arc<BpfProgram>>,
        process_started: Instant,
    ) -> Result<Vmm, MachineError> {
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd);
        let (tx, events_rx) = channel();
        let events_wake = Arc::new(eventfd()?);
        let next = BootSpec {
            cpus: config.cpus.boot,
            mem: config.memory.size,
        };
        let GuestFiles {
            kernel,
            initramfs,
            virtio,
        } = files;
        let host = Host {
            cmdline: config.kernel_cmdline(),
            kvm,
            kernel,
            initramfs,
            serial_out,
            serial_irq: eventfd()?,
            ged_irq: eventfd()?,
            input_room: Arc::new(eventfd()?),
            sink: EventSink::new(tx, events_wake.clone()),
            vcpu_filter,
            virtio,
            config,
        };
        Ok(Vmm {
            host,
            events_rx,
            events_wake,
            next,
            machine: None,
            boots: 0,
            requested: None,
            last_ost: None,
            process_started,
            events: Vec::new(),
            last_tick: Instant::now(),
        })
    }

    /// Event fd the loop watches for vCPU events.
    pub fn events_fd(&self) -> &EventFd {
        &self.events_wake
    }

    /// Event fd signalled when the guest drained the serial receive FIFO.
    pub fn input_room_fd(&self) -> &EventFd {
        &self.host.input_room
    }

    /// Largest RAM size: boot size plus the hotplug window, fixed at start.
    fn max_mem(&self) -> u64 {
        self.host.config.memory.max()
    }

    /// Builds the machine for the next boot and starts its vCPUs.
    pub fn boot(&mut self) -> Result<(), MachineError> {
        let spec = self.next;
        let machine = Machine::boot(&mut self.host, spec)?;
        let took = machine.started.elapsed();
        self.machine = Some(machine);
        self.boots += 1;
        self.events.push(Event::Boot {
            n: self.boots,
            cpus: spec.cpus,
            mem: spec.mem,
        });
        log::info!(
            "boot {}: {} vCPUs (max {}), {} RAM (max {}), set up in {took:?}",
            self.boots,
            spec.cpus,
            self.host.config.cpus.max,
            format_size(spec.mem),
            format_size(self.max_mem()),
        );
        Ok(())
    }

    /// Takes the lifecycle change requested on the control pipe, if any.
    pub fn take_request(&mut self) -> Option<Lifecycle> {
        self.requested.take()
    }

    /// Whether `--no-reboot` was given.
    pub fn no_reboot(&self) -> bool {
        self.host.config.no_reboot
    }

    /// Stops every vCPU and drops the machine; the next boot keeps its vCPU count.
    pub fn teardown(&mut self) {
        if let Some(mut machine) = self.machine.take() {
            machine.stop();
            self.next.cpus = machine.cpus.target();
        }
        // Events of the old machine's vCPUs must not reach the next one.
        while self.events_rx.try_recv().is_ok() {}
    }

    /// Rebuilds the VM for the next boot (current vCPU count, pending RAM size).
    pub fn reboot(&mut self) -> Result<(), MachineError> {
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
                VcpuEvent::Request { event, at, .. } if !event.stops_the_vm() => match event {
                    DeviceEvent::CpuEject(cpu) => {
                        if let Some(m) = self.machine.as_mut() {
                            self.events.extend(m.cpus.reap(cpu));
                        }
                    }
                    DeviceEvent::MemEject(slot) => {
                        if let Some(m) = self.machine.as_mut() {
                            let step = m.reap_memory(Some(slot as usize));
                            self.apply(step);
                        }
                    }
                    DeviceEvent::CpuOst { .. } | DeviceEvent::MemOst { .. } => self.on_ost(event),
                    DeviceEvent::VirtioStatus => {
                        if let Some(m) = &self.machine {
                            m.virtio.settle();
                        }
                    }
                    DeviceEvent::BootMarker(value) => self.on_boot_marker(value, at),
                    _ => {}
                },
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
    pub fn guest_reset(&mut self, cause: ResetCause) -> Result<(), MachineError> {
        log::log!(cause.log_level(), "guest reset through {cause}: rebooting");
        self.announced_reboot(cause.token())
    }

    /// Announces a reboot (`event reboot cause=...`) and rebuilds the VM.
    pub fn announced_reboot(&mut self, cause: &'static str) -> Result<(), MachineError> {
        self.events.push(Event::Reboot { cause });
        self.reboot()
    }

    /// Records a guest `_OST` report; a refused eject withdraws the removal, so the CPU stays
    /// and later CPU resizes are not blocked by a removal that will never complete.
    fn on_ost(&mut self, report: DeviceEvent) {
        let (device, event, status) = match report {
            DeviceEvent::CpuOst { cpu, event, status } => (format!("cpu{cpu}"), event, status),
            DeviceEvent::MemOst {
                slot,
                event,
                status,
            } => (format!("mem{slot}"), event, status),
            _ => return,
        };
        let described = ost::describe(event, status);
        let text = format!("{device}:{described}");
        self.events.push(Event::Ost {
            device,
            report: described,
        });
        if !ost::failed(event, status) {
            log::info!("guest _OST {text}");
            if status == 0 {
                self.last_ost = Some(text);
            }
            return;
        }
        log::warn!("guest _OST {text}: the guest refused the request");
        if let (true, Some(m)) = (ost::is_eject(event), self.machine.as_mut()) {
            match report {
                DeviceEvent::CpuOst { cpu, .. } if m.cpus.withdraw_removal(cpu) => {
                    log::warn!("removal of vCPU {cpu} withdrawn; it stays present");
                }
                DeviceEvent::MemOst { slot, .. } => {
                    self.events.extend(
                        m.memory
                            .withdraw(slot as usize, &ost::describe(event, status)),
                    );
                }
                _ => {}
            }
        }
        self.last_ost = Some(text);
    }

    /// Carries out a step of a live memory removal: its events, and the GED interrupt that
    /// tells the guest about the next slot to eject.
    fn apply(&mut self, step: Step) {
        self.events.extend(step.events);
        if let (true, Some(m)) = (step.notify, self.machine.as_ref()) {
            m.notify_ged(GED_MEMORY);
        }
    }

    /// When the VMM next needs the loop to wake up without an event: the deadline of a live
    /// memory removal, or the next vsock housekeeping tick while it has connections.
    pub fn next_deadline(&self) -> Option<Instant> {
        let removal = self.machine.as_ref()?.memory.removal_deadline();
        let tick = self
            .host
            .virtio
            .vsock_needs_tick()
            .then(|| self.last_tick + VSOCK_TICK);
        removal.into_iter().chain(tick).min()
    }

    /// Number of the current boot (1 for the first), so the loop knows when the per-boot fds
    /// (virtqueue kicks) changed.
    pub fn boot_count(&self) -> u32 {
        self.boots
    }

    /// The current boot's virtqueue kick eventfds, as (fd, device, queue).
    pub fn virtio_kick_fds(&self) -> Vec<(std::os::fd::RawFd, usize, usize)> {
        self.machine
            .as_ref()
            .map_or_else(Vec::new, |m| m.virtio.kick_fds())
    }

    /// The guest kicked a virtqueue.
    pub fn virtio_kick(&mut self, device: usize, queue: usize) {
        if let Some(m) = &self.machine {
            m.virtio.kick(device, queue, m.vm.memory());
        }
    }

    /// A host fd of the vsock device is ready.
    pub fn vsock_host_event(&mut self, token: u64, readable: bool, writable: bool, hangup: bool) {
        let wake = Wake::Host {
            token,
            readable,
            writable,
            hangup,
        };
        if let Some(m) = &self.machine {
            m.virtio.vsock_wake(wake, m.vm.memory());
        }
    }

    /// The vsock muxer's epoll changes since the last call.
    pub fn vsock_interest_changes(&self) -> Vec<crate::devices::virtio::vsock::muxer::Interest> {
        self.host.virtio.vsock_interest_changes()
    }

    /// Handles a deadline from [`Vmm::next_deadline`] that has passed: the vsock muxer's
    /// housekeeping tick, and a memory slot the guest has not ejected in time is withdrawn.
    pub fn on_deadline(&mut self) {
        let now = Instant::now();
        if now >= self.last_tick + VSOCK_TICK {
            self.last_tick = now;
            if let Some(m) = &self.machine {
                m.virtio.vsock_wake(Wake::Tick, m.vm.memory());
            }
        }
        let Some(m) = self.machine.as_mut() else {
            return;
        };
        if m.memory.removal_deadline().is_none_or(|d| now < d) {
            return;
        }
        // The guest may have ejected it just now; its event may still be queued.
        let step = m.reap_memory(None);
        self.apply(step);
        if let Some(m) = self.machine.as_mut() {
            let timed_out = m.memory.check_timeout(Instant::now());
            self.events.extend(timed_out);
        }
    }

    /// Feeds host input to the guest's UART; returns how many bytes it accepted.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        match &self.machine {
            Some(m) => lock(&m.serial).enqueue_input(bytes),
            None => 0,
        }
    }

    /// `info` of the VM, running (`m`) or stopped.
    fn info_of(&self, m: Option<&Machine>) -> VmInfo {
        let stopped = VmInfo {
            state: "stopped",
            cpus: 0,
            pending_cpus: self.next.cpus,
            max_cpus: self.host.config.cpus.max,
            mem: 0,
            pending_mem: self.next.mem,
            max_mem: self.max_mem(),
            hotplug_slots_free: 0,
            removing: Vec::new(),
            removing_mem: Vec::new(),
            last_ost: self.last_ost.clone(),
            uptime: self.process_started.elapsed(),
            boot_marker: None,
        };
        let Some(m) = m else {
            return stopped;
        };
        let (slots, used) = m.memory.slots();
        VmInfo {
            state: "running",
            cpus: m.cpus.present(),
            pending_cpus: m.cpus.target(),
            mem: m.memory.size(),
            hotplug_slots_free: (slots - used) as u32,
            removing: m.cpus.removing(),
            removing_mem: m.memory.removing().map(|s| s as u32).into_iter().collect(),
            boot_marker: m.boot_marker,
            ..stopped
        }
    }
}

/// Why a front end's request was refused; the message is what a client sees after `error `.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The VM has stopped (or is between boots).
    #[error("the VM is not running")]
    NotRunning,
    /// The resize was refused or failed.
    #[error(transparent)]
    Resize(#[from] resize::ResizeError),
    /// The GED could not interrupt the guest.
    #[error("raising the GED interrupt: {0}")]
    Ged(#[source] std::io::Error),
}

impl ControlTarget for Vmm {
    type Error = RequestError;

    fn info(&self) -> VmInfo {
        self.info_of(self.machine.as_ref())
    }

    fn resize(&mut self, cpus: Option<u32>, mem: Option<u64>) -> Result<VmInfo, RequestError> {
        let Some(m) = self.machine.as_mut() else {
            return Err(RequestError::NotRunning);
        };
        let limits = resize::Limits {
            max_cpus: self.host.config.cpus.max,
            max_mem: self.host.config.memory.max(),
            target_mem: self.next.mem,
        };
        if let Some(want) = resize::transact(m, &limits, cpus, mem, &mut self.events)? {
            self.next.mem = want;
        }
        Ok(self.info())
    }

    fn reboot(&mut self) -> Result<(), RequestError> {
        // The event loop performs the reboot after the reply is sent.
        self.requested = Some(Lifecycle::Reboot);
        Ok(())
    }

    fn shutdown(&mut self) -> Result<(), RequestError> {
        self.requested = Some(Lifecycle::Shutdown);
        Ok(())
    }

    fn power_button(&mut self) -> Result<(), RequestError> {
        let m = self.machine.as_ref().ok_or(RequestError::NotRunning)?;
        lock(&m.ged)
            .notify(GED_POWER_BUTTON)
            .map_err(RequestError::Ged)?;
        self.events.push(Event::PowerButton);
        Ok(())
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.teardown();
    }
}

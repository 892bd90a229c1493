//! One boot of the guest: the KVM VM and its memory, the loaded guest image and ACPI tables,
//! the devices on their buses, and the CPU and memory managers. [`Machine::boot`] builds it,
//! [`Machine::stop`] ends it; the VMM builds a new one on every reboot from the same [`Host`].

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiConfig};
use crate::arch::x86_64::layout::{self, ports};
use crate::arch::x86_64::{boot, memory, regs};
use crate::config::VmConfig;
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::debug_exit::DebugExit;
use crate::devices::debug_port::DebugPort;
use crate::devices::ged::Ged;
use crate::devices::i8042::I8042;
use crate::devices::pvpanic::PvPanic;
use crate::devices::reset_control::ResetControl;
use crate::devices::rtc::Rtc;
use crate::devices::serial::SerialDevice;
use crate::devices::{lock, Bus, BusDevice, Trigger};
use crate::host::seccomp::BpfProgram;
use crate::kvm::vcpu::{EventSink, VcpuContext};
use crate::kvm::vm::{Vm, VmError, VmFeatures};
use crate::vmm::cpus::CpuManager;
use crate::vmm::memory::{hotplug_slots, MemoryManager, Step};
use crate::vmm::resize::{self, BackendError};
use crate::vmm::virtio::{VirtioDevices, VirtioHost, VirtioSetupError};

/// Errors while building a machine or changing it.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
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
    Vcpu(#[from] crate::kvm::vcpu::VcpuError),
    /// A device could not be placed on a bus.
    #[error("device bus: {0}")]
    Bus(#[from] crate::devices::BusError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A virtio device could not be set up.
    #[error(transparent)]
    Virtio(#[from] VirtioSetupError),
    /// Rewinding a kernel or initramfs file failed.
    #[error("cannot read {0}: {1}")]
    Image(String, #[source] std::io::Error),
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

/// What every boot is built from and what outlives it: the configuration, the open kernel
/// files, the interrupt eventfds the loop and KVM share, and where vCPU events go.
pub struct Host {
    pub config: VmConfig,
    pub kvm: Kvm,
    pub kernel: File,
    pub initramfs: Option<File>,
    /// The kernel command line with minivmm's additions.
    pub cmdline: String,
    pub serial_out: SharedWriter,
    pub serial_irq: EventFd,
    pub ged_irq: EventFd,
    /// Signalled when the guest drained the UART's receive FIFO.
    pub input_room: Arc<EventFd>,
    pub sink: EventSink,
    /// Installed on every vCPU thread.
    pub vcpu_filter: Option<Arc<BpfProgram>>,
    /// Disk files and the vsock muxer.
    pub virtio: VirtioHost,
}

/// Sizes of a boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootSpec {
    /// vCPUs present at boot.
    pub cpus: u32,
    /// Boot RAM.
    pub mem: u64,
}

/// ACPI configuration for a boot of `cpus` vCPUs and `mem` bytes of RAM.
pub fn acpi_config(config: &VmConfig, cpus: u32, mem: u64) -> AcpiConfig {
    let window = memory::hotplug_window(mem, config.memory.max() - mem);
    AcpiConfig {
        boot_cpus: cpus,
        max_cpus: config.cpus.max,
        memory_slots: hotplug_slots(&window),
        memory_removable: config.memory.removable,
        pvpanic: config.pvpanic,
        virtio_devices: config.disks.len() + usize::from(config.vsock.is_some()),
    }
}

/// A device as the buses hold it.
type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// One boot of the guest.
pub struct Machine {
    pub vm: Vm,
    /// What the vCPU threads dispatch to.
    pub ctx: VcpuContext,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub ged: Arc<Mutex<Ged>>,
    pub cpus: CpuManager,
    pub memory: MemoryManager,
    pub virtio: VirtioDevices,
    /// When this boot started (before the VM was created).
    pub started: Instant,
    /// Time from `started` to the guest's first debug-port write.
    pub boot_marker: Option<Duration>,
}

impl Machine {
    /// Builds the VM for `spec`, loads the guest and starts its boot vCPUs.
    pub fn boot(host: &mut Host, spec: BootSpec) -> Result<Machine, MachineError> {
        let started = Instant::now();
        let max_cpus = host.config.cpus.max;
        // cpu-online events are opt-in: guests in the nested emulated test host hung or
        // triple-faulted now and then with the MSR filter.
        let features = VmFeatures {
            pit: host.config.pit,
            huge_pages: host.config.memory.huge_pages,
            report_online: host.config.cpu_online_events,
        };
        let vm = Vm::new(&host.kvm, &memory::ram_regions(spec.mem), features)?;
        let kernel = load_guest(host, &vm, spec)?;
        vm.register_irqfd(&host.serial_irq, layout::irq::COM1)?;
        vm.register_irqfd(&host.ged_irq, layout::irq::GED)?;

        let cpus = CpuManager::new(max_cpus, spec.cpus);
        let memory = MemoryManager::new(spec.mem, &host.config.memory);
        let trigger = |e: &EventFd| -> Result<Arc<dyn Trigger>, MachineError> {
            Ok(Arc::new(e.try_clone().map_err(MachineError::EventFd)?))
        };
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            trigger(&host.serial_irq)?,
            trigger(&host.input_room)?,
            Box::new(host.serial_out.clone()),
        )));
        let ged = Arc::new(Mutex::new(Ged::new(trigger(&host.ged_irq)?)));
        let mut mmio = mmio_bus(ged.clone(), &cpus, &memory)?;
        let virtio = VirtioDevices::new(&host.virtio, &vm, &mut mmio)?;
        let ctx = VcpuContext {
            pio: Arc::new(pio_bus(&host.config, serial.clone())?),
            mmio: Arc::new(mmio),
            events: host.sink.clone(),
            seccomp: host.vcpu_filter.clone(),
        };

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
            ctx,
            serial,
            ged,
            cpus,
            memory,
            virtio,
            started,
            boot_marker: None,
        };
        for (id, fd) in (0..).zip(fds) {
            if let Err(e) = machine.cpus.vcpus.run(id, fd, &machine.ctx) {
                machine.stop();
                return Err(e.into());
            }
        }
        Ok(machine)
    }

    /// Stops every vCPU; the VM and its memory go when the machine is dropped.
    pub fn stop(&mut self) {
        self.cpus.vcpus.stop_all();
    }

    /// Raises the GED interrupt with `flags`; a failure is logged (the guest then sees the
    /// change at its next scan).
    pub fn notify_ged(&self, flags: u8) {
        if let Err(e) = lock(&self.ged).notify(flags) {
            log::error!("raising the GED interrupt: {e}");
        }
    }

    /// Unmaps memory slot `slot` after the guest's eject (None: the slot being removed, if the
    /// guest has ejected it) and asks for the next one while the shrink's target allows.
    pub fn reap_memory(&mut self, slot: Option<usize>) -> Step {
        let vm = &mut self.vm;
        let mut unmap = |start: u64| vm.remove_memory(GuestAddress(start));
        match slot {
            Some(slot) => self.memory.reap(slot, &mut unmap),
            None => self.memory.reap_ejected(&mut unmap),
        }
    }
}

/// Loads the kernel, the initramfs, the boot parameters and the ACPI tables into `vm`.
fn load_guest(host: &mut Host, vm: &Vm, spec: BootSpec) -> Result<boot::KernelEntry, MachineError> {
    let config = &host.config;
    host.kernel
        .seek(SeekFrom::Start(0))
        .map_err(|e| MachineError::Image(config.kernel.display().to_string(), e))?;
    let kernel = boot::load_kernel(vm.memory(), &mut host.kernel)?;
    let initrd = match (&mut host.initramfs, &config.initramfs) {
        (Some(file), Some(path)) => {
            file.seek(SeekFrom::Start(0))
                .map_err(|e| MachineError::Image(path.display().to_string(), e))?;
            Some(boot::load_initramfs(vm.memory(), file, &kernel, spec.mem)?)
        }
        _ => None,
    };
    boot::configure_system(vm.memory(), &kernel, &host.cmdline, initrd, spec.mem)?;
    let tables = acpi::build(&acpi_config(config, spec.cpus, spec.mem))?;
    acpi::write(vm.memory(), &tables)?;
    Ok(kernel)
}

/// The port I/O bus: the legacy devices at their fixed ports, pvpanic and the exit device when
/// configured.
fn pio_bus(config: &VmConfig, serial: Arc<Mutex<SerialDevice>>) -> Result<Bus, MachineError> {
    fn shared(dev: impl BusDevice + 'static) -> SharedDevice {
        Arc::new(Mutex::new(dev))
    }
    let mut devices: Vec<(u16, u16, SharedDevice)> = vec![
        (ports::COM1, ports::COM1_SIZE, serial),
        (
            ports::RTC_INDEX,
            ports::RTC_SIZE,
            shared(Rtc::with_system_clock()),
        ),
        (ports::I8042_DATA, ports::I8042_SIZE, shared(I8042::new())),
        (
            ports::ACPI_SLEEP_CONTROL,
            ports::ACPI_PM_SIZE,
            shared(AcpiPm::new()),
        ),
        (
            ports::RESET_CONTROL,
            ports::RESET_CONTROL_SIZE,
            shared(ResetControl::new()),
        ),
        (
            ports::DEBUG_PORT,
            ports::DEBUG_PORT_SIZE,
            shared(DebugPort::new()),
        ),
    ];
    if config.pvpanic {
        devices.push((ports::PVPANIC, ports::PVPANIC_SIZE, shared(PvPanic::new())));
    }
    if let Some(exit) = config.exit_device {
        devices.push((exit.iobase, exit.iosize, shared(DebugExit::new())));
    }
    let mut bus = Bus::new();
    for (base, len, dev) in devices {
        bus.insert(u64::from(base), u64::from(len), dev)?;
    }
    Ok(bus)
}

/// The MMIO bus: the GED and the two hotplug controllers.
fn mmio_bus(
    ged: Arc<Mutex<Ged>>,
    cpus: &CpuManager,
    memory: &MemoryManager,
) -> Result<Bus, MachineError> {
    let devices: [(u64, u64, SharedDevice); 3] = [
        (layout::GED_START, layout::GED_SIZE, ged),
        (
            layout::CPU_HOTPLUG_START,
            layout::CPU_HOTPLUG_SIZE,
            cpus.device(),
        ),
        (
            layout::MEM_HOTPLUG_START,
            layout::MEM_HOTPLUG_SIZE,
            memory.device(),
        ),
    ];
    let mut bus = Bus::new();
    for (base, len, dev) in devices {
        bus.insert(base, len, dev)?;
    }
    Ok(bus)
}

/// The resize backend of a machine: KVM memory slots and vCPU threads.
impl resize::Backend for Machine {
    fn add_memory(&mut self, start: u64, size: u64) -> Result<(), BackendError> {
        Ok(self.vm.add_memory(GuestAddress(start), size)?)
    }

    fn remove_last_memory(&mut self) -> Result<(), BackendError> {
        Ok(self.vm.remove_last_memory()?)
    }

    fn start_vcpu(&mut self, id: u32) -> Result<(), BackendError> {
        Ok(self.cpus.vcpus.start(id, &self.vm, &self.ctx)?)
    }

    fn stop_vcpu(&mut self, id: u32) {
        self.cpus.vcpus.stop(id);
    }
}

/// The machine the resize transaction works on: its managers, KVM memory slots and the GED.
impl resize::Machine for Machine {
    fn cpus(&mut self) -> &mut CpuManager {
        &mut self.cpus
    }

    fn memory(&mut self) -> &mut MemoryManager {
        &mut self.memory
    }

    fn reap_memory(&mut self) -> Step {
        Machine::reap_memory(self, None)
    }

    fn notify(&mut self, flags: u8) {
        self.notify_ged(flags);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_config_follows_the_configuration() {
        let g = 1u64 << 30;
        let mut config = VmConfig::new("k".into());
        config.cpus.max = 4;
        config.memory.hotplug_size = 2 * g;
        let acpi = acpi_config(&config, 1, 512 << 20);
        assert_eq!(
            (
                acpi.boot_cpus,
                acpi.memory_slots,
                acpi.max_cpus,
                acpi.pvpanic
            ),
            (1, 16, 4, true)
        );
    }
}

//! Device models of a minivmm guest.
//!
//! Every device is a plain state machine: it performs no I/O of its own (no file descriptors,
//! no threads). vCPU threads drive the devices through a [`Bus`] on PIO/MMIO exits, and the VMM
//! main thread drives them directly (hotplug requests, host serial input). The only ways a device
//! reaches the outside world are an injected [`Trigger`] (an interrupt line or a wakeup) and, for
//! the serial port, an injected [`std::io::Write`].

pub mod acpi_pm;
pub mod bus;
pub mod cpu_hotplug;
pub mod debug_exit;
pub mod debug_port;
pub mod ged;
pub mod i8042;
pub mod mem_hotplug;
pub mod pvpanic;
pub mod regs;
pub mod reset_control;
pub mod rtc;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusError};

/// Locks a device, also after a thread panicked while holding it: device state stays usable
/// (every device keeps its invariants between register accesses).
pub fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Raises an interrupt line or signals an event (for KVM, an `EventFd` registered as an irqfd).
pub trait Trigger: Send + Sync {
    /// Fires the trigger once.
    fn trigger(&self) -> std::io::Result<()>;
}

impl Trigger for vmm_sys_util::eventfd::EventFd {
    /// Adds 1 to the eventfd counter, which KVM turns into one edge on the irqfd's GSI.
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}

/// How the guest reset the machine (for the log and the exit message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetCause {
    /// The FADT reset register (Linux `reboot=acpi`, and the first try of its default order).
    AcpiResetRegister,
    /// The reset-vector stub, reached through Linux's BIOS reboot path (`reboot=bios|efi`, and its
    /// default on hardware-reduced ACPI without EFI).
    BiosResetVector,
    /// The i8042 pulse-reset command 0xFE (Linux `reboot=kbd`).
    Keyboard,
    /// The reset control register at port 0xCF9 (Linux `reboot=pci`).
    ResetControl,
    /// A triple fault (`KVM_EXIT_SHUTDOWN`): Linux `reboot=triple`, or a crashing guest. Resets
    /// the machine, as on hardware.
    TripleFault {
        /// RIP when KVM reported the shutdown (on AMD hosts KVM has already re-initialised the
        /// vCPU, so this is the reset vector's 0xfff0).
        rip: u64,
    },
    /// A KVM reset system event.
    SystemEvent,
}

impl ResetCause {
    /// A one-word name for event lines: `acpi`, `bios`, `kbd`, `pci`, `triple` or `kvm`.
    pub fn token(&self) -> &'static str {
        match self {
            ResetCause::AcpiResetRegister => "acpi",
            ResetCause::BiosResetVector => "bios",
            ResetCause::Keyboard => "kbd",
            ResetCause::ResetControl => "pci",
            ResetCause::TripleFault { .. } => "triple",
            ResetCause::SystemEvent => "kvm",
        }
    }

    /// How loudly to log this reset: a triple fault is usually a guest crash.
    pub fn log_level(&self) -> log::Level {
        match self {
            ResetCause::TripleFault { .. } => log::Level::Warn,
            _ => log::Level::Info,
        }
    }
}

impl std::fmt::Display for ResetCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResetCause::AcpiResetRegister => write!(f, "the ACPI reset register"),
            ResetCause::BiosResetVector => write!(
                f,
                "the BIOS reset vector (Linux reboot=bios or efi, its default without EFI)"
            ),
            ResetCause::Keyboard => write!(f, "the i8042 reset command (Linux reboot=kbd)"),
            ResetCause::ResetControl => {
                write!(f, "the reset control register 0xcf9 (Linux reboot=pci)")
            }
            ResetCause::TripleFault { rip } if *rip == 0xfff0 => write!(
                f,
                "a triple fault (Linux reboot=triple, or a guest crash; RIP {rip:#x} is the reset \
                 vector: KVM on AMD re-initialises the vCPU, so the faulting RIP is lost)"
            ),
            ResetCause::TripleFault { rip } => write!(
                f,
                "a triple fault at RIP {rip:#x} (Linux reboot=triple, or a guest crash)"
            ),
            ResetCause::SystemEvent => write!(f, "a KVM reset system event"),
        }
    }
}

/// What a device register write asks the VMM to do (returned from [`BusDevice::write`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// Nothing for the VMM to do.
    None,
    /// The guest asked for a machine reset.
    Reset(ResetCause),
    /// The guest entered ACPI S5 (SLP_TYP 5 with SLP_EN).
    PowerOff,
    /// The guest wrote this value to the exit device: minivmm must exit with its mapped code.
    GuestExit(u32),
    /// The guest reported a panic through pvpanic.
    Panic,
    /// The guest's first write to the debug port this boot, with the value written.
    BootMarker(u8),
    /// The guest's `_EJ0` for this CPU index was accepted; the VMM must stop that vCPU.
    CpuEject(u32),
    /// The guest's `_EJ0` for this memory slot was accepted; the VMM must unmap its memory.
    MemEject(u32),
    /// The guest reported `_OST` for a CPU.
    CpuOst {
        /// CPU index (= APIC ID = ACPI UID).
        cpu: u32,
        /// ACPI notification the status answers (1 = insert, 3 = eject request).
        event: u32,
        /// ACPI `_OST` status code (0 = success, 0x80 = not supported, 0x82 = busy, ...).
        status: u32,
    },
    /// A virtio driver reset or started a device: the main thread must carry out the device's
    /// side (`MmioTransport::settle`), which may touch host resources a vCPU thread must not.
    VirtioStatus,
    /// The guest reported `_OST` for a memory slot.
    MemOst {
        /// Memory hotplug slot index.
        slot: u32,
        /// ACPI notification the status answers (1 = insert, 3 = eject request).
        event: u32,
        /// ACPI `_OST` status code.
        status: u32,
    },
}

impl DeviceEvent {
    /// Whether the event ends the VM's run (or this boot): the vCPU that saw it stops.
    pub fn stops_the_vm(&self) -> bool {
        matches!(
            self,
            DeviceEvent::Reset(_) | DeviceEvent::PowerOff | DeviceEvent::GuestExit(_) | DeviceEvent::Panic
        )
    }
}

/// A device on the PIO or MMIO bus.
///
/// `offset` is relative to the device's base; the [`Bus`] guarantees that
/// `offset + data.len()` lies within the range the device was inserted with.
pub trait BusDevice: Send {
    /// Handles a guest read of `data.len()` bytes; the device fills all of `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write and reports what the VMM must do in response.
    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceEvent;
}

#[cfg(test)]
pub mod test_util {
    use super::Trigger;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A trigger that counts how often it fired.
    #[derive(Default)]
    pub struct CountingTrigger(AtomicUsize);

    impl CountingTrigger {
        /// Number of times the trigger fired.
        pub fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl Trigger for CountingTrigger {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A trigger that always fails.
    pub struct FailingTrigger;

    impl Trigger for FailingTrigger {
        fn trigger(&self) -> std::io::Result<()> {
            Err(std::io::Error::other("trigger failed"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn eventfd_trigger_adds_one() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        evt.trigger().unwrap();
        evt.trigger().unwrap();
        assert_eq!(evt.read().unwrap(), 2);
    }
}

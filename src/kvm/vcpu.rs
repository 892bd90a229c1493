//! vCPU threads: one thread per vCPU runs `KVM_RUN` and dispatches port and MMIO exits to the
//! device buses. Everything that concerns the whole VM (reset, power-off, faults, ejects) is sent
//! to the main thread as a [`VcpuEvent`]; a vCPU thread never tears anything down itself.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::msr;
use crate::arch::x86_64::reset_vector::in_reset_vector_stub;
use crate::devices::{Bus, DeviceEvent, ResetCause};
use crate::host::seccomp::{self, BpfProgram};

/// Errors of the vCPU thread machinery.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be created.
    #[error("cannot spawn the thread for vCPU {0}: {1}")]
    Spawn(u32, #[source] std::io::Error),
    /// The thread ended abnormally and its vCPU fd is lost.
    #[error("the thread of vCPU {0} panicked")]
    Join(u32),
    /// A vCPU index at or above the VM's maximum (a bug in the caller's plan).
    #[error("vCPU {0} is out of range (the maximum is {1})")]
    OutOfRange(u32, u32),
    /// KVM could not create or set up the vCPU.
    #[error(transparent)]
    Create(#[from] crate::kvm::vm::VmError),
}

/// What a vCPU thread tells the main thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest asks the VMM for something, through a device register (reset, power-off,
    /// exit device, pvpanic, debug port, ejects, `_OST`, virtio status work) or a KVM exit (a
    /// system event or a triple fault, as a reset or a power-off).
    Request {
        /// The vCPU that saw it.
        cpu: u32,
        /// What is asked.
        event: DeviceEvent,
        /// When the vCPU saw it.
        at: Instant,
    },
    /// This vCPU came online: the guest kernel set up its SYSCALL entry (IA32_LSTAR).
    Online(u32),
    /// The vCPU hit a condition it cannot continue from.
    Fatal {
        /// vCPU index.
        cpu: u32,
        /// Human-readable reason, including the exit reason and RIP.
        reason: String,
    },
}

/// The channel from vCPU threads to the main thread's event loop.
#[derive(Clone)]
pub struct EventSink {
    tx: Sender<VcpuEvent>,
    wake: Arc<EventFd>,
}

impl EventSink {
    /// Creates a sink that sends on `tx` and then wakes the event loop through `wake`.
    pub fn new(tx: Sender<VcpuEvent>, wake: Arc<EventFd>) -> Self {
        EventSink { tx, wake }
    }

    fn send(&self, event: VcpuEvent) {
        // The receiver only disappears while the VMM is exiting, when the event no longer matters.
        if self.tx.send(event).is_ok() {
            if let Err(e) = self.wake.write(1) {
                log::error!("cannot wake the event loop: {e}");
            }
        }
    }
}

/// Everything a vCPU thread needs besides its fd.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where to report VM-wide events.
    pub events: EventSink,
    /// Filter installed on the thread before it first enters the guest.
    pub seccomp: Option<Arc<BpfProgram>>,
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, so that the kick signal handler can set it.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer was set by this thread to the `immediate_exit` byte of its own
            // mapped `kvm_run` and is cleared before that mapping can go away; a volatile byte store
            // is async-signal-safe.
            unsafe { std::ptr::write_volatile(p, 1) };
        }
    });
}

/// The real-time signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick signal handler (process-wide; call once before spawning vCPU threads).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::SignalHandler)
}

/// A running vCPU thread.
pub struct VcpuThread {
    id: u32,
    kill: Arc<AtomicBool>,
    handle: JoinHandle<VcpuFd>,
}

impl VcpuThread {
    /// Starts a thread that runs `vcpu` until it is stopped.
    pub fn spawn(id: u32, vcpu: VcpuFd, ctx: VcpuContext) -> Result<Self, VcpuError> {
        let kill = Arc::new(AtomicBool::new(false));
        let thread_kill = kill.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .stack_size(256 << 10)
            .spawn(move || run_vcpu(id, vcpu, ctx, &thread_kill))
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(VcpuThread { id, kill, handle })
    }

    /// Asks the thread to stop, without waiting.
    pub fn signal_stop(&self) {
        self.kill.store(true, Ordering::SeqCst);
        self.handle.thread().unpark();
        if let Err(e) = self.handle.kill(kick_signal()) {
            // ESRCH: the thread already exited, which is what we want.
            log::debug!("kicking vcpu{}: {e}", self.id);
        }
    }

    /// Stops the thread and returns the vCPU fd (KVM cannot destroy a vCPU, so it is kept for reuse).
    pub fn stop(self) -> Result<VcpuFd, VcpuError> {
        self.signal_stop();
        let id = self.id;
        self.handle.join().map_err(|_| VcpuError::Join(id))
    }
}

fn run_vcpu(id: u32, mut vcpu: VcpuFd, ctx: VcpuContext, kill: &AtomicBool) -> VcpuFd {
    if let Some(filter) = &ctx.seccomp {
        if let Err(e) = seccomp::apply(filter, seccomp::ThreadKind::Vcpu(id)) {
            ctx.events.send(VcpuEvent::Fatal {
                cpu: id,
                reason: format!("cannot install the vCPU seccomp filter: {e}"),
            });
            return vcpu;
        }
    }
    seccomp::probe_forbidden_syscall("vcpu");
    let immediate_exit: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
    let mut vcpu = run_loop(id, vcpu, &ctx, kill);
    IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    vcpu.set_kvm_immediate_exit(0);
    vcpu
}

/// What the loop does after one exit.
enum Next {
    Continue,
    /// Complete a guest MSR write that KVM's filter sent here.
    WriteMsr {
        index: u32,
        data: u64,
    },
    /// Report this event, then wait to be stopped without entering the guest again.
    Stop(VcpuEvent),
}

fn run_loop(id: u32, mut vcpu: VcpuFd, ctx: &VcpuContext, kill: &AtomicBool) -> VcpuFd {
    while !kill.load(Ordering::SeqCst) {
        let next = match vcpu.run() {
            Ok(exit) => handle_exit(id, exit, ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Stop(VcpuEvent::Fatal {
                cpu: id,
                reason: format!("KVM_RUN failed: {e}"),
            }),
        };
        let next = match next {
            Next::WriteMsr { index, data } => match write_msr(&vcpu, index, data) {
                Ok(()) => {
                    ctx.events.send(VcpuEvent::Online(id));
                    Next::Continue
                }
                Err(reason) => {
                    // E.g. a non-canonical address: the guest gets the #GP hardware would raise.
                    log::warn!("vCPU {id}: {reason}; #GP to the guest");
                    let run = vcpu.get_kvm_run();
                    if run.exit_reason == kvm_bindings::KVM_EXIT_X86_WRMSR {
                        // `msr` is the union member of this exit; KVM reads `error` on the next
                        // KVM_RUN (writing a union field is safe).
                        run.__bindgen_anon_1.msr.error = 1;
                    }
                    Next::Continue
                }
            },
            other => other,
        };
        match next {
            Next::Continue | Next::WriteMsr { .. } => {}
            Next::Stop(event) => {
                let event = describe(&mut vcpu, event);
                ctx.events.send(event);
                // A vCPU that asked for a reset or power-off must not run the guest again.
                while !kill.load(Ordering::SeqCst) {
                    std::thread::park();
                }
            }
        }
    }
    vcpu
}

fn handle_exit(id: u32, exit: VcpuExit<'_>, ctx: &VcpuContext) -> Next {
    let device_event = match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.pio.read(u64::from(port), data);
            None
        }
        VcpuExit::IoOut(port, data) => ctx.pio.write(u64::from(port), data),
        VcpuExit::MmioRead(addr, data) => {
            ctx.mmio.read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => ctx.mmio.write(addr, data),
        VcpuExit::Intr => None,
        VcpuExit::X86Wrmsr(exit) => {
            // Only IA32_LSTAR is filtered; minivmm performs the write itself with KVM_SET_MSRS.
            *exit.error = 0;
            return Next::WriteMsr {
                index: exit.index,
                data: exit.data,
            };
        }
        VcpuExit::SystemEvent(kind, _) => {
            return match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    Next::Stop(request(id, DeviceEvent::PowerOff))
                }
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    Next::Stop(request(id, DeviceEvent::Reset(ResetCause::SystemEvent)))
                }
                other => Next::Stop(fatal(id, format!("system event {other}"))),
            }
        }
        // A triple fault resets a PC; the RIP is filled in by `describe`.
        VcpuExit::Shutdown => {
            let triple_fault = ResetCause::TripleFault { rip: 0 };
            return Next::Stop(request(id, DeviceEvent::Reset(triple_fault)));
        }
        VcpuExit::Hlt => return Next::Stop(fatal(id, "unexpected HLT exit (KVM_EXIT_HLT)")),
        VcpuExit::InternalError => return Next::Stop(fatal(id, "KVM_EXIT_INTERNAL_ERROR")),
        VcpuExit::FailEntry(reason, cpu) => {
            return Next::Stop(fatal(
                id,
                format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host cpu {cpu}"
            ),
            ))
        }
        other => return Next::Stop(fatal(id, format!("unexpected exit {other:?}"))),
    };
    match device_event {
        None | Some(DeviceEvent::None) => Next::Continue,
        Some(event) if event.stops_the_vm() => Next::Stop(request(id, event)),
        Some(event) => {
            ctx.events.send(request(id, event));
            Next::Continue
        }
    }
}

/// Performs a guest MSR write that the MSR filter sent to userspace.
fn write_msr(vcpu: &VcpuFd, index: u32, data: u64) -> Result<(), String> {
    let entry = kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    msr::set_msrs(vcpu, &[entry]).map_err(|e| format!("writing MSR {index:#x} = {data:#x}: {e}"))
}

fn request(cpu: u32, event: DeviceEvent) -> VcpuEvent {
    VcpuEvent::Request {
        cpu,
        event,
        at: Instant::now(),
    }
}

fn fatal(cpu: u32, reason: impl Into<String>) -> VcpuEvent {
    VcpuEvent::Fatal {
        cpu,
        reason: reason.into(),
    }
}

/// Adds register state to a stopping event, now that the exit's borrow of the vCPU has ended:
/// the RIP of a triple fault, whether an ACPI reset came from the reset-vector stub, and the
/// RIP and internal-error details of a fatal exit.
fn describe(vcpu: &mut VcpuFd, event: VcpuEvent) -> VcpuEvent {
    let reset = |cause| DeviceEvent::Reset(cause);
    match event {
        VcpuEvent::Request {
            cpu,
            event: DeviceEvent::Reset(ResetCause::TripleFault { .. }),
            at,
        } => {
            let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
            let event = reset(ResetCause::TripleFault { rip });
            VcpuEvent::Request { cpu, event, at }
        }
        VcpuEvent::Request {
            cpu,
            event: DeviceEvent::Reset(ResetCause::AcpiResetRegister),
            at,
        } => {
            let from_stub = match (vcpu.get_regs(), vcpu.get_sregs()) {
                (Ok(regs), Ok(sregs)) => in_reset_vector_stub(sregs.cs.base, regs.rip),
                _ => false,
            };
            let event = reset(if from_stub {
                ResetCause::BiosResetVector
            } else {
                ResetCause::AcpiResetRegister
            });
            VcpuEvent::Request { cpu, event, at }
        }
        VcpuEvent::Fatal { .. } => describe_fatal(vcpu, event),
        other => other,
    }
}

/// Adds the register state (and internal-error details) to a fatal event.
fn describe_fatal(vcpu: &mut VcpuFd, event: VcpuEvent) -> VcpuEvent {
    let VcpuEvent::Fatal { cpu, mut reason } = event else {
        return event;
    };
    let run = vcpu.get_kvm_run();
    if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: exit_reason says the `internal` member of the union is the valid one.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        reason.push_str(&format!(
            " suberror {} data {:x?}",
            internal.suberror,
            &internal.data[..n]
        ));
    }
    match vcpu.get_regs() {
        Ok(regs) => reason.push_str(&format!(" at RIP {:#x}", regs.rip)),
        Err(e) => reason.push_str(&format!(" (KVM_GET_REGS failed: {e})")),
    }
    VcpuEvent::Fatal { cpu, reason }
}

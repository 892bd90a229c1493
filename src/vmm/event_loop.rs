//! The main thread's epoll loop: host console input, vCPU events, signals and the control pipe,
//! all in one synchronous loop that sleeps in `epoll_wait` when there is nothing to do.

use std::io::ErrorKind;
use std::os::fd::RawFd;
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::control::events::Event;
use crate::control::protocol::{ControlTarget, VmInfo};
use crate::devices::DeviceEvent;
use crate::control::socket::ControlServer;
use crate::kvm::vcpu::VcpuEvent;
use crate::vmm::exit::Exit;
use crate::vmm::machine::MachineError;
use crate::vmm::{Lifecycle, RequestError, Vmm};

/// What an epoll event is about (its `u64` data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// Host console input is readable.
    Stdin,
    /// The guest drained the serial receive FIFO.
    InputRoom,
    /// vCPU threads queued events.
    VcpuEvents,
    /// A termination signal arrived.
    Signal,
    /// `--timeout` expired.
    Timeout,
    /// An embedder queued commands.
    Commands,
    /// A control-pipe fd; the value is the control server's own token.
    Control(u64),
    /// A virtqueue kick eventfd of this boot.
    Kick {
        /// virtio device index.
        device: usize,
        /// Queue index.
        queue: usize,
    },
    /// A host fd of the vsock muxer; the value is the muxer's own token.
    Vsock(u64),
}

/// Control server tokens are offset past the loop's own.
const CONTROL_BASE: u64 = 1 << 32;
/// Vsock muxer tokens (below `1 << 31`) are offset by this.
const VSOCK_BASE: u64 = 1 << 31;
/// Kick tokens: `KICK_BASE + device * KICK_QUEUES + queue`.
const KICK_BASE: u64 = 1 << 16;
/// Room for queues per device in a kick token (a device with more cannot be registered).
const KICK_QUEUES: u64 = 1 << 8;

impl Token {
    fn to_u64(self) -> u64 {
        match self {
            Token::Stdin => 1,
            Token::InputRoom => 2,
            Token::VcpuEvents => 3,
            Token::Signal => 4,
            Token::Timeout => 5,
            Token::Commands => 6,
            Token::Control(t) => CONTROL_BASE + t,
            Token::Kick { device, queue } => KICK_BASE + device as u64 * KICK_QUEUES + queue as u64,
            Token::Vsock(t) => VSOCK_BASE + t,
        }
    }

    fn from_u64(v: u64) -> Option<Token> {
        Some(match v {
            1 => Token::Stdin,
            2 => Token::InputRoom,
            3 => Token::VcpuEvents,
            4 => Token::Signal,
            5 => Token::Timeout,
            6 => Token::Commands,
            v if v >= CONTROL_BASE => Token::Control(v - CONTROL_BASE),
            v if v >= VSOCK_BASE => Token::Vsock(v - VSOCK_BASE),
            v if v >= KICK_BASE => Token::Kick {
                device: ((v - KICK_BASE) / KICK_QUEUES) as usize,
                queue: ((v - KICK_BASE) % KICK_QUEUES) as usize,
            },
            _ => return None,
        })
    }
}

/// Event loop errors.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// An epoll or signalfd operation failed.
    #[error("event loop: {0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// Rebuilding the VM on reboot failed.
    #[error("reboot failed: {0}")]
    Reboot(#[source] MachineError),
    /// The `--timeout` timer could not be set up.
    #[error("--timeout: cannot arm a timerfd: {0}")]
    Timer(#[source] std::io::Error),
    /// A virtio device has more queues than a kick token has room for.
    #[error(
        "virtio device {device}: queue {queue} is past the event loop's {KICK_QUEUES} per device"
    )]
    TooManyQueues {
        /// virtio device index.
        device: usize,
        /// Queue index.
        queue: usize,
    },
}

/// The `--timeout` limit: a timerfd armed when minivmm starts.
pub struct Timeout {
    timer: TimerFd,
    limit: std::time::Duration,
}

impl Timeout {
    /// Arms a one-shot timer that expires `limit` from now (call before seccomp is installed).
    pub fn arm(limit: std::time::Duration) -> Result<Timeout, EventLoopError> {
        let mut timer = TimerFd::new().map_err(|e| EventLoopError::Timer(e.into()))?;
        timer
            .reset(limit, None)
            .map_err(|e| EventLoopError::Timer(e.into()))?;
        Ok(Timeout { timer, limit })
    }
}

/// A request from an embedder's [`crate::control::api::VmHandle`], answered on its own channel.
pub enum Command {
    Resize {
        cpus: Option<u32>,
        mem: Option<u64>,
        reply: Sender<Result<VmInfo, RequestError>>,
    },
    Info(Sender<VmInfo>),
    Reboot(Sender<Result<(), RequestError>>),
    Shutdown(Sender<Result<(), RequestError>>),
    PowerButton(Sender<Result<(), RequestError>>),
    /// Deliver events to this channel from now on (dropped when it is full or closed).
    Subscribe(SyncSender<Event>),
}

/// Where an embedder's commands arrive: the channel and the eventfd that wakes the loop.
pub struct Inbox {
    pub rx: Receiver<Command>,
    pub wake: Arc<EventFd>,
}

/// What the loop watches besides the VMM's own fds.
pub struct Sources {
    /// The control pipe, if any.
    pub control: Option<ControlServer>,
    /// Host console input (None with `--serial off|file`).
    pub stdin: Option<RawFd>,
    /// Termination signals, from [`termination_signalfd`] (None for embedders).
    pub signal_fd: Option<RawFd>,
    /// The `--timeout` limit, if any.
    pub timeout: Option<Timeout>,
    /// An embedder's commands, if any.
    pub commands: Option<Inbox>,
}

/// Embedder event channels.
#[derive(Default)]
struct Subscribers {
    senders: Vec<SyncSender<Event>>,
    dropped: u64,
}

impl Subscribers {
    fn deliver(&mut self, event: &Event) {
        let mut dropped = 0;
        self.senders.retain(|tx| match tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                dropped += 1;
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
        if dropped > 0 {
            if self.dropped == 0 {
                log::warn!("an embedder's event channel is full: events are dropped");
            }
            self.dropped += dropped;
        }
    }
}

/// Host input waiting for room in the guest UART.
///
/// Input is read from the host only when the previous chunk has been accepted, so nothing is
/// dropped and memory stays bounded: a pasted line arrives whole, as fast as the guest drains
/// its 64-byte FIFO.
struct InputPump {
    fd: Option<RawFd>,
    pending: Vec<u8>,
    watching: bool,
}

impl InputPump {
    fn watch(&mut self, epoll: &Epoll, on: bool) {
        let Some(fd) = self.fd else { return };
        if on == self.watching {
            return;
        }
        let result = if on {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, Token::Stdin.to_u64()),
            )
        } else {
            epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        match result {
            Ok(()) => self.watching = on,
            Err(e) => {
                // A regular file or /dev/null cannot be polled: the guest simply gets no input.
                log::info!("serial input disabled: cannot poll stdin: {e}");
                self.fd = None;
            }
        }
    }

    fn feed(&mut self, vmm: &Vmm) {
        if !self.pending.is_empty() {
            let n = vmm.serial_input(&self.pending);
            self.pending.drain(..n);
        }
    }

    fn on_readable(&mut self, epoll: &Epoll, vmm: &Vmm) {
        let Some(fd) = self.fd else { return };
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a local buffer of the given length from an fd we poll.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n == 0 {
            self.watch(epoll, false);
            self.fd = None;
            return;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::Interrupted {
                log::info!("serial input closed: {e}");
                self.watch(epoll, false);
                self.fd = None;
            }
            return;
        }
        self.pending.extend_from_slice(&buf[..n as usize]);
        self.feed(vmm);
        if !self.pending.is_empty() {
            self.watch(epoll, false);
        }
    }

    fn on_room(&mut self, epoll: &Epoll, vmm: &Vmm) {
        self.feed(vmm);
        if self.pending.is_empty() {
            self.watch(epoll, true);
        }
    }
}

/// Blocks the termination signals in the calling thread (and so in every thread it creates
/// afterwards) and returns a signalfd that reports them.
pub fn termination_signalfd() -> Result<RawFd, EventLoopError> {
    // SAFETY: sigset operations on a local, zero-initialised set; pthread_sigmask and signalfd
    // only read it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(EventLoopError::Io(
                "pthread_sigmask",
                std::io::Error::last_os_error(),
            ));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(EventLoopError::Io(
                "signalfd",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(fd)
    }
}

fn read_signal(fd: RawFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data; read writes at most its size.
    unsafe {
        let mut info: libc::signalfd_siginfo = std::mem::zeroed();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        let n = libc::read(fd, &mut info as *mut _ as *mut libc::c_void, size);
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}

/// Runs the VM until it powers off, exits through the exit device, panics, faults, is reset with
/// `--no-reboot`, times out, is stopped by a command or a signal arrives.
///
/// Events the VMM queues are sent to `watch` clients and embedder channels after each wakeup;
/// the last one, `exit`, is flushed without waiting before the loop returns.
pub fn run(vmm: &mut Vmm, mut sources: Sources) -> Result<Exit, EventLoopError> {
    let io = |what| move |e| EventLoopError::Io(what, e);
    let epoll = Epoll::new().map_err(io("epoll_create1"))?;
    let add = |fd: RawFd, token: Token| {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token.to_u64()),
            )
            .map_err(io("epoll_ctl"))
    };
    use std::os::fd::AsRawFd;
    add(vmm.events_fd().as_raw_fd(), Token::VcpuEvents)?;
    add(vmm.input_room_fd().as_raw_fd(), Token::InputRoom)?;
    if let Some(fd) = sources.signal_fd {
        add(fd, Token::Signal)?;
    }
    if let Some(t) = &sources.timeout {
        add(t.timer.as_raw_fd(), Token::Timeout)?;
    }
    if let Some(inbox) = &sources.commands {
        add(inbox.wake.as_raw_fd(), Token::Commands)?;
    }
    if let Some(c) = sources.control.as_mut() {
        c.register(&epoll, Token::Control(0).to_u64())
            .map_err(|e| EventLoopError::Io("control pipe", std::io::Error::other(e)))?;
    }
    let mut input = InputPump {
        fd: sources.stdin,
        pending: Vec::new(),
        watching: false,
    };
    input.watch(&epoll, true);
    let mut subscribers = Subscribers::default();
    let mut kicks_of_boot = 0;

    let mut events = vec![EpollEvent::default(); 32];
    crate::host::seccomp::probe_forbidden_syscall("main");
    loop {
        // A new boot has new virtqueue kick eventfds (the old ones left epoll when closed).
        if vmm.boot_count() != kicks_of_boot {
            kicks_of_boot = vmm.boot_count();
            for (fd, device, queue) in vmm.virtio_kick_fds() {
                if queue as u64 >= KICK_QUEUES {
                    return Err(EventLoopError::TooManyQueues { device, queue });
                }
                add(fd, Token::Kick { device, queue })?;
            }
        }
        apply_vsock_interest(&epoll, vmm)?;
        // Sleep until an fd is ready, or until the VMM's next deadline (a live memory removal
        // the guest has not answered), rounded up to whole milliseconds.
        let deadline = vmm.next_deadline();
        let timeout_ms = deadline.map_or(-1, |d| {
            let left = d.saturating_duration_since(std::time::Instant::now());
            i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        });
        let n = match epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(EventLoopError::Io("epoll_wait", e)),
        };
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            vmm.on_deadline();
        }
        let mut exit = None;
        for ev in &events[..n] {
            let mut ctx = Ctx {
                vmm: &mut *vmm,
                sources: &mut sources,
                epoll: &epoll,
                input: &mut input,
                subscribers: &mut subscribers,
            };
            exit = ctx.dispatch(ev)?;
            if exit.is_some() {
                break;
            }
        }
        let mut pending = vmm.take_events();
        if let Some(exit) = &exit {
            pending.push(Event::Exit {
                code: exit.code(),
                reason: exit.token(),
            });
        }
        for event in &pending {
            if let Some(control) = sources.control.as_mut() {
                control.broadcast(&epoll, &event.to_string());
            }
            subscribers.deliver(event);
        }
        if let Some(exit) = exit {
            if let Some(control) = sources.control.as_mut() {
                control.flush_all();
            }
            return Ok(exit);
        }
    }
}

/// Applies the vsock muxer's epoll changes, in order.
fn apply_vsock_interest(epoll: &Epoll, vmm: &Vmm) -> Result<(), EventLoopError> {
    for change in vmm.vsock_interest_changes() {
        let (op, fd, event) = change.epoll_ctl(VSOCK_BASE);
        if let Err(e) = epoll.ctl(op, fd, event) {
            // One connection's fd; the muxer notices its end on its own.
            log::debug!("vsock: epoll_ctl on fd {fd}: {e}");
        }
    }
    Ok(())
}

/// The loop's state while one ready fd is handled.
struct Ctx<'a> {
    vmm: &'a mut Vmm,
    sources: &'a mut Sources,
    epoll: &'a Epoll,
    input: &'a mut InputPump,
    subscribers: &'a mut Subscribers,
}

impl Ctx<'_> {
    /// Handles one ready fd; returns the exit reason if the VM must stop.
    fn dispatch(&mut self, ev: &EpollEvent) -> Result<Option<Exit>, EventLoopError> {
        let Some(token) = Token::from_u64(ev.data()) else {
            log::debug!("spurious epoll data {}", ev.data());
            return Ok(None);
        };
        let (vmm, epoll) = (&mut *self.vmm, self.epoll);
        match token {
            Token::Stdin => self.input.on_readable(epoll, vmm),
            Token::InputRoom => {
                let _ = vmm.input_room_fd().read();
                self.input.on_room(epoll, vmm);
            }
            Token::VcpuEvents => return self.on_vcpu_events(),
            Token::Signal => {
                if let Some(sig) = self.sources.signal_fd.and_then(read_signal) {
                    return Ok(Some(Exit::Signal(sig)));
                }
            }
            Token::Timeout => {
                if let Some(t) = &mut self.sources.timeout {
                    // The timer is one-shot: readable means it expired.
                    let _ = t.timer.wait();
                    return Ok(Some(Exit::Timeout(t.limit)));
                }
            }
            Token::Commands => {
                self.on_commands();
                return self.lifecycle_request();
            }
            Token::Control(id) => {
                if let Some(c) = self.sources.control.as_mut() {
                    c.handle(epoll, id, ev.event_set(), vmm);
                }
                return self.lifecycle_request();
            }
            Token::Kick { device, queue } => vmm.virtio_kick(device, queue),
            Token::Vsock(token) => {
                let set = ev.event_set();
                vmm.vsock_host_event(
                    token,
                    set.contains(EventSet::IN),
                    set.contains(EventSet::OUT),
                    set.intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP),
                );
            }
        }
        Ok(None)
    }

    fn on_vcpu_events(&mut self) -> Result<Option<Exit>, EventLoopError> {
        let vmm = &mut *self.vmm;
        Ok(match vmm.process_vcpu_events() {
            None => None,
            Some(VcpuEvent::Request { cpu, event, .. }) => match event {
                DeviceEvent::PowerOff => Some(Exit::PowerOff),
                DeviceEvent::GuestExit(value) => Some(Exit::GuestExit(value)),
                DeviceEvent::Panic => {
                    log::error!("the guest panicked (pvpanic write from vCPU {cpu})");
                    vmm.push_event(Event::Panic);
                    Some(Exit::Panic)
                }
                DeviceEvent::Reset(cause) if vmm.no_reboot() => Some(Exit::Reset(cause)),
                DeviceEvent::Reset(cause) => {
                    vmm.guest_reset(cause).map_err(EventLoopError::Reboot)?;
                    self.input.on_room(self.epoll, vmm);
                    None
                }
                other => {
                    log::debug!("ignored vCPU event {other:?}");
                    None
                }
            },
            Some(VcpuEvent::Fatal { cpu, reason }) => {
                Some(Exit::Fatal(format!("vCPU {cpu}: {reason}")))
            }
            Some(other) => {
                log::debug!("ignored vCPU event {other:?}");
                None
            }
        })
    }

    /// Answers every queued embedder command through the same [`ControlTarget`] calls the
    /// control pipe uses.
    fn on_commands(&mut self) {
        let Some(inbox) = &self.sources.commands else {
            return;
        };
        let _ = inbox.wake.read();
        let vmm = &mut *self.vmm;
        // A handle that went away just drops its reply.
        while let Ok(command) = inbox.rx.try_recv() {
            match command {
                Command::Resize { cpus, mem, reply } => {
                    let _ = reply.send(vmm.resize(cpus, mem));
                }
                Command::Info(reply) => {
                    let _ = reply.send(vmm.info());
                }
                Command::Reboot(reply) => {
                    let _ = reply.send(ControlTarget::reboot(vmm));
                }
                Command::Shutdown(reply) => {
                    let _ = reply.send(vmm.shutdown());
                }
                Command::PowerButton(reply) => {
                    let _ = reply.send(vmm.power_button());
                }
                Command::Subscribe(tx) => self.subscribers.senders.push(tx),
            }
        }
    }

    /// Carries out a reboot or shutdown asked for by a front end, after its reply was sent.
    fn lifecycle_request(&mut self) -> Result<Option<Exit>, EventLoopError> {
        match self.vmm.take_request() {
            None => Ok(None),
            Some(Lifecycle::Shutdown) => Ok(Some(Exit::PowerOff)),
            Some(Lifecycle::Reboot) => {
                log::info!("reboot requested");
                self.vmm
                    .announced_reboot("control")
                    .map_err(EventLoopError::Reboot)?;
                self.input.on_room(self.epoll, self.vmm);
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn every_token_round_trips() {
        let tokens = [
            Token::Stdin,
            Token::InputRoom,
            Token::VcpuEvents,
            Token::Signal,
            Token::Timeout,
            Token::Commands,
            Token::Control(0),
            Token::Control(12345),
            Token::Kick {
                device: 0,
                queue: 0,
            },
            Token::Kick {
                device: 3,
                queue: 8,
            },
            Token::Kick {
                device: 15,
                queue: (KICK_QUEUES - 1) as usize,
            },
            Token::Vsock(0),
            Token::Vsock((1 << 31) - 1),
        ];
        for t in tokens {
            assert_eq!(Token::from_u64(t.to_u64()), Some(t), "{t:?}");
        }
        assert_eq!(Token::from_u64(0), None);
    }
}

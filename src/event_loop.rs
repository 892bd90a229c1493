//! The main thread's epoll loop: host console input, vCPU events, signals and the control pipe,
//! all in one synchronous loop that sleeps in `epoll_wait` when there is nothing to do.

use std::io::ErrorKind;
use std::os::fd::RawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use crate::control_socket::ControlServer;
use crate::events::Event;
use crate::exit::Exit;
use crate::vcpu::VcpuEvent;
use crate::vmm::{Request, Vmm, VmmError};

const TOKEN_STDIN: u64 = 1;
const TOKEN_INPUT_ROOM: u64 = 2;
const TOKEN_VCPU_EVENTS: u64 = 3;
const TOKEN_SIGNAL: u64 = 4;
const TOKEN_TIMEOUT: u64 = 5;

/// Event loop errors.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// An epoll or signalfd operation failed.
    #[error("event loop: {0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// Rebuilding the VM on reboot failed.
    #[error("reboot failed: {0}")]
    Reboot(#[source] VmmError),
    /// The `--timeout` timer could not be set up.
    #[error("--timeout: cannot arm a timerfd: {0}")]
    Timer(#[source] std::io::Error),
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

/// What the loop watches besides the VMM's own fds.
pub struct Sources {
    /// The control pipe, if any.
    pub control: Option<ControlServer>,
    /// Host console input (None with `--serial off|file`).
    pub stdin: Option<RawFd>,
    /// Termination signals, from [`termination_signalfd`].
    pub signal_fd: RawFd,
    /// The `--timeout` limit, if any.
    pub timeout: Option<Timeout>,
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
                EpollEvent::new(EventSet::IN, TOKEN_STDIN),
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
/// `--no-reboot`, times out or a signal arrives.
///
/// Events the VMM queues are sent to `watch` clients after each wakeup; the last one, `exit`,
/// is flushed without waiting before the loop returns.
pub fn run(vmm: &mut Vmm, mut sources: Sources) -> Result<Exit, EventLoopError> {
    let io = |what| move |e| EventLoopError::Io(what, e);
    let epoll = Epoll::new().map_err(io("epoll_create1"))?;
    let add = |fd: RawFd, token: u64| {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(io("epoll_ctl"))
    };
    use std::os::fd::AsRawFd;
    add(vmm.events_fd().as_raw_fd(), TOKEN_VCPU_EVENTS)?;
    add(vmm.input_room_fd().as_raw_fd(), TOKEN_INPUT_ROOM)?;
    add(sources.signal_fd, TOKEN_SIGNAL)?;
    if let Some(t) = &sources.timeout {
        add(t.timer.as_raw_fd(), TOKEN_TIMEOUT)?;
    }
    if let Some(c) = &sources.control {
        c.register(&epoll)
            .map_err(|e| EventLoopError::Io("control pipe", std::io::Error::other(e)))?;
    }
    let mut input = InputPump {
        fd: sources.stdin,
        pending: Vec::new(),
        watching: false,
    };
    input.watch(&epoll, true);

    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(EventLoopError::Io("epoll_wait", e)),
        };
        let mut exit = None;
        for ev in &events[..n] {
            exit = dispatch(vmm, &mut sources, &epoll, &mut input, ev)?;
            if exit.is_some() {
                break;
            }
        }
        let pending = vmm.take_events();
        if let Some(control) = sources.control.as_mut() {
            for event in &pending {
                control.broadcast(&epoll, &event.to_string());
            }
        }
        if let Some(exit) = exit {
            if let Some(control) = sources.control.as_mut() {
                let event = Event::Exit {
                    code: exit.code(),
                    reason: exit.token(),
                };
                control.broadcast(&epoll, &event.to_string());
                control.flush_all();
            }
            return Ok(exit);
        }
    }
}

/// Handles one ready fd; returns the exit reason if the VM must stop.
fn dispatch(
    vmm: &mut Vmm,
    sources: &mut Sources,
    epoll: &Epoll,
    input: &mut InputPump,
    ev: &EpollEvent,
) -> Result<Option<Exit>, EventLoopError> {
    match ev.data() {
        TOKEN_STDIN => input.on_readable(epoll, vmm),
        TOKEN_INPUT_ROOM => {
            let _ = vmm.input_room_fd().read();
            input.on_room(epoll, vmm);
        }
        TOKEN_VCPU_EVENTS => match vmm.process_vcpu_events() {
            None => {}
            Some(VcpuEvent::PowerOff) => return Ok(Some(Exit::PowerOff)),
            Some(VcpuEvent::GuestExit(value)) => return Ok(Some(Exit::GuestExit(value))),
            Some(VcpuEvent::Panic { cpu }) => {
                log::error!("the guest panicked (pvpanic write from vCPU {cpu})");
                vmm.push_event(Event::Panic);
                return Ok(Some(Exit::Panic));
            }
            Some(VcpuEvent::Reset(cause)) if vmm.no_reboot() => {
                return Ok(Some(Exit::Reset(cause)))
            }
            Some(VcpuEvent::Reset(cause)) => {
                vmm.guest_reset(cause).map_err(EventLoopError::Reboot)?;
                input.on_room(epoll, vmm);
            }
            Some(VcpuEvent::Fatal { cpu, reason }) => {
                return Ok(Some(Exit::Fatal(format!("vCPU {cpu}: {reason}"))))
            }
            Some(other) => log::debug!("ignored vCPU event {other:?}"),
        },
        TOKEN_SIGNAL => {
            if let Some(sig) = read_signal(sources.signal_fd) {
                return Ok(Some(Exit::Signal(sig)));
            }
        }
        TOKEN_TIMEOUT => {
            if let Some(t) = &mut sources.timeout {
                // The timer is one-shot: readable means it expired.
                let _ = t.timer.wait();
                return Ok(Some(Exit::Timeout(t.limit)));
            }
        }
        token if ControlServer::owns(token) => {
            if let Some(c) = sources.control.as_mut() {
                c.handle(epoll, token, ev.event_set(), vmm);
            }
            match vmm.take_request() {
                None => {}
                Some(Request::Shutdown) => return Ok(Some(Exit::PowerOff)),
                Some(Request::Reboot) => {
                    log::info!("reboot requested on the control pipe");
                    vmm.push_event(Event::Reboot { cause: "control" });
                    vmm.reboot().map_err(EventLoopError::Reboot)?;
                    input.on_room(epoll, vmm);
                }
            }
        }
        other => log::debug!("spurious epoll token {other}"),
    }
    Ok(None)
}

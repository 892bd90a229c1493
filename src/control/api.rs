//! The embedding API: build a VM, start it on its own thread, and drive it through a
//! [`VmHandle`] from any thread.
//!
//! ```no_run
//! use minivmm::api::VmBuilder;
//!
//! let vm = VmBuilder::new("vmlinux")
//!     .initramfs("initrd.cpio.gz")
//!     .cmdline("console=ttyS0")
//!     .cpus(1, 4)
//!     .memory(512 << 20, 1 << 30)
//!     .serial_output(Box::new(std::io::stderr()))
//!     .start()?;
//! let events = vm.events();
//! vm.resize(Some(2), Some((512 << 20) + (128 << 20)))?;
//! for event in events.iter().take(2) {
//!     println!("{event}");
//! }
//! vm.shutdown()?;
//! println!("exit code {}", vm.wait()?.code());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What an embedder gives up or chooses, process-wide:
//! - **Kick signal** (always): `SIGRTMIN` gets a handler that kicks vCPU threads out of `KVM_RUN`;
//!   do not use that signal for anything else.
//! - **Seccomp** ([`VmBuilder::seccomp`], on by default): filters go on minivmm's own threads only
//!   (the VM thread and its vCPU threads), never on the embedder's. A violation kills the whole
//!   process with status 159 (the SIGSYS handler is process-wide).
//! - **Terminal**: untouched unless the configuration asks for `SerialMode::Tty` without
//!   [`VmBuilder::serial_output`]; the default sends guest output to a sink.
//! - **Signals**: SIGTERM/SIGINT/SIGHUP are left alone (the command line's [`crate::run`] is the
//!   one that stops on them).

use std::path::PathBuf;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{ExitDeviceConfig, SerialMode, VmConfig};
use crate::control::events::Event;
use crate::control::protocol::VmInfo;
use crate::vmm::event_loop::{Command, Inbox};
use crate::vmm::launch::{launch, Hosting};
use crate::{Error, Exit, RequestError};

/// Events an embedder's channel may hold before further events are dropped (and a warning is
/// logged): a receiver that stops reading never slows the VM.
pub const EVENT_CHANNEL_DEPTH: usize = 1024;

/// Errors of [`VmHandle`] calls.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The VM thread has stopped (the guest exited); [`VmHandle::wait`] tells how.
    #[error("the VM has stopped")]
    Stopped,
    /// The VM refused the request; the message is the one the control pipe would send.
    #[error(transparent)]
    Refused(#[from] RequestError),
    /// The VM thread could not be woken.
    #[error("cannot wake the VM thread: {0}")]
    Wake(#[source] std::io::Error),
}

/// Builds a VM: the same settings as the command line, in builder form.
pub struct VmBuilder {
    config: VmConfig,
    serial_out: Option<Box<dyn std::io::Write + Send>>,
}

impl VmBuilder {
    /// A VM booting `kernel` (bzImage or ELF vmlinux) with the command line's defaults, except
    /// that guest console output is discarded until [`VmBuilder::serial_output`] is given.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        let mut config = VmConfig::new(kernel.into());
        config.serial = SerialMode::Off;
        VmBuilder {
            config,
            serial_out: None,
        }
    }

    /// A VM with every setting from `config` (e.g. from [`crate::config::parse_args`]).
    pub fn from_config(config: VmConfig) -> Self {
        VmBuilder {
            config,
            serial_out: None,
        }
    }

    /// The initramfs.
    pub fn initramfs(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.initramfs = Some(path.into());
        self
    }

    /// The kernel command line, as given (see [`VmConfig::kernel_cmdline`] for additions).
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.config.cmdline = cmdline.into();
        self
    }

    /// vCPUs at boot and the most hotplug may reach.
    pub fn cpus(mut self, boot: u32, max: u32) -> Self {
        self.config.cpus.boot = boot;
        self.config.cpus.max = max;
        self
    }

    /// Boot RAM and the hotplug window, in bytes.
    pub fn memory(mut self, size: u64, hotplug_size: u64) -> Self {
        self.config.memory.size = size;
        self.config.memory.hotplug_size = hotplug_size;
        self
    }

    /// Make hot-added RAM removable while the guest runs, each slot's removal given up after
    /// `timeout` (whole seconds; see `--memory removable=,remove_timeout=`). Needs a hotplug
    /// window.
    pub fn removable_memory(mut self, on: bool, timeout: Duration) -> Self {
        self.config.memory.removable = on;
        self.config.memory.remove_timeout = timeout;
        self
    }

    /// Where the guest's console output goes (the guest gets no console input).
    ///
    /// The writer is called on vCPU threads, as the guest writes its UART, under their seccomp
    /// filter (`seccomp/vcpu.json`): `write`/`writev`, `send` on a connected socket, locks
    /// (`futex`), `poll`, clocks and memory calls only. A file, a pipe, a terminal, a std
    /// `UnixStream` or `TcpStream`, a `Vec` or a channel is fine; a writer that opens files or
    /// connects sockets itself kills the process (159): give it to another thread through a
    /// pipe or a channel instead. A writer should not block for long: the guest's vCPU waits
    /// for it.
    pub fn serial_output(mut self, out: Box<dyn std::io::Write + Send>) -> Self {
        self.config.serial = SerialMode::Tty;
        self.serial_out = Some(out);
        self
    }

    /// End the VM on a guest reset instead of rebooting it.
    pub fn no_reboot(mut self, on: bool) -> Self {
        self.config.no_reboot = on;
        self
    }

    /// The guest exit device (QEMU `isa-debug-exit` compatible).
    pub fn exit_device(mut self, device: Option<ExitDeviceConfig>) -> Self {
        self.config.exit_device = device;
        self
    }

    /// Stop the VM after this long.
    pub fn timeout(mut self, limit: Option<Duration>) -> Self {
        self.config.timeout = limit;
        self
    }

    /// Report vCPUs coming online as [`Event::CpuOnline`] (default off; see `--cpu-online-events`).
    pub fn cpu_online_events(mut self, on: bool) -> Self {
        self.config.cpu_online_events = on;
        self
    }

    /// Advise transparent huge pages for guest RAM (default on; see `--memory thp=`).
    pub fn huge_pages(mut self, on: bool) -> Self {
        self.config.memory.huge_pages = on;
        self
    }

    /// Give the VM an in-kernel i8254 PIT (default off; see `--pit`).
    pub fn pit(mut self, on: bool) -> Self {
        self.config.pit = on;
        self
    }

    /// Install seccomp filters on minivmm's threads (default on).
    pub fn seccomp(mut self, on: bool) -> Self {
        self.config.seccomp = on;
        self
    }

    /// The configuration as built so far.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Checks the settings like the command line does, boots the guest on a new thread and
    /// returns once it runs (or with the error that stopped the boot).
    pub fn start(self) -> Result<VmHandle, Error> {
        crate::config::validate(&self.config).map_err(Error::Config)?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::Thread)?);
        let (tx, rx) = channel();
        let (booted_tx, booted_rx) = channel();
        let inbox = Inbox {
            rx,
            wake: wake.clone(),
        };
        let VmBuilder { config, serial_out } = self;
        let thread = std::thread::Builder::new()
            .name("minivmm".into())
            .spawn(move || {
                let hosting = Hosting {
                    serial_out,
                    stop_on_signals: false,
                    commands: Some(inbox),
                };
                match launch(config, hosting) {
                    Ok(launched) => {
                        let _ = booted_tx.send(Ok(()));
                        launched.serve()
                    }
                    Err(e) => {
                        let _ = booted_tx.send(Err(e));
                        Err(Error::Stopped)
                    }
                }
            })
            .map_err(Error::Thread)?;
        match booted_rx.recv() {
            Ok(Ok(())) => Ok(VmHandle {
                tx,
                wake,
                outcome: Mutex::new(Outcome::Running(thread)),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(Error::Stopped)
            }
        }
    }
}

/// A running VM. Every call may come from any thread (the handle is `Send + Sync`, so one
/// `Arc<VmHandle>` serves a thread that waits and others that resize or shut down); each is
/// answered by the VM thread's event loop, between guest exits, like a control-pipe request.
/// Dropping the handle without [`VmHandle::wait`] shuts the VM down and waits for it.
pub struct VmHandle {
    tx: Sender<Command>,
    wake: Arc<EventFd>,
    outcome: Mutex<Outcome>,
}

/// The VM thread until it is joined, then how it ended.
enum Outcome {
    Running(JoinHandle<Result<Exit, Error>>),
    Ended(Option<Exit>),
}

impl VmHandle {
    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Command) -> Result<T, HandleError> {
        let (reply_tx, reply_rx) = channel();
        self.tx
            .send(make(reply_tx))
            .map_err(|_| HandleError::Stopped)?;
        self.wake.write(1).map_err(HandleError::Wake)?;
        reply_rx.recv().map_err(|_| HandleError::Stopped)
    }

    /// Changes the vCPU count and/or the RAM size, like `resize` on the control pipe:
    /// validated first, applied completely or not at all.
    pub fn resize(&self, cpus: Option<u32>, mem: Option<u64>) -> Result<VmInfo, HandleError> {
        Ok(self.ask(|reply| Command::Resize { cpus, mem, reply })??)
    }

    /// The VM's current and pending sizes, like `info`.
    pub fn info(&self) -> Result<VmInfo, HandleError> {
        self.ask(Command::Info)
    }

    /// Resets the VM (it is rebuilt with the current sizes).
    pub fn reboot(&self) -> Result<(), HandleError> {
        Ok(self.ask(Command::Reboot)??)
    }

    /// Stops the VM; [`VmHandle::wait`] then returns [`Exit::PowerOff`].
    pub fn shutdown(&self) -> Result<(), HandleError> {
        Ok(self.ask(Command::Shutdown)??)
    }

    /// Presses the ACPI power button.
    pub fn power_button(&self) -> Result<(), HandleError> {
        Ok(self.ask(Command::PowerButton)??)
    }

    /// A new channel that receives every event from now on, the last being
    /// [`Event::Exit`]. It holds at most [`EVENT_CHANNEL_DEPTH`] unread events. Returns a
    /// closed channel if the VM has stopped.
    pub fn events(&self) -> Receiver<Event> {
        let (tx, rx) = sync_channel(EVENT_CHANNEL_DEPTH);
        if self.tx.send(Command::Subscribe(tx)).is_ok() {
            let _ = self.wake.write(1);
        }
        rx
    }

    /// Waits until the VM stops and returns how. Any thread may wait, also while others use
    /// the handle; every later call returns the same [`Exit`] (or [`Error::Stopped`] when the
    /// first one returned the VM's error).
    pub fn wait(&self) -> Result<Exit, Error> {
        let mut outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if let Outcome::Ended(exit) = &*outcome {
            return exit.clone().ok_or(Error::Stopped);
        }
        // Joined once; a thread that panicked leaves `Ended(None)`.
        let Outcome::Running(thread) = std::mem::replace(&mut *outcome, Outcome::Ended(None))
        else {
            return Err(Error::Stopped);
        };
        let ended = thread.join().map_err(|_| Error::Stopped)?;
        *outcome = Outcome::Ended(ended.as_ref().ok().cloned());
        ended
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        let outcome = self.outcome.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Outcome::Running(_) = outcome {
            let _ = self.shutdown();
            let _ = self.wait();
        }
    }
}

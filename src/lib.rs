//! minivmm: a minimal, synchronous KVM virtual machine monitor for x86_64 Linux guests, with
//! ACPI CPU and memory hotplug driven through a line-based control pipe.
//!
//! [`run`] is the whole VMM: it opens KVM and the guest files, installs the seccomp filters,
//! boots the guest and serves the event loop until the guest powers off.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub(crate) mod acpi;
pub mod api;
pub(crate) mod arch;
pub mod config;
pub mod control;
pub(crate) mod control_socket;
pub(crate) mod cpu_manager;
pub(crate) mod cpus;
pub(crate) mod devices;
pub(crate) mod event_loop;
pub mod events;
pub mod exit;
pub mod logger;
pub(crate) mod machine;
pub(crate) mod memory_manager;
pub(crate) mod ost;
pub(crate) mod ram;
pub(crate) mod resize;
pub(crate) mod seccomp;
pub mod size;
pub(crate) mod terminal;
pub(crate) mod vcpu;
pub(crate) mod virtio_manager;
pub(crate) mod vm;
pub(crate) mod vmm;
pub(crate) mod vsock_muxer;

/// Entry points for the fuzz targets in `fuzz/` (not a stable API).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use config::{SerialMode, VmConfig};
pub use devices::ResetCause;
pub use exit::{
    Exit, EXIT_ERROR, EXIT_GUEST_FAULT, EXIT_OK, EXIT_PANIC, EXIT_REBOOT, EXIT_SECCOMP,
    EXIT_TIMEOUT,
};

/// Errors that stop minivmm before or while running the guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A guest file could not be opened.
    #[error("cannot open {what} {path}: {source}")]
    Open {
        /// "kernel", "initramfs" or "serial output file".
        what: &'static str,
        /// The path given.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A `--disk` image could not be opened or sized.
    #[error("--disk: cannot open {path}: {source}")]
    Disk {
        /// The path given.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The `--vsock` socket could not be set up.
    #[error("--vsock: {0}")]
    Vsock(#[from] vsock_muxer::VsockError),
    /// KVM is unusable.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// Building or booting the machine failed.
    #[error(transparent)]
    Machine(#[from] machine::MachineError),
    /// ACPI tables could not be built or dumped.
    #[error("--dump-acpi: {0}")]
    Acpi(#[from] acpi::AcpiError),
    /// The control pipe could not be opened.
    #[error(transparent)]
    Control(#[from] control_socket::ControlSocketError),
    /// Seccomp setup failed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// The vCPU kick signal could not be set up.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// The event loop failed.
    #[error(transparent)]
    EventLoop(#[from] event_loop::EventLoopError),
    /// The host console could not be set up.
    #[error("host console: {0}")]
    Console(#[source] std::io::Error),
    /// The embedder's VM thread or its wakeup eventfd could not be created.
    #[error("cannot start the VM thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A configuration built in code breaks a rule (the message names the option).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The VM thread ended without an outcome (it panicked, or the boot failed and was
    /// reported by `start`).
    #[error("the VM thread stopped unexpectedly")]
    Stopped,
}

fn open(what: &'static str, path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Open {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Opens the `--disk` images (read-write unless read-only) and binds the `--vsock` socket.
fn open_virtio(config: &VmConfig) -> Result<virtio_manager::VirtioHost, Error> {
    let mut host = virtio_manager::VirtioHost::default();
    for disk in &config.disks {
        let err = |source| Error::Disk {
            path: disk.path.display().to_string(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.readonly)
            .open(&disk.path)
            .map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if !meta.is_file() {
            return Err(err(std::io::Error::other(
                "not a regular file (raw images only)",
            )));
        }
        host.disks.push(virtio_manager::HostDisk {
            file: Arc::new(file),
            size: meta.len(),
            readonly: disk.readonly,
        });
    }
    if let Some(v) = &config.vsock {
        let muxer = vsock_muxer::VsockMuxer::new(v.cid, &v.socket)?;
        host.vsock = Some((v.cid, Arc::new(std::sync::Mutex::new(muxer))));
    }
    Ok(host)
}

/// The exit code for an outcome of [`run`].
pub fn exit_code(result: &Result<Exit, Error>) -> i32 {
    match result {
        Ok(exit) => exit.code(),
        Err(_) => EXIT_ERROR,
    }
}

/// How the process hosts minivmm: what it may take over besides the VM itself.
pub(crate) struct Hosting {
    /// Guest console output for `--serial` modes that do not name one (an embedder's writer).
    pub serial_out: Option<Box<dyn std::io::Write + Send>>,
    /// Block SIGTERM/SIGINT/SIGHUP in the calling thread and stop the VM when one arrives.
    pub stop_on_signals: bool,
    /// Requests from an embedder's [`api::VmHandle`].
    pub commands: Option<event_loop::Inbox>,
}

/// A booted VM with everything its event loop serves, on the thread that will run the loop.
pub(crate) struct Launched {
    vmm: vmm::Vmm,
    sources: event_loop::Sources,
    // Restore the terminal when the run ends (declared after `vmm`, so dropped after it).
    _stdout_flags: Option<terminal::FlagsGuard>,
    _raw_mode: Option<terminal::RawModeGuard>,
}

impl Launched {
    /// Runs the event loop until the VM stops, then stops the vCPUs.
    pub(crate) fn serve(mut self) -> Result<Exit, Error> {
        let exit = event_loop::run(&mut self.vmm, self.sources)?;
        self.vmm.teardown();
        Ok(exit)
    }
}

/// Opens everything the VM needs, installs the seccomp filters on the calling thread (which
/// then runs the event loop, see [`Launched::serve`]) and boots the guest.
pub(crate) fn launch(config: VmConfig, hosting: Hosting) -> Result<Launched, Error> {
    let started = std::time::Instant::now();
    // Everything that needs the file system or new fds happens before the filters go on.
    let kvm = vm::open_kvm()?;
    let kernel = open("kernel", &config.kernel)?;
    let initramfs = match &config.initramfs {
        Some(p) => Some(open("initramfs", p)?),
        None => None,
    };
    if let Some(dir) = &config.dump_acpi {
        let tables = acpi::build(&machine::acpi_config(
            &config,
            config.cpus.boot,
            config.memory.size,
        ))?;
        acpi::dump(dir, &tables)?;
    }
    let virtio = open_virtio(&config)?;
    let control = match &config.control {
        Some(endpoint) => Some(control_socket::ControlServer::open(endpoint)?),
        None => None,
    };
    let signal_fd = if hosting.stop_on_signals {
        Some(event_loop::termination_signalfd()?)
    } else {
        None
    };
    // Armed now, so the limit counts from minivmm's start.
    let timeout = match config.timeout {
        Some(limit) => Some(event_loop::Timeout::arm(limit)?),
        None => None,
    };
    vcpu::install_kick_handler()?;

    let mut stdout_flags = None;
    let mut raw_mode = None;
    let mut stdin = None;
    let out: Box<dyn std::io::Write + Send> = match (&config.serial, hosting.serial_out) {
        (SerialMode::File(path), _) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::Open {
                    what: "serial output file",
                    path: path.display().to_string(),
                    source,
                })?,
        ),
        (SerialMode::Off, _) => Box::new(std::io::sink()),
        (SerialMode::Tty, Some(writer)) => writer,
        (SerialMode::Tty, None) => {
            stdout_flags = Some(terminal::FlagsGuard::nonblocking(1).map_err(Error::Console)?);
            raw_mode = terminal::RawModeGuard::new(0).map_err(Error::Console)?;
            stdin = Some(0);
            Box::new(terminal::ConsoleWriter::new(1))
        }
    };

    let vcpu_filter = if config.seccomp {
        let filters = seccomp::compile_filters()?;
        seccomp::fix_malloc_arenas();
        seccomp::install_sigsys_handler()?;
        seccomp::apply(&filters.vmm, seccomp::ThreadKind::Vmm)?;
        Some(Arc::new(filters.vcpu))
    } else {
        log::warn!("seccomp is off: the guest is not confined (debugging only)");
        None
    };

    let mut vmm = vmm::Vmm::new(
        config,
        kvm,
        vmm::GuestFiles {
            kernel,
            initramfs,
            virtio,
        },
        machine::SharedWriter::new(out),
        vcpu_filter,
        started,
    )?;
    vmm.boot()?;
    Ok(Launched {
        vmm,
        sources: event_loop::Sources {
            control,
            stdin,
            signal_fd,
            timeout,
            commands: hosting.commands,
        },
        _stdout_flags: stdout_flags,
        _raw_mode: raw_mode,
    })
}

/// Boots the guest described by `config` and runs it until it stops, on the calling thread: the
/// command-line front end. It takes over the process: the terminal (`--serial tty`), the
/// termination signals, and seccomp on the calling thread. [`api::VmBuilder`] is the embeddable
/// form.
pub fn run(config: VmConfig) -> Result<Exit, Error> {
    let hosting = Hosting {
        serial_out: None,
        stop_on_signals: true,
        commands: None,
    };
    launch(config, hosting)?.serve()
}

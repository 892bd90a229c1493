//! Launching a VM: opens everything the guest needs (KVM, the kernel and initramfs, disks, the
//! vsock and control sockets, the console), installs the seccomp filters, boots the guest and
//! hands the running [`Vmm`](crate::vmm::Vmm) to its event loop. [`run`] is the command-line
//! front end's entry point; [`crate::api::VmBuilder`] starts the same launch on a thread of its own.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::config::{SerialMode, VmConfig};
use crate::vmm::exit::{Exit, EXIT_ERROR};

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
    Vsock(#[from] crate::devices::virtio::vsock::muxer::VsockError),
    /// KVM is unusable.
    #[error(transparent)]
    Vm(#[from] crate::kvm::vm::VmError),
    /// Building or booting the machine failed.
    #[error(transparent)]
    Machine(#[from] crate::vmm::machine::MachineError),
    /// ACPI tables could not be built or dumped.
    #[error("--dump-acpi: {0}")]
    Acpi(#[from] crate::acpi::AcpiError),
    /// The control pipe could not be opened.
    #[error(transparent)]
    Control(#[from] crate::control::socket::ControlSocketError),
    /// Seccomp setup failed.
    #[error(transparent)]
    Seccomp(#[from] crate::host::seccomp::SeccompError),
    /// The vCPU kick signal could not be set up.
    #[error(transparent)]
    Vcpu(#[from] crate::kvm::vcpu::VcpuError),
    /// The event loop failed.
    #[error(transparent)]
    EventLoop(#[from] crate::vmm::event_loop::EventLoopError),
    /// The host console could not be set up.
    #[error("host console: {0}")]
    Console(#[source] std::io::Error),
    /// The embedder's VM thread or its wakeup eventfd could not be created.
    #[error("cannot start the VM thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A configuration built in code breaks a rule (the message names the option).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
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
fn open_virtio(config: &VmConfig) -> Result<crate::vmm::virtio::VirtioHost, Error> {
    let mut host = crate::vmm::virtio::VirtioHost::default();
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
        host.disks.push(crate::vmm::virtio::HostDisk {
            file: Arc::new(file),
            size: meta.len(),
            readonly: disk.readonly,
        });
    }
    if let Some(v) = &config.vsock {
        let muxer = crate::devices::virtio::vsock::muxer::VsockMuxer::new(v.cid, &v.socket)?;
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
pub struct Hosting {
    /// Guest console output for `--serial` modes that do not name one (an embedder's writer).
    pub serial_out: Option<Box<dyn std::io::Write + Send>>,
    /// Block SIGTERM/SIGINT/SIGHUP in the calling thread and stop the VM when one arrives.
    pub stop_on_signals: bool,
    /// Requests from an embedder's [`crate::api::VmHandle`].
    pub commands: Option<crate::vmm::event_loop::Inbox>,
}

/// A booted VM with everything its event loop serves, on the thread that will run the loop.
pub struct Launched {
    vmm: crate::vmm::Vmm,
    sources: crate::vmm::event_loop::Sources,
    // Restore the terminal when the run ends (declared after `vmm`, so dropped after it).
    _stdout_flags: Option<crate::host::terminal::FlagsGuard>,
    _raw_mode: Option<crate::host::terminal::RawModeGuard>,
}

impl Launched {
    /// Runs the event loop until the VM stops, then stops the vCPUs.
    pub fn serve(mut self) -> Result<Exit, Error> {
        let exit = crate::vmm::event_loop::run(&mut self.vmm, self.sources)?;
        self.vmm.teardown();
        Ok(exit)
    }
}

/// Opens everything the VM needs, installs the seccomp filters on the calling thread (which
/// then runs the event loop, see [`Launched::serve`]) and boots the guest.
pub fn launch(config: VmConfig, hosting: Hosting) -> Result<Launched, Error> {
    let started = std::time::Instant::now();
    // Everything that needs the file system or new fds happens before the filters go on.
    let kvm = crate::kvm::vm::open_kvm()?;
    let kernel = open("kernel", &config.kernel)?;
    let initramfs = match &config.initramfs {
        Some(p) => Some(open("initramfs", p)?),
        None => None,
    };
    if let Some(dir) = &config.dump_acpi {
        let tables = crate::acpi::build(&crate::vmm::machine::acpi_config(
            &config,
            config.cpus.boot,
            config.memory.size,
        ))?;
        crate::acpi::dump(dir, &tables)?;
    }
    let virtio = open_virtio(&config)?;
    let control = match &config.control {
        Some(endpoint) => Some(crate::control::socket::ControlServer::open(endpoint)?),
        None => None,
    };
    let signal_fd = if hosting.stop_on_signals {
        Some(crate::vmm::event_loop::termination_signalfd()?)
    } else {
        None
    };
    // Armed now, so the limit counts from minivmm's start.
    let timeout = match config.timeout {
        Some(limit) => Some(crate::vmm::event_loop::Timeout::arm(limit)?),
        None => None,
    };
    crate::kvm::vcpu::install_kick_handler()?;

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
            stdout_flags =
                Some(crate::host::terminal::FlagsGuard::nonblocking(1).map_err(Error::Console)?);
            raw_mode = crate::host::terminal::RawModeGuard::new(0).map_err(Error::Console)?;
            stdin = Some(0);
            Box::new(crate::host::terminal::ConsoleWriter::new(1))
        }
    };

    let vcpu_filter = if config.seccomp {
        let filters = crate::host::seccomp::compile_filters()?;
        crate::host::seccomp::fix_malloc_arenas();
        crate::host::seccomp::install_sigsys_handler()?;
        crate::host::seccomp::apply(&filters.vmm, crate::host::seccomp::ThreadKind::Vmm)?;
        Some(Arc::new(filters.vcpu))
    } else {
        log::warn!("seccomp is off: the guest is not confined (debugging only)");
        None
    };

    let mut vmm = crate::vmm::Vmm::new(
        config,
        kvm,
        crate::vmm::GuestFiles {
            kernel,
            initramfs,
            virtio,
        },
        crate::vmm::machine::SharedWriter::new(out),
        vcpu_filter,
        started,
    )?;
    vmm.boot()?;
    Ok(Launched {
        vmm,
        sources: crate::vmm::event_loop::Sources {
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
/// termination signals, and seccomp on the calling thread. [`crate::api::VmBuilder`] is the embeddable
/// form.
pub fn run(config: VmConfig) -> Result<Exit, Error> {
    let hosting = Hosting {
        serial_out: None,
        stop_on_signals: true,
        commands: None,
    };
    launch(config, hosting)?.serve()
}

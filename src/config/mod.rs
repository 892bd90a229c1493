//! The minivmm command line: a small hand-written parser producing a validated [`VmConfig`].
//!
//! Every option accepts both `--option VALUE` and `--option=VALUE`. Errors are single lines that
//! name the offending flag; `main` prints them after `minivmm: `. Files are not opened here: the
//! VMM reports unreadable kernels, initramfs images and directories when it uses them.
//!
//! The files: this one holds the configuration types; `options.rs` declares each option once
//! (name, value, `--help` lines, how its value is stored, its rules) and lays out [`USAGE`] from
//! those declarations; `parse.rs` is the parser over that table, the rules that involve several
//! options and [`validate`]; `values.rs`, `cpus_memory.rs` and `devices.rs` parse and check the
//! options' values; `size.rs` reads and writes SIZEs.

mod cpus_memory;
mod devices;
mod options;
mod parse;
pub mod size;
mod values;

use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use crate::arch::x86_64::layout::ports;

pub use options::USAGE;
pub use parse::{parse_args, validate};

/// Kernel command line used when `--cmdline` is absent.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// Boot RAM used when `--memory` (or its `size=` key) is absent: 512 MiB.
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;
/// Smallest boot RAM accepted: 64 MiB.
pub const MIN_MEMORY_SIZE: u64 = 64 << 20;
/// Boot RAM must be a multiple of this: 1 MiB.
pub const MEMORY_SIZE_ALIGN: u64 = 1 << 20;
/// Upper bound on boot RAM plus the hotplug window (the guest-physical space minivmm supports): 1 TiB.
pub const MAX_TOTAL_MEMORY: u64 = 1 << 40;
/// How long a live memory removal waits for the guest's eject of a slot, by default.
pub const DEFAULT_REMOVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Text printed by `--version`.
pub const VERSION: &str = concat!("minivmm ", env!("CARGO_PKG_VERSION"));

/// Everything needed to build and run one VM, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest kernel image (bzImage or ELF vmlinux).
    pub kernel: PathBuf,
    /// Optional initramfs image.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line ([`DEFAULT_CMDLINE`] unless given).
    pub cmdline: String,
    /// vCPU counts.
    pub cpus: CpuConfig,
    /// Memory sizes.
    pub memory: MemoryConfig,
    /// Where the guest's COM1 goes.
    pub serial: SerialMode,
    /// Exit (status 2) on a guest reboot instead of rebooting.
    pub no_reboot: bool,
    /// The guest exit device (`--exit-device`), if enabled.
    pub exit_device: Option<ExitDeviceConfig>,
    /// Whether the pvpanic device is present (`--pvpanic`, default on).
    pub pvpanic: bool,
    /// Wall-clock limit on the run (`--timeout`).
    pub timeout: Option<Duration>,
    /// Report vCPUs coming online (`--cpu-online-events`, default off).
    pub cpu_online_events: bool,
    /// Whether the VM has an in-kernel i8254 PIT (`--pit`, default off).
    pub pit: bool,
    /// Directory to write the generated ACPI tables to.
    pub dump_acpi: Option<PathBuf>,
    /// virtio-blk disks (`--disk`, repeatable), in guest order.
    pub disks: Vec<DiskConfig>,
    /// The virtio-vsock device (`--vsock`), if any.
    pub vsock: Option<VsockConfig>,
    /// Control pipe endpoint, if any.
    pub control: Option<ControlEndpoint>,
    /// Whether the seccomp filters are installed.
    pub seccomp: bool,
    /// Maximum log level.
    pub log_level: log::LevelFilter,
}

impl VmConfig {
    /// A configuration for `kernel` with every other setting at its documented default.
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            cpus: CpuConfig::default(),
            memory: MemoryConfig::default(),
            serial: SerialMode::Tty,
            no_reboot: false,
            exit_device: None,
            pvpanic: true,
            timeout: None,
            cpu_online_events: false,
            pit: false,
            dump_acpi: None,
            disks: Vec::new(),
            vsock: None,
            control: None,
            seccomp: true,
            log_level: log::LevelFilter::Warn,
        }
    }
}

impl VmConfig {
    /// What minivmm appends to [`VmConfig::cmdline`]: `memhp_default_state=online` when there is a
    /// hotplug window and the command line does not choose an online policy itself (the Debian
    /// kernels, among others, leave hot-added memory offline by default), or
    /// `memhp_default_state=online_movable` when the hot-added memory is to be removable.
    pub fn cmdline_additions(&self) -> Vec<&'static str> {
        let mut add = Vec::new();
        let sets = |key: &str| self.cmdline.split_whitespace().any(|w| w.starts_with(key));
        if self.memory.hotplug_size > 0 && !sets("memhp_default_state=") {
            add.push(if self.memory.removable {
                "memhp_default_state=online_movable"
            } else {
                "memhp_default_state=online"
            });
        }
        add
    }

    /// The kernel command line the guest gets: [`VmConfig::cmdline`] as given, followed by
    /// [`VmConfig::cmdline_additions`].
    pub fn kernel_cmdline(&self) -> String {
        let mut cmdline = self.cmdline.clone();
        for word in self.cmdline_additions() {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(word);
        }
        cmdline
    }
}

/// vCPU counts: `1 <= boot <= max <= MAX_VCPUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuConfig {
    /// vCPUs present at boot.
    pub boot: u32,
    /// Most vCPUs the guest may have through hotplug (all of them are described in ACPI).
    pub max: u32,
}

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig { boot: 1, max: 1 }
    }
}

/// Memory sizes in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Boot RAM: at least [`MIN_MEMORY_SIZE`], a multiple of [`MEMORY_SIZE_ALIGN`].
    pub size: u64,
    /// Size of the hotplug window, a multiple of `MEMORY_HOTPLUG_ALIGN` (0: no memory hotplug).
    pub hotplug_size: u64,
    /// Advise transparent huge pages for guest RAM (`thp=on|off`, default on).
    pub huge_pages: bool,
    /// Hot-added RAM is removable (`removable=on|off`, default off): the guest onlines it
    /// movable, hot-adds use slots small enough to give back, and a shrink asks the guest to
    /// eject slots live instead of only at the next reboot.
    pub removable: bool,
    /// How long a live removal waits for the guest's eject of one slot before it is withdrawn
    /// (`remove_timeout=SECS`, default [`DEFAULT_REMOVE_TIMEOUT`]).
    pub remove_timeout: Duration,
}

impl MemoryConfig {
    /// Largest RAM size: boot RAM plus the hotplug window.
    pub fn max(&self) -> u64 {
        self.size + self.hotplug_size
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY_SIZE,
            hotplug_size: 0,
            huge_pages: true,
            removable: false,
            remove_timeout: DEFAULT_REMOVE_TIMEOUT,
        }
    }
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// The guest may only read it.
    pub readonly: bool,
}

/// The virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (at least 3; 0-2 are reserved).
    pub cid: u64,
    /// The host-side unix socket: host clients connect here, guest connections to port P go to
    /// `PATH_P`.
    pub socket: PathBuf,
}

/// Largest guest CID accepted (CIDs are 32-bit in Linux's `sockaddr_vm`; `u32::MAX` is
/// `VMADDR_CID_ANY`).
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// The guest exit device's I/O ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitDeviceConfig {
    /// First port.
    pub iobase: u16,
    /// Number of ports: 1, 2 or 4.
    pub iosize: u16,
}

impl Default for ExitDeviceConfig {
    /// QEMU's `isa-debug-exit` defaults: `iobase=0x501,iosize=2`.
    fn default() -> Self {
        ExitDeviceConfig {
            iobase: ports::EXIT_DEVICE_DEFAULT,
            iosize: ports::EXIT_DEVICE_DEFAULT_SIZE,
        }
    }
}

/// Longest `--timeout` accepted: 365 days.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Where the guest's COM1 is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    /// Guest output to stdout, stdin to the guest.
    Tty,
    /// No serial device backend: output is dropped, there is no input.
    Off,
    /// Guest output written to this file; no input.
    File(PathBuf),
}

/// Where the control pipe lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEndpoint {
    /// A unix stream socket at this path.
    Socket(PathBuf),
    /// Inherited file descriptors: requests are read from `read`, replies written to `write`
    /// (the same descriptor for `fd=N`).
    Fd {
        /// Descriptor requests are read from.
        read: RawFd,
        /// Descriptor replies are written to.
        write: RawFd,
    },
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run a VM with this configuration.
    Run(Box<VmConfig>),
    /// Print [`USAGE`] and exit successfully.
    Help,
    /// Print [`VERSION`] and exit successfully.
    Version,
}

/// A command-line error; `Display` is the complete one-line message (without a "minivmm: " prefix).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// An option minivmm does not know.
    #[error("unknown option {0} (see --help)")]
    UnknownOption(String),
    /// A word that is not an option (minivmm takes no positional arguments).
    #[error("unexpected argument {0:?} (see --help)")]
    UnexpectedArgument(String),
    /// An option that needs a value came last or was followed by another option.
    #[error("{0}: missing value")]
    MissingValue(&'static str),
    /// An option was given an empty value.
    #[error("{0}: empty value")]
    EmptyValue(&'static str),
    /// A flag that takes no value was written as `--flag=value`.
    #[error("{0} takes no value")]
    UnexpectedValue(&'static str),
    /// An option was given twice.
    #[error("{0} given more than once")]
    Duplicate(&'static str),
    /// A required option (`--kernel`) is absent.
    #[error("{0} is required")]
    MissingOption(&'static str),
    /// An option's value is malformed or out of range.
    #[error("{flag}: {reason}")]
    Invalid {
        /// The option, e.g. `--cpus`.
        flag: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memhp_default_state_is_added_only_when_needed() {
        let mut c = VmConfig::new("k".into());
        c.cmdline = "console=ttyS0".into();
        assert_eq!(c.kernel_cmdline(), "console=ttyS0");
        c.memory.hotplug_size = 1 << 30;
        assert_eq!(
            c.kernel_cmdline(),
            "console=ttyS0 memhp_default_state=online"
        );
        c.cmdline = String::new();
        assert_eq!(c.kernel_cmdline(), "memhp_default_state=online");
        c.cmdline = "memhp_default_state=offline quiet".into();
        assert_eq!(c.kernel_cmdline(), "memhp_default_state=offline quiet");
        // Removable memory is onlined movable, unless the command line says otherwise.
        c.memory.removable = true;
        assert_eq!(c.kernel_cmdline(), "memhp_default_state=offline quiet");
        c.cmdline = "quiet".into();
        assert_eq!(
            c.kernel_cmdline(),
            "quiet memhp_default_state=online_movable"
        );
    }
}

/// Helpers for the tests of the option parsers.
#[cfg(test)]
mod testing {
    use super::{parse_args, Command, VmConfig};

    pub(super) fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// The configuration `list` parses to; panics on anything else.
    pub(super) fn run(list: &[&str]) -> VmConfig {
        match parse_args(args(list)) {
            Ok(Command::Run(config)) => *config,
            other => panic!("{list:?}: expected Run, got {other:?}"),
        }
    }

    /// The error message `list` gets; panics if it parses.
    pub(super) fn err(list: &[&str]) -> String {
        match parse_args(args(list)) {
            Err(e) => e.to_string(),
            Ok(other) => panic!("{list:?}: expected an error, got {other:?}"),
        }
    }
}

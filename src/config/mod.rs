//! The minivmm command line: a small hand-written parser producing a validated [`VmConfig`].
//!
//! Every option accepts both `--option VALUE` and `--option=VALUE`. Errors are single lines that
//! name the offending flag; `main` prints them after `minivmm: `. Files are not opened here: the
//! VMM reports unreadable kernels, initramfs images and directories when it uses them.

pub mod size;

use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::size::{format_size, parse_size, SizeError};

use crate::arch::x86_64::layout::{
    ports, CMDLINE_MAX_SIZE, MAX_VCPUS, MAX_VIRTIO_DEVICES, MEMORY_HOTPLUG_ALIGN,
};

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
/// Largest `remove_timeout=` in seconds (one hour).
const MAX_REMOVE_TIMEOUT_SECS: u64 = 3600;
/// Text printed by `--version`.
pub const VERSION: &str = concat!("minivmm ", env!("CARGO_PKG_VERSION"));

/// The help text printed by `--help`.
pub const USAGE: &str = "\
Usage: minivmm --kernel PATH [OPTIONS]

A minimal KVM virtual machine monitor for x86_64 Linux guests, with ACPI CPU and
memory hotplug driven through a control pipe.

Options:
  --kernel PATH              guest kernel, bzImage or ELF vmlinux (required)
  --initramfs PATH           initramfs image handed to the kernel
  --cmdline \"ARGS\"           kernel command line
                             (default: \"console=ttyS0 reboot=k panic=1 pci=off\")
  --cpus boot=N[,max=M]      vCPUs at boot and the most vCPUs hotplug may reach,
                             1 <= N <= M <= 254 (default: boot=1, max=boot)
  --memory size=SIZE[,hotplug_size=SIZE][,thp=on|off][,removable=on|off]
           [,remove_timeout=SECS]
                             boot RAM (at least 64M, a multiple of 1M) and the
                             window reserved for hot-added RAM (a multiple of
                             128M); together at most 1T; thp: advise
                             transparent huge pages for guest RAM; removable:
                             hot-added RAM is onlined movable and a shrink
                             takes it back live, each slot given up after
                             remove_timeout seconds without the guest's eject
                             (default: size=512M, hotplug_size=0, thp=on,
                             removable=off, remove_timeout=30)
  --disk path=FILE[,readonly=on|off]
                             a raw disk image as a virtio-blk device (/dev/vda,
                             /dev/vdb, ... in the order given; repeatable)
  --vsock cid=N,socket=PATH  a virtio-vsock device with guest CID N (3 or more),
                             host side on the unix socket PATH (Firecracker's
                             hybrid vsock: connect and send \"CONNECT <port>\\n\";
                             guest connections to port P go to PATH_P)
  --serial tty|off|file=PATH guest COM1: connected to stdin/stdout, disabled, or
                             written to the file PATH (default: tty)
  --no-reboot                when the guest reboots, exit with status 2 instead
                             of rebooting it
  --dump-acpi DIR            write the generated ACPI tables to DIR as *.dat
  --control PATH             control pipe on the unix socket PATH
  --control fd=N             control pipe on the inherited descriptor N
  --control fd=IN,OUT        control pipe reading requests from descriptor IN
                             and writing replies to descriptor OUT
  --seccomp on|off           system call filtering (default: on); off is UNSAFE
                             and meant for debugging only
  --log-level LEVEL          error, warn, info or debug (default: warn)
  --exit-device on|off|iobase=PORT[,iosize=N]
                             guest exit device compatible with QEMU's
                             isa-debug-exit: writing V exits with (V<<1)|1
                             (on: iobase=0x501,iosize=2; default: off)
  --pvpanic on|off           pvpanic device at port 0x505 (ACPI QEMU0001): a
                             guest panic exits with status 4 (default: on)
  --timeout DURATION         stop the guest after DURATION (e.g. 500ms, 30s,
                             5m, 1h; a bare number is seconds), exit status 124
  --cpu-online-events on|off report vCPUs coming online (a KVM MSR filter on
                             IA32_LSTAR writes; default: off)
  --pit on|off               in-kernel i8254 PIT for guests that need one (Linux
                             on KVM does not; destroying it costs ~24 ms at
                             exit and reboot; default: off)
  -h, --help                 print this help and exit
  -V, --version              print the version and exit

Every option also accepts the form --option=VALUE (needed when VALUE starts
with \"--\"). SIZE is a byte count with an optional K, M, G or T suffix (binary
units, any case), optionally followed by B or iB: 512M, 1536MiB, 2g.
";

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
    /// `--kernel` is absent.
    #[error("--kernel is required")]
    MissingKernel,
    /// An option's value is malformed or out of range.
    #[error("{flag}: {reason}")]
    Invalid {
        /// The option, e.g. `--cpus`.
        flag: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
}

/// The options minivmm knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opt {
    Kernel,
    Initramfs,
    Cmdline,
    Cpus,
    Memory,
    Serial,
    NoReboot,
    DumpAcpi,
    Disk,
    Vsock,
    Control,
    Seccomp,
    LogLevel,
    ExitDevice,
    PvPanic,
    Timeout,
    CpuOnlineEvents,
    Pit,
    Help,
    Version,
}

impl Opt {
    const ALL: [Opt; 20] = [
        Opt::Kernel,
        Opt::Initramfs,
        Opt::Cmdline,
        Opt::Cpus,
        Opt::Memory,
        Opt::Serial,
        Opt::NoReboot,
        Opt::DumpAcpi,
        Opt::Disk,
        Opt::Vsock,
        Opt::Control,
        Opt::Seccomp,
        Opt::LogLevel,
        Opt::ExitDevice,
        Opt::PvPanic,
        Opt::Timeout,
        Opt::CpuOnlineEvents,
        Opt::Pit,
        Opt::Help,
        Opt::Version,
    ];

    /// The long name, used in error messages.
    fn name(self) -> &'static str {
        match self {
            Opt::Kernel => "--kernel",
            Opt::Initramfs => "--initramfs",
            Opt::Cmdline => "--cmdline",
            Opt::Cpus => "--cpus",
            Opt::Memory => "--memory",
            Opt::Serial => "--serial",
            Opt::NoReboot => "--no-reboot",
            Opt::DumpAcpi => "--dump-acpi",
            Opt::Disk => "--disk",
            Opt::Vsock => "--vsock",
            Opt::Control => "--control",
            Opt::Seccomp => "--seccomp",
            Opt::LogLevel => "--log-level",
            Opt::ExitDevice => "--exit-device",
            Opt::PvPanic => "--pvpanic",
            Opt::Timeout => "--timeout",
            Opt::CpuOnlineEvents => "--cpu-online-events",
            Opt::Pit => "--pit",
            Opt::Help => "--help",
            Opt::Version => "--version",
        }
    }

    fn takes_value(self) -> bool {
        !matches!(self, Opt::NoReboot | Opt::Help | Opt::Version)
    }

    fn lookup(name: &str) -> Option<Opt> {
        match name {
            "-h" => Some(Opt::Help),
            "-V" => Some(Opt::Version),
            _ => Opt::ALL.into_iter().find(|o| o.name() == name),
        }
    }
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        reason: reason.into(),
    }
}

/// Parses the command line (without `argv[0]`).
///
/// `-h`/`--help` and `-V`/`--version` end parsing where they appear. Everything is validated
/// except that files exist: see the module documentation for the rules.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, ConfigError> {
    let mut args = args.into_iter();
    let mut seen: Vec<Opt> = Vec::new();
    let mut kernel = None;
    let mut config = VmConfig::new(PathBuf::new());

    while let Some(arg) = args.next() {
        let (name, inline) = if arg.starts_with("--") {
            match arg.split_once('=') {
                Some((name, value)) => (name, Some(value.to_string())),
                None => (arg.as_str(), None),
            }
        } else if arg.starts_with('-') && arg.len() > 1 {
            (arg.as_str(), None)
        } else {
            return Err(ConfigError::UnexpectedArgument(arg));
        };
        let opt = Opt::lookup(name).ok_or_else(|| ConfigError::UnknownOption(name.to_string()))?;
        let flag = opt.name();

        let value = if opt.takes_value() {
            let value = match inline {
                Some(v) => v,
                None => match args.next() {
                    Some(v) if !v.starts_with("--") => v,
                    _ => return Err(ConfigError::MissingValue(flag)),
                },
            };
            if value.is_empty() && opt != Opt::Cmdline {
                return Err(ConfigError::EmptyValue(flag));
            }
            value
        } else {
            if inline.is_some() {
                return Err(ConfigError::UnexpectedValue(flag));
            }
            String::new()
        };

        if seen.contains(&opt) && opt != Opt::Disk {
            return Err(ConfigError::Duplicate(flag));
        }
        seen.push(opt);

        match opt {
            Opt::Help => return Ok(Command::Help),
            Opt::Version => return Ok(Command::Version),
            Opt::Kernel => kernel = Some(PathBuf::from(value)),
            Opt::Initramfs => config.initramfs = Some(PathBuf::from(value)),
            Opt::Cmdline => config.cmdline = parse_cmdline(flag, value)?,
            Opt::Cpus => config.cpus = parse_cpus(flag, &value)?,
            Opt::Memory => config.memory = parse_memory(flag, &value)?,
            Opt::Serial => config.serial = parse_serial(flag, &value)?,
            Opt::NoReboot => config.no_reboot = true,
            Opt::DumpAcpi => config.dump_acpi = Some(PathBuf::from(value)),
            Opt::Disk => config.disks.push(parse_disk(flag, &value)?),
            Opt::Vsock => config.vsock = Some(parse_vsock(flag, &value)?),
            Opt::Control => config.control = Some(parse_control(flag, &value)?),
            Opt::Seccomp => config.seccomp = parse_on_off(flag, &value)?,
            Opt::LogLevel => config.log_level = parse_log_level(flag, &value)?,
            Opt::ExitDevice => config.exit_device = parse_exit_device(flag, &value)?,
            Opt::PvPanic => config.pvpanic = parse_on_off(flag, &value)?,
            Opt::Timeout => config.timeout = Some(parse_timeout(flag, &value)?),
            Opt::CpuOnlineEvents => config.cpu_online_events = parse_on_off(flag, &value)?,
            Opt::Pit => config.pit = parse_on_off(flag, &value)?,
        }
    }

    config.kernel = kernel.ok_or(ConfigError::MissingKernel)?;
    check_stdio_conflict(&config)?;
    check_virtio_count(&config)?;
    check_cmdline_length(&config)?;
    Ok(Command::Run(Box::new(config)))
}

/// Every virtio device needs its own interrupt line.
fn check_virtio_count(config: &VmConfig) -> Result<(), ConfigError> {
    let n = config.disks.len() + usize::from(config.vsock.is_some());
    if n > MAX_VIRTIO_DEVICES {
        return Err(invalid(
            Opt::Disk.name(),
            format!(
                "{n} virtio devices (disks and vsock together), at most {MAX_VIRTIO_DEVICES} fit"
            ),
        ));
    }
    Ok(())
}

/// An `on|off` value of `key` in a `key=value` list; `default` when the key is absent.
fn key_on_off(
    flag: &'static str,
    key: &str,
    value: Option<&str>,
    default: bool,
) -> Result<bool, ConfigError> {
    match value {
        None => Ok(default),
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(v) => Err(invalid(flag, format!("{key}={v}: expected on or off"))),
    }
}

fn parse_disk(flag: &'static str, value: &str) -> Result<DiskConfig, ConfigError> {
    let syntax = "path=FILE[,readonly=on|off]";
    let found = parse_key_values(flag, value, &["path", "readonly"], syntax)?;
    let path =
        found[0].ok_or_else(|| invalid(flag, format!("path= is required (expected {syntax})")))?;
    Ok(DiskConfig {
        path: PathBuf::from(path),
        readonly: key_on_off(flag, "readonly", found[1], false)?,
    })
}

fn parse_vsock(flag: &'static str, value: &str) -> Result<VsockConfig, ConfigError> {
    let syntax = "cid=N,socket=PATH";
    let found = parse_key_values(flag, value, &["cid", "socket"], syntax)?;
    let (Some(cid), Some(socket)) = (found[0], found[1]) else {
        return Err(invalid(
            flag,
            format!("cid= and socket= are required (expected {syntax})"),
        ));
    };
    let cid = match parse_decimal(cid) {
        Some(Some(n)) if (3..=MAX_GUEST_CID).contains(&n) => n,
        _ => {
            return Err(invalid(
                flag,
                format!("cid={cid} is invalid (expected a number from 3 to {MAX_GUEST_CID}; 0-2 are reserved)"),
            ))
        }
    };
    Ok(VsockConfig {
        cid,
        socket: PathBuf::from(socket),
    })
}

/// The kernel command line with minivmm's additions must fit the guest's 2048-byte buffer.
fn check_cmdline_length(config: &VmConfig) -> Result<(), ConfigError> {
    let max = CMDLINE_MAX_SIZE - 1;
    let full = config.kernel_cmdline();
    if full.len() <= max {
        return Ok(());
    }
    let additions = config.cmdline_additions().join(" ");
    Err(invalid(
        Opt::Cmdline.name(),
        format!(
            "{} bytes plus the {} bytes minivmm appends ({additions:?}) is too long, at most {max} bytes fit",
            config.cmdline.len(),
            full.len() - config.cmdline.len()
        ),
    ))
}

fn parse_cmdline(flag: &'static str, value: String) -> Result<String, ConfigError> {
    let max = CMDLINE_MAX_SIZE - 1;
    if value.len() > max {
        return Err(invalid(
            flag,
            format!("{} bytes is too long, at most {max} bytes fit", value.len()),
        ));
    }
    Ok(value)
}

/// Splits `value` as `key=value[,key=value...]` over the allowed `keys`; returns one entry per key.
fn parse_key_values<'a>(
    flag: &'static str,
    value: &'a str,
    keys: &[&'static str],
    syntax: &str,
) -> Result<Vec<Option<&'a str>>, ConfigError> {
    let mut found = vec![None; keys.len()];
    for item in value.split(',') {
        if item.is_empty() {
            return Err(invalid(
                flag,
                format!("empty item in {value:?} (expected {syntax})"),
            ));
        }
        let Some((key, val)) = item.split_once('=') else {
            return Err(invalid(
                flag,
                format!("expected key=value, got {item:?} (expected {syntax})"),
            ));
        };
        let Some(index) = keys.iter().position(|k| *k == key) else {
            return Err(invalid(
                flag,
                format!("unknown key {key:?} (expected {})", keys.join(" or ")),
            ));
        };
        if val.is_empty() {
            return Err(invalid(flag, format!("missing value for {key}")));
        }
        if found[index].is_some() {
            return Err(invalid(flag, format!("duplicate key {key}")));
        }
        found[index] = Some(val);
    }
    Ok(found)
}

/// Parses a decimal count; `None` when it is not made of digits only, `Some(None)` on overflow.
fn parse_decimal(s: &str) -> Option<Option<u64>> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse().ok())
}

fn parse_vcpu_count(flag: &'static str, key: &str, s: &str) -> Result<u32, ConfigError> {
    let too_many = || {
        invalid(
            flag,
            format!("{key}={s} exceeds the maximum of {MAX_VCPUS} vCPUs"),
        )
    };
    match parse_decimal(s) {
        None => Err(invalid(flag, format!("{key}={s} is not a number"))),
        Some(None) => Err(too_many()),
        Some(Some(0)) => Err(invalid(
            flag,
            format!("{key}=0 is invalid, need at least 1 vCPU"),
        )),
        Some(Some(n)) if n > u64::from(MAX_VCPUS) => Err(too_many()),
        Some(Some(n)) => u32::try_from(n).map_err(|_| too_many()),
    }
}

fn parse_cpus(flag: &'static str, value: &str) -> Result<CpuConfig, ConfigError> {
    let found = parse_key_values(flag, value, &["boot", "max"], "boot=N[,max=M]")?;
    let boot = match found[0] {
        Some(s) => parse_vcpu_count(flag, "boot", s)?,
        None => 1,
    };
    let max = match found[1] {
        Some(s) => {
            let max = parse_vcpu_count(flag, "max", s)?;
            if max < boot {
                return Err(invalid(flag, format!("max={s} is less than boot={boot}")));
            }
            max
        }
        None => boot,
    };
    Ok(CpuConfig { boot, max })
}

fn parse_size_value(flag: &'static str, key: &str, s: &str) -> Result<u64, ConfigError> {
    parse_size(s).map_err(|e| match e {
        SizeError::Invalid(_) => invalid(
            flag,
            format!(
                "{key}={s} is not a valid size (use a byte count with an optional K, M, G or T suffix, e.g. 1536M)"
            ),
        ),
        SizeError::Overflow(_) => invalid(flag, format!("{key}={s} is too large")),
    })
}

fn parse_memory(flag: &'static str, value: &str) -> Result<MemoryConfig, ConfigError> {
    let found = parse_key_values(
        flag,
        value,
        &["size", "hotplug_size", "thp", "removable", "remove_timeout"],
        "size=SIZE[,hotplug_size=SIZE][,thp=on|off][,removable=on|off][,remove_timeout=SECS]",
    )?;
    let (size, size_text) = match found[0] {
        Some(s) => (parse_size_value(flag, "size", s)?, s.to_string()),
        None => (DEFAULT_MEMORY_SIZE, format_size(DEFAULT_MEMORY_SIZE)),
    };
    if size < MIN_MEMORY_SIZE {
        return Err(invalid(
            flag,
            format!(
                "size={size_text} is too small, need at least {}",
                format_size(MIN_MEMORY_SIZE)
            ),
        ));
    }
    if size % MEMORY_SIZE_ALIGN != 0 {
        return Err(invalid(
            flag,
            format!(
                "size={size_text} is not a multiple of {}",
                format_size(MEMORY_SIZE_ALIGN)
            ),
        ));
    }
    let hotplug_size = match found[1] {
        Some(s) => {
            let hotplug_size = parse_size_value(flag, "hotplug_size", s)?;
            if hotplug_size % MEMORY_HOTPLUG_ALIGN != 0 {
                return Err(invalid(
                    flag,
                    format!(
                        "hotplug_size={s} is not a multiple of {}",
                        format_size(MEMORY_HOTPLUG_ALIGN)
                    ),
                ));
            }
            hotplug_size
        }
        None => 0,
    };
    let limit = format_size(MAX_TOTAL_MEMORY);
    if size > MAX_TOTAL_MEMORY {
        return Err(invalid(
            flag,
            format!("size={size_text} exceeds the supported {limit} of guest memory"),
        ));
    }
    let total_fits = size
        .checked_add(hotplug_size)
        .is_some_and(|total| total <= MAX_TOTAL_MEMORY);
    if !total_fits {
        return Err(invalid(
            flag,
            format!(
                "size={size_text} plus hotplug_size={} exceeds the supported {limit} of guest memory",
                found[1].unwrap_or("0")
            ),
        ));
    }
    let removable = key_on_off(flag, "removable", found[3], false)?;
    if removable && hotplug_size == 0 {
        return Err(invalid(
            flag,
            "removable=on needs a hotplug window (hotplug_size=SIZE): only hot-added RAM can be removed",
        ));
    }
    let remove_timeout = match found[4] {
        None => DEFAULT_REMOVE_TIMEOUT,
        Some(v) => match v.parse::<u64>() {
            Ok(secs @ 1..=MAX_REMOVE_TIMEOUT_SECS) if removable => {
                Duration::from_secs(secs)
            }
            Ok(1..=MAX_REMOVE_TIMEOUT_SECS) => {
                return Err(invalid(
                    flag,
                    "remove_timeout= only applies with removable=on",
                ))
            }
            _ => {
                return Err(invalid(
                    flag,
                    format!(
                        "remove_timeout={v}: expected whole seconds from 1 to {MAX_REMOVE_TIMEOUT_SECS}"
                    ),
                ))
            }
        },
    };
    Ok(MemoryConfig {
        size,
        hotplug_size,
        huge_pages: key_on_off(flag, "thp", found[2], true)?,
        removable,
        remove_timeout,
    })
}

fn parse_serial(flag: &'static str, value: &str) -> Result<SerialMode, ConfigError> {
    match value {
        "tty" => Ok(SerialMode::Tty),
        "off" => Ok(SerialMode::Off),
        _ => match value.strip_prefix("file=") {
            Some("") => Err(invalid(flag, "file= needs a path")),
            Some(path) => Ok(SerialMode::File(PathBuf::from(path))),
            None => Err(invalid(
                flag,
                format!("unknown mode {value:?} (expected tty, off or file=PATH)"),
            )),
        },
    }
}

fn parse_fd(flag: &'static str, s: &str) -> Result<RawFd, ConfigError> {
    if let Some(digits) = s.strip_prefix('-') {
        if parse_decimal(digits).is_some() {
            return Err(invalid(
                flag,
                format!("fd={s} is invalid, file descriptors are 0 or more"),
            ));
        }
    }
    match parse_decimal(s) {
        None => Err(invalid(flag, format!("fd={s} is not a number"))),
        Some(n) => n
            .and_then(|n| RawFd::try_from(n).ok())
            .ok_or_else(|| invalid(flag, format!("fd={s} is too large"))),
    }
}

fn parse_control(flag: &'static str, value: &str) -> Result<ControlEndpoint, ConfigError> {
    let Some(fds) = value.strip_prefix("fd=") else {
        return Ok(ControlEndpoint::Socket(PathBuf::from(value)));
    };
    let parts: Vec<&str> = fds.split(',').collect();
    match parts.as_slice() {
        [""] => Err(invalid(
            flag,
            "fd= needs a descriptor number (fd=N or fd=IN,OUT)",
        )),
        [fd] => {
            let fd = parse_fd(flag, fd)?;
            Ok(ControlEndpoint::Fd {
                read: fd,
                write: fd,
            })
        }
        [read, write] => Ok(ControlEndpoint::Fd {
            read: parse_fd(flag, read)?,
            write: parse_fd(flag, write)?,
        }),
        _ => Err(invalid(
            flag,
            format!("expected fd=N or fd=IN,OUT, got {value:?}"),
        )),
    }
}

fn parse_on_off(flag: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(invalid(flag, format!("expected on or off, got {value:?}"))),
    }
}

/// A port number: decimal or `0x` hexadecimal.
fn parse_port(flag: &'static str, key: &str, s: &str) -> Result<u16, ConfigError> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).ok()
        }
        Some(_) => None,
        None => parse_decimal(s).flatten(),
    };
    match parsed {
        Some(n) if n <= u64::from(u16::MAX) => Ok(n as u16),
        _ => Err(invalid(
            flag,
            format!("{key}={s} is not a port number (0 to 0xffff, decimal or 0x hex)"),
        )),
    }
}

fn parse_exit_device(
    flag: &'static str,
    value: &str,
) -> Result<Option<ExitDeviceConfig>, ConfigError> {
    match value {
        "off" => return Ok(None),
        "on" => return Ok(Some(ExitDeviceConfig::default())),
        _ => {}
    }
    let found = parse_key_values(
        flag,
        value,
        &["iobase", "iosize"],
        "on, off or iobase=PORT[,iosize=N]",
    )?;
    let mut dev = ExitDeviceConfig::default();
    if let Some(s) = found[0] {
        dev.iobase = parse_port(flag, "iobase", s)?;
    }
    if let Some(s) = found[1] {
        dev.iosize = match s {
            "1" => 1,
            "2" => 2,
            "4" => 4,
            _ => {
                return Err(invalid(
                    flag,
                    format!("iosize={s} is invalid (expected 1, 2 or 4)"),
                ))
            }
        };
    }
    let end = u32::from(dev.iobase) + u32::from(dev.iosize);
    if end > 0x1_0000 {
        return Err(invalid(
            flag,
            format!("ports {:#x}..{end:#x} run past 0xffff", dev.iobase),
        ));
    }
    if let Some(name) = ports::overlapping(dev.iobase, dev.iosize) {
        return Err(invalid(
            flag,
            format!(
                "ports {:#x}..{end:#x} overlap the {name} ports minivmm emulates",
                dev.iobase
            ),
        ));
    }
    Ok(Some(dev))
}

/// Parses a DURATION: a decimal number with an optional `ms`, `s`, `m` or `h` suffix (seconds by
/// default), more than zero and at most [`MAX_TIMEOUT`].
fn parse_timeout(flag: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(digits_end);
    let bad = || {
        invalid(
            flag,
            format!("invalid duration {value:?} (use a number with an optional ms, s, m or h suffix, e.g. 30s)"),
        )
    };
    let scale_ms: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    let too_long = || {
        invalid(
            flag,
            format!(
                "{value} is too long (at most {}h)",
                MAX_TIMEOUT.as_secs() / 3600
            ),
        )
    };
    let n = match parse_decimal(digits) {
        None => return Err(bad()),
        Some(None) => return Err(too_long()),
        Some(Some(n)) => n,
    };
    let ms = n.checked_mul(scale_ms).ok_or_else(too_long)?;
    check_timeout(flag, Duration::from_millis(ms), value)
}

/// The range check of a `--timeout` (`shown` is how the value was written).
fn check_timeout(flag: &'static str, d: Duration, shown: &str) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(invalid(
            flag,
            format!("{shown} is zero; give a positive duration"),
        ));
    }
    if d > MAX_TIMEOUT {
        return Err(invalid(
            flag,
            format!(
                "{shown} is too long (at most {}h)",
                MAX_TIMEOUT.as_secs() / 3600
            ),
        ));
    }
    Ok(d)
}

fn parse_log_level(flag: &'static str, value: &str) -> Result<log::LevelFilter, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "error" => Ok(log::LevelFilter::Error),
        "warn" => Ok(log::LevelFilter::Warn),
        "info" => Ok(log::LevelFilter::Info),
        "debug" => Ok(log::LevelFilter::Debug),
        _ => Err(invalid(
            flag,
            format!("unknown level {value:?} (expected error, warn, info or debug)"),
        )),
    }
}

/// Checks a configuration built in code (e.g. by [`crate::control::api::VmBuilder`]) against the same
/// rules the command line applies, with the same messages: each group of values goes through
/// its option's parser, so the rules exist once.
pub fn validate(config: &VmConfig) -> Result<(), ConfigError> {
    let cpus = format!("boot={},max={}", config.cpus.boot, config.cpus.max);
    if parse_cpus(Opt::Cpus.name(), &cpus)? != config.cpus {
        return Err(invalid(Opt::Cpus.name(), format!("{cpus} is not accepted")));
    }
    let on_off = |b: bool| if b { "on" } else { "off" };
    let mut memory = format!(
        "size={},hotplug_size={},removable={}",
        format_size(config.memory.size),
        format_size(config.memory.hotplug_size),
        on_off(config.memory.removable),
    );
    if config.memory.removable {
        memory += &format!(",remove_timeout={}", config.memory.remove_timeout.as_secs());
    }
    let parsed = parse_memory(Opt::Memory.name(), &memory)?;
    if parsed.remove_timeout != config.memory.remove_timeout && config.memory.removable {
        return Err(invalid(
            Opt::Memory.name(),
            format!("remove_timeout must be whole seconds from 1 to {MAX_REMOVE_TIMEOUT_SECS}"),
        ));
    }
    parse_cmdline(Opt::Cmdline.name(), config.cmdline.clone())?;
    if let Some(dev) = config.exit_device {
        let text = format!("iobase={:#x},iosize={}", dev.iobase, dev.iosize);
        parse_exit_device(Opt::ExitDevice.name(), &text)?;
    }
    if let Some(limit) = config.timeout {
        check_timeout(Opt::Timeout.name(), limit, &format!("{limit:?}"))?;
    }
    for disk in &config.disks {
        if disk.path.as_os_str().is_empty() {
            return Err(invalid(Opt::Disk.name(), "path= is required"));
        }
    }
    if let Some(v) = &config.vsock {
        parse_vsock(Opt::Vsock.name(), &format!("cid={},socket=x", v.cid))?;
        if v.socket.as_os_str().is_empty() {
            return Err(invalid(Opt::Vsock.name(), "socket= is required"));
        }
    }
    check_virtio_count(config)?;
    check_stdio_conflict(config)?;
    check_cmdline_length(config)
}

/// `--serial tty` owns stdin and stdout; a control pipe on those descriptors would fight over them.
fn check_stdio_conflict(config: &VmConfig) -> Result<(), ConfigError> {
    if config.serial != SerialMode::Tty {
        return Ok(());
    }
    if let Some(ControlEndpoint::Fd { read, write }) = config.control {
        for fd in [read, write] {
            if fd == libc::STDIN_FILENO || fd == libc::STDOUT_FILENO {
                return Err(invalid(
                    Opt::Control.name(),
                    format!(
                        "fd={fd} is used by --serial tty for the guest console (add --serial off or --serial file=PATH)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn run(list: &[&str]) -> VmConfig {
        match parse_args(args(list)) {
            Ok(Command::Run(config)) => *config,
            other => panic!("{list:?}: expected Run, got {other:?}"),
        }
    }

    fn err(list: &[&str]) -> String {
        match parse_args(args(list)) {
            Err(e) => e.to_string(),
            Ok(other) => panic!("{list:?}: expected an error, got {other:?}"),
        }
    }

    #[test]
    fn disks_and_vsock() {
        let c = run(&[
            "--kernel",
            "k",
            "--disk",
            "path=/a.img",
            "--disk=path=/b.img,readonly=on",
            "--vsock",
            "cid=42,socket=/tmp/v.sock",
        ]);
        assert_eq!(
            c.disks,
            [
                DiskConfig {
                    path: "/a.img".into(),
                    readonly: false
                },
                DiskConfig {
                    path: "/b.img".into(),
                    readonly: true
                }
            ]
        );
        assert_eq!(
            c.vsock,
            Some(VsockConfig {
                cid: 42,
                socket: "/tmp/v.sock".into()
            })
        );
        assert!(validate(&c).is_ok());
        for (args, want) in [
            (&["--disk", "readonly=on"][..], "--disk: path= is required"),
            (
                &["--disk", "path=/a,readonly=yes"],
                "--disk: readonly=yes: expected on or off",
            ),
            (&["--disk", "/a.img"], "--disk: expected key=value"),
            (
                &["--vsock", "cid=3"],
                "--vsock: cid= and socket= are required",
            ),
            (&["--vsock", "cid=2,socket=/s"], "--vsock: cid=2 is invalid"),
            (
                &["--vsock", "cid=4294967295,socket=/s"],
                "--vsock: cid=4294967295 is invalid",
            ),
            (&["--vsock", "cid=x,socket=/s"], "--vsock: cid=x is invalid"),
            (
                &["--vsock", "cid=3,socket=/s", "--vsock", "cid=4,socket=/t"],
                "--vsock given more than once",
            ),
        ] {
            let mut list = vec!["--kernel", "k"];
            list.extend_from_slice(args);
            let e = err(&list);
            assert!(e.starts_with(want), "{args:?}: {e}");
        }
        let mut list = vec!["--kernel", "k", "--vsock", "cid=3,socket=/s"];
        for _ in 0..MAX_VIRTIO_DEVICES {
            list.extend(["--disk", "path=/d"]);
        }
        assert!(err(&list).contains("at most 7 fit"), "{}", err(&list));
        let mut c = run(&["--kernel", "k"]);
        c.vsock = Some(VsockConfig {
            cid: 1,
            socket: "/s".into(),
        });
        assert!(validate(&c).is_err(), "validate checks the CID");
    }

    #[test]
    fn minimal_command_line_uses_defaults() {
        let config = run(&["--kernel", "/boot/vmlinuz"]);
        assert_eq!(config, VmConfig::new(PathBuf::from("/boot/vmlinuz")));
        assert_eq!(config.cmdline, "console=ttyS0 reboot=k panic=1 pci=off");
        assert_eq!(config.cpus, CpuConfig { boot: 1, max: 1 });
        assert_eq!(
            config.memory,
            MemoryConfig {
                size: 512 << 20,
                hotplug_size: 0,
                huge_pages: true,
                ..MemoryConfig::default()
            }
        );
        assert_eq!(config.serial, SerialMode::Tty);
        assert!(!config.no_reboot);
        assert!(config.seccomp);
        assert_eq!(config.log_level, log::LevelFilter::Warn);
        assert_eq!(config.initramfs, None);
        assert_eq!(config.dump_acpi, None);
        assert_eq!(config.control, None);
    }

    #[test]
    fn full_command_line_in_both_forms() {
        let expected = VmConfig {
            kernel: PathBuf::from("bzImage"),
            initramfs: Some(PathBuf::from("initrd.cpio")),
            cmdline: "console=ttyS0 quiet".to_string(),
            cpus: CpuConfig { boot: 2, max: 8 },
            memory: MemoryConfig {
                size: 1 << 30,
                hotplug_size: 2 << 30,
                huge_pages: true,
                ..MemoryConfig::default()
            },
            serial: SerialMode::File(PathBuf::from("/tmp/console.log")),
            no_reboot: true,
            exit_device: Some(ExitDeviceConfig {
                iobase: 0xf4,
                iosize: 4,
            }),
            pvpanic: false,
            timeout: Some(Duration::from_secs(90)),
            cpu_online_events: true,
            pit: true,
            dump_acpi: Some(PathBuf::from("/tmp/acpi")),
            disks: Vec::new(),
            vsock: None,
            control: Some(ControlEndpoint::Socket(PathBuf::from("/run/vm.sock"))),
            seccomp: false,
            log_level: log::LevelFilter::Debug,
        };
        let separate = run(&[
            "--kernel",
            "bzImage",
            "--initramfs",
            "initrd.cpio",
            "--cmdline",
            "console=ttyS0 quiet",
            "--cpus",
            "boot=2,max=8",
            "--memory",
            "size=1G,hotplug_size=2G",
            "--serial",
            "file=/tmp/console.log",
            "--no-reboot",
            "--dump-acpi",
            "/tmp/acpi",
            "--control",
            "/run/vm.sock",
            "--seccomp",
            "off",
            "--log-level",
            "debug",
            "--exit-device",
            "iobase=0xf4,iosize=4",
            "--pvpanic",
            "off",
            "--timeout",
            "90s",
            "--cpu-online-events",
            "on",
            "--pit",
            "on",
        ]);
        assert_eq!(separate, expected);
        let joined = run(&[
            "--kernel=bzImage",
            "--initramfs=initrd.cpio",
            "--cmdline=console=ttyS0 quiet",
            "--cpus=max=8,boot=2",
            "--memory=hotplug_size=2048M,size=1024MiB",
            "--serial=file=/tmp/console.log",
            "--no-reboot",
            "--dump-acpi=/tmp/acpi",
            "--control=/run/vm.sock",
            "--seccomp=off",
            "--log-level=DEBUG",
            "--exit-device=iosize=4,iobase=244",
            "--pvpanic=off",
            "--timeout=90000ms",
            "--cpu-online-events=on",
            "--pit=on",
        ]);
        assert_eq!(joined, expected);
    }

    #[test]
    fn exit_device_values() {
        let dev = |v: &str| run(&["--kernel", "k", "--exit-device", v]).exit_device;
        assert_eq!(run(&["--kernel", "k"]).exit_device, None);
        assert_eq!(dev("off"), None);
        assert_eq!(
            dev("on"),
            Some(ExitDeviceConfig {
                iobase: 0x501,
                iosize: 2
            })
        );
        assert_eq!(
            dev("iobase=0xf4"),
            Some(ExitDeviceConfig {
                iobase: 0xf4,
                iosize: 2
            })
        );
        assert_eq!(
            dev("iosize=1"),
            Some(ExitDeviceConfig {
                iobase: 0x501,
                iosize: 1
            })
        );
        assert_eq!(
            dev("iobase=0xfffc,iosize=4").map(|d| d.iobase),
            Some(0xfffc)
        );
        let e = |v: &str| err(&["--kernel", "k", "--exit-device", v]);
        assert_eq!(
            e("iobase=0x3f8"),
            "--exit-device: ports 0x3f8..0x3fa overlap the COM1 ports minivmm emulates"
        );
        assert_eq!(
            e("iobase=0x504"),
            "--exit-device: ports 0x504..0x506 overlap the pvpanic ports minivmm emulates"
        );
        assert_eq!(
            e("iobase=0xfffe,iosize=4"),
            "--exit-device: ports 0xfffe..0x10002 run past 0xffff"
        );
        assert_eq!(
            e("iosize=3"),
            "--exit-device: iosize=3 is invalid (expected 1, 2 or 4)"
        );
        assert_eq!(
            e("iobase=0x10000"),
            "--exit-device: iobase=0x10000 is not a port number (0 to 0xffff, decimal or 0x hex)"
        );
        assert_eq!(
            e("iobase=0x"),
            "--exit-device: iobase=0x is not a port number (0 to 0xffff, decimal or 0x hex)"
        );
        assert_eq!(
            e("yes"),
            "--exit-device: expected key=value, got \"yes\" (expected on, off or iobase=PORT[,iosize=N])"
        );
        assert_eq!(
            e("port=1"),
            "--exit-device: unknown key \"port\" (expected iobase or iosize)"
        );
    }

    #[test]
    fn pvpanic_and_timeout_values() {
        assert!(run(&["--kernel", "k"]).pvpanic);
        assert!(!run(&["--kernel", "k", "--pvpanic", "off"]).pvpanic);
        assert!(!run(&["--kernel", "k"]).pit);
        assert!(run(&["--kernel", "k", "--pit", "on"]).pit);
        assert_eq!(
            err(&["--kernel", "k", "--pvpanic", "maybe"]),
            "--pvpanic: expected on or off, got \"maybe\""
        );
        let t = |v: &str| run(&["--kernel", "k", "--timeout", v]).timeout;
        assert_eq!(run(&["--kernel", "k"]).timeout, None);
        assert_eq!(t("5"), Some(Duration::from_secs(5)));
        assert_eq!(t("5s"), Some(Duration::from_secs(5)));
        assert_eq!(t("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(t("2m"), Some(Duration::from_secs(120)));
        assert_eq!(t("8760h"), Some(MAX_TIMEOUT));
        let e = |v: &str| err(&["--kernel", "k", "--timeout", v]);
        assert_eq!(e("0s"), "--timeout: 0s is zero; give a positive duration");
        assert_eq!(e("8761h"), "--timeout: 8761h is too long (at most 8760h)");
        assert_eq!(
            e("99999999999999999999"),
            "--timeout: 99999999999999999999 is too long (at most 8760h)"
        );
        assert_eq!(
            e("1.5s"),
            "--timeout: invalid duration \"1.5s\" (use a number with an optional ms, s, m or h suffix, e.g. 30s)"
        );
        assert_eq!(
            e("s"),
            "--timeout: invalid duration \"s\" (use a number with an optional ms, s, m or h suffix, e.g. 30s)"
        );
        assert_eq!(
            e("-5s"),
            "--timeout: invalid duration \"-5s\" (use a number with an optional ms, s, m or h suffix, e.g. 30s)"
        );
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse_args(args(&["--help"])), Ok(Command::Help));
        assert_eq!(parse_args(args(&["-h"])), Ok(Command::Help));
        assert_eq!(parse_args(args(&["--version"])), Ok(Command::Version));
        assert_eq!(parse_args(args(&["-V"])), Ok(Command::Version));
        // No --kernel needed, and parsing stops there.
        assert_eq!(
            parse_args(args(&["--cpus", "boot=2", "--help", "--bogus"])),
            Ok(Command::Help)
        );
        assert_eq!(err(&["--help=yes"]), "--help takes no value");
        assert!(VERSION.starts_with("minivmm "));
    }

    #[test]
    fn usage_documents_every_option_and_default() {
        for opt in Opt::ALL {
            assert!(USAGE.contains(opt.name()), "{} missing", opt.name());
        }
        assert!(USAGE.contains(DEFAULT_CMDLINE));
        assert!(USAGE.contains("-h, --help") && USAGE.contains("-V, --version"));
        assert!(USAGE.lines().all(|l| l.len() <= 80));
    }

    #[test]
    fn cmdline_may_be_empty_or_start_with_dashes() {
        assert_eq!(run(&["--kernel", "k", "--cmdline", ""]).cmdline, "");
        assert_eq!(run(&["--kernel", "k", "--cmdline="]).cmdline, "");
        assert_eq!(
            run(&["--kernel", "k", "--cmdline=-- init=/bin/sh"]).cmdline,
            "-- init=/bin/sh"
        );
        let long = "x".repeat(2047);
        assert_eq!(run(&["--kernel", "k", "--cmdline", &long]).cmdline, long);
        let too_long = "x".repeat(2048);
        assert_eq!(
            err(&["--kernel", "k", "--cmdline", &too_long]),
            "--cmdline: 2048 bytes is too long, at most 2047 bytes fit"
        );
    }

    #[test]
    fn cmdline_length_counts_what_minivmm_appends() {
        // 2030 bytes fit alone, but not with " memhp_default_state=online" (27 bytes) appended
        // for the hotplug window; the memory option may come before or after --cmdline.
        let near = "y".repeat(2030);
        assert_eq!(run(&["--kernel", "k", "--cmdline", &near]).cmdline, near);
        let want = "--cmdline: 2030 bytes plus the 27 bytes minivmm appends \
                    (\"memhp_default_state=online\") is too long, at most 2047 bytes fit";
        for args in [
            [
                "--kernel",
                "k",
                "--cmdline",
                &near,
                "--memory",
                "hotplug_size=1G",
            ],
            [
                "--kernel",
                "k",
                "--memory",
                "hotplug_size=1G",
                "--cmdline",
                &near,
            ],
        ] {
            assert_eq!(err(&args), want);
        }
        // Exactly full: 2020 + 27 = 2047.
        let full = "z".repeat(2020);
        let c = run(&[
            "--kernel",
            "k",
            "--cmdline",
            &full,
            "--memory",
            "hotplug_size=1G",
        ]);
        assert_eq!(c.kernel_cmdline().len(), 2047);
        // A command line that chooses its own policy gets nothing appended.
        let own = format!("memhp_default_state=offline {}", "w".repeat(2000));
        let c = run(&[
            "--kernel",
            "k",
            "--cmdline",
            &own,
            "--memory",
            "hotplug_size=1G",
        ]);
        assert_eq!(c.kernel_cmdline(), own);
    }

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

    #[test]
    fn option_syntax_errors() {
        assert_eq!(err(&["--foo"]), "unknown option --foo (see --help)");
        assert_eq!(err(&["--foo=1"]), "unknown option --foo (see --help)");
        assert_eq!(err(&["-x"]), "unknown option -x (see --help)");
        assert_eq!(err(&["--"]), "unknown option -- (see --help)");
        assert_eq!(
            err(&["--kernel", "k", "extra"]),
            "unexpected argument \"extra\" (see --help)"
        );
        assert_eq!(err(&["-"]), "unexpected argument \"-\" (see --help)");
        assert_eq!(err(&["--kernel"]), "--kernel: missing value");
        assert_eq!(err(&["--kernel", "--no-reboot"]), "--kernel: missing value");
        assert_eq!(err(&["--kernel="]), "--kernel: empty value");
        assert_eq!(
            err(&["--kernel", "k", "--initramfs", ""]),
            "--initramfs: empty value"
        );
        assert_eq!(err(&["--no-reboot=1"]), "--no-reboot takes no value");
        assert_eq!(
            err(&["--kernel", "a", "--kernel=b"]),
            "--kernel given more than once"
        );
        assert_eq!(
            err(&["--kernel", "a", "--no-reboot", "--no-reboot"]),
            "--no-reboot given more than once"
        );
        assert_eq!(err(&[]), "--kernel is required");
        assert_eq!(err(&["--cpus", "boot=2"]), "--kernel is required");
    }

    #[test]
    fn cpus() {
        let cpus = |v: &str| run(&["--kernel", "k", "--cpus", v]).cpus;
        assert_eq!(cpus("boot=4"), CpuConfig { boot: 4, max: 4 });
        assert_eq!(cpus("boot=2,max=4"), CpuConfig { boot: 2, max: 4 });
        assert_eq!(cpus("max=4"), CpuConfig { boot: 1, max: 4 });
        assert_eq!(
            cpus("boot=254"),
            CpuConfig {
                boot: 254,
                max: 254
            }
        );
        assert_eq!(cpus("boot=1,max=254"), CpuConfig { boot: 1, max: 254 });

        let e = |v: &str| err(&["--kernel", "k", "--cpus", v]);
        assert_eq!(
            e("boot=0"),
            "--cpus: boot=0 is invalid, need at least 1 vCPU"
        );
        assert_eq!(
            e("boot=2,max=0"),
            "--cpus: max=0 is invalid, need at least 1 vCPU"
        );
        assert_eq!(e("boot=4,max=2"), "--cpus: max=2 is less than boot=4");
        assert_eq!(
            e("boot=255"),
            "--cpus: boot=255 exceeds the maximum of 254 vCPUs"
        );
        assert_eq!(
            e("max=99999999999999999999999"),
            "--cpus: max=99999999999999999999999 exceeds the maximum of 254 vCPUs"
        );
        assert_eq!(e("boot=two"), "--cpus: boot=two is not a number");
        assert_eq!(e("boot=-1"), "--cpus: boot=-1 is not a number");
        assert_eq!(e("boot=+1"), "--cpus: boot=+1 is not a number");
        assert_eq!(e("boot="), "--cpus: missing value for boot");
        assert_eq!(e("boot=1,boot=2"), "--cpus: duplicate key boot");
        assert_eq!(
            e("boot=1,cores=2"),
            "--cpus: unknown key \"cores\" (expected boot or max)"
        );
        assert_eq!(
            e("4"),
            "--cpus: expected key=value, got \"4\" (expected boot=N[,max=M])"
        );
        assert_eq!(
            e("boot=1,"),
            "--cpus: empty item in \"boot=1,\" (expected boot=N[,max=M])"
        );
    }

    #[test]
    fn memory() {
        let mem = |v: &str| run(&["--kernel", "k", "--memory", v]).memory;
        assert!(mem("size=1G").huge_pages);
        assert!(!mem("size=1G,thp=off").huge_pages);
        assert_eq!(
            err(&["--kernel", "k", "--memory", "thp=2M"]),
            "--memory: thp=2M: expected on or off"
        );
        let removable = mem("hotplug_size=1G,removable=on,remove_timeout=90");
        assert!(removable.removable);
        assert_eq!(removable.remove_timeout, Duration::from_secs(90));
        let default = mem("hotplug_size=1G,removable=on");
        assert_eq!(default.remove_timeout, DEFAULT_REMOVE_TIMEOUT);
        assert!(!mem("hotplug_size=1G,removable=off").removable);
        for (v, want) in [
            ("removable=on", "--memory: removable=on needs a hotplug window (hotplug_size=SIZE): only hot-added RAM can be removed"),
            ("hotplug_size=1G,removable=yes", "--memory: removable=yes: expected on or off"),
            ("hotplug_size=1G,remove_timeout=5", "--memory: remove_timeout= only applies with removable=on"),
            ("hotplug_size=1G,removable=on,remove_timeout=0", "--memory: remove_timeout=0: expected whole seconds from 1 to 3600"),
            ("hotplug_size=1G,removable=on,remove_timeout=3601", "--memory: remove_timeout=3601: expected whole seconds from 1 to 3600"),
            ("hotplug_size=1G,removable=on,remove_timeout=1.5", "--memory: remove_timeout=1.5: expected whole seconds from 1 to 3600"),
        ] {
            assert_eq!(err(&["--kernel", "k", "--memory", v]), want, "{v}");
        }
        assert_eq!(
            mem("size=1G"),
            MemoryConfig {
                size: 1 << 30,
                hotplug_size: 0,
                huge_pages: true,
                ..MemoryConfig::default()
            }
        );
        assert_eq!(
            mem("size=64M,hotplug_size=128M"),
            MemoryConfig {
                size: 64 << 20,
                hotplug_size: 128 << 20,
                huge_pages: true,
                ..MemoryConfig::default()
            }
        );
        assert_eq!(
            mem("hotplug_size=1G"),
            MemoryConfig {
                size: 512 << 20,
                hotplug_size: 1 << 30,
                huge_pages: true,
                ..MemoryConfig::default()
            }
        );
        assert_eq!(
            mem("size=512G,hotplug_size=512G"),
            MemoryConfig {
                size: 512 << 30,
                hotplug_size: 512 << 30,
                huge_pages: true,
                ..MemoryConfig::default()
            }
        );
        assert_eq!(mem("size=1T").size, 1 << 40);

        let e = |v: &str| err(&["--kernel", "k", "--memory", v]);
        assert_eq!(
            e("size=32M"),
            "--memory: size=32M is too small, need at least 64M"
        );
        assert_eq!(
            e("size=0"),
            "--memory: size=0 is too small, need at least 64M"
        );
        assert_eq!(
            e("size=100000K"),
            "--memory: size=100000K is not a multiple of 1M"
        );
        assert_eq!(
            e("size=512M,hotplug_size=100M"),
            "--memory: hotplug_size=100M is not a multiple of 128M"
        );
        assert_eq!(
            e("size=1025G"),
            "--memory: size=1025G exceeds the supported 1T of guest memory"
        );
        assert_eq!(
            e("size=1T,hotplug_size=128M"),
            "--memory: size=1T plus hotplug_size=128M exceeds the supported 1T of guest memory"
        );
        assert_eq!(
            e("hotplug_size=16383T"),
            "--memory: size=512M plus hotplug_size=16383T exceeds the supported 1T of guest memory"
        );
        assert_eq!(
            e("size=12Q"),
            "--memory: size=12Q is not a valid size (use a byte count with an optional K, M, G or T suffix, e.g. 1536M)"
        );
        assert_eq!(
            e("size=99999999999T"),
            "--memory: size=99999999999T is too large"
        );
        assert_eq!(e("size=1G,size=2G"), "--memory: duplicate key size");
        assert_eq!(
            e("ram=1G"),
            "--memory: unknown key \"ram\" (expected size or hotplug_size or thp or removable or remove_timeout)"
        );
        assert_eq!(
            e("hotplug_size="),
            "--memory: missing value for hotplug_size"
        );
        assert_eq!(
            e("1G"),
            "--memory: expected key=value, got \"1G\" (expected size=SIZE[,hotplug_size=SIZE][,thp=on|off][,removable=on|off][,remove_timeout=SECS])"
        );
    }

    #[test]
    fn serial() {
        let serial = |v: &str| run(&["--kernel", "k", "--serial", v]).serial;
        assert_eq!(serial("tty"), SerialMode::Tty);
        assert_eq!(serial("off"), SerialMode::Off);
        assert_eq!(
            serial("file=out.log"),
            SerialMode::File(PathBuf::from("out.log"))
        );
        let e = |v: &str| err(&["--kernel", "k", "--serial", v]);
        assert_eq!(e("file="), "--serial: file= needs a path");
        assert_eq!(
            e("pty"),
            "--serial: unknown mode \"pty\" (expected tty, off or file=PATH)"
        );
        assert_eq!(
            e("TTY"),
            "--serial: unknown mode \"TTY\" (expected tty, off or file=PATH)"
        );
    }

    #[test]
    fn control() {
        let control = |v: &[&str]| {
            let mut list = vec!["--kernel", "k", "--serial", "off", "--control"];
            list.extend_from_slice(v);
            run(&list).control
        };
        assert_eq!(
            control(&["/tmp/ctl"]),
            Some(ControlEndpoint::Socket(PathBuf::from("/tmp/ctl")))
        );
        assert_eq!(
            control(&["./fd=3"]),
            Some(ControlEndpoint::Socket(PathBuf::from("./fd=3")))
        );
        assert_eq!(
            control(&["fd=3"]),
            Some(ControlEndpoint::Fd { read: 3, write: 3 })
        );
        assert_eq!(
            control(&["fd=0,1"]),
            Some(ControlEndpoint::Fd { read: 0, write: 1 })
        );
        assert_eq!(
            control(&["fd=2147483647"]),
            Some(ControlEndpoint::Fd {
                read: i32::MAX,
                write: i32::MAX
            })
        );

        let e = |v: &str| err(&["--kernel", "k", "--serial", "off", "--control", v]);
        assert_eq!(
            e("fd="),
            "--control: fd= needs a descriptor number (fd=N or fd=IN,OUT)"
        );
        assert_eq!(
            e("fd=-1"),
            "--control: fd=-1 is invalid, file descriptors are 0 or more"
        );
        assert_eq!(
            e("fd=3,-4"),
            "--control: fd=-4 is invalid, file descriptors are 0 or more"
        );
        assert_eq!(e("fd=x"), "--control: fd=x is not a number");
        assert_eq!(e("fd=3,"), "--control: fd= is not a number");
        assert_eq!(e("fd=2147483648"), "--control: fd=2147483648 is too large");
        assert_eq!(
            e("fd=3,4,5"),
            "--control: expected fd=N or fd=IN,OUT, got \"fd=3,4,5\""
        );
    }

    #[test]
    fn control_on_stdio_conflicts_with_serial_tty() {
        assert_eq!(
            err(&["--kernel", "k", "--control", "fd=0,4"]),
            "--control: fd=0 is used by --serial tty for the guest console (add --serial off or --serial file=PATH)"
        );
        assert_eq!(
            err(&["--control", "fd=3,1", "--kernel", "k"]),
            "--control: fd=1 is used by --serial tty for the guest console (add --serial off or --serial file=PATH)"
        );
        assert_eq!(
            run(&["--kernel", "k", "--control", "fd=3,4"]).control,
            Some(ControlEndpoint::Fd { read: 3, write: 4 })
        );
    }

    #[test]
    fn seccomp_and_log_level() {
        assert!(run(&["--kernel", "k", "--seccomp", "on"]).seccomp);
        assert!(!run(&["--kernel", "k", "--seccomp=off"]).seccomp);
        assert_eq!(
            err(&["--kernel", "k", "--seccomp", "no"]),
            "--seccomp: expected on or off, got \"no\""
        );
        for (text, level) in [
            ("error", log::LevelFilter::Error),
            ("warn", log::LevelFilter::Warn),
            ("Info", log::LevelFilter::Info),
            ("debug", log::LevelFilter::Debug),
        ] {
            assert_eq!(
                run(&["--kernel", "k", "--log-level", text]).log_level,
                level
            );
        }
        assert_eq!(
            err(&["--kernel", "k", "--log-level", "verbose"]),
            "--log-level: unknown level \"verbose\" (expected error, warn, info or debug)"
        );
    }
}

//! The parser over the option table ([`super::options::TABLE`]), the rules that involve several
//! options, and [`validate`] for configurations built in code.

use std::path::PathBuf;

use super::options::{declared, lookup, Action, Takes, TABLE};
use super::values::invalid;
use super::{Command, ConfigError, ControlEndpoint, SerialMode, VmConfig};
use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, MAX_VIRTIO_DEVICES};

/// Parses the command line (without `argv[0]`).
///
/// `-h`/`--help` and `-V`/`--version` end parsing where they appear. Everything is validated
/// except that files exist: see the module documentation for the rules.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, ConfigError> {
    let mut args = args.into_iter();
    let mut seen = [false; TABLE.len()];
    let mut config = VmConfig::new(PathBuf::new());

    while let Some(arg) = args.next() {
        let (name, inline) = if arg.starts_with("--") {
            match arg.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (arg.as_str(), None),
            }
        } else if arg.starts_with('-') && arg.len() > 1 {
            (arg.as_str(), None)
        } else {
            return Err(ConfigError::UnexpectedArgument(arg));
        };
        let (index, opt) =
            lookup(name).ok_or_else(|| ConfigError::UnknownOption(name.to_string()))?;
        let flag = opt.name;

        let next;
        let value = match (opt.takes, inline) {
            (Takes::Nothing, Some(_)) => return Err(ConfigError::UnexpectedValue(flag)),
            (Takes::Nothing, None) => "",
            (_, Some(value)) => value,
            (_, None) => match args.next() {
                Some(v) if !v.starts_with("--") => {
                    next = v;
                    next.as_str()
                }
                _ => return Err(ConfigError::MissingValue(flag)),
            },
        };
        if value.is_empty() && opt.takes == Takes::Value {
            return Err(ConfigError::EmptyValue(flag));
        }

        if seen[index] && !opt.repeatable {
            return Err(ConfigError::Duplicate(flag));
        }
        seen[index] = true;

        match opt.action {
            Action::Help => return Ok(Command::Help),
            Action::Version => return Ok(Command::Version),
            Action::Set(set) => set(&mut config, flag, value)?,
        }
    }

    if let Some((opt, _)) = TABLE.iter().zip(seen).find(|(o, seen)| o.required && !seen) {
        return Err(ConfigError::MissingOption(opt.name));
    }
    for rule in ACROSS {
        rule(&config)?;
    }
    Ok(Command::Run(Box::new(config)))
}

/// Checks a configuration built in code (e.g. by [`crate::control::api::VmBuilder`]) against the
/// rules the command line applies, with the same messages: each option's rules as declared in
/// its table entry, then the rules that involve several options.
pub fn validate(config: &VmConfig) -> Result<(), ConfigError> {
    for opt in &TABLE {
        (opt.check)(config, opt.name)?;
    }
    for rule in ACROSS {
        rule(config)?;
    }
    Ok(())
}

/// A rule over a whole configuration.
type Rule = fn(&VmConfig) -> Result<(), ConfigError>;

/// The rules that involve several options, in the order the command line reports them.
const ACROSS: [Rule; 3] = [
    check_stdio_conflict,
    check_virtio_count,
    check_cmdline_length,
];

/// `--serial tty` owns stdin and stdout; a control pipe on those descriptors would fight over them.
fn check_stdio_conflict(config: &VmConfig) -> Result<(), ConfigError> {
    const CONTROL: &str = declared("--control");
    const SERIAL: &str = declared("--serial");
    if config.serial != SerialMode::Tty {
        return Ok(());
    }
    if let Some(ControlEndpoint::Fd { read, write }) = config.control {
        for fd in [read, write] {
            if fd == libc::STDIN_FILENO || fd == libc::STDOUT_FILENO {
                return Err(invalid(
                    CONTROL,
                    format!(
                        "fd={fd} is used by {SERIAL} tty for the guest console (add {SERIAL} off or {SERIAL} file=PATH)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Every virtio device needs its own interrupt line.
fn check_virtio_count(config: &VmConfig) -> Result<(), ConfigError> {
    const DISK: &str = declared("--disk");
    let n = config.disks.len() + usize::from(config.vsock.is_some());
    if n > MAX_VIRTIO_DEVICES {
        return Err(invalid(
            DISK,
            format!(
                "{n} virtio devices (disks and vsock together), at most {MAX_VIRTIO_DEVICES} fit"
            ),
        ));
    }
    Ok(())
}

/// The kernel command line with minivmm's additions must fit the guest's 2048-byte buffer.
fn check_cmdline_length(config: &VmConfig) -> Result<(), ConfigError> {
    const CMDLINE: &str = declared("--cmdline");
    let max = CMDLINE_MAX_SIZE - 1;
    let full = config.kernel_cmdline();
    if full.len() <= max {
        return Ok(());
    }
    let additions = config.cmdline_additions().join(" ");
    Err(invalid(
        CMDLINE,
        format!(
            "{} bytes plus the {} bytes minivmm appends ({additions:?}) is too long, at most {max} bytes fit",
            config.cmdline.len(),
            full.len() - config.cmdline.len()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{args, err, run};
    use crate::config::*;
    use std::path::PathBuf;
    use std::time::Duration;

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
            control: Some(ControlEndpoint::Socket(PathBuf::from("/run/vm.sock"))),
            seccomp: false,
            log_level: log::LevelFilter::Debug,
            // No disks, no vsock (see their own tests), and an option added later at its default.
            ..VmConfig::new(PathBuf::new())
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

    /// Each rule a configuration built in code can break is refused by `validate()`, with the
    /// message the command line gives for the same value where it can write one.
    #[test]
    fn validate_refuses_each_rule() {
        type Change = fn(&mut VmConfig);
        let window = |c: &mut VmConfig| c.memory.hotplug_size = 1 << 30;
        let cases: &[(Change, &str, &[&str])] = &[
            (|c| c.kernel = PathBuf::new(), "--kernel: empty value", &["--kernel="]),
            (|c| c.initramfs = Some(PathBuf::new()), "--initramfs: empty value", &["--initramfs="]),
            (|c| c.cmdline = "x".repeat(2048), "--cmdline: 2048 bytes is too long, at most 2047 bytes fit", &[]),
            (|c| c.cpus.boot = 0, "--cpus: boot=0 is invalid, need at least 1 vCPU", &["--cpus=boot=0"]),
            (|c| c.cpus = CpuConfig { boot: 2, max: 0 }, "--cpus: max=0 is invalid, need at least 1 vCPU", &["--cpus=boot=2,max=0"]),
            (|c| c.cpus = CpuConfig { boot: 3, max: 2 }, "--cpus: max=2 is less than boot=3", &["--cpus=boot=3,max=2"]),
            (|c| c.cpus = CpuConfig { boot: 255, max: 255 }, "--cpus: boot=255 exceeds the maximum of 254 vCPUs", &["--cpus=boot=255"]),
            (|c| c.cpus.max = 255, "--cpus: max=255 exceeds the maximum of 254 vCPUs", &["--cpus=max=255"]),
            (|c| c.memory.size = 32 << 20, "--memory: size=32M is too small, need at least 64M", &["--memory=size=32M"]),
            (|c| c.memory.size = 100_000 << 10, "--memory: size=100000K is not a multiple of 1M", &["--memory=size=100000K"]),
            (|c| c.memory.hotplug_size = 100 << 20, "--memory: hotplug_size=100M is not a multiple of 128M", &["--memory=hotplug_size=100M"]),
            (|c| c.memory.size = 2 << 40, "--memory: size=2T exceeds the supported 1T of guest memory", &["--memory=size=2T"]),
            (
                |c| c.memory = MemoryConfig { size: 1 << 40, hotplug_size: 128 << 20, ..c.memory },
                "--memory: size=1T plus hotplug_size=128M exceeds the supported 1T of guest memory",
                &["--memory=size=1T,hotplug_size=128M"],
            ),
            (
                |c| c.memory.removable = true,
                "--memory: removable=on needs a hotplug window (hotplug_size=SIZE): only hot-added RAM can be removed",
                &["--memory=removable=on"],
            ),
            (
                |c| c.memory = MemoryConfig { hotplug_size: 1 << 30, removable: true, remove_timeout: Duration::ZERO, ..c.memory },
                "--memory: remove_timeout=0: expected whole seconds from 1 to 3600",
                &["--memory=hotplug_size=1G,removable=on,remove_timeout=0"],
            ),
            (
                |c| c.memory = MemoryConfig { hotplug_size: 1 << 30, removable: true, remove_timeout: Duration::from_millis(1500), ..c.memory },
                "--memory: remove_timeout=1.5s: expected whole seconds from 1 to 3600",
                &[],
            ),
            (
                |c| c.disks.push(DiskConfig { path: PathBuf::new(), readonly: false }),
                "--disk: path= is required",
                &[],
            ),
            (
                |c| c.vsock = Some(VsockConfig { cid: 2, socket: "/s".into() }),
                "--vsock: cid=2 is invalid (expected a number from 3 to 4294967294; 0-2 are reserved)",
                &["--vsock=cid=2,socket=/s"],
            ),
            (
                |c| c.vsock = Some(VsockConfig { cid: 3, socket: PathBuf::new() }),
                "--vsock: socket= is required",
                &[],
            ),
            (|c| c.serial = SerialMode::File(PathBuf::new()), "--serial: file= needs a path", &["--serial=file="]),
            (|c| c.dump_acpi = Some(PathBuf::new()), "--dump-acpi: empty value", &["--dump-acpi="]),
            (|c| c.control = Some(ControlEndpoint::Socket(PathBuf::new())), "--control: empty value", &["--control="]),
            (
                |c| c.control = Some(ControlEndpoint::Fd { read: 3, write: -4 }),
                "--control: fd=-4 is invalid, file descriptors are 0 or more",
                &["--control=fd=3,-4"],
            ),
            (
                |c| c.exit_device = Some(ExitDeviceConfig { iobase: 0xf4, iosize: 3 }),
                "--exit-device: iosize=3 is invalid (expected 1, 2 or 4)",
                &["--exit-device=iobase=0xf4,iosize=3"],
            ),
            (
                |c| c.exit_device = Some(ExitDeviceConfig { iobase: 0xfffe, iosize: 4 }),
                "--exit-device: ports 0xfffe..0x10002 run past 0xffff",
                &["--exit-device=iobase=0xfffe,iosize=4"],
            ),
            (
                |c| c.exit_device = Some(ExitDeviceConfig { iobase: 0x3f8, iosize: 2 }),
                "--exit-device: ports 0x3f8..0x3fa overlap the COM1 ports minivmm emulates",
                &["--exit-device=iobase=0x3f8"],
            ),
            (|c| c.timeout = Some(Duration::ZERO), "--timeout: 0ns is zero; give a positive duration", &[]),
            (
                |c| c.timeout = Some(MAX_TIMEOUT + Duration::from_secs(3600)),
                "--timeout: 31539600s is too long (at most 8760h)",
                &[],
            ),
            // The rules across options.
            (
                |c| c.control = Some(ControlEndpoint::Fd { read: 0, write: 4 }),
                "--control: fd=0 is used by --serial tty for the guest console (add --serial off or --serial file=PATH)",
                &["--control=fd=0,4"],
            ),
            (
                |c| c.disks = vec![DiskConfig { path: "/d".into(), readonly: false }; 8],
                "--disk: 8 virtio devices (disks and vsock together), at most 7 fit",
                &[],
            ),
            (
                |c| {
                    c.cmdline = "y".repeat(2030);
                    c.memory.hotplug_size = 1 << 30;
                },
                "--cmdline: 2030 bytes plus the 27 bytes minivmm appends (\"memhp_default_state=online\") is too long, at most 2047 bytes fit",
                &[],
            ),
        ];
        for (change, want, cli) in cases {
            let mut c = VmConfig::new("k".into());
            change(&mut c);
            let got = validate(&c).map_err(|e| e.to_string());
            assert_eq!(got, Err(want.to_string()), "{c:?}");
            if !cli.is_empty() {
                let mut list = vec!["--kernel", "k"];
                list.extend_from_slice(cli);
                if cli[0].starts_with("--kernel") {
                    list = cli.to_vec();
                }
                assert_eq!(&err(&list), want, "{list:?}");
            }
        }
        // What the rules allow passes; a removal timeout counts only for removable memory.
        let mut c = VmConfig::new("k".into());
        assert_eq!(validate(&c), Ok(()));
        window(&mut c);
        c.memory.remove_timeout = Duration::ZERO;
        assert_eq!(validate(&c), Ok(()));
    }

    /// Whatever the command line accepts, `validate()` accepts.
    #[test]
    fn validate_accepts_parsed_configurations() {
        for list in [
            &["--kernel", "k"][..],
            &["--kernel", "k", "--cpus", "boot=254", "--memory", "size=1T"],
            &[
                "--kernel",
                "k",
                "--memory",
                "hotplug_size=1G,removable=on,remove_timeout=3600",
            ],
            &[
                "--kernel",
                "k",
                "--exit-device",
                "iobase=0xfffc,iosize=4",
                "--timeout",
                "8760h",
            ],
            &[
                "--kernel",
                "k",
                "--serial",
                "off",
                "--control",
                "fd=0,1",
                "--cmdline",
                "",
            ],
            &[
                "--kernel",
                "k",
                "--vsock",
                "cid=4294967294,socket=/s",
                "--log-level",
                "debug",
            ],
        ] {
            assert_eq!(validate(&run(list)), Ok(()), "{list:?}");
        }
    }
}

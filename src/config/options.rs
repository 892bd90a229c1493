//! The command-line options, each declared once in [`OPTIONS`]: its name, how it takes a value,
//! whether it may repeat or is required, its `--help` lines, how its value is stored in a
//! [`VmConfig`], and the rules [`super::validate`] applies to a configuration built in code.
//! The parser ([`super::parse_args`]), the usage text ([`USAGE`], laid out at compile time), the
//! error messages (which name the option) and `validate()` all read this table.
//!
//! Adding an option is one entry here (plus its field in [`VmConfig`]).

use super::cpus_memory::{check_cpus, check_memory, parse_cpus, parse_memory, CPUS_SYNTAX};
use super::devices::{
    check_disks, check_exit_device, check_vsock, parse_disk, parse_exit_device, parse_vsock,
    DISK_SYNTAX, VSOCK_SYNTAX,
};
use super::values::{
    check_cmdline, check_control, check_path, check_serial, check_timeout, parse_control,
    parse_log_level, parse_on_off, parse_serial, parse_timeout,
};
use super::{ConfigError, VmConfig};

/// Stores an option's value (given with the option's name, for messages) in the configuration.
pub(super) type SetFn = fn(&mut VmConfig, &'static str, &str) -> Result<(), ConfigError>;
/// Applies an option's rules to a configuration built in code (given the option's name).
pub(super) type CheckFn = fn(&VmConfig, &'static str) -> Result<(), ConfigError>;

/// How an option takes a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Takes {
    /// None: a flag (`--no-reboot`); `--flag=VALUE` is refused.
    Nothing,
    /// A value that may not be empty.
    Value,
    /// A value that may be empty (`--cmdline ""`).
    MaybeEmpty,
}

/// What an option does.
#[derive(Debug, Clone, Copy)]
pub(super) enum Action {
    /// Stops parsing: print the usage text.
    Help,
    /// Stops parsing: print the version.
    Version,
    /// Stores the value in the configuration.
    Set(SetFn),
}

/// What the parser and [`super::validate`] read of an option: its declaration less the help
/// lines, which only [`USAGE`] needs (so that they are not in the binary twice).
#[derive(Debug, Clone, Copy)]
pub(super) struct Opt {
    /// The long name, `--name`, used in every message about the option.
    pub(super) name: &'static str,
    /// A short alias (`-h`), shown before the long name in `--help`.
    pub(super) short: Option<&'static str>,
    /// Whether and how it takes a value.
    pub(super) takes: Takes,
    /// It may be given more than once (each value is stored in turn).
    pub(super) repeatable: bool,
    /// The command line must give it.
    pub(super) required: bool,
    /// What it does.
    pub(super) action: Action,
    /// Its rules, for [`super::validate`].
    pub(super) check: CheckFn,
}

/// One command-line option, as declared.
#[derive(Debug, Clone, Copy)]
pub(super) struct OptSpec {
    /// Everything but the help lines.
    pub(super) opt: Opt,
    /// Its `--help` entries: (what follows the name, the description). A description starts on
    /// the line of the name when that ends before [`HELP_COLUMN`], else on the next line; each
    /// `\n` in it continues at that column.
    pub(super) help: &'static [(&'static str, &'static str)],
}

/// No rules for configurations built in code.
fn no_rules(_: &VmConfig, _: &'static str) -> Result<(), ConfigError> {
    Ok(())
}

impl OptSpec {
    /// An option with a non-empty value and no rules beyond its parser.
    const fn value(
        name: &'static str,
        help: &'static [(&'static str, &'static str)],
        set: SetFn,
    ) -> Self {
        let opt = Opt {
            name,
            short: None,
            takes: Takes::Value,
            repeatable: false,
            required: false,
            action: Action::Set(set),
            check: no_rules,
        };
        OptSpec { opt, help }
    }

    /// A flag: an option without a value.
    const fn flag(
        name: &'static str,
        help: &'static [(&'static str, &'static str)],
        action: Action,
    ) -> Self {
        let spec = OptSpec::value(name, help, |_, _, _| Ok(()));
        spec.with(Opt {
            takes: Takes::Nothing,
            action,
            ..spec.opt
        })
    }

    const fn with(self, opt: Opt) -> Self {
        OptSpec { opt, ..self }
    }

    /// The rules a configuration built in code must follow.
    const fn check(self, check: CheckFn) -> Self {
        self.with(Opt { check, ..self.opt })
    }

    /// The value may be empty.
    const fn may_be_empty(self) -> Self {
        self.with(Opt {
            takes: Takes::MaybeEmpty,
            ..self.opt
        })
    }

    /// The option may repeat.
    const fn repeatable(self) -> Self {
        self.with(Opt {
            repeatable: true,
            ..self.opt
        })
    }

    /// The command line must give the option.
    const fn required(self) -> Self {
        self.with(Opt {
            required: true,
            ..self.opt
        })
    }

    /// A short alias.
    const fn short(self, short: &'static str) -> Self {
        self.with(Opt {
            short: Some(short),
            ..self.opt
        })
    }
}

/// Every option, in `--help` order.
pub(super) const OPTIONS: &[OptSpec] = &[
    OptSpec::value(
        "--kernel",
        &[("PATH", "guest kernel, bzImage or ELF vmlinux (required)")],
        |c, _, v| {
            c.kernel = v.into();
            Ok(())
        },
    )
    .required()
    .check(|c, flag| check_path(flag, &c.kernel)),
    OptSpec::value(
        "--initramfs",
        &[("PATH", "initramfs image handed to the kernel")],
        |c, _, v| {
            c.initramfs = Some(v.into());
            Ok(())
        },
    )
    .check(|c, flag| {
        c.initramfs
            .as_deref()
            .map_or(Ok(()), |p| check_path(flag, p))
    }),
    OptSpec::value(
        "--cmdline",
        &[(
            "\"ARGS\"",
            "kernel command line\n(default: \"console=ttyS0 reboot=k panic=1 pci=off\")",
        )],
        |c, flag, v| {
            check_cmdline(flag, v)?;
            c.cmdline = v.to_string();
            Ok(())
        },
    )
    .may_be_empty()
    .check(|c, flag| check_cmdline(flag, &c.cmdline)),
    OptSpec::value(
        "--cpus",
        &[(
            CPUS_SYNTAX,
            "vCPUs at boot and the most vCPUs hotplug may reach,\n\
             1 <= N <= M <= 254 (default: boot=1, max=boot)",
        )],
        |c, flag, v| {
            c.cpus = parse_cpus(flag, v)?;
            Ok(())
        },
    )
    .check(|c, flag| check_cpus(flag, &c.cpus)),
    OptSpec::value(
        "--memory",
        &[(
            "size=SIZE[,hotplug_size=SIZE][,thp=on|off][,removable=on|off]\n           \
             [,remove_timeout=SECS]",
            "boot RAM (at least 64M, a multiple of 1M) and the\n\
             window reserved for hot-added RAM (a multiple of\n\
             128M); together at most 1T; thp: advise\n\
             transparent huge pages for guest RAM; removable:\n\
             hot-added RAM is onlined movable and a shrink\n\
             takes it back live, each slot given up after\n\
             remove_timeout seconds without the guest's eject\n\
             (default: size=512M, hotplug_size=0, thp=on,\n\
             removable=off, remove_timeout=30)",
        )],
        |c, flag, v| {
            c.memory = parse_memory(flag, v)?;
            Ok(())
        },
    )
    .check(|c, flag| check_memory(flag, &c.memory)),
    OptSpec::value(
        "--disk",
        &[(
            DISK_SYNTAX,
            "a raw disk image as a virtio-blk device (/dev/vda,\n\
             /dev/vdb, ... in the order given; repeatable)",
        )],
        |c, flag, v| {
            c.disks.push(parse_disk(flag, v)?);
            Ok(())
        },
    )
    .repeatable()
    .check(|c, flag| check_disks(flag, &c.disks)),
    OptSpec::value(
        "--vsock",
        &[(
            VSOCK_SYNTAX,
            "a virtio-vsock device with guest CID N (3 or more),\n\
             host side on the unix socket PATH (Firecracker's\n\
             hybrid vsock: connect and send \"CONNECT <port>\\n\";\n\
             guest connections to port P go to PATH_P)",
        )],
        |c, flag, v| {
            c.vsock = Some(parse_vsock(flag, v)?);
            Ok(())
        },
    )
    .check(|c, flag| c.vsock.as_ref().map_or(Ok(()), |v| check_vsock(flag, v))),
    OptSpec::value(
        "--serial",
        &[(
            "tty|off|file=PATH",
            "guest COM1: connected to stdin/stdout, disabled, or\n\
             written to the file PATH (default: tty)",
        )],
        |c, flag, v| {
            c.serial = parse_serial(flag, v)?;
            Ok(())
        },
    )
    .check(|c, flag| check_serial(flag, &c.serial)),
    OptSpec::flag(
        "--no-reboot",
        &[(
            "",
            "when the guest reboots, exit with status 2 instead\nof rebooting it",
        )],
        Action::Set(|c, _, _| {
            c.no_reboot = true;
            Ok(())
        }),
    ),
    OptSpec::value(
        "--dump-acpi",
        &[("DIR", "write the generated ACPI tables to DIR as *.dat")],
        |c, _, v| {
            c.dump_acpi = Some(v.into());
            Ok(())
        },
    )
    .check(|c, flag| {
        c.dump_acpi
            .as_deref()
            .map_or(Ok(()), |p| check_path(flag, p))
    }),
    OptSpec::value(
        "--control",
        &[
            ("PATH", "control pipe on the unix socket PATH"),
            ("fd=N", "control pipe on the inherited descriptor N"),
            (
                "fd=IN,OUT",
                "control pipe reading requests from descriptor IN\n\
                 and writing replies to descriptor OUT",
            ),
        ],
        |c, flag, v| {
            c.control = Some(parse_control(flag, v)?);
            Ok(())
        },
    )
    .check(|c, flag| {
        c.control
            .as_ref()
            .map_or(Ok(()), |e| check_control(flag, e))
    }),
    OptSpec::value(
        "--seccomp",
        &[(
            "on|off",
            "system call filtering (default: on); off is UNSAFE\n\
             and meant for debugging only",
        )],
        |c, flag, v| {
            c.seccomp = parse_on_off(flag, v)?;
            Ok(())
        },
    ),
    OptSpec::value(
        "--log-level",
        &[("LEVEL", "error, warn, info or debug (default: warn)")],
        |c, flag, v| {
            c.log_level = parse_log_level(flag, v)?;
            Ok(())
        },
    ),
    OptSpec::value(
        "--exit-device",
        &[(
            "on|off|iobase=PORT[,iosize=N]",
            "guest exit device compatible with QEMU's\n\
             isa-debug-exit: writing V exits with (V<<1)|1\n\
             (on: iobase=0x501,iosize=2; default: off)",
        )],
        |c, flag, v| {
            c.exit_device = parse_exit_device(flag, v)?;
            Ok(())
        },
    )
    .check(|c, flag| {
        c.exit_device
            .as_ref()
            .map_or(Ok(()), |d| check_exit_device(flag, d))
    }),
    OptSpec::value(
        "--pvpanic",
        &[(
            "on|off",
            "pvpanic device at port 0x505 (ACPI QEMU0001): a\n\
             guest panic exits with status 4 (default: on)",
        )],
        |c, flag, v| {
            c.pvpanic = parse_on_off(flag, v)?;
            Ok(())
        },
    ),
    OptSpec::value(
        "--timeout",
        &[(
            "DURATION",
            "stop the guest after DURATION (e.g. 500ms, 30s,\n\
             5m, 1h; a bare number is seconds), exit status 124",
        )],
        |c, flag, v| {
            c.timeout = Some(parse_timeout(flag, v)?);
            Ok(())
        },
    )
    .check(|c, flag| match c.timeout {
        Some(t) => check_timeout(flag, t, &format!("{t:?}")).map(|_| ()),
        None => Ok(()),
    }),
    OptSpec::value(
        "--cpu-online-events",
        &[(
            "on|off",
            "report vCPUs coming online (a KVM MSR filter on\n\
             IA32_LSTAR writes; default: off)",
        )],
        |c, flag, v| {
            c.cpu_online_events = parse_on_off(flag, v)?;
            Ok(())
        },
    ),
    OptSpec::value(
        "--pit",
        &[(
            "on|off",
            "in-kernel i8254 PIT for guests that need one (Linux\n\
             on KVM does not; destroying it costs ~24 ms at\n\
             exit and reboot; default: off)",
        )],
        |c, flag, v| {
            c.pit = parse_on_off(flag, v)?;
            Ok(())
        },
    ),
    OptSpec::flag("--help", &[("", "print this help and exit")], Action::Help).short("-h"),
    OptSpec::flag(
        "--version",
        &[("", "print the version and exit")],
        Action::Version,
    )
    .short("-V"),
];

/// The options as the parser and [`super::validate`] read them, in [`OPTIONS`] order.
pub(super) static TABLE: [Opt; OPTIONS.len()] = {
    let mut table = [OPTIONS[0].opt; OPTIONS.len()];
    let mut i = 0;
    while i < OPTIONS.len() {
        table[i] = OPTIONS[i].opt;
        i += 1;
    }
    table
};

/// The option named `name` (its long name or its short alias), with its index in [`TABLE`].
pub(super) fn lookup(name: &str) -> Option<(usize, &'static Opt)> {
    TABLE
        .iter()
        .enumerate()
        .find(|(_, o)| o.name == name || o.short == Some(name))
}

/// `name`, checked at compile time to be a declared option's long name: for the rules that
/// involve several options and name them in their messages.
pub(super) const fn declared(name: &'static str) -> &'static str {
    let mut i = 0;
    while i < OPTIONS.len() {
        if same(OPTIONS[i].opt.name, name) {
            return name;
        }
        i += 1;
    }
    panic!("not a declared option")
}

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The column at which option descriptions start in `--help`.
pub(super) const HELP_COLUMN: usize = 29;

const USAGE_HEAD: &str = "\
Usage: minivmm --kernel PATH [OPTIONS]

A minimal KVM virtual machine monitor for x86_64 Linux guests, with ACPI CPU and
memory hotplug driven through a control pipe.

Options:
";

const USAGE_TAIL: &str = "
Every option also accepts the form --option=VALUE (needed when VALUE starts
with \"--\"). SIZE is a byte count with an optional K, M, G or T suffix (binary
units, any case), optionally followed by B or iB: 512M, 1536MiB, 2g.
";

/// Text written at compile time into a buffer that may be too small (then only counted).
struct Out<'a> {
    buf: &'a mut [u8],
    len: usize,
    col: usize,
}

impl Out<'_> {
    const fn byte(&mut self, b: u8) {
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
        }
        self.len += 1;
        self.col = if b == b'\n' { 0 } else { self.col + 1 };
    }

    const fn text(&mut self, s: &str) {
        let bytes = s.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            self.byte(bytes[i]);
            i += 1;
        }
    }

    const fn pad_to(&mut self, col: usize) {
        while self.col < col {
            self.byte(b' ');
        }
    }
}

/// Lays the usage text out into `buf` (as much as fits) and returns its length.
const fn render_usage(buf: &mut [u8]) -> usize {
    let mut out = Out {
        buf,
        len: 0,
        col: 0,
    };
    out.text(USAGE_HEAD);
    let mut i = 0;
    while i < OPTIONS.len() {
        let (opt, help) = (&OPTIONS[i].opt, OPTIONS[i].help);
        let mut j = 0;
        while j < help.len() {
            let (synopsis, about) = help[j];
            out.text("  ");
            if let Some(short) = opt.short {
                out.text(short);
                out.text(", ");
            }
            out.text(opt.name);
            if !synopsis.is_empty() {
                out.text(" ");
                out.text(synopsis);
            }
            if out.col >= HELP_COLUMN {
                out.text("\n");
            }
            out.pad_to(HELP_COLUMN);
            let about = about.as_bytes();
            let mut k = 0;
            while k < about.len() {
                out.byte(about[k]);
                if about[k] == b'\n' {
                    out.pad_to(HELP_COLUMN);
                }
                k += 1;
            }
            out.text("\n");
            j += 1;
        }
        i += 1;
    }
    out.text(USAGE_TAIL);
    out.len
}

const USAGE_LEN: usize = render_usage(&mut []);

const USAGE_BYTES: [u8; USAGE_LEN] = {
    let mut bytes = [0; USAGE_LEN];
    render_usage(&mut bytes);
    bytes
};

/// The help text printed by `--help`, laid out at compile time from the option declarations.
pub const USAGE: &str = match std::str::from_utf8(&USAGE_BYTES) {
    Ok(text) => text,
    Err(_) => panic!("the usage text is not UTF-8"),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CMDLINE;

    #[test]
    fn usage_documents_every_option_and_default() {
        for OptSpec { opt, help } in OPTIONS {
            let start = match opt.short {
                Some(short) => format!("  {short}, {}", opt.name),
                None => format!("  {}", opt.name),
            };
            let lines = USAGE.lines().filter(|l| l.starts_with(&start)).count();
            assert_eq!(lines, help.len(), "{}: one line per help entry", opt.name);
        }
        assert!(USAGE.contains(DEFAULT_CMDLINE));
        assert!(USAGE.contains("-h, --help") && USAGE.contains("-V, --version"));
        assert!(USAGE.lines().all(|l| l.len() <= 80));
    }

    #[test]
    fn declarations_are_consistent() {
        let mut names = Vec::new();
        for OptSpec { opt, help } in OPTIONS {
            assert!(opt.name.starts_with("--"), "{}", opt.name);
            names.push(opt.name);
            if let Some(short) = opt.short {
                assert!(short.len() == 2 && short.starts_with('-'), "{short}");
                names.push(short);
            }
            assert!(!help.is_empty(), "{}: no help", opt.name);
            for (synopsis, about) in help.iter() {
                assert!(!about.is_empty(), "{}: no description", opt.name);
                assert_eq!(
                    synopsis.is_empty(),
                    opt.takes == Takes::Nothing,
                    "{}: a synopsis exactly when it takes a value",
                    opt.name
                );
            }
            assert_eq!(lookup(opt.name).map(|(_, o)| o.name), Some(opt.name));
        }
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "names are unique");
        let required: Vec<_> = TABLE
            .iter()
            .filter(|o| o.required)
            .map(|o| o.name)
            .collect();
        assert_eq!(required, ["--kernel"]);
        assert!(USAGE.starts_with("Usage: minivmm --kernel PATH [OPTIONS]"));
        assert_eq!(declared("--pit"), "--pit");
    }

    /// Every sub-key a parser accepts is shown in its option's synopsis.
    #[test]
    fn sub_keys_are_documented() {
        use crate::config::cpus_memory::{CPUS_KEYS, MEMORY_KEYS};
        use crate::config::devices::{DISK_KEYS, EXIT_DEVICE_KEYS, VSOCK_KEYS};
        for (name, keys) in [
            ("--cpus", &CPUS_KEYS[..]),
            ("--memory", &MEMORY_KEYS),
            ("--disk", &DISK_KEYS),
            ("--vsock", &VSOCK_KEYS),
            ("--exit-device", &EXIT_DEVICE_KEYS),
        ] {
            let Some(spec) = OPTIONS.iter().find(|s| s.opt.name == name) else {
                panic!("{name} is not declared");
            };
            for key in keys {
                let shown = spec
                    .help
                    .iter()
                    .any(|(s, _)| s.contains(&format!("{key}=")));
                assert!(shown, "{name}: {key}= is not in --help");
            }
        }
    }

    /// `--help` shows `--memory`'s value as its messages do, in two lines.
    #[test]
    fn memory_synopsis_is_the_messages_syntax() {
        use crate::config::cpus_memory::MEMORY_SYNTAX;
        let Some(spec) = OPTIONS.iter().find(|s| s.opt.name == "--memory") else {
            panic!("--memory is not declared");
        };
        let joined: String = spec.help[0].0.split_whitespace().collect();
        assert_eq!(joined, MEMORY_SYNTAX);
    }

    /// Descriptions start at the help column, continuation lines included.
    #[test]
    fn descriptions_line_up() {
        for OptSpec { opt, help } in OPTIONS {
            for (_, about) in help.iter() {
                for line in about.lines() {
                    let at_column = USAGE.lines().any(|l| {
                        l.get(HELP_COLUMN..) == Some(line) && l[..HELP_COLUMN].ends_with(' ')
                    });
                    assert!(
                        at_column,
                        "{}: {line:?} is not at column {HELP_COLUMN}",
                        opt.name
                    );
                }
            }
        }
    }
}

//! Value syntax shared by the options (`key=value` lists, `on|off`, numbers, descriptors, ports,
//! durations) and the options whose values are simple: `--cmdline`, `--serial`, `--control`,
//! `--log-level`, `--timeout`, the path options.
//!
//! Each option's rules are functions over typed values (`check_*`) that its parser calls as it
//! reads the text, at the point where the message must come, and that [`super::validate`] calls on a
//! configuration built in code: a rule exists once. Messages show values as they were written on
//! the command line, or printed from the typed value for a configuration built in code.

use std::fmt::Display;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{ConfigError, ControlEndpoint, SerialMode, MAX_TIMEOUT};
use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;

/// An [`ConfigError::Invalid`] for `flag`.
pub(super) fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        reason: reason.into(),
    }
}

/// Splits `value` as `key=value[,key=value...]` over the allowed `keys`; returns one entry per key.
pub(super) fn parse_key_values<'a, const N: usize>(
    flag: &'static str,
    value: &'a str,
    keys: &[&'static str; N],
    syntax: &str,
) -> Result<[Option<&'a str>; N], ConfigError> {
    let mut found = [None; N];
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

/// An `on|off` value of `key` in a `key=value` list; `default` when the key is absent.
pub(super) fn key_on_off(
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

/// An option's own `on|off` value.
pub(super) fn parse_on_off(flag: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(invalid(flag, format!("expected on or off, got {value:?}"))),
    }
}

/// Parses a decimal count; `None` when it is not made of digits only, `Some(None)` on overflow.
pub(super) fn parse_decimal(s: &str) -> Option<Option<u64>> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse().ok())
}

/// A port number: decimal or `0x` hexadecimal.
pub(super) fn parse_port(flag: &'static str, key: &str, s: &str) -> Result<u16, ConfigError> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).ok()
        }
        Some(_) => None,
        None => parse_decimal(s).flatten(),
    };
    match parsed.and_then(|n| u16::try_from(n).ok()) {
        Some(port) => Ok(port),
        None => Err(invalid(
            flag,
            format!("{key}={s} is not a port number (0 to 0xffff, decimal or 0x hex)"),
        )),
    }
}

/// A path option's value given in code must not be empty, as on the command line.
pub(super) fn check_path(flag: &'static str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::EmptyValue(flag));
    }
    Ok(())
}

/// `--cmdline`: at most 2047 bytes, the guest's buffer less its NUL (see also the cross-option
/// rule that counts what minivmm appends).
pub(super) fn check_cmdline(flag: &'static str, cmdline: &str) -> Result<(), ConfigError> {
    let max = CMDLINE_MAX_SIZE - 1;
    if cmdline.len() > max {
        return Err(invalid(
            flag,
            format!(
                "{} bytes is too long, at most {max} bytes fit",
                cmdline.len()
            ),
        ));
    }
    Ok(())
}

/// `--serial tty|off|file=PATH`.
pub(super) fn parse_serial(flag: &'static str, value: &str) -> Result<SerialMode, ConfigError> {
    let mode = match value {
        "tty" => SerialMode::Tty,
        "off" => SerialMode::Off,
        _ => match value.strip_prefix("file=") {
            Some(path) => SerialMode::File(PathBuf::from(path)),
            None => {
                return Err(invalid(
                    flag,
                    format!("unknown mode {value:?} (expected tty, off or file=PATH)"),
                ))
            }
        },
    };
    check_serial(flag, &mode)?;
    Ok(mode)
}

/// `--serial file=` needs a path.
pub(super) fn check_serial(flag: &'static str, mode: &SerialMode) -> Result<(), ConfigError> {
    match mode {
        SerialMode::File(path) if path.as_os_str().is_empty() => {
            Err(invalid(flag, "file= needs a path"))
        }
        _ => Ok(()),
    }
}

/// File descriptors are 0 or more (`shown` is how the number was written).
fn negative_fd(flag: &'static str, shown: &dyn Display) -> ConfigError {
    invalid(
        flag,
        format!("fd={shown} is invalid, file descriptors are 0 or more"),
    )
}

fn parse_fd(flag: &'static str, s: &str) -> Result<RawFd, ConfigError> {
    if let Some(digits) = s.strip_prefix('-') {
        if parse_decimal(digits).is_some() {
            return Err(negative_fd(flag, &s));
        }
    }
    match parse_decimal(s) {
        None => Err(invalid(flag, format!("fd={s} is not a number"))),
        Some(n) => n
            .and_then(|n| RawFd::try_from(n).ok())
            .ok_or_else(|| invalid(flag, format!("fd={s} is too large"))),
    }
}

/// `--control PATH|fd=N|fd=IN,OUT`.
pub(super) fn parse_control(
    flag: &'static str,
    value: &str,
) -> Result<ControlEndpoint, ConfigError> {
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

/// A control endpoint given in code: a socket path that is not empty, descriptors that are 0 or
/// more.
pub(super) fn check_control(
    flag: &'static str,
    control: &ControlEndpoint,
) -> Result<(), ConfigError> {
    match control {
        ControlEndpoint::Socket(path) => check_path(flag, path),
        ControlEndpoint::Fd { read, write } => {
            match [*read, *write].into_iter().find(|fd| *fd < 0) {
                Some(fd) => Err(negative_fd(flag, &fd)),
                None => Ok(()),
            }
        }
    }
}

/// The levels `--log-level` offers, by name.
const LOG_LEVELS: [(&str, log::LevelFilter); 4] = [
    ("error", log::LevelFilter::Error),
    ("warn", log::LevelFilter::Warn),
    ("info", log::LevelFilter::Info),
    ("debug", log::LevelFilter::Debug),
];

fn unknown_level(flag: &'static str, shown: &str) -> ConfigError {
    invalid(
        flag,
        format!("unknown level {shown:?} (expected error, warn, info or debug)"),
    )
}

/// `--log-level LEVEL`, any case.
pub(super) fn parse_log_level(
    flag: &'static str,
    value: &str,
) -> Result<log::LevelFilter, ConfigError> {
    let lower = value.to_ascii_lowercase();
    LOG_LEVELS
        .iter()
        .find(|(name, _)| *name == lower)
        .map(|(_, level)| *level)
        .ok_or_else(|| unknown_level(flag, value))
}

/// Parses a DURATION: a decimal number with an optional `ms`, `s`, `m` or `h` suffix (seconds by
/// default), more than zero and at most [`MAX_TIMEOUT`].
pub(super) fn parse_timeout(flag: &'static str, value: &str) -> Result<Duration, ConfigError> {
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
pub(super) fn check_timeout(
    flag: &'static str,
    d: Duration,
    shown: &str,
) -> Result<Duration, ConfigError> {
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

#[cfg(test)]
mod tests {
    use crate::config::testing::{err, run};
    use crate::config::*;
    use std::path::PathBuf;
    use std::time::Duration;

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

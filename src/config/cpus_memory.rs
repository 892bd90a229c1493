//! `--cpus boot=N[,max=M]` and `--memory size=..,hotplug_size=..,thp=..,removable=..,remove_timeout=..`:
//! their sub-keys, parsers and rules. The parsers apply each rule as soon as the values it needs
//! are read (so the first problem written is the one reported); [`check_cpus`] and
//! [`check_memory`] apply the same rules, in the same order, to values built in code.

use std::fmt::{self, Display};
use std::time::Duration;

use super::size::{format_size, parse_size, SizeError};
use super::values::{invalid, key_on_off, parse_decimal, parse_key_values};
use super::{
    ConfigError, CpuConfig, MemoryConfig, DEFAULT_MEMORY_SIZE, DEFAULT_REMOVE_TIMEOUT,
    MAX_TOTAL_MEMORY, MEMORY_SIZE_ALIGN, MIN_MEMORY_SIZE,
};
use crate::arch::x86_64::layout::{MAX_VCPUS, MEMORY_HOTPLUG_ALIGN};

/// The sub-keys of `--cpus`.
pub(super) const CPUS_KEYS: [&str; 2] = ["boot", "max"];
/// The value of `--cpus`, as `--help` and the messages show it.
pub(super) const CPUS_SYNTAX: &str = "boot=N[,max=M]";
/// The sub-keys of `--memory`.
pub(super) const MEMORY_KEYS: [&str; 5] =
    ["size", "hotplug_size", "thp", "removable", "remove_timeout"];
/// The value of `--memory`, as the messages show it (`--help` breaks it in two lines).
pub(super) const MEMORY_SYNTAX: &str =
    "size=SIZE[,hotplug_size=SIZE][,thp=on|off][,removable=on|off][,remove_timeout=SECS]";
/// Largest `remove_timeout=` in seconds (one hour).
const MAX_REMOVE_TIMEOUT_SECS: u64 = 3600;

/// A vCPU count for `key`: at least 1, at most [`MAX_VCPUS`] (`shown` is how it was written).
fn check_vcpu_count(
    flag: &'static str,
    key: &str,
    n: u64,
    shown: &dyn Display,
) -> Result<u32, ConfigError> {
    let too_many = || {
        invalid(
            flag,
            format!("{key}={shown} exceeds the maximum of {MAX_VCPUS} vCPUs"),
        )
    };
    if n == 0 {
        return Err(invalid(
            flag,
            format!("{key}=0 is invalid, need at least 1 vCPU"),
        ));
    }
    if n > u64::from(MAX_VCPUS) {
        return Err(too_many());
    }
    u32::try_from(n).map_err(|_| too_many())
}

fn parse_vcpu_count(flag: &'static str, key: &str, s: &str) -> Result<u32, ConfigError> {
    match parse_decimal(s) {
        None => Err(invalid(flag, format!("{key}={s} is not a number"))),
        Some(None) => Err(invalid(
            flag,
            format!("{key}={s} exceeds the maximum of {MAX_VCPUS} vCPUs"),
        )),
        Some(Some(n)) => check_vcpu_count(flag, key, n, &s),
    }
}

/// `max` may not be below `boot` (`shown` is how `max` was written).
fn check_max_cpus(
    flag: &'static str,
    boot: u32,
    max: u32,
    shown: &dyn Display,
) -> Result<(), ConfigError> {
    if max < boot {
        return Err(invalid(
            flag,
            format!("max={shown} is less than boot={boot}"),
        ));
    }
    Ok(())
}

/// `--cpus boot=N[,max=M]`.
pub(super) fn parse_cpus(flag: &'static str, value: &str) -> Result<CpuConfig, ConfigError> {
    let [boot, max] = parse_key_values(flag, value, &CPUS_KEYS, CPUS_SYNTAX)?;
    let boot = match boot {
        Some(s) => parse_vcpu_count(flag, "boot", s)?,
        None => 1,
    };
    let max = match max {
        Some(s) => {
            let max = parse_vcpu_count(flag, "max", s)?;
            check_max_cpus(flag, boot, max, &s)?;
            max
        }
        None => boot,
    };
    Ok(CpuConfig { boot, max })
}

/// The rules of `--cpus` for counts built in code: `1 <= boot <= max <= MAX_VCPUS`.
pub(super) fn check_cpus(flag: &'static str, cpus: &CpuConfig) -> Result<(), ConfigError> {
    let boot = check_vcpu_count(flag, "boot", cpus.boot.into(), &cpus.boot)?;
    let max = check_vcpu_count(flag, "max", cpus.max.into(), &cpus.max)?;
    check_max_cpus(flag, boot, max, &max)
}

/// A byte count shown as a SIZE (`512M`) in messages.
struct Size(u64);

impl Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
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

/// Boot RAM: at least [`MIN_MEMORY_SIZE`], a multiple of [`MEMORY_SIZE_ALIGN`].
fn check_boot_size(flag: &'static str, size: u64, shown: &dyn Display) -> Result<(), ConfigError> {
    if size < MIN_MEMORY_SIZE {
        return Err(invalid(
            flag,
            format!(
                "size={shown} is too small, need at least {}",
                format_size(MIN_MEMORY_SIZE)
            ),
        ));
    }
    if !size.is_multiple_of(MEMORY_SIZE_ALIGN) {
        return Err(invalid(
            flag,
            format!(
                "size={shown} is not a multiple of {}",
                format_size(MEMORY_SIZE_ALIGN)
            ),
        ));
    }
    Ok(())
}

/// The hotplug window: a multiple of `MEMORY_HOTPLUG_ALIGN`.
fn check_hotplug_size(
    flag: &'static str,
    size: u64,
    shown: &dyn Display,
) -> Result<(), ConfigError> {
    if !size.is_multiple_of(MEMORY_HOTPLUG_ALIGN) {
        return Err(invalid(
            flag,
            format!(
                "hotplug_size={shown} is not a multiple of {}",
                format_size(MEMORY_HOTPLUG_ALIGN)
            ),
        ));
    }
    Ok(())
}

/// Boot RAM and boot RAM plus the window: at most [`MAX_TOTAL_MEMORY`].
fn check_total(
    flag: &'static str,
    (size, size_shown): (u64, &dyn Display),
    (hotplug_size, hotplug_shown): (u64, &dyn Display),
) -> Result<(), ConfigError> {
    let limit = format_size(MAX_TOTAL_MEMORY);
    if size > MAX_TOTAL_MEMORY {
        return Err(invalid(
            flag,
            format!("size={size_shown} exceeds the supported {limit} of guest memory"),
        ));
    }
    let fits = size
        .checked_add(hotplug_size)
        .is_some_and(|total| total <= MAX_TOTAL_MEMORY);
    if !fits {
        return Err(invalid(
            flag,
            format!(
                "size={size_shown} plus hotplug_size={hotplug_shown} exceeds the supported {limit} of guest memory"
            ),
        ));
    }
    Ok(())
}

/// Only hot-added RAM can be removable.
fn check_removable(
    flag: &'static str,
    removable: bool,
    hotplug_size: u64,
) -> Result<(), ConfigError> {
    if removable && hotplug_size == 0 {
        return Err(invalid(
            flag,
            "removable=on needs a hotplug window (hotplug_size=SIZE): only hot-added RAM can be removed",
        ));
    }
    Ok(())
}

fn bad_remove_timeout(flag: &'static str, shown: &dyn Display) -> ConfigError {
    invalid(
        flag,
        format!(
            "remove_timeout={shown}: expected whole seconds from 1 to {MAX_REMOVE_TIMEOUT_SECS}"
        ),
    )
}

/// `remove_timeout=SECS`: whole seconds from 1 to [`MAX_REMOVE_TIMEOUT_SECS`], and only with
/// `removable=on`.
fn parse_remove_timeout(
    flag: &'static str,
    text: Option<&str>,
    removable: bool,
) -> Result<Duration, ConfigError> {
    let Some(v) = text else {
        return Ok(DEFAULT_REMOVE_TIMEOUT);
    };
    match v.parse::<u64>() {
        Ok(secs @ 1..=MAX_REMOVE_TIMEOUT_SECS) if removable => Ok(Duration::from_secs(secs)),
        Ok(1..=MAX_REMOVE_TIMEOUT_SECS) => Err(invalid(
            flag,
            "remove_timeout= only applies with removable=on",
        )),
        _ => Err(bad_remove_timeout(flag, &v)),
    }
}

/// `--memory size=SIZE[,hotplug_size=SIZE][,thp=on|off][,removable=on|off][,remove_timeout=SECS]`.
pub(super) fn parse_memory(flag: &'static str, value: &str) -> Result<MemoryConfig, ConfigError> {
    let [size, hotplug_size, thp, removable, remove_timeout] =
        parse_key_values(flag, value, &MEMORY_KEYS, MEMORY_SYNTAX)?;
    let (size, size_text): (u64, &dyn Display) = match &size {
        Some(s) => (parse_size_value(flag, "size", s)?, s),
        None => (DEFAULT_MEMORY_SIZE, &Size(DEFAULT_MEMORY_SIZE)),
    };
    check_boot_size(flag, size, size_text)?;
    let (hotplug_size, hotplug_text) = match hotplug_size {
        Some(s) => {
            let n = parse_size_value(flag, "hotplug_size", s)?;
            check_hotplug_size(flag, n, &s)?;
            (n, s)
        }
        None => (0, "0"),
    };
    check_total(flag, (size, size_text), (hotplug_size, &hotplug_text))?;
    let removable = key_on_off(flag, "removable", removable, false)?;
    check_removable(flag, removable, hotplug_size)?;
    let remove_timeout = parse_remove_timeout(flag, remove_timeout, removable)?;
    Ok(MemoryConfig {
        size,
        hotplug_size,
        huge_pages: key_on_off(flag, "thp", thp, true)?,
        removable,
        remove_timeout,
    })
}

/// The rules of `--memory` for sizes built in code (the timeout counts only when removable).
pub(super) fn check_memory(flag: &'static str, memory: &MemoryConfig) -> Result<(), ConfigError> {
    let size = (memory.size, &Size(memory.size) as &dyn Display);
    let hotplug = (
        memory.hotplug_size,
        &Size(memory.hotplug_size) as &dyn Display,
    );
    check_boot_size(flag, size.0, size.1)?;
    check_hotplug_size(flag, hotplug.0, hotplug.1)?;
    check_total(flag, size, hotplug)?;
    check_removable(flag, memory.removable, memory.hotplug_size)?;
    let t = memory.remove_timeout;
    let whole = t.subsec_nanos() == 0 && (1..=MAX_REMOVE_TIMEOUT_SECS).contains(&t.as_secs());
    if memory.removable && !whole {
        return Err(match t.subsec_nanos() {
            0 => bad_remove_timeout(flag, &t.as_secs()),
            _ => bad_remove_timeout(flag, &format_args!("{t:?}")),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{err, run};
    use crate::config::*;
    use std::time::Duration;

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
}

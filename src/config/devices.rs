//! `--disk path=FILE[,readonly=on|off]`, `--vsock cid=N,socket=PATH` and
//! `--exit-device on|off|iobase=PORT[,iosize=N]`: their sub-keys, parsers and rules, the rules
//! shared with [`super::validate`] for devices built in code.

use std::fmt::Display;
use std::path::PathBuf;

use super::values::{invalid, key_on_off, parse_decimal, parse_key_values, parse_port};
use super::{ConfigError, DiskConfig, ExitDeviceConfig, VsockConfig, MAX_GUEST_CID};
use crate::arch::x86_64::layout::ports;

/// The sub-keys of `--disk`.
pub(super) const DISK_KEYS: [&str; 2] = ["path", "readonly"];
/// The value of `--disk`, as `--help` and the messages show it.
pub(super) const DISK_SYNTAX: &str = "path=FILE[,readonly=on|off]";
/// The sub-keys of `--vsock`.
pub(super) const VSOCK_KEYS: [&str; 2] = ["cid", "socket"];
/// The value of `--vsock`, as `--help` and the messages show it.
pub(super) const VSOCK_SYNTAX: &str = "cid=N,socket=PATH";
/// The sub-keys of `--exit-device`.
pub(super) const EXIT_DEVICE_KEYS: [&str; 2] = ["iobase", "iosize"];

/// `--disk path=FILE[,readonly=on|off]`.
pub(super) fn parse_disk(flag: &'static str, value: &str) -> Result<DiskConfig, ConfigError> {
    let syntax = DISK_SYNTAX;
    let [path, readonly] = parse_key_values(flag, value, &DISK_KEYS, syntax)?;
    let path =
        path.ok_or_else(|| invalid(flag, format!("path= is required (expected {syntax})")))?;
    Ok(DiskConfig {
        path: PathBuf::from(path),
        readonly: key_on_off(flag, "readonly", readonly, false)?,
    })
}

/// Disks built in code: each has a path.
pub(super) fn check_disks(flag: &'static str, disks: &[DiskConfig]) -> Result<(), ConfigError> {
    if disks.iter().any(|d| d.path.as_os_str().is_empty()) {
        return Err(invalid(flag, "path= is required"));
    }
    Ok(())
}

/// Guest CIDs 0-2 are reserved; `u32::MAX` is `VMADDR_CID_ANY` (`shown` is how it was written).
fn check_cid(
    flag: &'static str,
    cid: Option<u64>,
    shown: &dyn Display,
) -> Result<u64, ConfigError> {
    match cid {
        Some(n) if (3..=MAX_GUEST_CID).contains(&n) => Ok(n),
        _ => Err(invalid(
            flag,
            format!("cid={shown} is invalid (expected a number from 3 to {MAX_GUEST_CID}; 0-2 are reserved)"),
        )),
    }
}

/// `--vsock cid=N,socket=PATH`.
pub(super) fn parse_vsock(flag: &'static str, value: &str) -> Result<VsockConfig, ConfigError> {
    let syntax = VSOCK_SYNTAX;
    let [cid, socket] = parse_key_values(flag, value, &VSOCK_KEYS, syntax)?;
    let (Some(cid), Some(socket)) = (cid, socket) else {
        return Err(invalid(
            flag,
            format!("cid= and socket= are required (expected {syntax})"),
        ));
    };
    Ok(VsockConfig {
        cid: check_cid(flag, parse_decimal(cid).flatten(), &cid)?,
        socket: PathBuf::from(socket),
    })
}

/// A vsock device built in code: a valid CID and a socket path.
pub(super) fn check_vsock(flag: &'static str, vsock: &VsockConfig) -> Result<(), ConfigError> {
    check_cid(flag, Some(vsock.cid), &vsock.cid)?;
    if vsock.socket.as_os_str().is_empty() {
        return Err(invalid(flag, "socket= is required"));
    }
    Ok(())
}

/// `iosize=` is 1, 2 or 4 (`shown` is how it was written).
fn check_iosize(
    flag: &'static str,
    iosize: Option<u16>,
    shown: &dyn Display,
) -> Result<u16, ConfigError> {
    match iosize {
        Some(n @ (1 | 2 | 4)) => Ok(n),
        _ => Err(invalid(
            flag,
            format!("iosize={shown} is invalid (expected 1, 2 or 4)"),
        )),
    }
}

/// The exit device's ports end by 0xffff and overlap none that minivmm emulates.
fn check_exit_ports(flag: &'static str, dev: &ExitDeviceConfig) -> Result<(), ConfigError> {
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
    Ok(())
}

/// `--exit-device on|off|iobase=PORT[,iosize=N]`.
pub(super) fn parse_exit_device(
    flag: &'static str,
    value: &str,
) -> Result<Option<ExitDeviceConfig>, ConfigError> {
    match value {
        "off" => return Ok(None),
        "on" => return Ok(Some(ExitDeviceConfig::default())),
        _ => {}
    }
    let [iobase, iosize] = parse_key_values(
        flag,
        value,
        &EXIT_DEVICE_KEYS,
        "on, off or iobase=PORT[,iosize=N]",
    )?;
    let mut dev = ExitDeviceConfig::default();
    if let Some(s) = iobase {
        dev.iobase = parse_port(flag, "iobase", s)?;
    }
    if let Some(s) = iosize {
        let n = match s {
            "1" | "2" | "4" => s.parse().ok(),
            _ => None,
        };
        dev.iosize = check_iosize(flag, n, &s)?;
    }
    check_exit_ports(flag, &dev)?;
    Ok(Some(dev))
}

/// An exit device built in code: the same rules as `iobase=..,iosize=..`.
pub(super) fn check_exit_device(
    flag: &'static str,
    dev: &ExitDeviceConfig,
) -> Result<(), ConfigError> {
    check_iosize(flag, Some(dev.iosize), &dev.iosize)?;
    check_exit_ports(flag, dev)
}

#[cfg(test)]
mod tests {
    use crate::arch::x86_64::layout::MAX_VIRTIO_DEVICES;
    use crate::config::testing::{err, run};
    use crate::config::*;

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
}

//! CI verdicts from a real Linux guest (issue 8): the exit device, pvpanic, `--timeout`, the boot
//! marker on the debug port. One emulated-host run covers them all (each L1 boot costs ~20 s).

mod common;

use common::{run_in_test_host, Vm, VmOptions, EXIT_TIMEOUT};
use std::time::Duration;

/// Shell snippet: write byte `v` (0..=255) to I/O port `port` through /dev/port.
fn outb(port: u16, v: &str) -> String {
    format!(
        "printf \"\\\\$(printf %o {v})\" | dd of=/dev/port bs=1 seek={port} count=1 2>/dev/null"
    )
}

#[test]
fn ci_verdicts() {
    run_in_test_host("ci_verdicts", || {
        // A test that fails with status 3 reports 16 + 3 through the exit device: 2 * 19 + 1 = 39.
        // The test guest writes the debug port when its shell is ready: `info` reports it.
        let mut vm = Vm::boot(VmOptions::elf().arg(&["--exit-device", "on"]).control());
        vm.poll(
            "info reports the boot marker",
            Duration::from_secs(10),
            |vm| vm.info()["boot_ms"] != "none",
        );
        let info = vm.info();
        let boot_ms: u64 = info["boot_ms"].parse().expect("boot_ms after the marker");
        let uptime: f64 = info["uptime"].parse().expect("uptime");
        println!("boot marker: boot_ms={boot_ms} uptime={uptime}");
        assert!(boot_ms > 0 && (boot_ms as f64) / 1e3 <= uptime, "{info:?}");
        assert!(vm.stderr_text().contains("wrote 0x01 to the debug port"));
        vm.write_line(&format!("sh -c 'exit 3'; {}", outb(0x501, "$((16 + $?))")));
        assert_eq!(
            vm.wait_exit(EXIT_TIMEOUT),
            39,
            "failing test through the exit device"
        );
        drop(vm);

        // A passing test (status 0): 16 -> 33.
        let mut vm = Vm::boot(VmOptions::elf().arg(&["--exit-device", "iobase=0xf4,iosize=4"]));
        vm.write_line(&format!("true; {}", outb(0xf4, "$((16 + $?))")));
        assert_eq!(
            vm.wait_exit(EXIT_TIMEOUT),
            33,
            "passing test through the exit device"
        );
        drop(vm);

        // A kernel panic, with the stock pvpanic driver bound through ACPI QEMU0001: exit 4.
        let mut vm = Vm::boot(VmOptions::elf());
        let bound = vm.sh("ls /sys/bus/platform/drivers/pvpanic-mmio/");
        assert!(
            bound.contains("QEMU0001:00"),
            "pvpanic-mmio not bound: {bound:?}"
        );
        vm.write_line("echo c > /proc/sysrq-trigger");
        assert_eq!(
            vm.wait_exit(EXIT_TIMEOUT),
            4,
            "exit code after a guest panic"
        );
        let log = vm.stderr_text();
        assert!(
            log.contains("guest panic (reported through pvpanic)"),
            "{log}"
        );
        assert!(
            vm.console().contains("Kernel panic"),
            "panic message on the console"
        );
        drop(vm);

        // Without the pvpanic device, panic=1 reboots; with --no-reboot that is 2, never 0.
        let mut vm = Vm::boot(
            VmOptions::elf()
                .cmdline_add("panic=1")
                .no_reboot()
                .arg(&["--pvpanic", "off"]),
        );
        assert_eq!(
            vm.sh("ls /sys/bus/platform/devices/ | grep -c QEMU0001 || true"),
            "0"
        );
        vm.write_line("echo c > /proc/sysrq-trigger");
        assert_eq!(
            vm.wait_exit(EXIT_TIMEOUT),
            2,
            "panic=1 without pvpanic under --no-reboot"
        );
        drop(vm);

        // A guest that never ends: --timeout 5s stops it with 124 about when the limit expires.
        // `loglevel=7` makes the kernel print from its first console line on, so the guest has
        // written something well before the limit even on a loaded emulated host (with `quiet`
        // its first line came after 5 s there now and then).
        let opts = VmOptions::elf().cmdline_add("loglevel=7");
        let mut vm = Vm::start(opts.arg(&["--timeout", "5s"]));
        let code = vm.wait_exit(Duration::from_secs(20));
        let took = vm.elapsed();
        println!("--timeout 5s: exit {code} after {took:?}");
        assert_eq!(code, 124);
        assert!(
            took >= Duration::from_secs(5) && took < Duration::from_millis(6500),
            "--timeout 5s ended the run after {took:?}"
        );
        assert!(vm.stderr_text().contains("--timeout expired after 5s"));
        // What the guest printed before the limit is on the console (the serial log keeps it too).
        assert!(!vm.console().trim().is_empty(), "guest output lost");
    });
}

//! Real-Linux boot tests (issue 2): the Debian kernel (bzImage and ELF/PVH) with a busybox initramfs,
//! vCPU count, memory size, poweroff/reboot exit codes, serial input, and command-line errors.
//!
//! Guests boot where KVM can run them: directly on hardware KVM, else inside the emulated test host
//! (see tests/common/mod.rs).

mod common;

use common::{images, run_in_test_host, run_minivmm, Vm, VmOptions, EXIT_TIMEOUT};
use std::time::Duration;

const MIB: u64 = 1024;

/// Pastes a 4 KiB line into the guest console and checks it arrived whole and in order.
///
/// Busybox's line editor caps interactive lines at 1 KiB, so the line goes to `head` reading the raw tty:
/// the test is about the serial input path of the VMM (UART FIFO back-pressure), not the shell.
fn paste_4k_line(vm: &mut Vm) {
    let mut line = String::new();
    let mut i = 0;
    while line.len() < 4096 {
        line.push_str(&format!("{i:04}:"));
        i += 1;
    }
    line.truncate(4096);
    vm.write_line(
        "stty raw -echo; echo \"__RA\"\"W_READY\"; head -c 4097 > /tmp/line; stty sane; echo \"__RA\"\"W_DONE\"",
    );
    vm.wait_for("__RAW_READY", common::CMD_TIMEOUT);
    vm.write_raw(format!("{line}\n").as_bytes());
    vm.wait_for("__RAW_DONE", common::CMD_TIMEOUT);
    assert_eq!(
        vm.sh_u64("wc -c < /tmp/line"),
        4097,
        "bytes received from a 4097-byte paste"
    );
    let back = vm.sh("head -c 4096 /tmp/line; echo");
    assert_eq!(
        back.len(),
        4096,
        "the pasted line read back has the wrong length"
    );
    if back != line {
        let at = back
            .bytes()
            .zip(line.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "the pasted line differs from byte {at}: sent {:?}..., read back {:?}...",
            &line[at..(at + 40).min(line.len())],
            &back[at..(at + 40).min(back.len())]
        );
    }
}

fn assert_mem_total_near(vm: &mut Vm, size_mib: u64) {
    let kib = vm.mem_total_kib();
    assert!(
        kib > (size_mib - size_mib / 5) * MIB && kib <= size_mib * MIB,
        "MemTotal {kib} kB is not consistent with --memory size={size_mib}M"
    );
}

/// The legacy devices a stock kernel probes are found, so it does not stall on them: the CMOS RTC
/// (without it the Debian kernel loses ~5 s), COM1 as a 16550A on IRQ 4, S5 offered by ACPI, and
/// the i8042 skipped through ACPI instead of probed.
fn assert_platform_devices(vm: &mut Vm) {
    let dmesg = vm.sh("dmesg");
    for needle in [
        "rtc_cmos 00:01: registered as rtc0",
        "ttyS0 at I/O 0x3f8",
        "is a 16550A",
        "ACPI: PM: (supports S0 S5)",
        "i8042: PNP: No PS/2 controller found",
        "smpboot: Allowing 1 CPUs, 0 hotplug CPUs",
    ] {
        assert!(
            dmesg.contains(needle),
            "guest log lacks {needle:?}:\n{dmesg}"
        );
    }
    for bad in [
        "Eject incomplete",
        "TSC warp",
        "BUG:",
        "Oops",
        "soft lockup",
        "timed out",
        "Call Trace",
    ] {
        assert!(!dmesg.contains(bad), "guest log has {bad:?}:\n{dmesg}");
    }
}

#[test]
fn harness_self_test() {
    common::self_test();
}

/// The reset path Linux takes by default here (hardware-reduced ACPI, no EFI: `efi`, then `bios`).
const DEFAULT_RESET: &str = "the BIOS reset vector";

/// Runs `cmd` (a guest reboot), waits for the guest to come back in the same minivmm, and checks
/// minivmm logged the reset as coming through `cause`.
fn reboot_in_process(vm: &mut Vm, cmd: &str, cause: &str) {
    let rebooting =
        |l: &&str| l.contains("guest reset through") && l.trim_end().ends_with(": rebooting");
    let before = vm.stderr_text().lines().filter(rebooting).count();
    vm.write_line(cmd);
    vm.wait_ready();
    let log = vm.stderr_text();
    let resets: Vec<&str> = log.lines().filter(rebooting).collect();
    assert_eq!(
        resets.len(),
        before + 1,
        "one reset logged for {cmd:?}; minivmm log:\n{log}"
    );
    let last = resets[resets.len() - 1];
    assert!(
        last.contains(cause),
        "{cmd:?} reset through {last:?}, want {cause:?}"
    );
    assert_eq!(
        vm.sh("echo again; cat /proc/uptime | cut -d. -f1")
            .lines()
            .next(),
        Some("again")
    );
}

/// 1 vCPU, 512 MiB, a user command line without `reboot=`/`panic=`: nproc, MemTotal, a 4 KiB
/// paste; `reboot -f` and plain `reboot` bring the guest back in the same process (through the
/// kernel's default path); `poweroff -f` ends minivmm with exit code 0.
#[test]
fn boot_one_vcpu_reboot_poweroff() {
    run_in_test_host("boot_one_vcpu_reboot_poweroff", || {
        let mut vm = Vm::boot(VmOptions::bzimage().cpus("boot=1").memory("size=512M"));
        assert_eq!(vm.nproc(), 1);
        assert_mem_total_near(&mut vm, 512);
        assert_platform_devices(&mut vm);
        paste_4k_line(&mut vm);

        reboot_in_process(&mut vm, "reboot -f", DEFAULT_RESET);
        assert_eq!(vm.nproc(), 1);
        assert_mem_total_near(&mut vm, 512);
        reboot_in_process(&mut vm, "reboot", DEFAULT_RESET);

        vm.write_line("poweroff -f");
        assert_eq!(vm.wait_exit(EXIT_TIMEOUT), 0, "exit code after poweroff -f");
    });
}

/// 2 boot vCPUs, the same user command line: plain `reboot` and `reboot -f` bring the guest
/// back; plain `poweroff` (through busybox init) ends minivmm with 0.
#[test]
fn boot_two_vcpus_plain_reboot_poweroff() {
    run_in_test_host("boot_two_vcpus_plain_reboot_poweroff", || {
        let mut vm = Vm::boot(VmOptions::bzimage().cpus("boot=2").memory("size=512M"));
        assert_eq!(vm.nproc(), 2);
        assert_eq!(vm.sh("cat /sys/devices/system/cpu/online"), "0-1");

        reboot_in_process(&mut vm, "reboot", DEFAULT_RESET);
        assert_eq!(vm.nproc(), 2, "vCPUs after a reboot");
        reboot_in_process(&mut vm, "reboot -f", DEFAULT_RESET);
        assert_eq!(vm.nproc(), 2, "vCPUs after a second reboot");

        vm.write_line("poweroff");
        assert_eq!(
            vm.wait_exit(EXIT_TIMEOUT),
            0,
            "exit code after plain poweroff"
        );
    });
}

/// With `--no-reboot`, a guest reboot ends minivmm with exit code 2: `reboot -f` and plain
/// `reboot`, 1 and 2 vCPUs, the ELF vmlinux (PVH) and the bzImage, user command line.
#[test]
fn no_reboot_exits_with_2() {
    run_in_test_host("no_reboot_exits_with_2", || {
        let cases = [
            (VmOptions::elf(), "boot=1", "reboot -f"),
            (VmOptions::elf(), "boot=2", "reboot"),
            (VmOptions::bzimage(), "boot=2", "reboot -f"),
            (VmOptions::bzimage(), "boot=1", "reboot"),
        ];
        for (opts, cpus, cmd) in cases {
            let mut vm = Vm::boot(opts.cpus(cpus).no_reboot());
            vm.write_line(cmd);
            assert_eq!(
                vm.wait_exit(EXIT_TIMEOUT),
                2,
                "exit code after {cmd} with --no-reboot and {cpus}"
            );
            let log = vm.stderr_text();
            assert!(
                log.contains(DEFAULT_RESET) && log.contains("exiting because of --no-reboot"),
                "minivmm log after {cmd}:\n{log}"
            );
        }
    });
}

/// The ELF vmlinux boots through its PVH entry point to the shell, with 2 and 1 vCPUs; `reboot -f`
/// and `reboot` bring it back in the same process.
#[test]
fn boot_elf_pvh() {
    run_in_test_host("boot_elf_pvh", || {
        let mut vm = Vm::boot(VmOptions::elf().cpus("boot=2"));
        assert_eq!(vm.sh("uname -r"), images().release);
        assert_eq!(vm.nproc(), 2);
        assert_mem_total_near(&mut vm, 512);
        // PVH boots leave a trace in the kernel log.
        let (dmesg, _) = vm.run("dmesg | grep -i -m1 pvh");
        println!("PVH dmesg: {dmesg}");
        reboot_in_process(&mut vm, "reboot -f", DEFAULT_RESET);
        reboot_in_process(&mut vm, "reboot", DEFAULT_RESET);
        assert_eq!(vm.nproc(), 2);
        vm.write_line("poweroff -f");
        assert_eq!(vm.wait_exit(EXIT_TIMEOUT), 0);
        drop(vm);

        let mut vm = Vm::boot(VmOptions::elf().cpus("boot=1"));
        reboot_in_process(&mut vm, "reboot", DEFAULT_RESET);
        reboot_in_process(&mut vm, "reboot -f", DEFAULT_RESET);
        assert_eq!(vm.nproc(), 1);
        vm.write_line("poweroff");
        assert_eq!(vm.wait_exit(EXIT_TIMEOUT), 0);
    });
}

/// Every reset path a stock kernel offers, chosen with `reboot=` on a user command line: each
/// brings the guest back in the same process and is logged as the path it took; `poweroff -f`
/// still ends minivmm with 0 afterwards.
fn reboot_variants(cases: &[(&str, &str)]) {
    for &(word, cause) in cases {
        let mut vm = Vm::boot(VmOptions::elf().cpus("boot=2").cmdline_add(word));
        assert_eq!(
            vm.sh("cat /sys/kernel/reboot/type"),
            word.trim_start_matches("reboot="),
            "the guest's reboot type"
        );
        reboot_in_process(&mut vm, "reboot -f", cause);
        vm.write_line("poweroff -f");
        assert_eq!(vm.wait_exit(EXIT_TIMEOUT), 0, "poweroff after {word}");
    }
}

// Two variants per test: each test host run boots fewer VMs, so one of the emulated host's rare
// faults costs a shorter re-run (see run_in_test_host).
#[test]
fn every_reboot_variant_reboots_acpi_kbd() {
    run_in_test_host("every_reboot_variant_reboots_acpi_kbd", || {
        reboot_variants(&[
            ("reboot=acpi", "the ACPI reset register"),
            ("reboot=kbd", "the i8042 reset command"),
        ]);
    });
}

#[test]
fn every_reboot_variant_reboots_triple_pci() {
    run_in_test_host("every_reboot_variant_reboots_triple_pci", || {
        reboot_variants(&[
            ("reboot=triple", "a triple fault"),
            ("reboot=pci", "the reset control register 0xcf9"),
        ]);
    });
}

#[test]
fn every_reboot_variant_reboots_bios_efi() {
    run_in_test_host("every_reboot_variant_reboots_bios_efi", || {
        reboot_variants(&[
            ("reboot=bios", DEFAULT_RESET),
            ("reboot=efi", DEFAULT_RESET),
        ]);
    });
}

/// Bad command-line input: exit code 1 and exactly one stderr line naming the flag or file. No KVM needed.
#[test]
fn bad_arguments_exit_1() {
    let existing = env!("CARGO_MANIFEST_DIR").to_string() + "/Cargo.toml";
    let k = existing.as_str();
    let missing_kernel = "/nonexistent/minivmm-test/vmlinuz";
    let missing_initrd = "/nonexistent/minivmm-test/initrd.gz";
    let cases: &[(&[&str], &str)] = &[
        (&["--kernel", k, "--cpus", "boot=0"], "--cpus"),
        (&["--kernel", k, "--cpus", "boot=3,max=2"], "--cpus"),
        (&["--kernel", k, "--cpus", "boot=x"], "--cpus"),
        (&["--kernel", k, "--memory", "size=12Q"], "--memory"),
        (
            &["--kernel", k, "--memory", "size=512M,hotplug_size=100M"],
            "--memory",
        ),
        (&["--kernel", k, "--serial", "bogus"], "--serial"),
        (&["--kernel", k, "--bogus-flag"], "--bogus-flag"),
        (&["--kernel"], "--kernel"),
        (&[], "--kernel"),
        (&["--cpus", "boot=1"], "--kernel"),
        (
            &[
                "--kernel",
                missing_kernel,
                "--serial",
                "off",
                "--seccomp",
                "off",
            ],
            missing_kernel,
        ),
    ];
    // A real kernel, so that the initramfs is the only thing wrong.
    let bz = images().bzimage.to_string_lossy().into_owned();
    let initrd_case: [&str; 8] = [
        "--kernel",
        &bz,
        "--initramfs",
        missing_initrd,
        "--serial",
        "off",
        "--seccomp",
        "off",
    ];
    let cases: Vec<(&[&str], &str)> = cases
        .iter()
        .copied()
        .chain([(&initrd_case[..], missing_initrd)])
        .collect();
    let mut failures = Vec::new();
    for (args, token) in &cases {
        let r = run_minivmm(args, Duration::from_secs(20));
        let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let ok = r.code == Some(1) && lines.len() == 1 && lines[0].contains(token);
        println!("minivmm {args:?} -> {:?}, stderr {:?}", r.code, r.stderr);
        if !ok {
            failures.push(format!(
                "minivmm {args:?}: want exit 1 and one stderr line naming {token:?}; got exit {:?}, stderr {:?}",
                r.code, r.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

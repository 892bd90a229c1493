//! Real-Linux virtio tests (issue 10): virtio-blk disks (read-only and read-write) and the
//! Firecracker-compatible hybrid vsock, through a guest reboot. The guest loads the Debian
//! kernel's virtio_mmio, virtio_blk and vsock modules and finds the devices through ACPI
//! (`LNRO0005`), with no command-line hints. It boots the ELF vmlinux (PVH: half a bzImage's
//! boot time in the emulated test host); bzImage loading has its own tests in boot.rs.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::stream::{
    echo_exchange, hybrid_connect, hybrid_sink, pattern, pattern_hash, read_to_close,
};
use common::{run_in_test_host, Vm, VmOptions, EXIT_TIMEOUT};
use vmm_sys_util::tempdir::TempDir;

const MIB: u64 = 1 << 20;
/// Host reads and writes on a vsock connection.
const VSOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// Guest commands that move tens of MiB through the nested test host.
const BULK_TIMEOUT: Duration = Duration::from_secs(240);

fn md5(path: &Path, bytes: Option<u64>) -> String {
    let cmd = match bytes {
        Some(n) => format!("head -c {n} {} | md5sum", path.display()),
        None => format!("md5sum < {}", path.display()),
    };
    let out = Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .output()
        .expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

fn start_echo_listener(vm: &mut Vm, port: u32) {
    vm.sh(&format!(
        "vsock-tool listen {port} echo > /tmp/listen.log 2>&1 < /dev/null & true"
    ));
    let log = vm.sh("sleep 0.3; cat /tmp/listen.log");
    assert!(log.contains("VSOCK-LISTENING"), "guest listener: {log}");
}

#[test]
fn disks_read_write_refuse_and_survive_a_reboot() {
    run_in_test_host("disks_read_write_refuse_and_survive_a_reboot", || {
        let dir = TempDir::new().unwrap();
        let d = dir.as_path();
        // Read-only disk: a tar archive holding one file (busybox tar reads it off /dev/vda).
        let mut content = vec![0u8; 300 * 1024 + 17];
        pattern(7, &mut content);
        std::fs::write(d.join("hello.txt"), &content).unwrap();
        let ro = d.join("ro.tar");
        let st = Command::new("tar")
            .args([
                "-C",
                &d.display().to_string(),
                "-cf",
                &ro.display().to_string(),
                "hello.txt",
            ])
            .status()
            .unwrap();
        assert!(st.success());
        let ro_md5 = md5(&ro, None);
        let file_md5 = md5(&d.join("hello.txt"), None);
        let rw = d.join("rw.img");
        std::fs::write(&rw, vec![0u8; (8 * MIB) as usize]).unwrap();

        let mut opts = VmOptions::elf();
        opts.extra = vec![
            "--disk".into(),
            format!("path={},readonly=on", ro.display()),
            "--disk".into(),
            format!("path={}", rw.display()),
        ];
        let mut vm = Vm::boot(opts);
        assert_eq!(vm.sh("cat /sys/block/vda/ro /sys/block/vdb/ro"), "1\n0");
        assert_eq!(
            vm.sh("cat /sys/block/vdb/size"),
            (8 * MIB / 512).to_string(),
            "capacity in sectors"
        );
        assert_eq!(
            vm.sh("tar -xOf /dev/vda hello.txt | md5sum | cut -d' ' -f1"),
            file_md5,
            "the file read from the read-only disk"
        );
        // Writes to the read-only disk are refused and change nothing.
        let (out, rc) = vm.run("dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync");
        assert_ne!(rc, 0, "a write to the read-only disk succeeded: {out}");

        // Write 3 MiB plus a partial MiB to the second disk, sync, and read it back on the host.
        let guest_md5 = vm.sh(
            "dd if=/dev/urandom of=/tmp/w bs=1024 count=3500 2>/dev/null; \
             dd if=/tmp/w of=/dev/vdb bs=64k conv=fsync 2>/dev/null; sync; \
             md5sum /tmp/w | cut -d' ' -f1",
        );
        assert_eq!(
            md5(&rw, Some(3500 * 1024)),
            guest_md5,
            "host read-back of the guest's write"
        );
        let id = vm.sh("cat /sys/block/vdb/serial 2>/dev/null || true");
        assert!(
            id.is_empty() || id.starts_with("minivmm-vd1"),
            "get-id: {id:?}"
        );

        // After a reboot the disks come back with the same contents.
        vm.write_line("reboot -f");
        vm.wait_ready();
        assert_eq!(
            vm.sh("tar -xOf /dev/vda hello.txt | md5sum | cut -d' ' -f1"),
            file_md5
        );
        assert_eq!(
            vm.sh("head -c 3584000 /dev/vdb | md5sum | cut -d' ' -f1"),
            guest_md5
        );
        assert_eq!(md5(&ro, None), ro_md5, "the read-only image is unchanged");
        vm.write_line("poweroff -f");
        assert_eq!(vm.wait_exit(EXIT_TIMEOUT), 0);
    });
}

#[test]
fn vsock_moves_64_mib_both_ways_with_32_connections_and_after_a_reboot() {
    run_in_test_host(
        "vsock_moves_64_mib_both_ways_with_32_connections_and_after_a_reboot",
        || {
            let dir = TempDir::new().unwrap();
            let sock = dir.as_path().join("v.sock");
            let mut opts = VmOptions::elf();
            opts.memory = Some("size=768M".into());
            opts.extra = vec![
                "--vsock".into(),
                format!("cid=42,socket={}", sock.display()),
            ];
            let mut vm = Vm::boot(opts);
            assert_eq!(vm.sh("cat /sys/bus/virtio/devices/*/device"), "0x0013");
            start_echo_listener(&mut vm, 5000);

            // Host-initiated: 64 MiB to the guest and 64 MiB back, checksummed.
            let n = 64 * MIB;
            let t = std::time::Instant::now();
            let (got, hash) = echo_exchange(hybrid_connect(&sock, 5000, VSOCK_TIMEOUT), n);
            println!("vsock echo of {} MiB: {:.2?}", n / MIB, t.elapsed());
            assert_eq!(
                (got, hash),
                (n, pattern_hash(n)),
                "echoed bytes and checksum"
            );

            // Guest-initiated: 64 MiB to a host listener on PATH_6000.
            let sink = hybrid_sink(&sock, 6000);
            let out = vm.sh_timeout(&format!("vsock-tool connect 2 6000 send {n}"), BULK_TIMEOUT);
            assert_eq!(out, format!("{n} {:016x}", pattern_hash(n)));
            sink.join().unwrap();

            // A connection to a guest port nobody listens on is closed without OK.
            let mut s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.write_all(b"CONNECT 5999\n").unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            assert!(!rest.starts_with(b"OK"), "got {rest:?}");
            // A guest connection to a host port nobody listens on fails.
            let (_, rc) = vm.run("vsock-tool connect 2 6001 send 10");
            assert_ne!(rc, 0);

            // 32 concurrent connections, 1 MiB each way.
            let each = MIB;
            let workers: Vec<_> = (0..32)
                .map(|_| {
                    let sock = sock.clone();
                    thread::spawn(move || {
                        echo_exchange(hybrid_connect(&sock, 5000, VSOCK_TIMEOUT), each)
                    })
                })
                .collect();
            for w in workers {
                assert_eq!(w.join().unwrap(), (each, pattern_hash(each)));
            }
            let conns = vm.sh("ls /proc/*/fd 2>/dev/null | wc -l");
            assert!(!conns.is_empty());

            // After a reboot: the device is new, the socket still answers.
            vm.write_line("reboot -f");
            vm.wait_ready();
            start_echo_listener(&mut vm, 5000);
            assert_eq!(
                echo_exchange(hybrid_connect(&sock, 5000, VSOCK_TIMEOUT), MIB),
                (MIB, pattern_hash(MIB))
            );
            let sink = hybrid_sink(&sock, 6002);
            assert_eq!(
                vm.sh("vsock-tool connect 2 6002 send 1000"),
                format!("1000 {:016x}", pattern_hash(1000))
            );
            sink.join().unwrap();
            vm.write_line("poweroff -f");
            assert_eq!(vm.wait_exit(EXIT_TIMEOUT), 0);
        },
    );
}

/// Issue 22: the guest reboots and powers off while the host holds vsock connections in both
/// directions (host-initiated ones, one with data in flight; guest-initiated ones the guest
/// is still writing into): minivmm keeps running through the reboot with its filters on, the
/// host sees every connection closed, new connections work both ways, and the power-off is
/// exit 0.
#[test]
fn vsock_connections_held_open_through_a_reboot_and_a_power_off() {
    run_in_test_host(
        "vsock_connections_held_open_through_a_reboot_and_a_power_off",
        || {
            let dir = TempDir::new().unwrap();
            let sock = dir.as_path().join("v.sock");
            let mut opts = VmOptions::elf();
            opts.extra = vec![
                "--vsock".into(),
                format!("cid=42,socket={}", sock.display()),
            ];
            let mut vm = Vm::boot(opts);
            let listener = UnixListener::bind(format!("{}_6000", sock.display())).unwrap();
            for command in ["reboot -f", "poweroff -f"] {
                start_echo_listener(&mut vm, 5000);
                let mut held: Vec<File> = (0..3)
                    .map(|_| hybrid_connect(&sock, 5000, VSOCK_TIMEOUT))
                    .collect();
                // The first echoes while the host keeps writing to the second.
                held[0].write_all(b"ping").unwrap();
                let mut pong = [0u8; 4];
                held[0].read_exact(&mut pong).unwrap();
                assert_eq!(&pong, b"ping");
                held[1].write_all(&[9u8; 32 << 10]).unwrap();
                // Two guest connections to host port 6000, sending far more than the host reads.
                vm.sh(
                    "for i in 1 2; do vsock-tool connect 2 6000 send 1073741824 \
                     > /dev/null 2>&1 & done; true",
                );
                let guest_side: Vec<File> = (0..2)
                    .map(|_| {
                        let (s, _) = listener.accept().unwrap();
                        s.set_read_timeout(Some(VSOCK_TIMEOUT)).unwrap();
                        let mut f = File::from(std::os::fd::OwnedFd::from(s));
                        let mut some = [0u8; 4096];
                        f.read_exact(&mut some).expect("guest data flows");
                        f
                    })
                    .collect();
                vm.write_line(command);
                if command.starts_with("poweroff") {
                    assert_eq!(vm.wait_exit(EXIT_TIMEOUT), 0, "power-off, connections open");
                } else {
                    vm.wait_ready();
                }
                for (i, s) in held.iter().chain(&guest_side).enumerate() {
                    read_to_close(s, &format!("{command}: connection {i}"));
                }
            }
        },
    );
}

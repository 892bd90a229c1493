//! virtio throughput (issue 10), minivmm against QEMU microvm, same guest (the Debian vmlinux
//! and the test initramfs, which loads virtio_mmio, virtio_blk and the vsock modules), in the
//! same test host, runs interleaved (minivmm, QEMU, minivmm, ...). Both VMMs offer the devices
//! over virtio-mmio, found by the guest through ACPI (`LNRO0005`).
//!
//! A benchmark, not a test: it asserts only that every step works (and that vsock data arrives
//! intact), and prints figures.
//! `cargo test --release --test virtio_bench -- --ignored --nocapture` (in the emulated test
//! host where `/dev/kvm` cannot boot Linux). `MINIVMM_BENCH_ROUNDS=N` sets the pairs (default 3).
//!
//! - disk read: guest `dd if=/dev/vda of=/dev/null bs=1M iflag=direct` of a 64 MiB raw image
//!   (guest caches dropped first);
//! - disk write: guest `dd if=/dev/zero of=/dev/vda bs=1M count=64 conv=fsync`;
//! - vsock echo: the host sends 32 MiB to a guest `vsock-tool listen PORT echo` while reading
//!   the echo back (32 MiB each way), timed on the host from connect to the echo's end;
//! - vsock guest -> host: guest `vsock-tool connect 2 PORT send 32M` to a host listener (which
//!   answers with a checksum once the data ends), timed in the guest.
//!
//! Every guest measures each figure 3 times and contributes the median (one sample per round).
//! Disk figures are timed in the guest with `/proc/uptime` (10 ms resolution) around the dd.
//! minivmm's disk is a plain file with the host page cache, so QEMU gets `cache=writeback` (its
//! default, aio=threads); the image lives on the test host's tmpfs for both. QEMU's vsock is
//! `vhost-vsock-device` (the L1 kernel's vhost_vsock), reached from the host with AF_VSOCK;
//! minivmm's is its Firecracker-style hybrid vsock (a Unix socket and `CONNECT <port>`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::stream::{echo_exchange, hybrid_connect, hybrid_sink, pattern_hash, sink};
use common::*;
use vmm_sys_util::tempdir::TempDir;

const MIB: u64 = 1 << 20;
const DISK_MIB: u64 = 64;
const VSOCK_MIB: u64 = 32;
/// Guest CID of both VMMs.
const GUEST_CID: u32 = 3;
const ECHO_PORT: u32 = 5000;
const SINK_PORT: u32 = 6000;
/// Hard limit on one measured step (tens of MiB through the nested test host).
const BULK_TIMEOUT: Duration = Duration::from_secs(180);
/// Each guest measures every figure this many times; its sample is their median.
const REPEATS: usize = 3;
/// Hard limit on one emulated test-host run: six guest boots plus the transfers.
const BENCH_L1_TIMEOUT: Duration = Duration::from_secs(900);

/// Interleaved rounds (`MINIVMM_BENCH_ROUNDS`, default 3).
fn rounds() -> usize {
    env_or("MINIVMM_BENCH_ROUNDS", 3)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `min / median / max` of `v`.
fn min_median_max(v: &[f64]) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    format!(
        "{:.1} / {:.1} / {:.1}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn vsock_socket() -> File {
    // SAFETY: socket(2) with constant arguments; the new descriptor is owned by the File.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(
        fd >= 0,
        "AF_VSOCK socket: {} (is vhost_vsock loaded in the test host?)",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let tv = libc::timeval {
        tv_sec: BULK_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt with a valid timeval of the size given.
        unsafe {
            libc::setsockopt(
                f.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
    }
    f
}

/// AF_VSOCK connection from the test host to `cid:port` (retried for a few seconds).
fn vsock_connect(cid: u32, port: u32) -> File {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let f = vsock_socket();
        let a = vsock_addr(cid, port);
        // SAFETY: connect(2) with a valid sockaddr_vm of the size given.
        let rc = unsafe {
            libc::connect(
                f.as_raw_fd(),
                &a as *const libc::sockaddr_vm as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return f;
        }
        let e = std::io::Error::last_os_error();
        assert!(
            Instant::now() < deadline,
            "AF_VSOCK connect to {cid}:{port}: {e}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// AF_VSOCK listener on `port` of the test host; one connection is accepted and sunk.
fn vsock_sink(port: u32) -> thread::JoinHandle<()> {
    let l = vsock_socket();
    let a = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: bind(2)/listen(2) with a valid sockaddr_vm of the size given.
    let rc = unsafe {
        libc::bind(
            l.as_raw_fd(),
            &a as *const libc::sockaddr_vm as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "AF_VSOCK bind: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    let rc = unsafe { libc::listen(l.as_raw_fd(), 4) };
    assert_eq!(
        rc,
        0,
        "AF_VSOCK listen: {}",
        std::io::Error::last_os_error()
    );
    thread::spawn(move || {
        // SAFETY: accept(2) without an address buffer; the descriptor is owned by the File.
        let fd = unsafe { libc::accept(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
        if fd >= 0 {
            // SAFETY: fd is a fresh descriptor nobody else owns.
            sink(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    })
}

// ------------------------------------------------------------------------------------------------
// The VMMs
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vmm {
    Minivmm,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Minivmm => "minivmm",
            Vmm::Qemu => "QEMU microvm",
        }
    }
}

/// A booted guest with its devices.
struct Guest {
    vm: Vm,
    /// minivmm's hybrid vsock socket (None for QEMU, which uses AF_VSOCK).
    vsock: Option<PathBuf>,
    boot_ms: f64,
}

/// The QEMU arguments: microvm (virtio-mmio, ACPI on so the guest finds the devices as
/// `LNRO0005`, like minivmm's), KVM, 1 vCPU, 512 MiB, the same kernel, initramfs and command line.
fn qemu_args(disk: Option<&Path>, vsock: bool) -> Vec<String> {
    let imgs = images();
    let mut a: Vec<String> = [
        "-M",
        "microvm,accel=kvm,acpi=on,auto-kernel-cmdline=off",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-m",
        "512M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend([
        "-kernel".to_string(),
        imgs.vmlinux.display().to_string(),
        "-initrd".to_string(),
        imgs.l2_initramfs.display().to_string(),
        "-append".to_string(),
        guest_cmdline(),
    ]);
    if let Some(d) = disk {
        a.extend([
            "-drive".to_string(),
            format!(
                "file={},format=raw,if=none,id=d0,cache=writeback,aio=threads",
                d.display()
            ),
            "-device".to_string(),
            "virtio-blk-device,drive=d0".to_string(),
        ]);
    }
    if vsock {
        a.extend([
            "-device".to_string(),
            format!("vhost-vsock-device,guest-cid={GUEST_CID}"),
        ]);
    }
    a
}

fn boot(vmm: Vmm, dir: &Path, disk: Option<&Path>, vsock: bool) -> Guest {
    let sock = dir.join("v.sock");
    let _ = std::fs::remove_file(&sock);
    let mut opts = VmOptions::elf();
    match vmm {
        Vmm::Minivmm => {
            if let Some(d) = disk {
                opts = opts.arg(&["--disk", &format!("path={}", d.display())]);
            }
            if vsock {
                opts = opts.arg(&[
                    "--vsock",
                    &format!("cid={GUEST_CID},socket={}", sock.display()),
                ]);
            }
        }
        Vmm::Qemu => {
            opts.program = Some(PathBuf::from("qemu-system-x86_64"));
            opts.raw_args = Some(qemu_args(disk, vsock));
        }
    }
    let t0 = Instant::now();
    let mut vm = Vm::start(opts);
    vm.wait_ready();
    let boot_ms = t0.elapsed().as_secs_f64() * 1e3;
    Guest {
        vm,
        vsock: (vsock && vmm == Vmm::Minivmm).then_some(sock),
        boot_ms,
    }
}

/// Runs `cmd` in the guest between two reads of /proc/uptime; returns the guest-measured seconds.
/// Fails (with the command's stderr) unless `cmd` succeeds.
fn guest_timed(vm: &mut Vm, cmd: &str) -> (f64, String) {
    let out = vm.sh_timeout(
        &format!(
            "read a _ </proc/uptime; {cmd} >/tmp/bench.out 2>/tmp/bench.err; rc=$?; \
             read b _ </proc/uptime; cat /tmp/bench.out /tmp/bench.err; echo \"BENCH-T $a $b $rc\""
        ),
        BULK_TIMEOUT,
    );
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with("BENCH-T "))
        .unwrap_or_else(|| panic!("{cmd}: no timing line in {out:?}"));
    let w: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(w.get(3), Some(&"0"), "guest command {cmd:?} failed: {out}");
    let (a, b): (f64, f64) = (w[1].parse().unwrap(), w[2].parse().unwrap());
    let rest = out
        .lines()
        .filter(|l| !l.starts_with("BENCH-T "))
        .collect::<Vec<_>>()
        .join("\n");
    (b - a, rest)
}

fn mib_per_s(mib: u64, secs: f64) -> f64 {
    mib as f64 / secs.max(0.01)
}

/// Prints the table: per VMM `min / median / max`, and the median of the per-round ratios.
fn table(title: &str, rows: &[(&str, Vec<f64>, Vec<f64>)]) {
    println!();
    println!("{title}");
    println!("| figure (per round: median of 3 in one guest), min / median / max | minivmm | QEMU microvm | minivmm / QEMU (median of pairs) |");
    println!("|---|---|---|---|");
    for (what, ours, theirs) in rows {
        let mut r: Vec<f64> = ours.iter().zip(theirs).map(|(a, b)| a / b).collect();
        println!(
            "| {what} | {} | {} | {:.2} |",
            min_median_max(ours),
            min_median_max(theirs),
            median(&mut r)
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Disk
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Default, Clone)]
struct DiskSample {
    boot_ms: f64,
    read: f64,
    write: f64,
}

fn measure_disk(vmm: Vmm, dir: &Path) -> DiskSample {
    let img = dir.join("disk.img");
    // Real data (no holes), written afresh for every guest.
    std::fs::write(&img, vec![0x5au8; (DISK_MIB * MIB) as usize]).expect("write the image");
    let mut g = boot(vmm, dir, Some(&img), false);
    assert_eq!(
        g.vm.sh("cat /sys/block/vda/size"),
        (DISK_MIB * MIB / 512).to_string(),
        "capacity in sectors"
    );
    let (mut reads, mut writes) = (Vec::new(), Vec::new());
    for _ in 0..REPEATS {
        let (t, log) = guest_timed(
            &mut g.vm,
            "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda of=/dev/null bs=1M iflag=direct",
        );
        println!("[{}] read {DISK_MIB} MiB: {t:.2}s ({log})", vmm.name());
        assert!(log.contains(&format!("{DISK_MIB}+0 records in")), "{log}");
        reads.push(mib_per_s(DISK_MIB, t));
    }
    for _ in 0..REPEATS {
        let (t, log) = guest_timed(
            &mut g.vm,
            &format!("dd if=/dev/zero of=/dev/vda bs=1M count={DISK_MIB} conv=fsync"),
        );
        println!("[{}] write {DISK_MIB} MiB: {t:.2}s ({log})", vmm.name());
        writes.push(mib_per_s(DISK_MIB, t));
    }
    let (read, write) = (median(&mut reads), median(&mut writes));
    g.vm.write_line("poweroff -f");
    g.vm.wait_exit(EXIT_TIMEOUT);
    let head = std::fs::read(&img).expect("read the image back");
    assert!(
        head[..(DISK_MIB * MIB) as usize].iter().all(|&b| b == 0),
        "the guest's zeros did not reach the image"
    );
    DiskSample {
        boot_ms: g.boot_ms,
        read,
        write,
    }
}

#[test]
#[ignore = "benchmark: cargo test --release --test virtio_bench -- --ignored --nocapture"]
fn disk_throughput_against_qemu() {
    run_benchmark_in_test_host("disk_throughput_against_qemu", BENCH_L1_TIMEOUT, || {
        let rounds = rounds();
        println!(
            "virtio-blk throughput: {rounds} rounds, {DISK_MIB} MiB image on tmpfs; {}",
            common::qemu_version("qemu-system-x86_64")
        );
        let dir = TempDir::new().unwrap();
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for vmm in [Vmm::Minivmm, Vmm::Qemu] {
                let s = measure_disk(vmm, dir.as_path());
                println!("round {round}: {} {s:?}", vmm.name());
                if vmm == Vmm::Minivmm {
                    ours.push(s);
                } else {
                    theirs.push(s);
                }
            }
        }
        let col = |v: &[DiskSample], f: fn(&DiskSample) -> f64| v.iter().map(f).collect();
        table(
            &format!(
                "virtio-blk, {rounds} rounds (QEMU: {})",
                common::qemu_version("qemu-system-x86_64")
            ),
            &[
                (
                    "seq read MiB/s (dd bs=1M iflag=direct, 64 MiB)",
                    col(&ours, |s| s.read),
                    col(&theirs, |s| s.read),
                ),
                (
                    "seq write MiB/s (dd bs=1M count=64 conv=fsync)",
                    col(&ours, |s| s.write),
                    col(&theirs, |s| s.write),
                ),
                (
                    "start -> guest shell ready, ms",
                    col(&ours, |s| s.boot_ms),
                    col(&theirs, |s| s.boot_ms),
                ),
            ],
        );
    });
}

// ------------------------------------------------------------------------------------------------
// vsock
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Default, Clone)]
struct VsockSample {
    boot_ms: f64,
    echo: f64,
    to_host: f64,
}

fn measure_vsock(vmm: Vmm, dir: &Path) -> VsockSample {
    let mut g = boot(vmm, dir, None, true);
    assert_eq!(g.vm.sh("cat /sys/bus/virtio/devices/*/device"), "0x0013");
    g.vm.sh(&format!(
        "vsock-tool listen {ECHO_PORT} echo > /tmp/listen.log 2>&1 < /dev/null & true"
    ));
    let log = g.vm.sh("sleep 0.3; cat /tmp/listen.log");
    assert!(log.contains("VSOCK-LISTENING"), "guest listener: {log}");

    let n = VSOCK_MIB * MIB;
    let (mut echoes, mut sends) = (Vec::new(), Vec::new());
    for _ in 0..REPEATS {
        let t0 = Instant::now();
        let conn = match &g.vsock {
            Some(sock) => hybrid_connect(sock, ECHO_PORT, BULK_TIMEOUT),
            None => vsock_connect(GUEST_CID, ECHO_PORT),
        };
        let got = echo_exchange(conn, n);
        let t = t0.elapsed().as_secs_f64();
        assert_eq!(got, (n, pattern_hash(n)), "echoed bytes and checksum");
        println!("[{}] vsock echo {VSOCK_MIB} MiB: {t:.2}s", vmm.name());
        echoes.push(mib_per_s(VSOCK_MIB, t));
    }
    for _ in 0..REPEATS {
        let sink = match &g.vsock {
            Some(sock) => hybrid_sink(sock, SINK_PORT),
            None => vsock_sink(SINK_PORT),
        };
        let (t, out) = guest_timed(
            &mut g.vm,
            &format!("vsock-tool connect 2 {SINK_PORT} send {n}"),
        );
        assert_eq!(out.trim(), format!("{n} {:016x}", pattern_hash(n)));
        sink.join().unwrap();
        println!(
            "[{}] vsock guest -> host {VSOCK_MIB} MiB: {t:.2}s",
            vmm.name()
        );
        sends.push(mib_per_s(VSOCK_MIB, t));
    }
    let (echo, to_host) = (median(&mut echoes), median(&mut sends));
    g.vm.write_line("poweroff -f");
    g.vm.wait_exit(EXIT_TIMEOUT);
    VsockSample {
        boot_ms: g.boot_ms,
        echo,
        to_host,
    }
}

#[test]
#[ignore = "benchmark: cargo test --release --test virtio_bench -- --ignored --nocapture"]
fn vsock_throughput_against_qemu() {
    run_benchmark_in_test_host("vsock_throughput_against_qemu", BENCH_L1_TIMEOUT, || {
        let rounds = rounds();
        println!(
            "vsock throughput: {rounds} rounds, {VSOCK_MIB} MiB per transfer; {}",
            common::qemu_version("qemu-system-x86_64")
        );
        let dir = TempDir::new().unwrap();
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for vmm in [Vmm::Minivmm, Vmm::Qemu] {
                let s = measure_vsock(vmm, dir.as_path());
                println!("round {round}: {} {s:?}", vmm.name());
                if vmm == Vmm::Minivmm {
                    ours.push(s);
                } else {
                    theirs.push(s);
                }
            }
        }
        let col = |v: &[VsockSample], f: fn(&VsockSample) -> f64| v.iter().map(f).collect();
        table(
            &format!(
                "vsock (minivmm hybrid Unix socket, QEMU vhost-vsock-device + AF_VSOCK), \
                 {rounds} rounds (QEMU: {})",
                common::qemu_version("qemu-system-x86_64")
            ),
            &[
                (
                    "host -> guest echo MiB/s (32 MiB each way, host-timed)",
                    col(&ours, |s| s.echo),
                    col(&theirs, |s| s.echo),
                ),
                (
                    "guest -> host send MiB/s (32 MiB, guest-timed)",
                    col(&ours, |s| s.to_host),
                    col(&theirs, |s| s.to_host),
                ),
                (
                    "start -> guest shell ready, ms",
                    col(&ours, |s| s.boot_ms),
                    col(&theirs, |s| s.boot_ms),
                ),
            ],
        );
    });
}

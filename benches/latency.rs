//! Hotplug latency, minivmm against QEMU q35, same guest (the Debian vmlinux and the test
//! initramfs), in the same test host, runs interleaved (minivmm, QEMU, minivmm, ...).
//!
//! A benchmark, not a test: it asserts only that every step happens, and prints figures.
//! `cargo test --release --test latency -- --ignored --nocapture` (in the emulated test host
//! where `/dev/kvm` cannot boot Linux). `MINIVMM_BENCH_ROUNDS=N` sets the pairs (default 3);
//! `MINIVMM_BENCH_MAX_CPUS=M` the possible vCPUs (default 4; QEMU `maxcpus=`);
//! `MINIVMM_BENCH_BASELINE_BIN=PATH` adds a third VMM, an older minivmm build, to every round.
//!
//! Each figure is measured from the host sending the request to the guest printing a line from
//! a tight shell loop of builtins (no fork per iteration), so its resolution is the loop's:
//! - cpu visible: `/sys/devices/system/cpu/cpu1` exists;
//! - mem first / mem full: MemTotal first changes / has grown by 1 GiB (less 16 MiB);
//! - cpu gone: `cpu1` is gone from sysfs after the removal request;
//! - eject done: the VMM reports the eject (minivmm `event cpu-ejected`, QEMU `DEVICE_DELETED`);
//! - control round trip: minivmm `info`, QEMU QMP `query-status` (median of 20);
//! - boot: VMM start -> the guest's `GUEST-READY` line (its shell is up);
//! - own RSS: the VMM's resident memory outside guest RAM (mappings of 64 MiB and more are
//!   taken to be guest RAM), after the boot.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// Possible vCPUs of every VMM (`MINIVMM_BENCH_MAX_CPUS`, default 4).
fn max_cpus() -> u32 {
    env_or("MINIVMM_BENCH_MAX_CPUS", 4)
}

/// Interleaved rounds (`MINIVMM_BENCH_ROUNDS`, default 3).
fn rounds() -> usize {
    env_or("MINIVMM_BENCH_ROUNDS", 3)
}

/// `min / median / max` of `v`, in whole milliseconds.
fn min_median_max(v: &[f64]) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    format!(
        "{:.0} / {:.0} / {:.0}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

/// Hard limit on one measured step.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// One round's figures, in milliseconds.
#[derive(Debug, Clone, Default)]
struct Sample {
    boot: f64,
    own_rss_kib: f64,
    cpu_visible: f64,
    cpu_online: f64,
    mem_reply: f64,
    mem_first: f64,
    mem_full: f64,
    cpu_gone: f64,
    eject_done: f64,
    control_rtt: f64,
}

/// A figure's name and how to read it from a sample.
type Figure = (&'static str, fn(&Sample) -> f64);

const FIGURES: [Figure; 10] = [
    ("start -> guest shell ready", |s| s.boot),
    ("own RSS after boot, KiB (guest RAM excluded)", |s| {
        s.own_rss_kib
    }),
    ("CPU hot-add: request -> cpu1 in sysfs", |s| s.cpu_visible),
    ("CPU online: guest writes cpu1/online -> done", |s| {
        s.cpu_online
    }),
    ("memory +1G: request -> VMM's reply", |s| s.mem_reply),
    ("memory +1G: request -> MemTotal first grows", |s| {
        s.mem_first
    }),
    ("memory +1G: request -> MemTotal +1G", |s| s.mem_full),
    ("CPU hot-remove: request -> cpu1 gone", |s| s.cpu_gone),
    ("CPU hot-remove: request -> eject reported", |s| {
        s.eject_done
    }),
    ("control round trip (median of 20)", |s| s.control_rtt),
];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Starts a guest-side loop (`script` ends by echoing the split `marker`), waits until it runs.
fn start_loop(vm: &mut Vm, script: &str) {
    vm.write_line(&format!("echo LOOP''-STARTED; {script}"));
    vm.wait_for("LOOP-STARTED", STEP_TIMEOUT);
}

/// The guest script that waits for MemTotal to change and then to grow by `kib` (less 16 MiB).
fn mem_loop(kib: u64) -> String {
    format!(
        "read -r k base u < /proc/meminfo; t=$((base + {kib} - 16384)); \
         while read -r k v u < /proc/meminfo; [ $v = $base ]; do :; done; echo MEM''-FIRST; \
         while read -r k v u < /proc/meminfo; [ $v -lt $t ]; do :; done; echo MEM''-FULL"
    )
}
const CPU_ADD_LOOP: &str =
    "while [ ! -e /sys/devices/system/cpu/cpu1 ]; do :; done; echo CPU1''-HERE";
const CPU_GONE_LOOP: &str =
    "while [ -e /sys/devices/system/cpu/cpu1 ]; do :; done; echo CPU1''-GONE";

/// What differs between the VMMs: how a request is sent and how the eject is seen.
trait Driver {
    fn vm(&mut self) -> &mut Vm;
    /// Asks for `n` vCPUs in all (from 1): one request where the VMM takes one.
    fn add_cpus(&mut self, n: u32);
    /// Adds `steps` blocks of `mib` MiB, one request (or DIMM) per block.
    fn add_memory_steps(&mut self, steps: u32, mib: u32);
    /// Asks for the removal and returns when the VMM reports the eject done.
    fn remove_cpu_and_wait_eject(&mut self) -> Instant;
    fn round_trip(&mut self);
}

/// Resident KiB of `pid` outside guest RAM: anonymous mappings that are adjacent are merged
/// (advice such as `MADV_HUGEPAGE` on part of a mapping splits it), and merged ranges of 64 MiB
/// or more are taken to be guest RAM.
fn own_rss_kib(pid: u32) -> f64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    // (start, end, anonymous with these permissions, rss KiB) per mapping.
    let mut maps: Vec<(u64, u64, Option<String>, u64)> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                // Header: range, perms, offset, dev, inode, [path].
                let perms = words.next().unwrap_or("").to_string();
                let anonymous = words.nth(3).is_none().then_some(perms);
                maps.push((a, b, anonymous, 0));
                continue;
            }
        }
        if first == "Rss:" {
            if let Some(m) = maps.last_mut() {
                m.3 += words
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    let mut merged: Vec<(u64, u64, Option<String>, u64)> = Vec::new();
    for m in maps {
        match merged.last_mut() {
            Some(last) if last.2.is_some() && last.2 == m.2 && last.1 == m.0 => {
                last.1 = m.1;
                last.3 += m.3;
            }
            _ => merged.push(m),
        }
    }
    merged
        .iter()
        .filter(|m| m.1 - m.0 < 64 << 20)
        .map(|m| m.3)
        .sum::<u64>() as f64
}

fn measure(d: &mut dyn Driver, boot_ms: f64) -> Sample {
    let mut s = Sample {
        boot: boot_ms,
        ..Sample::default()
    };
    let pid = d.vm().pid();
    s.own_rss_kib = own_rss_kib(pid);
    start_loop(d.vm(), CPU_ADD_LOOP);
    let t0 = Instant::now();
    d.add_cpus(2);
    d.vm().wait_for("CPU1-HERE", STEP_TIMEOUT);
    s.cpu_visible = ms(t0.elapsed());
    // Onlined by the guest (no udev rule in the test guest does it); timed from the loop start.
    start_loop(
        d.vm(),
        "echo 1 > /sys/devices/system/cpu/cpu1/online; echo CPU1''-ONLINE",
    );
    let t0 = Instant::now();
    d.vm().wait_for("CPU1-ONLINE", STEP_TIMEOUT);
    s.cpu_online = ms(t0.elapsed());

    start_loop(d.vm(), &mem_loop(1 << 20));
    let t0 = Instant::now();
    d.add_memory_steps(1, 1024);
    s.mem_reply = ms(t0.elapsed());
    d.vm().wait_for("MEM-FIRST", STEP_TIMEOUT);
    s.mem_first = ms(t0.elapsed());
    d.vm().wait_for("MEM-FULL", STEP_TIMEOUT);
    s.mem_full = ms(t0.elapsed());

    start_loop(d.vm(), CPU_GONE_LOOP);
    let t0 = Instant::now();
    let ejected = d.remove_cpu_and_wait_eject();
    s.eject_done = ms(ejected - t0);
    d.vm().wait_for("CPU1-GONE", STEP_TIMEOUT);
    s.cpu_gone = ms(t0.elapsed());

    let mut rtt: Vec<f64> = (0..20)
        .map(|_| {
            let t0 = Instant::now();
            d.round_trip();
            ms(t0.elapsed())
        })
        .collect();
    s.control_rtt = median(&mut rtt);
    s
}

/// minivmm through its control socket, with a `watch` connection for the eject event.
struct Minivmm {
    vm: Vm,
    watch: BufReader<UnixStream>,
}

impl Minivmm {
    fn boot(bin: &Path) -> (Minivmm, f64) {
        Self::boot_with(bin, max_cpus())
    }

    fn boot_with(bin: &Path, max_cpus: u32) -> (Minivmm, f64) {
        let mut opts = VmOptions::elf()
            .cpus(&format!("boot=1,max={max_cpus}"))
            .memory("size=512M,hotplug_size=2G")
            .control();
        opts.program = Some(bin.to_path_buf());
        let t0 = Instant::now();
        let mut vm = Vm::start(opts);
        vm.wait_ready();
        let boot_ms = ms(t0.elapsed());
        let mut s = vm.control_connect();
        s.write_all(b"watch\n").expect("watch");
        let mut watch = BufReader::new(s);
        let mut line = String::new();
        watch.read_line(&mut line).expect("watch reply");
        assert!(line.starts_with("ok"), "watch: {line}");
        (Minivmm { vm, watch }, boot_ms)
    }
}

impl Driver for Minivmm {
    fn vm(&mut self) -> &mut Vm {
        &mut self.vm
    }
    fn add_cpus(&mut self, n: u32) {
        let r = self.vm.control(&format!("resize cpus={n}"));
        assert!(r.starts_with("ok"), "{r}");
    }
    fn add_memory_steps(&mut self, steps: u32, mib: u32) {
        for i in 1..=steps {
            let r = self.vm.control(&format!("resize mem={}M", 512 + i * mib));
            assert!(r.starts_with("ok"), "{r}");
        }
    }
    fn remove_cpu_and_wait_eject(&mut self) -> Instant {
        let r = self.vm.control("resize cpus=1");
        assert!(r.starts_with("ok"), "{r}");
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.watch.read_line(&mut line).expect("watch stream");
            assert!(n > 0 && Instant::now() < deadline, "no cpu-ejected event");
            if line.starts_with("event cpu-ejected") {
                return Instant::now();
            }
        }
    }
    fn round_trip(&mut self) {
        let r = self.vm.control("info");
        assert!(r.starts_with("ok"), "{r}");
    }
}

/// QEMU q35 with KVM, driven through QMP.
struct Qemu {
    vm: Vm,
    qmp: BufReader<UnixStream>,
    _qmp_path: PathBuf,
}

impl Qemu {
    fn boot(dimm_slots: u32) -> (Qemu, f64) {
        Self::boot_with(dimm_slots, max_cpus())
    }

    fn boot_with(dimm_slots: u32, max_cpus: u32) -> (Qemu, f64) {
        let imgs = images();
        let qmp_path =
            std::env::temp_dir().join(format!("minivmm-latency-{}.qmp", std::process::id()));
        let _ = std::fs::remove_file(&qmp_path);
        let cmdline = format!("{} memhp_default_state=online", guest_cmdline());
        let args: Vec<String> = [
            "-M",
            "q35,accel=kvm",
            "-cpu",
            "host",
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
        .chain([
            "-m".to_string(),
            format!("512M,slots={dimm_slots},maxmem=2560M"),
            "-smp".to_string(),
            format!("1,maxcpus={max_cpus}"),
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
            "-kernel".to_string(),
            imgs.vmlinux.display().to_string(),
            "-initrd".to_string(),
            imgs.l2_initramfs.display().to_string(),
            "-append".to_string(),
            cmdline,
        ])
        .collect();
        let mut opts = VmOptions::elf();
        opts.program = Some(PathBuf::from("qemu-system-x86_64"));
        opts.raw_args = Some(args);
        let t0 = Instant::now();
        let mut vm = Vm::start(opts);
        vm.wait_ready();
        let boot_ms = ms(t0.elapsed());
        let stream = UnixStream::connect(&qmp_path).expect("connect to QMP");
        let mut qmp = BufReader::new(stream);
        let mut greeting = String::new();
        qmp.read_line(&mut greeting).expect("QMP greeting");
        let mut q = Qemu {
            vm,
            qmp,
            _qmp_path: qmp_path,
        };
        q.execute(r#"{"execute":"qmp_capabilities"}"#);
        (q, boot_ms)
    }

    /// Sends one QMP command and returns its `return` line (events before it are skipped).
    fn execute(&mut self, cmd: &str) -> String {
        let s = self.qmp.get_mut();
        s.write_all(cmd.as_bytes()).expect("QMP write");
        s.write_all(b"\n").expect("QMP write");
        self.until(|l| l.contains("\"return\"") || l.contains("\"error\""), cmd)
    }

    fn until(&mut self, want: impl Fn(&str) -> bool, what: &str) -> String {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.qmp.read_line(&mut line).expect("QMP read");
            assert!(
                n > 0 && Instant::now() < deadline,
                "QMP: no answer to {what}"
            );
            if want(&line) {
                assert!(!line.contains("\"error\""), "QMP {what}: {line}");
                return line;
            }
        }
    }
}

impl Driver for Qemu {
    fn vm(&mut self) -> &mut Vm {
        &mut self.vm
    }
    fn add_cpus(&mut self, n: u32) {
        // QEMU adds one CPU per device_add.
        for core in 1..n {
            self.execute(&format!(
                r#"{{"execute":"device_add","arguments":{{"driver":"host-x86_64-cpu","id":"cpu{core}","socket-id":0,"core-id":{core},"thread-id":0}}}}"#
            ));
        }
    }
    fn add_memory_steps(&mut self, steps: u32, mib: u32) {
        for i in 1..=steps {
            self.execute(&format!(
                r#"{{"execute":"object-add","arguments":{{"qom-type":"memory-backend-ram","id":"mem{i}","size":{}}}}}"#,
                u64::from(mib) << 20
            ));
            self.execute(&format!(
                r#"{{"execute":"device_add","arguments":{{"driver":"pc-dimm","id":"dimm{i}","memdev":"mem{i}"}}}}"#
            ));
        }
    }
    fn remove_cpu_and_wait_eject(&mut self) -> Instant {
        self.execute(r#"{"execute":"device_del","arguments":{"id":"cpu1"}}"#);
        self.until(
            |l| l.contains("DEVICE_DELETED") && l.contains("cpu1"),
            "DEVICE_DELETED cpu1",
        );
        Instant::now()
    }
    fn round_trip(&mut self) {
        self.execute(r#"{"execute":"query-status"}"#);
    }
}

fn table(names: &[&str], samples: &[Vec<Sample>]) {
    println!();
    let mut header = String::from("| ms, min / median / max |");
    for n in names {
        header.push_str(&format!(" {n} |"));
    }
    header.push_str(" minivmm / QEMU (median of pairs) |");
    println!("{header}");
    println!("|{}", "---|".repeat(names.len() + 2));
    for (what, f) in FIGURES {
        let mut row = format!("| {what} |");
        for s in samples {
            let v: Vec<f64> = s.iter().map(f).collect();
            row.push_str(&format!(" {} |", min_median_max(&v)));
        }
        let mut ratios: Vec<f64> = samples[0]
            .iter()
            .zip(&samples[1])
            .map(|(a, b)| f(a) / f(b))
            .collect();
        row.push_str(&format!(" {:.2} |", median(&mut ratios)));
        println!("{row}");
    }
}

#[test]
#[ignore = "benchmark: cargo test --release --test latency -- --ignored --nocapture"]
fn hotplug_latency_against_qemu() {
    run_benchmark_in_test_host("hotplug_latency_against_qemu", L1_TIMEOUT, || {
        let rounds = rounds();
        let baseline = std::env::var_os("MINIVMM_BENCH_BASELINE_BIN").map(PathBuf::from);
        println!("hotplug latency: {rounds} rounds, max {} vCPUs", max_cpus());
        let mut names = vec!["minivmm", "QEMU q35"];
        if baseline.is_some() {
            names.push("minivmm baseline");
        }
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); names.len()];
        for round in 0..rounds {
            let (mut vmm, boot) = Minivmm::boot(&minivmm_bin());
            let s = measure(&mut vmm, boot);
            drop(vmm);
            println!("round {round}: minivmm {s:?}");
            samples[0].push(s);
            let (mut vmm, boot) = Qemu::boot(2);
            let s = measure(&mut vmm, boot);
            drop(vmm);
            println!("round {round}: QEMU q35 {s:?}");
            samples[1].push(s);
            if let Some(bin) = &baseline {
                let (mut vmm, boot) = Minivmm::boot(bin);
                let s = measure(&mut vmm, boot);
                drop(vmm);
                println!("round {round}: baseline {s:?}");
                samples[2].push(s);
            }
        }
        table(&names, &samples);
    });
}

/// A scale figure's name and how to read it from (cpus ms, memory ms).
type ScaleFigure = (&'static str, fn(&(f64, f64)) -> f64);

/// Scale: 1 -> 32 vCPUs (one request for minivmm, 31 `device_add`s for QEMU) until the guest
/// sees cpu31, and 16 memory steps of 128 MiB (16 requests / DIMMs) until MemTotal is 2 GiB up.
fn measure_scale(d: &mut dyn Driver) -> (f64, f64) {
    start_loop(
        d.vm(),
        "while [ ! -e /sys/devices/system/cpu/cpu31 ]; do :; done; echo CPU31''-HERE",
    );
    let t0 = Instant::now();
    d.add_cpus(32);
    d.vm().wait_for("CPU31-HERE", STEP_TIMEOUT);
    let cpus = ms(t0.elapsed());
    start_loop(d.vm(), &mem_loop(2 << 20));
    let t0 = Instant::now();
    d.add_memory_steps(16, 128);
    d.vm().wait_for("MEM-FULL", STEP_TIMEOUT);
    (cpus, ms(t0.elapsed()))
}

#[test]
#[ignore = "benchmark: cargo test --release --test latency -- --ignored --nocapture"]
fn hotplug_scale_against_qemu() {
    run_benchmark_in_test_host("hotplug_scale_against_qemu", L1_TIMEOUT, || {
        let rounds = rounds();
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let (mut vmm, _) = Minivmm::boot_with(&minivmm_bin(), 32);
            let s = measure_scale(&mut vmm);
            drop(vmm);
            println!("round {round}: minivmm {s:?}");
            ours.push(s);
            let (mut vmm, _) = Qemu::boot_with(16, 32);
            let s = measure_scale(&mut vmm);
            drop(vmm);
            println!("round {round}: QEMU q35 {s:?}");
            theirs.push(s);
        }
        println!();
        println!(
            "| ms, min / median / max | minivmm | QEMU q35 | minivmm / QEMU (median of pairs) |"
        );
        println!("|---|---|---|---|");
        let rows: [ScaleFigure; 2] = [
            ("1 -> 32 vCPUs: request -> cpu31 in sysfs", |s| s.0),
            ("16 x 128 MiB: first request -> MemTotal +2 GiB", |s| s.1),
        ];
        for (what, f) in rows {
            let a: Vec<f64> = ours.iter().map(f).collect();
            let b: Vec<f64> = theirs.iter().map(f).collect();
            let mut r: Vec<f64> = ours.iter().zip(&theirs).map(|(x, y)| f(x) / f(y)).collect();
            println!(
                "| {what} | {} | {} | {:.2} |",
                min_median_max(&a),
                min_median_max(&b),
                median(&mut r)
            );
        }
    });
}

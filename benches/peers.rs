//! minivmm against QEMU microvm on the host's own `/dev/kvm`, same tiny PVH payload, runs
//! interleaved (minivmm, QEMU, minivmm, ...), so both see the same machine state.
//!
//! `cargo bench --bench peers` (optimized minivmm; QEMU is Debian's `qemu-system-x86_64`).
//! `PEERS_RUNS=N` changes the number of pairs (default 30). Works on PVM too.
//!
//! Measured per run: VMM start → first guest serial byte; start → process exit after the guest
//! triple-faults (`--no-reboot` / `-no-reboot`); peak RSS and CPU time (from `wait4`); with an
//! idle guest: steady RSS and threads. Then start-up (first byte) against `--cpus max=` (1 …
//! 254) and the hotplug window (1 GiB … 64 GiB), which must stay flat. Every figure is min / median / max, and
//! for each pair the ratio minivmm / QEMU (median and range of the ratios). Nothing is asserted:
//! targets are printed as met or missed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/tiny/mod.rs"]
mod tiny;

/// One measured run.
#[derive(Debug, Clone, Copy)]
struct Run {
    first_byte_ms: f64,
    exit_ms: f64,
    max_rss_kib: f64,
    cpu_ms: f64,
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

fn fmt3((min, med, max): (f64, f64, f64)) -> String {
    format!("{min:.2} / {med:.2} / {max:.2}")
}

fn write_guest(name: &str, code: &[u8]) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("minivmm-peers-{}-{name}.elf", std::process::id()));
    std::fs::write(&path, tiny::pvh_elf(code)).expect("write guest");
    path
}

/// minivmm with `sizes` (default: `--memory size=512M`).
fn minivmm(guest: &Path, sizes: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_minivmm"));
    c.arg("--kernel")
        .arg(guest)
        .args(["--no-reboot", "--log-level", "error"]);
    if sizes.is_empty() {
        c.args(["--memory", "size=512M"]);
    } else {
        c.args(sizes);
    }
    c
}

fn qemu(guest: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,pit=off,pic=off,rtc=off",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "512M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
    ])
    .arg(guest);
    c
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// Reads the first output byte of `child`, or fails with what it wrote to stderr.
fn first_byte(child: &mut Child, out: &mut impl Read) {
    let mut byte = [0u8; 1];
    if out.read_exact(&mut byte).is_err() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        panic!("no guest output; stderr: {err}");
    }
}

/// Waits for `child` with `wait4`, returning (peak RSS KiB, user+system CPU ms).
fn wait_rusage(child: &mut Child) -> (f64, f64) {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `ru` are valid for writes.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32, "wait4 failed");
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    (ru.ru_maxrss as f64, ms(ru.ru_utime) + ms(ru.ru_stime))
}

/// Start → first byte and → exit of one run of `cmd` with the triple-fault guest.
fn measure(cmd: Command) -> Run {
    let start = Instant::now();
    let mut child = spawn(cmd);
    let mut out = child.stdout.take().expect("stdout");
    first_byte(&mut child, &mut out);
    let first_byte_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).expect("output");
    let (max_rss_kib, cpu_ms) = wait_rusage(&mut child);
    Run {
        first_byte_ms,
        exit_ms: start.elapsed().as_secs_f64() * 1e3,
        max_rss_kib,
        cpu_ms,
    }
}

/// Steady RSS (KiB) and thread count of `cmd` with an idle guest, 300 ms after its first byte.
/// Threads KVM itself adds to the process (`kvm-nx-lpage-recovery`, one per VM) are not counted.
fn steady(cmd: Command) -> (f64, f64) {
    let mut child = spawn(cmd);
    let mut out = child.stdout.take().expect("stdout");
    first_byte(&mut child, &mut out);
    std::thread::sleep(Duration::from_millis(300));
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("proc status");
    let field = |key: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let kvm_workers = std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("kvm-"))
                })
                .count()
        })
        .unwrap_or(0);
    let r = (field("VmRSS:"), field("Threads:") - kvm_workers as f64);
    let _ = child.kill();
    let _ = child.wait();
    r
}

fn row(what: &str, unit: &str, ours: &[f64], theirs: &[f64]) -> f64 {
    let ratios: Vec<f64> = ours.iter().zip(theirs).map(|(a, b)| a / b).collect();
    let r = stats(&ratios);
    println!(
        "| {what} ({unit}) | {} | {} | {:.2} ({:.2} - {:.2}) |",
        fmt3(stats(ours)),
        fmt3(stats(theirs)),
        r.1,
        r.0,
        r.2
    );
    r.1
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn main() {
    let runs: usize = std::env::var("PEERS_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let fault = write_guest("fault", &tiny::print_then("ready\n", tiny::TRIPLE_FAULT));
    let idle = write_guest("idle", &tiny::print_then("ready\n", tiny::HALT_FOREVER));
    let qemu_version = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|e| {
            panic!("qemu-system-x86_64 is needed (apt-get install qemu-system-x86): {e}")
        });
    println!("peers: {runs} interleaved pairs; QEMU: {qemu_version}; tiny PVH guest, 512M, 1 vCPU");

    // Warm-up (page cache, KVM module state), not counted.
    measure(minivmm(&fault, &[]));
    measure(qemu(&fault));
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        ours.push(measure(minivmm(&fault, &[])));
        theirs.push(measure(qemu(&fault)));
    }
    let col = |v: &[Run], f: fn(&Run) -> f64| v.iter().map(f).collect::<Vec<_>>();
    println!();
    println!("| min / median / max | minivmm | QEMU microvm | ratio (median, range) |");
    println!("|---|---|---|---|");
    let first = row(
        "start → first serial byte",
        "ms",
        &col(&ours, |r| r.first_byte_ms),
        &col(&theirs, |r| r.first_byte_ms),
    );
    let exit = row(
        "start → exit after a guest reset",
        "ms",
        &col(&ours, |r| r.exit_ms),
        &col(&theirs, |r| r.exit_ms),
    );
    row(
        "CPU time, user + system",
        "ms",
        &col(&ours, |r| r.cpu_ms),
        &col(&theirs, |r| r.cpu_ms),
    );
    let peak = row(
        "peak RSS",
        "KiB",
        &col(&ours, |r| r.max_rss_kib),
        &col(&theirs, |r| r.max_rss_kib),
    );
    let (mut rss, mut threads) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for _ in 0..5 {
        let (r, t) = steady(minivmm(&idle, &[]));
        rss.0.push(r);
        threads.0.push(t);
        let (r, t) = steady(qemu(&idle));
        rss.1.push(r);
        threads.1.push(t);
    }
    let steady_rss = row("steady RSS, idle guest (5 pairs)", "KiB", &rss.0, &rss.1);
    row(
        "threads, idle guest (without KVM's own worker)",
        "count",
        &threads.0,
        &threads.1,
    );
    let our_threads = stats(&threads.0).1;
    let our_peak = stats(&col(&ours, |r| r.max_rss_kib)).1;
    println!();
    println!(
        "targets: first byte ≤ 0.25× QEMU: {:.2}× {}",
        first,
        verdict(first <= 0.25)
    );
    println!(
        "targets: exit ≤ 0.25× QEMU: {:.2}× {}",
        exit,
        verdict(exit <= 0.25)
    );
    println!(
        "targets: RSS ≤ 3 MiB: peak {:.2} MiB, steady {:.2} MiB {} (peak ratio {peak:.2}, steady ratio {steady_rss:.2})",
        our_peak / 1024.0,
        stats(&rss.0).1 / 1024.0,
        verdict(our_peak <= 3072.0)
    );
    println!(
        "targets: threads = 1 + vCPUs: {our_threads} {}",
        verdict(our_threads == 2.0)
    );

    // Start-up must not grow with the possible vCPUs or the hotplug window.
    println!();
    println!(
        "| start-up, minivmm only ({runs} runs each, interleaved) | start → first byte ms | start → exit ms | peak RSS KiB | first byte vs first row |"
    );
    println!("|---|---|---|---|---|");
    let configs: [(&str, [&str; 4]); 6] = [
        (
            "max=1 vCPU",
            ["--cpus", "boot=1,max=1", "--memory", "size=512M"],
        ),
        ("max=8", ["--cpus", "boot=1,max=8", "--memory", "size=512M"]),
        (
            "max=64",
            ["--cpus", "boot=1,max=64", "--memory", "size=512M"],
        ),
        (
            "max=254",
            ["--cpus", "boot=1,max=254", "--memory", "size=512M"],
        ),
        (
            "hotplug window 1G",
            ["--cpus", "boot=1", "--memory", "size=512M,hotplug_size=1G"],
        ),
        (
            "hotplug window 64G",
            ["--cpus", "boot=1", "--memory", "size=512M,hotplug_size=64G"],
        ),
    ];
    let mut samples: Vec<Vec<Run>> = vec![Vec::new(); configs.len()];
    for _ in 0..runs {
        for (i, (_, args)) in configs.iter().enumerate() {
            samples[i].push(measure(minivmm(&fault, args)));
        }
    }
    let first = |i: usize| stats(&col(&samples[i], |r| r.first_byte_ms));
    for (i, (name, _)) in configs.iter().enumerate() {
        let exit = stats(&col(&samples[i], |r| r.exit_ms));
        let rss = stats(&col(&samples[i], |r| r.max_rss_kib));
        let base = if i < 4 { first(0).1 } else { first(4).1 };
        println!(
            "| {name} | {} | {} | {:.0} | {:+.1}% |",
            fmt3(first(i)),
            fmt3(exit),
            rss.1,
            (first(i).1 / base - 1.0) * 100.0
        );
    }
    let spread = |a: usize, b: usize| first(b).1 / first(a).1;
    println!(
        "targets: flat within 10%: max 1 → 254 vCPUs {:.2}× {}; window 1G → 64G {:.2}× {}",
        spread(0, 3),
        verdict((spread(0, 3) - 1.0).abs() <= 0.10),
        spread(4, 5),
        verdict((spread(4, 5) - 1.0).abs() <= 0.10)
    );
    let _ = std::fs::remove_file(fault);
    let _ = std::fs::remove_file(idle);
}

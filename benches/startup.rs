//! Start-up benchmark: how fast minivmm reaches a tiny guest's first serial byte, how long a
//! boot-to-power-off run takes, and how much memory minivmm keeps resident.
//!
//! `cargo bench --bench startup` (uses the optimized binary). Runs on any /dev/kvm, PVM
//! included. Prints min / median / max over the runs; nothing is asserted.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/tiny/mod.rs"]
mod tiny;

const RUNS: usize = 30;

fn summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!(
        "min {:.2} / median {:.2} / max {:.2} ms",
        ms[0],
        ms[ms.len() / 2],
        ms[ms.len() - 1]
    )
}

fn write_guest(name: &str, code: &[u8]) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("minivmm-bench-{}-{name}.elf", std::process::id()));
    std::fs::write(&path, tiny::pvh_elf(code)).expect("write guest");
    path
}

fn main() {
    let bin = env!("CARGO_BIN_EXE_minivmm");
    let hello = write_guest("hello", &tiny::print_then("ready\n", tiny::POWER_OFF));
    let mut first = Vec::new();
    let mut total = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let mut child = Command::new(bin)
            .arg("--kernel")
            .arg(&hello)
            .args(["--memory", "size=512M"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn minivmm");
        let mut out = child.stdout.take().expect("stdout");
        let mut byte = [0u8; 1];
        out.read_exact(&mut byte).expect("first byte");
        first.push(start.elapsed().as_secs_f64() * 1e3);
        let mut rest = Vec::new();
        out.read_to_end(&mut rest).expect("output");
        assert!(child.wait().expect("wait").success());
        total.push(start.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "first serial byte ({RUNS} runs, 512M guest): {}",
        summary(first)
    );
    println!("start to exit after power-off:          {}", summary(total));

    // Resident memory while a guest with 512M (+2G hotplug window) waits for input.
    let echo = write_guest("echo", &tiny::echo_until_bang());
    let mut child = Command::new(bin)
        .arg("--kernel")
        .arg(&echo)
        .args([
            "--cpus",
            "boot=2,max=4",
            "--memory",
            "size=512M,hotplug_size=2G",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn minivmm");
    std::thread::sleep(Duration::from_millis(300));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("status");
    for key in ["VmHWM", "VmRSS", "RssAnon"] {
        if let Some(line) = status.lines().find(|l| l.starts_with(key)) {
            println!("{}", line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let size = std::fs::metadata(bin).expect("binary").len();
    println!("binary size: {} KiB", size / 1024);
    let _ = std::fs::remove_file(hello);
    let _ = std::fs::remove_file(echo);
}

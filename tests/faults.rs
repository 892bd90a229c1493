//! The emulated test host's fault counter (issue 23), an ignored test:
//!
//! ```sh
//! MINIVMM_FAULTS_PLAN=boot:300,reboot-efi:60,reboot-acpi:60,reboot-kbd:60,reboot-pci:60,reboot-triple:60,online:1000 \
//!     cargo test --release --test faults -- --ignored --nocapture
//! ```
//!
//! It runs the plan's operations on real Linux guests (2 boot vCPUs, so every boot also starts
//! an AP) and counts the faults of each operation by kind ([`FaultKind`]): L2 boots (boot to the
//! shell, `poweroff -f`), reboots through each path (`reboot -f` on a guest booted with
//! `reboot=PATH`; `efi` is the kernel's default here, through real mode to the reset vector) and
//! CPU offline/online cycles of cpu1. In the emulated host a fault ends that host's run: the
//! counter records it against the operation in progress and starts a fresh host for the rest of
//! the plan (at most `MINIVMM_FAULTS_MAX_RUNS` hosts, default 20). On hardware KVM the plan runs
//! directly. The report (the plan, the counts, QEMU's version and minivmm's commit) is printed and
//! written to `target/test-logs/faults.txt`; the test fails if any operation faulted.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    is_inner_run, log_dir, run_emulated_once, say, test_host, FaultKind, TestHost, Vm, VmOptions,
    EXIT_TIMEOUT,
};

/// The plan when `MINIVMM_FAULTS_PLAN` is unset: a quick look (about 10 minutes emulated).
const DEFAULT_PLAN: &str = "boot:10,reboot-efi:10,reboot-acpi:10,online:100";
const BEGIN: &str = "FAULTS-BEGIN ";
const DONE: &str = "FAULTS-DONE ";
/// One emulated host's time limit: the plan keeps it busy, printing as it goes.
const L1_LIMIT: Duration = Duration::from_secs(4 * 3600);

/// `op:count` pairs, in order.
fn parse_plan(text: &str) -> Vec<(String, u32)> {
    text.split(',')
        .filter(|w| !w.is_empty())
        .map(|w| {
            let (op, n) = w
                .split_once(':')
                .unwrap_or_else(|| panic!("MINIVMM_FAULTS_PLAN: {w:?} is not OP:COUNT"));
            let n = n
                .parse()
                .unwrap_or_else(|_| panic!("MINIVMM_FAULTS_PLAN: {w:?}: bad count"));
            assert!(
                op == "boot" || op == "online" || op.starts_with("reboot-"),
                "MINIVMM_FAULTS_PLAN: unknown operation {op:?} (boot, reboot-PATH, online)"
            );
            (op.to_string(), n)
        })
        .collect()
}

fn format_plan(plan: &[(String, u32)]) -> String {
    plan.iter()
        .filter(|(_, n)| *n > 0)
        .map(|(op, n)| format!("{op}:{n}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A guest for `op`: 2 boot vCPUs; a reboot operation boots with its `reboot=` path. The boot
/// is announced as `boot (setup)`, so a fault in it is told from one of the operation's.
fn guest_for(op: &str) -> Vm {
    if op != "boot" {
        say(&format!("{BEGIN}boot (setup)"));
    }
    let mut opts = VmOptions::bzimage().cpus("boot=2,max=2");
    match op.strip_prefix("reboot-") {
        // The kernel's default on this machine (no `reboot=`): efi, then bios, through real mode.
        Some("efi") | None => {}
        Some(path) => opts = opts.cmdline_add(&format!("reboot={path}")),
    }
    let vm = Vm::boot(opts);
    if op != "boot" {
        say(&format!("{DONE}boot (setup)"));
    }
    vm
}

/// The inner run: carries out the plan, announcing each operation before and after it.
fn run_plan(plan: &[(String, u32)]) {
    for (op, n) in plan {
        if *n == 0 {
            continue;
        }
        match op.as_str() {
            "boot" => {
                for _ in 0..*n {
                    say(&format!("{BEGIN}{op}"));
                    let mut vm = guest_for(op);
                    vm.write_line("poweroff -f");
                    assert_eq!(vm.wait_exit(EXIT_TIMEOUT), 0, "poweroff -f");
                    say(&format!("{DONE}{op}"));
                }
            }
            "online" => {
                let mut vm = guest_for(op);
                for _ in 0..*n {
                    say(&format!("{BEGIN}{op}"));
                    vm.sh("echo 0 > /sys/devices/system/cpu/cpu1/online && \
                         echo 1 > /sys/devices/system/cpu/cpu1/online && \
                         test $(cat /sys/devices/system/cpu/online) = 0-1");
                    say(&format!("{DONE}{op}"));
                }
                vm.write_line("poweroff -f");
                assert_eq!(vm.wait_exit(EXIT_TIMEOUT), 0);
            }
            _ => {
                let mut vm = guest_for(op);
                for _ in 0..*n {
                    say(&format!("{BEGIN}{op}"));
                    vm.write_line("reboot -f");
                    vm.wait_ready();
                    assert_eq!(vm.nproc(), 2, "vCPUs after the reboot");
                    say(&format!("{DONE}{op}"));
                }
                vm.write_line("poweroff -f");
                assert_eq!(vm.wait_exit(EXIT_TIMEOUT), 0);
            }
        }
    }
}

/// Operations completed in `console`, and the one begun but not completed.
fn progress(console: &str) -> (BTreeMap<String, u32>, Option<String>) {
    let mut done = BTreeMap::new();
    let mut open = None;
    for line in console.lines() {
        if let Some(op) = line.split(BEGIN).nth(1) {
            open = Some(op.trim().to_string());
        } else if let Some(op) = line.split(DONE).nth(1) {
            *done.entry(op.trim().to_string()).or_insert(0) += 1;
            open = None;
        }
    }
    (done, open)
}

fn tool_versions() -> String {
    let version = common::qemu_version(&common::l1_qemu());
    let commit = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "QEMU: {version}; minivmm: {commit}; L1 kvm_amd {}",
        common::l1_kvm_amd_params()
    )
}

#[test]
#[ignore = "a long measurement: run it by name (see the module doc)"]
fn fault_counter() {
    let plan = parse_plan(&common::env_or(
        "MINIVMM_FAULTS_PLAN",
        DEFAULT_PLAN.to_string(),
    ));
    if is_inner_run() || test_host() == TestHost::Direct {
        run_plan(&plan);
        return;
    }
    let max_runs: u32 = common::env_or("MINIVMM_FAULTS_MAX_RUNS", 20);
    let mut left = plan.clone();
    let mut done: BTreeMap<String, u32> = BTreeMap::new();
    let mut faults: Vec<(String, FaultKind, String)> = Vec::new();
    let started = std::time::Instant::now();
    let mut idle_runs = 0;
    for run in 1..=max_runs {
        if left.iter().all(|(_, n)| *n == 0) {
            break;
        }
        if idle_runs >= 2 {
            say("[faults] two emulated hosts in a row did nothing: stopping");
            break;
        }
        std::env::set_var("MINIVMM_FAULTS_PLAN", format_plan(&left));
        let l1 = run_emulated_once("fault_counter", L1_LIMIT);
        let (now_done, open) = progress(&l1.console);
        if now_done.is_empty() && open.is_none() {
            idle_runs += 1;
        } else {
            idle_runs = 0;
        }
        for (op, n) in &mut left {
            let k = now_done.get(op.as_str()).copied().unwrap_or(0);
            *n = n.saturating_sub(k);
            *done.entry(op.clone()).or_insert(0) += k;
        }
        if let Some(problem) = l1.problem() {
            let op = open.unwrap_or_else(|| "(between operations)".to_string());
            let kept = l1
                .log_path
                .with_extension(format!("{}.run{run}.log", std::process::id()));
            let _ = std::fs::rename(&l1.log_path, &kept);
            say(&format!(
                "[faults] run {run}: {op}: {}: {problem} (log {})",
                l1.fault(),
                kept.display()
            ));
            // The operation in progress counts as attempted: it is not retried.
            if let Some((_, n)) = left.iter_mut().find(|(o, _)| *o == op) {
                *n = n.saturating_sub(1);
            }
            faults.push((op, l1.fault(), kept.display().to_string()));
        }
    }
    let mut report = format!(
        "fault counter, {:.0} s: plan {}\n{}\n",
        started.elapsed().as_secs_f64(),
        format_plan(&plan),
        tool_versions()
    );
    let setup = ("boot (setup)".to_string(), 0);
    for (op, planned) in plan.iter().chain([&setup]) {
        let ok = done.get(op).copied().unwrap_or(0);
        let mut kinds: BTreeMap<String, u32> = BTreeMap::new();
        for (o, kind, _) in &faults {
            if o == op {
                *kinds.entry(kind.to_string()).or_insert(0) += 1;
            }
        }
        let failed: u32 = kinds.values().sum();
        report.push_str(&format!(
            "  {op:<14} planned {planned:>5}  passed {ok:>5}  faults {failed:>3} {kinds:?}\n"
        ));
    }
    for (op, kind, log) in &faults {
        report.push_str(&format!("  fault: {op}: {kind}: {log}\n"));
    }
    let unreached: u32 = left.iter().map(|(_, n)| n).sum();
    if unreached > 0 {
        report.push_str(&format!(
            "  not reached: {} (MINIVMM_FAULTS_MAX_RUNS={max_runs})\n",
            format_plan(&left)
        ));
    }
    say(&report);
    let _ = std::fs::write(log_dir().join("faults.txt"), &report);
    assert!(
        faults.is_empty() && unreached == 0,
        "the emulated test host faulted:\n{report}"
    );
}

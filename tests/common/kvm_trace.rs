//! `MINIVMM_TEST_KVM_TRACE=1`: the KVM tracepoints of the kernel that runs minivmm, around a guest
//! triple fault, printed when a test fails.
//!
//! KVM on AMD re-initialises a vCPU before it reports a shutdown (triple fault), so minivmm can only
//! log the reset vector. The host kernel's `kvm:kvm_exit` tracepoint still records the faulting RIP
//! and the event that was being delivered (`intr_info`, `error_code`). With this switch the harness
//! enables the `kvm:*` events (all but the per-entry ones), stops tracing at the first shutdown exit
//! (an ftrace trigger), and a failing test prints the last [`TAIL`] trace lines before it. In the
//! emulated test host the L1 kernel is the guest's kernel, so each `rip` is also given as
//! `<symbol+offset>` through L1's `/proc/kallsyms` (the L2 guest boots its vmlinux without KASLR).

use std::fs;
use std::path::Path;

const TRACEFS: &str = "/sys/kernel/tracing";
/// Trace lines printed before the shutdown.
const TAIL: usize = 3000;
/// `kvm_exit` reasons of a triple fault: SVM_EXIT_SHUTDOWN (0x7f) and VMX's EXIT_REASON_TRIPLE_FAULT.
const TRIGGER: &str = "traceoff if exit_reason == 127 || exit_reason == 2";

/// True when `MINIVMM_TEST_KVM_TRACE=1`.
pub fn wanted() -> bool {
    std::env::var_os("MINIVMM_TEST_KVM_TRACE").is_some_and(|v| v == "1")
}

fn write(file: &str, value: &str) {
    let path = format!("{TRACEFS}/{file}");
    if let Err(e) = fs::write(&path, value) {
        panic!("MINIVMM_TEST_KVM_TRACE: writing {value:?} to {path}: {e} (needs root and tracefs)");
    }
}

/// Clears the trace buffer and starts tracing KVM events (needs root).
pub fn start() {
    if !Path::new(TRACEFS).join("trace").exists() {
        let status = std::process::Command::new("mount")
            .args(["-t", "tracefs", "tracefs", TRACEFS])
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "MINIVMM_TEST_KVM_TRACE: mount -t tracefs: {status:?}"
        );
    }
    write("tracing_on", "0");
    write("buffer_size_kb", "16384");
    write("trace", "");
    write("events/kvm/enable", "1");
    // One line per entry and FPU switch would push the interesting ones out of the buffer.
    write("events/kvm/kvm_entry/enable", "0");
    write("events/kvm/kvm_fpu/enable", "0");
    write("events/kvm/kvm_exit/trigger", TRIGGER);
    write("tracing_on", "1");
    println!("kvm trace: on (stops at the first shutdown exit)");
}

/// Stops tracing and prints the lines before (and just after) the first shutdown exit, or the last
/// [`TAIL`] lines if there was none.
pub fn dump() {
    write("tracing_on", "0");
    let text = fs::read_to_string(format!("{TRACEFS}/trace")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let shutdown = lines
        .iter()
        .position(|l| l.contains("kvm_exit:") && l.contains("reason shutdown"));
    let end = shutdown.map_or(lines.len(), |i| i + 1);
    let start = end.saturating_sub(TAIL);
    let symbols = Symbols::load();
    println!(
        "--- kvm trace: {} lines, shutdown exit {} ---",
        lines.len(),
        shutdown.map_or("none".to_string(), |i| format!("at line {i}"))
    );
    for line in &lines[start..end] {
        println!("{line}{}", symbols.annotate(line));
    }
    // A hang has no fatal line: what each vCPU thread did last tells a vCPU that stopped running
    // (or never ran) from one spinning in the guest.
    println!("--- kvm trace: the last {PER_THREAD} lines of each thread ---");
    for (task, count, last) in per_thread(&lines[..end]) {
        println!("{task}: {count} lines");
        for line in last {
            println!("    {line}{}", symbols.annotate(line));
        }
    }
    println!("--- kvm trace end ---");
}

/// Trace lines shown per thread in the summary.
const PER_THREAD: usize = 5;

/// Groups trace lines by their task column (`vcpu3-206`): each task's line count and last
/// [`PER_THREAD`] lines, in order of first appearance.
fn per_thread<'a>(lines: &[&'a str]) -> Vec<(&'a str, usize, Vec<&'a str>)> {
    let mut out: Vec<(&'a str, usize, Vec<&'a str>)> = Vec::new();
    for &line in lines {
        let Some(task) = line.split_whitespace().next() else {
            continue;
        };
        let i = match out.iter().position(|t| t.0 == task) {
            Some(i) => i,
            None => {
                out.push((task, 0, Vec::new()));
                out.len() - 1
            }
        };
        let entry = &mut out[i];
        entry.1 += 1;
        entry.2.push(line);
        if entry.2.len() > PER_THREAD {
            entry.2.remove(0);
        }
    }
    out
}

/// L1's kernel text symbols, rebased to the guest's non-KASLR addresses, and L1's module text
/// symbols at their own addresses.
struct Symbols {
    /// (address relative to `_text`, name) of the kernel image, sorted.
    text: Vec<(u64, String)>,
    /// Size of the kernel image's text (`_etext - _text`).
    text_size: u64,
    /// (address, `name [module]`) of L1's loaded modules, sorted. A guest RIP there is not the
    /// guest's own code but L1's (seen: an L2 vCPU "running" at `__svm_vcpu_run+0x9c` of L1's
    /// kvm_amd, the instruction after L1's VMRUN).
    modules: Vec<(u64, String)>,
}

/// Where a non-relocated x86-64 kernel's `_text` starts.
const KERNEL_TEXT: u64 = 0xffff_ffff_8100_0000;

/// How far past a module symbol an address still counts as inside it.
const MODULE_SYMBOL_REACH: u64 = 0x10000;

impl Symbols {
    fn load() -> Symbols {
        let none = Symbols {
            text: Vec::new(),
            text_size: 0,
            modules: Vec::new(),
        };
        if !super::is_inner_run() {
            // On a direct host the host kernel is not the guest's.
            return none;
        }
        let all = fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        // (address, name, module or "")
        let parsed: Vec<(u64, &str, &str)> = all
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let kind = it.next()?;
                let name = it.next()?;
                let module = it.next().unwrap_or("");
                (kind == "t" || kind == "T").then_some((addr, name, module))
            })
            .collect();
        let find = |name: &str| parsed.iter().find(|s| s.1 == name && s.2.is_empty());
        let Some(base) = find("_text").map(|s| s.0) else {
            return none;
        };
        let text_size = find("_etext").map_or(u64::MAX, |s| s.0.saturating_sub(base));
        let mut text: Vec<(u64, String)> = parsed
            .iter()
            .filter(|s| s.2.is_empty() && s.0 >= base)
            .map(|&(a, n, _)| (a - base, n.to_string()))
            .collect();
        text.sort();
        let mut modules: Vec<(u64, String)> = parsed
            .iter()
            .filter(|s| !s.2.is_empty())
            .map(|&(a, n, m)| (a, format!("{n} {m}")))
            .collect();
        modules.sort();
        Symbols {
            text,
            text_size,
            modules,
        }
    }

    /// `  <symbol+0xoff>` for the line's `rip 0x...`, or nothing.
    fn annotate(&self, line: &str) -> String {
        let Some(rip) = line
            .split("rip 0x")
            .nth(1)
            .and_then(|r| u64::from_str_radix(r.split_whitespace().next()?, 16).ok())
        else {
            return String::new();
        };
        if let Some(off) = rip.checked_sub(KERNEL_TEXT).filter(|&o| o < self.text_size) {
            return match self.text.partition_point(|s| s.0 <= off) {
                0 => String::new(),
                i => format!("  <{}+{:#x}>", self.text[i - 1].1, off - self.text[i - 1].0),
            };
        }
        match self.modules.partition_point(|s| s.0 <= rip) {
            0 => String::new(),
            i if rip - self.modules[i - 1].0 < MODULE_SYMBOL_REACH => {
                let (addr, name) = &self.modules[i - 1];
                format!("  <L1 module text: {name} +{:#x}>", rip - addr)
            }
            _ => String::new(),
        }
    }
}

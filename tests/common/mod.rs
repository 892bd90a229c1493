//! Shared harness for minivmm's real-Linux boot tests.
//!
//! * **Test host.** [`run_in_test_host`] runs a test body where a real Linux guest can boot: directly when
//!   the machine has hardware KVM, or inside an emulated test host (QEMU TCG with an SVM CPU, whose Debian
//!   kernel loads `kvm_amd`) when `/dev/kvm` is PVM or missing. The emulated host ("L1") runs this very test
//!   executable on the host root shared read-only over 9p, with `MINIVMM_TEST_HOST=direct`.
//!   `MINIVMM_TEST_HOST=direct|emulated` forces the choice. The emulated host loads `kvm_amd` with
//!   [`l1_kvm_amd_params`] (`MINIVMM_TEST_L1_KVM_AMD`, default `npt=1`); its vCPU count is
//!   `MINIVMM_TEST_L1_SMP` (default 2), how many run at once `MINIVMM_TEST_L1_PARALLEL` (default 2),
//!   QEMU's TCG options `MINIVMM_TEST_L1_TCG` (default
//!   `thread=multi,tb-size=512`) and the QEMU binary `MINIVMM_TEST_L1_QEMU` (default
//!   `qemu-system-x86_64`), for experiments with the emulated host's own faults.
//! * **Diagnosis.** `MINIVMM_TEST_KVM_TRACE=1` traces KVM in the kernel that runs minivmm and prints
//!   the trace up to a guest triple fault when a test fails (see [`kvm_trace`]).
//! * **Guest driver.** [`Vm`] spawns minivmm with the serial console on pipes, waits for the guest's
//!   `GUEST-READY` marker, runs shell commands through an echo-proof marker protocol and talks to the
//!   control socket.
//!
//! Images come from `tests/guest/build-images.sh` (into `tests/.cache/`); they are built on first use.
//! Logs: `target/test-logs/<test>.l1.log` (emulated host console) and `<test>.l2.<n>.log` (guest console,
//! direct runs); inside the emulated host the guest logs are printed to the console instead, so they end up
//! in the L1 log.

#![allow(dead_code)] // Each test crate uses a different subset.

pub mod kvm_trace;
pub mod stream;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Hard limit on one emulated test-host (L1) run, from QEMU start to exit.
pub const L1_TIMEOUT: Duration = Duration::from_secs(300);
/// An emulated test host whose console stays silent this long has frozen: every inner step
/// prints or fails within [`L2_BOOT_TIMEOUT`]. Seen now and then at an L2 reboot (nested SVM
/// under TCG): the L1 kernel stops, sometimes after a soft-lockup report. Such a run is killed;
/// like any failed run in the emulated host, it is run again (see [`run_in_test_host`]).
pub const L1_SILENCE_LIMIT: Duration = Duration::from_secs(120);
/// Runs of one test in the emulated host before its failure counts (see [`run_in_test_host`]).
pub const L1_ATTEMPTS: u32 = 3;
/// Hard limit on one guest (L2) boot, from minivmm start (or reboot) to `GUEST-READY`.
pub const L2_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Hard limit on one guest shell command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// Hard limit on one control-pipe request (connect + reply).
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Hard limit on minivmm exiting after the guest was told to power off or reboot.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Guest kernel command line used by the tests, as a user would write it: no `reboot=`, `panic=`
/// or `pci=off`, so the kernel's own default reboot path is the one exercised (`quiet` keeps
/// kernel messages out of command output). With a hotplug window minivmm appends
/// `memhp_default_state=online` itself, which the memory tests rely on: the guest runs no udev to
/// online hot-added blocks.
pub const GUEST_CMDLINE: &str = "console=ttyS0 quiet";
/// The guest prints this (followed by ` uptime=<seconds>`) once its shell owns the console.
pub const READY_MARKER: &str = "GUEST-READY";

const L1_RESULT_MARKER: &str = "MVM-L1-RESULT rc=";
const L1_STEP_MARKER: &str = "MVM-L1-STEP ";
/// Set in the emulated host's environment so the inner run knows the share is read-only.
const INNER_ENV: &str = "MINIVMM_TEST_INNER";
const HOST_ENV: &str = "MINIVMM_TEST_HOST";
/// Optional override of the minivmm binary under test.
const BIN_ENV: &str = "MINIVMM_TEST_BIN";
/// Lines of each log printed when a test fails.
const TAIL_LINES: usize = 60;

// ------------------------------------------------------------------------------------------------------
// Paths and images
// ------------------------------------------------------------------------------------------------------

/// The crate root (tests run with it as working directory).
pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The minivmm binary under test: `$MINIVMM_TEST_BIN` or the one cargo built for this test run.
pub fn minivmm_bin() -> PathBuf {
    match std::env::var_os(BIN_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_minivmm")),
    }
}

/// The guest command line for this test host.
///
/// Inside the emulated test host the guest gets `noxsave`: QEMU's TCG SVM does not deliver the
/// XSETBV intercept, so L1 KVM never learns the guest's XCR0 and reloads a stale one (x87 only)
/// on every VM entry. A guest using XSAVE then warns "XSAVE consistency problem" at boot, and this
/// is the likely cause of the two guest triple faults seen in about 150 emulated boots. With
/// FXSAVE the guest does not depend on XCR0. On hardware KVM the guest keeps XSAVE.
pub fn guest_cmdline() -> String {
    if is_inner_run() {
        format!("{GUEST_CMDLINE} noxsave")
    } else {
        GUEST_CMDLINE.to_string()
    }
}

/// True inside the emulated test host (the host root is a read-only share there).
pub fn is_inner_run() -> bool {
    std::env::var_os(INNER_ENV).is_some_and(|v| v == "1")
}

/// Where logs go: `target/test-logs` (or a tmpfs directory inside the emulated host).
pub fn log_dir() -> PathBuf {
    let dir = if is_inner_run() {
        std::env::temp_dir().join("minivmm-test-logs")
    } else {
        // CARGO_TARGET_TMPDIR is <target>/tmp.
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        tmp.parent()
            .map_or(tmp.clone(), Path::to_path_buf)
            .join("test-logs")
    };
    if let Err(e) = fs::create_dir_all(&dir) {
        panic!("cannot create the log directory {}: {e}", dir.display());
    }
    dir
}

/// The guest images built by `tests/guest/build-images.sh`.
#[derive(Debug, Clone)]
pub struct Images {
    /// Debian bzImage (L1 and L2 kernel).
    pub bzimage: PathBuf,
    /// The same kernel as an ELF vmlinux with the PVH note.
    pub vmlinux: PathBuf,
    /// Kernel release string, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// Busybox guest initramfs.
    pub l2_initramfs: PathBuf,
    /// Emulated test host initramfs.
    pub l1_initramfs: PathBuf,
}

/// Returns the guest images, building them first (once per process) unless inside the emulated host.
pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let cache = repo_dir().join("tests/.cache");
        if !is_inner_run() {
            let script = repo_dir().join("tests/guest/build-images.sh");
            let out = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            if !out.status.success() {
                panic!(
                    "{} failed ({}):\n{}{}",
                    script.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let imgs = Images {
            bzimage: cache.join("kernel/vmlinuz"),
            vmlinux: cache.join("kernel/vmlinux"),
            release: fs::read_to_string(cache.join("kernel/release"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            l2_initramfs: cache.join("l2-initramfs.gz"),
            l1_initramfs: cache.join("l1-initramfs.gz"),
        };
        for p in [
            &imgs.bzimage,
            &imgs.vmlinux,
            &imgs.l2_initramfs,
            &imgs.l1_initramfs,
        ] {
            assert!(
                p.is_file(),
                "missing guest image {} (run tests/guest/build-images.sh)",
                p.display()
            );
        }
        imgs
    })
}

// ------------------------------------------------------------------------------------------------------
// Test host selection
// ------------------------------------------------------------------------------------------------------

/// Where real Linux guests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestHost {
    /// minivmm runs on this machine's hardware KVM.
    Direct,
    /// minivmm runs inside QEMU TCG (`-cpu EPYC`, nested `kvm_amd`).
    Emulated,
}

/// The facts the automatic choice is based on.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// `vmx` or `svm` in the CPU flags.
    pub hw_virt: bool,
    /// `/sys/module/kvm_pvm` exists (software PVM hypervisor).
    pub pvm: bool,
    /// The emulated host's QEMU ([`l1_qemu`], by default `qemu-system-x86_64` on PATH) exists.
    pub qemu: bool,
}

impl HostFacts {
    /// Probes this machine.
    pub fn probe() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostFacts {
            dev_kvm: Path::new("/dev/kvm").exists(),
            hw_virt: cpu_has_hw_virt(&cpuinfo),
            pvm: Path::new("/sys/module/kvm_pvm").exists(),
            qemu: which(&l1_qemu()).is_some(),
        }
    }
}

/// True when a `flags` line of /proc/cpuinfo lists `vmx` or `svm`.
pub fn cpu_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

/// Chooses the test host: `forced` (the `MINIVMM_TEST_HOST` value) wins; otherwise direct on hardware
/// KVM, emulated when QEMU is available. Returns the choice and the reason, or an error naming what to
/// install.
pub fn choose_test_host(
    facts: &HostFacts,
    forced: Option<&str>,
) -> Result<(TestHost, String), String> {
    match forced.map(str::trim) {
        Some("direct") => return Ok((TestHost::Direct, format!("forced by {HOST_ENV}=direct"))),
        Some("emulated") if facts.qemu => {
            return Ok((TestHost::Emulated, format!("forced by {HOST_ENV}=emulated")))
        }
        Some("emulated") => {
            return Err(format!(
                "{HOST_ENV}=emulated but qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
            ))
        }
        Some("") | None => {}
        Some(other) => return Err(format!("{HOST_ENV}={other:?} is invalid: use direct or emulated")),
    }
    if facts.dev_kvm && facts.hw_virt && !facts.pvm {
        return Ok((
            TestHost::Direct,
            "hardware KVM (/dev/kvm, vmx/svm, no kvm_pvm)".into(),
        ));
    }
    let why = if facts.pvm {
        "/dev/kvm is PVM (kvm_pvm loaded): stock Linux guests cannot boot on it"
    } else if !facts.dev_kvm {
        "no /dev/kvm"
    } else {
        "no vmx/svm CPU flag"
    };
    if facts.qemu {
        Ok((
            TestHost::Emulated,
            format!("{why}; using QEMU TCG -cpu EPYC with nested kvm_amd"),
        ))
    } else {
        Err(format!(
            "cannot run real-Linux guest tests: {why}, and qemu-system-x86_64 is not installed \
             (apt-get install qemu-system-x86)"
        ))
    }
}

/// The test host for this process (decided once, printed once).
pub fn test_host() -> TestHost {
    static HOST: OnceLock<TestHost> = OnceLock::new();
    *HOST.get_or_init(|| {
        let forced = std::env::var(HOST_ENV).ok();
        match choose_test_host(&HostFacts::probe(), forced.as_deref()) {
            Ok((host, why)) => {
                if !is_inner_run() {
                    say(&format!("minivmm tests: test host {host:?} ({why})"));
                }
                host
            }
            Err(e) => panic!("{e}"),
        }
    })
}

/// Writes a line to the real stderr, bypassing libtest's output capture (for progress and timings).
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The value of environment variable `name` parsed as a `T`, or `default` when it is unset or does
/// not parse.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Locates an executable on PATH (or `name` itself when it is a path).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs `body` where real Linux guests can boot. `name` must be the test function's name (it is how the
/// emulated host finds the test again).
///
/// In the emulated test host a failed run is run again in a fresh host, up to [`L1_ATTEMPTS`] runs
/// in all, each failure printed as a WARNING, and a pass on a later run prints FLAKY: QEMU's TCG
/// emulation of nested SVM has rare faults of its own (a frozen L1, or an L2 guest that
/// triple-faults at random: a few first runs fail in every CI run, and with two runs one test in
/// about five CI runs failed both). A deterministic regression still fails every run. On hardware
/// KVM (`Direct`) nothing is retried.
pub fn run_in_test_host(name: &str, body: impl FnOnce()) {
    run_in_test_host_for(name, L1_TIMEOUT, body);
}

/// [`run_in_test_host`] with a longer hard limit on each emulated test-host run than
/// [`L1_TIMEOUT`] (for the resize soak).
pub fn run_in_test_host_for(name: &str, l1_timeout: Duration, body: impl FnOnce()) {
    run_in_test_host_as(name, l1_timeout, L1Share::Shared, body);
}

/// [`run_in_test_host_for`] for a benchmark: in the emulated test host no other host runs beside
/// it, so its figures are not another test's load.
pub fn run_benchmark_in_test_host(name: &str, l1_timeout: Duration, body: impl FnOnce()) {
    run_in_test_host_as(name, l1_timeout, L1Share::Alone, body);
}

fn run_in_test_host_as(name: &str, l1_timeout: Duration, share: L1Share, body: impl FnOnce()) {
    if let Some(thread_name) = thread::current().name() {
        assert!(
            thread_name == "main" || thread_name == name || thread_name.ends_with(&format!("::{name}")),
            "run_in_test_host({name:?}) called from test {thread_name:?}: pass the test function's name"
        );
    }
    match test_host() {
        TestHost::Direct => {
            set_current_test(name);
            if !kvm_trace::wanted() {
                body();
                return;
            }
            kvm_trace::start();
            if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                kvm_trace::dump();
                std::panic::resume_unwind(panic);
            }
        }
        TestHost::Emulated => run_emulated(name, l1_timeout, share),
    }
}

fn current_test_slot() -> &'static Mutex<String> {
    static CURRENT: OnceLock<Mutex<String>> = OnceLock::new();
    CURRENT.get_or_init(|| Mutex::new(String::from("test")))
}

fn set_current_test(name: &str) {
    *lock(current_test_slot()) = name.to_string();
}

fn current_test() -> String {
    lock(current_test_slot()).clone()
}

/// Locks a mutex, ignoring poisoning (a failed test must not fail the following ones).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ------------------------------------------------------------------------------------------------------
// The emulated test host (L1)
// ------------------------------------------------------------------------------------------------------

/// Bounds the emulated test hosts running at once on this machine to [`l1_parallel`] (QEMU TCG
/// needs the cores): one lock file per slot, held while a host runs, shared by every thread and
/// test process. A measurement takes every slot, so nothing runs beside it.
struct L1Lock {
    _files: Vec<File>,
}

/// How many emulated test hosts may run at once: `$MINIVMM_TEST_L1_PARALLEL`, by default 2 (with
/// libtest's two test threads on the 2-core CI machine, `cargo test --test boot --test hotplug`
/// took 257 s, where the same tests' hosts one at a time had added up to about 370 s in the CI run
/// before: each host runs slower, but one host's idle vCPU time is the other's). 1 runs them one
/// at a time.
pub fn l1_parallel() -> u32 {
    env_or("MINIVMM_TEST_L1_PARALLEL", 2u32).max(1)
}

/// Whether an emulated host may share the machine with another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L1Share {
    /// A test: up to [`l1_parallel`] hosts at once.
    Shared,
    /// A benchmark or a fault count: this host alone.
    Alone,
}

/// `flock(op)` on `file`; false if a non-blocking lock is taken by someone else.
fn flock(file: &File, path: &Path, op: libc::c_int) -> bool {
    let e = loop {
        // SAFETY: flock on a file descriptor we own; it touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return true;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            break e;
        }
    };
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EWOULDBLOCK),
        "flock {}: {e}",
        path.display()
    );
    false
}

fn l1_lock(share: L1Share) -> L1Lock {
    // An `Alone` run locks every slot a default run may use (at least two), so it runs alone
    // even beside a process started with another MINIVMM_TEST_L1_PARALLEL.
    let slots = l1_parallel().max(2);
    let open = |i: u32| {
        // Slot 0 keeps the old name.
        let path = log_dir().join(if i == 0 {
            "l1.lock".to_string()
        } else {
            format!("l1.lock.{i}")
        });
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        (path, file)
    };
    if share == L1Share::Alone {
        // In slot order, blocking: two such runs cannot deadlock each other, and shared runs
        // only ever try.
        let files = (0..slots)
            .map(|i| {
                let (path, file) = open(i);
                flock(&file, &path, libc::LOCK_EX);
                file
            })
            .collect();
        return L1Lock { _files: files };
    }
    let files: Vec<(PathBuf, File)> = (0..l1_parallel()).map(open).collect();
    loop {
        for (path, file) in files.iter() {
            if flock(file, path, libc::LOCK_EX | libc::LOCK_NB) {
                let file = file
                    .try_clone()
                    .unwrap_or_else(|e| panic!("dup {}: {e}", path.display()));
                return L1Lock { _files: vec![file] };
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Serial output collected by a reader thread: bytes plus end-of-stream, with a condvar for waiters.
#[derive(Default)]
struct Collected {
    state: Mutex<(Vec<u8>, bool)>,
    cond: Condvar,
}

impl Collected {
    fn push(&self, bytes: &[u8]) {
        lock(&self.state).0.extend_from_slice(bytes);
        self.cond.notify_all();
    }

    fn close(&self) {
        lock(&self.state).1 = true;
        self.cond.notify_all();
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.state).0).into_owned()
    }

    fn len(&self) -> usize {
        lock(&self.state).0.len()
    }

    fn is_closed(&self) -> bool {
        lock(&self.state).1
    }

    /// Waits until `pred(bytes)` is Some, the stream closes, or the deadline passes.
    fn wait<R>(&self, deadline: Instant, mut pred: impl FnMut(&[u8]) -> Option<R>) -> Option<R> {
        let mut st = lock(&self.state);
        loop {
            if let Some(r) = pred(&st.0) {
                return Some(r);
            }
            let now = Instant::now();
            if st.1 || now >= deadline {
                return None;
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            st = self
                .cond
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Copies `src` into `sink` (and optionally a log file, see [`LineStamper`]) until EOF.
fn spawn_reader(
    mut src: impl Read + Send + 'static,
    sink: Arc<Collected>,
    mut log: Option<File>,
    start: Instant,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut stamper = LineStamper::new(start);
        loop {
            match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    sink.push(&buf[..n]);
                    if let Some(f) = log.as_mut() {
                        let _ = f.write_all(&stamper.feed(&buf[..n]));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if let Some(f) = log.as_mut() {
            let _ = f.write_all(&stamper.finish());
        }
        sink.close();
    })
}

/// Turns a byte stream into log lines `[  12.345] text`, stamped with the time (seconds since `start`) at
/// which the line was completed; drops `\r`.
pub struct LineStamper {
    pending: Vec<u8>,
    start: Instant,
}

impl LineStamper {
    /// A stamper measuring from `start`.
    pub fn new(start: Instant) -> Self {
        LineStamper {
            pending: Vec::new(),
            start,
        }
    }

    /// Feeds bytes; returns the stamped lines they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\r' {
                continue;
            }
            self.pending.push(b);
            if b == b'\n' {
                out.extend_from_slice(&self.stamp());
            }
        }
        out
    }

    /// Stamps a last unterminated line, if any.
    pub fn finish(&mut self) -> Vec<u8> {
        if self.pending.is_empty() {
            return Vec::new();
        }
        self.pending.push(b'\n');
        self.stamp()
    }

    fn stamp(&mut self) -> Vec<u8> {
        let mut line = format!("[{:8.3}] ", self.start.elapsed().as_secs_f64()).into_bytes();
        line.append(&mut self.pending);
        line
    }
}

/// The stamp of the first log line containing `needle` (see [`LineStamper`]).
pub fn stamp_of(log: &str, needle: &str) -> Option<f64> {
    log.lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.strip_prefix('[')?.split_once(']')?.0.trim().parse().ok())
}

/// The last `n` lines of `text`, without `\r`.
pub fn tail(text: &str, n: usize) -> String {
    let text = text.replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The exit code recorded by the L1 `/init` (`MVM-L1-RESULT rc=N`), if present.
pub fn parse_l1_result(console: &str) -> Option<i32> {
    console.lines().rev().find_map(|l| {
        let at = l.find(L1_RESULT_MARKER)?;
        let digits: String = l[at + L1_RESULT_MARKER.len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '-')
            .collect();
        digits.parse().ok()
    })
}

/// The guest uptime of the L1 step marker named `step`, if present.
pub fn parse_l1_step(console: &str, step: &str) -> Option<f64> {
    console.lines().find_map(|l| {
        let rest = &l[l.find(L1_STEP_MARKER)? + L1_STEP_MARKER.len()..];
        let (up, name) = rest.split_once(' ')?;
        if name.trim_end() == step || name.starts_with(step) {
            up.parse().ok()
        } else {
            None
        }
    })
}

/// The kvm_amd module parameters of the emulated test host: `$MINIVMM_TEST_L1_KVM_AMD` (comma-separated
/// `key=value`), by default `npt=1`; long soaks want `npt=0`.
///
/// With nested paging (`npt=1`) QEMU TCG walks the L2 guest's page tables through L1 KVM's nested
/// page tables itself, and now and then an L2 vCPU found its kernel unmapped. Traced in L1
/// ([`kvm_trace`]): the guest's boot vCPU exited with `reason shutdown` (a triple fault) on the
/// first instruction after an I/O exit, while a #PF for an instruction fetch of a not-present page
/// was being delivered, though the instruction before, on the same kernel-text page, had just run.
/// That ended each of 5 resize soaks and 2 CPU-only hotplug loops within 10-60 cycles. With
/// shadow paging (`npt=0`: L1 KVM walks the guest's tables, TCG only its shadow tables) a
/// 150-cycle loop passed and two
/// 1000-cycle soaks ran 540 and 530 cycles with no triple fault (they ended in a frozen L1 and a
/// CPU online that never returned), at the same speed per cycle (1.9 s, 2.4 s). The default stays
/// `npt=1` for now: the first CI run with `npt=0` froze L1 at its first L2 reboot and booted the
/// 2-vCPU guest in 15 s instead of about 7, so `npt=0` needs its own CI measurements first.
pub fn l1_kvm_amd_params() -> String {
    env_or("MINIVMM_TEST_L1_KVM_AMD", "npt=1".to_string())
}

/// The emulated test host's vCPU count: `$MINIVMM_TEST_L1_SMP`, by default 2.
fn l1_smp() -> String {
    env_or("MINIVMM_TEST_L1_SMP", "2".to_string())
}

/// QEMU's TCG options for the emulated test host: `$MINIVMM_TEST_L1_TCG`, by default
/// `thread=multi,tb-size=512` (one host thread per vCPU, a 512 MiB translation cache).
fn l1_tcg() -> String {
    env_or(
        "MINIVMM_TEST_L1_TCG",
        "thread=multi,tb-size=512".to_string(),
    )
}

/// The QEMU that runs the emulated test host: `$MINIVMM_TEST_L1_QEMU`, by default `qemu-system-x86_64`
/// from PATH (e.g. a newer QEMU installed beside Debian's, to tell its TCG's faults from minivmm's).
pub fn l1_qemu() -> String {
    env_or("MINIVMM_TEST_L1_QEMU", "qemu-system-x86_64".to_string())
}

/// The first line of `qemu --version`, or what went wrong running it.
pub fn qemu_version(qemu: &str) -> String {
    Command::new(qemu)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|e| format!("{qemu}: {e}"))
}

/// Runs test `name` of this executable inside a fresh emulated test host and fails unless it passed there
/// (at most [`L1_ATTEMPTS`] runs, see [`run_in_test_host`]).
fn run_emulated(name: &str, l1_timeout: Duration, share: L1Share) {
    let _lock = l1_lock(share);
    let mut failed_logs = Vec::new();
    for attempt in 1..=L1_ATTEMPTS {
        let run = l1_run(name, l1_timeout);
        let Some(problem) = run.problem() else {
            if attempt > 1 {
                say(&format!(
                    "[emulated] {name}: FLAKY: failed in the emulated test host, passed on run \
                     {attempt} of {L1_ATTEMPTS} (earlier runs' logs: {})",
                    failed_logs.join(", ")
                ));
            }
            return;
        };
        let log = if attempt < L1_ATTEMPTS {
            let kept = run.log_path.with_extension(format!("attempt{attempt}.log"));
            let _ = fs::rename(&run.log_path, &kept);
            kept
        } else {
            run.log_path.clone()
        };
        failed_logs.push(log.display().to_string());
        record_retry(&format!(
            "{name}: run {attempt} of {L1_ATTEMPTS}: {}: {problem} (log {})",
            run.fault(),
            log.display()
        ));
        if attempt < L1_ATTEMPTS {
            say(&format!(
                "[emulated] {name}: WARNING: {problem}; running the test again in a fresh test \
                 host, run {} of at most {L1_ATTEMPTS} (nested SVM under TCG has rare faults of its \
                 own; failing every run fails the test)\n--- inner test failure ---\n{}\n\
                 --- L1 console (tail) ---\n{}",
                attempt + 1,
                inner_panics(&run.console),
                tail(&run.console, 15)
            ));
            continue;
        }
        panic!(
            "{problem} (run {attempt} of {L1_ATTEMPTS}, every one failed)\n--- inner test failure ---\n{}\n--- qemu: {}; stderr (tail) ---\n{}\n\
             --- L1 console (tail; full log {}) ---\n{}\n",
            inner_panics(&run.console),
            run.status.map_or("killed".to_string(), |s| s.to_string()),
            tail(&run.qemu_stderr, 10),
            run.log_path.display(),
            tail(&run.console, TAIL_LINES * 2)
        );
    }
}

/// How one emulated test-host run ended.
pub struct L1Run {
    /// QEMU's exit status; `None` when the harness killed it (a freeze or the time limit).
    pub status: Option<ExitStatus>,
    /// The harness killed a silent (or soft-locked) host.
    pub froze: bool,
    /// The run's time limit.
    pub timeout: Duration,
    /// The L1 console (the inner test's output included).
    pub console: String,
    /// QEMU's own stderr.
    pub qemu_stderr: String,
    /// The stamped console log.
    pub log_path: PathBuf,
}

impl L1Run {
    /// Why the run failed, or `None` if the inner test passed.
    pub fn problem(&self) -> Option<String> {
        match (self.status, parse_l1_result(&self.console)) {
            (None, _) if self.froze => Some(format!(
                "the emulated test host froze (an L1 soft lockup, or no console output for {}s; \
                 killed)",
                L1_SILENCE_LIMIT.as_secs()
            )),
            (None, _) => Some(format!(
                "the emulated test host timed out after {}s (killed)",
                self.timeout.as_secs()
            )),
            (_, None) => Some("the emulated test host exited without a result marker".to_string()),
            (_, Some(0)) => None,
            (_, Some(rc)) => Some(format!(
                "the test failed inside the emulated test host (exit code {rc})"
            )),
        }
    }

    /// What a failed run ran into.
    pub fn fault(&self) -> FaultKind {
        FaultKind::of(
            self.status.is_none() && self.froze,
            self.status.is_some(),
            &self.console,
        )
    }
}

/// Runs test `name` of this executable once inside a fresh emulated test host, without retries
/// (for tools that count the emulated host's faults themselves).
pub fn run_emulated_once(name: &str, l1_timeout: Duration) -> L1Run {
    let _lock = l1_lock(L1Share::Alone);
    l1_run(name, l1_timeout)
}

/// Runs test `name` of this executable once inside a fresh emulated test host (the caller holds
/// the L1 lock). Environment variables `MINIVMM_BENCH_*`, `MINIVMM_SOAK_*` and `MINIVMM_FAULTS_*`
/// reach the inner run.
fn l1_run(name: &str, l1_timeout: Duration) -> L1Run {
    let imgs = images();
    let logs = log_dir();
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let script_path = logs.join(format!("{name}.l1.sh"));
    let log_path = logs.join(format!("{name}.l1.log"));
    // The test host hides the host's /tmp and /run behind tmpfs, except the checkout itself, which
    // its /init binds back (minivmm.cwd below).
    let repo = repo_dir();
    for p in [&exe, &script_path, &repo] {
        let s = p.to_string_lossy();
        let hidden = (s.starts_with("/tmp/") || s.starts_with("/run/")) && !p.starts_with(&repo);
        assert!(
            !s.chars().any(|c| c.is_whitespace()) && !hidden,
            "{s}: the emulated test host needs paths without whitespace, and outside /tmp and /run \
             unless they are inside the checkout"
        );
    }

    // The script the L1 /init runs in the chroot of the host root.
    let mut script = String::from(
        "# generated by tests/common/mod.rs: runs one test inside the emulated test host\n",
    );
    let _ = writeln!(
        script,
        "export {HOST_ENV}=direct {INNER_ENV}=1 RUST_BACKTRACE={}",
        env_or("RUST_BACKTRACE", "0".to_string())
    );
    for var in [BIN_ENV, "RUST_LOG", "MINIVMM_TEST_KVM_TRACE"] {
        if let Ok(v) = std::env::var(var) {
            let _ = writeln!(script, "export {var}={}", shell_quote(&v));
        }
    }
    // Benchmark, soak and fault-counter settings reach the inner run too.
    for (var, v) in std::env::vars().filter(|(k, _)| {
        ["MINIVMM_BENCH_", "MINIVMM_SOAK_", "MINIVMM_FAULTS_"]
            .iter()
            .any(|prefix| k.starts_with(prefix))
    }) {
        let _ = writeln!(script, "export {var}={}", shell_quote(&v));
    }
    let _ = writeln!(
        script,
        "exec {} --exact {} --include-ignored --nocapture --test-threads=1",
        shell_quote(&exe.to_string_lossy()),
        shell_quote(name)
    );
    fs::write(&script_path, script)
        .unwrap_or_else(|e| panic!("write {}: {e}", script_path.display()));

    let append = format!(
        "console=ttyS0 panic=-1 rdinit=/init quiet minivmm.run={} minivmm.cwd={} minivmm.kvm_amd={}",
        script_path.display(),
        repo_dir().display(),
        l1_kvm_amd_params()
    );
    let (qemu, accel, smp) = (l1_qemu(), format!("tcg,{}", l1_tcg()), l1_smp());
    let start = Instant::now();
    let mut child = Command::new(&qemu)
        .args(["-accel", &accel])
        .args(["-machine", "q35", "-cpu", "EPYC"])
        // Firmware (SeaBIOS, option ROMs) from Debian's QEMU packages, also for a QEMU built
        // elsewhere (tests/guest/build-qemu.sh).
        .args(["-L", "/usr/share/qemu", "-L", "/usr/share/seabios"])
        .args(["-smp", &smp])
        .args([
            "-m",
            "4G",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&imgs.bzimage)
        .arg("-initrd")
        .arg(&imgs.l1_initramfs)
        .arg("-append")
        .arg(&append)
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {qemu}: {e}"));
    let log =
        File::create(&log_path).unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
    let console = Arc::new(Collected::default());
    let qemu_err = Arc::new(Collected::default());
    let readers = [
        spawn_reader(
            child.stdout.take().expect("piped stdout"),
            console.clone(),
            Some(log),
            start,
        ),
        spawn_reader(
            child.stderr.take().expect("piped stderr"),
            qemu_err.clone(),
            None,
            start,
        ),
    ];

    let deadline = start + l1_timeout;
    let (mut seen, mut last_output) = (0, Instant::now());
    let (mut froze, mut lockup) = (false, false);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline || froze => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => {
                thread::sleep(Duration::from_millis(100));
                if console.len() != seen {
                    (seen, last_output) = (console.len(), Instant::now());
                    // An L1 soft lockup keeps printing, so it is not silence; it is a frozen
                    // host all the same (seen: "soft lockup - CPU#1 stuck [swapper/1:0]" as a
                    // VM started).
                    lockup = console.text().contains("BUG: soft lockup");
                }
                froze = last_output.elapsed() >= L1_SILENCE_LIMIT || lockup;
            }
            Err(e) => panic!("waiting for qemu: {e}"),
        }
    };
    for r in readers {
        let _ = r.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let text = console.text();
    let log_text = fs::read_to_string(&log_path).unwrap_or_default();
    let step_at = |step: &str| {
        let line = log_text
            .lines()
            .find(|l| l.contains(L1_STEP_MARKER) && l.contains(step))?;
        stamp_of(line, L1_STEP_MARKER).map(|t| format!("{t:.1}s"))
    };
    say(&format!(
        "[emulated] {name}: L1 run {elapsed:.1}s; /init at {}, test started at {}, finished at {} \
         (host time since QEMU start); log {}",
        step_at(" init").unwrap_or_else(|| "-".into()),
        step_at(" running ").unwrap_or_else(|| "-".into()),
        step_at(" command finished").unwrap_or_else(|| "-".into()),
        log_path.display()
    ));
    L1Run {
        status,
        froze,
        timeout: l1_timeout,
        console: text,
        qemu_stderr: qemu_err.text(),
        log_path,
    }
}

/// What a failed emulated test-host run ran into, read from its console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The emulated host itself stopped (silence or an L1 soft lockup).
    L1Freeze,
    /// The emulated host's kernel died (QEMU exited without the result marker: an L1 panic).
    L1Crash,
    /// The guest triple-faulted (minivmm's log names it; a test that did not ask for one).
    L2TripleFault,
    /// The guest kernel reported an RCU stall.
    L2RcuStall,
    /// The guest stopped answering its console (a command or boot timed out).
    ConsoleStop,
    /// Anything else: an assertion of the test itself, most likely a real failure.
    TestFailure,
}

impl FaultKind {
    /// Classifies a failed run from whether the harness killed a silent L1, whether QEMU exited,
    /// and its console.
    pub fn of(froze: bool, exited: bool, console: &str) -> FaultKind {
        let panics = inner_panics(console);
        if froze {
            FaultKind::L1Freeze
        } else if exited && parse_l1_result(console).is_none() {
            FaultKind::L1Crash
        } else if console.contains("rcu_sched self-detected stall")
            || console.contains("rcu: INFO: rcu_sched detected stall")
            || console.contains("rcu_preempt detected stall")
        {
            FaultKind::L2RcuStall
        } else if console.contains("a triple fault") {
            FaultKind::L2TripleFault
        } else if panics.contains("timed out after")
            || panics.contains("did not echo a marker")
            || panics.contains("did not exit within")
        {
            FaultKind::ConsoleStop
        } else {
            FaultKind::TestFailure
        }
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FaultKind::L1Freeze => "L1 freeze",
            FaultKind::L1Crash => "L1 crash",
            FaultKind::L2TripleFault => "L2 triple fault",
            FaultKind::L2RcuStall => "L2 RCU stall",
            FaultKind::ConsoleStop => "console stop",
            FaultKind::TestFailure => "test failure",
        })
    }
}

/// Appends one line to `retries.log` in the log directory, which `tests/run-all.sh` prints at the
/// end of the run: every failed emulated run, so each FLAKY pass can be looked into.
fn record_retry(line: &str) {
    let path = log_dir().join("retries.log");
    let written = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        say(&format!("cannot append to {}: {e}", path.display()));
    }
}

/// The panic messages of the inner test run (the `panicked at` line and the message lines after it).
pub fn inner_panics(console: &str) -> String {
    let lines: Vec<&str> = console.lines().map(|l| l.trim_end_matches('\r')).collect();
    let mut out: Vec<&str> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if l.contains("panicked at") {
            out.extend(
                lines[i..]
                    .iter()
                    .take(8)
                    .take_while(|m| !m.starts_with("note:") && !m.starts_with("stack backtrace:")),
            );
        }
    }
    if out.is_empty() {
        "(no panic message found)".to_string()
    } else {
        out.join("\n")
    }
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

// ------------------------------------------------------------------------------------------------------
// The guest driver
// ------------------------------------------------------------------------------------------------------

/// How to start minivmm for a guest.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// `--kernel`.
    pub kernel: PathBuf,
    /// `--initramfs`.
    pub initramfs: Option<PathBuf>,
    /// `--cmdline`.
    pub cmdline: String,
    /// `--cpus` value (e.g. `boot=1,max=4`), if any.
    pub cpus: Option<String>,
    /// `--memory` value (e.g. `size=512M,hotplug_size=2G`), if any.
    pub memory: Option<String>,
    /// `--no-reboot`.
    pub no_reboot: bool,
    /// Open a control socket (`--control PATH`).
    pub control: bool,
    /// Further arguments.
    pub extra: Vec<String>,
    /// Run this program instead of minivmm (one that takes minivmm's command line).
    pub program: Option<PathBuf>,
    /// Start `program` with exactly these arguments instead (a peer VMM such as QEMU, whose
    /// console is also its stdio).
    pub raw_args: Option<Vec<String>>,
}

impl VmOptions {
    /// The Debian bzImage with the busybox initramfs, 512 MiB, 1 vCPU.
    pub fn bzimage() -> Self {
        let imgs = images();
        VmOptions {
            kernel: imgs.bzimage.clone(),
            initramfs: Some(imgs.l2_initramfs.clone()),
            cmdline: guest_cmdline(),
            cpus: None,
            memory: Some("size=512M".to_string()),
            no_reboot: false,
            control: false,
            extra: vec!["--log-level".to_string(), "info".to_string()],
            program: None,
            raw_args: None,
        }
    }

    /// The same kernel as an ELF vmlinux (PVH entry).
    pub fn elf() -> Self {
        VmOptions {
            kernel: images().vmlinux.clone(),
            ..Self::bzimage()
        }
    }

    /// Sets `--cpus`.
    pub fn cpus(mut self, v: &str) -> Self {
        self.cpus = Some(v.to_string());
        self
    }

    /// Sets `--memory`.
    pub fn memory(mut self, v: &str) -> Self {
        self.memory = Some(v.to_string());
        self
    }

    /// Appends `words` to the guest command line.
    pub fn cmdline_add(mut self, words: &str) -> Self {
        self.cmdline.push(' ');
        self.cmdline.push_str(words);
        self
    }

    /// Appends further minivmm arguments.
    pub fn arg(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Runs the `examples/NAME` program cargo built beside minivmm instead of minivmm.
    pub fn example(mut self, name: &str) -> Self {
        let bin = minivmm_bin();
        let dir = bin.parent().expect("binary directory");
        self.program = Some(dir.join("examples").join(name));
        self
    }

    /// Adds `--no-reboot`.
    pub fn no_reboot(mut self) -> Self {
        self.no_reboot = true;
        self
    }

    /// Adds `--control <socket>`.
    #[track_caller]
    pub fn control(mut self) -> Self {
        self.control = true;
        self
    }

    /// The minivmm arguments for these options (`control` is the socket path, when enabled).
    pub fn args(&self, control: Option<&Path>) -> Vec<String> {
        if let Some(raw) = &self.raw_args {
            return raw.clone();
        }
        let mut a = vec![
            "--kernel".to_string(),
            self.kernel.to_string_lossy().into_owned(),
        ];
        if let Some(i) = &self.initramfs {
            a.extend(["--initramfs".to_string(), i.to_string_lossy().into_owned()]);
        }
        a.extend(["--cmdline".to_string(), self.cmdline.clone()]);
        if let Some(c) = &self.cpus {
            a.extend(["--cpus".to_string(), c.clone()]);
        }
        if let Some(m) = &self.memory {
            a.extend(["--memory".to_string(), m.clone()]);
        }
        if self.no_reboot {
            a.push("--no-reboot".to_string());
        }
        if let Some(c) = control {
            a.extend(["--control".to_string(), c.to_string_lossy().into_owned()]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// A running minivmm with its guest console on pipes. Killed (and its logs shown on failure) on drop.
pub struct Vm {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    serial: Arc<Collected>,
    stderr: Arc<Collected>,
    readers: Vec<thread::JoinHandle<()>>,
    /// Byte offset in the serial output up to which output has been consumed.
    cursor: usize,
    seq: u32,
    control_path: Option<PathBuf>,
    serial_log: PathBuf,
    stderr_log: PathBuf,
    started: Instant,
    boots: u32,
    exit: Option<ExitStatus>,
}

/// Builds the shell line for command number `k`: start and end markers are split in the command text
/// (`"__MV""M_B<k>"`), so the echoed command line can never match them.
pub fn marked_command(k: u32, cmd: &str) -> String {
    format!("echo \"__MV\"\"M_B{k}\"; {cmd}; echo \"__MV\"\"M_E{k}=$?\"\n")
}

/// Finds the result of command number `k` in console output: `(output, exit status)`, once complete.
pub fn parse_marked_output(console: &[u8], k: u32) -> Option<(String, i32)> {
    let begin = format!("__MVM_B{k}");
    let end = format!("__MVM_E{k}=");
    let b = find(console, begin.as_bytes(), 0)?;
    let body_start = b + begin.len() + find(&console[b + begin.len()..], b"\n", 0)? + 1;
    let e = find(console, end.as_bytes(), body_start)?;
    let rest = &console[e + end.len()..];
    let nl = find(rest, b"\n", 0)?;
    let rc = String::from_utf8_lossy(&rest[..nl]).trim().parse().ok()?;
    let out = String::from_utf8_lossy(&console[body_start..e]).replace('\r', "");
    Some((out.strip_suffix('\n').unwrap_or(&out).to_string(), rc))
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() || needle.is_empty() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

static VM_SEQ: AtomicU32 = AtomicU32::new(0);

impl Vm {
    /// Starts minivmm and waits for the guest's first `GUEST-READY`.
    #[track_caller]
    pub fn boot(opts: VmOptions) -> Vm {
        let mut vm = Vm::start(opts);
        vm.wait_ready();
        vm
    }

    /// Starts minivmm without waiting for the guest.
    #[track_caller]
    pub fn start(opts: VmOptions) -> Vm {
        let n = VM_SEQ.fetch_add(1, Ordering::SeqCst);
        let test = current_test();
        let label = format!("{test}.l2.{n}");
        let control_path = opts.control.then(|| {
            std::env::temp_dir().join(format!("minivmm-test-{}-{n}.sock", std::process::id()))
        });
        if let Some(p) = &control_path {
            let _ = fs::remove_file(p);
        }
        let logs = log_dir();
        let serial_log = logs.join(format!("{label}.log"));
        let stderr_log = logs.join(format!("{label}.stderr.log"));
        let bin = opts.program.clone().unwrap_or_else(minivmm_bin);
        let args = opts.args(control_path.as_deref());
        let started = Instant::now();
        let mut child = Command::new(&bin)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let serial = Arc::new(Collected::default());
        let stderr = Arc::new(Collected::default());
        let open =
            |p: &Path| File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        let readers = vec![
            spawn_reader(
                child.stdout.take().expect("piped stdout"),
                serial.clone(),
                Some(open(&serial_log)),
                started,
            ),
            spawn_reader(
                child.stderr.take().expect("piped stderr"),
                stderr.clone(),
                Some(open(&stderr_log)),
                started,
            ),
        ];
        println!("[{label}] started: {} {}", bin.display(), args.join(" "));
        Vm {
            label,
            stdin: child.stdin.take(),
            child,
            serial,
            stderr,
            readers,
            cursor: 0,
            seq: 0,
            control_path,
            serial_log,
            stderr_log,
            started,
            boots: 0,
            exit: None,
        }
    }

    /// The process id of minivmm (or of the program run instead).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since minivmm was spawned.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Log label (`<test>.l2.<n>`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The control socket path (when started with [`VmOptions::control`]).
    #[track_caller]
    pub fn control_path(&self) -> &Path {
        self.control_path
            .as_deref()
            .expect("the VM was started without --control")
    }

    /// Waits for the next `GUEST-READY` (the first boot, or the boot after a reboot); returns its guest
    /// uptime in seconds.
    #[track_caller]
    pub fn wait_ready(&mut self) -> f64 {
        let t0 = Instant::now();
        let line = self.wait_for_line_with(READY_MARKER, L2_BOOT_TIMEOUT);
        self.boots += 1;
        let uptime = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("uptime="))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(-1.0);
        println!(
            "[{}] GUEST-READY #{} after {:.2}s (since start {:.2}s, guest uptime {uptime:.2}s)",
            self.label,
            self.boots,
            t0.elapsed().as_secs_f64(),
            self.started.elapsed().as_secs_f64()
        );
        self.shell_sync();
        uptime
    }

    /// Types a marker until the shell echoes it back whole. Right after a boot the shell's first
    /// prompt can lose the first characters typed (seen as `o: not found` for an `echo` typed as
    /// the prompt appeared, in the resize soak after a reboot), so the first real command must
    /// not be typed blind.
    #[track_caller]
    fn shell_sync(&mut self) {
        for attempt in 0..5 {
            let marker = format!("__MVM_SYNC{}_{attempt}", self.boots);
            // Quoted apart, so the shell's echo of the typed line does not match.
            let (a, b) = marker.split_at(5);
            self.write_raw(format!("echo \"{a}\"\"{b}\"\n").as_bytes());
            let from = self.cursor;
            let pat = marker.into_bytes();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                let slice = (Instant::now() + Duration::from_millis(250)).min(deadline);
                let mut pred = |buf: &[u8]| find(buf, &pat, from).map(|p| p + pat.len());
                if let Some(end) = self.serial.wait(slice, &mut pred) {
                    self.consume_to(end);
                    return;
                }
                if self.poll_exit().is_some() {
                    // The next wait reports the exit with the logs.
                    return;
                }
            }
        }
        panic!(
            "[{}] the guest shell did not echo a marker within 15 s of GUEST-READY",
            self.label
        );
    }

    /// Waits until `pattern` appears in not-yet-consumed output; consumes up to its end and returns the
    /// consumed text. Fails after `timeout`, or early when minivmm exits.
    #[track_caller]
    pub fn wait_for(&mut self, pattern: &str, timeout: Duration) -> String {
        let from = self.cursor;
        let pat = pattern.as_bytes().to_vec();
        let got = self.wait_until(timeout, &format!("{pattern:?}"), |buf| {
            find(buf, &pat, from).map(|p| p + pat.len())
        });
        self.consume_to(got)
    }

    /// Like [`Vm::wait_for`], but also consumes the rest of the line and returns that whole line.
    #[track_caller]
    pub fn wait_for_line_with(&mut self, pattern: &str, timeout: Duration) -> String {
        let from = self.cursor;
        let pat = pattern.as_bytes().to_vec();
        let (start, end) = self.wait_until(timeout, &format!("a line with {pattern:?}"), |buf| {
            let p = find(buf, &pat, from)?;
            let nl = find(buf, b"\n", p)?;
            Some((p, nl + 1))
        });
        let line = String::from_utf8_lossy(&lock(&self.serial.state).0[start..end])
            .trim()
            .to_string();
        self.consume_to(end);
        line
    }

    fn consume_to(&mut self, end: usize) -> String {
        let text =
            String::from_utf8_lossy(&lock(&self.serial.state).0[self.cursor..end]).into_owned();
        self.cursor = end;
        text
    }

    /// Waits until `pred` over the whole serial output returns Some. Fails with the logs on timeout or when
    /// minivmm exits first.
    #[track_caller]
    fn wait_until<R>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&[u8]) -> Option<R>,
    ) -> R {
        let deadline = Instant::now() + timeout;
        loop {
            // Short slices so that an exit of minivmm is noticed promptly.
            let slice = (Instant::now() + Duration::from_millis(250)).min(deadline);
            if let Some(r) = self.serial.wait(slice, &mut pred) {
                return r;
            }
            if let Some(st) = self.poll_exit() {
                // Let the reader drain what is left, then look once more.
                self.join_readers();
                if let Some(r) = pred(&lock(&self.serial.state).0) {
                    return r;
                }
                panic!(
                    "[{}] minivmm exited ({st}) while waiting for {what}",
                    self.label
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "[{}] timed out after {:.0}s waiting for {what}",
                    self.label,
                    timeout.as_secs_f64()
                );
            }
        }
    }

    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Writes raw bytes to the guest console.
    #[track_caller]
    pub fn write_raw(&mut self, bytes: &[u8]) {
        let label = self.label.clone();
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        if let Err(e) = stdin.write_all(bytes).and_then(|_| stdin.flush()) {
            panic!("[{label}] writing to the guest console failed: {e}");
        }
    }

    /// Types a line into the guest shell without waiting for anything.
    #[track_caller]
    pub fn write_line(&mut self, line: &str) {
        println!("[{}] $ {line}", self.label);
        self.write_raw(format!("{line}\n").as_bytes());
    }

    /// Runs a shell command in the guest and returns its output (without the trailing newline) and exit
    /// status. `cmd` is one line, shorter than the guest line editor's limit (~1000 chars), without a
    /// trailing `;` or `&`.
    #[track_caller]
    pub fn run_timeout(&mut self, cmd: &str, timeout: Duration) -> (String, i32) {
        assert!(
            !cmd.contains('\n') && cmd.len() < 900,
            "guest commands must be single short lines"
        );
        self.seq += 1;
        let k = self.seq;
        self.write_raw(marked_command(k, cmd).as_bytes());
        let from = self.cursor;
        let (out, rc, end) =
            self.wait_until(timeout, &format!("the end of command {cmd:?}"), |buf| {
                let (out, rc) = parse_marked_output(&buf[from..], k)?;
                let end_marker = format!("__MVM_E{k}=");
                let e = find(buf, end_marker.as_bytes(), from)?;
                let nl = find(buf, b"\n", e)?;
                Some((out, rc, nl + 1))
            });
        self.cursor = end;
        println!("[{}] $ {cmd}  -> rc={rc}, {} bytes", self.label, out.len());
        (out, rc)
    }

    /// [`Vm::run_timeout`] with [`CMD_TIMEOUT`].
    #[track_caller]
    pub fn run(&mut self, cmd: &str) -> (String, i32) {
        self.run_timeout(cmd, CMD_TIMEOUT)
    }

    /// Runs a command that must succeed; returns its trimmed output.
    #[track_caller]
    pub fn sh(&mut self, cmd: &str) -> String {
        self.sh_timeout(cmd, CMD_TIMEOUT)
    }

    /// [`Vm::sh`] for a command that may take longer than [`CMD_TIMEOUT`].
    #[track_caller]
    pub fn sh_timeout(&mut self, cmd: &str, timeout: Duration) -> String {
        let (out, rc) = self.run_timeout(cmd, timeout);
        assert_eq!(
            rc, 0,
            "[{}] guest command {cmd:?} failed (rc={rc}); output:\n{out}",
            self.label
        );
        out.trim().to_string()
    }

    /// Runs a command that must print one number (the last numeric line of its output counts, so a stray
    /// kernel message cannot confuse it).
    #[track_caller]
    pub fn sh_u64(&mut self, cmd: &str) -> u64 {
        let out = self.sh(cmd);
        out.lines()
            .rev()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("[{}] {cmd:?} printed no number: {out:?}", self.label))
    }

    /// `MemTotal` of the guest in KiB.
    #[track_caller]
    pub fn mem_total_kib(&mut self) -> u64 {
        self.sh_u64("awk '/^MemTotal:/ {print $2}' /proc/meminfo")
    }

    /// Number of online CPUs in the guest.
    #[track_caller]
    pub fn nproc(&mut self) -> u64 {
        self.sh_u64("nproc")
    }

    /// True when `path` exists in the guest.
    #[track_caller]
    pub fn exists(&mut self, path: &str) -> bool {
        self.run(&format!("test -e {}", shell_quote(path))).1 == 0
    }

    /// Polls `check` every `interval` until it returns true; fails after `timeout` with `what`.
    #[track_caller]
    pub fn poll(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&mut Vm) -> bool,
    ) -> Duration {
        let t0 = Instant::now();
        let interval = Duration::from_millis(100);
        loop {
            if check(self) {
                let took = t0.elapsed();
                println!("[{}] {what}: after {:.2}s", self.label, took.as_secs_f64());
                return took;
            }
            if t0.elapsed() >= timeout {
                panic!(
                    "[{}] timed out after {:.0}s waiting until {what}",
                    self.label,
                    timeout.as_secs_f64()
                );
            }
            thread::sleep(interval);
        }
    }

    /// Connects to the control socket (retrying while minivmm creates it).
    #[track_caller]
    pub fn control_connect(&mut self) -> UnixStream {
        let path = self.control_path().to_path_buf();
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        loop {
            match UnixStream::connect(&path) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(CONTROL_TIMEOUT));
                    let _ = s.set_write_timeout(Some(CONTROL_TIMEOUT));
                    return s;
                }
                Err(e) => {
                    if let Some(st) = self.poll_exit() {
                        panic!(
                            "[{}] minivmm exited ({st}) before accepting control connections",
                            self.label
                        );
                    }
                    if Instant::now() >= deadline {
                        panic!(
                            "[{}] cannot connect to the control socket {}: {e}",
                            self.label,
                            path.display()
                        );
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Sends one request line and returns the reply line (without the newline).
    pub fn control(&mut self, line: &str) -> String {
        let reply = self.control_raw(format!("{line}\n").as_bytes());
        println!("[{}] control {line:?} -> {reply:?}", self.label);
        reply
    }

    /// Sends raw bytes on a fresh connection and returns the first reply line.
    #[track_caller]
    pub fn control_raw(&mut self, bytes: &[u8]) -> String {
        let mut s = self.control_connect();
        if let Err(e) = s.write_all(bytes) {
            panic!("[{}] control write: {e}", self.label);
        }
        read_reply(&mut s).unwrap_or_else(|e| panic!("[{}] control reply: {e}", self.label))
    }

    /// The `info` reply without its clock (`uptime=`): equal replies mean an unchanged VM.
    #[track_caller]
    pub fn state(&mut self) -> String {
        without_clock(&self.control("info"))
    }

    /// `info` parsed into key/value pairs (fails unless the reply starts with `ok`).
    #[track_caller]
    pub fn info(&mut self) -> HashMap<String, String> {
        let reply = self.control("info");
        parse_ok_reply(&reply)
            .unwrap_or_else(|| panic!("[{}] bad info reply {reply:?}", self.label))
    }

    /// Waits for minivmm to exit and returns its exit code; fails after `timeout` or on death by signal.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.poll_exit() {
                break st;
            }
            if Instant::now() >= deadline {
                panic!(
                    "[{}] minivmm did not exit within {:.0}s",
                    self.label,
                    timeout.as_secs_f64()
                );
            }
            thread::sleep(Duration::from_millis(50));
        };
        self.join_readers();
        let code = status.code().unwrap_or_else(|| {
            panic!("[{}] minivmm was killed by a signal ({status})", self.label)
        });
        println!(
            "[{}] minivmm exited with code {code} after {:.2}s",
            self.label,
            self.started.elapsed().as_secs_f64()
        );
        code
    }

    /// Everything the guest printed so far.
    pub fn console(&self) -> String {
        self.serial.text()
    }

    /// Everything minivmm printed on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.text()
    }

    /// Number of serial bytes received so far.
    pub fn console_len(&self) -> usize {
        self.serial.len()
    }

    fn report_logs(&self, failing: bool) {
        let (serial, stderr) = (self.serial.text(), self.stderr.text());
        if is_inner_run() {
            // The share is read-only: the console of the emulated host carries the logs out.
            let (s, e) = if failing {
                (tail(&serial, TAIL_LINES), tail(&stderr, TAIL_LINES))
            } else {
                (serial.replace('\r', ""), stderr)
            };
            println!(
                "--- [{}] L2 serial log ---\n{s}\n--- [{}] minivmm stderr ---\n{e}\n--- end ---",
                self.label, self.label
            );
        } else if failing {
            println!(
                "--- [{}] L2 serial log (tail; full: {}) ---\n{}\n--- [{}] minivmm stderr (tail; full: {}) ---\n{}\n--- end ---",
                self.label,
                self.serial_log.display(),
                tail(&serial, TAIL_LINES),
                self.label,
                self.stderr_log.display(),
                tail(&stderr, TAIL_LINES)
            );
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.join_readers();
        self.report_logs(thread::panicking());
        if let Some(p) = &self.control_path {
            let _ = fs::remove_file(p);
        }
    }
}

/// Reads one `\n`-terminated reply line (without the newline).
pub fn read_reply(s: &mut UnixStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 if out.is_empty() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed, no reply",
                ))
            }
            0 => break,
            _ if b[0] == b'\n' => break,
            _ => out.push(b[0]),
        }
    }
    Ok(String::from_utf8_lossy(&out)
        .trim_end_matches('\r')
        .to_string())
}

/// An `info` reply without its clock (`uptime=`), for comparing VM state.
pub fn without_clock(info: &str) -> String {
    info.split(' ')
        .filter(|w| !w.starts_with("uptime="))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads lines until the peer closes the connection (or a read times out, which fails).
pub fn read_until_eof(s: &mut UnixStream) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        match read_reply(s) {
            Ok(line) => lines.push(line),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return lines,
            Err(e) => panic!("reading event lines: {e} (so far: {lines:?})"),
        }
    }
}

/// Parses `ok k=v k=v ...` into a map; None unless the reply is `ok`.
pub fn parse_ok_reply(reply: &str) -> Option<HashMap<String, String>> {
    let mut words = reply.split_whitespace();
    if words.next()? != "ok" {
        return None;
    }
    Some(
        words
            .filter_map(|w| {
                w.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect(),
    )
}

/// Asserts that `reply` is `ok` and that each `key=value` of `expect` is in it.
#[track_caller]
pub fn assert_reply(reply: &str, expect: &[(&str, &str)]) {
    let kv = parse_ok_reply(reply).unwrap_or_else(|| panic!("expected an ok reply, got {reply:?}"));
    for (k, v) in expect {
        assert_eq!(
            kv.get(*k).map(String::as_str),
            Some(*v),
            "field {k} of reply {reply:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------------------
// Running minivmm without a guest (argument errors)
// ------------------------------------------------------------------------------------------------------

/// Output of a minivmm run that was expected to end on its own.
#[derive(Debug)]
pub struct Finished {
    /// Exit code (None when killed by a signal).
    pub code: Option<i32>,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

/// Runs minivmm with `args` and no stdin; kills it after `timeout` (and fails).
pub fn run_minivmm(args: &[&str], timeout: Duration) -> Finished {
    let bin = minivmm_bin();
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let start = Instant::now();
    let (out, err) = (
        Arc::new(Collected::default()),
        Arc::new(Collected::default()),
    );
    let readers = [
        spawn_reader(
            child.stdout.take().expect("piped stdout"),
            out.clone(),
            None,
            start,
        ),
        spawn_reader(
            child.stderr.take().expect("piped stderr"),
            err.clone(),
            None,
            start,
        ),
    ];
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "minivmm {args:?} did not exit within {:.0}s",
                timeout.as_secs_f64()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    for r in readers {
        let _ = r.join();
    }
    Finished {
        code: status.code(),
        stdout: out.text(),
        stderr: err.text(),
    }
}

// ------------------------------------------------------------------------------------------------------
// Tests of the harness itself (pure parts)
// ------------------------------------------------------------------------------------------------------

/// Self-tests of the harness's pure helpers; called from one `#[test]` per test crate.
pub fn self_test() {
    // Marker protocol: the echoed command never matches, the real output does.
    let cmd = marked_command(7, "nproc");
    let echoed = cmd.replace('\n', "\r\n");
    let mut console = format!("guest# {echoed}").into_bytes();
    assert_eq!(
        parse_marked_output(&console, 7),
        None,
        "the echo alone must not match"
    );
    console.extend_from_slice(b"__MVM_B7\r\n2\r\n__MVM_E7=0\r\nguest# ");
    assert_eq!(parse_marked_output(&console, 7), Some(("2".to_string(), 0)));
    assert_eq!(parse_marked_output(&console, 8), None);
    let c = b"__MVM_B3\r\nabc__MVM_E3=127\r\n";
    assert_eq!(parse_marked_output(c, 3), Some(("abc".to_string(), 127)));
    let c = b"__MVM_B4\n__MVM_E4=1\n";
    assert_eq!(parse_marked_output(c, 4), Some((String::new(), 1)));
    assert_eq!(
        parse_marked_output(b"__MVM_B5\nx\n__MVM_E5=", 5),
        None,
        "incomplete status line"
    );

    // Host choice.
    let hw = HostFacts {
        dev_kvm: true,
        hw_virt: true,
        pvm: false,
        qemu: false,
    };
    assert_eq!(
        choose_test_host(&hw, None).map(|r| r.0),
        Ok(TestHost::Direct)
    );
    let pvm = HostFacts {
        dev_kvm: true,
        hw_virt: false,
        pvm: true,
        qemu: true,
    };
    assert_eq!(
        choose_test_host(&pvm, None).map(|r| r.0),
        Ok(TestHost::Emulated)
    );
    assert_eq!(
        choose_test_host(&pvm, Some("direct")).map(|r| r.0),
        Ok(TestHost::Direct)
    );
    let bare = HostFacts::default();
    let err = choose_test_host(&bare, None).unwrap_err();
    assert!(err.contains("qemu-system-x86"), "{err}");
    assert!(choose_test_host(&bare, Some("emulated")).is_err());
    assert!(choose_test_host(&hw, Some("bogus")).is_err());
    assert!(cpu_has_hw_virt("flags\t\t: fpu vme svm lm\n"));
    assert!(!cpu_has_hw_virt(
        "flags\t\t: fpu vme lm\nmodel name : svm-like\n"
    ));

    // L1 console parsing.
    let l1 = "MVM-L1-STEP 2.86 init\nMVM-L1-STEP 5.46 running /x.sh\nnoise\nMVM-L1-RESULT rc=3\n";
    assert_eq!(parse_l1_result(l1), Some(3));
    assert_eq!(parse_l1_result("MVM-L1-STEP 1 init\n"), None);
    assert_eq!(parse_l1_step(l1, "init"), Some(2.86));
    assert_eq!(parse_l1_step(l1, "running"), Some(5.46));

    // Replies.
    let kv = parse_ok_reply("ok cpus=2 removing=none").expect("ok reply");
    assert_eq!(kv.get("cpus").map(String::as_str), Some("2"));
    assert!(parse_ok_reply("error nope").is_none());
    assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    assert_eq!(tail("a\r\nb\nc\n", 2), "b\nc");
    let mut st = LineStamper::new(Instant::now());
    assert!(st.feed(b"par").is_empty(), "a partial line is held back");
    let a = String::from_utf8(st.feed(b"tial\r\nnext\nlast")).expect("utf8");
    let b = String::from_utf8(st.finish()).expect("utf8");
    let lines: Vec<&str> = a.lines().chain(b.lines()).collect();
    assert_eq!(lines.len(), 3, "{a}{b}");
    assert!(
        lines[0].starts_with('[') && lines[0].ends_with("] partial"),
        "{a}"
    );
    assert!(
        lines[1].ends_with("] next") && lines[2].ends_with("] last"),
        "{a}{b}"
    );
    let log = "[   1.500] a\n[   2.250] MVM-L1-STEP 3.1 init\n";
    assert_eq!(stamp_of(log, "STEP"), Some(2.25));
    assert_eq!(stamp_of("[   1.500] a\n", "STEP"), None);
    let c =
        "x\r\nthread 't' panicked at tests/x.rs:3:4:\r\nboom\nnote: run with RUST_BACKTRACE=1\n";
    assert_eq!(
        inner_panics(c),
        "thread 't' panicked at tests/x.rs:3:4:\nboom"
    );
    assert_eq!(inner_panics("all fine\n"), "(no panic message found)");
}

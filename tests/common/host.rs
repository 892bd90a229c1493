//! Test host selection: hardware KVM directly, or the emulated test host, and running a test body there.

use super::*;

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

pub(crate) fn run_in_test_host_as(
    name: &str,
    l1_timeout: Duration,
    share: L1Share,
    body: impl FnOnce(),
) {
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

pub(crate) fn current_test_slot() -> &'static Mutex<String> {
    static CURRENT: OnceLock<Mutex<String>> = OnceLock::new();
    CURRENT.get_or_init(|| Mutex::new(String::from("test")))
}

pub(crate) fn set_current_test(name: &str) {
    *lock(current_test_slot()) = name.to_string();
}

pub(crate) fn current_test() -> String {
    lock(current_test_slot()).clone()
}

/// Locks a mutex, ignoring poisoning (a failed test must not fail the following ones).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

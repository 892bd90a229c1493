//! The emulated test host (L1): QEMU TCG with nested `kvm_amd`, its slots, its runs, their faults and retries.

use super::*;

/// Bounds the emulated test hosts running at once on this machine to [`l1_parallel`] (QEMU TCG
/// needs the cores): one lock file per slot, held while a host runs, shared by every thread and
/// test process. A measurement takes every slot, so nothing runs beside it.
pub(crate) struct L1Lock {
    _files: Vec<File>,
    /// The slot held (0 for a run that holds them all): which host CPU the host runs on, see
    /// [`l1_cpus`].
    slot: u32,
}

/// How many emulated test hosts may run at once: `$MINIVMM_TEST_L1_PARALLEL`, by default 2 (with
/// libtest's two test threads on the 2-core CI machine, `cargo test --test boot --test hotplug`
/// took 257 s, where the same tests' hosts one at a time had added up to about 370 s in the CI run
/// before: each host runs slower, but one host's idle vCPU time is the other's). 1 runs them one
/// at a time.
pub fn l1_parallel() -> u32 {
    env_or("MINIVMM_TEST_L1_PARALLEL", 2u32).max(1)
}

/// The host CPUs the emulated host of `slot` runs on (`taskset -c` list), or None for all:
/// `$MINIVMM_TEST_L1_TASKSET` (a list, or `all`), by default one CPU per slot (slot modulo the
/// CPU count). Pinned, an emulated host's vCPU threads take turns on one core instead of running
/// truly in parallel, and its faults went away: the fault counter (plan `reboot-acpi:40,online:200`,
/// alone) counted 3 faults in 240 operations unpinned (an L1 kernel stack overflow in the thread
/// running KVM_RUN, a lost L2 timer interrupt, a guest stuck after a reboot) and 0 in 240 pinned;
/// the same faults came with QEMU as the L2 VMM (2 in 133), so they belong to the emulator.
/// Pinned, 0 in 920 minivmm operations and 0 in 220 with QEMU as the L2 VMM (docs/TESTING.md).
/// The CPU is the slot's among those this process may run on (its affinity mask: a CI job in
/// a cpuset may not have CPU 0, and `taskset -c` naming a CPU outside it starts no QEMU at all).
pub fn l1_cpus(slot: u32) -> Option<String> {
    match std::env::var("MINIVMM_TEST_L1_TASKSET") {
        Ok(v) if v == "all" => None,
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            let allowed = allowed_cpus();
            if allowed.is_empty() {
                return None;
            }
            Some(allowed[slot as usize % allowed.len()].to_string())
        }
    }
}

/// The host CPUs this process may run on (empty if that cannot be read).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the zeroed set it is given; CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
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
pub(crate) fn flock(file: &File, path: &Path, op: libc::c_int) -> bool {
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

pub(crate) fn l1_lock(share: L1Share) -> L1Lock {
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
        return L1Lock {
            _files: files,
            slot: 0,
        };
    }
    let files: Vec<(PathBuf, File)> = (0..l1_parallel()).map(open).collect();
    loop {
        for (slot, (path, file)) in (0u32..).zip(files.iter()) {
            if flock(file, path, libc::LOCK_EX | libc::LOCK_NB) {
                let file = file
                    .try_clone()
                    .unwrap_or_else(|e| panic!("dup {}: {e}", path.display()));
                return L1Lock {
                    _files: vec![file],
                    slot,
                };
            }
        }
        thread::sleep(Duration::from_millis(200));
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
pub(crate) fn l1_smp() -> String {
    env_or("MINIVMM_TEST_L1_SMP", "2".to_string())
}

/// QEMU's TCG options for the emulated test host: `$MINIVMM_TEST_L1_TCG`, by default
/// `thread=multi,tb-size=512` (one host thread per vCPU, a 512 MiB translation cache).
pub(crate) fn l1_tcg() -> String {
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
pub(crate) fn run_emulated(name: &str, l1_timeout: Duration, share: L1Share) {
    let lock = l1_lock(share);
    let mut failed_logs = Vec::new();
    for attempt in 1..=L1_ATTEMPTS {
        let run = l1_run(name, l1_timeout, lock.slot);
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
    let lock = l1_lock(L1Share::Alone);
    l1_run(name, l1_timeout, lock.slot)
}

/// Runs test `name` of this executable once inside a fresh emulated test host (the caller holds
/// the L1 lock of `slot`). Environment variables `MINIVMM_BENCH_*`, `MINIVMM_SOAK_*` and `MINIVMM_FAULTS_*`
/// reach the inner run.
pub(crate) fn l1_run(name: &str, l1_timeout: Duration, slot: u32) -> L1Run {
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
    let mut command = match l1_cpus(slot) {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpus]).arg(&qemu);
            c
        }
        None => Command::new(&qemu),
    };
    let mut child = command
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
        // The ELF vmlinux through PVH: no XZ decompression under TCG, /init after about 5 s
        // of host time instead of about 11 with the bzImage.
        .arg("-kernel")
        .arg(&imgs.vmlinux)
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
pub(crate) fn record_retry(line: &str) {
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

//! The guest driver: minivmm with a real Linux guest on pipes, the shell marker protocol, the control socket.

use super::*;

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

pub(crate) fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() || needle.is_empty() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

pub(crate) static VM_SEQ: AtomicU32 = AtomicU32::new(0);

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
    pub(crate) fn shell_sync(&mut self) {
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

    pub(crate) fn consume_to(&mut self, end: usize) -> String {
        let text =
            String::from_utf8_lossy(&lock(&self.serial.state).0[self.cursor..end]).into_owned();
        self.cursor = end;
        text
    }

    /// Waits until `pred` over the whole serial output returns Some. Fails with the logs on timeout or when
    /// minivmm exits first.
    #[track_caller]
    pub(crate) fn wait_until<R>(
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

    pub(crate) fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    pub(crate) fn join_readers(&mut self) {
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

    pub(crate) fn report_logs(&self, failing: bool) {
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

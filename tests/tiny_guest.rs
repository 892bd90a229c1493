//! Tiny freestanding PVH guests, run directly on the host's /dev/kvm (they work even on PVM,
//! where a stock Linux cannot boot). They cover the ELF/PVH loader, port I/O exits, the serial
//! console in both directions, the ACPI power-off and reset registers, fault reporting, exit
//! codes and the seccomp filters, in well under a second each.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[allow(dead_code)] // the vsock helpers of the real-Linux tests; this file uses a few
#[path = "common/stream.rs"]
mod stream;
mod tiny;

use stream::{hybrid_connect, read_to_close};
use tiny::{
    echo_until_bang, out_byte, out_byte_then_halt, out_word_then_halt, print_then, pvh_elf,
    CF9_RESET, EJECTING_GUEST, HALT_FOREVER, HOSTILE, HOSTILE_SMP, KBD_RESET, LSTAR_NON_CANONICAL,
    LSTAR_ROUND_TRIP, POWER_OFF, RESET, TRIPLE_FAULT, VIRTIO_HOSTILE, VSOCK_AGENT,
};

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("minivmm-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

fn require_kvm() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (any KVM, PVM included): load kvm_intel/kvm_amd or run on a VM host"
    );
}

struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

fn run_guest(name: &str, code: &[u8], args: &[&str], input: &[u8]) -> Run {
    require_kvm();
    let kernel = temp_path(&format!("{name}.elf"));
    std::fs::write(&kernel, pvh_elf(code)).expect("write guest");
    let mut child = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(if args.contains(&"--memory") {
            &[][..]
        } else {
            &["--memory", "size=64M"][..]
        })
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn minivmm");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
        // Keep stdin open until the guest is done, like an interactive console.
        std::thread::sleep(Duration::from_secs(30));
        drop(stdin);
    });
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let ereader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("minivmm did not exit within 20 s ({name})");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(writer);
    Run {
        code: status.code().unwrap_or(-1),
        stdout: reader.join().expect("reader"),
        stderr: ereader.join().expect("stderr reader"),
    }
}

#[test]
fn prints_and_powers_off_with_exit_code_0() {
    let r = run_guest(
        "hello",
        &print_then("GUEST-READY tiny\n", POWER_OFF),
        &[],
        b"",
    );
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "GUEST-READY tiny\n");
}

#[test]
fn two_boot_vcpus_and_hotplug_flags_start() {
    // APs wait for INIT/SIPI that never comes; the BSP powers off.
    let r = run_guest(
        "smp",
        &print_then("smp\n", POWER_OFF),
        &[
            "--cpus",
            "boot=2,max=4",
            "--memory",
            "size=128M,hotplug_size=256M",
        ],
        b"",
    );
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "smp\n");
}

/// Every way a guest can reset the machine, with `--no-reboot`: exit code 2, and the info log
/// names the path.
#[test]
fn every_reset_path_with_no_reboot_exits_2_and_is_named() {
    let cases: [(&str, &[u8], &str); 4] = [
        ("acpi", RESET, "the ACPI reset register"),
        ("kbd", KBD_RESET, "i8042 reset command"),
        ("cf9", CF9_RESET, "reset control register 0xcf9"),
        ("triple", TRIPLE_FAULT, "a triple fault at RIP 0x"),
    ];
    for (name, tail, needle) in cases {
        let r = run_guest(
            &format!("reset-{name}"),
            &print_then("bye\n", tail),
            &["--no-reboot", "--log-level", "info"],
            b"",
        );
        assert_eq!(r.code, 2, "{name}: stderr: {}", r.stderr);
        assert_eq!(String::from_utf8_lossy(&r.stdout), "bye\n", "{name}");
        assert!(r.stderr.contains(needle), "{name}: stderr: {}", r.stderr);
        assert!(
            r.stderr.contains("exiting because of --no-reboot"),
            "{name}: stderr: {}",
            r.stderr
        );
    }
}

/// A triple fault is a reset, as on a PC: it is reported at the default log level.
#[test]
fn triple_fault_is_a_reset_and_names_the_rip() {
    let r = run_guest(
        "fault",
        &print_then("x", TRIPLE_FAULT),
        &["--no-reboot"],
        b"",
    );
    assert_eq!(r.code, 2, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("triple fault"), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("RIP 0x"), "stderr: {}", r.stderr);
}

#[test]
fn console_input_arrives_whole() {
    // 4 KiB of input through the 64-byte UART FIFO, echoed back byte for byte.
    let mut input: Vec<u8> = (0..4096).map(|i| b'a' + (i % 26) as u8).collect();
    input.push(b'!');
    let r = run_guest("echo", &echo_until_bang(), &[], &input);
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    assert_eq!(
        r.stdout.len(),
        input.len(),
        "echoed {} of {} bytes",
        r.stdout.len(),
        input.len()
    );
    assert_eq!(r.stdout, input);
}

/// A minivmm running the echo guest (which runs until it reads '!') with a control socket.
struct Controlled {
    child: std::process::Child,
    sock: PathBuf,
}

impl Controlled {
    fn start(name: &str, args: &[&str]) -> Self {
        Self::start_with(name, &echo_until_bang(), args)
    }

    fn start_with(name: &str, code: &[u8], args: &[&str]) -> Self {
        Self::start_limited(name, code, args, None)
    }

    /// Like [`Controlled::start_with`], with at most `nofile` open descriptors (RLIMIT_NOFILE).
    fn start_limited(name: &str, code: &[u8], args: &[&str], nofile: Option<u64>) -> Self {
        use std::os::unix::process::CommandExt;
        require_kvm();
        let sock = temp_path(&format!("{name}.sock"));
        let kernel = temp_path(&format!("{name}.elf"));
        std::fs::write(&kernel, pvh_elf(code)).expect("write guest");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_minivmm"));
        cmd.arg("--kernel")
            .arg(&kernel)
            .args(args)
            .arg("--control")
            .arg(&sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only the child being started.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn minivmm");
        Controlled { child, sock }
    }

    /// Reads minivmm's stderr on a thread, so a flood of log lines cannot block it on a full
    /// pipe; the thread returns the whole log once minivmm exits.
    fn drain_log(&mut self) -> std::thread::JoinHandle<String> {
        let mut stderr = self.child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        })
    }

    fn connect(&self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match std::os::unix::net::UnixStream::connect(&self.sock) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    return Client(s);
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("cannot connect to the control socket: {e}"),
            }
        }
    }

    fn wait(mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "minivmm did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Controlled {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client(std::os::unix::net::UnixStream);

impl Client {
    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).expect("send");
    }

    fn reply(&mut self) -> String {
        let mut reply = Vec::new();
        let mut b = [0u8; 1];
        loop {
            let n = self.0.read(&mut b).expect("reply");
            assert_eq!(
                n,
                1,
                "connection closed before the reply ended: {:?}",
                String::from_utf8_lossy(&reply)
            );
            if b[0] == b'\n' {
                break;
            }
            reply.push(b[0]);
        }
        String::from_utf8(reply).expect("utf8 reply")
    }

    fn ask(&mut self, line: &str) -> String {
        self.send(format!("{line}\n").as_bytes());
        self.reply()
    }
}

/// An `info` reply without its clock (`uptime=`), for comparing VM state.
fn state(info: &str) -> String {
    info.split(' ')
        .filter(|w| !w.starts_with("uptime="))
        .collect::<Vec<_>>()
        .join(" ")
}

fn field<'a>(reply: &'a str, key: &str) -> &'a str {
    reply
        .split(' ')
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {reply:?}"))
}

#[test]
fn control_socket_answers_while_the_guest_runs() {
    let vm = Controlled::start(
        "ctl",
        &[
            "--cpus",
            "boot=1,max=2",
            "--memory",
            "size=64M,hotplug_size=128M",
        ],
    );
    let mut c = vm.connect();
    assert_eq!(c.ask("ping"), "ok pong");
    let info = c.ask("info");
    assert!(info.starts_with("ok state=running cpus=1 "), "{info}");
    assert!(
        info.contains(" mem=64M ") && info.contains(" max_mem=192M"),
        "{info}"
    );
    let grown = c.ask("resize mem=192M");
    assert!(grown.contains(" mem=192M "), "{grown}");
    assert_eq!(field(&c.ask("info"), "hotplug_slots_free"), "0");
    assert_eq!(c.ask("shutdown"), "ok shutting down");
    assert_eq!(vm.wait(), 0);
}

#[test]
fn bad_control_requests_get_errors_and_change_nothing() {
    let vm = Controlled::start(
        "bad",
        &[
            "--cpus",
            "boot=1,max=4",
            "--memory",
            "size=512M,hotplug_size=1G",
        ],
    );
    let mut c = vm.connect();
    let before = state(&c.ask("info"));
    assert!(before.starts_with("ok "), "{before}");
    let bad: &[(&str, &str)] = &[
        ("frobnicate", "unknown command"),
        ("resize", "resize needs"),
        ("resize foo=1", "unknown key"),
        ("resize cpus=", "missing value"),
        ("resize cpus", "missing value"),
        ("resize cpus=0", "cpus=0"),
        ("resize cpus=5", "exceeds max_cpus=4"),
        ("resize cpus=-1", "cpus"),
        ("resize mem=600M", "not a multiple of 128M"),
        ("resize mem=2G", "exceeds max_mem=1536M"),
        ("resize mem=12Q", "invalid size"),
        ("resize mem=32M", "below the minimum"),
        ("resize cpus=2 mem=600M", "not a multiple of 128M"),
        ("resize cpus=2 cpus=3", "duplicate"),
        ("info now", "takes no arguments"),
        ("", "empty request"),
    ];
    for (req, expect) in bad {
        let reply = c.ask(req);
        assert!(
            reply.starts_with("error ") && reply.contains(expect),
            "{req:?} -> {reply:?}"
        );
        assert_eq!(state(&c.ask("info")), before, "{req:?} changed the VM");
    }
    // Over-long line, invalid UTF-8, CRLF.
    let mut long = vec![b'x'; 5000];
    long.push(b'\n');
    c.send(&long);
    let reply = c.reply();
    assert!(
        reply.starts_with("error ") && reply.contains("4096"),
        "{reply}"
    );
    c.send(b"resize cpus=\xff\xfe\n");
    assert!(c.reply().starts_with("error "));
    assert_eq!(c.ask("ping\r"), "ok pong");
    assert_eq!(state(&c.ask("info")), before);

    // A client that disconnects mid-line changes nothing; a second client works meanwhile.
    let mut other = vm.connect();
    other.send(b"resize cpus=3");
    let mut third = vm.connect();
    assert_eq!(third.ask("ping"), "ok pong");
    drop(other);
    assert_eq!(state(&third.ask("info")), before);

    // A combined request is atomic: the invalid memory half stops the CPU half too.
    assert!(c.ask("resize cpus=3 mem=700M").starts_with("error "));
    assert_eq!(state(&c.ask("info")), before);

    // Valid combined request, then a removal the tiny guest never ejects.
    let r = c.ask("resize cpus=3 mem=768M");
    assert_eq!((field(&r, "cpus"), field(&r, "mem")), ("3", "768M"), "{r}");
    let r = c.ask("resize cpus=2");
    assert_eq!(
        (field(&r, "cpus"), field(&r, "pending_cpus")),
        ("3", "2"),
        "{r}"
    );
    let info = c.ask("info");
    assert_eq!(field(&info, "removing"), "2", "{info}");
    let refused = c.ask("resize cpus=4");
    assert!(
        refused.starts_with("error ") && refused.contains("removal of vCPU 2 still pending"),
        "{refused}"
    );
    // Memory can still change while a CPU removal is pending, and a shrink is only pending.
    let r = c.ask("resize mem=512M");
    assert_eq!(
        (field(&r, "mem"), field(&r, "pending_mem")),
        ("768M", "512M"),
        "{r}"
    );
    assert_eq!(c.ask("powerbutton"), "ok");
    assert!(c.ask("help").starts_with("ok commands="));
    assert_eq!(c.ask("shutdown"), "ok shutting down");
    assert_eq!(vm.wait(), 0);
}

#[test]
fn control_over_an_inherited_socketpair() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    require_kvm();
    let kernel = temp_path("fd.elf");
    std::fs::write(&kernel, pvh_elf(&echo_until_bang())).expect("write guest");
    let (mine, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_minivmm"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "size=64M", "--control", "fd=3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn minivmm");
    drop(theirs);
    mine.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut c = Client(mine);
    assert_eq!(c.ask("ping"), "ok pong");
    assert!(c.ask("info").starts_with("ok state=running"));
    assert_eq!(c.ask("shutdown"), "ok shutting down");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
}

#[test]
fn control_path_that_is_not_a_socket_is_refused() {
    require_kvm();
    let path = temp_path("not-a-socket");
    std::fs::write(&path, b"keep me").expect("write");
    let kernel = temp_path("nsock.elf");
    std::fs::write(&kernel, pvh_elf(&print_then("x", POWER_OFF))).expect("write guest");
    let out = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "size=64M", "--control"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run minivmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&path).expect("still there"), b"keep me");
}

#[test]
fn sigterm_ends_minivmm_cleanly() {
    let vm = Controlled::start("term", &["--memory", "size=64M"]);
    let mut c = vm.connect();
    assert_eq!(c.ask("ping"), "ok pong");
    // SAFETY: sending a signal to our own child process.
    assert_eq!(
        unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) },
        0
    );
    let sock = vm.sock.clone();
    assert_eq!(vm.wait(), 0);
    assert!(!sock.exists(), "the control socket is removed on exit");
}

/// Without `--no-reboot` every reset path rebuilds the VM in the same process (three boots
/// each), with two boot vCPUs.
#[test]
fn guest_reset_rebuilds_the_vm_in_process() {
    require_kvm();
    // The last case rebuilds a VM with a PIT, under the seccomp filter of the main thread.
    for (name, tail, pit) in [
        ("acpi", RESET, "off"),
        ("kbd", KBD_RESET, "off"),
        ("cf9", CF9_RESET, "off"),
        ("triple", TRIPLE_FAULT, "off"),
        ("acpi-pit", RESET, "on"),
    ] {
        let kernel = temp_path(&format!("reboot-{name}.elf"));
        std::fs::write(&kernel, pvh_elf(&print_then("boot\n", tail))).expect("write guest");
        let mut child = Command::new(env!("CARGO_BIN_EXE_minivmm"))
            .arg("--kernel")
            .arg(&kernel)
            .args(["--cpus", "boot=2", "--memory", "size=64M", "--pit", pit])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn minivmm");
        let mut out = child.stdout.take().expect("stdout");
        let mut seen = Vec::new();
        let mut buf = [0u8; 64];
        while seen.windows(5).filter(|w| w == b"boot\n").count() < 3 {
            let n = out.read(&mut buf).expect("read");
            assert!(
                n > 0,
                "{name}: minivmm exited after {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        assert_eq!(child.wait().expect("wait").code(), Some(0), "{name}");
    }
}

fn minivmm_output(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run minivmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unusable_guest_files_are_reported_with_exit_code_1() {
    require_kvm();
    let junk = temp_path("junk.bin");
    std::fs::write(&junk, vec![0x5au8; 8192]).expect("write");
    let (code, err) = minivmm_output(&["--kernel".as_ref(), junk.as_os_str()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("kernel"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    let missing = temp_path("does-not-exist");
    let (code, err) = minivmm_output(&["--kernel".as_ref(), missing.as_os_str()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot open kernel") && err.contains("does-not-exist"),
        "{err}"
    );

    // An initramfs larger than the guest's RAM cannot fit.
    let kernel = temp_path("fit.elf");
    std::fs::write(&kernel, pvh_elf(&print_then("x", POWER_OFF))).expect("write guest");
    let big = temp_path("big.cpio");
    let f = std::fs::File::create(&big).expect("create");
    f.set_len(80 << 20).expect("size");
    let (code, err) = minivmm_output(&[
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--initramfs".as_ref(),
        big.as_os_str(),
        "--memory".as_ref(),
        "size=64M".as_ref(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("initramfs") && err.contains("does not fit"),
        "{err}"
    );

    // A missing disk image, a read-only file opened for writing, a directory as a disk, and a
    // vsock socket path that is a regular file: exit 1, naming the flag.
    let ro = temp_path("ro.img");
    std::fs::write(&ro, vec![0u8; 4096]).expect("write image");
    let mut perms = std::fs::metadata(&ro).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
    std::fs::set_permissions(&ro, perms).expect("chmod");
    let dir = temp_path("a-dir");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let as_root = unsafe_is_root();
    for (flag, value, needle) in [
        (
            "--disk",
            format!("path={}", missing.display()),
            "does-not-exist",
        ),
        (
            "--disk",
            format!("path={},readonly=on", dir.display()),
            "not a regular file",
        ),
        (
            "--vsock",
            format!("cid=3,socket={}", junk.display()),
            "junk.bin",
        ),
    ]
    .into_iter()
    .chain((!as_root).then(|| ("--disk", format!("path={}", ro.display()), "ro.img")))
    {
        let (code, err) = minivmm_output(&[
            "--kernel".as_ref(),
            kernel.as_os_str(),
            flag.as_ref(),
            value.as_ref(),
        ]);
        assert_eq!(code, 1, "{flag} {value}: {err}");
        assert!(
            err.contains(flag) && err.contains(needle) && err.lines().count() == 1,
            "{flag} {value}: {err}"
        );
    }
    // The same read-only file is fine as a read-only disk (the guest powers off at once).
    let (code, err) = minivmm_output(&[
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--disk".as_ref(),
        format!("path={},readonly=on", ro.display()).as_ref(),
    ]);
    assert_eq!(code, 0, "{err}");
}

/// Whether this process runs as root (which may open read-only files for writing).
fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn dump_acpi_writes_tables_that_iasl_accepts() {
    require_kvm();
    let kernel = temp_path("dump.elf");
    std::fs::write(&kernel, pvh_elf(&print_then("x", POWER_OFF))).expect("write guest");
    let dir = temp_path("acpi-dump");
    let (code, err) = minivmm_output(&[
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--cpus".as_ref(),
        "boot=2,max=8".as_ref(),
        "--memory".as_ref(),
        "size=64M,hotplug_size=1G".as_ref(),
        "--dump-acpi".as_ref(),
        dir.as_os_str(),
    ]);
    assert_eq!(code, 0, "{err}");
    for t in ["DSDT", "APIC", "FACP", "XSDT"] {
        let path = dir.join(format!("{t}.dat"));
        assert!(path.exists(), "{} missing", path.display());
        let out = Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .current_dir(&dir)
            .output()
            .expect("iasl is needed: apt-get install acpica-tools");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !text.contains("Error"),
            "iasl -d {t}: {text}"
        );
    }
    let dsl = std::fs::read_to_string(dir.join("DSDT.dsl")).expect("DSDT.dsl");
    for name in ["C007", "M007", "ACPI0013", "PNP0C80"] {
        assert!(dsl.contains(name), "DSDT lacks {name}");
    }
}

#[test]
fn ram_above_the_32bit_hole_and_a_window_after_it() {
    // 3.5 GiB: 3 GiB below the MMIO hole and 512 MiB from 4 GiB; the hotplug window follows.
    // Guest RAM is mapped lazily, so this costs the host almost nothing.
    let vm = Controlled::start("high", &["--memory", "size=3584M,hotplug_size=1G"]);
    let mut c = vm.connect();
    let info = c.ask("info");
    assert_eq!(
        (field(&info, "mem"), field(&info, "max_mem")),
        ("3584M", "4608M"),
        "{info}"
    );
    let r = c.ask("resize mem=4G");
    assert_eq!(field(&r, "mem"), "4G", "{r}");
    let r = c.ask("resize mem=4608M");
    assert_eq!(field(&r, "mem"), "4608M", "{r}");
    assert_eq!(field(&c.ask("info"), "hotplug_slots_free"), "6");
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", vm.child.id())).expect("status");
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    assert!(
        rss_kib < 64 * 1024,
        "4.5 GiB of guest RAM must be mapped lazily; RSS is {rss_kib} kB"
    );
    assert_eq!(c.ask("shutdown"), "ok shutting down");
    assert_eq!(vm.wait(), 0);
}

/// The exit device maps a written value to `(value << 1) | 1` like QEMU's isa-debug-exit, at its
/// default port and at a chosen one, for byte and word writes; without `--exit-device` the port
/// is not decoded and the guest goes on.
#[test]
fn exit_device_ends_minivmm_with_the_mapped_code() {
    let cases: [(&str, Vec<u8>, &[&str], i32); 5] = [
        (
            "pass",
            print_then("t\n", &out_byte_then_halt(0x501, 0x10)),
            &["--exit-device", "on"],
            33,
        ),
        (
            "fail",
            print_then("t\n", &out_byte_then_halt(0x502, 0x11)),
            &["--exit-device", "on"],
            35,
        ),
        (
            "port",
            print_then("t\n", &out_word_then_halt(0xf4, 3)),
            &["--exit-device", "iobase=0xf4,iosize=4"],
            7,
        ),
        (
            "zero",
            print_then("t\n", &out_byte_then_halt(0x501, 0)),
            &["--exit-device", "on"],
            1,
        ),
        (
            "absent",
            print_then("t\n", &[out_byte(0x501, 0x10), POWER_OFF.to_vec()].concat()),
            &[],
            0,
        ),
    ];
    for (name, code, args, want) in cases {
        let mut all = vec!["--log-level", "info"];
        all.extend_from_slice(args);
        let r = run_guest(&format!("exit-{name}"), &code, &all, b"");
        assert_eq!(r.code, want, "{name}: stderr: {}", r.stderr);
        assert_eq!(String::from_utf8_lossy(&r.stdout), "t\n", "{name}");
        if want != 0 {
            assert!(
                r.stderr
                    .contains(&format!("to the exit device: exit code {want}")),
                "{name}: stderr: {}",
                r.stderr
            );
        }
    }
}

/// A pvpanic write ends minivmm with 4 and says so, even without --log-level; with
/// `--pvpanic off` the port is not decoded.
#[test]
fn pvpanic_write_is_exit_code_4() {
    let r = run_guest(
        "panic",
        &print_then("oops\n", &out_byte_then_halt(0x505, 1)),
        &[],
        b"",
    );
    assert_eq!(r.code, 4, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("guest panic"), "stderr: {}", r.stderr);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "oops\n");
    let code = [out_byte(0x505, 1), POWER_OFF.to_vec()].concat();
    let r = run_guest("panic-off", &code, &["--pvpanic", "off"], b"");
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
}

/// `--timeout` stops a guest that never exits, with 124 and a message, after the guest's output
/// reached stdout; not before the limit.
#[test]
fn timeout_stops_a_guest_that_never_exits() {
    let t = Instant::now();
    let r = run_guest(
        "timeout",
        &print_then("waiting\n", HALT_FOREVER),
        &["--timeout", "400ms"],
        b"",
    );
    let took = t.elapsed();
    assert_eq!(r.code, 124, "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("--timeout expired after 400ms"),
        "stderr: {}",
        r.stderr
    );
    assert_eq!(String::from_utf8_lossy(&r.stdout), "waiting\n");
    assert!(took >= Duration::from_millis(400), "stopped after {took:?}");
}

/// Reads lines from a watching client until `want` lines arrived.
fn lines(c: &mut Client, want: usize) -> Vec<String> {
    (0..want).map(|_| c.reply()).collect()
}

/// `watch` gets one line per event, in order, after its own reply: hot-added vCPU and memory,
/// power button, reboot, the boot marker of the new boot, and finally the exit with its code.
/// `info` reports the boot marker and the uptime.
#[test]
fn watch_delivers_events_in_order() {
    // The guest marks the debug port, then echoes its console until '!'.
    let code = [out_byte(0x80, 0x42), echo_until_bang()].concat();
    let vm = Controlled::start_with(
        "watch",
        &code,
        &[
            "--cpus",
            "boot=1,max=2",
            "--memory",
            "size=64M,hotplug_size=128M",
        ],
    );
    let mut c = vm.connect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while field(&c.ask("info"), "boot_ms") == "none" {
        assert!(Instant::now() < deadline, "no boot marker in info");
        std::thread::sleep(Duration::from_millis(10));
    }
    let info = c.ask("info");
    assert!(
        field(&info, "uptime").parse::<f64>().expect("uptime") > 0.0,
        "{info}"
    );
    field(&info, "boot_ms")
        .parse::<u64>()
        .expect("boot_ms is a number");
    // Subscribed after the first boot's marker: events are not replayed.
    let mut w = vm.connect();
    assert_eq!(w.ask("watch"), "ok watching");
    assert!(c.ask("resize cpus=2 mem=192M").starts_with("ok cpus=2 "));
    assert_eq!(c.ask("powerbutton"), "ok");
    assert_eq!(
        lines(&mut w, 3),
        [
            "event mem-added slot=0 start=0x100000000 size=128M",
            "event cpu-added cpu=1",
            "event powerbutton",
        ]
    );
    assert_eq!(c.ask("reboot"), "ok rebooting");
    let after = lines(&mut w, 3);
    assert_eq!(after[0], "event reboot cause=control");
    assert_eq!(after[1], "event boot n=2 cpus=2 mem=192M");
    assert!(
        after[2].starts_with("event boot-marker value=0x42 "),
        "{after:?}"
    );
    assert_eq!(c.ask("shutdown"), "ok shutting down");
    assert_eq!(w.reply(), "event exit code=0 reason=poweroff");
    assert_eq!(vm.wait(), 0);
}

/// A guest's exit-device write reaches a watcher as the exit event with the mapped code.
#[test]
fn watch_sees_the_guest_exit_code() {
    // Wait for '!' on the console (sent once the watcher is subscribed), then exit with 0x11.
    let mut code = echo_until_bang();
    code.truncate(code.len() - POWER_OFF.len());
    code.extend_from_slice(&out_byte_then_halt(0x501, 0x11));
    let mut vm = Controlled::start_with("watch-exit", &code, &["--exit-device", "on"]);
    let mut w = vm.connect();
    assert_eq!(w.ask("watch"), "ok watching");
    let stdin = vm.child.stdin.as_mut().expect("stdin");
    stdin.write_all(b"!").expect("write");
    assert_eq!(w.reply(), "event exit code=35 reason=guest-exit");
    assert_eq!(vm.wait(), 35);
}

/// A guest write of IA32_LSTAR (how a vCPU coming online is seen) goes through minivmm and takes
/// effect: the guest reads back what it wrote, and the vCPU is logged online. Without
/// `--cpu-online-events` the filter is not installed and KVM handles the write alone.
#[test]
fn lstar_write_is_completed_and_reports_the_cpu_online() {
    let r = run_guest(
        "lstar",
        LSTAR_ROUND_TRIP,
        &[
            "--cpu-online-events",
            "on",
            "--exit-device",
            "on",
            "--log-level",
            "info",
        ],
        b"",
    );
    // 0x44 read back: (0x44 << 1 | 1) & 0xff = 0x89.
    assert_eq!(r.code, 0x89, "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("vCPU 0 is online"),
        "stderr: {}",
        r.stderr
    );
}

/// A hostile LSTAR value (non-canonical) that KVM refuses is a #GP for the guest, as on hardware,
/// not a minivmm failure: with no IDT the guest then triple-faults, which is a reset (exit 2).
#[test]
fn a_refused_lstar_write_is_a_guest_fault_not_a_vmm_one() {
    let r = run_guest(
        "lstar-bad",
        LSTAR_NON_CANONICAL,
        &[
            "--cpu-online-events",
            "on",
            "--exit-device",
            "on",
            "--no-reboot",
        ],
        b"",
    );
    assert_eq!(r.code, 2, "stderr: {}", r.stderr);
}

#[test]
fn many_vcpus_at_boot_and_hot_added_under_seccomp() {
    // Twelve boot vCPUs, then 64: more threads than glibc allocates malloc arenas for before it
    // counts the CPUs by opening a sysfs file, which the filters forbid.
    let vm = Controlled::start_with(
        "many-vcpus",
        HALT_FOREVER,
        &["--cpus", "boot=12,max=64", "--memory", "size=64M"],
    );
    let mut c = vm.connect();
    assert_eq!(field(&c.ask("info"), "cpus"), "12");
    let reply = c.ask("resize cpus=64");
    assert!(reply.starts_with("ok cpus=64"), "{reply}");
    let info = c.ask("info");
    assert_eq!(
        (field(&info, "state"), field(&info, "cpus")),
        ("running", "64"),
        "{info}"
    );
    assert!(c.ask("shutdown").starts_with("ok"));
    assert_eq!(vm.wait(), 0);
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// User plus system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// The most control connections minivmm keeps open (src/control/socket.rs).
const MAX_CONTROL_CLIENTS: usize = 64;

#[test]
fn control_floods_slow_and_greedy_clients_leave_the_vm_and_others_unaffected() {
    let vm = Controlled::start_with(
        "flood",
        HALT_FOREVER,
        &["--cpus", "boot=1,max=2", "--memory", "size=64M"],
    );
    let pid = vm.child.id();
    let mut probe = vm.connect();
    assert!(probe.ask("info").starts_with("ok"));
    let base = open_fds(pid);

    // Far more connections, one after the other, than any descriptor limit would allow if
    // they leaked.
    for i in 0..3000 {
        let mut c = vm.connect();
        let reply = c.ask("info");
        assert!(
            reply.starts_with("ok state=running"),
            "connection {i}: {reply}"
        );
    }
    assert!(probe.ask("info").starts_with("ok"));
    let after = open_fds(pid);
    assert!(
        after <= base + 4,
        "descriptors {base} -> {after} after 3000 connections"
    );

    // Idle and half-written (slowloris) connections, beyond the cap: the quietest are closed,
    // with a reason, and a working client is served.
    let mut held: Vec<std::os::unix::net::UnixStream> = (0..MAX_CONTROL_CLIENTS + 36)
        .map(|i| {
            let mut s = vm.connect().0;
            if i % 2 == 0 {
                s.write_all(b"inf").expect("partial line");
            }
            s
        })
        .collect();
    let mut worker = vm.connect();
    assert!(worker.ask("info").starts_with("ok state=running"));
    let fds = open_fds(pid);
    assert!(
        fds <= base + 2 * MAX_CONTROL_CLIENTS + 4,
        "{fds} descriptors with {} connections held (base {base})",
        held.len()
    );
    let mut reason = String::new();
    held[0]
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = held[0].read_to_string(&mut reason);
    assert!(
        reason.contains("quietest"),
        "the first held connection got {reason:?}"
    );

    // A client that never reads its replies is disconnected once 64 KiB are queued.
    let mut greedy = vm.connect();
    for _ in 0..3000 {
        if greedy.0.write_all(b"info\n").is_err() {
            break;
        }
    }
    assert!(worker.ask("info").starts_with("ok state=running"));
    let mut got = Vec::new();
    let _ = greedy.0.read_to_end(&mut got);
    assert!(
        got.len() < 3000 * 200,
        "the greedy client got every reply ({} bytes)",
        got.len()
    );
    assert!(worker.ask("resize cpus=2").starts_with("ok cpus=2"));
    held.clear();
    assert!(worker.ask("shutdown").starts_with("ok"));
    assert_eq!(vm.wait(), 0);
}

#[test]
fn out_of_descriptors_the_control_socket_sheds_connections_without_spinning() {
    let vm = Controlled::start_limited(
        "nofile",
        HALT_FOREVER,
        &["--cpus", "boot=1,max=2", "--memory", "size=64M"],
        Some(40),
    );
    let pid = vm.child.id();
    let mut first = vm.connect();
    assert!(first.ask("info").starts_with("ok"));
    // More connections than the 40 descriptors allow (each accepted one takes two).
    let held: Vec<_> = (0..60).map(|_| vm.connect()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(pid) - t0;
    assert!(
        spent < 50,
        "minivmm used {spent} ticks of CPU in 1 s while out of descriptors"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    // Descriptors are free again: the VM still grows, a new client is served.
    let mut c = vm.connect();
    let reply = c.ask("resize cpus=2");
    assert!(reply.starts_with("ok cpus=2"), "{reply}");
    assert!(first.ask("info").starts_with("ok state=running"));
    assert!(c.ask("shutdown").starts_with("ok"));
    assert_eq!(vm.wait(), 0);
}

#[test]
fn a_hostile_guest_cannot_crash_or_stall_minivmm() {
    let vm = Controlled::start_with(
        "hostile",
        HOSTILE,
        &[
            "--cpus",
            "boot=1,max=4",
            "--memory",
            "size=64M,hotplug_size=512M,removable=on,remove_timeout=1",
            "--pvpanic",
            "off",
        ],
    );
    let (asked, log) = hammer_with_resizes(
        vm,
        1..=4,
        &[
            "resize cpus=3",
            "resize cpus=1",
            "resize mem=192M",
            "resize cpus=4 mem=320M",
        ],
        |_| {},
    );
    println!(
        "hostile guest: {asked} info+resize pairs answered, {} log lines",
        log.lines().count()
    );
}

/// For 3 s, asks `info` (whose cpus must stay in `cpus`) and then the next of `requests`, each
/// of which must be answered; calls `sample` with minivmm's pid every 50 pairs; then shuts down
/// and checks the exit and the log. Returns the pairs answered and minivmm's log.
fn hammer_with_resizes(
    mut vm: Controlled,
    cpus: std::ops::RangeInclusive<u32>,
    requests: &[&str],
    mut sample: impl FnMut(u32),
) -> (u32, String) {
    let log = vm.drain_log();
    let mut c = vm.connect();
    let t0 = Instant::now();
    let mut asked = 0u32;
    while t0.elapsed() < Duration::from_secs(3) {
        let info = c.ask("info");
        assert!(info.starts_with("ok state=running"), "{info}");
        let n: u32 = field(&info, "cpus").parse().expect("cpus");
        assert!(cpus.contains(&n), "{info}");
        // Resizes while the guest scribbles over the controllers: each is answered.
        let request = requests[asked as usize % requests.len()];
        asked += 1;
        let reply = c.ask(request);
        assert!(
            reply.starts_with("ok") || reply.starts_with("error"),
            "{request}: {reply}"
        );
        if asked.is_multiple_of(50) {
            sample(vm.child.id());
        }
    }
    assert!(asked >= 20, "only {asked} requests answered in 3 s");
    assert!(c.ask("shutdown").starts_with("ok"));
    assert_eq!(vm.wait(), 0);
    let log = log.join().expect("log reader");
    assert!(
        !log.contains("panicked") && !log.contains("seccomp"),
        "{log}"
    );
    (asked, log)
}

/// CPU time (user + system, in clock ticks) of each of `pid`'s threads named `vcpuN`.
fn vcpu_ticks(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let Ok(task) = task else { continue };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        if name.starts_with("vcpu") && fields.len() > 13 {
            let ticks =
                fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
            out.push((name, ticks));
        }
    }
    out.sort();
    out
}

/// The hostile guest on 4 vCPUs at once, all hammering the same devices and hotplug
/// controllers concurrently while resizes run: every vCPU is busy (its thread uses CPU), and
/// minivmm stays up, answers every request and shuts down cleanly.
#[test]
fn a_hostile_guest_on_four_vcpus_cannot_crash_or_stall_minivmm() {
    let vm = Controlled::start_with(
        "hostile-smp",
        HOSTILE_SMP,
        &[
            "--cpus",
            "boot=4,max=6",
            "--memory",
            "size=64M,hotplug_size=512M,removable=on,remove_timeout=1",
            "--pvpanic",
            "off",
        ],
    );
    // A vCPU that never got its SIPI waits in KVM and uses no CPU time at all. The guest resets
    // the machine now and then (new vCPU threads, new counters), so the most CPU time each vCPU
    // thread showed in any sample counts.
    let mut most: Vec<(String, u64)> = Vec::new();
    let (asked, _) = hammer_with_resizes(
        vm,
        4..=6,
        &["resize cpus=6", "resize cpus=4 mem=192M", "resize mem=64M"],
        |pid| {
            for (name, t) in vcpu_ticks(pid) {
                match most.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, m)) => *m = (*m).max(t),
                    None => most.push((name, t)),
                }
            }
        },
    );
    let busy = most
        .iter()
        .filter(|(name, t)| ["vcpu0", "vcpu1", "vcpu2", "vcpu3"].contains(&name.as_str()) && *t > 0)
        .count();
    assert!(
        busy == 4,
        "every boot vCPU runs the hostile code (most CPU ticks seen per vCPU thread): {most:?}"
    );
    println!(
        "hostile guest on 4 vCPUs: {asked} info+resize pairs answered in 3 s, {busy} vCPUs busy"
    );
}

/// Runs the hostile virtio driver against the first virtio device `args` give it for 3 s,
/// asking `info` throughout; checks minivmm answered, shut down cleanly and logged no panic or
/// seccomp violation. Returns the log.
fn hostile_virtio_run(name: &str, args: &[&str]) -> String {
    let mut vm = Controlled::start_with(name, VIRTIO_HOSTILE, args);
    let log = vm.drain_log();
    let mut c = vm.connect();
    let t0 = Instant::now();
    let mut asked = 0u32;
    while t0.elapsed() < Duration::from_secs(3) {
        let info = c.ask("info");
        assert!(info.starts_with("ok state=running"), "{info}");
        asked += 1;
    }
    assert!(asked >= 20, "only {asked} info requests answered in 3 s");
    assert!(c.ask("shutdown").starts_with("ok"));
    assert_eq!(vm.wait(), 0);
    let log = log.join().expect("log reader");
    assert!(
        !log.contains("panicked") && !log.contains("seccomp"),
        "{log}"
    );
    println!(
        "{name}: {asked} info requests answered in 3 s, {} log lines",
        log.lines().count()
    );
    log
}

/// A guest driving a virtio-blk disk with random queue set-ups, descriptor chains (loops, lengths
/// up to 4 GiB, addresses outside RAM, no status byte) and avail indices: minivmm stays up,
/// answers `info` throughout, and shuts down cleanly.
#[test]
fn a_hostile_virtio_driver_cannot_crash_or_stall_minivmm() {
    let disk = temp_path("hostile-disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("write disk");
    let disk_arg = format!("path={}", disk.display());
    let log = hostile_virtio_run("virtio-hostile", &["--disk", &disk_arg, "--pvpanic", "off"]);
    assert_eq!(
        std::fs::metadata(&disk).expect("disk").len(),
        1 << 20,
        "writes never grow the image"
    );
    assert!(
        log.contains("virtio device type 2") && log.contains("needs a reset"),
        "the guest's broken queues reached the device: {log}"
    );
}

/// Whether the peer closed nonblocking `s`: a read sees end of file or an error other than
/// "no data yet" (after any data still buffered).
fn closed_by_peer(mut s: &std::os::unix::net::UnixStream) -> bool {
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

/// The same hostile driver on a vsock device while host clients keep connecting (some sending
/// `CONNECT`, whose requests reach the guest's RX queue, some silent): every one of its resets
/// drops live host connections, which must happen on the event loop's thread (the vCPU filter
/// has no socket calls), so minivmm stays up with its filters on and the host sees its
/// connections closed.
#[test]
fn a_hostile_virtio_driver_resetting_vsock_with_live_host_connections() {
    let host = VsockHost::new("vsock-hostile");
    let vsock = format!("cid=3,socket={}", host.sock.display());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sock = host.sock.clone();
    let flag = stop.clone();
    let clients = std::thread::spawn(move || {
        let (mut opened, mut closed) = (0u32, 0u32);
        let mut live = std::collections::VecDeque::new();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) {
                if opened % 2 == 0 {
                    let _ = s.write_all(format!("CONNECT {}\n", 5000 + opened % 7).as_bytes());
                }
                let _ = s.set_nonblocking(true);
                opened += 1;
                live.push_back(s);
            }
            // Count the connections minivmm closed (a reset, or no listener in the guest).
            live.retain(|s| {
                let gone = closed_by_peer(s);
                closed += u32::from(gone);
                !gone
            });
            while live.len() > 32 {
                live.pop_front();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (opened, closed)
    });
    hostile_virtio_run(
        "vsock-hostile",
        &[
            "--vsock",
            &vsock,
            "--pvpanic",
            "off",
            "--memory",
            "size=64M",
        ],
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (opened, closed) = clients.join().expect("clients");
    println!("vsock-hostile: {opened} host connections, {closed} seen closed");
    assert!(opened >= 100, "only {opened} host connections in 3 s");
    assert!(
        closed >= opened / 4,
        "{closed} of {opened} host connections seen closed"
    );
}

/// How many anonymous mappings of exactly `size` bytes process `pid` has (guest RAM slots; the
/// rest of minivmm has none of 128 MiB).
fn mappings_of(pid: u32, size: u64) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    maps.lines()
        .filter(|l| {
            let mut cols = l.split_whitespace();
            let (Some(range), Some(perms)) = (cols.next(), cols.next()) else {
                return false;
            };
            let anonymous = cols.nth(3).is_none();
            let len = range.split_once('-').and_then(|(a, b)| {
                Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
            });
            perms.starts_with("rw") && anonymous && len == Some(size)
        })
        .count()
}

/// Reads event lines until one starts with `prefix`; returns the lines read.
fn events_until(w: &mut Client, prefix: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let line = w.reply();
        let done = line.starts_with(prefix);
        seen.push(line);
        if done {
            return seen;
        }
        assert!(seen.len() < 100, "no {prefix:?} in {seen:?}");
    }
}

/// A live shrink with removable memory and a guest that ejects what it is asked to: slots go
/// one at a time from the top, each unmapped after its eject (its host mapping is gone),
/// down to the largest size at or above the target; the rest waits for the reboot. A grow
/// afterwards reuses the slots.
#[test]
fn a_live_memory_shrink_unmaps_each_slot_after_the_guests_eject() {
    let vm = Controlled::start_with(
        "mem-eject",
        EJECTING_GUEST,
        &[
            "--cpus",
            "boot=1,max=2",
            "--memory",
            "size=64M,hotplug_size=1G,removable=on",
        ],
    );
    let mut w = vm.connect();
    assert_eq!(w.ask("watch"), "ok watching");
    let mut c = vm.connect();
    assert_eq!(
        c.ask("resize cpus=2 mem=576M"),
        "ok cpus=2 pending_cpus=2 mem=576M pending_mem=576M"
    );
    let added = events_until(&mut w, "event cpu-added cpu=1");
    assert_eq!(
        added,
        [
            "event mem-added slot=0 start=0x100000000 size=128M",
            "event mem-added slot=1 start=0x108000000 size=128M",
            "event mem-added slot=2 start=0x110000000 size=128M",
            "event mem-added slot=3 start=0x118000000 size=128M",
            "event cpu-added cpu=1",
        ]
    );
    let pid = vm.child.id();
    assert_eq!(mappings_of(pid, 128 << 20), 4, "one mapping per slot");
    // 150M: slots 3, 2 and 1 go live (192M stays at or above it; without slot 0 it would be
    // 64M); the last 42M wait for the reboot.
    assert_eq!(
        c.ask("resize mem=150M"),
        "ok cpus=2 pending_cpus=2 mem=576M pending_mem=150M"
    );
    let removed = events_until(&mut w, "event mem-removed slot=1 ");
    let want = [
        "event mem-removing slot=3 start=0x118000000 size=128M",
        "event mem-removed slot=3 size=128M",
        "event mem-removing slot=2 start=0x110000000 size=128M",
        "event mem-removed slot=2 size=128M",
        "event mem-removing slot=1 start=0x108000000 size=128M",
        "event mem-removed slot=1 size=128M",
    ];
    assert_eq!(removed, want);
    let info = c.ask("info");
    for (k, v) in [
        ("mem", "192M"),
        ("pending_mem", "150M"),
        ("removing_mem", "none"),
        ("hotplug_slots_free", "7"),
        ("cpus", "2"),
    ] {
        assert_eq!(field(&info, k), v, "{k} in {info}");
    }
    assert_eq!(
        mappings_of(pid, 128 << 20),
        1,
        "the three ejected slots are unmapped"
    );
    // Grow again: the freed slots and addresses are reused.
    assert_eq!(
        c.ask("resize mem=448M"),
        "ok cpus=2 pending_cpus=2 mem=448M pending_mem=448M"
    );
    assert_eq!(
        events_until(&mut w, "event mem-added slot=2 "),
        [
            "event mem-added slot=1 start=0x108000000 size=128M",
            "event mem-added slot=2 start=0x110000000 size=128M",
        ]
    );
    assert_eq!(mappings_of(pid, 128 << 20), 3);
    assert!(c.ask("shutdown").starts_with("ok"));
    assert_eq!(vm.wait(), 0);
}

/// A guest that never ejects: the removal is withdrawn after `remove_timeout`, the slot stays,
/// the shrink waits for the reboot, and memory resizes are accepted again. While it waits, only
/// the same target is accepted.
#[test]
fn an_unanswered_memory_removal_is_withdrawn_after_the_timeout() {
    let vm = Controlled::start_with(
        "mem-timeout",
        HALT_FOREVER,
        &[
            "--memory",
            "size=64M,hotplug_size=512M,removable=on,remove_timeout=1",
        ],
    );
    let mut w = vm.connect();
    assert_eq!(w.ask("watch"), "ok watching");
    let mut c = vm.connect();
    assert!(c.ask("resize mem=320M").starts_with("ok "));
    assert_eq!(
        c.ask("resize mem=192M"),
        "ok cpus=1 pending_cpus=1 mem=320M pending_mem=192M"
    );
    let asked = Instant::now();
    assert_eq!(field(&c.ask("info"), "removing_mem"), "1");
    let refused = c.ask("resize mem=64M");
    assert!(
        refused.starts_with("error removal of memory slot 1 still pending for "),
        "{refused}"
    );
    assert!(c.ask("resize mem=192M").starts_with("ok "), "same target");
    let seen = events_until(&mut w, "event mem-remove-withdrawn ");
    let waited = asked.elapsed();
    assert_eq!(
        seen.last().map(String::as_str),
        Some("event mem-remove-withdrawn slot=1 reason=timeout"),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"event mem-removing slot=1 start=0x108000000 size=128M".to_string()),
        "{seen:?}"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "withdrawn after {waited:?}"
    );
    let info = c.ask("info");
    for (k, v) in [
        ("mem", "320M"),
        ("pending_mem", "192M"),
        ("removing_mem", "none"),
    ] {
        assert_eq!(field(&info, k), v, "{k} in {info}");
    }
    assert!(c
        .ask("resize mem=448M")
        .starts_with("ok cpus=1 pending_cpus=1 mem=448M"));
    assert!(c.ask("shutdown").starts_with("ok"));
    assert_eq!(vm.wait(), 0);
}

#[test]
fn a_guest_cannot_flood_the_log() {
    // out 0x600, (SLP_TYP 3 | SLP_EN) forever: an unsupported sleep request, a warning each.
    let code = [0x66, 0xba, 0x00, 0x06, 0xb0, 0x2c, 0xee, 0xeb, 0xfd];
    let mut vm = Controlled::start_with("log-flood", &code, &["--memory", "size=64M"]);
    let log = vm.drain_log();
    let mut c = vm.connect();
    std::thread::sleep(Duration::from_secs(2));
    assert!(c.ask("info").starts_with("ok state=running"));
    assert!(c.ask("shutdown").starts_with("ok"));
    assert_eq!(vm.wait(), 0);
    let log = log.join().expect("log reader");
    let warnings = log.matches("unsupported sleep type").count();
    // A burst of 200, then 20 a second, for about 2 s (and the time to shut down).
    assert!(
        (150..=320).contains(&warnings),
        "{warnings} warnings in about 2 s"
    );
    assert!(log.contains("log lines held back"), "{log}");
}

/// Every thread kind is confined: a forbidden system call (`getppid`, made by the debug-build
/// probe `MINIVMM_TEST_FORBIDDEN_SYSCALL`) from the event-loop thread or from a vCPU thread
/// kills minivmm with exit code 159 and names the call, the thread and its filter, also with
/// the console on a terminal, which is left as it was found (the report once died unwritten on
/// a vCPU thread, whose filter lacked the handler's terminal restore); with `--seccomp off` the
/// same call is harmless and the guest runs to its power-off.
#[test]
fn a_forbidden_system_call_from_each_thread_kind_is_killed() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    require_kvm();
    let kernel = temp_path("seccomp-probe.elf");
    std::fs::write(&kernel, pvh_elf(&print_then("up\n", POWER_OFF))).expect("write guest");
    // Returns the exit code, stderr, and whether the terminal (if any) is canonical again.
    let run = |kind: &str, seccomp: &str, tty: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_minivmm"));
        cmd.args(["--kernel".as_ref(), kernel.as_os_str()])
            .args(["--seccomp", seccomp])
            .env("MINIVMM_TEST_FORBIDDEN_SYSCALL", kind);
        let mut pty = None;
        if tty {
            let (mut master, mut slave) = (-1, -1);
            // SAFETY: openpty writes two descriptors into the given ints; no name, termios or
            // window size is passed.
            let r = unsafe {
                libc::openpty(
                    &mut master,
                    &mut slave,
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    std::ptr::null(),
                )
            };
            assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
            // SAFETY: both descriptors were just opened and are owned here alone.
            let (master, slave) =
                unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
            cmd.args(["--serial", "tty"])
                .stdin(slave.try_clone().expect("dup"))
                .stdout(slave.try_clone().expect("dup"));
            pty = Some((master, slave));
        } else {
            cmd.args(["--serial", "off"]).stdin(Stdio::null());
        }
        let out = cmd.output().expect("run minivmm");
        let canonical = pty.as_ref().is_none_or(|(_, slave)| {
            // SAFETY: termios is plain data that tcgetattr fills for a descriptor we own.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let r = unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut t) };
            r == 0 && t.c_lflag & libc::ICANON != 0
        });
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            canonical,
        )
    };
    let getppid = libc::SYS_getppid;
    for (kind, thread, filter) in [
        ("main", "vmm (event loop)", "vmm.json"),
        ("vcpu", "vcpu0", "vcpu.json"),
    ] {
        let report = format!(
            "seccomp: forbidden system call getppid (nr {getppid}) on thread {thread}; \
             exiting (see seccomp/{filter})"
        );
        for tty in [false, true] {
            let (code, err, canonical) = run(kind, "on", tty);
            assert_eq!(code, 159, "{kind} thread, tty {tty}: {err}");
            assert!(err.contains(&report), "{kind} thread, tty {tty}: {err}");
            assert!(canonical, "{kind} thread: the terminal was left raw");
        }
        let (code, err, _) = run(kind, "off", false);
        assert_eq!(code, 0, "{kind} thread without filters: {err}");
    }
}

/// The host side of the tiny vsock agent's connections: the listener its guest connections
/// reach (`PATH_6000`), and hybrid-vsock clients before their `CONNECT` line (connections to
/// a guest port go through `stream::hybrid_connect`).
struct VsockHost {
    sock: PathBuf,
    listener: std::os::unix::net::UnixListener,
}

impl VsockHost {
    fn new(name: &str) -> Self {
        let sock = temp_path(&format!("{name}.vsock"));
        let _ = std::fs::remove_file(&sock);
        let port = PathBuf::from(format!("{}_6000", sock.display()));
        let _ = std::fs::remove_file(&port);
        let listener = std::os::unix::net::UnixListener::bind(&port).expect("bind PATH_6000");
        listener.set_nonblocking(true).expect("nonblocking");
        VsockHost { sock, listener }
    }

    /// The agent's connection to host port 6000, which it opens each time it brings the
    /// device up.
    fn accept_agent(&self) -> std::os::unix::net::UnixStream {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    return s;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the agent did not connect");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// A client of the hybrid socket, before its `CONNECT` line.
    fn client(&self) -> std::os::unix::net::UnixStream {
        let s = std::os::unix::net::UnixStream::connect(&self.sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s
    }
}

/// A guest that resets its vsock device, reboots and powers off while the host holds
/// connections in both directions (established, with unread data in flight, and a client that
/// has not sent its `CONNECT` line): the vCPU thread that takes the guest's status write must
/// leave the host sockets to the event loop (the vCPU filter has no socket calls), so minivmm
/// keeps running with every filter on, the host sees each connection closed, vsock works again
/// after the reset and after the reboot, and the power-off is exit 0.
#[test]
fn vsock_reset_reboot_and_power_off_with_live_host_connections() {
    let host = VsockHost::new("vsock-live");
    let vsock = format!("cid=3,socket={}", host.sock.display());
    let mut vm = Controlled::start_with(
        "vsock-live",
        VSOCK_AGENT,
        &[
            "--vsock",
            &vsock,
            "--memory",
            "size=64M",
            "--log-level",
            "info",
        ],
    );
    let log = vm.drain_log();
    let mut control = vm.connect();
    for (round, command) in [b"r", b"r", b"b", b"p"].into_iter().enumerate() {
        let agent = host.accept_agent();
        let timeout = Duration::from_secs(10);
        let mut a = hybrid_connect(&host.sock, 5000, timeout);
        let mut b = hybrid_connect(&host.sock, 5001, timeout);
        let waiting = host.client();
        let mut c = hybrid_connect(&host.sock, 5002, timeout);
        // Data the agent never reads, in flight as the device goes away.
        b.write_all(&[7u8; 4096]).expect("write");
        a.write_all(b"x").expect("write");
        c.write_all(command).expect("command");
        for (s, what) in [(&agent, "agent"), (&waiting, "waiting")] {
            read_to_close(s, &format!("round {round}: {what}"));
        }
        for (s, what) in [(&a, "a"), (&b, "b"), (&c, "c")] {
            read_to_close(s, &format!("round {round}: {what}"));
        }
        if command != b"p" {
            std::thread::sleep(Duration::from_millis(20));
            let exited = vm.child.try_wait().expect("wait");
            assert!(exited.is_none(), "round {round}: minivmm ended: {exited:?}");
            let info = control.ask("info");
            assert!(
                info.starts_with("ok state=running"),
                "round {round}: {info}"
            );
        }
    }
    assert_eq!(vm.wait(), 0, "the power-off with connections open");
    let log = log.join().expect("log");
    assert!(!log.contains("seccomp"), "{log}");
    assert!(log.contains("ACPI reset register"), "the reboot: {log}");
}

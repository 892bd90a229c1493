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
//!   `thread=multi,tb-size=512`), the QEMU binary `MINIVMM_TEST_L1_QEMU` (default
//!   `qemu-system-x86_64`), for experiments with the emulated host's own faults. Each emulated
//!   host runs on one host CPU ([`l1_cpus`]; `MINIVMM_TEST_L1_TASKSET` changes that).
//! * **Diagnosis.** `MINIVMM_TEST_KVM_TRACE=1` traces KVM in the kernel that runs minivmm and prints
//!   the trace up to a guest triple fault when a test fails (see [`kvm_trace`]).
//! * **Guest driver.** [`Vm`] spawns minivmm with the serial console on pipes, waits for the guest's
//!   `GUEST-READY` marker, runs shell commands through an echo-proof marker protocol and talks to the
//!   control socket.
//!
//! Files: `paths.rs` (binary, images, logs), `host.rs` (choosing where a test body runs),
//! `emulated.rs` (the emulated test host: slots, runs, faults, retries), `guest.rs` (the guest
//! driver), `output.rs` (collecting a console), `cli.rs` (minivmm without a guest), `stream.rs`
//! (vsock stream helpers), `kvm_trace.rs` (KVM tracing in the test host).
//!
//! Images come from `tests/guest/build-images.sh` (into `tests/.cache/`); they are built on first use.
//! Logs: `target/test-logs/<test>.l1.log` (emulated host console) and `<test>.l2.<n>.log` (guest console,
//! direct runs); inside the emulated host the guest logs are printed to the console instead, so they end up
//! in the L1 log.

#![allow(dead_code, unused_imports)] // Each test crate uses a different subset.

pub mod kvm_trace;
pub mod stream;

mod cli;
mod emulated;
mod guest;
mod host;
mod output;
mod paths;

pub use cli::*;
pub use emulated::*;
pub use guest::*;
pub use host::*;
pub use output::*;
pub use paths::*;

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

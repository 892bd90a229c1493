//! Seccomp filters: one JSON filter per thread kind (`seccomp/vmm.json` for the main thread,
//! `seccomp/vcpu.json` for vCPU threads), compiled with seccompiler at start-up and installed
//! before a thread touches guest-controlled input. A forbidden system call raises SIGSYS, whose
//! handler names the call, the thread that made it and its filter, and ends the process.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};

pub use seccompiler::BpfProgram;

/// The main (VMM) thread's filter, as JSON.
pub const VMM_FILTER_JSON: &str = include_str!("../../seccomp/vmm.json");
/// The vCPU threads' filter, as JSON.
pub const VCPU_FILTER_JSON: &str = include_str!("../../seccomp/vcpu.json");

/// Seccomp errors.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A JSON filter did not compile.
    #[error("cannot compile the {0} seccomp filter: {1}")]
    Compile(&'static str, #[source] seccompiler::Error),
    /// The JSON did not define the expected filter.
    #[error("seccomp JSON has no filter named {0:?}")]
    Missing(&'static str),
    /// Installing the filter failed.
    #[error("cannot install seccomp filter: {0}")]
    Apply(#[source] seccompiler::Error),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    SigsysHandler(#[source] std::io::Error),
}

/// The compiled filters.
pub struct Filters {
    /// For the main thread.
    pub vmm: BpfProgram,
    /// For vCPU threads.
    pub vcpu: BpfProgram,
}

fn compile(name: &'static str, json: &str) -> Result<BpfProgram, SeccompError> {
    let arch = seccompiler::TargetArch::x86_64;
    let mut map = seccompiler::compile_from_json(json.as_bytes(), arch)
        .map_err(|e| SeccompError::Compile(name, e))?;
    map.remove(name).ok_or(SeccompError::Missing(name))
}

/// Compiles both filters.
pub fn compile_filters() -> Result<Filters, SeccompError> {
    Ok(Filters {
        vmm: compile("vmm", VMM_FILTER_JSON)?,
        vcpu: compile("vcpu", VCPU_FILTER_JSON)?,
    })
}

/// Which of minivmm's threads a filter goes on (for the SIGSYS report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The thread that runs the event loop, under `seccomp/vmm.json`.
    Vmm,
    /// The thread of this vCPU, under `seccomp/vcpu.json`.
    Vcpu(u32),
}

thread_local! {
    /// The calling thread's kind, once its filter is on (read by the SIGSYS handler).
    static THREAD_KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Installs `filter` on the calling thread, a thread of `kind` (threads it creates later
/// inherit the filter).
pub fn apply(filter: &BpfProgram, kind: ThreadKind) -> Result<(), SeccompError> {
    seccompiler::apply_filter(filter).map_err(SeccompError::Apply)?;
    THREAD_KIND.with(|k| k.set(Some(kind)));
    Ok(())
}

/// Writes `n` in decimal into the end of `buf`; returns where the digits start.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> usize {
    let mut pos = buf.len();
    loop {
        pos -= 1;
        buf[pos] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || pos == 0 {
            return pos;
        }
    }
}

/// Terminal to restore (stdin fd) from the SIGSYS handler, or -1.
static RESTORE_TTY_FD: AtomicI32 = AtomicI32::new(-1);
/// Saved terminal attributes for [`RESTORE_TTY_FD`].
static mut SAVED_TERMIOS: Option<libc::termios> = None;

/// Remembers terminal attributes the SIGSYS handler restores before the process dies.
///
/// Must be called before any filter is installed (i.e. while single-threaded).
pub fn set_terminal_to_restore(fd: i32, termios: libc::termios) {
    // SAFETY: called during start-up before other threads exist and before the SIGSYS handler
    // can run; the handler only reads the value after RESTORE_TTY_FD is published below.
    unsafe { SAVED_TERMIOS = Some(termios) };
    RESTORE_TTY_FD.store(fd, Ordering::SeqCst);
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Offset of `si_syscall` in the SIGSYS layout of x86_64 siginfo_t: 16 bytes of header, then
    // the 8-byte `_call_addr`.
    const SI_SYSCALL_OFFSET: usize = 24;
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t for SIGSYS; the read is within its 128 bytes.
        unsafe {
            std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32)
        }
    };
    let fd = RESTORE_TTY_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // The terminal is restored with the one ioctl both filters allow (TCSETS): glibc's
        // tcsetattr reads the attributes back first (TCGETS), which the vCPU filter forbids.
        // SAFETY: SAVED_TERMIOS was written before `fd` was published and is never written
        // again. TCSETS reads the kernel's `struct termios`, a prefix of glibc's (the four flag
        // words, c_line and the first 19 control characters; the speeds are in c_cflag, as
        // tcgetattr filled it). ioctl is async-signal-safe.
        unsafe {
            if let Some(t) = (*std::ptr::addr_of!(SAVED_TERMIOS)).as_ref() {
                libc::ioctl(fd, libc::TCSETS, t as *const libc::termios);
            }
        }
    }
    let name = u32::try_from(nr)
        .ok()
        .and_then(|n| syscalls::Sysno::new(n as usize))
        .map_or("unknown", |s| s.name());
    // A const-initialised thread-local without a destructor: reading it allocates nothing.
    let kind = THREAD_KIND.with(|k| k.get());
    let mut nr_digits = [0u8; 20];
    let nr_at = decimal(u64::from(nr.unsigned_abs()), &mut nr_digits);
    let mut id_digits = [0u8; 20];
    let (thread, id, filter): (&[u8], &[u8], &[u8]) = match kind {
        Some(ThreadKind::Vcpu(id)) => {
            let at = decimal(u64::from(id), &mut id_digits);
            (b"vcpu", &id_digits[at..], b"seccomp/vcpu.json")
        }
        Some(ThreadKind::Vmm) => (b"vmm (event loop)", b"", b"seccomp/vmm.json"),
        None => (b"unknown", b"", b"seccomp/*.json"),
    };
    let parts: [&[u8]; 10] = [
        b"\r\nminivmm: seccomp: forbidden system call ",
        name.as_bytes(),
        b" (nr ",
        &nr_digits[nr_at..],
        b") on thread ",
        thread,
        id,
        b"; exiting (see ",
        filter,
        b")\n",
    ];
    // SAFETY: write(2) and _exit(2) are async-signal-safe; each part is a valid buffer.
    unsafe {
        for part in parts {
            libc::write(2, part.as_ptr() as *const libc::c_void, part.len());
        }
        libc::_exit(SECCOMP_EXIT_CODE);
    }
}

/// Exit code after a seccomp violation.
pub const SECCOMP_EXIT_CODE: i32 = 159;

/// Fixes glibc's number of malloc arenas before any filter goes on. glibc otherwise computes
/// its arena limit lazily, the first time a ninth thread allocates, by opening
/// `/sys/devices/system/cpu/online`; under the filters that `openat` is forbidden and kills
/// minivmm (a VM hot-adding its eighth vCPU did). With a fixed limit glibc never looks. A
/// process-wide setting: an embedder's other threads share these arenas.
pub fn fix_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; it is thread-safe.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}

/// glibc malloc arenas with the filters on: its own default limit for a 1-core machine.
#[cfg(target_env = "gnu")]
const MALLOC_ARENAS: libc::c_int = 8;

/// Installs the SIGSYS handler that reports a filter violation.
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid starting point; we fill handler, flags and an empty
    // mask, and sigaction only reads the struct.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = sigsys_handler as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::SigsysHandler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The seccomp tests' probe, in debug builds only: when `MINIVMM_TEST_FORBIDDEN_SYSCALL` names
/// the calling thread's kind (`main` for the event-loop thread, `vcpu` for a vCPU thread), the
/// thread makes a system call no filter allows (`getppid`), so the tests can check that each
/// thread kind is confined and killed with [`SECCOMP_EXIT_CODE`] and the message. Release builds
/// have no probe.
pub fn probe_forbidden_syscall(kind: &str) {
    if cfg!(debug_assertions)
        && std::env::var_os("MINIVMM_TEST_FORBIDDEN_SYSCALL").is_some_and(|v| v == kind)
    {
        // SAFETY: getppid takes no arguments and changes nothing; under the filter it never
        // returns (SIGSYS), without one it returns the parent's pid.
        unsafe {
            libc::syscall(libc::SYS_getppid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child process of [`the_vmm_filter_refuses_a_kvm_ioctl_it_does_not_list`].
    const PROBE_ENV: &str = "MINIVMM_SECCOMP_PROBE";

    /// In the child: installs the main thread's filter, makes a listed KVM ioctl and then one
    /// the filter does not list. Only the first may return.
    fn probe_child() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let kvm = std::fs::File::open("/dev/kvm").expect("/dev/kvm is needed for this test");
        let filters = compile_filters().expect("filters compile");
        apply(&filters.vmm, ThreadKind::Vmm).expect("install the filter");
        // KVM_CHECK_EXTENSION(KVM_CAP_IRQCHIP): listed.
        // SAFETY: an ioctl with an integer argument on our own /dev/kvm fd.
        let r = unsafe { libc::ioctl(kvm.as_raw_fd(), 0xae03, 0) };
        println!("probe: listed ioctl returned {r}");
        let _ = std::io::stdout().flush();
        // KVM_GET_MSR_FEATURE_INDEX_LIST: not listed (minivmm never needs it).
        let mut list = [0u32; 64];
        // SAFETY: `list` is a writable buffer larger than the header the ioctl reads and writes.
        let r = unsafe { libc::ioctl(kvm.as_raw_fd(), 0xc004ae0a, list.as_mut_ptr()) };
        println!("probe: unlisted ioctl was NOT refused ({r})");
        let _ = std::io::stdout().flush();
        std::process::exit(0);
    }

    #[test]
    fn the_vmm_filter_refuses_a_kvm_ioctl_it_does_not_list() {
        use std::os::unix::process::ExitStatusExt;
        if std::env::var_os(PROBE_ENV).is_some() {
            probe_child();
        }
        // The filter goes on a child process (it cannot be taken off again), this test binary
        // re-run for this test alone (named as libtest names it: its path without the crate).
        let module = module_path!().split_once("::").map_or("", |(_, m)| m);
        let name = format!("{module}::the_vmm_filter_refuses_a_kvm_ioctl_it_does_not_list");
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                &name,
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PROBE_ENV, "1")
            .output()
            .expect("run the probe");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("probe: listed ioctl returned 1"),
            "the listed ioctl did not run: {stdout}"
        );
        assert!(!stdout.contains("NOT refused"), "{stdout}");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "the probe must die by SIGSYS: {:?}\n{stdout}",
            out.status
        );
    }

    #[test]
    fn filters_compile() {
        let f = compile_filters().expect("filters compile");
        assert!(!f.vmm.is_empty());
        assert!(!f.vcpu.is_empty());
    }

    #[test]
    fn vcpu_filter_is_stricter_than_vmm_filter() {
        // A vCPU thread spawned after the main thread installed its filter runs under both, so
        // every syscall the vCPU filter allows must also be allowed by the VMM filter.
        let names = |json: &str| -> Vec<String> {
            json.split("\"syscall\"")
                .skip(1)
                .filter_map(|s| s.split('"').nth(1).map(str::to_string))
                .collect()
        };
        let vmm = names(VMM_FILTER_JSON);
        for s in names(VCPU_FILTER_JSON) {
            assert!(
                vmm.contains(&s),
                "{s} is allowed for vCPUs but not for the VMM thread"
            );
        }
        // The same for the ioctl numbers, which both filters list one by one.
        let ioctls = |json: &str| -> Vec<String> {
            json.split("\"syscall\": \"ioctl\"")
                .skip(1)
                .filter_map(|s| {
                    let v = s.split("\"val\":").nth(1)?;
                    Some(v.trim_start().split(',').next()?.trim().to_string())
                })
                .collect()
        };
        let vmm = ioctls(VMM_FILTER_JSON);
        let vcpu = ioctls(VCPU_FILTER_JSON);
        assert!(
            vcpu.len() >= 4 && vmm.len() > vcpu.len(),
            "{vcpu:?} {vmm:?}"
        );
        for v in vcpu {
            assert!(
                vmm.contains(&v),
                "ioctl {v} is allowed for vCPUs but not for the VMM thread"
            );
        }
    }
}

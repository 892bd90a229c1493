//! Tiny freestanding PVH guests, run directly on the host's /dev/kvm (they work even on PVM,
//! where a stock Linux cannot boot). They cover the ELF/PVH loader, port I/O exits, the serial
//! console in both directions, the ACPI power-off and reset registers, fault reporting, exit
//! codes and the seccomp filters, in well under a second each.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LOAD_ADDR: u32 = 0x10_0000;

/// Builds a 64-bit ELF with one PT_LOAD of `code` at 1 MiB and a Xen PVH entry note.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let ehdr_size = 64u64;
    let phdr_size = 56u64;
    let note_off = ehdr_size + 2 * phdr_size;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz ("Xen\0")
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&LOAD_ADDR.to_le_bytes());
    let code_off = (note_off + note.len() as u64 + 15) & !15;

    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&u64::from(LOAD_ADDR).to_le_bytes()); // e_entry
    f.extend_from_slice(&ehdr_size.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // flags
    f.extend_from_slice(&(ehdr_size as u16).to_le_bytes());
    f.extend_from_slice(&(phdr_size as u16).to_le_bytes());
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    let phdr = |f: &mut Vec<u8>, kind: u32, flags: u32, off: u64, addr: u64, size: u64| {
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&flags.to_le_bytes());
        f.extend_from_slice(&off.to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes());
        f.extend_from_slice(&size.to_le_bytes());
        f.extend_from_slice(&size.to_le_bytes());
        f.extend_from_slice(&16u64.to_le_bytes());
    };
    phdr(
        &mut f,
        1,
        7,
        code_off,
        u64::from(LOAD_ADDR),
        code.len() as u64,
    ); // PT_LOAD
    phdr(&mut f, 4, 4, note_off, 0, note.len() as u64); // PT_NOTE
    f.extend_from_slice(&note);
    f.resize(code_off as usize, 0);
    f.extend_from_slice(code);
    f
}

/// 32-bit code: print the NUL-terminated string that follows the code on COM1, then run `tail`.
fn print_then(msg: &str, tail: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    let msg_at_patch = c.len() + 1;
    c.extend_from_slice(&[0xbe, 0, 0, 0, 0]); // mov esi, msg
    c.extend_from_slice(&[0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]); // lodsb; test; jz; out; jmp
    c.extend_from_slice(tail);
    let msg_addr = LOAD_ADDR + c.len() as u32;
    c[msg_at_patch..msg_at_patch + 4].copy_from_slice(&msg_addr.to_le_bytes());
    c.extend_from_slice(msg.as_bytes());
    c.push(0);
    c
}

/// Writes 0x34 (SLP_TYP 5 | SLP_EN) to the ACPI sleep control port: S5.
const POWER_OFF: &[u8] = &[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd];
/// Writes 1 to the ACPI reset port.
const RESET: &[u8] = &[0x66, 0xba, 0x02, 0x06, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd];
/// `ud2` with no IDT: the exception cannot be delivered and the vCPU triple-faults.
const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];

/// Echo loop: copy COM1 input to COM1 output until a '!' arrives, then power off.
fn echo_until_bang() -> Vec<u8> {
    let mut c = vec![
        0x66, 0xba, 0xfd, 0x03, // wait: mov dx, 0x3fd (LSR)
        0xec, // in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0xf8, // jz wait (-8)
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx
        0xee, // out dx, al
        0x3c, b'!', // cmp al, '!'
        0x75, 0xed, // jne wait (-19)
    ];
    c.extend_from_slice(POWER_OFF);
    c
}

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

#[test]
fn reset_with_no_reboot_exits_2() {
    let r = run_guest("reset", &print_then("bye\n", RESET), &["--no-reboot"], b"");
    assert_eq!(r.code, 2, "stderr: {}", r.stderr);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "bye\n");
}

#[test]
fn triple_fault_exits_3_and_names_the_exit_and_rip() {
    let r = run_guest("fault", &print_then("x", TRIPLE_FAULT), &[], b"");
    assert_eq!(r.code, 3, "stderr: {}", r.stderr);
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

#[test]
fn control_socket_answers_while_the_guest_runs() {
    use std::os::unix::net::UnixStream;
    require_kvm();
    let sock = temp_path("ctl.sock");
    let kernel = temp_path("ctl.elf");
    // The guest waits for a '!' on the console, so it runs until the test tells it to stop.
    std::fs::write(&kernel, pvh_elf(&echo_until_bang())).expect("write guest");
    let mut child = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args([
            "--cpus",
            "boot=1,max=2",
            "--memory",
            "size=64M,hotplug_size=128M",
            "--control",
        ])
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn minivmm");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("cannot connect to the control socket: {e}"),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut ask = |line: &str| -> String {
        stream.write_all(line.as_bytes()).expect("send");
        let mut reply = Vec::new();
        let mut b = [0u8; 1];
        while stream.read(&mut b).expect("reply") == 1 && b[0] != b'\n' {
            reply.push(b[0]);
        }
        String::from_utf8(reply).expect("utf8 reply")
    };
    assert_eq!(ask("ping\n"), "ok pong");
    let info = ask("info\n");
    assert!(info.starts_with("ok state=running cpus=1 "), "{info}");
    assert!(
        info.contains(" mem=64M ") && info.contains(" max_mem=192M"),
        "{info}"
    );
    assert!(ask("resize cpus=3\n").starts_with("error "));
    assert!(ask("resize mem=100M\n").starts_with("error "));
    let grown = ask("resize mem=192M\n");
    assert!(grown.contains(" mem=192M "), "{grown}");
    assert_eq!(ask("shutdown\n"), "ok shutting down");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}

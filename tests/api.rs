//! The embedding API (`minivmm::api`) with tiny freestanding guests on the host's /dev/kvm:
//! start, resize, info, events, power button, reboot, shutdown and wait, from other threads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use minivmm::api::{HandleError, VmBuilder};
use minivmm::events::Event;
use minivmm::Exit;
use minivmm::{RequestError, ResizeError};

mod tiny;

fn guest(name: &str, code: &[u8]) -> PathBuf {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the API tests need KVM"
    );
    let path = std::env::temp_dir().join(format!("minivmm-api-{}-{name}.elf", std::process::id()));
    std::fs::write(&path, tiny::pvh_elf(code)).expect("write guest");
    path
}

/// Collects everything the guest prints.
#[derive(Clone, Default)]
struct Console(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An event channel that hides the first boot's own events (`boot n=1`, `cpu-online cpu=0`):
/// they race with the subscription and with the test's requests, since the guest boots at once.
struct Events {
    rx: std::sync::mpsc::Receiver<Event>,
    rebooted: bool,
}

impl Events {
    fn next(&mut self) -> Event {
        loop {
            let e = self
                .rx
                .recv_timeout(Duration::from_secs(10))
                .expect("an event within 10 s");
            let first_boot = matches!(e, Event::Boot { n: 1, .. } | Event::CpuOnline(0));
            if matches!(e, Event::Reboot { .. }) {
                self.rebooted = true;
            }
            if self.rebooted || !first_boot {
                return e;
            }
        }
    }
}

#[test]
fn a_vm_driven_through_the_api_from_another_thread() {
    // The guest prints, writes IA32_LSTAR (so it is online), then halts forever.
    let lstar = &tiny::LSTAR_ROUND_TRIP[..21]; // up to and including rdmsr
    let code = tiny::print_then("hi\n", &[lstar, tiny::HALT_FOREVER].concat());
    let console = Console::default();
    let vm = VmBuilder::new(guest("drive", &code))
        .cpus(1, 2)
        .memory(64 << 20, 256 << 20)
        .cpu_online_events(true)
        .serial_output(Box::new(console.clone()))
        .start()
        .expect("start");
    let vm = Arc::new(vm);
    // Let the first boot greet before anything else happens (the guest may not have run yet).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while console.0.lock().unwrap().as_slice() != b"hi\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "no greeting from the first boot"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut events = Events {
        rx: vm.events(),
        rebooted: false,
    };
    let remote = vm.clone();
    let info = std::thread::spawn(move || remote.resize(Some(2), Some(192 << 20)))
        .join()
        .expect("thread")
        .expect("resize");
    assert_eq!((info.cpus, info.mem), (2, 192 << 20));
    assert_eq!(
        events.next(),
        Event::MemAdded {
            slot: 0,
            start: 1 << 32,
            size: 128 << 20
        }
    );
    assert_eq!(events.next(), Event::CpuAdded(1));
    let info = vm.info().expect("info");
    assert_eq!((info.cpus, info.max_cpus, info.max_mem), (2, 2, 320 << 20));
    match vm.resize(Some(3), None) {
        Err(HandleError::Refused(e)) => {
            // A typed refusal whose message is the control pipe's.
            assert!(
                matches!(
                    e,
                    RequestError::Resize(ResizeError::CpusAboveMax { cpus: 3, max: 2 })
                ),
                "{e:?}"
            );
            assert_eq!(
                e.to_string(),
                "cpus=3 exceeds max_cpus=2 (set at start with --cpus max=)"
            );
        }
        other => panic!("resize above max: {other:?}"),
    }
    vm.power_button().expect("power button");
    assert_eq!(events.next(), Event::PowerButton);
    vm.reboot().expect("reboot");
    assert_eq!(events.next(), Event::Reboot { cause: "control" });
    assert_eq!(
        events.next(),
        Event::Boot {
            n: 2,
            cpus: 2,
            mem: 192 << 20
        }
    );
    assert_eq!(events.next(), Event::CpuOnline(0));
    vm.shutdown().expect("shutdown");
    assert_eq!(
        events.next(),
        Event::Exit {
            code: 0,
            reason: "poweroff"
        }
    );
    // Any holder of the shared handle waits; every wait tells the same outcome.
    let waiter = {
        let vm = vm.clone();
        std::thread::spawn(move || vm.wait().expect("outcome"))
    };
    assert_eq!(waiter.join().expect("waiter"), Exit::PowerOff);
    assert_eq!(vm.wait().expect("outcome again"), Exit::PowerOff);
    assert_eq!(
        String::from_utf8_lossy(&console.0.lock().unwrap()),
        "hi\nhi\n",
        "one greeting per boot"
    );
    // The channel closes after the exit event.
    assert!(events.rx.recv_timeout(Duration::from_secs(5)).is_err());
}

#[test]
fn the_guest_outcome_reaches_wait() {
    let code = tiny::out_byte_then_halt(0x501, 0x11);
    let vm = VmBuilder::new(guest("exit", &code))
        .exit_device(Some(Default::default()))
        .start()
        .expect("start");
    let exit = vm.wait().expect("outcome");
    assert_eq!(exit, Exit::GuestExit(0x11));
    assert_eq!(exit.code(), 35);
    let vm = VmBuilder::new(guest("timeout", tiny::HALT_FOREVER))
        .timeout(Some(Duration::from_millis(200)))
        .start()
        .expect("start");
    let vm_events = vm.events();
    assert_eq!(
        vm.wait().expect("outcome"),
        Exit::Timeout(Duration::from_millis(200))
    );
    let last = vm_events.iter().last();
    assert_eq!(
        last,
        Some(Event::Exit {
            code: 124,
            reason: "timeout"
        })
    );
}

#[test]
fn bad_settings_and_files_are_errors_from_start() {
    let err = VmBuilder::new(guest("bad", tiny::HALT_FOREVER))
        .cpus(3, 2)
        .start()
        .err()
        .expect("refused");
    assert_eq!(err.to_string(), "--cpus: max=2 is less than boot=3");
    let err = VmBuilder::new(guest("bad2", tiny::HALT_FOREVER))
        .memory(100 << 20, 100 << 20)
        .start()
        .err()
        .expect("refused");
    assert_eq!(
        err.to_string(),
        "--memory: hotplug_size=100M is not a multiple of 128M"
    );
    let err = VmBuilder::new("/nonexistent/vmlinux")
        .start()
        .err()
        .expect("refused");
    assert!(
        err.to_string()
            .starts_with("cannot open kernel /nonexistent/vmlinux"),
        "{err}"
    );
}

#[test]
fn dropping_the_handle_stops_the_vm() {
    let vm = VmBuilder::new(guest("drop", tiny::HALT_FOREVER))
        .start()
        .expect("start");
    let events = vm.events();
    drop(vm);
    assert_eq!(
        events.iter().last(),
        Some(Event::Exit {
            code: 0,
            reason: "poweroff"
        })
    );
}

/// Console output to std sockets, which write with `send(MSG_NOSIGNAL)`, on the vCPU thread
/// under its seccomp filter (on by default): a `UnixStream` and a `TcpStream` each get the
/// guest's output whole, and the guest powers off (a forbidden call would kill this test
/// process with 159).
#[test]
fn console_output_to_a_socket_under_the_vcpu_filter() {
    use std::io::Read;
    let code = tiny::print_then("over a socket\n", tiny::POWER_OFF);
    let (unix_ours, unix_vm) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let tcp_vm = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("tcp");
    let (tcp_ours, _) = listener.accept().expect("accept");
    let outs: [(Box<dyn std::io::Write + Send>, Box<dyn Read>); 2] = [
        (Box::new(unix_vm), Box::new(unix_ours)),
        (Box::new(tcp_vm), Box::new(tcp_ours)),
    ];
    for (i, (vm_side, mut ours)) in outs.into_iter().enumerate() {
        let vm = VmBuilder::new(guest(&format!("socket-console-{i}"), &code))
            .serial_output(vm_side)
            .start()
            .expect("start");
        assert_eq!(vm.wait().expect("outcome"), Exit::PowerOff);
        let mut got = Vec::new();
        ours.read_to_end(&mut got).expect("read the console");
        assert_eq!(got, b"over a socket\n", "writer {i}");
    }
}

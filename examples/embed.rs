//! Embedding minivmm: boot a guest from a Rust program, hot-add a vCPU and 128 MiB of memory
//! through the API once the guest writes its boot marker (debug port 0x80), print the events,
//! and wait for the guest to power off.
//!
//! Takes minivmm's own command line (e.g. `--kernel vmlinux --initramfs initrd.gz --cpus
//! boot=1,max=2 --memory size=512M,hotplug_size=1G`); the guest console is this program's
//! stdin/stdout, so a person (or a test) can drive the guest and type `poweroff`.
//!
//! `cargo run --release --example embed -- --kernel ... --initramfs ...`

use std::process::ExitCode;
use std::time::Duration;

use minivmm::api::VmBuilder;
use minivmm::config::{parse_args, Command};
use minivmm::events::Event;

fn main() -> ExitCode {
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(config)) => *config,
        Ok(_) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embed: {e}");
            return ExitCode::from(1);
        }
    };
    minivmm::logger::init(config.log_level);
    let boot_mem = config.memory.size;
    let vm = match VmBuilder::from_config(config).start() {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("embed: {e}");
            return ExitCode::from(1);
        }
    };
    let events = vm.events();

    // Wait until the guest marks itself ready on the debug port (or two minutes), then grow it.
    let mut ready = false;
    while let Ok(event) = events.recv_timeout(Duration::from_secs(120)) {
        eprintln!("embed: {event}");
        if matches!(event, Event::BootMarker { .. }) {
            ready = true;
            break;
        }
    }
    eprintln!("embed: guest ready: {ready}");
    match vm.resize(Some(2), Some(boot_mem + (128 << 20))) {
        Ok(info) => eprintln!("embed: resized to {} vCPUs, {} bytes", info.cpus, info.mem),
        Err(e) => eprintln!("embed: resize refused: {e}"),
    }

    // Print events on another thread while this one waits for the outcome.
    let printer = std::thread::spawn(move || {
        for event in events {
            eprintln!("embed: {event}");
        }
    });
    let code = match vm.wait() {
        Ok(exit) => {
            eprintln!("embed: guest stopped: {exit:?}, exit code {}", exit.code());
            exit.code()
        }
        Err(e) => {
            eprintln!("embed: {e}");
            1
        }
    };
    let _ = printer.join();
    ExitCode::from(code as u8)
}

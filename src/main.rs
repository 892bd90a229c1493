//! The minivmm command: parses the command line and runs the VMM.

use minivmm::config::{parse_args, Command, USAGE};
use minivmm::Exit;

fn main() {
    let code = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            print!("{USAGE}");
            0
        }
        Ok(Command::Version) => {
            println!("minivmm {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Command::Run(config)) => {
            minivmm::logger::init(config.log_level);
            let result = minivmm::run(*config);
            match &result {
                Ok(Exit::PowerOff) => log::info!("guest powered off"),
                Ok(Exit::Reset(cause)) => log::log!(
                    cause.log_level(),
                    "guest reset through {cause}; exiting because of --no-reboot"
                ),
                Ok(Exit::Signal(sig)) => log::info!("stopped by signal {sig}"),
                Ok(exit @ Exit::GuestExit(value)) => log::info!(
                    "guest wrote {value:#x} to the exit device: exit code {}",
                    exit.code()
                ),
                Ok(Exit::Panic) => eprintln!(
                    "\rminivmm: guest panic (reported through pvpanic): exit code {}\r",
                    minivmm::EXIT_PANIC
                ),
                Ok(Exit::Timeout(after)) => eprintln!(
                    "\rminivmm: --timeout expired after {after:?}: guest stopped, exit code {}\r",
                    minivmm::EXIT_TIMEOUT
                ),
                Ok(Exit::Fatal(msg)) => eprintln!("\rminivmm: guest fault: {msg}\r"),
                Err(e) => eprintln!("\rminivmm: {e}\r"),
            }
            minivmm::exit_code(&result)
        }
        Err(e) => {
            eprintln!("minivmm: {e}");
            1
        }
    };
    std::process::exit(code);
}

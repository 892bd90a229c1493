//! minivmm: a minimal, synchronous KVM virtual machine monitor for x86_64 Linux guests, with
//! ACPI CPU and memory hotplug driven through a line-based control pipe.
//!
//! [`run`] is the whole VMM: it opens KVM and the guest files, installs the seccomp filters,
//! boots the guest and serves the event loop until the guest powers off.
//!
//! The modules, top-down (each uses only the ones below it, except the embedding API, which
//! starts the launch):
//! - [`config`]: the configuration, from the command line or built in code;
//! - [`control`]: the front ends: the control-pipe protocol and socket, the events they
//!   report, and the embedding [`api`];
//! - `vmm`: the running machine: its launch and event loop, the boot builder, the managers of
//!   CPUs, memory and virtio devices, the resize transaction, `_OST` reports, exit outcomes;
//! - `kvm`: the KVM objects: the VM, its vCPUs and their threads, guest RAM;
//! - `devices`, `acpi`, `arch`: what the guest sees: device models, ACPI tables, the x86_64
//!   boot protocol, CPUID, MSRs and the guest address layout;
//! - `host`: facilities of the host process: seccomp, the terminal, the logger.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod control;

/// Declares the crate-internal layers. With the `fuzzing` feature they are public (and hidden
/// from the documentation), so the fuzz targets in `fuzz/`, a crate of their own, drive the
/// real code; that is not a stable API.
macro_rules! internal_layers {
    ($($layer:ident),* $(,)?) => {
        $(
            #[cfg(feature = "fuzzing")]
            #[doc(hidden)]
            pub mod $layer;
            #[cfg(not(feature = "fuzzing"))]
            mod $layer;
        )*
    };
}

internal_layers!(acpi, arch, devices, host, kvm, vmm);

pub use config::size;
pub use control::{api, events};
pub use devices::ResetCause;
pub use host::logger;
pub use vmm::exit;
pub use vmm::exit::{
    Exit, EXIT_ERROR, EXIT_GUEST_FAULT, EXIT_OK, EXIT_PANIC, EXIT_REBOOT, EXIT_SECCOMP,
    EXIT_TIMEOUT,
};
pub use vmm::launch::{exit_code, run, Error};
pub use vmm::resize::{BackendError, ResizeError};
pub use vmm::RequestError;

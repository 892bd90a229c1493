//! minivmm: a minimal, synchronous KVM virtual machine monitor for x86_64 Linux guests,
//! with ACPI CPU and memory hotplug driven through a line-based control pipe.

pub mod acpi;
pub mod arch;
pub mod config;
pub mod control;
pub mod devices;

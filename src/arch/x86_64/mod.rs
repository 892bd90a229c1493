//! x86_64 guest setup: memory layout, boot protocols, registers, CPUID and MSRs.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod memory;
pub mod msr;
pub mod regs;
pub mod reset_vector;

//! x86_64 guest setup: memory layout, boot protocols, registers, CPUID and MSRs.

pub mod layout;

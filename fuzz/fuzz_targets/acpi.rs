//! Fuzz target `acpi`: the harness and its invariants are in `src/acpi.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| minivmm_fuzz::acpi::run(data));

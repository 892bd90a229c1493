//! Fuzz target `acpi`: the harness and its invariants are in `minivmm::fuzzing::acpi`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| minivmm::fuzzing::acpi::run(data));

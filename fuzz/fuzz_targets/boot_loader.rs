//! Fuzz target `boot_loader`: the harness and its invariants are in `minivmm::fuzzing::boot_loader`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| minivmm::fuzzing::boot_loader::run(data));

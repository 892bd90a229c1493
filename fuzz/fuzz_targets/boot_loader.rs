//! Fuzz target `boot_loader`: the harness and its invariants are in `src/boot_loader.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| minivmm_fuzz::boot_loader::run(data));

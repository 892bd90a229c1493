//! Fuzz target `devices`: the harness and its invariants are in `src/devices.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| minivmm_fuzz::devices::run(data));

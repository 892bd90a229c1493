//! Fuzz target `control_line`: the harness and its invariants are in `src/control_line.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| minivmm_fuzz::control_line::run(data));

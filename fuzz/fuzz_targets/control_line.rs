//! Fuzz target `control_line`: the harness and its invariants are in `minivmm::fuzzing::control_line`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| minivmm::fuzzing::control_line::run(data));

//! Fuzz target `devices`: the harness and its invariants are in `minivmm::fuzzing::devices`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| minivmm::fuzzing::devices::run(data));

//! Fuzz target `virtio`: the harness and its invariants are in `minivmm::fuzzing::virtio`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| minivmm::fuzzing::virtio::run(data));

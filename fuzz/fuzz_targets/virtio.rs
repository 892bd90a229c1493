//! Fuzz target `virtio`: the harness and its invariants are in `src/virtio.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| minivmm_fuzz::virtio::run(data));

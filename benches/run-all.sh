#!/bin/bash
# The whole benchmark suite (BENCHMARKS.md): minivmm against QEMU in the same run.
#   1. tiny PVH payload on the host's /dev/kvm against QEMU microvm (benches/peers.rs);
#   2. Debian guest hotplug latency and scale against QEMU q35, in the test host where /dev/kvm
#      cannot boot Linux (benches/latency.rs; ignored by the normal test run).
# Needs what .ci/run installs (qemu-system-x86 among it) and the guest images
# (tests/guest/build-images.sh). Environment: PEERS_RUNS, MINIVMM_BENCH_ROUNDS,
# MINIVMM_BENCH_MAX_CPUS, MINIVMM_BENCH_BASELINE_BIN (see the two files). Output is also kept in
# target/bench-logs/.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
mkdir -p target/bench-logs
stamp=$(date -u +%Y%m%dT%H%M%SZ)
tests/guest/build-images.sh
cargo bench --bench peers 2>&1 | tee "target/bench-logs/peers-$stamp.txt"
cargo test --release --test latency -- --ignored --nocapture 2>&1 | tee "target/bench-logs/latency-$stamp.txt"

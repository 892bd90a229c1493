#!/bin/bash
# THE minivmm test command: formatting, lints, guest images, then every test (unit tests and the real-Linux
# boot tests, which run on hardware KVM directly or inside the emulated test host; see tests/common/mod.rs),
# then each fuzz target for FUZZ_SECONDS (default 15).
# Runs every step even after a failure, prints a timing summary, and exits non-zero if any step failed.
#
# Usage: tests/run-all.sh [extra cargo test arguments, e.g. -- --test-threads=1]
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")/.." || exit 1

declare -a SUMMARY=()
# Every failed run in the emulated test host (tests/common/mod.rs appends here), shown at the end.
RETRIES=target/test-logs/retries.log
mkdir -p target/test-logs && : >"$RETRIES"
FAILED=0
T0=$SECONDS

step() {
	local name="$1"
	shift
	echo
	echo "=== run-all: $name: $*"
	local t=$SECONDS rc=0
	"$@" || rc=$?
	local took=$((SECONDS - t))
	if [[ $rc == 0 ]]; then
		SUMMARY+=("$(printf '  %-8s ok      %4ds' "$name" "$took")")
	else
		SUMMARY+=("$(printf '  %-8s FAILED  %4ds  (exit %d)' "$name" "$took" "$rc")")
		FAILED=1
	fi
	echo "=== run-all: $name: $([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)") in ${took}s"
}

step fmt sh -c "cargo fmt --check && cargo fmt --check --manifest-path fuzz/Cargo.toml"
step clippy cargo clippy --all-targets -- -D warnings
step clippy-fuzzing cargo clippy --lib --features fuzzing -- -D warnings
# The fuzz harnesses are a crate of their own (fuzz/), outside the main workspace.
step clippy-fuzz cargo clippy --manifest-path fuzz/Cargo.toml --lib -- -D warnings
step doc env RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
step images tests/guest/build-images.sh
step test cargo test --no-fail-fast "$@"
# Each fuzz target for a short bounded time after replaying its saved crashes (fuzz/README.md).
step fuzz fuzz/run.sh "${FUZZ_SECONDS:-15}"

echo
echo "=== run-all summary (total $((SECONDS - T0))s; logs in target/test-logs/)"
printf '%s\n' "${SUMMARY[@]}"
if [[ -s $RETRIES ]]; then
	echo "=== run-all: $(wc -l <"$RETRIES") failed run(s) in the emulated test host (each retried; see the logs):"
	sed 's/^/  RETRY /' "$RETRIES"
fi
if [[ $FAILED != 0 ]]; then
	echo "=== run-all: FAILED"
	exit 1
fi
echo "=== run-all: all passed"

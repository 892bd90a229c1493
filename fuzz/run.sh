#!/usr/bin/env bash
# Builds the libFuzzer targets on stable Rust and runs each for a fixed time.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     default: 20 s, every target
#
# Each target first replays its saved crashes (fuzz/regressions/<target>/), then fuzzes a copy
# of its committed seeds (fuzz/corpus/<target>/ -> fuzz/target/corpus/<target>/, so the
# committed corpus does not grow). Prints the executions per target; exits non-zero on any
# crash, naming the input that crashed (written under fuzz/artifacts/<target>/).
#
# Needs only rustup stable and a C++ compiler (libfuzzer-sys builds libFuzzer with g++).
# Environment: FUZZ_ARGS adds libFuzzer options (e.g. FUZZ_ARGS=-jobs=2).
set -euo pipefail

cd "$(dirname "$0")"
secs=${1:-20}
[ $# -gt 0 ] && shift
all=(control_line devices acpi boot_loader virtio)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
case $secs in
'' | *[!0-9]*) echo "run.sh: SECONDS_PER_TARGET must be a number, not '$secs'" >&2; exit 2 ;;
esac
for t in "${targets[@]}"; do
    [ -f "fuzz_targets/$t.rs" ] || { echo "run.sh: unknown target '$t' (have: ${all[*]})" >&2; exit 2; }
done

# SanitizerCoverage instrumentation as cargo-fuzz adds it, on stable rustc (no sanitizer).
# An explicit --target keeps these flags off build scripts and proc macros.
host=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing ${RUSTFLAGS:-}"
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
echo "== building ${targets[*]} (release, sancov, $host)"
cargo build --release --target "$host" "${bins[@]}"

declare -A max_len=([control_line]=12288 [devices]=4096 [acpi]=64 [boot_loader]=8192 [virtio]=4096)
failed=()
summary=()
for t in "${targets[@]}"; do
    bin="target/$host/release/$t"
    log="target/logs/$t.log"
    work="target/corpus/$t"
    mkdir -p target/logs "artifacts/$t"
    rm -rf "$work"
    mkdir -p "$work"
    if [ -d "corpus/$t" ]; then cp -r "corpus/$t/." "$work/"; fi

    if compgen -G "regressions/$t/*" >/dev/null; then
        echo "== $t: replaying regressions/$t/"
        if ! "$bin" -runs=1 -artifact_prefix=target/logs/ "regressions/$t"/* >"target/logs/$t.regressions.log" 2>&1; then
            tail -n 40 "target/logs/$t.regressions.log" >&2
            echo "FAIL $t: a saved crash in regressions/$t/ still crashes (log: fuzz/target/logs/$t.regressions.log)" >&2
            failed+=("$t")
            summary+=("$t: regression replay failed")
            continue
        fi
    fi

    echo "== $t: fuzzing for ${secs}s"
    rc=0
    # shellcheck disable=SC2086
    "$bin" -max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
        -max_len="${max_len[$t]}" -artifact_prefix="artifacts/$t/" ${FUZZ_ARGS:-} "$work" \
        >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    echo "$t: stat::number_of_executed_units: ${execs:-?} in ${secs}s ($(ls "$work" | wc -l) corpus files)"
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "$log" >&2
        crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        echo "FAIL $t: libFuzzer exited $rc; crash input: fuzz/${crash:-artifacts/$t/ (none written)} (log: fuzz/$log)" >&2
        echo "      reproduce: fuzz/target/$host/release/$t fuzz/${crash:-<input>}" >&2
        failed+=("$t")
        summary+=("$t: CRASH, input fuzz/${crash:-?}")
    else
        summary+=("$t: ok, ${execs:-?} executions")
    fi
done

echo "== summary (${secs}s per target)"
printf '   %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
    exit 1
fi

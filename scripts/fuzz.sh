#!/usr/bin/env bash
# Coverage-guided fuzzing of Muster's network-facing parsers with AFL++, on stable Rust.
#
#   scripts/fuzz.sh [TARGET|all] [EXECS]     # build, then fuzz each target for ~EXECS executions
#   scripts/fuzz.sh list                     # the targets
#   scripts/fuzz.sh tmin TARGET CRASH_FILE   # minimise a crash into fuzz/regressions/TARGET/
#
# The targets are in fuzz/src/targets.rs (muster-fuzz); their seeds in fuzz/corpus/TARGET/.
# The binaries are built with rustc's stable SanitizerCoverage flags (trace-pc-guard, what
# `cargo afl` passes on stable) and AFL++'s runtime linked in, `--features afl` (persistent mode,
# shared-memory test cases), debug assertions and overflow checks on, in their own target dir
# (target/fuzz); the workspace build never needs AFL++. Findings go to target/fuzz/out/TARGET/.
#
# Prints per target: executions, execs/s, unique crashes, hangs. Exits non-zero if any target
# crashed. Needs `afl-fuzz` (Debian: afl++). Never changes the host's settings (no core_pattern
# or CPU governor changes: AFL++'s checks for those are skipped instead) and binds no CPU.
#
# Environment: FUZZ_MAX_SECONDS (a wall-clock cap per target, default 3600), FUZZ_RESUME=1 (go
# on from target/fuzz/out/TARGET's queue instead of the seeds; executions and time then count
# from that first run's start), FUZZ_JOBS (cargo
# build jobs), AFL_RT (the runtime object, default /usr/lib/afl/afl-compiler-rt.o), NICE
# (niceness of the fuzzers, default 10).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(boot_query range tftp proxydhcp token_pin csr kernel_args inventory config)
AFL_RT=${AFL_RT:-/usr/lib/afl/afl-compiler-rt.o}
NICE=${NICE:-10}
MAX_SECONDS=${FUZZ_MAX_SECONDS:-3600}
TARGET_DIR=$PWD/target/fuzz
HOST=$(rustc -vV | sed -n 's/^host: //p')
BIN_DIR=$TARGET_DIR/$HOST/release

die() { echo "fuzz.sh: $*" >&2; exit 2; }

build() {
    command -v afl-fuzz >/dev/null || die "afl-fuzz not found (Debian: apt-get install afl++)"
    [ -f "$AFL_RT" ] || die "AFL++ runtime $AFL_RT not found (set AFL_RT)"
    local bins=()
    for t in "$@"; do bins+=(--bin "fuzz-$t"); done
    echo "==> building ${*} (instrumented, $TARGET_DIR)"
    # --target keeps RUSTFLAGS off build scripts and proc macros: only the fuzzed code is
    # instrumented and linked with the runtime. The release profile, without LTO, with checks.
    RUSTFLAGS="-C passes=sancov-module \
        -C llvm-args=-sanitizer-coverage-level=3 \
        -C llvm-args=-sanitizer-coverage-trace-pc-guard \
        -C llvm-args=-sanitizer-coverage-prune-blocks=0 \
        -C debug-assertions -C overflow-checks \
        -C link-arg=$AFL_RT" \
    CARGO_PROFILE_RELEASE_LTO=false \
    CARGO_PROFILE_RELEASE_STRIP=none \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true \
    CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true \
    CARGO_PROFILE_RELEASE_PANIC=unwind \
    CARGO_TARGET_DIR=$TARGET_DIR \
        nice -n "$NICE" cargo build --locked --release --target "$HOST" -p muster-fuzz \
        --features afl ${FUZZ_JOBS:+--jobs "$FUZZ_JOBS"} "${bins[@]}"
}

# AFL++ settings for a shared machine: no UI, no CPU binding, and its host checks skipped
# rather than "fixed" (it would ask to change core_pattern and the CPU governor).
afl_env() {
    export AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
    export AFL_FAST_CAL=1 AFL_QUIET=1
}

field() { sed -n "s/^$1 *: *//p" "$2" | head -n1; }

# Runs one target; prints its line of the summary; returns 1 if it crashed.
fuzz_one() {
    local t=$1 execs=$2
    local out=$TARGET_DIR/out/$t
    local input=fuzz/corpus/$t
    if [ -n "${FUZZ_RESUME:-}" ] && [ -f "$out/default/fuzzer_stats" ]; then
        input=- # go on from the last run's queue; EXECS counts from that run's start
    else
        rm -rf "$out"
        mkdir -p "$out"
    fi
    local log=$out.log
    local rc=0
    timeout --signal=INT --kill-after=30 "$MAX_SECONDS" \
        nice -n "$NICE" afl-fuzz -i "$input" -o "$out" -E "$execs" -t 1000 \
        -- "$BIN_DIR/fuzz-$t" >"$log" 2>&1 || rc=$?
    local stats=$out/default/fuzzer_stats
    if [ ! -f "$stats" ]; then
        echo "fuzz.sh: $t: afl-fuzz wrote no stats (exit $rc); its log:" >&2
        tail -n 30 "$log" >&2
        return 1
    fi
    local done crashes hangs secs rate
    done=$(field execs_done "$stats")
    secs=$(field run_time "$stats")
    [ -n "$secs" ] || secs=$(($(field last_update "$stats") - $(field start_time "$stats")))
    ((secs > 0)) || secs=1
    crashes=$(find "$out/default/crashes" -type f -name 'id:*' 2>/dev/null | wc -l)
    hangs=$(find "$out/default/hangs" -type f -name 'id:*' 2>/dev/null | wc -l)
    rate=$((done / secs))
    printf '%-12s %12s %10s %8s %6s %7ss\n' "$t" "$done" "$rate" "$crashes" "$hangs" "$secs"
    if ((crashes > 0)); then
        echo "  crashes: $out/default/crashes/ (reproduce: cargo run -p muster-fuzz --bin fuzz-$t -- FILE)" >&2
        return 1
    fi
    return 0
}

cmd=${1:-all}
case "$cmd" in
list)
    printf '%s\n' "${TARGETS[@]}"
    ;;
tmin)
    t=${2:?tmin TARGET CRASH_FILE}
    f=${3:?tmin TARGET CRASH_FILE}
    build "$t"
    mkdir -p "fuzz/regressions/$t"
    dest=fuzz/regressions/$t/$(sha1sum "$f" | cut -c1-12)
    AFL_MAP_SIZE=${AFL_MAP_SIZE:-1048576} AFL_NO_AFFINITY=1 nice -n "$NICE" afl-tmin -i "$f" -o "$dest" -- "$BIN_DIR/fuzz-$t"
    echo "minimised into $dest ($(stat -c %s "$dest") bytes)"
    ;;
*)
    execs=${2:-1000000}
    [[ $execs =~ ^[0-9]+$ ]] || die "EXECS must be a number"
    if [ "$cmd" = all ]; then
        run=("${TARGETS[@]}")
    else
        [[ " ${TARGETS[*]} " == *" $cmd "* ]] || die "no target $cmd (scripts/fuzz.sh list)"
        run=("$cmd")
    fi
    build "${run[@]}"
    afl_env
    printf '\n%-12s %12s %10s %8s %6s %8s\n' target executions execs/s crashes hangs time
    failed=0
    for t in "${run[@]}"; do
        fuzz_one "$t" "$execs" || failed=1
    done
    if ((failed)); then
        echo "fuzz.sh: crashes found (see above)" >&2
        exit 1
    fi
    ;;
esac

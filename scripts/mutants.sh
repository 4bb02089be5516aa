#!/usr/bin/env bash
# Mutation testing of the modules where a test gap is a security hole: join tokens, the CA pin,
# config validation, token checks in the store, certificate kinds and per-call authorization,
# enrollment admission, `admitted` and revocation. cargo-mutants changes the code one mutant at
# a time (in a copy of the tree) and runs the tests against each; a mutant no test notices
# ("missed") is a behaviour nothing pins down.
#
# Not part of CI (tests/run.sh): it is slow. Every mutant rebuilds the controller and the test
# binaries and runs them, one at a time: hours on a 2-core machine. Run it by hand after
# touching these modules:
#
#   scripts/mutants.sh machinery            # token, pin and config validation
#   scripts/mutants.sh controller           # the controller's modules below
#   scripts/mutants.sh machinery --iterate  # only those not caught by the previous run
#   scripts/mutants.sh controller --list    # extra args go to cargo mutants
#
# Two groups, each with the tests that can notice its mutants, so a mutant rebuilds and runs
# no more than it must:
# - machinery: the unit tests of muster-machinery (where token, pin and validation are pinned
#   down; nothing downstream is rebuilt).
# - controller: the unit tests of muster-controller and the in-process integration tests of
#   muster-tests (`--lib` and `--test NAME` are cargo target selections, so nothing else is
#   even built). None of those spawns a workspace binary: the controller (and agent) run
#   inside the test process, so they test the mutated code itself. The root/VM/long end-to-end
#   suites (netboot_e2e, lab_netns, effects_ns, *_e2e, multiprocess) are left out.
#
# cargo-mutants' own baseline builds only the mutated package, so it cannot take `--test NAME`
# targets of muster-tests: the script runs the baseline itself first (the same tests on the
# unmutated tree; a failure stops it here) and tells cargo-mutants to skip its own.
#
# Results go to target/mutants/GROUP/mutants.out (outcomes.json, caught.txt, missed.txt, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

group=${1:-}
shift || true
case "$group" in
machinery)
    files=(machinery/src/token.rs machinery/src/pin.rs machinery/src/config/validate.rs)
    packages=(muster-machinery)
    targets=(--lib)
    ;;
controller)
    files=(
        controller/src/store/mod.rs
        controller/src/pki/auth.rs
        controller/src/api/auth.rs
        controller/src/fleet/enroll.rs
        controller/src/fleet/session.rs
        controller/src/fleet/assign.rs
    )
    packages=(muster-controller muster-tests)
    targets=(--lib)
    for t in rejections registration config inprocess metrics admission hostile; do
        # (cargo refuses a --test that names no target.)
        if [ -f "tests/tests/$t.rs" ]; then targets+=("--test=$t"); fi
    done
    ;;
*)
    echo "usage: scripts/mutants.sh machinery|controller [cargo mutants args...]" >&2
    exit 2
    ;;
esac
command -v cargo-mutants >/dev/null || {
    echo "mutants.sh: cargo-mutants not found (cargo install --locked cargo-mutants)" >&2
    exit 2
}
out=target/mutants/$group

pkg_list=$(IFS=,; echo "${packages[*]}")
cmd=(cargo mutants --test-tool=nextest --jobs 1 --timeout 300 --baseline=skip --output "$out"
    --test-package "$pkg_list")
for f in "${files[@]}"; do cmd+=(--file "$f"); done
for t in "${targets[@]}"; do cmd+=("--cargo-arg=$t"); done
cmd+=("$@")

case " $* " in
*" --list "* | *" --list-files "*) exec "${cmd[@]}" ;; # nothing to test
esac

baseline=(cargo nextest run)
for p in "${packages[@]}"; do baseline+=(-p "$p"); done
baseline+=("${targets[@]}")
echo "+ ${baseline[*]}" >&2
"${baseline[@]}"

mkdir -p "$out"
echo "+ ${cmd[*]}" >&2
rc=0
"${cmd[@]}" || rc=$?

# cargo-mutants exits non-zero when mutants were missed or timed out: report, then pass it on.
dir=$out/mutants.out
count() { if [ -f "$dir/$1.txt" ]; then grep -c . "$dir/$1.txt" || true; else echo 0; fi; }
if [ -d "$dir" ]; then
    printf '\ncaught: %s  missed: %s  unviable: %s  timeout: %s' \
        "$(count caught)" "$(count missed)" "$(count unviable)" "$(count timeout)"
    if [ -f "$dir/previously_caught.txt" ]; then
        printf '  (skipped, caught before: %s)' "$(count previously_caught)"
    fi
    printf '\n'
    if [ -s "$dir/missed.txt" ]; then
        printf '\nmissed:\n'
        cat "$dir/missed.txt"
    fi
fi
exit "$rc"

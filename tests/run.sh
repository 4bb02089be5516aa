#!/usr/bin/env bash
# Muster's whole test suite, as CI runs it: installs the system packages the tests need, checks
# formatting and lints, builds every binary, then runs every test (unit, in-process,
# multi-process end to end). Safe on a shared host: tests only use temp dirs, loopback and
# namespaces/VMs they create themselves.
#
#   tests/run.sh            # everything
#   tests/run.sh -E 'test(revoke)'   # extra args go to cargo nextest (filters)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# System packages the suite needs, installed only when missing.
ensure_pkgs() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "installing system packages: ${missing[*]}"
        if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}
# prometheus: promtool checks of /metrics, the alert rules and the README's scrape configs, and
# the real scraper in an end-to-end test. victoria-metrics: the same scrape configs through its
# (and vmagent's) strict dry run, and the real single-node scraper in another end-to-end test.
# jq: the README's examples, which the suite runs as written. iproute2 and util-linux:
# `ip netns`, `unshare` and `nsenter` for the tests that run the agent's real effects (and the
# lab) inside namespaces they create.
ensure_pkgs curl jq prometheus victoria-metrics iproute2 util-linux
# The Debian packages: dpkg-deb (dpkg), strip and readelf (binutils), lintian, and
# systemd-analyze (systemd) to verify their units.
ensure_pkgs dpkg binutils lintian systemd
# The Kubernetes join hashes checked against independent computations (sha256sum, openssl).
ensure_pkgs coreutils openssl
# Network boot, images and the QEMU lab: QEMU (from bookworm-backports), iPXE, busybox-static,
# xorriso + isolinux, dnsmasq (the ProxyDHCP test's LAN DHCP server), OVMF, and what the node
# OS image is built with (mmdebstrap, e2fsprogs, dosfstools, mtools, fdisk, syslinux).
scripts/install-netboot-deps.sh

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "build every binary"
cargo build --workspace --bins --locked

log "doc tests"
cargo test --workspace --locked --doc

# Fuzzing itself (scripts/fuzz.sh) is not run here: its instrumented build alone would add
# about four minutes. The fuzz corpora and regressions run uninstrumented in the tests below
# (fuzz/tests/replay.rs).

# Last, so its summary closes the output.
log "tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --profile ci "$@"
else
    cargo test --workspace --locked -- "$@"
fi

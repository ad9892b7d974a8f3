#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The project's whole test suite: formatting, lints, every test (unit, property,
# differential, end-to-end against real QEMU guests, user-mode Linux and DPDK testpmd
# as vhost-user frontends) and bounded fuzzing.
# This is the test command README.md gives; CI (.ci/run) runs exactly this.
#
# First it installs what the tests need (QEMU 10, qemu-storage-daemon, the guest kernel,
# user-mode-linux, dpdk-testpmd, ...) with install-test-deps.sh, which only checks when everything is present and
# needs root (or sudo) only when it has something to install. E2E_SKIP_DEPS=1 skips
# that step (for machines provisioned another way).
set -euo pipefail
cd "$(dirname "$0")/../.."

step() { printf '\n==> %s\n' "$*"; }

step "test dependencies (vring-tests/scripts/install-test-deps.sh)"
if [ "${E2E_SKIP_DEPS:-0}" = "1" ]; then
    echo "E2E_SKIP_DEPS=1: not checking or installing test dependencies"
elif ! bash vring-tests/scripts/install-test-deps.sh; then
    echo "test.sh: installing the test dependencies failed (see above)." >&2
    echo "test.sh: they need root once: run 'sudo vring-tests/scripts/install-test-deps.sh'" >&2
    echo "test.sh: (or, as root, 'vring-tests/scripts/install-test-deps.sh'), then run this again." >&2
    exit 1
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, all features, -D warnings)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "cargo doc (broken intra-doc links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features

step "cargo build --release (daemons used by end-to-end tests)"
cargo build --release --workspace --bins

step "cargo test (workspace, all features)"
cargo test --workspace --all-features -- --test-threads="${TEST_THREADS:-2}"

step "fuzz harness tests (seed corpus and crash regressions, no sanitizer)"
cargo fmt --manifest-path vring-tests/fuzz/Cargo.toml -- --check
cargo test --release --manifest-path vring-tests/fuzz/Cargo.toml

if [ -x vring-tests/scripts/fuzz.sh ]; then
    step "bounded fuzzing (${FUZZ_SECONDS:-30}s per target)"
    vring-tests/scripts/fuzz.sh "${FUZZ_SECONDS:-30}"
fi
step "all tests passed"

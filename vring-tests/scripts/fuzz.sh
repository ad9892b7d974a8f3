#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Bounded fuzzing of virtio-core's descriptor-chain parsing (vring-tests/fuzz, a
# cargo-fuzz project that is not a workspace member).
#
#   vring-tests/scripts/fuzz.sh [SECONDS]     (default 30 seconds per target)
#
# Installs cargo-fuzz if it is missing, then runs every fuzz target for SECONDS with
# libFuzzer's -max_total_time, starting from a scratch copy of the checked-in seed corpus
# (vring-tests/fuzz/corpus-run/<target>, git-ignored), so the checked-in corpus never
# grows. Exits non-zero on the first crash, leak, timeout or out-of-memory; the input is
# left in vring-tests/fuzz/artifacts/<target>/ and the log tail is printed.
#
# Toolchain: stable Rust works. cargo-fuzz passes nightly-only flags (-Zsanitizer=address),
# which stable rustc accepts with RUSTC_BOOTSTRAP=1; this script sets it for the fuzz
# build only (its own target directory, vring-tests/fuzz/target).
#
# The harness logic (reference model, seed expectations, known-bug reproducers) is also
# tested without libFuzzer: cargo test --release --manifest-path vring-tests/fuzz/Cargo.toml
# (the seed corpus is rewritten by: cargo run --manifest-path ... --bin gen_corpus).
#
# Environment knobs:
#   FUZZ_TARGETS="split_chain packed_chain"   targets to run (default: all)
#   FUZZ_SANITIZER=address|none               (default: address)
#   FUZZ_MAX_LEN=4096                         libFuzzer -max_len
set -euo pipefail

SECONDS_PER_TARGET=${1:-${FUZZ_SECONDS:-30}}
case "$SECONDS_PER_TARGET" in
    ''|*[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CRATE_DIR=$(cd "$SCRIPT_DIR/.." && pwd)          # vring-tests
FUZZ_DIR=$CRATE_DIR/fuzz
TARGETS=${FUZZ_TARGETS:-split_chain packed_chain}
SANITIZER=${FUZZ_SANITIZER:-address}
MAX_LEN=${FUZZ_MAX_LEN:-4096}

log() { printf '[fuzz] %s\n' "$*"; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    log "cargo-fuzz not found: cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
fi
log "$(cargo fuzz --version)"

export RUSTC_BOOTSTRAP=1
# Cargo caches rustc's answers about the target (including a refusal of -Z flags from a
# run without RUSTC_BOOTSTRAP); drop the cache so this build asks again.
rm -f "$FUZZ_DIR"/target/.rustc_info.json

cd "$CRATE_DIR"
status=0
for target in $TARGETS; do
    seeds=$FUZZ_DIR/corpus/$target
    scratch=$FUZZ_DIR/corpus-run/$target
    [ -d "$seeds" ] || { log "no seed corpus $seeds"; exit 1; }
    rm -rf "$scratch"
    mkdir -p "$scratch" "$FUZZ_DIR/artifacts/$target"
    cp "$seeds"/* "$scratch"/

    log "building $target (sanitizer: $SANITIZER)"
    start=$(date +%s)
    cargo fuzz build --fuzz-dir "$FUZZ_DIR" -s "$SANITIZER" "$target"
    built=$(date +%s)
    log "built $target in $((built - start)) s; fuzzing for ${SECONDS_PER_TARGET} s"

    logfile=$FUZZ_DIR/corpus-run/$target.log
    set +e
    cargo fuzz run --fuzz-dir "$FUZZ_DIR" -s "$SANITIZER" "$target" "$scratch" -- \
        -max_total_time="$SECONDS_PER_TARGET" -max_len="$MAX_LEN" -timeout=30 \
        -rss_limit_mb=2048 -print_final_stats=1 >"$logfile" 2>&1
    rc=$?
    set -e
    end=$(date +%s)
    if [ "$rc" -ne 0 ]; then
        log "FAILED: $target (exit $rc after $((end - built)) s); log tail:"
        tail -n 60 "$logfile"
        log "crash inputs: $(ls "$FUZZ_DIR/artifacts/$target" 2>/dev/null | tr '\n' ' ')"
        log "reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir $FUZZ_DIR $target <input>"
        status=1
        break
    fi
    summary=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$logfile" | tail -n 1 || true)
    log "ok: $target: ${summary:-no DONE line} (run $((end - built)) s)"
done
exit "$status"

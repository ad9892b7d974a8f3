#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Boot a demo VM whose disk is served by our vhost-user-blk daemon and whose NIC by our
# vhost-user-net daemon (on a TAP in a network namespace of its own; see README.md).
# Installs QEMU 10 and the guest kernel on first run, builds the daemon, then runs the
# demo; extra arguments go to demo-vm (--shell, --packed, --queues N, --image PATH, --no-net).
set -euo pipefail
cd "$(dirname "$0")/../.."
echo "demo: checking what the demo needs (vring-tests/scripts/install-test-deps.sh; the first run installs it)"
bash vring-tests/scripts/install-test-deps.sh >/dev/null
cargo build --release -q -p vhost-user-blk -p vhost-user-net -p vring-tests --bins
exec target/release/demo-vm "$@"

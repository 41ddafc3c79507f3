#!/usr/bin/env bash
# Run every test: unit tests of each crate and the end-to-end tests that boot
# real guests under KVM and drive them over QMP (with qmp-shell and socat
# too). Installs and builds what is missing first (./setup.sh --no-demo).
# Exits non-zero on any failure.
#
#   ./test.sh                 everything
#   ./test.sh -p tests --test qmp    extra arguments go to `cargo test`
#
# VM tests run two at a time (--test-threads=2): this is a 2-core machine
# and a guest's kernel is emulated here. Set MINIVMM_TEST_ECHO=1 to see the
# guests' GUEST-READY/PASS lines as the tests run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

start=$SECONDS
"$ROOT/setup.sh" --no-demo
cargo build --release --workspace
if [ $# -eq 0 ]; then
    set -- --workspace
fi
cargo test --release --no-fail-fast "$@" -- --test-threads=2
echo "test.sh: all tests passed in $((SECONDS - start)) s"

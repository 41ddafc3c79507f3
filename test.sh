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
#
# Before the suite, one boot of the standard guest measures how fast guests
# run on this machine (tests/src/calibrate.rs); every time limit of the
# end-to-end tests is scaled by it. The measurement and the wall time are
# printed at the end, pass or fail.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

start=$SECONDS
summary() {
    local rc=$?
    local cal="no calibration was made"
    if [ -f target/e2e-calibration ] && grep -qx "run=${MINIVMM_TEST_RUN:-}" target/e2e-calibration; then
        local ready first
        ready=$(sed -n 's/^ready_ms=//p' target/e2e-calibration)
        first=$(sed -n 's/^first_pass_ms=//p' target/e2e-calibration)
        cal="standard guest (128 MiB, 2 vCPUs) GUEST-READY in ${ready} ms, first PASS ${first} ms later"
    fi
    if [ $rc -eq 0 ]; then
        echo "test.sh: all tests passed in $((SECONDS - start)) s; calibration: $cal"
    else
        echo "test.sh: FAILED (status $rc) after $((SECONDS - start)) s; calibration: $cal"
    fi
}
trap summary EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$ROOT/setup.sh" --no-demo
cargo build --release --workspace
# One calibration per run, made before anything else runs.
MINIVMM_TEST_RUN="$(date +%s)-$$"
export MINIVMM_TEST_RUN
cargo run --release --quiet -p tests --bin calibrate
if [ $# -eq 0 ]; then
    set -- --workspace
fi
cargo test --release --no-fail-fast "$@" -- --test-threads=2

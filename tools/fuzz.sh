#!/usr/bin/env bash
# Run the structure-aware fuzz tests for as long as asked: the migration
# stream reader (migration/src/session.rs, fuzzed_streams_fail_cleanly) and
# the QMP request path (qmp/tests/fuzz.rs), with fresh seeds each round.
# ./test.sh runs both with a fixed seed and a bounded number of cases; a
# failure here prints its seed, and MINIVMM_FUZZ_SEED=<seed> reproduces it
# (add the case to the tests as a regression once fixed).
#
#   tools/fuzz.sh [MINUTES] [CASES-PER-ROUND]     defaults: 10, 20000
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MINUTES=${1:-10}
CASES=${2:-20000}
end=$((SECONDS + MINUTES * 60))
round=0
cargo build --release -p migration -p qmp --tests >/dev/null
while [ $SECONDS -lt $end ]; do
    round=$((round + 1))
    seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
    echo "round $round: seed $seed, $CASES cases each"
    for t in "-p migration fuzzed_streams" "-p qmp --test fuzz"; do
        # shellcheck disable=SC2086
        if ! out=$(MINIVMM_FUZZ_CASES=$CASES MINIVMM_FUZZ_SEED=$seed \
            cargo test --release -q $t -- --nocapture 2>&1); then
            echo "$out"
            echo "FAILED with MINIVMM_FUZZ_SEED=$seed MINIVMM_FUZZ_CASES=$CASES ($t)"
            exit 1
        fi
        echo "$out" | grep -E "^fuzzed"
    done
done

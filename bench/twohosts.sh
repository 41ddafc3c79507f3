#!/usr/bin/env bash
# Migration between two hosts on this machine: the source and the
# destination each in a network namespace of its own, joined by a veth
# pair shaped with tbf (no netem on this host: delay is added by the tests
# crate's user-space relay, in the source's namespace, each direction).
# Links: 1 Gbit/s and 100 Mbit/s direct, and 1 Gbit/s through the relay
# with 0, 1 and 10 ms each way. Per link, minivmm next to QEMU (-M
# microvm) on the same guest: precopy (total time, downtime), postcopy
# (total time, switch downtime, fault latency p50/p99/max) and COLO
# (checkpoint pause), each run checking the guest's integrity. Prints a
# Markdown table; writes docs/twohosts-fault-latency.svg (postcopy fault
# latency against the delay) and the JSON next to it unless BENCH_OUT is
# set to another directory. Needs root (namespaces) and iproute2.
#
#   bench/twohosts.sh [RUNS]      default 3 (~30 minutes with QEMU)
#
# BENCH_VMMS=minivmm skips QEMU; BENCH_LINKS=1gbit/-,1gbit/10 picks links
# (RATE/DELAY, delay in ms each way, - for no relay).
set -euo pipefail

NAME=twohosts.sh
source "$(dirname "${BASH_SOURCE[0]}")/miglib.sh"
RUNS=${1:-3}
[ "$(id -u)" -eq 0 ] || { echo "$NAME: needs root (network namespaces)" >&2; exit 1; }
command -v ip >/dev/null && command -v tc >/dev/null ||
    { echo "$NAME: needs iproute2 (ip, tc): run ./setup.sh" >&2; exit 1; }
(cd "$ROOT" && cargo build --release -q -p tests --bin relay)
OUT=${BENCH_OUT:-$ROOT/docs}
LINKS=()
[ -z "${BENCH_LINKS:-}" ] || LINKS=(--links "$BENCH_LINKS")

run_py twohosts.py --runs "$RUNS" --relay "$ROOT/target/release/relay" \
    --svg "$OUT/twohosts-fault-latency.svg" --json "$OUT/twohosts.json" "${LINKS[@]}"

#!/usr/bin/env bash
# Postcopy recovery between two hosts on this machine: the source and the
# destination each in a network namespace of its own, joined by a veth
# pair shaped with tbf to 1 Gbit/s (no relay). The guest that never
# converges (workload.rate=0, max-bandwidth and max-postcopy-bandwidth
# 5 MB/s, so postcopy lasts ~25 s) is switched to postcopy at the source's
# MIGRATION_PASS 2; 2 s into postcopy the link goes down at both ends for
# 3 s. Manual mode, minivmm next to QEMU (-M microvm) on the same guest:
# migrate-pause on both sides, then after link up migrate-recover on the
# destination and migrate resume=true on the source. Automatic mode,
# minivmm only: x-postcopy-auto-recover 60000 ms on both sides and no
# command (recorded as unsupported where the binary refuses it); minivmm
# has x-peer-timeout 3000 ms on both sides in both modes. Reported per
# mode: cut to postcopy-paused and link up to postcopy-active and to
# completed (each side, query-migrate polled every 10 ms), the longest gap
# between the guest's PASS lines across postcopy and the outage, the
# destination's longest fault (minivmm's x-postcopy-faults; QEMU's from its
# trace events), pages sent again (minivmm's x-postcopy-pages-resent),
# minivmm's x-postcopy-paused-ms and x-postcopy-recoveries. Every run
# checks the guest's integrity as bench/postcopy.sh does. Prints a
# Markdown table; writes every run's data (with the QMP replies) to
# docs/recovery.json unless BENCH_OUT names another directory. Needs root
# (namespaces) and iproute2.
#
#   bench/recovery.sh [RUNS]      default 3 (~8 minutes with QEMU)
#
# BENCH_VMMS=minivmm skips QEMU; BENCH_MODES=manual or auto runs one mode.
set -euo pipefail

NAME=recovery.sh
source "$(dirname "${BASH_SOURCE[0]}")/miglib.sh"
RUNS=${1:-3}
[ "$(id -u)" -eq 0 ] || { echo "$NAME: needs root (network namespaces)" >&2; exit 1; }
command -v ip >/dev/null && command -v tc >/dev/null ||
    { echo "$NAME: needs iproute2 (ip, tc): run ./setup.sh" >&2; exit 1; }
OUT=${BENCH_OUT:-$ROOT/docs}

run_py recovery.py --runs "$RUNS" --modes "${BENCH_MODES:-manual,auto}" \
    --json "$OUT/recovery.json"

#!/usr/bin/env bash
# Precopy of a guest that dirties memory faster than the link: the standard
# workload guest (128 MiB, 2 vCPUs, 16 MiB rewritten at 16 MiB/s), source
# max-bandwidth 4 MB/s (a quarter of the dirty rate) and downtime-limit
# 300 ms, tcp loopback, minivmm next to QEMU (-M microvm, -accel kvm) on
# the same guest, restored from a snapshot taken after its first PASS and
# left running 11 s before each `migrate`. Four modes, each one migration
# to a fresh destination per run:
#   none           no help: is it still `active` 60 s after `migrate`?
#                  Then migrate_cancel; the source's guest must run on.
#   auto-converge  capability auto-converge, QEMU's defaults (initial 20,
#                  increment 10, trigger threshold 50, max 99)
#   tailslow       the same with cpu-throttle-tailslow
#   raise          no auto-converge; max-bandwidth raised to 1 GB/s with
#                  migrate-set-parameters at MIGRATION_PASS 4 (or 15 s)
# Reported: migrate to completed, total-time, downtime, the highest
# cpu-throttle-percentage in query-migrate (polled every 100 ms),
# dirty-sync-count, bytes, in raise mode the set to completed time, and the
# guest's own progress: PASS lines per second on the source in the 10 s
# before `migrate`, from `migrate` to the source's STOP, in the last 10 s
# before it, and at each throttle level. Every completed migration checks the guest's integrity
# as bench/migrate.sh does (two more PASS on the destination, no CORRUPT).
# Prints a Markdown table per mode; writes every run's data (with the QMP
# replies) to docs/converge.json unless BENCH_OUT names another directory.
#
#   bench/converge.sh [RUNS]      default 3 (~9 minutes per run and VMM)
#
# BENCH_VMMS=minivmm skips QEMU; BENCH_MODES=none,ac,tailslow,raise picks
# modes. Run it on an otherwise idle machine.
set -euo pipefail

NAME=converge.sh
source "$(dirname "${BASH_SOURCE[0]}")/miglib.sh"
RUNS=${1:-3}
OUT=${BENCH_OUT:-$ROOT/docs}

run_py converge.py --runs "$RUNS" --modes "${BENCH_MODES:-none,ac,tailslow,raise}" \
    --json "$OUT/converge.json"

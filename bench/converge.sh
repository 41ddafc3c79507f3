#!/usr/bin/env bash
# Precopy of a guest that dirties memory faster than the link: the standard
# workload guest (128 MiB, 2 vCPUs, 16 MiB rewritten at 16 MiB/s), source
# max-bandwidth 4 MB/s (a quarter of the dirty rate) and downtime-limit
# 300 ms, tcp loopback, minivmm next to QEMU (-M microvm, -accel kvm) on
# the same guest, restored from a snapshot taken after its first PASS and
# left running 11 s before each `migrate`. Five modes, each one migration
# to a fresh destination per run:
#   none           no help: is it still `active` 60 s after `migrate`?
#                  Then migrate_cancel; the source's guest must run on.
#   ac             capability auto-converge, QEMU's defaults (initial 20,
#                  increment 10, trigger threshold 50, max 99)
#   tailslow       the same with cpu-throttle-tailslow
#   raise          no auto-converge; max-bandwidth raised to 1 GB/s with
#                  migrate-set-parameters at MIGRATION_PASS 4 (or 15 s)
#   dl             capability dirty-limit (QEMU 8.1's): the source started
#                  with -accel kvm,dirty-ring-size=65536, vcpu-dirty-limit
#                  1 MB/s and x-vcpu-dirty-limit-period 1000 ms (the
#                  defaults, set explicitly). minivmm only: QEMU 7.2 has
#                  no dirty-limit, its row says so and nothing is run
#                  (a QEMU 8.1 or later is run).
# Reported: migrate to completed, total-time, downtime, the highest
# cpu-throttle-percentage in query-migrate (polled every 100 ms),
# dirty-sync-count, bytes, in raise mode the set to completed time, and the
# guest's own progress: PASS lines per second on the source in the 10 s
# before `migrate`, from `migrate` to the source's STOP, in the last 10 s
# before it, and at each throttle level. In dl mode instead of the
# throttle columns: the polled maximum of every query-migrate key with
# `dirty-limit` in its name (minivmm: `x-dirty-limit`, the MB/s applied;
# QEMU 8.1: dirty-limit-throttle-time-per-round, dirty-limit-ring-full-time),
# when the first such key showed (s after `migrate`, sync), the guest's
# PASS/s before and while limited, the highest current-rate per vCPU in
# query-vcpu-dirty-limit (polled every second) and whether the source
# warned that a dirty ring overflowed. Every completed
# migration checks the guest's integrity as bench/migrate.sh does (two
# more PASS on the destination, no CORRUPT).
# Before each run it waits (up to 300 s) until no build, test or foreign
# VMM runs, and records per run what ran at its start and end.
# Prints a Markdown table per mode; writes every run's data (with the QMP
# replies) to docs/converge.json unless BENCH_OUT names another directory.
#
#   bench/converge.sh [RUNS]      default 3 (~9-11 minutes per run and VMM)
#
# BENCH_VMMS=minivmm skips QEMU; BENCH_MODES=none,ac,tailslow,raise,dl picks
# modes (the default: all five; dirty-limit and auto-converge are accepted
# for dl and ac). Run it on an otherwise idle machine.
set -euo pipefail

NAME=converge.sh
source "$(dirname "${BASH_SOURCE[0]}")/miglib.sh"
RUNS=${1:-3}
OUT=${BENCH_OUT:-$ROOT/docs}

run_py converge.py --runs "$RUNS" --modes "${BENCH_MODES:-none,ac,tailslow,raise,dl}" \
    --json "$OUT/converge.json"

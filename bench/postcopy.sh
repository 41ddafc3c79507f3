#!/usr/bin/env bash
# Postcopy: the guest that never converges in precopy (workload.rate=0,
# i.e. as fast as it can; max-bandwidth 5 MB/s; downtime-limit 1 ms),
# switched with migrate-start-postcopy at the source's MIGRATION_PASS 2,
# minivmm next to QEMU (-M microvm, -accel kvm), tcp loopback, median of
# RUNS runs. Reported: the switch downtime and total time (source's
# query-migrate), bytes, page requests, and on the destination minivmm's
# x-postcopy-faults (faults, requests, fault-to-wake latency p50/p99/max)
# and QEMU's postcopy-blocktime / postcopy-vcpu-blocktime (capability
# postcopy-blocktime on the destination). QEMU reports no per-fault
# latency: the script takes it from the QEMU destination's own trace events
# (-trace postcopy_ram_fault_thread_request, postcopy_place_page[_zero],
# -msg timestamp=on): the fault thread's request to the start of the
# page's placement, matched by page address, microsecond timestamps.
# Also the longest host-time gap between two PASS lines across the switch
# (what the guest's work sees), and host-wide TCP counters per run
# (receive-queue drops, RTO timeouts: see docs/benchmarks.md). One boot
# per VMM, saved after the first PASS and restored for every run; after
# each run the destination must print two more PASS lines and no CORRUPT
# may appear.
#
#   bench/postcopy.sh [RUNS]      default 5; prints a Markdown table
#
# Each VMM runs twice: without and with postcopy-preempt on both sides
# (requested pages on a second connection); BENCH_PREEMPT=off or on runs
# one mode only. BENCH_VMMS=minivmm skips QEMU. BENCH_DST_PREALLOC=1 starts
# destinations with -mem-prealloc. BENCH_TLS=1 migrates over TLS, the
# preempt channel included (postcopy.py --tls, as migrate.sh's BENCH_TLS:
# credentials of tools/tls-certs.sh in a temp dir, -object tls-creds-x509
# on both sides, tls-creds set on the destination before the source
# connects, QEMU with -incoming defer; shared in bench/miglib.py; rows read
# "VMM + TLS"). Run it on an otherwise idle machine (~6 minutes).
set -euo pipefail

NAME=postcopy.sh
source "$(dirname "${BASH_SOURCE[0]}")/miglib.sh"
RUNS=${1:-5}

OPTS=()
[ "${BENCH_TLS:-0}" = 1 ] && OPTS+=(--tls)
run_py postcopy.py --runs "$RUNS" "${OPTS[@]}"

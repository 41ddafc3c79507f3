#!/usr/bin/env bash
# Scale: what an idle precopy migration costs must grow with the memory the
# guest has touched, not with its size. Guests of 4, 16 and 64 GiB (-m 4G,
# 16G, 64G; -smp 2; RAM below the 32-bit hole ends at 3 GiB, the rest is at
# 4 GiB), each booted fresh with the kernel command-line options of the
# tests' small_kernel_ram (memmap=exactmap: the guest kernel gets ~207 MiB,
# among it the first 128 MiB at 4 GiB; minivmm still maps, tracks and
# migrates all of -m) and the standard workload (workload.mem=16
# workload.rate=16). After the guest's second PASS: a destination with the
# same options on tcp loopback, `migrate` with max-bandwidth 0 (unlimited)
# and the default downtime-limit (300 ms). Per size, per dirty-tracking
# mode: bitmap (KVM's dirty log) and ring (source started with
# -accel kvm,dirty-ring-size=65536; whether minivmm warned that a ring
# overflowed is recorded). Reported: total-time, downtime, setup-time,
# ram transferred, duplicate and normal pages, dirty-sync-count, the sync
# cost (query-migrate's x-dirty-sync-us and x-dirty-sync-max-us; null where
# the binary has no such keys), VmRSS and VmHWM of both minivmm processes
# before `migrate` and after completion, the guest going on on the
# destination (two more PASS, no CORRUPT). One run per size and mode.
# Prints a Markdown table and, per measure, its growth per GiB of guest
# (least squares over the sizes) next to the page data sent; writes every run's data (with the QMP replies) to
# docs/scale.json unless BENCH_OUT names another directory.
#
#   bench/scale.sh [--sizes 4,16,64] [--modes bitmap,ring]   (~9 minutes: each
#   guest boots for ~65 s on kvm_pvm; longer when a dirty ring overflows, a
#   64 GiB ring migration then took 6.5 minutes; --mig-timeout 900 s)
#
# Before each `migrate` it waits (--wait-quiet, up to 900 s) until no
# build, test or foreign VMM runs; the table says how it was.
#
# Needs ~1 GiB of free host memory, not 64: the guests stay untouched but
# for ~250 MiB each (a run stops, and says so, when the host's
# MemAvailable drops under 2 GiB). minivmm only. Run it on an otherwise
# idle machine.
set -euo pipefail

NAME=scale.sh
BENCH_VMMS=minivmm
source "$(dirname "${BASH_SOURCE[0]}")/miglib.sh"
OUT=${BENCH_OUT:-$ROOT/docs}

run_py scale.py --json "$OUT/scale.json" "$@"

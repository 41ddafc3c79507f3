#!/usr/bin/env bash
# COLO checkpoints: pause time per checkpoint (avg, p50/p99, max), bytes
# per checkpoint and the guest's slowdown, at x-checkpoint-delay 100 ms,
# for guests dirtying 1 (near idle), 10, 50 and 200 MiB/s. Each rate is a
# kernel command-line setting, so one boot per rate, saved after the first
# PASS and restored twice: once alone (the PASS interval without COLO) and
# once as COLO primary with a secondary on tcp loopback (~10 s measured
# after 1 s of warm-up; longer at 1 MiB/s, where a PASS takes 16 s).
#
#   bench/colo.sh                 prints a Markdown table
#
# Pauses: minivmm's x-colo statistics (query-migrate on the primary, polled
# every ~20 ms so each checkpoint is seen alone), and for QEMU the
# primary's STOP -> RESUME events. Bytes: the primary socket's bytes_sent
# (ss) over the window / checkpoints. QEMU 7.2 (Debian) runs COLO without
# disks and network here (x-colo on both sides; no block replication, no
# colo-compare: nothing to replicate or compare), so BENCH_VMMS=minivmm,qemu
# adds it (the default; ~9 minutes; BENCH_VMMS=minivmm takes ~4).
# BENCH_RATES=10,50 picks rates. Run it on an otherwise idle machine.
set -euo pipefail

NAME=colo.sh
source "$(dirname "${BASH_SOURCE[0]}")/miglib.sh"
RATES=${BENCH_RATES:-1,10,50,200}
command -v ss >/dev/null || { echo "colo.sh: ss (iproute2) missing" >&2; exit 1; }

run_py colo.py --rates "$RATES"

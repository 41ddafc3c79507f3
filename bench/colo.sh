#!/usr/bin/env bash
# COLO checkpoints: pause time per checkpoint (avg, p50/p99, max),
# checkpoints per second by cause, output hold time, bytes per checkpoint
# and the guest's slowdown, for guests dirtying 1 (near idle), 10, 50 and
# 200 MiB/s, in three minivmm modes:
#   periodic  x-colo-periodic=true, secondary paused, output released at
#             each checkpoint; x-checkpoint-delay 100 ms
#   match     running secondary, deterministic output (`detout` typed on
#             the guest's console: `PASS k` lines, the same on both sides);
#             x-checkpoint-delay 2000 ms
#   differ    running secondary, timed output (`PASS k ms=UPTIME`, differs
#             in every line); x-checkpoint-delay 2000 ms
# and once per mode at 10 MiB/s the failover time: kill -9 the primary,
# x-colo-lost-heartbeat on the secondary, time to its first byte and its
# first new PASS line. Each rate is a kernel command-line setting, so one
# boot per rate, saved after the first PASS and restored for every
# point: alone (the PASS interval without COLO, timed and deterministic)
# and as COLO primary with a secondary on tcp loopback (10 s measured,
# 30 s with a running secondary, after 1 s of warm-up; longer at 1 MiB/s,
# where a PASS takes 16 s).
#
#   bench/colo.sh                 prints Markdown tables
#
# Pauses: minivmm's x-colo statistics (query-migrate on the primary, polled
# every ~20 ms so each checkpoint is seen alone), and for QEMU the
# primary's STOP -> RESUME events. Bytes: the primary socket's bytes_sent
# (ss) over the window / checkpoints. QEMU 7.2 (Debian) runs COLO without
# disks and network here (x-colo on both sides; no block replication, no
# colo-compare: nothing to replicate or compare), so it has the periodic
# mode only; BENCH_VMMS=minivmm,qemu adds it (the default; BENCH_VMMS=minivmm
# takes ~15 minutes). BENCH_RATES=10,50 picks rates, BENCH_MODES=periodic,differ
# modes, BENCH_WINDOW / BENCH_RUNNING_WINDOW the seconds measured,
# BENCH_RUNNING_DELAY the running modes' x-checkpoint-delay,
# BENCH_FAILOVER_RATE the rate with failovers (-1: none), BENCH_JSON a file
# for the raw data. BENCH_TLS=1 runs the COLO connection over TLS (colo.py
# --tls, as migrate.sh's BENCH_TLS: credentials of tools/tls-certs.sh in a
# temp dir, -object tls-creds-x509 on both sides, tls-creds set on the
# secondary before the primary connects, QEMU's secondary with -incoming
# defer; shared in bench/miglib.py; rows read "VMM + TLS", bytes per
# checkpoint then include TLS records). Run it on an otherwise idle machine.
set -euo pipefail

NAME=colo.sh
source "$(dirname "${BASH_SOURCE[0]}")/miglib.sh"
RATES=${BENCH_RATES:-1,10,50,200}
command -v ss >/dev/null || { echo "colo.sh: ss (iproute2) missing" >&2; exit 1; }

args=(--rates "$RATES" --modes "${BENCH_MODES:-periodic,match,differ}"
      --window "${BENCH_WINDOW:-10}" --running-window "${BENCH_RUNNING_WINDOW:-30}"
      --running-delay "${BENCH_RUNNING_DELAY:-2000}" --failover-rate "${BENCH_FAILOVER_RATE:-10}")
[ -z "${BENCH_JSON:-}" ] || args+=(--json "$BENCH_JSON")
[ "${BENCH_TLS:-0}" = 1 ] && args+=(--tls)
run_py colo.py "${args[@]}"

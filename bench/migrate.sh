#!/usr/bin/env bash
# Precopy live migration, minivmm next to QEMU (-M microvm, -accel kvm) on
# the same guest over tcp loopback, with the same downtime-limit (300 ms,
# QEMU's default) and max-bandwidth (BENCH_MAX_BANDWIDTH, default 10 GiB/s
# in both: the link, not the throttle, is the limit): total time, downtime,
# setup time, bytes, page data rate; median of RUNS runs per point. Guests:
# idle 1 GiB, idle 4 GiB (workload of 4 MiB at 1 MiB/s) and 256 MiB with
# 64 MiB dirtied at 100 MiB/s; each booted once, saved after its first
# PASS and restored for every run (minivmm: file:; QEMU 7.2 has no file:
# URI, so exec:cat > F / -incoming "exec:cat F"). After each run the
# destination must print two more PASS lines (every page checked) and no
# CORRUPT may appear on either console. Last, the machine's loopback TCP
# and memcpy bandwidth, the limits of a page stream.
#
#   bench/migrate.sh [RUNS]       default 3; prints a Markdown table
#
# BENCH_VMMS=minivmm skips QEMU; BENCH_SCENARIOS=idle1g,idle4g,dirty64
# picks the guests (also data512, data512s: page throughput, see
# migrate.py); BENCH_DST_PREALLOC=1 starts destinations with -mem-prealloc;
# BENCH_SNAPSHOTS=DIR keeps the booted guests there for later runs (the
# 512 MiB guest takes minutes to boot and fill); BENCH_SAME_STATE=1 builds
# bench/pagestream.c and measures loopback and that page stream with the
# VMs up before each run (migrate.py --same-state); BENCH_TLS=1 migrates
# over TLS (migrate.py --tls: credentials of tools/tls-certs.sh in a temp
# dir, -object tls-creds-x509 on both sides, tls-creds set on the
# destination before the source connects, QEMU with -incoming defer, and on
# the source right before `migrate`; snapshots and restores stay plain;
# rows read "VMM + TLS"); BENCH_JSON=FILE also writes the runs there as
# JSON. Run it on an otherwise idle machine (~10 minutes).
set -euo pipefail

NAME=migrate.sh
source "$(dirname "${BASH_SOURCE[0]}")/miglib.sh"
RUNS=${1:-3}
SCENARIOS=${BENCH_SCENARIOS:-idle1g,idle4g,dirty64}
MAXBW=${BENCH_MAX_BANDWIDTH:-10737418240}

OPTS=()
[ "${BENCH_DST_PREALLOC:-0}" = 1 ] && OPTS=(--dst-prealloc)
[ -n "${BENCH_SNAPSHOTS:-}" ] && OPTS+=(--snapshot-dir "$BENCH_SNAPSHOTS")
[ "${BENCH_TLS:-0}" = 1 ] && OPTS+=(--tls)
[ -z "${BENCH_JSON:-}" ] || OPTS+=(--json "$BENCH_JSON")
if [ "${BENCH_SAME_STATE:-0}" = 1 ]; then
    psdir=$(mktemp -d)
    trap 'rc=$?; rm -rf "$psdir"; [ -z "$PY" ] || kill "$PY" 2>/dev/null || true; exit $rc' EXIT
    cc -O2 -o "$psdir/pagestream" "$ROOT/bench/pagestream.c"
    OPTS+=(--same-state "$psdir/pagestream")
fi
run_py migrate.py --runs "$RUNS" --scenarios "$SCENARIOS" --max-bandwidth "$MAXBW" "${OPTS[@]}"

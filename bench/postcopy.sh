#!/usr/bin/env bash
# Postcopy: the guest that never converges in precopy (workload.rate=0,
# i.e. as fast as it can; max-bandwidth 5 MB/s; downtime-limit 1 ms),
# switched with migrate-start-postcopy at the source's MIGRATION_PASS 2,
# minivmm next to QEMU (-M microvm, -accel kvm), tcp loopback, median of
# RUNS runs. Reported: the switch downtime and total time (source's
# query-migrate), bytes, page requests, and on the destination minivmm's
# x-postcopy-faults (faults, requests, fault-to-wake latency p50/p99/max)
# or QEMU's postcopy-blocktime / postcopy-vcpu-blocktime (capability
# postcopy-blocktime on the destination; QEMU has no per-fault latency).
# Also the longest host-time gap between two PASS lines across the switch
# (what the guest's work sees), and host-wide TCP counters per run
# (receive-queue drops, RTO timeouts: see docs/benchmarks.md). One boot
# per VMM, saved after the first PASS and restored for every run; after
# each run the destination must print two more PASS lines and no CORRUPT
# may appear.
#
#   bench/postcopy.sh [RUNS]      default 5; prints a Markdown table
#
# BENCH_VMMS=minivmm skips QEMU. Run it on an otherwise idle machine
# (~3 minutes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS=${1:-5}
BIN=${MINIVMM_BIN:-$ROOT/target/release/minivmm}
KERNEL=${MINIVMM_KERNEL:-$ROOT/guest-images/out/vmlinux}
INITRD=${MINIVMM_INITRD:-$ROOT/guest-images/out/initramfs.cpio}
QEMU=${QEMU:-qemu-system-x86_64}
VMMS=${BENCH_VMMS:-minivmm,qemu}

for f in "$BIN" "$KERNEL" "$INITRD"; do
    [ -e "$f" ] || { echo "postcopy.sh: $f missing: run ./setup.sh --no-demo" >&2; exit 1; }
done
if [[ ",$VMMS," == *,qemu,* ]] && ! command -v "$QEMU" >/dev/null; then
    echo "postcopy.sh: $QEMU not installed (./setup.sh installs qemu-system-x86): minivmm only" >&2
    VMMS=minivmm
fi

echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)," \
     "kvm: $(ls -d /sys/module/kvm_pvm >/dev/null 2>&1 && echo kvm_pvm || echo kvm)" >&2
echo "# $("$BIN" --version) ($(stat -c %y "$BIN" | cut -d. -f1)), $("$QEMU" --version 2>/dev/null | head -n1 || echo 'no QEMU')" >&2

PY=
trap 'rc=$?; [ -z "$PY" ] || kill "$PY" 2>/dev/null || true; exit $rc' EXIT
trap 'exit 130' INT TERM
python3 "$ROOT/bench/postcopy.py" --runs "$RUNS" --vmms "$VMMS" \
    --minivmm "$BIN" --qemu "$QEMU" --kernel "$KERNEL" --initrd "$INITRD" &
PY=$!
wait "$PY"

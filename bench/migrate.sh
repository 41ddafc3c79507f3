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
# picks the guests. Run it on an otherwise idle machine (~10 minutes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS=${1:-3}
BIN=${MINIVMM_BIN:-$ROOT/target/release/minivmm}
KERNEL=${MINIVMM_KERNEL:-$ROOT/guest-images/out/vmlinux}
INITRD=${MINIVMM_INITRD:-$ROOT/guest-images/out/initramfs.cpio}
QEMU=${QEMU:-qemu-system-x86_64}
VMMS=${BENCH_VMMS:-minivmm,qemu}
SCENARIOS=${BENCH_SCENARIOS:-idle1g,idle4g,dirty64}
MAXBW=${BENCH_MAX_BANDWIDTH:-10737418240}

for f in "$BIN" "$KERNEL" "$INITRD"; do
    [ -e "$f" ] || { echo "migrate.sh: $f missing: run ./setup.sh --no-demo" >&2; exit 1; }
done
if [[ ",$VMMS," == *,qemu,* ]] && ! command -v "$QEMU" >/dev/null; then
    echo "migrate.sh: $QEMU not installed (./setup.sh installs qemu-system-x86): minivmm only" >&2
    VMMS=minivmm
fi

echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)," \
     "kvm: $(ls -d /sys/module/kvm_pvm >/dev/null 2>&1 && echo kvm_pvm || echo kvm)" >&2
echo "# $("$BIN" --version) ($(stat -c %y "$BIN" | cut -d. -f1)), $("$QEMU" --version 2>/dev/null | head -n1 || echo 'no QEMU')" >&2

# The helper kills its VMs on exit and they die with it (PDEATHSIG); the
# trap covers the helper itself.
PY=
trap 'rc=$?; [ -z "$PY" ] || kill "$PY" 2>/dev/null || true; exit $rc' EXIT
trap 'exit 130' INT TERM
python3 "$ROOT/bench/migrate.py" --runs "$RUNS" --scenarios "$SCENARIOS" --vmms "$VMMS" \
    --max-bandwidth "$MAXBW" --minivmm "$BIN" --qemu "$QEMU" --kernel "$KERNEL" --initrd "$INITRD" &
PY=$!
wait "$PY"

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

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN=${MINIVMM_BIN:-$ROOT/target/release/minivmm}
KERNEL=${MINIVMM_KERNEL:-$ROOT/guest-images/out/vmlinux}
INITRD=${MINIVMM_INITRD:-$ROOT/guest-images/out/initramfs.cpio}
QEMU=${QEMU:-qemu-system-x86_64}
VMMS=${BENCH_VMMS:-minivmm,qemu}
RATES=${BENCH_RATES:-1,10,50,200}

for f in "$BIN" "$KERNEL" "$INITRD"; do
    [ -e "$f" ] || { echo "colo.sh: $f missing: run ./setup.sh --no-demo" >&2; exit 1; }
done
command -v ss >/dev/null || { echo "colo.sh: ss (iproute2) missing" >&2; exit 1; }
if [[ ",$VMMS," == *,qemu,* ]] && ! command -v "$QEMU" >/dev/null; then
    echo "colo.sh: $QEMU not installed (./setup.sh installs qemu-system-x86): minivmm only" >&2
    VMMS=minivmm
fi

echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)," \
     "kvm: $(ls -d /sys/module/kvm_pvm >/dev/null 2>&1 && echo kvm_pvm || echo kvm)" >&2
echo "# $("$BIN" --version) ($(stat -c %y "$BIN" | cut -d. -f1)), $("$QEMU" --version 2>/dev/null | head -n1 || echo 'no QEMU')" >&2

PY=
trap 'rc=$?; [ -z "$PY" ] || kill "$PY" 2>/dev/null || true; exit $rc' EXIT
trap 'exit 130' INT TERM
python3 "$ROOT/bench/colo.py" --vmms "$VMMS" --rates "$RATES" \
    --minivmm "$BIN" --qemu "$QEMU" --kernel "$KERNEL" --initrd "$INITRD" &
PY=$!
wait "$PY"

#!/usr/bin/env bash
# QMP round-trip latency: p50/p99 of query-status over 10k requests (one
# outstanding at a time, plain unix-socket client in Python), for minivmm and
# QEMU (-M microvm) on the same guest, once paused before boot (-S) and once
# with the guest booted and its workload running.
#
#   bench/qmp.sh [N]      default 10000 requests per measurement
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N=${1:-10000}
BIN=${MINIVMM_BIN:-$ROOT/target/release/minivmm}
KERNEL=${MINIVMM_KERNEL:-$ROOT/guest-images/out/vmlinux}
INITRD=${MINIVMM_INITRD:-$ROOT/guest-images/out/initramfs.cpio}
QEMU=${QEMU:-qemu-system-x86_64}
WORKLOAD="workload.mem=16 workload.rate=16"

for f in "$BIN" "$KERNEL" "$INITRD"; do
    [ -e "$f" ] || { echo "qmp.sh: $f missing: run ./setup.sh --no-demo" >&2; exit 1; }
done
json_argv() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$@"; }

CONFIGS=("minivmm=$(json_argv "$BIN" -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=ttyS0 $WORKLOAD" -m 128 -smp 2 -serial stdio -display none \
    -qmp 'unix:@SOCK@,server=on,wait=off')")
if command -v "$QEMU" >/dev/null; then
    CONFIGS+=("qemu -M microvm=$(json_argv "$QEMU" -M microvm -device i8042 -accel kvm \
        -cpu qemu64,-cx16,+xsaveerptr -m 128 -smp 2 -nodefaults -no-user-config \
        -display none -serial stdio -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 noxsave clearcpuid=308,141,151,297,580 reboot=k $WORKLOAD" \
        -qmp 'unix:@SOCK@,server=on,wait=off')")
else
    echo "qmp.sh: $QEMU not installed (./setup.sh installs qemu-system-x86): minivmm only" >&2
fi
python3 "$ROOT/bench/qmp.py" -n "$N" "${CONFIGS[@]}"

#!/usr/bin/env bash
# Boot time: median of 5 boots, process start to the guest's GUEST-READY,
# for minivmm and, on the same kernel and initramfs, QEMU (-accel kvm) with
# -M microvm and -M pc. Also: RSS at GUEST-READY (total, and minus the guest
# RAM mapping = the VMM's own memory) and VM exits per boot (perf's
# kvm:kvm_exit tracepoint, when perf works here).
#
#   bench/boot.sh [RUNS]        default 5; prints a Markdown table
#
# The guest: guest-images/out/{vmlinux,initramfs.cpio} (or MINIVMM_KERNEL,
# MINIVMM_INITRD), 128 MiB, 2 vCPUs, a 16 MiB workload. QEMU gets the CPU
# model and kernel switches this host needs (minivmm adds the switches
# itself): -cpu qemu64,-cx16,+xsaveerptr and
# "noxsave clearcpuid=308,141,151,297,580 reboot=k".
# Run it on an otherwise idle machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS=${1:-5}
BIN=${MINIVMM_BIN:-$ROOT/target/release/minivmm}
KERNEL=${MINIVMM_KERNEL:-$ROOT/guest-images/out/vmlinux}
INITRD=${MINIVMM_INITRD:-$ROOT/guest-images/out/initramfs.cpio}
QEMU=${QEMU:-qemu-system-x86_64}
MEM=128
SMP=2
WORKLOAD="workload.mem=16 workload.rate=16"
PVM_SWITCHES="noxsave clearcpuid=308,141,151,297,580 reboot=k"

for f in "$BIN" "$KERNEL" "$INITRD"; do
    [ -e "$f" ] || { echo "boot.sh: $f missing: run ./setup.sh --no-demo" >&2; exit 1; }
done

json_argv() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$@"; }

CONFIGS=()
CONFIGS+=("minivmm=$(json_argv "$BIN" -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=ttyS0 $WORKLOAD" -m "$MEM" -smp "$SMP" -serial stdio -display none)")
if command -v "$QEMU" >/dev/null; then
    QCOMMON=(-accel kvm -cpu qemu64,-cx16,+xsaveerptr -m "$MEM" -smp "$SMP"
             -nodefaults -no-user-config -display none -serial stdio -no-reboot
             -kernel "$KERNEL" -initrd "$INITRD"
             -append "console=ttyS0 $PVM_SWITCHES $WORKLOAD")
    CONFIGS+=("qemu -M microvm=$(json_argv "$QEMU" -M microvm -device i8042 "${QCOMMON[@]}")")
    CONFIGS+=("qemu -M pc=$(json_argv "$QEMU" -M pc "${QCOMMON[@]}")")
else
    echo "boot.sh: $QEMU not installed (./setup.sh installs qemu-system-x86): minivmm only" >&2
fi

echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)," \
     "kvm: $(ls -d /sys/module/kvm_pvm >/dev/null 2>&1 && echo kvm_pvm || echo kvm)" >&2
echo "# $("$BIN" --version), $("$QEMU" --version 2>/dev/null | head -n1 || echo 'no QEMU')" >&2
python3 "$ROOT/bench/boot.py" --runs "$RUNS" --mem-mib "$MEM" "${CONFIGS[@]}"

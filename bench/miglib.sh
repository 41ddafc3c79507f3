# Shared by bench/migrate.sh, postcopy.sh and colo.sh (sourced, not run):
# the paths and VMMs from the environment, the checks, the machine header,
# and a launcher for the Python side.
#
#   NAME=migrate.sh; source "$(dirname "${BASH_SOURCE[0]}")/miglib.sh"
#   run_py migrate.py --runs 3 ...    # adds --vmms, --minivmm, --qemu, --kernel, --initrd
#
# Environment: MINIVMM_BIN, MINIVMM_KERNEL, MINIVMM_INITRD, QEMU,
# BENCH_VMMS (default minivmm,qemu; qemu is dropped when not installed).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN=${MINIVMM_BIN:-$ROOT/target/release/minivmm}
KERNEL=${MINIVMM_KERNEL:-$ROOT/guest-images/out/vmlinux}
INITRD=${MINIVMM_INITRD:-$ROOT/guest-images/out/initramfs.cpio}
QEMU=${QEMU:-qemu-system-x86_64}
VMMS=${BENCH_VMMS:-minivmm,qemu}

for f in "$BIN" "$KERNEL" "$INITRD"; do
    [ -e "$f" ] || { echo "$NAME: $f missing: run ./setup.sh --no-demo" >&2; exit 1; }
done
if [[ ",$VMMS," == *,qemu,* ]] && ! command -v "$QEMU" >/dev/null; then
    echo "$NAME: $QEMU not installed (./setup.sh installs qemu-system-x86): minivmm only" >&2
    VMMS=minivmm
fi

echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)," \
     "kvm: $(ls -d /sys/module/kvm_pvm >/dev/null 2>&1 && echo kvm_pvm || echo kvm)" >&2
echo "# $("$BIN" --version | head -n1) ($(stat -c %y "$BIN" | cut -d. -f1)), $("$QEMU" --version 2>/dev/null | head -n1 || echo 'no QEMU')" >&2

# Run bench/SCRIPT with ARGS and the common options; returns its status.
# The helper kills its VMs on exit and they die with it (PDEATHSIG); the
# trap covers the helper itself.
PY=
trap 'rc=$?; [ -z "$PY" ] || kill "$PY" 2>/dev/null || true; exit $rc' EXIT
trap 'exit 130' INT TERM
run_py() {
    local script=$1
    shift
    python3 "$ROOT/bench/$script" "$@" --vmms "$VMMS" \
        --minivmm "$BIN" --qemu "$QEMU" --kernel "$KERNEL" --initrd "$INITRD" &
    PY=$!
    wait "$PY"
}

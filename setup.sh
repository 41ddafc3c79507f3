#!/usr/bin/env bash
# Set up a fresh machine for minivmm and run the main job.
#
#   ./setup.sh            install what is missing, build everything, then run
#                         the demo: boot a guest and migrate it live between
#                         two minivmm processes (scripts/demo.sh)
#   ./setup.sh --no-demo  the same without the demo (test.sh and .ci/run use this)
#
# Steps, each skipped when already done (a second run takes seconds):
#   1. apt packages (apt-get update only when one is missing)
#   2. .venv/ with PyPI's qemu.qmp (qmp-shell, used by the tests)
#   3. guest-images/build.sh (tiny kernel, cached under ~/.cache/minivmm)
#   4. cargo build --release (the minivmm binary: target/release/minivmm)
#   5. scripts/demo.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

DEMO=1
for a in "$@"; do
    case "$a" in
        --no-demo) DEMO=0 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup.sh: unknown argument '$a' (see --help)" >&2; exit 2 ;;
    esac
done

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# Packages the project needs on the host:
#   build-essential            cc/ld for build scripts and the guest kernel
#   libclang-dev               bindgen in userfaultfd-sys
#   socat                      raw QMP from the shell (tests, demo, README)
#   python3 python3-venv       the .venv with qemu.qmp (qmp-shell)
#   qemu-system-x86            QEMU side of the benchmarks
#   iproute2                   ss: bytes per COLO checkpoint (bench/colo.sh)
#   openssl                    TLS credentials for migrations (tools/tls-certs.sh, tests)
#   gdb                        backtraces of a VMM that stops answering (tests' diagnostics)
# guest-images/build.sh installs its own (linux-source-6.1, busybox-static, ...).
APT_PACKAGES=(build-essential libclang-dev socat python3 python3-venv qemu-system-x86 iproute2 openssl gdb)

ensure_packages() {
    local missing=() p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "apt-get not found; install by hand: ${missing[*]}"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
        sudo=(sudo)
    fi
    log "installing: ${missing[*]}"
    "${sudo[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
}

ensure_rust() {
    command -v cargo >/dev/null ||
        die "cargo not found: install a Rust toolchain (1.80 or newer, e.g. with rustup)"
    if [ "${CI:-}" = true ] || [ "${MINIVMM_SETUP_LINT:-}" = 1 ]; then
        if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
            command -v rustup >/dev/null || die "cargo fmt/clippy missing and no rustup to add them"
            rustup component add rustfmt clippy
        fi
    fi
}

# qemu.qmp gives qmp-shell, the reference QMP client the tests drive minivmm with.
QEMU_QMP_REQ='qemu.qmp>=0.0.3,<0.1'
ensure_venv() {
    local venv="$ROOT/.venv"
    if [ -x "$venv/bin/qmp-shell" ] && "$venv/bin/python" -c 'import qemu.qmp' 2>/dev/null; then
        return 0
    fi
    # Debian's python3 (with python3-venv) rather than whatever is first on PATH.
    local py=/usr/bin/python3
    [ -x "$py" ] || py=$(command -v python3) || die "python3 not found"
    log "creating $venv with $QEMU_QMP_REQ"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install --quiet "$QEMU_QMP_REQ"
    [ -x "$venv/bin/qmp-shell" ] || die "qmp-shell missing after installing qemu.qmp"
}

ensure_packages "${APT_PACKAGES[@]}"
ensure_rust
ensure_venv
log "guest image: guest-images/build.sh"
"$ROOT/guest-images/build.sh"
log "cargo build --release"
cargo build --release --workspace
log "ready: target/release/minivmm, guest-images/out/, .venv/bin/qmp-shell"

if [ "$DEMO" = 1 ]; then
    log "demo: live migration of a running guest (scripts/demo.sh)"
    exec "$ROOT/scripts/demo.sh"
fi

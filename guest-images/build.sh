#!/usr/bin/env bash
# Build the minivmm guest image: a tiny Linux kernel and two initramfs images.
#
#   guest-images/out/vmlinux                 uncompressed ELF kernel (64-bit boot
#                                            protocol entry = e_entry, PVH note)
#   guest-images/out/bzImage                 the same kernel, bzImage (real hosts)
#   guest-images/out/initramfs.cpio          /init = guest-workload, nothing else
#   guest-images/out/initramfs-busybox.cpio  busybox shell + /bin/workload
#   guest-images/out/guest-workload          the workload binary itself
#   guest-images/out/System.map, kernel.config
#
# The kernel build is cached outside the clone, under
# ${XDG_CACHE_HOME:-$HOME/.cache}/minivmm/kernel-<sha256>/, keyed by the
# config fragment, the patch, the linux-source package version, the compiler
# version and the kernel-build code of this script: a second run (or another
# clone) does not rebuild it. Idempotent; runs from any directory.
#
# Environment:
#   MINIVMM_KEEP_KERNEL_TREE=1  keep the kernel build tree in the cache
#   MINIVMM_FORCE_KERNEL=1      rebuild the kernel even if cached
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/out"
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/minivmm"
LINUX_PKG=linux-source-6.1
LINUX_TARBALL=/usr/src/linux-source-6.1.tar.xz
KERNEL_FRAGMENT="$HERE/kernel.config"
KERNEL_PATCH="$HERE/kernel.patch"

log() { printf '[guest-images] %s\n' "$*" >&2; }
die() { printf '[guest-images] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# Host packages (apt-get only for what is missing)
# ---------------------------------------------------------------------------
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing: ${missing[*]}"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
}

# ---------------------------------------------------------------------------
# Kernel (cached). Everything the kernel build does lives in the functions
# below; their text is part of the cache key.
# ---------------------------------------------------------------------------

# Check that every line of the config fragment holds in .config: tinyconfig
# dependencies can silently drop options.
verify_kernel_config() {
    local fragment=$1 config=$2 line opt bad=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*)
                if ! grep -qxF -- "$line" "$config"; then
                    log "config: want $line, have: $(grep -E "^(# )?${line%%=*}[= ]" "$config" || echo 'absent')"
                    bad=1
                fi ;;
            "# CONFIG_"*" is not set")
                opt=${line#\# }; opt=${opt%% *}
                if grep -q "^$opt=" "$config"; then
                    log "config: want $opt off, have: $(grep "^$opt=" "$config")"
                    bad=1
                fi ;;
        esac
    done < "$fragment"
    return $bad
}

# build_kernel TREE_PARENT RESULT_DIR: unpack, patch, configure, build; put
# vmlinux, bzImage, System.map, kernel.config and gen_init_cpio in RESULT_DIR.
build_kernel() {
    local work=$1 result=$2 src
    rm -rf "$work"
    mkdir -p "$work" "$result"
    log "unpacking $LINUX_TARBALL"
    tar -xJf "$LINUX_TARBALL" -C "$work"
    src="$work/linux-source-6.1"
    [ -d "$src" ] || die "unexpected tarball layout in $LINUX_TARBALL"
    patch -d "$src" -p1 --forward --no-backup-if-mismatch < "$KERNEL_PATCH"

    local kmake=(make -C "$src" ARCH=x86_64
                 KBUILD_BUILD_USER=minivmm KBUILD_BUILD_HOST=minivmm
                 KBUILD_BUILD_TIMESTAMP="minivmm guest kernel")
    "${kmake[@]}" tinyconfig
    (cd "$src" && ./scripts/kconfig/merge_config.sh -m .config "$KERNEL_FRAGMENT")
    "${kmake[@]}" olddefconfig
    verify_kernel_config "$KERNEL_FRAGMENT" "$src/.config" \
        || die "kernel .config lacks options from $KERNEL_FRAGMENT (see above)"

    log "building kernel (make -j2 vmlinux bzImage)"
    "${kmake[@]}" -j2 vmlinux bzImage
    gcc -O2 -o "$result/gen_init_cpio" "$src/usr/gen_init_cpio.c"
    cp "$src/vmlinux" "$src/System.map" "$src/arch/x86/boot/bzImage" "$result/"
    cp "$src/.config" "$result/kernel.config"
}

kernel_cache_key() {
    {
        echo "minivmm guest kernel v1"
        cat "$KERNEL_FRAGMENT" "$KERNEL_PATCH"
        dpkg-query -W -f='${Package} ${Version}\n' "$LINUX_PKG"
        gcc --version | head -n1
        declare -f verify_kernel_config build_kernel
    } | sha256sum | cut -d' ' -f1
}

# Sets KERNEL_DIR to the cached build, building it first if needed.
ensure_kernel() {
    local key final work
    key=$(kernel_cache_key)
    final="$CACHE_ROOT/kernel-$key"
    KERNEL_DIR=$final
    mkdir -p "$CACHE_ROOT"
    # one builder per key; a second run waits and then finds the result
    exec 9>"$final.lock"
    flock 9
    if [ -f "$final/.complete" ] && [ "${MINIVMM_FORCE_KERNEL:-0}" != 1 ]; then
        log "kernel: cached in $final"
        exec 9>&-
        return 0
    fi
    work="$final.build"
    rm -rf "$final"
    local t0=$SECONDS
    build_kernel "$work" "$final.tmp"
    if [ "${MINIVMM_KEEP_KERNEL_TREE:-0}" = 1 ]; then
        mv "$work" "$final.tmp/tree"
    else
        rm -rf "$work"
    fi
    touch "$final.tmp/.complete"
    mv "$final.tmp" "$final"
    exec 9>&-
    log "kernel: built in $((SECONDS - t0)) s, cached in $final"
}

# ---------------------------------------------------------------------------
# Workload (cargo, standalone crate in guest-images/workload)
# ---------------------------------------------------------------------------
build_workload() {
    if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
        PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null || die "cargo not found: install Rust (rustup, target x86_64-unknown-linux-gnu)"
    # cargo reads .cargo/config.toml from the working directory
    (cd "$HERE/workload" && cargo build --release --locked)
    WORKLOAD_BIN="$HERE/workload/target/x86_64-unknown-linux-gnu/release/guest-workload"
    [ -x "$WORKLOAD_BIN" ] || die "workload binary missing: $WORKLOAD_BIN"
}

# ---------------------------------------------------------------------------
# initramfs images (uncompressed newc cpio, made by the kernel's gen_init_cpio)
# ---------------------------------------------------------------------------

# install_if_changed NEW DEST [MODE]: replace DEST by NEW only if they differ
# (keeps mtimes of unchanged outputs).
install_if_changed() {
    if cmp -s "$1" "$2"; then rm -f "$1"; else mv -f "$1" "$2"; fi
    [ -z "${3:-}" ] || chmod "$3" "$2"
}

# Applets linked in the busybox image (only those busybox has are used).
# Others: `busybox APPLET ...` or `busybox --install -s` at the prompt.
BUSYBOX_APPLETS="sh ash cat cp cttyhack cut date dd df dmesg du echo env false
find free grep head hexdump kill ln ls md5sum mkdir mount mv nproc od poweroff
printf ps reboot rm seq setsid sha256sum sleep sort stat stty sync tail tee test
time top touch tr true umount uname uptime vi watch wc xargs"

make_initramfs() {
    local gen="$KERNEL_DIR/gen_init_cpio" list tmp a
    list=$(mktemp)
    tmp=$(mktemp -p "$OUT")
    TMPFILES+=("$list" "$tmp")

    # 1. workload only
    cat > "$list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0755 0 0
dir /sys 0755 0 0
file /init $WORKLOAD_BIN 0755 0 0
EOF
    "$gen" -t 0 "$list" > "$tmp"
    install_if_changed "$tmp" "$OUT/initramfs.cpio" 0644

    # 2. busybox shell + workload
    local bb=/bin/busybox have
    [ -x "$bb" ] || die "$bb missing (package busybox-static)"
    have=" $("$bb" --list | tr '\n' ' ') "
    cat > "$list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /tmp 01777 0 0
dir /root 0700 0 0
dir /bin 0755 0 0
dir /sbin 0755 0 0
file /bin/busybox $bb 0755 0 0
file /bin/workload $WORKLOAD_BIN 0755 0 0
file /init $HERE/busybox-init.sh 0755 0 0
EOF
    for a in $BUSYBOX_APPLETS; do
        case "$have" in *" $a "*) echo "slink /bin/$a busybox 0777 0 0" >> "$list" ;; esac
    done
    "$gen" -t 0 "$list" > "$tmp"
    install_if_changed "$tmp" "$OUT/initramfs-busybox.cpio" 0644
    rm -f "$list"
}

TMPFILES=()
cleanup() { [ ${#TMPFILES[@]} -eq 0 ] || rm -f "${TMPFILES[@]}"; }
trap cleanup EXIT

main() {
    ensure_packages "$LINUX_PKG" flex bison bc libelf-dev busybox-static cpio \
        gcc make libc6-dev xz-utils patch lz4
    mkdir -p "$OUT"

    ensure_kernel
    local f
    for f in vmlinux bzImage System.map kernel.config; do
        cp -p "$KERNEL_DIR/$f" "$OUT/$f.tmp"
        install_if_changed "$OUT/$f.tmp" "$OUT/$f"
    done

    build_workload
    cp -p "$WORKLOAD_BIN" "$OUT/guest-workload.tmp"
    install_if_changed "$OUT/guest-workload.tmp" "$OUT/guest-workload"

    make_initramfs

    log "done: $OUT"
    (cd "$OUT" && ls -l vmlinux bzImage initramfs.cpio initramfs-busybox.cpio guest-workload) >&2
}

main "$@"

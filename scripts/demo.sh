#!/usr/bin/env bash
# The main job: boot a guest in one minivmm, migrate it live (precopy over
# TCP) into a second minivmm while its workload keeps dirtying memory, and
# show that it runs on there with its memory intact.
#
# Prints both serial consoles and the source's final `query-migrate`.
# Exits non-zero if the migration fails, the destination does not continue
# the workload, or either guest prints CORRUPT.
#
# QMP is driven with plain socat, as a user would from a shell.
#
# Environment: MINIVMM_BIN, MINIVMM_KERNEL, MINIVMM_INITRD (defaults: the
# release binary and guest-images/out/{vmlinux,initramfs.cpio}),
# DEMO_MEM (workload MiB, default 32), DEMO_RATE (MiB/s, default 32).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN=${MINIVMM_BIN:-$ROOT/target/release/minivmm}
KERNEL=${MINIVMM_KERNEL:-$ROOT/guest-images/out/vmlinux}
INITRD=${MINIVMM_INITRD:-$ROOT/guest-images/out/initramfs.cpio}
MEM=${DEMO_MEM:-32}
RATE=${DEMO_RATE:-32}
BOOT_TIMEOUT=600   # seconds without new console output (see wait_serial)
MIG_TIMEOUT=180

for f in "$BIN" "$KERNEL" "$INITRD"; do
    [ -e "$f" ] || { echo "demo: $f is missing: run ./setup.sh --no-demo first" >&2; exit 1; }
done
command -v socat >/dev/null || { echo "demo: socat is missing: run ./setup.sh" >&2; exit 1; }

DIR=$(mktemp -d /tmp/minivmm-demo.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n=== %s\n' "$*"; }

# qmp SOCKET 'JSON command': negotiate, run one command, print its reply line.
qmp() {
    printf '{"execute": "qmp_capabilities"}\n%s\n' "$2" |
        socat -t 30 - "UNIX-CONNECT:$1" | grep -v '"event"' | tail -n 1
}
# jget EXPR: evaluate a Python expression on the JSON read from stdin (as j).
jget() { python3 -c "import json,sys; j=json.load(sys.stdin); print($1)"; }

# wait_serial FILE REGEX TIMEOUT PID: wait for a line matching REGEX. A
# guest still printing is not hung: TIMEOUT counts from the last new
# console output (the guest kernel runs in an emulator on some hosts, at a
# speed that differs between machines), up to WAIT_CAP seconds in all.
WAIT_CAP=1800
wait_serial() {
    local file=$1 re=$2 timeout=$3 pid=$4
    local start=$SECONDS end=$((SECONDS + $3)) size=-1 now
    until grep -qE "$re" "$file" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "demo: minivmm (pid $pid) exited while waiting for /$re/" >&2
            return 1
        fi
        now=$(stat -c %s "$file" 2>/dev/null || echo 0)
        if [ "$now" != "$size" ]; then
            size=$now
            end=$((SECONDS + timeout))
        fi
        if [ $SECONDS -ge $end ] || [ $((SECONDS - start)) -ge $WAIT_CAP ]; then
            echo "demo: no /$re/ in $file after $((SECONDS - start)) s (no new output for ${timeout} s, or ${WAIT_CAP} s in all)" >&2
            return 1
        fi
        sleep 0.2
    done
}
last_pass() { grep -oE 'PASS [0-9]+' "$1" | tail -n 1 | cut -d' ' -f2; }

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
APPEND="console=ttyS0 workload.mem=$MEM workload.rate=$RATE"
COMMON=(-kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND" -m 256M -smp 2 -display none)

say "source: minivmm ${COMMON[*]}"
"$BIN" "${COMMON[@]}" -name src -serial "file:$DIR/src.serial" \
    -qmp "unix:$DIR/src.qmp,server=on,wait=off" </dev/null >"$DIR/src.log" 2>&1 &
SRC=$!
PIDS+=("$SRC")
START=$SECONDS
wait_serial "$DIR/src.serial" 'GUEST-READY' "$BOOT_TIMEOUT" "$SRC"
echo "guest booted in $((SECONDS - START)) s; waiting for the workload's warm-up pass"
wait_serial "$DIR/src.serial" 'PASS 2 ' "$BOOT_TIMEOUT" "$SRC"

say "destination: minivmm ... -incoming tcp:127.0.0.1:$PORT"
"$BIN" "${COMMON[@]}" -name dst -serial "file:$DIR/dst.serial" \
    -qmp "unix:$DIR/dst.qmp,server=on,wait=off" -incoming "tcp:127.0.0.1:$PORT" \
    </dev/null >"$DIR/dst.log" 2>&1 &
DST=$!
PIDS+=("$DST")
end=$((SECONDS + 30))
until [ -S "$DIR/dst.qmp" ]; do
    kill -0 "$DST" 2>/dev/null || { cat "$DIR/dst.log" >&2; exit 1; }
    [ $SECONDS -lt $end ] || { echo "demo: destination QMP never came up" >&2; exit 1; }
    sleep 0.1
done
echo "destination: $(qmp "$DIR/dst.qmp" '{"execute": "query-status"}')"

say "migrate (source is at PASS $(last_pass "$DIR/src.serial"), dirtying $RATE MiB/s of $MEM MiB)"
qmp "$DIR/src.qmp" '{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 100}}' >/dev/null
qmp "$DIR/src.qmp" "{\"execute\": \"migrate\", \"arguments\": {\"uri\": \"tcp:127.0.0.1:$PORT\"}}"
end=$((SECONDS + MIG_TIMEOUT))
while :; do
    R=$(qmp "$DIR/src.qmp" '{"execute": "query-migrate"}')
    STATUS=$(echo "$R" | jget 'j["return"].get("status", "none")')
    case "$STATUS" in
        completed|failed|cancelled) break ;;
    esac
    [ $SECONDS -lt $end ] || { echo "demo: migration still '$STATUS' after ${MIG_TIMEOUT}s" >&2; break; }
    sleep 0.5
done

say "query-migrate on the source"
echo "$R" | python3 -m json.tool
SRC_STATE=$(qmp "$DIR/src.qmp" '{"execute": "query-status"}' | jget 'j["return"]["status"]')
echo "source run state: $SRC_STATE"

ok=1
if [ "$STATUS" = completed ]; then
    # The destination goes on with the source's workload: more PASS lines.
    SRC_LAST=$(last_pass "$DIR/src.serial")
    want=$((SRC_LAST + 3))
    if wait_serial "$DIR/dst.serial" "PASS $want " 120 "$DST"; then
        DST_STATE=$(qmp "$DIR/dst.qmp" '{"execute": "query-status"}' | jget 'j["return"]["status"]')
        echo "destination run state: $DST_STATE, workload at PASS $(last_pass "$DIR/dst.serial") (source stopped at PASS $SRC_LAST)"
        [ "$DST_STATE" = running ] || ok=0
    else
        ok=0
    fi
    [ "$SRC_STATE" = postmigrate ] || ok=0
else
    echo "demo: migration $STATUS" >&2
    ok=0
fi

say "source serial console"
cat "$DIR/src.serial"
say "destination serial console (continues where the source stopped)"
cat "$DIR/dst.serial"
for side in src dst; do
    if [ -s "$DIR/$side.log" ]; then
        say "$side minivmm stderr"
        cat "$DIR/$side.log"
    fi
done

if grep -h CORRUPT "$DIR/src.serial" "$DIR/dst.serial"; then
    echo "demo: the guest found corrupted memory" >&2
    ok=0
fi
if [ "$ok" = 1 ]; then
    say "OK: live migration completed, the guest runs on in the destination, no corruption"
    exit 0
fi
say "FAILED"
exit 1

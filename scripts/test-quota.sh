#!/usr/bin/env bash
# Run ./test.sh with every minivmm process held to a fraction of one CPU: a
# slow machine on purpose. Each minivmm the tests start runs in a cgroup of
# its own with a CPU quota (cgroup v2 `cpu.max`, or v1
# `cpu.cfs_quota_us`), so its guest and its migration threads together get
# at most PERCENT of a CPU; the test runner, cargo and the clients are not
# limited. The suite's calibration boot runs under the same quota, so its
# time limits stretch accordingly (tests/src/calibrate.rs).
#
#   scripts/test-quota.sh                  quarter of a CPU (25 %), all tests
#   scripts/test-quota.sh --percent 50     another quota
#   scripts/test-quota.sh -- -p tests --test boot   arguments after -- go to test.sh
#
# Real-time threads (SCHED_FIFO) would escape a CFS quota: in a cgroup v1
# child the real-time budget is 0, so minivmm's attempt to use the class
# fails and those threads run as the others do (as they do without
# privilege); under cgroup v2 the quota applies to them too. Needs root.
# Every cgroup made is removed at the end, pass or fail.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PERCENT=25
while [ $# -gt 0 ]; do
    case "$1" in
        --percent) PERCENT="$2"; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "test-quota.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$PERCENT" in
    ''|*[!0-9]*) echo "test-quota.sh: --percent wants a whole number" >&2; exit 2 ;;
esac
[ "$PERCENT" -ge 1 ] && [ "$PERCENT" -le 100 ] ||
    { echo "test-quota.sh: --percent must be 1-100" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "test-quota.sh: needs root (cgroups)" >&2; exit 1; }

PERIOD=100000
QUOTA=$((PERIOD * PERCENT / 100))

# Where the CPU controller is: the v2 hierarchy when it has `cpu`, else v1.
CG_ROOT="" CG_VER=""
for d in /sys/fs/cgroup /sys/fs/cgroup/unified; do
    if [ -f "$d/cgroup.controllers" ] && grep -qw cpu "$d/cgroup.controllers"; then
        CG_ROOT=$d CG_VER=2
        break
    fi
done
if [ -z "$CG_ROOT" ]; then
    for d in /sys/fs/cgroup/cpu /sys/fs/cgroup/cpu,cpuacct; do
        if [ -f "$d/cpu.cfs_quota_us" ]; then
            CG_ROOT=$d CG_VER=1
            break
        fi
    done
fi
[ -n "$CG_ROOT" ] || { echo "test-quota.sh: no cgroup with the cpu controller found" >&2; exit 1; }

PARENT="$CG_ROOT/minivmm-quota-$$"
WRAPDIR="$(mktemp -d /tmp/minivmm-quota.XXXXXX)"
TEST_PID=
cleanup() {
    local rc=$?
    local d
    # The test run (its own process group: test.sh, cargo, the test
    # binaries and their VMMs) goes first.
    if [ -n "$TEST_PID" ] && kill -0 "$TEST_PID" 2>/dev/null; then
        kill -TERM -- "-$TEST_PID" 2>/dev/null || true
        sleep 2
        kill -KILL -- "-$TEST_PID" 2>/dev/null || true
    fi
    # Whatever is still inside (nothing, normally: the harness kills its
    # processes) goes, then the cgroups.
    for d in "$PARENT"/vmm-*; do
        [ -d "$d" ] || continue
        if [ -s "$d/cgroup.procs" ]; then
            xargs -r kill -9 <"$d/cgroup.procs" 2>/dev/null || true
            sleep 0.2
        fi
        rmdir "$d" 2>/dev/null || true
    done
    rmdir "$PARENT" 2>/dev/null || echo "test-quota.sh: could not remove $PARENT" >&2
    rm -rf "$WRAPDIR"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir "$PARENT"
if [ "$CG_VER" = 2 ]; then
    echo +cpu >"$CG_ROOT/cgroup.subtree_control" 2>/dev/null || true
    echo +cpu >"$PARENT/cgroup.subtree_control"
fi

# The wrapper the harness starts instead of minivmm (MINIVMM_BIN): it moves
# itself into a fresh cgroup with the quota and becomes minivmm.
cat >"$WRAPDIR/minivmm" <<EOF
#!/bin/sh
cg="$PARENT/vmm-\$\$"
mkdir "\$cg" || exit 125
if [ "$CG_VER" = 2 ]; then
    echo "$QUOTA $PERIOD" >"\$cg/cpu.max" || exit 125
else
    echo $PERIOD >"\$cg/cpu.cfs_period_us" && echo $QUOTA >"\$cg/cpu.cfs_quota_us" || exit 125
fi
echo \$\$ >"\$cg/cgroup.procs" || exit 125
exec "$ROOT/target/release/minivmm" "\$@"
EOF
chmod +x "$WRAPDIR/minivmm"

echo "test-quota.sh: every minivmm held to $PERCENT % of a CPU (cgroup v$CG_VER, $PARENT)"
start=$SECONDS
MINIVMM_BIN="$WRAPDIR/minivmm" setsid "$ROOT/test.sh" "$@" &
TEST_PID=$!
wait "$TEST_PID"
TEST_PID=
echo "test-quota.sh: passed in $((SECONDS - start)) s with every minivmm at $PERCENT % of a CPU"

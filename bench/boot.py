#!/usr/bin/env python3
"""Boot-time benchmark: process start to the guest's GUEST-READY line.

Used by bench/boot.sh (see there). For each VMM configuration: RUNS timed
boots (median, min, max), then, if perf works, one more boot under
`perf stat -e kvm:kvm_exit,...` for the number of VM exits up to
GUEST-READY. At GUEST-READY of every run the VMM's memory is read from
/proc/PID/smaps: total RSS, and RSS outside the guest-RAM mapping (the
VMM's own memory: RSS minus guest pages touched).
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

GIB = 1 << 30
MIB = 1 << 20


def smaps_rss(pid, guest_bytes):
    """(total RSS, RSS of the guest-RAM mapping(s)) in bytes."""
    total = guest = 0
    size = 0
    anon_map = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if not parts[0].endswith(":") or "-" in parts[0]:
                # Mapping header: "start-end perms offset dev inode [path]".
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                size = hi - lo
                anon_map = len(parts) < 6
                continue
            if parts[0] == "Rss:":
                rss = int(parts[1]) * 1024
                total += rss
                # Guest RAM: an anonymous mapping the size of the guest's RAM
                # (QEMU adds up to a few MiB of alignment).
                if anon_map and guest_bytes <= size <= guest_bytes + 4 * MIB:
                    guest += rss
    return total, guest


def vmm_pid(proc, under_perf):
    """The VMM's pid (perf's child when run under perf)."""
    if not under_perf:
        return proc.pid
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError("perf did not start the VMM")


def one_boot(cmd, guest_bytes, timeout, perf_out=None):
    under_perf = perf_out is not None
    if under_perf:
        cmd = ["perf", "stat", "-x", ",", "-o", perf_out,
               "-e", "kvm:kvm_exit,kvm:kvm_userspace_exit,kvm:kvm_pio,kvm:kvm_mmio",
               "--"] + cmd
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        pid = vmm_pid(proc, under_perf)
        deadline = t0 + timeout
        line = b""
        for line in iter(proc.stdout.readline, b""):
            if b"GUEST-READY" in line:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no GUEST-READY within {timeout}s: {' '.join(cmd)}")
        else:
            raise RuntimeError(f"exited before GUEST-READY ({proc.wait()}): {' '.join(cmd)}")
        elapsed = time.monotonic() - t0
        rss, guest = smaps_rss(pid, guest_bytes)
        ready = line.decode(errors="replace").strip()
        os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=30)
        return elapsed, rss, guest, ready
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def perf_counts(path):
    counts = {}
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) >= 3 and parts[2].startswith("kvm:"):
                try:
                    counts[parts[2]] = int(parts[0])
                except ValueError:
                    counts[parts[2]] = None
    return counts


def perf_works():
    try:
        r = subprocess.run(["perf", "stat", "-e", "kvm:kvm_exit", "true"],
                           capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mem-mib", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("configs", nargs="+", help="NAME=JSON-ARGV")
    a = ap.parse_args()
    guest_bytes = a.mem_mib * MIB
    use_perf = perf_works()
    results = []
    for spec in a.configs:
        name, argv = spec.split("=", 1)
        cmd = json.loads(argv)
        times, rss, own = [], [], []
        ready = ""
        for i in range(a.runs):
            t, r, g, ready = one_boot(cmd, guest_bytes, a.timeout)
            times.append(t)
            rss.append(r)
            own.append(r - g)
            print(f"  {name} run {i + 1}: {t:.2f} s  RSS {r / MIB:.1f} MiB"
                  f" (VMM's own {(r - g) / MIB:.1f} MiB)  [{ready}]", file=sys.stderr)
        exits = None
        if use_perf:
            out = f"/tmp/boot-bench-perf-{os.getpid()}.txt"
            try:
                one_boot(cmd, guest_bytes, a.timeout, perf_out=out)
                exits = perf_counts(out)
            finally:
                if os.path.exists(out):
                    os.unlink(out)
            print(f"  {name} exits: {exits}", file=sys.stderr)
        res = {
            "name": name,
            "cmd": cmd,
            "runs": a.runs,
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "rss_mib": statistics.median(rss) / MIB,
            "own_rss_mib": statistics.median(own) / MIB,
            "ready_line": ready,
            "exits": exits,
        }
        results.append(res)
    print()
    print("| VMM | median boot to GUEST-READY | min-max | RSS at GUEST-READY | RSS minus guest RAM"
          " | exits to userspace | PIO exits | MMIO exits | kvm:kvm_exit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        e = r["exits"] or {}
        g = lambda k: str(e.get(k, "n/a"))
        print(f"| {r['name']} | {r['median_s']:.2f} s | {r['min_s']:.2f}-{r['max_s']:.2f} s"
              f" | {r['rss_mib']:.1f} MiB | {r['own_rss_mib']:.1f} MiB"
              f" | {g('kvm:kvm_userspace_exit')} | {g('kvm:kvm_pio')} | {g('kvm:kvm_mmio')}"
              f" | {g('kvm:kvm_exit')} |")
    if not use_perf:
        print("\n(VM exits: perf cannot count kvm:* tracepoints here)")
    elif all((r["exits"] or {}).get("kvm:kvm_exit") == 0 for r in results):
        print("\n(kvm:kvm_exit stays 0: this host's KVM does not emit it; exits to userspace,"
              " PIO and MMIO are counted by their own tracepoints)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

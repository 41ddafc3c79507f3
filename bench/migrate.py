#!/usr/bin/env python3
"""Precopy live-migration benchmark (used by bench/migrate.sh, see there).

Scenarios (--scenarios, comma-separated):
  idle1g   1 GiB guest, workload of 4 MiB at 1 MiB/s (near idle)
  idle4g   4 GiB guest (RAM across the 32-bit hole), same workload
  dirty64  256 MiB guest whose workload rewrites 64 MiB at 100 MiB/s
  data512  1 GiB guest holding 512 MiB of workload data, rewritten at
           64 MiB/s: the stream is mostly page data (page throughput)
  data512s the same guest stopped (`stop`) before `migrate`: one pass of
           page data, nothing competes with it (the pipeline's own rate);
           the destination gets `cont` after completion
--dst-prealloc starts every destination with -mem-prealloc (both VMMs), so
the destination writes into memory the host already backs.
--tls migrates over TLS: credentials made once (tools/tls-certs.sh, in the
run's temporary directory), `-object tls-creds-x509,id=tls0,...` on every
restored source (endpoint=client) and destination (endpoint=server), and
tls-creds=tls0 set on the destination before the source can connect (QEMU:
-incoming defer, then migrate-incoming) and on the source with the other
parameters right before `migrate` (never while saving or restoring over
file:/exec:, which refuse it). Snapshots are the same as without TLS.
For each VMM and scenario: boot once, save the guest after its first full
PASS, then RUNS times: restore a source from the save, let it run, start a
destination on tcp loopback, `migrate` with the same downtime-limit and
max-bandwidth in both VMMs, and read the source's query-migrate at
completion. The destination must then print two more PASS lines (a full
pass over every page written before the switch) with no CORRUPT on either
side. Before each run, one loopback TCP connection's rate (1 GiB): the
"of loopback" column is the run's page data rate over it (this host's
loopback rate moves by a third between minutes). At the end the machine's
own limits: loopback TCP and memcpy bandwidth.

--same-state PAGESTREAM (a build of bench/pagestream.c) adds, before each
run, two baselines taken in the state the migration runs in: a source and
destination started and settled exactly as for the run (source stopped
when the scenario stops it), then torn down without migrating; with them
up, once the loopback connection (1 GiB), once PAGESTREAM (the simplest
page stream: 8-byte header and 4 KiB per page, no CRC). The table then
also gives the run's page data rate over each of these.
"""

import argparse
import json
import os
import tempfile
import time

from miglib import (mig_uri, MIB, Guest, add_tls_arg, common_args, fmt, log, machine_note,
                    make_snapshot, median, source_and_destination, tcp_counters, tcp_delta,
                    tls_credentials, tls_endpoints, tls_label, tls_params)


def endpoints(prealloc, tls_dir):
    """source_and_destination's options for a run (and its baselines)."""
    return tls_endpoints(tls_dir, dst_extra=["-mem-prealloc"] if prealloc else [])


def one_run(g, snap, wd, downtime_limit, verify, max_bandwidth=0, stopped=False, prealloc=False,
            tls_dir=None):
    with source_and_destination(g, snap, wd, **endpoints(prealloc, tls_dir)) as (src, dst, port):
        dq = dst.qmp
        sq = src.qmp
        sq.cmd("migrate-set-capabilities",
               {"capabilities": [{"capability": "events", "state": True}]})
        params = {"downtime-limit": downtime_limit}
        if max_bandwidth:
            params["max-bandwidth"] = max_bandwidth
        params.update(tls_params(tls_dir))
        sq.cmd("migrate-set-parameters", params)
        if stopped:
            sq.cmd("stop")
        tcp0 = tcp_counters()
        sq.cmd("migrate", {"uri": mig_uri(port)})
        r = sq.wait_status(("completed", "failed", "cancelled"), 300)
        tcp = tcp_delta(tcp0)
        res = {
            "status": r.get("status"),
            "total_ms": r.get("total-time"),
            "downtime_ms": r.get("downtime"),
            "setup_ms": r.get("setup-time"),
            "transferred_mib": r.get("ram", {}).get("transferred", 0) / MIB,
            "normal_mib": r.get("ram", {}).get("normal-bytes", 0) / MIB,
            "syncs": r.get("ram", {}).get("dirty-sync-count"),
            "error": r.get("error-desc"),
            "corrupt": [],
            "verified": False,
            "tcp": tcp,
            "tls_creds": sq.cmd("query-migrate-parameters").get("tls-creds"),
        }
        if r.get("status") == "completed":
            dr = dq.wait_status(("completed", "failed"), 120)
            if dr.get("status") != "completed":
                res["error"] = f"destination: {dr}"
            elif verify:
                if stopped:
                    dq.cmd("cont")
                last = src.last_pass()
                interval = g.wl_mem / g.rate if g.rate else 1.0
                dst.wait_pass_beyond(last + 1, 3 * interval + 30)
                res["verified"] = True
        else:
            log(f"    {g.kind}: migration {r.get('status')}: {json.dumps(r)}")
        res["corrupt"] = src.corrupt() + (dst.corrupt() if dst else [])
        return res


SCENARIOS = {
    # name: (label, guest MiB, workload MiB, workload MiB/s, source stopped)
    "idle1g": ("idle 1 GiB", 1024, 4, 1, False),
    "idle4g": ("idle 4 GiB", 4096, 4, 1, False),
    "dirty64": ("64 MiB dirtied at 100 MiB/s", 256, 64, 100, False),
    "data512": ("1 GiB, 512 MiB of data rewritten at 64 MiB/s", 1024, 512, 64, False),
    "data512s": ("1 GiB, 512 MiB of data, source stopped", 1024, 512, 64, True),
}


def loopback_tcp_mib_s(total=2 << 30, chunk=4 << 20):
    """Bytes/s through one loopback TCP connection (sender and receiver in
    two threads, 4 MiB buffers: little Python overhead per byte)."""
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    got = [0]

    def rx():
        c, _ = srv.accept()
        buf = bytearray(chunk)
        mv = memoryview(buf)
        while True:
            n = c.recv_into(mv)
            if n == 0:
                break
            got[0] += n
        c.close()

    t = threading.Thread(target=rx)
    t.start()
    s = socket.create_connection(("127.0.0.1", port))
    data = memoryview(bytes(chunk))
    t0 = time.monotonic()
    for _ in range(total // chunk):
        s.sendall(data)
    s.close()
    t.join()
    dt = time.monotonic() - t0
    srv.close()
    return got[0] / dt / MIB


def memcpy_mib_s(size=256 << 20, reps=8):
    """Bytes/s of one large copy (CPython's slice assignment is a memcpy)."""
    a = bytearray(b"\x5a" * size)
    b = bytearray(size)
    b[:] = a  # fault both in
    t0 = time.monotonic()
    for _ in range(reps):
        b[:] = a
    return size * reps / (time.monotonic() - t0) / MIB


def fresh_write_mib_s(size=512 << 20):
    """Bytes/s of one copy into memory just mapped (every page takes its
    first-touch fault and clear: what a destination without -mem-prealloc
    does for each page it receives)."""
    import mmap
    a = b"\x5a" * size
    m = mmap.mmap(-1, size)
    t0 = time.monotonic()
    m[:] = a
    dt = time.monotonic() - t0
    m.close()
    return size / dt / MIB


def same_state_baseline(g, snap, wd, stopped, prealloc, measure, tls_dir=None):
    """`measure()` with a source and destination up and settled as for a
    run, nothing migrated: the host's memory and caches as the migration
    finds them."""
    with source_and_destination(g, snap, wd, **endpoints(prealloc, tls_dir)) as (src, dst, _port):
        dst.qmp
        if stopped:
            src.qmp.cmd("stop")
        return measure()


def pagestream_mib_s(binary, mib=512):
    import subprocess
    out = subprocess.run([binary, str(mib)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scenarios", default="idle1g,idle4g,dirty64")
    ap.add_argument("--downtime-limit", type=int, default=300)
    ap.add_argument("--max-bandwidth", type=int, default=0, help="B/s; 0: the VMMs' default")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--snapshot-dir", help="keep the booted guests' snapshots here and reuse"
                    " them (named by VMM build and guest)")
    ap.add_argument("--same-state", metavar="PAGESTREAM",
                    help="also measure loopback and PAGESTREAM with the VMs up (see above)")
    ap.add_argument("--dst-prealloc", action="store_true",
                    help="start destinations with -mem-prealloc")
    add_tls_arg(ap)
    common_args(ap)
    a = ap.parse_args()
    quiet = machine_note()
    rows = []
    with tempfile.TemporaryDirectory(prefix="migrate-bench-") as wd:
        tls_dir = tls_credentials(wd, a.tls)
        for name in a.scenarios.split(","):
            label, mem, wl_mem, rate, stopped = SCENARIOS[name]
            for kind in a.vmms.split(","):
                g = Guest(kind, a.minivmm, a.qemu, a.kernel, a.initrd, rate, mem=mem,
                          wl_mem=wl_mem)
                # One snapshot per VMM build and guest, shared by the
                # scenarios that boot the same guest (and, with
                # --snapshot-dir, by later runs of this script).
                stamp = (int(os.path.getmtime(a.minivmm)) if kind == "minivmm" else "qemu")
                snap = os.path.join(a.snapshot_dir or wd,
                                    f"{kind}-{mem}m-{wl_mem}m-{rate}-{stamp}.snap")
                if not os.path.exists(snap):
                    make_snapshot(g, snap, wd)
                runs = []
                for i in range(a.runs):
                    t0 = time.monotonic()
                    # This host's loopback rate swings by a third from one
                    # minute to the next: each run gets its own, measured
                    # just before it, to compare its page data rate with.
                    lb = loopback_tcp_mib_s(total=1 << 30)
                    same = {}
                    if a.same_state:
                        same["lb_same"] = same_state_baseline(
                            g, snap, wd, stopped, a.dst_prealloc,
                            lambda: loopback_tcp_mib_s(total=1 << 30), tls_dir)
                        same["ps_same"] = same_state_baseline(
                            g, snap, wd, stopped, a.dst_prealloc,
                            lambda: pagestream_mib_s(a.same_state), tls_dir)
                    r = one_run(g, snap, wd, a.downtime_limit, not a.no_verify, a.max_bandwidth,
                                stopped, a.dst_prealloc, tls_dir)
                    r["loopback_mib_s"] = lb
                    r.update(same)
                    runs.append(r)
                    log(f"  {kind} {name} run {i + 1}: {r['status']} total {r['total_ms']} ms"
                        f" downtime {r['downtime_ms']} ms setup {r['setup_ms']} ms"
                        f" {r['transferred_mib']:.1f} MiB ({r['normal_mib']:.1f} MiB pages)"
                        f" syncs {r['syncs']} loopback {lb:.0f} MiB/s"
                        + "".join(f" {k} {v:.0f} MiB/s" for k, v in same.items()) +
                        f" verified={r['verified']} corrupt={len(r['corrupt'])}"
                        f" tls-creds={r['tls_creds']!r}"
                        f" tcp {r['tcp']} ({time.monotonic() - t0:.0f} s)"
                        + (f" error: {r['error']}" if r['error'] else ""))
                    for c in r["corrupt"][:5]:
                        log(f"    {c}")
                rows.append((kind, label, runs))
    tcp = loopback_tcp_mib_s()
    mem = memcpy_mib_s()
    fresh = fresh_write_mib_s()
    quiet = machine_note() and quiet  # also quiet at the end?
    print()
    print("| VMM | guest | total-time | downtime | setup-time | transferred | of it page data"
          " | page data rate | of loopback"
          + (" | of loopback, VMs up | of page stream, VMs up" if a.same_state else "")
          + " | dirty syncs | runs completed | CORRUPT |")
    print("|---" * (14 if a.same_state else 12) + "|")
    for kind, label, runs in rows:
        ok = [r for r in runs if r["status"] == "completed"]
        rng = lambda k: (f" ({min(r[k] for r in ok)}-{max(r[k] for r in ok)})" if ok else "")
        timed = [r for r in ok if r["total_ms"] and r["total_ms"] > r["setup_ms"]]
        rate = [r["normal_mib"] / ((r["total_ms"] - r["setup_ms"]) / 1000.0) for r in timed]
        share = [100.0 * x / r["loopback_mib_s"] for x, r in zip(rate, timed)]
        share_rng = f" ({min(share):.0f}-{max(share):.0f})" if share else ""

        def of(key):
            xs = [100.0 * x / r[key] for x, r in zip(rate, timed) if r.get(key)]
            return f" | {fmt(median(xs), ' %')}" + (f" ({min(xs):.0f}-{max(xs):.0f})" if xs else "")
        print(f"| {kind}{tls_label(a.tls)} | {label}"
              f" | {fmt(median([r['total_ms'] for r in ok]), ' ms')}{rng('total_ms')}"
              f" | {fmt(median([r['downtime_ms'] for r in ok]), ' ms')}{rng('downtime_ms')}"
              f" | {fmt(median([r['setup_ms'] for r in ok]), ' ms')}"
              f" | {fmt(median([r['transferred_mib'] for r in ok]), ' MiB', 1)}"
              f" | {fmt(median([r['normal_mib'] for r in ok]), ' MiB', 1)}"
              f" | {fmt(median(rate), ' MiB/s')}"
              f" | {fmt(median(share), ' %')}{share_rng}"
              + (of("lb_same") + of("ps_same") if a.same_state else "") +
              f" | {fmt(median([r['syncs'] for r in ok]))}"
              f" | {len(ok)}/{len(runs)}"
              f" | {'yes: ' + str(sum(len(r['corrupt']) for r in runs)) + ' lines' if any(r['corrupt'] for r in runs) else 'no'}"
              f"{'' if all(r['verified'] for r in ok) else ' (not all verified)'} |")
    mb = a.max_bandwidth
    print(f"\n(median of {a.runs} runs, min-max in brackets; tcp loopback"
          f"{' over TLS (tls-creds-x509, tools/tls-certs.sh; tls-creds on both sides)' if a.tls else ''},"
          f" downtime-limit {a.downtime_limit} ms, max-bandwidth"
          f" {f'{mb} B/s' if mb else 'at its default (128 MiB/s in both)'};"
          f" page data rate = page bytes / (total-time - setup-time);"
          f" of loopback = that rate over one loopback TCP connection's, measured"
          f" (1 GiB) just before each run;"
          f" machine {'quiet' if quiet else 'NOT quiet, see stderr'})")
    print(f"\nmachine limits: loopback TCP {tcp:.0f} MiB/s (one connection, 4 MiB writes),"
          f" memcpy {mem:.0f} MiB/s (256 MiB copies),"
          f" copy into freshly mapped memory {fresh:.0f} MiB/s (512 MiB)")
    print(f"destinations {'with' if a.dst_prealloc else 'without'} -mem-prealloc")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"vmm": k, "guest": g, "tls": a.tls, "runs": rs} for k, g, rs in rows], f,
                      indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Postcopy benchmark (used by bench/postcopy.sh, see there).

The guest that never converges: workload.rate=0 (as fast as it can),
max-bandwidth 5 MB/s, downtime-limit 1 ms. Per VMM: boot once, save after
the first PASS; per run: restore a source, destination with postcopy-ram
(QEMU: also postcopy-blocktime), source with postcopy-ram and events,
`migrate`, `migrate-start-postcopy` at the source's MIGRATION_PASS 2 (or
after SWITCH_TIMEOUT s), then wait for completion on both sides and read
query-migrate there. The guest must then run two more PASSes on the
destination with no CORRUPT anywhere.

--tls migrates over TLS (both streams, and the preempt channel): see
bench/miglib.py (credentials of tools/tls-certs.sh, tls-creds on both
sides; snapshots stay plain); rows read "VMM ... + TLS".
"""

import argparse
import json
import os
import tempfile
import time

from miglib import (mig_uri, MIB, Guest, QmpError, add_tls_arg, common_args, fmt, log, machine_note,
                    make_snapshot, median, source_and_destination, tcp_counters, tcp_delta,
                    tls_credentials, tls_endpoints, tls_label, tls_params)

SWITCH_PASS = 2
SWITCH_TIMEOUT = 30.0


def caps(names):
    return {"capabilities": [{"capability": n, "state": True} for n in names]}


# QEMU has no per-fault latency in query-migrate; its destination's trace
# events give one: the fault thread's request (the fault read from
# userfaultfd) and the start of the page's placement, matched by host
# address. Logged with -msg timestamp=on (gettimeofday, microseconds).
QEMU_TRACE = ("postcopy_ram_fault_thread_request", "postcopy_place_page",
              "postcopy_place_page_zero")
BUCKETS_US = (100, 200, 500, 1000, 2000, 5000)


def qemu_fault_latencies(path):
    """Fault-to-placement times (µs) from a QEMU destination's trace log;
    faults on pages already placed (no placement after them) are left out."""
    import re
    line = re.compile(r"^\d+@(\d+)\.(\d{6}):(\w+) (.*)$")
    waiting = {}  # page address -> fault time (µs)
    out = []
    try:
        f = open(path, errors="replace")
    except OSError:
        return None
    with f:
        for ln in f:
            m = line.match(ln.strip())
            if not m:
                continue
            t = int(m.group(1)) * 1_000_000 + int(m.group(2))
            ev, args = m.group(3), m.group(4)
            if ev == "postcopy_ram_fault_thread_request":
                a = re.search(r"HVA=0x([0-9a-f]+)", args)
                if a:
                    waiting.setdefault(int(a.group(1), 16) & ~0xfff, t)
            elif ev in ("postcopy_place_page", "postcopy_place_page_zero"):
                a = re.search(r"host=0x([0-9a-f]+)", args)
                if a:
                    t0 = waiting.pop(int(a.group(1), 16) & ~0xfff, None)
                    if t0 is not None:
                        out.append(t - t0)
    return out


def latency_summary(lat):
    """The x-postcopy-faults-like summary of a list of latencies (µs)."""
    if not lat:
        return {"faults": 0, "latency-buckets-us": {}}
    lat = sorted(lat)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    buckets = {str(b): 0 for b in BUCKETS_US}
    buckets["more"] = 0
    for v in lat:
        b = next((str(b) for b in BUCKETS_US if v < b), "more")
        buckets[b] += 1
    return {"faults": len(lat), "latency-p50-us": pick(0.5), "latency-p99-us": pick(0.99),
            "latency-max-us": lat[-1], "latency-buckets-us": buckets}


def one_run(g, snap, wd, bandwidth, downtime_limit, preempt, prealloc=False, tls_dir=None):
    dst_extra = ["-mem-prealloc"] if prealloc else []
    trace = None
    if g.kind == "qemu":
        trace = os.path.join(wd, "qemu-dst-trace.log")
        if os.path.exists(trace):
            os.unlink(trace)
        for ev in QEMU_TRACE:
            dst_extra += ["-trace", ev]
        dst_extra += ["-D", trace, "-msg", "timestamp=on"]
    with source_and_destination(g, snap, wd, **tls_endpoints(tls_dir, dst_extra)) as (src, dst, port):
        dq = dst.qmp
        sq = src.qmp
        res = {"notes": []}
        pc = ["postcopy-ram"] + (["postcopy-preempt"] if preempt else [])
        dq.cmd("migrate-set-capabilities", caps(pc))
        try:
            dq.cmd("migrate-set-capabilities", caps(["postcopy-blocktime"]))
            res["blocktime_cap"] = True
        except QmpError as e:
            res["blocktime_cap"] = False
            res["notes"].append(f"destination refuses postcopy-blocktime: {e.reply}")
        sq.cmd("migrate-set-capabilities", caps(pc + ["events"]))
        sq.cmd("migrate-set-parameters", {"max-bandwidth": bandwidth,
                                          "downtime-limit": downtime_limit,
                                          **tls_params(tls_dir)})
        if tls_dir:
            res["tls_creds"] = sq.cmd("query-migrate-parameters").get("tls-creds")
        t_mig = time.monotonic()
        tcp0 = tcp_counters()
        sq.cmd("migrate", {"uri": mig_uri(port)})
        ev = sq.wait_event("MIGRATION_PASS", lambda e: e["data"]["pass"] >= SWITCH_PASS,
                           SWITCH_TIMEOUT)
        before = sq.cmd("query-migrate")
        res["precopy_s"] = time.monotonic() - t_mig
        res["switched_at_pass"] = ev["data"]["pass"] if ev else None
        res["precopy_mib"] = before.get("ram", {}).get("transferred", 0) / MIB
        if before.get("status") != "active":
            res["notes"].append(f"before the switch: {before}")
        last_src_pass_i = src.nlines()
        t_sw = time.monotonic()
        sq.cmd("migrate-start-postcopy")
        r = sq.wait_status(("completed", "failed", "cancelled"), 300, poll=0.02)
        res["switch_to_done_s"] = time.monotonic() - t_sw
        res["tcp"] = tcp_delta(tcp0)
        res.update({
            "status": r.get("status"),
            "total_ms": r.get("total-time"),
            "downtime_ms": r.get("downtime"),
            "package_ms": r.get("x-postcopy-package-sent-ms"),
            "transferred_mib": r.get("ram", {}).get("transferred", 0) / MIB,
            "src_requests": r.get("ram", {}).get("postcopy-requests"),
            "error": r.get("error-desc"),
            "src_reply": r,
        })
        dr = dq.wait_status(("completed", "failed"), 300, poll=0.05)
        res["dst_status"] = dr.get("status")
        res["dst_reply"] = dr
        f = dr.get("x-postcopy-faults") or {}
        if trace:
            lat = qemu_fault_latencies(trace)
            if lat is not None:
                f = latency_summary(lat)
                res["qemu_trace"] = f
        res["faults"] = f.get("faults")
        res["requests"] = f.get("requests")
        res["serviced"] = f.get("serviced")
        res["p50_us"] = f.get("latency-p50-us")
        res["p99_us"] = f.get("latency-p99-us")
        res["buckets"] = f.get("latency-buckets-us")
        res["max_us"] = f.get("latency-max-us")
        res["blocktime_ms"] = dr.get("postcopy-blocktime")
        res["vcpu_blocktime_ms"] = dr.get("postcopy-vcpu-blocktime")
        res["verified"] = False
        if r.get("status") == "completed" and dr.get("status") == "completed":
            last = src.last_pass()
            dst.wait_pass_beyond(last + 1, 60)
            res["verified"] = True
            # Guest-visible stall: the longest host-time gap between two
            # PASS lines from the source's last one before the switch to the
            # destination's second one after it.
            sp = [p for p in src.passes() if p[0] <= last]
            dp = [p for p in dst.passes() if p[0] <= last + 2]
            seq = sorted(([sp[-1]] if sp else []) + dp, key=lambda p: p[2])
            gaps = [(b[2] - a[2]) * 1000 for a, b in zip(seq, seq[1:])]
            res["max_pass_gap_ms"] = max(gaps) if gaps else None
            normal = [(b[2] - a[2]) * 1000 for a, b in zip(sp, sp[1:])][:3]
            res["normal_pass_ms"] = median(normal)
        res["corrupt"] = src.corrupt() + dst.corrupt()
        return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bandwidth", type=int, default=5_000_000)
    ap.add_argument("--downtime-limit", type=int, default=1)
    ap.add_argument("--preempt", choices=["off", "on", "both"],
                    default=os.environ.get("BENCH_PREEMPT", "both"),
                    help="postcopy-preempt on both sides: off, on, or both modes one after the other")
    ap.add_argument("--dst-prealloc", action="store_true",
                    default=os.environ.get("BENCH_DST_PREALLOC") == "1",
                    help="start destinations with -mem-prealloc")
    add_tls_arg(ap)
    common_args(ap)
    a = ap.parse_args()
    quiet = machine_note()
    rows = []
    with tempfile.TemporaryDirectory(prefix="postcopy-bench-") as wd:
        a.tls_dir = tls_credentials(wd, a.tls)
        for kind in a.vmms.split(","):
            g = Guest(kind, a.minivmm, a.qemu, a.kernel, a.initrd, 0)
            snap = os.path.join(wd, f"{kind}.snap")
            make_snapshot(g, snap, wd)
            modes = {"off": [False], "on": [True], "both": [False, True]}[a.preempt]
            for preempt in modes:
                label = (f"{kind} + postcopy-preempt" if preempt else kind) + tls_label(a.tls)
                rows.append((label, bench_mode(g, snap, wd, a, preempt, label)))
            os.unlink(snap)
    print_table(rows, a, quiet)


def bench_mode(g, snap, wd, a, preempt, kind):
    """The runs of one VMM in one mode, logged as they go."""
    runs = []
    for i in range(a.runs):
        t0 = time.monotonic()
        r = one_run(g, snap, wd, a.bandwidth, a.downtime_limit, preempt, a.dst_prealloc, a.tls_dir)
        runs.append(r)
        log(f"  {kind} run {i + 1} ({time.monotonic() - t0:.0f} s): {r['status']}/{r['dst_status']}"
            f" switch at pass {r['switched_at_pass']} after {r['precopy_s']:.1f} s"
            f" ({r['precopy_mib']:.1f} MiB), downtime {r['downtime_ms']} ms,"
            f" total {r['total_ms']} ms, switch->completed {r['switch_to_done_s'] * 1000:.0f} ms,"
            f" {r['transferred_mib']:.1f} MiB, src postcopy-requests {r['src_requests']},"
            f" max PASS gap {fmt(r.get('max_pass_gap_ms'), ' ms')}"
            f" (normal {fmt(r.get('normal_pass_ms'), ' ms')}), corrupt {len(r['corrupt'])},"
            f" TCP counters (host-wide) {r['tcp']}"
            + (f" tls-creds={r.get('tls_creds')!r}" if a.tls else ""))
        if r.get("qemu_trace") is not None:
            log(f"    from QEMU's trace (fault request to placement): {json.dumps(r['qemu_trace'])}")
        elif kind.startswith("minivmm") or r["faults"] is not None:
            log(f"    x-postcopy-faults: {json.dumps(r['dst_reply'].get('x-postcopy-faults'))}")
        if r["blocktime_ms"] is not None or r["vcpu_blocktime_ms"] is not None:
            log(f"    postcopy-blocktime {r['blocktime_ms']} ms,"
                f" postcopy-vcpu-blocktime {r['vcpu_blocktime_ms']} ms")
        for n in r["notes"]:
            log(f"    note: {n}")
        if r["status"] != "completed" or r["dst_status"] != "completed":
            log(f"    source: {json.dumps(r['src_reply'])}")
            log(f"    destination: {json.dumps(r['dst_reply'])}")
        for c in r["corrupt"][:5]:
            log(f"    {c}")
    return runs


def print_table(rows, a, quiet):
    quiet = machine_note() and quiet  # also quiet at the end?
    print()
    print("| VMM | switch downtime | total-time | switch to completed | transferred"
          " | page requests (src) | faults / requests (dst) | fault latency p50 / p99"
          " | blocktime all vCPUs / per vCPU | longest PASS gap (normal) | TCP receive-queue drops / retransmitted segments"
          " | completed | CORRUPT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, runs in rows:
        ok = [r for r in runs if r["status"] == "completed" and r["dst_status"] == "completed"]
        m = lambda k: median([r.get(k) for r in ok])
        rng = lambda k: (f" ({min(r[k] for r in ok)}-{max(r[k] for r in ok)})"
                         if ok and all(r.get(k) is not None for r in ok) else "")
        if any(r["faults"] is not None for r in ok):
            faults = f"{fmt(m('faults'))} / {fmt(m('requests'))}"
            lat = f"{fmt(m('p50_us'), ' µs')}{rng('p50_us')} / {fmt(m('p99_us'), ' µs')}{rng('p99_us')}"
            pooled = {}
            for r in ok:
                for k, v in (r.get("buckets") or {}).items():
                    pooled[k] = pooled.get(k, 0) + v
            total = sum(pooled.values())
            if total:
                under = sum(v for k, v in pooled.items() if k in ("100", "200", "500", "1000"))
                lat += f"; all runs: {under}/{total} under 1 ms, max {max(r['max_us'] for r in ok)} µs"
        else:
            faults = "n/a"
            lat = "n/a"
        if any(r["blocktime_ms"] is not None for r in ok):
            per = [r["vcpu_blocktime_ms"] for r in ok if r["vcpu_blocktime_ms"]]
            per_m = [median([v[i] for v in per]) for i in range(len(per[0]))] if per else []
            bt = f"{fmt(m('blocktime_ms'), ' ms')} / {per_m} ms"
        else:
            bt = "n/a"
        pkg = m('package_ms')
        pkg = f"; package sent {pkg:.1f} ms" if pkg is not None else ""
        print(f"| {kind} | {fmt(m('downtime_ms'), ' ms')}{rng('downtime_ms')}{pkg}"
              f" | {fmt(m('total_ms'), ' ms')}"
              f" | {fmt(m('switch_to_done_s') and m('switch_to_done_s') * 1000, ' ms')}"
              f" | {fmt(m('transferred_mib'), ' MiB', 1)}"
              f" | {fmt(m('src_requests'))}{rng('src_requests')}"
              f" | {faults} | {lat} | {bt}"
              f" | {fmt(m('max_pass_gap_ms'), ' ms')}"
              f" ({', '.join(str(round(r['max_pass_gap_ms'])) for r in ok if r.get('max_pass_gap_ms') is not None)};"
              f" normal {fmt(m('normal_pass_ms'), ' ms')})"
              f" | {sum(r['tcp'].get('TCPRcvQDrop', 0) for r in runs)}"
              f" / {sum(r['tcp'].get('RetransSegs', 0) for r in runs)}"
              f" | {len(ok)}/{len(runs)}"
              f" | {'yes' if any(r['corrupt'] for r in runs) else 'no'} |")
    print(f"\n(median of {a.runs} runs, min-max in brackets, longest PASS gap of every run;"
          f" TCP counters host-wide, summed over the runs; workload.rate=0, max-bandwidth"
          f" {a.bandwidth} B/s, downtime-limit {a.downtime_limit} ms, postcopy started at"
          f" MIGRATION_PASS {SWITCH_PASS}"
          f"{'; over TLS (tls-creds-x509, tools/tls-certs.sh; tls-creds on both sides)' if a.tls else ''};"
          f" machine {'quiet' if quiet else 'NOT quiet, see stderr'})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"vmm": k, "tls": a.tls, "runs": rs} for k, rs in rows], f, indent=1,
                      default=str)


if __name__ == "__main__":
    main()

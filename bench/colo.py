#!/usr/bin/env python3
"""COLO checkpoint benchmark (used by bench/colo.sh, see there).

Per VMM and guest dirty rate: one boot, saved after the first PASS. Then
 - without COLO: a VM restored from the save runs WINDOW s; PASS intervals.
 - with COLO: a primary restored from the save, a secondary on tcp
   loopback, x-colo (and events) on both, x-checkpoint-delay DELAY,
   `migrate`; once the primary is in `colo`, 1 s of warm-up, then WINDOW s
   of measurement: every checkpoint's pause (minivmm: x-colo's
   last-pause-ms per checkpoint, polled; both VMMs: STOP -> RESUME event
   timestamps on the primary), bytes per checkpoint (the primary's socket
   counter bytes_sent from `ss`, over the window, divided by the
   checkpoints; minivmm also x-colo), and the PASS lines the primary
   printed.

Guest slowdown, two ways: the PASS interval in guest time (`ms=` values;
both VMMs freeze the guest clock while it is paused, so this does not
include the checkpoint pauses) and in host time (console arrival times;
minivmm releases the primary's output only at checkpoints, which shifts
lines by up to one checkpoint period: over the window this is a small
error).
"""

import argparse
import json
import os
import re
import subprocess
import tempfile
import time

import miglib
from miglib import (in_source_ns, mig_uri, Guest, common_args, fmt, log, machine_note, make_snapshot, median, pct,
                    source_and_destination, start_from)

BYTES_RE = re.compile(r"bytes_sent:(\d+)")


def sent_bytes(port):
    """bytes_sent summed over the established sockets whose peer port is
    `port` (the primary's side of the COLO connection; across a two-host
    link, in the primary's namespace, to the port it connects to)."""
    if miglib.NET:
        port = miglib.NET.source_port()
    r = subprocess.run(in_source_ns(["ss", "-tinH", "state", "established",
                                     f"( dport = :{port} )"]),
                       capture_output=True, text=True, timeout=10)
    return sum(int(m) for m in BYTES_RE.findall(r.stdout))


def pass_stats(passes):
    """(median guest-ms interval, host ms per pass, number of PASS lines)."""
    if len(passes) < 2:
        return None, None, len(passes)
    guest = [b[1] - a[1] for a, b in zip(passes, passes[1:]) if b[0] == a[0] + 1]
    host = (passes[-1][2] - passes[0][2]) * 1000 / (passes[-1][0] - passes[0][0])
    return median(guest), host, len(passes)


def baseline(g, snap, wd, window):
    vm = start_from(g, "solo", snap, wd, settle_s=1.0)
    try:
        i0 = vm.nlines()
        time.sleep(window)
        ps = vm.passes(i0)
        gi, hi, n = pass_stats(ps)
        return {"guest_ms": gi, "host_ms": hi, "passes": n, "corrupt": vm.corrupt()}
    finally:
        vm.kill()


def colo_point(g, snap, wd, window, delay):
    with source_and_destination(g, snap, wd, ("primary", "secondary"), 1.0) as (p, s, port):
        sq = s.qmp
        pq = p.qmp
        caps = {"capabilities": [{"capability": "x-colo", "state": True},
                                 {"capability": "events", "state": True}]}
        sq.cmd("migrate-set-capabilities", caps)
        pq.cmd("migrate-set-capabilities", caps)
        pq.cmd("migrate-set-parameters", {"x-checkpoint-delay": delay})
        t_mig = time.monotonic()
        pq.cmd("migrate", {"uri": mig_uri(port)})
        r = pq.wait_status(("colo", "failed", "completed"), 180)
        if r.get("status") != "colo":
            raise RuntimeError(f"{g.kind}: COLO did not start: {r}")
        to_colo = time.monotonic() - t_mig
        pq.pump(1.0)
        # Measurement window.
        ev0 = len(pq.events)
        i0 = p.nlines()
        b0 = sent_bytes(port)
        x0 = pq.cmd("query-migrate").get("x-colo") or {}
        t0 = time.monotonic()
        polled = []  # (pause ms, bytes) per checkpoint seen one at a time (x-colo)
        last_n = x0.get("checkpoints")
        while time.monotonic() < t0 + window:
            if last_n is not None:
                x = pq.cmd("query-migrate").get("x-colo") or {}
                n = x.get("checkpoints", last_n)
                if n == last_n + 1:
                    polled.append((x["last-pause-ms"], x["last-bytes"]))
                last_n = n
                pq.pump(0.02)
            else:
                pq.pump(0.2)
        t1 = time.monotonic()
        b1 = sent_bytes(port)
        end = pq.cmd("query-migrate")
        x1 = end.get("x-colo") or {}
        send = sq.cmd("query-migrate")
        evs = pq.events[ev0:]
        # STOP -> RESUME pairs on the primary, by the events' own timestamps.
        ts = lambda e: e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
        ev_pauses = []
        stop = None
        for e in evs:
            if e["event"] == "STOP":
                stop = ts(e)
            elif e["event"] == "RESUME" and stop is not None:
                ev_pauses.append((ts(e) - stop) * 1000)
                stop = None
        res = {
            "to_colo_s": to_colo,
            "window_s": t1 - t0,
            "status_end": (end.get("status"), send.get("status")),
            "errors": [d for d in (end.get("error-desc"), send.get("error-desc")) if d],
            "ev_pauses": ev_pauses,
            "polled": polled,
            "x_start": x0,
            "x_end": x1,
            "sent": b1 - b0,
        }
        if x1:
            n = x1["checkpoints"] - x0.get("checkpoints", 0)
            res["checkpoints"] = n
            tot = lambda x, k: x.get(k, 0) * x.get("checkpoints", 0)
            res["x_avg_pause_ms"] = ((tot(x1, "avg-pause-ms") - tot(x0, "avg-pause-ms")) / n
                                     if n else None)
            res["x_avg_bytes"] = (tot(x1, "avg-bytes") - tot(x0, "avg-bytes")) / n if n else None
        else:
            res["checkpoints"] = len(ev_pauses)
        pauses = [pp for pp, _ in polled] if polled else ev_pauses
        res["pause_src"] = "x-colo" if polled else "STOP/RESUME events"
        res["pause_avg"] = sum(pauses) / len(pauses) if pauses else None
        res["pause_p50"] = pct(pauses, 0.5)
        res["pause_p99"] = pct(pauses, 0.99)
        res["pause_max"] = max(pauses) if pauses else None
        if x1 and x1.get("max-pause-ms", 0) > (res["pause_max"] or 0) and \
                x1.get("max-pause-ms") != x0.get("max-pause-ms"):
            res["pause_max"] = x1["max-pause-ms"]  # a checkpoint the poll did not see alone
        res["bytes_per_cp"] = res["sent"] / res["checkpoints"] if res["checkpoints"] else None
        ps = p.passes(i0)
        gi, hi, npass = pass_stats(ps)
        res.update({"guest_ms": gi, "host_ms": hi, "passes": npass,
                    "corrupt": p.corrupt() + s.corrupt()})
        return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="1,10,50,200")
    ap.add_argument("--delay", type=int, default=100)
    ap.add_argument("--window", type=float, default=10.0)
    common_args(ap, vmms="minivmm")
    a = ap.parse_args()
    quiet = machine_note()
    rows = []
    with tempfile.TemporaryDirectory(prefix="colo-bench-") as wd:
        for kind in a.vmms.split(","):
            for rate in (int(x) for x in a.rates.split(",")):
                g = Guest(kind, a.minivmm, a.qemu, a.kernel, a.initrd, rate)
                snap = os.path.join(wd, f"{kind}-{rate}.snap")
                make_snapshot(g, snap, wd)
                # At least ~2 PASS intervals in the window (16 s each at 1 MiB/s).
                window = a.window if rate == 0 else max(a.window, min(40.0, 2.2 * 16 / rate))
                t = time.monotonic()
                b = baseline(g, snap, wd, window)
                c = colo_point(g, snap, wd, window, a.delay)
                os.unlink(snap)
                log(f"  {kind} rate={rate} ({time.monotonic() - t:.0f} s, window {window:.0f} s):"
                    f" no COLO: PASS {fmt(b['guest_ms'])} ms guest / {fmt(b['host_ms'])} ms host"
                    f" ({b['passes']} lines); COLO: {c['checkpoints']} checkpoints,"
                    f" pause avg {fmt(c['pause_avg'], '', 2)} p50 {fmt(c['pause_p50'], '', 2)}"
                    f" p99 {fmt(c['pause_p99'], '', 2)} max {fmt(c['pause_max'], '', 2)} ms"
                    f" ({c['pause_src']}, {len(c['polled'])} polled);"
                    f" STOP/RESUME: {len(c['ev_pauses'])} pairs avg"
                    f" {fmt(sum(c['ev_pauses']) / len(c['ev_pauses']) if c['ev_pauses'] else None, '', 2)}"
                    f" max {fmt(max(c['ev_pauses']) if c['ev_pauses'] else None, '', 2)} ms;"
                    f" {fmt(c['bytes_per_cp'] and c['bytes_per_cp'] / 1024, ' KiB', 1)}/checkpoint (ss),"
                    f" x-colo avg-bytes {fmt(c.get('x_avg_bytes') and c['x_avg_bytes'] / 1024, ' KiB', 1)};"
                    f" PASS {fmt(c['guest_ms'])} ms guest / {fmt(c['host_ms'])} ms host"
                    f" ({c['passes']} lines); COLO up after {c['to_colo_s']:.1f} s;"
                    f" end {c['status_end']} {c['errors'] or ''}"
                    f" corrupt {len(b['corrupt']) + len(c['corrupt'])}")
                for line in (b["corrupt"] + c["corrupt"])[:5]:
                    log(f"    {line}")
                rows.append((kind, rate, window, b, c))
    quiet = machine_note() and quiet  # also quiet at the end?
    print()
    print("| VMM | guest dirty rate | checkpoints/s | pause avg | pause p50 / p99 | pause max"
          " | bytes per checkpoint | PASS interval, guest ms: alone → COLO"
          " | PASS interval, host ms: alone → COLO | slowdown (host) | CORRUPT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, rate, window, b, c in rows:
        slow = (f"{c['host_ms'] / b['host_ms']:.2f}x" if c["host_ms"] and b["host_ms"] else "n/a")
        print(f"| {kind} | {rate} MiB/s"
              f" | {c['checkpoints'] / c['window_s']:.1f}"
              f" | {fmt(c['pause_avg'], ' ms', 1)}"
              f" | {fmt(c['pause_p50'], '', 1)} / {fmt(c['pause_p99'], ' ms', 1)}"
              f" | {fmt(c['pause_max'], ' ms', 1)}"
              f" | {fmt(c['bytes_per_cp'] and c['bytes_per_cp'] / 1024, ' KiB')}"
              f" | {fmt(b['guest_ms'])} → {fmt(c['guest_ms'])}"
              f" | {fmt(b['host_ms'])} → {fmt(c['host_ms'])}"
              f" | {slow}"
              f" | {'yes' if b['corrupt'] or c['corrupt'] else 'no'} |")
    print(f"\n(x-checkpoint-delay {a.delay} ms, tcp loopback, {a.window:.0f} s per point"
          f" (longer where a PASS takes longer); machine"
          f" {'quiet' if quiet else 'NOT quiet, see stderr'})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"vmm": k, "rate": r, "window": w, "alone": b, "colo": c}
                       for k, r, w, b, c in rows], f, indent=1, default=str)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Migration between two hosts (used by bench/twohosts.sh, see there).

Per link (miglib.Net: two network namespaces joined by a veth pair shaped
with tbf, optionally a user-space relay adding delay) and per VMM, the
three engines of the loopback benchmarks, unchanged, across the link:
 - precopy (bench/migrate.py's run): 128 MiB guest, 16 MiB workload
   rewritten at 4 MiB/s (it must converge at 100 Mbit/s too),
   downtime-limit 300 ms: total time, downtime;
 - postcopy (bench/postcopy.py's run): the guest that never converges
   (workload.rate=0), max-bandwidth 5 MB/s, switched at MIGRATION_PASS 2:
   total time, switch downtime, fault latency p50/p99/max (minivmm's
   x-postcopy-faults; QEMU's from its destination's trace events);
 - COLO (bench/colo.py's point): the 4 MiB/s guest, x-checkpoint-delay
   200 ms, a 10 s window: checkpoint pause p50/p99.
Every run checks the guest's integrity as those scripts do. Prints a
Markdown table, writes the JSON (--json) and an SVG plot of postcopy
fault latency against the added delay (--svg).
"""

import argparse
import json
import os
import tempfile
import time

import colo
import migrate
import postcopy
from miglib import Guest, Net, common_args, fmt, log, machine_note, make_snapshot, median

# The precopy and COLO guest's workload: 16 MiB rewritten at 4 MiB/s, so
# that precopy converges on the slowest link (100 Mbit/s carries ~12 MB/s).
PRECOPY_RATE = 4

# (rate, added delay each way in ms or None for no relay)
LINKS = [("1gbit", None), ("100mbit", None), ("1gbit", 0), ("1gbit", 1), ("1gbit", 10)]


def run_link(kinds, guests, snaps, wd, a, rate, delay):
    out = {}
    with Net(rate, delay, a.relay) as net:
        for kind in kinds:
            gp, gc = guests[kind]
            t = time.monotonic()
            pre = [attempt(migrate.one_run, gp, snaps[kind][0], wd, 300, True)
                   for _ in range(a.runs)]
            post = [attempt(postcopy.one_run, gc, snaps[kind][1], wd, 5_000_000, 1, False)
                    for _ in range(a.runs)]
            c = attempt(colo.colo_point, gp, snaps[kind][0], wd, a.colo_window, 200)
            r = {"precopy": pre, "postcopy": post, "colo": c}
            out[kind] = r
            log(f"  {net.label()} {kind} ({time.monotonic() - t:.0f} s): {summary(r)}")
    return out


def attempt(f, *args):
    """One run; a run that raises (a timeout) is recorded as failed with
    its reason instead of ending the benchmark."""
    try:
        return f(*args)
    except (TimeoutError, RuntimeError) as e:
        log(f"    {f.__module__}: {e}")
        return {"status": "error", "error": str(e)[:300], "corrupt": [], "errors": [str(e)[:300]]}


def ok_runs(runs):
    return [r for r in runs if r.get("status") == "completed"
            and r.get("dst_status", "completed") == "completed" and not r.get("corrupt")]


def summary(r):
    pre, post, c = ok_runs(r["precopy"]), ok_runs(r["postcopy"]), r["colo"]
    m = lambda rs, k: median([x.get(k) for x in rs if x.get(k) is not None])
    return {
        "precopy_ok": f"{len(pre)}/{len(r['precopy'])}",
        "precopy_total_ms": m(pre, "total_ms"),
        "precopy_downtime_ms": m(pre, "downtime_ms"),
        "postcopy_ok": f"{len(post)}/{len(r['postcopy'])}",
        "postcopy_total_ms": m(post, "total_ms"),
        "postcopy_downtime_ms": m(post, "downtime_ms"),
        "fault_p50_us": m(post, "p50_us"),
        "fault_p99_us": m(post, "p99_us"),
        "fault_max_us": max([x["max_us"] for x in post if x.get("max_us") is not None],
                            default=None),
        "colo_checkpoints": c.get("checkpoints"),
        "colo_pause_p50_ms": c.get("pause_p50"),
        "colo_pause_p99_ms": c.get("pause_p99"),
        "colo_errors": c.get("errors"),
        "corrupt": any(x.get("corrupt") for x in r["precopy"] + r["postcopy"]) or bool(c.get("corrupt")),
    }


def svg_plot(results, kinds, path):
    """Postcopy fault latency (p50 solid, p99 dashed) against the added
    delay, at 1 Gbit/s through the relay, one colour per VMM."""
    pts = {}
    for (rate, delay), per in results:
        if rate != "1gbit" or delay is None:
            continue
        for kind in kinds:
            s = summary(per[kind])
            pts.setdefault(kind, []).append((delay, s["fault_p50_us"], s["fault_p99_us"]))
    W, H, L, R, T, B = 640, 400, 70, 160, 30, 50
    delays = sorted({d for v in pts.values() for d, _, _ in v})
    vals = [y for v in pts.values() for _, a, b in v for y in (a, b) if y]
    if not delays or not vals:
        return
    import math
    ymin = 10 ** math.floor(math.log10(max(min(vals) / 1000, 0.01)))
    ymax = 10 ** math.ceil(math.log10(max(vals) / 1000))
    xs = {d: L + (W - L - R) * i / max(1, len(delays) - 1) for i, d in enumerate(delays)}
    ly = lambda ms: T + (H - T - B) * (1 - (math.log10(ms) - math.log10(ymin))
                                       / (math.log10(ymax) - math.log10(ymin)))
    colors = {"minivmm": "#1f77b4", "qemu": "#d62728"}
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
         f'font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{L}" y="18" font-size="14">Postcopy fault latency across a 1 Gbit/s link'
         f' (log scale)</text>']
    y = ymin
    while y <= ymax * 1.0001:
        yy = ly(y)
        o.append(f'<line x1="{L}" y1="{yy:.1f}" x2="{W - R}" y2="{yy:.1f}" stroke="#ddd"/>')
        o.append(f'<text x="{L - 6}" y="{yy + 4:.1f}" text-anchor="end">{y:g} ms</text>')
        y *= 10
    for d, x in xs.items():
        o.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{H - B}" stroke="#eee"/>')
        o.append(f'<text x="{x:.1f}" y="{H - B + 18}" text-anchor="middle">{d} ms</text>')
    o.append(f'<text x="{(L + W - R) / 2:.0f}" y="{H - 12}" text-anchor="middle">'
             f'delay added in each direction (user-space relay)</text>')
    legend_y = T + 10
    for kind, v in pts.items():
        col = colors.get(kind, "black")
        for idx, dash, name in ((1, "", "p50"), (2, ' stroke-dasharray="6,4"', "p99")):
            line = [(xs[d], ly(p[idx] / 1000)) for p in sorted(v) for d in [p[0]] if p[idx]]
            if len(line) > 1:
                pts_s = " ".join(f"{x:.1f},{y:.1f}" for x, y in line)
                o.append(f'<polyline points="{pts_s}" fill="none" stroke="{col}"'
                         f' stroke-width="2"{dash}/>')
            for x, y in line:
                o.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{col}"/>')
            o.append(f'<line x1="{W - R + 15}" y1="{legend_y}" x2="{W - R + 45}" y2="{legend_y}"'
                     f' stroke="{col}" stroke-width="2"{dash}/>')
            o.append(f'<text x="{W - R + 50}" y="{legend_y + 4}">{kind} {name}</text>')
            legend_y += 18
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--colo-window", type=float, default=10.0)
    ap.add_argument("--relay", required=True, help="the tests crate's relay binary")
    ap.add_argument("--links", default=",".join(f"{r}/{'-' if d is None else d}" for r, d in LINKS),
                    help="RATE/DELAY,...: delay in ms each way through the relay, - for none")
    ap.add_argument("--svg")
    common_args(ap)
    a = ap.parse_args()
    links = []
    for item in a.links.split(","):
        rate, d = item.split("/")
        links.append((rate, None if d == "-" else int(d)))
    quiet = machine_note()
    kinds = a.vmms.split(",")
    results = []
    with tempfile.TemporaryDirectory(prefix="twohosts-bench-") as wd:
        guests, snaps = {}, {}
        for kind in kinds:
            gp = Guest(kind, a.minivmm, a.qemu, a.kernel, a.initrd, PRECOPY_RATE)
            gc = Guest(kind, a.minivmm, a.qemu, a.kernel, a.initrd, 0)
            guests[kind] = (gp, gc)
            snaps[kind] = (os.path.join(wd, f"{kind}-{PRECOPY_RATE}.snap"),
                           os.path.join(wd, f"{kind}-0.snap"))
            make_snapshot(gp, snaps[kind][0], wd)
            make_snapshot(gc, snaps[kind][1], wd)
        for rate, delay in links:
            results.append(((rate, delay), run_link(kinds, guests, snaps, wd, a, rate, delay)))
    quiet = machine_note() and quiet
    print()
    print("| link | VMM | precopy total / downtime | postcopy total / switch downtime"
          " | fault latency p50 / p99 / max | COLO pause p50 / p99 (checkpoints)"
          " | runs completed | CORRUPT |")
    print("|---|---|---|---|---|---|---|---|")
    for (rate, delay), per in results:
        link = rate + ("" if delay is None else f", +{delay} ms each way (relay)")
        for kind in kinds:
            s = summary(per[kind])
            us = lambda v: fmt(v and v / 1000, "", 2)
            print(f"| {link} | {kind}"
                  f" | {fmt(s['precopy_total_ms'], ' ms')} / {fmt(s['precopy_downtime_ms'], ' ms')}"
                  f" | {fmt(s['postcopy_total_ms'], ' ms')} / {fmt(s['postcopy_downtime_ms'], ' ms')}"
                  f" | {us(s['fault_p50_us'])} / {us(s['fault_p99_us'])} / {us(s['fault_max_us'])} ms"
                  f" | {fmt(s['colo_pause_p50_ms'], '', 1)} / {fmt(s['colo_pause_p99_ms'], ' ms', 1)}"
                  f" ({s['colo_checkpoints']})"
                  f" | precopy {s['precopy_ok']}, postcopy {s['postcopy_ok']}"
                  f"{', COLO: ' + '; '.join(s['colo_errors']) if s['colo_errors'] else ''}"
                  f" | {'yes' if s['corrupt'] else 'no'} |")
    print(f"\n(median of {a.runs} runs per engine; COLO one {a.colo_window:.0f} s window;"
          f" machine {'quiet' if quiet else 'NOT quiet, see stderr'})")
    if a.svg:
        svg_plot(results, kinds, a.svg)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"rate": r, "delay_ms": d, "results": per} for (r, d), per in results],
                      f, indent=1, default=str)


if __name__ == "__main__":
    main()

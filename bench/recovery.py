#!/usr/bin/env python3
"""Postcopy recovery across a cut link (used by bench/recovery.sh, see there).

Two hosts (miglib.Net: network namespaces joined by a veth pair shaped to
1 Gbit/s, no relay), the guest that never converges (workload.rate=0,
restored from a snapshot taken after its first PASS, as bench/postcopy.py).
Per run: postcopy-ram on both sides, `events` on the source, source
max-bandwidth and max-postcopy-bandwidth 5 MB/s (so the postcopy phase
lasts ~25 s) and downtime-limit 1 ms; minivmm: x-peer-timeout 3000 ms on
both sides. `migrate`, `migrate-start-postcopy` at the source's
MIGRATION_PASS 2 (as bench/postcopy.py), postcopy-active on the
destination, 2 s more, then the cut: the veth link down at both ends
(Net.link_down), and

 - manual mode (minivmm and QEMU): `migrate-pause` on the source and on
   the destination at once (QEMU never notices a silent dead link by
   itself), both polled until postcopy-paused; the link stays down until
   3 s after the cut; link up = t0; then `migrate-recover`
   tcp:DST:4445 on the destination and `migrate` {uri, resume: true} on
   the source;
 - automatic mode (minivmm only): x-postcopy-auto-recover 60000 ms on
   both sides (a binary that refuses the parameter is recorded as
   unsupported), no QMP command: both sides must pause by themselves
   (x-peer-timeout; waited up to 15 s), the link comes up 3 s after the
   cut or when both have paused, whichever is later (t0), and both sides
   must get back to postcopy-active by themselves.

Measured, query-migrate polled on both sides every 10 ms: cut to
postcopy-paused per side; t0 (link up, right after `ip link set up`
returned on both ends) to postcopy-active per side, and to completed per
side; the longest host-time gap between two of the guest's PASS lines from
the source's last one before the switch through the destination's until
two PASS after completion (the outage included: what the guest's work
saw); the destination's longest fault (minivmm: x-postcopy-faults
latency-max-us at completion; QEMU: from its trace events, fault read to
page placement, as bench/postcopy.py); pages the source sent again
(minivmm's `x-postcopy-pages-resent` in the source's query-migrate, null
where the binary has no such key; QEMU has no such figure); minivmm's
x-postcopy-paused-ms and x-postcopy-recoveries on both sides. Integrity as
bench/postcopy.py: no CORRUPT line on either side and the destination runs
two more PASS after completion. A run that fails (a side not pausing, not
recovering, not completing, a command refused) is recorded as failed with
its reason and both sides' last query-migrate replies; the benchmark goes
on. Prints a Markdown table, writes every run's data with --json.
"""

import argparse
import json
import os
import tempfile
import time

import postcopy
from miglib import (MIB, Guest, Net, QmpError, common_args, fmt, log, machine_note,
                    make_snapshot, median, mig_uri, source_and_destination)

RATE = "1gbit"
BANDWIDTH = 5_000_000
PEER_TIMEOUT_MS = 3000
AUTO_RECOVER_MS = 60000
AFTER_SWITCH_S = 2.0    # postcopy-active on the destination to the cut
DOWN_S = 3.0            # the cut to link up (at least)
PAUSE_TIMEOUT_S = 15.0  # the cut to postcopy-paused on both sides
RECOVER_TIMEOUT_S = 60.0
COMPLETE_TIMEOUT_S = 300.0
POLL_S = 0.01
RECOVER_PORT = Net.PORT + 1

MODES = {"manual": "migrate-pause, migrate-recover + migrate resume",
         "auto": f"x-postcopy-auto-recover {AUTO_RECOVER_MS} ms, no command"}


class RunFailed(Exception):
    pass


def caps(names):
    return {"capabilities": [{"capability": n, "state": True} for n in names]}


def watch(qs, done, t0, timeout, what, res_key, res):
    """Poll query-migrate on each side of `qs` ({side: Qmp}) every POLL_S
    until each reports a status in `done`. Records in res[res_key] per side
    the status changes seen [(ms since t0, status)], the time it reached
    `done` (ms since t0) and that reply. A side that fails, or a timeout,
    raises RunFailed with the last replies."""
    out = res.setdefault(res_key, {})
    for side in qs:
        out.setdefault(side, {"statuses": [], "ms": None, "reply": None})
    deadline = t0 + timeout
    last = {}
    while True:
        pending = [s for s in qs if out[s]["ms"] is None]
        if not pending:
            return out
        for side in pending:
            r = qs[side].cmd("query-migrate", timeout=10)
            t = time.monotonic()
            st = r.get("status")
            last[side] = r
            seen = out[side]["statuses"]
            if not seen or seen[-1][1] != st:
                seen.append((round((t - t0) * 1000, 1), st))
            if st in done:
                out[side]["ms"] = round((t - t0) * 1000, 1)
                out[side]["reply"] = r
            elif st in ("failed", "cancelled"):
                res["last_replies"] = last
                raise RunFailed(f"{side} {st} while waiting for {what}: {json.dumps(r)}")
        if time.monotonic() > deadline:
            res["last_replies"] = last
            raise RunFailed(f"no {what} after {timeout:.0f} s: "
                            + "; ".join(f"{s}: {json.dumps(last.get(s))}" for s in pending))
        time.sleep(POLL_S)


def resent(r):
    """minivmm's pages sent again after recovery (None: no such key)."""
    v = r.get("x-postcopy-pages-resent")
    if v is None:
        v = (r.get("ram") or {}).get("x-postcopy-pages-resent")
    return v


def one_run(g, snap, wd, net, mode):
    """One cut and recovery; returns the run's record (status "completed",
    "failed" with "error", or "unsupported" with "error")."""
    res = {"vmm": g.kind, "mode": mode, "status": None, "notes": []}
    dst_extra = []
    trace = None
    if g.kind == "qemu":
        trace = os.path.join(wd, "qemu-dst-trace.log")
        if os.path.exists(trace):
            os.unlink(trace)
        for ev in postcopy.QEMU_TRACE:
            dst_extra += ["-trace", ev]
        dst_extra += ["-D", trace, "-msg", "timestamp=on"]
    try:
        with source_and_destination(g, snap, wd, dst_extra=dst_extra) as (src, dst, port):
            sq, dq = src.qmp, dst.qmp
            try:
                body(g, src, dst, sq, dq, port, net, mode, res, trace)
            except (RunFailed, QmpError, TimeoutError, RuntimeError, EOFError, OSError) as e:
                if res["status"] != "unsupported":
                    res["status"] = "failed"
                res["error"] = str(e)[:2000]
                if "last_replies" not in res and res["status"] != "unsupported":
                    res["last_replies"] = {}
                    for side, q in (("source", sq), ("destination", dq)):
                        try:
                            res["last_replies"][side] = q.cmd("query-migrate", timeout=5)
                        except Exception as e2:  # noqa: BLE001 - the VMM may be gone
                            res["last_replies"][side] = f"query-migrate failed: {e2}"
                if res["status"] != "unsupported":
                    res["tails"] = {"source": src.tail(), "destination": dst.tail()}
                res["corrupt"] = src.corrupt() + dst.corrupt()
            finally:
                if net.down:
                    net.link_up()
    except (TimeoutError, RuntimeError, OSError) as e:  # restoring or starting a VM
        res["status"] = "failed"
        res["error"] = str(e)[:2000]
    finally:
        if net.down:
            net.link_up()
    res.setdefault("corrupt", [])
    return res


def body(g, src, dst, sq, dq, port, net, mode, res, trace):
    mini = g.kind == "minivmm"
    both = {"source": sq, "destination": dq}
    dq.cmd("migrate-set-capabilities", caps(["postcopy-ram"]))
    sq.cmd("migrate-set-capabilities", caps(["postcopy-ram", "events"]))
    sq.cmd("migrate-set-parameters", {"max-bandwidth": BANDWIDTH,
                                      "max-postcopy-bandwidth": BANDWIDTH,
                                      "downtime-limit": 1})
    if mini:
        for q in both.values():
            q.cmd("migrate-set-parameters", {"x-peer-timeout": PEER_TIMEOUT_MS})
    if mode == "auto":
        for side in ("destination", "source"):
            try:
                both[side].cmd("migrate-set-parameters",
                               {"x-postcopy-auto-recover": AUTO_RECOVER_MS})
            except QmpError as e:
                res["status"] = "unsupported"
                res["refusal"] = {side: e.reply}
                raise RunFailed(f"unsupported by this binary: {side} refuses"
                                f" x-postcopy-auto-recover: {json.dumps(e.reply)}") from e
        res["auto_recover_shown"] = {s: q.cmd("query-migrate-parameters").get(
            "x-postcopy-auto-recover") for s, q in both.items()}

    t_mig = time.monotonic()
    sq.cmd("migrate", {"uri": mig_uri(port)})
    ev = sq.wait_event("MIGRATION_PASS", lambda e: e["data"]["pass"] >= postcopy.SWITCH_PASS,
                       postcopy.SWITCH_TIMEOUT)
    before = sq.cmd("query-migrate")
    res["precopy_s"] = round(time.monotonic() - t_mig, 2)
    res["switched_at_pass"] = ev["data"]["pass"] if ev else None
    res["precopy_mib"] = round(before.get("ram", {}).get("transferred", 0) / MIB, 1)
    if before.get("status") != "active":
        raise RunFailed(f"source not active before the switch: {json.dumps(before)}")
    last_src_pass = src.last_pass()
    t_sw = time.monotonic()
    sq.cmd("migrate-start-postcopy")
    watch({"destination": dq}, ("postcopy-active",), t_sw, 60, "postcopy-active after the switch",
          "switch", res)
    time.sleep(AFTER_SWITCH_S)
    pre = {s: q.cmd("query-migrate") for s, q in both.items()}
    res["before_cut"] = pre
    for s, r in pre.items():
        if r.get("status") != "postcopy-active":
            raise RunFailed(f"{s} not postcopy-active {AFTER_SWITCH_S} s after the switch:"
                            f" {json.dumps(r)}")

    # The cut: times count from both ends being down (`ip` returned).
    t = time.monotonic()
    net.link_down()
    t_cut = time.monotonic()
    res["link_down_cmd_ms"] = round((t_cut - t) * 1000, 1)
    res["cut_after_switch_s"] = round(t_cut - t_sw, 2)
    if mode == "manual":
        for side in ("source", "destination"):
            res.setdefault("pause_replies", {})[side] = both[side].cmd("migrate-pause")
        res["pause_cmds_ms"] = round((time.monotonic() - t_cut) * 1000, 1)
    watch(both, ("postcopy-paused",), t_cut, PAUSE_TIMEOUT_S, "postcopy-paused after the cut",
          "paused", res)
    left = t_cut + DOWN_S - time.monotonic()
    if left > 0:
        time.sleep(left)
    t = time.monotonic()
    net.link_up()
    t0 = time.monotonic()
    res["link_up_cmd_ms"] = round((t0 - t) * 1000, 1)
    res["down_s"] = round(t0 - t_cut, 2)

    # The recovery.
    if mode == "manual":
        uri = f"tcp:{Net.DST_IP}:{RECOVER_PORT}"
        res["recover_replies"] = {
            "destination": dq.cmd("migrate-recover", {"uri": uri}),
            "source": sq.cmd("migrate", {"uri": uri, "resume": True}),
        }
        res["commands_ms"] = round((time.monotonic() - t0) * 1000, 1)
    rec = watch(both, ("postcopy-active", "completed"), t0, RECOVER_TIMEOUT_S,
                "postcopy-active after link up", "recovered", res)
    res["up_to_active_ms"] = {s: rec[s]["ms"] for s in both}
    done = watch(both, ("completed",), t0, COMPLETE_TIMEOUT_S, "completed after recovery",
                 "completed", res)
    res["up_to_completed_ms"] = {s: done[s]["ms"] for s in both}
    sr, dr = done["source"]["reply"], done["destination"]["reply"]
    res["src_reply"], res["dst_reply"] = sr, dr
    res["total_ms"] = sr.get("total-time")
    res["downtime_ms"] = sr.get("downtime")
    res["transferred_mib"] = round(sr.get("ram", {}).get("transferred", 0) / MIB, 1)
    res["pages_resent"] = resent(sr) if mini else None
    res["paused_ms"] = {s: done[s]["reply"].get("x-postcopy-paused-ms") for s in both}
    res["recoveries"] = {s: done[s]["reply"].get("x-postcopy-recoveries") for s in both}
    f = dr.get("x-postcopy-faults") or {}
    if trace:
        lat = postcopy.qemu_fault_latencies(trace)
        if lat is not None:
            f = postcopy.latency_summary(lat)
            res["qemu_trace"] = f
    res["faults"] = f.get("faults")
    res["fault_max_us"] = f.get("latency-max-us")
    res["fault_p50_us"] = f.get("latency-p50-us")

    # Integrity: two more PASS on the destination after completion, no
    # CORRUPT anywhere.
    k = max(dst.last_pass(), last_src_pass)
    dst.wait_pass_beyond(k + 1, 60)
    res["corrupt"] = src.corrupt() + dst.corrupt()
    if res["corrupt"]:
        raise RunFailed(f"CORRUPT: {res['corrupt'][:3]}")
    # The longest gap between PASS lines: the source's last one before the
    # switch, then the destination's through the check above.
    sp = [p for p in src.passes() if p[0] <= last_src_pass]
    dp = [p for p in dst.passes() if p[0] <= k + 2]
    seq = sorted(([sp[-1]] if sp else []) + dp, key=lambda p: p[2])
    gaps = [((b[2] - a[2]) * 1000, a[2], b[2]) for a, b in zip(seq, seq[1:])]
    if gaps:
        gap, a_t, b_t = max(gaps)
        res["max_pass_gap_ms"] = round(gap, 1)
        # Where it lies, in ms from the cut (negative: before it).
        res["max_pass_gap_from_cut_ms"] = [round((a_t - t_cut) * 1000), round((b_t - t_cut) * 1000)]
        res["pass_gaps_over_cut_ms"] = [round(x[0]) for x in gaps if x[2] >= t_cut and x[1] <= t0]
    normal = [(b[2] - a[2]) * 1000 for a, b in zip(sp, sp[1:])][:3]
    res["normal_pass_ms"] = median(normal)
    res["dst_passes"] = len(dp)
    res["status"] = "completed"


def log_run(label, i, r, dt):
    if r["status"] != "completed":
        log(f"  {label} run {i + 1} ({dt:.0f} s): {r['status'].upper()}: {r.get('error')}")
        for side, rep in (r.get("last_replies") or {}).items():
            log(f"    {side}: {json.dumps(rep)}")
        for side, t in (r.get("tails") or {}).items():
            if r["status"] != "unsupported":
                log(f"    {side} console tail:\n      " + t.replace("\n", "\n      "))
        return
    p, a, c = r["paused"], r["up_to_active_ms"], r["up_to_completed_ms"]
    log(f"  {label} run {i + 1} ({dt:.0f} s): switch at pass {r['switched_at_pass']}"
        f" after {r['precopy_s']} s, cut {r['cut_after_switch_s']} s after the switch;"
        f" link down took {r['link_down_cmd_ms']} ms, migrate-pause x2 {r.get('pause_cmds_ms')} ms,"
        f" paused src {p['source']['ms']} / dst {p['destination']['ms']} ms after the cut;"
        f" link down {r['down_s']} s; link up -> postcopy-active src {a['source']} /"
        f" dst {a['destination']} ms, -> completed src {c['source']} / dst {c['destination']} ms;"
        f" longest PASS gap {fmt(r.get('max_pass_gap_ms'), ' ms')}"
        f" ({r.get('max_pass_gap_from_cut_ms')} ms from the cut; normal"
        f" {fmt(r.get('normal_pass_ms'), ' ms')}); fault max {fmt(r.get('fault_max_us'), ' µs')}"
        f" ({r.get('faults')} faults); pages resent {r.get('pages_resent')};"
        f" paused-ms {r.get('paused_ms')}, recoveries {r.get('recoveries')}")
    for side in ("source", "destination"):
        log(f"    {side} statuses after the cut {r['paused'][side]['statuses']}"
            f" (error-desc: {r['paused'][side]['reply'].get('error-desc')!r}),"
            f" after link up {r['recovered'][side]['statuses']}")
    if r.get("qemu_trace") is None and r["vmm"] == "minivmm":
        log(f"    x-postcopy-faults: {json.dumps(r['dst_reply'].get('x-postcopy-faults'))}")


def bench_mode(g, snap, wd, net, mode, runs, label):
    out = []
    for i in range(runs):
        t = time.monotonic()
        r = one_run(g, snap, wd, net, mode)
        out.append(r)
        log_run(label, i, r, time.monotonic() - t)
        if r["status"] == "unsupported":
            break
    return out


def print_table(rows, a, quiet):
    quiet = machine_note() and quiet
    print()
    print("| VMM, recovery | cut → postcopy-paused src / dst | link up → postcopy-active src / dst"
          " | link up → completed src / dst | longest PASS gap (normal) | longest fault"
          " | pages sent again | paused-ms src / dst, recoveries | completed | CORRUPT |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, runs in rows:
        if runs and runs[0]["status"] == "unsupported":
            side, reply = next(iter(runs[0]["refusal"].items()))
            desc = (reply.get("error") or {}).get("desc", json.dumps(reply))
            print(f"| {label} | unsupported by this binary ({side}: {desc})"
                  " | | | | | | | 0/0 | |")
            continue
        ok = [r for r in runs if r["status"] == "completed"]
        m = lambda f: median([f(r) for r in ok])
        ms = lambda v: fmt(v, " ms")
        both = lambda key: (f"{ms(m(lambda r: r[key]['source']))} /"
                            f" {ms(m(lambda r: r[key]['destination']))}")
        paused = (f"{ms(m(lambda r: r['paused']['source']['ms']))} /"
                  f" {ms(m(lambda r: r['paused']['destination']['ms']))}")
        fmax = max([r["fault_max_us"] for r in ok if r.get("fault_max_us") is not None],
                   default=None)
        src_fault = "x-postcopy-faults" if label.startswith("minivmm") else "trace"
        resent = [r.get("pages_resent") for r in ok]
        resent_s = ("n/a" if label.startswith("QEMU")
                    else ", ".join("null" if v is None else str(v) for v in resent) or "n/a")
        mini = label.startswith("minivmm")
        pm = (f"{fmt(m(lambda r: (r.get('paused_ms') or {}).get('source')), ' ms')} /"
              f" {fmt(m(lambda r: (r.get('paused_ms') or {}).get('destination')), ' ms')},"
              f" {m(lambda r: (r.get('recoveries') or {}).get('source'))}" if mini else "n/a")
        fails = "; ".join(r.get("error", "")[:120] for r in runs if r["status"] != "completed")
        print(f"| {label} | {paused} | {both('up_to_active_ms')} | {both('up_to_completed_ms')}"
              f" | {ms(m(lambda r: r.get('max_pass_gap_ms')))}"
              f" ({ms(m(lambda r: r.get('normal_pass_ms')))})"
              f" | {fmt(fmax and fmax / 1000, ' ms', 1)} ({src_fault})"
              f" | {resent_s} | {pm} | {len(ok)}/{len(runs)}{': ' + fails if fails else ''}"
              f" | {'yes' if any(r.get('corrupt') for r in runs) else 'no'} |")
    print(f"\n(median of {a.runs} runs; {RATE} veth between two namespaces, no relay;"
          f" workload.rate=0, max-bandwidth and max-postcopy-bandwidth {BANDWIDTH} B/s,"
          f" postcopy at MIGRATION_PASS {postcopy.SWITCH_PASS}, cut {AFTER_SWITCH_S:.0f} s after"
          f" postcopy-active, link down >= {DOWN_S:.0f} s; minivmm x-peer-timeout"
          f" {PEER_TIMEOUT_MS} ms; machine {'quiet' if quiet else 'NOT quiet, see stderr'})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"label": k, "runs": rs} for k, rs in rows], f, indent=1, default=str)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="manual,auto",
                    help="manual and/or auto (auto: minivmm only)")
    common_args(ap)
    a = ap.parse_args()
    quiet = machine_note()
    kinds = a.vmms.split(",")
    modes = a.modes.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="recovery-bench-") as wd:
        snaps = {}
        guests = {}
        for kind in kinds:
            guests[kind] = Guest(kind, a.minivmm, a.qemu, a.kernel, a.initrd, 0)
            snaps[kind] = os.path.join(wd, f"{kind}.snap")
            make_snapshot(guests[kind], snaps[kind], wd)
        with Net(RATE) as net:
            for kind in kinds:
                name = "minivmm" if kind == "minivmm" else "QEMU"
                for mode in modes:
                    if mode == "auto" and kind != "minivmm":
                        continue
                    label = f"{name}, {mode} ({MODES[mode]})"
                    rows.append((label, bench_mode(guests[kind], snaps[kind], wd, net, mode,
                                                   a.runs, label)))
    print_table(rows, a, quiet)


if __name__ == "__main__":
    main()

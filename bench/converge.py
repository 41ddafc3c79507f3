#!/usr/bin/env python3
"""Precopy of a guest that dirties memory faster than the link (used by
bench/converge.sh, see there).

The standard workload guest (128 MiB, 2 vCPUs, `workload.mem=16
workload.rate=16`: 16 MiB rewritten at 16 MiB/s, one PASS a second),
booted once per VMM, saved after its first PASS and restored for every
run; tcp loopback. Per run: a source restored from the snapshot and left
running SETTLE_S (11 s) so that the 10 s before `migrate` are the guest's
unhindered rate, a fresh destination, `events` on the source and source
parameters max-bandwidth 4000000 B/s (a quarter of the dirty rate) and
downtime-limit 300 ms, then one `migrate` per mode:

 - none: nothing more. Recorded: whether the source's query-migrate
   still says `active` NONE_S (60 s) after `migrate` (and its
   dirty-sync-count and bytes then); then `migrate_cancel`, the source
   polled until `cancelled`, and the guest must run on there (query-status
   `running`, two more PASS, no CORRUPT).
 - auto-converge: capability auto-converge with QEMU's defaults set
   explicitly (cpu-throttle-initial 20, cpu-throttle-increment 10,
   throttle-trigger-threshold 50, max-cpu-throttle 99,
   cpu-throttle-tailslow false).
 - auto-converge tailslow: the same with cpu-throttle-tailslow true.
 - raise bandwidth: no auto-converge; at the source's MIGRATION_PASS 4, or
   RAISE_AFTER_S (15 s) after `migrate` if that comes first,
   migrate-set-parameters max-bandwidth 1000000000.
 - dirty-limit (QEMU 8.1's capability; minivmm, and QEMU only from 8.1:
   QEMU 7.2 gets a row saying so, nothing is run): the source started
   with -accel kvm,dirty-ring-size=RING (65536, as the tests'
   dirty_limit_holds_the_vcpus_until_it_completes; the destination has no
   ring), capability dirty-limit, vcpu-dirty-limit 1 MB/s and
   x-vcpu-dirty-limit-period 1000 ms set explicitly (the defaults).
   Recorded besides: every query-migrate key with `dirty-limit` in its
   name (top level or under ram: minivmm's `x-dirty-limit`, QEMU 8.1's
   `dirty-limit-throttle-time-per-round` and `dirty-limit-ring-full-time`),
   its polled maximum and each change, and query-vcpu-dirty-limit once a
   second (each vCPU's limit-rate and current-rate); the guest's PASS rate
   from `migrate` to the first poll that showed a dirty-limit key, and
   from there to the stop (while limited).

query-migrate is polled on the source every 100 ms from `migrate` on.
Measured for each migration that completes: `migrate` to the poll that
saw `completed` (host clock) and the source's total-time and downtime;
the highest cpu-throttle-percentage seen in the polls and every change of
it (ms since `migrate`, %, dirty-sync-count); dirty-sync-count and
ram.transferred at completion; in raise mode the time from the
migrate-set-parameters command (sent) to the poll that saw `completed`.
The guest's own progress, from the PASS lines of the source's console
with their host arrival times: PASS lines per second in the 10 s before
`migrate`, from `migrate` to the source's STOP event (the poll that saw
`completed` where no STOP came), and in the last 10 s before that stop
(the most throttled stretch), and at each throttle level (from the poll
that first showed it to the poll that showed the next, or the stop; 0 %
from `migrate` to the first). Integrity as bench/migrate.py: the
destination completes too, prints two PASS beyond the source's last, and
no CORRUPT appears on either side. A migration not completed
COMPLETE_TIMEOUT_S (300 s) after `migrate` is cancelled and recorded as
not completed; a run that fails otherwise is recorded with its reason and
the last replies, and the benchmark goes on. Prints a Markdown table per
mode (a row per VMM, median of --runs), writes every run with its QMP
replies with --json.

Before each run (before its source is restored) the script waits, up to
--wait-quiet s (300), until no build, test or foreign VMM runs on the
machine (bench/scale.py's wait); each run records how long it waited and
what ran at its start and its end.
"""

import argparse
import contextlib
import copy
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time

from miglib import (MIB, Guest, QmpError, busy_processes, common_args, fmt, free_port, log,
                    machine_note, make_snapshot, median, mig_uri, source_and_destination,
                    start_from)

RATE = 16               # workload MiB/s (and 16 MiB of workload: one PASS a second)
BANDWIDTH = 4_000_000   # B/s: a quarter of the dirty rate
DOWNTIME_LIMIT = 300    # ms
RAISED_BANDWIDTH = 1_000_000_000
SETTLE_S = 11.0         # source running before the destination and `migrate`
BEFORE_S = 10.0         # window of the guest's rate before `migrate`
NONE_S = 60.0           # mode none: `migrate` to the look
RAISE_PASS = 4
RAISE_AFTER_S = 15.0
COMPLETE_TIMEOUT_S = 300.0
POLL_S = 0.1
RING = 65536            # dirty-limit: the source's dirty-ring-size (as the tests)
VCPU_DIRTY_LIMIT = 1    # MB/s, QEMU's default
DIRTY_LIMIT_PERIOD = 1000  # ms, QEMU's default
VCPU_LIMIT_POLL_S = 1.0  # dirty-limit: query-vcpu-dirty-limit every so often
QEMU_DEFAULTS = {"cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
                 "throttle-trigger-threshold": 50, "max-cpu-throttle": 99,
                 "cpu-throttle-tailslow": False}

MODES = {
    "none": "none (no help)",
    "ac": "auto-converge",
    "tailslow": "auto-converge tailslow",
    "raise": "raise bandwidth",
    "dl": "dirty-limit",
}
ALIASES = {"dirty-limit": "dl", "auto-converge": "ac"}


class RunFailed(Exception):
    pass


def caps(names):
    return {"capabilities": [{"capability": n, "state": True} for n in names]}


def pass_rate(vm, t0, t1):
    """PASS lines per second on `vm`'s console that arrived in (t0, t1]."""
    if t1 is None or t0 is None or t1 <= t0:
        return None
    n = sum(1 for _k, _ms, t in vm.passes() if t0 < t <= t1)
    return n / (t1 - t0)


def dirty_limit_keys(r):
    """query-migrate's keys with `dirty-limit` in their name, at the top
    level or under ram (ram's prefixed `ram.`)."""
    out = {k: v for k, v in r.items() if "dirty-limit" in k}
    out.update({f"ram.{k}": v for k, v in (r.get("ram") or {}).items() if "dirty-limit" in k})
    return out


def poll_until_done(sq, t_mig, res, deadline_s, until=None, vcpu_limits=False):
    """Poll the source's query-migrate every POLL_S until a final status
    (or `until` seconds after t_mig when given). Records the highest
    cpu-throttle-percentage, its changes and the status changes in res;
    returns the last reply and the host time of the poll that got it.
    Keys with `dirty-limit` in their name: their maximum (dl_max) and each
    change (dl_steps); with vcpu_limits, query-vcpu-dirty-limit once every
    VCPU_LIMIT_POLL_S (its changes, and each vCPU's highest current-rate)."""
    vcpu_limits = {"next": 0.0} if vcpu_limits else None
    res.setdefault("throttle_steps", [])
    res.setdefault("statuses", [])
    res.setdefault("max_throttle", None)
    while True:
        r = sq.cmd("query-migrate", timeout=10)
        t = time.monotonic()
        ms = round((t - t_mig) * 1000)
        st = r.get("status")
        if not res["statuses"] or res["statuses"][-1][1] != st:
            res["statuses"].append((ms, st))
        dl = dirty_limit_keys(r)
        if dl:
            mx = res.setdefault("dl_max", {})
            for k, v in dl.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    mx[k] = max(mx.get(k, v), v)
            dsteps = res.setdefault("dl_steps", [])
            if not dsteps:
                res["dl_first_reply"] = r  # the whole query-migrate reply that first had one
            if not dsteps or dsteps[-1][1] != dl:
                dsteps.append((ms, dl, (r.get("ram") or {}).get("dirty-sync-count")))
        if vcpu_limits is not None and t >= vcpu_limits["next"]:
            vcpu_limits["next"] = t + VCPU_LIMIT_POLL_S
            q = sq.cmd("query-vcpu-dirty-limit", check=False, timeout=10)
            samples = res.setdefault("vcpu_dirty_limit_samples", [])
            if not samples or samples[-1][1] != q:
                samples.append((ms, q))
            if isinstance(q, list):
                for e in q:
                    cur = res.setdefault("vcpu_current_rate_max", {})
                    i = str(e.get("cpu-index"))
                    if isinstance(e.get("current-rate"), (int, float)):
                        cur[i] = max(cur.get(i, 0), e["current-rate"])
        p = r.get("cpu-throttle-percentage")
        if p is not None:
            res["max_throttle"] = max(res["max_throttle"] or 0, p)
            steps = res["throttle_steps"]
            if not steps or steps[-1][1] != p:
                steps.append((ms, p, (r.get("ram") or {}).get("dirty-sync-count")))
        if st in ("completed", "failed", "cancelled"):
            return r, t
        if until is not None and t - t_mig >= until:
            return r, t
        if t - t_mig > deadline_s:
            return r, t
        sq.pump(POLL_S)


def cancel(sq, res, key):
    """migrate_cancel and wait for `cancelled` on the source."""
    res[key] = sq.cmd("migrate_cancel")
    r = sq.wait_status(("cancelled", "failed", "completed"), 60, poll=0.05)
    res[key + "_final"] = r
    return r


def check_source_runs_on(src, sq, res):
    st = sq.cmd("query-status")
    res["source_status_after"] = st
    if st.get("status") != "running":
        raise RunFailed(f"source not running after cancel: {json.dumps(st)}")
    k = src.last_pass()
    src.wait_pass_beyond(k + 1, 60)
    res["source_runs_on"] = True


def check_destination(g, src, dst, dq, res):
    dr = dq.wait_status(("completed", "failed"), 120)
    res["dst_reply"] = dr
    if dr.get("status") != "completed":
        raise RunFailed(f"destination: {json.dumps(dr)}")
    last = src.last_pass()
    dst.wait_pass_beyond(last + 1, 3 * g.wl_mem / g.rate + 30)
    res["verified"] = True


def guest_progress(src, sq, t_mig, t_done, res):
    """The guest's PASS rates before `migrate`, from `migrate` to the stop
    and in the last BEFORE_S before the stop."""
    stop = sq.wait_event("STOP", lambda e: e["_t"] >= t_mig, timeout=0.5)
    t_stop = stop["_t"] if stop else t_done
    res["stop_from"] = "STOP event" if stop else "completed poll"
    res["stop_s"] = round(t_stop - t_mig, 2)
    res["rate_before"] = pass_rate(src, t_mig - BEFORE_S, t_mig)
    res["rate_during"] = pass_rate(src, t_mig, t_stop)
    res["rate_last10"] = pass_rate(src, max(t_mig, t_stop - BEFORE_S), t_stop)
    res["passes_during"] = sum(1 for _k, _ms, t in src.passes() if t_mig < t <= t_stop)
    res["src_passes"] = [(k, round(t - t_mig, 3)) for k, _ms, t in src.passes()
                         if t_mig - BEFORE_S < t <= t_stop + 5]
    # Per throttle level: from the poll that first showed it to the next
    # level's (or the stop); 0 % from `migrate` to the first level.
    steps = [(0, 0)] + [(ms, p) for ms, p, _syncs in res.get("throttle_steps") or []]
    levels = []
    for i, (ms, p) in enumerate(steps):
        a = t_mig + ms / 1000
        b = t_mig + steps[i + 1][0] / 1000 if i + 1 < len(steps) else t_stop
        if b > a:
            levels.append((p, round(b - a, 2), pass_rate(src, a, b)))
    res["rate_by_throttle"] = levels
    dsteps = res.get("dl_steps") or []
    if dsteps:
        t_lim = t_mig + dsteps[0][0] / 1000
        res["dl_from_s"] = round(dsteps[0][0] / 1000, 2)
        res["dl_from_sync"] = dsteps[0][2]
        res["dl_limited_s"] = round(t_stop - t_lim, 2)
        res["rate_unlimited"] = pass_rate(src, t_mig, t_lim)
        res["rate_limited"] = pass_rate(src, t_lim, t_stop)
        res["passes_limited"] = sum(1 for _k, _ms, t in src.passes() if t_lim < t <= t_stop)


def body(g, src, dst, sq, dq, port, mode, res):
    sq.cmd("migrate-set-capabilities",
           caps(["events"] + (["auto-converge"] if mode in ("ac", "tailslow") else [])
                + (["dirty-limit"] if mode == "dl" else [])))
    params = {"max-bandwidth": BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT}
    if mode in ("ac", "tailslow"):
        params.update(QEMU_DEFAULTS)
        params["cpu-throttle-tailslow"] = mode == "tailslow"
    if mode == "dl":
        params["vcpu-dirty-limit"] = VCPU_DIRTY_LIMIT
        params["x-vcpu-dirty-limit-period"] = DIRTY_LIMIT_PERIOD
    sq.cmd("migrate-set-parameters", params)
    res["parameters"] = sq.cmd("query-migrate-parameters")
    res["capabilities"] = [c for c in sq.cmd("query-migrate-capabilities") if c.get("state")]
    if src.corrupt():
        raise RunFailed(f"CORRUPT before migrate: {src.corrupt()[:3]}")

    t_mig = time.monotonic()
    sq.cmd("migrate", {"uri": mig_uri(port)})

    if mode == "none":
        r, t = poll_until_done(sq, t_mig, res, NONE_S + 5, until=NONE_S)
        res["at_60s"] = r
        res["active_at_60s"] = r.get("status") == "active"
        res["look_s"] = round(t - t_mig, 2)
        res["syncs"] = (r.get("ram") or {}).get("dirty-sync-count")
        res["transferred_mib"] = round((r.get("ram") or {}).get("transferred", 0) / MIB, 1)
        res["rate_before"] = pass_rate(src, t_mig - BEFORE_S, t_mig)
        res["rate_during"] = pass_rate(src, t_mig, t)
        if r.get("status") == "completed":
            # Converged without help after all: check it as any other.
            res["status"] = "completed"
            res["src_reply"] = sq.wait_status(("completed",), 10)
            check_destination(g, src, dst, dq, res)
            return
        if r.get("status") != "active":
            raise RunFailed(f"not active at {NONE_S:.0f} s: {json.dumps(r)}")
        c = cancel(sq, res, "cancel_reply")
        if c.get("status") != "cancelled":
            raise RunFailed(f"after migrate_cancel: {json.dumps(c)}")
        check_source_runs_on(src, sq, res)
        res["status"] = "active at 60 s, cancelled"
        return

    if mode == "raise":
        ev = sq.wait_event("MIGRATION_PASS", lambda e: e["data"]["pass"] >= RAISE_PASS,
                           timeout=RAISE_AFTER_S - (time.monotonic() - t_mig))
        before = sq.cmd("query-migrate")
        res["before_raise"] = before
        res["raised_by"] = (f"MIGRATION_PASS {ev['data']['pass']}" if ev
                            else f"the {RAISE_AFTER_S:.0f} s limit, at sync"
                            f" {(before.get('ram') or {}).get('dirty-sync-count')}")
        if before.get("status") != "active":
            raise RunFailed(f"not active before the raise: {json.dumps(before)}")
        t_raise = time.monotonic()
        res["raise_at_s"] = round(t_raise - t_mig, 2)
        res["raise_reply"] = sq.cmd("migrate-set-parameters", {"max-bandwidth": RAISED_BANDWIDTH})
        res["parameters_after_raise"] = sq.cmd("query-migrate-parameters")

    r, t_done = poll_until_done(sq, t_mig, res, COMPLETE_TIMEOUT_S, vcpu_limits=mode == "dl")
    if r.get("status") not in ("completed", "failed", "cancelled"):
        res["last_active"] = r
        c = cancel(sq, res, "cancel_reply")
        res["status"] = f"not completed in {COMPLETE_TIMEOUT_S:.0f} s ({c.get('status')})"
        res["syncs"] = (r.get("ram") or {}).get("dirty-sync-count")
        return
    if r.get("status") != "completed":
        raise RunFailed(f"source {r.get('status')}: {json.dumps(r)}")
    r = sq.wait_status(("completed",), 10)  # QEMU: total-time set a moment later
    res["src_reply"] = r
    res["status"] = "completed"
    res["done_s"] = round(t_done - t_mig, 2)
    res["total_ms"] = r.get("total-time")
    res["downtime_ms"] = r.get("downtime")
    res["syncs"] = (r.get("ram") or {}).get("dirty-sync-count")
    res["transferred_mib"] = round((r.get("ram") or {}).get("transferred", 0) / MIB, 1)
    if mode == "raise":
        res["raise_to_done_ms"] = round((t_done - t_raise) * 1000)
    guest_progress(src, sq, t_mig, t_done, res)
    if mode == "dl":
        res["vcpu_dirty_limit_after"] = sq.cmd("query-vcpu-dirty-limit", check=False)
    check_destination(g, src, dst, dq, res)


def with_ring(g):
    """`g` with KVM's dirty ring of RING entries (-accel kvm,dirty-ring-size)."""
    gr = copy.copy(g)
    if "-accel" in g.base:
        i = g.base.index("-accel")
        gr.base = g.base[:i + 1] + [f"{g.base[i + 1]},dirty-ring-size={RING}"] + g.base[i + 2:]
    else:
        gr.base = list(g.base) + ["-accel", f"kvm,dirty-ring-size={RING}"]
    return gr


@contextlib.contextmanager
def ring_source_and_destination(g, snap, wd, settle_s):
    """miglib's source_and_destination (loopback) with the dirty ring on the
    source only."""
    src = start_from(with_ring(g), "src", snap, wd, settle_s=settle_s)
    dst = None
    try:
        port = free_port()
        dst = g.spawn("dst", wd, incoming=f"tcp:127.0.0.1:{port}")
        dst.qmp  # noqa: B018 - connects: the destination is set up
        yield src, dst, port
    finally:
        src.kill()
        if dst:
            dst.kill()


def ring_warned(r):
    return any("dirty ring overflowed" in l for l in (r.get("vmm_stderr") or {}).get("source", []))


def vmm_lines(vm):
    """minivmm's own stderr lines (merged into the console capture), e.g.
    a dirty ring's overflow warning."""
    with vm.cv:
        return [l.decode(errors="replace") for _, l in vm.lines if l.startswith(b"minivmm:")]


def wait_quiet(limit_s, res):
    """Wait up to limit_s until no build, test or foreign VMM runs."""
    t = time.monotonic()
    busy = busy_processes()
    while busy and time.monotonic() - t < limit_s:
        time.sleep(5)
        busy = busy_processes()
    res["waited_for_quiet_s"] = round(time.monotonic() - t, 1)
    res["busy_at_start"] = busy
    res["load_at_start"] = open("/proc/loadavg").read().split()[:3]
    res["started_at"] = time.strftime("%Y-%m-%d %H:%M:%S")


def one_run(g, snap, wd, mode, wait_quiet_s):
    res = {"vmm": g.kind, "mode": mode, "status": None, "verified": False}
    wait_quiet(wait_quiet_s, res)
    pair = (ring_source_and_destination(g, snap, wd, SETTLE_S) if mode == "dl"
            else source_and_destination(g, snap, wd, settle_s=SETTLE_S))
    try:
        with pair as (src, dst, port):
            res["src_argv"] = src.argv
            sq, dq = src.qmp, dst.qmp
            try:
                body(g, src, dst, sq, dq, port, mode, res)
            except (RunFailed, QmpError, TimeoutError, RuntimeError, EOFError, OSError) as e:
                res["status"] = "failed"
                res["error"] = str(e)[:2000]
                res["last_replies"] = {}
                for side, q in (("source", sq), ("destination", dq)):
                    try:
                        res["last_replies"][side] = q.cmd("query-migrate", timeout=5)
                    except Exception as e2:  # noqa: BLE001 - the VMM may be gone
                        res["last_replies"][side] = f"query-migrate failed: {e2}"
                res["tails"] = {"source": src.tail(), "destination": dst.tail()}
            res["corrupt"] = src.corrupt() + dst.corrupt()
            res["vmm_stderr"] = {side: vmm_lines(vm) for side, vm in (("source", src),
                                                                       ("destination", dst))}
            if res["corrupt"] and res["status"] != "failed":
                res["status"] = "failed"
                res["error"] = f"CORRUPT: {res['corrupt'][:3]}"
    except (TimeoutError, RuntimeError, OSError) as e:  # restoring or starting a VM
        res["status"] = "failed"
        res["error"] = str(e)[:2000]
    res.setdefault("corrupt", [])
    res["busy_at_end"] = busy_processes()
    res["ended_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return res


def log_run(label, i, r, dt):
    q = (f"[started {r.get('started_at')}, waited {r.get('waited_for_quiet_s')} s for quiet,"
         f" load {(r.get('load_at_start') or ['?'])[0]}; busy at start {len(r.get('busy_at_start') or [])},"
         f" at end {len(r.get('busy_at_end') or [])}]")
    log(f"  {label} run {i + 1} {q}")
    for line in dict.fromkeys((r.get("busy_at_start") or []) + (r.get("busy_at_end") or [])):
        log(f"    busy: {line}")
    rate = (f" PASS/s before {fmt(r.get('rate_before'), '', 2)}, during"
            f" {fmt(r.get('rate_during'), '', 2)}, last 10 s {fmt(r.get('rate_last10'), '', 2)}")
    if r["status"] == "failed":
        log(f"  {label} run {i + 1} ({dt:.0f} s): FAILED: {r.get('error')}")
        for side, rep in (r.get("last_replies") or {}).items():
            log(f"    {side}: {json.dumps(rep)}")
        for side, t in (r.get("tails") or {}).items():
            log(f"    {side} console tail:\n      " + t.replace("\n", "\n      "))
        return
    if r["mode"] == "none" and r["status"] != "completed":
        log(f"  {label} run {i + 1} ({dt:.0f} s): {r['status']} (looked at {r['look_s']} s:"
            f" {r['at_60s'].get('status')}, syncs {r['syncs']}, {r['transferred_mib']} MiB);"
            f" cancel -> {r['cancel_reply_final'].get('status')}, source"
            f" {r['source_status_after'].get('status')}, runs on {r.get('source_runs_on')};{rate}")
        return
    if r["status"] != "completed":
        log(f"  {label} run {i + 1} ({dt:.0f} s): {r['status']}: syncs {r.get('syncs')},"
            f" max throttle {r.get('max_throttle')}, steps {r.get('throttle_steps')}")
        log(f"    last: {json.dumps(r.get('last_active'))}")
        return
    log(f"  {label} run {i + 1} ({dt:.0f} s): completed {r['done_s']} s after migrate"
        f" (total-time {r['total_ms']} ms, downtime {r['downtime_ms']} ms), syncs {r['syncs']},"
        f" {r['transferred_mib']} MiB, max throttle {r.get('max_throttle')}"
        + (f", raised by {r['raised_by']} at {r['raise_at_s']} s, -> completed"
           f" {r['raise_to_done_ms']} ms" if r["mode"] == "raise" else "")
        + f"; stop at {r['stop_s']} s ({r['stop_from']});{rate}; verified {r['verified']}")
    if r["mode"] == "dl":
        log(f"    dirty-limit keys (max): {r.get('dl_max')}; changes (ms, keys, syncs):"
            f" {r.get('dl_steps')}; limited from {r.get('dl_from_s')} s (sync"
            f" {r.get('dl_from_sync')}) for {r.get('dl_limited_s')} s; guest PASS/s unlimited"
            f" {fmt(r.get('rate_unlimited'), '', 2)}, limited {fmt(r.get('rate_limited'), '', 2)}"
            f" ({r.get('passes_limited')} PASS); query-vcpu-dirty-limit current-rate max"
            f" {r.get('vcpu_current_rate_max')}, after {r.get('vcpu_dirty_limit_after')}")
        for side, lines in (r.get("vmm_stderr") or {}).items():
            for l in lines:
                log(f"    {side}: {l}")
        for ms, q in (r.get("vcpu_dirty_limit_samples") or [])[:12]:
            log(f"      query-vcpu-dirty-limit at {ms} ms: {json.dumps(q)}")
    if r.get("throttle_steps"):
        log(f"    throttle (ms after migrate, %, syncs): {r['throttle_steps']}")
        log("    guest PASS/s by throttle level (%, s at it, PASS/s): "
            + ", ".join(f"{p} % {d} s {fmt(x, '', 2)}" for p, d, x in r["rate_by_throttle"]))


def bench_mode(g, snap, wd, mode, runs, label, wait_quiet_s):
    out = []
    for i in range(runs):
        t = time.monotonic()
        r = one_run(g, snap, wd, mode, wait_quiet_s)
        out.append(r)
        log_run(label, i, r, time.monotonic() - t)
    return out


def _rate_cell(ok):
    m = lambda k: median([r.get(k) for r in ok])
    b, d = m("rate_before"), m("rate_during")
    ratio = f" ({100 * d / b:.0f} %)" if b and d is not None else ""
    return f"{fmt(b, '', 2)} → {fmt(d, '', 2)}{ratio}"


def _integrity(runs):
    corrupt = any(r.get("corrupt") for r in runs)
    return "yes" if corrupt else "no"


def print_tables(rows, a, quiet):
    quiet = machine_note() and quiet
    print()
    for mode in a.modes.split(","):
        mine = [(k, runs) for (k, m), runs in rows.items() if m == mode]
        if not mine:
            continue
        print(f"**{MODES[mode]}**\n")
        if mode == "none":
            print(f"| VMM | status {NONE_S:.0f} s after migrate | syncs by then | ram.transferred then"
                  " | guest PASS/s: 10 s before → migrate to 60 s"
                  " | after migrate_cancel | CORRUPT |")
            print("|---|---|---|---|---|---|---|")
            for kind, runs in mine:
                ok = [r for r in runs if r["status"] != "failed"]
                active = sum(1 for r in ok if r.get("active_at_60s"))
                ran_on = sum(1 for r in ok if r.get("source_runs_on"))
                canc = sum(1 for r in ok if (r.get("cancel_reply_final") or {}).get("status")
                           == "cancelled")
                fails = "; ".join(r.get("error", "")[:120] for r in runs if r["status"] == "failed")
                print(f"| {kind} | active in {active}/{len(runs)}{': ' + fails if fails else ''}"
                      f" | {fmt(median([r.get('syncs') for r in ok]))}"
                      f" | {fmt(median([r.get('transferred_mib') for r in ok]), ' MiB', 1)}"
                      f" | {_rate_cell(ok)}"
                      f" | cancelled {canc}/{len(runs)}, guest ran on {ran_on}/{len(runs)}"
                      f" | {_integrity(runs)} |")
        else:
            extra = (" | raised at | raise → completed" if mode == "raise" else
                     " | dirty-limit keys in query-migrate (polled max)"
                     " | limit applied (s after migrate, at sync)"
                     " | guest PASS/s: migrate → limit, while limited (s limited)"
                     " | query-vcpu-dirty-limit highest current-rate (MB/s, per vCPU)"
                     " | source warned of a ring overflow"
                     if mode == "dl" else
                     " | first throttle (s after migrate, at sync) | guest PASS/s at each"
                     " throttle level (% → PASS/s)")
            ncol = 17 if mode == "dl" else 14
            print("| VMM | completed | migrate → completed | total-time | downtime"
                  " | highest cpu-throttle-percentage | syncs | transferred"
                  f"{extra} | guest PASS/s: 10 s before → migrate to stop"
                  " | last 10 s before stop | destination verified | CORRUPT |")
            print("|---" * ncol + "|")
            for kind, runs in mine:
                na = [r for r in runs if r["status"] == "n/a"]
                if na:
                    print(f"| {kind} | n/a: {na[0]['reason']}" + " |" * (ncol - 1))
                    continue
                ok = [r for r in runs if r["status"] == "completed"]
                m = lambda k: median([r.get(k) for r in ok])
                rng = lambda k: (f" ({min(r[k] for r in ok)}-{max(r[k] for r in ok)})"
                                 if len(ok) > 1 and all(r.get(k) is not None for r in ok) else "")
                fails = "; ".join((r.get("error") or r["status"])[:120] for r in runs
                                  if r["status"] != "completed")
                thr = m("max_throttle")
                thr_s = fmt(thr, " %") if any(r.get("max_throttle") is not None for r in ok) \
                    else "not shown"
                if mode == "dl":
                    keys = {}
                    for r in ok:
                        for k, v in (r.get("dl_max") or {}).items():
                            keys.setdefault(k, []).append(v)
                    shown = ", ".join(f"`{k}` {fmt(median(vs), '', 0)}"
                                      + (f" ({min(vs)}-{max(vs)})" if len(set(vs)) > 1 else "")
                                      + (f" in {len(vs)}/{len(ok)}" if len(vs) < len(ok) else "")
                                      for k, vs in sorted(keys.items()))
                    lim = [r for r in ok if r.get("dl_from_s") is not None]
                    when = (f"{fmt(median([r['dl_from_s'] for r in lim]), ' s', 1)}{rng('dl_from_s') if len(lim) == len(ok) else ''},"
                            f" sync {fmt(median([r.get('dl_from_sync') for r in lim]))}"
                            + (f" (in {len(lim)}/{len(ok)})" if len(lim) < len(ok) else "")
                            if lim else "never shown")
                    cur = {}
                    for r in ok:
                        for c, v in (r.get("vcpu_current_rate_max") or {}).items():
                            cur.setdefault(c, []).append(v)
                    curs = ", ".join(f"vCPU {c}: {fmt(median(vs))}"
                                     + (f" ({min(vs)}-{max(vs)})" if len(vs) > 1 else "")
                                     for c, vs in sorted(cur.items()))
                    rc = (f" | {shown or 'none'} | {when}"
                          f" | {fmt(median([r.get('rate_unlimited') for r in lim]), '', 2)},"
                          f" {fmt(median([r.get('rate_limited') for r in lim]), '', 2)}"
                          f" ({fmt(median([r.get('dl_limited_s') for r in lim]), ' s', 1)})"
                          f" | {curs or 'not shown'}"
                          f" | {sum(1 for r in ok if ring_warned(r))}/{len(ok)}")
                elif mode != "raise":
                    firsts = [r["throttle_steps"][0] for r in ok if r.get("throttle_steps")]
                    first = (f"{fmt(median([f[0] / 1000 for f in firsts]), ' s', 1)},"
                             f" sync {fmt(median([f[2] for f in firsts]))}" if firsts else "none")
                    by_level = {}
                    for r in ok:
                        for p, _d, x in r.get("rate_by_throttle") or []:
                            by_level.setdefault(p, []).append(x)
                    levels = ", ".join(f"{p} → {fmt(median(xs), '', 2)}"
                                       for p, xs in sorted(by_level.items()))
                    rc = f" | {first} | {levels or 'n/a'}"
                if mode == "raise":
                    by = ", ".join(r.get("raised_by", "?") for r in ok)
                    rc = (f" | {fmt(m('raise_at_s'), ' s', 1)}: {by}"
                          f" | {fmt(m('raise_to_done_ms'), ' ms')}{rng('raise_to_done_ms')}")
                verified = sum(1 for r in ok if r.get("verified"))
                print(f"| {kind} | {len(ok)}/{len(runs)}{': ' + fails if fails else ''}"
                      f" | {fmt(m('done_s'), ' s', 1)}{rng('done_s')}"
                      f" | {fmt(m('total_ms'), ' ms')}"
                      f" | {fmt(m('downtime_ms'), ' ms')}{rng('downtime_ms')}"
                      f" | {thr_s}{rng('max_throttle')}"
                      f" | {fmt(m('syncs'))}{rng('syncs')}"
                      f" | {fmt(m('transferred_mib'), ' MiB', 1)}{rc}"
                      f" | {_rate_cell(ok)} | {fmt(m('rate_last10'), '', 2)}"
                      f" | {verified}/{len(ok)} | {_integrity(runs)} |")
        print()
    print(f"(median of {a.runs} runs, min-max in brackets; tcp loopback; 128 MiB, 2 vCPUs,"
          f" workload.mem=16 workload.rate={RATE}; source max-bandwidth {BANDWIDTH} B/s,"
          f" downtime-limit {DOWNTIME_LIMIT} ms; auto-converge with"
          f" {', '.join(f'{k} {v}' for k, v in QEMU_DEFAULTS.items() if k != 'cpu-throttle-tailslow')};"
          f" raise: max-bandwidth {RAISED_BANDWIDTH} at MIGRATION_PASS {RAISE_PASS} or"
          f" {RAISE_AFTER_S:.0f} s; dirty-limit: source -accel kvm,dirty-ring-size={RING},"
          f" vcpu-dirty-limit {VCPU_DIRTY_LIMIT} MB/s, x-vcpu-dirty-limit-period"
          f" {DIRTY_LIMIT_PERIOD} ms, query-vcpu-dirty-limit every {VCPU_LIMIT_POLL_S:.0f} s;"
          f" query-migrate polled every {POLL_S * 1000:.0f} ms;"
          f" machine {'quiet' if quiet else 'NOT quiet, see stderr'})")
    allr = [r for rs in rows.values() for r in rs if r.get("started_at")]
    if allr:
        qs = sum(1 for r in allr if not r.get("busy_at_start"))
        qe = sum(1 for r in allr if not r.get("busy_at_end"))
        print(f"(runs {min(r['started_at'] for r in allr)} to {max(r['ended_at'] for r in allr)}"
              f" machine time; {qs}/{len(allr)} runs started and {qe}/{len(allr)} ended with no"
              f" build, test or foreign VMM running (each waited up to {a.wait_quiet:.0f} s for"
              f" that, longest wait {max(r['waited_for_quiet_s'] for r in allr):.0f} s);"
              f" binary {a.minivmm}, sha256 {binary_info(a.minivmm)['sha256'][:16]}…)")
    if a.json:
        b = binary_info(a.minivmm)
        with open(a.json, "w") as f:
            json.dump([{"vmm": k, "mode": m, "binary": b, "machine_quiet": quiet, "runs": rs}
                       for (k, m), rs in rows.items()], f, indent=1, default=str)


def binary_info(path):
    st = os.stat(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"path": path, "mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime)),
            "sha256": digest}


def qemu_version(qemu):
    """(major, minor) of `qemu --version`, or None."""
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="none,ac,tailslow,raise,dl",
                    help="comma-separated: none, ac (auto-converge), tailslow, raise,"
                    " dl (dirty-limit)")
    ap.add_argument("--wait-quiet", type=float, default=300,
                    help="before each run, wait up to this many s for no build/test/foreign VMM")
    common_args(ap)
    a = ap.parse_args()
    a.modes = ",".join(ALIASES.get(m, m) for m in a.modes.split(","))
    for m in a.modes.split(","):
        if m not in MODES:
            ap.error(f"unknown mode {m!r} (none, ac, tailslow, raise, dl)")
    quiet = machine_note()
    kinds = a.vmms.split(",")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="converge-bench-") as wd:
        for kind in kinds:
            g = Guest(kind, a.minivmm, a.qemu, a.kernel, a.initrd, RATE)
            name = "minivmm" if kind == "minivmm" else "QEMU"
            qv = qemu_version(a.qemu) if kind != "minivmm" else None
            todo = []
            for mode in a.modes.split(","):
                if mode == "dl" and kind != "minivmm" and (qv is None or qv < (8, 1)):
                    why = (f"QEMU {qv[0]}.{qv[1]} has no dirty-limit (8.1+)" if qv
                           else "QEMU's version unknown; dirty-limit needs 8.1+")
                    log(f"  {name}, {MODES[mode]}: not run: {why}")
                    rows[(name, mode)] = [{"vmm": kind, "mode": mode, "status": "n/a",
                                           "reason": why}]
                else:
                    todo.append(mode)
            if not todo:
                continue
            snap = os.path.join(wd, f"{kind}.snap")
            make_snapshot(g, snap, wd)
            for mode in todo:
                rows[(name, mode)] = bench_mode(g, snap, wd, mode, a.runs,
                                                f"{name}, {MODES[mode]}", a.wait_quiet)
            os.unlink(snap)
    print_tables(rows, a, quiet)


if __name__ == "__main__":
    main()

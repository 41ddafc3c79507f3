#!/usr/bin/env python3
"""COLO checkpoint benchmark (used by bench/colo.sh, see there).

Per VMM and guest dirty rate: one boot, saved after the first PASS. Then,
for each mode (minivmm: `periodic`, `match`, `differ`; QEMU: periodic
only):
 - without COLO: a VM restored from the save runs WINDOW s; PASS intervals
   (once per output kind: timed `PASS k ms=UPTIME` lines, and for `match`
   deterministic `PASS k` lines, switched on by typing `detout` on the
   guest's console).
 - with COLO: a primary restored from the save (for `match` switched to
   deterministic output first), a secondary on tcp loopback, x-colo (and
   events) on both, the mode's x-checkpoint-delay (periodic: DELAY, with
   x-colo-periodic=true on minivmm; running: RUNNING_DELAY), `migrate`;
   once the primary is in `colo`, 1 s of warm-up, then the window: every
   checkpoint's pause (minivmm: x-colo's last-pause-ms per checkpoint,
   polled; both VMMs: STOP -> RESUME event timestamps on the primary),
   checkpoints by cause and the output hold times (minivmm's x-colo),
   bytes per checkpoint (the primary's socket counter bytes_sent from `ss`,
   over the window, divided by the checkpoints; minivmm also x-colo), and
   the PASS lines the primary's console released.
 - failover (minivmm, once per mode at FAILOVER_RATE, at the end of that
   point's window): after the next PASS line on the primary's console and
   half a PASS interval more, kill -9 the primary, `x-colo-lost-heartbeat`
   on the secondary, and time from that command to COLO_EXIT, to the
   secondary running, to the first byte on its console and to its first
   PASS line numbered above the last one the primary released; the
   primary's released console followed by the secondary's must count on
   with no PASS line lost or repeated.

Guest slowdown, two ways: the PASS interval in guest time (`ms=` values;
both VMMs freeze the guest clock while it is paused, so this does not
include the checkpoint pauses; not for deterministic lines, which carry no
time) and in host time (console arrival times of the primary's released
output; released at checkpoints or when matched, which shifts lines by up
to one hold time: over the window a small error).

--tls runs the COLO connection over TLS (the checkpoints and the return
path): see bench/miglib.py (credentials of tools/tls-certs.sh, tls-creds on
the secondary before the primary connects and on the primary before
`migrate`; snapshots and the runs without COLO stay plain); rows read
"VMM + TLS", and the bytes per checkpoint (`ss`) then count TLS records.
"""

import argparse
import json
import os
import re
import subprocess
import tempfile
import threading
import time

import miglib
from miglib import (in_source_ns, mig_uri, Guest, Vm, add_tls_arg, common_args, fmt, free_port, log,
                    machine_note, make_snapshot, median, pct, source_and_destination, start_from,
                    tls_credentials, tls_endpoints, tls_label, tls_object, tls_params)

BYTES_RE = re.compile(r"bytes_sent:(\d+)")
# Timed (`PASS k ms=UPTIME`) and deterministic (`PASS k`) lines.
PASS_RE = re.compile(rb"PASS (\d+)(?: ms=(\d+))?")
CAUSES = ("checkpoints-periodic", "checkpoints-output-differed", "checkpoints-compare-timeout")
MODES = {
    # name: (x-colo-periodic, deterministic output)
    "periodic": (True, False),
    "match": (False, True),
    "differ": (False, False),
}
MODE_LABEL = {
    "periodic": "periodic",
    "match": "running, output matches",
    "differ": "running, output differs",
}


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
    """(median guest-ms interval, host ms per pass, number of PASS lines)
    from [(k, guest ms or None, host time)]."""
    if len(passes) < 2:
        return None, None, len(passes)
    guest = [b[1] - a[1] for a, b in zip(passes, passes[1:])
             if b[0] == a[0] + 1 and a[1] is not None and b[1] is not None]
    dk = passes[-1][0] - passes[0][0]
    host = (passes[-1][2] - passes[0][2]) * 1000 / dk if dk > 0 else None
    return median(guest), host, len(passes)


class ConsoleVm(Vm):
    """A minivmm process whose serial console (stdout) is read in chunks,
    each with its arrival time (the first byte after failover), split into
    lines as Vm's; stderr (minivmm's log) kept apart; stdin a pipe when
    asked (to type on the guest's console)."""

    def __init__(self, name, argv, workdir, stdin=False):  # noqa: D107 - Vm's, by other means
        self.name = name
        self.qmp_path = os.path.join(workdir, f"{name}-{os.getpid()}-{len(miglib._PROCS)}.qmp")
        if os.path.exists(self.qmp_path):
            os.unlink(self.qmp_path)
        self.argv = argv + ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self.lines = []  # (host monotonic time the line's end arrived, bytes)
        self.chunks = []  # (host monotonic time, bytes) as read
        self.partial = b""
        self.log_lines = []  # (host monotonic time, stderr line)
        self.cv = threading.Condition()
        self.eof = False
        self.p = subprocess.Popen(self.argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  preexec_fn=miglib._pdeathsig)
        miglib._PROCS.append(self.p)
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()
        self.te = threading.Thread(target=self._read_err, daemon=True)
        self.te.start()
        self._q = None

    def _read(self):
        fd = self.p.stdout.fileno()
        while True:
            try:
                b = os.read(fd, 65536)
            except OSError:
                b = b""
            now = time.monotonic()
            with self.cv:
                if not b:
                    self.eof = True
                    self.cv.notify_all()
                    return
                self.chunks.append((now, b))
                buf = self.partial + b
                *done, self.partial = buf.split(b"\n")
                for line in done:
                    self.lines.append((now, line.rstrip(b"\r")))
                self.cv.notify_all()

    def _read_err(self):
        for line in iter(self.p.stderr.readline, b""):
            self.log_lines.append((time.monotonic(), line.rstrip(b"\r\n").decode(errors="replace")))

    def passes(self, since=0):
        """[(k, guest ms or None, host time)] of the PASS lines from index `since`."""
        out = []
        with self.cv:
            for t, l in self.lines[since:]:
                m = PASS_RE.search(l)
                if m:
                    out.append((int(m.group(1)), int(m.group(2)) if m.group(2) else None, t))
        return out

    def wait_pass_beyond(self, k, timeout, since=0):
        return self.wait_line(lambda l: (m := PASS_RE.search(l)) is not None
                              and int(m.group(1)) > k, timeout, since)

    def text(self):
        with self.cv:
            return b"".join(c for _, c in self.chunks)

    def type(self, s):
        self.p.stdin.write(s.encode())
        self.p.stdin.flush()

    def wait_eof(self, timeout):
        deadline = time.monotonic() + timeout
        with self.cv:
            while not self.eof and time.monotonic() < deadline:
                self.cv.wait(max(0.0, deadline - time.monotonic()))
            return self.eof

    def tail(self, n=8):
        s = super().tail(n)
        if self.log_lines:
            s += "\n[log] " + "\n[log] ".join(l for _, l in self.log_lines[-n:])
        return s


def restore(g, name, snap, wd, detout=False, settle_s=1.0, timeout=120, extra=()):
    """A minivmm restored from `snap` (`extra`: more options for it),
    running (with deterministic PASS lines when `detout`: typed on its
    console), `settle_s` after that."""
    vm = ConsoleVm(name, list(g.base) + list(extra) + ["-incoming", g.load_uri(snap)], wd,
                   stdin=True)
    q = vm.qmp
    deadline = time.monotonic() + timeout
    while q.cmd("query-status").get("status") != "running":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: not running after restore")
        q.pump(0.05)
    if detout:
        i = vm.nlines()
        vm.type("detout\n")
        vm.wait_text("OUTPUT deterministic", 60, since=i)
    time.sleep(settle_s)
    return vm


def baseline(g, snap, wd, window, detout=False):
    if g.kind == "minivmm":
        vm = restore(g, "solo", snap, wd, detout=detout)
    else:
        vm = start_from(g, "solo", snap, wd, settle_s=1.0)
    try:
        i0 = vm.nlines()
        time.sleep(window)
        ps = [(k, ms, t) for k, ms, t in vm.passes(i0)]
        gi, hi, n = pass_stats(ps)
        return {"detout": detout, "guest_ms": gi, "host_ms": hi, "passes": n, "corrupt": vm.corrupt()}
    finally:
        vm.kill()


def measure(g, p, s, pq, sq, port, window):
    """The measurement window on a pair in COLO; see the module doc."""
    ev0 = len(pq.events)
    i0 = p.nlines()
    b0 = sent_bytes(port)
    x0 = pq.cmd("query-migrate").get("x-colo")
    if x0 is None:
        # minivmm shows x-colo from the first checkpoint on (none yet with
        # a running secondary's longer delay); QEMU never.
        x0 = {"checkpoints": 0} if g.kind == "minivmm" else {}
    t0 = time.monotonic()
    polled = []  # (pause ms, bytes) per checkpoint seen one at a time (x-colo)
    missed = 0  # checkpoints that came two or more per poll
    last_n = x0.get("checkpoints")
    while time.monotonic() < t0 + window:
        if last_n is not None:
            x = pq.cmd("query-migrate").get("x-colo") or {}
            n = x.get("checkpoints", last_n)
            if n == last_n + 1:
                polled.append((x["last-pause-ms"], x["last-bytes"]))
            elif n > last_n + 1:
                missed += n - last_n - 1
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
    ts = lambda e: e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6  # noqa: E731
    ev_pauses = []
    stop = None
    for e in evs:
        if e["event"] == "STOP":
            stop = ts(e)
        elif e["event"] == "RESUME" and stop is not None:
            ev_pauses.append((ts(e) - stop) * 1000)
            stop = None
    res = {
        "window_s": t1 - t0,
        "status_end": (end.get("status"), send.get("status")),
        "errors": [d for d in (end.get("error-desc"), send.get("error-desc")) if d],
        "ev_pauses": ev_pauses,
        "polled": polled,
        "polled_missed": missed,
        "x_start": x0,
        "x_end": x1,
        "x_secondary_end": send.get("x-colo"),
        "sent": b1 - b0,
    }
    if x1:
        n = x1["checkpoints"] - x0.get("checkpoints", 0)
        res["checkpoints"] = n
        tot = lambda x, k: x.get(k, 0) * x.get("checkpoints", 0)  # noqa: E731
        res["x_avg_pause_ms"] = ((tot(x1, "avg-pause-ms") - tot(x0, "avg-pause-ms")) / n
                                 if n else None)
        res["x_avg_bytes"] = (tot(x1, "avg-bytes") - tot(x0, "avg-bytes")) / n if n else None
        res["by_cause"] = {c: x1.get(c, 0) - x0.get(c, 0) for c in CAUSES}
        res["hold_p50_ms"] = x1.get("output-hold-p50-ms")
        res["hold_p99_ms"] = x1.get("output-hold-p99-ms")
        res["output"] = {k: x1.get(k, 0) - x0.get(k, 0)
                         for k in ("output-held-bytes", "output-released-bytes", "output-matched-bytes")}
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


def pass_numbers(text):
    """PASS numbers of the complete lines of `text`, in order."""
    lines = text.split(b"\n")[:-1]
    return [int(m.group(1)) for l in lines if (m := PASS_RE.search(l))]


def failover(p, s, sq, interval_ms):
    """Kill the primary half a PASS interval after its next PASS line,
    fail over to the secondary; the times (see the module doc)."""
    i = p.nlines()
    p.wait_line(lambda l: PASS_RE.search(l) is not None, max(60.0, 3 * interval_ms / 1000), since=i)
    time.sleep(interval_ms / 2000)
    s_before = len(s.chunks)
    t_kill = time.monotonic()
    p.p.kill()
    p.p.wait()
    p.wait_eof(10)
    released = p.text()
    rel_passes = pass_numbers(released)
    last = max(rel_passes) if rel_passes else 0
    last_t = max((t for t, l in p.lines if PASS_RE.search(l)), default=None)
    ev0 = len(sq.events)
    t_cmd = time.monotonic()
    sq.cmd("x-colo-lost-heartbeat")
    t_ret = time.monotonic()
    out = {"kill_to_cmd_ms": (t_cmd - t_kill) * 1000,
           "kill_after_last_released_pass_ms": (t_kill - last_t) * 1000 if last_t else None,
           "last_released_pass": last, "secondary_chunks_before": s_before,
           "cmd_return_ms": (t_ret - t_cmd) * 1000}
    e = sq.wait_event("COLO_EXIT", timeout=30, since=ev0)
    out["colo_exit"] = e and e.get("data")
    out["to_colo_exit_ms"] = (e["_t"] - t_cmd) * 1000 if e else None
    deadline = time.monotonic() + 30
    st = None
    while time.monotonic() < deadline:
        st = sq.cmd("query-status").get("status")
        if st == "running":
            break
        sq.pump(0.005)
    out["to_running_ms"] = (time.monotonic() - t_cmd) * 1000 if st == "running" else None
    try:
        j = s.wait_pass_beyond(last, 60)
        out["to_new_pass_ms"] = (s.lines[j][0] - t_cmd) * 1000
        out["new_pass_line"] = s.lines[j][1].decode(errors="replace")
        s.wait_pass_beyond(last + 2, 60)
    except (TimeoutError, RuntimeError) as ex:
        out["error"] = str(ex)
    with s.cv:
        first = s.chunks[s_before] if len(s.chunks) > s_before else None
    out["to_first_byte_ms"] = (first[0] - t_cmd) * 1000 if first else None
    # Guest time from the last released PASS to the first new one (timed lines).
    ms = {k: v for k, v, _ in p.passes() + s.passes() if v is not None}
    nxt = min((k for k, _, _ in s.passes() if k > last), default=None)
    out["guest_ms_last_to_new"] = (ms[nxt] - ms[last]) if nxt in ms and last in ms else None
    out["first_bytes"] = first[1][:80].decode(errors="replace") if first else None
    # The primary's released output, then the secondary's: PASS numbers
    # must go on by one.
    whole = pass_numbers(released + s.text())
    out["pass_sequence_ok"] = all(b == a + 1 for a, b in zip(whole, whole[1:]))
    out["pass_sequence_tail"] = whole[-8:]
    out["released_tail"] = released[-60:].decode(errors="replace")
    out["secondary_head"] = s.text()[:120].decode(errors="replace")
    out["secondary_log"] = [l for _, l in s.log_lines][-10:]
    out["corrupt"] = s.corrupt()
    return out


def colo_minivmm(g, snap, wd, window, mode, delay, failover_interval=None, tls_dir=None):
    periodic, detout = MODES[mode]
    p = restore(g, "primary", snap, wd, detout=detout, extra=tls_object(tls_dir, "client"))
    s = None
    try:
        port = free_port()
        s = ConsoleVm("secondary", list(g.base) + tls_object(tls_dir, "server")
                      + ["-incoming", f"tcp:127.0.0.1:{port}"], wd)
        sq, pq = s.qmp, p.qmp
        if tls_dir:
            # Before the primary can connect (as source_and_destination does).
            sq.cmd("migrate-set-parameters", tls_params(tls_dir))
        caps = {"capabilities": [{"capability": "x-colo", "state": True},
                                 {"capability": "events", "state": True}]}
        sq.cmd("migrate-set-capabilities", caps)
        pq.cmd("migrate-set-capabilities", caps)
        pq.cmd("migrate-set-parameters", {"x-checkpoint-delay": delay, "x-colo-periodic": periodic,
                                          **tls_params(tls_dir)})
        params = pq.cmd("query-migrate-parameters")
        t_mig = time.monotonic()
        pq.cmd("migrate", {"uri": mig_uri(port)})
        r = pq.wait_status(("colo", "failed", "completed"), 180)
        if r.get("status") != "colo":
            raise RuntimeError(f"{g.kind}: COLO did not start: {r}")
        to_colo = time.monotonic() - t_mig
        pq.pump(1.0)
        res = measure(g, p, s, pq, sq, port, window)
        res["to_colo_s"] = to_colo
        res["mode"] = mode
        res["delay_ms"] = delay
        res["params"] = {k: params.get(k) for k in ("x-checkpoint-delay", "x-colo-periodic",
                                                    "x-colo-compare-timeout", "x-peer-timeout")
                         + (("tls-creds",) if tls_dir else ())}
        if failover_interval:
            res["failover"] = failover(p, s, sq, failover_interval)
        res["logs"] = {"primary": [l for _, l in p.log_lines][-10:],
                       "secondary": [l for _, l in s.log_lines][-10:]}
        return res
    finally:
        p.kill()
        if s:
            s.kill()


def colo_qemu(g, snap, wd, window, delay, tls_dir=None):
    """QEMU: periodic checkpoints to a paused secondary (no colo-compare)."""
    with source_and_destination(g, snap, wd, ("primary", "secondary"), 1.0,
                                **tls_endpoints(tls_dir)) as (p, s, port):
        sq = s.qmp
        pq = p.qmp
        caps = {"capabilities": [{"capability": "x-colo", "state": True},
                                 {"capability": "events", "state": True}]}
        sq.cmd("migrate-set-capabilities", caps)
        pq.cmd("migrate-set-capabilities", caps)
        pq.cmd("migrate-set-parameters", {"x-checkpoint-delay": delay, **tls_params(tls_dir)})
        params = pq.cmd("query-migrate-parameters")
        t_mig = time.monotonic()
        pq.cmd("migrate", {"uri": mig_uri(port)})
        r = pq.wait_status(("colo", "failed", "completed"), 180)
        if r.get("status") != "colo":
            raise RuntimeError(f"{g.kind}: COLO did not start: {r}")
        to_colo = time.monotonic() - t_mig
        pq.pump(1.0)
        res = measure(g, p, s, pq, sq, port, window)
        res["to_colo_s"] = to_colo
        res["mode"] = "periodic"
        res["delay_ms"] = delay
        if tls_dir:
            res["params"] = {"tls-creds": params.get("tls-creds")}
        return res


def log_point(kind, rate, mode, dt, window, b, c):
    bc = c.get("by_cause") or {}
    log(f"  {kind} {mode} rate={rate} ({dt:.0f} s, window {window:.0f} s,"
        f" delay {c['delay_ms']} ms): no COLO: PASS {fmt(b['guest_ms'])} ms guest /"
        f" {fmt(b['host_ms'])} ms host ({b['passes']} lines); COLO: {c['checkpoints']} checkpoints"
        f" (periodic {bc.get(CAUSES[0], 'n/a')}, differed {bc.get(CAUSES[1], 'n/a')},"
        f" timeout {bc.get(CAUSES[2], 'n/a')}),"
        f" pause avg {fmt(c['pause_avg'], '', 2)} p50 {fmt(c['pause_p50'], '', 2)}"
        f" p99 {fmt(c['pause_p99'], '', 2)} max {fmt(c['pause_max'], '', 2)} ms"
        f" ({c['pause_src']}, {len(c['polled'])} polled, {c['polled_missed']} missed);"
        f" STOP/RESUME: {len(c['ev_pauses'])} pairs avg"
        f" {fmt(sum(c['ev_pauses']) / len(c['ev_pauses']) if c['ev_pauses'] else None, '', 2)}"
        f" max {fmt(max(c['ev_pauses']) if c['ev_pauses'] else None, '', 2)} ms;"
        f" {fmt(c['bytes_per_cp'] and c['bytes_per_cp'] / 1024, ' KiB', 1)}/checkpoint (ss),"
        f" x-colo avg-bytes {fmt(c.get('x_avg_bytes') and c['x_avg_bytes'] / 1024, ' KiB', 1)};"
        f" hold p50 {fmt(c.get('hold_p50_ms'), '', 1)} p99 {fmt(c.get('hold_p99_ms'), '', 1)} ms"
        f" output {c.get('output')};"
        f" PASS {fmt(c['guest_ms'])} ms guest / {fmt(c['host_ms'])} ms host"
        f" ({c['passes']} lines); COLO up after {c['to_colo_s']:.1f} s;"
        f" end {c['status_end']} {c['errors'] or ''}"
        + (f" tls-creds={c['params']['tls-creds']!r}" if "tls-creds" in (c.get("params") or {}) else "")
        + f" corrupt {len(b['corrupt']) + len(c['corrupt'])}")
    for line in (b["corrupt"] + c["corrupt"])[:5]:
        log(f"    {line}")
    f = c.get("failover")
    if f:
        log(f"    failover: killed {fmt(f['kill_after_last_released_pass_ms'])} ms after the last"
            f" released PASS {f['last_released_pass']}; command {fmt(f['kill_to_cmd_ms'], '', 1)} ms"
            f" after the kill; command -> COLO_EXIT {fmt(f['to_colo_exit_ms'], '', 1)} ms,"
            f" running {fmt(f['to_running_ms'], '', 1)} ms, first byte {fmt(f['to_first_byte_ms'], '', 1)} ms"
            f" ({f['first_bytes']!r}), new PASS {fmt(f.get('to_new_pass_ms'), '', 1)} ms"
            f" ({f.get('new_pass_line')!r}, guest {fmt(f['guest_ms_last_to_new'])} ms after the last released);"
            f" sequence ok {f['pass_sequence_ok']} {f['pass_sequence_tail']};"
            f" exit {f['colo_exit']} {f.get('error', '')} corrupt {len(f['corrupt'])}")
        log(f"      released tail {f['released_tail']!r}; secondary head {f['secondary_head']!r};"
            f" secondary log {f['secondary_log']}")
    if c.get("logs"):
        for side, ls in c["logs"].items():
            for line in ls:
                log(f"    [{side}] {line}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="1,10,50,200")
    ap.add_argument("--modes", default="periodic,match,differ",
                    help="minivmm modes (QEMU: periodic only)")
    ap.add_argument("--delay", type=int, default=100, help="x-checkpoint-delay, periodic, ms")
    ap.add_argument("--running-delay", type=int, default=2000,
                    help="x-checkpoint-delay with a running secondary, ms")
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--running-window", type=float, default=30.0,
                    help="window with a running secondary (fewer checkpoints), s")
    ap.add_argument("--failover-rate", type=int, default=10,
                    help="rate whose points end with a failover (-1: none)")
    add_tls_arg(ap)
    common_args(ap, vmms="minivmm")
    a = ap.parse_args()
    quiet = machine_note()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    rows = []
    modes = a.modes.split(",")
    with tempfile.TemporaryDirectory(prefix="colo-bench-") as wd:
        tls_dir = tls_credentials(wd, a.tls)
        for kind in a.vmms.split(","):
            for rate in (int(x) for x in a.rates.split(",")):
                g = Guest(kind, a.minivmm, a.qemu, a.kernel, a.initrd, rate)
                snap = os.path.join(wd, f"{kind}-{rate}.snap")
                make_snapshot(g, snap, wd)
                base = {}
                for mode in (modes if kind == "minivmm" else ["periodic"]):
                    periodic, detout = MODES[mode]
                    running = kind == "minivmm" and not periodic
                    w = a.running_window if running else a.window
                    # At least ~2 PASS intervals in the window (16 s each at 1 MiB/s).
                    window = w if rate == 0 else max(w, min(40.0, 2.2 * 16 / rate))
                    t = time.monotonic()
                    if detout not in base:
                        base[detout] = baseline(g, snap, wd, max(a.window, window), detout)
                    b = base[detout]
                    delay = a.running_delay if running else a.delay
                    if kind == "minivmm":
                        fo = b["host_ms"] if rate == a.failover_rate and b["host_ms"] else None
                        c = colo_minivmm(g, snap, wd, window, mode, delay, fo, tls_dir)
                    else:
                        c = colo_qemu(g, snap, wd, window, delay, tls_dir)
                    log_point(kind, rate, mode, time.monotonic() - t, window, b, c)
                    rows.append((kind, rate, mode, window, b, c))
                os.unlink(snap)
    quiet = machine_note() and quiet  # also quiet at the end?
    print()
    print(f"(started {started}; x-checkpoint-delay {a.delay} ms periodic, {a.running_delay} ms with a"
          f" running secondary; x-colo-compare-timeout default; tcp loopback; windows {a.window:.0f} s"
          f" periodic, {a.running_window:.0f} s running (longer where a PASS takes longer);"
          f"{' COLO over TLS (tls-creds-x509, tools/tls-certs.sh; tls-creds on both sides);' if a.tls else ''}"
          f" machine"
          f" {'quiet' if quiet else 'NOT quiet, see stderr'})")
    print()
    print("| VMM | mode | guest dirty rate | checkpoints/s: periodic / output differed / compare timeout"
          " | pause avg | pause p50 / p99 | pause max | bytes per checkpoint | output hold p50 / p99"
          " | PASS interval, guest ms: alone → COLO | PASS interval, host ms: alone → COLO"
          " | slowdown (host) | CORRUPT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, rate, mode, window, b, c in rows:
        slow = (f"{c['host_ms'] / b['host_ms']:.2f}x" if c["host_ms"] and b["host_ms"] else "n/a")
        bc = c.get("by_cause")
        ws = c["window_s"]
        causes = (" / ".join(f"{bc[k] / ws:.2f}" for k in CAUSES) if bc
                  else f"{c['checkpoints'] / ws:.2f} / – / –")
        hold = (f"{fmt(c.get('hold_p50_ms'), '', 1)} / {fmt(c.get('hold_p99_ms'), ' ms', 1)}"
                if c.get("hold_p50_ms") is not None else "n/a")
        print(f"| {kind}{tls_label(a.tls)} | {MODE_LABEL[mode] if kind == 'minivmm' else 'periodic'}"
              f" ({c['delay_ms']} ms) | {rate} MiB/s"
              f" | {causes}"
              f" | {fmt(c['pause_avg'], ' ms', 1)}"
              f" | {fmt(c['pause_p50'], '', 1)} / {fmt(c['pause_p99'], ' ms', 1)}"
              f" | {fmt(c['pause_max'], ' ms', 1)}"
              f" | {fmt(c['bytes_per_cp'] and c['bytes_per_cp'] / 1024, ' KiB')}"
              f" | {hold}"
              f" | {fmt(b['guest_ms'])} → {fmt(c['guest_ms'])}"
              f" | {fmt(b['host_ms'])} → {fmt(c['host_ms'])}"
              f" | {slow}"
              f" | {'yes' if b['corrupt'] or c['corrupt'] else 'no'} |")
    fos = [(kind, rate, mode, c["failover"]) for kind, rate, mode, _, _, c in rows if c.get("failover")]
    if fos:
        print()
        print("| mode | guest dirty rate | killed after the last released PASS | command → COLO_EXIT"
              " | command → running | command → first byte | command → first new PASS"
              " | PASS lines continue (none lost or repeated) | CORRUPT |")
        print("|---|---|---|---|---|---|---|---|---|")
        for kind, rate, mode, f in fos:
            print(f"| {MODE_LABEL[mode]} | {rate} MiB/s"
                  f" | {fmt(f['kill_after_last_released_pass_ms'], ' ms')} (PASS {f['last_released_pass']})"
                  f" | {fmt(f['to_colo_exit_ms'], ' ms', 1)}"
                  f" | {fmt(f['to_running_ms'], ' ms', 1)}"
                  f" | {fmt(f['to_first_byte_ms'], ' ms', 1)}"
                  f" | {fmt(f.get('to_new_pass_ms'), ' ms', 1)} (`{f.get('new_pass_line', '?')}`)"
                  f" | {'yes' if f['pass_sequence_ok'] else 'NO'}"
                  f" | {'yes' if f['corrupt'] else 'no'} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"started": started, "quiet": quiet, "binary": a.minivmm, "tls": a.tls,
                       "delay_ms": a.delay, "running_delay_ms": a.running_delay,
                       "points": [{"vmm": k, "rate": r, "mode": m, "window": w, "alone": b, "colo": c}
                                  for k, r, m, w, b, c in rows]},
                      f, indent=1, default=str)


if __name__ == "__main__":
    main()

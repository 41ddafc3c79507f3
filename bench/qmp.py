#!/usr/bin/env python3
"""QMP round-trip latency of query-status (used by bench/qmp.sh).

For each VMM command line: start it with a QMP unix socket, connect one
client (plain sockets, no library), negotiate, send N query-status requests
one at a time (send, wait for the reply) and report p50/p99/mean/max.
Measured twice per VMM: paused before boot (-S), and with the guest booted
and its workload running (waits for GUEST-READY on the serial console).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


class Qmp:
    def __init__(self, path, timeout=30):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.02)
        self.s.settimeout(timeout)
        self.buf = b""
        greeting = self.recv()
        assert "QMP" in greeting, greeting
        self.cmd("qmp_capabilities")

    def recv(self):
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name):
        self.s.sendall(json.dumps({"execute": name}).encode() + b"\n")
        while True:
            m = self.recv()
            if "event" not in m:
                return m


def measure(q, n):
    req = b'{"execute": "query-status"}\n'
    lat = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        q.s.sendall(req)
        while True:
            m = q.recv()
            if "event" not in m:
                break
        lat.append(time.perf_counter_ns() - t0)
        assert "return" in m, m
    lat.sort()
    us = lambda ns: ns / 1000
    return {
        "p50_us": us(lat[len(lat) // 2]),
        "p99_us": us(lat[min(len(lat) - 1, (len(lat) * 99) // 100)]),
        "mean_us": us(statistics.mean(lat)),
        "max_us": us(lat[-1]),
    }


def run(name, argv, sock, n, booted, timeout):
    cmd = [a.replace("@SOCK@", sock) for a in argv]
    if not booted:
        cmd.append("-S")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    try:
        if booted:
            deadline = time.time() + timeout
            for line in iter(p.stdout.readline, b""):
                if b"GUEST-READY" in line:
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"{name}: no GUEST-READY in {timeout}s")
            else:
                raise RuntimeError(f"{name}: exited before GUEST-READY")
            # Keep draining the console so the guest never blocks on it.
            threading.Thread(target=lambda: [None for _ in iter(p.stdout.readline, b"")],
                             daemon=True).start()
        q = Qmp(sock)
        measure(q, min(500, n))  # warm-up
        r = measure(q, n)
        q.s.close()
        return r
    finally:
        p.kill()
        p.wait()
        if os.path.exists(sock):
            os.unlink(sock)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("configs", nargs="+", help="NAME=JSON-ARGV (with @SOCK@ for the socket path)")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qmp-bench-") as d:
        for spec in a.configs:
            name, argv = spec.split("=", 1)
            argv = json.loads(argv)
            for booted in (False, True):
                state = "guest running" if booted else "paused (-S)"
                r = run(name, argv, os.path.join(d, "qmp.sock"), a.n, booted, a.timeout)
                print(f"  {name}, {state}: {r}", file=sys.stderr)
                rows.append((name, state, r))
    print(f"| VMM | state | p50 | p99 | mean | max | requests |")
    print("|---|---|---|---|---|---|---|")
    for name, state, r in rows:
        print(f"| {name} | {state} | {r['p50_us']:.0f} µs | {r['p99_us']:.0f} µs"
              f" | {r['mean_us']:.0f} µs | {r['max_us']:.0f} µs | {a.n} |")


if __name__ == "__main__":
    main()

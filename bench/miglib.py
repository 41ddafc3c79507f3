#!/usr/bin/env python3
"""Shared helpers of the migration benchmarks (bench/migrate.py,
bench/postcopy.py, bench/colo.py): a plain-socket QMP client that keeps
events, a VM process with its serial console read in a thread, command
lines for minivmm and QEMU on the same guest, and boot-once snapshots.

Every process started here gets PR_SET_PDEATHSIG(SIGKILL) and is also
killed at exit (atexit and SIGINT/SIGTERM), so nothing outlives a run.
"""

import atexit
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

MIB = 1 << 20
PVM_SWITCHES = "noxsave clearcpuid=308,141,151,297,580 reboot=k"
_PROCS = []


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def _pdeathsig():
    # Runs in the child between fork and exec: die with the parent.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def kill_all():
    for p in list(_PROCS):
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
    for p in list(_PROCS):
        try:
            p.wait(timeout=10)
        except Exception:  # noqa: BLE001
            pass
    _PROCS.clear()


def _on_signal(signum, _frame):
    kill_all()
    sys.exit(128 + signum)


atexit.register(kill_all)
signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGINT, _on_signal)


# ---------------------------------------------------------- two hosts

class Net:
    """Two hosts on this machine: a source and a destination network
    namespace joined by a veth pair, both directions shaped with tbf to
    `rate` (tc syntax), and with `delay_ms` not None a user-space relay
    (tests' `relay` binary) in the source's namespace that holds each
    chunk `delay_ms` in each direction (this host's kernel has no netem).
    Use as a context manager; while active, `source_and_destination` and
    `mig_uri` put the VMs and the migration on it; `link_down`/`link_up`
    cut and heal the link. Needs root and
    iproute2. Everything is removed at exit, also on failure."""

    SRC_IP, DST_IP, PORT, RELAY_PORT = "10.77.0.1", "10.77.0.2", 4444, 5555

    def __init__(self, rate, delay_ms=None, relay_bin=None):
        self.rate, self.delay_ms, self.relay_bin = rate, delay_ms, relay_bin
        base = f"mvb{os.getpid()}"
        self.src, self.dst = base + "s", base + "d"
        self.relay = None
        self.down = False

    def label(self):
        d = "" if self.delay_ms is None else f" + relay {self.delay_ms} ms each way"
        return f"{self.rate}{d}"

    def _run(self, *args):
        subprocess.run(list(args), check=True, capture_output=True, timeout=30)

    def __enter__(self):
        global NET
        for ns in (self.src, self.dst):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            self._run("ip", "netns", "add", ns)
            self._run("ip", "-n", ns, "link", "set", "lo", "up")
        self._run("ip", "link", "add", self.src, "netns", self.src, "type", "veth",
                  "peer", "name", self.dst, "netns", self.dst)
        bps = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3}
        unit = next(u for u in bps if self.rate.endswith(u))
        burst = max(int(self.rate[:-len(unit)]) * bps[unit] // 8 // 100, 64 << 10)
        for ns, ip in ((self.src, self.SRC_IP), (self.dst, self.DST_IP)):
            self._run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ns)
            self._run("ip", "-n", ns, "link", "set", ns, "up")
            self._run("tc", "-n", ns, "qdisc", "replace", "dev", ns, "root", "tbf", "rate",
                      self.rate, "burst", str(burst), "latency", "50ms")
        if self.delay_ms is not None:
            self.relay = subprocess.Popen(
                ["ip", "netns", "exec", self.src, self.relay_bin,
                 "--listen", f"127.0.0.1:{self.RELAY_PORT}",
                 "--to", f"{self.DST_IP}:{self.PORT}", "--delay-ms", str(self.delay_ms)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=_pdeathsig)
            _PROCS.append(self.relay)
            time.sleep(0.3)
        NET = self
        return self

    def __exit__(self, *exc):
        global NET
        NET = None
        if self.relay:
            self.relay.kill()
            self.relay.wait()
        for ns in (self.src, self.dst):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        return False

    def link_down(self):
        """Take the link down at both ends (the veth devices are named
        after their namespaces): nothing passes either way, the sockets on
        it stay open (TCP retransmits into nothing, neither side is told),
        a connect gets 'Network is unreachable'."""
        for ns in (self.src, self.dst):
            self._run("ip", "-n", ns, "link", "set", ns, "down")
        self.down = True

    def link_up(self):
        """Bring the link back up (addresses and shaping are kept)."""
        for ns in (self.src, self.dst):
            self._run("ip", "-n", ns, "link", "set", ns, "up")
        self.down = False

    def wrap(self, argv, side):
        return ["ip", "netns", "exec", self.src if side == "src" else self.dst] + list(argv)

    def source_uri(self):
        if self.relay:
            return f"tcp:127.0.0.1:{self.RELAY_PORT}"
        return f"tcp:{self.DST_IP}:{self.PORT}"

    def source_port(self):
        """The port the source's migration connects to."""
        return self.RELAY_PORT if self.relay else self.PORT


NET = None


def mig_uri(port):
    """The URI the source migrates to: the destination listening on `port`
    on loopback, or across the two-host link while a `Net` is active."""
    return NET.source_uri() if NET else f"tcp:127.0.0.1:{port}"


def in_source_ns(argv):
    """`argv` run where the source runs (its namespace while a Net is active)."""
    return NET.wrap(argv, "src") if NET else list(argv)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, round((len(xs) - 1) * p))]


# --------------------------------------------------------------------- QMP

class QmpError(Exception):
    def __init__(self, name, args, reply):
        self.reply = reply
        super().__init__(f"{name} {json.dumps(args) if args else ''} -> {json.dumps(reply)}")


class Qmp:
    """One QMP connection; events are kept in self.events with the host's
    time.monotonic() at arrival (and their own timestamp)."""

    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.buf = b""
        self.events = []
        self.s.settimeout(timeout)
        greeting = self._recv(timeout)
        assert greeting and "QMP" in greeting, greeting
        self.cmd("qmp_capabilities")

    def _recv(self, timeout):
        """One message or None on timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.s.settimeout(left)
            try:
                chunk = self.s.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        m = json.loads(line)
        if "event" in m:
            m["_t"] = time.monotonic()
            self.events.append(m)
        return m

    def cmd(self, name, args=None, check=True, timeout=60):
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        self.s.sendall(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            m = self._recv(max(0.0, deadline - time.monotonic()))
            if m is None:
                raise TimeoutError(f"no reply to {name} in {timeout}s")
            if "event" in m:
                continue
            if "error" in m and check:
                raise QmpError(name, args, m)
            return m.get("return", m)

    def pump(self, timeout=0.0):
        """Read whatever events arrive within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            m = self._recv(max(0.0, deadline - time.monotonic()))
            if m is None:
                return

    def wait_event(self, name, pred=lambda e: True, timeout=60, since=0):
        """First event `name` (index >= since) matching pred, or None."""
        deadline = time.monotonic() + timeout
        i = since
        while True:
            while i < len(self.events):
                e = self.events[i]
                i += 1
                if e["event"] == name and pred(e):
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._recv(min(left, 0.5))

    def migrate_info(self):
        return self.cmd("query-migrate")

    def wait_status(self, states, timeout=180, poll=0.05):
        deadline = time.monotonic() + timeout
        while True:
            r = self.cmd("query-migrate")
            if r.get("status") in states:
                # QEMU 7.2 reports "completed" a moment before it sets
                # total-time and downtime (both read 0 then): ask again.
                if r.get("status") == "completed" and not r.get("total-time"):
                    for _ in range(20):
                        self.pump(0.01)
                        r = self.cmd("query-migrate")
                        if r.get("total-time"):
                            break
                return r
            if time.monotonic() > deadline:
                raise TimeoutError(f"migration not in {states} after {timeout}s: {r}")
            self.pump(poll)

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


# ---------------------------------------------------------------------- VMs

PASS_RE = re.compile(rb"PASS (\d+) ms=(\d+)")


class Vm:
    """A VMM process with a QMP socket and its serial console on stdout."""

    def __init__(self, name, argv, workdir, env=None):
        self.name = name
        self.qmp_path = os.path.join(workdir, f"{name}-{os.getpid()}-{len(_PROCS)}.qmp")
        if os.path.exists(self.qmp_path):
            os.unlink(self.qmp_path)
        self.argv = argv + ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self.lines = []  # (host monotonic time, bytes)
        self.cv = threading.Condition()
        self.eof = False
        e = dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, env=e, preexec_fn=_pdeathsig)
        _PROCS.append(self.p)
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()
        self._q = None

    def _read(self):
        for line in iter(self.p.stdout.readline, b""):
            with self.cv:
                self.lines.append((time.monotonic(), line.rstrip(b"\r\n")))
                self.cv.notify_all()
        with self.cv:
            self.eof = True
            self.cv.notify_all()

    @property
    def qmp(self):
        if self._q is None:
            self._q = Qmp(self.qmp_path)
        return self._q

    def wait_line(self, pred, timeout, since=0):
        """Index of the first console line (index >= since) for which
        pred(bytes) holds; raises on timeout or exit."""
        deadline = time.monotonic() + timeout
        with self.cv:
            i = since
            while True:
                while i < len(self.lines):
                    if pred(self.lines[i][1]):
                        return i
                    i += 1
                if self.eof:
                    raise RuntimeError(f"{self.name} exited ({self.p.poll()}); tail:\n"
                                       + self.tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no such console line in {timeout}s; tail:\n"
                                       + self.tail())
                self.cv.wait(left)

    def wait_text(self, text, timeout, since=0):
        t = text.encode()
        return self.wait_line(lambda l: t in l, timeout, since)

    def passes(self, since=0):
        """[(k, guest ms, host time)] of the PASS lines from index `since`."""
        out = []
        with self.cv:
            for t, l in self.lines[since:]:
                m = PASS_RE.search(l)
                if m:
                    out.append((int(m.group(1)), int(m.group(2)), t))
        return out

    def last_pass(self):
        p = self.passes()
        return p[-1][0] if p else 0

    def wait_pass_beyond(self, k, timeout):
        return self.wait_line(lambda l: (m := PASS_RE.search(l)) is not None
                              and int(m.group(1)) > k, timeout)

    def corrupt(self):
        with self.cv:
            return [l.decode(errors="replace") for _, l in self.lines if b"CORRUPT" in l]

    def nlines(self):
        with self.cv:
            return len(self.lines)

    def tail(self, n=8):
        return "\n".join(l.decode(errors="replace") for _, l in self.lines[-n:])

    def kill(self):
        if self._q:
            self._q.close()
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        if os.path.exists(self.qmp_path):
            os.unlink(self.qmp_path)


class Guest:
    """Command lines for one VMM kind on the shared guest."""

    def __init__(self, kind, minivmm, qemu, kernel, initrd, rate, mem=128, smp=2,
                 wl_mem=16, qemu_machine="microvm"):
        self.kind = kind
        self.rate = rate
        self.wl_mem = wl_mem
        self.workload = f"workload.mem={wl_mem} workload.rate={rate}"
        if kind == "minivmm":
            self.base = [minivmm, "-kernel", kernel, "-initrd", initrd,
                         "-append", f"console=ttyS0 {self.workload}",
                         "-m", str(mem), "-smp", str(smp), "-serial", "stdio",
                         "-display", "none"]
        else:
            m = ["-M", "microvm", "-device", "i8042"] if qemu_machine == "microvm" else ["-M", qemu_machine]
            self.base = [qemu] + m + [
                "-accel", "kvm", "-cpu", "qemu64,-cx16,+xsaveerptr", "-m", str(mem),
                "-smp", str(smp), "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", "stdio", "-kernel", kernel, "-initrd", initrd,
                "-append", f"console=ttyS0 {PVM_SWITCHES} {self.workload}"]

    def label(self):
        return self.kind

    def save_uri(self, path):
        return f"file:{path}" if self.kind == "minivmm" else f"exec:cat > {path}"

    def load_uri(self, path):
        return f"file:{path}" if self.kind == "minivmm" else f"exec:cat {path}"

    def spawn(self, name, workdir, incoming=None, extra=(), side=None):
        """`side` "src" or "dst": in that host's namespace while a Net is
        active."""
        argv = list(self.base) + list(extra)
        if incoming:
            argv += ["-incoming", incoming]
        if NET and side:
            argv = NET.wrap(argv, side)
        return Vm(name, argv, workdir)


def common_args(ap, vmms="minivmm,qemu"):
    """The options every migration benchmark takes (the .sh passes them)."""
    ap.add_argument("--vmms", default=vmms)
    ap.add_argument("--minivmm", required=True)
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--json")


def make_snapshot(g, path, workdir, after_pass=1, boot_timeout=300):
    """Boot `g` once, let it reach PASS `after_pass` (its buffer then is
    fully written), save it with `migrate` to `path`. Returns seconds."""
    t0 = time.monotonic()
    vm = g.spawn(f"{g.kind}-boot", workdir)
    try:
        vm.wait_text("GUEST-READY", boot_timeout)
        if after_pass > 0:
            vm.wait_pass_beyond(after_pass - 1, boot_timeout)
        q = vm.qmp
        tmp = path + ".tmp"
        q.cmd("migrate", {"uri": g.save_uri(tmp)})
        r = q.wait_status(("completed", "failed"), 120)
        if r["status"] != "completed":
            raise RuntimeError(f"saving {g.kind} rate={g.rate} failed: {r}")
        if vm.corrupt():
            raise RuntimeError(f"{g.kind}: CORRUPT while booting: {vm.corrupt()}")
        os.replace(tmp, path)
    finally:
        vm.kill()
    dt = time.monotonic() - t0
    log(f"  snapshot {g.kind} rate={g.rate}: {os.path.getsize(path) / MIB:.1f} MiB in {dt:.1f} s")
    return dt


def start_from(g, name, snap, workdir, settle_s=2.0, timeout=120, side=None, extra=()):
    """A VM restored from `snap` (`extra`: more options for it), running;
    waits `settle_s` after it runs."""
    vm = g.spawn(name, workdir, incoming=g.load_uri(snap), extra=extra, side=side)
    q = vm.qmp
    deadline = time.monotonic() + timeout
    while True:
        st = q.cmd("query-status")
        if st.get("status") == "running":
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: not running after restore: {st}")
        q.pump(0.05)
    time.sleep(settle_s)
    return vm


# ---------------------------------------------------------------------- TLS
#
# Migration over TLS, the same way in every benchmark (--tls): credentials
# made once per run by tools/tls-certs.sh in the run's temporary directory,
# `-object tls-creds-x509,id=tls0,dir=...` on every source (endpoint=client)
# and destination (endpoint=server), tls-creds=tls0 set on the destination
# before a source can connect (source_and_destination; QEMU: -incoming
# defer, then migrate-incoming) and on the source right before `migrate`
# (tls_params; never while saving or restoring over file:/exec:, which
# refuse it: snapshots stay plain).

TLS_ID = "tls0"


def add_tls_arg(ap):
    ap.add_argument("--tls", action="store_true",
                    help="migrate over TLS (x509 credentials of tools/tls-certs.sh, tls-creds"
                         f" {TLS_ID} on both sides; see bench/miglib.py)")


def tls_credentials(wd, enabled):
    """With `enabled`: make the credentials in `wd`/tls and return that
    directory; else None (no TLS: every helper below then adds nothing)."""
    if not enabled:
        return None
    tls_dir = os.path.join(wd, "tls")
    certs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "tls-certs.sh")
    subprocess.run(["sh", certs, tls_dir], check=True, stdout=sys.stderr)
    log(f"# TLS: credentials in {tls_dir} (tools/tls-certs.sh), tls-creds={TLS_ID}")
    return tls_dir


def tls_object(tls_dir, endpoint):
    """-object for the credentials in `tls_dir` ("client" on a source,
    "server" on a destination); None: no options."""
    if not tls_dir:
        return []
    return ["-object", f"tls-creds-x509,id={TLS_ID},dir={tls_dir},endpoint={endpoint}"]


def tls_endpoints(tls_dir, dst_extra=(), src_extra=()):
    """source_and_destination's options: `dst_extra`/`src_extra` plus the
    credentials, and the destination's tls-creds (None: plain)."""
    return {"dst_extra": list(dst_extra) + tls_object(tls_dir, "server"),
            "src_extra": list(src_extra) + tls_object(tls_dir, "client"),
            "dst_tls_creds": TLS_ID if tls_dir else None}


def tls_params(tls_dir):
    """migrate-set-parameters' part for TLS (both sides): tls-creds, or
    nothing without TLS."""
    return {"tls-creds": TLS_ID} if tls_dir else {}


def tls_label(tls_dir):
    """What a table row's VMM name gets appended."""
    return " + TLS" if tls_dir else ""


@contextlib.contextmanager
def source_and_destination(g, snap, wd, names=("src", "dst"), settle_s=3.0, dst_extra=(),
                           src_extra=(), dst_tls_creds=None):
    """A source restored from `snap` and running, and a destination
    (`dst_extra`, `src_extra`: more options for them) listening on a free
    tcp port (or, while a `Net` is active, each in its host's namespace,
    the destination on the link): yields (source, destination, port;
    migrate to `mig_uri(port)`) and kills both at the end, whatever
    happened. The destination's QMP is up (so it listens) when this yields.
    `dst_tls_creds` (an object id): the destination's tls-creds, set before
    it can be connected to (QEMU: -incoming defer, migrate-set-parameters,
    migrate-incoming; minivmm: set right after it starts, before any source
    connects)."""
    src = start_from(g, names[0], snap, wd, settle_s=settle_s, side="src", extra=src_extra)
    dst = None
    try:
        if NET:
            port = NET.PORT
            incoming = f"tcp:{NET.DST_IP}:{port}"
        else:
            port = free_port()
            incoming = f"tcp:127.0.0.1:{port}"
        if dst_tls_creds and g.kind == "qemu":
            dst = g.spawn(names[1], wd, incoming="defer", extra=dst_extra, side="dst")
            dst.qmp.cmd("migrate-set-parameters", {"tls-creds": dst_tls_creds})
            dst.qmp.cmd("migrate-incoming", {"uri": incoming})
        else:
            dst = g.spawn(names[1], wd, incoming=incoming, extra=dst_extra, side="dst")
            dst.qmp  # noqa: B018 - connects: the destination is set up
            if dst_tls_creds:
                dst.qmp.cmd("migrate-set-parameters", {"tls-creds": dst_tls_creds})
        yield src, dst, port
    finally:
        src.kill()
        if dst:
            dst.kill()


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def busy_processes():
    """Other engineers' builds/tests and foreign VMMs (for the notes)."""
    me = os.getpid()
    mine = {p.pid for p in _PROCS}
    out = []
    try:
        r = subprocess.run(["pgrep", "-af", "cargo|rustc|test.sh|minivmm|qemu-system"],
                           capture_output=True, text=True, timeout=10)
        for line in r.stdout.splitlines():
            pid = int(line.split()[0])
            if _ppid(pid) == me:
                continue  # ours, seen before Popen returned
            # The session machinery's own process carries ".cargo" in its
            # environment on its command line: not a build.
            if (pid in mine or pid == me or "pgrep" in line or "bench/" in line
                    or "binary_backend" in line or "<defunct>" in line
                    or line.split()[1:2] in (["grep"], ["pgrep"])):
                continue
            out.append(line[:160])
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


_SEEN_BUSY = {}


def _monitor():
    while True:
        time.sleep(15)
        for line in busy_processes():
            _SEEN_BUSY.setdefault(line.split()[0], line)


def machine_note():
    """Log (and return) whether the machine is quiet: now, and at every
    15 s sample since the first call."""
    if not getattr(machine_note, "started", False):
        machine_note.started = True
        threading.Thread(target=_monitor, daemon=True).start()
    b = busy_processes() + [l for pid, l in _SEEN_BUSY.items()]
    b = list(dict.fromkeys(b))
    load = open("/proc/loadavg").read().split()[:3]
    if b:
        log(f"# WARNING: machine not quiet (load {' '.join(load)}):")
        for line in b:
            log(f"#   {line}")
    else:
        log(f"# machine quiet: no cargo/rustc/test.sh/foreign VMM (load {' '.join(load)})")
    return not b


def fmt(x, unit="", nd=0):
    if x is None:
        return "n/a"
    return f"{x:.{nd}f}{unit}"



def tcp_counters():
    """Host-wide TCP counters (/proc/net/snmp, /proc/net/netstat) that show
    loopback trouble: receive-queue drops (TCPRcvQDrop), retransmitted
    segments, RTO timeouts, loss probes, zero-window adverts. Runs log the
    deltas (host-wide: meaningful on a quiet machine only)."""
    d = {}
    for fn in ("/proc/net/snmp", "/proc/net/netstat"):
        with open(fn) as f:
            lines = f.read().splitlines()
        for h, v in zip(lines[::2], lines[1::2]):
            pre = h.split(":")[0]
            for k, x in zip(h.split()[1:], v.split()[1:]):
                if pre in ("Tcp", "TcpExt"):
                    try:
                        d[k] = int(x)
                    except ValueError:
                        pass
    keys = ("TCPRcvQDrop", "RetransSegs", "TCPTimeouts", "TCPLossProbes", "TCPToZeroWindowAdv")
    return {k: d.get(k, 0) for k in keys}


def tcp_delta(before):
    now = tcp_counters()
    return {k: now[k] - before[k] for k in now if now[k] != before[k]}

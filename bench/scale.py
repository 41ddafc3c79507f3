#!/usr/bin/env python3
"""Idle precopy migration at 4, 16 and 64 GiB (used by bench/scale.sh,
see there).

The question: does what an idle migration costs (time, bytes, the VMMs'
memory, the dirty syncs) grow with the memory the guest has touched or
with its size? The guest kernel is given only ~207 MiB of the guest's RAM
(the tests' `small_kernel_ram`: memmap=exactmap, with the first 128 MiB
at 4 GiB, where its user pages come from), so guests of any size touch
about as much; minivmm still maps all of -m, tracks it and sends it.

Per size and mode, one run: boot a fresh source (mode ring:
-accel kvm,dirty-ring-size=RING), wait for its second PASS, start a
destination with the same machine options (no dirty ring: it only
receives) on tcp loopback, wait (up to --wait-quiet s, the guest running
on) until no build, test or foreign VMM runs on the machine (recorded per
run: the migration itself takes a second or two, the boots a minute
each), read both processes' VmRSS/VmHWM, set
`events` and max-bandwidth (0: unlimited), `migrate`, poll query-migrate
every 50 ms until completed or failed (the host's MemAvailable is read
each second: under MIN_AVAIL the migration is cancelled and the bench
stops, the machine is shared), read both sides' query-migrate and, once
the destination printed two more PASS than the source's last, both
processes' VmRSS/VmHWM again. minivmm's own stderr lines (merged with the
console, `minivmm: ...`) are kept; the dirty-ring overflow warning is
looked for there. Prints a Markdown table and the growth between the
smallest and the largest guest; --json writes every run.
"""

import argparse
import json
import os
import tempfile
import time

from miglib import (MIB, QmpError, Vm, busy_processes, common_args, fmt, free_port, log,
                    machine_note)

GIB = 1 << 30
HOLE = 3 << 30          # minivmm's default max-ram-below-4g
WORKLOAD = "workload.mem=16 workload.rate=16"
RING = 65536
MIN_AVAIL = 2 << 30     # host MemAvailable under which a run is stopped
RING_WARNING = "dirty ring overflowed"


def small_kernel_ram(low_end, high):
    """tests/src/lib.rs `small_kernel_ram`: the guest kernel gets [0,
    639K), [1M, 64M), the 16 MiB below the initrd's top (the top of low
    RAM, at most 2 GiB) and the first 128 MiB at 4 GiB."""
    initrd_top = min(low_end, 2 << 30)
    assert initrd_top >= 96 * MIB and high >= 128 * MIB, "needs RAM below and above the hole"
    return (f"memmap=exactmap memmap=639K@0 memmap=63M@1M"
            f" memmap=16M@{initrd_top // MIB - 16}M memmap=128M@4096M")


def layout(size):
    """minivmm's RAM ranges for -m `size` (default hole): [(gpa, len)]."""
    low = min(size, HOLE)
    return [(0, low)] + ([(1 << 32, size - low)] if size > low else [])


def argv(a, size_gib, mode, incoming=None):
    size = size_gib * GIB
    (_, low), (_, high) = layout(size)
    v = [a.minivmm, "-kernel", a.kernel, "-initrd", a.initrd,
         "-append", f"console=ttyS0 {WORKLOAD} {small_kernel_ram(low, high)}",
         "-m", f"{size_gib}G", "-smp", "2", "-serial", "stdio", "-display", "none"]
    if mode == "ring" and incoming is None:
        v += ["-accel", f"kvm,dirty-ring-size={a.ring_size}"]
    if incoming:
        v += ["-incoming", incoming]
    return v


def proc_mem(pid):
    """VmRSS and VmHWM of `pid` in MiB (None if gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "VmSize"):
                    out[k] = round(int(v.split()[0]) / 1024, 1)
        with open(f"/proc/{pid}/comm") as f:
            out["comm"] = f.read().strip()
    except OSError:
        return None
    return out


def thread_sched(pid):
    """{thread name: [nice, policy]} of `pid`'s threads (policy 0 normal,
    1 FIFO): what the VMM made of the nice value it was started with."""
    out = {}
    try:
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
            name = st[st.index("(") + 1:st.rindex(")")]
            fields = st[st.rindex(")") + 2:].split()
            out[f"{name}/{tid}"] = [int(fields[16]), int(fields[38])]
    except (OSError, ValueError, IndexError):
        pass
    return out


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def vmm_lines(vm):
    """minivmm's own stderr lines (merged into the console capture)."""
    with vm.cv:
        return [l.decode(errors="replace") for _, l in vm.lines if l.startswith(b"minivmm:")]


def guest_lines(vm, needle):
    with vm.cv:
        return [l.decode(errors="replace") for _, l in vm.lines if needle in l]


def sync_keys(r):
    """x-dirty-sync-us / x-dirty-sync-max-us (top level or under ram;
    None where the binary has no such key)."""
    ram = r.get("ram") or {}
    return {k: r.get(k, ram.get(k)) for k in ("x-dirty-sync-us", "x-dirty-sync-max-us")}


class Abort(Exception):
    """The host ran short of memory: stop the bench."""


def one_run(a, wd, size_gib, mode):
    res = {"size_gib": size_gib, "mode": mode, "status": None, "notes": []}
    src = dst = None
    try:
        t0 = time.monotonic()
        src = Vm(f"src{size_gib}{mode}", argv(a, size_gib, mode), wd)
        res["src_argv"] = src.argv
        src.wait_text("GUEST-READY", a.boot_timeout)
        res["boot_s"] = round(time.monotonic() - t0, 1)
        src.wait_line(lambda l: len(src.passes()) >= 2, a.boot_timeout)
        res["src_pass_before"] = src.last_pass()
        # What the guest kernel was given and what it saw from the VMM.
        res["guest_e820"] = [l.split("] ", 1)[-1] for l in guest_lines(src, b"BIOS-e820")]
        res["guest_user_map"] = [l.split("] ", 1)[-1] for l in guest_lines(src, b"user: [mem")]
        port = free_port()
        dst = Vm(f"dst{size_gib}{mode}", argv(a, size_gib, mode, f"tcp:127.0.0.1:{port}"), wd)
        res["dst_argv"] = dst.argv
        dq = dst.qmp
        sq = src.qmp
        res["pids"] = {"source": src.p.pid, "destination": dst.p.pid}
        # The migration takes a second or two: wait (the guest runs on)
        # until no build, test or foreign VMM runs, up to --wait-quiet s.
        t_w = time.monotonic()
        busy = busy_processes()
        while busy and time.monotonic() - t_w < a.wait_quiet:
            time.sleep(5)
            busy = busy_processes()
        res["waited_for_quiet_s"] = round(time.monotonic() - t_w, 1)
        res["busy_at_migrate"] = busy
        res["load_at_migrate"] = open("/proc/loadavg").read().split()[:3]
        res["migrate_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        res["mem_before"] = {"source": proc_mem(src.p.pid), "destination": proc_mem(dst.p.pid)}
        res["host_avail_before_mib"] = round(mem_available() / MIB)
        res["threads_before"] = {"source": thread_sched(src.p.pid),
                                 "destination": thread_sched(dst.p.pid)}
        sq.cmd("migrate-set-capabilities",
               {"capabilities": [{"capability": "events", "state": True}]})
        sq.cmd("migrate-set-parameters", {"max-bandwidth": a.max_bandwidth})
        res["params"] = sq.cmd("query-migrate-parameters")
        t_mig = time.monotonic()
        sq.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        deadline = t_mig + a.mig_timeout
        min_avail = mem_available()
        peak = {"source": 0.0, "destination": 0.0}
        next_mem = 0.0
        last_sync = {}
        while True:
            r = sq.cmd("query-migrate")
            now = time.monotonic()
            ks = sync_keys(r)
            if ks != last_sync and any(v is not None for v in ks.values()):
                res.setdefault("sync_samples", []).append(
                    [round((now - t_mig) * 1000), (r.get("ram") or {}).get("dirty-sync-count"),
                     ks["x-dirty-sync-us"], ks["x-dirty-sync-max-us"]])
                last_sync = ks
            if r.get("status") in ("completed", "failed", "cancelled"):
                break
            if "threads_during" not in res and r.get("status") == "active":
                res["threads_during"] = {"source": thread_sched(src.p.pid),
                                         "destination": thread_sched(dst.p.pid)}
            if now >= next_mem:
                next_mem = now + 1.0
                avail = mem_available()
                min_avail = min(min_avail, avail)
                for side, vm in (("source", src), ("destination", dst)):
                    m = proc_mem(vm.p.pid)
                    if m:
                        peak[side] = max(peak[side], m.get("VmRSS", 0))
                if avail < MIN_AVAIL:
                    res["notes"].append(f"host MemAvailable {avail // MIB} MiB: cancelled")
                    sq.cmd("migrate_cancel", check=False)
                    res["last_reply"] = r
                    raise Abort(f"host MemAvailable fell to {avail // MIB} MiB during the"
                                f" migration of {size_gib} GiB ({mode})")
            if now > deadline:
                res["last_reply"] = r
                sq.cmd("migrate_cancel", check=False)
                raise TimeoutError(f"not completed {a.mig_timeout} s after migrate: {json.dumps(r)}")
            sq.pump(0.05)
        res["migrate_to_final_s"] = round(time.monotonic() - t_mig, 3)
        res["busy_after_migrate"] = busy_processes()
        res["host_avail_min_mib"] = round(min_avail / MIB)
        res["rss_peak_sampled_mib"] = peak
        res["src_reply"] = r
        res["passes_events"] = [e["data"] for e in sq.events if e["event"] == "MIGRATION_PASS"]
        if r.get("status") != "completed":
            raise RuntimeError(f"migration {r.get('status')}: {json.dumps(r)}")
        try:
            res["dst_reply"] = dq.cmd("query-migrate", timeout=10)
        except (QmpError, TimeoutError, EOFError, OSError) as e:
            res["dst_reply"] = f"query-migrate failed: {e}"
        last_src = src.last_pass()
        res["src_last_pass"] = last_src
        dst.wait_pass_beyond(last_src + 1, a.pass_timeout)
        res["dst_passes"] = [k for k, _, _ in dst.passes()]
        res["mem_after"] = {"source": proc_mem(src.p.pid), "destination": proc_mem(dst.p.pid)}
        res["threads_after"] = {"source": thread_sched(src.p.pid),
                                "destination": thread_sched(dst.p.pid)}
        res["src_status_after"] = sq.cmd("query-status")
        res["dst_status_after"] = dq.cmd("query-status")
        res["status"] = "completed"
    except (QmpError, TimeoutError, RuntimeError, EOFError, OSError, Abort) as e:
        res["status"] = "failed"
        res["error"] = str(e)[:3000]
        res["abort"] = isinstance(e, Abort)
    finally:
        for side, vm in (("source", src), ("destination", dst)):
            if vm is None:
                continue
            res.setdefault("vmm_stderr", {})[side] = vmm_lines(vm)
            res.setdefault("corrupt", []).extend(vm.corrupt())
            res.setdefault("tails", {})[side] = vm.tail(6)
            vm.kill()
    res["ring_warning"] = (any(RING_WARNING in l for l in res["vmm_stderr"].get("source", []))
                           if mode == "ring" and "vmm_stderr" in res else None)
    return res


def mib(b):
    return None if b is None else b / MIB


def log_run(r):
    if r["status"] != "completed":
        log(f"  {r['size_gib']} GiB {r['mode']}: {r['status'].upper()}: {r.get('error')}")
        for side, lines in (r.get("vmm_stderr") or {}).items():
            for l in lines:
                log(f"    {side}: {l}")
        for side, t in (r.get("tails") or {}).items():
            log(f"    {side} tail:\n      " + t.replace("\n", "\n      "))
        return
    s = r["src_reply"]
    ram = s.get("ram", {})
    log(f"  {r['size_gib']} GiB {r['mode']}: boot {r['boot_s']} s; total {s.get('total-time')} ms,"
        f" downtime {s.get('downtime')} ms, setup {s.get('setup-time')} ms,"
        f" transferred {mib(ram.get('transferred')):.1f} MiB, duplicate {ram.get('duplicate')}"
        f" normal {ram.get('normal')}, syncs {ram.get('dirty-sync-count')},"
        f" sync {sync_keys(s)}; mem before {r['mem_before']}, after {r['mem_after']};"
        f" ring warning {r['ring_warning']}; dst PASS {r['dst_passes'][:1]}..{r['dst_passes'][-1:]}"
        f" (src last {r['src_last_pass']}); host MemAvailable min {r['host_avail_min_mib']} MiB")
    for side, lines in r["vmm_stderr"].items():
        for l in lines:
            log(f"    {side}: {l}")


def memcell(m0, m1):
    """RSS (HWM) before → after, MiB."""
    if not m0 or not m1:
        return "n/a"
    return (f"{m0['VmRSS']:.0f} ({m0['VmHWM']:.0f}) → {m1['VmRSS']:.0f} ({m1['VmHWM']:.0f})")


def quiet_cell(r):
    """Whether a build, test or foreign VMM ran just before `migrate` or
    just after completion (and the load average then)."""
    busy = (r.get("busy_at_migrate") or []) + (r.get("busy_after_migrate") or [])
    return (f"{'busy' if busy else 'quiet'}, load {r.get('load_at_migrate', ['?'])[0]}"
            + (f", waited {r['waited_for_quiet_s']:.0f} s" if r.get("waited_for_quiet_s", 0) >= 5
               else ""))


def us(v):
    return "null" if v is None else f"{v / 1000:.1f}"


def print_table(rows, a, quiet):
    quiet = machine_note() and quiet
    print()
    print("| guest | tracking | total-time | downtime | setup | transferred | duplicate / normal pages"
          " | syncs | sync last / longest (ms) | src RSS (HWM) before → after, MiB"
          " | dst RSS (HWM) before → after, MiB | ring overflow warned | guest on dst"
          " | machine at migrate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        label = f"{r['size_gib']} GiB"
        if r["status"] != "completed":
            print(f"| {label} | {r['mode']} | failed: {r.get('error', '')[:200]} | | | | | | | | | | | |")
            continue
        s = r["src_reply"]
        ram = s.get("ram", {})
        ks = sync_keys(s)
        warned = "n/a" if r["ring_warning"] is None else ("yes" if r["ring_warning"] else "no")
        dp = r["dst_passes"]
        ok = (f"PASS {dp[0]}-{dp[-1]}, {'CORRUPT' if r['corrupt'] else 'no CORRUPT'}"
              if dp else "no PASS")
        print(f"| {label} | {r['mode']} | {s.get('total-time')} ms | {s.get('downtime')} ms"
              f" | {s.get('setup-time')} ms | {mib(ram.get('transferred')):.1f} MiB"
              f" | {ram.get('duplicate')} / {ram.get('normal')} | {ram.get('dirty-sync-count')}"
              f" | {us(ks['x-dirty-sync-us'])} / {us(ks['x-dirty-sync-max-us'])}"
              f" | {memcell(r['mem_before']['source'], r['mem_after']['source'])}"
              f" | {memcell(r['mem_before']['destination'], r['mem_after']['destination'])}"
              f" | {warned} | {ok} | {quiet_cell(r)} |")
    print(f"\n(one run each; -smp 2, {WORKLOAD}, guest kernel limited to ~207 MiB by memmap;"
          f" max-bandwidth {a.max_bandwidth} (0: unlimited), downtime-limit default; ring:"
          f" source -accel kvm,dirty-ring-size={a.ring_size}; machine"
          f" {'quiet' if quiet else 'NOT quiet, see stderr'})")
    return growth(rows)


MEASURES = (
    ("total-time", "ms", lambda r: r["src_reply"].get("total-time")),
    ("downtime", "ms", lambda r: r["src_reply"].get("downtime")),
    ("setup-time", "ms", lambda r: r["src_reply"].get("setup-time")),
    ("transferred", "MiB", lambda r: mib(r["src_reply"].get("ram", {}).get("transferred"))),
    ("page data (normal pages)", "MiB",
     lambda r: r["src_reply"].get("ram", {}).get("normal", 0) * 4096 / MIB),
    ("longest sync", "ms", lambda r: (None if sync_keys(r["src_reply"])["x-dirty-sync-max-us"] is None
                                      else sync_keys(r["src_reply"])["x-dirty-sync-max-us"] / 1000)),
    ("last sync", "ms", lambda r: (None if sync_keys(r["src_reply"])["x-dirty-sync-us"] is None
                                   else sync_keys(r["src_reply"])["x-dirty-sync-us"] / 1000)),
    ("source VmRSS after", "MiB", lambda r: r["mem_after"]["source"]["VmRSS"]),
    ("source VmHWM", "MiB", lambda r: r["mem_after"]["source"]["VmHWM"]),
    ("destination VmRSS after", "MiB", lambda r: r["mem_after"]["destination"]["VmRSS"]),
    ("destination VmHWM", "MiB", lambda r: r["mem_after"]["destination"]["VmHWM"]),
)


def slope(xs, ys):
    """Least-squares slope of ys over xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def growth(rows):
    """Per mode and measure: its value at each size and its growth per GiB
    of guest (least squares over the sizes), next to the page data (the
    memory the guest touched, which stays about the same)."""
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        ok = sorted((r for r in rows if r["mode"] == mode and r["status"] == "completed"),
                    key=lambda r: r["size_gib"])
        if len(ok) < 2:
            continue
        sizes = [r["size_gib"] for r in ok]
        print(f"\n{mode}, per measure: value at {', '.join(f'{s} GiB' for s in sizes)};"
              " growth per GiB of guest (least squares):")
        for name, unit, f in MEASURES:
            vals = [f(r) for r in ok]
            if any(v is None for v in vals):
                print(f"- {name}: n/a")
                continue
            k = slope(sizes, vals)
            out.setdefault(mode, {})[name] = {"values": vals, "per_gib": k}
            print(f"- {name}: {' / '.join(f'{v:.1f}' for v in vals)} {unit};"
                  f" {k:+.3f} {unit} per GiB")
    return out


def binary_info(path):
    import hashlib
    st = os.stat(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"path": path, "mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(st.st_mtime)),
            "sha256": digest}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4,16,64", help="GiB, comma-separated")
    ap.add_argument("--modes", default="bitmap,ring")
    ap.add_argument("--ring-size", type=int, default=RING)
    ap.add_argument("--max-bandwidth", type=int, default=0, help="B/s; 0: unlimited")
    ap.add_argument("--boot-timeout", type=float, default=300)
    ap.add_argument("--mig-timeout", type=float, default=900)
    ap.add_argument("--pass-timeout", type=float, default=120)
    ap.add_argument("--wait-quiet", type=float, default=900,
                    help="before each migrate, wait up to this many s for no build/test/foreign VMM")
    common_args(ap, vmms="minivmm")
    a = ap.parse_args()
    if a.vmms != "minivmm":
        log("scale.py: minivmm only (QEMU is not measured here)")
    quiet = machine_note()
    sizes = [int(x) for x in a.sizes.split(",")]
    modes = a.modes.split(",")
    for m in modes:
        if m not in ("bitmap", "ring"):
            ap.error(f"unknown mode {m}")
    for s in sizes:
        if s * GIB <= HOLE:
            ap.error(f"{s} GiB: the guest must reach above the 32-bit hole (> 3 GiB)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as wd:
        for size in sizes:
            for mode in modes:
                avail = mem_available()
                log(f"# {size} GiB, {mode}: host MemAvailable {avail // MIB} MiB")
                if avail < 2 * MIN_AVAIL:
                    log("STOPPED: the host has too little free memory for another run")
                    break
                t = time.monotonic()
                r = one_run(a, wd, size, mode)
                r["wall_s"] = round(time.monotonic() - t, 1)
                rows.append(r)
                log_run(r)
                if r.get("abort"):
                    log(f"STOPPED: {r['error']}")
                    break
            else:
                continue
            break
    g = print_table(rows, a, quiet)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"binary": binary_info(a.minivmm), "machine_quiet": machine_note() and quiet,
                       "runs": rows, "growth": g}, f, indent=1, default=str)


if __name__ == "__main__":
    main()

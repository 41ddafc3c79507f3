//! COLO between two real minivmm processes, in both modes: a running
//! secondary whose console output is compared with the primary's (the
//! default), and periodic checkpoints to a paused secondary; output
//! commit, checkpoints by cause, memory equality, and failover.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::*;

fn mig_timeout() -> Duration {
    scaled(Duration::from_secs(180))
}

fn guest(name: &str) -> VmmBuilder {
    VmmBuilder::new(name).smp(2)
}

fn x_colo(c: &mut Client) {
    c.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "x-colo", "state": true},
            {"capability": "events", "state": true}
        ]}),
    )
    .expect("x-colo");
}

/// How a test's COLO pair is set up.
#[derive(Clone, Copy)]
struct Opts {
    /// Through a relay (to cut or damage the link).
    relay: bool,
    /// `x-colo-periodic`: the secondary does not run.
    periodic: bool,
    /// The guest prints `PASS k` without its uptime (the same on both
    /// sides), switched on over the serial console before COLO.
    detout: bool,
    /// `x-checkpoint-delay`, ms.
    delay_ms: u64,
    /// The secondary keeps its own console output in a file
    /// (`x-colo-secondary-log`).
    log: bool,
    /// `x-colo-compare-timeout`, ms (None: the default, 3 s).
    compare_timeout_ms: Option<u64>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            relay: false,
            periodic: false,
            detout: false,
            delay_ms: 200,
            log: false,
            compare_timeout_ms: None,
        }
    }
}

/// Primary restored from the boot snapshot, secondary waiting on a port
/// (through a relay when asked); both with x-colo; COLO started with the
/// options' mode and checkpoint delay and both sides in `colo`.
struct Pair {
    p: Vmm,
    pq: Client,
    s: Vmm,
    sq: Client,
    relay: Option<Relay>,
    /// The secondary's console log, if asked for.
    log: Option<std::path::PathBuf>,
}

fn start_colo(o: Opts) -> Pair {
    let snap = snapshot(&guest("base"));
    let mut p = guest("primary")
        .incoming(&format!("file:{}", snap.display()))
        .with_stdin()
        .spawn();
    p.wait_pass_beyond(2, boot_timeout());
    if o.detout {
        p.type_serial("detout\n");
        p.wait_serial("OUTPUT deterministic", boot_timeout());
    }
    let port = free_port();
    let mut s = guest("secondary")
        .incoming(&format!("tcp:127.0.0.1:{port}"))
        .spawn();
    let mut sq = s.qmp();
    x_colo(&mut sq);
    let log = o.log.then(|| s.dir.path("secondary-console.log"));
    if let Some(l) = &log {
        sq.execute(
            "migrate-set-parameters",
            json!({"x-colo-secondary-log": l.display().to_string()}),
        )
        .unwrap();
    }
    let mut pq = p.qmp();
    x_colo(&mut pq);
    pq.execute(
        "migrate-set-parameters",
        json!({"x-checkpoint-delay": o.delay_ms, "x-colo-periodic": o.periodic}),
    )
    .unwrap();
    if let Some(ms) = o.compare_timeout_ms {
        pq.execute(
            "migrate-set-parameters",
            json!({"x-colo-compare-timeout": ms}),
        )
        .unwrap();
    }
    let relay = o.relay.then(|| Relay::start(port, Tamper::None));
    let to = relay.as_ref().map_or(port, |r| r.port);
    pq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{to}")}))
        .unwrap();
    let r = wait_migration(&mut pq, &["colo", "failed", "completed"], mig_timeout());
    assert_eq!(r["status"], "colo", "{r}");
    let r = wait_migration(&mut sq, &["colo", "failed", "completed"], mig_timeout());
    assert_eq!(r["status"], "colo", "{r}");
    let st = pq.execute("query-colo-status", json!({})).unwrap();
    assert_eq!(st["mode"], "primary", "{st}");
    let st = sq.execute("query-colo-status", json!({})).unwrap();
    assert_eq!(st["mode"], "secondary", "{st}");
    Pair {
        p,
        pq,
        s,
        sq,
        relay,
        log,
    }
}

/// The primary's `x-colo` statistics.
fn colo_stats(c: &mut Client) -> Value {
    c.execute("query-migrate", json!({})).unwrap()["x-colo"].clone()
}

fn stat(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Checkpoints completed so far, from query-migrate on `c`.
fn checkpoints(c: &mut Client) -> u64 {
    c.execute("query-migrate", json!({})).unwrap()["x-colo"]["checkpoints"]
        .as_u64()
        .unwrap_or(0)
}

fn wait_checkpoints(c: &mut Client, n: u64) -> Value {
    wait_colo_checkpoints(c, n, mig_timeout())
}

/// COLO reaches `colo`, checkpoints a dirtying guest 5+ times; the primary
/// is killed; `x-colo-lost-heartbeat` on the secondary makes its guest the
/// only one (periodic: from the last checkpoint; running: on from where it
/// is), its output continuing the released output with no line lost or
/// repeated.
fn primary_killed_secondary_takes_over(o: Opts) {
    let Pair {
        mut p,
        mut pq,
        s,
        mut sq,
        log,
        ..
    } = start_colo(o);
    let r = wait_checkpoints(&mut pq, 5);
    eprintln!("primary after 5 checkpoints: {r}");
    assert!(checkpoints(&mut sq) >= 4);
    let st = colo_stats(&mut sq);
    assert_eq!(
        st["mode"],
        if o.periodic { "periodic" } else { "running" },
        "{st}"
    );
    // The secondary's console says nothing during COLO (its output is
    // compared, or it does not run); its guest runs only in running mode.
    assert!(s.passes().is_empty(), "the secondary printed during COLO");
    if let Some(l) = &log {
        // ... but keeps what its guest said when asked (a PASS line comes
        // once the secondary finishes a pass within a checkpoint period).
        let deadline = Instant::now() + mig_timeout();
        loop {
            let kept = std::fs::read_to_string(l).unwrap_or_default();
            if complete_lines(&kept).any(|l| pass_number(l).is_some()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no PASS line in the secondary's log: {kept:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let thp = ram_huge_pages(s.pid(), 128 << 20);
    if o.periodic {
        assert_eq!(run_state(&mut sq), "colo");
        // Huge pages: off while checkpoints come in (RAM not preallocated),
        // on once the secondary runs the guest.
        assert_eq!(thp.map(|_| false), thp, "secondary during COLO");
    } else {
        assert!(
            ["running", "colo"].contains(&run_state(&mut sq).as_str()),
            "a running secondary is running (or in a checkpoint)"
        );
    }
    p.kill();
    sq.execute("x-colo-lost-heartbeat", json!({})).unwrap();
    let e = sq
        .wait_event("COLO_EXIT", |_| true, mig_timeout())
        .expect("COLO_EXIT");
    assert_eq!(e["data"], json!({"mode": "secondary", "reason": "request"}));
    let st = sq.execute("query-colo-status", json!({})).unwrap();
    assert_eq!(
        st,
        json!({"mode": "none", "last-mode": "secondary", "reason": "request"})
    );
    assert_eq!(run_state(&mut sq), "running");
    assert_eq!(
        thp.map(|_| true),
        ram_huge_pages(s.pid(), 128 << 20),
        "secondary after takeover"
    );
    let released = p.serial.text();
    assert_takes_over(&released, &s);
    s.assert_no_corrupt();
}

#[test]
fn periodic_primary_killed_secondary_takes_over() {
    if !kvm_available("periodic_primary_killed_secondary_takes_over") {
        return;
    }
    primary_killed_secondary_takes_over(Opts {
        periodic: true,
        ..Opts::default()
    });
}

#[test]
fn running_primary_killed_secondary_takes_over() {
    if !kvm_available("running_primary_killed_secondary_takes_over") {
        return;
    }
    primary_killed_secondary_takes_over(Opts {
        detout: true,
        delay_ms: 2000,
        log: true,
        ..Opts::default()
    });
}

/// Running secondary, the same output on both sides: it is released as
/// both say it, before any checkpoint, and the checkpoints are periodic.
#[test]
fn matching_output_is_released_before_the_checkpoint() {
    if !kvm_available("matching_output_is_released_before_the_checkpoint") {
        return;
    }
    // How far the secondary's guest falls behind the primary's between
    // two checkpoints depends on how the machine shares its CPUs between
    // them (on a busy one, more than 3 s in 10): both the delay and the
    // compare timeout are 3 s on this machine's scale, so that a line
    // the secondary says late still matches before the next checkpoint.
    let scale_3s = scaled(Duration::from_secs(3)).as_millis() as u64;
    let Pair {
        p, mut pq, s: _s, ..
    } = start_colo(Opts {
        detout: true,
        delay_ms: scale_3s,
        compare_timeout_ms: Some(scale_3s),
        ..Opts::default()
    });
    // Lines after checkpoint 1 until one matched (each line that both
    // say within a checkpoint period does; a line cut by a checkpoint is
    // released by it).
    wait_checkpoints(&mut pq, 1);
    let mut n = p.passes().last().copied().unwrap_or(0);
    let mut st = colo_stats(&mut pq);
    for _ in 0..6 {
        if stat(&st, "output-matched-bytes") > 0 {
            break;
        }
        n = p.wait_pass_beyond(n, boot_timeout());
        st = colo_stats(&mut pq);
        eprintln!("primary after PASS {n}: {st}");
    }
    assert!(stat(&st, "output-matched-bytes") > 0, "{st}");
    // No checkpoint for a line that differed: the output is the same.
    assert_eq!(stat(&st, "checkpoints-output-differed"), 0, "{st}");
    let st = wait_checkpoints(&mut pq, stat(&st, "checkpoints") + 2)["x-colo"].clone();
    eprintln!("primary after 2 more checkpoints: {st}");
    let periodic = stat(&st, "checkpoints-periodic");
    assert!(
        periodic * 2 > stat(&st, "checkpoints"),
        "most checkpoints are periodic with matching output: {st}"
    );
    assert_eq!(stat(&st, "checkpoints-output-differed"), 0, "{st}");
    assert!(st["output-hold-p50-ms"].as_f64().is_some(), "{st}");
    p.assert_no_corrupt();
}

/// Running secondary, output that differs (uptimes in every line): each
/// line that differs takes a checkpoint at once, long before the 60 s
/// delay; the common prefix of each line goes out before it.
#[test]
fn differing_output_checkpoints_follow_the_differences() {
    if !kvm_available("differing_output_checkpoints_follow_the_differences") {
        return;
    }
    let Pair {
        p, mut pq, s: _s, ..
    } = start_colo(Opts {
        delay_ms: 60_000,
        ..Opts::default()
    });
    let st = wait_checkpoints(&mut pq, 3)["x-colo"].clone();
    eprintln!("primary after 3 checkpoints: {st}");
    assert_eq!(stat(&st, "checkpoints-periodic"), 0, "{st}");
    assert!(
        stat(&st, "checkpoints-output-differed") + stat(&st, "checkpoints-compare-timeout") >= 3,
        "{st}"
    );
    assert!(stat(&st, "checkpoints-output-differed") >= 1, "{st}");
    // "PASS k ms=" is the same on both sides: released before the
    // checkpoint the rest of the line causes.
    assert!(stat(&st, "output-matched-bytes") >= 10, "{st}");
    let released = p.serial.text();
    p.wait_pass_beyond(last_pass(&released) + 1, boot_timeout());
    p.assert_no_corrupt();
}

/// Both paused right after a checkpoint (`stop` on each side holds across
/// checkpoints in COLO): their RAM is the same page by page, but for the
/// kvmclock structures KVM writes itself (at most one per vCPU and the
/// wall clock, none of them a workload page).
#[test]
fn memory_identical_after_a_checkpoint_with_both_paused() {
    if !kvm_available("memory_identical_after_a_checkpoint_with_both_paused") {
        return;
    }
    let Pair {
        mut p,
        mut pq,
        mut s,
        mut sq,
        ..
    } = start_colo(Opts::default());
    wait_checkpoints(&mut pq, 2);
    sq.execute("stop", json!({})).unwrap();
    pq.execute("stop", json!({})).unwrap();
    // The second checkpoint from here began after both stops.
    let n = checkpoints(&mut sq);
    wait_checkpoints(&mut sq, n + 2);
    assert_eq!(run_state(&mut pq), "paused");
    assert_eq!(run_state(&mut sq), "paused");
    let a = pmem_dump(&mut p, &mut pq, 128 << 20, "primary.mem");
    let b = pmem_dump(&mut s, &mut sq, 128 << 20, "secondary.mem");
    assert!(
        scan_workload_pages(&a).len() >= 4000,
        "workload pages not found in the dump"
    );
    let diff = differing_pages(&a, &b);
    eprintln!("pages differing: {diff:x?}");
    assert!(diff.len() <= 3, "{} pages differ: {diff:x?}", diff.len());
    for &pg in &diff {
        assert!(
            workload_page(&a[pg * 4096..(pg + 1) * 4096]).is_none(),
            "workload page {pg:#x} differs"
        );
    }
    // Both go on after failover, from the same state.
    pq.execute("x-colo-lost-heartbeat", json!({})).unwrap();
    pq.wait_event("COLO_EXIT", |_| true, mig_timeout()).unwrap();
    pq.execute("cont", json!({})).unwrap();
    let last = p.passes().last().copied().unwrap_or(0);
    p.wait_pass_beyond(last + 1, boot_timeout());
    p.assert_no_corrupt();
}

/// The secondary is killed: the primary stops checkpointing and says why,
/// its guest stopped and output held; `x-colo-lost-heartbeat` lets it run
/// alone with all its output.
#[test]
fn secondary_killed_primary_runs_alone() {
    if !kvm_available("secondary_killed_primary_runs_alone") {
        return;
    }
    let Pair {
        p, mut pq, mut s, ..
    } = start_colo(Opts::default());
    wait_checkpoints(&mut pq, 3);
    s.kill();
    let deadline = Instant::now() + mig_timeout();
    let r = loop {
        let r = pq.execute("query-migrate", json!({})).unwrap();
        if r.get("error-desc").is_some() {
            break r;
        }
        assert!(Instant::now() < deadline, "the primary did not notice: {r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("primary: {r}");
    assert_eq!(r["status"], "colo", "{r}");
    assert_ne!(run_state(&mut pq), "running");
    pq.execute("x-colo-lost-heartbeat", json!({})).unwrap();
    pq.wait_event("COLO_EXIT", |_| true, mig_timeout()).unwrap();
    assert_eq!(run_state(&mut pq), "running");
    let last = p.passes().last().copied().unwrap_or(0);
    p.wait_pass_beyond(last + 2, boot_timeout());
    assert_output_continues(&p.serial.text(), "");
    p.assert_no_corrupt();
}

/// `x-colo-lost-heartbeat` on the primary: it leaves COLO and runs alone
/// with all its output released; the secondary is told, exits COLO and
/// stays paused.
#[test]
fn primary_lost_heartbeat_runs_alone() {
    if !kvm_available("primary_lost_heartbeat_runs_alone") {
        return;
    }
    let Pair {
        p,
        mut pq,
        s,
        mut sq,
        ..
    } = start_colo(Opts::default());
    wait_checkpoints(&mut pq, 3);
    pq.execute("x-colo-lost-heartbeat", json!({})).unwrap();
    let e = pq.wait_event("COLO_EXIT", |_| true, mig_timeout()).unwrap();
    assert_eq!(e["data"], json!({"mode": "primary", "reason": "request"}));
    let r = wait_migration(&mut pq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(run_state(&mut pq), "running");
    let e = sq.wait_event("COLO_EXIT", |_| true, mig_timeout()).unwrap();
    assert_eq!(e["data"], json!({"mode": "secondary", "reason": "request"}));
    let st = sq.execute("query-colo-status", json!({})).unwrap();
    assert_eq!(st["mode"], "none", "{st}");
    assert_eq!(st["last-mode"], "secondary", "{st}");
    assert_eq!(run_state(&mut sq), "paused");
    let last = p.passes().last().copied().unwrap_or(0);
    p.wait_pass_beyond(last + 2, boot_timeout());
    assert_output_continues(&p.serial.text(), "");
    assert!(s.passes().is_empty(), "the secondary's guest ran");
}

/// The link breaks in the middle of a checkpoint (the relay cuts it after
/// part of the pages): the half checkpoint is discarded, both sides stop
/// checkpointing, and the secondary fails over to the previous checkpoint
/// with its integrity intact.
#[test]
fn link_cut_mid_checkpoint_secondary_uses_previous_checkpoint() {
    if !kvm_available("link_cut_mid_checkpoint_secondary_uses_previous_checkpoint") {
        return;
    }
    let Pair {
        p,
        mut pq,
        s,
        mut sq,
        relay,
        ..
    } = start_colo(Opts {
        relay: true,
        ..Opts::default()
    });
    let relay = relay.unwrap();
    wait_checkpoints(&mut pq, 3);
    let done = checkpoints(&mut sq);
    // 64 KiB into the next checkpoint's pages (a checkpoint here carries
    // about 3 MiB: 16 MiB/s dirtied over 200 ms).
    let at = relay.forwarded.load(std::sync::atomic::Ordering::SeqCst) as u64 + (64 << 10);
    relay.set_tamper(Tamper::Truncate { at });
    // Both sides notice and stop checkpointing, waiting for the command.
    let deadline = Instant::now() + mig_timeout();
    loop {
        let r = sq.execute("query-migrate", json!({})).unwrap();
        if r.get("error-desc").is_some() {
            eprintln!("secondary: {r}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the secondary did not notice the cut: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let n = checkpoints(&mut sq);
    assert!(n >= done, "{n} < {done}");
    sq.execute("x-colo-lost-heartbeat", json!({})).unwrap();
    sq.wait_event("COLO_EXIT", |_| true, mig_timeout()).unwrap();
    assert_eq!(run_state(&mut sq), "running");
    let released = p.serial.text();
    assert_takes_over(&released, &s);
    s.assert_no_corrupt();
    // The primary waits for the command too, guest stopped, output held.
    let r = pq.execute("query-migrate", json!({})).unwrap();
    assert_eq!(r["status"], "colo", "{r}");
    assert!(r.get("error-desc").is_some(), "{r}");
    assert_ne!(run_state(&mut pq), "running");
}

/// Garbage where a COLO message belongs: COLO stops with the seed's
/// "Unexpected COLO command", no hang; failover still works.
#[test]
fn unexpected_colo_message_stops_colo() {
    if !kvm_available("unexpected_colo_message_stops_colo") {
        return;
    }
    // Keep every process of the pair alive until the end (`..` would drop them).
    let Pair {
        p: _primary,
        mut pq,
        s,
        mut sq,
        relay,
        ..
    } = start_colo(Opts {
        relay: true,
        ..Opts::default()
    });
    let relay = relay.unwrap();
    wait_checkpoints(&mut pq, 2);
    // Between checkpoints the stream is idle: the garbage lands right
    // before the next checkpoint-request.
    let n = checkpoints(&mut sq);
    let deadline = Instant::now() + mig_timeout();
    while checkpoints(&mut sq) == n {
        assert!(
            Instant::now() < deadline,
            "no checkpoint after {n} within {:?}",
            mig_timeout()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let at = relay.forwarded.load(std::sync::atomic::Ordering::SeqCst) as u64;
    relay.set_tamper(Tamper::Garbage { at });
    let deadline = Instant::now() + mig_timeout();
    let r = loop {
        let r = sq.execute("query-migrate", json!({})).unwrap();
        if r.get("error-desc").is_some() {
            break r;
        }
        assert!(Instant::now() < deadline, "no error on the secondary: {r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let desc = r["error-desc"].as_str().unwrap_or_default();
    assert!(desc.contains("Unexpected COLO command"), "{r}");
    sq.execute("x-colo-lost-heartbeat", json!({})).unwrap();
    sq.wait_event("COLO_EXIT", |_| true, mig_timeout()).unwrap();
    assert_eq!(run_state(&mut sq), "running");
    s.wait_pass_beyond(1, boot_timeout());
    s.assert_no_corrupt();
}

/// x-colo only on the primary: refused with a clear error, the primary
/// keeps running.
#[test]
fn x_colo_only_on_primary_is_refused() {
    if !kvm_available("x_colo_only_on_primary_is_refused") {
        return;
    }
    let snap = snapshot(&guest("base"));
    let mut p = guest("primary")
        .incoming(&format!("file:{}", snap.display()))
        .spawn();
    p.wait_pass_beyond(2, boot_timeout());
    let port = free_port();
    let mut s = guest("secondary")
        .incoming(&format!("tcp:127.0.0.1:{port}"))
        .spawn();
    let _ = s.qmp();
    let mut pq = p.qmp();
    x_colo(&mut pq);
    pq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    let r = wait_migration(&mut pq, &["failed", "colo", "completed"], mig_timeout());
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        r["error-desc"]
            .as_str()
            .is_some_and(|d| d.contains("x-colo capability is not set on the destination")),
        "{r}"
    );
    assert_eq!(run_state(&mut pq), "running");
    let last = p.passes().last().copied().unwrap_or(0);
    p.wait_pass_beyond(last + 1, boot_timeout());
    p.assert_no_corrupt();
}

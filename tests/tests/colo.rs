//! COLO between two real minivmm processes: periodic checkpoints from the
//! primary to a secondary, output commit, and failover.

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

/// Primary restored from the boot snapshot, secondary waiting on a port
/// (through a relay when asked); both with x-colo; COLO started with a
/// 200 ms checkpoint delay and both sides in `colo`.
struct Pair {
    p: Vmm,
    pq: Client,
    s: Vmm,
    sq: Client,
    relay: Option<Relay>,
}

fn start_colo(with_relay: bool) -> Pair {
    let snap = snapshot(&guest("base"));
    let p = guest("primary")
        .incoming(&format!("file:{}", snap.display()))
        .spawn();
    p.wait_pass_beyond(2, boot_timeout());
    let port = free_port();
    let mut s = guest("secondary")
        .incoming(&format!("tcp:127.0.0.1:{port}"))
        .spawn();
    let mut sq = s.qmp();
    x_colo(&mut sq);
    let mut p = p;
    let mut pq = p.qmp();
    x_colo(&mut pq);
    pq.execute("migrate-set-parameters", json!({"x-checkpoint-delay": 200}))
        .unwrap();
    let relay = with_relay.then(|| Relay::start(port, Tamper::None));
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
    }
}

/// Checkpoints completed so far, from query-migrate on `c`.
fn checkpoints(c: &mut Client) -> u64 {
    c.execute("query-migrate", json!({})).unwrap()["x-colo"]["checkpoints"]
        .as_u64()
        .unwrap_or(0)
}

fn wait_checkpoints(c: &mut Client, n: u64) -> Value {
    let deadline = Instant::now() + mig_timeout();
    loop {
        let r = c.execute("query-migrate", json!({})).unwrap();
        if r["x-colo"]["checkpoints"].as_u64().unwrap_or(0) >= n {
            return r;
        }
        assert_eq!(r["status"], "colo", "{r}");
        assert!(Instant::now() < deadline, "fewer than {n} checkpoints: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// COLO reaches `colo`, checkpoints a dirtying guest 5+ times; the primary
/// is killed; `x-colo-lost-heartbeat` on the secondary resumes the guest
/// from the last checkpoint, its output continuing the released output.
#[test]
fn primary_killed_secondary_takes_over() {
    if !kvm_available("primary_killed_secondary_takes_over") {
        return;
    }
    let Pair {
        mut p,
        mut pq,
        mut s,
        mut sq,
        ..
    } = start_colo(false);
    let r = wait_checkpoints(&mut pq, 5);
    eprintln!("primary after 5 checkpoints: {r}");
    assert!(checkpoints(&mut sq) >= 4);
    assert_eq!(run_state(&mut sq), "colo");
    assert!(
        s.passes().is_empty(),
        "the secondary's guest ran during COLO"
    );
    // Huge pages: off while checkpoints come in (RAM not preallocated),
    // on once the secondary runs the guest.
    let thp = ram_huge_pages(s.pid(), 128 << 20);
    assert_eq!(thp.map(|_| false), thp, "secondary during COLO");
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
    let last = released.lines().rev().find_map(pass_number).unwrap_or(0);
    s.wait_pass_beyond(last + 2, boot_timeout());
    assert_output_continues(&released, &s.serial.text());
    s.assert_no_corrupt();
    let _ = &mut s;
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
    } = start_colo(false);
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
    } = start_colo(true);
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
    let last = released.lines().rev().find_map(pass_number).unwrap_or(0);
    s.wait_pass_beyond(last + 2, boot_timeout());
    assert_output_continues(&released, &s.serial.text());
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
    } = start_colo(true);
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

//! Postcopy migration between two real minivmm processes: userfaultfd on
//! the destination, page requests over the return path (or, with
//! `postcopy-preempt`, over a second connection that also carries the
//! requested pages).

use std::time::Duration;

use serde_json::json;
use tests::*;

fn mig_timeout() -> Duration {
    scaled(Duration::from_secs(180))
}

fn guest(name: &str) -> VmmBuilder {
    VmmBuilder::new(name).smp(2)
}

/// A source restored from the shared boot snapshot, running.
fn running_source(b: VmmBuilder, snap_of: &VmmBuilder) -> Vmm {
    let snap = snapshot(snap_of);
    let src = b.incoming(&format!("file:{}", snap.display())).spawn();
    src.wait_pass_beyond(2, boot_timeout());
    src
}

/// A destination listening on a fresh port with postcopy-ram (QMP ready).
fn postcopy_destination(b: VmmBuilder, alias: bool) -> (Vmm, Client, u16) {
    let port = free_port();
    let mut d = b.incoming(&format!("tcp:127.0.0.1:{port}")).spawn();
    let mut q = d.qmp();
    let name = if alias {
        "x-postcopy-ram"
    } else {
        "postcopy-ram"
    };
    set_caps(&mut q, &[(name, true)]);
    (d, q, port)
}

/// Check that `cap` shows as set, then migrate to `uri` behind a 5 MB/s
/// link with a 1 ms downtime limit: a guest dirtying 16 MiB/s never
/// converges. After a switch the background stream keeps that pace, so the
/// destination's guest touches pages that have not arrived yet however
/// fast or slow this machine runs it (unpaced, the rest of RAM could
/// arrive before its first fault: seen once as 0 page requests).
fn migrate_slowly(sq: &mut Client, cap: &str, uri: &str) {
    let caps = sq.execute("query-migrate-capabilities", json!({})).unwrap();
    assert!(
        caps.as_array()
            .unwrap()
            .iter()
            .any(|c| c["capability"] == cap && c["state"] == true),
        "{caps}"
    );
    sq.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 5_000_000, "max-postcopy-bandwidth": 5_000_000, "downtime-limit": 1}),
    )
    .unwrap();
    sq.execute("migrate", json!({ "uri": uri })).unwrap();
}

/// With postcopy-ram and events on the source, migrate slowly (see
/// `migrate_slowly`) to the destination on `port` and wait for the third
/// precopy pass: the guest has dirtied pages sent before by then.
fn precopy_to_pass_3(sq: &mut Client, port: u16) {
    set_caps(sq, &[("postcopy-ram", true), ("events", true)]);
    migrate_slowly(sq, "postcopy-ram", &format!("tcp:127.0.0.1:{port}"));
    sq.wait_event(
        "MIGRATION_PASS",
        |e| e["data"]["pass"].as_u64() >= Some(3),
        mig_timeout(),
    )
    .unwrap();
}

/// Both sides complete; the source served page requests and ends
/// `postmigrate`, the destination served faults and runs.
fn completed_with_requests(sq: &mut Client, dq: &mut Client) {
    let r = wait_migration(sq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    assert!(r["ram"]["postcopy-requests"].as_u64() > Some(0), "{r}");
    assert!(r["downtime"].is_u64(), "{r}");
    assert_eq!(run_state(sq), "postmigrate");
    let dr = wait_migration(dq, &["completed", "failed"], mig_timeout());
    assert_eq!(dr["status"], "completed", "{dr}");
    assert!(
        dr["x-postcopy-faults"]["serviced"].as_u64() > Some(0),
        "{dr}"
    );
    assert_eq!(run_state(dq), "running");
    eprintln!("source: {r}\ndestination: {dr}");
}

/// The migration failed before any switch, saying `why`: the source keeps
/// its guest running (it goes on, intact) and the destination exits with
/// an error.
fn failed_before_switch(src: &Vmm, sq: &mut Client, dst: &mut Vmm, why: &str) {
    let r = wait_migration(sq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        r["error-desc"].as_str().is_some_and(|d| d.contains(why)),
        "{r}"
    );
    assert_eq!(run_state(sq), "running");
    assert!(!dst.wait_exit(mig_timeout()).success());
    let last = src.passes().last().copied().unwrap_or(0);
    src.wait_pass_beyond(last + 1, boot_timeout());
    src.assert_no_corrupt();
}

/// The main scenario: a guest dirtying 16 MiB/s behind a 5 MB/s link never
/// converges; after `migrate-start-postcopy` it completes, with page
/// requests served, 2 vCPUs, integrity intact. With `postcopy-blocktime`
/// on the destination, its `query-migrate` shows how long each vCPU
/// waited on missing pages (some did) and how long all did at once.
#[test]
fn non_converging_guest_completes_in_postcopy() {
    if !kvm_available("non_converging_guest_completes_in_postcopy") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (dst, mut dq, port) = postcopy_destination(guest("dst"), false);
    set_caps(&mut dq, &[("postcopy-blocktime", true)]);
    let mut sq = src.qmp();
    precopy_to_pass_3(&mut sq, port);
    let r = sq.execute("query-migrate", json!({})).unwrap();
    assert_eq!(r["status"], "active", "still in precopy: {r}");
    sq.execute("migrate-start-postcopy", json!({})).unwrap();
    sq.wait_event(
        "MIGRATION",
        |e| e["data"]["status"] == "postcopy-active",
        mig_timeout(),
    )
    .unwrap();
    completed_with_requests(&mut sq, &mut dq);
    let dr = dq.execute("query-migrate", json!({})).unwrap();
    let per = dr["postcopy-vcpu-blocktime"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(per.len(), 2, "{dr}");
    let sum: u64 = per.iter().filter_map(serde_json::Value::as_u64).sum();
    assert!(sum > 0, "no vCPU waited: {dr}");
    let all = dr["postcopy-blocktime"]
        .as_u64()
        .expect("postcopy-blocktime");
    assert!(per.iter().all(|v| v.as_u64() >= Some(all)), "{dr}");
    assert_continues(&src, &dst);
}

/// `max-postcopy-bandwidth` paces the background stream only: requested
/// pages never wait for it. With the background held to 4 KiB/s (one full
/// page a second), a request that waited for the pacing would take a
/// second or more; the destination's faults served in a window after the
/// switch must have taken a small part of that (median under 250 ms: how
/// many faults a guest makes depends on how fast the machine runs it, how
/// long each waits does not). Then the limit is lifted on the running
/// migration (it applies at once, as in QEMU) and it completes, the guest
/// intact.
#[test]
fn requested_pages_bypass_the_postcopy_bandwidth_limit() {
    if !kvm_available("requested_pages_bypass_the_postcopy_bandwidth_limit") {
        return;
    }
    const LIMIT: u64 = 4 << 10;
    let mut src = running_source(guest("src"), &guest("base"));
    let (dst, mut dq, port) = postcopy_destination(guest("dst"), false);
    let mut sq = src.qmp();
    set_caps(&mut sq, &[("postcopy-ram", true), ("events", true)]);
    sq.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 5_000_000, "max-postcopy-bandwidth": LIMIT, "downtime-limit": 1}),
    )
    .unwrap();
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    sq.execute("migrate-start-postcopy", json!({})).unwrap();
    wait_migration(&mut dq, &["postcopy-active"], mig_timeout());
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last, boot_timeout());
    let faults = |dq: &mut Client| {
        dq.execute("query-migrate", json!({})).unwrap()["x-postcopy-faults"].clone()
    };
    let served = |f: &serde_json::Value| f["serviced"].as_u64().unwrap_or(0);
    let (t0, s0) = (std::time::Instant::now(), served(&faults(&mut dq)));
    std::thread::sleep(scaled(Duration::from_secs(5)));
    let f = faults(&mut dq);
    let (window, s1) = (t0.elapsed(), served(&f));
    let background_pages = (LIMIT as f64 * window.as_secs_f64() / 4096.0) as u64;
    eprintln!(
        "{} faults served in {window:?} (the background alone: at most {background_pages} \
         pages): {f}",
        s1 - s0
    );
    assert!(s1 > s0, "no fault served in {window:?}: {f}");
    let p50 = f["latency-p50-us"].as_u64().unwrap_or(u64::MAX);
    assert!(
        p50 < 250_000,
        "requested pages waited for max-postcopy-bandwidth (a page a second): \
         median fault {p50} us: {f}"
    );
    let r = sq.execute("query-migrate", json!({})).unwrap();
    assert_eq!(r["status"], "postcopy-active", "{r}");
    sq.execute(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 0}),
    )
    .unwrap();
    completed_with_requests(&mut sq, &mut dq);
    assert_continues(&src, &dst);
}

/// Into a destination started with `-S`: after the switch its guest stays
/// paused, so every page arrives by the background stream and both sides
/// end paused. Their RAM must then be identical except the kvmclock areas
/// (see `assert_same_memory`): a page the source dirtied after sending it
/// must have been discarded (before the stop or at it) and sent again, and
/// nothing else dropped.
#[test]
fn paused_destination_memory_identical_after_postcopy() {
    if !kvm_available("paused_destination_memory_identical_after_postcopy") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (mut dst, mut dq, port) = postcopy_destination(guest("dst").arg("-S"), false);
    let mut sq = src.qmp();
    precopy_to_pass_3(&mut sq, port);
    sq.execute("migrate-start-postcopy", json!({})).unwrap();
    let r = wait_migration(&mut sq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(run_state(&mut sq), "postmigrate");
    let dr = wait_migration(&mut dq, &["completed", "failed"], mig_timeout());
    assert_eq!(dr["status"], "completed", "{dr}");
    assert_eq!(run_state(&mut dq), "paused");
    assert_same_memory(&mut src, &mut sq, &mut dst, &mut dq, 128 << 20);
    cont_and_goes_on(&src, &dst, &mut dq);
}

/// `migrate_start_postcopy` (the alias) right after `migrate`, with the
/// `x-postcopy-ram` alias on the destination: almost everything arrives
/// after the switch. The destination runs with `-mem-prealloc`, so its RAM
/// is backed (and reads as zero) from the start: a page not received by
/// the switch must still be missing for userfaultfd, or the guest would
/// read zeros where its data belongs (and report CORRUPT).
#[test]
fn start_postcopy_immediately_after_migrate() {
    if !kvm_available("start_postcopy_immediately_after_migrate") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (dst, mut dq, port) = postcopy_destination(guest("dst").arg("-mem-prealloc"), true);
    let mut sq = src.qmp();
    set_caps(&mut sq, &[("x-postcopy-ram", true)]);
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    sq.execute("migrate_start_postcopy", json!({})).unwrap();
    let r = wait_migration(&mut sq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    let dr = wait_migration(&mut dq, &["completed", "failed"], mig_timeout());
    assert_eq!(dr["status"], "completed", "{dr}");
    assert_continues(&src, &dst);
}

/// After a (precopy) completion, `migrate-start-postcopy` is harmless.
#[test]
fn start_postcopy_after_completion_is_harmless() {
    if !kvm_available("start_postcopy_after_completion_is_harmless") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (dst, _dq, port) = postcopy_destination(guest("dst"), false);
    let mut sq = src.qmp();
    set_caps(&mut sq, &[("postcopy-ram", true)]);
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    let r = wait_migration(&mut sq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    sq.execute("migrate-start-postcopy", json!({})).unwrap();
    assert_eq!(
        sq.execute("query-migrate", json!({})).unwrap()["status"],
        "completed"
    );
    assert_continues(&src, &dst);
}

/// The capability on the source only: refused at advise, before any
/// switch; the source keeps running.
#[test]
fn capability_only_on_source_is_refused_early() {
    if !kvm_available("capability_only_on_source_is_refused_early") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let port = free_port();
    let mut dst = guest("dst")
        .incoming(&format!("tcp:127.0.0.1:{port}"))
        .spawn();
    let _ = dst.qmp();
    let mut sq = src.qmp();
    set_caps(&mut sq, &[("postcopy-ram", true)]);
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    let r = wait_migration(&mut sq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "failed", "{r}");
    let desc = r["error-desc"].as_str().unwrap_or_default();
    assert!(
        desc.contains("postcopy-ram capability is not set on the destination"),
        "{r}"
    );
    assert_eq!(r["ram"]["transferred"].as_u64().unwrap_or(0), 0, "{r}");
    assert_eq!(run_state(&mut sq), "running");
    assert!(!dst.wait_exit(mig_timeout()).success());
    let last = src.passes().last().copied().unwrap_or(0);
    src.wait_pass_beyond(last + 1, boot_timeout());
    src.assert_no_corrupt();
}

/// A destination whose userfaultfd check fails (simulated): the migration
/// fails in setup and the source keeps running.
#[test]
fn destination_without_userfaultfd_fails_in_setup() {
    if !kvm_available("destination_without_userfaultfd_fails_in_setup") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (mut dst, _dq, port) =
        postcopy_destination(guest("dst").env("MINIVMM_TEST_NO_USERFAULTFD", "1"), false);
    let mut sq = src.qmp();
    set_caps(&mut sq, &[("postcopy-ram", true)]);
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    failed_before_switch(&src, &mut sq, &mut dst, "userfaultfd is unavailable");
}

/// The connection breaks after the switch (the relay cuts it): both sides
/// go to `postcopy-paused`, the destination's guest stays up (vCPUs that
/// fault wait); `migrate-recover` on the destination and `migrate` with
/// `resume` on the source (directly, no relay) bring it back through
/// `postcopy-recover` to `postcopy-active`, and it completes: every page
/// the destination lacked sent again, none twice (a page placed twice
/// fails the migration), the guest intact.
#[test]
fn connection_lost_during_postcopy_recovers() {
    if !kvm_available("connection_lost_during_postcopy_recovers") {
        return;
    }
    connection_lost(false);
}

/// As above with the preempt channel (the relay cuts both connections);
/// the recovery opens it again: the destination's preempt thread places
/// requested pages after the recovery (the background held to 1 MB/s
/// meanwhile, so that the guest still faults).
#[test]
fn connection_lost_during_postcopy_with_preempt_recovers() {
    if !kvm_available("connection_lost_during_postcopy_with_preempt_recovers") {
        return;
    }
    connection_lost(true);
}

fn connection_lost(preempt: bool) {
    let mut src = running_source(guest("src"), &guest("base"));
    let (dst, mut dq, port) = postcopy_destination(guest("dst"), false);
    set_caps(&mut dq, &[("postcopy-preempt", preempt), ("events", true)]);
    let relay = Relay::start(port, Tamper::None);
    let mut sq = src.qmp();
    set_caps(
        &mut sq,
        &[
            ("postcopy-ram", true),
            ("postcopy-preempt", preempt),
            ("events", true),
        ],
    );
    slow_postcopy(&mut sq, relay.port);
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last, boot_timeout());
    relay.cut();
    both_paused(&mut sq, &mut dq);
    let by_preempt = |dq: &mut Client| {
        let r = dq.execute("query-migrate", json!({})).unwrap();
        r["x-postcopy-faults"]["serviced-by-stream"]["preempt"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = by_preempt(&mut dq);
    let counts = |c: &mut Client| {
        let r = c.execute("query-migrate", json!({})).unwrap();
        let n = |k: &str| r["ram"][k].as_u64().unwrap_or(0);
        (n("transferred"), n("normal") + n("duplicate"))
    };
    let paused_counts = [counts(&mut sq), counts(&mut dq)];
    recover(&mut sq, &mut dq, 1);
    if preempt {
        sq.execute(
            "migrate-set-parameters",
            json!({"max-postcopy-bandwidth": 1_000_000}),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + mig_timeout();
        while by_preempt(&mut dq) == before {
            assert!(
                std::time::Instant::now() < deadline,
                "no page came on a reopened preempt channel within {:?}",
                mig_timeout()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        sq.execute(
            "migrate-set-parameters",
            json!({"max-postcopy-bandwidth": 0}),
        )
        .unwrap();
    }
    completed_with_requests(&mut sq, &mut dq);
    let r = sq.execute("query-migrate", json!({})).unwrap();
    assert!(r["x-postcopy-pages-resent"].as_u64().is_some(), "{r}");
    // The statistics count on across the recovery.
    let done = [counts(&mut sq), counts(&mut dq)];
    for (side, (p, d)) in ["source", "destination"]
        .iter()
        .zip(paused_counts.iter().zip(done))
    {
        assert!(
            d.0 > p.0 && d.1 > p.1,
            "{side}: paused at {p:?}, done at {d:?}"
        );
    }
    assert_continues(&src, &dst);
}

/// The relay cuts both connections the moment the destination runs the
/// guest (its faults' requests outstanding, nothing of the background
/// there yet): both sides pause, recover, complete, the guest intact.
#[test]
fn connection_lost_right_after_the_switch_recovers() {
    if !kvm_available("connection_lost_right_after_the_switch_recovers") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (dst, mut dq, port) = postcopy_destination(guest("dst"), false);
    set_caps(&mut dq, &[("events", true)]);
    let relay = Relay::start(port, Tamper::None);
    let mut sq = src.qmp();
    set_caps(&mut sq, &[("postcopy-ram", true), ("events", true)]);
    slow_postcopy(&mut sq, relay.port);
    dq.wait_event("RESUME", |_| true, mig_timeout())
        .expect("the destination runs the guest");
    relay.cut();
    both_paused(&mut sq, &mut dq);
    recover(&mut sq, &mut dq, 1);
    completed_with_requests(&mut sq, &mut dq);
    assert_continues(&src, &dst);
}

/// A running source and a postcopy destination behind a relay, both with
/// `events` and `x-postcopy-auto-recover` of `ms` (shown by
/// query-migrate-parameters), the source with `postcopy-ram`.
fn auto_recovering(ms: u64) -> (Vmm, Client, Vmm, Client, Relay) {
    let mut src = running_source(guest("src"), &guest("base"));
    let (dst, mut dq, port) = postcopy_destination(guest("dst"), false);
    let relay = Relay::start(port, Tamper::None);
    let mut sq = src.qmp();
    set_caps(&mut sq, &[("postcopy-ram", true)]);
    for c in [&mut sq, &mut dq] {
        set_caps(c, &[("events", true)]);
        c.execute(
            "migrate-set-parameters",
            json!({ "x-postcopy-auto-recover": ms }),
        )
        .unwrap();
        let p = c.execute("query-migrate-parameters", json!({})).unwrap();
        assert_eq!(p["x-postcopy-auto-recover"], ms, "{p}");
    }
    (src, sq, dst, dq, relay)
}

/// `x-postcopy-auto-recover` on both sides: after the relay cuts the
/// connections, both pause, the source reconnects through the relay to
/// the destination's original listener by itself, and the postcopy
/// recovers (`postcopy-recover`, counted) and completes with no command
/// given; the guest intact.
#[test]
fn automatic_recovery_after_a_cut() {
    if !kvm_available("automatic_recovery_after_a_cut") {
        return;
    }
    let (src, mut sq, dst, mut dq, relay) = auto_recovering(60_000);
    slow_postcopy(&mut sq, relay.port);
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last, boot_timeout());
    for c in [&mut sq, &mut dq] {
        c.take_events();
    }
    relay.cut();
    for (side, c) in [("source", &mut sq), ("destination", &mut dq)] {
        for st in ["postcopy-paused", "postcopy-recover"] {
            c.wait_event("MIGRATION", |e| e["data"]["status"] == st, mig_timeout())
                .unwrap_or_else(|e| panic!("{side}: {st}: {e}"));
        }
    }
    sq.execute(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 0}),
    )
    .unwrap();
    completed_with_requests(&mut sq, &mut dq);
    for (side, c) in [("source", &mut sq), ("destination", &mut dq)] {
        let r = c.execute("query-migrate", json!({})).unwrap();
        assert_eq!(r["x-postcopy-recoveries"], 1, "{side}: {r}");
    }
    assert_continues(&src, &dst);
}

/// `x-postcopy-auto-recover` of 2 s with the destination unreachable (the
/// relay gone after its cut): both sides stay `postcopy-paused` past the
/// limit, say they gave up, and the manual recovery still works.
#[test]
fn automatic_recovery_gives_up_after_its_limit() {
    if !kvm_available("automatic_recovery_gives_up_after_its_limit") {
        return;
    }
    let (src, mut sq, dst, mut dq, relay) = auto_recovering(2_000);
    slow_postcopy(&mut sq, relay.port);
    relay.cut();
    drop(relay);
    both_paused(&mut sq, &mut dq);
    let gave_up = |v: &Vmm| v.stderr.text().contains("x-postcopy-auto-recover");
    let deadline = std::time::Instant::now() + scaled(Duration::from_secs(20));
    while !(gave_up(&src) && gave_up(&dst)) {
        assert!(
            std::time::Instant::now() < deadline,
            "no side said it gave up: source {:?}, destination {:?}",
            src.stderr.text(),
            dst.stderr.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (side, c) in [("source", &mut sq), ("destination", &mut dq)] {
        let r = c.execute("query-migrate", json!({})).unwrap();
        assert_eq!(r["status"], "postcopy-paused", "{side}: {r}");
    }
    recover(&mut sq, &mut dq, 1);
    completed_with_requests(&mut sq, &mut dq);
    assert_continues(&src, &dst);
}

/// Migrate to 127.0.0.1:`port` and switch to postcopy at once, the
/// background stream held to 1 MB/s so that the postcopy lasts; returns
/// once the source is `postcopy-active` (capabilities set by the caller).
fn slow_postcopy(sq: &mut Client, port: u16) {
    sq.execute(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 1_000_000}),
    )
    .unwrap();
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    sq.execute("migrate-start-postcopy", json!({})).unwrap();
    wait_migration(sq, &["postcopy-active"], mig_timeout());
}

/// Both sides in `postcopy-paused`, saying why; the destination's guest
/// still up (its run state unchanged by the pause), the source's stopped.
fn both_paused(sq: &mut Client, dq: &mut Client) {
    for (side, c) in [("source", &mut *sq), ("destination", &mut *dq)] {
        let r = wait_migration(
            c,
            &["postcopy-paused", "failed", "completed"],
            mig_timeout(),
        );
        assert_eq!(r["status"], "postcopy-paused", "{side}: {r}");
        assert!(
            r["error-desc"].as_str().is_some_and(|d| !d.is_empty()),
            "{side}: {r}"
        );
        c.wait_event(
            "MIGRATION",
            |e| e["data"]["status"] == "postcopy-paused",
            mig_timeout(),
        )
        .unwrap_or_else(|e| panic!("{side}: {e}"));
    }
    // A link cut before the destination carried out the package's RUN
    // leaves its guest `inmigrate` until the recovery.
    let dst_state = run_state(dq);
    assert!(
        dst_state == "running" || dst_state == "inmigrate",
        "destination: {dst_state}"
    );
    assert_ne!(run_state(sq), "running");
}

/// Recover a paused postcopy on a fresh port: `migrate-recover` there, then
/// `migrate` with `resume` (the background unpaced from now on); both
/// pass `postcopy-recover` and are `postcopy-active` again (or done),
/// the recovery counted (`n` so far).
fn recover(sq: &mut Client, dq: &mut Client, n: u64) {
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    dq.execute("migrate-recover", json!({ "uri": uri }))
        .unwrap();
    sq.execute(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 0}),
    )
    .unwrap();
    sq.execute("migrate", json!({"uri": uri, "resume": true}))
        .unwrap();
    for (side, c) in [("source", &mut *sq), ("destination", &mut *dq)] {
        c.wait_event(
            "MIGRATION",
            |e| e["data"]["status"] == "postcopy-recover",
            mig_timeout(),
        )
        .unwrap_or_else(|e| panic!("{side}: {e}"));
        // Recovered once more (an older event may have matched above).
        let deadline = std::time::Instant::now() + mig_timeout();
        let r = loop {
            let r = c.execute("query-migrate", json!({})).unwrap();
            if r["x-postcopy-recoveries"] == n || r["status"] == "failed" {
                break r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{side}: recovery {n} not done within {:?}: {r}",
                mig_timeout()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            r["status"] == "postcopy-active" || r["status"] == "completed",
            "{side}: {r}"
        );
        assert!(r["x-postcopy-paused-ms"].as_u64().is_some(), "{side}: {r}");
    }
}

/// `migrate-pause` on the source, recovery; then on the destination,
/// recovery again: both recoveries counted, the migration completes, the
/// guest intact. A pause outside postcopy is refused.
#[test]
fn migrate_pause_on_each_side_then_recover() {
    if !kvm_available("migrate_pause_on_each_side_then_recover") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (dst, mut dq, port) = postcopy_destination(guest("dst"), false);
    set_caps(&mut dq, &[("events", true)]);
    let mut sq = src.qmp();
    set_caps(&mut sq, &[("postcopy-ram", true), ("events", true)]);
    let e = sq
        .execute("migrate-pause", json!({}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("postcopy-active"), "{e}");
    slow_postcopy(&mut sq, port);
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last, boot_timeout());
    sq.execute("migrate-pause", json!({})).unwrap();
    both_paused(&mut sq, &mut dq);
    let paused_by_user = |c: &mut Client| {
        let r = c.execute("query-migrate", json!({})).unwrap();
        assert_eq!(r["error-desc"], "paused by migrate-pause", "{r}");
    };
    paused_by_user(&mut sq);
    // Slow again, so that there is a postcopy left to pause.
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    dq.execute("migrate-recover", json!({ "uri": uri }))
        .unwrap();
    sq.execute("migrate", json!({"uri": uri, "resume": true}))
        .unwrap();
    for c in [&mut sq, &mut dq] {
        let r = wait_migration(c, &["postcopy-active", "failed"], mig_timeout());
        assert_eq!(r["status"], "postcopy-active", "{r}");
    }
    dq.execute("migrate-pause", json!({})).unwrap();
    both_paused(&mut sq, &mut dq);
    paused_by_user(&mut dq);
    recover(&mut sq, &mut dq, 2);
    completed_with_requests(&mut sq, &mut dq);
    assert_continues(&src, &dst);
}

/// A recovery whose new connection breaks in the handshake (a relay that
/// cuts it after a few bytes) pauses both sides again; the next attempt,
/// direct, recovers and completes.
#[test]
fn failed_recovery_pauses_again_and_can_be_retried() {
    if !kvm_available("failed_recovery_pauses_again_and_can_be_retried") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (dst, mut dq, port) = postcopy_destination(guest("dst"), false);
    set_caps(&mut dq, &[("events", true)]);
    let mut sq = src.qmp();
    set_caps(&mut sq, &[("postcopy-ram", true), ("events", true)]);
    slow_postcopy(&mut sq, port);
    sq.execute("migrate-pause", json!({})).unwrap();
    both_paused(&mut sq, &mut dq);
    let port = free_port();
    dq.execute(
        "migrate-recover",
        json!({ "uri": format!("tcp:127.0.0.1:{port}") }),
    )
    .unwrap();
    // 20 bytes: the header and part of the first command.
    let relay = Relay::start(port, Tamper::Truncate { at: 20 });
    sq.execute(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{}", relay.port), "resume": true}),
    )
    .unwrap();
    sq.wait_event(
        "MIGRATION",
        |e| e["data"]["status"] == "postcopy-recover",
        mig_timeout(),
    )
    .unwrap();
    // The destination too must have taken the relay's connection and lost
    // it: until it accepts, it is still paused from before, and a
    // `migrate-recover` sent while it then tries the handshake is refused.
    dq.wait_event(
        "MIGRATION",
        |e| e["data"]["status"] == "postcopy-recover",
        mig_timeout(),
    )
    .unwrap();
    let r = wait_migration(&mut sq, &["postcopy-paused", "failed"], mig_timeout());
    assert_eq!(r["status"], "postcopy-paused", "{r}");
    let r = wait_migration(&mut dq, &["postcopy-paused", "failed"], mig_timeout());
    assert_eq!(r["status"], "postcopy-paused", "{r}");
    drop(relay);
    recover(&mut sq, &mut dq, 1);
    completed_with_requests(&mut sq, &mut dq);
    assert_continues(&src, &dst);
}

/// The source killed while paused: the destination stays `postcopy-paused`
/// (it can never complete: nobody else has its missing pages), saying why,
/// its process up.
#[test]
fn source_killed_while_paused_leaves_destination_paused() {
    if !kvm_available("source_killed_while_paused_leaves_destination_paused") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (mut dst, mut dq, port) = postcopy_destination(guest("dst"), false);
    set_caps(&mut dq, &[("events", true)]);
    let mut sq = src.qmp();
    set_caps(&mut sq, &[("postcopy-ram", true), ("events", true)]);
    slow_postcopy(&mut sq, port);
    sq.execute("migrate-pause", json!({})).unwrap();
    both_paused(&mut sq, &mut dq);
    src.kill();
    std::thread::sleep(Duration::from_secs(1));
    let r = dq.execute("query-migrate", json!({})).unwrap();
    assert_eq!(r["status"], "postcopy-paused", "{r}");
    assert!(
        r["error-desc"].as_str().is_some_and(|d| !d.is_empty()),
        "{r}"
    );
    assert!(dst.exited().is_none(), "the destination should stay up");
    dst.assert_no_corrupt();
}

/// The destination is lost exactly while the source waits for PONG 5 (the
/// discard before the stop is out; the guest still runs on the source):
/// the source fails, saying so, keeps its guest running, intact, and the
/// destination exits with an error.
#[test]
fn destination_lost_at_the_switch_ping() {
    if !kvm_available("destination_lost_at_the_switch_ping") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (mut dst, _dq, port) = postcopy_destination(guest("dst"), false);
    let relay = Relay::start(port, Tamper::CutAtPing { value: 5 });
    let mut sq = src.qmp();
    precopy_to_pass_3(&mut sq, relay.port);
    sq.execute("migrate-start-postcopy", json!({})).unwrap();
    failed_before_switch(
        &src,
        &mut sq,
        &mut dst,
        "connection to the destination was lost",
    );
}

/// `migrate_cancel` after the switch (with the preempt channel): the source
/// reports `cancelled` and keeps its copy stopped (the destination already
/// ran the guest); the destination, which cannot tell a cancel from a
/// broken link, pauses (as QEMU's does) and stays up, saying why.
#[test]
fn cancel_during_postcopy_with_preempt() {
    if !kvm_available("cancel_during_postcopy_with_preempt") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (mut dst, mut dq, port) = postcopy_destination(guest("dst"), false);
    set_caps(&mut dq, &[("postcopy-preempt", true)]);
    let mut sq = src.qmp();
    set_caps(
        &mut sq,
        &[("postcopy-ram", true), ("postcopy-preempt", true)],
    );
    slow_postcopy(&mut sq, port);
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last, boot_timeout());
    sq.execute("migrate_cancel", json!({})).unwrap();
    let r = wait_migration(
        &mut sq,
        &["cancelled", "failed", "completed"],
        mig_timeout(),
    );
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_ne!(
        run_state(&mut sq),
        "running",
        "the source resumed a guest the destination ran"
    );
    let dr = wait_migration(&mut dq, &["postcopy-paused", "failed"], mig_timeout());
    assert_eq!(dr["status"], "postcopy-paused", "{dr}");
    assert!(
        dr["error-desc"].as_str().is_some_and(|d| !d.is_empty()),
        "{dr}"
    );
    assert!(dst.exited().is_none(), "the destination should stay up");
    src.assert_no_corrupt();
    dst.assert_no_corrupt();
}

/// `postcopy-preempt` on both sides, over unix: requested pages come on the
/// second connection (the destination's fault statistics count them served)
/// and the non-converging guest completes with its integrity intact.
#[test]
fn preempt_channel_serves_requests() {
    if !kvm_available("preempt_channel_serves_requests") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let sock = src.dir.path("postcopy.sock");
    let uri = format!("unix:{}", sock.display());
    let mut dst = guest("dst").incoming(&uri).spawn();
    let mut dq = dst.qmp();
    set_caps(
        &mut dq,
        &[("postcopy-ram", true), ("postcopy-preempt", true)],
    );
    let mut sq = src.qmp();
    set_caps(
        &mut sq,
        &[("postcopy-ram", true), ("postcopy-preempt", true)],
    );
    migrate_slowly(&mut sq, "postcopy-preempt", &uri);
    let r = wait_migration(&mut sq, &["active", "failed"], mig_timeout());
    assert_eq!(r["status"], "active", "{r}");
    // Let the guest dirty what was sent, then switch.
    let last = src.passes().last().copied().unwrap_or(0);
    src.wait_pass_beyond(last + 1, boot_timeout());
    sq.execute("migrate-start-postcopy", json!({})).unwrap();
    completed_with_requests(&mut sq, &mut dq);
    assert_continues(&src, &dst);
}

/// `postcopy-preempt` needs `postcopy-ram` (QMP refuses it alone), and set
/// on the source only, the migration fails before the switch with the
/// reason; the source keeps running.
#[test]
fn preempt_only_on_source_is_refused_early() {
    if !kvm_available("preempt_only_on_source_is_refused_early") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (mut dst, _dq, port) = postcopy_destination(guest("dst"), false);
    let mut sq = src.qmp();
    let e = sq
        .execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "postcopy-preempt", "state": true}]}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("Postcopy preempt requires postcopy-ram"), "{e}");
    set_caps(
        &mut sq,
        &[("postcopy-ram", true), ("postcopy-preempt", true)],
    );
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    failed_before_switch(
        &src,
        &mut sq,
        &mut dst,
        "postcopy-preempt capability is not set on the destination",
    );
}

/// The preempt channel damaged on the way (a relay flips the first byte
/// of the second connection, its magic): the destination refuses it by
/// name, the source fails before any switch with that reason and keeps
/// its guest running.
#[test]
fn damaged_preempt_channel_is_refused() {
    if !kvm_available("damaged_preempt_channel_is_refused") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (mut dst, mut dq, port) = postcopy_destination(guest("dst"), false);
    set_caps(&mut dq, &[("postcopy-preempt", true)]);
    let relay = Relay::start_with_second(port, Tamper::None, Tamper::Flip { at: 0 });
    let mut sq = src.qmp();
    set_caps(
        &mut sq,
        &[("postcopy-ram", true), ("postcopy-preempt", true)],
    );
    sq.execute(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{}", relay.port)}),
    )
    .unwrap();
    failed_before_switch(&src, &mut sq, &mut dst, "not a preempt channel");
    let why = dst.stderr.text();
    assert!(
        why.contains("not a preempt channel"),
        "the destination does not say why: {why}"
    );
}

/// A 4 GiB guest (two RAM blocks, across the 32-bit hole) in postcopy. The
/// guest kernel uses only part of the RAM ([`small_kernel_ram`]), with its
/// workload's pages above 4 GiB; the VMMs handle all 4 GiB.
#[test]
fn four_gib_guest_postcopy() {
    if !kvm_available("four_gib_guest_postcopy") {
        return;
    }
    let big = |n: &str| {
        VmmBuilder::new(n)
            .smp(2)
            .mem("4G")
            .append_more(&small_kernel_ram(3 << 30, 1 << 30))
    };
    let mut src = running_source(big("src"), &big("big"));
    let (dst, _dq, port) = postcopy_destination(big("dst"), false);
    let mut sq = src.qmp();
    set_caps(&mut sq, &[("postcopy-ram", true)]);
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    sq.execute("migrate-start-postcopy", json!({})).unwrap();
    let r = wait_migration(&mut sq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["ram"]["total"], 4u64 << 30, "{r}");
    assert_continues(&src, &dst);
}

/// The postcopy fault thread runs under its own seccomp allowlist: a
/// system call it never makes (a test hook makes one right after its
/// filter is installed, when the destination starts listening for
/// faults) kills the destination with SIGSYS instead of succeeding. The
/// source then reports the destination's loss: failed with its guest
/// running again if the switch had not completed, or paused after it
/// (postcopy's window: the guest was on the destination).
#[test]
fn forbidden_call_on_the_fault_thread_kills_the_destination() {
    use std::os::unix::process::ExitStatusExt;
    if !kvm_available("forbidden_call_on_the_fault_thread_kills_the_destination") {
        return;
    }
    let src = running_source(guest("src"), &guest("base"));
    let (mut dst, _dq, port) = postcopy_destination(
        guest("dst").env("MINIVMM_TEST_FAULT_FORBIDDEN_SYSCALL", "1"),
        false,
    );
    let mut src = src;
    let mut sq = src.qmp();
    set_caps(&mut sq, &[("postcopy-ram", true)]);
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    sq.execute("migrate-start-postcopy", json!({})).unwrap();
    let st = dst.wait_exit(mig_timeout());
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}");
    let r = wait_migration(&mut sq, &["failed", "postcopy-paused"], mig_timeout());
    if r["status"] == "failed" {
        assert_eq!(run_state(&mut sq), "running", "{r}");
    }
}

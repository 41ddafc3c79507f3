//! Postcopy migration between two real minivmm processes: userfaultfd on
//! the destination, page requests over the return path (or, with
//! `postcopy-preempt`, over a second connection that also carries the
//! requested pages).

use std::time::Duration;

use serde_json::{json, Value};
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

fn set_caps(c: &mut Client, caps: &[(&str, bool)]) {
    let caps: Vec<Value> = caps
        .iter()
        .map(|(n, s)| json!({"capability": n, "state": s}))
        .collect();
    c.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
        .expect("migrate-set-capabilities");
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

/// The guest went on at the destination: PASS numbers continue past the
/// source's last one and nobody saw corruption.
fn assert_continues(src: &Vmm, dst: &Vmm) {
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last + 2, boot_timeout());
    let d = dst.passes();
    assert!(
        d.first().is_some_and(|&f| f <= last + 1),
        "PASS numbers jump from {last} (source) to {d:?} (destination)"
    );
    assert!(!dst.serial.text().contains("GUEST-READY"));
    src.assert_no_corrupt();
    dst.assert_no_corrupt();
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
/// requests served, 2 vCPUs, integrity intact.
#[test]
fn non_converging_guest_completes_in_postcopy() {
    if !kvm_available("non_converging_guest_completes_in_postcopy") {
        return;
    }
    let mut src = running_source(guest("src"), &guest("base"));
    let (dst, mut dq, port) = postcopy_destination(guest("dst"), false);
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

/// The link breaks during postcopy: both sides fail with a reason; the
/// source does not resume (the destination already ran the guest); the
/// destination stops its guest rather than leave vCPUs waiting forever,
/// and refuses `cont`.
#[test]
fn connection_lost_during_postcopy() {
    if !kvm_available("connection_lost_during_postcopy") {
        return;
    }
    connection_lost(false);
}

/// As above with the preempt channel: the relay cuts both connections.
#[test]
fn connection_lost_during_postcopy_with_preempt() {
    if !kvm_available("connection_lost_during_postcopy_with_preempt") {
        return;
    }
    connection_lost(true);
}

fn connection_lost(preempt: bool) {
    let mut src = running_source(guest("src"), &guest("base"));
    let (mut dst, mut dq, port) = postcopy_destination(guest("dst"), false);
    set_caps(&mut dq, &[("postcopy-preempt", preempt)]);
    let relay = Relay::start(port, Tamper::None);
    let mut sq = src.qmp();
    set_caps(
        &mut sq,
        &[("postcopy-ram", true), ("postcopy-preempt", preempt)],
    );
    // Slow background transfer after the switch keeps postcopy going.
    sq.execute(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 1_000_000}),
    )
    .unwrap();
    sq.execute(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{}", relay.port)}),
    )
    .unwrap();
    sq.execute("migrate-start-postcopy", json!({})).unwrap();
    wait_migration(&mut sq, &["postcopy-active"], mig_timeout());
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last, boot_timeout());
    relay.cut();
    let r = wait_migration(&mut sq, &["failed", "completed"], mig_timeout());
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        r["error-desc"].as_str().is_some_and(|d| !d.is_empty()),
        "{r}"
    );
    let st = run_state(&mut sq);
    assert_ne!(
        st, "running",
        "the source resumed a guest the destination ran"
    );
    destination_stopped_incomplete(&mut dst, &mut dq);
    // Neither side saw corruption before the cut.
    src.assert_no_corrupt();
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
/// ran the guest); the destination fails with a reason and stops its guest.
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
    sq.execute(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 1_000_000}),
    )
    .unwrap();
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    sq.execute("migrate-start-postcopy", json!({})).unwrap();
    wait_migration(&mut sq, &["postcopy-active"], mig_timeout());
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
    destination_stopped_incomplete(&mut dst, &mut dq);
    src.assert_no_corrupt();
    dst.assert_no_corrupt();
}

/// A destination whose postcopy broke off after RUN: `failed` with a
/// reason, its guest paused, `cont` refused (its memory is incomplete),
/// the process still up for inspection.
fn destination_stopped_incomplete(dst: &mut Vmm, dq: &mut Client) {
    let dr = wait_migration(dq, &["failed", "completed"], mig_timeout());
    assert_eq!(dr["status"], "failed", "{dr}");
    assert!(
        dr["error-desc"].as_str().is_some_and(|d| !d.is_empty()),
        "{dr}"
    );
    assert_eq!(run_state(dq), "paused");
    let e = dq.execute("cont", json!({})).unwrap_err().to_string();
    assert!(e.contains("incomplete"), "{e}");
    assert!(
        dst.exited().is_none(),
        "the destination should stay up, paused"
    );
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

//! Precopy live migration between two real minivmm processes.

use std::time::Duration;

use serde_json::json;
use tests::*;

fn mig_timeout() -> Duration {
    scaled(Duration::from_secs(120))
}

fn base() -> VmmBuilder {
    VmmBuilder::new("src").smp(2)
}

/// Live migration of a dirtying guest over TCP: the destination continues
/// the PASS sequence, never reports CORRUPT, and the source ends postmigrate.
#[test]
fn live_tcp_dirtying_guest() {
    if !kvm_available("live_tcp_dirtying_guest") {
        return;
    }
    let snap = snapshot(&base());
    let mut src = base().incoming(&format!("file:{}", snap.display())).spawn();
    let p0 = src.wait_pass_beyond(2, boot_timeout());
    let port = free_port();
    let mut dst = base().incoming(&format!("tcp:127.0.0.1:{port}")).spawn();
    let mut dq = dst.qmp();
    assert_eq!(run_state(&mut dq), "inmigrate");
    let mut sq = src.qmp();
    sq.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    )
    .unwrap();
    sq.execute("migrate-set-parameters", json!({"downtime-limit": 50}))
        .unwrap();
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    let r = wait_migration(&mut sq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    assert!(r["ram"]["transferred"].as_u64().unwrap() > 16 << 20, "{r}");
    assert!(r["downtime"].is_u64(), "{r}");
    sq.wait_event(
        "MIGRATION",
        |e| e["data"]["status"] == "completed",
        mig_timeout(),
    )
    .unwrap();
    assert_eq!(run_state(&mut sq), "postmigrate");
    let before = src.passes().last().copied().unwrap_or(p0);
    let after = dst.wait_pass_beyond(before + 2, boot_timeout());
    assert!(after > before);
    assert_eq!(run_state(&mut dq), "running");
    // The destination never booted: its console continues the source's.
    assert!(!dst.serial.text().contains("GUEST-READY"));
    src.assert_no_corrupt();
    dst.assert_no_corrupt();
}

/// Source guest restored from the shared snapshot and running again.
fn running_source(name: &str) -> Vmm {
    let snap = snapshot(&base());
    let src = VmmBuilder::new(name)
        .smp(2)
        .incoming(&format!("file:{}", snap.display()))
        .spawn();
    src.wait_pass_beyond(2, boot_timeout());
    src
}

/// A destination for `base()` guests waiting on `uri` (its QMP answers, so
/// it is listening).
fn destination(name: &str, uri: &str) -> Vmm {
    let mut d = base_named(name).incoming(uri).spawn();
    let _ = d.qmp();
    d
}

fn base_named(name: &str) -> VmmBuilder {
    VmmBuilder::new(name).smp(2)
}

/// Migrate and wait for a final state; returns query-migrate.
fn migrate(c: &mut Client, uri: &str) -> serde_json::Value {
    c.execute("migrate", json!({ "uri": uri }))
        .expect("migrate");
    wait_migration(c, &["completed", "failed", "cancelled"], mig_timeout())
}

/// The source failed (or was cancelled) and its guest goes on unharmed.
fn assert_source_survived(src: &mut Vmm, sq: &mut Client) {
    assert_eq!(run_state(sq), "running");
    let last = src.passes().last().copied().unwrap_or(0);
    src.wait_pass_beyond(last + 1, boot_timeout());
    src.assert_no_corrupt();
}

/// Over unix, into a destination started with `-S`: both sides end paused;
/// their whole RAM must be identical except the kvmclock areas that KVM
/// rewrites when the destination restores the clock MSRs (the wall-clock
/// structure and the vCPUs' pvclock structures: KVM writes them itself on
/// KVM_SET_MSRS / the first entry, with the destination host's TSC values).
/// Then `cont` and the guest goes on.
#[test]
fn unix_to_paused_destination_memory_identical() {
    if !kvm_available("unix_to_paused_destination_memory_identical") {
        return;
    }
    let src = running_source("src");
    let sock = src.dir.path("mig.sock");
    let uri = format!("unix:{}", sock.display());
    memory_identical(src, base_named("dst").arg("-S"), &uri);
}

/// The same with a source that tracks dirty pages with KVM's dirty ring
/// (`-accel kvm,dirty-ring-size=1024`: 4 MiB of pages per vCPU, less than
/// the guest rewrites in a second, so rings also fill up and their vCPUs
/// harvest them) instead of the bitmap: every page the guest dirtied must
/// still arrive.
#[test]
fn dirty_ring_source_memory_identical() {
    if !kvm_available("dirty_ring_source_memory_identical") {
        return;
    }
    let snap = snapshot(&base());
    let src = VmmBuilder::new("src")
        .smp(2)
        .arg("-accel")
        .arg("kvm,dirty-ring-size=1024")
        .incoming(&format!("file:{}", snap.display()))
        .spawn();
    src.wait_pass_beyond(2, boot_timeout());
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    memory_identical(src, base_named("dst").arg("-S"), &uri);
}

/// The same with a destination that backs its RAM at start
/// (`-mem-prealloc`), over tcp: the pages the stream skips (ZERO records
/// for pages never written there) must read as zero in RAM that is already
/// populated.
#[test]
fn prealloc_destination_memory_identical() {
    if !kvm_available("prealloc_destination_memory_identical") {
        return;
    }
    let src = running_source("src");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    memory_identical(src, base_named("dst").arg("-S").arg("-mem-prealloc"), &uri);
}

/// Migrate `src` to a paused destination built by `dst` on `uri`, compare
/// both sides' RAM page by page (only the kvmclock pages may differ, see
/// above), then `cont` and check the guest goes on.
///
/// Huge pages: the source's RAM may use them; a destination whose RAM is
/// not preallocated receives without them (each first write would clear
/// 2 MiB) and turns them on once the migration completes.
fn memory_identical(mut src: Vmm, dst: VmmBuilder, uri: &str) {
    let prealloc = dst.has_arg("-mem-prealloc");
    let mut dst = dst.incoming(uri).spawn();
    let mut dq = dst.qmp();
    let mut sq = src.qmp();
    let thp = ram_huge_pages(src.pid(), 128 << 20);
    if thp.is_none() {
        eprintln!("memory_identical: the host has no transparent huge pages, not checking them");
    }
    assert_eq!(thp.map(|_| true), thp, "source");
    assert_eq!(
        thp.map(|_| prealloc),
        ram_huge_pages(dst.pid(), 128 << 20),
        "destination while incoming"
    );
    let r = migrate(&mut sq, uri);
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(run_state(&mut sq), "postmigrate");
    let dr = wait_migration(&mut dq, &["completed"], mig_timeout());
    assert_eq!(
        thp.map(|_| true),
        ram_huge_pages(dst.pid(), 128 << 20),
        "destination after"
    );
    assert!(dr["ram"]["transferred"].as_u64().unwrap_or(0) > 0, "{dr}");
    assert_eq!(run_state(&mut dq), "paused");

    assert_same_memory(&mut src, &mut sq, &mut dst, &mut dq, 128 << 20);
    cont_and_goes_on(&src, &dst, &mut dq);
}

/// `exec:` both ways through a file: the source writes with `cat >`, a new
/// process restores with `cat`.
#[test]
fn exec_and_file_save_restore() {
    if !kvm_available("exec_and_file_save_restore") {
        return;
    }
    let mut src = running_source("src");
    let mut sq = src.qmp();
    let file = src.dir.path("via-exec.qevm");
    let r = migrate(&mut sq, &format!("exec:cat > {}", file.display()));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(run_state(&mut sq), "postmigrate");
    let last = src.passes().last().copied().unwrap_or(0);
    let dst = destination("dst", &format!("exec:cat {}", file.display()));
    dst.wait_pass_beyond(last, boot_timeout());
    dst.assert_no_corrupt();
    assert!(!dst.serial.text().contains("GUEST-READY"));

    // file: from the restored guest, then a third process from that file.
    let mut dst = dst;
    let mut dq = dst.qmp();
    let file2 = dst.dir.path("saved.qevm");
    let r = migrate(&mut dq, &format!("file:{}", file2.display()));
    assert_eq!(r["status"], "completed", "{r}");
    let last = dst.passes().last().copied().unwrap_or(0);
    let third = destination("third", &format!("file:{}", file2.display()));
    third.wait_pass_beyond(last, boot_timeout());
    third.assert_no_corrupt();
}

/// A to B to C over TCP with `-incoming defer` + `migrate-incoming`.
#[test]
fn chain_a_b_c_with_deferred_incoming() {
    if !kvm_available("chain_a_b_c_with_deferred_incoming") {
        return;
    }
    let mut a = running_source("a");
    let mut b = destination("b", "defer");
    let mut c = destination("c", "defer");
    let mut aq = a.qmp();
    let mut bq = b.qmp();
    let mut cq = c.qmp();
    assert_eq!(run_state(&mut bq), "inmigrate");
    let pb = free_port();
    bq.execute(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{pb}")}),
    )
    .unwrap();
    let r = migrate(&mut aq, &format!("tcp:127.0.0.1:{pb}"));
    assert_eq!(r["status"], "completed", "{r}");
    let last = a.passes().last().copied().unwrap_or(0);
    b.wait_pass_beyond(last + 1, boot_timeout());
    let pc = free_port();
    cq.execute(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{pc}")}),
    )
    .unwrap();
    let r = migrate(&mut bq, &format!("tcp:127.0.0.1:{pc}"));
    assert_eq!(r["status"], "completed", "{r}");
    let last = b.passes().last().copied().unwrap_or(0);
    c.wait_pass_beyond(last + 1, boot_timeout());
    assert_eq!(run_state(&mut cq), "running");
    for v in [&a, &b, &c] {
        v.assert_no_corrupt();
    }
    // Each hop continues the numbering: no pass is repeated on the next host.
    let (pa, pb_, pc_) = (a.passes(), b.passes(), c.passes());
    assert!(
        pb_[0] > *pa.first().unwrap() && pc_[0] > pb_[0],
        "{pa:?} {pb_:?} {pc_:?}"
    );
}

/// Nothing listens at the destination: `failed` at once, guest unharmed.
#[test]
fn no_listener_fails_fast_and_source_keeps_running() {
    if !kvm_available("no_listener_fails_fast_and_source_keeps_running") {
        return;
    }
    let mut src = running_source("src");
    let mut sq = src.qmp();
    let r = migrate(&mut sq, &format!("tcp:127.0.0.1:{}", free_port()));
    assert_eq!(r["status"], "failed", "{r}");
    let desc = r["error-desc"].as_str().unwrap_or_default();
    assert!(desc.contains("refused"), "{r}");
    assert_source_survived(&mut src, &mut sq);
}

/// The destination dies during the rounds: the source fails with a reason
/// and keeps its guest; a second migration to a fresh destination works.
#[test]
fn destination_killed_mid_migration_then_retry() {
    if !kvm_available("destination_killed_mid_migration_then_retry") {
        return;
    }
    let mut src = running_source("src");
    let mut sq = src.qmp();
    let port = free_port();
    let mut dst = destination("dst", &format!("tcp:127.0.0.1:{port}"));
    let _ = dst.qmp();
    // 1 MB/s: the 16 MiB/s guest never converges, so we catch it in the rounds.
    sq.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1_000_000}),
    )
    .unwrap();
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    wait_migration(&mut sq, &["active"], mig_timeout());
    std::thread::sleep(Duration::from_millis(1500));
    dst.kill();
    let r = wait_migration(&mut sq, &["failed"], mig_timeout());
    assert!(
        r["error-desc"].as_str().is_some_and(|d| !d.is_empty()),
        "{r}"
    );
    assert_source_survived(&mut src, &mut sq);

    sq.execute("migrate-set-parameters", json!({"max-bandwidth": 0}))
        .unwrap();
    retry_completes(&src, &mut sq);
}

/// After a failed migration, a second one to a fresh destination completes
/// and the guest goes on there, intact.
fn retry_completes(src: &Vmm, sq: &mut Client) {
    let port = free_port();
    let dst2 = destination("dst2", &format!("tcp:127.0.0.1:{port}"));
    let r = migrate(sq, &format!("tcp:127.0.0.1:{port}"));
    assert_eq!(r["status"], "completed", "{r}");
    let last = src.passes().last().copied().unwrap_or(0);
    dst2.wait_pass_beyond(last + 1, boot_timeout());
    dst2.assert_no_corrupt();
}

/// The destination is lost exactly while the source waits for PONG 6 (the
/// rest fits; the source stops its guest only after that answer): the
/// source fails, saying so, and its guest never stopped; the destination
/// exits with an error; a second migration to a fresh destination then
/// completes.
#[test]
fn destination_lost_at_the_drained_ping_then_retry() {
    if !kvm_available("destination_lost_at_the_drained_ping_then_retry") {
        return;
    }
    let mut src = running_source("src");
    let mut sq = src.qmp();
    let port = free_port();
    let mut dst = destination("dst", &format!("tcp:127.0.0.1:{port}"));
    let relay = Relay::start(port, Tamper::CutAtPing { value: 6 });
    let r = migrate(&mut sq, &format!("tcp:127.0.0.1:{}", relay.port));
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        r["error-desc"]
            .as_str()
            .is_some_and(|d| d.contains("connection to the destination was lost")),
        "{r}"
    );
    assert_source_survived(&mut src, &mut sq);
    assert!(!dst.wait_exit(mig_timeout()).success());
    retry_completes(&src, &mut sq);
}

/// `migrate_cancel` right after `migrate` (setup), during the rounds of a
/// migration that cannot converge, and after completion (harmless).
#[test]
fn cancel_in_setup_rounds_and_after_completion() {
    if !kvm_available("cancel_in_setup_rounds_and_after_completion") {
        return;
    }
    let mut src = running_source("src");
    let mut sq = src.qmp();
    sq.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    )
    .unwrap();
    sq.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1_000_000, "downtime-limit": 1}),
    )
    .unwrap();

    // In setup: cancel before the first round has started.
    let port = free_port();
    let mut d1 = destination("d1", &format!("tcp:127.0.0.1:{port}"));
    let _ = d1.qmp();
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    sq.execute("migrate_cancel", json!({})).unwrap();
    let r = wait_migration(
        &mut sq,
        &["cancelled", "failed", "completed"],
        mig_timeout(),
    );
    assert_eq!(r["status"], "cancelled", "{r}");
    // A cancel is not an error (QEMU shows no error-desc either).
    assert!(r.get("error-desc").is_none(), "{r}");
    let st = d1.wait_exit(mig_timeout());
    assert!(
        !st.success(),
        "the destination must leave inmigrate with an error"
    );
    assert_source_survived(&mut src, &mut sq);

    // During the rounds: it never converges at 1 MB/s; expected-downtime says so.
    let port = free_port();
    let mut d2 = destination("d2", &format!("tcp:127.0.0.1:{port}"));
    let _ = d2.qmp();
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    sq.wait_event(
        "MIGRATION_PASS",
        |e| e["data"]["pass"].as_u64() >= Some(2),
        mig_timeout(),
    )
    .unwrap();
    let r = sq.execute("query-migrate", json!({})).unwrap();
    assert_eq!(r["status"], "active", "{r}");
    assert!(r["expected-downtime"].as_u64().unwrap_or(0) > 1, "{r}");
    sq.execute("migrate-cancel", json!({})).unwrap();
    let r = wait_migration(
        &mut sq,
        &["cancelled", "failed", "completed"],
        mig_timeout(),
    );
    assert_eq!(r["status"], "cancelled", "{r}");
    sq.wait_event(
        "MIGRATION",
        |e| e["data"]["status"] == "cancelled",
        mig_timeout(),
    )
    .unwrap();
    let st = d2.wait_exit(mig_timeout());
    assert!(!st.success());
    assert!(
        d2.stderr.text().contains("incoming migration failed"),
        "{}",
        d2.stderr.text()
    );
    assert_source_survived(&mut src, &mut sq);

    // After completion: harmless.
    sq.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 0, "downtime-limit": 300}),
    )
    .unwrap();
    let port = free_port();
    let d3 = destination("d3", &format!("tcp:127.0.0.1:{port}"));
    let r = migrate(&mut sq, &format!("tcp:127.0.0.1:{port}"));
    assert_eq!(r["status"], "completed", "{r}");
    sq.execute("migrate_cancel", json!({})).unwrap();
    let r = sq.execute("query-migrate", json!({})).unwrap();
    assert_eq!(r["status"], "completed", "{r}");
    let last = src.passes().last().copied().unwrap_or(0);
    d3.wait_pass_beyond(last + 1, boot_timeout());
    d3.assert_no_corrupt();
}

/// A relay damages the stream; the destination names what is wrong and
/// never runs the guest; the source fails and keeps its guest.
fn damaged_stream(tamper: Tamper, dst_mem: &str, expect: &[&str]) {
    let mut src = running_source("src");
    let mut sq = src.qmp();
    let port = free_port();
    let mut dst = base_named("dst")
        .mem(dst_mem)
        .incoming(&format!("tcp:127.0.0.1:{port}"))
        .spawn();
    let _ = dst.qmp();
    let relay = Relay::start(port, tamper);
    let r = migrate(&mut sq, &format!("tcp:127.0.0.1:{}", relay.port));
    assert_eq!(r["status"], "failed", "{r}");
    let st = dst.wait_exit(mig_timeout());
    assert!(!st.success());
    let err = dst.stderr.text();
    assert!(
        expect.iter().any(|e| err.contains(e)),
        "destination error should mention one of {expect:?}:\n{err}"
    );
    assert!(
        dst.passes().is_empty(),
        "the destination ran a half-loaded guest"
    );
    // Once the return path is open (after the configuration), the source
    // reports the destination's own reason.
    if expect.contains(&"checksum mismatch") {
        let desc = r["error-desc"].as_str().unwrap_or_default();
        assert!(
            desc.starts_with("destination failed")
                && (desc.contains("checksum mismatch") || desc.contains("invalid stream")),
            "source error-desc should carry the destination's reason: {r}"
        );
    }
    assert_source_survived(&mut src, &mut sq);
    eprintln!(
        "{tamper:?}: source: {} / destination: {}",
        r["error-desc"],
        err.trim()
    );
}

#[test]
fn flipped_byte_in_ram_is_refused() {
    if !kvm_available("flipped_byte_in_ram_is_refused") {
        return;
    }
    damaged_stream(Tamper::Flip { at: 3 << 20 }, "128M", &["checksum mismatch"]);
}

#[test]
fn truncated_stream_is_refused() {
    if !kvm_available("truncated_stream_is_refused") {
        return;
    }
    damaged_stream(Tamper::Truncate { at: 2 << 20 }, "128M", &["truncated"]);
}

#[test]
fn injected_garbage_is_refused() {
    if !kvm_available("injected_garbage_is_refused") {
        return;
    }
    damaged_stream(
        Tamper::Garbage { at: 1 << 20 },
        "128M",
        &["checksum mismatch", "invalid stream"],
    );
}

#[test]
fn wrong_magic_is_refused() {
    if !kvm_available("wrong_magic_is_refused") {
        return;
    }
    damaged_stream(Tamper::Flip { at: 1 }, "128M", &["bad magic"]);
}

#[test]
fn memory_size_mismatch_is_refused() {
    if !kvm_available("memory_size_mismatch_is_refused") {
        return;
    }
    damaged_stream(Tamper::None, "256M", &["memory", "RAM"]);
}

/// `return-path` is on by default; turned off, precopy sends no
/// OPEN_RETURN_PATH: the source completes once the stream is out, without
/// the destination's verdict (as QEMU), and the guest goes on there.
#[test]
fn return_path_off_completes_without_a_verdict() {
    if !kvm_available("return_path_off_completes_without_a_verdict") {
        return;
    }
    let mut src = running_source("src");
    let mut sq = src.qmp();
    let caps = sq.execute("query-migrate-capabilities", json!({})).unwrap();
    assert!(
        caps.as_array()
            .is_some_and(|a| a.contains(&json!({"capability": "return-path", "state": true}))),
        "{caps}"
    );
    set_caps(&mut sq, &[("return-path", false)]);
    let port = free_port();
    let mut dst = destination("dst", &format!("tcp:127.0.0.1:{port}"));
    let mut dq = dst.qmp();
    let r = migrate(&mut sq, &format!("tcp:127.0.0.1:{port}"));
    assert_eq!(r["status"], "completed", "{r}");
    let dr = wait_migration(&mut dq, &["completed", "failed"], mig_timeout());
    assert_eq!(dr["status"], "completed", "{dr}");
    assert!(
        !dst.stderr.text().contains("return path"),
        "{}",
        dst.stderr.text()
    );
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last, boot_timeout());
    dst.assert_no_corrupt();
}

/// `migrate-incoming` with `exit-on-error: false`: a damaged stream fails
/// the incoming migration, but the destination stays up in `inmigrate`
/// (nothing of the guest ran), query-migrate says why, and a second
/// `migrate-incoming` takes a good migration from the same source, whose
/// guest then runs there intact.
#[test]
fn exit_on_error_false_keeps_the_destination_for_another_try() {
    if !kvm_available("exit_on_error_false_keeps_the_destination_for_another_try") {
        return;
    }
    let mut src = running_source("src");
    let mut sq = src.qmp();
    let mut dst = base_named("dst").incoming("defer").spawn();
    let mut dq = dst.qmp();
    let port = free_port();
    dq.execute(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{port}"), "exit-on-error": false}),
    )
    .unwrap();
    let relay = Relay::start(port, Tamper::Flip { at: 3 << 20 });
    let r = migrate(&mut sq, &format!("tcp:127.0.0.1:{}", relay.port));
    assert_eq!(r["status"], "failed", "{r}");
    let dr = wait_migration(&mut dq, &["failed", "completed"], mig_timeout());
    assert_eq!(dr["status"], "failed", "{dr}");
    assert!(
        dr["error-desc"]
            .as_str()
            .is_some_and(|d| d.contains("checksum mismatch")),
        "{dr}"
    );
    assert!(dst.exited().is_none(), "the destination exited");
    assert_eq!(run_state(&mut dq), "inmigrate");
    assert!(
        dst.passes().is_empty(),
        "the destination ran a damaged guest"
    );
    assert_source_survived(&mut src, &mut sq);
    drop(relay);

    let port = free_port();
    dq.execute(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{port}"), "exit-on-error": false}),
    )
    .unwrap();
    let r = migrate(&mut sq, &format!("tcp:127.0.0.1:{port}"));
    assert_eq!(r["status"], "completed", "{r}");
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last, boot_timeout());
    dst.assert_no_corrupt();
}

/// A source (paused first if `paused`) migrating with
/// `pause-before-switchover`, stopped in `pre-switchover` (run state
/// `finish-migrate`); its QMP client and the destination.
fn stopped_in_pre_switchover(paused: bool) -> (Vmm, Client, Vmm) {
    let mut src = running_source("src");
    let mut sq = src.qmp();
    if paused {
        sq.execute("stop", json!({})).unwrap();
    }
    sq.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    )
    .unwrap();
    let port = free_port();
    let dst = destination("dst", &format!("tcp:127.0.0.1:{port}"));
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    wait_migration(&mut sq, &["pre-switchover"], mig_timeout());
    assert_eq!(run_state(&mut sq), "finish-migrate");
    (src, sq, dst)
}

/// `pause-before-switchover`: the source stops in `pre-switchover` until
/// `migrate-continue`.
#[test]
fn pause_before_switchover_then_continue() {
    if !kvm_available("pause_before_switchover_then_continue") {
        return;
    }
    let (src, mut sq, dst) = stopped_in_pre_switchover(false);
    std::thread::sleep(Duration::from_millis(300));
    let r = sq.execute("query-migrate", json!({})).unwrap();
    assert_eq!(r["status"], "pre-switchover", "{r}");
    sq.execute("migrate-continue", json!({"state": "pre-switchover"}))
        .unwrap();
    let r = wait_migration(&mut sq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last + 1, boot_timeout());
    dst.assert_no_corrupt();
}

/// A source paused before `migrate` and cancelled after its stop (in
/// `pre-switchover`) goes back to `paused`, not stuck in `finish-migrate`
/// where `cont` is refused; `cont` then runs it.
#[test]
fn paused_source_cancelled_at_switchover_stays_paused() {
    if !kvm_available("paused_source_cancelled_at_switchover_stays_paused") {
        return;
    }
    let (mut src, mut sq, dst) = stopped_in_pre_switchover(true);
    sq.execute("migrate_cancel", json!({})).unwrap();
    let r = wait_migration(
        &mut sq,
        &["cancelled", "failed", "completed"],
        mig_timeout(),
    );
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(run_state(&mut sq), "paused");
    sq.execute("cont", json!({})).unwrap();
    assert_source_survived(&mut src, &mut sq);
    assert!(dst.passes().is_empty(), "the destination ran the guest");
}

/// A 4 GiB guest: RAM continues above 4 GiB after the 32-bit hole, so the
/// stream carries two RAM blocks, all 4 GiB of them tracked, sent and
/// received. The guest kernel uses only part of it ([`small_kernel_ram`]:
/// its boot then costs what the standard guest's does), with 128 MiB at
/// 4 GiB where the workload's pages are. Boots once into its own snapshot.
#[test]
fn four_gib_guest_across_the_hole() {
    if !kvm_available("four_gib_guest_across_the_hole") {
        return;
    }
    let big = || {
        VmmBuilder::new("big")
            .smp(2)
            .mem("4G")
            .append_more(&small_kernel_ram(3 << 30, 1 << 30))
    };
    let snap = snapshot(&big());
    let mut src = VmmBuilder::new("src")
        .smp(2)
        .mem("4G")
        .incoming(&format!("file:{}", snap.display()))
        .spawn();
    src.wait_pass_beyond(2, boot_timeout());
    let port = free_port();
    let mut dst = VmmBuilder::new("dst")
        .smp(2)
        .mem("4G")
        .incoming(&format!("tcp:127.0.0.1:{port}"))
        .spawn();
    let _ = dst.qmp();
    let mut sq = src.qmp();
    let r = migrate(&mut sq, &format!("tcp:127.0.0.1:{port}"));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["ram"]["total"], 4u64 << 30, "{r}");
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last + 1, boot_timeout());
    src.assert_no_corrupt();
    dst.assert_no_corrupt();
}

/// VmHWM of a process, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A valid stream (a real save, RAM and all) followed by 16 device
/// sections with distinct names of 64 MiB each: the destination refuses
/// the first one when its header arrives (no such device here), holds
/// none of them, and its peak RSS stays within a few MiB of the same
/// incoming migration without them. It keeps waiting (exit-on-error off).
#[test]
fn hostile_device_sections_are_refused_at_their_header() {
    if !kvm_available("hostile_device_sections_are_refused_at_their_header") {
        return;
    }
    let snap = snapshot(&base());
    let stream = std::fs::read(&snap).expect("snapshot");
    // The first FULL section: 0x04, be32 id, then the name "cpu".
    let key = b"\x03cpu";
    let first_device = (5..stream.len() - key.len())
        .find(|&i| stream[i - 5] == 0x04 && &stream[i..i + key.len()] == key)
        .map(|i| i - 5)
        .expect("a cpu section in the snapshot");
    let prefix = stream[..first_device].to_vec();

    // The same RAM without the hostile part, as the baseline.
    let mut ok = base_named("dst0").incoming("defer").spawn();
    let mut oq = ok.qmp();
    oq.execute(
        "migrate-incoming",
        json!({"uri": format!("file:{}", snap.display()), "exit-on-error": false}),
    )
    .unwrap();
    let r = wait_migration(&mut oq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    let normal = peak_rss_kib(ok.pid());
    drop(oq);
    ok.kill();

    let mut dst = base_named("dst").incoming("defer").spawn();
    let mut dq = dst.qmp();
    let fifo = dst.dir.path("hostile.fifo");
    let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let path = fifo.clone();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let sent = write_hostile(&path, &prefix);
        let _ = done_tx.send(sent);
    });
    fn write_hostile(path: &std::path::Path, prefix: &[u8]) -> u64 {
        use std::io::Write;
        let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(path) else {
            return 0u64;
        };
        let mut sent = 0u64;
        if f.write_all(prefix).is_err() {
            return sent;
        }
        let zeros = vec![0u8; 1 << 20];
        for k in 0..16u32 {
            let name = format!("dev{k}");
            let mut h = vec![0x04];
            h.extend_from_slice(&(100 + k).to_be_bytes());
            h.push(name.len() as u8);
            h.extend_from_slice(name.as_bytes());
            h.extend_from_slice(&0u32.to_be_bytes());
            h.extend_from_slice(&2u32.to_be_bytes());
            h.extend_from_slice(&(64u32 << 20).to_be_bytes());
            if f.write_all(&h).is_err() {
                return sent;
            }
            for _ in 0..64 {
                if f.write_all(&zeros).is_err() {
                    return sent;
                }
                sent += zeros.len() as u64;
            }
        }
        sent
    }
    dq.execute(
        "migrate-incoming",
        json!({"uri": format!("file:{}", fifo.display()), "exit-on-error": false}),
    )
    .unwrap();
    let r = wait_migration(&mut dq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "failed", "{r}");
    let desc = r["error-desc"].as_str().unwrap_or_default();
    assert!(desc.contains("unknown device 'dev0'"), "{r}");
    let hostile = peak_rss_kib(dst.pid());
    eprintln!("peak RSS: normal incoming {normal} KiB, hostile {hostile} KiB");
    assert!(
        hostile <= normal + 8 * 1024,
        "hostile stream: peak RSS {hostile} KiB against {normal} KiB for the same RAM alone"
    );
    assert!(dst.exited().is_none(), "the destination exited");
    assert_eq!(run_state(&mut dq), "inmigrate");
    // The writer stops when the destination closes its end.
    let sent = done
        .recv_timeout(mig_timeout())
        .expect("the destination kept the hostile stream open");
    assert!(
        sent < 1 << 30,
        "the destination read {sent} bytes of hostile state"
    );
}

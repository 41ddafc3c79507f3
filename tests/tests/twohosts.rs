//! Migration between two hosts on one machine: the source and the
//! destination each in a network namespace of its own, joined by a veth
//! pair shaped with `tbf` (`tests::netns`), and what happens when the link
//! dies or a peer freezes or dies.
//!
//! Every engine runs across the link with the integrity checks of the
//! loopback tests (precopy into a paused destination compares RAM page by
//! page; postcopy and COLO check the guest's PASS sequence and CORRUPT
//! lines). The failure tests set `x-peer-timeout` to 3 s on both sides,
//! inject one fault (link down, a peer SIGSTOPped, a peer SIGKILLed) in one
//! phase (precopy rounds, the final stop, postcopy, COLO between and
//! during checkpoints), and assert that each surviving side notices within
//! the bound (the timeout plus room for this machine, see `bound`) and
//! keeps its guest as the engine promises: precopy fails and the source's
//! guest runs on (the destination exits without running it); postcopy
//! pauses on both sides and, once the fault is healed, is recovered across
//! the link and completes; COLO stops checkpointing on both sides and the
//! survivor takes over.
//!
//! Needs root and iproute2; without them each test prints SKIP (see
//! `tests::netns`).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::netns::TwoHosts;
use tests::*;

/// The destination's port (each namespace has its own ports).
const PORT: u16 = 4444;
/// `x-peer-timeout` of the failure tests, ms.
const PEER_TIMEOUT_MS: u64 = 3000;

fn mig_timeout() -> Duration {
    scaled(Duration::from_secs(180))
}

/// How long a side may take to notice a dead, frozen or cut-off peer: the
/// peer timeout, plus room (calibrated) for this machine to act on it.
fn bound() -> Duration {
    Duration::from_millis(PEER_TIMEOUT_MS) + scaled(Duration::from_secs(5))
}

fn guest(name: &str) -> VmmBuilder {
    VmmBuilder::new(name).smp(2)
}

/// Two VMMs on two hosts. Fields drop in order: the VMMs before their
/// namespaces.
struct Setup {
    src: Vmm,
    sq: Client,
    dst: Vmm,
    dq: Client,
    hosts: TwoHosts,
}

/// The source restored from the boot snapshot in its namespace, running;
/// the destination (`dst_args` added) listening in the other. Both get the
/// capabilities `caps` (and `events`) and `x-peer-timeout` (the
/// destination before its source connects); the source also `params`.
/// `None`: the test skips (no KVM, or no namespaces; said on stdout).
fn two_hosts(
    test: &str,
    rate: &str,
    dst_args: &[&str],
    caps: &[(&str, bool)],
    params: Value,
) -> Option<Setup> {
    if !kvm_available(test) {
        return None;
    }
    let hosts = TwoHosts::new(test, rate)?;
    let snap = snapshot(&guest("base"));
    let mut src = guest("src")
        .netns(&hosts.src)
        .incoming(&format!("file:{}", snap.display()))
        .spawn();
    src.wait_pass_beyond(2, boot_timeout());
    let mut b = guest("dst").netns(&hosts.dst);
    for a in dst_args {
        b = b.arg(a);
    }
    let mut dst = b.incoming(&hosts.dst_uri(PORT)).spawn();
    let mut dq = dst.qmp();
    let mut sq = src.qmp();
    let mut caps = caps.to_vec();
    caps.push(("events", true));
    for c in [&mut sq, &mut dq] {
        set_caps(c, &caps);
        c.execute(
            "migrate-set-parameters",
            json!({ "x-peer-timeout": PEER_TIMEOUT_MS }),
        )
        .expect("x-peer-timeout");
    }
    sq.execute("migrate-set-parameters", params)
        .expect("migrate-set-parameters");
    let shown = sq.execute("query-migrate-parameters", json!({})).unwrap();
    assert_eq!(shown["x-peer-timeout"], PEER_TIMEOUT_MS, "{shown}");
    let _ = &mut dst;
    Some(Setup {
        src,
        sq,
        dst,
        dq,
        hosts,
    })
}

impl Setup {
    fn migrate(&mut self) {
        let uri = self.hosts.dst_uri(PORT);
        self.sq
            .execute("migrate", json!({ "uri": uri }))
            .expect("migrate");
    }
}

// ------------------------------------------------------------ across the link

/// Precopy at 1 Gbit/s into a destination started with `-S`: both sides'
/// RAM identical page by page (but the kvmclock areas), then `cont`.
#[test]
fn precopy_between_hosts_memory_identical() {
    let Some(mut s) = two_hosts(
        "precopy_between_hosts_memory_identical",
        "1gbit",
        &["-S"],
        &[],
        json!({"downtime-limit": 50}),
    ) else {
        return;
    };
    s.migrate();
    let r = wait_migration(&mut s.sq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    let dr = wait_migration(&mut s.dq, &["completed", "failed"], mig_timeout());
    assert_eq!(dr["status"], "completed", "{dr}");
    assert_eq!(run_state(&mut s.sq), "postmigrate");
    assert_eq!(run_state(&mut s.dq), "paused");
    eprintln!("across 1 Gbit/s: {r}");
    assert_same_memory(&mut s.src, &mut s.sq, &mut s.dst, &mut s.dq, 128 << 20);
    cont_and_goes_on(&s.src, &s.dst, &mut s.dq);
}

/// Postcopy at 100 Mbit/s, the background stream paced at 5 MB/s: the
/// guest that never converges completes after the switch, with page
/// requests served over the return path (or the preempt channel).
fn postcopy_between_hosts(test: &str, preempt: bool) {
    let Some(mut s) = two_hosts(
        test,
        "100mbit",
        &[],
        &[("postcopy-ram", true), ("postcopy-preempt", preempt)],
        json!({"max-bandwidth": 5_000_000, "max-postcopy-bandwidth": 5_000_000, "downtime-limit": 1}),
    ) else {
        return;
    };
    s.migrate();
    s.sq.wait_event(
        "MIGRATION_PASS",
        |e| e["data"]["pass"].as_u64() >= Some(3),
        mig_timeout(),
    )
    .unwrap();
    s.sq.execute("migrate-start-postcopy", json!({})).unwrap();
    let r = wait_migration(&mut s.sq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    assert!(r["ram"]["postcopy-requests"].as_u64() > Some(0), "{r}");
    let dr = wait_migration(&mut s.dq, &["completed", "failed"], mig_timeout());
    assert_eq!(dr["status"], "completed", "{dr}");
    assert_eq!(run_state(&mut s.sq), "postmigrate");
    assert_eq!(run_state(&mut s.dq), "running");
    eprintln!("source: {r}\ndestination: {dr}");
    assert_continues(&s.src, &s.dst);
}

#[test]
fn postcopy_between_hosts_completes() {
    postcopy_between_hosts("postcopy_between_hosts_completes", false);
}

#[test]
fn postcopy_preempt_between_hosts_completes() {
    postcopy_between_hosts("postcopy_preempt_between_hosts_completes", true);
}

// ------------------------------------------------------------------- faults

/// What goes wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// The veth pair goes down: both processes live, nothing passes.
    LinkDown,
    /// SIGSTOP the source (primary).
    FreezeSource,
    /// SIGSTOP the destination (secondary).
    FreezeDestination,
    /// SIGKILL the source.
    KillSource,
    /// SIGKILL the destination.
    KillDestination,
}

impl Fault {
    fn inject(self, s: &mut Setup) -> Instant {
        let t = Instant::now();
        match self {
            Fault::LinkDown => s.hosts.link_down(),
            Fault::FreezeSource => s.src.signal(libc::SIGSTOP),
            Fault::FreezeDestination => s.dst.signal(libc::SIGSTOP),
            Fault::KillSource => s.src.kill(),
            Fault::KillDestination => s.dst.kill(),
        }
        t
    }
    fn source_survives(self) -> bool {
        !matches!(self, Fault::FreezeSource | Fault::KillSource)
    }
    fn destination_survives(self) -> bool {
        !matches!(self, Fault::FreezeDestination | Fault::KillDestination)
    }
    /// The survivor's reason names the silence (a killed peer is noticed
    /// by its connection's reset, any reason then; see `assert_reason`).
    fn silent(self) -> bool {
        !matches!(self, Fault::KillSource | Fault::KillDestination)
    }
}

/// Wait on `c` for `states`, at most `bound()` after `t0`; returns the reply.
fn noticed(c: &mut Client, states: &[&str], t0: Instant, who: &str) -> Value {
    let r = wait_migration(c, states, bound());
    let took = t0.elapsed();
    assert!(
        took <= bound(),
        "the {who} noticed after {took:?}, bound {:?}: {r}",
        bound()
    );
    eprintln!("{who} noticed after {took:?}: {r}");
    r
}

/// The survivor's `error-desc` says what happened: the peer's silence, or
/// for a link that is down, the kernel's verdict when the timeout ends the
/// connection (its last soft error, `Network is unreachable`, where it has
/// one; or, when another thread of the connection, the return-path reader,
/// took that verdict first, the `Broken pipe` the kernel gives the stream
/// after it: a known gap, the reason should then name the silence).
fn assert_reason(r: &Value, f: Fault) {
    let d = r["error-desc"].as_str().unwrap_or_default();
    assert!(!d.is_empty(), "no error-desc: {r}");
    if f.silent() {
        let link_verdict = d.contains("unreachable") || d.contains("Broken pipe");
        assert!(
            d.contains("stopped answering") || (f == Fault::LinkDown && link_verdict),
            "{f:?}: {d}"
        );
    }
}

/// Precopy failed before the destination ran anything: the source (if it
/// survived) says why within the bound and its guest goes on intact; the
/// destination (if it survived) exits non-zero within the bound without
/// having run the guest.
fn precopy_survivors(s: &mut Setup, f: Fault, t0: Instant, expect_state: &str) {
    if f.source_survives() {
        let r = noticed(&mut s.sq, &["failed", "completed"], t0, "source");
        assert_eq!(r["status"], "failed", "{r}");
        assert_reason(&r, f);
        assert_eq!(run_state(&mut s.sq), expect_state);
        let last = s.src.passes().last().copied().unwrap_or(0);
        s.src.wait_pass_beyond(last + 1, boot_timeout());
        s.src.assert_no_corrupt();
    }
    if f.destination_survives() {
        // wait_exit fails the test if it is still running at t0 + bound.
        let left = (t0 + bound()).saturating_duration_since(Instant::now());
        let st = s.dst.wait_exit(left + Duration::from_millis(100));
        assert!(!st.success(), "the destination exited 0");
        assert!(s.dst.passes().is_empty(), "the destination ran the guest");
        let e = s.dst.stderr.text();
        assert_reason(&json!({ "error-desc": e }), f);
    }
}

/// Fault during precopy's rounds (1 MB/s: the guest dirties faster, so
/// the rounds go on).
fn precopy_rounds(test: &str, f: Fault) {
    let Some(mut s) = two_hosts(test, "1gbit", &[], &[], json!({"max-bandwidth": 1_000_000}))
    else {
        return;
    };
    s.migrate();
    wait_migration(&mut s.sq, &["active"], mig_timeout());
    std::thread::sleep(Duration::from_secs(2));
    let t0 = f.inject(&mut s);
    precopy_survivors(&mut s, f, t0, "running");
}

#[test]
fn precopy_rounds_link_down() {
    precopy_rounds("precopy_rounds_link_down", Fault::LinkDown);
}

#[test]
fn precopy_rounds_destination_frozen() {
    precopy_rounds(
        "precopy_rounds_destination_frozen",
        Fault::FreezeDestination,
    );
}

#[test]
fn precopy_rounds_destination_killed() {
    precopy_rounds("precopy_rounds_destination_killed", Fault::KillDestination);
}

#[test]
fn precopy_rounds_source_frozen() {
    precopy_rounds("precopy_rounds_source_frozen", Fault::FreezeSource);
}

#[test]
fn precopy_rounds_source_killed() {
    precopy_rounds("precopy_rounds_source_killed", Fault::KillSource);
}

/// Fault at the final stop: with `pause-before-switchover` the source
/// stops its guest and waits in `pre-switchover`; nothing flows but
/// keepalives. The source notices and resumes its guest.
fn final_stop(test: &str, f: Fault) {
    let Some(mut s) = two_hosts(
        test,
        "1gbit",
        &[],
        &[("pause-before-switchover", true)],
        json!({}),
    ) else {
        return;
    };
    s.migrate();
    wait_migration(&mut s.sq, &["pre-switchover"], mig_timeout());
    assert_ne!(run_state(&mut s.sq), "running");
    let t0 = f.inject(&mut s);
    precopy_survivors(&mut s, f, t0, "running");
}

#[test]
fn final_stop_link_down() {
    final_stop("final_stop_link_down", Fault::LinkDown);
}

#[test]
fn final_stop_destination_frozen() {
    final_stop("final_stop_destination_frozen", Fault::FreezeDestination);
}

#[test]
fn final_stop_source_frozen() {
    final_stop("final_stop_source_frozen", Fault::FreezeSource);
}

#[test]
fn final_stop_destination_killed() {
    final_stop("final_stop_destination_killed", Fault::KillDestination);
}

#[test]
fn final_stop_source_killed() {
    final_stop("final_stop_source_killed", Fault::KillSource);
}

/// After the postcopy switch: wait until the destination's guest runs on
/// pages it faulted on (a fault served). Not a PASS line: on a slow or
/// busy machine one can take longer than the whole postcopy (1 MB/s,
/// ~25 s), which then ended before the fault it was to meet.
fn destination_guest_runs(dq: &mut Client) {
    let deadline = Instant::now() + mig_timeout();
    loop {
        let r = dq.execute("query-migrate", json!({})).unwrap();
        if r["x-postcopy-faults"]["serviced"].as_u64().unwrap_or(0) > 0 {
            assert_eq!(r["status"], "postcopy-active", "{r}");
            return;
        }
        assert!(
            Instant::now() < deadline
                && matches!(r["status"].as_str(), Some("active" | "postcopy-active")),
            "the destination served no fault: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fault after the postcopy switch (background stream at 1 MB/s, so
/// postcopy lasts): each surviving side pauses within the bound
/// (`postcopy-paused`, saying why; the destination's guest stays up, the
/// source's copy stopped). Then the fault is healed (link up, SIGCONT),
/// the other side pauses too once it sees its connection gone, and the
/// postcopy is recovered across the link (`migrate-recover`, `migrate`
/// with `resume`) and completes with the guest intact.
fn postcopy_fault(test: &str, f: Fault) {
    let Some(mut s) = two_hosts(
        test,
        "100mbit",
        &[],
        &[("postcopy-ram", true)],
        json!({"max-postcopy-bandwidth": 1_000_000}),
    ) else {
        return;
    };
    s.migrate();
    s.sq.execute("migrate-start-postcopy", json!({})).unwrap();
    wait_migration(&mut s.sq, &["postcopy-active"], mig_timeout());
    destination_guest_runs(&mut s.dq);
    let t0 = f.inject(&mut s);
    let states = ["postcopy-paused", "failed", "completed"];
    if f.source_survives() {
        let r = noticed(&mut s.sq, &states, t0, "source");
        assert_eq!(r["status"], "postcopy-paused", "{r}");
        assert_reason(&r, f);
        assert_ne!(
            run_state(&mut s.sq),
            "running",
            "the source resumed a guest the destination ran"
        );
    }
    if f.destination_survives() {
        let r = noticed(&mut s.dq, &states, t0, "destination");
        assert_eq!(r["status"], "postcopy-paused", "{r}");
        assert_reason(&r, f);
        assert_eq!(run_state(&mut s.dq), "running");
        assert!(s.dst.exited().is_none(), "the destination should stay up");
    }
    match f {
        Fault::LinkDown => s.hosts.link_up(),
        Fault::FreezeSource => s.src.signal(libc::SIGCONT),
        Fault::FreezeDestination => s.dst.signal(libc::SIGCONT),
        Fault::KillSource | Fault::KillDestination => return,
    }
    for c in [&mut s.sq, &mut s.dq] {
        let r = wait_migration(c, &states, mig_timeout());
        assert_eq!(r["status"], "postcopy-paused", "{r}");
    }
    let uri = s.hosts.dst_uri(PORT + 1);
    s.dq.execute("migrate-recover", json!({ "uri": uri }))
        .unwrap();
    s.sq.execute(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 0}),
    )
    .unwrap();
    s.sq.execute("migrate", json!({"uri": uri, "resume": true}))
        .unwrap();
    for (side, c) in [("source", &mut s.sq), ("destination", &mut s.dq)] {
        let r = wait_migration(c, &["completed", "failed"], mig_timeout());
        assert_eq!(r["status"], "completed", "{side}: {r}");
        assert_eq!(r["x-postcopy-recoveries"], 1, "{side}: {r}");
    }
    assert_eq!(run_state(&mut s.dq), "running");
    assert_continues(&s.src, &s.dst);
}

#[test]
fn postcopy_link_down() {
    postcopy_fault("postcopy_link_down", Fault::LinkDown);
}

#[test]
fn postcopy_destination_frozen() {
    postcopy_fault("postcopy_destination_frozen", Fault::FreezeDestination);
}

#[test]
fn postcopy_source_frozen() {
    postcopy_fault("postcopy_source_frozen", Fault::FreezeSource);
}

#[test]
fn postcopy_destination_killed() {
    postcopy_fault("postcopy_destination_killed", Fault::KillDestination);
}

#[test]
fn postcopy_source_killed() {
    postcopy_fault("postcopy_source_killed", Fault::KillSource);
}

/// A link flap during postcopy with `x-postcopy-auto-recover` on both
/// sides (and the preempt channel): the link goes down until both sides
/// have paused, comes back, and the postcopy recovers by itself (the
/// source reconnects to the destination's original address, the preempt
/// channel too) and completes without a command; the guest intact.
#[test]
fn postcopy_link_flap_recovers_by_itself() {
    let test = "postcopy_link_flap_recovers_by_itself";
    let caps = [("postcopy-ram", true), ("postcopy-preempt", true)];
    let Some(mut s) = two_hosts(
        test,
        "100mbit",
        &[],
        &caps,
        json!({"max-postcopy-bandwidth": 1_000_000}),
    ) else {
        return;
    };
    for c in [&mut s.sq, &mut s.dq] {
        c.execute(
            "migrate-set-parameters",
            json!({"x-postcopy-auto-recover": 120_000}),
        )
        .unwrap();
    }
    s.migrate();
    s.sq.execute("migrate-start-postcopy", json!({})).unwrap();
    wait_migration(&mut s.sq, &["postcopy-active"], mig_timeout());
    destination_guest_runs(&mut s.dq);
    for c in [&mut s.sq, &mut s.dq] {
        c.take_events();
    }
    let t0 = Fault::LinkDown.inject(&mut s);
    for (who, c) in [("source", &mut s.sq), ("destination", &mut s.dq)] {
        c.wait_event(
            "MIGRATION",
            |e| e["data"]["status"] == "postcopy-paused",
            bound(),
        )
        .unwrap_or_else(|e| panic!("{who}: {e}"));
        eprintln!("{who} paused after {:?}", t0.elapsed());
    }
    s.hosts.link_up();
    let up = Instant::now();
    for (who, c) in [("source", &mut s.sq), ("destination", &mut s.dq)] {
        c.wait_event(
            "MIGRATION",
            |e| e["data"]["status"] == "postcopy-active",
            mig_timeout(),
        )
        .unwrap_or_else(|e| panic!("{who}: {e}"));
        eprintln!(
            "{who} postcopy-active {:?} after the link came back",
            up.elapsed()
        );
    }
    s.sq.execute(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 0}),
    )
    .unwrap();
    for (side, c) in [("source", &mut s.sq), ("destination", &mut s.dq)] {
        let r = wait_migration(c, &["completed", "failed"], mig_timeout());
        assert_eq!(r["status"], "completed", "{side}: {r}");
        assert_eq!(r["x-postcopy-recoveries"], 1, "{side}: {r}");
    }
    assert_eq!(run_state(&mut s.dq), "running");
    assert_continues(&s.src, &s.dst);
}

// --------------------------------------------------------------------- COLO

fn colo_checkpoints(c: &mut Client) -> u64 {
    c.execute("query-migrate", json!({})).unwrap()["x-colo"]["checkpoints"]
        .as_u64()
        .unwrap_or(0)
}

/// COLO across the link (1 Gbit/s), 3 checkpoints at 200 ms, then one
/// fault: between checkpoints (`idle`: the delay raised to 60 s first, so
/// only heartbeats flow) or while they come every 50 ms. Each surviving
/// side stops checkpointing within the bound and reports it, COLO mode
/// kept for `x-colo-lost-heartbeat`; the secondary (if it survived) then
/// takes over from its last checkpoint, its output continuing the
/// primary's released output; the primary (if the secondary is gone)
/// goes on alone.
fn colo_fault(test: &str, f: Fault, idle: bool) {
    let Some(mut s) = two_hosts(
        test,
        "1gbit",
        &[],
        &[("x-colo", true)],
        json!({"x-checkpoint-delay": 200}),
    ) else {
        return;
    };
    s.migrate();
    let r = wait_migration(&mut s.sq, &["colo", "failed", "completed"], mig_timeout());
    assert_eq!(r["status"], "colo", "{r}");
    let deadline = Instant::now() + mig_timeout();
    while colo_checkpoints(&mut s.sq) < 3 {
        assert!(Instant::now() < deadline, "fewer than 3 checkpoints");
        std::thread::sleep(Duration::from_millis(50));
    }
    let delay = if idle { 60_000 } else { 50 };
    s.sq.execute(
        "migrate-set-parameters",
        json!({ "x-checkpoint-delay": delay }),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = f.inject(&mut s);
    for (side, c, survives) in [
        ("primary", &mut s.sq, f.source_survives()),
        ("secondary", &mut s.dq, f.destination_survives()),
    ] {
        if !survives {
            continue;
        }
        let deadline = t0 + bound();
        let r = loop {
            let r = c.execute("query-migrate", json!({})).unwrap();
            if r.get("error-desc").is_some() {
                break r;
            }
            assert!(
                Instant::now() < deadline,
                "the {side} did not notice within {:?}: {r}",
                bound()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        eprintln!("{side} noticed after {:?}: {r}", t0.elapsed());
        assert_eq!(r["status"], "colo", "{r}");
        assert_reason(&r, f);
        let st = c.execute("query-colo-status", json!({})).unwrap();
        assert_eq!(st["mode"], side, "{st}");
    }
    if f.destination_survives() {
        s.dq.execute("x-colo-lost-heartbeat", json!({})).unwrap();
        s.dq.wait_event("COLO_EXIT", |_| true, mig_timeout())
            .expect("COLO_EXIT");
        assert_eq!(run_state(&mut s.dq), "running");
        let released = s.src.serial.text();
        let last = complete_lines(&released)
            .rev()
            .find_map(pass_number)
            .unwrap_or(0);
        s.dst.wait_pass_beyond(last + 2, boot_timeout());
        assert_output_continues(&released, &s.dst.serial.text());
        if f.source_survives() {
            // Both alive, the link down: the primary waits, stopped.
            assert_ne!(run_state(&mut s.sq), "running");
        }
    } else {
        s.sq.execute("x-colo-lost-heartbeat", json!({})).unwrap();
        s.sq.wait_event("COLO_EXIT", |_| true, mig_timeout())
            .expect("COLO_EXIT");
        assert_eq!(run_state(&mut s.sq), "running");
        let last = s.src.passes().last().copied().unwrap_or(0);
        s.src.wait_pass_beyond(last + 2, boot_timeout());
        assert_output_continues(&s.src.serial.text(), "");
    }
}

#[test]
fn colo_idle_link_down() {
    colo_fault("colo_idle_link_down", Fault::LinkDown, true);
}

#[test]
fn colo_idle_secondary_frozen() {
    colo_fault("colo_idle_secondary_frozen", Fault::FreezeDestination, true);
}

#[test]
fn colo_idle_primary_frozen() {
    colo_fault("colo_idle_primary_frozen", Fault::FreezeSource, true);
}

#[test]
fn colo_idle_secondary_killed() {
    colo_fault("colo_idle_secondary_killed", Fault::KillDestination, true);
}

#[test]
fn colo_idle_primary_killed() {
    colo_fault("colo_idle_primary_killed", Fault::KillSource, true);
}

#[test]
fn colo_checkpoints_secondary_frozen() {
    colo_fault(
        "colo_checkpoints_secondary_frozen",
        Fault::FreezeDestination,
        false,
    );
}

#[test]
fn colo_checkpoints_link_down() {
    colo_fault("colo_checkpoints_link_down", Fault::LinkDown, false);
}

#[test]
fn colo_checkpoints_secondary_killed() {
    colo_fault(
        "colo_checkpoints_secondary_killed",
        Fault::KillDestination,
        false,
    );
}

#[test]
fn colo_checkpoints_primary_frozen() {
    colo_fault(
        "colo_checkpoints_primary_frozen",
        Fault::FreezeSource,
        false,
    );
}

#[test]
fn colo_checkpoints_primary_killed() {
    colo_fault("colo_checkpoints_primary_killed", Fault::KillSource, false);
}

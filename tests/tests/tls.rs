//! Migration over TLS: `-object tls-creds-x509,...` on both sides and
//! `migrate-set-parameters tls-creds=tls0`. Precopy with the destination's
//! memory compared page by page, postcopy with the preempt channel, COLO
//! through a checkpoint and a failover; and what is refused, with the
//! reason on both sides and the source's guest running on: plaintext to a
//! TLS destination, a destination whose certificate another CA signed, a
//! source without a client certificate where the destination verifies
//! its peers.

use std::time::Duration;

use serde_json::{json, Value};
use tests::*;

fn mig_timeout() -> Duration {
    scaled(Duration::from_secs(180))
}

fn guest(name: &str) -> VmmBuilder {
    VmmBuilder::new(name).smp(2)
}

/// `tls-creds` = `tls0` on `c`.
fn use_tls(c: &mut Client) {
    c.execute("migrate-set-parameters", json!({"tls-creds": "tls0"}))
        .expect("tls-creds");
    let p = c.execute("query-migrate-parameters", json!({})).unwrap();
    assert_eq!(p["tls-creds"], "tls0", "{p}");
}

/// A running source restored from the boot snapshot, with `creds` as
/// client credentials `tls0` (`None`: none) and `tls-creds` set when given.
fn source(creds: Option<&TlsDir>) -> (Vmm, Client) {
    let snap = snapshot(&guest("base"));
    let mut b = guest("src").with_stdin();
    if let Some(t) = creds {
        b = b.arg("-object").arg(&t.object("client"));
    }
    let mut src = b.incoming(&format!("file:{}", snap.display())).spawn();
    src.wait_pass_beyond(2, boot_timeout());
    let mut q = src.qmp();
    if creds.is_some() {
        use_tls(&mut q);
    }
    (src, q)
}

/// A destination on a fresh port (paused after it with `-S`) with `creds`
/// as server credentials `tls0` and `tls-creds` set (after it started
/// listening: it applies to the source that connects).
fn destination(creds: &TlsDir, paused: bool) -> (Vmm, Client, u16) {
    let port = free_port();
    let mut b = guest("dst").arg("-object").arg(&creds.object("server"));
    if paused {
        b = b.arg("-S");
    }
    let mut d = b.incoming(&format!("tcp:127.0.0.1:{port}")).spawn();
    let mut q = d.qmp();
    use_tls(&mut q);
    (d, q, port)
}

fn uri(port: u16) -> Value {
    json!({"uri": format!("tcp:127.0.0.1:{port}")})
}

/// Precopy over TLS to a paused destination: both complete, the memory is
/// identical page by page (only the kvmclock pages may differ), the guest
/// goes on there.
#[test]
fn precopy_over_tls_memory_identical() {
    if !kvm_available("precopy_over_tls_memory_identical") {
        return;
    }
    let tls = TlsDir::new("tls");
    let (mut src, mut sq) = source(Some(&tls));
    let (mut dst, mut dq, port) = destination(&tls, true);
    sq.execute("migrate", uri(port)).unwrap();
    let r = wait_migration(&mut sq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    let r = wait_migration(&mut dq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    assert_same_memory(&mut src, &mut sq, &mut dst, &mut dq, 128 << 20);
    cont_and_goes_on(&src, &dst, &mut dq);
}

/// Postcopy with the preempt channel over TLS: the switch, page requests
/// served (the background held back so that the guest faults), completion,
/// the guest intact.
#[test]
fn postcopy_with_preempt_over_tls() {
    if !kvm_available("postcopy_with_preempt_over_tls") {
        return;
    }
    let tls = TlsDir::new("tls");
    let (src, mut sq) = source(Some(&tls));
    let (dst, mut dq, port) = destination(&tls, false);
    let caps = [("postcopy-ram", true), ("postcopy-preempt", true)];
    set_caps(&mut dq, &caps);
    set_caps(&mut sq, &caps);
    sq.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 5_000_000, "max-postcopy-bandwidth": 1_000_000, "downtime-limit": 1}),
    )
    .unwrap();
    sq.execute("migrate", uri(port)).unwrap();
    sq.execute("migrate-start-postcopy", json!({})).unwrap();
    wait_migration(&mut dq, &["postcopy-active", "failed"], mig_timeout());
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last, boot_timeout());
    sq.execute(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 0}),
    )
    .unwrap();
    let r = wait_migration(&mut sq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    assert!(r["ram"]["postcopy-requests"].as_u64() > Some(0), "{r}");
    let r = wait_migration(&mut dq, &["completed", "failed"], mig_timeout());
    assert_eq!(r["status"], "completed", "{r}");
    let preempt = r["x-postcopy-faults"]["serviced-by-stream"]["preempt"]
        .as_u64()
        .unwrap_or(0);
    assert!(preempt > 0, "no fault served on the preempt channel: {r}");
    assert_continues(&src, &dst);
}

/// COLO over TLS: the first migration, checkpoints, then the primary is
/// killed and the secondary takes over; its output goes on from where the
/// primary's released output stopped.
#[test]
fn colo_over_tls_checkpoints_and_fails_over() {
    if !kvm_available("colo_over_tls_checkpoints_and_fails_over") {
        return;
    }
    let tls = TlsDir::new("tls");
    let (mut p, mut pq) = source(Some(&tls));
    let (s, mut sq, port) = destination(&tls, false);
    let caps = [("x-colo", true), ("events", true)];
    set_caps(&mut sq, &caps);
    set_caps(&mut pq, &caps);
    pq.execute("migrate-set-parameters", json!({"x-checkpoint-delay": 200}))
        .unwrap();
    pq.execute("migrate", uri(port)).unwrap();
    for c in [&mut pq, &mut sq] {
        let r = wait_migration(c, &["colo", "failed", "completed"], mig_timeout());
        assert_eq!(r["status"], "colo", "{r}");
    }
    wait_colo_checkpoints(&mut pq, 3, mig_timeout());
    p.kill();
    let released = p.serial.text();
    sq.execute("x-colo-lost-heartbeat", json!({})).unwrap();
    assert_takes_over(&released, &s);
}

/// What a TLS destination refuses, each time with its reason on both
/// sides, nothing loaded there, and the source's guest running on:
/// a plaintext source; a source whose CA did not sign the destination's
/// certificate; a source without a client certificate (the destination
/// verifies its peers, QEMU's default).
#[test]
fn tls_destination_refuses_plaintext_and_unknown_peers() {
    if !kvm_available("tls_destination_refuses_plaintext_and_unknown_peers") {
        return;
    }
    let tls = TlsDir::new("tls");
    let other = TlsDir::new("other");
    // The client's own certificate taken away: the server's CA is known.
    let anonymous = TlsDir::new("anon");
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::copy(tls.dir().join(f), anonymous.dir().join(f)).unwrap();
    }
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::remove_file(anonymous.dir().join(f)).unwrap();
    }
    let (src, mut sq) = source(None);
    let cases: [(Option<&TlsDir>, &str, &str); 3] = [
        (None, "", "does not speak TLS"),
        (Some(&other), "invalid peer certificate", "handshake"),
        (Some(&anonymous), "client certificate", "no certificate"),
    ];
    for (creds, src_says, dst_says) in cases {
        let (mut dst, _dq, port) = destination(&tls, true);
        // The source's credentials for this case, as a second object.
        let id = match creds {
            None => String::new(),
            Some(c) => {
                let id = format!("c{port}");
                sq.execute(
                    "object-add",
                    json!({"qom-type": "tls-creds-x509", "id": id,
                           "dir": c.dir().display().to_string(), "endpoint": "client"}),
                )
                .unwrap();
                id
            }
        };
        let creds_id = id.clone();
        sq.execute("migrate-set-parameters", json!({"tls-creds": id}))
            .unwrap();
        sq.execute("migrate", uri(port)).unwrap();
        let r = wait_migration(&mut sq, &["completed", "failed"], mig_timeout());
        assert_eq!(r["status"], "failed", "{r}");
        let desc = r["error-desc"].as_str().unwrap_or("");
        assert!(
            desc.contains(src_says),
            "source: {desc} (case {creds_id:?})\n{}",
            src.stderr.text()
        );
        let st = dst.wait_exit(mig_timeout());
        assert!(!st.success(), "the destination accepted: {st:?}");
        let err = dst.stderr.text();
        assert!(
            err.contains("TLS") && err.contains(dst_says),
            "destination: {err}"
        );
        assert_eq!(run_state(&mut sq), "running");
    }
    let last = src.passes().last().copied().unwrap_or(0);
    src.wait_pass_beyond(last + 1, boot_timeout());
    src.assert_no_corrupt();
}

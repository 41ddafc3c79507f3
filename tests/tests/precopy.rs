//! Precopy live migration between two real minivmm processes.

use std::time::Duration;

use serde_json::json;
use tests::*;

const MIG_TIMEOUT: Duration = Duration::from_secs(120);

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
    let p0 = src.wait_pass_beyond(2, BOOT_TIMEOUT);
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
    let r = wait_migration(&mut sq, &["completed", "failed"], MIG_TIMEOUT);
    assert_eq!(r["status"], "completed", "{r}");
    assert!(r["ram"]["transferred"].as_u64().unwrap() > 16 << 20, "{r}");
    assert!(r["downtime"].is_u64(), "{r}");
    sq.wait_event(
        "MIGRATION",
        |e| e["data"]["status"] == "completed",
        MIG_TIMEOUT,
    )
    .unwrap();
    assert_eq!(run_state(&mut sq), "postmigrate");
    let before = src.passes().last().copied().unwrap_or(p0);
    let after = dst.wait_pass_beyond(before + 2, BOOT_TIMEOUT);
    assert!(after > before);
    assert_eq!(run_state(&mut dq), "running");
    // The destination never booted: its console continues the source's.
    assert!(!dst.serial.text().contains("GUEST-READY"));
    src.assert_no_corrupt();
    dst.assert_no_corrupt();
}

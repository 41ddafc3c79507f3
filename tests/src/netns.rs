//! Two hosts on one machine: a source and a destination network namespace
//! joined by a veth pair, each end shaped with `tbf`, the link able to go
//! down and up.
//!
//! ```text
//!  namespace mvt<pid>-<n>s            namespace mvt<pid>-<n>d
//!  lo, veth <ns>s  10.77.0.1/24  <---->  veth <ns>d  10.77.0.2/24, lo
//! ```
//!
//! Each pair exists only for its test: [`TwoHosts`] deletes both
//! namespaces (and with them the veth pair) when dropped, also when the
//! test fails; a new pair first deletes what a killed test process left
//! behind (namespaces named after a pid that no longer runs). The VMMs
//! join a namespace with [`crate::VmmBuilder::netns`]; their QMP sockets
//! stay ordinary unix sockets in the test's directory.
//!
//! Needs root and iproute2 (`ip`, `tc`; `./setup.sh` installs it). Where
//! either is missing, [`TwoHosts::new`] returns `None` after printing why,
//! and the test skips; as root on these machines it always runs.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The source's address on the link.
pub const SRC_IP: &str = "10.77.0.1";
/// The destination's address on the link.
pub const DST_IP: &str = "10.77.0.2";

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Prefix of every namespace this harness makes.
const PREFIX: &str = "mvt";

/// Run `ip`/`tc` with `args`; panics with its output on failure.
fn run(prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip` and `tc` on PATH, and root.
fn available() -> Result<(), &'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (network namespaces)");
    }
    for tool in ["ip", "tc"] {
        let ok = Command::new(tool)
            .arg("-V")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            return Err("needs iproute2 (`ip`, `tc`): run ./setup.sh");
        }
    }
    Ok(())
}

/// Delete namespaces of this harness whose test process is gone.
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// A source and a destination namespace joined by a veth pair.
pub struct TwoHosts {
    /// The source's namespace (for [`crate::VmmBuilder::netns`]).
    pub src: String,
    /// The destination's namespace.
    pub dst: String,
}

impl TwoHosts {
    /// Make the pair, each direction shaped to `rate` (tc syntax, e.g.
    /// `1gbit`, `100mbit`). `None` (after printing why) where the machine
    /// cannot: the test then skips.
    pub fn new(test: &str, rate: &str) -> Option<TwoHosts> {
        if let Err(why) = available() {
            println!("SKIP {test}: {why}");
            return None;
        }
        sweep_stale();
        let base = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let hosts = TwoHosts {
            src: format!("{base}s"),
            dst: format!("{base}d"),
        };
        for ns in [&hosts.src, &hosts.dst] {
            run("ip", &["netns", "add", ns]);
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        // The veth ends are named after their namespaces (at most 15
        // bytes: "mvt" + pid + "-" + n + "s").
        run(
            "ip",
            &[
                "link", "add", &hosts.src, "netns", &hosts.src, "type", "veth", "peer", "name",
                &hosts.dst, "netns", &hosts.dst,
            ],
        );
        for (ns, ip) in [(&hosts.src, SRC_IP), (&hosts.dst, DST_IP)] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", ns],
            );
            run("ip", &["-n", ns, "link", "set", ns, "up"]);
        }
        hosts.shape(rate);
        Some(hosts)
    }

    /// Shape both directions to `rate` (replacing the previous shaping).
    /// The bucket holds 10 ms of traffic (at least 64 KiB), and up to
    /// 50 ms may queue: a link of that speed, not a policer.
    pub fn shape(&self, rate: &str) {
        let burst = format!("{}", (rate_bytes(rate) / 100).max(64 << 10));
        for ns in [&self.src, &self.dst] {
            run(
                "tc",
                &[
                    "-n", ns, "qdisc", "replace", "dev", ns, "root", "tbf", "rate", rate, "burst",
                    &burst, "latency", "50ms",
                ],
            );
        }
    }

    /// Take the link down (both ends: nothing passes either way; the
    /// sockets on it stay open, their TCP retransmits into nothing).
    pub fn link_down(&self) {
        for ns in [&self.src, &self.dst] {
            run("ip", &["-n", ns, "link", "set", ns, "down"]);
        }
    }

    /// Bring the link back up.
    pub fn link_up(&self) {
        for ns in [&self.src, &self.dst] {
            run("ip", &["-n", ns, "link", "set", ns, "up"]);
        }
    }

    /// A migration URI for the destination listening on `port`.
    pub fn dst_uri(&self, port: u16) -> String {
        format!("tcp:{DST_IP}:{port}")
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.src, &self.dst] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Bytes per second of a tc rate (`1gbit`, `100mbit`, `500kbit`).
fn rate_bytes(rate: &str) -> u64 {
    let r = rate.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = r.strip_suffix("gbit") {
        (n, 1_000_000_000 / 8)
    } else if let Some(n) = r.strip_suffix("mbit") {
        (n, 1_000_000 / 8)
    } else if let Some(n) = r.strip_suffix("kbit") {
        (n, 1_000 / 8)
    } else {
        panic!("rate '{rate}': use gbit, mbit or kbit")
    };
    num.parse::<u64>()
        .unwrap_or_else(|_| panic!("rate '{rate}'"))
        * mult
}

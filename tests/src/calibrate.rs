//! How fast guests run on this machine, measured once per test run, and the
//! time limits derived from it.
//!
//! The guest kernel runs in an instruction emulator on the build machines
//! (`kvm_pvm`), and how fast differs several times between machines of the
//! same kind. So no limit in the suite is a fixed number of seconds: each is
//! a base value, written for a machine on which the standard guest (the
//! demo's: 128 MiB, 2 vCPUs, 16 MiB workload) reaches `GUEST-READY` in
//! [`REFERENCE_READY`], multiplied by how much slower this machine's
//! standard guest was ([`Calibration::scale`], never below 1).
//!
//! The measurement is one boot of the standard guest, made the first time a
//! limit is needed and written to `target/e2e-calibration`; every test
//! process of the same run reads it from there (under a lock, so only one
//! boots). `./test.sh` makes it before the suite starts (the `calibrate`
//! binary of this crate, with nothing else running) and names the run in
//! `MINIVMM_TEST_RUN`; without that variable a measurement younger than an
//! hour of the same minivmm binary is reused.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{file_identity, lock_exclusive, minivmm_bin, root, tail, VmmBuilder};

/// Time to `GUEST-READY` of the standard guest on the machine the base
/// limits were written for (docs/benchmarks.md, "Guest boot").
pub const REFERENCE_READY: Duration = Duration::from_secs(10);

/// The calibration boot itself gives up after this long: a standard guest
/// that needs more has no working VMM under it.
const CALIBRATION_LIMIT: Duration = Duration::from_secs(20 * 60);

/// A reused measurement (no `MINIVMM_TEST_RUN`) may be this old.
const REUSE_AGE: Duration = Duration::from_secs(3600);

/// Base limit of a guest boot (to `GUEST-READY` or a first `PASS`).
const BOOT_BASE: Duration = Duration::from_secs(180);
/// Base limit of one QMP reply or event.
const QMP_BASE: Duration = Duration::from_secs(60);

/// One measurement of the standard guest.
#[derive(Clone, Debug)]
pub struct Calibration {
    /// From starting minivmm to the guest's `GUEST-READY` line.
    pub ready: Duration,
    /// From `GUEST-READY` to the workload's first `PASS` (its first touch
    /// of 16 MiB: guest page faults, emulated).
    pub first_pass: Duration,
    /// Where the numbers come from.
    pub origin: String,
}

impl Calibration {
    /// How many times the base limits are stretched: this machine's boot
    /// against [`REFERENCE_READY`], at least 1.
    pub fn scale(&self) -> f64 {
        (self.ready.as_secs_f64() / REFERENCE_READY.as_secs_f64()).max(1.0)
    }

    /// One line for logs and timeout messages.
    pub fn describe(&self) -> String {
        format!(
            "calibration: standard guest GUEST-READY in {:.1} s, first PASS {:.1} s later ({}); time limits x{:.2}",
            self.ready.as_secs_f64(),
            self.first_pass.as_secs_f64(),
            self.origin,
            self.scale()
        )
    }
}

static CALIBRATION: OnceLock<Calibration> = OnceLock::new();

/// This run's calibration: read from `target/e2e-calibration`, or measured
/// now (one boot of the standard guest) when there is none for this run.
/// Without `/dev/kvm` nothing boots and the scale is 1.
pub fn calibration() -> &'static Calibration {
    CALIBRATION.get_or_init(|| {
        if !std::path::Path::new("/dev/kvm").exists() {
            return Calibration {
                ready: REFERENCE_READY,
                first_pass: Duration::ZERO,
                origin: "no /dev/kvm: nothing measured".into(),
            };
        }
        let c = load_or_measure();
        let line = c.describe();
        eprintln!("{line}");
        // A test that fails (a limit ran out, or anything else) says
        // which calibration its limits came from.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            eprintln!("({line})");
        }));
        c
    })
}

/// The calibration line if this process has one, for timeout messages.
pub(crate) fn note() -> String {
    match CALIBRATION.get() {
        Some(c) => c.describe(),
        None => "a fixed limit: no calibration was used".into(),
    }
}

/// `base` (a limit written for [`REFERENCE_READY`]) stretched for this
/// machine.
pub fn scaled(base: Duration) -> Duration {
    base.mul_f64(calibration().scale())
}

/// How long a guest may take to boot, or to print its first `PASS` after a
/// restore.
pub fn boot_timeout() -> Duration {
    scaled(BOOT_BASE)
}

/// How long a QMP reply or event may take.
pub fn qmp_timeout() -> Duration {
    scaled(QMP_BASE)
}

fn file() -> PathBuf {
    root().join("target/e2e-calibration")
}

/// What identifies the binary a measurement was made with.
fn binary_key() -> String {
    file_identity(&minivmm_bin()).unwrap_or_default()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A saved measurement that this run may use.
fn load() -> Option<Calibration> {
    let text = std::fs::read_to_string(file()).ok()?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_string)
    };
    let run = get("run")?;
    let at: u64 = get("measured_unix")?.parse().ok()?;
    let ready: u64 = get("ready_ms")?.parse().ok()?;
    let first: u64 = get("first_pass_ms")?.parse().ok()?;
    let origin = match std::env::var("MINIVMM_TEST_RUN") {
        Ok(this) if !this.is_empty() => {
            if run != this {
                return None;
            }
            format!("measured at the start of test run {run}")
        }
        _ => {
            let age = now_unix().saturating_sub(at);
            if get("bin")? != binary_key() || age > REUSE_AGE.as_secs() {
                return None;
            }
            format!("measured {age} s ago with the same minivmm")
        }
    };
    Some(Calibration {
        ready: Duration::from_millis(ready),
        first_pass: Duration::from_millis(first),
        origin,
    })
}

fn load_or_measure() -> Calibration {
    let path = file();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("target dir");
    }
    let _lock = lock_exclusive(&path.with_extension("lock"));
    if let Some(c) = load() {
        return c;
    }
    let (ready, first_pass) = measure();
    let run = std::env::var("MINIVMM_TEST_RUN").unwrap_or_default();
    let text = format!(
        "run={run}\nbin={}\nmeasured_unix={}\nready_ms={}\nfirst_pass_ms={}\n",
        binary_key(),
        now_unix(),
        ready.as_millis(),
        first_pass.as_millis()
    );
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write calibration");
    std::fs::rename(&tmp, &path).expect("rename calibration");
    Calibration {
        ready,
        first_pass,
        origin: format!("measured now by test process {}", std::process::id()),
    }
}

/// Boot the standard guest and time it. Bounded by [`CALIBRATION_LIMIT`];
/// the guest is killed on return.
fn measure() -> (Duration, Duration) {
    let start = Instant::now();
    let vm = VmmBuilder::new("calibrate").smp(2).without_qmp().spawn();
    let fail = |what: &str| -> ! {
        panic!(
            "calibration: the standard guest printed no {what} within {CALIBRATION_LIMIT:?}{}\n--- serial (tail) ---\n{}\n--- stderr ---\n{}",
            if vm.serial.is_closed() { " (minivmm exited)" } else { "" },
            tail(&vm.serial.text(), 3000),
            vm.stderr.text()
        )
    };
    let Some((_, after)) = vm
        .serial
        .wait_line(0, CALIBRATION_LIMIT, |l| l.contains("GUEST-READY"))
    else {
        fail("GUEST-READY")
    };
    let ready = start.elapsed();
    if vm
        .serial
        .wait_line(after, CALIBRATION_LIMIT, |l| {
            crate::pass_number(l).is_some()
        })
        .is_none()
    {
        fail("PASS line");
    }
    let first_pass = start.elapsed() - ready;
    vm.assert_no_corrupt();
    (ready, first_pass)
}

//! `calc-dirty-rate` / `query-dirty-rate`: how fast the guest dirties its
//! memory, measured with KVM's dirty log, so that a user can size
//! `max-bandwidth` before migrating.
//!
//! A measurement turns dirty logging on for every memslot, clears the log,
//! waits `calc-time`, and counts the pages dirtied meanwhile (the VMM's
//! own writes included); mode `dirty-bitmap` reads KVM's bitmap, mode
//! `dirty-ring` harvests the vCPUs' rings and also gives each vCPU's rate.
//! It runs on a thread of its own; this module owns its state. A
//! measurement and a migration exclude each other (both drive the dirty
//! log): the control thread refuses one while the other runs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvm_ioctls::VmFd;
use qmp::{DirtyRateMode, TimeUnit};
use serde_json::{json, Value};

use crate::dirty_ring::DirtyRings;
use crate::memory::{self, GuestMemoryMmap, PAGE_SIZE};

/// Where a measurement stands.
#[derive(Clone, Debug, Default)]
struct Measurement {
    /// `measuring` while the thread runs.
    measuring: bool,
    /// When it started (seconds since the epoch).
    start_time: i64,
    /// Its length, ms.
    calc_time_ms: i64,
    /// Its unit as asked.
    unit: TimeUnit,
    /// Its mode.
    mode: Option<DirtyRateMode>,
    /// The result, MiB/s.
    rate: Option<i64>,
    /// Per vCPU, MiB/s (dirty-ring).
    per_vcpu: Option<Vec<i64>>,
    /// Why it failed.
    error: Option<String>,
}

/// The last (or running) measurement.
#[derive(Clone, Default)]
pub struct DirtyRate(Arc<Mutex<Option<Measurement>>>);

impl DirtyRate {
    /// Is a measurement running?
    pub fn measuring(&self) -> bool {
        self.lock().as_ref().is_some_and(|m| m.measuring)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Measurement>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start measuring `calc_time_ms` in `mode` on `vm`'s memory.
    pub fn start(
        &self,
        vm: (Arc<VmFd>, Arc<GuestMemoryMmap>, Option<Arc<DirtyRings>>),
        calc_time_ms: i64,
        unit: TimeUnit,
        mode: DirtyRateMode,
    ) -> std::io::Result<()> {
        let start_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        *self.lock() = Some(Measurement {
            measuring: true,
            start_time,
            calc_time_ms,
            unit,
            mode: Some(mode),
            ..Default::default()
        });
        let me = self.clone();
        std::thread::Builder::new()
            .name("dirty-rate".into())
            .spawn(move || {
                let (fd, mem, rings) = vm;
                let rings = if mode == DirtyRateMode::DirtyRing {
                    rings
                } else {
                    None
                };
                let r = measure(&fd, &mem, rings.as_deref(), calc_time_ms);
                let mut g = me.lock();
                if let Some(m) = g.as_mut() {
                    m.measuring = false;
                    match r {
                        Ok((rate, per)) => {
                            m.rate = Some(rate);
                            m.per_vcpu = per;
                        }
                        Err(e) => m.error = Some(e),
                    }
                }
            })
            .map(|_| ())
    }

    /// `query-dirty-rate`, `calc-time` shown in `unit` (default: as asked).
    pub fn query(&self, unit: Option<TimeUnit>) -> Value {
        let g = self.lock();
        let Some(m) = g.as_ref() else {
            return json!({
                "status": "unstarted",
                "start-time": 0,
                "calc-time": 0,
                "calc-time-unit": unit.unwrap_or_default().as_str(),
                "sample-pages": 0,
                "mode": DirtyRateMode::DirtyBitmap.as_str(),
            });
        };
        let unit = unit.unwrap_or(m.unit);
        let calc_time = match unit {
            TimeUnit::Second => m.calc_time_ms / 1000,
            TimeUnit::Millisecond => m.calc_time_ms,
        };
        let status = if m.measuring { "measuring" } else { "measured" };
        let mut j = json!({
            "status": status,
            "start-time": m.start_time,
            "calc-time": calc_time,
            "calc-time-unit": unit.as_str(),
            "sample-pages": 0,
            "mode": m.mode.unwrap_or(DirtyRateMode::DirtyBitmap).as_str(),
        });
        if let Some(r) = m.rate {
            j["dirty-rate"] = json!(r);
        }
        if let Some(per) = &m.per_vcpu {
            j["vcpu-dirty-rate"] = per
                .iter()
                .enumerate()
                .map(|(id, r)| json!({"id": id, "dirty-rate": r}))
                .collect();
        }
        if let Some(e) = &m.error {
            j["x-error"] = json!(e);
        }
        j
    }
}

/// Measure: the rate (MiB/s) and, with rings, each vCPU's.
fn measure(
    fd: &VmFd,
    mem: &Arc<GuestMemoryMmap>,
    rings: Option<&DirtyRings>,
    calc_time_ms: i64,
) -> Result<(i64, Option<Vec<i64>>), String> {
    let err = |e: &dyn std::error::Error| migration::error_chain(e);
    memory::dirty_log_acquire(fd, mem).map_err(|e| err(&e))?;
    let run = || -> Result<(i64, Option<Vec<i64>>), String> {
        // Start from a clean log (and clean per-vCPU counts).
        memory::take_dirty_bitmaps(fd, mem, rings).map_err(|e| err(&e))?;
        let before = rings.map(DirtyRings::counts);
        let t = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(calc_time_ms.max(0) as u64));
        let logs = memory::take_dirty_bitmaps(fd, mem, rings).map_err(|e| err(&e))?;
        let secs = t.elapsed().as_secs_f64().max(1e-3);
        let mib_s =
            |pages: u64| (pages as f64 * PAGE_SIZE as f64 / f64::from(1 << 20) / secs) as i64;
        let pages: u64 = logs
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let per = rings.zip(before).map(|(r, b)| {
            r.counts()
                .into_iter()
                .zip(b)
                .map(|(now, then)| mib_s(now - then))
                .collect()
        });
        Ok((mib_s(pages), per))
    };
    let r = run();
    memory::dirty_log_release(fd, mem).map_err(|e| err(&e))?;
    r
}

//! The dirty page limit (QEMU's `set-vcpu-dirty-limit`, and migration's
//! `dirty-limit` capability): each limited vCPU may dirty at most its
//! quota of MiB per second; only the vCPUs that write are slowed.
//!
//! A `dirty-limit` thread runs while any limit is set. Each period (one
//! second; a migration's `x-vcpu-dirty-limit-period`) it harvests KVM's
//! dirty rings, takes each vCPU's rate from the entries its ring yielded,
//! and moves that vCPU's throttle (see `throttle`): up, in proportion to
//! how far the rate is over the quota; down, a quarter at a time, while it
//! is well under. Dirty logging is held on meanwhile (shared with a
//! migration, see `memory::dirty_log_acquire`). This module owns the
//! limits, the last rates and the thread.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use serde_json::{json, Value};

use crate::dirty_ring::DirtyRings;
use crate::memory::{self, GuestMemoryMmap, PAGE_SIZE};
use crate::throttle::{Throttle, MAX_PCT};

/// What the thread needs of the VM.
#[derive(Clone)]
pub struct LimitVm {
    /// The VM (dirty logging).
    pub fd: Arc<VmFd>,
    /// Guest memory.
    pub mem: Arc<GuestMemoryMmap>,
    /// The rings the rates come from.
    pub rings: Arc<DirtyRings>,
    /// The vCPUs' throttle.
    pub throttle: Arc<Throttle>,
}

#[derive(Default)]
struct State {
    /// Per vCPU: the quota set by the user, MiB/s.
    user: Vec<Option<u64>>,
    /// The quota a migration set for every vCPU (lifted when it leaves
    /// its rounds).
    migration: Option<u64>,
    /// Per vCPU: the rate measured in the last period, MiB/s.
    current: Vec<u64>,
    /// The measuring period.
    period: Duration,
    /// The thread runs.
    running: bool,
}

impl State {
    fn limit(&self, id: usize) -> Option<u64> {
        match (self.user.get(id).copied().flatten(), self.migration) {
            (Some(u), Some(m)) => Some(u.min(m)),
            (u, m) => u.or(m),
        }
    }

    fn any(&self) -> bool {
        self.migration.is_some() || self.user.iter().any(Option::is_some)
    }
}

/// The limits of this VM's vCPUs.
#[derive(Clone)]
pub struct DirtyLimit {
    st: Arc<(Mutex<State>, Condvar)>,
}

impl DirtyLimit {
    /// No limits, for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        let st = State {
            user: vec![None; vcpus],
            current: vec![0; vcpus],
            period: Duration::from_secs(1),
            ..Default::default()
        };
        Self {
            st: Arc::new((Mutex::new(st), Condvar::new())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `set-vcpu-dirty-limit`: vCPU `cpu` (or all) at most `rate` MiB/s.
    pub fn set(&self, vm: &LimitVm, cpu: Option<usize>, rate: u64) -> std::io::Result<()> {
        {
            let mut st = self.lock();
            for (i, u) in st.user.iter_mut().enumerate() {
                if cpu.is_none_or(|c| c == i) {
                    *u = Some(rate);
                }
            }
        }
        self.ensure_running(vm)
    }

    /// `cancel-vcpu-dirty-limit`: vCPU `cpu`'s limit (or all) off.
    pub fn cancel(&self, cpu: Option<usize>) {
        let mut st = self.lock();
        for (i, u) in st.user.iter_mut().enumerate() {
            if cpu.is_none_or(|c| c == i) {
                *u = None;
            }
        }
        self.st.1.notify_all();
    }

    /// A migration's `dirty-limit`: every vCPU at most `rate` MiB/s,
    /// measured every `period` (`None`: lift it).
    pub fn set_by_migration(
        &self,
        vm: &LimitVm,
        limit: Option<(u64, Duration)>,
    ) -> std::io::Result<()> {
        {
            let mut st = self.lock();
            st.migration = limit.map(|(r, _)| r);
            st.period = limit.map_or(Duration::from_secs(1), |(_, p)| p);
        }
        self.st.1.notify_all();
        if limit.is_some() {
            self.ensure_running(vm)?;
        }
        Ok(())
    }

    /// Is a migration's limit on?
    pub fn by_migration(&self) -> bool {
        self.lock().migration.is_some()
    }

    /// `query-vcpu-dirty-limit`: the limited vCPUs, their quota and rate.
    pub fn query(&self) -> Value {
        let st = self.lock();
        (0..st.user.len())
            .filter_map(|i| {
                st.limit(i).map(
                    |l| json!({"cpu-index": i, "limit-rate": l, "current-rate": st.current[i]}),
                )
            })
            .collect()
    }

    fn ensure_running(&self, vm: &LimitVm) -> std::io::Result<()> {
        let mut st = self.lock();
        if st.running {
            return Ok(());
        }
        st.running = true;
        drop(st);
        let (me, vm) = (self.clone(), vm.clone());
        let r = std::thread::Builder::new()
            .name("dirty-limit".into())
            .spawn(move || me.run(&vm));
        if r.is_err() {
            self.lock().running = false;
        }
        r.map(|_| ())
    }

    /// The thread: measure and adjust each period until no limit is left.
    fn run(&self, vm: &LimitVm) {
        if let Err(e) = memory::dirty_log_acquire(&vm.fd, &vm.mem) {
            log::error!("dirty limit: {}", migration::error_chain(&e));
            self.lock().running = false;
            return;
        }
        let mut before = vm.rings.counts();
        let mut at = Instant::now();
        let mut pct = vec![0u8; before.len()];
        loop {
            let mut st = self.lock();
            if !st.any() {
                st.running = false;
                break;
            }
            let period = st.period;
            st = self
                .st
                .1
                .wait_timeout(st, period)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if at.elapsed() < period / 2 {
                continue; // woken by a change: measure on the full period
            }
            drop(st);
            if let Err(e) = memory::harvest_rings(&vm.fd, &vm.mem, &vm.rings) {
                log::error!("dirty limit: {}", migration::error_chain(&e));
            }
            let now = vm.rings.counts();
            let secs = at.elapsed().as_secs_f64().max(1e-3);
            at = Instant::now();
            let mut st = self.lock();
            for (i, (n, b)) in now.iter().zip(&before).enumerate() {
                let rate = ((n - b) as f64 * PAGE_SIZE as f64 / f64::from(1 << 20) / secs) as u64;
                st.current[i] = rate;
                pct[i] = match st.limit(i) {
                    Some(l) => next_pct(pct[i], rate, l),
                    None => 0,
                };
                vm.throttle.set_vcpu(i, pct[i]);
            }
            before = now;
        }
        for i in 0..pct.len() {
            vm.throttle.set_vcpu(i, 0);
        }
        if let Err(e) = memory::dirty_log_release(&vm.fd, &vm.mem) {
            log::error!("dirty limit: {}", migration::error_chain(&e));
        }
    }
}

/// A vCPU's next throttle, % of its time asleep: up in proportion to how
/// far `rate` is over `limit` (halfway to what would meet it, at least one
/// point), down a quarter while it is under three quarters of it.
fn next_pct(now: u8, rate: u64, limit: u64) -> u8 {
    if rate > limit {
        let run = 100.0 - f64::from(now);
        let want = run * (limit as f64 / rate as f64);
        let up = ((run - want) / 2.0).max(1.0) as u8;
        now.saturating_add(up).min(MAX_PCT)
    } else if rate * 4 < limit * 3 {
        now.saturating_sub((now / 4).max(1))
    } else {
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_follows_the_rate() {
        // Ten times over: halfway to the 90 % that would meet it.
        assert_eq!(next_pct(0, 100, 10), 45);
        // Just over: one point.
        assert_eq!(next_pct(45, 11, 10), 47);
        // At the limit: stays; well under: a quarter off.
        assert_eq!(next_pct(47, 9, 10), 47);
        assert_eq!(next_pct(40, 1, 10), 30);
        assert_eq!(next_pct(2, 0, 10), 1);
        assert_eq!(next_pct(0, 0, 10), 0);
        assert_eq!(next_pct(98, 1000, 1), MAX_PCT);
    }
}

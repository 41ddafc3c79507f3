//! Postcopy blocktime (`postcopy-blocktime` on the destination): how long
//! the guest's vCPUs waited on missing pages, as QEMU reports it.
//!
//! The fault thread learns which thread faulted (userfaultfd's
//! `UFFD_FEATURE_THREAD_ID`); a fault of a vCPU thread marks that vCPU
//! blocked on the page from the fault's time, and the page's placement
//! (either stream) unblocks every vCPU waiting on it. Per vCPU the
//! blocked times add up (`postcopy-vcpu-blocktime`); the time during which
//! every vCPU was blocked at once adds up to `postcopy-blocktime`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Which vCPU waits on which page, and the sums so far.
pub(super) struct Blocktime {
    /// The vCPU threads' ids, in vCPU order.
    tids: Vec<i32>,
    /// Per vCPU: the page (block, page) it waits on, since when.
    waiting: Vec<Option<((usize, u64), Instant)>>,
    /// Per vCPU: time blocked so far.
    per_vcpu: Vec<Duration>,
    /// Since when every vCPU has been blocked (`None`: not all are).
    all_since: Option<Instant>,
    /// Time every vCPU was blocked at once, so far.
    total: Duration,
}

impl Blocktime {
    /// For the vCPU threads `tids`.
    pub(super) fn new(tids: Vec<i32>) -> Self {
        let n = tids.len();
        Self {
            tids,
            waiting: vec![None; n],
            per_vcpu: vec![Duration::ZERO; n],
            all_since: None,
            total: Duration::ZERO,
        }
    }

    /// Thread `tid` faulted on `page` at `at` (not a vCPU: ignored).
    pub(super) fn fault(&mut self, tid: i32, page: (usize, u64), at: Instant) {
        let Some(i) = self.tids.iter().position(|&t| t == tid) else {
            return;
        };
        if self.waiting[i].is_some() {
            return;
        }
        self.waiting[i] = Some((page, at));
        if self.waiting.iter().all(Option::is_some) {
            self.all_since = Some(at);
        }
    }

    /// `page` arrived at `now`: its waiters run again.
    pub(super) fn placed(&mut self, page: (usize, u64), now: Instant) {
        let mut woke = false;
        for (w, sum) in self.waiting.iter_mut().zip(&mut self.per_vcpu) {
            if let Some((p, since)) = *w {
                if p == page {
                    *sum += now.saturating_duration_since(since);
                    *w = None;
                    woke = true;
                }
            }
        }
        if woke {
            if let Some(t) = self.all_since.take() {
                self.total += now.saturating_duration_since(t);
            }
        }
    }

    /// Nobody waits any more (the postcopy ended or was abandoned).
    pub(super) fn end(&mut self, now: Instant) {
        let pages: Vec<(usize, u64)> = self.waiting.iter().flatten().map(|&(p, _)| p).collect();
        for p in pages {
            self.placed(p, now);
        }
    }

    /// QEMU's `query-migrate` members: `postcopy-blocktime` (ms, every
    /// vCPU blocked at once) and `postcopy-vcpu-blocktime` (ms per vCPU),
    /// the waits still going on counted up to `now`.
    pub(super) fn to_json(&self, now: Instant) -> (Value, Value) {
        let ms = |d: Duration| d.as_millis().min(u128::from(u32::MAX)) as u64;
        let per: Vec<u64> = self
            .per_vcpu
            .iter()
            .zip(&self.waiting)
            .map(|(&d, w)| {
                ms(d + w.map_or(Duration::ZERO, |(_, s)| now.saturating_duration_since(s)))
            })
            .collect();
        let all = self.total
            + self
                .all_since
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        (json!(ms(all)), json!(per))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_vcpu_and_all_blocked_times() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Blocktime::new(vec![100, 101]);
        b.fault(7, (0, 1), t0); // not a vCPU
        b.fault(100, (0, 1), t0);
        b.fault(100, (0, 2), t0 + ms(1)); // already blocked
        b.fault(101, (0, 5), t0 + ms(10)); // now both are
        b.placed((0, 1), t0 + ms(30)); // vCPU 0 after 30, both for 20
        b.placed((0, 9), t0 + ms(35)); // nobody waits on it
        b.placed((0, 5), t0 + ms(50)); // vCPU 1 after 40
        let (all, per) = b.to_json(t0 + ms(60));
        assert_eq!(all, json!(20));
        assert_eq!(per, json!([30, 40]));
        // A wait still going on counts up to now; end() closes it.
        b.fault(101, (0, 6), t0 + ms(60));
        assert_eq!(b.to_json(t0 + ms(70)).1, json!([30, 50]));
        b.end(t0 + ms(80));
        assert_eq!(b.to_json(t0 + ms(90)).1, json!([30, 60]));
    }
}

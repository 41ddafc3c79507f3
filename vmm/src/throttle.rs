//! vCPU throttling, for `auto-converge` (QEMU's cpu-throttle).
//!
//! At P % a vCPU may run 10 ms (one time slice), then sleeps
//! P / (100 - P) slices: a timer thread, waking when the next throttled
//! vCPU is due, kicks each throttled vCPU out of `KVM_RUN` once per period
//! (10 ms × 100 / (100 - P)) after marking it due, and the
//! vCPU thread, seeing the mark on its way back in, sleeps its share
//! ([`Throttle::take_sleep`]), waking at once for a request of the control
//! thread. Each vCPU has its own P (auto-converge sets them all,
//! dirty-limit each). At 0 % everywhere the timer thread waits on a
//! condition variable: no kicks, no exits.
//!
//! This module owns the percentage, the per-vCPU marks and the timer
//! thread ([`ThrottleTimer`], stopped before the vCPU threads end).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The slice a throttled vCPU may run between two sleeps (QEMU's
/// `CPU_THROTTLE_TIMESLICE_NS`).
const TIMESLICE: Duration = Duration::from_millis(10);
/// The highest percentage (QEMU's `CPU_THROTTLE_PCT_MAX`).
pub const MAX_PCT: u8 = 99;

/// The throttle the vCPU threads and the timer thread share: one
/// percentage per vCPU (auto-converge sets them all, dirty-limit each).
pub struct Throttle {
    pct: Vec<AtomicU8>,
    /// Per vCPU: kicked by the throttle, to sleep before running again.
    due: Vec<AtomicBool>,
    /// The timer thread is to end.
    stop: Mutex<bool>,
    cv: Condvar,
}

impl Throttle {
    /// Off, for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Arc<Self> {
        Arc::new(Self {
            pct: (0..vcpus).map(|_| AtomicU8::new(0)).collect(),
            due: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            stop: Mutex::new(false),
            cv: Condvar::new(),
        })
    }

    /// Throttle every vCPU to `pct` % (0: off; above [`MAX_PCT`]: that).
    pub fn set(&self, pct: u8) {
        for i in 0..self.pct.len() {
            self.store(i, pct);
        }
        self.wake();
    }

    /// Throttle vCPU `id` to `pct` %.
    pub fn set_vcpu(&self, id: usize, pct: u8) {
        self.store(id, pct);
        self.wake();
    }

    fn store(&self, id: usize, pct: u8) {
        if let (Some(p), Some(d)) = (self.pct.get(id), self.due.get(id)) {
            p.store(pct.min(MAX_PCT), Ordering::SeqCst);
            if pct == 0 {
                d.store(false, Ordering::SeqCst);
            }
        }
    }

    fn wake(&self) {
        let _g = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }

    /// The highest percentage now.
    pub fn percentage(&self) -> u8 {
        (0..self.pct.len()).map(|i| self.vcpu(i)).max().unwrap_or(0)
    }

    /// vCPU `id`'s percentage now.
    pub fn vcpu(&self, id: usize) -> u8 {
        self.pct.get(id).map_or(0, |p| p.load(Ordering::SeqCst))
    }

    /// vCPU `id`, back from `KVM_RUN`: how long to sleep now if the
    /// throttle kicked it (`None`: run on).
    pub fn take_sleep(&self, id: usize) -> Option<Duration> {
        if !self.due.get(id)?.swap(false, Ordering::SeqCst) {
            return None;
        }
        let p = u32::from(self.vcpu(id));
        (p > 0).then(|| TIMESLICE * p / (100 - p))
    }

    /// One throttle period at `p` %: a slice of running and its sleep.
    fn period(p: u8) -> Duration {
        TIMESLICE * 100 / (100 - u32::from(p.min(MAX_PCT)))
    }
}

/// The timer thread that kicks throttled vCPUs; ends on drop.
pub struct ThrottleTimer {
    throttle: Arc<Throttle>,
    thread: Option<JoinHandle<()>>,
}

impl ThrottleTimer {
    /// Start it for the vCPU threads `threads` (in vCPU order), kicked
    /// with `signal`. It must be dropped before those threads end.
    pub fn start(
        throttle: Arc<Throttle>,
        threads: Vec<libc::pthread_t>,
        signal: libc::c_int,
    ) -> std::io::Result<Self> {
        let t = throttle.clone();
        let thread = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || timer_loop(&t, &threads, signal))?;
        Ok(Self {
            throttle,
            thread: Some(thread),
        })
    }
}

impl Drop for ThrottleTimer {
    fn drop(&mut self) {
        *self.throttle.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.throttle.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn timer_loop(t: &Throttle, threads: &[libc::pthread_t], signal: libc::c_int) {
    let mut stop = t.stop.lock().unwrap_or_else(|e| e.into_inner());
    // Per vCPU: when it is next due a kick.
    let mut next: Vec<Option<Instant>> = vec![None; threads.len()];
    loop {
        if *stop {
            return;
        }
        if t.percentage() == 0 {
            next.fill(None);
            stop = t.cv.wait(stop).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        let now = Instant::now();
        for (i, &tid) in threads.iter().enumerate() {
            let p = t.vcpu(i);
            if p == 0 {
                next[i] = None;
                continue;
            }
            // A vCPU just throttled runs a period before its first sleep.
            let due = *next[i].get_or_insert(now + Throttle::period(p));
            if now < due {
                continue;
            }
            next[i] = Some(now + Throttle::period(p));
            t.due[i].store(true, Ordering::SeqCst);
            // SAFETY: `tid` is a vCPU thread of this VM; the VM drops this
            // timer (joining this thread) before it ends its vCPU threads,
            // so the thread is alive. The signal's handler only sets
            // `immediate_exit` (see `vcpu`).
            unsafe {
                libc::pthread_kill(tid, signal);
            }
        }
        // Until the next vCPU is due (or a change of percentage).
        let wake = next
            .iter()
            .flatten()
            .min()
            .copied()
            .unwrap_or(now + TIMESLICE);
        let wait = wake
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(100));
        stop =
            t.cv.wait_timeout(stop, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_share_and_period_follow_the_percentage() {
        let t = Throttle::new(2);
        assert_eq!(t.take_sleep(0), None, "not kicked");
        t.due[0].store(true, Ordering::SeqCst);
        assert_eq!(t.take_sleep(0), None, "off");
        t.set(50);
        t.due[1].store(true, Ordering::SeqCst);
        assert_eq!(t.take_sleep(1), Some(Duration::from_millis(10)));
        assert_eq!(t.take_sleep(1), None, "taken once");
        t.set(200);
        assert_eq!(t.percentage(), MAX_PCT);
        t.set_vcpu(1, 30);
        assert_eq!(
            (t.vcpu(0), t.vcpu(1), t.percentage()),
            (MAX_PCT, 30, MAX_PCT)
        );
        t.due[0].store(true, Ordering::SeqCst);
        assert_eq!(t.take_sleep(0), Some(Duration::from_millis(990)));
        assert_eq!(Throttle::period(99), Duration::from_millis(1000));
        assert_eq!(Throttle::period(20), Duration::from_micros(12_500));
        t.set(0);
        assert_eq!(t.take_sleep(0), None);
    }
}

//! The guest's console output as COLO sees it: passed through, held,
//! compared with the secondary's, or forwarded to the primary.
//!
//! One [`OutputGate`] sits between the VMM's serial port and its console.
//! Its mode follows the COLO role:
//!
//! - **Pass**: straight through (no COLO, or after failover).
//! - **Hold** (primary, periodic mode): everything is kept until the next
//!   checkpoint is loaded on the secondary ([`OutputGate::release_all`]).
//! - **Compare** (primary, running secondary): the primary's bytes are
//!   held and compared with the secondary's as both arrive (QEMU's
//!   colo-compare, for the serial console). The common prefix is released
//!   at once, byte by byte, so a line that differs only late (a timing at
//!   its end) still releases its start. A difference, primary output held
//!   longer than the compare timeout, or more than [`MAX_PENDING`] bytes on
//!   either side asks for a checkpoint ([`Cause`]), after which everything
//!   held is released: the secondary then starts again from the primary's
//!   state.
//! - **Forward** (running secondary): the output goes to the primary
//!   ([`OutputGate::take_forward`]) and is kept since the last checkpoint;
//!   nothing is printed (a log file keeps it when asked,
//!   [`OutputGate::set_log`]). The primary says how much of it matched and was
//!   released ([`OutputGate::set_released`]); at failover the secondary
//!   prints the rest ([`OutputGate::failover`]), so its console continues
//!   where the primary's released output stopped.
//!
//! Waiters (the primary's COLO thread, the secondary's forwarder) sleep on
//! the gate's condition variable; every change they care about wakes them
//! ([`OutputGate::wait`], [`OutputGate::poke`]).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most bytes held or pending on one side before a checkpoint is asked
/// for (compare) or recording stops (forward).
pub const MAX_PENDING: usize = 1 << 20;
/// Hold-time samples kept for the percentiles.
const SAMPLES: usize = 4096;

/// Why a checkpoint was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// `x-checkpoint-delay` passed.
    Periodic,
    /// The secondary's output differed from the primary's.
    Differed,
    /// Primary output waited longer than the compare timeout (or too much
    /// of it waited) for the secondary's.
    Timeout,
}

/// What the gate does with output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Straight through.
    Pass,
    /// Kept until [`OutputGate::release_all`].
    Hold,
    /// Compared with the secondary's output.
    Compare,
    /// Sent to the primary, kept for failover.
    Forward,
}

/// Output counters (`query-migrate`'s `x-colo`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutputStats {
    /// Bytes the guest wrote while held.
    pub held_bytes: u64,
    /// Of those, bytes released.
    pub released_bytes: u64,
    /// Of those, released because the secondary said the same.
    pub matched_bytes: u64,
    /// Median time a write waited before release, ms.
    pub hold_p50_ms: f64,
    /// 99th percentile of the same, ms.
    pub hold_p99_ms: f64,
}

struct State {
    inner: Box<dyn Write + Send>,
    mode: Mode,
    /// Primary: bytes held, oldest first.
    held: VecDeque<u8>,
    /// Primary: per write still (partly) held, its end as a count of all
    /// bytes ever held, and when it came.
    writes: VecDeque<(u64, Instant)>,
    /// Primary: bytes ever held before `held[0]`.
    held_base: u64,
    /// Primary: the secondary's bytes not matched yet.
    secondary: VecDeque<u8>,
    /// Primary: secondary bytes matched since the last checkpoint.
    matched: u64,
    /// Primary: a checkpoint is wanted.
    trigger: Option<Cause>,
    /// Secondary: bytes for the primary.
    forward: Vec<u8>,
    /// Secondary: output since the last checkpoint (for failover).
    epoch: Vec<u8>,
    /// Secondary: of `epoch`, bytes the primary released.
    released: u64,
    /// Secondary: where its dropped output is kept, if asked.
    log: Option<Box<dyn Write + Send>>,
    /// Woken from outside (failover).
    poked: bool,
    stats: OutputStats,
    hold_ms: VecDeque<f64>,
}

/// The console output gate (see the module doc); clones share it.
#[derive(Clone)]
pub struct OutputGate(Arc<(Mutex<State>, Condvar)>);

impl OutputGate {
    /// Pass output through to `inner` until told otherwise.
    pub fn new(inner: Box<dyn Write + Send>) -> Self {
        Self(Arc::new((
            Mutex::new(State {
                inner,
                mode: Mode::Pass,
                held: VecDeque::new(),
                writes: VecDeque::new(),
                held_base: 0,
                secondary: VecDeque::new(),
                matched: 0,
                trigger: None,
                forward: Vec::new(),
                epoch: Vec::new(),
                released: 0,
                log: None,
                poked: false,
                stats: OutputStats::default(),
                hold_ms: VecDeque::new(),
            }),
            Condvar::new(),
        )))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.0 .1.notify_all();
    }

    /// The mode now.
    pub fn mode(&self) -> Mode {
        self.state().mode
    }

    /// Enter `mode`. Leaving Hold or Compare releases everything held;
    /// leaving Forward drops what was not sent. Counters start again.
    pub fn set_mode(&self, mode: Mode) -> std::io::Result<()> {
        let mut s = self.state();
        let r = s.release(usize::MAX);
        s.secondary.clear();
        s.forward.clear();
        s.epoch.clear();
        s.released = 0;
        s.matched = 0;
        s.trigger = None;
        if mode != s.mode && matches!(mode, Mode::Hold | Mode::Compare) {
            s.stats = OutputStats::default();
            s.hold_ms.clear();
        }
        s.mode = mode;
        drop(s);
        self.notify();
        r
    }

    /// Primary, at a checkpoint the secondary has loaded: release all that
    /// is held; the comparison starts again from here.
    pub fn release_all(&self) -> std::io::Result<()> {
        let mut s = self.state();
        let r = s.release(usize::MAX);
        s.secondary.clear();
        s.matched = 0;
        s.trigger = None;
        r
    }

    /// Primary: output the secondary produced. Compared at once.
    pub fn secondary_output(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut s = self.state();
        if s.mode != Mode::Compare {
            return Ok(());
        }
        s.secondary.extend(bytes);
        let r = s.compare();
        drop(s);
        self.notify();
        r
    }

    /// Primary: the checkpoint wanted now, if any (taken), judging held
    /// output against `timeout`.
    pub fn take_trigger(&self, timeout: Duration) -> Option<Cause> {
        let mut s = self.state();
        if let Some(c) = s.trigger.take() {
            return Some(c);
        }
        s.oldest_held()
            .filter(|t| t.elapsed() >= timeout)
            .map(|_| Cause::Timeout)
    }

    /// Primary: when the oldest held output passes `timeout` (None: none
    /// held).
    pub fn held_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.state().oldest_held().map(|t| t + timeout)
    }

    /// Primary: secondary bytes matched (and so released) since the last
    /// checkpoint.
    pub fn matched(&self) -> u64 {
        self.state().matched
    }

    /// Secondary: also keep its own output (not printed while forwarded)
    /// in `log` (`None`: drop it).
    pub fn set_log(&self, log: Option<Box<dyn Write + Send>>) {
        self.state().log = log;
    }

    /// Secondary: the bytes to send to the primary (taken).
    pub fn take_forward(&self) -> Vec<u8> {
        std::mem::take(&mut self.state().forward)
    }

    /// Secondary: the primary released `n` bytes of this side's output
    /// since the last checkpoint.
    pub fn set_released(&self, n: u64) {
        let mut s = self.state();
        s.released = s.released.max(n);
    }

    /// Secondary, at a checkpoint loaded: its output so far is the
    /// primary's past; start again.
    pub fn new_epoch(&self) {
        let mut s = self.state();
        s.epoch.clear();
        s.forward.clear();
        s.released = 0;
    }

    /// Secondary failover: print the output the primary did not release,
    /// then pass output through.
    pub fn failover(&self) -> std::io::Result<()> {
        let mut s = self.state();
        let from = (s.released as usize).min(s.epoch.len());
        let rest = s.epoch.split_off(from);
        s.mode = Mode::Pass;
        s.epoch.clear();
        s.forward.clear();
        // Under the lock: the guest's next bytes come after these.
        let r = s.inner.write_all(&rest).and_then(|()| s.inner.flush());
        drop(s);
        self.notify();
        r
    }

    /// Output counters.
    pub fn stats(&self) -> OutputStats {
        let s = self.state();
        let mut st = s.stats.clone();
        let mut v: Vec<f64> = s.hold_ms.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            if v.is_empty() {
                0.0
            } else {
                v[((v.len() - 1) as f64 * p).round() as usize]
            }
        };
        st.hold_p50_ms = pct(0.5);
        st.hold_p99_ms = pct(0.99);
        st
    }

    /// Wake every waiter (failover requested).
    pub fn poke(&self) {
        self.state().poked = true;
        self.notify();
    }

    /// Sleep until `ready` holds for the state (checked first), a poke, or
    /// `deadline`. Returns whether `ready` held.
    fn wait_for(&self, deadline: Instant, ready: impl Fn(&State) -> bool) -> bool {
        let mut s = self.state();
        loop {
            if ready(&s) {
                return true;
            }
            if s.poked {
                s.poked = false;
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .0
                 .1
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Primary: sleep until a checkpoint is wanted, more secondary output
    /// matched than `matched_sent`, a poke, or `deadline`.
    pub fn wait(&self, deadline: Instant, matched_sent: u64) -> bool {
        self.wait_for(deadline, |s| {
            s.trigger.is_some() || (s.mode == Mode::Compare && s.matched != matched_sent)
        })
    }

    /// Secondary: sleep until there is output to forward, a poke, or
    /// `deadline`.
    pub fn wait_forward(&self, deadline: Instant) -> bool {
        self.wait_for(deadline, |s| !s.forward.is_empty())
    }
}

impl State {
    /// Write out the first `n` held bytes (all if more), noting how long
    /// each write waited.
    fn release(&mut self, n: usize) -> std::io::Result<()> {
        let n = n.min(self.held.len());
        if n == 0 {
            return Ok(());
        }
        let now = Instant::now();
        self.held_base += n as u64;
        while let Some(&(end, t)) = self.writes.front() {
            if end > self.held_base {
                break;
            }
            self.writes.pop_front();
            if self.hold_ms.len() == SAMPLES {
                self.hold_ms.pop_front();
            }
            self.hold_ms
                .push_back(now.duration_since(t).as_secs_f64() * 1000.0);
        }
        self.stats.released_bytes += n as u64;
        let out: Vec<u8> = self.held.drain(..n).collect();
        self.inner.write_all(&out)?;
        self.inner.flush()
    }

    fn oldest_held(&self) -> Option<Instant> {
        (!self.held.is_empty())
            .then(|| self.writes.front().map(|&(_, t)| t))
            .flatten()
    }

    /// Release the common prefix of the held and the secondary's bytes; a
    /// difference (or too much waiting) wants a checkpoint.
    fn compare(&mut self) -> std::io::Result<()> {
        let n = self
            .held
            .iter()
            .zip(&self.secondary)
            .take_while(|(a, b)| a == b)
            .count();
        if n > 0 {
            self.secondary.drain(..n);
            self.matched += n as u64;
            self.stats.matched_bytes += n as u64;
            self.release(n)?;
        }
        if self.trigger.is_none() {
            if !self.held.is_empty() && !self.secondary.is_empty() {
                self.trigger = Some(Cause::Differed);
            } else if self.held.len() > MAX_PENDING || self.secondary.len() > MAX_PENDING {
                self.trigger = Some(Cause::Timeout);
            }
        }
        Ok(())
    }
}

impl Write for OutputGate {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = self.state();
        match s.mode {
            Mode::Pass => return s.inner.write(buf),
            Mode::Hold | Mode::Compare => {
                s.held.extend(buf);
                s.stats.held_bytes += buf.len() as u64;
                let end = s.held_base + s.held.len() as u64;
                s.writes.push_back((end, Instant::now()));
                if s.mode == Mode::Compare {
                    s.compare()?;
                }
            }
            Mode::Forward => {
                if let Some(l) = s.log.as_mut() {
                    // A log that fails is dropped, not the guest's output.
                    if l.write_all(buf).and_then(|()| l.flush()).is_err() {
                        s.log = None;
                    }
                }
                if s.forward.len() < MAX_PENDING {
                    s.forward.extend_from_slice(buf);
                }
                if s.epoch.len() < MAX_PENDING {
                    s.epoch.extend_from_slice(buf);
                }
            }
        }
        drop(s);
        self.notify();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut s = self.state();
        if s.mode == Mode::Pass {
            s.inner.flush()
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A console that records what it was given.
    #[derive(Clone, Default)]
    struct Console(Arc<Mutex<Vec<u8>>>);

    impl Write for Console {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Console {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    fn gate(mode: Mode) -> (OutputGate, Console) {
        let c = Console::default();
        let g = OutputGate::new(Box::new(c.clone()));
        g.set_mode(mode).unwrap();
        (g, c)
    }

    #[test]
    fn the_common_prefix_is_released_as_it_matches() {
        let (mut g, c) = gate(Mode::Compare);
        g.write_all(b"PASS 1\nPASS 2\n").unwrap();
        assert_eq!(c.text(), "", "nothing before the secondary says it");
        g.secondary_output(b"PASS 1\nPA").unwrap();
        assert_eq!(c.text(), "PASS 1\nPA");
        g.secondary_output(b"SS 2\nPASS 3\n").unwrap();
        assert_eq!(c.text(), "PASS 1\nPASS 2\n");
        // The secondary is ahead: its extra line waits for the primary's.
        assert_eq!(g.take_trigger(Duration::from_secs(60)), None);
        g.write_all(b"PASS 3\n").unwrap();
        assert_eq!(c.text(), "PASS 1\nPASS 2\nPASS 3\n");
        assert_eq!(g.matched(), 21);
        let st = g.stats();
        assert_eq!(
            (st.held_bytes, st.released_bytes, st.matched_bytes),
            (21, 21, 21)
        );
    }

    #[test]
    fn a_late_difference_releases_the_start_and_wants_a_checkpoint() {
        let (mut g, c) = gate(Mode::Compare);
        g.write_all(b"PASS 7 ms=1234\n").unwrap();
        g.secondary_output(b"PASS 7 ms=1299\n").unwrap();
        assert_eq!(c.text(), "PASS 7 ms=12");
        assert_eq!(
            g.take_trigger(Duration::from_secs(60)),
            Some(Cause::Differed)
        );
        assert_eq!(g.take_trigger(Duration::from_secs(60)), None, "taken once");
        // The checkpoint releases the rest; the next epoch compares afresh.
        g.release_all().unwrap();
        assert_eq!(c.text(), "PASS 7 ms=1234\n");
        g.secondary_output(b"X").unwrap();
        g.write_all(b"X").unwrap();
        assert_eq!(c.text(), "PASS 7 ms=1234\nX");
    }

    #[test]
    fn output_held_too_long_wants_a_checkpoint() {
        let (mut g, c) = gate(Mode::Compare);
        g.write_all(b"alone").unwrap();
        assert!(g.held_deadline(Duration::from_millis(5)).is_some());
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(
            g.take_trigger(Duration::from_millis(5)),
            Some(Cause::Timeout)
        );
        assert_eq!(c.text(), "");
        g.release_all().unwrap();
        assert_eq!(c.text(), "alone");
        assert!(g.held_deadline(Duration::from_millis(5)).is_none());
        assert!(g.stats().hold_p50_ms >= 5.0);
    }

    #[test]
    fn the_secondary_prints_at_failover_what_the_primary_did_not_release() {
        let (mut g, c) = gate(Mode::Forward);
        g.write_all(b"PASS 1\nPASS 2\n").unwrap();
        assert_eq!(g.take_forward(), b"PASS 1\nPASS 2\n");
        assert!(g.take_forward().is_empty());
        assert_eq!(c.text(), "", "a secondary prints nothing");
        g.set_released(7);
        let log = Console::default();
        g.set_log(Some(Box::new(log.clone())));
        g.write_all(b"PASS 3\n").unwrap();
        assert_eq!(log.text(), "PASS 3\n", "kept in the log when asked");
        g.new_epoch();
        g.write_all(b"PASS 1\nPASS 2\n").unwrap();
        g.set_released(7);
        g.failover().unwrap();
        assert_eq!(c.text(), "PASS 2\n");
        g.write_all(b"PASS 3\n").unwrap();
        assert_eq!(c.text(), "PASS 2\nPASS 3\n");
        assert_eq!(
            log.text(),
            "PASS 3\nPASS 1\nPASS 2\n",
            "no log after failover"
        );
    }

    #[test]
    fn a_new_epoch_forgets_the_old_output() {
        let (mut g, c) = gate(Mode::Forward);
        g.write_all(b"old\n").unwrap();
        g.set_released(2);
        g.new_epoch();
        g.write_all(b"new\n").unwrap();
        g.failover().unwrap();
        assert_eq!(c.text(), "new\n");
    }

    #[test]
    fn waiters_wake_on_output_and_on_a_poke() {
        let (mut g, _c) = gate(Mode::Forward);
        let g2 = g.clone();
        let t =
            std::thread::spawn(move || g2.wait_forward(Instant::now() + Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        g.write_all(b"x").unwrap();
        assert!(t.join().unwrap());
        let g3 = g.clone();
        let t = std::thread::spawn(move || g3.wait(Instant::now() + Duration::from_secs(30), 0));
        std::thread::sleep(Duration::from_millis(20));
        g.poke();
        assert!(!t.join().unwrap());
    }
}

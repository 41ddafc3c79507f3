//! Migration status, capabilities, parameters and statistics: the state
//! that `query-migrate` and friends report and that the engines update.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use crate::transport::{Closer, Listener, Uri};

/// What a paused postcopy is told to do to recover.
pub enum Recover {
    /// Source (`migrate` with `resume`): connect to this URI.
    Connect(Uri),
    /// Destination (`migrate-recover`): accept the source on this listener.
    Listen(Listener),
}

/// The migration status, QEMU's `MigrationStatus`: the one type the QMP
/// schema (`migrate-continue`'s argument) and the engines share.
pub use qmp::MigrationStatus as Status;

/// Migration capabilities (`migrate-set-capabilities`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Emit MIGRATION and MIGRATION_PASS events.
    pub events: bool,
    /// Allow switching to postcopy.
    pub postcopy_ram: bool,
    /// Postcopy: requested pages travel on a second connection, ahead of
    /// the background stream.
    pub postcopy_preempt: bool,
    /// Enter COLO after the first migration.
    pub x_colo: bool,
    /// Precopy uses a return path on socket transports (the destination's
    /// verdict, keepalives); postcopy and COLO always do. On by default in
    /// minivmm (QEMU's default is off).
    pub return_path: bool,
    /// Stop at pre-switchover until `migrate-continue`.
    pub pause_before_switchover: bool,
    /// Throttle the vCPUs when rounds do not converge.
    pub auto_converge: bool,
    /// Measure vCPU time blocked on postcopy faults.
    pub postcopy_blocktime: bool,
    /// Limit the vCPUs' dirty rate when the rounds do not converge.
    pub dirty_limit: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            events: false,
            postcopy_ram: false,
            postcopy_preempt: false,
            x_colo: false,
            return_path: true,
            pause_before_switchover: false,
            auto_converge: false,
            postcopy_blocktime: false,
            dirty_limit: false,
        }
    }
}

/// A capability setting refused (QEMU's texts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    /// Not a capability minivmm knows.
    #[error("Parameter 'capability' does not accept value '{0}'")]
    Unknown(String),
    /// `postcopy-preempt` without `postcopy-ram`.
    #[error("Postcopy preempt requires postcopy-ram")]
    PreemptWithoutPostcopy,
    /// `dirty-limit` with `auto-converge`.
    #[error("dirty-limit conflicts with auto-converge either of then available currently")]
    DirtyLimitWithAutoConverge,
}

impl Capabilities {
    /// Set one by its QMP name (aliases included).
    pub fn set(&mut self, name: &str, on: bool) -> Result<(), CapabilityError> {
        let slot = match name {
            "events" => &mut self.events,
            "postcopy-ram" | "x-postcopy-ram" => &mut self.postcopy_ram,
            "postcopy-preempt" => &mut self.postcopy_preempt,
            "x-colo" => &mut self.x_colo,
            "return-path" => &mut self.return_path,
            "pause-before-switchover" => &mut self.pause_before_switchover,
            "auto-converge" => &mut self.auto_converge,
            "postcopy-blocktime" => &mut self.postcopy_blocktime,
            "dirty-limit" => &mut self.dirty_limit,
            _ => return Err(CapabilityError::Unknown(name.to_string())),
        };
        *slot = on;
        Ok(())
    }

    /// Refuse combinations that cannot work (checked after a whole
    /// `migrate-set-capabilities`, as QEMU does).
    pub fn check(&self) -> Result<(), CapabilityError> {
        if self.postcopy_preempt && !self.postcopy_ram {
            return Err(CapabilityError::PreemptWithoutPostcopy);
        }
        if self.dirty_limit && self.auto_converge {
            return Err(CapabilityError::DirtyLimitWithAutoConverge);
        }
        Ok(())
    }

    /// `query-migrate-capabilities` reply.
    pub fn to_json(&self) -> Value {
        let c = |n: &str, s: bool| json!({"capability": n, "state": s});
        json!([
            c("events", self.events),
            c("postcopy-ram", self.postcopy_ram),
            c("postcopy-preempt", self.postcopy_preempt),
            c("x-colo", self.x_colo),
            c("return-path", self.return_path),
            c("pause-before-switchover", self.pause_before_switchover),
            c("auto-converge", self.auto_converge),
            c("postcopy-blocktime", self.postcopy_blocktime),
            c("dirty-limit", self.dirty_limit),
        ])
    }
}

/// Migration parameters (`migrate-set-parameters`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parameters {
    /// Longest acceptable stop, ms.
    pub downtime_limit_ms: u64,
    /// Bytes per second on the wire (0 = unlimited).
    pub max_bandwidth: u64,
    /// Background bandwidth during postcopy (0 = unlimited).
    pub max_postcopy_bandwidth: u64,
    /// COLO checkpoint period, ms.
    pub x_checkpoint_delay_ms: u64,
    /// Auto-converge: first throttle, percent.
    pub cpu_throttle_initial: u8,
    /// Auto-converge: throttle step, percent.
    pub cpu_throttle_increment: u8,
    /// Auto-converge: most throttle, percent.
    pub max_cpu_throttle: u8,
    /// Auto-converge: dirtied/sent ratio of a period that counts as too
    /// high, percent.
    pub throttle_trigger_threshold: u8,
    /// Auto-converge: raise the throttle only as far as the dirty rate
    /// needs, at most by the increment.
    pub cpu_throttle_tailslow: bool,
    /// dirty-limit: each vCPU's quota, MB/s.
    pub vcpu_dirty_limit: u64,
    /// dirty-limit: the rates' period, ms.
    pub x_vcpu_dirty_limit_period_ms: u64,
    /// Longest a migration peer may make no progress (nothing received,
    /// nothing accepted), ms: `x-peer-timeout`.
    pub x_peer_timeout_ms: u64,
    /// A postcopy whose link breaks recovers by itself for this long, ms
    /// (0: off): `x-postcopy-auto-recover`.
    pub x_postcopy_auto_recover_ms: u64,
    /// COLO in periodic mode (the secondary's guest stays paused, output
    /// waits for the next checkpoint) instead of with a running secondary
    /// and compared output: `x-colo-periodic`.
    pub x_colo_periodic: bool,
    /// COLO: longest the primary's output waits for the same from the
    /// secondary before a checkpoint, ms: `x-colo-compare-timeout`.
    pub x_colo_compare_timeout_ms: u64,
    /// COLO running secondary: a file its own console output is appended
    /// to (empty: dropped, as QEMU drops the secondary's network output):
    /// `x-colo-secondary-log`.
    pub x_colo_secondary_log: String,
    /// The id of the `tls-creds-x509` object the migration's connections
    /// use ("": plain): `tls-creds`.
    pub tls_creds: String,
    /// The name the destination's certificate must carry ("": the host of
    /// the URI): `tls-hostname`.
    pub tls_hostname: String,
    /// `tls-authz`: always "" (authorization objects are not supported;
    /// a destination with verify-peer admits the clients its CA signed).
    pub tls_authz: String,
}

impl Default for Parameters {
    fn default() -> Self {
        Self {
            downtime_limit_ms: 300,
            max_bandwidth: 128 << 20,
            max_postcopy_bandwidth: 0,
            x_checkpoint_delay_ms: 20_000,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            max_cpu_throttle: 99,
            throttle_trigger_threshold: 50,
            cpu_throttle_tailslow: false,
            vcpu_dirty_limit: 1,
            x_vcpu_dirty_limit_period_ms: 1000,
            x_peer_timeout_ms: DEFAULT_PEER_TIMEOUT_MS,
            x_postcopy_auto_recover_ms: 0,
            x_colo_periodic: false,
            x_colo_compare_timeout_ms: DEFAULT_COMPARE_TIMEOUT_MS,
            x_colo_secondary_log: String::new(),
            tls_creds: String::new(),
            tls_hostname: String::new(),
            tls_authz: String::new(),
        }
    }
}

/// Default `x-colo-compare-timeout`, ms (QEMU's colo-compare
/// `compare_timeout`).
pub const DEFAULT_COMPARE_TIMEOUT_MS: u64 = 3000;

/// Default `x-peer-timeout`, ms: a dead, frozen or unreachable peer is
/// noticed within 20 s.
pub const DEFAULT_PEER_TIMEOUT_MS: u64 = 20_000;

impl Parameters {
    /// `query-migrate-parameters` reply.
    pub fn to_json(&self) -> Value {
        json!({
            "downtime-limit": self.downtime_limit_ms,
            "max-bandwidth": self.max_bandwidth,
            "max-postcopy-bandwidth": self.max_postcopy_bandwidth,
            "x-checkpoint-delay": self.x_checkpoint_delay_ms,
            "cpu-throttle-initial": self.cpu_throttle_initial,
            "cpu-throttle-increment": self.cpu_throttle_increment,
            "max-cpu-throttle": self.max_cpu_throttle,
            "throttle-trigger-threshold": self.throttle_trigger_threshold,
            "cpu-throttle-tailslow": self.cpu_throttle_tailslow,
            "vcpu-dirty-limit": self.vcpu_dirty_limit,
            "x-vcpu-dirty-limit-period": self.x_vcpu_dirty_limit_period_ms,
            "x-peer-timeout": self.x_peer_timeout_ms,
            "x-postcopy-auto-recover": self.x_postcopy_auto_recover_ms,
            "x-colo-periodic": self.x_colo_periodic,
            "x-colo-compare-timeout": self.x_colo_compare_timeout_ms,
            "x-colo-secondary-log": self.x_colo_secondary_log,
            "tls-creds": self.tls_creds,
            "tls-hostname": self.tls_hostname,
            "tls-authz": self.tls_authz,
        })
    }

    /// `x-peer-timeout` as a duration.
    pub fn peer_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.x_peer_timeout_ms)
    }
}

/// RAM statistics (`MigrationStats`).
#[derive(Clone, Copy, Debug, Default)]
pub struct RamStats {
    /// Bytes sent.
    pub transferred: u64,
    /// Bytes of dirty pages still to send.
    pub remaining: u64,
    /// RAM size.
    pub total: u64,
    /// Zero pages sent.
    pub duplicate: u64,
    /// Full pages sent.
    pub normal: u64,
    /// Dirty-log syncs.
    pub dirty_sync_count: u64,
    /// Pages dirtied per second in the last round.
    pub dirty_pages_rate: u64,
    /// Throughput of the last round, Mbit/s.
    pub mbps: f64,
    /// Pages requested by the postcopy destination.
    pub postcopy_requests: u64,
}

/// What `query-migrate` shows.
#[derive(Clone, Debug)]
pub struct Info {
    /// Status.
    pub status: Status,
    /// When the migration started.
    pub started: Option<Instant>,
    /// Set once it ended: total time, ms.
    pub total_time_ms: Option<u64>,
    /// Setup time, ms.
    pub setup_time_ms: u64,
    /// Measured stop time, ms (after completion).
    pub downtime_ms: Option<u64>,
    /// Estimated stop time if we stopped now, ms.
    pub expected_downtime_ms: Option<u64>,
    /// RAM counters.
    pub ram: RamStats,
    /// Why it failed.
    pub error_desc: Option<String>,
    /// Extra JSON members (e.g. COLO checkpoint statistics).
    pub extra: serde_json::Map<String, Value>,
    /// Postcopy failed after the destination may have started the guest.
    pub postcopy_after_run: bool,
    /// auto-converge: the vCPU throttle now, % (`None`: not throttling).
    pub cpu_throttle_percentage: Option<u8>,
}

impl Default for Info {
    fn default() -> Self {
        Self {
            status: Status::None,
            started: None,
            total_time_ms: None,
            setup_time_ms: 0,
            downtime_ms: None,
            expected_downtime_ms: None,
            ram: RamStats::default(),
            error_desc: None,
            extra: serde_json::Map::new(),
            postcopy_after_run: false,
            cpu_throttle_percentage: None,
        }
    }
}

impl Info {
    /// The `query-migrate` reply.
    pub fn to_json(&self) -> Value {
        if self.status == Status::None {
            return json!({});
        }
        let mut m = serde_json::Map::new();
        m.insert("status".into(), json!(self.status.as_str()));
        let total = self
            .total_time_ms
            .or_else(|| self.started.map(|s| s.elapsed().as_millis() as u64));
        if let Some(t) = total {
            m.insert("total-time".into(), json!(t));
        }
        m.insert("setup-time".into(), json!(self.setup_time_ms));
        if let Some(d) = self.downtime_ms {
            m.insert("downtime".into(), json!(d));
        }
        if let (Some(e), false) = (self.expected_downtime_ms, self.status.is_final()) {
            m.insert("expected-downtime".into(), json!(e));
        }
        if let (Some(p), Status::Active) = (self.cpu_throttle_percentage, self.status) {
            m.insert("cpu-throttle-percentage".into(), json!(p));
        }
        if self.status != Status::Setup {
            let r = &self.ram;
            m.insert(
                "ram".into(),
                json!({
                    "transferred": r.transferred,
                    "remaining": r.remaining,
                    "total": r.total,
                    "duplicate": r.duplicate,
                    "normal": r.normal,
                    "normal-bytes": r.normal * crate::stream::PAGE_SIZE as u64,
                    "mbps": r.mbps,
                    "dirty-sync-count": r.dirty_sync_count,
                    "dirty-pages-rate": r.dirty_pages_rate,
                    "postcopy-requests": r.postcopy_requests,
                    "page-size": crate::stream::PAGE_SIZE,
                }),
            );
        }
        if let Some(e) = &self.error_desc {
            m.insert("error-desc".into(), json!(e));
        }
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }
}

/// State shared between an engine thread and the control thread.
///
/// Who writes what: the engine thread owns [`Info`] (status and
/// statistics) and the channel's closer; the control thread only reads
/// `Info` (a copy, [`Shared::info`]) and makes requests: cancel (which also
/// moves the status to `cancelling` at once, as QEMU's `migrate_cancel`
/// does), the switch to postcopy, failover, `migrate-continue`.
#[derive(Default)]
pub struct Shared {
    /// What query-migrate shows.
    info: Mutex<Info>,
    /// Cancel requested.
    cancel: AtomicBool,
    /// Switch to postcopy requested.
    start_postcopy: AtomicBool,
    /// Closes the channel (cancel, pause, failover): see
    /// [`Shared::set_closer`], [`Shared::close_channel`].
    closer: Mutex<Option<Closer>>,
    /// COLO checkpoint period, ms (changes take effect at the next one).
    pub(crate) checkpoint_delay_ms: AtomicU64,
    /// COLO: longest primary output may wait for the secondary's, ms.
    compare_timeout_ms: AtomicU64,
    /// COLO: the output gate a failover request wakes.
    colo_gate: Mutex<Option<crate::output::OutputGate>>,
    /// `max-bandwidth`, bytes/s, as the running rounds read it.
    pub(crate) max_bandwidth: AtomicU64,
    /// `downtime-limit`, ms, as the running rounds read it.
    pub(crate) downtime_limit_ms: AtomicU64,
    /// `max-postcopy-bandwidth`, bytes/s (0: none), as the running
    /// postcopy background stream reads it.
    pub(crate) max_postcopy_bandwidth: AtomicU64,
    /// `x-peer-timeout`, ms, for the connections still to be made (a
    /// destination sets it before its source connects; 0: the default).
    peer_timeout_ms: AtomicU64,
    /// `x-postcopy-auto-recover`, ms (0: off), read when a postcopy pauses.
    auto_recover_ms: AtomicU64,
    /// `migrate-pause` broke the connection (the pause's reason).
    paused_by_user: AtomicBool,
    failover_flag: Mutex<bool>,
    failover_cv: Condvar,
    continue_flag: Mutex<bool>,
    continue_cv: Condvar,
    recover: Mutex<Option<Recover>>,
    recover_cv: Condvar,
    /// `tls-creds` of an outgoing migration: every connection it makes
    /// (main, preempt, recovery) speaks TLS with these.
    tls: Mutex<Option<crate::tls::TlsClient>>,
    /// `tls-creds` of an incoming migration: every connection it accepts
    /// (main, preempt, recovery) must speak TLS with these (read when it
    /// comes, as QEMU).
    tls_server: Mutex<Option<Arc<crate::tls::TlsCreds>>>,
}

impl Shared {
    /// A migration about to start: status `setup` until its engine thread
    /// takes over.
    pub fn starting() -> Self {
        let s = Self::default();
        s.lock_info().status = Status::Setup;
        s
    }

    /// A copy of what `query-migrate` shows.
    pub fn info(&self) -> Info {
        self.lock_info().clone()
    }

    /// The status now.
    pub fn status(&self) -> Status {
        self.lock_info().status
    }

    /// The engine's access to the info (a poisoned lock still holds valid
    /// data).
    pub(crate) fn lock_info(&self) -> std::sync::MutexGuard<'_, Info> {
        self.info.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `migrate_cancel`: unless the migration has ended or is being
    /// cancelled already, move it to `cancelling` and stop it. Whether it
    /// did (then the caller emits the `MIGRATION` event).
    pub fn cancel(&self) -> bool {
        {
            let mut i = self.lock_info();
            if i.status.is_final() || i.status == Status::Cancelling {
                return false;
            }
            i.status = Status::Cancelling;
        }
        self.request_cancel();
        true
    }

    /// `migrate-start-postcopy`: switch at the engine's next chance.
    pub fn request_postcopy(&self) {
        self.start_postcopy.store(true, Ordering::SeqCst);
    }

    /// Has the switch to postcopy been requested?
    pub(crate) fn postcopy_requested(&self) -> bool {
        self.start_postcopy.load(Ordering::SeqCst)
    }

    /// The current connection's closer (`None`: none, or the migration
    /// ended): what cancel, pause and failover shut.
    pub(crate) fn set_closer(&self, c: Option<Closer>) {
        *self.closer.lock().unwrap_or_else(|e| e.into_inner()) = c;
    }

    /// The current connection's closer, if any.
    pub(crate) fn closer(&self) -> Option<Closer> {
        self.closer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Shut the current connection, if any, so that blocked reads and
    /// writes return.
    pub(crate) fn close_channel(&self) {
        if let Some(c) = self
            .closer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            c.close();
        }
    }

    /// Request cancellation and unblock the channel.
    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.close_channel();
        self.release_switchover();
        let _g = self.recover.lock().unwrap_or_else(|e| e.into_inner());
        self.recover_cv.notify_all();
    }

    /// `migrate-pause`: break the connection of a postcopy in
    /// `postcopy-active` (or `postcopy-recover`) on purpose; its engine
    /// then pauses as for a broken link. Whether there was one to break.
    pub fn pause(&self) -> bool {
        if !matches!(
            self.status(),
            Status::PostcopyActive | Status::PostcopyRecover
        ) {
            return false;
        }
        self.paused_by_user.store(true, Ordering::SeqCst);
        self.close_channel();
        true
    }

    /// Was the connection just broken by `migrate-pause`? (Asked once: the
    /// answer resets.)
    pub(crate) fn take_paused_by_user(&self) -> bool {
        self.paused_by_user.swap(false, Ordering::SeqCst)
    }

    /// `migrate` with `resume` (source) or `migrate-recover` (destination)
    /// on a paused postcopy: hand the engine what to recover with (a newer
    /// request replaces one not yet taken).
    pub fn request_recover(&self, r: Recover) {
        *self.recover.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.recover_cv.notify_all();
    }

    /// A paused postcopy: wait for the user's recovery request (`None`:
    /// cancelled).
    pub(crate) fn wait_recover(&self) -> Option<Recover> {
        let mut g = self.recover.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.cancelled() {
                return None;
            }
            if let Some(r) = g.take() {
                return Some(r);
            }
            g = self.recover_cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A paused postcopy recovering by itself: wait up to `timeout` for the
    /// user's recovery request (`Err(())`: cancelled; `Ok(None)`: none came).
    pub(crate) fn wait_recover_for(
        &self,
        timeout: std::time::Duration,
    ) -> Result<Option<Recover>, ()> {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = self.recover.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.cancelled() {
                return Err(());
            }
            if let Some(r) = g.take() {
                return Ok(Some(r));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            g = self
                .recover_cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A recovery request, if one is waiting (without blocking).
    pub(crate) fn try_recover(&self) -> Option<Recover> {
        self.recover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Cancel requested?
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// The COLO checkpoint period, ms.
    pub fn checkpoint_delay_ms(&self) -> u64 {
        self.checkpoint_delay_ms.load(Ordering::SeqCst)
    }

    /// Set the COLO checkpoint period (the next wait between checkpoints
    /// uses it).
    pub fn set_checkpoint_delay_ms(&self, ms: u64) {
        self.checkpoint_delay_ms.store(ms, Ordering::SeqCst);
        if let Some(g) = &*self.colo_gate.lock().unwrap_or_else(|e| e.into_inner()) {
            g.poke();
        }
    }

    /// COLO's compare timeout, ms.
    pub fn compare_timeout_ms(&self) -> u64 {
        self.compare_timeout_ms.load(Ordering::SeqCst)
    }

    /// Set COLO's compare timeout (the running comparison uses it at once).
    pub fn set_compare_timeout_ms(&self, ms: u64) {
        self.compare_timeout_ms.store(ms, Ordering::SeqCst);
        if let Some(g) = &*self.colo_gate.lock().unwrap_or_else(|e| e.into_inner()) {
            g.poke();
        }
    }

    /// COLO: the gate a failover request (or a new setting) wakes.
    pub(crate) fn set_colo_gate(&self, gate: Option<crate::output::OutputGate>) {
        *self.colo_gate.lock().unwrap_or_else(|e| e.into_inner()) = gate;
    }

    /// `migrate-set-parameters` during a migration: the running engine
    /// paces by the new `max-bandwidth` and `max-postcopy-bandwidth` from
    /// its next write on (as QEMU).
    pub fn set_bandwidths(&self, max_bandwidth: u64, max_postcopy_bandwidth: u64) {
        self.max_bandwidth.store(max_bandwidth, Ordering::SeqCst);
        self.max_postcopy_bandwidth
            .store(max_postcopy_bandwidth, Ordering::SeqCst);
    }

    /// `migrate-set-parameters` during a migration: the running rounds
    /// stop once what is left fits the new `downtime-limit` (as QEMU).
    pub fn set_downtime_limit_ms(&self, ms: u64) {
        self.downtime_limit_ms.store(ms, Ordering::SeqCst);
    }

    /// Set `x-peer-timeout` for connections made from now on.
    pub fn set_peer_timeout_ms(&self, ms: u64) {
        self.peer_timeout_ms.store(ms, Ordering::SeqCst);
    }

    /// The TLS credentials the source's connections use (`None`: none).
    pub fn set_tls(&self, tls: Option<crate::tls::TlsClient>) {
        *self.tls.lock().unwrap_or_else(|e| e.into_inner()) = tls;
    }

    /// See [`Shared::set_tls`].
    pub fn tls(&self) -> Option<crate::tls::TlsClient> {
        self.tls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The TLS credentials (a server endpoint) the destination's
    /// connections must use from now on (`None`: plain).
    pub fn set_tls_server(&self, tls: Option<Arc<crate::tls::TlsCreds>>) {
        *self.tls_server.lock().unwrap_or_else(|e| e.into_inner()) = tls;
    }

    /// See [`Shared::set_tls_server`].
    pub fn tls_server(&self) -> Option<Arc<crate::tls::TlsCreds>> {
        self.tls_server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Set `x-postcopy-auto-recover` (ms, 0: off) for a postcopy pausing
    /// from now on.
    pub fn set_auto_recover_ms(&self, ms: u64) {
        self.auto_recover_ms.store(ms, Ordering::SeqCst);
    }

    /// How long a postcopy pausing now recovers by itself (`None`: it
    /// waits for the user).
    pub fn auto_recover(&self) -> Option<std::time::Duration> {
        match self.auto_recover_ms.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }

    /// The bound on the peer for a connection made now.
    pub fn peer_timeout(&self) -> std::time::Duration {
        match self.peer_timeout_ms.load(Ordering::SeqCst) {
            0 => std::time::Duration::from_millis(DEFAULT_PEER_TIMEOUT_MS),
            ms => std::time::Duration::from_millis(ms),
        }
    }

    /// `x-colo-lost-heartbeat`: end COLO here. With `close`, also shut the
    /// channel so that a blocked read returns (the secondary).
    pub fn request_failover(&self, close: bool) {
        *self.failover_flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.failover_cv.notify_all();
        if let Some(g) = &*self.colo_gate.lock().unwrap_or_else(|e| e.into_inner()) {
            g.poke();
        }
        if close {
            self.close_channel();
        }
    }

    /// Has failover been requested?
    pub fn failover_requested(&self) -> bool {
        *self.failover_flag.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Block until failover is requested.
    pub fn wait_failover(&self) {
        let mut g = self.failover_flag.lock().unwrap_or_else(|e| e.into_inner());
        while !*g {
            g = self.failover_cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Wait up to `d` for a failover request; returns whether one came.
    pub fn wait_failover_timeout(&self, d: std::time::Duration) -> bool {
        let g = self.failover_flag.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .failover_cv
            .wait_timeout_while(g, d, |f| !*f)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }

    /// `migrate-continue`: leave pre-switchover.
    pub fn release_switchover(&self) {
        *self.continue_flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.continue_cv.notify_all();
    }

    /// Wait up to `d` for `migrate-continue` or cancel; whether it came
    /// (then it is consumed).
    pub fn wait_switchover_timeout(&self, d: std::time::Duration) -> bool {
        let g = self.continue_flag.lock().unwrap_or_else(|e| e.into_inner());
        let (mut g, _) = self
            .continue_cv
            .wait_timeout_while(g, d, |f| !*f)
            .unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *g, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_info() {
        let mut c = Capabilities::default();
        c.set("x-postcopy-ram", true).unwrap();
        assert!(c.postcopy_ram);
        assert!(c
            .set("xbzrle2", true)
            .unwrap_err()
            .to_string()
            .contains("xbzrle2"));
        let mut i = Info::default();
        assert_eq!(i.to_json(), json!({}));
        i.status = Status::Completed;
        i.total_time_ms = Some(5);
        i.downtime_ms = Some(1);
        let j = i.to_json();
        assert_eq!(j["status"], "completed");
        assert_eq!(j["downtime"], 1);
        assert_eq!(j["ram"]["page-size"], 4096);
        assert!(j.get("expected-downtime").is_none());
    }

    #[test]
    fn preempt_needs_postcopy_ram() {
        let mut c = Capabilities::default();
        c.set("postcopy-preempt", true).unwrap();
        assert_eq!(
            c.check().unwrap_err().to_string(),
            "Postcopy preempt requires postcopy-ram"
        );
        c.set("postcopy-ram", true).unwrap();
        assert!(c.check().is_ok());
        assert!(c
            .to_json()
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["capability"] == "postcopy-preempt" && e["state"] == true));
    }
}

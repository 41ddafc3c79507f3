//! The control thread's side of migration: the state of this process's
//! migrations ([`Migrations`]), starting them (`migrate`, `-incoming`,
//! `migrate-incoming`), and serving the engine threads.
//!
//! How a `migrate` travels: QMP `migrate` → [`Control::migrate`] builds a
//! `migration::Outgoing` (the guest RAM as `KvmRam`, the machine as a
//! [`ProxyMachine`], the shared status) and starts the `mig-outgoing`
//! thread → the engine asks for the machine through [`ProxyMachine`],
//! which posts a [`MachineRequest`] to the control loop and waits for the
//! answer ([`Control::machine_request`]) → the engine reports progress as
//! `migration::Event`s, which the loop turns into run-state changes and
//! QMP events ([`Control::migration_event`]) → `query-migrate` reads the
//! shared status the engine writes.

use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

use serde_json::{json, Value};

use migration::output::OutputGate;
use migration::status::{Capabilities, Parameters, Shared, Status};
use migration::stream::DeviceBlob;
use migration::tls::{Endpoint, TlsClient, TlsCreds};
use migration::transport::{Listener, TransportError, Uri};
use migration::{Event as MigEvent, ExitReason, IncomingMachine, Machine, MachineError, Stopped};
use qmp::QmpError;

use super::runstate::{Input, RunState};
use super::{generic, Control, CtlMsg, CtlSender};
use crate::migrate::{self, KvmRam};
use crate::vm::MachineState;

/// What a migration thread asks of the machine.
pub enum MachineRequest {
    /// Stop and save all device state (final round, postcopy switch, COLO
    /// checkpoint).
    Stop(Sender<Result<Stopped, MachineError>>),
    /// Resume after a failed migration.
    Resume(Sender<Result<(), MachineError>>),
    /// auto-converge: throttle the vCPUs to this %.
    Throttle(u8, Sender<Result<(), MachineError>>),
    /// dirty-limit: every vCPU at most this many MiB/s, over this period.
    DirtyLimit(u64, std::time::Duration, Sender<Result<(), MachineError>>),
    /// postcopy-blocktime: the vCPU threads' ids.
    VcpuThreads(Sender<Result<Vec<i32>, MachineError>>),
    /// Load all device state (incoming).
    Load(Vec<DeviceBlob>, Sender<Result<(), MachineError>>),
    /// Postcopy failed on the destination: stop the guest for good.
    Abandon(String, Sender<Result<(), MachineError>>),
    /// This side's migration capabilities.
    Caps(Sender<Result<Capabilities, MachineError>>),
    /// COLO secondary: take a checkpoint's device state; `true`: load it
    /// into the paused guest now (running secondary).
    ColoLoad(Vec<DeviceBlob>, bool, Sender<Result<(), MachineError>>),
    /// COLO running secondary: stop the guest for a checkpoint.
    ColoPause(Sender<Result<(), MachineError>>),
    /// COLO running secondary: run the guest.
    ColoResume(Sender<Result<(), MachineError>>),
    /// COLO secondary: failover, run the guest; `true`: from the kept
    /// checkpoint (periodic mode).
    ColoTakeover(bool, Sender<Result<(), MachineError>>),
}

/// The machine as a migration thread sees it: requests to the control
/// thread, the console's output gate, and its vCPU count.
pub(super) struct ProxyMachine(pub(super) CtlSender, pub(super) OutputGate, pub(super) u8);

impl Machine for ProxyMachine {
    fn stop(&mut self) -> Result<Stopped, MachineError> {
        self.0.request(MachineRequest::Stop)
    }
    fn resume(&mut self) -> Result<(), MachineError> {
        self.0.request(MachineRequest::Resume)
    }
    fn throttle(&mut self, pct: u8) -> Result<(), MachineError> {
        self.0.request(|tx| MachineRequest::Throttle(pct, tx))
    }
    fn dirty_limit(&mut self, mib_s: u64, period: std::time::Duration) -> Result<(), MachineError> {
        self.0
            .request(|tx| MachineRequest::DirtyLimit(mib_s, period, tx))
    }
    fn output(&mut self) -> Option<OutputGate> {
        Some(self.1.clone())
    }
}

impl IncomingMachine for ProxyMachine {
    fn device_catalog(&mut self) -> migration::stream::DeviceCatalog {
        migrate::device_catalog(self.2)
    }
    fn load_devices(&mut self, blobs: Vec<DeviceBlob>) -> Result<(), MachineError> {
        self.0.request(|tx| MachineRequest::Load(blobs, tx))
    }
    fn pages_written_on_load(&mut self, blobs: &[DeviceBlob]) -> Vec<u64> {
        migrate::pages_written_on_load(blobs, self.2)
    }
    fn capabilities(&mut self) -> Capabilities {
        self.0.request(MachineRequest::Caps).unwrap_or_default()
    }
    fn colo_load(&mut self, blobs: Vec<DeviceBlob>, restore: bool) -> Result<(), MachineError> {
        self.0
            .request(|tx| MachineRequest::ColoLoad(blobs, restore, tx))
    }
    fn colo_pause(&mut self) -> Result<(), MachineError> {
        self.0.request(MachineRequest::ColoPause)
    }
    fn colo_resume(&mut self) -> Result<(), MachineError> {
        self.0.request(MachineRequest::ColoResume)
    }
    fn colo_takeover(&mut self, rollback: bool) -> Result<(), MachineError> {
        self.0
            .request(|tx| MachineRequest::ColoTakeover(rollback, tx))
    }
    fn output(&mut self) -> Option<OutputGate> {
        Some(self.1.clone())
    }
    fn vcpu_threads(&mut self) -> Result<Vec<i32>, MachineError> {
        self.0.request(MachineRequest::VcpuThreads)
    }
    fn abandon(&mut self, why: &str) {
        // Bounded: if the control thread itself waits on a missing page,
        // the caller releases userfaultfd next, which unblocks it.
        let (tx, rx) = channel();
        self.0.send(CtlMsg::Machine(MachineRequest::Abandon(
            why.to_string(),
            tx,
        )));
        let _ = rx.recv_timeout(std::time::Duration::from_secs(2));
    }
}

/// This side's COLO role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColoMode {
    /// Not in COLO.
    None,
    /// Sends checkpoints.
    Primary,
    /// Receives them.
    Secondary,
}

impl ColoMode {
    /// QMP name (`query-colo-status`, `COLO_EXIT`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Primary => "primary",
            Self::Secondary => "secondary",
        }
    }

    /// The role of the incoming (secondary) or outgoing (primary) side.
    fn of_side(incoming: bool) -> Self {
        if incoming {
            Self::Secondary
        } else {
            Self::Primary
        }
    }
}

/// Everything the control thread keeps about migrations.
pub struct Migrations {
    /// `migrate-set-capabilities`.
    pub caps: Capabilities,
    /// `migrate-set-parameters`.
    pub params: Parameters,
    /// The running outgoing migration.
    pub outgoing: Option<Arc<Shared>>,
    /// The running outgoing migration was started with postcopy-ram.
    pub outgoing_postcopy: bool,
    /// The running incoming migration.
    pub incoming: Option<Arc<Shared>>,
    /// The last outgoing migration's state (query-migrate on the source).
    pub last_outgoing: Arc<Shared>,
    /// The last incoming migration's state (query-migrate on the destination).
    pub last_incoming: Arc<Shared>,
    /// The guest ran when the outgoing migration started (it runs again
    /// if the migration fails).
    pub was_running: bool,
    /// Postcopy failed after this destination started the guest: its RAM
    /// is incomplete and it must not run again.
    pub guest_incomplete: bool,
    /// COLO role now.
    pub colo_mode: ColoMode,
    /// The role before COLO last ended.
    pub colo_last_mode: ColoMode,
    /// Why COLO last ended (`None`: it never did).
    pub colo_reason: Option<ExitReason>,
    /// COLO secondary: the machine state of the last complete checkpoint,
    /// loaded into KVM only at takeover (the guest does not run before).
    pub colo_state: Option<Box<MachineState>>,
    /// COLO: the user stopped the guest (`stop`); checkpoints then leave it
    /// stopped on this side instead of running it again.
    pub colo_user_paused: bool,
    /// The last status of the outgoing and incoming migration this thread
    /// has acted on: query-migrate shows a final status only once the run
    /// state has followed it (`completed` with the source in
    /// `postmigrate`).
    pub seen: [Status; 2],
    /// `migrate-incoming`'s `exit-on-error` (`-incoming URI`: true): a
    /// failed incoming migration ends the process; false, it stays up in
    /// `inmigrate` (the guest never ran) with the error in query-migrate,
    /// and `migrate-incoming` may be tried again.
    pub exit_on_error: bool,
}

impl Default for Migrations {
    fn default() -> Self {
        Self {
            caps: Capabilities::default(),
            params: Parameters::default(),
            outgoing: None,
            outgoing_postcopy: false,
            incoming: None,
            last_outgoing: Arc::new(Shared::default()),
            last_incoming: Arc::new(Shared::default()),
            was_running: false,
            guest_incomplete: false,
            colo_mode: ColoMode::None,
            colo_last_mode: ColoMode::None,
            colo_reason: None,
            colo_state: None,
            colo_user_paused: false,
            seen: [Status::None; 2],
            exit_on_error: true,
        }
    }
}

impl Migrations {
    /// The outgoing migration is in its rounds (`active`): what
    /// auto-converge and dirty-limit act on.
    pub fn rounds_running(&self) -> bool {
        self.outgoing
            .as_ref()
            .is_some_and(|s| s.status() == Status::Active)
    }

    /// A migration is under way (an incoming one only once its source has
    /// connected: before that, capabilities may still be set, as in QEMU).
    pub fn active(&self) -> bool {
        self.outgoing.is_some()
            || self
                .incoming
                .as_ref()
                .is_some_and(|s| s.status() != Status::Setup)
    }

    /// A migration on this side has connections made with the current
    /// `x-peer-timeout`: any outgoing one (a paused postcopy's source
    /// reconnects with the bounds it started with), an incoming one past
    /// waiting for its source, unless a paused postcopy (its recovery
    /// accepts with the current value).
    pub fn connected(&self) -> bool {
        self.outgoing.is_some()
            || self.incoming.as_ref().is_some_and(|s| {
                !matches!(
                    s.status(),
                    Status::None | Status::Setup | Status::PostcopyPaused
                )
            })
    }

    /// `query-migrate`: the destination shows its incoming migration, the
    /// source its outgoing.
    pub fn query(&self) -> Value {
        let incoming = self.incoming.is_some() || self.last_outgoing.status() == Status::None;
        if incoming {
            let j = self.status_json(true);
            if j.as_object().is_some_and(|o| !o.is_empty()) {
                return j;
            }
        }
        self.status_json(false)
    }

    /// One side's query-migrate answer, its final status held back until
    /// this thread has acted on it (see `seen`).
    fn status_json(&self, incoming: bool) -> Value {
        let (shared, running) = if incoming {
            (&self.last_incoming, self.incoming.is_some())
        } else {
            (&self.last_outgoing, self.outgoing.is_some())
        };
        let info = shared.info();
        let mut j = info.to_json();
        let seen = self.seen[usize::from(incoming)];
        if running && info.status.is_final() && seen != Status::None {
            j["status"] = json!(seen.as_str());
        }
        j
    }

    /// `query-colo-status`.
    pub fn colo_status(&self) -> Value {
        json!({
            "mode": self.colo_mode.as_str(),
            "last-mode": self.colo_last_mode.as_str(),
            "reason": self.colo_reason.map_or("none", ExitReason::as_str),
        })
    }
}

/// Why an incoming migration could not start.
pub(super) enum IncomingStartError {
    Transport(TransportError),
    Other(String),
}

impl Control {
    /// Serve one request of a migration thread.
    pub(super) fn machine_request(&mut self, req: MachineRequest) {
        match req {
            MachineRequest::Stop(reply) => {
                let _ = reply.send(self.migration_stop());
            }
            MachineRequest::DirtyLimit(rate, period, reply) => {
                let active = self.mig.rounds_running();
                let r = match self.vm.limit_vm() {
                    Some(vm) if active => self
                        .dirty_limit
                        .set_by_migration(&vm, Some((rate, period)))
                        .map_err(MachineError::vmm),
                    Some(_) => Ok(()),
                    None => Err(MachineError::Unsupported(
                        "dirty-limit needs -accel kvm,dirty-ring-size=N",
                    )),
                };
                let _ = reply.send(r);
            }
            MachineRequest::VcpuThreads(reply) => {
                let _ = reply.send(Ok(self.vm.vcpu_threads()));
            }
            MachineRequest::Throttle(pct, reply) => {
                // Only while the rounds run (see migration_status).
                let active = self.mig.rounds_running();
                self.vm.set_throttle(if active { pct } else { 0 });
                let _ = reply.send(Ok(()));
            }
            MachineRequest::Resume(reply) => {
                self.vm.set_throttle(0);
                // A COLO primary runs between checkpoints unless the user
                // stopped it.
                let run = if self.mig.colo_mode == ColoMode::Primary {
                    !self.mig.colo_user_paused
                } else {
                    self.mig.was_running
                };
                let _ = reply.send(
                    self.enter(Input::MigrationResume { run })
                        .map_err(MachineError::vmm),
                );
            }
            MachineRequest::Load(blobs, reply) => {
                let _ = reply.send(self.load_incoming(blobs));
            }
            MachineRequest::Caps(reply) => {
                let _ = reply.send(Ok(self.mig.caps));
            }
            MachineRequest::ColoLoad(blobs, restore, reply) => {
                let _ = reply.send(self.colo_load(blobs, restore));
            }
            MachineRequest::ColoPause(reply) => {
                // Already stopped for a checkpoint that broke off: nothing
                // to do; stopped by the user: it stays so after.
                let r = match self.runstate {
                    RunState::Colo => Ok(()),
                    RunState::Paused => {
                        self.mig.colo_user_paused = true;
                        self.stopped(false, Input::MigrationStopped { colo_primary: true });
                        Ok(())
                    }
                    _ => self
                        .enter(Input::MigrationStopped { colo_primary: true })
                        .map_err(MachineError::vmm),
                };
                let _ = reply.send(r);
            }
            MachineRequest::ColoResume(reply) => {
                let run = !self.mig.colo_user_paused;
                let _ = reply.send(
                    self.enter(Input::MigrationResume { run })
                        .map_err(MachineError::vmm),
                );
            }
            MachineRequest::ColoTakeover(rollback, reply) => {
                let _ = reply.send(self.colo_takeover(rollback));
            }
            MachineRequest::Abandon(why, reply) => {
                log::error!("postcopy failed, the guest is stopped: {why}");
                self.mig.guest_incomplete = true;
                let vcpus_running = self.vm.is_running();
                let r = self
                    .enter(Input::PostcopyAbandoned { vcpus_running })
                    .map_err(MachineError::vmm);
                let _ = reply.send(r);
            }
        }
    }

    /// COLO secondary: a checkpoint's device state, checked now. Periodic
    /// mode keeps it for a takeover (loading it costs the checkpoint pause
    /// nothing and keeps KVM from writing the clock pages here); a running
    /// secondary loads it into its paused guest at once.
    fn colo_load(&mut self, blobs: Vec<DeviceBlob>, restore: bool) -> Result<(), MachineError> {
        let (st, _) = migrate::from_blobs(blobs, self.vm.shape()).map_err(MachineError::vmm)?;
        if restore {
            self.mig.colo_state = None;
            self.vm.ram_loaded();
            self.vm
                .restore_state(&st)
                .map_err(|e| MachineError::vmm(super::ControlError::from(e)))?;
        } else {
            self.mig.colo_state = Some(Box::new(st));
        }
        if self.runstate == RunState::Colo {
            Ok(())
        } else {
            self.enter(Input::ColoCheckpoint).map_err(MachineError::vmm)
        }
    }

    /// COLO secondary failover: with `rollback`, load the kept checkpoint
    /// and run; else run on from here (a running secondary's guest).
    fn colo_takeover(&mut self, rollback: bool) -> Result<(), MachineError> {
        if rollback {
            let st = self
                .mig
                .colo_state
                .take()
                .ok_or(MachineError::vmm(ProxyError::NoCheckpoint))?;
            self.vm.ram_loaded();
            self.vm
                .restore_state(&st)
                .map_err(|e| MachineError::vmm(super::ControlError::from(e)))?;
        }
        if self.runstate == RunState::Running {
            return Ok(());
        }
        self.enter(Input::ColoTakeover).map_err(MachineError::vmm)
    }

    /// Stop the vCPUs and save the machine for a migration.
    fn migration_stop(&mut self) -> Result<Stopped, MachineError> {
        let was = self.vm.is_running();
        let colo_primary = self.mig.colo_mode == ColoMode::Primary;
        if colo_primary {
            self.mig.colo_user_paused |= self.runstate == RunState::Paused;
        } else {
            self.mig.was_running = was;
        }
        let saved = self.vm.pause_and_save();
        if !self.vm.is_running() {
            // The vCPUs are paused already: the step only sets the state
            // and sends STOP if they ran.
            self.stopped(was, Input::MigrationStopped { colo_primary });
        }
        let st = saved.map_err(MachineError::vmm)?;
        let devices = migrate::to_blobs(&st, self.mig.was_running).map_err(MachineError::vmm)?;
        Ok(Stopped { devices })
    }

    fn load_incoming(&mut self, blobs: Vec<DeviceBlob>) -> Result<(), MachineError> {
        let (st, running) =
            migrate::from_blobs(blobs, self.vm.shape()).map_err(MachineError::vmm)?;
        self.vm.restore_state(&st).map_err(MachineError::vmm)?;
        let run = running && !self.config.start_paused;
        self.enter(Input::IncomingLoaded { run })
            .map_err(MachineError::vmm)
    }

    /// Progress of a migration thread (`incoming`: which side).
    pub(super) fn migration_event(
        &mut self,
        incoming: bool,
        event: MigEvent,
    ) -> Result<(), super::ControlError> {
        match event {
            MigEvent::Status(s) => self.migration_status(incoming, s)?,
            MigEvent::Pass(n) => {
                if self.mig.caps.events && !incoming {
                    self.events.send("MIGRATION_PASS", Some(json!({"pass": n})));
                }
            }
            MigEvent::ColoExit(reason) => {
                let mode = ColoMode::of_side(incoming);
                self.mig.colo_last_mode = mode;
                self.mig.colo_mode = ColoMode::None;
                self.mig.colo_reason = Some(reason);
                self.mig.colo_user_paused = false;
                // The primary runs alone: the secondary's copy stays paused.
                self.enter(Input::ColoExit)?;
                self.events.send(
                    "COLO_EXIT",
                    Some(json!({"mode": mode.as_str(), "reason": reason.as_str()})),
                );
            }
        }
        Ok(())
    }

    fn migration_status(&mut self, incoming: bool, s: Status) -> Result<(), super::ControlError> {
        self.mig.seen[usize::from(incoming)] = s;
        if !incoming && s != Status::Active {
            // auto-converge and dirty-limit act only on the rounds.
            self.vm.set_throttle(0);
            if self.dirty_limit.by_migration() {
                if let Some(vm) = self.vm.limit_vm() {
                    let _ = self.dirty_limit.set_by_migration(&vm, None);
                }
            }
        }
        if s == Status::Colo {
            self.mig.colo_mode = ColoMode::of_side(incoming);
        }
        if self.mig.caps.events {
            self.events
                .send("MIGRATION", Some(json!({"status": s.as_str()})));
        }
        if !s.is_final() {
            return Ok(());
        }
        if !incoming {
            self.mig.outgoing = None;
            // A COLO primary that completed left COLO and runs alone.
            let colo_alone = self.mig.colo_last_mode == ColoMode::Primary && s == Status::Completed;
            let source_done = !colo_alone
                && (s == Status::Completed || self.mig.last_outgoing.info().postcopy_after_run);
            return self.enter(Input::OutgoingEnded { source_done });
        }
        self.mig.incoming = None;
        if s == Status::Completed {
            self.vm.ram_loaded();
            return Ok(());
        }
        let desc = self
            .mig
            .last_incoming
            .info()
            .error_desc
            .clone()
            .unwrap_or_default();
        if self.mig.guest_incomplete {
            // Postcopy broke after the switch: stay up, paused, so the
            // user can inspect it; `cont` is refused.
            log::error!("incoming postcopy migration failed: {desc}");
            return Ok(());
        }
        if !self.mig.exit_on_error {
            log::error!(
                "incoming migration failed: {desc} (exit-on-error is off: \
                 still waiting for an incoming migration)"
            );
            return Ok(());
        }
        log::error!("incoming migration failed: {desc}");
        Err(super::ControlError::IncomingFailed(desc))
    }

    fn mig_events(&self, incoming: bool) -> migration::EventSink {
        let tx = self.ctl_tx.clone();
        Arc::new(move |event| tx.send(CtlMsg::Migration { incoming, event }))
    }

    /// The `tls-creds` object `id` names, for a destination ("": none).
    pub(super) fn server_tls(&self, id: &str) -> Result<Option<Arc<TlsCreds>>, String> {
        self.tls_for(id, Endpoint::Server)
    }

    fn tls_for(&self, id: &str, endpoint: Endpoint) -> Result<Option<Arc<TlsCreds>>, String> {
        if id.is_empty() {
            return Ok(None);
        }
        let c = self
            .tls_creds
            .iter()
            .find(|c| c.id == id)
            .ok_or_else(|| format!("No TLS credentials with id '{id}'"))?;
        if c.endpoint != endpoint {
            return Err(format!(
                "Expecting TLS credentials with a {} endpoint",
                match endpoint {
                    Endpoint::Client => "client",
                    Endpoint::Server => "server",
                }
            ));
        }
        Ok(Some(c.clone()))
    }

    /// What a source migrating to `uri` uses for TLS (`tls-creds`,
    /// `tls-hostname` or the URI's host).
    fn client_tls(&self, uri: &Uri) -> Result<Option<TlsClient>, String> {
        let Some(creds) = self.tls_for(&self.mig.params.tls_creds, Endpoint::Client)? else {
            return Ok(None);
        };
        uri.check_tls().map_err(|e| e.to_string())?;
        let host = match (self.mig.params.tls_hostname.as_str(), uri.tcp_host()) {
            ("", Some(h)) => h,
            ("", None) => return Err("No hostname available for TLS: set tls-hostname".into()),
            (h, _) => h,
        };
        TlsClient::new(creds, host)
            .map(Some)
            .map_err(|e| migration::error_chain(&e))
    }

    /// Listen for an incoming migration on `uri` and start its thread.
    pub(super) fn start_incoming(&mut self, uri: &str) -> Result<(), IncomingStartError> {
        let spec = uri;
        let uri = Uri::parse(uri).map_err(IncomingStartError::Transport)?;
        // Checked before anything changes (RAM discarded, run state).
        let tls = self
            .server_tls(&self.mig.params.tls_creds)
            .map_err(IncomingStartError::Other)?;
        if tls.is_some() {
            uri.check_tls().map_err(IncomingStartError::Transport)?;
        }
        if let Some(host) = uri.tcp_host() {
            super::warn_if_open("migration listener", spec, host);
        }
        let listener = Listener::bind(&uri).map_err(IncomingStartError::Transport)?;
        self.vm
            .discard_ram()
            .map_err(|e| IncomingStartError::Other(e.to_string()))?;
        self.enter(Input::IncomingStarted)
            .map_err(|e| IncomingStartError::Other(migration::error_chain(&e)))?;
        let ram = Arc::new(KvmRam::new(
            self.vm.fd().clone(),
            self.vm.memory().clone(),
            self.vm.dirty_rings().cloned(),
        ));
        let shared = Arc::new(Shared::starting());
        shared.set_tls_server(tls);
        shared.set_peer_timeout_ms(self.mig.params.x_peer_timeout_ms);
        shared.set_auto_recover_ms(self.mig.params.x_postcopy_auto_recover_ms);
        self.mig.last_incoming = shared.clone();
        self.mig.incoming = Some(shared.clone());
        self.mig.seen[1] = Status::None;
        let inc = migration::Incoming {
            config: migrate::machine_config(self.vm.shape(), &ram),
            ram,
            machine: Box::new(ProxyMachine(
                self.ctl_tx.clone(),
                self.gate.clone(),
                self.vm.shape().vcpus,
            )),
            shared,
            events: self.mig_events(true),
        };
        std::thread::Builder::new()
            .name("mig-incoming".into())
            .spawn(move || {
                migration::accept_and_run_incoming(inc, listener);
            })
            .map_err(|e| IncomingStartError::Other(e.to_string()))?;
        Ok(())
    }

    /// QMP `migrate`: start the outgoing migration thread.
    pub(super) fn migrate(&mut self, uri: &str, resume: bool) -> Result<Value, QmpError> {
        if resume {
            // QEMU's words for a resume without a paused postcopy.
            let paused = self
                .mig
                .outgoing
                .as_ref()
                .filter(|s| s.status() == Status::PostcopyPaused)
                .ok_or_else(|| generic("Cannot resume if there is no paused migration"))?;
            let uri = Uri::parse(uri).map_err(|e| generic(e.to_string()))?;
            paused.request_recover(migration::status::Recover::Connect(uri));
            return Ok(json!({}));
        }
        if self.mig.outgoing.is_some() {
            return Err(generic("There's a migration process in progress"));
        }
        if self.dirty_rate.measuring() {
            return Err(generic(
                "a dirty rate calculation is running (query-dirty-rate): migrate after it",
            ));
        }
        if self.mig.incoming.is_some() || self.runstate == super::RunState::InMigrate {
            return Err(generic("Guest is waiting for an incoming migration"));
        }
        if self.mig.caps.x_colo && self.mig.caps.postcopy_ram {
            return Err(generic("x-colo and postcopy-ram cannot be used together"));
        }
        let uri = Uri::parse(uri).map_err(|e| generic(e.to_string()))?;
        let tls = self.client_tls(&uri).map_err(generic)?;
        let ram = Arc::new(KvmRam::new(
            self.vm.fd().clone(),
            self.vm.memory().clone(),
            self.vm.dirty_rings().cloned(),
        ));
        let shared = Arc::new(Shared::starting());
        shared.set_tls(tls);
        self.mig.last_outgoing = shared.clone();
        self.mig.outgoing = Some(shared.clone());
        self.mig.seen[0] = Status::None;
        self.mig.outgoing_postcopy = self.mig.caps.postcopy_ram;
        self.mig.was_running = self.vm.is_running();
        let out = migration::Outgoing {
            uri,
            config: migrate::machine_config(self.vm.shape(), &ram),
            ram,
            machine: Box::new(ProxyMachine(
                self.ctl_tx.clone(),
                self.gate.clone(),
                self.vm.shape().vcpus,
            )),
            params: self.mig.params.clone(),
            caps: self.mig.caps,
            shared,
            events: self.mig_events(false),
        };
        std::thread::Builder::new()
            .name("mig-outgoing".into())
            .spawn(move || {
                migration::run_outgoing(out);
            })
            .map_err(|e| generic(format!("cannot start the migration thread: {e}")))?;
        Ok(json!({}))
    }
}

/// What the control thread itself could not do for a migration thread.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A COLO takeover before any checkpoint arrived.
    #[error("no COLO checkpoint to take over from")]
    NoCheckpoint,
}

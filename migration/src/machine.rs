//! The machine boundary: what the engines ask of the VMM and tell it.
//!
//! This module owns the traits the VMM implements ([`Machine`] on the
//! source, [`IncomingMachine`] on the destination), the configuration both
//! sides must agree on ([`MachineConfig`]), the events the engines report
//! ([`Event`] through an [`EventSink`]) and the error every engine returns
//! ([`MigrationError`]). It is the bottom layer of the engines: it knows
//! none of them (their own errors reach it boxed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ram::{GuestRam, RamBlock, RamError, RamRecordError};
use crate::status::{Capabilities, Shared, Status};
use crate::stream::{DeviceBlob, StreamError};
use crate::transport;

/// An engine's own error ([`crate::postcopy::PostcopyError`],
/// [`crate::colo::ColoError`]), boxed: this layer does not know their types.
pub type EngineError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Connecting or listening.
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    /// The stream was malformed or the channel broke.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Guest RAM access.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// RAM records.
    #[error(transparent)]
    Records(#[from] RamRecordError),
    /// The two sides' machines differ.
    #[error("configuration mismatch: {0}")]
    Config(String),
    /// The VMM could not stop, save, load or resume the machine.
    #[error("machine")]
    Machine(#[source] MachineError),
    /// An `exec:` migration command failed.
    #[error("exec command")]
    Exec(#[source] transport::ExecError),
    /// The destination reported a failure.
    #[error("destination failed: {0}")]
    Destination(String),
    /// Postcopy ([`crate::postcopy::PostcopyError`]).
    #[error(transparent)]
    Postcopy(EngineError),
    /// COLO ([`crate::colo::ColoError`]).
    #[error(transparent)]
    Colo(EngineError),
    /// The peer went away (with what the reader saw, if anything).
    #[error("connection to the {0} was lost")]
    PeerLost(&'static str, #[source] Option<StreamError>),
    /// The peer is alive (keepalives come) but did not answer in time.
    #[error("the {0} did not answer within {1:?}")]
    NoAnswer(&'static str, std::time::Duration),
    /// Cancelled by the user.
    #[error("migration cancelled")]
    Cancelled,
}

impl MigrationError {
    /// A failure of the connection itself (reset, closed, cut short, the
    /// peer silent for the peer timeout), as opposed to a stream that was
    /// wrong or a side that refused: what a paused postcopy can recover
    /// from on a new connection.
    pub fn is_link_failure(&self) -> bool {
        match self {
            Self::Stream(StreamError::Io { .. } | StreamError::Truncated { .. })
            | Self::Records(RamRecordError::Stream(
                StreamError::Io { .. } | StreamError::Truncated { .. },
            ))
            | Self::PeerLost(..)
            | Self::NoAnswer(..) => true,
            Self::Postcopy(e) => {
                // PostcopyError::Preempt wraps the preempt channel's error.
                let mut cur = e.source();
                while let Some(c) = cur {
                    if let Some(m) = c.downcast_ref::<MigrationError>() {
                        return m.is_link_failure();
                    }
                    if let Some(m) = c.downcast_ref::<Box<MigrationError>>() {
                        return m.is_link_failure();
                    }
                    cur = c.source();
                }
                false
            }
            _ => false,
        }
    }
}

/// What the VMM behind a [`Machine`] or [`IncomingMachine`] could not do.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The VMM no longer answers (it is shutting down).
    #[error("the VMM is shutting down")]
    Gone,
    /// This machine cannot do it at all.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The VMM's own error, shown as it is (its type is the VMM's).
    #[error(transparent)]
    Vmm(Box<dyn std::error::Error + Send + Sync>),
}

impl MachineError {
    /// Wrap a VMM error.
    pub fn vmm(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Vmm(Box::new(e))
    }
}

/// What both sides must agree on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Machine type.
    pub machine: String,
    /// vCPU count.
    pub vcpus: u32,
    /// CPU model name.
    pub cpu: String,
    /// RAM blocks.
    pub blocks: Vec<RamBlock>,
    /// Page size.
    pub page_size: u32,
}

impl MachineConfig {
    /// Explain how `other` (the source's) differs from `self` (ours).
    pub fn check_source(&self, src: &MachineConfig) -> Result<(), String> {
        if src.machine != self.machine {
            return Err(format!(
                "source machine '{}', destination '{}'",
                src.machine, self.machine
            ));
        }
        if src.page_size != self.page_size {
            return Err(format!(
                "source page size {}, destination {}",
                src.page_size, self.page_size
            ));
        }
        if src.vcpus != self.vcpus {
            return Err(format!(
                "source has {} vCPUs, destination {} (-smp)",
                src.vcpus, self.vcpus
            ));
        }
        if src.cpu != self.cpu {
            return Err(format!(
                "source CPU model '{}', destination '{}' (-cpu)",
                src.cpu, self.cpu
            ));
        }
        let total = |c: &MachineConfig| c.blocks.iter().map(|b| b.size).sum::<u64>();
        if src.blocks != self.blocks {
            return Err(format!(
                "source memory {} MiB in blocks {:?}, destination {} MiB in {:?} (-m, -machine max-ram-below-4g)",
                total(src) >> 20,
                src.blocks.iter().map(|b| (&b.name, b.size)).collect::<Vec<_>>(),
                total(self) >> 20,
                self.blocks.iter().map(|b| (&b.name, b.size)).collect::<Vec<_>>()
            ));
        }
        Ok(())
    }
}

/// A stopped machine, as [`Machine::stop`] leaves it.
pub struct Stopped {
    /// Every device's state at the stop.
    pub devices: Vec<DeviceBlob>,
}

/// The source VMM's side of the machine.
pub trait Machine: Send {
    /// Stop the vCPUs (for the final round, a switch to postcopy or a COLO
    /// checkpoint) and save the state of every device, vCPUs included, as
    /// of that instant: one request, so each vCPU reads its state as it
    /// parks instead of being woken again for it.
    fn stop(&mut self) -> Result<Stopped, MachineError>;
    /// Run the vCPUs again after a failed migration.
    fn resume(&mut self) -> Result<(), MachineError>;
    /// dirty-limit: every vCPU may dirty at most `mib_s` MiB/s, measured
    /// over `period`. The VMM lifts it when the migration leaves `active`.
    fn dirty_limit(&mut self, _mib_s: u64, _period: Duration) -> Result<(), MachineError> {
        Err(MachineError::Unsupported(
            "this machine cannot limit its dirty rate (dirty-limit)",
        ))
    }
    /// auto-converge: throttle the running vCPUs to `pct` % (0: off). The
    /// VMM lifts the throttle when the migration leaves `active`.
    fn throttle(&mut self, _pct: u8) -> Result<(), MachineError> {
        Err(MachineError::Unsupported(
            "this machine cannot throttle its vCPUs (auto-converge)",
        ))
    }
    /// COLO: the gate the guest's console output passes (held, compared
    /// with the secondary's; [`crate::output`]). `None`: this machine
    /// cannot hold its output, and COLO is refused.
    fn output(&mut self) -> Option<crate::output::OutputGate> {
        None
    }
}

/// The destination VMM's side of the machine.
pub trait IncomingMachine: Send {
    /// Load all device state (the VM is stopped; in postcopy RAM is still
    /// arriving) and start the guest unless it is to stay paused.
    fn load_devices(&mut self, blobs: Vec<DeviceBlob>) -> Result<(), MachineError>;
    /// Guest-physical addresses of the guest pages that loading `blobs`
    /// writes by itself (paravirtual areas named in vCPU state, which KVM
    /// writes as the state is set): a postcopy destination brings them in
    /// before [`IncomingMachine::load_devices`]. A guess from blobs that
    /// do not decode is harmless (the load reports them).
    fn pages_written_on_load(&mut self, _blobs: &[DeviceBlob]) -> Vec<u64> {
        Vec::new()
    }
    /// The device sections this machine's state is made of, with the
    /// longest state each may have: an incoming stream may send nothing
    /// else ([`crate::stream::DeviceCatalog`]).
    fn device_catalog(&mut self) -> crate::stream::DeviceCatalog;
    /// This side's capabilities now (asked at POSTCOPY_ADVISE, ENABLE_COLO).
    fn capabilities(&mut self) -> Capabilities {
        Capabilities::default()
    }
    /// COLO secondary: take a complete checkpoint's device state, checked
    /// now. `restore`: load it into the (paused) guest now, as a running
    /// secondary does; otherwise the machine may keep it and load it at
    /// takeover, since the guest does not run before.
    fn colo_load(&mut self, _blobs: Vec<DeviceBlob>, _restore: bool) -> Result<(), MachineError> {
        Err(MachineError::Unsupported(
            "COLO is not supported by this machine",
        ))
    }
    /// COLO running secondary: stop the guest for a checkpoint (run state
    /// `colo`).
    fn colo_pause(&mut self) -> Result<(), MachineError> {
        Err(MachineError::Unsupported(
            "COLO is not supported by this machine",
        ))
    }
    /// COLO running secondary: run the guest (after a checkpoint, or from
    /// the first state).
    fn colo_resume(&mut self) -> Result<(), MachineError> {
        Err(MachineError::Unsupported(
            "COLO is not supported by this machine",
        ))
    }
    /// COLO secondary failover: the guest runs here alone. `rollback`: from
    /// the last checkpoint's kept state (periodic mode); otherwise the
    /// guest goes on from where it is (running secondary).
    fn colo_takeover(&mut self, _rollback: bool) -> Result<(), MachineError> {
        Err(MachineError::Unsupported(
            "COLO is not supported by this machine",
        ))
    }
    /// COLO: the gate the guest's console output passes (forwarded to the
    /// primary by a running secondary).
    fn output(&mut self) -> Option<crate::output::OutputGate> {
        None
    }
    /// Postcopy failed after the switch: stop the guest for good (its RAM
    /// is incomplete) and say why.
    fn abandon(&mut self, _why: &str) {}
    /// The vCPU threads' ids, in vCPU order (`postcopy-blocktime`).
    fn vcpu_threads(&mut self) -> Result<Vec<i32>, MachineError> {
        Err(MachineError::Unsupported(
            "this machine cannot name its vCPU threads (postcopy-blocktime)",
        ))
    }
}

/// What the engine tells the VMM as it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// New status.
    Status(Status),
    /// A dirty-log sync (QEMU's MIGRATION_PASS), counting from 1.
    Pass(u64),
    /// COLO ended on this side (QEMU's COLO_EXIT).
    ColoExit(ExitReason),
}

/// Callback for [`Event`]s.
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// Why COLO ended (QEMU's COLOExitReason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// `x-colo-lost-heartbeat`.
    Request,
    /// An error ended it.
    Error,
}

impl ExitReason {
    /// QMP name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Error => "error",
        }
    }
}

/// The destination's side as the engines after the precopy loader see it
/// (postcopy's switch, the COLO secondary): borrowed from
/// [`crate::Incoming`].
pub(crate) struct Destination<'a> {
    /// Guest RAM.
    pub ram: &'a Arc<dyn GuestRam>,
    /// Loads device state.
    pub machine: &'a mut dyn IncomingMachine,
    /// Status.
    pub shared: &'a Arc<Shared>,
    /// Events.
    pub events: &'a EventSink,
}

/// Report status `s` (once: nothing if it is the status already).
pub(crate) fn set_status(shared: &Shared, events: &EventSink, s: Status) {
    {
        let mut i = shared.lock_info();
        if i.status == s {
            return;
        }
        i.status = s;
    }
    events(Event::Status(s));
}

/// Fresh statistics for a migration starting now, already in `status`
/// (never `none` in between: query-migrate would then show the VM's
/// previous migration), and its event.
pub(crate) fn begin_info(shared: &Shared, events: &EventSink, ram: &dyn GuestRam, status: Status) {
    {
        let mut i = shared.lock_info();
        *i = crate::status::Info {
            started: Some(Instant::now()),
            status,
            ..Default::default()
        };
        i.ram.total = ram.blocks().iter().map(|b| b.size).sum();
    }
    events(Event::Status(status));
}

/// `e` and its sources on one line, joined with ": " (for `error-desc`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

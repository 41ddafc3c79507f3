//! QMP (the QEMU Machine Protocol) for minivmm.
//!
//! This crate owns everything between a QMP client's socket and the VMM's
//! command execution:
//!
//! * [`protocol`]: the wire format: greeting, requests, replies, errors,
//!   events (one ASCII JSON object + CRLF per message);
//! * [`framing`]: cutting a byte stream into JSON values;
//! * [`schema`]: the commands as typed values, argument checks with QEMU's
//!   error wording, [`schema::COMMAND_NAMES`];
//! * [`listen`]: `-qmp` socket specifications;
//! * [`server`]: listeners and connections on the VMM's `mio::Poll`,
//!   capability negotiation, dispatch to a [`Handler`], event broadcast;
//! * [`client`]: a blocking client for tests and benchmarks.
//!
//! A session, as QEMU's `docs/interop/qmp-spec.rst` describes it:
//!
//! ```text
//! S: {"QMP": {"version": {...}, "capabilities": []}}
//! C: {"execute": "qmp_capabilities"}
//! S: {"return": {}}
//! C: {"execute": "query-status", "id": 1}
//! S: {"return": {"running": true, "status": "running"}, "id": 1}
//! S: {"event": "STOP", "timestamp": {"seconds": 1700000000, "microseconds": 12}}
//! ```
//!
//! Wiring into the VMM's control loop:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use qmp::{Command, ListenSpec, QmpError, Server};
//! let mut poll = mio::Poll::new()?;
//! let mut server = Server::new(poll.registry(), 100)?; // tokens 100.. are QMP's
//! server.listen(&ListenSpec::parse("unix:/tmp/qmp.sock,server=on,wait=off")?)?;
//! let mut handler = |cmd: Command| -> Result<serde_json::Value, QmpError> {
//!     match cmd {
//!         Command::QueryStatus => Ok(serde_json::json!({"running": true, "status": "running"})),
//!         other => Err(QmpError::generic(format!("{} is not implemented", other.name()))),
//!     }
//! };
//! let mut events = mio::Events::with_capacity(64);
//! loop {
//!     poll.poll(&mut events, None)?;
//!     for event in events.iter() {
//!         if server.owns(event.token()) {
//!             server.handle_event(event, &mut handler);
//!         }
//!     }
//! }
//! # }
//! ```

pub mod client;
pub mod framing;
pub mod listen;
pub mod protocol;
pub mod schema;
pub mod server;

pub use client::{Client, ClientError};
pub use listen::{ListenSpec, ListenSpecError};
pub use protocol::{ErrorClass, Event, QmpError, VersionInfo};
pub use schema::{
    Command, DirtyRateMode, MigrationCapability, MigrationStatus, TimeUnit, COMMAND_NAMES,
};
pub use server::{BoundAddr, EventSender, Handler, MonitorMode, Server, ServerError};

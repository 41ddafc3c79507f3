//! Live migration engines for minivmm, free of KVM code.
//!
//! Guest RAM is seen through [`ram::GuestRam`] (pages to read, write and
//! track) and the rest of the machine as opaque device blobs through
//! [`Machine`] and [`IncomingMachine`]; the VMM implements those traits.
//! The crate owns the stream format ([`stream`]), the transports
//! ([`transport`]), the status and statistics QMP reports ([`status`]) and
//! the engines ([`precopy`], [`postcopy`], [`colo`]).
//!
//! Modules in layers, each importing only from the layers below it:
//!
//! ```text
//! session                        Outgoing, Incoming, run_outgoing, run_incoming:
//!                                the connection, the commands, the dispatch
//! precopy   postcopy   colo      the engines (never each other)
//! return_path                    source's ReturnPath, destination's RpWriter
//! machine                        Machine, IncomingMachine, Event, MigrationError
//! ram   status   sched   output  RAM records and sections, QMP status, scheduling,
//!                                the console output COLO holds and compares
//! stream   transport             the wire format, the connections
//! ```

pub mod colo;
pub mod confine;
pub mod machine;
pub mod output;
pub mod postcopy;
pub mod precopy;
pub mod ram;
pub mod return_path;
pub mod sched;
pub mod session;
pub mod status;
pub mod stream;
pub mod tls;
pub mod transport;

pub use machine::{
    error_chain, Event, EventSink, ExitReason, IncomingMachine, Machine, MachineConfig,
    MachineError, MigrationError, Stopped,
};
pub use sched::{fault_path_thread, normal_priority, prefer_this_thread, RealTimeSection};
pub use session::{accept_and_run_incoming, run_incoming, run_outgoing, Incoming, Outgoing};

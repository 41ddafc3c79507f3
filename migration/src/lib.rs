//! Live migration engines for minivmm, free of KVM code.
//!
//! Guest RAM is seen through [`ram::GuestRam`] (pages to read, write and
//! track) and the rest of the machine as opaque device blobs through
//! [`precopy::Machine`] and [`precopy::IncomingMachine`]; the VMM implements
//! those traits. The crate owns the stream format ([`stream`]), the
//! transports ([`transport`]), the status and statistics QMP reports
//! ([`status`]) and the engines ([`precopy`], [`postcopy`], [`colo`]).

pub mod colo;
pub mod postcopy;
pub mod precopy;
pub mod ram;
pub mod status;
pub mod stream;
pub mod transport;

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

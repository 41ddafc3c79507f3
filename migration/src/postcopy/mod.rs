//! Postcopy: the destination runs the guest before all of its RAM has
//! arrived, and fetches the pages it touches on demand.
//!
//! This module owns both halves of the switch and of the phase after it:
//! the source's discard set, package and request-driven page sender, and the
//! destination's userfaultfd, page states (missing, requested, received),
//! fault thread and listen thread. The session ([`crate::session`]) runs
//! precopy's rounds before the switch and calls in here.
//!
//! Modules: `source` (the source's half), `dest` (the destination's
//! page states and threads), `switch` (the destination's preempt channel
//! and package), `dropper` (dropping pages); this one holds what they
//! share: the limits and [`PostcopyError`].
//!
//! ```text
//! source                                         destination
//! header, CONFIGURATION, OPEN_RETURN_PATH
//! POSTCOPY_ADVISE (be64 page size, be64 page size)
//! PING 1                                  ---->  capability set? userfaultfd usable?
//!                                         <----  PONG 1          (or ERROR_DESC + SHUT 1)
//! START, PART ... (precopy rounds; the destination notes every page it receives)
//! ---- migrate-start-postcopy: the round ends, the dirty log is synced ----
//! POSTCOPY_RAM_DISCARD ...                ---->  pages sent before and dirty now are
//!                                                dropped (MADV_DONTNEED), no longer received
//! PING 5                                  <----  PONG 5 (the guest ran on the source meanwhile;
//!                                                the destination runs real-time until RUN)
//! ---- source stops the guest, syncs the dirty log ----
//! POSTCOPY_RAM_DISCARD ...                ---->  the same, for pages dirtied since PING 5
//! PACKAGED (be32 n) + n bytes:
//!   LISTEN                                       every missing page dropped, RAM registered
//!                                                with userfaultfd, fault + listen threads run
//!   FULL ... (device state)
//!   RUN                                   <----  REQ_PAGES for the pages loading the
//!                                                devices writes (kvmclock areas), if
//!                                                missing; then devices loaded, guest started
//!   PING 2                                <----  PONG 2          (end of the downtime)
//!   EOF
//! PART ... requested pages first, then the background scan
//!                                         <----  REQ_PAGES_ID / REQ_PAGES (be64 offset,
//!                                                be32 length[, u8 len, block name])
//! END, EOF                                ---->  every page received: userfaultfd released
//!                                         <----  SHUT 0
//! ```
//!
//! Each page crosses the wire once after the switch: the source clears a
//! page's dirty bit when it queues it, and ignores requests for pages it no
//! longer holds as dirty (they are already on their way). The destination
//! places each page once with `UFFDIO_COPY`/`UFFDIO_ZEROPAGE`, which also wakes
//! any vCPU (or VMM thread) waiting on it.
//!
//! With `postcopy-preempt`, a second connection (the preempt channel,
//! opened after the advise and announced with POSTCOPY_PREEMPT + PING 4)
//! carries the page requests (destination's fault thread to the source's
//! urgent thread) and the requested pages (urgent thread to the
//! destination's preempt thread); the main stream carries only the
//! background pages. Both senders take a page by clearing its bit in one
//! shared atomic dirty set. When the background has taken every page, the
//! source shuts the channel's reading side, the urgent thread ends the
//! channel with EOF, and only then does END go on the main stream.
//!
//! Once the package is sent, the guest exists on the destination only. If
//! the connection breaks then (a reset, a side silent for `x-peer-timeout`,
//! EOF, `migrate-pause`), also while RUN waits for its pages, both sides
//! enter `postcopy-paused` ([`Pause`]): the
//! source keeps its copy stopped and every page not yet sent; the
//! destination's guest runs on, a vCPU that faults on a missing page waits,
//! and its request is kept. A stream that was wrong (a bad CRC, a protocol
//! error) or a side that refused still fails the migration for good.
//!
//! ```text
//! destination: migrate-recover uri=URI (listens)   source: migrate uri=URI resume=true
//! header, OPEN_RETURN_PATH                ---->  the return path moves to this connection
//! POSTCOPY_RECV_BITMAP                    ---->  postcopy-recover on both sides
//!                                         <----  RECV_BITMAP (block, first page, bits) ...
//!                                         <----  RESUME_ACK (be32 blocks)
//! source: to send = every page the destination lacks (final: the guest is stopped)
//! [postcopy-preempt: connect the preempt channel again]
//! POSTCOPY_PREEMPT, PING 4                ---->  accepted on the recovery listener
//!                                         <----  PONG 4
//! POSTCOPY_RESUME                         ---->  a new listen thread reads this stream
//!                                         <----  REQ_PAGES_ID for every pending fault
//! PART ... END, EOF (as above)            ---->  postcopy-active ... completed
//!                                         <----  SHUT 0
//! ```
//!
//! Pages of a section cut off by the break were never placed (a section is
//! placed only once its CRC checked), so the bitmap asks for them again and
//! no page is placed twice. A failure during the handshake or after it
//! pauses again; recovery can be tried any number of times. With
//! `x-postcopy-auto-recover`, the same handshake runs without a command:
//! the source connects to the original URI, the destination accepts on
//! the listener of the migration. Requests
//! pending at POSTCOPY_RESUME go on the return path, later ones on the
//! reopened preempt channel.

mod blocktime;
mod dest;
mod dropper;
mod source;
mod switch;

use std::time::Instant;

use crate::machine::{set_status, EventSink, MigrationError};
use crate::status::{Shared, Status};

/// A postcopy paused by a broken connection, on either side: the status,
/// the reason in `error-desc`, and the time paused (`query-migrate`'s
/// `x-postcopy-paused-ms`, with `x-postcopy-recoveries`).
pub(crate) struct Pause {
    since: Instant,
}

impl Pause {
    /// The connection broke (`cause`): shut what is left of it and report
    /// `postcopy-paused`.
    pub(crate) fn begin(shared: &Shared, events: &EventSink, cause: &MigrationError) -> Self {
        let p = Self {
            since: Instant::now(),
        };
        p.again(shared, events, cause);
        p
    }

    /// A recovery attempt failed (`e`): paused again.
    pub(crate) fn again(&self, shared: &Shared, events: &EventSink, e: &MigrationError) {
        shared.close_channel();
        let desc = if shared.take_paused_by_user() {
            "paused by migrate-pause".to_string()
        } else {
            crate::machine::error_chain(e)
        };
        log::warn!(
            "postcopy paused: {desc}; recover with migrate-recover on the destination, \
             then migrate with resume=true on the source"
        );
        shared.lock_info().error_desc = Some(desc);
        set_status(shared, events, Status::PostcopyPaused);
    }

    /// Recovered: back to `postcopy-active`, the pause counted.
    pub(crate) fn end(self, shared: &Shared, events: &EventSink) {
        let ms = self.since.elapsed().as_millis() as u64;
        shared.take_paused_by_user();
        {
            let mut i = shared.lock_info();
            i.error_desc = None;
            let add = |v: Option<&serde_json::Value>, n: u64| {
                serde_json::json!(v.and_then(serde_json::Value::as_u64).unwrap_or(0) + n)
            };
            let total = add(i.extra.get("x-postcopy-paused-ms"), ms);
            let count = add(i.extra.get("x-postcopy-recoveries"), 1);
            i.extra.insert("x-postcopy-paused-ms".into(), total);
            i.extra.insert("x-postcopy-recoveries".into(), count);
        }
        set_status(shared, events, Status::PostcopyActive);
    }
}

pub use dest::DestPostcopy;
pub(crate) use source::{
    advise_source, connect_preempt, discard_before_stop, run_source, Preempt, SourcePhase,
};
pub(crate) use switch::{accept_preempt, dest_package, PreemptIn};

/// Pages per RAM section after the switch: small (64 KiB), because a
/// requested page waits for the open background section to be finished
/// and, on the destination, checked before anything after it is placed.
const POSTCOPY_SECTION_PAGES: u64 = 16;
/// Socket buffer size after the switch: data in flight ahead of a
/// requested page delays it (at ~1 GB/s, 64 KiB is ~60 µs).
pub const SOCKET_BUFFER: i32 = 64 << 10;
/// Largest page request the source serves (bytes).
const MAX_REQUEST: u32 = 1 << 20;
/// Largest PACKAGED payload we accept.
pub const MAX_PACKAGE: u32 = 64 << 20;
/// Environment variable that makes the destination's userfaultfd check fail
/// (for tests of the advise error path).
pub const NO_UFFD_ENV: &str = "MINIVMM_TEST_NO_USERFAULTFD";

/// Postcopy-specific failures.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// userfaultfd cannot be used here.
    #[error("userfaultfd is unavailable: {0}")]
    NoUserfaultfd(String),
    /// A userfaultfd operation failed.
    #[error("userfaultfd {what} failed at {addr:#x}")]
    Uffd {
        /// The operation.
        what: &'static str,
        /// Host address.
        addr: usize,
        /// Why.
        #[source]
        source: userfaultfd::Error,
    },
    /// madvise failed.
    #[error("dropping pages at {addr:#x} (+{len:#x}) failed")]
    Discard {
        /// Host address.
        addr: usize,
        /// Length.
        len: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The destination refused postcopy.
    #[error("{0}")]
    Refused(String),
    /// A protocol violation.
    #[error("{0}")]
    Protocol(String),
    /// The preempt channel failed (offsets count on that channel).
    #[error("postcopy preempt channel")]
    Preempt(#[source] Box<MigrationError>),
}

impl From<PostcopyError> for MigrationError {
    fn from(e: PostcopyError) -> Self {
        MigrationError::Postcopy(Box::new(e))
    }
}

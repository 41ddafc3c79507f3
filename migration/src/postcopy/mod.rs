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
//!   RUN                                          devices loaded, guest started
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
//! After RUN, the guest exists on the destination only: if the connection
//! breaks, the source keeps its copy stopped (resuming it would fork the
//! guest) and the destination stops its vCPUs instead of letting them wait
//! on a page that can never arrive.

mod dest;
mod dropper;
mod source;
mod switch;

pub use dest::DestPostcopy;
pub(crate) use source::{
    advise_source, connect_preempt, discard_before_stop, run_source, Preempt, SourcePhase,
};
pub(crate) use switch::{accept_preempt, dest_package, PreemptIn};

use crate::machine::MigrationError;

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

//! Postcopy: the destination runs the guest before all of its RAM has
//! arrived, and fetches the pages it touches on demand.
//!
//! This module owns both halves of the switch and of the phase after it:
//! the source's discard set, package and request-driven page sender, and the
//! destination's userfaultfd, page states (missing, requested, received),
//! fault thread and listen thread. The precopy engine ([`crate::precopy`])
//! runs the rounds before the switch and calls in here.
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

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::TryRecvError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use userfaultfd::{Event as UffdEvent, IoctlFlags, Uffd, UffdBuilder};

use crate::precopy::{
    begin_ram_section, end_ram_section, rp_error, set_status, EventSink, MigrationError,
    RpReceiver, Throttle, RAM_SECTION_ID,
};
use crate::ram::{
    AtomicBitmap, Bitmap, GuestRam, PagePlacer, RamError, RamReader, RamRecordError, RamWriter,
    StagingPlacer,
};
use crate::status::{Parameters, Shared, Status};
use crate::stream::{
    self, cmd, ping, rp, section, BufSink, Reader, Sink, StreamError, Writer, PAGE_SIZE,
};
use crate::transport::{Closer, Listener, Uri};

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

// ---------------------------------------------------------------- source

/// Source: send POSTCOPY_ADVISE and wait until the destination accepted it.
pub(crate) fn advise_source<W: Sink>(
    w: &mut Writer<W>,
    rx: &RpReceiver,
    last_desc: &mut Option<String>,
) -> Result<(), MigrationError> {
    let mut data = Vec::with_capacity(16);
    data.extend_from_slice(&(PAGE_SIZE as u64).to_be_bytes());
    data.extend_from_slice(&(PAGE_SIZE as u64).to_be_bytes());
    w.command(cmd::POSTCOPY_ADVISE, &data)?;
    crate::precopy::ping_and_wait(w, rx, last_desc, ping::ADVISE)
}

/// What the source's postcopy phase needs from the precopy engine.
pub(crate) struct SourcePhase<'a, W: Sink> {
    /// The main stream.
    pub w: &'a mut Writer<W>,
    /// RAM record state.
    pub rw: &'a mut RamWriter,
    /// Guest RAM.
    pub ram: &'a dyn GuestRam,
    /// Pages still to send (synced with the dirty log after the stop).
    pub dirty: &'a mut [Bitmap],
    /// Pages sent during the rounds and not discarded before the stop.
    pub sent: &'a [Bitmap],
    /// Return-path messages.
    pub rx: &'a RpReceiver,
    /// Status.
    pub shared: &'a Arc<Shared>,
    /// Events.
    pub events: &'a EventSink,
    /// Parameters.
    pub params: &'a Parameters,
    /// Destination error text seen on the return path.
    pub last_desc: &'a mut Option<String>,
    /// When the guest was stopped.
    pub stop_start: Instant,
    /// The preempt channel, if `postcopy-preempt` is on.
    pub preempt: Option<Preempt>,
    /// The destination acknowledged RUN.
    pub running: bool,
}

/// Source: the pages sent before and dirty since (`dirty` AND `sent`), as
/// POSTCOPY_RAM_DISCARD commands. Returns how many pages.
fn send_discards<W: Sink>(
    w: &mut Writer<W>,
    ram: &dyn GuestRam,
    dirty: &[Bitmap],
    sent: &[Bitmap],
) -> Result<u64, MigrationError> {
    let mut total = 0;
    for (b, (dirty, sent)) in dirty.iter().zip(sent).enumerate() {
        let mut both = dirty.clone();
        both.and_with(sent);
        let ranges = both.ranges();
        let name = &ram.blocks()[b].name;
        let name_len = u8::try_from(name.len()).map_err(|_| {
            StreamError::invalid(w.offset(), format!("block name '{name}' over 255 bytes"))
        })?;
        for chunk in ranges.chunks(2048) {
            let mut data = vec![0u8, name_len];
            data.extend_from_slice(name.as_bytes());
            for &(start, len) in chunk {
                data.extend_from_slice(&(start * PAGE_SIZE as u64).to_be_bytes());
                data.extend_from_slice(&(len * PAGE_SIZE as u64).to_be_bytes());
                total += len;
            }
            w.command(cmd::POSTCOPY_RAM_DISCARD, &data)?;
        }
    }
    Ok(total)
}

/// Source, still running the guest once `migrate-start-postcopy` came:
/// discard what the destination holds of the pages dirty now, and wait
/// (PING 5) until it has dropped them. Dropping pages is slow work (on the
/// test host ~0.3 us a page: the 4000 pages of the benchmark's discard set
/// took 1-2 ms), and done here it is not downtime: the discard at the
/// stop then holds only the pages dirtied in between. The dirty pages no
/// longer count as `sent` (the destination holds none of them now).
pub(crate) fn discard_before_stop<W: Sink>(
    w: &mut Writer<W>,
    ram: &dyn GuestRam,
    dirty: &[Bitmap],
    sent: &mut [Bitmap],
    rx: &RpReceiver,
    last_desc: &mut Option<String>,
) -> Result<(), MigrationError> {
    send_discards(w, ram, dirty, sent)?;
    for (s, d) in sent.iter_mut().zip(dirty) {
        s.and_not(d);
    }
    crate::precopy::ping_and_wait(w, rx, last_desc, ping::SWITCH)
}

/// Source: the device package (LISTEN, device sections, RUN, PING 2, EOF).
fn send_package<W: Sink>(
    w: &mut Writer<W>,
    devices: &[stream::DeviceBlob],
) -> Result<(), MigrationError> {
    let mut pw = Writer::new(Vec::new());
    pw.command(cmd::POSTCOPY_LISTEN, &[])?;
    for (i, d) in devices.iter().enumerate() {
        stream::write_device(&mut pw, RAM_SECTION_ID + 1 + i as u32, d)?;
    }
    pw.command(cmd::POSTCOPY_RUN, &[])?;
    pw.command(cmd::PING, &ping::RUNNING.to_be_bytes())?;
    pw.u8(section::EOF)?;
    let pkg = std::mem::take(pw.get_mut());
    let len = u32::try_from(pkg.len())
        .ok()
        .filter(|&l| l <= MAX_PACKAGE)
        .ok_or_else(|| StreamError::invalid(w.offset(), "device package over 64 MiB"))?;
    w.command(cmd::PACKAGED, &len.to_be_bytes())?;
    w.bytes(&pkg)?;
    w.flush()?;
    Ok(())
}

/// Parse a page request: `(block, first page, pages)`.
fn parse_request(
    kind: u16,
    d: &[u8],
    ram: &dyn GuestRam,
    last_block: &mut Option<usize>,
) -> Result<(usize, u64, u64), PostcopyError> {
    let bad = |why: &str| PostcopyError::Protocol(format!("bad page request: {why}"));
    if d.len() < 12 {
        return Err(bad("shorter than 12 bytes"));
    }
    let start = u64::from_be_bytes(d[0..8].try_into().map_err(|_| bad("offset"))?);
    let len = u32::from_be_bytes(d[8..12].try_into().map_err(|_| bad("length"))?);
    let block = if kind == rp::REQ_PAGES_ID {
        let n = *d.get(12).ok_or_else(|| bad("missing block name"))? as usize;
        let name = d
            .get(13..13 + n)
            .ok_or_else(|| bad("block name cut short"))?;
        let b = ram
            .blocks()
            .iter()
            .position(|b| b.name.as_bytes() == name)
            .ok_or_else(|| {
                bad(&format!(
                    "unknown block '{}'",
                    String::from_utf8_lossy(name)
                ))
            })?;
        *last_block = Some(b);
        b
    } else {
        last_block.ok_or_else(|| bad("REQ_PAGES before any REQ_PAGES_ID"))?
    };
    let ps = PAGE_SIZE as u64;
    let pages = ram.blocks()[block].pages();
    if !start.is_multiple_of(ps)
        || len == 0
        || len > MAX_REQUEST
        || start / ps + u64::from(len).div_ceil(ps) > pages
    {
        return Err(bad(&format!(
            "range {start:#x}+{len:#x} outside block {block}"
        )));
    }
    Ok((block, start / ps, u64::from(len).div_ceil(ps)))
}

/// The source's end of the postcopy preempt channel: a second connection
/// of its own for page requests (destination to source) and the requested
/// pages (source to destination), so that neither waits behind the
/// background stream or for the main socket (QEMU's `postcopy-preempt`
/// carries only the pages on it).
pub(crate) struct Preempt {
    /// Pages out (offsets count from the channel's first byte).
    pub w: Writer<BufSink<Box<dyn Write + Send>>>,
    /// Requests in.
    pub r: Reader<std::io::BufReader<Box<dyn Read + Send>>>,
    /// Shuts it down.
    pub closer: Closer,
}

/// Source, at the start when `postcopy-preempt` is on: connect the second
/// channel, identify it, and have the destination accept it (PING 4).
pub(crate) fn connect_preempt<W: Sink>(
    uri: &Uri,
    w: &mut Writer<W>,
    rx: &RpReceiver,
    last_desc: &mut Option<String>,
) -> Result<Preempt, MigrationError> {
    let mut chan = crate::transport::connect(uri)?;
    let writer = std::mem::replace(&mut chan.writer, Box::new(std::io::sink()));
    let reader: Box<dyn Read + Send> =
        std::mem::replace(&mut chan.reader, Box::new(std::io::empty()));
    let mut pw = Writer::new(BufSink::with_capacity(256 << 10, writer));
    pw.be32(stream::PREEMPT_MAGIC)?;
    pw.be32(stream::PREEMPT_VERSION)?;
    pw.flush()?;
    w.command(cmd::POSTCOPY_PREEMPT, &[])?;
    crate::precopy::ping_and_wait(w, rx, last_desc, ping::PREEMPT)?;
    Ok(Preempt {
        w: pw,
        r: Reader::new(std::io::BufReader::new(reader)),
        closer: chan.closer,
    })
}

/// The destination's end of the preempt channel, accepted and checked.
pub(crate) struct PreemptIn {
    r: Reader<std::io::BufReader<Box<dyn Read + Send>>>,
    w: Box<dyn Write + Send>,
    closer: Closer,
}

/// How long the destination waits for the preempt connection the source
/// announced (it connects before announcing it).
const PREEMPT_ACCEPT: Duration = Duration::from_secs(10);

/// Destination, at POSTCOPY_PREEMPT: accept the second connection and check
/// that it starts as a preempt channel.
pub(crate) fn accept_preempt(l: &Listener) -> Result<PreemptIn, MigrationError> {
    let mut chan = l.accept_within(PREEMPT_ACCEPT)?;
    let reader: Box<dyn Read + Send> =
        std::mem::replace(&mut chan.reader, Box::new(std::io::empty()));
    let mut r = Reader::new(std::io::BufReader::with_capacity(256 << 10, reader));
    let check = |r: &mut Reader<_>| -> Result<(), StreamError> {
        let magic = r.be32("preempt channel magic")?;
        let version = r.be32("preempt channel version")?;
        if magic != stream::PREEMPT_MAGIC || version != stream::PREEMPT_VERSION {
            return Err(StreamError::invalid(
                0,
                format!(
                    "second connection starts {magic:#010x} {version}, not a preempt channel \
                     ({:#010x} {})",
                    stream::PREEMPT_MAGIC,
                    stream::PREEMPT_VERSION
                ),
            ));
        }
        Ok(())
    };
    check(&mut r).map_err(|e| PostcopyError::Preempt(Box::new(e.into())))?;
    Ok(PreemptIn {
        r,
        w: std::mem::replace(&mut chan.writer, Box::new(std::io::sink())),
        closer: chan.closer,
    })
}

/// Open a PART for the next page unless one is open (`in_section` pages).
fn open_part<W: Sink>(
    w: &mut Writer<W>,
    rw: &mut RamWriter,
    in_section: u64,
) -> Result<(), MigrationError> {
    if in_section == 0 {
        begin_ram_section(w, rw, section::PART)?;
    }
    Ok(())
}

/// Close the open PART, if any, and push it out: after the switch a
/// section is flushed as soon as it ends (a faulting vCPU may wait on it).
fn close_part<W: Sink>(
    w: &mut Writer<W>,
    rw: &mut RamWriter,
    in_section: &mut u64,
) -> Result<(), MigrationError> {
    if *in_section > 0 {
        end_ram_section(w, rw)?;
        w.flush()?;
        *in_section = 0;
    }
    Ok(())
}

/// What the urgent thread did.
#[derive(Default)]
struct UrgentDone {
    zero_pages: u64,
    normal_pages: u64,
    bytes: u64,
}

/// The page to continue the background scan from (`u64::MAX`: none new).
fn hint(block: usize, page: u64) -> u64 {
    ((block as u64) << 48) | page
}

/// The source's urgent thread: serves the page requests of the preempt
/// channel on it until `finishing` is set and the channel's reading side
/// is shut, then ends the channel with EOF. A page goes only if this
/// thread clears its dirty bit, so it never also goes in the background.
#[allow(clippy::too_many_arguments)]
fn urgent_loop(
    pr: &mut Reader<std::io::BufReader<Box<dyn Read + Send>>>,
    pw: &mut Writer<BufSink<Box<dyn Write + Send>>>,
    ram: &dyn GuestRam,
    dirty: &[AtomicBitmap],
    sent: &[Bitmap],
    next: &AtomicU64,
    count: &AtomicU64,
    finishing: &AtomicBool,
) -> Result<UrgentDone, MigrationError> {
    crate::fault_path_thread();
    let mut rw = RamWriter::new();
    let mut done = UrgentDone::default();
    let mut req_block = None;
    loop {
        let (k, d) = match stream::read_rp(pr) {
            Ok(m) => m,
            Err(_) if finishing.load(Ordering::SeqCst) => break,
            Err(e) => return Err(e.into()),
        };
        if k != rp::REQ_PAGES && k != rp::REQ_PAGES_ID {
            return Err(PostcopyError::Protocol(format!(
                "message type {k:#06x} on the preempt channel (only page requests)"
            ))
            .into());
        }
        let (b, first, n) = parse_request(k, &d, ram, &mut req_block)?;
        count.fetch_add(1, Ordering::Relaxed);
        let mut in_section = 0;
        for pg in first..first + n {
            if !dirty[b].test_and_clear(pg) {
                continue; // already on its way in the background stream
            }
            open_part(pw, &mut rw, in_section)?;
            rw.send_page(pw, ram, b, pg, !sent[b].get(pg))??;
            in_section += 1;
        }
        if in_section > 0 {
            close_part(pw, &mut rw, &mut in_section)?;
            next.store(hint(b, first + n), Ordering::Relaxed);
        }
    }
    pw.u8(section::EOF)?;
    pw.flush()?;
    done.zero_pages = rw.zero_pages;
    done.normal_pages = rw.normal_pages;
    done.bytes = pw.offset();
    Ok(done)
}

/// Source: after the rounds (guest stopped, dirty log synced), send the
/// discard set and the device package, then every remaining page,
/// requested ones first. `run_sent` is set once the destination may have
/// started the guest: from then on the source must not resume it.
///
/// Requested pages go on the preempt channel if there is one (its
/// requests read and served by the urgent thread), else on the main stream
/// between two background sections. Either way the page's bit in the
/// shared dirty set is cleared by exactly one sender.
pub(crate) fn run_source<W: Sink>(
    mut p: SourcePhase<'_, W>,
    devices: &[stream::DeviceBlob],
    run_sent: &AtomicBool,
) -> Result<(), MigrationError> {
    set_status(p.shared, p.events, Status::PostcopyActive);
    // The switch is downtime: nothing may delay it.
    let switch = crate::RealTimeSection::enter();
    send_discards(p.w, p.ram, p.dirty, p.sent)?;
    send_package(p.w, devices)?;
    let package_sent = p.stop_start.elapsed();
    drop(switch);
    crate::prefer_this_thread();
    // From here on, little may wait ahead of a requested page.
    if let Some(c) = &*p.shared.closer.lock().unwrap_or_else(|e| e.into_inner()) {
        c.limit_send_buffer(SOCKET_BUFFER);
    }
    // Where QEMU's postcopy `downtime` ends; minivmm's goes on until the
    // destination has loaded the devices and started the guest (PONG 2).
    p.shared.info().extra.insert(
        "x-postcopy-package-sent-ms".into(),
        json!(package_sent.as_secs_f64() * 1000.0),
    );
    run_sent.store(true, Ordering::SeqCst);
    let dirty: Vec<AtomicBitmap> = p.dirty.iter().map(AtomicBitmap::from).collect();
    let next = AtomicU64::new(u64::MAX);
    let requests = AtomicU64::new(0);
    let Some(mut preempt) = p.preempt.take() else {
        source_background(&mut p, &dirty, &next, &requests, POSTCOPY_SECTION_PAGES)?;
        return finish_source(&mut p, &requests);
    };
    // The background sender yields to the urgent path.
    crate::normal_priority();
    let finishing = AtomicBool::new(false);
    let (ram, sent) = (p.ram, p.sent);
    let main_closer = p
        .shared
        .closer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let Preempt {
        w: ref mut pw,
        r: ref mut pr,
        ref closer,
    } = preempt;
    std::thread::scope(|s| {
        let urgent = std::thread::Builder::new()
            .name("postcopy-urgent".into())
            .spawn_scoped(s, || {
                let r = urgent_loop(pr, pw, ram, &dirty, sent, &next, &requests, &finishing);
                // Failing before the background ended, this is the cause:
                // fail the background stream too, at once.
                let first = r.is_err() && !finishing.load(Ordering::SeqCst);
                if first {
                    if let Some(c) = &main_closer {
                        c.close();
                    }
                }
                (r, first)
            })
            .map_err(|e| PostcopyError::Protocol(format!("cannot start the urgent thread: {e}")))?;
        let bg = source_background(&mut p, &dirty, &next, &requests, POSTCOPY_SECTION_PAGES);
        // Every page is taken: end the urgent thread's wait for requests
        // (on failure it may be blocked writing: shut the channel).
        finishing.store(true, Ordering::SeqCst);
        if bg.is_ok() {
            closer.shutdown_read();
        } else {
            closer.close();
        }
        let (urgent, urgent_first) = urgent.join().unwrap_or_else(|_| {
            (
                Err(PostcopyError::Protocol("the urgent thread panicked".into()).into()),
                true,
            )
        });
        // Report the cause: a cancel or a background failure ends the
        // urgent thread with an error of its own.
        let done = match (urgent, bg) {
            (Ok(d), Ok(())) => d,
            (Err(e), Ok(())) | (Ok(_), Err(e)) => return Err(e),
            (Err(u), Err(b)) => return Err(if urgent_first { u } else { b }),
        };
        {
            let mut i = p.shared.info();
            i.ram.transferred += done.bytes;
            i.ram.duplicate += done.zero_pages;
            i.ram.normal += done.normal_pages;
            i.ram.postcopy_requests = requests.load(Ordering::Relaxed);
        }
        finish_source(&mut p, &requests)
    })
}

/// The background stream of the postcopy phase: every page still dirty,
/// from a cursor that follows the last request, in sections of
/// `section_pages`; requests that arrive on the main return-path queue
/// (no preempt channel) are served first, on this stream. END follows in
/// [`finish_source`], after the preempt channel has ended.
fn source_background<W: Sink>(
    p: &mut SourcePhase<'_, W>,
    dirty: &[AtomicBitmap],
    next: &AtomicU64,
    requests: &AtomicU64,
    section_pages: u64,
) -> Result<(), MigrationError> {
    let mut throttle = Throttle::new(p.params.max_postcopy_bandwidth);
    let nblocks = dirty.len();
    let mut cursor = (0usize, 0u64);
    let mut in_section = 0u64;
    let mut urgent: Vec<(usize, u64)> = Vec::new();
    let mut req_block = None;
    let mut sent_pages = 0u64;
    let total: u64 = dirty.iter().map(AtomicBitmap::count).sum();

    loop {
        if p.shared.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        // Requests and replies from the destination.
        loop {
            match p.rx.try_recv() {
                Ok(Ok((k @ (rp::REQ_PAGES | rp::REQ_PAGES_ID), d))) => {
                    let (b, first, n) = parse_request(k, &d, p.ram, &mut req_block)?;
                    requests.fetch_add(1, Ordering::Relaxed);
                    for pg in first..first + n {
                        if dirty[b].test_and_clear(pg) {
                            urgent.push((b, pg));
                        }
                    }
                }
                Ok(Ok((k, d))) => source_reply(p, k, &d)?,
                Ok(Err(_)) | Err(TryRecvError::Disconnected) => {
                    return Err(MigrationError::PeerLost("destination"))
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if !urgent.is_empty() {
            close_part(p.w, p.rw, &mut in_section)?;
            for &(b, pg) in &urgent {
                open_part(p.w, p.rw, in_section)?;
                p.rw.send_page(p.w, p.ram, b, pg, !p.sent[b].get(pg))??;
                in_section += 1;
                if in_section == section_pages {
                    close_part(p.w, p.rw, &mut in_section)?;
                }
            }
            sent_pages += urgent.len() as u64;
            let &(b, pg) = urgent.last().unwrap_or(&(0, 0));
            cursor = (b, pg + 1);
            urgent.clear();
            close_part(p.w, p.rw, &mut in_section)?;
            p.shared.info().ram.postcopy_requests = requests.load(Ordering::Relaxed);
            continue;
        }
        let h = next.swap(u64::MAX, Ordering::Relaxed);
        if h != u64::MAX {
            cursor = ((h >> 48) as usize, h & ((1 << 48) - 1));
        }
        // Background: the next dirty page from the cursor, wrapping around.
        let mut found = None;
        for k in 0..=nblocks {
            let b = (cursor.0 + k) % nblocks;
            let from = if k == 0 { cursor.1 } else { 0 };
            if let Some(pg) = dirty[b].next_set(from) {
                found = Some((b, pg));
                break;
            }
        }
        let Some((b, pg)) = found else { break };
        cursor = (b, pg + 1);
        if !dirty[b].test_and_clear(pg) {
            continue; // the urgent thread took it
        }
        open_part(p.w, p.rw, in_section)?;
        let before = p.w.offset();
        p.rw.send_page(p.w, p.ram, b, pg, !p.sent[b].get(pg))??;
        throttle.account(p.w.offset() - before);
        in_section += 1;
        sent_pages += 1;
        if in_section == section_pages {
            close_part(p.w, p.rw, &mut in_section)?;
        }
        if sent_pages.is_multiple_of(256) {
            let mut i = p.shared.info();
            i.ram.transferred = p.w.offset();
            i.ram.remaining = total.saturating_sub(sent_pages) * PAGE_SIZE as u64;
            i.ram.duplicate = p.rw.zero_pages;
            i.ram.normal = p.rw.normal_pages;
            i.ram.postcopy_requests = requests.load(Ordering::Relaxed);
        }
    }
    close_part(p.w, p.rw, &mut in_section)?;
    let mut i = p.shared.info();
    i.ram.transferred = p.w.offset();
    i.ram.remaining = 0;
    i.ram.duplicate = p.rw.zero_pages;
    i.ram.normal = p.rw.normal_pages;
    i.ram.postcopy_requests = requests.load(Ordering::Relaxed);
    Ok(())
}

/// A return-path message other than a page request: RUN acknowledged (the
/// end of the downtime) or an error.
fn source_reply<W: Sink>(
    p: &mut SourcePhase<'_, W>,
    kind: u16,
    data: &[u8],
) -> Result<(), MigrationError> {
    if kind == rp::PONG && data == ping::RUNNING.to_be_bytes() {
        p.running = true;
        p.shared.info().downtime_ms = Some(p.stop_start.elapsed().as_millis() as u64);
        return Ok(());
    }
    match rp_error(kind, data, p.last_desc) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Every page is out (on both channels): END, EOF, then wait for the
/// destination to confirm it has every page.
fn finish_source<W: Sink>(
    p: &mut SourcePhase<'_, W>,
    requests: &AtomicU64,
) -> Result<(), MigrationError> {
    begin_ram_section(p.w, p.rw, section::END)?;
    end_ram_section(p.w, p.rw)?;
    p.w.u8(section::EOF)?;
    p.w.flush()?;
    loop {
        if p.shared.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        match p.rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok((rp::SHUT, d))) if d == [0, 0, 0, 0] => break,
            Ok(Ok((rp::REQ_PAGES | rp::REQ_PAGES_ID, _))) => {
                // Late requests for pages already on their way.
                requests.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok((k, d))) => source_reply(p, k, &d)?,
            Ok(Err(_)) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(MigrationError::PeerLost("destination"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let mut i = p.shared.info();
    if !p.running {
        i.downtime_ms = Some(p.stop_start.elapsed().as_millis() as u64);
    }
    i.ram.transferred = p.w.offset().max(i.ram.transferred);
    i.ram.postcopy_requests = requests.load(Ordering::Relaxed);
    Ok(())
}
// ----------------------------------------------------------- destination

/// The destination's return path, shared by the incoming and fault threads.
pub type RpWriter = Arc<Mutex<Box<dyn Write + Send>>>;

/// Send one return-path message.
pub fn send_rp(w: &RpWriter, kind: u16, data: &[u8]) -> std::io::Result<()> {
    let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
    stream::write_rp(&mut *g, kind, data)
}

/// Fault-service statistics.
#[derive(Default)]
struct FaultStats {
    /// Faults read from userfaultfd.
    faults: u64,
    /// Requests sent to the source.
    requests: u64,
    /// Fault read to page placed (and the waiter woken), µs.
    latencies_us: Vec<u32>,
    /// Faults serviced by a page of the main stream (background or, without
    /// preempt, requested) and of the preempt channel.
    by_stream: [StreamFaults; 2],
    /// Faults of 1 ms or more, µs from the fault read: request written,
    /// page's section read (CRC checked), page placed; and the stream.
    slow: Vec<(u32, u32, u32, PageStream)>,
}

/// Faults serviced by the pages of one stream.
#[derive(Default, Clone, Copy)]
struct StreamFaults {
    serviced: u32,
    over_1ms: u32,
}

/// A fault waiting for its page: when it was read, when its request left.
#[derive(Clone, Copy)]
struct Pending {
    fault: Instant,
    sent: Option<Instant>,
}

/// Most slow faults (1 ms or more) kept with their breakdown.
const SLOW_FAULTS_KEPT: usize = 16;

/// Which stream placed a page: index into `FaultStats::by_stream`.
#[derive(Clone, Copy)]
enum PageStream {
    Main = 0,
    Preempt = 1,
}

/// Destination postcopy state, shared by the incoming, listen and fault threads.
pub struct DestPostcopy {
    ram: Arc<dyn GuestRam>,
    maps: Vec<(usize, usize)>,
    /// Pages present in guest RAM.
    received: Vec<AtomicBitmap>,
    /// Pages asked of the source.
    requested: Vec<AtomicBitmap>,
    uffd: Uffd,
    rp: RpWriter,
    /// The preempt channel's request direction, while it is up.
    urgent: Mutex<Option<RpWriter>>,
    pending: Mutex<HashMap<(usize, u64), Pending>>,
    stats: Mutex<FaultStats>,
    stop: vmm_sys_util::eventfd::EventFd,
    registered: AtomicBool,
    dropper: PageDropper,
}

// SAFETY: the raw mapping addresses are plain integers here; the memory
// they name belongs to the VMM's guest RAM, which outlives the migration,
// and is only touched through userfaultfd ioctls and madvise.
unsafe impl Send for DestPostcopy {}
// SAFETY: as above; every mutable field is behind a Mutex or atomic.
unsafe impl Sync for DestPostcopy {}

/// Drops ranges of this process's private anonymous memory
/// (`MADV_DONTNEED`), as many per system call as the kernel allows.
struct PageDropper {
    /// Our own pidfd, for `process_madvise`.
    pidfd: Option<std::os::fd::OwnedFd>,
    /// `process_madvise` works here (cleared at its first refusal).
    vectored: AtomicBool,
}

impl PageDropper {
    /// A dropper that tries `process_madvise` first.
    fn new() -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        let pidfd = i32::try_from(fd).ok().filter(|&fd| fd >= 0).map(|fd| {
            // SAFETY: `fd` was just opened and is owned by nothing else.
            unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
        });
        Self {
            pidfd,
            vectored: AtomicBool::new(true),
        }
    }

    /// A dropper that uses one `madvise` per range (for tests).
    #[cfg(test)]
    fn one_by_one() -> Self {
        Self {
            pidfd: None,
            vectored: AtomicBool::new(false),
        }
    }

    /// Drop the pages of every range in `iov` (`MADV_DONTNEED`: they read
    /// back as zero, or as missing under userfaultfd). The ranges must lie
    /// in private anonymous memory of this process (the callers check them
    /// against the guest RAM blocks).
    ///
    /// Many ranges per system call where the kernel allows:
    /// `process_madvise` on our own pidfd (`MADV_DONTNEED` for the calling
    /// process since Linux 6.13) takes up to `UIO_MAXIOV` ranges and, since
    /// 6.16, flushes the TLB once for all of them, where `madvise` pays one
    /// flush (an IPI to every CPU that ran the process) per range. A
    /// discard set is often a thousand scattered pages: on the 2-CPU test
    /// host, 1000 single pages take 2.0-3.2 ms one by one and 0.6-0.7 ms in
    /// one call. Where the kernel refuses the call, every range goes
    /// through `madvise` from then on.
    ///
    /// # Safety
    ///
    /// Every range must lie in private anonymous memory of this process
    /// whose contents nothing relies on (guest RAM being loaded).
    unsafe fn drop_ranges(&self, iov: &mut [libc::iovec]) -> Result<(), PostcopyError> {
        const UIO_MAXIOV: usize = 1024;
        let mut rest = iov;
        if let Some(fd) = &self.pidfd {
            while !rest.is_empty() && self.vectored.load(Ordering::Relaxed) {
                let n = rest.len().min(UIO_MAXIOV);
                // SAFETY: `rest[..n]` are valid iovecs, the kernel only
                // reads them; the ranges may be dropped (the caller's
                // contract).
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_process_madvise,
                        fd.as_raw_fd(),
                        rest.as_ptr(),
                        n,
                        libc::MADV_DONTNEED,
                        0,
                    )
                };
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    // Older kernels: no such call, or not this advice.
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::ENOSYS | libc::EINVAL | libc::EPERM)
                    ) {
                        return Err(PostcopyError::Discard {
                            addr: rest[0].iov_base as usize,
                            len: rest[0].iov_len,
                            source: e,
                        });
                    }
                }
                if r <= 0 {
                    // Refused, or no progress: `madvise` takes the rest (and
                    // names the range it fails on).
                    self.vectored.store(false, Ordering::Relaxed);
                    break;
                }
                // It returns the bytes dropped, in order: skip those ranges.
                let mut done = r as usize;
                while done > 0 && !rest.is_empty() {
                    let first = &mut rest[0];
                    if done < first.iov_len {
                        first.iov_base = (first.iov_base as usize + done) as *mut libc::c_void;
                        first.iov_len -= done;
                        break;
                    }
                    done -= first.iov_len;
                    rest = &mut rest[1..];
                }
            }
        }
        for v in rest.iter() {
            // SAFETY: the range may be dropped (the caller's contract).
            let r = unsafe { libc::madvise(v.iov_base, v.iov_len, libc::MADV_DONTNEED) };
            if r != 0 {
                return Err(PostcopyError::Discard {
                    addr: v.iov_base as usize,
                    len: v.iov_len,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }
}

impl DestPostcopy {
    /// POSTCOPY_ADVISE on the destination: can we do postcopy at all?
    pub fn advise(
        ram: Arc<dyn GuestRam>,
        enabled: bool,
        data: &[u8],
        rp: RpWriter,
    ) -> Result<Self, PostcopyError> {
        if !enabled {
            return Err(PostcopyError::Refused(
                "the postcopy-ram capability is not set on the destination \
                 (migrate-set-capabilities on both sides before migrate)"
                    .into(),
            ));
        }
        if data.len() != 16
            || data[0..8] != (PAGE_SIZE as u64).to_be_bytes()
            || data[8..16] != (PAGE_SIZE as u64).to_be_bytes()
        {
            return Err(PostcopyError::Refused(format!(
                "POSTCOPY_ADVISE with page sizes {data:02x?}, expected 4 KiB"
            )));
        }
        if std::env::var_os(NO_UFFD_ENV).is_some() {
            return Err(PostcopyError::NoUserfaultfd(format!(
                "disabled by {NO_UFFD_ENV} in the destination's environment"
            )));
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // KVM's own accesses to guest RAM (kernel mode) must fault too.
            .user_mode_only(false)
            .create()
            .map_err(|e| PostcopyError::NoUserfaultfd(crate::error_chain(&e)))?;
        let mut maps = Vec::new();
        for (b, blk) in ram.blocks().iter().enumerate() {
            let (addr, len) = ram.host_mapping(b).ok_or_else(|| {
                PostcopyError::NoUserfaultfd(format!(
                    "RAM block '{}' is not mapped for it",
                    blk.name
                ))
            })?;
            maps.push((addr as usize, len));
        }
        for &(a, l) in &maps {
            // SAFETY: each range is one RAM block's whole mapping, which
            // `ram` keeps alive; MADV_NOHUGEPAGE only stops the kernel from
            // backing it with huge pages from now on. Postcopy needs every
            // page not received to fault: a huge page allocated around a
            // received one fills its neighbours with zeros that read as
            // present. LISTEN drops them again by the received bitmap, but
            // khugepaged could collapse a range back before RAM is
            // registered (after, it leaves registered ranges alone), and
            // each drop inside a huge page splits it. QEMU turns THP off
            // here too. A hint: without THP it fails and changes nothing.
            unsafe {
                libc::madvise(a as *mut libc::c_void, l, libc::MADV_NOHUGEPAGE);
            }
        }
        // Check that registering works and offers what we need.
        let (a, l) = *maps
            .first()
            .ok_or_else(|| PostcopyError::Refused("no RAM".into()))?;
        let ioctls = uffd
            .register(a as *mut libc::c_void, l)
            .map_err(|e| PostcopyError::NoUserfaultfd(crate::error_chain(&e)))?;
        let _ = uffd.unregister(a as *mut libc::c_void, l);
        let need = IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE;
        if !ioctls.contains(need) {
            return Err(PostcopyError::NoUserfaultfd(format!(
                "the kernel offers {ioctls:?} on guest RAM, need COPY, ZEROPAGE and WAKE"
            )));
        }
        let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| PostcopyError::NoUserfaultfd(format!("eventfd: {e}")))?;
        Ok(Self {
            received: ram
                .blocks()
                .iter()
                .map(|b| AtomicBitmap::new(b.pages()))
                .collect(),
            requested: ram
                .blocks()
                .iter()
                .map(|b| AtomicBitmap::new(b.pages()))
                .collect(),
            ram,
            maps,
            uffd,
            rp,
            urgent: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            stats: Mutex::new(FaultStats::default()),
            stop,
            registered: AtomicBool::new(false),
            dropper: PageDropper::new(),
        })
    }

    fn addr(&self, block: usize, page: u64) -> usize {
        self.maps[block].0 + (page as usize) * PAGE_SIZE
    }

    /// Note a page placed during the precopy phase.
    pub fn mark_received(&self, block: usize, page: u64) {
        if let Some(b) = self.received.get(block) {
            b.test_and_set(page);
        }
    }

    /// `(block, first page, pages)` as the iovec of its host range.
    fn iovec(&self, block: usize, first: u64, n: u64) -> libc::iovec {
        libc::iovec {
            iov_base: self.addr(block, first) as *mut libc::c_void,
            iov_len: n as usize * PAGE_SIZE,
        }
    }

    /// POSTCOPY_RAM_DISCARD: drop the listed pages.
    pub fn discard(&self, data: &[u8]) -> Result<u64, PostcopyError> {
        let bad = |why: String| PostcopyError::Protocol(format!("bad discard command: {why}"));
        if data.len() < 2 || data[0] != 0 {
            return Err(bad("missing version 0".into()));
        }
        let n = data[1] as usize;
        let name = data
            .get(2..2 + n)
            .ok_or_else(|| bad("name cut short".into()))?;
        let block = self
            .ram
            .blocks()
            .iter()
            .position(|b| b.name.as_bytes() == name)
            .ok_or_else(|| bad(format!("unknown block '{}'", String::from_utf8_lossy(name))))?;
        let pairs = &data[2 + n..];
        if !pairs.len().is_multiple_of(16) {
            return Err(bad("ranges not 16-byte pairs".into()));
        }
        let ps = PAGE_SIZE as u64;
        let pages = self.ram.blocks()[block].pages();
        let mut ranges = Vec::with_capacity(pairs.len() / 16);
        for pair in pairs.chunks_exact(16) {
            let start = u64::from_be_bytes(pair[0..8].try_into().unwrap_or_default());
            let len = u64::from_be_bytes(pair[8..16].try_into().unwrap_or_default());
            let end = start.checked_add(len).map(|e| e / ps);
            if !start.is_multiple_of(ps) || !len.is_multiple_of(ps) || end.is_none_or(|e| e > pages)
            {
                return Err(bad(format!(
                    "range {start:#x}+{len:#x} outside block '{}'",
                    self.ram.blocks()[block].name
                )));
            }
            if len > 0 {
                ranges.push((start / ps, len / ps));
            }
        }
        let mut iov: Vec<_> = ranges
            .iter()
            .map(|&(first, n)| self.iovec(block, first, n))
            .collect();
        // SAFETY: the ranges were checked to lie inside the block, guest
        // RAM still being loaded; these pages are to be sent again.
        unsafe { self.dropper.drop_ranges(&mut iov) }?;
        let mut total = 0;
        for (first, n) in ranges {
            for pg in first..first + n {
                self.received[block].clear(pg);
            }
            total += n;
        }
        Ok(total)
    }

    /// POSTCOPY_LISTEN: drop every page not received, register RAM with
    /// userfaultfd and start the fault thread.
    pub fn listen(self: &Arc<Self>) -> Result<std::thread::JoinHandle<()>, PostcopyError> {
        let mut iov = Vec::new();
        for (b, rec) in self.received.iter().enumerate() {
            let mut pg = 0;
            while pg < rec.len() {
                if rec.test(pg) {
                    pg += 1;
                    continue;
                }
                let start = pg;
                while pg < rec.len() && !rec.test(pg) {
                    pg += 1;
                }
                iov.push(self.iovec(b, start, pg - start));
            }
        }
        // SAFETY: the ranges lie inside guest RAM blocks (from the
        // received bitmaps' lengths) and hold pages never received.
        unsafe { self.dropper.drop_ranges(&mut iov) }?;
        for &(a, l) in &self.maps {
            self.uffd
                .register(a as *mut libc::c_void, l)
                .map_err(|source| PostcopyError::Uffd {
                    what: "register",
                    addr: a,
                    source,
                })?;
        }
        self.registered.store(true, Ordering::SeqCst);
        let me = self.clone();
        std::thread::Builder::new()
            .name("postcopy-fault".into())
            .spawn(move || me.fault_loop())
            .map_err(|e| {
                PostcopyError::NoUserfaultfd(format!("cannot start the fault thread: {e}"))
            })
    }

    /// The fault thread: read faults, ask the source for missing pages.
    fn fault_loop(&self) {
        crate::fault_path_thread();
        let mut last_block = None;
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: fds is a valid array of two pollfd for the call's duration.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            loop {
                match self.uffd.read_event() {
                    Ok(Some(UffdEvent::Pagefault { addr, .. })) => {
                        let at = Instant::now();
                        if self.on_fault(addr as usize, at, &mut last_block).is_err() {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    }

    fn on_fault(
        &self,
        addr: usize,
        at: Instant,
        last_block: &mut Option<(bool, usize)>,
    ) -> Result<(), std::io::Error> {
        let Some(block) = self
            .maps
            .iter()
            .position(|&(a, l)| addr >= a && addr < a + l)
        else {
            return Ok(());
        };
        let page = ((addr - self.maps[block].0) / PAGE_SIZE) as u64;
        let paddr = self.addr(block, page);
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).faults += 1;
        if self.received[block].test(page) {
            // Received as a zero page that was never populated, or placed
            // between the fault and now: make it present and wake the waiter.
            self.zero_or_wake(paddr);
            return Ok(());
        }
        if self.requested[block].test_and_set(page) {
            return Ok(()); // already asked; its arrival wakes every waiter
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (block, page),
                Pending {
                    fault: at,
                    sent: None,
                },
            );
        if self.received[block].test(page) {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(block, page));
            self.zero_or_wake(paddr);
            return Ok(());
        }
        let mut data = Vec::with_capacity(13 + 32);
        data.extend_from_slice(&(page * PAGE_SIZE as u64).to_be_bytes());
        data.extend_from_slice(&(PAGE_SIZE as u32).to_be_bytes());
        // The preempt channel while it is up, else the return path. A
        // REQ_PAGES names no block: it means the last one named on the same
        // channel.
        let urgent = self
            .urgent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let key = (urgent.is_some(), block);
        let kind = if *last_block == Some(key) {
            rp::REQ_PAGES
        } else {
            let name = &self.ram.blocks()[block].name;
            data.push(name.len() as u8);
            data.extend_from_slice(name.as_bytes());
            *last_block = Some(key);
            rp::REQ_PAGES_ID
        };
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests += 1;
        let sent = match urgent {
            Some(u) if send_rp(&u, kind, &data).is_ok() => Ok(()),
            Some(_) => {
                // The source closed the channel after its last page (this
                // request raced with its EOF): the page is on its way.
                *self.urgent.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Ok(())
            }
            None => send_rp(&self.rp, kind, &data),
        };
        if let Some(p) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&(block, page))
        {
            p.sent = Some(Instant::now());
        }
        sent
    }

    fn zero_or_wake(&self, paddr: usize) {
        // SAFETY: paddr is a page-aligned address inside a registered block.
        let r = unsafe {
            self.uffd
                .zeropage(paddr as *mut libc::c_void, PAGE_SIZE, true)
        };
        if r.is_err() {
            let _ = self.uffd.wake(paddr as *mut libc::c_void, PAGE_SIZE);
        }
    }

    /// The listen thread: read the rest of the stream, placing pages
    /// atomically, until EOF.
    pub fn listen_loop<R: BufRead>(
        &self,
        r: &mut Reader<R>,
        rr: &mut RamReader,
        shared: &Shared,
    ) -> Result<(), MigrationError> {
        // Also with a preempt channel: the pages the background stream
        // brings are the neighbours of the last request, which the guest
        // is likely to touch next (hand runs: 3 of 160 faults over 1 ms
        // preferred, 6 of 91 at the vCPUs' priority; within the noise of
        // bench/postcopy.sh, 97 % under 1 ms either way).
        crate::prefer_this_thread();
        let mut staging = StagingPlacer::new(crate::precopy::MAX_SECTION_PAGES);
        let mut ended = false;
        loop {
            r.begin_section();
            let at = r.offset();
            let t = r.u8("section type")?;
            match t {
                section::PART | section::END => {
                    let id = r.be32("section id")?;
                    if id != RAM_SECTION_ID || ended {
                        return Err(StreamError::invalid(
                            at,
                            format!("unexpected RAM section (id {id}) in postcopy"),
                        )
                        .into());
                    }
                    self.place_section(r, rr, &mut staging, at, id, PageStream::Main)?;
                    ended = t == section::END;
                    let mut i = shared.info();
                    i.ram.transferred = r.offset();
                    i.ram.duplicate = rr.zero_pages;
                    i.ram.normal = rr.pages - rr.zero_pages;
                }
                section::EOF if ended => return Ok(()),
                other => {
                    return Err(StreamError::invalid(
                        at,
                        format!("unexpected section type {other:#04x} in postcopy"),
                    )
                    .into())
                }
            }
        }
    }

    /// The records of a RAM section whose type and id (at `at`) were read:
    /// staged, checked against the footer, then placed with userfaultfd.
    fn place_section<R: BufRead>(
        &self,
        r: &mut Reader<R>,
        rr: &mut RamReader,
        staging: &mut StagingPlacer,
        at: u64,
        id: u32,
        stream: PageStream,
    ) -> Result<(), MigrationError> {
        rr.new_section();
        staging.clear();
        rr.read_records(r, staging)?;
        r.footer(id)?;
        staging
            .commit(&mut UffdPlacer(self, stream, Instant::now()))
            .map_err(|source| RamRecordError::Place { offset: at, source })?;
        Ok(())
    }

    /// The preempt thread: place the requested pages of the preempt
    /// channel until its EOF.
    fn preempt_loop<R: BufRead>(&self, r: &mut Reader<R>) -> Result<(), MigrationError> {
        crate::fault_path_thread();
        let mut rr = RamReader::new(self.ram.blocks().to_vec());
        let mut staging = StagingPlacer::new(crate::precopy::MAX_SECTION_PAGES);
        loop {
            r.begin_section();
            let at = r.offset();
            match r.u8("section type")? {
                section::PART => {
                    let id = r.be32("section id")?;
                    if id != RAM_SECTION_ID {
                        return Err(
                            StreamError::invalid(at, format!("RAM section with id {id}")).into(),
                        );
                    }
                    self.place_section(r, &mut rr, &mut staging, at, id, PageStream::Preempt)?;
                }
                section::EOF => {
                    // Every page is on its way: later faults are answered
                    // by the background stream; late requests use the
                    // return path.
                    *self.urgent.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    return Ok(());
                }
                other => {
                    return Err(StreamError::invalid(
                        at,
                        format!("unexpected section type {other:#04x}"),
                    )
                    .into())
                }
            }
        }
    }

    /// Every page there? Then release userfaultfd.
    pub fn finish(&self) -> Result<(), PostcopyError> {
        for (b, rec) in self.received.iter().enumerate() {
            let missing = rec.len() - rec.count();
            if missing > 0 {
                return Err(PostcopyError::Protocol(format!(
                    "the stream ended with {missing} pages of block '{}' never sent",
                    self.ram.blocks()[b].name
                )));
            }
        }
        self.release();
        Ok(())
    }

    /// Stop the fault thread and unregister guest RAM (pending faults are
    /// then served by the kernel).
    pub fn release(&self) {
        let _ = self.stop.write(1);
        if self.registered.swap(false, Ordering::SeqCst) {
            for &(a, l) in &self.maps {
                let _ = self.uffd.unregister(a as *mut libc::c_void, l);
            }
        }
    }

    /// Fault statistics for query-migrate: `(faults, requests, p50 µs, p99 µs, max µs)`.
    pub fn stats_json(&self) -> serde_json::Value {
        let st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let mut l = st.latencies_us.clone();
        l.sort_unstable();
        let pct = |p: f64| -> u32 {
            if l.is_empty() {
                0
            } else {
                l[((l.len() - 1) as f64 * p).round() as usize]
            }
        };
        // Serviced faults by latency, each bucket up to its bound (µs), so
        // that runs can be pooled.
        let mut buckets = serde_json::Map::new();
        let mut lo = 0;
        for (name, hi) in [
            ("100", 100),
            ("200", 200),
            ("500", 500),
            ("1000", 1000),
            ("2000", 2000),
            ("5000", 5000),
            ("more", u32::MAX),
        ] {
            let n = l
                .iter()
                .filter(|&&v| v >= lo && (v < hi || hi == u32::MAX))
                .count();
            buckets.insert(name.into(), n.into());
            lo = hi;
        }
        json!({
            "faults": st.faults,
            "requests": st.requests,
            "serviced": l.len(),
            "latency-p50-us": pct(0.5),
            "latency-p99-us": pct(0.99),
            "latency-max-us": l.last().copied().unwrap_or(0),
            "latency-buckets-us": buckets,
            "serviced-by-stream": {
                "main": st.by_stream[PageStream::Main as usize].serviced,
                "preempt": st.by_stream[PageStream::Preempt as usize].serviced,
            },
            "slow-faults-us": st.slow.iter().map(|&(sent, read, placed, stream)| json!({
                "request-sent": sent,
                "section-read": read,
                "placed": placed,
                "stream": match stream { PageStream::Main => "main", PageStream::Preempt => "preempt" },
            })).collect::<Vec<_>>(),
            "over-1ms-by-stream": {
                "main": st.by_stream[PageStream::Main as usize].over_1ms,
                "preempt": st.by_stream[PageStream::Preempt as usize].over_1ms,
            },
        })
    }
}

/// Places pages with userfaultfd, exactly once each, from one stream
/// (with the time their section had been read).
struct UffdPlacer<'a>(&'a DestPostcopy, PageStream, Instant);

impl UffdPlacer<'_> {
    fn placed(&self, block: usize, page: u64) {
        let d = self.0;
        d.received[block].test_and_set(page);
        if let Some(t) = d
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(block, page))
        {
            let us = |i: Instant| {
                i.saturating_duration_since(t.fault)
                    .as_micros()
                    .min(u128::from(u32::MAX)) as u32
            };
            let total = us(Instant::now());
            let mut st = d.stats.lock().unwrap_or_else(|e| e.into_inner());
            st.latencies_us.push(total);
            let by = &mut st.by_stream[self.1 as usize];
            by.serviced += 1;
            by.over_1ms += u32::from(total >= 1000);
            if total >= 1000 && st.slow.len() < SLOW_FAULTS_KEPT {
                let sent = t.sent.map_or(0, us);
                st.slow.push((sent, us(self.2), total, self.1));
            }
        }
    }

    fn check(&self, block: usize, page: u64) -> Result<usize, RamError> {
        let d = self.0;
        if block >= d.maps.len() || page >= d.received[block].len() {
            return Err(RamError::OutOfRange { block, page });
        }
        if d.received[block].test(page) {
            return Err(RamError::Place {
                block,
                page,
                source: "page sent twice in postcopy".into(),
            });
        }
        Ok(d.addr(block, page))
    }
}

impl PagePlacer for UffdPlacer<'_> {
    fn place_page(&mut self, block: usize, page: u64, data: &[u8]) -> Result<(), RamError> {
        let addr = self.check(block, page)?;
        // SAFETY: data is PAGE_SIZE readable bytes; addr is a page of a
        // registered block; UFFDIO_COPY fills it atomically and wakes waiters.
        unsafe {
            self.0.uffd.copy(
                data.as_ptr().cast(),
                addr as *mut libc::c_void,
                PAGE_SIZE,
                true,
            )
        }
        .map_err(|e| RamError::Place {
            block,
            page,
            source: Box::new(e),
        })?;
        self.placed(block, page);
        Ok(())
    }

    fn place_zero(&mut self, block: usize, page: u64) -> Result<(), RamError> {
        let addr = self.check(block, page)?;
        // SAFETY: addr is a page of a registered block.
        unsafe {
            self.0
                .uffd
                .zeropage(addr as *mut libc::c_void, PAGE_SIZE, true)
        }
        .map_err(|e| RamError::Place {
            block,
            page,
            source: Box::new(e),
        })?;
        self.placed(block, page);
        Ok(())
    }
}

/// Records every page the precopy phase places (for LISTEN).
pub struct TrackingPlacer<'a> {
    /// Where pages go.
    pub ram: &'a dyn GuestRam,
    /// Postcopy state, once advised.
    pub post: Option<&'a DestPostcopy>,
    /// Pages known to read as zero (bit set: not written since the incoming
    /// migration began on RAM that started zeroed), one bitmap per block.
    /// A ZERO record for such a page needs no work: not even a read, which
    /// would fault the page in. Unused once postcopy is advised, where a
    /// zero page must be made present before userfaultfd covers it.
    pub zeroed: &'a mut [crate::ram::Bitmap],
}

impl PagePlacer for TrackingPlacer<'_> {
    fn place_page(&mut self, block: usize, page: u64, data: &[u8]) -> Result<(), RamError> {
        self.ram.write_page(block, page, data)?;
        if let Some(z) = self.zeroed.get_mut(block) {
            z.test_and_clear(page);
        }
        if let Some(p) = self.post {
            p.mark_received(block, page);
        }
        Ok(())
    }
    fn place_zero(&mut self, block: usize, page: u64) -> Result<(), RamError> {
        let known_zero = self.zeroed.get(block).is_some_and(|z| z.get(page));
        if self.post.is_none() && known_zero {
            return Ok(());
        }
        self.ram.zero_page(block, page)?;
        if let Some(p) = self.post {
            p.mark_received(block, page);
        }
        Ok(())
    }
}

/// Destination: a PACKAGED command arrived (the switch). Runs LISTEN (hands
/// the main stream to the listen thread), loads the devices at RUN, then
/// waits until the listen thread has every page. On failure the guest is
/// stopped before userfaultfd is released. `main`: the main stream and its
/// RAM record state; `switch` ends at RUN.
pub(crate) fn dest_package<R: BufRead + Send + 'static>(
    inc: &mut crate::precopy::Incoming,
    closer: crate::transport::Closer,
    post: Arc<DestPostcopy>,
    pkg: Vec<u8>,
    main: (Reader<R>, RamReader),
    mut preempt: Option<PreemptIn>,
    switch: crate::RealTimeSection,
) -> Result<(), MigrationError> {
    let mut switch = Some(switch);
    let preempt_closer = preempt.as_ref().map(|p| p.closer.clone());
    let mut urgent: Option<std::thread::JoinHandle<Result<(), MigrationError>>> = None;
    let mut pr = Reader::new(&pkg[..]);
    let mut devices: Vec<stream::DeviceBlob> = Vec::new();
    let mut main = Some(main);
    let mut listen: Option<std::thread::JoinHandle<Result<(), MigrationError>>> = None;
    let mut fault: Option<std::thread::JoinHandle<()>> = None;
    let mut ran = false;
    let res = (|| -> Result<(), MigrationError> {
        loop {
            pr.begin_section();
            let at = pr.offset();
            match pr.u8("package section type")? {
                section::COMMAND => {
                    let c = pr.be16("command")?;
                    let len = pr.be16("command length")?;
                    let data = pr.vec(len as usize, "command data")?;
                    pr.check_crc("command")?;
                    match c {
                        cmd::POSTCOPY_LISTEN => {
                            let Some((mut r, mut rr)) = main.take() else {
                                return Err(
                                    StreamError::invalid(at, "second POSTCOPY_LISTEN").into()
                                );
                            };
                            fault = Some(post.listen()?);
                            set_status(&inc.shared, &inc.events, Status::PostcopyActive);
                            // A failed channel shuts the other one too, so
                            // that neither thread waits on a dead stream.
                            if let Some(mut pi) = preempt.take() {
                                let w = std::mem::replace(&mut pi.w, Box::new(std::io::sink()));
                                *post.urgent.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some(Arc::new(Mutex::new(w)));
                                let (p, main) = (post.clone(), closer.clone());
                                urgent = Some(
                                    std::thread::Builder::new()
                                        .name("postcopy-preempt".into())
                                        .spawn(move || {
                                            let r = p.preempt_loop(&mut pi.r).map_err(|e| {
                                                PostcopyError::Preempt(Box::new(e)).into()
                                            });
                                            if r.is_err() {
                                                main.close();
                                            }
                                            r
                                        })
                                        .map_err(|e| {
                                            PostcopyError::Protocol(format!(
                                                "cannot start the preempt thread: {e}"
                                            ))
                                        })?,
                                );
                            }
                            let (p, shared) = (post.clone(), inc.shared.clone());
                            let other = preempt_closer.clone();
                            listen = Some(
                                std::thread::Builder::new()
                                    .name("postcopy-listen".into())
                                    .spawn(move || {
                                        let r = p.listen_loop(&mut r, &mut rr, &shared);
                                        if let (Err(_), Some(c)) = (&r, &other) {
                                            c.close();
                                        }
                                        r
                                    })
                                    .map_err(|e| {
                                        PostcopyError::Protocol(format!(
                                            "cannot start the listen thread: {e}"
                                        ))
                                    })?,
                            );
                        }
                        cmd::POSTCOPY_RUN => {
                            if listen.is_none() || ran {
                                return Err(StreamError::invalid(
                                    at,
                                    "POSTCOPY_RUN before LISTEN or twice",
                                )
                                .into());
                            }
                            inc.machine
                                .load_devices(std::mem::take(&mut devices))
                                .map_err(MigrationError::Machine)?;
                            // The guest runs: the switch is over.
                            switch.take();
                            ran = true;
                        }
                        cmd::PING => {
                            if data.len() != 4 {
                                return Err(StreamError::invalid(at, "PING needs 4 bytes").into());
                            }
                            send_rp(&post.rp, rp::PONG, &data).map_err(|e| StreamError::Io {
                                offset: at,
                                source: e,
                            })?;
                        }
                        other => {
                            return Err(StreamError::invalid(
                                at,
                                format!("unexpected command {other} in the postcopy package"),
                            )
                            .into())
                        }
                    }
                }
                section::FULL => {
                    let id = pr.be32("section id")?;
                    let blob = stream::read_device_body(&mut pr, id)?;
                    if devices
                        .iter()
                        .any(|d| d.name == blob.name && d.instance == blob.instance)
                    {
                        return Err(StreamError::invalid(
                            at,
                            format!(
                                "device '{}' instance {} sent twice",
                                blob.name, blob.instance
                            ),
                        )
                        .into());
                    }
                    devices.push(blob);
                }
                section::EOF => return Ok(()),
                other => {
                    return Err(StreamError::invalid(
                        at,
                        format!("unexpected section type {other:#04x} in the postcopy package"),
                    )
                    .into())
                }
            }
        }
    })();
    if res.is_err() {
        // Unblock the listen and preempt threads' reads.
        closer.close();
        if let Some(c) = &preempt_closer {
            c.close();
        }
    }
    let listened = match listen {
        Some(h) => h.join().unwrap_or_else(|_| {
            Err(PostcopyError::Protocol("the listen thread panicked".into()).into())
        }),
        None => Err(PostcopyError::Protocol("the package had no POSTCOPY_LISTEN".into()).into()),
    };
    // The source ends the preempt channel before the main stream's END.
    let urgent_done = match urgent {
        Some(h) => h.join().unwrap_or_else(|_| {
            Err(PostcopyError::Protocol("the preempt thread panicked".into()).into())
        }),
        None => Ok(()),
    };
    // The first failure is the cause; the other channel was shut after it.
    let listened = match (listened, urgent_done) {
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(main), Err(pre)) => Err(if matches!(main, MigrationError::Stream(_)) {
            pre
        } else {
            main
        }),
        (Ok(()), Ok(())) => Ok(()),
    };
    let result = res.and(listened).and_then(|()| {
        if !ran {
            return Err(PostcopyError::Protocol("the package had no POSTCOPY_RUN".into()).into());
        }
        post.finish().map_err(MigrationError::from)
    });
    if let Err(e) = &result {
        // Stop the vCPUs before releasing userfaultfd: released, the pages
        // that never came would read as zeros.
        inc.machine.abandon(&crate::error_chain(e));
        post.release();
    }
    if let Some(f) = fault {
        let _ = f.join();
    }
    let stats = post.stats_json();
    {
        let mut i = inc.shared.info();
        i.ram.postcopy_requests = stats["requests"].as_u64().unwrap_or(0);
        i.extra.insert("x-postcopy-faults".into(), stats);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3000 single pages (three vectors, the last one partial) and a few
    /// long ranges dropped from a private anonymous mapping: exactly those
    /// pages read back as zero, with either way of dropping.
    #[test]
    fn page_dropper_drops_exactly_the_ranges() {
        const PAGES: usize = 8192;
        for dropper in [PageDropper::new(), PageDropper::one_by_one()] {
            // SAFETY: a fresh private anonymous mapping, unmapped below.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    PAGES * PAGE_SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED);
            // SAFETY: the mapping is PAGES pages long and ours alone.
            let mem =
                unsafe { std::slice::from_raw_parts_mut(base.cast::<u8>(), PAGES * PAGE_SIZE) };
            mem.fill(0xa5);
            let mut dropped = vec![false; PAGES];
            let mut ranges: Vec<(usize, usize)> = (0..3000).map(|i| (i * 2 + 1, 1)).collect();
            ranges.extend([(6100, 300), (7000, 1000), (8191, 1)]);
            let mut iov: Vec<libc::iovec> = ranges
                .iter()
                .map(|&(first, n)| {
                    dropped[first..first + n].fill(true);
                    libc::iovec {
                        iov_base: mem[first * PAGE_SIZE..].as_mut_ptr().cast(),
                        iov_len: n * PAGE_SIZE,
                    }
                })
                .collect();
            // SAFETY: the ranges lie in the test's own mapping, whose
            // contents only this test looks at.
            unsafe { dropper.drop_ranges(&mut iov) }.unwrap();
            for (pg, &gone) in dropped.iter().enumerate() {
                let page = &mem[pg * PAGE_SIZE..(pg + 1) * PAGE_SIZE];
                let want = if gone { 0 } else { 0xa5 };
                assert!(
                    page.iter().all(|&b| b == want),
                    "page {pg} (dropped: {gone})"
                );
            }
            // SAFETY: unmapping the mapping made above; `mem` is not used again.
            unsafe { libc::munmap(base, PAGES * PAGE_SIZE) };
        }
    }

    /// A range outside any mapping is an error naming it, not a silent
    /// success.
    #[test]
    fn page_dropper_reports_a_bad_range() {
        for dropper in [PageDropper::new(), PageDropper::one_by_one()] {
            let mut iov = [libc::iovec {
                // Page-aligned and never mapped in user space (the top of
                // the lower half).
                iov_base: 0x7fff_ffff_0000usize as *mut libc::c_void,
                iov_len: PAGE_SIZE,
            }];
            // SAFETY: nothing is mapped there, so nothing can be dropped.
            let e = unsafe { dropper.drop_ranges(&mut iov) }.unwrap_err();
            assert!(
                e.to_string().contains("0x7fffffff0000"),
                "error names the range: {e}"
            );
        }
    }
}

//! Postcopy, the source's half: the discard set, the device package and
//! the page sender after the switch (the background stream, and the
//! urgent thread on the preempt channel).
//!
//! See [`crate::postcopy`] for the message sequence.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::TryRecvError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{PostcopyError, MAX_PACKAGE, MAX_REQUEST, POSTCOPY_SECTION_PAGES, SOCKET_BUFFER};
use crate::machine::{set_status, EventSink, MigrationError};
use crate::ram::{
    begin_ram_section, end_ram_section, AtomicBitmap, Bitmap, GuestRam, RamWriter, Throttle,
    RAM_SECTION_ID,
};
use crate::return_path::{PageRequest, ReturnPath, RpMessage};
use crate::status::{Parameters, Recover, Shared, Status};
use crate::stream::{
    self, ping, section, BufSink, Command, Reader, Sink, StreamError, Writer, PAGE_SIZE,
};
use crate::transport::{Closer, Uri};

/// The source's main stream.
type MainSink = BufSink<Box<dyn Write + Send>>;

/// Source: send POSTCOPY_ADVISE and wait until the destination accepted it.
pub(crate) fn advise_source<W: Sink>(
    w: &mut Writer<W>,
    rpath: &mut ReturnPath,
) -> Result<(), MigrationError> {
    let mut data = Vec::with_capacity(16);
    data.extend_from_slice(&(PAGE_SIZE as u64).to_be_bytes());
    data.extend_from_slice(&(PAGE_SIZE as u64).to_be_bytes());
    w.write_command(&Command::PostcopyAdvise(data))?;
    rpath.ping_and_wait(w, ping::ADVISE)
}

/// What the source's postcopy phase needs from the session (after precopy).
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
    /// Return-path messages and the destination's error text.
    pub rpath: &'a mut ReturnPath,
    /// Status.
    pub shared: &'a Arc<Shared>,
    /// Events.
    pub events: &'a EventSink,
    /// Parameters.
    pub params: &'a Parameters,
    /// When the guest was stopped.
    pub stop_start: Instant,
    /// The destination's address (an automatic recovery connects there).
    pub uri: &'a Uri,
    /// The preempt channel, if `postcopy-preempt` is on (reopened by a
    /// recovery).
    pub preempt: Option<Preempt>,
    /// `postcopy-preempt` is on.
    pub preempt_on: bool,
    /// The destination acknowledged RUN.
    pub running: bool,
    /// Bytes sent on the connections before the current one (a recovery
    /// starts a new stream whose offsets count from zero).
    pub transferred_before: u64,
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
            w.write_command(&Command::PostcopyRamDiscard(data))?;
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
    rpath: &mut ReturnPath,
) -> Result<(), MigrationError> {
    send_discards(w, ram, dirty, sent)?;
    for (s, d) in sent.iter_mut().zip(dirty) {
        s.and_not(d);
    }
    rpath.ping_and_wait(w, ping::SWITCH)
}

/// Source: the device package (LISTEN, device sections, RUN, PING 2, EOF).
fn send_package<W: Sink>(
    w: &mut Writer<W>,
    devices: &[stream::DeviceBlob],
) -> Result<(), MigrationError> {
    let mut pw = Writer::new(Vec::new());
    pw.write_command(&Command::PostcopyListen)?;
    for (i, d) in devices.iter().enumerate() {
        stream::write_device(&mut pw, RAM_SECTION_ID + 1 + i as u32, d)?;
    }
    pw.write_command(&Command::PostcopyRun)?;
    pw.write_command(&Command::Ping(ping::RUNNING))?;
    pw.u8(section::EOF)?;
    let pkg = std::mem::take(pw.get_mut());
    let len = u32::try_from(pkg.len())
        .ok()
        .filter(|&l| l <= MAX_PACKAGE)
        .ok_or_else(|| StreamError::invalid(w.offset(), "device package over 64 MiB"))?;
    w.write_command(&Command::Packaged(len))?;
    w.bytes(&pkg)?;
    w.flush()?;
    Ok(())
}

/// Parse a page request: `(block, first page, pages)`.
/// `req` is a page request as parsed ([`RpMessage::PageRequest`], or the
/// reason of a [`RpMessage::BadPageRequest`]).
fn parse_request(
    req: Result<&PageRequest, &str>,
    ram: &dyn GuestRam,
    last_block: &mut Option<usize>,
) -> Result<(usize, u64, u64), PostcopyError> {
    let bad = |why: &str| PostcopyError::Protocol(format!("bad page request: {why}"));
    let &PageRequest {
        start,
        len,
        ref block,
    } = req.map_err(bad)?;
    let block = if let Some(name) = block {
        let name = &name[..];
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
/// Both directions idle between requests: only its writes are bounded by
/// the peer timeout (the main stream and the return path watch the peer).
pub(crate) fn connect_preempt<W: Sink>(
    uri: &Uri,
    peer_timeout: std::time::Duration,
    tls: Option<&crate::tls::TlsClient>,
    w: &mut Writer<W>,
    rpath: &mut ReturnPath,
) -> Result<Preempt, MigrationError> {
    let mut chan = crate::transport::connect(uri, peer_timeout, tls)?;
    chan.closer.unbound_reads();
    let writer = std::mem::replace(&mut chan.writer, Box::new(std::io::sink()));
    let reader: Box<dyn Read + Send> =
        std::mem::replace(&mut chan.reader, Box::new(std::io::empty()));
    let mut pw = Writer::new(BufSink::with_capacity(256 << 10, writer));
    pw.be32(stream::PREEMPT_MAGIC)?;
    pw.be32(stream::PREEMPT_VERSION)?;
    pw.flush()?;
    w.write_command(&Command::PostcopyPreempt)?;
    rpath.ping_and_wait(w, ping::PREEMPT)?;
    Ok(Preempt {
        w: pw,
        r: Reader::new(std::io::BufReader::new(reader)),
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
    crate::sched::fault_path_thread();
    let mut rw = RamWriter::new();
    let mut done = UrgentDone::default();
    let mut req_block = None;
    loop {
        let (k, d) = match stream::read_rp(pr) {
            Ok(m) => m,
            Err(_) if finishing.load(Ordering::SeqCst) => break,
            Err(e) => return Err(e.into()),
        };
        let req = match RpMessage::parse(k, &d) {
            RpMessage::PageRequest(r) => Ok(r),
            RpMessage::BadPageRequest(why) => Err(why),
            _ => {
                return Err(PostcopyError::Protocol(format!(
                    "message type {k:#06x} on the preempt channel (only page requests)"
                ))
                .into())
            }
        };
        let (b, first, n) = parse_request(req.as_ref().map_err(|w| *w), ram, &mut req_block)?;
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
pub(crate) fn run_source(
    mut p: SourcePhase<'_, MainSink>,
    devices: &[stream::DeviceBlob],
    run_sent: &AtomicBool,
) -> Result<(), MigrationError> {
    set_status(p.shared, p.events, Status::PostcopyActive);
    // The last sync came after the round that asked pagemap: pages it
    // called unpopulated may have been written since.
    p.rw.forget_unpopulated();
    // The switch is downtime: nothing may delay it.
    let switch = crate::sched::RealTimeSection::enter();
    send_discards(p.w, p.ram, p.dirty, p.sent)?;
    send_package(p.w, devices)?;
    let package_sent = p.stop_start.elapsed();
    drop(switch);
    crate::sched::prefer_this_thread();
    // From here on, little may wait ahead of a requested page.
    if let Some(c) = p.shared.closer() {
        c.limit_send_buffer(SOCKET_BUFFER);
    }
    // Where QEMU's postcopy `downtime` ends; minivmm's goes on until the
    // destination has loaded the devices and started the guest (PONG 2).
    p.shared.lock_info().extra.insert(
        "x-postcopy-package-sent-ms".into(),
        json!(package_sent.as_secs_f64() * 1000.0),
    );
    run_sent.store(true, Ordering::SeqCst);
    let mut dirty: Vec<AtomicBitmap> = p.dirty.iter().map(AtomicBitmap::from).collect();
    let next = AtomicU64::new(u64::MAX);
    let requests = AtomicU64::new(0);
    loop {
        let e = match send_rest(&mut p, &dirty, &next, &requests) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if !e.is_link_failure() || p.shared.cancelled() {
            return Err(e);
        }
        // A destination that failed for good says so on its way out; a
        // silent one explains the broken pipe that followed.
        let e = match p.rpath.destination_reason() {
            Some(d @ MigrationError::Destination(_)) => return Err(d),
            Some(silent) => silent,
            None => e,
        };
        dirty = pause_and_recover(&mut p, &e, &dirty)?;
    }
}

/// The rest of the pages on the current connection(s), then END, EOF and
/// the destination's SHUT.
fn send_rest(
    p: &mut SourcePhase<'_, MainSink>,
    dirty: &[AtomicBitmap],
    next: &AtomicU64,
    requests: &AtomicU64,
) -> Result<(), MigrationError> {
    let Some(mut preempt) = p.preempt.take() else {
        source_background(p, dirty, next, requests, POSTCOPY_SECTION_PAGES)?;
        return finish_source(p, requests);
    };
    // The background sender yields to the urgent path.
    crate::sched::normal_priority();
    let finishing = AtomicBool::new(false);
    let (ram, sent) = (p.ram, p.sent);
    let main_closer = p.shared.closer();
    let Preempt {
        w: ref mut pw,
        r: ref mut pr,
        ref closer,
    } = preempt;
    std::thread::scope(|s| {
        let urgent = std::thread::Builder::new()
            .name("postcopy-urgent".into())
            .spawn_scoped(s, || {
                let r = urgent_loop(pr, pw, ram, dirty, sent, next, requests, &finishing);
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
        let bg = source_background(p, dirty, next, requests, POSTCOPY_SECTION_PAGES);
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
            let mut i = p.shared.lock_info();
            i.ram.transferred += done.bytes;
            i.ram.duplicate += done.zero_pages;
            i.ram.normal += done.normal_pages;
            i.ram.postcopy_requests = requests.load(Ordering::Relaxed);
        }
        finish_source(p, requests)
    })
}

/// How long a recovering source waits for the destination's bitmaps.
const RECOVER_WAIT: Duration = Duration::from_secs(60);
/// Automatic recovery: the first wait before reconnecting, doubled after
/// each failed attempt up to [`AUTO_RETRY_MAX`].
const AUTO_RETRY_FIRST: Duration = Duration::from_millis(100);
/// Automatic recovery: the longest wait between two attempts.
const AUTO_RETRY_MAX: Duration = Duration::from_secs(1);

/// The connection broke after RUN (`cause`): `postcopy-paused` until the
/// user asks to resume (`migrate` with `resume`), then the recovery
/// handshake on the new connection; a handshake that fails pauses again.
/// With `x-postcopy-auto-recover`, until that time is up, the source also
/// reconnects to the destination's original address by itself (backing
/// off from 100 ms to 1 s between attempts); a connection refused or
/// unreachable then stays `postcopy-paused` quietly, and a `migrate` with
/// `resume` still comes first. Returns the pages still to send: every
/// page the destination does not have (the guest is stopped here, so
/// they are final).
fn pause_and_recover(
    p: &mut SourcePhase<'_, MainSink>,
    cause: &MigrationError,
    unsent: &[AtomicBitmap],
) -> Result<Vec<AtomicBitmap>, MigrationError> {
    let paused = super::Pause::begin(p.shared, p.events, cause);
    let mut auto = p.shared.auto_recover().map(|d| Instant::now() + d);
    let mut backoff = AUTO_RETRY_FIRST;
    loop {
        let (uri, automatic) = match auto {
            Some(until) => {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    log::warn!(
                        "postcopy: no recovery within x-postcopy-auto-recover; \
                         recover with migrate-recover and migrate resume=true"
                    );
                    auto = None;
                    continue;
                }
                match p.shared.wait_recover_for(backoff.min(left)) {
                    Err(()) => return Err(MigrationError::Cancelled),
                    Ok(Some(Recover::Connect(uri))) => (uri, false),
                    Ok(Some(Recover::Listen(_))) => continue,
                    Ok(None) => {
                        backoff = (backoff * 2).min(AUTO_RETRY_MAX);
                        (p.uri.clone(), true)
                    }
                }
            }
            None => match p.shared.wait_recover() {
                None => return Err(MigrationError::Cancelled),
                Some(Recover::Connect(uri)) => (uri, false),
                Some(Recover::Listen(_)) => continue,
            },
        };
        let tls = p.shared.tls();
        let chan = match crate::transport::connect(&uri, p.params.peer_timeout(), tls.as_ref()) {
            Ok(c) => c,
            Err(e) if automatic => {
                log::debug!("postcopy: automatic recovery: {e}");
                continue;
            }
            Err(e) => {
                paused.again(p.shared, p.events, &e.into());
                continue;
            }
        };
        set_status(p.shared, p.events, Status::PostcopyRecover);
        match reconnect(p, chan, &uri, unsent) {
            Ok(dirty) => {
                paused.end(p.shared, p.events);
                return Ok(dirty);
            }
            Err(e) if !p.shared.cancelled() => paused.again(p.shared, p.events, &e),
            Err(e) => return Err(e),
        }
    }
}

/// The source's recovery handshake on `chan`, a new connection to `uri` (see
/// [`crate::postcopy`]): header, OPEN_RETURN_PATH, POSTCOPY_RECV_BITMAP;
/// the destination's RECV_BITMAP messages and RESUME_ACK; POSTCOPY_RESUME.
/// With `postcopy-preempt`, the preempt channel is opened again before
/// POSTCOPY_RESUME. The new stream, return path and record state replace
/// the old ones. `unsent`: the pages not sent before the break; a page
/// sent but not received (lost in flight) counts in
/// `x-postcopy-pages-resent`.
fn reconnect(
    p: &mut SourcePhase<'_, MainSink>,
    mut chan: crate::transport::Channel,
    uri: &Uri,
    unsent: &[AtomicBitmap],
) -> Result<Vec<AtomicBitmap>, MigrationError> {
    if !chan.duplex {
        return Err(PostcopyError::Refused(format!(
            "postcopy recovery needs a return path; '{uri}' has none (use tcp: or unix:)"
        ))
        .into());
    }
    p.shared.set_closer(Some(chan.closer.clone()));
    let writer = std::mem::replace(&mut chan.writer, Box::new(std::io::sink()));
    let mut w = Writer::new(BufSink::with_capacity(1 << 20, writer));
    stream::write_header(&mut w)?;
    w.write_command(&Command::OpenReturnPath)?;
    w.write_command(&Command::PostcopyRecvBitmap)?;
    w.flush()?;
    let reader = std::mem::replace(&mut chan.reader, Box::new(std::io::empty()));
    let mut rpath = ReturnPath::spawn(reader, chan.peer_timeout, chan.closer.clone());
    let blocks = p.ram.blocks();
    let mut have: Vec<Bitmap> = blocks.iter().map(|b| Bitmap::new(b.pages())).collect();
    let deadline = Instant::now() + RECOVER_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rpath.recv_timeout(left) {
            Ok(Ok(RpMessage::RecvBitmap { block, first, bits })) => {
                let b = blocks
                    .iter()
                    .position(|x| x.name.as_bytes() == block)
                    .ok_or_else(|| {
                        PostcopyError::Protocol(format!(
                            "bitmap of unknown block '{}'",
                            String::from_utf8_lossy(&block)
                        ))
                    })?;
                for (i, byte) in bits.iter().enumerate() {
                    for bit in 0..8 {
                        let pg = first + (i * 8 + bit) as u64;
                        if byte & (1 << bit) != 0 && pg < have[b].len() {
                            have[b].set(pg);
                        }
                    }
                }
            }
            Ok(Ok(RpMessage::ResumeAck(n))) => {
                if n as usize != blocks.len() {
                    return Err(PostcopyError::Protocol(format!(
                        "bitmaps of {n} blocks, this machine has {}",
                        blocks.len()
                    ))
                    .into());
                }
                break;
            }
            Ok(Ok(m)) => {
                if let Some(e) = rpath.error(m) {
                    return Err(e);
                }
            }
            Ok(Err(e)) => return Err(rpath.lost(Some(e))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(rpath.lost(None)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(MigrationError::NoAnswer("destination", RECOVER_WAIT))
            }
        }
    }
    let preempt = if p.preempt_on {
        Some(connect_preempt(
            uri,
            p.params.peer_timeout(),
            p.shared.tls().as_ref(),
            &mut w,
            &mut rpath,
        )?)
    } else {
        None
    };
    w.write_command(&Command::PostcopyResume)?;
    w.flush()?;
    chan.closer.limit_send_buffer(SOCKET_BUFFER);
    let mut resent = 0;
    let dirty = blocks
        .iter()
        .zip(&have)
        .zip(unsent)
        .map(|((b, h), u)| {
            let d = AtomicBitmap::new(b.pages());
            for pg in 0..b.pages() {
                if !h.get(pg) {
                    d.test_and_set(pg);
                    resent += u64::from(!u.test(pg));
                }
            }
            d
        })
        .collect();
    {
        let mut i = p.shared.lock_info();
        p.transferred_before = i.ram.transferred.max(p.transferred_before + p.w.offset());
        i.ram.transferred = p.transferred_before;
        let before = i
            .extra
            .get("x-postcopy-pages-resent")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        i.extra
            .insert("x-postcopy-pages-resent".into(), json!(before + resent));
    }
    p.preempt = preempt;
    *p.w = w;
    *p.rpath = rpath;
    // A new stream: fresh record state, the page counts going on.
    let old = std::mem::replace(p.rw, RamWriter::new());
    p.rw.zero_pages = old.zero_pages;
    p.rw.normal_pages = old.normal_pages;
    Ok(dirty)
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
    let mut throttle = Throttle::new(&p.shared.max_postcopy_bandwidth);
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
            match p.rpath.try_recv() {
                Ok(m) => intake(p, m, dirty, requests, &mut req_block, &mut urgent)?,
                Err(TryRecvError::Disconnected) => return Err(p.rpath.lost(None)),
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
            p.shared.lock_info().ram.postcopy_requests = requests.load(Ordering::Relaxed);
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
        in_section += 1;
        sent_pages += 1;
        if in_section == section_pages {
            close_part(p.w, p.rw, &mut in_section)?;
        }
        // max-postcopy-bandwidth paces the background only: a request that
        // comes while it waits ends the wait (its pages go at once, above).
        // What is written goes out before the wait: a requested page the
        // background took already must not sit in an open section.
        if let Some(wait) = throttle.owed(p.w.offset() - before) {
            close_part(p.w, p.rw, &mut in_section)?;
            match p.rpath.recv_timeout(wait) {
                Ok(m) => intake(p, m, dirty, requests, &mut req_block, &mut urgent)?,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(p.rpath.lost(None))
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        if sent_pages.is_multiple_of(256) {
            let mut i = p.shared.lock_info();
            i.ram.transferred = i.ram.transferred.max(p.transferred_before + p.w.offset());
            i.ram.remaining = total.saturating_sub(sent_pages) * PAGE_SIZE as u64;
            i.ram.duplicate = p.rw.zero_pages;
            i.ram.normal = p.rw.normal_pages;
            i.ram.postcopy_requests = requests.load(Ordering::Relaxed);
        }
    }
    close_part(p.w, p.rw, &mut in_section)?;
    let mut i = p.shared.lock_info();
    i.ram.transferred = i.ram.transferred.max(p.transferred_before + p.w.offset());
    i.ram.remaining = 0;
    i.ram.duplicate = p.rw.zero_pages;
    i.ram.normal = p.rw.normal_pages;
    i.ram.postcopy_requests = requests.load(Ordering::Relaxed);
    Ok(())
}

/// One return-path message of the postcopy phase: a page request queues
/// its pages that are still to send as `urgent` (clearing their dirty
/// bits: no other sender takes them); anything else goes to
/// [`source_reply`]; a broken return path is the error.
fn intake<W: Sink>(
    p: &mut SourcePhase<'_, W>,
    m: crate::return_path::RpResult,
    dirty: &[AtomicBitmap],
    requests: &AtomicU64,
    req_block: &mut Option<usize>,
    urgent: &mut Vec<(usize, u64)>,
) -> Result<(), MigrationError> {
    match m {
        Ok(RpMessage::PageRequest(req)) => {
            let (b, first, n) = parse_request(Ok(&req), p.ram, req_block)?;
            requests.fetch_add(1, Ordering::Relaxed);
            for pg in first..first + n {
                if dirty[b].test_and_clear(pg) {
                    urgent.push((b, pg));
                }
            }
            Ok(())
        }
        Ok(RpMessage::BadPageRequest(why)) => {
            parse_request(Err(why), p.ram, req_block)?;
            Ok(())
        }
        Ok(m) => source_reply(p, m),
        Err(e) => Err(p.rpath.lost(Some(e))),
    }
}

/// A return-path message other than a page request: RUN acknowledged (the
/// end of the downtime) or an error.
fn source_reply<W: Sink>(p: &mut SourcePhase<'_, W>, m: RpMessage) -> Result<(), MigrationError> {
    if m == RpMessage::Pong(ping::RUNNING) {
        p.running = true;
        p.shared.lock_info().downtime_ms = Some(p.stop_start.elapsed().as_millis() as u64);
        return Ok(());
    }
    match p.rpath.error(m) {
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
        match p.rpath.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(RpMessage::Shut(0))) => break,
            Ok(Ok(RpMessage::PageRequest(_) | RpMessage::BadPageRequest(_))) => {
                // Late requests for pages already on their way.
                requests.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(m)) => source_reply(p, m)?,
            Ok(Err(e)) => return Err(p.rpath.lost(Some(e))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(p.rpath.lost(None)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let mut i = p.shared.lock_info();
    if !p.running {
        i.downtime_ms = Some(p.stop_start.elapsed().as_millis() as u64);
    }
    i.ram.transferred = i.ram.transferred.max(p.transferred_before + p.w.offset());
    i.ram.postcopy_requests = requests.load(Ordering::Relaxed);
    Ok(())
}

//! COLO: after a first full migration the primary keeps sending
//! checkpoints (the RAM dirtied since the last one plus all device state)
//! to a secondary that keeps a RAM cache of the primary's state.
//!
//! Two modes (`x-colo-periodic`, chosen by the primary and sent to the
//! secondary):
//! - **running secondary** (the default, as QEMU's COLO): both guests run
//!   from the last checkpoint. The secondary's console output goes to the
//!   primary, which holds its own and releases it as soon as the secondary
//!   said the same ([`crate::output`]); a difference, or output held longer
//!   than `x-colo-compare-timeout`, takes a checkpoint at once, otherwise
//!   one comes every `x-checkpoint-delay`. At failover the secondary's
//!   guest is already running: it goes on, with no rollback.
//! - **periodic**: the secondary's guest stays paused until failover,
//!   which starts it from the last checkpoint; the primary's output waits
//!   for the next checkpoint, every `x-checkpoint-delay`.
//!
//! This module owns the checkpoint transaction on both sides, the
//! secondary's RAM cache, its output forwarding and the failover paths.
//! The session ([`crate::session`]) runs the first migration (precopy) and
//! hands over here.
//!
//! ```text
//! primary (P)                                  secondary (S)
//! header, config, OPEN_RETURN_PATH, ENABLE_COLO  S checks its x-colo capability
//! START, PART..., END, FULL..., EOF              first migration; S keeps the device state,
//!                                                copies RAM into its cache, starts its dirty log
//! be32 9 mode, be32 1 (running) | 0 (periodic) ---->
//!                              <----  COLO 0 checkpoint-ready
//! P resumes its guest, its output held;          running: S loads the state into its guest,
//!                                                runs it, output forwarded, not printed:
//!                              <----  rp 0x4d05 COLO_OUTPUT (bytes), as they come
//! be32 10 released, be64 n     ---->  running: n bytes of S's output since the last
//!                                     checkpoint matched and were released by P
//! when due (delay; running: output differed or waited too long):
//! be32 1 checkpoint-request    ---->  running: S stops its guest, sends the rest of its output
//!                              <----  COLO 2 checkpoint-reply
//! P stops its guest
//! be32 3 vmstate-send          ---->
//! PART..., END (dirty RAM)     ---->  pages go to the cache only
//! be32 4 vmstate-size, be64 n, n bytes (FULL sections, EOF)
//!                              <----  COLO 5 vmstate-received
//!                                     S copies the pages P sent and the pages S itself
//!                                     dirtied from the cache into guest RAM; the checked
//!                                     device state replaces the kept one (periodic: loaded
//!                                     into KVM at failover; running: into the guest now)
//!                              <----  COLO 6 vmstate-loaded
//! P releases the held output (its    running: S's output starts again from here;
//! return-path reader, on reading 6),  S resumes its guest
//! resumes its guest
//! be32 7 primary-exit (minivmm)  ---->  P left COLO on request; S leaves COLO, stays paused
//! be32 8 heartbeat (minivmm)     ---->  between checkpoints, every quarter of
//!                                       x-peer-timeout; S skips it
//! ```
//!
//! COLO messages from P travel raw on the main stream as QEMU sends them;
//! S answers on the return path as `COLO` messages (type 0x4d02, `be32`).
//! A checkpoint is applied only once all of it has arrived: one that breaks
//! off half way leaves guest RAM and device state at the previous one.
//!
//! Failover: a broken link, a peer silent for `x-peer-timeout` (dead,
//! frozen or cut off: each side keeps the other's reading direction busy,
//! P with heartbeats, S with the return path's keepalive) or a protocol
//! error stops checkpointing on both sides, which then wait for
//! `x-colo-lost-heartbeat` with their guests stopped (the primary's output
//! held). On the secondary the command runs the guest: periodic, from the
//! last complete checkpoint; running, on from where it stopped, after
//! printing the output the primary had not released (so its console
//! continues where the primary's stopped). On the primary it releases the
//! output and runs alone.

use std::io::{BufRead, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::machine::{set_status, Destination, Event, EventSink, Machine, MigrationError};
use crate::output::{Cause, Mode, OutputGate, OutputStats};
use crate::ram::{
    begin_ram_section, end_ram_section, send_dirty, Bitmap, GuestRam, PagePlacer, RamError,
    RamReader, RamRecordError, RamWriter, StagingPlacer, MAX_SECTION_PAGES, RAM_SECTION_ID,
};
use crate::return_path::{send_rp, ReturnPath, RpMessage, RpWriter};
use crate::status::{Shared, Status};
use crate::stream::{self, rp, section, DeviceBlob, Reader, Sink, StreamError, Writer, PAGE_SIZE};

/// COLO message values (`be32`).
pub mod msg {
    /// S has loaded the first state.
    pub const CHECKPOINT_READY: u32 = 0;
    /// P asks for a checkpoint.
    pub const CHECKPOINT_REQUEST: u32 = 1;
    /// S agrees.
    pub const CHECKPOINT_REPLY: u32 = 2;
    /// RAM and device state follow.
    pub const VMSTATE_SEND: u32 = 3;
    /// `be64` size and the device state follow.
    pub const VMSTATE_SIZE: u32 = 4;
    /// S has all of the checkpoint.
    pub const VMSTATE_RECEIVED: u32 = 5;
    /// S has applied it.
    pub const VMSTATE_LOADED: u32 = 6;
    /// minivmm: P leaves COLO on request and runs alone.
    pub const PRIMARY_EXIT: u32 = 7;
    /// minivmm: P is alive (between checkpoints); S skips it.
    pub const HEARTBEAT: u32 = 8;
    /// minivmm: right after the first migration, `be32` 1 for a running
    /// secondary (output compared), 0 for periodic mode.
    pub const MODE: u32 = 9;
    /// minivmm: `be64` bytes of S's output since the last checkpoint that
    /// matched P's and were released (S prints the rest at failover).
    pub const RELEASED: u32 = 10;

    /// The name QEMU's COLOMessage uses.
    pub fn name(m: u32) -> &'static str {
        match m {
            CHECKPOINT_READY => "checkpoint-ready",
            CHECKPOINT_REQUEST => "checkpoint-request",
            CHECKPOINT_REPLY => "checkpoint-reply",
            VMSTATE_SEND => "vmstate-send",
            VMSTATE_SIZE => "vmstate-size",
            VMSTATE_RECEIVED => "vmstate-received",
            VMSTATE_LOADED => "vmstate-loaded",
            PRIMARY_EXIT => "primary-exit",
            HEARTBEAT => "heartbeat",
            MODE => "mode",
            RELEASED => "released",
            _ => "unknown",
        }
    }
}

/// How long a side waits for its peer's next message before it considers
/// the link dead.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

pub use crate::machine::ExitReason;

/// COLO errors.
#[derive(Debug, thiserror::Error)]
pub enum ColoError {
    /// A message out of order or unknown.
    #[error("Unexpected COLO command {got} ({}), expected {expected} ({})", msg::name(*got), msg::name(*expected))]
    Unexpected {
        /// What came.
        got: u32,
        /// What the protocol needs now.
        expected: u32,
    },
    /// Nothing came.
    #[error("no COLO message from the {0} for {1:?}")]
    Timeout(&'static str, Duration),
    /// The RAM cache could not be set up.
    #[error("RAM cache of {0} bytes cannot be mapped")]
    Cache(usize, #[source] std::io::Error),
    /// The capability is missing on the secondary.
    #[error("the x-colo capability is not set on the destination (migrate-set-capabilities on both sides)")]
    NotEnabled,
    /// Device state too large.
    #[error("checkpoint device state of {0} bytes (at most {1} for this machine's devices)")]
    TooLarge(u64, u64),
    /// The console could not be written.
    #[error("writing the guest's console output failed")]
    Output(#[source] std::io::Error),
    /// The machine has no output gate.
    #[error("this machine cannot hold or compare its console output")]
    NoOutput,
    /// A mode other than periodic (0) or running (1).
    #[error("COLO mode {0} (0 periodic, 1 running secondary)")]
    Mode(u32),
}

impl From<ColoError> for MigrationError {
    fn from(e: ColoError) -> Self {
        MigrationError::Colo(Box::new(e))
    }
}

/// Checkpoint statistics (query-migrate `x-colo`).
#[derive(Default)]
struct Stats {
    running: bool,
    count: u64,
    by_cause: [u64; 3],
    last_pause_us: u64,
    total_pause_us: u64,
    max_pause_us: u64,
    last_bytes: u64,
    total_bytes: u64,
}

impl Stats {
    fn new(running: bool) -> Self {
        Self {
            running,
            ..Self::default()
        }
    }

    fn record(&mut self, cause: Option<Cause>, pause: Duration, bytes: u64) {
        let us = pause.as_micros() as u64;
        self.count += 1;
        if let Some(c) = cause {
            self.by_cause[c as usize] += 1;
        }
        self.last_pause_us = us;
        self.total_pause_us += us;
        self.max_pause_us = self.max_pause_us.max(us);
        self.last_bytes = bytes;
        self.total_bytes += bytes;
    }

    /// The statistics, with the output gate's on the primary.
    fn json(&self, output: Option<OutputStats>) -> serde_json::Value {
        let avg = |t: u64| {
            if self.count > 0 {
                t as f64 / self.count as f64
            } else {
                0.0
            }
        };
        let mut v = json!({
            "mode": if self.running { "running" } else { "periodic" },
            "checkpoints": self.count,
            "last-pause-ms": self.last_pause_us as f64 / 1000.0,
            "avg-pause-ms": avg(self.total_pause_us) / 1000.0,
            "max-pause-ms": self.max_pause_us as f64 / 1000.0,
            "last-bytes": self.last_bytes,
            "avg-bytes": avg(self.total_bytes),
        });
        if let Some(o) = output {
            let extra = json!({
                "checkpoints-periodic": self.by_cause[Cause::Periodic as usize],
                "checkpoints-output-differed": self.by_cause[Cause::Differed as usize],
                "checkpoints-compare-timeout": self.by_cause[Cause::Timeout as usize],
                "output-held-bytes": o.held_bytes,
                "output-released-bytes": o.released_bytes,
                "output-matched-bytes": o.matched_bytes,
                "output-hold-p50-ms": o.hold_p50_ms,
                "output-hold-p99-ms": o.hold_p99_ms,
            });
            if let (Some(a), Some(b)) = (v.as_object_mut(), extra.as_object()) {
                a.extend(b.clone());
            }
        }
        v
    }
}

// ---------------------------------------------------------------- primary

/// What the primary's COLO loop needs from the session (after precopy).
pub(crate) struct Primary<'a, W: Sink> {
    /// Main stream (the first migration's EOF already sent).
    pub w: &'a mut Writer<W>,
    /// RAM record state.
    pub rw: &'a mut RamWriter,
    /// Guest RAM, dirty logging on.
    pub ram: &'a dyn GuestRam,
    /// Dirty bitmaps (empty after the first migration).
    pub dirty: &'a mut [Bitmap],
    /// Pages sent: all of them after the first migration, so a dirty page
    /// has been written and goes without a populated check.
    pub sent: &'a mut [Bitmap],
    /// Return path (and the secondary's error text).
    pub rpath: &'a mut ReturnPath,
    /// Stop, save, resume, output.
    pub machine: &'a mut dyn Machine,
    /// Status.
    pub shared: &'a Arc<Shared>,
    /// Events.
    pub events: &'a EventSink,
    /// Periodic mode (`x-colo-periodic`): the secondary does not run.
    pub periodic: bool,
}

/// Wait for one COLO message from the secondary.
fn expect_rp(p: &mut Primary<'_, impl Sink>, want: u32) -> Result<(), MigrationError> {
    let deadline = Instant::now() + PEER_TIMEOUT;
    loop {
        if p.shared.failover_requested() {
            return Err(MigrationError::Cancelled);
        }
        match p.rpath.recv_timeout(Duration::from_millis(50)) {
            Ok(Ok(RpMessage::Colo(v))) => {
                let got = v.unwrap_or(u32::MAX);
                if got != want {
                    return Err(ColoError::Unexpected {
                        got,
                        expected: want,
                    }
                    .into());
                }
                return Ok(());
            }
            Ok(Ok(m)) => {
                if let Some(e) = p.rpath.error(m) {
                    return Err(e);
                }
            }
            Ok(Err(e)) => return Err(MigrationError::PeerLost("secondary", Some(e))),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(MigrationError::PeerLost("secondary", None))
            }
            Err(RecvTimeoutError::Timeout) => {
                if Instant::now() > deadline {
                    return Err(ColoError::Timeout("secondary", PEER_TIMEOUT).into());
                }
            }
        }
    }
}

/// One checkpoint transaction. Returns the pause and the bytes sent.
fn checkpoint<W: Sink>(p: &mut Primary<'_, W>) -> Result<(Duration, u64), MigrationError> {
    let start_bytes = p.w.offset();
    p.w.be32(msg::CHECKPOINT_REQUEST)?;
    p.w.flush()?;
    expect_rp(p, msg::CHECKPOINT_REPLY)?;
    let stop = Instant::now();
    let devices = p.machine.stop().map_err(MigrationError::Machine)?.devices;
    p.w.be32(msg::VMSTATE_SEND)?;
    p.ram.sync_dirty_log(p.dirty)?;
    send_dirty(p.w, p.rw, p.ram, p.dirty, p.sent, &mut |_, _| {
        Ok::<_, MigrationError>(true)
    })?;
    begin_ram_section(p.w, p.rw, section::END)?;
    end_ram_section(p.w, p.rw)?;
    let blob = device_buffer(&devices)?;
    p.w.be32(msg::VMSTATE_SIZE)?;
    p.w.be64(blob.len() as u64)?;
    p.w.bytes(&blob)?;
    p.w.flush()?;
    expect_rp(p, msg::VMSTATE_RECEIVED)?;
    // The return path's reader released the held output when it read
    // vmstate-loaded (see `checkpoints`).
    expect_rp(p, msg::VMSTATE_LOADED)?;
    p.machine.resume().map_err(MigrationError::Machine)?;
    Ok((stop.elapsed(), p.w.offset() - start_bytes))
}

/// Device state of one checkpoint as a buffer: FULL sections then EOF.
fn device_buffer(devices: &[DeviceBlob]) -> Result<Vec<u8>, MigrationError> {
    let mut b = Writer::new(Vec::new());
    for (i, d) in devices.iter().enumerate() {
        stream::write_device(&mut b, RAM_SECTION_ID + 1 + i as u32, d)?;
    }
    b.u8(section::EOF)?;
    Ok(std::mem::take(b.get_mut()))
}

/// Primary, the secondary ready: run the guest with its output held (and,
/// with a running secondary, compared) and checkpoint when it is due,
/// until failover is requested (`Ok`) or a checkpoint fails.
fn checkpoints<W: Sink>(p: &mut Primary<'_, W>, gate: &OutputGate) -> Result<(), MigrationError> {
    let mut stats = Stats::new(!p.periodic);
    set_status(p.shared, p.events, Status::Colo);
    gate.set_mode(if p.periodic {
        Mode::Hold
    } else {
        Mode::Compare
    })
    .map_err(ColoError::Output)?;
    p.shared.set_colo_gate(Some(gate.clone()));
    // The reader thread compares the secondary's output as it comes, and
    // releases the held output the moment the secondary has loaded the
    // checkpoint covering it (before its guest, resumed, says more).
    let g = gate.clone();
    let loaded = msg::VMSTATE_LOADED.to_be_bytes();
    p.rpath
        .set_hook(Some(Box::new(move |kind, data| match kind {
            rp::COLO_OUTPUT => {
                let _ = g.secondary_output(data);
                true
            }
            rp::COLO if data == loaded => {
                let _ = g.release_all();
                false
            }
            _ => false,
        })));
    p.machine.resume().map_err(MigrationError::Machine)?;
    // The statistics exist from the start (mode, no checkpoint yet).
    p.shared
        .lock_info()
        .extra
        .insert("x-colo".into(), stats.json(Some(gate.stats())));
    loop {
        let Some(cause) = idle(p, gate, &stats)? else {
            // Leave COLO on request: tell the secondary, run alone.
            let _ = p.w.be32(msg::PRIMARY_EXIT).and_then(|()| p.w.flush());
            return Ok(());
        };
        let (pause, bytes) = checkpoint(p)?;
        stats.record(Some(cause), pause, bytes);
        let mut i = p.shared.lock_info();
        i.extra
            .insert("x-colo".into(), stats.json(Some(gate.stats())));
        i.ram.transferred = p.w.offset();
        i.ram.duplicate = p.rw.zero_pages;
        i.ram.normal = p.rw.normal_pages;
    }
}

/// Primary, between checkpoints: run until a checkpoint is due and say
/// why, or `None` when failover was requested meanwhile. Due: after
/// x-checkpoint-delay ms (its value now: a change applies at once), or,
/// with a running secondary, when the outputs differ or the primary's
/// waited x-colo-compare-timeout ms. Meanwhile the secondary hears how much
/// of its output was released (RELEASED) and, every keepalive interval, a
/// heartbeat; a secondary that reported an error or went silent ends COLO.
/// `query-migrate`'s `x-colo` follows each release (`stats`: the
/// checkpoints so far).
fn idle<W: Sink>(
    p: &mut Primary<'_, W>,
    gate: &OutputGate,
    stats: &Stats,
) -> Result<Option<Cause>, MigrationError> {
    let start = Instant::now();
    let mut matched_sent = 0;
    let mut last_write = Instant::now();
    loop {
        if p.shared.failover_requested() {
            return Ok(None);
        }
        let timeout = Duration::from_millis(p.shared.compare_timeout_ms().max(1));
        if !p.periodic {
            if let Some(c) = gate.take_trigger(timeout) {
                return Ok(Some(c));
            }
        }
        let end = start + Duration::from_millis(p.shared.checkpoint_delay_ms().max(1));
        let now = Instant::now();
        if now >= end {
            return Ok(Some(Cause::Periodic));
        }
        let matched = gate.matched();
        if matched != matched_sent {
            p.w.be32(msg::RELEASED)?;
            p.w.be64(matched)?;
            p.w.flush()?;
            matched_sent = matched;
            last_write = now;
            // The output figures move between checkpoints: show them.
            p.shared
                .lock_info()
                .extra
                .insert("x-colo".into(), stats.json(Some(gate.stats())));
        }
        let keepalive = p.rpath.keepalive();
        if let Some(k) = keepalive {
            if now >= last_write + k {
                p.w.be32(msg::HEARTBEAT)?;
                p.w.flush()?;
                last_write = now;
            }
        }
        p.rpath.check()?;
        let mut deadline = end;
        if let Some(k) = keepalive {
            deadline = deadline.min(last_write + k);
        }
        if !p.periodic {
            if let Some(h) = gate.held_deadline(timeout) {
                deadline = deadline.min(h);
            }
        }
        gate.wait(deadline, matched_sent);
    }
}

/// Primary: runs after the first migration's EOF. Returns when COLO ended
/// by failover (the guest then runs here alone).
pub(crate) fn run_primary<W: Sink>(mut p: Primary<'_, W>) -> Result<(), MigrationError> {
    // Between checkpoints this thread sleeps; in one, the stopped guest
    // waits for it (a resumed guest's vCPUs must not delay its next step).
    crate::sched::prefer_this_thread();
    let gate = p.machine.output().ok_or(ColoError::NoOutput)?;
    p.w.be32(msg::MODE)?;
    p.w.be32(u32::from(!p.periodic))?;
    p.w.flush()?;
    // Until the secondary is ready this is an ordinary failed migration.
    expect_rp(&mut p, msg::CHECKPOINT_READY)?;
    let ended = checkpoints(&mut p, &gate).map_err(|e| {
        // A write that broke because the return path's reader shut a
        // silent secondary's connection: say why (its silence).
        if e.is_link_failure() {
            p.rpath.destination_reason().unwrap_or(e)
        } else {
            e
        }
    });
    let reason = match ended {
        Ok(()) => ExitReason::Request,
        Err(e) => {
            // The link or the protocol broke: stop, keep the output held,
            // and wait for the user to pick the survivor.
            let desc = crate::machine::error_chain(&e);
            log::warn!("COLO checkpointing stopped: {desc}; waiting for x-colo-lost-heartbeat");
            p.shared.lock_info().error_desc = Some(desc);
            let _ = p.machine.stop();
            p.shared.close_channel();
            p.shared.wait_failover();
            ExitReason::Request
        }
    };
    p.rpath.set_hook(None);
    p.shared.set_colo_gate(None);
    // Everything held goes out: this side runs alone now.
    gate.set_mode(Mode::Pass).map_err(ColoError::Output)?;
    p.machine.resume().map_err(MigrationError::Machine)?;
    (p.events)(Event::ColoExit(reason));
    Ok(())
}

// -------------------------------------------------------------- secondary

/// The secondary's copy of guest RAM as of the last checkpoint, plus the
/// pages of the checkpoint being received.
struct RamCache {
    maps: Vec<(*mut u8, usize)>,
    /// Pages received in the current checkpoint.
    received: Vec<Bitmap>,
}

impl RamCache {
    fn new(ram: &dyn GuestRam) -> Result<Self, ColoError> {
        let mut maps = Vec::new();
        for b in ram.blocks() {
            let len = b.size as usize;
            // SAFETY: a fresh private anonymous mapping; the result is checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(ColoError::Cache(len, std::io::Error::last_os_error()));
            }
            maps.push((p.cast::<u8>(), len));
        }
        let mut c = Self {
            maps,
            received: ram
                .blocks()
                .iter()
                .map(|b| Bitmap::new(b.pages()))
                .collect(),
        };
        // Start from the guest's RAM after the first migration (zero pages
        // need no copy: the mapping reads as zeros).
        let mut buf = vec![0u8; PAGE_SIZE];
        for (b, blk) in ram.blocks().iter().enumerate() {
            for pg in 0..blk.pages() {
                if ram.read_page(b, pg, &mut buf).is_ok() && !stream::is_zero(&buf) {
                    c.page_mut(b, pg).copy_from_slice(&buf);
                }
            }
        }
        Ok(c)
    }

    fn page_mut(&mut self, block: usize, page: u64) -> &mut [u8] {
        let (p, _) = self.maps[block];
        // SAFETY: callers check block and page against the block size; the
        // mapping lives as long as self and is only used through &mut self.
        unsafe { std::slice::from_raw_parts_mut(p.add(page as usize * PAGE_SIZE), PAGE_SIZE) }
    }

    fn page(&self, block: usize, page: u64) -> &[u8] {
        let (p, _) = self.maps[block];
        // SAFETY: as in page_mut; shared access through &self.
        unsafe { std::slice::from_raw_parts(p.add(page as usize * PAGE_SIZE), PAGE_SIZE) }
    }

    fn check(&self, block: usize, page: u64) -> Result<(), RamError> {
        match self.received.get(block) {
            Some(b) if page < b.len() => Ok(()),
            _ => Err(RamError::OutOfRange { block, page }),
        }
    }

    /// Copy the checkpoint's pages, and the pages the secondary dirtied
    /// itself (`own`), from the cache into guest RAM.
    fn commit(&mut self, ram: &dyn GuestRam, own: &[Bitmap]) -> Result<u64, RamError> {
        let mut n = 0;
        for b in 0..self.received.len() {
            let mut set = self.received[b].clone();
            if let Some(o) = own.get(b) {
                set.or_with(o);
            }
            let mut pg = 0;
            while let Some(page) = set.next_set(pg) {
                ram.write_page(b, page, self.page(b, page))?;
                n += 1;
                pg = page + 1;
            }
            self.received[b] = Bitmap::new(self.received[b].len());
        }
        Ok(n)
    }

    /// Forget a checkpoint that broke off (guest RAM never saw it).
    fn discard_partial(&mut self) {
        for b in &mut self.received {
            *b = Bitmap::new(b.len());
        }
    }
}

impl Drop for RamCache {
    fn drop(&mut self) {
        for &(p, len) in &self.maps {
            // SAFETY: unmapping exactly the mappings made in new().
            unsafe { libc::munmap(p.cast(), len) };
        }
    }
}

// SAFETY: the raw pointers name mappings owned by the cache, used from one
// thread at a time (the incoming thread).
unsafe impl Send for RamCache {}

impl PagePlacer for RamCache {
    fn place_page(&mut self, block: usize, page: u64, data: &[u8]) -> Result<(), RamError> {
        self.check(block, page)?;
        self.page_mut(block, page).copy_from_slice(data);
        self.received[block].set(page);
        Ok(())
    }
    fn place_zero(&mut self, block: usize, page: u64) -> Result<(), RamError> {
        self.check(block, page)?;
        self.page_mut(block, page).fill(0);
        self.received[block].set(page);
        Ok(())
    }
}

fn send_colo(rp: &RpWriter, m: u32) -> Result<(), MigrationError> {
    send_rp(rp, rp::COLO, &m.to_be_bytes()).map_err(|e| {
        MigrationError::Stream(StreamError::Io {
            offset: 0,
            source: e,
        })
    })
}

/// The primary's next COLO message, its heartbeats skipped and its
/// RELEASED counts handed to `gate`.
fn next_msg<R: Read>(r: &mut Reader<R>, gate: Option<&OutputGate>) -> Result<u32, MigrationError> {
    loop {
        match r.be32("COLO message")? {
            msg::HEARTBEAT => {}
            msg::RELEASED => {
                let n = r.be64("released output bytes")?;
                if let Some(g) = gate {
                    g.set_released(n);
                }
            }
            m => return Ok(m),
        }
    }
}

fn read_msg<R: Read>(
    r: &mut Reader<R>,
    gate: Option<&OutputGate>,
    want: u32,
) -> Result<(), MigrationError> {
    let got = next_msg(r, gate)?;
    if got != want {
        return Err(ColoError::Unexpected {
            got,
            expected: want,
        }
        .into());
    }
    Ok(())
}

/// A running secondary's console output on its way to the primary: the
/// `colo-output` thread sends it as it comes (COLO_OUTPUT on the return
/// path); a checkpoint sends the rest itself ([`Forwarder::flush`]) once
/// the guest has stopped, before checkpoint-reply, so the primary has all
/// of it before the checkpoint.
struct Forwarder {
    gate: OutputGate,
    rp: RpWriter,
    /// Taking and sending are one step (the thread's or a flush's), so the
    /// bytes go in order.
    send: Arc<Mutex<()>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    fn start(gate: OutputGate, rp: RpWriter) -> Result<Self, MigrationError> {
        gate.set_mode(Mode::Forward).map_err(ColoError::Output)?;
        let mut f = Self {
            gate,
            rp,
            send: Arc::default(),
            stop: Arc::default(),
            thread: None,
        };
        let (gate, rp, send, stop) = (f.gate.clone(), f.rp.clone(), f.send.clone(), f.stop.clone());
        f.thread = std::thread::Builder::new()
            .name("colo-output".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if gate.wait_forward(Instant::now() + Duration::from_secs(1)) {
                        // A broken link shows on the main thread's reads.
                        let _ = Self::send(&gate, &rp, &send);
                    }
                }
            })
            .ok();
        Ok(f)
    }

    fn send(gate: &OutputGate, rp: &RpWriter, lock: &Mutex<()>) -> Result<(), MigrationError> {
        let _one = lock.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = gate.take_forward();
        for chunk in bytes.chunks(32 << 10) {
            send_rp(rp, rp::COLO_OUTPUT, chunk).map_err(|e| {
                MigrationError::Stream(StreamError::Io {
                    offset: 0,
                    source: e,
                })
            })?;
        }
        Ok(())
    }

    /// Send what is left now.
    fn flush(&self) -> Result<(), MigrationError> {
        Self::send(&self.gate, &self.rp, &self.send)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.gate.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One checkpoint on the secondary, after checkpoint-request was read.
/// A running secondary stops its guest first and sends the rest of its
/// output; once the checkpoint is loaded its output starts again from
/// there and the guest runs on.
fn receive_checkpoint<R: BufRead>(
    dest: &mut Destination<'_>,
    r: &mut Reader<R>,
    rr: &mut RamReader,
    rp: &RpWriter,
    cache: &mut RamCache,
    fwd: Option<&Forwarder>,
) -> Result<(), MigrationError> {
    let gate = fwd.map(|f| &f.gate);
    if let Some(f) = fwd {
        dest.machine.colo_pause().map_err(MigrationError::Machine)?;
        f.flush()?;
    }
    send_colo(rp, msg::CHECKPOINT_REPLY)?;
    read_msg(r, gate, msg::VMSTATE_SEND)?;
    let mut staging = StagingPlacer::new(MAX_SECTION_PAGES);
    loop {
        r.begin_section();
        let at = r.offset();
        let t = r.u8("section type")?;
        if t != section::PART && t != section::END {
            return Err(StreamError::invalid(
                at,
                format!("expected a RAM section in a COLO checkpoint, found {t:#04x}"),
            )
            .into());
        }
        let id = r.be32("section id")?;
        if id != RAM_SECTION_ID {
            return Err(StreamError::invalid(at, format!("RAM section with id {id}")).into());
        }
        rr.new_section();
        staging.clear();
        rr.read_records(r, &mut staging)?;
        r.footer(id)?;
        staging
            .commit(cache)
            .map_err(|source| RamRecordError::Place { offset: at, source })?;
        if t == section::END {
            break;
        }
    }
    read_msg(r, gate, msg::VMSTATE_SIZE)?;
    let n = r.be64("vmstate size")?;
    let catalog = dest.machine.device_catalog();
    if n > catalog.max_stream() {
        return Err(ColoError::TooLarge(n, catalog.max_stream()).into());
    }
    let buf = r.vec(n as usize, "checkpoint device state")?;
    // Everything is here: only now touch the guest.
    send_colo(rp, msg::VMSTATE_RECEIVED)?;
    let devices = parse_devices(&buf, &catalog)?;
    let mut own: Vec<Bitmap> = dest
        .ram
        .blocks()
        .iter()
        .map(|b| Bitmap::new(b.pages()))
        .collect();
    dest.ram.sync_dirty_log(&mut own)?;
    cache.commit(&**dest.ram, &own)?;
    // The commit's own writes are in the log now; they match the cache, so
    // drop them (else every page ever received is copied again each time).
    let mut ours = own;
    dest.ram.sync_dirty_log(&mut ours)?;
    dest.machine
        .colo_load(devices, fwd.is_some())
        .map_err(MigrationError::Machine)?;
    if let Some(g) = gate {
        g.new_epoch();
    }
    send_colo(rp, msg::VMSTATE_LOADED)?;
    if fwd.is_some() {
        dest.machine
            .colo_resume()
            .map_err(MigrationError::Machine)?;
    }
    Ok(())
}

fn parse_devices(
    buf: &[u8],
    catalog: &crate::stream::DeviceCatalog,
) -> Result<Vec<DeviceBlob>, MigrationError> {
    let mut r = Reader::new(buf);
    let mut out: Vec<DeviceBlob> = Vec::new();
    loop {
        r.begin_section();
        let at = r.offset();
        match r.u8("checkpoint section type")? {
            section::FULL => {
                let id = r.be32("section id")?;
                stream::read_device(&mut r, id, at, catalog, &mut out)?;
            }
            section::EOF => return Ok(out),
            t => {
                return Err(StreamError::invalid(
                    at,
                    format!("unexpected section type {t:#04x} in checkpoint device state"),
                )
                .into())
            }
        }
    }
}

/// Secondary: the checkpoints, until the primary leaves COLO (`Ok`) or
/// one fails.
fn receive_checkpoints<R: BufRead>(
    dest: &mut Destination<'_>,
    r: &mut Reader<R>,
    rr: &mut RamReader,
    rp: &RpWriter,
    cache: &mut RamCache,
    fwd: Option<&Forwarder>,
) -> Result<(), MigrationError> {
    let mut stats = Stats::new(fwd.is_some());
    dest.shared
        .lock_info()
        .extra
        .insert("x-colo".into(), stats.json(None));
    loop {
        let m = next_msg(r, fwd.map(|f| &f.gate))?;
        match m {
            msg::CHECKPOINT_REQUEST => {
                let t = Instant::now();
                let before = r.offset();
                receive_checkpoint(dest, r, rr, rp, cache, fwd)?;
                stats.record(None, t.elapsed(), r.offset() - before);
                dest.shared
                    .lock_info()
                    .extra
                    .insert("x-colo".into(), stats.json(None));
            }
            msg::PRIMARY_EXIT => return Ok(()),
            got => {
                return Err(ColoError::Unexpected {
                    got,
                    expected: msg::CHECKPOINT_REQUEST,
                }
                .into())
            }
        }
    }
}

/// Secondary: runs after the first migration's EOF with its device state.
/// Returns when COLO ended: by failover (the guest runs here) or because
/// the primary left COLO (the guest stays paused here).
pub(crate) fn run_secondary<R: BufRead>(
    mut dest: Destination<'_>,
    closer: crate::transport::Closer,
    mut r: Reader<R>,
    mut rr: RamReader,
    rp: RpWriter,
    devices: Vec<DeviceBlob>,
) -> Result<(), MigrationError> {
    // The primary's stopped guest waits for each step of this thread.
    crate::sched::prefer_this_thread();
    read_msg(&mut r, None, msg::MODE)?;
    let running = match r.be32("COLO mode")? {
        0 => false,
        1 => true,
        m => return Err(ColoError::Mode(m).into()),
    };
    let gate = if running {
        Some(dest.machine.output().ok_or(ColoError::NoOutput)?)
    } else {
        None
    };
    dest.machine
        .colo_load(devices, running)
        .map_err(MigrationError::Machine)?;
    let mut cache = RamCache::new(&**dest.ram)?;
    dest.ram.start_dirty_log()?;
    dest.shared.set_closer(Some(closer.clone()));
    let fwd = gate.map(|g| Forwarder::start(g, rp.clone())).transpose()?;
    send_colo(&rp, msg::CHECKPOINT_READY)?;
    set_status(dest.shared, dest.events, Status::Colo);
    if running {
        dest.machine
            .colo_resume()
            .map_err(MigrationError::Machine)?;
    }
    let res = receive_checkpoints(&mut dest, &mut r, &mut rr, &rp, &mut cache, fwd.as_ref());
    let _ = dest.ram.stop_dirty_log();
    match res {
        Ok(_) => {
            // The primary runs alone; this copy is stale and stays paused,
            // its output dropped.
            if let Some(f) = fwd {
                let _ = dest.machine.colo_pause();
                let gate = f.gate.clone();
                drop(f);
                gate.set_mode(Mode::Pass).map_err(ColoError::Output)?;
            }
            closer.close();
            (dest.events)(Event::ColoExit(ExitReason::Request));
            Ok(())
        }
        Err(e) => {
            cache.discard_partial();
            if !dest.shared.failover_requested() {
                let desc = crate::machine::error_chain(&e);
                log::warn!("COLO checkpointing stopped: {desc}; waiting for x-colo-lost-heartbeat");
                dest.shared.lock_info().error_desc = Some(desc);
                closer.close();
                // A running secondary waits paused: neither side's guest
                // runs until the user picks one.
                if fwd.is_some() {
                    let _ = dest.machine.colo_pause();
                }
                dest.shared.wait_failover();
            }
            if let Some(f) = fwd {
                // What the primary did not release, this console says now.
                let gate = f.gate.clone();
                drop(f);
                gate.failover().map_err(ColoError::Output)?;
            }
            dest.machine
                .colo_takeover(!running)
                .map_err(MigrationError::Machine)?;
            (dest.events)(Event::ColoExit(ExitReason::Request));
            Ok(())
        }
    }
}

//! Precopy live migration: the source's rounds and the destination's loader.
//!
//! Source (one migration thread, plus a return-path reader thread):
//!
//! ```text
//! header, CONFIGURATION, [OPEN_RETURN_PATH, [POSTCOPY_ADVISE, PING 1
//!      [, POSTCOPY_PREEMPT, PING 4] | ENABLE_COLO, PING 3]]
//! START "ram" (block list, EOS)
//! PART "ram" ... each round: the pages dirty at its sync, 256 per PART,
//!      until (dirty bytes / bandwidth) <= downtime-limit
//! [PING 6 <- PONG 6: the destination has read all of it (return path
//!      only); the guest still runs; then one more sync]
//! -- guest stopped, every device saved at that instant (Machine::stop) --
//! PART ... (the last dirty pages)   END "ram" (EOS only)   FULL device sections   EOF
//! <- SHUT(0) from the destination: it loaded everything (return path only)
//! ```
//!
//! Destination (incoming thread): reads sections until EOF, placing pages as
//! they come and keeping device state aside; only after EOF are devices
//! loaded, so a truncated or corrupt stream never leaves a half-loaded guest
//! running. It then answers SHUT(0), or ERROR_DESC + SHUT(1) on failure.
//!
//! From the stop to SHUT(0) both migration threads run real-time
//! ([`crate::RealTimeSection`]; the destination from END on): that is the
//! downtime.
//!
//! On any failure the source resumes its guest if it had stopped it.

use std::io::{BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::postcopy::{dest_package, send_rp, DestPostcopy, RpWriter, TrackingPlacer};
use crate::ram::{Bitmap, GuestRam, RamError, RamReader, RamRecordError, RamWriter};
use crate::status::{Capabilities, Parameters, Shared, Status};
use crate::stream::{
    self, cmd, ping, rp, section, BufSink, DeviceBlob, Reader, Sink, StreamError, Writer, PAGE_SIZE,
};
use crate::transport::{self, Channel, Listener, Uri};

/// Section id of RAM.
pub const RAM_SECTION_ID: u32 = 1;
/// Version of the RAM section.
pub const RAM_SECTION_VERSION: u32 = 4;
const RAM_IDSTR: &str = "ram";

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
    #[error("machine: {0}")]
    Machine(String),
    /// The destination reported a failure.
    #[error("destination failed: {0}")]
    Destination(String),
    /// Postcopy.
    #[error(transparent)]
    Postcopy(Box<crate::postcopy::PostcopyError>),
    /// COLO.
    #[error(transparent)]
    Colo(Box<crate::colo::ColoError>),
    /// The peer went away.
    #[error("connection to the {0} was lost")]
    PeerLost(&'static str),
    /// Cancelled by the user.
    #[error("migration cancelled")]
    Cancelled,
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
    pub blocks: Vec<crate::ram::RamBlock>,
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
    fn stop(&mut self) -> Result<Stopped, String>;
    /// Run the vCPUs again after a failed migration.
    fn resume(&mut self) -> Result<(), String>;
    /// COLO output commit: hold the guest's console output from now on
    /// (`true`), or release everything held and stop holding (`false`).
    fn hold_output(&mut self, _hold: bool) -> Result<(), String> {
        Err("this machine cannot hold its output (COLO)".into())
    }
    /// COLO: release the output held so far (the guest is stopped and the
    /// secondary has loaded a checkpoint covering it).
    fn release_output(&mut self) -> Result<(), String> {
        Err("this machine cannot hold its output (COLO)".into())
    }
}

/// The destination VMM's side of the machine.
pub trait IncomingMachine: Send {
    /// Load all device state (the VM is stopped; in postcopy RAM is still
    /// arriving) and start the guest unless it is to stay paused.
    fn load_devices(&mut self, blobs: Vec<DeviceBlob>) -> Result<(), String>;
    /// This side's capabilities now (asked at POSTCOPY_ADVISE, ENABLE_COLO).
    fn capabilities(&mut self) -> Capabilities {
        Capabilities::default()
    }
    /// COLO secondary: take a complete checkpoint's device state (checked
    /// now; the machine may keep it and load it at takeover, since the
    /// guest does not run before).
    fn colo_load(&mut self, _blobs: Vec<DeviceBlob>) -> Result<(), String> {
        Err("COLO is not supported by this machine".into())
    }
    /// COLO secondary failover: run the guest from the last checkpoint.
    fn colo_takeover(&mut self) -> Result<(), String> {
        Err("COLO is not supported by this machine".into())
    }
    /// Postcopy failed after the switch: stop the guest for good (its RAM
    /// is incomplete) and say why.
    fn abandon(&mut self, _why: &str) {}
}

/// What the engine tells the VMM as it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// New status.
    Status(Status),
    /// A dirty-log sync (QEMU's MIGRATION_PASS), counting from 1.
    Pass(u64),
    /// COLO ended on this side (QEMU's COLO_EXIT).
    ColoExit(crate::colo::ExitReason),
}

/// Callback for [`Event`]s.
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// Everything an outgoing migration needs.
pub struct Outgoing {
    /// Where to.
    pub uri: Uri,
    /// Our machine's configuration (sent in the header).
    pub config: MachineConfig,
    /// Guest RAM.
    pub ram: Arc<dyn GuestRam>,
    /// Stop/save/resume.
    pub machine: Box<dyn Machine>,
    /// Parameters at start.
    pub params: Parameters,
    /// Capabilities at start.
    pub caps: Capabilities,
    /// Status and statistics.
    pub shared: Arc<Shared>,
    /// Event callback.
    pub events: EventSink,
}

pub(crate) fn set_status(shared: &Shared, events: &EventSink, s: Status) {
    {
        let mut i = shared.info();
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
fn begin_info(shared: &Shared, events: &EventSink, ram: &dyn GuestRam, status: Status) {
    {
        let mut i = shared.info();
        *i = crate::status::Info {
            started: Some(Instant::now()),
            status,
            ..Default::default()
        };
        i.ram.total = ram.blocks().iter().map(|b| b.size).sum();
    }
    events(Event::Status(status));
}

/// Paces writes to a byte rate.
pub(crate) struct Throttle {
    rate: u64,
    window_start: Instant,
    window_bytes: u64,
    unchecked: u64,
}

impl Throttle {
    pub(crate) fn new(rate: u64) -> Self {
        Self {
            rate,
            window_start: Instant::now(),
            window_bytes: 0,
            unchecked: 0,
        }
    }

    pub(crate) fn account(&mut self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        self.window_bytes += bytes;
        // Read the clock once per millisecond's worth of bytes, not per
        // page: a clock read costs more than copying a zero-page record.
        self.unchecked += bytes;
        if self.unchecked < (self.rate / 1000).max(PAGE_SIZE as u64) {
            return;
        }
        self.unchecked = 0;
        let due = Duration::from_secs_f64(self.window_bytes as f64 / self.rate as f64);
        let spent = self.window_start.elapsed();
        if due > spent {
            std::thread::sleep(due - spent);
        }
        if self.window_start.elapsed() > Duration::from_millis(100) {
            self.window_start = Instant::now();
            self.window_bytes = 0;
        }
    }
}

/// Most pages in one RAM section the source sends in a precopy round (a
/// receiver that stages sections holds one at a time).
pub const SECTION_PAGES: u64 = 256;
/// Most pages a receiver that stages (postcopy after LISTEN, COLO) accepts
/// in one section.
pub const MAX_SECTION_PAGES: usize = 1024;

/// Start a RAM section of `kind` (PART or END) after START: its header,
/// and the record writer forgets its block (the first record names it).
pub(crate) fn begin_ram_section<W: Sink>(
    w: &mut Writer<W>,
    rw: &mut RamWriter,
    kind: u8,
) -> Result<(), StreamError> {
    w.begin_section();
    w.u8(kind)?;
    w.be32(RAM_SECTION_ID)?;
    rw.new_section();
    Ok(())
}

/// End a RAM section: EOS and the footer.
pub(crate) fn end_ram_section<W: Sink>(
    w: &mut Writer<W>,
    rw: &mut RamWriter,
) -> Result<(), StreamError> {
    rw.write_eos(w)?;
    w.footer(RAM_SECTION_ID)
}

/// Send every page set in `dirty` (clearing it, and setting it in `sent`)
/// as PART sections of at most [`SECTION_PAGES`] pages.
/// `progress(offset, writer, bytes)` runs after each page; when it returns
/// `false` the round stops early (the switch to postcopy).
pub(crate) fn send_dirty<W: Sink>(
    w: &mut Writer<W>,
    rw: &mut RamWriter,
    ram: &dyn GuestRam,
    dirty: &mut [Bitmap],
    sent: &mut [Bitmap],
    progress: &mut dyn FnMut(u64, &RamWriter, u64) -> Result<bool, MigrationError>,
) -> Result<(), MigrationError> {
    let mut in_section = 0u64;
    'blocks: for (b, bm) in dirty.iter_mut().enumerate() {
        let mut p = 0;
        while let Some(page) = bm.next_set(p) {
            bm.test_and_clear(page);
            let fresh = !sent[b].get(page);
            sent[b].set(page);
            if in_section == 0 {
                begin_ram_section(w, rw, section::PART)?;
            }
            let before = w.offset();
            rw.send_page(w, ram, b, page, fresh)??;
            in_section += 1;
            if in_section == SECTION_PAGES {
                end_ram_section(w, rw)?;
                in_section = 0;
            }
            p = page + 1;
            if !progress(w.offset(), rw, w.offset() - before)? {
                break 'blocks;
            }
        }
    }
    if in_section > 0 {
        end_ram_section(w, rw)?;
    }
    Ok(())
}

/// Source side: runs to completion, failure or cancel. Returns the final status.
pub fn run_outgoing(mut o: Outgoing) -> Status {
    // The rounds copy in bulk beside the running guest: no priority over
    // it (postcopy and COLO raise it where the guest waits on this thread).
    crate::normal_priority();
    begin_info(&o.shared, &o.events, &*o.ram, Status::Setup);
    o.shared
        .checkpoint_delay_ms
        .store(o.params.x_checkpoint_delay_ms, Ordering::SeqCst);
    let mut stopped = false;
    let run_sent = AtomicBool::new(false);
    let result = outgoing(&mut o, &mut stopped, &run_sent);
    let _ = o.ram.stop_dirty_log();
    let status = match result {
        Ok(()) => Status::Completed,
        Err(e) => {
            if run_sent.load(Ordering::SeqCst) {
                // The destination may be running the guest: resuming ours
                // would fork it. It stays stopped; the user decides.
                o.shared.info().postcopy_after_run = true;
                eprintln!("minivmm: postcopy failed after the destination started the guest; the guest stays stopped here");
            } else if stopped {
                // Running again, or paused if it was (not finish-migrate).
                if let Err(re) = o.machine.resume() {
                    eprintln!("minivmm: migration failed and the guest could not be resumed: {re}");
                }
            }
            let cancelled = o.shared.cancelled();
            let mut i = o.shared.info();
            i.error_desc = Some(if cancelled {
                "migration cancelled".to_string()
            } else {
                crate::error_chain(&e)
            });
            if cancelled {
                Status::Cancelled
            } else {
                Status::Failed
            }
        }
    };
    {
        let mut i = o.shared.info();
        i.total_time_ms = i.started.map(|s| s.elapsed().as_millis() as u64);
    }
    *o.shared.closer.lock().unwrap_or_else(|e| e.into_inner()) = None;
    set_status(&o.shared, &o.events, status);
    status
}

/// Messages from the return-path reader thread.
pub(crate) type RpReceiver = Receiver<Result<(u16, Vec<u8>), StreamError>>;

/// Reads return-path messages into a channel until the peer closes.
fn spawn_rp_reader(reader: Box<dyn Read + Send>) -> RpReceiver {
    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name("mig-return".into())
        .spawn(move || {
            // It mostly sleeps; when a postcopy page request arrives, a
            // guest is waiting for it.
            crate::prefer_this_thread();
            let mut r = Reader::new(BufReader::new(reader));
            loop {
                let m = stream::read_rp(&mut r);
                let end = m.is_err();
                if tx.send(m).is_err() || end {
                    break;
                }
            }
        })
        .ok();
    rx
}

/// Turn a return-path message into an error, if it reports one.
pub(crate) fn rp_error(
    kind: u16,
    data: &[u8],
    last_desc: &mut Option<String>,
) -> Option<MigrationError> {
    match kind {
        rp::ERROR_DESC => {
            *last_desc = Some(String::from_utf8_lossy(data).into_owned());
            None
        }
        rp::SHUT if data.len() == 4 && data != [0, 0, 0, 0] => Some(MigrationError::Destination(
            last_desc
                .take()
                .unwrap_or_else(|| "the destination reported an error".into()),
        )),
        _ => None,
    }
}

fn outgoing(
    o: &mut Outgoing,
    stopped: &mut bool,
    run_sent: &AtomicBool,
) -> Result<(), MigrationError> {
    let start = Instant::now();
    let mut chan: Channel = transport::connect(&o.uri)?;
    *o.shared.closer.lock().unwrap_or_else(|e| e.into_inner()) = Some(chan.closer.clone());
    if o.shared.cancelled() {
        return Err(MigrationError::Cancelled);
    }
    let writer = std::mem::replace(&mut chan.writer, Box::new(std::io::sink()));
    let mut w = Writer::new(BufSink::with_capacity(1 << 20, writer));
    stream::write_header(&mut w)?;
    let cfg = serde_json::to_vec(&o.config).map_err(|e| MigrationError::Config(e.to_string()))?;
    stream::write_config(&mut w, &cfg)?;
    let rp_rx = if chan.duplex {
        w.command(cmd::OPEN_RETURN_PATH, &[])?;
        let reader = std::mem::replace(&mut chan.reader, Box::new(std::io::empty()));
        Some(spawn_rp_reader(reader))
    } else {
        None
    };
    let mut last_desc = None;
    let mut preempt = None;
    if o.caps.postcopy_ram {
        let rx = rp_rx.as_ref().ok_or_else(|| {
            crate::postcopy::PostcopyError::Refused(format!(
                "postcopy needs a return path; '{}' has none (use tcp: or unix:)",
                o.uri
            ))
        })?;
        crate::postcopy::advise_source(&mut w, rx, &mut last_desc)?;
        if o.caps.postcopy_preempt {
            preempt = Some(crate::postcopy::connect_preempt(
                &o.uri,
                &mut w,
                rx,
                &mut last_desc,
            )?);
        }
    }
    if o.caps.x_colo {
        if o.caps.postcopy_ram {
            return Err(MigrationError::Config(
                "x-colo and postcopy-ram cannot be used together".into(),
            ));
        }
        if rp_rx.is_none() {
            return Err(MigrationError::Config(format!(
                "COLO needs a return path; '{}' has none (use tcp: or unix:)",
                o.uri
            )));
        }
        w.command(cmd::ENABLE_COLO, &[])?;
        if let Some(rx) = &rp_rx {
            ping_and_wait(&mut w, rx, &mut last_desc, ping::COLO)?;
        }
    }
    let check_rp =
        |rx: &Option<RpReceiver>, last_desc: &mut Option<String>| -> Result<(), MigrationError> {
            if let Some(rx) = rx {
                while let Ok(m) = rx.try_recv() {
                    match m {
                        Ok((k, d)) => {
                            if let Some(e) = rp_error(k, &d, last_desc) {
                                return Err(e);
                            }
                        }
                        Err(_) => return Err(MigrationError::PeerLost("destination")),
                    }
                }
            }
            Ok(())
        };

    let result = (|| {
        let ram = o.ram.clone();
        let blocks = ram.blocks().to_vec();
        ram.start_dirty_log()?;
        let mut dirty: Vec<Bitmap> = blocks.iter().map(|b| Bitmap::full(b.pages())).collect();
        let mut sent: Vec<Bitmap> = blocks.iter().map(|b| Bitmap::new(b.pages())).collect();
        let want_postcopy = o.caps.postcopy_ram;
        let postcopy = move |sh: &Shared| want_postcopy && sh.start_postcopy.load(Ordering::SeqCst);
        let mut rw = RamWriter::new();
        w.begin_section();
        w.u8(section::START)?;
        w.be32(RAM_SECTION_ID)?;
        w.idstr(RAM_IDSTR)?;
        w.be32(0)?;
        w.be32(RAM_SECTION_VERSION)?;
        rw.write_block_list(&mut w, &blocks)?;
        rw.write_eos(&mut w)?;
        w.footer(RAM_SECTION_ID)?;
        w.flush()?;
        o.shared.info().setup_time_ms = start.elapsed().as_millis() as u64;
        set_status(&o.shared, &o.events, Status::Active);

        let mut throttle = Throttle::new(o.params.max_bandwidth);
        let mut bandwidth: f64 = 0.0; // bytes/s measured in the last round
        let mut pass = 0u64;
        // The destination has read everything sent so far (ping::DRAINED).
        let mut drained = false;
        loop {
            if o.shared.cancelled() {
                return Err(MigrationError::Cancelled);
            }
            check_rp(&rp_rx, &mut last_desc)?;
            ram.sync_dirty_log(&mut dirty)?;
            pass += 1;
            let remaining: u64 = dirty.iter().map(Bitmap::count).sum();
            let remaining_bytes = remaining * PAGE_SIZE as u64;
            let bw = if o.params.max_bandwidth > 0 && bandwidth > 0.0 {
                bandwidth.min(o.params.max_bandwidth as f64)
            } else {
                bandwidth
            };
            let expected_ms = if bw > 0.0 {
                (remaining_bytes as f64 / bw * 1000.0) as u64
            } else {
                u64::MAX
            };
            {
                let mut i = o.shared.info();
                i.ram.dirty_sync_count = pass;
                i.ram.remaining = remaining_bytes;
                i.expected_downtime_ms = (expected_ms != u64::MAX).then_some(expected_ms);
            }
            (o.events)(Event::Pass(pass));
            if pass > 1 && (remaining == 0 || expected_ms <= o.params.downtime_limit_ms) {
                // Stop only once the destination has read what is already
                // on its way (up to a few MiB in socket buffers, which the
                // bandwidth above, measured at the source's writes, does
                // not see): it would otherwise be downtime. The guest runs
                // meanwhile; a sync follows.
                if let (false, Some(rx)) = (drained, &rp_rx) {
                    ping_and_wait(&mut w, rx, &mut last_desc, ping::DRAINED)?;
                    drained = true;
                    continue;
                }
                break;
            }
            if postcopy(&o.shared) {
                if let Some(rx) = &rp_rx {
                    crate::postcopy::discard_before_stop(
                        &mut w,
                        &*ram,
                        &dirty,
                        &mut sent,
                        rx,
                        &mut last_desc,
                    )?;
                }
                break;
            }
            // One round: every page dirty at the sync.
            drained = false;
            let round_start = Instant::now();
            let round_bytes_start = w.offset();
            let mut sent_now = 0u64;
            let shared = o.shared.clone();
            send_dirty(
                &mut w,
                &mut rw,
                &*ram,
                &mut dirty,
                &mut sent,
                &mut |w, rw, n| {
                    throttle.account(n);
                    sent_now += 1;
                    if postcopy(&shared) {
                        return Ok(false);
                    }
                    if sent_now.is_multiple_of(4096) {
                        if shared.cancelled() {
                            return Err(MigrationError::Cancelled);
                        }
                        let mut i = shared.info();
                        i.ram.transferred = w;
                        i.ram.remaining =
                            remaining_bytes.saturating_sub(sent_now * PAGE_SIZE as u64);
                        i.ram.duplicate = rw.zero_pages;
                        i.ram.normal = rw.normal_pages;
                    }
                    Ok(true)
                },
            )?;
            w.flush()?;
            let secs = round_start.elapsed().as_secs_f64().max(1e-6);
            bandwidth = (w.offset() - round_bytes_start) as f64 / secs;
            let mut i = o.shared.info();
            i.ram.transferred = w.offset();
            i.ram.duplicate = rw.zero_pages;
            i.ram.normal = rw.normal_pages;
            i.ram.mbps = bandwidth * 8.0 / 1e6;
            i.ram.dirty_pages_rate = (remaining as f64 / secs) as u64;
        }

        // Stop and copy (with pause-before-switchover, the guest stays stopped
        // in pre-switchover until migrate-continue, as in QEMU).
        let stop_start = Instant::now();
        let Stopped { devices } = o.machine.stop().map_err(MigrationError::Machine)?;
        *stopped = true;
        if let (true, Some(rx)) = (postcopy(&o.shared), &rp_rx) {
            ram.sync_dirty_log(&mut dirty)?;
            o.shared.info().ram.dirty_sync_count = pass + 1;
            (o.events)(Event::Pass(pass + 1));
            return crate::postcopy::run_source(
                crate::postcopy::SourcePhase {
                    w: &mut w,
                    rw: &mut rw,
                    ram: &*ram,
                    dirty: &mut dirty,
                    sent: &sent,
                    rx,
                    shared: &o.shared,
                    events: &o.events,
                    params: &o.params,
                    last_desc: &mut last_desc,
                    stop_start,
                    preempt: preempt.take(),
                    running: false,
                },
                &devices,
                run_sent,
            );
        }
        if o.caps.pause_before_switchover {
            set_status(&o.shared, &o.events, Status::PreSwitchover);
            o.shared.wait_switchover();
            if o.shared.cancelled() {
                return Err(MigrationError::Cancelled);
            }
            set_status(&o.shared, &o.events, Status::Device);
        }
        // The rest is downtime, bounded by downtime-limit: real-time until
        // the destination's SHUT(0) (see RealTimeSection).
        let final_round = crate::RealTimeSection::enter();
        ram.sync_dirty_log(&mut dirty)?;
        o.shared.info().ram.dirty_sync_count = pass + 1;
        (o.events)(Event::Pass(pass + 1));
        send_dirty(
            &mut w,
            &mut rw,
            &*ram,
            &mut dirty,
            &mut sent,
            &mut |_, _, _| Ok(true),
        )?;
        begin_ram_section(&mut w, &mut rw, section::END)?;
        end_ram_section(&mut w, &mut rw)?;
        for (i, d) in devices.iter().enumerate() {
            stream::write_device(&mut w, RAM_SECTION_ID + 1 + i as u32, d)?;
        }
        w.u8(section::EOF)?;
        w.flush()?;
        {
            let mut i = o.shared.info();
            i.ram.transferred = w.offset();
            i.ram.remaining = 0;
            i.ram.duplicate = rw.zero_pages;
            i.ram.normal = rw.normal_pages;
            i.downtime_ms = Some(stop_start.elapsed().as_millis() as u64);
        }
        if let (true, Some(rx)) = (o.caps.x_colo, &rp_rx) {
            drop(final_round);
            return crate::colo::run_primary(crate::colo::Primary {
                w: &mut w,
                rw: &mut rw,
                ram: &*ram,
                dirty: &mut dirty,
                sent: &mut sent,
                rx,
                machine: &mut *o.machine,
                shared: &o.shared,
                events: &o.events,
                last_desc: &mut last_desc,
            });
        }
        drop(w);
        chan.finish().map_err(MigrationError::Machine)?;

        // Wait for the destination's verdict.
        if let Some(rx) = &rp_rx {
            loop {
                if o.shared.cancelled() {
                    return Err(MigrationError::Cancelled);
                }
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(Ok((rp::SHUT, d))) if d == [0, 0, 0, 0] => break,
                    Ok(Ok((k, d))) => {
                        if let Some(e) = rp_error(k, &d, &mut last_desc) {
                            return Err(e);
                        }
                    }
                    Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => {
                        return Err(MigrationError::PeerLost("destination"));
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                }
            }
        }
        o.shared.info().downtime_ms = Some(stop_start.elapsed().as_millis() as u64);
        drop(final_round);
        Ok(())
    })();
    match result {
        // A broken connection is usually the destination giving up: if it
        // said why on the return path, report that instead of EPIPE.
        Err(e @ (MigrationError::Stream(StreamError::Io { .. }) | MigrationError::PeerLost(_))) => {
            Err(destination_reason(&rp_rx, &mut last_desc).unwrap_or(e))
        }
        r => r,
    }
}

/// Source: send PING `value` and wait for its PONG, so that the
/// destination has judged every command before it (or said why not).
pub(crate) fn ping_and_wait<W: Sink>(
    w: &mut Writer<W>,
    rx: &RpReceiver,
    last_desc: &mut Option<String>,
    value: u32,
) -> Result<(), MigrationError> {
    w.command(cmd::PING, &value.to_be_bytes())?;
    w.flush()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .ok_or(MigrationError::PeerLost("destination"))?;
        match rx.recv_timeout(left) {
            Ok(Ok((rp::PONG, d))) if d == value.to_be_bytes() => return Ok(()),
            Ok(Ok((k, d))) => {
                if let Some(e) = rp_error(k, &d, last_desc) {
                    return Err(e);
                }
            }
            _ => {
                return Err(last_desc
                    .take()
                    .map(MigrationError::Destination)
                    .unwrap_or(MigrationError::PeerLost("destination")))
            }
        }
    }
}

/// The destination's error from the return path, waiting briefly for it.
fn destination_reason(
    rx: &Option<RpReceiver>,
    last_desc: &mut Option<String>,
) -> Option<MigrationError> {
    let rx = rx.as_ref()?;
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match rx.recv_timeout(left) {
            Ok(Ok((k, d))) => {
                if let Some(e) = rp_error(k, &d, last_desc) {
                    return Some(e);
                }
            }
            _ => return last_desc.take().map(MigrationError::Destination),
        }
    }
}

/// The destination's end of the return path: the channel's writer, taken.
fn return_path(chan: &mut Channel) -> RpWriter {
    Arc::new(Mutex::new(std::mem::replace(
        &mut chan.writer,
        Box::new(std::io::sink()),
    )))
}

/// Reads a whole COMMAND section, its type byte included: (command, data).
fn read_command(r: &mut Reader<impl Read>) -> Result<(u16, Vec<u8>), StreamError> {
    r.begin_section();
    let at = r.offset();
    match r.u8("section type")? {
        section::COMMAND => read_command_body(r),
        other => Err(StreamError::invalid(
            at,
            format!("section type {other:#04x}, expected a command"),
        )),
    }
}

/// Reads a COMMAND section after its type byte, checking its CRC.
fn read_command_body(r: &mut Reader<impl Read>) -> Result<(u16, Vec<u8>), StreamError> {
    let c = r.be16("command")?;
    let len = r.be16("command length")?;
    let data = r.vec(len as usize, "command data")?;
    r.check_crc("command")?;
    Ok((c, data))
}

/// Everything an incoming migration needs.
pub struct Incoming {
    /// Our configuration, to check the source's against.
    pub config: MachineConfig,
    /// Guest RAM. It must read as zero when the migration starts (a VM that
    /// never ran, its RAM discarded): ZERO records for pages not written
    /// since are skipped without touching the page.
    pub ram: Arc<dyn GuestRam>,
    /// Loads device state.
    pub machine: Box<dyn IncomingMachine>,
    /// Status.
    pub shared: Arc<Shared>,
    /// Events.
    pub events: EventSink,
}

/// Destination side: read one migration from `chan`. Returns the final status.
pub fn run_incoming(mut inc: Incoming, mut chan: Channel, listener: Option<&Listener>) -> Status {
    begin_info(&inc.shared, &inc.events, &*inc.ram, Status::Active);
    let mut rp_writer: Option<RpWriter> = None;
    // Real-time for the downtime (see RealTimeSection): from precopy's
    // final RAM section to SHUT(0) sent, or from the postcopy switch's
    // PING to RUN.
    let mut switch: Option<crate::RealTimeSection> = None;
    let result = incoming(&mut inc, &mut chan, listener, &mut rp_writer, &mut switch);
    let status = match result {
        Ok(()) => {
            if let Some(w) = &rp_writer {
                let _ = send_rp(w, rp::SHUT, &0u32.to_be_bytes());
            }
            drop(switch);
            Status::Completed
        }
        Err(e) => {
            let desc = crate::error_chain(&e);
            if let Some(w) = &rp_writer {
                let _ = send_rp(w, rp::ERROR_DESC, desc.as_bytes());
                let _ = send_rp(w, rp::SHUT, &1u32.to_be_bytes());
            }
            inc.shared.info().error_desc = Some(desc);
            Status::Failed
        }
    };
    {
        let mut i = inc.shared.info();
        i.total_time_ms = i.started.map(|s| s.elapsed().as_millis() as u64);
    }
    set_status(&inc.shared, &inc.events, status);
    status
}

fn incoming(
    inc: &mut Incoming,
    chan: &mut Channel,
    listener: Option<&Listener>,
    rp_writer: &mut Option<RpWriter>,
    switch: &mut Option<crate::RealTimeSection>,
) -> Result<(), MigrationError> {
    let reader = std::mem::replace(&mut chan.reader, Box::new(std::io::empty()));
    // 4 MiB: a batched read (transport::ReadBatching) gets 1 MiB or more.
    let mut r = Reader::new(BufReader::with_capacity(4 << 20, reader));
    // Bulk pages come first: batched wake-ups until the source's stop,
    // postcopy switch or COLO comes near (transport::ReadBatching).
    chan.batching.allow();
    stream::read_header(&mut r)?;
    let at = r.offset();
    let cfg = stream::read_config(&mut r)?;
    let src: MachineConfig = serde_json::from_slice(&cfg)
        .map_err(|e| StreamError::invalid(at, format!("configuration is not valid: {e}")))?;
    if let Err(why) = inc.config.check_source(&src) {
        // The source opens its return path right after the configuration
        // (on a duplex channel): open ours so run_incoming can tell it why.
        if chan.duplex {
            if let Ok((cmd::OPEN_RETURN_PATH, _)) = read_command(&mut r) {
                *rp_writer = Some(return_path(chan));
            }
        }
        return Err(MigrationError::Config(why));
    }

    let ram = inc.ram.clone();
    let mut rr = RamReader::new(ram.blocks().to_vec());
    let mut post: Option<Arc<DestPostcopy>> = None;
    let mut preempt: Option<crate::postcopy::PreemptIn> = None;
    let mut colo = false;
    let mut ram_started = false;
    let mut ram_ended = false;
    let mut devices: Vec<DeviceBlob> = Vec::new();
    // RAM reads as zero at the start (see `Incoming::ram`).
    let mut zeroed: Vec<Bitmap> = ram
        .blocks()
        .iter()
        .map(|b| Bitmap::full(b.pages()))
        .collect();
    loop {
        r.begin_section();
        let at = r.offset();
        let t = r.u8("section type")?;
        match t {
            section::START | section::PART | section::END => {
                let id = r.be32("section id")?;
                if t == section::START {
                    let name = r.idstr("section name")?;
                    let _instance = r.be32("section instance")?;
                    let version = r.be32("section version")?;
                    if name != RAM_IDSTR || id != RAM_SECTION_ID {
                        return Err(StreamError::invalid(
                            at,
                            format!("unknown iterative section '{name}' (id {id})"),
                        )
                        .into());
                    }
                    if version != RAM_SECTION_VERSION {
                        return Err(StreamError::invalid(
                            at,
                            format!(
                                "RAM section version {version}, expected {RAM_SECTION_VERSION}"
                            ),
                        )
                        .into());
                    }
                    if ram_started {
                        return Err(StreamError::invalid(at, "second RAM START section").into());
                    }
                    ram_started = true;
                    rr.new_section();
                    rr.read_block_list(&mut r)?;
                } else {
                    if !ram_started || id != RAM_SECTION_ID {
                        return Err(StreamError::invalid(
                            at,
                            format!("section part for unknown section id {id}"),
                        )
                        .into());
                    }
                    if ram_ended {
                        return Err(
                            StreamError::invalid(at, "RAM section data after its END").into()
                        );
                    }
                    rr.new_section();
                }
                // Pages go straight into guest RAM; the footer's CRC is
                // checked after them. The guest cannot run on a section
                // that fails it: nothing runs until the whole stream has
                // arrived intact (postcopy's LISTEN and COLO's checkpoints,
                // where RAM is live or must stay whole, stage instead).
                rr.read_records(
                    &mut r,
                    &mut TrackingPlacer {
                        ram: &*ram,
                        post: post.as_deref(),
                        zeroed: &mut zeroed,
                    },
                )?;
                r.footer(id)?;
                if t == section::END {
                    ram_ended = true;
                    // The source has stopped the guest (precopy's final
                    // round): what follows is downtime.
                    switch.get_or_insert_with(crate::RealTimeSection::enter);
                }
                let mut i = inc.shared.info();
                i.ram.transferred = r.offset();
                i.ram.duplicate = rr.zero_pages;
                i.ram.normal = rr.pages - rr.zero_pages;
            }
            section::FULL => {
                let id = r.be32("section id")?;
                let blob = stream::read_device_body(&mut r, id)?;
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
            section::COMMAND => {
                let (c, data) = read_command_body(&mut r)?;
                match c {
                    cmd::OPEN_RETURN_PATH => {
                        if !chan.duplex {
                            return Err(StreamError::invalid(
                                at,
                                "OPEN_RETURN_PATH on a one-way channel",
                            )
                            .into());
                        }
                        *rp_writer = Some(return_path(chan));
                    }
                    cmd::POSTCOPY_ADVISE => {
                        let rp = rp_writer.clone().ok_or_else(|| {
                            StreamError::invalid(at, "POSTCOPY_ADVISE without a return path")
                        })?;
                        if post.is_some() || ram_started {
                            return Err(StreamError::invalid(
                                at,
                                "POSTCOPY_ADVISE after RAM or twice",
                            )
                            .into());
                        }
                        let enabled = inc.machine.capabilities().postcopy_ram;
                        post = Some(Arc::new(DestPostcopy::advise(
                            ram.clone(),
                            enabled,
                            &data,
                            rp,
                        )?));
                    }
                    cmd::POSTCOPY_RAM_DISCARD => {
                        let p = post.as_ref().ok_or_else(|| {
                            StreamError::invalid(at, "POSTCOPY_RAM_DISCARD without POSTCOPY_ADVISE")
                        })?;
                        p.discard(&data)?;
                    }
                    cmd::PACKAGED => {
                        let p = post.clone().ok_or_else(|| {
                            StreamError::invalid(at, "PACKAGED without POSTCOPY_ADVISE")
                        })?;
                        let len = <[u8; 4]>::try_from(&data[..])
                            .map(u32::from_be_bytes)
                            .map_err(|_| {
                                StreamError::invalid(at, "PACKAGED needs a 4-byte length")
                            })?;
                        if len > crate::postcopy::MAX_PACKAGE {
                            return Err(StreamError::invalid(
                                at,
                                format!("package of {len} bytes (limit 64 MiB)"),
                            )
                            .into());
                        }
                        if !ram_started {
                            return Err(StreamError::invalid(
                                at,
                                "PACKAGED before the RAM section",
                            )
                            .into());
                        }
                        let pkg = r.vec(len as usize, "package")?;
                        let switch = switch.take().unwrap_or_else(crate::RealTimeSection::enter);
                        return dest_package(
                            inc,
                            chan.closer.clone(),
                            p,
                            pkg,
                            (r, rr),
                            preempt,
                            switch,
                        );
                    }
                    cmd::POSTCOPY_PREEMPT => {
                        if post.is_none() || preempt.is_some() {
                            return Err(StreamError::invalid(
                                at,
                                "POSTCOPY_PREEMPT without POSTCOPY_ADVISE or twice",
                            )
                            .into());
                        }
                        if !inc.machine.capabilities().postcopy_preempt {
                            return Err(crate::postcopy::PostcopyError::Refused(
                                "the postcopy-preempt capability is not set on the destination \
                                 (migrate-set-capabilities on both sides)"
                                    .into(),
                            )
                            .into());
                        }
                        let l = listener.ok_or_else(|| {
                            StreamError::invalid(at, "POSTCOPY_PREEMPT on a one-way channel")
                        })?;
                        preempt = Some(crate::postcopy::accept_preempt(l)?);
                    }
                    cmd::PING => {
                        if data.len() != 4 {
                            return Err(StreamError::invalid(at, "PING needs 4 bytes").into());
                        }
                        if let Some(w) = rp_writer.as_ref() {
                            send_rp(w, rp::PONG, &data).map_err(|e| StreamError::Io {
                                offset: at,
                                source: e,
                            })?;
                        }
                        // The source stops its guest after this answer
                        // (precopy's final round or the postcopy switch):
                        // from here every message is urgent.
                        if data[..] == ping::DRAINED.to_be_bytes()
                            || data[..] == ping::SWITCH.to_be_bytes()
                        {
                            chan.batching.stop();
                        }
                        // The postcopy switch follows: real-time until RUN.
                        if post.is_some() && data[..] == ping::SWITCH.to_be_bytes() {
                            switch.get_or_insert_with(crate::RealTimeSection::enter);
                        }
                    }
                    cmd::ENABLE_COLO => {
                        if rp_writer.is_none() {
                            return Err(StreamError::invalid(
                                at,
                                "ENABLE_COLO without a return path",
                            )
                            .into());
                        }
                        if !inc.machine.capabilities().x_colo {
                            return Err(crate::colo::ColoError::NotEnabled.into());
                        }
                        // Checkpoints are waited for: no batching.
                        chan.batching.stop();
                        colo = true;
                    }
                    other => {
                        return Err(StreamError::invalid(
                            at,
                            format!("unexpected command {other} in a precopy stream"),
                        )
                        .into());
                    }
                }
            }
            section::EOF => break,
            other => {
                return Err(
                    StreamError::invalid(at, format!("unknown section type {other:#04x}")).into(),
                )
            }
        }
    }
    if !ram_ended {
        return Err(
            StreamError::invalid(r.offset(), "stream ended without the final RAM section").into(),
        );
    }
    if colo {
        switch.take();
        let rp = rp_writer
            .clone()
            .ok_or_else(|| StreamError::invalid(r.offset(), "COLO without a return path"))?;
        return crate::colo::run_secondary(inc, chan.closer.clone(), r, rr, rp, devices);
    }
    inc.machine
        .load_devices(devices)
        .map_err(MigrationError::Machine)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::tests::VecRam;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    /// A source machine. `stopped` is its "vCPU": the test's guest thread
    /// writes only while holding it and seeing `false`, so once `stop`
    /// has set it no guest write can land (as a real stop parks vCPUs).
    struct Src {
        stopped: Arc<Mutex<bool>>,
        resumed: Arc<AtomicBool>,
    }
    impl Machine for Src {
        fn stop(&mut self) -> Result<Stopped, String> {
            *self.stopped.lock().unwrap() = true;
            Ok(Stopped {
                devices: vec![DeviceBlob {
                    name: "cpu".into(),
                    instance: 0,
                    version: 1,
                    data: b"regs".to_vec(),
                }],
            })
        }
        fn resume(&mut self) -> Result<(), String> {
            self.resumed.store(true, Ordering::SeqCst);
            Ok(())
        }
    }
    struct Dst(Arc<Mutex<Vec<DeviceBlob>>>);
    impl IncomingMachine for Dst {
        fn load_devices(&mut self, blobs: Vec<DeviceBlob>) -> Result<(), String> {
            *self.0.lock().unwrap() = blobs;
            Ok(())
        }
    }

    fn config(ram: &VecRam) -> MachineConfig {
        MachineConfig {
            machine: "minivmm".into(),
            vcpus: 1,
            cpu: "minivmm64".into(),
            blocks: ram.blocks.clone(),
            page_size: 4096,
        }
    }

    /// A source that keeps dirtying pages while it migrates; the destination
    /// must end up with exactly the source's memory at the stop.
    #[test]
    fn live_migration_over_unix_socket() {
        let dir = std::env::temp_dir().join(format!("mig-precopy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        let uri = Uri::Unix(sock.clone());
        let listener = transport::Listener::bind(&uri).unwrap();

        let src = Arc::new(VecRam::new(&[256 * 4096, 64 * 4096]));
        for p in 0..256 {
            src.guest_write(0, p, (p % 7) as u8);
        }
        let dst = Arc::new(VecRam::new(&[256 * 4096, 64 * 4096]));
        let loaded = Arc::new(Mutex::new(Vec::new()));
        let dshared = Arc::new(Shared::default());
        let inc = Incoming {
            config: config(&dst),
            ram: dst.clone(),
            machine: Box::new(Dst(loaded.clone())),
            shared: dshared.clone(),
            events: Arc::new(|_| {}),
        };
        let dthread =
            std::thread::spawn(move || run_incoming(inc, listener.accept().unwrap(), None));

        let stopped = Arc::new(Mutex::new(false));
        let writer_src = src.clone();
        let writer_stop = stopped.clone();
        let guest = std::thread::spawn(move || {
            let mut n = 0u64;
            loop {
                {
                    let stopped = writer_stop.lock().unwrap();
                    if *stopped {
                        break;
                    }
                    writer_src.guest_write(0, n % 256, (n % 251) as u8);
                }
                n += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        let passes = Arc::new(Mutex::new(Vec::new()));
        let p2 = passes.clone();
        let shared = Arc::new(Shared::default());
        let out = Outgoing {
            uri,
            config: config(&src),
            ram: src.clone(),
            machine: Box::new(Src {
                stopped: stopped.clone(),
                resumed: Arc::new(AtomicBool::new(false)),
            }),
            params: Parameters {
                downtime_limit_ms: 50,
                ..Default::default()
            },
            caps: Capabilities::default(),
            shared: shared.clone(),
            events: Arc::new(move |e| p2.lock().unwrap().push(e)),
        };
        let st = run_outgoing(out);
        guest.join().unwrap();
        assert_eq!(
            st,
            Status::Completed,
            "{:?} / {:?}",
            shared.info().error_desc,
            dshared.info().error_desc
        );
        assert_eq!(
            dthread.join().unwrap(),
            Status::Completed,
            "{:?}",
            dshared.info().error_desc
        );
        for b in 0..2 {
            assert!(
                *src.data[b].lock().unwrap() == *dst.data[b].lock().unwrap(),
                "block {b} differs"
            );
        }
        assert_eq!(loaded.lock().unwrap()[0].data, b"regs");
        let ev = passes.lock().unwrap();
        assert!(ev.contains(&Event::Pass(1)) && ev.contains(&Event::Status(Status::Completed)));
        let info = shared.info().to_json();
        assert_eq!(info["status"], "completed");
        // Every page went at least once; every page non-zero at the end
        // went as a normal page at least once.
        let sent = |k: &str| info["ram"][k].as_u64().unwrap();
        assert!(sent("normal") + sent("duplicate") >= 320, "{info}");
        let nonzero = (0..2)
            .map(|b| {
                let d = dst.data[b].lock().unwrap();
                d.chunks(4096).filter(|p| p.iter().any(|&x| x != 0)).count() as u64
            })
            .sum::<u64>();
        assert!(sent("normal") >= nonzero, "{info}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A destination with a different memory size refuses the stream, and the
    /// source reports the destination's reason and resumes its guest.
    #[test]
    fn config_mismatch_fails_both_sides_and_source_resumes() {
        let dir = std::env::temp_dir().join(format!("mig-mismatch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uri = Uri::Unix(dir.join("s"));
        let listener = transport::Listener::bind(&uri).unwrap();
        let dst = Arc::new(VecRam::new(&[128 * 4096]));
        let inc = Incoming {
            config: config(&dst),
            ram: dst.clone(),
            machine: Box::new(Dst(Arc::new(Mutex::new(Vec::new())))),
            shared: Arc::new(Shared::default()),
            events: Arc::new(|_| {}),
        };
        let dthread =
            std::thread::spawn(move || run_incoming(inc, listener.accept().unwrap(), None));
        let src = Arc::new(VecRam::new(&[64 * 4096]));
        let shared = Arc::new(Shared::default());
        let resumed = Arc::new(AtomicBool::new(false));
        let out = Outgoing {
            uri,
            config: config(&src),
            ram: src.clone(),
            machine: Box::new(Src {
                stopped: Arc::new(Mutex::new(false)),
                resumed: resumed.clone(),
            }),
            params: Parameters::default(),
            caps: Capabilities::default(),
            shared: shared.clone(),
            events: Arc::new(|_| {}),
        };
        assert_eq!(run_outgoing(out), Status::Failed);
        assert_eq!(dthread.join().unwrap(), Status::Failed);
        let desc = shared.info().error_desc.clone().unwrap();
        assert!(
            desc.contains("destination") && desc.contains("memory"),
            "{desc}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

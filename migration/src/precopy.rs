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
//! ([`crate::sched::RealTimeSection`]; the destination from END on): that is the
//! downtime.
//!
//! On any failure the source resumes its guest if it had stopped it.

//!
//! This module owns precopy's RAM work on both sides: the source's START
//! section, rounds and final round, and the destination's loading of RAM
//! and device sections (`Loader`). The connection, the commands and the
//! hand-over to postcopy or COLO are the session's ([`crate::session`]).

use std::io::BufRead;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::machine::{set_status, Event, EventSink, Machine, MigrationError};
use crate::ram::{
    begin_ram_section, end_ram_section, send_dirty, AtomicBitmap, Bitmap, GuestRam, PagePlacer,
    RamError, RamReader, RamWriter, Throttle, RAM_IDSTR, RAM_SECTION_ID, RAM_SECTION_VERSION,
};
use crate::return_path::{ReturnPath, RpMessage};
use crate::sched::RealTimeSection;
use crate::status::{Parameters, Shared, Status};
use crate::stream::{
    self, ping, section, Command, DeviceBlob, Reader, Sink, StreamError, Writer, PAGE_SIZE,
};

// ---------------------------------------------------------------- source

/// What the source's rounds report to and are paced by.
pub(crate) struct SourceCtx<'a> {
    /// Status and statistics.
    pub shared: &'a Arc<Shared>,
    /// Event callback.
    pub events: &'a EventSink,
    /// Parameters at start.
    pub params: &'a Parameters,
}

/// The source's RAM state, from the START section to the end (postcopy's
/// phase and COLO's checkpoints go on with it).
pub(crate) struct SourceRam {
    /// Guest RAM, dirty logging on.
    pub ram: Arc<dyn GuestRam>,
    /// RAM record state.
    pub rw: RamWriter,
    /// Pages to send (all of them at first).
    pub dirty: Vec<Bitmap>,
    /// Pages sent so far.
    pub sent: Vec<Bitmap>,
}

/// How the rounds ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RoundsEnd {
    /// What is left fits the downtime limit: stop and copy.
    Converged,
    /// `migrate-start-postcopy`: switch to postcopy.
    Postcopy,
}

/// Source: start the dirty log and send the START section (the block list).
pub(crate) fn start_ram<W: Sink>(
    w: &mut Writer<W>,
    ram: Arc<dyn GuestRam>,
) -> Result<SourceRam, MigrationError> {
    let blocks = ram.blocks().to_vec();
    ram.start_dirty_log()?;
    let dirty: Vec<Bitmap> = blocks.iter().map(|b| Bitmap::full(b.pages())).collect();
    let sent: Vec<Bitmap> = blocks.iter().map(|b| Bitmap::new(b.pages())).collect();
    let mut rw = RamWriter::new();
    w.begin_section();
    w.u8(section::START)?;
    w.be32(RAM_SECTION_ID)?;
    w.idstr(RAM_IDSTR)?;
    w.be32(0)?;
    w.be32(RAM_SECTION_VERSION)?;
    rw.write_block_list(w, &blocks)?;
    rw.write_eos(w)?;
    w.footer(RAM_SECTION_ID)?;
    w.flush()?;
    Ok(SourceRam {
        ram,
        rw,
        dirty,
        sent,
    })
}

/// Source: the rounds, each sending every page dirty at its sync, until
/// what is left fits the downtime limit (and, with a return path, the
/// destination has read what was sent) or postcopy is to start (when
/// `want_postcopy`). Returns the syncs done and why the rounds ended.
pub(crate) fn rounds<W: Sink>(
    w: &mut Writer<W>,
    s: &mut SourceRam,
    ctx: &SourceCtx<'_>,
    mut rpath: Option<&mut ReturnPath>,
    want_postcopy: bool,
    converge: &mut AutoConverge<'_>,
) -> Result<(u64, RoundsEnd), MigrationError> {
    let postcopy = move |sh: &Shared| want_postcopy && sh.postcopy_requested();
    let mut throttle = Throttle::new(&ctx.shared.max_bandwidth);
    let mut bandwidth: f64 = 0.0; // bytes/s measured in the last round
    let mut pass = 0u64;
    let mut last_sync: Option<Instant> = None;
    // The destination has read everything sent so far (ping::DRAINED).
    let mut drained = false;
    loop {
        if ctx.shared.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        if let Some(r) = rpath.as_deref_mut() {
            r.check()?;
        }
        let sync_start = Instant::now();
        s.ram.sync_dirty_log(&mut s.dirty)?;
        note_sync(ctx.shared, sync_start.elapsed());
        pass += 1;
        let remaining: u64 = s.dirty.iter().map(Bitmap::count).sum();
        // QEMU's dirty-pages-rate: pages found dirty over the time since
        // the previous sync (not after the first: that is all of RAM).
        if let Some(t) = last_sync.replace(sync_start) {
            let secs = sync_start.duration_since(t).as_secs_f64().max(1e-6);
            ctx.shared.lock_info().ram.dirty_pages_rate = (remaining as f64 / secs) as u64;
        }
        let remaining_bytes = remaining * PAGE_SIZE as u64;
        let expected_ms = expected_downtime(ctx, pass, remaining_bytes, bandwidth);
        (ctx.events)(Event::Pass(pass));
        let limit = ctx.shared.downtime_limit_ms.load(Ordering::Relaxed);
        if pass > 1 && (remaining == 0 || expected_ms <= limit) {
            // Stop only once the destination has read what is already
            // on its way (up to a few MiB in socket buffers, which the
            // bandwidth above, measured at the source's writes, does
            // not see): it would otherwise be downtime. The guest runs
            // meanwhile; a sync follows.
            if let (false, Some(r)) = (drained, rpath.as_deref_mut()) {
                r.ping_and_wait(w, ping::DRAINED)?;
                drained = true;
                continue;
            }
            return Ok((pass, RoundsEnd::Converged));
        }
        if postcopy(ctx.shared) {
            return Ok((pass, RoundsEnd::Postcopy));
        }
        // The first sync opens auto-converge's first period, which the
        // first full round then closes (as QEMU's).
        converge.after_sync(ctx, w.offset(), remaining_bytes)?;
        // One round: every page dirty at the sync.
        drained = false;
        bandwidth = round(w, s, ctx, &mut throttle, &postcopy, remaining)?;
    }
}

/// `auto-converge`, as QEMU's `migration_trigger_throttle`: over a period
/// of at least a second (from one sync to a later one), when the bytes the
/// guest dirtied exceed `throttle-trigger-threshold` % of the bytes sent,
/// for the second time, throttle the vCPUs: first to
/// `cpu-throttle-initial` %, then each time `cpu-throttle-increment` more
/// (with `cpu-throttle-tailslow`, only as much as would bring the dirty
/// rate down to the threshold, at most the increment), up to
/// `max-cpu-throttle`. The throttle holds while the status is `active`:
/// the VMM lifts it when the status changes (the stop, a switch to
/// postcopy or COLO, the end however it comes).
///
/// With `dirty-limit` instead, the same trigger limits every vCPU's dirty
/// rate to `vcpu-dirty-limit` MB/s, once (as QEMU's
/// `migration_dirty_limit_guest`); the VMM lifts it likewise.
pub(crate) struct AutoConverge<'a> {
    /// Throttles the vCPUs (`None`: neither capability is on).
    machine: Option<&'a mut dyn Machine>,
    /// `dirty-limit` rather than `auto-converge`.
    dirty_limit: bool,
    /// The throttle now, %.
    pct: u8,
    /// Periods in a row whose dirty bytes were over the threshold.
    high: u32,
    /// Start of the period: when, bytes sent by then.
    period_start: Option<(Instant, u64)>,
    /// Bytes dirtied in the period so far.
    dirtied: u64,
}

/// The shortest auto-converge period (QEMU's: one second between syncs).
const CONVERGE_PERIOD: Duration = Duration::from_secs(1);

impl<'a> AutoConverge<'a> {
    /// For a migration with `auto-converge` or `dirty-limit` set in
    /// `caps`, throttling through `machine`.
    pub(crate) fn new(caps: &crate::status::Capabilities, machine: &'a mut dyn Machine) -> Self {
        Self {
            machine: (caps.auto_converge || caps.dirty_limit).then_some(machine),
            dirty_limit: caps.dirty_limit,
            pct: 0,
            high: 0,
            period_start: None,
            dirtied: 0,
        }
    }

    /// After a sync that found `dirty_bytes` dirty, `sent` bytes sent so
    /// far on the stream.
    fn after_sync(
        &mut self,
        ctx: &SourceCtx<'_>,
        sent: u64,
        dirty_bytes: u64,
    ) -> Result<(), MigrationError> {
        let Some(machine) = self.machine.as_deref_mut() else {
            return Ok(());
        };
        let Some((at, sent_then)) = self.period_start else {
            self.period_start = Some((Instant::now(), sent));
            return Ok(());
        };
        self.dirtied += dirty_bytes;
        if at.elapsed() < CONVERGE_PERIOD {
            return Ok(());
        }
        let p = ctx.params;
        let sent_period = sent.saturating_sub(sent_then);
        let threshold = sent_period * u64::from(p.throttle_trigger_threshold) / 100;
        let dirtied = std::mem::take(&mut self.dirtied);
        self.period_start = Some((Instant::now(), sent));
        if dirtied <= threshold {
            return Ok(());
        }
        self.high += 1;
        if self.high < 2 {
            return Ok(());
        }
        self.high = 0;
        if self.dirty_limit {
            if self.pct == 0 {
                let period = Duration::from_millis(p.x_vcpu_dirty_limit_period_ms);
                machine
                    .dirty_limit(p.vcpu_dirty_limit, period)
                    .map_err(MigrationError::Machine)?;
                log::info!(
                    "dirty-limit: every vCPU held to {} MB/s",
                    p.vcpu_dirty_limit
                );
                self.pct = 1;
                ctx.shared
                    .lock_info()
                    .extra
                    .insert("x-dirty-limit".into(), p.vcpu_dirty_limit.into());
            }
            return Ok(());
        }
        let next = next_throttle(self.pct, p, threshold, dirtied);
        if next != self.pct {
            machine.throttle(next).map_err(MigrationError::Machine)?;
            log::info!("auto-converge: vCPUs throttled to {next} %");
            self.pct = next;
        }
        ctx.shared.lock_info().cpu_throttle_percentage = Some(self.pct);
        Ok(())
    }
}

/// QEMU's `mig_throttle_guest_down`: the throttle after `now` % when a
/// period dirtied `dirtied` bytes against a threshold of `threshold`.
fn next_throttle(now: u8, p: &Parameters, threshold: u64, dirtied: u64) -> u8 {
    if now == 0 {
        return p.cpu_throttle_initial;
    }
    let inc = if p.cpu_throttle_tailslow {
        let cpu_now = 100.0 - f64::from(now);
        let cpu_ideal = cpu_now * (threshold as f64 / dirtied.max(1) as f64);
        ((cpu_now - cpu_ideal) as u8).min(p.cpu_throttle_increment)
    } else {
        p.cpu_throttle_increment
    };
    now.saturating_add(inc).min(p.max_cpu_throttle)
}

/// The cost of a dirty-log sync, for `query-migrate`: the last one's and
/// the longest one's, µs (`x-dirty-sync-us`, `x-dirty-sync-max-us`).
fn note_sync(shared: &Shared, took: Duration) {
    let us = took.as_micros() as u64;
    let mut i = shared.lock_info();
    let max = i
        .extra
        .get("x-dirty-sync-max-us")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0)
        .max(us);
    i.extra.insert("x-dirty-sync-us".into(), us.into());
    i.extra.insert("x-dirty-sync-max-us".into(), max.into());
}

/// The downtime the pages left would take at the measured bandwidth
/// (`u64::MAX`: not measured yet), noted with the sync's statistics.
fn expected_downtime(ctx: &SourceCtx<'_>, pass: u64, remaining_bytes: u64, bandwidth: f64) -> u64 {
    let limit = ctx
        .shared
        .max_bandwidth
        .load(std::sync::atomic::Ordering::Relaxed);
    let bw = if limit > 0 && bandwidth > 0.0 {
        bandwidth.min(limit as f64)
    } else {
        bandwidth
    };
    let expected_ms = if bw > 0.0 {
        (remaining_bytes as f64 / bw * 1000.0) as u64
    } else {
        u64::MAX
    };
    {
        let mut i = ctx.shared.lock_info();
        i.ram.dirty_sync_count = pass;
        i.ram.remaining = remaining_bytes;
        i.expected_downtime_ms = (expected_ms != u64::MAX).then_some(expected_ms);
    }
    expected_ms
}

/// One round: every page dirty at the sync (`remaining` of them), unless
/// postcopy is to start. Returns the bandwidth measured (bytes/s).
fn round<W: Sink>(
    w: &mut Writer<W>,
    s: &mut SourceRam,
    ctx: &SourceCtx<'_>,
    throttle: &mut Throttle<'_>,
    postcopy: &dyn Fn(&Shared) -> bool,
    remaining: u64,
) -> Result<f64, MigrationError> {
    let remaining_bytes = remaining * PAGE_SIZE as u64;
    let round_start = Instant::now();
    let round_bytes_start = w.offset();
    let mut sent_now = 0u64;
    let mut records = 0u64;
    let shared = ctx.shared.clone();
    send_dirty(
        w,
        &mut s.rw,
        &*s.ram,
        &mut s.dirty,
        &mut s.sent,
        &mut |rw, sent| {
            throttle.account(sent.bytes);
            sent_now += sent.pages;
            records += 1;
            if postcopy(&shared) {
                return Ok(false);
            }
            if records.is_multiple_of(256) {
                if shared.cancelled() {
                    return Err(MigrationError::Cancelled);
                }
                let mut i = shared.lock_info();
                i.ram.transferred = sent.offset;
                i.ram.remaining = remaining_bytes.saturating_sub(sent_now * PAGE_SIZE as u64);
                i.ram.duplicate = rw.zero_pages;
                i.ram.normal = rw.normal_pages;
            }
            Ok(true)
        },
    )?;
    w.flush()?;
    let secs = round_start.elapsed().as_secs_f64().max(1e-6);
    let bandwidth = (w.offset() - round_bytes_start) as f64 / secs;
    let mut i = ctx.shared.lock_info();
    i.ram.transferred = w.offset();
    i.ram.duplicate = s.rw.zero_pages;
    i.ram.normal = s.rw.normal_pages;
    i.ram.mbps = bandwidth * 8.0 / 1e6;
    Ok(bandwidth)
}

/// Source, guest stopped, with `pause-before-switchover`: wait in
/// pre-switchover for migrate-continue (as in QEMU). Meanwhile the main
/// stream carries keepalives and the return path is watched, so a lost
/// destination fails it.
pub(crate) fn pre_switchover<W: Sink>(
    w: &mut Writer<W>,
    ctx: &SourceCtx<'_>,
    mut rpath: Option<&mut ReturnPath>,
) -> Result<(), MigrationError> {
    set_status(ctx.shared, ctx.events, Status::PreSwitchover);
    let slice = rpath
        .as_ref()
        .and_then(|r| r.keepalive())
        .unwrap_or(Duration::from_secs(3600));
    while !ctx.shared.wait_switchover_timeout(slice) {
        if let Some(r) = rpath.as_deref_mut() {
            r.check()?;
            w.write_command(&Command::Ping(ping::ALIVE))?;
            w.flush()?;
        }
    }
    if ctx.shared.cancelled() {
        return Err(MigrationError::Cancelled);
    }
    set_status(ctx.shared, ctx.events, Status::Device);
    Ok(())
}

/// Source, guest stopped (sync `pass` done, pre-switchover passed): the
/// last dirty pages, END, every device and EOF.
/// Returns the real-time section the rest of the downtime runs in (see
/// [`RealTimeSection`]), entered before the last sync.
pub(crate) fn final_round<W: Sink>(
    w: &mut Writer<W>,
    s: &mut SourceRam,
    ctx: &SourceCtx<'_>,
    pass: u64,
    devices: &[DeviceBlob],
    stop_start: Instant,
) -> Result<RealTimeSection, MigrationError> {
    // The rest is downtime, bounded by downtime-limit: real-time until
    // the destination's SHUT(0) (see RealTimeSection).
    let final_round = RealTimeSection::enter();
    s.ram.sync_dirty_log(&mut s.dirty)?;
    ctx.shared.lock_info().ram.dirty_sync_count = pass + 1;
    (ctx.events)(Event::Pass(pass + 1));
    send_dirty(
        w,
        &mut s.rw,
        &*s.ram,
        &mut s.dirty,
        &mut s.sent,
        &mut |_, _| Ok::<_, MigrationError>(true),
    )?;
    begin_ram_section(w, &mut s.rw, section::END)?;
    end_ram_section(w, &mut s.rw)?;
    for (i, d) in devices.iter().enumerate() {
        stream::write_device(w, RAM_SECTION_ID + 1 + i as u32, d)?;
    }
    w.u8(section::EOF)?;
    w.flush()?;
    {
        let mut i = ctx.shared.lock_info();
        i.ram.transferred = w.offset();
        i.ram.remaining = 0;
        i.ram.duplicate = s.rw.zero_pages;
        i.ram.normal = s.rw.normal_pages;
        i.downtime_ms = Some(stop_start.elapsed().as_millis() as u64);
    }
    Ok(final_round)
}

/// Source, after EOF: wait for the destination's verdict (SHUT).
pub(crate) fn wait_verdict(rpath: &mut ReturnPath, shared: &Shared) -> Result<(), MigrationError> {
    loop {
        if shared.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        match rpath.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(RpMessage::Shut(0))) => return Ok(()),
            Ok(Ok(m)) => {
                if let Some(e) = rpath.error(m) {
                    return Err(e);
                }
            }
            Ok(Err(e)) => return Err(rpath.lost(Some(e))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(rpath.lost(None)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

// ----------------------------------------------------------- destination

/// The destination's loader of RAM and device sections: pages go straight
/// into guest RAM, device state is kept aside until EOF.
pub(crate) struct Loader {
    /// RAM record state (postcopy's listen thread goes on with it).
    pub rr: RamReader,
    ram_started: bool,
    ram_ended: bool,
    /// Device state read so far.
    pub devices: Vec<DeviceBlob>,
    /// The device sections this machine accepts.
    catalog: crate::stream::DeviceCatalog,
    /// RAM reads as zero at the start (see [`crate::Incoming::ram`]).
    zeroed: Vec<Bitmap>,
}

impl Loader {
    /// A loader for `ram` and the devices of `catalog`.
    pub(crate) fn new(ram: &dyn GuestRam, catalog: crate::stream::DeviceCatalog) -> Self {
        Self {
            rr: RamReader::new(ram.blocks().to_vec()),
            ram_started: false,
            ram_ended: false,
            devices: Vec::new(),
            catalog,
            zeroed: ram
                .blocks()
                .iter()
                .map(|b| Bitmap::full(b.pages()))
                .collect(),
        }
    }

    /// Has the RAM START section come?
    pub(crate) fn ram_started(&self) -> bool {
        self.ram_started
    }

    /// A START, PART or END section (type `t` at `at`, read): its pages go
    /// into `ram` (and, once postcopy is advised, into `received`). END
    /// enters the real-time `switch`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn ram_section<R: BufRead>(
        &mut self,
        r: &mut Reader<R>,
        t: u8,
        at: u64,
        ram: &dyn GuestRam,
        received: Option<&[AtomicBitmap]>,
        shared: &Shared,
        switch: &mut Option<RealTimeSection>,
    ) -> Result<(), MigrationError> {
        let id = r.be32("section id")?;
        if t == section::START {
            self.start_section(r, at, id)?;
        } else {
            if !self.ram_started || id != RAM_SECTION_ID {
                return Err(StreamError::invalid(
                    at,
                    format!("section part for unknown section id {id}"),
                )
                .into());
            }
            if self.ram_ended {
                return Err(StreamError::invalid(at, "RAM section data after its END").into());
            }
            self.rr.new_section();
        }
        // Pages go straight into guest RAM; the footer's CRC is
        // checked after them. The guest cannot run on a section
        // that fails it: nothing runs until the whole stream has
        // arrived intact (postcopy's LISTEN and COLO's checkpoints,
        // where RAM is live or must stay whole, stage instead).
        self.rr.read_records(
            r,
            &mut TrackingPlacer {
                ram,
                received,
                zeroed: &mut self.zeroed,
            },
        )?;
        r.footer(id)?;
        if t == section::END {
            self.ram_ended = true;
            // The source has stopped the guest (precopy's final
            // round): what follows is downtime.
            switch.get_or_insert_with(RealTimeSection::enter);
        }
        let mut i = shared.lock_info();
        i.ram.transferred = r.offset();
        i.ram.duplicate = self.rr.zero_pages;
        i.ram.normal = self.rr.pages - self.rr.zero_pages;
        Ok(())
    }

    /// The START section after its id: name, instance, version, block list.
    fn start_section<R: BufRead>(
        &mut self,
        r: &mut Reader<R>,
        at: u64,
        id: u32,
    ) -> Result<(), MigrationError> {
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
                format!("RAM section version {version}, expected {RAM_SECTION_VERSION}"),
            )
            .into());
        }
        if self.ram_started {
            return Err(StreamError::invalid(at, "second RAM START section").into());
        }
        self.ram_started = true;
        self.rr.new_section();
        self.rr.read_block_list(r)?;
        Ok(())
    }

    /// A FULL section (type byte at `at`, read): a device's state, kept.
    pub(crate) fn device<R: BufRead>(
        &mut self,
        r: &mut Reader<R>,
        at: u64,
    ) -> Result<(), MigrationError> {
        let id = r.be32("section id")?;
        stream::read_device(r, id, at, &self.catalog, &mut self.devices)?;
        Ok(())
    }

    /// At EOF (offset `at`): did the final RAM section come?
    pub(crate) fn check_complete(&self, at: u64) -> Result<(), MigrationError> {
        if !self.ram_ended {
            return Err(
                StreamError::invalid(at, "stream ended without the final RAM section").into(),
            );
        }
        Ok(())
    }
}

/// Records every page the precopy phase places (for LISTEN).
pub struct TrackingPlacer<'a> {
    /// Where pages go.
    pub ram: &'a dyn GuestRam,
    /// Pages received, once postcopy is advised
    /// ([`crate::postcopy::DestPostcopy::received`]).
    pub received: Option<&'a [AtomicBitmap]>,
    /// Pages known to read as zero (bit set: not written since the incoming
    /// migration began on RAM that started zeroed), one bitmap per block.
    /// A ZERO record for such a page needs no work: not even a read, which
    /// would fault the page in. Unused once postcopy is advised, where a
    /// zero page must be made present before userfaultfd covers it.
    pub zeroed: &'a mut [Bitmap],
}

impl TrackingPlacer<'_> {
    /// Note pages placed, once postcopy is advised.
    fn mark_received(&self, block: usize, first: u64, n: u64) {
        if let Some(b) = self.received.and_then(|r| r.get(block)) {
            b.set_range(first, n);
        }
    }
}

impl PagePlacer for TrackingPlacer<'_> {
    fn place_page(&mut self, block: usize, page: u64, data: &[u8]) -> Result<(), RamError> {
        self.ram.write_page(block, page, data)?;
        if let Some(z) = self.zeroed.get_mut(block) {
            z.test_and_clear(page);
        }
        self.mark_received(block, page, 1);
        Ok(())
    }
    fn place_zero(&mut self, block: usize, page: u64) -> Result<(), RamError> {
        self.place_zero_run(block, page, 1)
    }
    fn place_zero_run(&mut self, block: usize, first: u64, n: u64) -> Result<(), RamError> {
        let known_zero = self.zeroed.get(block).is_some_and(|z| z.all_set(first, n));
        if self.received.is_none() && known_zero {
            return Ok(());
        }
        for page in first..first + n {
            self.ram.zero_page(block, page)?;
        }
        self.mark_received(block, first, n);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_steps_as_qemus() {
        let mut p = Parameters::default();
        // First step: the initial throttle; then the increment, capped.
        assert_eq!(next_throttle(0, &p, 50, 500), 20);
        assert_eq!(next_throttle(20, &p, 50, 500), 30);
        assert_eq!(next_throttle(95, &p, 50, 500), 99);
        p.max_cpu_throttle = 60;
        assert_eq!(next_throttle(55, &p, 50, 500), 60);
        // Tail-slow: only as far as the dirty rate needs (dirtied twice
        // the threshold at 80 % CPU: 40 % would do, but at most +10).
        p.cpu_throttle_tailslow = true;
        p.max_cpu_throttle = 99;
        assert_eq!(next_throttle(20, &p, 100, 200), 30);
        // Dirtied just over the threshold: a small step.
        assert_eq!(next_throttle(20, &p, 100, 105), 23);
    }
}

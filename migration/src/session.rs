//! A migration from start to end, on either side: the connection, the
//! header and configuration, the commands that pick the mode, and the
//! dispatch between the engines ([`crate::precopy`], [`crate::postcopy`],
//! [`crate::colo`]), which never call each other.
//!
//! ```text
//! source                                       destination
//! header, CONFIGURATION                 ---->  checked against ours
//! [OPEN_RETURN_PATH                     ---->  return path opened
//!  [POSTCOPY_ADVISE, PING 1             ---->  postcopy state set up (or refused)
//!   [, POSTCOPY_PREEMPT, PING 4]        ---->  preempt channel accepted
//!  | ENABLE_COLO, PING 3]]              ---->  COLO checked
//! precopy: START, PART ... (rounds)     ---->  precopy::Loader
//! then one of:
//!   precopy: PART ..., END, FULL ..., EOF  ->  devices loaded; SHUT(0) or ERROR_DESC + SHUT(1)
//!   postcopy: [DISCARD ..., PING 5], DISCARD ..., PACKAGED ...  ->  postcopy::dest_package
//!   COLO: the precopy ending, then checkpoints  ->  colo::run_secondary
//! ```
//!
//! This module owns [`Outgoing`] and [`Incoming`] (what the VMM hands in),
//! [`run_outgoing`] and [`run_incoming`] (the final status, the error
//! description, resuming the source's guest on failure) and the
//! destination's handling of every COMMAND of the main stream.

use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::machine::{
    begin_info, set_status, Destination, Event, EventSink, IncomingMachine, Machine, MachineConfig,
    MigrationError, Stopped,
};
use crate::postcopy::{DestPostcopy, PostcopyError, Preempt, PreemptIn};
use crate::precopy::{Loader, RoundsEnd, SourceCtx, SourceRam};
use crate::ram::GuestRam;
use crate::return_path::{send_rp, writer_of, ReturnPath, RpWriter};
use crate::sched::RealTimeSection;
use crate::status::{Capabilities, Parameters, Shared, Status};
use crate::stream::{self, ping, rp, section, BufSink, Command, Reader, StreamError, Writer};
use crate::transport::{self, Channel, Listener, Uri};

/// The source's main stream.
type MainWriter = Writer<BufSink<Box<dyn Write + Send>>>;

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

/// Source side: runs to completion, failure or cancel. Returns the final status.
pub fn run_outgoing(mut o: Outgoing) -> Status {
    crate::confine::enter(crate::confine::ThreadKind::Migration);
    // The rounds copy in bulk beside the running guest: no priority over
    // it (postcopy and COLO raise it where the guest waits on this thread).
    crate::sched::normal_priority();
    begin_info(&o.shared, &o.events, &*o.ram, Status::Setup);
    o.shared
        .checkpoint_delay_ms
        .store(o.params.x_checkpoint_delay_ms, Ordering::SeqCst);
    o.shared
        .set_bandwidths(o.params.max_bandwidth, o.params.max_postcopy_bandwidth);
    o.shared
        .set_auto_recover_ms(o.params.x_postcopy_auto_recover_ms);
    o.shared.set_downtime_limit_ms(o.params.downtime_limit_ms);
    o.shared
        .set_compare_timeout_ms(o.params.x_colo_compare_timeout_ms);
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
                o.shared.lock_info().postcopy_after_run = true;
                log::error!("postcopy failed after the destination started the guest; the guest stays stopped here");
            } else if stopped {
                // Running again, or paused if it was (not finish-migrate).
                if let Err(re) = o.machine.resume() {
                    log::error!("migration failed and the guest could not be resumed: {re}");
                }
            }
            // A cancel is not an error: no error-desc (as QEMU).
            if o.shared.cancelled() {
                o.shared.lock_info().error_desc = None;
                Status::Cancelled
            } else {
                o.shared.lock_info().error_desc = Some(crate::machine::error_chain(&e));
                Status::Failed
            }
        }
    };
    {
        let mut i = o.shared.lock_info();
        i.total_time_ms = i.started.map(|s| s.elapsed().as_millis() as u64);
        // At the end, as QEMU: the average over the whole migration.
        if let Some(ms) = i.total_time_ms.filter(|&t| t > 0) {
            i.ram.mbps = i.ram.transferred as f64 * 8.0 / 1e3 / ms as f64;
        }
        i.ram.dirty_pages_rate = 0;
    }
    o.shared.set_closer(None);
    set_status(&o.shared, &o.events, status);
    status
}

fn outgoing(
    o: &mut Outgoing,
    stopped: &mut bool,
    run_sent: &AtomicBool,
) -> Result<(), MigrationError> {
    let start = Instant::now();
    let mut chan: Channel =
        transport::connect(&o.uri, o.params.peer_timeout(), o.shared.tls().as_ref())?;
    o.shared.set_closer(Some(chan.closer.clone()));
    if o.shared.cancelled() {
        return Err(MigrationError::Cancelled);
    }
    let writer = std::mem::replace(&mut chan.writer, Box::new(std::io::sink()));
    let mut w = Writer::new(BufSink::with_capacity(1 << 20, writer));
    stream::write_header(&mut w)?;
    let cfg = serde_json::to_vec(&o.config).map_err(|e| MigrationError::Config(e.to_string()))?;
    stream::write_config(&mut w, &cfg)?;
    // Postcopy and COLO always need the return path; precopy uses it
    // unless `return-path` is off (then the source does not learn whether
    // the destination loaded the guest, as in QEMU).
    let wants_rp = o.caps.return_path || o.caps.postcopy_ram || o.caps.x_colo;
    let mut rpath = if chan.duplex && wants_rp {
        w.write_command(&Command::OpenReturnPath)?;
        let reader = std::mem::replace(&mut chan.reader, Box::new(std::io::empty()));
        Some(ReturnPath::spawn(
            reader,
            chan.peer_timeout,
            chan.closer.clone(),
        ))
    } else {
        None
    };
    let mut preempt = None;
    if o.caps.postcopy_ram {
        let rpath = rpath.as_mut().ok_or_else(|| {
            PostcopyError::Refused(format!(
                "postcopy needs a return path; '{}' has none (use tcp: or unix:)",
                o.uri
            ))
        })?;
        crate::postcopy::advise_source(&mut w, rpath)?;
        if o.caps.postcopy_preempt {
            preempt = Some(crate::postcopy::connect_preempt(
                &o.uri,
                o.params.peer_timeout(),
                o.shared.tls().as_ref(),
                &mut w,
                rpath,
            )?);
        }
    }
    if o.caps.x_colo {
        if o.caps.postcopy_ram {
            return Err(MigrationError::Config(
                "x-colo and postcopy-ram cannot be used together".into(),
            ));
        }
        if rpath.is_none() {
            return Err(MigrationError::Config(format!(
                "COLO needs a return path; '{}' has none (use tcp: or unix:)",
                o.uri
            )));
        }
        w.write_command(&Command::EnableColo)?;
        if let Some(rpath) = &mut rpath {
            rpath.ping_and_wait(&mut w, ping::COLO)?;
        }
    }
    let result = transfer(
        o,
        w,
        &mut chan,
        rpath.as_mut(),
        &mut preempt,
        start,
        stopped,
        run_sent,
    );
    match result {
        // A broken connection is usually the destination giving up: if it
        // said why on the return path, report that instead of EPIPE.
        Err(
            e @ (MigrationError::Stream(StreamError::Io { .. }) | MigrationError::PeerLost(..)),
        ) => Err(rpath
            .as_mut()
            .and_then(ReturnPath::destination_reason)
            .unwrap_or(e)),
        r => r,
    }
}

/// Source, from the START section on: precopy's rounds, then the stop and
/// one of postcopy's phase, precopy's final round (and the destination's
/// verdict) or the final round and COLO.
#[allow(clippy::too_many_arguments)]
fn transfer(
    o: &mut Outgoing,
    mut w: MainWriter,
    chan: &mut Channel,
    mut rpath: Option<&mut ReturnPath>,
    preempt: &mut Option<Preempt>,
    start: Instant,
    stopped: &mut bool,
    run_sent: &AtomicBool,
) -> Result<(), MigrationError> {
    let want_postcopy = o.caps.postcopy_ram;
    let postcopy = move |sh: &Shared| want_postcopy && sh.postcopy_requested();
    let mut s = crate::precopy::start_ram(&mut w, o.ram.clone())?;
    o.shared.lock_info().setup_time_ms = start.elapsed().as_millis() as u64;
    set_status(&o.shared, &o.events, Status::Active);
    let ctx = SourceCtx {
        shared: &o.shared,
        events: &o.events,
        params: &o.params,
    };
    let mut converge = crate::precopy::AutoConverge::new(&o.caps, &mut *o.machine);
    let (pass, end) = crate::precopy::rounds(
        &mut w,
        &mut s,
        &ctx,
        rpath.as_deref_mut(),
        want_postcopy,
        &mut converge,
    )?;
    if end == RoundsEnd::Postcopy {
        if let Some(r) = rpath.as_deref_mut() {
            crate::postcopy::discard_before_stop(&mut w, &*s.ram, &s.dirty, &mut s.sent, r)?;
        }
    }

    // Stop and copy (with pause-before-switchover, the guest stays stopped
    // in pre-switchover until migrate-continue, as in QEMU).
    let stop_start = Instant::now();
    let Stopped { devices } = o.machine.stop().map_err(MigrationError::Machine)?;
    *stopped = true;
    if let (true, Some(r)) = (postcopy(&o.shared), rpath.as_deref_mut()) {
        return postcopy_phase(
            o, &mut w, &mut s, r, preempt, pass, stop_start, &devices, run_sent,
        );
    }
    let ctx = SourceCtx {
        shared: &o.shared,
        events: &o.events,
        params: &o.params,
    };
    if o.caps.pause_before_switchover {
        crate::precopy::pre_switchover(&mut w, &ctx, rpath.as_deref_mut())?;
    }
    let final_round =
        crate::precopy::final_round(&mut w, &mut s, &ctx, pass, &devices, stop_start)?;
    if let (true, Some(r)) = (o.caps.x_colo, rpath.as_deref_mut()) {
        drop(final_round);
        let ram = s.ram.clone();
        return crate::colo::run_primary(crate::colo::Primary {
            w: &mut w,
            rw: &mut s.rw,
            ram: &*ram,
            dirty: &mut s.dirty,
            sent: &mut s.sent,
            rpath: r,
            machine: &mut *o.machine,
            shared: &o.shared,
            events: &o.events,
            periodic: o.params.x_colo_periodic,
        });
    }
    drop(w);
    chan.finish().map_err(MigrationError::Exec)?;

    // Wait for the destination's verdict.
    if let Some(r) = rpath {
        crate::precopy::wait_verdict(r, &o.shared)?;
    }
    o.shared.lock_info().downtime_ms = Some(stop_start.elapsed().as_millis() as u64);
    drop(final_round);
    Ok(())
}

/// Source, guest stopped: sync once more and hand over to postcopy.
#[allow(clippy::too_many_arguments)]
fn postcopy_phase(
    o: &mut Outgoing,
    w: &mut MainWriter,
    s: &mut SourceRam,
    rpath: &mut ReturnPath,
    preempt: &mut Option<Preempt>,
    pass: u64,
    stop_start: Instant,
    devices: &[stream::DeviceBlob],
    run_sent: &AtomicBool,
) -> Result<(), MigrationError> {
    s.ram.sync_dirty_log(&mut s.dirty)?;
    o.shared.lock_info().ram.dirty_sync_count = pass + 1;
    (o.events)(Event::Pass(pass + 1));
    crate::postcopy::run_source(
        crate::postcopy::SourcePhase {
            w,
            rw: &mut s.rw,
            ram: &*s.ram,
            dirty: &mut s.dirty,
            sent: &s.sent,
            rpath,
            shared: &o.shared,
            events: &o.events,
            params: &o.params,
            stop_start,
            uri: &o.uri,
            preempt_on: preempt.is_some(),
            preempt: preempt.take(),
            running: false,
            transferred_before: 0,
        },
        devices,
        run_sent,
    )
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

/// Destination side: wait on `listener` for the source, then read one
/// migration ([`run_incoming`]). A failed accept fails the migration, with
/// its reason in `error-desc`. Returns the final status.
pub fn accept_and_run_incoming(inc: Incoming, listener: Listener) -> Status {
    crate::confine::enter(crate::confine::ThreadKind::Migration);
    // The bound as set when the source connects (see Shared::peer_timeout).
    let accepted = listener.wait_for_peer(None).and_then(|_| {
        listener.accept(
            inc.shared.peer_timeout(),
            inc.shared.tls_server().as_deref(),
        )
    });
    match accepted {
        Ok(chan) => run_incoming(inc, chan, Some(&listener)),
        Err(e) => {
            inc.shared.lock_info().error_desc = Some(crate::machine::error_chain(&e));
            set_status(&inc.shared, &inc.events, Status::Failed);
            Status::Failed
        }
    }
}

/// Destination side: read one migration from `chan`. Returns the final status.
pub fn run_incoming(mut inc: Incoming, mut chan: Channel, listener: Option<&Listener>) -> Status {
    begin_info(&inc.shared, &inc.events, &*inc.ram, Status::Active);
    let mut rp_writer: Option<RpWriter> = None;
    // Real-time for the downtime (see RealTimeSection): from precopy's
    // final RAM section to SHUT(0) sent, or from the postcopy switch's
    // PING to RUN.
    let mut switch: Option<RealTimeSection> = None;
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
            let desc = crate::machine::error_chain(&e);
            if let Some(w) = &rp_writer {
                let _ = send_rp(w, rp::ERROR_DESC, desc.as_bytes());
                let _ = send_rp(w, rp::SHUT, &1u32.to_be_bytes());
            }
            inc.shared.lock_info().error_desc = Some(desc);
            Status::Failed
        }
    };
    {
        let mut i = inc.shared.lock_info();
        i.total_time_ms = i.started.map(|s| s.elapsed().as_millis() as u64);
    }
    set_status(&inc.shared, &inc.events, status);
    status
}

/// The destination's session state while it reads the main stream.
struct Dest<'a> {
    inc: &'a mut Incoming,
    chan: &'a mut Channel,
    listener: Option<&'a Listener>,
    rp_writer: &'a mut Option<RpWriter>,
    /// Real-time for the downtime (see [`run_incoming`]).
    switch: &'a mut Option<RealTimeSection>,
    /// Postcopy, once advised.
    post: Option<Arc<DestPostcopy>>,
    /// The preempt channel, once accepted.
    preempt: Option<PreemptIn>,
    /// ENABLE_COLO came.
    colo: bool,
}

/// PACKAGED: the postcopy state and the package.
type Package = (Arc<DestPostcopy>, Vec<u8>);

fn incoming(
    inc: &mut Incoming,
    chan: &mut Channel,
    listener: Option<&Listener>,
    rp_writer: &mut Option<RpWriter>,
    switch: &mut Option<RealTimeSection>,
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
            if let Ok(Command::OpenReturnPath) = stream::read_command(&mut r) {
                *rp_writer = Some(writer_of(chan));
            }
        }
        return Err(MigrationError::Config(why));
    }
    let mut d = Dest {
        inc,
        chan,
        listener,
        rp_writer,
        switch,
        post: None,
        preempt: None,
        colo: false,
    };
    d.read_stream(r)
}

impl Dest<'_> {
    /// The sections after the configuration, until EOF (or the postcopy
    /// package), then the end: devices loaded, or COLO.
    fn read_stream(
        &mut self,
        mut r: Reader<BufReader<Box<dyn Read + Send>>>,
    ) -> Result<(), MigrationError> {
        let ram = self.inc.ram.clone();
        let mut loader = Loader::new(&*ram, self.inc.machine.device_catalog());
        loop {
            r.begin_section();
            let at = r.offset();
            let t = r.u8("section type")?;
            match t {
                section::START | section::PART | section::END => {
                    let received = self.post.as_deref().map(DestPostcopy::received);
                    loader.ram_section(
                        &mut r,
                        t,
                        at,
                        &*ram,
                        received,
                        &self.inc.shared,
                        self.switch,
                    )?;
                }
                section::FULL => loader.device(&mut r, at)?,
                section::COMMAND => {
                    if let Some((p, pkg)) = self.command(&mut r, at, loader.ram_started())? {
                        let switch = self.switch.take().unwrap_or_else(RealTimeSection::enter);
                        let closer = self.chan.closer.clone();
                        let preempt = self.preempt.take();
                        let listener = self.listener;
                        return crate::postcopy::dest_package(
                            self.destination(),
                            closer,
                            p,
                            pkg,
                            (r, loader.rr),
                            (preempt, listener),
                            switch,
                        );
                    }
                }
                section::EOF => break,
                other => {
                    return Err(StreamError::invalid(
                        at,
                        format!("unknown section type {other:#04x}"),
                    )
                    .into())
                }
            }
        }
        loader.check_complete(r.offset())?;
        if self.colo {
            self.switch.take();
            let rp = self
                .rp_writer
                .clone()
                .ok_or_else(|| StreamError::invalid(r.offset(), "COLO without a return path"))?;
            let closer = self.chan.closer.clone();
            return crate::colo::run_secondary(
                self.destination(),
                closer,
                r,
                loader.rr,
                rp,
                loader.devices,
            );
        }
        self.inc
            .machine
            .load_devices(loader.devices)
            .map_err(MigrationError::Machine)?;
        Ok(())
    }

    /// The machine, for the engine the session hands over to.
    fn destination(&mut self) -> Destination<'_> {
        Destination {
            ram: &self.inc.ram,
            machine: &mut *self.inc.machine,
            shared: &self.inc.shared,
            events: &self.inc.events,
        }
    }

    /// A COMMAND section (type byte at `at`, read). Returns the package
    /// when PACKAGED came (the switch to postcopy).
    fn command<R: Read>(
        &mut self,
        r: &mut Reader<R>,
        at: u64,
        ram_started: bool,
    ) -> Result<Option<Package>, MigrationError> {
        match stream::read_command_body(r, at)? {
            Command::OpenReturnPath => {
                if !self.chan.duplex {
                    return Err(
                        StreamError::invalid(at, "OPEN_RETURN_PATH on a one-way channel").into(),
                    );
                }
                *self.rp_writer = Some(writer_of(self.chan));
            }
            Command::PostcopyAdvise(data) => self.postcopy_advise(at, &data, ram_started)?,
            Command::PostcopyRamDiscard(data) => {
                let p = self.post.as_ref().ok_or_else(|| {
                    StreamError::invalid(at, "POSTCOPY_RAM_DISCARD without POSTCOPY_ADVISE")
                })?;
                p.discard(&data)?;
            }
            Command::Packaged(len) => return self.packaged(r, at, len, ram_started).map(Some),
            Command::PostcopyPreempt => self.postcopy_preempt(at)?,
            Command::Ping(v) => self.ping(at, v)?,
            Command::EnableColo => {
                if self.rp_writer.is_none() {
                    return Err(
                        StreamError::invalid(at, "ENABLE_COLO without a return path").into(),
                    );
                }
                if !self.inc.machine.capabilities().x_colo {
                    return Err(crate::colo::ColoError::NotEnabled.into());
                }
                // Checkpoints are waited for: no batching.
                self.chan.batching.stop();
                self.colo = true;
            }
            Command::PostcopyRecvBitmap | Command::PostcopyResume => {
                return Err(StreamError::invalid(
                    at,
                    "a postcopy recovery, but no postcopy is paused here \
                     (migrate-recover on the paused destination gives its address)",
                )
                .into());
            }
            other @ (Command::PostcopyListen | Command::PostcopyRun | Command::Unknown(_)) => {
                return Err(StreamError::invalid(
                    at,
                    format!("unexpected command {} in a precopy stream", other.number()),
                )
                .into());
            }
        }
        Ok(None)
    }

    /// POSTCOPY_ADVISE: set up postcopy, or refuse it.
    fn postcopy_advise(
        &mut self,
        at: u64,
        data: &[u8],
        ram_started: bool,
    ) -> Result<(), MigrationError> {
        let rp = self
            .rp_writer
            .clone()
            .ok_or_else(|| StreamError::invalid(at, "POSTCOPY_ADVISE without a return path"))?;
        if self.post.is_some() || ram_started {
            return Err(StreamError::invalid(at, "POSTCOPY_ADVISE after RAM or twice").into());
        }
        let caps = self.inc.machine.capabilities();
        let vcpus = if caps.postcopy_blocktime {
            Some(
                self.inc
                    .machine
                    .vcpu_threads()
                    .map_err(MigrationError::Machine)?,
            )
        } else {
            None
        };
        self.post = Some(Arc::new(DestPostcopy::advise(
            self.inc.ram.clone(),
            caps.postcopy_ram,
            data,
            rp,
            vcpus,
        )?));
        Ok(())
    }

    /// PACKAGED: check it and read the package.
    fn packaged<R: Read>(
        &mut self,
        r: &mut Reader<R>,
        at: u64,
        len: u32,
        ram_started: bool,
    ) -> Result<Package, MigrationError> {
        let p = self
            .post
            .clone()
            .ok_or_else(|| StreamError::invalid(at, "PACKAGED without POSTCOPY_ADVISE"))?;
        // At most the machine's devices (and the package's commands).
        let max = self.inc.machine.device_catalog().max_stream();
        if u64::from(len) > max {
            return Err(StreamError::invalid(
                at,
                format!("package of {len} bytes (at most {max} for this machine's devices)"),
            )
            .into());
        }
        if !ram_started {
            return Err(StreamError::invalid(at, "PACKAGED before the RAM section").into());
        }
        let pkg = r.vec(len as usize, "package")?;
        Ok((p, pkg))
    }

    /// POSTCOPY_PREEMPT: accept the preempt channel.
    fn postcopy_preempt(&mut self, at: u64) -> Result<(), MigrationError> {
        if self.post.is_none() || self.preempt.is_some() {
            return Err(StreamError::invalid(
                at,
                "POSTCOPY_PREEMPT without POSTCOPY_ADVISE or twice",
            )
            .into());
        }
        if !self.inc.machine.capabilities().postcopy_preempt {
            return Err(PostcopyError::Refused(
                "the postcopy-preempt capability is not set on the destination \
                 (migrate-set-capabilities on both sides)"
                    .into(),
            )
            .into());
        }
        let l = self
            .listener
            .ok_or_else(|| StreamError::invalid(at, "POSTCOPY_PREEMPT on a one-way channel"))?;
        let bound = self
            .chan
            .peer_timeout
            .unwrap_or(self.inc.shared.peer_timeout());
        let tls = self.inc.shared.tls_server();
        self.preempt = Some(crate::postcopy::accept_preempt(l, bound, tls.as_deref())?);
        Ok(())
    }

    /// PING: answer PONG; before the source's stop, stop batching, and
    /// before the postcopy switch, enter real-time.
    fn ping(&mut self, at: u64, v: u32) -> Result<(), MigrationError> {
        if let Some(w) = self.rp_writer.as_ref() {
            send_rp(w, rp::PONG, &v.to_be_bytes()).map_err(|e| StreamError::Io {
                offset: at,
                source: e,
            })?;
        }
        // The source stops its guest after this answer
        // (precopy's final round or the postcopy switch):
        // from here every message is urgent.
        if v == ping::DRAINED || v == ping::SWITCH {
            self.chan.batching.stop();
        }
        // The postcopy switch follows: real-time until RUN.
        if self.post.is_some() && v == ping::SWITCH {
            self.switch.get_or_insert_with(RealTimeSection::enter);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::tests::VecRam;
    use crate::stream::DeviceBlob;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    /// A source machine. `stopped` is its "vCPU": the test's guest thread
    /// writes only while holding it and seeing `false`, so once `stop`
    /// has set it no guest write can land (as a real stop parks vCPUs).
    struct Src {
        stopped: Arc<Mutex<bool>>,
        resumed: Arc<AtomicBool>,
    }
    impl Machine for Src {
        fn stop(&mut self) -> Result<Stopped, crate::MachineError> {
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
        fn resume(&mut self) -> Result<(), crate::MachineError> {
            self.resumed.store(true, Ordering::SeqCst);
            Ok(())
        }
    }
    struct Dst(Arc<Mutex<Vec<DeviceBlob>>>);
    impl IncomingMachine for Dst {
        fn load_devices(&mut self, blobs: Vec<DeviceBlob>) -> Result<(), crate::MachineError> {
            *self.0.lock().unwrap() = blobs;
            Ok(())
        }
        fn device_catalog(&mut self) -> crate::stream::DeviceCatalog {
            crate::stream::DeviceCatalog::new().with("cpu", 1, 64)
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
        let dthread = std::thread::spawn(move || {
            run_incoming(
                inc,
                listener.accept(Duration::from_secs(20), None).unwrap(),
                None,
            )
        });

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
            shared.lock_info().error_desc,
            dshared.lock_info().error_desc
        );
        assert_eq!(
            dthread.join().unwrap(),
            Status::Completed,
            "{:?}",
            dshared.lock_info().error_desc
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
        let info = shared.lock_info().to_json();
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
        let dthread = std::thread::spawn(move || {
            run_incoming(
                inc,
                listener.accept(Duration::from_secs(20), None).unwrap(),
                None,
            )
        });
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
        let desc = shared.lock_info().error_desc.clone().unwrap();
        assert!(
            desc.contains("destination") && desc.contains("memory"),
            "{desc}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A destination that accepts and then reads nothing (a frozen
    /// process): the source's writes give up after x-peer-timeout, the
    /// migration fails saying the peer stopped answering, and the source's
    /// guest was never stopped. Then the mirror case: a source that sends
    /// its header and falls silent fails the destination the same way.
    #[test]
    fn silent_peer_fails_the_migration_within_the_peer_timeout() {
        let dir = std::env::temp_dir().join(format!("mig-silent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uri = Uri::Unix(dir.join("s"));
        let listener = transport::Listener::bind(&uri).unwrap();
        // Accept, then neither read nor write until the source has given up.
        let frozen = std::thread::spawn(move || {
            let c = listener.accept(Duration::from_secs(60), None).unwrap();
            std::thread::sleep(Duration::from_secs(6));
            drop(c);
        });
        let src = Arc::new(VecRam::new(&[4096 * 4096]));
        for p in 0..4096 {
            src.guest_write(0, p, (p % 250) as u8 + 1);
        }
        let shared = Arc::new(Shared::default());
        let stopped = Arc::new(Mutex::new(false));
        let out = Outgoing {
            uri: uri.clone(),
            config: config(&src),
            ram: src.clone(),
            machine: Box::new(Src {
                stopped: stopped.clone(),
                resumed: Arc::new(AtomicBool::new(false)),
            }),
            params: Parameters {
                x_peer_timeout_ms: 1000,
                ..Default::default()
            },
            caps: Capabilities::default(),
            shared: shared.clone(),
            events: Arc::new(|_| {}),
        };
        let t = std::time::Instant::now();
        assert_eq!(run_outgoing(out), Status::Failed);
        let took = t.elapsed();
        let desc = shared.lock_info().error_desc.clone().unwrap();
        assert!(desc.contains("stopped answering"), "{desc}");
        assert!(took < Duration::from_secs(5), "gave up after {took:?}");
        assert!(!*stopped.lock().unwrap(), "the guest was stopped");
        frozen.join().unwrap();

        // The mirror: the source falls silent after its header.
        let listener = transport::Listener::bind(&uri).unwrap();
        let dst = Arc::new(VecRam::new(&[64 * 4096]));
        let dshared = Arc::new(Shared::default());
        dshared.set_peer_timeout_ms(1000);
        let inc = Incoming {
            config: config(&dst),
            ram: dst.clone(),
            machine: Box::new(Dst(Arc::new(Mutex::new(Vec::new())))),
            shared: dshared.clone(),
            events: Arc::new(|_| {}),
        };
        let dthread = std::thread::spawn(move || accept_and_run_incoming(inc, listener));
        let mut c = transport::connect(&uri, Duration::from_secs(60), None).unwrap();
        let mut w = Writer::new(&mut c.writer);
        stream::write_header(&mut w).unwrap();
        w.flush().unwrap();
        let t = std::time::Instant::now();
        assert_eq!(dthread.join().unwrap(), Status::Failed);
        let took = t.elapsed();
        let desc = dshared.lock_info().error_desc.clone().unwrap();
        assert!(desc.contains("stopped answering"), "{desc}");
        assert!(took < Duration::from_secs(5), "gave up after {took:?}");
        drop(c);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A small xorshift generator: fixed seed, reproducible cases.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// A whole stream to a file (a save of a guest that wrote some pages),
    /// and the guest's memory.
    fn saved_stream(dir: &std::path::Path) -> (Vec<u8>, Vec<Vec<u8>>) {
        let src = Arc::new(VecRam::new(&[64 * 4096, 16 * 4096]));
        for p in 0..40 {
            src.guest_write(0, p, (p % 5) as u8 + 1);
        }
        src.guest_write(1, 3, 9);
        let path = dir.join("base.qevm");
        let out = Outgoing {
            uri: Uri::File(path.clone()),
            config: config(&src),
            ram: src.clone(),
            machine: Box::new(Src {
                stopped: Arc::new(Mutex::new(false)),
                resumed: Arc::new(AtomicBool::new(false)),
            }),
            params: Parameters::default(),
            caps: Capabilities::default(),
            shared: Arc::new(Shared::default()),
            events: Arc::new(|_| {}),
        };
        assert_eq!(run_outgoing(out), Status::Completed);
        let mem = src.data.iter().map(|d| d.lock().unwrap().clone()).collect();
        (std::fs::read(&path).unwrap(), mem)
    }

    /// One mutation of `base`, picked by `rng`: what a damaged or hostile
    /// stream does (flipped bits, truncation, garbage, absurd or zero
    /// length fields, a section repeated or dropped, bytes swapped).
    fn mutate(base: &[u8], rng: &mut Rng) -> Vec<u8> {
        let mut s = base.to_vec();
        let at = |rng: &mut Rng, s: &[u8]| rng.below(s.len() as u64) as usize;
        for _ in 0..=rng.below(3) {
            match rng.below(7) {
                0 => {
                    let i = at(rng, &s);
                    s[i] ^= 1 << rng.below(8);
                }
                1 => {
                    let i = at(rng, &s);
                    s.truncate(i);
                }
                2 => {
                    let i = at(rng, &s);
                    let junk: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                    s.splice(i..i, junk);
                }
                3 | 4 => {
                    // A 4-byte field: all ones, zero, or a random value.
                    if s.len() > 4 {
                        let i = at(rng, &s[..s.len() - 4]);
                        let v: u32 = match rng.below(3) {
                            0 => u32::MAX,
                            1 => 0,
                            _ => rng.next() as u32,
                        };
                        s[i..i + 4].copy_from_slice(&v.to_be_bytes());
                    }
                }
                5 => {
                    // Repeat a stretch (a section sent twice).
                    let i = at(rng, &s);
                    let n = (rng.below(512) as usize).min(s.len() - i);
                    let copy = s[i..i + n].to_vec();
                    s.splice(i..i, copy);
                }
                _ => {
                    let i = at(rng, &s);
                    let n = (rng.below(256) as usize).min(s.len() - i);
                    s.drain(i..i + n);
                }
            }
            if s.is_empty() {
                break;
            }
        }
        s
    }

    /// Structure-aware fuzzing of the incoming side: a real saved stream,
    /// mutated, is read by a destination. Each case must end (completed,
    /// or failed with a reason), never panic or hang. The seed is fixed
    /// (`MINIVMM_FUZZ_SEED`) and the case count bounded
    /// (`MINIVMM_FUZZ_CASES`, default 400) so `./test.sh` is reproducible;
    /// `tools/fuzz.sh` runs it as long as asked.
    #[test]
    fn fuzzed_streams_fail_cleanly() {
        let env = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        let cases = env("MINIVMM_FUZZ_CASES", 400);
        let seed = env("MINIVMM_FUZZ_SEED", 0x6d69_6e69_766d_6d21);
        let dir = std::env::temp_dir().join(format!("mig-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (base, mem) = saved_stream(&dir);
        let mut rng = Rng(seed | 1);
        let (mut completed, mut failed) = (0, 0);
        for case in 0..cases {
            let bytes = mutate(&base, &mut rng);
            let path = dir.join("case.qevm");
            std::fs::write(&path, &bytes).unwrap();
            let dst = Arc::new(VecRam::new(&[64 * 4096, 16 * 4096]));
            let shared = Arc::new(Shared::default());
            let inc = Incoming {
                config: config(&dst),
                ram: dst.clone(),
                machine: Box::new(Dst(Arc::new(Mutex::new(Vec::new())))),
                shared: shared.clone(),
                events: Arc::new(|_| {}),
            };
            let listener = transport::Listener::bind(&Uri::File(path.clone())).unwrap();
            let st = accept_and_run_incoming(inc, listener);
            match st {
                // A mutation that left the stream valid (after its EOF,
                // say) must load the guest exactly.
                Status::Completed => {
                    for (b, want) in mem.iter().enumerate() {
                        assert!(
                            *dst.data[b].lock().unwrap() == *want,
                            "case {case} (seed {seed:#x}): completed with block {b} wrong"
                        );
                    }
                    completed += 1;
                }
                Status::Failed => {
                    let desc = shared.lock_info().error_desc.clone().unwrap_or_default();
                    assert!(
                        !desc.is_empty(),
                        "case {case} (seed {seed:#x}): failed without a reason"
                    );
                    failed += 1;
                }
                other => panic!("case {case} (seed {seed:#x}): ended {other:?}"),
            }
        }
        eprintln!("fuzzed streams: {cases} cases, {completed} completed, {failed} failed cleanly");
        assert!(failed > cases / 2, "most mutations must be caught");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

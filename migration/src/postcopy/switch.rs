//! Postcopy, the destination's switch: the preempt channel accepted at
//! POSTCOPY_PREEMPT, then the package (PACKAGED): LISTEN starts the
//! listen (and preempt) threads, RUN loads the devices and starts the
//! guest, and the incoming thread waits until every page has come.
//!
//! See [`crate::postcopy`] for the message sequence.

use std::io::{BufRead, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dest::DestPostcopy;
use super::PostcopyError;
use crate::machine::{set_status, Destination, MigrationError};
use crate::ram::RamReader;
use crate::return_path::{replace_writer, send_rp};
use crate::sched::RealTimeSection;
use crate::status::{Recover, Shared, Status};
use crate::stream::{self, rp, section, Command, DeviceBlob, Reader, StreamError};
use crate::transport::{Channel, Closer, Listener};

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
/// that it starts as a preempt channel. It idles between requests: only its
/// writes are bounded by the peer timeout (the main stream and the return
/// path watch the source).
pub(crate) fn accept_preempt(
    l: &Listener,
    peer_timeout: Duration,
    tls: Option<&crate::tls::TlsCreds>,
) -> Result<PreemptIn, MigrationError> {
    let mut chan = l.accept_within(PREEMPT_ACCEPT, peer_timeout, tls)?;
    chan.closer.unbound_reads();
    let reader: Box<dyn Read + Send> =
        std::mem::replace(&mut chan.reader, Box::new(std::io::empty()));
    let mut r = Reader::new(std::io::BufReader::with_capacity(256 << 10, reader));
    check_preempt_header(&mut r).map_err(|e| PostcopyError::Preempt(Box::new(e.into())))?;
    Ok(PreemptIn {
        r,
        w: std::mem::replace(&mut chan.writer, Box::new(std::io::sink())),
        closer: chan.closer,
    })
}

/// The first bytes of a preempt channel: its magic and version.
fn check_preempt_header(r: &mut Reader<impl Read>) -> Result<(), StreamError> {
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
}

/// Destination: a PACKAGED command arrived (the switch). Runs LISTEN (hands
/// the main stream to the listen thread), loads the devices at RUN, then
/// waits until the listen thread has every page. On failure the guest is
/// stopped before userfaultfd is released. `main`: the main stream and its
/// RAM record state; `preempt`: the preempt channel if there is one, and
/// the listener the source came to (an automatic recovery accepts it there
/// again); `switch` ends at RUN.
pub(crate) fn dest_package<'a, R: BufRead + Send + 'static>(
    dest: Destination<'a>,
    closer: Closer,
    post: Arc<DestPostcopy>,
    pkg: Vec<u8>,
    main: (Reader<R>, RamReader),
    (preempt, listener): (Option<PreemptIn>, Option<&'a Listener>),
    switch: RealTimeSection,
) -> Result<(), MigrationError> {
    let preempt_closer = preempt.as_ref().map(|p| p.closer.clone());
    // migrate-pause breaks this connection.
    dest.shared.set_closer(Some(closer.clone()));
    let mut s = Switch {
        dest,
        closer,
        post,
        preempt,
        preempt_closer,
        listener,
        switch: Some(switch),
        main: Some(main),
        devices: Vec::new(),
        listen: None,
        urgent: None,
        fault: None,
        ran: false,
        listen_done: false,
    };
    let res = s.read_package(&pkg);
    s.finish(res)
}

/// A thread of the switch that reads a stream.
type StreamThread = std::thread::JoinHandle<Result<(), MigrationError>>;

/// The destination's switch, from PACKAGED until every page is there.
struct Switch<'a, R> {
    dest: Destination<'a>,
    /// Shuts the main stream.
    closer: Closer,
    post: Arc<DestPostcopy>,
    /// The preempt channel, until LISTEN starts its thread.
    preempt: Option<PreemptIn>,
    /// Shuts the preempt channel.
    preempt_closer: Option<Closer>,
    /// Where the source came from (automatic recovery).
    listener: Option<&'a Listener>,
    /// Real-time until RUN.
    switch: Option<RealTimeSection>,
    /// The main stream and its RAM record state, until LISTEN hands them
    /// to the listen thread.
    main: Option<(Reader<R>, RamReader)>,
    /// Device state from the package, loaded at RUN.
    devices: Vec<DeviceBlob>,
    listen: Option<StreamThread>,
    /// The preempt thread.
    urgent: Option<StreamThread>,
    fault: Option<std::thread::JoinHandle<()>>,
    /// RUN came: the guest runs here.
    ran: bool,
    /// The listen and preempt threads ended well (joined early, by
    /// [`Switch::fetch_for_load`]).
    listen_done: bool,
}

impl<R: BufRead + Send + 'static> Switch<'_, R> {
    /// The package's sections, until its EOF.
    fn read_package(&mut self, pkg: &[u8]) -> Result<(), MigrationError> {
        let mut pr = Reader::new(pkg);
        loop {
            pr.begin_section();
            let at = pr.offset();
            match pr.u8("package section type")? {
                section::COMMAND => match stream::read_command_body(&mut pr, at)? {
                    Command::PostcopyListen => self.listen(at)?,
                    Command::PostcopyRun => self.run(at)?,
                    Command::Ping(v) => {
                        // A return path that broke is the link's failure:
                        // shut, the main stream fails in the listen
                        // thread too, and the postcopy pauses there (the
                        // package itself is here whole).
                        if send_rp(&self.post.rp, rp::PONG, &v.to_be_bytes()).is_err() {
                            self.closer.close();
                        }
                    }
                    other => {
                        return Err(StreamError::invalid(
                            at,
                            format!(
                                "unexpected command {} in the postcopy package",
                                other.number()
                            ),
                        )
                        .into())
                    }
                },
                section::FULL => {
                    let id = pr.be32("section id")?;
                    let catalog = self.dest.machine.device_catalog();
                    stream::read_device(&mut pr, id, at, &catalog, &mut self.devices)?;
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
    }

    /// POSTCOPY_LISTEN: userfaultfd and the fault thread, then the preempt
    /// and listen threads.
    fn listen(&mut self, at: u64) -> Result<(), MigrationError> {
        let Some((r, rr)) = self.main.take() else {
            return Err(StreamError::invalid(at, "second POSTCOPY_LISTEN").into());
        };
        self.fault = Some(self.post.listen()?);
        set_status(self.dest.shared, self.dest.events, Status::PostcopyActive);
        // A failed channel shuts the other one too, so
        // that neither thread waits on a dead stream.
        if let Some(pi) = self.preempt.take() {
            self.urgent = Some(spawn_preempt(&self.post, self.closer.clone(), pi)?);
        }
        self.listen = Some(spawn_listen(
            self.post.clone(),
            self.dest.shared.clone(),
            r,
            rr,
            self.preempt_closer.clone(),
        )?);
        Ok(())
    }

    /// POSTCOPY_RUN: load the devices and start the guest.
    fn run(&mut self, at: u64) -> Result<(), MigrationError> {
        if self.listen.is_none() || self.ran {
            return Err(StreamError::invalid(at, "POSTCOPY_RUN before LISTEN or twice").into());
        }
        self.fetch_for_load()?;
        self.dest
            .machine
            .load_devices(std::mem::take(&mut self.devices))
            .map_err(MigrationError::Machine)?;
        // The guest runs: the switch is over.
        self.switch.take();
        self.ran = true;
        Ok(())
    }

    /// Before RUN loads the devices: bring in the guest pages the load
    /// writes (KVM writes its paravirtual clock areas as the vCPUs' MSRs
    /// are set). Loaded with one missing, the control thread that loads
    /// would wait on the page, and with a link that broke just then it
    /// would wait until a recovery that the monitor, behind it, could no
    /// longer be asked for. A helper thread faults on them instead, as a
    /// vCPU would (the fault thread asks the source); meanwhile a broken
    /// link pauses the postcopy here and waits for its recovery.
    fn fetch_for_load(&mut self) -> Result<(), MigrationError> {
        let gpas = self.dest.machine.pages_written_on_load(&self.devices);
        let Some(helper) = self.post.fetch(&gpas)? else {
            return Ok(());
        };
        while !helper.is_finished() {
            if self.dest.shared.cancelled() {
                // Released at the end (finish), the page reads as zeros
                // and the helper ends.
                return Err(MigrationError::Cancelled);
            }
            if self.listen.as_ref().is_some_and(|l| l.is_finished()) {
                match join_threads(self.listen.take(), self.urgent.take()) {
                    // Every page came: so did these.
                    Ok(()) => self.listen_done = true,
                    Err(e) if e.is_link_failure() => {
                        let (listen, urgent) =
                            pause_and_recover(&self.dest, &self.post, &e, self.listener)?;
                        self.listen = Some(listen);
                        self.urgent = urgent;
                    }
                    Err(e) => return Err(e),
                }
            }
            std::thread::sleep(FETCH_POLL);
        }
        let _ = helper.join();
        Ok(())
    }

    /// After the package (`res`): wait for the listen and preempt threads,
    /// check every page came; on failure stop the guest, then release
    /// userfaultfd. Notes the fault statistics.
    fn finish(self, res: Result<(), MigrationError>) -> Result<(), MigrationError> {
        let Switch {
            dest,
            closer,
            post,
            preempt,
            preempt_closer,
            listener,
            switch,
            main,
            devices,
            listen,
            urgent,
            fault,
            ran,
            listen_done,
        } = self;
        if res.is_err() {
            // Unblock the listen and preempt threads' reads.
            closer.close();
            if let Some(c) = &preempt_closer {
                c.close();
            }
        }
        let mut listened = if listen_done {
            Ok(())
        } else {
            join_threads(listen, urgent)
        };
        // After RUN the guest runs here: a broken connection pauses the
        // postcopy until the user recovers it (or for good).
        if res.is_ok() && ran {
            while let Err(e) = &listened {
                if !e.is_link_failure() {
                    break;
                }
                listened = pause_and_recover(&dest, &post, e, listener)
                    .and_then(|(listen, urgent)| join_threads(Some(listen), urgent));
            }
        }
        let result = res.and(listened).and_then(|()| {
            if !ran {
                return Err(
                    PostcopyError::Protocol("the package had no POSTCOPY_RUN".into()).into(),
                );
            }
            post.finish().map_err(MigrationError::from)
        });
        if let Err(e) = &result {
            // Stop the vCPUs before releasing userfaultfd: released, the pages
            // that never came would read as zeros.
            dest.machine.abandon(&crate::machine::error_chain(e));
            post.release();
        }
        if let Some(f) = fault {
            let _ = f.join();
        }
        let stats = post.stats_json();
        {
            let mut i = dest.shared.lock_info();
            i.ram.postcopy_requests = stats["requests"].as_u64().unwrap_or(0);
            i.extra.insert("x-postcopy-faults".into(), stats);
            post.blocktime_into(&mut i, true);
        }
        // What is left goes in the order the switch held it before.
        drop(main);
        drop(devices);
        drop(preempt_closer);
        drop(switch);
        drop(preempt);
        result
    }
}

/// The preempt thread, placing the pages of the preempt channel `pi`; its
/// request direction goes to the fault thread. Its failure shuts the main
/// stream (`main`).
fn spawn_preempt(
    post: &Arc<DestPostcopy>,
    main: Closer,
    mut pi: PreemptIn,
) -> Result<StreamThread, MigrationError> {
    let w = std::mem::replace(&mut pi.w, Box::new(std::io::sink()));
    *post.urgent.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(Mutex::new(w)));
    let p = post.clone();
    Ok(std::thread::Builder::new()
        .name("postcopy-preempt".into())
        .spawn(move || {
            let r = p
                .preempt_loop(&mut pi.r)
                .map_err(|e| PostcopyError::Preempt(Box::new(e)).into());
            if r.is_err() {
                main.close();
            }
            r
        })
        .map_err(|e| PostcopyError::Protocol(format!("cannot start the preempt thread: {e}")))?)
}

/// The listen thread on `r` (`rr`: its RAM record state); a failure also
/// shuts `other` (the preempt channel), so that no thread waits on a dead
/// stream.
fn spawn_listen<R: BufRead + Send + 'static>(
    post: Arc<DestPostcopy>,
    shared: Arc<Shared>,
    mut r: Reader<R>,
    mut rr: RamReader,
    other: Option<Closer>,
) -> Result<StreamThread, MigrationError> {
    Ok(std::thread::Builder::new()
        .name("postcopy-listen".into())
        .spawn(move || {
            let res = post.listen_loop(&mut r, &mut rr, &shared);
            if let (Err(_), Some(c)) = (&res, &other) {
                c.close();
            }
            res
        })
        .map_err(|e| PostcopyError::Protocol(format!("cannot start the listen thread: {e}")))?)
}

/// How often the incoming thread, waiting for the pages the device load
/// writes, looks at the listen thread and for a cancel.
const FETCH_POLL: Duration = Duration::from_millis(1);

/// How often a paused destination waiting for its source looks for a newer
/// `migrate-recover` (or a cancel).
const RECOVER_POLL: Duration = Duration::from_millis(200);

/// The destination's side of a postcopy whose connection broke after RUN
/// (`cause`): `postcopy-paused`, the guest running on (vCPUs that fault on
/// a missing page wait; their requests are kept). On `migrate-recover`
/// it accepts the source on the new listener and runs the recovery
/// handshake ([`handshake`]); a source that does not come is waited for
/// until a newer `migrate-recover`; a handshake that fails pauses again.
/// With `x-postcopy-auto-recover`, until that time is up and no
/// `migrate-recover` came, it accepts the source on `original`, the
/// listener of the migration. Returns the new listen and preempt threads.
fn pause_and_recover(
    dest: &Destination<'_>,
    post: &Arc<DestPostcopy>,
    cause: &MigrationError,
    original: Option<&Listener>,
) -> Result<(StreamThread, Option<StreamThread>), MigrationError> {
    post.pause();
    let paused = super::Pause::begin(dest.shared, dest.events, cause);
    let mut own: Option<Listener> = None;
    let mut auto = dest
        .shared
        .auto_recover()
        .zip(original)
        .map(|(d, l)| (Instant::now() + d, l));
    if let Some((_, l)) = auto {
        log::info!(
            "postcopy paused: waiting for the source to reconnect to {}",
            l.uri()
        );
    }
    loop {
        if dest.shared.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        if auto.is_some_and(|(until, _)| Instant::now() >= until) {
            log::warn!(
                "postcopy: the source did not reconnect within x-postcopy-auto-recover; \
                 recover with migrate-recover"
            );
            auto = None;
        }
        let l = own.as_ref().or(auto.map(|(_, l)| l));
        let listening = l.is_some();
        let newer = match l {
            None => dest.shared.wait_recover(),
            Some(l) => match l.wait_for_peer(Some(RECOVER_POLL)) {
                Ok(true) => None,
                Ok(false) => dest.shared.try_recover(),
                Err(e) => {
                    paused.again(dest.shared, dest.events, &e.into());
                    if own.take().is_none() {
                        auto = None;
                    }
                    continue;
                }
            },
        };
        match newer {
            Some(Recover::Listen(l)) => {
                own = Some(l);
                continue;
            }
            Some(Recover::Connect(_)) => continue,
            None if !listening => return Err(MigrationError::Cancelled),
            None => {}
        }
        let Some(l) = own.as_ref().or(auto.map(|(_, l)| l)) else {
            continue;
        };
        if !l.wait_for_peer(Some(Duration::ZERO)).unwrap_or(false) {
            continue;
        }
        let tls = dest.shared.tls_server();
        let chan = match l.accept(dest.shared.peer_timeout(), tls.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                paused.again(dest.shared, dest.events, &e.into());
                continue;
            }
        };
        set_status(dest.shared, dest.events, Status::PostcopyRecover);
        match handshake(dest, post, chan, l) {
            Ok(t) => {
                paused.end(dest.shared, dest.events);
                return Ok(t);
            }
            Err(e) => {
                post.pause();
                paused.again(dest.shared, dest.events, &e);
            }
        }
    }
}

/// The next command of `r`, which must be `want` (named `name`).
fn expect_command(
    r: &mut Reader<impl Read>,
    want: &Command,
    name: &str,
) -> Result<(), MigrationError> {
    let at = r.offset();
    let got = stream::read_command(r)?;
    if &got != want {
        return Err(StreamError::invalid(
            at,
            format!(
                "expected {name} to recover the postcopy, found command {}",
                got.number()
            ),
        )
        .into());
    }
    Ok(())
}

/// The destination's recovery handshake on a new connection (see
/// [`crate::postcopy`]): header, OPEN_RETURN_PATH (the return path moves
/// to this connection), POSTCOPY_RECV_BITMAP (answered with the received
/// bitmaps and RESUME_ACK), with `postcopy-preempt` POSTCOPY_PREEMPT and
/// PING 4 (the preempt channel accepted again on `l`), POSTCOPY_RESUME
/// (the pending requests are asked again); then the listen thread reads
/// this stream and the preempt thread the new preempt channel.
fn handshake(
    dest: &Destination<'_>,
    post: &Arc<DestPostcopy>,
    mut chan: Channel,
    l: &Listener,
) -> Result<(StreamThread, Option<StreamThread>), MigrationError> {
    dest.shared.set_closer(Some(chan.closer.clone()));
    let reader = std::mem::replace(&mut chan.reader, Box::new(std::io::empty()));
    let mut r = Reader::new(std::io::BufReader::with_capacity(4 << 20, reader));
    stream::read_header(&mut r)?;
    expect_command(&mut r, &Command::OpenReturnPath, "OPEN_RETURN_PATH")?;
    if !chan.duplex {
        return Err(PostcopyError::Refused("recovery needs a return path".into()).into());
    }
    replace_writer(
        &post.rp,
        std::mem::replace(&mut chan.writer, Box::new(std::io::sink())),
    );
    expect_command(&mut r, &Command::PostcopyRecvBitmap, "POSTCOPY_RECV_BITMAP")?;
    let io = |at: u64| move |source| StreamError::Io { offset: at, source };
    post.send_bitmaps().map_err(io(r.offset()))?;
    let at = r.offset();
    let mut preempt = None;
    match stream::read_command(&mut r)? {
        Command::PostcopyResume => {}
        Command::PostcopyPreempt => {
            preempt = Some(accept_preempt(
                l,
                dest.shared.peer_timeout(),
                dest.shared.tls_server().as_deref(),
            )?);
            expect_command(
                &mut r,
                &Command::Ping(stream::ping::PREEMPT),
                "PING 4 (preempt channel)",
            )?;
            send_rp(&post.rp, rp::PONG, &stream::ping::PREEMPT.to_be_bytes())
                .map_err(io(r.offset()))?;
            expect_command(&mut r, &Command::PostcopyResume, "POSTCOPY_RESUME")?;
        }
        other => {
            return Err(StreamError::invalid(
                at,
                format!(
                    "expected POSTCOPY_PREEMPT or POSTCOPY_RESUME to recover the postcopy, \
                     found command {}",
                    other.number()
                ),
            )
            .into())
        }
    }
    let preempt_closer = preempt.as_ref().map(|p| p.closer.clone());
    let urgent = preempt
        .map(|pi| spawn_preempt(post, chan.closer.clone(), pi))
        .transpose()?;
    if let Err(e) = post.resume() {
        if let Some(c) = &preempt_closer {
            c.close();
        }
        return Err(io(r.offset())(e).into());
    }
    let rr = RamReader::new(dest.ram.blocks().to_vec());
    match spawn_listen(
        post.clone(),
        dest.shared.clone(),
        r,
        rr,
        preempt_closer.clone(),
    ) {
        Ok(listen) => Ok((listen, urgent)),
        Err(e) => {
            if let Some(c) = &preempt_closer {
                c.close();
            }
            Err(e)
        }
    }
}

/// Wait for the listen and preempt threads; the first failure is the cause.
fn join_threads(
    listen: Option<StreamThread>,
    urgent: Option<StreamThread>,
) -> Result<(), MigrationError> {
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
    match (listened, urgent_done) {
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(main), Err(pre)) => Err(if matches!(main, MigrationError::Stream(_)) {
            pre
        } else {
            main
        }),
        (Ok(()), Ok(())) => Ok(()),
    }
}

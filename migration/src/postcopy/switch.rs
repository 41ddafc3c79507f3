//! Postcopy, the destination's switch: the preempt channel accepted at
//! POSTCOPY_PREEMPT, then the package (PACKAGED): LISTEN starts the
//! listen (and preempt) threads, RUN loads the devices and starts the
//! guest, and the incoming thread waits until every page has come.
//!
//! See [`crate::postcopy`] for the message sequence.

use std::io::{BufRead, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::dest::DestPostcopy;
use super::PostcopyError;
use crate::machine::{set_status, Destination, MigrationError};
use crate::ram::RamReader;
use crate::return_path::send_rp;
use crate::status::Status;
use crate::stream::{self, cmd, rp, section, Reader, StreamError};
use crate::transport::{Closer, Listener};

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

/// Destination: a PACKAGED command arrived (the switch). Runs LISTEN (hands
/// the main stream to the listen thread), loads the devices at RUN, then
/// waits until the listen thread has every page. On failure the guest is
/// stopped before userfaultfd is released. `main`: the main stream and its
/// RAM record state; `switch` ends at RUN.
pub(crate) fn dest_package<R: BufRead + Send + 'static>(
    dest: Destination<'_>,
    closer: Closer,
    post: Arc<DestPostcopy>,
    pkg: Vec<u8>,
    main: (Reader<R>, RamReader),
    mut preempt: Option<PreemptIn>,
    switch: crate::sched::RealTimeSection,
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
                            set_status(dest.shared, dest.events, Status::PostcopyActive);
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
                            let (p, shared) = (post.clone(), dest.shared.clone());
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
                            dest.machine
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
        dest.machine.abandon(&crate::machine::error_chain(e));
        post.release();
    }
    if let Some(f) = fault {
        let _ = f.join();
    }
    let stats = post.stats_json();
    {
        let mut i = dest.shared.info();
        i.ram.postcopy_requests = stats["requests"].as_u64().unwrap_or(0);
        i.extra.insert("x-postcopy-faults".into(), stats);
    }
    result
}

//! The return path: messages from the destination back to the source, on
//! the same connection (`be16 type, be16 len, data`, see [`crate::stream`]).
//!
//! ```text
//! source                                   destination
//! OPEN_RETURN_PATH (command)       ---->   takes the channel's writer ([`writer_of`])
//! PING n                           ---->
//!                                  <----   PONG n
//!                                  <----   REQ_PAGES_ID / REQ_PAGES (postcopy)
//!                                  <----   COLO m (COLO secondary)
//!                                  <----   SHUT 0, or ERROR_DESC text + SHUT 1
//! ```
//!
//! This module owns both ends: the destination's writer ([`RpWriter`],
//! [`send_rp`]) and the source's `ReturnPath`, which owns the reader
//! thread and the last error description the destination sent (reported
//! when its SHUT(1) comes, or when the connection breaks).

use std::io::{BufReader, Read, Write};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::machine::MigrationError;
use crate::stream::{self, cmd, rp, Reader, Sink, StreamError, Writer};
use crate::transport::Channel;

/// The destination's return path, shared by the incoming and fault threads.
pub type RpWriter = Arc<Mutex<Box<dyn Write + Send>>>;

/// Send one return-path message.
pub fn send_rp(w: &RpWriter, kind: u16, data: &[u8]) -> std::io::Result<()> {
    let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
    stream::write_rp(&mut *g, kind, data)
}

/// The destination's end of the return path: the channel's writer, taken.
pub(crate) fn writer_of(chan: &mut Channel) -> RpWriter {
    Arc::new(Mutex::new(std::mem::replace(
        &mut chan.writer,
        Box::new(std::io::sink()),
    )))
}

/// One message from the reader thread, or the error that ended it.
pub(crate) type RpMessage = Result<(u16, Vec<u8>), StreamError>;

/// The source's end of the return path: the messages its reader thread
/// reads, and the destination's last error description.
pub(crate) struct ReturnPath {
    rx: Receiver<RpMessage>,
    last_desc: Option<String>,
}

impl ReturnPath {
    /// Start the reader thread: it reads messages into a channel until the
    /// peer closes.
    pub(crate) fn spawn(reader: Box<dyn Read + Send>) -> Self {
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("mig-return".into())
            .spawn(move || {
                // It mostly sleeps; when a postcopy page request arrives, a
                // guest is waiting for it.
                crate::sched::prefer_this_thread();
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
        Self {
            rx,
            last_desc: None,
        }
    }

    /// The next message, if one is there.
    pub(crate) fn try_recv(&self) -> Result<RpMessage, TryRecvError> {
        self.rx.try_recv()
    }

    /// The next message, waiting up to `timeout`.
    pub(crate) fn recv_timeout(&self, timeout: Duration) -> Result<RpMessage, RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    /// Turn a return-path message into an error, if it reports one (an
    /// ERROR_DESC is kept for the SHUT(1) that follows it).
    pub(crate) fn error(&mut self, kind: u16, data: &[u8]) -> Option<MigrationError> {
        match kind {
            rp::ERROR_DESC => {
                self.last_desc = Some(String::from_utf8_lossy(data).into_owned());
                None
            }
            rp::SHUT if data.len() == 4 && data != [0, 0, 0, 0] => {
                Some(MigrationError::Destination(
                    self.last_desc
                        .take()
                        .unwrap_or_else(|| "the destination reported an error".into()),
                ))
            }
            _ => None,
        }
    }

    /// The destination's last error description, as an error, if it sent one.
    pub(crate) fn take_desc(&mut self) -> Option<MigrationError> {
        self.last_desc.take().map(MigrationError::Destination)
    }

    /// Read what has arrived without waiting: an error if the destination
    /// reported one or the return path broke.
    pub(crate) fn check(&mut self) -> Result<(), MigrationError> {
        while let Ok(m) = self.rx.try_recv() {
            match m {
                Ok((k, d)) => {
                    if let Some(e) = self.error(k, &d) {
                        return Err(e);
                    }
                }
                Err(_) => return Err(MigrationError::PeerLost("destination")),
            }
        }
        Ok(())
    }

    /// Source: send PING `value` and wait for its PONG, so that the
    /// destination has judged every command before it (or said why not).
    pub(crate) fn ping_and_wait<W: Sink>(
        &mut self,
        w: &mut Writer<W>,
        value: u32,
    ) -> Result<(), MigrationError> {
        w.command(cmd::PING, &value.to_be_bytes())?;
        w.flush()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or(MigrationError::PeerLost("destination"))?;
            match self.rx.recv_timeout(left) {
                Ok(Ok((rp::PONG, d))) if d == value.to_be_bytes() => return Ok(()),
                Ok(Ok((k, d))) => {
                    if let Some(e) = self.error(k, &d) {
                        return Err(e);
                    }
                }
                _ => {
                    return Err(self
                        .take_desc()
                        .unwrap_or(MigrationError::PeerLost("destination")))
                }
            }
        }
    }

    /// The destination's error from the return path, waiting briefly for it.
    pub(crate) fn destination_reason(&mut self) -> Option<MigrationError> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.rx.recv_timeout(left) {
                Ok(Ok((k, d))) => {
                    if let Some(e) = self.error(k, &d) {
                        return Some(e);
                    }
                }
                _ => return self.take_desc(),
            }
        }
    }
}

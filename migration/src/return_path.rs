//! The return path: messages from the destination back to the source, on
//! the same connection (`be16 type, be16 len, data`, see [`crate::stream`]).
//!
//! ```text
//! source                                   destination
//! OPEN_RETURN_PATH (command)       ---->   takes the channel's writer ([`writer_of`])
//! PING n                           ---->
//!                                  <----   PONG n
//!                                  <----   PONG 0 (keepalive, every peer timeout / 4)
//!                                  <----   REQ_PAGES_ID / REQ_PAGES (postcopy)
//!                                  <----   COLO m (COLO secondary)
//!                                  <----   SHUT 0, or ERROR_DESC text + SHUT 1
//! ```
//!
//! This module owns both ends: the destination's writer ([`RpWriter`],
//! [`send_rp`]) with its keepalive thread, and the source's `ReturnPath`,
//! which owns the reader thread and the last error description the
//! destination sent (reported when its SHUT(1) comes, or when the
//! connection breaks).
//!
//! **Keepalives.** Each side's socket reads fail after the peer timeout
//! without progress ([`crate::transport::PeerSilent`]), so each side keeps
//! the direction its peer reads from busy: the destination sends PONG 0
//! ([`ping::ALIVE`]) on the return path every quarter of its timeout from
//! the moment it opens it, whatever its engine is doing (a thread of its
//! own, [`writer_of`]); the source sends PING 0 on the main stream where it
//! would otherwise leave it idle ([`ReturnPath::ping_and_wait`], and COLO's
//! own heartbeat between checkpoints). Either side that is alive is
//! therefore never silent for long; one that is dead, frozen or cut off
//! is noticed within the timeout.

use std::io::{BufReader, Read, Write};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::machine::MigrationError;
use crate::stream::{self, ping, rp, Command, Reader, Sink, StreamError, Writer};
use crate::transport::{Channel, Closer, PeerSilent};

/// The destination's return path, shared by the incoming and fault threads.
pub type RpWriter = Arc<Mutex<Box<dyn Write + Send>>>;

/// Send one return-path message.
pub fn send_rp(w: &RpWriter, kind: u16, data: &[u8]) -> std::io::Result<()> {
    let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
    stream::write_rp(&mut *g, kind, data)
}

/// How often a side that must keep a direction busy sends a keepalive.
pub fn keepalive_interval(peer_timeout: Duration) -> Duration {
    (peer_timeout / 4).max(Duration::from_millis(50))
}

/// The destination's end of the return path: the channel's writer, taken.
/// On a socket, a thread sends the keepalive (PONG 0) every quarter of the
/// peer timeout until the writer is dropped. A failed write does not end
/// it: a paused postcopy gets a new connection behind the same writer
/// ([`replace_writer`]).
pub(crate) fn writer_of(chan: &mut Channel) -> RpWriter {
    let w: RpWriter = Arc::new(Mutex::new(std::mem::replace(
        &mut chan.writer,
        Box::new(std::io::sink()),
    )));
    if let Some(t) = chan.peer_timeout {
        let weak = Arc::downgrade(&w);
        let every = keepalive_interval(t);
        let spawned = std::thread::Builder::new()
            .name("mig-keepalive".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let Some(w) = weak.upgrade() else { break };
                let _ = send_rp(&w, rp::PONG, &ping::ALIVE.to_be_bytes());
            });
        if let Err(e) = spawned {
            log::warn!("no keepalive thread for the return path: {e}");
        }
    }
    w
}

/// Put a new connection's writer behind the return path `w` (a postcopy
/// recovery): its users, the keepalive thread included, write there from
/// now on.
pub(crate) fn replace_writer(w: &RpWriter, new: Box<dyn Write + Send>) {
    *w.lock().unwrap_or_else(|e| e.into_inner()) = new;
}

/// A page request (REQ_PAGES_ID or REQ_PAGES), its payload parsed:
/// `be64` offset, `be32` length[, `u8` len, block name].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// Byte offset in the block.
    pub start: u64,
    /// Bytes asked for.
    pub len: u32,
    /// REQ_PAGES_ID: the block's name; REQ_PAGES (`None`): the last block
    /// named on the same channel.
    pub block: Option<Vec<u8>>,
}

impl PageRequest {
    /// The message as sent: its type and payload.
    pub fn encode(&self) -> (u16, Vec<u8>) {
        let mut data = Vec::with_capacity(13 + 32);
        data.extend_from_slice(&self.start.to_be_bytes());
        data.extend_from_slice(&self.len.to_be_bytes());
        match &self.block {
            None => (rp::REQ_PAGES, data),
            Some(name) => {
                data.push(name.len() as u8);
                data.extend_from_slice(name);
                (rp::REQ_PAGES_ID, data)
            }
        }
    }
}

/// A return-path message, parsed in one place ([`RpMessage::parse`]).
/// A SHUT or PONG of another length than 4 bytes is [`RpMessage::Other`],
/// which every receiver ignores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RpMessage {
    /// SHUT: `be32` flag, 0 for success.
    Shut(u32),
    /// PONG: the `be32` value of the PING.
    Pong(u32),
    /// REQ_PAGES_ID or REQ_PAGES.
    PageRequest(PageRequest),
    /// A page request whose payload does not parse: why.
    BadPageRequest(&'static str),
    /// ERROR_DESC: the destination's error text.
    ErrorDesc(String),
    /// COLO: the secondary's `be32` message (`None`: not 4 bytes).
    Colo(Option<u32>),
    /// RECV_BITMAP: pages a paused postcopy destination has, from page
    /// `first` of `block`, one bit each (LSB first).
    RecvBitmap {
        /// The block's name.
        block: Vec<u8>,
        /// The page of the first bit.
        first: u64,
        /// The bits.
        bits: Vec<u8>,
    },
    /// RESUME_ACK: `be32` number of blocks whose bitmaps were sent.
    ResumeAck(u32),
    /// Anything else: its type.
    Other(u16),
}

impl RpMessage {
    /// Parse a message of type `kind` with payload `data`.
    pub fn parse(kind: u16, data: &[u8]) -> Self {
        let be32 = <[u8; 4]>::try_from(data).map(u32::from_be_bytes).ok();
        match (kind, be32) {
            (rp::SHUT, Some(v)) => Self::Shut(v),
            (rp::PONG, Some(v)) => Self::Pong(v),
            (rp::REQ_PAGES_ID | rp::REQ_PAGES, _) => match parse_page_request(kind, data) {
                Ok(r) => Self::PageRequest(r),
                Err(why) => Self::BadPageRequest(why),
            },
            (rp::ERROR_DESC, _) => Self::ErrorDesc(String::from_utf8_lossy(data).into_owned()),
            (rp::COLO, v) => Self::Colo(v),
            (rp::RESUME_ACK, Some(v)) => Self::ResumeAck(v),
            (rp::RECV_BITMAP, _) => match parse_bitmap(data) {
                Some((block, first, bits)) => Self::RecvBitmap { block, first, bits },
                None => Self::Other(kind),
            },
            (other, _) => Self::Other(other),
        }
    }
}

/// A RECV_BITMAP payload: block name, first page, bits.
fn parse_bitmap(d: &[u8]) -> Option<(Vec<u8>, u64, Vec<u8>)> {
    let n = *d.first()? as usize;
    let name = d.get(1..1 + n)?.to_vec();
    let first = u64::from_be_bytes(d.get(1 + n..9 + n)?.try_into().ok()?);
    Some((name, first, d.get(9 + n..)?.to_vec()))
}

/// A RECV_BITMAP payload for `bits` of block `name` from page `first`.
pub(crate) fn encode_bitmap(name: &[u8], first: u64, bits: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(9 + name.len() + bits.len());
    d.push(name.len() as u8);
    d.extend_from_slice(name);
    d.extend_from_slice(&first.to_be_bytes());
    d.extend_from_slice(bits);
    d
}

/// A page request's payload, or why it does not parse.
fn parse_page_request(kind: u16, d: &[u8]) -> Result<PageRequest, &'static str> {
    if d.len() < 12 {
        return Err("shorter than 12 bytes");
    }
    let start = u64::from_be_bytes(d[0..8].try_into().map_err(|_| "offset")?);
    let len = u32::from_be_bytes(d[8..12].try_into().map_err(|_| "length")?);
    let block = if kind == rp::REQ_PAGES_ID {
        let n = *d.get(12).ok_or("missing block name")? as usize;
        Some(d.get(13..13 + n).ok_or("block name cut short")?.to_vec())
    } else {
        None
    };
    Ok(PageRequest { start, len, block })
}

/// The longest the source waits for the PONG of one of its PINGs (the
/// destination alive, keepalives coming, but no answer).
const PONG_WAIT: Duration = Duration::from_secs(30);

/// One frame from the reader thread, or the error that ended it.
type RpFrame = Result<(u16, Vec<u8>), StreamError>;

/// One message, or the error that ended the return path.
pub(crate) type RpResult = Result<RpMessage, StreamError>;

/// A function the reader thread hands each frame to first; `true`: it took
/// the frame, which then does not go to the channel (COLO's output
/// comparison, which must not wait for the engine thread).
pub(crate) type RpHook = Box<dyn Fn(u16, &[u8]) -> bool + Send>;

/// The source's end of the return path: the messages its reader thread
/// reads, and the destination's last error description.
pub(crate) struct ReturnPath {
    rx: Receiver<RpFrame>,
    hook: Arc<Mutex<Option<RpHook>>>,
    /// Set by the reader thread when the destination fell silent (before
    /// it shuts the channel): the reason for any write that breaks after.
    silence: Arc<Mutex<Option<Duration>>>,
    last_desc: Option<String>,
    /// How often the source sends a keepalive where it waits (`None`:
    /// no bound on the peer, no keepalives).
    keepalive: Option<Duration>,
}

impl ReturnPath {
    /// Start the reader thread: it reads messages into a channel until the
    /// peer closes. `peer_timeout` is the channel's
    /// ([`Channel::peer_timeout`]).
    /// A destination that falls silent for the peer timeout is gone: the
    /// thread then shuts the whole channel (`closer`), so that a write
    /// blocked or queued behind a slow rate limit fails at once instead of
    /// at its own timeout.
    pub(crate) fn spawn(
        reader: Box<dyn Read + Send>,
        peer_timeout: Option<Duration>,
        closer: Closer,
    ) -> Self {
        let (tx, rx) = channel();
        let hook: Arc<Mutex<Option<RpHook>>> = Arc::default();
        let hook_here = hook.clone();
        let silence: Arc<Mutex<Option<Duration>>> = Arc::default();
        let silence_here = silence.clone();
        std::thread::Builder::new()
            .name("mig-return".into())
            .spawn(move || {
                // It mostly sleeps; when a postcopy page request arrives, a
                // guest is waiting for it.
                crate::sched::prefer_this_thread();
                let mut r = Reader::new(BufReader::new(reader));
                loop {
                    let m = stream::read_rp(&mut r);
                    if let Err(e) = &m {
                        if PeerSilent::is(e) {
                            *silence_here.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(peer_timeout.unwrap_or_default());
                            closer.close();
                        }
                    }
                    if let Ok((k, d)) = &m {
                        let h = hook_here.lock().unwrap_or_else(|e| e.into_inner());
                        if h.as_ref().is_some_and(|h| h(*k, d)) {
                            continue;
                        }
                    }
                    let end = m.is_err();
                    if tx.send(m).is_err() || end {
                        break;
                    }
                }
            })
            .ok();
        Self {
            rx,
            hook,
            silence,
            last_desc: None,
            keepalive: peer_timeout.map(keepalive_interval),
        }
    }

    /// Hand every frame to `hook` first from now on (`None`: no more).
    pub(crate) fn set_hook(&self, hook: Option<RpHook>) {
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = hook;
    }

    /// How often to send a keepalive while waiting (see the module doc).
    pub(crate) fn keepalive(&self) -> Option<Duration> {
        self.keepalive
    }

    /// The error for a return path that ended: the destination's own
    /// description if it sent one, else the connection lost (with why, if
    /// the reader saw it).
    pub(crate) fn lost(&mut self, cause: Option<StreamError>) -> MigrationError {
        self.take_desc()
            .unwrap_or(MigrationError::PeerLost("destination", cause))
    }

    /// The next message, if one is there.
    pub(crate) fn try_recv(&self) -> Result<RpResult, TryRecvError> {
        self.rx
            .try_recv()
            .map(|m| m.map(|(k, d)| RpMessage::parse(k, &d)))
    }

    /// The next message, waiting up to `timeout`.
    pub(crate) fn recv_timeout(&self, timeout: Duration) -> Result<RpResult, RecvTimeoutError> {
        self.rx
            .recv_timeout(timeout)
            .map(|m| m.map(|(k, d)| RpMessage::parse(k, &d)))
    }

    /// Turn a return-path message into an error, if it reports one (an
    /// ERROR_DESC is kept for the SHUT(1) that follows it).
    pub(crate) fn error(&mut self, m: RpMessage) -> Option<MigrationError> {
        match m {
            RpMessage::ErrorDesc(desc) => {
                self.last_desc = Some(desc);
                None
            }
            RpMessage::Shut(flag) if flag != 0 => Some(MigrationError::Destination(
                self.last_desc
                    .take()
                    .unwrap_or_else(|| "the destination reported an error".into()),
            )),
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
        loop {
            let m = match self.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => return Err(self.lost(None)),
            };
            match m {
                Ok(m) => {
                    if let Some(e) = self.error(m) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(self.lost(Some(e))),
            }
        }
    }

    /// Source: send PING `value` and wait for its PONG, so that the
    /// destination has judged every command before it (or said why not).
    /// While it waits, the main stream carries keepalives (PING 0), which
    /// the destination answers in turn after its work.
    pub(crate) fn ping_and_wait<W: Sink>(
        &mut self,
        w: &mut Writer<W>,
        value: u32,
    ) -> Result<(), MigrationError> {
        w.write_command(&Command::Ping(value))?;
        w.flush()?;
        let deadline = Instant::now() + PONG_WAIT;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or(MigrationError::NoAnswer("destination", PONG_WAIT))?;
            let slice = self.keepalive.map_or(left, |k| k.min(left));
            match self.recv_timeout(slice) {
                Ok(Ok(RpMessage::Pong(v))) if v == value => return Ok(()),
                Ok(Ok(m)) => {
                    if let Some(e) = self.error(m) {
                        return Err(e);
                    }
                }
                Ok(Err(e)) => return Err(self.lost(Some(e))),
                Err(RecvTimeoutError::Disconnected) => return Err(self.lost(None)),
                Err(RecvTimeoutError::Timeout) => {
                    if self.keepalive.is_some() {
                        w.write_command(&Command::Ping(ping::ALIVE))?;
                        w.flush()?;
                    }
                }
            }
        }
    }

    /// The destination fell silent (the reader saw it, even if the error it
    /// passed on was taken already): that, as the error.
    fn silent(&self) -> Option<MigrationError> {
        let d = (*self.silence.lock().unwrap_or_else(|e| e.into_inner()))?;
        Some(MigrationError::PeerLost(
            "destination",
            Some(StreamError::Io {
                offset: 0,
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, PeerSilent(d)),
            }),
        ))
    }

    /// The destination's error from the return path, waiting briefly for it.
    /// A return path that fell silent (the destination stopped answering)
    /// is a reason too: it explains the broken pipe that follows.
    pub(crate) fn destination_reason(&mut self) -> Option<MigrationError> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.recv_timeout(left) {
                Ok(Ok(m)) => {
                    if let Some(e) = self.error(m) {
                        return Some(e);
                    }
                }
                Ok(Err(e)) if PeerSilent::is(&e) => return Some(self.lost(Some(e))),
                _ => return self.take_desc().or_else(|| self.silent()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page requests read back as encoded; malformed payloads say why;
    /// a SHUT or PONG of another length is ignored as before, a COLO
    /// message of another length is no message value.
    #[test]
    fn return_path_messages_parse() {
        for block in [None, Some(b"pc.ram".to_vec())] {
            let req = PageRequest {
                start: 0x5000,
                len: 4096,
                block,
            };
            let (k, d) = req.encode();
            assert_eq!(RpMessage::parse(k, &d), RpMessage::PageRequest(req));
        }
        let cases: [(u16, &[u8], RpMessage); 9] = [
            (rp::SHUT, &[0, 0, 0, 1], RpMessage::Shut(1)),
            (rp::SHUT, &[0, 0, 1], RpMessage::Other(rp::SHUT)),
            (rp::PONG, &[0, 0, 0, 2], RpMessage::Pong(2)),
            (rp::PONG, &[], RpMessage::Other(rp::PONG)),
            (rp::COLO, &[0, 0, 0, 6], RpMessage::Colo(Some(6))),
            (rp::COLO, &[6], RpMessage::Colo(None)),
            (rp::ERROR_DESC, b"no", RpMessage::ErrorDesc("no".into())),
            (
                rp::REQ_PAGES,
                &[0; 11],
                RpMessage::BadPageRequest("shorter than 12 bytes"),
            ),
            (
                rp::REQ_PAGES_ID,
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
                RpMessage::BadPageRequest("block name cut short"),
            ),
        ];
        for (k, d, want) in cases {
            assert_eq!(RpMessage::parse(k, d), want, "type {k:#x} {d:?}");
        }
        assert_eq!(
            RpMessage::parse(rp::REQ_PAGES_ID, &[0; 12]),
            RpMessage::BadPageRequest("missing block name")
        );
        // Postcopy recovery: a bitmap reads back as encoded; one cut short
        // is no bitmap (ignored); RESUME_ACK carries the block count.
        let d = encode_bitmap(b"pc.ram", 8, &[0xa5, 0x01]);
        assert_eq!(
            RpMessage::parse(rp::RECV_BITMAP, &d),
            RpMessage::RecvBitmap {
                block: b"pc.ram".to_vec(),
                first: 8,
                bits: vec![0xa5, 0x01]
            }
        );
        assert_eq!(
            RpMessage::parse(rp::RECV_BITMAP, &d[..10]),
            RpMessage::Other(rp::RECV_BITMAP)
        );
        assert_eq!(
            RpMessage::parse(rp::RESUME_ACK, &[0, 0, 0, 2]),
            RpMessage::ResumeAck(2)
        );
    }

    /// What a paused postcopy may recover from: the connection's own
    /// failures, not a wrong stream or a refusal.
    #[test]
    fn link_failures_are_told_from_stream_errors() {
        let io = || StreamError::Io {
            offset: 1,
            source: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        };
        let truncated = || StreamError::Truncated {
            offset: 1,
            what: "x",
        };
        assert!(MigrationError::Stream(io()).is_link_failure());
        assert!(MigrationError::Stream(truncated()).is_link_failure());
        assert!(MigrationError::Records(truncated().into()).is_link_failure());
        assert!(MigrationError::PeerLost("destination", None).is_link_failure());
        assert!(!MigrationError::Stream(StreamError::invalid(1, "bad CRC")).is_link_failure());
        assert!(!MigrationError::Destination("refused".into()).is_link_failure());
        assert!(!MigrationError::Cancelled.is_link_failure());
    }
}

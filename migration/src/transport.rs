//! Migration URIs and the byte channels behind them.
//!
//! | URI | outgoing | incoming | return path |
//! |---|---|---|---|
//! | `tcp:HOST:PORT` | connect | listen, accept one (two with postcopy-preempt) | yes |
//! | `unix:PATH` | connect | listen, accept one (two with postcopy-preempt) | yes |
//! | `exec:CMD` | `sh -c CMD`, stream to its stdin | `sh -c CMD`, stream from its stdout | no |
//! | `file:PATH` | create/truncate PATH | read PATH | no |
//!
//! An incoming TCP stream also carries a [`ReadBatching`] handle: while
//! pages flow the kernel wakes the reader per MiB instead of per
//! segment, until the destination stops it before anything urgent.
//!
//! **A peer that stops answering.** Every socket a migration uses is
//! bounded by the peer timeout (`x-peer-timeout`): a read that gets
//! nothing for that long (`SO_RCVTIMEO`), a write that can hand nothing
//! to the kernel for that long (`SO_SNDTIMEO`: the peer's window stays
//! shut), and TCP data left unacknowledged for that long
//! (`TCP_USER_TIMEOUT`: the link is down) all fail with [`PeerSilent`].
//! Connecting is bounded the same way. Live peers keep every direction a
//! side reads from busy with keepalives (the destination's return path,
//! [`crate::return_path`]; the source where its main stream would idle):
//! so only a dead, frozen or unreachable peer trips the bound. Channels
//! that idle by design (the postcopy preempt channel's reading side) lift
//! the read bound ([`Closer::unbound_reads`]).
//!
//! **TLS.** With credentials (a [`TlsClient`] to [`connect`], a server
//! endpoint to [`Listener::accept`]), a socket runs the TLS
//! handshake before anything else and the channel is the engines' end of
//! the session's pump ([`crate::tls`]): the same reads, writes, bounds and
//! closing, over a unix socket pair (no read batching there). Pipes and
//! files refuse TLS.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::tls::{TlsClient, TlsCreds, TlsError};

/// A parsed migration URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uri {
    /// `tcp:HOST:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `exec:CMD`.
    Exec(String),
    /// `file:PATH`.
    File(PathBuf),
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Exec(c) => write!(f, "exec:{c}"),
            Self::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The URI is not one we support.
    #[error(
        "unsupported migration URI '{0}' (use tcp:HOST:PORT, unix:PATH, exec:CMD or file:PATH)"
    )]
    BadUri(String),
    /// Connecting, listening, spawning or opening failed.
    #[error("{what} '{uri}'")]
    Io {
        /// What we tried.
        what: &'static str,
        /// Where.
        uri: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No second connection came (postcopy preempt channel).
    #[error("no second connection on '{0}' within {1:?}")]
    NoSecondChannel(String, std::time::Duration),
    /// The transport has no room for a second connection.
    #[error("'{0}' cannot carry a second channel")]
    OneChannel(String),
    /// TLS asked for on a pipe or file.
    #[error("'{0}' cannot carry TLS (tls-creds needs tcp: or unix:)")]
    NoTls(String),
    /// The TLS handshake or session set-up failed.
    #[error("TLS on '{uri}'")]
    Tls {
        /// Where.
        uri: String,
        /// Why.
        #[source]
        source: Box<TlsError>,
    },
}

/// The peer made no progress for the peer timeout: nothing came, nothing
/// could be sent, or what was sent stayed unacknowledged. Carried inside
/// the [`std::io::Error`] (kind `TimedOut`) of the read or write that gave
/// up.
#[derive(Debug, thiserror::Error)]
#[error("the peer stopped answering: no progress for {0:?} (x-peer-timeout)")]
pub struct PeerSilent(pub Duration);

impl PeerSilent {
    /// `e` as a [`PeerSilent`] error if it is a socket timeout, else as it is.
    fn map(e: std::io::Error, timeout: Duration) -> std::io::Error {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                std::io::Error::new(std::io::ErrorKind::TimedOut, PeerSilent(timeout))
            }
            _ => e,
        }
    }

    /// Is `e` (or what it wraps) a peer timeout?
    pub fn is(e: &(dyn std::error::Error + 'static)) -> bool {
        let mut cur = Some(e);
        while let Some(c) = cur {
            if c.is::<PeerSilent>() {
                return true;
            }
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                if io.get_ref().is_some_and(|i| i.is::<PeerSilent>()) {
                    return true;
                }
            }
            cur = c.source();
        }
        false
    }
}

/// A socket half whose timeouts read as [`PeerSilent`].
struct Bounded<S> {
    s: S,
    timeout: Duration,
}

impl<S: Read> Read for Bounded<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.s
            .read(buf)
            .map_err(|e| PeerSilent::map(e, self.timeout))
    }
}

impl<S: Write> Write for Bounded<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.s
            .write(buf)
            .map_err(|e| PeerSilent::map(e, self.timeout))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush().map_err(|e| PeerSilent::map(e, self.timeout))
    }
}

/// Bound a TCP socket's reads, writes and unacknowledged data by `t`.
fn bound_tcp(s: &TcpStream, t: Duration) -> std::io::Result<()> {
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    let ms = t.as_millis().min(u32::MAX as u128) as libc::c_int;
    set_int(s, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)
}

/// Bound a unix socket's reads and writes by `t`.
fn bound_unix(s: &UnixStream, t: Duration) -> std::io::Result<()> {
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))
}

/// How an `exec:` command's child ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Waiting for it failed.
    #[error("waiting for the command")]
    Wait(#[source] std::io::Error),
    /// It exited with a failure.
    #[error("ended with {0}")]
    Status(std::process::ExitStatus),
}

impl Uri {
    /// Parse a URI.
    pub fn parse(s: &str) -> Result<Self, TransportError> {
        let bad = || TransportError::BadUri(s.to_string());
        let (scheme, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        match scheme {
            "tcp" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                port.parse::<u16>().map_err(|_| bad())?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let host = if host.is_empty() || host == "0" {
                    "0.0.0.0"
                } else {
                    host
                };
                let addr = if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                Ok(Self::Tcp(addr))
            }
            "unix" => Ok(Self::Unix(rest.into())),
            "exec" => Ok(Self::Exec(rest.into())),
            "file" => Ok(Self::File(rest.into())),
            _ => Err(bad()),
        }
    }

    /// Does this transport carry a return path?
    pub fn duplex(&self) -> bool {
        matches!(self, Self::Tcp(_) | Self::Unix(_))
    }

    /// Can this transport carry TLS (sockets only)?
    pub fn check_tls(&self) -> Result<(), TransportError> {
        if self.duplex() {
            Ok(())
        } else {
            Err(TransportError::NoTls(self.to_string()))
        }
    }

    /// A `tcp:` URI's host, without an IPv6 address's brackets.
    pub fn tcp_host(&self) -> Option<&str> {
        let Self::Tcp(addr) = self else { return None };
        let host = addr.rsplit_once(':').map_or("", |(h, _)| h);
        Some(host.trim_start_matches('[').trim_end_matches(']'))
    }
}

/// Closes a channel from another thread (cancel, failover).
#[derive(Clone)]
pub enum Closer {
    /// A TCP socket.
    Tcp(Arc<TcpStream>),
    /// A unix socket.
    Unix(Arc<UnixStream>),
    /// A child process.
    Child(Arc<Mutex<Child>>),
    /// Nothing to close (files).
    Nothing,
}

impl Closer {
    /// Shrink the socket's send buffer (SO_SNDBUF) to about `bytes`, so
    /// that little data is queued ahead of an urgent message (a requested
    /// postcopy page). The receive buffer is left alone: shrinking it under
    /// data already in flight makes the kernel drop segments, and each drop
    /// costs a retransmission timeout (200 ms). A no-op for pipes and files.
    pub fn limit_send_buffer(&self, bytes: i32) {
        let _ = match self {
            Self::Tcp(s) => set_socket_int(&**s, libc::SO_SNDBUF, bytes),
            Self::Unix(s) => set_socket_int(&**s, libc::SO_SNDBUF, bytes),
            _ => return,
        };
    }

    /// Let reads on this channel wait as long as they must (a channel that
    /// idles by design); writes stay bounded. A no-op for pipes and files.
    pub fn unbound_reads(&self) {
        let _ = match self {
            Self::Tcp(s) => s.set_read_timeout(None),
            Self::Unix(s) => s.set_read_timeout(None),
            _ => return,
        };
    }

    /// Shut the reading direction down: a read blocked on it returns end
    /// of stream. A no-op for pipes and files.
    pub fn shutdown_read(&self) {
        match self {
            Self::Tcp(s) => {
                let _ = s.shutdown(std::net::Shutdown::Read);
            }
            Self::Unix(s) => {
                let _ = s.shutdown(std::net::Shutdown::Read);
            }
            Self::Child(_) | Self::Nothing => {}
        }
    }

    /// Shut the channel down so that blocked reads and writes return.
    pub fn close(&self) {
        match self {
            Self::Tcp(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            Self::Unix(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            Self::Child(c) => {
                if let Ok(mut c) = c.lock() {
                    let _ = c.kill();
                }
            }
            Self::Nothing => {}
        }
    }
}

/// One end of a migration: the main stream plus, for sockets, the other direction.
pub struct Channel {
    /// Main stream (outgoing: write; incoming: read). For incoming, `reader`.
    pub reader: Box<dyn Read + Send>,
    /// Outgoing: the main stream; incoming: the return path.
    pub writer: Box<dyn Write + Send>,
    /// Does `reader`/`writer` go both ways (return path available)?
    pub duplex: bool,
    /// Shuts the channel down.
    pub closer: Closer,
    /// Batched wake-ups of `reader` (incoming TCP only; see [`ReadBatching`]).
    pub batching: ReadBatching,
    /// The bound on the peer (sockets; `None` for pipes and files).
    pub peer_timeout: Option<Duration>,
    child: Option<Arc<Mutex<Child>>>,
}

impl Channel {
    /// Wait for an exec child to finish; its failure is an error.
    pub fn finish(&mut self) -> Result<(), ExecError> {
        if let Some(c) = self.child.take() {
            let status = c
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .wait()
                .map_err(ExecError::Wait)?;
            if !status.success() {
                return Err(ExecError::Status(status));
            }
        }
        Ok(())
    }
}

fn io<'a>(what: &'static str, uri: &'a Uri) -> impl FnOnce(std::io::Error) -> TransportError + 'a {
    move |source| TransportError::Io {
        what,
        uri: uri.to_string(),
        source,
    }
}

/// A connected socket as a channel, its reads and writes bounded by
/// `timeout` (`bound` sets the socket's options).
fn socket_channel<S>(
    s: S,
    timeout: Duration,
    bound: impl Fn(&S, Duration) -> std::io::Result<()>,
    closer: impl FnOnce(Arc<S>) -> Closer,
    duplicate: impl Fn(&S) -> std::io::Result<S>,
) -> std::io::Result<Channel>
where
    S: Read + Write + Send + 'static,
{
    bound(&s, timeout)?;
    let r = duplicate(&s)?;
    let c = duplicate(&s)?;
    Ok(Channel {
        reader: Box::new(Bounded { s: r, timeout }),
        writer: Box::new(Bounded { s, timeout }),
        duplex: true,
        closer: closer(Arc::new(c)),
        batching: ReadBatching::none(),
        peer_timeout: Some(timeout),
        child: None,
    })
}

/// Connect to `addr` (resolved), each attempt bounded by `timeout`.
fn connect_tcp(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(PeerSilent::map(e, timeout)),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "the host has no address")
    }))
}

/// The engines' end of a TLS session over `s` (already bounded), as a
/// channel; `handshake` runs the client or server side.
fn tls_channel<S>(
    s: S,
    uri: &Uri,
    peer_timeout: Duration,
    handshake: impl FnOnce(S) -> Result<(UnixStream, crate::tls::Failure), TlsError>,
) -> Result<Channel, TransportError> {
    let (local, failure) = handshake(s).map_err(|source| TransportError::Tls {
        uri: uri.to_string(),
        source: Box::new(source),
    })?;
    let mut chan = socket_channel(
        local,
        peer_timeout,
        bound_unix,
        Closer::Unix,
        UnixStream::try_clone,
    )
    .map_err(io("cannot use socket", uri))?;
    // A failed session names itself in the errors the engines get.
    let reader = std::mem::replace(&mut chan.reader, Box::new(std::io::empty()));
    chan.reader = Box::new(crate::tls::Named {
        inner: reader,
        failure: failure.clone(),
    });
    let writer = std::mem::replace(&mut chan.writer, Box::new(std::io::sink()));
    chan.writer = Box::new(crate::tls::Named {
        inner: writer,
        failure,
    });
    Ok(chan)
}

/// Open the outgoing side, over TLS with `tls`. On sockets, the peer must
/// make progress at least every `peer_timeout` (see the module doc).
pub fn connect(
    uri: &Uri,
    peer_timeout: Duration,
    tls: Option<&TlsClient>,
) -> Result<Channel, TransportError> {
    if tls.is_some() {
        uri.check_tls()?;
    }
    match uri {
        Uri::Tcp(addr) => {
            let s = connect_tcp(addr, peer_timeout).map_err(io("cannot connect to", uri))?;
            let _ = s.set_nodelay(true);
            if let Some(t) = tls {
                bound_tcp(&s, peer_timeout).map_err(io("cannot use socket", uri))?;
                let peer = uri.to_string();
                return tls_channel(s, uri, peer_timeout, |s| crate::tls::client(s, t, &peer));
            }
            socket_channel(
                s,
                peer_timeout,
                bound_tcp,
                Closer::Tcp,
                TcpStream::try_clone,
            )
            .map_err(io("cannot use socket", uri))
        }
        Uri::Unix(path) => {
            let s = UnixStream::connect(path).map_err(io("cannot connect to", uri))?;
            if let Some(t) = tls {
                bound_unix(&s, peer_timeout).map_err(io("cannot use socket", uri))?;
                let peer = uri.to_string();
                return tls_channel(s, uri, peer_timeout, |s| crate::tls::client(s, t, &peer));
            }
            socket_channel(
                s,
                peer_timeout,
                bound_unix,
                Closer::Unix,
                UnixStream::try_clone,
            )
            .map_err(io("cannot use socket", uri))
        }
        Uri::Exec(cmd) => {
            let mut sh = Command::new("/bin/sh");
            sh.arg("-c").arg(cmd).stdin(Stdio::piped());
            let mut child = crate::confine::spawn(sh).map_err(io("cannot run", uri))?;
            let stdin = child
                .stdin
                .take()
                .ok_or_else(|| TransportError::BadUri(cmd.clone()))?;
            let child = Arc::new(Mutex::new(child));
            Ok(Channel {
                reader: Box::new(std::io::empty()),
                writer: Box::new(stdin),
                duplex: false,
                closer: Closer::Child(child.clone()),
                batching: ReadBatching::none(),
                peer_timeout: None,
                child: Some(child),
            })
        }
        Uri::File(path) => {
            let f = std::fs::File::create(path).map_err(io("cannot create", uri))?;
            Ok(Channel {
                reader: Box::new(std::io::empty()),
                writer: Box::new(f),
                duplex: false,
                closer: Closer::Nothing,
                batching: ReadBatching::none(),
                peer_timeout: None,
                child: None,
            })
        }
    }
}

/// Bytes the kernel queues before it wakes a batching reader
/// (`SO_RCVLOWAT`).
const BATCH_LOW_WATER: i32 = 1 << 20;
/// A read at least this long means the stream is flowing: batch from now
/// (half a loopback segment, so one segment read alone counts).
const BATCH_FLOWING: usize = 32 << 10;
/// The longest a batching read waits for the low-water mark before it
/// returns what has come (`SO_RCVTIMEO`): what a pause in the stream costs
/// once, before batching turns itself off.
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(1);
const BATCH_NOT_YET: u8 = 0;
const BATCH_ALLOWED: u8 = 1;
const BATCH_STOPPED: u8 = 2;

/// Batched wake-ups for an incoming TCP migration stream.
///
/// Without it the kernel wakes the destination's reader for every segment
/// that arrives; on loopback (and in a VM, where a wake-up is an IPI) the
/// source's CPU pays for each one, and the page stream is bound by it.
/// While pages flow, the reader asks for `SO_RCVLOWAT` 1 MiB with a 1 ms
/// `SO_RCVTIMEO`: it sleeps until 1 MiB is queued or 1 ms has passed,
/// and then gets what is there. A read that times out with nothing turns
/// batching off (the stream paused: the source waits for something), and
/// the next read of 32 KiB or more turns it on again; so a pause costs at
/// most one 1 ms wait, and an idle stream is never polled.
///
/// The destination allows it ([`ReadBatching::allow`]) on its main stream
/// only, and stops it for good ([`ReadBatching::stop`]) where every
/// message is urgent: before precopy's stop, postcopy's switch and COLO.
/// Other channels get a no-op handle.
#[derive(Clone)]
pub struct ReadBatching {
    state: Arc<AtomicU8>,
    socket: Option<Arc<TcpStream>>,
    /// The socket's read bound when not batching (the peer timeout).
    idle: Duration,
}

impl ReadBatching {
    /// A handle for a channel that never batches.
    pub fn none() -> Self {
        Self {
            state: Arc::new(AtomicU8::new(BATCH_STOPPED)),
            socket: None,
            idle: Duration::ZERO,
        }
    }

    /// Let the reader batch once data flows.
    pub fn allow(&self) {
        let _ = self.state.compare_exchange(
            BATCH_NOT_YET,
            BATCH_ALLOWED,
            AtomicOrdering::SeqCst,
            AtomicOrdering::SeqCst,
        );
    }

    /// No more batching on this channel: every read returns as soon as a
    /// byte is there.
    pub fn stop(&self) {
        if self.state.swap(BATCH_STOPPED, AtomicOrdering::SeqCst) == BATCH_STOPPED {
            return;
        }
        if let Some(s) = &self.socket {
            let _ = set_batching(s, false, self.idle);
        }
    }
}

/// Set the `SOL_SOCKET` option `opt` of socket `s` to the int `value`.
fn set_socket_int(s: &impl AsRawFd, opt: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    set_int(s, libc::SOL_SOCKET, opt, value)
}

/// Set the option `opt` at `level` of socket `s` to the int `value`.
fn set_int(
    s: &impl AsRawFd,
    level: libc::c_int,
    opt: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: the fd is an open socket owned by `s`; the option value is a
    // valid c_int of the size passed.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The socket options of [`ReadBatching`], on or off.
/// Off, reads wait up to the peer timeout `idle` again.
fn set_batching(s: &TcpStream, on: bool, idle: Duration) -> std::io::Result<()> {
    set_socket_int(s, libc::SO_RCVLOWAT, if on { BATCH_LOW_WATER } else { 1 })?;
    s.set_read_timeout(Some(if on { BATCH_WAIT } else { idle }))
}

/// The reading side of an incoming TCP channel; see [`ReadBatching`].
/// Not batching, a read waits up to `idle` (the peer timeout).
struct BatchedReads {
    s: TcpStream,
    on: bool,
    state: Arc<AtomicU8>,
    idle: Duration,
}

impl Read for BatchedReads {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let state = self.state.load(AtomicOrdering::SeqCst);
            if state == BATCH_STOPPED {
                // `stop` has reset the socket.
                self.on = false;
            }
            match self.s.read(buf) {
                Ok(n) => {
                    if !self.on && state == BATCH_ALLOWED && n >= BATCH_FLOWING {
                        self.on = set_batching(&self.s, true, self.idle).is_ok();
                        if self.on && self.state.load(AtomicOrdering::SeqCst) == BATCH_STOPPED {
                            // Stopped meanwhile (another thread): undo.
                            let _ = set_batching(&self.s, false, self.idle);
                            self.on = false;
                        }
                    }
                    return Ok(n);
                }
                Err(e)
                    if self.on
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                {
                    // Nothing came for BATCH_WAIT: the stream paused.
                    set_batching(&self.s, false, self.idle)?;
                    self.on = false;
                }
                Err(e) => return Err(PeerSilent::map(e, self.idle)),
            }
        }
    }
}

/// The incoming side, bound at start-up so that a source can connect at
/// once.
pub struct Listener {
    kind: Kind,
}

enum Kind {
    /// Bound TCP socket.
    Tcp(TcpListener, Uri),
    /// Bound unix socket (removed on drop).
    Unix(UnixListener, PathBuf, Uri),
    /// Command to run when accepting.
    Exec(String, Uri),
    /// File to read when accepting.
    File(PathBuf, Uri),
}

impl Listener {
    /// Bind (sockets) or just remember (exec, file).
    pub fn bind(uri: &Uri) -> Result<Self, TransportError> {
        Ok(Self {
            kind: Kind::bind(uri)?,
        })
    }

    /// The URI it listens on.
    pub fn uri(&self) -> &Uri {
        self.kind.uri()
    }

    /// The actual TCP address (useful with port 0).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.kind {
            Kind::Tcp(l, _) => l.local_addr().ok(),
            _ => None,
        }
    }

    /// Wait until a connection is there to accept: up to `timeout`, or
    /// without bound (`None`). Whether one came. Pipes and files are
    /// always ready.
    pub fn wait_for_peer(&self, timeout: Option<Duration>) -> Result<bool, TransportError> {
        self.kind.wait_for_peer(timeout)
    }

    /// Accept one more connection (the postcopy preempt channel) if one
    /// comes within `timeout`; its peer bound is `peer_timeout`; TLS with
    /// `tls`.
    pub fn accept_within(
        &self,
        timeout: Duration,
        peer_timeout: Duration,
        tls: Option<&TlsCreds>,
    ) -> Result<Channel, TransportError> {
        let uri = match &self.kind {
            Kind::Tcp(_, uri) | Kind::Unix(_, _, uri) => uri,
            Kind::Exec(_, uri) | Kind::File(_, uri) => {
                return Err(TransportError::OneChannel(uri.to_string()))
            }
        };
        if !self.wait_for_peer(Some(timeout))? {
            return Err(TransportError::NoSecondChannel(uri.to_string(), timeout));
        }
        self.accept(peer_timeout, tls)
    }

    /// Wait for the source and return the channel (reader = stream, writer
    /// = return path). Waiting for a source has no bound (as `-incoming`);
    /// once connected, the source must make progress at least every
    /// `peer_timeout` (see the module doc); with `tls` (a server
    /// endpoint), the TLS handshake first.
    pub fn accept(
        &self,
        peer_timeout: Duration,
        tls: Option<&TlsCreds>,
    ) -> Result<Channel, TransportError> {
        let Some(creds) = tls else {
            return self.kind.accept(peer_timeout);
        };
        let peer = "the source";
        match &self.kind {
            Kind::Tcp(l, uri) => {
                let (s, _) = l.accept().map_err(io("cannot accept on", uri))?;
                let _ = s.set_nodelay(true);
                bound_tcp(&s, peer_timeout).map_err(io("cannot use socket", uri))?;
                tls_channel(s, uri, peer_timeout, |s| crate::tls::server(s, creds, peer))
            }
            Kind::Unix(l, _, uri) => {
                let (s, _) = l.accept().map_err(io("cannot accept on", uri))?;
                bound_unix(&s, peer_timeout).map_err(io("cannot use socket", uri))?;
                tls_channel(s, uri, peer_timeout, |s| crate::tls::server(s, creds, peer))
            }
            Kind::Exec(_, uri) | Kind::File(_, uri) => Err(TransportError::NoTls(uri.to_string())),
        }
    }
}

impl Kind {
    fn bind(uri: &Uri) -> Result<Self, TransportError> {
        Ok(match uri {
            Uri::Tcp(addr) => Self::Tcp(
                TcpListener::bind(addr).map_err(io("cannot listen on", uri))?,
                uri.clone(),
            ),
            Uri::Unix(path) => {
                let _ = std::fs::remove_file(path);
                Self::Unix(
                    UnixListener::bind(path).map_err(io("cannot listen on", uri))?,
                    path.clone(),
                    uri.clone(),
                )
            }
            Uri::Exec(cmd) => Self::Exec(cmd.clone(), uri.clone()),
            Uri::File(path) => {
                std::fs::metadata(path).map_err(io("cannot read", uri))?;
                Self::File(path.clone(), uri.clone())
            }
        })
    }

    fn uri(&self) -> &Uri {
        match self {
            Self::Tcp(_, uri) | Self::Unix(_, _, uri) | Self::Exec(_, uri) | Self::File(_, uri) => {
                uri
            }
        }
    }

    fn wait_for_peer(&self, timeout: Option<Duration>) -> Result<bool, TransportError> {
        let (fd, uri) = match self {
            Self::Tcp(l, uri) => (l.as_raw_fd(), uri),
            Self::Unix(l, _, uri) => (l.as_raw_fd(), uri),
            Self::Exec(..) | Self::File(..) => return Ok(true),
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        loop {
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            if n >= 0 {
                return Ok(n > 0);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io("cannot accept on", uri)(e));
            }
        }
    }

    fn accept(&self, peer_timeout: Duration) -> Result<Channel, TransportError> {
        match self {
            Self::Tcp(l, uri) => {
                let (s, _) = l.accept().map_err(io("cannot accept on", uri))?;
                let _ = s.set_nodelay(true);
                bound_tcp(&s, peer_timeout).map_err(io("cannot use socket", uri))?;
                let w = s.try_clone().map_err(io("cannot use socket", uri))?;
                let c = Arc::new(s.try_clone().map_err(io("cannot use socket", uri))?);
                let batching = ReadBatching {
                    state: Arc::new(AtomicU8::new(BATCH_NOT_YET)),
                    socket: Some(c.clone()),
                    idle: peer_timeout,
                };
                Ok(Channel {
                    reader: Box::new(BatchedReads {
                        s,
                        on: false,
                        state: batching.state.clone(),
                        idle: peer_timeout,
                    }),
                    writer: Box::new(Bounded {
                        s: w,
                        timeout: peer_timeout,
                    }),
                    duplex: true,
                    closer: Closer::Tcp(c),
                    batching,
                    peer_timeout: Some(peer_timeout),
                    child: None,
                })
            }
            Self::Unix(l, _, uri) => {
                let (s, _) = l.accept().map_err(io("cannot accept on", uri))?;
                socket_channel(
                    s,
                    peer_timeout,
                    bound_unix,
                    Closer::Unix,
                    UnixStream::try_clone,
                )
                .map_err(io("cannot use socket", uri))
            }
            Self::Exec(cmd, uri) => {
                let mut sh = Command::new("/bin/sh");
                sh.arg("-c").arg(cmd).stdout(Stdio::piped());
                let mut child = crate::confine::spawn(sh).map_err(io("cannot run", uri))?;
                let out = child
                    .stdout
                    .take()
                    .ok_or_else(|| TransportError::BadUri(cmd.clone()))?;
                let child = Arc::new(Mutex::new(child));
                Ok(Channel {
                    reader: Box::new(out),
                    writer: Box::new(std::io::sink()),
                    duplex: false,
                    closer: Closer::Child(child.clone()),
                    batching: ReadBatching::none(),
                    peer_timeout: None,
                    child: Some(child),
                })
            }
            Self::File(path, uri) => {
                let f = std::fs::File::open(path).map_err(io("cannot read", uri))?;
                Ok(Channel {
                    reader: Box::new(f),
                    writer: Box::new(std::io::sink()),
                    duplex: false,
                    closer: Closer::Nothing,
                    batching: ReadBatching::none(),
                    peer_timeout: None,
                    child: None,
                })
            }
        }
    }
}

impl Drop for Kind {
    fn drop(&mut self) {
        if let Self::Unix(_, path, _) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_uris() {
        assert_eq!(
            Uri::parse("tcp:127.0.0.1:4444").unwrap(),
            Uri::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            Uri::parse("tcp:0:4444").unwrap(),
            Uri::Tcp("0.0.0.0:4444".into())
        );
        assert_eq!(
            Uri::parse("tcp:[::1]:4444").unwrap(),
            Uri::Tcp("[::1]:4444".into())
        );
        assert_eq!(
            Uri::parse("unix:/tmp/x").unwrap(),
            Uri::Unix("/tmp/x".into())
        );
        assert_eq!(
            Uri::parse("exec:cat > f").unwrap(),
            Uri::Exec("cat > f".into())
        );
        assert_eq!(
            Uri::parse("file:/tmp/f").unwrap(),
            Uri::File("/tmp/f".into())
        );
        for bad in [
            "tcp:host",
            "tcp:h:99999",
            "fd:3",
            "rdma:x:1",
            "nothing",
            "unix:",
        ] {
            assert!(Uri::parse(bad).is_err(), "{bad}");
        }
    }

    fn rcvlowat(s: &TcpStream) -> i32 {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the fd is an open socket; v and len are valid for the call.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "getsockopt");
        v
    }

    /// Batching turns on once data flows, a short message after a pause
    /// still arrives (the peer waits for the answer), and `stop` puts the
    /// socket back to waking on every byte.
    #[test]
    fn batched_reads_turn_on_and_never_hold_a_message() {
        let l = Listener::bind(&Uri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
        let port = l.local_addr().unwrap().port();
        let peer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                .unwrap();
            s.write_all(&vec![7u8; 1 << 20]).unwrap();
            // A pause, then a message the reader must not sit on.
            std::thread::sleep(std::time::Duration::from_millis(300));
            s.write_all(b"ping").unwrap();
            let mut a = [0u8; 4];
            s.read_exact(&mut a)
                .expect("no answer: the message was held");
            assert_eq!(&a, b"pong");
            s.write_all(&vec![9u8; 1 << 20]).unwrap();
        });
        let mut c = l.accept(Duration::from_secs(20), None).unwrap();
        c.batching.allow();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut got = vec![0u8; 1 << 20];
        c.reader.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&b| b == 7));
        let sock = c.batching.socket.clone().unwrap();
        assert!(rcvlowat(&sock) > 1, "batching did not turn on");
        let mut m = [0u8; 4];
        c.reader.read_exact(&mut m).unwrap();
        assert_eq!(&m, b"ping");
        c.writer.write_all(b"pong").unwrap();
        let mut rest = Vec::new();
        c.reader.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len(), 1 << 20);
        assert!(rest.iter().all(|&b| b == 9));
        peer.join().unwrap();
        c.batching.stop();
        assert_eq!(rcvlowat(&sock), 1);
        assert_eq!(sock.read_timeout().unwrap(), Some(Duration::from_secs(20)));
    }

    #[test]
    fn exec_and_file_round_trip() {
        let dir = std::env::temp_dir().join(format!("mig-transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("s");
        let uri = Uri::parse(&format!("exec:cat > {}", f.display())).unwrap();
        let mut c = connect(&uri, Duration::from_secs(5), None).unwrap();
        c.writer.write_all(b"hello").unwrap();
        drop(std::mem::replace(&mut c.writer, Box::new(std::io::sink())));
        c.finish().unwrap();
        let l = Listener::bind(&Uri::parse(&format!("file:{}", f.display())).unwrap()).unwrap();
        let mut s = String::new();
        l.accept(Duration::from_secs(5), None)
            .unwrap()
            .reader
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

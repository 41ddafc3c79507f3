//! The QMP server: listeners, client connections and dispatch, driven by the
//! VMM's own `mio::Poll`.
//!
//! The server owns its sockets but no event loop. The VMM creates one
//! [`Server`] with its `mio::Registry` and a first token; the server
//! registers everything it owns with tokens `first_token..` (the first one
//! is an internal wake-up socket) and the VMM passes every event whose token
//! satisfies [`Server::owns`] to [`Server::handle_event`], together with its
//! [`Handler`].
//!
//! For each client connection:
//!
//! 1. on accept, the server sends the greeting;
//! 2. the connection is in negotiation mode: `qmp_capabilities` is the only
//!    command (anything else: `CommandNotFound` "Expecting capabilities
//!    negotiation with 'qmp_capabilities'"), and no events are sent;
//! 3. after `qmp_capabilities` succeeds, commands are parsed
//!    ([`crate::protocol`], [`crate::schema`]) and executed: the server
//!    answers `query-version` and `query-commands` itself, refuses a second
//!    `qmp_capabilities`, and hands every other command to
//!    [`Handler::execute`]; events broadcast with
//!    [`Server::broadcast_event`] or sent through an [`EventSender`] now
//!    reach this client;
//! 4. the connection ends when the client closes it (pending replies are
//!    flushed first, so `echo '...' | socat - UNIX:...` gets its answers),
//!    on a socket error, when one JSON value exceeds [`MAX_INPUT`] bytes (an
//!    error is sent, the server stops reading requests and closes), or when
//!    the client lets more than [`MAX_OUTPUT_BACKLOG`] bytes of replies and
//!    events pile up unread.
//!
//! A monitor in readline mode ([`MonitorMode::Readline`]: `-monitor`,
//! `-mon mode=readline`) speaks HMP instead: on connecting the client gets
//! a banner and the prompt `(qemu) `; each line it sends (at most
//! [`MAX_HMP_LINE`] bytes) is echoed (as QEMU's line editor does; not on a
//! terminal, which echoes itself), run as `human-monitor-command` by the
//! [`Handler`], and answered with the command's output (`\r\n` line ends)
//! and the prompt again. No events reach it.
//!
//! [`ListenSpec::Stdio`] is one connection on the process's standard input
//! and output, made at once (there is nothing to accept); when stdin ends,
//! pending output is flushed and the monitor is gone.
//!
//! All socket I/O is non-blocking; a connection is registered for
//! `WRITABLE` only while it has output pending. Writing to a peer that has
//! gone away yields `EPIPE`, which closes that connection: the Rust runtime
//! ignores `SIGPIPE`, and the VMM must not restore it.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::event::Source;
use mio::{Interest, Registry, Token};
use serde_json::{json, Value};

use crate::framing::JsonSplitter;
use crate::listen::ListenSpec;
use crate::protocol::{
    encode_error, encode_message, encode_return, greeting, parse_request, Event, QmpError,
    VersionInfo,
};
use crate::schema::{qmp_schema_reply, query_commands_reply, Command, QmpCapabilitiesArgs};

/// Longest JSON value accepted from a client, in bytes.
pub const MAX_INPUT: usize = 1 << 20;
/// Unread output after which a client is disconnected, in bytes.
pub const MAX_OUTPUT_BACKLOG: usize = 8 << 20;
/// Most simultaneous client connections; further clients get an error and
/// are closed.
pub const MAX_CLIENTS: usize = 256;
/// Bytes read from one client per event, so that one client cannot starve
/// the control loop.
const READ_BUDGET: usize = 1 << 20;
/// Longest HMP command line accepted, in bytes.
pub const MAX_HMP_LINE: usize = 64 << 10;
/// The HMP prompt, as QEMU's (scripts wait for it).
const HMP_PROMPT: &str = "(qemu) ";

/// What a monitor speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorMode {
    /// QMP, JSON (`-qmp`, `-mon mode=control`).
    Control,
    /// HMP, a command per line after a prompt (`-monitor`,
    /// `-mon mode=readline`).
    Readline,
}

/// Bytes discarded from a client after an oversized value before giving up
/// on a graceful close.
const DRAIN_BUDGET: usize = 16 << 20;

/// Executes commands for the server: implemented by the VMM.
pub trait Handler {
    /// Execute a negotiated command; `Ok(value)` becomes `{"return": value}`.
    ///
    /// Never called for `qmp_capabilities`, `query-version` or
    /// `query-commands`, which the server answers itself. Commands that must
    /// act after their reply is on the wire (`quit`) should set a flag and
    /// let the VMM call [`Server::flush_blocking`] before acting.
    fn execute(&mut self, cmd: Command) -> Result<Value, QmpError>;
}

impl<F: FnMut(Command) -> Result<Value, QmpError>> Handler for F {
    fn execute(&mut self, cmd: Command) -> Result<Value, QmpError> {
        self(cmd)
    }
}

/// Failure to set up the server or a listener.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The internal wake-up socket could not be created.
    #[error("cannot create the QMP event queue")]
    EventQueue(#[source] io::Error),
    /// A socket could not be registered with the VMM's `mio::Registry`.
    #[error("cannot register a QMP socket with the event loop")]
    Register(#[source] io::Error),
    /// A TCP host name did not resolve.
    #[error("cannot resolve QMP address '{addr}'")]
    Resolve {
        /// Host and port as given.
        addr: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// `bind`/`listen` failed.
    #[error("cannot listen on {spec}")]
    Bind {
        /// The listener, as in `-qmp`.
        spec: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The unix socket path exists and is not a socket: not ours to remove.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Another process is accepting connections on this unix socket.
    #[error("{0} is in use by another process")]
    InUse(PathBuf),
}

/// The address a listener is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address (with the real port when the spec asked for port 0).
    Tcp(SocketAddr),
    /// Standard input and output.
    Stdio,
}

/// Events waiting for the control thread, and the socket that wakes it.
struct EventQueue {
    queue: Mutex<VecDeque<Event>>,
    wake: std::os::unix::net::UnixStream,
}

/// A cloneable, thread-safe handle that queues events for broadcast.
///
/// Any thread (the migration thread, a vCPU thread) may call
/// [`EventSender::send`]; the event is stamped at once and delivered to
/// negotiated clients by the control thread the next time it runs the
/// server (the send wakes the VMM's `Poll` through a token the server
/// owns). Events queued while a command executes go out before that
/// command's reply, as QEMU orders `STOP` before the `stop` reply.
#[derive(Clone)]
pub struct EventSender {
    inner: Arc<EventQueue>,
}

impl EventSender {
    /// Queues event `name` with optional `data`, stamped now.
    pub fn send(&self, name: &str, data: Option<Value>) {
        self.send_event(Event::new(name, data));
    }

    /// Queues a prepared event.
    pub fn send_event(&self, event: Event) {
        self.inner
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(event);
        // A full socket means a wake-up is already pending; any other error
        // means the server is gone. Either way there is nothing to do.
        let _ = (&self.inner.wake).write(&[1]);
    }
}

impl std::fmt::Debug for EventSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSender").finish_non_exhaustive()
    }
}

enum Stream {
    Unix(mio::net::UnixStream),
    Tcp(mio::net::TcpStream),
    Stdio(StdioPair),
}

impl Stream {
    fn source(&mut self) -> &mut dyn Source {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
            Stream::Stdio(s) => s,
        }
    }

    fn shutdown_write(&self) {
        // Best effort: the connection is being wound down anyway.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Stdio(_) => Ok(()),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Stdio(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Stdio(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Standard input (fd 0) and output (fd 1) as one connection. Both are
/// made non-blocking while it lives and get their previous flags back when
/// it is dropped; neither is closed. Registered as one source: fd 0 for
/// reading always, fd 1 for writing while output is pending.
struct StdioPair {
    /// fd 0's and fd 1's file status flags before.
    saved: [libc::c_int; 2],
    /// fd 1 is registered (for `WRITABLE`).
    out_registered: bool,
    /// stdin is a terminal (which echoes what is typed itself).
    tty: bool,
}

impl StdioPair {
    fn new() -> io::Result<Self> {
        let mut saved = [0; 2];
        for (fd, old) in saved.iter_mut().enumerate() {
            let fd = fd as libc::c_int;
            // SAFETY: F_GETFL only reads the flags of the (open) fd.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            if flags < 0 {
                return Err(io::Error::last_os_error());
            }
            *old = flags;
        }
        for (fd, old) in saved.iter().enumerate() {
            // SAFETY: F_SETFL only changes the fd's status flags.
            if unsafe { libc::fcntl(fd as libc::c_int, libc::F_SETFL, old | libc::O_NONBLOCK) } < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: isatty only inspects fd 0.
        let tty = unsafe { libc::isatty(0) } == 1;
        Ok(StdioPair {
            saved,
            out_registered: false,
            tty,
        })
    }

    /// Register fd 1 for `WRITABLE` (with `token`) or drop it, as `want`.
    fn set_out(&mut self, registry: &Registry, token: Token, want: bool) -> io::Result<()> {
        use mio::unix::SourceFd;
        match (want, self.out_registered) {
            (true, false) => SourceFd(&1).register(registry, token, Interest::WRITABLE)?,
            (true, true) => SourceFd(&1).reregister(registry, token, Interest::WRITABLE)?,
            (false, true) => SourceFd(&1).deregister(registry)?,
            (false, false) => {}
        }
        self.out_registered = want;
        Ok(())
    }
}

impl Drop for StdioPair {
    fn drop(&mut self) {
        for (fd, old) in self.saved.iter().enumerate() {
            // SAFETY: restores the flags read in `new` on the same fd.
            unsafe { libc::fcntl(fd as libc::c_int, libc::F_SETFL, *old) };
        }
    }
}

impl Read for StdioPair {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most buf.len() bytes into buf from fd 0.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for StdioPair {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: writes at most buf.len() bytes from buf to fd 1.
        let n = unsafe { libc::write(1, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for StdioPair {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&0).register(registry, token, Interest::READABLE)?;
        self.set_out(registry, token, interests.is_writable())
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&0).reregister(registry, token, Interest::READABLE)?;
        self.set_out(registry, token, interests.is_writable())
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        let r = mio::unix::SourceFd(&0).deregister(registry);
        if self.out_registered {
            mio::unix::SourceFd(&1).deregister(registry)?;
            self.out_registered = false;
        }
        r
    }
}

enum Listener {
    Unix {
        socket: mio::net::UnixListener,
        path: PathBuf,
        /// (device, inode) of the socket file we created.
        ident: Option<(u64, u64)>,
    },
    Tcp(mio::net::TcpListener),
}

impl Listener {
    fn source(&mut self) -> &mut dyn Source {
        match self {
            Listener::Unix { socket, .. } => socket,
            Listener::Tcp(l) => l,
        }
    }

    fn accept(&mut self) -> io::Result<Stream> {
        match self {
            Listener::Unix { socket, .. } => socket.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                // Replies are small and latency matters more than batching.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }

    fn bound(&self) -> Option<BoundAddr> {
        match self {
            Listener::Unix { path, .. } => Some(BoundAddr::Unix(path.clone())),
            Listener::Tcp(l) => l.local_addr().ok().map(BoundAddr::Tcp),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix {
            path,
            ident: Some(ident),
            ..
        } = self
        {
            // Remove the socket file only if it is still the one we created.
            if let Ok(m) = std::fs::symlink_metadata(&*path) {
                if (m.dev(), m.ino()) == *ident {
                    let _ = std::fs::remove_file(&*path);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading and executing requests.
    Open,
    /// The peer closed its side: flush what is pending, then close.
    PeerClosed,
    /// After an oversized value: discard input, flush the error, close.
    Draining { left: usize, shut: bool },
}

struct Conn {
    stream: Stream,
    mode: MonitorMode,
    splitter: JsonSplitter,
    /// Readline mode: the line being received.
    line: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    negotiated: bool,
    phase: Phase,
    /// Registered with `WRITABLE` interest.
    writable: bool,
    /// Reregister even if the interest did not change (read budget spent).
    rearm: bool,
    /// Close at the next opportunity.
    dead: bool,
}

impl Conn {
    fn new(stream: Stream, mode: MonitorMode) -> Self {
        Conn {
            stream,
            mode,
            splitter: JsonSplitter::new(MAX_INPUT),
            line: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            negotiated: false,
            phase: Phase::Open,
            writable: false,
            rearm: false,
            dead: false,
        }
    }

    /// A negotiated QMP client still reading requests (HMP gets none).
    fn wants_events(&self) -> bool {
        self.mode == MonitorMode::Control && self.negotiated && self.phase == Phase::Open
    }

    fn pending(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Appends a message and tries to send it; a client that has left too
    /// much unread is marked dead instead.
    fn send(&mut self, msg: &[u8]) {
        if self.dead {
            return;
        }
        if self.pending() > MAX_OUTPUT_BACKLOG {
            self.dead = true;
            return;
        }
        self.out.extend_from_slice(msg);
        self.flush();
    }

    /// Writes pending output until done or the socket is full.
    fn flush(&mut self) {
        while !self.dead && self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => self.dead = true,
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.dead = true,
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > 64 << 10 {
                self.out.shrink_to(64 << 10);
            }
        } else if self.out_pos > (64 << 10) && self.out_pos * 2 > self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }

    /// Whether the connection is finished and should be closed now.
    fn finished(&mut self) -> bool {
        if self.dead {
            return true;
        }
        match self.phase {
            Phase::Open => false,
            Phase::PeerClosed => self.pending() == 0,
            Phase::Draining { left, shut } => {
                if left == 0 {
                    return true;
                }
                if !shut && self.pending() == 0 {
                    // The error is out: signal EOF, keep draining until the
                    // peer closes so it can read the error without a reset.
                    self.stream.shutdown_write();
                    self.phase = Phase::Draining { left, shut: true };
                }
                false
            }
        }
    }

    /// Registers or drops `WRITABLE` interest to match pending output.
    fn update_interest(&mut self, registry: &Registry, token: Token) {
        let want = self.pending() > 0;
        if want == self.writable && !self.rearm {
            return;
        }
        let interest = if want {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        match registry.reregister(self.stream.source(), token, interest) {
            Ok(()) => {
                self.writable = want;
                self.rearm = false;
            }
            Err(_) => self.dead = true,
        }
    }
}

/// The QMP server; see the module documentation.
pub struct Server {
    registry: Registry,
    first_token: usize,
    next_token: usize,
    listeners: HashMap<Token, (Listener, MonitorMode)>,
    conns: HashMap<Token, Conn>,
    version: VersionInfo,
    events: Arc<EventQueue>,
    wake_rx: mio::net::UnixStream,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("first_token", &self.first_token)
            .field("listeners", &self.listeners.len())
            .field("clients", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server without listeners that registers its sources on `registry`
    /// with tokens `first_token` and up. The VMM must use only tokens below
    /// `first_token` for its own sources.
    pub fn new(registry: &Registry, first_token: usize) -> Result<Server, ServerError> {
        let registry = registry.try_clone().map_err(ServerError::Register)?;
        let (tx, rx) = std::os::unix::net::UnixStream::pair().map_err(ServerError::EventQueue)?;
        tx.set_nonblocking(true).map_err(ServerError::EventQueue)?;
        rx.set_nonblocking(true).map_err(ServerError::EventQueue)?;
        let mut wake_rx = mio::net::UnixStream::from_std(rx);
        registry
            .register(&mut wake_rx, Token(first_token), Interest::READABLE)
            .map_err(ServerError::Register)?;
        Ok(Server {
            registry,
            first_token,
            next_token: first_token + 1,
            listeners: HashMap::new(),
            conns: HashMap::new(),
            version: VersionInfo::default(),
            events: Arc::new(EventQueue {
                queue: Mutex::new(VecDeque::new()),
                wake: tx,
            }),
            wake_rx,
            scratch: vec![0; 64 << 10],
        })
    }

    /// Sets the version shown in the greeting and by `query-version`.
    pub fn set_version(&mut self, version: VersionInfo) {
        self.version = version;
    }

    /// Whether `token` belongs to this server (is `first_token` or above).
    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.first_token
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> usize {
        self.conns.len()
    }

    /// The addresses of all listeners.
    pub fn bound_addrs(&self) -> Vec<BoundAddr> {
        self.listeners
            .values()
            .filter_map(|(l, _)| l.bound())
            .collect()
    }

    /// A handle other threads use to emit events.
    pub fn event_sender(&self) -> EventSender {
        EventSender {
            inner: Arc::clone(&self.events),
        }
    }

    fn alloc_token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        t
    }

    /// Starts a QMP monitor on `spec` (one call per `-qmp` option); see
    /// [`Server::listen_monitor`].
    pub fn listen(&mut self, spec: &ListenSpec) -> Result<BoundAddr, ServerError> {
        self.listen_monitor(spec, MonitorMode::Control)
    }

    /// Starts a monitor speaking `mode` on `spec`: a listener, or for
    /// [`ListenSpec::Stdio`] the one connection on stdin and stdout.
    ///
    /// A stale unix socket file (nobody accepting on it) is replaced; the
    /// file is removed again when the server is dropped.
    pub fn listen_monitor(
        &mut self,
        spec: &ListenSpec,
        mode: MonitorMode,
    ) -> Result<BoundAddr, ServerError> {
        let bind_err = |source| ServerError::Bind {
            spec: spec.to_string(),
            source,
        };
        let mut listener = match spec {
            ListenSpec::Stdio => {
                let pair = StdioPair::new().map_err(bind_err)?;
                let mut conn = Conn::new(Stream::Stdio(pair), mode);
                let token = self.alloc_token();
                self.registry
                    .register(conn.stream.source(), token, Interest::READABLE)
                    .map_err(|e| {
                        bind_err(if e.raw_os_error() == Some(libc::EPERM) {
                            io::Error::new(
                                e.kind(),
                                "standard input cannot be polled (a regular file or \
                                 /dev/null?): use a terminal, a pipe or a socket",
                            )
                        } else {
                            e
                        })
                    })?;
                self.welcome(&mut conn);
                self.put_back(token, conn);
                return Ok(BoundAddr::Stdio);
            }
            ListenSpec::Unix(path) => {
                remove_stale_socket(path)?;
                let socket = mio::net::UnixListener::bind(path).map_err(bind_err)?;
                let ident = std::fs::symlink_metadata(path)
                    .ok()
                    .map(|m| (m.dev(), m.ino()));
                Listener::Unix {
                    socket,
                    path: path.clone(),
                    ident,
                }
            }
            ListenSpec::Tcp { host, port } => {
                let host = if host.is_empty() { "0.0.0.0" } else { host };
                let addrs: Vec<SocketAddr> = (host, *port)
                    .to_socket_addrs()
                    .map_err(|source| ServerError::Resolve {
                        addr: format!("{host}:{port}"),
                        source,
                    })?
                    .collect();
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                let mut bound = None;
                for addr in addrs {
                    match mio::net::TcpListener::bind(addr) {
                        Ok(l) => {
                            bound = Some(l);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                Listener::Tcp(bound.ok_or_else(|| bind_err(last))?)
            }
        };
        let token = self.alloc_token();
        self.registry
            .register(listener.source(), token, Interest::READABLE)
            .map_err(ServerError::Register)?;
        let addr = listener.bound().unwrap_or_else(|| match spec {
            ListenSpec::Unix(p) => BoundAddr::Unix(p.clone()),
            ListenSpec::Tcp { .. } => BoundAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], 0))),
            ListenSpec::Stdio => BoundAddr::Stdio,
        });
        self.listeners.insert(token, (listener, mode));
        Ok(addr)
    }

    /// What a new connection gets first: the QMP greeting, or the HMP
    /// banner and prompt.
    fn welcome(&self, conn: &mut Conn) {
        match conn.mode {
            MonitorMode::Control => conn.send(&encode_message(&greeting(&self.version))),
            MonitorMode::Readline => conn.send(
                format!(
                    "{} monitor - type 'help' for more information\r\n{HMP_PROMPT}",
                    self.version.package
                )
                .as_bytes(),
            ),
        }
    }

    /// Handles one event whose token the server [`owns`](Server::owns).
    /// Events for tokens it does not know (a connection closed earlier in
    /// the same batch) are ignored.
    pub fn handle_event(&mut self, event: &mio::event::Event, handler: &mut dyn Handler) {
        let token = event.token();
        if token.0 == self.first_token {
            self.drain_wake();
            self.deliver_events(None);
            self.reap();
        } else if self.listeners.contains_key(&token) {
            self.accept(token);
        } else if let Some(mut conn) = self.conns.remove(&token) {
            if event.is_writable() {
                conn.flush();
            }
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                self.read_conn(&mut conn, handler);
            }
            self.put_back(token, conn);
            // Events from the handler reached the other clients; close those
            // that failed and update their interest.
            self.reap();
        }
    }

    /// Sends event `name` (with optional `data`) to every negotiated client.
    pub fn broadcast_event(&mut self, name: &str, data: Option<Value>) {
        self.deliver_events(None);
        let msg = Event::new(name, data).encode();
        for conn in self.conns.values_mut() {
            if conn.wants_events() {
                conn.send(&msg);
            }
        }
        self.reap();
    }

    /// Pushes all pending output (queued events included), waiting up to
    /// `timeout`. Returns whether everything was written. For use before
    /// the VMM exits, e.g. after `quit`.
    pub fn flush_blocking(&mut self, timeout: Duration) -> bool {
        self.deliver_events(None);
        let deadline = Instant::now() + timeout;
        let done = loop {
            let mut pending = false;
            for conn in self.conns.values_mut() {
                conn.flush();
                pending |= !conn.dead && conn.pending() > 0;
            }
            if !pending {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        self.reap();
        done
    }

    fn drain_wake(&mut self) {
        let mut buf = [0u8; 256];
        loop {
            match self.wake_rx.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// Sends queued events to every negotiated client, including `current`
    /// (the connection being served, which is out of the map).
    fn deliver_events(&mut self, mut current: Option<&mut Conn>) {
        let events: Vec<Event> = {
            let mut q = self.events.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.drain(..).collect()
        };
        for event in events {
            let msg = event.encode();
            let others = self.conns.values_mut();
            for conn in others.chain(current.as_deref_mut()) {
                if conn.wants_events() {
                    conn.send(&msg);
                }
            }
        }
    }

    /// Updates interest of every connection and closes the finished ones.
    fn reap(&mut self) {
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for token in tokens {
            if let Some(conn) = self.conns.remove(&token) {
                self.put_back(token, conn);
            }
        }
    }

    /// Returns a connection to the map, or closes it if it is finished.
    fn put_back(&mut self, token: Token, mut conn: Conn) {
        if !conn.finished() {
            conn.update_interest(&self.registry, token);
            if !conn.dead {
                self.conns.insert(token, conn);
                return;
            }
        }
        let _ = self.registry.deregister(conn.stream.source());
        // Dropping `conn` closes the socket.
    }

    fn accept(&mut self, token: Token) {
        loop {
            let Some((listener, mode)) = self.listeners.get_mut(&token) else {
                return;
            };
            let mode = *mode;
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                    // WouldBlock: done. Anything else (EMFILE, ENOBUFS):
                    // leave the connection in the backlog; the next one to
                    // arrive retries.
                    _ => return,
                },
            };
            let mut conn = Conn::new(stream, mode);
            if self.conns.len() >= MAX_CLIENTS {
                let e = QmpError::generic("Too many monitor clients connected");
                match mode {
                    MonitorMode::Control => conn.send(&encode_error(&e, None)),
                    MonitorMode::Readline => conn.send(format!("{}\r\n", e.desc).as_bytes()),
                }
                continue; // dropped: closed
            }
            let conn_token = self.alloc_token();
            if self
                .registry
                .register(conn.stream.source(), conn_token, Interest::READABLE)
                .is_err()
            {
                continue;
            }
            self.welcome(&mut conn);
            self.put_back(conn_token, conn);
        }
    }

    fn read_conn(&mut self, conn: &mut Conn, handler: &mut dyn Handler) {
        let mut buf = std::mem::take(&mut self.scratch);
        let mut budget = READ_BUDGET;
        while !conn.dead && conn.phase != Phase::PeerClosed {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    if conn.phase == Phase::Open && conn.mode == MonitorMode::Control {
                        if let Some(rest) = conn.splitter.finish() {
                            self.dispatch(conn, &rest, handler);
                        }
                    }
                    conn.phase = Phase::PeerClosed;
                }
                Ok(n) => {
                    match conn.phase {
                        Phase::Open => self.on_input(conn, &buf[..n], handler),
                        Phase::Draining { left, shut } => {
                            conn.phase = Phase::Draining {
                                left: left.saturating_sub(n),
                                shut,
                            };
                            if left <= n {
                                conn.dead = true;
                            }
                        }
                        Phase::PeerClosed => {}
                    }
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        // Let other sources run; reregistering re-arms the
                        // edge-triggered readiness if input is still waiting.
                        conn.rearm = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => conn.dead = true,
            }
        }
        self.scratch = buf;
    }

    fn on_input(&mut self, conn: &mut Conn, data: &[u8], handler: &mut dyn Handler) {
        if conn.mode == MonitorMode::Readline {
            return self.on_lines(conn, data, handler);
        }
        let mut values = Vec::new();
        let overflow = conn.splitter.push(data, &mut values);
        for value in values {
            if conn.dead {
                return;
            }
            self.dispatch(conn, &value, handler);
        }
        if let Err(e) = overflow {
            conn.send(&encode_error(
                &QmpError::generic(format!("JSON parse error, {e}; closing the connection")),
                None,
            ));
            conn.phase = Phase::Draining {
                left: DRAIN_BUDGET,
                shut: false,
            };
        }
    }

    /// Readline mode: run every complete line in `data` (after what came
    /// before it); a line longer than [`MAX_HMP_LINE`] ends the connection
    /// with an error.
    fn on_lines(&mut self, conn: &mut Conn, data: &[u8], handler: &mut dyn Handler) {
        let mut rest = data;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            if conn.dead {
                return;
            }
            conn.line.extend_from_slice(&rest[..end]);
            rest = &rest[end + 1..];
            let line = std::mem::take(&mut conn.line);
            if line.len() > MAX_HMP_LINE {
                return self.line_too_long(conn);
            }
            let text = String::from_utf8_lossy(&line);
            self.run_hmp(conn, text.trim_end_matches('\r'), handler);
        }
        conn.line.extend_from_slice(rest);
        if conn.line.len() > MAX_HMP_LINE {
            self.line_too_long(conn);
        }
    }

    fn line_too_long(&mut self, conn: &mut Conn) {
        conn.line = Vec::new();
        conn.send(
            format!("command line longer than {MAX_HMP_LINE} bytes; closing the monitor\r\n")
                .as_bytes(),
        );
        conn.phase = Phase::Draining {
            left: DRAIN_BUDGET,
            shut: false,
        };
    }

    /// One HMP line: echoed (except to a terminal), run as
    /// `human-monitor-command`, its output and the prompt sent back.
    fn run_hmp(&mut self, conn: &mut Conn, line: &str, handler: &mut dyn Handler) {
        let echo = !matches!(&conn.stream, Stream::Stdio(p) if p.tty);
        let mut out = String::new();
        if echo {
            out += line;
            out += "\r\n";
        }
        if !line.trim().is_empty() {
            let cmd = Command::HumanMonitorCommand(crate::schema::HumanMonitorCommandArgs {
                command_line: line.to_string(),
                cpu_index: None,
            });
            match handler.execute(cmd) {
                Ok(Value::String(s)) => out += &s,
                Ok(Value::Null) => {}
                Ok(v) => out += &format!("{v}\r\n"),
                Err(e) => out += &format!("Error: {}\r\n", e.desc),
            }
        }
        out += HMP_PROMPT;
        conn.send(out.as_bytes());
    }

    /// Executes one request and sends its reply.
    fn dispatch(&mut self, conn: &mut Conn, input: &[u8], handler: &mut dyn Handler) {
        let request = match parse_request(input) {
            Ok(r) => r,
            Err(e) => {
                conn.send(&encode_error(&e.error, e.id.as_ref()));
                return;
            }
        };
        let id = request.id;
        let result = if !conn.negotiated {
            if request.name == "qmp_capabilities" {
                match Command::parse(&request.name, request.arguments) {
                    Ok(Command::QmpCapabilities(args)) => accept_capabilities(&args).map(|()| {
                        conn.negotiated = true;
                        json!({})
                    }),
                    Ok(other) => Err(QmpError::generic(format!(
                        "internal error: qmp_capabilities parsed as {}",
                        other.name()
                    ))),
                    Err(e) => Err(e),
                }
            } else {
                Err(QmpError::command_not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ))
            }
        } else {
            match Command::parse(&request.name, request.arguments) {
                Err(e) => Err(e),
                Ok(Command::QmpCapabilities(_)) => Err(QmpError::command_not_found(
                    "Capabilities negotiation is already complete, command ignored",
                )),
                Ok(Command::QueryVersion) => Ok(self.version.to_json()),
                Ok(Command::QueryCommands) => Ok(query_commands_reply()),
                Ok(Command::QueryQmpSchema) => Ok(qmp_schema_reply()),
                Ok(cmd) => {
                    let r = handler.execute(cmd);
                    self.deliver_events(Some(conn));
                    r
                }
            }
        };
        let msg = match result {
            Ok(v) => encode_return(v, id.as_ref()),
            Err(e) => encode_error(&e, id.as_ref()),
        };
        conn.send(&msg);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for (_, mut conn) in self.conns.drain() {
            let _ = self.registry.deregister(conn.stream.source());
        }
        for (_, (mut listener, _)) in self.listeners.drain() {
            let _ = self.registry.deregister(listener.source());
        }
        let _ = self.registry.deregister(&mut self.wake_rx);
    }
}

/// Minivmm offers no QMP capabilities: enabling any is an error.
fn accept_capabilities(args: &QmpCapabilitiesArgs) -> Result<(), QmpError> {
    match args.enable.as_deref().and_then(|caps| caps.first()) {
        Some(cap) => {
            let name = serde_json::to_value(cap)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            Err(QmpError::generic(format!(
                "Capability '{name}' not available"
            )))
        }
        None => Ok(()),
    }
}

/// Removes a leftover socket file at `path` that nobody accepts on.
fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(()); // nothing there (or unreadable: bind will say)
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.to_path_buf()));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ServerError::InUse(path.to_path_buf()));
    }
    std::fs::remove_file(path).map_err(|source| ServerError::Bind {
        spec: format!("unix:{}", path.display()),
        source,
    })
}

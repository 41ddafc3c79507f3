//! A small blocking QMP client, for tests, benchmarks and tools.
//!
//! Message sequence, as seen from the client:
//!
//! 1. connect, read the greeting (`{"QMP": ...}`) ([`Client::connect_unix_raw`]);
//! 2. send `qmp_capabilities` and read its reply ([`Client::negotiate`];
//!    [`Client::connect_unix`] does steps 1 and 2);
//! 3. for each [`Client::execute`], send `{"execute", "arguments", "id"}`
//!    and read until the reply with that id; events read meanwhile are
//!    queued, and [`Client::wait_event`] looks in that queue before reading
//!    more.
//!
//! Every read has a deadline. [`Client::send_raw`] and
//! [`Client::read_message`] bypass the request/reply matching, for tests of
//! malformed input.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::framing::JsonSplitter;

/// Largest message the client accepts, in bytes.
const MAX_MESSAGE: usize = 256 << 20;

/// What went wrong talking to a QMP server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection could not be made.
    #[error("cannot connect to QMP at {addr}")]
    Connect {
        /// Socket path or address.
        addr: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP socket I/O failed")]
    Io(#[source] io::Error),
    /// No (matching) message before the deadline.
    #[error("timed out waiting for the QMP server")]
    Timeout,
    /// No such event before the deadline ([`Client::wait_event`]).
    #[error("no {event} event within {after:?}")]
    NoEvent {
        /// The event waited for.
        event: String,
        /// How long.
        after: Duration,
    },
    /// The server closed the connection.
    #[error("the QMP server closed the connection")]
    Closed,
    /// The server sent something that is not JSON.
    #[error("the QMP server sent invalid JSON")]
    Json(#[source] serde_json::Error),
    /// The server sent JSON that makes no sense here.
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
    /// The command failed: the server's `{"error": {class, desc}}`.
    #[error("{class}: {desc}")]
    Qmp {
        /// Error class, e.g. `"GenericError"`.
        class: String,
        /// Error description.
        desc: String,
    },
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(Some(t)),
            Stream::Tcp(s) => s.set_read_timeout(Some(t)),
        }
    }

    fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(Some(t)),
            Stream::Tcp(s) => s.set_write_timeout(Some(t)),
        }
    }
}

impl std::os::fd::AsRawFd for Client {
    /// The connection's socket (e.g. to ask a unix socket's peer who it is).
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match &self.stream {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// A blocking QMP client connection.
pub struct Client {
    stream: Stream,
    splitter: JsonSplitter,
    /// Messages read from the wire and not yet handed out, in order.
    incoming: VecDeque<Value>,
    /// Events read while waiting for something else.
    events: VecDeque<Value>,
    greeting: Value,
    timeout: Duration,
    next_id: u64,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("greeting", &self.greeting)
            .field("queued_events", &self.events.len())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to a unix socket and negotiates capabilities. `timeout`
    /// bounds each later operation too (see [`Client::set_timeout`]).
    pub fn connect_unix(path: impl AsRef<Path>, timeout: Duration) -> Result<Client, ClientError> {
        let mut c = Self::connect_unix_raw(path, timeout)?;
        c.negotiate()?;
        Ok(c)
    }

    /// Connects to a TCP address and negotiates capabilities.
    pub fn connect_tcp(addr: impl ToSocketAddrs, timeout: Duration) -> Result<Client, ClientError> {
        let mut c = Self::connect_tcp_raw(addr, timeout)?;
        c.negotiate()?;
        Ok(c)
    }

    /// Connects to a unix socket and reads the greeting, without negotiating.
    pub fn connect_unix_raw(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            addr: path.display().to_string(),
            source,
        })?;
        Self::start(Stream::Unix(s), timeout)
    }

    /// Connects to a TCP address and reads the greeting, without negotiating.
    pub fn connect_tcp_raw(
        addr: impl ToSocketAddrs,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let addrs = addr
            .to_socket_addrs()
            .map_err(|source| ClientError::Connect {
                addr: "tcp address".into(),
                source,
            })?;
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Self::start(Stream::Tcp(s), timeout);
                }
                Err(source) => {
                    last = Some(ClientError::Connect {
                        addr: a.to_string(),
                        source,
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Connect {
            addr: "tcp address".into(),
            source: io::Error::new(io::ErrorKind::NotFound, "no address"),
        }))
    }

    fn start(stream: Stream, timeout: Duration) -> Result<Client, ClientError> {
        stream.set_write_timeout(timeout).map_err(ClientError::Io)?;
        let mut c = Client {
            stream,
            splitter: JsonSplitter::new(MAX_MESSAGE),
            incoming: VecDeque::new(),
            events: VecDeque::new(),
            greeting: Value::Null,
            timeout,
            next_id: 1,
            buf: vec![0; 64 << 10],
        };
        let greeting = c.read_message(timeout)?;
        if greeting.get("QMP").is_none() {
            return Err(ClientError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        c.greeting = greeting;
        Ok(c)
    }

    /// The greeting the server sent.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Sets the deadline used by [`Client::execute`].
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends `qmp_capabilities`.
    pub fn negotiate(&mut self) -> Result<(), ClientError> {
        self.execute("qmp_capabilities", json!({})).map(|_| ())
    }

    /// Runs a command and returns its `return` value. `args` is an object
    /// or `null` (no `arguments` member).
    pub fn execute(&mut self, name: &str, args: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = Map::new();
        req.insert("execute".into(), Value::String(name.into()));
        if !args.is_null() {
            req.insert("arguments".into(), args);
        }
        req.insert("id".into(), json!(id));
        let mut line = serde_json::to_vec(&Value::Object(req)).map_err(ClientError::Json)?;
        line.push(b'\n');
        self.send_raw(&line)?;

        let deadline = Instant::now() + self.timeout;
        loop {
            let msg = self.next_until(deadline)?;
            if msg.get("event").is_some() {
                self.events.push_back(msg);
                continue;
            }
            if msg.get("id") != Some(&json!(id)) {
                continue; // a reply to something sent with send_raw
            }
            let Value::Object(mut m) = msg else {
                continue;
            };
            if let Some(v) = m.remove("return") {
                return Ok(v);
            }
            if let Some(e) = m.remove("error") {
                let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                return Err(ClientError::Qmp {
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(ClientError::Protocol(Value::Object(m).to_string()));
        }
    }

    /// Writes `data` as is (no newline added).
    pub fn send_raw(&mut self, data: impl AsRef<[u8]>) -> Result<(), ClientError> {
        self.stream
            .write_all(data.as_ref())
            .and_then(|()| self.stream.flush())
            .map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout,
                _ => ClientError::Io(e),
            })
    }

    /// The next message from the wire, whatever it is (queued events are not
    /// looked at).
    pub fn read_message(&mut self, timeout: Duration) -> Result<Value, ClientError> {
        self.next_until(Instant::now() + timeout)
    }

    /// Waits for event `name` for which `pred(event)` holds (the whole event
    /// object: `event["data"]["status"]`, ...), looking at queued events
    /// first. Other events are kept for later waits; stray replies are
    /// dropped. Returns the event object.
    pub fn wait_event(
        &mut self,
        name: &str,
        mut pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let mut matches =
            |e: &Value| e.get("event").and_then(Value::as_str) == Some(name) && pred(e);
        if let Some(pos) = self.events.iter().position(&mut matches) {
            return self.events.remove(pos).ok_or(ClientError::Timeout);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let msg = self.next_until(deadline).map_err(|e| match e {
                ClientError::Timeout => ClientError::NoEvent {
                    event: name.to_string(),
                    after: timeout,
                },
                e => e,
            })?;
            if msg.get("event").is_some() {
                if matches(&msg) {
                    return Ok(msg);
                }
                self.events.push_back(msg);
            }
        }
    }

    /// Removes and returns the queued events.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    fn next_until(&mut self, deadline: Instant) -> Result<Value, ClientError> {
        loop {
            if let Some(v) = self.incoming.pop_front() {
                return Ok(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout);
            }
            self.stream
                .set_read_timeout(deadline - now)
                .map_err(ClientError::Io)?;
            match self.stream.read(&mut self.buf) {
                Ok(0) => {
                    return match self.splitter.finish() {
                        Some(rest) => Err(ClientError::Protocol(format!(
                            "connection closed inside a message, after {} bytes of it",
                            rest.len()
                        ))),
                        None => Err(ClientError::Closed),
                    }
                }
                Ok(n) => {
                    let mut chunks = Vec::new();
                    let res = self.splitter.push(&self.buf[..n], &mut chunks);
                    for c in chunks {
                        self.incoming
                            .push_back(serde_json::from_slice(&c).map_err(ClientError::Json)?);
                    }
                    res.map_err(|e| ClientError::Protocol(e.to_string()))?;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(ClientError::Closed)
                }
                Err(e) => return Err(ClientError::Io(e)),
            }
        }
    }
}

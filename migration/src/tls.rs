//! TLS for migration channels: QEMU's `tls-creds-x509`, built on rustls.
//!
//! This module owns the credentials, the handshake and the pump that runs a
//! TLS session under the engines.
//!
//! **Credentials** ([`TlsCreds::load`]) come from a directory in QEMU's
//! layout: `ca-cert.pem` (the CA that signed the peer), and for a server
//! endpoint `server-cert.pem` + `server-key.pem`, for a client endpoint
//! `client-cert.pem` + `client-key.pem` (the client's own pair is needed
//! only where the server verifies its peers). A server with `verify-peer`
//! (QEMU's default) accepts only clients with a certificate signed by its
//! CA; a client always checks the server's certificate against its CA and
//! the expected host name (`tls-hostname`, else the host of the URI).
//!
//! **Sequence** on a new socket: TCP or unix connect/accept; on the
//! destination the TLS handshake on the blocking socket (bounded by the
//! peer timeout) before anything is read; on the source the handshake is
//! run by the pump, as soon as it starts (a source may have to send a
//! command on another connection before its peer accepts this one: the
//! postcopy preempt channel); the engines' first bytes wait in the session
//! until the destination's certificate has been checked. Then [`pump`]:
//! the engines get an
//! ordinary socket channel (one end of a unix socket pair) and a pump
//! thread carries the session between the other end and the network
//! socket. The engines read and write a channel from two threads at once
//! (main stream one way, return path the other), which one rustls session
//! cannot serve from two threads; behind the pair, peer timeouts, shutdown
//! and close work as on any socket. Closing the engines' end closes the
//! session (close_notify) and the network socket; a peer that closes or
//! fails ends the engines' reads.
//!
//! A handshake that fails says why on both sides (rustls' reason: unknown
//! issuer, name mismatch, no client certificate, not TLS at all; on the
//! source in the error of the engines' next read or write, [`Named`]), and
//! nothing of the guest has crossed by then.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// TLS failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file is missing or unreadable.
    #[error("tls-creds '{id}': cannot read {}", path.display())]
    File {
        /// The object's id.
        id: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The files do not make a usable configuration.
    #[error("tls-creds '{id}': {what}")]
    Config {
        /// The object's id.
        id: String,
        /// What is wrong.
        what: String,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// Refused settings.
    #[error("tls-creds '{id}': {0}", id = .1)]
    Unsupported(String, String),
    /// The peer's host name is not a valid TLS server name.
    #[error("'{0}' cannot be checked against a certificate (set tls-hostname)")]
    Name(String),
    /// The handshake failed.
    #[error("TLS handshake with {peer} failed{hint}")]
    Handshake {
        /// Who.
        peer: String,
        /// A hint on the likely cause.
        hint: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Setting up the pump failed.
    #[error("cannot set up the TLS channel")]
    Pump(#[source] std::io::Error),
}

/// Why a TLS session ended under the engines (an alert from the peer, a
/// record that did not decrypt): carried in the [`std::io::Error`] of the
/// read or write that found the channel gone.
#[derive(Clone, Debug, thiserror::Error)]
#[error("the TLS session with {peer} failed: {reason}{hint}")]
pub struct SessionFailed {
    /// Who.
    pub peer: String,
    /// rustls' reason.
    pub reason: String,
    /// A hint on the likely cause.
    pub hint: &'static str,
}

/// Where the pump leaves the reason a session failed.
pub(crate) type Failure = Arc<std::sync::Mutex<Option<SessionFailed>>>;

/// A channel half that names the session's failure in its errors (and in
/// an end of stream the failure caused).
pub(crate) struct Named<S> {
    pub(crate) inner: S,
    pub(crate) failure: Failure,
}

impl<S> Named<S> {
    fn named(&self, e: std::io::Error) -> std::io::Error {
        match &*self.failure.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(f) => std::io::Error::new(e.kind(), f.clone()),
            None => e,
        }
    }
}

impl<S: Read> Read for Named<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inner.read(buf) {
            Ok(0) if !buf.is_empty() => {
                let e = self.named(std::io::ErrorKind::ConnectionAborted.into());
                if e.get_ref().is_some() {
                    return Err(e);
                }
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(e) => Err(self.named(e)),
        }
    }
}

impl<S: Write> Write for Named<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf).map_err(|e| self.named(e))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush().map_err(|e| self.named(e))
    }
}

/// Which side of a connection a credentials object is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The migration source (connects).
    Client,
    /// The destination (listens).
    Server,
}

/// A loaded `tls-creds-x509` object.
pub struct TlsCreds {
    /// Its id (`tls-creds` names it).
    pub id: String,
    /// Its endpoint.
    pub endpoint: Endpoint,
    /// Its directory.
    pub dir: PathBuf,
    /// Whether the peer is verified (server: a client certificate is required).
    pub verify_peer: bool,
    config: Config,
}

enum Config {
    Client(Arc<ClientConfig>),
    Server(Arc<ServerConfig>),
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCreds")
            .field("id", &self.id)
            .field("endpoint", &self.endpoint)
            .field("dir", &self.dir)
            .field("verify_peer", &self.verify_peer)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsCreds {
    /// Read the credentials in `dir` for `endpoint` (see the module doc).
    pub fn load(
        id: &str,
        dir: &Path,
        endpoint: Endpoint,
        verify_peer: bool,
    ) -> Result<Self, TlsError> {
        let file = |name: &str| dir.join(name);
        let certs = |name: &str| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let path = file(name);
            CertificateDer::pem_file_iter(&path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| TlsError::File {
                    id: id.into(),
                    path,
                    source,
                })
        };
        let key = |name: &str| -> Result<PrivateKeyDer<'static>, TlsError> {
            let path = file(name);
            PrivateKeyDer::from_pem_file(&path).map_err(|source| TlsError::File {
                id: id.into(),
                path,
                source,
            })
        };
        let config_err = |what: &str| {
            let id = id.to_string();
            let what = what.to_string();
            move |source| TlsError::Config { id, what, source }
        };
        let mut roots = RootCertStore::empty();
        let ca = certs("ca-cert.pem")?;
        for c in ca {
            roots
                .add(c)
                .map_err(config_err("ca-cert.pem is not a usable CA certificate"))?;
        }
        let config = match endpoint {
            Endpoint::Client => {
                if !verify_peer {
                    return Err(TlsError::Unsupported(
                        "verify-peer=off on a client: minivmm always checks the \
                         destination's certificate"
                            .into(),
                        id.into(),
                    ));
                }
                let b = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(config_err("no TLS version"))?
                    .with_root_certificates(roots);
                let cfg = if file("client-cert.pem").exists() {
                    b.with_client_auth_cert(certs("client-cert.pem")?, key("client-key.pem")?)
                        .map_err(config_err(
                            "client-cert.pem and client-key.pem do not match",
                        ))?
                } else {
                    b.with_no_client_auth()
                };
                Config::Client(Arc::new(cfg))
            }
            Endpoint::Server => {
                let b = ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(config_err("no TLS version"))?;
                let b = if verify_peer {
                    let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider(),
                    )
                    .build()
                    .map_err(|e| TlsError::Config {
                        id: id.into(),
                        what: format!("cannot verify clients with ca-cert.pem: {e}"),
                        source: rustls::Error::General(e.to_string()),
                    })?;
                    b.with_client_cert_verifier(v)
                } else {
                    b.with_no_client_auth()
                };
                let cfg = b
                    .with_single_cert(certs("server-cert.pem")?, key("server-key.pem")?)
                    .map_err(config_err(
                        "server-cert.pem and server-key.pem do not match",
                    ))?;
                Config::Server(Arc::new(cfg))
            }
        };
        Ok(Self {
            id: id.into(),
            endpoint,
            dir: dir.into(),
            verify_peer,
            config,
        })
    }
}

/// What a source needs to open TLS channels: its credentials and the name
/// the destination's certificate must carry.
#[derive(Clone, Debug)]
pub struct TlsClient {
    /// The credentials (a client endpoint).
    pub creds: Arc<TlsCreds>,
    /// The expected host name (`tls-hostname`, else the URI's host).
    pub hostname: String,
}

impl TlsClient {
    /// For `creds` (which must be a client endpoint), checking the
    /// destination against `hostname`.
    pub fn new(creds: Arc<TlsCreds>, hostname: &str) -> Result<Self, TlsError> {
        if creds.endpoint != Endpoint::Client {
            return Err(TlsError::Unsupported(
                "is a server endpoint; a migration source needs endpoint=client".into(),
                creds.id.clone(),
            ));
        }
        ServerName::try_from(hostname.to_string()).map_err(|_| TlsError::Name(hostname.into()))?;
        Ok(Self {
            creds,
            hostname: hostname.into(),
        })
    }
}

/// The socket kinds a session runs over.
pub(crate) trait NetSocket: Read + Write + AsRawFd + Send + 'static {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()>;
    fn shutdown_both(&self);
}

impl NetSocket for std::net::TcpStream {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        std::net::TcpStream::set_nonblocking(self, on)
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl NetSocket for UnixStream {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        UnixStream::set_nonblocking(self, on)
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

/// Why a handshake most likely failed, from rustls' error.
fn hint(e: &std::io::Error) -> &'static str {
    let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                " (the peer closed the connection: does it have TLS credentials, and does it accept ours?)"
            }
            _ => "",
        };
    };
    match r {
        rustls::Error::InvalidMessage(_) => {
            " (the peer does not speak TLS: is tls-creds set on both sides?)"
        }
        rustls::Error::InvalidCertificate(_) => {
            " (its certificate is not one our CA signed for that name)"
        }
        rustls::Error::NoCertificatesPresented => " (it presented no certificate)",
        rustls::Error::AlertReceived(
            rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::CertificateUnknown
            | rustls::AlertDescription::DecryptError,
        ) => " (the peer does not accept our certificate: signed by another CA?)",
        _ => "",
    }
}

/// Source side: the session on `sock`, its handshake run by the pump as
/// the engines write (a failure then names itself in their errors). Returns the engines' end and where a failure's reason
/// will be.
pub(crate) fn client<S: NetSocket>(
    sock: S,
    tls: &TlsClient,
    peer: &str,
) -> Result<(UnixStream, Failure), TlsError> {
    let Config::Client(cfg) = &tls.creds.config else {
        return Err(TlsError::Unsupported(
            "is a server endpoint; a migration source needs endpoint=client".into(),
            tls.creds.id.clone(),
        ));
    };
    let name = ServerName::try_from(tls.hostname.clone())
        .map_err(|_| TlsError::Name(tls.hostname.clone()))?;
    let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| TlsError::Config {
        id: tls.creds.id.clone(),
        what: "cannot start a session".into(),
        source: e,
    })?;
    run(rustls::Connection::Client(conn), sock, peer, false)
}

/// Destination side: the handshake on `sock`, then the pump.
pub(crate) fn server<S: NetSocket>(
    sock: S,
    creds: &TlsCreds,
    peer: &str,
) -> Result<(UnixStream, Failure), TlsError> {
    let Config::Server(cfg) = &creds.config else {
        return Err(TlsError::Unsupported(
            "is a client endpoint; a migration destination needs endpoint=server".into(),
            creds.id.clone(),
        ));
    };
    let conn = rustls::ServerConnection::new(cfg.clone()).map_err(|e| TlsError::Config {
        id: creds.id.clone(),
        what: "cannot start a session".into(),
        source: e,
    })?;
    run(rustls::Connection::Server(conn), sock, peer, true)
}

/// Start the session on `sock`: the handshake here first (`handshake`,
/// a destination: its failure is its accept's), or in the pump as the
/// engines write (a source: its first connection, preempt channel or
/// recovery may wait for the destination to read something first), then
/// the pump.
fn run<S: NetSocket>(
    mut conn: rustls::Connection,
    mut sock: S,
    peer: &str,
    handshake: bool,
) -> Result<(UnixStream, Failure), TlsError> {
    let failed = |source: std::io::Error| TlsError::Handshake {
        peer: peer.into(),
        hint: hint(&source),
        source,
    };
    while handshake && conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            // Tell the peer why (an alert), as far as it still listens.
            let _ = conn.write_tls(&mut sock);
            sock.shutdown_both();
            return Err(failed(e));
        }
    }
    let (ours, theirs) = UnixStream::pair().map_err(TlsError::Pump)?;
    theirs.set_nonblocking(true).map_err(TlsError::Pump)?;
    sock.set_nonblocking(true).map_err(TlsError::Pump)?;
    let failure: Failure = Arc::default();
    let (f, peer) = (failure.clone(), peer.to_string());
    std::thread::Builder::new()
        .name("mig-tls".into())
        .spawn(move || {
            let mut sock = sock;
            if let Err(reason) = pump(conn, &mut sock, &theirs) {
                let hint = match &reason {
                    rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => {
                        " (the destination verifies its peers: give the source a client \
                         certificate, client-cert.pem and client-key.pem)"
                    }
                    rustls::Error::AlertReceived(
                        rustls::AlertDescription::UnknownCA
                        | rustls::AlertDescription::BadCertificate,
                    ) => " (the peer does not accept our certificate)",
                    _ => "",
                };
                log::warn!("migration TLS session with {peer}: {reason}");
                *f.lock().unwrap_or_else(|p| p.into_inner()) = Some(SessionFailed {
                    peer,
                    reason: reason.to_string(),
                    hint,
                });
            }
            end(&sock, &theirs);
        })
        .map_err(TlsError::Pump)?;
    Ok((ours, failure))
}

/// Plaintext held for the engines at most (then the network is not read).
const HOLD: usize = 256 << 10;

/// Carry the session between `net` and `local` (both non-blocking) until
/// both directions have ended or one side fails (the caller shuts both
/// then); a TLS failure is returned. See the module doc.
fn pump<S: NetSocket>(
    mut conn: rustls::Connection,
    mut net: &mut S,
    mut local: &UnixStream,
) -> Result<(), rustls::Error> {
    let mut buf = vec![0u8; 64 << 10];
    let mut held: Vec<u8> = Vec::new(); // plaintext for `local`
    let mut held_pos = 0;
    let mut local_in_done = false; // the engines closed their writing side
    let mut local_out_done = false; // the engines stopped reading
    let mut net_in_done = false; // the peer closed (or close_notify)
    let mut sending: Vec<u8> = Vec::new(); // plaintext for the session
    let mut sending_pos = 0;
    let mut closed = false; // close_notify queued
    let would_block = |e: &std::io::Error| e.kind() == std::io::ErrorKind::WouldBlock;
    let interrupted = |e: &std::io::Error| e.kind() == std::io::ErrorKind::Interrupted;
    loop {
        let mut progress = false;
        // Session → network.
        while conn.wants_write() {
            match conn.write_tls(&mut net) {
                Ok(_) => progress = true,
                Err(e) if would_block(&e) => break,
                Err(e) if interrupted(&e) => {}
                Err(_) => return Ok(()),
            }
        }
        // Session → engines.
        if held_pos == held.len() {
            held.clear();
            held_pos = 0;
            while held.len() < HOLD {
                match conn.reader().read(&mut buf) {
                    Ok(0) => {
                        net_in_done = true;
                        break;
                    }
                    Ok(n) => {
                        progress = true;
                        if !local_out_done {
                            held.extend_from_slice(&buf[..n]);
                        }
                    }
                    Err(e) if would_block(&e) => break,
                    Err(_) => return Ok(()),
                }
            }
        }
        while held_pos < held.len() {
            match local.write(&held[held_pos..]) {
                Ok(n) => {
                    held_pos += n;
                    progress = true;
                }
                Err(e) if would_block(&e) => break,
                Err(e) if interrupted(&e) => {}
                Err(_) => {
                    // The engines shut their reading side: what still
                    // comes is dropped; their writing side goes on.
                    local_out_done = true;
                    held.clear();
                    held_pos = 0;
                }
            }
        }
        if net_in_done && held_pos == held.len() && !local_out_done {
            let _ = local.shutdown(std::net::Shutdown::Write);
            local_out_done = true;
        }
        // Engines → session: what the session takes (while it
        // handshakes it buffers only so much), then more while it has
        // sent what it holds.
        while sending_pos < sending.len() {
            match conn.writer().write(&sending[sending_pos..]) {
                Ok(0) => break,
                Ok(n) => {
                    sending_pos += n;
                    progress = true;
                }
                Err(_) => return Ok(()),
            }
        }
        if sending_pos == sending.len() {
            if local_in_done && !closed {
                conn.send_close_notify();
                closed = true;
                progress = true;
            }
            if !local_in_done && !conn.wants_write() {
                sending.clear();
                sending_pos = 0;
                sending.resize(64 << 10, 0);
                match local.read(&mut sending) {
                    Ok(0) => {
                        sending.clear();
                        local_in_done = true;
                        progress = true;
                    }
                    Ok(n) => {
                        sending.truncate(n);
                        progress = true;
                    }
                    Err(e) => {
                        sending.clear();
                        if !(would_block(&e) || interrupted(&e)) {
                            local_in_done = true;
                            progress = true;
                        }
                    }
                }
            }
        }
        // Network → session, while the engines have taken what it gave.
        if !net_in_done && held_pos == held.len() {
            match conn.read_tls(&mut net) {
                Ok(0) => {
                    net_in_done = true;
                    progress = true;
                }
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        let _ = conn.write_tls(&mut net);
                        return Err(e);
                    }
                    progress = true;
                }
                Err(e) if would_block(&e) || interrupted(&e) => {}
                Err(_) => return Ok(()),
            }
        }
        let finished_out = closed && !conn.wants_write();
        let finished_in = net_in_done && held_pos == held.len();
        if finished_out && (finished_in || local_out_done) {
            return Ok(());
        }
        if progress {
            continue;
        }
        // Nothing moved: wait for a side that can.
        let mut fds = [
            poll_fd(
                net.as_raw_fd(),
                !net_in_done && held_pos == held.len(),
                conn.wants_write(),
            ),
            poll_fd(
                local.as_raw_fd(),
                !local_in_done && sending_pos == sending.len() && !conn.wants_write(),
                held_pos < held.len(),
            ),
        ];
        if fds.iter().all(|f| f.events == 0) {
            return Ok(());
        }
        // SAFETY: polls two valid fds in a local array of its length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 && !interrupted(&std::io::Error::last_os_error()) {
            return Ok(());
        }
    }
}

fn poll_fd(fd: RawFd, read: bool, write: bool) -> libc::pollfd {
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn end<S: NetSocket>(net: &S, local: &UnixStream) {
    net.shutdown_both();
    let _ = local.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA, a server certificate for `localhost` and a client
    /// certificate, made with openssl in a fresh directory (`None` where
    /// openssl is missing).
    fn make_creds(dir: &Path) -> Option<()> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/tls-certs.sh");
        let st = std::process::Command::new("sh")
            .arg(script)
            .arg(dir)
            .arg("localhost")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        st.success().then_some(())
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mig-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Both directions carry bytes at once through the pump, both ends
    /// see the other's close; a client with the wrong name is refused on
    /// both sides with the reason.
    #[test]
    fn sessions_carry_both_ways_and_refuse_a_wrong_name() {
        let d = tmp("pair");
        if make_creds(&d).is_none() {
            eprintln!("openssl unavailable: not testing TLS sessions");
            return;
        }
        let server = Arc::new(TlsCreds::load("s", &d, Endpoint::Server, true).unwrap());
        let client = Arc::new(TlsCreds::load("c", &d, Endpoint::Client, true).unwrap());
        for (name, ok) in [("localhost", true), ("elsewhere", false)] {
            let (a, b) = UnixStream::pair().unwrap();
            let s = server.clone();
            let t = std::thread::spawn(move || super::server(b, &s, "the source"));
            let tc = TlsClient::new(client.clone(), name).unwrap();
            let c = super::client(a, &tc, "the destination");
            let s = t.join().unwrap();
            if !ok {
                // The source's handshake runs in its pump: its first read
                // fails with the reason; the destination's accept failed.
                let (c, failure) = c.unwrap();
                let mut named = Named { inner: c, failure };
                let e = named.read(&mut [0u8; 1]).unwrap_err();
                let text = crate::machine::error_chain(&e);
                assert!(text.contains("not valid for name \"elsewhere\""), "{text}");
                assert!(s.is_err());
                continue;
            }
            let (mut c, mut s) = (c.unwrap().0, s.unwrap().0);
            let data: Vec<u8> = (0..4_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let d2 = data.clone();
            let mut c2 = c.try_clone().unwrap();
            let w = std::thread::spawn(move || {
                c2.write_all(&d2).unwrap();
                c2.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut s2 = s.try_clone().unwrap();
            let back = std::thread::spawn(move || {
                s2.write_all(b"return path").unwrap();
                s2.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            assert!(got == data, "{} bytes arrived of {}", got.len(), data.len());
            let mut rp = Vec::new();
            c.read_to_end(&mut rp).unwrap();
            assert_eq!(rp, b"return path");
            w.join().unwrap();
            back.join().unwrap();
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}

//! Test harness: a `Server` on its own thread with a real `mio::Poll`, a
//! test `Handler`, and sockets in a private temporary directory that is
//! removed when the harness is dropped.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use mio::{Events, Poll, Token, Waker};
use qmp::{BoundAddr, Command, EventSender, ListenSpec, QmpError, Server};
use serde_json::{json, Value};

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A directory removed (with its contents) on drop.
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new() -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "qmp-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TestDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the test `Handler` does: a tiny fake VM.
pub struct TestHandler {
    pub running: bool,
    pub events: EventSender,
}

impl qmp::Handler for TestHandler {
    fn execute(&mut self, cmd: Command) -> Result<Value, QmpError> {
        match cmd {
            Command::QueryStatus => Ok(json!({
                "running": self.running,
                "status": if self.running { "running" } else { "paused" },
            })),
            Command::QueryName => Ok(json!({"name": "test"})),
            Command::Stop => {
                self.running = false;
                self.events.send("STOP", None);
                Ok(json!({}))
            }
            Command::Cont => {
                self.running = true;
                self.events.send("RESUME", None);
                Ok(json!({}))
            }
            Command::HumanMonitorCommand(a) => {
                // "big N": an N-byte reply, for slow/absent readers.
                if let Some(n) = a.command_line.strip_prefix("big ") {
                    let n: usize = n.parse().map_err(|_| QmpError::generic("bad size"))?;
                    Ok(Value::String("x".repeat(n)))
                } else {
                    Ok(Value::String(format!(
                        "unknown command: '{}'\r\n",
                        a.command_line
                    )))
                }
            }
            other => Err(QmpError::generic(format!(
                "{} is not implemented",
                other.name()
            ))),
        }
    }
}

enum Ctl {
    Broadcast(String, Option<Value>),
    Stop,
}

/// A running server thread.
pub struct TestServer {
    pub sock: PathBuf,
    pub tcp: std::net::SocketAddr,
    pub sender: EventSender,
    ctl: mpsc::Sender<Ctl>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    // Dropped last: the socket files live in it.
    _dir: TestDir,
}

impl TestServer {
    pub fn start() -> TestServer {
        let dir = TestDir::new();
        let sock = dir.path().join("qmp.sock");
        let mut poll = Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).expect("waker"));
        let mut server = Server::new(poll.registry(), 10).expect("server");
        let spec = ListenSpec::parse(&format!("unix:{},server=on,wait=off", sock.display()))
            .expect("spec");
        assert_eq!(
            server.listen(&spec).expect("listen"),
            BoundAddr::Unix(sock.clone())
        );
        let tcp = match server
            .listen(&ListenSpec::parse("tcp:127.0.0.1:0,server,nowait").expect("spec"))
            .expect("listen tcp")
        {
            BoundAddr::Tcp(a) => a,
            other => panic!("{other:?}"),
        };
        let sender = server.event_sender();
        let mut handler = TestHandler {
            running: true,
            events: server.event_sender(),
        };
        let (ctl, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut events = Events::with_capacity(64);
            loop {
                poll.poll(&mut events, None).expect("poll");
                for event in events.iter() {
                    if event.token() == Token(0) {
                        while let Ok(c) = rx.try_recv() {
                            match c {
                                Ctl::Broadcast(name, data) => server.broadcast_event(&name, data),
                                Ctl::Stop => {
                                    server.flush_blocking(Duration::from_secs(1));
                                    return;
                                }
                            }
                        }
                    } else if server.owns(event.token()) {
                        server.handle_event(event, &mut handler);
                    } else {
                        panic!("unexpected token {:?}", event.token());
                    }
                }
            }
        });
        TestServer {
            sock,
            tcp,
            sender,
            ctl,
            waker,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Broadcasts from the control thread (`Server::broadcast_event`).
    pub fn broadcast(&self, name: &str, data: Option<Value>) {
        self.ctl
            .send(Ctl::Broadcast(name.into(), data))
            .expect("server thread alive");
        self.waker.wake().expect("wake");
    }

    /// Stops the server thread; panics if it panicked.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.ctl.send(Ctl::Stop);
            let _ = self.waker.wake();
            let r = t.join();
            if !std::thread::panicking() {
                assert!(r.is_ok(), "server thread panicked");
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Number of open file descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

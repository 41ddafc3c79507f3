//! A QMP server with a fake VM behind it, for trying clients by hand:
//!
//! ```text
//! cargo run -p qmp --example fake_vm -- unix:/tmp/q.sock,server=on,wait=off
//! echo '{"execute":"qmp_capabilities"} {"execute":"stop"}' | socat - UNIX-CONNECT:/tmp/q.sock
//! ```
//!
//! It answers `query-status`, `stop`, `cont` (with `STOP`/`RESUME` events)
//! and `quit` (flushes the reply, then exits).

use std::time::Duration;

use mio::{Events, Poll};
use qmp::{Command, EventSender, Handler, ListenSpec, QmpError, Server};
use serde_json::{json, Value};

struct FakeVm {
    running: bool,
    quit: bool,
    events: EventSender,
}

impl Handler for FakeVm {
    fn execute(&mut self, cmd: Command) -> Result<Value, QmpError> {
        match cmd {
            Command::QueryStatus => Ok(json!({
                "running": self.running,
                "status": if self.running { "running" } else { "paused" },
            })),
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
            Command::Quit => {
                self.quit = true;
                self.events.send(
                    "SHUTDOWN",
                    Some(json!({"guest": false, "reason": "host-qmp-quit"})),
                );
                Ok(json!({}))
            }
            other => Err(QmpError::generic(format!(
                "{} is not implemented by fake_vm",
                other.name()
            ))),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let specs: Vec<String> = std::env::args().skip(1).collect();
    if specs.is_empty() {
        return Err("usage: fake_vm QMP-SPEC... (e.g. unix:/tmp/q.sock,server=on,wait=off)".into());
    }
    let mut poll = Poll::new()?;
    let mut server = Server::new(poll.registry(), 1)?;
    for spec in &specs {
        let addr = server.listen(&ListenSpec::parse(spec)?)?;
        eprintln!("listening on {addr:?}");
    }
    let mut vm = FakeVm {
        running: true,
        quit: false,
        events: server.event_sender(),
    };
    let mut events = Events::with_capacity(64);
    while !vm.quit {
        poll.poll(&mut events, None)?;
        for event in events.iter() {
            if server.owns(event.token()) {
                server.handle_event(event, &mut vm);
            }
        }
    }
    server.flush_blocking(Duration::from_secs(1));
    Ok(())
}

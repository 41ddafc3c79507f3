//! 50 clients connecting and leaving must leave the fd count unchanged.
//! Alone in its own test binary, so no other test opens fds meanwhile.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{fd_count, TestServer, TIMEOUT};
use qmp::Client;
use serde_json::{json, Value};

#[test]
fn clients_coming_and_going_leak_no_fds() {
    let ts = TestServer::start();
    // All of the server's own fds exist once it listens.
    let baseline = fd_count();
    let settle = |want: usize| {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let n = fd_count();
            if n == want || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    for i in 0..50 {
        match i % 5 {
            // Negotiate, run a command, leave.
            0 => {
                let mut c = Client::connect_unix(&ts.sock, TIMEOUT).unwrap();
                c.execute("query-status", Value::Null).unwrap();
            }
            // Leave right after the greeting.
            1 => drop(Client::connect_unix_raw(&ts.sock, TIMEOUT).unwrap()),
            // Leave without reading anything.
            2 => drop(UnixStream::connect(&ts.sock).unwrap()),
            // Leave in the middle of a large reply.
            3 => {
                let mut s = UnixStream::connect(&ts.sock).unwrap();
                s.write_all(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"human-monitor-command\", \"arguments\": {\"command-line\": \"big 2000000\"}}").unwrap();
            }
            // Leave in the middle of a request, over TCP.
            _ => {
                let mut c = Client::connect_tcp(ts.tcp, TIMEOUT).unwrap();
                c.send_raw("{\"execute\": \"query-").unwrap();
            }
        }
    }
    // A client still works, then leaves too.
    let mut c = Client::connect_unix(&ts.sock, TIMEOUT).unwrap();
    assert_eq!(c.execute("query-name", json!({})).unwrap()["name"], "test");
    drop(c);
    assert_eq!(settle(baseline), baseline);
    ts.stop();
}

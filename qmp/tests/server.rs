//! The server on a real `mio::Poll` and real sockets, driven by raw sockets
//! and by `qmp::Client`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{TestDir, TestServer, TIMEOUT};
use qmp::{BoundAddr, Client, ClientError, ListenSpec, Server, ServerError};
use serde_json::{json, Value};

fn raw(ts: &TestServer) -> Client {
    Client::connect_unix_raw(&ts.sock, TIMEOUT).expect("connect")
}

fn read(c: &mut Client) -> Value {
    c.read_message(TIMEOUT).expect("message")
}

fn assert_error(msg: &Value, class: &str, desc: &str) {
    assert_eq!(msg["error"]["class"], class, "{msg}");
    let d = msg["error"]["desc"].as_str().unwrap_or("");
    assert!(d.contains(desc), "{msg} lacks {desc:?}");
}

#[test]
fn greeting() {
    let ts = TestServer::start();
    let c = raw(&ts);
    let g = &c.greeting()["QMP"];
    assert!(g["version"]["qemu"]["major"].is_u64());
    assert!(g["version"]["qemu"]["minor"].is_u64());
    assert!(g["version"]["qemu"]["micro"].is_u64());
    assert!(g["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("minivmm "));
    assert_eq!(g["capabilities"], json!([]));
    ts.stop();
}

#[test]
fn negotiation_rules() {
    let ts = TestServer::start();
    let mut c = raw(&ts);
    c.send_raw("{\"execute\": \"query-status\", \"id\": 1}\n")
        .unwrap();
    let m = read(&mut c);
    assert_error(
        &m,
        "CommandNotFound",
        "Expecting capabilities negotiation with 'qmp_capabilities'",
    );
    assert_eq!(m["id"], 1);
    c.send_raw("{\"execute\": \"no-such-command\"}\n").unwrap();
    assert_error(
        &read(&mut c),
        "CommandNotFound",
        "Expecting capabilities negotiation",
    );

    // oob is not offered: an error, and still in negotiation mode.
    c.send_raw(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#)
        .unwrap();
    assert_error(
        &read(&mut c),
        "GenericError",
        "Capability 'oob' not available",
    );
    c.send_raw(r#"{"execute": "query-status"}"#).unwrap();
    assert_error(
        &read(&mut c),
        "CommandNotFound",
        "Expecting capabilities negotiation",
    );

    c.send_raw(r#"{"execute": "qmp_capabilities", "id": "n"}"#)
        .unwrap();
    assert_eq!(read(&mut c), json!({"return": {}, "id": "n"}));
    c.send_raw(r#"{"execute": "qmp_capabilities"}"#).unwrap();
    assert_error(
        &read(&mut c),
        "CommandNotFound",
        "Capabilities negotiation is already complete, command ignored",
    );
    c.send_raw(r#"{"execute": "query-status"}"#).unwrap();
    assert_eq!(read(&mut c)["return"]["status"], "running");
    ts.stop();
}

#[test]
fn id_echo_and_bad_input() {
    let ts = TestServer::start();
    let mut c = Client::connect_unix(&ts.sock, TIMEOUT).unwrap();
    c.send_raw("{\"execute\": \"query-name\", \"id\": {\"x\": [1, \"a\"]}}\r\n")
        .unwrap();
    assert_eq!(
        read(&mut c),
        json!({"return": {"name": "test"}, "id": {"x": [1, "a"]}})
    );
    c.send_raw("{\"execute\": \"nope\", \"id\": 5}\n").unwrap();
    let m = read(&mut c);
    assert_error(&m, "CommandNotFound", "The command nope has not been found");
    assert_eq!(m["id"], 5);
    c.send_raw("{\"execute\": \"query-status\", \"arguments\": {\"x\": 1}, \"id\": 6}\n")
        .unwrap();
    let m = read(&mut c);
    assert_error(&m, "GenericError", "Parameter 'x' is unexpected");
    assert_eq!(m["id"], 6);

    // Parse errors carry no id.
    c.send_raw("{\"execute\": }\n").unwrap();
    let m = read(&mut c);
    assert_error(&m, "GenericError", "JSON parse error");
    assert!(m.get("id").is_none());
    c.send_raw(b"{\"execute\": \"\xff\"}\n").unwrap();
    assert_error(&read(&mut c), "GenericError", "JSON parse error");
    c.send_raw("[1, 2]\n").unwrap();
    assert_error(
        &read(&mut c),
        "GenericError",
        "QMP input must be a JSON object",
    );
    c.send_raw("{\"id\": 9}\n").unwrap();
    let m = read(&mut c);
    assert_error(&m, "GenericError", "QMP input lacks member 'execute'");
    assert_eq!(m["id"], 9);
    c.send_raw("{\"execute\": \"stop\", \"foo\": 1}\n").unwrap();
    assert_error(
        &read(&mut c),
        "GenericError",
        "QMP input member 'foo' is unexpected",
    );
    c.send_raw("{\"exec-oob\": \"stop\"}\n").unwrap();
    assert_error(&read(&mut c), "GenericError", "out-of-band");

    // Several values on one line, one value over several writes.
    c.send_raw(
        "{\"execute\": \"query-name\", \"id\": 1}{\"execute\": \"query-status\", \"id\": 2}\n",
    )
    .unwrap();
    assert_eq!(read(&mut c)["id"], 1);
    assert_eq!(read(&mut c)["id"], 2);
    c.send_raw("{\"execute\": \"query-").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    c.send_raw("name\", \"id\": 3}").unwrap();
    assert_eq!(read(&mut c), json!({"return": {"name": "test"}, "id": 3}));
    ts.stop();
}

#[test]
fn server_answers_version_and_commands() {
    let ts = TestServer::start();
    let mut c = Client::connect_unix(&ts.sock, TIMEOUT).unwrap();
    let v = c.execute("query-version", Value::Null).unwrap();
    assert_eq!(v, c.greeting()["QMP"]["version"]);
    let cmds = c.execute("query-commands", json!({})).unwrap();
    let names: Vec<&str> = cmds
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, qmp::COMMAND_NAMES);
    ts.stop();
}

#[test]
fn events_only_after_negotiation() {
    let ts = TestServer::start();
    let mut a = raw(&ts);
    let mut b = Client::connect_unix(&ts.sock, TIMEOUT).unwrap();
    ts.broadcast("EARLY", Some(json!({"n": 1})));
    let e = b.wait_event("EARLY", |_| true, TIMEOUT).unwrap();
    assert_eq!(e["data"]["n"], 1);
    assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 0);

    // `a` negotiates now: the first thing it reads is the reply, not EARLY.
    a.send_raw("{\"execute\": \"qmp_capabilities\"}\n").unwrap();
    assert_eq!(read(&mut a), json!({"return": {}}));
    ts.broadcast("LATE", None);
    let m = read(&mut a);
    assert_eq!(m["event"], "LATE");
    assert!(m.get("data").is_none());

    // Events from other threads, through EventSender.
    let sender = ts.sender.clone();
    std::thread::spawn(move || sender.send("MIGRATION", Some(json!({"status": "completed"}))))
        .join()
        .unwrap();
    assert_eq!(read(&mut a)["data"]["status"], "completed");
    ts.stop();
}

#[test]
fn events_raised_by_a_command_precede_its_reply() {
    let ts = TestServer::start();
    let mut c = Client::connect_unix(&ts.sock, TIMEOUT).unwrap();
    c.send_raw("{\"execute\": \"stop\", \"id\": 1}\n").unwrap();
    assert_eq!(read(&mut c)["event"], "STOP");
    assert_eq!(read(&mut c), json!({"return": {}, "id": 1}));
    // Through Client::execute the event is queued for wait_event.
    c.execute("cont", json!({})).unwrap();
    c.wait_event("RESUME", |_| true, Duration::from_millis(1))
        .unwrap();
    ts.stop();
}

#[test]
fn client_round_trip() {
    let ts = TestServer::start();
    let mut c = Client::connect_unix(&ts.sock, TIMEOUT).unwrap();
    assert_eq!(
        c.execute("query-status", Value::Null).unwrap(),
        json!({"running": true, "status": "running"})
    );
    match c.execute("bogus", json!({})) {
        Err(ClientError::Qmp { class, desc }) => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("bogus"));
        }
        other => panic!("{other:?}"),
    }
    match c.execute("pmemsave", json!({"val": 0, "size": "x", "filename": "f"})) {
        Err(ClientError::Qmp { class, desc }) => {
            assert_eq!(class, "GenericError");
            assert!(desc.contains("Invalid parameter type for 'size', expected: integer"));
        }
        other => panic!("{other:?}"),
    }
    match c.execute("migrate", json!({"uri": "tcp:0:1"})) {
        Err(ClientError::Qmp { desc, .. }) => assert!(desc.contains("not implemented")),
        other => panic!("{other:?}"),
    }
    ts.broadcast("MIGRATION", Some(json!({"status": "active"})));
    ts.broadcast("MIGRATION_PASS", Some(json!({"pass": 1})));
    ts.broadcast("MIGRATION", Some(json!({"status": "completed"})));
    let e = c
        .wait_event("MIGRATION", |e| e["data"]["status"] == "completed", TIMEOUT)
        .unwrap();
    assert_eq!(e["event"], "MIGRATION");
    // The events passed over are kept, in order.
    let rest = c.take_events();
    let names: Vec<&str> = rest.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(names, ["MIGRATION", "MIGRATION_PASS"]);
    assert!(matches!(
        c.wait_event("NEVER", |_| true, Duration::from_millis(50)),
        Err(ClientError::NoEvent { ref event, .. }) if event == "NEVER"
    ));

    let mut t = Client::connect_tcp(ts.tcp, TIMEOUT).unwrap();
    assert_eq!(
        t.execute("query-name", Value::Null).unwrap()["name"],
        "test"
    );
    ts.stop();
}

#[test]
fn half_closed_client_gets_its_replies() {
    // What `echo ... | socat - UNIX-CONNECT:...` does.
    let ts = TestServer::start();
    let mut s = UnixStream::connect(&ts.sock).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-status\"}\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let lines: Vec<&str> = out.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].contains("\"QMP\""));
    // QEMU's spacing, which shell scripts grep for.
    assert_eq!(lines[1], "{\"return\": {}}");
    assert!(lines[2].contains("\"running\": true"), "{out}");
    ts.stop();
}

#[test]
fn oversized_input_closes_only_that_client() {
    let ts = TestServer::start();
    let mut good = Client::connect_unix(&ts.sock, TIMEOUT).unwrap();
    let mut bad = Client::connect_unix(&ts.sock, TIMEOUT).unwrap();
    let mut line = b"{\"execute\": \"query-status\", \"arguments\": {\"x\": \"".to_vec();
    line.resize(5 << 20, b'a');
    bad.send_raw(&line).unwrap();
    let m = read(&mut bad);
    assert_error(&m, "GenericError", "JSON parse error");
    assert!(m["error"]["desc"].as_str().unwrap().contains("1048576"));
    assert!(matches!(
        bad.read_message(TIMEOUT),
        Err(ClientError::Closed)
    ));
    drop(bad);
    assert_eq!(
        good.execute("query-status", Value::Null).unwrap()["running"],
        true
    );
    ts.stop();
}

#[test]
fn client_leaving_mid_reply() {
    let ts = TestServer::start();
    for _ in 0..3 {
        let mut s = UnixStream::connect(&ts.sock).unwrap();
        s.write_all(
            b"{\"execute\": \"qmp_capabilities\"}\n\
              {\"execute\": \"human-monitor-command\", \"arguments\": {\"command-line\": \"big 8000000\"}}\n",
        )
        .unwrap();
        let mut buf = [0u8; 4096];
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let _ = s.read(&mut buf).unwrap();
        drop(s);
    }
    // And one that leaves before reading anything.
    let mut s = UnixStream::connect(&ts.sock).unwrap();
    s.write_all(
        b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"human-monitor-command\", \"arguments\": {\"command-line\": \"big 3000000\"}}",
    )
    .unwrap();
    drop(s);
    let mut c = Client::connect_unix(&ts.sock, TIMEOUT).unwrap();
    let big = c
        .execute(
            "human-monitor-command",
            json!({"command-line": "big 3000000"}),
        )
        .unwrap();
    assert_eq!(big.as_str().unwrap().len(), 3_000_000);
    ts.stop(); // panics if the server thread panicked
}

#[test]
fn client_that_never_reads_is_dropped() {
    let ts = TestServer::start();
    let mut lazy = Client::connect_unix(&ts.sock, TIMEOUT).unwrap();
    let mut busy = Client::connect_unix(&ts.sock, TIMEOUT).unwrap();
    let blob = "e".repeat(256 << 10);
    // 64 × 256 KiB = 16 MiB of events, twice the backlog cap.
    for i in 0..64 {
        ts.broadcast("BLOB", Some(json!({"i": i, "blob": blob})));
        // `busy` keeps up.
        let e = busy.wait_event("BLOB", |_| true, TIMEOUT).unwrap();
        assert_eq!(e["data"]["i"], i);
    }
    // `lazy` finds what was buffered for it, then the end of the connection.
    let mut seen = 0;
    loop {
        match lazy.read_message(TIMEOUT) {
            Ok(_) => seen += 1,
            // The last message may be cut short by the disconnection.
            Err(ClientError::Closed | ClientError::Protocol(_)) => break,
            Err(e) => panic!("after {seen} events: {e}"),
        }
    }
    assert!(seen < 64, "{seen}");
    assert_eq!(
        busy.execute("query-status", Value::Null).unwrap()["running"],
        true
    );
    ts.stop();
}

#[test]
fn unix_socket_files() {
    let dir = TestDir::new();
    let path = dir.path().join("q.sock");
    let poll = mio::Poll::new().unwrap();
    let spec = ListenSpec::Unix(path.clone());

    // A stale socket file (its listener is gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let mut server = Server::new(poll.registry(), 1).unwrap();
    assert_eq!(server.listen(&spec).unwrap(), BoundAddr::Unix(path.clone()));
    assert_eq!(server.bound_addrs(), vec![BoundAddr::Unix(path.clone())]);

    // A live one is not.
    let mut other = Server::new(poll.registry(), 100).unwrap();
    assert!(matches!(other.listen(&spec), Err(ServerError::InUse(_))));
    drop(other);
    assert!(path.exists());

    // Dropping the server removes its socket file.
    drop(server);
    assert!(!path.exists());

    // A regular file is never removed.
    std::fs::write(&path, b"data").unwrap();
    let mut server = Server::new(poll.registry(), 1).unwrap();
    let e = server.listen(&spec).unwrap_err();
    assert!(matches!(e, ServerError::NotASocket(_)), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}

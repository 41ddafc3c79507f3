//! QMP (issue 3) against real minivmm processes: the protocol and its error
//! cases, many and misbehaving clients, the commands on a paused and on a
//! running guest, and the clients people use with QEMU (`qmp-shell` from
//! PyPI's qemu.qmp, `socat`).
//!
//! Protocol tests start minivmm with `-S` (the guest never runs: no boot
//! needed). Tests on a running guest start from a saved, booted guest
//! (`snapshot()`, `-incoming file:`), so they do not pay for a boot each.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::*;

/// A paused minivmm (`-S`): QMP works, the guest never runs.
fn paused(name: &str) -> Vmm {
    VmmBuilder::new(name).arg("-S").spawn()
}

/// A running guest restored from the booted-guest snapshot shared with the
/// other e2e tests (same size, vCPUs and command line), past its next PASS.
fn running(name: &str) -> Vmm {
    let b = VmmBuilder::new(name).smp(2);
    let snap = snapshot(&b);
    let vm = b.incoming(&format!("file:{}", snap.display())).spawn();
    vm.wait_pass_beyond(2, boot_timeout());
    vm
}

/// A connection that has read the greeting but not negotiated.
fn raw(vm: &mut Vmm) -> Client {
    // Vmm::qmp waits for the socket; a negotiated client proves it is up.
    drop(vm.qmp());
    Client::connect_unix_raw(vm.qmp_path(), qmp_timeout()).expect("connect")
}

/// Send one line, return the next message.
fn ask(c: &mut Client, line: &str) -> Value {
    c.send_raw(format!("{line}\n")).expect("send");
    c.read_message(qmp_timeout()).expect("reply")
}

/// The error class of an error reply (panics on anything else).
fn error_class(reply: &Value) -> &str {
    reply["error"]["class"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error reply: {reply}"))
}

fn error_desc(reply: &Value) -> &str {
    reply["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("error reply without desc: {reply}"))
}

/// The connection still answers commands.
fn assert_alive(c: &mut Client) {
    let r = ask(c, r#"{"execute": "query-status", "id": "alive"}"#);
    assert_eq!(r["id"], "alive", "{r}");
    assert!(r["return"]["status"].is_string(), "{r}");
}

/// Wait until minivmm's fd count is back to `baseline` (closing happens
/// asynchronously in its event loop).
fn assert_fds_back_to(vm: &Vmm, baseline: usize) {
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    loop {
        let n = fd_count(vm.pid());
        if n <= baseline {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "minivmm has {n} fds, {baseline} before the clients came and went"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn greeting_shape() {
    if !kvm_available("greeting_shape") {
        return;
    }
    let mut vm = paused("greet");
    drop(vm.qmp());
    let mut s = UnixStream::connect(vm.qmp_path()).expect("connect");
    s.set_read_timeout(Some(qmp_timeout())).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        assert_eq!(s.read(&mut b).expect("read greeting"), 1, "closed");
        line.push(b[0]);
    }
    assert!(line.ends_with(b"\r\n"), "QMP lines end with CRLF");
    let g: Value = serde_json::from_slice(&line).expect("greeting is JSON");
    let obj = g.as_object().expect("greeting is an object");
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["QMP"], "{g}");
    let v = &g["QMP"]["version"];
    for k in ["major", "minor", "micro"] {
        assert!(v["qemu"][k].is_u64(), "version.qemu.{k} in {g}");
    }
    assert!(v["package"].is_string(), "{g}");
    assert!(g["QMP"]["capabilities"].is_array(), "{g}");
}

#[test]
fn commands_before_negotiation_are_refused() {
    if !kvm_available("commands_before_negotiation_are_refused") {
        return;
    }
    let mut vm = paused("preneg");
    let mut c = raw(&mut vm);
    let r = ask(&mut c, r#"{"execute": "query-status", "id": 7}"#);
    assert_eq!(error_class(&r), "CommandNotFound", "{r}");
    assert!(error_desc(&r).contains("qmp_capabilities"), "{r}");
    assert_eq!(r["id"], 7, "{r}");
    let r = ask(&mut c, r#"{"execute": "stop"}"#);
    assert_eq!(error_class(&r), "CommandNotFound", "{r}");
    let r = ask(&mut c, r#"{"execute": "qmp_capabilities", "id": "neg"}"#);
    assert_eq!(r, json!({"return": {}, "id": "neg"}));
    assert_alive(&mut c);
    // A second negotiation is refused (as QEMU does), the session goes on.
    let r = ask(&mut c, r#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(error_class(&r), "CommandNotFound", "{r}");
    assert_alive(&mut c);
}

#[test]
fn malformed_json_is_a_generic_error() {
    if !kvm_available("malformed_json_is_a_generic_error") {
        return;
    }
    let mut vm = paused("badjson");
    let mut c = vm.qmp();
    for bad in [
        r#"{"execute": }"#,
        r#"{"execute" "stop"}"#,
        r#"{'execute': 'stop'}"#,
    ] {
        let r = ask(&mut c, bad);
        assert_eq!(error_class(&r), "GenericError", "{bad} → {r}");
        assert!(r.get("id").is_none(), "{r}");
        assert_alive(&mut c);
    }
    assert_eq!(run_state(&mut c), "prelaunch");
}

#[test]
fn non_object_input_is_refused() {
    if !kvm_available("non_object_input_is_refused") {
        return;
    }
    let mut vm = paused("nonobj");
    let mut c = vm.qmp();
    for bad in [r#"[1, 2]"#, r#""query-status""#, "42"] {
        let r = ask(&mut c, bad);
        assert_eq!(error_class(&r), "GenericError", "{bad} → {r}");
        assert!(
            error_desc(&r).contains("object"),
            "{bad}: the error does not say an object is expected: {r}"
        );
        assert_alive(&mut c);
    }
}

#[test]
fn missing_execute_is_refused() {
    if !kvm_available("missing_execute_is_refused") {
        return;
    }
    let mut vm = paused("noexec");
    let mut c = vm.qmp();
    let r = ask(&mut c, r#"{"arguments": {}, "id": 3}"#);
    assert_eq!(error_class(&r), "GenericError", "{r}");
    assert!(error_desc(&r).contains("execute"), "{r}");
    assert_eq!(r["id"], 3, "{r}");
    let r = ask(&mut c, r#"{"execute": 5}"#);
    assert_eq!(error_class(&r), "GenericError", "{r}");
    assert_alive(&mut c);
}

#[test]
fn unknown_command_is_command_not_found() {
    if !kvm_available("unknown_command_is_command_not_found") {
        return;
    }
    let mut vm = paused("unknown");
    let mut c = vm.qmp();
    match c.execute("no-such-command", json!({})) {
        Err(ClientError::Qmp { class, desc }) => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        r => panic!("unknown command: {r:?}"),
    }
    assert_alive(&mut c);
}

#[test]
fn bad_arguments_are_generic_errors() {
    if !kvm_available("bad_arguments_are_generic_errors") {
        return;
    }
    let mut vm = paused("badargs");
    let mut c = vm.qmp();
    let cases = [
        ("query-status", json!({"foo": 1}), "'foo'"),
        ("stop", json!({"now": true}), "'now'"),
        (
            "pmemsave",
            json!({"val": "zero", "size": 4096, "filename": "/dev/null"}),
            "'val'",
        ),
        (
            "pmemsave",
            json!({"val": 0, "size": -1, "filename": "/dev/null"}),
            "'size'",
        ),
        ("pmemsave", json!({"val": 0, "size": 4096}), "'filename'"),
        (
            "human-monitor-command",
            json!({"command-line": 5}),
            "'command-line'",
        ),
    ];
    for (cmd, args, names) in cases {
        match c.execute(cmd, args.clone()) {
            Err(ClientError::Qmp { class, desc }) => {
                assert_eq!(class, "GenericError", "{cmd} {args}: {desc}");
                assert!(desc.contains(names), "{cmd} {args}: {desc}");
            }
            r => panic!("{cmd} {args}: {r:?}"),
        }
    }
    let r = ask(&mut c, r#"{"execute": "stop", "arguments": [1]}"#);
    assert_eq!(error_class(&r), "GenericError", "{r}");
    assert_alive(&mut c);
}

/// The postcopy recovery commands outside a paused postcopy, and an
/// `x-peer-timeout` out of range, are refused with QEMU's words (or
/// minivmm's, for its own parameter); the VMM goes on answering.
#[test]
fn recovery_commands_without_a_paused_postcopy_are_refused() {
    if !kvm_available("recovery_commands_without_a_paused_postcopy_are_refused") {
        return;
    }
    let mut vm = paused("recover");
    let mut c = vm.qmp();
    let cases = [
        (
            "migrate",
            json!({"uri": "tcp:127.0.0.1:1", "resume": true}),
            "Cannot resume if there is no paused migration",
        ),
        (
            "migrate-recover",
            json!({"uri": "tcp:127.0.0.1:0"}),
            "Migrate recover can only be run when postcopy is paused.",
        ),
        (
            "migrate-pause",
            json!({}),
            "migrate-pause is currently only supported during postcopy-active",
        ),
        (
            "migrate-set-parameters",
            json!({"x-peer-timeout": 999}),
            "Parameter 'x_peer_timeout' expects an integer in the range of 1000 to 3600000",
        ),
    ];
    for (cmd, args, want) in cases {
        match c.execute(cmd, args.clone()) {
            Err(ClientError::Qmp { class, desc }) => {
                assert_eq!(class, "GenericError", "{cmd} {args}: {desc}");
                assert!(desc.contains(want), "{cmd} {args}: {desc}");
            }
            r => panic!("{cmd} {args}: {r:?}"),
        }
    }
    let p = c.execute("query-migrate-parameters", json!({})).unwrap();
    assert_eq!(p["x-peer-timeout"], 20_000, "{p}");
    assert_eq!(run_state(&mut c), "prelaunch");
}

#[test]
fn id_is_echoed() {
    if !kvm_available("id_is_echoed") {
        return;
    }
    let mut vm = paused("ids");
    let mut c = vm.qmp();
    for id in [json!(1), json!("abc"), json!({"n": [1, 2]}), json!(null)] {
        let req = json!({"execute": "query-status", "id": id});
        let r = ask(&mut c, &req.to_string());
        assert_eq!(r["id"], id, "{r}");
        assert!(r.get("return").is_some(), "{r}");
        let req = json!({"execute": "nope", "id": id});
        let r = ask(&mut c, &req.to_string());
        assert_eq!(r["id"], id, "{r}");
        assert_eq!(error_class(&r), "CommandNotFound");
    }
    let r = ask(&mut c, r#"{"execute": "query-status"}"#);
    assert!(r.get("id").is_none(), "no id sent, none expected: {r}");
}

/// A multi-MiB line without a newline closes that connection only.
#[test]
fn oversized_input_closes_only_that_connection() {
    if !kvm_available("oversized_input_closes_only_that_connection") {
        return;
    }
    let mut vm = paused("huge");
    let mut other = vm.qmp();
    let mut c = vm.qmp();
    let mut big = br#"{"execute": "query-status", "arguments": {"x": ""#.to_vec();
    big.resize(big.len() + (6 << 20), b'a');
    // The server may close while we are still writing: that is fine.
    let _ = c.send_raw(&big);
    let deadline = Instant::now() + qmp_timeout();
    loop {
        match c.read_message(qmp_timeout()) {
            Ok(m) => assert!(m.get("error").is_some(), "unexpected message {m}"),
            Err(ClientError::Closed) | Err(ClientError::Io(_)) => break,
            Err(e) => panic!("the connection was not closed: {e}"),
        }
        assert!(Instant::now() < deadline, "never closed");
    }
    assert_alive(&mut other);
    let mut fresh = vm.qmp();
    assert_alive(&mut fresh);
    assert!(vm.exited().is_none());
}

/// Clients that go away with replies pending, or while reading them.
#[test]
fn client_disconnecting_mid_reply() {
    if !kvm_available("client_disconnecting_mid_reply") {
        return;
    }
    let mut vm = paused("midreply");
    let mut monitor = vm.qmp();
    assert_alive(&mut monitor);
    let baseline = fd_count(vm.pid());
    let many: String = (0..3000)
        .map(|i| format!("{{\"execute\": \"query-commands\", \"id\": {i}}}\n"))
        .collect();
    for _ in 0..5 {
        let mut s = UnixStream::connect(vm.qmp_path()).expect("connect");
        s.set_write_timeout(Some(qmp_timeout())).unwrap();
        s.set_read_timeout(Some(qmp_timeout())).unwrap();
        s.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
            .unwrap();
        // Megabytes of replies are queued; read a few bytes of them and go.
        let _ = s.write_all(many.as_bytes());
        let mut buf = [0u8; 300];
        let _ = s.read(&mut buf);
        drop(s);
    }
    assert_alive(&mut monitor);
    assert_fds_back_to(&vm, baseline);
    assert!(vm.exited().is_none());
}

/// 50 clients come and go (one after the other, then all at once): the
/// process ends with the fds it had, and the other client works throughout.
#[test]
fn fifty_clients_leave_no_fds_behind() {
    if !kvm_available("fifty_clients_leave_no_fds_behind") {
        return;
    }
    let mut vm = paused("fifty");
    let mut monitor = vm.qmp();
    assert_alive(&mut monitor);
    let baseline = fd_count(vm.pid());
    for i in 0..50 {
        match i % 3 {
            // Connect and leave before reading anything.
            0 => drop(UnixStream::connect(vm.qmp_path()).expect("connect")),
            // Read the greeting only.
            1 => drop(Client::connect_unix_raw(vm.qmp_path(), qmp_timeout()).expect("greeting")),
            // A full session.
            _ => {
                let mut c = vm.qmp();
                assert_alive(&mut c);
            }
        }
    }
    assert_alive(&mut monitor);
    assert_fds_back_to(&vm, baseline);

    let mut all: Vec<Client> = (0..50).map(|_| vm.qmp()).collect();
    for c in all.iter_mut().step_by(7) {
        assert_alive(c);
    }
    assert!(fd_count(vm.pid()) >= baseline + 50);
    // An event reaches all of them.
    monitor.execute("cont", json!({})).expect("cont");
    for c in all.iter_mut() {
        c.wait_event("RESUME", |_| true, qmp_timeout())
            .expect("RESUME on every client");
    }
    drop(all);
    assert_alive(&mut monitor);
    assert_fds_back_to(&vm, baseline);
}

/// Events go to negotiated clients only, and to all of them.
#[test]
fn events_only_after_negotiation() {
    if !kvm_available("events_only_after_negotiation") {
        return;
    }
    let mut vm = paused("events");
    let mut late = raw(&mut vm);
    let mut b = vm.qmp();
    assert_eq!(run_state(&mut b), "prelaunch");
    b.execute("cont", json!({})).expect("cont");
    let ev = b.wait_event("RESUME", |_| true, qmp_timeout()).unwrap();
    let ts = &ev["timestamp"];
    assert!(
        ts["seconds"].as_u64().unwrap() > 1_600_000_000
            && ts["microseconds"].as_u64().unwrap() < 1_000_000,
        "{ev}"
    );
    assert_eq!(run_state(&mut b), "running");
    b.execute("stop", json!({})).expect("stop");
    b.wait_event("STOP", |_| true, qmp_timeout()).unwrap();
    assert_eq!(run_state(&mut b), "paused");

    // Nothing was queued for the client that had not negotiated: the first
    // thing it reads is its own reply.
    let r = ask(&mut late, r#"{"execute": "qmp_capabilities", "id": 1}"#);
    assert_eq!(r, json!({"return": {}, "id": 1}));
    b.execute("cont", json!({})).expect("cont");
    for c in [&mut late, &mut b] {
        c.wait_event("RESUME", |_| true, qmp_timeout())
            .expect("RESUME on both clients");
    }
}

/// `stop`, `cont`, `query-status` and HMP `info status` on a running guest,
/// with a second client seeing the events.
#[test]
fn stop_cont_on_running_guest() {
    if !kvm_available("stop_cont_on_running_guest") {
        return;
    }
    let mut vm = running("stopcont");
    let mut a = vm.qmp();
    let mut b = vm.qmp();
    let st = a.execute("query-status", json!({})).unwrap();
    assert_eq!(st, json!({"running": true, "status": "running"}));
    let hmp = |c: &mut Client| {
        c.execute(
            "human-monitor-command",
            json!({"command-line": "info status"}),
        )
        .expect("info status")
        .as_str()
        .expect("HMP output is a string")
        .to_string()
    };
    assert_eq!(hmp(&mut a), "VM status: running\r\n");

    a.execute("stop", json!({})).expect("stop");
    for c in [&mut a, &mut b] {
        c.wait_event("STOP", |_| true, qmp_timeout()).expect("STOP");
    }
    let st = b.execute("query-status", json!({})).unwrap();
    assert_eq!(st, json!({"running": false, "status": "paused"}));
    assert_eq!(hmp(&mut b), "VM status: paused\r\n");
    // stop on a stopped guest: no error, no event.
    a.execute("stop", json!({})).expect("stop again");

    let last = *vm.passes().last().unwrap_or(&0);
    b.execute("cont", json!({})).expect("cont");
    for c in [&mut a, &mut b] {
        c.wait_event("RESUME", |_| true, qmp_timeout())
            .expect("RESUME");
    }
    assert!(a.take_events().iter().all(|e| e["event"] != "STOP"));
    assert_eq!(run_state(&mut a), "running");
    vm.wait_pass_beyond(last, boot_timeout());
    vm.assert_no_corrupt();
}

/// `system_reset` reboots the guest: RESET, then the guest boots again.
#[test]
fn system_reset_reboots_guest() {
    if !kvm_available("system_reset_reboots_guest") {
        return;
    }
    let mut vm = running("reset");
    let mut c = vm.qmp();
    // A restored guest never printed GUEST-READY: one after the reset is new.
    assert!(!vm.serial.text().contains("GUEST-READY"));
    c.execute("system_reset", json!({})).expect("system_reset");
    let ev = c
        .wait_event("RESET", |_| true, qmp_timeout())
        .expect("RESET");
    assert_eq!(ev["data"]["guest"], false, "{ev}");
    vm.wait_serial("GUEST-READY", boot_timeout());
    assert_eq!(run_state(&mut c), "running");
    assert!(vm.exited().is_none());
}

/// `quit` ends minivmm with status 0 after a SHUTDOWN event.
#[test]
fn quit_exits_zero() {
    if !kvm_available("quit_exits_zero") {
        return;
    }
    let mut vm = running("quit");
    let mut watcher = vm.qmp();
    let mut c = vm.qmp();
    assert_eq!(c.execute("quit", json!({})).expect("quit"), json!({}));
    let ev = watcher
        .wait_event("SHUTDOWN", |_| true, qmp_timeout())
        .expect("SHUTDOWN");
    assert_eq!(ev["data"]["guest"], false, "{ev}");
    assert_eq!(ev["data"]["reason"], "host-qmp-quit", "{ev}");
    let st = vm.wait_exit(qmp_timeout());
    assert_eq!(st.code(), Some(0), "{st}\n{}", vm.stderr.text());
    assert!(!vm.stderr.text().contains("panicked"));
    assert!(matches!(
        watcher.read_message(qmp_timeout()),
        Err(ClientError::Closed) | Err(ClientError::Io(_))
    ));
}

/// The first PT_LOAD segment of an ELF64 file: (guest-physical address, bytes).
fn first_load_segment(elf: &[u8]) -> Option<(u64, &[u8])> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let (phoff, phentsize, phnum) = (u64_at(0x20)? as usize, u16_at(0x36)?, u16_at(0x38)?);
    (0..phnum as usize)
        .map(|i| phoff + i * phentsize as usize)
        .filter(|&ph| u32_at(ph) == Some(1))
        .filter_map(|ph| {
            let (off, paddr, filesz) = (u64_at(ph + 8)?, u64_at(ph + 0x18)?, u64_at(ph + 0x20)?);
            Some((paddr, elf.get(off as usize..(off + filesz) as usize)?))
        })
        .min_by_key(|&(paddr, _)| paddr)
}

/// pmemsave writes exactly `size` bytes of guest memory: at the kernel's
/// load address, the kernel image's bytes.
#[test]
fn pmemsave_writes_exactly_size_bytes() {
    if !kvm_available("pmemsave_writes_exactly_size_bytes") {
        return;
    }
    let mut vm = paused("pmem");
    let mut c = vm.qmp();
    let elf = std::fs::read(kernel()).expect("read kernel");
    let (addr, bytes) = first_load_segment(&elf).expect("the test kernel is an ELF vmlinux");
    for size in [1u64, 4096, 3 * 4096 + 17, 1 << 20] {
        let f = vm.dir.path(&format!("dump-{size}"));
        c.execute(
            "pmemsave",
            json!({"val": addr, "size": size, "filename": f.display().to_string()}),
        )
        .expect("pmemsave");
        let data = std::fs::read(&f).expect("dump file");
        assert_eq!(data.len() as u64, size, "pmemsave size {size}");
        let n = (size as usize).min(bytes.len());
        assert!(
            data[..n] == bytes[..n],
            "pmemsave at {addr:#x} is not the kernel image"
        );
    }
    // Past the end of RAM (128 MiB): refused.
    let f = vm.dir.path("beyond");
    let r = c.execute(
        "pmemsave",
        json!({"val": (128u64 << 20) - 4096, "size": 8192, "filename": f.display().to_string()}),
    );
    assert!(
        matches!(r, Err(ClientError::Qmp { ref class, .. }) if class == "GenericError"),
        "{r:?}"
    );
    // An unwritable file: refused with the file named.
    match c.execute(
        "pmemsave",
        json!({"val": 0, "size": 4096, "filename": "/nonexistent-dir/x"}),
    ) {
        Err(ClientError::Qmp { class, desc }) => {
            assert_eq!(class, "GenericError");
            assert!(desc.contains("/nonexistent-dir/x"), "{desc}");
        }
        r => panic!("{r:?}"),
    }
    assert_alive(&mut c);
}

/// The query commands and HMP on a paused VM.
#[test]
fn queries_and_hmp() {
    if !kvm_available("queries_and_hmp") {
        return;
    }
    let mut vm = VmmBuilder::new("queries")
        .smp(2)
        .arg("-S")
        .arg("-name")
        .arg("guest=vm-one")
        .spawn();
    let mut c = vm.qmp();
    assert_eq!(
        c.execute("query-status", json!({})).unwrap(),
        json!({"running": false, "status": "prelaunch"})
    );
    assert_eq!(
        c.execute("query-name", json!({})).unwrap(),
        json!({"name": "vm-one"})
    );
    let v = c.execute("query-version", json!({})).unwrap();
    assert!(
        v["qemu"]["major"].is_u64() && v["package"].is_string(),
        "{v}"
    );
    let cmds = c.execute("query-commands", json!({})).unwrap();
    let names: Vec<&str> = cmds
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for n in [
        "qmp_capabilities",
        "query-status",
        "stop",
        "cont",
        "quit",
        "system_reset",
        "query-cpus-fast",
        "query-name",
        "pmemsave",
        "human-monitor-command",
        "query-version",
        "query-commands",
        "migrate",
        "query-migrate",
    ] {
        assert!(names.contains(&n), "query-commands lacks {n}: {names:?}");
    }
    let cpus = c.execute("query-cpus-fast", json!({})).unwrap();
    let cpus = cpus.as_array().expect("array");
    assert_eq!(cpus.len(), 2, "{cpus:?}");
    for (i, cpu) in cpus.iter().enumerate() {
        assert_eq!(cpu["cpu-index"], i, "{cpu}");
    }
    let hmp = |c: &mut Client, line: &str| {
        c.execute("human-monitor-command", json!({"command-line": line}))
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .as_str()
            .expect("string")
            .to_string()
    };
    assert!(hmp(&mut c, "info status").starts_with("VM status: paused"));
    let q = &v["qemu"];
    let version = format!("{}.{}.{}", q["major"], q["minor"], q["micro"]);
    assert!(hmp(&mut c, "info version").contains(&version));
    assert!(hmp(&mut c, "info name").contains("vm-one"));
    assert!(hmp(&mut c, "info nonsense").contains("unknown"));
}

/// Several `-qmp` options (unix and tcp, both spellings); events reach
/// clients on every listener.
#[test]
fn several_listeners_unix_and_tcp() {
    if !kvm_available("several_listeners_unix_and_tcp") {
        return;
    }
    let port = free_port();
    let dir = WorkDir::new("listen");
    let second = dir.path("second.qmp");
    let mut vm = VmmBuilder::new("listen")
        .arg("-S")
        .arg("-qmp")
        .arg(&format!("tcp:127.0.0.1:{port},server=on,wait=off"))
        .arg("-qmp")
        .arg(&format!("unix:{},server,nowait", second.display()))
        .spawn();
    let mut u = vm.qmp();
    let mut t = Client::connect_tcp(("127.0.0.1", port), qmp_timeout()).expect("tcp QMP");
    let mut u2 = Client::connect_unix(&second, qmp_timeout()).expect("second unix QMP");
    assert_eq!(run_state(&mut t), "prelaunch");
    t.execute("cont", json!({})).expect("cont over tcp");
    for c in [&mut u, &mut t, &mut u2] {
        c.wait_event("RESUME", |_| true, qmp_timeout())
            .expect("RESUME");
    }
    u2.execute("stop", json!({})).expect("stop");
    for c in [&mut u, &mut t, &mut u2] {
        c.wait_event("STOP", |_| true, qmp_timeout()).expect("STOP");
    }
}

/// Lines `(QEMU) {...}` of qmp-shell's output, as JSON.
fn qmp_shell_replies(out: &str) -> Vec<Value> {
    out.split("(QEMU) ")
        .filter_map(|chunk| {
            let chunk = chunk.trim();
            chunk
                .starts_with('{')
                .then(|| serde_json::from_str(chunk).ok())
                .flatten()
        })
        .collect()
}

/// PyPI's `qmp-shell` (qemu.qmp, installed by ./setup.sh into .venv) runs
/// query-status, stop and cont against minivmm.
#[test]
fn qmp_shell_drives_minivmm() {
    if !kvm_available("qmp_shell_drives_minivmm") {
        return;
    }
    let shell = venv_tool("qmp-shell");
    let mut vm = running("qmpshell");
    let mut watch = vm.qmp();
    let sock = vm.qmp_path();
    let out = run_program(
        &shell,
        &[sock.to_str().unwrap()],
        Some(b"query-status\nstop\nquery-status\ncont\nquery-status\n"),
        qmp_timeout(),
    );
    assert!(out.status.success(), "qmp-shell failed: {out:?}");
    let replies = qmp_shell_replies(&out.stdout);
    assert_eq!(
        replies,
        vec![
            json!({"return": {"running": true, "status": "running"}}),
            json!({"return": {}}),
            json!({"return": {"running": false, "status": "paused"}}),
            json!({"return": {}}),
            json!({"return": {"running": true, "status": "running"}}),
        ],
        "qmp-shell output:\n{}",
        out.stdout
    );
    watch
        .wait_event("STOP", |_| true, qmp_timeout())
        .expect("STOP");
    watch
        .wait_event("RESUME", |_| true, qmp_timeout())
        .expect("RESUME");
    let last = *vm.passes().last().unwrap_or(&0);
    vm.wait_pass_beyond(last, boot_timeout());
    vm.assert_no_corrupt();
}

/// `socat - UNIX-CONNECT:...` piping raw JSON lines.
#[test]
fn socat_pipes_raw_json() {
    if !kvm_available("socat_pipes_raw_json") {
        return;
    }
    let socat = system_tool("socat");
    let mut vm = running("socat");
    let sock = vm.qmp_path();
    let input = concat!(
        "{\"execute\": \"qmp_capabilities\"}\n",
        "{\"execute\": \"query-status\"}\n",
        "{\"execute\": \"stop\", \"id\": \"s\"}\n",
        "{\"execute\": \"query-status\"}\n",
    );
    // -t: after our EOF, wait for the replies (the server closes when done).
    let out = run_program(
        &socat,
        &[
            "-t",
            &qmp_timeout().as_secs().to_string(),
            "-",
            &format!("UNIX-CONNECT:{}", sock.display()),
        ],
        Some(input.as_bytes()),
        qmp_timeout(),
    );
    assert!(out.status.success(), "socat failed: {out:?}");
    let msgs: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    assert!(msgs[0].get("QMP").is_some(), "{}", out.stdout);
    let replies: Vec<&Value> = msgs[1..]
        .iter()
        .filter(|m| m.get("event").is_none())
        .collect();
    assert_eq!(
        replies,
        vec![
            &json!({"return": {}}),
            &json!({"return": {"running": true, "status": "running"}}),
            &json!({"return": {}, "id": "s"}),
            &json!({"return": {"running": false, "status": "paused"}}),
        ],
        "socat output:\n{}",
        out.stdout
    );
    assert!(
        msgs.iter().any(|m| m["event"] == "STOP"),
        "no STOP event:\n{}",
        out.stdout
    );
    // The guest stays paused after socat leaves.
    let mut c = vm.qmp();
    assert_eq!(run_state(&mut c), "paused");
}

/// minivmm started from the command line libvirt writes for a
/// direct-kernel-boot domain (monitor on `-chardev socket` + `-mon`, serial
/// on `-chardev` + `-device isa-serial`, `-S`, `-nodefaults`, `-uuid`,
/// `-machine pc-i440fx-7.2,usb=off,dump-guest-core=off`, `-smp` with its
/// topology, `-m size=..k`, ...), driven through that monitor by
/// `qmp-shell`: started with `cont`, migrated to a second one started the
/// same way, which goes on intact; what a management tool probes answers
/// with the real machine.
#[test]
fn libvirt_command_line_migrates_with_qmp_shell() {
    if !kvm_available("libvirt_command_line_migrates_with_qmp_shell") {
        return;
    }
    let shell = venv_tool("qmp-shell");
    let snap = snapshot(&VmmBuilder::new("base").smp(2));
    let mut src = VmmBuilder::new("lvsrc")
        .smp(2)
        .libvirt_style()
        .incoming(&format!("file:{}", snap.display()))
        .spawn();
    let mut sq = src.qmp();
    let r = wait_migration(&mut sq, &["completed", "failed"], qmp_timeout() * 4);
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(run_state(&mut sq), "paused", "-S keeps it paused");
    let shell_run = |vm: &Vmm, input: &str| {
        let out = run_program(
            &shell,
            &[vm.qmp_path().to_str().unwrap()],
            Some(input.as_bytes()),
            qmp_timeout(),
        );
        assert!(out.status.success(), "qmp-shell failed: {out:?}");
        qmp_shell_replies(&out.stdout)
    };
    assert_eq!(shell_run(&src, "cont\n"), vec![json!({"return": {}})]);
    src.wait_pass_beyond(2, boot_timeout());

    // What a management tool probes.
    assert_eq!(
        sq.execute("query-uuid", json!({})).unwrap(),
        json!({"UUID": "5e7a1b2c-0d3e-4f5a-8b6c-7d8e9fa0b1c2"})
    );
    assert_eq!(
        sq.execute("query-kvm", json!({})).unwrap(),
        json!({"enabled": true, "present": true})
    );
    let ch = sq.execute("query-chardev", json!({})).unwrap();
    assert!(
        ch.as_array().is_some_and(|a| a
            .iter()
            .any(|c| c["label"] == "charserial0" && c["filename"] == "stdio")),
        "{ch}"
    );
    let cpus = sq.execute("query-cpus-fast", json!({})).unwrap();
    let tids: Vec<u64> = cpus
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["thread-id"].as_u64())
        .collect();
    assert_eq!(tids.len(), 2, "{cpus}");
    assert!(
        tids[0] != tids[1] && !tids.contains(&u64::from(src.pid())),
        "each vCPU's own thread: {cpus}"
    );
    for t in &tids {
        let comm = std::fs::read_to_string(format!("/proc/{}/task/{t}/comm", src.pid()))
            .unwrap_or_default();
        assert!(comm.starts_with("vcpu"), "thread {t} is '{comm}'");
    }
    assert_eq!(
        sq.execute("query-memory-size-summary", json!({})).unwrap(),
        json!({"base-memory": 128u64 << 20})
    );

    let port = free_port();
    let mut dst = VmmBuilder::new("lvdst")
        .smp(2)
        .libvirt_style()
        .incoming(&format!("tcp:127.0.0.1:{port}"))
        .spawn();
    let mut dq = dst.qmp();
    assert_eq!(
        shell_run(&src, &format!("migrate uri=tcp:127.0.0.1:{port}\n")),
        vec![json!({"return": {}})]
    );
    let r = wait_migration(&mut sq, &["completed", "failed"], qmp_timeout() * 10);
    assert_eq!(r["status"], "completed", "{r}");
    let r = wait_migration(&mut dq, &["completed", "failed"], qmp_timeout() * 10);
    assert_eq!(r["status"], "completed", "{r}");
    // -S on the destination too: libvirt resumes it.
    assert_eq!(run_state(&mut dq), "paused");
    assert_eq!(shell_run(&dst, "cont\n"), vec![json!({"return": {}})]);
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last + 1, boot_timeout());
    dst.assert_no_corrupt();
    src.assert_no_corrupt();
    // -msg timestamp=on: minivmm's messages carry the time (none is an error
    // here; the pty-less console says nothing on stderr, so just check form).
    let err = dst.stderr.text();
    assert!(
        err.lines()
            .all(|l| !l.contains("minivmm:") || l.starts_with("20")),
        "{err}"
    );
    let _ = &mut dst;
}

/// `query-qmp-schema` lists exactly the commands `query-commands` lists,
/// each with an argument type that is in the schema, the argument members
/// as the parser knows them.
#[test]
fn qmp_schema_lists_exactly_the_commands() {
    if !kvm_available("qmp_schema_lists_exactly_the_commands") {
        return;
    }
    let mut vm = running("schema");
    let mut c = vm.qmp();
    let schema = c.execute("query-qmp-schema", json!({})).unwrap();
    let schema = schema.as_array().expect("a list");
    let mut commands: Vec<&str> = schema
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .filter_map(|e| e["name"].as_str())
        .collect();
    let listed = c.execute("query-commands", json!({})).unwrap();
    let mut names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    commands.sort_unstable();
    names.sort_unstable();
    assert_eq!(commands, names);
    let ty = |n: &str| schema.iter().find(|e| e["name"] == n);
    for e in schema.iter().filter(|e| e["meta-type"] == "command") {
        let arg = e["arg-type"].as_str().unwrap_or_default();
        assert!(ty(arg).is_some(), "{e}: no type {arg}");
        assert!(
            ty(e["ret-type"].as_str().unwrap_or_default()).is_some(),
            "{e}"
        );
    }
    // The members are the parser's: migrate's uri is optional (channels),
    // migrate-set-parameters has downtime-limit as an int.
    let members = |cmd: &str| {
        let arg = schema
            .iter()
            .find(|e| e["name"] == cmd)
            .and_then(|e| e["arg-type"].as_str())
            .unwrap_or_default()
            .to_string();
        ty(&arg).map(|t| t["members"].clone()).unwrap_or_default()
    };
    let p = members("migrate-set-parameters");
    assert!(
        p.as_array()
            .is_some_and(|m| m.iter().any(|m| m["name"] == "downtime-limit"
                && m["type"] == "int"
                && m.get("default").is_some())),
        "{p}"
    );
    let h = members("human-monitor-command");
    assert!(
        h.as_array()
            .is_some_and(|m| m.iter().any(|m| m["name"] == "command-line"
                && m["type"] == "str"
                && m.get("default").is_none())),
        "{h}"
    );
    let _ = &mut vm;
}

/// libvirt's default console, `-chardev pty` + `-device isa-serial`: the
/// pty's path is in `query-chardev` (and printed at start, as QEMU), the
/// guest's output comes out of it and what is typed into it reaches the
/// guest.
#[test]
fn pty_serial_console_carries_the_guest() {
    if !kvm_available("pty_serial_console_carries_the_guest") {
        return;
    }
    let snap = snapshot(&VmmBuilder::new("base").smp(2));
    let mut vm = VmmBuilder::new("pty")
        .smp(2)
        .libvirt_style()
        .serial_pty()
        .incoming(&format!("file:{}", snap.display()))
        .spawn();
    let mut c = vm.qmp();
    wait_migration(&mut c, &["completed", "failed"], qmp_timeout() * 4);
    let ch = c.execute("query-chardev", json!({})).unwrap();
    let path = ch
        .as_array()
        .and_then(|a| a.iter().find(|c| c["label"] == "charserial0"))
        .and_then(|c| c["filename"].as_str())
        .and_then(|f| f.strip_prefix("pty:"))
        .unwrap_or_else(|| panic!("no pty in {ch}"))
        .to_string();
    assert!(vm
        .stderr
        .text()
        .contains(&format!("char device redirected to {path}")));
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    c.execute("cont", json!({})).unwrap();
    pty.write_all(b"status\n").unwrap();
    // Read until the guest's STATUS answer and a PASS line came through.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut reader = pty.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut text = String::new();
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if text.contains("STATUS pass=") && text.contains("\nPASS ") {
                break;
            }
        }
        let _ = tx.send(text);
    });
    let text = rx.recv_timeout(boot_timeout()).unwrap_or_else(|_| {
        panic!(
            "no STATUS and PASS through {path} within {:?}",
            boot_timeout()
        )
    });
    assert!(!text.contains("CORRUPT"), "{text}");
    assert!(vm.serial.text().is_empty(), "stdout carries no console");
    let _ = &mut vm;
}

/// An HMP connection's output up to (and including) the next prompt.
fn hmp_reply(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.ends_with(b"(qemu) ") {
        match s.read(&mut buf) {
            Ok(0) => panic!("HMP closed after {:?}", String::from_utf8_lossy(&out)),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("HMP: {e} after {:?}", String::from_utf8_lossy(&out)),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `-qmp stdio` and `-monitor unix:...` (HMP), as QEMU: QMP on the
/// process's stdin and stdout (greeting at once, negotiation, replies
/// with their `id`, events), the human monitor on a socket (banner, prompt
/// `(qemu) `, each line echoed and answered, an unknown command said so, a
/// line too long closes only that connection), and HMP `cont` and `quit`
/// acting, seen as `RESUME` and `SHUTDOWN` on the QMP side; the default
/// serial console gives stdio up to the monitor.
#[test]
fn qmp_on_stdio_and_a_human_monitor_on_a_socket() {
    if !kvm_available("qmp_on_stdio_and_a_human_monitor_on_a_socket") {
        return;
    }
    let wd = WorkDir::new("hmp");
    let sock = wd.path("hmp.sock");
    let mut vm = VmmBuilder::new("stdio")
        .without_qmp()
        .with_stdin()
        .arg("-S")
        .arg("-serial")
        .arg("none")
        .arg("-qmp")
        .arg("stdio")
        .arg("-monitor")
        .arg(&format!("unix:{},server=on,wait=off", sock.display()))
        .spawn();
    // stdout is QMP now.
    vm.wait_serial("\"QMP\"", qmp_timeout());
    vm.type_serial("{\"execute\": \"qmp_capabilities\"}\n");
    vm.type_serial("{\"execute\": \"query-status\", \"id\": \"st1\"}\n");
    let line = vm.wait_serial("\"st1\"", qmp_timeout());
    let r: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
    assert_eq!(r["return"]["status"], "prelaunch", "{r}");

    let deadline = Instant::now() + qmp_timeout();
    let mut h = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "no HMP socket: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    h.set_read_timeout(Some(qmp_timeout())).unwrap();
    let banner = hmp_reply(&mut h);
    assert!(
        banner.contains("monitor - type 'help' for more information\r\n"),
        "{banner:?}"
    );
    h.write_all(b"info status\n").unwrap();
    assert_eq!(
        hmp_reply(&mut h),
        "info status\r\nVM status: paused (prelaunch)\r\n(qemu) "
    );
    h.write_all(b"bogus 1\r\n").unwrap();
    assert_eq!(
        hmp_reply(&mut h),
        "bogus 1\r\nunknown command: 'bogus'\r\n(qemu) "
    );
    h.write_all(b"\n").unwrap();
    assert_eq!(hmp_reply(&mut h), "\r\n(qemu) ");

    // A line too long: that connection ends with a reason, the monitor
    // stays for the next one.
    let mut long = UnixStream::connect(&sock).unwrap();
    long.set_read_timeout(Some(qmp_timeout())).unwrap();
    hmp_reply(&mut long);
    let _ = long.write_all(&vec![b'x'; 100 << 10]);
    let mut rest = String::new();
    let _ = long.read_to_string(&mut rest);
    assert!(rest.contains("command line longer than"), "{rest:?}");

    h.write_all(b"cont\n").unwrap();
    assert_eq!(hmp_reply(&mut h), "cont\r\n(qemu) ");
    vm.wait_serial("\"RESUME\"", qmp_timeout());
    h.write_all(b"info status\n").unwrap();
    assert_eq!(
        hmp_reply(&mut h),
        "info status\r\nVM status: running\r\n(qemu) "
    );
    h.write_all(b"quit\n").unwrap();
    let st = vm.wait_exit(qmp_timeout());
    assert!(st.success(), "{st:?}: {}", vm.stderr.text());
    vm.wait_serial("\"SHUTDOWN\"", qmp_timeout());
    assert!(!sock.exists(), "the HMP socket was left behind");
}

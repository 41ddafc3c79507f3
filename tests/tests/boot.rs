//! Booting the guest (issue 2): what a user sees on the serial console and
//! from the process, with 1 and 2 vCPUs, RAM above the 32-bit hole, guest
//! reboot with and without `-no-reboot`, serial input, and the command line's
//! error messages.

use std::time::Duration;

use serde_json::json;
use tests::*;

/// Deadline for a whole boot plus a few workload passes.
fn passes_timeout() -> Duration {
    scaled(Duration::from_secs(300))
}
/// Deadline for a command-line error (no guest ever runs).
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// `GUEST-READY cpus=N mem=M ms=T` → N.
fn ready_cpus(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("cpus="))
        .and_then(|n| n.parse().ok())
}

/// The guest prints PASS 1, 2, 3 in order, without CORRUPT.
fn assert_three_passes(vm: &Vmm) {
    vm.wait_pass_beyond(2, passes_timeout());
    let passes = vm.passes();
    assert_eq!(
        &passes[..3],
        &[1, 2, 3],
        "{}: PASS lines out of order: {passes:?}",
        vm.name
    );
    vm.assert_no_corrupt();
}

/// One vCPU: the kernel boots, the workload sees 1 CPU and completes three
/// passes; with `workload.passes=3` it then reboots the guest, and under
/// `-no-reboot` minivmm ends with status 0 (QMP saw SHUTDOWN).
#[test]
fn one_vcpu_boots_and_no_reboot_exits_zero() {
    if !kvm_available("one_vcpu_boots_and_no_reboot_exits_zero") {
        return;
    }
    let mut vm = VmmBuilder::new("boot1")
        .smp(1)
        .append("console=ttyS0 workload.mem=16 workload.rate=16 workload.passes=3")
        .arg("-no-reboot")
        .spawn();
    let mut q = vm.qmp();
    let ready = vm.wait_serial("GUEST-READY", boot_timeout());
    assert_eq!(ready_cpus(&ready), Some(1), "{ready}");
    assert!(
        vm.serial.text().contains("Linux version"),
        "the kernel's boot messages are not on the console"
    );
    assert_three_passes(&vm);
    vm.wait_serial("DONE passes=3", passes_timeout());
    let st = vm.wait_exit(passes_timeout());
    assert_eq!(
        st.code(),
        Some(0),
        "minivmm -no-reboot after a guest reboot: {st}\nstderr:\n{}",
        vm.stderr.text()
    );
    let ev = q
        .wait_event("SHUTDOWN", |_| true, qmp_timeout())
        .expect("SHUTDOWN event before the exit");
    assert_eq!(ev["data"]["guest"], true, "{ev}");
    assert_eq!(ev["data"]["reason"], "guest-reset", "{ev}");
    assert!(
        !vm.stderr.text().contains("panicked"),
        "{}",
        vm.stderr.text()
    );
}

/// Two vCPUs: the workload sees 2 CPUs and passes; without `-no-reboot` a
/// guest reboot resets the VM: a RESET event, the guest boots a second time,
/// and the process keeps running.
#[test]
fn two_vcpus_boot_and_guest_reboot_resets() {
    if !kvm_available("two_vcpus_boot_and_guest_reboot_resets") {
        return;
    }
    let mut vm = VmmBuilder::new("boot2")
        .smp(2)
        .append("console=ttyS0 workload.mem=16 workload.rate=16 workload.passes=3")
        .spawn();
    let mut q = vm.qmp();
    let (ready, _) = vm.wait_serial_after(0, "GUEST-READY", boot_timeout());
    assert_eq!(ready_cpus(&ready), Some(2), "{ready}");
    assert_three_passes(&vm);
    let (_, after_done) = vm.wait_serial_after(0, "DONE passes=3", passes_timeout());
    let ev = q
        .wait_event("RESET", |_| true, passes_timeout())
        .expect("RESET event after the guest's reboot");
    assert_eq!(ev["data"]["guest"], true, "{ev}");
    let (again, _) = vm.wait_serial_after(after_done, "GUEST-READY", boot_timeout());
    assert_eq!(ready_cpus(&again), Some(2), "{again}");
    assert!(vm.exited().is_none(), "minivmm ended after a guest reboot");
    assert_eq!(run_state(&mut q), "running");
    vm.assert_no_corrupt();
}

/// RAM that crosses the 32-bit hole: `-machine max-ram-below-4g=1G -m 1536M`
/// gives 1 GiB below the hole and 512 MiB at 4 GiB (the same layout as a
/// 4 GiB guest with the default 3 GiB hole). The VMM's e820 map covers all
/// of it; the guest kernel is told to use only part of it
/// ([`small_kernel_ram`]: 128 MiB at 4 GiB among it), so that it boots like
/// the standard guest. It allocates its user pages from the high zone, so
/// the workload's pages must show up in a `pmemsave` of the VMM's whole
/// [4 GiB, 4 GiB + 512 MiB), holding exactly the pattern the guest wrote.
/// A `pmemsave` across the hole is refused.
#[test]
fn ram_above_4g_holds_workload_pages() {
    if !kvm_available("ram_above_4g_holds_workload_pages") {
        return;
    }
    const HIGH: u64 = 1 << 32;
    const HIGH_LEN: u64 = 512 << 20;
    let mut vm = VmmBuilder::new("high")
        .mem("1536M")
        .arg("-machine")
        .arg("max-ram-below-4g=1G")
        .append_more(&small_kernel_ram(1 << 30, HIGH_LEN))
        .spawn();
    let mut q = vm.qmp();
    vm.wait_serial("GUEST-READY", boot_timeout());
    vm.wait_pass_beyond(1, passes_timeout());
    vm.assert_no_corrupt();
    let text = vm.serial.text();
    assert!(
        text.contains("[mem 0x0000000100000000-0x000000011fffffff] usable"),
        "the guest's e820 map lacks RAM at [4 GiB, 4.5 GiB):\n{}",
        tail(&text, 4000)
    );
    assert!(
        text.contains("user: [mem 0x0000000100000000-0x0000000107ffffff] usable"),
        "the guest kernel does not use RAM at [4 GiB, 4 GiB + 128 MiB):\n{}",
        tail(&text, 4000)
    );

    q.execute("stop", json!({})).expect("stop");
    let dump = vm.dir.path("high.pmem");
    q.execute(
        "pmemsave",
        json!({"val": HIGH, "size": HIGH_LEN, "filename": dump.display().to_string()}),
    )
    .expect("pmemsave of the RAM above 4 GiB");
    let data = std::fs::read(&dump).expect("read the dump");
    assert_eq!(data.len() as u64, HIGH_LEN);
    let pages = scan_workload_pages(&data);
    let _ = std::fs::remove_file(&dump);
    let mut indices: Vec<u64> = pages.iter().map(|&(_, i, _)| i).collect();
    indices.sort_unstable();
    indices.dedup();
    // 16 MiB workload = 4096 pages; with the VM stopped every page holds the
    // previous or the current pass (only the one being written can be torn).
    assert!(
        indices.len() >= 1024,
        "only {} of the workload's 4096 pages found above 4 GiB (passes seen: {:?})",
        indices.len(),
        vm.passes()
    );
    assert_eq!(indices.len(), pages.len(), "a workload page appears twice");
    assert!(indices.iter().all(|&i| i < 4096), "page index out of range");
    let last = *vm.passes().last().expect("a PASS line");
    assert!(
        pages.iter().all(|&(_, _, k)| k == last || k == last + 1),
        "pages above 4 GiB hold passes other than {last}/{}",
        last + 1
    );

    // [1 GiB - 4 KiB, 1 GiB + 4 KiB) runs into the hole: refused, no file.
    let across = vm.dir.path("across.pmem");
    let err = q
        .execute(
            "pmemsave",
            json!({"val": (1u64 << 30) - 4096, "size": 8192, "filename": across.display().to_string()}),
        )
        .expect_err("pmemsave across the hole must fail");
    match &err {
        ClientError::Qmp { class, desc } => {
            assert_eq!(class, "GenericError", "{err}");
            assert!(
                desc.contains("0x3ffff000") && desc.contains("RAM"),
                "the error does not say which range is wrong: {desc}"
            );
        }
        e => panic!("expected a QMP error, got {e}"),
    }
    assert!(!across.exists(), "a failed pmemsave left a file behind");
    // Inside the hole: refused too. The VM is unharmed and runs on.
    assert!(q
        .execute(
            "pmemsave",
            json!({"val": 3u64 << 30, "size": 4096, "filename": across.display().to_string()}),
        )
        .is_err());
    q.execute("cont", json!({})).expect("cont");
    let before = *vm.passes().last().unwrap_or(&0);
    vm.wait_pass_beyond(before, passes_timeout());
    vm.assert_no_corrupt();
}

/// With the busybox initramfs, what is typed on minivmm's stdin reaches the
/// guest's shell on ttyS0 and its answer comes back.
#[test]
fn serial_input_reaches_busybox_shell() {
    if !kvm_available("serial_input_reaches_busybox_shell") {
        return;
    }
    let bb = busybox_initrd();
    assert!(
        bb.exists(),
        "{} missing: run guest-images/build.sh",
        bb.display()
    );
    let mut vm = VmmBuilder::new("bbox")
        .initrd(&bb)
        .append("console=ttyS0")
        .without_qmp()
        .with_stdin()
        .spawn();
    let (_, after) = vm.wait_serial_after(0, "BUSYBOX-READY", boot_timeout());
    // The shell may still be starting: repeat the command until it answers.
    // The echo of the typed line holds "hello-$((6*7))", only the shell's
    // output holds "hello-42".
    let deadline = std::time::Instant::now() + boot_timeout();
    loop {
        vm.type_serial("echo hello-$((6*7))\n");
        if vm
            .serial
            .wait_line(after, scaled(Duration::from_secs(10)), |l| {
                l.trim_end().ends_with("hello-42")
            })
            .is_some()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the shell never answered\n--- serial ---\n{}",
            tail(&vm.serial.text(), 3000)
        );
    }
}

/// Asserts a one-line error on stderr, a non-zero exit and no panic.
fn assert_cli_error(args: &[&str], expect: &[&str]) {
    let out = run_minivmm(args, CLI_TIMEOUT);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(!out.status.success(), "minivmm {args:?} succeeded: {out:?}");
    assert!(
        out.status.code().is_some(),
        "minivmm {args:?} died of a signal: {out:?}"
    );
    assert!(
        !out.stderr.contains("panicked"),
        "minivmm {args:?} panicked:\n{}",
        out.stderr
    );
    assert_eq!(
        lines.len(),
        1,
        "minivmm {args:?}: expected a one-line error, got:\n{}",
        out.stderr
    );
    assert!(lines[0].starts_with("minivmm: "), "{}", lines[0]);
    for e in expect {
        assert!(
            lines[0].contains(e),
            "minivmm {args:?}: the error does not mention '{e}': {}",
            lines[0]
        );
    }
}

#[test]
fn cli_missing_kernel() {
    assert_cli_error(&["-m", "128"], &["-kernel"]);
}

#[test]
fn cli_nonexistent_kernel() {
    let dir = WorkDir::new("cli");
    let k = dir.path("no-such-vmlinux");
    let k = k.to_str().unwrap();
    assert_cli_error(&["-kernel", k], &[k, "No such file"]);
}

#[test]
fn cli_nonexistent_initrd() {
    if !kvm_available("cli_nonexistent_initrd") {
        return;
    }
    let dir = WorkDir::new("cli");
    let i = dir.path("no-such-initrd");
    let i = i.to_str().unwrap();
    let k = kernel();
    assert_cli_error(
        &[
            "-kernel",
            k.to_str().unwrap(),
            "-initrd",
            i,
            "-serial",
            "none",
        ],
        &[i, "No such file"],
    );
}

#[test]
fn cli_kernel_that_is_not_a_kernel() {
    if !kvm_available("cli_kernel_that_is_not_a_kernel") {
        return;
    }
    let dir = WorkDir::new("cli");
    let k = dir.path("garbage");
    std::fs::write(&k, b"this is not a kernel\n").unwrap();
    let k = k.to_str().unwrap();
    assert_cli_error(&["-kernel", k, "-serial", "none"], &[k]);
}

#[test]
fn cli_kernel_is_a_directory() {
    if !kvm_available("cli_kernel_is_a_directory") {
        return;
    }
    let dir = WorkDir::new("cli");
    let k = dir.path("a-directory");
    std::fs::create_dir(&k).unwrap();
    let k = k.to_str().unwrap();
    assert_cli_error(&["-kernel", k, "-serial", "none"], &[k]);
}

#[test]
fn cli_bad_memory_size() {
    let k = kernel();
    let k = k.to_str().unwrap();
    assert_cli_error(&["-kernel", k, "-m", "1X"], &["-m", "1X"]);
    assert_cli_error(&["-kernel", k, "-m", "lots"], &["-m", "lots"]);
}

#[test]
fn cli_zero_cpus() {
    let k = kernel();
    assert_cli_error(&["-kernel", k.to_str().unwrap(), "-smp", "0"], &["-smp"]);
}

#[test]
fn cli_unknown_option_is_named() {
    let k = kernel();
    assert_cli_error(
        &["-kernel", k.to_str().unwrap(), "-device", "foo"],
        &["-device"],
    );
}

#[test]
fn cli_display_other_than_none() {
    let k = kernel();
    assert_cli_error(
        &["-kernel", k.to_str().unwrap(), "-display", "gtk"],
        &["-display", "gtk"],
    );
}

#[test]
fn cli_option_without_value() {
    assert_cli_error(&["-kernel"], &["-kernel"]);
}

#[test]
fn cli_help_and_version() {
    let out = run_minivmm(&["--help"], CLI_TIMEOUT);
    assert!(out.status.success(), "{out:?}");
    for o in [
        "-kernel",
        "-initrd",
        "-append",
        "-m ",
        "-smp",
        "-qmp",
        "-incoming",
    ] {
        assert!(out.stdout.contains(o), "--help does not mention {o}");
    }
    let out = run_minivmm(&["--version"], CLI_TIMEOUT);
    assert!(out.status.success(), "{out:?}");
    // QEMU's layout ("QEMU emulator version X" + copyright), minivmm's
    // own name and version.
    let first = out.stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("minivmm version {}", env!("CARGO_PKG_VERSION"))),
        "--version: {:?}",
        out.stdout
    );
}

/// `-daemonize` as QEMU: the command returns 0 once the VM is set up
/// (monitor listening), the daemon (the pidfile's pid, in its own session)
/// serves QMP and runs the guest; `quit` ends it and the pidfile is gone.
/// A QMP listener on every address is warned about.
#[test]
fn daemonize_returns_once_set_up_and_pidfile_goes_at_exit() {
    if !kvm_available("daemonize_returns_once_set_up_and_pidfile_goes_at_exit") {
        return;
    }
    let dir = WorkDir::new("daemon");
    let pidfile = dir.path("vm.pid");
    let sock = dir.path("vm.qmp");
    let console = dir.path("console.txt");
    let k = kernel().display().to_string();
    let i = initrd().display().to_string();
    let port = free_port();
    let out = run_minivmm(
        &[
            "-kernel",
            &k,
            "-initrd",
            &i,
            "-append",
            "console=ttyS0 workload.mem=16 workload.rate=16",
            "-serial",
            &format!("file:{}", console.display()),
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock.display()),
            "-qmp",
            &format!("tcp::{port},server=on,wait=off"),
            "-pidfile",
            &pidfile.display().to_string(),
            "-daemonize",
        ],
        CLI_TIMEOUT,
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains("listens on every address"),
        "no warning for the open QMP port: {out:?}"
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("a pid");
    // SAFETY: getsid only reads the process's session id.
    let sid = unsafe { libc::getsid(pid) };
    assert_eq!(sid, pid, "the daemon leads its own session");
    let mut c = Client::connect_unix(&sock, qmp_timeout()).expect("QMP on the daemon");
    let st = c.execute("query-status", json!({})).unwrap();
    assert_eq!(st["status"], "running", "{st}");
    let deadline = std::time::Instant::now() + passes_timeout();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("PASS 1 ")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no PASS in the daemon's console"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = c.execute("quit", json!({}));
    let deadline = std::time::Instant::now() + CLI_TIMEOUT;
    // SAFETY: kill with signal 0 only checks the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pidfile.exists(), "pidfile left behind");
}

/// SIGTERM: minivmm exits cleanly and removes its pidfile (as QEMU).
#[test]
fn pidfile_removed_after_sigterm() {
    if !kvm_available("pidfile_removed_after_sigterm") {
        return;
    }
    let dir = WorkDir::new("pidterm");
    let pidfile = dir.path("vm.pid");
    let vm = VmmBuilder::new("pidterm")
        .arg("-pidfile")
        .arg(&pidfile.display().to_string());
    let mut vm = vm.spawn();
    vm.wait_serial("GUEST-READY", boot_timeout());
    assert!(pidfile.exists());
    vm.signal(libc::SIGTERM);
    let st = vm.wait_exit(CLI_TIMEOUT);
    assert!(st.success(), "{st:?}");
    assert!(!pidfile.exists(), "pidfile left behind");
}

/// The seccomp sandbox is on by default: every thread filtered, vCPU
/// threads and the control thread by their own allowlists too (the
/// spawner, which starts `exec:` programs, by the process filters only),
/// `NoNewPrivs` set; a system call no vCPU thread makes, or a program
/// executed by the control thread, kills the process (SIGSYS) instead of
/// succeeding; `-sandbox off` installs nothing.
#[test]
fn sandbox_filters_every_thread_and_kills_a_forbidden_vcpu_call() {
    use std::os::unix::process::ExitStatusExt;
    if !kvm_available("sandbox_filters_every_thread_and_kills_a_forbidden_vcpu_call") {
        return;
    }
    // Restored from the shared snapshot: no boot needed.
    let snap = snapshot(&VmmBuilder::new("base").smp(2));
    let restored = |b: VmmBuilder| {
        let mut vm = b.incoming(&format!("file:{}", snap.display())).spawn();
        let mut c = vm.qmp();
        let r = wait_migration(&mut c, &["completed", "failed"], boot_timeout());
        assert_eq!(r["status"], "completed", "{r}");
        vm
    };
    let mut vm = restored(VmmBuilder::new("sandboxed").smp(2));
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let (mut vcpus, mut control, mut spawner) = (0, 0, 0);
    for t in std::fs::read_dir(format!("/proc/{}/task", vm.pid()))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        let st = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        assert!(st.contains("Seccomp:\t2"), "thread {comm} unfiltered: {st}");
        if comm.starts_with("vcpu") && comm != "vcpu-throttle" {
            vcpus += 1;
            // The process filters and the vCPU allowlist.
            assert!(st.contains("Seccomp_filters:\t3"), "{comm}: {st}");
        } else if t.file_name().to_string_lossy() == vm.pid().to_string() {
            control += 1;
            // The process filters and the control thread's allowlist.
            assert!(st.contains("Seccomp_filters:\t3"), "control: {st}");
        } else if comm == "spawner" {
            spawner += 1;
            // The process filters only: what it starts must run.
            assert!(st.contains("Seccomp_filters:\t2"), "spawner: {st}");
        }
    }
    assert_eq!((vcpus, control, spawner), (2, 1, 1));
    vm.kill();

    for (name, env) in [
        ("forbidden-vcpu", "MINIVMM_TEST_VCPU_FORBIDDEN_SYSCALL"),
        (
            "forbidden-control",
            "MINIVMM_TEST_CONTROL_FORBIDDEN_SYSCALL",
        ),
    ] {
        let mut bad = VmmBuilder::new(name).env(env, "1").spawn();
        let st = bad.wait_exit(boot_timeout());
        assert_eq!(st.signal(), Some(libc::SIGSYS), "{name}: {st:?}");
    }

    let mut off = VmmBuilder::new("unsandboxed")
        .arg("-sandbox")
        .arg("off")
        .spawn();
    off.wait_serial("GUEST-READY", boot_timeout());
    let status = std::fs::read_to_string(format!("/proc/{}/status", off.pid())).unwrap();
    assert!(status.contains("Seccomp:\t0"), "{status}");
    off.kill();
}

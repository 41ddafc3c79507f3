//! End-to-end harness: starts real `minivmm` processes on real guests,
//! reads their serial consoles, drives them over QMP, and cleans up.
//!
//! Every process a test starts is killed when its [`Vmm`] is dropped, and
//! also when the test runner itself dies (PR_SET_PDEATHSIG); every socket
//! and file lives in a [`WorkDir`] removed on drop.
//!
//! Paths come from the environment when set: `MINIVMM_BIN` (default
//! `target/release/minivmm`, else `target/debug/minivmm`), `MINIVMM_KERNEL`
//! and `MINIVMM_INITRD` (default `guest-images/out/vmlinux` and
//! `guest-images/out/initramfs.cpio`).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use qmp::{Client, ClientError};
use serde_json::{json, Value};

mod calibrate;
pub mod netns;
pub use calibrate::{boot_timeout, calibration, qmp_timeout, scaled, Calibration};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The minivmm binary under test.
pub fn minivmm_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MINIVMM_BIN") {
        return p.into();
    }
    let release = root().join("target/release/minivmm");
    if release.exists() {
        return release;
    }
    root().join("target/debug/minivmm")
}

/// Guest kernel.
pub fn kernel() -> PathBuf {
    std::env::var("MINIVMM_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("guest-images/out/vmlinux"))
}

/// Guest initramfs (the workload alone).
pub fn initrd() -> PathBuf {
    std::env::var("MINIVMM_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("guest-images/out/initramfs.cpio"))
}

/// The busybox initramfs (an interactive shell on ttyS0): `MINIVMM_INITRD_BUSYBOX`,
/// default `guest-images/out/initramfs-busybox.cpio`.
pub fn busybox_initrd() -> PathBuf {
    std::env::var("MINIVMM_INITRD_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("guest-images/out/initramfs-busybox.cpio"))
}

/// A program installed by `./setup.sh` into the project's virtualenv
/// (`.venv/bin/NAME`), e.g. `qmp-shell`. Panics with a hint when missing:
/// setup installs it, so its absence is a failure, not a reason to skip.
pub fn venv_tool(name: &str) -> PathBuf {
    let p = root().join(".venv/bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run ./setup.sh (it installs qemu.qmp into .venv)",
        p.display()
    );
    p
}

/// The path of a program on `PATH`. Panics with a hint when missing (setup
/// installs it).
pub fn system_tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed: run ./setup.sh"))
}

/// True when /dev/kvm exists. Without it, VM tests skip and say so; with it,
/// they must pass.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        assert!(
            kernel().exists(),
            "guest kernel {} missing: run guest-images/build.sh",
            kernel().display()
        );
        assert!(
            minivmm_bin().exists(),
            "minivmm binary {} missing: build it first",
            minivmm_bin().display()
        );
        true
    } else {
        println!("SKIP {test}: /dev/kvm is absent on this machine");
        false
    }
}

static DIR_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A scratch directory removed on drop (short path: unix sockets need < 108 bytes).
pub struct WorkDir(PathBuf);

impl WorkDir {
    /// A fresh directory.
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "mvmm-{name}-{}-{}",
            std::process::id(),
            DIR_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create work dir");
        Self(p)
    }

    /// A path inside.
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Text captured from a child's stdout or stderr, line by line.
#[derive(Clone, Default)]
pub struct Capture(Arc<(Mutex<String>, Condvar)>, Arc<AtomicBool>);

impl Capture {
    fn spawn_reader(&self, mut r: impl std::io::Read + Send + 'static, echo: Option<String>) {
        let c = self.clone();
        std::thread::spawn(move || {
            // Bytes are kept as they arrive, a partial last line included:
            // a COLO primary holds its output from the middle of a line, and
            // the secondary goes on from there.
            let mut buf = vec![0u8; 64 << 10];
            let mut pending: Vec<u8> = Vec::new(); // an incomplete UTF-8 sequence
            let mut line = String::new(); // for the echo
            loop {
                let n = match r.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        // End of stream (the process exited): wake waiters
                        // so they fail now instead of at their deadline.
                        let (m, cv) = &*c.0;
                        let _g = m.lock().unwrap_or_else(|e| e.into_inner());
                        c.1.store(true, Ordering::SeqCst);
                        cv.notify_all();
                        break;
                    }
                    Ok(n) => n,
                };
                pending.extend_from_slice(&buf[..n]);
                let valid = match std::str::from_utf8(&pending) {
                    Ok(_) => pending.len(),
                    Err(e) if e.error_len().is_none() => e.valid_up_to(),
                    Err(_) => pending.len(),
                };
                let s = String::from_utf8_lossy(&pending[..valid]).replace('\r', "");
                pending.drain(..valid);
                if let Some(tag) = &echo {
                    line.push_str(&s);
                    while let Some(i) = line.find('\n') {
                        let l: String = line.drain(..=i).collect();
                        if l.contains("PASS")
                            || l.contains("GUEST")
                            || l.contains("CORRUPT")
                            || l.contains("minivmm")
                        {
                            eprint!("[{tag}] {l}");
                        }
                    }
                }
                let (m, cv) = &*c.0;
                m.lock().unwrap_or_else(|e| e.into_inner()).push_str(&s);
                cv.notify_all();
            }
        });
    }

    /// Everything so far.
    pub fn text(&self) -> String {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// True once the stream has ended (the process closed it or exited).
    pub fn is_closed(&self) -> bool {
        self.1.load(Ordering::SeqCst)
    }

    /// Wait until a line satisfying `pred` appears after byte `from`;
    /// returns the line and the offset after it. `None` at the deadline, or
    /// as soon as the stream has ended without such a line.
    pub fn wait_line(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(String, usize)> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut off = from.min(g.len());
            for line in g[off..].split_inclusive('\n') {
                off += line.len();
                if line.ends_with('\n') && pred(line.trim_end()) {
                    return Some((line.trim_end().to_string(), off));
                }
            }
            let now = Instant::now();
            if now >= deadline || self.is_closed() {
                return None;
            }
            g = cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// `-m` as the builder holds it (`128M`, `1G`, `512`) in MiB.
fn parse_mib(m: &str) -> u64 {
    let (n, mult) = match m.chars().last() {
        Some('G' | 'g') => (&m[..m.len() - 1], 1024),
        Some('M' | 'm') => (&m[..m.len() - 1], 1),
        _ => (m, 1),
    };
    n.parse::<u64>().unwrap_or(128) * mult
}

/// How to start one minivmm.
#[derive(Clone)]
pub struct VmmBuilder {
    name: String,
    mem: String,
    smp: u8,
    append: String,
    extra: Vec<String>,
    qmp: bool,
    serial_stdin: bool,
    initrd: Option<PathBuf>,
    env: Vec<(String, String)>,
    netns: Option<String>,
    libvirt: bool,
    pty: bool,
}

impl VmmBuilder {
    /// The default guest: 128 MiB, 1 vCPU, a 16 MiB workload at 16 MiB/s.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            mem: "128M".into(),
            smp: 1,
            append: "console=ttyS0 workload.mem=16 workload.rate=16".into(),
            extra: Vec::new(),
            qmp: true,
            serial_stdin: false,
            initrd: None,
            env: Vec::new(),
            netns: None,
            libvirt: false,
            pty: false,
        }
    }

    /// Spell the command line as libvirt writes it for a direct-kernel-boot
    /// domain with no disks, no network, USB and balloon off: the monitor
    /// on `-chardev socket` + `-mon`, the serial console on `-chardev
    /// stdio` + `-device isa-serial`, `-S` (libvirt starts the guest with
    /// `cont`), and its usual switches.
    pub fn libvirt_style(mut self) -> Self {
        self.libvirt = true;
        self
    }

    /// With [`Self::libvirt_style`]: the serial console on `-chardev pty`
    /// (libvirt's default) instead of stdio; nothing reaches [`Vmm::serial`].
    pub fn serial_pty(mut self) -> Self {
        self.pty = true;
        self
    }

    /// Run it in network namespace `ns` (see [`netns::TwoHosts`]).
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.into());
        self
    }

    /// Boot this initramfs instead of [`initrd()`] (e.g. [`busybox_initrd()`]).
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// `-m`.
    pub fn mem(mut self, m: &str) -> Self {
        self.mem = m.into();
        self
    }

    /// `-smp`.
    pub fn smp(mut self, n: u8) -> Self {
        self.smp = n;
        self
    }

    /// Replace the kernel command line.
    pub fn append(mut self, a: &str) -> Self {
        self.append = a.into();
        self
    }

    /// Add to the kernel command line.
    pub fn append_more(mut self, a: &str) -> Self {
        self.append.push(' ');
        self.append.push_str(a);
        self
    }

    /// More arguments.
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.into());
        self
    }

    /// `-incoming URI`.
    pub fn incoming(self, uri: &str) -> Self {
        self.arg("-incoming").arg(uri)
    }

    /// Keep stdin as a pipe (to type on the serial console).
    pub fn with_stdin(mut self) -> Self {
        self.serial_stdin = true;
        self
    }

    /// An environment variable for the process.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// No `-qmp`.
    pub fn without_qmp(mut self) -> Self {
        self.qmp = false;
        self
    }

    /// Whether `arg` was added with [`VmmBuilder::arg`].
    pub fn has_arg(&self, arg: &str) -> bool {
        self.extra.iter().any(|a| a == arg)
    }

    /// The argument list (without the binary).
    pub fn args(&self, dir: &WorkDir) -> Vec<String> {
        if self.libvirt {
            let mem_k = parse_mib(&self.mem) * 1024;
            let qmp = dir.path(&format!("{}.qmp", self.name));
            let mut a: Vec<String> = [
                "-name",
                &format!("guest={},debug-threads=on", self.name),
                "-S",
                "-machine",
                "pc-i440fx-7.2,usb=off,dump-guest-core=off",
                "-accel",
                "kvm",
                "-m",
                &format!("size={mem_k}k"),
                "-overcommit",
                "mem-lock=off",
                "-smp",
                &format!("{0},sockets=1,dies=1,cores={0},threads=1", self.smp),
                "-uuid",
                "5e7a1b2c-0d3e-4f5a-8b6c-7d8e9fa0b1c2",
                "-no-user-config",
                "-nodefaults",
                "-chardev",
                &format!(
                    "socket,id=charmonitor,path={},server=on,wait=off",
                    qmp.display()
                ),
                "-mon",
                "chardev=charmonitor,id=monitor,mode=control",
                "-rtc",
                "base=utc",
                "-no-shutdown",
                "-boot",
                "strict=on",
                "-kernel",
                &kernel().display().to_string(),
                "-initrd",
                &self
                    .initrd
                    .clone()
                    .unwrap_or_else(initrd)
                    .display()
                    .to_string(),
                "-append",
                &self.append,
                "-chardev",
                if self.pty {
                    "pty,id=charserial0"
                } else {
                    "stdio,id=charserial0"
                },
                "-device",
                "isa-serial,chardev=charserial0,id=serial0,index=0",
                "-msg",
                "timestamp=on",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            a.extend(self.extra.iter().cloned());
            return a;
        }
        let mut a: Vec<String> = vec![
            "-kernel".into(),
            kernel().display().to_string(),
            "-initrd".into(),
            self.initrd
                .clone()
                .unwrap_or_else(initrd)
                .display()
                .to_string(),
            "-append".into(),
            self.append.clone(),
            "-m".into(),
            self.mem.clone(),
            "-smp".into(),
            self.smp.to_string(),
            "-serial".into(),
            "stdio".into(),
        ];
        if self.qmp {
            a.push("-qmp".into());
            a.push(format!(
                "unix:{},server=on,wait=off",
                dir.path(&format!("{}.qmp", self.name)).display()
            ));
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    /// Start it.
    pub fn spawn(self) -> Vmm {
        let dir = WorkDir::new(&self.name);
        let args = self.args(&dir);
        let mut cmd = Command::new(minivmm_bin());
        cmd.args(&args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(if self.serial_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The namespace is opened here; the child joins it before exec.
        let ns = self.netns.as_ref().map(|n| {
            std::fs::File::open(Path::new("/run/netns").join(n))
                .unwrap_or_else(|e| panic!("network namespace {n}: {e}"))
        });
        let ns_fd = ns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        // SAFETY: prctl and setns are async-signal-safe; the closure runs in
        // the child between fork and exec and touches nothing else (`ns_fd`
        // is an open fd of the parent, inherited, valid until `ns` drops
        // after spawn).
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(fd) = ns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", minivmm_bin().display()));
        drop(ns);
        let serial = Capture::default();
        let stderr = Capture::default();
        if let Some(o) = child.stdout.take() {
            serial.spawn_reader(
                o,
                std::env::var("MINIVMM_TEST_ECHO")
                    .ok()
                    .map(|_| self.name.clone()),
            );
        }
        if let Some(e) = child.stderr.take() {
            stderr.spawn_reader(e, None);
        }
        let qmp_path = self.qmp.then(|| dir.path(&format!("{}.qmp", self.name)));
        Vmm {
            name: self.name,
            child: Some(child),
            serial,
            stderr,
            qmp_path,
            dir,
            status: None,
        }
    }
}

/// Kernel command-line options that hand the guest kernel only a small part
/// of a large guest's RAM, so that it boots as fast as the standard guest
/// (the emulated kernel initialises a `struct page` for every page it is
/// given: a 1.5 GiB guest took 203 s to `GUEST-READY` on a slow machine of
/// this kind). The VMM is untouched: it still builds the full e820 map for
/// all of `-m` (the kernel prints it as `BIOS-e820`), maps, tracks, sends,
/// receives and compares every byte; only the kernel's own map
/// (`memmap=exactmap`, printed as `user:`) is smaller.
///
/// `low_end` is where RAM below the 32-bit hole ends (the VMM's
/// `min(-m, max-ram-below-4g)`), `high` how much RAM the VMM put at 4 GiB.
/// The kernel gets: [0, 0x9fc00) (below the MP table), [1 MiB, 64 MiB)
/// (its image at 16 MiB), the 16 MiB below where the VMM puts the initrd
/// (the top of low RAM, at most 2 GiB: `initrd_addr_max` of a vmlinux), and
/// the first 128 MiB at 4 GiB, where it takes user pages from first
/// (`ZONE_NORMAL`): the workload's pages live above 4 GiB.
pub fn small_kernel_ram(low_end: u64, high: u64) -> String {
    const MIB: u64 = 1 << 20;
    let initrd_top = low_end.min(2 << 30);
    assert!(
        initrd_top >= 96 * MIB && high >= 128 * MIB,
        "small_kernel_ram: needs RAM below and above the hole"
    );
    format!(
        "memmap=exactmap memmap=639K@0 memmap=63M@1M memmap=16M@{}M memmap=128M@4096M",
        initrd_top / MIB - 16
    )
}

/// A running minivmm process.
pub struct Vmm {
    /// Name used in messages and file names.
    pub name: String,
    child: Option<Child>,
    /// The guest's serial console.
    pub serial: Capture,
    /// minivmm's stderr.
    pub stderr: Capture,
    qmp_path: Option<PathBuf>,
    /// Its scratch directory.
    pub dir: WorkDir,
    status: Option<ExitStatus>,
}

impl Vmm {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The QMP socket path.
    pub fn qmp_path(&self) -> PathBuf {
        self.qmp_path.clone().expect("started without -qmp")
    }

    /// A negotiated QMP connection (waits for the socket to appear).
    pub fn qmp(&mut self) -> Client {
        let path = self.qmp_path();
        let deadline = Instant::now() + scaled(Duration::from_secs(30));
        loop {
            match Client::connect_unix(&path, qmp_timeout()) {
                Ok(c) => return c,
                Err(e) => {
                    if let Some(st) = self.try_exit() {
                        panic!(
                            "{} exited ({st}) before QMP was up; stderr:\n{}",
                            self.name,
                            self.stderr.text()
                        );
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{}: QMP socket never came up: {e}",
                        self.name
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn console_state(&self) -> &'static str {
        if self.serial.is_closed() {
            " (the console closed: minivmm exited)"
        } else {
            ""
        }
    }

    /// Wait for a serial line containing `needle`.
    pub fn wait_serial(&self, needle: &str, timeout: Duration) -> String {
        self.wait_serial_after(0, needle, timeout).0
    }

    /// Wait for a serial line containing `needle` after byte `from`.
    pub fn wait_serial_after(
        &self,
        from: usize,
        needle: &str,
        timeout: Duration,
    ) -> (String, usize) {
        match self.serial.wait_line(from, timeout, |l| l.contains(needle)) {
            Some(x) => x,
            None => panic!(
                "{}: no serial line with '{needle}' within {timeout:?}{} ({})\n--- serial (tail) ---\n{}\n--- stderr ---\n{}",
                self.name,
                self.console_state(),
                calibrate::note(),
                tail(&self.serial.text(), 3000),
                self.stderr.text()
            ),
        }
    }

    /// Wait until the guest has printed `PASS n` for some n > `after`; returns n.
    pub fn wait_pass_beyond(&self, after: u64, timeout: Duration) -> u64 {
        let (line, _) = match self.serial.wait_line(0, timeout, |l| pass_number(l).is_some_and(|n| n > after)) {
            Some(x) => x,
            None => panic!(
                "{}: no PASS beyond {after} within {timeout:?}{} ({})\n--- serial (tail) ---\n{}\n--- stderr ---\n{}",
                self.name,
                self.console_state(),
                calibrate::note(),
                tail(&self.serial.text(), 3000),
                self.stderr.text()
            ),
        };
        pass_number(&line).unwrap_or(0)
    }

    /// The PASS numbers printed so far, in order.
    pub fn passes(&self) -> Vec<u64> {
        complete_lines(&self.serial.text())
            .filter_map(pass_number)
            .collect()
    }

    /// Fail if the guest reported memory corruption.
    pub fn assert_no_corrupt(&self) {
        let text = self.serial.text();
        let bad: Vec<&str> = text.lines().filter(|l| l.contains("CORRUPT")).collect();
        assert!(
            bad.is_empty(),
            "{}: guest integrity check failed:\n{}",
            self.name,
            bad.join("\n")
        );
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    self.status = Some(s);
                }
            }
        }
        self.status
    }

    /// Has the process ended?
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.try_exit()
    }

    /// Wait for the process to end.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?} ({})\n--- serial (tail) ---\n{}\n--- stderr ---\n{}",
                self.name,
                calibrate::note(),
                tail(&self.serial.text(), 2000),
                self.stderr.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send signal `sig` (e.g. `libc::SIGSTOP` to freeze it, `SIGCONT`).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.pid();
        assert!(pid != 0, "{} has no process", self.name);
        // SAFETY: kill(2) on our own child's pid (not yet reaped: `child`
        // is still held), with a valid signal number.
        let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
        assert_eq!(
            r,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// SIGKILL it.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            if let Ok(s) = c.wait() {
                self.status = Some(s);
            }
        }
    }

    /// Write to the guest's serial console (needs [`VmmBuilder::with_stdin`]).
    pub fn type_serial(&mut self, s: &str) {
        use std::io::Write;
        let stdin = self
            .child
            .as_mut()
            .and_then(|c| c.stdin.as_mut())
            .expect("started without stdin");
        stdin.write_all(s.as_bytes()).expect("write serial");
        stdin.flush().expect("flush serial");
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test shows what each of its VMMs said.
            let status = self
                .exited()
                .map_or("running".to_string(), |s| format!("{s}"));
            eprintln!(
                "--- {} ({status}): stderr (tail) ---\n{}",
                self.name,
                tail(&self.stderr.text(), 3000)
            );
        }
        self.kill();
    }
}

/// Last `n` bytes of `s`.
pub fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// `PASS k ms=...` (or `PASS k`, the workload's deterministic output) → k.
/// `line` must be a whole line ([`complete_lines`]): "PASS 1" could be
/// the start of "PASS 12".
pub fn pass_number(line: &str) -> Option<u64> {
    let rest = &line[line.find("PASS ")? + 5..];
    rest.trim_end().split(' ').next()?.parse().ok()
}

/// The newline-terminated lines of captured text (not a last line still
/// being written), without their line ends.
pub fn complete_lines(text: &str) -> impl DoubleEndedIterator<Item = &str> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(str::trim_end)
}

/// What the process at the other end of `c` (a unix socket) is doing,
/// for the message of a command it did not answer: each thread's name,
/// state and kernel wait channel.
pub fn server_threads(c: &Client) -> String {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a `ucred` of `len` bytes, both ours and
    // valid for the call; the fd is the client's open socket.
    let r = unsafe {
        libc::getsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if r != 0 || cred.pid <= 0 {
        return "(server process unknown)".into();
    }
    let task = format!("/proc/{}/task", cred.pid);
    let Ok(dir) = std::fs::read_dir(&task) else {
        return format!("(process {} gone)", cred.pid);
    };
    let mut out = format!("process {}:", cred.pid);
    for t in dir.flatten() {
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
        let stat = read("stat");
        // The state follows the name's closing parenthesis.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        out += &format!(
            "\n  {} {} {} wchan={} {}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            state,
            read("wchan").trim(),
            read("syscall").split_whitespace().next().unwrap_or("")
        );
        // The kernel's stack (root only): a thread blocked in the kernel,
        // on a missing page for instance, cannot be stopped for gdb.
        for line in read("stack").lines().take(16) {
            out += &format!("\n      {}", line.trim());
        }
    }
    // Where each thread is, in the program (gdb, installed by setup.sh;
    // symbols are in the release binary). Bounded: gdb waits for every
    // thread to stop, and one blocked in the kernel never does.
    match std::process::Command::new("timeout")
        .args([
            "-k",
            "5",
            "30",
            "gdb",
            "-batch",
            "-nx",
            "-p",
            &cred.pid.to_string(),
        ])
        .args(["-ex", "thread apply all bt 30"])
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(o) => {
            out += "\n";
            out += &String::from_utf8_lossy(&o.stdout);
        }
        Err(e) => out += &format!("\n(no backtraces: timeout gdb: {e})"),
    }
    out
}

/// Wait for `query-migrate` to reach one of `states`; returns the reply.
pub fn wait_migration(c: &mut Client, states: &[&str], timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = c
            .execute("query-migrate", json!({}))
            .unwrap_or_else(|e| panic!("query-migrate: {e}; {}", server_threads(c)));
        if let Some(s) = r.get("status").and_then(Value::as_str) {
            if states.contains(&s) {
                return r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "migration did not reach {states:?} within {timeout:?} ({}): {r}",
            calibrate::note()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `query-status` → status string.
pub fn run_state(c: &mut Client) -> String {
    c.execute("query-status", json!({})).expect("query-status")["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Save a booted guest once per (builder args) and return the snapshot
/// path, so that scenarios start from `-incoming file:` instead of booting
/// (a boot costs 10-35 s here). The snapshot is keyed by the minivmm
/// binary, the images and the arguments, and shared between test processes
/// through a lock file. The saved guest has printed `PASS 2`.
pub fn snapshot(b: &VmmBuilder) -> PathBuf {
    let dir = root().join("target/e2e-snapshots");
    std::fs::create_dir_all(&dir).expect("snapshot dir");
    let mut h = DefaultHasher::new();
    for p in [
        minivmm_bin(),
        kernel(),
        b.initrd.clone().unwrap_or_else(initrd),
    ] {
        file_identity(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .hash(&mut h);
    }
    (&b.mem, b.smp, &b.append).hash(&mut h);
    let path = dir.join(format!("{:016x}.qevm", h.finish()));
    let _lock = lock_exclusive(&dir.join("lock"));
    if !path.exists() {
        let mut vm = b.clone().spawn();
        vm.wait_serial("GUEST-READY", boot_timeout());
        vm.wait_pass_beyond(1, boot_timeout());
        vm.assert_no_corrupt();
        let mut c = vm.qmp();
        let tmp = path.with_extension("tmp");
        c.execute("migrate", json!({"uri": format!("file:{}", tmp.display())}))
            .expect("migrate to file");
        let r = wait_migration(
            &mut c,
            &["completed", "failed"],
            scaled(Duration::from_secs(120)),
        );
        assert_eq!(r["status"], "completed", "saving the snapshot failed: {r}");
        std::fs::rename(&tmp, &path).expect("rename snapshot");
    }
    path
}

/// What identifies a version of the file at `p`: its path, size and
/// modification time (snapshots and the calibration are kept per version
/// of the binary and images).
pub(crate) fn file_identity(p: &Path) -> std::io::Result<String> {
    let m = std::fs::metadata(p)?;
    let mtime = m
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(format!("{}:{}:{mtime}", p.display(), m.len()))
}

/// An exclusive lock on `path` (created if missing), shared between test
/// processes; held until the returned file is dropped.
pub(crate) fn lock_exclusive(path: &Path) -> std::fs::File {
    let f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("lock file {}: {e}", path.display()));
    // SAFETY: flock on a valid fd; released when `f` is closed.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
    f
}

/// What a short-lived minivmm run printed and how it ended.
#[derive(Debug)]
pub struct RunOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

/// Run minivmm with exactly `args` (nothing added, stdin from /dev/null) and
/// wait for it to end; it is killed (and the test fails) after `timeout`.
pub fn run_minivmm(args: &[&str], timeout: Duration) -> RunOutput {
    run_program(&minivmm_bin(), args, None, timeout)
}

/// Run `program` with `args`, feeding `stdin` (or /dev/null), and wait for it
/// to end; it is killed (and the test fails) after `timeout`.
pub fn run_program(
    program: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> RunOutput {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; the closure runs in the child
    // between fork and exec and touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    fn drain(r: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    if let (Some(mut w), Some(data)) = (child.stdin.take(), stdin) {
        let data = data.to_vec();
        // A writer thread, so a program that does not read cannot block us.
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = w.write_all(&data);
        });
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {args:?} did not end within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                program.display(),
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    RunOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Number of open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

/// Whether the kernel may back process `pid`'s guest RAM with transparent
/// huge pages (`THPeligible` of its largest anonymous mapping of at least
/// `ram` bytes, in `/proc/PID/smaps`); `None` where the host has no THP or
/// has it off (`/sys/kernel/mm/transparent_hugepage/enabled`: never).
pub fn ram_huge_pages(pid: u32, ram: u64) -> Option<bool> {
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    if thp.contains("[never]") {
        return None;
    }
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/smaps: {e}"));
    let mut best: Option<(u64, bool)> = None;
    let mut cur: Option<u64> = None; // size of the current anonymous rw mapping
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next(), f.next()) {
            (Some("Size:"), Some(kb), _) => {
                cur = cur.map(|_| kb.parse::<u64>().unwrap_or(0) * 1024);
            }
            (Some("THPeligible:"), Some(v), _) => {
                if let Some(size) = cur.take() {
                    if size >= ram && best.is_none_or(|(b, _)| size > b) {
                        best = Some((size, v == "1"));
                    }
                }
            }
            (Some(range), Some(perms), Some(_)) if range.contains('-') && perms.len() == 4 => {
                // A mapping's first line: anonymous if it names no file.
                cur = (perms == "rw-p" && line.split_whitespace().count() == 5).then_some(0);
            }
            _ => {}
        }
    }
    let (_, eligible) =
        best.unwrap_or_else(|| panic!("no anonymous mapping of {ram} bytes in /proc/{pid}/smaps"));
    Some(eligible)
}

/// The first word of every 4 KiB page of the guest workload's buffer
/// (guest-images/workload: `PAGE_MAGIC`).
pub const PAGE_MAGIC: u64 = 0x4d56_4d4d_574c_4b44;

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// If `page` (4096 bytes) holds exactly the workload's pattern for some page
/// index and pass, returns `(index, pass)`. See guest-images/README.md,
/// "Page pattern".
pub fn workload_page(page: &[u8]) -> Option<(u64, u64)> {
    if page.len() != 4096 {
        return None;
    }
    let word = |w: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&page[w * 8..w * 8 + 8]);
        u64::from_le_bytes(b)
    };
    if word(0) != PAGE_MAGIC {
        return None;
    }
    let (i, k) = (word(1), word(2));
    let mut sum: u64 = 0xcbf2_9ce4_8422_2325;
    for w in 4..512 {
        let v = word(w);
        if v != splitmix64((i << 32) ^ (k << 12) ^ w as u64) {
            return None;
        }
        sum = (sum ^ v).wrapping_mul(0x0100_0000_01b3);
    }
    (word(3) == sum).then_some((i, k))
}

/// Every page of a memory dump that holds the workload's pattern, as
/// `(byte offset in the dump, page index, pass)`.
pub fn scan_workload_pages(dump: &[u8]) -> Vec<(usize, u64, u64)> {
    dump.chunks_exact(4096)
        .enumerate()
        .filter_map(|(n, p)| workload_page(p).map(|(i, k)| (n * 4096, i, k)))
        .collect()
}

/// What a [`Relay`] does to the migration stream (source to destination).
#[derive(Clone, Copy, Debug)]
pub enum Tamper {
    /// Pass everything through.
    None,
    /// XOR byte `at` of the stream with 0x40.
    Flip {
        /// Stream offset.
        at: u64,
    },
    /// Close both connections after `at` bytes.
    Truncate {
        /// Bytes passed before closing.
        at: u64,
    },
    /// Insert 64 bytes of 0xa5 before byte `at`.
    Garbage {
        /// Stream offset.
        at: u64,
    },
    /// Close both connections where the source's `COMMAND PING value`
    /// starts (the PING is not passed on): the destination is lost while
    /// the source waits for that PONG.
    CutAtPing {
        /// The PING's `be32` value (`stream::ping` in the migration crate).
        value: u32,
    },
}

/// The bytes a `COMMAND PING value` starts with: type 0x08, be16 command 2,
/// be16 length 4, be32 value (docs/migration-stream.md).
fn ping_bytes(value: u32) -> [u8; 9] {
    let v = value.to_be_bytes();
    [0x08, 0, 2, 0, 4, v[0], v[1], v[2], v[3]]
}

/// A TCP relay between a migration source and destination that can damage
/// the stream on the way; the return path is passed through untouched.
/// It relays every connection (a postcopy preempt channel is the second);
/// only the first one's stream is tampered with and counted. Its threads
/// end when either side closes.
pub struct Relay {
    /// Port the source connects to (127.0.0.1).
    pub port: u16,
    /// Bytes passed from source to destination so far.
    pub forwarded: Arc<AtomicUsize>,
    sockets: Arc<Mutex<Vec<std::net::TcpStream>>>,
    tamper: Arc<Mutex<Tamper>>,
    closed: Arc<AtomicBool>,
}

impl Drop for Relay {
    /// Stop accepting: wake the accept loop, which sees `closed` and ends,
    /// closing the listening socket.
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl Relay {
    /// Relay connections to `127.0.0.1:dst_port`, damaging the first one
    /// as `tamper` says.
    pub fn start(dst_port: u16, tamper: Tamper) -> Relay {
        Self::start_with_second(dst_port, tamper, Tamper::None)
    }

    /// The same, and the second connection (a postcopy preempt channel)
    /// damaged as `second` says (fixed; not counted in `forwarded`).
    pub fn start_with_second(dst_port: u16, tamper: Tamper, second: Tamper) -> Relay {
        use std::net::{TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        let port = l.local_addr().expect("relay addr").port();
        let forwarded = Arc::new(AtomicUsize::new(0));
        let fwd = forwarded.clone();
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let socks = sockets.clone();
        let tamper = Arc::new(Mutex::new(tamper));
        let tamper_now = tamper.clone();
        let closed = Arc::new(AtomicBool::new(false));
        let stop = closed.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while let Ok((src, _)) = l.accept() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(dst) = TcpStream::connect(("127.0.0.1", dst_port)) else {
                    return;
                };
                if let (Ok(a), Ok(b), Ok(mut v)) = (src.try_clone(), dst.try_clone(), socks.lock())
                {
                    v.push(a);
                    v.push(b);
                }
                let (fwd, tamper_now, socks) = if n == 0 {
                    (fwd.clone(), tamper_now.clone(), socks.clone())
                } else {
                    (
                        Arc::new(AtomicUsize::new(0)),
                        Arc::new(Mutex::new(if n == 1 { second } else { Tamper::None })),
                        Arc::new(Mutex::new(Vec::new())),
                    )
                };
                n += 1;
                std::thread::spawn(move || relay_one(src, dst, fwd, tamper_now, socks));
            }
        });
        Relay {
            port,
            forwarded,
            sockets,
            tamper,
            closed,
        }
    }

    /// Change what the relay does from now on (offsets are absolute stream
    /// offsets; see [`Relay::forwarded`]).
    pub fn set_tamper(&self, t: Tamper) {
        *self.tamper.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    /// Cut both connections now (a link failure).
    pub fn cut(&self) {
        if let Ok(v) = self.sockets.lock() {
            for s in v.iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// One relayed connection: source to destination through `tamper`, the
/// other direction untouched.
fn relay_one(
    src: std::net::TcpStream,
    dst: std::net::TcpStream,
    fwd: Arc<AtomicUsize>,
    tamper_now: Arc<Mutex<Tamper>>,
    socks: Arc<Mutex<Vec<std::net::TcpStream>>>,
) {
    use std::io::{Read, Write};
    use std::net::Shutdown;
    let (mut s2, mut d2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
    // Return path: destination to source, untouched.
    let (drained_tx, drained) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut d2, &mut s2);
        let _ = s2.shutdown(Shutdown::Write);
        let _ = drained_tx.send(());
    });
    let (mut src, mut dst) = (src, dst);
    let mut buf = vec![0u8; 64 << 10];
    let mut off: u64 = 0;
    // The last bytes of the previous chunk, so that a PING split between
    // two reads is still found.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let end = off + n as u64;
        // Counted before it is written: once the destination has acted on
        // these bytes (e.g. finished a COLO checkpoint), `forwarded` must
        // already include them, or a tamper placed at `forwarded` would
        // fall inside this chunk, behind the relay, and never happen.
        fwd.store(end as usize, Ordering::Relaxed);
        let tamper = *tamper_now.lock().unwrap_or_else(|e| e.into_inner());
        let ok = match tamper {
            Tamper::None => dst.write_all(chunk).is_ok(),
            Tamper::Flip { at } => {
                if (off..end).contains(&at) {
                    chunk[(at - off) as usize] ^= 0x40;
                }
                dst.write_all(chunk).is_ok()
            }
            Tamper::Truncate { at } => {
                if end >= at {
                    let _ = dst.write_all(&chunk[..at.saturating_sub(off) as usize]);
                    break;
                }
                dst.write_all(chunk).is_ok()
            }
            Tamper::Garbage { at } => {
                if (off..end).contains(&at) {
                    let k = (at - off) as usize;
                    dst.write_all(&chunk[..k]).is_ok()
                        && dst.write_all(&[0xa5; 64]).is_ok()
                        && dst.write_all(&chunk[k..]).is_ok()
                } else {
                    dst.write_all(chunk).is_ok()
                }
            }
            Tamper::CutAtPing { value } => {
                let pat = ping_bytes(value);
                let seen: Vec<u8> = tail.iter().chain(chunk.iter()).copied().collect();
                if let Some(p) = seen.windows(pat.len()).position(|w| w == pat) {
                    let k = p.saturating_sub(tail.len());
                    let _ = dst.write_all(&chunk[..k]);
                    let _ = src.shutdown(Shutdown::Both);
                    break;
                }
                tail = seen[seen.len().saturating_sub(pat.len() - 1)..].to_vec();
                dst.write_all(chunk).is_ok()
            }
        };
        off = end;
        if !ok {
            // The destination stopped reading (it refused the stream): let
            // what it still says on the return path (its reason) reach the
            // source before the source's side is shut.
            let _ = drained.recv_timeout(scaled(Duration::from_secs(5)));
            break;
        }
    }
    let _ = dst.shutdown(Shutdown::Both);
    let _ = src.shutdown(Shutdown::Both);
    // Close our clones too: a socket closed with unread data resets
    // the connection, so a peer blocked writing into it wakes up.
    socks.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// Save `size` bytes of guest RAM from guest-physical 0 with `pmemsave`
/// into the VM's work directory and read it back.
pub fn pmem_dump(vm: &mut Vmm, c: &mut Client, size: u64, name: &str) -> Vec<u8> {
    let path = vm.dir.path(name);
    c.execute(
        "pmemsave",
        json!({"val": 0, "size": size, "filename": path.display().to_string()}),
    )
    .expect("pmemsave");
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let _ = std::fs::remove_file(&path);
    assert_eq!(data.len() as u64, size, "pmemsave size");
    data
}

/// Indices of the 4 KiB pages that differ between two dumps.
pub fn differing_pages(a: &[u8], b: &[u8]) -> Vec<usize> {
    assert_eq!(a.len(), b.len(), "dumps of different sizes");
    a.chunks(4096)
        .zip(b.chunks(4096))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}

/// The kvmclock MSRs (0x4b564d00 wall clock, 0x4b564d01 system time) of
/// every vCPU in a saved migration stream. A `cpu` device section is
/// `0x04, be32 id, idstr "cpu", be32 instance, be32 version, be32 n` and n
/// bytes of postcard; in those, each MSR is a 16-byte `kvm_msr_entry` after
/// its length byte 0x10: `[index u32 LE, reserved 0, data u64 LE]`.
pub fn kvmclock_msrs(stream: &[u8]) -> Vec<(u32, u64)> {
    let key = b"\x03cpu";
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(p) = stream[i..].windows(key.len()).position(|w| w == key) {
        let at = i + p;
        i = at + key.len();
        if at < 5 || stream[at - 5] != 0x04 || stream.len() < i + 12 {
            continue;
        }
        let n = u32::from_be_bytes(stream[i + 8..i + 12].try_into().unwrap()) as usize;
        let state = &stream[i + 12..(i + 12 + n).min(stream.len())];
        for w in state.windows(17) {
            let index = u32::from_le_bytes(w[1..5].try_into().unwrap());
            if w[0] == 0x10
                && w[5..9] == [0, 0, 0, 0]
                && (index == 0x4b56_4d00 || index == 0x4b56_4d01)
            {
                out.push((index, u64::from_le_bytes(w[9..17].try_into().unwrap())));
            }
        }
    }
    out
}

/// Both sides paused after a migration (the source in `postmigrate`, the
/// destination started with `-S`): their first `size` bytes of RAM must be
/// identical page by page except the kvmclock areas that KVM rewrites when
/// the destination restores the clock MSRs (the wall-clock structure and
/// the vCPUs' pvclock structures: KVM writes them itself on KVM_SET_MSRS /
/// the first entry, with the destination host's TSC values). Which pages
/// those are is read from the vCPU state of a save of the source to a
/// file; any other differing page fails, named with its first bytes. The
/// workload's buffer must be in the dump.
pub fn assert_same_memory(
    src: &mut Vmm,
    sq: &mut Client,
    dst: &mut Vmm,
    dq: &mut Client,
    size: u64,
) {
    let a = pmem_dump(src, sq, size, "src.mem");
    let b = pmem_dump(dst, dq, size, "dst.mem");
    let diff = differing_pages(&a, &b);
    // The workload's buffer must be there, identical.
    assert!(
        scan_workload_pages(&a).len() >= 4000,
        "workload pages not found in the dump"
    );
    if !diff.is_empty() {
        // Which pages may differ: those the kvmclock MSRs point at.
        let file = src.dir.path("state.qevm");
        // A save is one-way: postcopy, if it was on, must be off for it,
        // and a file carries no TLS.
        sq.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "postcopy-ram", "state": false}]}),
        )
        .expect("migrate-set-capabilities");
        sq.execute("migrate-set-parameters", json!({"tls-creds": ""}))
            .expect("migrate-set-parameters");
        sq.execute(
            "migrate",
            json!({"uri": format!("file:{}", file.display())}),
        )
        .expect("migrate to file");
        let r = wait_migration(
            sq,
            &["completed", "failed"],
            scaled(Duration::from_secs(120)),
        );
        assert_eq!(r["status"], "completed", "{r}");
        let msrs = kvmclock_msrs(&std::fs::read(&file).expect("saved state"));
        assert!(!msrs.is_empty(), "no kvmclock MSRs in the saved vCPU state");
        let allowed: Vec<usize> = msrs
            .iter()
            .map(|(_, v)| ((v & !1) / 4096) as usize)
            .collect();
        for p in &diff {
            assert!(
                allowed.contains(p),
                "page {p:#x} (gpa {:#x}) differs and holds no kvmclock structure (those are at pages {allowed:x?}); first bytes src {:02x?} dst {:02x?}",
                p * 4096,
                &a[p * 4096..p * 4096 + 32],
                &b[p * 4096..p * 4096 + 32]
            );
        }
        eprintln!("pages differing (kvmclock areas, rewritten by KVM): {diff:x?}");
    }
}

/// `migrate-set-capabilities` with each `(name, state)` of `caps`.
pub fn set_caps(c: &mut Client, caps: &[(&str, bool)]) {
    let caps: Vec<Value> = caps
        .iter()
        .map(|(n, s)| json!({"capability": n, "state": s}))
        .collect();
    c.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
        .expect("migrate-set-capabilities");
}

/// The guest went on at the destination (which ran it without booting):
/// PASS numbers continue past the source's last one, and nobody saw
/// corruption.
pub fn assert_continues(src: &Vmm, dst: &Vmm) {
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last + 2, boot_timeout());
    let d = dst.passes();
    assert!(
        d.first().is_some_and(|&f| f <= last + 1),
        "PASS numbers jump from {last} (source) to {d:?} (destination)"
    );
    assert!(!dst.serial.text().contains("GUEST-READY"));
    src.assert_no_corrupt();
    dst.assert_no_corrupt();
}

/// The last whole `PASS k` line's k in `text` (0: none).
pub fn last_pass(text: &str) -> u64 {
    complete_lines(text)
        .rev()
        .find_map(pass_number)
        .unwrap_or(0)
}

/// COLO: wait until `c`'s `x-colo` counts `n` checkpoints (the migration
/// staying in `colo` meanwhile); returns that `query-migrate` reply.
pub fn wait_colo_checkpoints(c: &mut Client, n: u64, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = c
            .execute("query-migrate", json!({}))
            .expect("query-migrate");
        if r["x-colo"]["checkpoints"].as_u64().unwrap_or(0) >= n {
            return r;
        }
        assert_eq!(r["status"], "colo", "{r}");
        assert!(Instant::now() < deadline, "fewer than {n} checkpoints: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// COLO after failover: the secondary `s` prints two PASS lines past the
/// last one the primary `released`, and the output continues as
/// [`assert_output_continues`] says.
pub fn assert_takes_over(released: &str, s: &Vmm) {
    s.wait_pass_beyond(last_pass(released) + 2, boot_timeout());
    assert_output_continues(released, &s.serial.text());
}

/// COLO: the console output of the primary (what it released) followed by
/// the secondary's (after takeover) must count PASS 1, 2, 3 ... with no
/// gap and no repeat (output commit at work), and no CORRUPT.
pub fn assert_output_continues(released: &str, after: &str) {
    let text = format!("{released}{after}");
    let passes: Vec<u64> = complete_lines(&text).filter_map(pass_number).collect();
    assert!(passes.len() > 3, "too few PASS lines: {passes:?}");
    for w in passes.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "PASS sequence broken across failover: {passes:?}\n--- released by the primary (tail) ---\n{}\n--- secondary ---\n{}",
            tail(released, 600),
            tail(after, 600)
        );
    }
    assert!(!text.contains("CORRUPT"), "{text}");
}

/// The guest paused on both sides after a migration goes on at the
/// destination after `cont`: PASS numbers past the source's last one, and
/// no CORRUPT on either side.
pub fn cont_and_goes_on(src: &Vmm, dst: &Vmm, dq: &mut Client) {
    dq.execute("cont", json!({})).expect("cont");
    let last = src.passes().last().copied().unwrap_or(0);
    dst.wait_pass_beyond(last + 1, boot_timeout());
    dst.assert_no_corrupt();
    src.assert_no_corrupt();
}

/// TLS credentials made for a test by `tools/tls-certs.sh` (a new CA, a
/// server certificate for `localhost` and 127.0.0.1, a client
/// certificate), in a directory removed on drop.
pub struct TlsDir(WorkDir);

impl TlsDir {
    /// Fresh credentials (openssl is installed by `./setup.sh`).
    pub fn new(name: &str) -> Self {
        let d = WorkDir::new(name);
        let out = Command::new("sh")
            .arg(root().join("tools/tls-certs.sh"))
            .arg(d.path(""))
            .output()
            .expect("run tools/tls-certs.sh");
        assert!(
            out.status.success(),
            "tools/tls-certs.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(d)
    }

    /// The directory.
    pub fn dir(&self) -> PathBuf {
        self.0.path("")
    }

    /// `-object` value for credentials `tls0` with this directory.
    pub fn object(&self, endpoint: &str) -> String {
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint={endpoint}",
            self.dir().display()
        )
    }
}

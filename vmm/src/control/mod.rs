//! The control thread: one mio event loop that owns the [`Vm`] and its run
//! state, serves QMP, and coordinates migrations.
//!
//! Sources on the loop: QMP listeners and clients (tokens from
//! [`QMP_TOKENS`] up), stdin for `-serial stdio`, the i8042 reset eventfd,
//! a signalfd for SIGINT/SIGTERM/SIGHUP, and a `Waker` through which vCPU
//! threads and migration threads post [`CtlMsg`]s.
//!
//! A migration thread never touches the `Vm`: it asks the control thread
//! to stop, save, load or resume the machine ([`MachineRequest`]) and waits
//! for the answer, so QMP stays responsive during a migration and run-state
//! changes (and their QMP events) happen in one place.
//!
//! Submodules: [`runstate`] (the run states and their transitions, a pure
//! function), `commands` (QMP and HMP commands), [`migrations`] (the state
//! of this process's migrations and the glue to the engine threads).

mod commands;
pub mod migrations;
pub mod runstate;

use crate::dirtylimit::DirtyLimit;
use crate::dirtyrate::DirtyRate;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use qmp::{ErrorClass, QmpError};
use serde_json::json;

use migration::{Event as MigEvent, MachineError};

use self::migrations::{IncomingStartError, MachineRequest, Migrations};
use self::runstate::{Input, RunState, Step, Vcpus};
use crate::boot::BootSpec;
use crate::cli::{Config, Incoming, SerialSpec};
use crate::memory::MemLayout;
use crate::term::{RawStdout, RawTerminal};
use crate::vcpu::{self, VcpuEvent};
use crate::vm::{Vm, VmError, VmShape};
use devices::serial::SerialOut;
use migration::output::OutputGate;

const WAKER: Token = Token(0);
const STDIN: Token = Token(1);
const RESET: Token = Token(2);
const SIGNALS: Token = Token(3);
/// First token of the QMP server.
pub const QMP_TOKENS: usize = 16;

/// Errors that end minivmm.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Building or driving the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Memory layout.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The event loop failed.
    #[error("event loop")]
    Poll(#[source] std::io::Error),
    /// `-sandbox`.
    #[error("-sandbox")]
    Sandbox(#[source] crate::sandbox::SandboxError),
    /// A file or socket named on the command line.
    #[error("{0}")]
    File(String, #[source] std::io::Error),
    /// QMP setup.
    #[error("QMP")]
    Qmp(#[source] qmp::ServerError),
    /// A bad `-qmp` value.
    #[error("-qmp")]
    QmpSpec(#[source] qmp::ListenSpecError),
    /// TLS credentials could not be loaded.
    #[error("-object tls-creds-x509")]
    Tls(#[source] migration::tls::TlsError),
    /// A bad `-incoming` value.
    #[error("-incoming")]
    Incoming(#[source] migration::transport::TransportError),
    /// The guest hit something KVM cannot run.
    #[error("guest stopped: vCPU {0}: {1}")]
    Guest(u8, String),
    /// The incoming migration failed.
    #[error("incoming migration failed: {0}")]
    IncomingFailed(String),
    /// The run state does not allow it.
    #[error(transparent)]
    Refused(runstate::Refused),
}

/// Messages to the control thread.
pub enum CtlMsg {
    /// From a vCPU thread.
    Vcpu(VcpuEvent),
    /// From a migration thread.
    Machine(MachineRequest),
    /// Migration progress; `incoming` tells which side.
    Migration {
        /// Destination side?
        incoming: bool,
        /// What happened.
        event: MigEvent,
    },
}

/// Posts messages to the control thread and wakes it.
#[derive(Clone)]
pub struct CtlSender {
    tx: Arc<Mutex<Sender<CtlMsg>>>,
    waker: Arc<Waker>,
}

impl CtlSender {
    fn send(&self, m: CtlMsg) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(m);
        }
        let _ = self.waker.wake();
    }

    fn request<T>(
        &self,
        make: impl FnOnce(Sender<Result<T, MachineError>>) -> MachineRequest,
    ) -> Result<T, MachineError> {
        let (tx, rx) = channel();
        self.send(CtlMsg::Machine(make(tx)));
        rx.recv().map_err(|_| MachineError::Gone)?
    }
}

/// A blocked-signals signalfd for SIGINT, SIGTERM, SIGHUP.
struct SignalFd(std::os::fd::OwnedFd);

impl SignalFd {
    /// Block the signals in this thread (inherited by threads spawned later)
    /// and open a signalfd for them.
    fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: sigset_t is plain data, initialised by sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a sigset_t; standard signal numbers.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGHUP);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        // SAFETY: valid set; the fd is checked and then owned.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is fresh and ours.
        Ok(Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    /// The pending signal number, if any.
    fn read(&self) -> Option<u32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo)
    }
}

/// `-daemonize`, as QEMU: the process forks before it starts anything; the
/// parent waits on a pipe and exits 0 once the child says the VM is set up
/// (monitors listening, the incoming migration listening, the pidfile
/// written), or 1 if the child fails (it prints why) or dies first. The
/// child starts a new session and, once set up, puts /dev/null on its
/// standard streams.
struct Daemon {
    ready: std::fs::File,
}

impl Daemon {
    /// Fork; returns in the child only.
    fn fork() -> Result<Self, ControlError> {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors we then own; checked.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(ControlError::File(
                "-daemonize: pipe".into(),
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fresh descriptors from pipe2, each owned once.
        let (mut rd, wr) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        // SAFETY: no other thread exists yet (run() forks first thing), so
        // the child inherits a consistent process.
        match unsafe { libc::fork() } {
            -1 => Err(ControlError::File(
                "-daemonize: fork".into(),
                std::io::Error::last_os_error(),
            )),
            0 => {
                drop(rd);
                // SAFETY: setsid has no memory effects; failure is harmless
                // (we would stay in the parent's session).
                unsafe { libc::setsid() };
                Ok(Self { ready: wr })
            }
            _ => {
                drop(wr);
                let mut b = [1u8; 1];
                let code = match rd.read(&mut b) {
                    Ok(1) if b[0] == 0 => 0,
                    _ => 1,
                };
                // SAFETY: the parent leaves at once, running nothing the
                // child owns (no destructors: the pidfile, sockets).
                unsafe { libc::_exit(code) }
            }
        }
    }

    /// The VM is set up: let the parent go, detach from the terminal.
    fn ready(mut self) {
        use std::io::Write;
        let _ = self.ready.write_all(&[0]);
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            for fd in 0..3 {
                // SAFETY: dup3 onto the standard descriptors, which we own
                // (dup3, not dup2: the control thread's allowlist has only
                // dup3; /dev/null's descriptor is above 2, so they differ).
                unsafe { libc::dup3(null.as_raw_fd(), fd, 0) };
            }
        }
    }
}

/// Warn when a listener takes every address: a QMP monitor or a migration
/// port open to the network lets anyone who reaches it run `migrate exec:`
/// or read guest memory.
pub(super) fn warn_if_open(what: &str, spec: &str, host: &str) {
    if matches!(host, "" | "0" | "0.0.0.0" | "::" | "[::]") {
        log::warn!(
            "{what} {spec} listens on every address: anyone who reaches it controls this \
             VM; bind 127.0.0.1 (or a unix socket) unless that is what you want"
        );
    }
}

/// A pseudo-terminal for the serial console (`-chardev pty`): the master
/// carries the console, non-blocking (output nobody reads is dropped, as
/// QEMU does); minivmm holds the slave open in raw mode, so the master
/// never hangs up when a client (`screen`, `virsh console`) goes away.
struct Pty {
    master: std::fs::File,
    _slave: std::fs::File,
    /// The slave's path (`/dev/pts/N`).
    path: String,
}

impl Pty {
    fn open() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: posix_openpt returns a new descriptor or -1, checked.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let master = unsafe { std::fs::File::from_raw_fd(fd) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: grantpt/unlockpt act on our master fd; ptsname_r writes a
        // NUL-terminated path of at most `name.len()` bytes into `name`.
        let ok = unsafe {
            libc::grantpt(fd) == 0
                && libc::unlockpt(fd) == 0
                && libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) == 0
        };
        if !ok {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: ptsname_r succeeded, so `name` holds a C string.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)?;
        // SAFETY: termios is plain data; tcgetattr fills it, cfmakeraw edits
        // it, tcsetattr applies it to the slave we just opened.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
            }
        }
        Ok(Self {
            master,
            _slave: slave,
            path,
        })
    }
}

/// The pty master as the console's output: bytes nobody reads are dropped.
struct PtyOut(std::fs::File);

impl std::io::Write for PtyOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(buf.len()),
            r => r,
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn serial_output(spec: &SerialSpec, pty: Option<&Pty>) -> Result<SerialOut, ControlError> {
    Ok(match spec {
        SerialSpec::Stdio => {
            Box::new(RawStdout::new().map_err(|e| ControlError::File("stdout".into(), e))?)
        }
        SerialSpec::File(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| {
                    ControlError::File(format!("cannot open serial file {}", p.display()), e)
                })?,
        ),
        SerialSpec::Pty => match pty {
            Some(p) => Box::new(PtyOut(
                p.master
                    .try_clone()
                    .map_err(|e| ControlError::File("pty".into(), e))?,
            )),
            None => Box::new(std::io::sink()),
        },
        SerialSpec::None => Box::new(std::io::sink()),
    })
}

/// The kernel command line: the user's, plus what the CPU model needs here.
fn guest_cmdline(config: &Config) -> String {
    match config.cpu.guest_cmdline() {
        Some(extra) if !config.append.is_empty() => format!("{} {extra}", config.append),
        Some(extra) => extra.to_string(),
        None => config.append.clone(),
    }
}

/// Run a VM until it ends; returns the exit status.
pub fn run(config: Config) -> Result<u8, ControlError> {
    let daemon = if config.daemonize {
        Some(Daemon::fork()?)
    } else {
        None
    };
    // Before any thread starts: every thread inherits it.
    crate::sandbox::install(config.sandbox).map_err(ControlError::Sandbox)?;
    let signals = SignalFd::new().map_err(|e| ControlError::File("signalfd".into(), e))?;
    vcpu::install_kick_handler()
        .map_err(|e| ControlError::File("signal handler".into(), e.into()))?;
    crate::sandbox::start_spawner().map_err(ControlError::Sandbox)?;
    std::fs::metadata(&config.kernel).map_err(|e| {
        ControlError::File(format!("cannot read kernel {}", config.kernel.display()), e)
    })?;

    let mut poll = Poll::new().map_err(ControlError::Poll)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(ControlError::Poll)?);
    let (tx, rx) = channel::<CtlMsg>();
    let ctl_tx = CtlSender {
        tx: Arc::new(Mutex::new(tx)),
        waker,
    };
    let vcpu_tx = ctl_tx.clone();
    let notify: Arc<dyn Fn(VcpuEvent) + Send + Sync> =
        Arc::new(move |ev| vcpu_tx.send(CtlMsg::Vcpu(ev)));

    let shape = VmShape {
        layout: MemLayout::new(config.mem_size, config.hole_start)?,
        vcpus: config.vcpus,
        cpu: config.cpu,
        prealloc: config.mem_prealloc,
        dirty_ring: config.dirty_ring_size,
    };
    let boot = BootSpec {
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        cmdline: guest_cmdline(&config),
    };
    let pty = match config.serial {
        SerialSpec::Pty => {
            let p = Pty::open().map_err(|e| ControlError::File("cannot open a pty".into(), e))?;
            // QEMU's words: tools (libvirt) read the path from here.
            log::info!(
                "char device redirected to {} (label {})",
                p.path,
                config.serial_label
            );
            Some(p)
        }
        _ => None,
    };
    let gate = OutputGate::new(serial_output(&config.serial, pty.as_ref())?);
    let vm = Vm::new(shape, boot, Box::new(gate.clone()), notify)?;
    if !config.dump_guest_core {
        crate::memory::dont_dump(vm.memory());
    }
    // After the vCPU threads started (they keep the default): this thread
    // mostly sleeps, and a stopped guest waits on it (a migration's stop
    // and resume, every COLO checkpoint).
    migration::prefer_this_thread();

    let mut server = qmp::Server::new(poll.registry(), QMP_TOKENS).map_err(ControlError::Qmp)?;
    let monitors = (config.qmp.iter().map(|s| (s, qmp::MonitorMode::Control)))
        .chain(config.hmp.iter().map(|s| (s, qmp::MonitorMode::Readline)));
    for (spec, mode) in monitors {
        let spec = qmp::ListenSpec::parse(spec).map_err(ControlError::QmpSpec)?;
        if let qmp::ListenSpec::Tcp { host, .. } = &spec {
            let what = match mode {
                qmp::MonitorMode::Control => "QMP monitor",
                qmp::MonitorMode::Readline => "human monitor",
            };
            warn_if_open(what, &spec.to_string(), host);
        }
        server
            .listen_monitor(&spec, mode)
            .map_err(ControlError::Qmp)?;
    }
    let events = server.event_sender();

    let tls_creds = config
        .tls_creds
        .iter()
        .map(|t| {
            migration::tls::TlsCreds::load(&t.id, &t.dir, t.endpoint, t.verify_peer).map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(ControlError::Tls)?;
    let mut ctl = Control {
        vm,
        tls_creds,
        runstate: RunState::initial(config.start_paused),
        ctl_tx,
        rx,
        events,
        mig: Migrations::default(),
        dirty_rate: DirtyRate::default(),
        dirty_limit: DirtyLimit::new(usize::from(config.vcpus)),
        gate,
        quit: false,
        exit: None,
        stdin_open: false,
        pty,
        config,
    };
    match ctl.config.incoming.clone() {
        Some(Incoming::Uri(uri)) => ctl.start_incoming(&uri).map_err(|e| {
            ControlError::Incoming(match e {
                IncomingStartError::Transport(t) => t,
                IncomingStartError::Other(s) => migration::transport::TransportError::BadUri(s),
            })
        })?,
        // RAM is discarded when migrate-incoming starts listening.
        Some(Incoming::Defer) => ctl.enter(Input::IncomingStarted)?,
        None => {}
    }
    if let Some(p) = &ctl.config.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| ControlError::File(format!("cannot write pidfile {}", p.display()), e))?;
    }

    let _term = (ctl.config.serial == SerialSpec::Stdio)
        .then(RawTerminal::enable)
        .flatten();
    ctl.register(&poll, &signals)?;
    if ctl.runstate == RunState::Running {
        ctl.vm.resume()?;
    }
    // From here on the control thread only serves: its allowlist.
    crate::sandbox::confine_control().map_err(ControlError::Sandbox)?;
    if let Some(d) = daemon {
        d.ready();
    }
    let result = ctl.event_loop(&mut poll, &mut server, &signals);
    // QEMU removes its pidfile on a clean exit.
    if let Some(p) = &ctl.config.pidfile {
        let _ = std::fs::remove_file(p);
    }
    server.flush_blocking(std::time::Duration::from_secs(2));
    if let Some(s) = &ctl.mig.outgoing {
        s.request_cancel();
    }
    let _ = ctl.vm.pause();
    devices::bus::lock(ctl.vm.serial()).flush();
    result
}

/// The control thread's state.
struct Control {
    vm: Vm,
    config: Config,
    runstate: RunState,
    ctl_tx: CtlSender,
    rx: Receiver<CtlMsg>,
    events: qmp::EventSender,
    /// This process's migrations.
    mig: Migrations,
    /// `-object tls-creds-x509` objects, loaded.
    tls_creds: Vec<Arc<migration::tls::TlsCreds>>,
    /// `calc-dirty-rate`'s measurement.
    dirty_rate: DirtyRate,
    /// The vCPUs' dirty page limits.
    dirty_limit: DirtyLimit,
    /// The guest's console output (held during COLO on the primary).
    gate: OutputGate,
    quit: bool,
    exit: Option<u8>,
    stdin_open: bool,
    /// The serial console's pty (`-chardev pty`), read like stdin.
    pty: Option<Pty>,
}

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::new(ErrorClass::GenericError, desc)
}

impl Control {
    /// Register the loop's own sources: the reset eventfd, the signalfd and
    /// stdin for `-serial stdio`.
    fn register(&mut self, poll: &Poll, signals: &SignalFd) -> Result<(), ControlError> {
        let reg = poll.registry();
        reg.register(
            &mut SourceFd(&self.vm.reset_evt.as_raw_fd()),
            RESET,
            Interest::READABLE,
        )
        .map_err(ControlError::Poll)?;
        reg.register(
            &mut SourceFd(&signals.0.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )
        .map_err(ControlError::Poll)?;
        if let Some(p) = &self.pty {
            reg.register(
                &mut SourceFd(&p.master.as_raw_fd()),
                STDIN,
                Interest::READABLE,
            )
            .map_err(ControlError::Poll)?;
        } else if self.config.serial == SerialSpec::Stdio {
            let fd = std::io::stdin().as_raw_fd();
            // stdin may be /dev/null or a file, which epoll refuses: then no input.
            self.stdin_open = reg
                .register(&mut SourceFd(&fd), STDIN, Interest::READABLE)
                .is_ok();
        }
        Ok(())
    }

    /// Serve the loop until the VM ends (its exit status) or fails.
    fn event_loop(
        &mut self,
        poll: &mut Poll,
        server: &mut qmp::Server,
        signals: &SignalFd,
    ) -> Result<u8, ControlError> {
        let mut poll_events = Events::with_capacity(64);
        loop {
            if let Err(e) = poll.poll(&mut poll_events, None) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ControlError::Poll(e));
            }
            for ev in poll_events.iter() {
                match ev.token() {
                    WAKER => self.messages()?,
                    STDIN => self.stdin(poll),
                    RESET => {
                        let _ = self.vm.reset_evt.read();
                        self.guest_reset()?;
                    }
                    SIGNALS => {
                        if let Some(sig) = signals.read() {
                            log::info!("terminating on signal {sig}");
                            self.shutdown_event("host-signal", false);
                            self.exit = Some(0);
                        }
                    }
                    t if server.owns(t) => {
                        server.handle_event(ev, &mut |cmd| self.execute(cmd));
                    }
                    _ => {}
                }
            }
            if self.quit {
                self.exit = Some(0);
            }
            if let Some(code) = self.exit {
                return Ok(code);
            }
        }
    }

    /// Carry out a run-state step: pause or resume the vCPUs (with the QMP
    /// event `STOP` or `RESUME`), then take the new state.
    fn apply(&mut self, step: Step) -> Result<(), ControlError> {
        match step {
            Step::To(state, Vcpus::Pause) => {
                let was = self.vm.is_running();
                self.vm.pause()?;
                self.paused_into(state, was);
            }
            Step::To(state, Vcpus::Resume) => {
                self.vm.resume()?;
                self.runstate = state;
                self.events.send("RESUME", None);
            }
            Step::To(state, Vcpus::Keep) => self.runstate = state,
            Step::Stay => {}
            Step::PauseAfterIncoming => self.config.start_paused = true,
        }
        Ok(())
    }

    /// What `input` does to the run state, carried out. Only `cont` can be
    /// refused, and it goes through [`runstate::step`] itself.
    fn enter(&mut self, input: Input) -> Result<(), ControlError> {
        let step = runstate::step(self.runstate, input).map_err(ControlError::Refused)?;
        self.apply(step)
    }

    /// The vCPUs were paused already (`was`: they ran before): take the
    /// state `input` leads to, and send `STOP` if they ran.
    fn stopped(&mut self, was: bool, input: Input) {
        if let Ok(Step::To(state, _)) = runstate::step(self.runstate, input) {
            self.paused_into(state, was);
        }
    }

    /// The vCPUs are paused: take `state`, and send `STOP` if they ran
    /// before (`was`).
    fn paused_into(&mut self, state: RunState, was: bool) {
        self.runstate = state;
        if was {
            self.events.send("STOP", None);
        }
    }

    fn shutdown_event(&self, reason: &str, guest: bool) {
        self.events
            .send("SHUTDOWN", Some(json!({"guest": guest, "reason": reason})));
    }

    fn messages(&mut self) -> Result<(), ControlError> {
        while let Ok(m) = self.rx.try_recv() {
            match m {
                CtlMsg::Vcpu(VcpuEvent::Reset) => self.guest_reset()?,
                CtlMsg::Vcpu(VcpuEvent::Shutdown) => {
                    self.shutdown_event("guest-shutdown", true);
                    self.enter(Input::GuestShutdown)?;
                    if self.config.no_shutdown {
                        // -no-shutdown: stay, stopped (QEMU sends STOP).
                        if self.vm.is_running() {
                            self.vm.pause()?;
                            self.events.send("STOP", None);
                        }
                    } else {
                        self.exit = Some(0);
                    }
                }
                CtlMsg::Vcpu(VcpuEvent::Fatal(id, msg)) => {
                    self.enter(Input::GuestFatal)?;
                    return Err(ControlError::Guest(id, msg));
                }
                CtlMsg::Machine(req) => self.machine_request(req),
                CtlMsg::Migration { incoming, event } => self.migration_event(incoming, event)?,
            }
        }
        Ok(())
    }

    fn guest_reset(&mut self) -> Result<(), ControlError> {
        if self.config.no_reboot {
            self.shutdown_event("guest-reset", true);
            self.exit = Some(0);
            return Ok(());
        }
        self.vm.reset()?;
        self.events.send(
            "RESET",
            Some(json!({"guest": true, "reason": "guest-reset"})),
        );
        Ok(())
    }

    fn stdin(&mut self, poll: &Poll) {
        let mut buf = [0u8; 256];
        if let Some(p) = &mut self.pty {
            // Non-blocking, edge-triggered: read it all.
            while let Ok(n @ 1..) = p.master.read(&mut buf) {
                devices::bus::lock(self.vm.serial()).queue_input(&buf[..n]);
            }
            return;
        }
        match std::io::stdin().lock().read(&mut buf) {
            Ok(0) | Err(_) => {
                if self.stdin_open {
                    let fd = std::io::stdin().as_raw_fd();
                    let _ = poll.registry().deregister(&mut SourceFd(&fd));
                    self.stdin_open = false;
                }
            }
            Ok(n) => devices::bus::lock(self.vm.serial()).queue_input(&buf[..n]),
        }
    }
}

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

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use qmp::{Command, ErrorClass, QmpError};
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress};

use migration::status::{Capabilities, Parameters, Shared, Status};
use migration::stream::DeviceBlob;
use migration::transport::{Listener, Uri};
use migration::{Event as MigEvent, IncomingMachine, Machine, Stopped};

use crate::boot::BootSpec;
use crate::cli::{Config, Incoming, SerialSpec};
use crate::memory::MemLayout;
use crate::migrate::{self, KvmRam};
use crate::term::{OutputGate, RawStdout, RawTerminal};
use crate::vcpu::{self, VcpuEvent};
use crate::vm::{Vm, VmError, VmShape};
use devices::serial::SerialOut;

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
    /// A file or socket named on the command line.
    #[error("{0}")]
    File(String, #[source] std::io::Error),
    /// QMP setup.
    #[error("QMP")]
    Qmp(#[source] qmp::ServerError),
    /// A bad `-qmp` value.
    #[error("-qmp")]
    QmpSpec(#[source] qmp::ListenSpecError),
    /// A bad `-incoming` value.
    #[error("-incoming")]
    Incoming(#[source] migration::transport::TransportError),
    /// The guest hit something KVM cannot run.
    #[error("guest stopped: vCPU {0}: {1}")]
    Guest(u8, String),
    /// The incoming migration failed.
    #[error("incoming migration failed: {0}")]
    IncomingFailed(String),
}

/// What a migration thread asks of the machine.
pub enum MachineRequest {
    /// Stop and save all device state (final round, postcopy switch, COLO
    /// checkpoint).
    Stop(Sender<Result<Stopped, String>>),
    /// Resume after a failed migration.
    Resume(Sender<Result<(), String>>),
    /// Load all device state (incoming).
    Load(Vec<DeviceBlob>, Sender<Result<(), String>>),
    /// Postcopy failed on the destination: stop the guest for good.
    Abandon(String, Sender<Result<(), String>>),
    /// This side's migration capabilities.
    Caps(Sender<Result<Capabilities, String>>),
    /// COLO primary: hold (true) or release and pass (false) console output.
    HoldOutput(bool, Sender<Result<(), String>>),
    /// COLO primary: release the held console output.
    ReleaseOutput(Sender<Result<(), String>>),
    /// COLO secondary: load a checkpoint, guest stays paused.
    ColoLoad(Vec<DeviceBlob>, Sender<Result<(), String>>),
    /// COLO secondary: failover, run the guest.
    ColoTakeover(Sender<Result<(), String>>),
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
        make: impl FnOnce(Sender<Result<T, String>>) -> MachineRequest,
    ) -> Result<T, String> {
        let (tx, rx) = channel();
        self.send(CtlMsg::Machine(make(tx)));
        rx.recv()
            .map_err(|_| "the VMM is shutting down".to_string())?
    }
}

/// The machine as a migration thread sees it.
struct ProxyMachine(CtlSender);

impl Machine for ProxyMachine {
    fn stop(&mut self) -> Result<Stopped, String> {
        self.0.request(MachineRequest::Stop)
    }
    fn resume(&mut self) -> Result<(), String> {
        self.0.request(MachineRequest::Resume)
    }
    fn hold_output(&mut self, hold: bool) -> Result<(), String> {
        self.0.request(|tx| MachineRequest::HoldOutput(hold, tx))
    }
    fn release_output(&mut self) -> Result<(), String> {
        self.0.request(MachineRequest::ReleaseOutput)
    }
}

impl IncomingMachine for ProxyMachine {
    fn load_devices(&mut self, blobs: Vec<DeviceBlob>) -> Result<(), String> {
        self.0.request(|tx| MachineRequest::Load(blobs, tx))
    }
    fn capabilities(&mut self) -> Capabilities {
        self.0.request(MachineRequest::Caps).unwrap_or_default()
    }
    fn colo_load(&mut self, blobs: Vec<DeviceBlob>) -> Result<(), String> {
        self.0.request(|tx| MachineRequest::ColoLoad(blobs, tx))
    }
    fn colo_takeover(&mut self) -> Result<(), String> {
        self.0.request(MachineRequest::ColoTakeover)
    }
    fn abandon(&mut self, why: &str) {
        // Bounded: if the control thread itself waits on a missing page,
        // the caller releases userfaultfd next, which unblocks it.
        let (tx, rx) = channel();
        self.0.send(CtlMsg::Machine(MachineRequest::Abandon(
            why.to_string(),
            tx,
        )));
        let _ = rx.recv_timeout(std::time::Duration::from_secs(2));
    }
}

/// QEMU's run states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Created with -S, never started.
    Prelaunch,
    /// Running.
    Running,
    /// Stopped by the user.
    Paused,
    /// Waiting for an incoming migration.
    InMigrate,
    /// Stopped for a migration's final round.
    FinishMigrate,
    /// Stopped after a successful outgoing migration.
    PostMigrate,
    /// The guest powered off.
    Shutdown,
    /// KVM could not run the guest.
    InternalError,
    /// Stopped for a COLO checkpoint (primary) or kept as the COLO secondary.
    Colo,
}

impl RunState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Prelaunch => "prelaunch",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::InMigrate => "inmigrate",
            Self::FinishMigrate => "finish-migrate",
            Self::PostMigrate => "postmigrate",
            Self::Shutdown => "shutdown",
            Self::InternalError => "internal-error",
            Self::Colo => "colo",
        }
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

fn serial_output(spec: &SerialSpec) -> Result<SerialOut, ControlError> {
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
        SerialSpec::UnixServer(_) | SerialSpec::None => Box::new(std::io::sink()),
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
    let signals = SignalFd::new().map_err(|e| ControlError::File("signalfd".into(), e))?;
    vcpu::install_kick_handler()
        .map_err(|e| ControlError::File("signal handler".into(), e.into()))?;
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
    };
    let boot = BootSpec {
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        cmdline: guest_cmdline(&config),
    };
    let gate = OutputGate::new(serial_output(&config.serial)?);
    let vm = Vm::new(shape, boot, Box::new(gate.clone()), notify)?;
    // After the vCPU threads started (they keep the default): this thread
    // mostly sleeps, and a stopped guest waits on it (a migration's stop
    // and resume, every COLO checkpoint).
    migration::prefer_this_thread();

    let mut server = qmp::Server::new(poll.registry(), QMP_TOKENS).map_err(ControlError::Qmp)?;
    for spec in &config.qmp {
        let spec = qmp::ListenSpec::parse(spec).map_err(ControlError::QmpSpec)?;
        server.listen(&spec).map_err(ControlError::Qmp)?;
    }
    let events = server.event_sender();

    let mut ctl = Control {
        vm,
        runstate: if config.start_paused {
            RunState::Prelaunch
        } else {
            RunState::Running
        },
        ctl_tx,
        rx,
        events,
        caps: Capabilities::default(),
        params: Parameters::default(),
        outgoing: None,
        outgoing_postcopy: false,
        guest_incomplete: false,
        gate,
        colo_mode: "none",
        colo_last_mode: "none",
        colo_reason: "none",
        colo_state: None,
        incoming: None,
        mig: Arc::new(Shared::default()),
        incoming_mig: Arc::new(Shared::default()),
        was_running_before_migration: false,
        quit: false,
        exit: None,
        stdin_open: false,
        config,
    };
    match ctl.config.incoming.clone() {
        Some(Incoming::Uri(uri)) => ctl.start_incoming(&uri, true).map_err(|e| {
            ControlError::Incoming(match e {
                IncomingStartError::Transport(t) => t,
                IncomingStartError::Other(s) => migration::transport::TransportError::BadUri(s),
            })
        })?,
        // RAM is discarded when migrate-incoming starts listening.
        Some(Incoming::Defer) => ctl.runstate = RunState::InMigrate,
        None => {}
    }
    if let Some(p) = &ctl.config.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| ControlError::File(format!("cannot write pidfile {}", p.display()), e))?;
    }

    let _term = (ctl.config.serial == SerialSpec::Stdio)
        .then(RawTerminal::enable)
        .flatten();
    let reg = poll.registry();
    reg.register(
        &mut SourceFd(&ctl.vm.reset_evt.as_raw_fd()),
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
    if ctl.config.serial == SerialSpec::Stdio {
        let fd = std::io::stdin().as_raw_fd();
        // stdin may be /dev/null or a file, which epoll refuses: then no input.
        ctl.stdin_open = reg
            .register(&mut SourceFd(&fd), STDIN, Interest::READABLE)
            .is_ok();
    }
    if ctl.runstate == RunState::Running {
        ctl.vm.resume()?;
    }

    let mut poll_events = Events::with_capacity(64);
    let result = loop {
        if let Err(e) = poll.poll(&mut poll_events, None) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break Err(ControlError::Poll(e));
        }
        let mut failed = None;
        for ev in poll_events.iter() {
            let r = match ev.token() {
                WAKER => ctl.messages(),
                STDIN => {
                    ctl.stdin(&poll);
                    Ok(())
                }
                RESET => {
                    let _ = ctl.vm.reset_evt.read();
                    ctl.guest_reset()
                }
                SIGNALS => {
                    if let Some(sig) = signals.read() {
                        eprintln!("minivmm: terminating on signal {sig}");
                        ctl.shutdown_event("host-signal", false);
                        ctl.exit = Some(0);
                    }
                    Ok(())
                }
                t if server.owns(t) => {
                    server.handle_event(ev, &mut |cmd| ctl.execute(cmd));
                    Ok(())
                }
                _ => Ok(()),
            };
            if let Err(e) = r {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        if ctl.quit {
            ctl.exit = Some(0);
        }
        if let Some(code) = ctl.exit {
            break Ok(code);
        }
    };
    server.flush_blocking(std::time::Duration::from_secs(2));
    if let Some(s) = &ctl.outgoing {
        s.request_cancel();
    }
    let _ = ctl.vm.pause();
    devices::bus::lock(ctl.vm.serial()).flush();
    result
}

enum IncomingStartError {
    Transport(migration::transport::TransportError),
    Other(String),
}

struct Control {
    vm: Vm,
    config: Config,
    runstate: RunState,
    ctl_tx: CtlSender,
    rx: Receiver<CtlMsg>,
    events: qmp::EventSender,
    caps: Capabilities,
    params: Parameters,
    /// The running outgoing migration.
    outgoing: Option<Arc<Shared>>,
    /// The running outgoing migration was started with postcopy-ram.
    outgoing_postcopy: bool,
    /// Postcopy failed after this destination started the guest: its RAM
    /// is incomplete and it must not run again.
    guest_incomplete: bool,
    /// The guest's console output (held during COLO on the primary).
    gate: OutputGate,
    /// COLO mode now: "none", "primary" or "secondary".
    colo_mode: &'static str,
    /// The mode before COLO last ended.
    colo_last_mode: &'static str,
    /// Why COLO last ended ("none", "request", "error").
    colo_reason: &'static str,
    /// COLO secondary: the machine state of the last complete checkpoint,
    /// loaded into KVM only at takeover (the guest does not run before).
    colo_state: Option<Box<crate::vm::MachineState>>,
    /// The running incoming migration.
    incoming: Option<Arc<Shared>>,
    /// The last outgoing migration's state (query-migrate on the source).
    mig: Arc<Shared>,
    /// The last incoming migration's state (query-migrate on the destination).
    incoming_mig: Arc<Shared>,
    was_running_before_migration: bool,
    quit: bool,
    exit: Option<u8>,
    stdin_open: bool,
}

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::new(ErrorClass::GenericError, desc)
}

impl Control {
    fn set_runstate(&mut self, s: RunState) {
        self.runstate = s;
    }

    fn stop_vm(&mut self, to: RunState) -> Result<(), VmError> {
        let was = self.vm.is_running();
        self.vm.pause()?;
        self.stopped(was, to);
        Ok(())
    }

    /// The run state and event after a pause (`was`: it was running).
    fn stopped(&mut self, was: bool, to: RunState) {
        self.set_runstate(to);
        if was {
            self.events.send("STOP", None);
        }
    }

    fn start_vm(&mut self) -> Result<(), VmError> {
        self.vm.resume()?;
        self.set_runstate(RunState::Running);
        self.events.send("RESUME", None);
        Ok(())
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
                    self.set_runstate(RunState::Shutdown);
                    self.exit = Some(0);
                }
                CtlMsg::Vcpu(VcpuEvent::Fatal(id, msg)) => {
                    self.set_runstate(RunState::InternalError);
                    return Err(ControlError::Guest(id, msg));
                }
                CtlMsg::Machine(req) => self.machine_request(req),
                CtlMsg::Migration { incoming, event } => self.migration_event(incoming, event)?,
            }
        }
        Ok(())
    }

    fn machine_request(&mut self, req: MachineRequest) {
        match req {
            MachineRequest::Stop(reply) => {
                let was = self.vm.is_running();
                let colo = self.colo_mode == "primary";
                if !colo {
                    self.was_running_before_migration = was;
                }
                let saved = self.vm.pause_and_save();
                if !self.vm.is_running() {
                    let to = if colo {
                        RunState::Colo
                    } else {
                        RunState::FinishMigrate
                    };
                    self.stopped(was, to);
                }
                let r = saved
                    .map_err(|e| error_chain(&e))
                    .and_then(|st| migrate::to_blobs(&st, self.was_running_before_migration))
                    .map(|devices| Stopped { devices });
                let _ = reply.send(r);
            }
            MachineRequest::Resume(reply) => {
                // A COLO primary always runs between checkpoints.
                let r = if self.was_running_before_migration || self.colo_mode == "primary" {
                    self.start_vm().map_err(|e| error_chain(&e))
                } else {
                    self.set_runstate(RunState::Paused);
                    Ok(())
                };
                let _ = reply.send(r);
            }
            MachineRequest::Load(blobs, reply) => {
                let r = self.load_incoming(blobs);
                let _ = reply.send(r);
            }
            MachineRequest::Caps(reply) => {
                let _ = reply.send(Ok(self.caps));
            }
            MachineRequest::HoldOutput(hold, reply) => {
                let _ = reply.send(
                    self.gate
                        .set_hold(hold)
                        .map_err(|e| format!("console output: {e}")),
                );
            }
            MachineRequest::ReleaseOutput(reply) => {
                let _ = reply.send(
                    self.gate
                        .release()
                        .map_err(|e| format!("console output: {e}")),
                );
            }
            MachineRequest::ColoLoad(blobs, reply) => {
                // Checked now (sections, versions, vCPU count); loading into
                // KVM waits for a takeover, which costs the checkpoint pause
                // nothing and keeps KVM from writing the clock pages here.
                let r = migrate::from_blobs(blobs, self.vm.shape()).map(|(st, _)| {
                    self.colo_state = Some(Box::new(st));
                    self.set_runstate(RunState::Colo);
                });
                let _ = reply.send(r);
            }
            MachineRequest::ColoTakeover(reply) => {
                let r = match self.colo_state.take() {
                    Some(st) => {
                        self.vm.ram_loaded();
                        self.vm
                            .restore_state(&st)
                            .and_then(|()| self.start_vm())
                            .map_err(|e| error_chain(&e))
                    }
                    None => Err("no COLO checkpoint to take over from".to_string()),
                };
                let _ = reply.send(r);
            }
            MachineRequest::Abandon(why, reply) => {
                eprintln!("minivmm: postcopy failed, the guest is stopped: {why}");
                self.guest_incomplete = true;
                let r = if self.vm.is_running() {
                    self.stop_vm(RunState::Paused).map_err(|e| error_chain(&e))
                } else {
                    self.set_runstate(RunState::Paused);
                    Ok(())
                };
                let _ = reply.send(r);
            }
        }
    }

    fn load_incoming(&mut self, blobs: Vec<DeviceBlob>) -> Result<(), String> {
        let (st, running) = migrate::from_blobs(blobs, self.vm.shape())?;
        self.vm.restore_state(&st).map_err(|e| error_chain(&e))?;
        if running && !self.config.start_paused {
            self.start_vm().map_err(|e| error_chain(&e))?;
        } else {
            self.set_runstate(RunState::Paused);
        }
        Ok(())
    }

    fn migration_event(&mut self, incoming: bool, event: MigEvent) -> Result<(), ControlError> {
        match event {
            MigEvent::Status(s) => {
                if s == Status::Colo {
                    self.colo_mode = if incoming { "secondary" } else { "primary" };
                }
                if self.caps.events {
                    self.events
                        .send("MIGRATION", Some(json!({"status": s.as_str()})));
                }
                if s.is_final() {
                    if incoming {
                        self.incoming = None;
                        if s == Status::Completed {
                            self.vm.ram_loaded();
                        } else {
                            let desc = self
                                .incoming_mig
                                .info()
                                .error_desc
                                .clone()
                                .unwrap_or_default();
                            if self.guest_incomplete {
                                // Postcopy broke after the switch: stay up,
                                // paused, so the user can inspect it; `cont`
                                // is refused.
                                eprintln!("minivmm: incoming postcopy migration failed: {desc}");
                                return Ok(());
                            }
                            eprintln!("minivmm: incoming migration failed: {desc}");
                            return Err(ControlError::IncomingFailed(desc));
                        }
                    } else {
                        self.outgoing = None;
                        if self.colo_last_mode == "primary" && s == Status::Completed {
                            // Left COLO and runs alone.
                        } else if s == Status::Completed || self.mig.info().postcopy_after_run {
                            self.set_runstate(RunState::PostMigrate);
                        }
                    }
                }
            }
            MigEvent::Pass(n) => {
                if self.caps.events && !incoming {
                    self.events.send("MIGRATION_PASS", Some(json!({"pass": n})));
                }
            }
            MigEvent::ColoExit(reason) => {
                let mode = if incoming { "secondary" } else { "primary" };
                self.colo_last_mode = mode;
                self.colo_mode = "none";
                self.colo_reason = reason.as_str();
                if self.runstate == RunState::Colo {
                    // The primary runs alone: this copy stays paused.
                    self.set_runstate(RunState::Paused);
                }
                self.events.send(
                    "COLO_EXIT",
                    Some(json!({"mode": mode, "reason": reason.as_str()})),
                );
            }
        }
        Ok(())
    }

    fn mig_events(&self, incoming: bool) -> migration::EventSink {
        let tx = self.ctl_tx.clone();
        Arc::new(move |event| tx.send(CtlMsg::Migration { incoming, event }))
    }

    fn start_incoming(&mut self, uri: &str, at_startup: bool) -> Result<(), IncomingStartError> {
        let uri = Uri::parse(uri).map_err(IncomingStartError::Transport)?;
        let listener = Listener::bind(&uri).map_err(IncomingStartError::Transport)?;
        self.vm
            .discard_ram()
            .map_err(|e| IncomingStartError::Other(e.to_string()))?;
        self.set_runstate(RunState::InMigrate);
        let ram = Arc::new(KvmRam::new(self.vm.fd().clone(), self.vm.memory().clone()));
        let shared = Arc::new(Shared::default());
        shared.info().status = Status::Setup;
        self.incoming_mig = shared.clone();
        self.incoming = Some(shared.clone());
        let inc = migration::Incoming {
            config: migrate::machine_config(self.vm.shape(), &ram),
            ram,
            machine: Box::new(ProxyMachine(self.ctl_tx.clone())),
            shared,
            events: self.mig_events(true),
        };
        let _ = at_startup;
        let events = inc.events.clone();
        std::thread::Builder::new()
            .name("mig-incoming".into())
            .spawn(move || match listener.accept() {
                Ok(chan) => {
                    migration::run_incoming(inc, chan, Some(&listener));
                }
                Err(e) => {
                    inc.shared.info().error_desc = Some(error_chain(&e));
                    inc.shared.info().status = Status::Failed;
                    events(MigEvent::Status(Status::Failed));
                }
            })
            .map_err(|e| IncomingStartError::Other(e.to_string()))?;
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

    /// A migration is under way (an incoming one only once its source has
    /// connected: before that, capabilities may still be set, as in QEMU).
    fn migration_active(&self) -> bool {
        self.outgoing.is_some()
            || self
                .incoming
                .as_ref()
                .is_some_and(|s| s.info().status != Status::Setup)
    }

    fn pmemsave(&self, val: u64, size: u64, filename: &str) -> Result<(), QmpError> {
        let mem = self.vm.memory();
        let layout = &self.vm.shape().layout;
        let end = val
            .checked_add(size)
            .ok_or_else(|| generic("Invalid parameter 'size'"))?;
        if !layout.ranges.iter().any(|&(s, l)| val >= s && end <= s + l) {
            return Err(generic(format!(
                "pmemsave: [{val:#x}, {end:#x}) is not inside one guest RAM range {:?}",
                layout
                    .ranges
                    .iter()
                    .map(|&(s, l)| format!("[{s:#x}, {:#x})", s + l))
                    .collect::<Vec<_>>()
            )));
        }
        let mut f = std::fs::File::create(filename)
            .map_err(|e| generic(format!("Could not open '{filename}': {e}")))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut addr = val;
        while addr < end {
            let n = ((end - addr) as usize).min(buf.len());
            mem.read_slice(&mut buf[..n], GuestAddress(addr))
                .map_err(|e| generic(format!("pmemsave: reading {addr:#x}: {e}")))?;
            f.write_all(&buf[..n])
                .map_err(|e| generic(format!("writing '{filename}': {e}")))?;
            addr += n as u64;
        }
        Ok(())
    }

    fn hmp(&mut self, line: &str) -> Result<Value, QmpError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let out = match words.as_slice() {
            ["info", "status"] => format!(
                "VM status: {}\r\n",
                match self.runstate {
                    RunState::Running => "running".to_string(),
                    RunState::Paused => "paused".to_string(),
                    s => format!("paused ({})", s.as_str()),
                }
            ),
            ["info", "version"] => format!("{} (minivmm)\r\n", env!("CARGO_PKG_VERSION")),
            ["info", "name"] => format!("{}\r\n", self.config.name.clone().unwrap_or_default()),
            ["info", "migrate"] => {
                let j = self.query_migrate();
                let mut s = String::new();
                if let Some(st) = j.get("status").and_then(Value::as_str) {
                    s += &format!("Migration status: {st}\r\n");
                }
                for k in ["total-time", "setup-time", "downtime", "expected-downtime"] {
                    if let Some(v) = j.get(k) {
                        s += &format!("{k}: {v} ms\r\n");
                    }
                }
                if let Some(ram) = j.get("ram").and_then(Value::as_object) {
                    for (k, v) in ram {
                        s += &format!("{k}: {v}\r\n");
                    }
                }
                if let Some(e) = j.get("error-desc").and_then(Value::as_str) {
                    s += &format!("error: {e}\r\n");
                }
                s
            }
            ["info", "cpus"] => (0..self.vm.shape().vcpus)
                .map(|i| {
                    format!(
                        "{}CPU #{i}: thread_id={}\r\n",
                        if i == 0 { "* " } else { "  " },
                        std::process::id()
                    )
                })
                .collect(),
            ["stop"] => {
                self.execute(Command::Stop)?;
                String::new()
            }
            ["cont" | "c"] => {
                self.execute(Command::Cont)?;
                String::new()
            }
            [] => String::new(),
            [cmd, ..] => format!("unknown command: '{cmd}'\r\n"),
        };
        Ok(json!(out))
    }

    fn query_migrate(&self) -> Value {
        // The destination shows its incoming migration, the source its outgoing.
        if self.incoming.is_some() || self.mig.info().status == Status::None {
            let j = self.incoming_mig.info().to_json();
            if j.as_object().is_some_and(|o| !o.is_empty()) {
                return j;
            }
        }
        self.mig.info().to_json()
    }

    fn execute(&mut self, cmd: Command) -> Result<Value, QmpError> {
        let vm_err = |e: VmError| generic(error_chain(&e));
        match cmd {
            Command::QueryStatus => Ok(json!({
                "running": self.runstate == RunState::Running,
                "status": self.runstate.as_str(),
            })),
            Command::QueryName => Ok(match &self.config.name {
                Some(n) => json!({"name": n}),
                None => json!({}),
            }),
            Command::Stop => {
                if self.runstate == RunState::InMigrate {
                    // QEMU: stop during inmigrate keeps the guest paused after migration.
                    self.config.start_paused = true;
                    return Ok(json!({}));
                }
                if self.vm.is_running() {
                    self.stop_vm(RunState::Paused).map_err(vm_err)?;
                } else if self.runstate == RunState::Prelaunch {
                    self.set_runstate(RunState::Paused);
                }
                Ok(json!({}))
            }
            Command::Cont if self.guest_incomplete => Err(generic(
                "The guest's memory is incomplete after a failed postcopy migration; it cannot run here",
            )),
            Command::Cont if self.colo_mode != "none" => Err(generic(
                "The guest is in COLO; use x-colo-lost-heartbeat to leave COLO",
            )),
            Command::Cont => match self.runstate {
                RunState::InMigrate => Err(generic("Guest is waiting for an incoming migration")),
                RunState::FinishMigrate => Err(generic("Migration is not finalized yet")),
                RunState::InternalError | RunState::Shutdown => Err(generic(format!(
                    "Resetting the Virtual Machine is required (state {})",
                    self.runstate.as_str()
                ))),
                RunState::Running => Ok(json!({})),
                _ => {
                    self.start_vm().map_err(vm_err)?;
                    Ok(json!({}))
                }
            },
            Command::Quit => {
                self.shutdown_event("host-qmp-quit", false);
                self.quit = true;
                Ok(json!({}))
            }
            Command::SystemReset => {
                self.vm.reset().map_err(vm_err)?;
                self.events.send("RESET", Some(json!({"guest": false, "reason": "host-qmp-system-reset"})));
                Ok(json!({}))
            }
            Command::SystemPowerdown => Err(generic(
                "system_powerdown needs ACPI, which minivmm does not emulate; use quit, or poweroff/reboot inside the guest",
            )),
            Command::QueryCpusFast => Ok(Value::Array(
                (0..self.vm.shape().vcpus)
                    .map(|i| {
                        json!({
                            "cpu-index": i,
                            "qom-path": format!("/machine/unattached/device[{i}]"),
                            "thread-id": std::process::id(),
                            "target": "x86_64",
                            "props": {"core-id": 0, "thread-id": 0, "socket-id": i},
                        })
                    })
                    .collect(),
            )),
            Command::Pmemsave(a) => {
                self.pmemsave(a.val, a.size, &a.filename)?;
                Ok(json!({}))
            }
            Command::Memsave(_) => Err(generic("memsave is not supported; use pmemsave with a guest-physical address")),
            Command::HumanMonitorCommand(a) => self.hmp(&a.command_line),
            Command::Migrate(a) => self.migrate(&a.uri, a.resume),
            Command::MigrateIncoming(a) => {
                if self.config.incoming != Some(Incoming::Defer) {
                    return Err(generic("The incoming migration has already been started; use -incoming defer"));
                }
                if self.incoming.is_some() || self.runstate != RunState::InMigrate {
                    return Err(generic("The incoming migration has already been started"));
                }
                let _ = a.exit_on_error;
                self.start_incoming(&a.uri, false).map_err(|e| match e {
                    IncomingStartError::Transport(t) => generic(error_chain(&t)),
                    IncomingStartError::Other(s) => generic(s),
                })?;
                Ok(json!({}))
            }
            Command::MigrateCancel => {
                if let Some(s) = &self.outgoing {
                    let status = s.info().status;
                    if !status.is_final() && status != Status::Cancelling {
                        s.info().status = Status::Cancelling;
                        if self.caps.events {
                            self.events.send("MIGRATION", Some(json!({"status": "cancelling"})));
                        }
                        s.request_cancel();
                    }
                }
                Ok(json!({}))
            }
            Command::MigrateContinue(_) => match &self.outgoing {
                Some(s) if s.info().status == Status::PreSwitchover => {
                    s.release_switchover();
                    Ok(json!({}))
                }
                _ => Err(generic("Migration not in pre-switchover state")),
            },
            Command::MigrateSetCapabilities(a) => {
                if self.migration_active() {
                    return Err(generic("There's a migration process in progress"));
                }
                let mut caps = self.caps;
                for c in a.capabilities {
                    caps.set(c.capability.as_str(), c.state).map_err(generic)?;
                }
                caps.check().map_err(generic)?;
                self.caps = caps;
                Ok(json!({}))
            }
            Command::QueryMigrateCapabilities => Ok(self.caps.to_json()),
            Command::MigrateSetParameters(p) => {
                let mut n = self.params;
                if let Some(v) = p.downtime_limit {
                    n.downtime_limit_ms = v;
                }
                if let Some(v) = p.max_bandwidth {
                    n.max_bandwidth = v;
                }
                if let Some(v) = p.x_checkpoint_delay {
                    n.x_checkpoint_delay_ms = u64::from(v);
                }
                if let Some(v) = p.max_postcopy_bandwidth {
                    n.max_postcopy_bandwidth = v;
                }
                if let Some(v) = p.cpu_throttle_initial {
                    n.cpu_throttle_initial = v;
                }
                if let Some(v) = p.cpu_throttle_increment {
                    n.cpu_throttle_increment = v;
                }
                if let Some(v) = p.max_cpu_throttle {
                    n.max_cpu_throttle = v;
                }
                self.params = n;
                Ok(json!({}))
            }
            Command::QueryMigrateParameters => Ok(self.params.to_json()),
            Command::QueryMigrate => Ok(self.query_migrate()),
            Command::MigrateStartPostcopy => {
                match &self.outgoing {
                    Some(s) => {
                        if !self.outgoing_postcopy {
                            return Err(generic("Enable postcopy with migrate_set_capability before the start of migration"));
                        }
                        s.start_postcopy
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                        Ok(json!({}))
                    }
                    // After the end (or before any migration): nothing to switch.
                    None if self.mig.info().status != Status::None => Ok(json!({})),
                    None => Err(generic("Postcopy must be started after migration has been started")),
                }
            }
            Command::XColoLostHeartbeat => match self.colo_mode {
                "primary" => {
                    self.mig.request_failover(false);
                    Ok(json!({}))
                }
                "secondary" => {
                    self.incoming_mig.request_failover(true);
                    Ok(json!({}))
                }
                _ => Err(generic("VM is not in COLO mode")),
            },
            Command::QueryColoStatus => Ok(json!({
                "mode": self.colo_mode,
                "last-mode": self.colo_last_mode,
                "reason": self.colo_reason,
            })),
            Command::QmpCapabilities(_) | Command::QueryVersion | Command::QueryCommands => {
                Err(generic("handled by the QMP server"))
            }
        }
    }

    fn migrate(&mut self, uri: &str, resume: bool) -> Result<Value, QmpError> {
        if resume {
            return Err(generic("postcopy recovery (resume) is not supported"));
        }
        if self.outgoing.is_some() {
            return Err(generic("There's a migration process in progress"));
        }
        if self.incoming.is_some() || self.runstate == RunState::InMigrate {
            return Err(generic("Guest is waiting for an incoming migration"));
        }
        if self.caps.x_colo && self.caps.postcopy_ram {
            return Err(generic("x-colo and postcopy-ram cannot be used together"));
        }
        let uri = Uri::parse(uri).map_err(|e| generic(e.to_string()))?;
        let ram = Arc::new(KvmRam::new(self.vm.fd().clone(), self.vm.memory().clone()));
        let shared = Arc::new(Shared::default());
        shared.info().status = Status::Setup;
        self.mig = shared.clone();
        self.outgoing = Some(shared.clone());
        self.outgoing_postcopy = self.caps.postcopy_ram;
        self.was_running_before_migration = self.vm.is_running();
        let out = migration::Outgoing {
            uri,
            config: migrate::machine_config(self.vm.shape(), &ram),
            ram,
            machine: Box::new(ProxyMachine(self.ctl_tx.clone())),
            params: self.params,
            caps: self.caps,
            shared,
            events: self.mig_events(false),
        };
        std::thread::Builder::new()
            .name("mig-outgoing".into())
            .spawn(move || {
                migration::run_outgoing(out);
            })
            .map_err(|e| generic(format!("cannot start the migration thread: {e}")))?;
        Ok(json!({}))
    }
}

/// `e` and its sources on one line, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s += &format!(": {c}");
        src = c.source();
    }
    s
}

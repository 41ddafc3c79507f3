//! The control thread: one mio event loop over stdin, the reset eventfd,
//! termination signals, vCPU events and (later) QMP and migration.
//!
//! It owns the [`Vm`] and its run state; every other thread reports to it
//! through a channel plus a mio `Waker`.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::boot::BootSpec;
use crate::cli::{Config, SerialSpec};
use crate::cpu::CpuModel;
use crate::memory::MemLayout;
use crate::term::{RawStdout, RawTerminal};
use crate::vcpu::{self, VcpuEvent};
use crate::vm::{Vm, VmError, VmShape};
use devices::serial::SerialOut;

const WAKER: Token = Token(0);
const STDIN: Token = Token(1);
const RESET: Token = Token(2);
const SIGNALS: Token = Token(3);

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
    /// A file named on the command line.
    #[error("{0}")]
    File(String, #[source] std::io::Error),
    /// The guest hit something KVM cannot run.
    #[error("guest stopped: vCPU {0}: {1}")]
    Guest(u8, String),
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
    let (ev_tx, ev_rx) = channel::<VcpuEvent>();
    let notify_waker = waker.clone();
    let ev_tx = std::sync::Mutex::new(ev_tx);
    let notify: Arc<dyn Fn(VcpuEvent) + Send + Sync> = Arc::new(move |ev| {
        if let Ok(tx) = ev_tx.lock() {
            let _ = tx.send(ev);
        }
        let _ = notify_waker.wake();
    });

    let shape = VmShape {
        layout: MemLayout::new(config.mem_size, config.hole_start)?,
        vcpus: config.vcpus,
        cpu: config.cpu,
    };
    let boot = BootSpec {
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        cmdline: guest_cmdline(&config),
    };
    let vm = Vm::new(shape, boot, serial_output(&config.serial)?, notify)?;
    if let Some(p) = &config.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| ControlError::File(format!("cannot write pidfile {}", p.display()), e))?;
    }

    let _term = (config.serial == SerialSpec::Stdio)
        .then(RawTerminal::enable)
        .flatten();
    let mut ctl = Control {
        vm,
        config,
        ev_rx,
        stdin_open: false,
    };
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
    if !ctl.config.start_paused {
        ctl.vm.resume()?;
    }

    let mut events = Events::with_capacity(64);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ControlError::Poll(e));
        }
        for ev in events.iter() {
            let outcome = match ev.token() {
                WAKER => ctl.vcpu_events()?,
                STDIN => ctl.stdin(&poll)?,
                RESET => {
                    let _ = ctl.vm.reset_evt.read();
                    ctl.guest_reset()?
                }
                SIGNALS => match signals.read() {
                    Some(sig) => {
                        eprintln!("minivmm: terminating on signal {sig}");
                        Some(0)
                    }
                    None => None,
                },
                _ => None,
            };
            if let Some(code) = outcome {
                let _ = ctl.vm.pause();
                devices::bus::lock(ctl.vm.serial()).flush();
                return Ok(code);
            }
        }
    }
}

struct Control {
    vm: Vm,
    config: Config,
    ev_rx: Receiver<VcpuEvent>,
    stdin_open: bool,
}

impl Control {
    fn vcpu_events(&mut self) -> Result<Option<u8>, ControlError> {
        while let Ok(ev) = self.ev_rx.try_recv() {
            match ev {
                VcpuEvent::Reset(_) => {
                    if let Some(code) = self.guest_reset()? {
                        return Ok(Some(code));
                    }
                }
                VcpuEvent::Shutdown(_) => return Ok(Some(0)),
                VcpuEvent::Fatal(id, msg) => return Err(ControlError::Guest(id, msg)),
            }
        }
        Ok(None)
    }

    fn guest_reset(&mut self) -> Result<Option<u8>, ControlError> {
        if self.config.no_reboot {
            return Ok(Some(0));
        }
        self.vm.reset()?;
        Ok(None)
    }

    fn stdin(&mut self, poll: &Poll) -> Result<Option<u8>, ControlError> {
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
        Ok(None)
    }
}

#[allow(dead_code)]
fn _model_name(m: CpuModel) -> &'static str {
    m.name()
}

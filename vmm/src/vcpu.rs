//! vCPU threads: one per vCPU, each owning its `VcpuFd`.
//!
//! The thread runs `KVM_RUN` and hands port exits to the device bus. The
//! control thread talks to it with [`VcpuRequest`]s over a channel:
//!
//! ```text
//! control                          vCPU thread
//!   Pause(ack) ──send, kick──▶  leaves KVM_RUN, parks ──ack──▶
//!   PauseSave(reply) ─send, kick─▶ leaves KVM_RUN, parks, reads its state ──reply──▶
//!   Save(reply) / Restore ────▶  (parked) reads/writes KVM state ──reply──▶
//!   Resume ───────────────────▶  back to KVM_RUN
//!   Exit ─────send, kick──────▶  thread ends
//! ```
//!
//! A kick is a real-time signal sent to the thread; its handler sets
//! `kvm_run.immediate_exit` so that a kick that lands just before `KVM_RUN`
//! is not lost (KVM returns EINTR at once). A halted vCPU, or one waiting
//! on a userfaultfd page, stays inside `KVM_RUN` until kicked.
//!
//! Guest-initiated events (reset request by triple fault, a fatal KVM
//! error) are reported to the control thread through a callback.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{kvm_run, KVM_EXIT_DIRTY_RING_FULL};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::cpu::{self, CpuError, VcpuState};
use crate::memory::GuestMemoryMmap;
use devices::PioBus;

/// Something a vCPU thread tells the control thread.
#[derive(Debug)]
pub enum VcpuEvent {
    /// The guest asked for a reset (triple fault or KVM system event).
    Reset,
    /// The guest asked to power off.
    Shutdown,
    /// KVM cannot run this vCPU any more; the message says why, with registers.
    Fatal(u8, String),
}

/// Requests from the control thread.
pub enum VcpuRequest {
    /// Leave KVM_RUN and park; ack when parked.
    Pause(Sender<()>),
    /// Leave KVM_RUN, park, and reply with the state (a migration's stop:
    /// one wake-up instead of a pause and then a save).
    PauseSave(Sender<Result<VcpuState, CpuError>>),
    /// Go back to running.
    Resume,
    /// Read the vCPU's state (must be parked).
    Save(Sender<Result<VcpuState, CpuError>>),
    /// Replace the vCPU's state (must be parked).
    Restore(Box<VcpuState>, Sender<Result<(), CpuError>>),
    /// End the thread.
    Exit,
}

/// Errors talking to a vCPU thread.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread is gone.
    #[error("vCPU {0} thread is gone")]
    Gone(u8),
    /// The thread could not be started.
    #[error("cannot start vCPU {0} thread")]
    Spawn(u8, #[source] std::io::Error),
    /// Kicking the thread failed.
    #[error("cannot signal vCPU {0}")]
    Kick(u8, #[source] vmm_sys_util::errno::Error),
    /// KVM state access failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: p points at this thread's mmap'ed kvm_run, which lives as
        // long as the thread's VcpuFd; a volatile byte store is
        // async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Install the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), kick_handler)
}

/// Handle to one vCPU thread.
pub struct VcpuHandle {
    id: u8,
    tx: Sender<VcpuRequest>,
    thread: Option<JoinHandle<()>>,
}

/// What a vCPU thread needs besides its fd.
pub struct VcpuContext {
    /// The port-I/O bus.
    pub bus: Arc<PioBus>,
    /// Guest memory (for diagnostics).
    pub mem: Arc<GuestMemoryMmap>,
    /// Where guest-initiated events go.
    pub notify: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
    /// MSRs to save.
    pub msr_list: Arc<Vec<u32>>,
    /// auto-converge: how long to sleep after a throttle kick.
    pub throttle: Arc<crate::throttle::Throttle>,
    /// Where the thread notes its id as it starts (postcopy-blocktime).
    pub tid: Arc<std::sync::atomic::AtomicI32>,
    /// KVM's dirty rings (a full ring is harvested by its vCPU).
    pub dirty_rings: Option<Arc<crate::dirty_ring::DirtyRings>>,
}

/// A reply a vCPU thread owes: its state (save) or `()` (restore).
/// Requested without waiting, so that several vCPUs work at once.
pub struct Pending<T> {
    id: u8,
    rx: Receiver<Result<T, CpuError>>,
}

impl<T> Pending<T> {
    /// The vCPU thread's reply.
    pub fn wait(self) -> Result<T, VcpuError> {
        Ok(self.rx.recv().map_err(|_| VcpuError::Gone(self.id))??)
    }
}

impl VcpuHandle {
    /// Start the thread for `fd`, parked until the first [`VcpuHandle::resume`].
    pub fn spawn(id: u8, fd: VcpuFd, ctx: VcpuContext) -> Result<Self, VcpuError> {
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_thread(id, fd, rx, ctx))
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(Self {
            id,
            tx,
            thread: Some(thread),
        })
    }

    fn send(&self, req: VcpuRequest) -> Result<(), VcpuError> {
        self.tx.send(req).map_err(|_| VcpuError::Gone(self.id))
    }

    fn kick(&self) -> Result<(), VcpuError> {
        match &self.thread {
            Some(t) => t
                .kill(kick_signal())
                .map_err(|e| VcpuError::Kick(self.id, e)),
            None => Err(VcpuError::Gone(self.id)),
        }
    }

    /// Ask the thread to park (non-blocking); returns the ack receiver.
    pub fn request_pause(&self) -> Result<Receiver<()>, VcpuError> {
        let (atx, arx) = channel();
        self.send(VcpuRequest::Pause(atx))?;
        self.kick()?;
        Ok(arx)
    }

    /// Send a request that carries its reply channel (kicking the thread
    /// out of KVM_RUN if `kick`); the reply is collected with
    /// [`Pending::wait`].
    fn request<T>(
        &self,
        make: impl FnOnce(Sender<Result<T, CpuError>>) -> VcpuRequest,
        kick: bool,
    ) -> Result<Pending<T>, VcpuError> {
        let (rtx, rrx) = channel();
        self.send(make(rtx))?;
        if kick {
            self.kick()?;
        }
        Ok(Pending {
            id: self.id,
            rx: rrx,
        })
    }

    /// Ask the thread to park and read its state (non-blocking).
    pub fn request_pause_save(&self) -> Result<Pending<VcpuState>, VcpuError> {
        self.request(VcpuRequest::PauseSave, true)
    }

    /// Let the thread run.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.send(VcpuRequest::Resume)
    }

    /// Ask the parked vCPU's thread for its state (non-blocking).
    pub fn request_save(&self) -> Result<Pending<VcpuState>, VcpuError> {
        self.request(VcpuRequest::Save, false)
    }

    /// Ask the parked vCPU's thread to load a state (non-blocking).
    pub fn request_restore(&self, st: VcpuState) -> Result<Pending<()>, VcpuError> {
        self.request(|reply| VcpuRequest::Restore(Box::new(st), reply), false)
    }

    /// vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The thread's pthread id (for the throttle's kicks).
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        use std::os::unix::thread::JoinHandleExt;
        self.thread.as_ref().map(JoinHandleExt::as_pthread_t)
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        let _ = self.send(VcpuRequest::Exit);
        let _ = self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn vcpu_thread(id: u8, mut fd: VcpuFd, rx: Receiver<VcpuRequest>, ctx: VcpuContext) {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    ctx.tid.store(tid, std::sync::atomic::Ordering::SeqCst);
    KVM_RUN_PTR.with(|c| c.set(fd.get_kvm_run() as *mut kvm_run));
    if let Err(e) = crate::sandbox::confine_vcpu(id) {
        (ctx.notify)(VcpuEvent::Fatal(id, migration::error_chain(&e)));
        return;
    }
    let mut paused = true;
    // A request that came while the thread slept for the throttle.
    let mut early: Option<VcpuRequest> = None;
    loop {
        let req = if early.is_some() {
            early.take()
        } else if paused {
            match rx.recv() {
                Ok(r) => Some(r),
                Err(_) => break,
            }
        } else {
            rx.try_recv().ok()
        };
        if let Some(req) = req {
            match req {
                VcpuRequest::Pause(ack) => {
                    paused = true;
                    let _ = ack.send(());
                }
                VcpuRequest::PauseSave(reply) => {
                    paused = true;
                    let _ = reply.send(cpu::save_vcpu(&fd, id, &ctx.msr_list));
                }
                VcpuRequest::Resume => paused = false,
                VcpuRequest::Save(reply) => {
                    let _ = reply.send(cpu::save_vcpu(&fd, id, &ctx.msr_list));
                }
                VcpuRequest::Restore(st, reply) => {
                    let _ = reply.send(cpu::restore_vcpu(&fd, &st));
                }
                VcpuRequest::Exit => break,
            }
            continue;
        }
        if !run_once(id, &mut fd, &ctx) {
            // Fatal: park until told otherwise.
            paused = true;
            continue;
        }
        if let Some(nap) = ctx.throttle.take_sleep(usize::from(id)) {
            match rx.recv_timeout(nap) {
                Ok(r) => early = Some(r),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    }
    KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
}

/// One KVM_RUN. Returns false when the vCPU cannot go on.
fn run_once(id: u8, fd: &mut VcpuFd, ctx: &VcpuContext) -> bool {
    match fd.run() {
        Ok(VcpuExit::IoIn(port, data)) => ctx.bus.read(port, data),
        Ok(VcpuExit::IoOut(port, data)) => ctx.bus.write(port, data),
        Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
        Ok(VcpuExit::MmioWrite(..)) => {}
        Ok(VcpuExit::Hlt) => {}
        Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
            // Harvest this vCPU's ring before it runs on.
            if let Some(Err(e)) = ctx.dirty_rings.as_ref().map(|r| r.harvest_vcpu(id.into())) {
                let msg = format!("dirty ring full: {}", migration::error_chain(&e));
                (ctx.notify)(VcpuEvent::Fatal(id, msg));
                return false;
            }
        }
        Ok(VcpuExit::Shutdown) => {
            (ctx.notify)(VcpuEvent::Reset);
            return false;
        }
        Ok(VcpuExit::SystemEvent(kind, _)) => {
            const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
            if kind == KVM_SYSTEM_EVENT_SHUTDOWN {
                (ctx.notify)(VcpuEvent::Shutdown);
            } else {
                (ctx.notify)(VcpuEvent::Reset);
            }
            return false;
        }
        Ok(VcpuExit::InternalError) => {
            let run = fd.get_kvm_run();
            // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal`
            // is the union member KVM filled.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            let n = (internal.ndata as usize).min(internal.data.len());
            let data: Vec<String> = internal.data[..n]
                .iter()
                .map(|d| format!("{d:#x}"))
                .collect();
            let msg = format!(
                "KVM internal error, suberror {} ({}), data [{}]\n{}",
                internal.suberror,
                match internal.suberror {
                    1 => "emulation failure: KVM cannot emulate the instruction at RIP",
                    2 => "simultaneous exceptions",
                    3 => "delivery event failure",
                    _ => "unknown",
                },
                data.join(" "),
                describe(fd, &ctx.mem)
            );
            (ctx.notify)(VcpuEvent::Fatal(id, msg));
            return false;
        }
        Ok(VcpuExit::FailEntry(reason, cpu)) => {
            let msg = format!(
                "KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on host cpu {cpu}\n{}",
                describe(fd, &ctx.mem)
            );
            (ctx.notify)(VcpuEvent::Fatal(id, msg));
            return false;
        }
        Ok(other) => {
            let what = format!("{other:?}");
            let msg = format!("unexpected KVM exit {what}\n{}", describe(fd, &ctx.mem));
            (ctx.notify)(VcpuEvent::Fatal(id, msg));
            return false;
        }
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            fd.set_kvm_immediate_exit(0);
        }
        Err(e) => {
            let msg = format!("KVM_RUN failed: {e}\n{}", describe(fd, &ctx.mem));
            (ctx.notify)(VcpuEvent::Fatal(id, msg));
            return false;
        }
    }
    true
}

/// Registers and the code bytes at RIP, for error messages.
fn describe(fd: &VcpuFd, mem: &GuestMemoryMmap) -> String {
    let mut s = String::new();
    if let Ok(r) = fd.get_regs() {
        s += &format!(
            "RIP={:016x} RSP={:016x} RFLAGS={:08x}\nRAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\nRSI={:016x} RDI={:016x} RBP={:016x}\nR8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}\nR12={:016x} R13={:016x} R14={:016x} R15={:016x}\n",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp,
            r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
        );
        if let Ok(sr) = fd.get_sregs() {
            s += &format!(
                "CS={:04x} CPL={} CR0={:x} CR2={:x} CR3={:x} CR4={:x} EFER={:x}\n",
                sr.cs.selector, sr.cs.dpl, sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer
            );
        }
        match fd.translate_gva(r.rip) {
            Ok(t) if t.valid != 0 => {
                let mut code = [0u8; 16];
                match mem.read_slice(&mut code, GuestAddress(t.physical_address)) {
                    Ok(()) => {
                        let hex: Vec<String> = code.iter().map(|b| format!("{b:02x}")).collect();
                        s += &format!(
                            "Code at RIP (gpa {:#x}): {}\n",
                            t.physical_address,
                            hex.join(" ")
                        );
                    }
                    Err(_) => {
                        s += &format!("RIP maps to gpa {:#x}, outside RAM\n", t.physical_address)
                    }
                }
            }
            _ => s += "RIP is not mapped\n",
        }
    }
    s
}

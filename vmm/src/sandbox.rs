//! `-sandbox`: seccomp filters (rust-vmm's `seccompiler`), on by default.
//!
//! Two filters, stacked where both apply:
//!
//! - **Process-wide** (every thread, installed with TSYNC before the first
//!   thread starts, and inherited by what `exec:` migrations spawn): system
//!   calls minivmm never makes and that would widen a compromise are
//!   denied, in QEMU's groups. Always: mounting, modules, kexec, reboot,
//!   ptrace and cross-process memory access, BPF, perf, keyrings,
//!   namespaces, swap, clock and host-name changes, I/O port access, file
//!   handles (the process is killed). QEMU's `obsolete` group (killed) and
//!   `elevateprivileges` (set*id, capset: `EPERM`) unless `=allow`;
//!   `spawn=deny` makes execve fail with `EPERM` (`exec:` migrations then
//!   fail with that error); `resourcecontrol=deny` makes scheduler and
//!   NUMA policy calls fail with `EPERM` (minivmm then runs its threads at
//!   the default priority).
//! - **Allowlists per thread kind** (anything else kills the process), each
//!   installed by the thread itself and inherited by the threads it starts:
//!   - **vCPU threads**, before they first enter the guest: KVM ioctls,
//!     console writes, futexes, memory for buffers, the throttle's sleeps,
//!     signals for kicks;
//!   - **the control thread**, once the VM is built: the monitor, the VM's
//!     ioctls, sockets, files, threads, and what migration threads need
//!     (they start from it); no programs;
//!   - **migration threads** (engine threads and all they start), at their
//!     start: sockets, files, userfaultfd, dirty logs, threads; no
//!     programs, no listening sockets of their own;
//!   - **the postcopy fault thread**: userfaultfd, page requests, log.
//! - **The spawner thread** starts the programs of `exec:` migrations for
//!   the migration threads: started before the control thread confines
//!   itself, it has the process-wide filters only, and so have the
//!   programs (a program inherits the filters of the thread that starts
//!   it).
//!
//! Installing a filter sets `NoNewPrivs`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule};

/// `-sandbox` as given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxSpec {
    /// Filters installed at all.
    pub on: bool,
    /// QEMU's `obsolete=deny`.
    pub deny_obsolete: bool,
    /// QEMU's `elevateprivileges=deny`.
    pub deny_elevate: bool,
    /// QEMU's `spawn=deny`.
    pub deny_spawn: bool,
    /// QEMU's `resourcecontrol=deny`.
    pub deny_resource_control: bool,
}

impl Default for SandboxSpec {
    /// On, as Firecracker and Cloud Hypervisor: QEMU's `-sandbox on`
    /// defaults (obsolete and privilege elevation denied; spawning and
    /// resource control allowed: `exec:` migrations and thread priorities).
    fn default() -> Self {
        Self {
            on: true,
            deny_obsolete: true,
            deny_elevate: true,
            deny_spawn: false,
            deny_resource_control: false,
        }
    }
}

impl SandboxSpec {
    /// Parse `-sandbox on|off[,obsolete=allow|deny][,elevateprivileges=..]
    /// [,spawn=..][,resourcecontrol=..]`; `Err` says why not.
    pub fn parse(v: &str) -> Result<Self, String> {
        let mut parts = v.split(',');
        let mut s = Self::default();
        match parts.next() {
            Some("on") => {}
            Some("off") => s.on = false,
            other => return Err(format!("'{}': on or off", other.unwrap_or(""))),
        }
        for p in parts {
            let (k, val) = p
                .split_once('=')
                .ok_or_else(|| format!("'{p}' is not key=value"))?;
            let deny = match val {
                "deny" => true,
                "allow" => false,
                _ => return Err(format!("{k}={val}: allow or deny")),
            };
            match k {
                "obsolete" => s.deny_obsolete = deny,
                "elevateprivileges" => s.deny_elevate = deny,
                "spawn" => s.deny_spawn = deny,
                "resourcecontrol" => s.deny_resource_control = deny,
                _ => return Err(format!("unsupported property '{k}'")),
            }
        }
        Ok(s)
    }
}

/// Sandbox failures.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Building a filter failed.
    #[error("building the {0} seccomp filter")]
    Build(&'static str, #[source] seccompiler::BackendError),
    /// Compiling it to BPF failed.
    #[error("compiling the {0} seccomp filter")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused it.
    #[error("installing the {0} seccomp filter")]
    Install(&'static str, #[source] seccompiler::Error),
    /// The thread that starts programs could not start.
    #[error("starting the spawner thread")]
    Spawner(#[source] std::io::Error),
}

/// Always denied: the process is killed.
const NEVER: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_reboot,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_perf_event_open,
    libc::SYS_bpf,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_quotactl,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_kcmp,
    libc::SYS_syslog,
    libc::SYS_vhangup,
    libc::SYS_lookup_dcookie,
];

/// QEMU's `obsolete` group (x86_64): killed.
const OBSOLETE: &[i64] = &[
    libc::SYS__sysctl,
    174, // create_module (x86_64; gone from libc's list)
    177, // get_kernel_syms
    178, // query_module
    libc::SYS_sysfs,
    libc::SYS_uselib,
    libc::SYS_ustat,
];

/// QEMU's `elevateprivileges` group: EPERM.
const ELEVATE: &[i64] = &[
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setgroups,
    libc::SYS_capset,
];

/// QEMU's `spawn` group: EPERM.
const SPAWN: &[i64] = &[libc::SYS_execve, libc::SYS_execveat];

/// QEMU's `resourcecontrol` group: EPERM.
const RESOURCE_CONTROL: &[i64] = &[
    libc::SYS_setpriority,
    libc::SYS_sched_setparam,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setaffinity,
    libc::SYS_mbind,
    libc::SYS_migrate_pages,
    libc::SYS_move_pages,
    libc::SYS_set_mempolicy,
];

/// What every confined thread may do: allocate, wait, take and return
/// from signals (a panic's abort included), read the time, sleep, yield,
/// and end.
const THREAD_BASICS: &[i64] = &[
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What a running vCPU thread may do besides [`THREAD_BASICS`]: KVM's
/// ioctls, its own fds, signal handlers (the kick).
const VCPU: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_rt_sigaction,
];

/// What the postcopy fault thread may do besides [`THREAD_BASICS`]: wait
/// on userfaultfd and its stop event, read faults, zero or wake pages
/// (ioctl), write page requests to the return path (a socket) and log.
const POSTCOPY_FAULT: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_ioctl,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_getrandom,
];

/// What a migration's threads may do besides [`THREAD_BASICS`] (the
/// engine threads, their return-path, keepalive, listen, preempt, COLO and
/// TLS threads): sockets and files (the stream, `file:` migrations),
/// polling, userfaultfd and KVM's dirty logs (ioctl), starting threads and
/// setting their priority, signalling and reaping an `exec:` program (it
/// is started by the spawner), log. No programs, no new listeners of
/// their own but a postcopy recovery's (bound by the control thread).
const MIGRATION: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_openat,
    // A unix listener's socket file goes with the listener.
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_ioctl,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_shutdown,
    libc::SYS_userfaultfd,
    // Postcopy drops pages with process_madvise on its own pidfd.
    libc::SYS_pidfd_open,
    libc::SYS_process_madvise,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_prctl,
    // A thread started from here installs its own, narrower, filter.
    libc::SYS_seccomp,
    libc::SYS_sched_setattr,
    libc::SYS_sched_getattr,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_getparam,
    libc::SYS_setpriority,
    libc::SYS_getpriority,
    libc::SYS_kill,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_getrandom,
    libc::SYS_uname,
    // What the C library and std do on the way (name resolution, a
    // panic's backtrace and abort, copies between descriptors).
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_rt_sigaction,
    libc::SYS_fallocate,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_splice,
    libc::SYS_set_tid_address,
    libc::SYS_prlimit64,
    libc::SYS_membarrier,
];

/// What the control thread may do besides [`THREAD_BASICS`] once the VM
/// is built: everything a migration thread may (it starts them, and they
/// inherit its filter) and the monitor's and the VM's own: epoll, signalfd
/// and eventfd, listening sockets (QMP clients, `migrate-incoming`,
/// `migrate-recover`), the console's terminal, KVM's VM and vCPU ioctls,
/// files (`pmemsave`, credentials, logs), removing its pidfile at exit.
/// No programs: `exec:` migrations are started by the
/// spawner thread.
const CONTROL: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_signalfd4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_pipe2,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
];

/// An allowlist: [`THREAD_BASICS`] and each of `extra`. What is not on it
/// kills the process, or with [`AUDIT_ENV`] set is logged by the kernel
/// (`type=1326` in its log, with the thread's name and the call's number)
/// and allowed: how to find what a new code path needs.
fn allowlist(what: &'static str, extra: &[&[i64]]) -> Result<BpfProgram, SandboxError> {
    let calls: Vec<i64> = THREAD_BASICS
        .iter()
        .chain(extra.iter().flat_map(|e| e.iter()))
        .copied()
        .collect();
    let otherwise = if std::env::var_os(AUDIT_ENV).is_some() {
        SeccompAction::Log
    } else {
        SeccompAction::KillProcess
    };
    compile(what, &calls, SeccompAction::Allow, otherwise)
}

/// Environment variable that turns the allowlists' kill into the kernel's
/// log (development: see [`allowlist`]).
pub const AUDIT_ENV: &str = "MINIVMM_SANDBOX_AUDIT";

fn arch() -> seccompiler::TargetArch {
    seccompiler::TargetArch::x86_64
}

/// A filter: `calls` get `on_match`, every other system call `otherwise`
/// (a denylist with `otherwise` Allow, an allowlist with it KillProcess).
fn compile(
    what: &'static str,
    calls: &[i64],
    on_match: SeccompAction,
    otherwise: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = calls.iter().map(|&c| (c, vec![])).collect();
    let f = SeccompFilter::new(rules, otherwise, on_match, arch())
        .map_err(|e| SandboxError::Build(what, e))?;
    BpfProgram::try_from(f).map_err(|e| SandboxError::Compile(what, e))
}

static VCPU_FILTER: OnceLock<Option<BpfProgram>> = OnceLock::new();
static FAULT_FILTER: OnceLock<Option<BpfProgram>> = OnceLock::new();
static MIGRATION_FILTER: OnceLock<Option<BpfProgram>> = OnceLock::new();
static CONTROL_FILTER: OnceLock<Option<BpfProgram>> = OnceLock::new();

/// A program to start, and where its result goes.
type SpawnRequest = (
    std::process::Command,
    std::sync::mpsc::Sender<std::io::Result<std::process::Child>>,
);

/// The spawner thread's queue: it starts the programs of `exec:`
/// migrations under the process-wide filters only (a program inherits
/// the filters of the thread that starts it, and the control and
/// migration threads may not execute one).
static SPAWNER: OnceLock<std::sync::mpsc::Sender<SpawnRequest>> = OnceLock::new();

/// Start the spawner thread (see [`SPAWNER`]); Rust resets the signal
/// mask of each program it starts.
fn spawner_thread() -> std::io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        })?;
    let _ = SPAWNER.set(tx);
    migration::confine::set_spawner(spawn);
    Ok(())
}

/// `cmd` started by the spawner thread.
fn spawn(cmd: std::process::Command) -> std::io::Result<std::process::Child> {
    let gone = || std::io::Error::other("the spawner thread is gone");
    let (tx, rx) = std::sync::mpsc::channel();
    SPAWNER
        .get()
        .ok_or_else(gone)?
        .send((cmd, tx))
        .map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

/// Install the process-wide filters (every thread, now and later) and
/// prepare the vCPU filter, as `spec` says. Call before any thread starts.
pub fn install(spec: SandboxSpec) -> Result<(), SandboxError> {
    if !spec.on {
        for f in [
            &VCPU_FILTER,
            &FAULT_FILTER,
            &MIGRATION_FILTER,
            &CONTROL_FILTER,
        ] {
            let _ = f.set(None);
        }
        return Ok(());
    }
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let mut kill: Vec<i64> = NEVER.to_vec();
    if spec.deny_obsolete {
        kill.extend_from_slice(OBSOLETE);
    }
    let mut refuse: Vec<i64> = Vec::new();
    if spec.deny_elevate {
        refuse.extend_from_slice(ELEVATE);
    }
    if spec.deny_spawn {
        refuse.extend_from_slice(SPAWN);
    }
    if spec.deny_resource_control {
        refuse.extend_from_slice(RESOURCE_CONTROL);
    }
    let _ = VCPU_FILTER.set(Some(allowlist("vCPU", &[VCPU])?));
    let _ = FAULT_FILTER.set(Some(allowlist("postcopy fault", &[POSTCOPY_FAULT])?));
    let _ = MIGRATION_FILTER.set(Some(allowlist("migration", &[MIGRATION])?));
    let _ = CONTROL_FILTER.set(Some(allowlist("control", &[MIGRATION, CONTROL])?));
    migration::confine::set_hook(confine_thread);
    let kill = compile(
        "process",
        &kill,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
    )?;
    seccompiler::apply_filter_all_threads(&kill)
        .map_err(|e| SandboxError::Install("process", e))?;
    if !refuse.is_empty() {
        let refuse = compile("process (EPERM)", &refuse, eperm, SeccompAction::Allow)?;
        seccompiler::apply_filter_all_threads(&refuse)
            .map_err(|e| SandboxError::Install("process (EPERM)", e))?;
    }
    Ok(())
}

/// Start the spawner thread, if the sandbox is on: after the process-wide
/// filters and the control thread's signal mask (the thread inherits it:
/// SIGTERM and the like go to the signalfd, never to it), before
/// [`confine_control`].
pub fn start_spawner() -> Result<(), SandboxError> {
    if let Some(Some(_)) = CONTROL_FILTER.get() {
        spawner_thread().map_err(SandboxError::Spawner)?;
    }
    Ok(())
}

/// The control thread, its VM built, before it serves the monitor:
/// confine it (and so every thread it starts from now on).
pub fn confine_control() -> Result<(), SandboxError> {
    if let Some(Some(f)) = CONTROL_FILTER.get() {
        seccompiler::apply_filter(f).map_err(|e| SandboxError::Install("control", e))?;
        // Test hook: the control thread may not execute a program.
        if std::env::var_os(CONTROL_FORBIDDEN_TEST_ENV).is_some() {
            let prog = c"/bin/true";
            let argv = [prog.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: a NUL-terminated path and NULL-terminated argument
            // and environment arrays that outlive the call; under the
            // filter it does not return.
            unsafe { libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        }
    }
    Ok(())
}

/// Environment variable that makes the control thread execute a program
/// right after its filter is installed (tests).
pub const CONTROL_FORBIDDEN_TEST_ENV: &str = "MINIVMM_TEST_CONTROL_FORBIDDEN_SYSCALL";

/// A vCPU thread, before it first runs the guest: confine it.
pub fn confine_vcpu(id: u8) -> Result<(), SandboxError> {
    if let Some(Some(f)) = VCPU_FILTER.get() {
        seccompiler::apply_filter(f).map_err(|e| SandboxError::Install("vCPU", e))?;
        // Test hook: a system call no vCPU thread makes must kill us.
        if id == 0 && std::env::var_os(FORBIDDEN_TEST_ENV).is_some() {
            // SAFETY: socket() with constant arguments; under the filter it
            // does not return.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        }
    }
    Ok(())
}

/// Environment variable that makes vCPU 0 make a forbidden system call
/// right after its filter is installed (tests).
pub const FORBIDDEN_TEST_ENV: &str = "MINIVMM_TEST_VCPU_FORBIDDEN_SYSCALL";

/// The migration crate's threads of `kind`, before their work: confine
/// them (see `migration::confine`). A filter that cannot be installed
/// ends the process: the sandbox is never on in name only.
fn confine_thread(kind: migration::confine::ThreadKind) {
    use migration::confine::ThreadKind;
    let (what, filter) = match kind {
        ThreadKind::Migration => ("migration", &MIGRATION_FILTER),
        ThreadKind::PostcopyFault => ("postcopy fault", &FAULT_FILTER),
    };
    if let Some(Some(f)) = filter.get() {
        if let Err(e) = seccompiler::apply_filter(f) {
            log::error!("sandbox: cannot confine the {what} thread: {e}");
            std::process::abort();
        }
        // Test hook: a system call this thread never makes must kill us.
        if kind == ThreadKind::PostcopyFault && std::env::var_os(FAULT_FORBIDDEN_TEST_ENV).is_some()
        {
            // SAFETY: socket() with constant arguments; under the filter it
            // does not return.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        }
    }
}

/// Environment variable that makes the postcopy fault thread make a
/// forbidden system call right after its filter is installed (tests).
pub const FAULT_FORBIDDEN_TEST_ENV: &str = "MINIVMM_TEST_FAULT_FORBIDDEN_SYSCALL";

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
//! - **vCPU threads**: an allowlist of what a vCPU thread does once it runs
//!   (KVM ioctls, console writes, futexes, memory for its buffers, the
//!   throttle's sleeps, signals for kicks); anything else kills the
//!   process. Installed by each vCPU thread before it first enters the
//!   guest.
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

/// An allowlist: [`THREAD_BASICS`] and `extra`.
fn allowlist(what: &'static str, extra: &[i64]) -> Result<BpfProgram, SandboxError> {
    let calls: Vec<i64> = THREAD_BASICS.iter().chain(extra).copied().collect();
    compile(
        what,
        &calls,
        SeccompAction::Allow,
        SeccompAction::KillProcess,
    )
}

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

/// Install the process-wide filters (every thread, now and later) and
/// prepare the vCPU filter, as `spec` says. Call before any thread starts.
pub fn install(spec: SandboxSpec) -> Result<(), SandboxError> {
    if !spec.on {
        let _ = VCPU_FILTER.set(None);
        let _ = FAULT_FILTER.set(None);
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
    let _ = VCPU_FILTER.set(Some(allowlist("vCPU", VCPU)?));
    let _ = FAULT_FILTER.set(Some(allowlist("postcopy fault", POSTCOPY_FAULT)?));
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
        ThreadKind::PostcopyFault => ("postcopy fault", &FAULT_FILTER),
    };
    if let Some(Some(f)) = filter.get() {
        if let Err(e) = seccompiler::apply_filter(f) {
            log::error!("sandbox: cannot confine the {what} thread: {e}");
            std::process::abort();
        }
        // Test hook: a system call this thread never makes must kill us.
        if std::env::var_os(FAULT_FORBIDDEN_TEST_ENV).is_some() {
            // SAFETY: socket() with constant arguments; under the filter it
            // does not return.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        }
    }
}

/// Environment variable that makes the postcopy fault thread make a
/// forbidden system call right after its filter is installed (tests).
pub const FAULT_FORBIDDEN_TEST_ENV: &str = "MINIVMM_TEST_FAULT_FORBIDDEN_SYSCALL";

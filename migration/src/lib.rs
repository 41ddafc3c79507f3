//! Live migration engines for minivmm, free of KVM code.
//!
//! Guest RAM is seen through [`ram::GuestRam`] (pages to read, write and
//! track) and the rest of the machine as opaque device blobs through
//! [`precopy::Machine`] and [`precopy::IncomingMachine`]; the VMM implements
//! those traits. The crate owns the stream format ([`stream`]), the
//! transports ([`transport`]), the status and statistics QMP reports
//! ([`status`]) and the engines ([`precopy`], [`postcopy`], [`colo`]).

pub mod colo;
pub mod postcopy;
pub mod precopy;
pub mod ram;
pub mod status;
pub mod stream;
pub mod transport;

/// `e` and its sources on one line, joined with ": " (for `error-desc`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Best effort: run the calling thread ahead of the vCPU threads (nice
/// -10). For the threads a guest blocked on a missing page waits for
/// (postcopy's fault, listen and page-sending threads): on a busy host a
/// woken thread otherwise waits up to a scheduler slice (~3 ms) behind
/// running vCPUs. Without CAP_SYS_NICE it changes nothing.
pub(crate) fn prefer_this_thread() {
    // SAFETY: gettid has no preconditions; setpriority only changes the
    // nice value of this thread (Linux applies PRIO_PROCESS to one thread).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10);
    }
}

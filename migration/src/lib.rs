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
/// -10), for threads a stopped or blocked guest waits for: the VMM's
/// control thread, postcopy's fault, listen and page-sending threads, the
/// COLO threads. On a busy host a woken thread otherwise waits up to a
/// scheduler slice (~3 ms) behind running vCPUs. Threads inherit it, so a
/// thread that copies in bulk beside a running guest calls
/// [`normal_priority`]. Without CAP_SYS_NICE it changes nothing.
pub fn prefer_this_thread() {
    set_nice(-10);
}

/// Run the calling thread at the vCPUs' priority (nice 0).
pub fn normal_priority() {
    set_nice(0);
}

fn set_nice(n: i32) {
    // SAFETY: gettid has no preconditions; setpriority only changes the
    // nice value of this thread (Linux applies PRIO_PROCESS to one thread).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, n);
    }
}

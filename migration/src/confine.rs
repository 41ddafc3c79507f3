//! Confinement of the threads this crate starts, by the VMM's sandbox.
//!
//! The crate has no seccomp code: the VMM registers one function
//! ([`set_hook`]), and each thread of a kind named here calls it
//! ([`enter`]) before its work, so that the VMM can narrow what that
//! thread may do. Only leaf threads (starting no threads and no programs)
//! are named: a filter is inherited by everything a thread starts.

use std::sync::OnceLock;

/// Thread kinds with their own confinement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The destination's postcopy fault thread: userfaultfd events in,
    /// page requests out on the return path, pages woken or zeroed.
    PostcopyFault,
}

static HOOK: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// Register the VMM's confinement (once; later calls are ignored).
pub fn set_hook(hook: fn(ThreadKind)) {
    let _ = HOOK.set(hook);
}

/// The calling thread is of `kind`: confine it (nothing without a hook).
pub(crate) fn enter(kind: ThreadKind) {
    if let Some(hook) = HOOK.get() {
        hook(kind);
    }
}

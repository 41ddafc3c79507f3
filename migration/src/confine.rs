//! Confinement of the threads this crate runs, by the VMM's sandbox.
//!
//! The crate has no seccomp code: the VMM registers its functions
//! ([`set_hook`], [`set_spawner`]) and this crate calls them: each thread
//! of a kind named here calls [`enter`] before its work, so that the VMM
//! can narrow what that thread (and everything it starts: a filter is
//! inherited) may do; and the programs of `exec:` migrations are started
//! through [`spawn`], so that the VMM can start them from a thread whose
//! filter lets them run (a confined migration thread may not execute
//! programs).

use std::process::{Child, Command};
use std::sync::OnceLock;

/// Thread kinds with their own confinement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A migration's engine thread (outgoing or incoming) and every thread
    /// it starts: sockets, files, userfaultfd, KVM's dirty logs, TLS.
    Migration,
    /// The destination's postcopy fault thread: userfaultfd events in,
    /// page requests out on the return path, pages woken or zeroed.
    PostcopyFault,
}

static HOOK: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// How the VMM starts a program for the crate.
pub type Spawner = fn(Command) -> std::io::Result<Child>;

static SPAWNER: OnceLock<Spawner> = OnceLock::new();

/// Register the VMM's confinement (once; later calls are ignored).
pub fn set_hook(hook: fn(ThreadKind)) {
    let _ = HOOK.set(hook);
}

/// Register the VMM's way to start programs (once; later calls are
/// ignored).
pub fn set_spawner(spawner: Spawner) {
    let _ = SPAWNER.set(spawner);
}

/// The calling thread is of `kind`: confine it (nothing without a hook).
pub fn enter(kind: ThreadKind) {
    if let Some(hook) = HOOK.get() {
        hook(kind);
    }
}

/// Start `cmd` (through the VMM's spawner, if it has one).
pub(crate) fn spawn(mut cmd: Command) -> std::io::Result<Child> {
    match SPAWNER.get() {
        Some(s) => s(cmd),
        None => cmd.spawn(),
    }
}

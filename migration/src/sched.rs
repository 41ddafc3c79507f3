//! Thread scheduling for the migration threads: ahead of the vCPUs where
//! a stopped or blocked guest waits on them, real-time for the downtime
//! and for postcopy's fault path, as the vCPUs for bulk copying.

/// Best effort: run the calling thread ahead of the vCPU threads, for
/// threads a stopped or blocked guest waits for: the VMM's control thread,
/// postcopy's listen, background-sending and return-path threads (and its
/// fault-path threads where [`fault_path_thread`] is refused), the COLO
/// threads. Two settings: nice -10 (a larger share when busy) and a short
/// scheduler slice (0.1 ms, `sched_setattr` on Linux >= 6.12's EEVDF): a
/// woken task preempts the running one only if its slice is shorter, so
/// without it a page request waited up to a whole default slice (~3 ms)
/// behind a busy vCPU or copy thread. Threads inherit both, so a thread
/// that copies in bulk beside a running guest calls [`normal_priority`].
/// Without CAP_SYS_NICE, or on older kernels, each changes nothing.
pub fn prefer_this_thread() {
    set_sched(-10, 100_000);
}

/// Best effort: run the calling thread in the real-time class
/// (`SCHED_FIFO` priority 1, not inherited by threads it starts), for the
/// three postcopy threads a vCPU blocked on a missing page waits for and
/// that otherwise sleep: the destination's fault thread and preempt-channel
/// receiver and the source's urgent page sender. Each wakes for one
/// request or page and blocks again, so it cannot starve the vCPUs (and
/// the kernel's real-time throttling caps the class at 95 % of a CPU). A
/// woken real-time thread always preempts the normal threads at the next
/// scheduling point; with [`prefer_this_thread`] alone, 2 % of faults
/// still waited 1-3 ms behind the listen thread or a vCPU on this 2-CPU
/// host (docs/benchmarks.md, "Postcopy"). Without CAP_SYS_NICE (or an
/// RLIMIT_RTPRIO) it falls back to [`prefer_this_thread`], which then
/// changes nothing either (lowering nice needs the same privilege).
pub fn fault_path_thread() {
    if !enter_fifo() {
        prefer_this_thread();
    }
}

/// Put the calling thread in `SCHED_FIFO` priority 1, reset on fork.
/// Whether that was allowed.
fn enter_fifo() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler reads one valid sched_param and changes
    // only the scheduling of this thread (pid 0).
    let r = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    r == 0
}

/// The calling thread runs real-time ([`fault_path_thread`]'s class) until
/// this guard drops, then gets its previous scheduling back. For the
/// downtime, on both sides: the postcopy switch (source: stop to package
/// sent; destination: PING 5 to RUN) and precopy's final round (source:
/// stop to SHUT(0); destination: END to SHUT(0) sent), which the
/// downtime-limit bounds. Measured on the 2-CPU test host without it: the
/// source's write of the postcopy package woke the destination's reader on
/// the same CPU, which preempted the writer and spent 1-2 ms dropping
/// discarded pages while the writer waited, runnable, beside an idle CPU
/// (the fair scheduler keeps a task that just ran where it is). The
/// real-time class runs a woken task on another CPU at once instead. Does
/// nothing without CAP_SYS_NICE (or an RLIMIT_RTPRIO).
pub struct RealTimeSection {
    saved: Option<libc::sched_attr>,
}

impl RealTimeSection {
    /// Enter the section.
    pub fn enter() -> Self {
        // SAFETY: sched_attr is plain old data; all zeroes is a valid value.
        let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::sched_attr>() as u32;
        // SAFETY: sched_getattr writes at most `size` bytes into `attr`,
        // for this thread (pid 0).
        let got = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                0,
                &mut attr as *mut libc::sched_attr,
                size,
                0,
            )
        };
        let set = got == 0 && enter_fifo();
        Self {
            saved: set.then_some(attr),
        }
    }
}

impl Drop for RealTimeSection {
    fn drop(&mut self) {
        if let Some(attr) = &self.saved {
            // SAFETY: sched_setattr reads a sched_attr that sched_getattr
            // filled for this thread, and changes only this thread.
            unsafe {
                libc::syscall(
                    libc::SYS_sched_setattr,
                    0,
                    attr as *const libc::sched_attr,
                    0,
                );
            }
        }
    }
}

/// Run the calling thread as the vCPUs do (nice 0, default slice).
pub fn normal_priority() {
    set_sched(0, 0);
}

/// SCHED_OTHER with `nice` and a slice of `slice_ns` (0: the default).
fn set_sched(nice: i32, slice_ns: u64) {
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: slice_ns,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_setattr reads `size` bytes of a valid sched_attr and
    // changes only the scheduling of this thread (pid 0).
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if r != 0 {
        // Older kernels refuse a slice for SCHED_OTHER: keep the nice value.
        // SAFETY: gettid has no preconditions; setpriority only changes
        // the nice value of this thread (PRIO_PROCESS applies to one thread).
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's policy (without the reset-on-fork flag) and
    /// nice value.
    fn scheduling() -> (i32, i32) {
        // SAFETY: both only read this thread's scheduling.
        unsafe {
            (
                libc::sched_getscheduler(0) & !libc::SCHED_RESET_ON_FORK,
                libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t),
            )
        }
    }

    /// Whether this thread may raise its scheduling (CAP_SYS_NICE).
    fn may_raise() -> bool {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: changes only this test thread's scheduling, put back below.
        let ok = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0;
        let other = libc::sched_param { sched_priority: 0 };
        // SAFETY: as above.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &other) };
        ok
    }

    /// Drop CAP_SYS_NICE from this thread's effective set (capabilities
    /// are per thread).
    fn drop_cap_sys_nice() {
        const CAP_SYS_NICE: u32 = 23;
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut h = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let mut d = [Data::default(); 2];
        // SAFETY: capget fills two Data for version 3; capset reads them
        // and changes only this thread's capabilities.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()), 0);
            d[0].effective &= !(1 << CAP_SYS_NICE);
            assert_eq!(libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()), 0);
        }
    }

    /// Inside the section the thread is SCHED_FIFO (where it may be);
    /// after it, exactly as before (here: nice -10 from prefer_this_thread).
    #[test]
    fn real_time_section_restores_the_previous_scheduling() {
        std::thread::spawn(|| {
            let raise = may_raise();
            prefer_this_thread();
            let before = scheduling();
            if raise {
                assert_eq!(before, (libc::SCHED_OTHER, -10));
            }
            {
                let _rt = RealTimeSection::enter();
                let inside = if raise {
                    libc::SCHED_FIFO
                } else {
                    libc::SCHED_OTHER
                };
                assert_eq!(scheduling().0, inside);
            }
            assert_eq!(scheduling(), before);
        })
        .join()
        .unwrap();
    }

    /// Without CAP_SYS_NICE every scheduling request is refused and the
    /// thread runs on unchanged (nothing fails).
    #[test]
    fn without_cap_sys_nice_scheduling_stays_as_it_was() {
        std::thread::spawn(|| {
            drop_cap_sys_nice();
            assert!(!may_raise());
            let before = scheduling();
            fault_path_thread();
            assert_eq!(scheduling(), before);
            {
                let _rt = RealTimeSection::enter();
                assert_eq!(scheduling(), before);
            }
            assert_eq!(scheduling(), before);
        })
        .join()
        .unwrap();
    }
}

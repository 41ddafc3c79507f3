//! Dropping guest pages on the destination (`MADV_DONTNEED`): the
//! discard sets and, at LISTEN, every page never received.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use super::PostcopyError;

/// Drops ranges of this process's private anonymous memory
/// (`MADV_DONTNEED`), as many per system call as the kernel allows.
pub(super) struct PageDropper {
    /// Our own pidfd, for `process_madvise`.
    pidfd: Option<std::os::fd::OwnedFd>,
    /// `process_madvise` works here (cleared at its first refusal).
    vectored: AtomicBool,
}

impl PageDropper {
    /// A dropper that tries `process_madvise` first.
    pub(super) fn new() -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        let pidfd = i32::try_from(fd).ok().filter(|&fd| fd >= 0).map(|fd| {
            // SAFETY: `fd` was just opened and is owned by nothing else.
            unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
        });
        Self {
            pidfd,
            vectored: AtomicBool::new(true),
        }
    }

    /// A dropper that uses one `madvise` per range (for tests).
    #[cfg(test)]
    fn one_by_one() -> Self {
        Self {
            pidfd: None,
            vectored: AtomicBool::new(false),
        }
    }

    /// Drop the pages of every range in `iov` (`MADV_DONTNEED`: they read
    /// back as zero, or as missing under userfaultfd). The ranges must lie
    /// in private anonymous memory of this process (the callers check them
    /// against the guest RAM blocks).
    ///
    /// Many ranges per system call where the kernel allows:
    /// `process_madvise` on our own pidfd (`MADV_DONTNEED` for the calling
    /// process since Linux 6.13) takes up to `UIO_MAXIOV` ranges and, since
    /// 6.16, flushes the TLB once for all of them, where `madvise` pays one
    /// flush (an IPI to every CPU that ran the process) per range. A
    /// discard set is often a thousand scattered pages: on the 2-CPU test
    /// host, 1000 single pages take 2.0-3.2 ms one by one and 0.6-0.7 ms in
    /// one call. Where the kernel refuses the call, every range goes
    /// through `madvise` from then on.
    ///
    /// # Safety
    ///
    /// Every range must lie in private anonymous memory of this process
    /// whose contents nothing relies on (guest RAM being loaded).
    pub(super) unsafe fn drop_ranges(&self, iov: &mut [libc::iovec]) -> Result<(), PostcopyError> {
        const UIO_MAXIOV: usize = 1024;
        let mut rest = iov;
        if let Some(fd) = &self.pidfd {
            while !rest.is_empty() && self.vectored.load(Ordering::Relaxed) {
                let n = rest.len().min(UIO_MAXIOV);
                // SAFETY: `rest[..n]` are valid iovecs, the kernel only
                // reads them; the ranges may be dropped (the caller's
                // contract).
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_process_madvise,
                        fd.as_raw_fd(),
                        rest.as_ptr(),
                        n,
                        libc::MADV_DONTNEED,
                        0,
                    )
                };
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    // Older kernels: no such call, or not this advice.
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::ENOSYS | libc::EINVAL | libc::EPERM)
                    ) {
                        return Err(PostcopyError::Discard {
                            addr: rest[0].iov_base as usize,
                            len: rest[0].iov_len,
                            source: e,
                        });
                    }
                }
                if r <= 0 {
                    // Refused, or no progress: `madvise` takes the rest (and
                    // names the range it fails on).
                    self.vectored.store(false, Ordering::Relaxed);
                    break;
                }
                // It returns the bytes dropped, in order: skip those ranges.
                let mut done = r as usize;
                while done > 0 && !rest.is_empty() {
                    let first = &mut rest[0];
                    if done < first.iov_len {
                        first.iov_base = (first.iov_base as usize + done) as *mut libc::c_void;
                        first.iov_len -= done;
                        break;
                    }
                    done -= first.iov_len;
                    rest = &mut rest[1..];
                }
            }
        }
        for v in rest.iter() {
            // SAFETY: the range may be dropped (the caller's contract).
            let r = unsafe { libc::madvise(v.iov_base, v.iov_len, libc::MADV_DONTNEED) };
            if r != 0 {
                return Err(PostcopyError::Discard {
                    addr: v.iov_base as usize,
                    len: v.iov_len,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::PAGE_SIZE;

    /// 3000 single pages (three vectors, the last one partial) and a few
    /// long ranges dropped from a private anonymous mapping: exactly those
    /// pages read back as zero, with either way of dropping.
    #[test]
    fn page_dropper_drops_exactly_the_ranges() {
        const PAGES: usize = 8192;
        for dropper in [PageDropper::new(), PageDropper::one_by_one()] {
            // SAFETY: a fresh private anonymous mapping, unmapped below.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    PAGES * PAGE_SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED);
            // SAFETY: the mapping is PAGES pages long and ours alone.
            let mem =
                unsafe { std::slice::from_raw_parts_mut(base.cast::<u8>(), PAGES * PAGE_SIZE) };
            mem.fill(0xa5);
            let mut dropped = vec![false; PAGES];
            let mut ranges: Vec<(usize, usize)> = (0..3000).map(|i| (i * 2 + 1, 1)).collect();
            ranges.extend([(6100, 300), (7000, 1000), (8191, 1)]);
            let mut iov: Vec<libc::iovec> = ranges
                .iter()
                .map(|&(first, n)| {
                    dropped[first..first + n].fill(true);
                    libc::iovec {
                        iov_base: mem[first * PAGE_SIZE..].as_mut_ptr().cast(),
                        iov_len: n * PAGE_SIZE,
                    }
                })
                .collect();
            // SAFETY: the ranges lie in the test's own mapping, whose
            // contents only this test looks at.
            unsafe { dropper.drop_ranges(&mut iov) }.unwrap();
            for (pg, &gone) in dropped.iter().enumerate() {
                let page = &mem[pg * PAGE_SIZE..(pg + 1) * PAGE_SIZE];
                let want = if gone { 0 } else { 0xa5 };
                assert!(
                    page.iter().all(|&b| b == want),
                    "page {pg} (dropped: {gone})"
                );
            }
            // SAFETY: unmapping the mapping made above; `mem` is not used again.
            unsafe { libc::munmap(base, PAGES * PAGE_SIZE) };
        }
    }

    /// A range outside any mapping is an error naming it, not a silent
    /// success.
    #[test]
    fn page_dropper_reports_a_bad_range() {
        for dropper in [PageDropper::new(), PageDropper::one_by_one()] {
            let mut iov = [libc::iovec {
                // Page-aligned and never mapped in user space (the top of
                // the lower half).
                iov_base: 0x7fff_ffff_0000usize as *mut libc::c_void,
                iov_len: PAGE_SIZE,
            }];
            // SAFETY: nothing is mapped there, so nothing can be dropped.
            let e = unsafe { dropper.drop_ranges(&mut iov) }.unwrap_err();
            assert!(
                e.to_string().contains("0x7fffffff0000"),
                "error names the range: {e}"
            );
        }
    }
}

//! Guest physical memory: layout, allocation and KVM memslots.
//!
//! RAM starts at guest-physical 0. Below 4 GiB it stops at the start of the
//! 32-bit device hole (3 GiB by default, `-machine max-ram-below-4g=` as in
//! QEMU); the rest continues at 4 GiB. Each range is one anonymous private
//! mapping and one KVM memslot, backed by transparent huge pages where the
//! host allows (`MADV_HUGEPAGE`, as QEMU does): fewer TLB misses for the
//! guest and for every pass the VMM makes over its RAM (a migration reads
//! all of it). An incoming migration into RAM that is not preallocated
//! runs without them (see `Vm::discard_ram`), and so does a postcopy
//! destination (see the migration crate's postcopy module). Dirty pages are
//! the union of KVM's dirty log and vm-memory's bitmap of the VMM's own
//! writes.

use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// `/proc/self/pagemap`: which pages of the VMM's mappings were ever
/// populated. Guest RAM is anonymous and private, so a page neither present
/// nor swapped out has never been written and reads as zero.
pub struct Pagemap(std::fs::File);

/// pagemap entry bits: page present in RAM, page swapped out.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

impl Pagemap {
    /// Open it (`None` where the kernel has none).
    pub fn open() -> Option<Self> {
        std::fs::File::open("/proc/self/pagemap").ok().map(Self)
    }

    /// For the host pages from `addr` (page-aligned), as many as `out` has
    /// bits (64 per word): bit i set when page i is populated.
    pub fn populated(&self, addr: u64, out: &mut [u64]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut raw = vec![0u8; out.len() * 64 * 8];
        self.0.read_exact_at(&mut raw, addr / PAGE_SIZE * 8)?;
        out.fill(0);
        for (i, e) in raw.chunks_exact(8).enumerate() {
            let e = u64::from_ne_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            if e & (PM_PRESENT | PM_SWAPPED) != 0 {
                out[i / 64] |= 1 << (i % 64);
            }
        }
        Ok(())
    }
}

/// `-machine dump-guest-core=off`: leave guest RAM out of this process's
/// core dumps (`MADV_DONTDUMP`), as QEMU does.
pub fn dont_dump(mem: &GuestMemoryMmap) {
    for r in mem.iter() {
        // SAFETY: the range is exactly one guest RAM mapping, which lives as
        // long as `mem`; MADV_DONTDUMP changes only core dump contents.
        let rc = unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_DONTDUMP) };
        if rc != 0 {
            log::warn!(
                "dump-guest-core=off: madvise(MADV_DONTDUMP) failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Guest memory with a bitmap of VMM writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// Default start of the 32-bit device hole.
pub const DEFAULT_HOLE_START: u64 = 3 << 30;
/// RAM above the hole starts here.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// Smallest RAM size we accept (the boot structures and kernel live below 32 MiB).
pub const MIN_RAM: u64 = 32 << 20;

/// Errors of the memory module.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is not usable.
    #[error("memory size {0} bytes: {1}")]
    Size(u64, &'static str),
    /// mmap of guest RAM failed.
    #[error("cannot allocate guest memory")]
    Alloc(#[source] vm_memory::mmap::FromRangesError),
    /// `-mem-prealloc`: the kernel could not back guest RAM.
    #[error("cannot preallocate {0} MiB of guest RAM (-mem-prealloc)")]
    Prealloc(u64, #[source] std::io::Error),
    /// KVM refused a memslot.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {0}")]
    Memslot(u32, #[source] kvm_ioctls::Error),
    /// Reading the dirty log failed.
    #[error("KVM_GET_DIRTY_LOG for slot {0}")]
    DirtyLog(u32, #[source] kvm_ioctls::Error),
    /// Harvesting KVM's dirty rings failed.
    #[error("harvesting the dirty rings")]
    DirtyRing(#[source] crate::dirty_ring::DirtyRingError),
}

/// Where RAM lives in guest-physical space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemLayout {
    /// Total RAM in bytes.
    pub size: u64,
    /// RAM ranges `(gpa, len)`, one memslot each.
    pub ranges: Vec<(u64, u64)>,
}

impl MemLayout {
    /// Layout for `size` bytes of RAM with the device hole starting at `hole_start`.
    pub fn new(size: u64, hole_start: u64) -> Result<Self, MemoryError> {
        if size < MIN_RAM {
            return Err(MemoryError::Size(size, "at least 32 MiB is needed"));
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::Size(size, "not a multiple of 4 KiB"));
        }
        if !(MIN_RAM..=HIGH_RAM_START).contains(&hole_start) || !hole_start.is_multiple_of(2 << 20)
        {
            return Err(MemoryError::Size(
                hole_start,
                "hole start must be a 2 MiB multiple in [32 MiB, 4 GiB]",
            ));
        }
        let low = size.min(hole_start);
        let mut ranges = vec![(0, low)];
        if size > low {
            ranges.push((HIGH_RAM_START, size - low));
        }
        Ok(Self { size, ranges })
    }

    /// End of the RAM range that starts at 0.
    pub fn low_end(&self) -> u64 {
        self.ranges[0].1
    }

    /// Map the RAM.
    pub fn allocate(&self) -> Result<GuestMemoryMmap, MemoryError> {
        let ranges: Vec<(GuestAddress, usize)> = self
            .ranges
            .iter()
            .map(|&(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(MemoryError::Alloc)?;
        huge_pages(&mem, true);
        // The bitmap of VMM writes has a bit per host page; the dirty-log
        // code ORs it word by word into KVM's log, a bit per 4 KiB.
        for r in mem.iter() {
            if (**r).bitmap().len() as u64 != r.len() / PAGE_SIZE {
                return Err(MemoryError::Size(
                    r.len(),
                    "the host page size must be 4 KiB",
                ));
            }
        }
        Ok(mem)
    }
}

/// Let the kernel back guest RAM with transparent huge pages (`on`,
/// `MADV_HUGEPAGE`) or not (`MADV_NOHUGEPAGE`); pages already there stay as
/// they are. A hint: without THP in the kernel the call fails and RAM stays
/// in 4 KiB pages, so the result is not checked.
pub fn huge_pages(mem: &GuestMemoryMmap, on: bool) {
    let advice = if on {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    for r in mem.iter() {
        if let Ok(host) = r.get_host_address(vm_memory::MemoryRegionAddress(0)) {
            // SAFETY: `host..host+len` is exactly one anonymous private
            // mapping owned by `mem`; this advice only changes how the
            // kernel backs it from now on, never its contents.
            unsafe {
                libc::madvise(host.cast(), r.len() as usize, advice);
            }
        }
    }
}

/// Back every page of guest RAM now, as QEMU's `-mem-prealloc`: one
/// `MADV_POPULATE_WRITE` (Linux 5.14) per chunk, the chunks spread over the
/// host's CPUs. The pages read as zero. A guest or an incoming migration then
/// writes into memory the host already provides instead of taking a page
/// fault (and a page clear) on each first write.
pub fn populate(mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    const ALIGN: usize = 2 << 20;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut chunks = Vec::new();
    for r in mem.iter() {
        let len = r.len() as usize;
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::Size(r.len(), "a RAM range has no host mapping"))?
            as usize;
        let step = len.div_ceil(threads).next_multiple_of(ALIGN);
        let mut off = 0;
        while off < len {
            let n = step.min(len - off);
            chunks.push((host + off, n));
            off += n;
        }
    }
    let populate = |(addr, len): (usize, usize)| -> std::io::Result<()> {
        // SAFETY: `addr..addr+len` lies inside one anonymous private mapping
        // owned by `mem`, which outlives this call; MADV_POPULATE_WRITE only
        // faults its pages in (zero-filled), it never changes the mapping.
        let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let total_mib = mem.iter().map(|r| r.len()).sum::<u64>() >> 20;
    std::thread::scope(|s| {
        let workers: Vec<_> = chunks
            .into_iter()
            .map(|c| s.spawn(move || populate(c)))
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("populating thread panicked")))
        })
    })
    .map_err(|e| MemoryError::Prealloc(total_mib, e))
}

/// How many users want dirty logging on (a migration, a dirty rate
/// measurement, the dirty limit): one VM per process, so one count.
static DIRTY_LOG_USERS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

/// A user wants dirty logging: on for every memslot if it was off.
pub fn dirty_log_acquire(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    let mut n = DIRTY_LOG_USERS.lock().unwrap_or_else(|e| e.into_inner());
    if *n == 0 {
        set_memslots(vm, mem, true)?;
    }
    *n += 1;
    Ok(())
}

/// A user is done with dirty logging: off once nobody wants it.
pub fn dirty_log_release(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    let mut n = DIRTY_LOG_USERS.lock().unwrap_or_else(|e| e.into_inner());
    *n = n.saturating_sub(1);
    if *n == 0 {
        set_memslots(vm, mem, false)?;
    }
    Ok(())
}

/// Register every RAM range with KVM, optionally with dirty logging.
pub fn set_memslots(vm: &VmFd, mem: &GuestMemoryMmap, dirty_log: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::Size(region.len(), "region has no host mapping"))?;
        let r = kvm_userspace_memory_region {
            slot,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the VM
        // keeps alive (in an Arc) for as long as the VM fd exists; the slot
        // describes exactly that mapping.
        unsafe { vm.set_user_memory_region(r) }.map_err(|e| MemoryError::Memslot(slot, e))?;
    }
    Ok(())
}

/// Harvest KVM's dirty rings into the VMM's bitmap and repair an overflow
/// (see [`crate::dirty_ring`]): KVM lost entries, and the write protection
/// of their pages with them, so dirty logging is turned off and on again
/// for every memslot (turning it on write-protects every page), and only
/// then is every populated page marked dirty: a write before the re-arm is
/// covered by the marking, a write after it is logged again.
pub fn harvest_rings(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    rings: &crate::dirty_ring::DirtyRings,
) -> Result<(), MemoryError> {
    rings.harvest().map_err(MemoryError::DirtyRing)?;
    if rings.take_overflow() {
        let users = DIRTY_LOG_USERS.lock().unwrap_or_else(|e| e.into_inner());
        if *users > 0 {
            set_memslots(vm, mem, false)?;
            set_memslots(vm, mem, true)?;
        }
        drop(users);
        rings.mark_all();
    }
    Ok(())
}

/// A dirty-page bitmap per region (bit n = page n of the region), the union
/// of KVM's log (which the ioctl clears) and the VMM's own writes (cleared here).
///
/// With KVM's dirty rings (`rings`), the rings are harvested into the
/// VMM's bitmap first (KVM then has no per-slot log).
pub fn take_dirty_bitmaps(
    vm: &VmFd,
    mem: &Arc<GuestMemoryMmap>,
    rings: Option<&crate::dirty_ring::DirtyRings>,
) -> Result<Vec<Vec<u64>>, MemoryError> {
    if let Some(r) = rings {
        harvest_rings(vm, mem, r)?;
    }
    let mut out = Vec::with_capacity(mem.num_regions());
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let pages = (region.len() / PAGE_SIZE) as usize;
        let mut bits = match rings {
            Some(_) => vec![0u64; pages.div_ceil(64)],
            None => vm
                .get_dirty_log(slot, region.len() as usize)
                .map_err(|e| MemoryError::DirtyLog(slot, e))?,
        };
        // The VMM's own writes: one bit per page as in KVM's log, taken and
        // cleared word by word atomically (a write racing with this lands
        // in this sync or the next, never in neither).
        let vmm_bits: &AtomicBitmap = (**region).bitmap();
        for (w, v) in bits.iter_mut().zip(vmm_bits.get_and_reset()) {
            *w |= v;
        }
        out.push(bits);
    }
    Ok(out)
}

/// Copy `src` into guest RAM at `dst`, `dst` marked dirty in the VMM's
/// bitmap (as `write_slice`, which this replaces where a migration places
/// pages). On x86_64 the stores are non-temporal: a page placed by an
/// incoming migration is not read again soon, and a store through the
/// cache first reads every line it writes. On this host that made the
/// destination's migration thread ~30 % cheaper for the same stream (perf),
/// and bench/placecopy.sh places 1.1-1.4x faster so than with `memcpy`, a
/// fence per page included (docs/benchmarks.md).
pub fn write_streaming(
    mem: &GuestMemoryMmap,
    src: &[u8],
    dst: GuestAddress,
) -> Result<(), vm_memory::GuestMemoryError> {
    use vm_memory::bitmap::Bitmap;
    let slice = mem.get_slice(dst, src.len())?;
    let guard = slice.ptr_guard_mut();
    let out = guard.as_ptr();
    #[cfg(target_arch = "x86_64")]
    if (out as usize).is_multiple_of(16) && src.len().is_multiple_of(16) {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        // Marked first: a locked write waits for earlier streaming stores
        // to drain; here it comes after the previous page's sfence.
        slice.bitmap().mark_dirty(0, src.len());
        let s = src.as_ptr().cast::<__m128i>();
        let d = out.cast::<__m128i>();
        for i in 0..src.len() / 16 {
            // SAFETY: `slice` is `src.len()` bytes of mapped guest RAM from
            // `out` (16-byte aligned, checked above), kept mapped by `mem`
            // while `guard` lives; i * 16 + 16 <= src.len() bounds both
            // the unaligned load from `src` and the store. SSE2 is part of
            // the x86_64 baseline.
            unsafe { _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i))) };
        }
        // SAFETY: no operands; orders the streaming stores before any later
        // store (whatever tells another thread the page is there).
        unsafe { _mm_sfence() };
        return Ok(());
    }
    slice.copy_from(src);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let l = MemLayout::new(128 << 20, DEFAULT_HOLE_START).unwrap();
        assert_eq!(l.ranges, vec![(0, 128 << 20)]);
        let l = MemLayout::new(4 << 30, DEFAULT_HOLE_START).unwrap();
        assert_eq!(l.ranges, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        let l = MemLayout::new(1536 << 20, 1 << 30).unwrap();
        assert_eq!(l.ranges, vec![(0, 1 << 30), (4 << 30, 512 << 20)]);
        assert!(MemLayout::new(1 << 20, DEFAULT_HOLE_START).is_err());
        assert!(MemLayout::new((64 << 20) + 1, DEFAULT_HOLE_START).is_err());
        assert!(MemLayout::new(64 << 20, 5 << 30).is_err());
    }

    #[test]
    fn write_streaming_writes_and_marks_dirty() {
        use vm_memory::Bytes;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let page: Vec<u8> = (0..PAGE_SIZE as usize).map(|i| (i * 7 + 1) as u8).collect();
        write_streaming(&mem, &page, GuestAddress(3 * PAGE_SIZE)).unwrap();
        // Not 16-byte aligned: the plain copy.
        write_streaming(&mem, &page[..100], GuestAddress(5 * PAGE_SIZE + 3)).unwrap();
        let mut back = vec![0u8; PAGE_SIZE as usize];
        mem.read_slice(&mut back, GuestAddress(3 * PAGE_SIZE))
            .unwrap();
        assert_eq!(back, page);
        mem.read_slice(&mut back[..100], GuestAddress(5 * PAGE_SIZE + 3))
            .unwrap();
        assert_eq!(back[..100], page[..100]);
        let r = mem.iter().next().unwrap();
        let dirty: Vec<usize> = (0..1024)
            .filter(|&p| (**r).bitmap().is_bit_set(p))
            .collect();
        assert_eq!(dirty, [3, 5]);
        assert!(write_streaming(&mem, &page, GuestAddress(4 << 20)).is_err());
    }
}

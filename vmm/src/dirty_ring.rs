//! KVM's dirty ring (`-accel kvm,dirty-ring-size=N`, QEMU's syntax): dirty
//! pages are tracked per vCPU in a ring of N entries that KVM fills as the
//! guest writes, instead of the per-memslot bitmap.
//!
//! This module owns the rings: enabling the capability (before any vCPU
//! exists), mapping each vCPU's ring, and harvesting. A harvest reads every
//! entry KVM has published (flags DIRTY, read with acquire), marks its page
//! in the memory region's dirty bitmap (the one the VMM's own writes go
//! to, which the migration's sync takes and clears), hands the entry back
//! (flags RESET, written with release) and, once all rings are read, asks
//! KVM to re-protect those pages (`KVM_RESET_DIRTY_RINGS`). A vCPU whose
//! ring is full leaves `KVM_RUN` (`KVM_EXIT_DIRTY_RING_FULL`) and harvests
//! its own ring before running on. A KVM that overflows a ring (pushes past
//! the soft limit before the vCPU exits, as kvm_pvm does: the kernel warns
//! in `kvm_dirty_ring_push`) loses entries, and with each entry the write
//! protection KVM would have given its page back at the reset: that page's
//! later writes would never be logged again. A harvest that finds the ring
//! full or out of step with KVM's indexes resynchronises it and records
//! the overflow (see `DirtyRings::take`); the next sync
//! (`memory::harvest_rings`) turns dirty logging off and on again, which
//! write-protects every page anew, and then counts all populated RAM as
//! dirty, so the mode stays correct, only slower, there. Dirty logging is on only while a
//! migration runs (the memslots' `KVM_MEM_LOG_DIRTY_PAGES`), so outside
//! one the rings stay empty.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use crate::memory::{GuestMemoryMmap, PAGE_SIZE};

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, 0xAE, 0xc7);

/// An entry KVM has filled.
const GFN_DIRTY: u32 = 1;
/// An entry handed back to KVM.
const GFN_RESET: u32 = 2;
/// Smallest ring QEMU accepts, entries.
const MIN_ENTRIES: u32 = 1024;

/// Dirty ring failures.
#[derive(Debug, thiserror::Error)]
pub enum DirtyRingError {
    /// The size is not one QEMU (or this KVM) accepts.
    #[error("dirty-ring-size={0}: {1}")]
    Size(u32, String),
    /// Enabling the capability failed.
    #[error("enabling KVM's dirty ring ({0} entries) failed")]
    Enable(u32, #[source] kvm_ioctls::Error),
    /// Mapping a vCPU's ring failed.
    #[error("mapping vCPU {0}'s dirty ring failed")]
    Map(usize, #[source] std::io::Error),
    /// KVM_RESET_DIRTY_RINGS failed.
    #[error("KVM_RESET_DIRTY_RINGS failed")]
    Reset(#[source] std::io::Error),
}

/// One vCPU's ring, mapped from its fd.
struct Ring {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    /// The next entry to read.
    next: u32,
}

impl Ring {
    /// Entry `i`'s flags (`i` taken modulo the ring's size), which KVM and
    /// we access atomically by the ring's ABI.
    fn flags(&self, i: u32) -> &AtomicU32 {
        let idx = (i & (self.entries - 1)) as usize;
        // SAFETY: idx < entries, inside the mapping, which lives as long
        // as `self`; `flags` is the entry's first u32 (4-aligned).
        unsafe { &*(std::ptr::addr_of_mut!((*self.base.add(idx)).flags) as *const AtomicU32) }
    }

    /// Entry `i`'s slot and offset (read after its flags said DIRTY).
    fn entry(&self, i: u32) -> (u32, u64) {
        let idx = (i & (self.entries - 1)) as usize;
        // SAFETY: as in `flags`; KVM wrote them before publishing DIRTY,
        // which the caller's acquire load of the flags ordered.
        unsafe {
            let e = self.base.add(idx);
            (
                std::ptr::read_volatile(&(*e).slot),
                std::ptr::read_volatile(&(*e).offset),
            )
        }
    }

    /// Is a filled entry out of place (see [`DirtyRings::take`])?
    fn overflowed(&self) -> bool {
        let next = self.next & (self.entries - 1);
        (0..self.entries).any(|i| {
            i != next
                && self.flags(i).load(Ordering::Acquire) & GFN_DIRTY != 0
                && self.flags(next).load(Ordering::Acquire) & GFN_DIRTY == 0
        })
    }
}

/// Every vCPU's dirty ring.
pub struct DirtyRings {
    rings: Vec<Mutex<Ring>>,
    /// An overflow was logged.
    warned: std::sync::atomic::AtomicBool,
    /// An overflow not yet repaired ([`Self::take_overflow`]).
    overflowed: std::sync::atomic::AtomicBool,
    /// Per vCPU: entries harvested so far (each user keeps its own start).
    counts: Vec<std::sync::atomic::AtomicU64>,
    vm: Arc<VmFd>,
    mem: Arc<GuestMemoryMmap>,
    /// Opened once here: an overflow is handled on a vCPU thread, whose
    /// sandbox allows reading an open file but not opening one.
    pagemap: Option<crate::memory::Pagemap>,
}

// SAFETY: `base` points into a shared mapping owned by this value (unmapped
// on drop); each ring is only touched under its Mutex, and the entries it
// shares with KVM are accessed atomically (flags) as KVM's ABI requires.
unsafe impl Send for DirtyRings {}
// SAFETY: as above.
unsafe impl Sync for DirtyRings {}

/// Turn the dirty ring on for `vm`, `entries` per vCPU (a power of two,
/// at least 1024, within what KVM offers). Must come before any vCPU.
pub fn enable(vm: &VmFd, entries: u32) -> Result<(), DirtyRingError> {
    if entries < MIN_ENTRIES || !entries.is_power_of_two() {
        return Err(DirtyRingError::Size(
            entries,
            "must be a power of two, 1024 or more".into(),
        ));
    }
    let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
    // Prefer the variant with explicit acquire/release semantics.
    let cap = if vm.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)) > 0 {
        KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    } else {
        KVM_CAP_DIRTY_LOG_RING
    };
    let max = vm.check_extension_raw(u64::from(cap));
    if max <= 0 {
        return Err(DirtyRingError::Size(
            entries,
            "this KVM has no dirty ring".into(),
        ));
    }
    if bytes > max as usize {
        return Err(DirtyRingError::Size(
            entries,
            format!(
                "this KVM allows at most {} entries",
                max as usize / std::mem::size_of::<kvm_dirty_gfn>()
            ),
        ));
    }
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = bytes as u64;
    vm.enable_cap(&c)
        .map_err(|e| DirtyRingError::Enable(entries, e))
}

impl DirtyRings {
    /// Map the ring of each of `vcpus` (`entries` each, as enabled).
    pub fn map(
        vm: Arc<VmFd>,
        mem: Arc<GuestMemoryMmap>,
        vcpus: &[VcpuFd],
        entries: u32,
    ) -> Result<Self, DirtyRingError> {
        use std::os::fd::AsRawFd;
        let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let mut rings = Vec::with_capacity(vcpus.len());
        for (i, v) in vcpus.iter().enumerate() {
            // SAFETY: maps `bytes` of the vCPU fd at KVM's dirty ring offset,
            // a shared mapping KVM documents for this; the result is checked
            // and unmapped only on drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    v.as_raw_fd(),
                    i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE_SIZE as i64,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(DirtyRingError::Map(i, std::io::Error::last_os_error()));
            }
            rings.push(Mutex::new(Ring {
                base: p.cast(),
                entries,
                next: 0,
            }));
        }
        Ok(Self {
            rings,
            warned: std::sync::atomic::AtomicBool::new(false),
            overflowed: std::sync::atomic::AtomicBool::new(false),
            pagemap: crate::memory::Pagemap::open(),
            counts: (0..vcpus.len())
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            vm,
            mem,
        })
    }

    /// Harvest every ring (see the module doc); returns the pages found.
    pub fn harvest(&self) -> Result<u64, DirtyRingError> {
        let mut n = 0;
        for (id, r) in self.rings.iter().enumerate() {
            n += self.take(id, &mut r.lock().unwrap_or_else(|e| e.into_inner()));
        }
        self.reset(n)?;
        Ok(n)
    }

    /// vCPU `id`'s ring is full: harvest it (its vCPU waits out of
    /// `KVM_RUN` meanwhile).
    pub fn harvest_vcpu(&self, id: usize) -> Result<u64, DirtyRingError> {
        let Some(r) = self.rings.get(id) else {
            return Ok(0);
        };
        let n = self.take(id, &mut r.lock().unwrap_or_else(|e| e.into_inner()));
        // Always: the migration thread may have read this ring and not yet
        // reset it (its entries are then harvested but not reclaimed).
        self.reset(1)?;
        Ok(n)
    }

    /// Read ring `id` and check it kept step with KVM. A filled entry
    /// anywhere but where the ring goes on from our last read (while that
    /// one is not filled: KVM fills them in order) means the ring
    /// overflowed: KVM pushed past its soft limit before it made the vCPU
    /// exit (seen on kvm_pvm, with a kernel warning), overwriting entries
    /// whose pages are then unknown, and never write-protected again by a
    /// reset. The ring is resynchronised with KVM's indexes
    /// ([`Self::resync`]) and the overflow recorded for the next sync to
    /// repair ([`Self::take_overflow`]); a vCPU thread harvesting its
    /// full ring only records it, and runs on.
    ///
    /// Reading the whole ring in one go counts as an overflow too: KVM
    /// exits at its soft limit, short of that, and a ring found full may
    /// have lost its next entry already with nothing after it to show it.
    fn take(&self, id: usize, r: &mut Ring) -> u64 {
        let n = self.read_ring(r);
        if let Some(c) = self.counts.get(id) {
            c.fetch_add(n, Ordering::Relaxed);
        }
        let full = n >= u64::from(r.entries);
        if !full && !r.overflowed() {
            return n;
        }
        if !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!(
                "vCPU {id}'s dirty ring overflowed in KVM (entries lost): dirty logging \
                 is re-armed and all populated guest RAM counts as dirty (each time; \
                 further overflows are not logged)"
            );
        }
        self.overflowed.store(true, Ordering::SeqCst);
        n + self.resync(r)
    }

    /// Whether a ring overflowed since the last call. The caller repairs
    /// it: write-protect every page again (dirty logging off and on), then
    /// [`Self::mark_all`].
    pub fn take_overflow(&self) -> bool {
        self.overflowed.swap(false, Ordering::SeqCst)
    }

    /// After an overflow: KVM's used entries start at our next entry, but
    /// the first of them were overwritten and already reclaimed (empty);
    /// mark those harvested so that KVM's reset walks over them, then read
    /// the entries KVM filled after them.
    fn resync(&self, r: &mut Ring) -> u64 {
        for _ in 0..r.entries {
            let f = r.flags(r.next);
            if f.load(Ordering::Acquire) & GFN_DIRTY != 0 {
                break;
            }
            f.store(GFN_RESET, Ordering::Release);
            r.next = r.next.wrapping_add(1);
        }
        self.read_ring(r)
    }

    /// Per vCPU, the entries harvested so far (`calc-dirty-rate`, the
    /// dirty limit: each takes the difference over its period).
    pub fn counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Every page of guest RAM that may have been written is dirty: every
    /// populated one ([`crate::memory::Pagemap`]; a never-populated page
    /// still reads as zero, as the destination has it), or all of them
    /// where pagemap cannot tell.
    pub fn mark_all(&self) {
        const WORDS: usize = 512; // 32 Ki pages, 256 KiB of pagemap per read
        let pagemap = self.pagemap.as_ref();
        let mut bits = vec![0u64; WORDS];
        for region in self.mem.iter() {
            let map: &vm_memory::bitmap::AtomicBitmap = (**region).bitmap();
            let pages = region.len() / PAGE_SIZE;
            let host = region.as_ptr() as u64;
            let mut first = 0;
            while first < pages {
                let n = (pages - first).min(64 * WORDS as u64);
                let words = n.div_ceil(64) as usize;
                let read = pagemap.is_some_and(|pm| {
                    pm.populated(host + first * PAGE_SIZE, &mut bits[..words])
                        .is_ok()
                });
                if !read {
                    map.mark_dirty((first * PAGE_SIZE) as usize, (n * PAGE_SIZE) as usize);
                } else {
                    for i in 0..n {
                        if bits[(i / 64) as usize] & (1 << (i % 64)) != 0 {
                            map.mark_dirty(((first + i) * PAGE_SIZE) as usize, PAGE_SIZE as usize);
                        }
                    }
                }
                first += n;
            }
        }
    }

    fn reset(&self, harvested: u64) -> Result<(), DirtyRingError> {
        if harvested == 0 {
            return Ok(());
        }
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and acts only on
        // this VM's rings.
        let r = unsafe { ioctl(&*self.vm, KVM_RESET_DIRTY_RINGS()) };
        if r < 0 {
            return Err(DirtyRingError::Reset(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Read ring `r` from its next entry while KVM has filled them.
    fn read_ring(&self, r: &mut Ring) -> u64 {
        let mut n = 0;
        for _ in 0..r.entries {
            let f = r.flags(r.next);
            if f.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            let (slot, offset) = r.entry(r.next);
            self.mark(slot & 0xffff, offset);
            f.store(GFN_RESET, Ordering::Release);
            r.next = r.next.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// Page `offset` of memslot `slot` (our slot n is region n) is dirty.
    fn mark(&self, slot: u32, offset: u64) {
        if let Some(region) = self.mem.iter().nth(slot as usize) {
            let at = offset * PAGE_SIZE;
            if at < region.len() {
                let bits: &vm_memory::bitmap::AtomicBitmap = (**region).bitmap();
                bits.mark_dirty(at as usize, PAGE_SIZE as usize);
            }
        }
    }
}

impl Drop for DirtyRings {
    fn drop(&mut self) {
        for r in &self.rings {
            let r = r.lock().unwrap_or_else(|e| e.into_inner());
            let bytes = r.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
            // SAFETY: unmaps exactly the mapping made in `map`, no longer used.
            unsafe {
                libc::munmap(r.base.cast(), bytes);
            }
        }
    }
}

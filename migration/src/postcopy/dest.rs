//! Postcopy, the destination's state after the advise: which pages are
//! present, the userfaultfd that makes a vCPU wait for a missing one, the
//! fault thread that asks the source for it, and the listen and preempt
//! threads that place the pages as they come. [`super::switch`] drives
//! them from the package on.
//!
//! See [`crate::postcopy`] for the message sequence.

use std::collections::HashMap;
use std::io::BufRead;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::json;
use userfaultfd::{Event as UffdEvent, FeatureFlags, IoctlFlags, Uffd, UffdBuilder};

use super::blocktime::Blocktime;

use super::dropper::PageDropper;
use super::{PostcopyError, NO_UFFD_ENV};
use crate::machine::MigrationError;
use crate::ram::{
    AtomicBitmap, GuestRam, PagePlacer, RamError, RamReader, RamRecordError, StagingPlacer,
    MAX_SECTION_PAGES, RAM_SECTION_ID,
};
use crate::return_path::{send_rp, PageRequest, RpWriter};
use crate::status::Shared;
use crate::stream::{rp, section, Reader, StreamError, PAGE_SIZE};

/// Fault-service statistics.
#[derive(Default)]
struct FaultStats {
    /// Faults read from userfaultfd.
    faults: u64,
    /// Requests sent to the source.
    requests: u64,
    /// Fault read to page placed (and the waiter woken), µs.
    latencies_us: Vec<u32>,
    /// Faults serviced by a page of the main stream (background or, without
    /// preempt, requested) and of the preempt channel.
    by_stream: [StreamFaults; 2],
    /// Faults of 1 ms or more, µs from the fault read: request written,
    /// page's section read (CRC checked), page placed; and the stream.
    slow: Vec<(u32, u32, u32, PageStream)>,
}

/// Faults serviced by the pages of one stream.
#[derive(Default, Clone, Copy)]
struct StreamFaults {
    serviced: u32,
    over_1ms: u32,
}

/// A fault waiting for its page: when it was read, when its request left.
#[derive(Clone, Copy)]
struct Pending {
    fault: Instant,
    sent: Option<Instant>,
}

/// How often the listen thread refreshes `x-postcopy-faults` in
/// `query-migrate` while pages come.
const STATS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Most slow faults (1 ms or more) kept with their breakdown.
const SLOW_FAULTS_KEPT: usize = 16;

/// Which stream placed a page: index into `FaultStats::by_stream`.
#[derive(Clone, Copy)]
enum PageStream {
    Main = 0,
    Preempt = 1,
}

/// Destination postcopy state, shared by the incoming, listen and fault threads.
pub struct DestPostcopy {
    ram: Arc<dyn GuestRam>,
    maps: Vec<(usize, usize)>,
    /// Pages present in guest RAM.
    received: Vec<AtomicBitmap>,
    /// Pages asked of the source.
    requested: Vec<AtomicBitmap>,
    uffd: Uffd,
    pub(super) rp: RpWriter,
    /// The preempt channel's request direction, while it is up.
    pub(super) urgent: Mutex<Option<RpWriter>>,
    pending: Mutex<HashMap<(usize, u64), Pending>>,
    stats: Mutex<FaultStats>,
    stop: vmm_sys_util::eventfd::EventFd,
    registered: AtomicBool,
    dropper: PageDropper,
    /// Bumped at each postcopy recovery: a request on a new connection
    /// names its block again.
    connection: AtomicU64,
    /// `postcopy-blocktime`: the vCPUs' waits (`None`: not measured).
    blocktime: Option<Mutex<Blocktime>>,
}

// SAFETY: the raw mapping addresses are plain integers here; the memory
// they name belongs to the VMM's guest RAM, which outlives the migration,
// and is only touched through userfaultfd ioctls and madvise.
unsafe impl Send for DestPostcopy {}
// SAFETY: as above; every mutable field is behind a Mutex or atomic.
unsafe impl Sync for DestPostcopy {}

impl DestPostcopy {
    /// POSTCOPY_ADVISE on the destination: can we do postcopy at all?
    /// `vcpu_threads`: with `postcopy-blocktime`, the vCPU threads whose
    /// waits are measured.
    pub fn advise(
        ram: Arc<dyn GuestRam>,
        enabled: bool,
        data: &[u8],
        rp: RpWriter,
        vcpu_threads: Option<Vec<i32>>,
    ) -> Result<Self, PostcopyError> {
        if !enabled {
            return Err(PostcopyError::Refused(
                "the postcopy-ram capability is not set on the destination \
                 (migrate-set-capabilities on both sides before migrate)"
                    .into(),
            ));
        }
        if data.len() != 16
            || data[0..8] != (PAGE_SIZE as u64).to_be_bytes()
            || data[8..16] != (PAGE_SIZE as u64).to_be_bytes()
        {
            return Err(PostcopyError::Refused(format!(
                "POSTCOPY_ADVISE with page sizes {data:02x?}, expected 4 KiB"
            )));
        }
        if std::env::var_os(NO_UFFD_ENV).is_some() {
            return Err(PostcopyError::NoUserfaultfd(format!(
                "disabled by {NO_UFFD_ENV} in the destination's environment"
            )));
        }
        let mut builder = UffdBuilder::new();
        builder
            .close_on_exec(true)
            .non_blocking(true)
            // KVM's own accesses to guest RAM (kernel mode) must fault too.
            .user_mode_only(false);
        if vcpu_threads.is_some() {
            // Which thread faulted, for the blocktime.
            builder.require_features(FeatureFlags::THREAD_ID);
        }
        let uffd = builder
            .create()
            .map_err(|e| PostcopyError::NoUserfaultfd(crate::machine::error_chain(&e)))?;
        let mut maps = Vec::new();
        for (b, blk) in ram.blocks().iter().enumerate() {
            let (addr, len) = ram.host_mapping(b).ok_or_else(|| {
                PostcopyError::NoUserfaultfd(format!(
                    "RAM block '{}' is not mapped for it",
                    blk.name
                ))
            })?;
            maps.push((addr as usize, len));
        }
        for &(a, l) in &maps {
            // SAFETY: each range is one RAM block's whole mapping, which
            // `ram` keeps alive; MADV_NOHUGEPAGE only stops the kernel from
            // backing it with huge pages from now on. Postcopy needs every
            // page not received to fault: a huge page allocated around a
            // received one fills its neighbours with zeros that read as
            // present. LISTEN drops them again by the received bitmap, but
            // khugepaged could collapse a range back before RAM is
            // registered (after, it leaves registered ranges alone), and
            // each drop inside a huge page splits it. QEMU turns THP off
            // here too. A hint: without THP it fails and changes nothing.
            unsafe {
                libc::madvise(a as *mut libc::c_void, l, libc::MADV_NOHUGEPAGE);
            }
        }
        // Check that registering works and offers what we need.
        let (a, l) = *maps
            .first()
            .ok_or_else(|| PostcopyError::Refused("no RAM".into()))?;
        let ioctls = uffd
            .register(a as *mut libc::c_void, l)
            .map_err(|e| PostcopyError::NoUserfaultfd(crate::machine::error_chain(&e)))?;
        let _ = uffd.unregister(a as *mut libc::c_void, l);
        let need = IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE;
        if !ioctls.contains(need) {
            return Err(PostcopyError::NoUserfaultfd(format!(
                "the kernel offers {ioctls:?} on guest RAM, need COPY, ZEROPAGE and WAKE"
            )));
        }
        let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| PostcopyError::NoUserfaultfd(format!("eventfd: {e}")))?;
        Ok(Self {
            received: ram
                .blocks()
                .iter()
                .map(|b| AtomicBitmap::new(b.pages()))
                .collect(),
            requested: ram
                .blocks()
                .iter()
                .map(|b| AtomicBitmap::new(b.pages()))
                .collect(),
            ram,
            maps,
            uffd,
            rp,
            urgent: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            stats: Mutex::new(FaultStats::default()),
            stop,
            registered: AtomicBool::new(false),
            dropper: PageDropper::new(),
            blocktime: vcpu_threads.map(|t| Mutex::new(Blocktime::new(t))),
            connection: AtomicU64::new(0),
        })
    }

    fn addr(&self, block: usize, page: u64) -> usize {
        self.maps[block].0 + (page as usize) * PAGE_SIZE
    }

    /// Make the pages at guest-physical addresses `gpas` present: a helper
    /// thread reads a byte of each one missing, and its faults go the way
    /// a vCPU's do (the fault thread asks the source, the page's arrival
    /// wakes it; released, userfaultfd lets it read zeros). `None`: all
    /// there already. For what must not wait on a page itself
    /// ([`crate::postcopy::switch`], before the devices load).
    pub(super) fn fetch(
        &self,
        gpas: &[u64],
    ) -> Result<Option<std::thread::JoinHandle<()>>, PostcopyError> {
        let mut missing: Vec<usize> = gpas
            .iter()
            .filter_map(|&g| self.ram.page_at(g))
            .filter(|&(b, p)| !self.received[b].test(p))
            .map(|(b, p)| self.addr(b, p))
            .collect();
        if missing.is_empty() {
            return Ok(None);
        }
        missing.sort_unstable();
        missing.dedup();
        std::thread::Builder::new()
            .name("postcopy-fetch".into())
            .spawn(move || {
                for a in missing {
                    // SAFETY: `a` is the start of a page inside a RAM
                    // block's mapping (`page_at` checked the block and
                    // page), which the VMM keeps for the life of the
                    // process; a volatile read of one byte, racing only
                    // with userfaultfd placing the page.
                    unsafe { std::ptr::read_volatile(a as *const u8) };
                }
            })
            .map(Some)
            .map_err(|e| PostcopyError::Protocol(format!("cannot start the fetch thread: {e}")))
    }

    /// Note a page placed during the precopy phase.
    pub fn mark_received(&self, block: usize, page: u64) {
        if let Some(b) = self.received.get(block) {
            b.test_and_set(page);
        }
    }

    /// Pages present in guest RAM, one bitmap per block (for the precopy
    /// loader's [`crate::precopy::TrackingPlacer`]).
    pub fn received(&self) -> &[AtomicBitmap] {
        &self.received
    }

    /// `(block, first page, pages)` as the iovec of its host range.
    fn iovec(&self, block: usize, first: u64, n: u64) -> libc::iovec {
        libc::iovec {
            iov_base: self.addr(block, first) as *mut libc::c_void,
            iov_len: n as usize * PAGE_SIZE,
        }
    }

    /// POSTCOPY_RAM_DISCARD: drop the listed pages.
    pub fn discard(&self, data: &[u8]) -> Result<u64, PostcopyError> {
        let bad = |why: String| PostcopyError::Protocol(format!("bad discard command: {why}"));
        if data.len() < 2 || data[0] != 0 {
            return Err(bad("missing version 0".into()));
        }
        let n = data[1] as usize;
        let name = data
            .get(2..2 + n)
            .ok_or_else(|| bad("name cut short".into()))?;
        let block = self
            .ram
            .blocks()
            .iter()
            .position(|b| b.name.as_bytes() == name)
            .ok_or_else(|| bad(format!("unknown block '{}'", String::from_utf8_lossy(name))))?;
        let pairs = &data[2 + n..];
        if !pairs.len().is_multiple_of(16) {
            return Err(bad("ranges not 16-byte pairs".into()));
        }
        let ps = PAGE_SIZE as u64;
        let pages = self.ram.blocks()[block].pages();
        let mut ranges = Vec::with_capacity(pairs.len() / 16);
        for pair in pairs.chunks_exact(16) {
            let start = u64::from_be_bytes(pair[0..8].try_into().unwrap_or_default());
            let len = u64::from_be_bytes(pair[8..16].try_into().unwrap_or_default());
            let end = start.checked_add(len).map(|e| e / ps);
            if !start.is_multiple_of(ps) || !len.is_multiple_of(ps) || end.is_none_or(|e| e > pages)
            {
                return Err(bad(format!(
                    "range {start:#x}+{len:#x} outside block '{}'",
                    self.ram.blocks()[block].name
                )));
            }
            if len > 0 {
                ranges.push((start / ps, len / ps));
            }
        }
        let mut iov: Vec<_> = ranges
            .iter()
            .map(|&(first, n)| self.iovec(block, first, n))
            .collect();
        // SAFETY: the ranges were checked to lie inside the block, guest
        // RAM still being loaded; these pages are to be sent again.
        unsafe { self.dropper.drop_ranges(&mut iov) }?;
        let mut total = 0;
        for (first, n) in ranges {
            for pg in first..first + n {
                self.received[block].clear(pg);
            }
            total += n;
        }
        Ok(total)
    }

    /// POSTCOPY_LISTEN: drop every page not received, register RAM with
    /// userfaultfd and start the fault thread.
    pub fn listen(self: &Arc<Self>) -> Result<std::thread::JoinHandle<()>, PostcopyError> {
        let mut iov = Vec::new();
        for (b, rec) in self.received.iter().enumerate() {
            let mut pg = 0;
            while pg < rec.len() {
                if rec.test(pg) {
                    pg += 1;
                    continue;
                }
                let start = pg;
                while pg < rec.len() && !rec.test(pg) {
                    pg += 1;
                }
                iov.push(self.iovec(b, start, pg - start));
            }
        }
        // SAFETY: the ranges lie inside guest RAM blocks (from the
        // received bitmaps' lengths) and hold pages never received.
        unsafe { self.dropper.drop_ranges(&mut iov) }?;
        for &(a, l) in &self.maps {
            self.uffd
                .register(a as *mut libc::c_void, l)
                .map_err(|source| PostcopyError::Uffd {
                    what: "register",
                    addr: a,
                    source,
                })?;
        }
        self.registered.store(true, Ordering::SeqCst);
        let me = self.clone();
        std::thread::Builder::new()
            .name("postcopy-fault".into())
            .spawn(move || me.fault_loop())
            .map_err(|e| {
                PostcopyError::NoUserfaultfd(format!("cannot start the fault thread: {e}"))
            })
    }

    /// The fault thread: read faults, ask the source for missing pages.
    fn fault_loop(&self) {
        crate::sched::fault_path_thread();
        crate::confine::enter(crate::confine::ThreadKind::PostcopyFault);
        let mut last_block = None;
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: fds is a valid array of two pollfd for the call's duration.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            loop {
                match self.uffd.read_event() {
                    Ok(Some(UffdEvent::Pagefault {
                        addr, thread_id, ..
                    })) => {
                        let at = Instant::now();
                        let tid = thread_id.as_raw();
                        if self
                            .on_fault(addr as usize, tid, at, &mut last_block)
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    }

    fn on_fault(
        &self,
        addr: usize,
        tid: i32,
        at: Instant,
        last_block: &mut Option<(bool, usize, u64)>,
    ) -> Result<(), std::io::Error> {
        let Some(block) = self
            .maps
            .iter()
            .position(|&(a, l)| addr >= a && addr < a + l)
        else {
            return Ok(());
        };
        let page = ((addr - self.maps[block].0) / PAGE_SIZE) as u64;
        let paddr = self.addr(block, page);
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).faults += 1;
        if self.received[block].test(page) {
            // Received as a zero page that was never populated, or placed
            // between the fault and now: make it present and wake the waiter.
            self.zero_or_wake(paddr);
            return Ok(());
        }
        if let Some(b) = &self.blocktime {
            let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
            b.fault(tid, (block, page), at);
            // Placed meanwhile: its placement did not see this wait.
            if self.received[block].test(page) {
                b.placed((block, page), Instant::now());
            }
        }
        if self.requested[block].test_and_set(page) {
            return Ok(()); // already asked; its arrival wakes every waiter
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (block, page),
                Pending {
                    fault: at,
                    sent: None,
                },
            );
        if self.received[block].test(page) {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(block, page));
            self.zero_or_wake(paddr);
            return Ok(());
        }
        let mut req = PageRequest {
            start: page * PAGE_SIZE as u64,
            len: PAGE_SIZE as u32,
            block: None,
        };
        // The preempt channel while it is up, else the return path. A
        // REQ_PAGES names no block: it means the last one named on the same
        // channel.
        let urgent = self
            .urgent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let key = (
            urgent.is_some(),
            block,
            self.connection.load(Ordering::SeqCst),
        );
        if *last_block != Some(key) {
            req.block = Some(self.ram.blocks()[block].name.as_bytes().to_vec());
            *last_block = Some(key);
        }
        let (kind, data) = req.encode();
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests += 1;
        let sent = match urgent {
            Some(u) if send_rp(&u, kind, &data).is_ok() => Ok(()),
            Some(_) => {
                // The source closed the channel after its last page (this
                // request raced with its EOF): the page is on its way.
                *self.urgent.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Ok(())
            }
            None => {
                // A broken return path: the postcopy pauses, and the
                // request, still pending, is sent again on the new one.
                let _ = send_rp(&self.rp, kind, &data);
                Ok(())
            }
        };
        if let Some(p) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&(block, page))
        {
            p.sent = Some(Instant::now());
        }
        sent
    }

    fn zero_or_wake(&self, paddr: usize) {
        // SAFETY: paddr is a page-aligned address inside a registered block.
        let r = unsafe {
            self.uffd
                .zeropage(paddr as *mut libc::c_void, PAGE_SIZE, true)
        };
        if r.is_err() {
            let _ = self.uffd.wake(paddr as *mut libc::c_void, PAGE_SIZE);
        }
    }

    /// The listen thread: read the rest of the stream, placing pages
    /// atomically, until EOF.
    pub fn listen_loop<R: BufRead>(
        &self,
        r: &mut Reader<R>,
        rr: &mut RamReader,
        shared: &Shared,
    ) -> Result<(), MigrationError> {
        // Also with a preempt channel: the pages the background stream
        // brings are the neighbours of the last request, which the guest
        // is likely to touch next (hand runs: 3 of 160 faults over 1 ms
        // preferred, 6 of 91 at the vCPUs' priority; within the noise of
        // bench/postcopy.sh, 97 % under 1 ms either way).
        crate::sched::prefer_this_thread();
        let mut staging = StagingPlacer::new(MAX_SECTION_PAGES);
        let mut ended = false;
        let mut stats_at = Instant::now();
        // After a recovery the stream's offsets start again: count on.
        let start = r.offset();
        let (base, base_zero, base_normal) = {
            let i = shared.lock_info();
            (
                i.ram.transferred.max(start) - start,
                i.ram.duplicate.saturating_sub(rr.zero_pages),
                i.ram.normal.saturating_sub(rr.pages - rr.zero_pages),
            )
        };
        loop {
            r.begin_section();
            let at = r.offset();
            let t = r.u8("section type")?;
            match t {
                section::PART | section::END => {
                    let id = r.be32("section id")?;
                    if id != RAM_SECTION_ID || ended {
                        return Err(StreamError::invalid(
                            at,
                            format!("unexpected RAM section (id {id}) in postcopy"),
                        )
                        .into());
                    }
                    self.place_section(r, rr, &mut staging, at, id, PageStream::Main)?;
                    ended = t == section::END;
                    // The fault statistics, live (every quarter second).
                    let stats = (stats_at.elapsed() >= STATS_EVERY).then(|| {
                        stats_at = Instant::now();
                        self.stats_json()
                    });
                    let mut i = shared.lock_info();
                    i.ram.transferred = base + r.offset();
                    i.ram.duplicate = base_zero + rr.zero_pages;
                    i.ram.normal = base_normal + rr.pages - rr.zero_pages;
                    if let Some(st) = stats {
                        self.blocktime_into(&mut i, false);
                        i.ram.postcopy_requests = st["requests"].as_u64().unwrap_or(0);
                        i.extra.insert("x-postcopy-faults".into(), st);
                    }
                }
                section::EOF if ended => return Ok(()),
                other => {
                    return Err(StreamError::invalid(
                        at,
                        format!("unexpected section type {other:#04x} in postcopy"),
                    )
                    .into())
                }
            }
        }
    }

    /// The records of a RAM section whose type and id (at `at`) were read:
    /// staged, checked against the footer, then placed with userfaultfd.
    fn place_section<R: BufRead>(
        &self,
        r: &mut Reader<R>,
        rr: &mut RamReader,
        staging: &mut StagingPlacer,
        at: u64,
        id: u32,
        stream: PageStream,
    ) -> Result<(), MigrationError> {
        rr.new_section();
        staging.clear();
        rr.read_records(r, staging)?;
        r.footer(id)?;
        staging
            .commit(&mut UffdPlacer(self, stream, Instant::now()))
            .map_err(|source| RamRecordError::Place { offset: at, source })?;
        Ok(())
    }

    /// The preempt thread: place the requested pages of the preempt
    /// channel until its EOF.
    pub(super) fn preempt_loop<R: BufRead>(&self, r: &mut Reader<R>) -> Result<(), MigrationError> {
        crate::sched::fault_path_thread();
        let mut rr = RamReader::new(self.ram.blocks().to_vec());
        let mut staging = StagingPlacer::new(MAX_SECTION_PAGES);
        loop {
            r.begin_section();
            let at = r.offset();
            match r.u8("section type")? {
                section::PART => {
                    let id = r.be32("section id")?;
                    if id != RAM_SECTION_ID {
                        return Err(
                            StreamError::invalid(at, format!("RAM section with id {id}")).into(),
                        );
                    }
                    self.place_section(r, &mut rr, &mut staging, at, id, PageStream::Preempt)?;
                }
                section::EOF => {
                    // Every page is on its way: later faults are answered
                    // by the background stream; late requests use the
                    // return path.
                    *self.urgent.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    return Ok(());
                }
                other => {
                    return Err(StreamError::invalid(
                        at,
                        format!("unexpected section type {other:#04x}"),
                    )
                    .into())
                }
            }
        }
    }

    /// A paused postcopy: requests go on the return path from now on (the
    /// preempt channel is gone with the connection), and the next one on
    /// any channel names its block (a reopened preempt channel starts
    /// afresh).
    pub(super) fn pause(&self) {
        *self.urgent.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.connection.fetch_add(1, Ordering::SeqCst);
    }

    /// Recovery, after POSTCOPY_RECV_BITMAP: tell the source, block by
    /// block, which pages are here (RECV_BITMAP, 32 KiB of bits each),
    /// then RESUME_ACK.
    pub(super) fn send_bitmaps(&self) -> std::io::Result<()> {
        const CHUNK_PAGES: u64 = 8 * 32 * 1024;
        for (b, rec) in self.received.iter().enumerate() {
            let name = self.ram.blocks()[b].name.as_bytes();
            let mut first = 0;
            while first < rec.len() {
                let n = CHUNK_PAGES.min(rec.len() - first);
                let mut bits = vec![0u8; n.div_ceil(8) as usize];
                for i in 0..n {
                    if rec.test(first + i) {
                        bits[(i / 8) as usize] |= 1 << (i % 8);
                    }
                }
                let data = crate::return_path::encode_bitmap(name, first, &bits);
                send_rp(&self.rp, rp::RECV_BITMAP, &data)?;
                first += n;
            }
        }
        send_rp(
            &self.rp,
            rp::RESUME_ACK,
            &(self.received.len() as u32).to_be_bytes(),
        )
    }

    /// Recovery, at POSTCOPY_RESUME: a new connection (requests name
    /// their block again), and every request still pending asked again.
    pub(super) fn resume(&self) -> std::io::Result<()> {
        self.connection.fetch_add(1, Ordering::SeqCst);
        let mut keys: Vec<(usize, u64)> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        keys.sort_unstable();
        for (block, page) in keys {
            if self.received[block].test(page) {
                continue;
            }
            let (kind, data) = PageRequest {
                start: page * PAGE_SIZE as u64,
                len: PAGE_SIZE as u32,
                block: Some(self.ram.blocks()[block].name.as_bytes().to_vec()),
            }
            .encode();
            send_rp(&self.rp, kind, &data)?;
        }
        Ok(())
    }

    /// With `postcopy-blocktime`, QEMU's `postcopy-blocktime` and
    /// `postcopy-vcpu-blocktime` into `query-migrate`'s `i` (`end`: the
    /// postcopy is over, the waits still open end now).
    pub(super) fn blocktime_into(&self, i: &mut crate::status::Info, end: bool) {
        let Some(b) = &self.blocktime else { return };
        let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if end {
            b.end(now);
        }
        let (all, per) = b.to_json(now);
        i.extra.insert("postcopy-blocktime".into(), all);
        i.extra.insert("postcopy-vcpu-blocktime".into(), per);
    }

    /// Every page there? Then release userfaultfd.
    pub fn finish(&self) -> Result<(), PostcopyError> {
        for (b, rec) in self.received.iter().enumerate() {
            let missing = rec.len() - rec.count();
            if missing > 0 {
                return Err(PostcopyError::Protocol(format!(
                    "the stream ended with {missing} pages of block '{}' never sent",
                    self.ram.blocks()[b].name
                )));
            }
        }
        self.release();
        Ok(())
    }

    /// Stop the fault thread and unregister guest RAM (pending faults are
    /// then served by the kernel).
    pub fn release(&self) {
        let _ = self.stop.write(1);
        if self.registered.swap(false, Ordering::SeqCst) {
            for &(a, l) in &self.maps {
                let _ = self.uffd.unregister(a as *mut libc::c_void, l);
            }
        }
    }

    /// Fault statistics for query-migrate: `(faults, requests, p50 µs, p99 µs, max µs)`.
    pub fn stats_json(&self) -> serde_json::Value {
        let st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let mut l = st.latencies_us.clone();
        l.sort_unstable();
        let pct = |p: f64| -> u32 {
            if l.is_empty() {
                0
            } else {
                l[((l.len() - 1) as f64 * p).round() as usize]
            }
        };
        // Serviced faults by latency, each bucket up to its bound (µs), so
        // that runs can be pooled.
        let mut buckets = serde_json::Map::new();
        let mut lo = 0;
        for (name, hi) in [
            ("100", 100),
            ("200", 200),
            ("500", 500),
            ("1000", 1000),
            ("2000", 2000),
            ("5000", 5000),
            ("more", u32::MAX),
        ] {
            let n = l
                .iter()
                .filter(|&&v| v >= lo && (v < hi || hi == u32::MAX))
                .count();
            buckets.insert(name.into(), n.into());
            lo = hi;
        }
        json!({
            "faults": st.faults,
            "requests": st.requests,
            "serviced": l.len(),
            "latency-p50-us": pct(0.5),
            "latency-p99-us": pct(0.99),
            "latency-max-us": l.last().copied().unwrap_or(0),
            "latency-buckets-us": buckets,
            "serviced-by-stream": {
                "main": st.by_stream[PageStream::Main as usize].serviced,
                "preempt": st.by_stream[PageStream::Preempt as usize].serviced,
            },
            "slow-faults-us": st.slow.iter().map(|&(sent, read, placed, stream)| json!({
                "request-sent": sent,
                "section-read": read,
                "placed": placed,
                "stream": match stream { PageStream::Main => "main", PageStream::Preempt => "preempt" },
            })).collect::<Vec<_>>(),
            "over-1ms-by-stream": {
                "main": st.by_stream[PageStream::Main as usize].over_1ms,
                "preempt": st.by_stream[PageStream::Preempt as usize].over_1ms,
            },
        })
    }
}

/// Places pages with userfaultfd, exactly once each, from one stream
/// (with the time their section had been read).
struct UffdPlacer<'a>(&'a DestPostcopy, PageStream, Instant);

impl UffdPlacer<'_> {
    fn placed(&self, block: usize, page: u64) {
        let d = self.0;
        d.received[block].test_and_set(page);
        if let Some(b) = &d.blocktime {
            b.lock()
                .unwrap_or_else(|e| e.into_inner())
                .placed((block, page), Instant::now());
        }
        if let Some(t) = d
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(block, page))
        {
            let us = |i: Instant| {
                i.saturating_duration_since(t.fault)
                    .as_micros()
                    .min(u128::from(u32::MAX)) as u32
            };
            let total = us(Instant::now());
            let mut st = d.stats.lock().unwrap_or_else(|e| e.into_inner());
            st.latencies_us.push(total);
            let by = &mut st.by_stream[self.1 as usize];
            by.serviced += 1;
            by.over_1ms += u32::from(total >= 1000);
            if total >= 1000 && st.slow.len() < SLOW_FAULTS_KEPT {
                let sent = t.sent.map_or(0, us);
                st.slow.push((sent, us(self.2), total, self.1));
            }
        }
    }

    fn check(&self, block: usize, page: u64) -> Result<usize, RamError> {
        let d = self.0;
        if block >= d.maps.len() || page >= d.received[block].len() {
            return Err(RamError::OutOfRange { block, page });
        }
        if d.received[block].test(page) {
            return Err(RamError::Place {
                block,
                page,
                source: "page sent twice in postcopy".into(),
            });
        }
        Ok(d.addr(block, page))
    }
}

impl PagePlacer for UffdPlacer<'_> {
    fn place_page(&mut self, block: usize, page: u64, data: &[u8]) -> Result<(), RamError> {
        let addr = self.check(block, page)?;
        // SAFETY: data is PAGE_SIZE readable bytes; addr is a page of a
        // registered block; UFFDIO_COPY fills it atomically and wakes waiters.
        unsafe {
            self.0.uffd.copy(
                data.as_ptr().cast(),
                addr as *mut libc::c_void,
                PAGE_SIZE,
                true,
            )
        }
        .map_err(|e| RamError::Place {
            block,
            page,
            source: Box::new(e),
        })?;
        self.placed(block, page);
        Ok(())
    }

    fn place_zero(&mut self, block: usize, page: u64) -> Result<(), RamError> {
        let addr = self.check(block, page)?;
        // SAFETY: addr is a page of a registered block.
        unsafe {
            self.0
                .uffd
                .zeropage(addr as *mut libc::c_void, PAGE_SIZE, true)
        }
        .map_err(|e| RamError::Place {
            block,
            page,
            source: Box::new(e),
        })?;
        self.placed(block, page);
        Ok(())
    }
}

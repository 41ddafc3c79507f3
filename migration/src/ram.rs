//! Guest RAM as the migration engines see it, dirty bitmaps, and the RAM
//! records of the stream.
//!
//! The VMM implements [`GuestRam`] over its memory and KVM's dirty log; the
//! tests here implement it over plain vectors. Pages are addressed as
//! (block index, page index in block).
//!
//! It also owns the sending of RAM sections that every engine uses
//! (precopy's rounds, postcopy's phase after the switch, COLO's
//! checkpoints): a section's header and footer, the dirty pages as PART
//! sections (`send_dirty`) and the pacing of them (`Throttle`).

use std::io::{BufRead, Read, Write};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::stream::{ram_flag, section, Reader, Sink, StreamError, Writer, PAGE_SIZE};

/// One contiguous RAM block (one memslot in the VMM).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamBlock {
    /// Name in the stream, e.g. "ram-low".
    pub name: String,
    /// Size in bytes (a multiple of the page size).
    pub size: u64,
}

impl RamBlock {
    /// Pages in the block.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE as u64
    }
}

/// Errors from the RAM backend.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// A page outside the block.
    #[error("page {page} is outside block {block}")]
    OutOfRange {
        /// Block index.
        block: usize,
        /// Page index.
        page: u64,
    },
    /// The dirty log could not be read or switched.
    #[error("dirty log")]
    DirtyLog(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Placing a page failed (e.g. userfaultfd).
    #[error("placing page {page} of block {block}")]
    Place {
        /// Block index.
        block: usize,
        /// Page index.
        page: u64,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Guest RAM with dirty tracking.
pub trait GuestRam: Send + Sync {
    /// The blocks, in stream order.
    fn blocks(&self) -> &[RamBlock];
    /// Copy a page into `buf` (PAGE_SIZE bytes).
    fn read_page(&self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), RamError>;
    /// Store a page received from the stream.
    fn write_page(&self, block: usize, page: u64, data: &[u8]) -> Result<(), RamError>;
    /// Make a page all zeros (cheaply if it already is).
    fn zero_page(&self, block: usize, page: u64) -> Result<(), RamError>;
    /// Start logging guest and VMM writes.
    fn start_dirty_log(&self) -> Result<(), RamError>;
    /// OR the pages written since the previous call into `bitmaps` (one per
    /// block) and reset the log.
    fn sync_dirty_log(&self, bitmaps: &mut [Bitmap]) -> Result<(), RamError>;
    /// Stop logging.
    fn stop_dirty_log(&self) -> Result<(), RamError>;
    /// The block and page holding guest-physical address `gpa`, if it is
    /// in guest RAM (`None` also where the machine does not say).
    fn page_at(&self, _gpa: u64) -> Option<(usize, u64)> {
        None
    }
    /// Host address and length of a block's anonymous mapping, for
    /// userfaultfd on a postcopy destination; `None` if RAM is not mapped
    /// that way (postcopy is then refused at advise).
    fn host_mapping(&self, _block: usize) -> Option<(*mut u8, usize)> {
        None
    }
    /// Pages of `block` from `first` (up to `64 * out.len()`) that were never
    /// populated and so read as zero: bit i of `out` set for page `first + i`.
    /// The source sends them as ZERO without reading them (a read would
    /// fault each one in). Returns `false` when it cannot tell; `out` is
    /// then ignored. A page written after the answer is in the dirty log.
    fn unpopulated(&self, _block: usize, _first: u64, _out: &mut [u64]) -> bool {
        false
    }
}

/// A page bitmap several threads update (postcopy's received/requested).
pub struct AtomicBitmap {
    words: Vec<std::sync::atomic::AtomicU64>,
    len: u64,
}

impl AtomicBitmap {
    /// `len` clear bits.
    pub fn new(len: u64) -> Self {
        Self {
            words: (0..len.div_ceil(64))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            len,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// No bits at all?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Is bit `i` set?
    pub fn test(&self, i: u64) -> bool {
        use std::sync::atomic::Ordering;
        i < self.len && self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Set bit `i`; returns whether it was already set.
    pub fn test_and_set(&self, i: u64) -> bool {
        use std::sync::atomic::Ordering;
        let m = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(m, Ordering::AcqRel) & m != 0
    }

    /// Clear bit `i`.
    pub fn clear(&self, i: u64) {
        use std::sync::atomic::Ordering;
        self.words[(i / 64) as usize].fetch_and(!(1u64 << (i % 64)), Ordering::AcqRel);
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        use std::sync::atomic::Ordering;
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Set bits `first..first + n` (within the bitmap).
    pub fn set_range(&self, first: u64, n: u64) {
        use std::sync::atomic::Ordering;
        for (wi, m) in range_masks(first, n.min(self.len.saturating_sub(first))) {
            self.words[wi].fetch_or(m, Ordering::AcqRel);
        }
    }

    /// Clear bit `i`; returns whether it was set (exactly one of several
    /// threads racing for a bit gets `true`).
    pub fn test_and_clear(&self, i: u64) -> bool {
        use std::sync::atomic::Ordering;
        if i >= self.len {
            return false;
        }
        let m = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!m, Ordering::AcqRel) & m != 0
    }

    /// The first set bit at or after `from` (a snapshot: another thread
    /// may clear it before the caller acts).
    pub fn next_set(&self, from: u64) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let mut i = from;
        while i < self.len {
            let wi = (i / 64) as usize;
            let w = self.words[wi].load(Ordering::Acquire) & (!0u64 << (i % 64));
            if w != 0 {
                let bit = wi as u64 * 64 + u64::from(w.trailing_zeros());
                return (bit < self.len).then_some(bit);
            }
            i = (wi as u64 + 1) * 64;
        }
        None
    }
}

impl From<&Bitmap> for AtomicBitmap {
    fn from(b: &Bitmap) -> Self {
        Self {
            words: b
                .words
                .iter()
                .map(|&w| std::sync::atomic::AtomicU64::new(w))
                .collect(),
            len: b.len,
        }
    }
}

/// The words holding bits `first..first + n`, each with the mask of those
/// bits in it.
fn range_masks(first: u64, n: u64) -> impl Iterator<Item = (usize, u64)> {
    let end = first.saturating_add(n);
    let mut i = first;
    std::iter::from_fn(move || {
        if i >= end {
            return None;
        }
        let wi = i / 64;
        let lo = i % 64;
        let hi = (end - wi * 64).min(64);
        let mask = if hi - lo == 64 {
            !0
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        i = wi * 64 + hi;
        Some((wi as usize, mask))
    })
}

/// A page bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    /// `len` clear bits.
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// `len` set bits.
    pub fn full(len: u64) -> Self {
        let mut b = Self::new(len);
        b.set_all();
        b
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// No bits at all?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Set every bit.
    pub fn set_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = !0);
        let extra = self.len % 64;
        if extra != 0 {
            if let Some(last) = self.words.last_mut() {
                *last = (1 << extra) - 1;
            }
        }
    }

    /// Set bit `i`.
    pub fn set(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Clear bit `i`; returns whether it was set.
    pub fn test_and_clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1 << (i % 64);
        let was = *w & m != 0;
        *w &= !m;
        was
    }

    /// Is bit `i` set?
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Word `wi` (bits `64 * wi..`), 0 past the end.
    pub fn word(&self, wi: usize) -> u64 {
        self.words.get(wi).copied().unwrap_or(0)
    }

    /// Set bits `first..first + n` (within the bitmap).
    pub fn set_range(&mut self, first: u64, n: u64) {
        for (wi, m) in range_masks(first, n.min(self.len.saturating_sub(first))) {
            self.words[wi] |= m;
        }
    }

    /// Clear bits `first..first + n` (within the bitmap).
    pub fn clear_range(&mut self, first: u64, n: u64) {
        for (wi, m) in range_masks(first, n.min(self.len.saturating_sub(first))) {
            self.words[wi] &= !m;
        }
    }

    /// Are all of bits `first..first + n` set (false if any lies outside)?
    pub fn all_set(&self, first: u64, n: u64) -> bool {
        first.saturating_add(n) <= self.len
            && range_masks(first, n).all(|(wi, m)| self.words[wi] & m == m)
    }

    /// Set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// OR raw 64-bit words (bit n of word k = page 64k+n) into this bitmap.
    pub fn or_words(&mut self, words: &[u64]) {
        for (d, s) in self.words.iter_mut().zip(words) {
            *d |= *s;
        }
        self.set_all_tail_clean();
    }

    fn set_all_tail_clean(&mut self) {
        let extra = self.len % 64;
        if extra != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1 << extra) - 1;
            }
        }
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut w = self.words[wi] & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                let i = wi as u64 * 64 + u64::from(w.trailing_zeros());
                return (i < self.len).then_some(i);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            w = self.words[wi];
        }
    }

    /// Also set the bits set in `other` (same length).
    pub fn or_with(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Keep only the bits also set in `other` (same length).
    pub fn and_with(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= *b;
        }
    }

    /// Clear the bits set in `other` (same length).
    pub fn and_not(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
    }

    /// Ranges `(start, len)` of consecutive set bits.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(s) = self.next_set(i) {
            let mut e = s + 1;
            while e < self.len && self.get(e) {
                e += 1;
            }
            out.push((s, e - s));
            i = e;
        }
        out
    }
}

/// Pages per [`GuestRam::unpopulated`] query, in 64-bit words (4096 pages:
/// 32 KiB of pagemap per read).
const UNPOPULATED_WORDS: usize = 64;

/// Most pages in one ZERO_RUN record (1 GiB): the round's progress (and a
/// cancel) is seen at least that often.
pub const MAX_ZERO_RUN: u64 = 1 << 18;

/// Writes RAM records, tracking the CONTINUE state and counters.
#[derive(Default)]
pub struct RamWriter {
    last_block: Option<usize>,
    /// [`GuestRam::unpopulated`] for the aligned window of pages around the
    /// last one sent: (block, first page, bits).
    unpopulated: Option<(usize, u64, Box<[u64; UNPOPULATED_WORDS]>)>,
    /// Zero pages sent.
    pub zero_pages: u64,
    /// Full pages sent.
    pub normal_pages: u64,
}

impl RamWriter {
    /// A writer at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget the CONTINUE state (at the start of every section).
    pub fn new_section(&mut self) {
        self.last_block = None;
    }

    /// The START section's block list.
    pub fn write_block_list<W: Write>(
        &mut self,
        w: &mut Writer<W>,
        blocks: &[RamBlock],
    ) -> Result<(), StreamError> {
        let total: u64 = blocks.iter().map(|b| b.size).sum();
        w.be64(total | ram_flag::MEM_SIZE)?;
        for b in blocks {
            w.idstr(&b.name)?;
            w.be64(b.size)?;
        }
        Ok(())
    }

    /// The header of the record for `page` of `block` (checked at stream
    /// offset `at`).
    fn head<'a>(
        &self,
        ram: &'a dyn GuestRam,
        block: usize,
        page: u64,
        at: u64,
    ) -> Result<Head<'a>, StreamError> {
        let name = ram.blocks()[block].name.as_bytes();
        let name_len = u8::try_from(name.len()).map_err(|_| {
            StreamError::invalid(
                at,
                format!("RAM block name of {} bytes, at most 255", name.len()),
            )
        })?;
        Ok(Head {
            cont: self.last_block == Some(block),
            name,
            name_len,
            page,
        })
    }

    /// Read one page from `ram` and write it as a ZERO or PAGE record. The
    /// page is read straight into the writer's buffer behind room for the
    /// record header; a zero page then keeps only its ZERO record.
    ///
    /// `fresh`: the page was not sent before in this migration, so it may
    /// never have been populated (then it goes as ZERO unread). A page sent
    /// before and dirty again has been written: asking is wasted work.
    pub fn send_page<W: Sink>(
        &mut self,
        w: &mut Writer<W>,
        ram: &dyn GuestRam,
        block: usize,
        page: u64,
        fresh: bool,
    ) -> Result<Result<(), RamError>, StreamError> {
        let zero = if fresh && self.known_unpopulated(ram, block, page) {
            let head = self.head(ram, block, page, w.offset())?;
            let head_len = head.len();
            w.fill(head_len + 1, |buf| {
                head.write(&mut buf[..head_len], ram_flag::ZERO);
                buf[head_len] = 0;
                (head_len + 1, ())
            })?;
            true
        } else {
            let head = self.head(ram, block, page, w.offset())?;
            let head_len = head.len();
            let r = w.fill(head_len + PAGE_SIZE, |buf| {
                let (hbuf, data) = buf.split_at_mut(head_len);
                if let Err(e) = ram.read_page(block, page, data) {
                    return (0, Err(e));
                }
                if crate::stream::is_zero(data) {
                    head.write(hbuf, ram_flag::ZERO);
                    data[0] = 0;
                    (head_len + 1, Ok(true))
                } else {
                    head.write(hbuf, ram_flag::PAGE);
                    (head_len + PAGE_SIZE, Ok(false))
                }
            })?;
            match r {
                Ok(z) => z,
                Err(e) => return Ok(Err(e)),
            }
        };
        self.last_block = Some(block);
        if zero {
            self.zero_pages += 1;
        } else {
            self.normal_pages += 1;
        }
        Ok(Ok(()))
    }

    /// From `page` on: how many pages in a row of `block` are dirty, never
    /// sent and known never populated, up to [`MAX_ZERO_RUN`] (0: not even
    /// `page`). Word by word: what a run costs grows with the 64-page words
    /// it covers, not with its pages.
    pub fn zero_run(
        &mut self,
        ram: &dyn GuestRam,
        block: usize,
        page: u64,
        dirty: &Bitmap,
        sent: &Bitmap,
    ) -> u64 {
        let len = ram.blocks()[block].pages().min(page + MAX_ZERO_RUN);
        let mut end = page;
        while end < len {
            let Some(unpopulated) = self.unpopulated_word(ram, block, end) else {
                break;
            };
            let wi = (end / 64) as usize;
            let bit = end % 64;
            let run = (dirty.word(wi) & !sent.word(wi) & unpopulated) >> bit;
            let ones = u64::from((!run).trailing_zeros()).min(64 - bit);
            end += ones;
            if ones < 64 - bit {
                break;
            }
        }
        end.min(len) - page
    }

    /// Write a ZERO_RUN record: `n` zero pages of `block` from `page`.
    pub fn send_zero_run<W: Sink>(
        &mut self,
        w: &mut Writer<W>,
        ram: &dyn GuestRam,
        block: usize,
        page: u64,
        n: u64,
    ) -> Result<(), StreamError> {
        let head = self.head(ram, block, page, w.offset())?;
        let head_len = head.len();
        w.fill(head_len + 8, |buf| {
            head.write(&mut buf[..head_len], ram_flag::ZERO_RUN);
            buf[head_len..].copy_from_slice(&n.to_be_bytes());
            (head_len + 8, ())
        })?;
        self.last_block = Some(block);
        self.zero_pages += n;
        Ok(())
    }

    /// Forget what [`GuestRam::unpopulated`] said: pages may have been
    /// written since (each sync of the dirty log, before the pages it found
    /// are sent, calls this).
    pub fn forget_unpopulated(&mut self) {
        self.unpopulated = None;
    }

    /// Whether `page` is known never populated.
    fn known_unpopulated(&mut self, ram: &dyn GuestRam, block: usize, page: u64) -> bool {
        self.unpopulated_word(ram, block, page)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// The unpopulated bits of the 64-page word holding `page` (bit i: page
    /// `page - page % 64 + i`), asking `ram` about the aligned window around
    /// it when it lies outside the current one; `None` if `ram` cannot tell.
    fn unpopulated_word(&mut self, ram: &dyn GuestRam, block: usize, page: u64) -> Option<u64> {
        let span = 64 * UNPOPULATED_WORDS as u64;
        let first = page - page % span;
        let hit = matches!(&self.unpopulated, Some((b, f, _)) if *b == block && *f == first);
        if !hit {
            let mut bits = Box::new([0u64; UNPOPULATED_WORDS]);
            self.unpopulated = ram
                .unpopulated(block, first, &mut bits[..])
                .then_some((block, first, bits));
        }
        let (_, _, bits) = self.unpopulated.as_ref()?;
        Some(bits[((page - first) / 64) as usize])
    }

    /// End the section's records.
    pub fn write_eos<W: Write>(&mut self, w: &mut Writer<W>) -> Result<(), StreamError> {
        w.be64(ram_flag::EOS)
    }
}

/// A RAM record's header: `be64 offset|flags`, with CONTINUE when the
/// block is the previous record's, else followed by the block name.
struct Head<'a> {
    cont: bool,
    name: &'a [u8],
    name_len: u8,
    page: u64,
}

impl Head<'_> {
    /// Bytes of the header.
    fn len(&self) -> usize {
        8 + if self.cont { 0 } else { 1 + self.name.len() }
    }

    /// Write it, with `flag`, into `out` (exactly [`Self::len`] bytes).
    fn write(&self, out: &mut [u8], flag: u64) {
        let mut v = (self.page * PAGE_SIZE as u64) | flag;
        if self.cont {
            v |= ram_flag::CONTINUE;
        }
        out[..8].copy_from_slice(&v.to_be_bytes());
        if !self.cont {
            out[8] = self.name_len;
            out[9..].copy_from_slice(self.name);
        }
    }
}

/// Where received pages go.
pub trait PagePlacer {
    /// A full page arrived.
    fn place_page(&mut self, block: usize, page: u64, data: &[u8]) -> Result<(), RamError>;
    /// A zero page arrived.
    fn place_zero(&mut self, block: usize, page: u64) -> Result<(), RamError>;
    /// `n` zero pages from `first` arrived (a ZERO_RUN record).
    fn place_zero_run(&mut self, block: usize, first: u64, n: u64) -> Result<(), RamError> {
        (first..first + n).try_for_each(|page| self.place_zero(block, page))
    }
}

/// Places pages straight into guest RAM (precopy).
pub struct DirectPlacer<'a>(pub &'a dyn GuestRam);

impl PagePlacer for DirectPlacer<'_> {
    fn place_page(&mut self, block: usize, page: u64, data: &[u8]) -> Result<(), RamError> {
        self.0.write_page(block, page, data)
    }
    fn place_zero(&mut self, block: usize, page: u64) -> Result<(), RamError> {
        self.0.zero_page(block, page)
    }
}

/// Holds one section's pages until its checksum has been verified.
pub struct StagingPlacer {
    data: Vec<u8>,
    /// (block, first page, zero pages: 0 for a full page in `data`).
    entries: Vec<(usize, u64, u64)>,
    limit: usize,
}

impl StagingPlacer {
    /// Room for at most `limit` records per section (a full page, a zero
    /// page or a run of zero pages each).
    pub fn new(limit: usize) -> Self {
        Self {
            data: Vec::new(),
            entries: Vec::new(),
            limit,
        }
    }

    /// Forget staged pages.
    pub fn clear(&mut self) {
        self.data.clear();
        self.entries.clear();
    }

    fn push(
        &mut self,
        block: usize,
        page: u64,
        zeros: u64,
        data: Option<&[u8]>,
    ) -> Result<(), RamError> {
        if self.entries.len() >= self.limit {
            return Err(RamError::Place {
                block,
                page,
                source: format!("more than {} records in one section", self.limit).into(),
            });
        }
        self.entries.push((block, page, zeros));
        if let Some(d) = data {
            self.data.extend_from_slice(d);
        }
        Ok(())
    }

    /// Hand the staged pages to `placer`, in order.
    pub fn commit(&mut self, placer: &mut dyn PagePlacer) -> Result<(), RamError> {
        let mut off = 0;
        for &(block, page, zeros) in &self.entries {
            match zeros {
                0 => {
                    placer.place_page(block, page, &self.data[off..off + PAGE_SIZE])?;
                    off += PAGE_SIZE;
                }
                1 => placer.place_zero(block, page)?,
                n => placer.place_zero_run(block, page, n)?,
            }
        }
        self.clear();
        Ok(())
    }
}

impl PagePlacer for StagingPlacer {
    fn place_page(&mut self, block: usize, page: u64, data: &[u8]) -> Result<(), RamError> {
        self.push(block, page, 0, Some(data))
    }
    fn place_zero(&mut self, block: usize, page: u64) -> Result<(), RamError> {
        self.push(block, page, 1, None)
    }
    fn place_zero_run(&mut self, block: usize, first: u64, n: u64) -> Result<(), RamError> {
        self.push(block, first, n, None)
    }
}

/// Errors reading RAM records.
#[derive(Debug, thiserror::Error)]
pub enum RamRecordError {
    /// The stream itself is bad.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The page could not be stored.
    #[error("at stream offset {offset}")]
    Place {
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: RamError,
    },
}

/// Parses RAM records against the destination's blocks.
pub struct RamReader {
    blocks: Vec<RamBlock>,
    last_block: Option<usize>,
    page: Vec<u8>,
    /// Pages received (PAGE or ZERO).
    pub pages: u64,
    /// Of those, ZERO records.
    pub zero_pages: u64,
}

impl RamReader {
    /// A reader for these blocks.
    pub fn new(blocks: Vec<RamBlock>) -> Self {
        Self {
            blocks,
            last_block: None,
            page: vec![0; PAGE_SIZE],
            pages: 0,
            zero_pages: 0,
        }
    }

    /// Read and check the START section's block list.
    pub fn read_block_list<R: Read>(&mut self, r: &mut Reader<R>) -> Result<(), StreamError> {
        let at = r.offset();
        let v = r.be64("RAM size record")?;
        if v & ram_flag::MASK != ram_flag::MEM_SIZE {
            return Err(StreamError::invalid(
                at,
                format!(
                    "expected RAM MEM_SIZE record, found flags {:#x}",
                    v & ram_flag::MASK
                ),
            ));
        }
        let total = v & !ram_flag::MASK;
        let ours: u64 = self.blocks.iter().map(|b| b.size).sum();
        if total != ours {
            return Err(StreamError::invalid(
                at,
                format!("RAM size mismatch: source has {total} bytes, destination {ours}"),
            ));
        }
        let mut seen = 0;
        let mut names: Vec<String> = Vec::new();
        while seen < total {
            let at = r.offset();
            let name = r.idstr("RAM block name")?;
            let size = r.be64("RAM block size")?;
            if names.contains(&name) {
                return Err(StreamError::invalid(
                    at,
                    format!("RAM block '{name}' listed twice"),
                ));
            }
            names.push(name.clone());
            match self.blocks.iter().find(|b| b.name == name) {
                Some(b) if b.size == size => {}
                Some(b) => {
                    return Err(StreamError::invalid(
                        at,
                        format!(
                            "RAM block '{name}' is {size} bytes at the source, {} here",
                            b.size
                        ),
                    ))
                }
                None => {
                    return Err(StreamError::invalid(
                        at,
                        format!("unknown RAM block '{name}'"),
                    ))
                }
            }
            seen += size;
        }
        if seen != total {
            return Err(StreamError::invalid(
                r.offset(),
                "RAM block sizes do not add up to the total",
            ));
        }
        Ok(())
    }

    /// Start of a section: CONTINUE may not refer back across sections.
    pub fn new_section(&mut self) {
        self.last_block = None;
    }

    /// Read records up to and including EOS, handing pages to `placer`.
    pub fn read_records<R: BufRead>(
        &mut self,
        r: &mut Reader<R>,
        placer: &mut dyn PagePlacer,
    ) -> Result<(), RamRecordError> {
        loop {
            let at = r.offset();
            let v = r.be64("RAM record")?;
            let flags = v & ram_flag::MASK;
            let addr = v & !ram_flag::MASK;
            if flags & ram_flag::EOS != 0 {
                if flags != ram_flag::EOS || addr != 0 {
                    return Err(StreamError::invalid(
                        at,
                        format!("malformed RAM EOS record {v:#x}"),
                    )
                    .into());
                }
                return Ok(());
            }
            let kind = flags & !ram_flag::CONTINUE;
            if kind != ram_flag::PAGE && kind != ram_flag::ZERO && kind != ram_flag::ZERO_RUN {
                return Err(StreamError::invalid(
                    at,
                    format!("unknown RAM record flags {flags:#x}"),
                )
                .into());
            }
            let block = if flags & ram_flag::CONTINUE != 0 {
                self.last_block.ok_or_else(|| {
                    StreamError::invalid(at, "RAM record CONTINUE without a preceding block")
                })?
            } else {
                let name = r.idstr("RAM block name")?;
                let b = self
                    .blocks
                    .iter()
                    .position(|b| b.name == name)
                    .ok_or_else(|| {
                        StreamError::invalid(at, format!("RAM record for unknown block '{name}'"))
                    })?;
                self.last_block = Some(b);
                b
            };
            let page = addr / PAGE_SIZE as u64;
            if !addr.is_multiple_of(PAGE_SIZE as u64) || page >= self.blocks[block].pages() {
                return Err(StreamError::invalid(
                    at,
                    format!(
                        "RAM page offset {addr:#x} outside block '{}' ({} bytes)",
                        self.blocks[block].name, self.blocks[block].size
                    ),
                )
                .into());
            }
            if kind == ram_flag::PAGE {
                r.read_with(PAGE_SIZE, "RAM page data", &mut self.page, |data| {
                    placer.place_page(block, page, data)
                })?
                .map_err(|source| RamRecordError::Place { offset: at, source })?;
            } else if kind == ram_flag::ZERO_RUN {
                let n_at = r.offset();
                let n = r.be64("zero run length")?;
                let pages = self.blocks[block].pages();
                if n == 0 || n > pages - page {
                    return Err(StreamError::invalid(
                        n_at,
                        format!(
                            "zero run of {n} pages from page {page} of block '{}' ({pages} pages)",
                            self.blocks[block].name
                        ),
                    )
                    .into());
                }
                placer
                    .place_zero_run(block, page, n)
                    .map_err(|source| RamRecordError::Place { offset: at, source })?;
                self.zero_pages += n;
                self.pages += n;
                continue;
            } else {
                let fill_at = r.offset();
                let fill = r.u8("zero page fill byte")?;
                if fill != 0 {
                    return Err(StreamError::invalid(
                        fill_at,
                        format!("zero page fill byte is {fill:#x}, must be 0"),
                    )
                    .into());
                }
                placer
                    .place_zero(block, page)
                    .map_err(|source| RamRecordError::Place { offset: at, source })?;
                self.zero_pages += 1;
            }
            self.pages += 1;
        }
    }
}

// ------------------------------------------------- sending RAM sections

/// Section id of RAM.
pub const RAM_SECTION_ID: u32 = 1;
/// Version of the RAM section.
pub const RAM_SECTION_VERSION: u32 = 5;
/// The RAM section's name in its START section.
pub(crate) const RAM_IDSTR: &str = "ram";

/// Most pages in one RAM section the source sends in a precopy round (a
/// receiver that stages sections holds one at a time).
pub const SECTION_PAGES: u64 = 256;
/// Most pages a receiver that stages (postcopy after LISTEN, COLO) accepts
/// in one section.
pub const MAX_SECTION_PAGES: usize = 1024;

/// Start a RAM section of `kind` (PART or END) after START: its header,
/// and the record writer forgets its block (the first record names it).
pub(crate) fn begin_ram_section<W: Sink>(
    w: &mut Writer<W>,
    rw: &mut RamWriter,
    kind: u8,
) -> Result<(), StreamError> {
    w.begin_section();
    w.u8(kind)?;
    w.be32(RAM_SECTION_ID)?;
    rw.new_section();
    Ok(())
}

/// End a RAM section: EOS and the footer.
pub(crate) fn end_ram_section<W: Sink>(
    w: &mut Writer<W>,
    rw: &mut RamWriter,
) -> Result<(), StreamError> {
    rw.write_eos(w)?;
    w.footer(RAM_SECTION_ID)
}

/// One record [`send_dirty`] wrote.
pub(crate) struct Sent {
    /// Stream offset after it.
    pub offset: u64,
    /// Its bytes.
    pub bytes: u64,
    /// Pages it carried.
    pub pages: u64,
}

/// Send every page set in `dirty` (clearing it, and setting it in `sent`)
/// as PART sections of at most [`SECTION_PAGES`] records: pages, and runs
/// of never-populated pages sent for the first time as one ZERO_RUN each.
/// `progress(writer, record)` runs after each record; when it returns
/// `false` the round stops early (the switch to postcopy).
pub(crate) fn send_dirty<W: Sink, E: From<StreamError> + From<RamError>>(
    w: &mut Writer<W>,
    rw: &mut RamWriter,
    ram: &dyn GuestRam,
    dirty: &mut [Bitmap],
    sent: &mut [Bitmap],
    progress: &mut dyn FnMut(&RamWriter, Sent) -> Result<bool, E>,
) -> Result<(), E> {
    // The dirty pages were synced just before: what pagemap said earlier
    // may predate writes among them.
    rw.forget_unpopulated();
    let mut in_section = 0u64;
    'blocks: for (b, bm) in dirty.iter_mut().enumerate() {
        let mut p = 0;
        while let Some(page) = bm.next_set(p) {
            if in_section == 0 {
                begin_ram_section(w, rw, section::PART)?;
            }
            let before = w.offset();
            let fresh = !sent[b].get(page);
            let run = if fresh {
                rw.zero_run(ram, b, page, bm, &sent[b])
            } else {
                0
            };
            let pages = if run > 1 {
                bm.clear_range(page, run);
                sent[b].set_range(page, run);
                rw.send_zero_run(w, ram, b, page, run)?;
                run
            } else {
                bm.test_and_clear(page);
                sent[b].set(page);
                rw.send_page(w, ram, b, page, fresh)??;
                1
            };
            in_section += 1;
            if in_section == SECTION_PAGES {
                end_ram_section(w, rw)?;
                in_section = 0;
            }
            p = page + pages;
            let sent = Sent {
                offset: w.offset(),
                bytes: w.offset() - before,
                pages,
            };
            if !progress(rw, sent)? {
                break 'blocks;
            }
        }
    }
    if in_section > 0 {
        end_ram_section(w, rw)?;
    }
    Ok(())
}

/// Paces writes to a byte rate, read live (0: no limit): a new rate takes
/// effect at the next check.
pub(crate) struct Throttle<'a> {
    rate: &'a std::sync::atomic::AtomicU64,
    window_start: Instant,
    window_bytes: u64,
    unchecked: u64,
}

impl<'a> Throttle<'a> {
    pub(crate) fn new(rate: &'a std::sync::atomic::AtomicU64) -> Self {
        Self {
            rate,
            window_start: Instant::now(),
            window_bytes: 0,
            unchecked: 0,
        }
    }

    /// Count `bytes` written and sleep as long as the rate asks.
    pub(crate) fn account(&mut self, bytes: u64) {
        if let Some(d) = self.owed(bytes) {
            std::thread::sleep(d);
        }
    }

    /// Count `bytes` written; how long the writer should now wait to keep
    /// to the rate (the caller waits, and may cut the wait short for
    /// urgent work: the debt stays and the next call asks for it again).
    pub(crate) fn owed(&mut self, bytes: u64) -> Option<Duration> {
        let rate = self.rate.load(std::sync::atomic::Ordering::Relaxed);
        if rate == 0 {
            self.window_bytes = 0;
            self.window_start = Instant::now();
            return None;
        }
        self.window_bytes += bytes;
        // Read the clock once per millisecond's worth of bytes, not per
        // page: a clock read costs more than copying a zero-page record.
        self.unchecked += bytes;
        if self.unchecked < (rate / 1000).max(PAGE_SIZE as u64) {
            return None;
        }
        self.unchecked = 0;
        let due = Duration::from_secs_f64(self.window_bytes as f64 / rate as f64);
        let spent = self.window_start.elapsed();
        if spent > Duration::from_millis(100) && due <= spent {
            self.window_start = Instant::now();
            self.window_bytes = 0;
        }
        due.checked_sub(spent).filter(|d| !d.is_zero())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Plain-memory RAM for tests: blocks of bytes plus a write log.
    pub struct VecRam {
        pub blocks: Vec<RamBlock>,
        pub data: Vec<Mutex<Vec<u8>>>,
        pub dirty: Mutex<Vec<Bitmap>>,
    }

    impl VecRam {
        pub fn new(sizes: &[u64]) -> Self {
            let blocks: Vec<RamBlock> = sizes
                .iter()
                .enumerate()
                .map(|(i, &s)| RamBlock {
                    name: format!("ram{i}"),
                    size: s,
                })
                .collect();
            let data = sizes
                .iter()
                .map(|&s| Mutex::new(vec![0u8; s as usize]))
                .collect();
            let dirty = Mutex::new(blocks.iter().map(|b| Bitmap::new(b.pages())).collect());
            Self {
                blocks,
                data,
                dirty,
            }
        }

        /// Guest write: change memory and log it.
        pub fn guest_write(&self, block: usize, page: u64, byte: u8) {
            let mut d = self.data[block].lock().unwrap();
            let o = page as usize * PAGE_SIZE;
            d[o..o + PAGE_SIZE].fill(byte);
            self.dirty.lock().unwrap()[block].set(page);
        }
    }

    impl GuestRam for VecRam {
        fn blocks(&self) -> &[RamBlock] {
            &self.blocks
        }
        fn read_page(&self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), RamError> {
            let d = self.data[block].lock().unwrap();
            let o = page as usize * PAGE_SIZE;
            buf.copy_from_slice(
                d.get(o..o + PAGE_SIZE)
                    .ok_or(RamError::OutOfRange { block, page })?,
            );
            Ok(())
        }
        fn write_page(&self, block: usize, page: u64, data: &[u8]) -> Result<(), RamError> {
            let mut d = self.data[block].lock().unwrap();
            let o = page as usize * PAGE_SIZE;
            d.get_mut(o..o + PAGE_SIZE)
                .ok_or(RamError::OutOfRange { block, page })?
                .copy_from_slice(data);
            Ok(())
        }
        fn zero_page(&self, block: usize, page: u64) -> Result<(), RamError> {
            self.write_page(block, page, &[0u8; PAGE_SIZE])
        }
        fn start_dirty_log(&self) -> Result<(), RamError> {
            Ok(())
        }
        fn sync_dirty_log(&self, bitmaps: &mut [Bitmap]) -> Result<(), RamError> {
            let mut d = self.dirty.lock().unwrap();
            for (out, log) in bitmaps.iter_mut().zip(d.iter_mut()) {
                for p in 0..log.len() {
                    if log.test_and_clear(p) {
                        out.set(p);
                    }
                }
            }
            Ok(())
        }
        fn stop_dirty_log(&self) -> Result<(), RamError> {
            Ok(())
        }
    }

    #[test]
    fn atomic_bitmap_clear_once_and_scan() {
        let mut b = Bitmap::new(200);
        for i in [3, 64, 130, 199] {
            b.set(i);
        }
        let a = AtomicBitmap::from(&b);
        assert_eq!(a.count(), 4);
        assert_eq!(a.next_set(0), Some(3));
        assert_eq!(a.next_set(4), Some(64));
        assert_eq!(a.next_set(131), Some(199));
        assert!(a.test_and_clear(64));
        assert!(!a.test_and_clear(64), "a bit is taken once");
        assert!(!a.test_and_clear(500), "out of range");
        assert_eq!(a.next_set(4), Some(130));
        // Two threads race for every bit: each is won exactly once.
        let full = AtomicBitmap::from(&Bitmap::full(4096));
        let won = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for i in 0..4096 {
                        if full.test_and_clear(i) {
                            won.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(won.into_inner(), 4096);
        assert_eq!(full.next_set(0), None);
    }

    #[test]
    fn bitmap_ops() {
        let mut b = Bitmap::new(130);
        assert_eq!(b.next_set(0), None);
        b.set(3);
        b.set(4);
        b.set(129);
        assert_eq!(b.count(), 3);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(5), Some(129));
        assert_eq!(b.ranges(), vec![(3, 2), (129, 1)]);
        assert!(b.test_and_clear(3));
        assert!(!b.test_and_clear(3));
        let f = Bitmap::full(130);
        assert_eq!(f.count(), 130);
        b.or_words(&[!0, !0, !0]);
        assert_eq!(b.count(), 130);
        let mut odd = Bitmap::new(130);
        (0..130).filter(|i| i % 2 == 1).for_each(|i| odd.set(i));
        b.and_not(&odd);
        assert_eq!(b.count(), 65);
        assert!(b.get(128) && !b.get(129));

        let mut r = Bitmap::new(300);
        r.set_range(5, 200);
        assert_eq!(r.ranges(), vec![(5, 200)]);
        assert!(r.all_set(5, 200) && !r.all_set(4, 2) && !r.all_set(200, 6));
        r.clear_range(64, 64);
        assert_eq!(r.ranges(), vec![(5, 59), (128, 77)]);
        r.set_range(290, 100); // clipped at the end
        assert_eq!(r.count(), 59 + 77 + 10);
        assert!(!r.all_set(295, 10), "past the end");
        let a = AtomicBitmap::new(300);
        a.set_range(63, 3);
        assert_eq!((a.count(), a.next_set(0)), (3, Some(63)));
    }

    #[test]
    fn untouched_memory_goes_as_few_zero_runs() {
        let pages = 10_000u64;
        let src = Sparse {
            inner: VecRam::new(&[pages * PAGE_SIZE as u64, 64 * PAGE_SIZE as u64]),
            reads: Mutex::new(Vec::new()),
            stride: 1,
        };
        for p in [0, 1, 700, 9_999] {
            src.inner.guest_write(0, p, 0x5a);
        }
        let mut dirty: Vec<Bitmap> = src
            .blocks()
            .iter()
            .map(|b| Bitmap::full(b.pages()))
            .collect();
        let mut sent: Vec<Bitmap> = src
            .blocks()
            .iter()
            .map(|b| Bitmap::new(b.pages()))
            .collect();
        // Page 5 was sent before and is dirty again: it is read, not assumed.
        sent[0].set(5);
        let mut w = Writer::new(Vec::new());
        let mut rw = RamWriter::new();
        rw.write_block_list(&mut w, &src.inner.blocks).unwrap();
        rw.write_eos(&mut w).unwrap();
        let (mut records, mut pages_seen) = (0, 0);
        send_dirty(&mut w, &mut rw, &src, &mut dirty, &mut sent, &mut |_, s| {
            records += 1;
            pages_seen += s.pages;
            Ok::<_, crate::MigrationError>(true)
        })
        .unwrap();
        assert_eq!(pages_seen, pages + 64);
        // Written pages 0, 1, 700, 9999, page 5 (sent before), and runs
        // between them: [2, 5), [6, 700), [701, 9999), block 1 whole.
        assert_eq!(records, 9);
        assert_eq!(src.reads.lock().unwrap().clone(), vec![0, 1, 5, 700, 9_999]);
        assert_eq!((rw.zero_pages, rw.normal_pages), (pages + 64 - 4, 4));
        assert!(dirty.iter().all(|d| d.count() == 0));
        assert!(sent.iter().all(|s| s.count() == s.len()));

        // The destination's RAM starts dirty: the runs must clear it.
        let dst = VecRam::new(&[pages * PAGE_SIZE as u64, 64 * PAGE_SIZE as u64]);
        dst.guest_write(0, 3, 0x11);
        dst.guest_write(0, 5_000, 0x11);
        dst.guest_write(1, 63, 0x11);
        let bytes = w.get_mut().clone();
        let mut r = Reader::new(&bytes[..]);
        let mut rr = RamReader::new(dst.blocks.clone());
        rr.read_block_list(&mut r).unwrap();
        rr.read_records(&mut r, &mut DirectPlacer(&dst)).unwrap(); // EOS
        while let Ok(kind) = r.u8("section") {
            assert_eq!(kind, section::PART);
            assert_eq!(r.be32("id").unwrap(), RAM_SECTION_ID);
            rr.new_section();
            let mut staging = StagingPlacer::new(MAX_SECTION_PAGES);
            rr.read_records(&mut r, &mut staging).unwrap();
            staging.commit(&mut DirectPlacer(&dst)).unwrap();
            assert_eq!(r.u8("footer").unwrap(), section::FOOTER);
            r.be32("id").unwrap();
            r.be32("crc").unwrap();
        }
        assert_eq!(rr.pages, pages + 64);
        for b in 0..2 {
            assert!(
                *src.inner.data[b].lock().unwrap() == *dst.data[b].lock().unwrap(),
                "block {b} differs"
            );
        }
    }

    #[test]
    fn zero_runs_outside_their_block_are_refused() {
        let dst = VecRam::new(&[8 * PAGE_SIZE as u64]);
        for (first, n, want) in [
            (0, 0, "zero run of 0 pages"),
            (
                2,
                7,
                "zero run of 7 pages from page 2 of block 'ram0' (8 pages)",
            ),
            (0, u64::MAX, "zero run of 18446744073709551615 pages"),
        ] {
            let mut w = Writer::new(Vec::new());
            w.be64((first * PAGE_SIZE as u64) | ram_flag::ZERO_RUN)
                .unwrap();
            w.idstr("ram0").unwrap();
            w.be64(n).unwrap();
            let bytes = w.get_mut().clone();
            let mut rr = RamReader::new(dst.blocks.clone());
            let e = rr
                .read_records(&mut Reader::new(&bytes[..]), &mut DirectPlacer(&dst))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("offset 13"), "{e}");
        }
    }

    /// RAM that reports its all-zero pages whose number is a multiple of
    /// `stride` as never populated and logs every page read.
    struct Sparse {
        inner: VecRam,
        reads: Mutex<Vec<u64>>,
        stride: u64,
    }

    impl GuestRam for Sparse {
        fn blocks(&self) -> &[RamBlock] {
            self.inner.blocks()
        }
        fn read_page(&self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), RamError> {
            self.reads.lock().unwrap().push(page);
            self.inner.read_page(block, page, buf)
        }
        fn write_page(&self, block: usize, page: u64, data: &[u8]) -> Result<(), RamError> {
            self.inner.write_page(block, page, data)
        }
        fn zero_page(&self, block: usize, page: u64) -> Result<(), RamError> {
            self.inner.zero_page(block, page)
        }
        fn start_dirty_log(&self) -> Result<(), RamError> {
            Ok(())
        }
        fn sync_dirty_log(&self, bitmaps: &mut [Bitmap]) -> Result<(), RamError> {
            self.inner.sync_dirty_log(bitmaps)
        }
        fn stop_dirty_log(&self) -> Result<(), RamError> {
            Ok(())
        }
        fn unpopulated(&self, block: usize, first: u64, out: &mut [u64]) -> bool {
            let d = self.inner.data[block].lock().unwrap();
            out.fill(0);
            for i in 0..64 * out.len() as u64 {
                let p = first + i;
                let o = p as usize * PAGE_SIZE;
                if p.is_multiple_of(self.stride)
                    && d.get(o..o + PAGE_SIZE)
                        .is_some_and(|x| x.iter().all(|&b| b == 0))
                {
                    out[(i / 64) as usize] |= 1 << (i % 64);
                }
            }
            true
        }
    }

    #[test]
    fn unpopulated_pages_are_sent_as_zero_without_reading_them() {
        let pages = 1200u64;
        let src = Sparse {
            inner: VecRam::new(&[pages * PAGE_SIZE as u64]),
            reads: Mutex::new(Vec::new()),
            stride: 2,
        };
        for p in [2, 3, 600, 1101] {
            src.inner.guest_write(0, p, p as u8 | 1);
        }
        let mut w = Writer::new(Vec::new());
        let mut rw = RamWriter::new();
        rw.write_block_list(&mut w, &src.inner.blocks).unwrap();
        for p in 0..pages {
            rw.send_page(&mut w, &src, 0, p, true).unwrap().unwrap();
        }
        rw.write_eos(&mut w).unwrap();
        assert_eq!((rw.zero_pages, rw.normal_pages), (pages - 4, 4));
        // Odd pages and the populated even ones (2, 600) were read; no other.
        let reads = src.reads.lock().unwrap().clone();
        let want: Vec<u64> = (0..pages)
            .filter(|p| p % 2 == 1 || [2, 600].contains(p))
            .collect();
        assert_eq!(reads, want);

        let dst = VecRam::new(&[pages * PAGE_SIZE as u64]);
        let mut rr = RamReader::new(dst.blocks.clone());
        let bytes = w.get_mut().clone();
        let mut r = Reader::new(&bytes[..]);
        rr.read_block_list(&mut r).unwrap();
        rr.read_records(&mut r, &mut DirectPlacer(&dst)).unwrap();
        assert_eq!(
            *src.inner.data[0].lock().unwrap(),
            *dst.data[0].lock().unwrap()
        );
    }

    #[test]
    fn records_round_trip_and_reject_bad_offsets() {
        let src = VecRam::new(&[8 * PAGE_SIZE as u64, 4 * PAGE_SIZE as u64]);
        src.guest_write(0, 1, 0xaa);
        src.guest_write(1, 3, 0x55);
        let mut w = Writer::new(Vec::new());
        let mut rw = RamWriter::new();
        rw.write_block_list(&mut w, &src.blocks).unwrap();
        for (b, p) in [(0, 0), (0, 1), (1, 3), (1, 2)] {
            rw.send_page(&mut w, &src, b, p, true).unwrap().unwrap();
        }
        rw.write_eos(&mut w).unwrap();
        assert_eq!((rw.zero_pages, rw.normal_pages), (2, 2));
        let bytes = w.get_mut().clone();

        let dst = VecRam::new(&[8 * PAGE_SIZE as u64, 4 * PAGE_SIZE as u64]);
        dst.guest_write(1, 2, 0x11); // stale data that a ZERO record must clear
        let mut rr = RamReader::new(dst.blocks.clone());
        let mut r = Reader::new(&bytes[..]);
        rr.read_block_list(&mut r).unwrap();
        rr.read_records(&mut r, &mut DirectPlacer(&dst)).unwrap();
        for b in 0..2 {
            assert_eq!(*src.data[b].lock().unwrap(), *dst.data[b].lock().unwrap());
        }

        // Wrong sizes are refused.
        let other = VecRam::new(&[16 * PAGE_SIZE as u64]);
        let mut rr = RamReader::new(other.blocks.clone());
        let e = rr
            .read_block_list(&mut Reader::new(&bytes[..]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("RAM size mismatch"), "{e}");

        // A page beyond the block is refused with its offset.
        let mut w = Writer::new(Vec::new());
        w.be64((100 * PAGE_SIZE as u64) | ram_flag::ZERO).unwrap();
        w.idstr("ram1").unwrap();
        w.u8(0).unwrap();
        let bytes = w.get_mut().clone();
        let mut rr = RamReader::new(dst.blocks.clone());
        let e = rr
            .read_records(&mut Reader::new(&bytes[..]), &mut DirectPlacer(&dst))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("outside block 'ram1'") && e.contains("offset 0"),
            "{e}"
        );
        // CONTINUE with no block.
        let mut w = Writer::new(Vec::new());
        w.be64(ram_flag::PAGE | ram_flag::CONTINUE).unwrap();
        let bytes = w.get_mut().clone();
        rr.new_section();
        let e = rr
            .read_records(&mut Reader::new(&bytes[..]), &mut DirectPlacer(&dst))
            .unwrap_err()
            .to_string();
        assert!(e.contains("CONTINUE"), "{e}");
    }
}

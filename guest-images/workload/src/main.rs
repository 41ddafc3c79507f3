//! guest-workload: the minivmm guest's `/init` (PID 1).
//!
//! A static, libc-free x86_64 Linux program that keeps a memory buffer in a
//! known, self-checking state, so that a VMM that migrates, snapshots or
//! checkpoints the guest can be checked from inside the guest (`CORRUPT`
//! lines) and from outside (guest memory dumps hold pages with the pattern
//! below).
//!
//! # Settings
//! Read from `/proc/cmdline` (kernel parameters with a dot are not passed to
//! init), then from argv (`workload.mem=4` or `mem=4`), later wins:
//! - `workload.mem=MiB`    buffer size, default 16
//! - `workload.rate=MiB/s` write rate, default 0 = unlimited
//! - `workload.every=MS`   0 (default): print every `PASS` line; N > 0: print
//!   a `PASS` line only if at least N ms passed since the last printed one
//! - `workload.passes=N`   0 (default) = forever; else reboot after N passes
//! - `workload.detout=1`   deterministic output: `PASS k` lines carry no
//!   uptime, so two copies of the guest running from the same state print
//!   the same bytes (COLO's output comparison); 0 (default) = with uptime
//!
//! # Output (serial console)
//! - `GUEST-READY cpus=N mem=MiB ms=UPTIME` once the buffer is mapped
//! - `PASS k ms=UPTIME` after full pass k (k = 1, 2, ...); `PASS k` with
//!   `workload.detout=1`
//! - `CORRUPT page=I got=G want=K-1` for each bad page found in pass K
//!   (at most 16 per pass), then `CORRUPT pages=COUNT pass=K`
//! - `STATUS pass=K ms=UPTIME` in answer to `status` on stdin
//! - `DONE passes=N ms=UPTIME` before the reboot that `workload.passes` asks for
//!
//! UPTIME is CLOCK_MONOTONIC in ms, i.e. time since guest boot.
//!
//! # Page pattern (the VMM tests scan guest memory dumps for it)
//! Each 4 KiB page `i` of the buffer (i = 0, 1, ...), after pass `k`, holds
//! 512 little-endian u64 words:
//! - word 0: [`PAGE_MAGIC`] = 0x4d56_4d4d_574c_4b44 (bytes "DKLWMMVM")
//! - word 1: `i`
//! - word 2: `k` (pass 0 is the initial fill)
//! - word 3: [`checksum`] of words 4..512
//! - word w, 4 <= w < 512: [`splitmix64`]`((i << 32) ^ (k << 12) ^ w)`
//!
//! See [`page_word`] and [`checksum`]. A pass k verifies that every page
//! holds exactly the pattern for (i, k-1), all 512 words, then writes the
//! pattern for (i, k).
//!
//! # Stdin commands (one per line)
//! `reboot` reboots (LINUX_REBOOT_CMD_RESTART), `status` prints `STATUS`,
//! `detout` and `timed` switch deterministic output on and off (as
//! `workload.detout`; answered with `OUTPUT deterministic` / `OUTPUT timed`).
//! Anything else is ignored.
//!
//! Every system call is expensive on kvm_pvm (the guest kernel is emulated),
//! so the page loops make none: time is read at most once per chunk.

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

// ---------------------------------------------------------------------------
// Page pattern
// ---------------------------------------------------------------------------

/// Word 0 of every workload page. Little-endian bytes: "DKLWMMVM".
pub const PAGE_MAGIC: u64 = 0x4d56_4d4d_574c_4b44;
/// Page size used by the pattern (bytes).
pub const PAGE_SIZE: usize = 4096;
/// u64 words per page.
pub const PAGE_WORDS: usize = PAGE_SIZE / 8;
/// First data word; words 0..4 are the header (magic, index, pass, checksum).
pub const DATA_START: usize = 4;

/// splitmix64 finaliser (Steele, Lea, Flood), a cheap 64-bit mixer.
#[inline(always)]
pub const fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Seed of page `i`, pass `k`: data word w is `splitmix64(page_seed(i, k) ^ w)`.
#[inline(always)]
pub const fn page_seed(i: u64, k: u64) -> u64 {
    (i << 32) ^ (k << 12)
}

/// Data word `w` (4 <= w < 512) of page `i` after pass `k`.
#[inline(always)]
pub const fn page_word(i: u64, k: u64, w: u64) -> u64 {
    splitmix64(page_seed(i, k) ^ w)
}

/// Checksum start value (FNV-1a 64 offset basis).
pub const CHECKSUM_INIT: u64 = 0xcbf2_9ce4_8422_2325;
/// Checksum multiplier (FNV-1a 64 prime).
pub const CHECKSUM_PRIME: u64 = 0x0000_0100_0000_01b3;

/// One checksum step: FNV-1a over whole 64-bit words.
#[inline(always)]
pub const fn checksum_step(c: u64, word: u64) -> u64 {
    (c ^ word).wrapping_mul(CHECKSUM_PRIME)
}

/// Word 3: `checksum_step` folded over words 4..512 in order, from
/// `CHECKSUM_INIT`.
pub fn checksum(data: &[u64]) -> u64 {
    data.iter().fold(CHECKSUM_INIT, |c, &w| checksum_step(c, w))
}

/// What was wrong with a page (for the `CORRUPT` line).
#[derive(Clone, Copy)]
enum Bad {
    /// Header magic wrong: word 0 as found.
    Magic(u64),
    /// Magic right, index wrong: (index found, pass found).
    Index(u64, u64),
    /// Magic and index right, pass wrong: pass found.
    Pass(u64),
    /// Header right but word `w` (3 = checksum, 4.. = data) wrong.
    Word(u64, usize),
}

/// Verify that `page` holds the pattern for (`i`, `old`) (unless `old` is
/// None: initial fill), then fill it with the pattern for (`i`, `new`).
#[inline(always)]
fn verify_and_write(page: &mut [u64; PAGE_WORDS], i: u64, old: Option<u64>, new: u64) -> Option<Bad> {
    let new_seed = page_seed(i, new);
    let mut new_sum = CHECKSUM_INIT;
    let mut bad = None;
    match old {
        None => {
            for (w, slot) in page.iter_mut().enumerate().skip(DATA_START) {
                let v = splitmix64(new_seed ^ w as u64);
                *slot = v;
                new_sum = checksum_step(new_sum, v);
            }
        }
        Some(old) => {
            let old_seed = page_seed(i, old);
            let mut old_sum = CHECKSUM_INIT;
            let mut first_bad = 0usize;
            for (w, slot) in page.iter_mut().enumerate().skip(DATA_START) {
                let want = splitmix64(old_seed ^ w as u64);
                old_sum = checksum_step(old_sum, want);
                if *slot != want && first_bad == 0 {
                    first_bad = w;
                }
                let v = splitmix64(new_seed ^ w as u64);
                *slot = v;
                new_sum = checksum_step(new_sum, v);
            }
            if page[3] != old_sum && first_bad == 0 {
                first_bad = 3;
            }
            bad = if page[0] != PAGE_MAGIC {
                Some(Bad::Magic(page[0]))
            } else if page[1] != i {
                Some(Bad::Index(page[1], page[2]))
            } else if page[2] != old {
                Some(Bad::Pass(page[2]))
            } else if first_bad != 0 {
                Some(Bad::Word(page[2], first_bad))
            } else {
                None
            };
        }
    }
    page[0] = PAGE_MAGIC;
    page[1] = i;
    page[2] = new;
    page[3] = new_sum;
    bad
}

// ---------------------------------------------------------------------------
// Raw Linux system calls
// ---------------------------------------------------------------------------

mod sys {
    use core::arch::asm;

    pub const READ: usize = 0;
    pub const WRITE: usize = 1;
    pub const CLOSE: usize = 3;
    pub const MMAP: usize = 9;
    pub const SCHED_GETAFFINITY: usize = 204;
    pub const EXIT: usize = 60;
    pub const MOUNT: usize = 165;
    pub const REBOOT: usize = 169;
    pub const CLOCK_GETTIME: usize = 228;
    pub const OPENAT: usize = 257;
    pub const PPOLL: usize = 271;

    pub const AT_FDCWD: isize = -100;
    pub const O_RDONLY: usize = 0;
    pub const O_CLOEXEC: usize = 0o2000000;
    pub const PROT_READ: usize = 1;
    pub const PROT_WRITE: usize = 2;
    pub const MAP_PRIVATE: usize = 2;
    pub const MAP_ANONYMOUS: usize = 0x20;
    pub const CLOCK_MONOTONIC: usize = 1;
    pub const POLLIN: i16 = 1;
    pub const LINUX_REBOOT_MAGIC1: usize = 0xfee1_dead;
    pub const LINUX_REBOOT_MAGIC2: usize = 672_274_793; // 0x28121969
    pub const LINUX_REBOOT_CMD_RESTART: usize = 0x0123_4567;

    #[repr(C)]
    pub struct Timespec {
        pub sec: i64,
        pub nsec: i64,
    }

    #[repr(C)]
    pub struct PollFd {
        pub fd: i32,
        pub events: i16,
        pub revents: i16,
    }

    /// # Safety
    /// The caller passes arguments valid for system call `n`.
    #[inline(always)]
    pub unsafe fn syscall6(n: usize, a1: usize, a2: usize, a3: usize, a4: usize, a5: usize, a6: usize) -> isize {
        let ret: isize;
        // SAFETY: the caller guarantees the arguments; `syscall` clobbers
        // rcx and r11 only.
        unsafe {
            asm!("syscall",
                 inlateout("rax") n as isize => ret,
                 in("rdi") a1, in("rsi") a2, in("rdx") a3,
                 in("r10") a4, in("r8") a5, in("r9") a6,
                 lateout("rcx") _, lateout("r11") _,
                 options(nostack));
        }
        ret
    }

    pub fn write(fd: usize, buf: &[u8]) -> isize {
        // SAFETY: buf is valid for reads of buf.len() bytes.
        unsafe { syscall6(WRITE, fd, buf.as_ptr() as usize, buf.len(), 0, 0, 0) }
    }

    pub fn read(fd: usize, buf: &mut [u8]) -> isize {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        unsafe { syscall6(READ, fd, buf.as_mut_ptr() as usize, buf.len(), 0, 0, 0) }
    }

    /// `path` must end with a NUL byte.
    pub fn open_read(path: &[u8]) -> isize {
        debug_assert!(path.last() == Some(&0));
        // SAFETY: path is NUL-terminated.
        unsafe { syscall6(OPENAT, AT_FDCWD as usize, path.as_ptr() as usize, O_RDONLY | O_CLOEXEC, 0, 0, 0) }
    }

    pub fn close(fd: usize) {
        // SAFETY: closing a descriptor we own.
        unsafe { syscall6(CLOSE, fd, 0, 0, 0, 0, 0) };
    }

    /// All strings NUL-terminated.
    pub fn mount(src: &[u8], target: &[u8], fstype: &[u8]) -> isize {
        // SAFETY: NUL-terminated strings, no data.
        unsafe { syscall6(MOUNT, src.as_ptr() as usize, target.as_ptr() as usize, fstype.as_ptr() as usize, 0, 0, 0) }
    }

    pub fn mmap_anon(len: usize) -> isize {
        // SAFETY: a fresh anonymous mapping touches no existing memory.
        unsafe {
            syscall6(MMAP, 0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, usize::MAX, 0)
        }
    }

    /// Number of CPUs this task may run on.
    pub fn cpu_count() -> u32 {
        let mut mask = [0u64; 16];
        // SAFETY: mask is 128 writable bytes.
        let n = unsafe { syscall6(SCHED_GETAFFINITY, 0, 128, mask.as_mut_ptr() as usize, 0, 0, 0) };
        if n <= 0 {
            return 0;
        }
        let words = (n as usize).div_ceil(8).min(16);
        mask[..words].iter().map(|w| w.count_ones()).sum()
    }

    /// CLOCK_MONOTONIC in nanoseconds.
    pub fn now_ns() -> u64 {
        let mut ts = Timespec { sec: 0, nsec: 0 };
        // SAFETY: ts is a writable timespec.
        unsafe { syscall6(CLOCK_GETTIME, CLOCK_MONOTONIC, &mut ts as *mut Timespec as usize, 0, 0, 0, 0) };
        ts.sec as u64 * 1_000_000_000 + ts.nsec as u64
    }

    /// ppoll on `fds` (may be empty) for at most `timeout_ns`.
    pub fn ppoll(fds: &mut [PollFd], timeout_ns: u64) -> isize {
        let ts = Timespec {
            sec: (timeout_ns / 1_000_000_000) as i64,
            nsec: (timeout_ns % 1_000_000_000) as i64,
        };
        // SAFETY: fds and ts are valid; no signal mask.
        unsafe {
            syscall6(PPOLL, fds.as_mut_ptr() as usize, fds.len(), &ts as *const Timespec as usize, 0, 8, 0)
        }
    }

    pub fn reboot_restart() -> isize {
        // SAFETY: reboot takes no pointers for CMD_RESTART.
        unsafe { syscall6(REBOOT, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART, 0, 0, 0) }
    }

    pub fn exit(code: usize) -> ! {
        loop {
            // SAFETY: exit does not return.
            unsafe { syscall6(EXIT, code, 0, 0, 0, 0, 0) };
        }
    }
}

// ---------------------------------------------------------------------------
// Output: one write(2) per line, no core::fmt (keeps the binary tiny)
// ---------------------------------------------------------------------------

struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line { buf: [0; 160], len: 0 }
    }

    fn s(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            if self.len < self.buf.len() - 1 {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    fn u(&mut self, mut v: u64) -> &mut Self {
        let mut tmp = [0u8; 20];
        let mut n = 0;
        loop {
            tmp[19 - n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        let start = 20 - n;
        self.s_copy(&tmp, start)
    }

    fn x(&mut self, mut v: u64) -> &mut Self {
        let mut tmp = [0u8; 18];
        let mut n = 0;
        loop {
            tmp[17 - n] = b"0123456789abcdef"[(v & 15) as usize];
            n += 1;
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.s(b"0x");
        let start = 18 - n;
        self.s_copy(&tmp, start)
    }

    fn s_copy(&mut self, tmp: &[u8], start: usize) -> &mut Self {
        let mut i = start;
        while i < tmp.len() {
            let b = tmp[i];
            self.s(&[b]);
            i += 1;
        }
        self
    }

    fn print(&mut self) {
        self.buf[self.len] = b'\n';
        sys::write(1, &self.buf[..self.len + 1]);
        self.len = 0;
    }
}

fn ms_now() -> u64 {
    sys::now_ns() / 1_000_000
}

// ---------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------

struct Config {
    mem_mib: u64,
    rate_mib: u64,
    every_ms: u64,
    passes: u64,
    detout: bool,
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((b - b'0') as u64)?;
    }
    Some(v)
}

impl Config {
    /// Apply one `key=value` token; `key` with or without `workload.`.
    fn apply(&mut self, tok: &[u8]) {
        let tok = tok.strip_prefix(b"workload.").unwrap_or(tok);
        let Some(eq) = tok.iter().position(|&b| b == b'=') else { return };
        let (key, val) = (&tok[..eq], &tok[eq + 1..]);
        let Some(v) = parse_u64(val) else { return };
        match key {
            b"mem" => self.mem_mib = v,
            b"rate" => self.rate_mib = v,
            b"every" => self.every_ms = v,
            b"passes" => self.passes = v,
            b"detout" => self.detout = v != 0,
            _ => {}
        }
    }

    /// Apply every `workload.*` token of a space-separated string.
    fn apply_cmdline(&mut self, s: &[u8]) {
        for tok in s.split(|&b| b == b' ' || b == b'\n' || b == b'\t') {
            if tok.starts_with(b"workload.") {
                self.apply(tok);
            }
        }
    }
}

fn read_cmdline(cfg: &mut Config) {
    let fd = sys::open_read(b"/proc/cmdline\0");
    if fd < 0 {
        return;
    }
    let mut buf = [0u8; 2048];
    let mut len = 0;
    while len < buf.len() {
        let n = sys::read(fd as usize, &mut buf[len..]);
        if n <= 0 {
            break;
        }
        len += n as usize;
    }
    sys::close(fd as usize);
    cfg.apply_cmdline(&buf[..len]);
}

// ---------------------------------------------------------------------------
// Console input
// ---------------------------------------------------------------------------

enum Cmd {
    None,
    Reboot,
    Status,
    /// Deterministic output on (`detout`) or off (`timed`).
    Detout(bool),
}

struct Input {
    buf: [u8; 128],
    len: usize,
    /// false once stdin reported hangup/error/EOF: stop polling it.
    open: bool,
    /// a line was longer than the buffer: drop until the next newline
    overflow: bool,
}

impl Input {
    /// Wait up to `timeout_ns` for input (0: just look), read what is there
    /// and return the first command in it.
    fn poll(&mut self, timeout_ns: u64) -> Cmd {
        let mut fds = [sys::PollFd { fd: 0, events: sys::POLLIN, revents: 0 }];
        let nfds = if self.open { 1 } else { 0 };
        let r = sys::ppoll(&mut fds[..nfds], timeout_ns);
        if r <= 0 || nfds == 0 {
            return Cmd::None;
        }
        if fds[0].revents & sys::POLLIN == 0 {
            // POLLHUP / POLLERR / POLLNVAL without data
            self.open = false;
            return Cmd::None;
        }
        let mut chunk = [0u8; 128];
        let n = sys::read(0, &mut chunk);
        if n <= 0 {
            self.open = false;
            return Cmd::None;
        }
        let mut cmd = Cmd::None;
        for &b in &chunk[..n as usize] {
            if b == b'\n' || b == b'\r' {
                if !self.overflow {
                    let c = Self::parse(&self.buf[..self.len]);
                    // first command wins, except that reboot beats status
                    if matches!(cmd, Cmd::None) || matches!(c, Cmd::Reboot) {
                        cmd = c;
                    }
                }
                self.len = 0;
                self.overflow = false;
            } else if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            } else {
                self.overflow = true;
            }
        }
        cmd
    }

    fn parse(line: &[u8]) -> Cmd {
        let mut s = line;
        while let [b' ' | b'\t', rest @ ..] = s {
            s = rest;
        }
        while let [rest @ .., b' ' | b'\t'] = s {
            s = rest;
        }
        match s {
            b"reboot" => Cmd::Reboot,
            b"status" => Cmd::Status,
            b"detout" => Cmd::Detout(true),
            b"timed" => Cmd::Detout(false),
            _ => Cmd::None,
        }
    }
}

// ---------------------------------------------------------------------------
// Main loop
// ---------------------------------------------------------------------------

/// Largest number of `CORRUPT page=` lines printed per pass.
const MAX_CORRUPT_LINES: u64 = 16;
/// Rate-limited mode: length of one work slice (pages, then a sleep).
const SLICE_NS: u64 = 20_000_000;
/// Rate-limited mode: smallest chunk of work between two sleeps.
const MIN_CHUNK_PAGES: usize = 16; // 64 KiB
/// Rate-limited mode: if this far behind schedule, stop catching up.
const MAX_LAG_NS: u64 = 200_000_000;

fn reboot(line: &mut Line) -> ! {
    sys::reboot_restart();
    // not PID 1 / not allowed: just end
    line.s(b"WORKLOAD-ERROR reboot failed").print();
    sys::exit(1)
}

fn handle(cmd: Cmd, line: &mut Line, pass: u64, detout: &mut bool) {
    match cmd {
        Cmd::None => {}
        Cmd::Reboot => reboot(line),
        Cmd::Status => {
            line.s(b"STATUS pass=").u(pass).s(b" ms=").u(ms_now()).print();
        }
        Cmd::Detout(on) => {
            *detout = on;
            if on {
                line.s(b"OUTPUT deterministic").print();
            } else {
                line.s(b"OUTPUT timed").print();
            }
        }
    }
}

fn report(line: &mut Line, i: u64, want: u64, bad: Bad) {
    line.s(b"CORRUPT page=").u(i).s(b" got=");
    match bad {
        Bad::Magic(w0) => line.x(w0),
        Bad::Index(j, k) => line.s(b"page:").u(j).s(b",pass:").u(k),
        Bad::Pass(k) => line.u(k),
        Bad::Word(k, w) => line.u(k).s(b",badword:").u(w as u64),
    };
    line.s(b" want=").u(want).print();
}

/// Process pages `from..to` of pass `k` (k == 0: initial fill).
/// Returns the number of bad pages.
#[inline(never)]
fn run_pages(buf: *mut [u64; PAGE_WORDS], from: usize, to: usize, k: u64, bad_so_far: u64, line: &mut Line) -> u64 {
    let mut bad = 0;
    for i in from..to {
        // SAFETY: i < number of pages in the mapping; we are its only user.
        let page = unsafe { &mut *buf.add(i) };
        let old = if k == 0 { None } else { Some(k - 1) };
        if let Some(b) = verify_and_write(page, i as u64, old, k) {
            if bad_so_far + bad < MAX_CORRUPT_LINES {
                report(line, i as u64, k - 1, b);
            }
            bad += 1;
        }
    }
    // Memory barrier for the compiler: the buffer may be changed from
    // outside (that is what we are checking).
    // SAFETY: empty asm.
    unsafe { asm!("", options(nostack, preserves_flags)) };
    bad
}

fn main(args: &[*const u8]) -> ! {
    let mut line = Line::new();

    // PID 1 from the initramfs: mount /proc for /proc/cmdline. Ignore
    // errors (already mounted when run from a shell).
    sys::mount(b"proc\0", b"/proc\0", b"proc\0");

    let mut cfg = Config { mem_mib: 16, rate_mib: 0, every_ms: 0, passes: 0, detout: false };
    read_cmdline(&mut cfg);
    for &a in args.iter().skip(1) {
        // SAFETY: argv strings are NUL-terminated.
        let s = unsafe { cstr(a) };
        cfg.apply(s);
    }
    if cfg.mem_mib == 0 {
        cfg.mem_mib = 1;
    }

    let bytes = cfg.mem_mib as usize * 1024 * 1024;
    let pages = bytes / PAGE_SIZE;
    let addr = sys::mmap_anon(bytes);
    if addr < 0 {
        line.s(b"WORKLOAD-ERROR mmap mem=").u(cfg.mem_mib).s(b" errno=").u((-addr) as u64).print();
        reboot(&mut line);
    }
    let buf = addr as *mut [u64; PAGE_WORDS];

    line.s(b"GUEST-READY cpus=")
        .u(sys::cpu_count() as u64)
        .s(b" mem=")
        .u(cfg.mem_mib)
        .s(b" ms=")
        .u(ms_now())
        .print();

    let mut input = Input { buf: [0; 128], len: 0, open: true, overflow: false };

    // Rate limiting: pages per chunk and the schedule.
    let rate_bps = cfg.rate_mib * 1024 * 1024;
    let chunk_pages = if rate_bps == 0 {
        pages
    } else {
        let per_slice = (rate_bps as u128 * SLICE_NS as u128 / 1_000_000_000) as usize / PAGE_SIZE;
        per_slice.max(MIN_CHUNK_PAGES)
    };
    let mut deadline = if rate_bps == 0 { 0 } else { sys::now_ns() };
    let mut last_print_ms: Option<u64> = None;

    let mut k: u64 = 0; // pass being run; 0 = initial fill
    loop {
        let mut bad = 0;
        let mut from = 0;
        while from < pages {
            let to = (from + chunk_pages).min(pages);
            bad += run_pages(buf, from, to, k, bad, &mut line);
            if rate_bps != 0 {
                let done = ((to - from) * PAGE_SIZE) as u64;
                deadline += (done as u128 * 1_000_000_000 / rate_bps as u128) as u64;
                let now = sys::now_ns();
                if now > deadline + MAX_LAG_NS {
                    deadline = now; // paused or starved: do not burst to catch up
                }
                let wait = deadline.saturating_sub(now);
                let cmd = input.poll(wait);
                handle(cmd, &mut line, k.saturating_sub(1), &mut cfg.detout);
            }
            from = to;
        }
        if bad > 0 {
            line.s(b"CORRUPT pages=").u(bad).s(b" pass=").u(k).print();
        }
        if rate_bps == 0 {
            let cmd = input.poll(0);
            handle(cmd, &mut line, k, &mut cfg.detout);
        }
        if k > 0 {
            let now = ms_now();
            let due = match last_print_ms {
                None => true,
                Some(t) => cfg.every_ms == 0 || now.saturating_sub(t) >= cfg.every_ms,
            };
            if due {
                if cfg.detout {
                    line.s(b"PASS ").u(k).print();
                } else {
                    line.s(b"PASS ").u(k).s(b" ms=").u(now).print();
                }
                last_print_ms = Some(now);
            }
            if cfg.passes != 0 && k >= cfg.passes {
                line.s(b"DONE passes=").u(k).s(b" ms=").u(now).print();
                reboot(&mut line);
            }
        }
        k += 1;
    }
}

/// # Safety
/// `p` points to a NUL-terminated string that lives for the program's life.
unsafe fn cstr(p: *const u8) -> &'static [u8] {
    let mut n = 0;
    // SAFETY: guaranteed by the caller.
    unsafe {
        // volatile: keep LLVM from turning this loop into a strlen call
        while core::ptr::read_volatile(p.add(n)) != 0 {
            n += 1;
        }
        core::slice::from_raw_parts(p, n)
    }
}

/// Called from `_start` with the initial stack pointer (argc, argv...).
#[no_mangle]
unsafe extern "C" fn rust_start(sp: *const usize) -> ! {
    // SAFETY: the kernel's initial stack layout: argc, then argc pointers.
    let args = unsafe {
        let argc = *sp;
        core::slice::from_raw_parts(sp.add(1) as *const *const u8, argc)
    };
    main(args)
}

global_asm!(
    ".globl _start",
    ".type _start,@function",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {start}",
    "ud2",
    start = sym rust_start,
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    sys::write(1, b"WORKLOAD-ERROR panic\n");
    sys::exit(101)
}

// The compiler may emit calls to these; there is no libc.

/// # Safety
/// Standard C semantics.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: standard memcpy contract.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard C semantics.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // no overlap that forward copying would break
        // SAFETY: as above.
        unsafe { memcpy(dst, src, n) }
    } else {
        // SAFETY: copy backwards; DF restored.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _,
                 inout("rdi") dst.add(n).wrapping_sub(1) => _,
                 inout("rsi") src.add(n).wrapping_sub(1) => _,
                 options(nostack));
        }
        dst
    }
}

/// # Safety
/// Standard C semantics.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: standard memset contract.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard C semantics.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n; volatile keeps this from being turned into a call
        // to memcmp/bcmp.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard C semantics.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

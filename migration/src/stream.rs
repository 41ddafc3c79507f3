//! The migration stream: QEMU's framing, minivmm's contents.
//!
//! ```text
//! be32 0x5145564d "QEVM"   be32 3
//! 0x07 CONFIGURATION       be32 len, JSON {machine, ram blocks, vcpus, cpu, page size}, 0x7e be32 0 be32 crc
//! 0x08 COMMAND             be16 cmd, be16 len, data, be32 CRC32 of the command from its type byte
//! 0x01 SECTION_START       be32 id, u8 len, "ram", be32 instance, be32 version, RAM records, footer
//! 0x02 SECTION_PART        be32 id, RAM records (at most 256 pages), footer   (rounds are runs of PARTs)
//! 0x03 SECTION_END         be32 id, RAM records, footer       (closes the RAM section; PARTs carry the pages)
//! 0x04 SECTION_FULL        be32 id, u8 len, name, be32 instance, be32 version,
//!                          be32 len, device state, footer
//! 0x00 EOF
//! footer = 0x7e, be32 id, be32 CRC32 (IEEE) of the section from its type byte through the footer id
//! ```
//!
//! The CRC is minivmm's addition to QEMU's framing: without it a flipped
//! bit in a page would land silently in the guest. A receiver stages each
//! RAM section and places its pages only after the CRC checks, so a
//! corrupted section never reaches guest memory.
//!
//! RAM records are `be64 offset|flags`; unless CONTINUE is set, the block
//! name follows as `u8 len, bytes`. PAGE is followed by 4096 bytes, ZERO by
//! one fill byte (0), ZERO_RUN by `be64` pages (that many zero pages from
//! its offset). The START section's records begin with
//! `be64 total|MEM_SIZE` and then `u8 len, name, be64 size` per block. Every
//! RAM section ends with `be64 EOS`.
//!
//! The return path (destination to source, same connection) carries
//! `be16 type, be16 len, data` messages; COLO messages are `be32` values.
//!
//! [`Reader`] counts bytes so that every error names the stream offset
//! where it was found.

use std::io::{self, Read, Write};

/// "QEVM".
pub const MAGIC: u32 = 0x5145_564d;
/// Stream version.
pub const VERSION: u32 = 3;
/// Target page size.
pub const PAGE_SIZE: usize = 4096;

/// Section and marker bytes.
pub mod section {
    /// End of stream.
    pub const EOF: u8 = 0x00;
    /// First part of an iterative section.
    pub const START: u8 = 0x01;
    /// Middle part of an iterative section.
    pub const PART: u8 = 0x02;
    /// Last part of an iterative section.
    pub const END: u8 = 0x03;
    /// A whole device state.
    pub const FULL: u8 = 0x04;
    /// Machine configuration.
    pub const CONFIGURATION: u8 = 0x07;
    /// A command.
    pub const COMMAND: u8 = 0x08;
    /// Section footer.
    pub const FOOTER: u8 = 0x7e;
}

/// RAM record flags (low bits of the page offset).
pub mod ram_flag {
    /// A page of zeros; one fill byte follows.
    pub const ZERO: u64 = 0x02;
    /// Total RAM size and the block list (START section only).
    pub const MEM_SIZE: u64 = 0x04;
    /// A full page follows.
    pub const PAGE: u64 = 0x08;
    /// End of this section's RAM records.
    pub const EOS: u64 = 0x10;
    /// Same block as the previous record; no name follows.
    pub const CONTINUE: u64 = 0x20;
    /// minivmm: a run of zero pages from this one; `be64` page count
    /// follows (QEMU sends a ZERO record per page).
    pub const ZERO_RUN: u64 = 0x400;
    /// The flag bits: everything below the page size.
    pub const MASK: u64 = 0xfff;
}

/// Command numbers (`QEMU_VM_COMMAND`).
pub mod cmd {
    /// Open the return path.
    pub const OPEN_RETURN_PATH: u16 = 1;
    /// Ping, answered with PONG on the return path.
    pub const PING: u16 = 2;
    /// Postcopy may follow; the destination checks it can do it.
    pub const POSTCOPY_ADVISE: u16 = 3;
    /// Arm userfaultfd and start the listen thread.
    pub const POSTCOPY_LISTEN: u16 = 4;
    /// Start the destination's vCPUs.
    pub const POSTCOPY_RUN: u16 = 5;
    /// Pages to drop on the destination.
    pub const POSTCOPY_RAM_DISCARD: u16 = 6;
    /// A nested stream of the given length follows.
    pub const PACKAGED: u16 = 7;
    /// Enter COLO after the first migration.
    pub const ENABLE_COLO: u16 = 8;
    /// minivmm: the postcopy preempt channel (requested pages) has been
    /// connected; the destination accepts it now.
    pub const POSTCOPY_PREEMPT: u16 = 9;
    /// minivmm: a source resuming a paused postcopy asks for the pages the
    /// destination has (RECV_BITMAP messages, then RESUME_ACK).
    pub const POSTCOPY_RECV_BITMAP: u16 = 10;
    /// minivmm: the source resumes sending pages on this connection.
    pub const POSTCOPY_RESUME: u16 = 11;
}

/// First bytes of the postcopy preempt channel: `be32` "QEVP", `be32` 1.
pub const PREEMPT_MAGIC: u32 = 0x5145_5650;
/// Version after [`PREEMPT_MAGIC`].
pub const PREEMPT_VERSION: u32 = 1;

/// Return-path message types.
pub mod rp {
    /// Destination is done; `be32` error flag (0 = success).
    pub const SHUT: u16 = 1;
    /// Answer to PING; `be32` value.
    pub const PONG: u16 = 2;
    /// Page request with block name.
    pub const REQ_PAGES_ID: u16 = 3;
    /// Page request in the previous block.
    pub const REQ_PAGES: u16 = 4;
    /// minivmm extension: the destination's error text (UTF-8), sent before SHUT(1).
    pub const ERROR_DESC: u16 = 0x4d01;
    /// minivmm extension: a COLO message from the secondary (`be32`).
    pub const COLO: u16 = 0x4d02;
    /// minivmm extension: pages a paused postcopy destination has: `u8
    /// len`, block name, `be64` first page, then one bit per page (bit `i`
    /// of byte `j`: page `first + 8j + i`).
    pub const RECV_BITMAP: u16 = 0x4d03;
    /// minivmm extension: every RECV_BITMAP is sent; `be32` block count.
    pub const RESUME_ACK: u16 = 0x4d04;
    /// minivmm extension: console output of a running COLO secondary
    /// (the bytes, in order).
    pub const COLO_OUTPUT: u16 = 0x4d05;
}

/// The `be32` values of the source's PINGs: each marks a point the source
/// waits at until the destination's PONG says it has read (and judged)
/// everything before it.
pub mod ping {
    /// Keepalive, both ways: PING 0 from the source where its main stream
    /// would idle, PONG 0 from the destination's keepalive thread (and as
    /// the answer to PING 0). Nobody waits for it.
    pub const ALIVE: u32 = 0;
    /// After POSTCOPY_ADVISE: postcopy can work there.
    pub const ADVISE: u32 = 1;
    /// In the postcopy package, after RUN: the guest runs there (the end of
    /// postcopy's downtime; the source does not wait for it in place).
    pub const RUNNING: u32 = 2;
    /// After ENABLE_COLO: COLO is enabled there.
    pub const COLO: u32 = 3;
    /// After POSTCOPY_PREEMPT: the preempt channel is accepted.
    pub const PREEMPT: u32 = 4;
    /// After the postcopy discard sent before the stop: dropped there.
    pub const SWITCH: u32 = 5;
    /// Before precopy's stop: the rounds so far are read there.
    pub const DRAINED: u32 = 6;
}

/// Longest device-state blob we accept.
pub const MAX_DEVICE_STATE: u32 = 64 << 20;
/// Longest configuration we accept.
pub const MAX_CONFIG: u32 = 1 << 20;

/// Stream errors: what was wrong and at which byte.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The transport failed.
    #[error("I/O error at stream offset {offset}")]
    Io {
        /// Bytes read or written before the failure.
        offset: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The stream ended early.
    #[error("stream truncated at offset {offset} while reading {what}")]
    Truncated {
        /// Where it ended.
        offset: u64,
        /// What we expected.
        what: &'static str,
    },
    /// A value that the format does not allow.
    #[error("invalid stream at offset {offset}: {what}")]
    Invalid {
        /// Where.
        offset: u64,
        /// What.
        what: String,
    },
}

impl StreamError {
    /// An invalid-stream error.
    pub fn invalid(offset: u64, what: impl Into<String>) -> Self {
        Self::Invalid {
            offset,
            what: what.into(),
        }
    }
}

/// A reader that counts bytes, checksums sections and maps EOF to
/// [`StreamError::Truncated`].
pub struct Reader<R> {
    inner: R,
    offset: u64,
    crc: crc32fast::Hasher,
}

impl<R: Read> Reader<R> {
    /// Wrap a transport.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            offset: 0,
            crc: crc32fast::Hasher::new(),
        }
    }

    /// Start a section's checksum with the next byte read.
    pub fn begin_section(&mut self) {
        self.crc = crc32fast::Hasher::new();
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The wrapped reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Fill `buf` completely.
    pub fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), StreamError> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    self.offset += done as u64;
                    return Err(StreamError::Truncated {
                        offset: self.offset,
                        what,
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.offset += done as u64;
                    return Err(StreamError::Io {
                        offset: self.offset,
                        source: e,
                    });
                }
            }
        }
        self.crc.update(buf);
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, StreamError> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b, what)?;
        Ok(b[0])
    }

    /// Big-endian u16.
    pub fn be16(&mut self, what: &'static str) -> Result<u16, StreamError> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b, what)?;
        Ok(u16::from_be_bytes(b))
    }

    /// Big-endian u32.
    pub fn be32(&mut self, what: &'static str) -> Result<u32, StreamError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }

    /// Big-endian u64.
    pub fn be64(&mut self, what: &'static str) -> Result<u64, StreamError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }

    /// `u8 len, bytes` as a UTF-8 string.
    pub fn idstr(&mut self, what: &'static str) -> Result<String, StreamError> {
        let len = self.u8(what)? as usize;
        let mut b = vec![0u8; len];
        self.read_exact(&mut b, what)?;
        String::from_utf8(b)
            .map_err(|_| StreamError::invalid(self.offset, format!("{what} is not UTF-8")))
    }

    /// `n` bytes, with a sanity cap.
    pub fn vec(&mut self, n: usize, what: &'static str) -> Result<Vec<u8>, StreamError> {
        let mut b = vec![0u8; n];
        self.read_exact(&mut b, what)?;
        Ok(b)
    }

    /// Read a bare `be32` CRC32 and check it against the bytes read since
    /// [`Reader::begin_section`] (commands end this way).
    pub fn check_crc(&mut self, what: &str) -> Result<(), StreamError> {
        let want = std::mem::take(&mut self.crc).finalize();
        let at = self.offset;
        let got = self.be32("checksum")?;
        if got != want {
            return Err(StreamError::invalid(
                at,
                format!("{what} checksum mismatch: stream says {got:#010x}, data gives {want:#010x} (corrupted in transit)"),
            ));
        }
        Ok(())
    }

    /// Expect a section footer for `id` and check the section's CRC.
    pub fn footer(&mut self, id: u32) -> Result<(), StreamError> {
        let at = self.offset;
        let b = self.u8("section footer")?;
        if b != section::FOOTER {
            return Err(StreamError::invalid(
                at,
                format!("expected section footer 0x7e for section {id}, found {b:#04x}"),
            ));
        }
        let got = self.be32("section footer id")?;
        if got != id {
            return Err(StreamError::invalid(
                at,
                format!("section footer names section {got}, expected {id}"),
            ));
        }
        let want = std::mem::take(&mut self.crc).finalize();
        let crc_at = self.offset;
        let got = self.be32("section checksum")?;
        if got != want {
            return Err(StreamError::invalid(
                crc_at,
                format!("section {id} checksum mismatch: stream says {got:#010x}, data gives {want:#010x} (corrupted in transit)"),
            ));
        }
        Ok(())
    }
}

impl<R: io::BufRead> Reader<R> {
    /// Hand the next `n` bytes to `f`, counted in the section's CRC like
    /// [`Reader::read_exact`], straight from the transport's buffer when
    /// they are all there (the usual case: one copy fewer per page), else
    /// gathered in `scratch` (at least `n` bytes).
    pub fn read_with<T>(
        &mut self,
        n: usize,
        what: &'static str,
        scratch: &mut [u8],
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, StreamError> {
        let avail = loop {
            match self.inner.fill_buf() {
                Ok(b) => break b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(StreamError::Io {
                        offset: self.offset,
                        source: e,
                    })
                }
            }
        };
        if avail.len() >= n {
            let data = &avail[..n];
            self.crc.update(data);
            let out = f(data);
            self.inner.consume(n);
            self.offset += n as u64;
            return Ok(out);
        }
        let buf = &mut scratch[..n];
        self.read_exact(buf, what)?;
        Ok(f(buf))
    }
}

/// A writer that counts bytes and checksums sections.
pub struct Writer<W> {
    inner: W,
    offset: u64,
    crc: crc32fast::Hasher,
}

impl<W: Write> Writer<W> {
    /// Wrap a transport (buffer it yourself if it is unbuffered).
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            offset: 0,
            crc: crc32fast::Hasher::new(),
        }
    }

    /// Start a section's checksum with the next byte written.
    pub fn begin_section(&mut self) {
        self.crc = crc32fast::Hasher::new();
    }

    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The wrapped writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Write all of `b`.
    pub fn bytes(&mut self, b: &[u8]) -> Result<(), StreamError> {
        self.crc.update(b);
        self.inner.write_all(b).map_err(|e| StreamError::Io {
            offset: self.offset,
            source: e,
        })?;
        self.offset += b.len() as u64;
        Ok(())
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) -> Result<(), StreamError> {
        self.bytes(&[v])
    }

    /// Big-endian u16.
    pub fn be16(&mut self, v: u16) -> Result<(), StreamError> {
        self.bytes(&v.to_be_bytes())
    }

    /// Big-endian u32.
    pub fn be32(&mut self, v: u32) -> Result<(), StreamError> {
        self.bytes(&v.to_be_bytes())
    }

    /// Big-endian u64.
    pub fn be64(&mut self, v: u64) -> Result<(), StreamError> {
        self.bytes(&v.to_be_bytes())
    }

    /// `u8 len, bytes`.
    pub fn idstr(&mut self, s: &str) -> Result<(), StreamError> {
        let len = u8::try_from(s.len()).map_err(|_| {
            StreamError::invalid(self.offset, format!("name '{s}' longer than 255 bytes"))
        })?;
        self.u8(len)?;
        self.bytes(s.as_bytes())
    }

    /// Section footer: 0x7e, the id, and the CRC32 of the section.
    pub fn footer(&mut self, id: u32) -> Result<(), StreamError> {
        self.u8(section::FOOTER)?;
        self.be32(id)?;
        let crc = std::mem::take(&mut self.crc).finalize();
        self.be32(crc)
    }

    /// A command, as [`Command::number`] and [`Command::payload`].
    pub fn write_command(&mut self, c: &Command) -> Result<(), StreamError> {
        self.command(c.number(), &c.payload())
    }

    /// A command with payload.
    pub fn command(&mut self, cmd: u16, data: &[u8]) -> Result<(), StreamError> {
        let len = u16::try_from(data.len())
            .map_err(|_| StreamError::invalid(self.offset, "command payload over 64 KiB"))?;
        self.begin_section();
        self.u8(section::COMMAND)?;
        self.be16(cmd)?;
        self.be16(len)?;
        self.bytes(data)?;
        let crc = std::mem::take(&mut self.crc).finalize();
        self.be32(crc)
    }

    /// Flush the transport.
    pub fn flush(&mut self) -> Result<(), StreamError> {
        self.inner.flush().map_err(|e| StreamError::Io {
            offset: self.offset,
            source: e,
        })
    }
}

/// Where a [`Writer`] puts its bytes: a transport behind a buffer
/// ([`BufSink`]) or memory (`Vec<u8>`). Besides `Write` it can lend the end
/// of its buffer, so a page is read from guest RAM straight into the bytes
/// that go on the wire (one copy fewer per page than reading it into a
/// buffer of its own first).
pub trait Sink: Write {
    /// Call `f` with `n` writable bytes at the end of the buffered data; `f`
    /// returns how many of them, from the first, to keep.
    fn fill<T>(&mut self, n: usize, f: impl FnOnce(&mut [u8]) -> (usize, T)) -> io::Result<T>;
}

impl Sink for Vec<u8> {
    fn fill<T>(&mut self, n: usize, f: impl FnOnce(&mut [u8]) -> (usize, T)) -> io::Result<T> {
        let len = self.len();
        self.resize(len + n, 0);
        let (keep, out) = f(&mut self[len..]);
        self.truncate(len + keep.min(n));
        Ok(out)
    }
}

/// A transport behind a fixed buffer, written out when full or flushed
/// (and, as `BufWriter`, on drop, errors ignored).
pub struct BufSink<W: Write> {
    inner: W,
    buf: Box<[u8]>,
    len: usize,
}

impl<W: Write> BufSink<W> {
    /// A buffer of `capacity` bytes in front of `inner`.
    pub fn with_capacity(capacity: usize, inner: W) -> Self {
        Self {
            inner,
            buf: vec![0; capacity.max(1)].into_boxed_slice(),
            len: 0,
        }
    }

    fn write_out(&mut self) -> io::Result<()> {
        let mut done = 0;
        let r = loop {
            if done == self.len {
                break Ok(());
            }
            match self.inner.write(&self.buf[done..self.len]) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        // What was written is gone from the buffer even on error.
        self.buf.copy_within(done..self.len, 0);
        self.len -= done;
        r
    }
}

impl<W: Write> Write for BufSink<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.len + data.len() > self.buf.len() {
            self.write_out()?;
        }
        if data.len() >= self.buf.len() {
            return self.inner.write(data);
        }
        self.buf[self.len..self.len + data.len()].copy_from_slice(data);
        self.len += data.len();
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_out()?;
        self.inner.flush()
    }
}

impl<W: Write> Sink for BufSink<W> {
    fn fill<T>(&mut self, n: usize, f: impl FnOnce(&mut [u8]) -> (usize, T)) -> io::Result<T> {
        if self.len + n > self.buf.len() {
            self.write_out()?;
        }
        if n > self.buf.len() {
            let mut tmp = vec![0; n];
            let (keep, out) = f(&mut tmp);
            self.inner.write_all(&tmp[..keep.min(n)])?;
            return Ok(out);
        }
        let (keep, out) = f(&mut self.buf[self.len..self.len + n]);
        self.len += keep.min(n);
        Ok(out)
    }
}

impl<W: Write> Drop for BufSink<W> {
    fn drop(&mut self) {
        let _ = self.write_out();
    }
}

impl<W: Sink> Writer<W> {
    /// Write bytes made in place: `f` gets `n` bytes of the transport's
    /// buffer and returns how many of them, from the first, to keep; those
    /// count for the section's CRC like [`Writer::bytes`].
    pub fn fill<T>(
        &mut self,
        n: usize,
        f: impl FnOnce(&mut [u8]) -> (usize, T),
    ) -> Result<T, StreamError> {
        let crc = &mut self.crc;
        let mut kept = 0;
        let out = self
            .inner
            .fill(n, |buf| {
                let (keep, out) = f(buf);
                kept = keep.min(n);
                crc.update(&buf[..kept]);
                (kept, out)
            })
            .map_err(|e| StreamError::Io {
                offset: self.offset,
                source: e,
            })?;
        self.offset += kept as u64;
        Ok(out)
    }
}

/// One device's state in the stream (a FULL section).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceBlob {
    /// Section name, e.g. "cpu", "serial".
    pub name: String,
    /// Instance number (e.g. the vCPU index).
    pub instance: u32,
    /// Format version of `data`.
    pub version: u32,
    /// The state, opaque to this crate.
    pub data: Vec<u8>,
}

/// Write a FULL section.
pub fn write_device<W: Write>(
    w: &mut Writer<W>,
    id: u32,
    blob: &DeviceBlob,
) -> Result<(), StreamError> {
    let len = u32::try_from(blob.data.len())
        .ok()
        .filter(|&l| l <= MAX_DEVICE_STATE)
        .ok_or_else(|| {
            StreamError::invalid(
                w.offset(),
                format!("device state '{}' too large", blob.name),
            )
        })?;
    w.begin_section();
    w.u8(section::FULL)?;
    w.be32(id)?;
    w.idstr(&blob.name)?;
    w.be32(blob.instance)?;
    w.be32(blob.version)?;
    w.be32(len)?;
    w.bytes(&blob.data)?;
    w.footer(id)
}

/// The device sections a destination accepts: for each device name, how
/// many instances (0..n) and the longest state one may have. Everything a
/// peer can make a destination hold in device state is bounded by it
/// ([`Self::max_stream`]), and a section is judged by its header, before
/// its state is read: an unknown device, instance or repeated section, or
/// a state longer than that device can have, is refused there.
#[derive(Clone, Debug)]
pub struct DeviceCatalog {
    devices: Vec<(String, u32, u32)>,
}

/// Bytes a FULL section takes besides its state and name: type, id,
/// name length, instance, version, length, footer.
const FULL_OVERHEAD: u64 = 1 + 4 + 1 + 4 + 4 + 4 + 9;

impl DeviceCatalog {
    /// No devices.
    pub fn new() -> Self {
        Self {
            devices: Vec::new(),
        }
    }

    /// Accept `instances` instances (0..instances) of `name`, each at most
    /// `max_len` bytes of state.
    pub fn with(mut self, name: &str, instances: u32, max_len: u32) -> Self {
        self.devices
            .push((name.to_string(), instances, max_len.min(MAX_DEVICE_STATE)));
        self
    }

    /// The longest stream of FULL sections (all devices, then EOF) it
    /// accepts: the bound for a postcopy package's or a COLO checkpoint's
    /// device state.
    pub fn max_stream(&self) -> u64 {
        self.devices
            .iter()
            .map(|(n, i, l)| u64::from(*i) * (u64::from(*l) + n.len() as u64 + FULL_OVERHEAD))
            .sum::<u64>()
            // Commands a package carries besides the devices, and EOF.
            + 4096
    }

    /// Judge a section's header; `Err` says why it is refused.
    fn check(&self, name: &str, instance: u32, len: u32) -> Result<(), String> {
        let Some((_, instances, max)) = self.devices.iter().find(|(n, ..)| n == name) else {
            return Err(format!("unknown device '{name}'"));
        };
        if instance >= *instances {
            return Err(format!(
                "device '{name}' instance {instance} (this machine has {instances})"
            ));
        }
        if len > *max {
            return Err(format!(
                "device state '{name}' claims {len} bytes (at most {max} here)"
            ));
        }
        Ok(())
    }
}

impl Default for DeviceCatalog {
    fn default() -> Self {
        Self::new()
    }
}

/// Read a FULL section's body (after its type byte at `at` and its id)
/// into `devices`: its header is checked against `catalog` and `devices`
/// (no second section for a device) before its state is read.
pub fn read_device<R: Read>(
    r: &mut Reader<R>,
    id: u32,
    at: u64,
    catalog: &DeviceCatalog,
    devices: &mut Vec<DeviceBlob>,
) -> Result<(), StreamError> {
    let name = r.idstr("device section name")?;
    let instance = r.be32("device instance")?;
    let version = r.be32("device version")?;
    let len_at = r.offset();
    let len = r.be32("device state length")?;
    if devices
        .iter()
        .any(|d| d.name == name && d.instance == instance)
    {
        return Err(StreamError::invalid(
            at,
            format!("device '{name}' instance {instance} sent twice"),
        ));
    }
    catalog
        .check(&name, instance, len)
        .map_err(|why| StreamError::invalid(len_at, why))?;
    let data = r.vec(len as usize, "device state")?;
    r.footer(id)?;
    devices.push(DeviceBlob {
        name,
        instance,
        version,
        data,
    });
    Ok(())
}

/// Write the stream header.
pub fn write_header<W: Write>(w: &mut Writer<W>) -> Result<(), StreamError> {
    w.be32(MAGIC)?;
    w.be32(VERSION)
}

/// Read and check the stream header.
pub fn read_header<R: Read>(r: &mut Reader<R>) -> Result<(), StreamError> {
    let magic = r.be32("stream magic")?;
    if magic != MAGIC {
        return Err(StreamError::invalid(0, format!("bad magic {magic:#010x}, expected {MAGIC:#010x} (\"QEVM\"): not a migration stream")));
    }
    let version = r.be32("stream version")?;
    if version != VERSION {
        return Err(StreamError::invalid(
            4,
            format!("unsupported stream version {version}, expected {VERSION}"),
        ));
    }
    Ok(())
}

/// Write the configuration section (footer id 0).
pub fn write_config<W: Write>(w: &mut Writer<W>, json: &[u8]) -> Result<(), StreamError> {
    if json.len() > MAX_CONFIG as usize {
        return Err(StreamError::invalid(w.offset(), "configuration over 1 MiB"));
    }
    w.begin_section();
    w.u8(section::CONFIGURATION)?;
    w.be32(json.len() as u32)?;
    w.bytes(json)?;
    w.footer(0)
}

/// Read the configuration section (after the header).
pub fn read_config<R: Read>(r: &mut Reader<R>) -> Result<Vec<u8>, StreamError> {
    r.begin_section();
    let at = r.offset();
    let t = r.u8("configuration section")?;
    if t != section::CONFIGURATION {
        return Err(StreamError::invalid(
            at,
            format!("expected configuration section 0x07, found {t:#04x}"),
        ));
    }
    let at = r.offset();
    let len = r.be32("configuration length")?;
    if len > MAX_CONFIG {
        return Err(StreamError::invalid(
            at,
            format!("configuration claims {len} bytes"),
        ));
    }
    let v = r.vec(len as usize, "configuration")?;
    r.footer(0)?;
    Ok(v)
}

/// Is the page all zeros?
pub fn is_zero(page: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: u128 has no invalid bit patterns; align_to only splits the slice.
        unsafe { page.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Write a return-path message.
pub fn write_rp<W: Write>(w: &mut W, kind: u16, data: &[u8]) -> io::Result<()> {
    let len = u16::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "return-path message too long"))?;
    let mut msg = Vec::with_capacity(4 + data.len());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(data);
    w.write_all(&msg)?;
    w.flush()
}

/// Read one return-path message.
pub fn read_rp<R: Read>(r: &mut Reader<R>) -> Result<(u16, Vec<u8>), StreamError> {
    let kind = r.be16("return-path message type")?;
    let len = r.be16("return-path message length")?;
    let data = r.vec(len as usize, "return-path message")?;
    Ok((kind, data))
}

/// A COMMAND section of the main stream (or of the postcopy package),
/// parsed: the command numbers of [`cmd`] with their payloads. Parsing
/// ([`Command::parse`]) checks the lengths of the payloads that have one
/// fixed length; the engines check what the payloads mean.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// [`cmd::OPEN_RETURN_PATH`] (a payload, never sent, is ignored).
    OpenReturnPath,
    /// [`cmd::PING`]: `be32` value (one of [`ping`]).
    Ping(u32),
    /// [`cmd::POSTCOPY_ADVISE`]: the source's page sizes (the destination
    /// checks them: `be64` 4096 twice).
    PostcopyAdvise(Vec<u8>),
    /// [`cmd::POSTCOPY_LISTEN`].
    PostcopyListen,
    /// [`cmd::POSTCOPY_RUN`].
    PostcopyRun,
    /// [`cmd::POSTCOPY_RAM_DISCARD`]: `u8` 0, `u8 len`, block name, then
    /// `be64 start, be64 length` pairs (checked against the block there).
    PostcopyRamDiscard(Vec<u8>),
    /// [`cmd::PACKAGED`]: `be32` length of the package that follows.
    Packaged(u32),
    /// [`cmd::ENABLE_COLO`].
    EnableColo,
    /// [`cmd::POSTCOPY_PREEMPT`].
    PostcopyPreempt,
    /// [`cmd::POSTCOPY_RECV_BITMAP`].
    PostcopyRecvBitmap,
    /// [`cmd::POSTCOPY_RESUME`].
    PostcopyResume,
    /// A command number minivmm does not know.
    Unknown(u16),
}

impl Command {
    /// Parse command `c` with payload `data`, read at stream offset `at`.
    pub fn parse(at: u64, c: u16, data: Vec<u8>) -> Result<Self, StreamError> {
        let be32 = |what: &str| {
            <[u8; 4]>::try_from(&data[..])
                .map(u32::from_be_bytes)
                .map_err(|_| StreamError::invalid(at, what))
        };
        Ok(match c {
            cmd::OPEN_RETURN_PATH => Self::OpenReturnPath,
            cmd::PING => Self::Ping(be32("PING needs 4 bytes")?),
            cmd::POSTCOPY_ADVISE => Self::PostcopyAdvise(data),
            cmd::POSTCOPY_LISTEN => Self::PostcopyListen,
            cmd::POSTCOPY_RUN => Self::PostcopyRun,
            cmd::POSTCOPY_RAM_DISCARD => Self::PostcopyRamDiscard(data),
            cmd::PACKAGED => Self::Packaged(be32("PACKAGED needs a 4-byte length")?),
            cmd::ENABLE_COLO => Self::EnableColo,
            cmd::POSTCOPY_PREEMPT => Self::PostcopyPreempt,
            cmd::POSTCOPY_RECV_BITMAP => Self::PostcopyRecvBitmap,
            cmd::POSTCOPY_RESUME => Self::PostcopyResume,
            other => Self::Unknown(other),
        })
    }

    /// Its command number ([`cmd`]).
    pub fn number(&self) -> u16 {
        match self {
            Self::OpenReturnPath => cmd::OPEN_RETURN_PATH,
            Self::Ping(_) => cmd::PING,
            Self::PostcopyAdvise(_) => cmd::POSTCOPY_ADVISE,
            Self::PostcopyListen => cmd::POSTCOPY_LISTEN,
            Self::PostcopyRun => cmd::POSTCOPY_RUN,
            Self::PostcopyRamDiscard(_) => cmd::POSTCOPY_RAM_DISCARD,
            Self::Packaged(_) => cmd::PACKAGED,
            Self::EnableColo => cmd::ENABLE_COLO,
            Self::PostcopyPreempt => cmd::POSTCOPY_PREEMPT,
            Self::PostcopyRecvBitmap => cmd::POSTCOPY_RECV_BITMAP,
            Self::PostcopyResume => cmd::POSTCOPY_RESUME,
            Self::Unknown(c) => *c,
        }
    }

    /// Its payload as sent.
    pub fn payload(&self) -> Vec<u8> {
        match self {
            Self::Ping(v) | Self::Packaged(v) => v.to_be_bytes().to_vec(),
            Self::PostcopyAdvise(d) | Self::PostcopyRamDiscard(d) => d.clone(),
            _ => Vec::new(),
        }
    }
}

/// Reads a whole COMMAND section, its type byte included.
pub fn read_command(r: &mut Reader<impl Read>) -> Result<Command, StreamError> {
    r.begin_section();
    let at = r.offset();
    match r.u8("section type")? {
        section::COMMAND => read_command_body(r, at),
        other => Err(StreamError::invalid(
            at,
            format!("section type {other:#04x}, expected a command"),
        )),
    }
}

/// Reads a COMMAND section after its type byte (at `at`), checking its
/// CRC, and parses it.
pub fn read_command_body(r: &mut Reader<impl Read>, at: u64) -> Result<Command, StreamError> {
    let c = r.be16("command")?;
    let len = r.be16("command length")?;
    let data = r.vec(len as usize, "command data")?;
    r.check_crc("command")?;
    Command::parse(at, c, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command reads back as written (number, payload, bytes), and
    /// a fixed-length payload of another length is an error naming it.
    #[test]
    fn commands_round_trip_and_check_their_lengths() {
        let all = [
            Command::OpenReturnPath,
            Command::Ping(ping::SWITCH),
            Command::PostcopyAdvise([0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 16, 0].to_vec()),
            Command::PostcopyListen,
            Command::PostcopyRun,
            Command::PostcopyRamDiscard(vec![0, 3, b'r', b'a', b'm']),
            Command::Packaged(1234),
            Command::EnableColo,
            Command::PostcopyPreempt,
            Command::Unknown(0x77),
        ];
        for c in all {
            let mut w = Writer::new(Vec::new());
            w.write_command(&c).unwrap();
            let mut raw = Writer::new(Vec::new());
            raw.command(c.number(), &c.payload()).unwrap();
            assert_eq!(w.get_mut(), raw.get_mut());
            let bytes = std::mem::take(w.get_mut());
            assert_eq!(read_command(&mut Reader::new(&bytes[..])).unwrap(), c);
        }
        for (c, why) in [
            (cmd::PING, "PING needs 4 bytes"),
            (cmd::PACKAGED, "PACKAGED needs a 4-byte length"),
        ] {
            let e = Command::parse(9, c, vec![1, 2, 3]).unwrap_err().to_string();
            assert_eq!(e, format!("invalid stream at offset 9: {why}"));
        }
    }

    /// `read_with` hands out the same bytes and CRC whether they lie in the
    /// transport's buffer or straddle its refill, and reports truncation.
    #[test]
    fn read_with_borrows_or_gathers() {
        let data: Vec<u8> = (0..3 * PAGE_SIZE + 100)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let want_crc = {
            let mut h = crc32fast::Hasher::new();
            h.update(&data[..3 * PAGE_SIZE]);
            h.finalize()
        };
        // A buffer of 5000 bytes: the second page straddles a refill.
        let mut r = Reader::new(io::BufReader::with_capacity(5000, &data[..]));
        let mut scratch = vec![0u8; PAGE_SIZE];
        for p in 0..3 {
            let got = r
                .read_with(PAGE_SIZE, "page", &mut scratch, |d| d.to_vec())
                .unwrap();
            assert_eq!(got, &data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]);
            assert_eq!(r.offset(), ((p + 1) * PAGE_SIZE) as u64);
        }
        assert_eq!(std::mem::take(&mut r.crc).finalize(), want_crc);
        let e = r
            .read_with(PAGE_SIZE, "page", &mut scratch, |_| ())
            .unwrap_err();
        assert!(
            matches!(e, StreamError::Truncated { what: "page", .. }),
            "{e}"
        );
    }

    /// `BufSink` and `Vec<u8>` give a `Writer` the same bytes, offsets and
    /// CRC for plain writes and in-place fills: partial keeps, fills that
    /// force the buffer out, and a fill larger than the buffer.
    #[test]
    fn buf_sink_matches_vec() {
        fn script<W: Sink>(w: &mut Writer<W>) -> u32 {
            w.begin_section();
            w.bytes(b"head").unwrap();
            for (n, keep) in [(5, 3), (7, 7), (20, 2), (3, 0)] {
                let got = w
                    .fill(n, |buf| {
                        assert_eq!(buf.len(), n);
                        for (i, b) in buf.iter_mut().enumerate() {
                            *b = (n + i) as u8;
                        }
                        (keep, keep)
                    })
                    .unwrap();
                assert_eq!(got, keep);
            }
            w.be32(0xdead_beef).unwrap();
            std::mem::take(&mut w.crc).finalize()
        }
        let mut plain = Writer::new(Vec::new());
        let crc_plain = script(&mut plain);
        let out = Vec::new();
        let mut sunk = Writer::new(BufSink::with_capacity(8, out));
        let crc_sunk = script(&mut sunk);
        sunk.flush().unwrap();
        assert_eq!(crc_sunk, crc_plain);
        assert_eq!(sunk.offset(), plain.offset());
        assert_eq!(sunk.get_mut().inner, *plain.get_mut());
        assert_eq!(plain.offset(), 4 + 3 + 7 + 2 + 4);
    }

    #[test]
    fn header_config_device_round_trip() {
        let mut w = Writer::new(Vec::new());
        write_header(&mut w).unwrap();
        write_config(&mut w, b"{\"a\":1}").unwrap();
        let blob = DeviceBlob {
            name: "cpu".into(),
            instance: 1,
            version: 2,
            data: vec![1, 2, 3],
        };
        write_device(&mut w, 7, &blob).unwrap();
        w.u8(section::EOF).unwrap();
        let bytes = w.get_mut().clone();
        assert_eq!(&bytes[..4], b"QEVM");

        let mut r = Reader::new(&bytes[..]);
        read_header(&mut r).unwrap();
        assert_eq!(read_config(&mut r).unwrap(), b"{\"a\":1}");
        r.begin_section();
        assert_eq!(r.u8("t").unwrap(), section::FULL);
        let id = r.be32("id").unwrap();
        assert_eq!(id, 7);
        let catalog = DeviceCatalog::new().with("cpu", 2, 16);
        let mut got = Vec::new();
        read_device(&mut r, id, 0, &catalog, &mut got).unwrap();
        assert_eq!(got, vec![blob]);
        assert_eq!(r.u8("eof").unwrap(), section::EOF);

        // Any flipped byte inside the device section is caught by its CRC
        // (or, in the framing bytes, by the framing checks).
        let dev_start = bytes.len() - 1 - (1 + 4 + 1 + 3 + 4 + 4 + 4 + 3 + 1 + 4 + 4);
        for i in dev_start..bytes.len() - 1 {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            let mut r = Reader::new(&bad[..]);
            read_header(&mut r).unwrap();
            read_config(&mut r).unwrap();
            r.begin_section();
            let t = r.u8("t").unwrap();
            let res = if t != section::FULL {
                Err(StreamError::invalid(0, "type"))
            } else {
                r.be32("id")
                    .and_then(|id| read_device(&mut r, id, 0, &catalog, &mut Vec::new()))
            };
            assert!(res.is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn errors_name_offsets() {
        let mut r = Reader::new(&b"QEVX\0\0\0\x03"[..]);
        let e = read_header(&mut r).unwrap_err().to_string();
        assert!(e.contains("bad magic"), "{e}");
        let mut r = Reader::new(&b"QEVM\0\0\0\x02"[..]);
        assert!(read_header(&mut r)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        let mut r = Reader::new(&b"QEV"[..]);
        let e = read_header(&mut r).unwrap_err().to_string();
        assert!(e.contains("truncated at offset 3"), "{e}");
        let mut r = Reader::new(&[0x7e, 0, 0, 0, 9, 0, 0, 0, 0][..]);
        assert!(r
            .footer(8)
            .unwrap_err()
            .to_string()
            .contains("names section 9"));
        // Device sections are judged by their header, before their state
        // is read: an absurd length, a length beyond what that device can
        // have, an unknown device or instance, a repeated section.
        let catalog = DeviceCatalog::new().with("cpu", 2, 1000);
        let header = |name: &str, instance: u32, len: u32| {
            let mut w = Writer::new(Vec::new());
            w.idstr(name).unwrap();
            w.be32(instance).unwrap();
            w.be32(1).unwrap();
            w.be32(len).unwrap();
            w.get_mut().clone()
        };
        let seen = vec![DeviceBlob {
            name: "cpu".into(),
            instance: 1,
            version: 1,
            data: vec![],
        }];
        for (bytes, want) in [
            (
                header("cpu", 0, u32::MAX),
                "claims 4294967295 bytes (at most 1000 here)",
            ),
            (header("cpu", 0, 1001), "claims 1001 bytes"),
            (header("dev7", 0, 10), "unknown device 'dev7'"),
            (header("cpu", 2, 10), "instance 2 (this machine has 2)"),
            (header("cpu", 1, 10), "sent twice"),
        ] {
            let e = read_device(
                &mut Reader::new(&bytes[..]),
                1,
                0,
                &catalog,
                &mut seen.clone(),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{e}");
        }
        // What a hostile stream can make a destination hold is bounded by
        // the machine's devices.
        assert!(catalog.max_stream() < 8 << 10);
    }

    #[test]
    fn zero_detection_and_rp() {
        let mut p = vec![0u8; PAGE_SIZE + 1];
        assert!(is_zero(&p[1..]));
        p[PAGE_SIZE] = 1;
        assert!(!is_zero(&p[1..]));
        let mut out = Vec::new();
        write_rp(&mut out, rp::PONG, &5u32.to_be_bytes()).unwrap();
        let (k, d) = read_rp(&mut Reader::new(&out[..])).unwrap();
        assert_eq!((k, d), (rp::PONG, 5u32.to_be_bytes().to_vec()));
    }
}

//! Glue between the VM and the `migration` crate: guest RAM with KVM's dirty
//! log as a [`GuestRam`], and the machine state as device blobs.
//!
//! Device sections, each the VMM's state struct in `postcard` (compact
//! binary serde: a checkpoint encodes and checks them in microseconds,
//! where JSON took ~0.4 ms), version-checked on load:
//!
//! | name | instance | content |
//! |---|---|---|
//! | `cpu` | vCPU index | registers, sregs, xsave, xcrs, debug regs, LAPIC, MSRs, events, mp state |
//! | `irqchip` | 0 | master PIC, slave PIC, IOAPIC |
//! | `pit` | 0 | i8254 channels |
//! | `kvmclock` | 0 | guest clock (ns) |
//! | `serial` | 0 | 8250 registers and unread input |
//! | `cmos` | 0 | RTC index and NVRAM |
//! | `globalstate` | 0 | whether the source guest was running |

use std::sync::Arc;

use kvm_ioctls::VmFd;
use migration::ram::{Bitmap, GuestRam, RamBlock, RamError};
use migration::stream::DeviceBlob;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{self, GuestMemoryMmap, PAGE_SIZE};
use crate::vm::{MachineState, VmShape};

/// Version of every device section we write (1 was JSON).
pub const DEVICE_VERSION: u32 = 2;

/// Guest RAM for the migration engines.
pub struct KvmRam {
    fd: Arc<VmFd>,
    mem: Arc<GuestMemoryMmap>,
    blocks: Vec<RamBlock>,
    starts: Vec<u64>,
    /// `/proc/self/pagemap`, to find pages never populated (None if it
    /// cannot be opened: every page is then read).
    pagemap: Option<memory::Pagemap>,
    /// KVM's dirty rings, if the VM uses them instead of the bitmap.
    rings: Option<Arc<crate::dirty_ring::DirtyRings>>,
    /// This migration holds dirty logging on.
    logging: std::sync::atomic::AtomicBool,
}

impl KvmRam {
    /// RAM of `mem`, with dirty logging through `fd` (and `rings`, with
    /// KVM's dirty rings).
    pub fn new(
        fd: Arc<VmFd>,
        mem: Arc<GuestMemoryMmap>,
        rings: Option<Arc<crate::dirty_ring::DirtyRings>>,
    ) -> Self {
        let mut blocks = Vec::new();
        let mut starts = Vec::new();
        for (i, r) in mem.iter().enumerate() {
            let name = if i == 0 {
                "pc.ram".to_string()
            } else {
                format!("pc.ram.{i}")
            };
            blocks.push(RamBlock {
                name,
                size: r.len(),
            });
            starts.push(r.start_addr().0);
        }
        Self {
            fd,
            mem,
            blocks,
            starts,
            pagemap: memory::Pagemap::open(),
            rings,
            logging: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn gpa(&self, block: usize, page: u64) -> Result<GuestAddress, RamError> {
        match (self.starts.get(block), self.blocks.get(block)) {
            (Some(s), Some(b)) if page < b.pages() => Ok(GuestAddress(s + page * PAGE_SIZE)),
            _ => Err(RamError::OutOfRange { block, page }),
        }
    }
}

impl GuestRam for KvmRam {
    fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    fn read_page(&self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), RamError> {
        let gpa = self.gpa(block, page)?;
        self.mem
            .read_slice(buf, gpa)
            .map_err(|_| RamError::OutOfRange { block, page })
    }

    fn write_page(&self, block: usize, page: u64, data: &[u8]) -> Result<(), RamError> {
        let gpa = self.gpa(block, page)?;
        memory::write_streaming(&self.mem, data, gpa)
            .map_err(|_| RamError::OutOfRange { block, page })
    }

    fn zero_page(&self, block: usize, page: u64) -> Result<(), RamError> {
        let gpa = self.gpa(block, page)?;
        let mut buf = [0u8; PAGE_SIZE as usize];
        self.mem
            .read_slice(&mut buf, gpa)
            .map_err(|_| RamError::OutOfRange { block, page })?;
        if migration::stream::is_zero(&buf) {
            return Ok(());
        }
        self.write_page(block, page, &[0u8; PAGE_SIZE as usize])
    }

    fn start_dirty_log(&self) -> Result<(), RamError> {
        use std::sync::atomic::Ordering;
        if !self.logging.swap(true, Ordering::SeqCst) {
            memory::dirty_log_acquire(&self.fd, &self.mem)
                .map_err(|e| RamError::DirtyLog(Box::new(e)))?;
        }
        // Start from a clean log.
        memory::take_dirty_bitmaps(&self.fd, &self.mem, self.rings.as_deref())
            .map_err(|e| RamError::DirtyLog(Box::new(e)))?;
        Ok(())
    }

    fn sync_dirty_log(&self, bitmaps: &mut [Bitmap]) -> Result<(), RamError> {
        let logs = memory::take_dirty_bitmaps(&self.fd, &self.mem, self.rings.as_deref())
            .map_err(|e| RamError::DirtyLog(Box::new(e)))?;
        for (bm, words) in bitmaps.iter_mut().zip(logs) {
            bm.or_words(&words);
        }
        Ok(())
    }

    fn stop_dirty_log(&self) -> Result<(), RamError> {
        if !self
            .logging
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        memory::dirty_log_release(&self.fd, &self.mem).map_err(|e| RamError::DirtyLog(Box::new(e)))
    }

    fn page_at(&self, gpa: u64) -> Option<(usize, u64)> {
        self.starts
            .iter()
            .zip(&self.blocks)
            .position(|(&s, b)| gpa >= s && gpa - s < b.size)
            .map(|i| (i, (gpa - self.starts[i]) / PAGE_SIZE))
    }

    fn host_mapping(&self, block: usize) -> Option<(*mut u8, usize)> {
        let r = self.mem.iter().nth(block)?;
        Some((r.as_ptr(), r.len() as usize))
    }

    /// See [`memory::Pagemap`]; pages past the block read as populated.
    fn unpopulated(&self, block: usize, first: u64, out: &mut [u64]) -> bool {
        let (Some(pm), Some((host, len))) = (&self.pagemap, self.host_mapping(block)) else {
            return false;
        };
        let pages = (len as u64 / PAGE_SIZE).saturating_sub(first);
        let words = pages.div_ceil(64).min(out.len() as u64) as usize;
        if words == 0
            || pm
                .populated(host as u64 + first * PAGE_SIZE, &mut out[..words])
                .is_err()
        {
            return false;
        }
        out[words..].fill(0);
        for (i, w) in out[..words].iter_mut().enumerate() {
            let valid = pages - 64 * i as u64;
            let mask = if valid >= 64 { !0 } else { (1u64 << valid) - 1 };
            *w = !*w & mask;
        }
        true
    }
}

/// The `globalstate` section.
#[derive(Serialize, Deserialize)]
struct GlobalState {
    running: bool,
}

/// A device state section that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// Serialising a device's state failed.
    #[error("encoding {name}")]
    Encode {
        /// Section name.
        name: String,
        /// Why.
        #[source]
        source: postcard::Error,
    },
    /// A section this machine needs is not in the stream.
    #[error("device state '{name}' instance {instance} is missing from the stream")]
    Missing {
        /// Section name.
        name: String,
        /// Instance.
        instance: u32,
    },
    /// A section of another version.
    #[error("device state '{name}' has version {version}, this minivmm reads {DEVICE_VERSION}")]
    Version {
        /// Section name.
        name: String,
        /// Its version.
        version: u32,
    },
    /// A section that does not decode.
    #[error("device state '{name}' instance {instance} is corrupt")]
    Corrupt {
        /// Section name.
        name: String,
        /// Instance.
        instance: u32,
        /// Why.
        #[source]
        source: postcard::Error,
    },
    /// A section with bytes after its state.
    #[error("device state '{name}' instance {instance} is corrupt: {extra} bytes after its end")]
    Trailing {
        /// Section name.
        name: String,
        /// Instance.
        instance: u32,
        /// How many.
        extra: usize,
    },
    /// A section no device of this machine reads.
    #[error("unknown device state '{name}' instance {instance} in the stream")]
    Unknown {
        /// Section name.
        name: String,
        /// Instance.
        instance: u32,
    },
}

fn blob<T: Serialize>(name: &str, instance: u32, v: &T) -> Result<DeviceBlob, DeviceStateError> {
    Ok(DeviceBlob {
        name: name.into(),
        instance,
        version: DEVICE_VERSION,
        data: postcard::to_allocvec(v).map_err(|source| DeviceStateError::Encode {
            name: name.into(),
            source,
        })?,
    })
}

/// The device sections this machine's state is made of ([`to_blobs`]),
/// each with the longest state it may have: generous bounds on what the
/// encodings take (a vCPU's is ~10 KiB: registers, 4 KiB of XSAVE, the
/// 1 KiB local APIC, MSRs), far below what a hostile stream would need to
/// hurt.
pub fn device_catalog(vcpus: u8) -> migration::stream::DeviceCatalog {
    migration::stream::DeviceCatalog::new()
        .with("cpu", u32::from(vcpus), 256 << 10)
        .with("irqchip", 1, 16 << 10)
        .with("pit", 1, 4 << 10)
        .with("kvmclock", 1, 1 << 10)
        .with("serial", 1, 64 << 10)
        .with("cmos", 1, 4 << 10)
        .with("globalstate", 1, 64)
}

/// Machine state to device blobs.
pub fn to_blobs(st: &MachineState, running: bool) -> Result<Vec<DeviceBlob>, DeviceStateError> {
    let mut out = Vec::new();
    for v in &st.vcpus {
        out.push(blob("cpu", u32::from(v.id), v)?);
    }
    out.push(blob("irqchip", 0, &st.irqchips)?);
    out.push(blob("pit", 0, &st.pit)?);
    out.push(blob("kvmclock", 0, &st.clock)?);
    out.push(blob("serial", 0, &st.serial)?);
    out.push(blob("cmos", 0, &st.cmos)?);
    out.push(blob("globalstate", 0, &GlobalState { running })?);
    Ok(out)
}

fn take<T: for<'de> Deserialize<'de>>(
    blobs: &mut Vec<DeviceBlob>,
    name: &str,
    instance: u32,
) -> Result<T, DeviceStateError> {
    let i = blobs
        .iter()
        .position(|b| b.name == name && b.instance == instance)
        .ok_or_else(|| DeviceStateError::Missing {
            name: name.into(),
            instance,
        })?;
    decode(&blobs.swap_remove(i))
}

/// One blob's state: of this version, decoded whole.
fn decode<T: for<'de> Deserialize<'de>>(b: &DeviceBlob) -> Result<T, DeviceStateError> {
    let (name, instance) = (b.name.clone(), b.instance);
    if b.version != DEVICE_VERSION {
        return Err(DeviceStateError::Version {
            name,
            version: b.version,
        });
    }
    match postcard::take_from_bytes(&b.data) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(DeviceStateError::Trailing {
            name,
            instance,
            extra: rest.len(),
        }),
        Err(source) => Err(DeviceStateError::Corrupt {
            name,
            instance,
            source,
        }),
    }
}

/// Guest-physical addresses of the pages that loading the vCPU state in
/// `blobs` (`vcpus` of them) makes KVM write (see
/// [`crate::cpu::pages_written_on_restore`]); blobs that do not decode
/// name none (the load reports them).
pub fn pages_written_on_load(blobs: &[DeviceBlob], vcpus: u8) -> Vec<u64> {
    let mut pages = Vec::new();
    for b in blobs {
        if b.name != "cpu" || b.instance >= u32::from(vcpus) {
            continue;
        }
        if let Ok(st) = decode::<crate::cpu::VcpuState>(b) {
            pages.extend(crate::cpu::pages_written_on_restore(&st.msrs));
        }
    }
    pages
}

/// Device blobs to machine state; also says whether the source was running.
pub fn from_blobs(
    mut blobs: Vec<DeviceBlob>,
    shape: &VmShape,
) -> Result<(MachineState, bool), DeviceStateError> {
    let mut vcpus = Vec::new();
    for id in 0..shape.vcpus {
        vcpus.push(take(&mut blobs, "cpu", u32::from(id))?);
    }
    let st = MachineState {
        vcpus,
        irqchips: take(&mut blobs, "irqchip", 0)?,
        pit: take(&mut blobs, "pit", 0)?,
        clock: take(&mut blobs, "kvmclock", 0)?,
        serial: take(&mut blobs, "serial", 0)?,
        cmos: take(&mut blobs, "cmos", 0)?,
    };
    let g: GlobalState = take(&mut blobs, "globalstate", 0)?;
    if let Some(b) = blobs.first() {
        return Err(DeviceStateError::Unknown {
            name: b.name.clone(),
            instance: b.instance,
        });
    }
    Ok((st, g.running))
}

/// The configuration both sides must share.
pub fn machine_config(shape: &VmShape, ram: &KvmRam) -> migration::MachineConfig {
    migration::MachineConfig {
        machine: "minivmm-pc".into(),
        vcpus: u32::from(shape.vcpus),
        cpu: shape.cpu.name().into(),
        blocks: ram.blocks().to_vec(),
        page_size: PAGE_SIZE as u32,
    }
}

//! Linux direct boot: kernel and initrd loading, the zero page, e820.
//!
//! Both an uncompressed ELF `vmlinux` and a `bzImage` are entered through
//! the Linux x86 64-bit boot protocol (Documentation/arch/x86/boot.rst): the
//! vCPU starts in long mode at the kernel's 64-bit entry with `rsi` pointing
//! at the zero page (`boot_params`). For a vmlinux that is the ELF entry;
//! for a bzImage, the protected-mode kernel's load address + 0x200. This
//! module writes guest memory below 1 MiB and the images; `cpu` sets the
//! registers.
//!
//! Guest-physical map of the boot structures:
//!
//! | address | what |
//! |---|---|
//! | 0x500 | GDT (`cpu`) |
//! | 0x7000 | zero page (`boot_params`) |
//! | 0x8ff0 | initial stack top |
//! | 0x9000-0xbfff | identity page tables (`cpu`) |
//! | 0x20000 | kernel command line |
//! | 0x9fc00 | MP table (`mptable`) |
//! | 0x100000 / ELF p_paddr | kernel |
//! | top of low RAM | initrd |

use std::fs::File;
use std::path::PathBuf;

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::memory::{GuestMemoryMmap, MemLayout, PAGE_SIZE};
use crate::mptable::MPTABLE_START;

/// Zero page address.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Command line address.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we pass.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Where a bzImage's protected-mode kernel goes, and where RAM proper starts.
pub const HIMEM_START: u64 = 0x100000;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Errors of the boot module.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {0}")]
    KernelFile(PathBuf, #[source] std::io::Error),
    /// The kernel is neither an ELF vmlinux nor a bzImage we can load.
    #[error("cannot load kernel {0}: not a loadable ELF vmlinux ({1}) nor bzImage ({2})")]
    KernelFormat(PathBuf, loader::Error, loader::Error),
    /// The initrd file cannot be read.
    #[error("cannot read initrd {0}")]
    InitrdFile(PathBuf, #[source] std::io::Error),
    /// The initrd does not fit below the kernel's limit.
    #[error("initrd of {0} bytes does not fit in guest RAM below {1:#x}")]
    InitrdTooBig(u64, u64),
    /// The command line is too long or malformed.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing guest memory failed.
    #[error("writing boot data at {0:#x}")]
    GuestWrite(u64, #[source] vm_memory::GuestMemoryError),
}

/// The images and command line to boot.
#[derive(Clone, Debug)]
pub struct BootSpec {
    /// Kernel image path.
    pub kernel: PathBuf,
    /// Initrd path.
    pub initrd: Option<PathBuf>,
    /// Full kernel command line.
    pub cmdline: String,
}

/// Where the kernel was put and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    /// 64-bit entry point.
    pub entry: u64,
}

// The field is read as bytes, through ByteValued, when written to guest memory.
#[allow(dead_code)]
#[derive(Clone, Copy, Default)]
struct BootParamsWrapper(boot_params);
// SAFETY: boot_params is a plain-old-data C struct (integers and arrays of
// them); every byte pattern is a valid value.
unsafe impl ByteValued for BootParamsWrapper {}

fn write<T: ByteValued>(mem: &GuestMemoryMmap, addr: u64, val: T) -> Result<(), BootError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|e| BootError::GuestWrite(addr, e))
}

/// Load kernel, initrd and command line into `mem` and build the zero page.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &MemLayout,
    spec: &BootSpec,
) -> Result<BootEntry, BootError> {
    let mut kfile =
        File::open(&spec.kernel).map_err(|e| BootError::KernelFile(spec.kernel.clone(), e))?;
    let himem = Some(GuestAddress(HIMEM_START));
    let (result, entry) = match Elf::load(mem, None, &mut kfile, himem) {
        Ok(r) => {
            let entry = r.kernel_load.0;
            (r, entry)
        }
        Err(elf_err) => match BzImage::load(mem, None, &mut kfile, himem) {
            Ok(r) => {
                let entry = r.kernel_load.0 + 0x200;
                (r, entry)
            }
            Err(bz_err) => {
                return Err(BootError::KernelFormat(
                    spec.kernel.clone(),
                    elf_err,
                    bz_err,
                ))
            }
        },
    };

    let mut params = boot_params::default();
    if let Some(hdr) = result.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        params.hdr.initrd_addr_max = 0x7fff_ffff;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;

    // Command line.
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(&spec.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = spec.cmdline.len() as u32 + 1;

    // Initrd at the top of low RAM, below the kernel's limit.
    if let Some(path) = &spec.initrd {
        let data = std::fs::read(path).map_err(|e| BootError::InitrdFile(path.clone(), e))?;
        let limit = layout
            .low_end()
            .min(u64::from(params.hdr.initrd_addr_max) + 1);
        let size = data.len() as u64;
        let addr = limit
            .checked_sub(size)
            .map(|a| a & !(PAGE_SIZE - 1))
            .filter(|&a| a >= result.kernel_end.max(HIMEM_START))
            .ok_or(BootError::InitrdTooBig(size, limit))?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|e| BootError::GuestWrite(addr, e))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    // e820: low RAM up to the MP table, reserved to 1 MiB, then RAM.
    let mut e820 = vec![
        (0, MPTABLE_START, E820_RAM),
        (MPTABLE_START, HIMEM_START - MPTABLE_START, E820_RESERVED),
        (HIMEM_START, layout.low_end() - HIMEM_START, E820_RAM),
    ];
    for &(start, len) in &layout.ranges[1..] {
        e820.push((start, len, E820_RAM));
    }
    for (i, &(addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = e820.len() as u8;

    write(mem, ZERO_PAGE_START, BootParamsWrapper(params))?;
    Ok(BootEntry { entry })
}

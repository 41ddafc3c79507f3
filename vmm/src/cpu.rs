//! vCPU architecture state: the CPU model (CPUID), boot registers, MSRs,
//! and the complete saved state of one vCPU.
//!
//! The default model, `minivmm64`, is a fixed baseline: the host's
//! KVM-supported CPUID masked to a conservative feature set, so that two
//! hosts of the same kind present the same CPU and a guest can migrate
//! between them. `-cpu host` passes through everything KVM supports.
//!
//! Some hosts (the `kvm_pvm` software hypervisor) cannot make the guest's
//! CPUID instruction honour what the VMM sets; [`CpuModel::guest_cmdline`]
//! then gives kernel switches that hide the same features from inside.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::{BOOT_STACK_POINTER, ZERO_PAGE_START};
use crate::memory::GuestMemoryMmap;

/// Errors of the cpu module.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Writing page tables or the GDT failed.
    #[error("writing boot page tables")]
    GuestWrite(#[source] vm_memory::GuestMemoryError),
    /// An unknown `-cpu` model.
    #[error("unknown CPU model '{0}' (known: minivmm64, host)")]
    UnknownModel(String),
    /// A saved state does not fit this vCPU.
    #[error("vCPU state: {0}")]
    State(String),
}

/// Which CPU the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuModel {
    /// The fixed baseline.
    Minivmm64,
    /// Everything KVM supports on this host.
    Host,
}

// CPUID leaf 1 ECX
const ECX_SSE3: u32 = 1 << 0;
const ECX_PCLMUL: u32 = 1 << 1;
const ECX_SSSE3: u32 = 1 << 9;
const ECX_SSE41: u32 = 1 << 19;
const ECX_SSE42: u32 = 1 << 20;
const ECX_MOVBE: u32 = 1 << 22;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_AES: u32 = 1 << 25;
const ECX_RDRAND: u32 = 1 << 30;
const ECX_HYPERVISOR: u32 = 1 << 31;
// CPUID leaf 1 EDX: FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA
// CMOV PAT PSE36 CLFSH MMX FXSR SSE SSE2
const EDX_BASE: u32 = 0x0000_ffff & !(1 << 10)
    | (1 << 16)
    | (1 << 17)
    | (1 << 19)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);
const EDX_HTT: u32 = 1 << 28;
// Leaf 7.0 EBX: FSGSBASE, SMEP
const L7_EBX_BASE: u32 = (1 << 0) | (1 << 7);
// Leaf 0x80000001 ECX: LAHF; EDX: SYSCALL, NX, PDPE1GB, RDTSCP, LM
const EXT_ECX_BASE: u32 = 1 << 0;
const EXT_EDX_BASE: u32 = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29);
// Leaf 0x80000008 EBX: XSAVEERPTR (FXSAVE/FXRSTOR always save the error pointers)
const EXT8_EBX_XSAVEERPTR: u32 = 1 << 2;

// Leaf 0x40000001 EAX, KVM paravirtual features the baseline offers (QEMU's
// defaults): CLOCKSOURCE, NOP_IO_DELAY, CLOCKSOURCE2, ASYNC_PF, STEAL_TIME,
// PV_EOI, ASYNC_PF_INT, CLOCKSOURCE_STABLE_BIT. Hypercall-based features (PV
// IPIs, TLB flush, sched yield, unhalt) stay off: fewer exits to reason about,
// and the PVM host stalls a vCPU in the PV IPI hypercall.
const KVM_FEATURES_BASE: u32 =
    (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 14) | (1 << 24);

/// Kernel switches that hide, from inside the guest, the features the
/// baseline model leaves out, for hosts whose CPUID the VMM cannot enforce:
/// XSAVE, SMAP (cpuid bit 308), CX16 (141), POPCNT (151), ERMS (297), FSRM (580).
const PVM_HIDE_SWITCHES: &str = "noxsave clearcpuid=308,141,151,297,580";

impl CpuModel {
    /// Parse a `-cpu` value.
    pub fn parse(s: &str) -> Result<Self, CpuError> {
        match s.split(',').next().unwrap_or("") {
            "minivmm64" | "max" | "qemu64" => Ok(Self::Minivmm64),
            "host" => Ok(Self::Host),
            _ => Err(CpuError::UnknownModel(s.to_string())),
        }
    }

    /// The name reported to users.
    pub fn name(self) -> &'static str {
        match self {
            Self::Minivmm64 => "minivmm64",
            Self::Host => "host",
        }
    }

    /// Kernel command-line switches this model needs on this host.
    pub fn guest_cmdline(self) -> Option<&'static str> {
        (self == Self::Minivmm64 && host_ignores_cpuid()).then_some(PVM_HIDE_SWITCHES)
    }

    /// The CPUID table for vCPU `id` of `count`.
    pub fn cpuid(self, kvm: &Kvm, id: u8, count: u8) -> Result<CpuId, CpuError> {
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| CpuError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let baseline = self == Self::Minivmm64;
        for e in cpuid.as_mut_slice() {
            match (e.function, e.index) {
                (1, _) => {
                    if baseline {
                        e.ecx &= ECX_SSE3
                            | ECX_PCLMUL
                            | ECX_SSSE3
                            | ECX_SSE41
                            | ECX_SSE42
                            | ECX_MOVBE
                            | ECX_TSC_DEADLINE
                            | ECX_AES
                            | ECX_RDRAND;
                        e.edx &= EDX_BASE;
                    }
                    e.ecx |= ECX_HYPERVISOR;
                    e.ebx = (u32::from(id) << 24)
                        | (u32::from(count) << 16)
                        | (8 << 8)
                        | (e.ebx & 0xff);
                    if count > 1 {
                        e.edx |= EDX_HTT;
                    }
                }
                (4, _) => {
                    // Cores per package - 1 in bits 31:26.
                    e.eax = (e.eax & 0x03ff_ffff) | (u32::from(count.saturating_sub(1)) << 26);
                }
                (7, 0) if baseline => {
                    e.ebx &= L7_EBX_BASE;
                    e.ecx = 0;
                    e.edx = 0;
                }
                (7, _) if baseline => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                (0xb, _) | (0x1f, _) => e.edx = u32::from(id),
                (0xd, _) if baseline => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                (0x8000_0001, _) if baseline => {
                    e.ecx &= EXT_ECX_BASE;
                    e.edx &= EXT_EDX_BASE;
                }
                (0x8000_0008, _) => e.ebx |= EXT8_EBX_XSAVEERPTR,
                (0x4000_0001, _) if baseline => e.eax &= KVM_FEATURES_BASE,
                _ => {}
            }
        }
        Ok(cpuid)
    }
}

/// True where KVM cannot make the guest's CPUID instruction follow
/// KVM_SET_CPUID2 (the PVM software hypervisor).
pub fn host_ignores_cpuid() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

// MSRs written at boot.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSRs this host lets us read, from KVM's index list: what we save and
/// restore. MSRs that fail a test read are left out.
pub fn migratable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, CpuError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| CpuError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|_| CpuError::State("msr buffer".into()))?;
        if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            ok.push(index);
        }
    }
    // TSC first, so that restoring it before the TSC-relative MSRs
    // (e.g. the TSC deadline) keeps their meaning.
    ok.sort_by_key(|&i| i != MSR_IA32_TSC);
    Ok(ok)
}

fn set_msr_list(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), CpuError> {
    for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| CpuError::State("msr buffer".into()))?;
        let n = vcpu
            .set_msrs(&msrs)
            .map_err(|e| CpuError::Kvm("KVM_SET_MSRS", e))?;
        if n != chunk.len() {
            return Err(CpuError::State(format!(
                "KVM_SET_MSRS stopped at MSR {:#x}",
                chunk[n].index
            )));
        }
    }
    Ok(())
}

fn get_msr_list(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, CpuError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| CpuError::State("msr buffer".into()))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| CpuError::Kvm("KVM_GET_MSRS", e))?;
        if n != chunk.len() {
            return Err(CpuError::State(format!(
                "KVM_GET_MSRS stopped at MSR {:#x}",
                chunk[n]
            )));
        }
        out.extend_from_slice(msrs.as_slice());
    }
    Ok(out)
}

// Boot GDT and page tables.
const GDT_ADDR: u64 = 0x500;
const PML4_ADDR: u64 = 0x9000;
const PDPTE_ADDR: u64 = 0xa000;
const PDE_ADDR: u64 = 0xb000;
const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base & 0xff00_0000) << 32)
        | (u64::from(flags & 0xf0ff) << 40)
        | (u64::from(limit & 0x000f_0000) << 32)
        | (u64::from(base & 0x00ff_ffff) << 16)
        | u64::from(limit & 0x0000_ffff)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let flags = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32,
        selector: index * 8,
        type_: flags(40, 0xf),
        present: flags(47, 1),
        dpl: flags(45, 3),
        db: flags(54, 1),
        s: flags(44, 1),
        l: flags(53, 1),
        g: flags(55, 1),
        avl: flags(52, 1),
        unusable: 0,
        padding: 0,
    }
}

/// Write the boot GDT and identity page tables (first 1 GiB, 2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff), // code, 64-bit
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(CpuError::GuestWrite)?;
    }
    mem.write_obj(PDPTE_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .map_err(CpuError::GuestWrite)?;
    mem.write_obj(PDE_ADDR | 0x3, GuestAddress(PDPTE_ADDR))
        .map_err(CpuError::GuestWrite)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_ADDR + i * 8))
            .map_err(CpuError::GuestWrite)?;
    }
    Ok(())
}

/// Put the boot vCPU in long mode at `entry` with the zero page in rsi.
/// Other vCPUs only get MSRs and FPU; they wait for INIT/SIPI from the guest.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, bsp: bool, entry: u64) -> Result<(), CpuError> {
    let msrs: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    set_msr_list(vcpu, &msrs)?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| CpuError::Kvm("KVM_SET_FPU", e))?;
    if !bsp {
        return Ok(());
    }

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| CpuError::Kvm("KVM_GET_SREGS", e))?;
    let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
    let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
    let tss = segment(gdt_entry(0x808b, 0, 0xfffff), 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| CpuError::Kvm("KVM_SET_SREGS", e))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| CpuError::Kvm("KVM_SET_REGS", e))?;
    Ok(())
}

/// Program LINT0 as ExtINT and LINT1 as NMI, as firmware does.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| CpuError::Kvm("KVM_GET_LAPIC", e))?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = u32::from_le_bytes(bytes);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| CpuError::Kvm("KVM_SET_LAPIC", e))
}

/// KVM's paravirtual MSRs that name a guest area (`MSR_KVM_*`): the wall
/// clock (written as it is set), and, enabled by bit 0, the system time
/// (kvmclock), async page faults, steal time and PV EOI.
const MSR_KVM_WALL_CLOCK: [u32; 2] = [0x11, 0x4b56_4d00];
const MSR_KVM_ENABLED_AREAS: [u32; 5] = [0x12, 0x4b56_4d01, 0x4b56_4d02, 0x4b56_4d03, 0x4b56_4d04];
/// The largest of those areas (steal time, 64 bytes).
const PV_AREA_MAX: u64 = 64;

/// Guest-physical addresses of the pages KVM writes by itself when a
/// vCPU's `msrs` are restored or soon after (the areas its paravirtual
/// MSRs point at: setting the kvmclock MSR maps and writes its page in
/// the ioctl), each page of an area that crosses one.
pub fn pages_written_on_restore(msrs: &[kvm_msr_entry]) -> Vec<u64> {
    let mut out = Vec::new();
    for m in msrs {
        let gpa = if MSR_KVM_WALL_CLOCK.contains(&m.index) && m.data != 0 {
            m.data
        } else if MSR_KVM_ENABLED_AREAS.contains(&m.index) && m.data & 1 != 0 {
            m.data & !0x3f
        } else {
            continue;
        };
        out.push(gpa & !0xfff);
        let last = gpa.saturating_add(PV_AREA_MAX - 1) & !0xfff;
        if last != gpa & !0xfff {
            out.push(last);
        }
    }
    out
}

/// Everything KVM holds for one vCPU, in restore order.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (= APIC ID).
    pub id: u8,
    /// Multiprocessing state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers (TSC first, kvmclock included).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            mp_state: self.mp_state,
            regs: self.regs,
            sregs: self.sregs,
            // kvm_xsave ends in a flexible array member and is not Clone;
            // the legacy 4 KiB region is all KVM_GET_XSAVE fills.
            xsave: kvm_xsave {
                region: self.xsave.region,
                ..Default::default()
            },
            xcrs: self.xcrs,
            debugregs: self.debugregs,
            lapic: self.lapic,
            msrs: self.msrs.clone(),
            events: self.events,
        }
    }
}

/// Set the saved TSC of `st` to 0 (a reset's power-on value).
pub fn zero_tsc(st: &mut VcpuState) {
    for m in st.msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC) {
        m.data = 0;
    }
}

/// Read the full state of a stopped vCPU.
pub fn save_vcpu(vcpu: &VcpuFd, id: u8, msr_list: &[u32]) -> Result<VcpuState, CpuError> {
    let k = |what| move |e| CpuError::Kvm(what, e);
    Ok(VcpuState {
        id,
        mp_state: vcpu.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(k("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(k("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(k("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(k("KVM_GET_XCRS"))?,
        debugregs: vcpu.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(k("KVM_GET_LAPIC"))?,
        msrs: get_msr_list(vcpu, msr_list)?,
        events: vcpu.get_vcpu_events().map_err(k("KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Load a state saved by [`save_vcpu`] into a stopped vCPU.
pub fn restore_vcpu(vcpu: &VcpuFd, st: &VcpuState) -> Result<(), CpuError> {
    let k = |what| move |e| CpuError::Kvm(what, e);
    vcpu.set_mp_state(st.mp_state)
        .map_err(k("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&st.regs).map_err(k("KVM_SET_REGS"))?;
    vcpu.set_sregs(&st.sregs).map_err(k("KVM_SET_SREGS"))?;
    // SAFETY: `st.xsave` is a complete kvm_xsave of the legacy 4 KiB size,
    // which is what KVM_SET_XSAVE reads.
    unsafe { vcpu.set_xsave(&st.xsave) }.map_err(k("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&st.xcrs).map_err(k("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&st.debugregs)
        .map_err(k("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&st.lapic).map_err(k("KVM_SET_LAPIC"))?;
    set_msr_list(vcpu, &st.msrs)?;
    vcpu.set_vcpu_events(&st.events)
        .map_err(k("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_round_trip() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        let s = segment(e, 1);
        assert_eq!(s.selector, 8);
        assert_eq!(s.l, 1);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.limit, 0xfffff);
        assert_eq!(s.present, 1);
        assert_eq!(CpuModel::parse("host").unwrap(), CpuModel::Host);
        assert!(CpuModel::parse("pentium").is_err());
    }

    #[test]
    fn paravirtual_areas_name_their_pages() {
        let msr = |index, data| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let msrs = [
            msr(0x10, 0x1234_5678),        // TSC: no area
            msr(0x4b56_4d01, 0x0012_3001), // kvmclock, enabled
            msr(0x4b56_4d03, 0x0045_6fc0), // steal time, off
            msr(0x4b56_4d00, 0x0078_9ff8), // wall clock, crosses a page
            msr(0x4b56_4d02, 0x0001_0031), // async PF, enabled with flags
            msr(0x4b56_4d04, 0),           // PV EOI, off
        ];
        assert_eq!(
            pages_written_on_restore(&msrs),
            [0x12_3000, 0x78_9000, 0x78_a000, 0x1_0000]
        );
    }
}

//! The virtual machine: KVM VM fd, in-kernel irqchip and PIT, guest memory,
//! devices, vCPU threads, and the machine state that reset and migration
//! save and load.
//!
//! Run state is owned by the control thread, which calls [`Vm::pause`] and
//! [`Vm::resume`]. While paused, the guest clock is frozen (KVM_GET_CLOCK
//! at pause, KVM_SET_CLOCK at resume), as QEMU does, so a stopped guest does
//! not see time jump.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootSpec};
use crate::cpu::{self, CpuModel, VcpuState};
use crate::dirty_ring::{self, DirtyRings};
use crate::memory::{self, GuestMemoryMmap, MemLayout, PAGE_SIZE};
use crate::mptable;
use crate::throttle::{Throttle, ThrottleTimer};
use crate::vcpu::{VcpuContext, VcpuError, VcpuEvent, VcpuHandle};
use devices::cmos::{Cmos, CmosState, CMOS_BASE};
use devices::i8042::{I8042, I8042_BASE};
use devices::serial::{SerialOut, SerialPort, SerialPortState, COM1_BASE, COM1_IRQ};
use devices::PioBus;

const TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors building or driving the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("{0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// Memory setup.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// CPU setup.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// vCPU thread.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Device setup or state.
    #[error("device {0}: {1}")]
    Device(&'static str, String),
    /// A saved machine state that does not fit this VM.
    #[error("machine state: {0}")]
    State(String),
}

/// Static shape of the VM: what both ends of a migration must agree on.
#[derive(Clone, Debug)]
pub struct VmShape {
    /// Memory layout.
    pub layout: MemLayout,
    /// vCPU count.
    pub vcpus: u8,
    /// CPU model.
    pub cpu: CpuModel,
    /// Back all RAM at start and after each discard (`-mem-prealloc`).
    pub prealloc: bool,
    /// KVM dirty ring entries per vCPU (0: the dirty bitmap). Local to
    /// this side of a migration.
    pub dirty_ring: u32,
}

/// The state of the whole machine except RAM.
#[derive(Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// Master PIC, slave PIC, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock (guest nanoseconds).
    pub clock: kvm_clock_data,
    /// COM1.
    pub serial: SerialPortState,
    /// CMOS.
    pub cmos: CmosState,
}

/// A running (or paused) VM.
pub struct Vm {
    fd: Arc<VmFd>,
    /// KVM's dirty rings, with `-accel kvm,dirty-ring-size=N`.
    dirty_rings: Option<Arc<DirtyRings>>,
    mem: Arc<GuestMemoryMmap>,
    shape: VmShape,
    boot: BootSpec,
    serial: Arc<Mutex<SerialPort>>,
    cmos: Arc<Mutex<Cmos>>,
    /// Written by the i8042 when the guest asks for a reset.
    pub reset_evt: EventFd,
    _serial_irq: EventFd,
    /// auto-converge's vCPU throttle.
    throttle: Arc<Throttle>,
    /// Kicks throttled vCPUs; declared before `vcpus`, so it stops before
    /// their threads end.
    _throttle_timer: ThrottleTimer,
    /// The vCPU threads' ids (0 until a thread has started).
    vcpu_tids: Vec<Arc<AtomicI32>>,
    vcpus: Vec<VcpuHandle>,
    initial: Option<MachineState>,
    running: bool,
    /// The vCPUs have run at least once (RAM may hold guest data).
    ran: bool,
    frozen_clock: Option<kvm_clock_data>,
}

impl Vm {
    /// Build a VM, load the kernel, and park its vCPUs.
    pub fn new(
        shape: VmShape,
        boot: BootSpec,
        serial_out: SerialOut,
        notify: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
    ) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VM", e))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(|e| VmError::Ioctl("KVM_SET_TSS_ADDR", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Ioctl("KVM_CREATE_PIT2", e))?;

        let mem = Arc::new(shape.layout.allocate()?);
        if shape.prealloc {
            memory::populate(&mem)?;
        }
        memory::set_memslots(&fd, &mem, false)?;

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmError::Device("serial", e.to_string()))?;
        fd.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(|e| VmError::Ioctl("KVM_IRQFD", e))?;
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmError::Device("i8042", e.to_string()))?;
        let serial = Arc::new(Mutex::new(
            SerialPort::new(&serial_irq, serial_out)
                .map_err(|e| VmError::Device("serial", e.to_string()))?,
        ));
        let cmos = Arc::new(Mutex::new(Cmos::new()));
        let i8042 = I8042::new(&reset_evt).map_err(|e| VmError::Device("i8042", e.to_string()))?;
        let mut bus = PioBus::new();
        let dev_err = |e: devices::bus::BusError| VmError::Device("bus", e.to_string());
        bus.insert(COM1_BASE, 8, serial.clone()).map_err(dev_err)?;
        bus.insert(I8042_BASE, 5, Arc::new(Mutex::new(i8042)))
            .map_err(dev_err)?;
        bus.insert(CMOS_BASE, 2, cmos.clone()).map_err(dev_err)?;
        let bus = Arc::new(bus);

        let entry = Self::load_images(&mem, &shape, &boot)?;
        if shape.dirty_ring > 0 {
            dirty_ring::enable(&fd, shape.dirty_ring)
                .map_err(|e| VmError::Device("dirty ring", migration::error_chain(&e)))?;
        }
        let fd = Arc::new(fd);

        let mut vcpu_fds = Vec::new();
        for id in 0..shape.vcpus {
            let v = fd
                .create_vcpu(u64::from(id))
                .map_err(|e| VmError::Ioctl("KVM_CREATE_VCPU", e))?;
            let cpuid = shape.cpu.cpuid(&kvm, id, shape.vcpus)?;
            v.set_cpuid2(&cpuid)
                .map_err(|e| VmError::Ioctl("KVM_SET_CPUID2", e))?;
            cpu::setup_lapic(&v)?;
            cpu::setup_boot_vcpu(&v, id == 0, entry.entry)?;
            vcpu_fds.push(v);
        }
        let msr_list = Arc::new(cpu::migratable_msrs(&kvm, &vcpu_fds[0])?);
        let dirty_rings = if shape.dirty_ring > 0 {
            Some(Arc::new(
                DirtyRings::map(fd.clone(), mem.clone(), &vcpu_fds, shape.dirty_ring)
                    .map_err(|e| VmError::Device("dirty ring", migration::error_chain(&e)))?,
            ))
        } else {
            None
        };
        let throttle = Throttle::new(vcpu_fds.len());
        let vcpu_tids: Vec<Arc<AtomicI32>> = vcpu_fds
            .iter()
            .map(|_| Arc::new(AtomicI32::new(0)))
            .collect();
        let mut vcpus = Vec::new();
        for (id, v) in vcpu_fds.into_iter().enumerate() {
            let ctx = VcpuContext {
                bus: bus.clone(),
                mem: mem.clone(),
                notify: notify.clone(),
                msr_list: msr_list.clone(),
                throttle: throttle.clone(),
                tid: vcpu_tids[id].clone(),
                dirty_rings: dirty_rings.clone(),
            };
            vcpus.push(VcpuHandle::spawn(id as u8, v, ctx)?);
        }
        let threads = vcpus.iter().filter_map(VcpuHandle::pthread).collect();
        let throttle_timer =
            ThrottleTimer::start(throttle.clone(), threads, crate::vcpu::kick_signal())
                .map_err(|e| VmError::Device("vcpu-throttle", e.to_string()))?;

        let mut vm = Self {
            fd,
            dirty_rings,
            mem,
            shape,
            boot,
            serial,
            cmos,
            reset_evt,
            _serial_irq: serial_irq,
            throttle,
            _throttle_timer: throttle_timer,
            vcpu_tids,
            vcpus,
            initial: None,
            running: false,
            ran: false,
            frozen_clock: None,
        };
        vm.initial = Some(vm.save_state()?);
        Ok(vm)
    }

    fn load_images(
        mem: &GuestMemoryMmap,
        shape: &VmShape,
        boot: &BootSpec,
    ) -> Result<boot::BootEntry, VmError> {
        let entry = boot::load(mem, &shape.layout, boot)?;
        mptable::write(mem, shape.vcpus)?;
        cpu::write_boot_tables(mem)?;
        Ok(entry)
    }

    /// What the dirty limit needs of this VM (`None`: no dirty rings).
    pub fn limit_vm(&self) -> Option<crate::dirtylimit::LimitVm> {
        Some(crate::dirtylimit::LimitVm {
            fd: self.fd.clone(),
            mem: self.mem.clone(),
            rings: self.dirty_rings.clone()?,
            throttle: self.throttle.clone(),
        })
    }

    /// auto-converge: throttle the vCPUs to `pct` % (0: off).
    pub fn set_throttle(&self, pct: u8) {
        self.throttle.set(pct);
    }

    /// KVM's dirty rings, if this VM tracks dirty pages with them.
    pub fn dirty_rings(&self) -> Option<&Arc<DirtyRings>> {
        self.dirty_rings.as_ref()
    }

    /// The vCPU threads' ids, in vCPU order.
    pub fn vcpu_threads(&self) -> Vec<i32> {
        self.vcpu_tids
            .iter()
            .map(|t| t.load(Ordering::SeqCst))
            .collect()
    }

    /// The VM's shape.
    pub fn shape(&self) -> &VmShape {
        &self.shape
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// The KVM VM fd.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The serial port.
    pub fn serial(&self) -> &Arc<Mutex<SerialPort>> {
        &self.serial
    }

    /// Are the vCPUs running?
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Stop all vCPUs and freeze the guest clock. Idempotent.
    pub fn pause(&mut self) -> Result<(), VmError> {
        if !self.running {
            return Ok(());
        }
        let acks = self
            .vcpus
            .iter()
            .map(|v| v.request_pause())
            .collect::<Result<Vec<_>, _>>()?;
        for (v, ack) in self.vcpus.iter().zip(acks) {
            ack.recv().map_err(|_| VcpuError::Gone(v.id()))?;
        }
        self.parked()
    }

    /// Every vCPU has parked: the VM is paused and its clock frozen.
    fn parked(&mut self) -> Result<(), VmError> {
        self.running = false;
        let clock = self
            .fd
            .get_clock()
            .map_err(|e| VmError::Ioctl("KVM_GET_CLOCK", e))?;
        self.frozen_clock = Some(clock);
        Ok(())
    }

    /// Let all vCPUs run, unfreezing the clock. Idempotent.
    pub fn resume(&mut self) -> Result<(), VmError> {
        if self.running {
            return Ok(());
        }
        self.ran = true;
        if let Some(clock) = self.frozen_clock.take() {
            let c = kvm_clock_data {
                clock: clock.clock,
                ..Default::default()
            };
            self.fd
                .set_clock(&c)
                .map_err(|e| VmError::Ioctl("KVM_SET_CLOCK", e))?;
        }
        for v in &self.vcpus {
            v.resume()?;
        }
        self.running = true;
        Ok(())
    }

    /// Save everything but RAM. The VM must be paused.
    pub fn save_state(&mut self) -> Result<MachineState, VmError> {
        if self.running {
            return Err(VmError::State("cannot save a running VM".into()));
        }
        let pending = self
            .vcpus
            .iter()
            .map(|v| v.request_save())
            .collect::<Result<Vec<_>, _>>()?;
        let vcpus = pending
            .into_iter()
            .map(|p| p.wait())
            .collect::<Result<_, _>>()?;
        self.save_with(vcpus)
    }

    /// Pause (if running) and save everything but RAM; each vCPU thread
    /// reads its state as it parks.
    pub fn pause_and_save(&mut self) -> Result<MachineState, VmError> {
        if !self.running {
            return self.save_state();
        }
        let pending = self
            .vcpus
            .iter()
            .map(|v| v.request_pause_save())
            .collect::<Result<Vec<_>, _>>()?;
        // Wait for every vCPU before looking at any result: all are parked
        // once this loop ends, whatever failed.
        let states: Vec<_> = pending.into_iter().map(|p| p.wait()).collect();
        self.parked()?;
        let vcpus = states.into_iter().collect::<Result<_, _>>()?;
        self.save_with(vcpus)
    }

    /// The rest of the machine state around the vCPU states.
    fn save_with(&mut self, vcpus: Vec<VcpuState>) -> Result<MachineState, VmError> {
        let mut irqchips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(|e| VmError::Ioctl("KVM_GET_IRQCHIP", e))?;
            irqchips.push(chip);
        }
        let pit = self
            .fd
            .get_pit2()
            .map_err(|e| VmError::Ioctl("KVM_GET_PIT2", e))?;
        let clock = match self.frozen_clock {
            Some(c) => c,
            None => self
                .fd
                .get_clock()
                .map_err(|e| VmError::Ioctl("KVM_GET_CLOCK", e))?,
        };
        Ok(MachineState {
            vcpus,
            irqchips,
            pit,
            clock,
            serial: devices::bus::lock(&self.serial).save(),
            cmos: devices::bus::lock(&self.cmos).save(),
        })
    }

    /// Load a machine state. The VM must be paused; it stays paused with the
    /// saved clock frozen until [`Vm::resume`].
    pub fn restore_state(&mut self, st: &MachineState) -> Result<(), VmError> {
        if self.running {
            return Err(VmError::State("cannot restore into a running VM".into()));
        }
        if st.vcpus.len() != self.vcpus.len() {
            return Err(VmError::State(format!(
                "{} vCPUs saved, this VM has {}",
                st.vcpus.len(),
                self.vcpus.len()
            )));
        }
        if st.irqchips.len() != 3 {
            return Err(VmError::State(format!(
                "{} irqchips saved, want 3",
                st.irqchips.len()
            )));
        }
        for chip in &st.irqchips {
            self.fd
                .set_irqchip(chip)
                .map_err(|e| VmError::Ioctl("KVM_SET_IRQCHIP", e))?;
        }
        self.fd
            .set_pit2(&st.pit)
            .map_err(|e| VmError::Ioctl("KVM_SET_PIT2", e))?;
        for (v, s) in self.vcpus.iter().zip(&st.vcpus) {
            if s.id != v.id() {
                return Err(VmError::State(format!(
                    "vCPU {} state given to vCPU {}",
                    s.id,
                    v.id()
                )));
            }
        }
        // All vCPU threads load at once (a migration's downtime waits on it).
        let pending = self
            .vcpus
            .iter()
            .zip(&st.vcpus)
            .map(|(v, s)| v.request_restore(s.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        for p in pending {
            p.wait()?;
        }
        devices::bus::lock(&self.serial)
            .restore(&st.serial)
            .map_err(|e| VmError::Device("serial", e.to_string()))?;
        devices::bus::lock(&self.cmos)
            .restore(&st.cmos)
            .map_err(|e| VmError::Device("cmos", e))?;
        self.frozen_clock = Some(st.clock);
        Ok(())
    }

    /// Reset the machine: reload the kernel and initrd and put every device
    /// and vCPU back in its power-on state. Keeps the run state.
    pub fn reset(&mut self) -> Result<(), VmError> {
        let was_running = self.running;
        self.pause()?;
        Self::load_images(&self.mem, &self.shape, &self.boot)?;
        let mut initial = self
            .initial
            .clone()
            .ok_or_else(|| VmError::State("no power-on state".into()))?;
        // Time keeps going across a reset.
        initial.clock = self
            .fd
            .get_clock()
            .map_err(|e| VmError::Ioctl("KVM_GET_CLOCK", e))?;
        // The TSC starts again from 0 on every vCPU, as at power-on (and as
        // QEMU resets it): KVM synchronises host writes of 0 across vCPUs,
        // whereas the same non-zero value written more than a second apart
        // (vCPU threads held back by a CPU quota) leaves them skewed.
        for v in &mut initial.vcpus {
            cpu::zero_tsc(v);
        }
        self.restore_state(&initial)?;
        if was_running {
            self.resume()?;
        }
        Ok(())
    }

    /// Drop all RAM contents (back to zero pages), e.g. before an incoming
    /// migration fills it. With `-mem-prealloc` the backing stays: if the
    /// guest never ran, only the pages the VMM wrote (kernel, initrd, boot
    /// tables: its write bitmap says which) are cleared in place; otherwise
    /// all RAM is dropped and backed again.
    ///
    /// Without `-mem-prealloc`, huge pages stay off until [`Vm::ram_loaded`]:
    /// a migration writes pages scattered over RAM, and each first write
    /// into a huge page would allocate and clear 2 MiB for one 4 KiB page
    /// (a 256 MiB guest with 97 MiB of pages: 112 ms total-time without,
    /// 285 ms with, on the test host).
    pub fn discard_ram(&self) -> Result<(), VmError> {
        memory::huge_pages(&self.mem, self.shape.prealloc);
        if self.shape.prealloc && !self.ran {
            let zero = [0u8; PAGE_SIZE as usize];
            for region in self.mem.iter() {
                let bitmap = (**region).bitmap();
                for page in (0..bitmap.len()).filter(|&p| bitmap.is_bit_set(p)) {
                    region
                        .write_slice(&zero, MemoryRegionAddress(page as u64 * PAGE_SIZE))
                        .map_err(|e| VmError::State(format!("clearing RAM: {e}")))?;
                }
                bitmap.reset();
            }
            return Ok(());
        }
        for region in self.mem.iter() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| VmError::State(format!("region without mapping: {e}")))?;
            // SAFETY: `host..host+len` is exactly one anonymous private
            // mapping owned by `self.mem`; MADV_DONTNEED only drops its
            // contents (reads then see zeros), never the mapping.
            let r =
                unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTNEED) };
            if r != 0 {
                return Err(VmError::State(format!(
                    "madvise(DONTNEED): {}",
                    std::io::Error::last_os_error()
                )));
            }
            (**region).bitmap().reset();
        }
        if self.shape.prealloc {
            memory::populate(&self.mem)?;
        }
        Ok(())
    }

    /// An incoming migration has loaded all RAM, or a COLO secondary takes
    /// over from its last checkpoint: the guest's own first touches get
    /// huge pages again (see [`Vm::discard_ram`]).
    pub fn ram_loaded(&self) {
        memory::huge_pages(&self.mem, true);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Stop and join the vCPU threads before the memory goes away.
        self.vcpus.clear();
    }
}

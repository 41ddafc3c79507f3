//! Intel MultiProcessor Specification 1.4 table.
//!
//! Without ACPI, the guest learns its CPUs, its IOAPIC and the ISA interrupt
//! wiring from this table (CONFIG_X86_MPPARSE). It lives at 0x9fc00 (the
//! conventional EBDA spot that Linux scans) and matches KVM's default GSI
//! routing: ISA IRQ n goes to IOAPIC pin n; LINT0 is ExtINT, LINT1 is NMI.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// Where the floating pointer and the table start.
pub const MPTABLE_START: u64 = 0x9fc00;
/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_ADDR: u32 = 0xfee0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const NUM_ISA_IRQS: u8 = 16;
/// Most vCPUs the table (and our APIC ID scheme) supports.
pub const MAX_VCPUS: u8 = 254;

/// Errors writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Too many CPUs.
    #[error("{0} vCPUs: the MP table supports 1 to {MAX_VCPUS}")]
    TooManyCpus(u8),
    /// Guest memory write failed.
    #[error("writing the MP table")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Build the floating pointer + configuration table bytes for `cpus` CPUs.
pub fn build(cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_VCPUS {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let table_addr = MPTABLE_START as u32 + 16;
    let ioapic_id = cpus + 1;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.push(0u8); // processor
        entries.push(id); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(if id == 0 { 0x3 } else { 0x1 }); // enabled, BSP
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&((1u32 << 0) | (1 << 9)).to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..NUM_ISA_IRQS {
        // I/O interrupt: INT, default polarity/trigger, bus 0 irq -> ioapic pin
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: LINT0 ExtINT on all APICs, LINT1 NMI on all APICs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut hdr = Vec::with_capacity(44);
    hdr.extend_from_slice(b"PCMP");
    hdr.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    hdr.push(4); // spec rev 1.4
    hdr.push(0); // checksum, below
    hdr.extend_from_slice(b"MINIVMM ");
    hdr.extend_from_slice(b"000000000000");
    hdr.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    hdr.extend_from_slice(&0u16.to_le_bytes());
    hdr.extend_from_slice(&count.to_le_bytes());
    hdr.extend_from_slice(&APIC_ADDR.to_le_bytes());
    hdr.extend_from_slice(&[0; 4]); // extended table length, checksum
    let mut table = hdr;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 B, rev 1.4
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    Ok(mpf)
}

/// Write the table for `cpus` CPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_size() {
        let t = build(2).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &t[16..];
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(table.len(), len);
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        // Fits below 1 MiB with room to spare.
        assert!(MPTABLE_START as usize + t.len() < 0xa0000);
        assert!(build(0).is_err());
        assert!(build(255).is_err());
        assert!(MPTABLE_START as usize + build(MAX_VCPUS).unwrap().len() <= 0x100000);
    }
}

//! CMOS RTC and NVRAM at ports 0x70 (index) and 0x71 (data).
//!
//! Guests read the wall clock here during boot (without an answer, Linux's
//! RTC read loop spins). Clock registers report the host's UTC time in BCD,
//! 24-hour mode, never "update in progress"; the other 114 bytes are plain
//! NVRAM that the guest may write, migrated with the device.

use serde::{Deserialize, Serialize};

use crate::bus::PioDevice;

/// Index port; the data port is base + 1.
pub const CMOS_BASE: u16 = 0x70;

const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;

/// The RTC and its NVRAM.
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
}

/// Migratable CMOS state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// Selected register.
    pub index: u8,
    /// All 128 bytes (the clock bytes are recomputed on read).
    pub nvram: Vec<u8>,
}

impl Default for Cmos {
    fn default() -> Self {
        let mut nvram = [0u8; 128];
        nvram[REG_A as usize] = 0x26; // 32.768 kHz base, 1024 Hz rate
        nvram[REG_B as usize] = 0x02; // 24-hour, BCD
        nvram[REG_D as usize] = 0x80; // valid RAM and time
        Self { index: 0, nvram }
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Cmos {
    /// A fresh CMOS.
    pub fn new() -> Self {
        Self::default()
    }

    fn clock_reg(&self, reg: u8) -> Option<u8> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let days = (now / 86_400) as i64;
        let secs = now % 86_400;
        let (y, m, d) = civil(days);
        let v = match reg {
            0x00 => bcd(secs % 60),
            0x02 => bcd(secs / 60 % 60),
            0x04 => bcd(secs / 3600),
            0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u64),
            0x07 => bcd(d),
            0x08 => bcd(m),
            0x09 => bcd(y.rem_euclid(100) as u64),
            0x32 => bcd((y / 100) as u64),
            _ => return None,
        };
        Some(v)
    }

    /// Snapshot.
    pub fn save(&self) -> CmosState {
        CmosState {
            index: self.index,
            nvram: self.nvram.to_vec(),
        }
    }

    /// Restore a snapshot; a wrong-sized NVRAM is refused.
    pub fn restore(&mut self, st: &CmosState) -> Result<(), String> {
        if st.nvram.len() != 128 {
            return Err(format!("cmos nvram is {} bytes, want 128", st.nvram.len()));
        }
        self.index = st.index & 0x7f;
        self.nvram.copy_from_slice(&st.nvram);
        Ok(())
    }
}

impl PioDevice for Cmos {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = match offset {
            0 => self.index,
            _ => match self.index {
                REG_C => 0,
                r => self.clock_reg(r).unwrap_or(self.nvram[r as usize]),
            },
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        match offset {
            0 => self.index = b & 0x7f, // bit 7 is the NMI mask
            _ => {
                if self.clock_reg(self.index).is_none()
                    && self.index != REG_C
                    && self.index != REG_D
                {
                    self.nvram[self.index as usize] = b;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
    }

    #[test]
    fn registers() {
        let mut c = Cmos::new();
        let mut b = [0u8];
        c.write(0, &[REG_B]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x02);
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x5a);
        c.write(0, &[0x08]);
        c.read(1, &mut b);
        assert!((1..=0x12).contains(&b[0]));
        let s = c.save();
        let mut d = Cmos::new();
        d.restore(&s).unwrap();
        assert_eq!(d.save(), s);
    }
}

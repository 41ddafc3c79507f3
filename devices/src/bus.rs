//! The port-I/O bus: maps port ranges to devices.
//!
//! vCPU threads call [`PioBus::read`] and [`PioBus::write`] for every port
//! exit; each device sits behind its own mutex so two vCPUs touching
//! different devices do not contend.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device that answers port I/O. `offset` is relative to the device's base.
pub trait PioDevice: Send {
    /// Handle an `in`: fill `data`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Handle an `out` of `data`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

struct Range {
    base: u16,
    len: u16,
    dev: Arc<Mutex<dyn PioDevice>>,
}

/// Port ranges and the devices behind them.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
    unhandled: AtomicU64,
}

/// Errors building the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim the same port.
    #[error("port range {base:#x}+{len} overlaps an existing device")]
    Overlap {
        /// First port.
        base: u16,
        /// Number of ports.
        len: u16,
    },
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Place `dev` at ports `base..base+len`.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        dev: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusError> {
        let end = u32::from(base) + u32::from(len);
        if self.ranges.iter().any(|r| {
            let r_end = u32::from(r.base) + u32::from(r.len);
            u32::from(base) < r_end && u32::from(r.base) < end
        }) {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.push(Range { base, len, dev });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && u32::from(port) < u32::from(r.base) + u32::from(r.len))
            .map(|r| (r, port - r.base))
    }

    /// Dispatch an `in`. Unclaimed ports read as all ones.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((r, off)) => lock(&r.dev).read(off, data),
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }

    /// Dispatch an `out`. Writes to unclaimed ports are dropped.
    pub fn write(&self, port: u16, data: &[u8]) {
        match self.find(port) {
            Some((r, off)) => lock(&r.dev).write(off, data),
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// How many accesses hit no device.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }
}

/// Lock a device mutex; a device whose holder panicked is still usable
/// (its registers are plain data).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u16, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_and_counts_unhandled() {
        let mut bus = PioBus::new();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Echo(1)))).unwrap();
        assert!(bus.insert(0x12, 4, Arc::new(Mutex::new(Echo(1)))).is_err());
        bus.insert(0x14, 1, Arc::new(Mutex::new(Echo(7)))).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x11, &mut b);
        assert_eq!(b[0], 2);
        bus.write(0x10, &[5]);
        bus.read(0x13, &mut b);
        assert_eq!(b[0], 8);
        bus.read(0x14, &mut b);
        assert_eq!(b[0], 7);
        bus.read(0x20, &mut b);
        assert_eq!(b[0], 0xff);
        bus.write(0x20, &[1]);
        assert_eq!(bus.unhandled(), 2);
    }
}

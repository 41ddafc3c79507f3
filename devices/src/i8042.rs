//! The i8042 keyboard controller, reduced to what a Linux guest uses to reboot.
//!
//! `reboot=k` (and the kernel's fallback path) writes 0xfe to port 0x64;
//! vm-superio's model turns that into a write to the reset eventfd, which the
//! VMM's control loop watches: it then exits (`-no-reboot`) or resets the VM.
//! Reads return 0 (no data, input buffer empty), so the guest's wait loops end.
//! The device has no state worth migrating.

use vm_superio::{I8042Device, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::PioDevice;

/// First port (data); the command/status port is base + 4.
pub const I8042_BASE: u16 = 0x60;

/// Signals the reset request on an eventfd.
pub struct ResetTrigger(EventFd);

impl Trigger for ResetTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// The controller at 0x60/0x64.
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// A controller that writes `reset` when the guest asks for a CPU reset.
    pub fn new(reset: &EventFd) -> std::io::Result<Self> {
        Ok(Self {
            dev: I8042Device::new(ResetTrigger(reset.try_clone()?)),
        })
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = self.dev.read(offset as u8);
        data.fill(v);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Some(&b) = data.first() {
            // A failed eventfd write leaves the guest spinning in its reboot
            // loop, which it retries; nothing else to do here.
            let _ = self.dev.write(offset as u8, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut d = I8042::new(&evt).unwrap();
        d.write(4, &[0xd1]);
        assert!(evt.read().is_err());
        d.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}

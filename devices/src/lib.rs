//! Emulated legacy devices of a minivmm guest and the port-I/O bus they sit on.
//!
//! The crate owns the devices' register models and their migratable state; it
//! knows nothing about KVM. The VMM routes `KVM_EXIT_IO` exits to [`PioBus`],
//! gives the serial port an eventfd that KVM injects as IRQ 4 (irqfd), and
//! watches the i8042's reset eventfd.
//!
//! | ports | device |
//! |---|---|
//! | 0x3f8-0x3ff | [`serial::SerialPort`] (8250 UART, vm-superio) |
//! | 0x60, 0x64 | [`i8042::I8042`] (reset request only) |
//! | 0x70-0x71 | [`cmos::Cmos`] (RTC clock registers, NVRAM) |
//!
//! Accesses to any other port are ignored (reads return all ones) and
//! counted; they are never fatal.

pub mod bus;
pub mod cmos;
pub mod i8042;
pub mod serial;

pub use bus::{PioBus, PioDevice};

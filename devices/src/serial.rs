//! The 8250 UART at 0x3f8 (COM1), built on vm-superio.
//!
//! Output bytes go straight to the configured writer (stdout, a file or a
//! socket) from the vCPU thread that wrote them; a full pipe blocks that
//! vCPU rather than losing output. Input bytes from the host are queued here
//! and fed into the UART's 64-byte FIFO as the guest drains it. The interrupt
//! is an eventfd that KVM injects as IRQ 4 (irqfd), so raising it costs no
//! ioctl.

use std::collections::VecDeque;
use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::PioDevice;

/// Size of the 8250 receive FIFO.
const FIFO_SIZE: usize = 64;

/// COM1 base port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1 legacy IRQ line.
pub const COM1_IRQ: u32 = 4;

/// Errors of the serial port.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Cloning or creating the interrupt eventfd failed.
    #[error("serial interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// A saved state does not fit the UART (e.g. an over-full FIFO).
    #[error("invalid serial state: {0}")]
    State(String),
}

/// Interrupt trigger: writes the irqfd.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Where guest output goes, shared so the VMM can swap or buffer it.
pub type SerialOut = Box<dyn Write + Send>;

/// COM1 with a host-side input queue.
pub struct SerialPort {
    uart: Serial<IrqTrigger, NoEvents, SerialOut>,
    pending_in: VecDeque<u8>,
}

/// Most input bytes queued for the guest behind the FIFO (and so in a
/// migrated state).
pub const MAX_PENDING_INPUT: usize = 64 << 10;

/// Migratable state of the UART (registers and unread input).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialPortState {
    /// Divisor latch, low byte.
    pub dll: u8,
    /// Divisor latch, high byte.
    pub dlh: u8,
    /// Interrupt enable register.
    pub ier: u8,
    /// Interrupt identification register.
    pub iir: u8,
    /// Line control register.
    pub lcr: u8,
    /// Line status register.
    pub lsr: u8,
    /// Modem control register.
    pub mcr: u8,
    /// Modem status register.
    pub msr: u8,
    /// Scratch register.
    pub scr: u8,
    /// Bytes in the receive FIFO and queued behind it.
    pub input: Vec<u8>,
}

impl SerialPort {
    /// A UART raising `irq` and writing output to `out`.
    pub fn new(irq: &EventFd, out: SerialOut) -> Result<Self, SerialError> {
        let trigger = IrqTrigger(irq.try_clone().map_err(SerialError::EventFd)?);
        Ok(Self {
            uart: Serial::new(trigger, out),
            pending_in: VecDeque::new(),
        })
    }

    /// Queue host input for the guest, at most [`MAX_PENDING_INPUT`] bytes
    /// behind the FIFO.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        // What the guest has not read yet is bounded, as a real line
        // overruns: beyond it, input is dropped.
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending_in.len());
        self.pending_in.extend(&bytes[..bytes.len().min(room)]);
        self.fill_fifo();
    }

    fn fill_fifo(&mut self) {
        while !self.pending_in.is_empty() {
            let room = self.uart.fifo_capacity();
            if room == 0 {
                break;
            }
            let n = room.min(self.pending_in.len());
            let chunk: Vec<u8> = self.pending_in.drain(..n).collect();
            // The only errors are a full FIFO (excluded above) and a failed
            // interrupt write; the bytes are in the FIFO either way.
            let _ = self.uart.enqueue_raw_bytes(&chunk);
        }
    }

    /// Replace the output writer (e.g. to hold output back), returning the old one.
    pub fn replace_output(&mut self, out: SerialOut) -> SerialOut {
        std::mem::replace(self.uart.writer_mut(), out)
    }

    /// Flush the output writer.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }

    /// Snapshot the registers and unread input.
    pub fn save(&self) -> SerialPortState {
        let s = self.uart.state();
        let mut input = s.in_buffer.clone();
        input.extend(self.pending_in.iter());
        SerialPortState {
            dll: s.baud_divisor_low,
            dlh: s.baud_divisor_high,
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scr: s.scratch,
            input,
        }
    }

    /// Load a snapshot taken by [`SerialPort::save`], keeping the current
    /// output writer and interrupt eventfd.
    pub fn restore(&mut self, st: &SerialPortState) -> Result<(), SerialError> {
        let fifo = FIFO_SIZE.min(st.input.len());
        let state = SerialState {
            baud_divisor_low: st.dll,
            baud_divisor_high: st.dlh,
            interrupt_enable: st.ier,
            interrupt_identification: st.iir,
            line_control: st.lcr,
            line_status: st.lsr,
            modem_control: st.mcr,
            modem_status: st.msr,
            scratch: st.scr,
            in_buffer: st.input[..fifo].to_vec(),
        };
        let trigger = IrqTrigger(
            self.uart
                .interrupt_evt()
                .0
                .try_clone()
                .map_err(SerialError::EventFd)?,
        );
        let out = self.replace_output(Box::new(std::io::sink()));
        let uart = Serial::from_state(&state, trigger, NoEvents, out)
            .map_err(|e| SerialError::State(format!("{e:?}")))?;
        self.uart = uart;
        self.pending_in = st.input[fifo..].iter().copied().collect();
        Ok(())
    }
}

impl PioDevice for SerialPort {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(off);
            if off == 0 {
                self.fill_fifo();
            }
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let (Ok(off), Some(&b)) = (u8::try_from(offset), data.first()) {
            // An output error (e.g. the reader went away) must not stop the guest.
            let _ = self.uart.write(off, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_input_and_state_round_trip() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let cap = Capture::default();
        let mut s = SerialPort::new(&irq, Box::new(cap.clone())).unwrap();
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*cap.0.lock().unwrap(), b"hi");
        // More input than the FIFO holds is kept, not dropped.
        let input: Vec<u8> = (0..100u8).collect();
        s.queue_input(&input);
        s.write(3, &[0x03]); // LCR: 8 bits
        let saved = s.save();
        assert_eq!(saved.input, input);
        let mut t = SerialPort::new(&irq, Box::new(std::io::sink())).unwrap();
        t.restore(&saved).unwrap();
        let mut got = Vec::new();
        for _ in 0..100 {
            let mut b = [0u8];
            t.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        assert_eq!(t.save().lcr, 0x03);
    }
}

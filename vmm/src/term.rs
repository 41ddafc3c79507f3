//! Host terminal handling for `-serial stdio`.
//!
//! When stdin is a terminal it is put in raw mode (no echo, no line editing)
//! so keystrokes reach the guest one by one, as QEMU does; signals stay on,
//! so Ctrl-C still ends minivmm. The guard restores the old settings.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};

/// Restores the terminal on drop.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Put stdin in raw mode if it is a terminal.
    pub fn enable() -> Option<Self> {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer to a termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_lflag |= libc::ISIG;
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: valid fd and termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: restores the settings read in `enable` on the same fd.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &self.saved) };
    }
}

/// An unbuffered writer on a duplicate of stdout: guest output appears at
/// once, prompts without newlines included.
pub struct RawStdout(std::fs::File);

impl RawStdout {
    /// Duplicate fd 1.
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: dup of a valid fd; the result is checked and then owned.
        let fd = unsafe { libc::dup(1) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(Self(unsafe { std::fs::File::from_raw_fd(fd) }))
    }
}

impl Write for RawStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

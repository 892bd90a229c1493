//! The host side of the serial console: raw terminal mode (restored on every exit path) and a
//! guest-output writer that never blocks a vCPU indefinitely.

use std::io::Write;
use std::os::fd::RawFd;

/// Puts a terminal into raw mode and restores the saved attributes (and fd flags) when dropped.
pub struct RawModeGuard {
    fd: RawFd,
    saved: libc::termios,
}

impl RawModeGuard {
    /// Switches `fd` to raw mode if it is a terminal; returns None for pipes and files.
    pub fn new(fd: RawFd) -> std::io::Result<Option<Self>> {
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it and tcsetattr only reads it.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            // Keep output post-processing so guest "\n" still renders as a new line.
            raw.c_oflag = saved.c_oflag;
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            crate::host::seccomp::set_terminal_to_restore(fd, saved);
            Ok(Some(RawModeGuard { fd, saved }))
        }
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        // SAFETY: restores attributes saved from this same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Sets or clears `O_NONBLOCK` on `fd`; returns the previous flags.
pub fn set_nonblocking(fd: RawFd, on: bool) -> std::io::Result<i32> {
    // SAFETY: fcntl with integer arguments on an fd the caller owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, new) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(flags)
}

/// Restores fd flags saved by [`set_nonblocking`] when dropped.
pub struct FlagsGuard {
    fd: RawFd,
    flags: i32,
}

impl FlagsGuard {
    /// Makes `fd` non-blocking until the guard is dropped.
    pub fn nonblocking(fd: RawFd) -> std::io::Result<Self> {
        let flags = set_nonblocking(fd, true)?;
        Ok(FlagsGuard { fd, flags })
    }
}

impl Drop for FlagsGuard {
    fn drop(&mut self) {
        // SAFETY: restores the flags read from this fd earlier.
        unsafe { libc::fcntl(self.fd, libc::F_SETFL, self.flags) };
    }
}

/// How long a guest write may wait for a full host console before output is dropped.
const OUTPUT_WAIT_MS: i32 = 20;

/// Writes guest console output to a non-blocking fd. When the reader does not keep up, it waits
/// briefly and then drops (and counts) output instead of stalling the vCPU.
pub struct ConsoleWriter {
    fd: RawFd,
    dropped: u64,
}

impl ConsoleWriter {
    /// Writes to `fd`, which should be non-blocking (see [`FlagsGuard`]).
    pub fn new(fd: RawFd) -> Self {
        ConsoleWriter { fd, dropped: 0 }
    }

    fn wait_writable(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd for a bounded time.
        unsafe { libc::poll(&mut pfd, 1, OUTPUT_WAIT_MS) > 0 }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut waited = false;
        loop {
            // SAFETY: writes from a valid buffer of the given length.
            let n = unsafe { libc::write(self.fd, buf.as_ptr() as *const libc::c_void, buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => {}
                std::io::ErrorKind::WouldBlock if !waited => {
                    waited = true;
                    self.wait_writable();
                }
                std::io::ErrorKind::WouldBlock => {
                    self.dropped += buf.len() as u64;
                    if self.dropped == buf.len() as u64
                        || self.dropped % (64 << 10) < buf.len() as u64
                    {
                        log::warn!(
                            "host console is not reading; {} bytes of guest output dropped",
                            self.dropped
                        );
                    }
                    return Ok(buf.len());
                }
                // A closed console (EPIPE) must not stop the guest: discard.
                _ => return Ok(buf.len()),
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

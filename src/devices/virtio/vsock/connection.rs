//! One host-side vsock connection: its Unix socket, its state, and the credit bookkeeping of
//! virtio-vsock flow control; plus the socket helpers the muxer uses to open connections.

use std::collections::VecDeque;
use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use super::packet::*;

/// Receive buffer promised to the guest per connection: the most guest data held for a host
/// peer that does not read.
pub const BUF_ALLOC: u32 = 256 << 10;

/// Where a connection is in its life.
pub enum State {
    /// Accepted on `PATH`, reading the `CONNECT <port>` line (bytes so far).
    AwaitingConnect(Vec<u8>),
    /// `OP_REQUEST` sent (or queued) to the guest, waiting for its answer.
    Requesting,
    /// Data flows.
    Established,
}

/// One host socket and its vsock connection state.
pub struct Conn {
    pub stream: UnixStream,
    pub state: State,
    /// Host-side port (ours); 0 while awaiting the `CONNECT` line.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    /// What the fd is armed for on epoll; None when not registered (after a hangup).
    pub armed: Option<(bool, bool)>,
    /// Dropped by `tick` after this (no `CONNECT` line, no answer to a request or a shutdown).
    pub deadline: Option<Instant>,
    /// The host socket was reported readable and has not been read to EAGAIN since.
    pub host_ready: bool,
    /// The host peer closed its sending side; `OP_SHUTDOWN` was sent.
    pub host_eof: bool,
    /// Host bytes sent to the guest (wrapping).
    pub tx_cnt: u32,
    /// The guest's receive buffer and consumed count, from its latest header.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// An `OP_CREDIT_REQUEST` was sent and no credit has come since.
    pub credit_requested: bool,
    /// Bytes for the host peer that it has not taken yet: `ctl_prefix` bytes of our own
    /// (`OK <port>\n`), then guest data.
    pub to_host: VecDeque<u8>,
    pub ctl_prefix: usize,
    /// Guest bytes received and forwarded to the host peer (wrapping).
    pub rx_cnt: u32,
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    pub last_fwd_sent: u32,
    /// `SHUTDOWN_*` flags the guest sent.
    pub peer_shutdown: u32,
    /// The host socket's sending side is shut down.
    pub host_write_shut: bool,
    pub need_request: bool,
    pub need_response: bool,
    pub need_credit_update: bool,
    pub need_credit_request: bool,
    /// The connection's token is in the RX round-robin queue.
    pub queued: bool,
}

/// What flushing buffered guest data left.
pub enum Flushed {
    Open,
    /// A socket error, or everything flushed after the guest shut down both ways: close and
    /// reset.
    Close,
}

impl Conn {
    pub fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Conn {
            stream,
            state,
            local_port,
            peer_port,
            armed: None,
            deadline: None,
            host_ready: false,
            host_eof: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            to_host: VecDeque::new(),
            ctl_prefix: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            peer_shutdown: 0,
            host_write_shut: false,
            need_request: false,
            need_response: false,
            need_credit_update: false,
            need_credit_request: false,
            queued: false,
        }
    }

    pub fn established(&self) -> bool {
        matches!(self.state, State::Established)
    }

    /// Bytes the guest can still take: its buffer minus what is in flight.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Host data may be waiting for the guest, which still takes it.
    pub fn wants_to_send(&self) -> bool {
        self.established()
            && self.host_ready
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    pub fn has_rx(&self) -> bool {
        self.need_request
            || self.need_response
            || self.need_credit_update
            || self.need_credit_request
            || (self.wants_to_send() && self.peer_credit() > 0)
    }

    /// (readable, writable) the fd should be armed for. Never readable while data already
    /// reported readable waits for the guest: level-triggered epoll would spin.
    pub fn wanted(&self) -> (bool, bool) {
        match self.state {
            State::AwaitingConnect(_) => (true, false),
            State::Requesting => (false, false),
            State::Established => (
                !self.host_ready && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0,
                !self.to_host.is_empty(),
            ),
        }
    }

    /// Writes buffered bytes to the host peer until it stops taking them.
    pub fn flush(&mut self) -> Flushed {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(n) => {
                    self.to_host.drain(..n);
                    let ctl = n.min(self.ctl_prefix);
                    self.ctl_prefix -= ctl;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ctl) as u32);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return Flushed::Close,
            }
        }
        if self.to_host.is_empty() {
            if self.to_host.capacity() > 64 << 10 {
                self.to_host = VecDeque::new();
            }
            if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                // Both sides are done sending (or the guest will not receive either): the
                // connection is over once the guest's data is delivered.
                if self.peer_shutdown & SHUTDOWN_RCV != 0 || self.host_eof {
                    return Flushed::Close;
                }
                if !self.host_write_shut {
                    // Fails only if the peer is gone, which the next read or write reports.
                    let _ = self.stream.shutdown(Shutdown::Write);
                    self.host_write_shut = true;
                }
            }
        }
        // Hysteresis: tell the guest about freed space once its view drops below half.
        let guest_view_free =
            BUF_ALLOC.saturating_sub(self.rx_cnt.wrapping_sub(self.last_fwd_sent));
        if self.fwd_cnt != self.last_fwd_sent && guest_view_free < BUF_ALLOC / 2 {
            self.need_credit_update = true;
        }
        Flushed::Open
    }

    /// A header for the guest on this connection, carrying our credit.
    pub fn header(&mut self, guest_cid: u64, op: u16, len: u32, flags: u32) -> PacketHeader {
        self.last_fwd_sent = self.fwd_cnt;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }
}

/// `send(2)` with MSG_NOSIGNAL: a vanished peer is EPIPE, never SIGPIPE.
pub fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes during the call and the fd is owned
    // by `stream`, which outlives it.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Connects to a Unix stream socket without blocking: a listener with a full backlog is
/// EAGAIN rather than a stalled VMM.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(ErrorKind::InvalidInput));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len =
        (std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is an initialised sockaddr_un and `len` does not exceed its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// The port of a `CONNECT <port>` line (newline stripped), or None if it is malformed.
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    if words.next()? != "CONNECT" {
        return None;
    }
    let port = words.next()?;
    if words.next().is_some() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

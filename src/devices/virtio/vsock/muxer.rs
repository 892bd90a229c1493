//! Host side of the virtio-vsock device (Firecracker-compatible hybrid vsock over Unix sockets).
//!
//! [`VsockMuxer`] multiplexes the guest's vsock stream connections onto Unix stream sockets:
//!
//! - host-initiated: a client connects to `PATH`, writes `CONNECT <port>\n`, the guest gets an
//!   `OP_REQUEST` from a fresh host port and, on its `OP_RESPONSE`, the client reads
//!   `OK <host port>\n`; an `OP_RST` from the guest closes the client instead;
//! - guest-initiated: an `OP_REQUEST` to host port `P` connects to `PATH_P`.
//!
//! It is synchronous and non-blocking, driven by the caller's level-triggered epoll loop: the
//! muxer never waits, and it reports which of its fds the loop must watch through
//! [`VsockMuxer::take_interest_changes`]. Memory is bounded: each connection buffers at most
//! [`BUF_ALLOC`] bytes of guest data the host peer has not taken yet (the credit the guest was
//! given), host data is read straight into the guest's RX buffer and only when the guest has
//! credit for it, and the numbers of connections ([`MAX_CONNS`]), of clients still writing their
//! `CONNECT` line ([`MAX_PENDING`]) and of queued resets ([`MAX_CONTROL_QUEUE`]) are capped.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::connection::{connect_nonblocking, parse_connect, Conn, Flushed, State, BUF_ALLOC};
use super::packet::*;

/// Most accepted clients still writing their `CONNECT` line; further clients are closed at once.
pub const MAX_PENDING: usize = 64;
/// Most connections of any kind (each holds one fd and up to [`BUF_ALLOC`] bytes).
pub const MAX_CONNS: usize = 1024;
/// Most reset packets queued for connections that no longer exist; beyond it a guest that
/// floods the TX queue without reading its RX queue loses them.
pub const MAX_CONTROL_QUEUE: usize = 1024;
/// Longest `CONNECT <port>` line, newline excluded.
const MAX_CONNECT_LINE: usize = 32;
/// First host port given to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long a client may take to write its `CONNECT` line.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to answer an `OP_REQUEST`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to reset a connection after our `OP_SHUTDOWN`.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);
/// Token of the listening socket; connections get tokens in `1..TOKEN_LIMIT`.
pub const TOKEN_LISTENER: u64 = 0;
/// Tokens are below this, so the caller can add its own base.
pub const TOKEN_LIMIT: u64 = 1 << 31;
/// Accepts per listener event (the listener is level-triggered: the rest come next round).
const MAX_ACCEPTS_PER_EVENT: usize = 64;

/// Errors setting up the muxer.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved (0-2) or does not fit the 32 bits guests use.
    #[error("vsock: guest CID {0} is reserved or out of range (3 to 4294967294)")]
    InvalidCid(u64),
    /// Something other than a socket exists at the path.
    #[error("vsock: {0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    /// The path could not be inspected.
    #[error("vsock: cannot stat {0}: {1}")]
    Stat(PathBuf, #[source] io::Error),
    /// The stale socket could not be removed.
    #[error("vsock: cannot remove the stale socket {0}: {1}")]
    Unlink(PathBuf, #[source] io::Error),
    /// bind, listen or fcntl failed.
    #[error("vsock: cannot listen on {0}: {1}")]
    Bind(PathBuf, #[source] io::Error),
}

/// A change the caller must make to its (level-triggered) epoll set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interest {
    /// Start watching `fd` under `token`.
    Add {
        /// The fd.
        fd: RawFd,
        /// The muxer's token for it.
        token: u64,
        /// Watch EPOLLIN.
        readable: bool,
        /// Watch EPOLLOUT.
        writable: bool,
    },
    /// Change what `fd` is watched for.
    Modify {
        /// The fd.
        fd: RawFd,
        /// The muxer's token for it.
        token: u64,
        /// Watch EPOLLIN.
        readable: bool,
        /// Watch EPOLLOUT.
        writable: bool,
    },
    /// Stop watching `fd`. The muxer keeps it open until the next `take_interest_changes`, so
    /// the removal applies to the right file.
    Remove {
        /// The fd.
        fd: RawFd,
    },
}

impl Interest {
    /// The `epoll_ctl` call this change asks for, with the muxer's token offset by `token_base`
    /// (the caller's own token space).
    pub fn epoll_ctl(self, token_base: u64) -> (ControlOperation, RawFd, EpollEvent) {
        let watch = |readable: bool, writable: bool, token: u64| {
            let mut set = EventSet::empty();
            if readable {
                set |= EventSet::IN;
            }
            if writable {
                set |= EventSet::OUT;
            }
            EpollEvent::new(set, token_base + token)
        };
        match self {
            Interest::Add {
                fd,
                token,
                readable,
                writable,
            } => (ControlOperation::Add, fd, watch(readable, writable, token)),
            Interest::Modify {
                fd,
                token,
                readable,
                writable,
            } => (
                ControlOperation::Modify,
                fd,
                watch(readable, writable, token),
            ),
            Interest::Remove { fd } => (ControlOperation::Delete, fd, EpollEvent::default()),
        }
    }
}

/// The hybrid-vsock connection multiplexer: one listener on `PATH` and the connections.
pub struct VsockMuxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    listener_armed: bool,
    conns: HashMap<u64, Conn>,
    /// (local port, guest port) → token, for connections past the `CONNECT` line.
    ports: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_local_port: u32,
    /// Resets for connections that are gone (or never existed); sent before anything else.
    control: VecDeque<PacketHeader>,
    /// Connections with something for the guest, round-robin.
    rx_queue: VecDeque<u64>,
    changes: Vec<Interest>,
    /// Closed sockets whose `Remove` is in the current batch of changes / the previous one.
    retiring: Vec<UnixStream>,
    retired: Vec<UnixStream>,
}

impl VsockMuxer {
    /// Binds PATH, listens; the listener's Add interest is in the first take_interest_changes().
    pub fn new(guest_cid: u64, path: &Path) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                std::fs::remove_file(path).map_err(|e| VsockError::Unlink(path.to_path_buf(), e))?
            }
            Ok(_) => return Err(VsockError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(VsockError::Stat(path.to_path_buf(), e)),
        }
        let listener =
            UnixListener::bind(path).map_err(|e| VsockError::Bind(path.to_path_buf(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VsockError::Bind(path.to_path_buf(), e))?;
        let changes = vec![Interest::Add {
            fd: listener.as_raw_fd(),
            token: TOKEN_LISTENER,
            readable: true,
            writable: false,
        }];
        Ok(VsockMuxer {
            guest_cid,
            path: path.to_path_buf(),
            listener,
            listener_armed: true,
            conns: HashMap::new(),
            ports: HashMap::new(),
            next_token: 1,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            rx_queue: VecDeque::new(),
            changes,
            retiring: Vec::new(),
            retired: Vec::new(),
        })
    }

    /// A packet from the guest's TX queue; `payload` is its data (len bytes, only for OP_RW).
    pub fn send_to_host(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.guest_cid || hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.queue_rst(hdr.dst_port, hdr.src_port);
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(&token) = self.ports.get(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(hdr),
                OP_RST => {}
                _ => self.queue_rst(hdr.dst_port, hdr.src_port),
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&token) else {
            self.ports.remove(&key);
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        if conn.peer_credit() > 0 {
            conn.credit_requested = false;
        }
        let established = conn.established();
        match hdr.op {
            OP_RST => return self.drop_conn(token, false),
            OP_RESPONSE if !established => {
                conn.state = State::Established;
                conn.deadline = None;
                let ok = format!("OK {}\n", conn.local_port);
                conn.to_host.extend(ok.as_bytes());
                conn.ctl_prefix += ok.len();
                if !self.flush(token) {
                    return;
                }
            }
            OP_RW if established => {
                let data = &payload[..payload.len().min(hdr.len as usize)];
                let in_flight = conn.rx_cnt.wrapping_sub(conn.fwd_cnt) as usize;
                if conn.peer_shutdown & SHUTDOWN_SEND != 0
                    || data.len() > BUF_ALLOC as usize - in_flight.min(BUF_ALLOC as usize)
                {
                    // Data after the guest's own shutdown, or beyond its credit.
                    return self.drop_conn(token, true);
                }
                conn.rx_cnt = conn.rx_cnt.wrapping_add(data.len() as u32);
                conn.to_host.extend(data);
                if !self.flush(token) {
                    return;
                }
            }
            OP_CREDIT_UPDATE if established => {}
            OP_CREDIT_REQUEST if established => conn.need_credit_update = true,
            OP_SHUTDOWN if established => {
                conn.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if !self.flush(token) {
                    return;
                }
            }
            // A second REQUEST, a RESPONSE on a live connection, anything else before the
            // RESPONSE, or an unknown op.
            _ => return self.drop_conn(token, true),
        }
        self.touch(token);
    }

    /// Whether recv_for_guest may have a packet (a cheap check before the caller takes an RX buffer).
    pub fn has_pending_rx(&self) -> bool {
        !self.control.is_empty() || !self.rx_queue.is_empty()
    }

    /// The next packet for the guest: data read from a host socket directly into `buf` (the
    /// RX buffer's payload room, possibly smaller than a full packet), or a control packet (len
    /// 0). None if nothing can be produced now (the caller then gives the buffer back to the
    /// queue); after a None for a non-empty `buf`, `has_pending_rx` is false until something
    /// changes. Round-robin: a connection that sent a packet goes to the back of the queue.
    pub fn recv_for_guest(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        for _ in 0..=self.rx_queue.len() {
            if let Some(hdr) = self.control.pop_front() {
                return Some(hdr);
            }
            let token = self.rx_queue.pop_front()?;
            let Some(conn) = self.conns.get_mut(&token) else {
                continue;
            };
            conn.queued = false;
            let hdr = self.produce(token, buf);
            self.touch(token);
            if hdr.is_some() {
                return hdr;
            }
        }
        self.control.pop_front()
    }

    /// An epoll event for one of the muxer's tokens (tokens are < 1<<31, the caller adds its
    /// own base). `hangup` is EPOLLHUP or EPOLLERR.
    pub fn host_event(&mut self, token: u64, readable: bool, writable: bool, hangup: bool) {
        if token == TOKEN_LISTENER {
            if readable || hangup {
                self.accept_all();
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        match conn.state {
            State::AwaitingConnect(_) => {
                if readable || hangup {
                    self.read_connect_line(token);
                }
            }
            State::Requesting => {
                if hangup {
                    self.drop_conn(token, true);
                }
            }
            State::Established => {
                if hangup && conn.armed.is_some() {
                    // EPOLLHUP cannot be masked: stop watching the fd and read what is left.
                    conn.armed = None;
                    self.changes.push(Interest::Remove {
                        fd: conn.stream.as_raw_fd(),
                    });
                }
                if readable || hangup {
                    conn.host_ready = true;
                }
                if (writable || hangup) && !self.flush(token) {
                    return;
                }
                self.touch(token);
            }
        }
    }

    /// Timeouts (pending CONNECT lines, unanswered requests and shutdowns); the caller calls it
    /// about once a second while connections exist.
    pub fn tick(&mut self, now: Instant) {
        let expired: Vec<(u64, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| now >= d))
            .map(|(&t, c)| (t, !matches!(c.state, State::AwaitingConnect(_))))
            .collect();
        for (token, rst) in expired {
            self.drop_conn(token, rst);
        }
        self.arm_listener();
    }

    /// The epoll changes since the last call (fds to add/modify/remove), to be applied in
    /// order before the next epoll_wait. Level-triggered epoll is assumed: a connection whose
    /// host data waits for the guest (no credit, or no RX buffer yet) is not armed readable;
    /// it is re-armed when a read hits EAGAIN.
    pub fn take_interest_changes(&mut self) -> Vec<Interest> {
        // The previous batch's removals have been applied: those fds may close now.
        self.retired = std::mem::take(&mut self.retiring);
        std::mem::take(&mut self.changes)
    }

    /// Drops every connection (device reset, guest reboot) without telling the guest; keeps
    /// the listener.
    pub fn reset(&mut self) {
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for token in tokens {
            self.drop_conn(token, false);
        }
        self.control.clear();
        self.rx_queue.clear();
        self.arm_listener();
    }

    /// Number of live connections (for info/tests), including clients still writing `CONNECT`.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Accepts the waiting clients, closing those over the caps.
    fn accept_all(&mut self) {
        for _ in 0..MAX_ACCEPTS_PER_EVENT {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    // The client stays in the backlog and the listener readable: pause it
                    // until a connection closes or the next tick, rather than spin.
                    log::warn!("vsock: cannot accept on {}: {e}", self.path.display());
                    self.listener_armed = false;
                    self.changes.push(Interest::Modify {
                        fd: self.listener.as_raw_fd(),
                        token: TOKEN_LISTENER,
                        readable: false,
                        writable: false,
                    });
                    return;
                }
                Err(_) => {} // EINTR, ECONNABORTED: next client
            }
        }
    }

    fn arm_listener(&mut self) {
        if !self.listener_armed {
            self.listener_armed = true;
            self.changes.push(Interest::Modify {
                fd: self.listener.as_raw_fd(),
                token: TOKEN_LISTENER,
                readable: true,
                writable: false,
            });
        }
    }

    fn admit(&mut self, stream: UnixStream) {
        let pending = self
            .conns
            .values()
            .filter(|c| matches!(c.state, State::AwaitingConnect(_)))
            .count();
        if self.conns.len() >= MAX_CONNS || pending >= MAX_PENDING {
            return; // dropping `stream` closes it
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let mut conn = Conn::new(stream, State::AwaitingConnect(Vec::new()), 0, 0);
        conn.deadline = Some(Instant::now() + PENDING_TIMEOUT);
        self.register(conn);
    }

    /// Adds a connection, registers its fd and schedules what it has for the guest.
    fn register(&mut self, mut conn: Conn) -> u64 {
        let mut token = self.next_token;
        while token == TOKEN_LISTENER || self.conns.contains_key(&token) {
            token = (token + 1) % TOKEN_LIMIT;
        }
        self.next_token = (token + 1) % TOKEN_LIMIT;
        let (readable, writable) = conn.wanted();
        conn.armed = Some((readable, writable));
        self.changes.push(Interest::Add {
            fd: conn.stream.as_raw_fd(),
            token,
            readable,
            writable,
        });
        if !matches!(conn.state, State::AwaitingConnect(_)) {
            self.ports.insert((conn.local_port, conn.peer_port), token);
        }
        self.conns.insert(token, conn);
        self.touch(token);
        token
    }

    /// Reads the `CONNECT` line one byte at a time (what follows it is stream data).
    fn read_connect_line(&mut self, token: u64) {
        let Some(Conn {
            stream,
            state: State::AwaitingConnect(line),
            ..
        }) = self.conns.get_mut(&token)
        else {
            return;
        };
        let outcome = loop {
            let mut byte = [0u8; 1];
            match (&*stream).read(&mut byte) {
                Ok(0) => break Some(None),
                Ok(_) if byte[0] == b'\n' => break Some(parse_connect(line)),
                Ok(_) if line.len() >= MAX_CONNECT_LINE => break Some(None),
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                Err(_) => break Some(None),
            }
        };
        match outcome {
            None => {}
            Some(None) => self.drop_conn(token, false),
            Some(Some(port)) => self.host_connect(token, port),
        }
    }

    /// A client asked for guest port `port`: send the guest a request from a fresh host port.
    fn host_connect(&mut self, token: u64, port: u32) {
        let local_port = loop {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.values().any(|c| c.local_port == p) {
                break p;
            }
        };
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.state = State::Requesting;
        conn.local_port = local_port;
        conn.peer_port = port;
        conn.need_request = true;
        conn.deadline = Some(Instant::now() + REQUEST_TIMEOUT);
        self.ports.insert((local_port, port), token);
        self.touch(token);
    }

    /// The guest asked for host port `dst_port`: connect to `PATH_<dst_port>`.
    fn guest_connect(&mut self, hdr: &PacketHeader) {
        let mut path = self.path.as_os_str().to_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match self.conns.len() < MAX_CONNS {
            true => connect_nonblocking(Path::new(&path)).ok(),
            false => None,
        };
        let Some(stream) = stream else {
            return self.queue_rst(hdr.dst_port, hdr.src_port);
        };
        let mut conn = Conn::new(stream, State::Established, hdr.dst_port, hdr.src_port);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        conn.need_response = true;
        self.register(conn);
    }

    /// Flushes a connection's buffered guest data; false if that closed the connection.
    fn flush(&mut self, token: u64) -> bool {
        match self.conns.get_mut(&token).map(Conn::flush) {
            Some(Flushed::Open) => true,
            Some(Flushed::Close) => {
                self.drop_conn(token, true);
                false
            }
            None => false,
        }
    }

    /// One packet from connection `token`, if it has one now.
    fn produce(&mut self, token: u64, buf: &mut [u8]) -> Option<PacketHeader> {
        let cid = self.guest_cid;
        let conn = self.conns.get_mut(&token)?;
        let op = if std::mem::take(&mut conn.need_request) {
            OP_REQUEST
        } else if std::mem::take(&mut conn.need_response) {
            OP_RESPONSE
        } else if std::mem::take(&mut conn.need_credit_update) {
            OP_CREDIT_UPDATE
        } else if conn.wants_to_send() && conn.peer_credit() > 0 && !buf.is_empty() {
            let room = buf.len().min(conn.peer_credit() as usize);
            return match (&conn.stream).read(&mut buf[..room]) {
                Ok(0) => {
                    // The host closed its write side (a half-close, or a close whose write
                    // side the next send reports): the host sends no more, but the guest may
                    // still send until it shuts down too.
                    conn.host_eof = true;
                    if conn.peer_shutdown & SHUTDOWN_SEND != 0 && conn.to_host.is_empty() {
                        conn.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
                    }
                    Some(conn.header(cid, OP_SHUTDOWN, 0, SHUTDOWN_SEND))
                }
                Ok(n) => {
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                    Some(conn.header(cid, OP_RW, n as u32, 0))
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => None,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    conn.host_ready = false;
                    None
                }
                Err(_) => {
                    self.drop_conn(token, true);
                    None
                }
            };
        } else if std::mem::take(&mut conn.need_credit_request) {
            OP_CREDIT_REQUEST
        } else {
            return None;
        };
        Some(conn.header(cid, op, 0, 0))
    }

    /// Re-evaluates a connection after a change: credit request, epoll interest, RX queue.
    fn touch(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.wants_to_send() && conn.peer_credit() == 0 && !conn.credit_requested {
            conn.need_credit_request = true;
            conn.credit_requested = true;
        }
        if let Some(armed) = conn.armed {
            let (readable, writable) = conn.wanted();
            if (readable, writable) != armed {
                conn.armed = Some((readable, writable));
                self.changes.push(Interest::Modify {
                    fd: conn.stream.as_raw_fd(),
                    token,
                    readable,
                    writable,
                });
            }
        }
        if !conn.queued && conn.has_rx() {
            conn.queued = true;
            self.rx_queue.push_back(token);
        }
    }

    /// Closes a connection's socket at once (the peer sees EOF), optionally resetting it on
    /// the guest side.
    fn drop_conn(&mut self, token: u64, rst: bool) {
        let Some(conn) = self.conns.remove(&token) else {
            return;
        };
        if !matches!(conn.state, State::AwaitingConnect(_)) {
            self.ports.remove(&(conn.local_port, conn.peer_port));
            if rst {
                self.queue_rst(conn.local_port, conn.peer_port);
            }
        }
        if conn.queued {
            self.rx_queue.retain(|&t| t != token);
        }
        // The peer may be gone already; nothing to do about a failure.
        let _ = conn.stream.shutdown(Shutdown::Both);
        if conn.armed.is_some() {
            self.changes.push(Interest::Remove {
                fd: conn.stream.as_raw_fd(),
            });
        }
        self.retiring.push(conn.stream);
        self.arm_listener();
    }

    /// Queues a reset from host port `local_port` to guest port `peer_port`.
    fn queue_rst(&mut self, local_port: u32, peer_port: u32) {
        if self.control.len() < MAX_CONTROL_QUEUE {
            self.control.push_back(PacketHeader {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: local_port,
                dst_port: peer_port,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..PacketHeader::default()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::epoll::{Epoll, EpollEvent, EventSet};
    use vmm_sys_util::tempdir::TempDir;

    const CID: u64 = 3;

    /// A muxer on a real epoll set, applying its interest changes as the VMM loop would.
    struct Harness {
        _dir: TempDir,
        path: PathBuf,
        m: VsockMuxer,
        epoll: Epoll,
    }

    /// A header from the guest on (guest port, host port).
    fn ghdr(op: u16, guest_port: u32, host_port: u32) -> PacketHeader {
        PacketHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..PacketHeader::default()
        }
    }

    fn client(path: &Path) -> UnixStream {
        let c = UnixStream::connect(path).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c
    }

    /// The client's next read is EOF (not data, not a timeout).
    fn assert_eof(c: &mut UnixStream) {
        let mut b = [0u8; 64];
        assert_eq!(c.read(&mut b).unwrap(), 0, "expected EOF");
    }

    /// The client was closed: EOF, or ECONNRESET if it had sent more than the muxer read.
    fn assert_closed(c: &mut UnixStream) {
        match c.read(&mut [0u8; 64]) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("expected the socket closed, got {other:?}"),
        }
    }

    impl Harness {
        fn new() -> Self {
            let dir = TempDir::new_with_prefix("/tmp/vsock-muxer").unwrap();
            let path = dir.as_path().join("v.sock");
            let m = VsockMuxer::new(CID, &path).unwrap();
            let mut h = Harness {
                _dir: dir,
                path,
                m,
                epoll: Epoll::new().unwrap(),
            };
            h.apply();
            h
        }

        fn apply(&mut self) {
            for change in self.m.take_interest_changes() {
                let (op, fd, ev) = change.epoll_ctl(0);
                // Fails if an fd was closed before its Remove, or changed before its Add.
                self.epoll.ctl(op, fd, ev).unwrap();
            }
        }

        /// One non-blocking epoll round; returns how many events were dispatched.
        fn poll(&mut self) -> usize {
            self.apply();
            let mut evs = [EpollEvent::default(); 128];
            let n = self.epoll.wait(0, &mut evs).unwrap();
            for e in &evs[..n] {
                let s = e.event_set();
                let hangup = s.intersects(EventSet::HANG_UP | EventSet::ERROR);
                self.m.host_event(
                    e.data(),
                    s.contains(EventSet::IN),
                    s.contains(EventSet::OUT),
                    hangup,
                );
            }
            self.apply();
            n
        }

        /// Polls until epoll is quiet; fails if the loop keeps spinning.
        fn settle(&mut self) {
            for _ in 0..50 {
                if self.poll() == 0 {
                    return;
                }
            }
            panic!("epoll keeps reporting events: the loop would spin");
        }

        fn rx_with(&mut self, cap: usize) -> Option<(PacketHeader, Vec<u8>)> {
            let mut buf = vec![0u8; cap];
            let hdr = self.m.recv_for_guest(&mut buf)?;
            buf.truncate(hdr.len as usize);
            self.apply();
            Some((hdr, buf))
        }

        fn rx(&mut self) -> Option<(PacketHeader, Vec<u8>)> {
            self.rx_with(4096)
        }

        fn send(&mut self, hdr: PacketHeader, data: &[u8]) {
            let hdr = PacketHeader {
                len: data.len() as u32,
                ..hdr
            };
            self.m.send_to_host(&hdr, data);
            self.apply();
        }

        /// A client connects and asks for guest port `port`; returns it and the REQUEST.
        fn connect_host(&mut self, port: u32) -> (UnixStream, PacketHeader) {
            let mut c = client(&self.path);
            c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
            self.settle();
            let (req, _) = self.rx().expect("no REQUEST for the guest");
            assert_eq!(req.op, OP_REQUEST);
            assert_eq!(
                (req.src_cid, req.dst_cid, req.dst_port),
                (HOST_CID, CID, port)
            );
            (c, req)
        }

        /// A connected host client to guest port `port` with the guest's buffer `buf_alloc`;
        /// returns it and the host port.
        fn establish(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
            let (mut c, req) = self.connect_host(port);
            self.send(
                PacketHeader {
                    buf_alloc,
                    ..ghdr(OP_RESPONSE, port, req.src_port)
                },
                &[],
            );
            self.settle();
            let ok = format!("OK {}\n", req.src_port);
            let mut got = vec![0u8; ok.len()];
            c.read_exact(&mut got).unwrap();
            assert_eq!(got, ok.as_bytes());
            (c, req.src_port)
        }
    }

    #[test]
    fn header_wire_format() {
        let h = PacketHeader {
            src_cid: 0x0102030405060708,
            dst_cid: 2,
            src_port: 0x11223344,
            dst_port: 5,
            len: 6,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0xAABBCCDD,
            fwd_cnt: 9,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[36..44], &[0xDD, 0xCC, 0xBB, 0xAA, 9, 0, 0, 0]);
        assert_eq!(PacketHeader::from_bytes(&b), h);
    }

    #[test]
    fn bind_replaces_stale_socket_but_not_a_file() {
        let h = Harness::new();
        let again = VsockMuxer::new(CID, &h.path);
        assert!(again.is_ok(), "a stale socket must be replaced");
        let file = h.path.with_file_name("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            VsockMuxer::new(CID, &file),
            Err(VsockError::NotASocket(_))
        ));
        assert!(matches!(
            VsockMuxer::new(2, &h.path),
            Err(VsockError::InvalidCid(2))
        ));
    }

    #[test]
    fn host_initiated_handshake() {
        let mut h = Harness::new();
        let (_c1, port1) = h.establish(1234, 1 << 20);
        assert!(port1 >= FIRST_LOCAL_PORT);
        let (_c2, port2) = h.establish(1234, 1 << 20);
        assert_ne!(port1, port2);
        assert_eq!(h.m.connections(), 2);
        // The guest refuses: the client is closed without OK.
        let (mut c3, req) = h.connect_host(99);
        assert_eq!(req.buf_alloc, BUF_ALLOC);
        h.send(ghdr(OP_RST, 99, req.src_port), &[]);
        assert_eof(&mut c3);
        assert_eq!(h.m.connections(), 2);
        assert!(h.rx().is_none(), "an RST is not answered");
        // The client gives up before the guest answers: the guest's half is reset.
        let (c4, req) = h.connect_host(98);
        drop(c4);
        h.settle();
        let (rst, _) = h.rx().unwrap();
        assert_eq!(
            (rst.op, rst.src_port, rst.dst_port),
            (OP_RST, req.src_port, 98)
        );
        // The guest never answers: the client is closed and the guest reset at the timeout.
        let (mut c5, req) = h.connect_host(97);
        h.m.tick(Instant::now() + REQUEST_TIMEOUT * 2);
        assert_eof(&mut c5);
        assert_eq!(h.rx().unwrap().0.src_port, req.src_port);
        assert_eq!(
            h.m.connections(),
            2,
            "established connections have no deadline"
        );
    }

    #[test]
    fn data_both_ways_with_credit() {
        let mut h = Harness::new();
        let (mut c, port) = h.establish(80, 1 << 20);
        h.send(ghdr(OP_RW, 80, port), b"hello");
        let mut got = [0u8; 5];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        c.write_all(b"world!").unwrap();
        h.settle();
        let (hdr, data) = h.rx().expect("host data for the guest");
        assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (OP_RW, port, 80));
        assert_eq!(data, b"world!");
        assert_eq!(
            hdr.fwd_cnt, 5,
            "fwd_cnt counts guest bytes forwarded, not the OK line"
        );
        assert_eq!(hdr.buf_alloc, BUF_ALLOC);
        assert!(h.rx().is_none());
        assert!(!h.m.has_pending_rx());
        h.settle(); // re-armed readable, nothing to read: quiet
    }

    #[test]
    fn credit_exhaustion_pauses_reading_until_credit_update() {
        let mut h = Harness::new();
        let (mut c, port) = h.establish(80, 10);
        c.write_all(&[7u8; 25]).unwrap();
        h.settle();
        let (hdr, data) = h.rx().unwrap();
        assert_eq!((hdr.op, data.len()), (OP_RW, 10));
        let (hdr, _) = h.rx().unwrap();
        assert_eq!(hdr.op, OP_CREDIT_REQUEST);
        assert!(h.rx().is_none());
        assert!(!h.m.has_pending_rx());
        assert_eq!(
            h.poll(),
            0,
            "a connection without credit must not stay armed readable"
        );
        let upd = PacketHeader {
            buf_alloc: 10,
            fwd_cnt: 10,
            ..ghdr(OP_CREDIT_UPDATE, 80, port)
        };
        h.send(upd, &[]);
        let (hdr, data) = h.rx().unwrap();
        assert_eq!((hdr.op, data.len()), (OP_RW, 10));
        h.send(PacketHeader { fwd_cnt: 20, ..upd }, &[]);
        let (hdr, data) = h.rx().unwrap();
        assert_eq!((hdr.op, data.len()), (OP_RW, 5));
        // A small RX buffer limits the read too.
        c.write_all(&[1u8; 8]).unwrap();
        h.settle();
        h.send(PacketHeader { fwd_cnt: 25, ..upd }, &[]);
        let (_, data) = h.rx_with(3).unwrap();
        assert_eq!(data.len(), 3);
    }

    #[test]
    fn guest_exceeding_credit_is_reset() {
        let mut h = Harness::new();
        let (_c, port) = h.establish(80, 1 << 20); // the client never reads
        let chunk = vec![0x5Au8; 64 << 10];
        for _ in 0..(BUF_ALLOC as usize / chunk.len()) {
            h.send(ghdr(OP_RW, 80, port), &chunk);
        }
        assert_eq!(h.m.connections(), 1, "data within credit is accepted");
        h.send(ghdr(OP_CREDIT_REQUEST, 80, port), &[]);
        let upd = std::iter::from_fn(|| h.rx())
            .find(|(p, _)| p.op == OP_CREDIT_UPDATE)
            .unwrap()
            .0;
        assert!(
            upd.fwd_cnt < BUF_ALLOC,
            "the host socket should not take everything"
        );
        // The guest may send fwd_cnt more bytes; one more is a violation.
        h.send(ghdr(OP_RW, 80, port), &vec![0u8; upd.fwd_cnt as usize + 1]);
        let (rst, _) = h.rx().unwrap();
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, port, 80));
        assert_eq!(h.m.connections(), 0);
    }

    #[test]
    fn buffered_guest_data_flushes_when_host_reads() {
        let mut h = Harness::new();
        let (mut c, port) = h.establish(80, 1 << 20);
        let data: Vec<u8> = (0..BUF_ALLOC).map(|i| (i % 251) as u8).collect();
        for chunk in data.chunks(32 << 10) {
            h.send(ghdr(OP_RW, 80, port), chunk);
        }
        c.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        for _ in 0..1000 {
            match c.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            h.poll(); // EPOLLOUT flushes the rest
            if got.len() >= data.len() {
                break;
            }
        }
        assert!(
            got == data,
            "all guest data arrives in order ({} bytes)",
            got.len()
        );
        let upd = std::iter::from_fn(|| h.rx())
            .filter(|(p, _)| p.op == OP_CREDIT_UPDATE)
            .last();
        assert_eq!(
            upd.unwrap().0.fwd_cnt,
            BUF_ALLOC,
            "freed space is announced"
        );
        h.settle();
    }

    #[test]
    fn guest_initiated_with_and_without_listener() {
        let mut h = Harness::new();
        let mut name = h.path.as_os_str().to_os_string();
        name.push("_5000");
        let listener = UnixListener::bind(&name).unwrap();
        h.send(ghdr(OP_REQUEST, 1000, 5000), &[]);
        let (resp, _) = h.rx().unwrap();
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port, resp.dst_cid),
            (OP_RESPONSE, 5000, 1000, CID)
        );
        let (mut peer, _) = listener.accept().unwrap();
        h.settle();
        h.send(ghdr(OP_RW, 1000, 5000), b"ping");
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        peer.write_all(b"pong").unwrap();
        h.settle();
        let (hdr, data) = h.rx().unwrap();
        assert_eq!((hdr.op, data.as_slice()), (OP_RW, &b"pong"[..]));
        // Nobody listens on PATH_5001.
        h.send(ghdr(OP_REQUEST, 1001, 5001), &[]);
        let (rst, _) = h.rx().unwrap();
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 5001, 1001));
        assert_eq!(h.m.connections(), 1);
    }

    #[test]
    fn host_eof_sends_shutdown() {
        let mut h = Harness::new();
        let (mut c, port) = h.establish(80, 1 << 20);
        c.write_all(b"bye").unwrap();
        drop(c);
        h.settle();
        let (hdr, data) = h.rx().unwrap();
        assert_eq!((hdr.op, data.as_slice()), (OP_RW, &b"bye"[..]));
        let (hdr, _) = h.rx().unwrap();
        assert_eq!(
            (hdr.op, hdr.flags),
            (OP_SHUTDOWN, SHUTDOWN_SEND),
            "the host only stopped sending"
        );
        h.settle();
        assert_eq!(h.m.connections(), 1);
        h.send(ghdr(OP_RST, 80, port), &[]);
        assert_eq!(h.m.connections(), 0);

        // A half-close: the guest keeps sending after the host's EOF, and its data arrives
        // whole; the guest's own shutdown then ends the connection.
        let (c, port) = h.establish(81, 1 << 20);
        c.shutdown(std::net::Shutdown::Write).unwrap();
        h.settle();
        assert_eq!(h.rx().unwrap().0.op, OP_SHUTDOWN);
        h.m.tick(Instant::now() + SHUTDOWN_TIMEOUT * 2);
        assert_eq!(
            h.m.connections(),
            1,
            "a half-closed connection is not timed out"
        );
        h.send(ghdr(OP_RW, 81, port), b"late reply");
        let mut c = c;
        let mut got = [0u8; 10];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"late reply");
        let mut fin = ghdr(OP_SHUTDOWN, 81, port);
        fin.flags = SHUTDOWN_SEND;
        h.send(fin, &[]);
        assert_eq!(h.m.connections(), 0, "both sides done: closed");
        assert_eof(&mut c);
        h.settle();
    }

    #[test]
    fn guest_rst_closes_host_socket() {
        let mut h = Harness::new();
        let (mut c, port) = h.establish(80, 1 << 20);
        h.send(ghdr(OP_RST, 80, port), &[]);
        assert_eof(&mut c);
        assert_eq!(h.m.connections(), 0);
        assert!(h.rx().is_none());
        h.settle();
    }

    #[test]
    fn guest_shutdown_half_and_full() {
        let mut h = Harness::new();
        let (mut c, port) = h.establish(80, 1 << 20);
        h.send(ghdr(OP_RW, 80, port), b"last");
        h.send(
            PacketHeader {
                flags: SHUTDOWN_SEND,
                ..ghdr(OP_SHUTDOWN, 80, port)
            },
            &[],
        );
        let mut got = [0u8; 4];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"last");
        assert_eof(&mut c);
        c.write_all(b"more").unwrap(); // the other direction still works
        h.settle();
        let (hdr, data) = h.rx().unwrap();
        assert_eq!((hdr.op, data.as_slice()), (OP_RW, &b"more"[..]));
        h.send(
            PacketHeader {
                flags: 3,
                ..ghdr(OP_SHUTDOWN, 80, port)
            },
            &[],
        );
        assert_eq!(h.rx().unwrap().0.op, OP_RST);
        assert_eq!(h.m.connections(), 0);
        h.settle();
    }

    #[test]
    fn malformed_connect_lines_close_the_client() {
        let mut h = Harness::new();
        let long = [b'A'; 40];
        for line in [
            &b"CONNECT abc\n"[..],
            b"CONNECT\n",
            b"HELLO 5\n",
            b"CONNECT 99999999999\n",
            &long,
            b"CONNECT 12",
        ] {
            let mut c = client(&h.path);
            c.write_all(line).unwrap();
            c.shutdown(Shutdown::Write).unwrap(); // EOF before any newline
            h.settle();
            assert_closed(&mut c);
            assert!(
                h.rx().is_none(),
                "no REQUEST for {:?}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(h.m.connections(), 0);
        // Split over several writes, with stream data right behind the line.
        let mut c = client(&h.path);
        c.write_all(b"CONN").unwrap();
        h.settle();
        c.write_all(b"ECT 7\nearly").unwrap();
        h.settle();
        let (req, _) = h.rx().unwrap();
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 7));
        h.send(ghdr(OP_RESPONSE, 7, req.src_port), &[]);
        h.settle();
        let (hdr, data) = h.rx().unwrap();
        assert_eq!((hdr.op, data.as_slice()), (OP_RW, &b"early"[..]));
    }

    #[test]
    fn pending_connection_cap_and_timeout() {
        let mut h = Harness::new();
        let mut clients: Vec<UnixStream> = (0..MAX_PENDING + 3).map(|_| client(&h.path)).collect();
        h.settle();
        assert_eq!(h.m.connections(), MAX_PENDING);
        let mut closed = 0;
        for c in &mut clients {
            c.set_nonblocking(true).unwrap();
            if matches!(c.read(&mut [0u8; 8]), Ok(0)) {
                closed += 1;
            }
        }
        assert_eq!(closed, 3, "clients over the cap are closed at once");
        h.m.tick(Instant::now() + PENDING_TIMEOUT * 2);
        assert_eq!(h.m.connections(), 0, "silent clients time out");
        assert!(h.rx().is_none());
        h.settle();
        for c in &mut clients {
            assert!(matches!(c.read(&mut [0u8; 8]), Ok(0)));
        }
        h.connect_host(5); // the listener still serves
    }

    #[test]
    fn reset_drops_every_connection() {
        let mut h = Harness::new();
        let (mut a, _) = h.establish(1, 1 << 20);
        let (mut b, _) = h.establish(2, 1 << 20);
        let mut pending = client(&h.path);
        h.settle();
        a.write_all(b"x").unwrap();
        h.settle();
        assert!(h.m.has_pending_rx());
        h.m.reset();
        assert_eq!(h.m.connections(), 0);
        assert!(!h.m.has_pending_rx());
        assert!(h.rx().is_none());
        for c in [&mut a, &mut b, &mut pending] {
            assert_eof(c);
        }
        h.settle();
        h.connect_host(3);
    }

    #[test]
    fn bad_packets_get_rst() {
        let mut h = Harness::new();
        for bad in [
            PacketHeader {
                dst_cid: 7,
                ..ghdr(OP_REQUEST, 1, 2)
            },
            PacketHeader {
                src_cid: 9,
                ..ghdr(OP_REQUEST, 1, 2)
            },
            PacketHeader {
                type_: 2,
                ..ghdr(OP_REQUEST, 1, 2)
            },
            ghdr(OP_RW, 1, 2),
            ghdr(OP_CREDIT_REQUEST, 1, 2),
        ] {
            h.send(bad, &[]);
            let (rst, _) = h.rx().expect("RST");
            assert_eq!(
                (rst.op, rst.src_port, rst.dst_port, rst.dst_cid),
                (OP_RST, 2, 1, CID)
            );
        }
        h.send(ghdr(OP_RST, 1, 2), &[]);
        assert!(h.rx().is_none(), "an RST is never answered");
        let (mut c, port) = h.establish(80, 1 << 20);
        h.send(ghdr(42, 80, port), &[]);
        assert_eq!(h.rx().unwrap().0.op, OP_RST);
        assert_eof(&mut c);
        assert_eq!(h.m.connections(), 0);
    }

    #[test]
    fn round_robin_across_connections() {
        let mut h = Harness::new();
        let (mut a, pa) = h.establish(1, 1 << 20);
        let (mut b, pb) = h.establish(2, 1 << 20);
        a.write_all(&[1u8; 8192]).unwrap();
        b.write_all(&[2u8; 8192]).unwrap();
        h.settle();
        let ports: Vec<u32> = (0..4)
            .map(|_| h.rx_with(1024).unwrap().0.src_port)
            .collect();
        assert_eq!(ports, [pa, pb, pa, pb]);
    }
}

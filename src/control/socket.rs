//! Transport of the control pipe: a listening Unix stream socket with any number of clients, or
//! an inherited, already-connected fd (pair). Framing and replies come from [`crate::control::protocol`];
//! everything here is non-blocking and driven by the main epoll loop.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::ControlEndpoint;
use crate::control::protocol::{handle, ControlTarget, LineReader, MAX_LINE};

/// Id of the listening socket. The server's ids are its own: on epoll they are offset by the
/// base the event loop gives [`ControlServer::register`].
const TOKEN_LISTENER: u64 = 0;
/// Id of the inherited control connection.
const TOKEN_FD: u64 = 1;
/// First id of accepted clients.
const TOKEN_CLIENT_BASE: u64 = 2;
/// Replies a client may leave unread before it is disconnected.
const MAX_PENDING_OUTPUT: usize = 64 << 10;
/// Most control connections open at once. A new connection beyond it closes the connection that
/// has been quiet longest (a `watch` client only if every one is watching), so idle or
/// half-written connections can never lock out a working client; each costs two fds.
pub const MAX_CLIENTS: usize = 64;

/// Control transport errors.
#[derive(Debug, thiserror::Error)]
pub enum ControlSocketError {
    /// Something other than a socket exists at the path.
    #[error("--control: {0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    /// The stale socket could not be removed.
    #[error("--control: cannot remove the stale socket {0}: {1}")]
    Unlink(PathBuf, #[source] std::io::Error),
    /// bind/listen failed.
    #[error("--control: cannot listen on {0}: {1}")]
    Bind(PathBuf, #[source] std::io::Error),
    /// The inherited fd is not open.
    #[error("--control: fd {0} is not an open file descriptor")]
    BadFd(RawFd),
    /// fcntl or epoll failed.
    #[error("control pipe setup: {0}")]
    Io(#[source] std::io::Error),
}

/// One connection: a reader/writer pair with its framing state and unsent output.
struct Conn {
    input: File,
    output: Option<File>,
    lines: LineReader,
    pending: Vec<u8>,
    eof: bool,
    /// The client sent `watch`: event lines are queued for it.
    watching: bool,
    /// When the client last completed a request (or connected).
    last_active: Instant,
}

impl Conn {
    fn new(input: File, output: Option<File>) -> Self {
        Conn {
            input,
            output,
            lines: LineReader::new(),
            pending: Vec::new(),
            eof: false,
            watching: false,
            last_active: Instant::now(),
        }
    }
}

/// Listener and connections of the control pipe.
pub struct ControlServer {
    listener: Option<(UnixListener, PathBuf)>,
    fd_conn: Option<Conn>,
    clients: HashMap<u64, Conn>,
    next_token: u64,
    /// Added to every id on epoll (set by `register`).
    base: u64,
    /// A spare descriptor, given up to accept (and close) one connection when the process is
    /// out of descriptors, so the listener does not stay readable and spin the loop.
    reserve: Option<File>,
    /// Connections are being shed for lack of descriptors (logged once per episode).
    shedding: bool,
}

fn take_fd(fd: RawFd) -> Result<File, ControlSocketError> {
    // SAFETY: F_GETFD only queries the descriptor.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(ControlSocketError::BadFd(fd));
    }
    crate::host::terminal::set_nonblocking(fd, true).map_err(ControlSocketError::Io)?;
    // SAFETY: the user handed this inherited fd to minivmm (`--control fd=N`); we take ownership.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl ControlServer {
    /// Opens the endpoint (before any seccomp filter is installed).
    pub fn open(endpoint: &ControlEndpoint) -> Result<Self, ControlSocketError> {
        let mut server = ControlServer {
            listener: None,
            fd_conn: None,
            clients: HashMap::new(),
            next_token: TOKEN_CLIENT_BASE,
            base: 0,
            reserve: None,
            shedding: false,
        };
        match endpoint {
            ControlEndpoint::Socket(path) => {
                match std::fs::symlink_metadata(path) {
                    Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
                        .map_err(|e| ControlSocketError::Unlink(path.clone(), e))?,
                    Ok(_) => return Err(ControlSocketError::NotASocket(path.clone())),
                    Err(_) => {}
                }
                let listener = UnixListener::bind(path)
                    .map_err(|e| ControlSocketError::Bind(path.clone(), e))?;
                listener
                    .set_nonblocking(true)
                    .map_err(ControlSocketError::Io)?;
                server.reserve = Some(spare_fd(&listener).map_err(ControlSocketError::Io)?);
                server.listener = Some((listener, path.clone()));
            }
            ControlEndpoint::Fd { read, write } => {
                let input = take_fd(*read)?;
                let output = if write == read {
                    Some(input.try_clone().map_err(ControlSocketError::Io)?)
                } else {
                    Some(take_fd(*write)?)
                };
                server.fd_conn = Some(Conn::new(input, output));
            }
        }
        Ok(server)
    }

    /// Adds the endpoint's fds to `epoll`; their epoll data is `base` plus the server's id, and
    /// the event loop passes the id (data minus `base`) back to [`ControlServer::handle`].
    pub fn register(&mut self, epoll: &Epoll, base: u64) -> Result<(), ControlSocketError> {
        self.base = base;
        if let Some((l, _)) = &self.listener {
            add(epoll, l.as_raw_fd(), base + TOKEN_LISTENER).map_err(ControlSocketError::Io)?;
        }
        if let Some(c) = &self.fd_conn {
            add(epoll, c.input.as_raw_fd(), base + TOKEN_FD).map_err(ControlSocketError::Io)?;
        }
        Ok(())
    }

    /// Handles readiness of one control fd; requests are answered through `target`.
    pub fn handle(
        &mut self,
        epoll: &Epoll,
        token: u64,
        events: EventSet,
        target: &mut impl ControlTarget,
    ) {
        if token == TOKEN_LISTENER {
            self.accept(epoll);
            return;
        }
        let Some(conn) = self.conn_mut(token) else {
            return;
        };
        if events.contains(EventSet::OUT) {
            flush(conn);
        }
        if events
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
        {
            serve(conn, target);
        }
        self.settle(epoll, token);
    }

    /// The connection with id `token`.
    fn conn_mut(&mut self, token: u64) -> Option<&mut Conn> {
        if token == TOKEN_FD {
            self.fd_conn.as_mut()
        } else {
            self.clients.get_mut(&token)
        }
    }

    /// Queues an event line (without `'\n'`) for every client that sent `watch`. A watcher that
    /// has more than 64 KiB unread is disconnected, like any client that
    /// does not read its replies: the VM never waits for a client.
    pub fn broadcast(&mut self, epoll: &Epoll, line: &str) {
        let mut tokens = Vec::new();
        let fd_conn = self.fd_conn.iter_mut().map(|c| (TOKEN_FD, c));
        for (token, conn) in fd_conn.chain(self.clients.iter_mut().map(|(t, c)| (*t, c))) {
            if conn.watching && conn.output.is_some() {
                conn.pending.extend_from_slice(line.as_bytes());
                conn.pending.push(b'\n');
                flush(conn);
                tokens.push(token);
            }
        }
        for token in tokens {
            self.settle(epoll, token);
        }
    }

    /// Writes what the clients accept now, without waiting (used once, before minivmm exits).
    pub fn flush_all(&mut self) {
        if let Some(c) = self.fd_conn.as_mut() {
            flush(c);
        }
        for c in self.clients.values_mut() {
            flush(c);
        }
    }

    /// After I/O on a connection: closes it when it is done or too far behind, else watches it
    /// for the readiness it needs.
    fn settle(&mut self, epoll: &Epoll, token: u64) {
        let base = self.base;
        let Some(conn) = self.conn_mut(token) else {
            return;
        };
        let done = (conn.eof && (conn.pending.is_empty() || conn.output.is_none()))
            || conn.pending.len() > MAX_PENDING_OUTPUT;
        if done {
            if conn.pending.len() > MAX_PENDING_OUTPUT {
                log::warn!(
                    "control: a client left more than {MAX_PENDING_OUTPUT} bytes unread; disconnected"
                );
            }
            self.close(epoll, token);
            return;
        }
        // Watch for writability only while output is queued.
        let mut want = EventSet::empty();
        if !conn.eof {
            want |= EventSet::IN;
        }
        if !conn.pending.is_empty() {
            want |= EventSet::OUT;
        }
        let fd = conn.input.as_raw_fd();
        let data = base + token;
        if let Err(e) = epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(want, data)) {
            log::warn!("control: epoll modify: {e}");
        }
    }

    fn accept(&mut self, epoll: &Epoll) {
        let Some((listener, _)) = &self.listener else {
            return;
        };
        let mut accepted = Vec::new();
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    self.shedding = false;
                    accepted.push(stream);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Out of descriptors: shed the waiting connection with the spare one, else
                    // the listener stays readable and the loop spins.
                    if !self.shedding {
                        log::warn!(
                            "control: out of file descriptors ({e}); closing new connections until some are free"
                        );
                        self.shedding = true;
                    }
                    // (accept reports EMFILE before it looks at the queue, so the queue may be
                    // empty: stop when the shed accept finds nothing.)
                    self.reserve = None;
                    // The shed connection is closed at the end of this statement.
                    let shed_one = listener.accept().is_ok();
                    self.reserve = spare_fd(listener).ok();
                    if !shed_one || self.reserve.is_none() {
                        break;
                    }
                }
                Err(e) => {
                    log::warn!("control: accept: {e}");
                    break;
                }
            }
        }
        for stream in accepted {
            if self.clients.len() >= MAX_CLIENTS && !self.evict_one(epoll) {
                let mut stream = stream;
                let _ = stream.set_nonblocking(true);
                let _ = stream.write_all(
                    format!(
                        "error {MAX_CLIENTS} control connections are open and all of them are watching; try again later\n"
                    )
                    .as_bytes(),
                );
                continue;
            }
            if let Err(e) = self.add_client(epoll, stream) {
                log::warn!("control: dropping a client: {e}");
            }
        }
    }

    /// Closes the connection that has been quiet longest, preferring ones that are not watching;
    /// false if every connection is watching.
    fn evict_one(&mut self, epoll: &Epoll) -> bool {
        let quietest = self
            .clients
            .iter()
            .filter(|(_, c)| !c.watching)
            // The older connection (lower token) on a tie.
            .min_by_key(|(t, c)| (c.last_active, **t))
            .map(|(t, _)| *t);
        let Some(token) = quietest else {
            return false;
        };
        log::info!("control: {MAX_CLIENTS} connections open; closing the one quiet longest");
        if let Some(conn) = self.clients.get_mut(&token) {
            conn.pending.extend_from_slice(
                format!(
                    "error closed: {MAX_CLIENTS} control connections were open and this one was the quietest\n"
                )
                .as_bytes(),
            );
            flush(conn);
        }
        self.close(epoll, token);
        true
    }

    fn add_client(&mut self, epoll: &Epoll, stream: UnixStream) -> std::io::Result<()> {
        stream.set_nonblocking(true)?;
        let input = File::from(std::os::fd::OwnedFd::from(stream));
        let output = input.try_clone()?;
        let token = self.next_token;
        self.next_token += 1;
        add(epoll, input.as_raw_fd(), self.base + token)?;
        self.clients.insert(token, Conn::new(input, Some(output)));
        Ok(())
    }

    fn close(&mut self, epoll: &Epoll, token: u64) {
        let conn = if token == TOKEN_FD {
            self.fd_conn.take()
        } else {
            self.clients.remove(&token)
        };
        if let Some(conn) = conn {
            if conn.lines.has_partial() {
                log::info!("control: client disconnected in the middle of a request; ignored");
            }
            let _ = epoll.ctl(
                ControlOperation::Delete,
                conn.input.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Some((_, path)) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn add(epoll: &Epoll, fd: RawFd, token: u64) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

/// A spare descriptor (a duplicate of `listener`'s), held so one can be freed when the process
/// runs out.
fn spare_fd(listener: &UnixListener) -> std::io::Result<File> {
    let fd = listener.as_fd().try_clone_to_owned()?;
    Ok(File::from(fd))
}

/// Reads what is available, answers every complete line.
fn serve(conn: &mut Conn, target: &mut impl ControlTarget) {
    let mut buf = [0u8; MAX_LINE];
    match conn.input.read(&mut buf) {
        Ok(0) => conn.eof = true,
        Ok(n) => {
            // Activity is a whole request: bytes that never complete a line (a slowloris client)
            // do not keep a connection from being the quietest.
            for line in conn.lines.push(&buf[..n]) {
                conn.last_active = Instant::now();
                let reply = handle(&line, target);
                conn.pending.extend_from_slice(reply.line.as_bytes());
                conn.watching |= reply.subscribe;
            }
            flush(conn);
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
        Err(e) => {
            log::info!("control: read: {e}");
            conn.eof = true;
        }
    }
}

/// Writes as much queued output as the peer accepts without blocking.
fn flush(conn: &mut Conn) {
    let Some(out) = conn.output.as_mut() else {
        conn.pending.clear();
        return;
    };
    while !conn.pending.is_empty() {
        match out.write(&conn.pending) {
            Ok(0) => break,
            Ok(n) => {
                conn.pending.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                log::info!("control: write: {e}");
                conn.pending.clear();
                conn.output = None;
                conn.eof = true;
                break;
            }
        }
    }
}

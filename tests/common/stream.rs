//! Host-side data helpers of the vsock tests and benchmarks: the byte pattern and checksum the
//! guest's `vsock-tool` uses, an echo exchange and a checksumming sink, over any connected
//! socket (a unix socket or an AF_VSOCK one, as a `File`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

/// The pattern vsock-tool sends: byte i is (i * 31 + i / 4096) & 0xff.
pub fn pattern(from: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        let i = from + k as u64;
        *b = ((i * 31 + i / 4096) & 0xff) as u8;
    }
}

/// FNV-1a 64, as vsock-tool computes it.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Fnv {
    /// The FNV-1a offset basis.
    pub fn new() -> Self {
        Fnv(1469598103934665603)
    }
    /// Hashes `data` in.
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(1099511628211);
        }
    }
}

impl Default for Fnv {
    fn default() -> Self {
        Fnv::new()
    }
}

/// The checksum of the first `n` pattern bytes.
pub fn pattern_hash(n: u64) -> u64 {
    let mut h = Fnv::new();
    let mut buf = vec![0u8; 65536];
    let mut at = 0;
    while at < n {
        let k = (n - at).min(buf.len() as u64) as usize;
        pattern(at, &mut buf[..k]);
        h.update(&buf[..k]);
        at += k as u64;
    }
    h.0
}

/// Shuts down the write side of a socket.
pub fn shutdown_write(f: &File) {
    // SAFETY: shutdown(2) on a socket descriptor we own; no memory is involved.
    unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
}

/// Sends `n` pattern bytes on `s` while reading the echo; returns (bytes echoed, their hash).
pub fn echo_exchange(s: File, n: u64) -> (u64, u64) {
    let mut w = s.try_clone().expect("dup the connection");
    let writer = thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut at = 0;
        while at < n {
            let k = (n - at).min(buf.len() as u64) as usize;
            pattern(at, &mut buf[..k]);
            w.write_all(&buf[..k]).expect("write to the guest");
            at += k as u64;
        }
        shutdown_write(&w);
    });
    let mut r = s;
    let mut h = Fnv::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let k = r.read(&mut buf).expect("read the echo");
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        got += k as u64;
    }
    writer.join().expect("writer thread");
    (got, h.0)
}

/// Reads a connection to its end and answers "<bytes> <hash>\n" (what vsock-tool's `send`
/// waits for).
pub fn sink(mut s: File) {
    let mut h = Fnv::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
        }
    }
    let _ = writeln!(s, "{n} {:016x}", h.0);
}

/// Host-initiated connection to guest port `port` through minivmm's hybrid vsock socket `sock`
/// (`CONNECT <port>` answered by `OK <host port>`); reads and writes time out after `timeout`.
pub fn hybrid_connect(sock: &Path, port: u32, timeout: Duration) -> File {
    let mut s = UnixStream::connect(sock).expect("connect to the vsock socket");
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        let n = s.read(&mut byte).expect("read the OK line");
        assert_eq!(n, 1, "the socket closed before OK (line so far {line:?})");
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line).to_string();
    let local: u32 = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("want OK <port>, got {line:?}"));
    assert!(local > 0);
    File::from(OwnedFd::from(s))
}

/// A host listener on `<sock>_<port>` (where minivmm sends guest connections to host port
/// `port`) that [`sink`]s one connection.
pub fn hybrid_sink(sock: &Path, port: u32) -> thread::JoinHandle<()> {
    let path = format!("{}_{port}", sock.display());
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind the host listener");
    thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            sink(File::from(OwnedFd::from(s)));
        }
    })
}

/// Reads `s` to its end, after whatever was still buffered: the other side closed it (end of
/// file, or a reset); panics on anything else, such as a read timeout.
pub fn read_to_close(mut s: impl Read, what: &str) {
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: not closed: {e}"),
        }
    }
}

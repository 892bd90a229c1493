//! Collecting a child process's output (an emulated host's or a guest's console) for the
//! harness to wait on, with a time-stamped log copy.

use super::*;

/// Serial output collected by a reader thread: bytes plus end-of-stream, with a condvar for waiters.
#[derive(Default)]
pub(crate) struct Collected {
    /// The bytes so far, and whether the stream has ended.
    pub(crate) state: Mutex<(Vec<u8>, bool)>,
    cond: Condvar,
}

impl Collected {
    pub(crate) fn push(&self, bytes: &[u8]) {
        lock(&self.state).0.extend_from_slice(bytes);
        self.cond.notify_all();
    }

    pub(crate) fn close(&self) {
        lock(&self.state).1 = true;
        self.cond.notify_all();
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.state).0).into_owned()
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.state).0.len()
    }

    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.state).1
    }

    /// Waits until `pred(bytes)` is Some, the stream closes, or the deadline passes.
    pub(crate) fn wait<R>(
        &self,
        deadline: Instant,
        mut pred: impl FnMut(&[u8]) -> Option<R>,
    ) -> Option<R> {
        let mut st = lock(&self.state);
        loop {
            if let Some(r) = pred(&st.0) {
                return Some(r);
            }
            let now = Instant::now();
            if st.1 || now >= deadline {
                return None;
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            st = self
                .cond
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Copies `src` into `sink` (and optionally a log file, see [`LineStamper`]) until EOF.
pub(crate) fn spawn_reader(
    mut src: impl Read + Send + 'static,
    sink: Arc<Collected>,
    mut log: Option<File>,
    start: Instant,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut stamper = LineStamper::new(start);
        loop {
            match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    sink.push(&buf[..n]);
                    if let Some(f) = log.as_mut() {
                        let _ = f.write_all(&stamper.feed(&buf[..n]));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if let Some(f) = log.as_mut() {
            let _ = f.write_all(&stamper.finish());
        }
        sink.close();
    })
}

/// Turns a byte stream into log lines `[  12.345] text`, stamped with the time (seconds since `start`) at
/// which the line was completed; drops `\r`.
pub struct LineStamper {
    pending: Vec<u8>,
    start: Instant,
}

impl LineStamper {
    /// A stamper measuring from `start`.
    pub fn new(start: Instant) -> Self {
        LineStamper {
            pending: Vec::new(),
            start,
        }
    }

    /// Feeds bytes; returns the stamped lines they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\r' {
                continue;
            }
            self.pending.push(b);
            if b == b'\n' {
                out.extend_from_slice(&self.stamp());
            }
        }
        out
    }

    /// Stamps a last unterminated line, if any.
    pub fn finish(&mut self) -> Vec<u8> {
        if self.pending.is_empty() {
            return Vec::new();
        }
        self.pending.push(b'\n');
        self.stamp()
    }

    pub(crate) fn stamp(&mut self) -> Vec<u8> {
        let mut line = format!("[{:8.3}] ", self.start.elapsed().as_secs_f64()).into_bytes();
        line.append(&mut self.pending);
        line
    }
}

//! The virtio-mmio transport over a virtio-blk device (an in-memory disk, sometimes
//! read-only, sometimes with a failing sector) or a virtio-vsock device (a muxer listening
//! in a temp dir made once per process), with 1 MiB of guest memory at 0 and sometimes a
//! second region above a hole.
//!
//! Input: a config byte (bit 0 vsock, bit 1 read-only disk, bit 2 second memory region,
//! bits 3-4 disk sectors, bits 5-6 a partial last sector, bit 7 a failing disk sector), then
//! operations: a tag byte and its arguments (register reads and writes of any offset and
//! width; "negotiate and set up every queue" and "set up queue N at A/B/C" shortcuts; raw
//! guest memory writes; descriptors, avail-ring pushes and whole requests written into a
//! queue the harness set up; kicks; for vsock, host clients connecting and writing).
//!
//! Invariants: `process` returns (libFuzzer's `-timeout` catches a hang); `InterruptStatus`
//! holds only bits 0-1; after a status-0 write the device reads as reset (status 0, every
//! `QueueReady` 0); on a queue whose rings the harness knows, a kick advances the used index
//! by at most the chains that were available, and each new used element names a head inside
//! the queue and has length 0 or at most the bytes its chain's writable descriptors cover
//! (checked only where nothing else the device writes, another queue's used ring or a buffer
//! of a pending chain, lies over that used ring); a
//! read-only disk's bytes never change, the disk never changes size, and bytes past its
//! last whole sector never change. A register write (a vCPU thread's part) never changes the
//! vsock muxer's connections; a reset drops them all once the harness settles the device, as
//! the event loop does on `DeviceEvent::VirtioStatus`.

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{CountingTrigger, Input};
use minivmm::devices::virtio::block::{Block, Disk};
use minivmm::devices::virtio::mmio::MmioTransport;
use minivmm::devices::virtio::vsock::muxer::{Interest, VsockMuxer};
use minivmm::devices::virtio::vsock::Vsock;
use minivmm::devices::virtio::{Wake, VIRTIO_F_VERSION_1};
use minivmm::devices::{lock, BusDevice, DeviceEvent};

const MAGIC: u64 = 0x000;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const INTERRUPT_STATUS: u64 = 0x060;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG: u64 = 0x100;

const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 0x40;
const FAILED: u32 = 0x80;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Guest memory: 1 MiB at 0, and with config bit 2 256 KiB at 1 MiB + 64 KiB.
const LOW_SIZE: u64 = 0x10_0000;
const HIGH_START: u64 = 0x11_0000;
const HIGH_SIZE: u64 = 0x4_0000;
/// Where request buffers go (the rings stay below).
const DATA: u64 = 0x8_0000;
/// The guest CID of the vsock device.
const CID: u64 = 3;

/// An in-memory disk that, like a file, grows when written past its end; `fail` is a byte
/// offset whose sector fails every read and write.
struct MemDisk {
    bytes: Mutex<Vec<u8>>,
    fail: Option<u64>,
}

impl MemDisk {
    fn check(&self, offset: u64, len: usize) -> std::io::Result<()> {
        match self.fail {
            Some(f) if f >= offset && f < offset.saturating_add(len as u64) => {
                Err(std::io::Error::other("injected disk error"))
            }
            _ => Ok(()),
        }
    }
}

impl Disk for MemDisk {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.check(offset, buf.len())?;
        let d = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let o = usize::try_from(offset).map_err(std::io::Error::other)?;
        let src = o
            .checked_add(buf.len())
            .and_then(|end| d.get(o..end))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.check(offset, buf.len())?;
        let mut d = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let o = usize::try_from(offset).map_err(std::io::Error::other)?;
        let end = o
            .checked_add(buf.len())
            .ok_or(std::io::ErrorKind::InvalidInput)?;
        assert!(end <= 1 << 24, "disk write at {o:#x}+{:#x}", buf.len());
        if d.len() < end {
            d.resize(end, 0);
        }
        d[o..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        self.check(0, 1)
    }
}

/// The per-process vsock socket directory and muxer.
struct VsockHost {
    path: PathBuf,
    muxer: Arc<Mutex<VsockMuxer>>,
}

fn vsock_host() -> &'static VsockHost {
    static HOST: OnceLock<VsockHost> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!(
            "minivmm-fuzz-virtio-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("vsock temp dir");
        let path = dir.join("v.sock");
        let muxer = VsockMuxer::new(CID, &path).expect("vsock muxer");
        extern "C" fn remove_dir() {
            if let Some(host) = HOST.get() {
                if let Some(dir) = host.path.parent() {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
        // SAFETY: registers a plain function with no arguments, run once at exit.
        unsafe { libc::atexit(remove_dir) };
        VsockHost {
            path,
            muxer: Arc::new(Mutex::new(muxer)),
        }
    })
}

/// What the harness knows about one queue.
#[derive(Debug, Clone, Copy)]
struct QueueShadow {
    max: u16,
    /// Set up by a shortcut (size and ring addresses below are the device's), and no raw
    /// write to a queue register since.
    known: bool,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// The device's used index (next_used), when known.
    next_used: Option<u16>,
}

impl QueueShadow {
    fn reset(&mut self) {
        *self = QueueShadow {
            max: self.max,
            known: false,
            size: self.max,
            desc: 0,
            avail: 0,
            used: 0,
            next_used: Some(0),
        };
    }
}

struct Harness {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    queues: Vec<QueueShadow>,
    vsock: bool,
    offered: u64,
    /// Host clients of the vsock muxer, and the connection tokens the muxer reported.
    clients: Vec<UnixStream>,
    tokens: Vec<u64>,
}

fn u16_at(mem: &GuestMemoryMmap, addr: u64) -> Option<u16> {
    mem.read_obj::<u16>(GuestAddress(addr)).ok()
}

fn u32_at(mem: &GuestMemoryMmap, addr: u64) -> Option<u32> {
    mem.read_obj::<u32>(GuestAddress(addr)).ok()
}

fn bytes_at(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    if mem.read_slice(&mut v, GuestAddress(addr)).is_err() {
        v.clear();
    }
    v
}

/// An upper bound of the writable bytes of the chain at `head`, walked as virtio-queue's
/// `DescriptorChain` does (ttl = queue size, one level of indirect tables, a chain ends at
/// 2^32 bytes).
fn writable_bytes(mem: &GuestMemoryMmap, desc: u64, size: u16, head: u16) -> u64 {
    let mut writable = 0u64;
    walk_writable(mem, desc, size, head, |_, len| writable += u64::from(len));
    writable
}

/// Calls `f(addr, len)` for each writable descriptor of the chain at `head`, walked as
/// [`writable_bytes`] walks it.
fn walk_writable(
    mem: &GuestMemoryMmap,
    desc: u64,
    size: u16,
    head: u16,
    mut f: impl FnMut(u64, u32),
) {
    let (mut table, mut qsize, mut ttl, mut next) = (desc, size, size, head);
    let (mut indirect, mut yielded) = (false, 0u32);
    while ttl > 0 && next < qsize {
        let at = table + u64::from(next) * 16;
        let (Ok(addr), Ok(len), Ok(flags), Ok(nxt)) = (
            mem.read_obj::<u64>(GuestAddress(at)),
            mem.read_obj::<u32>(GuestAddress(at + 8)),
            mem.read_obj::<u16>(GuestAddress(at + 12)),
            mem.read_obj::<u16>(GuestAddress(at + 14)),
        ) else {
            break;
        };
        if flags & F_INDIRECT != 0 {
            if indirect || len % 16 != 0 || len / 16 > u32::from(u16::MAX) {
                break;
            }
            (table, qsize, ttl, next, indirect) =
                (addr, (len / 16) as u16, (len / 16) as u16, 0, true);
            continue;
        }
        let Some(y) = yielded.checked_add(len) else {
            break;
        };
        yielded = y;
        if flags & F_WRITE != 0 {
            f(addr, len);
        }
        if flags & F_NEXT != 0 {
            next = nxt;
            ttl -= 1;
        } else {
            ttl = 0;
        }
    }
}

impl Harness {
    fn rd(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(&mut self, offset: u64, value: u32) {
        self.bus_write(offset, &value.to_le_bytes());
        if offset == STATUS && value == 0 {
            self.after_reset();
        }
    }

    /// A register write as a vCPU thread makes it: it must leave the host side alone (the
    /// vCPU filter forbids socket calls), so the vsock muxer keeps every connection until
    /// the main thread settles the device, as the event loop does on `VirtioStatus`; a
    /// reset then drops them all.
    fn bus_write(&mut self, offset: u64, bytes: &[u8]) {
        let conns = |h: &Self| h.vsock.then(|| lock(&vsock_host().muxer).connections());
        let before = conns(self);
        let event = self.t.write(offset, bytes);
        assert_eq!(
            conns(self),
            before,
            "a register write changed the host side"
        );
        if event == DeviceEvent::VirtioStatus {
            let reset = self.rd(STATUS) == 0;
            self.t.settle();
            if reset && self.vsock {
                assert_eq!(conns(self), Some(0), "connections left after a reset");
            }
        } else {
            assert_eq!(event, DeviceEvent::None, "register write at {offset:#x}");
        }
    }

    /// Forgets the queues after a reset and checks the device reads as reset.
    fn after_reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        assert_eq!(self.rd(STATUS), 0, "status after a reset");
        for i in 0..self.queues.len() as u32 + 1 {
            self.t.write(QUEUE_SEL, &i.to_le_bytes());
            assert_eq!(
                self.rd(QUEUE_READY),
                0,
                "QueueReady of queue {i} after a reset"
            );
        }
        self.t.write(QUEUE_SEL, &0u32.to_le_bytes());
    }

    fn running(&mut self) -> bool {
        let s = self.rd(STATUS);
        s & DRIVER_OK != 0 && s & (NEEDS_RESET | FAILED) == 0
    }

    fn check_interrupt_status(&mut self) {
        let isr = self.rd(INTERRUPT_STATUS);
        assert_eq!(isr & !3, 0, "InterruptStatus {isr:#x}");
    }

    /// A raw register access through the bus.
    fn access(&mut self, write: bool, offset: u64, width: usize, value: u64) {
        let bytes = value.to_le_bytes();
        if !write {
            let mut buf = [0u8; 8];
            self.t.read(offset, &mut buf[..width]);
            let v = u64::from_le_bytes(buf);
            if width == 4 && offset == INTERRUPT_STATUS {
                assert_eq!(v & !3, 0, "InterruptStatus {v:#x}");
            }
            if width == 4 && offset == MAGIC {
                assert_eq!(v, 0x7472_6976, "MagicValue");
            }
            if width != 4 && offset < CONFIG {
                assert_eq!(v, 0, "a {width}-byte read of register {offset:#x}");
            }
            return;
        }
        self.bus_write(offset, &bytes[..width]);
        if width == 4 && offset.is_multiple_of(4) && offset < CONFIG {
            if offset == STATUS && value as u32 == 0 {
                self.after_reset();
            } else if (QUEUE_NUM..=QUEUE_DEVICE_HIGH).contains(&offset) && offset != 0x50 {
                // Size, readiness or addresses changed behind the harness's back.
                for q in &mut self.queues {
                    q.known = false;
                }
            }
        }
    }

    /// Sets up queue `i` (size, rings, ready), as a driver does before DRIVER_OK.
    fn setup_queue(&mut self, i: usize, size: u16, desc: u64, avail: u64, used: u64) {
        let driver_ok = self.rd(STATUS) & DRIVER_OK != 0;
        self.wr(QUEUE_SEL, i as u32);
        self.wr(QUEUE_READY, 0);
        self.wr(QUEUE_NUM, u32::from(size));
        for (reg, addr) in [(QUEUE_DESC_LOW, desc), (0x90, avail), (0xa0, used)] {
            self.wr(reg, addr as u32);
            self.wr(reg + 4, (addr >> 32) as u32);
        }
        self.wr(QUEUE_READY, 1);
        let Some(q) = self.queues.get_mut(i) else {
            return;
        };
        if driver_ok {
            return; // every write was ignored
        }
        assert!(size.is_power_of_two() && size <= q.max);
        *q = QueueShadow {
            known: true,
            size,
            desc,
            avail,
            used,
            ..*q
        };
        assert_eq!(self.rd(QUEUE_READY), 1, "queue {i} ready after its setup");
    }

    /// Resets, negotiates `features` (plus VERSION_1) and sets up every queue from `base`.
    fn bringup(&mut self, flags: u8, features: u32, base: u64) {
        self.wr(STATUS, 0);
        self.wr(STATUS, 1);
        self.wr(STATUS, 3);
        let want = if flags & 0x80 != 0 {
            u64::from(features) | VIRTIO_F_VERSION_1
        } else {
            (u64::from(features) & self.offered) | VIRTIO_F_VERSION_1
        };
        self.wr(DRIVER_FEATURES_SEL, 0);
        self.wr(DRIVER_FEATURES, want as u32);
        self.wr(DRIVER_FEATURES_SEL, 1);
        self.wr(DRIVER_FEATURES, (want >> 32) as u32);
        self.wr(STATUS, 3 | FEATURES_OK);
        for i in 0..self.queues.len() {
            let max = self.queues[i].max;
            let size = (max >> (((flags >> (2 * (i % 3))) & 3) * 2)).max(1);
            // Each queue gets 16 KiB: descriptors, avail ring at +4K, used ring at +8K.
            let at = base + i as u64 * 0x4000;
            self.setup_queue(i, size, at, at + 0x1000, at + 0x2000);
        }
        if flags & 0x40 == 0 {
            self.wr(STATUS, 3 | FEATURES_OK | DRIVER_OK);
        }
    }

    fn known_queue(&self, q: u8) -> Option<(usize, QueueShadow)> {
        let n = self.queues.len();
        let i = usize::from(q) % n;
        let s = self.queues[i];
        s.known.then_some((i, s))
    }

    fn put_desc(&self, q: &QueueShadow, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        let at = q.desc + u64::from(idx % q.size) * 16;
        let _ = self.mem.write_slice(&d, GuestAddress(at));
    }

    fn push(&self, q: &QueueShadow, head: u16) {
        let Some(idx) = u16_at(&self.mem, q.avail + 2) else {
            return;
        };
        let slot = q.avail + 4 + u64::from(idx % q.size) * 2;
        let _ = self.mem.write_obj(head, GuestAddress(slot));
        let _ = self
            .mem
            .write_obj(idx.wrapping_add(1), GuestAddress(q.avail + 2));
    }

    /// A whole request on queue `q`: for the block device a header, data and status byte;
    /// for vsock a TX packet (header and payload) or an RX buffer.
    fn request(&self, input: &mut Input) {
        let (qsel, head, kind) = (input.u8(), input.u8(), input.u8());
        let (sector, data_off, data_len) = (input.u8(), input.u16(), input.u16());
        let Some((qi, q)) = self.known_queue(qsel) else {
            return;
        };
        let head = u16::from(head) % q.size;
        let hdr_at = DATA + u64::from(data_off % 0x800) * 16;
        let data_at = hdr_at + 64;
        let next = |i: u16| (head + i) % q.size;
        if !self.vsock {
            let t = [0u32, 1, 4, 8, 0, 1, 2, u32::from(kind)][usize::from(kind & 7)];
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&t.to_le_bytes());
            h[8..].copy_from_slice(&u64::from(sector).to_le_bytes());
            let _ = self.mem.write_slice(&h, GuestAddress(hdr_at));
            let len = if kind & 0x80 != 0 {
                u32::from(data_len)
            } else {
                u32::from(data_len % 9) * 512
            };
            let data_flags = if t == 1 { 0 } else { F_WRITE };
            self.put_desc(&q, next(0), hdr_at, 16, F_NEXT, next(1));
            if len > 0 && kind & 0x40 == 0 {
                self.put_desc(&q, next(1), data_at, len, data_flags | F_NEXT, next(2));
                self.put_desc(&q, next(2), data_at + u64::from(len), 1, F_WRITE, 0);
            } else {
                self.put_desc(&q, next(1), data_at, 1, F_WRITE, 0);
            }
        } else if qi == 1 {
            let len = u32::from(data_len % 0x200);
            let mut h = [0u8; 44];
            h[..8].copy_from_slice(&CID.to_le_bytes());
            h[8..16].copy_from_slice(&2u64.to_le_bytes());
            h[16..20].copy_from_slice(&u32::from(sector).to_le_bytes());
            h[20..24].copy_from_slice(&(u32::from(kind >> 3) + 1000).to_le_bytes());
            h[24..28].copy_from_slice(&len.to_le_bytes());
            h[28..30].copy_from_slice(&1u16.to_le_bytes());
            h[30..32].copy_from_slice(&u16::from(kind & 7).to_le_bytes());
            h[32..36].copy_from_slice(&u32::from(kind >> 6).to_le_bytes());
            h[36..40].copy_from_slice(&(256u32 << 10).to_le_bytes());
            let _ = self.mem.write_slice(&h, GuestAddress(hdr_at));
            self.put_desc(&q, next(0), hdr_at, 44 + len, 0, 0);
        } else {
            let len = 44 + u32::from(data_len % 0x400);
            self.put_desc(&q, next(0), hdr_at, len, F_WRITE, 0);
        }
        self.push(&q, head);
    }

    /// Kicks queue `qi` (or wakes the device for a host event) and checks the used rings.
    fn kick(&mut self, wake: Wake) {
        let running = self.running();
        // Before: per known queue, (avail idx, used idx, avail ring bytes, bounds of the
        // chains that are available).
        let mut before = Vec::new();
        for q in &self.queues {
            let (Some(a), Some(u)) = (
                u16_at(&self.mem, q.avail + 2),
                u16_at(&self.mem, q.used + 2),
            ) else {
                before.push(None);
                continue;
            };
            let ring = bytes_at(&self.mem, q.avail, 4 + 2 * u64::from(q.size));
            let mut bounds = Vec::new();
            if q.known && q.next_used == Some(u) && a.wrapping_sub(u) <= q.size {
                for k in 0..a.wrapping_sub(u) {
                    let slot = q.avail + 4 + u64::from(u.wrapping_add(k) % q.size) * 2;
                    let head = u16_at(&self.mem, slot).unwrap_or(u16::MAX);
                    bounds.push(writable_bytes(&self.mem, q.desc, q.size, head));
                }
            }
            before.push(Some((a, u, ring, bounds)));
        }

        // Where the device may write data this kick: every writable buffer of the chains
        // between each queue's used and avail index (what it may pop). A queue the harness
        // does not know, or whose indices are out of step, may have buffers anywhere.
        let mut written: Vec<(u64, u64)> = Vec::new();
        let mut anywhere = false;
        for q in &self.queues {
            let (Some(a), Some(u)) = (
                u16_at(&self.mem, q.avail + 2),
                q.next_used.or_else(|| u16_at(&self.mem, q.used + 2)),
            ) else {
                anywhere = true;
                continue;
            };
            let pending = a.wrapping_sub(u);
            if !q.known || pending > q.size {
                anywhere = true;
                continue;
            }
            for k in 0..pending {
                let slot = q.avail + 4 + u64::from(u.wrapping_add(k) % q.size) * 2;
                let head = u16_at(&self.mem, slot).unwrap_or(u16::MAX);
                walk_writable(&self.mem, q.desc, q.size, head, |addr, len| {
                    written.push((addr, addr.saturating_add(u64::from(len))));
                });
            }
        }

        self.t.process(wake, &self.mem);

        let broken = self.rd(STATUS) & NEEDS_RESET != 0;
        for (i, b) in before.into_iter().enumerate() {
            let q = self.queues[i];
            let Some((a0, u0, ring0, bounds)) = b else {
                self.queues[i].next_used = None;
                continue;
            };
            let u1 = u16_at(&self.mem, q.used + 2).unwrap_or(u0);
            let trusted = q.known && q.next_used == Some(u0);
            self.queues[i].next_used = if broken {
                None
            } else if u1 != u0 {
                Some(u1)
            } else if trusted {
                Some(u0)
            } else {
                None
            };
            // Another queue's used ring, or a buffer the device may fill, over this one's
            // used ring: the device's other writes move this used index and elements too, so
            // they tell nothing about this queue.
            let used_end = q.used + 4 + 8 * u64::from(q.size) + 2;
            let shared_used = self.queues.iter().enumerate().any(|(j, o)| {
                j != i && o.used < used_end && q.used < o.used + 4 + 8 * u64::from(o.size) + 2
            });
            let overwritten = anywhere
                || written
                    .iter()
                    .any(|&(start, end)| start < used_end && q.used < end);
            if shared_used || overwritten {
                self.queues[i].next_used = None;
                continue;
            }
            if !(running && trusted) || u1 == u0 {
                continue;
            }
            // The device may have written into the avail ring itself (a data buffer or the
            // used ring over it): then what was available is not what the harness saw.
            let ring1 = bytes_at(&self.mem, q.avail, 4 + 2 * u64::from(q.size));
            let overlap = q.used < q.avail + 4 + 2 * u64::from(q.size) + 2 && q.avail < used_end;
            if ring1 != ring0 || overlap {
                continue;
            }
            let advanced = u1.wrapping_sub(u0);
            let available = a0.wrapping_sub(u0);
            assert!(
                advanced <= available,
                "queue {i}: used index {u0} -> {u1} with avail index {a0} (queues {:x?})",
                self.queues
            );
            for k in 0..advanced {
                let at = q.used + 4 + u64::from(u0.wrapping_add(k) % q.size) * 8;
                let (Some(id), Some(len)) = (u32_at(&self.mem, at), u32_at(&self.mem, at + 4))
                else {
                    continue;
                };
                if q.used + 4 + u64::from(q.size) * 8 > q.desc
                    && q.desc + 16 * u64::from(q.size) > q.used
                {
                    continue; // the used ring overwrote descriptors
                }
                assert!(
                    id < u32::from(q.size),
                    "queue {i}: used head {id} of {}",
                    q.size
                );
                let after = writable_bytes(&self.mem, q.desc, q.size, id as u16);
                let bound = bounds.get(usize::from(k)).copied().unwrap_or(0).max(after);
                assert!(
                    len == 0 || u64::from(len) <= bound,
                    "queue {i}: used element {k} (head {id}) has length {len}, its chain \
                     has {bound} writable bytes"
                );
            }
        }
    }

    fn host_connect(&mut self, port: u32, extra: &[u8]) {
        let host = vsock_host();
        let Ok(mut c) = UnixStream::connect(&host.path) else {
            return;
        };
        let _ = c.set_nonblocking(true);
        let _ = writeln!(c, "CONNECT {port}");
        let _ = c.write_all(extra);
        self.clients.push(c);
        self.kick(Wake::Host {
            token: 0,
            readable: true,
            writable: false,
            hangup: false,
        });
        self.learn_tokens();
    }

    fn learn_tokens(&mut self) {
        let changes = lock(&vsock_host().muxer).take_interest_changes();
        for c in changes {
            if let Interest::Add { token, .. } = c {
                if token != 0 && !self.tokens.contains(&token) {
                    self.tokens.push(token);
                }
            }
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let cfg = input.u8();
    let vsock = cfg & 1 != 0;
    let readonly = cfg & 2 != 0;
    let mut ranges = vec![(GuestAddress(0), LOW_SIZE as usize)];
    if cfg & 4 != 0 {
        ranges.push((GuestAddress(HIGH_START), HIGH_SIZE as usize));
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("guest memory");
    let mem_end = if cfg & 4 != 0 {
        HIGH_START + HIGH_SIZE
    } else {
        LOW_SIZE
    };

    let sectors = [1u64, 2, 4, 8][usize::from((cfg >> 3) & 3)];
    let tail = [0u64, 1, 100, 511][usize::from((cfg >> 5) & 3)];
    let disk_len = sectors * 512 + tail;
    let fail = (cfg & 0x80 != 0).then(|| u64::from(input.u16()) % disk_len);
    let original: Vec<u8> = (0..disk_len).map(|i| (i * 7 % 251) as u8).collect();
    let disk = Arc::new(MemDisk {
        bytes: Mutex::new(original.clone()),
        fail,
    });
    let irq = Arc::new(CountingTrigger::default());
    let device: Box<dyn minivmm::devices::virtio::VirtioDevice> = if vsock {
        let host = vsock_host();
        {
            let mut m = lock(&host.muxer);
            m.reset();
            m.take_interest_changes();
            m.take_interest_changes();
        }
        Box::new(Vsock::new(CID, host.muxer.clone()))
    } else {
        Box::new(Block::new(disk.clone(), disk_len, readonly, "fuzz-disk"))
    };
    let t = MmioTransport::new(device, irq.clone()).expect("transport");
    let mut h = Harness {
        t,
        mem,
        queues: Vec::new(),
        vsock,
        offered: 0,
        clients: Vec::new(),
        tokens: Vec::new(),
    };
    for i in 0..h.t.queue_count() as u32 {
        h.wr(QUEUE_SEL, i);
        let max = h.rd(QUEUE_NUM_MAX) as u16;
        let mut q = QueueShadow {
            max,
            known: false,
            size: max,
            desc: 0,
            avail: 0,
            used: 0,
            next_used: Some(0),
        };
        q.reset();
        h.queues.push(q);
    }
    h.wr(QUEUE_SEL, 0);
    h.wr(DEVICE_FEATURES_SEL, 0);
    let lo = h.rd(DEVICE_FEATURES);
    h.wr(DEVICE_FEATURES_SEL, 1);
    let hi = h.rd(DEVICE_FEATURES);
    h.offered = u64::from(lo) | (u64::from(hi) << 32);
    assert_ne!(h.offered & VIRTIO_F_VERSION_1, 0, "VERSION_1 offered");
    if !vsock {
        let mut cap = [0u8; 8];
        h.t.read(CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), sectors, "capacity");
    }

    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        let tag = input.u8();
        match tag % 12 {
            0 | 1 => {
                let offset = u64::from(input.u16()) % 0x180;
                let width = [1usize, 2, 4, 8][usize::from(tag >> 6)];
                let value = if tag % 12 == 1 { input.u64() } else { 0 };
                h.access(tag % 12 == 1, offset, width, value);
            }
            2 => {
                let (flags, features, base) = (input.u8(), input.u32(), input.u16());
                // Rings 16 KiB apart per queue, below the data area (or anywhere, rarely).
                let base = if tag & 0x80 != 0 {
                    u64::from(base) * 16
                } else {
                    u64::from(base % 0x70) * 0x1000
                };
                h.bringup(flags, features, base);
            }
            3 => {
                let (q, size) = (input.u8(), input.u8());
                let (d, a, u) = (input.u32(), input.u32(), input.u32());
                let i = usize::from(q) % h.queues.len();
                let size = (h.queues[i].max >> (size % 9)).max(1);
                let fit = |x: u32, align: u64| {
                    if tag & 0x80 != 0 {
                        u64::from(x) & !(align - 1)
                    } else {
                        (u64::from(x) % mem_end) & !(align - 1)
                    }
                };
                h.setup_queue(i, size, fit(d, 16), fit(a, 2), fit(u, 4));
            }
            4 => {
                let s = h.rd(STATUS);
                h.wr(STATUS, s | DRIVER_OK);
            }
            5 => {
                let addr = u64::from(input.u32()) % (mem_end + 0x1000);
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                let _ = h.mem.write_slice(bytes, GuestAddress(addr));
            }
            6 => {
                let (q, idx) = (input.u8(), input.u16());
                let (addr, len) = (input.u32(), input.u32());
                let (flags, next) = (input.u16(), input.u16());
                if let Some((_, s)) = h.known_queue(q) {
                    let addr = if tag & 0x80 != 0 {
                        u64::from(addr)
                    } else {
                        DATA + u64::from(addr) % (LOW_SIZE - DATA)
                    };
                    h.put_desc(&s, idx, addr, len, flags, next);
                }
            }
            7 => {
                let (q, head) = (input.u8(), input.u16());
                if let Some((_, s)) = h.known_queue(q) {
                    h.push(&s, head);
                }
            }
            8 => h.request(&mut input),
            9 | 10 => {
                let q = input.u8();
                let wake = match q >> 6 {
                    3 if vsock => Wake::Tick,
                    2 if vsock => Wake::Host {
                        token: h
                            .tokens
                            .get(usize::from(q & 7))
                            .copied()
                            .unwrap_or(u64::from(q & 7)),
                        readable: q & 8 != 0,
                        writable: q & 16 != 0,
                        hangup: q & 32 != 0,
                    },
                    _ => Wake::Queue(usize::from(q) % (h.queues.len() + 1)),
                };
                h.kick(wake);
                if vsock {
                    h.learn_tokens();
                }
            }
            _ => {
                if !vsock {
                    continue;
                }
                let (port, len) = (input.u8(), input.u8());
                let bytes = input.bytes(usize::from(len % 64));
                if port & 0x80 != 0 && !h.clients.is_empty() {
                    let n = h.clients.len();
                    let c = &mut h.clients[usize::from(port) % n];
                    let _ = c.write_all(bytes);
                    if port & 0x40 != 0 {
                        let _ = c.shutdown(std::net::Shutdown::Write);
                    }
                } else {
                    h.host_connect(u32::from(port & 0x7f) + 1000, bytes);
                }
            }
        }
        h.check_interrupt_status();
        let d = disk.bytes.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(d.len() as u64, disk_len, "the disk changed size");
        if readonly && !vsock {
            assert!(*d == original, "a read-only disk was written");
        }
        assert!(
            d[(sectors * 512) as usize..] == original[(sectors * 512) as usize..],
            "bytes past the last whole sector changed"
        );
    }
    if vsock {
        lock(&vsock_host().muxer).reset();
    }
    drop(h);
}

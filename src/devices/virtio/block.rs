//! virtio-blk (virtio 1.2 §5.2) over a raw disk image: read, write, flush and get-id.
//!
//! The device does no I/O of its own: the image is an injected [`Disk`] (a host file in
//! minivmm). Requests are served synchronously when the guest kicks the queue; data moves
//! through a bounded bounce buffer, so no request length makes minivmm allocate more.

use std::io::{self, Read, Write};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::{
    read_config_bytes, VirtioDevice, VirtioError, Wake, TYPE_BLOCK, VIRTIO_RING_F_EVENT_IDX,
};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue.
const QUEUE_SIZE: u16 = 256;
/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` in the configuration is valid.
const F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_RO`: the disk is read-only.
const F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_FLUSH`: the device honours flush requests.
const F_FLUSH: u64 = 1 << 9;
/// Most data segments in one request (the queue size less the header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest chunk moved between the disk and guest memory at once.
const BOUNCE_SIZE: usize = 128 << 10;
/// Length of the get-id answer (`VIRTIO_BLK_ID_BYTES`).
const ID_BYTES: usize = 20;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Request status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// A disk image the device reads and writes at byte offsets.
pub trait Disk: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes written data durable.
    fn flush(&self) -> io::Result<()>;
}

impl Disk for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.sync_data()
    }
}

/// The first `min(len, BOUNCE_SIZE)` bytes of `buf`, grown to that size if needed.
fn bounce(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    let want = len.min(BOUNCE_SIZE);
    if buf.len() < want {
        buf.resize(want, 0);
    }
    &mut buf[..want]
}

/// A virtio block device.
pub struct Block {
    disk: Arc<dyn Disk>,
    /// Capacity in sectors; a partial last sector of the image is not offered.
    sectors: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
    bounce: Vec<u8>,
}

impl Block {
    /// A device over `disk` of `size` bytes, with the get-id answer `id` (cut to 20 bytes).
    pub fn new(disk: Arc<dyn Disk>, size: u64, readonly: bool, id: &str) -> Block {
        let mut id_bytes = [0u8; ID_BYTES];
        for (dst, src) in id_bytes.iter_mut().zip(id.bytes()) {
            *dst = src;
        }
        Block {
            disk,
            sectors: size / SECTOR_SIZE,
            readonly,
            id: id_bytes,
            bounce: Vec::new(),
        }
    }

    /// Serves one request; returns the status and the bytes written into the guest's buffers
    /// (data, not counting the status byte).
    fn serve(&mut self, reader: &mut Reader<'_>, data: &mut Writer<'_>) -> (u8, u32) {
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            return (S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        match kind {
            T_IN => {
                let len = data.available_bytes();
                match self.range(sector, len) {
                    Some(offset) => match self.copy_to_guest(offset, len, data) {
                        Ok(()) => (S_OK, u32::try_from(len).unwrap_or(u32::MAX)),
                        Err(e) => {
                            log::warn!("virtio-blk: read of {len} bytes at sector {sector}: {e}");
                            (S_IOERR, u32::try_from(data.bytes_written()).unwrap_or(0))
                        }
                    },
                    None => (S_IOERR, 0),
                }
            }
            T_OUT if self.readonly => (S_IOERR, 0),
            T_OUT => {
                let len = reader.available_bytes();
                match self.range(sector, len) {
                    Some(offset) => match self.copy_from_guest(offset, len, reader) {
                        Ok(()) => (S_OK, 0),
                        Err(e) => {
                            log::warn!("virtio-blk: write of {len} bytes at sector {sector}: {e}");
                            (S_IOERR, 0)
                        }
                    },
                    None => (S_IOERR, 0),
                }
            }
            T_FLUSH => match self.disk.flush() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    log::warn!("virtio-blk: flush: {e}");
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let n = data.available_bytes().min(ID_BYTES);
                match data.write_all(&self.id[..n]) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }

    /// The byte offset of a `len`-byte transfer at `sector`, if it is whole sectors inside the
    /// disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = u64::try_from(len).ok()?;
        if len % SECTOR_SIZE != 0 {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.sectors).then(|| sector * SECTOR_SIZE)
    }

    fn copy_to_guest(
        &mut self,
        mut offset: u64,
        len: usize,
        data: &mut Writer<'_>,
    ) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            let chunk = bounce(&mut self.bounce, left);
            self.disk.read_exact_at(chunk, offset)?;
            data.write_all(chunk)?;
            offset += chunk.len() as u64;
            left -= chunk.len();
        }
        Ok(())
    }

    fn copy_from_guest(
        &mut self,
        mut offset: u64,
        len: usize,
        reader: &mut Reader<'_>,
    ) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            let chunk = bounce(&mut self.bounce, left);
            reader.read_exact(chunk)?;
            self.disk.write_all_at(chunk, offset)?;
            offset += chunk.len() as u64;
            left -= chunk.len();
        }
        Ok(())
    }

    /// Serves every request on the queue; returns whether the guest must be interrupted.
    fn drain(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, VirtioError> {
        let err = |source| VirtioError::Queue { queue: 0, source };
        let mut used = false;
        let mut more = false;
        loop {
            queue.disable_notification(mem).map_err(err)?;
            // An avail index the ring cannot hold is an error, not an endless "more to do".
            queue.iter(mem).map_err(err)?;
            let mut popped = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = self.serve_chain(chain, mem);
                queue.add_used(mem, head, len).map_err(err)?;
                used = true;
                popped = true;
            }
            if more && !popped {
                // The ring said there was more, yet no chain could be taken from it.
                return Err(err(virtio_queue::Error::InvalidAvailRingIndex));
            }
            more = queue.enable_notification(mem).map_err(err)?;
            if !more {
                break;
            }
        }
        Ok(used && queue.needs_notification(mem).map_err(err)?)
    }

    /// Serves one descriptor chain; returns the used length (data written plus the status byte).
    /// A chain the device cannot read or that has no status byte is returned unused (length 0).
    fn serve_chain(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) =
            (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
        else {
            log::debug!("virtio-blk: a request's buffers lie outside guest memory");
            return 0;
        };
        let writable = writer.available_bytes();
        if writable == 0 {
            return 0;
        }
        let Ok(mut status) = writer.split_at(writable - 1) else {
            return 0;
        };
        let (code, written) = self.serve(&mut reader, &mut writer);
        match status.write_all(&[code]) {
            Ok(()) => written.saturating_add(1),
            Err(_) => 0,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.readonly { F_RO } else { 0 };
        F_SEG_MAX | F_FLUSH | VIRTIO_RING_F_EVENT_IDX | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64), size_max (u32, unused), seg_max (u32).
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn process(
        &mut self,
        wake: Wake,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError> {
        match (wake, queues.first_mut()) {
            (Wake::Queue(0), Some(queue)) => self.drain(queue, mem),
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_WRITE: u16 = 2;
    const F_NEXT: u16 = 1;

    /// An in-memory disk.
    struct MemDisk(Mutex<Vec<u8>>, Mutex<usize>);

    impl Disk for MemDisk {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let d = self.0.lock().unwrap();
            let o = offset as usize;
            buf.copy_from_slice(
                d.get(o..o + buf.len())
                    .ok_or(io::ErrorKind::UnexpectedEof)?,
            );
            Ok(())
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let mut d = self.0.lock().unwrap();
            let o = offset as usize;
            d.get_mut(o..o + buf.len())
                .ok_or(io::ErrorKind::UnexpectedEof)?
                .copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            *self.1.lock().unwrap() += 1;
            Ok(())
        }
    }

    fn disk(sectors: usize) -> Arc<MemDisk> {
        let data = (0..sectors * 512).map(|i| (i % 251) as u8).collect();
        Arc::new(MemDisk(Mutex::new(data), Mutex::new(0)))
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Runs one request chain through the device; returns (used length, status byte).
    fn run(
        dev: &mut Block,
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        status_at: u64,
    ) -> (u32, u8) {
        let mock = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        mock.add_desc_chains(descs, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        mem.write_obj(0xeeu8, GuestAddress(status_at)).unwrap();
        dev.process(Wake::Queue(0), std::slice::from_mut(&mut q), mem)
            .unwrap();
        let used = mock.used().ring().ref_at(0).unwrap().load();
        (used.len(), mem.read_obj(GuestAddress(status_at)).unwrap())
    }

    #[test]
    fn reads_writes_flushes_and_ids() {
        let m = mem();
        let backing = disk(16);
        let mut dev = Block::new(backing.clone(), 16 * 512, false, "disk-id-0123456789abcdef");
        // Read sectors 2..4 into 0x8000.
        header(&m, 0x4000, T_IN, 2);
        let (len, st) = run(
            &mut dev,
            &m,
            &[
                d(0x4000, 16, F_NEXT, 1),
                d(0x8000, 1024, F_WRITE | F_NEXT, 2),
                d(0x5000, 1, F_WRITE, 0),
            ],
            0x5000,
        );
        assert_eq!((len, st), (1025, S_OK));
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(got[..], backing.0.lock().unwrap()[1024..2048]);

        // Write 512 bytes of 0x5a at sector 15.
        m.write_slice(&[0x5a; 512], GuestAddress(0x9000)).unwrap();
        header(&m, 0x4000, T_OUT, 15);
        let (_, st) = run(
            &mut dev,
            &m,
            &[
                d(0x4000, 16, F_NEXT, 1),
                d(0x9000, 512, F_NEXT, 2),
                d(0x5000, 1, F_WRITE, 0),
            ],
            0x5000,
        );
        assert_eq!(st, S_OK);
        assert!(backing.0.lock().unwrap()[15 * 512..]
            .iter()
            .all(|&b| b == 0x5a));

        header(&m, 0x4000, T_FLUSH, 0);
        let (_, st) = run(
            &mut dev,
            &m,
            &[d(0x4000, 16, F_NEXT, 1), d(0x5000, 1, F_WRITE, 0)],
            0x5000,
        );
        assert_eq!((st, *backing.1.lock().unwrap()), (S_OK, 1));

        header(&m, 0x4000, T_GET_ID, 0);
        let (len, st) = run(
            &mut dev,
            &m,
            &[
                d(0x4000, 16, F_NEXT, 1),
                d(0xa000, 20, F_WRITE | F_NEXT, 2),
                d(0x5000, 1, F_WRITE, 0),
            ],
            0x5000,
        );
        assert_eq!((len, st), (21, S_OK));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(0xa000)).unwrap();
        assert_eq!(&id, b"disk-id-0123456789ab");

        header(&m, 0x4000, 99, 0);
        let (_, st) = run(
            &mut dev,
            &m,
            &[d(0x4000, 16, F_NEXT, 1), d(0x5000, 1, F_WRITE, 0)],
            0x5000,
        );
        assert_eq!(st, S_UNSUPP);
    }

    #[test]
    fn read_only_disks_refuse_writes_and_ranges_are_checked() {
        let m = mem();
        let backing = disk(4);
        let before = backing.0.lock().unwrap().clone();
        let mut ro = Block::new(backing.clone(), 4 * 512, true, "ro");
        assert_ne!(ro.features() & F_RO, 0);
        header(&m, 0x4000, T_OUT, 0);
        let (_, st) = run(
            &mut ro,
            &m,
            &[
                d(0x4000, 16, F_NEXT, 1),
                d(0x9000, 512, F_NEXT, 2),
                d(0x5000, 1, F_WRITE, 0),
            ],
            0x5000,
        );
        assert_eq!(st, S_IOERR);
        assert_eq!(*backing.0.lock().unwrap(), before, "nothing written");

        let mut rw = Block::new(backing.clone(), 4 * 512, false, "rw");
        for (sector, len) in [(4, 512), (3, 1024), (u64::MAX, 512), (0, 100)] {
            header(&m, 0x4000, T_IN, sector);
            let (_, st) = run(
                &mut rw,
                &m,
                &[
                    d(0x4000, 16, F_NEXT, 1),
                    d(0x8000, len, F_WRITE | F_NEXT, 2),
                    d(0x5000, 1, F_WRITE, 0),
                ],
                0x5000,
            );
            assert_eq!(st, S_IOERR, "sector {sector} len {len}");
        }
        let mut cfg = [0u8; 8];
        rw.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 4);
    }

    #[test]
    fn hostile_chains_get_errors_not_crashes() {
        let m = mem();
        let mut dev = Block::new(disk(4), 4 * 512, false, "x");
        // Data buffer outside guest memory: the chain is returned unused.
        header(&m, 0x4000, T_IN, 0);
        let (len, st) = run(
            &mut dev,
            &m,
            &[
                d(0x4000, 16, F_NEXT, 1),
                d(0xffff_0000, 512, F_WRITE | F_NEXT, 2),
                d(0x5000, 1, F_WRITE, 0),
            ],
            0x5000,
        );
        assert_eq!((len, st), (0, 0xee));
        // A 4 GiB length: refused the same way.
        let (len, _) = run(
            &mut dev,
            &m,
            &[
                d(0x4000, 16, F_NEXT, 1),
                d(0x8000, u32::MAX, F_WRITE | F_NEXT, 2),
                d(0x5000, 1, F_WRITE, 0),
            ],
            0x5000,
        );
        assert_eq!(len, 0);
        // No writable status byte at all.
        let (len, _) = run(&mut dev, &m, &[d(0x4000, 16, 0, 0)], 0x5000);
        assert_eq!(len, 0);
        // A short header.
        let (_, st) = run(
            &mut dev,
            &m,
            &[d(0x4000, 8, F_NEXT, 1), d(0x5000, 1, F_WRITE, 0)],
            0x5000,
        );
        assert_eq!(st, S_IOERR);
        // A descriptor loop: 0 -> 1 -> 0 ... virtio-queue ends the chain; the device answers.
        let mock = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        mock.desc_table()
            .store(0, d(0x4000, 16, F_NEXT, 1))
            .unwrap();
        mock.desc_table()
            .store(1, d(0x5000, 1, F_WRITE | F_NEXT, 0))
            .unwrap();
        mock.avail().ring().ref_at(0).unwrap().store(0);
        mock.avail().idx().store(1);
        let mut q: Queue = mock.create_queue().unwrap();
        assert!(dev
            .process(Wake::Queue(0), std::slice::from_mut(&mut q), &m)
            .is_ok());
        // An avail index far ahead of the ring: an error for the transport, not a hang.
        mock.avail().idx().store(1000);
        assert!(dev
            .process(Wake::Queue(0), std::slice::from_mut(&mut q), &m)
            .is_err());
        // A head index past the queue size: the chain cannot be taken; an error, not a hang.
        let mock = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        mock.avail().ring().ref_at(0).unwrap().store(200);
        mock.avail().idx().store(1);
        let mut q: Queue = mock.create_queue().unwrap();
        let _ = dev.process(Wake::Queue(0), std::slice::from_mut(&mut q), &m);
    }
}

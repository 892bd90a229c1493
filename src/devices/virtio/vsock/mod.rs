//! virtio-vsock (virtio 1.2 §5.10): moves packets between the guest's queues and the host-side
//! connection multiplexer ([`crate::devices::virtio::vsock::muxer::VsockMuxer`]), which owns the host sockets.
//!
//! TX packets are handed to the muxer as they come; RX buffers are filled only with what the
//! muxer can produce now (control packets, or host data read straight into the buffer's room),
//! so nothing is buffered here and a full RX queue simply stops host reads.

pub mod connection;
pub mod muxer;
pub mod packet;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::{read_config_bytes, VirtioDevice, VirtioError, Wake, TYPE_VSOCK};
use crate::devices::lock;
use crate::devices::virtio::vsock::muxer::VsockMuxer;
use crate::devices::virtio::vsock::packet::{PacketHeader, OP_RST, OP_RW};

/// Queue indices (virtio 1.2 §5.10.2).
const RX: usize = 0;
const TX: usize = 1;
/// Queue sizes: RX, TX, event.
const QUEUE_SIZES: [u16; 3] = [256, 256, 16];
/// Largest payload of one packet (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
const MAX_PAYLOAD: usize = 64 << 10;

/// A virtio vsock device; its host side is the shared muxer (which outlives reboots).
pub struct Vsock {
    cid: u64,
    muxer: Arc<Mutex<VsockMuxer>>,
    scratch: Vec<u8>,
}

impl Vsock {
    /// A device with guest CID `cid` over `muxer`.
    pub fn new(cid: u64, muxer: Arc<Mutex<VsockMuxer>>) -> Vsock {
        Vsock {
            cid,
            muxer,
            scratch: Vec::new(),
        }
    }
}

fn queue_err(queue: usize) -> impl Fn(virtio_queue::Error) -> VirtioError {
    move |source| VirtioError::Queue { queue, source }
}

/// Hands every TX packet to the muxer; returns whether buffers were used.
fn drain_tx(
    muxer: &mut VsockMuxer,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    scratch: &mut Vec<u8>,
) -> Result<bool, VirtioError> {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        if let Ok(mut reader) = Reader::new(mem, chain) {
            let mut raw = [0u8; PacketHeader::SIZE];
            if reader.read_exact(&mut raw).is_ok() {
                let mut hdr = PacketHeader::from_bytes(&raw);
                let len = usize::try_from(hdr.len).unwrap_or(usize::MAX);
                let payload: &[u8] = if hdr.op != OP_RW || len == 0 {
                    &[]
                } else if len > MAX_PAYLOAD || len > reader.available_bytes() {
                    // A packet no Linux driver sends: the connection is closed on the host side
                    // rather than forwarding a part of it.
                    log::debug!("vsock: dropping a {len}-byte packet; resetting its connection");
                    hdr.op = OP_RST;
                    hdr.len = 0;
                    &[]
                } else {
                    scratch.resize(len, 0);
                    match reader.read_exact(&mut scratch[..len]) {
                        Ok(()) => &scratch[..len],
                        Err(_) => {
                            hdr.op = OP_RST;
                            hdr.len = 0;
                            &[]
                        }
                    }
                };
                muxer.send_to_host(&hdr, payload);
            }
        }
        queue.add_used(mem, head, 0).map_err(queue_err(TX))?;
        used = true;
    }
    Ok(used)
}

/// Fills RX buffers with what the muxer has for the guest; returns whether buffers were used.
fn fill_rx(
    muxer: &mut VsockMuxer,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    scratch: &mut Vec<u8>,
) -> Result<bool, VirtioError> {
    let mut used = false;
    while muxer.has_pending_rx() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let Ok(mut writer) = Writer::new(mem, chain) else {
            queue.add_used(mem, head, 0).map_err(queue_err(RX))?;
            used = true;
            continue;
        };
        let room = writer.available_bytes();
        if room < PacketHeader::SIZE {
            queue.add_used(mem, head, 0).map_err(queue_err(RX))?;
            used = true;
            continue;
        }
        let cap = (room - PacketHeader::SIZE).min(MAX_PAYLOAD);
        scratch.resize(cap, 0);
        let Some(hdr) = muxer.recv_for_guest(&mut scratch[..cap]) else {
            // Nothing after all: the buffer goes back to the ring for the next packet.
            queue.go_to_previous_position();
            break;
        };
        let len = usize::try_from(hdr.len).unwrap_or(0).min(cap);
        let written = writer
            .write_all(&hdr.to_bytes())
            .and_then(|()| writer.write_all(&scratch[..len]))
            .map(|()| PacketHeader::SIZE + len)
            .unwrap_or(0);
        queue
            .add_used(mem, head, u32::try_from(written).unwrap_or(0))
            .map_err(queue_err(RX))?;
        used = true;
    }
    Ok(used)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn reset(&mut self) {
        lock(&self.muxer).reset();
    }

    fn process(
        &mut self,
        wake: Wake,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError> {
        let mut muxer = lock(&self.muxer);
        let mut used = false;
        match wake {
            Wake::Host {
                token,
                readable,
                writable,
                hangup,
            } => muxer.host_event(token, readable, writable, hangup),
            Wake::Tick => muxer.tick(Instant::now()),
            Wake::Queue(TX) => {
                if let Some(tx) = queues.get_mut(TX) {
                    used |= drain_tx(&mut muxer, tx, mem, &mut self.scratch)?;
                }
            }
            Wake::Queue(_) => {}
        }
        if let Some(rx) = queues.get_mut(RX) {
            used |= fill_rx(&mut muxer, rx, mem, &mut self.scratch)?;
        }
        Ok(used)
    }
}

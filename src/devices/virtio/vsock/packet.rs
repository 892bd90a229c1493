//! The vsock packet header and the protocol's constants (virtio spec, "Socket Device"): what
//! crosses the virtqueues, independent of how the host side carries it.

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// The only socket type supported: stream.
pub const TYPE_STREAM: u16 = 1;
/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or torn down.
pub const OP_RST: u16 = 3;
/// The sender will receive and/or send no more (see the `SHUTDOWN_*` flags).
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit information, unsolicited or in answer to a request.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for an `OP_CREDIT_UPDATE`.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// `OP_SHUTDOWN` flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// `OP_SHUTDOWN` flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// A virtio-vsock packet header (virtio 1.2 §5.10.6), host-endian fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// `OP_SHUTDOWN` flags.
    pub flags: u32,
    /// The sender's receive buffer for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from this connection (wrapping).
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// Size of the header on the wire.
    pub const SIZE: usize = 44;

    /// The little-endian wire form.
    #[allow(clippy::wrong_self_convention)] // the agreed device interface takes `&self`
    pub fn to_bytes(&self) -> [u8; 44] {
        let mut b = [0u8; 44];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parses the little-endian wire form.
    pub fn from_bytes(b: &[u8; 44]) -> Self {
        fn field<const N: usize>(b: &[u8; 44], at: usize) -> [u8; N] {
            let mut out = [0u8; N];
            out.copy_from_slice(&b[at..at + N]);
            out
        }
        PacketHeader {
            src_cid: u64::from_le_bytes(field(b, 0)),
            dst_cid: u64::from_le_bytes(field(b, 8)),
            src_port: u32::from_le_bytes(field(b, 16)),
            dst_port: u32::from_le_bytes(field(b, 20)),
            len: u32::from_le_bytes(field(b, 24)),
            type_: u16::from_le_bytes(field(b, 28)),
            op: u16::from_le_bytes(field(b, 30)),
            flags: u32::from_le_bytes(field(b, 32)),
            buf_alloc: u32::from_le_bytes(field(b, 36)),
            fwd_cnt: u32::from_le_bytes(field(b, 40)),
        }
    }
}

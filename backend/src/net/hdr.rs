//! The virtio-net header in front of every frame (`virtio_net_hdr_v1`).

use enilab_switch::{CsumOffload, GsoKind, GsoOffload, PacketMeta};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
};

/// Header length with VERSION_1 or MRG_RXBUF (it carries num_buffers).
pub const VNET_HDR_LEN: usize = 12;

/// Decoded header fields, little-endian on the wire (VERSION_1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

/// Why a TX header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HdrError {
    /// GSO type we did not offer (UFO, USO) or unknown.
    GsoType(u8),
    /// A GSO super-packet with a zero segment size.
    GsoSize,
    /// Checksum start/offset beyond the frame.
    CsumRange,
}

impl VirtioNetHdr {
    pub fn parse(b: &[u8; VNET_HDR_LEN]) -> Self {
        VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_le_bytes([b[2], b[3]]),
            gso_size: u16::from_le_bytes([b[4], b[5]]),
            csum_start: u16::from_le_bytes([b[6], b[7]]),
            csum_offset: u16::from_le_bytes([b[8], b[9]]),
            num_buffers: u16::from_le_bytes([b[10], b[11]]),
        }
    }

    /// The header as two little-endian words: bytes 0..8 and 8..12.
    #[inline]
    pub fn words(&self) -> (u64, u32) {
        let lo = u64::from(self.flags)
            | u64::from(self.gso_type) << 8
            | u64::from(self.hdr_len) << 16
            | u64::from(self.gso_size) << 32
            | u64::from(self.csum_start) << 48;
        let hi = u32::from(self.csum_offset) | u32::from(self.num_buffers) << 16;
        (lo, hi)
    }

    pub fn emit(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Offload metadata for a frame of `frame_len` bytes sent by a guest.
    pub fn to_meta(&self, frame_len: usize) -> Result<PacketMeta, HdrError> {
        let mut meta = PacketMeta::default();
        if u32::from(self.flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            let start = usize::from(self.csum_start);
            let field_end = start + usize::from(self.csum_offset) + 2;
            if field_end > frame_len {
                return Err(HdrError::CsumRange);
            }
            meta.csum = Some(CsumOffload {
                start: self.csum_start,
                offset: self.csum_offset,
            });
        }
        let ecn = u32::from(self.gso_type) & VIRTIO_NET_HDR_GSO_ECN != 0;
        let kind = match u32::from(self.gso_type) & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => None,
            VIRTIO_NET_HDR_GSO_TCPV4 => Some(GsoKind::Tcpv4),
            VIRTIO_NET_HDR_GSO_TCPV6 => Some(GsoKind::Tcpv6),
            _ => return Err(HdrError::GsoType(self.gso_type)),
        };
        if let Some(kind) = kind {
            if self.gso_size == 0 {
                return Err(HdrError::GsoSize);
            }
            meta.gso = Some(GsoOffload {
                kind,
                size: self.gso_size,
                hdr_len: self.hdr_len,
                ecn,
            });
        }
        Ok(meta)
    }

    /// Header for delivering a frame with `meta` to a guest.
    pub fn from_meta(meta: &PacketMeta) -> Self {
        let mut h = VirtioNetHdr::default();
        if let Some(c) = meta.csum {
            h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
            h.csum_start = c.start;
            h.csum_offset = c.offset;
        }
        if let Some(g) = meta.gso {
            let t = match g.kind {
                GsoKind::Tcpv4 => VIRTIO_NET_HDR_GSO_TCPV4,
                GsoKind::Tcpv6 => VIRTIO_NET_HDR_GSO_TCPV6,
                GsoKind::Udp => VIRTIO_NET_HDR_GSO_UDP,
            };
            h.gso_type = (t | if g.ecn { VIRTIO_NET_HDR_GSO_ECN } else { 0 }) as u8;
            h.gso_size = g.size;
            h.hdr_len = g.hdr_len;
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_the_emitted_bytes() {
        let h = VirtioNetHdr {
            flags: 0x81,
            gso_type: 0x43,
            hdr_len: 0x1234,
            gso_size: 0x5678,
            csum_start: 0x9abc,
            csum_offset: 0xdef0,
            num_buffers: 0x0fed,
        };
        let (lo, hi) = h.words();
        let mut b = lo.to_le_bytes().to_vec();
        b.extend_from_slice(&hi.to_le_bytes());
        assert_eq!(b, h.emit());
    }

    #[test]
    fn round_trip() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        assert_eq!(VirtioNetHdr::parse(&h.emit()), h);
        let meta = h.to_meta(9000).unwrap();
        assert_eq!(meta.gso.unwrap().size, 1448);
        assert_eq!(meta.csum.unwrap().start, 34);
        let back = VirtioNetHdr::from_meta(&meta);
        assert_eq!(back.gso_type, 1);
        assert_eq!(back.csum_offset, 16);
    }

    #[test]
    fn refuses_bad_headers() {
        let mut h = VirtioNetHdr {
            flags: 1,
            csum_start: 60,
            csum_offset: 16,
            ..Default::default()
        };
        assert_eq!(h.to_meta(64), Err(HdrError::CsumRange));
        h.flags = 0;
        h.gso_type = 3; // UFO, never offered
        assert_eq!(h.to_meta(64), Err(HdrError::GsoType(3)));
        h.gso_type = 1;
        assert_eq!(h.to_meta(64), Err(HdrError::GsoSize));
    }
}

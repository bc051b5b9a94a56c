//! IPv4 headers (RFC 791).

use std::net::Ipv4Addr;

use super::{be16, be32, checksum, put, Result, WireError};

mod field {
    pub const VER_IHL: usize = 0;
    pub const TOTAL_LEN: usize = 2;
    pub const IDENT: usize = 4;
    pub const FLAGS_FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
}

/// Length of a header without options.
pub const MIN_HEADER_LEN: usize = 20;

/// IP protocol numbers the switch looks at.
pub mod protocol {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

const FLAG_MF: u16 = 0x2000;
const FRAG_OFFSET_MASK: u16 = 0x1fff;

/// A checked view of an IPv4 packet. The buffer may run past the packet
/// (Ethernet padding); [`Packet::payload`] stops at the total length.
#[derive(Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap `buffer` after checking the version, that the header length is
    /// at least 20, and that header length <= total length <= buffer length.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[field::VER_IHL] >> 4 != 4 {
            return Err(WireError::Malformed);
        }
        let header_len = usize::from(b[field::VER_IHL] & 0x0f) * 4;
        let total_len = usize::from(be16(b, field::TOTAL_LEN));
        if header_len < MIN_HEADER_LEN || total_len < header_len {
            return Err(WireError::Malformed);
        }
        if b.len() < total_len {
            return Err(WireError::Truncated);
        }
        Ok(Packet { buffer })
    }

    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    pub fn total_len(&self) -> usize {
        usize::from(be16(self.buffer.as_ref(), field::TOTAL_LEN))
    }

    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT)
    }

    /// Whether this is a fragment (more-fragments set or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLAGS_FRAG) & (FLAG_MF | FRAG_OFFSET_MASK) != 0
    }

    /// Whether this is a fragment other than the first, which carries no
    /// transport header.
    pub fn is_later_fragment(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLAGS_FRAG) & FRAG_OFFSET_MASK != 0
    }

    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.buffer.as_ref(), field::SRC))
    }

    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.buffer.as_ref(), field::DST))
    }

    /// Whether the header checksum is right.
    pub fn verify_checksum(&self) -> bool {
        checksum::finish(checksum::sum(&self.buffer.as_ref()[..self.header_len()])) == 0
    }

    /// The bytes after the header, up to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..self.total_len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_ttl(&mut self, ttl: u8) {
        self.buffer.as_mut()[field::TTL] = ttl;
    }

    pub fn set_src(&mut self, ip: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC..field::SRC + 4].copy_from_slice(&ip.octets());
    }

    pub fn set_dst(&mut self, ip: Ipv4Addr) {
        self.buffer.as_mut()[field::DST..field::DST + 4].copy_from_slice(&ip.octets());
    }

    /// Recompute the header checksum.
    pub fn fill_checksum(&mut self) {
        let hl = self.header_len();
        let b = self.buffer.as_mut();
        b[field::CHECKSUM..field::CHECKSUM + 2].copy_from_slice(&[0, 0]);
        let c = checksum::finish(checksum::sum(&b[..hl]));
        b[field::CHECKSUM..field::CHECKSUM + 2].copy_from_slice(&c.to_be_bytes());
    }

    /// The payload, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (hl, tl) = (self.header_len(), self.total_len());
        &mut self.buffer.as_mut()[hl..tl]
    }
}

/// A 20-byte header without options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub payload_len: usize,
    pub ttl: u8,
}

impl Repr {
    /// Write the header, checksum included, at the start of `out`; returns
    /// its length.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize> {
        let total =
            u16::try_from(MIN_HEADER_LEN + self.payload_len).map_err(|_| WireError::Malformed)?;
        let hdr = out.get_mut(..MIN_HEADER_LEN).ok_or(WireError::Truncated)?;
        hdr.fill(0);
        hdr[field::VER_IHL] = 0x45;
        put(hdr, field::TOTAL_LEN, &total.to_be_bytes())?;
        hdr[field::TTL] = self.ttl;
        hdr[field::PROTOCOL] = self.protocol;
        put(hdr, field::SRC, &self.src.octets())?;
        put(hdr, field::DST, &self.dst.octets())?;
        let c = checksum::finish(checksum::sum(hdr));
        put(hdr, field::CHECKSUM, &c.to_be_bytes())?;
        Ok(MIN_HEADER_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// UDP 192.168.0.1 -> 192.168.0.199, total length 0x73 (the classic
    /// checksum example), followed by its 95-byte payload of zeros.
    fn fixture() -> Vec<u8> {
        let mut v = vec![
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        v.resize(0x73, 0);
        v
    }

    #[test]
    fn parse_fixture() {
        let buf = fixture();
        let p = Packet::new_checked(&buf[..]).expect("valid");
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 0x73);
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), protocol::UDP);
        assert_eq!(p.checksum(), 0xb861);
        assert_eq!(p.src(), Ipv4Addr::new(192, 168, 0, 1));
        assert_eq!(p.dst(), Ipv4Addr::new(192, 168, 0, 199));
        assert!(!p.is_fragment(), "DF alone is not a fragment");
        assert!(p.verify_checksum());
        assert_eq!(p.payload().len(), 0x73 - 20);
    }

    #[test]
    fn padding_is_not_payload() {
        let mut buf = fixture();
        buf.extend_from_slice(&[0xee; 10]);
        let p = Packet::new_checked(&buf[..]).expect("valid");
        assert_eq!(p.payload().len(), 0x73 - 20);
    }

    #[test]
    fn rejects() {
        let buf = fixture();
        for len in 0..buf.len() {
            assert_eq!(
                Packet::new_checked(&buf[..len]).unwrap_err(),
                WireError::Truncated,
                "{len}"
            );
        }
        // (desc, byte patches, expected error)
        type Row = (&'static str, &'static [(usize, u8)], WireError);
        let rows: &[Row] = &[
            ("version 6", &[(0, 0x65)], WireError::Malformed),
            ("ihl 4", &[(0, 0x44)], WireError::Malformed),
            (
                "ihl past total length",
                &[(0, 0x4f), (2, 0), (3, 40)],
                WireError::Malformed,
            ),
            (
                "total length below header",
                &[(2, 0), (3, 19)],
                WireError::Malformed,
            ),
            (
                "total length past buffer",
                &[(2, 0x01)],
                WireError::Truncated,
            ),
        ];
        for (desc, patches, want) in rows {
            let mut b = fixture();
            for (at, val) in *patches {
                b[*at] = *val;
            }
            assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), *want, "{desc}");
        }
    }

    #[test]
    fn fragments() {
        for (flags, any, later) in [([0x20, 0x00], true, false), ([0x00, 0x10], true, true)] {
            let mut b = fixture();
            b[6..8].copy_from_slice(&flags);
            let p = Packet::new_checked(&b[..]).expect("valid");
            assert_eq!(
                (p.is_fragment(), p.is_later_fragment()),
                (any, later),
                "{flags:?}"
            );
        }
    }

    #[test]
    fn emit_matches_fixture() {
        let repr = Repr {
            src: Ipv4Addr::new(192, 168, 0, 1),
            dst: Ipv4Addr::new(192, 168, 0, 199),
            protocol: protocol::UDP,
            payload_len: 0x73 - 20,
            ttl: 64,
        };
        let mut out = [0u8; 20];
        assert_eq!(repr.emit(&mut out), Ok(20));
        let mut want = fixture();
        // The fixture sets DF; Repr does not.
        want[6] = 0;
        let mut p = Packet::new_checked(&mut want[..]).expect("valid");
        p.fill_checksum();
        assert_eq!(&out[..], &want[..20]);
        assert_eq!(repr.emit(&mut [0u8; 19]), Err(WireError::Truncated));
    }

    #[test]
    fn setters() {
        let mut b = fixture();
        let mut p = Packet::new_checked(&mut b[..]).expect("valid");
        p.set_src(Ipv4Addr::new(1, 2, 3, 4));
        p.set_dst(Ipv4Addr::new(5, 6, 7, 8));
        p.set_ttl(3);
        assert!(!p.verify_checksum());
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(
            (p.src(), p.dst(), p.ttl()),
            ((Ipv4Addr::new(1, 2, 3, 4)), Ipv4Addr::new(5, 6, 7, 8), 3)
        );
        p.payload_mut()[0] = 9;
        assert_eq!(p.payload()[0], 9);
    }
}

//! UDP headers (RFC 768).

use std::net::Ipv4Addr;

use super::{be16, checksum, ipv4, put, Result, WireError};

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const LENGTH: usize = 4;
    pub const CHECKSUM: usize = 6;
}

/// Length of the UDP header.
pub const HEADER_LEN: usize = 8;

/// A checked view of a UDP datagram.
#[derive(Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap `buffer` after checking that 8 <= length field <= buffer length.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let len = usize::from(be16(b, field::LENGTH));
        if len < HEADER_LEN {
            return Err(WireError::Malformed);
        }
        if b.len() < len {
            return Err(WireError::Truncated);
        }
        Ok(Packet { buffer })
    }

    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }

    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }

    pub fn len(&self) -> usize {
        usize::from(be16(self.buffer.as_ref(), field::LENGTH))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == HEADER_LEN
    }

    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The bytes after the header, up to the length field.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.len()]
    }

    /// Whether the checksum is right (zero means "not computed" and passes).
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        let b = &self.buffer.as_ref()[..self.len()];
        let len = self.len() as u16;
        let acc = checksum::combine(
            checksum::pseudo_header(src, dst, ipv4::protocol::UDP, len),
            checksum::sum(b),
        );
        checksum::finish(acc) == 0
    }
}

/// Write a UDP header for `payload_len` bytes that the caller has already
/// placed at `out[8..8 + payload_len]`, checksum included.
pub fn emit(
    out: &mut [u8],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload_len: usize,
) -> Result<usize> {
    let total = HEADER_LEN
        .checked_add(payload_len)
        .ok_or(WireError::Malformed)?;
    let len = u16::try_from(total).map_err(|_| WireError::Malformed)?;
    let dgram = out.get_mut(..total).ok_or(WireError::Truncated)?;
    put(dgram, field::SRC_PORT, &src.1.to_be_bytes())?;
    put(dgram, field::DST_PORT, &dst.1.to_be_bytes())?;
    put(dgram, field::LENGTH, &len.to_be_bytes())?;
    put(dgram, field::CHECKSUM, &[0, 0])?;
    let acc = checksum::combine(
        checksum::pseudo_header(src.0, dst.0, ipv4::protocol::UDP, len),
        checksum::sum(dgram),
    );
    let c = match checksum::finish(acc) {
        0 => 0xffff,
        c => c,
    };
    put(dgram, field::CHECKSUM, &c.to_be_bytes())?;
    Ok(HEADER_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);

    fn datagram() -> Vec<u8> {
        let mut out = vec![0u8; 12];
        out[8..].copy_from_slice(b"ping");
        emit(&mut out, (SRC, 67), (DST, 68), 4).expect("fits");
        out
    }

    #[test]
    fn emit_then_parse() {
        let d = datagram();
        let p = Packet::new_checked(&d[..]).expect("valid");
        assert_eq!((p.src_port(), p.dst_port(), p.len()), (67, 68, 12));
        assert_eq!(p.payload(), b"ping");
        assert!(p.verify_checksum(SRC, DST));
        assert!(!p.verify_checksum(SRC, Ipv4Addr::new(10, 0, 1, 11)));
        assert!(!p.is_empty());
    }

    #[test]
    fn checksum_matches_etherparse() {
        let d = datagram();
        let hdr = etherparse::UdpHeader::from_slice(&d).expect("header").0;
        let want = hdr
            .calc_checksum_ipv4_raw(SRC.octets(), DST.octets(), b"ping")
            .expect("checksum");
        assert_eq!(u16::from_be_bytes([d[6], d[7]]), want);
    }

    #[test]
    fn rejects() {
        let d = datagram();
        for len in 0..d.len() {
            assert_eq!(
                Packet::new_checked(&d[..len]).unwrap_err(),
                WireError::Truncated,
                "{len}"
            );
        }
        let mut bad = d.clone();
        bad[5] = 7;
        assert_eq!(
            Packet::new_checked(&bad[..]).unwrap_err(),
            WireError::Malformed
        );
        assert_eq!(
            emit(&mut [0u8; 11], (SRC, 1), (DST, 2), 4),
            Err(WireError::Truncated)
        );
    }
}

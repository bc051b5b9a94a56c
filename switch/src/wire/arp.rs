//! ARP for IPv4 over Ethernet (RFC 826).

use std::net::Ipv4Addr;

use super::{be16, be32, ethernet, mac_at, put, Result, WireError};

mod field {
    pub const HTYPE: usize = 0;
    pub const PTYPE: usize = 2;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: usize = 6;
    pub const SHA: usize = 8;
    pub const SPA: usize = 14;
    pub const THA: usize = 18;
    pub const TPA: usize = 24;
}

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;

/// Hardware type Ethernet.
pub const HTYPE_ETHERNET: u16 = 1;

/// ARP operations.
pub mod operation {
    pub const REQUEST: u16 = 1;
    pub const REPLY: u16 = 2;
}

/// A checked view of an Ethernet/IPv4 ARP packet.
#[derive(Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap `buffer` after checking its length, then that it is Ethernet /
    /// IPv4 ARP (anything else is [`WireError::Unsupported`]).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        if b.len() < PACKET_LEN {
            return Err(WireError::Truncated);
        }
        if be16(b, field::HTYPE) != HTYPE_ETHERNET
            || be16(b, field::PTYPE) != ethernet::ethertype::IPV4
            || b[field::HLEN] != 6
            || b[field::PLEN] != 4
        {
            return Err(WireError::Unsupported);
        }
        Ok(Packet { buffer })
    }

    pub fn operation(&self) -> u16 {
        be16(self.buffer.as_ref(), field::OPER)
    }

    pub fn sender_hw(&self) -> [u8; 6] {
        mac_at(self.buffer.as_ref(), field::SHA)
    }

    pub fn sender_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.buffer.as_ref(), field::SPA))
    }

    pub fn target_hw(&self) -> [u8; 6] {
        mac_at(self.buffer.as_ref(), field::THA)
    }

    pub fn target_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.buffer.as_ref(), field::TPA))
    }
}

/// The fields of an Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub operation: u16,
    pub sender_hw: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_hw: [u8; 6],
    pub target_ip: Ipv4Addr,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Repr {
        Repr {
            operation: p.operation(),
            sender_hw: p.sender_hw(),
            sender_ip: p.sender_ip(),
            target_hw: p.target_hw(),
            target_ip: p.target_ip(),
        }
    }

    /// Write the packet at the start of `out`; returns its length.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize> {
        if out.len() < PACKET_LEN {
            return Err(WireError::Truncated);
        }
        put(out, field::HTYPE, &HTYPE_ETHERNET.to_be_bytes())?;
        put(out, field::PTYPE, &ethernet::ethertype::IPV4.to_be_bytes())?;
        put(out, field::HLEN, &[6, 4])?;
        put(out, field::OPER, &self.operation.to_be_bytes())?;
        put(out, field::SHA, &self.sender_hw)?;
        put(out, field::SPA, &self.sender_ip.octets())?;
        put(out, field::THA, &self.target_hw)?;
        put(out, field::TPA, &self.target_ip.octets())?;
        Ok(PACKET_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// who-has 10.0.1.1 tell 10.0.1.10
    const REQUEST: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, // eth/ipv4, request
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 10, 0, 1, 10, // sender
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 10, 0, 1, 1, // target
    ];

    fn repr() -> Repr {
        Repr {
            operation: operation::REQUEST,
            sender_hw: [2, 0, 0, 0, 0, 1],
            sender_ip: Ipv4Addr::new(10, 0, 1, 10),
            target_hw: [0; 6],
            target_ip: Ipv4Addr::new(10, 0, 1, 1),
        }
    }

    #[test]
    fn parse_fixture() {
        let p = Packet::new_checked(&REQUEST[..]).expect("valid");
        assert_eq!(Repr::parse(&p), repr());
    }

    #[test]
    fn emit_fixture() {
        let mut out = [0u8; 28];
        assert_eq!(repr().emit(&mut out), Ok(28));
        assert_eq!(out, REQUEST);
        assert_eq!(repr().emit(&mut [0u8; 27]), Err(WireError::Truncated));
    }

    #[test]
    fn rejects() {
        for len in 0..PACKET_LEN {
            assert_eq!(
                Packet::new_checked(&REQUEST[..len]).unwrap_err(),
                WireError::Truncated
            );
        }
        for (at, val) in [(1, 6), (2, 0x86), (4, 8), (5, 16)] {
            let mut b = REQUEST;
            b[at] = val;
            assert_eq!(
                Packet::new_checked(&b[..]).unwrap_err(),
                WireError::Unsupported,
                "{at}"
            );
        }
    }
}

//! Ethernet II frames (no FCS, no VLAN tags).

use super::{be16, mac_at, put, Result, WireError};

/// Ethertypes the switch looks at.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const IPV6: u16 = 0x86dd;
}

mod field {
    use core::ops::{Range, RangeFrom};
    pub const DST: Range<usize> = 0..6;
    pub const SRC: Range<usize> = 6..12;
    pub const ETHERTYPE: usize = 12;
    pub const PAYLOAD: RangeFrom<usize> = 14..;
}

/// Length of the Ethernet II header.
pub const HEADER_LEN: usize = 14;

/// The all-ones broadcast address.
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// Whether a MAC is a group (multicast or broadcast) address.
pub fn is_group(mac: &[u8; 6]) -> bool {
    mac[0] & 1 != 0
}

/// A checked view of an Ethernet II frame.
#[derive(Debug)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wrap `buffer` after checking it holds a whole header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Frame { buffer })
    }

    pub fn dst(&self) -> [u8; 6] {
        mac_at(self.buffer.as_ref(), field::DST.start)
    }

    pub fn src(&self) -> [u8; 6] {
        mac_at(self.buffer.as_ref(), field::SRC.start)
    }

    pub fn ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ETHERTYPE)
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD]
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    pub fn set_dst(&mut self, mac: [u8; 6]) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&mac);
    }

    pub fn set_src(&mut self, mac: [u8; 6]) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&mac);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD]
    }
}

/// Write an Ethernet header at the start of `out`.
pub fn emit(out: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Result<()> {
    put(out, field::DST.start, &dst)?;
    put(out, field::SRC.start, &src)?;
    put(out, field::ETHERTYPE, &ethertype.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: [u8; 18] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // dst
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // src
        0x08, 0x06, // ARP
        0xde, 0xad, 0xbe, 0xef,
    ];

    #[test]
    fn parse_fixture() {
        let f = Frame::new_checked(&FRAME[..]).expect("valid");
        assert_eq!(f.dst(), BROADCAST);
        assert_eq!(f.src(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(f.ethertype(), ethertype::ARP);
        assert_eq!(f.payload(), &[0xde, 0xad, 0xbe, 0xef]);
        assert!(is_group(&f.dst()));
        assert!(!is_group(&f.src()));
        assert!(is_group(&[0x01, 0x00, 0x5e, 0, 0, 1]));
    }

    #[test]
    fn truncated() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                Frame::new_checked(&FRAME[..len]).unwrap_err(),
                WireError::Truncated
            );
        }
        let f = Frame::new_checked(&FRAME[..HEADER_LEN]).expect("header only");
        assert!(f.payload().is_empty());
    }

    #[test]
    fn emit_and_set_round_trip() {
        let mut buf = [0u8; 18];
        emit(&mut buf, BROADCAST, [2, 0, 0, 0, 0, 1], ethertype::ARP).expect("fits");
        buf[14..].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(buf, FRAME);
        let mut f = Frame::new_checked(&mut buf[..]).expect("valid");
        f.set_dst([2, 0, 0, 0, 0, 9]);
        f.set_src([2, 0, 0, 0, 0, 8]);
        f.payload_mut()[0] = 0;
        assert_eq!(f.dst(), [2, 0, 0, 0, 0, 9]);
        assert_eq!(f.src(), [2, 0, 0, 0, 0, 8]);
        assert_eq!(f.payload()[0], 0);
        assert_eq!(
            emit(&mut [0u8; 13], BROADCAST, BROADCAST, 0),
            Err(WireError::Truncated)
        );
    }
}

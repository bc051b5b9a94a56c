//! DHCP over BOOTP (RFC 2131, options from RFC 2132).

use std::net::Ipv4Addr;

use super::{be16, be32, put, Result, WireError};

mod field {
    use core::ops::Range;
    pub const OP: usize = 0;
    pub const HTYPE: usize = 1;
    pub const HLEN: usize = 2;
    pub const XID: usize = 4;
    pub const FLAGS: usize = 10;
    pub const CIADDR: usize = 12;
    pub const YIADDR: usize = 16;
    pub const SIADDR: usize = 20;
    pub const GIADDR: usize = 24;
    pub const CHADDR: Range<usize> = 28..44;
    pub const MAGIC: Range<usize> = 236..240;
    pub const OPTIONS: usize = 240;
}

/// BOOTP header plus the magic cookie; options follow.
pub const HEADER_LEN: usize = field::OPTIONS;

/// Smallest BOOTP message some clients accept; replies are padded to it.
pub const MIN_MESSAGE_LEN: usize = 300;

/// The magic cookie that marks DHCP options.
pub const MAGIC: [u8; 4] = [99, 130, 83, 99];

/// The broadcast bit of `flags`.
pub const FLAG_BROADCAST: u16 = 0x8000;

/// Well-known ports.
pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;

/// BOOTP `op` values.
pub mod op {
    pub const REQUEST: u8 = 1;
    pub const REPLY: u8 = 2;
}

/// Values of option 53.
pub mod message_type {
    pub const DISCOVER: u8 = 1;
    pub const OFFER: u8 = 2;
    pub const REQUEST: u8 = 3;
    pub const DECLINE: u8 = 4;
    pub const ACK: u8 = 5;
    pub const NAK: u8 = 6;
    pub const RELEASE: u8 = 7;
    pub const INFORM: u8 = 8;
}

/// Option codes.
pub mod option {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOSTNAME: u8 = 12;
    pub const INTERFACE_MTU: u8 = 26;
    pub const BROADCAST: u8 = 28;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const MESSAGE: u8 = 56;
    pub const END: u8 = 255;
}

/// A checked view of a DHCP message (the UDP payload).
#[derive(Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap `buffer` after checking it holds the BOOTP header and the DHCP
    /// magic cookie.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[field::MAGIC] != MAGIC {
            return Err(WireError::Unsupported);
        }
        Ok(Packet { buffer })
    }

    pub fn op(&self) -> u8 {
        self.buffer.as_ref()[field::OP]
    }

    pub fn htype(&self) -> u8 {
        self.buffer.as_ref()[field::HTYPE]
    }

    pub fn hlen(&self) -> u8 {
        self.buffer.as_ref()[field::HLEN]
    }

    pub fn xid(&self) -> u32 {
        be32(self.buffer.as_ref(), field::XID)
    }

    pub fn flags(&self) -> u16 {
        be16(self.buffer.as_ref(), field::FLAGS)
    }

    pub fn ciaddr(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.buffer.as_ref(), field::CIADDR))
    }

    pub fn yiaddr(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.buffer.as_ref(), field::YIADDR))
    }

    pub fn siaddr(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.buffer.as_ref(), field::SIADDR))
    }

    pub fn giaddr(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.buffer.as_ref(), field::GIADDR))
    }

    /// The 16-byte client hardware address field.
    pub fn chaddr(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out.copy_from_slice(&self.buffer.as_ref()[field::CHADDR]);
        out
    }

    /// The options, in order, without PAD and END.
    pub fn options(&self) -> Options<'_> {
        Options {
            rest: &self.buffer.as_ref()[field::OPTIONS..],
        }
    }
}

/// Iterator over `(code, value)`; yields one `Err` on a truncated option
/// and then stops.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Options<'a> {
    type Item = Result<(u8, &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (&code, after) = self.rest.split_first()?;
            match code {
                option::PAD => self.rest = after,
                option::END => {
                    self.rest = &[];
                    return None;
                }
                _ => {
                    let Some((&len, after)) = after.split_first() else {
                        self.rest = &[];
                        return Some(Err(WireError::Truncated));
                    };
                    let len = usize::from(len);
                    if after.len() < len {
                        self.rest = &[];
                        return Some(Err(WireError::Truncated));
                    }
                    let (value, after) = after.split_at(len);
                    self.rest = after;
                    return Some(Ok((code, value)));
                }
            }
        }
    }
}

/// The options of a client message the server acts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientOptions {
    pub message_type: Option<u8>,
    pub requested_ip: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
}

fn ip_option(value: &[u8]) -> Result<Ipv4Addr> {
    let octets: [u8; 4] = value.try_into().map_err(|_| WireError::Malformed)?;
    Ok(Ipv4Addr::from(octets))
}

impl ClientOptions {
    /// Collect the options; a truncated option list or a wrong-sized value
    /// of one of these options is an error, other options are skipped.
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<ClientOptions> {
        let mut out = ClientOptions::default();
        for opt in p.options() {
            let (code, value) = opt?;
            match code {
                option::MESSAGE_TYPE => match value {
                    [t] => out.message_type = Some(*t),
                    _ => return Err(WireError::Malformed),
                },
                option::REQUESTED_IP => out.requested_ip = Some(ip_option(value)?),
                option::SERVER_ID => out.server_id = Some(ip_option(value)?),
                _ => {}
            }
        }
        Ok(out)
    }
}

/// A server reply (OFFER, ACK or NAK). Options that are `None` are left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyRepr<'a> {
    pub message_type: u8,
    pub xid: u32,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 16],
    pub server_id: Ipv4Addr,
    pub lease_time: Option<u32>,
    pub subnet_mask: Option<Ipv4Addr>,
    pub router: Option<Ipv4Addr>,
    pub dns: Option<Ipv4Addr>,
    pub mtu: Option<u16>,
    pub broadcast: Option<Ipv4Addr>,
    pub hostname: Option<&'a [u8]>,
    pub message: Option<&'a [u8]>,
}

struct OptionWriter<'o> {
    out: &'o mut [u8],
    at: usize,
}

impl OptionWriter<'_> {
    fn push(&mut self, code: u8, value: &[u8]) -> Result<()> {
        let len = u8::try_from(value.len()).map_err(|_| WireError::Malformed)?;
        put(self.out, self.at, &[code, len])?;
        put(self.out, self.at + 2, value)?;
        self.at += 2 + value.len();
        Ok(())
    }

    fn push_ip(&mut self, code: u8, ip: Option<Ipv4Addr>) -> Result<()> {
        match ip {
            Some(ip) => self.push(code, &ip.octets()),
            None => Ok(()),
        }
    }
}

impl ReplyRepr<'_> {
    /// Write the message at the start of `out`, padded to
    /// [`MIN_MESSAGE_LEN`]; returns its length.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize> {
        let hdr = out.get_mut(..HEADER_LEN).ok_or(WireError::Truncated)?;
        hdr.fill(0);
        hdr[field::OP] = op::REPLY;
        hdr[field::HTYPE] = 1;
        hdr[field::HLEN] = 6;
        put(hdr, field::XID, &self.xid.to_be_bytes())?;
        put(hdr, field::FLAGS, &self.flags.to_be_bytes())?;
        put(hdr, field::CIADDR, &self.ciaddr.octets())?;
        put(hdr, field::YIADDR, &self.yiaddr.octets())?;
        put(hdr, field::GIADDR, &self.giaddr.octets())?;
        put(hdr, field::CHADDR.start, &self.chaddr)?;
        put(hdr, field::MAGIC.start, &MAGIC)?;

        let mut w = OptionWriter {
            out,
            at: HEADER_LEN,
        };
        w.push(option::MESSAGE_TYPE, &[self.message_type])?;
        w.push(option::SERVER_ID, &self.server_id.octets())?;
        if let Some(lease) = self.lease_time {
            w.push(option::LEASE_TIME, &lease.to_be_bytes())?;
        }
        w.push_ip(option::SUBNET_MASK, self.subnet_mask)?;
        w.push_ip(option::ROUTER, self.router)?;
        w.push_ip(option::DNS, self.dns)?;
        if let Some(mtu) = self.mtu {
            w.push(option::INTERFACE_MTU, &mtu.to_be_bytes())?;
        }
        w.push_ip(option::BROADCAST, self.broadcast)?;
        if let Some(name) = self.hostname {
            w.push(option::HOSTNAME, name)?;
        }
        if let Some(msg) = self.message {
            w.push(option::MESSAGE, msg)?;
        }
        let at = w.at;
        put(out, at, &[option::END])?;
        let end = (at + 1).max(MIN_MESSAGE_LEN);
        out.get_mut(at + 1..end)
            .ok_or(WireError::Truncated)?
            .fill(option::PAD);
        Ok(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discover() -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0] = op::REQUEST;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
        b[10] = 0x80;
        b[28..34].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        b[236..240].copy_from_slice(&MAGIC);
        b.extend_from_slice(&[
            option::PAD,
            option::MESSAGE_TYPE,
            1,
            message_type::DISCOVER,
            option::REQUESTED_IP,
            4,
            10,
            0,
            1,
            10,
            55,
            3,
            1,
            3,
            6, // parameter request list, skipped
            option::SERVER_ID,
            4,
            10,
            0,
            1,
            1,
            option::END,
            0xaa,
            0xbb, // after END: ignored
        ]);
        b
    }

    #[test]
    fn parse_fixture() {
        let b = discover();
        let p = Packet::new_checked(&b[..]).expect("valid");
        assert_eq!((p.op(), p.htype(), p.hlen()), (op::REQUEST, 1, 6));
        assert_eq!(p.xid(), 0xdead_beef);
        assert_eq!(p.flags(), FLAG_BROADCAST);
        assert_eq!(p.ciaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(p.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(p.siaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(p.giaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(&p.chaddr()[..6], &[2, 0, 0, 0, 0, 1]);
        let codes: Vec<u8> = p.options().map(|o| o.expect("ok").0).collect();
        assert_eq!(codes, [53, 50, 55, 54]);
        assert_eq!(
            ClientOptions::parse(&p),
            Ok(ClientOptions {
                message_type: Some(message_type::DISCOVER),
                requested_ip: Some(Ipv4Addr::new(10, 0, 1, 10)),
                server_id: Some(Ipv4Addr::new(10, 0, 1, 1)),
            })
        );
    }

    #[test]
    fn rejects() {
        let b = discover();
        for len in 0..HEADER_LEN {
            assert_eq!(
                Packet::new_checked(&b[..len]).unwrap_err(),
                WireError::Truncated
            );
        }
        let mut bad = b.clone();
        bad[236] = 0;
        assert_eq!(
            Packet::new_checked(&bad[..]).unwrap_err(),
            WireError::Unsupported
        );
        // Every cut inside the option list before END is an error, never a
        // panic; cuts between options are a shorter valid list.
        let end = b.len() - 3;
        for len in HEADER_LEN..end {
            let p = Packet::new_checked(&b[..len]).expect("header present");
            let _ = ClientOptions::parse(&p);
        }
        let p = Packet::new_checked(&b[..HEADER_LEN + 3]).expect("header present");
        assert_eq!(ClientOptions::parse(&p), Err(WireError::Truncated));
        let mut wrong = b.clone();
        wrong[HEADER_LEN + 2] = 2; // message type of length 2
        let p = Packet::new_checked(&wrong[..]).expect("header present");
        assert_eq!(ClientOptions::parse(&p), Err(WireError::Malformed));
    }

    #[test]
    fn reply_round_trip() {
        let repr = ReplyRepr {
            message_type: message_type::OFFER,
            xid: 7,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::new(10, 0, 1, 10),
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            server_id: Ipv4Addr::new(10, 0, 1, 1),
            lease_time: Some(3600),
            subnet_mask: Some(Ipv4Addr::new(255, 255, 255, 0)),
            router: Some(Ipv4Addr::new(10, 0, 1, 1)),
            dns: Some(Ipv4Addr::new(10, 0, 1, 2)),
            mtu: Some(9001),
            broadcast: Some(Ipv4Addr::new(10, 0, 1, 255)),
            hostname: Some(b"ip-10-0-1-10"),
            message: None,
        };
        let mut out = [0u8; 576];
        let n = repr.emit(&mut out).expect("fits");
        assert_eq!(n, MIN_MESSAGE_LEN);
        let p = Packet::new_checked(&out[..n]).expect("valid");
        assert_eq!(
            (p.op(), p.xid(), p.yiaddr()),
            (op::REPLY, 7, Ipv4Addr::new(10, 0, 1, 10))
        );
        let opts: Vec<(u8, Vec<u8>)> = p
            .options()
            .map(|o| o.map(|(c, v)| (c, v.to_vec())).expect("ok"))
            .collect();
        assert_eq!(
            opts,
            vec![
                (53, vec![2]),
                (54, vec![10, 0, 1, 1]),
                (51, 3600u32.to_be_bytes().to_vec()),
                (1, vec![255, 255, 255, 0]),
                (3, vec![10, 0, 1, 1]),
                (6, vec![10, 0, 1, 2]),
                (26, 9001u16.to_be_bytes().to_vec()),
                (28, vec![10, 0, 1, 255]),
                (12, b"ip-10-0-1-10".to_vec()),
            ]
        );
        for short in [0, HEADER_LEN, HEADER_LEN + 10, MIN_MESSAGE_LEN - 1] {
            assert_eq!(
                repr.emit(&mut out[..short]),
                Err(WireError::Truncated),
                "{short}"
            );
        }
    }
}

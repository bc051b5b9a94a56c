//! IPv4 CIDR blocks: strict parsing and the arithmetic the API needs.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network `addr/len`. `addr` may have host bits set only when built
/// with [`Cidr::parse_loose`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: u32,
    pub len: u8,
}

/// Why a CIDR string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// Not of the form a.b.c.d/n.
    #[error("'{0}' is not a valid CIDR block")]
    Syntax(String),
    /// Host bits set below the prefix length.
    #[error("'{0}' has host bits set")]
    NotAligned(String),
}

impl Cidr {
    /// `a.b.c.d/n` with host bits allowed (security group and route sources).
    pub fn parse_loose(s: &str) -> Result<Cidr, NetError> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| NetError::Syntax(s.into()))?;
        let addr = Ipv4Addr::from_str(a).map_err(|_| NetError::Syntax(s.into()))?;
        if l.is_empty() || l.len() > 2 || !l.bytes().all(|b| b.is_ascii_digit()) {
            return Err(NetError::Syntax(s.into()));
        }
        let len: u8 = l.parse().map_err(|_| NetError::Syntax(s.into()))?;
        if len > 32 {
            return Err(NetError::Syntax(s.into()));
        }
        Ok(Cidr {
            addr: u32::from(addr),
            len,
        })
    }

    /// `a.b.c.d/n` with no host bits set.
    pub fn parse(s: &str) -> Result<Cidr, NetError> {
        let c = Cidr::parse_loose(s)?;
        if c.addr & !c.mask() != 0 {
            return Err(NetError::NotAligned(s.into()));
        }
        Ok(c)
    }

    pub fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        }
    }

    pub fn network(&self) -> u32 {
        self.addr & self.mask()
    }

    /// The same block with host bits cleared.
    pub fn normalized(&self) -> Cidr {
        Cidr {
            addr: self.network(),
            len: self.len,
        }
    }

    /// Number of addresses in the block.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    pub fn last(&self) -> u32 {
        self.network() | !self.mask()
    }

    pub fn contains(&self, ip: u32) -> bool {
        ip & self.mask() == self.network()
    }

    /// `other` lies entirely inside `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains(other.network())
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.covers(other) || other.covers(self)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.addr), self.len)
    }
}

/// Parse a dotted quad strictly (no leading zeros ambiguity beyond std's).
pub fn parse_ip(s: &str) -> Option<u32> {
    Ipv4Addr::from_str(s).ok().map(u32::from)
}

pub fn ip_string(ip: u32) -> String {
    Ipv4Addr::from(ip).to_string()
}

/// Host addresses AWS hands out in a subnet: network+4 ..= broadcast-1.
pub fn usable_range(subnet: &Cidr) -> (u32, u32) {
    (subnet.network() + 4, subnet.last() - 1)
}

/// Is `ip` one of the five addresses AWS reserves in `subnet`?
pub fn is_reserved(subnet: &Cidr, ip: u32) -> bool {
    let (lo, hi) = usable_range(subnet);
    ip < lo || ip > hi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let c = Cidr::parse("10.0.0.0/16").unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/16");
        assert_eq!(c.size(), 65536);
        assert!(Cidr::parse("10.0.0.1/16").is_err());
        assert!(Cidr::parse_loose("10.0.0.1/16").is_ok());
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/008",
        ] {
            assert!(Cidr::parse_loose(bad).is_err(), "{bad}");
        }
        let s = Cidr::parse("10.0.1.0/24").unwrap();
        assert!(c.covers(&s) && !s.covers(&c) && s.overlaps(&c));
        assert!(!Cidr::parse("10.1.0.0/24").unwrap().overlaps(&s));
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().mask(), 0);
    }

    #[test]
    fn reserved_addresses() {
        let s = Cidr::parse("10.0.1.0/28").unwrap();
        let ip = |x: &str| parse_ip(x).unwrap();
        for r in ["10.0.1.0", "10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.15"] {
            assert!(is_reserved(&s, ip(r)), "{r}");
        }
        assert!(!is_reserved(&s, ip("10.0.1.4")));
        assert!(!is_reserved(&s, ip("10.0.1.14")));
    }
}

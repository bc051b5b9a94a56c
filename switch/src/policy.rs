//! VPC policy as the control plane states it (route tables, security groups,
//! network ACLs, Elastic IPs, flow logs) and the compiled forms the packet
//! path evaluates.
//!
//! Everything here is referenced by AWS-style string ids in the
//! [`Topology`](crate::Topology); `Snapshot::compile` resolves the ids to
//! dense indexes once, so the packet path never touches a string.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use crate::wire::ipv4::protocol;

/// Errors in a policy value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// Not `a.b.c.d/n` with n in 0..=32.
    #[error("'{0}' is not a valid IPv4 CIDR block")]
    BadCidr(String),
    /// An IP protocol name or number the switch does not know.
    #[error("invalid value '{0}' for IP protocol: unknown protocol")]
    BadProtocol(String),
    /// A port range whose start is above its end, or that is out of range.
    #[error("invalid port range {0}..{1}")]
    BadPortRange(i32, i32),
    /// A network ACL rule number outside 1..=32766.
    #[error("network ACL rule number {0} is outside 1..=32766")]
    BadRuleNumber(u32),
}

/// An IPv4 CIDR block. Constructed values always have their host bits
/// cleared, so `contains` is one mask and compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    net: u32,
    len: u8,
}

impl Cidr {
    /// The block of `addr/len`, with host bits cleared. `len` above 32 is
    /// refused.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Cidr, PolicyError> {
        if len > 32 {
            return Err(PolicyError::BadCidr(format!("{addr}/{len}")));
        }
        Ok(Cidr {
            net: u32::from(addr) & mask(len),
            len,
        })
    }

    /// `addr/len` only if no host bits are set (as AWS requires for subnets
    /// and routes).
    pub fn exact(addr: Ipv4Addr, len: u8) -> Result<Cidr, PolicyError> {
        let c = Cidr::new(addr, len)?;
        if c.net != u32::from(addr) {
            return Err(PolicyError::BadCidr(format!("{addr}/{len}")));
        }
        Ok(c)
    }

    /// Every address.
    pub const ANY: Cidr = Cidr { net: 0, len: 0 };

    /// A single host.
    pub fn host(addr: Ipv4Addr) -> Cidr {
        Cidr {
            net: u32::from(addr),
            len: 32,
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.net)
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn mask(&self) -> u32 {
        mask(self.len)
    }

    #[inline]
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == self.net
    }

    /// Whether the two blocks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let m = mask(self.len.min(other.len));
        self.net & m == other.net & m
    }

    /// The addresses of the block, first to last (at most 2^(32-len)).
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.len));
        let net = u64::from(self.net);
        (net..net + size).map(|a| Ipv4Addr::from(a as u32))
    }
}

/// The network mask of a prefix length (0..=32; longer counts as 32).
#[inline]
pub(crate) fn mask(len: u8) -> u32 {
    match len {
        0 => 0,
        l if l >= 32 => u32::MAX,
        l => u32::MAX << (32 - u32::from(l)),
    }
}

impl FromStr for Cidr {
    type Err = PolicyError;

    /// Parses `a.b.c.d/n`; host bits are cleared (security group and ACL
    /// rules accept them, as AWS does).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PolicyError::BadCidr(s.to_string());
        let (a, l) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        if l.is_empty() || l.len() > 2 || !l.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let len: u8 = l.parse().map_err(|_| bad())?;
        Cidr::new(addr, len).map_err(|_| bad())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.len)
    }
}

/// An IP protocol in a rule: every protocol, or one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    All,
    Number(u8),
}

impl Protocol {
    pub const TCP: Protocol = Protocol::Number(protocol::TCP);
    pub const UDP: Protocol = Protocol::Number(protocol::UDP);
    pub const ICMP: Protocol = Protocol::Number(protocol::ICMP);

    #[inline]
    pub fn matches(self, proto: u8) -> bool {
        match self {
            Protocol::All => true,
            Protocol::Number(n) => n == proto,
        }
    }

    /// Whether rules of this protocol carry a port range.
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Number(protocol::TCP | protocol::UDP))
    }
}

impl FromStr for Protocol {
    type Err = PolicyError;

    /// AWS's spellings: `-1` or `all`, `tcp`, `udp`, `icmp`, or a number
    /// 0..=255.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "-1" | "all" => Ok(Protocol::All),
            "tcp" => Ok(Protocol::TCP),
            "udp" => Ok(Protocol::UDP),
            "icmp" => Ok(Protocol::ICMP),
            n => n
                .parse::<u8>()
                .map(Protocol::Number)
                .map_err(|_| PolicyError::BadProtocol(s.to_string())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::All => f.write_str("-1"),
            Protocol::Number(protocol::TCP) => f.write_str("tcp"),
            Protocol::Number(protocol::UDP) => f.write_str("udp"),
            Protocol::Number(protocol::ICMP) => f.write_str("icmp"),
            Protocol::Number(n) => write!(f, "{n}"),
        }
    }
}

/// What a rule matches beyond the protocol: a TCP/UDP destination port
/// range, or an ICMP type and code (`None` = any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortMatch {
    Any,
    Ports {
        lo: u16,
        hi: u16,
    },
    Icmp {
        icmp_type: Option<u8>,
        code: Option<u8>,
    },
}

impl PortMatch {
    /// Build from AWS's FromPort/ToPort pair for `proto`: a port range for
    /// TCP and UDP (start not above end), type/code for ICMP (-1 = any), and
    /// nothing for other protocols.
    pub fn from_aws(proto: Protocol, from: i32, to: i32) -> Result<PortMatch, PolicyError> {
        match proto {
            Protocol::Number(protocol::TCP | protocol::UDP) => {
                if from == -1 && to == -1 {
                    return Ok(PortMatch::Any);
                }
                let ok = (0..=65535).contains(&from) && (0..=65535).contains(&to) && from <= to;
                if !ok {
                    return Err(PolicyError::BadPortRange(from, to));
                }
                Ok(PortMatch::Ports {
                    lo: from as u16,
                    hi: to as u16,
                })
            }
            Protocol::Number(protocol::ICMP) => {
                let t = icmp_field(from).ok_or(PolicyError::BadPortRange(from, to))?;
                let c = icmp_field(to).ok_or(PolicyError::BadPortRange(from, to))?;
                Ok(PortMatch::Icmp {
                    icmp_type: t,
                    code: c,
                })
            }
            _ => Ok(PortMatch::Any),
        }
    }

    /// `l4` is the packet's (destination port) for TCP/UDP, or (type, code)
    /// packed as `type << 8 | code` for ICMP.
    #[inline]
    fn matches(&self, l4: u16) -> bool {
        match *self {
            PortMatch::Any => true,
            PortMatch::Ports { lo, hi } => (lo..=hi).contains(&l4),
            PortMatch::Icmp { icmp_type, code } => {
                icmp_type.is_none_or(|t| t == (l4 >> 8) as u8)
                    && code.is_none_or(|c| c == (l4 & 0xff) as u8)
            }
        }
    }
}

fn icmp_field(v: i32) -> Option<Option<u8>> {
    match v {
        -1 => Some(None),
        0..=255 => Some(Some(v as u8)),
        _ => None,
    }
}

/// The other end a security-group rule admits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    Cidr(Cidr),
    /// Every ENI that is a member of this group (by `sg-` id).
    Group(String),
}

/// One security-group rule (ingress: `peer` is the source; egress: the
/// destination).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SgRule {
    pub protocol: Protocol,
    pub ports: PortMatch,
    pub peer: Peer,
}

/// A security group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityGroupConfig {
    pub id: String,
    pub vpc_id: String,
    pub ingress: Vec<SgRule>,
    pub egress: Vec<SgRule>,
}

impl SecurityGroupConfig {
    /// AWS's default group: all egress, ingress from members of itself.
    pub fn default_for(id: &str, vpc_id: &str) -> SecurityGroupConfig {
        SecurityGroupConfig {
            id: id.into(),
            vpc_id: vpc_id.into(),
            ingress: vec![SgRule {
                protocol: Protocol::All,
                ports: PortMatch::Any,
                peer: Peer::Group(id.into()),
            }],
            egress: vec![SgRule {
                protocol: Protocol::All,
                ports: PortMatch::Any,
                peer: Peer::Cidr(Cidr::ANY),
            }],
        }
    }
}

/// One numbered network ACL entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclEntry {
    /// 1..=32766; lower numbers are evaluated first.
    pub number: u16,
    pub protocol: Protocol,
    pub ports: PortMatch,
    /// Source (ingress) or destination (egress) block.
    pub cidr: Cidr,
    pub allow: bool,
}

/// A network ACL. Entries are evaluated in rule-number order; no match
/// denies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkAclConfig {
    pub id: String,
    pub vpc_id: String,
    pub ingress: Vec<AclEntry>,
    pub egress: Vec<AclEntry>,
}

impl NetworkAclConfig {
    /// AWS's default ACL: rule 100 allows everything both ways.
    pub fn allow_all(id: &str, vpc_id: &str) -> NetworkAclConfig {
        let all = AclEntry {
            number: 100,
            protocol: Protocol::All,
            ports: PortMatch::Any,
            cidr: Cidr::ANY,
            allow: true,
        };
        NetworkAclConfig {
            id: id.into(),
            vpc_id: vpc_id.into(),
            ingress: vec![all.clone()],
            egress: vec![all],
        }
    }
}

/// Where a route sends matching traffic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RouteTarget {
    /// Inside the VPC: to the port that owns the destination address.
    Local,
    /// The VPC's attached internet gateway (`igw-` id).
    InternetGateway(String),
    /// A NAT gateway (`nat-` id), served by a hyperplane port.
    NatGateway(String),
    /// An ENI (`eni-` id): a user's own NAT or firewall instance.
    Eni(String),
    /// Drop.
    Blackhole,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: Cidr,
    pub target: RouteTarget,
}

/// A route table. The local route for each VPC CIDR is implied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTableConfig {
    pub id: String,
    pub vpc_id: String,
    pub routes: Vec<Route>,
}

/// A public address NATed 1:1 to a private one at the internet gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElasticIp {
    pub public_ip: Ipv4Addr,
    pub vpc_id: String,
    pub private_ip: Ipv4Addr,
}

/// What a flow log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrafficType {
    Accept,
    Reject,
    All,
}

impl TrafficType {
    pub fn wants(self, accepted: bool) -> bool {
        match self {
            TrafficType::All => true,
            TrafficType::Accept => accepted,
            TrafficType::Reject => !accepted,
        }
    }
}

/// Which interfaces a flow log covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FlowLogScope {
    Eni(String),
    Subnet(String),
    Vpc(String),
}

/// One flow log: v2 default-format records appended to `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowLogConfig {
    pub id: String,
    pub scope: FlowLogScope,
    pub traffic: TrafficType,
    /// Aggregation interval in seconds: 60 or 600 in AWS; anything from 1
    /// is accepted so tests need not wait a minute.
    pub interval_secs: u32,
    pub path: PathBuf,
    pub account_id: String,
}

// ---------------------------------------------------------------------------
// Compiled forms
// ---------------------------------------------------------------------------

/// What the packet path knows of a flow when it checks rules.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Probe {
    pub protocol: u8,
    /// Destination port (TCP/UDP) or type << 8 | code (ICMP).
    pub l4: u16,
    /// The far end's address (source on ingress, destination on egress).
    pub peer_ip: Ipv4Addr,
}

#[derive(Debug, Clone)]
pub(crate) enum CompiledPeer {
    Cidr(Cidr),
    /// Dense index of the referenced group.
    Group(u32),
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    pub protocol: Protocol,
    pub ports: PortMatch,
    pub peer: CompiledPeer,
}

impl CompiledRule {
    /// `peer_groups`: the groups of the far-end port, if it is an ENI of the
    /// same VPC.
    #[inline]
    pub fn admits(&self, p: &Probe, peer_groups: &[u32]) -> bool {
        self.protocol.matches(p.protocol)
            && self.ports.matches(p.l4)
            && match &self.peer {
                CompiledPeer::Cidr(c) => c.contains(p.peer_ip),
                CompiledPeer::Group(g) => peer_groups.contains(g),
            }
    }
}

/// A compiled network ACL direction: entries sorted by number.
#[derive(Debug, Clone, Default)]
pub(crate) struct CompiledAcl {
    pub entries: Vec<AclEntry>,
}

impl CompiledAcl {
    pub fn new(entries: &[AclEntry]) -> CompiledAcl {
        let mut entries = entries.to_vec();
        entries.sort_by_key(|e| e.number);
        CompiledAcl { entries }
    }

    /// First matching entry decides; no match denies.
    #[inline]
    pub fn allows(&self, p: &Probe) -> bool {
        self.entries
            .iter()
            .find(|e| {
                e.protocol.matches(p.protocol)
                    && e.ports.matches(p.l4)
                    && e.cidr.contains(p.peer_ip)
            })
            .is_some_and(|e| e.allow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        let rows: &[(&str, Option<(&str, u8)>)] = &[
            ("10.0.0.0/16", Some(("10.0.0.0", 16))),
            ("10.0.1.7/24", Some(("10.0.1.0", 24))),
            ("0.0.0.0/0", Some(("0.0.0.0", 0))),
            ("1.2.3.4/32", Some(("1.2.3.4", 32))),
            ("10.0.0.0/33", None),
            ("10.0.0.0", None),
            ("10.0.0/8", None),
            ("10.0.0.0/", None),
            ("10.0.0.0/+8", None),
            ("10.0.0.0/008", None),
            ("256.0.0.0/8", None),
            ("", None),
        ];
        for (s, want) in rows {
            let got = s.parse::<Cidr>();
            match want {
                Some((net, len)) => {
                    let c = got.unwrap_or_else(|e| panic!("{s}: {e}"));
                    assert_eq!(c.network().to_string(), *net, "{s}");
                    assert_eq!(c.prefix_len(), *len, "{s}");
                }
                None => assert!(got.is_err(), "{s} parsed"),
            }
        }
        assert!(Cidr::exact(Ipv4Addr::new(10, 0, 1, 7), 24).is_err());
        assert!(Cidr::exact(Ipv4Addr::new(10, 0, 1, 0), 24).is_ok());
    }

    #[test]
    fn cidr_contains_and_overlaps() {
        let a: Cidr = "10.0.0.0/16".parse().unwrap();
        let b: Cidr = "10.0.5.0/24".parse().unwrap();
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(a.contains(Ipv4Addr::new(10, 0, 255, 1)));
        assert!(!a.contains(Ipv4Addr::new(10, 1, 0, 1)));
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
        assert!(Cidr::ANY.contains(Ipv4Addr::new(203, 0, 113, 9)));
        assert_eq!(b.addresses().count(), 256);
    }

    #[test]
    fn protocols_and_ports() {
        assert_eq!("-1".parse::<Protocol>(), Ok(Protocol::All));
        assert_eq!("TCP".parse::<Protocol>(), Ok(Protocol::TCP));
        assert_eq!("47".parse::<Protocol>(), Ok(Protocol::Number(47)));
        assert!("tpc".parse::<Protocol>().is_err());
        assert!("256".parse::<Protocol>().is_err());

        assert!(PortMatch::from_aws(Protocol::TCP, 90, 80).is_err());
        assert!(PortMatch::from_aws(Protocol::TCP, 0, 65536).is_err());
        assert!(PortMatch::from_aws(Protocol::TCP, -5, 80).is_err());
        let p = PortMatch::from_aws(Protocol::TCP, 80, 90).unwrap();
        assert!(p.matches(80) && p.matches(90) && !p.matches(91) && !p.matches(79));
        let echo = PortMatch::from_aws(Protocol::ICMP, 8, -1).unwrap();
        assert!(echo.matches(8 << 8) && echo.matches((8 << 8) | 3) && !echo.matches(0));
        assert!(PortMatch::from_aws(Protocol::ICMP, 300, -1).is_err());
        assert_eq!(
            PortMatch::from_aws(Protocol::Number(47), 5, 1).unwrap(),
            PortMatch::Any
        );
    }

    #[test]
    fn acl_first_match_wins_and_default_denies() {
        let e = |number, cidr: &str, allow| AclEntry {
            number,
            protocol: Protocol::TCP,
            ports: PortMatch::Ports { lo: 22, hi: 22 },
            cidr: cidr.parse().unwrap(),
            allow,
        };
        let acl = CompiledAcl::new(&[e(200, "0.0.0.0/0", true), e(100, "10.0.9.0/24", false)]);
        let probe = |ip: [u8; 4], port| Probe {
            protocol: protocol::TCP,
            l4: port,
            peer_ip: Ipv4Addr::from(ip),
        };
        assert!(
            !acl.allows(&probe([10, 0, 9, 5], 22)),
            "rule 100 denies first"
        );
        assert!(acl.allows(&probe([10, 0, 8, 5], 22)), "rule 200 allows");
        assert!(!acl.allows(&probe([10, 0, 8, 5], 23)), "no match denies");
    }
}

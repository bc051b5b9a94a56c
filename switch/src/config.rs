//! The immutable configuration snapshot the control plane publishes.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::{PortId, MAX_PORTS};

/// MAC the switch answers with for every subnet router (.1) address.
/// Locally administered, like AWS's gateway MAC is fixed per VPC.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0xe1, 0x1a, 0x00, 0x00, 0x01];

/// Smallest and largest subnet prefix length AWS allows.
const PREFIX_RANGE: std::ops::RangeInclusive<u8> = 16..=28;

/// Errors found when a snapshot is assembled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// A port refers to a subnet index that the snapshot does not hold.
    #[error("port {0} refers to unknown subnet {1}")]
    UnknownSubnet(PortId, usize),
    /// Two ports claim the same address in one VPC.
    #[error("address {1} is claimed twice in VPC {0}")]
    DuplicateAddress(String, Ipv4Addr),
    /// A port id is at or above MAX_PORTS.
    #[error("port id {0} is out of range")]
    PortOutOfRange(PortId),
    /// Two ports carry the same id.
    #[error("port id {0} is used twice")]
    DuplicatePort(PortId),
    /// A subnet's prefix is outside 16..=28 or its address has host bits set.
    #[error("subnet {0} has an invalid CIDR block")]
    InvalidSubnet(String),
    /// A port address lies outside its subnet or on one of the five
    /// addresses AWS reserves (network, router, DNS, future use, broadcast).
    #[error("port {0} cannot use address {1}: it is outside its subnet or reserved")]
    UnusableAddress(PortId, Ipv4Addr),
}

/// One subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetConfig {
    pub id: String,
    pub vpc_id: String,
    /// Network address (host bits zero) and prefix length (16..=28).
    pub cidr: (Ipv4Addr, u8),
    /// DNS server handed out by DHCP (the .2 address in AWS).
    pub dns: Option<Ipv4Addr>,
}

impl SubnetConfig {
    /// Network mask of the CIDR block.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    fn mask_bits(&self) -> u32 {
        match self.cidr.1 {
            0 => 0,
            p if p >= 32 => u32::MAX,
            p => u32::MAX << (32 - u32::from(p)),
        }
    }

    fn network_bits(&self) -> u32 {
        u32::from(self.cidr.0) & self.mask_bits()
    }

    /// The router address: the network address plus one.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network_bits().wrapping_add(1))
    }

    /// The DNS server handed out by DHCP: `dns` if set, else network + 2.
    pub fn dns_server(&self) -> Ipv4Addr {
        self.dns
            .unwrap_or_else(|| Ipv4Addr::from(self.network_bits().wrapping_add(2)))
    }

    /// The directed broadcast address (all host bits set).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network_bits() | !self.mask_bits())
    }

    /// Whether `ip` lies inside the CIDR block.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == self.network_bits()
    }

    /// Whether a port may hold `ip`: inside the block and not one of the
    /// network, .1, .2, .3 or broadcast addresses.
    pub fn is_assignable(&self, ip: Ipv4Addr) -> bool {
        let host = u32::from(ip) & !self.mask_bits();
        self.contains(ip) && host > 3 && ip != self.broadcast()
    }

    fn is_valid(&self) -> bool {
        PREFIX_RANGE.contains(&self.cidr.1) && u32::from(self.cidr.0) == self.network_bits()
    }
}

/// One port (an ENI attached to a running device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    pub id: PortId,
    pub eni_id: String,
    pub mac: [u8; 6],
    /// Index into `Snapshot::subnets`.
    pub subnet: usize,
    pub primary_ip: Ipv4Addr,
    pub secondary_ips: Vec<Ipv4Addr>,
    pub mtu: u16,
}

impl PortConfig {
    /// The primary address followed by the secondary ones.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        std::iter::once(self.primary_ip).chain(self.secondary_ips.iter().copied())
    }
}

/// Everything the datapath needs, built once and never mutated.
///
/// Build it with [`Snapshot::build`]; the derived indexes (`by_addr`, `vpcs`
/// and the per-subnet VPC index) are only consistent when built that way.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub subnets: Vec<SubnetConfig>,
    /// Indexed by `PortId`; `None` for unused ids.
    pub ports: Vec<Option<PortConfig>>,
    /// (VPC index, address) -> owning port. Built by `Snapshot::build`.
    pub by_addr: HashMap<(u32, Ipv4Addr), PortId>,
    /// VPC id -> dense VPC index used in `by_addr`.
    pub vpcs: HashMap<String, u32>,
    /// Subnet index -> dense VPC index, so the packet path never hashes a
    /// string.
    subnet_vpc: Vec<u32>,
}

impl Snapshot {
    /// Assemble and validate a snapshot.
    ///
    /// VPC indexes are dense and given in order of first appearance in
    /// `subnets`. Overlapping CIDR blocks are allowed in different VPCs.
    pub fn build(
        generation: u64,
        subnets: Vec<SubnetConfig>,
        ports: Vec<PortConfig>,
    ) -> Result<Snapshot, SnapshotError> {
        let mut vpcs: HashMap<String, u32> = HashMap::new();
        let mut subnet_vpc = Vec::with_capacity(subnets.len());
        for subnet in &subnets {
            if !subnet.is_valid() {
                return Err(SnapshotError::InvalidSubnet(subnet.id.clone()));
            }
            let next = u32::try_from(vpcs.len()).unwrap_or(u32::MAX);
            let idx = *vpcs.entry(subnet.vpc_id.clone()).or_insert(next);
            subnet_vpc.push(idx);
        }

        let len = ports
            .iter()
            .map(|p| p.id as usize + 1)
            .max()
            .unwrap_or(0)
            .min(MAX_PORTS);
        let mut slots: Vec<Option<PortConfig>> = vec![None; len];
        let mut by_addr = HashMap::new();
        for port in ports {
            let id = port.id;
            if id as usize >= MAX_PORTS {
                return Err(SnapshotError::PortOutOfRange(id));
            }
            let subnet = subnets
                .get(port.subnet)
                .ok_or(SnapshotError::UnknownSubnet(id, port.subnet))?;
            let vpc = subnet_vpc[port.subnet];
            for ip in port.addresses() {
                if !subnet.is_assignable(ip) {
                    return Err(SnapshotError::UnusableAddress(id, ip));
                }
                if by_addr.insert((vpc, ip), id).is_some() {
                    return Err(SnapshotError::DuplicateAddress(subnet.vpc_id.clone(), ip));
                }
            }
            let slot = &mut slots[id as usize];
            if slot.is_some() {
                return Err(SnapshotError::DuplicatePort(id));
            }
            *slot = Some(port);
        }

        Ok(Snapshot {
            generation,
            subnets,
            ports: slots,
            by_addr,
            vpcs,
            subnet_vpc,
        })
    }

    /// The port with this id, if it is in the snapshot.
    pub fn port(&self, id: PortId) -> Option<&PortConfig> {
        self.ports.get(id as usize).and_then(Option::as_ref)
    }

    /// The subnet at this index.
    pub fn subnet(&self, idx: usize) -> Option<&SubnetConfig> {
        self.subnets.get(idx)
    }

    /// The port that owns `ip` (primary or secondary) in VPC index `vpc`.
    pub fn lookup(&self, vpc: u32, ip: Ipv4Addr) -> Option<PortId> {
        self.by_addr.get(&(vpc, ip)).copied()
    }

    /// Dense VPC index of the subnet at `idx`.
    pub fn vpc_of_subnet(&self, idx: usize) -> Option<u32> {
        self.subnet_vpc.get(idx).copied()
    }

    /// Dense VPC index of the port's subnet.
    pub fn vpc_of_port(&self, id: PortId) -> Option<u32> {
        self.port(id).and_then(|p| self.vpc_of_subnet(p.subnet))
    }

    /// Dense VPC index of a VPC id.
    pub fn vpc_index(&self, vpc_id: &str) -> Option<u32> {
        self.vpcs.get(vpc_id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(id: &str, vpc: &str, net: [u8; 4], prefix: u8) -> SubnetConfig {
        SubnetConfig {
            id: id.into(),
            vpc_id: vpc.into(),
            cidr: (Ipv4Addr::from(net), prefix),
            dns: None,
        }
    }

    fn port(id: PortId, subnet: usize, ip: [u8; 4], secondary: &[[u8; 4]]) -> PortConfig {
        PortConfig {
            id,
            eni_id: format!("eni-{id:08x}"),
            mac: [0x02, 0, 0, 0, 0, id as u8],
            subnet,
            primary_ip: Ipv4Addr::from(ip),
            secondary_ips: secondary.iter().map(|a| Ipv4Addr::from(*a)).collect(),
            mtu: 1500,
        }
    }

    #[test]
    fn subnet_addresses() {
        // (desc, network, prefix, gateway, dns, broadcast, netmask)
        type Row = (
            &'static str,
            [u8; 4],
            u8,
            [u8; 4],
            [u8; 4],
            [u8; 4],
            [u8; 4],
        );
        let rows: &[Row] = &[
            (
                "/24",
                [10, 0, 1, 0],
                24,
                [10, 0, 1, 1],
                [10, 0, 1, 2],
                [10, 0, 1, 255],
                [255, 255, 255, 0],
            ),
            (
                "/16",
                [172, 31, 0, 0],
                16,
                [172, 31, 0, 1],
                [172, 31, 0, 2],
                [172, 31, 255, 255],
                [255, 255, 0, 0],
            ),
            (
                "/28",
                [10, 9, 8, 16],
                28,
                [10, 9, 8, 17],
                [10, 9, 8, 18],
                [10, 9, 8, 31],
                [255, 255, 255, 240],
            ),
        ];
        for (desc, net, prefix, gw, dns, bc, mask) in rows {
            let s = subnet("s", "v", *net, *prefix);
            assert_eq!(s.gateway(), Ipv4Addr::from(*gw), "{desc}");
            assert_eq!(s.dns_server(), Ipv4Addr::from(*dns), "{desc}");
            assert_eq!(s.broadcast(), Ipv4Addr::from(*bc), "{desc}");
            assert_eq!(s.netmask(), Ipv4Addr::from(*mask), "{desc}");
            assert!(s.contains(Ipv4Addr::from(*bc)), "{desc}");
            assert!(!s.is_assignable(Ipv4Addr::from(*gw)), "{desc}");
            assert!(!s.is_assignable(Ipv4Addr::from(*bc)), "{desc}");
        }
        let s = subnet("s", "v", [10, 0, 1, 0], 24);
        assert!(s.contains(Ipv4Addr::new(10, 0, 1, 77)));
        assert!(!s.contains(Ipv4Addr::new(10, 0, 2, 77)));
        assert!(s.is_assignable(Ipv4Addr::new(10, 0, 1, 4)));
        assert!(!s.is_assignable(Ipv4Addr::new(10, 0, 1, 3)));
        let mut with_dns = s.clone();
        with_dns.dns = Some(Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(with_dns.dns_server(), Ipv4Addr::new(10, 0, 0, 2));
    }

    #[test]
    fn build_indexes_ports_and_addresses() {
        let snap = Snapshot::build(
            7,
            vec![
                subnet("a1", "vpc-a", [10, 0, 1, 0], 24),
                subnet("b1", "vpc-b", [10, 0, 1, 0], 24),
                subnet("a2", "vpc-a", [10, 0, 2, 0], 24),
            ],
            vec![
                port(5, 0, [10, 0, 1, 10], &[[10, 0, 1, 11]]),
                port(2, 1, [10, 0, 1, 10], &[]),
                port(9, 2, [10, 0, 2, 10], &[]),
            ],
        )
        .expect("valid snapshot");
        assert_eq!(snap.generation, 7);
        assert_eq!(snap.ports.len(), 10);
        assert_eq!(snap.port(5).map(|p| p.id), Some(5));
        assert!(snap.port(3).is_none());
        assert!(snap.port(10_000).is_none());
        let a = snap.vpc_index("vpc-a").expect("vpc-a");
        let b = snap.vpc_index("vpc-b").expect("vpc-b");
        assert_ne!(a, b);
        assert_eq!(snap.vpc_of_port(5), Some(a));
        assert_eq!(snap.vpc_of_port(9), Some(a));
        assert_eq!(snap.vpc_of_port(2), Some(b));
        assert_eq!(snap.vpc_of_port(3), None);
        assert_eq!(snap.lookup(a, Ipv4Addr::new(10, 0, 1, 10)), Some(5));
        assert_eq!(snap.lookup(a, Ipv4Addr::new(10, 0, 1, 11)), Some(5));
        assert_eq!(snap.lookup(b, Ipv4Addr::new(10, 0, 1, 10)), Some(2));
        assert_eq!(snap.lookup(b, Ipv4Addr::new(10, 0, 1, 11)), None);
        assert_eq!(snap.lookup(a, Ipv4Addr::new(10, 0, 2, 10)), Some(9));
        assert_eq!(snap.subnet(2).map(|s| s.id.as_str()), Some("a2"));
        assert!(snap.subnet(3).is_none());
    }

    #[test]
    fn build_rejects() {
        let subnets = || {
            vec![
                subnet("a1", "vpc-a", [10, 0, 1, 0], 24),
                subnet("a2", "vpc-a", [10, 0, 2, 0], 24),
            ]
        };
        type Row = (
            &'static str,
            Vec<SubnetConfig>,
            Vec<PortConfig>,
            SnapshotError,
        );
        let rows: Vec<Row> = vec![
            (
                "unknown subnet",
                subnets(),
                vec![port(1, 2, [10, 0, 1, 10], &[])],
                SnapshotError::UnknownSubnet(1, 2),
            ),
            (
                "duplicate primary",
                subnets(),
                vec![
                    port(1, 0, [10, 0, 1, 10], &[]),
                    port(2, 0, [10, 0, 1, 10], &[]),
                ],
                SnapshotError::DuplicateAddress("vpc-a".into(), Ipv4Addr::new(10, 0, 1, 10)),
            ),
            (
                "secondary duplicates another port's primary",
                subnets(),
                vec![
                    port(1, 0, [10, 0, 1, 10], &[]),
                    port(2, 0, [10, 0, 1, 20], &[[10, 0, 1, 10]]),
                ],
                SnapshotError::DuplicateAddress("vpc-a".into(), Ipv4Addr::new(10, 0, 1, 10)),
            ),
            (
                "port id out of range",
                subnets(),
                vec![port(MAX_PORTS as PortId, 0, [10, 0, 1, 10], &[])],
                SnapshotError::PortOutOfRange(MAX_PORTS as PortId),
            ),
            (
                "duplicate port id",
                subnets(),
                vec![
                    port(1, 0, [10, 0, 1, 10], &[]),
                    port(1, 1, [10, 0, 2, 10], &[]),
                ],
                SnapshotError::DuplicatePort(1),
            ),
            (
                "address outside subnet",
                subnets(),
                vec![port(1, 0, [10, 0, 2, 10], &[])],
                SnapshotError::UnusableAddress(1, Ipv4Addr::new(10, 0, 2, 10)),
            ),
            (
                "router address",
                subnets(),
                vec![port(1, 0, [10, 0, 1, 1], &[])],
                SnapshotError::UnusableAddress(1, Ipv4Addr::new(10, 0, 1, 1)),
            ),
            (
                "prefix too long",
                vec![subnet("x", "vpc-a", [10, 0, 1, 0], 30)],
                vec![],
                SnapshotError::InvalidSubnet("x".into()),
            ),
            (
                "host bits set",
                vec![subnet("x", "vpc-a", [10, 0, 1, 5], 24)],
                vec![],
                SnapshotError::InvalidSubnet("x".into()),
            ),
        ];
        for (desc, subnets, ports, want) in rows {
            assert_eq!(
                Snapshot::build(1, subnets, ports).unwrap_err(),
                want,
                "{desc}"
            );
        }
    }
}

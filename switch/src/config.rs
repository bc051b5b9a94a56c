//! The immutable configuration snapshot the control plane publishes.
//!
//! The control plane describes the VPC as a [`Topology`] (AWS ids, strings,
//! lists) and compiles it once with [`Snapshot::compile`]; the packet path
//! only reads the compiled, index-addressed form.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::limits::{CardConfig, CardLimits, CardMeters, MeterClock, PortLimits};
use crate::policy::{
    Cidr, CompiledAcl, CompiledPeer, CompiledRule, ElasticIp, FlowLogConfig, FlowLogScope,
    NetworkAclConfig, Peer, RouteTableConfig, RouteTarget, SecurityGroupConfig,
};
use crate::{PortId, MAX_PORTS};

/// MAC the switch answers with for every subnet router (.1) address.
/// Locally administered, like AWS's gateway MAC is fixed per VPC.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0xe1, 0x1a, 0x00, 0x00, 0x01];

/// Smallest and largest subnet prefix length AWS allows.
const PREFIX_RANGE: std::ops::RangeInclusive<u8> = 16..=28;

/// Most security groups one ENI may have, as in AWS.
pub const MAX_GROUPS_PER_ENI: usize = 5;

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
    /// A reference to a resource the topology does not hold.
    #[error("{0} {1} is not in the topology")]
    Unknown(&'static str, String),
    /// A resource referenced from another VPC.
    #[error("{0} {1} belongs to another VPC")]
    WrongVpc(&'static str, String),
    /// More than five security groups on one port.
    #[error("port {0} has more than {MAX_GROUPS_PER_ENI} security groups")]
    TooManyGroups(PortId),
    /// A delegated prefix longer than /32 or shorter than /24 (the switch
    /// indexes every address of a prefix).
    #[error("port {0} has an unusable delegated prefix {1}")]
    BadPrefix(PortId, Cidr),
    /// Two Elastic IPs with the same public address, or one private address
    /// with two public ones.
    #[error("Elastic IP {0} is mapped twice")]
    DuplicateElasticIp(Ipv4Addr),
    /// The uplink port id collides with an ENI port, or is out of range.
    #[error("uplink port {0} is out of range or used by an ENI")]
    BadUplink(PortId),
    /// The metadata port id collides with an ENI port or the uplink, or is
    /// out of range.
    #[error("metadata port {0} is out of range or used by an ENI or the uplink")]
    BadMetadata(PortId),
    /// Two card aggregates for one (instance, network card).
    #[error("network card {1} of {0} is stated twice")]
    DuplicateCard(String, u32),
}

/// One VPC.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VpcConfig {
    pub id: String,
    /// The local route covers these blocks. If empty, each subnet's block is
    /// local.
    pub cidrs: Vec<Cidr>,
    /// The attached internet gateway's id, if any.
    pub internet_gateway: Option<String>,
    /// Route table of subnets without an explicit association.
    pub main_route_table: Option<String>,
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
    /// Associated route table; `None` uses the VPC's main table (or the
    /// local routes alone).
    pub route_table: Option<String>,
    /// Associated network ACL; `None` allows everything (AWS's default ACL).
    pub network_acl: Option<String>,
}

impl Default for SubnetConfig {
    fn default() -> Self {
        SubnetConfig {
            id: String::new(),
            vpc_id: String::new(),
            cidr: (Ipv4Addr::UNSPECIFIED, 0),
            dns: None,
            route_table: None,
            network_acl: None,
        }
    }
}

impl SubnetConfig {
    /// Network mask of the CIDR block.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    fn mask_bits(&self) -> u32 {
        crate::policy::mask(self.cidr.1)
    }

    fn network_bits(&self) -> u32 {
        u32::from(self.cidr.0) & self.mask_bits()
    }

    /// The CIDR block.
    pub fn block(&self) -> Cidr {
        Cidr::new(self.cidr.0, self.cidr.1.min(32)).unwrap_or(Cidr::ANY)
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

/// One port (an ENI attached to a running device, or a service port such
/// as a NAT gateway's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    pub id: PortId,
    pub eni_id: String,
    pub mac: [u8; 6],
    /// Index into `Snapshot::subnets`.
    pub subnet: usize,
    pub primary_ip: Ipv4Addr,
    pub secondary_ips: Vec<Ipv4Addr>,
    /// Delegated prefixes (/28 in AWS); every address in them is the port's.
    pub prefixes: Vec<Cidr>,
    pub mtu: u16,
    /// Security group ids, at most five. Empty means unfiltered: a service
    /// port, or a lab without an API.
    pub security_groups: Vec<String>,
    /// Source/destination check (AWS's default is on).
    pub source_dest_check: bool,
    /// The service this port implements (a `nat-` id for a NAT gateway), so
    /// routes can target it.
    pub service: Option<String>,
    /// EC2-style allowances (default: unlimited).
    pub limits: PortLimits,
    /// The (instance, network card) aggregate whose allowances this ENI
    /// shares with the instance's other ENIs on that card: an entry of
    /// [`Topology::cards`]. `None`: no aggregate.
    pub card: Option<(String, u32)>,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            id: 0,
            eni_id: String::new(),
            mac: [0; 6],
            subnet: 0,
            primary_ip: Ipv4Addr::UNSPECIFIED,
            secondary_ips: Vec::new(),
            prefixes: Vec::new(),
            mtu: 1500,
            security_groups: Vec::new(),
            source_dest_check: true,
            service: None,
            limits: PortLimits::default(),
            card: None,
        }
    }
}

impl PortConfig {
    /// The primary address followed by the secondary ones.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        std::iter::once(self.primary_ip).chain(self.secondary_ips.iter().copied())
    }
}

/// The host's link to the "internet" namespace, shared by every internet
/// gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UplinkConfig {
    pub port: PortId,
    /// The MAC the switch uses on the uplink (it answers ARP for Elastic
    /// IPs with it).
    pub mac: [u8; 6],
    /// The MAC of the namespace's interface: every internet-bound frame goes
    /// to it.
    pub peer_mac: [u8; 6],
}

/// The port behind which the instance metadata server runs (a TAP into its
/// namespace). Guests reach it at [`IMDS_ADDR`](crate::IMDS_ADDR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataConfig {
    pub port: PortId,
    /// The MAC of the namespace's interface: every frame toward the server
    /// goes to it.
    pub peer_mac: [u8; 6],
}

/// Everything the control plane states, by AWS id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    pub generation: u64,
    pub vpcs: Vec<VpcConfig>,
    pub subnets: Vec<SubnetConfig>,
    pub ports: Vec<PortConfig>,
    pub route_tables: Vec<RouteTableConfig>,
    pub security_groups: Vec<SecurityGroupConfig>,
    pub network_acls: Vec<NetworkAclConfig>,
    pub elastic_ips: Vec<ElasticIp>,
    pub flow_logs: Vec<FlowLogConfig>,
    pub uplink: Option<UplinkConfig>,
    pub metadata: Option<MetadataConfig>,
    /// Load-balancer targets whose replies go back through the balancer.
    pub service_returns: Vec<ServiceReturn>,
    /// Per (instance, network card) aggregate allowances.
    pub cards: Vec<CardConfig>,
}

/// A load balancer preserves the client's address, so its target answers
/// the client directly. Such replies (from `ip`:`port` over `protocol`,
/// leaving the ENI that owns `ip`) go to the balancer's port `service`
/// instead of being routed; the balancer passes through any it has no flow
/// for, so direct traffic to the target still works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceReturn {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// IP protocol number (6 or 17).
    pub protocol: u8,
    pub service: PortId,
}

/// FxHash: the packet path hashes small keys from a table the control plane
/// filled, so a cryptographic hash buys nothing there.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// A compiled route-table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hop {
    /// Deliver to the owner of the destination address.
    Local,
    /// Deliver to this port (an ENI target or a service port).
    Port(PortId),
    /// To the internet gateway (the VPC has one attached).
    Internet,
    Blackhole,
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledRoute {
    pub cidr: Cidr,
    pub hop: Hop,
}

/// A flow log as workers see it; the `Arc` address identifies it.
#[derive(Debug)]
pub(crate) struct FlowLogSpec {
    pub config: FlowLogConfig,
}

/// Per-subnet compiled state.
#[derive(Debug, Clone, Default)]
pub(crate) struct SubnetInfo {
    /// Longest prefix first.
    pub routes: Vec<CompiledRoute>,
    /// (ingress, egress); `None` allows all.
    pub acl: Option<Arc<(CompiledAcl, CompiledAcl)>>,
}

/// Per-port compiled state.
#[derive(Debug, Clone, Default)]
pub(crate) struct PortInfo {
    /// Dense indexes of the port's groups, sorted.
    pub groups: Vec<u32>,
    /// The union of the groups' rules.
    pub ingress: Vec<CompiledRule>,
    pub egress: Vec<CompiledRule>,
    /// Security groups apply (the port has at least one).
    pub filtered: bool,
    pub source_dest_check: bool,
    pub flow_logs: Vec<Arc<FlowLogSpec>>,
    pub eni: Arc<str>,
    pub limits: PortLimits,
    /// Index into `Snapshot::cards`.
    pub card: Option<usize>,
    /// The port or its card has an allowance: only then are the meters
    /// charged (one flag test per frame and side when there is none).
    pub metered: bool,
}

/// A compiled card aggregate.
#[derive(Debug)]
pub(crate) struct CardInfo {
    pub instance: String,
    pub card: u32,
    pub limits: CardLimits,
    pub ports: Vec<PortId>,
    /// Replaced at publish by the previous snapshot's meters for the same
    /// card, so they persist across configuration changes.
    pub meters: Arc<CardMeters>,
}

/// Per-VPC compiled state.
#[derive(Debug, Clone, Default)]
pub(crate) struct VpcInfo {
    pub has_igw: bool,
}

/// Everything the datapath needs, built once and never mutated.
///
/// Build it with [`Snapshot::compile`] (or [`Snapshot::build`] for a VPC
/// without policy); the derived indexes are only consistent when built that
/// way.
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
    pub uplink: Option<UplinkConfig>,
    pub metadata: Option<MetadataConfig>,
    /// The topology this was compiled from.
    pub topology: Topology,
    /// Subnet index -> dense VPC index, so the packet path never hashes a
    /// string.
    subnet_vpc: Vec<u32>,
    pub(crate) addr: FxMap<(u32, Ipv4Addr), PortId>,
    pub(crate) subnet_info: Vec<SubnetInfo>,
    pub(crate) port_info: Vec<PortInfo>,
    pub(crate) vpc_info: Vec<VpcInfo>,
    /// public -> (VPC, private)
    pub(crate) eip_public: FxMap<Ipv4Addr, (u32, Ipv4Addr)>,
    /// (VPC, private) -> public
    pub(crate) eip_private: FxMap<(u32, Ipv4Addr), Ipv4Addr>,
    pub(crate) has_flow_logs: bool,
    /// Some port has security groups (connection tracking is in use).
    pub(crate) any_filtered: bool,
    /// (target's ENI port, L4 source port, protocol) -> balancer port.
    pub(crate) returns: FxMap<(PortId, u16, u8), PortId>,
    /// Card aggregates, in `Topology::cards` order.
    pub(crate) cards: Vec<CardInfo>,
    /// Set by `Switch::publish`, unique per published snapshot (0 for
    /// the empty one a switch starts with): the flow cache's validity.
    pub(crate) epoch: u64,
}

impl Snapshot {
    /// Assemble and validate a snapshot of subnets and ports with no policy:
    /// local routes only, no security groups, allow-all ACLs.
    ///
    /// VPC indexes are dense and given in order of first appearance in
    /// `subnets`. Overlapping CIDR blocks are allowed in different VPCs.
    pub fn build(
        generation: u64,
        subnets: Vec<SubnetConfig>,
        ports: Vec<PortConfig>,
    ) -> Result<Snapshot, SnapshotError> {
        Snapshot::compile(Topology {
            generation,
            subnets,
            ports,
            ..Topology::default()
        })
    }

    /// Validate and compile a whole topology.
    pub fn compile(topo: Topology) -> Result<Snapshot, SnapshotError> {
        let subnets = &topo.subnets;
        let mut vpcs: HashMap<String, u32> = HashMap::new();
        for v in &topo.vpcs {
            let next = u32::try_from(vpcs.len()).unwrap_or(u32::MAX);
            vpcs.entry(v.id.clone()).or_insert(next);
        }
        let mut subnet_vpc = Vec::with_capacity(subnets.len());
        for subnet in subnets {
            if !subnet.is_valid() {
                return Err(SnapshotError::InvalidSubnet(subnet.id.clone()));
            }
            let next = u32::try_from(vpcs.len()).unwrap_or(u32::MAX);
            let idx = *vpcs.entry(subnet.vpc_id.clone()).or_insert(next);
            subnet_vpc.push(idx);
        }
        let vpc_cfg = |id: &str| topo.vpcs.iter().find(|v| v.id == id);

        // Ports and addresses.
        let len = topo
            .ports
            .iter()
            .map(|p| p.id as usize + 1)
            .max()
            .unwrap_or(0)
            .min(MAX_PORTS);
        let mut slots: Vec<Option<PortConfig>> = vec![None; len];
        let mut addr: FxMap<(u32, Ipv4Addr), PortId> = FxMap::default();
        for port in &topo.ports {
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
                if addr.insert((vpc, ip), id).is_some() {
                    return Err(SnapshotError::DuplicateAddress(subnet.vpc_id.clone(), ip));
                }
            }
            for prefix in &port.prefixes {
                if prefix.prefix_len() < 24 {
                    return Err(SnapshotError::BadPrefix(id, *prefix));
                }
                for ip in prefix.addresses() {
                    if !subnet.is_assignable(ip) {
                        return Err(SnapshotError::UnusableAddress(id, ip));
                    }
                    if addr.insert((vpc, ip), id).is_some() {
                        return Err(SnapshotError::DuplicateAddress(subnet.vpc_id.clone(), ip));
                    }
                }
            }
            if port.security_groups.len() > MAX_GROUPS_PER_ENI {
                return Err(SnapshotError::TooManyGroups(id));
            }
            let slot = &mut slots[id as usize];
            if slot.is_some() {
                return Err(SnapshotError::DuplicatePort(id));
            }
            *slot = Some(port.clone());
        }
        if let Some(up) = &topo.uplink {
            if up.port as usize >= MAX_PORTS
                || slots.get(up.port as usize).is_some_and(Option::is_some)
            {
                return Err(SnapshotError::BadUplink(up.port));
            }
        }
        if let Some(md) = &topo.metadata {
            if md.port as usize >= MAX_PORTS
                || slots.get(md.port as usize).is_some_and(Option::is_some)
                || topo.uplink.is_some_and(|u| u.port == md.port)
            {
                return Err(SnapshotError::BadMetadata(md.port));
            }
        }
        let by_eni = |eni: &str| topo.ports.iter().find(|p| p.eni_id == eni);

        // Security groups: dense indexes, then compiled rules.
        let sg_index: HashMap<&str, u32> = topo
            .security_groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.id.as_str(), i as u32))
            .collect();
        let compile_rules =
            |rules: &[crate::policy::SgRule]| -> Result<Vec<CompiledRule>, SnapshotError> {
                rules
                    .iter()
                    .map(|r| {
                        let peer = match &r.peer {
                            Peer::Cidr(c) => CompiledPeer::Cidr(*c),
                            Peer::Group(g) => {
                                CompiledPeer::Group(*sg_index.get(g.as_str()).ok_or_else(|| {
                                    SnapshotError::Unknown("security group", g.clone())
                                })?)
                            }
                        };
                        Ok(CompiledRule {
                            protocol: r.protocol,
                            ports: r.ports,
                            peer,
                        })
                    })
                    .collect()
            };
        let mut sg_rules = Vec::with_capacity(topo.security_groups.len());
        for g in &topo.security_groups {
            sg_rules.push((compile_rules(&g.ingress)?, compile_rules(&g.egress)?));
        }

        // Network ACLs.
        type Acls<'t> = HashMap<&'t str, (&'t NetworkAclConfig, Arc<(CompiledAcl, CompiledAcl)>)>;
        let acls: Acls<'_> = topo
            .network_acls
            .iter()
            .map(|a| {
                (
                    a.id.as_str(),
                    (
                        a,
                        Arc::new((CompiledAcl::new(&a.ingress), CompiledAcl::new(&a.egress))),
                    ),
                )
            })
            .collect();

        // Flow logs, resolved to the ports they cover.
        let flow_specs: Vec<Arc<FlowLogSpec>> = topo
            .flow_logs
            .iter()
            .map(|f| Arc::new(FlowLogSpec { config: f.clone() }))
            .collect();

        let vpc_count = vpcs.len();
        let mut vpc_info = vec![VpcInfo::default(); vpc_count];
        for (id, &idx) in &vpcs {
            if let Some(v) = vpc_cfg(id) {
                vpc_info[idx as usize].has_igw = v.internet_gateway.is_some();
            }
        }

        // Subnets: routes and ACLs.
        let mut subnet_info = Vec::with_capacity(subnets.len());
        for (i, s) in subnets.iter().enumerate() {
            let vpc = subnet_vpc[i];
            let vcfg = vpc_cfg(&s.vpc_id);
            let mut routes: Vec<CompiledRoute> = Vec::new();
            match vcfg.filter(|v| !v.cidrs.is_empty()) {
                Some(v) => routes.extend(v.cidrs.iter().map(|c| CompiledRoute {
                    cidr: *c,
                    hop: Hop::Local,
                })),
                None => {
                    for (j, other) in subnets.iter().enumerate() {
                        if subnet_vpc[j] == vpc {
                            routes.push(CompiledRoute {
                                cidr: other.block(),
                                hop: Hop::Local,
                            });
                        }
                    }
                }
            }
            let table_id = s
                .route_table
                .clone()
                .or_else(|| vcfg.and_then(|v| v.main_route_table.clone()));
            if let Some(tid) = table_id {
                let table = topo
                    .route_tables
                    .iter()
                    .find(|t| t.id == tid)
                    .ok_or_else(|| SnapshotError::Unknown("route table", tid.clone()))?;
                if table.vpc_id != s.vpc_id {
                    return Err(SnapshotError::WrongVpc("route table", tid));
                }
                for r in &table.routes {
                    let hop = match &r.target {
                        RouteTarget::Local => Hop::Local,
                        RouteTarget::Blackhole => Hop::Blackhole,
                        RouteTarget::InternetGateway(g) => {
                            let attached = vcfg.and_then(|v| v.internet_gateway.as_deref())
                                == Some(g.as_str());
                            if attached && topo.uplink.is_some() {
                                Hop::Internet
                            } else {
                                Hop::Blackhole
                            }
                        }
                        RouteTarget::Eni(e) => match by_eni(e) {
                            Some(p) if subnet_vpc.get(p.subnet) == Some(&vpc) => Hop::Port(p.id),
                            // Not attached anywhere: AWS shows the route as
                            // blackhole.
                            _ => Hop::Blackhole,
                        },
                        RouteTarget::NatGateway(n) => {
                            match topo
                                .ports
                                .iter()
                                .find(|p| p.service.as_deref() == Some(n.as_str()))
                            {
                                Some(p) if subnet_vpc.get(p.subnet) == Some(&vpc) => {
                                    Hop::Port(p.id)
                                }
                                _ => Hop::Blackhole,
                            }
                        }
                    };
                    // The VPC's own CIDR keeps its local route. A route for
                    // exactly a subnet's block (or anything more specific)
                    // wins over the implied local route, as AWS's middlebox
                    // routing allows.
                    if vcfg.is_some_and(|v| v.cidrs.contains(&r.destination)) {
                        continue;
                    }
                    routes.retain(|x| !(x.cidr == r.destination && x.hop == Hop::Local));
                    routes.insert(
                        0,
                        CompiledRoute {
                            cidr: r.destination,
                            hop,
                        },
                    );
                }
            }
            routes.sort_by_key(|r| std::cmp::Reverse(r.cidr.prefix_len()));
            let acl = match &s.network_acl {
                None => None,
                Some(id) => {
                    let (cfg, compiled) = acls
                        .get(id.as_str())
                        .ok_or_else(|| SnapshotError::Unknown("network ACL", id.clone()))?;
                    if cfg.vpc_id != s.vpc_id {
                        return Err(SnapshotError::WrongVpc("network ACL", id.clone()));
                    }
                    Some(compiled.clone())
                }
            };
            subnet_info.push(SubnetInfo { routes, acl });
        }

        // Card aggregates.
        let mut cards: Vec<CardInfo> = Vec::with_capacity(topo.cards.len());
        let mut card_index: HashMap<(&str, u32), usize> = HashMap::new();
        for c in &topo.cards {
            if card_index
                .insert((c.instance.as_str(), c.card), cards.len())
                .is_some()
            {
                return Err(SnapshotError::DuplicateCard(c.instance.clone(), c.card));
            }
            cards.push(CardInfo {
                instance: c.instance.clone(),
                card: c.card,
                limits: c.limits,
                ports: Vec::new(),
                meters: Arc::default(),
            });
        }

        // Ports: groups, rules, flow logs.
        let mut port_info = vec![PortInfo::default(); slots.len()];
        for port in &topo.ports {
            let card = match &port.card {
                Some((inst, n)) => {
                    let i = *card_index.get(&(inst.as_str(), *n)).ok_or_else(|| {
                        SnapshotError::Unknown("network card", format!("{inst}/{n}"))
                    })?;
                    cards[i].ports.push(port.id);
                    Some(i)
                }
                None => None,
            };
            let vpc_id = &subnets[port.subnet].vpc_id;
            let mut groups = Vec::with_capacity(port.security_groups.len());
            let mut ingress = Vec::new();
            let mut egress = Vec::new();
            for g in &port.security_groups {
                let idx = *sg_index
                    .get(g.as_str())
                    .ok_or_else(|| SnapshotError::Unknown("security group", g.clone()))?;
                if &topo.security_groups[idx as usize].vpc_id != vpc_id {
                    return Err(SnapshotError::WrongVpc("security group", g.clone()));
                }
                if !groups.contains(&idx) {
                    groups.push(idx);
                    ingress.extend(sg_rules[idx as usize].0.iter().cloned());
                    egress.extend(sg_rules[idx as usize].1.iter().cloned());
                }
            }
            groups.sort_unstable();
            let subnet = &subnets[port.subnet];
            let flow_logs = flow_specs
                .iter()
                .filter(|f| match &f.config.scope {
                    FlowLogScope::Eni(e) => *e == port.eni_id,
                    FlowLogScope::Subnet(s) => *s == subnet.id,
                    FlowLogScope::Vpc(v) => v == vpc_id,
                })
                .cloned()
                .collect();
            port_info[port.id as usize] = PortInfo {
                filtered: !groups.is_empty(),
                groups,
                ingress,
                egress,
                source_dest_check: port.source_dest_check && port.service.is_none(),
                flow_logs,
                eni: Arc::from(port.eni_id.as_str()),
                limits: port.limits,
                metered: !port.limits.is_unlimited()
                    || card.is_some_and(|i| !cards[i].limits.is_unlimited()),
                card,
            };
        }

        // Elastic IPs.
        let mut eip_public = FxMap::default();
        let mut eip_private = FxMap::default();
        for e in &topo.elastic_ips {
            let vpc = *vpcs
                .get(&e.vpc_id)
                .ok_or_else(|| SnapshotError::Unknown("VPC", e.vpc_id.clone()))?;
            if eip_public
                .insert(e.public_ip, (vpc, e.private_ip))
                .is_some()
                || eip_private
                    .insert((vpc, e.private_ip), e.public_ip)
                    .is_some()
            {
                return Err(SnapshotError::DuplicateElasticIp(e.public_ip));
            }
        }

        let mut returns = FxMap::default();
        for r in &topo.service_returns {
            let svc = slots
                .get(r.service as usize)
                .and_then(Option::as_ref)
                .ok_or_else(|| SnapshotError::Unknown("service port", r.service.to_string()))?;
            let vpc = subnet_vpc.get(svc.subnet).copied().unwrap_or(u32::MAX);
            // A target that is not (yet) an address in the balancer's VPC
            // has no ENI to intercept: nothing to do until it has.
            if let Some(&owner) = addr.get(&(vpc, r.ip)) {
                if owner != r.service {
                    returns.insert((owner, r.port, r.protocol), r.service);
                }
            }
        }

        let by_addr = addr.iter().map(|(k, v)| (*k, *v)).collect();
        let has_flow_logs = !flow_specs.is_empty();
        let any_filtered = port_info.iter().any(|p| p.filtered);
        Ok(Snapshot {
            generation: topo.generation,
            subnets: topo.subnets.clone(),
            ports: slots,
            by_addr,
            vpcs,
            uplink: topo.uplink,
            metadata: topo.metadata,
            subnet_vpc,
            addr,
            subnet_info,
            port_info,
            vpc_info,
            eip_public,
            eip_private,
            has_flow_logs,
            any_filtered,
            returns,
            cards,
            epoch: 0,
            topology: topo,
        })
    }

    /// Charge a frame of port `info` against its card aggregate, if it has
    /// one: `out` for frames the guest sends. False when over (counted on
    /// the card).
    #[inline]
    pub(crate) fn card_allows(
        &self,
        info: &PortInfo,
        out: bool,
        packets: u64,
        bytes: usize,
        clock: &MeterClock,
    ) -> bool {
        match info.card.and_then(|i| self.cards.get(i)) {
            Some(c) => c.meters.allow(&c.limits, out, packets, bytes, clock),
            None => true,
        }
    }

    /// Take over `old`'s card meters and counters for every card both
    /// hold, so a new configuration neither refills a card's allowance nor
    /// restarts its counters.
    pub(crate) fn adopt_card_meters(&mut self, old: &Snapshot) {
        if self.cards.is_empty() || old.cards.is_empty() {
            return;
        }
        let by_key: HashMap<(&str, u32), &Arc<CardMeters>> = old
            .cards
            .iter()
            .map(|c| ((c.instance.as_str(), c.card), &c.meters))
            .collect();
        for c in &mut self.cards {
            if let Some(m) = by_key.get(&(c.instance.as_str(), c.card)) {
                c.meters = Arc::clone(m);
            }
        }
    }

    /// Every card aggregate with its counters.
    pub fn card_stats(&self) -> Vec<crate::limits::CardStats> {
        self.cards
            .iter()
            .map(|c| {
                let [pps, out, inb] = c.meters.exceeded();
                crate::limits::CardStats {
                    instance: c.instance.clone(),
                    card: c.card,
                    limits: c.limits,
                    ports: c.ports.clone(),
                    pps_allowance_exceeded: pps,
                    bw_out_allowance_exceeded: out,
                    bw_in_allowance_exceeded: inb,
                }
            })
            .collect()
    }

    /// The port with this id, if it is in the snapshot.
    pub fn port(&self, id: PortId) -> Option<&PortConfig> {
        self.ports.get(id as usize).and_then(Option::as_ref)
    }

    /// The subnet at this index.
    pub fn subnet(&self, idx: usize) -> Option<&SubnetConfig> {
        self.subnets.get(idx)
    }

    /// The port that owns `ip` (primary, secondary or delegated prefix) in
    /// VPC index `vpc`.
    #[inline]
    pub fn lookup(&self, vpc: u32, ip: Ipv4Addr) -> Option<PortId> {
        self.addr.get(&(vpc, ip)).copied()
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

    /// Whether any flow log is configured.
    pub fn has_flow_logs(&self) -> bool {
        self.has_flow_logs
    }

    pub(crate) fn info(&self, id: PortId) -> Option<&PortInfo> {
        self.port_info.get(id as usize)
    }

    /// Longest-prefix match in a subnet's route table.
    #[inline]
    pub(crate) fn route(&self, subnet: usize, dst: Ipv4Addr) -> Hop {
        self.subnet_info
            .get(subnet)
            .and_then(|s| s.routes.iter().find(|r| r.cidr.contains(dst)))
            .map_or(Hop::Blackhole, |r| r.hop)
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
            ..Default::default()
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
            ..Default::default()
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

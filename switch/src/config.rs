//! The immutable configuration snapshot the control plane publishes.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::PortId;

/// MAC the switch answers with for every subnet router (.1) address.
/// Locally administered, like AWS's gateway MAC is fixed per VPC.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0xe1, 0x1a, 0x00, 0x00, 0x01];

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

/// Everything the datapath needs, built once and never mutated.
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
}

//! Counters: lock-free per node, read in one place by [`crate::Hyperplane::stats`].

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Too short, bad header length, not Ethernet/IPv4 as expected.
    Malformed,
    /// Not IPv4 (ARP, IPv6, ...).
    NotIpv4,
    /// A protocol the service does not handle (or an ICMP type other than echo).
    Unsupported,
    /// A non-first IPv4 fragment (no ports to look up).
    Fragment,
    /// The frame came in on a port no service is configured on.
    UnknownPort,
    /// Return traffic with no flow.
    NoFlow,
    /// No NAT port free for the destination (AWS ErrorPortAllocation).
    PortAllocation,
    /// The node's flow table is at its limit.
    FlowTableFull,
    /// No listener on the VIP port, or no target to pick.
    NoListener,
    /// No live node owns the shard.
    NoNode,
    /// The frame was steered to a node that is not the shard's owner.
    NotOwner,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::Malformed,
        DropReason::NotIpv4,
        DropReason::Unsupported,
        DropReason::Fragment,
        DropReason::UnknownPort,
        DropReason::NoFlow,
        DropReason::PortAllocation,
        DropReason::FlowTableFull,
        DropReason::NoListener,
        DropReason::NoNode,
        DropReason::NotOwner,
    ];
    pub const COUNT: usize = Self::ALL.len();

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::Unsupported => "unsupported",
            DropReason::Fragment => "fragment",
            DropReason::UnknownPort => "unknown_port",
            DropReason::NoFlow => "no_flow",
            DropReason::PortAllocation => "port_allocation",
            DropReason::FlowTableFull => "flow_table_full",
            DropReason::NoListener => "no_listener",
            DropReason::NoNode => "no_node",
            DropReason::NotOwner => "not_owner",
        }
    }
}

/// One node's counters, as read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub node: usize,
    pub live: bool,
    /// Flows in the table (own and replicated).
    pub flows: u64,
    /// Flows this node is primary for.
    pub primary_flows: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub flows_created: u64,
    pub flows_expired: u64,
    /// Replication records applied from the inbox.
    pub replicated_in: u64,
    /// Replication records sent to this node.
    pub replication_sent: u64,
    /// Records sent to this node but not applied yet.
    pub replication_lag: u64,
    /// Records that could not be queued (inbox full) and were dropped.
    pub replication_dropped: u64,
    /// Age of the oldest record this node applied in the last second or so (ms).
    pub replication_age_ms: u64,
    /// Records pushed again after a change of owners.
    pub resynced_out: u64,
    pub rst_sent: u64,
    pub port_allocation_failures: u64,
    /// Bytes held by this node's flow table (entries, index, free list).
    pub table_memory_bytes: u64,
    pub drops: Vec<(DropReason, u64)>,
}

/// Health of one registered target, as DescribeTargetHealth shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HealthState {
    Initial,
    Healthy,
    Unhealthy,
    Draining,
    Unused,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetHealth {
    pub load_balancer: String,
    pub target_group: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub state: HealthState,
    /// AWS-style reason code, e.g. `Target.FailedHealthChecks`; empty when healthy.
    pub reason: String,
}

/// The whole cluster's counters.
#[derive(Clone, Debug, Default)]
pub struct HyperplaneStats {
    pub nodes: Vec<NodeStats>,
    /// Frames `steer` refused (no live owner, unknown port, unparsable).
    pub steer_drops: u64,
    pub port_allocation_failures: u64,
    pub health_state_changes: u64,
    pub table_memory_bytes: u64,
    pub flows: u64,
}

/// Lock-free counters a node writes and anyone reads.
#[derive(Default)]
pub(crate) struct NodeCounters {
    pub flows: AtomicU64,
    pub primary_flows: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub flows_created: AtomicU64,
    pub flows_expired: AtomicU64,
    pub replicated_in: AtomicU64,
    pub replication_sent: AtomicU64,
    pub replication_dropped: AtomicU64,
    pub replication_age_ms: AtomicU64,
    pub resynced_out: AtomicU64,
    pub rst_sent: AtomicU64,
    pub port_allocation_failures: AtomicU64,
    pub table_memory_bytes: AtomicU64,
    pub drops: [AtomicU64; DropReason::COUNT],
}

impl NodeCounters {
    pub fn read(&self, node: usize, live: bool) -> NodeStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let sent = g(&self.replication_sent);
        let applied = g(&self.replicated_in);
        let dropped = g(&self.replication_dropped);
        NodeStats {
            node,
            live,
            flows: g(&self.flows),
            primary_flows: g(&self.primary_flows),
            frames_in: g(&self.frames_in),
            frames_out: g(&self.frames_out),
            flows_created: g(&self.flows_created),
            flows_expired: g(&self.flows_expired),
            replicated_in: applied,
            replication_sent: sent,
            replication_lag: sent.saturating_sub(applied).saturating_sub(dropped),
            replication_dropped: dropped,
            replication_age_ms: g(&self.replication_age_ms),
            resynced_out: g(&self.resynced_out),
            rst_sent: g(&self.rst_sent),
            port_allocation_failures: g(&self.port_allocation_failures),
            table_memory_bytes: g(&self.table_memory_bytes),
            drops: DropReason::ALL
                .iter()
                .map(|r| (*r, g(&self.drops[*r as usize])))
                .collect(),
        }
    }
}

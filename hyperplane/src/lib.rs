//! enilab-hyperplane: the NAT gateway and network load balancer tier, after
//! AWS Hyperplane (REFERENCE §5).
//!
//! A [`Hyperplane`] is a cluster of nodes. Each [`Node`] is owned by one
//! worker thread and holds only its own flow table; flows are hashed to
//! shards, each shard has a primary and a secondary node chosen by
//! rendezvous hashing over the live nodes, and primaries replicate flow
//! records to secondaries by message. [`Hyperplane::steer`] tells the caller
//! which node a frame belongs to; both directions of a flow steer to the
//! same node. Configuration arrives as whole [`Config`] snapshots.
//!
//! Like the switch, this crate knows nothing of virtqueues, the API, the
//! database or tokio. Design note: `docs/hyperplane.md`.

pub mod bench;
mod cluster;
mod compile;
mod config;
mod flow;
mod health;
mod maglev;
mod nat;
mod nlb;
mod node;
mod stats;
mod wire;

use std::time::Duration;

pub use cluster::{Hyperplane, HyperplaneError};
pub use config::{
    Config, HealthCheckConfig, ListenerConfig, LoadBalancerConfig, NatGatewayConfig, TargetConfig,
    TargetGroupConfig, L4,
};
pub use maglev::{disruption, Maglev, MaglevError};
pub use node::Node;
pub use stats::{DropReason, HealthState, HyperplaneStats, NodeStats, TargetHealth};

/// The Maglev lookup-table size used unless [`Options::maglev_table_size`] says otherwise (prime).
pub const MAGLEV_TABLE_SIZE: usize = 65537;

/// Where frames the hyperplane produces go: `port` is the service's switch
/// port, `frame` an Ethernet frame from the service MAC to the gateway MAC.
pub trait Sink {
    fn emit(&mut self, port: u32, frame: &[u8]);
}

/// A sink that keeps every emitted frame; handy in tests and tools.
impl Sink for Vec<(u32, Vec<u8>)> {
    fn emit(&mut self, port: u32, frame: &[u8]) {
        self.push((port, frame.to_vec()));
    }
}

/// Cluster sizing and timers.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of nodes (worker threads), 1..=64.
    pub nodes: usize,
    /// Number of flow shards, a power of two in 2..=1024. A NAT port belongs
    /// to shard `port % shards`, so each shard owns `64512 / shards` ports per
    /// destination and NAT IP; 64 keeps 55,000 connections to one destination
    /// within every shard's share.
    pub shards: u16,
    /// Hard limit of flows (own and replicated) in one node's table.
    pub flows_per_node: usize,
    /// Capacity of each node's replication inbox (records).
    pub replication_inbox: usize,
    /// Maglev table size; must be prime.
    pub maglev_table_size: usize,
    /// NAT TCP idle timeout (AWS: 350 s).
    pub nat_tcp_idle: Duration,
    /// NAT UDP idle timeout.
    pub nat_udp_idle: Duration,
    /// NAT ICMP echo idle timeout.
    pub nat_icmp_idle: Duration,
    /// NLB TCP idle timeout (AWS: 350 s).
    pub nlb_tcp_idle: Duration,
    /// NLB UDP idle timeout (AWS: 120 s).
    pub nlb_udp_idle: Duration,
    /// Lifetime of a TCP flow after a FIN in both directions or a RST.
    pub tcp_closing: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 2,
            shards: 64,
            flows_per_node: 1 << 20,
            replication_inbox: 1 << 16,
            maglev_table_size: MAGLEV_TABLE_SIZE,
            nat_tcp_idle: Duration::from_secs(350),
            nat_udp_idle: Duration::from_secs(120),
            nat_icmp_idle: Duration::from_secs(60),
            nlb_tcp_idle: Duration::from_secs(350),
            nlb_udp_idle: Duration::from_secs(120),
            tcp_closing: Duration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_size_is_prime() {
        let m = super::MAGLEV_TABLE_SIZE;
        assert!((2..).take_while(|d| d * d <= m).all(|d| m % d != 0));
    }
}
#[cfg(test)]
#[path = "tests/mod.rs"]
mod fixture_tests;

#[cfg(test)]
mod thread_safety {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_cross_threads() {
        send::<crate::Node>();
        send_sync::<crate::Hyperplane>();
        send_sync::<std::sync::Arc<crate::Hyperplane>>();
    }
}

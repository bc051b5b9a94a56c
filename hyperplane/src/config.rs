//! The configuration snapshot the control plane publishes, and its validation.

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

/// Transport protocol of a listener or target group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4 {
    Tcp,
    Udp,
}

/// The whole hyperplane configuration; each publish replaces the previous one.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub nat_gateways: Vec<NatGatewayConfig>,
    pub load_balancers: Vec<LoadBalancerConfig>,
}

/// One NAT gateway, seen by the switch as a port.
#[derive(Clone, Debug)]
pub struct NatGatewayConfig {
    pub id: String,
    /// The switch port frames for this gateway arrive on and are emitted to.
    pub port: u32,
    pub mac: [u8; 6],
    pub gateway_mac: [u8; 6],
    /// Primary and secondary private IPs; each adds a port space per destination.
    pub addresses: Vec<Ipv4Addr>,
}

/// One network load balancer, seen by the switch as a port.
#[derive(Clone, Debug)]
pub struct LoadBalancerConfig {
    /// ARN or id.
    pub id: String,
    pub port: u32,
    pub mac: [u8; 6],
    pub gateway_mac: [u8; 6],
    /// The virtual IPs the listeners answer on.
    pub addresses: Vec<Ipv4Addr>,
    pub listeners: Vec<ListenerConfig>,
}

#[derive(Clone, Debug)]
pub struct ListenerConfig {
    pub protocol: L4,
    pub port: u16,
    pub target_group: TargetGroupConfig,
}

#[derive(Clone, Debug)]
pub struct TargetGroupConfig {
    pub id: String,
    pub protocol: L4,
    pub targets: Vec<TargetConfig>,
    pub health_check: HealthCheckConfig,
    /// Pick the target from the client IP alone, so one client sticks to one target.
    pub source_ip_stickiness: bool,
    /// How long a deregistered target keeps its existing flows.
    pub deregistration_delay: Duration,
}

#[derive(Clone, Debug)]
pub struct TargetConfig {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Set when the target was deregistered; it drains until the delay passes.
    pub draining_since: Option<SystemTime>,
}

/// Active TCP health check of a target group (AWS NLB defaults).
#[derive(Clone, Debug)]
pub struct HealthCheckConfig {
    pub enabled: bool,
    /// Probe this port instead of the target's traffic port.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u8,
    pub unhealthy_threshold: u8,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            enabled: true,
            port: None,
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            healthy_threshold: 3,
            unhealthy_threshold: 3,
        }
    }
}

//! Validation and compilation of a [`Config`] snapshot into the form the
//! packet path reads: services by switch port, listeners, and a Maglev table
//! per target group over its eligible targets (built here, never per packet).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::{Config, HealthCheckConfig, L4};
use crate::maglev::{mix64, Maglev, MaglevError};
use crate::stats::HealthState;
use crate::wire::{PROTO_TCP, PROTO_UDP};

/// First source port of the health-check range. A listener may use a port
/// in it: probes then skip that port, and traffic to it is a listener's.
pub const HC_BASE: u16 = 64512;
pub const HC_PORTS: u16 = 1024;
/// NAT ports (and ICMP ids) are taken from here to 65535.
pub const NAT_PORT_MIN: u16 = 1024;
/// AWS allows up to 8 IPs per NAT gateway.
pub const MAX_NAT_ADDRESSES: usize = 8;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("service {0}: switch port {1} is used by another service")]
    DuplicatePort(String, u32),
    #[error("NAT gateway {0} has more than 8 addresses")]
    NatAddresses(String),
    #[error("load balancer {0} has no address")]
    NoVip(String),
    #[error("load balancer {0}: two listeners on {1:?} port {2}")]
    DuplicateListener(String, L4, u16),
    #[error("load balancer {0}: listener {1:?} uses a {2:?} target group")]
    ProtocolMismatch(String, L4, L4),
    #[error("target group {0}: health check thresholds must be 1-10 and the interval and timeout non-zero")]
    HealthCheck(String),
    #[error("target group {0}: {1}")]
    Maglev(String, MaglevError),
    #[error("address {0} is used by two services")]
    DuplicateAddress(Ipv4Addr),
}

/// A target's identity in the health table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TargetId {
    pub lb_port: u32,
    pub tg: String,
    pub ip: u32,
    pub port: u16,
}

/// Health-check verdict kept by the cluster (Draining and Unused come from the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthRec {
    pub state: HealthState,
    pub ok_streak: u8,
    pub fail_streak: u8,
    pub reason: &'static str,
}

impl Default for HealthRec {
    fn default() -> Self {
        HealthRec {
            state: HealthState::Initial,
            ok_streak: 0,
            fail_streak: 0,
            reason: "Elb.RegistrationInProgress",
        }
    }
}

#[derive(Debug)]
pub struct Target {
    pub ip: u32,
    pub port: u16,
    pub hc_port: u16,
    pub state: HealthState,
    pub reason: &'static str,
    /// Whether new flows may pick it (healthy, or every target failing open).
    pub eligible: bool,
    pub draining_since: Option<SystemTime>,
}

#[derive(Debug)]
pub struct TargetGroup {
    pub id: String,
    pub targets: Vec<Target>,
    pub hc: HealthCheckConfig,
    pub sticky: bool,
    pub dereg_delay: Duration,
    /// Shared with the previous snapshot when the eligible targets did not change.
    pub maglev: Arc<Maglev>,
    /// Maglev keys of `backends`, to recognise an unchanged table.
    pub keys: Vec<u64>,
    /// Maglev backend index → index in `targets`.
    pub backends: Vec<u16>,
}

#[derive(Debug)]
pub struct Listener {
    pub proto: u8,
    pub port: u16,
    pub tg: TargetGroup,
}

#[derive(Debug)]
pub enum Kind {
    Nat,
    Nlb(Vec<Listener>),
}

#[derive(Debug)]
pub struct Service {
    pub id: String,
    pub port: u32,
    pub mac: [u8; 6],
    pub gw_mac: [u8; 6],
    /// NAT addresses or VIPs.
    pub addrs: Vec<u32>,
    pub kind: Kind,
}

impl Service {
    #[inline]
    pub fn owns(&self, ip: u32) -> bool {
        self.addrs.contains(&ip)
    }

    /// True when a frame to this load balancer answers a health probe.
    #[inline]
    pub fn is_probe_reply(&self, p: &crate::wire::Parsed) -> bool {
        p.proto == PROTO_TCP
            && p.dport >= HC_BASE
            && self.owns(p.dst)
            && self.listener(PROTO_TCP, p.dport).is_none()
    }

    #[inline]
    pub fn listener(&self, proto: u8, port: u16) -> Option<&Listener> {
        match &self.kind {
            Kind::Nlb(ls) => ls.iter().find(|l| l.proto == proto && l.port == port),
            Kind::Nat => None,
        }
    }
}

/// The compiled snapshot. `gen` grows with every publish and health change.
#[derive(Debug, Default)]
pub struct Compiled {
    pub gen: u64,
    /// Sorted by switch port.
    pub services: Vec<Service>,
}

impl Compiled {
    #[inline]
    pub fn service(&self, port: u32) -> Option<&Service> {
        self.services
            .binary_search_by_key(&port, |s| s.port)
            .ok()
            .map(|i| &self.services[i])
    }
}

fn proto(l: L4) -> u8 {
    match l {
        L4::Tcp => PROTO_TCP,
        L4::Udp => PROTO_UDP,
    }
}

pub fn target_key(ip: u32, port: u16) -> u64 {
    mix64((u64::from(ip) << 16) | u64::from(port))
}

/// The previous snapshot's table for this target group, if built from the same keys.
fn reuse(
    prev: Option<&Compiled>,
    lb_port: u32,
    tg: &str,
    keys: &[u64],
    size: usize,
) -> Option<Arc<Maglev>> {
    let Kind::Nlb(ls) = &prev?.service(lb_port)?.kind else {
        return None;
    };
    ls.iter()
        .map(|l| &l.tg)
        .find(|t| {
            t.id == tg
                && t.keys == keys
                && t.maglev.size() == if keys.is_empty() { 0 } else { size }
        })
        .map(|t| Arc::clone(&t.maglev))
}

/// Validates and compiles `cfg`, taking health verdicts from `health`.
/// Maglev tables whose eligible targets did not change are taken from `prev`.
pub fn compile(
    cfg: &Config,
    health: &HashMap<TargetId, HealthRec>,
    now: SystemTime,
    maglev_size: usize,
    gen: u64,
    prev: Option<&Compiled>,
) -> Result<Compiled, CompileError> {
    let mut ports = HashSet::new();
    let mut addrs = HashSet::new();
    let mut services = Vec::new();
    for n in &cfg.nat_gateways {
        if !ports.insert(n.port) {
            return Err(CompileError::DuplicatePort(n.id.clone(), n.port));
        }
        // No address yet (e.g. still pending) is allowed: its flows fail port allocation.
        if n.addresses.len() > MAX_NAT_ADDRESSES {
            return Err(CompileError::NatAddresses(n.id.clone()));
        }
        for a in &n.addresses {
            if !addrs.insert((n.port, *a)) {
                return Err(CompileError::DuplicateAddress(*a));
            }
        }
        services.push(Service {
            id: n.id.clone(),
            port: n.port,
            mac: n.mac,
            gw_mac: n.gateway_mac,
            addrs: n.addresses.iter().map(|a| u32::from(*a)).collect(),
            kind: Kind::Nat,
        });
    }
    for lb in &cfg.load_balancers {
        if !ports.insert(lb.port) {
            return Err(CompileError::DuplicatePort(lb.id.clone(), lb.port));
        }
        if lb.addresses.is_empty() {
            return Err(CompileError::NoVip(lb.id.clone()));
        }
        let mut seen = HashSet::new();
        let mut listeners = Vec::new();
        for l in &lb.listeners {
            if !seen.insert((l.protocol, l.port)) {
                return Err(CompileError::DuplicateListener(
                    lb.id.clone(),
                    l.protocol,
                    l.port,
                ));
            }
            let tg = &l.target_group;
            if tg.protocol != l.protocol {
                return Err(CompileError::ProtocolMismatch(
                    lb.id.clone(),
                    l.protocol,
                    tg.protocol,
                ));
            }
            let hc = &tg.health_check;
            if !(1..=10).contains(&hc.healthy_threshold)
                || !(1..=10).contains(&hc.unhealthy_threshold)
                || hc.interval.is_zero()
                || hc.timeout.is_zero()
            {
                return Err(CompileError::HealthCheck(tg.id.clone()));
            }
            let mut targets = Vec::new();
            let mut tseen = HashSet::new();
            for t in &tg.targets {
                let ip = u32::from(t.ip);
                if !tseen.insert((ip, t.port)) {
                    continue;
                }
                let (state, reason) = match t.draining_since {
                    Some(since)
                        if now.duration_since(since).unwrap_or_default()
                            < tg.deregistration_delay =>
                    {
                        (HealthState::Draining, "Target.DeregistrationInProgress")
                    }
                    Some(_) => (HealthState::Unused, "Target.NotRegistered"),
                    None if !hc.enabled => (HealthState::Healthy, ""),
                    None => {
                        let id = TargetId {
                            lb_port: lb.port,
                            tg: tg.id.clone(),
                            ip,
                            port: t.port,
                        };
                        let r = health.get(&id).copied().unwrap_or_default();
                        (r.state, r.reason)
                    }
                };
                targets.push(Target {
                    ip,
                    port: t.port,
                    hc_port: hc.port.unwrap_or(t.port),
                    state,
                    reason,
                    eligible: false,
                    draining_since: t.draining_since,
                });
            }
            let healthy = targets.iter().any(|t| t.state == HealthState::Healthy);
            for t in targets.iter_mut() {
                // Fail open: with no healthy target, every registered one takes new flows.
                t.eligible = match t.state {
                    HealthState::Healthy => true,
                    HealthState::Initial | HealthState::Unhealthy => !healthy,
                    HealthState::Draining | HealthState::Unused => false,
                };
            }
            let backends: Vec<u16> = (0..targets.len())
                .filter(|&i| targets[i].eligible)
                .map(|i| i as u16)
                .collect();
            let keys: Vec<u64> = backends
                .iter()
                .map(|&i| target_key(targets[usize::from(i)].ip, targets[usize::from(i)].port))
                .collect();
            let maglev = match reuse(prev, lb.port, &tg.id, &keys, maglev_size) {
                Some(m) => m,
                None => Arc::new(
                    Maglev::build(&keys, maglev_size)
                        .map_err(|e| CompileError::Maglev(tg.id.clone(), e))?,
                ),
            };
            listeners.push(Listener {
                proto: proto(l.protocol),
                port: l.port,
                tg: TargetGroup {
                    id: tg.id.clone(),
                    targets,
                    hc: hc.clone(),
                    sticky: tg.source_ip_stickiness,
                    dereg_delay: tg.deregistration_delay,
                    maglev,
                    keys,
                    backends,
                },
            });
        }
        services.push(Service {
            id: lb.id.clone(),
            port: lb.port,
            mac: lb.mac,
            gw_mac: lb.gateway_mac,
            addrs: lb.addresses.iter().map(|a| u32::from(*a)).collect(),
            kind: Kind::Nlb(listeners),
        });
    }
    services.sort_by_key(|s| s.port);
    Ok(Compiled { gen, services })
}

//! The hyperplane tier in the daemon: NAT gateways and network load
//! balancers served by `enilab_hyperplane` nodes.
//!
//! Each node is one OS thread that owns its `Node` state and one lane of
//! the backend's service ports (`enilab_backend::ServiceLanes`). The
//! hyperplane's own steering picks the lane for every frame the switch
//! sends to a NAT gateway's or load balancer's interface, so both
//! directions of a flow reach the node that holds it; what the node emits
//! enters the switch as if that interface had sent it. Stopping a node
//! stops its thread and takes it out of the hyperplane's membership: its
//! flows continue on their secondaries.
//!
//! The interfaces are requester-managed ENIs in the store. They get switch
//! ports from the top of the port space ([`SERVICE_PORT_BASE`] up), so they
//! never collide with instance ENIs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use enilab_backend::{Datapath, Emitter, ServiceLanes, Steer};
use enilab_hyperplane::{Hyperplane, Options, Sink};
use enilab_switch::{PortId, MAX_PORTS};

/// Service interfaces are numbered from here to `MAX_PORTS`.
pub const SERVICE_PORT_BASE: PortId = 3584;

/// How long a node's thread sleeps with nothing to do: the resolution of
/// its timers (health checks, idle expiry, replication).
const TICK: Duration = Duration::from_millis(10);
/// Frames a node takes per pass before looking at its timers.
const BURST: usize = 256;

/// Errors of the hyperplane tier.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("hyperplane: {0}")]
    Hyperplane(String),
    #[error("backend: {0}")]
    Backend(#[from] enilab_backend::ServiceError),
    #[error("node {0} does not exist")]
    NoNode(usize),
    #[error("cannot start the thread of node {0}")]
    Spawn(usize, #[source] std::io::Error),
    #[error("no free service port")]
    PortsExhausted,
}

struct SteerBy(Arc<Hyperplane>);

impl Steer for SteerBy {
    fn steer(&self, port: PortId, frame: &[u8]) -> Option<usize> {
        self.0.steer(port, frame)
    }
}

struct EmitSink<'a, 'b>(&'a mut Emitter<'b>);

impl Sink for EmitSink<'_, '_> {
    fn emit(&mut self, port: u32, frame: &[u8]) {
        self.0.send(port, frame);
    }
}

struct NodeThread {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

struct Inner {
    nodes: Vec<Option<NodeThread>>,
    /// Service ENI id -> its switch port.
    ports: BTreeMap<String, PortId>,
}

/// The running tier.
pub struct Tier {
    hp: Arc<Hyperplane>,
    lanes: Arc<ServiceLanes>,
    inner: Mutex<Inner>,
}

impl Tier {
    /// Start `nodes` hyperplane nodes on `datapath`.
    pub fn start(datapath: &Datapath, nodes: usize) -> Result<Tier, TierError> {
        let hp = Hyperplane::new(Options {
            nodes,
            // A lab's worth: 256 Ki flows a node (the tables are
            // preallocated; the library's default sizes for a million).
            flows_per_node: 1 << 18,
            ..Options::default()
        })
        .map_err(|e| TierError::Hyperplane(e.to_string()))?;
        let lanes = datapath.service_lanes(nodes, Arc::new(SteerBy(hp.clone())))?;
        let tier = Tier {
            hp,
            lanes,
            inner: Mutex::new(Inner {
                nodes: (0..nodes).map(|_| None).collect(),
                ports: BTreeMap::new(),
            }),
        };
        for i in 0..nodes {
            tier.start_node(i)?;
        }
        Ok(tier)
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn hyperplane(&self) -> &Arc<Hyperplane> {
        &self.hp
    }

    pub fn nodes(&self) -> usize {
        self.lanes.lanes()
    }

    /// Which nodes have a running thread.
    pub fn running(&self) -> Vec<bool> {
        self.inner().nodes.iter().map(Option::is_some).collect()
    }

    /// Start node `i` (again): a fresh thread with fresh state; the
    /// hyperplane re-replicates flows to it as it rejoins.
    pub fn start_node(&self, i: usize) -> Result<(), TierError> {
        let mut g = self.inner();
        let slot = g.nodes.get_mut(i).ok_or(TierError::NoNode(i))?;
        if slot.is_some() {
            return Ok(());
        }
        let mut worker = self.lanes.worker(i)?;
        // Whatever queued while the node was down is stale: the
        // hyperplane does not buffer, TCP retransmits.
        worker.discard();
        let mut node = self
            .hp
            .node(i)
            .map_err(|e| TierError::Hyperplane(e.to_string()))?;
        self.hp.start_node(i);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("hyperplane-{i}"))
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    worker.wait(TICK);
                    let now = Instant::now();
                    // In batches: the node prefetches its flow table
                    // across a batch's frames.
                    while worker.poll_batch(BURST, &mut |frames, em| {
                        node.process_batch(frames, now, &mut EmitSink(em))
                    }) == BURST
                    {}
                    worker.emit(&mut |em| node.tick(Instant::now(), &mut EmitSink(em)));
                    worker.housekeeping();
                }
            })
            .map_err(|e| TierError::Spawn(i, e))?;
        *slot = Some(NodeThread { stop, thread });
        Ok(())
    }

    /// Stop node `i` as a failure would: its thread ends and its flows
    /// move to their secondaries.
    pub fn stop_node(&self, i: usize) -> Result<(), TierError> {
        let t = {
            let mut g = self.inner();
            let slot = g.nodes.get_mut(i).ok_or(TierError::NoNode(i))?;
            slot.take()
        };
        self.hp.stop_node(i);
        if let Some(t) = t {
            t.stop.store(true, Ordering::Release);
            self.lanes.wake(i);
            let _ = t.thread.join();
        }
        Ok(())
    }

    /// Give every service ENI in `enis` a switch port (keeping the ones it
    /// has) and serve it; release the ports of ENIs no longer listed.
    /// Returns ENI id -> port.
    pub fn sync_ports<'a>(
        &self,
        enis: impl IntoIterator<Item = &'a str>,
    ) -> Result<BTreeMap<String, PortId>, TierError> {
        let mut g = self.inner();
        let want: Vec<&str> = enis.into_iter().collect();
        let gone: Vec<(String, PortId)> = g
            .ports
            .iter()
            .filter(|(e, _)| !want.contains(&e.as_str()))
            .map(|(e, p)| (e.clone(), *p))
            .collect();
        for (e, p) in gone {
            self.lanes.remove_port(p);
            g.ports.remove(&e);
        }
        for e in want {
            if g.ports.contains_key(e) {
                continue;
            }
            let used: Vec<PortId> = g.ports.values().copied().collect();
            let port = (SERVICE_PORT_BASE..MAX_PORTS as PortId)
                .find(|p| !used.contains(p))
                .ok_or(TierError::PortsExhausted)?;
            self.lanes.add_port(port)?;
            g.ports.insert(e.to_string(), port);
        }
        Ok(g.ports.clone())
    }

    /// The tier for `enilab status`.
    pub fn status(&self) -> serde_json::Value {
        use serde_json::json;
        let stats = self.hp.stats();
        let running = self.running();
        let nodes: Vec<_> = stats
            .nodes
            .iter()
            .map(|n| {
                let lane = self.lanes.stats(n.node);
                json!({
                    "node": n.node,
                    "running": running.get(n.node).copied().unwrap_or(false),
                    "live": n.live,
                    "flows": n.flows,
                    "own_flows": n.primary_flows,
                    "frames_in": n.frames_in,
                    "frames_out": n.frames_out,
                    "replication_lag": n.replication_lag,
                    "port_allocation_failures": n.port_allocation_failures,
                    "table_bytes": n.table_memory_bytes,
                    "lane_received": lane.received,
                    "lane_sent": lane.sent,
                    "lane_send_dropped": lane.send_dropped,
                    "drops": n.drops.iter().filter(|(_, c)| *c > 0)
                        .map(|(r, c)| (r.name().to_string(), json!(c)))
                        .collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        json!({
            "interfaces": self.inner().ports.clone(),
            "nodes": nodes,
        })
    }

    /// Stop every node and stop serving the interfaces.
    pub fn shutdown(&self) {
        for i in 0..self.nodes() {
            let _ = self.stop_node(i);
        }
        let ports: Vec<PortId> = self.inner().ports.values().copied().collect();
        for p in ports {
            self.lanes.remove_port(p);
        }
    }
}

impl Drop for Tier {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the state asks of the hyperplane, in the datapath's terms.
#[derive(Debug, Default)]
pub struct Translation {
    pub config: enilab_hyperplane::Config,
    /// Service ENI id -> the service it implements (`nat-…` or the load
    /// balancer's id), for `PortConfig::service`.
    pub services: BTreeMap<String, String>,
    pub returns: Vec<enilab_switch::ServiceReturn>,
}

/// The service ENIs the state holds: NAT gateways' and load balancers'
/// interfaces, whatever their ports.
pub fn service_enis(state: &crate::store::State) -> Vec<String> {
    use crate::store::model::{LoadBalancer, NatGateway};
    let mut v: Vec<String> = state
        .iter::<NatGateway>()
        .filter(|n| !n.state.gone())
        .map(|n| n.eni_id.clone())
        .collect();
    for lb in state.iter::<LoadBalancer>() {
        v.extend(lb.nodes.iter().map(|n| n.eni_id.clone()));
    }
    v.retain(|e| state.get::<crate::store::model::Eni>(e).is_some());
    v
}

/// Translate NAT gateways and load balancers into a hyperplane snapshot,
/// given the switch ports their interfaces have.
pub fn translate(state: &crate::store::State, ports: &BTreeMap<String, PortId>) -> Translation {
    use crate::store::model::{Eni, Instance, Listener, LoadBalancer, NatGateway, TargetGroup};
    use enilab_hyperplane::{
        HealthCheckConfig, ListenerConfig, LoadBalancerConfig, NatGatewayConfig, TargetConfig,
        TargetGroupConfig, L4,
    };
    use std::net::Ipv4Addr;

    let mut t = Translation::default();
    let eni_of = |id: &str| -> Option<(PortId, [u8; 6], &Eni)> {
        let port = *ports.get(id)?;
        let eni = state.get::<Eni>(id)?;
        Some((port, crate::netns::parse_mac(&eni.mac)?, eni))
    };
    for n in state.iter::<NatGateway>() {
        if n.state.gone() {
            continue;
        }
        let Some((port, mac, _)) = eni_of(&n.eni_id) else {
            continue;
        };
        let mut addrs: Vec<&crate::store::model::NatAddress> = n.addresses.iter().collect();
        addrs.sort_by_key(|a| !a.is_primary);
        t.config.nat_gateways.push(NatGatewayConfig {
            id: n.id.clone(),
            port,
            mac,
            gateway_mac: enilab_switch::GATEWAY_MAC,
            addresses: addrs
                .iter()
                .filter_map(|a| a.private_ip.parse().ok())
                .collect(),
        });
        t.services.insert(n.eni_id.clone(), n.id.clone());
    }

    // A target's address: an instance's primary private IP, or the IP.
    let target_ip = |tg: &TargetGroup, id: &str| -> Option<Ipv4Addr> {
        if tg.target_type == "ip" {
            return id.parse().ok();
        }
        state.get::<Instance>(id)?;
        state
            .iter::<Eni>()
            .find(|e| {
                e.attachment
                    .as_ref()
                    .is_some_and(|a| a.instance_id == id && a.device_index == 0)
            })
            .and_then(|e| e.primary_ip().parse().ok())
    };
    for lb in state.iter::<LoadBalancer>() {
        let listeners: Vec<&Listener> = state
            .iter::<Listener>()
            .filter(|l| l.lb_id == lb.id)
            .collect();
        for node in &lb.nodes {
            let Some((port, mac, _)) = eni_of(&node.eni_id) else {
                continue;
            };
            let Ok(vip) = node.private_ip.parse::<Ipv4Addr>() else {
                continue;
            };
            let mut lcfgs = Vec::new();
            for l in &listeners {
                let Some(tg) = state.get::<TargetGroup>(&l.target_group) else {
                    continue;
                };
                let targets: Vec<TargetConfig> = tg
                    .targets
                    .iter()
                    .filter_map(|x| {
                        Some(TargetConfig {
                            ip: target_ip(tg, &x.id)?,
                            port: x.port,
                            draining_since: x.draining_since.map(|ms| {
                                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
                            }),
                        })
                    })
                    .collect();
                let hc = &tg.health_check;
                let health_check = HealthCheckConfig {
                    enabled: hc.enabled,
                    port: hc.port.parse().ok(),
                    interval: std::time::Duration::from_secs(hc.interval_s.max(1).into()),
                    timeout: std::time::Duration::from_secs(hc.timeout_s.max(1).into()),
                    healthy_threshold: hc.healthy_threshold.clamp(1, 10) as u8,
                    unhealthy_threshold: hc.unhealthy_threshold.clamp(1, 10) as u8,
                };
                let protocols: &[L4] = match l.protocol.as_str() {
                    "UDP" => &[L4::Udp],
                    "TCP_UDP" => &[L4::Tcp, L4::Udp],
                    _ => &[L4::Tcp],
                };
                for &protocol in protocols {
                    for x in &targets {
                        t.returns.push(enilab_switch::ServiceReturn {
                            ip: x.ip,
                            port: x.port,
                            protocol: if protocol == L4::Tcp { 6 } else { 17 },
                            service: port,
                        });
                    }
                    lcfgs.push(ListenerConfig {
                        protocol,
                        port: l.port,
                        target_group: TargetGroupConfig {
                            id: tg.id.clone(),
                            protocol,
                            targets: targets.clone(),
                            health_check: health_check.clone(),
                            source_ip_stickiness: tg.sticky_source_ip(),
                            deregistration_delay: std::time::Duration::from_secs(
                                tg.deregistration_delay_s().into(),
                            ),
                        },
                    });
                }
            }
            t.config.load_balancers.push(LoadBalancerConfig {
                id: format!("{}#{}", lb.id, node.subnet_id),
                port,
                mac,
                gateway_mac: enilab_switch::GATEWAY_MAC,
                addresses: vec![vip],
                listeners: lcfgs,
            });
            t.services.insert(node.eni_id.clone(), lb.id.clone());
        }
    }
    // One return path per (target, port, protocol): the first balancer.
    let mut seen = std::collections::HashSet::new();
    t.returns
        .retain(|r| seen.insert((r.ip, r.port, r.protocol)));
    t
}

// ---------------------------------------------------------------------------
// enilab actions on the EC2 endpoint: the hyperplane's nodes, and stopping
// one as a failure drill.
// ---------------------------------------------------------------------------

use super::common::req_int_in;
use super::xml::Xml;
use super::{Api, ApiError, Params};

fn no_hyperplane() -> ApiError {
    ApiError::new(
        "UnsupportedOperation",
        "This daemon runs no hyperplane (it needs the QEMU driver).",
    )
}

/// `DescribeHyperplaneNodes`: every node with its flows and counters.
pub fn describe_hyperplane_nodes(api: &Api, _p: &Params) -> Result<String, ApiError> {
    let nodes = api.driver.hyperplane_nodes().ok_or_else(no_hyperplane)?;
    let mut x = Xml::new();
    x.set("nodeSet", nodes, |x, (running, s)| {
        x.num("index", s.node)
            .text("running", if running { "true" } else { "false" })
            .text("live", if s.live { "true" } else { "false" })
            .num("flows", s.flows)
            .num("ownFlows", s.primary_flows)
            .num("framesIn", s.frames_in)
            .num("framesOut", s.frames_out)
            .num("flowsCreated", s.flows_created)
            .num("replicatedIn", s.replicated_in)
            .num("replicationLag", s.replication_lag)
            .num("replicationDropped", s.replication_dropped)
            .num("rstSent", s.rst_sent)
            .num("portAllocationFailures", s.port_allocation_failures)
            .num("tableMemoryBytes", s.table_memory_bytes);
    });
    Ok(x.finish())
}

fn set_node(api: &Api, p: &Params, up: bool) -> Result<String, ApiError> {
    let nodes = api.driver.hyperplane_nodes().ok_or_else(no_hyperplane)?;
    let max = nodes.len().saturating_sub(1) as i64;
    let i = req_int_in(p, "Node", 0, max)? as usize;
    api.driver
        .set_hyperplane_node(i, up)
        .map_err(|e| ApiError::new("IncorrectState", e.to_string()))?;
    Ok(super::vpc::ret_true())
}

/// `StopHyperplaneNode Node=N`: the node's thread stops as a failed node
/// would; its flows continue on their secondaries.
pub fn stop_hyperplane_node(api: &Api, p: &Params) -> Result<String, ApiError> {
    set_node(api, p, false)
}

/// `StartHyperplaneNode Node=N`: the node rejoins with fresh state.
pub fn start_hyperplane_node(api: &Api, p: &Params) -> Result<String, ApiError> {
    set_node(api, p, true)
}

/// `InstanceDriver::target_health`'s rows for target group `tg_id`: the
/// hyperplane reports by address, the API by target id.
pub fn health_rows(
    state: &crate::store::State,
    tg_id: &str,
    health: &[enilab_hyperplane::TargetHealth],
) -> Vec<(String, u16, String, Option<String>)> {
    use crate::store::model::{Eni, TargetGroup};
    use enilab_hyperplane::HealthState;
    let Some(tg) = state.get::<TargetGroup>(tg_id) else {
        return Vec::new();
    };
    let ip_of = |id: &str| -> Option<std::net::Ipv4Addr> {
        if tg.target_type == "ip" {
            return id.parse().ok();
        }
        state
            .iter::<Eni>()
            .find(|e| {
                e.attachment
                    .as_ref()
                    .is_some_and(|a| a.instance_id == id && a.device_index == 0)
            })
            .and_then(|e| e.primary_ip().parse().ok())
    };
    let mut rows = Vec::new();
    for t in &tg.targets {
        let Some(ip) = ip_of(&t.id) else { continue };
        // Several balancer interfaces may check one target: the worst wins.
        let states: Vec<&enilab_hyperplane::TargetHealth> = health
            .iter()
            .filter(|h| h.target_group == tg.id && h.ip == ip && h.port == t.port)
            .collect();
        let pick = states
            .iter()
            .find(|h| h.state == HealthState::Unhealthy)
            .or_else(|| states.iter().find(|h| h.state == HealthState::Draining))
            .or_else(|| states.iter().find(|h| h.state == HealthState::Initial))
            .or_else(|| states.first());
        let Some(h) = pick else { continue };
        let state = match h.state {
            HealthState::Initial => "initial",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
            HealthState::Draining => "draining",
            HealthState::Unused => "unused",
        };
        let reason = (!h.reason.is_empty()).then(|| h.reason.clone());
        rows.push((t.id.clone(), t.port, state.to_string(), reason));
    }
    rows
}

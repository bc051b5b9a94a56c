//! The cluster handle: node membership, the shard map (rendezvous hashing),
//! steering, configuration snapshots and the shared health table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;

use crate::compile::{
    compile, CompileError, Compiled, HealthRec, Kind, TargetId, HC_BASE, HC_PORTS,
};
use crate::config::Config;
use crate::flow::{Flow, Key};
use crate::maglev::{is_prime, mix64, MaglevError};
use crate::node::Node;
use crate::stats::{HealthState, HyperplaneStats, NodeCounters, TargetHealth};
use crate::wire;
use crate::Options;

/// Why a cluster operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum HyperplaneError {
    /// Options out of range.
    #[error("bad hyperplane options: {0}")]
    Options(&'static str),
    /// The configuration was refused; the previous one stays in force.
    #[error("configuration refused: {0}")]
    Config(#[from] CompileError),
    #[error("{0}")]
    Maglev(#[from] MaglevError),
    #[error("there is no node {0}")]
    NoSuchNode(usize),
    #[error("node {0} was already handed out since it last started")]
    NodeTaken(usize),
    /// The node's flow table could not be allocated.
    #[error("no memory for node {0}'s flow table of {1} flows")]
    OutOfMemory(usize, usize),
}

pub(crate) const STOPPED: u8 = 0;
pub(crate) const JOINING: u8 = 1;
pub(crate) const LIVE: u8 = 2;
pub(crate) const NONE: u8 = u8::MAX;

/// Shard → (primary, secondary); `NONE` when there is no such node.
#[derive(Debug)]
pub(crate) struct ShardMap {
    pub gen: u64,
    pub owners: Vec<[u8; 2]>,
}

impl ShardMap {
    #[inline]
    pub fn primary(&self, shard: u16) -> u8 {
        self.owners.get(usize::from(shard)).map_or(NONE, |o| o[0])
    }

    #[inline]
    pub fn secondary(&self, shard: u16) -> u8 {
        self.owners.get(usize::from(shard)).map_or(NONE, |o| o[1])
    }
}

/// A replication record, primary → secondary.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Repl {
    Upsert(Flow),
    Remove(Key),
}

/// A record in flight, stamped with the sender's clock (ms since the cluster epoch).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Record {
    pub repl: Repl,
    pub sent_ms: u32,
}

pub(crate) struct NodeSlot {
    pub state: AtomicU8,
    pub taken: AtomicBool,
    /// Bumped at every start; a `Node` from an older start goes inert.
    pub incarnation: AtomicU64,
    /// Shard-map generation whose re-replication this node has finished.
    pub synced_gen: AtomicU64,
    pub inbox: ArrayQueue<Record>,
    pub counters: NodeCounters,
}

/// The hyperplane cluster; shared by node threads and the control plane.
pub struct Hyperplane {
    pub(crate) opts: Options,
    pub(crate) epoch: Instant,
    pub(crate) slots: Vec<NodeSlot>,
    pub(crate) map: ArcSwap<ShardMap>,
    pub(crate) cfg: ArcSwap<Compiled>,
    /// Cheap change detectors read on the packet path.
    pub(crate) map_gen: AtomicU64,
    pub(crate) cfg_gen: AtomicU64,
    /// Serialises writers of `map` and `cfg`; never taken on the packet path.
    writer: Mutex<Writer>,
    pub(crate) health_changes: AtomicU64,
    steer_drops: AtomicU64,
}

struct Writer {
    config: Config,
    health: HashMap<TargetId, HealthRec>,
}

fn hrw(node: usize, shard: usize) -> u64 {
    mix64(((shard as u64) << 8) ^ node as u64 ^ 0x5bd1_e995_0000_0000)
}

impl Hyperplane {
    pub fn new(opts: Options) -> Result<Arc<Hyperplane>, HyperplaneError> {
        if opts.nodes == 0 || opts.nodes > 64 {
            return Err(HyperplaneError::Options("nodes must be 1 to 64"));
        }
        if !opts.shards.is_power_of_two() || !(2..=1024).contains(&opts.shards) {
            return Err(HyperplaneError::Options(
                "shards must be a power of two from 2 to 1024",
            ));
        }
        if opts.flows_per_node == 0 || opts.flows_per_node > 1 << 28 {
            return Err(HyperplaneError::Options("flows_per_node must be 1 to 2^28"));
        }
        if opts.replication_inbox == 0 {
            return Err(HyperplaneError::Options(
                "replication_inbox must be positive",
            ));
        }
        if !is_prime(opts.maglev_table_size) || opts.maglev_table_size > 1 << 24 {
            return Err(HyperplaneError::Options(
                "maglev_table_size must be a prime up to 2^24",
            ));
        }
        let slots = (0..opts.nodes)
            .map(|_| NodeSlot {
                state: AtomicU8::new(LIVE),
                taken: AtomicBool::new(false),
                incarnation: AtomicU64::new(0),
                synced_gen: AtomicU64::new(1),
                inbox: ArrayQueue::new(opts.replication_inbox),
                counters: NodeCounters::default(),
            })
            .collect();
        let hp = Hyperplane {
            epoch: Instant::now(),
            slots,
            map: ArcSwap::from_pointee(ShardMap {
                gen: 0,
                owners: Vec::new(),
            }),
            cfg: ArcSwap::from_pointee(Compiled::default()),
            map_gen: AtomicU64::new(0),
            cfg_gen: AtomicU64::new(0),
            writer: Mutex::new(Writer {
                config: Config::default(),
                health: HashMap::new(),
            }),
            health_changes: AtomicU64::new(0),
            steer_drops: AtomicU64::new(0),
            opts,
        };
        hp.remap(&mut hp.lock());
        Ok(Arc::new(hp))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A panic while holding the lock leaves consistent data (each write is whole).
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Validates and compiles a whole configuration (Maglev tables built
    /// here) and swaps it in atomically. On error the previous one stays.
    pub fn publish(&self, cfg: Config) -> Result<(), HyperplaneError> {
        let mut w = self.lock();
        let gen = self.cfg_gen.load(Ordering::Relaxed) + 1;
        let prev = self.cfg.load_full();
        let compiled = compile(
            &cfg,
            &w.health,
            SystemTime::now(),
            self.opts.maglev_table_size,
            gen,
            Some(&prev),
        )?;
        // Forget health of targets no longer configured.
        w.health.retain(|id, _| {
            compiled.service(id.lb_port).is_some_and(|s| match &s.kind {
                Kind::Nlb(ls) => ls.iter().any(|l| {
                    l.tg.id == id.tg
                        && l.tg
                            .targets
                            .iter()
                            .any(|t| t.ip == id.ip && t.port == id.port)
                }),
                Kind::Nat => false,
            })
        });
        w.config = cfg;
        self.cfg.store(Arc::new(compiled));
        self.cfg_gen.store(gen, Ordering::Release);
        Ok(())
    }

    /// Recompiles the current configuration after a health change (or a
    /// deregistration delay running out). Called from node threads' ticks.
    pub(crate) fn record_health(&self, id: &TargetId, ok: bool) {
        let mut w = self.lock();
        let Some((hc_ok, hc_fail)) = self.thresholds(id) else {
            return;
        };
        let r = w.health.entry(id.clone()).or_default();
        let before = r.state;
        if ok {
            r.ok_streak = r.ok_streak.saturating_add(1);
            r.fail_streak = 0;
            if r.state != HealthState::Healthy && r.ok_streak >= hc_ok {
                r.state = HealthState::Healthy;
                r.reason = "";
            }
        } else {
            r.fail_streak = r.fail_streak.saturating_add(1);
            r.ok_streak = 0;
            if r.state != HealthState::Unhealthy && r.fail_streak >= hc_fail {
                r.state = HealthState::Unhealthy;
                r.reason = "Target.FailedHealthChecks";
            }
        }
        if r.state != before {
            self.health_changes.fetch_add(1, Ordering::Relaxed);
            self.recompile(&w);
        }
    }

    fn thresholds(&self, id: &TargetId) -> Option<(u8, u8)> {
        let cfg = self.cfg.load();
        let s = cfg.service(id.lb_port)?;
        match &s.kind {
            Kind::Nlb(ls) => ls
                .iter()
                .find(|l| l.tg.id == id.tg)
                .map(|l| (l.tg.hc.healthy_threshold, l.tg.hc.unhealthy_threshold)),
            Kind::Nat => None,
        }
    }

    /// Recompiles with the stored config; a draining target's delay running out lands here too.
    pub(crate) fn refresh(&self) {
        let w = self.lock();
        self.recompile(&w);
    }

    fn recompile(&self, w: &Writer) {
        let gen = self.cfg_gen.load(Ordering::Relaxed) + 1;
        // The stored config compiled before, so only a Maglev failure could refuse it; keep the old one then.
        let prev = self.cfg.load_full();
        if let Ok(c) = compile(
            &w.config,
            &w.health,
            SystemTime::now(),
            self.opts.maglev_table_size,
            gen,
            Some(&prev),
        ) {
            self.cfg.store(Arc::new(c));
            self.cfg_gen.store(gen, Ordering::Release);
        }
    }

    /// Recomputes the shard map from node states.
    fn remap(&self, _w: &mut Writer) {
        let states: Vec<u8> = self
            .slots
            .iter()
            .map(|s| s.state.load(Ordering::Acquire))
            .collect();
        let owners = (0..usize::from(self.opts.shards))
            .map(|s| {
                let best = |ok: &dyn Fn(usize) -> bool| {
                    (0..states.len())
                        .filter(|&n| ok(n))
                        .max_by_key(|&n| hrw(n, s))
                        .map_or(NONE, |n| n as u8)
                };
                let p = best(&|n| states[n] == LIVE);
                let q = best(&|n| states[n] != STOPPED && n as u8 != p);
                [p, q]
            })
            .collect();
        let gen = self.map_gen.load(Ordering::Relaxed) + 1;
        self.map.store(Arc::new(ShardMap { gen, owners }));
        self.map_gen.store(gen, Ordering::Release);
    }

    /// The node that owns this frame, without locks. `None` means drop (counted).
    pub fn steer(&self, port: u32, frame: &[u8]) -> Option<usize> {
        let r = self.steer_inner(port, frame);
        if r.is_none() {
            self.steer_drops.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn steer_inner(&self, port: u32, frame: &[u8]) -> Option<usize> {
        let p = wire::parse(frame).ok()?;
        let cfg = self.cfg.load();
        let svc = cfg.service(port)?;
        let shard = match &svc.kind {
            Kind::Nat if svc.owns(p.dst) => match p.inner {
                // An ICMP error quotes the translated datagram: its source port is the NAT port.
                Some(i) => self.nat_in_shard(i.sport),
                None => self.nat_in_shard(p.dport),
            },
            _ if p.inner.is_some() => return None,
            Kind::Nat => self.nat_out_shard(&p, port).0,
            Kind::Nlb(_) if svc.owns(p.dst) => {
                if svc.is_probe_reply(&p) {
                    let n = self.hc_node(p.dport);
                    return (self.slots.get(n)?.state.load(Ordering::Acquire) != STOPPED)
                        .then_some(n);
                }
                self.nlb_shard(p.src, p.sport, p.proto, port)
            }
            Kind::Nlb(_) => self.nlb_shard(p.dst, p.dport, p.proto, port),
        };
        let n = self.map.load().primary(shard);
        (n != NONE).then_some(usize::from(n))
    }

    #[inline]
    pub(crate) fn shard_mask(&self) -> u16 {
        self.opts.shards - 1
    }

    /// Outbound NAT: the shard comes from the forward tuple; returns (shard, key hash).
    #[inline]
    pub(crate) fn nat_out_shard(&self, p: &wire::Parsed, svc: u32) -> (u16, u64) {
        let h = crate::node::flow_key(p, svc).hash();
        (self.nat_shard_of_hash(h), h)
    }

    /// The shard of an outbound NAT flow from its forward key's hash.
    #[inline]
    pub(crate) fn nat_shard_of_hash(&self, h: u64) -> u16 {
        h as u16 & self.shard_mask()
    }

    /// Return NAT traffic: the NAT port was chosen so that `port % shards` is the flow's shard.
    #[inline]
    pub(crate) fn nat_in_shard(&self, nat_port: u16) -> u16 {
        nat_port & self.shard_mask()
    }

    /// Load balancer: by the client endpoint, the same in both directions.
    #[inline]
    pub(crate) fn nlb_shard(&self, client: u32, cport: u16, proto: u8, svc: u32) -> u16 {
        let h = mix64(
            (u64::from(client) << 32)
                | (u64::from(cport) << 16)
                | u64::from(proto) ^ (u64::from(svc) << 40),
        );
        h as u16 & self.shard_mask()
    }

    /// Health-check source ports are split evenly between nodes.
    pub(crate) fn hc_ports_per_node(&self) -> u16 {
        HC_PORTS / self.slots.len() as u16
    }

    pub(crate) fn hc_node(&self, port: u16) -> usize {
        usize::from((port - HC_BASE) / self.hc_ports_per_node())
    }

    /// Hands out the worker state for node `i`, once per start. For a
    /// stopped node it may be taken before or after `start_node(i)`; it
    /// takes traffic only once started (and promoted).
    pub fn node(self: &Arc<Self>, i: usize) -> Result<Node, HyperplaneError> {
        let slot = self.slots.get(i).ok_or(HyperplaneError::NoSuchNode(i))?;
        if slot.taken.swap(true, Ordering::AcqRel) {
            return Err(HyperplaneError::NodeTaken(i));
        }
        Node::new(
            Arc::clone(self),
            i,
            slot.incarnation.load(Ordering::Acquire),
        )
        .map_err(|_| {
            slot.taken.store(false, Ordering::Release);
            HyperplaneError::OutOfMemory(i, self.opts.flows_per_node)
        })
    }

    /// Stops node `i`: its shards move to their secondaries, which hold the
    /// flows already and replicate them to new secondaries.
    pub fn stop_node(&self, i: usize) {
        let mut w = self.lock();
        let Some(slot) = self.slots.get(i) else {
            return;
        };
        if slot.state.swap(STOPPED, Ordering::AcqRel) == STOPPED {
            return;
        }
        slot.incarnation.fetch_add(1, Ordering::AcqRel);
        slot.taken.store(false, Ordering::Release);
        self.remap(&mut w);
    }

    /// Starts node `i` again with an empty table. It joins as a secondary,
    /// receives its shards' flows, and becomes a primary once the others
    /// have re-replicated to it (see [`Node::tick`]).
    pub fn start_node(&self, i: usize) {
        let mut w = self.lock();
        let Some(slot) = self.slots.get(i) else {
            return;
        };
        if slot.state.load(Ordering::Acquire) != STOPPED {
            return;
        }
        while slot.inbox.pop().is_some() {}
        let c = &slot.counters;
        c.replication_sent.store(0, Ordering::Relaxed);
        c.replicated_in.store(0, Ordering::Relaxed);
        c.replication_dropped.store(0, Ordering::Relaxed);
        let any_live = self
            .slots
            .iter()
            .any(|s| s.state.load(Ordering::Acquire) == LIVE);
        slot.state
            .store(if any_live { JOINING } else { LIVE }, Ordering::Release);
        self.remap(&mut w);
    }

    /// Promotes joining nodes once every live node re-replicated for the
    /// current map and the joiners' inboxes are drained.
    pub(crate) fn maybe_promote(&self) {
        let gen = self.map_gen.load(Ordering::Acquire);
        let mut joining = false;
        for s in &self.slots {
            match s.state.load(Ordering::Acquire) {
                LIVE if s.synced_gen.load(Ordering::Acquire) < gen => return,
                JOINING => {
                    let c = s.counters.read(0, false);
                    if !s.taken.load(Ordering::Acquire)
                        || c.replication_lag > 0
                        || !s.inbox.is_empty()
                    {
                        return;
                    }
                    joining = true;
                }
                _ => {}
            }
        }
        if !joining {
            return;
        }
        let mut w = self.lock();
        if self.map_gen.load(Ordering::Acquire) != gen {
            return;
        }
        for s in &self.slots {
            let _ = s
                .state
                .compare_exchange(JOINING, LIVE, Ordering::AcqRel, Ordering::Acquire);
        }
        self.remap(&mut w);
    }

    /// Nodes that take traffic.
    pub fn live_nodes(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].state.load(Ordering::Acquire) == LIVE)
            .collect()
    }

    pub fn stats(&self) -> HyperplaneStats {
        let nodes: Vec<_> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| s.counters.read(i, s.state.load(Ordering::Acquire) == LIVE))
            .collect();
        HyperplaneStats {
            steer_drops: self.steer_drops.load(Ordering::Relaxed),
            port_allocation_failures: nodes.iter().map(|n| n.port_allocation_failures).sum(),
            health_state_changes: self.health_changes.load(Ordering::Relaxed),
            table_memory_bytes: nodes.iter().map(|n| n.table_memory_bytes).sum(),
            flows: nodes.iter().map(|n| n.primary_flows).sum(),
            nodes,
        }
    }

    /// Every registered target's health, as DescribeTargetHealth reports it.
    pub fn target_health(&self) -> Vec<TargetHealth> {
        let cfg = self.cfg.load();
        let now = SystemTime::now();
        let mut out = Vec::new();
        // A target group behind several listeners (e.g. TCP_UDP) is reported once.
        let mut seen = std::collections::HashSet::new();
        for s in &cfg.services {
            let Kind::Nlb(ls) = &s.kind else { continue };
            for l in ls {
                for t in &l.tg.targets {
                    if !seen.insert((s.port, l.tg.id.as_str(), t.ip, t.port)) {
                        continue;
                    }
                    let mut state = t.state;
                    let mut reason = t.reason;
                    // The snapshot may predate the end of the deregistration delay.
                    if let Some(since) = t.draining_since {
                        if now.duration_since(since).unwrap_or_default() >= l.tg.dereg_delay {
                            state = HealthState::Unused;
                            reason = "Target.NotRegistered";
                        }
                    }
                    out.push(TargetHealth {
                        load_balancer: s.id.clone(),
                        target_group: l.tg.id.clone(),
                        ip: t.ip.into(),
                        port: t.port,
                        state,
                        reason: reason.to_string(),
                    });
                }
            }
        }
        out
    }
}

//! A hyperplane node: the state one worker thread owns (flow table, cached
//! snapshots, scratch buffer, local counters) and its packet and timer entry
//! points. Nothing here is shared mutably with other nodes; other nodes talk
//! to it only through its replication inbox.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{Hyperplane, Record, Repl, ShardMap, NONE};
use crate::compile::{Compiled, Kind};
use crate::flow::{Flow, FlowTable, Key, F_FIN_FWD, F_FIN_REV, F_NLB, F_RST};
use crate::health::Prober;
use crate::stats::DropReason;
use crate::wire::{self, Parsed, PROTO_ICMP, PROTO_TCP, TCP_FIN, TCP_RST};
use crate::Sink;

/// The expiry sweep runs every SWEEP_EVERY_MS and examines a 1/SWEEP_PARTS
/// share of the table (at least SWEEP_MIN records), so the whole table is
/// swept about once a second however often the owner calls `tick`.
const SWEEP_EVERY_MS: u32 = 10;
const SWEEP_PARTS: usize = 100;
const SWEEP_MIN: usize = 1024;
/// Flow records examined per tick by the pass after a new snapshot.
const RECONCILE_BUDGET: usize = 65536;
/// Flow records examined per tick by the re-replication pass.
const RESYNC_BUDGET: usize = 16384;
/// A primary refreshes a flow's replica when it is older than this (in 1.024 s units).
const REFRESH_UNITS: u16 = 30;

#[derive(Default)]
pub(crate) struct Local {
    pub frames_in: u64,
    pub frames_out: u64,
    pub flows_created: u64,
    pub flows_expired: u64,
    pub replicated_in: u64,
    pub resynced_out: u64,
    pub rst_sent: u64,
    pub port_allocation_failures: u64,
    /// Oldest replication record applied in the current one-second window (ms).
    pub replication_age_ms: u64,
    pub drops: [u64; DropReason::COUNT],
}

/// Idle timeouts in milliseconds.
pub(crate) struct Timeouts {
    nat_tcp: u32,
    nat_udp: u32,
    nat_icmp: u32,
    nlb_tcp: u32,
    nlb_udp: u32,
    closing: u32,
}

fn ms(d: Duration) -> u32 {
    d.as_millis().min(u128::from(u32::MAX / 4)) as u32
}

impl Timeouts {
    pub fn of(&self, f: &Flow) -> u32 {
        if f.proto == PROTO_TCP
            && (f.flags & F_RST != 0 || f.flags & (F_FIN_FWD | F_FIN_REV) == F_FIN_FWD | F_FIN_REV)
        {
            return self.closing;
        }
        match (f.flags & F_NLB != 0, f.proto) {
            (false, PROTO_TCP) => self.nat_tcp,
            (false, PROTO_ICMP) => self.nat_icmp,
            (false, _) => self.nat_udp,
            (true, PROTO_TCP) => self.nlb_tcp,
            (true, _) => self.nlb_udp,
        }
    }
}

/// The table key of packet `p` on service `svc`, as it travels.
pub(crate) fn flow_key(p: &Parsed, svc: u32) -> Key {
    Key {
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
        svc,
        proto: p.proto,
    }
}

/// Everything the packet path mutates, apart from the config snapshot it reads.
pub(crate) struct Ctx {
    pub hp: Arc<Hyperplane>,
    pub id: usize,
    pub table: FlowTable,
    pub map: Arc<ShardMap>,
    pub buf: Vec<u8>,
    pub c: Local,
    pub t: Timeouts,
    pub now_ms: u32,
}

impl Ctx {
    #[inline]
    pub fn drop(&mut self, r: DropReason) {
        self.c.drops[r as usize] += 1;
    }

    #[inline]
    pub fn is_primary(&self, shard: u16) -> bool {
        usize::from(self.map.primary(shard)) == self.id
    }

    #[inline]
    pub fn expired(&self, f: &Flow) -> bool {
        self.now_ms.wrapping_sub(f.last_seen) > self.t.of(f)
    }

    #[inline]
    pub fn now_units(&self) -> u16 {
        (self.now_ms >> 10) as u16
    }

    /// Sends a record to the shard's secondary; a full inbox drops it (counted there).
    pub fn replicate(&mut self, shard: u16, r: Repl) {
        let sec = self.map.secondary(shard);
        if sec == NONE || usize::from(sec) == self.id {
            return;
        }
        let Some(slot) = self.hp.slots.get(usize::from(sec)) else {
            return;
        };
        slot.counters
            .replication_sent
            .fetch_add(1, Ordering::Relaxed);
        if slot
            .inbox
            .push(Record {
                repl: r,
                sent_ms: self.now_ms,
            })
            .is_err()
        {
            slot.counters
                .replication_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a packet on a flow: timestamps, TCP close state, replica refresh.
    #[inline]
    pub fn touch(&mut self, idx: u32, p: &Parsed, dir: u32) {
        let units = self.now_units();
        let now = self.now_ms;
        let f = self.table.get_mut(idx);
        f.last_seen = now;
        let mut changed = false;
        if p.proto == PROTO_TCP && p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            let before = f.flags;
            if p.tcp_flags & TCP_RST != 0 {
                f.flags |= F_RST;
            }
            if p.tcp_flags & TCP_FIN != 0 {
                f.flags |= if dir == 0 { F_FIN_FWD } else { F_FIN_REV };
            }
            changed = f.flags != before;
        }
        if changed || units.wrapping_sub(f._pad) > REFRESH_UNITS {
            f._pad = units;
            let copy = *f;
            self.replicate(copy.shard, Repl::Upsert(copy));
        }
    }

    /// The live flow `p` belongs to on service `svc`, if it is seen from
    /// `dir` (0: the side that opened it, 1: the reply side), touched. An
    /// expired entry is removed (counted) and reported as none.
    pub fn live_flow(&mut self, p: &Parsed, svc: u32, h: u64, dir: u32) -> Option<u32> {
        let (idx, d) = self.table.lookup(&flow_key(p, svc), h)?;
        if d != dir {
            return None;
        }
        if self.expired(self.table.get(idx)) {
            self.remove_primary(idx);
            self.c.flows_expired += 1;
            return None;
        }
        self.touch(idx, p, dir);
        Some(idx)
    }

    /// Removes a flow this node is primary for and tells the secondary.
    pub fn remove_primary(&mut self, idx: u32) {
        let f = *self.table.get(idx);
        self.table.remove(idx);
        self.replicate(f.shard, Repl::Remove(f.fwd_key()));
    }

    #[inline]
    pub fn emit(&mut self, out: &mut dyn Sink, port: u32) {
        self.c.frames_out += 1;
        out.emit(port, &self.buf);
    }

    /// Emits a TCP segment the hyperplane originates.
    pub fn emit_tcp(&mut self, out: &mut dyn Sink, port: u32, spec: &wire::TcpSpec) {
        wire::build_tcp(&mut self.buf, spec);
        if spec.flags & TCP_RST != 0 {
            self.c.rst_sent += 1;
        }
        self.emit(out, port);
    }

    /// Applies one replication record.
    fn apply(&mut self, rec: Record) {
        let age = self.now_ms.wrapping_sub(rec.sent_ms);
        if age < u32::MAX / 2 {
            self.c.replication_age_ms = self.c.replication_age_ms.max(u64::from(age));
        }
        match rec.repl {
            Repl::Upsert(f) => {
                let k = f.fwd_key();
                match self.table.lookup(&k, k.hash()) {
                    Some((idx, 0)) if self.table.get(idx).rev_key() == f.rev_key() => {
                        *self.table.get_mut(idx) = f
                    }
                    found => {
                        if let Some((idx, _)) = found {
                            self.table.remove(idx);
                        }
                        if self.table.insert(f).is_err() {
                            self.drop(DropReason::FlowTableFull);
                        }
                    }
                }
            }
            Repl::Remove(k) => {
                if let Some((idx, 0)) = self.table.lookup(&k, k.hash()) {
                    self.table.remove(idx);
                }
            }
        }
        self.c.replicated_in += 1;
    }
}

/// The flow-table key of a frame as it appears on the wire.
#[inline]
pub(crate) fn wire_key(port: u32, p: &Parsed) -> crate::flow::Key {
    crate::flow::Key {
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
        svc: port,
        proto: p.proto,
    }
}

/// Re-replication after a change of owners: push the flows of every shard
/// this node now leads to that shard's (new) secondary.
struct Resync {
    push: Vec<bool>,
    takeover: Vec<bool>,
    cursor: usize,
}

/// The worker state of one node; owned by one thread.
pub struct Node {
    ctx: Ctx,
    cfg: Arc<Compiled>,
    incarnation: u64,
    dead: bool,
    synced_map: Arc<ShardMap>,
    resync: Option<Resync>,
    sweep_cursor: usize,
    sweep_primary: u64,
    /// Next record the NLB reconcile pass examines, when one is running.
    reconcile: Option<usize>,
    prober: Prober,
    last_slow_tick: u32,
    last_sweep: u32,
    age_window: u32,
}

impl Node {
    pub(crate) fn new(
        hp: Arc<Hyperplane>,
        id: usize,
        incarnation: u64,
    ) -> Result<Node, crate::flow::FlowError> {
        let o = &hp.opts;
        let t = Timeouts {
            nat_tcp: ms(o.nat_tcp_idle),
            nat_udp: ms(o.nat_udp_idle),
            nat_icmp: ms(o.nat_icmp_idle),
            nlb_tcp: ms(o.nlb_tcp_idle),
            nlb_udp: ms(o.nlb_udp_idle),
            closing: ms(o.tcp_closing),
        };
        let table = FlowTable::new(o.flows_per_node)?;
        let map = hp.map.load_full();
        let cfg = hp.cfg.load_full();
        // A fresh node has nothing to push; it is synced to the map it starts with.
        hp.slots[id].synced_gen.store(map.gen, Ordering::Release);
        Ok(Node {
            ctx: Ctx {
                hp,
                id,
                table,
                map: Arc::clone(&map),
                buf: Vec::with_capacity(2048),
                c: Local::default(),
                t,
                now_ms: 0,
            },
            cfg,
            incarnation,
            dead: false,
            synced_map: map,
            resync: None,
            sweep_cursor: 0,
            sweep_primary: 0,
            reconcile: None,
            prober: Prober::default(),
            last_slow_tick: 0,
            last_sweep: 0,
            age_window: 0,
        })
    }

    pub fn id(&self) -> usize {
        self.ctx.id
    }

    /// Flows in this node's table (own and replicated).
    pub fn flows(&self) -> usize {
        self.ctx.table.len()
    }

    fn now_ms(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.ctx.hp.epoch).as_millis() as u32
    }

    /// Picks up a new shard map or config snapshot.
    #[inline]
    fn refresh(&mut self) {
        if self.ctx.hp.map_gen.load(Ordering::Acquire) != self.ctx.map.gen {
            self.ctx.map = self.ctx.hp.map.load_full();
            // Records sent before the change must land before this node acts as a new owner.
            self.drain_inbox();
            self.start_resync();
        }
        if self.ctx.hp.cfg_gen.load(Ordering::Acquire) != self.cfg.gen {
            self.cfg = self.ctx.hp.cfg.load_full();
            // A new snapshot (re)starts the pass from the beginning.
            self.reconcile = Some(0);
        }
    }

    /// Handles one frame the cluster steered to this node.
    pub fn process(&mut self, port: u32, frame: &[u8], now: Instant, out: &mut dyn Sink) {
        self.refresh();
        self.ctx.now_ms = self.now_ms(now);
        let p = wire::parse(frame);
        let h = p.as_ref().map_or(0, |p| wire_key(port, p).hash());
        self.process_parsed(port, frame, p, h, out);
    }

    /// Handles a batch of `(port, frame)` pairs: the flow-table lines of the
    /// batch are prefetched first, so the cache misses of a million-flow
    /// table overlap instead of queueing. Same result as `process` on each.
    pub fn process_batch(&mut self, frames: &[(u32, &[u8])], now: Instant, out: &mut dyn Sink) {
        const AHEAD: usize = 32;
        self.refresh();
        self.ctx.now_ms = self.now_ms(now);
        let mut parsed = [Err(DropReason::Malformed); AHEAD];
        let mut hashes = [0u64; AHEAD];
        for chunk in frames.chunks(AHEAD) {
            for (i, (port, f)) in chunk.iter().enumerate() {
                parsed[i] = wire::parse(f);
                hashes[i] = parsed[i].as_ref().map_or(0, |p| wire_key(*port, p).hash());
                self.ctx.table.prefetch(hashes[i]);
            }
            for h in &hashes[..chunk.len()] {
                self.ctx.table.prefetch_flow(*h);
            }
            for (i, (port, f)) in chunk.iter().enumerate() {
                self.process_parsed(*port, f, parsed[i], hashes[i], out);
            }
        }
    }

    #[inline]
    fn process_parsed(
        &mut self,
        port: u32,
        frame: &[u8],
        p: Result<Parsed, DropReason>,
        h: u64,
        out: &mut dyn Sink,
    ) {
        self.ctx.c.frames_in += 1;
        if self.dead {
            return self.ctx.drop(DropReason::NoNode);
        }
        let p = match p {
            Ok(p) => p,
            Err(r) => return self.ctx.drop(r),
        };
        let Some(svc) = self.cfg.service(port) else {
            return self.ctx.drop(DropReason::UnknownPort);
        };
        match &svc.kind {
            Kind::Nat => crate::nat::process(&mut self.ctx, svc, frame, &p, h, out),
            Kind::Nlb(_) => {
                if svc.is_probe_reply(&p) {
                    self.prober.reply(&mut self.ctx, svc, &p, out);
                } else {
                    crate::nlb::process(&mut self.ctx, svc, frame, &p, h, out);
                }
            }
        }
    }

    /// Timers: replication inbox, re-replication, expiry, health probes,
    /// reaction to config and health changes. Call it often (every loop).
    pub fn tick(&mut self, now: Instant, out: &mut dyn Sink) {
        let slot_inc = self.ctx.hp.slots[self.ctx.id]
            .incarnation
            .load(Ordering::Acquire);
        if slot_inc != self.incarnation {
            // Stopped (and maybe started again with a new Node): this one goes inert.
            self.dead = true;
        }
        if self.dead {
            return;
        }
        self.ctx.now_ms = self.now_ms(now);
        self.refresh();
        self.drain_inbox();
        self.resync_step();
        if self.ctx.now_ms.wrapping_sub(self.last_sweep) >= SWEEP_EVERY_MS {
            self.last_sweep = self.ctx.now_ms;
            self.sweep_step();
        }
        if let Some(from) = self.reconcile {
            let next = crate::nlb::reconcile(&mut self.ctx, &self.cfg, from, RECONCILE_BUDGET, out);
            self.reconcile = (next < self.ctx.table.slots()).then_some(next);
        }
        if self.ctx.now_ms.wrapping_sub(self.last_slow_tick) >= 20 {
            self.last_slow_tick = self.ctx.now_ms;
            self.prober.run(&mut self.ctx, &self.cfg, out);
            self.ctx.hp.maybe_promote();
            if crate::nlb::drain_expired(&self.cfg) {
                self.ctx.hp.refresh();
            }
        }
        self.publish();
        if self.ctx.now_ms.wrapping_sub(self.age_window) >= 1000 {
            self.age_window = self.ctx.now_ms;
            self.ctx.c.replication_age_ms = 0;
        }
    }

    fn drain_inbox(&mut self) {
        let hp = Arc::clone(&self.ctx.hp);
        let inbox = &hp.slots[self.ctx.id].inbox;
        for _ in 0..inbox.capacity() {
            let Some(r) = inbox.pop() else { break };
            self.ctx.apply(r);
        }
        hp.slots[self.ctx.id]
            .counters
            .replicated_in
            .store(self.ctx.c.replicated_in, Ordering::Release);
    }

    fn start_resync(&mut self) {
        let (old, new, me) = (&self.synced_map, &self.ctx.map, self.ctx.id as u8);
        let n = new.owners.len();
        let mut push = vec![false; n];
        let mut takeover = vec![false; n];
        let mut any = false;
        for s in 0..n {
            let o = new.owners[s];
            if o[0] != me {
                continue;
            }
            let before = old.owners.get(s).copied().unwrap_or([NONE, NONE]);
            push[s] = o[1] != NONE && before != o;
            takeover[s] = before[0] != me;
            any |= push[s] || takeover[s];
        }
        if any {
            self.resync = Some(Resync {
                push,
                takeover,
                cursor: 0,
            });
        } else {
            self.finish_resync();
        }
    }

    fn finish_resync(&mut self) {
        self.resync = None;
        self.synced_map = Arc::clone(&self.ctx.map);
        self.ctx.hp.slots[self.ctx.id]
            .synced_gen
            .store(self.ctx.map.gen, Ordering::Release);
    }

    fn resync_step(&mut self) {
        let Some(rs) = self.resync.as_mut() else {
            return;
        };
        let hp = Arc::clone(&self.ctx.hp);
        let end = (rs.cursor + RESYNC_BUDGET).min(self.ctx.table.slots());
        while rs.cursor < end {
            let i = rs.cursor;
            if let Some(f) = self.ctx.table.at(i) {
                let s = usize::from(f.shard);
                if rs.takeover.get(s) == Some(&true) {
                    // The replica's timestamp may lag by up to the refresh period.
                    self.ctx.table.get_mut(i as u32).last_seen = self.ctx.now_ms;
                }
                if rs.push.get(s) == Some(&true) {
                    let f = *self.ctx.table.get(i as u32);
                    let sec = usize::from(self.ctx.map.secondary(f.shard));
                    let Some(slot) = hp.slots.get(sec) else { break };
                    let rec = Record {
                        repl: Repl::Upsert(f),
                        sent_ms: self.ctx.now_ms,
                    };
                    if slot.inbox.push(rec).is_err() {
                        // Inbox full: try again from here next tick rather than lose the record.
                        return;
                    }
                    slot.counters
                        .replication_sent
                        .fetch_add(1, Ordering::Relaxed);
                    self.ctx.c.resynced_out += 1;
                }
            }
            rs.cursor += 1;
        }
        if rs.cursor >= self.ctx.table.slots() {
            self.finish_resync();
        }
    }

    fn sweep_step(&mut self) {
        let slots = self.ctx.table.slots();
        let me = self.ctx.id as u8;
        let budget = (slots / SWEEP_PARTS).max(SWEEP_MIN).min(slots);
        for _ in 0..budget {
            if self.sweep_cursor >= slots {
                break;
            }
            let i = self.sweep_cursor;
            self.sweep_cursor += 1;
            let Some(f) = self.ctx.table.at(i) else {
                continue;
            };
            let o = self
                .ctx
                .map
                .owners
                .get(usize::from(f.shard))
                .copied()
                .unwrap_or([NONE, NONE]);
            let timeout = self.ctx.t.of(f);
            let idle = self.ctx.now_ms.wrapping_sub(f.last_seen);
            if o[0] == me {
                if idle > timeout {
                    self.ctx.remove_primary(i as u32);
                    self.ctx.c.flows_expired += 1;
                } else {
                    self.sweep_primary += 1;
                }
            } else if o[1] == me {
                // The primary sends removals; this only catches lost ones.
                if idle / 2 > timeout {
                    self.ctx.table.remove(i as u32);
                }
            } else if self.resync.is_none() {
                // Neither owner any more (owners changed): the flow lives elsewhere.
                self.ctx.table.remove(i as u32);
            }
        }
        if self.sweep_cursor >= slots {
            // A full pass: publish how many flows this node leads.
            self.sweep_cursor = 0;
            self.ctx.hp.slots[self.ctx.id]
                .counters
                .primary_flows
                .store(self.sweep_primary, Ordering::Relaxed);
            self.sweep_primary = 0;
        }
    }

    /// Copies local counters to the shared ones.
    fn publish(&self) {
        let c = &self.ctx.hp.slots[self.ctx.id].counters;
        let l = &self.ctx.c;
        let s = |a: &std::sync::atomic::AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        s(&c.flows, self.ctx.table.len() as u64);
        s(&c.frames_in, l.frames_in);
        s(&c.frames_out, l.frames_out);
        s(&c.flows_created, l.flows_created);
        s(&c.flows_expired, l.flows_expired);
        s(&c.resynced_out, l.resynced_out);
        s(&c.rst_sent, l.rst_sent);
        s(&c.port_allocation_failures, l.port_allocation_failures);
        s(&c.table_memory_bytes, self.ctx.table.memory_bytes() as u64);
        s(&c.replication_age_ms, l.replication_age_ms);
        for (a, v) in c.drops.iter().zip(l.drops.iter()) {
            s(a, *v);
        }
    }
}

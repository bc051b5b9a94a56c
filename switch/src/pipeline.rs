//! The per-packet pipeline.
//!
//! [`Switch`] is shared (one per host); [`SwitchWorker`] is one per backend
//! worker thread and owns what the packet path needs to be lock- and
//! allocation-free: a cached pointer to the current snapshot and a scratch
//! buffer for the replies the switch writes itself.
//!
//! `process` parses the frame through the checked views in [`crate::wire`]
//! and hands it to one of the stages:
//!
//! * [`arp`]: every ARP request is answered here, nothing is flooded;
//! * [`dhcp`]: a static-lease DHCP server on each subnet's .1;
//! * [`ipv4`]: unicast forwarding by destination IP inside the VPC, and
//!   echo replies from the .1 router;
//! * [`uplink`]: frames from the internet side;
//! * [`metadata`]: the instance metadata service's address translation.
//!
//! In front of them, [`fast`]: each worker's exact-match cache of the
//! forwarding decisions the IPv4 stage took, per flow and snapshot.

mod arp;
mod dhcp;
mod fast;
mod flow;
mod ipv4;
#[cfg(test)]
mod limits_tests;
mod metadata;
#[cfg(test)]
mod metadata_tests;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;
mod uplink;

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, Cache};

use crate::capture::{Capture, CaptureError, CaptureTable, Direction};
use crate::config::{PortConfig, PortInfo, Snapshot, SubnetConfig};
use crate::conntrack::{Conntrack, ConntrackStats, Timeouts};
use crate::counters::{DropReason, PortCounters, PortStats};
use crate::flowlog::{FlowLogWriter, LocalLog};
use crate::limits::{wire_packets, MeterClock};
use crate::wire::ethernet::{self, ethertype};
use crate::{Egress, PacketMeta, PortId, Verdict, MAX_PORTS};

pub use arp::{announcement, ANNOUNCEMENT_LEN};
pub use flow::flow_hash;

/// Size of a worker's reply buffer: more than the largest reply (a DHCP
/// message is 342 bytes, an ARP reply 42).
const SCRATCH_LEN: usize = 1024;

/// How the switch is built.
#[derive(Debug, Clone)]
pub struct SwitchOptions {
    /// Connection-tracking slots (rounded up to a power of two); 32 bytes
    /// each. Keep the load under about a half.
    pub conntrack_slots: usize,
    pub timeouts: Timeouts,
    /// Drive the switch's clock by hand (seconds since start), for tests.
    pub manual_clock: Option<Arc<AtomicU32>>,
    /// Give each worker an exact-match flow cache (see `docs/switch.md`).
    /// Off, every frame takes the full path: for comparisons.
    pub flow_cache: bool,
    /// Fix the connection-tracking hash seed, so two switches place flows
    /// (and reclaim expired ones) alike; `None`: random, as a guest must
    /// not be able to aim its flows at one probe window.
    pub conntrack_seed: Option<u64>,
}

impl Default for SwitchOptions {
    fn default() -> Self {
        SwitchOptions {
            conntrack_slots: 1 << 20,
            timeouts: Timeouts::default(),
            manual_clock: None,
            flow_cache: true,
            conntrack_seed: None,
        }
    }
}

/// Coarse seconds: monotonic since start, or a manual counter.
#[derive(Debug, Clone)]
struct Clock {
    start: Instant,
    start_unix: u64,
    manual: Option<Arc<AtomicU32>>,
}

impl Clock {
    fn now(&self) -> u32 {
        match &self.manual {
            Some(m) => m.load(Ordering::Relaxed),
            None => u32::try_from(self.start.elapsed().as_secs()).unwrap_or(u32::MAX),
        }
    }

    fn unix(&self, now: u32) -> u64 {
        self.start_unix + u64::from(now)
    }
}

/// The shared half of the switch: the published snapshot, the counters and
/// the connection-tracking table.
pub struct Switch {
    snapshot: Arc<ArcSwap<Snapshot>>,
    counters: Box<[PortCounters]>,
    conntrack: Conntrack,
    clock: Clock,
    flowlog: FlowLogWriter,
    capture: Arc<CaptureTable>,
    /// The next conntrack slot the sweep visits, and the second it last ran.
    sweep_next: AtomicUsize,
    swept_at: AtomicU32,
    /// The last snapshot epoch handed out.
    epoch: AtomicU64,
    flow_cache: bool,
}

impl fmt::Debug for Switch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Switch")
            .field("generation", &self.snapshot.load().generation)
            .finish_non_exhaustive()
    }
}

impl Switch {
    /// A switch with an empty snapshot (generation 0, no ports),
    /// [`MAX_PORTS`] zeroed counter blocks and default options.
    pub fn new() -> Arc<Switch> {
        Switch::with_options(SwitchOptions::default())
    }

    pub fn with_options(opts: SwitchOptions) -> Arc<Switch> {
        let counters = (0..MAX_PORTS).map(|_| PortCounters::default()).collect();
        let clock = Clock {
            start: Instant::now(),
            start_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            manual: opts.manual_clock.clone(),
        };
        let c2 = clock.clone();
        Arc::new(Switch {
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            counters,
            conntrack: match opts.conntrack_seed {
                Some(seed) => Conntrack::with_seed(opts.conntrack_slots, opts.timeouts, seed),
                None => Conntrack::new(opts.conntrack_slots, opts.timeouts),
            },
            flowlog: FlowLogWriter::start(Arc::new(move || c2.unix(c2.now()))),
            clock,
            capture: Arc::new(CaptureTable::default()),
            sweep_next: AtomicUsize::new(0),
            swept_at: AtomicU32::new(0),
            epoch: AtomicU64::new(0),
            flow_cache: opts.flow_cache,
        })
    }

    /// Replace the configuration. Workers pick it up on their next frame;
    /// a frame already being processed finishes on the old one. Tracked
    /// connections are kept: a rule change never cuts a tracked flow.
    pub fn publish(&self, mut snapshot: Snapshot) {
        snapshot.adopt_card_meters(&self.snapshot.load());
        snapshot.epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(
            generation = snapshot.generation,
            "switch snapshot published"
        );
        self.snapshot.store(Arc::new(snapshot));
    }

    /// Every (instance, network card) aggregate of the current snapshot
    /// with its allowance counters.
    pub fn card_stats(&self) -> Vec<crate::CardStats> {
        self.snapshot.load().card_stats()
    }

    /// The current configuration.
    pub fn load(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The live counters of a port id (`None` at or above [`MAX_PORTS`]).
    pub fn counters(&self, port: PortId) -> Option<&PortCounters> {
        self.counters.get(port as usize)
    }

    /// A copy of a port's counters (zeros for an id out of range), with
    /// its connection-tracking allowance left from the current snapshot.
    pub fn stats(&self, port: PortId) -> PortStats {
        let mut s = self
            .counters(port)
            .map(PortCounters::stats)
            .unwrap_or_default();
        let cap = self
            .snapshot
            .load()
            .info(port)
            .map_or(0, |i| i.limits.conntrack);
        if cap != 0 {
            s.conntrack_allowance_available = Some(cap.saturating_sub(s.conntrack_tracked));
        }
        s
    }

    /// Zero a port's counters and forget its tracked flows; call it before
    /// a port id is given to another ENI.
    pub fn reset_counters(&self, port: PortId) {
        self.conntrack.forget_port(port, |p| self.untrack(p));
        if let Some(c) = self.counters(port) {
            c.reset();
        }
    }

    /// Give back one tracked connection of `port`'s allowance.
    fn untrack(&self, port: PortId) {
        untrack(&self.counters, port);
    }

    /// Invalidate every expired connection-tracking entry now (the
    /// workers' housekeeping does it a slice at a time). Returns how many.
    pub fn sweep_conntrack(&self) -> usize {
        let now = self.clock.now();
        self.conntrack
            .sweep(0..self.conntrack.capacity(), now, |p| self.untrack(p))
    }

    /// Once per second of the switch clock (whichever worker gets here
    /// first): sweep the next slice of the table, a sixteenth of it (at
    /// most 2 MiB, at least all of a small table), so every expired entry
    /// leaves within about 16 s and its ports' tracked counts drop.
    fn sweep_step(&self, now: u32) {
        let last = self.swept_at.load(Ordering::Relaxed);
        if last == now
            || self
                .swept_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let cap = self.conntrack.capacity();
        let chunk = (cap / 16).clamp(4096, 1 << 16).min(cap);
        let start = self.sweep_next.fetch_add(chunk, Ordering::Relaxed) % cap;
        self.conntrack
            .sweep(start..start + chunk, now, |p| self.untrack(p));
    }

    /// Tracked flows in total and per port id (an entry counts for both of
    /// its ports). Walks the whole table: for metrics, not the packet path.
    pub fn conntrack_census(&self) -> (ConntrackStats, Vec<u64>) {
        let mut per_port = vec![0u64; MAX_PORTS];
        let stats = self.conntrack.census(self.clock.now(), &mut per_port);
        (stats, per_port)
    }

    /// Forget every tracked flow.
    pub fn clear_conntrack(&self) -> usize {
        self.conntrack.clear(|p| self.untrack(p))
    }

    /// Bytes of memory per connection-tracking slot.
    pub const CONNTRACK_SLOT_BYTES: usize = 32;

    /// Write every pending flow-log record now, closed window or not. Hand
    /// over workers' records first ([`SwitchWorker::flush_flow_logs`]).
    pub fn flush_flow_logs(&self) {
        self.flowlog.flush();
    }

    /// Copy what `port` sends and receives into a ring of `capacity`
    /// frames until the returned [`Capture`] is dropped.
    pub fn capture(&self, port: PortId, capacity: usize) -> Result<Capture, CaptureError> {
        self.capture.start(port, capacity)
    }

    /// Seconds on the switch's clock.
    pub fn now(&self) -> u32 {
        self.clock.now()
    }

    /// A per-thread handle for the packet path.
    pub fn worker(self: &Arc<Self>) -> SwitchWorker {
        SwitchWorker {
            switch: Arc::clone(self),
            snapshot: Cache::new(Arc::clone(&self.snapshot)),
            scratch: vec![0u8; SCRATCH_LEN].into_boxed_slice(),
            log: LocalLog::new(&self.flowlog),
            now: self.clock.now(),
            tick: 0,
            tally: Tally::default(),
            hinted: [0; HINTS],
            hint_n: 0,
            run: None,
            fast: self.flow_cache.then(|| Box::new(fast::FastCache::new())),
        }
    }
}

/// The per-thread half of the switch. Not `Sync`: make one per worker.
pub struct SwitchWorker {
    switch: Arc<Switch>,
    snapshot: Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>,
    scratch: Box<[u8]>,
    log: LocalLog,
    /// The switch clock, refreshed every 64 frames and by `housekeeping`.
    now: u32,
    tick: u32,
    tally: Tally,
    /// Addresses of the last frames given to [`SwitchWorker::prefetch`]:
    /// the IPv4 stage skips its own (later, so less useful) bucket
    /// prefetch for them and the hash it costs.
    hinted: [usize; HINTS],
    hint_n: usize,
    fast: Option<Box<fast::FastCache>>,
    /// The flow the cache answered for the last frame, if that frame's
    /// ends are neither metered nor uncounted.
    run: Option<Run>,
}

/// A flow-cache answer the next frame may reuse: a batch's frames mostly
/// come in runs of one flow, and a hit's lookup, tracking refresh and
/// meter and capture checks were most of its cost. It holds while the
/// frames are consecutive on this worker (any other frame ends it), the
/// snapshot and the clock have not moved (so the tracking entry cannot
/// have expired and its refresh would store what it holds), the tracking
/// slot holds the same entry (other workers and clears change that
/// outside this worker), and neither end is being captured.
#[derive(Clone, Copy)]
struct Run {
    key: fast::Key,
    epoch: u64,
    now: u32,
    /// What the cache decided for the frame that started the run.
    d: fast::Decision,
}

/// Frames a worker remembers as hinted (more than a caller looks ahead).
const HINTS: usize = 8;

/// Slots of a worker's [`Tally`]: the ports one batch touches.
const TALLY: usize = 8;

/// A worker's running totals of the counters every frame bumps (tx/rx
/// packets and bytes per port, and full-queue drops). An atomic add is a locked instruction,
/// which waits for the CPU's store buffer to drain; on a worker that has
/// just copied frames into guest memory that wait is long. Inside a batch
/// ([`SwitchWorker::begin_batch`]) the totals are added once at its end;
/// outside one, after every frame, so readers see exact counts.
#[derive(Default)]
struct Tally {
    e: [TallyEntry; TALLY],
    n: usize,
    batching: bool,
    /// The slot the last sender's and the last receiver's counts went to:
    /// a batch's frames mostly share both.
    last: [usize; 2],
    run: RunTally,
}

/// A run's counts, not yet in the tally's slots.
#[derive(Default, Clone, Copy)]
struct RunTally {
    /// Sender and receiver.
    ports: (PortId, PortId),
    tx_p: u64,
    tx_b: u64,
    rx_p: u64,
    rx_b: u64,
    full: u64,
}

#[derive(Default, Clone, Copy)]
struct TallyEntry {
    port: PortId,
    tx_p: u64,
    tx_b: u64,
    rx_p: u64,
    rx_b: u64,
    /// Frames refused by the port's full queue: an overloaded receiver
    /// would otherwise cost a locked add per frame just when the worker
    /// has the least time.
    full: u64,
}

/// Which of [`Tally::last`] a count looks at first.
const SENDER: usize = 0;
const RECEIVER: usize = 1;

impl Tally {
    #[inline]
    fn entry(&mut self, port: PortId, side: usize, counters: &[PortCounters]) -> &mut TallyEntry {
        let hint = self.last[side & 1];
        let i = if hint < self.n && self.e[hint % TALLY].port == port {
            hint
        } else {
            match self.e[..self.n].iter().position(|t| t.port == port) {
                Some(i) => i,
                None => {
                    if self.n == TALLY {
                        self.flush(counters);
                    }
                    self.e[self.n] = TallyEntry {
                        port,
                        ..Default::default()
                    };
                    self.n += 1;
                    self.n - 1
                }
            }
        };
        self.last[side & 1] = i;
        &mut self.e[i % TALLY]
    }

    #[inline]
    fn tx(&mut self, port: PortId, bytes: usize, counters: &[PortCounters]) {
        let t = self.entry(port, SENDER, counters);
        t.tx_p += 1;
        t.tx_b += bytes as u64;
    }

    #[inline]
    fn rx(&mut self, port: PortId, bytes: usize, counters: &[PortCounters]) {
        let t = self.entry(port, RECEIVER, counters);
        t.rx_p += 1;
        t.rx_b += bytes as u64;
    }

    #[inline]
    fn queue_full(&mut self, port: PortId, counters: &[PortCounters]) {
        self.entry(port, RECEIVER, counters).full += 1;
    }

    /// Frames of a run (see `Run`) are counted here, all on one sender
    /// and one receiver, and folded into the slots when the run ends or
    /// the tally is flushed.
    #[inline]
    fn run_frame(&mut self, bytes: usize, sent: bool) {
        let r = &mut self.run;
        r.tx_p += 1;
        r.tx_b += bytes as u64;
        if sent {
            r.rx_p += 1;
            r.rx_b += bytes as u64;
        } else {
            r.full += 1;
        }
    }

    /// Start counting a run from `tx` to `rx`.
    fn run_start(&mut self, tx: PortId, rx: PortId, counters: &[PortCounters]) {
        self.fold_run(counters);
        self.run.ports = (tx, rx);
    }

    /// Move the run's counts into the slots.
    fn fold_run(&mut self, counters: &[PortCounters]) {
        if self.run.tx_p == 0 {
            return;
        }
        // Taken out first: a full tally flushes, and a flush folds.
        let r = std::mem::take(&mut self.run);
        self.run.ports = r.ports;
        let t = self.entry(r.ports.0, SENDER, counters);
        t.tx_p += r.tx_p;
        t.tx_b += r.tx_b;
        let t = self.entry(r.ports.1, RECEIVER, counters);
        t.rx_p += r.rx_p;
        t.rx_b += r.rx_b;
        t.full += r.full;
    }

    fn flush(&mut self, counters: &[PortCounters]) {
        self.fold_run(counters);
        for t in &self.e[..self.n] {
            if let Some(c) = counters.get(t.port as usize) {
                c.add_totals(t.tx_p, t.tx_b, t.rx_p, t.rx_b, t.full);
            }
        }
        self.n = 0;
    }
}

impl Drop for SwitchWorker {
    fn drop(&mut self) {
        self.tally.flush(&self.switch.counters);
    }
}

impl fmt::Debug for SwitchWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwitchWorker").finish_non_exhaustive()
    }
}

/// Per-worker mutable state the stages share.
pub(crate) struct Work<'a> {
    pub scratch: &'a mut [u8],
    pub log: &'a mut LocalLog,
    pub now: u32,
    pub unix: u64,
    pub conntrack: &'a Conntrack,
    pub counters: &'a [PortCounters],
    /// The caller prefetched this frame's buckets ([`SwitchWorker::prefetch`]).
    pub hinted: bool,
    /// Set by [`ipv4::admit`]: whether what it decided may be cached, and
    /// the tracking entry it rests on.
    pub cacheable: Cacheable,
    /// Set by the IPv4 stage for a forward the flow cache may remember.
    pub learned: Option<fast::Decision>,
}

/// What [`ipv4::admit`] says of a decision it took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cacheable {
    No,
    /// Admitted without a tracking entry (no end filtered).
    Untracked,
    /// Admitted by an existing tracking entry: (slot, control word, flags
    /// a packet of this direction adds).
    Tracked(usize, u64, u32),
}

impl SwitchWorker {
    /// The snapshot this worker uses for its next frame (refreshed if a new
    /// one was published).
    pub fn snapshot(&mut self) -> &Arc<Snapshot> {
        self.snapshot.load()
    }

    /// The switch this worker belongs to.
    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    /// Frames this worker's flow cache decided (0 without one).
    pub fn flow_cache_hits(&self) -> u64 {
        self.fast.as_ref().map_or(0, |c| c.hits)
    }

    /// Call when idle (at least once a second): refreshes the clock and
    /// hands aggregated flow-log records to the writer.
    pub fn housekeeping(&mut self) {
        self.tally.flush(&self.switch.counters);
        self.now = self.switch.clock.now();
        self.switch.sweep_step(self.now);
        let unix = self.switch.clock.unix(self.now);
        self.log.handoff(unix, false);
    }

    /// Hand every aggregated flow-log record to the writer now.
    pub fn flush_flow_logs(&mut self) {
        self.now = self.switch.clock.now();
        let unix = self.switch.clock.unix(self.now);
        self.log.handoff(unix, true);
    }

    /// Hint that `frame`, transmitted by the guest behind `ingress`, will go
    /// through [`process`](Self::process) soon: starts loading the
    /// connection-tracking entry its flow would use, so that lookup does not
    /// wait on memory. Call it a few frames ahead when a burst is at hand
    /// (a virtqueue's available ring); with a table of millions of flows it
    /// hides most of a cache miss per frame. Changes nothing and never
    /// panics; a frame it cannot parse is ignored.
    #[inline]
    pub fn prefetch(&mut self, ingress: PortId, frame: &[u8]) {
        if self.fast.as_ref().is_some_and(|c| c.confident()) {
            return;
        }
        let Ok(eth) = ethernet::Frame::new_checked(frame) else {
            return;
        };
        if eth.ethertype() != ethertype::IPV4 {
            return;
        }
        let cached = match (&self.fast, fast::Key::of(ingress, frame)) {
            (Some(c), Some(key)) => {
                let epoch = self.snapshot.load().epoch;
                c.prefetch(&key, epoch, &self.switch.conntrack)
            }
            _ => false,
        };
        if !cached {
            let Ok(ip) = crate::wire::ipv4::Packet::new_checked(eth.payload()) else {
                return;
            };
            let flow = ipv4::Flow::of(&ip, &PacketMeta::default());
            self.switch
                .conntrack
                .prefetch(&flow.tuple(ingress, ingress));
        }
        self.hinted[self.hint_n % HINTS] = frame.as_ptr() as usize;
        self.hint_n = self.hint_n.wrapping_add(1);
    }

    /// Decide what to do with one Ethernet frame (no virtio header) that the
    /// guest behind `ingress` transmitted, and emit whatever must leave.
    ///
    /// The frame may be rewritten in place (MAC addresses, Elastic IP
    /// translation, an echo request turned into its reply). Never panics and
    /// takes no lock; allocates only to aggregate flow-log records. Counts
    /// the frame as `tx` on `ingress`; a drop under the returned reason on
    /// the port whose policy refused it (the ingress port, or the
    /// destination for its own ingress rules and checks), except
    /// `QueueFull`, counted on the port whose queue refused the frame; and
    /// `rx` on every port that accepted a frame.
    pub fn process<E: Egress + ?Sized>(
        &mut self,
        ingress: PortId,
        frame: &mut [u8],
        meta: &PacketMeta,
        out: &mut E,
    ) -> Verdict {
        let v = match self.run_step(ingress, frame, meta, out) {
            Ok(v) => v,
            Err(key) => self.process_frame(ingress, frame, meta, out, key),
        };
        if !self.tally.batching {
            self.tally.flush(&self.switch.counters);
        }
        v
    }

    /// Frames processed until [`end_batch`](Self::end_batch) add their
    /// tx/rx packet and byte counts and their `QueueFull` drops to the
    /// shared counters once, at the end, instead of per frame. Other drops
    /// and allowances are still counted at once.
    pub fn begin_batch(&mut self) {
        self.tally.batching = true;
    }

    /// Add the batch's counts to the shared counters.
    pub fn end_batch(&mut self) {
        self.tally.batching = false;
        self.tally.flush(&self.switch.counters);
    }

    /// The frame's step of the current run (see `Run`), or its flow-cache
    /// key (if it has one) for [`process_frame`](Self::process_frame).
    /// Small and inline: a run's frames pay for nothing else.
    #[inline]
    fn run_step<E: Egress + ?Sized>(
        &mut self,
        ingress: PortId,
        frame: &mut [u8],
        meta: &PacketMeta,
        out: &mut E,
    ) -> Result<Verdict, Option<fast::Key>> {
        self.tick = self.tick.wrapping_add(1);
        if self.tick & 63 == 0 || self.switch.clock.manual.is_some() {
            self.now = self.switch.clock.now();
            if self.tick & 63 == 0 && !self.log.is_empty() {
                let unix = self.switch.clock.unix(self.now);
                self.log.handoff(unix, false);
            }
        }
        let SwitchWorker {
            switch,
            now,
            tally,
            fast,
            run,
            ..
        } = self;
        let key = match fast {
            Some(_) => fast::Key::of(ingress, frame),
            None => None,
        };
        // The frame before was of this flow and the cache answered it, and
        // nothing it rested on has moved since: its decision stands, with
        // no lookup (see `Run`).
        if let (Some(r), Some(k), Some(cache)) = (run.as_ref(), key.as_ref(), fast.as_mut()) {
            let capture: &CaptureTable = &switch.capture;
            // The epoch counter moves before a snapshot is stored, so a
            // publish ends the run without a load of the snapshot itself.
            let d = &r.d;
            if r.key == *k
                && r.epoch == switch.epoch.load(Ordering::Relaxed)
                && r.now == *now
                && d.ct
                    .is_none_or(|(idx, ctl, _)| switch.conntrack.holds(idx, ctl))
                && capture.watching(ingress) == 0
                && capture.watching(d.dest) == 0
            {
                cache.hit_again();
                d.rewrite(frame);
                let sent = out.emit(d.dest, d.hash, frame, meta);
                tally.run_frame(frame.len(), sent);
                return Ok(if sent {
                    Verdict::Forwarded(d.dest)
                } else {
                    Verdict::Dropped(DropReason::QueueFull)
                });
            }
        }
        Err(key)
    }

    /// Everything but a run's step: the flow cache, then the full path.
    #[inline(never)]
    fn process_frame<E: Egress + ?Sized>(
        &mut self,
        ingress: PortId,
        frame: &mut [u8],
        meta: &PacketMeta,
        out: &mut E,
        key: Option<fast::Key>,
    ) -> Verdict {
        let SwitchWorker {
            switch,
            snapshot,
            scratch,
            log,
            now,
            tally,
            fast,
            hinted,
            run,
            ..
        } = self;
        let snap: &Snapshot = snapshot.load();
        let counters: &[PortCounters] = &switch.counters;
        let capture: &CaptureTable = &switch.capture;
        *run = None;
        let ingress_counters = counters.get(ingress as usize);
        let clock = MeterClock::default();
        if let Some(c) = ingress_counters {
            tally.tx(ingress, frame.len(), counters);
            // The sender's allowances (its own, then its card's), before
            // any work is spent on it.
            if let Some(info) = snap.info(ingress).filter(|i| i.metered) {
                let packets = wire_packets(frame.len(), meta.gso.map(|g| g.size));
                if !c.allow(&info.limits, true, packets, frame.len(), &clock)
                    || !snap.card_allows(info, true, packets, frame.len(), &clock)
                {
                    c.count_drop(DropReason::RateLimit);
                    return Verdict::Dropped(DropReason::RateLimit);
                }
            }
        }
        let watching = capture.watching(ingress);
        if watching != 0 {
            capture.record(watching, ingress, Direction::FromGuest, frame);
        }
        let mut tx = Tx {
            out,
            counters,
            snap,
            capture,
            clock: &clock,
            tally,
        };
        // The flow cache: a frame of a flow decided before under this
        // snapshot goes straight to its destination.
        let mut key = match (fast, key) {
            (Some(cache), Some(k)) => Some((&mut **cache, k)),
            _ => None,
        };
        if let Some((cache, k)) = &mut key {
            if let Some(d) = cache.get(k, snap.epoch, &switch.conntrack, *now) {
                d.rewrite(frame);
                let sent = tx.send(d.dest, d.hash, frame, meta);
                // The next frame may take the same way if both ends are
                // counted and neither is metered (allowances are charged
                // per frame, by the full send).
                let plain = |p: PortId| {
                    (p as usize) < counters.len() && snap.info(p).is_some_and(|i| !i.metered)
                };
                if plain(ingress) && plain(d.dest) {
                    tx.tally.run_start(ingress, d.dest, counters);
                    *run = Some(Run {
                        key: *k,
                        epoch: snap.epoch,
                        now: *now,
                        d,
                    });
                }
                return if sent {
                    Verdict::Forwarded(d.dest)
                } else {
                    Verdict::Dropped(DropReason::QueueFull)
                };
            }
        }
        // A hinted frame's buckets are on their way already. The entry is
        // cleared: a buffer is reused for other frames. (A hint is only a
        // hint: a frame the cache answered may leave its entry behind.)
        let at = frame.as_ptr() as usize;
        let hinted = match hinted.iter_mut().find(|h| **h == at) {
            Some(h) => {
                *h = 0;
                true
            }
            None => false,
        };
        let work = Work {
            scratch,
            log,
            now: *now,
            unix: switch.clock.unix(*now),
            conntrack: &switch.conntrack,
            counters,
            hinted,
            cacheable: Cacheable::No,
            learned: None,
        };
        decide(snap, ingress, frame, meta, work, tx, key)
    }
}

/// The full path of [`SwitchWorker::process`] for a frame the flow cache
/// did not answer: the policy stages, then what the cache learns. Out of
/// line, so the cache's hits do not pay for the registers it saves.
#[inline(never)]
fn decide<E: Egress + ?Sized>(
    snap: &Snapshot,
    ingress: PortId,
    frame: &mut [u8],
    meta: &PacketMeta,
    mut work: Work<'_>,
    mut tx: Tx<'_, E>,
    key: Option<(&mut fast::FastCache, fast::Key)>,
) -> Verdict {
    let counters = work.counters;
    let blame = Cell::new(None);
    let verdict = if snap.uplink.is_some_and(|u| u.port == ingress) {
        uplink::handle(snap, &blame, frame, meta, &mut work, &mut tx)
    } else if snap.metadata.is_some_and(|m| m.port == ingress) {
        metadata::handle(snap, frame, meta, &mut work, &mut tx)
    } else {
        match Ctx::new(snap, counters, ingress, &blame) {
            Some(ctx) => ctx.dispatch(frame, meta, &mut work, &mut tx),
            None => Verdict::Dropped(DropReason::PortDown),
        }
    };

    if let (Some((cache, k)), Some(d)) = (key, work.learned) {
        cache.learn(k, snap.epoch, &d);
    }
    if let Verdict::Dropped(reason) = verdict {
        if reason != DropReason::QueueFull {
            let at = blame.get().unwrap_or(ingress);
            if let Some(c) = counters.get(at as usize) {
                c.count_drop(reason);
            }
        }
        tracing::trace!(ingress, reason = reason.as_str(), "switch drop");
    }
    verdict
}

/// Give back one tracked connection of `port`'s allowance.
pub(crate) fn untrack(counters: &[PortCounters], port: PortId) {
    if let Some(c) = counters.get(port as usize) {
        c.untrack();
    }
}

/// What the stages know about the ingress port.
pub(crate) struct Ctx<'a> {
    snap: &'a Snapshot,
    counters: &'a [PortCounters],
    ingress: PortId,
    port: &'a PortConfig,
    info: &'a PortInfo,
    subnet: &'a SubnetConfig,
    vpc: u32,
    /// The port a drop is counted on, when it is not the ingress port.
    blame: &'a Cell<Option<PortId>>,
}

impl<'a> Ctx<'a> {
    fn new(
        snap: &'a Snapshot,
        counters: &'a [PortCounters],
        ingress: PortId,
        blame: &'a Cell<Option<PortId>>,
    ) -> Option<Self> {
        let port = snap.port(ingress)?;
        let subnet = snap.subnet(port.subnet)?;
        let vpc = snap.vpc_of_subnet(port.subnet)?;
        let info = snap.info(ingress)?;
        Some(Ctx {
            snap,
            counters,
            ingress,
            port,
            info,
            subnet,
            vpc,
            blame,
        })
    }

    fn counters(&self, port: PortId) -> Option<&'a PortCounters> {
        self.counters.get(port as usize)
    }

    fn dispatch<E: Egress + ?Sized>(
        &self,
        frame: &mut [u8],
        meta: &PacketMeta,
        work: &mut Work<'_>,
        tx: &mut Tx<'_, E>,
    ) -> Verdict {
        let Ok(eth) = ethernet::Frame::new_checked(&*frame) else {
            return Verdict::Dropped(DropReason::Malformed);
        };
        if eth.src() != self.port.mac {
            return Verdict::Dropped(DropReason::SpoofedMac);
        }
        match eth.ethertype() {
            ethertype::ARP => arp::handle(self, &eth, work.scratch, tx),
            ethertype::IPV4 => ipv4::handle(self, frame, meta, work, tx),
            // IPv6 is not forwarded yet; guests mostly send ND/MLD multicast.
            ethertype::IPV6 => Verdict::Dropped(DropReason::Broadcast),
            _ if ethernet::is_group(&eth.dst()) => Verdict::Dropped(DropReason::Broadcast),
            _ => Verdict::Dropped(DropReason::Unsupported),
        }
    }
}

/// The egress side: emits and counts what was emitted.
pub(crate) struct Tx<'a, E: Egress + ?Sized> {
    out: &'a mut E,
    counters: &'a [PortCounters],
    snap: &'a Snapshot,
    capture: &'a CaptureTable,
    /// The frame's meter clock, shared with the sender's checks.
    clock: &'a MeterClock,
    tally: &'a mut Tally,
}

impl<E: Egress + ?Sized> Tx<'_, E> {
    /// Emit one frame; counts `rx` on `port`, or `QueueFull` if refused.
    /// A frame over the receiver's allowances is dropped here (counted as
    /// `RateLimit` on it) and reported as not sent.
    fn send(&mut self, port: PortId, flow_hash: u32, frame: &[u8], meta: &PacketMeta) -> bool {
        if let (Some(c), Some(info)) = (
            self.counters.get(port as usize),
            self.snap.info(port).filter(|i| i.metered),
        ) {
            let packets = wire_packets(frame.len(), meta.gso.map(|g| g.size));
            if !c.allow(&info.limits, false, packets, frame.len(), self.clock)
                || !self
                    .snap
                    .card_allows(info, false, packets, frame.len(), self.clock)
            {
                c.count_drop(DropReason::RateLimit);
                return false;
            }
        }
        let ok = self.out.emit(port, flow_hash, frame, meta);
        if (port as usize) < self.counters.len() {
            if ok {
                self.tally.rx(port, frame.len(), self.counters);
                let watching = self.capture.watching(port);
                if watching != 0 {
                    self.capture
                        .record(watching, port, Direction::ToGuest, frame);
                }
            } else {
                self.tally.queue_full(port, self.counters);
            }
        }
        ok
    }
}

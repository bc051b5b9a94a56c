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
//!   echo replies from the .1 router.

mod arp;
mod dhcp;
mod flow;
mod ipv4;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use arc_swap::{ArcSwap, Cache};

use crate::config::{PortConfig, Snapshot, SubnetConfig};
use crate::counters::{DropReason, PortCounters, PortStats};
use crate::wire::ethernet::{self, ethertype};
use crate::{Egress, PacketMeta, PortId, Verdict, MAX_PORTS};

pub use flow::flow_hash;

/// Size of a worker's reply buffer: more than the largest reply (a DHCP
/// message is 342 bytes, an ARP reply 42).
const SCRATCH_LEN: usize = 1024;

/// The shared half of the switch: the published snapshot and the counters.
pub struct Switch {
    snapshot: Arc<ArcSwap<Snapshot>>,
    counters: Box<[PortCounters]>,
}

impl fmt::Debug for Switch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Switch")
            .field("generation", &self.snapshot.load().generation)
            .finish_non_exhaustive()
    }
}

impl Switch {
    /// A switch with an empty snapshot (generation 0, no ports) and
    /// [`MAX_PORTS`] zeroed counter blocks.
    pub fn new() -> Arc<Switch> {
        let counters = (0..MAX_PORTS).map(|_| PortCounters::default()).collect();
        Arc::new(Switch {
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            counters,
        })
    }

    /// Replace the configuration. Workers pick it up on their next frame;
    /// a frame already being processed finishes on the old one.
    pub fn publish(&self, snapshot: Snapshot) {
        tracing::debug!(
            generation = snapshot.generation,
            "switch snapshot published"
        );
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The current configuration.
    pub fn load(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The live counters of a port id (`None` at or above [`MAX_PORTS`]).
    pub fn counters(&self, port: PortId) -> Option<&PortCounters> {
        self.counters.get(port as usize)
    }

    /// A copy of a port's counters (zeros for an id out of range).
    pub fn stats(&self, port: PortId) -> PortStats {
        self.counters(port)
            .map(PortCounters::stats)
            .unwrap_or_default()
    }

    /// Zero a port's counters; call it before a port id is reused.
    pub fn reset_counters(&self, port: PortId) {
        if let Some(c) = self.counters(port) {
            c.reset();
        }
    }

    /// A per-thread handle for the packet path.
    pub fn worker(self: &Arc<Self>) -> SwitchWorker {
        SwitchWorker {
            switch: Arc::clone(self),
            snapshot: Cache::new(Arc::clone(&self.snapshot)),
            scratch: vec![0u8; SCRATCH_LEN].into_boxed_slice(),
        }
    }
}

/// The per-thread half of the switch. Not `Sync`: make one per worker.
pub struct SwitchWorker {
    switch: Arc<Switch>,
    snapshot: Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>,
    scratch: Box<[u8]>,
}

impl fmt::Debug for SwitchWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwitchWorker").finish_non_exhaustive()
    }
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

    /// Decide what to do with one Ethernet frame (no virtio header) that the
    /// guest behind `ingress` transmitted, and emit whatever must leave.
    ///
    /// The frame may be rewritten in place (MAC addresses; an echo request
    /// turned into its reply). Never panics, takes no lock and does not
    /// allocate. Counts the frame as `tx` on `ingress`, a drop under the
    /// returned reason on `ingress` (except `QueueFull`, counted on the port
    /// whose queue refused the frame), and `rx` on every port that accepted
    /// a frame.
    pub fn process<E: Egress + ?Sized>(
        &mut self,
        ingress: PortId,
        frame: &mut [u8],
        meta: &PacketMeta,
        out: &mut E,
    ) -> Verdict {
        let SwitchWorker {
            switch,
            snapshot,
            scratch,
        } = self;
        let snap: &Snapshot = snapshot.load();
        let counters: &[PortCounters] = &switch.counters;
        let ingress_counters = counters.get(ingress as usize);
        if let Some(c) = ingress_counters {
            c.add_tx(frame.len());
        }

        let verdict = match Ctx::new(snap, counters, ingress) {
            Some(ctx) => {
                let mut tx = Tx { out, counters };
                ctx.dispatch(frame, meta, scratch, &mut tx)
            }
            None => Verdict::Dropped(DropReason::PortDown),
        };

        if let (Verdict::Dropped(reason), Some(c)) = (verdict, ingress_counters) {
            if reason != DropReason::QueueFull {
                c.count_drop(reason);
            }
            tracing::trace!(ingress, reason = reason.as_str(), "switch drop");
        }
        verdict
    }
}

/// What the stages know about the ingress port.
struct Ctx<'a> {
    snap: &'a Snapshot,
    counters: &'a [PortCounters],
    ingress: PortId,
    port: &'a PortConfig,
    subnet: &'a SubnetConfig,
    vpc: u32,
}

impl<'a> Ctx<'a> {
    fn new(snap: &'a Snapshot, counters: &'a [PortCounters], ingress: PortId) -> Option<Self> {
        let port = snap.port(ingress)?;
        let subnet = snap.subnet(port.subnet)?;
        let vpc = snap.vpc_of_subnet(port.subnet)?;
        Some(Ctx {
            snap,
            counters,
            ingress,
            port,
            subnet,
            vpc,
        })
    }

    fn counters(&self, port: PortId) -> Option<&'a PortCounters> {
        self.counters.get(port as usize)
    }

    fn dispatch<E: Egress + ?Sized>(
        &self,
        frame: &mut [u8],
        meta: &PacketMeta,
        scratch: &mut [u8],
        tx: &mut Tx<'_, E>,
    ) -> Verdict {
        let Ok(eth) = ethernet::Frame::new_checked(&*frame) else {
            return Verdict::Dropped(DropReason::Malformed);
        };
        match eth.ethertype() {
            ethertype::ARP => arp::handle(self, &eth, scratch, tx),
            ethertype::IPV4 => ipv4::handle(self, frame, meta, scratch, tx),
            // IPv6 is not forwarded yet; guests mostly send ND/MLD multicast.
            ethertype::IPV6 => Verdict::Dropped(DropReason::Broadcast),
            _ if ethernet::is_group(&eth.dst()) => Verdict::Dropped(DropReason::Broadcast),
            _ => Verdict::Dropped(DropReason::Unsupported),
        }
    }
}

/// The egress side: emits and counts what was emitted.
struct Tx<'a, E: Egress + ?Sized> {
    out: &'a mut E,
    counters: &'a [PortCounters],
}

impl<E: Egress + ?Sized> Tx<'_, E> {
    /// Emit one frame; counts `rx` on `port`, or `QueueFull` if refused.
    fn send(&mut self, port: PortId, flow_hash: u32, frame: &[u8], meta: &PacketMeta) -> bool {
        let ok = self.out.emit(port, flow_hash, frame, meta);
        if let Some(c) = self.counters.get(port as usize) {
            if ok {
                c.add_rx(frame.len());
            } else {
                c.count_drop(DropReason::QueueFull);
            }
        }
        ok
    }
}

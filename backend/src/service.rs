//! Service ports: switch ports served by in-process workers instead of a
//! guest. The hyperplane (NAT gateways, load balancers) is one: each of its
//! nodes is a *lane*, every service port has one queue per lane, and the
//! service's [`Steer`] picks the lane from the frame, so both directions of
//! a flow reach the node that holds its state.
//!
//! A lane's worker drains its queue of every service port, hands each frame
//! (offloads completed, super-packets segmented: a middlebox rewrites
//! headers and needs whole checksums) to its handler, and sends what the
//! handler emits into the switch as if the service port had transmitted it.
//! The backend knows nothing of what the service does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use enilab_switch::{GsoKind, PacketMeta, PortId, Switch, SwitchWorker, Verdict, MAX_PORTS};

use crate::net::offload;
use crate::port::{Pkt, Pool, PortEgress, PortHandle, PortTable, Waker};

/// Errors of service ports.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("a service needs between 1 and 32 lanes, not {0}")]
    Lanes(usize),
    #[error("port {0} is out of range")]
    PortRange(PortId),
    #[error("port {0} is already served")]
    PortInUse(PortId),
    #[error("lane {0} does not exist")]
    NoLane(usize),
    #[error("cannot create a wake-up eventfd")]
    Io(#[source] std::io::Error),
}

/// Chooses the lane for a frame sent to a service port. Called on the
/// sending worker's packet path: it must be quick and take no lock.
pub trait Steer: Send + Sync {
    /// The lane for this frame, or `None` to drop it.
    fn steer(&self, port: PortId, frame: &[u8]) -> Option<usize>;
}

/// Counters of one lane.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LaneStats {
    /// Frames taken from the lane's queues and handed to its handler.
    pub received: u64,
    /// Frames the handler sent into the switch.
    pub sent: u64,
    /// Of those, dropped by the switch.
    pub send_dropped: u64,
    /// Frames whose offloads could not be completed (dropped).
    pub offload_errors: u64,
}

#[derive(Default)]
struct LaneCounters {
    received: AtomicU64,
    sent: AtomicU64,
    send_dropped: AtomicU64,
    offload_errors: AtomicU64,
}

/// The lanes of one service and the ports it serves.
pub struct ServiceLanes {
    wakers: Vec<Arc<Waker>>,
    counters: Vec<LaneCounters>,
    steer: Arc<dyn Steer>,
    served: ArcSwap<Vec<Arc<PortHandle>>>,
    writer: Mutex<()>,
    switch: Arc<Switch>,
    ports: Arc<PortTable>,
    pool: Arc<Pool>,
}

impl ServiceLanes {
    pub(crate) fn new(
        lanes: usize,
        steer: Arc<dyn Steer>,
        switch: Arc<Switch>,
        ports: Arc<PortTable>,
        pool: Arc<Pool>,
    ) -> Result<Arc<Self>, ServiceError> {
        if !(1..=32).contains(&lanes) {
            return Err(ServiceError::Lanes(lanes));
        }
        let wakers = (0..lanes)
            .map(|_| Waker::new().map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ServiceError::Io)?;
        Ok(Arc::new(ServiceLanes {
            counters: (0..lanes).map(|_| LaneCounters::default()).collect(),
            wakers,
            steer,
            served: ArcSwap::from_pointee(Vec::new()),
            writer: Mutex::new(()),
            switch,
            ports,
            pool,
        }))
    }

    pub fn lanes(&self) -> usize {
        self.wakers.len()
    }

    /// Serve switch port `port`: frames the switch sends to it are steered
    /// to the lanes.
    pub fn add_port(&self, port: PortId) -> Result<(), ServiceError> {
        if port as usize >= MAX_PORTS {
            return Err(ServiceError::PortRange(port));
        }
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if self.ports.get(port).is_some() {
            return Err(ServiceError::PortInUse(port));
        }
        let mut handle = PortHandle::new(port, &self.wakers);
        handle.steer = Some(self.steer.clone());
        let all = if self.wakers.len() >= 32 {
            u32::MAX
        } else {
            (1u32 << self.wakers.len()) - 1
        };
        handle.enabled_rx.store(all, Ordering::Release);
        let handle = Arc::new(handle);
        let mut served: Vec<_> = (**self.served.load()).clone();
        served.push(handle.clone());
        self.served.store(Arc::new(served));
        self.ports.insert(handle);
        Ok(())
    }

    /// Stop serving `port`; frames still queued for it are dropped.
    pub fn remove_port(&self, port: PortId) {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut served: Vec<_> = (**self.served.load()).clone();
        let before = served.len();
        served.retain(|h| h.port != port);
        if served.len() == before {
            return;
        }
        self.served.store(Arc::new(served));
        if self
            .ports
            .get(port)
            .is_some_and(|h| h.steer.as_ref().is_some_and(|s| same(s, &self.steer)))
        {
            self.ports.remove(port);
        }
    }

    /// The ports served, in the order they were added.
    pub fn served(&self) -> Vec<PortId> {
        self.served.load().iter().map(|h| h.port).collect()
    }

    /// The worker state for lane `lane`: whoever runs the lane owns it.
    pub fn worker(self: &Arc<Self>, lane: usize) -> Result<ServiceWorker, ServiceError> {
        if lane >= self.wakers.len() {
            return Err(ServiceError::NoLane(lane));
        }
        Ok(ServiceWorker {
            lanes: self.clone(),
            lane,
            switch: self.switch.worker(),
            scratch: Vec::new(),
            seg: Vec::new(),
        })
    }

    pub fn stats(&self, lane: usize) -> LaneStats {
        self.counters
            .get(lane)
            .map(|c| LaneStats {
                received: c.received.load(Ordering::Relaxed),
                sent: c.sent.load(Ordering::Relaxed),
                send_dropped: c.send_dropped.load(Ordering::Relaxed),
                offload_errors: c.offload_errors.load(Ordering::Relaxed),
            })
            .unwrap_or_default()
    }

    /// Wake lane `lane`'s worker (to stop it, or to have it look at timers).
    pub fn wake(&self, lane: usize) {
        if let Some(w) = self.wakers.get(lane) {
            w.wake();
        }
    }
}

impl Drop for ServiceLanes {
    fn drop(&mut self) {
        for h in self.served.load().iter() {
            self.ports.remove(h.port);
        }
    }
}

fn same(a: &Arc<dyn Steer>, b: &Arc<dyn Steer>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// Sends frames into the switch as if a service port had transmitted them.
pub struct Emitter<'a> {
    switch: &'a mut SwitchWorker,
    egress: PortEgress<'a>,
    scratch: &'a mut Vec<u8>,
    counters: &'a LaneCounters,
}

impl Emitter<'_> {
    /// Run `frame` through the switch as received on `ingress`. False if
    /// the switch dropped it.
    pub fn send(&mut self, ingress: PortId, frame: &[u8]) -> bool {
        self.scratch.clear();
        self.scratch.extend_from_slice(frame);
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        match self.switch.process(
            ingress,
            self.scratch,
            &PacketMeta::default(),
            &mut self.egress,
        ) {
            Verdict::Dropped(_) => {
                self.counters.send_dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
            Verdict::Forwarded(_) | Verdict::Replied => true,
        }
    }
}

/// One lane's worker state.
pub struct ServiceWorker {
    lanes: Arc<ServiceLanes>,
    lane: usize,
    switch: SwitchWorker,
    scratch: Vec<u8>,
    seg: Vec<u8>,
}

impl ServiceWorker {
    pub fn lane(&self) -> usize {
        self.lane
    }

    /// Block until frames or a wake-up arrive, or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        let w = &self.lanes.wakers[self.lane];
        let mut pfd = libc::pollfd {
            fd: w.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and
        // nfds is 1.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        w.consume();
    }

    /// Hand up to `max` queued frames to `handle`, with an [`Emitter`] for
    /// what it sends. Returns the number of frames handled.
    pub fn poll(
        &mut self,
        max: usize,
        handle: &mut dyn FnMut(PortId, &[u8], &mut Emitter<'_>),
    ) -> usize {
        let ServiceWorker {
            lanes,
            lane,
            switch,
            scratch,
            seg,
        } = self;
        let counters = &lanes.counters[*lane];
        let mut em = Emitter {
            switch,
            egress: PortEgress::new(&lanes.ports, &lanes.pool),
            scratch,
            counters,
        };
        let served = lanes.served.load();
        let mut n = 0;
        'ports: for h in served.iter() {
            let Some(q) = h.rxq.get(*lane) else { continue };
            while n < max {
                let Some(pkt) = q.ring.pop() else {
                    continue 'ports;
                };
                n += 1;
                counters.received.fetch_add(1, Ordering::Relaxed);
                deliver(h.port, pkt, seg, &lanes.pool, counters, &mut em, handle);
            }
            break;
        }
        em.egress.wake_all();
        n
    }

    /// Give `f` an [`Emitter`] outside of any received frame (timers,
    /// health checks, replication).
    pub fn emit(&mut self, f: &mut dyn FnMut(&mut Emitter<'_>)) {
        let lanes = &self.lanes;
        let mut em = Emitter {
            switch: &mut self.switch,
            egress: PortEgress::new(&lanes.ports, &lanes.pool),
            scratch: &mut self.scratch,
            counters: &lanes.counters[self.lane],
        };
        f(&mut em);
        em.egress.wake_all();
    }

    /// Drop every frame queued for this lane (a stopped node's backlog:
    /// the hyperplane does not buffer, TCP retransmits).
    pub fn discard(&mut self) -> usize {
        let mut n = 0;
        for h in self.lanes.served.load().iter() {
            if let Some(q) = h.rxq.get(self.lane) {
                while let Some(p) = q.ring.pop() {
                    self.lanes.pool.put(p.buf);
                    n += 1;
                }
            }
        }
        n
    }

    /// Let the switch expire its per-worker state.
    pub fn housekeeping(&mut self) {
        self.switch.housekeeping();
    }
}

/// Complete the frame's offloads, then hand it (or its segments) over.
fn deliver(
    port: PortId,
    mut pkt: Pkt,
    seg: &mut Vec<u8>,
    pool: &Pool,
    counters: &LaneCounters,
    em: &mut Emitter<'_>,
    handle: &mut dyn FnMut(PortId, &[u8], &mut Emitter<'_>),
) {
    let ok = if let Some(gso) = pkt.meta.gso {
        gso.kind != GsoKind::Udp
            && offload::segment(&pkt.buf, &gso, seg, |s| handle(port, s, em)).is_ok()
    } else if let Some(csum) = pkt.meta.csum {
        offload::complete_csum(&mut pkt.buf, csum)
            .map(|()| handle(port, &pkt.buf, em))
            .is_ok()
    } else {
        handle(port, &pkt.buf, em);
        true
    };
    if !ok {
        counters.offload_errors.fetch_add(1, Ordering::Relaxed);
    }
    pool.put(pkt.buf);
}

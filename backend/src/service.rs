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
            batch: Vec::new(),
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

/// What [`ServiceWorker::poll_batch`] hands a batch to.
pub type BatchHandler<'h> = dyn FnMut(&[(PortId, &[u8])], &mut Emitter<'_>) + 'h;

/// One lane's worker state.
pub struct ServiceWorker {
    lanes: Arc<ServiceLanes>,
    lane: usize,
    switch: SwitchWorker,
    scratch: Vec<u8>,
    seg: Vec<u8>,
    /// Frames of the batch being handed over (pool buffers).
    batch: Vec<(PortId, Vec<u8>)>,
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
            ..
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
            let Some(mut c) = q.ring.consumer() else {
                continue;
            };
            while n < max {
                let Some(pkt) = c.pop() else {
                    continue 'ports;
                };
                n += 1;
                deliver(h.port, pkt, seg, &lanes.pool, counters, &mut em, handle);
            }
            break;
        }
        if n > 0 {
            counters.received.fetch_add(n as u64, Ordering::Relaxed);
        }
        em.egress.wake_all();
        n
    }

    /// Like [`ServiceWorker::poll`], but hands the frames over as one batch
    /// (up to `max`), so the handler can prefetch its tables across them.
    pub fn poll_batch(&mut self, max: usize, handle: &mut BatchHandler<'_>) -> usize {
        let ServiceWorker {
            lanes,
            lane,
            switch,
            scratch,
            seg,
            batch,
        } = self;
        let counters = &lanes.counters[*lane];
        let pool = &lanes.pool;
        let served = lanes.served.load();
        let mut taken = 0;
        'ports: for h in served.iter() {
            let Some(q) = h.rxq.get(*lane) else { continue };
            let Some(mut c) = q.ring.consumer() else {
                continue;
            };
            while taken < max {
                let Some(mut pkt) = c.pop() else {
                    continue 'ports;
                };
                taken += 1;
                let ok = if let Some(gso) = pkt.meta.gso {
                    let r = gso.kind != GsoKind::Udp
                        && offload::segment(&pkt.buf, &gso, seg, |s| {
                            let mut b = pool.get();
                            b.extend_from_slice(s);
                            batch.push((h.port, b));
                        })
                        .is_ok();
                    pool.put(std::mem::take(&mut pkt.buf));
                    r
                } else if let Some(csum) = pkt.meta.csum {
                    let r = offload::complete_csum(&mut pkt.buf, csum).is_ok();
                    if r {
                        batch.push((h.port, pkt.buf));
                    } else {
                        pool.put(pkt.buf);
                    }
                    r
                } else {
                    batch.push((h.port, pkt.buf));
                    true
                };
                if !ok {
                    counters.offload_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            break;
        }
        if taken > 0 {
            counters.received.fetch_add(taken as u64, Ordering::Relaxed);
        }
        if !batch.is_empty() {
            let mut em = Emitter {
                switch,
                egress: PortEgress::new(&lanes.ports, pool),
                scratch,
                counters,
            };
            let view: Vec<(PortId, &[u8])> =
                batch.iter().map(|(p, b)| (*p, b.as_slice())).collect();
            handle(&view, &mut em);
            drop(view);
            em.egress.wake_all();
            for (_, b) in batch.drain(..) {
                pool.put(b);
            }
        }
        taken
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use enilab_switch::{CsumOffload, PortConfig, Snapshot, SubnetConfig, Topology};
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    use super::*;
    use crate::Datapath;

    const SVC: PortId = 7;
    const ENI: PortId = 2;
    const SVC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x07];
    const ENI_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

    /// Lane = the UDP payload's first byte (None when it is 0xff).
    struct ByPayload;
    impl Steer for ByPayload {
        fn steer(&self, _port: PortId, frame: &[u8]) -> Option<usize> {
            let b = *frame.get(42)?;
            (b != 0xff).then_some(usize::from(b))
        }
    }

    fn udp(src: [u8; 4], dst: [u8; 4], dst_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(SVC_MAC, dst_mac)
            .ipv4(src, dst, 64)
            .udp(4000, 53)
            .write(&mut v, payload)
            .expect("build");
        v
    }

    fn datapath() -> (Datapath, Arc<Waker>) {
        let dp = Datapath::new(Switch::new(), 1);
        let subnet = SubnetConfig {
            id: "subnet-s".into(),
            vpc_id: "vpc-s".into(),
            cidr: (Ipv4Addr::new(10, 3, 0, 0), 24),
            ..Default::default()
        };
        let ports = vec![
            PortConfig {
                id: ENI,
                eni_id: "eni-2".into(),
                mac: ENI_MAC,
                primary_ip: Ipv4Addr::new(10, 3, 0, 20),
                ..Default::default()
            },
            PortConfig {
                id: SVC,
                eni_id: "eni-svc".into(),
                mac: SVC_MAC,
                primary_ip: Ipv4Addr::new(10, 3, 0, 70),
                source_dest_check: false,
                service: Some("nat-1".into()),
                ..Default::default()
            },
        ];
        dp.switch().publish(
            Snapshot::compile(Topology {
                subnets: vec![subnet],
                ports,
                ..Topology::default()
            })
            .expect("snapshot"),
        );
        // The ENI's receiving side, as a card would register it.
        let w = Arc::new(Waker::new().expect("eventfd"));
        let h = PortHandle::new(ENI, std::slice::from_ref(&w));
        h.enabled_rx.store(1, Ordering::Release);
        dp.ports.insert(Arc::new(h));
        (dp, w)
    }

    #[test]
    fn frames_reach_the_steered_lane_and_emitted_frames_the_switch() {
        let (dp, _w) = datapath();
        let lanes = dp.service_lanes(2, Arc::new(ByPayload)).expect("lanes");
        lanes.add_port(SVC).expect("add");
        assert!(matches!(
            lanes.add_port(SVC),
            Err(ServiceError::PortInUse(SVC))
        ));
        assert!(matches!(
            lanes.add_port(ENI),
            Err(ServiceError::PortInUse(ENI))
        ));
        let mut w0 = lanes.worker(0).expect("lane 0");
        let mut w1 = lanes.worker(1).expect("lane 1");
        assert!(lanes.worker(2).is_err());

        assert!(dp.inject(SVC, &udp([10, 3, 0, 20], [1, 1, 1, 1], SVC_MAC, &[1, 9])));
        assert!(dp.inject(SVC, &udp([10, 3, 0, 20], [1, 1, 1, 1], SVC_MAC, &[0, 8])));
        // Steered nowhere: refused at the queue.
        assert!(!dp.inject(SVC, &udp([10, 3, 0, 20], [1, 1, 1, 1], SVC_MAC, &[0xff])));

        let mut seen = Vec::new();
        let n = w1.poll(16, &mut |port, frame, em| {
            seen.push((port, frame[43]));
            // Answer as the service: to the ENI, from the service port.
            let reply = udp(
                [1, 1, 1, 1],
                [10, 3, 0, 20],
                enilab_switch::GATEWAY_MAC,
                b"r",
            );
            assert!(em.send(port, &reply));
        });
        assert_eq!((n, seen), (1, vec![(SVC, 9)]));
        let got = dp.ports.get(ENI).expect("eni").rxq[0]
            .ring
            .pop()
            .expect("reply");
        assert_eq!(&got.buf[0..6], &ENI_MAC);
        let mut other = Vec::new();
        assert_eq!(w0.poll(16, &mut |_, f, _| other.push(f[43])), 1);
        assert_eq!(other, vec![8]);
        assert_eq!(lanes.stats(1).received, 1);
        assert_eq!(lanes.stats(1).sent, 1);

        // Emitting outside a frame, and a frame the switch refuses.
        w0.emit(&mut |em| {
            let bogus = udp([9, 9, 9, 9], [10, 3, 0, 20], SVC_MAC, b"x");
            assert!(!em.send(ENI, &bogus), "source check on the ENI port");
        });
        assert_eq!(lanes.stats(0).send_dropped, 1);

        lanes.remove_port(SVC);
        assert!(dp.ports.get(SVC).is_none());
        assert!(lanes.served().is_empty());
        drop(lanes);
        assert!(dp.ports.get(ENI).is_some(), "other ports stay");
    }

    #[test]
    fn partial_checksums_are_completed_before_the_service_sees_them() {
        let (dp, _w) = datapath();
        let lanes = dp.service_lanes(1, Arc::new(ByPayload)).expect("lanes");
        lanes.add_port(SVC).expect("add");
        let mut w = lanes.worker(0).expect("lane");
        let mut frame = udp([10, 3, 0, 20], [1, 1, 1, 1], SVC_MAC, &[0, 1, 2, 3]);
        // Leave the UDP checksum to the "device": the field holds the
        // pseudo-header sum, as a guest's CHECKSUM_PARTIAL frame does.
        let words = [0x0a03u32, 0x0014, 0x0101, 0x0101, 17, 12];
        let mut sum: u32 = words.iter().sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        frame[40..42].copy_from_slice(&(sum as u16).to_be_bytes());
        let mut pkt = Pkt {
            buf: frame,
            meta: PacketMeta::default(),
        };
        pkt.meta.csum = Some(CsumOffload {
            start: 34,
            offset: 6,
        });
        let h = dp.ports.get(SVC).expect("svc");
        assert!(h.enqueue(0, pkt).is_ok());
        let mut ok = false;
        w.poll(4, &mut |_, f, _| {
            let p = SlicedPacket::from_ethernet(f).expect("parse");
            let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
                panic!("not ipv4")
            };
            let Some(TransportSlice::Udp(u)) = p.transport else {
                panic!("not udp")
            };
            let want = u
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), u.payload())
                .expect("sum");
            ok = u.checksum() == want;
        });
        assert!(ok, "checksum completed");
        assert_eq!(w.discard(), 0);
    }

    #[test]
    fn batches_carry_every_frame_of_the_lane_once() {
        let (dp, _w) = datapath();
        let lanes = dp.service_lanes(2, Arc::new(ByPayload)).expect("lanes");
        lanes.add_port(SVC).expect("add");
        let mut w1 = lanes.worker(1).expect("lane 1");
        for i in 0..5u8 {
            let lane = i % 2;
            assert!(dp.inject(SVC, &udp([10, 3, 0, 20], [1, 1, 1, 1], SVC_MAC, &[lane, i])));
        }
        let mut got = Vec::new();
        let n = w1.poll_batch(2, &mut |frames, _| {
            got.extend(frames.iter().map(|(p, f)| (*p, f[43])));
        });
        assert_eq!(n, 2);
        let n = w1.poll_batch(16, &mut |frames, _| {
            got.extend(frames.iter().map(|(p, f)| (*p, f[43])));
        });
        assert_eq!(n, 0, "lane 1 had two frames");
        assert_eq!(got, vec![(SVC, 1), (SVC, 3)]);
        let mut w0 = lanes.worker(0).expect("lane 0");
        let mut calls = 0;
        assert_eq!(w0.poll_batch(16, &mut |f, _| calls += f.len()), 3);
        assert_eq!(calls, 3);
        assert_eq!(
            w0.poll_batch(16, &mut |_, _| panic!("empty batch handed over")),
            0
        );
    }

    #[test]
    fn bad_lane_counts_are_refused() {
        let (dp, _w) = datapath();
        assert!(matches!(
            dp.service_lanes(0, Arc::new(ByPayload)),
            Err(ServiceError::Lanes(0))
        ));
        assert!(matches!(
            dp.service_lanes(33, Arc::new(ByPayload)),
            Err(ServiceError::Lanes(33))
        ));
    }
}

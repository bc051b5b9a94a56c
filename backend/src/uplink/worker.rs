//! The uplink thread: TAP -> switch, and the port's queue -> TAP.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use enilab_switch::{GsoKind, PacketMeta, PortId, SwitchWorker, Verdict};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::tap::Tap;
use super::{Shared, UplinkCounters};
use crate::net::offload;
use crate::net::{BATCH, MAX_FRAME};
use crate::port::{Pkt, Pool, PortEgress, PortHandle, PortTable};

pub(super) const WAKE_TOKEN: u64 = 0;
pub(super) const TAP_TOKEN: u64 = 1;

/// Frames written to the TAP per pass before looking at the TAP again.
const WRITE_BATCH: usize = BATCH * 4;

pub(super) struct UplinkWorker {
    tap: Tap,
    epoll: Epoll,
    port: PortId,
    shared: Arc<Shared>,
    handle: Arc<PortHandle>,
    switch: SwitchWorker,
    ports: Arc<PortTable>,
    pool: Arc<Pool>,
    /// One frame read from the TAP; as large as any frame we forward, so
    /// the kernel never truncates one.
    read_buf: Box<[u8]>,
    seg_buf: Vec<u8>,
    /// The TAP failed for good; queued frames are dropped and counted.
    gone: bool,
}

impl UplinkWorker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tap: Tap,
        epoll: Epoll,
        port: PortId,
        shared: Arc<Shared>,
        handle: Arc<PortHandle>,
        switch: SwitchWorker,
        ports: Arc<PortTable>,
        pool: Arc<Pool>,
    ) -> Self {
        UplinkWorker {
            tap,
            epoll,
            port,
            shared,
            handle,
            switch,
            ports,
            pool,
            read_buf: vec![0u8; MAX_FRAME].into_boxed_slice(),
            seg_buf: Vec::new(),
            gone: false,
        }
    }

    pub fn run(mut self) {
        let mut events = [EpollEvent::default(); 4];
        // Frames may have been queued before the thread started.
        let mut write_more = true;
        loop {
            let timeout = if write_more { 0 } else { 1000 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => 0,
                Err(e) => {
                    tracing::error!(tap = self.tap.name(), error = %e, "uplink epoll failed");
                    break;
                }
            };
            let mut readable = false;
            for ev in &events[..n] {
                match ev.data() {
                    WAKE_TOKEN => {
                        self.shared.waker.consume();
                        self.counters().wakeups.fetch_add(1, Ordering::Relaxed);
                        write_more = true;
                    }
                    _ => {
                        let set = ev.event_set();
                        if set.contains(EventSet::IN) {
                            readable = true;
                        } else if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                            self.mark_gone("error event");
                        }
                    }
                }
            }
            if self.shared.stop.load(Ordering::Acquire) {
                break;
            }
            if readable && !self.gone {
                // Frames the switch sent back out of the uplink (ARP
                // replies, hairpins) are written in this same pass.
                write_more |= self.read_batch();
            }
            if write_more {
                write_more = self.write_batch();
            }
            self.switch.housekeeping();
        }
        // Frames still queued are dropped with the port.
        while let Some(p) = self.handle.rxq[0].ring.pop() {
            self.pool.put(p.buf);
        }
    }

    fn counters(&self) -> &UplinkCounters {
        &self.shared.counters
    }

    /// Stop watching the TAP: its interface was deleted (or its fd broke),
    /// and a level-triggered error would otherwise spin the loop.
    fn mark_gone(&mut self, why: &str) {
        if self.gone {
            return;
        }
        self.gone = true;
        self.counters().tap_gone.store(true, Ordering::Relaxed);
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.tap.as_raw_fd(),
            EpollEvent::default(),
        );
        tracing::warn!(tap = self.tap.name(), why, "uplink TAP is gone");
    }

    /// Hand up to `BATCH` frames from the TAP to the switch. Returns true if
    /// the switch queued frames for this uplink itself.
    fn read_batch(&mut self) -> bool {
        let UplinkWorker {
            tap,
            port,
            shared,
            switch,
            ports,
            pool,
            read_buf,
            ..
        } = self;
        let c = &shared.counters;
        let mut egress = PortEgress::new(ports, pool);
        let mut fatal = None;
        for _ in 0..BATCH {
            let n = match tap.read(read_buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    c.read_errors.fetch_add(1, Ordering::Relaxed);
                    fatal = Some(e);
                    break;
                }
            };
            let Some(frame) = read_buf.get_mut(..n) else {
                break;
            };
            c.read_packets.fetch_add(1, Ordering::Relaxed);
            c.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
            match switch.process(*port, frame, &PacketMeta::default(), &mut egress) {
                Verdict::Forwarded(_) => c.forwarded.fetch_add(1, Ordering::Relaxed),
                Verdict::Replied => c.replied.fetch_add(1, Ordering::Relaxed),
                Verdict::Dropped(_) => c.dropped.fetch_add(1, Ordering::Relaxed),
            };
        }
        let mine = egress.wake_others(&shared.waker);
        drop(egress);
        if let Some(e) = fatal {
            tracing::debug!(tap = self.tap.name(), error = %e, "uplink read failed");
            self.mark_gone("read failed");
        }
        mine
    }

    /// Write up to `WRITE_BATCH` queued frames to the TAP. Returns true if
    /// more are waiting.
    fn write_batch(&mut self) -> bool {
        for _ in 0..WRITE_BATCH {
            let Some(pkt) = self.handle.rxq[0].ring.pop() else {
                return false;
            };
            self.send(pkt);
        }
        !self.handle.rxq[0].ring.is_empty()
    }

    /// Finish the frame's offloads (a TAP without a vnet header takes only
    /// complete frames) and write it.
    fn send(&mut self, mut pkt: Pkt) {
        let UplinkWorker {
            tap,
            shared,
            seg_buf,
            gone,
            ..
        } = self;
        let c = &shared.counters;
        if let Some(gso) = pkt.meta.gso {
            let r = if gso.kind == GsoKind::Udp {
                Err(offload::OffloadError::NotTcp)
            } else {
                offload::segment(&pkt.buf, &gso, seg_buf, |s| write_one(tap, *gone, c, s))
            };
            if r.is_err() {
                c.offload_errors.fetch_add(1, Ordering::Relaxed);
            }
        } else if let Some(csum) = pkt.meta.csum {
            match offload::complete_csum(&mut pkt.buf, csum) {
                Ok(()) => write_one(tap, *gone, c, &pkt.buf),
                Err(_) => {
                    c.offload_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else {
            write_one(tap, *gone, c, &pkt.buf);
        }
        self.pool.put(pkt.buf);
    }
}

fn write_one(tap: &Tap, gone: bool, c: &UplinkCounters, frame: &[u8]) {
    if gone {
        c.write_errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let r = match tap.write(frame) {
        Err(e) if e.kind() == ErrorKind::Interrupted => tap.write(frame),
        r => r,
    };
    match r {
        Ok(_) => {
            c.written_packets.fetch_add(1, Ordering::Relaxed);
            c.written_bytes
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => {
            c.write_full.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            c.write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(tap = tap.name(), error = %e, "uplink write failed");
        }
    }
}

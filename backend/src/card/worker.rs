//! One card worker thread: an epoll loop over the kick eventfds of the
//! queue pairs it owns and its own wake eventfd.
//!
//! With a busy-poll budget ([`crate::net::set_busy_poll`]) the worker keeps
//! passing over all its rings with guest notifications off while frames
//! flow, looks at epoll (commands, wake-ups) only every [`POLL_EPOLL_EVERY`]
//! passes, and after `budget` without a frame re-arms notifications and
//! sleeps in epoll again.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use enilab_switch::{PortId, Switch, SwitchWorker, Verdict};
use vhost_user_backend::VringT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::net::{Backlog, Mode, NetDevice, RxCtx, TxCtx};
use crate::port::{
    Bufs, Local, Pkt, Pool, PortEgress, PortHandle, PortTable, Waker, RX_QUEUE_DEPTH,
};

const WAKE_TOKEN: u64 = u64::MAX;
/// Busy passes between two looks at epoll.
const POLL_EPOLL_EVERY: u32 = 64;
/// Idle busy passes between two reads of the clock.
const POLL_CLOCK_EVERY: u32 = 32;
/// Frames looked ahead for the connection-tracking prefetch.
const PREFETCH_AHEAD: usize = 4;

/// Commands from the card to a worker.
pub(crate) enum Cmd {
    Add(Arc<NetDevice>, u16),
    Remove(PortId),
    Stop,
}

/// Lock-free counters of one worker.
#[derive(Default)]
pub struct WorkerCounters {
    pub wakeups: AtomicU64,
    pub tx_batches: AtomicU64,
    pub forwarded: AtomicU64,
    pub replied: AtomicU64,
    pub dropped: AtomicU64,
    /// Passes made while busy-polling.
    pub poll_passes: AtomicU64,
    /// Frames the switch accepted whose queue filled before the move.
    pub late_drops: AtomicU64,
    /// Frames the switch's flow cache decided, as of the last batch.
    pub flow_cache_hits: AtomicU64,
}

/// The part of a worker that other threads hold.
pub(crate) struct WorkerShared {
    pub waker: Arc<Waker>,
    pub cmds: Mutex<Vec<Cmd>>,
    pub counters: WorkerCounters,
    pub alive: AtomicBool,
}

struct Slot {
    dev: Arc<NetDevice>,
    qp: u16,
    handle: Arc<PortHandle>,
    /// Frames waiting for guest buffers, and frames this worker switched
    /// to this queue itself (no ring between; at most a queue's depth).
    backlog: Backlog,
    tx_more: bool,
    rx_more: bool,
    /// Guest kicks on the RX ring are off (poll mode).
    rx_quiet: bool,
}

pub(crate) struct Worker {
    shared: Arc<WorkerShared>,
    epoll: Epoll,
    slots: Vec<Slot>,
    switch: SwitchWorker,
    ports: Arc<PortTable>,
    pool: Arc<Pool>,
    /// This worker's buffers: TX takes them, RX gives them back.
    bufs: Bufs,
    tx: TxCtx,
    rx: RxCtx,
    batch: Vec<Pkt>,
    /// The egress's hold lists, kept from pass to pass.
    egress_spare: Vec<Vec<Pkt>>,
    /// Frames for this worker's own queues, between egress and slot.
    local: Vec<Local>,
}

impl Worker {
    pub fn new(
        shared: Arc<WorkerShared>,
        switch: &Arc<Switch>,
        ports: Arc<PortTable>,
        pool: Arc<Pool>,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            shared.waker.fd(),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        Ok(Worker {
            shared,
            epoll,
            slots: Vec::new(),
            switch: switch.worker(),
            ports,
            bufs: Bufs::new(pool.clone()),
            pool,
            tx: TxCtx::default(),
            rx: RxCtx::default(),
            batch: Vec::with_capacity(crate::net::BATCH),
            egress_spare: Vec::new(),
            local: Vec::new(),
        })
    }

    pub fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        self.shared.alive.store(true, Ordering::Release);
        // Busy-poll state: when the last frame moved, and passes since the
        // last look at epoll.
        let mut last_work: Option<Instant> = None;
        let mut since_epoll = 0u32;
        let mut was_polling = false;
        let mut idle_passes = 0u32;
        loop {
            let budget = crate::net::busy_poll();
            // The clock is read every POLL_CLOCK_EVERY idle passes only.
            let polling = !budget.is_zero()
                && match last_work {
                    None => false,
                    Some(_) if was_polling && idle_passes % POLL_CLOCK_EVERY != 0 => true,
                    Some(t) => t.elapsed() < budget,
                };
            if was_polling && !polling {
                // Leaving poll mode: one Notify pass over every ring
                // re-arms guest notifications (and goes on if the guest
                // raced us) before epoll may sleep.
                for s in &mut self.slots {
                    s.tx_more = true;
                    s.rx_more = true;
                    if s.rx_quiet {
                        s.dev.set_rx_kicks(s.qp, true);
                        s.rx_quiet = false;
                    }
                }
            }
            was_polling = polling;
            let busy = polling
                || self
                    .slots
                    .iter()
                    .any(|s| s.tx_more || s.rx_more && !s.backlog.is_empty());
            since_epoll += 1;
            let n = if polling && since_epoll < POLL_EPOLL_EVERY {
                0
            } else {
                since_epoll = 0;
                match self.epoll.wait(if busy { 0 } else { 1000 }, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                    Err(e) => {
                        tracing::error!(error = %e, "worker epoll failed");
                        break;
                    }
                }
            };
            let mut rescan = false;
            for ev in &events[..n] {
                let token = ev.data();
                if token == WAKE_TOKEN {
                    self.shared.waker.consume();
                    self.shared.counters.wakeups.fetch_add(1, Ordering::Relaxed);
                    if !self.handle_cmds() {
                        self.shared.alive.store(false, Ordering::Release);
                        return;
                    }
                    rescan |= self.shared.waker.take_rescan();
                    for s in &mut self.slots {
                        s.rx_more = true;
                    }
                    continue;
                }
                let (slot, is_tx) = ((token / 2) as usize, token % 2 == 1);
                if let Some(s) = self.slots.get_mut(slot) {
                    // The token is not the fd: drain the ring's current kick
                    // eventfd (non-blocking, set when it arrived).
                    let ring = usize::from(s.qp) * 2 + usize::from(is_tx);
                    if let Some(v) = s.dev.vring(ring) {
                        if let Some(k) = v.get_ref().get_kick().as_ref() {
                            let _ = k.consume();
                        }
                    }
                    if is_tx {
                        s.tx_more = true;
                    } else {
                        s.rx_more = true;
                    }
                }
            }
            if rescan {
                self.register_all();
            }
            let mode = if polling {
                self.shared
                    .counters
                    .poll_passes
                    .fetch_add(1, Ordering::Relaxed);
                for s in &mut self.slots {
                    s.tx_more = true;
                    s.rx_more = true;
                    if !s.rx_quiet {
                        s.dev.set_rx_kicks(s.qp, false);
                        s.rx_quiet = true;
                    }
                }
                Mode::Poll
            } else {
                Mode::Notify
            };
            let moved = self.pass(mode);
            if moved > 0 && !budget.is_zero() {
                last_work = Some(Instant::now());
                idle_passes = 0;
            } else {
                idle_passes = idle_passes.wrapping_add(1);
            }
            // Clock refresh and flow-log hand-off, also when idle.
            if !polling || since_epoll == 0 {
                self.switch.housekeeping();
            }
        }
        self.shared.alive.store(false, Ordering::Release);
    }

    /// One pass over every slot: TX, then RX. Returns the frames moved
    /// (chains taken plus frames delivered).
    fn pass(&mut self, mode: Mode) -> usize {
        let mut moved = 0usize;
        let spare = std::mem::take(&mut self.egress_spare);
        let mut egress =
            PortEgress::with_spare(&self.ports, &self.pool, spare).with_owner(&self.shared.waker);
        for s in &mut self.slots {
            if !s.tx_more {
                continue;
            }
            let out = s
                .dev
                .process_tx(s.qp, &mut self.tx, &mut self.bufs, &mut self.batch, mode);
            s.tx_more = out.more;
            moved += out.chains;
            if out.chains == 0 {
                continue;
            }
            let port = s.dev.port();
            // Counted once per batch: the counters are shared cache lines.
            let (mut fwd, mut rep, mut drop) = (0u64, 0u64, 0u64);
            // Port packet/byte counters are added once for the batch.
            self.switch.begin_batch();
            // Drained in place: each frame is moved out once, with no
            // placeholder written back.
            let mut frames = self.batch.drain(..);
            while let Some(mut pkt) = frames.next() {
                // Start loading frame i+k's conntrack buckets now.
                if let Some(ahead) = frames.as_slice().get(PREFETCH_AHEAD - 1) {
                    self.switch.prefetch(port, &ahead.buf);
                }
                egress.set_ingress(&pkt.buf);
                let verdict = self
                    .switch
                    .process(port, &mut pkt.buf, &pkt.meta, &mut egress);
                match verdict {
                    Verdict::Forwarded(_) => fwd += 1,
                    Verdict::Replied => rep += 1,
                    Verdict::Dropped(_) => drop += 1,
                }
                // A frame not sent on (dropped, or answered with a
                // copy) gives its buffer back to this worker's cache.
                if let Some(buf) = egress.finish(pkt) {
                    self.bufs.put(buf);
                }
            }
            std::mem::drop(frames);
            self.switch.end_batch();
            let late = egress.flush();
            let c = &self.shared.counters;
            c.tx_batches.fetch_add(1, Ordering::Relaxed);
            // This worker's own total: a plain store, no locked add.
            c.flow_cache_hits
                .store(self.switch.flow_cache_hits(), Ordering::Relaxed);
            for (ctr, n) in [
                (&c.forwarded, fwd),
                (&c.replied, rep),
                (&c.dropped, drop),
                (&c.late_drops, late),
            ] {
                if n > 0 {
                    ctr.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
        if egress.wake_others(&self.shared.waker) {
            for s in &mut self.slots {
                s.rx_more = true;
            }
        }
        // Frames for this worker's own queues go straight to them: no ring
        // (a compare-and-swap to queue, a stamp per frame to take).
        egress.take_local(&mut self.local);
        let mut late = 0u64;
        for mut l in self.local.drain(..) {
            let slot = self.slots.iter_mut().find(|s| {
                Arc::as_ptr(&s.handle) as usize == l.handle && usize::from(s.qp) == l.queue
            });
            match slot {
                Some(s) => {
                    // The egress counted `held` in the queue's room, but
                    // two batches of one pass may both have seen it free.
                    let room = RX_QUEUE_DEPTH.saturating_sub(s.backlog.fresh.len());
                    for p in l.pkts.drain(room.min(l.pkts.len())..) {
                        late += 1;
                        self.pool.put(p.buf);
                    }
                    if s.backlog.fresh.is_empty() {
                        // The usual case: the list becomes the queue, and
                        // the emptied queue's buffer the next list (no
                        // frame is moved).
                        let done = std::mem::replace(&mut s.backlog.fresh, VecDeque::from(l.pkts));
                        egress.give_back(Vec::from(done));
                    } else {
                        s.backlog.fresh.extend(l.pkts.drain(..));
                        egress.give_back(l.pkts);
                    }
                    s.rx_more = true;
                }
                None => late += egress.requeue(l),
            }
        }
        if late > 0 {
            self.shared
                .counters
                .late_drops
                .fetch_add(late, Ordering::Relaxed);
        }
        self.egress_spare = egress.take_spare();
        drop(egress);
        for s in &mut self.slots {
            if !s.rx_more {
                continue;
            }
            let rxq = &s.handle.rxq[usize::from(s.qp)];
            let out = s.dev.process_rx(
                s.qp,
                rxq,
                &mut s.backlog,
                &mut self.rx,
                &mut self.bufs,
                mode,
            );
            rxq.held.store(s.backlog.fresh.len(), Ordering::Relaxed);
            moved += out.delivered;
            // Frames wait for the guest's kick, not for a busy loop.
            s.rx_more = out.waiting && rxq.ring.is_full();
        }
        moved
    }

    fn handle_cmds(&mut self) -> bool {
        let cmds: Vec<Cmd> =
            std::mem::take(&mut *self.shared.cmds.lock().unwrap_or_else(|e| e.into_inner()));
        let mut changed = false;
        for cmd in cmds {
            match cmd {
                Cmd::Add(dev, qp) => {
                    let Some(handle) = dev.handle.get().cloned() else {
                        continue;
                    };
                    self.slots.push(Slot {
                        dev,
                        qp,
                        handle,
                        backlog: Backlog::default(),
                        tx_more: true,
                        rx_more: true,
                        rx_quiet: false,
                    });
                    changed = true;
                }
                Cmd::Remove(port) => {
                    for s in self.slots.iter_mut().filter(|s| s.dev.port() == port) {
                        for p in s.backlog.pending.drain(..).chain(s.backlog.fresh.drain(..)) {
                            self.pool.put(p.buf);
                        }
                        if let Some(q) = s.handle.rxq.get(usize::from(s.qp)) {
                            q.held.store(0, Ordering::Relaxed);
                        }
                    }
                    self.slots.retain(|s| s.dev.port() != port);
                    changed = true;
                }
                Cmd::Stop => return false,
            }
        }
        if changed {
            self.register_all();
        }
        true
    }

    /// (Re-)register every slot's kick fds. Called when rings start or
    /// stop; an fd number may have been reused, so re-add unconditionally.
    fn register_all(&mut self) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            for dir in 0..2u64 {
                let Some(v) = s.dev.vring(usize::from(s.qp) * 2 + dir as usize) else {
                    continue;
                };
                let fd: Option<RawFd> = v.get_ref().get_kick().as_ref().map(|k| k.as_raw_fd());
                let token = i as u64 * 2 + dir;
                tracing::debug!(eni = %s.dev.config().eni_id, qp = s.qp, dir, ?fd, "watch kick");
                if let Some(fd) = fd {
                    let ev = EpollEvent::new(EventSet::IN, token);
                    match self.epoll.ctl(ControlOperation::Add, fd, ev) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                            let _ = self.epoll.ctl(ControlOperation::Modify, fd, ev);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot watch kick fd"),
                    }
                }
            }
            s.tx_more = true;
            s.rx_more = true;
        }
    }
}

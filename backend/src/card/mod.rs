//! A network card: its own group of worker threads, queues and counters.
//! ENIs attached at NetworkCardIndex N are served by card N's workers, so
//! a flood on one card does not take CPU time from another's queues.
//!
//! Scheme: a card has W workers (W small: this is a 2-core machine); the
//! queue pairs of every ENI on the card are dealt round-robin over them.
//! One worker owns a queue pair outright (both its TX and RX ring), so a
//! ring is only ever touched by its worker and the vhost-user session.

mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use enilab_switch::Switch;
use serde::Serialize;

use crate::net::NetDevice;
use crate::port::{Pool, PortHandle, PortTable, Waker};
pub use worker::WorkerCounters;
use worker::{Cmd, Worker, WorkerShared};

/// Errors of a card.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    /// Worker count out of range.
    #[error("a card has 1 to 64 workers, not {0}")]
    Workers(usize),
    /// A thread or eventfd could not be created.
    #[error("card {0} could not start a worker")]
    Spawn(u32, #[source] std::io::Error),
    /// The device is already on a card.
    #[error("ENI {0} is already attached to a card")]
    AlreadyAttached(String),
}

/// Counters of one worker, copied out.
#[derive(Debug, Clone, Serialize, Default)]
pub struct WorkerStats {
    pub wakeups: u64,
    pub tx_batches: u64,
    pub forwarded: u64,
    pub replied: u64,
    pub dropped: u64,
    /// Frames the switch's flow cache decided: forwarded, or refused by
    /// a full destination queue (counted in `dropped`).
    pub flow_cache_hits: u64,
}

pub struct Card {
    id: u32,
    workers: Vec<Arc<WorkerShared>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next: AtomicUsize,
    ports: Arc<PortTable>,
    stopped: AtomicBool,
}

impl Card {
    /// Start a card with `nworkers` threads forwarding through `switch`.
    pub fn start(
        id: u32,
        nworkers: usize,
        switch: &Arc<Switch>,
        ports: Arc<PortTable>,
        pool: Arc<Pool>,
    ) -> Result<Card, CardError> {
        if nworkers == 0 || nworkers > 64 {
            return Err(CardError::Workers(nworkers));
        }
        let mut workers = Vec::new();
        let mut threads = Vec::new();
        for w in 0..nworkers {
            let shared = Arc::new(WorkerShared {
                waker: Arc::new(Waker::new().map_err(|e| CardError::Spawn(id, e))?),
                cmds: Mutex::new(Vec::new()),
                counters: WorkerCounters::default(),
                alive: AtomicBool::new(false),
            });
            let worker = Worker::new(shared.clone(), switch, ports.clone(), pool.clone())
                .map_err(|e| CardError::Spawn(id, e))?;
            let t = std::thread::Builder::new()
                .name(format!("card{id}-w{w}"))
                .spawn(move || worker.run())
                .map_err(|e| CardError::Spawn(id, e))?;
            workers.push(shared);
            threads.push(t);
        }
        Ok(Card {
            id,
            workers,
            threads: Mutex::new(threads),
            next: AtomicUsize::new(0),
            ports,
            stopped: AtomicBool::new(false),
        })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Serve `dev` on this card: deal its queue pairs to workers and make
    /// its port reachable from the switch.
    pub fn attach(&self, dev: &Arc<NetDevice>) -> Result<(), CardError> {
        let n = self.workers.len();
        let wakers: Vec<Arc<Waker>> = (0..dev.queue_pairs())
            .map(|_| {
                let w = self.next.fetch_add(1, Ordering::Relaxed) % n;
                self.workers[w].waker.clone()
            })
            .collect();
        let handle = Arc::new(PortHandle::new(dev.port(), &wakers));
        dev.wakers
            .set(wakers.clone())
            .map_err(|_| CardError::AlreadyAttached(dev.config().eni_id.clone()))?;
        let _ = dev.handle.set(handle.clone());
        self.ports.insert(handle);
        for (qp, w) in wakers.iter().enumerate() {
            let shared = self
                .workers
                .iter()
                .find(|s| Arc::ptr_eq(&s.waker, w))
                .expect("waker comes from this card");
            shared
                .cmds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Cmd::Add(dev.clone(), qp as u16));
            w.request_rescan();
        }
        Ok(())
    }

    /// Stop serving `dev`'s queues and unpublish its port.
    pub fn detach(&self, dev: &NetDevice) {
        self.ports.remove(dev.port());
        for s in &self.workers {
            s.cmds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Cmd::Remove(dev.port()));
            s.waker.wake();
        }
    }

    /// Worker threads not yet joined (0 after [`Card::shutdown`]).
    pub fn live_workers(&self) -> usize {
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|t| !t.is_finished())
            .count()
    }

    pub fn worker_stats(&self) -> Vec<WorkerStats> {
        self.workers
            .iter()
            .map(|s| {
                let c = &s.counters;
                WorkerStats {
                    wakeups: c.wakeups.load(Ordering::Relaxed),
                    tx_batches: c.tx_batches.load(Ordering::Relaxed),
                    forwarded: c.forwarded.load(Ordering::Relaxed),
                    replied: c.replied.load(Ordering::Relaxed),
                    dropped: c.dropped.load(Ordering::Relaxed),
                    flow_cache_hits: c.flow_cache_hits.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Stop every worker and wait for them.
    pub fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        for s in &self.workers {
            s.cmds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Cmd::Stop);
            s.waker.wake();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        self.shutdown();
    }
}

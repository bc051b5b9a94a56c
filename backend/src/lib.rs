//! enilab-backend: every ENI is a vhost-user virtio-net device.
//!
//! A [`Datapath`] holds the switch, the port table and the network cards.
//! Each ENI gets a [`NetDevice`] and an [`EniServer`] (its unix socket and
//! session thread); its queue pairs are served by the workers of the card
//! it is attached to. A frame's way: guest TX ring -> card worker -> switch
//! pipeline -> destination port queue -> destination card worker -> guest
//! RX ring.
//!
//! An [`Uplink`] is a TAP interface served as one more switch port (the
//! lab's internet side): TAP -> uplink thread -> switch pipeline -> port
//! queue, and back.

mod card;
#[doc(hidden)]
pub mod fuzzing;
mod mpsc;
pub mod net;
mod port;
mod server;
pub mod service;
mod uplink;
pub mod vhost_user;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use card::{Card, CardError, WorkerStats};
pub use enilab_switch as switch;
pub use net::{DeviceConfig, NetDevice, NetError, QueueStats};
pub use port::{Pool, PortTable};
pub use server::EniServer;
pub use service::{Emitter, LaneStats, ServiceError, ServiceLanes, ServiceWorker, Steer};
pub use uplink::{Uplink, UplinkError, UplinkStats};

/// Errors of the backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Another process serves that socket path.
    #[error("socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    /// The socket could not be bound.
    #[error("cannot bind socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Card(#[from] CardError),
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    #[error("I/O error")]
    Io(#[source] std::io::Error),
}

/// The whole datapath of one host.
pub struct Datapath {
    switch: Arc<enilab_switch::Switch>,
    ports: Arc<PortTable>,
    pool: Arc<Pool>,
    cards: Mutex<BTreeMap<u32, Arc<Card>>>,
    workers_per_card: usize,
}

impl Datapath {
    pub fn new(switch: Arc<enilab_switch::Switch>, workers_per_card: usize) -> Self {
        Datapath {
            switch,
            ports: Arc::new(PortTable::default()),
            pool: Arc::new(Pool::default()),
            cards: Mutex::new(BTreeMap::new()),
            workers_per_card: workers_per_card.max(1),
        }
    }

    pub fn switch(&self) -> &Arc<enilab_switch::Switch> {
        &self.switch
    }

    /// The card with this index, started on first use.
    pub fn card(&self, id: u32) -> Result<Arc<Card>, BackendError> {
        let mut cards = self.cards.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cards.get(&id) {
            return Ok(c.clone());
        }
        let c = Arc::new(Card::start(
            id,
            self.workers_per_card,
            &self.switch,
            self.ports.clone(),
            self.pool.clone(),
        )?);
        cards.insert(id, c.clone());
        Ok(c)
    }

    pub fn cards(&self) -> Vec<Arc<Card>> {
        self.cards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Create an ENI device and serve it on `socket` from card `card`.
    pub fn add_eni(
        &self,
        socket: &Path,
        cfg: DeviceConfig,
        card: u32,
    ) -> Result<EniServer, BackendError> {
        let dev = NetDevice::new(cfg)?;
        let card = self.card(card)?;
        EniServer::start(socket, dev, card)
    }

    /// Create TAP interface `name` (in this process's network namespace)
    /// and serve it as switch port `port`: frames read from it enter the
    /// switch under `port`, frames the switch sends to `port` are written
    /// to it. Dropping the [`Uplink`] stops it and deletes the interface.
    pub fn add_uplink(
        &self,
        name: &str,
        port: enilab_switch::PortId,
    ) -> Result<Uplink, BackendError> {
        Ok(Uplink::start(
            name,
            port,
            &self.switch,
            self.ports.clone(),
            self.pool.clone(),
        )?)
    }

    /// Lanes for a service (the hyperplane): ports added to them are served
    /// by the lanes' workers, each frame on the lane `steer` picks.
    pub fn service_lanes(
        &self,
        lanes: usize,
        steer: Arc<dyn Steer>,
    ) -> Result<Arc<ServiceLanes>, ServiceError> {
        ServiceLanes::new(
            lanes,
            steer,
            self.switch.clone(),
            self.ports.clone(),
            self.pool.clone(),
        )
    }

    /// Queue `frame` for `port` the way the switch's egress does (and wake
    /// its worker), bypassing the pipeline and its counters: for frames the
    /// control plane originates (announcements on the uplink) and for tests.
    /// False if the port is unknown or its queue is full.
    pub fn inject(&self, port: enilab_switch::PortId, frame: &[u8]) -> bool {
        use enilab_switch::Egress;
        let mut egress = port::PortEgress::new(&self.ports, &self.pool);
        let ok = egress.emit(port, 0, frame, &enilab_switch::PacketMeta::default());
        egress.wake_all();
        ok
    }

    /// Restart card `id`'s worker group: stop its threads and forget it, so
    /// the next [`Datapath::card`] starts a fresh group. The caller stops
    /// the card's ENI servers first and serves them again afterwards (QEMU
    /// reconnects with `reconnect-ms`). False if the card was not running.
    pub fn restart_card(&self, id: u32) -> bool {
        let old = self
            .cards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        match old {
            Some(c) => {
                c.shutdown();
                true
            }
            None => false,
        }
    }

    /// Worker threads running, over every card (for leak checks).
    pub fn worker_threads(&self) -> usize {
        self.cards().iter().map(|c| c.live_workers()).sum()
    }

    /// Stop every card.
    pub fn shutdown(&self) {
        for c in self.cards() {
            c.shutdown();
        }
    }
}

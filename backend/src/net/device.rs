//! The virtio-net device state of one ENI.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use enilab_switch::PortId;
use serde::Serialize;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VringMutex, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::{bit, NetError, MAX_QUEUE_PAIRS, MAX_QUEUE_SIZE, MQ_FEATURES, OFFERED_FEATURES};
use crate::port::{PortHandle, Waker};
use crate::vhost_user::{Backend, RingEvent};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// What the control plane decides about an ENI's device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub eni_id: String,
    pub port: PortId,
    pub mac: [u8; 6],
    pub mtu: u16,
    pub queue_pairs: u16,
}

/// Lock-free counters of one queue pair.
#[derive(Default)]
pub struct QueueCounters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// TX chains completed with length 0 because they were malformed.
    pub tx_bad_chains: AtomicU64,
    /// TX frames refused after the chain was read (bad header, runt, oversize).
    pub tx_bad_frames: AtomicU64,
    /// TX chains consumed while the ring was disabled.
    pub tx_discarded: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// RX chains completed with length 0 because they were malformed.
    pub rx_bad_chains: AtomicU64,
    /// Times the guest had no RX buffer when a frame was waiting.
    pub rx_no_buffers: AtomicU64,
    /// Frames dropped on RX (did not fit, offload fallback failed).
    pub rx_dropped: AtomicU64,
    /// Interrupts sent to the guest.
    pub notifications: AtomicU64,
    /// Passes refused because a ring is misaligned or outside guest memory.
    pub bad_rings: AtomicU64,
}

/// A plain copy of one queue pair's counters.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct QueueStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_bad_chains: u64,
    pub tx_bad_frames: u64,
    pub tx_discarded: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_bad_chains: u64,
    pub rx_no_buffers: u64,
    pub rx_dropped: u64,
    pub notifications: u64,
    pub bad_rings: u64,
}

impl QueueCounters {
    pub fn snapshot(&self) -> QueueStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        QueueStats {
            tx_packets: r(&self.tx_packets),
            tx_bytes: r(&self.tx_bytes),
            tx_bad_chains: r(&self.tx_bad_chains),
            tx_bad_frames: r(&self.tx_bad_frames),
            tx_discarded: r(&self.tx_discarded),
            rx_packets: r(&self.rx_packets),
            rx_bytes: r(&self.rx_bytes),
            rx_bad_chains: r(&self.rx_bad_chains),
            rx_no_buffers: r(&self.rx_no_buffers),
            rx_dropped: r(&self.rx_dropped),
            notifications: r(&self.notifications),
            bad_rings: r(&self.bad_rings),
        }
    }
}

impl std::ops::AddAssign for QueueStats {
    fn add_assign(&mut self, o: QueueStats) {
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        self.tx_bad_chains += o.tx_bad_chains;
        self.tx_bad_frames += o.tx_bad_frames;
        self.tx_discarded += o.tx_discarded;
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.rx_bad_chains += o.rx_bad_chains;
        self.rx_no_buffers += o.rx_no_buffers;
        self.rx_dropped += o.rx_dropped;
        self.notifications += o.notifications;
        self.bad_rings += o.bad_rings;
    }
}

/// One ENI's virtio-net device: rings, guest memory, negotiated features.
pub struct NetDevice {
    pub(crate) cfg: DeviceConfig,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    vrings: Vec<VringMutex>,
    acked: AtomicU64,
    pub(crate) counters: Box<[QueueCounters]>,
    /// Per queue pair, the worker that serves it; set when a card adopts
    /// the device.
    pub(crate) wakers: OnceLock<Vec<Arc<Waker>>>,
    pub(crate) handle: OnceLock<Arc<PortHandle>>,
    /// Sessions served so far (reconnects included).
    pub sessions: AtomicU64,
}

impl NetDevice {
    pub fn new(cfg: DeviceConfig) -> Result<Arc<Self>, NetError> {
        if cfg.queue_pairs == 0 || cfg.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(NetError::QueuePairs(cfg.queue_pairs));
        }
        if cfg.mac[0] & 1 == 1 || cfg.mac == [0; 6] {
            return Err(NetError::BadMac(format_mac(&cfg.mac)));
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let vrings = (0..usize::from(cfg.queue_pairs) * 2)
            .map(|_| VringMutex::new(mem.clone(), MAX_QUEUE_SIZE))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| NetError::Queue(e.to_string()))?;
        let counters = (0..cfg.queue_pairs)
            .map(|_| QueueCounters::default())
            .collect();
        Ok(Arc::new(NetDevice {
            cfg,
            mem,
            vrings,
            acked: AtomicU64::new(0),
            counters,
            wakers: OnceLock::new(),
            handle: OnceLock::new(),
            sessions: AtomicU64::new(0),
        }))
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    pub fn port(&self) -> PortId {
        self.cfg.port
    }

    pub fn queue_pairs(&self) -> u16 {
        self.cfg.queue_pairs
    }

    pub(crate) fn vring(&self, index: usize) -> Option<&VringMutex> {
        self.vrings.get(index)
    }

    pub(crate) fn mem(&self) -> &GuestMemoryAtomic<GuestMemoryMmap> {
        &self.mem
    }

    pub fn acked_features(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    pub(crate) fn has(&self, feature: u32) -> bool {
        self.acked_features() & bit(feature) != 0
    }

    /// Bytes of virtio-net header in front of every frame.
    pub(crate) fn hdr_len(&self) -> usize {
        if self.has(VIRTIO_F_VERSION_1) || self.has(VIRTIO_NET_F_MRG_RXBUF) {
            12
        } else {
            10
        }
    }

    pub(crate) fn indirect(&self) -> bool {
        self.has(VIRTIO_RING_F_INDIRECT_DESC)
    }

    /// Counters of every queue pair.
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        self.counters.iter().map(|c| c.snapshot()).collect()
    }

    /// Sum over queue pairs.
    pub fn stats(&self) -> QueueStats {
        let mut t = QueueStats::default();
        for c in self.counters.iter() {
            t += c.snapshot();
        }
        t
    }

    fn wake_pair(&self, qp: usize) {
        if let Some(w) = self.wakers.get().and_then(|w| w.get(qp)) {
            w.request_rescan();
        }
    }

    /// Whether the guest has enabled the RX queue of `qp`, for the egress.
    fn update_enabled(&self) {
        let Some(h) = self.handle.get() else { return };
        let mut mask = 0u32;
        for qp in 0..usize::from(self.cfg.queue_pairs) {
            let v = &self.vrings[qp * 2];
            let st = v.get_ref();
            if st.is_enabled() && st.get_queue().ready() {
                mask |= 1 << qp;
            }
        }
        h.enabled_rx.store(mask, Ordering::Release);
    }
}

impl Backend for NetDevice {
    fn num_queues(&self) -> usize {
        self.vrings.len()
    }

    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mq = if self.cfg.queue_pairs > 1 {
            MQ_FEATURES
        } else {
            0
        };
        OFFERED_FEATURES | mq | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn vrings(&self) -> &[VringMutex] {
        &self.vrings
    }

    fn memory(&self) -> &GuestMemoryAtomic<GuestMemoryMmap> {
        &self.mem
    }

    fn set_acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
        for qp in 0..usize::from(self.cfg.queue_pairs) {
            self.wake_pair(qp);
        }
    }

    fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_net_config: mac[6], status u16, max_virtqueue_pairs
        // u16, mtu u16, speed u32, duplex u8, ...
        let mut cfg = [0u8; 24];
        cfg[0..6].copy_from_slice(&self.cfg.mac);
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        cfg[8..10].copy_from_slice(&self.cfg.queue_pairs.to_le_bytes());
        cfg[10..12].copy_from_slice(&self.cfg.mtu.to_le_bytes());
        cfg[12..16].copy_from_slice(&10_000u32.to_le_bytes()); // Mbit/s
        cfg[16] = 1; // full duplex
        let start = offset as usize;
        let end = start.saturating_add(size as usize);
        cfg.get(start..end).map(|s| s.to_vec()).unwrap_or_default()
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), String> {
        // The MAC is the ENI's identity; only an identical write is accepted.
        if offset == 0 && data.len() == 6 && data == self.cfg.mac {
            return Ok(());
        }
        tracing::debug!(eni = %self.cfg.eni_id, offset, len = data.len(), "config write ignored");
        Ok(())
    }

    fn ring_event(&self, event: RingEvent) {
        match event {
            RingEvent::Started(i) | RingEvent::Stopped(i) | RingEvent::Enabled(i, _) => {
                self.update_enabled();
                self.wake_pair(usize::from(i) / 2);
            }
            RingEvent::MemoryChanged => {}
        }
    }

    fn reset(&self) {
        for v in &self.vrings {
            v.get_mut().get_queue_mut().reset();
            v.set_kick(None);
            v.set_call(None);
            v.set_err(None);
            v.set_enabled(false);
        }
        self.acked.store(0, Ordering::Release);
        if let Ok(m) = self.mem.lock() {
            m.replace(GuestMemoryMmap::new());
        }
        self.update_enabled();
        for qp in 0..usize::from(self.cfg.queue_pairs) {
            self.wake_pair(qp);
        }
    }
}

pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

//! The virtio-net device behind one ENI: feature set, header handling,
//! guest-memory access for descriptor chains, offloads, and the per-queue
//! TX/RX processing the card workers call.

mod chain;
mod device;
mod guest;
mod hdr;
pub mod offload;
mod poll;
mod queue;

pub use chain::{ChainError, Seg, MAX_CHAIN_SEGS};
pub use device::{format_mac, DeviceConfig, NetDevice, QueueStats};
pub use hdr::{VirtioNetHdr, VNET_HDR_LEN};
pub use poll::{busy_poll, set_busy_poll};
pub(crate) use queue::{Backlog, Mode, RxCtx, TxCtx, BATCH};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Most queue pairs one ENI may have.
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Largest ring we accept (QEMU's maximum for virtio-net is 1024).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Largest frame we take from a guest: a 64 KiB GSO super-packet plus its
/// Ethernet header.
pub const MAX_FRAME: usize = 65536 + 14 + 4;

/// Errors of the net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Queue pair count out of range.
    #[error("an ENI has 1 to {MAX_QUEUE_PAIRS} queue pairs, not {0}")]
    QueuePairs(u16),
    /// A vring could not be created.
    #[error("virtqueue could not be created: {0}")]
    Queue(String),
    /// The MAC is multicast or zero.
    #[error("MAC {0} is not a unicast address")]
    BadMac(String),
}

pub(crate) const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Virtio features every ENI offers. VHOST_USER_F_PROTOCOL_FEATURES is
/// added by the device.
pub const OFFERED_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_MTU)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC);

/// Features a device with several queue pairs adds.
pub const MQ_FEATURES: u64 = bit(VIRTIO_NET_F_MQ);

#[cfg(test)]
mod tests;

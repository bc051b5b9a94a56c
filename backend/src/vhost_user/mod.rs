//! Our own vhost-user frontend-request loop.
//!
//! Why not vhost-user-backend's handler: QEMU's virtio-net sends
//! SET_VRING_ENABLE before SET_FEATURES (it treats PROTOCOL_FEATURES as usable
//! once offered), and the vhost crate's handler refuses that order, killing
//! the session. This loop accepts it, as DPDK's vhost library does. It is
//! built on the vhost crate's public message types, vmm-sys-util's fd passing,
//! virtio-queue and vm-memory, and on vhost-user-backend's `VringMutex`.

mod session;
mod wire;

#[cfg(test)]
mod tests;

pub use session::{Backend, RingEvent, Session, SessionEnd};
pub use wire::{Channel, Message, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION_1, HDR_SIZE};

/// Errors of one vhost-user session. Each ends the session unless noted; the
/// socket then accepts the next frontend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket failed.
    #[error("vhost-user socket error")]
    Socket(#[source] std::io::Error),
    /// The connection closed in the middle of a message.
    #[error("frontend closed the connection in the middle of a message")]
    Truncated(#[source] std::io::Error),
    /// Header version bits are not 1.
    #[error("message header has unsupported version flags {0:#x}")]
    BadVersion(u32),
    /// Reserved header flags set.
    #[error("message header has reserved flags set ({0:#x})")]
    BadFlags(u32),
    /// Body larger than the protocol allows.
    #[error("request {request} announces a {size}-byte body, above the 4096-byte limit")]
    Oversize { request: u32, size: usize },
    /// Body of the wrong size for the request.
    #[error("request {request} carries {got} bytes, expected {expected}")]
    PayloadSize {
        request: u32,
        expected: usize,
        got: usize,
    },
    /// The payload failed its validator.
    #[error("request {0} carries an invalid payload")]
    InvalidPayload(u32),
    /// A vring index beyond the device's queues.
    #[error("vring index {0} is out of range")]
    BadVringIndex(u32),
    /// A request needed a file descriptor and came without one, or with too many.
    #[error("request {0} must carry exactly one file descriptor")]
    MissingFd(u32),
    /// Memory table could not be mapped.
    #[error("guest memory region could not be mapped: {0}")]
    Memory(String),
    /// A vring address does not fall inside any memory region.
    #[error("vring {0} address {1:#x} is outside the guest memory table")]
    BadRingAddress(u32, u64),
    /// Feature bits the backend never offered.
    #[error("frontend acked features {0:#x} that were not offered")]
    UnofferedFeatures(u64),
    /// Queue size not a power of two or too large.
    #[error("vring {0} size {1} is not a power of two up to the maximum")]
    BadQueueSize(u32, u32),
    /// A request code this backend does not implement (the session goes on).
    #[error("unsupported request {0}")]
    Unsupported(u32),
    /// The device refused the operation.
    #[error("device error: {0}")]
    Device(String),
}

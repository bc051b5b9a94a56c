//! enilab-switch: the VPC data plane.
//!
//! The switch knows nothing of virtqueues, sockets, tokio or the API. A
//! backend worker hands it one frame at a time (already stripped of its
//! virtio-net header) through a per-thread [`SwitchWorker`]; the switch
//! decides and calls [`Egress::emit`] for every frame that must leave, either
//! toward another port or back to the ingress port (ARP and DHCP replies).
//!
//! Configuration arrives as an immutable [`Snapshot`] published by the control
//! plane with [`Switch::publish`]; workers read it through an `arc_swap`
//! cache, so the packet path takes no lock.

pub mod capture;
mod config;
mod conntrack;
mod counters;
mod flowlog;
mod limits;
mod metadata;
mod pipeline;
pub mod policy;
pub mod wire;

pub use capture::{Capture, CaptureError, CapturedFrame, Direction};
pub use config::{
    MetadataConfig, PortConfig, ServiceReturn, Snapshot, SnapshotError, SubnetConfig, Topology,
    UplinkConfig, VpcConfig, GATEWAY_MAC, MAX_GROUPS_PER_ENI,
};
pub use conntrack::{ConntrackStats, Timeouts};
pub use counters::{DropReason, PortCounters, PortStats};
pub use flowlog::HEADER as FLOW_LOG_HEADER;
pub use limits::{CardConfig, CardLimits, CardStats, PortLimits};
pub use metadata::{
    decode_metadata_client, metadata_client_addr, IMDS_ADDR, METADATA_CLIENT_NET, METADATA_GATEWAY,
    METADATA_MAC,
};
pub use pipeline::{
    announcement, flow_hash, Switch, SwitchOptions, SwitchWorker, ANNOUNCEMENT_LEN,
};
pub use policy::{
    AclEntry, Cidr, ElasticIp, FlowLogConfig, FlowLogScope, NetworkAclConfig, Peer, PolicyError,
    PortMatch, Protocol, Route, RouteTableConfig, RouteTarget, SecurityGroupConfig, SgRule,
    TrafficType,
};

/// Dense port number. The control plane allocates it and reuses it only
/// after the port has left the snapshot. A port is one ENI (or, later, a
/// gateway or hyperplane attachment).
pub type PortId = u32;

/// Highest number of ports one switch serves; counters are preallocated.
pub const MAX_PORTS: usize = 4096;

/// Checksum and segmentation offload state carried beside a frame, taken
/// from (and given back as) the virtio-net header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketMeta {
    /// Partial checksum: the sender left the L4 checksum to be completed.
    /// `start` is where summing begins, `offset` where the result goes
    /// (relative to `start`), as in `virtio_net_hdr`.
    pub csum: Option<CsumOffload>,
    /// The frame is a TCP/UDP super-packet to be segmented at `size`.
    pub gso: Option<GsoOffload>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CsumOffload {
    pub start: u16,
    pub offset: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoKind {
    Tcpv4,
    Tcpv6,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GsoOffload {
    pub kind: GsoKind,
    /// Segment payload size (MSS).
    pub size: u16,
    /// Length of the Ethernet + IP + L4 headers.
    pub hdr_len: u16,
    /// ECN bit of the virtio header.
    pub ecn: bool,
}

/// Where the switch sends frames. Implemented by the backend (a port's RX
/// queue), by tests (a vector), and later by gateways.
pub trait Egress {
    /// Deliver `frame` to `port`. `flow_hash` is a symmetric-enough hash of
    /// the flow so a multi-queue port can pick its queue pair. Returns false
    /// if the frame could not be queued (the switch counts the drop).
    fn emit(&mut self, port: PortId, flow_hash: u32, frame: &[u8], meta: &PacketMeta) -> bool;
}

/// What happened to one ingress frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forwarded to this port.
    Forwarded(PortId),
    /// Answered by the switch itself (ARP, DHCP) on the ingress port.
    Replied,
    /// Dropped, and counted under this reason.
    Dropped(DropReason),
}

/// Hint the CPU to load the cache line holding (the start of) `r`.
#[inline(always)]
pub(crate) fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint: it never faults and changes no
    // memory, and the pointer comes from a live reference anyway.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((r as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}

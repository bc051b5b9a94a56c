//! Lock-free per-port counters.
//!
//! Every port id below [`MAX_PORTS`](crate::MAX_PORTS) has one preallocated
//! [`PortCounters`]; workers add to it with relaxed atomics and readers take
//! a [`PortStats`] copy. Directions are named from the guest's side, as in
//! `ip -s link` inside the guest: `tx` is what the guest sent into the
//! switch, `rx` what the switch delivered toward the guest.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde::Serializer;

use crate::limits::{Allowance, MeterClock, PortLimits, PortMeters};

/// Why the switch dropped a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Truncated or inconsistent headers.
    Malformed,
    /// No port owns the destination (or the ARP target) in the VPC.
    NoRoute,
    /// Broadcast, multicast or IPv6 traffic the switch does not forward, and
    /// ARP announcements or replies from guests (never flooded).
    Broadcast,
    /// Source/destination check failed.
    SourceCheck,
    /// A security group denied the flow.
    SecurityGroup,
    /// A network ACL denied the packet.
    Nacl,
    /// A rate limit was exceeded.
    RateLimit,
    /// The destination's queue was full (counted on the destination port).
    QueueFull,
    /// A new flow found no room in the connection-tracking table (AWS's
    /// `conntrack_allowance_exceeded`).
    ConntrackFull,
    /// The ingress port is not in the current snapshot.
    PortDown,
    /// A well-formed frame of a kind the switch does not handle.
    Unsupported,
    /// The frame's source MAC is not the sending interface's (checked
    /// always, like EC2's hypervisor, whatever the source/dest check).
    SpoofedMac,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 12;

    /// Every reason, in counter order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::Malformed,
        DropReason::NoRoute,
        DropReason::Broadcast,
        DropReason::SourceCheck,
        DropReason::SecurityGroup,
        DropReason::Nacl,
        DropReason::RateLimit,
        DropReason::QueueFull,
        DropReason::ConntrackFull,
        DropReason::PortDown,
        DropReason::Unsupported,
        DropReason::SpoofedMac,
    ];

    /// Stable snake_case name, used in metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NoRoute => "no_route",
            DropReason::Broadcast => "broadcast",
            DropReason::SourceCheck => "source_check",
            DropReason::SecurityGroup => "security_group",
            DropReason::Nacl => "nacl",
            DropReason::RateLimit => "rate_limit",
            DropReason::QueueFull => "queue_full",
            DropReason::ConntrackFull => "conntrack_full",
            DropReason::PortDown => "port_down",
            DropReason::Unsupported => "unsupported",
            DropReason::SpoofedMac => "spoofed_mac",
        }
    }

    /// Position in [`DropReason::ALL`] and in the drop counter arrays.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Live counters of one port. Updated with relaxed atomics; a reader may
/// see one counter ahead of another, never a torn value.
///
/// Aligned to a cache line so neighbouring ports do not share one.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct PortCounters {
    /// Frames the guest transmitted into the switch (all of them, whatever
    /// became of them).
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames delivered toward the guest: forwarded frames and the
    /// switch's own ARP, DHCP and ICMP replies.
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// ARP replies the switch sent to this port.
    pub arp_replies: AtomicU64,
    /// DHCP replies (OFFER, ACK, NAK) the switch sent to this port.
    pub dhcp_replies: AtomicU64,
    /// Flows this port took part in that connection tracking admitted.
    pub new_flows: AtomicU64,
    /// Frames over the ENI's allowances (also counted as `RateLimit` drops).
    pub pps_allowance_exceeded: AtomicU64,
    pub bw_out_allowance_exceeded: AtomicU64,
    pub bw_in_allowance_exceeded: AtomicU64,
    pub linklocal_allowance_exceeded: AtomicU64,
    /// New flows refused because this ENI tracked its allowance of
    /// connections already (also counted as `ConntrackFull` drops).
    pub conntrack_allowance_exceeded: AtomicU64,
    /// Connections charged to this port's allowance now: flows it opened,
    /// and flows toward it from ends without an allowance (a gauge: up on
    /// insert, down when the entry is reclaimed, swept or forgotten;
    /// expired entries count until then; 0 without an allowance).
    pub(crate) conntrack_tracked: AtomicU64,
    pub(crate) meters: PortMeters,
    drops: [AtomicU64; DropReason::COUNT],
}

impl PortCounters {
    /// Add a worker's running totals (see `pipeline::Tally`): each add is
    /// a locked instruction, so zeros are skipped.
    #[inline]
    pub(crate) fn add_totals(&self, tx_p: u64, tx_b: u64, rx_p: u64, rx_b: u64, full: u64) {
        if full > 0 {
            self.drops[DropReason::QueueFull.index()].fetch_add(full, Ordering::Relaxed);
        }
        if tx_p > 0 {
            self.tx_packets.fetch_add(tx_p, Ordering::Relaxed);
            self.tx_bytes.fetch_add(tx_b, Ordering::Relaxed);
        }
        if rx_p > 0 {
            self.rx_packets.fetch_add(rx_p, Ordering::Relaxed);
            self.rx_bytes.fetch_add(rx_b, Ordering::Relaxed);
        }
    }

    /// Count one frame from the guest.
    #[inline]
    pub fn add_tx(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Count one frame toward the guest.
    #[inline]
    pub fn add_rx(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Count one newly tracked flow.
    #[inline]
    pub fn add_new_flow(&self) {
        self.new_flows.fetch_add(1, Ordering::Relaxed);
    }

    /// Count one drop. Public so the backend can count its own drops (for
    /// example `QueueFull` when a guest RX ring has no buffers).
    #[inline]
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Charge `packets` frames of `bytes` leaving the instance (`out`) or
    /// arriving at it against `limits`. False when over, with the allowance
    /// counted (the caller counts the `RateLimit` drop).
    #[inline]
    pub(crate) fn allow(
        &self,
        limits: &PortLimits,
        out: bool,
        packets: u64,
        bytes: usize,
        clock: &MeterClock,
    ) -> bool {
        if limits.rates_unlimited() {
            return true;
        }
        let m = &self.meters;
        let over = crate::limits::charge(
            [&m.pps, &m.out, &m.inb],
            [limits.pps, limits.bw_out_bps, limits.bw_in_bps],
            clock.now(),
            out,
            packets,
            bytes,
        );
        match over {
            None => true,
            Some(a) => {
                self.exceeded(a);
                false
            }
        }
    }

    /// Charge one packet to a link-local service (the metadata server).
    #[inline]
    pub(crate) fn allow_linklocal(&self, limits: &PortLimits) -> bool {
        if limits.linklocal_pps == 0 {
            return true;
        }
        let ok = self
            .meters
            .linklocal
            .admit(crate::limits::now_ns(), 1, limits.linklocal_pps);
        if !ok {
            self.exceeded(Allowance::LinkLocal);
        }
        ok
    }

    /// Take one tracked connection against `cap` (0: unlimited). False,
    /// with nothing taken and the excess counted, when the port holds its
    /// allowance already.
    #[inline]
    pub(crate) fn track(&self, cap: u64) -> bool {
        let before = self.conntrack_tracked.fetch_add(1, Ordering::Relaxed);
        if cap != 0 && before >= cap {
            self.untrack();
            self.conntrack_allowance_exceeded
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Give back one tracked connection (never below zero: a port reset
    /// may have zeroed the gauge first).
    #[inline]
    pub(crate) fn untrack(&self) {
        let _ = self
            .conntrack_tracked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    fn exceeded(&self, a: Allowance) {
        let c = match a {
            Allowance::Pps => &self.pps_allowance_exceeded,
            Allowance::BwOut => &self.bw_out_allowance_exceeded,
            Allowance::BwIn => &self.bw_in_allowance_exceeded,
            Allowance::LinkLocal => &self.linklocal_allowance_exceeded,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Current value of one drop counter.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }

    /// A plain copy of every counter.
    pub fn stats(&self) -> PortStats {
        let mut drops = [0; DropReason::COUNT];
        for (out, c) in drops.iter_mut().zip(&self.drops) {
            *out = c.load(Ordering::Relaxed);
        }
        PortStats {
            tx_packets: self.tx_packets.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            rx_packets: self.rx_packets.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            arp_replies: self.arp_replies.load(Ordering::Relaxed),
            dhcp_replies: self.dhcp_replies.load(Ordering::Relaxed),
            new_flows: self.new_flows.load(Ordering::Relaxed),
            pps_allowance_exceeded: self.pps_allowance_exceeded.load(Ordering::Relaxed),
            bw_out_allowance_exceeded: self.bw_out_allowance_exceeded.load(Ordering::Relaxed),
            bw_in_allowance_exceeded: self.bw_in_allowance_exceeded.load(Ordering::Relaxed),
            linklocal_allowance_exceeded: self.linklocal_allowance_exceeded.load(Ordering::Relaxed),
            conntrack_allowance_exceeded: self.conntrack_allowance_exceeded.load(Ordering::Relaxed),
            conntrack_tracked: self.conntrack_tracked.load(Ordering::Relaxed),
            conntrack_allowance_available: None,
            drops,
        }
    }

    /// Zero every counter (when a port id is reused). Not atomic as a whole:
    /// increments racing with the reset may survive it.
    pub fn reset(&self) {
        for c in [
            &self.tx_packets,
            &self.tx_bytes,
            &self.rx_packets,
            &self.rx_bytes,
            &self.arp_replies,
            &self.dhcp_replies,
            &self.new_flows,
            &self.pps_allowance_exceeded,
            &self.bw_out_allowance_exceeded,
            &self.bw_in_allowance_exceeded,
            &self.linklocal_allowance_exceeded,
            &self.conntrack_allowance_exceeded,
            &self.conntrack_tracked,
        ]
        .into_iter()
        .chain(&self.drops)
        {
            c.store(0, Ordering::Relaxed);
        }
        self.meters.pps.reset();
        self.meters.out.reset();
        self.meters.inb.reset();
        self.meters.linklocal.reset();
    }
}

/// A copy of one port's counters.
///
/// Serialises as
/// `{"tx_packets":3,"tx_bytes":252,"rx_packets":2,"rx_bytes":384,
///   "arp_replies":1,"dhcp_replies":1,"drops":{"malformed":0,...}}`
/// with every [`DropReason::as_str`] name present under `drops`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PortStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub arp_replies: u64,
    pub dhcp_replies: u64,
    pub new_flows: u64,
    pub pps_allowance_exceeded: u64,
    pub bw_out_allowance_exceeded: u64,
    pub bw_in_allowance_exceeded: u64,
    pub linklocal_allowance_exceeded: u64,
    pub conntrack_allowance_exceeded: u64,
    /// Connections charged to this ENI's allowance (expired ones count until
    /// they are swept).
    pub conntrack_tracked: u64,
    /// How many more it may track, when it has an allowance (ENA's
    /// `conntrack_allowance_available`); filled by `Switch::stats`.
    pub conntrack_allowance_available: Option<u64>,
    #[serde(serialize_with = "serialize_drops")]
    pub drops: [u64; DropReason::COUNT],
}

impl PortStats {
    /// Drops counted under `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// (name, count) for every reason, in [`DropReason::ALL`] order.
    pub fn named_drops(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        named(&self.drops)
    }

    /// Drops under every reason together.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}

fn serialize_drops<S: Serializer>(
    drops: &[u64; DropReason::COUNT],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(named(drops))
}

fn named(drops: &[u64; DropReason::COUNT]) -> impl Iterator<Item = (&'static str, u64)> + '_ {
    DropReason::ALL
        .iter()
        .map(move |r| (r.as_str(), drops[r.index()]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_in_index_order_with_unique_names() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
            assert_eq!(r.to_string(), r.as_str());
        }
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
        assert_eq!(DropReason::Malformed.as_str(), "malformed");
        assert_eq!(DropReason::NoRoute.as_str(), "no_route");
    }

    #[test]
    fn add_stats_and_reset() {
        let c = PortCounters::default();
        c.add_tx(60);
        c.add_tx(40);
        c.add_rx(1500);
        c.arp_replies.fetch_add(1, Ordering::Relaxed);
        c.dhcp_replies.fetch_add(2, Ordering::Relaxed);
        for (i, r) in DropReason::ALL.iter().enumerate() {
            for _ in 0..=i {
                c.count_drop(*r);
            }
        }
        let s = c.stats();
        assert_eq!((s.tx_packets, s.tx_bytes), (2, 100));
        assert_eq!((s.rx_packets, s.rx_bytes), (1, 1500));
        assert_eq!((s.arp_replies, s.dhcp_replies), (1, 2));
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(s.drops(*r), i as u64 + 1, "{r:?}");
            assert_eq!(c.drops(*r), i as u64 + 1, "{r:?}");
        }
        // 1 + 2 + ... + COUNT
        assert_eq!(
            s.total_drops(),
            (DropReason::COUNT * (DropReason::COUNT + 1) / 2) as u64
        );
        c.reset();
        assert_eq!(c.stats(), PortStats::default());
    }

    #[test]
    fn drops_are_named() {
        let mut stats = PortStats::default();
        stats.drops[DropReason::NoRoute.index()] = 4;
        let got: Vec<(&str, u64)> = stats.named_drops().collect();
        let want: Vec<(&str, u64)> = DropReason::ALL
            .iter()
            .map(|r| (r.as_str(), if *r == DropReason::NoRoute { 4 } else { 0 }))
            .collect();
        assert_eq!(got, want);
    }
}

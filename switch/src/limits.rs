//! Allowances, as EC2 enforces them. Per ENI: packets per second (both
//! directions together), bandwidth out of and into the instance,
//! link-local traffic (the metadata service) per second, and tracked
//! connections. Per (instance, network card): packets per second and
//! bandwidth shared by that card's ENIs of that instance. What goes over is
//! dropped and counted under the names EC2's ENA driver reports
//! (`pps_allowance_exceeded`, `bw_out_allowance_exceeded`,
//! `bw_in_allowance_exceeded`, `linklocal_allowance_exceeded`,
//! `conntrack_allowance_exceeded`).
//!
//! Each rate allowance is a GCRA ("virtual scheduling") meter: one atomic
//! theoretical arrival time per port (or card) and direction, so every
//! worker that serves the port shares it without a lock, and a port without
//! limits costs one branch.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use serde::Serialize;

use crate::PortId;

/// One ENI's allowances; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PortLimits {
    /// Packets per second, sent and received together.
    pub pps: u64,
    /// Bits per second the instance may send.
    pub bw_out_bps: u64,
    /// Bits per second the instance may receive.
    pub bw_in_bps: u64,
    /// Packets per second to link-local services (EC2: 1024).
    pub linklocal_pps: u64,
    /// Connections this ENI may have tracked at once: the flows it opens,
    /// and those toward it from ends without an allowance (the internet).
    /// A new flow beyond it is dropped, established ones are not.
    pub conntrack: u64,
}

impl PortLimits {
    pub fn is_unlimited(&self) -> bool {
        *self == PortLimits::default()
    }

    /// No packet or bandwidth allowance is set (the packet path skips the
    /// meters).
    #[inline]
    pub fn rates_unlimited(&self) -> bool {
        self.pps == 0 && self.bw_out_bps == 0 && self.bw_in_bps == 0
    }
}

/// The aggregate allowances of one network card of one instance, shared by
/// every ENI of that instance on that card; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CardLimits {
    /// Packets per second, sent and received together, over the card's
    /// ENIs.
    pub pps: u64,
    /// Bits per second the card's ENIs may send together.
    pub bw_out_bps: u64,
    /// Bits per second the card's ENIs may receive together.
    pub bw_in_bps: u64,
}

impl CardLimits {
    #[inline]
    pub fn is_unlimited(&self) -> bool {
        *self == CardLimits::default()
    }
}

/// One (instance, network card) aggregate as the control plane states it.
/// Ports join it through [`PortConfig::card`](crate::PortConfig::card).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CardConfig {
    pub instance: String,
    /// The network card index (EC2's `NetworkCardIndex`).
    pub card: u32,
    pub limits: CardLimits,
}

/// A card aggregate's counters, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CardStats {
    pub instance: String,
    pub card: u32,
    pub limits: CardLimits,
    /// The switch ports of the ENIs sharing it.
    pub ports: Vec<PortId>,
    /// Frames over the card's allowances (each also a `rate_limit` drop on
    /// the ENI it was for).
    pub pps_allowance_exceeded: u64,
    pub bw_out_allowance_exceeded: u64,
    pub bw_in_allowance_exceeded: u64,
}

/// The live meters and counters of one card aggregate. Shared by every
/// snapshot that holds the card (carried over by `(instance, card)` when a
/// new one is published), so neither the meters nor the counters restart
/// on a configuration change.
#[derive(Debug, Default)]
pub(crate) struct CardMeters {
    pps: Meter,
    out: Meter,
    inb: Meter,
    pps_allowance_exceeded: AtomicU64,
    bw_out_allowance_exceeded: AtomicU64,
    bw_in_allowance_exceeded: AtomicU64,
}

impl CardMeters {
    /// Charge `packets` frames of `bytes` sent by (`out`) or toward one of
    /// the card's ENIs. False when over, with the allowance counted.
    #[inline]
    pub fn allow(
        &self,
        limits: &CardLimits,
        out: bool,
        packets: u64,
        bytes: usize,
        clock: &MeterClock,
    ) -> bool {
        if limits.is_unlimited() {
            return true;
        }
        let over = charge(
            [&self.pps, &self.out, &self.inb],
            [limits.pps, limits.bw_out_bps, limits.bw_in_bps],
            clock.now(),
            out,
            packets,
            bytes,
        );
        let c = match over {
            None => return true,
            Some(Allowance::Pps) => &self.pps_allowance_exceeded,
            Some(Allowance::BwOut) => &self.bw_out_allowance_exceeded,
            Some(_) => &self.bw_in_allowance_exceeded,
        };
        c.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// (pps, bw_out, bw_in) allowance excess counts.
    pub fn exceeded(&self) -> [u64; 3] {
        [
            self.pps_allowance_exceeded.load(Ordering::Relaxed),
            self.bw_out_allowance_exceeded.load(Ordering::Relaxed),
            self.bw_in_allowance_exceeded.load(Ordering::Relaxed),
        ]
    }
}

/// Charge one frame (or a segmentation-offload burst) against a pps meter
/// and the bandwidth meter of its direction: `meters` and `rates` are
/// (pps, out, in). The first allowance exceeded, if any; the pps meter is
/// charged even when the bandwidth one then refuses.
#[inline]
pub(crate) fn charge(
    meters: [&Meter; 3],
    rates: [u64; 3],
    now: u64,
    out: bool,
    packets: u64,
    bytes: usize,
) -> Option<Allowance> {
    let bits = bytes as u64 * 8;
    if !meters[0].admit(now, packets, rates[0]) {
        Some(Allowance::Pps)
    } else if out && !meters[1].admit(now, bits, rates[1]) {
        Some(Allowance::BwOut)
    } else if !out && !meters[2].admit(now, bits, rates[2]) {
        Some(Allowance::BwIn)
    } else {
        None
    }
}

/// How much of a burst a meter tolerates: this much time's worth of its
/// rate, so a sender that pauses may catch up briefly (EC2 allows bursts
/// too), but a flood is held to the rate.
const BURST_NS: u64 = 50_000_000;

/// A GCRA meter.
#[derive(Debug, Default)]
pub(crate) struct Meter {
    tat: AtomicU64,
}

impl Meter {
    /// Admit `units` at `rate` units per second at time `now` (ns).
    pub fn admit(&self, now: u64, units: u64, rate: u64) -> bool {
        if rate == 0 {
            return true;
        }
        let cost = units.saturating_mul(1_000_000_000) / rate;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let base = tat.max(now);
            if base - now > BURST_NS {
                return false;
            }
            match self.tat.compare_exchange_weak(
                tat,
                base.saturating_add(cost),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(t) => tat = t,
            }
        }
    }

    pub fn reset(&self) {
        self.tat.store(0, Ordering::Relaxed);
    }
}

/// The meters and allowance counters of one port (inside its counters).
#[derive(Debug, Default)]
pub(crate) struct PortMeters {
    pub pps: Meter,
    pub out: Meter,
    pub inb: Meter,
    pub linklocal: Meter,
}

/// Which allowance a drop exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Allowance {
    Pps,
    BwOut,
    BwIn,
    LinkLocal,
}

/// The meters' clock for one frame, read at most once: every allowance the
/// frame is charged against (its ENI's and its card's, sending, and its
/// destination's when delivered) sees the same instant. A clock read costs
/// tens of nanoseconds on a VM, more than the meter itself.
#[derive(Debug, Default)]
pub(crate) struct MeterClock(Cell<u64>);

impl MeterClock {
    #[inline]
    pub fn now(&self) -> u64 {
        match self.0.get() {
            // `now_ns` never returns 0: it starts at one burst.
            0 => {
                let t = now_ns();
                self.0.set(t);
                t
            }
            t => t,
        }
    }
}

/// Nanoseconds on the meters' clock (monotonic, process-wide), offset by
/// one burst so a fresh meter (TAT 0) is never in the future.
///
/// `CLOCK_MONOTONIC_COARSE`: a few nanoseconds through the vDSO where a
/// precise read costs 25-60 ns on this VM, for a resolution of one kernel
/// tick (4 ms at HZ=250). Against a 50 ms burst that only lets a meter
/// admit up to one tick more of its rate at a tick boundary; the long-run
/// rate is exact. Falls back to `Instant` if the coarse clock is refused.
pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes one `timespec` through the pointer,
    // which points to a live local of that type.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc == 0 {
        (ts.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec as u64)
            .saturating_add(BURST_NS)
    } else {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + BURST_NS
    }
}

/// How far apart two distinct readings of [`now_ns`] are at least (the
/// coarse clock's tick), for tests that allow for it.
#[cfg(test)]
pub(crate) fn resolution_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as in `now_ns`: one `timespec` written to a live local.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc == 0 {
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    } else {
        1
    }
}

/// Frames on the wire: a segmentation-offload frame counts as the segments
/// it becomes.
pub(crate) fn wire_packets(len: usize, gso_size: Option<u16>) -> u64 {
    match gso_size {
        Some(mss) if mss > 0 => (len as u64).div_ceil(u64::from(mss)).max(1),
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meter_holds_a_flood_to_its_rate_after_the_burst() {
        // 1000 pps: a burst of 50 ms is 50 packets (51 with the first).
        let m = Meter::default();
        let t0 = 1_000_000_000;
        let passed = (0..200).filter(|_| m.admit(t0, 1, 1000)).count();
        assert_eq!(passed, 51);
        // 100 ms later the meter has drained: the same burst again.
        let passed = (0..200)
            .filter(|_| m.admit(t0 + 100_000_000, 1, 1000))
            .count();
        assert_eq!(passed, 51);
        // 10 ms after that, ten more.
        let passed = (0..200)
            .filter(|_| m.admit(t0 + 110_000_000, 1, 1000))
            .count();
        assert_eq!(passed, 10);
        // Unlimited admits everything.
        assert!((0..10_000).all(|_| m.admit(t0, 1, 0)));
    }

    #[test]
    fn meter_paces_a_steady_sender_without_drops() {
        let m = Meter::default();
        // 10,000 pps offered at exactly 10,000 pps for one second.
        let dropped = (0..10_000u64)
            .filter(|i| !m.admit(1_000_000_000 + i * 100_000, 1, 10_000))
            .count();
        assert_eq!(dropped, 0);
        // Bytes: 1 Mbit/s is 125,000 bytes/s; 1500-byte frames every 12 ms
        // fit exactly.
        let b = Meter::default();
        let dropped = (0..100u64)
            .filter(|i| !b.admit(1_000_000_000 + i * 12_000_000, 1500 * 8, 1_000_000))
            .count();
        assert_eq!(dropped, 0);
    }

    #[test]
    fn wire_packets_counts_segments() {
        assert_eq!(wire_packets(64, None), 1);
        assert_eq!(wire_packets(3000, Some(1000)), 3);
        assert_eq!(wire_packets(3001, Some(1000)), 4);
        assert_eq!(wire_packets(10, Some(0)), 1);
    }
}

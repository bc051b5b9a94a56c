//! Packet capture taps: copies of what one port sends and receives.
//!
//! A [`CaptureTable`] holds one bitmask per port id (which capture slots
//! watch it) and up to [`MAX_CAPTURES`] slots, each a bounded lock-free ring
//! of copied frames. The packet path pays one relaxed load per frame when
//! nothing is captured; when a port is watched, the frame is copied (at most
//! [`SNAPLEN`] bytes) into each watching slot's ring, and a full ring drops
//! the copy (counted), never the frame.
//!
//! The switch taps frames a guest transmits as they enter the pipeline
//! (before any rewrite) and frames emitted toward a port once its queue took
//! them. A capture follows the port id, not the ENI: stop it before the id
//! is given to another interface.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;

use crate::{PortId, MAX_PORTS};

/// Captures that can run at once (bits of a port's mask).
pub const MAX_CAPTURES: usize = 16;

/// Longest copy of one frame, in bytes (pcap's usual snap length).
pub const SNAPLEN: usize = 65535;

/// Largest ring a capture may ask for, in frames.
pub const MAX_RING: usize = 1 << 16;

/// Which way a captured frame went, seen from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The guest transmitted it (into the switch).
    FromGuest,
    /// The switch delivered it toward the guest.
    ToGuest,
}

/// One copied frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedFrame {
    /// Wall-clock time of the copy, nanoseconds since the Unix epoch.
    pub unix_nanos: u64,
    pub port: PortId,
    pub direction: Direction,
    /// The frame's length on the wire.
    pub orig_len: u32,
    /// The first [`SNAPLEN`] bytes at most.
    pub data: Box<[u8]>,
}

/// Why a capture could not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaptureError {
    /// Port id at or above the switch's port count.
    #[error("port {0} is out of range")]
    BadPort(PortId),
    /// Every slot is taken.
    #[error("{MAX_CAPTURES} captures already run; stop one first")]
    Busy,
}

struct Slot {
    in_use: AtomicBool,
    ring: ArcSwapOption<ArrayQueue<CapturedFrame>>,
    /// Copies lost because the ring was full.
    dropped: AtomicU64,
}

/// Every port's watch mask and the capture slots. One per switch.
pub struct CaptureTable {
    masks: Box<[AtomicU16]>,
    slots: [Slot; MAX_CAPTURES],
}

impl std::fmt::Debug for CaptureTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureTable").finish_non_exhaustive()
    }
}

impl Default for CaptureTable {
    fn default() -> Self {
        CaptureTable {
            masks: (0..MAX_PORTS).map(|_| AtomicU16::new(0)).collect(),
            slots: std::array::from_fn(|_| Slot {
                in_use: AtomicBool::new(false),
                ring: ArcSwapOption::empty(),
                dropped: AtomicU64::new(0),
            }),
        }
    }
}

impl CaptureTable {
    /// The packet path's check: which slots watch `port` (0: none).
    #[inline]
    pub fn watching(&self, port: PortId) -> u16 {
        match self.masks.get(port as usize) {
            Some(m) => m.load(Ordering::Relaxed),
            None => 0,
        }
    }

    /// Copy `frame` into every slot in `mask`. Called only when
    /// [`watching`](Self::watching) said someone is.
    #[cold]
    pub fn record(&self, mask: u16, port: PortId, direction: Direction, frame: &[u8]) {
        let unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let take = frame.len().min(SNAPLEN);
        for (i, slot) in self.slots.iter().enumerate() {
            if mask & (1 << i) == 0 {
                continue;
            }
            let ring = slot.ring.load();
            let Some(ring) = ring.as_ref() else { continue };
            let copy = CapturedFrame {
                unix_nanos,
                port,
                direction,
                orig_len: u32::try_from(frame.len()).unwrap_or(u32::MAX),
                data: frame[..take].into(),
            };
            if ring.push(copy).is_err() {
                slot.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Start capturing `port` into a ring of `capacity` frames (clamped to
    /// 1..=[`MAX_RING`]).
    pub fn start(self: &Arc<Self>, port: PortId, capacity: usize) -> Result<Capture, CaptureError> {
        let mask = self
            .masks
            .get(port as usize)
            .ok_or(CaptureError::BadPort(port))?;
        let slot = self
            .slots
            .iter()
            .position(|s| {
                s.in_use
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            })
            .ok_or(CaptureError::Busy)?;
        let s = &self.slots[slot];
        s.dropped.store(0, Ordering::Relaxed);
        s.ring
            .store(Some(Arc::new(ArrayQueue::new(capacity.clamp(1, MAX_RING)))));
        // Ring first, then the bit: a worker that sees the bit finds a ring.
        mask.fetch_or(1 << slot, Ordering::Release);
        Ok(Capture {
            table: Arc::clone(self),
            slot,
            port,
        })
    }

    /// Captures running now.
    pub fn active(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.in_use.load(Ordering::Relaxed))
            .count()
    }
}

/// A running capture; stops when dropped.
pub struct Capture {
    table: Arc<CaptureTable>,
    slot: usize,
    port: PortId,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("slot", &self.slot)
            .field("port", &self.port)
            .finish()
    }
}

impl Capture {
    /// The next copied frame, oldest first (None: the ring is empty now).
    pub fn next_frame(&self) -> Option<CapturedFrame> {
        self.table.slots[self.slot].ring.load().as_ref()?.pop()
    }

    /// Copies lost so far because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.table.slots[self.slot].dropped.load(Ordering::Relaxed)
    }

    /// The port captured.
    pub fn port(&self) -> PortId {
        self.port
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(m) = self.table.masks.get(self.port as usize) {
            m.fetch_and(!(1 << self.slot), Ordering::Release);
        }
        let s = &self.table.slots[self.slot];
        s.ring.store(None);
        s.in_use.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_watched_ports_and_stops_on_drop() {
        let t = Arc::new(CaptureTable::default());
        assert_eq!(t.watching(3), 0);
        let c = t.start(3, 8).expect("start");
        assert_ne!(t.watching(3), 0);
        assert_eq!(t.watching(4), 0);
        t.record(t.watching(3), 3, Direction::FromGuest, &[1, 2, 3]);
        let f = c.next_frame().expect("one frame");
        assert_eq!(
            (f.port, f.direction, &*f.data, f.orig_len),
            (3, Direction::FromGuest, &[1u8, 2, 3][..], 3)
        );
        assert!(f.unix_nanos > 0);
        assert!(c.next_frame().is_none());
        drop(c);
        assert_eq!(t.watching(3), 0);
        assert_eq!(t.active(), 0);
    }

    #[test]
    fn full_ring_counts_lost_copies() {
        let t = Arc::new(CaptureTable::default());
        let c = t.start(1, 2).expect("start");
        for i in 0..5u8 {
            t.record(t.watching(1), 1, Direction::ToGuest, &[i]);
        }
        assert_eq!(c.dropped(), 3);
        assert_eq!(c.next_frame().map(|f| f.data[0]), Some(0));
        assert_eq!(c.next_frame().map(|f| f.data[0]), Some(1));
        assert!(c.next_frame().is_none());
    }

    #[test]
    fn two_captures_of_one_port_each_get_a_copy_and_long_frames_are_cut() {
        let t = Arc::new(CaptureTable::default());
        let a = t.start(7, 4).expect("a");
        let b = t.start(7, 4).expect("b");
        let big = vec![0xabu8; SNAPLEN + 10];
        t.record(t.watching(7), 7, Direction::ToGuest, &big);
        for c in [&a, &b] {
            let f = c.next_frame().expect("copy");
            assert_eq!(f.data.len(), SNAPLEN);
            assert_eq!(f.orig_len as usize, SNAPLEN + 10);
        }
        drop(a);
        assert_ne!(t.watching(7), 0, "b still watches");
        drop(b);
        assert_eq!(t.watching(7), 0);
    }

    #[test]
    fn bad_port_and_full_table_are_errors() {
        let t = Arc::new(CaptureTable::default());
        assert_eq!(
            t.start(MAX_PORTS as PortId, 1).map(|_| ()),
            Err(CaptureError::BadPort(MAX_PORTS as PortId))
        );
        let held: Vec<Capture> = (0..MAX_CAPTURES)
            .map(|_| t.start(0, 1).expect("slot"))
            .collect();
        assert_eq!(t.start(0, 1).map(|_| ()), Err(CaptureError::Busy));
        drop(held);
        assert!(t.start(0, 1).is_ok());
    }
}

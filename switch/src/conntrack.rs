//! Connection tracking for security groups: a fixed-size, lock-free,
//! open-addressed table shared by every worker.
//!
//! One entry per flow per hop: the key is the flow's 5-tuple together with
//! the two switch ports it travels between, put in a canonical order so both
//! directions find the same entry. An entry exists only once both ends'
//! security groups admitted the flow, so finding it admits a packet in either
//! direction; rule changes do not touch the table, so a tracked flow outlives
//! the rule that admitted it, as in AWS.
//!
//! Each slot is four `AtomicU64`s (32 bytes): a control word (busy bit,
//! valid bit, version) used as a seqlock, two key words and a state word
//! (last-seen second and TCP/UDP flags). Readers never block: a slot being
//! rewritten is skipped, and a reader that saw the version change retries
//! nothing, it just treats the slot as a miss. Writers claim a slot with one
//! compare-and-swap on the control word. Expired entries are reclaimed in
//! place by the next insert that probes them.

use std::hash::BuildHasher;
use std::net::Ipv4Addr;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use crate::wire::ipv4::protocol;
use crate::{prefetch, PortId};

/// Slots in a bucket: 8 x 32 bytes, four cache lines. A key may live in
/// either of two buckets chosen by independent hashes (two-choice hashing),
/// which keeps refusals rare up to high loads.
const BUCKET: usize = 8;
const PROBE: usize = 2 * BUCKET;

const BUSY: u64 = 1;
const VALID: u64 = 2;
const VERSION_ONE: u64 = 4;

/// The two switch ports in a key's `k1` (12 bits each).
const PORT_BITS: u64 = 0xff_ffff;

/// Flags kept in the state word's upper half.
pub(crate) mod flag {
    /// A packet went from the canonical `b` side to `a` after the entry was
    /// made by an `a`-to-`b` packet (or the reverse): the flow is two-way.
    pub const REPLIED: u32 = 1;
    /// The entry was created by a packet from the canonical `b` side.
    pub const FROM_B: u32 = 2;
    pub const FIN_A: u32 = 4;
    pub const FIN_B: u32 = 8;
    pub const RST: u32 = 16;
    /// The entry holds one of the canonical `a` (`b`) side's allowance of
    /// tracked connections, to give back when it goes.
    pub const CHARGED_A: u32 = 32;
    pub const CHARGED_B: u32 = 64;
}

/// The switch port whose allowance an entry (its `k1` and state words)
/// holds, if any.
#[inline]
fn charged(k1: u64, state: u64) -> Option<PortId> {
    let flags = (state >> 32) as u32;
    let key = Key {
        k0: 0,
        k1,
        from_b: false,
    };
    let (a, b) = key.ports();
    if flags & flag::CHARGED_A != 0 {
        Some(a)
    } else if flags & flag::CHARGED_B != 0 {
        Some(b)
    } else {
        None
    }
}

/// Idle timeouts in seconds. The defaults are AWS's documented ones where it
/// documents them (TCP established, UDP, other protocols); the half-open and
/// closing TCP values are ours, so a SYN scan cannot pin entries for days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_established: u32,
    pub tcp_half_open: u32,
    pub tcp_closing: u32,
    pub udp_single: u32,
    pub udp_stream: u32,
    pub other: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_established: 432_000,
            tcp_half_open: 120,
            tcp_closing: 10,
            udp_single: 30,
            udp_stream: 180,
            other: 600,
        }
    }
}

impl Timeouts {
    fn of(&self, proto: u8, flags: u32) -> u32 {
        match proto {
            protocol::TCP => {
                if flags & flag::RST != 0
                    || flags & (flag::FIN_A | flag::FIN_B) == (flag::FIN_A | flag::FIN_B)
                {
                    self.tcp_closing
                } else if flags & flag::REPLIED != 0 {
                    self.tcp_established
                } else {
                    self.tcp_half_open
                }
            }
            protocol::UDP => {
                if flags & flag::REPLIED != 0 {
                    self.udp_stream
                } else {
                    self.udp_single
                }
            }
            _ => self.other,
        }
    }
}

/// One direction of a flow as seen on the wire, between two switch ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tuple {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub from: PortId,
    pub to: PortId,
}

/// The canonical key: both directions of a flow map to the same words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    k0: u64,
    k1: u64,
    /// The tuple's sender is the canonical `b` side.
    pub from_b: bool,
}

impl Tuple {
    pub fn key(&self) -> Key {
        let s = (u32::from(self.src), self.src_port, self.from);
        let d = (u32::from(self.dst), self.dst_port, self.to);
        let (a, b, from_b) = if s <= d { (s, d, false) } else { (d, s, true) };
        let k0 = (u64::from(a.0) << 32) | u64::from(b.0);
        let k1 = (u64::from(a.1) << 48)
            | (u64::from(b.1) << 32)
            | (u64::from(self.protocol) << 24)
            | (u64::from(a.2 & 0xfff) << 12)
            | u64::from(b.2 & 0xfff);
        Key { k0, k1, from_b }
    }
}

impl Key {
    fn protocol(&self) -> u8 {
        (self.k1 >> 24) as u8
    }

    fn ports(&self) -> (PortId, PortId) {
        (
            ((self.k1 >> 12) & 0xfff) as PortId,
            (self.k1 & 0xfff) as PortId,
        )
    }
}

#[repr(C, align(32))]
#[derive(Default)]
struct Slot {
    ctl: AtomicU64,
    k0: AtomicU64,
    k1: AtomicU64,
    /// last-seen second (low 32 bits) | flags (high 32 bits)
    state: AtomicU64,
}

/// A found entry: where it is and what its state word said.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hit {
    idx: usize,
    ctl: u64,
    state: u64,
}

impl Hit {
    pub fn flags(&self) -> u32 {
        (self.state >> 32) as u32
    }

    /// Where the entry is, and the control word that names this entry
    /// there (for [`Conntrack::refresh`]).
    pub fn at(&self) -> (usize, u64) {
        (self.idx, self.ctl)
    }
}

/// The table is full where this key hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

/// Totals of the table, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConntrackStats {
    pub capacity: u64,
    /// Entries that are valid and not expired.
    pub tracked: u64,
    pub inserted: u64,
    /// New flows refused because their probe window was full.
    pub full: u64,
}

pub(crate) struct Conntrack {
    slots: Slots,
    mask: usize,
    seed: u64,
    timeouts: Timeouts,
    inserted: AtomicU64,
    full: AtomicU64,
}

impl std::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conntrack")
            .field("capacity", &self.slots.len())
            .finish_non_exhaustive()
    }
}

#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Conntrack {
    /// A table of `capacity` slots (rounded up to a power of two, at least
    /// one bucket). The hash is keyed with a random seed so a guest cannot aim
    /// its flows at one probe window of another tenant.
    pub fn new(capacity: usize, timeouts: Timeouts) -> Conntrack {
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64);
        Conntrack::with_seed(capacity, timeouts, seed)
    }

    /// As [`new`](Self::new), with the hash seed given: two tables with
    /// one seed place every key alike (tests that compare two switches).
    pub fn with_seed(capacity: usize, timeouts: Timeouts, seed: u64) -> Conntrack {
        let n = capacity.max(BUCKET).next_power_of_two();
        let slots = Slots::new(n);
        Conntrack {
            slots,
            mask: n - 1,
            seed,
            timeouts,
            inserted: AtomicU64::new(0),
            full: AtomicU64::new(0),
        }
    }

    /// The first slots of the key's two buckets. They depend on the
    /// 5-tuple only, not on the two switch ports, so they can be prefetched
    /// before the route lookup has found the destination port.
    #[inline]
    fn buckets(&self, key: &Key) -> [usize; 2] {
        let h = mix(key.k0 ^ mix((key.k1 & !PORT_BITS) ^ self.seed));
        let b1 = (h as usize) & self.mask & !(BUCKET - 1);
        let b2 = ((h >> 32) as usize).wrapping_mul(BUCKET) & self.mask;
        [b1, b2]
    }

    /// The slot index of the `i`th probe (0..PROBE).
    #[inline]
    fn probe(buckets: &[usize; 2], i: usize) -> usize {
        buckets[i / BUCKET] + i % BUCKET
    }

    #[inline]
    fn expired(&self, proto: u8, state: u64, now: u32) -> bool {
        let seen = state as u32;
        let flags = (state >> 32) as u32;
        now.wrapping_sub(seen) > self.timeouts.of(proto, flags)
    }

    /// Start loading the two buckets of the tuple's flow into the cache, so
    /// a lookup or insert soon after does not wait on memory. The switch
    /// ports of the tuple do not matter.
    #[inline]
    pub fn prefetch(&self, tuple: &Tuple) {
        let [b, _] = self.buckets(&tuple.key());
        prefetch(&self.slots[b]);
        prefetch(&self.slots[b + BUCKET / 4]);
    }

    /// The live entry for `key`, if any.
    #[inline]
    pub fn lookup(&self, key: &Key, now: u32) -> Option<Hit> {
        let buckets = self.buckets(key);
        for i in 0..PROBE {
            let idx = Self::probe(&buckets, i);
            let slot = &self.slots[idx];
            let c1 = slot.ctl.load(Ordering::Acquire);
            if c1 & (BUSY | VALID) != VALID {
                continue;
            }
            let k0 = slot.k0.load(Ordering::Relaxed);
            let k1 = slot.k1.load(Ordering::Relaxed);
            let state = slot.state.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if slot.ctl.load(Ordering::Relaxed) != c1 {
                continue;
            }
            if k0 == key.k0 && k1 == key.k1 {
                if self.expired(key.protocol(), state, now) {
                    return None;
                }
                return Some(Hit {
                    idx,
                    ctl: c1,
                    state,
                });
            }
        }
        None
    }

    /// Refresh an entry's last-seen time and add flags. Skipped when
    /// nothing would change, so a busy flow does not bounce the cache line
    /// between workers more than once a second.
    #[inline]
    pub fn touch(&self, hit: &Hit, now: u32, add: u32) {
        let flags = hit.flags() | add;
        let new = (u64::from(flags) << 32) | u64::from(now);
        if new == hit.state {
            return;
        }
        let slot = &self.slots[hit.idx];
        // A slot reclaimed since the lookup belongs to another flow now.
        if slot.ctl.load(Ordering::Acquire) == hit.ctl {
            slot.state.store(new, Ordering::Relaxed);
        }
    }

    /// Start loading slot `idx` (one a lookup found before).
    #[inline]
    pub fn prefetch_slot(&self, idx: usize) {
        if let Some(slot) = self.slots.get(idx) {
            prefetch(slot);
        }
    }

    /// For an entry a lookup found at `idx` with control word `ctl`
    /// ([`Hit::at`]): if the slot still holds that entry (no insert,
    /// sweep or clear has touched it since: each bumps the version in the
    /// control word) and it has not expired, refresh it as
    /// [`touch`](Self::touch) does and say so. The flow cache's way to a
    /// tracked flow without hashing and comparing its key again.
    #[inline]
    pub fn refresh(&self, idx: usize, ctl: u64, now: u32, add: u32) -> bool {
        let Some(slot) = self.holding(idx, ctl) else {
            return false;
        };
        let k1 = slot.k1.load(Ordering::Relaxed);
        let state = slot.state.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if slot.ctl.load(Ordering::Relaxed) != ctl || self.expired((k1 >> 24) as u8, state, now) {
            return false;
        }
        self.touch(&Hit { idx, ctl, state }, now, add);
        true
    }

    /// Whether slot `idx` still holds the entry whose control word was
    /// `ctl` (nothing has inserted, swept or cleared it since).
    #[inline]
    pub fn holds(&self, idx: usize, ctl: u64) -> bool {
        self.holding(idx, ctl).is_some()
    }

    /// Slot `idx`, if it holds the entry whose control word was `ctl`.
    #[inline]
    fn holding(&self, idx: usize, ctl: u64) -> Option<&Slot> {
        self.slots
            .get(idx)
            .filter(|s| s.ctl.load(Ordering::Acquire) == ctl)
    }

    /// Whether slot `idx` holds a live entry (or one being written).
    #[inline]
    fn occupied(&self, idx: usize, now: u32) -> bool {
        let slot = &self.slots[idx];
        let c = slot.ctl.load(Ordering::Acquire);
        if c & BUSY != 0 {
            return true;
        }
        if c & VALID == 0 {
            return false;
        }
        let k1 = slot.k1.load(Ordering::Relaxed);
        let state = slot.state.load(Ordering::Relaxed);
        !self.expired((k1 >> 24) as u8, state, now)
    }

    /// Track a new flow. Reuses a free or expired slot in the key's probe
    /// window, in the less occupied of its two buckets first (two-choice
    /// hashing: filling the first bucket first would refuse flows at under
    /// half load); `Full` if there is none. When an expired entry was
    /// reclaimed, the port whose allowance it held (to give it back).
    pub fn insert(&self, key: &Key, now: u32, flags: u32) -> Result<Option<PortId>, Full> {
        let [b1, b2] = self.buckets(key);
        let used = |b: usize| (b..b + BUCKET).filter(|&i| self.occupied(i, now)).count();
        let buckets = if b1 != b2 && used(b2) < used(b1) {
            [b2, b1]
        } else {
            [b1, b2]
        };
        let flags = flags | if key.from_b { flag::FROM_B } else { 0 };
        for i in 0..PROBE {
            let idx = Self::probe(&buckets, i);
            let slot = &self.slots[idx];
            let c = slot.ctl.load(Ordering::Acquire);
            if c & BUSY != 0 {
                continue;
            }
            let mut evicted = None;
            if c & VALID != 0 {
                let k1 = slot.k1.load(Ordering::Relaxed);
                let state = slot.state.load(Ordering::Relaxed);
                if !self.expired((k1 >> 24) as u8, state, now) {
                    continue;
                }
                // Consistent with `c`: the CAS below fails if a writer
                // rewrote the slot since.
                evicted = charged(k1, state);
            }
            let version = (c & !(BUSY | VALID)).wrapping_add(VERSION_ONE);
            if slot
                .ctl
                .compare_exchange(c, version | BUSY, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            fence(Ordering::Release);
            slot.k0.store(key.k0, Ordering::Relaxed);
            slot.k1.store(key.k1, Ordering::Relaxed);
            slot.state
                .store((u64::from(flags) << 32) | u64::from(now), Ordering::Relaxed);
            slot.ctl.store(version | VALID, Ordering::Release);
            self.inserted.fetch_add(1, Ordering::Relaxed);
            return Ok(evicted);
        }
        self.full.fetch_add(1, Ordering::Relaxed);
        Err(Full)
    }

    /// Invalidate every entry that involves `port`; call before a port id is
    /// given to another ENI. Walks the whole table; `release` gets the port
    /// whose allowance each invalidated entry held.
    pub fn forget_port(&self, port: PortId, release: impl FnMut(PortId)) -> usize {
        self.retain(
            0..self.slots.len(),
            |key, _| {
                let (a, b) = key.ports();
                a != (port & 0xfff) && b != (port & 0xfff)
            },
            release,
        )
    }

    /// Drop every entry.
    pub fn clear(&self, release: impl FnMut(PortId)) -> usize {
        self.retain(0..self.slots.len(), |_, _| false, release)
    }

    /// Invalidate the expired entries among slots `range` (clamped to the
    /// table), so the allowances they held come back even when no new
    /// flow happens to probe their slots.
    pub fn sweep(
        &self,
        range: std::ops::Range<usize>,
        now: u32,
        release: impl FnMut(PortId),
    ) -> usize {
        self.retain(
            range,
            |key, state| !self.expired(key.protocol(), state, now),
            release,
        )
    }

    /// Slots in the table.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn retain(
        &self,
        range: std::ops::Range<usize>,
        keep: impl Fn(&Key, u64) -> bool,
        mut release: impl FnMut(PortId),
    ) -> usize {
        let mut removed = 0;
        let end = range.end.min(self.slots.len());
        for slot in self.slots.get(range.start.min(end)..end).unwrap_or(&[]) {
            let c = slot.ctl.load(Ordering::Acquire);
            if c & (BUSY | VALID) != VALID {
                continue;
            }
            let key = Key {
                k0: slot.k0.load(Ordering::Relaxed),
                k1: slot.k1.load(Ordering::Relaxed),
                from_b: false,
            };
            let state = slot.state.load(Ordering::Relaxed);
            if keep(&key, state) {
                continue;
            }
            let version = (c & !(BUSY | VALID)).wrapping_add(VERSION_ONE);
            if slot
                .ctl
                .compare_exchange(c, version, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                removed += 1;
                if let Some(p) = charged(key.k1, state) {
                    release(p);
                }
            }
        }
        removed
    }

    /// Live entries per port (each entry counts for both of its ports), and
    /// the totals. Walks the whole table.
    pub fn census(&self, now: u32, per_port: &mut [u64]) -> ConntrackStats {
        let mut tracked = 0;
        for slot in self.slots.iter() {
            let c = slot.ctl.load(Ordering::Acquire);
            if c & (BUSY | VALID) != VALID {
                continue;
            }
            let k1 = slot.k1.load(Ordering::Relaxed);
            let state = slot.state.load(Ordering::Relaxed);
            if self.expired((k1 >> 24) as u8, state, now) {
                continue;
            }
            tracked += 1;
            let key = Key {
                k0: 0,
                k1,
                from_b: false,
            };
            let (a, b) = key.ports();
            for p in [a, b] {
                if let Some(n) = per_port.get_mut(p as usize) {
                    *n += 1;
                }
            }
        }
        ConntrackStats {
            capacity: self.slots.len() as u64,
            tracked,
            inserted: self.inserted.load(Ordering::Relaxed),
            full: self.full.load(Ordering::Relaxed),
        }
    }
}

/// The slot array. On Linux it is its own mapping, advised to use
/// transparent huge pages: a table of tens of MiB probed at random would
/// otherwise pay a TLB miss (a page walk) on top of the cache miss of
/// nearly every lookup.
struct Slots {
    ptr: std::ptr::NonNull<Slot>,
    len: usize,
    /// The mapping to unmap on drop (start, bytes); `None` when the slots
    /// are a leaked `Box<[Slot]>` to be rebuilt and dropped.
    map: Option<(*mut libc::c_void, usize)>,
}

// SAFETY: `Slots` owns its memory exclusively, like a `Box<[Slot]>`, and
// `Slot` is made of atomics, so sharing and sending it is as safe as for
// `Box<[Slot]>`.
unsafe impl Send for Slots {}
// SAFETY: as above: only shared references to atomics are handed out.
unsafe impl Sync for Slots {}

const HUGE_PAGE: usize = 2 << 20;

impl Slots {
    fn new(n: usize) -> Slots {
        let bytes = n * std::mem::size_of::<Slot>();
        if bytes >= HUGE_PAGE {
            if let Some(s) = Self::mapped(n, bytes) {
                return s;
            }
        }
        let boxed: Box<[Slot]> = (0..n).map(|_| Slot::default()).collect();
        let len = boxed.len();
        let ptr = std::ptr::NonNull::from(Box::leak(boxed)).cast::<Slot>();
        Slots {
            ptr,
            len,
            map: None,
        }
    }

    /// An anonymous mapping with a huge-page-aligned start, advised to use
    /// huge pages and touched once so no packet pays a page fault.
    fn mapped(n: usize, bytes: usize) -> Option<Slots> {
        let map_len = bytes + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // affected, and failure is checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let offset = (HUGE_PAGE - (base as usize) % HUGE_PAGE) % HUGE_PAGE;
        // SAFETY: `offset` < HUGE_PAGE, so the start stays inside the
        // mapping of `bytes + HUGE_PAGE` bytes.
        let start = unsafe { base.cast::<u8>().add(offset) };
        // SAFETY: the range lies inside our own mapping; MADV_HUGEPAGE only
        // changes how it is backed, never its contents. Failure (no THP)
        // leaves ordinary pages, which is fine.
        unsafe {
            libc::madvise(start.cast(), bytes, libc::MADV_HUGEPAGE);
        }
        let ptr = std::ptr::NonNull::new(start.cast::<Slot>())?;
        let slots = Slots {
            ptr,
            len: n,
            map: Some((base, map_len)),
        };
        // Anonymous memory reads as zeros, which is `Slot::default()`;
        // fault every page in now rather than on the packet path.
        for slot in slots.iter().step_by(4096 / std::mem::size_of::<Slot>()) {
            slot.ctl.store(0, Ordering::Relaxed);
        }
        Some(slots)
    }
}

impl std::ops::Deref for Slots {
    type Target = [Slot];

    #[inline]
    fn deref(&self) -> &[Slot] {
        // SAFETY: `ptr` points at `len` initialised slots (zeroed anonymous
        // memory is a valid `Slot`, or a leaked box), aligned (the mapping
        // start is 2 MiB-aligned, the box is a `[Slot]`), alive until drop.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        match self.map {
            // SAFETY: exactly the mapping `mapped` created; no reference
            // into it outlives `self`.
            Some((base, len)) => unsafe {
                libc::munmap(base, len);
            },
            // SAFETY: `ptr`/`len` came from `Box::leak` of a `Box<[Slot]>`
            // and are turned back into that box once.
            None => unsafe {
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                    self.ptr.as_ptr(),
                    self.len,
                )));
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(
        src: [u8; 4],
        sp: u16,
        dst: [u8; 4],
        dp: u16,
        proto: u8,
        from: PortId,
        to: PortId,
    ) -> Tuple {
        Tuple {
            src: Ipv4Addr::from(src),
            dst: Ipv4Addr::from(dst),
            src_port: sp,
            dst_port: dp,
            protocol: proto,
            from,
            to,
        }
    }

    #[test]
    fn both_directions_share_a_key() {
        let fwd = t([10, 0, 1, 10], 40000, [10, 0, 2, 30], 80, 6, 1, 3);
        let rev = t([10, 0, 2, 30], 80, [10, 0, 1, 10], 40000, 6, 3, 1);
        let (kf, kr) = (fwd.key(), rev.key());
        assert_eq!((kf.k0, kf.k1), (kr.k0, kr.k1));
        assert_ne!(kf.from_b, kr.from_b);
        // Another hop of the same 5-tuple (through a router port) differs.
        let hop = t([10, 0, 1, 10], 40000, [10, 0, 2, 30], 80, 6, 7, 3);
        assert_ne!((hop.key().k0, hop.key().k1), (kf.k0, kf.k1));
        // Swapping which port goes with which address differs.
        let swapped = t([10, 0, 1, 10], 80, [10, 0, 2, 30], 40000, 6, 1, 3);
        assert_ne!((swapped.key().k0, swapped.key().k1), (kf.k0, kf.k1));
    }

    #[test]
    fn insert_lookup_expire_reuse() {
        let ct = Conntrack::new(64, Timeouts::default());
        let k = t([10, 0, 1, 10], 5000, [10, 0, 1, 20], 53, 17, 1, 2).key();
        assert!(ct.lookup(&k, 100).is_none());
        ct.insert(&k, 100, 0).unwrap();
        let hit = ct.lookup(&k, 110).expect("tracked");
        assert_eq!(hit.flags() & flag::REPLIED, 0);
        // Single-direction UDP lives 30 s after the last packet.
        assert!(ct.lookup(&k, 130).is_some());
        assert!(ct.lookup(&k, 131).is_none());
        // A reply makes it a stream: 180 s.
        let hit = ct.lookup(&k, 120).unwrap();
        ct.touch(&hit, 120, flag::REPLIED);
        assert!(ct.lookup(&k, 300).is_some());
        assert!(ct.lookup(&k, 301).is_none());
        // The expired slot is reused by the next insert in its window.
        let other = t([10, 0, 1, 10], 5001, [10, 0, 1, 20], 53, 17, 1, 2).key();
        for _ in 0..PROBE {
            let _ = ct.insert(&other, 400, 0);
        }
        let mut per_port = vec![0; 4];
        let stats = ct.census(400, &mut per_port);
        assert!(stats.tracked >= 1 && stats.tracked <= PROBE as u64);
        assert_eq!(per_port[1], stats.tracked);
    }

    #[test]
    fn tcp_timeouts_follow_flags() {
        let to = Timeouts::default();
        assert_eq!(to.of(6, 0), 120);
        assert_eq!(to.of(6, flag::REPLIED), 432_000);
        assert_eq!(to.of(6, flag::REPLIED | flag::FIN_A), 432_000);
        assert_eq!(to.of(6, flag::REPLIED | flag::FIN_A | flag::FIN_B), 10);
        assert_eq!(to.of(6, flag::RST), 10);
        assert_eq!(to.of(1, 0), 600);
        assert_eq!(to.of(17, 0), 30);
        assert_eq!(to.of(17, flag::REPLIED), 180);
    }

    #[test]
    fn half_load_refuses_nothing() {
        // Filling each key's first bucket first refused about 1.5e-4 of the
        // flows at this load; two-choice inserts refuse none.
        let ct = Conntrack::new(1 << 16, Timeouts::default());
        let n = 1u32 << 15;
        for i in 0..n {
            let k = t(
                [10, 0, 1, 10],
                i as u16,
                [10, 0, 2, (i >> 16) as u8],
                80,
                6,
                1,
                2,
            )
            .key();
            assert_eq!(ct.insert(&k, 1, 0), Ok(None), "flow {i}");
        }
        assert_eq!(ct.census(1, &mut []).tracked, u64::from(n));
        for i in 0..n {
            let k = t(
                [10, 0, 1, 10],
                i as u16,
                [10, 0, 2, (i >> 16) as u8],
                80,
                6,
                1,
                2,
            )
            .key();
            assert!(ct.lookup(&k, 1).is_some(), "flow {i}");
        }
    }

    #[test]
    fn full_window_is_reported_and_counted() {
        // One bucket: both choices are the same eight slots.
        let ct = Conntrack::new(BUCKET, Timeouts::default());
        let mut refused = 0;
        for p in 0..(BUCKET as u16 * 2) {
            let k = t([10, 0, 1, 10], p, [10, 0, 1, 20], 80, 6, 1, 2).key();
            if ct.insert(&k, 1, 0).is_err() {
                refused += 1;
            }
        }
        assert_eq!(refused, BUCKET);
        assert_eq!(ct.census(1, &mut []).full, BUCKET as u64);
        // Nothing was charged to anyone: nothing to give back.
        assert_eq!(ct.forget_port(2, |p| panic!("released {p}")), BUCKET);
        assert_eq!(ct.census(1, &mut []).tracked, 0);
    }

    /// Every way an entry leaves the table gives back the allowance it
    /// holds exactly once, to the side its flags name: reclaimed by an
    /// insert, swept once expired, cleared.
    #[test]
    fn removals_release_the_charged_port() {
        // One bucket, so an insert must reclaim an expired entry.
        let ct = Conntrack::new(BUCKET, Timeouts::default());
        let udp = |sp: u16, from: PortId, to: PortId| {
            t([10, 0, 1, 10], sp, [10, 0, 1, 20], 53, 17, from, to).key()
        };
        // Port 1 sends from the lower address: it is the canonical `a`.
        for p in 0..BUCKET as u16 {
            let k = udp(p, 1, 2);
            assert!(!k.from_b);
            let side = if p % 2 == 0 {
                flag::CHARGED_A
            } else {
                flag::CHARGED_B
            };
            assert_eq!(ct.insert(&k, 100, side), Ok(None));
        }
        // Full and live: refused.
        assert_eq!(ct.insert(&udp(99, 3, 4), 100, 0), Err(Full));
        // 31 s later the one-way UDP entries have expired: the insert
        // reclaims one and names the port it was charged to.
        let reclaimed = ct.insert(&udp(99, 3, 4), 131, 0).expect("room");
        assert!(matches!(reclaimed, Some(1) | Some(2)), "{reclaimed:?}");
        // A sweep over part of the table, then the rest, gives back each
        // remaining expired entry once and keeps the live one.
        let mut released = Vec::new();
        let n = ct.sweep(0..3, 131, |p| released.push(p))
            + ct.sweep(3..1000, 131, |p| released.push(p));
        assert_eq!(n, BUCKET - 1);
        released.extend(reclaimed);
        released.sort_unstable();
        assert_eq!(
            released,
            [vec![1; BUCKET / 2], vec![2; BUCKET / 2]].concat()
        );
        assert_eq!(ct.sweep(0..BUCKET, 131, |_| panic!("twice")), 0);
        assert!(ct.lookup(&udp(99, 3, 4), 131).is_some());
        // The live entry was charged to nobody.
        assert_eq!(ct.clear(|p| panic!("released {p}")), 1);
        // Ranges past the end are clamped.
        assert_eq!(ct.sweep(5000..6000, 131, |_| {}), 0);
    }

    #[test]
    fn concurrent_inserts_and_lookups_agree() {
        let ct = std::sync::Arc::new(Conntrack::new(1 << 14, Timeouts::default()));
        let threads: Vec<_> = (0..4u16)
            .map(|w| {
                let ct = ct.clone();
                std::thread::spawn(move || {
                    for i in 0..1000u16 {
                        let k = t([10, 0, 1, 10], w * 1000 + i, [10, 0, 1, 20], 80, 6, 1, 2).key();
                        ct.insert(&k, 5, 0).expect("room");
                        assert!(ct.lookup(&k, 5).is_some());
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().expect("worker");
        }
        assert_eq!(ct.census(5, &mut []).tracked, 4000);
    }
}

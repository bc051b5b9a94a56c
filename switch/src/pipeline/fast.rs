//! The exact-match flow cache: a worker's memory of the last forwarding
//! decision per flow, in front of the policy stages (as Open vSwitch's EMC
//! sits in front of its classifier).
//!
//! A frame's key is its Ethernet addresses and type, its first IPv4 header
//! bytes, addresses, protocol and L4 ports, and the ingress port. An entry
//! holds what [`super::ipv4::handle`] decided for that key: the destination
//! port, its MAC, whether the frame is routed (source MAC rewritten), the
//! flow hash, and the connection-tracking entry that admitted it.
//!
//! Everything the decision read is either in the key, in the snapshot, or in
//! that tracking entry. So an entry is used only while the worker sees the
//! snapshot it was learned under (its epoch), and while the tracking slot
//! holds the same entry (its control word's version moves on every insert,
//! sweep and clear) and that entry has not expired. What is charged or
//! counted per frame still is: the sender's and receiver's allowances, the
//! tx/rx counters and captures (in `process_frame` and `Tx::send`), and the
//! tracking entry's last-seen time and reply flag ([`Conntrack::refresh`]).
//!
//! Not cached, so always decided in full: anything but unfragmented TCP and
//! UDP with a 20-byte IP header; TCP segments with FIN or RST (they change
//! the tracking entry's state); flows whose either end writes flow logs
//! (every packet is a record); new flows (the packet after the first is
//! learned); the internet gateway, load balancer and metadata paths.

use crate::conntrack::Conntrack;
use crate::wire::ipv4::protocol;
use crate::{prefetch, PortId};

/// Entries per worker (a power of two), in sets of two: 288 KiB, half
/// the L2 cache of this machine's cores. Twice as many (Open vSwitch's EMC
/// size) lifted `hot-1k`'s hits from 79% to 91% but made every miss of a
/// large flow set (`tracked-100k`) slower by an L2 miss.
pub(super) const ENTRIES: usize = 4096;

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
/// No tracking entry: neither end has security groups.
const NO_CT: u32 = u32::MAX;

/// A frame's key: bytes 0..16 (MACs, type, version and header length, TOS),
/// 26..34 (addresses) and 34..38 (ports) with the protocol and ingress.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Key([u64; 4]);

impl PartialEq for Key {
    /// Word by word in registers: a derived comparison became 16-byte
    /// loads of the key just stored as 8-byte words, which cannot be
    /// forwarded from the store buffer and so waited for every older
    /// store to reach the cache (frame copies into guest memory among
    /// them).
    #[inline(always)]
    fn eq(&self, o: &Key) -> bool {
        let [a, b, c, d] = self.0;
        let [e, f, g, h] = o.0;
        ((a ^ e) | (b ^ f) | (c ^ g) | (d ^ h)) == 0
    }
}

impl Eq for Key {}

#[inline(always)]
fn word(frame: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&frame[at..at + 8]);
    u64::from_le_bytes(b)
}

impl Key {
    /// The key of a frame the cache may answer for, or `None`. Checks what
    /// the full path's parser would refuse, so a frame sharing a learned
    /// frame's key but malformed (a bad length, a fragment) is never
    /// forwarded from the cache.
    #[inline]
    pub fn of(ingress: PortId, frame: &[u8]) -> Option<Key> {
        let [_, _, _, _, _, _, _, _, _, _, _, _, 0x08, 0x00, 0x45, _, l0, l1, _, _, f0, f1, _, proto, ..] =
            *frame
        else {
            return None;
        };
        let total = usize::from(u16::from_be_bytes([l0, l1]));
        let l4_min = match proto {
            protocol::TCP => 14,
            protocol::UDP => 4,
            _ => return None,
        };
        if total < 20 + l4_min
            || total > frame.len() - 14
            || u16::from_be_bytes([f0, f1]) & 0x3fff != 0
        {
            return None;
        }
        if proto == protocol::TCP && frame[14 + 20 + 13] & (TCP_FIN | TCP_RST) != 0 {
            return None;
        }
        let ports = u64::from(u32::from_le_bytes([
            frame[34], frame[35], frame[36], frame[37],
        ]));
        Some(Key([
            word(frame, 0),
            word(frame, 8),
            word(frame, 26),
            ports | (u64::from(proto) << 32) | (u64::from(ingress) << 48),
        ]))
    }

    /// The key's pair of entries (two ways), and which of the two a new
    /// entry takes when both are in use.
    #[inline]
    fn set(&self, seed: u64) -> (usize, usize) {
        let [a, b, c, d] = self.0;
        // Two 64x64->128-bit multiplies folded (as wyhash does), with the
        // seed inside them. XOR-folding the words before one multiply gave
        // the same hit rates in the bench, but two keys with equal folds
        // then share a set whatever the seed, so a guest could pick its
        // ports to evict a chosen flow of another guest.
        let fold = |x: u64, y: u64| {
            let p = u128::from(x) * u128::from(y);
            (p as u64) ^ ((p >> 64) as u64)
        };
        let h = fold(a ^ c ^ seed, b ^ d ^ 0x9e37_79b9_7f4a_7c15)
            ^ fold(
                c ^ 0xc2b2_ae3d_27d4_eb4f,
                d ^ a.rotate_left(32) ^ 0x1656_67b1_9e37_79f9,
            );
        let h = (h ^ (h >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let i = (h >> (64 - ENTRIES.trailing_zeros())) as usize;
        (i & !1, i & 1)
    }
}

/// What the full path decided for a key (see [`super::Work::learned`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Decision {
    pub dest: PortId,
    pub dst_mac: [u8; 6],
    /// Routed: the source MAC becomes the gateway's.
    pub routed: bool,
    pub hash: u32,
    /// The tracking entry (slot, control word) and the flags a packet of
    /// this direction adds to it; `None` when no end is filtered.
    pub ct: Option<(usize, u64, u32)>,
}

impl Decision {
    /// Address `frame` as decided: its destination MAC, and the gateway's
    /// as the source when routed.
    #[inline]
    pub fn rewrite(&self, frame: &mut [u8]) {
        frame[0..6].copy_from_slice(&self.dst_mac);
        if self.routed {
            frame[6..12].copy_from_slice(&crate::config::GATEWAY_MAC);
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Entry {
    key: Key,
    /// The snapshot epoch it was learned under; 0 is never current.
    epoch: u64,
    ct_ctl: u64,
    ct_idx: u32,
    ct_add: u32,
    hash: u32,
    dest: PortId,
    dst_mac: [u8; 6],
    routed: bool,
}

/// One worker's cache.
pub(super) struct FastCache {
    entries: Box<[Entry]>,
    /// Keyed per worker, so a guest cannot aim its flows at one entry of
    /// everybody's cache.
    seed: u64,
    pub hits: u64,
    /// Recent hits minus misses, within ±[`SCORE`]: whether a look at the
    /// cache pays off for the prefetch hint.
    score: i32,
    /// The last key looked up and its set: a batch's frames mostly belong
    /// to one flow, and the hash is most of a hit's cost. (All zeros is
    /// no key: a key's second word holds the EtherType.)
    last: (Key, usize),
}

const SCORE: i32 = 32;

impl FastCache {
    pub fn new() -> FastCache {
        use std::hash::BuildHasher;
        FastCache {
            entries: vec![Entry::default(); ENTRIES].into_boxed_slice(),
            seed: std::collections::hash_map::RandomState::new().hash_one(0xfa57_u64),
            hits: 0,
            score: 0,
            last: (Key::default(), 0),
        }
    }

    /// The decision for `key` under snapshot `epoch`, if the cache holds
    /// one that is still good (its tracking entry live: refreshed here).
    #[inline]
    pub fn get(&mut self, key: &Key, epoch: u64, ct: &Conntrack, now: u32) -> Option<Decision> {
        let set = if self.last.0 == *key {
            self.last.1
        } else {
            let (set, _) = key.set(self.seed);
            self.last = (*key, set);
            set
        };
        let found = self.find_in(set, key, epoch).copied();
        let live = found.filter(|e| {
            e.ct_idx == NO_CT || ct.refresh(e.ct_idx as usize, e.ct_ctl, now, e.ct_add)
        });
        let Some(e) = live else {
            self.score = (self.score - 1).max(-SCORE);
            return None;
        };
        self.score = (self.score + 1).min(SCORE);
        self.hits += 1;
        let ct_slot = (e.ct_idx != NO_CT).then_some((e.ct_idx as usize, e.ct_ctl, e.ct_add));
        Some(Decision {
            dest: e.dest,
            dst_mac: e.dst_mac,
            routed: e.routed,
            hash: e.hash,
            ct: ct_slot,
        })
    }

    /// Count a frame answered by the decision [`get`](Self::get) gave for
    /// the frame before (the switch's run of one flow).
    #[inline]
    pub fn hit_again(&mut self) {
        self.score = (self.score + 1).min(SCORE);
        self.hits += 1;
    }

    #[inline]
    fn find(&self, key: &Key, epoch: u64) -> Option<&Entry> {
        let (set, _) = key.set(self.seed);
        self.find_in(set, key, epoch)
    }

    #[inline]
    fn find_in(&self, set: usize, key: &Key, epoch: u64) -> Option<&Entry> {
        let set = set & (ENTRIES - 2);
        self.entries[set..set + 2]
            .iter()
            .find(|e| e.epoch == epoch && e.key == *key)
    }

    /// Nearly every recent frame was answered here: a prefetch hint is
    /// not worth its cost (what a hit reads was read a moment ago).
    #[inline]
    pub fn confident(&self) -> bool {
        self.score == SCORE
    }

    /// Start loading what [`get`](Self::get) for `key` will read: the
    /// tracking slot of a cached flow. False when the cache has no entry
    /// for it, or when it has mostly missed lately: then the key's entries
    /// are only prefetched, not read (a flow set far larger than the cache
    /// would otherwise wait here on an L2 miss per frame), and the caller
    /// prefetches for the full path as well.
    #[inline]
    pub fn prefetch(&self, key: &Key, epoch: u64, ct: &Conntrack) -> bool {
        let (set, _) = key.set(self.seed);
        if self.score <= 0 {
            prefetch(&self.entries[set]);
            prefetch(&self.entries[set + 1]);
            return false;
        }
        let Some(e) = self.find(key, epoch) else {
            return false;
        };
        if e.ct_idx != NO_CT {
            ct.prefetch_slot(e.ct_idx as usize);
        }
        true
    }

    /// Remember `d` for `key` under `epoch` (replacing whatever shared its
    /// entry).
    #[inline]
    pub fn learn(&mut self, key: Key, epoch: u64, d: &Decision) {
        let (ct_idx, ct_ctl, ct_add) = match d.ct {
            Some((idx, ctl, add)) => match u32::try_from(idx) {
                Ok(i) if i != NO_CT => (i, ctl, add),
                _ => return,
            },
            None => (NO_CT, 0, 0),
        };
        let (set, pick) = key.set(self.seed);
        let free = |e: &Entry| e.epoch != epoch || e.key == key;
        let way = if free(&self.entries[set]) {
            0
        } else if free(&self.entries[set + 1]) {
            1
        } else {
            pick
        };
        self.entries[set + way] = Entry {
            key,
            epoch,
            ct_ctl,
            ct_idx,
            ct_add,
            hash: d.hash,
            dest: d.dest,
            dst_mac: d.dst_mac,
            routed: d.routed,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::super::flow;
    use super::*;

    /// The flow hash the full path hands the egress for a cacheable frame.
    fn hash_of(frame: &[u8]) -> u32 {
        let ip = |at: usize| {
            std::net::Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3])
        };
        let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
        flow::flow_hash(ip(26), ip(30), frame[23], port(34), port(36))
    }

    fn udp(total: u16, frag: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + usize::from(total).max(28)];
        f[12] = 0x08;
        f[14] = 0x45;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[20..22].copy_from_slice(&frag.to_be_bytes());
        f[23] = protocol::UDP;
        f[26..30].copy_from_slice(&[10, 0, 0, 4]);
        f[30..34].copy_from_slice(&[10, 0, 0, 5]);
        f[34..38].copy_from_slice(&[0x12, 0x34, 0x00, 0x35]);
        f
    }

    #[test]
    fn keys_only_what_the_parser_accepts() {
        let f = udp(28, 0);
        assert!(Key::of(1, &f).is_some());
        assert_ne!(Key::of(1, &f), Key::of(2, &f), "the ingress is in the key");
        // Claims more bytes than the frame has.
        let mut long = f.clone();
        long[16..18].copy_from_slice(&200u16.to_be_bytes());
        assert!(Key::of(1, &long).is_none());
        // Too short for the ports it would key on.
        assert!(Key::of(1, &udp(23, 0)).is_none());
        // Fragments (more-fragments bit, or an offset).
        assert!(Key::of(1, &udp(28, 0x2000)).is_none());
        assert!(Key::of(1, &udp(28, 0x0001)).is_none());
        // Options in the IP header.
        let mut opts = f.clone();
        opts[14] = 0x46;
        assert!(Key::of(1, &opts).is_none());
        // ICMP, and a frame cut short.
        let mut icmp = f.clone();
        icmp[23] = protocol::ICMP;
        assert!(Key::of(1, &icmp).is_none());
        assert!(Key::of(1, &f[..30]).is_none());
        // TCP: FIN and RST take the full path.
        let mut tcp = udp(40, 0);
        tcp[23] = protocol::TCP;
        tcp[47] = 0x10;
        assert!(Key::of(1, &tcp).is_some());
        for flags in [0x11, 0x04] {
            tcp[47] = flags;
            assert!(Key::of(1, &tcp).is_none(), "flags {flags:#x}");
        }
        assert_eq!(
            hash_of(&f),
            flow::flow_hash([10, 0, 0, 4].into(), [10, 0, 0, 5].into(), 17, 0x1234, 0x35)
        );
    }

    #[test]
    fn entries_need_their_epoch_and_tracking_entry() {
        let ct = Conntrack::new(64, Default::default());
        let mut c = FastCache::new();
        let key = Key::of(1, &udp(28, 0)).expect("key");
        let d = Decision {
            dest: 2,
            dst_mac: [2, 0, 0, 0, 0, 2],
            routed: false,
            hash: 7,
            ct: None,
        };
        assert_eq!(c.get(&key, 1, &ct, 0), None);
        c.learn(key, 1, &d);
        assert_eq!(c.get(&key, 1, &ct, 0), Some(d));
        assert_eq!(c.get(&key, 2, &ct, 0), None, "another snapshot");
        // A tracking entry that is not there (slot 3 was never written).
        c.learn(
            key,
            1,
            &Decision {
                ct: Some((3, 6, 0)),
                ..d
            },
        );
        assert_eq!(c.get(&key, 1, &ct, 0), None);
        assert_eq!(c.hits, 1);
    }
}

//! The per-node flow table: a slab of 40-byte flow records and one
//! open-addressing index (linear probing, load ≤ 1/2, backward-shift
//! deletion) holding two 8-byte slots per flow, one per direction. Sized
//! once at start; no allocation afterwards.

use crate::maglev::mix64;

/// A lookup key: the 5-tuple as it appears on the wire plus the service's switch port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Key {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub svc: u32,
    pub proto: u8,
}

impl Key {
    #[inline]
    pub fn hash(&self) -> u64 {
        let a = (u64::from(self.src) << 32) | u64::from(self.dst);
        let b = (u64::from(self.sport) << 48)
            | (u64::from(self.dport) << 32)
            | u64::from(self.svc ^ (u32::from(self.proto) << 24));
        mix64(a ^ mix64(b))
    }
}

pub const F_USED: u8 = 1;
/// The flow is a load-balancer flow (rev key = target → client); else NAT.
pub const F_NLB: u8 = 2;
pub const F_FIN_FWD: u8 = 4;
pub const F_FIN_REV: u8 = 8;
pub const F_RST: u8 = 16;

/// One flow. `src:sport → dst:dport` is the initiator's tuple; `xip:xport`
/// is the NAT address and port, or the load balancer's chosen target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Flow {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub xip: u32,
    pub xport: u16,
    pub proto: u8,
    pub flags: u8,
    pub svc: u32,
    /// Milliseconds since the cluster epoch, wrapping.
    pub last_seen: u32,
    pub shard: u16,
    pub _pad: u16,
    /// Latest client sequence and acknowledgement numbers (NLB TCP), for RSTs.
    pub seq: u32,
    pub ack: u32,
}

impl Flow {
    pub fn fwd_key(&self) -> Key {
        Key {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            svc: self.svc,
            proto: self.proto,
        }
    }

    pub fn rev_key(&self) -> Key {
        if self.flags & F_NLB != 0 {
            Key {
                src: self.xip,
                dst: self.src,
                sport: self.xport,
                dport: self.sport,
                svc: self.svc,
                proto: self.proto,
            }
        } else {
            Key {
                src: self.dst,
                dst: self.xip,
                sport: self.dport,
                dport: self.xport,
                svc: self.svc,
                proto: self.proto,
            }
        }
    }

    fn key(&self, dir: u32) -> Key {
        if dir == 0 {
            self.fwd_key()
        } else {
            self.rev_key()
        }
    }
}

/// Why a flow table operation failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// The table holds `flows_per_node` flows already.
    #[error("the flow table is full")]
    Full,
    /// The allocator could not provide the table.
    #[error("no memory for the flow table")]
    NoMemory,
}

pub struct FlowTable {
    flows: Vec<Flow>,
    free: Vec<u32>,
    /// Slot: high 32 bits = hash >> 32 (position and tag), low 32 = 2*idx + dir + 1; 0 = empty.
    index: Vec<u64>,
    mask: usize,
    len: usize,
    cap: usize,
}

/// Asks the kernel to back a large allocation with transparent huge pages:
/// random lookups over a million flows otherwise miss the TLB on every access.
fn advise_huge<T>(v: &[T], cap: usize) {
    let bytes = cap * std::mem::size_of::<T>();
    if bytes < 4 << 20 {
        return;
    }
    let start = v.as_ptr() as usize;
    let aligned = (start + 4095) & !4095;
    let len = (start + bytes).saturating_sub(aligned) & !4095;
    // SAFETY: madvise only changes paging advice for pages inside this live
    // allocation (rounded inwards to page boundaries); it never touches the
    // contents, and a failure is harmless (the advice is simply not taken).
    unsafe {
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
}

impl FlowTable {
    /// A table for `cap` flows, all memory reserved up front; `NoMemory` when
    /// the allocator cannot provide it.
    pub fn new(cap: usize) -> Result<FlowTable, FlowError> {
        let cap = cap.clamp(1, 1 << 30);
        let slots = (cap * 4).next_power_of_two();
        let mut flows: Vec<Flow> = Vec::new();
        flows
            .try_reserve_exact(cap)
            .map_err(|_| FlowError::NoMemory)?;
        advise_huge(&flows, cap);
        let mut index: Vec<u64> = Vec::new();
        index
            .try_reserve_exact(slots)
            .map_err(|_| FlowError::NoMemory)?;
        advise_huge(&index, slots);
        index.resize(slots, 0);
        let mut free = Vec::new();
        free.try_reserve_exact(cap)
            .map_err(|_| FlowError::NoMemory)?;
        Ok(FlowTable {
            flows,
            free,
            index,
            mask: slots - 1,
            len: 0,
            cap,
        })
    }

    /// Prefetches the index slot and, when the first candidate's tag matches,
    /// the flow record: the batch path calls this a few frames ahead.
    #[inline]
    pub fn prefetch_flow(&self, h: u64) {
        let i = self.home(h);
        let s = self.index[i];
        if s >> 32 == h >> 32 && s != 0 {
            let idx = (((s as u32) - 1) >> 1) as usize;
            if idx < self.flows.len() {
                prefetch_ptr(self.flows.as_ptr().wrapping_add(idx) as *const u8);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Bytes held: records, index and free list, by capacity.
    pub fn memory_bytes(&self) -> usize {
        self.flows.capacity() * std::mem::size_of::<Flow>()
            + self.index.len() * 8
            + self.free.capacity() * 4
    }

    #[inline]
    fn home(&self, h: u64) -> usize {
        ((h >> 32) as usize) & self.mask
    }

    /// Hints the CPU to fetch the index slot for `h`.
    #[allow(dead_code)]
    #[inline]
    pub fn prefetch(&self, h: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            let p = self.index.as_ptr().wrapping_add(self.home(h));
            // SAFETY: prefetch is a hint; it never faults, even on an invalid address,
            // and `p` points into (or one past) the index allocation anyway.
            unsafe {
                std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
            };
        }
    }

    /// Finds the flow for `key`; returns its index and direction (0 = forward, 1 = reverse).
    #[inline]
    pub fn lookup(&self, key: &Key, h: u64) -> Option<(u32, u32)> {
        let tag = h >> 32;
        let mut i = self.home(h);
        for _ in 0..=self.mask {
            let s = self.index[i];
            if s == 0 {
                return None;
            }
            if s >> 32 == tag {
                let v = (s as u32) - 1;
                let (idx, dir) = (v >> 1, v & 1);
                if let Some(f) = self.flows.get(idx as usize) {
                    if f.key(dir) == *key {
                        return Some((idx, dir));
                    }
                }
            }
            i = (i + 1) & self.mask;
        }
        None
    }

    #[inline]
    pub fn get(&self, idx: u32) -> &Flow {
        &self.flows[idx as usize]
    }

    #[inline]
    pub fn get_mut(&mut self, idx: u32) -> &mut Flow {
        &mut self.flows[idx as usize]
    }

    /// Flow at `idx` if that slot is in use (for sweeping).
    pub fn at(&self, idx: usize) -> Option<&Flow> {
        self.flows.get(idx).filter(|f| f.flags & F_USED != 0)
    }

    /// Number of record slots ever used (the sweep range).
    pub fn slots(&self) -> usize {
        self.flows.len()
    }

    fn put(&mut self, h: u64, v: u64) {
        let mut i = self.home(h);
        while self.index[i] != 0 {
            i = (i + 1) & self.mask;
        }
        self.index[i] = ((h >> 32) << 32) | v;
    }

    /// Inserts a flow whose keys are not present yet.
    pub fn insert(&mut self, mut f: Flow) -> Result<u32, FlowError> {
        if self.len >= self.cap {
            return Err(FlowError::Full);
        }
        f.flags |= F_USED;
        let idx = match self.free.pop() {
            Some(i) => {
                self.flows[i as usize] = f;
                i
            }
            None => {
                self.flows.push(f);
                (self.flows.len() - 1) as u32
            }
        };
        self.put(f.fwd_key().hash(), u64::from(idx * 2 + 1));
        self.put(f.rev_key().hash(), u64::from(idx * 2 + 2));
        self.len += 1;
        Ok(idx)
    }

    fn unindex(&mut self, h: u64, v: u64) {
        let mut i = self.home(h);
        loop {
            let s = self.index[i];
            if s == 0 {
                return;
            }
            if s & 0xffff_ffff == v {
                break;
            }
            i = (i + 1) & self.mask;
        }
        // Backward-shift deletion: pull later members of the probe run into the hole.
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & self.mask;
            let s = self.index[j];
            if s == 0 {
                break;
            }
            let home = ((s >> 32) as usize) & self.mask;
            // Move s into the hole unless its home lies cyclically in (hole, j].
            let dist_home = j.wrapping_sub(home) & self.mask;
            let dist_hole = j.wrapping_sub(hole) & self.mask;
            if dist_home >= dist_hole {
                self.index[hole] = s;
                hole = j;
            }
        }
        self.index[hole] = 0;
    }

    pub fn remove(&mut self, idx: u32) {
        let Some(f) = self.flows.get(idx as usize).copied() else {
            return;
        };
        if f.flags & F_USED == 0 {
            return;
        }
        self.unindex(f.fwd_key().hash(), u64::from(idx * 2 + 1));
        self.unindex(f.rev_key().hash(), u64::from(idx * 2 + 2));
        self.flows[idx as usize].flags = 0;
        self.free.push(idx);
        self.len -= 1;
    }
}

#[inline]
fn prefetch_ptr(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is only a hint; it never faults, whatever the address,
    // and callers pass pointers into their own live allocations anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(i: u32) -> Flow {
        Flow {
            src: i,
            dst: 7,
            sport: (i % 60000) as u16,
            dport: 80,
            xip: 9,
            xport: (i % 50000) as u16 + 1024,
            proto: 6,
            svc: 1,
            ..Flow::default()
        }
    }

    #[test]
    fn record_is_40_bytes() {
        assert_eq!(std::mem::size_of::<Flow>(), 40);
    }

    #[test]
    fn insert_lookup_remove_both_directions() {
        let mut t = FlowTable::new(1000).unwrap();
        for i in 0..1000 {
            t.insert(flow(i)).unwrap();
        }
        assert_eq!(t.insert(flow(5000)), Err(FlowError::Full));
        for i in (0..1000).step_by(2) {
            let k = flow(i).fwd_key();
            let (idx, dir) = t.lookup(&k, k.hash()).unwrap();
            assert_eq!(dir, 0);
            t.remove(idx);
        }
        for i in 0..1000 {
            let f = flow(i);
            let fwd = t.lookup(&f.fwd_key(), f.fwd_key().hash());
            let rev = t.lookup(&f.rev_key(), f.rev_key().hash());
            if i % 2 == 0 {
                assert_eq!((fwd, rev), (None, None), "{i}");
            } else {
                assert_eq!(fwd.map(|x| x.1), Some(0), "{i}");
                assert_eq!(rev.map(|x| x.1), Some(1), "{i}");
                assert_eq!(t.get(fwd.unwrap().0).src, i);
            }
        }
        assert_eq!(t.len(), 500);
        assert!(t.memory_bytes() / t.capacity() <= 128);
    }
}

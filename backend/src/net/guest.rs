//! Direct access to guest memory and split rings for one batch.
//!
//! vm-memory's `Bytes` calls look the region up on every access, and
//! vhost-user-backend's `VringState` helpers load the memory `ArcSwap` on
//! every call; per frame that cost more than the switch itself. A worker
//! instead resolves the (few) regions once per batch into a [`MemMap`], and
//! the three ring areas into host pointers ([`Ring`]): after that every
//! access is a bounds check and a load or store.
//!
//! Everything here is bounds-checked against the region table, so a
//! hostile guest can only make an access fail, never reach outside its
//! memory. The guest may write its memory while we read it: copies are
//! plain `memcpy`s of bytes (as vm-memory does) and ring indices are
//! atomic loads and stores.

use std::marker::PhantomData;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use vm_memory::{
    Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

/// Most regions resolved directly; a guest with more falls back to
/// vm-memory's lookup for the rest.
const MAX_REGIONS: usize = 8;

#[derive(Clone, Copy)]
struct Region {
    start: u64,
    len: u64,
    host: *mut u8,
}

/// The guest's memory regions for one batch. Borrowing the memory keeps
/// every mapping alive for as long as the map (and the pointers it gave
/// out, which are used within the same batch only).
pub(crate) struct MemMap<'m> {
    regions: [Region; MAX_REGIONS],
    n: usize,
    /// The region `translate` found last.
    last: std::cell::Cell<usize>,
    mem: &'m GuestMemoryMmap,
}

impl<'m> MemMap<'m> {
    pub fn new(mem: &'m GuestMemoryMmap) -> Self {
        let mut regions = [Region {
            start: 0,
            len: 0,
            host: std::ptr::null_mut(),
        }; MAX_REGIONS];
        let mut n = 0;
        for r in mem.iter() {
            if n == MAX_REGIONS {
                break;
            }
            if let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) {
                regions[n] = Region {
                    start: r.start_addr().raw_value(),
                    len: r.len(),
                    host,
                };
                n += 1;
            }
        }
        MemMap {
            regions,
            n,
            last: std::cell::Cell::new(0),
            mem,
        }
    }

    /// The host address of guest bytes [addr, addr+len), if they lie in
    /// one region. The region of the last hit is tried inline (a
    /// frontend's rings and buffers mostly share one); the rest is a call.
    #[inline(always)]
    pub fn translate(&self, addr: u64, len: usize) -> Option<*mut u8> {
        // Slots past `n` are empty and never match.
        let r = &self.regions[self.last.get() % MAX_REGIONS];
        let off = addr.wrapping_sub(r.start);
        if addr >= r.start && off < r.len {
            let end = off.checked_add(len as u64)?;
            if end > r.len {
                return None;
            }
            // SAFETY: as in `translate_slow`.
            return Some(unsafe { r.host.add(off as usize) });
        }
        self.translate_slow(addr, len)
    }

    /// [`translate`](Self::translate) past the last hit's region.
    #[inline(never)]
    fn translate_slow(&self, addr: u64, len: usize) -> Option<*mut u8> {
        for (i, r) in self.regions[..self.n].iter().enumerate() {
            let Some(off) = addr.checked_sub(r.start) else {
                continue;
            };
            if off < r.len {
                self.last.set(i);
                let end = off.checked_add(len as u64)?;
                if end > r.len {
                    return None;
                }
                // SAFETY: off + len <= r.len, so the result stays inside
                // the region's mapping (a u64 offset below the mapping's
                // length fits in isize).
                return Some(unsafe { r.host.add(off as usize) });
            }
        }
        // Regions past MAX_REGIONS: ask vm-memory.
        if self.n == MAX_REGIONS {
            let r = self.mem.find_region(vm_memory::GuestAddress(addr))?;
            let off = addr - r.start_addr().raw_value();
            if off.checked_add(len as u64)? > r.len() {
                return None;
            }
            return r.get_host_address(MemoryRegionAddress(off)).ok();
        }
        None
    }

    /// Copy guest bytes at host address `src` (from [`translate`] of at
    /// least `dst.len()` bytes in this batch) into `dst`.
    #[inline]
    pub fn read(&self, src: *const u8, dst: &mut [u8]) {
        // SAFETY: `src` came from `translate` on this map for at least
        // dst.len() bytes, and `self` borrows the memory, so the mapping is
        // alive. Guest memory never overlaps our own buffers. The guest may
        // write concurrently: bytes are copied as bytes, as vm-memory does.
        unsafe { copy_bytes(src, dst.as_mut_ptr(), dst.len()) }
    }

    /// Copy `src` into guest bytes at host address `dst` (from
    /// [`translate`] of at least `src.len()` bytes in this batch).
    #[inline]
    pub fn write(&self, dst: *mut u8, src: &[u8]) {
        // SAFETY: as in `read`, with `dst` valid for src.len() bytes.
        unsafe { copy_bytes(src.as_ptr(), dst, src.len()) }
    }

    /// Store the little-endian `lo` (8 bytes) then the first `hi_len` (at
    /// most 4) bytes of `hi` at guest host address `dst` (from [`translate`]
    /// of at least `8 + hi_len` bytes in this batch). For the virtio-net
    /// header: built in registers and stored whole, where a byte array
    /// copied by `memcpy` made its loads wait (failed store forwarding)
    /// for every older store, frame copies into guest memory included.
    #[inline]
    pub fn write_u64_u32(&self, dst: *mut u8, lo: u64, hi: u32, hi_len: usize) {
        // SAFETY: `dst` is valid for 8 + hi_len bytes (caller, as in
        // `write`); unaligned stores of plain integers into guest bytes.
        unsafe {
            std::ptr::write_unaligned(dst.cast::<u64>(), lo.to_le());
            match hi_len {
                4 => std::ptr::write_unaligned(dst.add(8).cast::<u32>(), hi.to_le()),
                2 => std::ptr::write_unaligned(dst.add(8).cast::<u16>(), (hi as u16).to_le()),
                _ => {
                    let b = hi.to_le_bytes();
                    std::ptr::copy_nonoverlapping(b.as_ptr(), dst.add(8), hi_len.min(4));
                }
            }
        }
    }

    /// Append `len` guest bytes at host address `src` to `out`, without
    /// zeroing first.
    #[inline]
    pub fn read_into(&self, src: *const u8, len: usize, out: &mut Vec<u8>) {
        out.reserve(len);
        let at = out.len();
        // SAFETY: `reserve` made room for `len` more bytes after `at`; `src`
        // is valid for `len` bytes (see `read`); the bytes are initialised
        // by the copy before `set_len` exposes them.
        unsafe {
            copy_bytes(src, out.as_mut_ptr().add(at), len);
            out.set_len(at + len);
        }
    }
}

/// Copy `len` bytes between guest memory and our buffers. From 16 to 128
/// bytes (a small frame, a header segment) as two overlapping fixed-size
/// moves inlined here: a call into `memcpy` costs as much as the move at
/// that size, and it hides which copy waits on memory in a profile.
///
/// # Safety
/// `src` is valid for reading and `dst` for writing `len` bytes, and the
/// two ranges do not overlap.
#[inline(always)]
unsafe fn copy_bytes(src: *const u8, dst: *mut u8, len: usize) {
    macro_rules! two {
        ($n:literal) => {{
            // SAFETY: $n <= len, so both moves stay inside the ranges.
            unsafe {
                let a = std::ptr::read_unaligned(src.cast::<[u8; $n]>());
                let b = std::ptr::read_unaligned(src.add(len - $n).cast::<[u8; $n]>());
                std::ptr::write_unaligned(dst.cast::<[u8; $n]>(), a);
                std::ptr::write_unaligned(dst.add(len - $n).cast::<[u8; $n]>(), b);
            }
        }};
    }
    match len {
        64..=128 => two!(64),
        32..=63 => two!(32),
        16..=31 => two!(16),
        // SAFETY: the caller's contract.
        _ => unsafe { std::ptr::copy_nonoverlapping(src, dst, len) },
    }
}

/// Hint the CPU to fetch the cache line at `p` (for writing: exclusive).
#[inline]
fn prefetch(p: *const u8, write: bool) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch instructions never fault and have no architectural
    // effect; `p` need not even be mapped. PREFETCHW is a no-op on CPUs
    // without it.
    unsafe {
        if write {
            std::arch::asm!("prefetchw [{}]", in(reg) p, options(nostack, readonly, preserves_flags));
        } else {
            std::arch::asm!("prefetcht0 [{}]", in(reg) p, options(nostack, readonly, preserves_flags));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, write);
}

/// A descriptor as the ring holds it (little endian in guest memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub(crate) const DESC_F_NEXT: u16 = 1;
pub(crate) const DESC_F_WRITE: u16 = 2;
pub(crate) const DESC_F_INDIRECT: u16 = 4;
pub(crate) const DESC_SIZE: usize = 16;

/// A descriptor table resolved to host memory.
#[derive(Clone, Copy)]
pub(crate) struct DescTable<'m> {
    ptr: *const u8,
    entries: u16,
    _map: PhantomData<&'m ()>,
}

impl<'m> DescTable<'m> {
    /// Resolve `entries` descriptors at guest address `addr`.
    pub fn new(map: &MemMap<'m>, addr: u64, entries: u16) -> Option<DescTable<'m>> {
        let ptr = map.translate(addr, usize::from(entries) * DESC_SIZE)?;
        Some(DescTable {
            ptr,
            entries,
            _map: PhantomData,
        })
    }

    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Descriptor `i`, or None past the table.
    #[inline]
    pub fn get(&self, i: u16) -> Option<Desc> {
        if i >= self.entries {
            return None;
        }
        let mut raw = [0u8; DESC_SIZE];
        // SAFETY: i < entries and the table was translated for
        // entries * DESC_SIZE bytes within the batch's MemMap, which the
        // caller still borrows (a DescTable never outlives its batch).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.add(usize::from(i) * DESC_SIZE),
                raw.as_mut_ptr(),
                DESC_SIZE,
            )
        };
        Some(Desc {
            addr: u64::from_le_bytes([
                raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
            ]),
            len: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            flags: u16::from_le_bytes([raw[12], raw[13]]),
            next: u16::from_le_bytes([raw[14], raw[15]]),
        })
    }
}

/// One split ring's host view and its device-side indices for a batch.
/// Indices are taken from the `Queue` at the start and must be written
/// back with [`Ring::next_avail`] / [`Ring::next_used`] at the end.
pub(crate) struct Ring<'m> {
    pub desc: DescTable<'m>,
    avail: *const u8,
    used: *mut u8,
    size: u16,
    /// size - 1: slots are indices masked, never divided (a `%` by the
    /// runtime size was a `div` per ring access, three per frame).
    mask: u16,
    event_idx: bool,
    next_avail: u16,
    /// The avail index as last read: chains up to it need no new read.
    avail_seen: u16,
    next_used: u16,
    /// next_used when the batch began: the interrupt decision looks at
    /// what this batch added.
    start_used: u16,
    published: u16,
}

/// VRING_USED_F_NO_NOTIFY and VRING_AVAIL_F_NO_INTERRUPT.
const F_NO_NOTIFY: u16 = 1;

impl<'m> Ring<'m> {
    /// Resolve the rings of `q` (size, addresses, indices). None when a
    /// ring is misaligned or not wholly inside one guest region; such a
    /// queue is broken and is not touched.
    pub fn new(map: &MemMap<'m>, q: &virtio_queue::Queue) -> Option<Ring<'m>> {
        use virtio_queue::QueueT;
        let size = q.size();
        if size == 0 || !size.is_power_of_two() {
            return None;
        }
        let n = usize::from(size);
        let (d, a, u) = (q.desc_table(), q.avail_ring(), q.used_ring());
        // The virtio alignments; atomics below need at least 2 bytes.
        if d % 16 != 0 || a % 2 != 0 || u % 4 != 0 {
            return None;
        }
        let desc = DescTable::new(map, d, size)?;
        let avail = map.translate(a, 4 + 2 * n + 2)?;
        let used = map.translate(u, 4 + 8 * n + 2)?;
        Some(Ring {
            desc,
            avail,
            used,
            size,
            mask: size - 1,
            event_idx: q.event_idx_enabled(),
            next_avail: q.next_avail(),
            avail_seen: q.next_avail(),
            next_used: q.next_used(),
            start_used: q.next_used(),
            published: q.next_used(),
        })
    }

    #[inline]
    fn load16(p: *const u8, order: Ordering) -> u16 {
        // SAFETY: callers pass 2-byte aligned pointers inside the ring
        // areas translated in `new` (alignment checked there, offsets
        // even); the mapping outlives the batch ('m). The guest writes
        // these words concurrently, hence the atomic access.
        u16::from_le(unsafe { AtomicU16::from_ptr(p as *mut u16) }.load(order))
    }

    #[inline]
    fn store16(p: *mut u8, v: u16, order: Ordering) {
        // SAFETY: as in `load16`.
        unsafe { AtomicU16::from_ptr(p as *mut u16) }.store(v.to_le(), order)
    }

    /// The driver's avail index.
    #[inline]
    pub fn avail_idx(&self) -> u16 {
        Self::load16(self.avail.wrapping_add(2), Ordering::Acquire)
    }

    /// Whether a chain is waiting. The driver's index is read only when
    /// the chains seen last time are used up; an index more than a ring
    /// ahead is garbage and counts as nothing.
    #[inline]
    pub fn has_next(&mut self) -> bool {
        if self.avail_seen != self.next_avail {
            return true;
        }
        let idx = self.avail_idx();
        if idx.wrapping_sub(self.next_avail) > self.size {
            return false;
        }
        self.avail_seen = idx;
        idx != self.next_avail
    }

    /// Take the next head. Call only after [`has_next`] said yes.
    #[inline]
    pub fn pop_head(&mut self) -> u16 {
        let slot = usize::from(self.next_avail & self.mask);
        let p = self.avail.wrapping_add(4 + 2 * slot);
        self.next_avail = self.next_avail.wrapping_add(1);
        Self::load16(p, Ordering::Relaxed)
    }

    /// Start loading the buffers of the next `n` chains (their first
    /// descriptor's first cache line), for reading (TX) or writing (RX).
    /// They were last touched by the guest's CPU; asking for all of them
    /// at once overlaps the transfers instead of paying them one by one
    /// inside the copies. Only a hint: bad descriptors are skipped here
    /// and refused by the walk.
    pub fn prefetch(&mut self, map: &MemMap<'_>, n: u16, write: bool) {
        if !self.has_next() {
            return;
        }
        let ready = self.avail_seen.wrapping_sub(self.next_avail).min(n);
        let mut pos = self.next_avail;
        for _ in 0..ready {
            let slot = usize::from(pos & self.mask);
            pos = pos.wrapping_add(1);
            let head = Self::load16(self.avail.wrapping_add(4 + 2 * slot), Ordering::Relaxed);
            let Some(d) = self.desc.get(head) else {
                continue;
            };
            // The lines the copy touches first: a virtio-net header often
            // ends just before a line, the frame in the next (DPDK's
            // buffers: 12 bytes before a 64-byte boundary), so the first
            // and the last line of the first 128 bytes (the same line
            // twice costs nothing). A prefetch never faults, so only the
            // start is translated; an indirect table is worth loading too.
            if let Some(p) = map.translate(d.addr, 1) {
                let span = (d.len as usize).min(128);
                prefetch(p, write);
                prefetch(p.wrapping_add(span.saturating_sub(1)), write);
            }
        }
    }

    /// Give back the last `n` heads taken (a frame that did not fit).
    pub fn unpop(&mut self, n: u16) {
        self.next_avail = self.next_avail.wrapping_sub(n);
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Add a used element; it becomes visible at [`publish`].
    #[inline]
    pub fn push_used(&mut self, id: u16, len: u32) {
        let slot = usize::from(self.next_used & self.mask);
        let p = self.used.wrapping_add(4 + 8 * slot);
        // One 8-byte store: the element as the guest reads it (le32 id,
        // le32 len).
        let elem = (u64::from(len) << 32 | u64::from(id)).to_le();
        // SAFETY: slot < size, and the used ring was translated for
        // 4 + 8 * size + 2 bytes in `new`; the mapping outlives the batch.
        // The ring is only 4-byte aligned, hence unaligned.
        unsafe { std::ptr::write_unaligned(p as *mut u64, elem) };
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Make the used elements added so far visible to the driver.
    #[inline]
    pub fn publish(&mut self) {
        if self.published != self.next_used {
            // Release: the elements are written before the index.
            Self::store16(self.used.wrapping_add(2), self.next_used, Ordering::Release);
            self.published = self.next_used;
        }
    }

    /// Ask for (or stop asking for) the driver's kicks. With EVENT_IDX,
    /// "on" means "kick me once you publish past what I have taken".
    /// Returns true when chains arrived meanwhile (the caller goes on).
    pub fn set_kicks(&mut self, on: bool) -> bool {
        if self.event_idx {
            if on {
                let p = self.used.wrapping_add(4 + 8 * usize::from(self.size));
                Self::store16(p, self.next_avail, Ordering::Relaxed);
            }
        } else {
            Self::store16(
                self.used,
                if on { 0 } else { F_NO_NOTIFY },
                Ordering::Relaxed,
            );
        }
        if !on {
            return false;
        }
        // The store must be visible before we look at the index again, or
        // a chain published in between would get no kick.
        fence(Ordering::SeqCst);
        self.avail_idx() != self.next_avail
    }

    /// Whether the driver wants an interrupt for what this batch added:
    /// EVENT_IDX's used_event when negotiated, else the NO_INTERRUPT flag.
    pub fn needs_interrupt(&self) -> bool {
        let new = self.next_used;
        let old = self.start_used;
        if new == old {
            return false;
        }
        // The used index is written before we read the driver's event.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let p = self.avail.wrapping_add(4 + 2 * usize::from(self.size));
            let event = Self::load16(p, Ordering::Relaxed);
            // Linux's vring_need_event.
            return new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old);
        }
        Self::load16(self.avail, Ordering::Relaxed) & F_NO_NOTIFY == 0
    }

    /// Write the indices back to the queue (its own state must match for
    /// vhost-user's GET_VRING_BASE and for the next batch).
    pub fn store(&mut self, q: &mut virtio_queue::Queue) {
        use virtio_queue::QueueT;
        self.publish();
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
    }
}

//! Port queues: where the switch leaves frames for a destination ENI, and
//! the wake-ups that tell the owning card worker to fill the guest's RX ring.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use enilab_switch::{Egress, PacketMeta, PortId};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Frames one RX queue holds while its guest has no buffers posted.
pub const RX_QUEUE_DEPTH: usize = 1024;
/// Buffers kept for reuse across all workers.
const POOL_SIZE: usize = 8192;
/// Capacity a fresh buffer starts with (one MTU-sized frame).
const SMALL_BUF: usize = 2048;

/// A frame in flight between a TX worker and an RX worker.
pub struct Pkt {
    pub buf: Vec<u8>,
    pub meta: PacketMeta,
}

/// A shared free list of frame buffers, so the steady state allocates
/// nothing per packet. Each thread keeps a small LIFO cache in front of
/// it: the buffer a worker just freed is the one it takes next, still in
/// its cache, where a shared FIFO would cycle through every buffer (and
/// megabytes of cold memory) and pay an atomic per packet. Buffers are
/// plain `Vec`s, so which pool a cached one came from does not matter.
pub struct Pool {
    free: ArrayQueue<Vec<u8>>,
}

/// Buffers one thread keeps for itself (512 KiB of 2 KiB frames).
const LOCAL_CACHE: usize = 256;

/// A thread's cached buffers, each a `SMALL_BUF`-capacity allocation
/// given up by a `Vec<u8>`. One pointer per buffer rather than the
/// 24-byte `Vec`: a buffer put back is often taken again at once, and
/// reading a `Vec` just stored in pieces of other widths cannot be
/// store-forwarded (that wait was half of `Pool::get`).
struct LocalBufs(Vec<NonNull<u8>>);

/// The empty `Vec` that owns cached buffer `p` again.
///
/// # Safety
/// `p` came from a `Vec<u8>` of capacity `SMALL_BUF` that `Pool::put` gave
/// up, and nothing else owns that allocation any more.
#[inline]
unsafe fn reclaim(p: NonNull<u8>) -> Vec<u8> {
    // SAFETY: per this function's contract.
    unsafe { Vec::from_raw_parts(p.as_ptr(), 0, SMALL_BUF) }
}

impl Drop for LocalBufs {
    fn drop(&mut self) {
        for p in self.0.drain(..) {
            // SAFETY: the cache owned every pointer it holds.
            drop(unsafe { reclaim(p) });
        }
    }
}

thread_local! {
    static LOCAL: std::cell::RefCell<LocalBufs> = const { std::cell::RefCell::new(LocalBufs(Vec::new())) };
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            free: ArrayQueue::new(POOL_SIZE),
        }
    }
}

impl Pool {
    #[inline]
    pub fn get(&self) -> Vec<u8> {
        if let Ok(Some(p)) = LOCAL.try_with(|l| l.borrow_mut().0.pop()) {
            // SAFETY: popping took the pointer out of the cache, which
            // owned it: the Vec is its only owner.
            return unsafe { reclaim(p) };
        }
        self.free
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(SMALL_BUF))
    }

    #[inline]
    pub fn put(&self, mut buf: Vec<u8>) {
        if buf.capacity() != SMALL_BUF {
            // Do not hoard 64 KiB super-packet buffers.
            if buf.capacity() > 4 * SMALL_BUF {
                buf = Vec::with_capacity(SMALL_BUF);
            } else {
                buf.clear();
                let _ = self.free.push(buf);
                return;
            }
        }
        let mut buf = std::mem::ManuallyDrop::new(buf);
        // Never null: the capacity is SMALL_BUF.
        let Some(p) = NonNull::new(buf.as_mut_ptr()) else {
            return;
        };
        let kept = LOCAL
            .try_with(|l| {
                let mut l = l.borrow_mut();
                if l.0.len() < LOCAL_CACHE {
                    l.0.push(p);
                    true
                } else {
                    false
                }
            })
            .unwrap_or(false);
        if !kept {
            // SAFETY: the cache did not take the pointer: this is still
            // the only owner of the allocation `buf` gave up.
            let _ = self.free.push(unsafe { reclaim(p) });
        }
    }
}

/// One worker's buffers, in front of the shared [`Pool`]: the same LIFO as
/// the pool's thread-local cache, held by the worker itself, so taking or
/// giving back a buffer is a `Vec` pop or push with no thread-local lookup
/// and no `RefCell` flag. The worker passes it to TX (which takes) and RX
/// (which gives back), so one worker's buffers go round in it.
pub struct Bufs {
    pool: Arc<Pool>,
    cache: Vec<NonNull<u8>>,
}

// SAFETY: the cached pointers are allocations this value alone owns (see
// `reclaim`); moving the owner to another thread moves them with it.
unsafe impl Send for Bufs {}

impl Bufs {
    pub fn new(pool: Arc<Pool>) -> Self {
        Bufs {
            pool,
            cache: Vec::with_capacity(LOCAL_CACHE),
        }
    }

    /// An empty buffer.
    #[inline]
    pub fn get(&mut self) -> Vec<u8> {
        match self.cache.pop() {
            // SAFETY: popping took the pointer out of the cache, which
            // owned it: the Vec is its only owner.
            Some(p) => unsafe { reclaim(p) },
            None => self.pool.get(),
        }
    }

    /// Give a buffer back.
    #[inline]
    pub fn put(&mut self, buf: Vec<u8>) {
        if buf.capacity() != SMALL_BUF || self.cache.len() == LOCAL_CACHE {
            return self.pool.put(buf);
        }
        let mut buf = std::mem::ManuallyDrop::new(buf);
        // Never null: the capacity is SMALL_BUF.
        if let Some(p) = NonNull::new(buf.as_mut_ptr()) {
            self.cache.push(p);
        }
    }
}

impl Drop for Bufs {
    fn drop(&mut self) {
        for p in self.cache.drain(..) {
            // SAFETY: the cache owned every pointer it holds.
            self.pool.put(unsafe { reclaim(p) });
        }
    }
}

/// Wakes one card worker: an eventfd plus a "rescan your rings" flag.
pub struct Waker {
    efd: EventFd,
    rescan: AtomicBool,
}

impl Waker {
    pub fn new() -> std::io::Result<Self> {
        Ok(Waker {
            efd: EventFd::new(EFD_NONBLOCK)?,
            rescan: AtomicBool::new(false),
        })
    }

    pub fn wake(&self) {
        let _ = self.efd.write(1);
    }

    /// Ask the worker to re-read ring state (kick fds, enable flags).
    pub fn request_rescan(&self) {
        self.rescan.store(true, Ordering::Release);
        self.wake();
    }

    pub(crate) fn take_rescan(&self) -> bool {
        self.rescan.swap(false, Ordering::AcqRel)
    }

    pub(crate) fn consume(&self) {
        let _ = self.efd.read();
    }

    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.efd.as_raw_fd()
    }
}

/// One RX queue of a port.
pub struct RxQueue {
    pub(crate) ring: crate::mpsc::Mpsc<Pkt>,
    pub(crate) waker: Arc<Waker>,
    /// Frames the owning worker holds for this queue outside the ring
    /// (delivered to it directly, see [`PortEgress::take_local`]) and not
    /// yet in the guest: they count against the queue's room.
    pub(crate) held: AtomicUsize,
}

/// The receiving side of one ENI, as the switch's egress sees it.
pub struct PortHandle {
    pub port: PortId,
    pub(crate) rxq: Box<[RxQueue]>,
    /// Bit i set when RX queue i is enabled by the guest.
    pub(crate) enabled_rx: AtomicU32,
    /// Set for service ports: the service chooses the queue (its worker
    /// lane) from the frame, not the switch's flow hash.
    pub(crate) steer: Option<Arc<dyn crate::service::Steer>>,
}

impl PortHandle {
    pub(crate) fn new(port: PortId, wakers: &[Arc<Waker>]) -> Self {
        PortHandle {
            port,
            rxq: wakers
                .iter()
                .map(|w| RxQueue {
                    ring: crate::mpsc::Mpsc::new(RX_QUEUE_DEPTH),
                    waker: w.clone(),
                    held: AtomicUsize::new(0),
                })
                .collect(),
            enabled_rx: AtomicU32::new(0),
            steer: None,
        }
    }

    /// Pick the RX queue for a flow among the enabled ones (its index).
    #[inline]
    pub(crate) fn pick_index(&self, flow_hash: u32) -> Option<usize> {
        let mask = self.enabled_rx.load(Ordering::Relaxed);
        if mask & mask.wrapping_sub(1) == 0 {
            // None or one enabled: no division, no bit walk.
            return (mask != 0).then(|| mask.trailing_zeros() as usize);
        }
        let n = mask.count_ones();
        // flow_hash * n / 2^32: an even spread over n without a division.
        let mut k = ((u64::from(flow_hash) * u64::from(n)) >> 32) as u32;
        let mut m = mask;
        loop {
            let i = m.trailing_zeros();
            if k == 0 {
                return Some(i as usize);
            }
            k -= 1;
            m &= m - 1;
        }
    }

    /// The queue a frame goes to: the service's lane, or the flow's pick.
    #[inline]
    fn queue_for(&self, flow_hash: u32, frame: &[u8]) -> Option<usize> {
        match &self.steer {
            Some(s) => s.steer(self.port, frame).filter(|&i| i < self.rxq.len()),
            None => self.pick_index(flow_hash),
        }
    }

    /// Queue a frame for the guest. Gives the frame back if the queue is
    /// full or no RX queue is enabled.
    pub fn enqueue(&self, flow_hash: u32, pkt: Pkt) -> Result<&Arc<Waker>, Pkt> {
        let Some(q) = self
            .queue_for(flow_hash, &pkt.buf)
            .and_then(|i| self.rxq.get(i))
        else {
            return Err(pkt);
        };
        q.ring.push(pkt)?;
        Ok(&q.waker)
    }
}

/// Port id -> receiving handle, read lock-free by every worker.
#[derive(Default)]
pub struct PortTable {
    ports: ArcSwap<Vec<Option<Arc<PortHandle>>>>,
    writer: Mutex<()>,
}

impl PortTable {
    pub fn load(&self) -> arc_swap::Guard<Arc<Vec<Option<Arc<PortHandle>>>>> {
        self.ports.load()
    }

    pub fn get(&self, port: PortId) -> Option<Arc<PortHandle>> {
        self.ports.load().get(port as usize).cloned().flatten()
    }

    pub fn insert(&self, handle: Arc<PortHandle>) {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = (**self.ports.load()).clone();
        let i = handle.port as usize;
        if v.len() <= i {
            v.resize(i + 1, None);
        }
        v[i] = Some(handle);
        self.ports.store(Arc::new(v));
    }

    pub fn remove(&self, port: PortId) {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = (**self.ports.load()).clone();
        if let Some(slot) = v.get_mut(port as usize) {
            *slot = None;
        }
        self.ports.store(Arc::new(v));
    }
}

/// Frames held for one destination queue until the end of the batch.
struct Staged {
    handle: Arc<PortHandle>,
    queue: usize,
    /// Frames the group may hold: the queue's free room when the group
    /// was made (or last pushed), so `emit` refuses without reading the
    /// queue's shared indices per frame.
    room: usize,
    pkts: Vec<Pkt>,
}

/// The switch's view of where frames go: port RX queues. Every thread that
/// runs the switch (card workers, uplinks) emits through one of these, then
/// wakes the workers it queued frames for.
///
/// Frames the switch forwards as they came (the ingress buffer moved, see
/// [`PortEgress::finish`]) are held per destination queue and queued
/// together at [`flush`](PortEgress::flush) (also run by the wake calls and
/// on drop): one compare-and-swap per destination and batch instead of one
/// per frame. A copied frame ([`Egress::emit`] of other bytes) is queued at
/// once, after any frames held for its queue, so a queue's order is the
/// order the switch emitted in.
pub(crate) struct PortEgress<'a> {
    /// The port table as of the start of this pass: one load per pass,
    /// not a reference-count round trip per frame. Handles cannot go away
    /// while it is held, so a group found at `emit` is still there at
    /// `finish`.
    table: arc_swap::Guard<Arc<Vec<Option<Arc<PortHandle>>>>>,
    pool: &'a Pool,
    wake: Vec<Arc<Waker>>,
    /// The buffer of the frame being processed (address, length): when the
    /// switch emits that very frame, it is queued by moving the buffer
    /// ([`PortEgress::finish`]) instead of copying it.
    ingress: Option<(usize, usize)>,
    /// The group `emit` chose for the ingress frame, and its metadata.
    moved: Option<(usize, PacketMeta)>,
    staged: Vec<Staged>,
    /// The group the last frame went to: a batch's frames mostly share
    /// one, so the search below is usually a single compare.
    last: usize,
    /// Emptied hold lists, kept with their allocation: a batch's list
    /// would otherwise grow from one frame again, reallocating as it goes.
    spare: Vec<Vec<Pkt>>,
    /// Held frames whose queue was full when they were queued, not yet
    /// reported by [`flush`](Self::flush).
    late: u64,
    /// The waker of the worker running this egress, if it is a card
    /// worker: frames for the queues it serves itself skip the ring.
    own: Option<&'a Waker>,
    /// Frames for those queues, in emit order, until the worker takes
    /// them ([`take_local`](Self::take_local)).
    local: Vec<Local>,
}

/// Frames a worker delivers to one of its own queues without the ring.
pub(crate) struct Local {
    /// Which port: its handle's address (identity only; the handle lives
    /// in the egress's table).
    pub handle: usize,
    pub queue: usize,
    pub pkts: Vec<Pkt>,
}

impl<'a> PortEgress<'a> {
    pub fn new(ports: &'a PortTable, pool: &'a Pool) -> Self {
        PortEgress {
            table: ports.load(),
            pool,
            wake: Vec::new(),
            ingress: None,
            moved: None,
            staged: Vec::new(),
            last: 0,
            spare: Vec::new(),
            late: 0,
            own: None,
            local: Vec::new(),
        }
    }

    /// As [`new`](Self::new), reusing the hold lists an earlier egress
    /// gave back with [`take_spare`](Self::take_spare).
    pub fn with_spare(ports: &'a PortTable, pool: &'a Pool, spare: Vec<Vec<Pkt>>) -> Self {
        let mut e = Self::new(ports, pool);
        e.spare = spare;
        e
    }

    /// The egress of the card worker woken by `own`: frames for the queues
    /// that worker serves are kept for it ([`take_local`](Self::take_local))
    /// instead of going through their rings. Only that worker may take
    /// them: its queues' consumer is that thread.
    pub fn with_owner(mut self, own: &'a Waker) -> Self {
        self.own = Some(own);
        self
    }

    /// Frames held so far for the owner's own queues, in emit order per
    /// queue. The caller delivers them, or gives them back (see
    /// [`give_back`](Self::give_back)).
    pub fn take_local(&mut self, into: &mut Vec<Local>) {
        self.flush_local();
        into.append(&mut self.local);
    }

    /// Keep an emptied list for reuse.
    pub fn give_back(&mut self, pkts: Vec<Pkt>) {
        debug_assert!(pkts.is_empty());
        if self.spare.len() < 16 && pkts.is_empty() {
            self.spare.push(pkts);
        }
    }

    /// Queue frames taken with [`take_local`](Self::take_local) that the
    /// worker could not deliver itself on their ring after all, as a
    /// group's are queued. Returns how many found it full (dropped).
    pub fn requeue(&mut self, mut l: Local) -> u64 {
        let q = self
            .table
            .iter()
            .flatten()
            .find(|h| Arc::as_ptr(h) as usize == l.handle)
            .and_then(|h| h.rxq.get(l.queue));
        if let Some(q) = q {
            if q.ring.push_many(&mut l.pkts) > 0 {
                note_wake(&mut self.wake, q);
            }
        }
        let late = l.pkts.len() as u64;
        for p in l.pkts.drain(..) {
            self.pool.put(p.buf);
        }
        self.give_back(l.pkts);
        late
    }

    /// Move every local group's frames to `local`.
    fn flush_local(&mut self) {
        for g in 0..self.staged.len() {
            if self.is_local(g) {
                self.push_staged(g);
            }
        }
    }

    /// Whether group `g`'s queue is served by the owner.
    #[inline]
    fn is_local(&self, g: usize) -> bool {
        self.staged
            .get(g)
            .and_then(|s| s.handle.rxq.get(s.queue))
            .is_some_and(|q| self.serves(q))
    }

    /// Whether the owner serves `q`.
    #[inline]
    fn serves(&self, q: &RxQueue) -> bool {
        self.own.is_some_and(|own| std::ptr::eq(&*q.waker, own))
    }

    /// Queue what is held, and hand over the emptied hold lists.
    pub fn take_spare(&mut self) -> Vec<Vec<Pkt>> {
        self.flush();
        std::mem::take(&mut self.spare)
    }

    /// The next frame handed to the switch lives in `buf`.
    #[inline]
    pub fn set_ingress(&mut self, buf: &[u8]) {
        self.ingress = Some((buf.as_ptr() as usize, buf.len()));
        self.moved = None;
    }

    /// After the switch is done with the ingress frame: hold it for the
    /// queue `emit` chose if the switch emitted it, else hand its buffer
    /// back (for the caller's own cache).
    #[inline]
    #[must_use]
    pub fn finish(&mut self, pkt: Pkt) -> Option<Vec<u8>> {
        self.ingress = None;
        // A group is only dropped by a flush, which never runs between
        // `emit` and here; if one did, the frame is handed back.
        match self
            .moved
            .take()
            .and_then(|(g, meta)| Some((self.staged.get_mut(g)?, meta)))
        {
            Some((s, meta)) => {
                s.pkts.push(Pkt { buf: pkt.buf, meta });
                None
            }
            None => Some(pkt.buf),
        }
    }

    /// Index of the group held for `queue` of `port`.
    #[inline]
    fn held_at(&self, port: PortId, queue: usize) -> Option<usize> {
        match self.staged.get(self.last) {
            Some(s) if s.handle.port == port && s.queue == queue => Some(self.last),
            _ => self
                .staged
                .iter()
                .position(|s| s.handle.port == port && s.queue == queue),
        }
    }

    /// The group for `queue` of `port`, made if there is none. The last
    /// frame's group is tried inline; the rest is a call.
    #[inline]
    fn group(&mut self, port: PortId, queue: usize) -> Option<usize> {
        match self.staged.get(self.last) {
            Some(s) if s.handle.port == port && s.queue == queue => Some(self.last),
            _ => self.group_slow(port, queue),
        }
    }

    #[inline(never)]
    fn group_slow(&mut self, port: PortId, queue: usize) -> Option<usize> {
        let g = match self.held_at(port, queue) {
            Some(g) => g,
            None => {
                let handle = self.table.get(port as usize)?.as_ref()?.clone();
                let pkts = self
                    .spare
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(crate::net::BATCH));
                self.staged.push(Staged {
                    room: room_of(&handle, queue),
                    handle,
                    queue,
                    pkts,
                });
                self.staged.len() - 1
            }
        };
        self.last = g;
        Some(g)
    }

    /// Queue every held frame. Returns how many found their queue full
    /// (given back to the pool) since the last flush.
    pub fn flush(&mut self) -> u64 {
        for g in 0..self.staged.len() {
            self.push_staged(g);
        }
        // The groups go (a handle's queues may change before the next
        // batch); their lists are kept. A few are plenty: one per
        // destination queue of a batch.
        for s in self.staged.drain(..) {
            if self.spare.len() < 16 {
                self.spare.push(s.pkts);
            }
        }
        self.last = 0;
        std::mem::take(&mut self.late)
    }

    /// Move group `g`'s frames into its queue (one compare-and-swap) and
    /// note its worker for waking; what does not fit is dropped and
    /// counted as late. The group stays, empty, with its room renewed.
    fn push_staged(&mut self, g: usize) {
        let local = self.is_local(g);
        let s = &mut self.staged[g];
        if s.pkts.is_empty() {
            return;
        }
        if local {
            let fresh = self
                .spare
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(crate::net::BATCH));
            let pkts = std::mem::replace(&mut s.pkts, fresh);
            s.room = s.room.saturating_sub(pkts.len());
            self.local.push(Local {
                handle: Arc::as_ptr(&s.handle) as usize,
                queue: s.queue,
                pkts,
            });
            return;
        }
        if let Some(q) = s.handle.rxq.get(s.queue) {
            if q.ring.push_many(&mut s.pkts) > 0 {
                note_wake(&mut self.wake, q);
            }
        }
        for p in s.pkts.drain(..) {
            self.late += 1;
            self.pool.put(p.buf);
        }
        s.room = room_of(&s.handle, s.queue);
    }

    /// Wake every worker that got frames, except `own` (the caller, which
    /// serves its queues next anyway). Returns true if `own` got frames.
    pub fn wake_others(&mut self, own: &Arc<Waker>) -> bool {
        self.flush();
        let mut mine = false;
        for w in self.wake.drain(..) {
            if Arc::ptr_eq(&w, own) {
                mine = true;
            } else {
                w.wake();
            }
        }
        mine
    }
}

/// Free room in `queue` of `handle` now.
fn room_of(handle: &PortHandle, queue: usize) -> usize {
    handle.rxq.get(queue).map_or(0, |q| {
        RX_QUEUE_DEPTH.saturating_sub(q.ring.len() + q.held.load(Ordering::Relaxed))
    })
}

impl PortEgress<'_> {
    /// Wake every worker that got frames (for callers that are no worker).
    pub fn wake_all(&mut self) {
        self.flush();
        for w in self.wake.drain(..) {
            w.wake();
        }
    }
}

impl Drop for PortEgress<'_> {
    /// Held frames are never lost: queue them and wake their workers.
    fn drop(&mut self) {
        if !self.staged.is_empty() || !self.wake.is_empty() || !self.local.is_empty() {
            self.flush();
            // Frames for the owner's queues it did not take go the ring
            // way (it will find them there).
            for l in std::mem::take(&mut self.local) {
                self.requeue(l);
            }
            self.wake_all();
        }
    }
}

impl Egress for PortEgress<'_> {
    fn emit(&mut self, port: PortId, flow_hash: u32, frame: &[u8], meta: &PacketMeta) -> bool {
        let Some(handle) = self.table.get(port as usize).and_then(|h| h.as_ref()) else {
            return false;
        };
        let Some(queue) = handle.queue_for(flow_hash, frame) else {
            return false;
        };
        if queue >= handle.rxq.len() {
            return false;
        }
        if self.moved.is_none() && self.ingress == Some((frame.as_ptr() as usize, frame.len())) {
            // The ingress frame itself: held by `finish`, without a copy.
            // Refuse now if there is no room, so the switch counts it.
            let Some(g) = self.group(port, queue) else {
                return false;
            };
            let Some(s) = self.staged.get(g) else {
                return false;
            };
            if s.pkts.len() >= s.room {
                return false;
            }
            self.moved = Some((g, *meta));
            return true;
        }
        // A copy for one of the owner's queues joins its group, behind
        // what the group holds (queue order is emit order).
        if self.serves(&handle.rxq[queue]) {
            if let Some(g) = self.group(port, queue) {
                let s = &mut self.staged[g];
                if s.pkts.len() >= s.room {
                    return false;
                }
                let mut buf = self.pool.get();
                buf.extend_from_slice(frame);
                s.pkts.push(Pkt { buf, meta: *meta });
                return true;
            }
        }
        // Frames held for this queue go first (queue order is emit order).
        if let Some(g) = self.held_at(port, queue) {
            self.push_staged(g);
        }
        let Some(q) = self
            .table
            .get(port as usize)
            .and_then(|h| h.as_ref())
            .map(|h| &h.rxq[queue])
        else {
            return false;
        };
        queue_copy(self.pool, &mut self.wake, q, frame, meta)
    }
}

/// Remember to wake `q`'s worker (once per egress).
fn note_wake(wake: &mut Vec<Arc<Waker>>, q: &RxQueue) {
    if !wake.iter().any(|x| Arc::ptr_eq(x, &q.waker)) {
        wake.push(q.waker.clone());
    }
}

/// Queue a copy of `frame` on `q`. False when it is full.
fn queue_copy(
    pool: &Pool,
    wake: &mut Vec<Arc<Waker>>,
    q: &RxQueue,
    frame: &[u8],
    meta: &PacketMeta,
) -> bool {
    let mut buf = pool.get();
    buf.extend_from_slice(frame);
    match q.ring.push(Pkt { buf, meta: *meta }) {
        Ok(()) => {
            note_wake(wake, q);
            true
        }
        Err(pkt) => {
            pool.put(pkt.buf);
            false
        }
    }
}

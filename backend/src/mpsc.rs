//! A bounded multi-producer, single-consumer ring for port RX queues.
//!
//! The algorithm is crossbeam's `ArrayQueue` (a stamp per slot, producers
//! claim the tail with a compare-and-swap), with one change that matters
//! on the packet path: the one consumer takes frames without a locked
//! instruction. A locked instruction drains the CPU's store buffer, and on
//! the RX path that buffer is full of frame copies into guest memory whose
//! cache lines the guest's CPU holds; with `ArrayQueue::pop` this wait was
//! a quarter of the worker's time. The consumer side is claimed once per
//! batch ([`Mpsc::consumer`]), so a second consumer cannot race it.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Slot<T> {
    /// `index` when free for the producer of lap `index / cap`, `index+1`
    /// when it holds a value for the consumer (crossbeam's scheme, with a
    /// lap of `cap` rather than a power of two: indices are plain counters).
    stamp: AtomicUsize,
    value: UnsafeCell<MaybeUninit<T>>,
}

/// Pads a field to its own cache line, so producers and the consumer do
/// not write the same line.
#[repr(align(128))]
struct Padded<T>(T);

pub struct Mpsc<T> {
    head: Padded<AtomicUsize>,
    tail: Padded<AtomicUsize>,
    consuming: AtomicBool,
    slots: Box<[Slot<T>]>,
}

// SAFETY: values move between threads through the slots (T: Send); every
// slot access is ordered by its stamp (Acquire/Release), and the consumer
// side is exclusive (`consuming`).
unsafe impl<T: Send> Send for Mpsc<T> {}
// SAFETY: as above; shared references only push (synchronised by the tail
// CAS and the stamps) or claim the consumer flag.
unsafe impl<T: Send> Sync for Mpsc<T> {}

impl<T> Mpsc<T> {
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Mpsc {
            head: Padded(AtomicUsize::new(0)),
            tail: Padded(AtomicUsize::new(0)),
            consuming: AtomicBool::new(false),
            slots: (0..cap)
                .map(|i| Slot {
                    stamp: AtomicUsize::new(i),
                    value: UnsafeCell::new(MaybeUninit::uninit()),
                })
                .collect(),
        }
    }

    /// Add `value`, or give it back when the ring is full.
    pub fn push(&self, value: T) -> Result<(), T> {
        let cap = self.slots.len();
        let mut tail = self.tail.0.load(Ordering::Relaxed);
        loop {
            let slot = &self.slots[tail % cap];
            let stamp = slot.stamp.load(Ordering::Acquire);
            if stamp == tail {
                match self.tail.0.compare_exchange_weak(
                    tail,
                    tail.wrapping_add(1),
                    Ordering::SeqCst,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // SAFETY: winning the CAS for `tail` while the
                        // stamp says "free for lap tail" gives this thread
                        // the slot until it publishes the stamp below.
                        unsafe { (*slot.value.get()).write(value) };
                        slot.stamp.store(tail.wrapping_add(1), Ordering::Release);
                        return Ok(());
                    }
                    Err(t) => tail = t,
                }
            } else if stamp.wrapping_add(cap) == tail.wrapping_add(1) {
                // The slot still holds the value of the previous lap: full.
                return Err(value);
            } else {
                // Another producer moved on; look again.
                std::hint::spin_loop();
                tail = self.tail.0.load(Ordering::Relaxed);
            }
        }
    }

    /// Move values from the front of `items` into the ring, in order, as
    /// many as there is room for, claiming all their slots with one
    /// compare-and-swap (a locked instruction drains the store buffer, so
    /// a worker queues a batch's frames for one destination at once).
    /// Returns how many were moved; the rest stay in `items`.
    pub fn push_many(&self, items: &mut Vec<T>) -> usize {
        let cap = self.slots.len();
        let mut tail = self.tail.0.load(Ordering::Relaxed);
        loop {
            // One division per attempt: the slots after the tail's are
            // stepped to, wrapping by hand (a `%` per slot was a `div`).
            let base = tail % cap;
            // Free slots from the tail on: stamp == index. The consumer
            // frees slots in index order, each stamp a Release store, so
            // when the last slot wanted is free (seen with Acquire) so is
            // every slot before it: one look, where the room is there.
            let want = items.len().min(cap);
            let mut k = 0;
            let mut at = base;
            if want > 0 {
                // base < cap and want <= cap: one wrap at most.
                let last = base + want - 1;
                let last = if last >= cap { last - cap } else { last };
                let stamp = self.slots[last].stamp.load(Ordering::Acquire);
                if stamp == tail.wrapping_add(want - 1) {
                    k = want;
                }
            }
            while k < want {
                if self.slots[at].stamp.load(Ordering::Acquire) != tail.wrapping_add(k) {
                    break;
                }
                k += 1;
                at = next_slot(at, cap);
            }
            if k == 0 {
                if items.is_empty() {
                    return 0;
                }
                let stamp = self.slots[base].stamp.load(Ordering::Acquire);
                if stamp.wrapping_add(cap) == tail.wrapping_add(1) {
                    return 0; // full
                }
                std::hint::spin_loop();
                tail = self.tail.0.load(Ordering::Relaxed);
                continue;
            }
            match self.tail.0.compare_exchange_weak(
                tail,
                tail.wrapping_add(k),
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    let mut at = base;
                    for (j, value) in items.drain(..k).enumerate() {
                        let slot = &self.slots[at];
                        // SAFETY: every slot in tail..tail+k was free for
                        // its index when looked at, and only a producer
                        // that moved the tail past it could have taken it
                        // since; winning the CAS from `tail` makes them
                        // ours until their stamps are published.
                        unsafe { (*slot.value.get()).write(value) };
                        slot.stamp
                            .store(tail.wrapping_add(j + 1), Ordering::Release);
                        at = next_slot(at, cap);
                    }
                    return k;
                }
                Err(t) => tail = t,
            }
        }
    }

    pub fn len(&self) -> usize {
        let tail = self.tail.0.load(Ordering::SeqCst);
        let head = self.head.0.load(Ordering::SeqCst);
        tail.wrapping_sub(head).min(self.slots.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_full(&self) -> bool {
        self.len() >= self.slots.len()
    }

    /// Claim the consumer side, or None while another thread holds it.
    pub fn consumer(&self) -> Option<Consumer<'_, T>> {
        if self.consuming.swap(true, Ordering::Acquire) {
            return None;
        }
        let head = self.head.0.load(Ordering::Relaxed);
        Some(Consumer {
            q: self,
            head,
            at: head % self.slots.len(),
        })
    }

    /// Take one value (claims the consumer side for the call).
    pub fn pop(&self) -> Option<T> {
        self.consumer()?.pop()
    }
}

/// The slot after `at` in a ring of `cap`.
#[inline]
fn next_slot(at: usize, cap: usize) -> usize {
    if at + 1 == cap {
        0
    } else {
        at + 1
    }
}

/// The consumer side, held for one batch.
pub struct Consumer<'a, T> {
    q: &'a Mpsc<T>,
    head: usize,
    /// `head`'s slot, stepped along with it (no division per frame).
    at: usize,
}

impl<T> Consumer<'_, T> {
    pub fn pop(&mut self) -> Option<T> {
        let cap = self.q.slots.len();
        let slot = &self.q.slots[self.at];
        if slot.stamp.load(Ordering::Acquire) != self.head.wrapping_add(1) {
            // Empty, or a producer has claimed the slot and not yet
            // written it: come back later.
            return None;
        }
        // SAFETY: the stamp says the slot holds the value for this head,
        // published with Release by its producer; only this consumer (the
        // flag is ours) reads it, once, before freeing the slot below.
        let value = unsafe { (*slot.value.get()).assume_init_read() };
        // Free the slot for the producer of the next lap.
        slot.stamp
            .store(self.head.wrapping_add(cap), Ordering::Release);
        self.head = self.head.wrapping_add(1);
        self.at = next_slot(self.at, cap);
        // A plain store: only the consumer writes head.
        self.q.head.0.store(self.head, Ordering::Release);
        Some(value)
    }
}

impl<T> Drop for Consumer<'_, T> {
    fn drop(&mut self) {
        self.q.consuming.store(false, Ordering::Release);
    }
}

impl<T> Drop for Mpsc<T> {
    fn drop(&mut self) {
        while self.pop().is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Push `v`, yielding while the ring is full.
    fn push_retrying(q: &Mpsc<u64>, mut v: u64) {
        while let Err(back) = q.push(v) {
            v = back;
            std::thread::yield_now();
        }
    }

    /// Take the 4 x 20,000 values of `producers` (producer << 32 | index),
    /// checking each producer's order, then join them.
    fn consume_in_order(q: &Mpsc<u64>, producers: Vec<std::thread::JoinHandle<()>>) {
        let mut next = [0u64; 4];
        let mut got = 0;
        while got < 80_000 {
            let mut c = q.consumer().unwrap();
            while let Some(v) = c.pop() {
                let (p, i) = ((v >> 32) as usize, v & 0xffff_ffff);
                assert_eq!(i, next[p], "per-producer order");
                next[p] += 1;
                got += 1;
            }
            drop(c);
            std::thread::yield_now();
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(next, [20_000; 4]);
    }

    #[test]
    fn fifo_full_and_wrap() {
        let q = Mpsc::new(3);
        for lap in 0..5 {
            for i in 0..3 {
                assert!(q.push(lap * 10 + i).is_ok());
            }
            assert_eq!(q.push(99), Err(99), "full at lap {lap}");
            assert!(q.is_full());
            let mut c = q.consumer().unwrap();
            assert!(q.consumer().is_none(), "one consumer at a time");
            assert_eq!(
                (c.pop(), c.pop(), c.pop(), c.pop()),
                (Some(lap * 10), Some(lap * 10 + 1), Some(lap * 10 + 2), None)
            );
            drop(c);
            assert!(q.is_empty());
        }
    }

    #[test]
    fn push_many_fills_what_is_free_in_order() {
        let q = Mpsc::new(5);
        q.push(0).unwrap();
        let mut v: Vec<i32> = (1..8).collect();
        assert_eq!(q.push_many(&mut v), 4);
        assert_eq!(v, [5, 6, 7], "the rest stays, in order");
        assert_eq!(q.push_many(&mut v), 0, "full");
        let mut c = q.consumer().unwrap();
        assert_eq!((c.pop(), c.pop()), (Some(0), Some(1)));
        drop(c);
        // Across the wrap of the ring.
        assert_eq!(q.push_many(&mut v), 2);
        assert_eq!(v, [7]);
        let mut c = q.consumer().unwrap();
        let got: Vec<i32> = std::iter::from_fn(|| c.pop()).collect();
        assert_eq!(got, [2, 3, 4, 5, 6]);
        drop(c);
        assert_eq!(q.push_many(&mut Vec::new()), 0);
    }

    #[test]
    fn push_many_races_single_pushes() {
        let q = Arc::new(Mpsc::new(32));
        let producers: Vec<_> = (0..4u64)
            .map(|p| {
                let q = q.clone();
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    let mut batch = Vec::new();
                    while i < 20_000 {
                        if p % 2 == 0 {
                            while batch.len() < 7 && i < 20_000 {
                                batch.push(p << 32 | i);
                                i += 1;
                            }
                            while !batch.is_empty() {
                                if q.push_many(&mut batch) == 0 {
                                    std::thread::yield_now();
                                }
                            }
                        } else {
                            push_retrying(&q, p << 32 | i);
                            i += 1;
                        }
                    }
                })
            })
            .collect();
        consume_in_order(&q, producers);
    }

    #[test]
    fn drops_what_it_holds() {
        let v = Arc::new(());
        let q = Mpsc::new(4);
        q.push(v.clone()).unwrap();
        q.push(v.clone()).unwrap();
        drop(q);
        assert_eq!(Arc::strong_count(&v), 1);
    }

    #[test]
    fn many_producers_one_consumer() {
        let q = Arc::new(Mpsc::new(64));
        let producers: Vec<_> = (0..4u64)
            .map(|p| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        push_retrying(&q, p << 32 | i);
                    }
                })
            })
            .collect();
        consume_in_order(&q, producers);
    }
}

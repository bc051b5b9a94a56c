//! TX and RX processing for one queue pair, called by the card worker that
//! owns it. The ring lock is held per batch, never per packet.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use enilab_switch::{GsoKind, PacketMeta};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use super::chain::{self, Dir, Seg};
use super::device::{NetDevice, QueueCounters};
use super::guest::{MemMap, Ring};
use super::hdr::{VirtioNetHdr, VNET_HDR_LEN};
use super::offload;
use super::MAX_FRAME;
use crate::port::{Bufs, Pkt, RxQueue};

/// Chains taken from a ring per batch before the worker looks elsewhere.
pub const BATCH: usize = 64;
/// Most RX chains one frame may span with MRG_RXBUF.
const MAX_RX_BUFS: usize = 64;
/// Frames delivered between two used-index updates within a batch.
const PUBLISH_EVERY: usize = 32;

/// Per-worker scratch for TX.
#[derive(Default)]
pub struct TxCtx {
    segs: Vec<Seg>,
}

/// Per-worker scratch for RX.
#[derive(Default)]
pub struct RxCtx {
    segs: Vec<Seg>,
    heads: Vec<(u16, u32, usize, usize)>,
    seg_buf: Vec<u8>,
}

/// Frames an RX queue pair holds outside its ring.
#[derive(Default)]
pub struct Backlog {
    /// Frames taken that found no guest buffer (first out next time).
    pub pending: VecDeque<Pkt>,
    /// Frames the worker switched to this queue itself (see
    /// [`crate::port::PortEgress::take_local`]).
    pub fresh: VecDeque<Pkt>,
}

impl Backlog {
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.fresh.is_empty()
    }
}

/// Outcome of a TX pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TxOutcome {
    /// The ring still had chains when the budget ran out.
    pub more: bool,
    /// Chains taken off the ring (good, bad and discarded).
    pub chains: usize,
}

/// Outcome of an RX pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RxOutcome {
    /// Frames are still waiting for guest buffers.
    pub waiting: bool,
    /// Frames written into the guest's ring.
    pub delivered: usize,
}

/// How a worker drives a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The worker sleeps until kicked: re-arm guest notifications when the
    /// ring runs dry.
    Notify,
    /// The worker busy-polls: leave guest notifications off, so the guest
    /// does not pay for kicks nobody waits for.
    Poll,
}

impl NetDevice {
    /// Take up to one batch of frames from the TX ring of `qp`, appending
    /// good ones to `out`. Bad chains are completed with length 0 and
    /// counted; a disabled ring is drained without forwarding.
    pub(crate) fn process_tx(
        &self,
        qp: u16,
        ctx: &mut TxCtx,
        pool: &mut Bufs,
        out: &mut Vec<Pkt>,
        mode: Mode,
    ) -> TxOutcome {
        let Some(vring) = self.vring(usize::from(qp) * 2 + 1) else {
            return TxOutcome::default();
        };
        let counters = &self.counters[usize::from(qp)];
        let hdr_len = self.hdr_len();
        let indirect = self.indirect();
        let mem = self.mem().memory();
        let map = MemMap::new(&mem);
        let mut st = vring.get_mut();
        let enabled = st.is_enabled();
        let q = st.get_queue_mut();
        if !q.ready() {
            return TxOutcome::default();
        }
        let Some(mut ring) = Ring::new(&map, q) else {
            counters.bad_rings.fetch_add(1, Ordering::Relaxed);
            return TxOutcome::default();
        };
        let mut done = 0usize;
        let mut more = false;
        let mut rearmed = false;
        let (mut packets, mut bytes) = (0u64, 0u64);
        loop {
            if !ring.has_next() {
                if mode == Mode::Poll {
                    break;
                }
                // Re-arm notifications; if the guest raced us, go again.
                // A garbage avail index keeps this true: retry only once.
                if ring.set_kicks(true) {
                    if !rearmed && done < BATCH {
                        rearmed = true;
                        continue;
                    }
                    // It raced us again. Entries it published before
                    // avail_event moved will never be kicked for (with
                    // EVENT_IDX the guest only kicks when its index
                    // crosses avail_event, which is now behind it): come
                    // back for them on the next pass instead of stranding
                    // the queue until the index wraps. Only when this call
                    // made progress, so a garbage index cannot spin us.
                    more = done > 0;
                }
                break;
            }
            if done == 0 {
                ring.set_kicks(false);
            }
            ring.prefetch(&map, (BATCH - done) as u16, false);
            while done < BATCH && ring.has_next() {
                let head = ring.pop_head();
                done += 1;
                if !enabled {
                    tracing::debug!(eni = %self.cfg.eni_id, qp, "TX on a disabled ring discarded");
                    counters.tx_discarded.fetch_add(1, Ordering::Relaxed);
                } else {
                    ctx.segs.clear();
                    match chain::walk(&map, ring.desc, head, indirect, Dir::Read, &mut ctx.segs) {
                        Err(e) => {
                            tracing::debug!(eni = %self.cfg.eni_id, qp, error = %e, "bad TX chain");
                            counters.tx_bad_chains.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(total) => {
                            if let Some(pkt) =
                                self.read_frame(&map, &ctx.segs, total, hdr_len, pool, counters)
                            {
                                packets += 1;
                                bytes += pkt.buf.len() as u64;
                                out.push(pkt);
                            }
                        }
                    }
                }
                // TX buffers are only read: used length 0, for good and bad
                // chains. A head beyond the ring (counted above) cannot be
                // named in the used ring.
                if head < ring.size() {
                    ring.push_used(head, 0);
                }
            }
            if done >= BATCH {
                more = true;
                break;
            }
        }
        ring.store(q);
        // Added once per batch: the counters are shared cache lines.
        if packets > 0 {
            counters.tx_packets.fetch_add(packets, Ordering::Relaxed);
            counters.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        if ring.needs_interrupt() {
            counters.notifications.fetch_add(1, Ordering::Relaxed);
            let _ = st.signal_used_queue();
        }
        TxOutcome { more, chains: done }
    }

    /// Turn the guest's kicks on the RX ring of `qp` on or off: a polling
    /// worker looks at the ring anyway, and a kick costs the guest a
    /// system call (or a VM exit).
    pub(crate) fn set_rx_kicks(&self, qp: u16, on: bool) {
        let Some(vring) = self.vring(usize::from(qp) * 2) else {
            return;
        };
        let mut st = vring.get_mut();
        if !st.get_queue().ready() {
            return;
        }
        let _ = if on {
            st.enable_notification().map(|_| ())
        } else {
            st.disable_notification()
        };
    }

    fn read_frame(
        &self,
        map: &MemMap<'_>,
        segs: &[Seg],
        total: u32,
        hdr_len: usize,
        pool: &mut Bufs,
        counters: &QueueCounters,
    ) -> Option<Pkt> {
        let total = total as usize;
        if total < hdr_len + 14 || total - hdr_len > MAX_FRAME {
            counters.tx_bad_frames.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let flen = total - hdr_len;
        // The usual frame: one buffer, and a header that asks for no
        // offload (flags and GSO type 0), so nothing else of it matters.
        if let [s] = segs {
            let mut fg = [0u8; 2];
            map.read(s.host, &mut fg);
            if fg == [0, 0] {
                let mut buf = pool.get();
                // In bounds: the buffer holds `total` bytes.
                map.read_into(s.host.wrapping_add(hdr_len), flen, &mut buf);
                return Some(Pkt {
                    buf,
                    meta: PacketMeta::default(),
                });
            }
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        chain::gather(map, segs, 0, &mut hdr[..hdr_len]);
        let meta = match VirtioNetHdr::parse(&hdr).to_meta(flen) {
            Ok(m) => m,
            Err(_) => {
                counters.tx_bad_frames.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        // One copy, straight from the guest's buffers into ours.
        let mut buf = pool.get();
        chain::gather_into(map, segs, hdr_len, &mut buf);
        Some(Pkt { buf, meta })
    }

    /// Move frames waiting in `rxq` and in `backlog` into the guest's RX
    /// ring of `qp`. Says whether frames are still waiting for buffers.
    pub(crate) fn process_rx(
        &self,
        qp: u16,
        rxq: &RxQueue,
        backlog: &mut Backlog,
        ctx: &mut RxCtx,
        pool: &mut Bufs,
        mode: Mode,
    ) -> RxOutcome {
        let Backlog { pending, fresh } = backlog;
        let Some(vring) = self.vring(usize::from(qp) * 2) else {
            return RxOutcome::default();
        };
        let counters = &self.counters[usize::from(qp)];
        let mem = self.mem().memory();
        let map = MemMap::new(&mem);
        let mut st = vring.get_mut();
        let idle = RxOutcome {
            waiting: !pending.is_empty() || !rxq.ring.is_empty() || !fresh.is_empty(),
            delivered: 0,
        };
        let enabled = st.is_enabled();
        let q = st.get_queue_mut();
        if !q.ready() || !enabled {
            return idle;
        }
        let Some(mut ring) = Ring::new(&map, q) else {
            counters.bad_rings.fetch_add(1, Ordering::Relaxed);
            return idle;
        };
        let mrg = self.has(VIRTIO_NET_F_MRG_RXBUF);
        let csum_ok = self.has(VIRTIO_NET_F_GUEST_CSUM);
        let rx = RxParams {
            hdr_len: self.hdr_len(),
            mrg,
            indirect: self.indirect(),
        };
        let mut delivered = 0usize;
        let mut bytes = 0u64;
        let mut retries = 0;
        // Claimed once per call: taking frames then needs no locked
        // instruction (see crate::mpsc).
        let mut queued = rxq.ring.consumer();
        let waiting = pending.len() + rxq.ring.len() + fresh.len();
        if waiting > 0 {
            ring.prefetch(&map, waiting.min(BATCH) as u16, true);
        }
        while delivered < BATCH * 4 {
            // Frames left from before, then the ring's, then what this
            // worker delivered itself (a flow's frames all come one way,
            // so the order between the last two is free). Once the ring
            // is found empty it is not looked at again in this call.
            let next = match pending.pop_front() {
                Some(p) => Some(p),
                None => match queued.as_mut().and_then(|c| c.pop()) {
                    Some(p) => Some(p),
                    None => {
                        queued = None;
                        fresh.pop_front()
                    }
                },
            };
            let Some(mut pkt) = next else {
                break;
            };
            // Offloads the guest did not negotiate are finished here.
            let tso_ok = match pkt.meta.gso.map(|g| g.kind) {
                None => true,
                Some(GsoKind::Tcpv4) => self.has(VIRTIO_NET_F_GUEST_TSO4) && csum_ok,
                Some(GsoKind::Tcpv6) => self.has(VIRTIO_NET_F_GUEST_TSO6) && csum_ok,
                Some(GsoKind::Udp) => false,
            };
            if !tso_ok {
                let Some(gso) = pkt.meta.gso else { continue };
                let mut segs = Vec::new();
                let r = offload::segment(&pkt.buf, &gso, &mut ctx.seg_buf, |s| {
                    let mut b = pool.get();
                    b.extend_from_slice(s);
                    segs.push(Pkt {
                        buf: b,
                        meta: PacketMeta::default(),
                    });
                });
                pool.put(pkt.buf);
                if r.is_err() {
                    counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    for s in segs {
                        pool.put(s.buf);
                    }
                    continue;
                }
                for s in segs.into_iter().rev() {
                    pending.push_front(s);
                }
                continue;
            }
            if !csum_ok {
                if let Some(c) = pkt.meta.csum.take() {
                    if offload::complete_csum(&mut pkt.buf, c).is_err() {
                        counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                        pool.put(pkt.buf);
                        continue;
                    }
                }
            }
            let hdr = VirtioNetHdr::from_meta(&pkt.meta);
            match rx_one(&map, &mut ring, &pkt.buf, hdr, &rx, ctx, counters) {
                RxResult::Done => {
                    delivered += 1;
                    bytes += pkt.buf.len() as u64;
                    pool.put(pkt.buf);
                    // A polling driver may go on with what it has.
                    if delivered % PUBLISH_EVERY == 0 {
                        ring.publish();
                    }
                }
                RxResult::Dropped => {
                    counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    pool.put(pkt.buf);
                }
                RxResult::NoBuffers => {
                    counters.rx_no_buffers.fetch_add(1, Ordering::Relaxed);
                    pending.push_front(pkt);
                    // Ask for a kick when buffers come; if some came in the
                    // meantime, go on. A polling worker just comes back.
                    if mode == Mode::Notify && retries < 2 && ring.set_kicks(true) {
                        retries += 1;
                        continue;
                    }
                    break;
                }
            }
        }
        drop(queued);
        ring.store(q);
        if delivered > 0 {
            counters
                .rx_packets
                .fetch_add(delivered as u64, Ordering::Relaxed);
            counters.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        if ring.needs_interrupt() {
            counters.notifications.fetch_add(1, Ordering::Relaxed);
            let _ = st.signal_used_queue();
        }
        RxOutcome {
            waiting: !pending.is_empty() || !rxq.ring.is_empty() || !fresh.is_empty(),
            delivered,
        }
    }
}

struct RxParams {
    hdr_len: usize,
    mrg: bool,
    indirect: bool,
}

pub(crate) enum RxResult {
    Done,
    Dropped,
    NoBuffers,
}

/// Write one frame (with its header) into as many RX chains as it needs:
/// one without MRG_RXBUF, up to MAX_RX_BUFS with it.
fn rx_one<'m>(
    map: &MemMap<'m>,
    ring: &mut Ring<'m>,
    frame: &[u8],
    mut hdr: VirtioNetHdr,
    p: &RxParams,
    ctx: &mut RxCtx,
    counters: &QueueCounters,
) -> RxResult {
    let need = p.hdr_len + frame.len();
    ctx.heads.clear();
    ctx.segs.clear();
    // The usual case: one buffer of the first chain holds the header and
    // the frame. The header goes as two stores, the frame as one copy.
    if !ring.has_next() {
        return RxResult::NoBuffers;
    }
    let head = ring.pop_head();
    if let Ok(len) = chain::walk(map, ring.desc, head, p.indirect, Dir::Write, &mut ctx.segs) {
        if let [s] = ctx.segs[..] {
            if len as usize >= need && p.hdr_len >= 8 {
                hdr.num_buffers = 1;
                let (lo, hi) = hdr.words();
                map.write_u64_u32(s.host, lo, hi, p.hdr_len - 8);
                // In bounds: the buffer holds `need` bytes.
                map.write(s.host.wrapping_add(p.hdr_len), frame);
                ring.push_used(head, need as u32);
                return RxResult::Done;
            }
        }
    }
    // Anything else (several buffers or chains, a bad chain) from the
    // start, the head given back.
    ring.unpop(1);
    ctx.segs.clear();
    let max_bufs = if p.mrg { MAX_RX_BUFS } else { 1 };
    let mut cap = 0usize;
    let mut popped = 0u16;
    while cap < need {
        if ctx.heads.len() == max_bufs {
            // The guest's buffers cannot hold this frame: leave them.
            ring.unpop(popped);
            return RxResult::Dropped;
        }
        if !ring.has_next() {
            ring.unpop(popped);
            return RxResult::NoBuffers;
        }
        let head = ring.pop_head();
        popped += 1;
        let start = ctx.segs.len();
        match chain::walk(map, ring.desc, head, p.indirect, Dir::Write, &mut ctx.segs) {
            Ok(len) => {
                ctx.heads.push((head, len, start, ctx.segs.len()));
                cap = cap.saturating_add(len as usize);
            }
            Err(e) => {
                // Complete the bad chain, and the good ones taken for this
                // frame, with length 0; the frame is dropped. A head beyond
                // the ring cannot be named in the used ring.
                tracing::debug!(error = %e, "bad RX chain");
                counters.rx_bad_chains.fetch_add(1, Ordering::Relaxed);
                if head < ring.size() {
                    ring.push_used(head, 0);
                }
                for &(h, ..) in &ctx.heads {
                    ring.push_used(h, 0);
                }
                return RxResult::Dropped;
            }
        }
    }
    hdr.num_buffers = ctx.heads.len() as u16;
    let mut off = 0usize;
    for i in 0..ctx.heads.len() {
        let (head, len, a, b) = ctx.heads[i];
        let n = (len as usize).min(need - off);
        let segs = &ctx.segs[a..b];
        match segs.first() {
            // The usual layout: the whole header fits the first buffer.
            Some(s) if off == 0 && s.len as usize >= p.hdr_len && p.hdr_len >= 8 => {
                let (lo, hi) = hdr.words();
                map.write_u64_u32(s.host, lo, hi, p.hdr_len - 8);
                chain::scatter(map, segs, p.hdr_len, &frame[..n - p.hdr_len]);
            }
            _ => write_stream(map, segs, &hdr.emit()[..p.hdr_len], frame, off, n),
        }
        ring.push_used(head, n as u32);
        off += n;
    }
    RxResult::Done
}

/// Write bytes [off, off+len) of the stream `hdr ++ frame` into `segs`.
fn write_stream(map: &MemMap<'_>, segs: &[Seg], hdr: &[u8], frame: &[u8], off: usize, len: usize) {
    let end = off + len;
    let mut pos = 0usize;
    if off < hdr.len() {
        let b = end.min(hdr.len());
        pos += chain::scatter(map, segs, 0, &hdr[off..b]);
    }
    let fa = off.max(hdr.len()) - hdr.len();
    let fb = end.saturating_sub(hdr.len());
    if fb > fa {
        chain::scatter(map, segs, pos, &frame[fa..fb]);
    }
}

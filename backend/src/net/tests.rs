//! Hostile-guest tests: virtqueues built by hand in test memory, driven
//! through the same TX/RX code the workers run.

use std::collections::VecDeque;
use std::sync::Arc;

use enilab_switch::{GsoKind, GsoOffload, PacketMeta};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::port::{Bufs, Pkt, Pool, PortHandle, Waker};
use crate::vhost_user::Backend;

const MEM: usize = 0x20_0000;
const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// A split ring laid out by hand: table, avail, used, then data buffers.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    fn new(base: u64) -> Self {
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn put_desc(&self, m: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(self.desc + u64::from(i) * 16);
        m.write_obj(addr, a).unwrap();
        m.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
        m.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
        m.write_obj(next, GuestAddress(a.0 + 14)).unwrap();
    }

    /// Publish `head` in the avail ring.
    fn publish(&mut self, m: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        m.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Add a chain of (addr, len, writable) buffers and publish it.
    fn chain(&mut self, m: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = self.next_desc;
            let last = k + 1 == bufs.len();
            let mut flags = if w { F_WRITE } else { 0 };
            if !last {
                flags |= F_NEXT;
            }
            self.put_desc(m, i, addr, len, flags, (i + 1) % QSIZE);
            self.next_desc = (self.next_desc + 1) % QSIZE;
        }
        self.publish(m, head);
        head
    }

    fn used_idx(&self, m: &GuestMemoryMmap) -> u16 {
        m.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    fn used_elem(&self, m: &GuestMemoryMmap, n: u16) -> (u32, u32) {
        let a = self.used + 4 + u64::from(n % QSIZE) * 8;
        (
            m.read_obj(GuestAddress(a)).unwrap(),
            m.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }
}

struct Rig {
    dev: Arc<NetDevice>,
    mem: GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    pool: Arc<Pool>,
    handle: Arc<PortHandle>,
}

fn features(extra: u64) -> u64 {
    bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | extra
}

fn rig(acked: u64) -> Rig {
    let dev = NetDevice::new(DeviceConfig {
        eni_id: "eni-test".into(),
        port: 1,
        mac: [2, 0, 0, 0, 0, 1],
        mtu: 1500,
        queue_pairs: 1,
    })
    .unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    dev.memory().lock().unwrap().replace(mem.clone());
    let rx = Ring::new(0x1_0000);
    let tx = Ring::new(0x2_0000);
    for (i, r) in [(0usize, &rx), (1, &tx)] {
        let v = dev.vring(i).unwrap();
        v.set_queue_size(QSIZE);
        v.set_queue_info(r.desc, r.avail, r.used).unwrap();
        v.set_queue_ready(true);
        v.set_enabled(true);
    }
    dev.set_acked_features(acked);
    let waker = Arc::new(Waker::new().unwrap());
    let handle = Arc::new(PortHandle::new(1, &[waker]));
    let _ = dev.handle.set(handle.clone());
    Rig {
        dev,
        mem,
        rx,
        tx,
        pool: Arc::new(Pool::default()),
        handle,
    }
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12] = 0x08;
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = i as u8;
    }
    f
}

impl Rig {
    fn bufs(&self) -> Bufs {
        Bufs::new(self.pool.clone())
    }

    fn tx_pass(&self) -> Vec<Pkt> {
        let mut out = Vec::new();
        let mut ctx = TxCtx::default();
        self.dev
            .process_tx(0, &mut ctx, &mut self.bufs(), &mut out, Mode::Notify);
        out
    }

    fn rx_pass(&self, pending: &mut VecDeque<Pkt>) -> bool {
        let mut ctx = RxCtx::default();
        let mut backlog = Backlog {
            pending: std::mem::take(pending),
            fresh: VecDeque::new(),
        };
        let waiting = self
            .dev
            .process_rx(
                0,
                &self.handle.rxq[0],
                &mut backlog,
                &mut ctx,
                &mut self.bufs(),
                Mode::Notify,
            )
            .waiting;
        *pending = backlog.pending;
        waiting
    }

    /// Write header + frame at `addr` as one TX buffer.
    fn tx_buf(&self, addr: u64, f: &[u8]) -> u32 {
        self.mem
            .write_slice(&[0u8; 12], GuestAddress(addr))
            .unwrap();
        self.mem.write_slice(f, GuestAddress(addr + 12)).unwrap();
        (f.len() + 12) as u32
    }
}

#[test]
fn tx_good_frame_is_taken_and_completed() {
    let mut r = rig(features(0));
    let f = frame(60);
    let len = r.tx_buf(0x10_0000, &f);
    // Header and frame split over two descriptors.
    r.tx.chain(
        &r.mem,
        &[(0x10_0000, 5, false), (0x10_0005, len - 5, false)],
    );
    let out = r.tx_pass();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].buf, f);
    assert_eq!(r.tx.used_idx(&r.mem), 1);
    assert_eq!(r.tx.used_elem(&r.mem, 0), (0, 0));
    let s = r.dev.stats();
    assert_eq!((s.tx_packets, s.tx_bytes, s.tx_bad_chains), (1, 60, 0));
}

/// A frame in one buffer with its header: a header asking for nothing
/// gives plain metadata whatever its other bytes hold; one asking for a
/// checksum is read whole.
#[test]
fn tx_one_buffer_frame_and_its_header() {
    let mut r = rig(features(0));
    let f = frame(60);
    let len = r.tx_buf(0x10_0000, &f);
    let mut post = |addr: u64, hdr: [u8; 12], len: u32| {
        r.mem.write_slice(&hdr, GuestAddress(addr)).unwrap();
        r.tx.chain(&r.mem, &[(addr, len, false)]);
    };
    // Flags and GSO type 0; stale bytes in the rest of the header.
    post(0x10_0000, [0, 0, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9], len);
    let len2 = (f.len() + 12) as u32;
    r.mem.write_slice(&f, GuestAddress(0x10_1000 + 12)).unwrap();
    // NEEDS_CSUM, from byte 34, result at 34 + 6.
    post(0x10_1000, [1, 0, 0, 0, 0, 0, 34, 0, 6, 0, 0, 0], len2);
    let out = r.tx_pass();
    assert_eq!(out.len(), 2);
    assert_eq!((&out[0].buf, out[0].meta), (&f, PacketMeta::default()));
    assert_eq!(out[1].buf, f);
    assert_eq!(
        out[1].meta.csum,
        Some(enilab_switch::CsumOffload {
            start: 34,
            offset: 6
        })
    );
    assert_eq!(r.dev.stats().tx_packets, 2);
}

#[test]
fn tx_hostile_chains_are_completed_with_zero_and_counted() {
    let mut r = rig(features(0));
    let f = frame(60);
    let len = r.tx_buf(0x10_0000, &f);
    // Outside guest memory.
    r.tx.chain(&r.mem, &[(MEM as u64 - 8, 64, false)]);
    // Address overflow.
    r.tx.chain(&r.mem, &[(u64::MAX - 2, 64, false)]);
    // Write-only descriptor on TX.
    r.tx.chain(&r.mem, &[(0x10_0000, len, true)]);
    // A loop: descriptor 10 -> 11 -> 10.
    r.tx.put_desc(&r.mem, 10, 0x10_0000, 8, F_NEXT, 11);
    r.tx.put_desc(&r.mem, 11, 0x10_0000, 8, F_NEXT, 10);
    r.tx.publish(&r.mem, 10);
    // Head beyond the queue.
    r.tx.publish(&r.mem, QSIZE + 3);
    // Next beyond the queue.
    r.tx.put_desc(&r.mem, 12, 0x10_0000, 8, F_NEXT, 999);
    r.tx.publish(&r.mem, 12);
    // Nested indirect tables.
    r.tx.put_desc(&r.mem, 13, 0x18_0000, 16, F_INDIRECT, 0);
    r.mem
        .write_obj(0x18_0000u64, GuestAddress(0x18_0000))
        .unwrap();
    r.mem.write_obj(16u32, GuestAddress(0x18_0008)).unwrap();
    r.mem
        .write_obj(F_INDIRECT, GuestAddress(0x18_000c))
        .unwrap();
    r.tx.publish(&r.mem, 13);
    let out = r.tx_pass();
    assert!(out.is_empty());
    let s = r.dev.stats();
    assert_eq!(s.tx_bad_chains, 7, "{s:?}");
    assert_eq!(s.tx_packets, 0);
    // Every chain with a valid head was completed with length 0.
    let used = r.tx.used_idx(&r.mem);
    assert_eq!(used, 6);
    for n in 0..used {
        assert_eq!(r.tx.used_elem(&r.mem, n).1, 0);
    }
    // The ring still works afterwards.
    r.tx.next_desc = 0;
    r.tx.chain(&r.mem, &[(0x10_0000, len, false)]);
    assert_eq!(r.tx_pass().len(), 1);
}

#[test]
fn tx_runt_and_oversize_frames_are_refused() {
    let mut r = rig(features(0));
    // Header only: a zero-length frame.
    r.tx.chain(&r.mem, &[(0x10_0000, 12, false)]);
    // A 10-byte frame, shorter than an Ethernet header.
    r.tx.chain(&r.mem, &[(0x10_0000, 22, false)]);
    // Larger than any frame, in several buffers.
    r.tx.chain(
        &r.mem,
        &[(0x10_0000, 40_000, false), (0x10_0000, 40_000, false)],
    );
    // Zero-length descriptors only.
    r.tx.chain(&r.mem, &[(0x10_0000, 0, false), (0x10_0000, 0, false)]);
    assert!(r.tx_pass().is_empty());
    let s = r.dev.stats();
    assert_eq!(s.tx_bad_frames, 4, "{s:?}");
    assert_eq!(r.tx.used_idx(&r.mem), 4);
}

#[test]
fn tx_bad_offload_header_is_refused() {
    let mut r = rig(features(0));
    let f = frame(60);
    let len = r.tx_buf(0x10_0000, &f);
    // NEEDS_CSUM with an offset beyond the frame.
    r.mem.write_obj(1u8, GuestAddress(0x10_0000)).unwrap();
    r.mem.write_obj(200u16, GuestAddress(0x10_0006)).unwrap();
    r.tx.chain(&r.mem, &[(0x10_0000, len, false)]);
    assert!(r.tx_pass().is_empty());
    assert_eq!(r.dev.stats().tx_bad_frames, 1);
}

#[test]
fn tx_on_disabled_ring_is_discarded() {
    let mut r = rig(features(0));
    r.dev.vring(1).unwrap().set_enabled(false);
    let f = frame(60);
    let len = r.tx_buf(0x10_0000, &f);
    r.tx.chain(&r.mem, &[(0x10_0000, len, false)]);
    assert!(r.tx_pass().is_empty());
    assert_eq!(r.dev.stats().tx_discarded, 1);
    assert_eq!(r.tx.used_idx(&r.mem), 1);
}

#[test]
fn tx_garbage_avail_index_does_not_spin_or_crash() {
    let r = rig(features(0));
    // avail.idx far ahead of anything published.
    r.mem
        .write_obj(0x8000u16, GuestAddress(r.tx.avail + 2))
        .unwrap();
    assert!(r.tx_pass().is_empty());
}

#[test]
fn rx_mergeable_spans_buffers_and_sets_num_buffers() {
    let mut r = rig(features(0));
    for k in 0..4u64 {
        r.rx.chain(&r.mem, &[(0x10_0000 + k * 0x1000, 64, true)]);
    }
    let f = frame(200);
    let mut pending = VecDeque::from([Pkt {
        buf: f.clone(),
        meta: PacketMeta::default(),
    }]);
    assert!(!r.rx_pass(&mut pending));
    // 12 + 200 bytes over 64-byte buffers: 4 buffers.
    assert_eq!(r.rx.used_idx(&r.mem), 4);
    let nb: u16 = r.mem.read_obj(GuestAddress(0x10_0000 + 10)).unwrap();
    assert_eq!(nb, 4);
    let mut got = Vec::new();
    for k in 0..4u16 {
        let (_, len) = r.rx.used_elem(&r.mem, k);
        let mut b = vec![0u8; len as usize];
        r.mem
            .read_slice(&mut b, GuestAddress(0x10_0000 + u64::from(k) * 0x1000))
            .unwrap();
        got.extend_from_slice(&b);
    }
    assert_eq!(&got[12..], &f[..]);
    assert_eq!(r.dev.stats().rx_packets, 1);
}

/// The usual delivery, one buffer holding header and frame, writes exactly
/// the header the general path writes, then the frame: for a 12-byte
/// header with and without a checksum offload (the guest takes partial
/// checksums), and for a legacy 10-byte one.
#[test]
fn rx_one_buffer_holds_header_and_frame() {
    let partial = PacketMeta {
        csum: Some(enilab_switch::CsumOffload {
            start: 34,
            offset: 6,
        }),
        gso: None,
    };
    for (acked, hdr_len, metas) in [
        (features(0), 12usize, vec![PacketMeta::default(), partial]),
        (0, 10, vec![PacketMeta::default()]),
    ] {
        for meta in metas {
            let mut r = rig(acked);
            let f = frame(60);
            // The buffer is dirty: every byte of header and frame must be
            // written, and nothing past them.
            r.mem
                .write_slice(&[0xee; 256], GuestAddress(0x10_0000))
                .unwrap();
            r.rx.chain(&r.mem, &[(0x10_0000, 2048, true)]);
            let mut pending = VecDeque::from([Pkt {
                buf: f.clone(),
                meta,
            }]);
            assert!(!r.rx_pass(&mut pending));
            assert_eq!(r.rx.used_idx(&r.mem), 1);
            assert_eq!(r.rx.used_elem(&r.mem, 0).1 as usize, hdr_len + f.len());
            let mut got = vec![0u8; hdr_len + f.len() + 4];
            r.mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
            let mut want_hdr = hdr::VirtioNetHdr::from_meta(&meta);
            want_hdr.num_buffers = 1;
            let want_hdr = want_hdr.emit();
            assert_eq!(&got[..hdr_len], &want_hdr[..hdr_len], "{acked:#x} {meta:?}");
            assert_eq!(&got[hdr_len..hdr_len + f.len()], &f[..]);
            assert_eq!(
                &got[hdr_len + f.len()..],
                &[0xee; 4],
                "nothing past the frame"
            );
        }
    }
}

#[test]
fn rx_waits_for_buffers_and_keeps_the_frame() {
    let mut r = rig(features(bit(VIRTIO_RING_F_EVENT_IDX)));
    let mut pending = VecDeque::from([Pkt {
        buf: frame(100),
        meta: PacketMeta::default(),
    }]);
    assert!(r.rx_pass(&mut pending));
    assert_eq!(pending.len(), 1);
    assert_eq!(r.dev.stats().rx_no_buffers, 1);
    // Not enough room yet (needs 112 bytes): nothing is consumed.
    r.rx.chain(&r.mem, &[(0x10_0000, 64, true)]);
    assert!(r.rx_pass(&mut pending));
    assert_eq!(r.rx.used_idx(&r.mem), 0);
    r.rx.chain(&r.mem, &[(0x10_1000, 64, true)]);
    assert!(!r.rx_pass(&mut pending));
    assert_eq!(r.rx.used_idx(&r.mem), 2);
}

#[test]
fn rx_hostile_chain_is_completed_with_zero() {
    let mut r = rig(features(0));
    // A device-readable buffer in the RX ring, then one outside memory.
    r.rx.chain(&r.mem, &[(0x10_0000, 2048, false)]);
    r.rx.chain(&r.mem, &[(MEM as u64 - 16, 2048, true)]);
    r.rx.chain(&r.mem, &[(0x10_2000, 2048, true)]);
    let mut pending: VecDeque<Pkt> = (0..3)
        .map(|_| Pkt {
            buf: frame(100),
            meta: PacketMeta::default(),
        })
        .collect();
    r.rx_pass(&mut pending);
    let s = r.dev.stats();
    assert_eq!(s.rx_bad_chains, 2, "{s:?}");
    assert_eq!(s.rx_packets, 1);
    assert_eq!(r.rx.used_elem(&r.mem, 0).1, 0);
    assert_eq!(r.rx.used_elem(&r.mem, 1).1, 0);
    assert_eq!(r.rx.used_elem(&r.mem, 2).1, 112);
}

#[test]
fn rx_disabled_ring_is_not_filled() {
    let mut r = rig(features(0));
    r.dev.vring(0).unwrap().set_enabled(false);
    r.rx.chain(&r.mem, &[(0x10_0000, 2048, true)]);
    let mut pending = VecDeque::from([Pkt {
        buf: frame(100),
        meta: PacketMeta::default(),
    }]);
    assert!(r.rx_pass(&mut pending));
    assert_eq!(r.rx.used_idx(&r.mem), 0);
}

#[test]
fn rx_gso_is_segmented_for_a_guest_without_tso() {
    let mut r = rig(features(0));
    for k in 0..8u64 {
        r.rx.chain(&r.mem, &[(0x10_0000 + k * 0x1000, 2048, true)]);
    }
    let payload = vec![0x5au8; 3000];
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv4([10, 0, 1, 4], [10, 0, 1, 5], 64)
        .tcp(1, 2, 100, 1000);
    let mut f = Vec::new();
    b.write(&mut f, &payload).unwrap();
    let meta = PacketMeta {
        csum: None,
        gso: Some(GsoOffload {
            kind: GsoKind::Tcpv4,
            size: 1000,
            hdr_len: 54,
            ecn: false,
        }),
    };
    let mut pending = VecDeque::from([Pkt { buf: f, meta }]);
    r.rx_pass(&mut pending);
    assert_eq!(r.rx.used_idx(&r.mem), 3);
    for k in 0..3 {
        assert_eq!(r.rx.used_elem(&r.mem, k).1, 12 + 54 + 1000);
    }
    assert_eq!(r.dev.stats().rx_packets, 3);
}

#[test]
fn device_refuses_bad_configs() {
    let mut cfg = DeviceConfig {
        eni_id: "eni-x".into(),
        port: 1,
        mac: [2, 0, 0, 0, 0, 1],
        mtu: 1500,
        queue_pairs: 0,
    };
    assert!(matches!(
        NetDevice::new(cfg.clone()),
        Err(NetError::QueuePairs(0))
    ));
    cfg.queue_pairs = 17;
    assert!(NetDevice::new(cfg.clone()).is_err());
    cfg.queue_pairs = 16;
    cfg.mac = [1, 0, 0, 0, 0, 1];
    assert!(matches!(
        NetDevice::new(cfg.clone()),
        Err(NetError::BadMac(_))
    ));
    cfg.mac = [2, 0, 0, 0, 0, 1];
    let d = NetDevice::new(cfg).unwrap();
    assert_eq!(d.num_queues(), 32);
    assert!(d.features() & bit(VIRTIO_NET_F_MQ) != 0);
}

/// Rows: (mode, avail flags the driver wrote, used flags after the pass,
/// interrupts sent). Without EVENT_IDX: a polling worker leaves the
/// guest's kicks off, a notified one re-arms them; NO_INTERRUPT from a
/// polling driver suppresses the interrupt.
#[test]
fn tx_notification_suppression() {
    let rows: &[(Mode, u16, u16, u64)] = &[
        (Mode::Notify, 0, 0, 1),
        (Mode::Notify, 1, 0, 0),
        (Mode::Poll, 0, 1, 1),
        (Mode::Poll, 1, 1, 0),
    ];
    for &(mode, avail_flags, want_used_flags, want_irqs) in rows {
        let mut r = rig(features(0));
        r.mem
            .write_obj(avail_flags, GuestAddress(r.tx.avail))
            .unwrap();
        let f = frame(60);
        let len = r.tx_buf(0x10_0000, &f);
        r.tx.chain(&r.mem, &[(0x10_0000, len, false)]);
        let mut out = Vec::new();
        let mut ctx = TxCtx::default();
        let o = r.dev.process_tx(0, &mut ctx, &mut r.bufs(), &mut out, mode);
        let row = format!("{mode:?} avail flags {avail_flags}");
        assert_eq!((o.chains, out.len()), (1, 1), "{row}");
        let used_flags: u16 = r.mem.read_obj(GuestAddress(r.tx.used)).unwrap();
        assert_eq!(used_flags, want_used_flags, "{row}");
        assert_eq!(r.dev.stats().notifications, want_irqs, "{row}");
    }
}

#[test]
fn rx_kicks_can_be_turned_off_and_on() {
    let r = rig(features(0));
    let flags = |r: &Rig| -> u16 { r.mem.read_obj(GuestAddress(r.rx.used)).unwrap() };
    r.dev.set_rx_kicks(0, false);
    assert_eq!(flags(&r), 1);
    r.dev.set_rx_kicks(0, true);
    assert_eq!(flags(&r), 0);
}

#[test]
fn busy_poll_budget_is_kept_and_capped() {
    set_busy_poll(std::time::Duration::from_micros(250));
    assert_eq!(busy_poll(), std::time::Duration::from_micros(250));
    set_busy_poll(std::time::Duration::from_secs(30));
    assert_eq!(busy_poll(), std::time::Duration::from_secs(1));
    set_busy_poll(std::time::Duration::ZERO);
    assert!(busy_poll().is_zero());
}

/// The switch emitting the very frame it was given moves the buffer into
/// the port queue (no copy); any other frame is copied; a full queue
/// refuses both.
#[test]
fn egress_moves_the_ingress_buffer() {
    use crate::port::{PortEgress, PortTable};
    use enilab_switch::Egress;
    let r = rig(features(0));
    r.handle
        .enabled_rx
        .store(1, std::sync::atomic::Ordering::Release);
    let table = PortTable::default();
    table.insert(r.handle.clone());
    let pool = Pool::default();
    let meta = PacketMeta::default();

    let pkt = Pkt {
        buf: frame(60),
        meta,
    };
    let addr = pkt.buf.as_ptr();
    let mut eg = PortEgress::new(&table, &pool);
    eg.set_ingress(&pkt.buf);
    assert!(eg.emit(1, 0, &pkt.buf.clone(), &meta), "a copy is emitted");
    assert!(
        eg.emit(1, 0, &pkt.buf, &meta),
        "the frame itself is deferred"
    );
    assert!(eg.finish(pkt).is_none(), "held, not handed back");
    let q = &r.handle.rxq[0].ring;
    assert_eq!(q.len(), 1, "the moved frame is held until the flush");
    assert_eq!(eg.flush(), 0);
    assert_eq!(q.len(), 2);
    let first = q.pop().unwrap();
    let second = q.pop().unwrap();
    assert_ne!(first.buf.as_ptr(), addr, "copied frame has its own buffer");
    assert_eq!(second.buf.as_ptr(), addr, "moved frame keeps its buffer");
    assert_eq!(second.buf, frame(60));

    // Fill the queue: both paths refuse, and finish gives the buffer back.
    while q
        .push(Pkt {
            buf: Vec::new(),
            meta,
        })
        .is_ok()
    {}
    let pkt = Pkt {
        buf: frame(60),
        meta,
    };
    eg.set_ingress(&pkt.buf);
    assert!(!eg.emit(1, 0, &pkt.buf, &meta));
    assert!(!eg.emit(1, 0, &frame(61), &meta));
    let back = eg.finish(pkt).expect("refused: the buffer comes back");
    assert_eq!(back, frame(60));
    assert_eq!(eg.flush(), 0);
    drop(eg);

    // A held frame goes before a copy emitted after it, and one still held
    // when the egress is dropped is queued, not lost.
    while q.pop().is_some() {}
    let mut eg = PortEgress::new(&table, &pool);
    for len in [60, 62] {
        let pkt = Pkt {
            buf: frame(len),
            meta,
        };
        eg.set_ingress(&pkt.buf);
        assert!(eg.emit(1, 0, &pkt.buf, &meta));
        assert!(eg.finish(pkt).is_none());
    }
    assert!(eg.emit(1, 0, &frame(61), &meta));
    let pkt = Pkt {
        buf: frame(63),
        meta,
    };
    eg.set_ingress(&pkt.buf);
    assert!(eg.emit(1, 0, &pkt.buf, &meta));
    assert!(eg.finish(pkt).is_none());
    drop(eg);
    let lens: Vec<usize> = std::iter::from_fn(|| q.pop())
        .map(|p| p.buf.len())
        .collect();
    assert_eq!(lens, [60, 62, 61, 63]);
}

/// The egress of the worker that serves a queue keeps that queue's frames
/// for the worker, in emit order, copies among them, and off the ring;
/// frames it is dropped with, or that are handed back, go the ring way;
/// frames the worker holds count against the queue's room; and another
/// worker's egress uses the ring as before.
#[test]
fn egress_keeps_the_owners_frames_off_the_ring() {
    use crate::port::{PortEgress, PortTable, RX_QUEUE_DEPTH};
    use enilab_switch::Egress;
    use std::sync::atomic::Ordering;
    let r = rig(features(0));
    r.handle.enabled_rx.store(1, Ordering::Release);
    let table = PortTable::default();
    table.insert(r.handle.clone());
    let pool = Pool::default();
    let meta = PacketMeta::default();
    let own = r.handle.rxq[0].waker.clone();
    let q = &r.handle.rxq[0].ring;
    let send = |eg: &mut PortEgress<'_>, len: usize| {
        let pkt = Pkt {
            buf: frame(len),
            meta,
        };
        eg.set_ingress(&pkt.buf);
        let ok = eg.emit(1, 0, &pkt.buf, &meta);
        assert_eq!(eg.finish(pkt).is_none(), ok, "held exactly when emitted");
        ok
    };

    let mut eg = PortEgress::new(&table, &pool).with_owner(&own);
    assert!(send(&mut eg, 60) && send(&mut eg, 62));
    assert!(eg.emit(1, 0, &frame(61), &meta), "a copy");
    assert!(send(&mut eg, 63));
    assert_eq!(eg.flush(), 0);
    assert!(q.is_empty(), "nothing through the ring");
    let mut local = Vec::new();
    eg.take_local(&mut local);
    let lens: Vec<usize> = local
        .iter()
        .flat_map(|l| l.pkts.iter().map(|p| p.buf.len()))
        .collect();
    assert_eq!(lens, [60, 62, 61, 63]);
    assert!(local
        .iter()
        .all(|l| l.handle == Arc::as_ptr(&r.handle) as usize && l.queue == 0));
    // Handed back undelivered: queued on the ring, in order.
    for l in local {
        assert_eq!(eg.requeue(l), 0);
    }
    assert!(send(&mut eg, 64), "held again after the hand-back");
    drop(eg);
    let lens: Vec<usize> = std::iter::from_fn(|| q.pop())
        .map(|p| p.buf.len())
        .collect();
    assert_eq!(lens, [60, 62, 61, 63, 64], "dropped with one: it is queued");

    // What the worker holds fills the queue as the ring does.
    r.handle.rxq[0]
        .held
        .store(RX_QUEUE_DEPTH, Ordering::Relaxed);
    let mut eg = PortEgress::new(&table, &pool).with_owner(&own);
    assert!(!send(&mut eg, 60));
    assert!(!eg.emit(1, 0, &frame(61), &meta));
    drop(eg);
    r.handle.rxq[0].held.store(0, Ordering::Relaxed);

    // Another worker's egress: the ring.
    let other = Waker::new().unwrap();
    let mut eg = PortEgress::new(&table, &pool).with_owner(&other);
    assert!(send(&mut eg, 60));
    assert_eq!(eg.flush(), 0);
    let mut local = Vec::new();
    eg.take_local(&mut local);
    assert!(local.is_empty());
    assert_eq!(q.len(), 1);
}

/// Translation across several regions, in an order that defeats the
/// last-hit shortcut: every address lands where vm-memory says, a range
/// running past its region's end is refused whichever region hit last,
/// and the gaps between regions are not memory.
#[test]
fn translate_across_regions() {
    use super::guest::MemMap;
    use vm_memory::GuestMemoryBackend;
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x10_0000), 0x2_0000),
        (GuestAddress(0x40_0000), 0x1_0000),
    ])
    .unwrap();
    let map = MemMap::new(&mem);
    let want = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap();
    for a in [
        0x10_0010u64,
        0x40,
        0x40_0fff,
        0x10_0010,
        0x11_ff00,
        0,
        0x40_0000,
    ] {
        assert_eq!(map.translate(a, 16), Some(want(a)), "{a:#x}");
    }
    // Ends past its region: refused with the region just hit and without.
    assert_eq!(map.translate(0x11_fff8, 16), None);
    assert_eq!(map.translate(0x40, 16), Some(want(0x40)));
    assert_eq!(map.translate(0x11_fff8, 16), None);
    assert_eq!(map.translate(0xfff8, 16), None);
    // Gaps and beyond.
    for a in [0x1_0000u64, 0x3f_ffff, 0x41_0000, u64::MAX - 4] {
        assert_eq!(map.translate(a, 1), None, "{a:#x}");
    }
    assert_eq!(map.translate(0x10_0000, 0x2_0000), Some(want(0x10_0000)));
    assert_eq!(map.translate(0x10_0000, 0x2_0001), None);
}

/// A worker's buffers: the one given back is the one taken next, a buffer
/// of another size goes to the shared pool, and the cache's buffers go
/// there too when it is dropped.
#[test]
fn bufs_recycle_their_own() {
    let pool = Arc::new(Pool::default());
    let mut bufs = Bufs::new(pool.clone());
    let mut a = bufs.get();
    a.extend_from_slice(b"frame");
    let at = a.as_ptr();
    bufs.put(a);
    let b = bufs.get();
    assert_eq!((b.as_ptr(), b.len()), (at, 0), "the same buffer, emptied");
    bufs.put(b);
    // A super-packet's buffer is not cached here (nor hoarded by the pool).
    bufs.put(Vec::with_capacity(65536));
    let c = bufs.get();
    assert_eq!(c.as_ptr(), at);
    bufs.put(c);
    drop(bufs);
    // The dropped cache's buffer went to the pool (its thread cache).
    let d = pool.get();
    assert_eq!(d.as_ptr(), at);
}

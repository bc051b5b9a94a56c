//! Entry points for the cargo-fuzz targets in `fuzz/` (and their seeds'
//! regression tests). Not part of the API: everything here takes the
//! fuzzer's raw bytes and must never panic, whatever they are.
//!
//! * [`vhost_user_stream`]: the bytes are a frontend's message stream,
//!   cut into chunks that may carry a dummy memfd or eventfd, served by the
//!   real session loop over a socket pair; the rings the stream set up are
//!   then run through the TX and RX paths.
//! * [`virtqueue`]: the bytes are guest memory (descriptor tables, avail
//!   rings, buffers) and the negotiated features; the TX path reads it and
//!   the frames it takes are delivered back through the RX path.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use vhost_user_backend::VringT;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::net::{bit, Backlog, DeviceConfig, Mode, NetDevice, RxCtx, TxCtx};
use crate::port::{Bufs, Pkt, Pool, PortHandle, Waker};
use crate::vhost_user::{Backend, Session};

/// Guest memory of the fuzzed devices.
const MEM: usize = 0x1_0000;
/// Size of the memfd attached to a chunk of the message stream.
const MEMFD_LEN: i64 = 0x1_0000;
/// Fds one stream may carry in all (each chunk at most one).
const MAX_STREAM_FDS: usize = 16;
/// TX and RX passes per input: enough to wrap small rings.
const PASSES: usize = 4;

fn device(queue_pairs: u16) -> Option<(Arc<NetDevice>, Arc<PortHandle>)> {
    let dev = NetDevice::new(DeviceConfig {
        eni_id: "eni-fuzz".into(),
        port: 1,
        mac: [2, 0, 0, 0, 0, 1],
        mtu: 9001,
        queue_pairs,
    })
    .ok()?;
    let wakers: Vec<Arc<Waker>> = (0..queue_pairs)
        .map(|_| Waker::new().ok().map(Arc::new))
        .collect::<Option<_>>()?;
    let handle = Arc::new(PortHandle::new(1, &wakers));
    let _ = dev.handle.set(handle.clone());
    Some((dev, handle))
}

fn memfd() -> Option<File> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; no memory
    // of ours is touched. The descriptor is owned by the File right after.
    let fd = unsafe { libc::memfd_create(c"enilab-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let f = unsafe { File::from_raw_fd(fd) };
    // SAFETY: ftruncate on a descriptor we own, integer arguments only.
    if unsafe { libc::ftruncate(f.as_raw_fd(), MEMFD_LEN) } != 0 {
        return None;
    }
    Some(f)
}

fn eventfd() -> Option<File> {
    // SAFETY: eventfd takes integers only; the result is owned right after.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Some(unsafe { File::from_raw_fd(fd) })
}

/// Feed `data` to one vhost-user session as a frontend's stream.
///
/// Layout: records of `[tag u8][len u8][len bytes]`. Bit 0 of the tag
/// attaches a 64 KiB memfd to the chunk, bit 1 an eventfd; bits 2-3 pick
/// the queue pairs of the device (1 to 4) from the first record. The whole
/// stream is written before the session runs and the write side is shut,
/// so the session ends at the stream's end and nothing can block (a stream
/// larger than the socket buffer is cut where the buffer filled).
/// Returns the number of requests served before the session ended.
pub fn vhost_user_stream(data: &[u8]) -> usize {
    let pairs = data.first().map_or(1, |t| u16::from((t >> 2) & 3) + 1);
    let Some((dev, handle)) = device(pairs) else {
        return 0;
    };
    let Ok((front, back)) = UnixStream::pair() else {
        return 0;
    };
    // Replies go unread into `front`'s buffer, and the stream is written
    // before anyone reads it: a full buffer must end the writing (and the
    // session's replies), never block.
    let _ = back.set_write_timeout(Some(Duration::from_millis(100)));
    if front.set_nonblocking(true).is_err() {
        return 0;
    }
    let mut fds_sent = 0usize;
    let mut rest = data;
    while let [tag, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        rest = next;
        if chunk.is_empty() {
            continue;
        }
        let mut files = Vec::new();
        if fds_sent < MAX_STREAM_FDS {
            if tag & 1 != 0 {
                files.extend(memfd());
            } else if tag & 2 != 0 {
                files.extend(eventfd());
            }
        }
        fds_sent += files.len();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let sent = if raw.is_empty() {
            (&front).write_all(chunk).is_ok()
        } else {
            front.send_with_fds(&[chunk], &raw).is_ok()
        };
        if !sent {
            break;
        }
    }
    let _ = front.shutdown(Shutdown::Write);
    let mut session = Session::new(back, &*dev);
    // Bounded by the stream: every request consumes at least a header.
    let mut served = 0usize;
    while let Ok(true) = session.serve_one() {
        served += 1;
    }
    drop(session);
    // Whatever rings the stream managed to set up go through the datapath
    // before the device is reset, as a worker would have run them.
    run_datapath(&dev, &handle, pairs, &[]);
    dev.reset();
    served
}

/// Run TX passes on every queue pair, then feed what they produced (and
/// `extra`) to the RX path of queue pair 0.
fn run_datapath(dev: &NetDevice, handle: &PortHandle, pairs: u16, extra: &[u8]) -> usize {
    let mut pool = Bufs::new(std::sync::Arc::new(Pool::default()));
    let mut out = Vec::new();
    let mut tx = TxCtx::default();
    for qp in 0..pairs {
        for _ in 0..PASSES {
            dev.process_tx(qp, &mut tx, &mut pool, &mut out, Mode::Notify);
        }
    }
    let taken = out.len();
    let mut backlog = Backlog {
        pending: out.into_iter().collect(),
        fresh: VecDeque::new(),
    };
    if !extra.is_empty() {
        let mut buf = pool.get();
        buf.extend_from_slice(extra);
        backlog.pending.push_back(Pkt {
            buf,
            meta: Default::default(),
        });
    }
    let mut rx = RxCtx::default();
    for qp in 0..pairs {
        let Some(q) = handle.rxq.get(usize::from(qp)) else {
            continue;
        };
        for _ in 0..PASSES {
            if !dev
                .process_rx(qp, q, &mut backlog, &mut rx, &mut pool, Mode::Notify)
                .waiting
            {
                break;
            }
        }
    }
    taken
}

/// Features the virtqueue input may negotiate, one bit of its first byte each.
const FEATURE_CHOICES: [u32; 8] = [
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
];

/// RX ring at 0x0000 (table), 0x1000 (avail), 0x2000 (used); TX ring at
/// 0x3000, 0x4000, 0x5000; buffers anywhere in the 64 KiB.
const RINGS: [(u64, u64, u64); 2] = [(0x0, 0x1000, 0x2000), (0x3000, 0x4000, 0x5000)];

/// Run TX and RX over guest memory built from `data`.
///
/// Layout: `[features u8][log2 queue size u8][extra frame len u8]` then
/// the extra frame, then the image of guest memory from address 0 (the
/// descriptor tables and rings above, and the buffers they point at).
/// Returns the number of frames the TX path accepted.
pub fn virtqueue(data: &[u8]) -> usize {
    let [feat, qlog, elen, rest @ ..] = data else {
        return 0;
    };
    let (extra, image) = rest.split_at(usize::from(*elen).min(rest.len()));
    let mut acked = bit(VIRTIO_F_VERSION_1);
    for (i, f) in FEATURE_CHOICES.iter().enumerate() {
        if feat & (1 << i) != 0 {
            acked |= bit(*f);
        }
    }
    let qsize = 1u16 << (qlog % 9);
    let Some((dev, handle)) = device(1) else {
        return 0;
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return 0;
    };
    let image = &image[..image.len().min(MEM)];
    if mem.write_slice(image, GuestAddress(0)).is_err() {
        return 0;
    }
    if let Ok(m) = dev.memory().lock() {
        m.replace(mem);
    }
    for (i, (d, a, u)) in RINGS.iter().enumerate() {
        let Some(v) = dev.vring(i) else { return 0 };
        v.set_queue_size(qsize);
        if v.set_queue_info(*d, *a, *u).is_err() {
            return 0;
        }
        v.set_queue_event_idx(acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0);
        v.set_queue_ready(true);
        v.set_enabled(true);
    }
    dev.set_acked_features(acked);
    dev.ring_event(crate::vhost_user::RingEvent::Enabled(0, true));
    run_datapath(&dev, &handle, 1, extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One TX chain: header (12 bytes) + a 60-byte frame in one buffer.
    fn one_frame_image(qlog: u8) -> Vec<u8> {
        let mut d = vec![0u8, qlog, 0];
        let mut img = vec![0u8; 0x8000];
        let (desc, avail) = (0x3000usize, 0x4000usize);
        let buf = 0x6000u64;
        img[desc..desc + 8].copy_from_slice(&buf.to_le_bytes());
        img[desc + 8..desc + 12].copy_from_slice(&72u32.to_le_bytes());
        // flags 0, next 0; avail idx = 1, ring[0] = 0.
        img[avail + 2..avail + 4].copy_from_slice(&1u16.to_le_bytes());
        let f = &mut img[0x6000 + 12..0x6000 + 72];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12] = 0x08;
        d.extend_from_slice(&img);
        d
    }

    #[test]
    fn virtqueue_entry_takes_a_well_formed_frame() {
        assert_eq!(virtqueue(&one_frame_image(4)), 1);
        // The same image with the avail index zeroed offers nothing.
        let mut d = one_frame_image(4);
        d[3 + 0x4002] = 0;
        assert_eq!(virtqueue(&d), 0);
    }

    fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("seed-"))
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        std::fs::read(e.path()).ok().map(|b| (name, b))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// The committed seeds still reach the datapath: each virtqueue seed
    /// offers frames the TX path accepts.
    #[test]
    fn committed_seeds_run() {
        let vq = seeds("virtqueue");
        assert!(!vq.is_empty(), "no virtqueue seeds found");
        for (name, data) in vq {
            assert!(
                virtqueue(&data) >= 1,
                "{name} offers no frame the TX path takes"
            );
        }
        let vu = seeds("vhost_user");
        assert!(!vu.is_empty(), "no vhost_user seeds found");
        for (name, data) in vu {
            // Every record of a seed is one well-formed request.
            let records = {
                let (mut n, mut rest) = (0, &data[..]);
                while let [_, len, tail @ ..] = rest {
                    rest = &tail[usize::from(*len).min(tail.len())..];
                    n += 1;
                }
                n
            };
            assert_eq!(vhost_user_stream(&data), records, "{name}");
        }
    }

    #[test]
    fn entries_survive_garbage() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in [0usize, 1, 3, 17, 300, 5000, 70000] {
            let d: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            virtqueue(&d);
            vhost_user_stream(&d);
        }
    }
}

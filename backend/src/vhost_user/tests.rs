//! Tests of the vhost-user request loop: QEMU's message order through the
//! vhost crate's own `Frontend`, hand-written malformed messages, memory
//! slots, and a seeded random-message stress loop.
//!
//! Scripted tests write every message of a session into one end of a socket
//! pair, shut that end for writing, run the session to its end in the test
//! thread and then read back every reply, so nothing can block forever.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserMemory,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion,
    VhostUserVirtioFeatures, VhostUserVringAddr, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_MQ, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{
    ByteValued, Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryBackend,
    GuestMemoryMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::session::MAX_MEM_SLOTS;
use super::{Backend, Session, SessionEnd, VhostUserError};
use super::{FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION_1, HDR_SIZE};
use crate::net::{DeviceConfig, NetDevice, MAX_QUEUE_SIZE};

const MAC: [u8; 6] = [0x02, 0x5e, 0x00, 0x00, 0x00, 0x2a];
const MTU: u16 = 9001;
const PAGE: u64 = 0x1000;
/// A plausible QEMU userspace address for regions described by hand.
const HVA: u64 = 0x7f12_3400_0000;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn req(r: FrontendReq) -> u32 {
    r.into()
}

fn device(pairs: u16) -> Arc<NetDevice> {
    NetDevice::new(DeviceConfig {
        eni_id: "eni-vhost-user-test".into(),
        port: 7,
        mac: MAC,
        mtu: MTU,
        queue_pairs: pairs,
    })
    .unwrap()
}

/// An anonymous shared-memory file of `len` bytes, as QEMU's memfd backend.
fn memfd(len: u64) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags, no memory
    // of ours is retained.
    let fd = unsafe { libc::memfd_create(c"enilab-vu-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: ftruncate on a descriptor we own, integer arguments only.
    let rc = unsafe { libc::ftruncate(file.as_raw_fd(), len as libc::off_t) };
    assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
    file
}

/// The frontend's view of guest memory: one memfd-backed region per entry
/// `(gpa, len, file offset)`, all in the same memfd.
fn frontend_memory(file: &File, ranges: &[(u64, u64, u64)]) -> GuestMemoryMmap {
    let ranges: Vec<_> = ranges
        .iter()
        .map(|&(gpa, len, off)| {
            (
                GuestAddress(gpa),
                len as usize,
                Some(FileOffset::new(file.try_clone().unwrap(), off)),
            )
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&ranges).unwrap()
}

fn region_info(mem: &GuestMemoryMmap, gpa: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo::from_guest_region(mem.find_region(GuestAddress(gpa)).unwrap())
        .unwrap()
}

fn spawn_session(dev: Arc<NetDevice>, sock: UnixStream) -> JoinHandle<SessionEnd> {
    sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    thread::spawn(move || Session::new(sock, &*dev).run())
}

/// A connected `Frontend`, a raw clone of its socket, and the session
/// thread serving it.
fn connect(dev: &Arc<NetDevice>) -> (Frontend, UnixStream, JoinHandle<SessionEnd>) {
    let (fe_sock, be_sock) = UnixStream::pair().unwrap();
    fe_sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let raw = fe_sock.try_clone().unwrap();
    let server = spawn_session(dev.clone(), be_sock);
    let fe = Frontend::from_stream(fe_sock, dev.num_queues() as u64);
    (fe, raw, server)
}

fn join(server: JoinHandle<SessionEnd>) -> SessionEnd {
    server.join().expect("session thread panicked")
}

// ---------------------------------------------------------------------------
// Raw messages.

/// One message exactly as a frontend writes it.
#[derive(Clone)]
struct Raw {
    request: u32,
    flags: u32,
    body: Vec<u8>,
    /// Size announced in the header when it differs from the body's.
    size: Option<u32>,
    fds: Vec<RawFd>,
}

impl Raw {
    fn code(request: u32, body: &[u8]) -> Raw {
        Raw {
            request,
            flags: FLAG_VERSION_1,
            body: body.to_vec(),
            size: None,
            fds: Vec::new(),
        }
    }

    fn new(request: FrontendReq, body: &[u8]) -> Raw {
        Raw::code(req(request), body)
    }

    fn need_reply(mut self) -> Raw {
        self.flags |= FLAG_NEED_REPLY;
        self
    }

    fn flags(mut self, flags: u32) -> Raw {
        self.flags = flags;
        self
    }

    fn size(mut self, size: u32) -> Raw {
        self.size = Some(size);
        self
    }

    fn fds(mut self, fds: &[RawFd]) -> Raw {
        self.fds = fds.to_vec();
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let size = self.size.unwrap_or(self.body.len() as u32);
        let mut out = Vec::with_capacity(HDR_SIZE + self.body.len());
        out.extend_from_slice(&self.request.to_ne_bytes());
        out.extend_from_slice(&self.flags.to_ne_bytes());
        out.extend_from_slice(&size.to_ne_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

fn send(sock: &UnixStream, m: &Raw) {
    let bytes = m.bytes();
    if m.fds.is_empty() {
        let mut s = sock;
        s.write_all(&bytes).unwrap();
    } else {
        let n = sock.send_with_fds(&[&bytes[..]], &m.fds).unwrap();
        assert_eq!(n, bytes.len(), "short sendmsg");
    }
}

#[derive(Debug)]
struct Reply {
    request: u32,
    flags: u32,
    body: Vec<u8>,
}

impl Reply {
    fn u64(&self) -> u64 {
        assert_eq!(self.body.len(), 8, "reply to {} is not a u64", self.request);
        u64::from_ne_bytes(self.body[..8].try_into().unwrap())
    }
}

/// Read one reply; `None` on a clean end of stream.
fn read_reply(sock: &mut UnixStream) -> Option<Reply> {
    let mut hdr = [0u8; HDR_SIZE];
    let mut got = 0;
    while got < HDR_SIZE {
        match sock.read(&mut hdr[got..]) {
            Ok(0) if got == 0 => return None,
            // The backend hung up with requests still unread in its
            // receive queue: Linux reports that as a reset, after every
            // byte already sent to us.
            Err(e) if got == 0 && e.kind() == ErrorKind::ConnectionReset => return None,
            Ok(0) => panic!("reply header cut after {got} bytes"),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading reply: {e}"),
        }
    }
    let request = u32::from_ne_bytes(hdr[0..4].try_into().unwrap());
    let flags = u32::from_ne_bytes(hdr[4..8].try_into().unwrap());
    let size = u32::from_ne_bytes(hdr[8..12].try_into().unwrap()) as usize;
    assert!(size <= 4096, "reply announces {size} bytes");
    let mut body = vec![0u8; size];
    sock.read_exact(&mut body).expect("reply body");
    Some(Reply {
        request,
        flags,
        body,
    })
}

fn read_all_replies(sock: &mut UnixStream) -> Vec<Reply> {
    std::iter::from_fn(|| read_reply(sock)).collect()
}

struct Outcome {
    end: SessionEnd,
    replies: Vec<Reply>,
    soft_errors: u64,
}

/// Run one whole session over `msgs`, then collect its replies.
fn run_script(dev: &NetDevice, msgs: &[Raw]) -> Outcome {
    let (mut fe, be) = UnixStream::pair().unwrap();
    fe.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    be.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    be.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    for m in msgs {
        send(&fe, m);
    }
    fe.shutdown(Shutdown::Write).unwrap();
    let mut session = Session::new(be, dev);
    let end = session.run();
    let soft_errors = session.soft_errors;
    drop(session);
    let replies = read_all_replies(&mut fe);
    Outcome {
        end,
        replies,
        soft_errors,
    }
}

macro_rules! assert_error {
    ($end:expr, $pat:pat $(if $guard:expr)?) => {
        match &$end {
            SessionEnd::Error($pat) $(if $guard)? => {}
            other => panic!("expected SessionEnd::Error({}), got {other:?}", stringify!($pat)),
        }
    };
}

fn assert_disconnected(end: &SessionEnd) {
    assert!(
        matches!(end, SessionEnd::Disconnected),
        "expected a clean disconnect, got {end:?}"
    );
}

fn u64_body(v: u64) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

fn state(index: u32, num: u32) -> Vec<u8> {
    VhostUserVringState::new(index, num).as_slice().to_vec()
}

fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    VhostUserVringAddr::new(
        index,
        VhostUserVringAddrFlags::empty(),
        desc,
        used,
        avail,
        0,
    )
    .as_slice()
    .to_vec()
}

fn mem_table(regions: &[VhostUserMemoryRegion]) -> Vec<u8> {
    let mut out = VhostUserMemory::new(regions.len() as u32)
        .as_slice()
        .to_vec();
    for r in regions {
        out.extend_from_slice(r.as_slice());
    }
    out
}

fn single_region(gpa: u64, size: u64, hva: u64, off: u64) -> Vec<u8> {
    VhostUserSingleMemoryRegion::new(gpa, size, hva, off)
        .as_slice()
        .to_vec()
}

fn config_req(offset: u32, size: u32) -> Vec<u8> {
    let mut out = VhostUserConfig::new(offset, size, VhostUserConfigFlags::empty())
        .as_slice()
        .to_vec();
    out.resize(out.len() + size as usize, 0);
    out
}

fn with_reply_ack() -> Raw {
    Raw::new(
        FrontendReq::SET_PROTOCOL_FEATURES,
        &u64_body(VhostUserProtocolFeatures::REPLY_ACK.bits()),
    )
}

fn regions_mapped(dev: &NetDevice) -> usize {
    dev.memory().memory().num_regions()
}

// ---------------------------------------------------------------------------
// 1. QEMU's order.

const RING_SIZE: u16 = 256;

/// Ring `q`'s three parts at these offsets from a region's start.
fn ring_offsets(q: usize) -> (u64, u64, u64) {
    let base = q as u64 * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

/// Program ring `q` like QEMU's vhost_virtqueue_start: size, base,
/// addresses (frontend userspace addresses), kick, call, enable.
fn start_ring(fe: &mut Frontend, q: usize, hva: u64, base: u16, kick: &EventFd, call: &EventFd) {
    let (desc, avail, used) = ring_offsets(q);
    fe.set_vring_num(q, RING_SIZE).unwrap();
    fe.set_vring_base(q, base).unwrap();
    fe.set_vring_addr(
        q,
        &VringConfigData {
            queue_max_size: MAX_QUEUE_SIZE,
            queue_size: RING_SIZE,
            flags: 0,
            desc_table_addr: hva + desc,
            used_ring_addr: hva + used,
            avail_ring_addr: hva + avail,
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_kick(q, kick).unwrap();
    fe.set_vring_call(q, call).unwrap();
    fe.set_vring_enable(q, true).unwrap();
}

/// Ring `q` is enabled, ready, valid in the device's memory and points at
/// the guest-physical addresses the frontend's userspace addresses map to.
fn assert_ring_running(dev: &NetDevice, q: usize, gpa: u64, base: u16) {
    let (desc, avail, used) = ring_offsets(q);
    let mem = dev.memory().memory();
    let st = dev.vrings()[q].get_ref();
    assert!(st.is_enabled(), "ring {q} not enabled");
    let queue = st.get_queue();
    assert!(queue.ready(), "ring {q} not ready");
    assert_eq!(queue.size(), RING_SIZE);
    assert_eq!(queue.desc_table(), gpa + desc, "ring {q} descriptor table");
    assert_eq!(queue.avail_ring(), gpa + avail, "ring {q} avail ring");
    assert_eq!(queue.used_ring(), gpa + used, "ring {q} used ring");
    assert_eq!(queue.next_avail(), base);
    assert_eq!(queue.next_used(), base);
    assert!(
        queue.is_valid(&*mem),
        "ring {q} not valid in the mapped memory"
    );
    assert!(st.get_kick().is_some(), "ring {q} has no kick fd");
    assert!(st.get_call().is_some(), "ring {q} has no call fd");
}

fn write_raw_enable(raw: &mut UnixStream, index: u32) {
    send(
        raw,
        &Raw::new(FrontendReq::SET_VRING_ENABLE, &state(index, 1)).need_reply(),
    );
    let reply = read_reply(raw).expect("no REPLY_ACK for SET_VRING_ENABLE");
    assert_eq!(reply.request, req(FrontendReq::SET_VRING_ENABLE));
    assert_eq!(reply.flags, FLAG_VERSION_1 | FLAG_REPLY);
    assert_eq!(
        reply.u64(),
        0,
        "SET_VRING_ENABLE before SET_FEATURES refused"
    );
}

#[test]
fn qemu_order_enable_before_features_then_reconnect() {
    let dev = device(2);
    let (mut fe, mut raw, server) = connect(&dev);

    // Exactly the order QEMU 10 sends for a virtio-net-pci with vhost-user.
    let offered = fe.get_features().unwrap();
    assert_eq!(offered, dev.features());
    assert_ne!(
        offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    let proto = fe.get_protocol_features().unwrap();
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert_eq!(proto, want);
    fe.set_protocol_features(want).unwrap();
    // From here every message asks for an ack (QEMU asks on some): a
    // missing ack, or an extra one after a request with its own reply,
    // desynchronises the Frontend and fails the next call.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_queue_num().unwrap(), 2, "queue pairs");
    assert_eq!(fe.get_max_mem_slots().unwrap(), MAX_MEM_SLOTS);
    fe.set_owner().unwrap();
    assert_eq!(fe.get_features().unwrap(), offered);
    let early_call = EventFd::new(EFD_NONBLOCK).unwrap();
    let err = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_call(0, &early_call).unwrap();
    fe.set_vring_err(0, &err).unwrap();
    assert_eq!(fe.get_features().unwrap(), offered);

    // SET_VRING_ENABLE before SET_FEATURES: the Frontend refuses to send it,
    // so it goes raw on the same stream.
    assert_eq!(dev.acked_features(), 0);
    write_raw_enable(&mut raw, 0);
    write_raw_enable(&mut raw, 1);
    assert!(dev.vrings()[0].get_ref().is_enabled());
    assert!(dev.vrings()[1].get_ref().is_enabled());
    assert!(
        !server.is_finished(),
        "session ended after early SET_VRING_ENABLE"
    );

    let masked = (1u64 << VIRTIO_RING_F_EVENT_IDX)
        | (1u64 << VIRTIO_NET_F_HOST_ECN)
        | (1u64 << VIRTIO_NET_F_GUEST_ECN);
    let features = offered & !masked;
    assert_ne!(features & (1u64 << VIRTIO_NET_F_MQ), 0);
    fe.set_features(features).unwrap();
    assert_eq!(dev.acked_features(), features);
    // PROTOCOL_FEATURES acked: SET_FEATURES must not touch the enable state.
    assert!(dev.vrings()[0].get_ref().is_enabled());

    let gpa = 0x4000_0000;
    let len = 0x10_0000;
    let file = memfd(len);
    let fmem = frontend_memory(&file, &[(gpa, len, 0)]);
    let info = region_info(&fmem, gpa);
    assert_ne!(info.userspace_addr, gpa);
    fe.set_mem_table(&[info]).unwrap();
    assert_eq!(regions_mapped(&dev), 1);
    // Both sides map the same pages.
    fmem.write_obj(0xdead_beef_u32, GuestAddress(gpa + 0x8000))
        .unwrap();
    let seen: u32 = dev
        .memory()
        .memory()
        .read_obj(GuestAddress(gpa + 0x8000))
        .unwrap();
    assert_eq!(seen, 0xdead_beef);

    let kicks = [
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ];
    let calls = [
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ];
    for q in 0..2 {
        start_ring(
            &mut fe,
            q,
            info.userspace_addr,
            40 + q as u16,
            &kicks[q],
            &calls[q],
        );
    }
    assert!(!server.is_finished(), "session ended during ring setup");
    assert_eq!(dev.acked_features(), features);
    for q in 0..2 {
        assert_ring_running(&dev, q, gpa, 40 + q as u16);
        assert!(!dev.vrings()[q].get_ref().get_queue().event_idx_enabled());
    }
    // The passed descriptors are the frontend's eventfds.
    dev.vrings()[0].signal_used_queue().unwrap();
    assert_eq!(calls[0].read().unwrap(), 1);
    assert!(
        early_call.read().is_err(),
        "the replaced call fd was signalled"
    );
    kicks[1].write(1).unwrap();
    assert!(dev.vrings()[1].read_kick().unwrap());
    assert!(
        kicks[1].read().is_err(),
        "kick was not consumed by the device"
    );
    // Rings 2 and 3 (second pair) were never started.
    assert!(!dev.vrings()[2].get_ref().get_queue().ready());

    // Config space: MAC, status, max pairs, MTU.
    let (cfg, data) = fe
        .get_config(0, 12, VhostUserConfigFlags::empty(), &[0u8; 12])
        .unwrap();
    let (off, size) = (cfg.offset, cfg.size);
    assert_eq!((off, size), (0, 12));
    assert_eq!(&data[0..6], &MAC);
    assert_eq!(
        u16::from_le_bytes([data[6], data[7]]),
        VIRTIO_NET_S_LINK_UP as u16
    );
    assert_eq!(u16::from_le_bytes([data[8], data[9]]), 2);
    assert_eq!(u16::from_le_bytes([data[10], data[11]]), MTU);

    // GET_VRING_BASE returns what was set (nothing consumed) and stops
    // the ring.
    assert_eq!(fe.get_vring_base(0).unwrap(), 40);
    assert_eq!(fe.get_vring_base(1).unwrap(), 41);
    let st = dev.vrings()[0].get_ref();
    assert!(
        !st.get_queue().ready(),
        "GET_VRING_BASE left the ring ready"
    );
    assert!(st.get_kick().is_none(), "GET_VRING_BASE left the kick fd");
    drop(st);

    assert!(!server.is_finished(), "session ended early");
    drop(fe);
    drop(raw);
    assert_disconnected(&join(server));

    // The server resets the device between frontends.
    dev.reset();
    assert_eq!(dev.acked_features(), 0);
    assert_eq!(regions_mapped(&dev), 0);
    for v in dev.vrings() {
        let st = v.get_ref();
        assert!(!st.is_enabled() && !st.get_queue().ready());
    }

    // A second frontend on the same device, new memory at another address.
    let (mut fe, raw, server) = connect(&dev);
    let offered = fe.get_features().unwrap();
    fe.get_protocol_features().unwrap();
    fe.set_protocol_features(want).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_owner().unwrap();
    let features = offered & !(1u64 << VIRTIO_NET_F_HOST_ECN);
    fe.set_features(features).unwrap();
    assert_eq!(dev.acked_features(), features);
    let gpa2 = 0x1_0000_0000;
    let file2 = memfd(len);
    let fmem2 = frontend_memory(&file2, &[(gpa2, len, 0)]);
    let info2 = region_info(&fmem2, gpa2);
    fe.set_mem_table(&[info2]).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    start_ring(&mut fe, 0, info2.userspace_addr, 7, &kick, &call);
    assert_ring_running(&dev, 0, gpa2, 7);
    assert!(dev.vrings()[0].get_ref().get_queue().event_idx_enabled());
    assert_eq!(fe.get_vring_base(0).unwrap(), 7);
    drop(fe);
    drop(raw);
    assert_disconnected(&join(server));
}

#[test]
fn without_protocol_features_rings_run_at_kick() {
    // A frontend that does not ack PROTOCOL_FEATURES has no SET_VRING_ENABLE:
    // rings start enabled once SET_FEATURES and the kick arrived.
    let dev = device(1);
    let file = memfd(0x10000);
    let gpa = 0x8000_0000;
    let fmem = frontend_memory(&file, &[(gpa, 0x10000, 0)]);
    let info = region_info(&fmem, gpa);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let features = dev.features() & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    let hva = info.userspace_addr;
    let region = VhostUserMemoryRegion::new(gpa, 0x10000, hva, 0);
    let out = run_script(
        &dev,
        &[
            Raw::new(FrontendReq::SET_OWNER, &[]),
            Raw::new(FrontendReq::SET_FEATURES, &u64_body(features)),
            Raw::new(FrontendReq::SET_MEM_TABLE, &mem_table(&[region])).fds(&[file.as_raw_fd()]),
            Raw::new(FrontendReq::SET_VRING_NUM, &state(0, 64)),
            Raw::new(
                FrontendReq::SET_VRING_ADDR,
                &vring_addr(0, hva, hva + 0x2000, hva + 0x1000),
            ),
            Raw::new(FrontendReq::SET_VRING_KICK, &u64_body(0)).fds(&[kick.as_raw_fd()]),
        ],
    );
    assert_disconnected(&out.end);
    assert!(
        out.replies.is_empty(),
        "unsolicited replies: {:?}",
        out.replies
    );
    assert_eq!(dev.acked_features(), features);
    let st = dev.vrings()[0].get_ref();
    assert!(st.is_enabled() && st.get_queue().ready());
    assert_eq!(st.get_queue().desc_table(), gpa);
    assert!(!dev.vrings()[1].get_ref().get_queue().ready());
}

#[test]
fn reset_owner_stops_every_ring() {
    let dev = device(1);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let enable = Raw::new(FrontendReq::SET_VRING_ENABLE, &state(1, 1));
    let start = Raw::new(FrontendReq::SET_VRING_KICK, &u64_body(1)).fds(&[kick.as_raw_fd()]);
    let out = run_script(&dev, &[enable.clone(), start.clone()]);
    assert_disconnected(&out.end);
    assert!(dev.vrings()[1].get_ref().is_enabled());
    assert!(dev.vrings()[1].get_ref().get_queue().ready());
    let out = run_script(
        &dev,
        &[enable, start, Raw::new(FrontendReq::RESET_OWNER, &[])],
    );
    assert_disconnected(&out.end);
    let st = dev.vrings()[1].get_ref();
    assert!(!st.is_enabled() && !st.get_queue().ready() && st.get_kick().is_none());
}

// ---------------------------------------------------------------------------
// 2. Malformed messages.

#[test]
fn bad_header_flags_are_refused() {
    let dev = device(1);
    for flags in [0, 0x2, 0x3, 0x2 | FLAG_NEED_REPLY] {
        let out = run_script(
            &dev,
            &[Raw::new(FrontendReq::GET_FEATURES, &[]).flags(flags)],
        );
        assert_error!(out.end, VhostUserError::BadVersion(f) if *f == flags);
        assert!(out.replies.is_empty());
    }
    for flags in [FLAG_VERSION_1 | 0x10, FLAG_VERSION_1 | 0x8000_0000] {
        let out = run_script(
            &dev,
            &[Raw::new(FrontendReq::GET_FEATURES, &[]).flags(flags)],
        );
        assert_error!(out.end, VhostUserError::BadFlags(f) if *f == flags);
        assert!(out.replies.is_empty());
    }
}

#[test]
fn oversize_and_truncated_messages_end_the_session() {
    let dev = device(1);
    let out = run_script(
        &dev,
        &[Raw::new(FrontendReq::SET_MEM_TABLE, &[]).size(4097)],
    );
    assert_error!(
        out.end,
        VhostUserError::Oversize {
            request: 5,
            size: 4097
        }
    );
    let out = run_script(&dev, &[Raw::code(77, &[]).size(u32::MAX)]);
    assert_error!(out.end, VhostUserError::Oversize { request: 77, .. });

    // Exactly 4096 is allowed.
    let out = run_script(&dev, &[Raw::code(99, &[0u8; 4096]).need_reply()]);
    assert_disconnected(&out.end);
    assert_eq!(out.replies.len(), 1);

    // Body cut short, then EOF.
    let out = run_script(
        &dev,
        &[Raw::new(FrontendReq::SET_FEATURES, &[1, 2, 3]).size(8)],
    );
    assert_error!(out.end, VhostUserError::Truncated(_));
    // Header cut short, then EOF.
    let (fe, be) = UnixStream::pair().unwrap();
    (&fe)
        .write_all(&Raw::new(FrontendReq::GET_FEATURES, &[]).bytes()[..5])
        .unwrap();
    fe.shutdown(Shutdown::Write).unwrap();
    let end = Session::new(be, &*dev).run();
    assert_error!(end, VhostUserError::Truncated(_));
    // Messages before the cut one were served.
    let out = run_script(
        &dev,
        &[
            Raw::new(FrontendReq::GET_FEATURES, &[]),
            Raw::new(FrontendReq::SET_VRING_NUM, &state(0, 64)[..5]).size(8),
        ],
    );
    assert_error!(out.end, VhostUserError::Truncated(_));
    assert_eq!(out.replies.len(), 1);
    assert_eq!(out.replies[0].u64(), dev.features());
}

#[test]
fn wrong_payload_sizes_are_refused() {
    let dev = device(1);
    let cases: &[(FrontendReq, usize, usize)] = &[
        (FrontendReq::SET_FEATURES, 4, 8),
        (FrontendReq::SET_FEATURES, 16, 8),
        (FrontendReq::SET_PROTOCOL_FEATURES, 0, 8),
        (FrontendReq::SET_VRING_NUM, 4, 8),
        (FrontendReq::SET_VRING_BASE, 9, 8),
        (FrontendReq::GET_VRING_BASE, 0, 8),
        (FrontendReq::SET_VRING_ENABLE, 12, 8),
        (FrontendReq::SET_VRING_ADDR, 32, 40),
        (FrontendReq::SET_VRING_KICK, 7, 8),
        (FrontendReq::SET_VRING_CALL, 0, 8),
        (FrontendReq::ADD_MEM_REG, 32, 40),
        (FrontendReq::REM_MEM_REG, 48, 40),
        (FrontendReq::SET_MEM_TABLE, 4, 8),
        (FrontendReq::GET_CONFIG, 8, 12),
        (FrontendReq::SET_CONFIG, 0, 12),
    ];
    for &(r, got, expected) in cases {
        let out = run_script(&dev, &[Raw::new(r, &vec![0u8; got])]);
        let code = req(r);
        assert_error!(
            out.end,
            VhostUserError::PayloadSize { request, expected: e, got: g }
                if *request == code && *e == expected && *g == got
        );
        assert!(out.replies.is_empty(), "{r:?}: {:?}", out.replies);
    }
    assert_eq!(dev.acked_features(), 0);
}

#[test]
fn vring_index_out_of_range_is_refused() {
    let dev = device(1); // vrings 0 and 1
    let ev = EventFd::new(EFD_NONBLOCK).unwrap();
    let cases = [
        (Raw::new(FrontendReq::SET_VRING_NUM, &state(2, 64)), 2),
        (
            Raw::new(FrontendReq::SET_VRING_BASE, &state(u32::MAX, 0)),
            u32::MAX,
        ),
        (
            Raw::new(FrontendReq::SET_VRING_ADDR, &vring_addr(2, HVA, HVA, HVA)),
            2,
        ),
        (Raw::new(FrontendReq::SET_VRING_ENABLE, &state(2, 1)), 2),
        (Raw::new(FrontendReq::GET_VRING_BASE, &state(2, 0)), 2),
        (
            Raw::new(FrontendReq::SET_VRING_KICK, &u64_body(2)).fds(&[ev.as_raw_fd()]),
            2,
        ),
        (
            Raw::new(FrontendReq::SET_VRING_CALL, &u64_body(0xff)).fds(&[ev.as_raw_fd()]),
            0xff,
        ),
        (
            Raw::new(FrontendReq::SET_VRING_ERR, &u64_body(2 | 0x100)),
            2,
        ),
    ];
    for (m, want) in cases {
        let out = run_script(&dev, std::slice::from_ref(&m));
        assert_error!(out.end, VhostUserError::BadVringIndex(i) if *i == want);
        assert!(
            out.replies.is_empty(),
            "request {}: {:?}",
            m.request,
            out.replies
        );
    }
    // Extra bits beside the index and the no-fd flag.
    let out = run_script(
        &dev,
        &[Raw::new(FrontendReq::SET_VRING_CALL, &u64_body(0x200))],
    );
    assert_error!(out.end, VhostUserError::InvalidPayload(13));
}

#[test]
fn bad_ring_values_are_refused() {
    let dev = device(1);
    for num in [0u32, 3, 100, 2048, u32::MAX, 1 << 31] {
        let out = run_script(
            &dev,
            &[Raw::new(FrontendReq::SET_VRING_NUM, &state(1, num))],
        );
        assert_error!(out.end, VhostUserError::BadQueueSize(1, n) if *n == num);
    }
    // The largest size is fine.
    let max = u32::from(MAX_QUEUE_SIZE);
    let out = run_script(
        &dev,
        &[Raw::new(FrontendReq::SET_VRING_NUM, &state(1, max))],
    );
    assert_disconnected(&out.end);
    assert_eq!(dev.vrings()[1].get_ref().get_queue().size(), MAX_QUEUE_SIZE);

    let out = run_script(
        &dev,
        &[Raw::new(FrontendReq::SET_VRING_BASE, &state(0, 0x1_0000))],
    );
    assert_error!(out.end, VhostUserError::InvalidPayload(10));
    let out = run_script(
        &dev,
        &[Raw::new(FrontendReq::SET_VRING_ENABLE, &state(0, 2))],
    );
    assert_error!(out.end, VhostUserError::InvalidPayload(18));
    assert!(!dev.vrings()[0].get_ref().is_enabled());
    // Misaligned ring addresses fail the vhost crate's validator.
    let out = run_script(
        &dev,
        &[Raw::new(
            FrontendReq::SET_VRING_ADDR,
            &vring_addr(0, HVA + 8, HVA, HVA),
        )],
    );
    assert_error!(out.end, VhostUserError::InvalidPayload(9));
}

#[test]
fn errors_are_acked_non_zero_only_when_asked() {
    let dev = device(1);
    // REPLY_ACK negotiated and NEED_REPLY: a non-zero ack, then the end.
    let out = run_script(
        &dev,
        &[
            with_reply_ack(),
            Raw::new(FrontendReq::SET_VRING_NUM, &state(0, 64)).need_reply(),
            Raw::new(FrontendReq::SET_VRING_NUM, &state(0, 100)).need_reply(),
            Raw::new(FrontendReq::GET_FEATURES, &[]),
        ],
    );
    assert_error!(out.end, VhostUserError::BadQueueSize(0, 100));
    assert_eq!(out.replies.len(), 2, "{:?}", out.replies);
    assert_eq!(out.replies[0].request, 8);
    assert_eq!(out.replies[0].u64(), 0);
    assert_eq!(out.replies[1].request, 8);
    assert_eq!(out.replies[1].flags, FLAG_VERSION_1 | FLAG_REPLY);
    assert_ne!(out.replies[1].u64(), 0);

    // Without REPLY_ACK negotiated no ack is sent, neither 0 nor 1.
    let out = run_script(
        &dev,
        &[
            Raw::new(FrontendReq::SET_VRING_NUM, &state(0, 64)).need_reply(),
            Raw::new(FrontendReq::SET_VRING_NUM, &state(0, 100)).need_reply(),
        ],
    );
    assert_error!(out.end, VhostUserError::BadQueueSize(0, 100));
    assert!(out.replies.is_empty(), "{:?}", out.replies);

    // A failing request that has its own reply gets no u64 ack: for
    // GET_VRING_BASE it would read as a valid VringState with base 0.
    let out = run_script(
        &dev,
        &[
            with_reply_ack(),
            Raw::new(FrontendReq::GET_VRING_BASE, &state(5, 0)).need_reply(),
        ],
    );
    assert_error!(out.end, VhostUserError::BadVringIndex(5));
    assert!(out.replies.is_empty(), "{:?}", out.replies);
    let out = run_script(
        &dev,
        &[
            with_reply_ack(),
            Raw::new(FrontendReq::GET_CONFIG, &config_req(0, 0)).need_reply(),
        ],
    );
    assert_error!(out.end, VhostUserError::InvalidPayload(24));
    assert!(out.replies.is_empty(), "{:?}", out.replies);
}

#[test]
fn unknown_requests_are_answered_and_skipped() {
    let dev = device(1);
    let out = run_script(
        &dev,
        &[
            Raw::code(99, &[0xab; 100]).need_reply(),
            Raw::code(0, &[]),
            // Known to the protocol, not implemented: SEND_RARP, INFLIGHT.
            Raw::new(FrontendReq::SEND_RARP, &[0u8; 8]).need_reply(),
            Raw::new(FrontendReq::SET_LOG_BASE, &[0u8; 8]),
            Raw::new(FrontendReq::GET_FEATURES, &[]),
        ],
    );
    assert_disconnected(&out.end);
    assert_eq!(out.soft_errors, 4);
    assert_eq!(out.replies.len(), 3, "{:?}", out.replies);
    assert_eq!(out.replies[0].request, 99);
    assert_eq!(out.replies[0].flags, FLAG_VERSION_1 | FLAG_REPLY);
    assert_ne!(out.replies[0].u64(), 0);
    assert_eq!(out.replies[1].request, 19);
    assert_ne!(out.replies[1].u64(), 0);
    // The unknown request's body was skipped: the stream is still in step.
    assert_eq!(out.replies[2].request, 1);
    assert_eq!(out.replies[2].u64(), dev.features());
}

#[test]
fn unoffered_features_are_refused() {
    let dev = device(1);
    // MQ is offered only with several queue pairs.
    let mq = 1u64 << VIRTIO_NET_F_MQ;
    assert_eq!(dev.features() & mq, 0);
    for extra in [mq, 1u64 << 63, 1 << 26 /* VHOST_F_LOG_ALL */] {
        let out = run_script(
            &dev,
            &[Raw::new(
                FrontendReq::SET_FEATURES,
                &u64_body(dev.features() | extra),
            )],
        );
        assert_error!(out.end, VhostUserError::UnofferedFeatures(bits) if *bits == extra);
        assert_eq!(dev.acked_features(), 0, "refused features were applied");
    }
    // The offered set itself is accepted.
    let out = run_script(
        &dev,
        &[Raw::new(
            FrontendReq::SET_FEATURES,
            &u64_body(dev.features()),
        )],
    );
    assert_disconnected(&out.end);
    assert_eq!(dev.acked_features(), dev.features());
}

#[test]
fn vring_fd_rules() {
    let dev = device(1);
    let a = EventFd::new(EFD_NONBLOCK).unwrap();
    let b = EventFd::new(EFD_NONBLOCK).unwrap();
    // No fd and no "no fd" flag.
    let out = run_script(&dev, &[Raw::new(FrontendReq::SET_VRING_KICK, &u64_body(0))]);
    assert_error!(out.end, VhostUserError::MissingFd(12));
    assert!(!dev.vrings()[0].get_ref().get_queue().ready());
    // Two fds.
    let out =
        run_script(
            &dev,
            &[Raw::new(FrontendReq::SET_VRING_KICK, &u64_body(0))
                .fds(&[a.as_raw_fd(), b.as_raw_fd()])],
        );
    assert_error!(out.end, VhostUserError::MissingFd(12));
    // "No fd" flag and an fd all the same.
    let out = run_script(
        &dev,
        &[Raw::new(FrontendReq::SET_VRING_CALL, &u64_body(0x100)).fds(&[a.as_raw_fd()])],
    );
    assert_error!(out.end, VhostUserError::MissingFd(13));
    // "No fd" flag without an fd: a polled ring, accepted.
    let out = run_script(
        &dev,
        &[Raw::new(FrontendReq::SET_VRING_KICK, &u64_body(0x101))],
    );
    assert_disconnected(&out.end);
    let st = dev.vrings()[1].get_ref();
    assert!(st.get_queue().ready() && st.get_kick().is_none());
}

#[test]
fn ring_addresses_must_be_inside_the_memory_table() {
    let dev = device(1);
    let file = memfd(0x10000);
    let gpa = 0x10_0000;
    let region = VhostUserMemoryRegion::new(gpa, 0x10000, HVA, 0);
    let table =
        Raw::new(FrontendReq::SET_MEM_TABLE, &mem_table(&[region])).fds(&[file.as_raw_fd()]);

    // No memory table at all.
    let out = run_script(
        &dev,
        &[Raw::new(
            FrontendReq::SET_VRING_ADDR,
            &vring_addr(0, HVA, HVA, HVA),
        )],
    );
    assert_error!(out.end, VhostUserError::BadRingAddress(0, a) if *a == HVA);

    // Guest physical addresses are not frontend addresses.
    let out = run_script(
        &dev,
        &[
            table.clone(),
            Raw::new(FrontendReq::SET_VRING_ADDR, &vring_addr(1, gpa, gpa, gpa)),
        ],
    );
    assert_error!(out.end, VhostUserError::BadRingAddress(1, a) if *a == gpa);
    // One byte past the region, for each of the three parts.
    let end = HVA + 0x10000;
    for (d, u, av, bad) in [
        (end, HVA, HVA, end),
        (HVA, end, HVA, end),
        (HVA, HVA, end, end),
    ] {
        let out = run_script(
            &dev,
            &[
                table.clone(),
                Raw::new(FrontendReq::SET_VRING_ADDR, &vring_addr(0, d, u, av)),
            ],
        );
        assert_error!(out.end, VhostUserError::BadRingAddress(0, a) if *a == bad);
    }
    // Below the region.
    let out = run_script(
        &dev,
        &[
            table.clone(),
            Raw::new(
                FrontendReq::SET_VRING_ADDR,
                &vring_addr(0, HVA - 0x1000, HVA, HVA),
            ),
        ],
    );
    assert_error!(out.end, VhostUserError::BadRingAddress(0, _));
    // Inside: translated.
    let out = run_script(
        &dev,
        &[
            table,
            Raw::new(
                FrontendReq::SET_VRING_ADDR,
                &vring_addr(0, HVA + 0xfff0, HVA + 0x2000, HVA + 0x1000),
            ),
        ],
    );
    assert_disconnected(&out.end);
    let st = dev.vrings()[0].get_ref();
    assert_eq!(st.get_queue().desc_table(), gpa + 0xfff0);
    assert_eq!(st.get_queue().used_ring(), gpa + 0x2000);
    assert_eq!(st.get_queue().avail_ring(), gpa + 0x1000);
}

#[test]
fn memory_table_must_match_its_descriptors() {
    let dev = device(1);
    let f1 = memfd(0x10000);
    let f2 = memfd(0x10000);
    let r1 = VhostUserMemoryRegion::new(0, 0x10000, HVA, 0);
    let r2 = VhostUserMemoryRegion::new(0x10_0000, 0x10000, HVA + 0x10_0000, 0);
    let table = |regions: &[VhostUserMemoryRegion], fds: &[RawFd]| {
        Raw::new(FrontendReq::SET_MEM_TABLE, &mem_table(regions)).fds(fds)
    };
    // fd count != region count.
    for m in [
        table(&[r1, r2], &[f1.as_raw_fd()]),
        table(&[r1], &[f1.as_raw_fd(), f2.as_raw_fd()]),
        table(&[r1], &[]),
    ] {
        let out = run_script(&dev, &[m]);
        assert_error!(out.end, VhostUserError::InvalidPayload(5));
        assert_eq!(regions_mapped(&dev), 0);
    }
    // Zero regions; header counting more regions than the body holds.
    let out = run_script(&dev, &[table(&[], &[])]);
    assert_error!(out.end, VhostUserError::InvalidPayload(5));
    let mut body = mem_table(&[r1]);
    body[0] = 2;
    let out = run_script(
        &dev,
        &[Raw::new(FrontendReq::SET_MEM_TABLE, &body).fds(&[f1.as_raw_fd(), f2.as_raw_fd()])],
    );
    assert_error!(out.end, VhostUserError::InvalidPayload(5));
    // A zero-sized region, a region whose end wraps.
    for r in [
        VhostUserMemoryRegion::new(0, 0, HVA, 0),
        VhostUserMemoryRegion::new(u64::MAX - 0xfff, 0x2000, HVA, 0),
    ] {
        let out = run_script(&dev, &[table(&[r], &[f1.as_raw_fd()])]);
        assert_error!(out.end, VhostUserError::InvalidPayload(5));
    }
    // Overlapping guest ranges.
    let overlap = VhostUserMemoryRegion::new(0x8000, 0x10000, HVA + 0x10_0000, 0);
    let out = run_script(
        &dev,
        &[table(&[r1, overlap], &[f1.as_raw_fd(), f2.as_raw_fd()])],
    );
    assert_error!(out.end, VhostUserError::Memory(_));
    assert_eq!(regions_mapped(&dev), 0);
    // A descriptor that is not a mappable file.
    let ev = EventFd::new(0).unwrap();
    let out = run_script(&dev, &[table(&[r1], &[ev.as_raw_fd()])]);
    assert_error!(out.end, VhostUserError::Memory(_));
    // Two good regions, sent in descending guest address order.
    let out = run_script(&dev, &[table(&[r2, r1], &[f2.as_raw_fd(), f1.as_raw_fd()])]);
    assert_disconnected(&out.end);
    assert_eq!(regions_mapped(&dev), 2);
}

#[test]
fn region_larger_than_its_file_is_not_mapped() {
    let dev = device(1);
    let file = memfd(0x10000);
    let fd = file.as_raw_fd();
    for (size, off) in [
        (0x20000, 0),
        (0x10000, PAGE),
        (0x1000, 0x10000),
        (0x10001, 0),
    ] {
        let region = VhostUserMemoryRegion::new(0, size, HVA, off);
        let out = run_script(
            &dev,
            &[
                with_reply_ack(),
                Raw::new(FrontendReq::SET_MEM_TABLE, &mem_table(&[region]))
                    .fds(&[fd])
                    .need_reply(),
            ],
        );
        assert_error!(out.end, VhostUserError::Memory(m) if m.contains("exceeds"));
        assert_eq!(
            regions_mapped(&dev),
            0,
            "region {size:#x}@{off:#x} was mapped"
        );
        assert_eq!(out.replies.len(), 1);
        assert_ne!(out.replies[0].u64(), 0);
        // The same through ADD_MEM_REG.
        let out = run_script(
            &dev,
            &[Raw::new(FrontendReq::ADD_MEM_REG, &single_region(0, size, HVA, off)).fds(&[fd])],
        );
        assert_error!(out.end, VhostUserError::Memory(m) if m.contains("exceeds"));
        assert_eq!(regions_mapped(&dev), 0);
    }
    // Exactly the file's size, at an offset: fine.
    let region = VhostUserMemoryRegion::new(0, 0xf000, HVA, PAGE);
    let out = run_script(
        &dev,
        &[Raw::new(FrontendReq::SET_MEM_TABLE, &mem_table(&[region])).fds(&[fd])],
    );
    assert_disconnected(&out.end);
    assert_eq!(regions_mapped(&dev), 1);
}

#[test]
fn get_config_edges() {
    let dev = device(1);
    let out = run_script(
        &dev,
        &[
            with_reply_ack(),
            // Past the end of virtio_net_config: answered with size 0.
            Raw::new(FrontendReq::GET_CONFIG, &config_req(20, 10)).need_reply(),
            Raw::new(FrontendReq::GET_CONFIG, &config_req(0, 6)),
            // Body shorter than the size it announces.
            Raw::new(FrontendReq::GET_CONFIG, &config_req(0, 6)[..14]),
        ],
    );
    assert_error!(out.end, VhostUserError::InvalidPayload(24));
    assert_eq!(out.replies.len(), 2, "{:?}", out.replies);
    let r = &out.replies[0];
    assert_eq!(r.body.len(), 12 + 10);
    let mut hdr = VhostUserConfig::default();
    hdr.as_mut_slice().copy_from_slice(&r.body[..12]);
    let size = hdr.size;
    assert_eq!(size, 0, "short config read not reported as failure");
    let r = &out.replies[1];
    assert_eq!(r.body.len(), 12 + 6);
    assert_eq!(&r.body[12..], &MAC);
}

// ---------------------------------------------------------------------------
// 4. Memory slots.

#[test]
fn add_and_remove_memory_regions() {
    let dev = device(1);
    let (mut fe, raw, server) = connect(&dev);
    fe.get_features().unwrap();
    fe.get_protocol_features().unwrap();
    fe.set_protocol_features(
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    )
    .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_max_mem_slots().unwrap(), 32);
    fe.set_features(dev.features()).unwrap();

    // QEMU with CONFIGURE_MEM_SLOTS never sends SET_MEM_TABLE: regions
    // arrive one by one, here two windows of one memfd.
    let (ga, gb, len) = (0x0, 0x1_0000_0000, 0x10000);
    let file = memfd(2 * len);
    let fmem = frontend_memory(&file, &[(ga, len, 0), (gb, len, len)]);
    let (ia, ib) = (region_info(&fmem, ga), region_info(&fmem, gb));
    assert_eq!(ib.mmap_offset, len);
    fe.add_mem_region(&ib).unwrap();
    fe.add_mem_region(&ia).unwrap();
    assert_eq!(regions_mapped(&dev), 2);
    fmem.write_obj(0x1234_5678_u32, GuestAddress(gb + 0x40))
        .unwrap();
    let seen: u32 = dev
        .memory()
        .memory()
        .read_obj(GuestAddress(gb + 0x40))
        .unwrap();
    assert_eq!(
        seen, 0x1234_5678,
        "region B mapped at the wrong file offset"
    );

    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    start_ring(&mut fe, 0, ib.userspace_addr, 3, &kick, &call);
    assert_ring_running(&dev, 0, gb, 3);

    // Remove B: the device no longer maps it.
    fe.remove_mem_region(&ib).unwrap();
    assert_eq!(regions_mapped(&dev), 1);
    assert!(dev
        .memory()
        .memory()
        .find_region(GuestAddress(gb))
        .is_none());
    assert!(dev
        .memory()
        .memory()
        .find_region(GuestAddress(ga))
        .is_some());
    // Add it back, remove A, program ring 1 in B.
    fe.add_mem_region(&ib).unwrap();
    fe.remove_mem_region(&ia).unwrap();
    assert_eq!(regions_mapped(&dev), 1);
    let (kick1, call1) = (
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    start_ring(&mut fe, 1, ib.userspace_addr, 0, &kick1, &call1);
    assert_ring_running(&dev, 1, gb, 0);
    // A ring in the removed region A is refused (non-zero ack), and the
    // session ends on it.
    let (desc, avail, used) = ring_offsets(0);
    let ha = ia.userspace_addr;
    let refused = fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: MAX_QUEUE_SIZE,
            queue_size: RING_SIZE,
            flags: 0,
            desc_table_addr: ha + desc,
            used_ring_addr: ha + used,
            avail_ring_addr: ha + avail,
            log_addr: None,
        },
    );
    assert!(refused.is_err(), "ring in a removed region accepted");
    drop(fe);
    drop(raw);
    assert_error!(join(server), VhostUserError::BadRingAddress(0, a) if *a == ha + desc);
}

#[test]
fn memory_slot_limits() {
    let dev = device(1);
    let n = MAX_MEM_SLOTS;
    let file = memfd((n + 1) * PAGE);
    let fd = file.as_raw_fd();
    let add = |i: u64| {
        Raw::new(
            FrontendReq::ADD_MEM_REG,
            &single_region(i * 0x10_0000, PAGE, HVA + i * 0x10_0000, i * PAGE),
        )
        .fds(&[fd])
    };
    let mut msgs: Vec<Raw> = (0..n).map(add).collect();
    msgs.insert(0, Raw::new(FrontendReq::GET_MAX_MEM_SLOTS, &[]));
    msgs.push(add(n));
    let out = run_script(&dev, &msgs);
    assert_error!(out.end, VhostUserError::Memory(m) if m.contains("slot"));
    assert_eq!(out.replies[0].u64(), n);
    assert_eq!(regions_mapped(&dev), n as usize);
    dev.reset();

    let rem = |i: u64| {
        Raw::new(
            FrontendReq::REM_MEM_REG,
            &single_region(i * 0x10_0000, PAGE, HVA + i * 0x10_0000, i * PAGE),
        )
    };
    // Removing what is not there; adding the same range twice; ADD_MEM_REG
    // without its fd.
    let out = run_script(&dev, &[add(0), rem(1)]);
    assert_error!(out.end, VhostUserError::Memory(_));
    assert_eq!(regions_mapped(&dev), 1);
    dev.reset();
    let out = run_script(&dev, &[add(0), add(0)]);
    assert_error!(out.end, VhostUserError::Memory(_));
    dev.reset();
    let out = run_script(&dev, &[add(0).fds(&[])]);
    assert_error!(out.end, VhostUserError::MissingFd(37));
    // The removal frees a slot for a new region (QEMU may pass the fd
    // along with REM_MEM_REG).
    let msgs: Vec<Raw> = (0..n).map(add).chain([rem(3).fds(&[fd]), add(n)]).collect();
    let out = run_script(&dev, &msgs);
    assert_disconnected(&out.end);
    assert_eq!(regions_mapped(&dev), n as usize);
}

// ---------------------------------------------------------------------------
// 3. Random messages.

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Descriptors messages may carry: memfds of several sizes and eventfds.
struct FdPool {
    files: Vec<File>,
    events: Vec<EventFd>,
}

impl FdPool {
    fn new() -> Self {
        FdPool {
            files: [PAGE, 0x10000, 0x40000].iter().map(|&l| memfd(l)).collect(),
            events: (0..2)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
        }
    }

    fn pick(&self, rng: &mut XorShift) -> RawFd {
        if rng.chance(3) {
            self.events[rng.below(self.events.len() as u64) as usize].as_raw_fd()
        } else {
            self.files[rng.below(self.files.len() as u64) as usize].as_raw_fd()
        }
    }
}

/// A message that is sometimes well-formed, so the loop reaches past
/// framing into every handler.
fn random_message(rng: &mut XorShift, pool: &FdPool, offered: u64) -> Raw {
    let request = rng.below(51) as u32;
    let flags = match rng.below(64) {
        0 => rng.next() as u32,
        1 => FLAG_VERSION_1 | (rng.below(16) as u32) << 2,
        2..=24 => FLAG_VERSION_1 | FLAG_NEED_REPLY,
        _ => FLAG_VERSION_1,
    };
    let small = |rng: &mut XorShift| rng.below(3) as u32;
    let addr = |rng: &mut XorShift| (HVA + rng.below(0x5_0000)) & !0xf;
    let mut fds = Vec::new();
    let body = if rng.chance(3) {
        // Random bytes of a random length.
        let len = match rng.below(10) {
            0 => rng.below(4097) as usize,
            _ => rng.below(64) as usize,
        };
        rng.bytes(len)
    } else {
        match FrontendReq::try_from(request) {
            Ok(FrontendReq::SET_FEATURES) => u64_body(offered & rng.next()),
            Ok(FrontendReq::SET_PROTOCOL_FEATURES) => u64_body(rng.next()),
            Ok(
                FrontendReq::SET_VRING_NUM
                | FrontendReq::SET_VRING_BASE
                | FrontendReq::GET_VRING_BASE
                | FrontendReq::SET_VRING_ENABLE,
            ) => {
                let num = match rng.below(3) {
                    0 => 1 << rng.below(12),
                    1 => small(rng),
                    _ => rng.next() as u32,
                };
                state(small(rng), num)
            }
            Ok(FrontendReq::SET_VRING_ADDR) => {
                vring_addr(small(rng), addr(rng), addr(rng) & !3, addr(rng))
            }
            Ok(
                FrontendReq::SET_VRING_KICK
                | FrontendReq::SET_VRING_CALL
                | FrontendReq::SET_VRING_ERR,
            ) => {
                if rng.chance(2) {
                    fds.push(pool.events[0].as_raw_fd());
                }
                u64_body(u64::from(small(rng)) | if rng.chance(4) { 0x100 } else { 0 })
            }
            Ok(FrontendReq::SET_MEM_TABLE) => {
                let n = 1 + rng.below(3);
                let regions: Vec<_> = (0..n)
                    .map(|i| {
                        let size = if rng.chance(4) {
                            rng.next()
                        } else {
                            PAGE << rng.below(5)
                        };
                        let off = if rng.chance(4) {
                            rng.next()
                        } else {
                            PAGE * rng.below(2)
                        };
                        VhostUserMemoryRegion::new(
                            i * 0x10_0000 + PAGE * rng.below(2),
                            size,
                            HVA + i * 0x10_0000,
                            off,
                        )
                    })
                    .collect();
                let nfds = if rng.chance(5) { rng.below(4) } else { n };
                fds.extend((0..nfds).map(|_| pool.pick(rng)));
                mem_table(&regions)
            }
            Ok(FrontendReq::ADD_MEM_REG | FrontendReq::REM_MEM_REG) => {
                // ADD_MEM_REG mostly with its fd, REM_MEM_REG mostly without.
                let attach = if request == 37 {
                    !rng.chance(4)
                } else {
                    rng.chance(4)
                };
                if attach {
                    fds.push(pool.pick(rng));
                }
                let size = if rng.chance(4) {
                    rng.next()
                } else {
                    PAGE << rng.below(7)
                };
                single_region(
                    rng.below(4) * 0x10_0000,
                    size,
                    HVA + rng.below(4) * 0x10_0000,
                    PAGE * rng.below(3),
                )
            }
            Ok(FrontendReq::GET_CONFIG | FrontendReq::SET_CONFIG) => {
                let mut b = config_req(rng.below(32) as u32, 1 + rng.below(16) as u32);
                if rng.chance(4) {
                    b.truncate(rng.below(b.len() as u64) as usize);
                }
                b
            }
            _ => {
                let n = rng.below(16) as usize;
                rng.bytes(n)
            }
        }
    };
    if rng.chance(16) {
        fds.extend((0..1 + rng.below(3)).map(|_| pool.pick(rng)));
    }
    let mut m = Raw::code(request, &body).flags(flags).fds(&fds);
    if rng.chance(40) {
        // Announce more than is sent: the message is cut by EOF.
        m = m.size(body.len() as u32 + 1 + rng.below(64) as u32);
    }
    m
}

/// A well-formed start of ring 0 in 64 KiB of `file` at guest address 0,
/// every message acked.
fn live_setup(features: u64, file: &File, kick: &EventFd) -> Vec<Raw> {
    let region = VhostUserMemoryRegion::new(0, 0x10000, HVA, 0);
    vec![
        with_reply_ack(),
        Raw::new(FrontendReq::SET_VRING_ENABLE, &state(0, 1)).need_reply(),
        Raw::new(FrontendReq::SET_FEATURES, &u64_body(features)).need_reply(),
        Raw::new(FrontendReq::SET_MEM_TABLE, &mem_table(&[region]))
            .fds(&[file.as_raw_fd()])
            .need_reply(),
        Raw::new(FrontendReq::SET_VRING_NUM, &state(0, 256)).need_reply(),
        Raw::new(FrontendReq::SET_VRING_BASE, &state(0, 9)).need_reply(),
        Raw::new(
            FrontendReq::SET_VRING_ADDR,
            &vring_addr(0, HVA, HVA + 0x2000, HVA + 0x1000),
        )
        .need_reply(),
        Raw::new(FrontendReq::SET_VRING_KICK, &u64_body(0))
            .fds(&[kick.as_raw_fd()])
            .need_reply(),
        Raw::new(FrontendReq::SET_VRING_CALL, &u64_body(0))
            .fds(&[kick.as_raw_fd()])
            .need_reply(),
    ]
}

/// What the random sessions reached, to keep the generator honest.
#[derive(Default, Debug)]
struct Coverage {
    /// Sessions by how they ended (error variant name).
    ends: std::collections::BTreeMap<String, usize>,
    replies: usize,
    /// Sessions that left a memory table mapped.
    mapped: usize,
    /// Rings left ready (kick received) at the end of a session.
    ready: usize,
}

/// Run random sessions of about `messages` messages in all; every reply must be well-formed and
/// answer a request of the batch, in order.
fn stress(seed: u64, messages: usize, cover: &mut Coverage) -> usize {
    let dev = device(2);
    let pool = FdPool::new();
    let mut rng = XorShift(seed);
    let live_file = memfd(0x10000);
    let live_kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut sent = 0;
    let mut sessions = 0;
    while sent < messages {
        let n = 1 + rng.below(8) as usize;
        // A third of the sessions hit a device with a running ring.
        let mut batch = if rng.chance(3) {
            live_setup(dev.features(), &live_file, &live_kick)
        } else {
            Vec::new()
        };
        let prefix = batch.len();
        batch.extend((0..n).map(|_| random_message(&mut rng, &pool, dev.features())));
        // A message cut short only makes sense last.
        if let Some(cut) = batch.iter().position(|m| m.size.is_some()) {
            batch.truncate(cut + 1);
        }
        sent += batch.len() - prefix;
        sessions += 1;
        let out = run_script(&dev, &batch);
        let mut codes = batch.iter().map(|m| m.request);
        for r in &out.replies {
            assert_eq!(
                r.flags,
                FLAG_VERSION_1 | FLAG_REPLY,
                "seed {seed:#x}: bad reply flags"
            );
            assert!(
                codes.any(|c| c == r.request),
                "seed {seed:#x}: reply to {} out of order or unsolicited",
                r.request
            );
        }
        let end = match &out.end {
            SessionEnd::Disconnected => "Disconnected".to_string(),
            SessionEnd::Error(VhostUserError::Unsupported(_)) => {
                panic!("seed {seed:#x}: an unsupported request ended the session")
            }
            SessionEnd::Error(e) => format!("{e:?}")
                .split(['(', ' '])
                .next()
                .unwrap()
                .to_string(),
        };
        *cover.ends.entry(end).or_default() += 1;
        cover.replies += out.replies.len();
        cover.mapped += usize::from(regions_mapped(&dev) > 0);
        cover.ready += dev
            .vrings()
            .iter()
            .filter(|v| v.get_ref().get_queue().ready())
            .count();
        dev.reset();
    }

    // The device still serves a clean frontend afterwards.
    let file = memfd(0x10000);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let out = run_script(&dev, &live_setup(dev.features(), &file, &kick));
    assert_disconnected(&out.end);
    assert_eq!(out.replies.len(), 8, "seed {seed:#x}: {:?}", out.replies);
    assert!(
        out.replies.iter().all(|r| r.u64() == 0),
        "seed {seed:#x}: {:?}",
        out.replies
    );
    assert_ring_running(&dev, 0, 0, 9);
    sessions
}

#[test]
fn random_messages_never_panic_or_hang() {
    let (tx, rx) = mpsc::channel();
    let worker = thread::spawn(move || {
        let mut sessions = 0;
        let mut cover = Coverage::default();
        for seed in [0x9e37_79b9_7f4a_7c15u64, 0xdead_beef_cafe_f00d, 42] {
            sessions += stress(seed, 3000, &mut cover);
        }
        tx.send((sessions, cover)).unwrap();
    });
    match rx.recv_timeout(Duration::from_secs(240)) {
        Ok((sessions, cover)) => {
            eprintln!("{sessions} random sessions: {cover:#?}");
            assert!(sessions > 500, "only {sessions} sessions ran");
            assert!(cover.mapped > 0 && cover.ready > 0, "{cover:?}");
            assert!(cover.replies > sessions / 2, "{cover:?}");
            assert!(
                cover.ends.get("Disconnected").copied().unwrap_or(0) > sessions / 20,
                "{cover:?}"
            );
            // The framing and the handlers were both reached.
            for variant in [
                "BadVersion",
                "Truncated",
                "PayloadSize",
                "BadVringIndex",
                "Memory",
                "MissingFd",
            ] {
                assert!(
                    cover.ends.contains_key(variant),
                    "never ended on {variant}: {cover:?}"
                );
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("random message loop hung"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The worker panicked; surface its message.
            if let Err(e) = worker.join() {
                std::panic::resume_unwind(e);
            }
            unreachable!();
        }
    }
    worker.join().unwrap();
}

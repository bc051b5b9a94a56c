//! The request loop for one connected frontend.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVirtioFeatures,
    VhostUserVringAddr, VhostUserVringState,
};
use vhost_user_backend::{VringMutex, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::wire::{Channel, Message};
use super::VhostUserError;

/// Bit in SET_VRING_KICK/CALL/ERR payloads meaning "no file descriptor".
const VRING_NOFD_MASK: u64 = 0x100;
const VRING_IDX_MASK: u64 = 0xff;
/// Memory slots we accept with CONFIGURE_MEM_SLOTS.
pub const MAX_MEM_SLOTS: u64 = 32;

/// What a device learns about its rings from the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingEvent {
    /// The ring got its kick fd and may be processed (if enabled).
    Started(u16),
    /// The ring was stopped by GET_VRING_BASE.
    Stopped(u16),
    /// SET_VRING_ENABLE changed the ring's enabled state.
    Enabled(u16, bool),
    /// The guest memory table changed.
    MemoryChanged,
}

/// The device side of a vhost-user session, shaped after
/// vhost-user-backend's `VhostUserBackend` trait.
pub trait Backend: Send + Sync {
    /// Total number of virtqueues (RX and TX of every queue pair).
    fn num_queues(&self) -> usize;
    /// Largest ring size the device accepts.
    fn max_queue_size(&self) -> u16;
    /// Virtio features offered, including VHOST_USER_F_PROTOCOL_FEATURES.
    fn features(&self) -> u64;
    /// Protocol features offered.
    fn protocol_features(&self) -> VhostUserProtocolFeatures;
    /// The device's rings, one per virtqueue.
    fn vrings(&self) -> &[VringMutex];
    /// The guest memory shared with the device's workers.
    fn memory(&self) -> &GuestMemoryAtomic<GuestMemoryMmap>;
    /// Features acked by SET_FEATURES.
    fn set_acked_features(&self, features: u64);
    /// Bytes of the virtio config space at `offset`; short if out of range.
    fn read_config(&self, offset: u32, size: u32) -> Vec<u8>;
    /// A write to the config space.
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), String>;
    /// A ring changed state; the device tells its workers.
    fn ring_event(&self, event: RingEvent);
    /// The session ended or the device was reset: drop all guest state.
    fn reset(&self);
}

/// Why a session loop returned.
#[derive(Debug)]
pub enum SessionEnd {
    /// The frontend closed the socket.
    Disconnected,
    /// The session was ended by a protocol error.
    Error(VhostUserError),
}

#[derive(Clone, Copy)]
struct RegionMap {
    gpa: u64,
    size: u64,
    user_addr: u64,
}

/// One frontend connection.
pub struct Session<'a, B: Backend> {
    chan: Channel,
    dev: &'a B,
    acked_features: u64,
    features_set: bool,
    acked_protocol: VhostUserProtocolFeatures,
    regions: Vec<RegionMap>,
    /// Counted protocol errors that did not end the session.
    pub soft_errors: u64,
}

impl<'a, B: Backend> Session<'a, B> {
    pub fn new(sock: UnixStream, dev: &'a B) -> Self {
        Session {
            chan: Channel::new(sock),
            dev,
            acked_features: 0,
            features_set: false,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            regions: Vec::new(),
            soft_errors: 0,
        }
    }

    pub fn socket(&self) -> &UnixStream {
        self.chan.stream()
    }

    /// Serve requests until the frontend leaves or breaks the protocol.
    pub fn run(&mut self) -> SessionEnd {
        loop {
            match self.serve_one() {
                Ok(true) => {}
                Ok(false) => return SessionEnd::Disconnected,
                Err(e) => return SessionEnd::Error(e),
            }
        }
    }

    /// Serve one request. `Ok(false)` on a clean disconnect.
    pub fn serve_one(&mut self) -> Result<bool, VhostUserError> {
        let Some(mut msg) = self.chan.recv()? else {
            return Ok(false);
        };
        let request = msg.request;
        tracing::trace!(
            request,
            flags = msg.flags,
            len = msg.body().len(),
            "vhost-user request"
        );
        let need_reply = msg.need_reply();
        let result = self.dispatch(&mut msg);
        self.chan.recycle(msg);
        let replied = match result {
            Ok(replied) => replied,
            Err(VhostUserError::Unsupported(code)) => {
                self.soft_errors += 1;
                tracing::warn!(request = code, "unsupported vhost-user request ignored");
                if need_reply {
                    self.chan.reply_u64(request, 1)?;
                }
                return Ok(true);
            }
            Err(e) => {
                // Tell the frontend before hanging up when it waits for an
                // ack. A request that solicits its own reply never gets a
                // REPLY_ACK (spec): a u64 `1` in place of GET_VRING_BASE's
                // 8-byte VringState would read as a valid base of 0.
                if need_reply && self.reply_ack_enabled() && !solicits_reply(request) {
                    let _ = self.chan.reply_u64(request, 1);
                }
                return Err(e);
            }
        };
        if need_reply && !replied && self.reply_ack_enabled() {
            self.chan.reply_u64(request, 0)?;
        }
        Ok(true)
    }

    fn reply_ack_enabled(&self) -> bool {
        self.acked_protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
    }

    fn vring(&self, index: u32) -> Result<&VringMutex, VhostUserError> {
        self.dev
            .vrings()
            .get(index as usize)
            .ok_or(VhostUserError::BadVringIndex(index))
    }

    /// Handle one request; returns whether a reply was already sent.
    fn dispatch(&mut self, msg: &mut Message) -> Result<bool, VhostUserError> {
        let code = msg.request;
        let Ok(req) = FrontendReq::try_from(code) else {
            return Err(VhostUserError::Unsupported(code));
        };
        match req {
            FrontendReq::GET_FEATURES => {
                self.chan.reply_u64(code, self.dev.features())?;
                Ok(true)
            }
            FrontendReq::SET_FEATURES => {
                let features = msg.payload::<VhostUserU64>()?.value;
                if features & !self.dev.features() != 0 {
                    return Err(VhostUserError::UnofferedFeatures(
                        features & !self.dev.features(),
                    ));
                }
                self.acked_features = features;
                self.features_set = true;
                let event_idx =
                    features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
                for vring in self.dev.vrings() {
                    vring.set_queue_event_idx(event_idx);
                    // Without PROTOCOL_FEATURES rings have no enable message
                    // and run as soon as they start.
                    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
                        vring.set_enabled(true);
                    }
                }
                self.dev.set_acked_features(features);
                Ok(false)
            }
            FrontendReq::GET_PROTOCOL_FEATURES => {
                self.chan
                    .reply_u64(code, self.dev.protocol_features().bits())?;
                Ok(true)
            }
            FrontendReq::SET_PROTOCOL_FEATURES => {
                let value = msg.payload::<VhostUserU64>()?.value;
                // Keep only what we offered; frontends mask, but be strict.
                self.acked_protocol = VhostUserProtocolFeatures::from_bits_truncate(value)
                    & self.dev.protocol_features();
                Ok(false)
            }
            FrontendReq::SET_OWNER => Ok(false),
            FrontendReq::RESET_OWNER | FrontendReq::RESET_DEVICE => {
                self.reset_rings();
                Ok(false)
            }
            FrontendReq::GET_QUEUE_NUM => {
                // Queue pairs, as DPDK's vhost library answers for net.
                self.chan
                    .reply_u64(code, (self.dev.num_queues() / 2).max(1) as u64)?;
                Ok(true)
            }
            FrontendReq::GET_MAX_MEM_SLOTS => {
                self.chan.reply_u64(code, MAX_MEM_SLOTS)?;
                Ok(true)
            }
            FrontendReq::SET_MEM_TABLE => {
                self.set_mem_table(msg)?;
                Ok(false)
            }
            FrontendReq::ADD_MEM_REG => {
                self.add_mem_region(msg)?;
                Ok(false)
            }
            FrontendReq::REM_MEM_REG => {
                self.remove_mem_region(msg)?;
                Ok(false)
            }
            FrontendReq::SET_VRING_NUM => {
                let s = msg.payload::<VhostUserVringState>()?;
                let (index, num) = (s.index, s.num);
                let vring = self.vring(index)?;
                if num == 0 || !num.is_power_of_two() || num > u32::from(self.dev.max_queue_size())
                {
                    return Err(VhostUserError::BadQueueSize(index, num));
                }
                vring.set_queue_size(num as u16);
                Ok(false)
            }
            FrontendReq::SET_VRING_ADDR => {
                let a = msg.payload::<VhostUserVringAddr>()?;
                let index = a.index;
                let vring = self.vring(index)?;
                let desc = self.translate(index, a.descriptor)?;
                let avail = self.translate(index, a.available)?;
                let used = self.translate(index, a.used)?;
                vring
                    .set_queue_info(desc, avail, used)
                    .map_err(|e| VhostUserError::Device(format!("vring {index}: {e}")))?;
                Ok(false)
            }
            FrontendReq::SET_VRING_BASE => {
                let s = msg.payload::<VhostUserVringState>()?;
                let (index, num) = (s.index, s.num);
                let vring = self.vring(index)?;
                if num > u32::from(u16::MAX) {
                    return Err(VhostUserError::InvalidPayload(code));
                }
                vring.set_queue_next_avail(num as u16);
                vring.set_queue_next_used(num as u16);
                Ok(false)
            }
            FrontendReq::GET_VRING_BASE => {
                let s = msg.payload::<VhostUserVringState>()?;
                let index = s.index;
                let vring = self.vring(index)?;
                // Stop the ring under its lock so no worker is mid-batch.
                let base = {
                    let mut st = vring.get_mut();
                    st.get_queue_mut().set_ready(false);
                    st.get_queue_mut().next_avail()
                };
                vring.set_kick(None);
                self.dev.ring_event(RingEvent::Stopped(index as u16));
                let reply = VhostUserVringState::new(index, u32::from(base));
                self.chan
                    .reply(code, vm_memory::ByteValued::as_slice(&reply))?;
                Ok(true)
            }
            FrontendReq::SET_VRING_KICK => {
                let (index, file) = self.vring_fd(msg)?;
                let vring = self.vring(index)?;
                if let Some(f) = &file {
                    set_nonblocking(f);
                }
                let has_fd = file.is_some();
                vring.set_kick(file);
                vring.set_queue_ready(true);
                if self.features_set
                    && self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0
                {
                    vring.set_enabled(true);
                }
                if !has_fd {
                    tracing::debug!(index, "kick without fd: ring is polled");
                }
                self.dev.ring_event(RingEvent::Started(index as u16));
                Ok(false)
            }
            FrontendReq::SET_VRING_CALL => {
                let (index, file) = self.vring_fd(msg)?;
                self.vring(index)?.set_call(file);
                Ok(false)
            }
            FrontendReq::SET_VRING_ERR => {
                let (index, file) = self.vring_fd(msg)?;
                self.vring(index)?.set_err(file);
                Ok(false)
            }
            FrontendReq::SET_VRING_ENABLE => {
                // Tolerated before SET_FEATURES: QEMU sends it from
                // virtio-net's peer_attach once we offered PROTOCOL_FEATURES.
                let s = msg.payload::<VhostUserVringState>()?;
                let (index, num) = (s.index, s.num);
                let vring = self.vring(index)?;
                if num > 1 {
                    return Err(VhostUserError::InvalidPayload(code));
                }
                vring.set_enabled(num == 1);
                self.dev
                    .ring_event(RingEvent::Enabled(index as u16, num == 1));
                Ok(false)
            }
            FrontendReq::GET_CONFIG => {
                let hdr = msg.payload_prefix::<VhostUserConfig>(false)?;
                let (offset, size) = (hdr.offset, hdr.size);
                if msg.body().len() != std::mem::size_of::<VhostUserConfig>() + size as usize {
                    return Err(VhostUserError::InvalidPayload(code));
                }
                let data = self.dev.read_config(offset, size);
                let mut out = Vec::with_capacity(12 + size as usize);
                // A short read is answered with size 0, which the
                // frontend takes as a failure.
                let ok = data.len() == size as usize;
                let reply = VhostUserConfig::new(
                    offset,
                    if ok { size } else { 0 },
                    vhost::vhost_user::message::VhostUserConfigFlags::empty(),
                );
                out.extend_from_slice(vm_memory::ByteValued::as_slice(&reply));
                if ok {
                    out.extend_from_slice(&data);
                } else {
                    out.resize(12 + size as usize, 0);
                }
                self.chan.reply(code, &out)?;
                Ok(true)
            }
            FrontendReq::SET_CONFIG => {
                let hdr = msg.payload_prefix::<VhostUserConfig>(false)?;
                let (offset, size) = (hdr.offset, hdr.size);
                let body = msg.body();
                let start = std::mem::size_of::<VhostUserConfig>();
                if body.len() != start + size as usize {
                    return Err(VhostUserError::InvalidPayload(code));
                }
                self.dev
                    .write_config(offset, &body[start..])
                    .map_err(VhostUserError::Device)?;
                Ok(false)
            }
            _ => Err(VhostUserError::Unsupported(code)),
        }
    }

    /// Decode the u64 payload of SET_VRING_KICK/CALL/ERR and its fd.
    fn vring_fd(&self, msg: &mut Message) -> Result<(u32, Option<File>), VhostUserError> {
        let value = msg.payload::<VhostUserU64>()?.value;
        let index = (value & VRING_IDX_MASK) as u32;
        if value & !(VRING_IDX_MASK | VRING_NOFD_MASK) != 0 {
            return Err(VhostUserError::InvalidPayload(msg.request));
        }
        if index as usize >= self.dev.num_queues() {
            return Err(VhostUserError::BadVringIndex(index));
        }
        if value & VRING_NOFD_MASK != 0 {
            if !msg.files.is_empty() {
                return Err(VhostUserError::MissingFd(msg.request));
            }
            return Ok((index, None));
        }
        let file = msg
            .take_one_file()
            .ok_or(VhostUserError::MissingFd(msg.request))?;
        Ok((index, Some(file)))
    }

    /// Map a frontend virtual address (QEMU's own address space) to a guest
    /// physical address through the memory table.
    fn translate(&self, index: u32, va: u64) -> Result<u64, VhostUserError> {
        self.regions
            .iter()
            .find(|r| va >= r.user_addr && va - r.user_addr < r.size)
            .map(|r| r.gpa + (va - r.user_addr))
            .ok_or(VhostUserError::BadRingAddress(index, va))
    }

    fn set_mem_table(&mut self, msg: &mut Message) -> Result<(), VhostUserError> {
        let hdr = msg.payload_prefix::<VhostUserMemory>(false)?;
        let count = hdr.num_regions as usize;
        let hsize = std::mem::size_of::<VhostUserMemory>();
        let rsize = std::mem::size_of::<VhostUserMemoryRegion>();
        let body = msg.body();
        if body.len() != hsize + count * rsize || msg.files.len() != count {
            return Err(VhostUserError::InvalidPayload(msg.request));
        }
        let mut descs = Vec::with_capacity(count);
        for i in 0..count {
            let mut r = VhostUserMemoryRegion::default();
            let at = hsize + i * rsize;
            vm_memory::ByteValued::as_mut_slice(&mut r).copy_from_slice(&body[at..at + rsize]);
            if !vhost::vhost_user::message::VhostUserMsgValidator::is_valid(&r) {
                return Err(VhostUserError::InvalidPayload(msg.request));
            }
            descs.push(r);
        }
        let files = std::mem::take(&mut msg.files);
        let mut regions = Vec::with_capacity(count);
        let mut maps = Vec::with_capacity(count);
        for (r, file) in descs.iter().zip(files) {
            regions.push(map_region(r, file)?);
            maps.push(RegionMap {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                user_addr: r.user_addr,
            });
        }
        // vm-memory wants regions sorted by guest address; the protocol
        // does not promise any order.
        regions.sort_by_key(|r| r.start_addr());
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| VhostUserError::Memory(e.to_string()))?;
        self.dev
            .memory()
            .lock()
            .map_err(|_| VhostUserError::Memory("memory lock poisoned".into()))?
            .replace(mem);
        self.regions = maps;
        self.dev.ring_event(RingEvent::MemoryChanged);
        Ok(())
    }

    fn add_mem_region(&mut self, msg: &mut Message) -> Result<(), VhostUserError> {
        let r = msg.payload::<VhostUserSingleMemoryRegion>()?;
        if !vhost::vhost_user::message::VhostUserMsgValidator::is_valid(&*r) {
            return Err(VhostUserError::InvalidPayload(msg.request));
        }
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(VhostUserError::Memory("no free memory slot".into()));
        }
        let file = msg
            .take_one_file()
            .ok_or(VhostUserError::MissingFd(msg.request))?;
        let region = map_region(&r, file)?;
        let current = self.dev.memory().memory();
        let mem = current
            .insert_region(std::sync::Arc::new(region))
            .map_err(|e| VhostUserError::Memory(e.to_string()))?;
        drop(current);
        self.dev
            .memory()
            .lock()
            .map_err(|_| VhostUserError::Memory("memory lock poisoned".into()))?
            .replace(mem);
        self.regions.push(RegionMap {
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            user_addr: r.user_addr,
        });
        self.dev.ring_event(RingEvent::MemoryChanged);
        Ok(())
    }

    fn remove_mem_region(&mut self, msg: &mut Message) -> Result<(), VhostUserError> {
        let r = msg.payload::<VhostUserSingleMemoryRegion>()?;
        // The frontend may pass the region's fd again; we do not need it.
        msg.files.clear();
        let current = self.dev.memory().memory();
        let (mem, _) = current
            .remove_region(GuestAddress(r.guest_phys_addr), r.memory_size)
            .map_err(|e| VhostUserError::Memory(e.to_string()))?;
        drop(current);
        self.dev
            .memory()
            .lock()
            .map_err(|_| VhostUserError::Memory("memory lock poisoned".into()))?
            .replace(mem);
        let (gpa, size) = (r.guest_phys_addr, r.memory_size);
        self.regions.retain(|m| !(m.gpa == gpa && m.size == size));
        self.dev.ring_event(RingEvent::MemoryChanged);
        Ok(())
    }

    /// Stop every ring (RESET_OWNER / RESET_DEVICE).
    fn reset_rings(&mut self) {
        for (i, vring) in self.dev.vrings().iter().enumerate() {
            vring.get_mut().get_queue_mut().reset();
            vring.set_kick(None);
            vring.set_call(None);
            vring.set_enabled(false);
            self.dev.ring_event(RingEvent::Stopped(i as u16));
        }
        self.acked_features = 0;
        self.features_set = false;
    }
}

/// Map one region, refusing a region larger than its file: a mapping past
/// the end of a file would fault (SIGBUS) when touched.
fn map_region(r: &VhostUserMemoryRegion, file: File) -> Result<GuestRegionMmap, VhostUserError> {
    let (offset, size) = (r.mmap_offset, r.memory_size);
    let meta = file
        .metadata()
        .map_err(|e| VhostUserError::Memory(e.to_string()))?;
    let end = offset
        .checked_add(size)
        .ok_or_else(|| VhostUserError::Memory("region end overflows".into()))?;
    if meta.is_file() && meta.len() < end {
        return Err(VhostUserError::Memory(format!(
            "region of {size:#x} bytes at offset {offset:#x} exceeds its {}-byte file",
            meta.len()
        )));
    }
    let mmap = r
        .mmap_region::<()>(file)
        .map_err(|e| VhostUserError::Memory(e.to_string()))?;
    GuestRegionMmap::new(mmap, GuestAddress(r.guest_phys_addr))
        .ok_or_else(|| VhostUserError::Memory("region wraps the address space".into()))
}

/// Requests answered with their own reply message, never with a REPLY_ACK.
fn solicits_reply(code: u32) -> bool {
    matches!(
        FrontendReq::try_from(code),
        Ok(FrontendReq::GET_FEATURES
            | FrontendReq::GET_PROTOCOL_FEATURES
            | FrontendReq::GET_QUEUE_NUM
            | FrontendReq::GET_MAX_MEM_SLOTS
            | FrontendReq::GET_VRING_BASE
            | FrontendReq::GET_CONFIG)
    )
}

fn set_nonblocking(f: &File) {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

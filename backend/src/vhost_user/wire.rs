//! Framing of vhost-user messages on the unix stream: a 12-byte header, a
//! bounded body, and file descriptors passed as SCM_RIGHTS.
//!
//! The vhost crate keeps its header type private, so the header lives here;
//! every payload struct comes from `vhost::vhost_user::message` and is checked
//! with its own `is_valid()` before anything acts on it.

use std::fs::File;
use std::io::{Read, Write};
use std::mem::size_of;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{VhostUserMsgValidator, MAX_MSG_SIZE};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::VhostUserError;

/// Size of the message header on the wire.
pub const HDR_SIZE: usize = 12;
/// Most file descriptors one message may carry (SET_MEM_TABLE's regions).
pub const MAX_FDS: usize = 32;

pub const FLAG_VERSION_1: u32 = 0x1;
pub const FLAG_VERSION_MASK: u32 = 0x3;
pub const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// One request read from the frontend.
pub struct Message {
    pub request: u32,
    pub flags: u32,
    len: usize,
    body: Box<[u8; MAX_MSG_SIZE]>,
    pub files: Vec<File>,
}

impl Message {
    pub fn body(&self) -> &[u8] {
        &self.body[..self.len]
    }

    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// Decode a fixed-size payload; the body must be exactly that size and
    /// pass the vhost crate's validator.
    pub fn payload<T: ByteValued + VhostUserMsgValidator + Default>(
        &self,
    ) -> Result<T, VhostUserError> {
        self.payload_prefix::<T>(true)
    }

    /// Decode a fixed-size prefix of a variable-size payload.
    pub fn payload_prefix<T: ByteValued + VhostUserMsgValidator + Default>(
        &self,
        exact: bool,
    ) -> Result<T, VhostUserError> {
        let want = size_of::<T>();
        let body = self.body();
        if body.len() < want || (exact && body.len() != want) {
            return Err(VhostUserError::PayloadSize {
                request: self.request,
                expected: want,
                got: body.len(),
            });
        }
        let mut value = T::default();
        value.as_mut_slice().copy_from_slice(&body[..want]);
        if !value.is_valid() {
            return Err(VhostUserError::InvalidPayload(self.request));
        }
        Ok(value)
    }

    /// Take the single file descriptor the message must carry.
    pub fn take_one_file(&mut self) -> Option<File> {
        if self.files.len() == 1 {
            self.files.pop()
        } else {
            None
        }
    }
}

/// Reads requests and writes replies over one frontend connection.
pub struct Channel {
    sock: UnixStream,
    body: Option<Box<[u8; MAX_MSG_SIZE]>>,
}

impl Channel {
    pub fn new(sock: UnixStream) -> Self {
        Channel {
            sock,
            body: Some(Box::new([0u8; MAX_MSG_SIZE])),
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.sock
    }

    /// Give a message's body buffer back for reuse.
    pub fn recycle(&mut self, msg: Message) {
        self.body = Some(msg.body);
    }

    /// Read one message. `Ok(None)` means the frontend closed the connection
    /// cleanly between messages.
    pub fn recv(&mut self) -> Result<Option<Message>, VhostUserError> {
        let mut hdr = [0u8; HDR_SIZE];
        let mut fds = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: HDR_SIZE,
        }];
        // SAFETY: the iovec points at `hdr`, which lives for this call and
        // may receive arbitrary bytes; `fds` has room for MAX_FDS entries.
        let (n, nfds) = unsafe { self.sock.recv_with_fds(&mut iov, &mut fds) }
            .map_err(|e| VhostUserError::Socket(e.into()))?;
        // Own every received descriptor at once so none leaks on error paths.
        let files: Vec<File> = fds[..nfds.min(MAX_FDS)]
            .iter()
            .filter(|fd| **fd >= 0)
            // SAFETY: recvmsg installed these descriptors in our table and
            // nothing else owns them.
            .map(|fd| unsafe { File::from_raw_fd(*fd) })
            .collect();
        if n == 0 {
            return Ok(None);
        }
        if n < HDR_SIZE {
            self.sock
                .read_exact(&mut hdr[n..])
                .map_err(VhostUserError::Truncated)?;
        }
        let request = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let flags = u32::from_ne_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        let size = u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        if flags & FLAG_VERSION_MASK != FLAG_VERSION_1 {
            return Err(VhostUserError::BadVersion(flags));
        }
        if flags & !0xf != 0 {
            return Err(VhostUserError::BadFlags(flags));
        }
        if size > MAX_MSG_SIZE {
            return Err(VhostUserError::Oversize { request, size });
        }
        let mut body = self
            .body
            .take()
            .unwrap_or_else(|| Box::new([0u8; MAX_MSG_SIZE]));
        if size > 0 {
            if let Err(e) = self.sock.read_exact(&mut body[..size]) {
                self.body = Some(body);
                return Err(VhostUserError::Truncated(e));
            }
        }
        Ok(Some(Message {
            request,
            flags,
            len: size,
            body,
            files,
        }))
    }

    /// Send a reply carrying `payload` for `request`.
    pub fn reply(&mut self, request: u32, payload: &[u8]) -> Result<(), VhostUserError> {
        let mut buf = [0u8; HDR_SIZE + MAX_MSG_SIZE];
        let len = payload.len().min(MAX_MSG_SIZE);
        buf[0..4].copy_from_slice(&request.to_ne_bytes());
        buf[4..8].copy_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_ne_bytes());
        buf[8..12].copy_from_slice(&(len as u32).to_ne_bytes());
        buf[HDR_SIZE..HDR_SIZE + len].copy_from_slice(&payload[..len]);
        self.sock
            .write_all(&buf[..HDR_SIZE + len])
            .map_err(VhostUserError::Socket)
    }

    pub fn reply_u64(&mut self, request: u32, value: u64) -> Result<(), VhostUserError> {
        self.reply(request, &value.to_ne_bytes())
    }
}

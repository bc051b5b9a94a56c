//! A TAP interface opened through `/dev/net/tun`: raw Ethernet frames, no
//! packet-information prefix, no virtio-net header, nonblocking.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::UplinkError;

const TUN_PATH: &str = "/dev/net/tun";

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags at the
/// start of the union (the rest is padding to the kernel's 40 bytes).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());

/// Whether `name` is a name we create interfaces under: 1 to 15 bytes of
/// `[A-Za-z0-9_.-]` (no `%d` templates, no path separators).
pub(crate) fn valid_name(name: &str) -> bool {
    (1..libc::IFNAMSIZ).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

pub(crate) struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Create the TAP interface `name` in the caller's network namespace.
    /// The interface lives as long as the returned fd (it is not
    /// persistent) and starts down.
    pub fn create(name: &str) -> Result<Tap, UplinkError> {
        if !valid_name(name) {
            return Err(UplinkError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => UplinkError::TunMissing(e),
                Some(libc::EPERM | libc::EACCES) => UplinkError::NotPermitted(name.to_string()),
                _ => UplinkError::Open(e),
            })?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            // IFF_TUN_EXCL: fail instead of attaching to an existing TAP of
            // the same name, which we would not own.
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_TUN_EXCL) as libc::c_short,
            _pad: [0; 22],
        };
        // The name is checked above: at most 15 ASCII bytes, so the last
        // byte stays NUL.
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: `file` is an open /dev/net/tun fd; TUNSETIFF reads and
        // writes one `struct ifreq`, and `req` is a live, exclusively
        // borrowed value of exactly that size and layout (checked by the
        // const assertion above) with a NUL-terminated name.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => UplinkError::NotPermitted(name.to_string()),
                Some(libc::EBUSY | libc::EEXIST) => UplinkError::NameInUse(name.to_string()),
                _ => UplinkError::Create(name.to_string(), e),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Read one frame; `WouldBlock` when none is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Write one frame; a TAP takes it whole or not at all.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn interface_names() {
        for ok in ["eup1", "enilab-up-12345", "a.b_c-d", "x"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "sixteen-chars-xx",
            "tap%d",
            "a/b",
            "a b",
            ".",
            "..",
            "é",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}

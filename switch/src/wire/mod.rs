//! Checked wire-format helpers, one file per protocol (after smoltcp's
//! `wire` module).
//!
//! Each protocol has a `Packet<T: AsRef<[u8]>>` view built only through
//! `new_checked`, which validates every length the accessors rely on. The
//! promise: once `new_checked` returned `Ok`, no accessor or setter panics,
//! whatever the bytes. Setters exist only when `T: AsMut<[u8]>`. Writers
//! (`emit` functions) take an output slice and fail with
//! [`WireError::Truncated`] instead of panicking when it is too short.

pub mod arp;
pub mod checksum;
pub mod dhcp;
pub mod ethernet;
pub mod icmpv4;
pub mod ipv4;
pub mod udp;

/// Why bytes could not be read as a protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer is shorter than the header or than a length field says.
    #[error("the buffer is too short")]
    Truncated,
    /// A field holds a value the format forbids.
    #[error("a header field is invalid")]
    Malformed,
    /// A valid header of a variant this crate does not handle.
    #[error("the header is of an unsupported kind")]
    Unsupported,
}

/// Result of a wire operation.
pub type Result<T> = core::result::Result<T, WireError>;

/// Big-endian u16 at `at`; the caller has checked `at + 2 <= b.len()`.
#[inline]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Big-endian u32 at `at`; the caller has checked `at + 4 <= b.len()`.
#[inline]
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Six bytes at `at`; the caller has checked `at + 6 <= b.len()`.
#[inline]
pub(crate) fn mac_at(b: &[u8], at: usize) -> [u8; 6] {
    [b[at], b[at + 1], b[at + 2], b[at + 3], b[at + 4], b[at + 5]]
}

/// Copy `src` into `out[at..]`, failing if it does not fit.
#[inline]
pub(crate) fn put(out: &mut [u8], at: usize, src: &[u8]) -> Result<()> {
    let end = at.checked_add(src.len()).ok_or(WireError::Truncated)?;
    out.get_mut(at..end)
        .ok_or(WireError::Truncated)?
        .copy_from_slice(src);
    Ok(())
}

//! The Internet checksum (RFC 1071).

use std::net::Ipv4Addr;

/// One's-complement sum of `data` as big-endian 16-bit words, an odd last
/// byte padded with zero. Not folded.
pub fn sum(data: &[u8]) -> u32 {
    let mut acc: u64 = 0;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    fold64(acc)
}

fn fold64(mut acc: u64) -> u32 {
    while acc > 0xffff_ffff {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    acc as u32
}

/// Add two unfolded sums.
pub fn combine(a: u32, b: u32) -> u32 {
    fold64(u64::from(a) + u64::from(b))
}

/// Fold to 16 bits and complement: the value to store in a header.
pub fn finish(acc: u32) -> u16 {
    let mut acc = acc;
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Sum of the IPv4 pseudo-header for TCP/UDP.
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    let words = [
        u16::from_be_bytes([s[0], s[1]]),
        u16::from_be_bytes([s[2], s[3]]),
        u16::from_be_bytes([d[0], d[1]]),
        u16::from_be_bytes([d[2], d[3]]),
        u16::from(protocol),
        length,
    ];
    words.iter().map(|w| u32::from(*w)).sum()
}

/// RFC 1624 incremental update of a stored (complemented) checksum when one
/// 32-bit word it covers changes from `old` to `new`:
/// `HC' = ~(~HC + ~m + m')`.
pub fn adjust(check: u16, old: Ipv4Addr, new: Ipv4Addr) -> u16 {
    let (o, n) = (u32::from(old), u32::from(new));
    let acc = u32::from(!check)
        + u32::from(!(o >> 16) as u16)
        + u32::from(!(o as u16))
        + (n >> 16)
        + (n & 0xffff);
    finish(acc)
}

/// The same update for a field that holds an uncomplemented partial sum,
/// as a virtio `NEEDS_CSUM` frame's L4 field holds the pseudo-header sum.
pub fn adjust_partial(partial: u16, old: Ipv4Addr, new: Ipv4Addr) -> u16 {
    !adjust(!partial, old, new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(finish(sum(&data)), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // A captured header whose stored checksum is 0xb861.
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(finish(sum(&hdr)), 0, "a valid header sums to zero");
        hdr[10] = 0;
        hdr[11] = 0;
        assert_eq!(finish(sum(&hdr)), 0xb861);
    }

    #[test]
    fn odd_length_and_combine() {
        assert_eq!(sum(&[0xab]), 0xab00);
        assert_eq!(sum(&[]), 0);
        let data = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        assert_eq!(
            finish(combine(sum(&data[..4]), sum(&data[4..]))),
            finish(sum(&data))
        );
        let big = vec![0xffu8; 70_000];
        assert_eq!(finish(sum(&big)), 0);
    }

    #[test]
    fn incremental_update_matches_recompute() {
        // A UDP datagram's checksum, rewritten from one source to another,
        // equals the checksum computed from scratch.
        let payload = b"incremental checksum";
        let full = |src: Ipv4Addr| {
            let dst = Ipv4Addr::new(203, 0, 113, 1);
            let len = 8 + payload.len() as u16;
            let mut hdr = [0u8; 8];
            hdr[0..2].copy_from_slice(&4000u16.to_be_bytes());
            hdr[2..4].copy_from_slice(&53u16.to_be_bytes());
            hdr[4..6].copy_from_slice(&len.to_be_bytes());
            let acc = combine(
                pseudo_header(src, dst, 17, len),
                combine(sum(&hdr), sum(payload)),
            );
            (finish(acc), combine(pseudo_header(src, dst, 17, len), 0))
        };
        let (a, b) = (Ipv4Addr::new(10, 0, 1, 10), Ipv4Addr::new(203, 0, 113, 10));
        let (ca, pa) = full(a);
        let (cb, pb) = full(b);
        assert_eq!(adjust(ca, a, b), cb);
        assert_eq!(adjust(cb, b, a), ca);
        let fold = |x: u32| !finish(x);
        assert_eq!(adjust_partial(fold(pa), a, b), fold(pb));
    }
}

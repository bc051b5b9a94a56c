//! A small bounds-checked parser for the frames the hyperplane handles
//! (Ethernet, IPv4, TCP, UDP, ICMP echo), in-place rewriting with
//! incremental checksums (RFC 1624), and builders for the TCP segments the
//! hyperplane originates (RST, health-check SYN). Once [`parse`] returned
//! `Ok`, every offset it reports lies inside the frame.

use crate::stats::DropReason;

pub const ETH_LEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// What the hyperplane needs from a frame. For ICMP echo the identifier
/// plays the port: a request has `sport = id, dport = 0`, a reply
/// `sport = 0, dport = id`, so a reply's key is the request's reversed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    /// Offset of the L4 header.
    pub l4: usize,
    /// End of the IP datagram (the frame may carry padding after it).
    pub end: usize,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// For an ICMP error (unreachable, time exceeded, parameter problem):
    /// the quoted datagram's header, whose bytes lie inside the frame.
    pub inner: Option<Inner>,
}

/// The datagram quoted by an ICMP error, with the same port conventions as
/// [`Parsed`] (an echo request quotes `sport = id`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inner {
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    /// Offsets of the quoted IP and L4 headers.
    pub ip: usize,
    pub l4: usize,
}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Parses an Ethernet/IPv4 frame; every length is checked before use.
#[inline]
pub fn parse(f: &[u8]) -> Result<Parsed, DropReason> {
    if f.len() < ETH_LEN + 20 {
        return Err(if f.len() >= ETH_LEN && be16(f, 12) != ETHERTYPE_IPV4 {
            DropReason::NotIpv4
        } else {
            DropReason::Malformed
        });
    }
    if be16(f, 12) != ETHERTYPE_IPV4 {
        return Err(DropReason::NotIpv4);
    }
    let ip = ETH_LEN;
    let vihl = f[ip];
    if vihl >> 4 != 4 {
        return Err(DropReason::NotIpv4);
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    let total = usize::from(be16(f, ip + 2));
    if ihl < 20 || total < ihl || ip + total > f.len() {
        return Err(DropReason::Malformed);
    }
    let frag = be16(f, ip + 6);
    if frag & 0x1fff != 0 {
        return Err(DropReason::Fragment);
    }
    let proto = f[ip + 9];
    let src = be32(f, ip + 12);
    let dst = be32(f, ip + 16);
    let l4 = ip + ihl;
    let end = ip + total;
    let l4len = end - l4;
    let mut p = Parsed {
        proto,
        src,
        dst,
        l4,
        end,
        ..Parsed::default()
    };
    match proto {
        PROTO_TCP => {
            if l4len < 20 || usize::from(f[l4 + 12] >> 4) * 4 < 20 {
                return Err(DropReason::Malformed);
            }
            p.sport = be16(f, l4);
            p.dport = be16(f, l4 + 2);
            p.seq = be32(f, l4 + 4);
            p.ack = be32(f, l4 + 8);
            p.tcp_flags = f[l4 + 13];
        }
        PROTO_UDP => {
            if l4len < 8 {
                return Err(DropReason::Malformed);
            }
            p.sport = be16(f, l4);
            p.dport = be16(f, l4 + 2);
        }
        PROTO_ICMP => {
            if l4len < 8 {
                return Err(DropReason::Malformed);
            }
            let id = be16(f, l4 + 4);
            match f[l4] {
                ICMP_ECHO_REQUEST => p.sport = id,
                ICMP_ECHO_REPLY => p.dport = id,
                ICMP_UNREACHABLE | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => {
                    p.inner = Some(parse_inner(f, l4 + 8, end)?)
                }
                _ => return Err(DropReason::Unsupported),
            }
        }
        _ => return Err(DropReason::Unsupported),
    }
    Ok(p)
}

/// The datagram quoted in an ICMP error from `at` to `end`: its IP header
/// and the first 8 bytes of its L4 header must be present (RFC 792).
fn parse_inner(f: &[u8], at: usize, end: usize) -> Result<Inner, DropReason> {
    if at + 20 > end || f[at] >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let ihl = usize::from(f[at] & 0x0f) * 4;
    let l4 = at + ihl;
    if ihl < 20 || l4 + 8 > end {
        return Err(DropReason::Malformed);
    }
    let mut i = Inner {
        proto: f[at + 9],
        src: be32(f, at + 12),
        dst: be32(f, at + 16),
        ip: at,
        l4,
        ..Inner::default()
    };
    match i.proto {
        PROTO_TCP | PROTO_UDP => {
            i.sport = be16(f, l4);
            i.dport = be16(f, l4 + 2);
        }
        PROTO_ICMP if f[l4] == ICMP_ECHO_REQUEST => i.sport = be16(f, l4 + 4),
        _ => return Err(DropReason::Unsupported),
    }
    Ok(i)
}

/// Writes a 16-bit word inside an ICMP message and keeps the ICMP checksum at `ck` right.
fn change16(f: &mut [u8], at: usize, new: u16, ck: usize) -> u16 {
    let old = be16(f, at);
    put16(f, at, new);
    let c = be16(f, ck);
    put16(f, ck, csum_update16(c, old, new));
    old
}

/// Translates an inbound ICMP error about a NAT flow: the outer destination
/// becomes `ip`, the quoted datagram's source becomes `ip:port`; the outer IP,
/// ICMP, quoted IP and quoted L4 checksums (when quoted) are fixed incrementally.
pub fn rewrite_icmp_error(f: &mut [u8], p: &Parsed, ip: u32, port: u16) {
    let Some(i) = p.inner else { return };
    put32(f, ETH_LEN + 16, ip);
    let c = be16(f, ETH_LEN + 10);
    put16(f, ETH_LEN + 10, csum_update32(c, p.dst, ip));
    let ck = p.l4 + 2;
    change16(f, i.ip + 12, (ip >> 16) as u16, ck);
    change16(f, i.ip + 14, ip as u16, ck);
    let ipc = be16(f, i.ip + 10);
    change16(f, i.ip + 10, csum_update32(ipc, i.src, ip), ck);
    match i.proto {
        PROTO_ICMP => {
            let old = change16(f, i.l4 + 4, port, ck);
            let c = be16(f, i.l4 + 2);
            change16(f, i.l4 + 2, csum_update16(c, old, port), ck);
        }
        proto => {
            let old = change16(f, i.l4, port, ck);
            let at = if proto == PROTO_TCP {
                i.l4 + 16
            } else {
                i.l4 + 6
            };
            // The quoted L4 checksum is only there if the quote is long enough.
            if at + 2 <= p.end {
                let c = be16(f, at);
                if proto == PROTO_UDP && c == 0 {
                    return;
                }
                let mut n = csum_update16(csum_update32(c, i.src, ip), old, port);
                if proto == PROTO_UDP && n == 0 {
                    n = 0xffff;
                }
                change16(f, at, n, ck);
            }
        }
    }
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word changed.
#[inline]
pub fn csum_update16(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline]
pub fn csum_update32(check: u16, old: u32, new: u32) -> u16 {
    let c = csum_update16(check, (old >> 16) as u16, (new >> 16) as u16);
    csum_update16(c, old as u16, new as u16)
}

/// Internet checksum of `data` plus a starting partial sum.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Offset of the L4 checksum field, or None when the protocol has none to fix.
fn l4_check_at(p: &Parsed) -> usize {
    match p.proto {
        PROTO_TCP => p.l4 + 16,
        PROTO_UDP => p.l4 + 6,
        _ => p.l4 + 2,
    }
}

/// Rewrites the source (`src == true`) or destination address and port of a
/// parsed frame in place, fixing the IP and L4 checksums incrementally. For
/// ICMP echo the "port" is the identifier. `f` must be the frame `p` came from.
#[inline]
pub fn rewrite(f: &mut [u8], p: &Parsed, src: bool, ip: u32, port: u16) {
    let (ip_at, old_ip) = if src {
        (ETH_LEN + 12, p.src)
    } else {
        (ETH_LEN + 16, p.dst)
    };
    put32(f, ip_at, ip);
    let ipc = be16(f, ETH_LEN + 10);
    put16(f, ETH_LEN + 10, csum_update32(ipc, old_ip, ip));
    let ck = l4_check_at(p);
    let mut l4c = be16(f, ck);
    let udp_none = p.proto == PROTO_UDP && l4c == 0;
    if p.proto != PROTO_ICMP {
        // TCP and UDP checksums cover the pseudo header's addresses.
        l4c = csum_update32(l4c, old_ip, ip);
    }
    let port_at = match p.proto {
        PROTO_ICMP => p.l4 + 4,
        _ if src => p.l4,
        _ => p.l4 + 2,
    };
    let old_port = be16(f, port_at);
    put16(f, port_at, port);
    l4c = csum_update16(l4c, old_port, port);
    if udp_none {
        return;
    }
    if p.proto == PROTO_UDP && l4c == 0 {
        l4c = 0xffff;
    }
    put16(f, ck, l4c);
}

/// Sets the Ethernet addresses of a frame.
#[inline]
pub fn set_macs(f: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
}

/// A TCP segment the hyperplane originates.
#[derive(Clone, Copy, Debug)]
pub struct TcpSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
}

/// Writes a 54-byte Ethernet/IPv4/TCP frame without payload into `out`.
pub fn build_tcp(out: &mut Vec<u8>, s: &TcpSpec) {
    out.clear();
    out.resize(ETH_LEN + 40, 0);
    set_macs(out, s.dst_mac, s.src_mac);
    put16(out, 12, ETHERTYPE_IPV4);
    let ip = ETH_LEN;
    out[ip] = 0x45;
    put16(out, ip + 2, 40);
    put16(out, ip + 6, 0x4000); // DF
    out[ip + 8] = 64;
    out[ip + 9] = PROTO_TCP;
    put32(out, ip + 12, s.src);
    put32(out, ip + 16, s.dst);
    let c = checksum(&out[ip..ip + 20], 0);
    put16(out, ip + 10, c);
    let t = ip + 20;
    put16(out, t, s.sport);
    put16(out, t + 2, s.dport);
    put32(out, t + 4, s.seq);
    put32(out, t + 8, s.ack);
    out[t + 12] = 5 << 4;
    out[t + 13] = s.flags;
    put16(out, t + 14, if s.flags & TCP_RST != 0 { 0 } else { 64240 });
    let pseudo = (s.src >> 16)
        + (s.src & 0xffff)
        + (s.dst >> 16)
        + (s.dst & 0xffff)
        + u32::from(PROTO_TCP)
        + 20;
    let c = checksum(&out[t..t + 20], pseudo);
    put16(out, t + 16, c);
}

/// The RST answering a TCP segment `p` (RFC 9293 §3.10.7.1): if it carried an
/// ACK, the RST takes its sequence number from that ACK; otherwise it
/// acknowledges the segment.
pub fn rst_for(p: &Parsed, f: &[u8]) -> (u32, u32, u8) {
    if p.tcp_flags & TCP_ACK != 0 {
        (p.ack, 0, TCP_RST)
    } else {
        let hdr = usize::from(f[p.l4 + 12] >> 4) * 4;
        let payload = (p.end - p.l4).saturating_sub(hdr) as u32;
        let syn_fin = u32::from(p.tcp_flags & (TCP_SYN | TCP_FIN) != 0);
        (
            0,
            p.seq.wrapping_add(payload).wrapping_add(syn_fin),
            TCP_RST | TCP_ACK,
        )
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// Builds an Ethernet/IPv4 frame for tests (TCP, UDP or ICMP echo) with
    /// correct checksums and `payload` bytes of payload.
    #[allow(clippy::too_many_arguments)]
    pub fn frame(
        proto: u8,
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        flags: u8,
        payload: usize,
    ) -> Vec<u8> {
        let l4len = match proto {
            PROTO_TCP => 20,
            _ => 8,
        } + payload;
        let total = 20 + l4len;
        let mut f = vec![0u8; ETH_LEN + total];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 0xaa]);
        f[6..12].copy_from_slice(&crate::wire::testutil::GW);
        put16(&mut f, 12, ETHERTYPE_IPV4);
        f[14] = 0x45;
        put16(&mut f, 16, total as u16);
        f[22] = 64;
        f[23] = proto;
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&dst);
        let c = checksum(&f[14..34], 0);
        put16(&mut f, 24, c);
        let t = 34;
        for (i, b) in f[t + l4len - payload..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let s = u32::from_be_bytes(src);
        let d = u32::from_be_bytes(dst);
        let pseudo =
            (s >> 16) + (s & 0xffff) + (d >> 16) + (d & 0xffff) + u32::from(proto) + l4len as u32;
        match proto {
            PROTO_TCP => {
                put16(&mut f, t, sport);
                put16(&mut f, t + 2, dport);
                put32(&mut f, t + 4, 1000);
                put32(&mut f, t + 8, if flags & TCP_ACK != 0 { 5000 } else { 0 });
                f[t + 12] = 5 << 4;
                f[t + 13] = flags;
                put16(&mut f, t + 14, 1000);
                let c = checksum(&f[t..], pseudo);
                put16(&mut f, t + 16, c);
            }
            PROTO_UDP => {
                put16(&mut f, t, sport);
                put16(&mut f, t + 2, dport);
                put16(&mut f, t + 4, l4len as u16);
                let c = checksum(&f[t..], pseudo);
                put16(&mut f, t + 6, if c == 0 { 0xffff } else { c });
            }
            _ => {
                // ICMP echo: sport != 0 means request with id = sport.
                f[t] = if sport != 0 {
                    ICMP_ECHO_REQUEST
                } else {
                    ICMP_ECHO_REPLY
                };
                put16(&mut f, t + 4, if sport != 0 { sport } else { dport });
                put16(&mut f, t + 6, 1);
                let c = checksum(&f[t..], 0);
                put16(&mut f, t + 2, c);
            }
        }
        f
    }

    pub const GW: [u8; 6] = [0x02, 0xe1, 0x1a, 0x00, 0x00, 0x01];

    /// True when the IP and L4 checksums of `f` verify.
    pub fn checksums_ok(f: &[u8]) -> bool {
        let Ok(p) = parse(f) else { return false };
        if checksum(&f[14..p.l4], 0) != 0 {
            return false;
        }
        let l4 = &f[p.l4..p.end];
        let pseudo = (p.src >> 16)
            + (p.src & 0xffff)
            + (p.dst >> 16)
            + (p.dst & 0xffff)
            + u32::from(p.proto)
            + l4.len() as u32;
        match p.proto {
            PROTO_ICMP => checksum(l4, 0) == 0,
            _ => checksum(l4, pseudo) == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn rewrite_keeps_checksums_valid() {
        for proto in [PROTO_TCP, PROTO_UDP, PROTO_ICMP] {
            for src in [true, false] {
                let mut f = frame(
                    proto,
                    [10, 0, 1, 5],
                    40000,
                    [8, 8, 8, 8],
                    if proto == PROTO_ICMP { 0 } else { 53 },
                    TCP_SYN,
                    7,
                );
                assert!(checksums_ok(&f));
                let p = parse(&f).unwrap();
                rewrite(&mut f, &p, src, 0x0a00_00fe, 12345);
                assert!(checksums_ok(&f), "proto {proto} src {src}");
                let q = parse(&f).unwrap();
                if src {
                    assert_eq!(q.src, 0x0a00_00fe);
                } else {
                    assert_eq!(q.dst, 0x0a00_00fe);
                }
            }
        }
    }

    #[test]
    fn built_rst_verifies() {
        let mut out = Vec::new();
        build_tcp(
            &mut out,
            &TcpSpec {
                src_mac: [2; 6],
                dst_mac: GW,
                src: 1,
                dst: 2,
                sport: 3,
                dport: 4,
                seq: 5,
                ack: 6,
                flags: TCP_RST | TCP_ACK,
            },
        );
        assert!(checksums_ok(&out));
        assert_eq!(parse(&out).unwrap().tcp_flags, TCP_RST | TCP_ACK);
    }

    #[test]
    fn parse_rejects_by_reason() {
        let good = frame(PROTO_TCP, [1, 1, 1, 1], 1, [2, 2, 2, 2], 2, TCP_SYN, 0);
        let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
            ("short", good[..20].to_vec(), DropReason::Malformed),
            (
                "arp",
                {
                    let mut f = good.clone();
                    f[12] = 0x08;
                    f[13] = 0x06;
                    f
                },
                DropReason::NotIpv4,
            ),
            (
                "ipv6 version",
                {
                    let mut f = good.clone();
                    f[14] = 0x65;
                    f
                },
                DropReason::NotIpv4,
            ),
            (
                "ihl too small",
                {
                    let mut f = good.clone();
                    f[14] = 0x44;
                    f
                },
                DropReason::Malformed,
            ),
            (
                "total too long",
                {
                    let mut f = good.clone();
                    f[16] = 0xff;
                    f
                },
                DropReason::Malformed,
            ),
            (
                "fragment",
                {
                    let mut f = good.clone();
                    f[21] = 8;
                    f
                },
                DropReason::Fragment,
            ),
            (
                "gre",
                {
                    let mut f = good.clone();
                    f[23] = 47;
                    f
                },
                DropReason::Unsupported,
            ),
            (
                "tcp truncated",
                {
                    let mut f = good.clone();
                    f[16] = 0;
                    f[17] = 30;
                    f
                },
                DropReason::Malformed,
            ),
        ];
        for (name, f, want) in cases {
            assert_eq!(parse(&f), Err(want), "{name}");
        }
        assert!(parse(&good).is_ok());
    }
}

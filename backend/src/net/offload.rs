//! Software fallbacks for offloads a receiving guest did not negotiate:
//! completing a partial checksum, and segmenting a TCP super-packet.

use enilab_switch::wire::checksum::{combine, finish, sum};
use enilab_switch::{CsumOffload, GsoKind, GsoOffload};

/// Why a frame could not be finished in software.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("checksum offsets fall outside the frame")]
    CsumRange,
    #[error("frame headers do not parse as TCP over IP")]
    NotTcp,
    #[error("segment does not fit the scratch buffer")]
    TooBig,
}

/// Finish a partial checksum: the field holds the pseudo-header sum, and
/// the sum of `frame[start..]` goes into it.
pub fn complete_csum(frame: &mut [u8], c: CsumOffload) -> Result<(), OffloadError> {
    let start = usize::from(c.start);
    let at = start + usize::from(c.offset);
    if at + 2 > frame.len() || start > frame.len() {
        return Err(OffloadError::CsumRange);
    }
    let sum = finish(sum(&frame[start..]));
    // A computed zero UDP checksum is sent as 0xffff; harmless for TCP.
    let sum = if sum == 0 { 0xffff } else { sum };
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

struct Layout {
    l3: usize,
    l4: usize,
    payload: usize,
    v4: bool,
}

fn layout(frame: &[u8]) -> Result<Layout, OffloadError> {
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes([
        *frame.get(12).ok_or(OffloadError::NotTcp)?,
        *frame.get(13).ok_or(OffloadError::NotTcp)?,
    ]);
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([
            *frame.get(16).ok_or(OffloadError::NotTcp)?,
            *frame.get(17).ok_or(OffloadError::NotTcp)?,
        ]);
        l3 = 18;
    }
    let (l4, v4) = match ethertype {
        0x0800 => {
            let vihl = *frame.get(l3).ok_or(OffloadError::NotTcp)?;
            let ihl = usize::from(vihl & 0xf) * 4;
            if vihl >> 4 != 4 || ihl < 20 || frame.get(l3 + 9) != Some(&6) {
                return Err(OffloadError::NotTcp);
            }
            (l3 + ihl, true)
        }
        0x86dd => {
            if frame.get(l3 + 6) != Some(&6) {
                return Err(OffloadError::NotTcp);
            }
            (l3 + 40, false)
        }
        _ => return Err(OffloadError::NotTcp),
    };
    let doff = usize::from(*frame.get(l4 + 12).ok_or(OffloadError::NotTcp)? >> 4) * 4;
    if doff < 20 || l4 + doff > frame.len() {
        return Err(OffloadError::NotTcp);
    }
    Ok(Layout {
        l3,
        l4,
        payload: l4 + doff,
        v4,
    })
}

/// Split a TCP super-packet into MSS-sized frames with complete checksums,
/// writing each into `scratch` and handing it to `out`.
pub fn segment(
    frame: &[u8],
    gso: &GsoOffload,
    scratch: &mut Vec<u8>,
    mut out: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    if !matches!(gso.kind, GsoKind::Tcpv4 | GsoKind::Tcpv6) {
        return Err(OffloadError::NotTcp);
    }
    let l = layout(frame)?;
    let mss = usize::from(gso.size.max(1));
    let payload = &frame[l.payload..];
    let hdr = &frame[..l.payload];
    let seq0 = u32::from_be_bytes([
        frame[l.l4 + 4],
        frame[l.l4 + 5],
        frame[l.l4 + 6],
        frame[l.l4 + 7],
    ]);
    let flags0 = frame[l.l4 + 13];
    let id0 = if l.v4 {
        u16::from_be_bytes([frame[l.l3 + 4], frame[l.l3 + 5]])
    } else {
        0
    };
    let count = payload.len().div_ceil(mss).max(1);
    for i in 0..count {
        let start = i * mss;
        let end = (start + mss).min(payload.len());
        let chunk = &payload[start..end];
        scratch.clear();
        scratch.extend_from_slice(hdr);
        scratch.extend_from_slice(chunk);
        let s = scratch.as_mut_slice();
        let l4_len = s.len() - l.l4;
        if l.v4 {
            let total = (s.len() - l.l3) as u16;
            s[l.l3 + 2..l.l3 + 4].copy_from_slice(&total.to_be_bytes());
            s[l.l3 + 4..l.l3 + 6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            s[l.l3 + 10] = 0;
            s[l.l3 + 11] = 0;
            let c = finish(sum(&s[l.l3..l.l4]));
            s[l.l3 + 10..l.l3 + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            let plen = l4_len as u16;
            s[l.l3 + 4..l.l3 + 6].copy_from_slice(&plen.to_be_bytes());
        }
        let seq = seq0.wrapping_add(start as u32);
        s[l.l4 + 4..l.l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i + 1 != count {
            flags &= !(0x01 | 0x08); // FIN, PSH only on the last segment
        }
        if i != 0 {
            flags &= !0x80; // CWR only on the first
        }
        s[l.l4 + 13] = flags;
        s[l.l4 + 16] = 0;
        s[l.l4 + 17] = 0;
        let addrs = if l.v4 {
            &s[l.l3 + 12..l.l3 + 20]
        } else {
            &s[l.l3 + 8..l.l3 + 40]
        };
        let pseudo = combine(sum(addrs), 6 + l4_len as u32);
        let c = finish(combine(pseudo, sum(&s[l.l4..])));
        s[l.l4 + 16..l.l4 + 18].copy_from_slice(&c.to_be_bytes());
        out(s);
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn tcp_frame(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 1, 4], [10, 0, 1, 5], 64)
            .tcp(40000, 5201, 1000, 64000)
            .psh()
            .ack(1);
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    #[test]
    fn segments_have_valid_checksums_and_sequence() {
        let payload: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        let frame = tcp_frame(&payload);
        let gso = GsoOffload {
            kind: GsoKind::Tcpv4,
            size: 1448,
            hdr_len: 54,
            ecn: false,
        };
        let mut scratch = Vec::new();
        let mut got = Vec::new();
        let n = segment(&frame, &gso, &mut scratch, |s| got.push(s.to_vec())).unwrap();
        assert_eq!(n, 3);
        let mut joined = Vec::new();
        for (i, s) in got.iter().enumerate() {
            let p = SlicedPacket::from_ethernet(s).unwrap();
            let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
                panic!()
            };
            let Some(TransportSlice::Tcp(tcp)) = &p.transport else {
                panic!()
            };
            assert_eq!(tcp.sequence_number(), 1000 + (i as u32) * 1448);
            assert_eq!(tcp.psh(), i == 2);
            let expect = tcp
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), expect);
            assert_eq!(
                ip.header().to_header().calc_header_checksum(),
                ip.header().header_checksum()
            );
            joined.extend_from_slice(tcp.payload());
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn completes_partial_checksum() {
        let frame = tcp_frame(b"hello world");
        let mut partial = frame.clone();
        // Replace the full checksum by the pseudo-header sum, as a guest does.
        let l4 = 34;
        let pseudo = combine(sum(&partial[26..34]), 6 + (partial.len() - l4) as u32);
        let ph = !finish(pseudo);
        partial[l4 + 16..l4 + 18].copy_from_slice(&ph.to_be_bytes());
        complete_csum(
            &mut partial,
            CsumOffload {
                start: 34,
                offset: 16,
            },
        )
        .unwrap();
        assert_eq!(partial, frame);
        assert_eq!(
            complete_csum(
                &mut partial,
                CsumOffload {
                    start: 60,
                    offset: 16
                }
            ),
            Err(OffloadError::CsumRange)
        );
    }

    #[test]
    fn garbage_never_panics() {
        let gso = GsoOffload {
            kind: GsoKind::Tcpv4,
            size: 100,
            hdr_len: 0,
            ecn: false,
        };
        let mut scratch = Vec::new();
        let frame = tcp_frame(&[1u8; 300]);
        for len in 0..frame.len() {
            let _ = segment(&frame[..len], &gso, &mut scratch, |_| {});
        }
    }
}

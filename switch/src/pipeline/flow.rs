//! The symmetric flow hash handed to [`Egress::emit`](crate::Egress::emit).

use std::net::Ipv4Addr;

use crate::wire::ipv4;

/// splitmix64's finaliser.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hash of a flow's 5-tuple that is the same in both directions:
/// `flow_hash(a, b, p, x, y) == flow_hash(b, a, p, y, x)`. The two
/// (address, port) endpoints are put in order before mixing, so the hash is
/// symmetric by construction and still depends on which port goes with
/// which address.
#[inline]
pub fn flow_hash(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, src_port: u16, dst_port: u16) -> u32 {
    let a = (u64::from(u32::from(src)) << 16) | u64::from(src_port);
    let b = (u64::from(u32::from(dst)) << 16) | u64::from(dst_port);
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let h = mix(lo ^ mix(hi ^ (u64::from(protocol) << 48)));
    (h ^ (h >> 32)) as u32
}

/// The flow hash of an IPv4 packet: 5-tuple for TCP and UDP, addresses and
/// protocol otherwise. Every fragment of a datagram hashes on addresses and
/// protocol only, so all of them take the same queue.
pub(crate) fn of_ipv4<T: AsRef<[u8]>>(ip: &ipv4::Packet<T>) -> u32 {
    let proto = ip.protocol();
    let ports = match proto {
        ipv4::protocol::TCP | ipv4::protocol::UDP if !ip.is_fragment() => match ip.payload() {
            [a, b, c, d, ..] => (u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d])),
            _ => (0, 0),
        },
        _ => (0, 0),
    };
    flow_hash(ip.src(), ip.dst(), proto, ports.0, ports.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn symmetric_for_random_tuples() {
        let mut s = 0x1234_5678_9abc_def0;
        for _ in 0..10_000 {
            let r = xorshift(&mut s);
            let a = Ipv4Addr::from(r as u32);
            let b = Ipv4Addr::from((r >> 32) as u32);
            let r2 = xorshift(&mut s);
            let (pa, pb, proto) = (r2 as u16, (r2 >> 16) as u16, (r2 >> 32) as u8);
            assert_eq!(
                flow_hash(a, b, proto, pa, pb),
                flow_hash(b, a, proto, pb, pa),
                "{a}:{pa} {b}:{pb} {proto}"
            );
        }
    }

    #[test]
    fn depends_on_every_field() {
        let a = Ipv4Addr::new(10, 0, 1, 10);
        let b = Ipv4Addr::new(10, 0, 1, 20);
        let base = flow_hash(a, b, 6, 40000, 80);
        let variants = [
            flow_hash(Ipv4Addr::new(10, 0, 1, 11), b, 6, 40000, 80),
            flow_hash(a, Ipv4Addr::new(10, 0, 1, 21), 6, 40000, 80),
            flow_hash(a, b, 17, 40000, 80),
            flow_hash(a, b, 6, 40001, 80),
            flow_hash(a, b, 6, 40000, 81),
            // Same addresses and ports, but the ports swapped between them.
            flow_hash(a, b, 6, 80, 40000),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, base, "variant {i}");
        }
    }

    #[test]
    fn spreads_over_queues() {
        // 4096 flows from one client to one server, differing only in the
        // client port, over 4 queues: each queue within 20% of its share.
        let mut buckets = [0u32; 4];
        let a = Ipv4Addr::new(10, 0, 1, 10);
        let b = Ipv4Addr::new(10, 0, 2, 30);
        for port in 0..4096u16 {
            buckets[(flow_hash(a, b, 6, 32768 + port, 443) % 4) as usize] += 1;
        }
        for n in buckets {
            assert!((820..=1230).contains(&n), "{buckets:?}");
        }
    }
}

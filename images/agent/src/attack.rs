//! A hostile guest, for the hardening tests (`enilab-agent attack KIND IF
//! SECONDS SRC_IP DST_IP`): writes crafted Ethernet frames on a raw socket
//! as fast as it can for a while and prints how many it sent. The switch
//! must contain every kind and count it; nothing here is clever, it only
//! has to be rude.
//!
//! Kinds:
//! - `spoof-mac`: UDP from SRC_IP with random source MACs;
//! - `spoof-ip`: UDP from random addresses (not SRC_IP) with our own MAC;
//! - `broadcast`: UDP to 255.255.255.255 and to the Ethernet broadcast;
//! - `arp-flood`: ARP requests for random addresses of SRC_IP's /24;
//! - `malformed`: truncated, lying and garbage IPv4 frames;
//! - `new-flows`: UDP to DST_IP from random ports (connection tracking);
//! - `to-addr`: UDP to DST_IP port 9 (another VPC, the host: unroutable).

use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// The switch's gateway MAC (`enilab_switch::GATEWAY_MAC`).
const GATEWAY_MAC: [u8; 6] = [0x02, 0xe1, 0x1a, 0x00, 0x00, 0x01];

struct Raw {
    fd: i32,
    ifindex: i32,
}

impl Raw {
    fn open(ifname: &str) -> io::Result<Raw> {
        let name = std::ffi::CString::new(ifname)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"))?;
        // SAFETY: `name` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket(2) call; the fd is owned by `Raw`.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Raw { fd, ifindex })
    }

    fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6.min(frame.len())]);
        // SAFETY: `frame` is valid for its length; `addr` is a properly
        // initialised sockaddr_ll of the size passed.
        let n = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                // Never block on a full queue: the attack must end on time
                // whatever the device does (a stalled queue then shows in
                // the test's own traffic checks instead).
                libc::MSG_DONTWAIT,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        n >= 0
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        // SAFETY: `fd` is ours and closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// xorshift64: cheap randomness, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn own_mac(ifname: &str) -> [u8; 6] {
    let s = std::fs::read_to_string(format!("/sys/class/net/{ifname}/address")).unwrap_or_default();
    let mut mac = [0u8; 6];
    for (i, p) in s.trim().split(':').take(6).enumerate() {
        mac[i] = u8::from_str_radix(p, 16).unwrap_or(0);
    }
    mac
}

fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An Ethernet + IPv4 + UDP frame (UDP checksum 0: allowed).
fn udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let payload = b"enilab hostile guest";
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = 20 + 8 + payload.len();
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

fn arp_request(mac: [u8; 6], src: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// Run attack `kind` for `secs`; returns frames sent.
pub fn run(kind: &str, ifname: &str, secs: u64, src: Ipv4Addr, dst: Ipv4Addr) -> io::Result<u64> {
    let raw = Raw::open(ifname)?;
    let mac = own_mac(ifname);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(u32::from(src)));
    let end = Instant::now() + Duration::from_secs(secs);
    let net = u32::from(src) & 0xffff_ff00;
    let mut sent = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            let r = rng.next();
            let frame = match kind {
                "spoof-mac" => {
                    let mut m = (r.to_be_bytes())[..6].try_into().unwrap_or([2; 6]);
                    m[0] = (m[0] & 0xfe) | 0x02;
                    udp(m, GATEWAY_MAC, src, dst, 4000, 9)
                }
                "spoof-ip" => {
                    let fake = Ipv4Addr::from(net | ((r as u32 & 0xff) | 1));
                    let fake = if fake == src {
                        Ipv4Addr::from(u32::from(src) ^ 1)
                    } else {
                        fake
                    };
                    udp(mac, GATEWAY_MAC, fake, dst, 4000, 9)
                }
                "broadcast" => {
                    if r & 1 == 0 {
                        udp(mac, [0xff; 6], src, Ipv4Addr::BROADCAST, 4000, 9)
                    } else {
                        udp(mac, GATEWAY_MAC, src, Ipv4Addr::BROADCAST, 4000, 9)
                    }
                }
                "arp-flood" => arp_request(mac, src, Ipv4Addr::from(net | (r as u32 & 0xff))),
                "malformed" => {
                    let mut f = udp(mac, GATEWAY_MAC, src, dst, 4000, 9);
                    match r % 4 {
                        0 => f.truncate(14 + (r as usize >> 8) % 20),
                        1 => f[14] = 0x4f, // header length beyond the packet
                        2 => f[16..18].copy_from_slice(&0xffffu16.to_be_bytes()),
                        _ => {
                            for b in f.iter_mut().skip(14) {
                                *b = rng.next() as u8;
                            }
                            f[14] = 0x45;
                        }
                    }
                    f
                }
                "new-flows" => udp(
                    mac,
                    GATEWAY_MAC,
                    src,
                    dst,
                    (r >> 16) as u16 | 1024,
                    r as u16 | 1,
                ),
                "to-addr" => udp(mac, GATEWAY_MAC, src, dst, 4000, 9),
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("unknown attack {other}"),
                    ))
                }
            };
            if raw.send(&frame) {
                sent += 1;
            }
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_well_formed_where_meant_to_be() {
        let f = udp(
            [2; 6],
            GATEWAY_MAC,
            Ipv4Addr::new(10, 0, 1, 5),
            Ipv4Addr::new(10, 0, 1, 6),
            1,
            2,
        );
        assert_eq!(f.len(), 14 + 20 + 8 + 20);
        assert_eq!(csum(&f[14..34]), 0, "IPv4 header checksum verifies");
        let a = arp_request(
            [2; 6],
            Ipv4Addr::new(10, 0, 1, 5),
            Ipv4Addr::new(10, 0, 1, 7),
        );
        assert_eq!(a.len(), 42);
        assert_eq!(&a[12..14], &[0x08, 0x06]);
    }
}

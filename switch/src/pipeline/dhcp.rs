//! A static-lease DHCP server on every subnet's .1: each port is offered
//! its primary private IP, with the .1 as router.

use std::io::Write;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;

use super::{flow, Ctx, Tx};
use crate::config::GATEWAY_MAC;
use crate::counters::DropReason;
use crate::wire::dhcp::{message_type, op, ClientOptions, ReplyRepr, FLAG_BROADCAST};
use crate::wire::{dhcp, ethernet, ipv4, udp, WireError};
use crate::{Egress, PacketMeta, Verdict};

/// Lease handed out, in seconds. The lease is static; clients renew it.
pub const LEASE_SECS: u32 = 3600;

/// Smallest MTU worth advertising (RFC 2132, option 26).
const MIN_MTU: u16 = 68;

/// Room for "ip-255-255-255-255".
const HOSTNAME_LEN: usize = 24;

const NAK_MESSAGE: &[u8] = b"address not assigned to this interface";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Offer,
    Ack,
    Nak,
    Inform,
}

/// Handle a UDP 68 -> 67 datagram (to 255.255.255.255 or to the .1).
pub(super) fn handle<E: Egress + ?Sized>(
    ctx: &Ctx<'_>,
    ip: &ipv4::Packet<&[u8]>,
    scratch: &mut [u8],
    tx: &mut Tx<'_, E>,
) -> Verdict {
    let Ok(dgram) = udp::Packet::new_checked(ip.payload()) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    let msg = match dhcp::Packet::new_checked(dgram.payload()) {
        Ok(m) => m,
        // Plain BOOTP (no magic cookie) is not served.
        Err(WireError::Unsupported) => return Verdict::Dropped(DropReason::Unsupported),
        Err(_) => return Verdict::Dropped(DropReason::Malformed),
    };
    if msg.op() != op::REQUEST {
        return Verdict::Dropped(DropReason::Malformed);
    }
    if msg.htype() != 1 || msg.hlen() != 6 {
        return Verdict::Dropped(DropReason::Unsupported);
    }
    let Ok(opts) = ClientOptions::parse(&msg) else {
        return Verdict::Dropped(DropReason::Malformed);
    };

    let gateway = ctx.subnet.gateway();
    let primary = ctx.port.primary_ip;
    let ciaddr = msg.ciaddr();
    let answer = match opts.message_type {
        Some(message_type::DISCOVER) => Answer::Offer,
        Some(message_type::REQUEST) => {
            if opts.server_id.is_some_and(|id| id != gateway) {
                // The client chose another server's offer.
                return Verdict::Dropped(DropReason::Broadcast);
            }
            let wanted = opts
                .requested_ip
                .or_else(|| (!ciaddr.is_unspecified()).then_some(ciaddr));
            if wanted == Some(primary) {
                Answer::Ack
            } else {
                Answer::Nak
            }
        }
        Some(message_type::INFORM) => Answer::Inform,
        Some(t @ (message_type::RELEASE | message_type::DECLINE)) => {
            // Leases are static: nothing to free, nothing to mark bad.
            tracing::debug!(
                port = ctx.ingress,
                message_type = t,
                "dhcp release/decline ignored"
            );
            return Verdict::Dropped(DropReason::Unsupported);
        }
        _ => return Verdict::Dropped(DropReason::Unsupported),
    };

    let chaddr = msg.chaddr();
    let client_mac = [
        chaddr[0], chaddr[1], chaddr[2], chaddr[3], chaddr[4], chaddr[5],
    ];
    let yiaddr = match answer {
        Answer::Offer | Answer::Ack => primary,
        Answer::Nak | Answer::Inform => Ipv4Addr::UNSPECIFIED,
    };
    // RFC 2131 4.1: NAKs are broadcast; then ciaddr; then the broadcast
    // bit; else unicast to the client's MAC and the offered address.
    let broadcast = (ethernet::BROADCAST, Ipv4Addr::BROADCAST);
    let (dst_mac, dst_ip) = match answer {
        Answer::Nak => broadcast,
        _ if !ciaddr.is_unspecified() => (client_mac, ciaddr),
        _ if msg.flags() & FLAG_BROADCAST != 0 || yiaddr.is_unspecified() => broadcast,
        _ => (client_mac, yiaddr),
    };

    let mut hostname = [0u8; HOSTNAME_LEN];
    let hostname_len = write_hostname(&mut hostname, primary);
    let full = answer != Answer::Nak;
    let repr = ReplyRepr {
        message_type: match answer {
            Answer::Offer => message_type::OFFER,
            Answer::Ack | Answer::Inform => message_type::ACK,
            Answer::Nak => message_type::NAK,
        },
        xid: msg.xid(),
        flags: msg.flags(),
        ciaddr: if answer == Answer::Offer || answer == Answer::Nak {
            Ipv4Addr::UNSPECIFIED
        } else {
            ciaddr
        },
        yiaddr,
        giaddr: msg.giaddr(),
        chaddr,
        server_id: gateway,
        lease_time: matches!(answer, Answer::Offer | Answer::Ack).then_some(LEASE_SECS),
        subnet_mask: full.then(|| ctx.subnet.netmask()),
        router: full.then_some(gateway),
        dns: full.then(|| ctx.subnet.dns_server()),
        mtu: (full && ctx.port.mtu >= MIN_MTU).then_some(ctx.port.mtu),
        broadcast: full.then(|| ctx.subnet.broadcast()),
        hostname: if full {
            hostname.get(..hostname_len)
        } else {
            None
        },
        message: (!full).then_some(NAK_MESSAGE),
    };

    let Ok(len) = write_reply(scratch, &repr, gateway, dst_mac, dst_ip) else {
        // Unreachable with SCRATCH_LEN >= 342; drop rather than panic.
        return Verdict::Dropped(DropReason::Unsupported);
    };
    let Some(frame) = scratch.get(..len) else {
        return Verdict::Dropped(DropReason::Unsupported);
    };
    let hash = flow::flow_hash(
        gateway,
        dst_ip,
        ipv4::protocol::UDP,
        dhcp::SERVER_PORT,
        dhcp::CLIENT_PORT,
    );
    if tx.send(ctx.ingress, hash, frame, &PacketMeta::default()) {
        if let Some(c) = ctx.counters(ctx.ingress) {
            c.dhcp_replies.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(port = ctx.ingress, ?answer, %yiaddr, "dhcp reply");
        Verdict::Replied
    } else {
        Verdict::Dropped(DropReason::QueueFull)
    }
}

/// "ip-a-b-c-d", as AWS names instances; returns the length written.
fn write_hostname(out: &mut [u8; HOSTNAME_LEN], ip: Ipv4Addr) -> usize {
    let [a, b, c, d] = ip.octets();
    let mut cursor: &mut [u8] = out;
    match write!(cursor, "ip-{a}-{b}-{c}-{d}") {
        Ok(()) => HOSTNAME_LEN - cursor.len(),
        Err(_) => 0,
    }
}

/// Ethernet + IPv4 + UDP + DHCP, from the router to the client.
fn write_reply(
    out: &mut [u8],
    repr: &ReplyRepr<'_>,
    gateway: Ipv4Addr,
    dst_mac: [u8; 6],
    dst_ip: Ipv4Addr,
) -> Result<usize, WireError> {
    const UDP_AT: usize = ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN;
    const DHCP_AT: usize = UDP_AT + udp::HEADER_LEN;
    let body = out.get_mut(DHCP_AT..).ok_or(WireError::Truncated)?;
    let n = repr.emit(body)?;
    let l4 = out.get_mut(UDP_AT..).ok_or(WireError::Truncated)?;
    udp::emit(
        l4,
        (gateway, dhcp::SERVER_PORT),
        (dst_ip, dhcp::CLIENT_PORT),
        n,
    )?;
    let l3 = out
        .get_mut(ethernet::HEADER_LEN..)
        .ok_or(WireError::Truncated)?;
    ipv4::Repr {
        src: gateway,
        dst: dst_ip,
        protocol: ipv4::protocol::UDP,
        payload_len: udp::HEADER_LEN + n,
        ttl: 64,
    }
    .emit(l3)?;
    ethernet::emit(out, dst_mac, GATEWAY_MAC, ethernet::ethertype::IPV4)?;
    Ok(DHCP_AT + n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        let mut buf = [0u8; HOSTNAME_LEN];
        for (ip, want) in [
            (Ipv4Addr::new(10, 0, 1, 10), "ip-10-0-1-10"),
            (Ipv4Addr::new(255, 255, 255, 255), "ip-255-255-255-255"),
            (Ipv4Addr::new(0, 0, 0, 0), "ip-0-0-0-0"),
        ] {
            let n = write_hostname(&mut buf, ip);
            assert_eq!(&buf[..n], want.as_bytes());
        }
    }
}

//! IPv4: unicast forwarding inside the VPC, and the .1 router's echo
//! replies. DHCP requests are passed on to [`super::dhcp`].

use std::net::Ipv4Addr;

use super::{dhcp, flow, Ctx, Tx};
use crate::config::GATEWAY_MAC;
use crate::counters::DropReason;
use crate::wire::{dhcp as dhcp_wire, ethernet, icmpv4, ipv4};
use crate::{Egress, PacketMeta, Verdict};

pub(super) fn handle<E: Egress + ?Sized>(
    ctx: &Ctx<'_>,
    frame: &mut [u8],
    meta: &PacketMeta,
    scratch: &mut [u8],
    tx: &mut Tx<'_, E>,
) -> Verdict {
    let Ok(eth) = ethernet::Frame::new_checked(&*frame) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    let eth_dst = eth.dst();
    let Ok(ip) = ipv4::Packet::new_checked(eth.payload()) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    let dst = ip.dst();
    let gateway = ctx.subnet.gateway();

    if ip.protocol() == ipv4::protocol::UDP
        && (dst == Ipv4Addr::BROADCAST || dst == gateway)
        && is_to_dhcp_server(ip.payload())
    {
        if ip.is_fragment() {
            return Verdict::Dropped(DropReason::Unsupported);
        }
        return dhcp::handle(ctx, &ip, scratch, tx);
    }

    if ethernet::is_group(&eth_dst)
        || dst.is_broadcast()
        || dst.is_multicast()
        || dst == ctx.subnet.broadcast()
    {
        return Verdict::Dropped(DropReason::Broadcast);
    }
    if dst == gateway {
        return router(ctx, frame, meta, tx);
    }

    let Some(dest) = ctx.snap.lookup(ctx.vpc, dst) else {
        return Verdict::Dropped(DropReason::NoRoute);
    };
    let Some(dest_port) = ctx.snap.port(dest) else {
        return Verdict::Dropped(DropReason::NoRoute);
    };
    if dest == ctx.ingress {
        return Verdict::Dropped(DropReason::NoRoute);
    }
    let hash = flow::of_ipv4(&ip);
    let routed = dest_port.subnet != ctx.port.subnet;

    let Ok(mut eth) = ethernet::Frame::new_checked(&mut *frame) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    eth.set_dst(dest_port.mac);
    if routed {
        eth.set_src(GATEWAY_MAC);
    }
    if tx.send(dest, hash, frame, meta) {
        Verdict::Forwarded(dest)
    } else {
        Verdict::Dropped(DropReason::QueueFull)
    }
}

/// UDP from port 68 to port 67, read without trusting the UDP length.
fn is_to_dhcp_server(l4: &[u8]) -> bool {
    let client = dhcp_wire::CLIENT_PORT.to_be_bytes();
    let server = dhcp_wire::SERVER_PORT.to_be_bytes();
    matches!(l4, [a, b, c, d, ..] if [*a, *b] == client && [*c, *d] == server)
}

/// A packet addressed to the subnet router itself: answer echo requests in
/// place (the request becomes the reply), drop the rest under `NoRoute`.
fn router<E: Egress + ?Sized>(
    ctx: &Ctx<'_>,
    frame: &mut [u8],
    meta: &PacketMeta,
    tx: &mut Tx<'_, E>,
) -> Verdict {
    if meta.gso.is_some() {
        return Verdict::Dropped(DropReason::NoRoute);
    }
    let Ok(mut eth) = ethernet::Frame::new_checked(&mut *frame) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    let client_mac = eth.src();
    let Ok(mut ip) = ipv4::Packet::new_checked(eth.payload_mut()) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    if ip.protocol() != ipv4::protocol::ICMP || ip.is_fragment() {
        return Verdict::Dropped(DropReason::NoRoute);
    }
    let client = ip.src();
    {
        let Ok(mut icmp) = icmpv4::Packet::new_checked(ip.payload_mut()) else {
            return Verdict::Dropped(DropReason::Malformed);
        };
        if icmp.msg_type() != icmpv4::msg_type::ECHO_REQUEST || icmp.code() != 0 {
            return Verdict::Dropped(DropReason::NoRoute);
        }
        icmp.set_msg_type(icmpv4::msg_type::ECHO_REPLY);
        icmp.fill_checksum();
    }
    let gateway = ctx.subnet.gateway();
    ip.set_src(gateway);
    ip.set_dst(client);
    ip.set_ttl(64);
    ip.fill_checksum();
    let len = ethernet::HEADER_LEN + ip.total_len();
    eth.set_dst(client_mac);
    eth.set_src(GATEWAY_MAC);

    let Some(reply) = frame.get(..len) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    let hash = flow::flow_hash(gateway, client, ipv4::protocol::ICMP, 0, 0);
    if tx.send(ctx.ingress, hash, reply, &PacketMeta::default()) {
        Verdict::Replied
    } else {
        Verdict::Dropped(DropReason::QueueFull)
    }
}

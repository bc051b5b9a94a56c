//! The instance metadata service path: guests' packets to [`IMDS_ADDR`]
//! leave on the metadata port with their source replaced by a client
//! address that names the port and address ([`crate::metadata`]); the
//! server's replies to a client address come back translated to the guest.
//!
//! No security groups, network ACLs, connection tracking or flow logs on
//! either way: AWS exempts link-local metadata traffic from all of them.
//! The translation is stateless, so nothing on this path can fill up.

use super::arp as arp_stage;
use super::ipv4::{forward, rewrite_address, Side};
use super::{flow, Ctx, Tx, Work};
use crate::config::{Snapshot, GATEWAY_MAC};
use crate::counters::DropReason;
use crate::metadata::{
    decode_metadata_client, metadata_client_addr, IMDS_ADDR, METADATA_GATEWAY, METADATA_MAC,
};
use crate::wire::{ethernet, icmpv4, ipv4};
use crate::{Egress, PacketMeta, Verdict};

/// A guest's packet to [`IMDS_ADDR`], after the ingress source check: sent
/// to the metadata server from the client address of (ingress port, index
/// of the source among the port's addresses).
pub(super) fn outbound<E: Egress + ?Sized>(
    ctx: &Ctx<'_>,
    frame: &mut [u8],
    meta: &PacketMeta,
    tx: &mut Tx<'_, E>,
) -> Verdict {
    let Some(md) = ctx.snap.metadata else {
        return Verdict::Dropped(DropReason::NoRoute);
    };
    let Ok(eth) = ethernet::Frame::new_checked(&*frame) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    let Ok(ip) = ipv4::Packet::new_checked(eth.payload()) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    if !is_carried(&ip) {
        // Nothing at the metadata address answers it, as at the router.
        return Verdict::Dropped(DropReason::NoRoute);
    }
    let src = ip.src();
    // Checked even with the source/destination check off: the client
    // address can only name one of the port's own addresses.
    let Some(index) = ctx.port.addresses().position(|a| a == src) else {
        // A delegated prefix's address is the port's, but has no index.
        let owned = ctx.snap.lookup(ctx.vpc, src) == Some(ctx.ingress);
        return Verdict::Dropped(if owned {
            DropReason::Unsupported
        } else {
            DropReason::SourceCheck
        });
    };
    let Some(client) = u8::try_from(index)
        .ok()
        .and_then(|i| metadata_client_addr(ctx.ingress, i))
    else {
        return Verdict::Dropped(DropReason::Unsupported);
    };
    let hash = flow::of_ipv4(&ip);
    if !rewrite_address(frame, meta, Side::Src, client) {
        return Verdict::Dropped(DropReason::Malformed);
    }
    forward(
        tx,
        md.port,
        hash,
        frame,
        meta,
        md.peer_mac,
        Some(METADATA_MAC),
    )
}

/// TCP, UDP and ICMP echo requests. A later fragment carries no ICMP
/// header to check; its first fragment was.
fn is_carried<T: AsRef<[u8]>>(ip: &ipv4::Packet<T>) -> bool {
    match ip.protocol() {
        ipv4::protocol::TCP | ipv4::protocol::UDP => true,
        ipv4::protocol::ICMP => {
            ip.is_later_fragment()
                || matches!(ip.payload(), [t, 0, ..] if *t == icmpv4::msg_type::ECHO_REQUEST)
        }
        _ => false,
    }
}

/// A frame from the metadata port: ARP for the addresses the namespace
/// routes through us, or the server's reply to a client address. Anything
/// else is dropped and counted on the metadata port.
pub(super) fn handle<E: Egress + ?Sized>(
    snap: &Snapshot,
    frame: &mut [u8],
    meta: &PacketMeta,
    work: &mut Work<'_>,
    tx: &mut Tx<'_, E>,
) -> Verdict {
    let Some(md) = snap.metadata else {
        return Verdict::Dropped(DropReason::PortDown);
    };
    let Ok(eth) = ethernet::Frame::new_checked(&*frame) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    match eth.ethertype() {
        ethernet::ethertype::ARP => {}
        ethernet::ethertype::IPV4 => return inbound(snap, frame, meta, tx),
        _ if ethernet::is_group(&eth.dst()) => return Verdict::Dropped(DropReason::Broadcast),
        _ => return Verdict::Dropped(DropReason::Unsupported),
    }
    let req = match arp_stage::request(&eth) {
        Ok(r) => r,
        Err(reason) => return Verdict::Dropped(reason),
    };
    // Any client address, live or not: the server's neighbour entry must
    // not depend on the snapshot.
    let target = req.target_ip;
    if target != METADATA_GATEWAY && decode_metadata_client(target).is_none() {
        return Verdict::Dropped(DropReason::NoRoute);
    }
    arp_stage::answer(work.scratch, tx, md.port, eth.src(), &req, METADATA_MAC)
}

/// The server's packet to a client address, delivered to the port the
/// address names, with the guest's own address as destination. TTL is
/// left alone: IMDSv2 token replies leave with TTL 1 and must arrive so.
fn inbound<E: Egress + ?Sized>(
    snap: &Snapshot,
    frame: &mut [u8],
    meta: &PacketMeta,
    tx: &mut Tx<'_, E>,
) -> Verdict {
    let Ok(eth) = ethernet::Frame::new_checked(&*frame) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    let Ok(ip) = ipv4::Packet::new_checked(eth.payload()) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    let dst = ip.dst();
    if ethernet::is_group(&eth.dst()) || dst.is_broadcast() || dst.is_multicast() {
        return Verdict::Dropped(DropReason::Broadcast);
    }
    // Only the server speaks on this port, and only to client addresses.
    if ip.src() != IMDS_ADDR {
        return Verdict::Dropped(DropReason::NoRoute);
    }
    let Some((port, index)) = decode_metadata_client(dst) else {
        return Verdict::Dropped(DropReason::NoRoute);
    };
    let Some(dest) = snap.port(port) else {
        return Verdict::Dropped(DropReason::NoRoute);
    };
    let Some(guest) = dest.addresses().nth(usize::from(index)) else {
        return Verdict::Dropped(DropReason::NoRoute);
    };
    if !rewrite_address(frame, meta, Side::Dst, guest) {
        return Verdict::Dropped(DropReason::Malformed);
    }
    // Hashed as delivered, so it matches the hash of what the guest sent.
    let hash = ethernet::Frame::new_checked(&*frame)
        .ok()
        .and_then(|e| {
            ipv4::Packet::new_checked(e.payload())
                .ok()
                .map(|ip| flow::of_ipv4(&ip))
        })
        .unwrap_or(0);
    forward(tx, port, hash, frame, meta, dest.mac, Some(GATEWAY_MAC))
}

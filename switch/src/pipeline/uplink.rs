//! Frames from the internet side (the uplink into the host's "internet"
//! namespace): ARP for Elastic IPs, and IPv4 to an Elastic IP, translated
//! to its private address and delivered through the destination's ACL and
//! security groups.

use std::cell::Cell;

use super::ipv4::{admit, forward, rewrite_address, End, Flow, Side};
use super::{arp as arp_stage, flow, Tx, Work};
use crate::config::{Snapshot, GATEWAY_MAC};
use crate::counters::DropReason;
use crate::wire::{ethernet, ipv4};
use crate::{Egress, PacketMeta, PortId, Verdict};

pub(super) fn handle<E: Egress + ?Sized>(
    snap: &Snapshot,
    blame: &Cell<Option<PortId>>,
    frame: &mut [u8],
    meta: &PacketMeta,
    work: &mut Work<'_>,
    tx: &mut Tx<'_, E>,
) -> Verdict {
    let Some(uplink) = snap.uplink else {
        return Verdict::Dropped(DropReason::PortDown);
    };
    let Ok(eth) = ethernet::Frame::new_checked(&*frame) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    match eth.ethertype() {
        ethernet::ethertype::ARP => {}
        ethernet::ethertype::IPV4 => return inbound(snap, blame, frame, meta, work, tx),
        _ if ethernet::is_group(&eth.dst()) => return Verdict::Dropped(DropReason::Broadcast),
        _ => return Verdict::Dropped(DropReason::Unsupported),
    }

    let req = match arp_stage::request(&eth) {
        Ok(r) => r,
        Err(reason) => return Verdict::Dropped(reason),
    };
    if !is_live_eip(snap, req.target_ip) {
        return Verdict::Dropped(DropReason::NoRoute);
    }
    arp_stage::answer(work.scratch, tx, uplink.port, eth.src(), &req, uplink.mac)
}

/// An Elastic IP whose VPC has an internet gateway attached.
fn is_live_eip(snap: &Snapshot, ip: std::net::Ipv4Addr) -> bool {
    snap.eip_public
        .get(&ip)
        .is_some_and(|(vpc, _)| snap.vpc_info.get(*vpc as usize).is_some_and(|v| v.has_igw))
}

fn inbound<E: Egress + ?Sized>(
    snap: &Snapshot,
    blame: &Cell<Option<PortId>>,
    frame: &mut [u8],
    meta: &PacketMeta,
    work: &mut Work<'_>,
    tx: &mut Tx<'_, E>,
) -> Verdict {
    let Some(uplink) = snap.uplink else {
        return Verdict::Dropped(DropReason::PortDown);
    };
    let Ok(eth) = ethernet::Frame::new_checked(&*frame) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    if ethernet::is_group(&eth.dst()) {
        return Verdict::Dropped(DropReason::Broadcast);
    }
    let Ok(ip) = ipv4::Packet::new_checked(eth.payload()) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    let public = ip.dst();
    if public.is_broadcast() || public.is_multicast() {
        return Verdict::Dropped(DropReason::Broadcast);
    }
    if !is_live_eip(snap, public) {
        return Verdict::Dropped(DropReason::NoRoute);
    }
    let Some(&(vpc, private)) = snap.eip_public.get(&public) else {
        return Verdict::Dropped(DropReason::NoRoute);
    };
    let Some(dest) = snap.lookup(vpc, private) else {
        return Verdict::Dropped(DropReason::NoRoute);
    };
    let (Some(dest_port), Some(dest_info)) = (snap.port(dest), snap.info(dest)) else {
        return Verdict::Dropped(DropReason::NoRoute);
    };
    let mut flow = Flow::of(&ip, meta);
    flow.dst = private;
    if let Some(r) = flow.related.as_mut() {
        // An ICMP error quoting what the instance sent from its public
        // address: match it against the private side the table tracks.
        if r.0 == public {
            r.0 = private;
        }
    }
    let hash = flow::of_ipv4(&ip);
    let from = End {
        port: uplink.port,
        info: None,
        subnet: None,
        vpc,
        owns_dst: false,
    };
    let to = End {
        port: dest,
        info: Some(dest_info),
        subnet: Some(dest_port.subnet),
        vpc,
        // `dest` is the owner of `private`, the flow's destination.
        owns_dst: true,
    };
    if let Err(reason) = admit(snap, blame, work, &flow, &from, &to) {
        return Verdict::Dropped(reason);
    }
    if !rewrite_address(frame, meta, Side::Dst, private) {
        return Verdict::Dropped(DropReason::Malformed);
    }
    forward(
        tx,
        dest,
        hash,
        frame,
        meta,
        dest_port.mac,
        Some(GATEWAY_MAC),
    )
}

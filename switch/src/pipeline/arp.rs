//! ARP: the switch answers every request itself and floods nothing.
//!
//! [`request`] and [`answer`] are shared with the uplink and metadata
//! stages, which answer for their own addresses on their own ports.

use std::sync::atomic::Ordering;

use super::{flow, Ctx, Tx};
use crate::config::GATEWAY_MAC;
use crate::counters::DropReason;
use crate::metadata::IMDS_ADDR;
use crate::wire::{arp, ethernet, WireError};
use crate::{Egress, PacketMeta, PortId, Verdict};

/// Answer a request for the subnet router (with [`GATEWAY_MAC`]) or for an
/// address a port of the VPC owns (with that port's MAC), on the ingress
/// port. Announcements, replies and probes for the sender's own address are
/// dropped under `Broadcast`; unknown targets under `NoRoute`.
pub(super) fn handle<E: Egress + ?Sized>(
    ctx: &Ctx<'_>,
    eth: &ethernet::Frame<&[u8]>,
    scratch: &mut [u8],
    tx: &mut Tx<'_, E>,
) -> Verdict {
    let req = match request(eth) {
        Ok(r) => r,
        Err(reason) => return Verdict::Dropped(reason),
    };

    let target = req.target_ip;
    // The metadata address answers like the router: guests may hold an
    // on-link route to it.
    let answer_mac = if target == ctx.subnet.gateway()
        || (target == IMDS_ADDR && ctx.snap.metadata.is_some())
    {
        GATEWAY_MAC
    } else {
        match ctx.snap.lookup(ctx.vpc, target) {
            // The guest probing its own address (duplicate address
            // detection): staying silent is the right answer.
            Some(owner) if owner == ctx.ingress => return Verdict::Dropped(DropReason::Broadcast),
            Some(owner) => match ctx.snap.port(owner) {
                Some(p) => p.mac,
                None => return Verdict::Dropped(DropReason::NoRoute),
            },
            None => return Verdict::Dropped(DropReason::NoRoute),
        }
    };
    answer(scratch, tx, ctx.ingress, eth.src(), &req, answer_mac)
}

/// The request in `eth`, if it is one to answer. Replies and gratuitous
/// requests (sender = target, announcing the sender's own address) are
/// never flooded: `Broadcast`; other operations `Unsupported`.
pub(super) fn request(eth: &ethernet::Frame<&[u8]>) -> Result<arp::Repr, DropReason> {
    let req = match arp::Packet::new_checked(eth.payload()) {
        Ok(p) => arp::Repr::parse(&p),
        Err(WireError::Unsupported) => return Err(DropReason::Unsupported),
        Err(_) => return Err(DropReason::Malformed),
    };
    match req.operation {
        arp::operation::REQUEST if req.sender_ip == req.target_ip => Err(DropReason::Broadcast),
        arp::operation::REQUEST => Ok(req),
        arp::operation::REPLY => Err(DropReason::Broadcast),
        _ => Err(DropReason::Unsupported),
    }
}

/// Reply to `req` (from the station at `requester`) that its target is at
/// `mac`, on `port`; counts `arp_replies` there.
pub(super) fn answer<E: Egress + ?Sized>(
    scratch: &mut [u8],
    tx: &mut Tx<'_, E>,
    port: PortId,
    requester: [u8; 6],
    req: &arp::Repr,
    mac: [u8; 6],
) -> Verdict {
    let reply = arp::Repr {
        operation: arp::operation::REPLY,
        sender_hw: mac,
        sender_ip: req.target_ip,
        target_hw: req.sender_hw,
        target_ip: req.sender_ip,
    };
    let len = match write_reply(scratch, requester, &reply) {
        Ok(len) => len,
        // Unreachable with SCRATCH_LEN >= 42; drop rather than panic.
        Err(_) => return Verdict::Dropped(DropReason::Unsupported),
    };
    let Some(frame) = scratch.get(..len) else {
        return Verdict::Dropped(DropReason::Unsupported);
    };
    let hash = flow::flow_hash(reply.sender_ip, reply.target_ip, 0, 0, 0);
    if tx.send(port, hash, frame, &PacketMeta::default()) {
        if let Some(c) = tx.counters.get(port as usize) {
            c.arp_replies.fetch_add(1, Ordering::Relaxed);
        }
        Verdict::Replied
    } else {
        Verdict::Dropped(DropReason::QueueFull)
    }
}

/// Length of a gratuitous ARP frame (Ethernet + ARP, unpadded).
pub const ANNOUNCEMENT_LEN: usize = ethernet::HEADER_LEN + 28;

/// A gratuitous ARP request announcing that `ip` is at `mac` (sender =
/// target = `ip`, broadcast), for the control plane to send toward the
/// peers of an address that moved: Linux updates an existing neighbour
/// entry from it. The switch never forwards these between guests itself.
pub fn announcement(ip: std::net::Ipv4Addr, mac: [u8; 6]) -> [u8; ANNOUNCEMENT_LEN] {
    let mut out = [0u8; ANNOUNCEMENT_LEN];
    let repr = arp::Repr {
        operation: arp::operation::REQUEST,
        sender_hw: mac,
        sender_ip: ip,
        target_hw: [0; 6],
        target_ip: ip,
    };
    // Both writes fit ANNOUNCEMENT_LEN exactly; a failure would leave
    // zeros, never panic.
    if ethernet::emit(&mut out, ethernet::BROADCAST, mac, ethernet::ethertype::ARP).is_ok() {
        if let Some(body) = out.get_mut(ethernet::HEADER_LEN..) {
            let _ = repr.emit(body);
        }
    }
    out
}

fn write_reply(out: &mut [u8], dst: [u8; 6], reply: &arp::Repr) -> Result<usize, WireError> {
    ethernet::emit(out, dst, reply.sender_hw, ethernet::ethertype::ARP)?;
    let body = out
        .get_mut(ethernet::HEADER_LEN..)
        .ok_or(WireError::Truncated)?;
    Ok(ethernet::HEADER_LEN + reply.emit(body)?)
}

#[cfg(test)]
mod announcement_tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn an_announcement_parses_as_a_gratuitous_request() {
        let cases = [
            (Ipv4Addr::new(10, 0, 1, 9), [2, 0, 0, 0, 0, 9]),
            (Ipv4Addr::new(172, 16, 3, 200), [0x0a, 1, 2, 3, 4, 5]),
        ];
        for (ip, mac) in cases {
            let f = announcement(ip, mac);
            let eth = ethernet::Frame::new_checked(&f[..]).expect("ethernet");
            assert_eq!(eth.dst(), ethernet::BROADCAST);
            assert_eq!(eth.src(), mac);
            let p = arp::Packet::new_checked(eth.payload()).expect("arp");
            let r = arp::Repr::parse(&p);
            assert_eq!(r.operation, arp::operation::REQUEST);
            assert_eq!((r.sender_ip, r.target_ip, r.sender_hw), (ip, ip, mac));
            // The switch itself treats it as an announcement: never flooded.
            assert_eq!(request(&eth), Err(DropReason::Broadcast));
        }
    }
}

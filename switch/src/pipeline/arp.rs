//! ARP: the switch answers every request itself and floods nothing.

use std::sync::atomic::Ordering;

use super::{flow, Ctx, Tx};
use crate::config::GATEWAY_MAC;
use crate::counters::DropReason;
use crate::wire::{arp, ethernet, WireError};
use crate::{Egress, PacketMeta, Verdict};

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
    let req = match arp::Packet::new_checked(eth.payload()) {
        Ok(p) => arp::Repr::parse(&p),
        Err(WireError::Unsupported) => return Verdict::Dropped(DropReason::Unsupported),
        Err(_) => return Verdict::Dropped(DropReason::Malformed),
    };
    match req.operation {
        arp::operation::REQUEST => {}
        // Replies and gratuitous replies from guests: never flooded.
        arp::operation::REPLY => return Verdict::Dropped(DropReason::Broadcast),
        _ => return Verdict::Dropped(DropReason::Unsupported),
    }
    // A gratuitous request announces the sender's own address.
    if req.sender_ip == req.target_ip {
        return Verdict::Dropped(DropReason::Broadcast);
    }

    let target = req.target_ip;
    let answer = if target == ctx.subnet.gateway() {
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

    let reply = arp::Repr {
        operation: arp::operation::REPLY,
        sender_hw: answer,
        sender_ip: target,
        target_hw: req.sender_hw,
        target_ip: req.sender_ip,
    };
    let len = match write_reply(scratch, eth.src(), &reply) {
        Ok(len) => len,
        // Unreachable with SCRATCH_LEN >= 42; drop rather than panic.
        Err(_) => return Verdict::Dropped(DropReason::Unsupported),
    };
    let Some(frame) = scratch.get(..len) else {
        return Verdict::Dropped(DropReason::Unsupported);
    };
    let hash = flow::flow_hash(reply.sender_ip, reply.target_ip, 0, 0, 0);
    if tx.send(ctx.ingress, hash, frame, &PacketMeta::default()) {
        if let Some(c) = ctx.counters(ctx.ingress) {
            c.arp_replies.fetch_add(1, Ordering::Relaxed);
        }
        Verdict::Replied
    } else {
        Verdict::Dropped(DropReason::QueueFull)
    }
}

pub(super) fn write_reply(
    out: &mut [u8],
    dst: [u8; 6],
    reply: &arp::Repr,
) -> Result<usize, WireError> {
    ethernet::emit(out, dst, reply.sender_hw, ethernet::ethertype::ARP)?;
    let body = out
        .get_mut(ethernet::HEADER_LEN..)
        .ok_or(WireError::Truncated)?;
    Ok(ethernet::HEADER_LEN + reply.emit(body)?)
}

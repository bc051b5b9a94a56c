//! NAT gateway: source NAT of TCP, UDP and ICMP echo to one of the
//! gateway's private addresses. The port (or echo id) is chosen so that
//! `port % shards` equals the forward tuple's shard: return traffic then
//! steers by port alone to the node that holds the flow.

use crate::cluster::Repl;
use crate::compile::{Service, NAT_PORT_MIN};
use crate::flow::{Flow, Key};
use crate::maglev::mix64;
use crate::node::Ctx;
use crate::stats::DropReason;
use crate::wire::{self, Parsed, PROTO_TCP, TCP_ACK, TCP_RST, TCP_SYN};
use crate::Sink;

/// Candidate ports tried per NAT address before giving up (bounded work under floods).
const MAX_PROBES: u32 = 128;

/// `h` is the hash of the frame's wire key (see `node::wire_key`).
pub(crate) fn process(
    ctx: &mut Ctx,
    svc: &Service,
    frame: &[u8],
    p: &Parsed,
    h: u64,
    out: &mut dyn Sink,
) {
    if let Some(i) = p.inner {
        if svc.owns(p.dst) {
            return icmp_error(ctx, svc, frame, p, &i, out);
        }
        return ctx.drop(DropReason::Unsupported);
    }
    if svc.owns(p.dst) {
        inbound(ctx, svc, frame, p, h, out)
    } else {
        outbound(ctx, svc, frame, p, h, out)
    }
}

/// An ICMP error about a NAT flow (e.g. fragmentation needed, port
/// unreachable): it quotes the translated datagram, whose reverse is the
/// flow's return key. It does not refresh the flow.
fn icmp_error(
    ctx: &mut Ctx,
    svc: &Service,
    frame: &[u8],
    p: &Parsed,
    i: &wire::Inner,
    out: &mut dyn Sink,
) {
    if !ctx.is_primary(ctx.hp.nat_in_shard(i.sport)) {
        return ctx.drop(DropReason::NotOwner);
    }
    let k = Key {
        src: i.dst,
        dst: i.src,
        sport: i.dport,
        dport: i.sport,
        svc: svc.port,
        proto: i.proto,
    };
    let Some((idx, 1)) = ctx.table.lookup(&k, k.hash()) else {
        return ctx.drop(DropReason::NoFlow);
    };
    let f = *ctx.table.get(idx);
    if i.src != p.dst || ctx.expired(&f) {
        return ctx.drop(DropReason::NoFlow);
    }
    ctx.buf.clear();
    ctx.buf.extend_from_slice(frame);
    wire::rewrite_icmp_error(&mut ctx.buf, p, f.src, f.sport);
    wire::set_macs(&mut ctx.buf, svc.gw_mac, svc.mac);
    ctx.emit(out, svc.port);
}

fn inbound(ctx: &mut Ctx, svc: &Service, frame: &[u8], p: &Parsed, h: u64, out: &mut dyn Sink) {
    if !ctx.is_primary(ctx.hp.nat_in_shard(p.dport)) {
        return ctx.drop(DropReason::NotOwner);
    }
    let Some(idx) = ctx.live_flow(p, svc.port, h, 1) else {
        return ctx.drop(DropReason::NoFlow);
    };
    let f = *ctx.table.get(idx);
    ctx.buf.clear();
    ctx.buf.extend_from_slice(frame);
    wire::rewrite(&mut ctx.buf, p, false, f.src, f.sport);
    wire::set_macs(&mut ctx.buf, svc.gw_mac, svc.mac);
    ctx.emit(out, svc.port);
}

fn outbound(ctx: &mut Ctx, svc: &Service, frame: &[u8], p: &Parsed, h: u64, out: &mut dyn Sink) {
    let shard = ctx.hp.nat_shard_of_hash(h);
    if !ctx.is_primary(shard) {
        return ctx.drop(DropReason::NotOwner);
    }
    let idx = match ctx.live_flow(p, svc.port, h, 0) {
        Some(idx) => idx,
        None => {
            if p.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
                // Mid-connection packet with no flow (e.g. after the idle timeout): RST the sender.
                if p.tcp_flags & TCP_RST == 0 {
                    let (seq, ack, flags) = wire::rst_for(p, frame);
                    let spec = wire::TcpSpec {
                        src_mac: svc.mac,
                        dst_mac: svc.gw_mac,
                        src: p.dst,
                        dst: p.src,
                        sport: p.dport,
                        dport: p.sport,
                        seq,
                        ack,
                        flags,
                    };
                    ctx.emit_tcp(out, svc.port, &spec);
                }
                return ctx.drop(DropReason::NoFlow);
            }
            let Some((xip, xport)) = allocate(ctx, svc, p, shard, h) else {
                ctx.c.port_allocation_failures += 1;
                return ctx.drop(DropReason::PortAllocation);
            };
            let f = Flow {
                src: p.src,
                dst: p.dst,
                sport: p.sport,
                dport: p.dport,
                xip,
                xport,
                proto: p.proto,
                flags: 0,
                svc: svc.port,
                last_seen: ctx.now_ms,
                shard,
                _pad: ctx.now_units(),
                seq: 0,
                ack: 0,
            };
            let Ok(idx) = ctx.table.insert(f) else {
                return ctx.drop(DropReason::FlowTableFull);
            };
            ctx.c.flows_created += 1;
            let f = *ctx.table.get(idx);
            ctx.replicate(shard, Repl::Upsert(f));
            if p.proto == PROTO_TCP && p.tcp_flags & (wire::TCP_FIN | TCP_RST) != 0 {
                ctx.touch(idx, p, 0);
            }
            idx
        }
    };
    let f = *ctx.table.get(idx);
    ctx.buf.clear();
    ctx.buf.extend_from_slice(frame);
    wire::rewrite(&mut ctx.buf, p, true, f.xip, f.xport);
    wire::set_macs(&mut ctx.buf, svc.gw_mac, svc.mac);
    ctx.emit(out, svc.port);
}

/// Ports in [NAT_PORT_MIN, 65535] congruent to `shard` modulo the shard count.
pub(crate) fn class(shards: u16, shard: u16) -> (u32, u32) {
    let s = u32::from(shards);
    let min = u32::from(NAT_PORT_MIN);
    let first = min + ((u32::from(shard) + s - min % s) % s);
    let count = if first > 65535 {
        0
    } else {
        (65535 - first) / s + 1
    };
    (first, count)
}

/// Picks a NAT address and a free port whose reverse tuple lands in `shard`.
fn allocate(ctx: &Ctx, svc: &Service, p: &Parsed, shard: u16, h: u64) -> Option<(u32, u16)> {
    let shards = ctx.hp.opts.shards;
    let (first, count) = class(shards, shard);
    if count == 0 || svc.addrs.is_empty() {
        return None;
    }
    let n = svc.addrs.len();
    let start_addr = (h >> 8) as usize % n;
    let start = ((h >> 40) as u32) % count;
    for a in 0..n {
        let xip = svc.addrs[(start_addr + a) % n];
        for i in 0..count.min(MAX_PROBES) {
            // Independent random probes: a fixed stride would make every flow walk
            // the same cycle and build long runs of used ports (primary clustering).
            let k = if i == 0 {
                start
            } else {
                (mix64(h ^ u64::from(i)) % u64::from(count)) as u32
            };
            let port = (first + k * u32::from(shards)) as u16;
            let rev = Key {
                src: p.dst,
                dst: xip,
                sport: p.dport,
                dport: port,
                svc: svc.port,
                proto: p.proto,
            };
            if ctx.table.lookup(&rev, rev.hash()).is_none() {
                return Some((xip, port));
            }
        }
    }
    None
}

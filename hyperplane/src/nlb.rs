//! Network load balancer: DNAT of client → VIP:listener to a target chosen
//! by Maglev over the eligible targets, with connection tracking so flows
//! keep their target; the client IP is preserved. Replies from targets are
//! translated back; replies with no flow pass through (addresses unchanged).

use std::time::SystemTime;

use crate::cluster::Repl;
use crate::compile::{Compiled, Kind, Service};
use crate::flow::{Flow, F_NLB};
use crate::maglev::mix64;
use crate::node::{flow_key, Ctx};
use crate::stats::{DropReason, HealthState};
use crate::wire::{self, Parsed, PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::Sink;

/// `h` is the hash of the frame's wire key (see `node::wire_key`).
pub(crate) fn process(
    ctx: &mut Ctx,
    svc: &Service,
    frame: &[u8],
    p: &Parsed,
    h: u64,
    out: &mut dyn Sink,
) {
    if p.inner.is_some() {
        // ICMP errors are not translated for the load balancer.
        return ctx.drop(DropReason::Unsupported);
    }
    if svc.owns(p.dst) {
        from_client(ctx, svc, frame, p, h, out)
    } else {
        from_target(ctx, svc, frame, p, h, out)
    }
}

/// Next sequence number after this segment (for RSTs to the target).
fn seq_after(p: &Parsed, frame: &[u8]) -> u32 {
    let hdr = usize::from(frame[p.l4 + 12] >> 4) * 4;
    let payload = (p.end - p.l4).saturating_sub(hdr) as u32;
    p.seq
        .wrapping_add(payload)
        .wrapping_add(u32::from(p.tcp_flags & (TCP_SYN | TCP_FIN) != 0))
}

fn from_client(ctx: &mut Ctx, svc: &Service, frame: &[u8], p: &Parsed, h: u64, out: &mut dyn Sink) {
    let shard = ctx.hp.nlb_shard(p.src, p.sport, p.proto, svc.port);
    if !ctx.is_primary(shard) {
        return ctx.drop(DropReason::NotOwner);
    }
    let idx = match ctx.live_flow(p, svc.port, h, 0) {
        Some(idx) => idx,
        None => {
            // Only new flows need the listener: a removed one closes its flows in `reconcile`.
            let Some(l) = svc.listener(p.proto, p.dport) else {
                return ctx.drop(DropReason::NoListener);
            };
            if p.proto == PROTO_TCP && p.tcp_flags & TCP_RST != 0 {
                return ctx.drop(DropReason::NoFlow);
            }
            let tg = &l.tg;
            let pick = if tg.sticky {
                mix64(u64::from(p.src))
            } else {
                h
            };
            let Some(b) = tg.maglev.lookup(pick) else {
                return ctx.drop(DropReason::NoListener);
            };
            let Some(t) = tg
                .backends
                .get(b)
                .and_then(|&i| tg.targets.get(usize::from(i)))
            else {
                return ctx.drop(DropReason::NoListener);
            };
            let f = Flow {
                src: p.src,
                dst: p.dst,
                sport: p.sport,
                dport: p.dport,
                xip: t.ip,
                xport: t.port,
                proto: p.proto,
                flags: F_NLB,
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
            idx
        }
    };
    if p.proto == PROTO_TCP {
        let f = ctx.table.get_mut(idx);
        f.seq = seq_after(p, frame);
        if p.tcp_flags & TCP_ACK != 0 {
            f.ack = p.ack;
        }
    }
    let f = *ctx.table.get(idx);
    ctx.buf.clear();
    ctx.buf.extend_from_slice(frame);
    wire::rewrite(&mut ctx.buf, p, false, f.xip, f.xport);
    wire::set_macs(&mut ctx.buf, svc.gw_mac, svc.mac);
    ctx.emit(out, svc.port);
}

fn from_target(ctx: &mut Ctx, svc: &Service, frame: &[u8], p: &Parsed, h: u64, out: &mut dyn Sink) {
    let k = flow_key(p, svc.port);
    let shard = ctx.hp.nlb_shard(p.dst, p.dport, p.proto, svc.port);
    let hit = if ctx.is_primary(shard) {
        ctx.table.lookup(&k, h)
    } else {
        None
    };
    let Some((idx, 1)) = hit else {
        // Not ours: direct traffic from the target to a client; pass it
        // through with the addresses unchanged. It leaves from the
        // balancer's interface, so with its MAC (the switch drops frames
        // whose source MAC is not the sending interface's).
        ctx.buf.clear();
        ctx.buf.extend_from_slice(frame);
        wire::set_macs(&mut ctx.buf, svc.gw_mac, svc.mac);
        return ctx.emit(out, svc.port);
    };
    ctx.touch(idx, p, 1);
    let f = *ctx.table.get(idx);
    ctx.buf.clear();
    ctx.buf.extend_from_slice(frame);
    wire::rewrite(&mut ctx.buf, p, true, f.dst, f.dport);
    wire::set_macs(&mut ctx.buf, svc.gw_mac, svc.mac);
    ctx.emit(out, svc.port);
}

/// What happens to an existing flow after a config or health change.
fn verdict(cfg: &Compiled, f: &Flow, now: SystemTime) -> bool {
    let Some(svc) = cfg.service(f.svc) else {
        return false;
    };
    if f.flags & F_NLB == 0 {
        // A NAT flow lives as long as its gateway and address do.
        return matches!(svc.kind, Kind::Nat) && svc.owns(f.xip);
    }
    if !matches!(svc.kind, Kind::Nlb(_)) || !svc.owns(f.dst) {
        return false;
    }
    let Some(l) = svc.listener(f.proto, f.dport) else {
        return false;
    };
    let Some(t) =
        l.tg.targets
            .iter()
            .find(|t| t.ip == f.xip && t.port == f.xport)
    else {
        return false;
    };
    match t.state {
        HealthState::Healthy | HealthState::Initial => true,
        // Failing open keeps flows on unhealthy targets too.
        HealthState::Unhealthy => t.eligible,
        HealthState::Draining => t
            .draining_since
            .is_none_or(|s| now.duration_since(s).unwrap_or_default() < l.tg.dereg_delay),
        HealthState::Unused => false,
    }
}

/// After a new snapshot: load-balancer flows whose target turned unhealthy,
/// finished draining or disappeared are closed, TCP ones with a RST on both
/// sides; NAT flows of a deleted gateway or address are dropped.
/// Examines up to `budget` records from `from`; returns where to go on.
pub(crate) fn reconcile(
    ctx: &mut Ctx,
    cfg: &Compiled,
    from: usize,
    budget: usize,
    out: &mut dyn Sink,
) -> usize {
    let now = SystemTime::now();
    let end = from.saturating_add(budget).min(ctx.table.slots());
    for i in from..end {
        let Some(f) = ctx.table.at(i).copied() else {
            continue;
        };
        if !ctx.is_primary(f.shard) || verdict(cfg, &f, now) {
            continue;
        }
        if f.flags & F_NLB != 0 && f.proto == PROTO_TCP {
            if let Some(svc) = cfg.service(f.svc) {
                let to_client = wire::TcpSpec {
                    src_mac: svc.mac,
                    dst_mac: svc.gw_mac,
                    src: f.dst,
                    dst: f.src,
                    sport: f.dport,
                    dport: f.sport,
                    seq: f.ack,
                    ack: 0,
                    flags: TCP_RST,
                };
                ctx.emit_tcp(out, svc.port, &to_client);
                let to_target = wire::TcpSpec {
                    src: f.src,
                    dst: f.xip,
                    sport: f.sport,
                    dport: f.xport,
                    seq: f.seq,
                    ..to_client
                };
                ctx.emit_tcp(out, svc.port, &to_target);
            }
        }
        ctx.remove_primary(i as u32);
    }
    end
}

/// True when a draining target's delay has run out in the current snapshot
/// (it must be recompiled to become Unused).
pub(crate) fn drain_expired(cfg: &Compiled) -> bool {
    let now = SystemTime::now();
    cfg.services.iter().any(|s| match &s.kind {
        Kind::Nlb(ls) => ls.iter().any(|l| {
            l.tg.targets.iter().any(|t| {
                t.state == HealthState::Draining
                    && t.draining_since.is_some_and(|d| {
                        now.duration_since(d).unwrap_or_default() >= l.tg.dereg_delay
                    })
            })
        }),
        Kind::Nat => false,
    })
}

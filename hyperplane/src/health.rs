//! Active TCP health checks, sent by the hyperplane itself: a SYN from the
//! load balancer's first VIP to target:port; SYN-ACK counts as a pass (and
//! is answered with a RST), RST or silence past the timeout as a failure.
//! Each target is probed by one live node (rendezvous hash on the target);
//! the probe's source port lies in that node's slice of the reserved range,
//! so the reply steers back to it. Verdicts go to the cluster, which applies
//! the thresholds and recompiles the Maglev tables on a state change.

use std::collections::{HashMap, HashSet};

use crate::compile::{target_key, Compiled, Kind, Service, TargetId, HC_BASE};
use crate::maglev::mix64;
use crate::node::Ctx;
use crate::stats::HealthState;
use crate::wire::{self, Parsed, TCP_ACK, TCP_RST, TCP_SYN};
use crate::Sink;

struct Outstanding {
    id: TargetId,
    hc_port: u16,
    seq: u32,
    sent_ms: u32,
    timeout_ms: u32,
}

#[derive(Default)]
pub(crate) struct Prober {
    next_at: HashMap<TargetId, u32>,
    outstanding: HashMap<u16, Outstanding>,
    next_port: u16,
}

fn ms(d: std::time::Duration) -> u32 {
    d.as_millis().min(u128::from(u32::MAX / 4)) as u32
}

impl Prober {
    /// Sends due probes and fails the ones that timed out.
    pub fn run(&mut self, ctx: &mut Ctx, cfg: &Compiled, out: &mut dyn Sink) {
        let now = ctx.now_ms;
        let timed_out: Vec<u16> = self
            .outstanding
            .iter()
            .filter(|(_, o)| now.wrapping_sub(o.sent_ms) > o.timeout_ms)
            .map(|(p, _)| *p)
            .collect();
        for p in timed_out {
            if let Some(o) = self.outstanding.remove(&p) {
                ctx.hp.record_health(&o.id, false);
            }
        }
        let live = ctx.hp.live_nodes();
        if !live.contains(&ctx.id) {
            return;
        }
        let mut seen = HashSet::new();
        for svc in &cfg.services {
            let Kind::Nlb(ls) = &svc.kind else { continue };
            let Some(&vip) = svc.addrs.first() else {
                continue;
            };
            for l in ls {
                let tg = &l.tg;
                if !tg.hc.enabled {
                    continue;
                }
                for t in &tg.targets {
                    if matches!(t.state, HealthState::Draining | HealthState::Unused) {
                        continue;
                    }
                    let id = TargetId {
                        lb_port: svc.port,
                        tg: tg.id.clone(),
                        ip: t.ip,
                        port: t.port,
                    };
                    if !seen.insert(id.clone()) {
                        continue;
                    }
                    let k = target_key(t.ip, t.hc_port) ^ mix64(u64::from(svc.port));
                    let owner = live.iter().copied().max_by_key(|&n| mix64(k ^ n as u64));
                    if owner != Some(ctx.id) {
                        continue;
                    }
                    let due = self
                        .next_at
                        .get(&id)
                        .is_none_or(|&at| now.wrapping_sub(at) < u32::MAX / 2);
                    if !due || self.outstanding.values().any(|o| o.id == id) {
                        continue;
                    }
                    self.next_at
                        .insert(id.clone(), now.wrapping_add(ms(tg.hc.interval)));
                    self.probe(ctx, svc, vip, id, t.hc_port, ms(tg.hc.timeout), out);
                }
            }
        }
        self.next_at.retain(|id, _| seen.contains(id));
    }

    #[allow(clippy::too_many_arguments)]
    fn probe(
        &mut self,
        ctx: &mut Ctx,
        svc: &Service,
        vip: u32,
        id: TargetId,
        hc_port: u16,
        timeout_ms: u32,
        out: &mut dyn Sink,
    ) {
        let per = ctx.hp.hc_ports_per_node();
        if per == 0 {
            return;
        }
        // Find a free source port in this node's slice.
        let base = HC_BASE + ctx.id as u16 * per;
        let Some(sport) = (0..per)
            .map(|i| base + (self.next_port.wrapping_add(i)) % per)
            .find(|p| {
                !self.outstanding.contains_key(p)
                    && svc.listener(crate::wire::PROTO_TCP, *p).is_none()
            })
        else {
            return;
        };
        self.next_port = self.next_port.wrapping_add(1);
        let seq = mix64(u64::from(ctx.now_ms) ^ (u64::from(sport) << 32) ^ u64::from(id.ip)) as u32;
        let spec = wire::TcpSpec {
            src_mac: svc.mac,
            dst_mac: svc.gw_mac,
            src: vip,
            dst: id.ip,
            sport,
            dport: hc_port,
            seq,
            ack: 0,
            flags: TCP_SYN,
        };
        ctx.emit_tcp(out, svc.port, &spec);
        self.outstanding.insert(
            sport,
            Outstanding {
                id,
                hc_port,
                seq,
                sent_ms: ctx.now_ms,
                timeout_ms,
            },
        );
    }

    /// A segment to a VIP on the health-check port range: a probe's answer.
    pub fn reply(&mut self, ctx: &mut Ctx, svc: &Service, p: &Parsed, out: &mut dyn Sink) {
        let matches = self
            .outstanding
            .get(&p.dport)
            .is_some_and(|o| o.id.ip == p.src && o.hc_port == p.sport && o.id.lb_port == svc.port);
        if !matches {
            return ctx.drop(crate::stats::DropReason::NoFlow);
        }
        let Some(o) = self.outstanding.remove(&p.dport) else {
            return;
        };
        if p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK && p.ack == o.seq.wrapping_add(1)
        {
            // Close the half-open probe connection.
            let spec = wire::TcpSpec {
                src_mac: svc.mac,
                dst_mac: svc.gw_mac,
                src: p.dst,
                dst: p.src,
                sport: p.dport,
                dport: p.sport,
                seq: p.ack,
                ack: 0,
                flags: TCP_RST,
            };
            ctx.emit_tcp(out, svc.port, &spec);
            ctx.hp.record_health(&o.id, true);
        } else if p.tcp_flags & TCP_RST != 0 {
            ctx.hp.record_health(&o.id, false);
        } else {
            // Something else on the probe's port: keep waiting for the real answer.
            self.outstanding.insert(p.dport, o);
        }
    }
}

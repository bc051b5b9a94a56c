//! IPv4 from an ENI: source check, route lookup, network ACLs, security
//! groups with connection tracking, flow logs, delivery inside the VPC or
//! out through the internet gateway; and the .1 router's echo replies.
//! Packets to the metadata address go to [`super::metadata`] after the
//! source check, before routing and policy.
//! DHCP requests are passed on to [`super::dhcp`].
//!
//! [`admit`] is shared with [`super::uplink`] (traffic from the internet).

use std::net::Ipv4Addr;

use super::fast::Decision;
use super::{dhcp, flow, metadata, Cacheable, Ctx, Tx, Work};
use crate::config::{Hop, PortInfo, Snapshot, GATEWAY_MAC};
use crate::conntrack::{flag, Tuple};
use crate::counters::DropReason;
use crate::flowlog::Observation;
use crate::metadata::IMDS_ADDR;
use crate::policy::Probe;
use crate::wire::{checksum, dhcp as dhcp_wire, ethernet, icmpv4, ipv4};
use crate::{Egress, PacketMeta, PortId, Verdict};

pub(super) fn handle<E: Egress + ?Sized>(
    ctx: &Ctx<'_>,
    frame: &mut [u8],
    meta: &PacketMeta,
    work: &mut Work<'_>,
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
    let src = ip.src();
    let gateway = ctx.subnet.gateway();

    if ip.protocol() == ipv4::protocol::UDP
        && (dst == Ipv4Addr::BROADCAST || dst == gateway)
        && is_to_dhcp_server(ip.payload())
    {
        if ip.is_fragment() {
            return Verdict::Dropped(DropReason::Unsupported);
        }
        return dhcp::handle(ctx, &ip, work.scratch, tx);
    }

    let flow = Flow::of(&ip, meta);
    // Start loading the flow's connection-tracking buckets now: the checks,
    // route, address and ACL lookups below run while they arrive.
    if ctx.snap.any_filtered && !work.hinted {
        work.conntrack
            .prefetch(&flow.tuple(ctx.ingress, ctx.ingress));
    }

    if ethernet::is_group(&eth_dst)
        || dst.is_broadcast()
        || dst.is_multicast()
        || dst == ctx.subnet.broadcast()
    {
        return Verdict::Dropped(DropReason::Broadcast);
    }
    if ctx.info.source_dest_check && ctx.snap.lookup(ctx.vpc, src) != Some(ctx.ingress) {
        return Verdict::Dropped(DropReason::SourceCheck);
    }
    if dst == gateway {
        return router(ctx, frame, meta, tx);
    }
    if dst == IMDS_ADDR {
        if ctx
            .counters(ctx.ingress)
            .is_some_and(|c| !c.allow_linklocal(&ctx.info.limits))
        {
            return Verdict::Dropped(DropReason::RateLimit);
        }
        return metadata::outbound(ctx, frame, meta, tx);
    }

    let hash = if ip.is_fragment() {
        flow::flow_hash(src, dst, flow.protocol, 0, 0)
    } else {
        flow.hash()
    };
    let from = End {
        port: ctx.ingress,
        info: Some(ctx.info),
        subnet: Some(ctx.port.subnet),
        vpc: ctx.vpc,
        owns_dst: false,
    };

    // A load balancer's target answering a client whose address the
    // balancer preserved: the reply goes back through the balancer.
    let service = if ctx.snap.returns.is_empty() || ip.is_fragment() {
        None
    } else {
        ctx.snap
            .returns
            .get(&(ctx.ingress, flow.src_port, flow.protocol))
            .copied()
    };
    let (dest, owner) = match service {
        Some(svc) => (svc, ctx.snap.lookup(ctx.vpc, dst)),
        None => match ctx.snap.route(ctx.port.subnet, dst) {
            Hop::Local => match ctx.snap.lookup(ctx.vpc, dst) {
                Some(d) => (d, Some(d)),
                None => return Verdict::Dropped(DropReason::NoRoute),
            },
            Hop::Port(p) => (p, ctx.snap.lookup(ctx.vpc, dst)),
            Hop::Internet => return to_internet(ctx, frame, meta, &flow, hash, &from, work, tx),
            Hop::Blackhole => return Verdict::Dropped(DropReason::NoRoute),
        },
    };
    if dest == ctx.ingress {
        return Verdict::Dropped(DropReason::NoRoute);
    }
    let (Some(dest_port), Some(dest_info)) = (ctx.snap.port(dest), ctx.snap.info(dest)) else {
        return Verdict::Dropped(DropReason::NoRoute);
    };
    let to = End {
        port: dest,
        info: Some(dest_info),
        subnet: Some(dest_port.subnet),
        vpc: ctx.vpc,
        owns_dst: owner == Some(dest),
    };
    if let Err(reason) = admit(ctx.snap, ctx.blame, work, &flow, &from, &to) {
        return Verdict::Dropped(reason);
    }

    let routed = dest_port.subnet != ctx.port.subnet || owner != Some(dest);
    let ct = match work.cacheable {
        Cacheable::No => None,
        Cacheable::Untracked => Some(None),
        Cacheable::Tracked(idx, ctl, add) => Some(Some((idx, ctl, add))),
    };
    work.learned = ct.map(|ct| Decision {
        dest,
        dst_mac: dest_port.mac,
        routed,
        hash,
        ct,
    });
    let src_mac = routed.then_some(GATEWAY_MAC);
    forward(tx, dest, hash, frame, meta, dest_port.mac, src_mac)
}

/// Set the frame's destination MAC (and source MAC, when given) and emit it
/// to `port`.
pub(super) fn forward<E: Egress + ?Sized>(
    tx: &mut Tx<'_, E>,
    port: PortId,
    hash: u32,
    frame: &mut [u8],
    meta: &PacketMeta,
    dst_mac: [u8; 6],
    src_mac: Option<[u8; 6]>,
) -> Verdict {
    let Ok(mut eth) = ethernet::Frame::new_checked(&mut *frame) else {
        return Verdict::Dropped(DropReason::Malformed);
    };
    eth.set_dst(dst_mac);
    if let Some(mac) = src_mac {
        eth.set_src(mac);
    }
    if tx.send(port, hash, frame, meta) {
        Verdict::Forwarded(port)
    } else {
        Verdict::Dropped(DropReason::QueueFull)
    }
}

/// Out through the internet gateway: the source must have a public
/// address, which replaces it.
#[allow(clippy::too_many_arguments)]
fn to_internet<E: Egress + ?Sized>(
    ctx: &Ctx<'_>,
    frame: &mut [u8],
    meta: &PacketMeta,
    flow: &Flow,
    hash: u32,
    from: &End<'_>,
    work: &mut Work<'_>,
    tx: &mut Tx<'_, E>,
) -> Verdict {
    let (Some(uplink), Some(public)) = (
        ctx.snap.uplink,
        ctx.snap.eip_private.get(&(ctx.vpc, flow.src)).copied(),
    ) else {
        // No public address: AWS drops it at the gateway.
        return Verdict::Dropped(DropReason::NoRoute);
    };
    let to = End {
        port: uplink.port,
        info: None,
        subnet: None,
        vpc: ctx.vpc,
        owns_dst: false,
    };
    if let Err(reason) = admit(ctx.snap, ctx.blame, work, flow, from, &to) {
        return Verdict::Dropped(reason);
    }
    if !rewrite_address(frame, meta, Side::Src, public) {
        return Verdict::Dropped(DropReason::Malformed);
    }
    forward(
        tx,
        uplink.port,
        hash,
        frame,
        meta,
        uplink.peer_mac,
        Some(uplink.mac),
    )
}

/// One end of a hop through the switch.
pub(super) struct End<'a> {
    pub port: PortId,
    /// `None` for the uplink (no security groups, no flow logs).
    pub info: Option<&'a PortInfo>,
    /// `None` outside the VPC.
    pub subnet: Option<usize>,
    pub vpc: u32,
    /// The port owns the flow's destination address in `vpc` (read for the
    /// destination end only: its destination check).
    pub owns_dst: bool,
}

/// What the policy stages need of a packet.
#[derive(Debug, Clone, Copy)]
pub(super) struct Flow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// Ports for connection tracking (TCP/UDP ports; the ICMP query id on
    /// both sides; zero otherwise).
    pub src_port: u16,
    pub dst_port: u16,
    /// Destination port, or ICMP type << 8 | code, for rule matching.
    pub l4: u16,
    pub tcp_flags: u8,
    /// For an ICMP error: the tuple of the packet it quotes, reversed into
    /// the direction this error travels.
    pub related: Option<(Ipv4Addr, Ipv4Addr, u8, u16, u16)>,
    /// IP bytes and wire packets (a segmentation-offload frame is several).
    pub bytes: usize,
    pub packets: u64,
}

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

impl Flow {
    #[inline(always)]
    pub fn of<T: AsRef<[u8]>>(ip: &ipv4::Packet<T>, meta: &PacketMeta) -> Flow {
        let protocol = ip.protocol();
        let l4 = ip.payload();
        let mut f = Flow {
            src: ip.src(),
            dst: ip.dst(),
            protocol,
            src_port: 0,
            dst_port: 0,
            l4: 0,
            tcp_flags: 0,
            related: None,
            bytes: ip.total_len(),
            packets: 1,
        };
        if let Some(gso) = meta.gso {
            let hdr = usize::from(gso.hdr_len).saturating_sub(ethernet::HEADER_LEN);
            let data = f.bytes.saturating_sub(hdr);
            let mss = usize::from(gso.size.max(1));
            f.packets = data.div_ceil(mss).max(1) as u64;
        }
        if ip.is_later_fragment() {
            return f;
        }
        match protocol {
            ipv4::protocol::TCP | ipv4::protocol::UDP => {
                if let [a, b, c, d, ..] = l4 {
                    f.src_port = u16::from_be_bytes([*a, *b]);
                    f.dst_port = u16::from_be_bytes([*c, *d]);
                    f.l4 = f.dst_port;
                }
                if protocol == ipv4::protocol::TCP {
                    f.tcp_flags = l4.get(13).copied().unwrap_or(0);
                }
            }
            ipv4::protocol::ICMP => {
                let (t, c) = match l4 {
                    [t, c, ..] => (*t, *c),
                    _ => (0, 0),
                };
                f.l4 = (u16::from(t) << 8) | u16::from(c);
                match t {
                    // echo, timestamp, information: the id pairs the two ways
                    0 | 8 | 13 | 14 | 15 | 16 => {
                        if let Some(id) = l4.get(4..6) {
                            let id = u16::from_be_bytes([id[0], id[1]]);
                            f.src_port = id;
                            f.dst_port = id;
                        }
                    }
                    // unreachable, source quench, redirect, time exceeded,
                    // parameter problem: quote the offending packet
                    3 | 4 | 5 | 11 | 12 => {
                        f.related = l4.get(icmpv4::HEADER_LEN..).and_then(quoted)
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        f
    }

    /// The flow hash handed to the egress (what [`flow::of_ipv4`] gives for
    /// an unfragmented packet).
    fn hash(&self) -> u32 {
        let ports = self.protocol == ipv4::protocol::TCP || self.protocol == ipv4::protocol::UDP;
        let (sp, dp) = if ports {
            (self.src_port, self.dst_port)
        } else {
            (0, 0)
        };
        flow::flow_hash(self.src, self.dst, self.protocol, sp, dp)
    }

    pub(super) fn tuple(&self, from: PortId, to: PortId) -> Tuple {
        Tuple {
            src: self.src,
            dst: self.dst,
            src_port: self.src_port,
            dst_port: self.dst_port,
            protocol: self.protocol,
            from,
            to,
        }
    }

    fn observation(&self, accept: bool) -> Observation {
        let ports = self.protocol == ipv4::protocol::TCP || self.protocol == ipv4::protocol::UDP;
        Observation {
            src: self.src,
            dst: self.dst,
            src_port: if ports { self.src_port } else { 0 },
            dst_port: if ports { self.dst_port } else { 0 },
            protocol: self.protocol,
            bytes: self.bytes,
            packets: self.packets,
            accept,
        }
    }
}

/// The quoted packet of an ICMP error, as (src, dst, protocol, ports) of
/// the flow it belongs to, turned around: the error travels back toward the
/// quoted packet's sender.
fn quoted(inner: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u8, u16, u16)> {
    let ihl = usize::from(inner.first()? & 0x0f) * 4;
    if inner.first()? >> 4 != 4 || ihl < ipv4::MIN_HEADER_LEN {
        return None;
    }
    let h = inner.get(..ihl)?;
    let proto = h[9];
    let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
    let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
    let l4 = inner.get(ihl..)?;
    let (sp, dp) = match (proto, l4) {
        (ipv4::protocol::TCP | ipv4::protocol::UDP, [a, b, c, d, ..]) => {
            (u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d]))
        }
        (ipv4::protocol::ICMP, [_, _, _, _, a, b, ..]) => {
            let id = u16::from_be_bytes([*a, *b]);
            (id, id)
        }
        _ => (0, 0),
    };
    // The quoted packet went src -> dst; the error goes back to src.
    Some((dst, src, proto, dp, sp))
}

/// Network ACLs at subnet boundaries, security groups with connection
/// tracking, and the destination check; counts flow-log records. On a drop,
/// the port to blame is set when it is the destination.
pub(super) fn admit(
    snap: &Snapshot,
    blame: &std::cell::Cell<Option<PortId>>,
    work: &mut Work<'_>,
    flow: &Flow,
    from: &End<'_>,
    to: &End<'_>,
) -> Result<(), DropReason> {
    if let Some(info) = to.info {
        if info.source_dest_check && !to.owns_dst {
            blame.set(Some(to.port));
            return Err(DropReason::SourceCheck);
        }
    }

    if from.subnet != to.subnet {
        let out = Probe {
            protocol: flow.protocol,
            l4: flow.l4,
            peer_ip: flow.dst,
        };
        if let Some(acl) = from
            .subnet
            .and_then(|s| snap.subnet_info.get(s))
            .and_then(|s| s.acl.as_ref())
        {
            if !acl.1.allows(&out) {
                log(work, from.info, flow, false);
                return Err(DropReason::Nacl);
            }
        }
        let inn = Probe {
            peer_ip: flow.src,
            ..out
        };
        if let Some(acl) = to
            .subnet
            .and_then(|s| snap.subnet_info.get(s))
            .and_then(|s| s.acl.as_ref())
        {
            if !acl.0.allows(&inn) {
                log(work, from.info, flow, true);
                log(work, to.info, flow, false);
                blame.set(Some(to.port));
                return Err(DropReason::Nacl);
            }
        }
    }

    // What the flow cache may remember of this decision: set below when
    // an existing tracking entry admitted it.
    let mut tracked = None;
    let filtered = |e: &End<'_>| e.info.is_some_and(|i| i.filtered);
    let filtering = filtered(from) || filtered(to);
    if filtering {
        let key = flow.tuple(from.port, to.port).key();
        if let Some(hit) = work.conntrack.lookup(&key, work.now) {
            let created_by_b = hit.flags() & flag::FROM_B != 0;
            let mut add = if created_by_b != key.from_b {
                flag::REPLIED
            } else {
                0
            };
            if flow.tcp_flags & TCP_FIN != 0 {
                add |= if key.from_b { flag::FIN_B } else { flag::FIN_A };
            }
            if flow.tcp_flags & TCP_RST != 0 {
                add |= flag::RST;
            }
            work.conntrack.touch(&hit, work.now, add);
            if flow.tcp_flags & (TCP_FIN | TCP_RST) == 0 {
                let (idx, ctl) = hit.at();
                tracked = Some((idx, ctl, add));
            }
        } else if !related_is_tracked(work, flow, from, to) {
            fn groups<'a>(e: &End<'a>, vpc: u32) -> &'a [u32] {
                match e.info {
                    Some(i) if e.vpc == vpc => &i.groups,
                    _ => &[],
                }
            }
            if let Some(info) = from.info.filter(|i| i.filtered) {
                let p = Probe {
                    protocol: flow.protocol,
                    l4: flow.l4,
                    peer_ip: flow.dst,
                };
                if !info
                    .egress
                    .iter()
                    .any(|r| r.admits(&p, groups(to, from.vpc)))
                {
                    log(work, from.info, flow, false);
                    return Err(DropReason::SecurityGroup);
                }
            }
            if let Some(info) = to.info.filter(|i| i.filtered) {
                let p = Probe {
                    protocol: flow.protocol,
                    l4: flow.l4,
                    peer_ip: flow.src,
                };
                if !info
                    .ingress
                    .iter()
                    .any(|r| r.admits(&p, groups(from, to.vpc)))
                {
                    log(work, from.info, flow, true);
                    log(work, to.info, flow, false);
                    blame.set(Some(to.port));
                    return Err(DropReason::SecurityGroup);
                }
            }
            let mut flags = 0;
            if flow.tcp_flags & TCP_RST != 0 {
                flags |= flag::RST;
            }
            // The connection-tracking allowance of the end that opens the
            // flow (so a guest's flood uses up its own, not its victim's),
            // or, when the opener has none (the internet, a service port),
            // of the destination. Taken before the insert (so concurrent
            // workers cannot overshoot), given back if the insert fails; the
            // entry's flags say whose it holds.
            let cap = |e: &End<'_>| e.info.map_or(0, |i| i.limits.conntrack);
            let payer = if cap(from) != 0 {
                Some((from, key.from_b))
            } else if cap(to) != 0 {
                Some((to, !key.from_b))
            } else {
                None
            };
            if let Some((e, canonical_b)) = payer {
                if let Some(c) = work.counters.get(e.port as usize) {
                    if !c.track(cap(e)) {
                        if e.port != from.port {
                            blame.set(Some(e.port));
                        }
                        return Err(DropReason::ConntrackFull);
                    }
                }
                flags |= if canonical_b {
                    flag::CHARGED_B
                } else {
                    flag::CHARGED_A
                };
            }
            match work.conntrack.insert(&key, work.now, flags) {
                Ok(reclaimed) => {
                    if let Some(p) = reclaimed {
                        super::untrack(work.counters, p);
                    }
                }
                Err(_) => {
                    if let Some((e, _)) = payer {
                        super::untrack(work.counters, e.port);
                    }
                    return Err(DropReason::ConntrackFull);
                }
            }
            for e in [from, to] {
                if let Some(c) = work.counters.get(e.port as usize) {
                    c.add_new_flow();
                }
            }
        }
    }

    log(work, from.info, flow, true);
    log(work, to.info, flow, true);
    let logged = |e: &End<'_>| e.info.is_some_and(|i| !i.flow_logs.is_empty());
    work.cacheable = match tracked {
        _ if logged(from) || logged(to) => Cacheable::No,
        Some((idx, ctl, add)) => Cacheable::Tracked(idx, ctl, add),
        None if !filtering => Cacheable::Untracked,
        None => Cacheable::No,
    };
    Ok(())
}

/// An ICMP error is admitted when the flow it quotes is tracked on this hop.
fn related_is_tracked(work: &Work<'_>, flow: &Flow, from: &End<'_>, to: &End<'_>) -> bool {
    let Some((src, dst, protocol, src_port, dst_port)) = flow.related else {
        return false;
    };
    let t = Tuple {
        src,
        dst,
        src_port,
        dst_port,
        protocol,
        from: from.port,
        to: to.port,
    };
    work.conntrack.lookup(&t.key(), work.now).is_some()
}

fn log(work: &mut Work<'_>, info: Option<&PortInfo>, flow: &Flow, accept: bool) {
    if let Some(info) = info {
        if !info.flow_logs.is_empty() {
            work.log.observe(
                &info.flow_logs,
                &info.eni,
                &flow.observation(accept),
                work.unix,
            );
        }
    }
}

/// Which address [`rewrite_address`] replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Src,
    Dst,
}

/// Replace the source or destination address and fix the IP header
/// checksum and the TCP/UDP checksum incrementally (RFC 1624), also when the
/// L4 field holds a partial sum for checksum offload. False if the frame
/// is too short for the headers it claims.
pub(super) fn rewrite_address(
    frame: &mut [u8],
    meta: &PacketMeta,
    side: Side,
    new: Ipv4Addr,
) -> bool {
    let Ok(mut eth) = ethernet::Frame::new_checked(&mut *frame) else {
        return false;
    };
    let Ok(mut ip) = ipv4::Packet::new_checked(eth.payload_mut()) else {
        return false;
    };
    let old = match side {
        Side::Src => ip.src(),
        Side::Dst => ip.dst(),
    };
    match side {
        Side::Src => ip.set_src(new),
        Side::Dst => ip.set_dst(new),
    }
    ip.fill_checksum();
    if ip.is_later_fragment() {
        return true;
    }
    let proto = ip.protocol();
    let at = match proto {
        ipv4::protocol::TCP => 16,
        ipv4::protocol::UDP => 6,
        _ => return true,
    };
    let l4 = ip.payload_mut();
    let Some(field) = l4.get_mut(at..at + 2) else {
        return proto != ipv4::protocol::TCP && proto != ipv4::protocol::UDP;
    };
    let cur = u16::from_be_bytes([field[0], field[1]]);
    let next = if meta.csum.is_some() {
        checksum::adjust_partial(cur, old, new)
    } else if proto == ipv4::protocol::UDP && cur == 0 {
        // UDP without a checksum stays without one.
        0
    } else {
        match checksum::adjust(cur, old, new) {
            0 if proto == ipv4::protocol::UDP => 0xffff,
            c => c,
        }
    };
    field.copy_from_slice(&next.to_be_bytes());
    true
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

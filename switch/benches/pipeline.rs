//! Packet-path throughput of the switch with VPC policy, one thread.
//!
//! `cargo bench -p enilab-switch --bench pipeline`
//!
//! Setting: one VPC with four /24 subnets, 100 ENIs (25 per subnet),
//! 50 security groups holding 1,000 rules in total (mixed CIDR and
//! group-reference peers, TCP/UDP port ranges, ICMP), every ENI in two
//! groups, network ACLs on two subnets, a main route table with extra
//! routes, source/destination check on. Frames are 64 bytes on the wire
//! (60 bytes Ethernet + IPv4 + TCP + padding, plus the 4-byte FCS the
//! switch never sees), built once and replayed; the egress only counts.
//!
//! Variants:
//! * `new-flow`: every frame opens a new flow: conntrack miss, NACLs, the
//!   sender's egress and the receiver's ingress rules, insert.
//! * `tracked-1M`: 1,000,000 established flows in a 2^21-slot table, every
//!   frame a conntrack hit, flows visited in a shuffled order.
//! * `tracked-1M+pf`: the same, calling `SwitchWorker::prefetch` on the
//!   frame four places ahead before each `process` (what a backend holding
//!   a burst of descriptors can do).
//! * `hot-1k`: the same path with a working set of 1,000 flows (cache-hot).
//! * `hot-1k+eni`: `hot-1k` with every ENI under the allowances the daemon
//!   gives an instance interface (bandwidth both ways, link-local, a
//!   conntrack cap; no pps, as the built-in types), far above what the bench
//!   sends: the cost of metering, not of dropping.
//! * `hot-1k+card`, `new-flow+card`: the same plus a card aggregate
//!   (bandwidth both ways) per two ENIs, as the daemon sets them now.
//!
//! Environment: `BENCH_FLOWS` (default 1000000), `BENCH_PASSES` (default 7),
//! `BENCH_SLOTS` (conntrack slots; default the power of two >= 2 x flows),
//! `BENCH_FLOW_CACHE=0` (no exact-match flow cache: the hot variants then
//! take the full path every frame; with it, `hot-1k` mostly hits the
//! 1,024-entry cache and the 1M variants mostly miss it).
//! Exits non-zero if any frame was not forwarded to the expected port, if
//! any flow was refused by the table, or if a counter shows a drop.

use std::net::Ipv4Addr;
use std::time::Instant;

use enilab_switch::{
    AclEntry, CardConfig, CardLimits, Cidr, Egress, NetworkAclConfig, PacketMeta, Peer, PortConfig,
    PortId, PortLimits, PortMatch, Protocol, Route, RouteTableConfig, RouteTarget,
    SecurityGroupConfig, SgRule, SubnetConfig, Switch, SwitchOptions, SwitchWorker, Topology,
    Verdict, VpcConfig, GATEWAY_MAC,
};

const ENIS: usize = 100;
const SUBNETS: usize = 4;
const GROUPS: usize = 50;
const RULES_PER_DIRECTION: usize = 10;
const FRAME_LEN: usize = 60;
/// How far ahead the `+pf` variants hint with `SwitchWorker::prefetch`.
const AHEAD: usize = 4;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fail(msg: String) -> ! {
    eprintln!("pipeline bench FAILED: {msg}");
    std::process::exit(1);
}

fn port_id(eni: usize) -> PortId {
    eni as PortId + 1
}

fn mac(eni: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, (eni >> 8) as u8, eni as u8 + 1]
}

fn ip(eni: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        0,
        (eni / (ENIS / SUBNETS)) as u8,
        10 + (eni % (ENIS / SUBNETS)) as u8,
    )
}

fn cidr(s: &str) -> Cidr {
    s.parse().expect("bench CIDR")
}

fn rule(proto: Protocol, lo: i32, hi: i32, peer: Peer) -> SgRule {
    SgRule {
        protocol: proto,
        ports: PortMatch::from_aws(proto, lo, hi).expect("bench ports"),
        peer,
    }
}

fn sg(g: usize) -> String {
    format!("sg-{g:017x}")
}

/// Group `g`: ten ingress and ten egress rules. Only the last rule of each
/// direction admits the bench traffic (TCP to 8000-8999 inside the VPC); the
/// nine before it are realistic misses, so a new flow scans up to 20 rules a
/// side.
fn group(g: usize) -> SecurityGroupConfig {
    let other = |k: usize| Peer::Group(sg((g + k) % GROUPS));
    let net = |k: usize| Peer::Cidr(cidr(&format!("172.{}.{}.0/24", 16 + k, g)));
    let mut ingress = vec![
        rule(Protocol::TCP, 22, 22, net(0)),
        rule(Protocol::TCP, 443, 443, Peer::Cidr(Cidr::ANY)),
        rule(Protocol::TCP, 5432, 5432, other(1)),
        rule(Protocol::UDP, 53, 53, Peer::Cidr(cidr("10.0.0.0/16"))),
        rule(Protocol::TCP, 9000, 9999, other(2)),
        rule(Protocol::UDP, 8000, 8999, Peer::Cidr(cidr("10.0.0.0/16"))),
        rule(Protocol::ICMP, 8, -1, net(1)),
        rule(Protocol::TCP, 1000 + g as i32, 1999, other(3)),
        rule(Protocol::TCP, 8000, 8999, net(2)),
    ];
    // Odd groups admit members of the even group below them (a group
    // reference that most senders miss); even groups admit the VPC block.
    let (in_peer, out_peer) = if g % 2 == 0 {
        let vpc = Peer::Cidr(cidr("10.0.0.0/16"));
        (vpc.clone(), vpc)
    } else {
        (Peer::Group(sg(g - 1)), Peer::Group(sg(g - 1)))
    };
    ingress.push(rule(Protocol::TCP, 8000, 8999, in_peer));
    let mut egress = vec![
        rule(Protocol::UDP, 53, 53, Peer::Cidr(Cidr::ANY)),
        rule(Protocol::TCP, 443, 443, Peer::Cidr(cidr("0.0.0.0/1"))),
        rule(Protocol::TCP, 5432, 5432, other(4)),
        rule(Protocol::UDP, 123, 123, net(3)),
        rule(Protocol::TCP, 3306, 3306, other(5)),
        rule(Protocol::TCP, 8000, 8999, net(4)),
        rule(Protocol::ICMP, -1, -1, Peer::Cidr(cidr("10.0.0.0/16"))),
        rule(Protocol::UDP, 8000, 8999, Peer::Cidr(cidr("10.0.0.0/16"))),
        rule(Protocol::TCP, 9000, 9999, Peer::Cidr(cidr("10.0.0.0/16"))),
    ];
    egress.push(rule(Protocol::TCP, 1024, 65535, out_peer));
    assert_eq!(ingress.len(), RULES_PER_DIRECTION);
    assert_eq!(egress.len(), RULES_PER_DIRECTION);
    SecurityGroupConfig {
        id: sg(g),
        vpc_id: "vpc-bench".into(),
        ingress,
        egress,
    }
}

fn acl(id: &str) -> NetworkAclConfig {
    let e = |number, protocol, lo, hi, c: &str, allow| AclEntry {
        number,
        protocol,
        ports: PortMatch::from_aws(protocol, lo, hi).expect("acl ports"),
        cidr: cidr(c),
        allow,
    };
    let entries = vec![
        e(100, Protocol::TCP, 23, 23, "0.0.0.0/0", false),
        e(110, Protocol::UDP, 1900, 1900, "0.0.0.0/0", false),
        e(120, Protocol::All, -1, -1, "192.168.0.0/16", false),
        e(130, Protocol::TCP, 3389, 3389, "0.0.0.0/0", false),
        e(200, Protocol::TCP, 1024, 65535, "10.0.0.0/16", true),
        e(300, Protocol::All, -1, -1, "0.0.0.0/0", true),
    ];
    NetworkAclConfig {
        id: id.into(),
        vpc_id: "vpc-bench".into(),
        ingress: entries.clone(),
        egress: entries,
    }
}

fn topology() -> Topology {
    let vpc = "vpc-bench";
    let subnets = (0..SUBNETS)
        .map(|s| SubnetConfig {
            id: format!("subnet-{s}"),
            vpc_id: vpc.into(),
            cidr: (Ipv4Addr::new(10, 0, s as u8, 0), 24),
            network_acl: (s == 1 || s == 2).then(|| format!("acl-{s}")),
            ..SubnetConfig::default()
        })
        .collect();
    let ports = (0..ENIS)
        .map(|i| {
            // One odd group first, then an even one: the admitting rule of
            // the port's rule list is its 20th.
            let odd = (2 * i + 1) % GROUPS;
            let even = (2 * i + 2 * (i / GROUPS)) % GROUPS;
            PortConfig {
                id: port_id(i),
                eni_id: format!("eni-{i:017x}"),
                mac: mac(i),
                subnet: i / (ENIS / SUBNETS),
                primary_ip: ip(i),
                security_groups: vec![sg(odd), sg(even)],
                source_dest_check: true,
                ..PortConfig::default()
            }
        })
        .collect();
    Topology {
        generation: 1,
        vpcs: vec![VpcConfig {
            id: vpc.into(),
            cidrs: vec![cidr("10.0.0.0/16")],
            internet_gateway: None,
            main_route_table: Some("rtb-main".into()),
        }],
        subnets,
        ports,
        route_tables: vec![RouteTableConfig {
            id: "rtb-main".into(),
            vpc_id: vpc.into(),
            routes: vec![
                Route {
                    destination: cidr("172.16.0.0/12"),
                    target: RouteTarget::Blackhole,
                },
                Route {
                    destination: cidr("192.168.0.0/16"),
                    target: RouteTarget::Eni(format!("eni-{:017x}", 0)),
                },
            ],
        }],
        security_groups: (0..GROUPS).map(group).collect(),
        network_acls: vec![acl("acl-1"), acl("acl-2")],
        ..Topology::default()
    }
}

#[derive(Clone, Copy)]
struct Flow {
    src: usize,
    dst: usize,
    sport: u16,
    dport: u16,
}

/// Flow `k`: between two different ENIs, each flow a distinct 5-tuple.
fn flow(k: usize) -> Flow {
    let src = k % ENIS;
    let dst = (src + 1 + (k / ENIS) % (ENIS - 1)) % ENIS;
    Flow {
        src,
        dst,
        // Clear of the ports the NACLs deny (replies go to the source port).
        sport: 20_000 + (k / ENIS) as u16,
        dport: 8000 + (k % 1000) as u16,
    }
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Frame {
    bytes: [u8; 64],
    /// The Ethernet addresses as the guest sent them: the switch rewrites
    /// them in place, and a replayed frame must carry its sender's MAC
    /// again (else it is `spoofed_mac`).
    macs: [u8; 12],
    ingress: PortId,
    dest: PortId,
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Ethernet + IPv4 + TCP (ACK), 54 bytes padded to 60.
fn frame(f: &Flow, reverse: bool) -> Frame {
    let (s, d, sp, dp) = if reverse {
        (f.dst, f.src, f.dport, f.sport)
    } else {
        (f.src, f.dst, f.sport, f.dport)
    };
    let mut b = [0u8; 64];
    b[0..6].copy_from_slice(&GATEWAY_MAC);
    b[6..12].copy_from_slice(&mac(s));
    b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ipb = &mut b[14..34];
    ipb[0] = 0x45;
    ipb[2..4].copy_from_slice(&40u16.to_be_bytes());
    ipb[6] = 0x40; // DF
    ipb[8] = 64;
    ipb[9] = 6;
    ipb[12..16].copy_from_slice(&ip(s).octets());
    ipb[16..20].copy_from_slice(&ip(d).octets());
    let c = checksum(ipb);
    ipb[10..12].copy_from_slice(&c.to_be_bytes());
    let t = &mut b[34..54];
    t[0..2].copy_from_slice(&sp.to_be_bytes());
    t[2..4].copy_from_slice(&dp.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x10; // ACK
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut macs = [0u8; 12];
    macs.copy_from_slice(&b[..12]);
    Frame {
        bytes: b,
        macs,
        ingress: port_id(s),
        dest: port_id(d),
    }
}

/// Counts what the switch emits; copies nothing.
#[derive(Default)]
struct Count {
    frames: u64,
    port_sum: u64,
}

impl Egress for Count {
    #[inline]
    fn emit(&mut self, port: PortId, _hash: u32, frame: &[u8], _meta: &PacketMeta) -> bool {
        self.frames += 1;
        self.port_sum += u64::from(port) + frame.len() as u64;
        true
    }
}

/// Push every frame once; return the elapsed seconds. Fails the run if a
/// frame is not forwarded to its destination.
/// With `ahead` > 0, `SwitchWorker::prefetch` is called on the frame that
/// many places ahead before each `process`, as a backend holding a burst
/// would.
fn run(worker: &mut SwitchWorker, frames: &mut [Frame], label: &str, ahead: usize) -> f64 {
    let meta = PacketMeta::default();
    let mut out = Count::default();
    let mut forwarded = 0u64;
    let mut dest_sum = 0u64;
    let start = Instant::now();
    for i in 0..frames.len() {
        if ahead > 0 {
            if let Some(next) = frames.get(i + ahead) {
                worker.prefetch(next.ingress, &next.bytes[..FRAME_LEN]);
            }
        }
        let f = &mut frames[i];
        f.bytes[..12].copy_from_slice(&f.macs);
        let v = worker.process(f.ingress, &mut f.bytes[..FRAME_LEN], &meta, &mut out);
        if let Verdict::Forwarded(p) = v {
            forwarded += 1;
            dest_sum += u64::from(p);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let want_sum: u64 = frames.iter().map(|f| u64::from(f.dest)).sum();
    let n = frames.len() as u64;
    if forwarded != n || out.frames != n || dest_sum != want_sum {
        // Find the first offender for the message.
        let bad = frames.iter_mut().find_map(|f| {
            let mut c = Count::default();
            f.bytes[..12].copy_from_slice(&f.macs);
            let v = worker.process(f.ingress, &mut f.bytes[..FRAME_LEN], &meta, &mut c);
            (v != Verdict::Forwarded(f.dest)).then(|| format!("{} -> {}: {v:?}", f.ingress, f.dest))
        });
        fail(format!(
            "{label}: {forwarded}/{n} forwarded, {} emitted, destination sum {dest_sum} != {want_sum}; e.g. {}",
            out.frames,
            bad.unwrap_or_default()
        ));
    }
    if out.port_sum != want_sum + n * FRAME_LEN as u64 {
        fail(format!("{label}: emitted frames went to the wrong ports"));
    }
    secs
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut s = seed | 1;
    for i in (1..v.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Print one variant's line: median Mpps, min..max, ns/packet.
fn report(label: &str, packets: usize, secs: &mut [f64]) {
    let mpps: Vec<f64> = secs.iter().map(|s| packets as f64 / s / 1e6).collect();
    let lo = mpps.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = mpps.iter().copied().fold(0.0, f64::max);
    let med = median(secs);
    println!(
        "{label:<12} {:>6.2} Mpps median  ({lo:.2}..{hi:.2} over {} passes)  {:>6.1} ns/packet  [{packets} packets/pass]",
        packets as f64 / med / 1e6,
        secs.len(),
        med * 1e9 / packets as f64,
    );
}

fn main() {
    let flows = env_usize("BENCH_FLOWS", 1_000_000);
    let passes = env_usize("BENCH_PASSES", 7).max(1);
    let slots = env_usize("BENCH_SLOTS", (2 * flows).next_power_of_two());

    let topo = topology();
    let rules: usize = topo
        .security_groups
        .iter()
        .map(|g| g.ingress.len() + g.egress.len())
        .sum();
    // BENCH_FLOW_CACHE=0: every frame takes the full path.
    let flow_cache = env_usize("BENCH_FLOW_CACHE", 1) != 0;
    let switch = Switch::with_options(SwitchOptions {
        conntrack_slots: slots,
        flow_cache,
        ..SwitchOptions::default()
    });
    switch.publish(enilab_switch::Snapshot::compile(topo).expect("bench topology compiles"));
    let mut worker = switch.worker();

    let mut order: Vec<usize> = (0..flows).collect();
    shuffle(&mut order, 0x9e37_79b9_7f4a_7c15);
    let mut fwd: Vec<Frame> = order.iter().map(|&k| frame(&flow(k), false)).collect();
    println!(
        "pipeline bench: {ENIS} ENIs, {SUBNETS} subnets (2 with NACLs), {} security groups, \
         {rules} SG rules, {flows} flows, {}-byte frames (+FCS), {slots} conntrack slots, \
         flow cache {}",
        GROUPS,
        FRAME_LEN,
        if flow_cache { "on" } else { "off" }
    );

    // New flows: an empty table each pass, every frame misses, is checked
    // against NACLs and both ends' rules, and is inserted.
    let mut secs = Vec::new();
    for _ in 0..passes {
        switch.clear_conntrack();
        secs.push(run(&mut worker, &mut fwd, "new-flow", 0));
    }
    report("new-flow", flows, &mut secs);
    let mut secs = Vec::new();
    for _ in 0..passes {
        switch.clear_conntrack();
        secs.push(run(&mut worker, &mut fwd, "new-flow+prefetch", AHEAD));
    }
    report("new-flow+pf", flows, &mut secs);

    // Replies make every flow established (the long TCP timeout).
    let mut rev: Vec<Frame> = order.iter().map(|&k| frame(&flow(k), true)).collect();
    run(&mut worker, &mut rev, "replies", 0);
    drop(rev);

    // Tracked flows, visited in a shuffled order.
    let mut secs = Vec::new();
    for _ in 0..passes {
        secs.push(run(&mut worker, &mut fwd, "tracked", 0));
    }
    report(&format!("tracked-{}", short(flows)), flows, &mut secs);

    // The same, with the prefetch hint four frames ahead.
    let mut secs = Vec::new();
    for _ in 0..passes {
        secs.push(run(&mut worker, &mut fwd, "tracked+prefetch", AHEAD));
    }
    report(&format!("tracked-{}+pf", short(flows)), flows, &mut secs);

    // Hot working set: 1,000 of those flows, replayed.
    let hot_n = flows.min(1000);
    let mut hot: Vec<Frame> = (0..flows.max(1_000_000) / hot_n)
        .flat_map(|_| fwd[..hot_n].iter().copied())
        .collect();
    let mut secs = Vec::new();
    let hits = worker.flow_cache_hits();
    for _ in 0..passes {
        secs.push(run(&mut worker, &mut hot, "hot", 0));
    }
    report(&format!("hot-{}", short(hot_n)), hot.len(), &mut secs);
    println!(
        "  flow cache: {:.1}% of the hot frames",
        100.0 * (worker.flow_cache_hits() - hits) as f64 / (hot.len() * passes) as f64
    );

    // The same, metered per ENI, then per ENI and card; new flows too.
    for (cards, label) in [(false, "eni"), (true, "card")] {
        switch.publish(
            enilab_switch::Snapshot::compile(with_allowances(topology(), cards))
                .expect("bench topology with allowances compiles"),
        );
        let mut secs = Vec::new();
        for _ in 0..passes {
            secs.push(run(&mut worker, &mut hot, label, 0));
        }
        report(
            &format!("hot-{}+{label}", short(hot_n)),
            hot.len(),
            &mut secs,
        );
    }
    let mut secs = Vec::new();
    for _ in 0..passes {
        switch.clear_conntrack();
        secs.push(run(&mut worker, &mut fwd, "new-flow+card", 0));
    }
    report("new-flow+card", flows, &mut secs);

    let (stats, _) = switch.conntrack_census();
    let bytes = stats.capacity as usize * Switch::CONNTRACK_SLOT_BYTES;
    println!(
        "conntrack: {} tracked flows, {} slots x {} B = {:.1} MiB, {:.1} B per tracked flow \
         (load {:.2}), {} refused",
        stats.tracked,
        stats.capacity,
        Switch::CONNTRACK_SLOT_BYTES,
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / stats.tracked.max(1) as f64,
        stats.tracked as f64 / stats.capacity as f64,
        stats.full,
    );
    if stats.tracked != flows as u64 || stats.full != 0 {
        fail(format!(
            "expected {flows} tracked flows and none refused, got {stats:?}"
        ));
    }
    for i in 0..ENIS {
        let s = switch.stats(port_id(i));
        if s.total_drops() != 0 {
            fail(format!("port {} counted drops: {s:?}", port_id(i)));
        }
    }
}

/// `topo` with every ENI metered as the daemon meters an instance
/// interface (with allowances no bench run reaches), and with `cards` one
/// card aggregate per two ENIs (an "instance").
fn with_allowances(mut topo: Topology, cards: bool) -> Topology {
    for p in &mut topo.ports {
        p.limits = PortLimits {
            pps: 0,
            bw_out_bps: 1_000_000_000_000,
            bw_in_bps: 1_000_000_000_000,
            linklocal_pps: 1024,
            conntrack: 1 << 30,
        };
        if cards {
            p.card = Some((format!("i-{}", (p.id - 1) / 2), 0));
        }
    }
    if cards {
        topo.cards = (0..ENIS.div_ceil(2))
            .map(|i| CardConfig {
                instance: format!("i-{i}"),
                card: 0,
                limits: CardLimits {
                    pps: 0,
                    bw_out_bps: 1_000_000_000_000,
                    bw_in_bps: 1_000_000_000_000,
                },
            })
            .collect();
    }
    topo.generation += 1;
    topo
}

fn short(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

//! Fixture tables for VPC policy: routes, security groups with connection
//! tracking, network ACLs, source/destination check, Elastic IPs through
//! the internet gateway, flow logs.
//!
//! Rows run in order against one switch, because connection tracking makes
//! the answer to a frame depend on the frames before it. A step is a frame
//! (with its expected verdict, the exact frames emitted and the port its
//! drop is counted on), a new snapshot, or a jump of the switch's clock.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use etherparse::PacketBuilder;

use super::tests::{echo, set_macs, tcp, udp, who_has, Capture};
use super::*;
use crate::config::{SnapshotError, Topology, UplinkConfig, VpcConfig};
use crate::policy::*;
use crate::GATEWAY_MAC as GW;

// ---------------------------------------------------------------------------
// Topology
//
// vpc-a 10.0.0.0/16, igw-a attached; main route table: 0.0.0.0/0 -> igw-a
//   a1 10.0.1.0/24: port 1 (.10, sg-web, EIP 203.0.113.10), port 2 (.20,
//                   sg-db), port 6 (.50, router, check off, sg-router),
//                   port 7 (.60, no groups)
//   a2 10.0.2.0/24, acl-2 (deny tcp 23, allow the rest): port 3 (.30, sg-ssh)
//   a3 10.0.3.0/24, rtb-fw (10.0.2.0/24 -> port 6's ENI): port 5 (.40, sg-web)
//   a4 10.0.4.0/24, acl-4 (custom, no entries: denies all): port 8 (.80, sg-web)
// vpc-b 10.0.0.0/16 (overlaps vpc-a): b1 10.0.1.0/24: port 4 (.20, sg-b)
// uplink: port 100
// ---------------------------------------------------------------------------

pub(super) fn mac(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, n]
}
pub(super) const UPLINK: PortId = 100;
const UP_MAC: [u8; 6] = [0x02, 0xe1, 0x16, 0, 0, 1];
const NS_MAC: [u8; 6] = [0x02, 0xe1, 0x16, 0, 0, 2];
pub(super) const P1: [u8; 4] = [10, 0, 1, 10];
pub(super) const P2: [u8; 4] = [10, 0, 1, 20];
const P3: [u8; 4] = [10, 0, 2, 30];
pub(super) const P4: [u8; 4] = [10, 0, 1, 20];
const P5: [u8; 4] = [10, 0, 3, 40];
pub(super) const P6: [u8; 4] = [10, 0, 1, 50];
pub(super) const P7: [u8; 4] = [10, 0, 1, 60];
pub(super) const P8: [u8; 4] = [10, 0, 4, 80];
const EIP1: [u8; 4] = [203, 0, 113, 10];
const NET: [u8; 4] = [203, 0, 113, 1];

pub(super) fn cidr(s: &str) -> Cidr {
    s.parse().expect("fixture CIDR")
}

fn rule(proto: Protocol, lo: i32, hi: i32, peer: Peer) -> SgRule {
    SgRule {
        protocol: proto,
        ports: PortMatch::from_aws(proto, lo, hi).expect("fixture ports"),
        peer,
    }
}

fn any_rule() -> SgRule {
    rule(Protocol::All, -1, -1, Peer::Cidr(Cidr::ANY))
}

fn group(id: &str, vpc: &str, ingress: Vec<SgRule>, egress: Vec<SgRule>) -> SecurityGroupConfig {
    SecurityGroupConfig {
        id: id.into(),
        vpc_id: vpc.into(),
        ingress,
        egress,
    }
}

fn subnet(id: &str, vpc: &str, net: [u8; 4]) -> SubnetConfig {
    SubnetConfig {
        id: id.into(),
        vpc_id: vpc.into(),
        cidr: (Ipv4Addr::from(net), 24),
        ..SubnetConfig::default()
    }
}

fn port(id: PortId, subnet: usize, ip: [u8; 4], groups: &[&str]) -> PortConfig {
    PortConfig {
        id,
        eni_id: format!("eni-{id:017x}"),
        mac: mac(id as u8),
        subnet,
        primary_ip: Ipv4Addr::from(ip),
        security_groups: groups.iter().map(|g| g.to_string()).collect(),
        ..PortConfig::default()
    }
}

fn acl_entry(number: u16, proto: Protocol, lo: i32, hi: i32, allow: bool) -> AclEntry {
    AclEntry {
        number,
        protocol: proto,
        ports: PortMatch::from_aws(proto, lo, hi).expect("fixture ports"),
        cidr: Cidr::ANY,
        allow,
    }
}

pub(super) fn topology() -> Topology {
    let vpc_a = "vpc-a";
    let mut a2 = subnet("subnet-a2", vpc_a, [10, 0, 2, 0]);
    a2.network_acl = Some("acl-2".into());
    let mut a3 = subnet("subnet-a3", vpc_a, [10, 0, 3, 0]);
    a3.route_table = Some("rtb-fw".into());
    let mut a4 = subnet("subnet-a4", vpc_a, [10, 0, 4, 0]);
    a4.network_acl = Some("acl-4".into());
    let mut router = port(6, 0, P6, &["sg-router"]);
    router.source_dest_check = false;
    Topology {
        generation: 1,
        vpcs: vec![
            VpcConfig {
                id: vpc_a.into(),
                cidrs: vec![cidr("10.0.0.0/16")],
                internet_gateway: Some("igw-a".into()),
                main_route_table: Some("rtb-main".into()),
            },
            VpcConfig {
                id: "vpc-b".into(),
                cidrs: vec![cidr("10.0.0.0/16")],
                ..VpcConfig::default()
            },
        ],
        subnets: vec![
            subnet("subnet-a1", vpc_a, [10, 0, 1, 0]),
            a2,
            a3,
            a4,
            subnet("subnet-b1", "vpc-b", [10, 0, 1, 0]),
        ],
        ports: vec![
            port(1, 0, P1, &["sg-web"]),
            port(2, 0, P2, &["sg-db"]),
            port(3, 1, P3, &["sg-ssh"]),
            port(4, 4, P4, &["sg-b"]),
            port(5, 2, P5, &["sg-web"]),
            router,
            port(7, 0, P7, &[]),
            port(8, 3, P8, &["sg-web"]),
        ],
        route_tables: vec![
            RouteTableConfig {
                id: "rtb-main".into(),
                vpc_id: vpc_a.into(),
                routes: vec![Route {
                    destination: Cidr::ANY,
                    target: RouteTarget::InternetGateway("igw-a".into()),
                }],
            },
            RouteTableConfig {
                id: "rtb-fw".into(),
                vpc_id: vpc_a.into(),
                routes: vec![Route {
                    destination: cidr("10.0.2.0/24"),
                    target: RouteTarget::Eni(format!("eni-{:017x}", 6)),
                }],
            },
        ],
        security_groups: vec![
            group(
                "sg-web",
                vpc_a,
                vec![rule(Protocol::TCP, 80, 80, Peer::Cidr(Cidr::ANY))],
                vec![any_rule()],
            ),
            // No egress rule at all: only replies of tracked flows leave.
            group(
                "sg-db",
                vpc_a,
                vec![rule(
                    Protocol::TCP,
                    5432,
                    5432,
                    Peer::Group("sg-web".into()),
                )],
                vec![],
            ),
            group(
                "sg-ssh",
                vpc_a,
                vec![
                    rule(Protocol::TCP, 22, 23, Peer::Cidr(cidr("10.0.0.0/16"))),
                    rule(Protocol::ICMP, 8, -1, Peer::Cidr(cidr("10.0.0.0/16"))),
                ],
                vec![any_rule()],
            ),
            group(
                "sg-router",
                vpc_a,
                vec![rule(Protocol::All, -1, -1, Peer::Cidr(cidr("10.0.0.0/16")))],
                vec![any_rule()],
            ),
            SecurityGroupConfig::default_for("sg-b", "vpc-b"),
        ],
        network_acls: vec![
            NetworkAclConfig {
                id: "acl-2".into(),
                vpc_id: vpc_a.into(),
                ingress: vec![
                    acl_entry(200, Protocol::All, -1, -1, true),
                    acl_entry(100, Protocol::TCP, 23, 23, false),
                ],
                egress: vec![acl_entry(100, Protocol::All, -1, -1, true)],
            },
            NetworkAclConfig {
                id: "acl-4".into(),
                vpc_id: vpc_a.into(),
                ingress: vec![],
                egress: vec![],
            },
        ],
        elastic_ips: vec![ElasticIp {
            public_ip: Ipv4Addr::from(EIP1),
            vpc_id: vpc_a.into(),
            private_ip: Ipv4Addr::from(P1),
        }],
        flow_logs: vec![],
        uplink: Some(UplinkConfig {
            port: UPLINK,
            mac: UP_MAC,
            peer_mac: NS_MAC,
        }),
        metadata: None,
        service_returns: Vec::new(),
        cards: Vec::new(),
    }
}

// ---------------------------------------------------------------------------
// Steps and runner
// ---------------------------------------------------------------------------

pub(super) enum Step {
    Frame {
        desc: &'static str,
        ingress: PortId,
        frame: Vec<u8>,
        verdict: Verdict,
        /// Exact frames emitted, in order.
        out: Vec<(PortId, Vec<u8>)>,
        /// Where a drop is counted (None: the ingress port).
        blame: Option<PortId>,
    },
    Publish(Box<Topology>),
    Advance(u32),
}

pub(super) fn pass(
    desc: &'static str,
    ingress: PortId,
    frame: Vec<u8>,
    to: PortId,
    out: Vec<u8>,
) -> Step {
    Step::Frame {
        desc,
        ingress,
        frame,
        verdict: Verdict::Forwarded(to),
        out: vec![(to, out)],
        blame: None,
    }
}

pub(super) fn drop(
    desc: &'static str,
    ingress: PortId,
    frame: Vec<u8>,
    reason: DropReason,
) -> Step {
    Step::Frame {
        desc,
        ingress,
        frame,
        verdict: Verdict::Dropped(reason),
        out: vec![],
        blame: None,
    }
}

pub(super) fn drop_at(
    desc: &'static str,
    ingress: PortId,
    frame: Vec<u8>,
    reason: DropReason,
    at: PortId,
) -> Step {
    Step::Frame {
        desc,
        ingress,
        frame,
        verdict: Verdict::Dropped(reason),
        out: vec![],
        blame: Some(at),
    }
}

fn tcp_flags(
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    syn: bool,
    fin: bool,
) -> Vec<u8> {
    let mut v = Vec::new();
    let b = PacketBuilder::ethernet2(src_mac, GW)
        .ipv4(src, dst, 64)
        .tcp(ports.0, ports.1, 1000, 65535);
    let b = if syn { b.syn() } else { b.ack(1) };
    let b = if fin { b.fin() } else { b };
    b.write(&mut v, b"").expect("build tcp");
    v
}

/// A TCP frame as the uplink sees it (namespace MAC to the uplink's).
fn tcp_net(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    tcp(src_mac, dst_mac, src, dst, ports, payload)
}

fn icmp_unreachable(src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(src_mac, GW)
        .ipv4(src, dst, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut v, quoted)
        .expect("build icmp");
    v
}

pub(super) struct Bench {
    pub(super) sw: Arc<Switch>,
    pub(super) worker: SwitchWorker,
    clock: Arc<AtomicU32>,
}

pub(super) fn bench(topo: Topology, slots: usize) -> Bench {
    bench_with(topo, slots, true)
}

fn bench_with(topo: Topology, slots: usize, flow_cache: bool) -> Bench {
    let clock = Arc::new(AtomicU32::new(1000));
    let sw = Switch::with_options(SwitchOptions {
        conntrack_slots: slots,
        manual_clock: Some(clock.clone()),
        flow_cache,
        conntrack_seed: Some(0x5eed),
        ..SwitchOptions::default()
    });
    sw.publish(Snapshot::compile(topo).expect("fixture topology compiles"));
    let worker = sw.worker();
    Bench { sw, worker, clock }
}

pub(super) fn run(b: &mut Bench, steps: Vec<Step>) {
    run_hinted(b, steps, false)
}

/// [`run`], with `hint`: every frame is first given to
/// `SwitchWorker::prefetch`, as the card worker does a few frames ahead.
/// Verdicts, frames and counts must not change.
fn run_hinted(b: &mut Bench, steps: Vec<Step>, hint: bool) {
    for step in steps {
        match step {
            Step::Publish(t) => {
                b.sw.publish(Snapshot::compile(*t).expect("fixture compiles"))
            }
            Step::Advance(s) => {
                b.clock.fetch_add(s, Ordering::Relaxed);
            }
            Step::Frame {
                desc,
                ingress,
                frame,
                verdict,
                out,
                blame,
            } => {
                let before: Vec<PortStats> = (0..=UPLINK).map(|p| b.sw.stats(p)).collect();
                let mut cap = Capture::default();
                let mut f = frame.clone();
                if hint {
                    b.worker.prefetch(ingress, &f);
                }
                let got = b
                    .worker
                    .process(ingress, &mut f, &PacketMeta::default(), &mut cap);
                assert_eq!(got, verdict, "{desc}: verdict");
                let sent: Vec<(PortId, Vec<u8>)> =
                    cap.sent.iter().map(|s| (s.port, s.frame.clone())).collect();
                assert_eq!(sent.len(), out.len(), "{desc}: frames emitted {sent:?}");
                for (i, (g, w)) in sent.iter().zip(&out).enumerate() {
                    assert_eq!(g.0, w.0, "{desc}: frame {i} port");
                    assert_eq!(g.1, w.1, "{desc}: frame {i} bytes");
                }
                if let Verdict::Dropped(reason) = verdict {
                    let at = blame.unwrap_or(ingress);
                    let after = b.sw.stats(at);
                    assert_eq!(
                        after.drops(reason),
                        before[at as usize].drops(reason) + 1,
                        "{desc}: {reason} counted on port {at}"
                    );
                    for p in 0..=UPLINK {
                        if p != at {
                            assert_eq!(
                                b.sw.stats(p).total_drops(),
                                before[p as usize].total_drops(),
                                "{desc}: no drop on port {p}"
                            );
                        }
                    }
                }
                assert_eq!(
                    b.sw.stats(ingress).tx_packets,
                    before[ingress as usize].tx_packets + 1,
                    "{desc}: tx"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------

fn security_group_steps() -> Vec<Step> {
    let web_to_db = tcp(mac(1), GW, P1, P2, (40001, 5432), b"q");
    let db_reply = tcp(mac(2), GW, P2, P1, (5432, 40001), b"r");
    let mut no_db_rule = topology();
    no_db_rule.generation = 2;
    no_db_rule.security_groups[1].ingress.clear();
    vec![
        drop(
            "db has no egress rule: a new flow from it is refused",
            2,
            tcp(mac(2), GW, P2, P1, (40000, 80), b""),
            DropReason::SecurityGroup,
        ),
        pass(
            "web -> db:5432, admitted by the group reference",
            1,
            web_to_db.clone(),
            2,
            set_macs(web_to_db.clone(), mac(2), mac(1)),
        ),
        pass(
            "db's reply leaves on the tracked flow",
            2,
            db_reply.clone(),
            1,
            set_macs(db_reply.clone(), mac(1), mac(2)),
        ),
        drop_at(
            "ssh host is not in sg-web: db refuses it",
            3,
            tcp(mac(3), GW, P3, P2, (40000, 5432), b""),
            DropReason::SecurityGroup,
            2,
        ),
        pass(
            "unfiltered port -> web:80",
            7,
            tcp(mac(7), GW, P7, P1, (40000, 80), b""),
            1,
            tcp(mac(7), mac(1), P7, P1, (40000, 80), b""),
        ),
        drop_at(
            "web:81 is not open",
            7,
            tcp(mac(7), GW, P7, P1, (40000, 81), b""),
            DropReason::SecurityGroup,
            1,
        ),
        drop_at(
            "web: no UDP rule",
            7,
            udp(mac(7), GW, P7, P1, 64, (5000, 80), b""),
            DropReason::SecurityGroup,
            1,
        ),
        Step::Publish(Box::new(no_db_rule)),
        pass(
            "rule removed: the tracked flow keeps going",
            1,
            web_to_db.clone(),
            2,
            set_macs(web_to_db, mac(2), mac(1)),
        ),
        drop_at(
            "rule removed: a new flow is refused",
            1,
            tcp(mac(1), GW, P1, P2, (40002, 5432), b""),
            DropReason::SecurityGroup,
            2,
        ),
        pass(
            "and the tracked reply still passes",
            2,
            db_reply.clone(),
            1,
            set_macs(db_reply.clone(), mac(1), mac(2)),
        ),
        Step::Advance(432_001),
        drop(
            "after 5 idle days the flow is forgotten",
            2,
            db_reply,
            DropReason::SecurityGroup,
        ),
        Step::Publish(Box::new(topology())),
    ]
}

fn udp_and_icmp_steps() -> Vec<Step> {
    let q = udp(mac(3), GW, P3, P7, 64, (5000, 53), b"q");
    let r = udp(mac(7), GW, P7, P3, 64, (53, 5000), b"r");
    let q2 = udp(mac(3), GW, P3, P7, 64, (5001, 53), b"q");
    let r2 = udp(mac(7), GW, P7, P3, 64, (53, 5001), b"r");
    let ping = echo(mac(1), GW, P1, P7, 64, false);
    let pong = echo(mac(7), GW, P7, P1, 64, true);
    let out_udp = udp(mac(1), GW, P1, P7, 64, (5555, 6666), b"x");
    // What port 7's stack quotes back: the IP header and 8 bytes of UDP.
    let quoted = out_udp[14..14 + 28].to_vec();
    let mut stray = quoted.clone();
    stray[20..22].copy_from_slice(&7777u16.to_be_bytes());
    let unreachable = icmp_unreachable(mac(7), P7, P1, &quoted);
    let stray_unreachable = icmp_unreachable(mac(7), P7, P1, &stray);
    vec![
        pass(
            "udp query from the ssh host",
            3,
            q.clone(),
            7,
            set_macs(q, mac(7), GW),
        ),
        Step::Advance(30),
        pass(
            "answer within 30 s is admitted",
            7,
            r.clone(),
            3,
            set_macs(r, mac(3), GW),
        ),
        pass("another query", 3, q2.clone(), 7, set_macs(q2, mac(7), GW)),
        Step::Advance(31),
        drop_at(
            "answer after 30 s of a one-way flow is refused",
            7,
            r2,
            DropReason::SecurityGroup,
            3,
        ),
        pass(
            "echo request from web",
            1,
            ping.clone(),
            7,
            set_macs(ping, mac(7), mac(1)),
        ),
        pass(
            "echo reply admitted by tracking (web has no ICMP rule)",
            7,
            pong.clone(),
            1,
            set_macs(pong, mac(1), mac(7)),
        ),
        pass(
            "udp from web",
            1,
            out_udp.clone(),
            7,
            set_macs(out_udp, mac(7), mac(1)),
        ),
        pass(
            "port unreachable for it is related and admitted",
            7,
            unreachable.clone(),
            1,
            set_macs(unreachable, mac(1), mac(7)),
        ),
        drop_at(
            "an unreachable quoting an unknown flow is refused",
            7,
            stray_unreachable,
            DropReason::SecurityGroup,
            1,
        ),
    ]
}

fn nacl_steps() -> Vec<Step> {
    let ssh = tcp(mac(1), GW, P1, P3, (40000, 22), b"");
    vec![
        drop_at(
            "acl-2 rule 100 denies tcp 23 before rule 200 allows",
            1,
            tcp(mac(1), GW, P1, P3, (40000, 23), b""),
            DropReason::Nacl,
            3,
        ),
        pass(
            "acl-2 rule 200 allows ssh; routed between subnets",
            1,
            ssh.clone(),
            3,
            set_macs(ssh, mac(3), GW),
        ),
        drop_at(
            "custom ACL without entries denies in",
            1,
            tcp(mac(1), GW, P1, P8, (40000, 80), b""),
            DropReason::Nacl,
            8,
        ),
        drop(
            "custom ACL without entries denies out",
            8,
            tcp(mac(8), GW, P8, P1, (40000, 80), b""),
            DropReason::Nacl,
        ),
    ]
}

fn source_dest_steps() -> Vec<Step> {
    let via_router = tcp(mac(5), GW, P5, P3, (40000, 22), b"");
    let from_router = tcp(mac(6), GW, P5, P3, (40000, 22), b"");
    let mut checked = topology();
    checked.generation = 3;
    checked.ports[5].source_dest_check = true;
    vec![
        drop(
            "spoofed source",
            7,
            tcp(mac(7), GW, [10, 0, 1, 99], P1, (40000, 80), b""),
            DropReason::SourceCheck,
        ),
        drop(
            "another ENI's address as source",
            7,
            tcp(mac(7), GW, P1, P2, (40000, 80), b""),
            DropReason::SourceCheck,
        ),
        pass(
            "route table sends 10.0.2.0/24 to the router ENI",
            5,
            via_router.clone(),
            6,
            set_macs(via_router.clone(), mac(6), GW),
        ),
        pass(
            "the router forwards with a source not its own (check off)",
            6,
            from_router.clone(),
            3,
            set_macs(from_router, mac(3), GW),
        ),
        Step::Publish(Box::new(checked)),
        drop_at(
            "with the check on, the router ENI refuses it",
            5,
            via_router,
            DropReason::SourceCheck,
            6,
        ),
        Step::Publish(Box::new(topology())),
    ]
}

fn internet_steps() -> Vec<Step> {
    let out = tcp(mac(1), GW, P1, NET, (40000, 80), b"GET /");
    let out_nat = tcp(UP_MAC, NS_MAC, EIP1, NET, (40000, 80), b"GET /");
    let back = tcp_net(UP_MAC, NS_MAC, NET, EIP1, (80, 40000), b"200 OK");
    let back_nat = tcp(GW, mac(1), NET, P1, (80, 40000), b"200 OK");
    let inbound = tcp_net(UP_MAC, NS_MAC, NET, EIP1, (50000, 80), b"GET /");
    let inbound_nat = tcp(GW, mac(1), NET, P1, (50000, 80), b"GET /");
    // builders put (src, dst) MACs; fix the argument order used above
    let back_nat = set_macs(back_nat, mac(1), GW);
    let inbound_nat = set_macs(inbound_nat, mac(1), GW);
    let out_nat = set_macs(out_nat, NS_MAC, UP_MAC);
    let back = set_macs(back, UP_MAC, NS_MAC);
    let inbound = set_macs(inbound, UP_MAC, NS_MAC);
    let mut arp_reply = Vec::new();
    PacketBuilder::ethernet2(UP_MAC, NS_MAC)
        .arp(
            etherparse::ArpPacket::new(
                etherparse::ArpHardwareId::ETHERNET,
                etherparse::EtherType::IPV4,
                etherparse::ArpOperation::REPLY,
                &UP_MAC,
                &EIP1,
                &NS_MAC,
                &NET,
            )
            .expect("arp"),
        )
        .write(&mut arp_reply)
        .expect("arp reply");
    vec![
        pass(
            "out through the gateway, source NATed to the EIP",
            1,
            out,
            UPLINK,
            out_nat,
        ),
        pass(
            "the answer comes back to the private address",
            UPLINK,
            back,
            1,
            back_nat,
        ),
        pass(
            "inbound to web:80 through the EIP",
            UPLINK,
            inbound,
            1,
            inbound_nat,
        ),
        drop_at(
            "inbound to a closed port through the EIP",
            UPLINK,
            set_macs(
                tcp(NS_MAC, UP_MAC, NET, EIP1, (50000, 22), b""),
                UP_MAC,
                NS_MAC,
            ),
            DropReason::SecurityGroup,
            1,
        ),
        drop(
            "no public address: dropped at the gateway",
            7,
            tcp(mac(7), GW, P7, NET, (40000, 80), b""),
            DropReason::NoRoute,
        ),
        drop(
            "inbound to an unknown public address",
            UPLINK,
            set_macs(
                tcp(NS_MAC, UP_MAC, NET, [203, 0, 113, 99], (50000, 80), b""),
                UP_MAC,
                NS_MAC,
            ),
            DropReason::NoRoute,
        ),
        Step::Frame {
            desc: "ARP for the EIP on the uplink",
            ingress: UPLINK,
            frame: who_has(NS_MAC, NET, EIP1),
            verdict: Verdict::Replied,
            out: vec![(UPLINK, arp_reply)],
            blame: None,
        },
        drop(
            "ARP for an unknown public address",
            UPLINK,
            who_has(NS_MAC, NET, [203, 0, 113, 99]),
            DropReason::NoRoute,
        ),
    ]
}

fn isolation_steps() -> Vec<Step> {
    vec![
        drop(
            "vpc-b cannot reach vpc-a's 10.0.1.10",
            4,
            tcp(mac(4), GW, P4, P1, (40000, 80), b""),
            DropReason::NoRoute,
        ),
        drop(
            "vpc-b has no route to the internet",
            4,
            tcp(mac(4), GW, P4, NET, (40000, 80), b""),
            DropReason::NoRoute,
        ),
    ]
}

fn tables() -> Vec<Vec<Step>> {
    vec![
        security_group_steps(),
        udp_and_icmp_steps(),
        nacl_steps(),
        source_dest_steps(),
        internet_steps(),
        isolation_steps(),
    ]
}

/// Each frame step three times in a row: a new flow's first frame is
/// tracked, its second learned by the flow cache, its third answered by it
/// (when it may be).
fn thrice(steps: Vec<Step>) -> Vec<Step> {
    let mut out = Vec::new();
    for step in steps {
        if let Step::Frame {
            desc,
            ingress,
            frame,
            verdict,
            out: emitted,
            blame,
        } = &step
        {
            for _ in 0..2 {
                out.push(Step::Frame {
                    desc,
                    ingress: *ingress,
                    frame: frame.clone(),
                    verdict: *verdict,
                    out: emitted.clone(),
                    blame: *blame,
                });
            }
        }
        out.push(step);
    }
    out
}

#[test]
fn tables_through_the_flow_cache() {
    let mut hits = 0;
    for (i, steps) in tables().into_iter().enumerate() {
        let mut b = bench(topology(), 1 << 12);
        run(&mut b, thrice(steps));
        hits += b.worker.flow_cache_hits();
        eprintln!(
            "table {i}: {} frames from the cache",
            b.worker.flow_cache_hits()
        );
    }
    // The tables repeat tracked and untracked forwards: some must come from
    // the cache, or this test shows nothing about it.
    assert!(hits >= 10, "only {hits} frames came from the flow cache");
}

#[test]
fn tables_without_the_flow_cache() {
    for steps in tables() {
        let mut b = bench_with(topology(), 1 << 12, false);
        run(&mut b, thrice(steps));
        assert_eq!(b.worker.flow_cache_hits(), 0);
    }
}

#[test]
fn tables_with_prefetch_hints() {
    for steps in tables() {
        run_hinted(&mut bench(topology(), 1 << 12), steps, true);
    }
}

#[test]
fn security_groups_table() {
    run(&mut bench(topology(), 1 << 12), security_group_steps());
}

#[test]
fn udp_icmp_tracking_table() {
    run(&mut bench(topology(), 1 << 12), udp_and_icmp_steps());
}

#[test]
fn nacl_table() {
    run(&mut bench(topology(), 1 << 12), nacl_steps());
}

#[test]
fn source_dest_check_table() {
    run(&mut bench(topology(), 1 << 12), source_dest_steps());
}

#[test]
fn internet_gateway_table() {
    run(&mut bench(topology(), 1 << 12), internet_steps());
}

#[test]
fn vpc_isolation_table() {
    run(&mut bench(topology(), 1 << 12), isolation_steps());
}

#[test]
fn conntrack_full_is_a_counted_drop() {
    let mut b = bench(topology(), 8);
    let mut steps: Vec<Step> = (0..8u16)
        .map(|i| {
            let f = tcp(mac(7), GW, P7, P1, (41000 + i, 80), b"");
            pass(
                "fill the table",
                7,
                f.clone(),
                1,
                set_macs(f, mac(1), mac(7)),
            )
        })
        .collect();
    steps.push(drop(
        "ninth flow: no room",
        7,
        tcp(mac(7), GW, P7, P1, (42000, 80), b""),
        DropReason::ConntrackFull,
    ));
    run(&mut b, steps);
    let (stats, per_port) = b.sw.conntrack_census();
    assert_eq!(stats.tracked, 8);
    assert_eq!(stats.full, 1);
    assert_eq!(per_port[1], 8);
    assert_eq!(b.sw.stats(1).new_flows, 8);
}

#[test]
fn every_policy_reason_is_produced() {
    let mut b = bench(topology(), 1 << 12);
    for steps in tables() {
        run(&mut b, steps);
    }
    let mut total = [0u64; DropReason::COUNT];
    for p in 0..=UPLINK {
        for (t, d) in total.iter_mut().zip(b.sw.stats(p).drops) {
            *t += d;
        }
    }
    for r in [
        DropReason::SourceCheck,
        DropReason::SecurityGroup,
        DropReason::Nacl,
        DropReason::NoRoute,
    ] {
        assert!(total[r.index()] > 0, "{r} never produced");
    }
}

#[test]
fn fin_from_both_sides_shortens_the_timeout() {
    let mut b = bench(topology(), 1 << 12);
    let syn = tcp_flags(mac(7), P7, P1, (43000, 80), true, false);
    let fin_a = tcp_flags(mac(7), P7, P1, (43000, 80), false, true);
    let fin_b = tcp_flags(mac(1), P1, P7, (80, 43000), false, true);
    let late = tcp_flags(mac(1), P1, P7, (80, 43000), false, false);
    run(
        &mut b,
        vec![
            pass("syn", 7, syn.clone(), 1, set_macs(syn, mac(1), mac(7))),
            pass(
                "fin from the client",
                7,
                fin_a.clone(),
                1,
                set_macs(fin_a, mac(1), mac(7)),
            ),
            pass(
                "fin from the server",
                1,
                fin_b.clone(),
                7,
                set_macs(fin_b, mac(7), mac(1)),
            ),
            Step::Advance(11),
            // Port 1's egress allows everything, so a late packet starts a
            // new tracked flow rather than being refused; check the table.
        ],
    );
    let (stats, _) = b.sw.conntrack_census();
    assert_eq!(stats.tracked, 0, "closed flow expired after 10 s");
    let mut cap = Capture::default();
    let mut f = late;
    assert_eq!(
        b.worker
            .process(1, &mut f, &PacketMeta::default(), &mut cap),
        Verdict::Forwarded(7)
    );
}

#[test]
fn malformed_policy_is_refused_at_compile() {
    let mut t = topology();
    t.ports[0].security_groups.push("sg-missing".into());
    assert!(matches!(
        Snapshot::compile(t),
        Err(SnapshotError::Unknown(_, _))
    ));
    let mut t = topology();
    t.ports[0].security_groups = (0..6).map(|i| format!("sg-{i}")).collect();
    assert!(Snapshot::compile(t).is_err());
    let mut t = topology();
    t.subnets[0].network_acl = Some("acl-nope".into());
    assert!(Snapshot::compile(t).is_err());
    let mut t = topology();
    t.elastic_ips.push(t.elastic_ips[0].clone());
    assert!(matches!(
        Snapshot::compile(t),
        Err(SnapshotError::DuplicateElasticIp(_))
    ));
    let mut t = topology();
    t.uplink = Some(UplinkConfig {
        port: 1,
        mac: UP_MAC,
        peer_mac: NS_MAC,
    });
    assert!(matches!(
        Snapshot::compile(t),
        Err(SnapshotError::BadUplink(1))
    ));
}

#[test]
fn flow_logs_count_accepted_and_rejected_traffic() {
    let dir = std::env::temp_dir().join(format!("enilab-flowlog-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let eni_log = dir.join("eni1.log");
    let subnet_log = dir.join("a2-reject.log");
    let _ = std::fs::remove_file(&eni_log);
    let _ = std::fs::remove_file(&subnet_log);
    let mut t = topology();
    t.flow_logs = vec![
        FlowLogConfig {
            id: "fl-eni1".into(),
            scope: FlowLogScope::Eni(format!("eni-{:017x}", 1)),
            traffic: TrafficType::All,
            interval_secs: 60,
            path: eni_log.clone(),
            account_id: "123456789012".into(),
        },
        FlowLogConfig {
            id: "fl-a2".into(),
            scope: FlowLogScope::Subnet("subnet-a2".into()),
            traffic: TrafficType::Reject,
            interval_secs: 60,
            path: subnet_log.clone(),
            account_id: "123456789012".into(),
        },
    ];
    let mut b = bench(t, 1 << 12);
    let mut cap = Capture::default();
    let mut send = |b: &mut Bench, ingress: PortId, f: Vec<u8>| {
        let mut f = f;
        b.worker
            .process(ingress, &mut f, &PacketMeta::default(), &mut cap)
    };
    // 3 accepted packets 7 -> 1:80, 2 replies, 4 rejected 7 -> 1:81,
    // 2 rejected 1 -> 3:23 (NACL at subnet a2).
    for _ in 0..3 {
        send(&mut b, 7, tcp(mac(7), GW, P7, P1, (40000, 80), b"abc"));
    }
    for _ in 0..2 {
        send(&mut b, 1, tcp(mac(1), GW, P1, P7, (80, 40000), b"defgh"));
    }
    for _ in 0..4 {
        send(&mut b, 7, tcp(mac(7), GW, P7, P1, (40001, 81), b""));
    }
    for _ in 0..2 {
        send(&mut b, 1, tcp(mac(1), GW, P1, P3, (40002, 23), b""));
    }
    b.worker.flush_flow_logs();
    b.sw.flush_flow_logs();
    let eni = std::fs::read_to_string(&eni_log).expect("eni flow log written");
    let lines: Vec<&str> = eni.lines().collect();
    assert_eq!(lines[0], crate::FLOW_LOG_HEADER);
    let eni1 = format!("eni-{:017x}", 1);
    let want = [
        format!("2 123456789012 {eni1} 10.0.1.60 10.0.1.10 40000 80 6 3 129 "),
        format!("2 123456789012 {eni1} 10.0.1.10 10.0.1.60 80 40000 6 2 90 "),
        format!("2 123456789012 {eni1} 10.0.1.60 10.0.1.10 40001 81 6 4 160 "),
        format!("2 123456789012 {eni1} 10.0.1.10 10.0.2.30 40002 23 6 2 80 "),
    ];
    for w in &want {
        let hits: Vec<&&str> = lines.iter().filter(|l| l.starts_with(w.as_str())).collect();
        assert_eq!(hits.len(), 1, "one record starting {w:?} in\n{eni}");
    }
    assert!(lines
        .iter()
        .any(|l| l.contains(" 40001 81 ") && l.ends_with(" REJECT OK")));
    assert!(lines
        .iter()
        .any(|l| l.contains(" 40000 80 ") && l.ends_with(" ACCEPT OK")));
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" 40002 23 ") && l.ends_with(" ACCEPT OK")),
        "left eni1 accepted"
    );
    assert_eq!(lines.len(), 1 + want.len(), "{eni}");
    let sub = std::fs::read_to_string(&subnet_log).expect("subnet flow log written");
    let sub_lines: Vec<&str> = sub.lines().skip(1).collect();
    assert_eq!(sub_lines.len(), 1, "{sub}");
    assert!(
        sub_lines[0].contains(" 10.0.1.10 10.0.2.30 40002 23 6 2 80 ")
            && sub_lines[0].ends_with(" REJECT OK")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A cached decision rests on its tracking entry: once the entry is gone
/// (cleared here; swept or expired alike), the flow is judged in full again.
#[test]
fn flow_cache_forgets_a_flow_whose_tracking_entry_went() {
    let mut b = bench(topology(), 1 << 12);
    let web_to_db = tcp(mac(1), GW, P1, P2, (40001, 5432), b"q");
    let db_reply = tcp(mac(2), GW, P2, P1, (5432, 40001), b"r");
    let send = |b: &mut Bench, ingress: PortId, f: &[u8]| {
        let mut f = f.to_vec();
        let mut cap = Capture::default();
        b.worker
            .process(ingress, &mut f, &PacketMeta::default(), &mut cap)
    };
    assert_eq!(send(&mut b, 1, &web_to_db), Verdict::Forwarded(2));
    for _ in 0..3 {
        assert_eq!(send(&mut b, 2, &db_reply), Verdict::Forwarded(1));
    }
    assert_eq!(b.worker.flow_cache_hits(), 2, "the reply's 2nd and 3rd");
    assert_eq!(b.sw.clear_conntrack(), 1);
    // sg-db has no egress rule: without the tracked flow the reply is a
    // new flow, and refused.
    assert_eq!(
        send(&mut b, 2, &db_reply),
        Verdict::Dropped(DropReason::SecurityGroup)
    );
    assert_eq!(b.worker.flow_cache_hits(), 2);
}

/// Send a copy of `f` from `ingress` through the bench's worker.
fn send_from(b: &mut Bench, ingress: PortId, f: &[u8]) -> Verdict {
    let mut f = f.to_vec();
    let mut cap = Capture::default();
    b.worker
        .process(ingress, &mut f, &PacketMeta::default(), &mut cap)
}

/// A frame that shares a cached frame's key but claims more IP bytes than
/// it carries is refused as the full path refuses it, never forwarded.
#[test]
fn flow_cache_does_not_forward_what_the_parser_refuses() {
    let mut b = bench(topology(), 1 << 12);
    let f = tcp(mac(7), GW, P7, P1, (40000, 80), b"");
    for _ in 0..3 {
        assert_eq!(send_from(&mut b, 7, &f), Verdict::Forwarded(1));
    }
    assert_eq!(b.worker.flow_cache_hits(), 1);
    let mut bad = f.clone();
    bad[16..18].copy_from_slice(&1500u16.to_be_bytes());
    assert_eq!(
        send_from(&mut b, 7, &bad),
        Verdict::Dropped(DropReason::Malformed)
    );
    assert_eq!(b.worker.flow_cache_hits(), 1);
}

/// A run of one flow (frames the switch answers from the decision for the
/// frame before) ends when the snapshot moves or a capture starts on
/// either end.
#[test]
fn flow_cache_run_ends_with_the_snapshot_and_a_capture() {
    let mut b = bench(topology(), 1 << 12);
    let f = tcp(mac(7), GW, P7, P1, (40000, 80), b"");
    for _ in 0..4 {
        assert_eq!(send_from(&mut b, 7, &f), Verdict::Forwarded(1));
    }
    assert_eq!(
        b.worker.flow_cache_hits(),
        2,
        "the 3rd from the cache, the 4th from the run"
    );
    let cap = b.sw.capture(1, 4).expect("capture");
    assert_eq!(send_from(&mut b, 7, &f), Verdict::Forwarded(1));
    assert!(
        cap.next_frame().is_some(),
        "a capture started mid-run sees the frame"
    );
    std::mem::drop(cap);
    let mut no_p7 = topology();
    no_p7.generation = 3;
    no_p7.ports.retain(|p| p.id != 7);
    b.sw.publish(Snapshot::compile(no_p7).expect("fixture compiles"));
    assert_eq!(
        send_from(&mut b, 7, &f),
        Verdict::Dropped(DropReason::PortDown)
    );
}

/// The flow cache changes nothing a frame's sender or receiver can see:
/// the same random stream of frames (a few flows, so they repeat; TCP
/// flags, bad lengths and fragments among them; runs of one flow), rule
/// changes, clock jumps and tracking-table clears go through two switches, one with the cache
/// and one without, and every verdict, emitted frame and port counter
/// must match.
#[test]
fn flow_cache_is_invisible_to_a_random_stream() {
    for seed in [0x5eed_f00d, 0xdead_beef, 0x0123_4567_89ab_cdef] {
        random_stream_through_both(seed);
    }
}

fn random_stream_through_both(mut seed: u64) {
    let mut with = bench_with(topology(), 1 << 12, true);
    let mut without = bench_with(topology(), 1 << 12, false);
    // Rule changes keep tracked flows; a removed port does not.
    let mut no_db_rule = topology();
    no_db_rule.generation = 2;
    no_db_rule.security_groups[1].ingress.clear();
    let mut no_p7 = topology();
    no_p7.generation = 3;
    no_p7.ports.retain(|p| p.id != 7);
    let ports: [(PortId, [u8; 4]); 7] = [
        (1, P1),
        (2, P2),
        (3, P3),
        (5, P5),
        (6, P6),
        (7, P7),
        (8, P8),
    ];
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // A few flows and their replies, so that frames repeat.
    let mut flows = Vec::new();
    for _ in 0..12 {
        let (ingress, src) = ports[rnd(ports.len() as u64) as usize];
        let (back, dst) = match rnd(8) {
            0 => (None, NET),
            1 => (None, EIP1),
            _ => {
                let (p, a) = ports[rnd(ports.len() as u64) as usize];
                (Some(p), a)
            }
        };
        let sport = [40000, 40001, 5432, 80][rnd(4) as usize];
        let dport = [80, 5432, 22, 23, 40000][rnd(5) as usize];
        let udp_flow = rnd(3) == 0;
        flows.push((ingress, src, dst, sport, dport, udp_flow));
        if let Some(p) = back {
            flows.push((p, dst, src, dport, sport, udp_flow));
        }
    }
    let mut frames = 0;
    let mut flow = 0;
    for step in 0..20_000 {
        match rnd(500) {
            0 => {
                let t = match rnd(3) {
                    0 => topology(),
                    1 => no_db_rule.clone(),
                    _ => no_p7.clone(),
                };
                for b in [&mut with, &mut without] {
                    b.sw.publish(Snapshot::compile(t.clone()).expect("fixture compiles"));
                }
                continue;
            }
            1 => {
                let s = [1, 31, 200, 500_000][rnd(4) as usize] as u32;
                for b in [&with, &without] {
                    b.clock.fetch_add(s, Ordering::Relaxed);
                }
                continue;
            }
            2 => {
                assert_eq!(with.sw.clear_conntrack(), without.sw.clear_conntrack());
                continue;
            }
            _ => {}
        }
        // Half the frames repeat the flow before (a batch's runs, which
        // the switch answers without a lookup), with the events above
        // falling inside the runs too.
        if rnd(2) == 0 {
            flow = rnd(flows.len() as u64) as usize;
        }
        let (ingress, src, dst, sport, dport, udp_flow) = flows[flow];
        let mut f = if udp_flow {
            udp(mac(ingress as u8), GW, src, dst, 64, (sport, dport), b"u")
        } else {
            let mut f = tcp(mac(ingress as u8), GW, src, dst, (sport, dport), b"t");
            f[47] = match rnd(20) {
                0 => 0x02,
                1 => 0x12,
                2 => 0x11,
                3 => 0x04,
                _ => 0x10,
            };
            f
        };
        match rnd(40) {
            0 => f[16..18].copy_from_slice(&2000u16.to_be_bytes()),
            1 => f[20] |= 0x20,
            2 => f[14] = 0x46,
            _ => {}
        }
        let mut out = Vec::new();
        for b in [&mut with, &mut without] {
            let mut g = f.clone();
            let mut cap = Capture::default();
            let v = b
                .worker
                .process(ingress, &mut g, &PacketMeta::default(), &mut cap);
            let sent: Vec<(PortId, Vec<u8>)> =
                cap.sent.iter().map(|s| (s.port, s.frame.clone())).collect();
            let stats: Vec<PortStats> = (0..=UPLINK).map(|p| b.sw.stats(p)).collect();
            out.push((v, sent, stats));
        }
        assert_eq!(out[0].0, out[1].0, "step {step}: verdict of {f:02x?}");
        assert_eq!(out[0].1, out[1].1, "step {step}: frames emitted");
        assert_eq!(out[0].2, out[1].2, "step {step}: counters");
        frames += 1;
    }
    let hits = with.worker.flow_cache_hits();
    eprintln!("{frames} frames, {hits} from the cache");
    assert!(
        hits > frames / 10,
        "only {hits} of {frames} frames came from the cache"
    );
}

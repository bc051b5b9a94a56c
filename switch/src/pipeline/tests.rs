//! Fixture tables for the pipeline, katran style: each row is a
//! description, an ingress port, an input frame built with etherparse's
//! `PacketBuilder` (or bytes), the expected verdict and the expected output.
//!
//! One runner checks every row the same way: the verdict, the emitted
//! frames (exact bytes, or a parsed DHCP reply), the offload metadata, and
//! the exact change of every port's counters.

use std::cell::Cell;
use std::net::Ipv4Addr;

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Ipv4Header, PacketBuilder, UdpHeader,
};

use super::*;
use crate::config::{MetadataConfig, Topology};
use crate::wire::dhcp::{message_type as mt, option};
use crate::{
    decode_metadata_client, metadata_client_addr, CsumOffload, GsoKind, GsoOffload, GATEWAY_MAC,
    IMDS_ADDR, METADATA_GATEWAY, METADATA_MAC,
};

// ---------------------------------------------------------------------------
// Topology
//
// vpc-a: subnet 0 = 10.0.1.0/24 (ports 1, 2), subnet 1 = 10.0.2.0/24 (port 3,
//        DNS configured as 10.0.0.2)
// vpc-b: subnet 2 = 10.0.1.0/24 (ports 4, 5) -- overlaps subnet 0 on purpose,
//        and port 4 holds the same address as port 2.
// metadata: port 8, the server's namespace behind it.
// ---------------------------------------------------------------------------

const M1: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const M2: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const M3: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
const M4: [u8; 6] = [0x02, 0, 0, 0, 0, 0x04];
const M5: [u8; 6] = [0x02, 0, 0, 0, 0, 0x05];
const GW: [u8; 6] = GATEWAY_MAC;
const BCAST: [u8; 6] = [0xff; 6];

const A1_GW: [u8; 4] = [10, 0, 1, 1];
const A2_GW: [u8; 4] = [10, 0, 2, 1];
const P1: [u8; 4] = [10, 0, 1, 10];
const P1_SEC: [u8; 4] = [10, 0, 1, 11];
const P2: [u8; 4] = [10, 0, 1, 20];
const P3: [u8; 4] = [10, 0, 2, 30];
const P4: [u8; 4] = [10, 0, 1, 20];
const P5: [u8; 4] = [10, 0, 1, 40];
const NOBODY: [u8; 4] = [10, 0, 1, 99];
const ZERO: [u8; 4] = [0, 0, 0, 0];
const ALL_ONES: [u8; 4] = [255, 255, 255, 255];

/// A port id that is never in the snapshot.
const ABSENT: PortId = 99;

/// The metadata port and its namespace's MAC.
const MD: PortId = 8;
const MD_PEER: [u8; 6] = [0x02, 0xe1, 0x1a, 0, 0, 0x99];
const MDM: [u8; 6] = METADATA_MAC;
const IMDS: [u8; 4] = IMDS_ADDR.octets();

/// The client address of a port's address `index`.
fn client(port: PortId, index: u8) -> [u8; 4] {
    metadata_client_addr(port, index)
        .expect("fixture port fits")
        .octets()
}

fn subnet(id: &str, vpc: &str, net: [u8; 4], dns: Option<[u8; 4]>) -> SubnetConfig {
    SubnetConfig {
        id: id.into(),
        vpc_id: vpc.into(),
        cidr: (Ipv4Addr::from(net), 24),
        dns: dns.map(Ipv4Addr::from),
        ..Default::default()
    }
}

fn port(
    id: PortId,
    mac: [u8; 6],
    subnet: usize,
    ip: [u8; 4],
    sec: &[[u8; 4]],
    mtu: u16,
) -> PortConfig {
    PortConfig {
        id,
        eni_id: format!("eni-{id:017x}"),
        mac,
        subnet,
        primary_ip: Ipv4Addr::from(ip),
        secondary_ips: sec.iter().copied().map(Ipv4Addr::from).collect(),
        mtu,
        ..Default::default()
    }
}

fn topology() -> Snapshot {
    Snapshot::compile(Topology {
        generation: 1,
        subnets: vec![
            subnet("subnet-a1", "vpc-a", [10, 0, 1, 0], None),
            subnet("subnet-a2", "vpc-a", [10, 0, 2, 0], Some([10, 0, 0, 2])),
            subnet("subnet-b1", "vpc-b", [10, 0, 1, 0], None),
        ],
        ports: vec![
            port(1, M1, 0, P1, &[P1_SEC], 9001),
            port(2, M2, 0, P2, &[], 1500),
            port(3, M3, 1, P3, &[], 1500),
            port(4, M4, 2, P4, &[], 1500),
            port(5, M5, 2, P5, &[], 1500),
        ],
        metadata: Some(MetadataConfig {
            port: MD,
            peer_mac: MD_PEER,
        }),
        ..Topology::default()
    })
    .expect("fixture topology is valid")
}

fn switch() -> (Arc<Switch>, SwitchWorker) {
    let sw = Switch::new();
    sw.publish(topology());
    let worker = sw.worker();
    (sw, worker)
}

// ---------------------------------------------------------------------------
// Egress doubles
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Sent {
    pub(super) port: PortId,
    pub(super) hash: u32,
    pub(super) frame: Vec<u8>,
    pub(super) meta: PacketMeta,
}

#[derive(Debug, Default)]
pub(super) struct Capture {
    pub(super) sent: Vec<Sent>,
    pub(super) refuse: bool,
}

impl Egress for Capture {
    fn emit(&mut self, port: PortId, flow_hash: u32, frame: &[u8], meta: &PacketMeta) -> bool {
        if self.refuse {
            return false;
        }
        self.sent.push(Sent {
            port,
            hash: flow_hash,
            frame: frame.to_vec(),
            meta: *meta,
        });
        true
    }
}

// ---------------------------------------------------------------------------
// Frame builders
// ---------------------------------------------------------------------------

pub(super) fn udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, ttl)
        .udp(ports.0, ports.1)
        .write(&mut v, payload)
        .expect("build udp");
    v
}

pub(super) fn tcp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .tcp(ports.0, ports.1, 1000, 65535)
        .write(&mut v, payload)
        .expect("build tcp");
    v
}

pub(super) fn echo(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    reply: bool,
) -> Vec<u8> {
    let mut v = Vec::new();
    let ip = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src, dst, ttl);
    let icmp = if reply {
        ip.icmpv4_echo_reply(0x1234, 7)
    } else {
        ip.icmpv4_echo_request(0x1234, 7)
    };
    icmp.write(&mut v, b"hello, router").expect("build icmp");
    v
}

fn ipv6_udp(dst_mac: [u8; 6], dst: [u8; 16]) -> Vec<u8> {
    let src = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let mut v = Vec::new();
    PacketBuilder::ethernet2(M1, dst_mac)
        .ipv6(src, dst, 255)
        .udp(546, 547)
        .write(&mut v, b"v6")
        .expect("build ipv6");
    v
}

fn arp(
    op: ArpOperation,
    eth: ([u8; 6], [u8; 6]),
    sender: ([u8; 6], [u8; 4]),
    target: ([u8; 6], [u8; 4]),
) -> Vec<u8> {
    let pkt = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        op,
        &sender.0,
        &sender.1,
        &target.0,
        &target.1,
    )
    .expect("arp packet");
    let mut v = Vec::new();
    PacketBuilder::ethernet2(eth.0, eth.1)
        .arp(pkt)
        .write(&mut v)
        .expect("build arp");
    v
}

/// who-has `target` tell `(mac, ip)`, broadcast.
pub(super) fn who_has(mac: [u8; 6], ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    arp(
        ArpOperation::REQUEST,
        (mac, BCAST),
        (mac, ip),
        ([0; 6], target),
    )
}

/// `answer_mac` is-at `target`, to `(mac, ip)`: the reply the switch sends.
pub(super) fn is_at(answer_mac: [u8; 6], target: [u8; 4], mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    arp(
        ArpOperation::REPLY,
        (answer_mac, mac),
        (answer_mac, target),
        (mac, ip),
    )
}

fn raw(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(14 + payload.len());
    v.extend_from_slice(&dst);
    v.extend_from_slice(&M1);
    v.extend_from_slice(&ethertype.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Rewrite the IPv4 header of a frame and fix its checksum.
fn patch_ipv4(mut frame: Vec<u8>, f: impl FnOnce(&mut Ipv4Header)) -> Vec<u8> {
    let (mut h, _) = Ipv4Header::from_slice(&frame[14..]).expect("ipv4 header");
    f(&mut h);
    h.header_checksum = h.calc_header_checksum();
    let bytes = h.to_bytes();
    frame[14..14 + bytes.len()].copy_from_slice(&bytes);
    frame
}

pub(super) fn set_macs(mut frame: Vec<u8>, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame
}

/// A DHCP client message, as busybox udhcpc and ISC dhclient build them.
#[derive(Debug, Clone)]
struct DhcpMsg {
    op: u8,
    mac: [u8; 6],
    xid: u32,
    flags: u16,
    ciaddr: [u8; 4],
    cookie: bool,
    options: Vec<(u8, Vec<u8>)>,
    /// Raw bytes after the options, before END (to build broken lists).
    tail: Vec<u8>,
}

impl DhcpMsg {
    fn new(mac: [u8; 6], xid: u32, msg_type: u8) -> Self {
        DhcpMsg {
            op: 1,
            mac,
            xid,
            flags: 0,
            ciaddr: ZERO,
            cookie: true,
            options: vec![(option::MESSAGE_TYPE, vec![msg_type])],
            tail: vec![],
        }
    }

    /// What busybox udhcpc adds: client id, max size, parameter list,
    /// vendor class.
    fn udhcpc(mut self) -> Self {
        let mut client_id = vec![1];
        client_id.extend_from_slice(&self.mac);
        self.options.push((61, client_id));
        self.options.push((57, vec![0x02, 0x40]));
        self.options.push((55, vec![1, 3, 6, 12, 15, 28, 42]));
        self.options.push((60, b"udhcp 1.36.1".to_vec()));
        self
    }

    /// What ISC dhclient adds: hostname and its long parameter list.
    fn dhclient(mut self) -> Self {
        self.options.push((12, b"debian".to_vec()));
        self.options
            .push((55, vec![1, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, 121, 42]));
        self
    }

    fn opt(mut self, code: u8, value: &[u8]) -> Self {
        self.options.push((code, value.to_vec()));
        self
    }

    fn payload(&self) -> Vec<u8> {
        let mut b = vec![0u8; 240];
        b[0] = self.op;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&self.xid.to_be_bytes());
        b[10..12].copy_from_slice(&self.flags.to_be_bytes());
        b[12..16].copy_from_slice(&self.ciaddr);
        b[28..34].copy_from_slice(&self.mac);
        if self.cookie {
            b[236..240].copy_from_slice(&[99, 130, 83, 99]);
        }
        for (code, value) in &self.options {
            b.push(*code);
            b.push(value.len() as u8);
            b.extend_from_slice(value);
        }
        b.extend_from_slice(&self.tail);
        if self.tail.is_empty() {
            b.push(option::END);
        }
        b
    }

    /// Broadcast from 0.0.0.0, as in INIT and INIT-REBOOT.
    fn broadcast_frame(&self) -> Vec<u8> {
        udp(
            self.mac,
            BCAST,
            ZERO,
            ALL_ONES,
            64,
            (68, 67),
            &self.payload(),
        )
    }

    /// Unicast to the server, as in RENEWING.
    fn unicast_frame(&self, src: [u8; 4], server: [u8; 4]) -> Vec<u8> {
        udp(self.mac, GW, src, server, 64, (68, 67), &self.payload())
    }
}

// ---------------------------------------------------------------------------
// Rows and the runner
// ---------------------------------------------------------------------------

/// What a parsed DHCP reply must hold.
#[derive(Debug, Clone)]
struct DhcpCheck {
    msg_type: u8,
    xid: u32,
    chaddr: [u8; 6],
    yiaddr: [u8; 4],
    ciaddr: [u8; 4],
    server: [u8; 4],
    dst_mac: [u8; 6],
    dst_ip: [u8; 4],
    /// Options that must be present with exactly these values.
    options: Vec<(u8, Vec<u8>)>,
    /// Options that must be absent.
    absent: Vec<u8>,
}

#[derive(Debug, Clone)]
enum Out {
    /// Nothing is emitted.
    Nothing,
    /// Exactly these frames, in order.
    Frames(Vec<(PortId, Vec<u8>)>),
    /// One DHCP reply on the ingress port.
    Dhcp(DhcpCheck),
    /// The egress refuses every frame; `QueueFull` is counted on this port.
    Refused(PortId),
}

#[derive(Debug, Clone)]
struct Row {
    desc: &'static str,
    ingress: PortId,
    frame: Vec<u8>,
    meta: PacketMeta,
    verdict: Verdict,
    out: Out,
}

fn row(desc: &'static str, ingress: PortId, frame: Vec<u8>, verdict: Verdict, out: Out) -> Row {
    Row {
        desc,
        ingress,
        frame,
        meta: PacketMeta::default(),
        verdict,
        out,
    }
}

fn drop_row(desc: &'static str, ingress: PortId, frame: Vec<u8>, reason: DropReason) -> Row {
    row(desc, ingress, frame, Verdict::Dropped(reason), Out::Nothing)
}

/// Ports whose counters the runner compares exactly.
const WATCHED: [PortId; 8] = [0, 1, 2, 3, 4, 5, MD, ABSENT];

fn sub(a: &PortStats, b: &PortStats) -> PortStats {
    let mut drops = [0; DropReason::COUNT];
    for (i, d) in drops.iter_mut().enumerate() {
        *d = a.drops[i] - b.drops[i];
    }
    PortStats {
        tx_packets: a.tx_packets - b.tx_packets,
        tx_bytes: a.tx_bytes - b.tx_bytes,
        rx_packets: a.rx_packets - b.rx_packets,
        rx_bytes: a.rx_bytes - b.rx_bytes,
        arp_replies: a.arp_replies - b.arp_replies,
        dhcp_replies: a.dhcp_replies - b.dhcp_replies,
        new_flows: a.new_flows - b.new_flows,
        pps_allowance_exceeded: a.pps_allowance_exceeded - b.pps_allowance_exceeded,
        bw_out_allowance_exceeded: a.bw_out_allowance_exceeded - b.bw_out_allowance_exceeded,
        bw_in_allowance_exceeded: a.bw_in_allowance_exceeded - b.bw_in_allowance_exceeded,
        linklocal_allowance_exceeded: a.linklocal_allowance_exceeded
            - b.linklocal_allowance_exceeded,
        conntrack_allowance_exceeded: a.conntrack_allowance_exceeded
            - b.conntrack_allowance_exceeded,
        conntrack_tracked: a.conntrack_tracked.wrapping_sub(b.conntrack_tracked),
        conntrack_allowance_available: None,
        drops,
    }
}

fn is_arp(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&[0x08, 0x06][..])
}

fn is_dhcp_reply(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&[0x08, 0x00][..])
        && frame.get(23) == Some(&17)
        && frame.get(36..38) == Some(&[0, 68][..])
}

fn run(sw: &Switch, worker: &mut SwitchWorker, rows: &[Row]) {
    for r in rows {
        let desc = r.desc;
        let before: Vec<PortStats> = WATCHED.iter().map(|p| sw.stats(*p)).collect();
        let mut cap = Capture {
            refuse: matches!(r.out, Out::Refused(_)),
            ..Capture::default()
        };
        let mut frame = r.frame.clone();
        let verdict = worker.process(r.ingress, &mut frame, &r.meta, &mut cap);
        assert_eq!(verdict, r.verdict, "{desc}: verdict");

        // Emitted frames.
        match &r.out {
            Out::Nothing | Out::Refused(_) => {
                assert!(cap.sent.is_empty(), "{desc}: emitted {:?}", cap.sent)
            }
            Out::Frames(want) => {
                let got: Vec<(PortId, Vec<u8>)> =
                    cap.sent.iter().map(|s| (s.port, s.frame.clone())).collect();
                assert_eq!(got.len(), want.len(), "{desc}: frame count");
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    assert_eq!(g.0, w.0, "{desc}: frame {i} port");
                    assert_eq!(g.1, w.1, "{desc}: frame {i} bytes");
                }
            }
            Out::Dhcp(check) => {
                assert_eq!(cap.sent.len(), 1, "{desc}: one DHCP reply");
                assert_eq!(cap.sent[0].port, r.ingress, "{desc}: reply on ingress");
                check_dhcp(desc, &cap.sent[0].frame, check);
            }
        }
        // Offload metadata: forwarded frames keep it, replies carry none.
        for s in &cap.sent {
            let want = match verdict {
                Verdict::Forwarded(_) => r.meta,
                _ => PacketMeta::default(),
            };
            assert_eq!(s.meta, want, "{desc}: meta");
        }

        // Counters: the exact change on every watched port.
        let mut want: Vec<PortStats> = vec![PortStats::default(); WATCHED.len()];
        let slot = |p: PortId| WATCHED.iter().position(|w| *w == p);
        if let Some(i) = slot(r.ingress) {
            want[i].tx_packets += 1;
            want[i].tx_bytes += r.frame.len() as u64;
            if let Verdict::Dropped(reason) = verdict {
                if reason != DropReason::QueueFull {
                    want[i].drops[reason.index()] += 1;
                }
            }
        }
        for s in &cap.sent {
            let i = slot(s.port).expect("emitted to a watched port");
            want[i].rx_packets += 1;
            want[i].rx_bytes += s.frame.len() as u64;
            if verdict == Verdict::Replied && is_arp(&s.frame) {
                want[i].arp_replies += 1;
            }
            if verdict == Verdict::Replied && is_dhcp_reply(&s.frame) {
                want[i].dhcp_replies += 1;
            }
        }
        if let Out::Refused(p) = r.out {
            let i = slot(p).expect("refusing port is watched");
            want[i].drops[DropReason::QueueFull.index()] += 1;
        }
        for (i, p) in WATCHED.iter().enumerate() {
            let got = sub(&sw.stats(*p), &before[i]);
            assert_eq!(got, want[i], "{desc}: counters of port {p}");
        }
    }
}

/// Options of a DHCP message, parsed independently of `wire::dhcp`.
fn parse_options(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((&code, rest)) = b.split_first() {
        match code {
            0 => b = rest,
            255 => break,
            _ => {
                let len = rest[0] as usize;
                out.push((code, rest[1..1 + len].to_vec()));
                b = &rest[1 + len..];
            }
        }
    }
    out
}

fn check_dhcp(desc: &str, frame: &[u8], c: &DhcpCheck) {
    assert_eq!(&frame[0..6], &c.dst_mac, "{desc}: eth dst");
    assert_eq!(&frame[6..12], &GW, "{desc}: eth src");
    assert_eq!(&frame[12..14], &[0x08, 0x00], "{desc}: ethertype");
    let (ip, rest) = Ipv4Header::from_slice(&frame[14..]).expect("ipv4");
    assert_eq!(ip.source, c.server, "{desc}: ip src");
    assert_eq!(ip.destination, c.dst_ip, "{desc}: ip dst");
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "{desc}: ip checksum"
    );
    assert_eq!(ip.time_to_live, 64, "{desc}: ttl");
    let (udp, rest) = UdpHeader::from_slice(rest).expect("udp");
    assert_eq!(
        (udp.source_port, udp.destination_port),
        (67, 68),
        "{desc}: ports"
    );
    let payload = &rest[..udp.length as usize - 8];
    assert_eq!(payload.len(), rest.len(), "{desc}: no trailing bytes");
    assert_eq!(
        udp.checksum,
        udp.calc_checksum_ipv4(&ip, payload).expect("checksum"),
        "{desc}: udp checksum"
    );
    assert!(payload.len() >= 300, "{desc}: BOOTP minimum size");
    assert_eq!(payload[0], 2, "{desc}: BOOTREPLY");
    assert_eq!(&payload[4..8], &c.xid.to_be_bytes(), "{desc}: xid");
    assert_eq!(&payload[12..16], &c.ciaddr, "{desc}: ciaddr");
    assert_eq!(&payload[16..20], &c.yiaddr, "{desc}: yiaddr");
    assert_eq!(&payload[28..34], &c.chaddr, "{desc}: chaddr");
    assert_eq!(&payload[236..240], &[99, 130, 83, 99], "{desc}: cookie");
    let opts = parse_options(&payload[240..]);
    assert_eq!(
        opts.first(),
        Some(&(53, vec![c.msg_type])),
        "{desc}: type first"
    );
    for (code, value) in &c.options {
        let got: Vec<&Vec<u8>> = opts.iter().filter(|o| o.0 == *code).map(|o| &o.1).collect();
        assert_eq!(got, vec![value], "{desc}: option {code}");
    }
    for code in &c.absent {
        assert!(
            opts.iter().all(|o| o.0 != *code),
            "{desc}: option {code} must be absent"
        );
    }
}

// ---------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------

fn arp_rows() -> Vec<Row> {
    use DropReason::*;
    let replied = Verdict::Replied;
    vec![
        row(
            "who-has the subnet router: answered with the gateway MAC",
            1,
            who_has(M1, P1, A1_GW),
            replied,
            Out::Frames(vec![(1, is_at(GW, A1_GW, M1, P1))]),
        ),
        row(
            "who-has the router of the second subnet, from that subnet",
            3,
            who_has(M3, P3, A2_GW),
            replied,
            Out::Frames(vec![(3, is_at(GW, A2_GW, M3, P3))]),
        ),
        row(
            "who-has a peer's primary IP: answered with the peer's real MAC",
            1,
            who_has(M1, P1, P2),
            replied,
            Out::Frames(vec![(1, is_at(M2, P2, M1, P1))]),
        ),
        row(
            "who-has a peer's secondary IP",
            2,
            who_has(M2, P2, P1_SEC),
            replied,
            Out::Frames(vec![(2, is_at(M1, P1_SEC, M2, P2))]),
        ),
        row(
            "who-has a port in another subnet of the same VPC",
            1,
            who_has(M1, P1, P3),
            replied,
            Out::Frames(vec![(1, is_at(M3, P3, M1, P1))]),
        ),
        row(
            "unicast ARP refresh (Ethernet dst = gateway MAC)",
            1,
            arp(ArpOperation::REQUEST, (M1, GW), (M1, P1), (GW, A1_GW)),
            replied,
            Out::Frames(vec![(1, is_at(GW, A1_GW, M1, P1))]),
        ),
        row(
            "ARP probe (sender 0.0.0.0) for a peer's address is answered",
            1,
            who_has(M1, ZERO, P2),
            replied,
            Out::Frames(vec![(1, is_at(M2, P2, M1, ZERO))]),
        ),
        row(
            "other VPC: same address 10.0.1.20 resolves to port 4, not port 2",
            5,
            who_has(M5, P5, P4),
            replied,
            Out::Frames(vec![(5, is_at(M4, P4, M5, P5))]),
        ),
        drop_row(
            "who-has an unknown address",
            1,
            who_has(M1, P1, NOBODY),
            NoRoute,
        ),
        drop_row(
            "other VPC: 10.0.1.10 exists only in vpc-a",
            4,
            who_has(M4, P4, P1),
            NoRoute,
        ),
        drop_row(
            "who-has the router of another subnet",
            1,
            who_has(M1, P1, A2_GW),
            NoRoute,
        ),
        drop_row(
            "gratuitous ARP request (sender = target) is not flooded",
            1,
            who_has(M1, P1, P1),
            Broadcast,
        ),
        drop_row(
            "gratuitous ARP for a peer's address (spoofed) is not answered",
            1,
            who_has(M1, P2, P2),
            Broadcast,
        ),
        drop_row(
            "gratuitous ARP for an unknown address",
            1,
            who_has(M1, NOBODY, NOBODY),
            Broadcast,
        ),
        drop_row(
            "ARP reply from a guest is not flooded",
            2,
            arp(ArpOperation::REPLY, (M2, BCAST), (M2, P2), (BCAST, P2)),
            Broadcast,
        ),
        drop_row(
            "duplicate address probe for the guest's own address: silence",
            1,
            who_has(M1, ZERO, P1),
            Broadcast,
        ),
        drop_row(
            "ARP operation 3 (RARP request)",
            1,
            {
                let mut f = who_has(M1, P1, A1_GW);
                f[21] = 3;
                f
            },
            Unsupported,
        ),
        drop_row(
            "ARP for IPv6 protocol addresses",
            1,
            {
                let mut p = vec![0, 1, 0x86, 0xdd, 6, 16, 0, 1];
                p.resize(8 + 2 * 6 + 2 * 16, 0);
                raw(BCAST, 0x0806, &p)
            },
            Unsupported,
        ),
        drop_row(
            "ARP cut to 27 bytes of payload",
            1,
            who_has(M1, P1, A1_GW)[..41].to_vec(),
            Malformed,
        ),
        row(
            "ARP reply toward a full queue",
            1,
            who_has(M1, P1, A1_GW),
            Verdict::Dropped(QueueFull),
            Out::Refused(1),
        ),
    ]
}

fn forward_rows() -> Vec<Row> {
    use DropReason::*;
    let gso_frame = {
        let payload: Vec<u8> = (0..65_000u32).map(|i| (i * 7) as u8).collect();
        let mut f = tcp(M1, GW, P1, P3, (40000, 5201), &payload);
        // A partial checksum, as a guest using checksum offload leaves it.
        f[14 + 20 + 16] = 0xab;
        f[14 + 20 + 17] = 0xcd;
        f
    };
    let gso_meta = PacketMeta {
        csum: Some(CsumOffload {
            start: 34,
            offset: 16,
        }),
        gso: Some(GsoOffload {
            kind: GsoKind::Tcpv4,
            size: 1448,
            hdr_len: 54,
            ecn: false,
        }),
    };
    let padded = {
        let mut f = udp(M1, M2, P1, P2, 64, (1000, 2000), b"hi");
        f.resize(60, 0);
        f
    };
    let fragment = patch_ipv4(udp(M1, M2, P1, P2, 64, (1000, 2000), b"first"), |h| {
        h.more_fragments = true;
        h.dont_fragment = false;
    });
    vec![
        row(
            "same subnet: dst MAC set to the peer, src MAC kept, TTL kept",
            1,
            udp(M1, M2, P1, P2, 7, (5353, 9999), b"payload"),
            Verdict::Forwarded(2),
            Out::Frames(vec![(2, udp(M1, M2, P1, P2, 7, (5353, 9999), b"payload"))]),
        ),
        row(
            "same subnet, guest addressed the wrong MAC: routed by IP",
            1,
            udp(M1, GW, P1, P2, 7, (5353, 9999), b"payload"),
            Verdict::Forwarded(2),
            Out::Frames(vec![(2, udp(M1, M2, P1, P2, 7, (5353, 9999), b"payload"))]),
        ),
        row(
            "TCP to a secondary IP",
            2,
            tcp(M2, M1, P2, P1_SEC, (22, 50000), b"ssh"),
            Verdict::Forwarded(1),
            Out::Frames(vec![(1, tcp(M2, M1, P2, P1_SEC, (22, 50000), b"ssh"))]),
        ),
        row(
            "cross subnet: src MAC becomes the gateway's, TTL kept",
            1,
            udp(M1, GW, P1, P3, 9, (1, 2), b"x"),
            Verdict::Forwarded(3),
            Out::Frames(vec![(3, udp(GW, M3, P1, P3, 9, (1, 2), b"x"))]),
        ),
        row(
            "cross subnet, the other way",
            3,
            echo(M3, GW, P3, P1, 64, false),
            Verdict::Forwarded(1),
            Out::Frames(vec![(1, echo(GW, M1, P3, P1, 64, false))]),
        ),
        row(
            "other VPC with the overlapping CIDR forwards inside its VPC",
            4,
            udp(M4, M5, P4, P5, 64, (1, 2), b"b"),
            Verdict::Forwarded(5),
            Out::Frames(vec![(5, udp(M4, M5, P4, P5, 64, (1, 2), b"b"))]),
        ),
        row(
            "Ethernet padding is forwarded with the frame",
            1,
            padded.clone(),
            Verdict::Forwarded(2),
            Out::Frames(vec![(2, padded)]),
        ),
        row(
            "IP fragment forwarded",
            1,
            fragment.clone(),
            Verdict::Forwarded(2),
            Out::Frames(vec![(2, fragment)]),
        ),
        Row {
            meta: gso_meta,
            ..row(
                "64 KiB GSO super-packet: forwarded whole, checksum untouched",
                1,
                gso_frame.clone(),
                Verdict::Forwarded(3),
                Out::Frames(vec![(3, set_macs(gso_frame, M3, GW))]),
            )
        },
        drop_row(
            "no owner in the VPC",
            1,
            udp(M1, GW, P1, NOBODY, 64, (1, 2), b""),
            NoRoute,
        ),
        drop_row(
            "other VPC: 10.0.1.10 is not reachable from vpc-b",
            4,
            udp(M4, GW, P4, P1, 64, (1, 2), b""),
            NoRoute,
        ),
        drop_row(
            "other VPC: vpc-a's second subnet is not reachable from vpc-b",
            5,
            udp(M5, GW, P5, P3, 64, (1, 2), b""),
            NoRoute,
        ),
        drop_row(
            "to the sender's own address",
            1,
            udp(M1, M1, P1, P1_SEC, 64, (1, 2), b""),
            NoRoute,
        ),
        drop_row(
            "TCP to the router",
            1,
            tcp(M1, GW, P1, A1_GW, (40000, 53), b""),
            NoRoute,
        ),
        drop_row(
            "echo reply to the router is not answered",
            1,
            echo(M1, GW, P1, A1_GW, 64, true),
            NoRoute,
        ),
        row(
            "echo request to the router: answered in place, TTL 64",
            1,
            echo(M1, GW, P1, A1_GW, 33, false),
            Verdict::Replied,
            Out::Frames(vec![(1, echo(GW, M1, A1_GW, P1, 64, true))]),
        ),
        row(
            "echo request to the router with Ethernet padding: reply trimmed",
            3,
            {
                let mut f = echo(M3, GW, P3, A2_GW, 64, false);
                f.resize(f.len() + 9, 0xee);
                f
            },
            Verdict::Replied,
            Out::Frames(vec![(3, echo(GW, M3, A2_GW, P3, 64, true))]),
        ),
        row(
            "forward toward a full queue: counted on the destination",
            1,
            udp(M1, M2, P1, P2, 64, (1, 2), b""),
            Verdict::Dropped(QueueFull),
            Out::Refused(2),
        ),
        row(
            "UDP 68 -> 67 to a peer (not to the router) is plain traffic",
            1,
            udp(M1, M2, P1, P2, 64, (68, 67), b"not dhcp"),
            Verdict::Forwarded(2),
            Out::Frames(vec![(2, udp(M1, M2, P1, P2, 64, (68, 67), b"not dhcp"))]),
        ),
    ]
}

fn drop_rows() -> Vec<Row> {
    use DropReason::*;
    let mdns_mac = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
    let mut ff02_2 = [0u8; 16];
    ff02_2[0] = 0xff;
    ff02_2[1] = 0x02;
    ff02_2[15] = 2;
    let mut unicast6 = [0u8; 16];
    unicast6[0] = 0xfd;
    unicast6[15] = 9;
    vec![
        drop_row(
            "a frame with another interface's source MAC",
            1,
            udp(M2, M3, P1, P3, 64, (5000, 53), b"spoofed"),
            SpoofedMac,
        ),
        drop_row(
            "an ARP request with a made-up source MAC",
            1,
            who_has([0x02, 0xde, 0xad, 0, 0, 1], P1, A1_GW),
            SpoofedMac,
        ),
        drop_row(
            "ingress port not in the snapshot",
            ABSENT,
            who_has(M1, P1, A1_GW),
            PortDown,
        ),
        drop_row(
            "ingress port id beyond MAX_PORTS",
            MAX_PORTS as PortId + 5,
            who_has(M1, P1, A1_GW),
            PortDown,
        ),
        drop_row(
            "Ethernet broadcast carrying unicast IPv4",
            1,
            udp(M1, BCAST, P1, P2, 64, (1, 2), b""),
            Broadcast,
        ),
        drop_row(
            "limited broadcast that is not DHCP (NetBIOS)",
            1,
            udp(M1, BCAST, P1, ALL_ONES, 64, (137, 137), b""),
            Broadcast,
        ),
        drop_row(
            "limited broadcast to 255.255.255.255 on a unicast MAC",
            1,
            udp(M1, M2, P1, ALL_ONES, 64, (1, 2), b""),
            Broadcast,
        ),
        drop_row(
            "subnet-directed broadcast",
            1,
            udp(M1, GW, P1, [10, 0, 1, 255], 64, (1, 2), b""),
            Broadcast,
        ),
        drop_row(
            "IPv4 multicast (mDNS)",
            1,
            udp(M1, mdns_mac, P1, [224, 0, 0, 251], 255, (5353, 5353), b""),
            Broadcast,
        ),
        drop_row(
            "IPv4 multicast address on a unicast MAC",
            1,
            udp(M1, M2, P1, [239, 1, 2, 3], 64, (1, 2), b""),
            Broadcast,
        ),
        drop_row(
            "IPv6 to all-routers multicast",
            1,
            ipv6_udp([0x33, 0x33, 0, 0, 0, 2], ff02_2),
            Broadcast,
        ),
        drop_row("IPv6 unicast", 1, ipv6_udp(M2, unicast6), Broadcast),
        drop_row(
            "LLDP to its multicast MAC",
            1,
            raw([0x01, 0x80, 0xc2, 0, 0, 0x0e], 0x88cc, &[0; 46]),
            Broadcast,
        ),
        drop_row(
            "unknown ethertype, unicast",
            1,
            raw(M2, 0x88b5, &[0; 46]),
            Unsupported,
        ),
        drop_row(
            "VLAN-tagged frame",
            1,
            raw(M2, 0x8100, &[0, 5, 0x08, 0x00, 0x45, 0, 0, 20]),
            Unsupported,
        ),
        drop_row("13-byte frame", 1, vec![0xff; 13], Malformed),
        drop_row("empty frame", 1, vec![], Malformed),
        drop_row(
            "Ethernet header only, IPv4",
            1,
            raw(M2, 0x0800, &[]),
            Malformed,
        ),
        drop_row(
            "IPv4 version field 5",
            1,
            {
                let mut f = udp(M1, M2, P1, P2, 64, (1, 2), b"v");
                f[14] = 0x55;
                f
            },
            Malformed,
        ),
        drop_row(
            "IPv4 header length 16",
            1,
            {
                let mut f = udp(M1, M2, P1, P2, 64, (1, 2), b"v");
                f[14] = 0x44;
                f
            },
            Malformed,
        ),
        drop_row(
            "IPv4 total length beyond the frame",
            1,
            {
                let mut f = udp(M1, M2, P1, P2, 64, (1, 2), b"v");
                f[16] = 0x05;
                f
            },
            Malformed,
        ),
        drop_row(
            "echo request to the router cut inside the ICMP header",
            1,
            patch_ipv4(
                echo(M1, GW, P1, A1_GW, 64, false)[..14 + 24].to_vec(),
                |h| {
                    h.set_payload_len(4).expect("len");
                },
            ),
            Malformed,
        ),
    ]
}

fn dhcp_check(msg_type: u8, xid: u32, mac: [u8; 6]) -> DhcpCheck {
    DhcpCheck {
        msg_type,
        xid,
        chaddr: mac,
        yiaddr: ZERO,
        ciaddr: ZERO,
        server: A1_GW,
        dst_mac: BCAST,
        dst_ip: ALL_ONES,
        options: vec![],
        absent: vec![],
    }
}

/// The options every OFFER/ACK for port 1 carries.
fn port1_options() -> Vec<(u8, Vec<u8>)> {
    vec![
        (54, A1_GW.to_vec()),
        (51, 3600u32.to_be_bytes().to_vec()),
        (1, vec![255, 255, 255, 0]),
        (3, A1_GW.to_vec()),
        (6, vec![10, 0, 1, 2]),
        (26, 9001u16.to_be_bytes().to_vec()),
        (28, vec![10, 0, 1, 255]),
        (12, b"ip-10-0-1-10".to_vec()),
    ]
}

fn dhcp_rows() -> Vec<Row> {
    use DropReason::*;
    let discover_b = DhcpMsg {
        flags: 0x8000,
        ..DhcpMsg::new(M1, 0x1111, mt::DISCOVER).udhcpc()
    };
    vec![
        row(
            "udhcpc DISCOVER with the broadcast flag: broadcast OFFER",
            1,
            discover_b.broadcast_frame(),
            Verdict::Replied,
            Out::Dhcp(DhcpCheck {
                yiaddr: P1,
                options: port1_options(),
                ..dhcp_check(mt::OFFER, 0x1111, M1)
            }),
        ),
        row(
            "udhcpc DISCOVER without the flag: OFFER unicast to MAC and yiaddr",
            3,
            DhcpMsg::new(M3, 0x3333, mt::DISCOVER)
                .udhcpc()
                .broadcast_frame(),
            Verdict::Replied,
            Out::Dhcp(DhcpCheck {
                yiaddr: P3,
                server: A2_GW,
                dst_mac: M3,
                dst_ip: P3,
                options: vec![
                    (54, A2_GW.to_vec()),
                    (3, A2_GW.to_vec()),
                    (6, vec![10, 0, 0, 2]),
                    (26, 1500u16.to_be_bytes().to_vec()),
                    (28, vec![10, 0, 2, 255]),
                    (12, b"ip-10-0-2-30".to_vec()),
                ],
                ..dhcp_check(mt::OFFER, 0x3333, M3)
            }),
        ),
        row(
            "dhclient REQUEST (SELECTING, server id = router): ACK",
            1,
            DhcpMsg::new(M1, 0x2222, mt::REQUEST)
                .opt(50, &P1)
                .opt(54, &A1_GW)
                .dhclient()
                .broadcast_frame(),
            Verdict::Replied,
            Out::Dhcp(DhcpCheck {
                yiaddr: P1,
                dst_mac: M1,
                dst_ip: P1,
                options: port1_options(),
                ..dhcp_check(mt::ACK, 0x2222, M1)
            }),
        ),
        row(
            "REQUEST in INIT-REBOOT for an address the port does not own: NAK",
            1,
            DhcpMsg::new(M1, 0x4444, mt::REQUEST)
                .opt(50, &NOBODY)
                .dhclient()
                .broadcast_frame(),
            Verdict::Replied,
            Out::Dhcp(DhcpCheck {
                options: vec![(54, A1_GW.to_vec())],
                absent: vec![51, 1, 3, 6, 26, 28, 12],
                ..dhcp_check(mt::NAK, 0x4444, M1)
            }),
        ),
        row(
            "REQUEST for the secondary IP: NAK (leases are for the primary)",
            1,
            DhcpMsg::new(M1, 0x4445, mt::REQUEST)
                .opt(50, &P1_SEC)
                .broadcast_frame(),
            Verdict::Replied,
            Out::Dhcp(DhcpCheck {
                absent: vec![51],
                ..dhcp_check(mt::NAK, 0x4445, M1)
            }),
        ),
        row(
            "RENEWING: unicast to the router with ciaddr: ACK to ciaddr",
            1,
            DhcpMsg {
                ciaddr: P1,
                ..DhcpMsg::new(M1, 0x5555, mt::REQUEST).udhcpc()
            }
            .unicast_frame(P1, A1_GW),
            Verdict::Replied,
            Out::Dhcp(DhcpCheck {
                yiaddr: P1,
                ciaddr: P1,
                dst_mac: M1,
                dst_ip: P1,
                options: port1_options(),
                ..dhcp_check(mt::ACK, 0x5555, M1)
            }),
        ),
        row(
            "RENEWING with a ciaddr the port does not own: NAK",
            1,
            DhcpMsg {
                ciaddr: NOBODY,
                ..DhcpMsg::new(M1, 0x5556, mt::REQUEST)
            }
            .unicast_frame(NOBODY, A1_GW),
            Verdict::Replied,
            Out::Dhcp(dhcp_check(mt::NAK, 0x5556, M1)),
        ),
        row(
            "REQUEST without requested IP nor ciaddr: NAK",
            2,
            DhcpMsg::new(M2, 0x5557, mt::REQUEST).broadcast_frame(),
            Verdict::Replied,
            Out::Dhcp(dhcp_check(mt::NAK, 0x5557, M2)),
        ),
        row(
            "INFORM: ACK with configuration, no lease, to ciaddr",
            1,
            DhcpMsg {
                ciaddr: P1,
                ..DhcpMsg::new(M1, 0x6666, mt::INFORM)
            }
            .unicast_frame(P1, A1_GW),
            Verdict::Replied,
            Out::Dhcp(DhcpCheck {
                ciaddr: P1,
                dst_mac: M1,
                dst_ip: P1,
                options: vec![(1, vec![255, 255, 255, 0]), (3, A1_GW.to_vec())],
                absent: vec![51],
                ..dhcp_check(mt::ACK, 0x6666, M1)
            }),
        ),
        row(
            "DISCOVER in vpc-b: the port's own address, same router address",
            4,
            DhcpMsg::new(M4, 0x7777, mt::DISCOVER).broadcast_frame(),
            Verdict::Replied,
            Out::Dhcp(DhcpCheck {
                yiaddr: P4,
                dst_mac: M4,
                dst_ip: P4,
                options: vec![(3, A1_GW.to_vec()), (12, b"ip-10-0-1-20".to_vec())],
                ..dhcp_check(mt::OFFER, 0x7777, M4)
            }),
        ),
        row(
            "DHCP reply toward a full queue",
            1,
            discover_b.broadcast_frame(),
            Verdict::Dropped(QueueFull),
            Out::Refused(1),
        ),
        drop_row(
            "REQUEST naming another server: silence",
            1,
            DhcpMsg::new(M1, 0x8888, mt::REQUEST)
                .opt(50, &P1)
                .opt(54, &[10, 0, 1, 254])
                .broadcast_frame(),
            Broadcast,
        ),
        drop_row(
            "RELEASE: nothing to free",
            1,
            DhcpMsg {
                ciaddr: P1,
                ..DhcpMsg::new(M1, 0x9999, mt::RELEASE)
            }
            .unicast_frame(P1, A1_GW),
            Unsupported,
        ),
        drop_row(
            "DECLINE",
            1,
            DhcpMsg::new(M1, 0x9998, mt::DECLINE)
                .opt(50, &P1)
                .broadcast_frame(),
            Unsupported,
        ),
        drop_row(
            "plain BOOTP (no magic cookie)",
            1,
            DhcpMsg {
                cookie: false,
                ..DhcpMsg::new(M1, 1, mt::DISCOVER)
            }
            .broadcast_frame(),
            Unsupported,
        ),
        drop_row(
            "no message type option",
            1,
            DhcpMsg {
                options: vec![],
                ..DhcpMsg::new(M1, 1, mt::DISCOVER)
            }
            .broadcast_frame(),
            Unsupported,
        ),
        drop_row(
            "BOOTREPLY sent by a client",
            1,
            DhcpMsg {
                op: 2,
                ..DhcpMsg::new(M1, 1, mt::DISCOVER)
            }
            .broadcast_frame(),
            Malformed,
        ),
        drop_row(
            "option list cut inside an option",
            1,
            DhcpMsg {
                tail: vec![option::REQUESTED_IP, 4, 10, 0],
                ..DhcpMsg::new(M1, 1, mt::DISCOVER)
            }
            .broadcast_frame(),
            Malformed,
        ),
        drop_row(
            "DHCP message shorter than the BOOTP header",
            1,
            udp(M1, BCAST, ZERO, ALL_ONES, 64, (68, 67), &[1, 1, 6, 0]),
            Malformed,
        ),
        drop_row(
            "UDP length field larger than the datagram",
            1,
            {
                let mut f = DhcpMsg::new(M1, 1, mt::DISCOVER).broadcast_frame();
                f[38] = 0xff;
                f
            },
            Malformed,
        ),
        drop_row(
            "fragmented DHCP",
            1,
            patch_ipv4(DhcpMsg::new(M1, 1, mt::DISCOVER).broadcast_frame(), |h| {
                h.more_fragments = true;
            }),
            Unsupported,
        ),
    ]
}

/// The instance metadata path: guest -> server with the source replaced by
/// the port's client address, server -> guest translated back. The
/// expected frames are built from scratch with the translated addresses,
/// so equal bytes mean the incremental checksum updates are exact.
fn metadata_rows() -> Vec<Row> {
    use crate::wire::checksum;
    use DropReason::*;
    let to_md = |desc: &'static str, port: PortId, frame: Vec<u8>, out: Vec<u8>| {
        row(
            desc,
            port,
            frame,
            Verdict::Forwarded(MD),
            Out::Frames(vec![(MD, out)]),
        )
    };
    let from_md = |desc: &'static str, to: PortId, frame: Vec<u8>, out: Vec<u8>| {
        row(
            desc,
            MD,
            frame,
            Verdict::Forwarded(to),
            Out::Frames(vec![(to, out)]),
        )
    };
    // A guest using checksum offload: the TCP field holds the
    // pseudo-header sum, uncomplemented.
    let partial = |src: [u8; 4]| {
        let mut f = tcp(M1, GW, src, IMDS, (40100, 80), b"GET /latest/");
        let len = (f.len() - 34) as u16;
        let p = !checksum::finish(checksum::pseudo_header(
            Ipv4Addr::from(src),
            IMDS_ADDR,
            6,
            len,
        ));
        f[34 + 16..34 + 18].copy_from_slice(&p.to_be_bytes());
        f
    };
    let csum_meta = PacketMeta {
        csum: Some(CsumOffload {
            start: 34,
            offset: 16,
        }),
        gso: None,
    };
    vec![
        to_md(
            "TCP to the metadata address: source becomes port 1's client address",
            1,
            tcp(M1, GW, P1, IMDS, (40000, 80), b"GET /latest/meta-data/"),
            tcp(
                MDM,
                MD_PEER,
                client(1, 0),
                IMDS,
                (40000, 80),
                b"GET /latest/meta-data/",
            ),
        ),
        from_md(
            "the server's answer reaches port 1 from the gateway MAC",
            1,
            tcp(MD_PEER, MDM, IMDS, client(1, 0), (80, 40000), b"200 OK"),
            tcp(GW, M1, IMDS, P1, (80, 40000), b"200 OK"),
        ),
        to_md(
            "UDP from a secondary IP: address index 1",
            1,
            udp(M1, GW, P1_SEC, IMDS, 64, (5000, 53), b"q"),
            udp(MDM, MD_PEER, client(1, 1), IMDS, 64, (5000, 53), b"q"),
        ),
        from_md(
            "the answer to index 1 goes back to the secondary IP",
            1,
            udp(MD_PEER, MDM, IMDS, client(1, 1), 64, (53, 5000), b"a"),
            udp(GW, M1, IMDS, P1_SEC, 64, (53, 5000), b"a"),
        ),
        to_md(
            "TTL 1 from the guest is not decremented",
            2,
            udp(M2, GW, P2, IMDS, 1, (5001, 80), b"x"),
            udp(MDM, MD_PEER, client(2, 0), IMDS, 1, (5001, 80), b"x"),
        ),
        from_md(
            "a token reply with TTL 1 (the IMDSv2 hop limit) arrives with TTL 1",
            2,
            udp(MD_PEER, MDM, IMDS, client(2, 0), 1, (80, 5001), b"token"),
            udp(GW, M2, IMDS, P2, 1, (80, 5001), b"token"),
        ),
        to_md(
            "vpc-b's 10.0.1.20 (port 4) gets another client address than vpc-a's (port 2)",
            4,
            tcp(M4, GW, P4, IMDS, (40000, 80), b"GET /"),
            tcp(MDM, MD_PEER, client(4, 0), IMDS, (40000, 80), b"GET /"),
        ),
        from_md(
            "the answer to port 4's client address reaches port 4, not port 2",
            4,
            tcp(MD_PEER, MDM, IMDS, client(4, 0), (80, 40000), b"vpc-b"),
            tcp(GW, M4, IMDS, P4, (80, 40000), b"vpc-b"),
        ),
        from_md(
            "the same tuple to port 2's client address reaches port 2",
            2,
            tcp(MD_PEER, MDM, IMDS, client(2, 0), (80, 40000), b"vpc-a"),
            tcp(GW, M2, IMDS, P2, (80, 40000), b"vpc-a"),
        ),
        to_md(
            "echo request to the metadata address, from another subnet",
            3,
            echo(M3, GW, P3, IMDS, 64, false),
            echo(MDM, MD_PEER, client(3, 0), IMDS, 64, false),
        ),
        from_md(
            "echo reply from the server",
            3,
            echo(MD_PEER, MDM, IMDS, client(3, 0), 64, true),
            echo(GW, M3, IMDS, P3, 64, true),
        ),
        Row {
            meta: csum_meta,
            ..to_md(
                "partial checksum (offload): the pseudo-header sum follows the new source",
                1,
                partial(P1),
                set_macs(partial(client(1, 0)), MD_PEER, MDM),
            )
        },
        drop_row(
            "echo reply to the metadata address",
            1,
            echo(M1, GW, P1, IMDS, 64, true),
            NoRoute,
        ),
        drop_row(
            "GRE to the metadata address",
            1,
            patch_ipv4(udp(M1, GW, P1, IMDS, 64, (1, 2), b""), |h| {
                h.protocol = etherparse::IpNumber::GRE;
            }),
            NoRoute,
        ),
        drop_row(
            "server to an address outside the client block",
            MD,
            tcp(MD_PEER, MDM, IMDS, P1, (80, 40000), b""),
            NoRoute,
        ),
        drop_row(
            "forged source on the metadata port",
            MD,
            tcp(
                MD_PEER,
                MDM,
                [169, 254, 169, 253],
                client(1, 0),
                (80, 40000),
                b"",
            ),
            NoRoute,
        ),
        drop_row(
            "client address of a port not in the snapshot",
            MD,
            tcp(MD_PEER, MDM, IMDS, client(ABSENT, 0), (80, 40000), b""),
            NoRoute,
        ),
        drop_row(
            "client address of the metadata port itself",
            MD,
            tcp(MD_PEER, MDM, IMDS, client(MD, 0), (80, 40000), b""),
            NoRoute,
        ),
        drop_row(
            "client address beyond the port's addresses",
            MD,
            tcp(MD_PEER, MDM, IMDS, client(1, 2), (80, 40000), b""),
            NoRoute,
        ),
        drop_row(
            "client address of a port id beyond MAX_PORTS",
            MD,
            tcp(MD_PEER, MDM, IMDS, [100, 127, 255, 255], (80, 40000), b""),
            NoRoute,
        ),
        drop_row(
            "broadcast from the metadata port",
            MD,
            udp(MD_PEER, BCAST, IMDS, client(1, 0), 64, (1, 2), b""),
            Broadcast,
        ),
        drop_row(
            "IPv6 from the metadata port",
            MD,
            raw(MDM, 0x86dd, &[0x60; 40]),
            Unsupported,
        ),
        drop_row(
            "truncated IPv4 from the metadata port",
            MD,
            tcp(MD_PEER, MDM, IMDS, client(1, 0), (80, 40000), b"")[..30].to_vec(),
            Malformed,
        ),
        row(
            "guest ARP for the metadata address: the gateway MAC",
            1,
            who_has(M1, P1, IMDS),
            Verdict::Replied,
            Out::Frames(vec![(1, is_at(GW, IMDS, M1, P1))]),
        ),
        row(
            "namespace ARP for its gateway: the switch's metadata MAC",
            MD,
            who_has(MD_PEER, IMDS, METADATA_GATEWAY.octets()),
            Verdict::Replied,
            Out::Frames(vec![(
                MD,
                is_at(MDM, METADATA_GATEWAY.octets(), MD_PEER, IMDS),
            )]),
        ),
        row(
            "namespace ARP for a client address (no neighbour entry)",
            MD,
            who_has(MD_PEER, IMDS, client(3, 0)),
            Verdict::Replied,
            Out::Frames(vec![(MD, is_at(MDM, client(3, 0), MD_PEER, IMDS))]),
        ),
        drop_row(
            "namespace ARP for a VPC address",
            MD,
            who_has(MD_PEER, IMDS, P1),
            NoRoute,
        ),
        drop_row(
            "gratuitous ARP from the namespace",
            MD,
            who_has(MD_PEER, IMDS, IMDS),
            Broadcast,
        ),
    ]
}

fn all_rows() -> Vec<Row> {
    let mut rows = arp_rows();
    rows.extend(forward_rows());
    rows.extend(drop_rows());
    rows.extend(dhcp_rows());
    rows.extend(metadata_rows());
    rows
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn arp_table() {
    let (sw, mut w) = switch();
    run(&sw, &mut w, &arp_rows());
}

#[test]
fn forward_table() {
    let (sw, mut w) = switch();
    run(&sw, &mut w, &forward_rows());
}

#[test]
fn drop_table() {
    let (sw, mut w) = switch();
    run(&sw, &mut w, &drop_rows());
}

#[test]
fn dhcp_table() {
    let (sw, mut w) = switch();
    run(&sw, &mut w, &dhcp_rows());
}

#[test]
fn metadata_table() {
    let (sw, mut w) = switch();
    run(&sw, &mut w, &metadata_rows());
}

/// Every frame the metadata path emits has valid IPv4 and TCP/UDP/ICMP
/// checksums, checked with the switch's own checksum helpers (the table
/// compares against etherparse's).
#[test]
fn metadata_translation_keeps_checksums_valid() {
    use crate::wire::{checksum, icmpv4, ipv4};
    let (_sw, mut w) = switch();
    let mut checked = [0usize; 3];
    for r in metadata_rows() {
        let mut frame = r.frame.clone();
        let mut cap = Capture::default();
        let v = w.process(r.ingress, &mut frame, &r.meta, &mut cap);
        if !matches!(v, Verdict::Forwarded(_)) {
            continue;
        }
        let out = &cap.sent[0].frame;
        let ip = ipv4::Packet::new_checked(&out[14..]).expect("ipv4");
        assert!(ip.verify_checksum(), "{}: IPv4 header checksum", r.desc);
        let l4 = ip.payload();
        let pseudo = checksum::pseudo_header(ip.src(), ip.dst(), ip.protocol(), l4.len() as u16);
        match ip.protocol() {
            ipv4::protocol::TCP | ipv4::protocol::UDP if r.meta.csum.is_some() => {
                // Offload: the field holds the new pseudo-header sum.
                let at = r.meta.csum.map_or(0, |c| usize::from(c.offset));
                let field = u16::from_be_bytes([l4[at], l4[at + 1]]);
                assert_eq!(field, !checksum::finish(pseudo), "{}: partial sum", r.desc);
                checked[2] += 1;
            }
            ipv4::protocol::TCP | ipv4::protocol::UDP => {
                let total = checksum::combine(pseudo, checksum::sum(l4));
                assert_eq!(checksum::finish(total), 0, "{}: L4 checksum", r.desc);
                checked[0] += 1;
            }
            ipv4::protocol::ICMP => {
                let icmp = icmpv4::Packet::new_checked(l4).expect("icmp");
                assert!(icmp.verify_checksum(), "{}: ICMP checksum", r.desc);
                checked[1] += 1;
            }
            p => panic!("{}: unexpected protocol {p}", r.desc),
        }
    }
    assert!(
        checked[0] >= 8 && checked[1] >= 2 && checked[2] >= 1,
        "{checked:?}"
    );
}

/// Reasons this topology (no policy) does not produce: the policy tables
/// in `policy_tests` cover all but `RateLimit`, which no stage produces yet.
const POLICY_REASONS: [DropReason; 5] = [
    DropReason::SourceCheck,
    DropReason::SecurityGroup,
    DropReason::Nacl,
    DropReason::RateLimit,
    DropReason::ConntrackFull,
];

/// Fails when a counter is never incremented by the fixture tables (and
/// when a reason listed as not yet produced starts being produced).
#[test]
fn every_counter_is_incremented() {
    let (sw, mut w) = switch();
    run(&sw, &mut w, &all_rows());
    let mut total = PortStats::default();
    for p in 0..MAX_PORTS as PortId {
        let s = sw.stats(p);
        total.tx_packets += s.tx_packets;
        total.tx_bytes += s.tx_bytes;
        total.rx_packets += s.rx_packets;
        total.rx_bytes += s.rx_bytes;
        total.arp_replies += s.arp_replies;
        total.dhcp_replies += s.dhcp_replies;
        for (t, d) in total.drops.iter_mut().zip(s.drops) {
            *t += d;
        }
    }
    for (name, value) in [
        ("tx_packets", total.tx_packets),
        ("tx_bytes", total.tx_bytes),
        ("rx_packets", total.rx_packets),
        ("rx_bytes", total.rx_bytes),
        ("arp_replies", total.arp_replies),
        ("dhcp_replies", total.dhcp_replies),
    ] {
        assert!(value > 0, "{name} is never incremented");
    }
    for reason in DropReason::ALL {
        if POLICY_REASONS.contains(&reason) {
            assert_eq!(total.drops(reason), 0, "{reason} without any policy");
        } else {
            assert!(
                total.drops(reason) > 0,
                "drop counter {reason} is never incremented"
            );
        }
    }
}

/// The smallest prefix of a frame that parses as a whole: 14 + IPv4 total
/// length, 14 + 28 for ARP, 14 otherwise.
fn min_valid_len(frame: &[u8]) -> usize {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => match frame.get(16..18) {
            Some(&[hi, lo]) => 14 + usize::from(u16::from_be_bytes([hi, lo])),
            _ => 14,
        },
        Some([0x08, 0x06]) => 42,
        _ => 14,
    }
}

/// Every prefix of every fixture frame: never a panic, and a frame cut
/// before the end of its headers is `Malformed` (or `PortDown`).
#[test]
fn truncated_frames_never_panic() {
    let (_sw, mut w) = switch();
    let mut checked = 0;
    for r in all_rows() {
        let full = min_valid_len(&r.frame).min(r.frame.len());
        // Every cut of ordinary frames; a sample of the 64 KiB one.
        let dense = r.frame.len().min(2048);
        for len in (0..dense).chain((dense..r.frame.len()).step_by(997)) {
            let mut frame = r.frame[..len].to_vec();
            let mut cap = Capture::default();
            let v = w.process(r.ingress, &mut frame, &r.meta, &mut cap);
            check_consistent(r.desc, r.ingress, &r.meta, &r.frame[..len], v, &cap);
            if len < full {
                let want = match r.verdict {
                    Verdict::Dropped(DropReason::PortDown) => DropReason::PortDown,
                    // The source MAC is judged as soon as the Ethernet
                    // header is whole.
                    Verdict::Dropped(DropReason::SpoofedMac) if len >= 14 => DropReason::SpoofedMac,
                    _ => DropReason::Malformed,
                };
                assert_eq!(v, Verdict::Dropped(want), "{}: cut at {len}", r.desc);
                checked += 1;
            }
        }
    }
    assert!(checked > 5_000, "only {checked} cuts checked");
}

/// IPv4 source and destination of a frame the switch parsed.
fn ip_addrs(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
    let at = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    (at(26), at(30))
}

/// What every verdict promises about the emitted frames, given the frame
/// as it was before processing.
fn check_consistent(
    desc: &str,
    ingress: PortId,
    meta: &PacketMeta,
    input: &[u8],
    v: Verdict,
    cap: &Capture,
) {
    let snap = topology();
    let len = input.len();
    match v {
        Verdict::Forwarded(d) => {
            assert_eq!(cap.sent.len(), 1, "{desc}");
            assert_eq!(cap.sent[0].port, d, "{desc}");
            assert_ne!(d, ingress, "{desc}: forwarded back to ingress");
            let (src, dst) = ip_addrs(&cap.sent[0].frame);
            if d == MD {
                // Only to the server, from the sender's own client address.
                let owner = snap.port(ingress).expect("sent by an ENI");
                let index = owner
                    .addresses()
                    .position(|a| a == ip_addrs(input).0)
                    .expect("from one of the sender's addresses");
                assert_eq!(dst, IMDS_ADDR, "{desc}");
                assert_eq!(
                    decode_metadata_client(src),
                    Some((ingress, index as u8)),
                    "{desc}: client address"
                );
            } else if ingress == MD {
                // Only to the port and address the client address names.
                let (port, index) =
                    decode_metadata_client(ip_addrs(input).1).expect("to a client address");
                assert_eq!(d, port, "{desc}: delivered to another port");
                let want = snap.port(d).and_then(|p| p.addresses().nth(index.into()));
                assert_eq!(Some(dst), want, "{desc}: guest address");
                assert_eq!(src, IMDS_ADDR, "{desc}");
            } else {
                assert!(snap.port(d).is_some(), "{desc}: forwarded to unknown port");
                assert_eq!(
                    snap.vpc_of_port(d),
                    snap.vpc_of_port(ingress),
                    "{desc}: VPC leak"
                );
            }
            assert_eq!(cap.sent[0].frame.len(), len, "{desc}: forwarded length");
            assert_eq!(cap.sent[0].meta, *meta, "{desc}: forwarded meta");
        }
        Verdict::Replied => {
            assert_eq!(cap.sent.len(), 1, "{desc}");
            assert_eq!(cap.sent[0].port, ingress, "{desc}: reply elsewhere");
            assert_eq!(cap.sent[0].meta, PacketMeta::default(), "{desc}");
        }
        Verdict::Dropped(_) => assert!(cap.sent.is_empty(), "{desc}: dropped yet emitted"),
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Random bytes behind each interesting ethertype, and random mutations of
/// the fixture frames: never a panic, and every verdict keeps its promises.
#[test]
fn random_frames_never_panic() {
    let (_sw, mut w) = switch();
    let fixtures = all_rows();
    let ports = [1, 2, 3, 4, 5, MD, ABSENT];
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut verdicts = std::collections::HashSet::new();
    for i in 0..6000 {
        let r = xorshift(&mut s);
        let ingress = ports[(r % ports.len() as u64) as usize];
        let mut frame = if i % 2 == 0 {
            // Random bytes: an ethertype we parse, a plausible IPv4 first
            // byte and UDP 68 -> 67 half of the time.
            let len = (xorshift(&mut s) % 400) as usize;
            let mut f: Vec<u8> = (0..len).map(|_| xorshift(&mut s) as u8).collect();
            let ethertype: [u8; 2] = match r >> 8 & 3 {
                0 => [0x08, 0x06],
                1 | 2 => [0x08, 0x00],
                _ => [0x86, 0xdd],
            };
            if f.len() >= 14 {
                f[12..14].copy_from_slice(&ethertype);
            }
            if f.len() >= 38 && ethertype == [0x08, 0x00] && r >> 16 & 1 == 0 {
                f[14] = 0x45;
                let total = (f.len() - 14) as u16;
                f[16..18].copy_from_slice(&total.to_be_bytes());
                f[23] = 17;
                f[34..38].copy_from_slice(&[0, 68, 0, 67]);
            }
            f
        } else {
            // A fixture with a few bytes changed and maybe a cut.
            let base = &fixtures[(r as usize >> 8) % fixtures.len()].frame;
            let mut f = base.clone();
            if !f.is_empty() {
                for _ in 0..1 + (r >> 20) % 4 {
                    let at = (xorshift(&mut s) as usize) % f.len().min(600);
                    f[at] = xorshift(&mut s) as u8;
                }
            }
            if r >> 24 & 1 == 0 {
                let cut = (xorshift(&mut s) as usize) % (f.len() + 1);
                f.truncate(cut);
            }
            f
        };
        let meta = PacketMeta::default();
        let mut cap = Capture::default();
        let input = frame.clone();
        let v = w.process(ingress, &mut frame, &meta, &mut cap);
        check_consistent("random frame", ingress, &meta, &input, v, &cap);
        verdicts.insert(format!("{v:?}"));
    }
    // The generator reaches far enough into the pipeline to matter.
    for want in [
        "Replied",
        "Dropped(Malformed)",
        "Dropped(NoRoute)",
        "Dropped(PortDown)",
    ] {
        assert!(verdicts.contains(want), "no {want} among {verdicts:?}");
    }
    assert!(
        verdicts.iter().any(|v| v.starts_with("Forwarded")),
        "{verdicts:?}"
    );
}

#[test]
fn forwarded_flow_hash_is_symmetric() {
    let (_sw, mut w) = switch();
    let cases = [
        (
            1,
            tcp(M1, M2, P1, P2, (40000, 80), b"syn"),
            2,
            tcp(M2, M1, P2, P1, (80, 40000), b"ack"),
        ),
        (
            1,
            udp(M1, GW, P1, P3, 64, (5000, 53), b"q"),
            3,
            udp(M3, GW, P3, P1, 64, (53, 5000), b"a"),
        ),
        (
            1,
            echo(M1, GW, P1, P3, 64, false),
            3,
            echo(M3, GW, P3, P1, 64, true),
        ),
    ];
    let mut hashes = Vec::new();
    let cases = cases.into_iter().chain([
        (
            1,
            tcp(M1, M2, P1, P2, (40001, 80), b"syn"),
            2,
            tcp(M2, M1, P2, P1, (80, 40001), b"ack"),
        ),
        // Through the metadata translation: hashed as the guest sees it.
        (
            1,
            tcp(M1, GW, P1, IMDS, (40002, 80), b"syn"),
            MD,
            tcp(MD_PEER, MDM, IMDS, client(1, 0), (80, 40002), b"ack"),
        ),
    ]);
    for (a, mut fa, b, mut fb) in cases {
        let mut ca = Capture::default();
        let mut cb = Capture::default();
        assert_eq!(
            w.process(a, &mut fa, &PacketMeta::default(), &mut ca),
            Verdict::Forwarded(b)
        );
        assert_eq!(
            w.process(b, &mut fb, &PacketMeta::default(), &mut cb),
            Verdict::Forwarded(a)
        );
        assert_eq!(ca.sent[0].hash, cb.sent[0].hash);
        hashes.push(ca.sent[0].hash);
    }
    // Different flows (including two that differ only in the client
    // port), different hashes.
    hashes.sort_unstable();
    hashes.dedup();
    assert_eq!(hashes.len(), 5);
}

#[test]
fn published_snapshot_is_picked_up_and_counters_reset() {
    let (sw, mut w) = switch();
    let mut cap = Capture::default();
    let frame = udp(M1, M2, P1, [10, 0, 1, 50], 64, (1, 2), b"");
    assert_eq!(
        w.process(1, &mut frame.clone(), &PacketMeta::default(), &mut cap),
        Verdict::Dropped(DropReason::NoRoute)
    );
    assert_eq!(w.snapshot().generation, 1);

    // Port 2 moves to 10.0.1.50 and port 6 appears.
    let mut snap = topology();
    let mut ports: Vec<PortConfig> = snap.ports.drain(..).flatten().collect();
    ports[1].primary_ip = Ipv4Addr::new(10, 0, 1, 50);
    ports.push(port(6, [2, 0, 0, 0, 0, 6], 0, [10, 0, 1, 60], &[], 1500));
    sw.publish(Snapshot::build(2, snap.subnets.clone(), ports).expect("valid"));
    assert_eq!(sw.load().generation, 2);
    assert_eq!(
        w.process(1, &mut frame.clone(), &PacketMeta::default(), &mut cap),
        Verdict::Forwarded(2)
    );
    assert_eq!(w.snapshot().generation, 2);
    assert_eq!(
        w.process(
            6,
            &mut who_has([2, 0, 0, 0, 0, 6], [10, 0, 1, 60], A1_GW),
            &PacketMeta::default(),
            &mut cap
        ),
        Verdict::Replied
    );

    assert_eq!(sw.stats(1).tx_packets, 2);
    assert_eq!(sw.stats(1).drops(DropReason::NoRoute), 1);
    sw.reset_counters(1);
    assert_eq!(sw.stats(1), PortStats::default());
    assert_eq!(sw.stats(2).rx_packets, 1, "other ports keep their counters");
    assert!(sw.counters(MAX_PORTS as PortId).is_none());
    assert_eq!(sw.stats(MAX_PORTS as PortId), PortStats::default());
}

#[test]
fn workers_share_counters_across_threads() {
    let (sw, _) = switch();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let mut w = sw.worker();
            std::thread::spawn(move || {
                let mut cap = Capture::default();
                for _ in 0..500 {
                    let mut f = udp(M1, M2, P1, P2, 64, (1, 2), b"x");
                    w.process(1, &mut f, &PacketMeta::default(), &mut cap);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker thread");
    }
    assert_eq!(sw.stats(1).tx_packets, 1000);
    assert_eq!(sw.stats(2).rx_packets, 1000);
}

#[test]
fn public_types_are_thread_safe() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Switch>();
    send_sync::<Snapshot>();
    send::<SwitchWorker>();
}

// ---------------------------------------------------------------------------
// The packet path allocates nothing: a counting allocator, per thread.
// ---------------------------------------------------------------------------

mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        pub static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    pub struct Counting;

    fn bump() {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
    }

    // SAFETY: every method forwards to `System` with the caller's arguments
    // unchanged, so `System`'s guarantees carry over; the only addition is a
    // thread-local counter that neither allocates nor unwinds.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            bump();
            // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            bump();
            // SAFETY: as for `alloc`.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from `System` through this allocator.
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            bump();
            // SAFETY: `ptr` came from `System` through this allocator and the
            // caller upholds `realloc`'s contract.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;
}

/// An egress that stores nothing.
#[derive(Default)]
struct Sink {
    emitted: usize,
}

impl Egress for Sink {
    fn emit(&mut self, _: PortId, _: u32, frame: &[u8], _: &PacketMeta) -> bool {
        self.emitted += frame.len();
        true
    }
}

#[test]
fn packet_path_does_not_allocate() {
    let (_sw, mut w) = switch();
    let rows = all_rows();
    let mut frames: Vec<Vec<u8>> = rows.iter().map(|r| r.frame.clone()).collect();
    let mut sink = Sink::default();
    // Warm up (the snapshot cache takes its first reference).
    let mut warm = who_has(M1, P1, A1_GW);
    w.process(1, &mut warm, &PacketMeta::default(), &mut sink);

    let count = || alloc_count::ALLOCATIONS.with(Cell::get);
    let before = count();
    for (r, f) in rows.iter().zip(frames.iter_mut()) {
        w.process(r.ingress, f, &r.meta, &mut sink);
    }
    let after = count();
    assert!(sink.emitted > 0);
    assert_eq!(after - before, 0, "allocations on the packet path");

    // The counter works: allocating is seen.
    let v = vec![1u8; 3];
    assert!(count() > after, "counting allocator is not installed");
    drop(v);
}

#[test]
fn prefetch_hint_takes_any_bytes() {
    let switch = Switch::new();
    let mut worker = switch.worker();
    let mut state = 0x0123_4567_89ab_cdefu64;
    let mut frame = [0u8; 80];
    for round in 0..2000 {
        for b in frame.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        // Make most of them parse as far as the IPv4 header.
        frame[12] = 0x08;
        frame[13] = 0x00;
        frame[14] = 0x45;
        for len in [0, 13, 14, 33, 34, 38, 54, 80] {
            worker.prefetch(round % 7, &frame[..len]);
        }
    }
}

/// Replies of a load balancer's target go back through the balancer's
/// port; anything else from the target, and the same port on other ENIs,
/// is routed as usual.
#[test]
fn service_returns_go_through_the_balancer() {
    const LB: PortId = 6;
    const MLB: [u8; 6] = [0x02, 0, 0, 0, 0, 0x06];
    const VIP: [u8; 4] = [10, 0, 1, 60];
    let mut topo = topology().topology;
    topo.ports.push(PortConfig {
        source_dest_check: false,
        service: Some("net/lb/1".into()),
        ..port(LB, MLB, 0, VIP, &[], 1500)
    });
    topo.service_returns = vec![
        crate::ServiceReturn {
            ip: Ipv4Addr::from(P2),
            port: 80,
            protocol: 6,
            service: LB,
        },
        crate::ServiceReturn {
            ip: Ipv4Addr::from(P3),
            port: 53,
            protocol: 17,
            service: LB,
        },
        // Not an address in the balancer's VPC: ignored.
        crate::ServiceReturn {
            ip: Ipv4Addr::from([192, 0, 2, 1]),
            port: 80,
            protocol: 6,
            service: LB,
        },
    ];
    let sw = Switch::new();
    sw.publish(Snapshot::compile(topo.clone()).expect("compiles"));
    let mut w = sw.worker();
    type ReturnRow = (&'static str, PortId, Vec<u8>, Verdict, [u8; 6]);
    let rows: Vec<ReturnRow> = vec![
        (
            "target's TCP reply to a client goes to the balancer",
            2,
            tcp(M2, M1, P2, P1, (80, 40000), b"reply"),
            Verdict::Forwarded(LB),
            MLB,
        ),
        (
            "target's UDP reply across subnets goes to the balancer",
            3,
            udp(M3, GW, P3, P1, 64, (53, 5000), b"a"),
            Verdict::Forwarded(LB),
            MLB,
        ),
        (
            "other source port of the target is routed",
            2,
            tcp(M2, M1, P2, P1, (81, 40000), b"x"),
            Verdict::Forwarded(1),
            M1,
        ),
        (
            "same port, other protocol, is routed",
            2,
            udp(M2, M1, P2, P1, 64, (80, 40000), b"x"),
            Verdict::Forwarded(1),
            M1,
        ),
        (
            "same source port from another ENI is routed",
            1,
            tcp(M1, M2, P1, P2, (80, 40000), b"x"),
            Verdict::Forwarded(2),
            M2,
        ),
        (
            "the balancer's own output is routed to the client",
            LB,
            tcp(MLB, GW, VIP, P1, (80, 40000), b"x"),
            Verdict::Forwarded(1),
            M1,
        ),
    ];
    for (desc, ingress, mut frame, verdict, mac) in rows {
        let mut cap = Capture::default();
        assert_eq!(
            w.process(ingress, &mut frame, &PacketMeta::default(), &mut cap),
            verdict,
            "{desc}"
        );
        assert_eq!(cap.sent.len(), 1, "{desc}");
        assert_eq!(&cap.sent[0].frame[0..6], &mac, "{desc}: eth dst");
    }
    // A return through a port that is not in the snapshot is refused.
    topo.service_returns[0].service = ABSENT;
    assert!(Snapshot::compile(topo).is_err());
}

/// Allowances: a flood from a limited port is held to its pps, a limited
/// receiver to its inbound bandwidth, the metadata service to link-local
/// pps; every excess frame is counted under its allowance and as a
/// `RateLimit` drop. Unlimited ports are untouched.
#[test]
fn allowances_hold_floods_and_are_counted() {
    use crate::PortLimits;
    let mut topo = topology().topology;
    for p in &mut topo.ports {
        match p.id {
            1 => {
                p.limits = PortLimits {
                    pps: 1000,
                    linklocal_pps: 100,
                    ..PortLimits::default()
                }
            }
            // 1 Mbit/s in: a 50 ms burst is 6,250 bytes.
            3 => {
                p.limits = PortLimits {
                    bw_in_bps: 1_000_000,
                    ..PortLimits::default()
                }
            }
            _ => {}
        }
    }
    let sw = Switch::new();
    sw.publish(Snapshot::compile(topo).expect("compiles"));
    let mut w = sw.worker();
    let send = |w: &mut SwitchWorker, ingress: PortId, frame: &[u8], n: usize| -> usize {
        (0..n)
            .filter(|_| {
                let mut f = frame.to_vec();
                let mut cap = Capture::default();
                matches!(
                    w.process(ingress, &mut f, &PacketMeta::default(), &mut cap),
                    Verdict::Forwarded(_) | Verdict::Replied
                )
            })
            .count()
    };
    // 1000 pps, 50 ms of burst: 51 of 500 back-to-back frames pass (a few
    // more if the loop is slow enough to earn tokens).
    let passed = send(&mut w, 1, &udp(M1, M2, P1, P2, 64, (5000, 6000), b"x"), 500);
    assert!((51..=60).contains(&passed), "{passed} passed");
    let s1 = sw.stats(1);
    assert_eq!(s1.pps_allowance_exceeded, 500 - passed as u64);
    assert_eq!(s1.drops(DropReason::RateLimit), 500 - passed as u64);
    // Port 3 sends without limits (its allowance is inbound), port 2
    // receives without.
    assert_eq!(
        send(&mut w, 3, &udp(M3, GW, P3, P2, 64, (6000, 5000), b"y"), 500),
        500
    );
    assert_eq!(sw.stats(2).drops(DropReason::RateLimit), 0);
    assert_eq!(sw.stats(3).drops(DropReason::RateLimit), 0);
    // Toward port 3 (1 Mbit/s in) from port 2: 1000-byte frames, about six.
    let big = udp(M2, GW, P2, P3, 64, (7000, 8000), &[0u8; 958]);
    assert_eq!(big.len(), 1000);
    let passed = send(&mut w, 2, &big, 100);
    assert!((6..=8).contains(&passed), "{passed} passed");
    let s3 = sw.stats(3);
    assert_eq!(s3.bw_in_allowance_exceeded, 100 - passed as u64);
    assert_eq!(s3.drops(DropReason::RateLimit), 100 - passed as u64);
    assert_eq!(s3.rx_packets, passed as u64);

    // Link-local: 100 pps to the metadata server, 50 ms of burst.
    let mut topo = topology().topology;
    topo.ports[0].limits = PortLimits {
        linklocal_pps: 100,
        ..PortLimits::default()
    };
    let sw = Switch::new();
    sw.publish(Snapshot::compile(topo).expect("compiles"));
    let mut w = sw.worker();
    let passed = send(&mut w, 1, &tcp(M1, GW, P1, IMDS, (40000, 80), b"GET"), 300);
    assert!((6..=8).contains(&passed), "{passed} passed");
    let s1 = sw.stats(1);
    assert_eq!(s1.linklocal_allowance_exceeded, 300 - passed as u64);
    assert_eq!(s1.drops(DropReason::RateLimit), 300 - passed as u64);
    assert_eq!(s1.pps_allowance_exceeded, 0);
}

/// A capture on port 2 sees what port 1 forwards to it (as emitted) and
/// what port 2 sends (as sent, before the switch rewrites it); port 1's
/// own ARP exchange with the switch is not copied.
#[test]
fn capture_taps_ingress_and_emitted_frames_of_one_port() {
    let (sw, mut w) = switch();
    let cap = sw.capture(2, 16).expect("capture");
    let mut out = Capture::default();
    let to_p2 = udp(M1, GW, P1, P2, 64, (1000, 2000), b"to-two");
    let from_p2 = udp(M2, GW, P2, P1, 64, (2000, 1000), b"from-two");
    let who_has = arp(ArpOperation::REQUEST, (M1, BCAST), (M1, P1), ([0; 6], P2));
    for (port, f) in [(1, who_has), (1, to_p2.clone()), (2, from_p2.clone())] {
        let mut f = f;
        w.process(port, &mut f, &PacketMeta::default(), &mut out);
    }
    let mut got = Vec::new();
    while let Some(f) = cap.next_frame() {
        got.push(f);
    }
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].direction, crate::Direction::ToGuest);
    let emitted = out
        .sent
        .iter()
        .find(|s| s.port == 2)
        .expect("forwarded to 2");
    assert_eq!(&*got[0].data, &emitted.frame[..]);
    assert_eq!(got[1].direction, crate::Direction::FromGuest);
    assert_eq!(&*got[1].data, &from_p2[..]);
    drop(cap);
    let mut f = to_p2;
    w.process(1, &mut f, &PacketMeta::default(), &mut out);
    assert_eq!(sw.capture(2, 1).expect("again").next_frame(), None);
}

#[test]
fn batched_counts_land_at_the_end_of_the_batch() {
    let (sw, mut w) = switch();
    let mut cap = Capture::default();
    let frame = udp(M1, M2, P1, P2, 64, (1, 2), b"");
    w.begin_batch();
    for _ in 0..5 {
        assert_eq!(
            w.process(1, &mut frame.clone(), &PacketMeta::default(), &mut cap),
            Verdict::Forwarded(2)
        );
    }
    assert_eq!(sw.stats(1).tx_packets, 0, "deferred inside the batch");
    assert_eq!(sw.stats(2).rx_packets, 0);
    w.end_batch();
    let (s1, s2) = (sw.stats(1), sw.stats(2));
    assert_eq!((s1.tx_packets, s1.tx_bytes), (5, 5 * frame.len() as u64));
    assert_eq!((s2.rx_packets, s2.rx_bytes), (5, 5 * frame.len() as u64));
    // Outside a batch every frame counts at once.
    w.process(1, &mut frame.clone(), &PacketMeta::default(), &mut cap);
    assert_eq!(sw.stats(1).tx_packets, 6);
    // A worker dropped mid-batch still adds what it counted.
    w.begin_batch();
    w.process(1, &mut frame.clone(), &PacketMeta::default(), &mut cap);
    drop(w);
    assert_eq!(sw.stats(1).tx_packets, 7);
}

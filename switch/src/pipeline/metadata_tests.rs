//! The instance metadata path against the policy topology of
//! `policy_tests`, in its step style: security groups, network ACLs,
//! connection tracking and flow logs do not apply to metadata traffic; the
//! source check does. (The translation itself, checksums and ARP are in
//! the fixture table `tests::metadata_rows`.)

use std::net::Ipv4Addr;

use super::policy_tests::{
    bench, cidr, drop, mac, pass, run, topology, Bench, Step, P1, P2, P4, P6, P7, P8, UPLINK,
};
use super::tests::{echo, is_at, tcp, udp, who_has, Capture};
use super::*;
use crate::config::{MetadataConfig, SnapshotError, Topology};
use crate::policy::{FlowLogConfig, FlowLogScope, TrafficType};
use crate::{metadata_client_addr, GATEWAY_MAC as GW, IMDS_ADDR, METADATA_MAC as MDM};

const MD: PortId = 99;
const MD_PEER: [u8; 6] = [0x02, 0xe1, 0x1a, 0, 0, 0x99];
const IMDS: [u8; 4] = IMDS_ADDR.octets();
/// Port 1's secondary IP (address index 1).
const P1_SEC: [u8; 4] = [10, 0, 1, 11];
/// An address of port 7's delegated prefix 10.0.1.64/28.
const P7_PREFIX: [u8; 4] = [10, 0, 1, 70];

fn client(port: PortId, index: u8) -> [u8; 4] {
    metadata_client_addr(port, index)
        .expect("fixture port fits")
        .octets()
}

/// The policy topology with a metadata port, a secondary IP on port 1 and
/// a delegated prefix on port 7.
fn md_topology() -> Topology {
    let mut t = topology();
    t.metadata = Some(MetadataConfig {
        port: MD,
        peer_mac: MD_PEER,
    });
    for p in &mut t.ports {
        match p.id {
            1 => p.secondary_ips.push(Ipv4Addr::from(P1_SEC)),
            7 => p.prefixes.push(cidr("10.0.1.64/28")),
            _ => {}
        }
    }
    t
}

/// Port `port`'s request and the server's answer, with the frames the
/// switch must emit for each.
fn round_trip(
    port: PortId,
    src: [u8; 4],
    index: u8,
    sport: u16,
) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let c = client(port, index);
    (
        tcp(
            mac(port as u8),
            GW,
            src,
            IMDS,
            (sport, 80),
            b"PUT /latest/api/token",
        ),
        tcp(MDM, MD_PEER, c, IMDS, (sport, 80), b"PUT /latest/api/token"),
        tcp(MD_PEER, MDM, IMDS, c, (80, sport), b"token"),
        tcp(GW, mac(port as u8), IMDS, src, (80, sport), b"token"),
    )
}

fn both_ways(desc: &'static str, port: PortId, src: [u8; 4], index: u8) -> Vec<Step> {
    let (req, req_out, reply, reply_out) = round_trip(port, src, index, 40000 + port as u16);
    vec![
        pass(desc, port, req, MD, req_out),
        pass(desc, MD, reply, port, reply_out),
    ]
}

fn policy_steps() -> Vec<Step> {
    let mut steps = vec![
        // Controls: the policy does refuse these ports' ordinary traffic.
        drop(
            "control: port 2's groups have no egress rule",
            2,
            tcp(mac(2), GW, P2, P1, (40000, 80), b""),
            DropReason::SecurityGroup,
        ),
        drop(
            "control: subnet a4's ACL denies everything",
            8,
            tcp(mac(8), GW, P8, P1, (40000, 80), b""),
            DropReason::Nacl,
        ),
    ];
    // Port 2 admits only 5432 from sg-web and sends nothing new; port 8's
    // subnet ACL denies all both ways: metadata passes both ways anyway.
    steps.extend(both_ways(
        "no egress rule, no ingress rule for :80",
        2,
        P2,
        0,
    ));
    steps.extend(both_ways("ACL that denies everything", 8, P8, 0));
    steps.extend(both_ways("secondary IP: index 1 both ways", 1, P1_SEC, 1));
    steps.extend(both_ways("check off, own address", 6, P6, 0));
    steps.extend(both_ways("vpc-a's 10.0.1.20", 2, P2, 0));
    steps.extend(both_ways("vpc-b's 10.0.1.20", 4, P4, 0));
    steps.extend([
        drop(
            "spoofed source to the metadata address: the source check",
            1,
            tcp(mac(1), GW, P2, IMDS, (40000, 80), b""),
            DropReason::SourceCheck,
        ),
        drop(
            "check off, someone else's address: no client address to give",
            6,
            tcp(mac(6), GW, [10, 0, 9, 9], IMDS, (40000, 80), b""),
            DropReason::SourceCheck,
        ),
        drop(
            "an address of the port's delegated prefix has no index",
            7,
            tcp(mac(7), GW, P7_PREFIX, IMDS, (40000, 80), b""),
            DropReason::Unsupported,
        ),
        pass(
            "the same port from its primary IP",
            7,
            echo(mac(7), GW, P7, IMDS, 64, false),
            MD,
            echo(MDM, MD_PEER, client(7, 0), IMDS, 64, false),
        ),
        drop(
            "forged: client address of an unknown port",
            MD,
            tcp(MD_PEER, MDM, IMDS, client(50, 0), (80, 40000), b""),
            DropReason::NoRoute,
        ),
        drop(
            "forged: client address of the uplink",
            MD,
            tcp(MD_PEER, MDM, IMDS, client(UPLINK, 0), (80, 40000), b""),
            DropReason::NoRoute,
        ),
        drop(
            "forged: to a VPC address directly",
            MD,
            tcp(MD_PEER, MDM, IMDS, P1, (80, 40000), b""),
            DropReason::NoRoute,
        ),
        drop(
            "forged: from another source to a client address",
            MD,
            tcp(
                MD_PEER,
                MDM,
                [203, 0, 113, 1],
                client(1, 0),
                (80, 40000),
                b"",
            ),
            DropReason::NoRoute,
        ),
    ]);
    steps
}

#[test]
fn metadata_ignores_groups_acls_and_conntrack() {
    let mut b = bench(md_topology(), 1 << 12);
    run(&mut b, policy_steps());
    let (stats, per_port) = b.sw.conntrack_census();
    assert_eq!(stats.tracked, 0, "metadata traffic is not tracked");
    assert_eq!(per_port[MD as usize], 0);
    for p in [1, 2, 4, 6, 7, 8, MD] {
        assert_eq!(b.sw.stats(p).new_flows, 0, "port {p}");
    }
    // Requests counted as rx on the metadata port, replies as its tx.
    let md = b.sw.stats(MD);
    assert_eq!(md.rx_packets, 7, "{md:?}");
    assert_eq!(md.tx_packets, 6 + 4, "{md:?}");
    assert_eq!(md.total_drops(), 4, "{md:?}");
}

#[test]
fn without_a_metadata_port_nothing_answers() {
    let mut b = bench(topology(), 1 << 12);
    run(
        &mut b,
        vec![
            drop(
                "no metadata port: no route",
                1,
                tcp(mac(1), GW, P1, IMDS, (40000, 80), b""),
                DropReason::NoRoute,
            ),
            drop(
                "no metadata port: its address is not answered",
                1,
                who_has(mac(1), P1, IMDS),
                DropReason::NoRoute,
            ),
            drop(
                "port 99 is nobody without the metadata config",
                MD,
                tcp(MD_PEER, MDM, IMDS, client(1, 0), (80, 40000), b""),
                DropReason::PortDown,
            ),
        ],
    );
    // The same topology with the port answers ARP with the gateway MAC.
    let mut b = bench(md_topology(), 1 << 12);
    run(
        &mut b,
        vec![Step::Frame {
            desc: "guest ARP for the metadata address",
            ingress: 1,
            frame: who_has(mac(1), P1, IMDS),
            verdict: Verdict::Replied,
            out: vec![(1, is_at(GW, IMDS, mac(1), P1))],
            blame: None,
        }],
    );
}

#[test]
fn metadata_traffic_writes_no_flow_log_record() {
    let dir = std::env::temp_dir().join(format!("enilab-md-flowlog-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("vpc-a.log");
    let _ = std::fs::remove_file(&path);
    let mut t = md_topology();
    t.flow_logs = vec![FlowLogConfig {
        id: "fl-vpc-a".into(),
        scope: FlowLogScope::Vpc("vpc-a".into()),
        traffic: TrafficType::All,
        interval_secs: 60,
        path: path.clone(),
        account_id: "123456789012".into(),
    }];
    let mut b = bench(t, 1 << 12);
    let mut cap = Capture::default();
    let mut send = |b: &mut Bench, ingress: PortId, mut f: Vec<u8>| {
        b.worker
            .process(ingress, &mut f, &PacketMeta::default(), &mut cap)
    };
    for i in 0..3 {
        let (req, _, reply, _) = round_trip(1, P1, 0, 41000 + i);
        assert_eq!(send(&mut b, 1, req), Verdict::Forwarded(MD));
        assert_eq!(send(&mut b, MD, reply), Verdict::Forwarded(1));
    }
    assert_eq!(
        send(&mut b, 2, udp(mac(2), GW, P2, IMDS, 64, (5000, 53), b"q")),
        Verdict::Forwarded(MD)
    );
    // A control flow between two ENIs of the VPC: logged at both ends.
    assert_eq!(
        send(&mut b, 7, tcp(mac(7), GW, P7, P1, (40000, 80), b"abc")),
        Verdict::Forwarded(1)
    );
    b.worker.flush_flow_logs();
    b.sw.flush_flow_logs();
    let log = std::fs::read_to_string(&path).expect("flow log written");
    let records: Vec<&str> = log.lines().skip(1).collect();
    assert_eq!(records.len(), 2, "{log}");
    for r in &records {
        assert!(r.contains(" 10.0.1.60 10.0.1.10 40000 80 6 1 "), "{r}");
    }
    assert!(
        !log.contains("169.254.") && !log.contains("100.64."),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metadata_port_must_not_collide() {
    let with = |port: PortId| {
        let mut t = topology();
        t.metadata = Some(MetadataConfig {
            port,
            peer_mac: MD_PEER,
        });
        Snapshot::compile(t).map(|_| ())
    };
    assert_eq!(with(MD), Ok(()));
    for port in [1, 8, UPLINK, MAX_PORTS as PortId, u32::MAX] {
        assert_eq!(
            with(port),
            Err(SnapshotError::BadMetadata(port)),
            "port {port}"
        );
    }
}

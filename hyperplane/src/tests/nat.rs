//! NAT gateway fixture table: each case is a sequence of frames from inside
//! (Out) or from the internet (In) with the expected verdict.

use std::time::Duration;

use super::*;
use crate::wire::testutil::{checksums_ok, frame};
use crate::wire::{parse, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::DropReason;

const CLIENT: [u8; 4] = [10, 0, 1, 10];
const SERVER: [u8; 4] = [93, 184, 216, 34];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dir {
    Out,
    In,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// One frame out, translated, checksums valid.
    Translated,
    /// A TCP RST back to the sender, nothing forwarded.
    Rst,
    Drop(DropReason),
}

struct Step {
    wait_s: u64,
    dir: Dir,
    proto: u8,
    flags: u8,
    expect: Expect,
}

fn s(wait_s: u64, dir: Dir, proto: u8, flags: u8, expect: Expect) -> Step {
    Step {
        wait_s,
        dir,
        proto,
        flags,
        expect,
    }
}

use Dir::{In, Out};
use Expect::{Drop, Rst, Translated};

fn cases() -> Vec<(&'static str, Vec<Step>)> {
    const T: u8 = PROTO_TCP;
    const U: u8 = PROTO_UDP;
    const I: u8 = PROTO_ICMP;
    const SA: u8 = TCP_SYN | TCP_ACK;
    const A: u8 = TCP_ACK;
    vec![
        (
            "tcp handshake",
            vec![
                s(0, Out, T, TCP_SYN, Translated),
                s(0, In, T, SA, Translated),
                s(0, Out, T, A, Translated),
            ],
        ),
        (
            "udp both ways",
            vec![
                s(0, Out, U, 0, Translated),
                s(0, In, U, 0, Translated),
                s(0, Out, U, 0, Translated),
            ],
        ),
        (
            "icmp echo by id",
            vec![s(0, Out, I, 0, Translated), s(0, In, I, 0, Translated)],
        ),
        (
            "return traffic without a flow",
            vec![s(0, In, T, SA, Drop(DropReason::NoFlow))],
        ),
        (
            "mid-stream tcp without a flow gets RST",
            vec![s(0, Out, T, A, Rst)],
        ),
        (
            "tcp idle 349 s still open",
            vec![
                s(0, Out, T, TCP_SYN, Translated),
                s(0, In, T, SA, Translated),
                s(349, Out, T, A, Translated),
            ],
        ),
        (
            "tcp idle 351 s: next inside packet gets RST",
            vec![
                s(0, Out, T, TCP_SYN, Translated),
                s(0, In, T, SA, Translated),
                s(351, Out, T, A, Rst),
            ],
        ),
        (
            "tcp idle 351 s: return traffic dropped",
            vec![
                s(0, Out, T, TCP_SYN, Translated),
                s(351, In, T, A, Drop(DropReason::NoFlow)),
            ],
        ),
        (
            "udp idle 121 s expires",
            vec![
                s(0, Out, U, 0, Translated),
                s(121, In, U, 0, Drop(DropReason::NoFlow)),
            ],
        ),
        (
            "udp idle 100 s open",
            vec![s(0, Out, U, 0, Translated), s(100, In, U, 0, Translated)],
        ),
        (
            "icmp idle 61 s expires",
            vec![
                s(0, Out, I, 0, Translated),
                s(61, In, I, 0, Drop(DropReason::NoFlow)),
            ],
        ),
        (
            "fin both ways shortens the lifetime",
            vec![
                s(0, Out, T, TCP_SYN, Translated),
                s(0, In, T, SA, Translated),
                s(0, Out, T, TCP_FIN | A, Translated),
                s(0, In, T, TCP_FIN | A, Translated),
                s(11, In, T, A, Drop(DropReason::NoFlow)),
            ],
        ),
        (
            "rst shortens the lifetime",
            vec![
                s(0, Out, T, TCP_SYN, Translated),
                s(0, In, T, TCP_RST, Translated),
                s(11, In, T, A, Drop(DropReason::NoFlow)),
            ],
        ),
        (
            "inside rst without flow is dropped silently",
            vec![s(0, Out, T, TCP_RST, Drop(DropReason::NoFlow))],
        ),
    ]
}

#[test]
fn nat_fixture_table() {
    for (name, steps) in cases() {
        let cfg = Config {
            nat_gateways: vec![nat_config(&[NAT_IP])],
            load_balancers: vec![],
        };
        let mut lab = Lab::new(
            Options {
                nodes: 2,
                flows_per_node: 1024,
                ..Options::default()
            },
            cfg,
        );
        let mut nat_port = 0u16;
        for (i, st) in steps.iter().enumerate() {
            lab.advance(Duration::from_secs(st.wait_s));
            let (sp, dp) = if st.proto == PROTO_ICMP {
                (4242, 0)
            } else {
                (40000, 80)
            };
            let f = match st.dir {
                Out => frame(st.proto, CLIENT, sp, SERVER, dp, st.flags, 10),
                In if st.proto == PROTO_ICMP => frame(st.proto, SERVER, 0, NAT_IP, nat_port, 0, 10),
                In => frame(st.proto, SERVER, 80, NAT_IP, nat_port, st.flags, 10),
            };
            let before = lab.drops_all();
            let out = lab.send(NAT_PORT, &f);
            let ctx = format!("{name}: step {i}");
            match st.expect {
                Translated => {
                    assert_eq!(out.len(), 1, "{ctx}: {out:?}");
                    let (port, o) = &out[0];
                    assert_eq!(*port, NAT_PORT, "{ctx}");
                    assert!(checksums_ok(o), "{ctx}: checksum");
                    assert_eq!(
                        (&o[0..6], &o[6..12]),
                        (&GW[..], &NAT_MAC[..]),
                        "{ctx}: macs"
                    );
                    let p = parse(o).unwrap();
                    assert_eq!(o.len(), f.len(), "{ctx}");
                    if st.dir == Out {
                        assert_eq!(p.src, ip(NAT_IP), "{ctx}");
                        assert_eq!(p.dst, ip(SERVER), "{ctx}");
                        // ICMP echo: the identifier plays the source port.
                        let port = p.sport;
                        assert!(port >= 1024, "{ctx}");
                        if nat_port != 0 {
                            assert_eq!(port, nat_port, "{ctx}: translation changed");
                        }
                        nat_port = port;
                        // The reverse tuple steers to the node that holds the flow.
                        let (shard, _) = lab.hp.nat_out_shard(&parse(&f).unwrap(), NAT_PORT);
                        assert_eq!(lab.hp.nat_in_shard(port), shard, "{ctx}");
                    } else {
                        assert_eq!(
                            (p.dst, p.dport),
                            (
                                ip(CLIENT),
                                if st.proto == PROTO_ICMP { 4242 } else { 40000 }
                            ),
                            "{ctx}"
                        );
                        assert_eq!(p.src, ip(SERVER), "{ctx}");
                    }
                }
                Rst => {
                    assert_eq!(out.len(), 1, "{ctx}: {out:?}");
                    let p = parse(&out[0].1).unwrap();
                    assert!(checksums_ok(&out[0].1), "{ctx}");
                    assert_ne!(p.tcp_flags & TCP_RST, 0, "{ctx}");
                    assert_eq!(
                        (p.src, p.sport, p.dst, p.dport),
                        (ip(SERVER), 80, ip(CLIENT), 40000),
                        "{ctx}"
                    );
                    // An RST answering an ACK carries that ACK as its sequence number.
                    assert_eq!(p.seq, parse(&f).unwrap().ack, "{ctx}");
                }
                Drop(r) => {
                    assert!(out.is_empty(), "{ctx}: {out:?}");
                    let after = lab.drops_all();
                    assert_eq!(
                        after[r as usize],
                        before[r as usize] + 1,
                        "{ctx}: {r:?} not counted"
                    );
                }
            }
        }
    }
}

impl Lab {
    fn drops_all(&self) -> Vec<u64> {
        crate::DropReason::ALL
            .iter()
            .map(|r| self.drops(*r))
            .collect()
    }
}

/// Flows to one destination from many sources until the pool runs out; a
/// second address doubles the pool.
fn exhaust(addrs: &[[u8; 4]], flows: u32) -> (u64, u64) {
    let cfg = Config {
        nat_gateways: vec![nat_config(addrs)],
        load_balancers: vec![],
    };
    let opts = Options {
        nodes: 1,
        shards: 1024,
        flows_per_node: 300_000,
        ..Options::default()
    };
    let hp = Hyperplane::new(opts).unwrap();
    hp.publish(cfg).unwrap();
    let mut node = hp.node(0).unwrap();
    let now = std::time::Instant::now();
    let mut out = Vec::new();
    let mut ok = 0;
    for i in 0..flows {
        let src = [10, 0, (i >> 16) as u8 + 1, (i >> 8) as u8];
        let f = frame(
            PROTO_TCP,
            src,
            1024 + (i & 0xff) as u16,
            SERVER,
            443,
            TCP_SYN,
            0,
        );
        node.process(NAT_PORT, &f, now, &mut out);
        ok += out.len() as u64;
        out.clear();
    }
    node.tick(now, &mut out);
    let st = hp.stats();
    assert_eq!(st.port_allocation_failures + ok, u64::from(flows));
    (ok, st.port_allocation_failures)
}

#[test]
fn port_pool_per_destination_and_secondary_addresses() {
    // 1024 shards x 63 ports = 64,512 ports per (NAT IP, destination).
    let (ok1, fail1) = exhaust(&[NAT_IP], 120_000);
    assert!(ok1 > 55_000 && ok1 <= 64_512, "one address: {ok1}");
    assert!(fail1 > 0);
    let (ok2, _) = exhaust(&[NAT_IP, NAT_IP2], 120_000);
    assert!(
        ok2 > 2 * 55_000 && ok2 <= 2 * 64_512,
        "two addresses: {ok2}"
    );
}

#[test]
fn fifty_five_thousand_connections_to_one_destination_fit_with_default_shards() {
    let cfg = Config {
        nat_gateways: vec![nat_config(&[NAT_IP])],
        load_balancers: vec![],
    };
    let hp = Hyperplane::new(Options {
        nodes: 1,
        flows_per_node: 60_000,
        ..Options::default()
    })
    .unwrap();
    hp.publish(cfg).unwrap();
    let mut node = hp.node(0).unwrap();
    let now = std::time::Instant::now();
    let mut out = Vec::new();
    for i in 0..55_000u32 {
        let src = [10, 0, (i >> 12) as u8 + 1, (i >> 4) as u8];
        let f = frame(
            PROTO_TCP,
            src,
            2000 + (i & 0xf) as u16,
            SERVER,
            443,
            TCP_SYN,
            0,
        );
        node.process(NAT_PORT, &f, now, &mut out);
    }
    node.tick(now, &mut out);
    assert_eq!(out.len(), 55_000);
    assert_eq!(hp.stats().port_allocation_failures, 0);
}

/// An ICMP error from `from` to `to` quoting `quoted` (an IP datagram, maybe cut).
fn icmp_error(from: [u8; 4], to: [u8; 4], typ: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut f = frame(PROTO_ICMP, from, 1, to, 0, 0, 0);
    f.truncate(34);
    f.extend_from_slice(&[typ, code, 0, 0, 0, 0, 0x05, 0xdc]);
    f.extend_from_slice(quoted);
    let total = (f.len() - 14) as u16;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f[24] = 0;
    f[25] = 0;
    let c = crate::wire::checksum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let c = crate::wire::checksum(&f[34..], 0);
    f[36..38].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn icmp_errors_about_a_flow_are_translated_back() {
    const ROUTER: [u8; 4] = [203, 0, 113, 1];
    // (name, proto, type, code, quote the whole datagram?)
    let cases = [
        ("udp port unreachable, full quote", PROTO_UDP, 3, 3, true),
        ("udp port unreachable, 8-byte quote", PROTO_UDP, 3, 3, false),
        (
            "tcp fragmentation needed, full quote",
            PROTO_TCP,
            3,
            4,
            true,
        ),
        (
            "tcp fragmentation needed, 8-byte quote",
            PROTO_TCP,
            3,
            4,
            false,
        ),
        ("echo time exceeded", PROTO_ICMP, 11, 0, true),
    ];
    for (name, proto, typ, code, full) in cases {
        let cfg = Config {
            nat_gateways: vec![nat_config(&[NAT_IP])],
            load_balancers: vec![],
        };
        let mut lab = Lab::new(
            Options {
                nodes: 3,
                flows_per_node: 64,
                ..Options::default()
            },
            cfg,
        );
        let (sp, dp) = if proto == PROTO_ICMP {
            (4242, 0)
        } else {
            (40000, 80)
        };
        let f = frame(proto, CLIENT, sp, SERVER, dp, TCP_SYN, 30);
        let owner = lab.hp.steer(NAT_PORT, &f);
        let out = lab.send(NAT_PORT, &f);
        assert_eq!(out.len(), 1, "{name}");
        let translated = &out[0].1;
        let ip_part = &translated[14..];
        let quoted = if full { ip_part } else { &ip_part[..28] };
        let err = icmp_error(ROUTER, NAT_IP, typ, code, quoted);
        assert!(checksums_ok(&err), "{name}: fixture");
        assert_eq!(lab.hp.steer(NAT_PORT, &err), owner, "{name}: steering");
        let back = lab.send(NAT_PORT, &err);
        assert_eq!(back.len(), 1, "{name}: {back:?}");
        let o = &back[0].1;
        assert!(checksums_ok(o), "{name}: outer checksums");
        let p = parse(o).unwrap();
        assert_eq!((p.src, p.dst), (ip(ROUTER), ip(CLIENT)), "{name}");
        let i = p.inner.unwrap();
        assert_eq!(
            (i.src, i.sport, i.dst, i.dport),
            (ip(CLIENT), sp, ip(SERVER), dp),
            "{name}"
        );
        assert_eq!(
            crate::wire::checksum(&o[i.ip..i.l4], 0),
            0,
            "{name}: quoted IP checksum"
        );
        if full {
            // The whole quoted datagram is the original one again, checksums and all.
            let mut inner = o[..14].to_vec();
            inner.extend_from_slice(&o[i.ip..]);
            assert!(checksums_ok(&inner), "{name}: quoted L4 checksum");
            assert_eq!(&o[i.ip..], &f[14..], "{name}: quoted datagram restored");
        }
    }
    // An error about no flow is dropped and counted.
    let cfg = Config {
        nat_gateways: vec![nat_config(&[NAT_IP])],
        load_balancers: vec![],
    };
    let mut lab = Lab::new(
        Options {
            nodes: 1,
            flows_per_node: 64,
            ..Options::default()
        },
        cfg,
    );
    let stray = frame(PROTO_UDP, NAT_IP, 5000, SERVER, 53, 0, 0);
    let err = icmp_error(ROUTER, NAT_IP, 3, 3, &stray[14..]);
    assert!(lab.send(NAT_PORT, &err).is_empty());
    assert_eq!(lab.drops(DropReason::NoFlow), 1);
}

#[test]
fn deleting_the_gateway_or_an_address_drops_its_flows() {
    let both = Config {
        nat_gateways: vec![nat_config(&[NAT_IP, NAT_IP2])],
        load_balancers: vec![],
    };
    let mut lab = Lab::new(
        Options {
            nodes: 2,
            flows_per_node: 1024,
            ..Options::default()
        },
        both,
    );
    let mut on_second = 0;
    for i in 0..100u16 {
        let f = frame(PROTO_UDP, CLIENT, 10000 + i, SERVER, 53, 0, 0);
        let out = lab.send(NAT_PORT, &f);
        on_second += usize::from(parse(&out[0].1).unwrap().src == ip(NAT_IP2));
    }
    assert!(on_second > 0 && on_second < 100);
    let primaries = |lab: &mut Lab| {
        lab.settle(|_| true);
        lab.hp.stats().flows
    };
    assert_eq!(primaries(&mut lab), 100);
    lab.hp
        .publish(Config {
            nat_gateways: vec![nat_config(&[NAT_IP])],
            load_balancers: vec![],
        })
        .unwrap();
    assert!(lab
        .settle(|l| l.hp.stats().nodes.iter().map(|n| n.flows).sum::<u64>()
            == 2 * (100 - on_second as u64)));
    lab.hp.publish(Config::default()).unwrap();
    assert!(lab.settle(|l| l.hp.stats().nodes.iter().map(|n| n.flows).sum::<u64>() == 0));
    let f = frame(PROTO_UDP, CLIENT, 10000, SERVER, 53, 0, 0);
    assert!(lab.hp.steer(NAT_PORT, &f).is_none());
}

#[test]
fn a_gateway_without_addresses_is_accepted_and_drops_as_port_allocation() {
    let cfg = Config {
        nat_gateways: vec![nat_config(&[])],
        load_balancers: vec![],
    };
    let mut lab = Lab::new(
        Options {
            nodes: 1,
            flows_per_node: 64,
            ..Options::default()
        },
        cfg,
    );
    let f = frame(PROTO_TCP, CLIENT, 40000, SERVER, 80, TCP_SYN, 0);
    assert!(lab.send(NAT_PORT, &f).is_empty());
    assert_eq!(lab.drops(DropReason::PortAllocation), 1);
    assert_eq!(lab.hp.stats().port_allocation_failures, 1);
    let nine: Vec<[u8; 4]> = (1..=9).map(|i| [10, 0, 0, i]).collect();
    assert!(lab
        .hp
        .publish(Config {
            nat_gateways: vec![nat_config(&nine)],
            load_balancers: vec![]
        })
        .is_err());
}

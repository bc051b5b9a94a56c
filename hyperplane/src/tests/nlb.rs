//! Network load balancer fixtures: forwarding, replies, stickiness,
//! connection tracking across target changes, draining, health checks,
//! RST on unhealthy, fail open.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use super::*;
use crate::wire::testutil::{checksums_ok, frame};
use crate::wire::{parse, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_RST, TCP_SYN};
use crate::{
    DropReason, HealthCheckConfig, HealthState, ListenerConfig, LoadBalancerConfig, TargetConfig,
    TargetGroupConfig, L4,
};

/// What a step emitted, when it was not a single forwarded frame.
type Frames = Vec<(u32, Vec<u8>)>;

const CLIENT: [u8; 4] = [198, 51, 100, 7];
const TARGETS: [[u8; 4]; 3] = [[10, 0, 3, 1], [10, 0, 3, 2], [10, 0, 3, 3]];

fn tg(id: &str, proto: L4, targets: &[[u8; 4]], hc: bool, sticky: bool) -> TargetGroupConfig {
    TargetGroupConfig {
        id: id.into(),
        protocol: proto,
        targets: targets
            .iter()
            .map(|t| TargetConfig {
                ip: (*t).into(),
                port: 8080,
                draining_since: None,
            })
            .collect(),
        health_check: HealthCheckConfig {
            enabled: hc,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            ..HealthCheckConfig::default()
        },
        source_ip_stickiness: sticky,
        deregistration_delay: Duration::from_secs(300),
    }
}

fn lb(listeners: Vec<ListenerConfig>) -> Config {
    Config {
        nat_gateways: vec![],
        load_balancers: vec![LoadBalancerConfig {
            id: "net/lb/1".into(),
            port: LB_PORT,
            mac: LB_MAC,
            gateway_mac: GW,
            addresses: vec![VIP.into()],
            listeners,
        }],
    }
}

fn basic(hc: bool) -> Config {
    lb(vec![
        ListenerConfig {
            protocol: L4::Tcp,
            port: 80,
            target_group: tg("tg-web", L4::Tcp, &TARGETS, hc, false),
        },
        ListenerConfig {
            protocol: L4::Udp,
            port: 53,
            target_group: tg("tg-dns", L4::Udp, &TARGETS, hc, false),
        },
        ListenerConfig {
            protocol: L4::Tcp,
            port: 443,
            target_group: tg("tg-sticky", L4::Tcp, &TARGETS, hc, true),
        },
    ])
}

fn lab(nodes: usize, cfg: Config) -> Lab {
    Lab::new(
        Options {
            nodes,
            flows_per_node: 4096,
            ..Options::default()
        },
        cfg,
    )
}

/// Sends client → VIP; returns the target chosen (ip, port) or the drop.
fn to_vip(
    lab: &mut Lab,
    proto: u8,
    sport: u16,
    dport: u16,
    flags: u8,
) -> Result<(u32, u16), Frames> {
    to_vip_from(lab, CLIENT, proto, sport, dport, flags)
}

fn to_vip_from(
    lab: &mut Lab,
    client: [u8; 4],
    proto: u8,
    sport: u16,
    dport: u16,
    flags: u8,
) -> Result<(u32, u16), Frames> {
    let f = frame(proto, client, sport, VIP, dport, flags, 20);
    // The tick after the frame may send health probes (SYNs from the VIP); not ours.
    let out: Frames = lab
        .send(LB_PORT, &f)
        .into_iter()
        .filter(|(_, o)| parse(o).map_or(true, |p| !(p.src == ip(VIP) && p.tcp_flags == TCP_SYN)))
        .collect();
    if out.len() != 1 {
        return Err(out);
    }
    let o = &out[0].1;
    assert!(checksums_ok(o));
    assert_eq!((&o[0..6], &o[6..12]), (&GW[..], &LB_MAC[..]));
    let p = parse(o).unwrap();
    // Client IP preserved: DNAT only.
    assert_eq!((p.src, p.sport), (ip(client), sport));
    Ok((p.dst, p.dport))
}

#[derive(Debug)]
enum Expect {
    Target,
    Drop(DropReason),
}

#[test]
fn nlb_fixture_table() {
    let t = PROTO_TCP;
    let cases: Vec<(&str, u8, u16, u8, Expect)> = vec![
        ("tcp syn to listener", t, 80, TCP_SYN, Expect::Target),
        (
            "tcp ack without flow still picks a target",
            t,
            80,
            TCP_ACK,
            Expect::Target,
        ),
        ("udp listener", PROTO_UDP, 53, 0, Expect::Target),
        (
            "no listener on port",
            t,
            81,
            TCP_SYN,
            Expect::Drop(DropReason::NoListener),
        ),
        (
            "udp to tcp listener port",
            PROTO_UDP,
            80,
            0,
            Expect::Drop(DropReason::NoListener),
        ),
        (
            "rst without flow",
            t,
            80,
            TCP_RST,
            Expect::Drop(DropReason::NoFlow),
        ),
    ];
    for (name, proto, dport, flags, want) in cases {
        let mut lab = lab(2, basic(false));
        let r = to_vip(&mut lab, proto, 5555, dport, flags);
        match want {
            Expect::Target => {
                let (ip_, port) = r.unwrap_or_else(|o| panic!("{name}: {o:?}"));
                assert!(
                    TARGETS.iter().any(|t| ip(*t) == ip_) && port == 8080,
                    "{name}"
                );
            }
            Expect::Drop(reason) => {
                assert!(r.is_err(), "{name}");
                assert_eq!(lab.drops(reason), 1, "{name}");
            }
        }
    }
}

#[test]
fn replies_are_translated_back_and_strangers_pass_through() {
    let mut lab = lab(2, basic(false));
    let (tip, tport) = to_vip(&mut lab, PROTO_TCP, 5555, 80, TCP_SYN).unwrap();
    let reply = frame(
        PROTO_TCP,
        tip.to_be_bytes(),
        tport,
        CLIENT,
        5555,
        TCP_SYN | TCP_ACK,
        0,
    );
    let out = lab.send(LB_PORT, &reply);
    assert_eq!(out.len(), 1);
    let p = parse(&out[0].1).unwrap();
    assert!(checksums_ok(&out[0].1));
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (ip(VIP), 80, ip(CLIENT), 5555)
    );
    // Direct traffic from a target to some client (no flow): addresses
    // and payload unchanged, sent from the balancer's MAC to the gateway.
    let direct = frame(PROTO_TCP, tip.to_be_bytes(), 22, CLIENT, 6000, TCP_ACK, 5);
    let out = lab.send(LB_PORT, &direct);
    let mut want = direct.clone();
    want[0..6].copy_from_slice(&GW);
    want[6..12].copy_from_slice(&LB_MAC);
    assert_eq!(out, vec![(LB_PORT, want)]);
}

#[test]
fn flows_spread_and_stick_to_their_target() {
    let mut lab = lab(2, basic(false));
    let mut per: HashMap<u32, usize> = HashMap::new();
    let mut chosen = Vec::new();
    for sport in 0..300u16 {
        let (t, _) = to_vip(&mut lab, PROTO_TCP, 10000 + sport, 80, TCP_SYN).unwrap();
        *per.entry(t).or_default() += 1;
        chosen.push(t);
    }
    assert_eq!(per.len(), 3);
    assert!(per.values().all(|&n| (60..=140).contains(&n)), "{per:?}");
    // Add a target: existing flows keep theirs (connection tracking).
    let mut more = TARGETS.to_vec();
    more.push([10, 0, 3, 4]);
    lab.hp
        .publish(lb(vec![ListenerConfig {
            protocol: L4::Tcp,
            port: 80,
            target_group: tg("tg-web", L4::Tcp, &more, false, false),
        }]))
        .unwrap();
    for (i, sport) in (0..300u16).enumerate() {
        let (t, _) = to_vip(&mut lab, PROTO_TCP, 10000 + sport, 80, TCP_ACK).unwrap();
        assert_eq!(t, chosen[i], "flow {i} moved");
    }
    // New flows reach the new target too.
    let new: HashSet<u32> = (0..200u16)
        .map(|s| {
            to_vip(&mut lab, PROTO_TCP, 30000 + s, 80, TCP_SYN)
                .unwrap()
                .0
        })
        .collect();
    assert!(new.contains(&ip([10, 0, 3, 4])));
}

#[test]
fn source_ip_stickiness_pins_a_client() {
    let mut lab = lab(2, basic(false));
    for c in 1..20u8 {
        let client = [198, 51, 100, c];
        let ts: HashSet<u32> = (0..10u16)
            .map(|s| {
                to_vip_from(&mut lab, client, PROTO_TCP, 20000 + s, 443, TCP_SYN)
                    .unwrap()
                    .0
            })
            .collect();
        assert_eq!(ts.len(), 1, "client {c}");
    }
    // Without stickiness one client spreads.
    let ts: HashSet<u32> = (0..30u16)
        .map(|s| {
            to_vip(&mut lab, PROTO_TCP, 20000 + s, 80, TCP_SYN)
                .unwrap()
                .0
        })
        .collect();
    assert!(ts.len() > 1);
}

#[test]
fn draining_target_keeps_flows_but_takes_no_new_ones() {
    let mut lab = lab(1, basic(false));
    let mut on_first = Vec::new();
    for s in 0..60u16 {
        let (t, _) = to_vip(&mut lab, PROTO_TCP, 40000 + s, 80, TCP_SYN).unwrap();
        if t == ip(TARGETS[0]) {
            on_first.push(40000 + s);
        }
    }
    assert!(!on_first.is_empty());
    let mut g = tg("tg-web", L4::Tcp, &TARGETS, false, false);
    g.targets[0].draining_since = Some(SystemTime::now());
    lab.hp
        .publish(lb(vec![ListenerConfig {
            protocol: L4::Tcp,
            port: 80,
            target_group: g.clone(),
        }]))
        .unwrap();
    for &s in &on_first {
        assert_eq!(
            to_vip(&mut lab, PROTO_TCP, s, 80, TCP_ACK).unwrap().0,
            ip(TARGETS[0])
        );
    }
    for s in 0..100u16 {
        assert_ne!(
            to_vip(&mut lab, PROTO_TCP, 50000 + s, 80, TCP_SYN)
                .unwrap()
                .0,
            ip(TARGETS[0])
        );
    }
    let h = lab.hp.target_health();
    assert_eq!(
        h.iter()
            .find(|t| t.ip == std::net::Ipv4Addr::from(TARGETS[0]))
            .unwrap()
            .state,
        HealthState::Draining
    );
    // After the delay the target is unused and its flows are closed.
    g.targets[0].draining_since = Some(SystemTime::now() - Duration::from_secs(301));
    lab.hp
        .publish(lb(vec![ListenerConfig {
            protocol: L4::Tcp,
            port: 80,
            target_group: g,
        }]))
        .unwrap();
    let mut out = Vec::new();
    lab.tick(&mut out);
    let rsts = out
        .iter()
        .filter(|(_, f)| parse(f).unwrap().tcp_flags & TCP_RST != 0)
        .count();
    assert_eq!(rsts, 2 * on_first.len());
    let (t, _) = to_vip(&mut lab, PROTO_TCP, on_first[0], 80, TCP_ACK).unwrap();
    assert_ne!(t, ip(TARGETS[0]));
}

/// Answers every outstanding probe: targets in `up` with SYN-ACK, others with RST.
fn answer_probes(lab: &mut Lab, out: &[(u32, Vec<u8>)], up: &[[u8; 4]]) -> usize {
    answer_probes_out(lab, out, up, &mut Vec::new())
}

/// Like `answer_probes`, collecting what the answers caused into `seen`.
fn answer_probes_out(
    lab: &mut Lab,
    out: &[(u32, Vec<u8>)],
    up: &[[u8; 4]],
    seen: &mut Vec<(u32, Vec<u8>)>,
) -> usize {
    let mut n = 0;
    for (_, f) in out {
        let p = parse(f).unwrap();
        if p.tcp_flags != TCP_SYN || p.src != ip(VIP) {
            continue;
        }
        n += 1;
        let alive = up.iter().any(|u| ip(*u) == p.dst);
        let (flags, seq, ack) = if alive {
            (TCP_SYN | TCP_ACK, 777u32, p.seq.wrapping_add(1))
        } else {
            (TCP_RST | TCP_ACK, 0, p.seq.wrapping_add(1))
        };
        let mut r = frame(
            PROTO_TCP,
            p.dst.to_be_bytes(),
            p.dport,
            VIP,
            p.sport,
            flags,
            0,
        );
        r[38..42].copy_from_slice(&seq.to_be_bytes());
        r[42..46].copy_from_slice(&ack.to_be_bytes());
        // Fix the TCP checksum after editing seq/ack.
        r[50] = 0;
        r[51] = 0;
        let pseudo =
            (p.dst >> 16) + (p.dst & 0xffff) + (ip(VIP) >> 16) + (ip(VIP) & 0xffff) + 6 + 20;
        let c = crate::wire::checksum(&r[34..], pseudo);
        r[50..52].copy_from_slice(&c.to_be_bytes());
        let replies = lab.send(LB_PORT, &r);
        if alive {
            // A passing probe is closed with a RST to the target.
            assert!(replies.iter().any(|(_, f)| {
                let q = parse(f).unwrap();
                q.tcp_flags & TCP_RST != 0 && q.dst == p.dst && q.seq == ack
            }));
        }
        seen.extend(replies);
    }
    n
}

/// Runs probe rounds: each round advances past the interval and answers.
fn rounds(lab: &mut Lab, n: usize, up: &[[u8; 4]]) -> Vec<(u32, Vec<u8>)> {
    let mut all = Vec::new();
    for _ in 0..n {
        lab.advance(Duration::from_millis(1100));
        let mut out = Vec::new();
        lab.tick(&mut out);
        let probes = answer_probes(lab, &out, up);
        assert!(probes >= 3, "one probe per target and round, got {probes}");
        all.extend(out);
    }
    all
}

fn state_of(lab: &Lab, t: [u8; 4]) -> HealthState {
    lab.hp
        .target_health()
        .iter()
        .find(|h| h.target_group == "tg-web" && h.ip == std::net::Ipv4Addr::from(t))
        .unwrap()
        .state
}

#[test]
fn health_checks_mark_targets_and_rst_their_clients() {
    let cfg = lb(vec![ListenerConfig {
        protocol: L4::Tcp,
        port: 80,
        target_group: tg("tg-web", L4::Tcp, &TARGETS, true, false),
    }]);
    let mut lab = lab(3, cfg);
    assert_eq!(state_of(&lab, TARGETS[0]), HealthState::Initial);
    rounds(&mut lab, 2, &TARGETS);
    for t in TARGETS {
        assert_eq!(state_of(&lab, t), HealthState::Healthy);
    }
    let changes = lab.hp.stats().health_state_changes;
    assert_eq!(changes, 3);
    // Open flows, note those on target 0.
    let mut on0 = Vec::new();
    for s in 0..90u16 {
        if to_vip(&mut lab, PROTO_TCP, 30000 + s, 80, TCP_SYN)
            .unwrap()
            .0
            == ip(TARGETS[0])
        {
            on0.push(30000 + s);
        }
    }
    assert!(!on0.is_empty());
    // Target 0's server stops: RST answers; after the threshold it is unhealthy.
    let out = rounds(&mut lab, 1, &TARGETS[1..]);
    assert_eq!(state_of(&lab, TARGETS[0]), HealthState::Healthy);
    assert!(out.iter().all(
        |(_, f)| parse(f).unwrap().tcp_flags & TCP_RST == 0 || parse(f).unwrap().src == ip(VIP)
    ));
    lab.advance(Duration::from_millis(1100));
    let mut probes = Vec::new();
    lab.tick(&mut probes);
    let mut out = Vec::new();
    answer_probes_out(&mut lab, &probes, &TARGETS[1..], &mut out);
    assert_eq!(state_of(&lab, TARGETS[0]), HealthState::Unhealthy);
    assert_eq!(lab.hp.stats().health_state_changes, changes + 1);
    // The clients of target 0 get a RST from the VIP, the target one from the client.
    lab.tick(&mut out);
    let to_clients = out.iter().filter(|(_, f)| {
        let p = parse(f).unwrap();
        p.tcp_flags & TCP_RST != 0
            && p.src == ip(VIP)
            && p.dst == ip(CLIENT)
            && on0.contains(&p.dport)
    });
    assert_eq!(to_clients.count(), on0.len());
    let to_target = out.iter().filter(|(_, f)| {
        let p = parse(f).unwrap();
        p.tcp_flags & TCP_RST != 0 && p.dst == ip(TARGETS[0]) && p.src == ip(CLIENT)
    });
    assert_eq!(to_target.count(), on0.len());
    // New connections avoid it.
    for s in 0..100u16 {
        assert_ne!(
            to_vip(&mut lab, PROTO_TCP, 50000 + s, 80, TCP_SYN)
                .unwrap()
                .0,
            ip(TARGETS[0])
        );
    }
    // Every target down: fail open, all three take new flows again.
    let mut down = Vec::new();
    for _ in 0..3 {
        lab.advance(Duration::from_millis(1100));
        let mut out = Vec::new();
        lab.tick(&mut out);
        answer_probes(&mut lab, &out, &[]);
        down.extend(out);
    }
    for t in TARGETS {
        assert_eq!(state_of(&lab, t), HealthState::Unhealthy);
    }
    let ts: HashSet<u32> = (0..60u16)
        .map(|s| {
            to_vip(&mut lab, PROTO_TCP, 60000 + s, 80, TCP_SYN)
                .unwrap()
                .0
        })
        .collect();
    assert_eq!(ts.len(), 3);
}

#[test]
fn probe_timeout_counts_as_failure() {
    let cfg = lb(vec![ListenerConfig {
        protocol: L4::Tcp,
        port: 80,
        target_group: tg("tg-web", L4::Tcp, &TARGETS, true, false),
    }]);
    let mut lab = lab(2, cfg);
    rounds(&mut lab, 2, &TARGETS);
    // Nobody answers any more: two timed-out rounds make every target unhealthy.
    for _ in 0..3 {
        lab.advance(Duration::from_millis(1100));
        let mut out = Vec::new();
        lab.tick(&mut out);
    }
    lab.advance(Duration::from_millis(1100));
    let mut out = Vec::new();
    lab.tick(&mut out);
    for t in TARGETS {
        assert_eq!(state_of(&lab, t), HealthState::Unhealthy, "{t:?}");
    }
}

#[test]
fn unchanged_target_groups_keep_their_maglev_table() {
    let table = |lab: &Lab, port: u16| {
        let cfg = lab.hp.cfg.load_full();
        let svc = cfg.service(LB_PORT).unwrap();
        std::sync::Arc::clone(&svc.listener(PROTO_TCP, port).unwrap().tg.maglev)
    };
    let lab = lab(1, basic(false));
    let (web, sticky) = (table(&lab, 80), table(&lab, 443));
    lab.hp.publish(basic(false)).unwrap();
    assert!(std::sync::Arc::ptr_eq(&web, &table(&lab, 80)));
    // Change only the web group's targets: its table is rebuilt, the other one shared.
    let mut cfg = basic(false);
    cfg.load_balancers[0].listeners[0]
        .target_group
        .targets
        .pop();
    lab.hp.publish(cfg).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&web, &table(&lab, 80)));
    assert!(std::sync::Arc::ptr_eq(&sticky, &table(&lab, 443)));
}

#[test]
fn health_check_settings_are_validated() {
    let lab = lab(1, basic(true));
    for (name, edit) in [
        (
            "threshold 0",
            (|h: &mut HealthCheckConfig| h.healthy_threshold = 0) as fn(&mut HealthCheckConfig),
        ),
        ("threshold 11", |h| h.unhealthy_threshold = 11),
        ("zero interval", |h| h.interval = Duration::ZERO),
        ("zero timeout", |h| h.timeout = Duration::ZERO),
    ] {
        let mut cfg = basic(true);
        edit(&mut cfg.load_balancers[0].listeners[1].target_group.health_check);
        assert!(lab.hp.publish(cfg).is_err(), "{name}");
    }
    let mut one = basic(true);
    one.load_balancers[0].listeners[0]
        .target_group
        .health_check
        .healthy_threshold = 1;
    assert!(lab.hp.publish(one).is_ok());
}

/// A listener may sit in the probe port range: its traffic is the
/// listener's, probes avoid its port, and health checks still work.
#[test]
fn listener_in_the_probe_port_range() {
    let cfg = lb(vec![
        ListenerConfig {
            protocol: L4::Tcp,
            port: 80,
            target_group: tg("tg-web", L4::Tcp, &TARGETS, true, false),
        },
        ListenerConfig {
            protocol: L4::Tcp,
            port: 64512,
            target_group: tg("tg-high", L4::Tcp, &TARGETS, false, false),
        },
    ]);
    let mut lab = lab(1, cfg);
    let (t, port) = to_vip(&mut lab, PROTO_TCP, 7000, 64512, TCP_SYN).unwrap();
    assert!(TARGETS.iter().any(|x| ip(*x) == t) && port == 8080);
    let all = rounds(&mut lab, 3, &TARGETS);
    assert!(all.iter().all(|(_, f)| parse(f).unwrap().sport != 64512
        || parse(f).unwrap().src != ip(VIP)
        || parse(f).unwrap().tcp_flags != TCP_SYN));
    for t in TARGETS {
        assert_eq!(state_of(&lab, t), HealthState::Healthy);
    }
}

#[test]
fn a_target_group_behind_two_listeners_is_reported_once() {
    let group = tg("tg-both", L4::Tcp, &TARGETS, true, false);
    let mut udp = group.clone();
    udp.protocol = L4::Udp;
    let cfg = lb(vec![
        ListenerConfig {
            protocol: L4::Tcp,
            port: 53,
            target_group: group,
        },
        ListenerConfig {
            protocol: L4::Udp,
            port: 53,
            target_group: udp,
        },
    ]);
    let lab = lab(1, cfg);
    assert_eq!(lab.hp.target_health().len(), 3);
}

//! Fixture tables for the allowances that span more than one frame: the
//! per-(instance, network card) aggregates and the per-ENI connection
//! tracking allowance.
//!
//! Rate rows send back-to-back floods and check how many frames pass (a
//! meter admits its 50 ms burst, plus what the elapsed time earned) and
//! that every refused frame lands on exactly the counter the row names.

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::sync::atomic::AtomicU32;
use std::time::Instant;

use super::tests::{udp, Capture};
use super::*;
use crate::config::Topology;
use crate::policy::SecurityGroupConfig;
use crate::{CardConfig, CardLimits, PortLimits, SnapshotError, GATEWAY_MAC};

// vpc-a: subnet 0 = 10.0.1.0/24 (ports 1, 2), subnet 1 = 10.0.2.0/24 (port 3).
const M1: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const M2: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const M3: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
const GW: [u8; 6] = GATEWAY_MAC;
const P1: [u8; 4] = [10, 0, 1, 10];
const P2: [u8; 4] = [10, 0, 1, 20];
const P3: [u8; 4] = [10, 0, 2, 30];

fn topology() -> Topology {
    let subnet = |id: &str, net: [u8; 4]| SubnetConfig {
        id: id.into(),
        vpc_id: "vpc-a".into(),
        cidr: (Ipv4Addr::from(net), 24),
        ..SubnetConfig::default()
    };
    let port = |id: PortId, mac, subnet, ip: [u8; 4]| PortConfig {
        id,
        eni_id: format!("eni-{id:017x}"),
        mac,
        subnet,
        primary_ip: Ipv4Addr::from(ip),
        ..PortConfig::default()
    };
    Topology {
        generation: 1,
        subnets: vec![
            subnet("subnet-a1", [10, 0, 1, 0]),
            subnet("subnet-a2", [10, 0, 2, 0]),
        ],
        ports: vec![port(1, M1, 0, P1), port(2, M2, 0, P2), port(3, M3, 1, P3)],
        ..Topology::default()
    }
}

/// 1000-byte UDP frames (8000 bits: a 1 Mbit/s meter's 50 ms burst is
/// seven of them).
fn big(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let f = udp(src_mac, dst_mac, src, dst, 64, (7000, 8000), &[0u8; 958]);
    assert_eq!(f.len(), 1000);
    f
}

fn small(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    udp(src_mac, dst_mac, src, dst, 64, (5000, 6000), b"x")
}

/// Frames `ingress` got through (forwarded, or a reply) out of `n` copies.
fn send(w: &mut SwitchWorker, ingress: PortId, frame: &[u8], n: usize) -> usize {
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
}

/// Frames a meter of `fps` may have earned since `t`: the time that passed,
/// plus one tick of the meters' coarse clock, plus one.
fn earned(t: Instant, fps: f64) -> usize {
    let tick = crate::limits::resolution_ns() as f64 / 1e9;
    ((t.elapsed().as_secs_f64() + tick) * fps).ceil() as usize + 1
}

/// The counter a step's refused frames must all be counted on.
#[derive(Debug, Clone, Copy)]
enum Over {
    /// A card aggregate's allowance: (instance, card, 0 pps / 1 out / 2 in).
    Card(&'static str, u32, usize),
    /// An ENI's own allowance: (port, 0 pps / 1 out / 2 in).
    Port(PortId, usize),
}

struct Step {
    ingress: PortId,
    frame: Vec<u8>,
    n: usize,
    /// Frames that pass if the flood took no time.
    pass: RangeInclusive<usize>,
    /// Frames per second the binding allowance earns, for the slack the
    /// flood's own duration gives.
    earn_fps: f64,
    over: Over,
    /// The port its `rate_limit` drops are counted on.
    drops_on: PortId,
}

struct CardRow {
    desc: &'static str,
    cards: Vec<(&'static str, u32, CardLimits)>,
    members: Vec<(PortId, &'static str, u32)>,
    port_limits: Vec<(PortId, PortLimits)>,
    steps: Vec<Step>,
}

fn step(
    ingress: PortId,
    frame: Vec<u8>,
    n: usize,
    pass: RangeInclusive<usize>,
    earn_fps: f64,
    over: Over,
    drops_on: PortId,
) -> Step {
    Step {
        ingress,
        frame,
        n,
        pass,
        earn_fps,
        over,
        drops_on,
    }
}

fn pps(n: u64) -> CardLimits {
    CardLimits {
        pps: n,
        ..CardLimits::default()
    }
}

fn card_rows() -> Vec<CardRow> {
    let to3 = |mac, ip| small(mac, GW, ip, P3);
    let big_to3 = |mac, ip| big(mac, GW, ip, P3);
    vec![
        CardRow {
            desc: "card pps is shared: port 1 takes the burst, port 2 is left nothing",
            cards: vec![("i-a", 0, pps(1000))],
            members: vec![(1, "i-a", 0), (2, "i-a", 0)],
            port_limits: vec![],
            steps: vec![
                step(
                    1,
                    to3(M1, P1),
                    300,
                    51..=51,
                    1000.0,
                    Over::Card("i-a", 0, 0),
                    1,
                ),
                step(
                    2,
                    to3(M2, P2),
                    300,
                    0..=0,
                    1000.0,
                    Over::Card("i-a", 0, 0),
                    2,
                ),
            ],
        },
        CardRow {
            desc: "card pps counts frames toward the card's ENIs too",
            cards: vec![("i-a", 0, pps(1000))],
            members: vec![(1, "i-a", 0), (2, "i-a", 0)],
            port_limits: vec![],
            steps: vec![
                step(
                    3,
                    small(M3, GW, P3, P1),
                    300,
                    51..=51,
                    1000.0,
                    Over::Card("i-a", 0, 0),
                    1,
                ),
                step(
                    1,
                    to3(M1, P1),
                    100,
                    0..=0,
                    1000.0,
                    Over::Card("i-a", 0, 0),
                    1,
                ),
            ],
        },
        CardRow {
            desc: "card bandwidth out is shared",
            cards: vec![(
                "i-a",
                0,
                CardLimits {
                    bw_out_bps: 1_000_000,
                    ..CardLimits::default()
                },
            )],
            members: vec![(1, "i-a", 0), (2, "i-a", 0)],
            port_limits: vec![],
            steps: vec![
                step(
                    1,
                    big_to3(M1, P1),
                    50,
                    7..=7,
                    125.0,
                    Over::Card("i-a", 0, 1),
                    1,
                ),
                step(
                    2,
                    big_to3(M2, P2),
                    50,
                    0..=0,
                    125.0,
                    Over::Card("i-a", 0, 1),
                    2,
                ),
            ],
        },
        CardRow {
            desc: "card bandwidth in is shared, and counted on the receiving ENI",
            cards: vec![(
                "i-a",
                0,
                CardLimits {
                    bw_in_bps: 1_000_000,
                    ..CardLimits::default()
                },
            )],
            members: vec![(1, "i-a", 0), (2, "i-a", 0)],
            port_limits: vec![],
            steps: vec![
                step(
                    3,
                    big(M3, GW, P3, P1),
                    50,
                    7..=7,
                    125.0,
                    Over::Card("i-a", 0, 2),
                    1,
                ),
                step(
                    3,
                    big(M3, GW, P3, P2),
                    50,
                    0..=0,
                    125.0,
                    Over::Card("i-a", 0, 2),
                    2,
                ),
            ],
        },
        CardRow {
            desc: "two cards of one instance are separate aggregates",
            cards: vec![("i-a", 0, pps(1000)), ("i-a", 1, pps(1000))],
            members: vec![(1, "i-a", 0), (2, "i-a", 1)],
            port_limits: vec![],
            steps: vec![
                step(
                    1,
                    to3(M1, P1),
                    300,
                    51..=51,
                    1000.0,
                    Over::Card("i-a", 0, 0),
                    1,
                ),
                step(
                    2,
                    to3(M2, P2),
                    300,
                    51..=51,
                    1000.0,
                    Over::Card("i-a", 1, 0),
                    2,
                ),
            ],
        },
        CardRow {
            desc: "the ENI's allowance refuses first and spares the card's",
            cards: vec![("i-a", 0, pps(1000))],
            members: vec![(1, "i-a", 0), (2, "i-a", 0)],
            port_limits: vec![(
                1,
                PortLimits {
                    pps: 100,
                    ..PortLimits::default()
                },
            )],
            steps: vec![
                step(1, to3(M1, P1), 300, 6..=6, 100.0, Over::Port(1, 0), 1),
                // The card was charged six frames (6 ms of its 50).
                step(
                    2,
                    to3(M2, P2),
                    300,
                    45..=45,
                    1000.0,
                    Over::Card("i-a", 0, 0),
                    2,
                ),
            ],
        },
    ]
}

fn card_exceeded(sw: &Switch, instance: &str, card: u32) -> [u64; 3] {
    sw.card_stats()
        .iter()
        .find(|c| c.instance == instance && c.card == card)
        .map(|c| {
            [
                c.pps_allowance_exceeded,
                c.bw_out_allowance_exceeded,
                c.bw_in_allowance_exceeded,
            ]
        })
        .unwrap_or_else(|| panic!("card {instance}/{card} not in the stats"))
}

fn port_exceeded(sw: &Switch, port: PortId) -> [u64; 3] {
    let s = sw.stats(port);
    [
        s.pps_allowance_exceeded,
        s.bw_out_allowance_exceeded,
        s.bw_in_allowance_exceeded,
    ]
}

fn rate_drops(sw: &Switch) -> [u64; 4] {
    [0, 1, 2, 3].map(|p| sw.stats(p).drops(DropReason::RateLimit))
}

fn build(row: &CardRow) -> Topology {
    let mut topo = topology();
    topo.cards = row
        .cards
        .iter()
        .map(|&(instance, card, limits)| CardConfig {
            instance: instance.into(),
            card,
            limits,
        })
        .collect();
    for p in &mut topo.ports {
        if let Some(&(_, i, c)) = row.members.iter().find(|m| m.0 == p.id) {
            p.card = Some((i.into(), c));
        }
        if let Some(&(_, l)) = row.port_limits.iter().find(|m| m.0 == p.id) {
            p.limits = l;
        }
    }
    topo
}

#[test]
fn card_allowance_table() {
    for row in card_rows() {
        let sw = Switch::new();
        sw.publish(Snapshot::compile(build(&row)).expect(row.desc));
        let mut w = sw.worker();
        for (i, s) in row.steps.iter().enumerate() {
            let desc = format!("{} (step {i})", row.desc);
            let over_before = match s.over {
                Over::Card(inst, c, _) => card_exceeded(&sw, inst, c),
                Over::Port(p, _) => port_exceeded(&sw, p),
            };
            let cards_before: Vec<_> = sw.card_stats();
            let drops_before = rate_drops(&sw);
            let t = Instant::now();
            let passed = send(&mut w, s.ingress, &s.frame, s.n);
            let slack = earned(t, s.earn_fps);
            assert!(
                passed >= *s.pass.start() && passed <= s.pass.end() + slack,
                "{desc}: {passed} passed, expected {:?} (+{slack})",
                s.pass
            );
            let refused = (s.n - passed) as u64;
            // Every refused frame is on the named allowance, nowhere else.
            let (over_after, which) = match s.over {
                Over::Card(inst, c, k) => (card_exceeded(&sw, inst, c), k),
                Over::Port(p, k) => (port_exceeded(&sw, p), k),
            };
            for k in 0..3 {
                let want = if k == which { refused } else { 0 };
                assert_eq!(
                    over_after[k] - over_before[k],
                    want,
                    "{desc}: allowance {k}"
                );
            }
            let other_cards: u64 = sw
                .card_stats()
                .iter()
                .zip(&cards_before)
                .map(|(a, b)| {
                    a.pps_allowance_exceeded
                        + a.bw_out_allowance_exceeded
                        + a.bw_in_allowance_exceeded
                        - b.pps_allowance_exceeded
                        - b.bw_out_allowance_exceeded
                        - b.bw_in_allowance_exceeded
                })
                .sum();
            let on_card = if matches!(s.over, Over::Card(..)) {
                refused
            } else {
                0
            };
            assert_eq!(other_cards, on_card, "{desc}: card counters");
            let drops_after = rate_drops(&sw);
            for p in 0..4 {
                let want = if p == s.drops_on as usize { refused } else { 0 };
                assert_eq!(
                    drops_after[p] - drops_before[p],
                    want,
                    "{desc}: port {p} drops"
                );
            }
        }
    }
}

/// A new snapshot keeps a card's meters and counters (no fresh burst, no
/// reset); a card that leaves and comes back starts afresh. Ports are
/// listed with the card.
#[test]
fn card_meters_survive_publication() {
    let row = &card_rows()[0];
    let sw = Switch::new();
    sw.publish(Snapshot::compile(build(row)).expect("compiles"));
    let mut w = sw.worker();
    let flood = small(M1, GW, P1, P3);
    let first = send(&mut w, 1, &flood, 300);
    assert!(first >= 51, "{first}");
    let exceeded = card_exceeded(&sw, "i-a", 0)[0];
    assert_eq!(exceeded, 300 - first as u64);
    assert_eq!(sw.card_stats()[0].ports, vec![1, 2]);

    let mut topo = build(row);
    topo.generation = 2;
    sw.publish(Snapshot::compile(topo).expect("compiles"));
    let t = Instant::now();
    let again = send(&mut w, 2, &small(M2, GW, P2, P3), 300);
    let earned = earned(t, 1000.0);
    assert!(again <= earned, "{again} passed after republishing");
    assert_eq!(
        card_exceeded(&sw, "i-a", 0)[0],
        exceeded + 300 - again as u64
    );

    // Without the card, nothing is held; with it again, a new burst.
    let mut topo = topology();
    topo.generation = 3;
    sw.publish(Snapshot::compile(topo).expect("compiles"));
    assert!(sw.card_stats().is_empty());
    assert_eq!(send(&mut w, 2, &small(M2, GW, P2, P3), 300), 300);
    let mut topo = build(row);
    topo.generation = 4;
    sw.publish(Snapshot::compile(topo).expect("compiles"));
    assert_eq!(card_exceeded(&sw, "i-a", 0), [0, 0, 0]);
    assert!(send(&mut w, 2, &small(M2, GW, P2, P3), 300) >= 51);
}

#[test]
fn card_references_are_checked() {
    let row = &card_rows()[0];
    let mut topo = build(row);
    topo.ports[0].card = Some(("i-b".into(), 0));
    assert_eq!(
        Snapshot::compile(topo).err(),
        Some(SnapshotError::Unknown("network card", "i-b/0".into()))
    );
    let mut topo = build(row);
    topo.cards.push(topo.cards[0].clone());
    assert_eq!(
        Snapshot::compile(topo).err(),
        Some(SnapshotError::DuplicateCard("i-a".into(), 0))
    );
}

// ---------------------------------------------------------------------------
// Connection-tracking allowance
// ---------------------------------------------------------------------------

/// One step of the conntrack table: an action, then the expected
/// (tracked, allowance exceeded, allowance available) of ports 1 to 3.
enum Ct {
    /// UDP from one port to another, (source port, destination port).
    Send(PortId, PortId, (u16, u16), Verdict),
    /// Advance the switch clock by this many seconds.
    Wait(u32),
    /// A worker's housekeeping (which sweeps expired entries).
    Housekeeping,
    /// The control plane resets a port (its id is about to be reused).
    Reset(PortId),
}

type Gauges = [(u64, u64, Option<u64>); 3];

fn ct_rows() -> Vec<(&'static str, Ct, Gauges)> {
    use Ct::*;
    use DropReason::ConntrackFull as Full;
    let fwd = Verdict::Forwarded;
    let none = (0, 0, None);
    vec![
        (
            "first flow of port 1, charged to it",
            Send(1, 3, (1001, 53), fwd(3)),
            [(1, 0, Some(2)), (0, 0, Some(2)), none],
        ),
        (
            "second",
            Send(1, 3, (1002, 53), fwd(3)),
            [(2, 0, Some(1)), (0, 0, Some(2)), none],
        ),
        (
            "third: port 1 is at its allowance",
            Send(1, 3, (1003, 53), fwd(3)),
            [(3, 0, Some(0)), (0, 0, Some(2)), none],
        ),
        (
            "a fourth is refused and counted on port 1",
            Send(1, 3, (1004, 53), Verdict::Dropped(Full)),
            [(3, 1, Some(0)), (0, 0, Some(2)), none],
        ),
        (
            "an established flow keeps going",
            Send(1, 3, (1001, 53), fwd(3)),
            [(3, 1, Some(0)), (0, 0, Some(2)), none],
        ),
        (
            "and its replies too (it becomes a stream)",
            Send(3, 1, (53, 1001), fwd(1)),
            [(3, 1, Some(0)), (0, 0, Some(2)), none],
        ),
        (
            "port 3 has no allowance: its new flow is charged to the full port 1, refused there",
            Send(3, 1, (53, 2000), Verdict::Dropped(Full)),
            [(3, 2, Some(0)), (0, 0, Some(2)), none],
        ),
        (
            "port 2 opens a flow to the full port 1: port 2 pays, port 1 is not asked",
            Send(2, 1, (3001, 80), fwd(1)),
            [(3, 2, Some(0)), (1, 0, Some(1)), none],
        ),
        (
            "port 3's flow to port 2 is charged to port 2",
            Send(3, 2, (53, 3002), fwd(2)),
            [(3, 2, Some(0)), (2, 0, Some(0)), none],
        ),
        (
            "and the next is refused on port 2",
            Send(3, 2, (53, 3003), Verdict::Dropped(Full)),
            [(3, 2, Some(0)), (2, 1, Some(0)), none],
        ),
        (
            "31 s on, the one-way flows have expired but are not swept yet",
            Wait(31),
            [(3, 2, Some(0)), (2, 1, Some(0)), none],
        ),
        (
            "so port 1 is still held",
            Send(1, 3, (1005, 53), Verdict::Dropped(Full)),
            [(3, 3, Some(0)), (2, 1, Some(0)), none],
        ),
        (
            "the sweep gives back all but port 1's stream",
            Housekeeping,
            [(1, 3, Some(2)), (0, 1, Some(2)), none],
        ),
        (
            "room again",
            Send(1, 3, (1005, 53), fwd(3)),
            [(2, 3, Some(1)), (0, 1, Some(2)), none],
        ),
        (
            "resetting port 3 forgets its flows, and port 1 gets its allowance back",
            Reset(3),
            [(0, 3, Some(3)), (0, 1, Some(2)), none],
        ),
    ]
}

#[test]
fn conntrack_allowance_table() {
    let clock = Arc::new(AtomicU32::new(1000));
    let sw = Switch::with_options(SwitchOptions {
        conntrack_slots: 256,
        manual_clock: Some(clock.clone()),
        ..SwitchOptions::default()
    });
    let mut topo = topology();
    topo.security_groups = vec![SecurityGroupConfig::default_for("sg-a", "vpc-a")];
    for p in &mut topo.ports {
        p.security_groups = vec!["sg-a".into()];
        p.limits.conntrack = match p.id {
            1 => 3,
            2 => 2,
            _ => 0,
        };
    }
    sw.publish(Snapshot::compile(topo).expect("compiles"));
    let mut w = sw.worker();
    let addr = |p: PortId| [(M1, P1), (M2, P2), (M3, P3)][p as usize - 1];
    for (desc, action, want) in ct_rows() {
        match action {
            Ct::Send(from, to, ports, verdict) => {
                let (smac, sip) = addr(from);
                let (dmac, dip) = addr(to);
                // Same subnet: the peer's MAC; across: the router's.
                let dmac = if (from == 3) == (to == 3) { dmac } else { GW };
                let mut f = udp(smac, dmac, sip, dip, 64, ports, b"q");
                let mut cap = Capture::default();
                let got = w.process(from, &mut f, &PacketMeta::default(), &mut cap);
                assert_eq!(got, verdict, "{desc}");
            }
            Ct::Wait(s) => {
                clock.fetch_add(s, Ordering::Relaxed);
            }
            Ct::Housekeeping => w.housekeeping(),
            Ct::Reset(p) => sw.reset_counters(p),
        }
        for (i, want) in want.iter().enumerate() {
            let s = sw.stats(i as PortId + 1);
            let got = (
                s.conntrack_tracked,
                s.conntrack_allowance_exceeded,
                s.conntrack_allowance_available,
            );
            assert_eq!(got, *want, "{desc}: port {}", i + 1);
        }
    }
    // Refusals are `conntrack_full` drops on the port that was full.
    assert_eq!(sw.stats(1).drops(DropReason::ConntrackFull), 3);
    assert_eq!(sw.stats(2).drops(DropReason::ConntrackFull), 1);
    assert_eq!(sw.stats(3).drops(DropReason::ConntrackFull), 0);
}

/// Without a sweep, a full table's expired entries are reclaimed by the
/// inserts that probe them, and the port each was charged to gets its
/// allowance back; a flow the full table refuses gives its back at once;
/// `clear_conntrack` empties every count.
#[test]
fn reclaimed_and_cleared_entries_give_their_allowance_back() {
    let clock = Arc::new(AtomicU32::new(1000));
    let sw = Switch::with_options(SwitchOptions {
        // One bucket: every flow competes for the same eight slots.
        conntrack_slots: 8,
        manual_clock: Some(clock.clone()),
        ..SwitchOptions::default()
    });
    let mut topo = topology();
    topo.security_groups = vec![SecurityGroupConfig::default_for("sg-a", "vpc-a")];
    for p in &mut topo.ports {
        p.security_groups = vec!["sg-a".into()];
        p.limits.conntrack = if p.id == 3 { 0 } else { 100 };
    }
    sw.publish(Snapshot::compile(topo).expect("compiles"));
    let mut w = sw.worker();
    let mut send = |from_mac, from_ip, from: PortId, sport: u16| {
        let mut f = udp(from_mac, GW, from_ip, P3, 64, (sport, 53), b"q");
        w.process(
            from,
            &mut f,
            &PacketMeta::default(),
            &mut Capture::default(),
        )
    };
    for sport in 0..8 {
        assert_eq!(send(M1, P1, 1, sport), Verdict::Forwarded(3));
    }
    assert_eq!(sw.stats(1).conntrack_tracked, 8);
    assert_eq!(
        send(M2, P2, 2, 100),
        Verdict::Dropped(DropReason::ConntrackFull)
    );
    assert_eq!(
        sw.stats(2).conntrack_tracked,
        0,
        "given back on a full table"
    );
    clock.fetch_add(31, Ordering::Relaxed);
    for sport in 100..104 {
        assert_eq!(send(M2, P2, 2, sport), Verdict::Forwarded(3));
    }
    assert_eq!(sw.stats(1).conntrack_tracked, 4);
    assert_eq!(sw.stats(2).conntrack_tracked, 4);
    assert_eq!(sw.stats(3).conntrack_tracked, 0, "port 3 has no allowance");
    assert_eq!(sw.clear_conntrack(), 8);
    for p in 1..=3 {
        assert_eq!(sw.stats(p).conntrack_tracked, 0, "port {p}");
    }
}

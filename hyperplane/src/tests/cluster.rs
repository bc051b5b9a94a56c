//! Node loss: flows continue on their secondaries with the same translation,
//! are replicated again, survive a second loss, and a restarted node rejoins.

use std::collections::HashMap;

use super::*;
use crate::wire::testutil::frame;
use crate::wire::{parse, PROTO_TCP, TCP_ACK, TCP_SYN};

const SERVER: [u8; 4] = [93, 184, 216, 34];

fn client(i: u16) -> ([u8; 4], u16) {
    ([10, 0, 1, (i % 200) as u8 + 1], 30000 + i)
}

/// Sends one outbound packet of flow `i`; returns the (NAT ip, port) it got.
fn out_pkt(lab: &mut Lab, i: u16, flags: u8) -> Option<(u32, u16)> {
    let (c, sp) = client(i);
    let f = frame(PROTO_TCP, c, sp, SERVER, 443, flags, 100);
    let out = lab.send(NAT_PORT, &f);
    let o = out
        .iter()
        .find(|(_, o)| parse(o).is_ok_and(|p| p.dst == ip(SERVER)))?;
    let p = parse(&o.1).ok()?;
    Some((p.src, p.sport))
}

/// Sends the server's answer to flow `i` at its NAT port; true when it reached the client.
fn in_pkt(lab: &mut Lab, i: u16, nat: (u32, u16)) -> bool {
    let (c, sp) = client(i);
    let f = frame(
        PROTO_TCP,
        SERVER,
        443,
        nat.0.to_be_bytes(),
        nat.1,
        TCP_ACK,
        100,
    );
    let out = lab.send(NAT_PORT, &f);
    out.iter()
        .any(|(_, o)| parse(o).is_ok_and(|p| p.dst == ip(c) && p.dport == sp))
}

fn owner_counts(lab: &Lab, n: u16) -> HashMap<usize, usize> {
    let mut m = HashMap::new();
    for i in 0..n {
        let (c, sp) = client(i);
        let f = frame(PROTO_TCP, c, sp, SERVER, 443, TCP_ACK, 0);
        *m.entry(lab.hp.steer(NAT_PORT, &f).unwrap()).or_default() += 1;
    }
    m
}

fn check_all(lab: &mut Lab, flows: &[(u32, u16)], when: &str) {
    for (i, nat) in flows.iter().enumerate() {
        assert_eq!(
            out_pkt(lab, i as u16, TCP_ACK),
            Some(*nat),
            "{when}: flow {i} translation"
        );
        assert!(in_pkt(lab, i as u16, *nat), "{when}: flow {i} return");
    }
}

#[test]
fn flows_survive_node_loss_twice_and_rejoin() {
    const N: u16 = 300;
    let cfg = Config {
        nat_gateways: vec![nat_config(&[NAT_IP, NAT_IP2])],
        load_balancers: vec![],
    };
    let mut lab = Lab::new(
        Options {
            nodes: 3,
            flows_per_node: 8192,
            ..Options::default()
        },
        cfg,
    );
    let flows: Vec<(u32, u16)> = (0..N)
        .map(|i| out_pkt(&mut lab, i, TCP_SYN).unwrap())
        .collect();
    for (i, nat) in flows.iter().enumerate() {
        assert!(in_pkt(&mut lab, i as u16, *nat));
    }
    assert!(lab.settle(|l| l.hp.stats().nodes.iter().all(|n| n.replication_lag == 0)));
    let st = lab.hp.stats();
    // Each flow is held twice: once on its primary, once on its secondary.
    assert_eq!(
        st.nodes.iter().map(|n| n.flows).sum::<u64>(),
        2 * u64::from(N)
    );
    assert_eq!(
        st.nodes.iter().map(|n| n.replicated_in).sum::<u64>(),
        u64::from(N)
    );

    // Stop the node that owns the most flows.
    let owners = owner_counts(&lab, N);
    let victim = *owners.iter().max_by_key(|(_, c)| **c).unwrap().0;
    lab.stop(victim);
    assert!(!lab.hp.live_nodes().contains(&victim));
    assert!(lab.settle(|l| l
        .hp
        .stats()
        .nodes
        .iter()
        .all(|n| !n.live || n.replication_lag == 0)));
    check_all(&mut lab, &flows, "after first loss");
    let st = lab.hp.stats();
    assert!(
        st.nodes.iter().map(|n| n.resynced_out).sum::<u64>() > 0,
        "no re-replication"
    );
    // Both survivors hold every flow again (primary + new secondary).
    assert!(lab.settle(|l| l
        .hp
        .stats()
        .nodes
        .iter()
        .filter(|n| n.live)
        .all(|n| n.flows == u64::from(N))));

    // A second loss: the last node carries everything.
    let second = lab.hp.live_nodes()[0];
    lab.stop(second);
    check_all(&mut lab, &flows, "after second loss");
    assert_eq!(lab.hp.live_nodes().len(), 1);

    // Restart the first victim: it joins, gets the flows, then takes its shards back.
    lab.start(victim);
    assert!(
        lab.settle(|l| l.hp.live_nodes().contains(&victim)),
        "never promoted"
    );
    check_all(&mut lab, &flows, "after rejoin");
    let owners = owner_counts(&lab, N);
    assert!(
        owners.get(&victim).copied().unwrap_or(0) > 0,
        "rejoined node owns nothing"
    );
}

#[test]
fn stopped_node_handle_goes_inert_and_cannot_be_taken_twice() {
    let cfg = Config {
        nat_gateways: vec![nat_config(&[NAT_IP])],
        load_balancers: vec![],
    };
    let hp = Hyperplane::new(Options {
        nodes: 2,
        flows_per_node: 64,
        ..Options::default()
    })
    .unwrap();
    hp.publish(cfg).unwrap();
    let mut n0 = hp.node(0).unwrap();
    assert!(matches!(
        hp.node(0),
        Err(crate::HyperplaneError::NodeTaken(0))
    ));
    assert!(matches!(
        hp.node(9),
        Err(crate::HyperplaneError::NoSuchNode(9))
    ));
    hp.stop_node(0);
    let now = std::time::Instant::now();
    let mut out = Vec::new();
    n0.tick(now, &mut out);
    let f = frame(PROTO_TCP, [10, 0, 1, 1], 1000, SERVER, 80, TCP_SYN, 0);
    n0.process(NAT_PORT, &f, now, &mut out);
    assert!(out.is_empty());
    assert_eq!(hp.steer(NAT_PORT, &f), Some(1));
    hp.stop_node(1);
    assert_eq!(hp.steer(NAT_PORT, &f), None);
    assert_eq!(hp.stats().steer_drops, 1);
    // The lead's restart order: take the node, then start it; once only.
    let mut again = hp.node(0).unwrap();
    assert!(matches!(
        hp.node(0),
        Err(crate::HyperplaneError::NodeTaken(0))
    ));
    hp.start_node(0);
    assert_eq!(hp.live_nodes(), vec![0]);
    again.tick(now, &mut out);
    again.process(NAT_PORT, &f, now, &mut out);
    assert_eq!(out.len(), 1, "the restarted node serves");
}

#[test]
fn bad_options_and_configs_are_refused() {
    for o in [
        Options {
            nodes: 0,
            ..Options::default()
        },
        Options {
            shards: 100,
            ..Options::default()
        },
        Options {
            maglev_table_size: 65536,
            ..Options::default()
        },
        Options {
            flows_per_node: 0,
            ..Options::default()
        },
    ] {
        assert!(Hyperplane::new(o).is_err());
    }
    let hp = Hyperplane::new(Options::default()).unwrap();
    let mut dup = nat_config(&[NAT_IP]);
    dup.id = "nat-2".into();
    let bad = [
        Config {
            nat_gateways: vec![nat_config(&[NAT_IP, NAT_IP])],
            load_balancers: vec![],
        },
        Config {
            nat_gateways: vec![nat_config(&[NAT_IP]), dup],
            load_balancers: vec![],
        },
    ];
    for c in bad {
        assert!(hp.publish(c).is_err());
    }
}

/// Both directions of every flow steer to the same node, for NAT (reverse
/// tuple at the chosen port) and NLB (by client endpoint), over 8 nodes.
#[test]
fn both_directions_steer_to_the_same_node() {
    use crate::wire::{PROTO_ICMP, PROTO_UDP};
    let cfg = Config {
        nat_gateways: vec![nat_config(&[NAT_IP, NAT_IP2])],
        load_balancers: vec![],
    };
    let mut lab = Lab::new(
        Options {
            nodes: 8,
            flows_per_node: 4096,
            ..Options::default()
        },
        cfg,
    );
    let mut nodes_seen = std::collections::HashSet::new();
    for i in 0..400u16 {
        let proto = [PROTO_TCP, PROTO_UDP, PROTO_ICMP][usize::from(i % 3)];
        let (c, sp) = client(i);
        let (sport, dport) = if proto == PROTO_ICMP {
            (sp, 0)
        } else {
            (sp, 443)
        };
        let f = frame(proto, c, sport, SERVER, dport, TCP_SYN, 0);
        let n_out = lab.hp.steer(NAT_PORT, &f).unwrap();
        nodes_seen.insert(n_out);
        let out = lab.send(NAT_PORT, &f);
        assert_eq!(out.len(), 1, "flow {i}");
        let p = parse(&out[0].1).unwrap();
        let back = if proto == PROTO_ICMP {
            frame(proto, SERVER, 0, p.src.to_be_bytes(), p.sport, 0, 0)
        } else {
            frame(
                proto,
                SERVER,
                443,
                p.src.to_be_bytes(),
                p.sport,
                TCP_SYN | TCP_ACK,
                0,
            )
        };
        assert_eq!(
            lab.hp.steer(NAT_PORT, &back),
            Some(n_out),
            "flow {i} proto {proto}"
        );
        assert_eq!(lab.send(NAT_PORT, &back).len(), 1, "flow {i} return");
    }
    assert!(
        nodes_seen.len() >= 6,
        "flows should spread over the nodes: {nodes_seen:?}"
    );
    // NLB: client → VIP and target → client steer by the client endpoint.
    let tg = crate::TargetGroupConfig {
        id: "tg".into(),
        protocol: crate::L4::Tcp,
        targets: (1..=3u8)
            .map(|t| crate::TargetConfig {
                ip: [10, 0, 3, t].into(),
                port: 8080,
                draining_since: None,
            })
            .collect(),
        health_check: crate::HealthCheckConfig {
            enabled: false,
            ..Default::default()
        },
        source_ip_stickiness: false,
        deregistration_delay: std::time::Duration::from_secs(1),
    };
    let lb = crate::LoadBalancerConfig {
        id: "lb".into(),
        port: LB_PORT,
        mac: LB_MAC,
        gateway_mac: crate::wire::testutil::GW,
        addresses: vec![VIP.into()],
        listeners: vec![crate::ListenerConfig {
            protocol: crate::L4::Tcp,
            port: 80,
            target_group: tg,
        }],
    };
    let mut lab = Lab::new(
        Options {
            nodes: 8,
            flows_per_node: 4096,
            ..Options::default()
        },
        Config {
            nat_gateways: vec![],
            load_balancers: vec![lb],
        },
    );
    let mut nodes_seen = std::collections::HashSet::new();
    for i in 0..200u16 {
        let (c, sp) = client(i);
        let to_vip = frame(PROTO_TCP, c, sp, VIP, 80, TCP_SYN, 0);
        let n = lab.hp.steer(LB_PORT, &to_vip).unwrap();
        nodes_seen.insert(n);
        let out = lab.send(LB_PORT, &to_vip);
        let p = parse(&out[0].1).unwrap();
        let reply = frame(
            PROTO_TCP,
            p.dst.to_be_bytes(),
            p.dport,
            c,
            sp,
            TCP_SYN | TCP_ACK,
            0,
        );
        assert_eq!(lab.hp.steer(LB_PORT, &reply), Some(n), "nlb flow {i}");
        let back = lab.send(LB_PORT, &reply);
        assert_eq!(
            parse(&back[0].1).unwrap().src,
            ip(VIP),
            "nlb flow {i} translated back"
        );
    }
    assert!(nodes_seen.len() >= 6, "{nodes_seen:?}");
}

/// Lag and age: records queue up while the secondary does not tick, and
/// their age is measured when it finally applies them; a full inbox drops
/// and counts.
#[test]
fn replication_lag_age_and_overflow_are_measured() {
    let cfg = Config {
        nat_gateways: vec![nat_config(&[NAT_IP])],
        load_balancers: vec![],
    };
    let opts = Options {
        nodes: 2,
        flows_per_node: 4096,
        replication_inbox: 50,
        ..Options::default()
    };
    let hp = Hyperplane::new(opts).unwrap();
    hp.publish(cfg).unwrap();
    let mut nodes = [hp.node(0).unwrap(), hp.node(1).unwrap()];
    let t0 = std::time::Instant::now();
    let mut out = Vec::new();
    let mut per_node = [0u64; 2];
    for i in 0..200u16 {
        let (c, sp) = client(i);
        let f = frame(PROTO_TCP, c, sp, SERVER, 443, TCP_SYN, 0);
        let n = hp.steer(NAT_PORT, &f).unwrap();
        nodes[n].process(NAT_PORT, &f, t0, &mut out);
        per_node[n] += 1;
    }
    // Node 1 holds node 0's replicas and the other way round.
    let st = hp.stats();
    for n in 0..2 {
        let to_me = per_node[1 - n];
        assert_eq!(st.nodes[n].replication_sent, to_me);
        assert_eq!(st.nodes[n].replication_dropped, to_me.saturating_sub(50));
        assert_eq!(st.nodes[n].replication_lag, to_me.min(50));
    }
    let later = t0 + std::time::Duration::from_millis(250);
    nodes[1].tick(later, &mut out);
    let st = hp.stats();
    assert_eq!(st.nodes[1].replication_lag, 0);
    assert!(
        st.nodes[1].replication_age_ms >= 250,
        "{}",
        st.nodes[1].replication_age_ms
    );
    assert!(st.nodes[0].replication_lag > 0);
}

/// The lead's shape: one OS thread per node, frames handed over by channel,
/// replication between threads through the inboxes; a node is stopped while
/// the others run, and its flows continue with the same translation.
#[test]
fn node_threads_keep_flows_across_a_stop() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    struct ChanSink(mpsc::Sender<Vec<u8>>);
    impl crate::Sink for ChanSink {
        fn emit(&mut self, _port: u32, frame: &[u8]) {
            let _ = self.0.send(frame.to_vec());
        }
    }

    const N: u16 = 120;
    let cfg = Config {
        nat_gateways: vec![nat_config(&[NAT_IP])],
        load_balancers: vec![],
    };
    let hp = Hyperplane::new(Options {
        nodes: 3,
        flows_per_node: 4096,
        ..Options::default()
    })
    .unwrap();
    hp.publish(cfg).unwrap();
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>();
    let mut inputs = Vec::new();
    let mut stops = Vec::new();
    let mut threads = Vec::new();
    for i in 0..3 {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let stop = Arc::new(AtomicBool::new(false));
        let mut node = hp.node(i).unwrap();
        let mut sink = ChanSink(out_tx.clone());
        let flag = Arc::clone(&stop);
        threads.push(std::thread::spawn(move || {
            while !flag.load(Ordering::Acquire) {
                while let Ok(f) = rx.try_recv() {
                    node.process(NAT_PORT, &f, Instant::now(), &mut sink);
                }
                node.tick(Instant::now(), &mut sink);
                std::thread::sleep(Duration::from_micros(200));
            }
        }));
        inputs.push(tx);
        stops.push(stop);
    }
    let exchange = |f: Vec<u8>| -> Option<Vec<u8>> {
        let n = hp.steer(NAT_PORT, &f)?;
        inputs[n].send(f).ok()?;
        out_rx.recv_timeout(Duration::from_secs(5)).ok()
    };
    let mut nat = Vec::new();
    for i in 0..N {
        let (c, sp) = client(i);
        let o = exchange(frame(PROTO_TCP, c, sp, SERVER, 443, TCP_SYN, 10)).expect("translated");
        let p = parse(&o).unwrap();
        nat.push((p.src, p.sport));
    }
    let settled = |hp: &Hyperplane| {
        hp.stats()
            .nodes
            .iter()
            .all(|n| !n.live || n.replication_lag == 0)
    };
    let mut ok = false;
    for _ in 0..500 {
        if settled(&hp) && hp.stats().nodes.iter().map(|n| n.flows).sum::<u64>() == 2 * u64::from(N)
        {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(ok, "replication did not settle: {:?}", hp.stats().nodes);
    // Stop the busiest node: its thread exits, the others carry on.
    let mut count = [0usize; 3];
    for i in 0..N {
        let (c, sp) = client(i);
        count[hp
            .steer(NAT_PORT, &frame(PROTO_TCP, c, sp, SERVER, 443, TCP_ACK, 0))
            .unwrap()] += 1;
    }
    let victim = (0..3).max_by_key(|&i| count[i]).unwrap();
    stops[victim].store(true, Ordering::Release);
    hp.stop_node(victim);
    for i in 0..N {
        let (c, sp) = client(i);
        let o =
            exchange(frame(PROTO_TCP, c, sp, SERVER, 443, TCP_ACK, 10)).expect("still translated");
        let p = parse(&o).unwrap();
        assert_eq!(
            (p.src, p.sport),
            nat[usize::from(i)],
            "flow {i} changed translation"
        );
    }
    for s in &stops {
        s.store(true, Ordering::Release);
    }
    for t in threads {
        t.join().unwrap();
    }
}

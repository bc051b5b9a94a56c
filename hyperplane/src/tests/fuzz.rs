//! Garbage and mutated frames through steer and process: no panic, every
//! refusal counted.

use std::time::Duration;

use super::*;
use crate::maglev::mix64;
use crate::wire::testutil::frame;
use crate::wire::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_SYN};
use crate::{
    HealthCheckConfig, ListenerConfig, LoadBalancerConfig, TargetConfig, TargetGroupConfig, L4,
};

#[test]
fn random_and_mutated_frames_never_panic() {
    let tg = TargetGroupConfig {
        id: "tg".into(),
        protocol: L4::Tcp,
        targets: vec![TargetConfig {
            ip: [10, 0, 3, 1].into(),
            port: 80,
            draining_since: None,
        }],
        health_check: HealthCheckConfig::default(),
        source_ip_stickiness: false,
        deregistration_delay: Duration::from_secs(1),
    };
    let cfg = Config {
        nat_gateways: vec![nat_config(&[NAT_IP])],
        load_balancers: vec![LoadBalancerConfig {
            id: "lb".into(),
            port: LB_PORT,
            mac: LB_MAC,
            gateway_mac: crate::wire::testutil::GW,
            addresses: vec![VIP.into()],
            listeners: vec![ListenerConfig {
                protocol: L4::Tcp,
                port: 80,
                target_group: tg,
            }],
        }],
    };
    let mut lab = Lab::new(
        Options {
            nodes: 2,
            flows_per_node: 512,
            ..Options::default()
        },
        cfg,
    );
    let seeds = [
        frame(PROTO_TCP, [10, 0, 1, 1], 1000, [1, 1, 1, 1], 80, TCP_SYN, 4),
        frame(PROTO_UDP, [10, 0, 1, 1], 1000, [1, 1, 1, 1], 53, 0, 4),
        frame(PROTO_ICMP, [10, 0, 1, 1], 7, [1, 1, 1, 1], 0, 0, 4),
        frame(PROTO_TCP, [1, 1, 1, 1], 80, NAT_IP, 2048, TCP_ACK, 4),
        frame(PROTO_TCP, [9, 9, 9, 9], 5, VIP, 80, TCP_SYN, 4),
        frame(
            PROTO_TCP,
            [10, 0, 3, 1],
            80,
            VIP,
            64600,
            TCP_SYN | TCP_ACK,
            0,
        ),
    ];
    let mut x = 1u64;
    let mut rnd = || {
        x = mix64(x);
        x
    };
    let mut sent = 0u64;
    for round in 0..20_000u32 {
        let mut f = if round % 4 == 0 {
            let len = (rnd() % 120) as usize;
            (0..len).map(|_| rnd() as u8).collect::<Vec<u8>>()
        } else {
            let mut f = seeds[(rnd() % seeds.len() as u64) as usize].clone();
            for _ in 0..1 + rnd() % 4 {
                let i = (rnd() as usize) % f.len();
                f[i] = rnd() as u8;
            }
            if rnd() % 5 == 0 {
                f.truncate((rnd() as usize) % (f.len() + 1));
            }
            f
        };
        if round % 3 == 0 && f.len() > 13 {
            // Keep most of them IPv4 so the deeper parsers get exercised.
            f[12] = 8;
            f[13] = 0;
        }
        let port = if rnd() % 2 == 0 { NAT_PORT } else { LB_PORT };
        // Steered frames go to their owner; refused ones are processed anyway to exercise the node's checks.
        let n = lab.hp.steer(port, &f).unwrap_or((rnd() % 2) as usize);
        let mut out = Vec::new();
        if let Some(node) = lab.nodes[n].as_mut() {
            node.process(port, &f, lab.now, &mut out);
            sent += 1;
        }
        if round % 100 == 0 {
            lab.advance(Duration::from_secs(1));
            lab.tick(&mut out);
        }
    }
    let mut out = Vec::new();
    lab.tick(&mut out);
    let st = lab.hp.stats();
    let frames_in: u64 = st.nodes.iter().map(|n| n.frames_in).sum();
    let drops: u64 = st
        .nodes
        .iter()
        .flat_map(|n| n.drops.iter().map(|d| d.1))
        .sum();
    assert_eq!(frames_in, sent);
    assert!(
        drops > sent / 2,
        "most garbage must be dropped and counted: {drops} of {sent}"
    );
    assert!(lab.drops(crate::DropReason::Malformed) > 0);
    assert!(lab.drops(crate::DropReason::NotIpv4) > 0);
}

/// A flood of new flows fills the table to its limit, no further; every
/// refused SYN is counted, and established flows keep working.
#[test]
fn syn_flood_hits_the_flow_limit_and_is_counted() {
    for svc in ["nat", "nlb"] {
        let tg = TargetGroupConfig {
            id: "tg".into(),
            protocol: L4::Tcp,
            targets: vec![TargetConfig {
                ip: [10, 0, 3, 1].into(),
                port: 80,
                draining_since: None,
            }],
            health_check: HealthCheckConfig {
                enabled: false,
                ..HealthCheckConfig::default()
            },
            source_ip_stickiness: false,
            deregistration_delay: Duration::from_secs(1),
        };
        let cfg = Config {
            nat_gateways: vec![nat_config(&[NAT_IP])],
            load_balancers: vec![LoadBalancerConfig {
                id: "lb".into(),
                port: LB_PORT,
                mac: LB_MAC,
                gateway_mac: crate::wire::testutil::GW,
                addresses: vec![VIP.into()],
                listeners: vec![ListenerConfig {
                    protocol: L4::Tcp,
                    port: 80,
                    target_group: tg,
                }],
            }],
        };
        let mut lab = Lab::new(
            Options {
                nodes: 1,
                flows_per_node: 100,
                ..Options::default()
            },
            cfg,
        );
        let (port, dst) = if svc == "nat" {
            (NAT_PORT, [1, 1, 1, 1])
        } else {
            (LB_PORT, VIP)
        };
        let mut forwarded = 0;
        for i in 0..500u16 {
            let f = frame(
                PROTO_TCP,
                [172, 16, (i >> 8) as u8, i as u8],
                1000 + i,
                dst,
                80,
                TCP_SYN,
                0,
            );
            forwarded += lab.send(port, &f).len();
        }
        assert_eq!(forwarded, 100, "{svc}");
        assert_eq!(lab.drops(crate::DropReason::FlowTableFull), 400, "{svc}");
        assert_eq!(lab.hp.stats().nodes[0].flows, 100, "{svc}");
        // The first flow still passes.
        let f = frame(PROTO_TCP, [172, 16, 0, 0], 1000, dst, 80, TCP_ACK, 0);
        assert_eq!(lab.send(port, &f).len(), 1, "{svc}");
    }
}

//! The planner as a table of scenarios, plus the parsers and the metadata
//! reads against a fake service.

use super::*;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn net(s: &str) -> Net {
    Net::parse(s).unwrap()
}

const MAC0: &str = "02:e1:00:00:00:10";
const MAC1: &str = "02:e1:00:00:00:11";

fn meta(mac: &str, device: u32, card: u32, ips: &[&str]) -> EniMeta {
    EniMeta {
        mac: mac.into(),
        device,
        card,
        ips: ips.iter().map(|s| ip(s)).collect(),
        subnet: net("10.0.1.0/24"),
        prefixes: vec![],
    }
}

fn iface(name: &str, mac: &str, ifindex: u32) -> Iface {
    Iface {
        name: name.into(),
        mac: mac.into(),
        ifindex,
    }
}

fn want(name: &str, ifindex: u32, m: &EniMeta) -> Desired {
    desired(&[iface(name, &m.mac, ifindex)], std::slice::from_ref(m))
        .remove(name)
        .unwrap()
}

fn seen(ifindex: u32, addrs: &[&str], lease: Option<u128>) -> Observed {
    Observed {
        ifindex,
        addrs: addrs.iter().map(|s| ip(s)).collect(),
        lease,
    }
}

fn applied(w: &Desired, lease: Option<u128>, routed: bool) -> Applied {
    Applied {
        want: w.clone(),
        lease,
        routed,
        complete: true,
    }
}

fn cmds(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn shown(v: &[Cmd]) -> Vec<String> {
    v.iter().map(|c| c.to_string()).collect()
}

/// Nothing may touch the main table or rules outside our range.
fn assert_own_tables_only(p: &Plan) {
    for c in p.remove.iter().chain(&p.add) {
        let a = &c.0;
        match a[0].as_str() {
            "route" => {
                let t = a
                    .iter()
                    .position(|x| x == "table")
                    .expect("route without table");
                let t: u32 = a[t + 1].parse().unwrap();
                assert!(OWN_PRIORITIES.contains(&t), "{c}");
            }
            "rule" => {
                let t = a
                    .iter()
                    .position(|x| x == "priority")
                    .expect("rule without priority");
                let t: u32 = a[t + 1].parse().unwrap();
                assert!(OWN_PRIORITIES.contains(&t), "{c}");
            }
            "addr" | "link" => {}
            other => panic!("unexpected command {other}: {c}"),
        }
    }
}

struct Case {
    name: &'static str,
    dev: &'static str,
    prev: Option<Applied>,
    want: Option<Desired>,
    now: Option<Observed>,
    remove: Vec<String>,
    add: Vec<String>,
    routed: bool,
}

#[test]
fn plans() {
    let m0 = meta(MAC0, 0, 0, &["10.0.1.10", "10.0.1.20", "10.0.1.21"]);
    let w0 = want("eth0", 2, &m0);
    let m1 = meta(MAC1, 1, 0, &["10.0.1.50", "10.0.1.51"]);
    let w1 = want("eth1", 3, &m1);
    // eth1 without its secondary (moved away).
    let w1_moved = want("eth1", 3, &meta(MAC1, 1, 0, &["10.0.1.50"]));
    // eth1 attached at another index: device 2 on card 1.
    let w1_dev2 = want("eth1", 3, &meta(MAC1, 2, 1, &["10.0.1.50", "10.0.1.51"]));
    let mut m1p = m1.clone();
    m1p.prefixes = vec![net("10.0.1.64/28")];
    let w1_prefix = want("eth1", 3, &m1p);

    let primary_routes = [
        "ip route replace 10.0.1.0/24 dev eth0 src 10.0.1.10 table 10000",
        "ip route replace default via 10.0.1.1 dev eth0 table 10000",
    ];
    let eth1_routes = [
        "ip route replace 10.0.1.0/24 dev eth1 src 10.0.1.50 table 10001",
        "ip route replace default via 10.0.1.1 dev eth1 table 10001",
    ];
    let rules = |table: u32, srcs: &[&str]| -> Vec<String> {
        srcs.iter()
            .flat_map(|s| {
                [
                    format!("ip rule del from {s} lookup {table} priority {table}"),
                    format!("ip rule add from {s} lookup {table} priority {table}"),
                ]
            })
            .collect()
    };
    let cat = |parts: &[&[String]]| -> Vec<String> { parts.concat() };

    let cases = vec![
        Case {
            name: "primary ENI after DHCP: secondaries, routes, a rule per address",
            dev: "eth0",
            prev: None,
            want: Some(w0.clone()),
            now: Some(seen(2, &["10.0.1.10"], Some(1))),
            remove: vec![],
            add: cat(&[
                &cmds(&[
                    "ip route flush table 10000",
                    "ip addr replace 10.0.1.20/24 dev eth0",
                    "ip addr replace 10.0.1.21/24 dev eth0",
                ]),
                &cmds(&primary_routes),
                &rules(10000, &["10.0.1.10/32", "10.0.1.20/32", "10.0.1.21/32"]),
            ]),
            routed: true,
        },
        Case {
            name: "primary ENI before DHCP: no routes yet (no source address)",
            dev: "eth0",
            prev: None,
            want: Some(w0.clone()),
            now: Some(seen(2, &[], None)),
            remove: vec![],
            add: cat(&[
                &cmds(&[
                    "ip route flush table 10000",
                    "ip addr replace 10.0.1.20/24 dev eth0",
                    "ip addr replace 10.0.1.21/24 dev eth0",
                ]),
                &rules(10000, &["10.0.1.10/32", "10.0.1.20/32", "10.0.1.21/32"]),
            ]),
            routed: false,
        },
        Case {
            name: "DHCP then brings the primary address: only the routes follow",
            dev: "eth0",
            prev: Some(applied(&w0, None, false)),
            want: Some(w0.clone()),
            now: Some(seen(2, &["10.0.1.10", "10.0.1.20", "10.0.1.21"], Some(5))),
            remove: vec![],
            add: cmds(&primary_routes),
            routed: true,
        },
        Case {
            name: "settled: nothing to do",
            dev: "eth0",
            prev: Some(applied(&w0, Some(5), true)),
            want: Some(w0.clone()),
            now: Some(seen(2, &["10.0.1.10", "10.0.1.20", "10.0.1.21"], Some(5))),
            remove: vec![],
            add: vec![],
            routed: true,
        },
        Case {
            name: "a DHCP renewal (lease rewritten) re-installs the routes",
            dev: "eth0",
            prev: Some(applied(&w0, Some(5), true)),
            want: Some(w0.clone()),
            now: Some(seen(2, &["10.0.1.10", "10.0.1.20", "10.0.1.21"], Some(6))),
            remove: vec![],
            add: cmds(&primary_routes),
            routed: true,
        },
        Case {
            name: "an address flushed behind our back is put back",
            dev: "eth0",
            prev: Some(applied(&w0, Some(5), true)),
            want: Some(w0.clone()),
            now: Some(seen(2, &["10.0.1.10", "10.0.1.20"], Some(5))),
            remove: vec![],
            add: cat(&[
                &cmds(&["ip addr replace 10.0.1.21/24 dev eth0"]),
                &cmds(&primary_routes),
            ]),
            routed: true,
        },
        Case {
            name: "hot-attached ENI: link up, every address, its own table",
            dev: "eth1",
            prev: None,
            want: Some(w1.clone()),
            now: Some(seen(3, &[], None)),
            remove: vec![],
            add: cat(&[
                &cmds(&[
                    "ip route flush table 10001",
                    "ip link set dev eth1 up",
                    "ip addr replace 10.0.1.50/24 dev eth1",
                    "ip addr replace 10.0.1.51/24 dev eth1",
                ]),
                &cmds(&eth1_routes),
                &rules(10001, &["10.0.1.50/32", "10.0.1.51/32"]),
            ]),
            routed: true,
        },
        Case {
            name: "a secondary address moved away: its address and rule go",
            dev: "eth1",
            prev: Some(applied(&w1, None, true)),
            want: Some(w1_moved.clone()),
            now: Some(seen(3, &["10.0.1.50", "10.0.1.51"], None)),
            remove: cmds(&[
                "ip addr del 10.0.1.51/24 dev eth1",
                "ip rule del from 10.0.1.51/32 lookup 10001 priority 10001",
            ]),
            add: cmds(&eth1_routes),
            routed: true,
        },
        Case {
            name: "a new secondary address and a delegated prefix",
            dev: "eth1",
            prev: Some(applied(&w1_moved, None, true)),
            want: Some(w1_prefix.clone()),
            now: Some(seen(3, &["10.0.1.50"], None)),
            remove: vec![],
            add: cat(&[
                &cmds(&["ip addr replace 10.0.1.51/24 dev eth1"]),
                &cmds(&eth1_routes),
                &rules(10001, &["10.0.1.51/32", "10.0.1.64/28"]),
            ]),
            routed: true,
        },
        Case {
            name: "ENI detached: the interface is gone, its rules and table go",
            dev: "eth1",
            prev: Some(applied(&w1_prefix, None, true)),
            want: None,
            now: None,
            remove: cmds(&[
                "ip rule del from 10.0.1.50/32 lookup 10001 priority 10001",
                "ip rule del from 10.0.1.51/32 lookup 10001 priority 10001",
                "ip rule del from 10.0.1.64/28 lookup 10001 priority 10001",
                "ip route flush table 10001",
            ]),
            add: vec![],
            routed: false,
        },
        Case {
            name: "ENI detaching (no longer listed, interface still there)",
            dev: "eth1",
            prev: Some(applied(&w1, None, true)),
            want: None,
            now: Some(seen(3, &["10.0.1.50", "10.0.1.51"], None)),
            remove: cmds(&[
                "ip rule del from 10.0.1.50/32 lookup 10001 priority 10001",
                "ip rule del from 10.0.1.51/32 lookup 10001 priority 10001",
                "ip route flush table 10001",
                "ip addr del 10.0.1.50/24 dev eth1",
                "ip addr del 10.0.1.51/24 dev eth1",
            ]),
            add: vec![],
            routed: false,
        },
        Case {
            name: "the primary ENI unlisted: DHCP's address stays",
            dev: "eth0",
            prev: Some(applied(&w0, Some(5), true)),
            want: None,
            now: Some(seen(2, &["10.0.1.10", "10.0.1.20", "10.0.1.21"], Some(5))),
            remove: cmds(&[
                "ip rule del from 10.0.1.10/32 lookup 10000 priority 10000",
                "ip rule del from 10.0.1.20/32 lookup 10000 priority 10000",
                "ip rule del from 10.0.1.21/32 lookup 10000 priority 10000",
                "ip route flush table 10000",
                "ip addr del 10.0.1.20/24 dev eth0",
                "ip addr del 10.0.1.21/24 dev eth0",
            ]),
            add: vec![],
            routed: false,
        },
        Case {
            name: "re-plugged under the same name (new ifindex): start afresh",
            dev: "eth1",
            prev: Some(applied(&want("eth1", 3, &m1), None, true)),
            want: Some(want("eth1", 7, &m1)),
            now: Some(seen(7, &[], None)),
            remove: cmds(&[
                "ip rule del from 10.0.1.50/32 lookup 10001 priority 10001",
                "ip rule del from 10.0.1.51/32 lookup 10001 priority 10001",
                "ip route flush table 10001",
            ]),
            add: cat(&[
                &cmds(&[
                    "ip route flush table 10001",
                    "ip link set dev eth1 up",
                    "ip addr replace 10.0.1.50/24 dev eth1",
                    "ip addr replace 10.0.1.51/24 dev eth1",
                ]),
                &cmds(&eth1_routes),
                &rules(10001, &["10.0.1.50/32", "10.0.1.51/32"]),
            ]),
            routed: true,
        },
        Case {
            name: "another device and card index: the table moves",
            dev: "eth1",
            prev: Some(applied(&w1, None, true)),
            want: Some(w1_dev2.clone()),
            now: Some(seen(3, &["10.0.1.50", "10.0.1.51"], None)),
            remove: cmds(&[
                "ip rule del from 10.0.1.50/32 lookup 10001 priority 10001",
                "ip rule del from 10.0.1.51/32 lookup 10001 priority 10001",
                "ip route flush table 10001",
            ]),
            add: cat(&[
                &cmds(&[
                    "ip route flush table 10102",
                    "ip link set dev eth1 up",
                    "ip addr replace 10.0.1.50/24 dev eth1",
                    "ip addr replace 10.0.1.51/24 dev eth1",
                    "ip route replace 10.0.1.0/24 dev eth1 src 10.0.1.50 table 10102",
                    "ip route replace default via 10.0.1.1 dev eth1 table 10102",
                ]),
                &rules(10102, &["10.0.1.50/32", "10.0.1.51/32"]),
            ]),
            routed: true,
        },
        Case {
            name: "an incomplete attempt is redone in full",
            dev: "eth1",
            prev: Some(Applied {
                complete: false,
                ..applied(&w1, None, true)
            }),
            want: Some(w1_moved.clone()),
            now: Some(seen(3, &["10.0.1.50", "10.0.1.51"], None)),
            remove: cmds(&[
                "ip rule del from 10.0.1.50/32 lookup 10001 priority 10001",
                "ip rule del from 10.0.1.51/32 lookup 10001 priority 10001",
                "ip route flush table 10001",
                "ip addr del 10.0.1.51/24 dev eth1",
            ]),
            add: cat(&[
                &cmds(&[
                    "ip route flush table 10001",
                    "ip link set dev eth1 up",
                    "ip addr replace 10.0.1.50/24 dev eth1",
                ]),
                &cmds(&eth1_routes),
                &rules(10001, &["10.0.1.50/32"]),
            ]),
            routed: true,
        },
        Case {
            name: "never an ENI: nothing",
            dev: "eth2",
            prev: None,
            want: None,
            now: Some(seen(9, &["192.0.2.1"], None)),
            remove: vec![],
            add: vec![],
            routed: false,
        },
    ];
    let mut failures = Vec::new();
    for c in &cases {
        let p = plan_iface(c.dev, c.prev.as_ref(), c.want.as_ref(), c.now.as_ref());
        assert_own_tables_only(&p);
        if shown(&p.remove) != c.remove || shown(&p.add) != c.add || p.routed != c.routed {
            failures.push(format!(
                "{}:\n  remove {:#?}\n  add {:#?}\n  routed {}",
                c.name,
                shown(&p.remove),
                shown(&p.add),
                p.routed
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_plan_applied_is_settled() {
    // Applying a plan and observing the result yields no further plan.
    let m1 = meta(MAC1, 1, 0, &["10.0.1.50", "10.0.1.51"]);
    let w = want("eth1", 3, &m1);
    let before = seen(3, &[], Some(1));
    let p = plan_iface("eth1", None, Some(&w), Some(&before));
    assert!(!p.is_empty());
    let a = Applied {
        want: w.clone(),
        lease: before.lease,
        routed: p.routed,
        complete: true,
    };
    let after = seen(3, &["10.0.1.50", "10.0.1.51"], Some(1));
    assert!(plan_iface("eth1", Some(&a), Some(&w), Some(&after)).is_empty());
}

#[test]
fn desired_matches_interfaces_to_enis() {
    let metas = vec![
        meta(MAC0, 0, 0, &["10.0.1.10"]),
        meta(&MAC1.to_uppercase(), 2, 1, &["10.0.1.50"]),
        meta("02:e1:00:00:00:99", 1, 0, &["10.0.1.99"]),
        // Unusable: no address, an index past the numbering.
        meta("02:e1:00:00:00:12", 3, 0, &[]),
        meta("02:e1:00:00:00:13", 100, 0, &["10.0.1.13"]),
    ];
    let ifaces = vec![
        iface("eth0", MAC0, 2),
        iface("eth1", MAC1, 3),
        iface("eth2", "02:e1:00:00:00:12", 4),
        iface("eth3", "02:e1:00:00:00:13", 5),
        iface("eth4", "52:54:00:12:34:56", 6),
    ];
    let d = desired(&ifaces, &metas);
    assert_eq!(d.keys().collect::<Vec<_>>(), ["eth0", "eth1"]);
    assert!(d["eth0"].primary);
    assert_eq!(d["eth0"].table, 10_000);
    assert!(d["eth0"].own_addrs().is_empty());
    assert!(!d["eth1"].primary);
    assert_eq!(d["eth1"].table, 10_102);
    assert_eq!(d["eth1"].own_addrs(), [ip("10.0.1.50")]);
    assert_eq!(table_of(7, 99), Some(10_799));
    assert_eq!(table_of(0, 100), None);
    let mut odd = meta(MAC0, 0, 0, &["10.0.1.10"]);
    odd.subnet = net("10.0.1.77/24");
    assert_eq!(want("eth0", 2, &odd).subnet, net("10.0.1.0/24"));
}

#[test]
fn parsing_metadata_values() {
    assert_eq!(
        parse_macs("02:e1:00:00:00:10/\n02:E1:00:00:00:11/\nnot-a-mac/\n02:e1:00:00:00/\n\n"),
        [MAC0, MAC1]
    );
    let m = parse_eni(
        MAC1,
        "1",
        "0",
        "10.0.1.50\n10.0.1.51",
        "10.0.1.0/24",
        Some("10.0.1.64/28"),
    )
    .unwrap();
    assert_eq!(m.ips, [ip("10.0.1.50"), ip("10.0.1.51")]);
    assert_eq!(m.prefixes, [net("10.0.1.64/28")]);
    assert_eq!((m.device, m.card), (1, 0));
    for (dev, card, ips, subnet) in [
        ("x", "0", "10.0.1.5", "10.0.1.0/24"),
        ("1", "-1", "10.0.1.5", "10.0.1.0/24"),
        ("1", "0", "10.0.1.500", "10.0.1.0/24"),
        ("1", "0", "10.0.1.5", "10.0.1.0/33"),
        ("1", "0", "10.0.1.5", "10.0.1.0"),
        ("99999999999", "0", "10.0.1.5", "10.0.1.0/24"),
    ] {
        assert_eq!(
            parse_eni(MAC1, dev, card, ips, subnet, None),
            None,
            "{dev} {card} {ips} {subnet}"
        );
    }
    assert_eq!(
        parse_eni(MAC1, "1", "0", "10.0.1.5", "10.0.1.0/24", Some("junk")),
        None
    );
    assert_eq!(net("10.0.1.77/24").router(), ip("10.0.1.1"));
    assert_eq!(net("10.0.16.0/20").router(), ip("10.0.16.1"));
    assert_eq!(Net::parse("1.2.3.4/"), None);
    assert_eq!(Net::parse("1.2.3.4/+1"), None);
}

#[test]
fn stale_rules_are_ours_only() {
    let listing = "0:\tfrom all lookup local\n\
                   10000:\tfrom 10.0.1.10 lookup 10000\n\
                   10001:\tfrom 10.0.1.64/28 lookup 10001\n\
                   20000:\tfrom 10.9.9.9 lookup 20000\n\
                   32766:\tfrom all lookup main\n\
                   32767:\tfrom all lookup default\n\
                   garbage\n";
    assert_eq!(
        shown(&stale_rules(listing)),
        [
            "ip rule del from 10.0.1.10 lookup 10000 priority 10000",
            "ip rule del from 10.0.1.64/28 lookup 10001 priority 10001",
        ]
    );
}

#[test]
fn fetch_reads_only_local_enis_and_keeps_failures_apart() {
    use crate::imds::tests::fake;
    const BASE: &str = "/latest/meta-data/network/interfaces/macs/";
    let (addr, log) = fake(|m, p, _| {
        if m == "PUT" {
            return (200, "t".into());
        }
        let Some(rest) = p.strip_prefix(BASE) else {
            return (404, String::new());
        };
        let body = match rest {
            "" => format!("{MAC0}/\n{MAC1}/\n02:e1:00:00:00:99/"),
            r if r.starts_with(MAC1) => return (500, String::new()),
            r => match r.rsplit('/').next().unwrap_or("") {
                "device-number" | "network-card" => "0".into(),
                "local-ipv4s" => "10.0.1.10\n10.0.1.20".into(),
                "subnet-ipv4-cidr-block" => "10.0.1.0/24".into(),
                _ => return (404, String::new()),
            },
        };
        (200, body)
    });
    let mut c = Client::new(addr, Duration::from_secs(2));
    let local = [
        MAC0.to_string(),
        MAC1.to_string(),
        "02:e1:00:00:00:42".to_string(),
    ];
    let f = fetch(&mut c, &local).unwrap();
    assert_eq!(f.metas.len(), 1);
    assert_eq!(f.metas[0].ips, [ip("10.0.1.10"), ip("10.0.1.20")]);
    assert!(f.metas[0].prefixes.is_empty());
    assert_eq!(f.failed.iter().collect::<Vec<_>>(), [MAC1]);
    let log = log.lock().unwrap();
    assert!(
        !log.iter()
            .any(|(l, _)| l.contains("00:00:00:99") || l.contains("00:00:00:42")),
        "asked about an ENI that is not ours: {log:?}"
    );
    drop(log);
    // No listing at all is an error, not "no ENIs".
    let (addr, _) = fake(|_, _, _| (404, String::new()));
    let mut c = Client::new(addr, Duration::from_secs(2));
    assert!(fetch(&mut c, &local).is_err());
}

#[test]
fn reads_interfaces_and_addresses() {
    let dir = std::env::temp_dir().join(format!("enilab-agent-eni-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    for (n, mac, i) in [
        ("lo", "00:00:00:00:00:00", 1),
        ("eth0", "02:E1:00:00:00:10", 2),
        ("eth1", "x", 3),
    ] {
        fs::create_dir_all(dir.join(n)).unwrap();
        fs::write(dir.join(n).join("address"), format!("{mac}\n")).unwrap();
        fs::write(dir.join(n).join("ifindex"), format!("{i}\n")).unwrap();
    }
    fs::create_dir_all(dir.join("eth2")).unwrap();
    let got = interfaces(&dir);
    assert_eq!(got, [iface("eth0", MAC0, 2), iface("eth1", "x", 3)]);
    fs::remove_dir_all(&dir).unwrap();
    // Every Linux host has loopback's address.
    assert!(ipv4_addrs()
        .get("lo")
        .is_some_and(|a| a.contains(&Ipv4Addr::LOCALHOST)));
}

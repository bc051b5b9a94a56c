//! The planner as a table of scenarios, plus the parsers and the metadata
//! reads against a fake service.

use super::*;
use std::process::Command;

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

/// A network namespace of this test process, deleted on drop (even when
/// an assertion fails).
struct TestNs(String);

impl TestNs {
    fn new(tag: &str) -> Option<TestNs> {
        let name = format!("enilab-agent-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            if std::env::var("ENILAB_REQUIRE_GUESTS").as_deref() == Ok("1") {
                panic!("cannot create a network namespace and ENILAB_REQUIRE_GUESTS=1");
            }
            eprintln!("SKIPPED: the plan test needs root to create a network namespace");
            return None;
        }
        Some(TestNs(name))
    }

    /// `ip -n NS args`; its stdout, or a failure.
    fn ip(&self, args: &[String]) -> Result<String, String> {
        let o = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }

    fn sh(&self, args: &str) -> String {
        let a: Vec<String> = args.split_whitespace().map(String::from).collect();
        self.ip(&a).unwrap_or_else(|e| panic!("ip {args}: {e}"))
    }

    /// Run a plan as `watch` does: removals, then additions; a failure of
    /// anything but a removal fails the test.
    fn apply(&self, p: &Plan) {
        for c in p.remove.iter().chain(&p.add) {
            if let Err(e) = self.ip(&c.0) {
                assert!(c.tolerant(), "{c}: {e}");
            }
        }
    }

    fn observe(&self, dev: &str) -> Option<Observed> {
        let idx = self
            .ip(&["-o".into(), "link".into(), "show".into(), dev.into()])
            .ok()?;
        let ifindex = idx.split(':').next()?.trim().parse().ok()?;
        let out = self.sh(&format!("-o -4 addr show dev {dev}"));
        let addrs = out
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let i = w.iter().position(|x| *x == "inet")?;
                w.get(i + 1)?.split('/').next()?.parse().ok()
            })
            .collect();
        Some(Observed {
            ifindex,
            addrs,
            lease: None,
        })
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Step through a plan, apply it, and return what was applied.
fn step(ns: &TestNs, dev: &str, prev: Option<&Applied>, want: Option<&Desired>) -> Option<Applied> {
    let now = ns.observe(dev);
    let p = plan_iface(dev, prev, want, now.as_ref());
    ns.apply(&p);
    want.map(|w| Applied {
        want: w.clone(),
        lease: now.and_then(|o| o.lease),
        routed: p.routed,
        complete: true,
    })
}

#[test]
fn plans_apply_cleanly_to_a_real_kernel() {
    let Some(ns) = TestNs::new("plan") else {
        return;
    };
    ns.sh("link set dev lo up");
    // eth0 as DHCP leaves it; eth1 hot-plugged, down and bare.
    // veth pairs (dummy may be missing); the peers' ends up for carrier.
    ns.sh("link add eth0 type veth peer name peer0");
    ns.sh("link set dev peer0 up");
    ns.sh("link set dev eth0 up");
    ns.sh("addr add 10.0.1.10/24 dev eth0");
    ns.sh("route add default via 10.0.1.1 dev eth0");
    ns.sh("link add eth1 type veth peer name peer1");
    ns.sh("link set dev peer1 up");

    let idx = |d: &str| ns.observe(d).unwrap().ifindex;
    let m0 = meta(MAC0, 0, 0, &["10.0.1.10", "10.0.1.20"]);
    let w0 = want("eth0", idx("eth0"), &m0);
    let m1 = meta(MAC1, 1, 0, &["10.0.1.50", "10.0.1.51"]);
    let w1 = want("eth1", idx("eth1"), &m1);
    let a0 = step(&ns, "eth0", None, Some(&w0));
    let a1 = step(&ns, "eth1", None, Some(&w1));

    let rules = ns.sh("-4 rule show");
    for r in [
        "10000:\tfrom 10.0.1.10 lookup 10000",
        "10000:\tfrom 10.0.1.20 lookup 10000",
        "10001:\tfrom 10.0.1.50 lookup 10001",
        "10001:\tfrom 10.0.1.51 lookup 10001",
    ] {
        assert_eq!(rules.matches(r).count(), 1, "{r} in\n{rules}");
    }
    let t1 = ns.sh("-4 route show table 10001");
    assert!(t1.contains("default via 10.0.1.1 dev eth1"), "{t1}");
    assert!(
        t1.contains("10.0.1.0/24 dev eth1 scope link src 10.0.1.50"),
        "{t1}"
    );
    let t0 = ns.sh("-4 route show table 10000");
    assert!(t0.contains("default via 10.0.1.1 dev eth0"), "{t0}");
    // The main table keeps eth0's default route only.
    let main = ns.sh("-4 route show table main");
    assert_eq!(main.matches("default").count(), 1, "{main}");
    assert!(main.contains("default via 10.0.1.1 dev eth0"), "{main}");
    // A packet from eth1's secondary address leaves through eth1.
    let r = ns.sh("-4 route get 192.0.2.9 from 10.0.1.51");
    assert!(r.contains("dev eth1"), "{r}");
    let r = ns.sh("-4 route get 192.0.2.9 from 10.0.1.20");
    assert!(r.contains("dev eth0"), "{r}");
    // Settled: the same inputs plan nothing.
    let now1 = ns.observe("eth1");
    assert!(plan_iface("eth1", a1.as_ref(), Some(&w1), now1.as_ref()).is_empty());

    // Applying twice (an agent restart: no memory) doubles nothing.
    step(&ns, "eth1", None, Some(&w1));
    let rules = ns.sh("-4 rule show");
    assert_eq!(
        rules.matches("from 10.0.1.51 lookup 10001").count(),
        1,
        "{rules}"
    );

    // The secondary moves from eth1 to eth0.
    let w1b = want("eth1", idx("eth1"), &meta(MAC1, 1, 0, &["10.0.1.50"]));
    let w0b = want(
        "eth0",
        idx("eth0"),
        &meta(MAC0, 0, 0, &["10.0.1.10", "10.0.1.20", "10.0.1.51"]),
    );
    let a1 = step(&ns, "eth1", a1.as_ref(), Some(&w1b));
    step(&ns, "eth0", a0.as_ref(), Some(&w0b));
    let r = ns.sh("-4 route get 192.0.2.9 from 10.0.1.51");
    assert!(r.contains("dev eth0"), "{r}");
    assert!(!ns.observe("eth1").unwrap().addrs.contains(&ip("10.0.1.51")));
    assert!(
        ns.observe("eth1").unwrap().addrs.contains(&ip("10.0.1.50")),
        "promoted"
    );

    // eth1 detached: the interface goes, then its rules and table.
    ns.sh("link del eth1");
    step(&ns, "eth1", a1.as_ref(), None);
    let rules = ns.sh("-4 rule show");
    assert!(!rules.contains("lookup 10001"), "{rules}");
    assert!(ns.sh("-4 route show table 10001").trim().is_empty());
    assert_eq!(
        ns.sh("-4 route show table main").matches("default").count(),
        1
    );
    assert!(ns
        .sh("-4 route show table main")
        .contains("default via 10.0.1.1 dev eth0"));
    // What a restarted agent would sweep: only the rules of our range.
    let stale = stale_rules(&ns.sh("-4 rule show"));
    assert_eq!(stale.len(), 3, "{stale:?}");
    for c in &stale {
        ns.ip(&c.0).unwrap();
    }
    let rules = ns.sh("-4 rule show");
    assert!(!rules.contains("lookup 100"), "{rules}");
    assert!(rules.contains("lookup main"), "{rules}");
}

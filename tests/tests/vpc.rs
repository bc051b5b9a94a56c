//! Real-guest VPC policy scenarios: security groups, network ACLs, the
//! source/destination check, a guest acting as a router, Elastic IPs through
//! the internet gateway (a network namespace this test creates), and flow
//! logs. One parameterised function per scenario, thin `#[test]` wrappers;
//! the harness is `enilab_tests`.
//!
//! Run with `cargo test -p enilab-tests --test vpc -- --test-threads=1`.
//! Only 10.x VPC addresses, 203.0.113.0/24 (TEST-NET-3, inside the test's
//! own namespace) and loopback are ever addressed.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use enilab_switch::policy::*;
use enilab_switch::{DropReason, VpcConfig};
use enilab_tests::*;

const BUDGET: Duration = Duration::from_secs(200);
const SHORT: Duration = Duration::from_secs(30);
const VPC: &str = "vpc-test";

fn rule(proto: Protocol, lo: i32, hi: i32, cidr: &str) -> SgRule {
    SgRule {
        protocol: proto,
        ports: PortMatch::from_aws(proto, lo, hi).expect("rule ports"),
        peer: Peer::Cidr(cidr.parse().expect("rule CIDR")),
    }
}

fn group(id: &str, ingress: Vec<SgRule>) -> SecurityGroupConfig {
    SecurityGroupConfig {
        id: id.into(),
        vpc_id: VPC.into(),
        ingress,
        egress: vec![rule(Protocol::All, -1, -1, "0.0.0.0/0")],
    }
}

/// Serve "port N" over HTTP on each port with busybox httpd.
fn serve_http(g: &Guest, ports: &[u16]) {
    let mut script = String::new();
    for p in ports {
        script.push_str(&format!(
            "mkdir -p /tmp/www{p} && echo port{p} > /tmp/www{p}/index.html && httpd -p {p} -h /tmp/www{p} && "
        ));
    }
    script.push_str("true");
    g.sh_ok(&script, SHORT);
}

/// An HTTP GET from a guest with busybox nc (its wget crashes in this
/// static build) and a 3 s connect timeout: Ok(body) or Err(why).
fn fetch(from: &Guest, ip: Ipv4Addr, port: u16) -> Result<String, String> {
    let out = from.sh(
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} {port}"),
        Duration::from_secs(20),
    );
    let text = out.stdout_str();
    match text.split("\r\n\r\n").nth(1) {
        Some(body) if out.success() => Ok(body.trim().to_string()),
        _ => Err(format!(
            "exit {} {:?} {}",
            out.code,
            text,
            out.stderr_str().trim()
        )),
    }
}

fn drops(lab: &TestLab, g: &Guest, reason: DropReason) -> u64 {
    lab.switch().stats(g.port).drops(reason)
}

fn subnet(lab: &TestLab, name: &str, third: u8) -> usize {
    lab.add_subnet(
        &format!("subnet-{name}"),
        VPC,
        Ipv4Addr::new(10, 0, third, 0),
        24,
    )
    .unwrap_or_else(|e| panic!("subnet {name}: {e}"))
}

// ---------------------------------------------------------------------------
// Security groups
// ---------------------------------------------------------------------------

fn _test_security_group(open_later: bool) {
    let Some(env) = require_guests() else { return };
    let lab = TestLab::with_guests(&env, "vpc-sg", BUDGET);
    let s = subnet(&lab, "sg", 1);
    let g = lab.boot(s, &[GuestSpec::new("client"), GuestSpec::new("server")]);
    let (client, server) = (&g[0], &g[1]);
    serve_http(server, &[80, 81]);
    lab.update_policy(|p| {
        p.security_groups = vec![
            group("sg-web", vec![rule(Protocol::TCP, 80, 80, "0.0.0.0/0")]),
            group("sg-client", vec![]),
        ];
    })
    .expect("publish groups");
    lab.set_eni_groups(&server.eni, &["sg-web"])
        .expect("server groups");
    lab.set_eni_groups(&client.eni, &["sg-client"])
        .expect("client groups");

    lab.step("tcp/80 is open, tcp/81 is filtered");
    assert_eq!(fetch(client, server.ip, 80).as_deref(), Ok("port80"));
    let before = drops(&lab, server, DropReason::SecurityGroup);
    let r = fetch(client, server.ip, 81);
    assert!(r.is_err(), "port 81 must be filtered, got {r:?}");
    let after = drops(&lab, server, DropReason::SecurityGroup);
    assert!(
        after > before,
        "the refused SYNs are counted on the server ({before} -> {after})"
    );
    let (ct, per_port) = lab.switch().conntrack_census();
    lab.step(format!(
        "tracked flows: {} (server port {})",
        ct.tracked, per_port[server.port as usize]
    ));
    assert!(
        per_port[server.port as usize] >= 1,
        "the port-80 connection is tracked"
    );

    if open_later {
        lab.step("authorize tcp/81: a rule change takes effect at once");
        lab.update_policy(|p| {
            p.security_groups[0].ingress.push(rule(
                Protocol::TCP,
                81,
                81,
                &format!("{}/32", client.ip),
            ));
        })
        .expect("publish the new rule");
        assert_eq!(fetch(client, server.ip, 81).as_deref(), Ok("port81"));
        // The server's reply path needs no egress rule of its own beyond
        // tracking; and the client, with no ingress rule, gets its answers.
    }
}

#[test]
fn test_security_group_port_open_and_filtered() {
    _test_security_group(false);
}

#[test]
fn test_security_group_rule_added_live() {
    _test_security_group(true);
}

// ---------------------------------------------------------------------------
// Network ACLs
// ---------------------------------------------------------------------------

fn _test_nacl(denied: u16) {
    let Some(env) = require_guests() else { return };
    let lab = TestLab::with_guests(&env, "vpc-nacl", BUDGET);
    let a = subnet(&lab, "a", 1);
    let b = subnet(&lab, "b", 2);
    let g = lab.boot_each(&[(a, GuestSpec::new("client")), (b, GuestSpec::new("server"))]);
    let (client, server) = (&g[0], &g[1]);
    serve_http(server, &[80, denied]);
    let entry = |number, proto, lo, hi, allow| AclEntry {
        number,
        protocol: proto,
        ports: PortMatch::from_aws(proto, lo, hi).expect("acl ports"),
        cidr: Cidr::ANY,
        allow,
    };
    lab.update_policy(|p| {
        p.network_acls = vec![NetworkAclConfig {
            id: "acl-b".into(),
            vpc_id: VPC.into(),
            ingress: vec![
                entry(
                    100,
                    Protocol::TCP,
                    i32::from(denied),
                    i32::from(denied),
                    false,
                ),
                entry(200, Protocol::All, -1, -1, true),
            ],
            egress: vec![entry(100, Protocol::All, -1, -1, true)],
        }];
    })
    .expect("publish ACL");
    lab.set_subnet_policy(b, None, Some("acl-b".into()))
        .expect("associate ACL");

    lab.step(format!(
        "ACL rule 100 denies tcp/{denied} into subnet b; rule 200 allows the rest"
    ));
    assert_eq!(fetch(client, server.ip, 80).as_deref(), Ok("port80"));
    let before = drops(&lab, server, DropReason::Nacl);
    let r = fetch(client, server.ip, denied);
    assert!(r.is_err(), "tcp/{denied} must be denied, got {r:?}");
    assert!(
        drops(&lab, server, DropReason::Nacl) > before,
        "NACL drops counted on the server"
    );
    let p = client.ping(server.ip, 3);
    assert_eq!(p.received, 3, "ICMP is allowed by rule 200: {p:?}");
}

#[test]
fn test_nacl_deny() {
    _test_nacl(8080);
}

// ---------------------------------------------------------------------------
// Source/destination check
// ---------------------------------------------------------------------------

fn _test_spoofed_source(spoofed: Ipv4Addr) {
    let Some(env) = require_guests() else { return };
    let lab = TestLab::with_guests(&env, "vpc-spoof", BUDGET);
    let s = subnet(&lab, "spoof", 1);
    let g = lab.boot(s, &[GuestSpec::new("a"), GuestSpec::new("b")]);
    let (a, b) = (&g[0], &g[1]);
    assert_eq!(a.ping(b.ip, 3).received, 3, "the real address works");
    a.sh_ok(&format!("ip addr add {spoofed}/24 dev eth0"), SHORT);
    let before = drops(&lab, a, DropReason::SourceCheck);
    lab.step(format!("ping from the unassigned address {spoofed}"));
    let out = a.sh(&format!("ping -c 3 -W 2 -I {spoofed} {}", b.ip), SHORT);
    let got = parse_ping(&out.stdout_str()).map(|p| p.received);
    assert_eq!(
        got,
        Some(0),
        "spoofed pings must not be answered:\n{}",
        out.stdout_str()
    );
    let after = drops(&lab, a, DropReason::SourceCheck);
    assert!(
        after >= before + 3,
        "source-check drops counted on a ({before} -> {after})"
    );

    lab.step("the same address assigned as a secondary IP passes");
    lab.add_secondary_ip(&a.eni, spoofed)
        .expect("assign secondary");
    let out = a.sh(&format!("ping -c 3 -W 2 -I {spoofed} {}", b.ip), SHORT);
    assert_eq!(
        parse_ping(&out.stdout_str()).map(|p| p.received),
        Some(3),
        "{}",
        out.stdout_str()
    );
}

#[test]
fn test_spoofed_source_is_dropped() {
    _test_spoofed_source(Ipv4Addr::new(10, 0, 1, 200));
}

fn _test_router(count: u32) {
    let Some(env) = require_guests() else { return };
    let lab = TestLab::with_guests(&env, "vpc-router", BUDGET);
    let a = subnet(&lab, "a", 1);
    let b = subnet(&lab, "b", 2);
    let c = subnet(&lab, "c", 3);
    let g = lab.boot_each(&[
        (a, GuestSpec::new("client")),
        (b, GuestSpec::new("server")),
        (c, GuestSpec::new("router")),
    ]);
    let (client, server, router) = (&g[0], &g[1], &g[2]);
    router.sh_ok(
        "echo 1 > /proc/sys/net/ipv4/ip_forward && \
         echo 0 > /proc/sys/net/ipv4/conf/all/send_redirects && \
         echo 0 > /proc/sys/net/ipv4/conf/eth0/send_redirects",
        SHORT,
    );
    lab.update_policy(|p| {
        p.route_tables = vec![RouteTableConfig {
            id: "rtb-a".into(),
            vpc_id: VPC.into(),
            routes: vec![Route {
                destination: "10.0.2.0/24".parse().expect("cidr"),
                target: RouteTarget::Eni(router.eni.clone()),
            }],
        }];
    })
    .expect("route table");
    lab.set_subnet_policy(a, Some("rtb-a".into()), None)
        .expect("associate");

    lab.step("check on: the router's ENI refuses traffic not addressed to it");
    let before = drops(&lab, router, DropReason::SourceCheck);
    let p = client.ping(server.ip, count);
    assert_eq!(p.received, 0, "{p:?}");
    assert!(drops(&lab, router, DropReason::SourceCheck) >= before + u64::from(count));

    lab.step("check off: the guest routes client -> server");
    lab.set_source_dest_check(&router.eni, false)
        .expect("check off");
    let tx_before = lab.switch().stats(router.port).tx_packets;
    let p = client.ping(server.ip, count);
    assert_eq!(p.received, count, "{p:?}\n{}", router.net_diagnostics());
    let forwarded = lab.switch().stats(router.port).tx_packets - tx_before;
    assert!(
        forwarded >= u64::from(count),
        "the requests went through the router ({forwarded} frames)"
    );
    let fwd = router.sh_ok("cat /proc/net/snmp | grep '^Ip:' | tail -n 1", SHORT);
    lab.step(format!("router Ip counters: {fwd}"));
}

#[test]
fn test_guest_routes_with_check_off() {
    _test_router(5);
}

// ---------------------------------------------------------------------------
// Elastic IPs through the internet gateway
// ---------------------------------------------------------------------------

fn _test_elastic_ip(eip: Ipv4Addr) {
    let Some(env) = require_guests() else { return };
    let lab = TestLab::with_guests(&env, "vpc-eip", BUDGET);
    let s = subnet(&lab, "pub", 1);
    let g = lab.boot(s, &[GuestSpec::new("web")]);
    let web = &g[0];
    let inet = lab.add_internet().expect("internet namespace");
    serve_http(web, &[80, 81]);
    lab.update_policy(|p| {
        p.vpcs = vec![VpcConfig {
            id: VPC.into(),
            cidrs: vec!["10.0.0.0/16".parse().expect("cidr")],
            internet_gateway: Some("igw-test".into()),
            main_route_table: Some("rtb-main".into()),
        }];
        p.route_tables = vec![RouteTableConfig {
            id: "rtb-main".into(),
            vpc_id: VPC.into(),
            routes: vec![Route {
                destination: Cidr::ANY,
                target: RouteTarget::InternetGateway("igw-test".into()),
            }],
        }];
        p.security_groups = vec![group(
            "sg-web",
            vec![rule(Protocol::TCP, 80, 80, "0.0.0.0/0")],
        )];
        p.elastic_ips = vec![ElasticIp {
            public_ip: eip,
            vpc_id: VPC.into(),
            private_ip: web.ip,
        }];
    })
    .expect("publish IGW and EIP");
    lab.set_eni_groups(&web.eni, &["sg-web"]).expect("groups");

    lab.step(format!("internet ({}) -> {eip}:80", inet.addr()));
    let get = |port: u16| {
        let script = format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | socat -T 5 - TCP:{eip}:{port},connect-timeout=3"
        );
        inet.exec(&["sh", "-c", &script], Duration::from_secs(20))
    };
    let out = get(80).unwrap_or_else(|e| panic!("GET through the EIP: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && text.ends_with("port80\n"),
        "GET through the EIP: {text:?} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        web.net_diagnostics()
    );

    lab.step("instance -> internet: the server sees the Elastic IP as the source");
    let server = inet
        .spawn(
            &[
                "socat",
                "TCP-LISTEN:8080,reuseaddr,fork",
                "SYSTEM:echo $SOCAT_PEERADDR",
            ],
            std::process::Stdio::null(),
            std::process::Stdio::null(),
        )
        .expect("socat in the namespace");
    let mut seen = String::new();
    let ok = wait_until(Duration::from_secs(20), || {
        let out = web.sh(&format!("nc -w 3 {} 8080 </dev/null", inet.addr()), SHORT);
        seen = out.stdout_str().trim().to_string();
        !seen.is_empty()
    });
    drop(server);
    assert!(ok, "no answer from the internet server");
    assert_eq!(
        seen,
        eip.to_string(),
        "source address as the internet sees it"
    );

    lab.step("a closed port stays closed from the internet");
    let before = drops(&lab, web, DropReason::SecurityGroup);
    let closed = get(81).expect("socat runs");
    assert!(!closed.status.success(), "port 81 answered through the EIP");
    assert!(drops(&lab, web, DropReason::SecurityGroup) > before);
}

#[test]
fn test_internet_reaches_instance_through_elastic_ip() {
    _test_elastic_ip(Ipv4Addr::new(203, 0, 113, 10));
}

// ---------------------------------------------------------------------------
// Flow logs
// ---------------------------------------------------------------------------

fn records(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

fn _test_flow_logs(interval: u32) {
    let Some(env) = require_guests() else { return };
    let lab = TestLab::with_guests(&env, "vpc-flowlog", BUDGET);
    let s = subnet(&lab, "fl", 1);
    let g = lab.boot(s, &[GuestSpec::new("client"), GuestSpec::new("server")]);
    let (client, server) = (&g[0], &g[1]);
    serve_http(server, &[80, 81]);
    let path = lab.root().join("flowlog-server.log");
    lab.update_policy(|p| {
        p.security_groups = vec![group(
            "sg-web",
            vec![rule(Protocol::TCP, 80, 80, "0.0.0.0/0")],
        )];
        p.flow_logs = vec![FlowLogConfig {
            id: "fl-test".into(),
            scope: FlowLogScope::Eni(server.eni.clone()),
            traffic: TrafficType::All,
            interval_secs: interval,
            path: path.clone(),
            account_id: "123456789012".into(),
        }];
    })
    .expect("flow log");
    lab.set_eni_groups(&server.eni, &["sg-web"])
        .expect("groups");

    lab.step("one accepted and one rejected connection");
    assert_eq!(fetch(client, server.ip, 80).as_deref(), Ok("port80"));
    assert!(fetch(client, server.ip, 81).is_err());
    let refused = drops(&lab, server, DropReason::SecurityGroup);

    lab.step("waiting for the aggregation window to close");
    let (cip, sip) = (client.ip.to_string(), server.ip.to_string());
    let want = |r: &[String], dport: &str, action: &str| {
        r.len() == 14
            && r[3] == cip
            && r[4] == sip
            && r[6] == dport
            && r[12] == action
            && r[13] == "OK"
    };
    let ok = wait_until(Duration::from_secs(u64::from(interval) + 15), || {
        let recs = records(&path);
        // The SYN retries may fall in later windows: wait until every
        // refused packet has been written (or time out and report).
        let rejected: u64 = recs
            .iter()
            .filter(|r| want(r, "81", "REJECT"))
            .filter_map(|r| r[8].parse::<u64>().ok())
            .sum();
        recs.iter().any(|r| want(r, "80", "ACCEPT")) && rejected >= refused
    });
    let recs = records(&path);
    assert!(ok, "flow log records:\n{recs:?}");
    for r in &recs {
        assert_eq!(r[0], "2");
        assert_eq!(r[1], "123456789012");
        assert_eq!(r[2], server.eni);
    }
    let rejected: u64 = recs
        .iter()
        .filter(|r| want(r, "81", "REJECT"))
        .map(|r| r[8].parse::<u64>().expect("packets"))
        .sum();
    lab.step(format!(
        "REJECT records count {rejected} packets; the switch refused {refused}"
    ));
    assert_eq!(rejected, refused, "every refused SYN is in the log, once");
    let reply_bytes: u64 = recs
        .iter()
        .filter(|r| r[3] == sip && r[5] == "80" && r[12] == "ACCEPT")
        .map(|r| r[9].parse::<u64>().expect("bytes"))
        .sum();
    assert!(reply_bytes > 100, "the HTTP answer is in the log: {recs:?}");
}

#[test]
fn test_flow_log_records_accept_and_reject() {
    _test_flow_logs(2);
}

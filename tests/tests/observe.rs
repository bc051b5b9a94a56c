//! Seeing what the lab does: `/metrics` checked with the reference
//! Prometheus parser, `enilab capture` read back by tshark. One
//! parameterised function per scenario, thin `#[test]` wrappers.
//!
//! Run with `cargo test -p enilab-tests --test observe -- --test-threads=1`
//! (after `cargo build -p enilab-control`). The recording-daemon scenarios
//! need python3 with prometheus_client (skipped without it unless
//! ENILAB_REQUIRE_API=1); the guest scenario needs QEMU, the image and
//! tshark (ENILAB_REQUIRE_GUESTS=1 makes their absence a failure).

use std::process::{Command, Stdio};
use std::time::Duration;

use enilab_tests::*;

const BUDGET: Duration = Duration::from_secs(300);
const BOOT: Duration = Duration::from_secs(120);
const SHORT: Duration = Duration::from_secs(30);

fn record_daemon(tag: &str) -> Option<ApiDaemon> {
    let bin = require(REQUIRE_API, enilab_bin())?;
    Some(ApiDaemon::start(bin, tag, BUDGET, &["--driver", "record"]))
}

fn metrics(d: &ApiDaemon, python: &std::path::Path) -> serde_json::Value {
    let (status, body) = http_get(d.addr(), "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("utf-8 exposition");
    prometheus_parse(python, &text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A status document with every datapath part, rendered and parsed.
fn scenario_fixture_parses() {
    let Some(python) = require(REQUIRE_API, python_with("prometheus_client")) else {
        return;
    };
    let status = serde_json::json!({
        "instances": [{"id": "i-1", "state": "running"}],
        "enis": [{"id": "eni-1"}],
        "driver": {
            "devices": [{"eni": "eni-1", "instance": "i-\"quoted\"\nline", "card": 0,
                         "stats": {"rx_packets": 3, "tx_packets": 4, "rx_bytes": 300, "tx_bytes": 400,
                                   "new_flows": 1, "drops": {"no_route": 2, "nacl": 0}}}],
            "cards": [{"card": 0, "workers": 1, "forwarded": 7, "dropped": 1, "wakeups": 5}],
            "hyperplane": {"nodes": [{"node": 1, "running": true, "flows": 9, "own_flows": 4,
                                      "replication_lag": 2, "port_allocation_failures": 1,
                                      "drops": {"no_owner": 6}}]}
        }
    });
    let text = enilab_control::api::metrics::render(&status);
    let fams = prometheus_parse(&python, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);
    let cases: [Case; 8] = [
        (
            "enilab_eni_rx_packets_total",
            &[("eni", "eni-1"), ("instance", "i-\"quoted\"\nline")],
            3.0,
        ),
        ("enilab_eni_tx_bytes_total", &[("eni", "eni-1")], 400.0),
        (
            "enilab_eni_drops_total",
            &[("eni", "eni-1"), ("reason", "no_route")],
            2.0,
        ),
        ("enilab_card_forwarded_total", &[("card", "0")], 7.0),
        ("enilab_hyperplane_own_flows", &[("node", "1")], 4.0),
        ("enilab_hyperplane_replication_lag", &[("node", "1")], 2.0),
        (
            "enilab_hyperplane_drops_total",
            &[("node", "1"), ("reason", "no_owner")],
            6.0,
        ),
        ("enilab_instances", &[("state", "running")], 1.0),
    ];
    for (name, labels, want) in cases {
        assert_eq!(
            sample_value(&fams, name, labels),
            Some(want),
            "{name} {labels:?}\n{text}"
        );
    }
    for f in fams.as_array().expect("families") {
        assert!(!f["help"].as_str().unwrap_or("").is_empty(), "{f}");
        assert!(f["type"] == "counter" || f["type"] == "gauge", "{f}");
    }
}

/// API requests are counted by action and status; the state's instances
/// appear; a capture on a daemon without datapath is refused clearly.
fn scenario_recording_daemon() {
    let Some(python) = require(REQUIRE_API, python_with("prometheus_client")) else {
        return;
    };
    let Some(d) = record_daemon("metrics") else {
        return;
    };
    let before = metrics(&d, &python);
    assert_eq!(
        sample_value(
            &before,
            "enilab_api_requests_total",
            &[("action", "CreateVpc")]
        ),
        None
    );
    let vpc = d.get("CreateVpc", &[("CidrBlock", "10.0.0.0/16")], "vpcId");
    d.get("CreateVpc", &[("CidrBlock", "10.1.0.0/16")], "vpcId");
    let subnet = d.get(
        "CreateSubnet",
        &[("VpcId", &vpc), ("CidrBlock", "10.0.1.0/24")],
        "subnetId",
    );
    assert!(d.call("NoSuchAction", &[]).is_err());
    let xml = d.ok(
        "RunInstances",
        &[
            ("ImageId", "ami-0e1ab000000000001"),
            ("InstanceType", "t3.micro"),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("SubnetId", &subnet),
        ],
    );
    let eni = extract_all(&xml, "networkInterfaceId")[0].to_string();
    d.wait("running", SHORT, || {
        let f = metrics(&d, &python);
        sample_value(&f, "enilab_instances", &[("state", "running")]) == Some(1.0)
    });
    let after = metrics(&d, &python);
    let cases: [(&[(&str, &str)], f64); 3] = [
        (&[("action", "CreateVpc"), ("code", "200")], 2.0),
        (&[("action", "CreateSubnet"), ("code", "200")], 1.0),
        (&[("action", "NoSuchAction"), ("code", "400")], 1.0),
    ];
    for (labels, want) in cases {
        assert_eq!(
            sample_value(&after, "enilab_api_requests_total", labels),
            Some(want),
            "{labels:?}"
        );
    }
    assert_eq!(
        sample_value(&after, "enilab_network_interfaces", &[]),
        Some(1.0)
    );

    let bin = enilab_bin().expect("binary");
    let out = Command::new(bin)
        .args(["capture", &eni, "-w", "-", "--seconds", "1", "--endpoint"])
        .arg(d.addr().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run enilab capture");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no datapath"), "{err}");
    let (status, body) = http_get(d.addr(), "/enilab/capture?count=1").expect("GET");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
}

/// Two guests ping; a capture of the first one's ENI (stopped with
/// Ctrl-C) and a second one to stdout (stopped by --count) hold the echo
/// requests and replies with the right addresses; /metrics counts them.
fn scenario_capture_ping() {
    let Some(env) = require_guests() else { return };
    let Some(bin) = require(REQUIRE_GUESTS, enilab_bin()) else {
        return;
    };
    if require(REQUIRE_GUESTS, tshark()).is_none() {
        return;
    }
    eprintln!("[capture] accelerator {}", env.accel.accel);
    let d = ApiDaemon::start(bin.clone(), "capture", BUDGET, &[]);
    let vpc = d.open_vpc("10.0.0.0/16");
    let subnet = d.subnet(&vpc, "10.0.1.0/24");
    let mut guests = Vec::new();
    for _ in 0..2 {
        let xml = d.ok(
            "RunInstances",
            &[
                ("ImageId", "ami-0e1ab000000000001"),
                ("InstanceType", "t3.micro"),
                ("MinCount", "1"),
                ("MaxCount", "1"),
                ("SubnetId", &subnet),
            ],
        );
        guests.push((
            extract_all(&xml, "instanceId")[0].to_string(),
            extract_all(&xml, "privateIpAddress")[0].to_string(),
            extract_all(&xml, "networkInterfaceId")[0].to_string(),
        ));
    }
    for (id, ip, _) in &guests {
        d.wait_guest(id, BOOT);
        d.wait(&format!("{ip} on {id}"), BOOT, || {
            d.sh(id, "ip -4 -o addr show", SHORT)
                .stdout_str()
                .contains(&format!("inet {ip}/"))
        });
    }
    let (a, a_ip, a_eni) = &guests[0];
    let (_, b_ip, _) = &guests[1];
    // Warm ARP so the counted capture below sees ICMP only.
    assert!(d.pings(a, b_ip), "{a} cannot reach {b_ip}");

    let file = d.run_root().join("a.pcap");
    let capture = |extra: &[&str], stdout: Stdio| {
        let child = Command::new(&bin)
            .args(["capture", a_eni, "--endpoint"])
            .arg(d.addr().to_string())
            .args(extra)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn enilab capture");
        ChildGuard::new(child, "enilab capture")
    };
    let mut by_signal = capture(&["-w", file.to_str().expect("path")], Stdio::null());
    let piped = d.run_root().join("b.pcap");
    let mut by_count = capture(
        &["-w", "-", "--count", "2"],
        Stdio::from(std::fs::File::create(&piped).expect("b.pcap")),
    );
    std::thread::sleep(Duration::from_secs(2));
    let out = d.sh(a, &format!("ping -c 3 -i 0.5 -W 2 {b_ip}"), SHORT);
    assert!(out.success(), "ping: {}", out.stdout_str());
    std::thread::sleep(Duration::from_secs(1));
    by_signal.signal(libc::SIGINT);
    let st = by_signal
        .wait_timeout(SHORT)
        .expect("capture stops on SIGINT");
    assert!(st.success(), "capture exit {st:?}");
    let st = by_count
        .wait_timeout(SHORT)
        .expect("capture stops after --count");
    assert!(st.success(), "capture exit {st:?}");

    let rows = tshark_fields(&file, &["ip.src", "ip.dst", "icmp.type"]).expect("tshark");
    let has = |src: &str, dst: &str, t: &str| {
        rows.iter()
            .filter(|r| r.len() == 3 && r[0] == src && r[1] == dst && r[2] == t)
            .count()
    };
    assert!(has(a_ip, b_ip, "8") >= 3, "echo requests: {rows:?}");
    assert!(has(b_ip, a_ip, "0") >= 3, "echo replies: {rows:?}");
    let rows = tshark_fields(&piped, &["icmp.type"]).expect("tshark stdout capture");
    assert_eq!(rows.len(), 2, "{rows:?}");

    // The picture of a live lab carries device/card indexes and rates.
    let dot = d.run_root().join("lab.dot");
    let st = Command::new(&bin)
        .args(["graph", "--interval", "0.5", "-o"])
        .arg(&dot)
        .arg("--endpoint")
        .arg(d.addr().to_string())
        .status()
        .expect("enilab graph");
    assert!(st.success());
    let text = std::fs::read_to_string(&dot).expect("dot file");
    assert!(
        text.contains(&format!("\"{a_eni}\" [shape=ellipse")),
        "{text}"
    );
    assert!(text.contains("device 0 · card 0"), "{text}");
    assert_eq!(
        text.matches("\\nrx ").count(),
        2,
        "a rate per device: {text}"
    );

    if let Some(python) = require(REQUIRE_API, python_with("prometheus_client")) {
        let fams = metrics(&d, &python);
        for name in ["enilab_eni_tx_packets_total", "enilab_eni_rx_packets_total"] {
            let v = sample_value(&fams, name, &[("eni", a_eni)]).unwrap_or(0.0);
            assert!(v >= 4.0, "{name} of {a_eni}: {v}");
        }
        assert!(
            sample_value(&fams, "enilab_card_forwarded_total", &[("card", "0")]).unwrap_or(0.0)
                >= 8.0
        );
    }
}

/// A capture of a NAT gateway's interface (a hyperplane port, not an
/// instance's device) shows a private guest's pings on their way to the
/// internet and the replies coming back.
fn scenario_capture_nat_gateway() {
    let Some(env) = require_guests() else { return };
    let Some(bin) = require(REQUIRE_GUESTS, enilab_bin()) else {
        return;
    };
    if require(REQUIRE_GUESTS, tshark()).is_none() {
        return;
    }
    eprintln!("[capture-nat] accelerator {}", env.accel.accel);
    let d = ApiDaemon::start(bin.clone(), "capture-nat", BUDGET, &[]);
    let status = d.status();
    let Some(internet) = status["driver"]["internet"]["addr"].as_str() else {
        eprintln!("skipped: the daemon has no internet namespace: {status}");
        return;
    };
    let internet = internet.split('/').next().unwrap_or(internet).to_string();
    let vpc = d.get("CreateVpc", &[("CidrBlock", "10.0.0.0/16")], "vpcId");
    let (public, private) = (d.subnet(&vpc, "10.0.1.0/24"), d.subnet(&vpc, "10.0.2.0/24"));
    let route = |sub: &str, kind: &str, target: &str| {
        let rtb = d.get("CreateRouteTable", &[("VpcId", &vpc)], "routeTableId");
        d.ok(
            "CreateRoute",
            &[
                ("RouteTableId", &rtb),
                ("DestinationCidrBlock", "0.0.0.0/0"),
                (kind, target),
            ],
        );
        d.ok(
            "AssociateRouteTable",
            &[("RouteTableId", &rtb), ("SubnetId", sub)],
        );
    };
    let igw = d.get("CreateInternetGateway", &[], "internetGatewayId");
    d.ok(
        "AttachInternetGateway",
        &[("InternetGatewayId", &igw), ("VpcId", &vpc)],
    );
    route(&public, "GatewayId", &igw);
    let alloc = d.get("AllocateAddress", &[("Domain", "vpc")], "allocationId");
    let nat = d.get(
        "CreateNatGateway",
        &[("SubnetId", &public), ("AllocationId", &alloc)],
        "natGatewayId",
    );
    d.wait(&format!("{nat} available"), SHORT, || {
        d.ok("DescribeNatGateways", &[("NatGatewayId.1", &nat)])
            .contains("<state>available</state>")
    });
    let nat_eni = d.get(
        "DescribeNatGateways",
        &[("NatGatewayId.1", &nat)],
        "networkInterfaceId",
    );
    route(&private, "NatGatewayId", &nat);
    let xml = d.ok(
        "RunInstances",
        &[
            ("ImageId", "ami-0e1ab000000000001"),
            ("InstanceType", "t3.micro"),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("SubnetId", &private),
        ],
    );
    let inst = extract_all(&xml, "instanceId")[0].to_string();
    let ip = extract_all(&xml, "privateIpAddress")[0].to_string();
    d.wait_guest(&inst, BOOT);
    d.wait(&format!("{ip} on {inst}"), BOOT, || {
        d.sh(&inst, "ip -4 -o addr show", SHORT)
            .stdout_str()
            .contains(&format!("inet {ip}/"))
    });

    let file = d.run_root().join("nat.pcap");
    let child = Command::new(&bin)
        .args(["capture", &nat_eni, "--seconds", "12", "-w"])
        .arg(&file)
        .arg("--endpoint")
        .arg(d.addr().to_string())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn enilab capture");
    let mut cap = ChildGuard::new(child, "enilab capture");
    std::thread::sleep(Duration::from_secs(2));
    let out = d.sh(&inst, &format!("ping -c 3 -i 0.5 -W 2 {internet}"), SHORT);
    assert!(
        out.success(),
        "ping through the NAT gateway: {}",
        out.stdout_str()
    );
    let st = cap
        .wait_timeout(SHORT)
        .expect("capture ends after --seconds");
    assert!(st.success(), "capture exit {st:?}");
    let rows = tshark_fields(&file, &["ip.src", "ip.dst", "icmp.type"]).expect("tshark");
    let has = |src: &str, dst: &str, t: &str| {
        rows.iter()
            .any(|r| r.len() == 3 && r[0] == src && r[1] == dst && r[2] == t)
    };
    assert!(
        has(&ip, &internet, "8"),
        "requests into the gateway: {rows:?}"
    );
    assert!(
        has(&internet, &ip, "0"),
        "replies out of the gateway: {rows:?}"
    );
}

#[test]
fn capture_of_a_nat_gateway_interface() {
    scenario_capture_nat_gateway();
}

#[test]
fn metrics_fixture_parses_with_prometheus_client() {
    scenario_fixture_parses();
}

#[test]
fn metrics_and_capture_on_a_recording_daemon() {
    scenario_recording_daemon();
}

#[test]
fn capture_ping_between_two_guests_reads_in_tshark() {
    scenario_capture_ping();
}

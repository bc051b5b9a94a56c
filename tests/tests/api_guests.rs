//! Real-guest scenarios driven through the EC2 API: `enilab serve` with the
//! QEMU driver boots the instances, hot-plugs ENIs over QMP, serves
//! instance metadata, and spreads ENIs over network cards. One
//! parameterised function per scenario, thin `#[test]` wrappers; the
//! harness is `enilab_tests::ApiDaemon`.
//!
//! Run with `cargo test -p enilab-tests --test api_guests -- --test-threads=1`
//! (after `cargo build -p enilab-control`, which builds the daemon).
//! Only 10.x VPC addresses and loopback are addressed.

use std::time::{Duration, Instant};

use enilab_tests::*;

const BUDGET: Duration = Duration::from_secs(300);
const BOOT: Duration = Duration::from_secs(120);
const SHORT: Duration = Duration::from_secs(30);

fn daemon(tag: &str) -> Option<ApiDaemon> {
    let env = require_guests()?;
    let bin = require(REQUIRE_GUESTS, enilab_bin())?;
    eprintln!(
        "[{tag}] accelerator {} ({})",
        env.accel.accel, env.accel.reason
    );
    Some(ApiDaemon::start(bin, tag, BUDGET, &[]))
}

/// A VPC 10.0.0.0/16 with subnet 10.0.1.0/24 whose default group lets
/// everything in (ping from anywhere in the VPC).
fn network(d: &ApiDaemon) -> (String, String) {
    let vpc = d.open_vpc("10.0.0.0/16");
    let subnet = d.subnet(&vpc, "10.0.1.0/24");
    (vpc, subnet)
}

/// Launch one instance of `itype` in `subnet`; its id and primary address.
fn launch(d: &ApiDaemon, subnet: &str, itype: &str) -> (String, String) {
    let xml = d.ok(
        "RunInstances",
        &[
            ("ImageId", "ami-0e1ab000000000001"),
            ("InstanceType", itype),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("SubnetId", subnet),
        ],
    );
    let id = extract_all(&xml, "instanceId")[0].to_string();
    let ip = extract_all(&xml, "privateIpAddress")[0].to_string();
    (id, ip)
}

/// Launch instances and wait for their agents and their primary address.
fn boot(d: &ApiDaemon, subnet: &str, itypes: &[&str]) -> Vec<(String, String)> {
    let v: Vec<(String, String)> = itypes.iter().map(|t| launch(d, subnet, t)).collect();
    for (id, ip) in &v {
        d.wait_guest(id, BOOT);
        d.wait(&format!("{ip} on {id}"), BOOT, || {
            d.sh(id, "ip -4 -o addr show", SHORT)
                .stdout_str()
                .contains(&format!("inet {ip}/"))
        });
    }
    v
}

fn create_eni(d: &ApiDaemon, subnet: &str) -> (String, String) {
    let xml = d.ok("CreateNetworkInterface", &[("SubnetId", subnet)]);
    (
        extract_all(&xml, "networkInterfaceId")[0].to_string(),
        extract_all(&xml, "privateIpAddress")[0].to_string(),
    )
}

fn attach(d: &ApiDaemon, eni: &str, instance: &str, device: u32, card: u32) -> String {
    d.get(
        "AttachNetworkInterface",
        &[
            ("NetworkInterfaceId", eni),
            ("InstanceId", instance),
            ("DeviceIndex", &device.to_string()),
            ("NetworkCardIndex", &card.to_string()),
        ],
        "attachmentId",
    )
}

fn detach(d: &ApiDaemon, attachment: &str, eni: &str, force: bool) {
    let force = if force { "true" } else { "false" };
    d.ok(
        "DetachNetworkInterface",
        &[("AttachmentId", attachment), ("Force", force)],
    );
    d.wait(&format!("{eni} detached"), SHORT * 2, || {
        d.attachment_status(eni).is_empty()
    });
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Two instances launched through the API reach each other.
fn scenario_launch_and_reach() {
    let Some(d) = daemon("launch") else { return };
    let (_, subnet) = network(&d);
    let v = boot(&d, &subnet, &["t3.micro", "t3.micro"]);
    assert!(
        d.pings(&v[0].0, &v[1].1),
        "{} cannot reach {}",
        v[0].0,
        v[1].1
    );
    assert!(
        d.pings(&v[1].0, &v[0].1),
        "{} cannot reach {}",
        v[1].0,
        v[0].1
    );
    d.ok("TerminateInstances", &[("InstanceId.1", &v[0].0)]);
    d.wait("terminated", SHORT, || {
        d.instance_state(&v[0].0) == "terminated"
    });
    assert!(
        !d.pings(&v[1].0, &v[0].1),
        "a terminated instance still answers"
    );
}

/// `runs` times: a new ENI hot-attached to running instance A answers B
/// with no manual step in A (its agent configures the interface from
/// IMDS), then is detached. Prints the latency from the API call to the
/// first answer.
fn scenario_hot_attach(runs: usize) {
    let Some(d) = daemon("hot-attach") else {
        return;
    };
    let (_, subnet) = network(&d);
    let v = boot(&d, &subnet, &["t3.micro", "t3.micro"]);
    let (a, b) = (&v[0].0, &v[1].0);
    let mut lat = Vec::new();
    for run in 0..runs {
        let (eni, ip) = create_eni(&d, &subnet);
        let t = Instant::now();
        let att = attach(&d, &eni, a, 1, 0);
        d.wait(&format!("run {run}: {ip} answering"), SHORT * 2, || {
            d.pings(b, &ip)
        });
        lat.push(t.elapsed());
        assert_eq!(d.attachment_status(&eni), "attached");
        detach(&d, &att, &eni, false);
        d.wait(&format!("{ip} gone from {a}"), SHORT, || !d.pings(b, &ip));
        d.ok("DeleteNetworkInterface", &[("NetworkInterfaceId", &eni)]);
    }
    lat.sort();
    eprintln!(
        "hot-attach latency (API call to first ping answer, {} runs, TCG guests): p50 {:?} p95 {:?} max {:?}",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.95),
        lat[lat.len() - 1]
    );
}

/// Attach to A, detach, reattach to B: the address follows the ENI.
fn scenario_detach_reattach() {
    let Some(d) = daemon("reattach") else { return };
    let (_, subnet) = network(&d);
    let v = boot(&d, &subnet, &["t3.micro", "t3.micro", "t3.micro"]);
    let (a, b, c) = (&v[0].0, &v[1].0, &v[2].0);
    let (eni, ip) = create_eni(&d, &subnet);
    let mac = extract_all(
        &d.ok(
            "DescribeNetworkInterfaces",
            &[("NetworkInterfaceId.1", &eni)],
        ),
        "macAddress",
    )[0]
    .to_string();
    let att = attach(&d, &eni, a, 1, 0);
    d.wait(&format!("{ip} on {a}"), SHORT * 2, || d.pings(c, &ip));
    assert!(d.sh_ok(a, "ip -o link", SHORT).contains(&mac));
    // Forced: the device is dropped even if the guest were slow to let go.
    detach(&d, &att, &eni, true);
    assert!(
        !d.sh_ok(a, "ip -o link", SHORT).contains(&mac),
        "the guest still has the device"
    );
    assert!(!d.pings(c, &ip), "a detached ENI answers");
    attach(&d, &eni, b, 1, 0);
    d.wait(&format!("{ip} on {b}"), SHORT * 2, || d.pings(c, &ip));
    assert!(d.sh_ok(b, "ip -o link", SHORT).contains(&mac));
    // The guest answering is B: its interface carries the address.
    assert!(d
        .sh_ok(b, "ip -4 -o addr show", SHORT)
        .contains(&format!("inet {ip}/")));
}

/// One HTTP/1.0 exchange with the metadata service from inside `id`, with
/// busybox nc (stdin stays open a second: nc drops the connection at EOF).
/// Detach an ENI at each of `delays_ms` after its attach reported
/// "attached", from before the guest has handled the hot-plug to after it
/// has brought the device up (the soak's churn, made systematic). Every
/// detach completes and the device leaves the guest; the ENI then works
/// on the other instance. (A guest that loses the eject request under load
/// is covered by `qmp::tests::unplug_asks_again_*`: it cannot be provoked
/// on purpose here.)
fn scenario_detach_soon(delays_ms: &[u64]) {
    let Some(d) = daemon("detach-soon") else {
        return;
    };
    let (_, subnet) = network(&d);
    let v = boot(&d, &subnet, &["t3.micro", "t3.micro"]);
    let (a, b) = (&v[0].0, &v[1].0);
    let (eni, ip) = create_eni(&d, &subnet);
    for &ms in delays_ms {
        let att = attach(&d, &eni, a, 1, 0);
        d.wait(&format!("{ms} ms round: attached"), SHORT, || {
            d.attachment_status(&eni) == "attached"
        });
        std::thread::sleep(Duration::from_millis(ms));
        let t = Instant::now();
        detach(&d, &att, &eni, false);
        eprintln!("detach {ms} ms after attach took {:?}", t.elapsed());
    }
    assert_eq!(
        d.sh_ok(a, "ls /sys/class/net | grep -c '^eth'", SHORT)
            .trim(),
        "1",
        "{a} still has the ENI's device"
    );
    attach(&d, &eni, b, 1, 0);
    d.wait(&format!("{ip} on {b}"), SHORT * 2, || d.pings(a, &ip));
}

fn http(d: &ApiDaemon, id: &str, request: &str) -> String {
    let script = format!(
        "(printf '{}'; sleep 1) | nc -w 3 169.254.169.254 80",
        request.replace('\n', "\\r\\n")
    );
    d.sh(id, &script, SHORT).stdout_str()
}

/// IMDS v1 and v2 from inside a guest, and the per-ENI tree staying
/// current across an attach and a secondary address.
fn scenario_imds() {
    let Some(d) = daemon("imds") else { return };
    let (vpc, subnet) = network(&d);
    let v = boot(&d, &subnet, &["t3.micro"]);
    let (a, ip) = (&v[0].0, &v[0].1);
    let v1 = http(&d, a, "GET /latest/meta-data/instance-id HTTP/1.0\n\n");
    assert!(v1.starts_with("HTTP/1.") && v1.contains(" 200"), "{v1}");
    assert!(v1.ends_with(a.as_str()), "{v1}");
    let tok = http(
        &d,
        a,
        "PUT /latest/api/token HTTP/1.0\nX-aws-ec2-metadata-token-ttl-seconds: 60\n\n",
    );
    let token = tok
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    assert!(tok.contains(" 200") && !token.is_empty(), "{tok}");
    let local = http(
        &d,
        a,
        &format!(
            "GET /latest/meta-data/local-ipv4 HTTP/1.0\nX-aws-ec2-metadata-token: {token}\n\n"
        ),
    );
    assert!(local.ends_with(ip.as_str()), "{local}");
    let bad = http(
        &d,
        a,
        "GET /latest/meta-data/local-ipv4 HTTP/1.0\nX-aws-ec2-metadata-token: nope\n\n",
    );
    assert!(bad.contains(" 401"), "{bad}");
    let missing = http(&d, a, "GET /latest/meta-data/no-such-thing HTTP/1.0\n\n");
    assert!(missing.contains(" 404"), "{missing}");

    let (eni, eip) = create_eni(&d, &subnet);
    let mac = extract_all(
        &d.ok(
            "DescribeNetworkInterfaces",
            &[("NetworkInterfaceId.1", &eni)],
        ),
        "macAddress",
    )[0]
    .to_string();
    attach(&d, &eni, a, 1, 0);
    d.wait("attached", SHORT, || {
        d.attachment_status(&eni) == "attached"
    });
    let base = format!("/latest/meta-data/network/interfaces/macs/{mac}");
    let get = |p: &str| http(&d, a, &format!("GET {base}/{p} HTTP/1.0\n\n"));
    assert!(
        get("device-number").ends_with("\r\n\r\n1"),
        "{}",
        get("device-number")
    );
    assert!(get("network-card").ends_with("\r\n\r\n0"));
    assert!(get("interface-id").ends_with(eni.as_str()));
    assert!(get("subnet-id").ends_with(subnet.as_str()));
    assert!(get("vpc-id").ends_with(vpc.as_str()));
    assert!(get("local-ipv4s").ends_with(eip.as_str()));
    // A secondary address appears in IMDS and the agent adds it.
    let xml = d.ok(
        "AssignPrivateIpAddresses",
        &[
            ("NetworkInterfaceId", &eni),
            ("SecondaryPrivateIpAddressCount", "1"),
        ],
    );
    let _ = xml;
    let ips = extract_all(
        &d.ok(
            "DescribeNetworkInterfaces",
            &[("NetworkInterfaceId.1", &eni)],
        ),
        "privateIpAddress",
    )
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>();
    let second = ips
        .iter()
        .find(|x| **x != eip)
        .expect("a secondary address")
        .clone();
    assert!(
        get("local-ipv4s").contains(&second),
        "{}",
        get("local-ipv4s")
    );
    d.wait(&format!("{second} configured in {a}"), SHORT, || {
        d.sh(a, "ip -4 -o addr show", SHORT)
            .stdout_str()
            .contains(&format!("inet {second}/"))
    });
}

/// An instance type with two network cards: an ENI on card 1 is served by
/// card 1's worker group, which keeps carrying traffic while card 0 is
/// flooded.
fn scenario_two_cards() {
    let Some(d) = daemon("cards") else { return };
    let (_, subnet) = network(&d);
    let v = boot(&d, &subnet, &["c6in.32xlarge", "c6in.32xlarge"]);
    let (a, b) = (&v[0].0, &v[1].0);
    let (ea, ipa) = create_eni(&d, &subnet);
    let (eb, ipb) = create_eni(&d, &subnet);
    attach(&d, &ea, a, 1, 1);
    attach(&d, &eb, b, 1, 1);
    d.wait("card-1 ENIs answering", SHORT * 2, || d.pings(b, &ipa));
    let xml = d.ok(
        "DescribeNetworkInterfaces",
        &[("NetworkInterfaceId.1", &ea)],
    );
    assert_eq!(extract_all(&xml, "networkCardIndex"), vec!["1"]);
    // One worker group per card: card 1's threads exist in the daemon.
    let threads = daemon_threads(&d);
    assert!(
        threads.iter().any(|t| t.starts_with("card0"))
            && threads.iter().any(|t| t.starts_with("card1")),
        "worker threads {threads:?}"
    );
    let iperf = |client: &str, server_ip: &str, args: &str| -> f64 {
        let out = d.sh_ok(
            client,
            &format!("iperf3 -c {server_ip} -t 4 -J {args}"),
            SHORT * 2,
        );
        let j: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        j["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .or_else(|| j["end"]["sum"]["bits_per_second"].as_f64())
            .unwrap_or(0.0)
    };
    d.sh_ok(a, "iperf3 -s -D -p 5201 && iperf3 -s -D -p 5202", SHORT);
    let base = iperf(b, &format!("{ipa} -B {ipb}"), "-p 5201");
    assert!(base > 0.0, "no baseline throughput on card 1");
    // Flood card 0 (primary addresses) with UDP while card 1 is measured.
    let flood_to = v[0].1.clone();
    let flood = format!("iperf3 -c {flood_to} -u -b 0 -l 64 -t 8 -p 5202 >/dev/null 2>&1 &");
    d.sh_ok(b, &flood, SHORT);
    std::thread::sleep(Duration::from_secs(1));
    let under = iperf(b, &format!("{ipa} -B {ipb}"), "-p 5201");
    eprintln!(
        "card 1 TCP throughput: {:.0} Mbit/s alone, {:.0} Mbit/s while card 0 is flooded ({:.2}x)",
        base / 1e6,
        under / 1e6,
        under / base
    );
    // No timed assertion (the flood and the measured stream share the
    // guest's TCG vCPUs): card 1 must keep carrying traffic, the ratio is
    // printed above.
    assert!(
        under > 0.0,
        "card 1 stalled while card 0 was flooded: {under} vs {base} bit/s"
    );
}

/// Thread names of the daemon process.
fn daemon_threads(d: &ApiDaemon) -> Vec<String> {
    let pid = d.daemon_pid();
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|s| s.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The daemon stops and starts under running guests: state and guests
/// come back, running guests are adopted (same QEMU pids) and carry
/// traffic, a guest that died meanwhile is reported stopped, and attach
/// works on an adopted guest.
fn scenario_daemon_restart() {
    let Some(mut d) = daemon("restart") else {
        return;
    };
    let (_, subnet) = network(&d);
    let v = boot(&d, &subnet, &["t3.micro", "t3.micro", "t3.micro"]);
    let kept: Vec<Option<u32>> = v[..2].iter().map(|(id, _)| d.qemu_pid(id)).collect();
    let pid = d.daemon_pid();
    d.stop();
    // A clean stop takes its internet and metadata namespaces with it.
    let ns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        !ns.contains(&format!("-{pid}-")),
        "namespaces of the stopped daemon {pid} remain:\n{ns}"
    );
    assert!(d.kill_guest(&v[2].0), "no QEMU to kill for {}", v[2].0);
    d.start_again();
    for (id, _) in &v[..2] {
        assert_eq!(d.instance_state(id), "running", "{id}");
    }
    let now: Vec<Option<u32>> = v[..2].iter().map(|(id, _)| d.qemu_pid(id)).collect();
    assert_eq!(kept, now, "the guests were not adopted");
    assert_eq!(
        d.instance_state(&v[2].0),
        "stopped",
        "a dead guest must be reported stopped"
    );
    d.wait("traffic after the restart", SHORT * 2, || {
        d.pings(&v[0].0, &v[1].1)
    });
    let (eni, ip) = create_eni(&d, &subnet);
    attach(&d, &eni, &v[0].0, 1, 0);
    d.wait(&format!("{ip} after restart"), SHORT * 2, || {
        d.pings(&v[1].0, &ip)
    });
    // The stopped one starts again, with its interface.
    d.ok("StartInstances", &[("InstanceId.1", &v[2].0)]);
    d.wait_guest(&v[2].0, BOOT);
    d.wait("the restarted guest reachable", BOOT, || {
        d.pings(&v[0].0, &v[2].1)
    });
}

#[test]
fn launch_and_reach() {
    scenario_launch_and_reach();
}

#[test]
fn hot_attach_reached_from_another_instance() {
    let runs = std::env::var("ENILAB_HOTPLUG_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    scenario_hot_attach(runs);
}

#[test]
fn detach_then_reattach_to_another_instance() {
    scenario_detach_reattach();
}

#[test]
fn detach_soon_after_attach() {
    scenario_detach_soon(&[0, 300, 1000, 2000, 3500]);
}

#[test]
fn imds_from_inside_the_guest() {
    scenario_imds();
}

#[test]
fn two_network_cards() {
    scenario_two_cards();
}

#[test]
fn daemon_restart_adopts_guests() {
    scenario_daemon_restart();
}

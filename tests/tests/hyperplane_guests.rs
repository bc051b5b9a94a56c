//! Real-guest scenarios for the hyperplane tier, driven through the EC2 and
//! ELBv2 APIs: a NAT gateway in front of a private subnet (reaching an HTTP
//! server in the daemon's internet namespace, and surviving the loss of the
//! hyperplane node that owns a stream), and a network load balancer over
//! three instances (spread, client address preserved, health checks). One
//! parameterised function per scenario, thin `#[test]` wrappers; the harness
//! is `enilab_tests::ApiDaemon`.
//!
//! Run with `cargo test -p enilab-tests --test hyperplane_guests --
//! --test-threads=1` (after `cargo build -p enilab-control`). Only 10.x VPC
//! addresses, the internet namespace's 203.0.113.0/24 and loopback are
//! addressed.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use enilab_control::api::bench::extract;
use enilab_tests::*;

const BUDGET: Duration = Duration::from_secs(420);
const BOOT: Duration = Duration::from_secs(120);
const SHORT: Duration = Duration::from_secs(30);
/// The internet namespace's address (the daemon's default).
const INTERNET: &str = "203.0.113.1";

fn daemon(tag: &str) -> Option<ApiDaemon> {
    let env = require_guests()?;
    let bin = require(REQUIRE_GUESTS, enilab_bin())?;
    eprintln!(
        "[{tag}] accelerator {} ({})",
        env.accel.accel, env.accel.reason
    );
    Some(ApiDaemon::start(bin, tag, BUDGET, &[]))
}

/// A route table for `subnet` whose default route goes to `target`
/// (`GatewayId` or `NatGatewayId`).
fn default_route(d: &ApiDaemon, vpc: &str, subnet: &str, kind: &str, target: &str) {
    let rtb = d.get("CreateRouteTable", &[("VpcId", vpc)], "routeTableId");
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
        &[("RouteTableId", &rtb), ("SubnetId", subnet)],
    );
}

/// The daemon's internet namespace.
fn internet_netns(d: &ApiDaemon) -> String {
    let st = d.status();
    st["driver"]["internet"]["netns"]
        .as_str()
        .unwrap_or_else(|| panic!("the daemon has no internet: {st}"))
        .to_string()
}

/// A Python program run in the internet namespace, killed on drop.
struct NsServer {
    child: ChildGuard,
    out: std::path::PathBuf,
}

impl NsServer {
    fn start(netns: &str, program: &str, out: std::path::PathBuf) -> NsServer {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "python3", "-u", "-c", program])
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a server in the internet namespace");
        let _ = child.stdin.take().map(|mut s| s.flush());
        let s = NsServer {
            child: ChildGuard::new(child, "internet server"),
            out,
        };
        assert!(
            wait_until(Duration::from_secs(10), || s.output().contains("ready")),
            "the server did not start"
        );
        s
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for NsServer {
    fn drop(&mut self) {
        self.child.signal(libc::SIGKILL);
        let _ = std::fs::remove_file(&self.out);
    }
}

/// HTTP on :8080 answering every GET with a fixed body, logging each
/// client address to the output file.
const HTTP_SERVER: &str = r#"
import http.server, sys
out = open(sys.argv[1], "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        out.write("client %s\n" % self.client_address[0])
        body = b"hello from the internet\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.HTTPServer(("203.0.113.1", 8080), H)
out.write("ready\n")
s.serve_forever()
"#;

/// TCP on :9000: reads one connection to its end, logs its length and
/// SHA-256.
const SINK_SERVER: &str = r#"
import hashlib, socket, sys, time
out = open(sys.argv[1], "a", buffering=1)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("203.0.113.1", 9000))
s.listen(1)
out.write("ready\n")
c, a = s.accept()
out.write("client %s\n" % a[0])
h = hashlib.sha256()
n = 0
last = time.monotonic()
gap = 0.0
while True:
    b = c.recv(65536)
    now = time.monotonic()
    gap = max(gap, now - last)
    last = now
    if not b:
        break
    h.update(b)
    n += len(b)
out.write("gap %.3f\n" % gap)
out.write("done %d %s\n" % (n, h.hexdigest()))
"#;

#[derive(Debug, Clone, Copy)]
enum NatCase {
    /// An instance in a private subnet fetches over HTTP from the internet;
    /// the server sees the NAT gateway's Elastic IP.
    Fetch,
    /// A slow TCP stream through the gateway survives stopping the
    /// hyperplane node that owns it, byte for byte.
    NodeLoss,
}

fn nat_gateway(case: NatCase) {
    let tag = format!("nat-{case:?}");
    let Some(d) = daemon(&tag) else { return };
    let vpc = d.open_vpc("10.0.0.0/16");
    let public = d.subnet(&vpc, "10.0.1.0/24");
    let private = d.subnet(&vpc, "10.0.2.0/24");
    let igw = d.get("CreateInternetGateway", &[], "internetGatewayId");
    d.ok(
        "AttachInternetGateway",
        &[("InternetGatewayId", &igw), ("VpcId", &vpc)],
    );
    default_route(&d, &vpc, &public, "GatewayId", &igw);
    let alloc_xml = d.ok("AllocateAddress", &[("Domain", "vpc")]);
    let alloc = extract_all(&alloc_xml, "allocationId")[0].to_string();
    let eip = extract_all(&alloc_xml, "publicIp")[0].to_string();
    let nat = d.get(
        "CreateNatGateway",
        &[("SubnetId", &public), ("AllocationId", &alloc)],
        "natGatewayId",
    );
    d.wait(&format!("{nat} available"), SHORT, || {
        d.ok("DescribeNatGateways", &[("NatGatewayId.1", &nat)])
            .contains("<state>available</state>")
    });
    default_route(&d, &vpc, &private, "NatGatewayId", &nat);
    let guests = d.boot(&private, 1, BOOT);
    let (inst, inst_ip) = &guests[0];
    let netns = internet_netns(&d);
    let out = d.run_root().join(format!("{tag}.out"));

    match case {
        NatCase::Fetch => {
            let server = NsServer::start(&netns, HTTP_SERVER, out);
            let reply = d.sh_ok(inst, &http_get(INTERNET, 8080, "/hello"), SHORT);
            assert!(
                reply.starts_with("HTTP/1.0 200")
                    && reply.contains("\r\n\r\nhello from the internet"),
                "{reply:?}"
            );
            let log = server.output();
            assert!(
                log.contains(&format!("client {eip}\n")),
                "the server saw {log:?}, not the gateway's Elastic IP {eip}"
            );
            assert!(!log.contains(inst_ip.as_str()), "private address leaked");
            // Ping by echo id through the same gateway.
            assert!(d.pings(inst, INTERNET), "ICMP through the NAT gateway");
        }
        NatCase::NodeLoss => {
            let server = NsServer::start(&netns, SINK_SERVER, out);
            // 60 chunks of 2000 numbers, 0.15 s apart: ~9 s of stream.
            let script = format!(
                "for i in $(seq 0 59); do seq $((i*2000+1)) $((i*2000+2000)); sleep 0.15; done \
                 | nc {INTERNET} 9000"
            );
            let mut expected = Vec::new();
            for i in 0..60u32 {
                for n in i * 2000 + 1..=i * 2000 + 2000 {
                    expected.extend_from_slice(format!("{n}\n").as_bytes());
                }
            }
            let want = format!("done {} {}", expected.len(), sha256_hex(&expected));
            let agent = d.agent_socket(inst);
            let stream = std::thread::spawn(move || {
                let mut c = enilab_control::agent::AgentClient::connect(agent).expect("agent");
                c.exec_capture(&["sh", "-c", &script], Duration::from_secs(60))
                    .expect("stream")
            });
            d.wait("the stream to reach the server", SHORT, || {
                server.output().contains("client ")
            });
            std::thread::sleep(Duration::from_secs(2));
            let owner = busiest_node(&d);
            eprintln!("[{tag}] stopping hyperplane node {owner}, the stream's owner");
            let stopped = Instant::now();
            d.ok("StopHyperplaneNode", &[("Node", &owner.to_string())]);
            let out = stream.join().expect("stream thread");
            assert!(out.success(), "the stream failed: {}", out.stderr_str());
            eprintln!(
                "[{tag}] stream ended {:?} after the node stopped",
                stopped.elapsed()
            );
            d.wait("the server to finish", SHORT, || {
                server.output().contains("done ")
            });
            let log = server.output();
            eprintln!(
                "[{tag}] longest pause in the stream: {} s; nodes after: {}",
                log.lines()
                    .find_map(|l| l.strip_prefix("gap "))
                    .unwrap_or("?"),
                d.ok("DescribeHyperplaneNodes", &[])
            );
            assert!(
                log.contains(&want),
                "bytes lost or changed: server says {log:?}, want {want:?}"
            );
            assert!(log.contains(&format!("client {eip}\n")), "{log}");
            let nodes = hyperplane_nodes(&d);
            assert_eq!(nodes.get(&owner).map(|n| n.0), Some(false), "{nodes:?}");
        }
    }
}

fn sha256_hex(b: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b)
        .expect("write");
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Node index -> (running, flows it owns).
fn hyperplane_nodes(d: &ApiDaemon) -> BTreeMap<usize, (bool, u64)> {
    let xml = d.ok("DescribeHyperplaneNodes", &[]);
    extract_all(&xml, "item")
        .iter()
        .filter_map(|item| {
            let i = extract(item, "index")?.parse().ok()?;
            let running = extract(item, "running")? == "true";
            let flows = extract(item, "ownFlows")?.parse().ok()?;
            Some((i, (running, flows)))
        })
        .collect()
}

/// The running node owning the most flows.
fn busiest_node(d: &ApiDaemon) -> usize {
    let nodes = hyperplane_nodes(d);
    nodes
        .iter()
        .filter(|(_, (running, _))| *running)
        .max_by_key(|(_, (_, flows))| *flows)
        .filter(|(_, (_, flows))| *flows > 0)
        .map(|(i, _)| *i)
        .unwrap_or_else(|| panic!("no node owns a flow: {nodes:?}"))
}

#[derive(Debug, Clone, Copy)]
enum NlbCase {
    /// 300 connections spread within ±20% of even over three targets, each
    /// seeing the client's own address.
    Spread,
    /// A target whose server stops turns unhealthy and gets no new
    /// connections.
    Health,
}

fn load_balancer(case: NlbCase) {
    let tag = format!("nlb-{case:?}");
    let Some(d) = daemon(&tag) else { return };
    let vpc = d.open_vpc("10.0.0.0/16");
    let sub = d.subnet(&vpc, "10.0.1.0/24");
    let guests = d.boot(&sub, 4, BOOT);
    let (client, client_ip) = &guests[0];
    let targets = &guests[1..];
    for (id, _) in targets {
        // A CGI that names the target and the address it was reached from.
        d.sh_ok(
            id,
            &format!(
                "mkdir -p /tmp/www/cgi-bin && \
                 printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho {id} $REMOTE_ADDR\\n' \
                   > /tmp/www/cgi-bin/who && chmod +x /tmp/www/cgi-bin/who && \
                 httpd -p 80 -h /tmp/www"
            ),
            SHORT,
        );
    }
    let tg_xml = d.elb(
        "CreateTargetGroup",
        &[
            ("Name", "web"),
            ("Protocol", "TCP"),
            ("Port", "80"),
            ("VpcId", &vpc),
            ("TargetType", "instance"),
            ("HealthCheckProtocol", "TCP"),
            ("HealthCheckIntervalSeconds", "5"),
            ("HealthCheckTimeoutSeconds", "2"),
            ("HealthyThresholdCount", "2"),
            ("UnhealthyThresholdCount", "2"),
        ],
    );
    let tg = extract(&tg_xml, "TargetGroupArn")
        .expect("tg arn")
        .to_string();
    let mut reg: Vec<(String, String)> = Vec::new();
    for (i, (id, _)) in targets.iter().enumerate() {
        reg.push((format!("Targets.member.{}.Id", i + 1), id.clone()));
    }
    let reg_ref: Vec<(&str, &str)> = std::iter::once(("TargetGroupArn", tg.as_str()))
        .chain(reg.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .collect();
    d.elb("RegisterTargets", &reg_ref);
    let lb_xml = d.elb(
        "CreateLoadBalancer",
        &[
            ("Name", "front"),
            ("Type", "network"),
            ("Scheme", "internal"),
            ("Subnets.member.1", &sub),
        ],
    );
    let lb = extract(&lb_xml, "LoadBalancerArn")
        .expect("lb arn")
        .to_string();
    d.elb(
        "CreateListener",
        &[
            ("LoadBalancerArn", &lb),
            ("Protocol", "TCP"),
            ("Port", "80"),
            ("DefaultActions.member.1.Type", "forward"),
            ("DefaultActions.member.1.TargetGroupArn", &tg),
        ],
    );
    let vip = lb_vip(&d, &lb);
    eprintln!("[{tag}] load balancer VIP {vip}");
    d.wait("every target healthy", SHORT * 2, || {
        health(&d, &tg).values().filter(|s| *s == "healthy").count() == targets.len()
    });

    match case {
        NlbCase::Spread => {
            let seen = fetch_many(&d, client, &vip, 300);
            let mut per: BTreeMap<&str, usize> = BTreeMap::new();
            for (target, from) in &seen {
                assert_eq!(from, client_ip, "the target saw {from}, not the client");
                *per.entry(target.as_str()).or_default() += 1;
            }
            eprintln!("[{tag}] connections per target: {per:?}");
            assert_eq!(seen.len(), 300, "every connection answered");
            for (id, _) in targets {
                let n = per.get(id.as_str()).copied().unwrap_or(0);
                assert!(
                    (80..=120).contains(&n),
                    "{id} got {n} of 300 connections: {per:?}"
                );
            }
        }
        NlbCase::Health => {
            let (down, _) = &targets[2];
            d.sh_ok(down, "killall httpd", SHORT);
            let started = Instant::now();
            d.wait(&format!("{down} unhealthy"), SHORT * 2, || {
                health(&d, &tg).get(down.as_str()).map(String::as_str) == Some("unhealthy")
            });
            eprintln!(
                "[{tag}] {down} marked unhealthy {:?} after its server stopped",
                started.elapsed()
            );
            let seen = fetch_many(&d, client, &vip, 30);
            assert_eq!(seen.len(), 30, "every new connection answered");
            assert!(
                seen.iter().all(|(t, _)| t != down),
                "new connections reached the unhealthy target: {seen:?}"
            );
            // It comes back when its server does.
            d.sh_ok(down, "httpd -p 80 -h /tmp/www", SHORT);
            d.wait(&format!("{down} healthy again"), SHORT * 2, || {
                health(&d, &tg).get(down.as_str()).map(String::as_str) == Some("healthy")
            });
        }
    }
}

/// The load balancer's address: its interface's private IP.
fn lb_vip(d: &ApiDaemon, lb_arn: &str) -> String {
    // arn:...:loadbalancer/net/<name>/<id> -> "ELB net/<name>/<id>"
    let res = lb_arn.split("loadbalancer/").nth(1).expect("lb arn");
    let xml = d.ok(
        "DescribeNetworkInterfaces",
        &[
            ("Filter.1.Name", "description"),
            ("Filter.1.Value.1", &format!("ELB {res}")),
        ],
    );
    extract(&xml, "privateIpAddress")
        .unwrap_or_else(|| panic!("no interface for {lb_arn}: {xml}"))
        .to_string()
}

/// Target id -> health state.
fn health(d: &ApiDaemon, tg: &str) -> BTreeMap<String, String> {
    let xml = d.elb("DescribeTargetHealth", &[("TargetGroupArn", tg)]);
    extract_all(&xml, "member")
        .iter()
        .filter_map(|m| {
            let id = extract(extract(m, "Target")?, "Id")?;
            let state = extract(extract(m, "TargetHealth")?, "State")?;
            Some((id.to_string(), state.to_string()))
        })
        .collect()
}

/// `n` HTTP requests from `client` to the load balancer, one connection
/// each: (target id, the address the target saw) per answer.
fn fetch_many(d: &ApiDaemon, client: &str, vip: &str, n: usize) -> Vec<(String, String)> {
    let out = d.sh_ok(
        client,
        &format!(
            "for i in $(seq 1 {n}); do {}; done",
            http_get(vip, 80, "/cgi-bin/who")
        ),
        Duration::from_secs(240),
    );
    out.lines()
        .filter(|l| l.starts_with("i-"))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let target = w.next()?.to_string();
            // busybox httpd listens on IPv6: "[::ffff:10.0.1.4]".
            let from = w
                .next()?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .trim_start_matches("::ffff:")
                .to_string();
            Some((target, from))
        })
        .collect()
}

/// A shell command doing one HTTP/1.0 GET with busybox nc (the guest's
/// wget crashes); prints the whole reply.
fn http_get(host: &str, port: u16, path: &str) -> String {
    format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {host} {port}")
}

#[test]
fn nat_gateway_fetch_shows_the_elastic_ip() {
    nat_gateway(NatCase::Fetch);
}

#[test]
fn nat_gateway_stream_survives_node_loss() {
    nat_gateway(NatCase::NodeLoss);
}

#[test]
fn nlb_spreads_connections_evenly() {
    load_balancer(NlbCase::Spread);
}

#[test]
fn nlb_avoids_unhealthy_targets() {
    load_balancer(NlbCase::Health);
}

//! Uplink tests against the real kernel: a TAP created here, moved into a
//! network namespace of the test's own, with traffic both ways.
//!
//! They need root (CAP_NET_ADMIN, `ip netns`) and /dev/net/tun. Without
//! them they print SKIPPED, or fail when `ENILAB_REQUIRE_GUESTS=1`.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use enilab_switch::wire::checksum::{finish, pseudo_header, sum};
use enilab_switch::{
    CsumOffload, DropReason, Egress, GsoKind, GsoOffload, PacketMeta, PortConfig, PortId, Snapshot,
    SubnetConfig, Switch, MAX_PORTS,
};

use super::UplinkError;
use crate::port::{PortEgress, PortHandle, Waker};
use crate::{BackendError, Datapath};

const NS_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 77);
const PEER_MAC: [u8; 6] = [0x02, 0xe1, 0, 0, 0, 0x77];
const PORT: PortId = 7;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// `<prefix><pid in hex>-<n>`: short enough for an interface name.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{:x}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Returns true (after saying so loudly) when the test cannot run here.
fn skip(reason: &str) -> bool {
    if std::env::var("ENILAB_REQUIRE_GUESTS").as_deref() == Ok("1") {
        panic!("uplink test cannot run and ENILAB_REQUIRE_GUESTS=1: {reason}");
    }
    // Straight to stderr: libtest does not capture it, so the skip shows.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: uplink test needs root and /dev/net/tun: {reason}"
    );
    true
}

fn run(argv: &[&str]) -> Result<String, String> {
    run_with_input(argv, &[])
}

/// Run `argv` with `input` on its stdin; its stdout on success.
fn run_with_input(argv: &[&str], input: &[u8]) -> Result<String, String> {
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{argv:?}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{argv:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{argv:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace of this test; deleted on drop together with every
/// process the test started in it.
struct TestNs {
    name: String,
    children: Vec<Child>,
}

impl TestNs {
    fn new() -> Result<TestNs, String> {
        // `enilab-test-<decimal pid>-<n>`, the form enilab-control's
        // `Netns::sweep_stale` recognises after a killed run.
        let name = format!(
            "enilab-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name])?;
        Ok(TestNs {
            name,
            children: Vec::new(),
        })
    }

    fn exec(&self, argv: &[&str]) -> Result<String, String> {
        self.exec_with_input(argv, &[])
    }

    fn exec_with_input(&self, argv: &[&str], input: &[u8]) -> Result<String, String> {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(argv);
        run_with_input(&v, input)
    }

    /// A counter of the namespace's /proc/net/snmp, e.g. ("Icmp", "InEchoReps").
    fn snmp(&self, group: &str, field: &str) -> u64 {
        let text = self.exec(&["cat", "/proc/net/snmp"]).expect("read snmp");
        let prefix = format!("{group}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            panic!("no {group} in /proc/net/snmp");
        };
        let i = names
            .split_whitespace()
            .position(|n| n == field)
            .unwrap_or_else(|| panic!("no {group}.{field}"));
        values
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad {group}.{field}"))
    }

    /// Start `argv` in the namespace with its stdout piped.
    fn spawn(&mut self, argv: &[&str]) -> Result<&mut Child, String> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{argv:?}: {e}"))?;
        self.children.push(child);
        Ok(self.children.last_mut().expect("just pushed"))
    }

    /// Move the TAP in, address it, bring it up; returns its MAC.
    fn adopt(&self, dev: &str, cidr: &str) -> Result<[u8; 6], String> {
        run(&["ip", "link", "set", dev, "netns", &self.name])?;
        // IPv4 only: no IPv6 autoconfiguration noise in the counters.
        self.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        self.exec(&["ip", "link", "set", "lo", "up"])?;
        self.exec(&["ip", "addr", "add", cidr, "dev", dev])?;
        self.exec(&["ip", "link", "set", dev, "up"])?;
        let out = self.exec(&["cat", &format!("/sys/class/net/{dev}/address")])?;
        parse_mac(out.trim()).ok_or_else(|| format!("bad MAC {out:?}"))
    }

    /// Delete the namespace now (its TAP goes with it).
    fn delete(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        self.delete();
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A datapath with an uplink whose TAP sits in a fresh namespace with
/// 203.0.113.1/24 (or `cidr`).
struct Fixture {
    dp: Datapath,
    uplink: Option<super::Uplink>,
    ns: TestNs,
    ns_mac: [u8; 6],
}

impl Fixture {
    fn new(cidr: &str) -> Option<Fixture> {
        let dp = Datapath::new(Switch::new(), 1);
        let tap = unique("eut");
        let uplink = match dp.add_uplink(&tap, PORT) {
            Ok(u) => u,
            Err(BackendError::Uplink(
                e @ (UplinkError::NotPermitted(_) | UplinkError::TunMissing(_)),
            )) => {
                skip(&e.to_string());
                return None;
            }
            Err(e) => panic!("add_uplink: {e}"),
        };
        let ns = match TestNs::new() {
            Ok(ns) => ns,
            Err(e) => {
                skip(&e);
                return None;
            }
        };
        let ns_mac = ns.adopt(&tap, cidr).expect("set up the namespace side");
        Some(Fixture {
            dp,
            uplink: Some(uplink),
            ns,
            ns_mac,
        })
    }

    fn uplink(&self) -> &super::Uplink {
        self.uplink.as_ref().expect("uplink present")
    }

    /// Queue a frame for the uplink port the way the switch does.
    fn inject(&self, frame: &[u8], meta: &PacketMeta) -> bool {
        let mut egress = PortEgress::new(&self.dp.ports, &self.dp.pool);
        let ok = egress.emit(PORT, 0, frame, meta);
        egress.wake_all();
        ok
    }

    /// Start a one-datagram UDP receiver on `port` in the namespace; its
    /// output arrives on the returned channel.
    fn udp_receiver(&mut self, port: u16) -> mpsc::Receiver<String> {
        let addr = format!("UDP4-RECVFROM:{port},bind={NS_IP}");
        let child = self
            .ns
            .spawn(&["socat", "-u", &addr, "STDOUT"])
            .expect("socat in the namespace");
        let mut out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            let _ = tx.send(s);
        });
        rx
    }
}

/// Ethernet + IPv4 + UDP, IPv4 header checksum filled, UDP checksum left
/// to the caller.
fn udp_frame(
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len() as u16;
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = 20 + udp_len;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = finish(sum(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Inject `frame` every 200 ms until the receiver reports, for up to 10 s.
fn deliver(fx: &Fixture, frame: &[u8], meta: &PacketMeta, rx: &mpsc::Receiver<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        assert!(fx.inject(frame, meta), "the uplink port refused a frame");
        if let Ok(s) = rx.recv_timeout(Duration::from_millis(200)) {
            return s;
        }
    }
    panic!(
        "nothing arrived in the namespace; uplink stats {:?}",
        fx.uplink().stats()
    );
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn frame_queued_for_uplink_reaches_namespace() {
    let Some(mut fx) = Fixture::new("203.0.113.1/24") else {
        return;
    };
    let rx = fx.udp_receiver(40001);
    let frame = udp_frame(fx.ns_mac, PEER_IP, NS_IP, 40001, b"hello-uplink\n");
    let got = deliver(&fx, &frame, &PacketMeta::default(), &rx);
    assert_eq!(got, "hello-uplink\n");
    let st = fx.uplink().stats();
    assert!(st.written_packets >= 1, "{st:?}");
    assert_eq!(st.write_errors + st.offload_errors, 0, "{st:?}");
}

#[test]
fn partial_checksum_is_completed_before_the_tap() {
    let Some(mut fx) = Fixture::new("203.0.113.1/24") else {
        return;
    };
    let rx = fx.udp_receiver(40002);
    let payload = b"checksummed\n";
    let mut frame = udp_frame(fx.ns_mac, PEER_IP, NS_IP, 40002, payload);
    // As a guest with CSUM leaves it: the pseudo-header sum, folded but not
    // complemented. The namespace's kernel drops the datagram unless the
    // uplink completes it.
    let partial = !finish(pseudo_header(PEER_IP, NS_IP, 17, 8 + payload.len() as u16));
    frame[40..42].copy_from_slice(&partial.to_be_bytes());
    let meta = PacketMeta {
        csum: Some(CsumOffload {
            start: 34,
            offset: 6,
        }),
        gso: None,
    };
    assert_eq!(deliver(&fx, &frame, &meta, &rx), "checksummed\n");
    assert_eq!(fx.uplink().stats().offload_errors, 0);
}

#[test]
fn frame_from_namespace_enters_switch_on_uplink_port() {
    let Some(fx) = Fixture::new("203.0.113.1/24") else {
        return;
    };
    let sw = fx.dp.switch().clone();
    let before = sw.stats(PORT);
    // The namespace ARPs for the datagram's target; those requests are
    // what the switch sees.
    fx.ns
        .exec_with_input(&["socat", "-u", "STDIN", "UDP4-SENDTO:203.0.113.9:9"], b"x")
        .expect("send from the namespace");
    wait_for("the switch to count ingress on the uplink port", || {
        sw.stats(PORT).tx_packets > before.tx_packets
    });
    // The port is in no snapshot, so every frame read is dropped as
    // PortDown. ARP retries may still be arriving: wait for the counters
    // to agree rather than reading them once.
    wait_for("uplink and switch counters to agree", || {
        let st = fx.uplink().stats();
        let now = sw.stats(PORT);
        let tx = now.tx_packets - before.tx_packets;
        let down = now.drops(DropReason::PortDown) - before.drops(DropReason::PortDown);
        st.read_packets == tx && down == tx && st.dropped == tx
    });
}

/// Both directions through the real pipeline: the namespace is a port of
/// 10.9.0.0/24, ARPs for the gateway and pings it; the switch answers both
/// back out of the uplink.
#[test]
fn namespace_pings_the_vpc_router_through_the_switch() {
    let Some(fx) = Fixture::new("10.9.0.10/24") else {
        return;
    };
    let sw = fx.dp.switch().clone();
    let snap = Snapshot::build(
        1,
        vec![SubnetConfig {
            id: "subnet-t".into(),
            vpc_id: "vpc-t".into(),
            cidr: (Ipv4Addr::new(10, 9, 0, 0), 24),
            dns: None,
            ..Default::default()
        }],
        vec![PortConfig {
            id: PORT,
            eni_id: "eni-uplink".into(),
            mac: fx.ns_mac,
            subnet: 0,
            primary_ip: Ipv4Addr::new(10, 9, 0, 10),
            secondary_ips: Vec::new(),
            mtu: 1500,
            ..Default::default()
        }],
    )
    .expect("snapshot");
    sw.publish(snap);
    let replies = fx.ns.snmp("Icmp", "InEchoReps");
    // An ICMP echo request through a raw socket (no ping binary needed):
    // type 8, id 0x4242, seq 1, checksum over the whole message.
    let mut echo = vec![8, 0, 0, 0, 0x42, 0x42, 0, 1];
    echo.extend_from_slice(b"enilab-uplink");
    let c = finish(sum(&echo));
    echo[2..4].copy_from_slice(&c.to_be_bytes());
    let deadline = Instant::now() + Duration::from_secs(10);
    while fx.ns.snmp("Icmp", "InEchoReps") < replies + 2 {
        assert!(
            Instant::now() < deadline,
            "no echo replies from the VPC router; uplink {:?}, switch {:?}",
            fx.uplink().stats(),
            sw.stats(PORT)
        );
        fx.ns
            .exec_with_input(&["socat", "-u", "STDIN", "IP4-SENDTO:10.9.0.1:1"], &echo)
            .expect("send an echo request");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The switch answered the namespace's ARP with the gateway MAC.
    let neigh = fx
        .ns
        .exec(&["ip", "neigh", "show", "10.9.0.1"])
        .expect("ip neigh");
    let gw = enilab_switch::GATEWAY_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    assert!(neigh.contains(&gw), "{neigh}");
    let st = fx.uplink().stats();
    // ARP and echo replies, all hairpinned out of the uplink.
    assert!(st.replied >= 3, "{st:?}");
    assert!(st.written_packets >= 3, "{st:?}");
    assert!(sw.stats(PORT).arp_replies >= 1);
}

/// The metadata server's TAP is a second uplink on the same datapath: the
/// first namespace, an ENI of 10.9.0.0/24 as above, pings 169.254.169.254
/// (on-link, so it ARPs for it) and the metadata namespace's kernel answers
/// to the switch's client address for it. That namespace has no neighbour
/// entry for its gateway: the switch answers its ARP on the metadata port.
#[test]
fn second_uplink_serves_the_metadata_namespace() {
    use enilab_switch::{MetadataConfig, Topology, GATEWAY_MAC, IMDS_ADDR};
    let Some(fx) = Fixture::new("10.9.0.10/24") else {
        return;
    };
    let md_port = PORT + 1;
    let md_tap = unique("eut");
    let md = fx
        .dp
        .add_uplink(&md_tap, md_port)
        .expect("a second uplink beside the first");
    let md_ns = TestNs::new().expect("metadata namespace");
    let md_mac = md_ns
        .adopt(&md_tap, "169.254.169.254/16")
        .expect("set up the metadata namespace");
    md_ns
        .exec(&["ip", "route", "add", "100.64.0.0/10", "via", "169.254.0.1"])
        .expect("route to client addresses");
    fx.ns
        .exec(&[
            "ip",
            "route",
            "add",
            "169.254.169.254/32",
            "dev",
            fx.uplink().name(),
        ])
        .expect("on-link route to the metadata address");
    let sw = fx.dp.switch().clone();
    let topo = Topology {
        generation: 1,
        subnets: vec![SubnetConfig {
            id: "subnet-t".into(),
            vpc_id: "vpc-t".into(),
            cidr: (Ipv4Addr::new(10, 9, 0, 0), 24),
            ..Default::default()
        }],
        ports: vec![PortConfig {
            id: PORT,
            eni_id: "eni-uplink".into(),
            mac: fx.ns_mac,
            subnet: 0,
            primary_ip: Ipv4Addr::new(10, 9, 0, 10),
            ..Default::default()
        }],
        metadata: Some(MetadataConfig {
            port: md_port,
            peer_mac: md_mac,
        }),
        ..Topology::default()
    };
    sw.publish(Snapshot::compile(topo).expect("snapshot"));

    let replies = fx.ns.snmp("Icmp", "InEchoReps");
    let mut echo = vec![8, 0, 0, 0, 0x4d, 0x44, 0, 1];
    echo.extend_from_slice(b"enilab-imds");
    let c = finish(sum(&echo));
    echo[2..4].copy_from_slice(&c.to_be_bytes());
    let to = format!("IP4-SENDTO:{IMDS_ADDR}:1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fx.ns.snmp("Icmp", "InEchoReps") < replies + 2 {
        assert!(
            Instant::now() < deadline,
            "no echo replies from the metadata namespace; uplinks {:?} {:?}, switch {:?} {:?}",
            fx.uplink().stats(),
            md.stats(),
            sw.stats(PORT),
            sw.stats(md_port)
        );
        fx.ns
            .exec_with_input(&["socat", "-u", "STDIN", &to], &echo)
            .expect("send an echo request");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(md_ns.snmp("Icmp", "InEchos") >= 2);
    let neigh = fx
        .ns
        .exec(&["ip", "neigh", "show", &IMDS_ADDR.to_string()])
        .expect("ip neigh");
    let gw = GATEWAY_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    assert!(neigh.contains(&gw), "{neigh}");
    let st = md.stats();
    assert!(st.written_packets >= 2 && st.read_packets >= 2, "{st:?}");
    assert!(
        sw.stats(md_port).arp_replies >= 1,
        "{:?}",
        sw.stats(md_port)
    );
}

/// User plus system CPU ticks of this process's thread named `name`
/// (truncated to the kernel's 15 bytes).
fn thread_cpu_ticks(name: &str) -> u64 {
    let comm = &name[..name.len().min(15)];
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = task.expect("task entry").path();
        let Ok(c) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if c.trim_end() != comm {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).expect("task stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // After the name: state is field 3, utime 14, stime 15.
        let utime: u64 = fields[11].parse().expect("utime");
        let stime: u64 = fields[12].parse().expect("stime");
        return utime + stime;
    }
    panic!("no thread named {comm}");
}

#[test]
fn uplink_survives_its_namespace_going_away() {
    let Some(mut fx) = Fixture::new("203.0.113.1/24") else {
        return;
    };
    fx.ns.delete();
    // The TAP is destroyed with the namespace; the uplink must notice, stop
    // watching the fd and keep counting instead of spinning or panicking.
    wait_for("the uplink to see its TAP gone", || {
        fx.uplink().stats().tap_gone
    });
    let frame = udp_frame(fx.ns_mac, PEER_IP, NS_IP, 9, b"x");
    assert!(fx.inject(&frame, &PacketMeta::default()));
    wait_for("the write to be counted as an error", || {
        fx.uplink().stats().write_errors >= 1
    });
    assert!(fx.uplink().is_running());
    let cpu = thread_cpu_ticks(&format!("uplink-{}", fx.uplink().name()));
    std::thread::sleep(Duration::from_millis(500));
    let spent = thread_cpu_ticks(&format!("uplink-{}", fx.uplink().name())) - cpu;
    // A spinning thread burns ~50 ticks (USER_HZ 100) in 500 ms.
    assert!(
        spent < 10,
        "the uplink thread spins: {spent} ticks in 500 ms"
    );
    fx.uplink.take();
}

#[test]
fn dropping_the_uplink_deletes_the_tap_and_frees_the_port() {
    let dp = Datapath::new(Switch::new(), 1);
    let tap = unique("eut");
    let up = match dp.add_uplink(&tap, PORT) {
        Ok(u) => u,
        Err(BackendError::Uplink(
            e @ (UplinkError::NotPermitted(_) | UplinkError::TunMissing(_)),
        )) => {
            skip(&e.to_string());
            return;
        }
        Err(e) => panic!("add_uplink: {e}"),
    };
    let sys = std::path::Path::new("/sys/class/net").join(&tap);
    assert!(sys.exists(), "TAP {tap} not created");
    assert!(up.is_running());
    assert!(dp.ports.get(PORT).is_some());
    // The same name again is refused, not attached to.
    match dp.add_uplink(&tap, PORT + 1) {
        Err(BackendError::Uplink(UplinkError::NameInUse(n))) => assert_eq!(n, tap),
        other => panic!("second TAP of the same name: {other:?}"),
    }
    drop(up);
    wait_for("the TAP to disappear with its uplink", || !sys.exists());
    assert!(dp.ports.get(PORT).is_none());
}

#[test]
fn refused_arguments() {
    let dp = Datapath::new(Switch::new(), 1);
    let w = Arc::new(Waker::new().expect("eventfd"));
    dp.ports.insert(Arc::new(PortHandle::new(3, &[w])));
    let err = |r: Result<super::Uplink, BackendError>| match r {
        Err(BackendError::Uplink(e)) => e,
        other => panic!("expected an uplink error, got {other:?}"),
    };
    assert!(matches!(
        err(dp.add_uplink("eut-x", 3)),
        UplinkError::PortInUse(3)
    ));
    assert!(matches!(
        err(dp.add_uplink("eut-x", MAX_PORTS as PortId)),
        UplinkError::PortRange(_)
    ));
    assert!(matches!(
        err(dp.add_uplink("tap%d", 4)),
        UplinkError::BadName(_)
    ));
    assert!(matches!(
        err(dp.add_uplink("a-name-far-too-long", 4)),
        UplinkError::BadName(_)
    ));
}

#[test]
fn gso_frames_are_segmented_or_refused() {
    let Some(fx) = Fixture::new("203.0.113.1/24") else {
        return;
    };
    // A TCP super-packet of 3000 payload bytes at MSS 1000: three frames.
    let mut frame = udp_frame(fx.ns_mac, PEER_IP, NS_IP, 9, &[]);
    frame.truncate(34);
    frame[23] = 6;
    let total = (20 + 20 + 3000u16).to_be_bytes();
    frame[16..18].copy_from_slice(&total);
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = finish(sum(&frame[14..34]));
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&9u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    frame.extend_from_slice(&tcp);
    frame.extend_from_slice(&[0xab; 3000]);
    let tso = PacketMeta {
        csum: Some(CsumOffload {
            start: 34,
            offset: 16,
        }),
        gso: Some(GsoOffload {
            kind: GsoKind::Tcpv4,
            size: 1000,
            hdr_len: 54,
            ecn: false,
        }),
    };
    let before = fx.uplink().stats().written_packets;
    assert!(fx.inject(&frame, &tso));
    wait_for("three segments written", || {
        fx.uplink().stats().written_packets == before + 3
    });

    // UDP GSO is not finished in software: refused and counted.
    let udp = udp_frame(fx.ns_mac, PEER_IP, NS_IP, 9, &[0u8; 3000]);
    let uso = PacketMeta {
        csum: None,
        gso: Some(GsoOffload {
            kind: GsoKind::Udp,
            size: 1400,
            hdr_len: 42,
            ecn: false,
        }),
    };
    assert!(fx.inject(&udp, &uso));
    wait_for("the UDP GSO frame to be refused", || {
        fx.uplink().stats().offload_errors == 1
    });
    assert_eq!(fx.uplink().stats().written_packets, before + 3);
}

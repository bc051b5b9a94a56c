//! The whole service in a real namespace: needs root and /dev/net/tun
//! (skipped loudly otherwise, a failure with ENILAB_REQUIRE_GUESTS=1).
//! Dropping the service on any exit, a failed assertion included, removes
//! the namespace; a killed run's namespace is swept by the next start.

use std::io::Write;
use std::net::UdpSocket;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Mutex;

use super::*;
use crate::imds::http::{TOKEN_HEADER, TOKEN_PATH, TTL_HEADER};
use crate::imds::render::tests::world;
use crate::imds::testutil::{request, FakeSource, HttpReply};
use crate::netns::NetnsError;
use enilab_backend::{BackendError, UplinkError};

/// The namespace tests one at a time: one of them counts namespaces.
static SERIAL: Mutex<()> = Mutex::new(());

fn skip(reason: &str) {
    if std::env::var("ENILAB_REQUIRE_GUESTS").as_deref() == Ok("1") {
        panic!("IMDS namespace test cannot run and ENILAB_REQUIRE_GUESTS=1: {reason}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: IMDS namespace test needs root and /dev/net/tun: {reason}"
    );
}

fn start(dp: &Datapath, port: PortId, source: Arc<dyn MetadataSource>) -> Option<ImdsService> {
    match ImdsService::start(dp, port, source) {
        Ok(s) => Some(s),
        Err(
            e @ (ImdsError::Netns(NetnsError::NotPermitted)
            | ImdsError::Netns(NetnsError::Spawn(..))
            | ImdsError::Backend(BackendError::Uplink(
                UplinkError::NotPermitted(_) | UplinkError::TunMissing(_),
            ))),
        ) => {
            skip(&e.to_string());
            None
        }
        Err(e) => panic!("ImdsService::start: {e:?}"),
    }
}

/// `ip netns exec NS argv...`: (status code, stdout).
fn exec(ns: &str, argv: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .output()
        .expect("ip netns exec");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn host_has(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn netns_listed(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

/// A raw socket that sees every TCP segment arriving in the namespace of
/// the calling thread, IP header included.
fn tcp_tap() -> std::io::Result<UdpSocket> {
    // SAFETY: socket(2) with constant arguments; no memory is passed.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody
    // else; the OwnedFd closes it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // recv(2) and SO_RCVTIMEO work on any socket: borrow UdpSocket's.
    let s = UdpSocket::from(fd);
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    Ok(s)
}

/// (source port, destination port, TTL) of each captured segment.
fn captured(tap: &UdpSocket) -> Vec<(u16, u16, u8)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = tap.recv(&mut buf) {
        let p = &buf[..n];
        let ihl = usize::from(p.first().copied().unwrap_or(0) & 0x0f) * 4;
        if n < ihl + 4 || ihl < 20 {
            continue;
        }
        let sport = u16::from_be_bytes([p[ihl], p[ihl + 1]]);
        let dport = u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]);
        out.push((sport, dport, p[8]));
    }
    out
}

#[test]
fn serves_v1_and_v2_inside_its_namespace_with_hop_limit_one() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let w = world("netns");
    let source = FakeSource::new(w.lab.api.store.clone(), &w.instance);
    let dp = Datapath::new(enilab_switch::Switch::new(), 1);
    let Some(svc) = start(&dp, 7, source.clone()) else {
        return;
    };
    let ns = svc.netns().to_string();
    let ifname = svc.ifname().to_string();
    assert!(ns.starts_with(&format!("{NETNS_PREFIX}-{}-", std::process::id())));
    assert_eq!(svc.port(), 7);

    // The plumbing.
    let (_, addrs) = exec(&ns, &["ip", "-o", "-4", "addr", "show", "dev", &ifname]);
    assert!(addrs.contains("169.254.169.254/16"), "{addrs}");
    let (_, routes) = exec(&ns, &["ip", "-4", "route", "show", "100.64.0.0/10"]);
    assert!(
        routes.contains(&format!("via 169.254.0.1 dev {ifname}")),
        "{routes}"
    );
    let (_, neigh) = exec(&ns, &["ip", "neigh", "show", "169.254.0.1"]);
    assert!(
        neigh.contains("lladdr 02:e1:1a:00:00:03") && neigh.contains("PERMANENT"),
        "{neigh}"
    );
    let (_, link) = exec(&ns, &["ip", "-o", "link", "show", "dev", &ifname]);
    assert!(
        link.contains(&format!("link/ether {}", format_mac(&svc.peer_mac()))),
        "{link}"
    );
    assert_ne!(svc.peer_mac(), [0; 6]);
    assert!(
        !host_has(&["link", "show", "dev", &ifname]),
        "TAP left in our namespace"
    );

    // A client inside the namespace, with a capture of what crosses lo.
    let addr = SocketAddr::from((IMDS_ADDR, 80));
    let id = w.instance.clone();
    let (segments, replies) = in_netns(&ns, move || {
        let tap = tcp_tap()?;
        let token = request(addr, "PUT", TOKEN_PATH, &[(TTL_HEADER, "120")])?;
        let t = token.text();
        let v2 = request(
            addr,
            "GET",
            "/latest/meta-data/instance-id",
            &[(TOKEN_HEADER, &t)],
        )?;
        let bad = request(
            addr,
            "GET",
            "/latest/meta-data/instance-id",
            &[(TOKEN_HEADER, "bm90IGEgdG9rZW4=")],
        )?;
        let v1 = request(addr, "GET", "/latest/meta-data/instance-id", &[])?;
        Ok((captured(&tap), vec![token, v2, bad, v1]))
    })
    .unwrap()
    .unwrap();
    let [token, v2, bad, v1]: [HttpReply; 4] = replies.try_into().unwrap();
    assert_eq!(token.status, 200);
    assert_eq!(token.text().len(), 44);
    assert_eq!((v2.status, v2.text()), (200, id.clone()));
    assert_eq!(bad.status, 401);
    assert_eq!((v1.status, v1.text()), (200, id.clone()));
    let from_server: Vec<u8> = segments
        .iter()
        .filter(|(s, _, _)| *s == 80)
        .map(|(_, _, ttl)| *ttl)
        .collect();
    let to_server: Vec<u8> = segments
        .iter()
        .filter(|(_, d, _)| *d == 80)
        .map(|(_, _, ttl)| *ttl)
        .collect();
    assert!(from_server.len() >= 8, "{segments:?}");
    assert!(from_server.iter().all(|t| *t == 1), "{segments:?}");
    // The capture tells TTLs apart: the client's own segments are not 1.
    assert!(
        !to_server.is_empty() && to_server.iter().all(|t| *t > 1),
        "{segments:?}"
    );
    assert!(source.asked.lock().unwrap().iter().all(|a| *a == IMDS_ADDR));

    // A real client agrees, when the host has one.
    if Command::new("curl").arg("--version").output().is_ok() {
        let curl = |args: &[&str]| {
            let mut argv = vec!["curl", "-sS", "--max-time", "5"];
            argv.extend_from_slice(args);
            exec(&ns, &argv)
        };
        let (code, tok) = curl(&[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 21600",
            "http://169.254.169.254/latest/api/token",
        ]);
        assert_eq!(code, Some(0));
        assert_eq!(tok.len(), 44, "{tok}");
        let hdr = format!("X-aws-ec2-metadata-token: {tok}");
        let (_, got) = curl(&[
            "-H",
            &hdr,
            "http://169.254.169.254/latest/meta-data/instance-id",
        ]);
        assert_eq!(got, id);
        let (_, status) = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "X-aws-ec2-metadata-token: nope",
            "http://169.254.169.254/latest/meta-data/instance-id",
        ]);
        assert_eq!(status, "401");
        let (_, status) = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
            "-H",
            "X-Forwarded-For: 10.0.0.1",
            "http://169.254.169.254/latest/api/token",
        ]);
        assert_eq!(status, "403");
        let (_, macs) = curl(&["http://169.254.169.254/latest/meta-data/network/interfaces/macs/"]);
        assert!(macs.contains(&w.eni1.mac), "{macs}");
    } else {
        let _ = writeln!(
            std::io::stderr(),
            "note: no curl on this host; skipped its part"
        );
    }
    let st = svc.stats();
    assert!(
        st.tokens >= 1 && st.v1 >= 1 && st.v2 >= 1 && st.unauthorized >= 1,
        "{st:?}"
    );

    // Dropping it removes the namespace and the TAP, and frees the port.
    drop(svc);
    assert!(!netns_listed(&ns), "{ns} survived");
    let again = dp.add_uplink(&ifname, 7).expect("port 7 free again");
    drop(again);
}

#[test]
fn a_failed_start_leaves_nothing_behind() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let w = world("failstart");
    let source = FakeSource::new(w.lab.api.store.clone(), &w.instance);
    let dp = Datapath::new(enilab_switch::Switch::new(), 1);
    // Port out of range: fails after the namespace exists.
    let before = list_ours();
    match ImdsService::start(&dp, enilab_switch::MAX_PORTS as PortId, source) {
        Err(ImdsError::Backend(BackendError::Uplink(UplinkError::PortRange(_)))) => {}
        Err(e @ ImdsError::Netns(NetnsError::NotPermitted | NetnsError::Spawn(..))) => {
            skip(&e.to_string());
            return;
        }
        other => panic!("expected a port range error: {other:?}"),
    }
    assert_eq!(list_ours(), before, "a namespace was left behind");
}

/// Our process's metadata namespaces.
fn list_ours() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let mine = format!("{NETNS_PREFIX}-{}-", std::process::id());
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&mine))
        .map(String::from)
        .collect();
    v.sort();
    v
}

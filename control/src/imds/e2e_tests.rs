//! A real guest against the metadata server, without the switch: a
//! namespace plays the VPC (a bridge as the subnet router, busybox udhcpd
//! as its DHCP, 169.254.169.254 on its loopback) and QEMU boots the image
//! with two plain TAP NICs carrying the ENIs' MACs. The guest agent must
//! configure the second ENI from metadata and follow an address move.
//!
//! Slow (a TCG boot) and needs root, QEMU, busybox and a built image:
//! `ENILAB_IMAGE_DIR=images/out cargo test -p enilab-control --lib
//! imds::e2e_tests -- --ignored --nocapture`.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::http::{Limits, Server};
use super::render::tests::world;
use super::service::in_netns;
use super::testutil::FakeSource;
use super::IMDS_ADDR;
use crate::netns::Netns;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn console_until(path: &PathBuf, what: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(path) {
            let _ = f.read_to_string(&mut s);
        }
        if what.iter().all(|w| s.contains(w)) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "console never showed {what:?}:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
#[ignore = "boots a guest under TCG; needs root, QEMU, busybox and ENILAB_IMAGE_DIR"]
fn guest_agent_configures_enis_from_metadata() {
    let dir = PathBuf::from(std::env::var("ENILAB_IMAGE_DIR").expect("ENILAB_IMAGE_DIR"));
    let image = crate::image::Image::in_dir(&dir).expect("an image in ENILAB_IMAGE_DIR");
    let w = world("e2e");
    let source = FakeSource::new(w.lab.api.store.clone(), &w.instance);
    Netns::sweep_stale("enilab-imds-e2e");
    let ns = Netns::create("enilab-imds-e2e").unwrap();
    let t = Duration::from_secs(10);
    for c in [
        "ip link set lo up",
        "ip link add br0 type bridge",
        "ip addr add 10.9.1.1/24 dev br0",
        "ip link set br0 up",
        "ip addr add 169.254.169.254/32 dev lo",
    ] {
        let argv: Vec<&str> = c.split(' ').collect();
        ns.run(&argv, t).unwrap();
    }
    let addr = SocketAddr::from((IMDS_ADDR, 80));
    let listener = in_netns(ns.name(), move || TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    let server = Server::start(listener, source, Limits::default()).unwrap();

    let run_dir = std::env::temp_dir().join(format!("enilab-imds-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).unwrap();
    let (e0, e1) = (&w.eni0, &w.eni1);
    let conf = run_dir.join("udhcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "start 10.9.1.200\nend 10.9.1.250\ninterface br0\nlease_file {}\n\
             option subnet 255.255.255.0\noption router 10.9.1.1\noption lease 600\n\
             static_lease {} {}\nstatic_lease {} {}\n",
            run_dir.join("leases").display(),
            e0.mac,
            e0.primary_ip(),
            e1.mac,
            e1.primary_ip()
        ),
    )
    .unwrap();
    let _dhcpd = ns
        .spawn(
            &["busybox", "udhcpd", "-f", conf.to_str().unwrap()],
            Stdio::null(),
            Stdio::null(),
        )
        .unwrap();
    let console = run_dir.join("console.log");
    let qemu = Command::new("ip")
        .args(["netns", "exec", ns.name(), "qemu-system-x86_64"])
        .args([
            "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "512",
        ])
        .args(["-display", "none", "-no-reboot", "-serial"])
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", "console=ttyS0 panic=-1"])
        .args(["-netdev", "tap,id=n0,ifname=e2et0,script=no,downscript=no"])
        .arg("-device")
        .arg(format!("virtio-net-pci,netdev=n0,mac={}", e0.mac))
        .args(["-netdev", "tap,id=n1,ifname=e2et1,script=no,downscript=no"])
        .arg("-device")
        .arg(format!("virtio-net-pci,netdev=n1,mac={}", e1.mac))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _qemu = Kill(qemu);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = ["e2et0", "e2et1"].iter().all(|tap| {
            ns.run(&["ip", "link", "set", tap, "master", "br0", "up"], t)
                .is_ok()
        });
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "QEMU's TAPs never appeared");
        std::thread::sleep(Duration::from_millis(200));
    }

    let secondary = e1.private_ips[1].ip.clone();
    let boot = console_until(
        &console,
        &[
            &format!("eni: ip addr replace {secondary}/24 dev eth1"),
            &format!("eni: ip rule add from {secondary}/32 lookup 10001 priority 10001"),
            "eni: ip route replace default via 10.9.1.1 dev eth1 table 10001",
            &format!(
                "eni: ip route replace 10.9.1.0/24 dev eth0 src {} table 10000",
                e0.primary_ip()
            ),
        ],
        Duration::from_secs(180),
    );
    // The guest answers on the secondary address of eth1.
    let pinged = (0..5).any(|_| {
        ns.run(&["busybox", "ping", "-c", "1", "-W", "2", &secondary], t)
            .is_ok()
    });
    assert!(pinged, "no answer from {secondary}:\n{boot}");
    assert!(server.stats().v2 > 0, "{:?}", server.stats());

    // Move the secondary address to the primary ENI.
    w.lab.call(
        "AssignPrivateIpAddresses",
        &[
            ("NetworkInterfaceId", &e0.id),
            ("PrivateIpAddress.1", &secondary),
            ("AllowReassignment", "true"),
        ],
    );
    let moved = console_until(
        &console,
        &[
            &format!("eni: ip addr del {secondary}/24 dev eth1"),
            &format!("eni: ip addr replace {secondary}/24 dev eth0"),
            &format!("eni: ip rule add from {secondary}/32 lookup 10000 priority 10000"),
        ],
        Duration::from_secs(30),
    );
    let count = |log: &str| log.lines().filter(|l| l.contains("eni: ip ")).count();
    // Settled: a few more rounds run nothing.
    std::thread::sleep(Duration::from_secs(3));
    let settled = console_until(&console, &[], t);
    std::thread::sleep(Duration::from_secs(3));
    let later = console_until(&console, &[], t);
    assert_eq!(count(&settled), count(&later), "{later}");
    assert!(count(&settled) >= count(&moved));

    // Detached (the NIC stays in this test): its rules and table go.
    let att = w.lab.eni(&e1.id).attachment.unwrap().id;
    w.lab
        .call("DetachNetworkInterface", &[("AttachmentId", &att)]);
    let detached = console_until(
        &console,
        &[
            "eth1: no longer an ENI here",
            &format!(
                "eni: ip rule del from {}/32 lookup 10001 priority 10001",
                e1.primary_ip()
            ),
            "eni: ip route flush table 10001",
        ],
        Duration::from_secs(30),
    );
    let eni_lines: Vec<&str> = detached.lines().filter(|l| l.contains("eni:")).collect();
    eprintln!("{}", eni_lines.join("\n"));
    let _ = std::fs::remove_dir_all(&run_dir);
}

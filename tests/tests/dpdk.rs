//! DPDK scenarios: `dpdk-testpmd`'s virtio-user PMD is a real vhost-user
//! frontend (a synthetic guest). Two of them on two ENIs of a datapath-only
//! lab exchange UDP through the backend and the switch.
//!
//! Needs `dpdk-testpmd`, at least 512 free 2 MiB hugepages and a mounted
//! hugetlbfs; without them the tests print `skipped: ...`, or fail when
//! `ENILAB_REQUIRE_DPDK=1`. Each testpmd is pinned to its own core (REFERENCE
//! §3: two busy pollers on one core collapse throughput).
//!
//! Run with `cargo test -p enilab-tests --test dpdk -- --test-threads=1`.

use std::net::Ipv4Addr;
use std::time::Duration;

use enilab_tests::*;

/// Upper bound of every scenario.
const BUDGET: Duration = Duration::from_secs(120);
/// What testpmd prints once its ports run (non-interactive mode).
const READY: &str = "Press enter to exit";

/// EAL arguments of one testpmd on `socket` (virtio-user with the ENI's
/// MAC), pinned to `core`.
fn eal_args(lab: &TestLab, who: &str, core: u32, socket: &str, mac: &str) -> Vec<String> {
    vec![
        format!("--lcores=0@{core},1@{core}"),
        "--no-pci".into(),
        format!("--file-prefix={}", lab.unique(who)),
        "-m".into(),
        "256".into(),
        "--single-file-segments".into(),
        "--no-telemetry".into(),
        "--vdev".into(),
        format!("net_virtio_user0,path={socket},queues=1,mac={mac}"),
    ]
}

fn _test_testpmd_virtio_user(frame_len: u32, seconds: u64) {
    let Some(env) = require_dpdk() else {
        return;
    };
    eprintln!(
        "dpdk: {} ({} free hugepages, hugetlbfs {})",
        env.testpmd.display(),
        env.free_hugepages,
        env.hugetlbfs.display()
    );
    let lab = TestLab::datapath_only("testpmd", BUDGET);
    let subnet = lab.subnet(Ipv4Addr::new(10, 0, 5, 0), 24);
    let (ea, eb) = (lab.eni(subnet, 1), lab.eni(subnet, 1));
    let info = |e: &str| {
        (
            lab.eni_socket(e).expect("socket").display().to_string(),
            mac_str(&lab.eni_mac(e).expect("mac")),
            lab.eni_ip(e).expect("ip"),
            lab.eni_port(e).expect("port"),
        )
    };
    let (sock_a, mac_a, ip_a, port_a) = info(&ea);
    let (sock_b, mac_b, ip_b, port_b) = info(&eb);
    lab.step(format!(
        "A {ea} {ip_a} {mac_a} (port {port_a}) -> B {eb} {ip_b} {mac_b} (port {port_b})"
    ));

    // B receives (rxonly) on core 1; A sends UDP to B's IP and MAC on core 0.
    let mut b = Testpmd::spawn(
        &lab,
        &env,
        "b",
        &eal_args(&lab, "b", 1, &sock_b, &mac_b),
        &[
            "--forward-mode=rxonly".into(),
            "--nb-cores=1".into(),
            "--total-num-mbufs=16384".into(),
        ],
    );
    assert!(
        b.wait_for(READY, Duration::from_secs(30)),
        "testpmd b did not start:\n{}",
        b.output()
    );
    assert!(
        wait_until(Duration::from_secs(10), || lab.eni_sessions(&eb) == Some(1)),
        "no vhost-user session on B's ENI"
    );
    let mut a = Testpmd::spawn(
        &lab,
        &env,
        "a",
        &eal_args(&lab, "a", 0, &sock_a, &mac_a),
        &[
            "--forward-mode=txonly".into(),
            "--nb-cores=1".into(),
            "--total-num-mbufs=16384".into(),
            format!("--txpkts={frame_len}"),
            format!("--eth-peer=0,{mac_b}"),
            format!("--tx-ip={ip_a},{ip_b}"),
        ],
    );
    assert!(
        a.wait_for(READY, Duration::from_secs(30)),
        "testpmd a did not start:\n{}",
        a.output()
    );
    lab.step(format!("forwarding for {seconds} s"));
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));

    let out_a = a.stop(Duration::from_secs(15));
    let ran = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let out_b = b.stop(Duration::from_secs(15));
    let sa = parse_testpmd_stats(&out_a)
        .unwrap_or_else(|| panic!("no statistics in testpmd a's output:\n{out_a}"));
    let sb = parse_testpmd_stats(&out_b)
        .unwrap_or_else(|| panic!("no statistics in testpmd b's output:\n{out_b}"));
    let sw_a = lab.switch().stats(port_a);
    let sw_b = lab.switch().stats(port_b);
    let dev_a: u64 = lab
        .eni_queue_stats(&ea)
        .expect("stats")
        .iter()
        .map(|q| q.tx_packets)
        .sum();
    let dev_b: u64 = lab
        .eni_queue_stats(&eb)
        .expect("stats")
        .iter()
        .map(|q| q.rx_packets)
        .sum();
    eprintln!("testpmd a (txonly, {frame_len} B): {sa:?}");
    eprintln!("testpmd b (rxonly): {sb:?}");
    eprintln!("switch port {port_a} (a): {sw_a:?}");
    eprintln!("switch port {port_b} (b): {sw_b:?}");
    eprintln!("device a tx_packets {dev_a}, device b rx_packets {dev_b}");
    eprintln!(
        "rate over {ran:.1} s: sent {:.3} Mpps, received {:.3} Mpps",
        sa.tx_packets as f64 / ran / 1e6,
        sb.rx_packets as f64 / ran / 1e6
    );

    assert!(sa.tx_packets > 0, "testpmd a sent nothing:\n{out_a}");
    assert!(
        sb.rx_packets > 0,
        "testpmd b received nothing; switch a {sw_a:?}; switch b {sw_b:?}\n{out_b}"
    );
    // The backend took A's frames off its TX ring, the switch forwarded
    // them to B's port, and B's RX ring got them.
    assert!(sw_a.tx_packets > 0, "switch saw nothing from a: {sw_a:?}");
    assert!(
        sw_b.rx_packets > 0,
        "switch forwarded nothing to b: {sw_b:?}"
    );
    assert_eq!(sw_a.drops(enilab_switch::DropReason::SourceCheck), 0);
    assert_eq!(sw_a.drops(enilab_switch::DropReason::NoRoute), 0);
    // Conservation: every frame the device took off A's TX ring reached the
    // switch, and every one of those was delivered to B or counted as a
    // drop (QueueFull when B's testpmd falls behind).
    assert!(
        dev_a <= sa.tx_packets,
        "device a {dev_a} > testpmd a {}",
        sa.tx_packets
    );
    assert_eq!(sw_a.tx_packets, dev_a, "switch ingress from a vs device a");
    assert_eq!(
        sw_a.tx_packets,
        sw_b.rx_packets + sw_a.total_drops() + sw_b.total_drops(),
        "frames from a = delivered to b + drops"
    );
    assert_eq!(sw_b.rx_packets, dev_b, "switch egress to b vs device b");
    // A stopped first, so B's testpmd drained its ring before it stopped.
    assert_eq!(sb.rx_packets, dev_b, "testpmd b vs device b");
    assert!(sa.tx_packets >= sb.rx_packets);
    assert_eq!(
        sw_b.rx_bytes,
        sw_b.rx_packets * u64::from(frame_len),
        "frames to b are not {frame_len} bytes"
    );
}

#[test]
fn test_testpmd_virtio_user_64b() {
    _test_testpmd_virtio_user(64, 5);
}

#[test]
fn test_testpmd_virtio_user_1024b() {
    _test_testpmd_virtio_user(1024, 3);
}

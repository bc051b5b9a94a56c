use enilab_tests::*;
use std::net::Ipv4Addr;
use std::time::Duration;

#[test]
fn explore() {
    let Some(env) = require_guests() else { return };
    let vcpus: u32 = std::env::var("X_VCPUS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let qp: u16 = std::env::var("X_QP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let lab = TestLab::with_guests(&env, "explore", Duration::from_secs(170));
    let sn = lab.subnet(Ipv4Addr::new(10, 9, 1, 0), 24);
    let eni = lab.eni(sn, qp);
    let li = lab
        .launch("a", &[eni.clone()], vcpus, 512, Duration::from_secs(100))
        .unwrap();
    lab.track_pid(li.qemu.pid());
    let g = Guest::new(&lab, "a", &eni);
    let t = Duration::from_secs(20);
    std::thread::sleep(Duration::from_secs(5));
    for s in [
        "busybox --list | tr '\\n' ' '",
        "ethtool -l eth0",
        "cat /proc/uptime",
        "which iperf3 nc md5sum sha256sum dd reboot ethtool",
        "busybox nc --help 2>&1 | head -30",
        "ls /sys/class/net/eth0/queues",
        "cat /proc/interrupts | grep virtio",
        "ip -s link show eth0",
        "ip addr",
    ] {
        let o = g.sh(s, t);
        eprintln!("$ {s}\n{}{}[{}]", o.stdout_str(), o.stderr_str(), o.code);
    }
    eprintln!(
        "sessions {:?} qstats {:#?}",
        lab.eni_sessions(&g.eni),
        lab.eni_queue_stats(&g.eni)
    );
    eprintln!("switch {:?}", lab.switch().stats(g.port));
}

//! The soak run (issue 8): four real guests, continuous TCP and UDP traffic
//! with checksummed payloads (`enilab-agent blast`/`sink`), hot attach and
//! detach churn every few seconds, ENI moves between instances, and a
//! backend restart halfway. At the end: zero corrupted bytes or datagrams,
//! no stuck flow (the TCP stream never stalls long and never has to
//! reconnect more than the restart allows), and the daemon's file
//! descriptors and RSS where they started. It prints the start and end
//! counts and a summary.
//!
//! `ENILAB_SOAK_SECONDS` sets the traffic time (default 45; `.ci/run` uses
//! 600). `scripts/soak [SECONDS]` runs it alone. Only 10.x addresses and
//! loopback are addressed; every loop is bounded by the deadline.

use std::time::{Duration, Instant};

use enilab_tests::*;

const BOOT: Duration = Duration::from_secs(120);
const SHORT: Duration = Duration::from_secs(30);
/// Churn period: one attach or detach every this often.
const CHURN: Duration = Duration::from_secs(4);

fn secs() -> u64 {
    std::env::var("ENILAB_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45)
        .clamp(20, 3600)
}

/// The daemon's fds and resident set (KiB).
fn footprint(d: &ApiDaemon) -> (u64, u64) {
    let fds = d.status()["driver"]["process"]["fds"].as_u64().unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{}/status", d.daemon_pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

/// Run `script` in `id` on its own thread; its stdout when it ends.
fn background(
    d: &ApiDaemon,
    id: &str,
    script: String,
    limit: Duration,
) -> std::thread::JoinHandle<String> {
    let agent = d.agent_socket(id);
    std::thread::spawn(move || {
        let mut c = enilab_control::agent::AgentClient::connect(agent).expect("agent");
        let out = c
            .exec_capture(&["sh", "-c", &script], limit)
            .expect("background command");
        assert!(out.success(), "`{script}`: {}", out.stderr_str());
        out.stdout_str()
    })
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn soak(traffic_s: u64) {
    let tag = "soak";
    let Some(env) = require_guests() else { return };
    let Some(bin) = require(REQUIRE_GUESTS, enilab_bin()) else {
        return;
    };
    eprintln!(
        "[{tag}] {traffic_s} s of traffic; accelerator {} ({})",
        env.accel.accel, env.accel.reason
    );
    let d = ApiDaemon::start(bin, tag, Duration::from_secs(traffic_s + 400), &[]);
    let vpc = d.open_vpc("10.0.0.0/16");
    let subnet = d.subnet(&vpc, "10.0.1.0/24");
    let guests = d.boot(&subnet, 4, BOOT);
    let (a, _) = &guests[0];
    let (b, b_ip) = &guests[1];
    let hosts = [guests[2].0.clone(), guests[3].0.clone()];
    let churn_eni = d.get(
        "CreateNetworkInterface",
        &[("SubnetId", &subnet)],
        "networkInterfaceId",
    );

    // Sinks first (they outlive the senders), then the senders.
    let limit = Duration::from_secs(traffic_s + 120);
    let sink_s = traffic_s + 15;
    let tcp_sink = background(
        &d,
        b,
        format!("enilab-agent sink tcp {b_ip}:7100 {sink_s}"),
        limit,
    );
    let udp_sink = background(
        &d,
        b,
        format!("enilab-agent sink udp {b_ip}:7101 {sink_s}"),
        limit,
    );
    std::thread::sleep(Duration::from_secs(2));
    let tcp_src = background(
        &d,
        a,
        format!("enilab-agent blast tcp {b_ip}:7100 {traffic_s}"),
        limit,
    );
    let udp_src = background(
        &d,
        a,
        format!("enilab-agent blast udp {b_ip}:7101 {traffic_s}"),
        limit,
    );
    std::thread::sleep(Duration::from_secs(3));
    let start = footprint(&d);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(traffic_s.saturating_sub(5));

    // Churn until the traffic is nearly over: attach the spare ENI to one
    // host, detach it (every third time forced: an ENI move), switch host.
    let (mut attaches, mut moves, mut restarts) = (0u32, 0u32, 0u32);
    let mut restarted = false;
    let mut host = 0usize;
    while Instant::now() < deadline {
        let t = Instant::now();
        let att = d.get(
            "AttachNetworkInterface",
            &[
                ("NetworkInterfaceId", &churn_eni),
                ("InstanceId", &hosts[host]),
                ("DeviceIndex", "1"),
            ],
            "attachmentId",
        );
        d.wait("the churn ENI attached", SHORT * 2, || {
            d.attachment_status(&churn_eni) == "attached"
        });
        attaches += 1;
        std::thread::sleep(CHURN.saturating_sub(t.elapsed()) / 2);
        let force = attaches % 3 == 0;
        d.ok(
            "DetachNetworkInterface",
            &[
                ("AttachmentId", &att),
                ("Force", if force { "true" } else { "false" }),
            ],
        );
        d.wait("the churn ENI detached", SHORT * 2, || {
            d.attachment_status(&churn_eni).is_empty()
        });
        if force {
            moves += 1;
        }
        host = 1 - host;
        if !restarted && started.elapsed() >= Duration::from_secs(traffic_s / 2) {
            let (code, v) = d.live("/enilab/backend/restart");
            assert_eq!(code, 200, "backend restart: {v}");
            restarted = true;
            restarts += 1;
        }
        std::thread::sleep(CHURN.saturating_sub(t.elapsed()));
    }
    assert!(restarted, "the run was too short for a backend restart");

    let tcp_sent = json(&tcp_src.join().expect("tcp sender"));
    let udp_sent = json(&udp_src.join().expect("udp sender"));
    let tcp = json(&tcp_sink.join().expect("tcp sink"));
    let udp = json(&udp_sink.join().expect("udp sink"));
    // Let background unplugs and the restart's leftovers settle.
    let mut end = footprint(&d);
    wait_until(Duration::from_secs(20), || {
        end = footprint(&d);
        end.0 <= start.0 + 4
    });

    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    eprintln!("[{tag}] start: daemon fds {} rss {} KiB", start.0, start.1);
    eprintln!("[{tag}] end:   daemon fds {} rss {} KiB", end.0, end.1);
    eprintln!(
        "[{tag}] summary: {traffic_s} s; {attaches} hot attaches, {moves} forced moves, \
         {restarts} backend restart(s); TCP sent {} bytes in {} connection(s), received {} \
         (corrupt {}, longest stall {} ms); UDP sent {}, good {}, corrupt {}, highest seq {}",
        n(&tcp_sent, "bytes"),
        n(&tcp_sent, "connects"),
        n(&tcp, "bytes"),
        n(&tcp, "corrupt"),
        n(&tcp, "stall_ms"),
        n(&udp_sent, "sent"),
        n(&udp, "good"),
        n(&udp, "corrupt"),
        n(&udp, "highest"),
    );
    assert_eq!(n(&tcp, "corrupt"), 0, "corrupted TCP bytes: {tcp}");
    assert_eq!(n(&udp, "corrupt"), 0, "corrupted UDP datagrams: {udp}");
    assert!(n(&tcp, "bytes") > 0 && n(&udp, "good") > 0, "{tcp} {udp}");
    // No stuck flow: the one stream carried on through everything (a
    // reconnect would mean it broke), never silent for long.
    assert_eq!(
        n(&tcp_sent, "connects"),
        1,
        "the TCP stream broke: {tcp_sent}"
    );
    assert!(
        n(&tcp, "stall_ms") < 15_000,
        "the TCP stream stalled: {tcp}"
    );
    // What the sender wrote minus what sits in socket buffers arrived.
    assert!(
        n(&tcp, "bytes") + 8 * 1024 * 1024 >= n(&tcp_sent, "bytes"),
        "received {} of {} TCP bytes",
        n(&tcp, "bytes"),
        n(&tcp_sent, "bytes")
    );
    assert!(attaches >= 2, "churn did not run");
    assert!(
        end.0 <= start.0 + 4,
        "daemon fds grew: {start:?} -> {end:?}"
    );
    assert!(
        end.1 <= start.1 + start.1 / 2 + 64 * 1024,
        "daemon RSS grew: {start:?} -> {end:?}"
    );
}

#[test]
fn soak_traffic_churn_and_restart() {
    soak(secs());
}

//! Failover and live operations with real guests (issue 6), on the
//! `ApiDaemon` harness. Every scenario runs a UDP probe in client C (one
//! datagram every 50 ms to an echo server that answers with its instance
//! id) and reads the blackout as the longest gap between two replies, with
//! who answered on each side.
//!
//! `ENILAB_BLACKOUT_RUNS=N` repeats the measured scenarios N times and
//! prints p50/p95 (`scripts/blackout` runs them with 10); the default is
//! one run each, to keep the suite short.
//!
//! Run: `cargo build -p enilab-control && cargo test -p enilab-tests --test
//! failover -- --test-threads=1 --nocapture`. Only 10.x VPC addresses.

use std::time::{Duration, Instant};

use enilab_tests::*;
use serde_json::Value;

const BUDGET: Duration = Duration::from_secs(900);
const BOOT: Duration = Duration::from_secs(180);
const SHORT: Duration = Duration::from_secs(30);
const ECHO_PORT: u16 = 7001;
const KV_PORT: u16 = 7000;
/// The probe's interval.
const PROBE_MS: u64 = 50;

fn runs() -> usize {
    std::env::var("ENILAB_BLACKOUT_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .clamp(1, 50)
}

/// A daemon, a VPC 10.0.0.0/16 with subnet 10.0.1.0/24 open inside the
/// VPC, instances A and B (the ENI's holder and its standby) and client C,
/// and ENI E (address X) attached to A at device 1.
struct Lab {
    d: ApiDaemon,
    vpc: String,
    subnet: String,
    a: String,
    b: String,
    c: String,
    a_ip: String,
    b_ip: String,
    eni: String,
    x: String,
}

fn lab(tag: &str) -> Option<Lab> {
    let env = require_guests()?;
    let bin = require(REQUIRE_GUESTS, enilab_bin())?;
    eprintln!(
        "[{tag}] accelerator {} ({})",
        env.accel.accel, env.accel.reason
    );
    let d = ApiDaemon::start(bin, tag, BUDGET, &[]);
    let vpc = d.open_vpc("10.0.0.0/16");
    let subnet = d.subnet(&vpc, "10.0.1.0/24");
    let v: Vec<(String, String)> = (0..3).map(|_| d.launch(&subnet)).collect();
    for (id, ip) in &v {
        d.wait_guest(id, BOOT);
        d.wait(&format!("{ip} on {id}"), BOOT, || {
            d.sh(id, "ip -4 -o addr show", SHORT)
                .stdout_str()
                .contains(&format!("inet {ip}/"))
        });
    }
    let xml = d.ok("CreateNetworkInterface", &[("SubnetId", &subnet)]);
    let eni = extract_all(&xml, "networkInterfaceId")[0].to_string();
    let x = extract_all(&xml, "privateIpAddress")[0].to_string();
    let l = Lab {
        vpc,
        subnet,
        a: v[0].0.clone(),
        a_ip: v[0].1.clone(),
        b: v[1].0.clone(),
        b_ip: v[1].1.clone(),
        c: v[2].0.clone(),
        eni,
        x,
        d,
    };
    attach(&l.d, &l.eni, &l.a);
    for id in [&l.a, &l.b] {
        l.d.sh_ok(
            id,
            &format!("/sbin/enilab-agent echo 0.0.0.0:{ECHO_PORT} >/dev/null 2>&1 &"),
            SHORT,
        );
    }
    let (d, c, x) = (&l.d, &l.c, &l.x);
    d.wait(&format!("{x} answering on A"), SHORT * 2, || d.pings(c, x));
    Some(l)
}

fn attach(d: &ApiDaemon, eni: &str, inst: &str) -> String {
    let att = d.get(
        "AttachNetworkInterface",
        &[
            ("NetworkInterfaceId", eni),
            ("InstanceId", inst),
            ("DeviceIndex", "1"),
        ],
        "attachmentId",
    );
    d.wait(&format!("{eni} attached to {inst}"), SHORT, || {
        d.attachment_status(eni) == "attached"
    });
    att
}

fn attachment(d: &ApiDaemon, eni: &str) -> (String, String) {
    let xml = d.ok(
        "DescribeNetworkInterfaces",
        &[("NetworkInterfaceId.1", eni)],
    );
    let a = extract(&xml, "attachment").unwrap_or("");
    (
        extract(a, "attachmentId").unwrap_or("").to_string(),
        extract(a, "instanceId").unwrap_or("").to_string(),
    )
}

fn extract<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    extract_all(xml, tag).into_iter().next()
}

/// What the probe in C saw.
#[derive(Debug)]
struct Probe {
    gap: Duration,
    from: String,
    to: String,
    before: u64,
    after: u64,
    last: String,
    raw: Value,
}

/// Probe `ip` from C for `secs` while `during` runs (after `lead` of
/// steady replies). The probe runs detached in the guest (it must outlive
/// a daemon restart, which ends the agent sessions); its JSON is read after.
fn probe_while(
    l: &mut Lab,
    ip: &str,
    secs: u64,
    lead: Duration,
    during: impl FnOnce(&mut ApiDaemon),
) -> Probe {
    let out_file = "/tmp/probe.json";
    l.d.sh_ok(
        &l.c,
        &format!("rm -f {out_file}; /sbin/enilab-agent probe {ip}:{ECHO_PORT} {PROBE_MS} {secs} >{out_file} 2>&1 &"),
        SHORT,
    );
    let t = Instant::now();
    std::thread::sleep(lead);
    during(&mut l.d);
    let d = &l.d;
    let mut text = String::new();
    d.wait("the probe's report", Duration::from_secs(secs + 60), || {
        if t.elapsed() < Duration::from_secs(secs) {
            return false;
        }
        text = d.sh(&l.c, &format!("cat {out_file}"), SHORT).stdout_str();
        text.trim_end().ends_with('}')
    });
    let raw: Value =
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("probe output {text:?}: {e}"));
    let s = |k: &str| raw[k].as_str().unwrap_or("").to_string();
    let n = |k: &str| raw[k].as_u64().unwrap_or(0);
    // A change of responder is a failover: its blackout is the switch
    // (last reply from A to first from B), not the window's longest gap.
    let switched = !s("switch_to").is_empty();
    let pick = |sw: &str, gap: &str| if switched { s(sw) } else { s(gap) };
    Probe {
        gap: Duration::from_millis(if switched {
            n("switch_ms")
        } else {
            n("max_gap_ms")
        }),
        from: pick("switch_from", "gap_from"),
        to: pick("switch_to", "gap_to"),
        before: n("before"),
        after: n("after"),
        last: s("last"),
        raw,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut v: Vec<Duration>) {
    v.sort();
    eprintln!(
        "BLACKOUT {what}: runs {} p50 {} ms p95 {} ms max {} ms",
        v.len(),
        percentile(&v, 0.5).as_millis(),
        percentile(&v, 0.95).as_millis(),
        v[v.len() - 1].as_millis()
    );
}

/// Leak-relevant counts from the daemon: fds, threads, datapath workers,
/// devices, and NICs over all guests.
fn counts(d: &ApiDaemon) -> (u64, u64, u64, usize, u64) {
    let st = d.status();
    let p = &st["driver"]["process"];
    let nics = st["driver"]["vms"]
        .as_array()
        .map(|v| v.iter().map(|x| x["nics"].as_u64().unwrap_or(0)).sum())
        .unwrap_or_default();
    (
        p["fds"].as_u64().unwrap_or(0),
        // Threads, less the tokio runtimes' elastic blocking pools (the
        // API's and the metadata server's): those grow with concurrent
        // requests and idle out after 10 s, which is no leak.
        p["thread_names"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "enilab-api" | "enilab-imds-ren"))
                    .filter_map(|(_, v)| v.as_u64())
                    .sum()
            })
            .unwrap_or_else(|| p["threads"].as_u64().unwrap_or(0)),
        p["worker_threads"].as_u64().unwrap_or(0),
        st["driver"]["devices"]
            .as_array()
            .map(|v| v.len())
            .unwrap_or(0),
        nics,
    )
}

/// How a move is made in the failover scenarios.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// DetachNetworkInterface Force=true, then AttachNetworkInterface.
    Operator,
    /// A failover group; the holder's guest hangs (QMP `stop`).
    AutoHang,
    /// A failover group; the holder's QEMU is killed.
    AutoKill,
}

/// The ENI moves between A and B `runs` times (killing ends after one);
/// clients keep using X. Operator mode also checks for leaks.
fn scenario_failover(mode: Mode) {
    let Some(mut l) = lab(&format!("{mode:?}")) else {
        return;
    };
    let runs = if mode == Mode::AutoKill {
        1
    } else if mode == Mode::Operator {
        runs().max(5)
    } else {
        runs()
    };
    if mode != Mode::Operator {
        l.d.ok(
            "CreateFailoverGroup",
            &[
                ("NetworkInterfaceId", &l.eni),
                ("StandbyInstanceId.1", &l.a),
                ("StandbyInstanceId.2", &l.b),
            ],
        );
    }
    let before = counts(&l.d);
    let mut gaps = Vec::new();
    let (mut holder, mut standby) = (l.a.clone(), l.b.clone());
    let (x, eni) = (l.x.clone(), l.eni.clone());
    for run in 0..runs {
        let p = probe_while(&mut l, &x, 8, Duration::from_secs(2), |d| match mode {
            Mode::Operator => {
                let (att, _) = attachment(d, &eni);
                d.ok(
                    "DetachNetworkInterface",
                    &[("AttachmentId", &att), ("Force", "true")],
                );
                d.wait("detached", SHORT, || d.attachment_status(&eni).is_empty());
                attach(d, &eni, &standby);
            }
            Mode::AutoHang => d.pause(&holder, true),
            Mode::AutoKill => assert!(d.kill_guest(&holder), "kill {holder}"),
        });
        let d = &l.d;
        eprintln!("[{mode:?}] run {run}: {holder} -> {standby}: {}", p.raw);
        assert_eq!(
            attachment(d, &l.eni).1,
            standby,
            "run {run}: the ENI is on the standby"
        );
        assert!(
            p.before > 0 && p.after > 0,
            "run {run}: replies before and after: {p:?}"
        );
        assert_eq!(
            (p.from.as_str(), p.to.as_str()),
            (holder.as_str(), standby.as_str()),
            "run {run}: {p:?}"
        );
        assert_eq!(p.last, standby, "run {run}: the standby answers at the end");
        gaps.push(p.gap);
        if mode == Mode::AutoKill {
            // Recorded as EC2 records a failed host: stopped, InternalError.
            d.wait(&format!("{holder} stopped"), SHORT, || {
                d.instance_state(&holder) == "stopped"
            });
            let xml = d.ok("DescribeInstances", &[("InstanceId.1", &holder)]);
            let reason = extract(&xml, "stateReason").unwrap_or("");
            assert!(reason.contains("Server.InternalError"), "{xml}");
        }
        if mode == Mode::AutoHang {
            // Still running, but its instance status check fails.
            assert_eq!(d.instance_state(&holder), "running");
            assert_eq!(status_check(d, &holder), "impaired");
            assert_eq!(status_check(d, &standby), "ok");
            // The hung guest comes back and is a standby again.
            d.pause(&holder, false);
            let h = holder.clone();
            d.wait("resumed guest healthy", SHORT, || {
                d.status()["driver"]["vms"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|v| {
                        v["instance"] == h.as_str()
                            && v["heartbeat_ms"].as_u64().is_some_and(|m| m < 500)
                    })
            });
        }
        std::mem::swap(&mut holder, &mut standby);
    }
    let d = &l.d;
    let what = match mode {
        Mode::Operator => "operator failover (detach Force + attach)",
        Mode::AutoHang => "automatic failover, guest hung (last reply from A to first from B)",
        Mode::AutoKill => "automatic failover, QEMU killed",
    };
    report(what, gaps.clone());
    if mode == Mode::AutoHang {
        let g = d.ok("DescribeFailoverGroups", &[]);
        assert_eq!(
            extract(&g, "failoverCount"),
            Some(runs.to_string().as_str()),
            "{g}"
        );
    }
    if mode == Mode::Operator {
        // No leaks: after the moves the same fds, threads, workers,
        // devices and guest NICs as before (background unplugs settle).
        let mut after = counts(d);
        let settled = wait_until(Duration::from_secs(20), || {
            after = counts(d);
            after.0 <= before.0
                && after.1 <= before.1 + 1
                && after.2 == before.2
                && after.3 == before.3
                && after.4 == before.4
        });
        assert!(
            settled,
            "leak after {runs} failovers: before {before:?} after {after:?}; threads by name {}",
            d.status()["driver"]["process"]["thread_names"]
        );
    }
}

#[test]
fn failover_operator() {
    scenario_failover(Mode::Operator);
}

#[test]
fn failover_automatic_hang() {
    scenario_failover(Mode::AutoHang);
}

#[test]
fn failover_automatic_kill() {
    scenario_failover(Mode::AutoKill);
}

/// A secondary address of A's primary ENI moves to B's primary ENI
/// (AllowReassignment): the MAC behind it changes, traffic follows.
fn scenario_reassign() {
    let Some(mut l) = lab("reassign") else { return };
    let d = &l.d;
    let enis = |inst: &str| {
        let xml = d.ok(
            "DescribeNetworkInterfaces",
            &[
                ("Filter.1.Name", "attachment.instance-id"),
                ("Filter.1.Value.1", inst),
                ("Filter.2.Name", "attachment.device-index"),
                ("Filter.2.Value.1", "0"),
            ],
        );
        extract(&xml, "networkInterfaceId")
            .unwrap_or("")
            .to_string()
    };
    let (ea, eb) = (enis(&l.a), enis(&l.b));
    let y = d.get(
        "AssignPrivateIpAddresses",
        &[
            ("NetworkInterfaceId", &ea),
            ("SecondaryPrivateIpAddressCount", "1"),
        ],
        "privateIpAddress",
    );
    d.wait(&format!("{y} on A"), SHORT * 2, || d.pings(&l.c, &y));
    let mut gaps = Vec::new();
    let (mut from, mut to) = ((l.a.clone(), ea), (l.b.clone(), eb));
    for run in 0..runs() {
        let target = to.1.clone();
        let p = probe_while(&mut l, &y, 8, Duration::from_secs(2), |d| {
            d.ok(
                "AssignPrivateIpAddresses",
                &[
                    ("NetworkInterfaceId", &target),
                    ("PrivateIpAddress.1", &y),
                    ("AllowReassignment", "true"),
                ],
            );
        });
        let d = &l.d;
        eprintln!("[reassign] run {run}: {} -> {}: {}", from.0, to.0, p.raw);
        assert!(p.before > 0 && p.after > 0, "run {run}: {p:?}");
        assert_eq!(p.last, to.0, "run {run}: the new holder answers: {p:?}");
        // The old guest dropped the address.
        let old = from.0.clone();
        d.wait(&format!("{y} gone from {old}"), SHORT, || {
            !d.sh(&old, "ip -4 -o addr show", SHORT)
                .stdout_str()
                .contains(&format!("inet {y}/"))
        });
        gaps.push(p.gap);
        std::mem::swap(&mut from, &mut to);
    }
    let ann = l.d.status()["driver"]["process"]["announcements"]
        .as_u64()
        .unwrap_or(0);
    assert!(ann >= runs() as u64, "a gratuitous ARP per move: {ann}");
    report("IP reassignment (AllowReassignment)", gaps);
}

#[test]
fn reassign_private_ip() {
    scenario_reassign();
}

/// The backend restarts (every card's worker group) under running guests,
/// or the daemon does: traffic resumes, same QEMU.
fn scenario_restart(daemon: bool) {
    let Some(mut l) = lab(if daemon {
        "daemon-restart"
    } else {
        "backend-restart"
    }) else {
        return;
    };
    let pid = l.d.qemu_pid(&l.a);
    let mut gaps = Vec::new();
    let a_ip = l.a_ip.clone();
    let flaps = |l: &Lab| [&l.a, &l.c].map(|id| carrier_changes(&l.d, id));
    let before = flaps(&l);
    for run in 0..runs() {
        let p = probe_while(&mut l, &a_ip, 8, Duration::from_secs(2), |d| {
            if daemon {
                d.restart();
            } else {
                let (code, v) = d.live("/enilab/backend/restart");
                assert_eq!(code, 200, "{v}");
                eprintln!("[backend] restart: {v}");
            }
        });
        eprintln!(
            "[{}] run {run}: {}",
            if daemon { "daemon" } else { "backend" },
            p.raw
        );
        assert!(
            p.before > 0 && p.after > 0,
            "run {run}: traffic resumes: {p:?}"
        );
        assert_eq!(p.last, l.a, "run {run}: {p:?}");
        // NICs have no status bit: the guests' carriers never dropped (a
        // flap flushes their ARP caches and cost a second, see failover.md).
        assert_eq!(flaps(&l), before, "run {run}: the guests saw a link flap");
        gaps.push(p.gap);
    }
    assert_eq!(l.d.qemu_pid(&l.a), pid, "the guest was not restarted");
    report(
        if daemon {
            "daemon restart"
        } else {
            "backend restart (all cards)"
        },
        gaps,
    );
}

/// The instance status check of `id` (DescribeInstanceStatus).
fn status_check(d: &ApiDaemon, id: &str) -> String {
    let xml = d.ok("DescribeInstanceStatus", &[("InstanceId.1", id)]);
    let check = extract(&xml, "instanceStatus").unwrap_or("");
    extract(check, "status").unwrap_or("").to_string()
}

/// A holder whose agent is silent for ~1.8 s while its vCPUs run (the
/// agent is SIGSTOPped: what a loaded host looks like to the detector)
/// keeps its ENI: the silence is suspected, QEMU says the guest runs, and
/// the detector waits for RUNNING_SILENCE_TIMEOUT rather than 1.2 s.
fn scenario_slow_holder() {
    let Some(l) = lab("slow-holder") else { return };
    let d = &l.d;
    let g = d.get(
        "CreateFailoverGroup",
        &[
            ("NetworkInterfaceId", &l.eni),
            ("StandbyInstanceId.1", &l.a),
            ("StandbyInstanceId.2", &l.b),
        ],
        "failoverGroupId",
    );
    // The supervised agent is the one started without arguments.
    d.sh_ok(
        &l.a,
        "for p in $(pidof enilab-agent); do \
           [ \"$(tr '\\0' ' ' </proc/$p/cmdline)\" = '/sbin/enilab-agent ' ] && A=$p; done; \
         [ -n \"$A\" ] || exit 1; \
         (sleep 0.3; kill -STOP $A; sleep 1.8; kill -CONT $A) </dev/null >/dev/null 2>&1 &",
        SHORT,
    );
    let group = || d.ok("DescribeFailoverGroups", &[("FailoverGroupId.1", &g)]);
    d.wait("the silence suspected", SHORT, || {
        extract(&group(), "lastEvent").is_some_and(|e| e.contains("suspected"))
    });
    d.wait(&format!("{}'s heartbeat back", l.a), SHORT, || {
        status_check(d, &l.a) == "ok"
    });
    std::thread::sleep(Duration::from_millis(500));
    let xml = group();
    assert_eq!(extract(&xml, "failoverCount"), Some("0"), "{xml}");
    assert_eq!(attachment(d, &l.eni).1, l.a, "the ENI stayed on A: {xml}");
}

#[test]
fn slow_holder_keeps_its_eni() {
    scenario_slow_holder();
}

/// Every interface's carrier-change count in guest `id` (`eth0=2 eth1=2`).
fn carrier_changes(d: &ApiDaemon, id: &str) -> String {
    let out = d
        .sh(
            id,
            "for f in /sys/class/net/eth*/carrier_changes; do echo $f $(cat $f); done",
            SHORT,
        )
        .stdout_str();
    let v: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let (path, n) = l.split_once(' ')?;
            Some(format!("{}={}", path.split('/').nth(4)?, n.trim()))
        })
        .collect();
    assert!(!v.is_empty(), "no carrier counters in {id}: {out:?}");
    v.join(" ")
}

#[test]
fn backend_restart() {
    scenario_restart(false);
}

#[test]
fn daemon_restart() {
    scenario_restart(true);
}

/// A KV pair: A serves on X and replicates every write to B before acking;
/// A's QEMU dies mid-stream, the group moves X to B, the client reconnects
/// to X and finds every acknowledged write.
fn scenario_kv() {
    let Some(l) = lab("kv") else { return };
    let d = &l.d;
    d.ok(
        "CreateFailoverGroup",
        &[
            ("NetworkInterfaceId", &l.eni),
            ("StandbyInstanceId.1", &l.b),
        ],
    );
    d.sh_ok(
        &l.b,
        &format!("/sbin/enilab-agent kv --listen 0.0.0.0:{KV_PORT} >/tmp/kv.log 2>&1 &"),
        SHORT,
    );
    d.sh_ok(
        &l.a,
        &format!("/sbin/enilab-agent kv --listen 0.0.0.0:{KV_PORT} --replica {}:{KV_PORT} >/tmp/kv.log 2>&1 &", l.b_ip),
        SHORT,
    );
    std::thread::sleep(Duration::from_secs(1));
    let x = l.x.clone();
    let out = std::thread::scope(|s| {
        let h = s.spawn(|| {
            d.exec(
                &l.c,
                &[
                    "/sbin/enilab-agent",
                    "kv-client",
                    &format!("{x}:{KV_PORT}"),
                    "12",
                ],
                Duration::from_secs(90),
            )
        });
        std::thread::sleep(Duration::from_secs(4));
        assert!(d.kill_guest(&l.a), "kill A");
        h.join().expect("kv client")
    });
    let v: Value = serde_json::from_str(out.stdout_str().trim()).unwrap_or_else(|e| {
        panic!(
            "kv-client said {:?} / {}: {e}",
            out.stdout_str(),
            out.stderr_str()
        )
    });
    eprintln!("[kv] {v}");
    let n = |k: &str| v[k].as_u64().unwrap_or(u64::MAX);
    assert_eq!(attachment(d, &l.eni).1, l.b, "X moved to B");
    assert!(n("acked") > 10, "writes were acknowledged: {v}");
    assert_eq!(
        (n("missing"), n("wrong"), n("unverified")),
        (0, 0, 0),
        "zero lost writes: {v}"
    );
}

#[test]
fn kv_survives_failover() {
    scenario_kv();
}

/// Failover to a standby that is down, full, or in another VPC fails with
/// a clear error and leaves the ENI attached nowhere.
fn scenario_bad_standby() {
    let Some(l) = lab("bad-standby") else { return };
    let d = &l.d;
    // Another VPC's instance (pending or running: the VPC check comes first).
    let vpc2 = d.get("CreateVpc", &[("CidrBlock", "10.1.0.0/16")], "vpcId");
    let sub2 = d.get(
        "CreateSubnet",
        &[("VpcId", &vpc2), ("CidrBlock", "10.1.1.0/24")],
        "subnetId",
    );
    let other = extract(
        &d.ok(
            "RunInstances",
            &[
                ("ImageId", "ami-0e1ab000000000001"),
                ("InstanceType", "t3.micro"),
                ("MinCount", "1"),
                ("MaxCount", "1"),
                ("SubnetId", &sub2),
            ],
        ),
        "instanceId",
    )
    .unwrap_or("")
    .to_string();
    // A full standby: B with a second ENI (t3.micro holds two).
    let filler = extract(
        &d.ok("CreateNetworkInterface", &[("SubnetId", &l.subnet)]),
        "networkInterfaceId",
    )
    .unwrap_or("")
    .to_string();
    // (case, standby, expected words in the message, setup, undo)
    type Step<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, String, &str, Step<'_>, Step<'_>)> = vec![
        (
            "another VPC",
            other.clone(),
            &vpc2,
            Box::new(|| {}),
            Box::new(|| {}),
        ),
        (
            "full",
            l.b.clone(),
            "exceeds the limit",
            Box::new(|| {
                attach(d, &filler, &l.b);
            }),
            Box::new(|| {
                let (att, _) = attachment(d, &filler);
                d.ok(
                    "DetachNetworkInterface",
                    &[("AttachmentId", &att), ("Force", "true")],
                );
                d.wait("filler detached", SHORT, || {
                    d.attachment_status(&filler).is_empty()
                });
            }),
        ),
        (
            "down",
            l.b.clone(),
            "is down",
            Box::new(|| d.pause(&l.b, true)),
            Box::new(|| d.pause(&l.b, false)),
        ),
    ];
    for (what, standby, words, setup, undo) in cases {
        if d.attachment_status(&l.eni).is_empty() {
            attach(d, &l.eni, &l.a);
        }
        setup();
        if what == "down" {
            std::thread::sleep(Duration::from_millis(1500));
        }
        let t = Instant::now();
        let err = d
            .call(
                "FailoverNetworkInterface",
                &[("NetworkInterfaceId", &l.eni), ("InstanceId.1", &standby)],
            )
            .expect_err(what);
        eprintln!(
            "[bad] {what}: {} in {:?}: {}",
            err.code,
            t.elapsed(),
            err.message
        );
        assert_eq!(err.code, "NoHealthyStandby", "{what}: {err:?}");
        assert!(
            err.message.contains(words),
            "{what}: the message says why: {}",
            err.message
        );
        assert!(
            err.message.contains("attached nowhere"),
            "{what}: {}",
            err.message
        );
        assert_eq!(d.attachment_status(&l.eni), "", "{what}: attached nowhere");
        let devs = d.status()["driver"]["devices"].clone();
        assert!(
            !devs
                .as_array()
                .into_iter()
                .flatten()
                .any(|x| x["eni"] == l.eni.as_str()),
            "{what}: no device left for the ENI: {devs}"
        );
        undo();
    }
    let _ = (&l.vpc, &l.x);
    d.ok("TerminateInstances", &[("InstanceId.1", &other)]);
}

#[test]
fn failover_to_a_bad_standby_leaves_the_eni_detached() {
    scenario_bad_standby();
}

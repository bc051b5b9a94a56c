//! Real-guest scenarios: QEMU 10 guests (TCG on this class of machine) whose
//! ENIs are served by enilab's backend and switch. One parameterised
//! function per scenario, thin `#[test]` wrappers; see `enilab_tests` for
//! the harness and the skip rule (`ENILAB_REQUIRE_GUESTS=1` turns missing
//! prerequisites into failures).
//!
//! Run with `cargo test -p enilab-tests --test guests -- --test-threads=1`.
//! The guests only talk to each other through our switch (private 10.x
//! addresses); no host networking is involved.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use enilab_tests::*;

/// Upper bound of every scenario (the watchdog kills its guests after it).
const BUDGET: Duration = Duration::from_secs(170);
/// Timeout of short guest commands.
const SHORT: Duration = Duration::from_secs(20);

/// A deterministic pseudo-random payload (xorshift64*).
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// First field of `md5sum`'s output.
fn md5_of(out: &str) -> String {
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Ping `to` from `from` `count` times and assert every reply came back.
fn assert_ping(from: &Guest, to: &Guest, count: u32) -> PingResult {
    let label = format!("{} -> {}", from.name, to.name);
    let p = from.ping(to.ip, count);
    eprintln!(
        "ping {label}: {}/{} received, rtt avg {:.2} ms",
        p.received, p.sent, p.rtt_avg_ms
    );
    let ok = p.sent == count && p.received == p.sent && p.rtt_avg_ms > 0.0;
    assert!(
        ok,
        "ping {label}: {p:?}\n--- {} ---\n{}\n--- {} ---\n{}",
        from.name,
        from.net_diagnostics(),
        to.name,
        to.net_diagnostics()
    );
    p
}

/// `Combined:` of the "Pre-set maximums" and "Current hardware settings"
/// sections of `ethtool -l`.
fn ethtool_combined(out: &str) -> (Option<u32>, Option<u32>) {
    let mut section = 0;
    let (mut max, mut cur) = (None, None);
    for line in out.lines() {
        if line.starts_with("Pre-set maximums") {
            section = 1;
        } else if line.starts_with("Current hardware settings") {
            section = 2;
        } else if let Some(v) = line.trim().strip_prefix("Combined:") {
            let n = v.trim().parse().ok();
            match section {
                1 => max = n,
                2 => cur = n,
                _ => {}
            }
        }
    }
    (max, cur)
}

// ---------------------------------------------------------------------------
// Scenario 1: two guests in one subnet, ping both ways and a TCP transfer
// ---------------------------------------------------------------------------

fn _test_ping_and_tcp(payload_len: usize, queue_pairs: u16) {
    let Some(env) = require_guests() else {
        return;
    };
    let lab = TestLab::with_guests(&env, "ping-tcp", BUDGET);
    let subnet = lab.subnet(Ipv4Addr::new(10, 0, 1, 0), 24);
    let g = lab.boot(
        subnet,
        &[
            GuestSpec::new("a").queue_pairs(queue_pairs),
            GuestSpec::new("b").queue_pairs(queue_pairs),
        ],
    );
    let (a, b) = (&g[0], &g[1]);

    lab.step(format!("ping {} -> {} and back", a.ip, b.ip));
    assert_ping(a, b, 10);
    assert_ping(b, a, 10);

    // TCP: the host writes a known payload to A, A sends it with nc to a
    // listener on B, and the bytes B received are compared with the
    // original (and md5sum on both sides).
    let data = payload(payload_len, 0x5eed_0001);
    lab.client(&a.name)
        .and_then(|mut c| Ok(c.write_file("/tmp/tx", &data, None)?))
        .expect("write the payload into A");
    let md5_a = md5_of(&a.sh_ok("md5sum /tmp/tx", SHORT));
    let before_a = lab.switch().stats(a.port);
    let before_b = lab.switch().stats(b.port);
    lab.step(format!("TCP: {payload_len} bytes a -> b:7000 with nc"));
    let t = Instant::now();
    let (rx, tx) = std::thread::scope(|s| {
        // busybox nc half-closes the connection when its stdin ends, and
        // the sender then quits early: give the listener a stdin that never
        // ends (a FIFO it also holds open for writing).
        let rx = s.spawn(|| {
            b.sh(
                "rm -f /tmp/rx.fifo && mkfifo /tmp/rx.fifo && \
                 nc -l -p 7000 3<>/tmp/rx.fifo </tmp/rx.fifo >/tmp/rx",
                Duration::from_secs(90),
            )
        });
        let listening = wait_until(Duration::from_secs(30), || {
            b.sh("netstat -ltn", SHORT).stdout_str().contains(":7000 ")
        });
        assert!(listening, "nc on b never listened on port 7000");
        let tx = a.sh(
            &format!("nc -w 10 {} 7000 < /tmp/tx", b.ip),
            Duration::from_secs(80),
        );
        (rx.join().expect("receiver thread"), tx)
    });
    let secs = t.elapsed().as_secs_f64();
    assert!(
        tx.success(),
        "nc sender: {} {}",
        tx.stdout_str(),
        tx.stderr_str()
    );
    assert!(
        rx.success(),
        "nc receiver: {} {}",
        rx.stdout_str(),
        rx.stderr_str()
    );
    let md5_b = md5_of(&b.sh_ok("md5sum /tmp/rx", SHORT));
    let got = lab
        .client(&b.name)
        .and_then(|mut c| Ok(c.read_file("/tmp/rx")?))
        .expect("read the received file from B");
    eprintln!(
        "TCP: {} bytes in {secs:.1} s; md5 a {md5_a} b {md5_b}",
        got.len()
    );
    assert_eq!(got.len(), data.len(), "received length");
    assert!(got == data, "received bytes differ from the payload");
    assert_eq!(md5_a, md5_b);

    // The switch saw it all: ARP and DHCP answered, frames both ways, and
    // at least the payload's bytes from A to B.
    for (name, g) in [("a", a), ("b", b)] {
        let st = lab.switch().stats(g.port);
        eprintln!("switch port {} ({name}): {st:?}", g.port);
        assert!(st.tx_packets > 0 && st.rx_packets > 0, "{name}: {st:?}");
        assert!(st.arp_replies > 0, "{name}: no ARP reply counted: {st:?}");
        assert!(st.dhcp_replies > 0, "{name}: no DHCP reply counted: {st:?}");
        let q: u64 = lab
            .eni_queue_stats(&g.eni)
            .expect("queue stats")
            .iter()
            .map(|q| q.tx_packets + q.rx_packets)
            .sum();
        assert!(q > 0, "{name}: device counters did not move");
    }
    let sa = lab.switch().stats(a.port);
    let sb = lab.switch().stats(b.port);
    assert!(
        sa.tx_bytes - before_a.tx_bytes >= payload_len as u64,
        "a sent {} bytes through the switch, payload {payload_len}",
        sa.tx_bytes - before_a.tx_bytes
    );
    assert!(
        sb.rx_bytes - before_b.rx_bytes >= payload_len as u64,
        "b received {} bytes through the switch, payload {payload_len}",
        sb.rx_bytes - before_b.rx_bytes
    );
}

#[test]
fn test_ping_and_tcp_1mib() {
    _test_ping_and_tcp(1 << 20, 1);
}

#[test]
fn test_ping_and_tcp_4mib_2_pairs() {
    _test_ping_and_tcp(4 << 20, 2);
}

// ---------------------------------------------------------------------------
// Scenario 2: multi-queue ENI
// ---------------------------------------------------------------------------

fn _test_multiqueue(queue_pairs: u16, vcpus: u32, flows: u32) {
    let Some(env) = require_guests() else {
        return;
    };
    let lab = TestLab::with_guests(&env, "multiqueue", BUDGET);
    let subnet = lab.subnet(Ipv4Addr::new(10, 0, 2, 0), 24);
    let g = lab.boot(
        subnet,
        &[
            GuestSpec::new("a").vcpus(vcpus).queue_pairs(queue_pairs),
            GuestSpec::new("b").vcpus(vcpus).queue_pairs(queue_pairs),
        ],
    );
    let (a, b) = (&g[0], &g[1]);
    let want = queue_pairs as u32;

    for g in [a, b] {
        let out = g.sh_ok("ethtool -l eth0", SHORT);
        let (max, cur) = ethtool_combined(&out);
        eprintln!("{}: ethtool -l: maximum {max:?}, current {cur:?}", g.name);
        assert_eq!(max, Some(want), "{}: ethtool -l:\n{out}", g.name);
        if cur < Some(want) {
            g.sh_ok(&format!("ethtool -L eth0 combined {want}"), SHORT);
        }
        let out = g.sh_ok("ethtool -l eth0", SHORT);
        assert_eq!(
            ethtool_combined(&out),
            (Some(want), Some(want)),
            "{}: after ethtool -L:\n{out}",
            g.name
        );
        let queues = g.sh_ok("ls /sys/class/net/eth0/queues", SHORT);
        assert_eq!(
            queues.split_whitespace().count(),
            2 * want as usize,
            "{}: {queues}",
            g.name
        );
    }
    // The link still works once the queue count changed.
    assert_ping(a, b, 5);

    let before: Vec<_> = [a, b]
        .iter()
        .map(|g| lab.eni_queue_stats(&g.eni).expect("queue stats"))
        .collect();
    lab.step(format!("iperf3 -P {flows} a -> b"));
    b.sh_ok("iperf3 -s -D -1", SHORT);
    assert!(
        wait_until(Duration::from_secs(20), || b
            .sh("netstat -ltn", SHORT)
            .stdout_str()
            .contains(":5201 ")),
        "iperf3 server on b did not listen"
    );
    let out = a.exec(
        &[
            "iperf3",
            "-c",
            &b.ip.to_string(),
            "-P",
            &flows.to_string(),
            "-t",
            "5",
            "-J",
        ],
        Duration::from_secs(60),
    );
    let bps = enilab_control::demo::parse_iperf(&out.stdout_str()).unwrap_or_else(|| {
        panic!(
            "iperf3 output not understood (exit {}):\n{}\n{}",
            out.code,
            out.stdout_str(),
            out.stderr_str()
        )
    });
    eprintln!("iperf3 -P {flows}: {:.0} Mbit/s", bps / 1e6);
    assert!(bps > 0.0);

    for (i, g) in [a, b].iter().enumerate() {
        let after = lab.eni_queue_stats(&g.eni).expect("queue stats");
        assert_eq!(after.len(), queue_pairs as usize);
        let deltas: Vec<(u64, u64)> = after
            .iter()
            .zip(&before[i])
            .map(|(n, o)| (n.tx_packets - o.tx_packets, n.rx_packets - o.rx_packets))
            .collect();
        eprintln!(
            "{}: per queue pair (tx, rx) packets during iperf3: {deltas:?}",
            g.name
        );
        // TX spreading is the guest's choice (XPS / flow hash), RX
        // spreading the backend's (flow hash to an RX queue): both must use
        // more than one queue pair.
        let tx_busy = deltas.iter().filter(|(t, _)| *t >= 20).count();
        let rx_busy = deltas.iter().filter(|(_, r)| *r >= 20).count();
        assert!(
            tx_busy >= 2 && rx_busy >= 2,
            "{}: traffic not spread over queue pairs (tx on {tx_busy}, rx on {rx_busy}): \
             {deltas:?}",
            g.name
        );
        let bad: u64 = after
            .iter()
            .map(|q| q.tx_bad_chains + q.rx_bad_chains + q.tx_bad_frames)
            .sum();
        assert_eq!(bad, 0, "{}: bad chains or frames: {after:?}", g.name);
    }
}

#[test]
fn test_multiqueue_4_pairs() {
    _test_multiqueue(4, 2, 8);
}

// ---------------------------------------------------------------------------
// Scenario 3: guest reboot, and a new QEMU on the same ENI
// ---------------------------------------------------------------------------

/// How guest A is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// busybox `reboot -f` in the guest: the same QEMU resets.
    RebootForce,
    /// Magic SysRq `b`: immediate reset, nothing synced.
    RebootSysrq,
    /// Stop the QEMU and boot a new one on the same ENI: the backend must
    /// accept a second vhost-user session on the same socket.
    Relaunch,
}

fn _test_restart(how: Restart) {
    let Some(env) = require_guests() else {
        return;
    };
    let lab = TestLab::with_guests(&env, "restart", BUDGET);
    let subnet = lab.subnet(Ipv4Addr::new(10, 0, 3, 0), 24);
    let g = lab.boot(subnet, &[GuestSpec::new("a"), GuestSpec::new("b")]);
    let (a, b) = (&g[0], &g[1]);
    assert_ping(a, b, 3);
    let sessions_before = lab.eni_sessions(&a.eni).expect("sessions");
    let pid_before = lab.instance(&a.name).expect("instance").qemu.pid();
    assert_eq!(sessions_before, 1);

    lab.step(format!("restarting a ({how:?})"));
    let t0 = Instant::now();
    match how {
        Restart::RebootForce | Restart::RebootSysrq => {
            let cmd = if how == Restart::RebootForce {
                "sleep 0.5; reboot -f"
            } else {
                "sleep 0.5; echo b > /proc/sysrq-trigger"
            };
            // The exec is cut by the reboot: its result (an error, or a
            // timeout 2 + 10 s later) is irrelevant, so it runs on a
            // detached thread with a client of its own.
            let mut client = lab.client(&a.name).expect("agent client");
            std::thread::spawn(move || {
                let _ = client.exec_capture(&["sh", "-c", cmd], Duration::from_secs(2));
            });
            // The same QEMU resets (no -no-reboot) and the agent says
            // hello again, with a small uptime.
            let mut uptime = None;
            let back = wait_until(Duration::from_secs(120), || {
                match a.uptime_ms(Duration::from_secs(5)) {
                    Ok(ms) if u128::from(ms) < t0.elapsed().as_millis() => {
                        uptime = Some(ms);
                        true
                    }
                    _ => false,
                }
            });
            assert!(back, "a did not come back from the reboot within 120 s");
            lab.step(format!(
                "a is back: uptime {} ms, {:.1} s after the reboot",
                uptime.unwrap_or(0),
                t0.elapsed().as_secs_f64()
            ));
            let li = lab.instance(&a.name).expect("instance");
            assert_eq!(li.qemu.pid(), pid_before, "QEMU was replaced, not reset");
            assert!(li.qemu.is_running());
        }
        Restart::Relaunch => {
            lab.stop_instance(&a.name).expect("stop a");
            let li = lab
                .launch(
                    &a.name,
                    std::slice::from_ref(&a.eni),
                    1,
                    512,
                    Duration::from_secs(120),
                )
                .expect("launch a again on the same ENI");
            lab.track_pid(li.qemu.pid());
            assert_ne!(li.qemu.pid(), pid_before);
            lab.step(format!(
                "a relaunched (pid {}) in {:.1} s",
                li.qemu.pid(),
                li.booted_in.as_secs_f64()
            ));
        }
    }
    assert!(
        wait_until(Duration::from_secs(60), || lab
            .exec(&a.name, &["true"], Duration::from_secs(5))
            .map(|o| o.success())
            .unwrap_or(false)),
        "exec `true` never succeeded after the restart"
    );
    let up = a.sh_ok("cat /proc/uptime", SHORT);
    let up_s: f64 = up
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::MAX);
    assert!(
        up_s < t0.elapsed().as_secs_f64(),
        "uptime {up_s} s is older than the restart"
    );

    a.wait_dhcp(Duration::from_secs(90));
    lab.step("DHCP again on a");
    assert_ping(a, b, 10);
    assert_ping(b, a, 10);
    let sessions = lab.eni_sessions(&a.eni).expect("sessions");
    eprintln!("vhost-user sessions on a's ENI: {sessions_before} before, {sessions} after");
    match how {
        // A guest reset is replayed by QEMU over the existing connection
        // (GET_VRING_BASE, then a fresh SET_MEM_TABLE/SET_VRING_*); a second
        // session here would mean the backend dropped the first one.
        Restart::RebootForce | Restart::RebootSysrq => assert_eq!(
            sessions, sessions_before,
            "the vhost-user session did not survive the guest reset"
        ),
        Restart::Relaunch => assert_eq!(sessions, sessions_before + 1),
    }
}

#[test]
fn test_reboot_force() {
    _test_restart(Restart::RebootForce);
}

#[test]
fn test_reboot_sysrq() {
    _test_restart(Restart::RebootSysrq);
}

#[test]
fn test_relaunch_on_same_eni() {
    _test_restart(Restart::Relaunch);
}

// ---------------------------------------------------------------------------
// Scenario 5: `enilab exec` streams output and returns the exit code
// ---------------------------------------------------------------------------

/// The `enilab` binary of this build (same target directory and profile as
/// the test executable). `cargo build` runs first (a no-op when it is up to
/// date) so that a stale binary is never tested; without cargo, an existing
/// binary is used as is.
fn enilab_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // <target>/<profile>/deps/guests-<hash>
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .ok_or("cannot locate the target directory")?
        .to_path_buf();
    let bin = profile_dir.join("enilab");
    let target_dir = profile_dir.parent().ok_or("no target directory")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-q", "-p", "enilab-control", "--bin", "enilab"])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace_root());
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    match cmd.status() {
        Ok(st) if st.success() => {}
        Ok(st) => {
            return Err(format!(
                "`cargo build -p enilab-control --bin enilab`: {st}"
            ))
        }
        Err(e) if bin.is_file() => {
            eprintln!("cannot run {cargo} ({e}); using {} as is", bin.display())
        }
        Err(e) => return Err(format!("cannot run {cargo}: {e}")),
    }
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("{} was not built", bin.display()))
    }
}

fn _test_enilab_exec(code: i32) {
    let Some(env) = require_guests() else {
        return;
    };
    let bin = match enilab_binary() {
        Ok(b) => b,
        Err(e) => panic!("the enilab binary is not available: {e}"),
    };
    let lab = TestLab::with_guests(&env, "exec-cli", BUDGET);
    let subnet = lab.subnet(Ipv4Addr::new(10, 0, 4, 0), 24);
    let g = lab.boot(subnet, &[GuestSpec::new("a")]);
    let a = &g[0];

    let enilab = |args: &[&str]| {
        let mut c = Command::new(&bin);
        c.arg("--run-dir").arg(lab.root()).args(args);
        c
    };

    // Streaming: the first line must reach us while the command still runs.
    let script = format!("echo first; sleep 3; echo second; echo oops >&2; exit {code}");
    lab.step(format!("enilab exec {} -- sh -c '{script}'", a.name));
    let t0 = Instant::now();
    let mut child = enilab(&["exec", &a.name, "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn enilab exec");
    lab.track_pid(child.id());
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.expect("read stdout");
        lines.push((t0.elapsed(), line));
    }
    let status = child.wait().expect("wait for enilab exec");
    let total = t0.elapsed();
    let err = err_reader.join().expect("stderr reader");
    eprintln!("enilab exec: {status}, stdout {lines:?}, stderr {err:?}, total {total:?}");
    assert_eq!(status.code(), Some(code), "exit code; stderr: {err}");
    let texts: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(texts, ["first", "second"]);
    assert_eq!(err.trim(), "oops");
    let first_at = lines[0].0;
    assert!(
        first_at + Duration::from_secs(2) < total,
        "`first` arrived after {first_at:?}, the command ended after {total:?}: not streamed"
    );

    // A guest-side timeout ends the command.
    let t = Instant::now();
    let out = enilab(&["exec", "--timeout", "2", &a.name, "--", "sleep", "60"])
        .output()
        .expect("run enilab exec --timeout");
    eprintln!(
        "enilab exec --timeout 2 -- sleep 60: {} after {:?}",
        out.status,
        t.elapsed()
    );
    // Killed by the agent (SIGKILL: 128 + 9).
    assert!(out.status.code().is_some_and(|c| c > 128), "{}", out.status);
    assert!(t.elapsed() < Duration::from_secs(30));

    // An unknown instance is an error, not a hang.
    let out = enilab(&["exec", "no-such-instance", "--", "true"])
        .output()
        .expect("run enilab exec");
    let msg = String::from_utf8_lossy(&out.stderr);
    eprintln!("unknown instance: {} {msg}", out.status);
    assert_eq!(out.status.code(), Some(1));
    assert!(msg.contains("no-such-instance"), "{msg}");
}

#[test]
fn test_enilab_exec_streams_and_exits() {
    _test_enilab_exec(7);
}

//! `enilab demo`: one VPC, one subnet, two instances with one ENI each;
//! boot, ping both ways, iperf3 between them, print a table, tear down.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::Serialize;

use crate::lab::{Lab, LabError, LabOptions};

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Lab(#[from] LabError),
    /// A step's output could not be understood.
    #[error("{0}: unexpected output: {1}")]
    Parse(&'static str, String),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PingResult {
    pub sent: u32,
    pub received: u32,
    pub loss_pct: f64,
    pub rtt_avg_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DemoReport {
    pub accelerator: String,
    pub boot_s: Vec<(String, f64)>,
    pub ping: Vec<(String, PingResult)>,
    pub iperf_mbit_s: f64,
    pub ok: bool,
}

/// Parse busybox/iputils ping's summary lines.
pub fn parse_ping(out: &str) -> Option<PingResult> {
    let mut r = PingResult::default();
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .collect();
    r.sent = *nums.first()?;
    r.received = *nums.get(1)?;
    r.loss_pct = if r.sent == 0 {
        100.0
    } else {
        100.0 * f64::from(r.sent - r.received.min(r.sent)) / f64::from(r.sent)
    };
    if let Some(l) = out.lines().find(|l| l.contains("min/avg/max")) {
        let vals = l.split('=').nth(1)?.trim();
        let avg = vals.split('/').nth(1)?;
        r.rtt_avg_ms = avg.trim().parse().ok()?;
    }
    Some(r)
}

/// Receiver's bits/s from `iperf3 -J` output.
pub fn parse_iperf(json: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["end"]["sum_received"]["bits_per_second"].as_f64()
}

pub struct DemoOptions {
    pub lab: LabOptions,
    pub iperf_seconds: u32,
    pub ping_count: u32,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            lab: LabOptions {
                name: format!("demo-{}", std::process::id()),
                ..Default::default()
            },
            iperf_seconds: 5,
            ping_count: 5,
        }
    }
}

pub fn run(opts: DemoOptions, progress: &dyn Fn(&str)) -> Result<DemoReport, DemoError> {
    let lab = Lab::new(opts.lab)?;
    let mut report = DemoReport {
        accelerator: lab
            .accel()
            .map(|a| {
                let why: String = a.reason.chars().take(40).collect();
                let more = if a.reason.chars().count() > 40 {
                    "…"
                } else {
                    ""
                };
                format!("{} ({why}{more})", a.accel)
            })
            .unwrap_or_default(),
        ..Default::default()
    };
    progress(&format!("accelerator: {}", report.accelerator));
    let subnet = lab.add_subnet("subnet-demo", "vpc-demo", Ipv4Addr::new(10, 0, 1, 0), 24)?;
    let eni_a = lab.create_eni(subnet, None, 1, 0)?;
    let eni_b = lab.create_eni(subnet, None, 1, 0)?;
    let ip_a = lab.eni_ip(&eni_a).unwrap_or(Ipv4Addr::UNSPECIFIED);
    let ip_b = lab.eni_ip(&eni_b).unwrap_or(Ipv4Addr::UNSPECIFIED);
    progress(&format!(
        "ENIs {eni_a} ({ip_a}) and {eni_b} ({ip_b}); booting two guests"
    ));
    let pid = std::process::id();
    let (na, nb) = (format!("demo-a-{pid}"), format!("demo-b-{pid}"));
    let boot = Duration::from_secs(120);
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| lab.launch(&na, std::slice::from_ref(&eni_a), 1, 512, boot));
        let tb = s.spawn(|| lab.launch(&nb, std::slice::from_ref(&eni_b), 1, 512, boot));
        (ta.join(), tb.join())
    });
    let ia = ra.map_err(|_| LabError::Topology("boot thread panicked".into()))??;
    let ib = rb.map_err(|_| LabError::Topology("boot thread panicked".into()))??;
    report.boot_s = vec![
        ("a".into(), ia.booted_in.as_secs_f64()),
        ("b".into(), ib.booted_in.as_secs_f64()),
    ];
    progress(&format!(
        "booted in {:.1} s and {:.1} s; waiting for DHCP",
        ia.booted_in.as_secs_f64(),
        ib.booted_in.as_secs_f64()
    ));
    lab.wait_ip(&na, "eth0", ip_a, Duration::from_secs(60))?;
    lab.wait_ip(&nb, "eth0", ip_b, Duration::from_secs(60))?;
    let count = opts.ping_count.to_string();
    for (from, to, label) in [(&na, ip_b, "a -> b"), (&nb, ip_a, "b -> a")] {
        progress(&format!("ping {label}"));
        let out = lab.exec(
            from,
            &[
                "ping",
                "-c",
                &count,
                "-i",
                "0.2",
                "-W",
                "2",
                &to.to_string(),
            ],
            Duration::from_secs(30),
        )?;
        let p = parse_ping(&out.stdout_str())
            .ok_or_else(|| DemoError::Parse("ping", out.stdout_str() + &out.stderr_str()))?;
        report.ping.push((label.into(), p));
    }
    progress(&format!("iperf3 a -> b for {} s", opts.iperf_seconds));
    lab.exec(&nb, &["iperf3", "-s", "-D", "-1"], Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(500));
    let secs = opts.iperf_seconds.to_string();
    let out = lab.exec(
        &na,
        &["iperf3", "-c", &ip_b.to_string(), "-t", &secs, "-J"],
        Duration::from_secs(u64::from(opts.iperf_seconds) + 30),
    )?;
    report.iperf_mbit_s = parse_iperf(&out.stdout_str())
        .ok_or_else(|| DemoError::Parse("iperf3", out.stdout_str() + &out.stderr_str()))?
        / 1e6;
    report.ok = report
        .ping
        .iter()
        .all(|(_, p)| p.sent > 0 && p.received == p.sent)
        && report.iperf_mbit_s > 0.0;
    progress("tearing down");
    lab.teardown();
    Ok(report)
}

/// The summary table.
pub fn render(r: &DemoReport) -> String {
    let mut rows: Vec<(String, String)> = vec![("accelerator".into(), r.accelerator.clone())];
    for (n, s) in &r.boot_s {
        rows.push((format!("boot {n} (to agent ready)"), format!("{s:.1} s")));
    }
    for (l, p) in &r.ping {
        rows.push((
            format!("ping {l}"),
            format!(
                "{}/{} received, {:.0}% loss, rtt avg {:.2} ms",
                p.received, p.sent, p.loss_pct, p.rtt_avg_ms
            ),
        ));
    }
    rows.push((
        "iperf3 TCP a -> b".into(),
        format!("{:.0} Mbit/s", r.iperf_mbit_s),
    ));
    rows.push(("result".into(), if r.ok { "PASS" } else { "FAIL" }.into()));
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let sep = format!("+-{}-+-{}-+\n", "-".repeat(w0), "-".repeat(w1));
    let mut s = String::from("enilab demo: VPC 10.0.0.0/16, subnet 10.0.1.0/24, two instances\n");
    s.push_str(&sep);
    for (a, b) in rows {
        s.push_str(&format!("| {a:<w0$} | {b:<w1$} |\n"));
    }
    s.push_str(&sep);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_busybox_ping() {
        let out = "PING 10.0.1.5 (10.0.1.5): 56 data bytes\n64 bytes from 10.0.1.5: seq=0 ttl=64 time=1.234 ms\n\n--- 10.0.1.5 ping statistics ---\n5 packets transmitted, 4 packets received, 20% packet loss\nround-trip min/avg/max = 0.812/1.250/2.001 ms\n";
        let p = parse_ping(out).unwrap();
        assert_eq!((p.sent, p.received), (5, 4));
        assert!((p.loss_pct - 20.0).abs() < 1e-9);
        assert!((p.rtt_avg_ms - 1.25).abs() < 1e-9);
        assert!(parse_ping("garbage").is_none());
    }

    #[test]
    fn parses_iperf_json() {
        let j = r#"{"end":{"sum_received":{"bits_per_second":3.5e8}}}"#;
        assert_eq!(parse_iperf(j), Some(3.5e8));
        assert_eq!(parse_iperf("{}"), None);
    }

    #[test]
    fn table_says_fail_when_not_ok() {
        let r = DemoReport {
            accelerator: "tcg".into(),
            ..Default::default()
        };
        assert!(render(&r).contains("FAIL"));
    }
}

//! `enilab up` / `enilab down` / `enilab graph` against a recording daemon
//! (`--driver record`: the API and its state, no guests). One
//! parameterised function per scenario, thin `#[test]` wrappers.
//!
//! Run with `cargo test -p enilab-tests --test topology -- --test-threads=1`
//! after `cargo build -p enilab-control`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use enilab_tests::*;

const BUDGET: Duration = Duration::from_secs(120);

fn example(name: &str) -> PathBuf {
    workspace_root().join("examples").join(name)
}

/// Run `enilab ARGS --endpoint ADDR`; (success, stdout, stderr).
fn enilab(d: &ApiDaemon, args: &[&str]) -> (bool, String, String) {
    let bin = enilab_bin().expect("binary");
    let out = Command::new(bin)
        .args(args)
        .arg("--endpoint")
        .arg(d.addr().to_string())
        .output()
        .expect("run enilab");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `enilab up|down FILE --json`: the report.
fn apply(d: &ApiDaemon, verb: &str, file: &Path) -> serde_json::Value {
    let (ok, out, err) = enilab(d, &[verb, file.to_str().expect("path"), "--json"]);
    assert!(ok, "{verb} {}: {err}", file.display());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn created(report: &serde_json::Value, kind: &str) -> Vec<(String, String)> {
    report["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["kind"] == kind)
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("").to_string(),
                c["id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Counts of EC2 resources in the status document.
fn census(d: &ApiDaemon) -> (usize, usize, usize, usize) {
    let s = d.status();
    let live = s["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["state"] != "terminated")
        .count();
    let len = |k: &str| s[k].as_array().map(Vec::len).unwrap_or(0);
    (len("vpcs"), len("subnets"), live, len("enis"))
}

/// `up` creates what `file` says with the expected kinds; a second `up`
/// writes nothing; `graph` draws every instance and ENI; `down` removes it
/// all and a second `down` writes nothing.
fn scenario_up_twice_down(file: &str, expect: &[(&str, usize)]) {
    let Some(bin) = require(REQUIRE_API, enilab_bin()) else {
        return;
    };
    let d = ApiDaemon::start(bin, file, BUDGET, &["--driver", "record"]);
    let before = census(&d);
    let first = apply(&d, "up", &example(file));
    for (kind, n) in expect {
        assert_eq!(created(&first, kind).len(), *n, "{kind}: {first}");
    }
    assert!(first["writes"].as_u64().unwrap_or(0) > 0);

    let second = apply(&d, "up", &example(file));
    assert_eq!(second["writes"], 0, "second up wrote: {second}");
    assert_eq!(second["changes"].as_array().map(Vec::len), Some(0));

    // The daemon's own count agrees: only Describe calls since.
    if let Some(python) = require(REQUIRE_API, python_with("prometheus_client")) {
        let writes = |d: &ApiDaemon| -> f64 {
            let (_, body) = http_get(d.addr(), "/metrics").expect("metrics");
            let fams = prometheus_parse(&python, &String::from_utf8_lossy(&body)).expect("parse");
            fams.as_array()
                .into_iter()
                .flatten()
                .filter(|f| f["name"] == "enilab_api_requests")
                .flat_map(|f| f["samples"].as_array().into_iter().flatten())
                .filter(|s| {
                    s["name"] == "enilab_api_requests_total"
                        && !s["labels"]["action"]
                            .as_str()
                            .unwrap_or("")
                            .starts_with("Describe")
                })
                .filter_map(|s| s["value"].as_f64())
                .sum()
        };
        let w0 = writes(&d);
        apply(&d, "up", &example(file));
        assert_eq!(writes(&d), w0, "a third up changed state");
    }

    // The picture names every instance and ENI (an SVG that parses as XML).
    let svg = d.run_root().join("topology.svg");
    let (ok, _, err) = enilab(
        &d,
        &[
            "graph",
            "-o",
            svg.to_str().expect("path"),
            "--interval",
            "0.2",
        ],
    );
    assert!(ok, "graph: {err}");
    if svg.exists() {
        let texts = svg_texts(&svg);
        let s = d.status();
        for key in ["instances", "enis"] {
            for r in s[key].as_array().into_iter().flatten() {
                let id = r["id"].as_str().unwrap_or("");
                assert!(texts.iter().any(|t| t.contains(id)), "{id} not in the SVG");
            }
        }
    } else {
        // No graphviz: the dot source was written instead, and said so.
        assert!(err.contains("dot source"), "{err}");
    }

    let gone = apply(&d, "down", &example(file));
    assert_eq!(
        created(&gone, "instance").len(),
        created(&first, "instance").len(),
        "{gone}"
    );
    assert_eq!(created(&gone, "vpc").len(), created(&first, "vpc").len());
    assert_eq!(census(&d), before, "down left resources behind");
    let groups = d.ok("DescribeFailoverGroups", &[]);
    assert!(!groups.contains("failoverGroupId"), "{groups}");
    let again = apply(&d, "down", &example(file));
    assert_eq!(again["writes"], 0, "{again}");
}

/// Every text node of an SVG, through Python's XML parser.
fn svg_texts(svg: &Path) -> Vec<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, xml.etree.ElementTree as E\nfor e in E.parse(sys.argv[1]).iter():\n    t = (e.text or '').strip()\n    if t: print(t)",
        ])
        .arg(svg)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "the SVG is not XML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A file with failover groups is refused before anything is written;
/// bad files are refused with the reason.
/// Bad files are refused with the reason, before anything is written.
fn scenario_refusals() {
    let Some(bin) = require(REQUIRE_API, enilab_bin()) else {
        return;
    };
    let d = ApiDaemon::start(bin, "refusals", BUDGET, &["--driver", "record"]);
    let before = census(&d);
    let bad = d.run_root().join("bad.toml");
    std::fs::write(
        &bad,
        "[[subnet]]\nname = 's'\nvpc = 'nowhere'\ncidr = '10.0.1.0/24'\n",
    )
    .expect("write");
    let (ok, _, err) = enilab(&d, &["up", bad.to_str().expect("path")]);
    assert!(!ok);
    assert!(err.contains("vpc \"nowhere\""), "{err}");
    assert_eq!(census(&d), before, "a refused file wrote");
}

/// The NAT-plus-NLB example on real guests: `up` boots both web
/// instances (their agents answer), a second `up` writes nothing, the web
/// instances reach each other, and `down` leaves no QEMU behind.
fn scenario_guests_up_down() {
    let Some(env) = require_guests() else { return };
    let Some(bin) = require(REQUIRE_GUESTS, enilab_bin()) else {
        return;
    };
    eprintln!("[up-guests] accelerator {}", env.accel.accel);
    let d = ApiDaemon::start(bin, "up-guests", Duration::from_secs(420), &[]);
    let before = census(&d);
    let first = apply(&d, "up", &example("nat-nlb.toml"));
    let web = created(&first, "instance");
    assert_eq!(web.len(), 2, "{first}");
    for (_, id) in &web {
        d.wait_guest(id, Duration::from_secs(120));
    }
    let again = apply(&d, "up", &example("nat-nlb.toml"));
    assert_eq!(again["writes"], 0, "{again}");
    let ip = |id: &str| {
        d.get(
            "DescribeInstances",
            &[("InstanceId.1", id)],
            "privateIpAddress",
        )
    };
    let (a, b) = (&web[0].1, ip(&web[1].1));
    d.wait(&format!("{a} reaches {b}"), Duration::from_secs(60), || {
        d.pings(a, &b)
    });
    let qemus = d.qemu_pids();
    assert_eq!(qemus.len(), 2, "{qemus:?}");
    apply(&d, "down", &example("nat-nlb.toml"));
    assert_eq!(census(&d), before);
    d.wait("QEMU gone", Duration::from_secs(30), || {
        qemus
            .iter()
            .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
    });
}

#[test]
fn nat_nlb_up_down_with_guests() {
    scenario_guests_up_down();
}

#[test]
fn three_tier_up_twice_then_down() {
    scenario_up_twice_down(
        "three-tier.toml",
        &[
            ("vpc", 1),
            ("subnet", 3),
            ("security_group", 3),
            ("instance", 4),
            ("eni", 3),
            ("route_table", 1),
            ("internet_gateway", 1),
        ],
    );
}

#[test]
fn nat_nlb_up_twice_then_down() {
    scenario_up_twice_down(
        "nat-nlb.toml",
        &[
            ("vpc", 1),
            ("subnet", 2),
            ("instance", 2),
            ("nat_gateway", 1),
            ("elastic_ip", 1),
            ("route_table", 2),
            ("target_group", 1),
            ("load_balancer", 1),
        ],
    );
}

#[test]
fn failover_pair_up_twice_then_down() {
    scenario_up_twice_down(
        "failover-pair.toml",
        &[
            ("vpc", 1),
            ("subnet", 1),
            ("security_group", 1),
            ("instance", 2),
            ("eni", 1),
            ("failover_group", 1),
        ],
    );
}

#[test]
fn bad_files_are_refused() {
    scenario_refusals();
}

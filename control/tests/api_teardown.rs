//! A dropped `Api` leaves no thread behind: its job workers and timer are
//! stopped and joined, and the failover detector ends. Alone in its test
//! binary, so the process's thread count is this test's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use enilab_control::api::{Api, Config, Params, RecordingDriver};

/// Names of the process's threads (`comm`, at most 15 bytes).
fn threads() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn call(api: &Api, action: &str, args: &[(&str, &str)]) -> String {
    let mut pairs = vec![("Action", action), ("Version", "2016-11-15")];
    pairs.extend_from_slice(args);
    let r = api.call(&Params::from_pairs(pairs));
    assert_eq!(r.status, 200, "{action}: {}", r.body);
    r.body
}

fn between<'a>(body: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let start = body.find(&open).map(|i| i + open.len()).unwrap_or(0);
    let end = body[start..].find('<').map_or(body.len(), |i| start + i);
    &body[start..end]
}

/// Open an Api, give its job workers something to do, drop it.
fn open_use_and_drop(dir: &std::path::Path) {
    let api = Api::open(dir, Config::default(), Arc::new(RecordingDriver)).expect("open");
    // A new thread names itself once it runs: bounded wait.
    let jobs = || {
        threads()
            .iter()
            .filter(|n| n.starts_with("enilab-job"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while jobs() < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(jobs(), 5, "four workers and the timer: {:?}", threads());
    let vpc = call(&api, "CreateVpc", &[("CidrBlock", "10.9.0.0/16")]);
    let vpc = between(&vpc, "vpcId").to_string();
    let subnet = call(
        &api,
        "CreateSubnet",
        &[("VpcId", &vpc), ("CidrBlock", "10.9.1.0/24")],
    );
    let subnet = between(&subnet, "subnetId").to_string();
    call(
        &api,
        "RunInstances",
        &[
            ("ImageId", enilab_control::api::instance::IMAGE_ID),
            ("InstanceType", "t3.micro"),
            ("MinCount", "2"),
            ("MaxCount", "2"),
            ("SubnetId", &subnet),
        ],
    );
    assert!(api.jobs.wait_idle(Duration::from_secs(10)));
    drop(api);
}

#[test]
fn dropped_api_stops_and_joins_its_threads() {
    let base = threads();
    assert!(!base.iter().any(|n| n.starts_with("enilab-")), "{base:?}");
    let dir = std::env::temp_dir().join(format!("enilab-teardown-{}", std::process::id()));
    for round in 0..3 {
        open_use_and_drop(&dir);
        // The failover detector notices within its interval (and, if it held
        // the last reference, runs the teardown itself): bounded wait.
        let deadline = Instant::now() + Duration::from_secs(10);
        while threads() != base && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(threads(), base, "round {round}: threads left behind");
    }
    std::fs::remove_dir_all(&dir).ok();
}

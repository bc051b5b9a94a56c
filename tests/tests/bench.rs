//! Smoke test of `enilab bench --against dpdk`: each scenario once with a
//! one-second window, checking that frames flowed through both backends.
//! No rate is asserted (the host is shared; rates are for the command).
//!
//! Needs `dpdk-testpmd`, hugepages and two cores; without them the test
//! prints `skipped: ...`, or fails when `ENILAB_REQUIRE_DPDK=1`.
//!
//! Run with `cargo test -p enilab-tests --test bench -- --test-threads=1`.

use std::time::Duration;

use enilab_control::bench::{self, BenchOptions, Scenario};
use enilab_tests::*;

fn _test_bench_smoke(scenario: Scenario, queues: u16) {
    if require_dpdk().is_none() {
        return;
    }
    let run_root = std::env::temp_dir().join(format!("enilab-bench-{}", std::process::id()));
    let opts = BenchOptions {
        scenario,
        sizes: vec![64],
        queues: vec![queues],
        seconds: 1,
        warmup: Duration::from_millis(500),
        bursts: 1,
        run_root: run_root.clone(),
        ..Default::default()
    };
    let rows = bench::run(&opts, &|m| eprintln!("bench: {m}"))
        .unwrap_or_else(|e| panic!("bench {}: {e}", scenario.name()));
    eprint!("{}", bench::render(&rows));
    let _ = std::fs::remove_dir_all(&run_root);
    assert_eq!(rows.len(), 2, "one DPDK row and one enilab row");
    let names: Vec<&str> = rows.iter().map(|r| r.backend).collect();
    assert_eq!(names, ["dpdk", "enilab"]);
    for r in &rows {
        assert!(r.packets > 0, "no frames through {}: {r:?}", r.backend);
        assert_eq!((r.size, r.queues), (64, queues));
    }
    assert!(rows[1].ratio.is_some(), "the enilab row carries the ratio");
    // The synthetic guests send one flow: after its first frames the
    // switch's flow cache decides them (through real vhost-user rings).
    let share = flow_cache_share(&rows[1].note)
        .unwrap_or_else(|| panic!("no flow-cache share in the note: {}", rows[1].note));
    assert!(share > 50.0, "only {share}% of frames from the flow cache");
    // Nothing left behind: no hugepage files of ours, no sockets.
    let ours = format!("enb{}", std::process::id());
    let left: Vec<String> = std::fs::read_dir("/dev/hugepages")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&ours))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "hugepage files left: {left:?}");
}

/// The "N% from the flow cache" of an enilab row's note.
fn flow_cache_share(note: &str) -> Option<f64> {
    let end = note.find("% from the flow cache")?;
    let start = note[..end].rfind(' ').map_or(0, |i| i + 1);
    note[start..end].parse().ok()
}

#[test]
fn test_bench_fwd_smoke() {
    _test_bench_smoke(Scenario::Fwd, 1);
}

#[test]
fn test_bench_rxonly_smoke() {
    _test_bench_smoke(Scenario::Rxonly, 1);
}

#[test]
fn test_bench_fwd_4q_smoke() {
    _test_bench_smoke(Scenario::Fwd, 4);
}

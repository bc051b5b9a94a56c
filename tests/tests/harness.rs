//! Checks of the test harness itself: the skip rule, the parsers, and that
//! a panicking scenario still cleans up (its QEMU killed, its run root
//! removed).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use enilab_tests::*;

#[test]
fn skip_rule_skips_or_fails() {
    // A variable of our own: the real ENILAB_REQUIRE_* may be set by CI.
    let var = "ENILAB_TEST_HARNESS_REQUIRE";
    std::env::remove_var(var);
    assert_eq!(require(var, Ok::<u32, String>(3)), Some(3));
    assert_eq!(require::<u32>(var, Err("no widget".into())), None);
    std::env::set_var(var, "1");
    let r = std::panic::catch_unwind(|| require::<u32>(var, Err("no widget".into())));
    std::env::remove_var(var);
    let msg = r
        .expect_err("must fail when required")
        .downcast::<String>()
        .map(|s| *s)
        .unwrap_or_default();
    assert!(msg.contains("no widget") && msg.contains(var), "{msg}");
}

#[test]
fn parses_testpmd_statistics() {
    let out = "\
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 216266         RX-dropped: 0             RX-total: 216266
  TX-packets: 0              TX-dropped: 0             TX-total: 0
  ----------------------------------------------------------------------------
";
    assert_eq!(
        parse_testpmd_stats(out),
        Some(TestpmdStats {
            rx_packets: 216266,
            tx_packets: 0
        })
    );
    assert_eq!(parse_testpmd_stats("EAL: Detected CPU lcores: 2"), None);
}

#[test]
fn wait_until_times_out_and_succeeds() {
    let t = std::time::Instant::now();
    assert!(!wait_until(Duration::from_millis(300), || false));
    assert!(t.elapsed() >= Duration::from_millis(300));
    let mut n = 0;
    assert!(wait_until(Duration::from_secs(5), || {
        n += 1;
        n == 3
    }));
}

fn _test_cleanup_after_panic(guests: usize) {
    let Some(env) = require_guests() else {
        return;
    };
    let seen: std::sync::Mutex<(Vec<u32>, Option<PathBuf>)> = Default::default();
    let r = std::panic::catch_unwind(|| {
        let lab = TestLab::with_guests(&env, "cleanup", Duration::from_secs(120));
        let subnet = lab.subnet(Ipv4Addr::new(10, 0, 9, 0), 24);
        let specs: Vec<_> = (0..guests)
            .map(|i| GuestSpec::new(&format!("g{i}")))
            .collect();
        let g = lab.boot(subnet, &specs);
        let mut s = seen.lock().unwrap();
        s.0 = g
            .iter()
            .map(|g| lab.instance(&g.name).unwrap().qemu.pid())
            .collect();
        s.1 = Some(lab.root().to_path_buf());
        drop(s);
        panic!("deliberate failure with {guests} guest(s) running");
    });
    assert!(r.is_err());
    let (pids, root) = seen.into_inner().unwrap();
    assert_eq!(pids.len(), guests);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "QEMU {pid} survived the panic"
        );
    }
    let root = root.expect("run root");
    assert!(!root.exists(), "{} survived the panic", root.display());
    // The failed scenario's logs were kept.
    let kept = PathBuf::from(FAILED_LOGS).join(root.file_name().unwrap());
    let console = std::fs::read_to_string(kept.join("g0/console.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&kept);
    let _ = std::fs::remove_dir(FAILED_LOGS); // only if empty
    assert!(console.contains("enilab-agent"), "console log not kept");
}

#[test]
fn test_cleanup_after_panic() {
    _test_cleanup_after_panic(1);
}

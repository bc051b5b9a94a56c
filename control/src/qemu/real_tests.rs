//! Opt-in tests against a real QEMU 10 (slow; ignored by default).
//!
//! ```text
//! ENILAB_TEST_KERNEL=images/out/vmlinuz ENILAB_TEST_INITRD=images/out/initramfs.img \
//! ENILAB_TEST_ENI0=/path/eni0.sock ENILAB_TEST_ENI1=/path/eni1.sock \
//! cargo test -p enilab-control qemu::real_tests -- --ignored --nocapture --test-threads=1
//! ```
//!
//! `ENILAB_TEST_ENI0/1` are optional listening vhost-user backend sockets
//! (any backend: enilab's, DPDK's vhost PMD, a test stub); without them the
//! NIC steps are skipped.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn test_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("enilab-qemu-real-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn wait_console(inst: &Instance, needle: &str, count: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(&inst.paths().console_log).unwrap_or_default();
        if text.matches(needle).count() >= count {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn inputs() -> Option<(QemuBinary, PathBuf, PathBuf)> {
    let (Some(kernel), Some(initrd)) = (
        env_path("ENILAB_TEST_KERNEL"),
        env_path("ENILAB_TEST_INITRD"),
    ) else {
        eprintln!("ENILAB_TEST_KERNEL / ENILAB_TEST_INITRD not set; skipping");
        return None;
    };
    let qemu = find_qemu().expect("QEMU 10");
    Some((qemu, kernel, initrd))
}

#[test]
#[ignore = "boots a real QEMU guest; needs ENILAB_TEST_KERNEL/INITRD"]
fn boot_hotplug_reset_adopt_shutdown() {
    let Some((qemu, kernel, initrd)) = inputs() else {
        return;
    };
    eprintln!("QEMU: {} ({})", qemu.version_line, qemu.path.display());
    let dir = test_dir("boot");
    let choice = select_accel(&qemu, &kernel, &initrd, Some(&dir));
    eprintln!("accel: {choice:?}");
    let again = select_accel(&qemu, &kernel, &initrd, Some(&dir));
    assert!(again.cached && again.accel == choice.accel);

    let eni0 = env_path("ENILAB_TEST_ENI0");
    let eni1 = env_path("ENILAB_TEST_ENI1");
    let mut spec = InstanceSpec::new("i-real", &kernel, &initrd, dir.join("run"));
    spec.accel = choice.accel;
    spec.cpu_model = Some(choice.cpu_model.clone());
    spec.pcie_ports = std::env::var("ENILAB_TEST_PORTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    spec.cmdline = "enilab.test=1".into();
    if let Some(s) = &eni0 {
        spec.nics.push(NicSpec {
            id: "eni0".into(),
            socket_path: s.clone(),
            mac: "02:00:00:00:00:10".into(),
            queue_pairs: 1,
        });
    }
    let t = Instant::now();
    let inst = Instance::launch(&qemu, &spec).expect("launch");
    eprintln!("launched pid {} in {:?}", inst.pid(), t.elapsed());
    assert!(inst.is_running());
    assert!(
        wait_console(&inst, " as init process", 1, Duration::from_secs(60)),
        "guest did not boot"
    );
    eprintln!("guest reached userspace {:?} after spawn", t.elapsed());
    assert!(inst.query_status().unwrap().running);
    assert!(inst.paths().agent_socket.exists());
    let pci = inst.qmp().query_pci().unwrap().to_string();
    assert!(pci.contains("\"rp3\""), "root ports in query-pci");

    if let Some(s) = &eni1 {
        let nic = NicSpec {
            id: "eni1".into(),
            socket_path: s.clone(),
            mac: "02:00:00:00:00:11".into(),
            queue_pairs: 2,
        };
        let t = Instant::now();
        let port = inst.hotplug_nic(&nic).expect("hotplug");
        eprintln!("hot-plugged eni1 on {port} in {:?}", t.elapsed());
        assert_eq!(port, if eni0.is_some() { "rp1" } else { "rp0" });
        let net = inst.qmp().hmp("info network").unwrap();
        eprintln!("info network:\n{net}");
        assert!(net.contains("net-eni1"));
        assert!(inst
            .qmp()
            .query_pci()
            .unwrap()
            .to_string()
            .contains("nic-eni1"));
        assert!(matches!(
            inst.hotplug_nic(&nic),
            Err(QemuError::NicExists(_))
        ));
        std::thread::sleep(Duration::from_secs(3));
        let console = std::fs::read_to_string(&inst.paths().console_log).unwrap_or_default();
        eprintln!(
            "console after hot-plug: {:?}",
            console.lines().rev().take(3).collect::<Vec<_>>()
        );
        let t = Instant::now();
        inst.unplug_nic("eni1", Duration::from_secs(30))
            .expect("unplug");
        eprintln!("unplugged eni1 in {:?}", t.elapsed());
        assert!(!inst.qmp().hmp("info network").unwrap().contains("net-eni1"));
        // Plug again on the freed port: ids must be reusable.
        assert_eq!(inst.hotplug_nic(&nic).unwrap(), port);
        eprintln!("nics: {:?}", inst.nics());
    }

    let console = std::fs::read_to_string(&inst.paths().console_log).unwrap_or_default();
    let tail: Vec<&str> = console.lines().rev().take(12).collect();
    eprintln!(
        "console tail:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );

    // Reset: the guest boots again in the same QEMU.
    inst.system_reset().unwrap();
    inst.wait_event("RESET", |_| true, Duration::from_secs(5))
        .unwrap();
    assert!(
        wait_console(&inst, " as init process", 2, Duration::from_secs(60)),
        "no second boot"
    );
    eprintln!("guest rebooted in place");

    // Hand over to a "new daemon".
    let nics_before = inst.nics();
    let pid = inst.detach();
    let adopted = Instance::adopt(&dir.join("run"))
        .unwrap()
        .expect("still running");
    assert_eq!(adopted.pid(), pid);
    assert_eq!(adopted.nics(), nics_before);
    assert_eq!(adopted.name(), "i-real");
    let t = Instant::now();
    adopted.shutdown(Duration::from_secs(10)).unwrap();
    eprintln!("shutdown in {:?}", t.elapsed());
    assert!(!adopted.is_running());
    assert!(!adopted.paths().qmp_socket.exists());
    assert!(!adopted.paths().pidfile.exists());
    drop(adopted);
    assert!(Instance::adopt(&dir.join("run")).unwrap().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "starts a real QEMU; needs ENILAB_TEST_KERNEL/INITRD"]
fn early_exit_and_drop() {
    let Some((qemu, kernel, initrd)) = inputs() else {
        return;
    };
    let dir = test_dir("early");
    let mut spec = InstanceSpec::new("i-bad", &kernel, &initrd, dir.join("run"));
    spec.cpu_model = Some("no-such-cpu".into());
    let e = Instance::launch(&qemu, &spec).unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, QemuError::EarlyExit { .. }));
    assert!(e.to_string().contains("no-such-cpu"));

    spec.cpu_model = None;
    let inst = Instance::launch(&qemu, &spec).unwrap();
    let e = Instance::launch(&qemu, &spec).unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, QemuError::AlreadyRunning { .. }));
    let pid = inst.pid();
    drop(inst);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || !super::sys::pid_alive(pid as i32)
    );
    assert!(!dir.join("run/qmp.sock").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

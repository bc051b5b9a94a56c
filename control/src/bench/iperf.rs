//! `--scenario iperf`: iperf3 TCP a -> b between two TCG guests (1 vCPU,
//! 512 MiB each), through enilab and through DPDK.
//!
//! enilab's side is `enilab demo`'s run: two guests on two ENIs of one
//! subnet (DHCP from the switch), busy polling off as in a normal lab.
//! DPDK's side: the same image on two vhost ports that testpmd
//! io-forwards (pinned to one core, as DPDK always polls); DPDK serves no
//! DHCP, so each NIC is renamed away from the agent's DHCP client and
//! addressed by hand; ARP crosses the io forward.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::testpmd::{self, Testpmd};
use super::{unique, BenchError, BenchOptions, Row, SockDir, BACKEND_CORE};
use crate::agent::{AgentClient, AgentMux};
use crate::demo::{self, parse_iperf, DemoOptions};
use crate::lab::{instance_dir, LabError, LabOptions};
use crate::qemu::{self, Instance, InstanceSpec, NicSpec};

const BOOT: Duration = Duration::from_secs(120);

pub fn run(opts: &BenchOptions, log: &dyn Fn(&str)) -> Result<Vec<Row>, BenchError> {
    let seconds = u32::try_from(opts.seconds.clamp(1, 60)).unwrap_or(5);
    let mut rows = Vec::new();
    let dpdk = if opts.enilab_only {
        None
    } else {
        log("iperf dpdk: booting two guests on vhost ports");
        let mbit = dpdk_iperf(opts, seconds, log)?;
        rows.push(row("dpdk", mbit, None, String::new()));
        Some(mbit)
    };
    enilab_backend::net::set_busy_poll(Duration::ZERO);
    let report = demo::run(
        DemoOptions {
            lab: LabOptions {
                run_root: opts.run_root.clone(),
                name: unique("iperf"),
                ..Default::default()
            },
            iperf_seconds: seconds,
            ping_count: 2,
        },
        &|m| log(&format!("iperf enilab: {m}")),
    )
    .map_err(|e| BenchError::NoTraffic("enilab iperf".into(), e.to_string()))?;
    if report.iperf_mbit_s <= 0.0 {
        return Err(BenchError::NoTraffic(
            "enilab iperf".into(),
            "iperf3 reported nothing".into(),
        ));
    }
    let ratio = dpdk.filter(|d| *d > 0.0).map(|d| report.iperf_mbit_s / d);
    rows.push(row(
        "enilab",
        report.iperf_mbit_s,
        ratio,
        report.accelerator.clone(),
    ));
    Ok(rows)
}

fn row(backend: &'static str, mbit: f64, ratio: Option<f64>, note: String) -> Row {
    Row {
        scenario: "iperf",
        backend,
        size: 1500,
        queues: 1,
        rate: mbit,
        ratio,
        cpu_be: 0.0,
        cpu_fe: 0.0,
        ratio_cpu: ratio,
        packets: 0,
        note,
    }
}

/// One guest on a DPDK vhost socket; shut down on drop.
struct Guest {
    instance: Instance,
    mux: AgentMux,
    dir: PathBuf,
}

impl Guest {
    fn boot(opts: &BenchOptions, name: &str, sock: &Path, mac: &str) -> Result<Guest, BenchError> {
        let qemu = qemu::find_qemu().map_err(LabError::from)?;
        let image = crate::image::Image::locate().map_err(LabError::from)?;
        let accel = qemu::choose_accel(&qemu, &image.kernel, &image.initrd, None);
        let dir = instance_dir(&opts.run_root, name);
        std::fs::create_dir_all(&dir).map_err(|e| LabError::Io(dir.clone(), e))?;
        let mut spec = InstanceSpec::new(name, &image.kernel, &image.initrd, &dir);
        spec.accel = accel.accel;
        spec.cpu_model = Some(accel.cpu_model.clone());
        spec.cmdline = format!("enilab.instance={name}");
        spec.nics.push(NicSpec {
            id: name.replace(|c: char| !c.is_ascii_alphanumeric(), ""),
            socket_path: sock.to_path_buf(),
            mac: mac.to_string(),
            queue_pairs: 1,
        });
        let instance = Instance::launch(&qemu, &spec).map_err(LabError::from)?;
        let mux = match AgentMux::start(&spec.paths().agent_socket, dir.join("agent.sock")) {
            Ok(m) => m,
            Err(e) => {
                let _ = instance.shutdown(Duration::from_secs(2));
                return Err(LabError::from(e).into());
            }
        };
        let g = Guest { instance, mux, dir };
        g.mux.wait_ready(BOOT).map_err(LabError::from)?;
        Ok(g)
    }

    fn sh(&self, script: &str, timeout: Duration) -> Result<String, BenchError> {
        let mut c = AgentClient::connect(self.mux.socket_path()).map_err(LabError::from)?;
        let out = c
            .exec_capture(&["sh", "-c", script], timeout)
            .map_err(LabError::from)?;
        Ok(out.stdout_str())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.instance.shutdown(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn dpdk_iperf(opts: &BenchOptions, seconds: u32, log: &dyn Fn(&str)) -> Result<f64, BenchError> {
    let env = testpmd::probe(1)?;
    let dir = SockDir::new(opts)?;
    let (a, b) = (dir.0.join("vhost0.sock"), dir.0.join("vhost1.sock"));
    let mut be = Testpmd::spawn(
        &env,
        "dpdk-vhost",
        &unique("be"),
        BACKEND_CORE,
        &[
            format!("net_vhost0,iface={},queues=1", a.display()),
            format!("net_vhost1,iface={},queues=1", b.display()),
        ],
        &[
            "--forward-mode=io".into(),
            "--nb-cores=1".into(),
            "--total-num-mbufs=32768".into(),
        ],
    )?;
    be.cmd("start", Duration::from_secs(10))?;
    let pid = std::process::id();
    let (na, nb) = (format!("bench-dpa-{pid}"), format!("bench-dpb-{pid}"));
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| Guest::boot(opts, &na, &a, "02:e1:0a:62:00:04"));
        let tb = s.spawn(|| Guest::boot(opts, &nb, &b, "02:e1:0a:62:00:05"));
        (ta.join(), tb.join())
    });
    let panicked = || BenchError::Option("guest boot thread panicked".into());
    let ga = ra.map_err(|_| panicked())??;
    let gb = rb.map_err(|_| panicked())??;
    log("iperf dpdk: guests up; static addresses 10.98.0.4 and .5");
    let short = Duration::from_secs(20);
    // The guest agent runs udhcpc on every ethN and restarts it: rename
    // the NIC out of its reach (it then stops that udhcpc), then address it.
    let static_ip = |ip: &str| {
        format!(
            "ip link set eth0 down && ip link set eth0 name dp0 && \
             ip addr replace {ip}/24 dev dp0 && ip link set dp0 up && sleep 1 && \
             ip -4 addr show dev dp0"
        )
    };
    let out_a = ga.sh(&static_ip("10.98.0.4"), short)?;
    let out_b = gb.sh(&static_ip("10.98.0.5"), short)?;
    if !out_a.contains("10.98.0.4/") || !out_b.contains("10.98.0.5/") {
        return Err(BenchError::NoTraffic(
            "dpdk iperf".into(),
            format!("static addresses did not stick: {out_a} / {out_b}"),
        ));
    }
    gb.sh("iperf3 -s -D -1", short)?;
    // ARP through the io forward, and a first sign of life.
    ga.sh("ping -c 3 -W 2 10.98.0.5", short)?;
    let out = ga.sh(
        &format!("iperf3 -c 10.98.0.5 -t {seconds} -J"),
        Duration::from_secs(u64::from(seconds) + 30),
    )?;
    drop((ga, gb));
    be.stop();
    parse_iperf(&out)
        .map(|bps| bps / 1e6)
        .filter(|m| *m > 0.0)
        .ok_or_else(|| BenchError::NoTraffic("dpdk iperf".into(), out.chars().take(400).collect()))
}

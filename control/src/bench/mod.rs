//! `enilab bench --against dpdk`: the same synthetic workload through DPDK's
//! vhost PMD (the anchor) and through enilab's backend, side by side.
//!
//! The synthetic guests are `dpdk-testpmd` virtio-user ports on one core;
//! the backend under test runs on the other core. Scenarios:
//!
//! * `fwd`: two ports, a loop. The frontend runs `5tswap` with the `loop`
//!   port topology: a frame A->B that arrives on B goes back out of B as
//!   B->A (addresses and ports swapped), so every frame is valid for the
//!   port it leaves by and the switch's source check passes. DPDK's side
//!   io-forwards between two vhost ports; enilab's side is two ENIs in one
//!   subnet with a security group (one allow rule set). Mpps = frames the
//!   frontend received per second, summed over both ports.
//! * `rxonly`: a virtio-user txonly source on one port; DPDK's vhost PMD in
//!   rxonly mode vs enilab's backend taking the frames through the switch
//!   towards an ENI with no guest (counted and dropped as `queue_full`).
//!   Mpps = frames the backend took off the TX ring per second.
//! * `iperf`: see [`iperf`].

pub mod iperf;
pub mod testpmd;

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use enilab_switch::{Cidr, Peer, PortMatch, Protocol, SecurityGroupConfig, SgRule};

use crate::lab::{Lab, LabOptions};
use testpmd::{DpdkEnv, Testpmd};

/// Core of the backend under test; the synthetic guests get the other.
pub const BACKEND_CORE: usize = 0;
pub const FRONTEND_CORE: usize = 1;
const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 0);
const VPC: &str = "vpc-bench";

/// Errors of the bench command.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("dpdk-testpmd is not on PATH; run ./setup.sh (Debian package dpdk)")]
    NoTestpmd,
    #[error(
        "not enough free 2 MiB hugepages ({free} free, {need} needed); run ./setup.sh \
         or `echo 1024 > /proc/sys/vm/nr_hugepages`"
    )]
    NoHugepages { free: u64, need: u64 },
    #[error("no hugetlbfs is mounted (mount -t hugetlbfs nodev /dev/hugepages)")]
    NoHugetlbfs,
    #[error("the bench needs two CPU cores (one per side), this machine has {0}")]
    Cores(usize),
    #[error("cannot start {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("testpmd {0} failed; its last output:\n{1}")]
    Testpmd(String, String),
    #[error("cannot pin to core {0}")]
    Affinity(usize, #[source] std::io::Error),
    #[error("no packets flowed through {0} ({1})")]
    NoTraffic(String, String),
    #[error("bad option: {0}")]
    Option(String),
    #[error(transparent)]
    Lab(#[from] crate::lab::LabError),
}

/// Which workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Fwd,
    Rxonly,
    Iperf,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Fwd => "fwd",
            Scenario::Rxonly => "rxonly",
            Scenario::Iperf => "iperf",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub scenario: Scenario,
    /// Frame sizes in bytes (without FCS).
    pub sizes: Vec<u32>,
    pub queues: Vec<u16>,
    /// Measured window per run.
    pub seconds: u64,
    /// Time before the window opens.
    pub warmup: Duration,
    /// Bursts the frontend sends first in `fwd` (frames in the loop).
    pub bursts: u32,
    pub run_root: PathBuf,
    /// Skip the DPDK side (enilab only, no ratio).
    pub enilab_only: bool,
    /// enilab's busy-poll budget (0: sleep in epoll between kicks).
    pub busy_poll: Duration,
    /// Runs per size x queue count, DPDK and enilab alternating; the
    /// table shows the median (the host is shared, single runs scatter).
    pub repeat: u32,
    /// Run testpmd and the backend under SCHED_RR when permitted.
    pub realtime: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            scenario: Scenario::Fwd,
            sizes: vec![64, 1500],
            queues: vec![1, 4],
            seconds: 5,
            warmup: Duration::from_secs(2),
            bursts: 4,
            run_root: crate::lab::default_run_root(),
            enilab_only: false,
            busy_poll: Duration::from_millis(1),
            repeat: 1,
            realtime: true,
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub backend: &'static str,
    pub size: u32,
    pub queues: u16,
    /// Million packets per second (Mbit/s for `iperf`).
    pub rate: f64,
    /// enilab / DPDK for enilab rows.
    pub ratio: Option<f64>,
    /// Share of a core the backend's forwarding threads got in the window.
    pub cpu_be: f64,
    /// Share of a core the frontend's forwarding thread got.
    pub cpu_fe: f64,
    /// The same ratio with each rate divided by min(cpu_be, cpu_fe): what
    /// each side moved per unit of CPU the slower-served side got. On a
    /// shared host this is steadier than the wall-clock ratio.
    pub ratio_cpu: Option<f64>,
    /// Packets counted over the whole run (proof that frames flowed).
    pub packets: u64,
    /// Free-form notes: drops, counters.
    pub note: String,
}

impl Row {
    /// Rate per unit of the CPU share the less-served side got.
    pub fn per_cpu(&self) -> f64 {
        let share = self.cpu_be.min(self.cpu_fe);
        if share > 0.0 {
            self.rate / share
        } else {
            0.0
        }
    }
}

/// Run every size x queue count of the scenario on both backends.
pub fn run(opts: &BenchOptions, log: &dyn Fn(&str)) -> Result<Vec<Row>, BenchError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        return Err(BenchError::Cores(cores));
    }
    if opts.sizes.iter().any(|&s| !(60..=1514).contains(&s)) {
        return Err(BenchError::Option("sizes are 60 to 1514 bytes".into()));
    }
    if opts.queues.iter().any(|&q| !(1..=8).contains(&q)) {
        return Err(BenchError::Option("queues are 1 to 8".into()));
    }
    if opts.scenario == Scenario::Iperf {
        return iperf::run(opts, log);
    }
    let env = testpmd::probe(2)?;
    // Both sides busy-poll a core each; any other runnable thread on the
    // host would take turns with them and the rates would measure the
    // host's load. Under SCHED_RR (inherited by the backend's workers and
    // the testpmd children) they keep their cores; the kernel's RT
    // throttling still leaves 5% to everything else.
    let rt = opts.realtime && sched::realtime(true);
    log(if rt {
        "scheduling: SCHED_RR priority 10 for testpmd and the backend"
    } else {
        "scheduling: normal (SCHED_OTHER); other load on the host shows in the rates"
    });
    let rows = measure_all(&env, opts, log, rt);
    if rt {
        sched::realtime(false);
    }
    rows
}

fn measure_all(
    env: &DpdkEnv,
    opts: &BenchOptions,
    log: &dyn Fn(&str),
    rt: bool,
) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    let n = opts.repeat.max(1);
    for &q in &opts.queues {
        for &size in &opts.sizes {
            let (mut dpdk, mut enilab) = (Vec::new(), Vec::new());
            for i in 0..n {
                let tag = format!(
                    "{} size {size} queues {q} run {}/{n}",
                    opts.scenario.name(),
                    i + 1
                );
                if !opts.enilab_only {
                    log(&format!("dpdk {tag}"));
                    dpdk.push(match opts.scenario {
                        Scenario::Fwd => dpdk_fwd(env, opts, size, q)?,
                        _ => dpdk_rxonly(env, opts, size, q)?,
                    });
                }
                log(&format!("enilab {tag}"));
                enilab.push(match opts.scenario {
                    Scenario::Fwd => enilab_fwd(env, opts, size, q)?,
                    _ => enilab_rxonly(env, opts, size, q)?,
                });
            }
            let runs: Vec<String> = dpdk
                .iter()
                .zip(&enilab)
                .map(|(d, e)| format!("{:.2}", e.rate / d.rate.max(f64::MIN_POSITIVE)))
                .collect();
            let mut d = median(dpdk);
            let mut e = median(enilab).ok_or(BenchError::Option("no runs".into()))?;
            if rt {
                for r in d.iter_mut().chain(std::iter::once(&mut e)) {
                    r.note = format!("SCHED_RR; {}", r.note);
                }
            }
            if let Some(d) = &d {
                if d.rate > 0.0 {
                    e.ratio = Some(e.rate / d.rate);
                }
                if d.per_cpu() > 0.0 {
                    e.ratio_cpu = Some(e.per_cpu() / d.per_cpu());
                }
                if n > 1 {
                    e.note = format!(
                        "median of {n}, ratio per run {}; {}",
                        runs.join(" "),
                        e.note
                    );
                }
                rows.push(d.clone());
            }
            rows.push(e);
        }
    }
    Ok(rows)
}

/// The run with the median rate.
fn median(mut runs: Vec<Row>) -> Option<Row> {
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let mid = runs.len() / 2;
    runs.into_iter().nth(mid)
}

/// The table the command prints.
pub fn render(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:<7} {:>5} {:>6} {:>14} {:>6} {:>6} {:>11} {:>11} {:>12}  note",
        "scenario",
        "backend",
        "size",
        "queues",
        "rate",
        "cpu-be",
        "cpu-fe",
        "enilab/DPDK",
        "(per cpu)",
        "packets"
    );
    for r in rows {
        let unit = if r.scenario == "iperf" {
            "Mbit/s"
        } else {
            "Mpps"
        };
        let f = |x: Option<f64>| x.map_or(String::new(), |x| format!("{x:.2}"));
        let _ = writeln!(
            s,
            "{:<8} {:<7} {:>5} {:>6} {:>14} {:>6.2} {:>6.2} {:>11} {:>11} {:>12}  {}",
            r.scenario,
            r.backend,
            r.size,
            r.queues,
            format!("{:.3} {unit}", r.rate),
            r.cpu_be,
            r.cpu_fe,
            f(r.ratio),
            f(r.ratio_cpu),
            r.packets,
            r.note
        );
    }
    s
}

/// The two synthetic guests' addresses (what the lab gives the first two
/// ENIs of the bench subnet: .4 and .5, MAC 02:e1 + IP).
fn addr(host: u8) -> (Ipv4Addr, String) {
    let o = SUBNET.octets();
    let ip = Ipv4Addr::new(o[0], o[1], o[2], host);
    let mac = format!("02:e1:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], host);
    (ip, mac)
}

fn unique(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "enb{}{}{}",
        std::process::id(),
        what,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A scratch directory for DPDK's vhost sockets, removed on drop.
struct SockDir(PathBuf);

impl SockDir {
    fn new(opts: &BenchOptions) -> Result<SockDir, BenchError> {
        let d = opts.run_root.join(unique("sock"));
        std::fs::create_dir_all(&d)
            .map_err(|e| BenchError::Lab(crate::lab::LabError::Io(d.clone(), e)))?;
        Ok(SockDir(d))
    }
}

impl Drop for SockDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn virtio_user(i: usize, sock: &str, q: u16, mac: &str) -> String {
    format!("net_virtio_user{i},path={sock},queues={q},mac={mac}")
}

fn queue_args(q: u16) -> Vec<String> {
    vec![
        "--nb-cores=1".into(),
        format!("--rxq={q}"),
        format!("--txq={q}"),
        "--total-num-mbufs=32768".into(),
    ]
}

/// The `fwd` frontend on sockets `a` and `b`.
fn fwd_frontend(env: &DpdkEnv, a: &str, b: &str, size: u32, q: u16) -> Result<Testpmd, BenchError> {
    let ((ip_a, mac_a), (ip_b, mac_b)) = (addr(4), addr(5));
    let mut app = vec![
        "--forward-mode=5tswap".into(),
        "--port-topology=loop".into(),
        format!("--txpkts={size}"),
        format!("--tx-ip={ip_a},{ip_b}"),
        format!("--eth-peer=0,{mac_b}"),
        format!("--eth-peer=1,{mac_a}"),
    ];
    app.extend(queue_args(q));
    Testpmd::spawn(
        env,
        "frontend",
        &unique("fe"),
        FRONTEND_CORE,
        &[virtio_user(0, a, q, &mac_a), virtio_user(1, b, q, &mac_b)],
        &app,
    )
}

/// The `rxonly` source on socket `a`, sending A->B.
fn txonly_source(env: &DpdkEnv, a: &str, size: u32, q: u16) -> Result<Testpmd, BenchError> {
    let ((ip_a, mac_a), (ip_b, mac_b)) = (addr(4), addr(5));
    let mut app = vec![
        "--forward-mode=txonly".into(),
        "--port-topology=loop".into(),
        format!("--txpkts={size}"),
        format!("--tx-ip={ip_a},{ip_b}"),
        format!("--eth-peer=0,{mac_b}"),
    ];
    app.extend(queue_args(q));
    Testpmd::spawn(
        env,
        "source",
        &unique("fe"),
        FRONTEND_CORE,
        &[virtio_user(0, a, q, &mac_a)],
        &app,
    )
}

/// CPU time (ns) of the threads of `pid` whose name starts with one of
/// `prefixes`, from /proc schedstat (no hardware counters needed).
fn cpu_ns(pid: u32, prefixes: &[&str]) -> u64 {
    let dir = format!("/proc/{pid}/task");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut total = 0u64;
    for t in rd.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !prefixes.iter().any(|p| comm.starts_with(p)) {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// DPDK's forwarding lcore threads.
const DPDK_WORKERS: &[&str] = &["rte-worker", "lcore-worker"];
/// enilab's card workers.
const ENILAB_WORKERS: &[&str] = &["card"];

/// Where a side's packets and CPU time are read.
struct Probe<'a> {
    packets: &'a mut dyn FnMut() -> Result<u64, BenchError>,
    backend: (u32, &'static [&'static str]),
    frontend: u32,
}

/// What one measured window gave.
struct Window {
    mpps: f64,
    packets: u64,
    /// Share of a core the backend's forwarding threads and the frontend
    /// got during the window (the host is shared: less than 1 means other
    /// processes took the rest).
    be_cpu: f64,
    fe_cpu: f64,
}

impl Window {}

/// Warm up, then count packets and CPU time over the window.
fn measure(probe: &mut Probe<'_>, opts: &BenchOptions) -> Result<Window, BenchError> {
    std::thread::sleep(opts.warmup);
    let cpu = |p: &Probe<'_>| {
        (
            cpu_ns(p.backend.0, p.backend.1),
            cpu_ns(p.frontend, DPDK_WORKERS),
        )
    };
    let n0 = (probe.packets)()?;
    let (t0, c0) = (Instant::now(), cpu(probe));
    std::thread::sleep(Duration::from_secs(opts.seconds.max(1)));
    let n1 = (probe.packets)()?;
    let (dt, c1) = (t0.elapsed().as_secs_f64(), cpu(probe));
    let share = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / 1e9 / dt;
    Ok(Window {
        mpps: n1.saturating_sub(n0) as f64 / dt / 1e6,
        packets: n1,
        be_cpu: share(c0.0, c1.0),
        fe_cpu: share(c0.1, c1.1),
    })
}

fn start_loop(fe: &mut Testpmd, bursts: u32) -> Result<(), BenchError> {
    fe.cmd(
        &format!("start tx_first {}", bursts.max(1)),
        Duration::from_secs(10),
    )?;
    Ok(())
}

fn dpdk_fwd(env: &DpdkEnv, opts: &BenchOptions, size: u32, q: u16) -> Result<Row, BenchError> {
    let dir = SockDir::new(opts)?;
    let (a, b) = (
        dir.0.join("vhost0.sock").display().to_string(),
        dir.0.join("vhost1.sock").display().to_string(),
    );
    let mut be = Testpmd::spawn(
        env,
        "dpdk-vhost",
        &unique("be"),
        BACKEND_CORE,
        &[
            format!("net_vhost0,iface={a},queues={q}"),
            format!("net_vhost1,iface={b},queues={q}"),
        ],
        &[&["--forward-mode=io".to_string()][..], &queue_args(q)].concat(),
    )?;
    be.cmd("start", Duration::from_secs(10))?;
    let mut fe = fwd_frontend(env, &a, &b, size, q)?;
    start_loop(&mut fe, opts.bursts)?;
    let (be_pid, fe_pid) = (be.pid(), fe.pid());
    let w = measure(
        &mut Probe {
            packets: &mut || fe.rx_packets(),
            backend: (be_pid, DPDK_WORKERS),
            frontend: fe_pid,
        },
        opts,
    )?;
    fe.stop();
    be.stop();
    if w.packets == 0 {
        return Err(BenchError::NoTraffic("dpdk fwd".into(), String::new()));
    }
    Ok(Row {
        scenario: "fwd",
        backend: "dpdk",
        size,
        queues: q,
        rate: w.mpps,
        ratio: None,
        cpu_be: w.be_cpu,
        cpu_fe: w.fe_cpu,
        ratio_cpu: None,
        packets: w.packets,
        note: String::new(),
    })
}

fn dpdk_rxonly(env: &DpdkEnv, opts: &BenchOptions, size: u32, q: u16) -> Result<Row, BenchError> {
    let dir = SockDir::new(opts)?;
    let a = dir.0.join("vhost0.sock").display().to_string();
    let mut be = Testpmd::spawn(
        env,
        "dpdk-vhost",
        &unique("be"),
        BACKEND_CORE,
        &[format!("net_vhost0,iface={a},queues={q}")],
        &[
            &[
                "--forward-mode=rxonly".to_string(),
                "--port-topology=loop".to_string(),
            ][..],
            &queue_args(q),
        ]
        .concat(),
    )?;
    be.cmd("start", Duration::from_secs(10))?;
    let mut fe = txonly_source(env, &a, size, q)?;
    fe.cmd("start", Duration::from_secs(10))?;
    let (be_pid, fe_pid) = (be.pid(), fe.pid());
    let w = measure(
        &mut Probe {
            packets: &mut || be.rx_packets(),
            backend: (be_pid, DPDK_WORKERS),
            frontend: fe_pid,
        },
        opts,
    )?;
    fe.stop();
    be.stop();
    if w.packets == 0 {
        return Err(BenchError::NoTraffic("dpdk rxonly".into(), String::new()));
    }
    Ok(Row {
        scenario: "rxonly",
        backend: "dpdk",
        size,
        queues: q,
        rate: w.mpps,
        ratio: None,
        cpu_be: w.be_cpu,
        cpu_fe: w.fe_cpu,
        ratio_cpu: None,
        packets: w.packets,
        note: String::new(),
    })
}

/// A datapath-only lab on the backend core: one subnet, two ENIs with `q`
/// queue pairs, both in a security group with one allow rule set.
struct EnilabSide {
    lab: Lab,
    a: String,
    b: String,
}

impl EnilabSide {
    fn new(opts: &BenchOptions, q: u16) -> Result<EnilabSide, BenchError> {
        // Threads inherit the creating thread's CPU mask: the card worker
        // (started with the first ENI) lands on the backend core.
        enilab_backend::net::set_busy_poll(opts.busy_poll);
        let saved = affinity::get();
        affinity::pin(BACKEND_CORE)?;
        let side = Self::build(opts, q);
        if let Some(m) = saved {
            affinity::set(&m);
        }
        side
    }

    fn build(opts: &BenchOptions, q: u16) -> Result<EnilabSide, BenchError> {
        let lab = Lab::new_datapath(LabOptions {
            run_root: opts.run_root.clone(),
            name: unique("lab"),
            workers_per_card: 1,
            image: None,
            accel: None,
        })?;
        let subnet = lab.add_subnet("subnet-bench", VPC, SUBNET, 24)?;
        let a = lab.create_eni(subnet, Some(addr(4).0), q, 0)?;
        let b = lab.create_eni(subnet, Some(addr(5).0), q, 0)?;
        let cidr: Cidr = format!("{SUBNET}/24")
            .parse()
            .map_err(|e| BenchError::Option(format!("{e}")))?;
        lab.update_policy(|p| {
            p.security_groups = vec![SecurityGroupConfig {
                id: "sg-bench".into(),
                vpc_id: VPC.into(),
                ingress: vec![SgRule {
                    protocol: Protocol::UDP,
                    ports: PortMatch::Any,
                    peer: Peer::Cidr(cidr),
                }],
                egress: vec![SgRule {
                    protocol: Protocol::All,
                    ports: PortMatch::Any,
                    peer: Peer::Cidr(cidr),
                }],
            }];
        })?;
        lab.set_eni_groups(&a, &["sg-bench"])?;
        lab.set_eni_groups(&b, &["sg-bench"])?;
        Ok(EnilabSide { lab, a, b })
    }

    fn sock(&self, eni: &str) -> String {
        self.lab
            .eni_socket(eni)
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    fn tx_packets(&self, eni: &str) -> u64 {
        self.lab
            .eni_queue_stats(eni)
            .map_or(0, |v| v.iter().map(|s| s.tx_packets).sum())
    }

    /// Switch drop counters of both ports, as "reason=n" pairs.
    fn drops(&self) -> String {
        let mut out = Vec::new();
        for (name, eni) in [("a", &self.a), ("b", &self.b)] {
            if let Some(p) = self.lab.eni_port(eni) {
                let st = self.lab.switch().stats(p);
                let json = serde_json::to_value(st).unwrap_or_default();
                if let Some(d) = json.get("drops").and_then(|d| d.as_object()) {
                    for (k, v) in d {
                        if v.as_u64().unwrap_or(0) > 0 {
                            out.push(format!("{name}.{k}={v}"));
                        }
                    }
                }
            }
        }
        if out.is_empty() {
            out.push("no drops".into());
        }
        // Frames per TX batch and guest interrupts: how the loop behaved.
        let (mut fwd, mut batches, mut seen, mut cached) = (0u64, 0u64, 0u64, 0u64);
        for c in self.lab.datapath().cards() {
            for w in c.worker_stats() {
                fwd += w.forwarded;
                batches += w.tx_batches;
                seen += w.forwarded + w.replied + w.dropped;
                cached += w.flow_cache_hits;
            }
        }
        let irqs: u64 = [&self.a, &self.b]
            .iter()
            .filter_map(|e| self.lab.eni_queue_stats(e))
            .flatten()
            .map(|q| q.notifications)
            .sum();
        out.push(format!(
            "{:.1} frames/batch, {:.1}% from the flow cache, {irqs} guest irqs",
            fwd as f64 / batches.max(1) as f64,
            100.0 * cached as f64 / seen.max(1) as f64
        ));
        out.join(" ")
    }
}

fn enilab_fwd(env: &DpdkEnv, opts: &BenchOptions, size: u32, q: u16) -> Result<Row, BenchError> {
    let side = EnilabSide::new(opts, q)?;
    let mut fe = fwd_frontend(env, &side.sock(&side.a), &side.sock(&side.b), size, q)?;
    // The bursts sent on B carry A's source address and enilab's source
    // check drops them (DPDK forwards them): send twice as many, so both
    // loops hold the same number of valid frames.
    start_loop(&mut fe, opts.bursts * 2)?;
    let fe_pid = fe.pid();
    let w = measure(
        &mut Probe {
            packets: &mut || fe.rx_packets(),
            backend: (std::process::id(), ENILAB_WORKERS),
            frontend: fe_pid,
        },
        opts,
    )?;
    fe.stop();
    let note = format!(
        "{} (2x{} bursts: those sent on B carry A's source)",
        side.drops(),
        opts.bursts
    );
    if w.packets == 0 {
        return Err(BenchError::NoTraffic("enilab fwd".into(), note));
    }
    Ok(Row {
        scenario: "fwd",
        backend: "enilab",
        size,
        queues: q,
        rate: w.mpps,
        ratio: None,
        cpu_be: w.be_cpu,
        cpu_fe: w.fe_cpu,
        ratio_cpu: None,
        packets: w.packets,
        note,
    })
}

fn enilab_rxonly(env: &DpdkEnv, opts: &BenchOptions, size: u32, q: u16) -> Result<Row, BenchError> {
    let side = EnilabSide::new(opts, q)?;
    let mut fe = txonly_source(env, &side.sock(&side.a), size, q)?;
    fe.cmd("start", Duration::from_secs(10))?;
    let w = measure(
        &mut Probe {
            packets: &mut || Ok(side.tx_packets(&side.a)),
            backend: (std::process::id(), ENILAB_WORKERS),
            frontend: fe.pid(),
        },
        opts,
    )?;
    fe.stop();
    let note = side.drops();
    if w.packets == 0 {
        return Err(BenchError::NoTraffic("enilab rxonly".into(), note));
    }
    Ok(Row {
        scenario: "rxonly",
        backend: "enilab",
        size,
        queues: q,
        rate: w.mpps,
        ratio: None,
        cpu_be: w.be_cpu,
        cpu_fe: w.fe_cpu,
        ratio_cpu: None,
        packets: w.packets,
        note,
    })
}

/// Scheduling policy of the calling thread (inherited by the threads and
/// processes it starts).
pub(crate) mod sched {
    /// Switch to SCHED_RR priority 10 (`on`) or back to SCHED_OTHER.
    /// False when not permitted.
    pub fn realtime(on: bool) -> bool {
        let (policy, prio) = if on {
            (libc::SCHED_RR, 10)
        } else {
            (libc::SCHED_OTHER, 0)
        };
        let p = libc::sched_param {
            sched_priority: prio,
        };
        // SAFETY: pid 0 is the calling thread; `p` is a valid sched_param
        // that outlives the call.
        unsafe { libc::sched_setscheduler(0, policy, &p) == 0 }
    }
}

/// The calling thread's CPU mask.
pub(crate) mod affinity {
    use super::BenchError;

    pub fn get() -> Option<libc::cpu_set_t> {
        // SAFETY: cpu_set_t is plain data; zeroed is a valid (empty) set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: pid 0 is the calling thread; the size matches `set`.
        let r =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        (r == 0).then_some(set)
    }

    pub fn set(set: &libc::cpu_set_t) -> bool {
        // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t
        // of the size passed.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) == 0 }
    }

    /// Pin the calling thread (and the threads it starts) to `core`.
    pub fn pin(core: usize) -> Result<(), BenchError> {
        // SAFETY: as in `get`.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: CPU_SET writes one bit inside `set`; `core` is below the
        // machine's CPU count, far below CPU_SETSIZE.
        unsafe { libc::CPU_SET(core, &mut set) };
        if set_ok(&set) {
            Ok(())
        } else {
            Err(BenchError::Affinity(core, std::io::Error::last_os_error()))
        }
    }

    fn set_ok(s: &libc::cpu_set_t) -> bool {
        set(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_ratio_only_for_enilab_rows() {
        let row = |backend, rate, ratio| Row {
            scenario: "fwd",
            backend,
            size: 64,
            queues: 1,
            rate,
            ratio,
            cpu_be: 1.0,
            cpu_fe: 1.0,
            ratio_cpu: ratio,
            packets: 7,
            note: String::new(),
        };
        let t = render(&[row("dpdk", 2.0, None), row("enilab", 1.5, Some(0.75))]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].contains("dpdk") && !lines[1].contains("0.75"));
        assert!(lines[2].contains("1.500 Mpps") && lines[2].contains("0.75"));
    }

    #[test]
    fn guest_addresses_match_the_labs_scheme() {
        assert_eq!(
            addr(4),
            (Ipv4Addr::new(10, 99, 0, 4), "02:e1:0a:63:00:04".into())
        );
    }

    #[test]
    fn bad_options_are_refused_before_anything_starts() {
        let mut o = BenchOptions {
            sizes: vec![20],
            ..Default::default()
        };
        assert!(matches!(
            run(&o, &|_| {}),
            Err(BenchError::Option(_)) | Err(BenchError::Cores(_))
        ));
        o.sizes = vec![64];
        o.queues = vec![0];
        assert!(matches!(
            run(&o, &|_| {}),
            Err(BenchError::Option(_)) | Err(BenchError::Cores(_))
        ));
    }
}

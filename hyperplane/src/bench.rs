//! Benchmark runner: the figures issue 5 asks for, printed, never asserted.
//! `cargo bench -p enilab-hyperplane` (or `--bench hyperplane -- --quick`).

use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::maglev::{disruption, mix64, Maglev};
use crate::{
    Config, HealthCheckConfig, Hyperplane, ListenerConfig, LoadBalancerConfig, NatGatewayConfig,
    Node, Options, Sink, TargetConfig, TargetGroupConfig, L4,
};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Active flows in the table while forwarding is timed.
    pub flows: usize,
    /// Packets forwarded per timed run.
    pub packets: usize,
    pub maglev_backends: usize,
    pub maglev_table_size: usize,
    /// Run only the sections whose name contains this (maglev, nat, replicated, nlb).
    pub only: Option<String>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            flows: 1_000_000,
            packets: 20_000_000,
            maglev_backends: 1000,
            maglev_table_size: crate::MAGLEV_TABLE_SIZE,
            only: None,
        }
    }
}

/// Named figures with units.
#[derive(Clone, Debug, Default)]
pub struct BenchReport {
    pub lines: Vec<(String, f64, &'static str)>,
}

impl BenchReport {
    fn add(&mut self, name: impl Into<String>, v: f64, unit: &'static str) {
        self.lines.push((name.into(), v, unit));
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.lines.iter().find(|l| l.0 == name).map(|l| l.1)
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, v, unit) in &self.lines {
            writeln!(f, "{name:<60} {v:>12.3} {unit}")?;
        }
        Ok(())
    }
}

/// Counts frames and bytes; reads one byte so the work cannot be optimised away.
#[derive(Default)]
struct CountSink {
    frames: u64,
    sum: u64,
}

impl Sink for CountSink {
    #[inline]
    fn emit(&mut self, _port: u32, frame: &[u8]) {
        self.frames += 1;
        self.sum = self
            .sum
            .wrapping_add(u64::from(frame.get(30).copied().unwrap_or(0)));
    }
}

const GW: [u8; 6] = [0x02, 0xe1, 0x1a, 0x00, 0x00, 0x01];
const NAT_PORT: u32 = 1;
const LB_PORT: u32 = 2;
const VIP: [u8; 4] = [10, 0, 2, 100];

/// A 64-byte Ethernet/IPv4/TCP frame (10 bytes of payload), checksums valid.
fn frame64(src: u32, sport: u16, dst: u32, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    crate::wire::build_tcp(
        &mut f,
        &crate::wire::TcpSpec {
            src_mac: [2, 0, 0, 0, 0, 9],
            dst_mac: [2, 0, 0, 0, 0, 1],
            src,
            dst,
            sport,
            dport,
            seq: 1,
            ack: 1,
            flags,
        },
    );
    // Grow to 64 bytes: 10 bytes of payload, lengths and checksums fixed up.
    f.resize(64, 0);
    f[16..18].copy_from_slice(&50u16.to_be_bytes());
    f[24] = 0;
    f[25] = 0;
    let c = crate::wire::checksum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f[50] = 0;
    f[51] = 0;
    let pseudo = (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + 6 + 30;
    let c = crate::wire::checksum(&f[34..64], pseudo);
    f[50..52].copy_from_slice(&c.to_be_bytes());
    f
}

fn client(i: usize) -> (u32, u16) {
    // Spread clients over many addresses and ports.
    (
        0x0a00_0000 | ((i as u32 >> 10) & 0xfffff),
        1024 + (i & 1023) as u16,
    )
}

/// CPU time this thread has used, so a loaded machine does not count
/// other processes' time against the per-core figures.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively
    // borrowed `ts`; CLOCK_THREAD_CPUTIME_ID is supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Frames laid out back to back like a NIC ring, in a pseudo-random flow
/// order, so the table sees random access and the frames stream.
fn ring(frames: &[Vec<u8>], len: usize) -> Vec<u8> {
    let mut x = 7u64;
    let mut r = Vec::with_capacity(len * 64);
    for _ in 0..len {
        x = mix64(x);
        r.extend_from_slice(&frames[(x as usize) % frames.len()][..64]);
    }
    r
}

/// Forwards `packets` frames from the ring in batches; returns
/// (Mpps per CPU-second, Mpps wall clock).
fn forward(node: &mut Node, port: u32, ring: &[u8], packets: usize, batched: bool) -> (f64, f64) {
    let mut sink = CountSink::default();
    let frames: Vec<&[u8]> = ring.chunks_exact(64).collect();
    let mut batch: Vec<(u32, &[u8])> = Vec::with_capacity(32);
    let wall = Instant::now();
    let cpu = thread_cpu();
    let mut done = 0;
    while done < packets {
        for chunk in frames.chunks(32) {
            batch.clear();
            batch.extend(chunk.iter().map(|f| (port, *f)));
            let now = Instant::now();
            if batched {
                node.process_batch(&batch, now, &mut sink);
            } else {
                for (p, f) in &batch {
                    node.process(*p, f, now, &mut sink);
                }
            }
            done += chunk.len();
            if done >= packets {
                break;
            }
        }
    }
    let cpu_s = (thread_cpu() - cpu).as_secs_f64();
    let wall_s = wall.elapsed().as_secs_f64();
    std::hint::black_box(sink.sum);
    if (sink.frames as usize) < done {
        eprintln!(
            "warning: {} of {done} frames were dropped",
            done - sink.frames as usize
        );
    }
    (
        done as f64 / cpu_s.max(1e-9) / 1e6,
        done as f64 / wall_s / 1e6,
    )
}

/// Sets flows up from `frames` one by one; returns (M/s per CPU-second, wall).
fn setup(node: &mut Node, port: u32, frames: &[Vec<u8>]) -> (f64, f64) {
    let mut sink = CountSink::default();
    let wall = Instant::now();
    let cpu = thread_cpu();
    for f in frames {
        node.process(port, f, wall, &mut sink);
    }
    let cpu_s = (thread_cpu() - cpu).as_secs_f64();
    let n = frames.len() as f64;
    (
        n / cpu_s.max(1e-9) / 1e6,
        n / wall.elapsed().as_secs_f64() / 1e6,
    )
}

fn acks(syn: &[Vec<u8>]) -> Vec<Vec<u8>> {
    syn.iter()
        .map(|f| {
            let mut a = f.clone();
            a[47] = crate::wire::TCP_ACK;
            a
        })
        .collect()
}

fn nat_config(port: u32) -> Config {
    let nat = NatGatewayConfig {
        id: "nat-bench".into(),
        port,
        mac: [2, 0, 0, 0, 0, 2],
        gateway_mac: GW,
        addresses: vec![Ipv4Addr::new(10, 0, 0, 5)],
    };
    Config {
        nat_gateways: vec![nat],
        load_balancers: vec![],
    }
}

fn nat_bench(o: &BenchOptions, r: &mut BenchReport) {
    let opts = Options {
        nodes: 1,
        flows_per_node: o.flows + 1024,
        ..Options::default()
    };
    let hp = Hyperplane::new(opts).expect("bench options are valid");
    hp.publish(nat_config(NAT_PORT))
        .expect("bench config is valid");
    let mut node = hp.node(0).expect("node 0 exists");
    let dst = u32::from(Ipv4Addr::new(93, 184, 216, 34));
    let syn: Vec<Vec<u8>> = (0..o.flows)
        .map(|i| {
            let (c, p) = client(i);
            frame64(
                c,
                p,
                dst.wrapping_add((i % 64) as u32),
                443,
                crate::wire::TCP_SYN,
            )
        })
        .collect();
    let (cpu, wall) = setup(&mut node, NAT_PORT, &syn);
    r.add(
        "NAT new flows/s per core (CPU time; 1 node, no replica)",
        cpu,
        "M/s",
    );
    r.add("NAT new flows/s (wall clock)", wall, "M/s");
    r.add("NAT flows set up", node.flows() as f64, "flows");
    let mut sink = CountSink::default();
    node.tick(Instant::now(), &mut sink);
    let st = hp.stats();
    r.add(
        "NAT table bytes per flow",
        st.table_memory_bytes as f64 / node.flows().max(1) as f64,
        "B",
    );
    let ack = acks(&syn);
    drop(syn);
    let ring = ring(&ack, o.packets.min(4_000_000));
    drop(ack);
    let (cpu, wall) = forward(&mut node, NAT_PORT, &ring, o.packets, true);
    r.add(
        format!(
            "NAT translation, 64 B frames, {} flows (CPU time)",
            node.flows()
        ),
        cpu,
        "Mpps/core",
    );
    r.add("NAT translation (wall clock)", wall, "Mpps");
    let (cpu, _) = forward(&mut node, NAT_PORT, &ring, o.packets / 2, false);
    r.add(
        "NAT translation, process() per frame, no prefetch (CPU time)",
        cpu,
        "Mpps/core",
    );
}

fn nat_setup_replicated(o: &BenchOptions, r: &mut BenchReport) {
    // Two nodes on this one thread: node 0 and 1 set flows up and apply each other's replicas.
    let n = o.flows;
    let opts = Options {
        nodes: 2,
        flows_per_node: n + 1024,
        ..Options::default()
    };
    let hp = Hyperplane::new(opts).expect("bench options are valid");
    hp.publish(nat_config(NAT_PORT))
        .expect("bench config is valid");
    let mut nodes = [hp.node(0).expect("node 0"), hp.node(1).expect("node 1")];
    let dst = u32::from(Ipv4Addr::new(93, 184, 216, 34));
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let (c, p) = client(i);
            frame64(
                c,
                p,
                dst.wrapping_add((i % 64) as u32),
                443,
                crate::wire::TCP_SYN,
            )
        })
        .collect();
    let mut sink = CountSink::default();
    let start = Instant::now();
    let cpu = thread_cpu();
    for (i, f) in frames.iter().enumerate() {
        if let Some(k) = hp.steer(NAT_PORT, f) {
            nodes[k].process(NAT_PORT, f, start, &mut sink);
        }
        if i % 4096 == 4095 {
            for nd in nodes.iter_mut() {
                nd.tick(start, &mut sink);
            }
        }
    }
    for nd in nodes.iter_mut() {
        nd.tick(start, &mut sink);
    }
    let dt = (thread_cpu() - cpu).as_secs_f64();
    let st = hp.stats();
    r.add(
        "NAT new flows/s, replicated, steer+primary+secondary on one core (CPU time)",
        n as f64 / dt.max(1e-9) / 1e6,
        "M/s",
    );
    r.add(
        "  port allocation failures",
        st.port_allocation_failures as f64,
        "",
    );
    r.add(
        "  replication records dropped (inbox full)",
        st.nodes.iter().map(|x| x.replication_dropped).sum::<u64>() as f64,
        "records",
    );
}

fn nlb_bench(o: &BenchOptions, r: &mut BenchReport) {
    let opts = Options {
        nodes: 1,
        flows_per_node: o.flows + 1024,
        ..Options::default()
    };
    let hp = Hyperplane::new(opts).expect("bench options are valid");
    let targets = (0..100u32)
        .map(|i| TargetConfig {
            ip: Ipv4Addr::from(0x0a00_0300 + i),
            port: 8080,
            draining_since: None,
        })
        .collect();
    let tg = TargetGroupConfig {
        id: "tg".into(),
        protocol: L4::Tcp,
        targets,
        health_check: HealthCheckConfig {
            enabled: false,
            ..HealthCheckConfig::default()
        },
        source_ip_stickiness: false,
        deregistration_delay: Duration::from_secs(300),
    };
    let lb = LoadBalancerConfig {
        id: "lb".into(),
        port: LB_PORT,
        mac: [2, 0, 0, 0, 0, 3],
        gateway_mac: GW,
        addresses: vec![VIP.into()],
        listeners: vec![ListenerConfig {
            protocol: L4::Tcp,
            port: 80,
            target_group: tg,
        }],
    };
    hp.publish(Config {
        nat_gateways: vec![],
        load_balancers: vec![lb],
    })
    .expect("bench config is valid");
    let mut node = hp.node(0).expect("node 0 exists");
    let vip = u32::from_be_bytes(VIP);
    let syn: Vec<Vec<u8>> = (0..o.flows)
        .map(|i| {
            let (c, p) = client(i);
            frame64(c, p, vip, 80, crate::wire::TCP_SYN)
        })
        .collect();
    let (cpu, wall) = setup(&mut node, LB_PORT, &syn);
    r.add(
        "NLB new flows/s per core (CPU time; 1 node, no replica)",
        cpu,
        "M/s",
    );
    r.add("NLB new flows/s (wall clock)", wall, "M/s");
    let ack = acks(&syn);
    drop(syn);
    let ring = ring(&ack, o.packets.min(4_000_000));
    drop(ack);
    let (cpu, wall) = forward(&mut node, LB_PORT, &ring, o.packets, true);
    r.add(
        format!(
            "NLB forwarding, 64 B frames, {} flows (CPU time)",
            node.flows()
        ),
        cpu,
        "Mpps/core",
    );
    r.add("NLB forwarding (wall clock)", wall, "Mpps");
    let (cpu, _) = forward(&mut node, LB_PORT, &ring, o.packets / 2, false);
    r.add(
        "NLB forwarding, process() per frame, no prefetch (CPU time)",
        cpu,
        "Mpps/core",
    );
}

fn maglev_bench(o: &BenchOptions, r: &mut BenchReport) {
    let keys: Vec<u64> = (0..o.maglev_backends as u64)
        .map(|i| mix64(i + 1))
        .collect();
    let runs = 10;
    let start = Instant::now();
    for _ in 0..runs {
        let m = Maglev::build(&keys, o.maglev_table_size).unwrap();
        std::hint::black_box(&m);
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / f64::from(runs);
    r.add(
        format!(
            "Maglev build, {} backends, M={}",
            o.maglev_backends, o.maglev_table_size
        ),
        ms,
        "ms",
    );
    let before: Vec<u64> = (0..100u64).map(|i| mix64(i + 1)).collect();
    let after: Vec<u64> = before
        .iter()
        .copied()
        .filter(|&k| k != before[37])
        .collect();
    let a = Maglev::build(&before, o.maglev_table_size).unwrap();
    let b = Maglev::build(&after, o.maglev_table_size).unwrap();
    r.add(
        "Maglev slots moved when 1 of 100 backends leaves",
        100.0 * disruption(&a, &before, &b, &after),
        "%",
    );
    // The same on flows: share of 1M flow hashes whose backend changed.
    let flows = 1_000_000u64;
    let moved = (0..flows)
        .filter(|&i| {
            let h = mix64(i ^ 0xabcdef);
            let x = a.lookup(h).map(|i| before[i]);
            let y = b.lookup(h).map(|i| after[i]);
            x != y
        })
        .count();
    r.add(
        "flows disturbed when 1 of 100 backends leaves",
        100.0 * moved as f64 / flows as f64,
        "%",
    );
}

/// Runs every benchmark and returns the figures.
pub fn run(o: &BenchOptions) -> BenchReport {
    let mut r = BenchReport::default();
    type Section = fn(&BenchOptions, &mut BenchReport);
    let sections: [(&str, Section); 4] = [
        ("maglev", maglev_bench),
        ("nat", nat_bench),
        ("replicated", nat_setup_replicated),
        ("nlb", nlb_bench),
    ];
    for (name, f) in sections {
        if o.only.as_deref().is_none_or(|w| name.contains(w)) {
            f(o, &mut r);
        }
    }
    r
}

//! Entry points for the cargo-fuzz targets in `fuzz/` that need the control
//! plane's crates (the switch together with the hyperplane, and the API),
//! and for the test that replays their corpora on stable
//! (`tests/tests/fuzz_corpus.rs`). Not part of the API: each takes the
//! fuzzer's raw bytes and must never panic, whatever they are. The
//! datapath's own entry points are in `enilab_backend::fuzzing`.
//!
//! * [`pipeline`]: frames into `SwitchWorker::process` with security
//!   groups, NACLs, an Elastic IP, an ENI route, a card aggregate, a
//!   connection-tracking allowance and a small conntrack table loaded, and
//!   into a hyperplane node serving a NAT gateway and an NLB.
//! * [`api_query`]: `Params::parse` and `Api::call`.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use enilab_hyperplane::{
    Config as HpConfig, HealthCheckConfig, Hyperplane, ListenerConfig, LoadBalancerConfig,
    NatGatewayConfig, Node, Options, TargetConfig, TargetGroupConfig, L4,
};
use enilab_switch::{
    AclEntry, CardConfig, CardLimits, Cidr, Egress, ElasticIp, NetworkAclConfig, PacketMeta, Peer,
    PortConfig, PortId, PortLimits, PortMatch, Protocol, Route, RouteTableConfig, RouteTarget,
    SecurityGroupConfig, SgRule, Snapshot, SubnetConfig, Switch, SwitchOptions, SwitchWorker,
    Topology, UplinkConfig, VpcConfig,
};

use crate::api::{Api, Config, Params, RecordingDriver, ACTIONS, API_VERSION};

const UPLINK: PortId = 100;
const NATGW: u32 = 200;
const NLB: u32 = 201;

fn cidr(s: &str) -> Cidr {
    s.parse().expect("fixture CIDR")
}

fn rule(protocol: Protocol, lo: i32, hi: i32, peer: Peer) -> SgRule {
    SgRule {
        protocol,
        ports: PortMatch::from_aws(protocol, lo, hi).expect("fixture ports"),
        peer,
    }
}

fn acl(number: u16, protocol: Protocol, lo: i32, hi: i32, allow: bool) -> AclEntry {
    AclEntry {
        number,
        protocol,
        ports: PortMatch::from_aws(protocol, lo, hi).expect("fixture ports"),
        cidr: Cidr::ANY,
        allow,
    }
}

fn subnet(id: &str, vpc: &str, net: [u8; 4]) -> SubnetConfig {
    SubnetConfig {
        id: id.into(),
        vpc_id: vpc.into(),
        cidr: (Ipv4Addr::from(net), 24),
        ..SubnetConfig::default()
    }
}

fn port(id: PortId, subnet: usize, ip: [u8; 4], groups: &[&str]) -> PortConfig {
    PortConfig {
        id,
        eni_id: format!("eni-{id:017x}"),
        mac: [2, 0, 0, 0, 0, id as u8],
        subnet,
        primary_ip: Ipv4Addr::from(ip),
        security_groups: groups.iter().map(|g| g.to_string()).collect(),
        ..PortConfig::default()
    }
}

fn topology() -> Topology {
    let mut a2 = subnet("subnet-a2", "vpc-a", [10, 0, 2, 0]);
    a2.network_acl = Some("acl-2".into());
    let mut a3 = subnet("subnet-a3", "vpc-a", [10, 0, 3, 0]);
    a3.route_table = Some("rtb-fw".into());
    let mut router = port(6, 0, [10, 0, 1, 50], &["sg-router"]);
    router.source_dest_check = false;
    Topology {
        generation: 1,
        vpcs: vec![
            VpcConfig {
                id: "vpc-a".into(),
                cidrs: vec![cidr("10.0.0.0/16")],
                internet_gateway: Some("igw-a".into()),
                main_route_table: Some("rtb-main".into()),
            },
            VpcConfig {
                id: "vpc-b".into(),
                cidrs: vec![cidr("10.0.0.0/16")],
                ..VpcConfig::default()
            },
        ],
        subnets: vec![
            subnet("subnet-a1", "vpc-a", [10, 0, 1, 0]),
            a2,
            a3,
            subnet("subnet-b1", "vpc-b", [10, 0, 1, 0]),
        ],
        ports: vec![
            port(1, 0, [10, 0, 1, 10], &["sg-web"]),
            port(2, 0, [10, 0, 1, 20], &["sg-db"]),
            port(3, 1, [10, 0, 2, 30], &["sg-ssh"]),
            port(4, 3, [10, 0, 1, 20], &["sg-b"]),
            port(5, 2, [10, 0, 3, 40], &["sg-web"]),
            router,
            port(7, 0, [10, 0, 1, 60], &[]),
        ]
        .into_iter()
        .map(|mut p| {
            if p.id <= 2 {
                p.card = Some(("i-fuzz".into(), 0));
            }
            p.limits = match p.id {
                1 => PortLimits {
                    pps: 1000,
                    ..PortLimits::default()
                },
                3 => PortLimits {
                    conntrack: 8,
                    ..PortLimits::default()
                },
                _ => PortLimits::default(),
            };
            p
        })
        .collect(),
        route_tables: vec![
            RouteTableConfig {
                id: "rtb-main".into(),
                vpc_id: "vpc-a".into(),
                routes: vec![Route {
                    destination: Cidr::ANY,
                    target: RouteTarget::InternetGateway("igw-a".into()),
                }],
            },
            RouteTableConfig {
                id: "rtb-fw".into(),
                vpc_id: "vpc-a".into(),
                routes: vec![Route {
                    destination: cidr("10.0.2.0/24"),
                    target: RouteTarget::Eni(format!("eni-{:017x}", 6)),
                }],
            },
        ],
        security_groups: vec![
            SecurityGroupConfig {
                id: "sg-web".into(),
                vpc_id: "vpc-a".into(),
                ingress: vec![rule(Protocol::TCP, 80, 80, Peer::Cidr(Cidr::ANY))],
                egress: vec![rule(Protocol::All, -1, -1, Peer::Cidr(Cidr::ANY))],
            },
            SecurityGroupConfig {
                id: "sg-db".into(),
                vpc_id: "vpc-a".into(),
                ingress: vec![rule(
                    Protocol::TCP,
                    5432,
                    5432,
                    Peer::Group("sg-web".into()),
                )],
                egress: vec![],
            },
            SecurityGroupConfig {
                id: "sg-ssh".into(),
                vpc_id: "vpc-a".into(),
                ingress: vec![
                    rule(Protocol::TCP, 22, 23, Peer::Cidr(cidr("10.0.0.0/16"))),
                    rule(Protocol::ICMP, 8, -1, Peer::Cidr(cidr("10.0.0.0/16"))),
                    rule(Protocol::UDP, 53, 53, Peer::Cidr(Cidr::ANY)),
                ],
                egress: vec![rule(Protocol::All, -1, -1, Peer::Cidr(Cidr::ANY))],
            },
            SecurityGroupConfig {
                id: "sg-router".into(),
                vpc_id: "vpc-a".into(),
                ingress: vec![rule(Protocol::All, -1, -1, Peer::Cidr(cidr("10.0.0.0/16")))],
                egress: vec![rule(Protocol::All, -1, -1, Peer::Cidr(Cidr::ANY))],
            },
            SecurityGroupConfig::default_for("sg-b", "vpc-b"),
        ],
        network_acls: vec![NetworkAclConfig {
            id: "acl-2".into(),
            vpc_id: "vpc-a".into(),
            ingress: vec![
                acl(200, Protocol::All, -1, -1, true),
                acl(100, Protocol::TCP, 23, 23, false),
            ],
            egress: vec![acl(100, Protocol::All, -1, -1, true)],
        }],
        elastic_ips: vec![ElasticIp {
            public_ip: Ipv4Addr::new(203, 0, 113, 10),
            vpc_id: "vpc-a".into(),
            private_ip: Ipv4Addr::new(10, 0, 1, 10),
        }],
        flow_logs: vec![],
        uplink: Some(UplinkConfig {
            port: UPLINK,
            mac: [2, 0xe1, 0x16, 0, 0, 1],
            peer_mac: [2, 0xe1, 0x16, 0, 0, 2],
        }),
        metadata: None,
        service_returns: Vec::new(),
        // Ports 1 and 2 share an instance's card aggregate (port 1 also has
        // its own pps allowance); port 3 may track eight connections.
        cards: vec![CardConfig {
            instance: "i-fuzz".into(),
            card: 0,
            limits: CardLimits {
                pps: 2000,
                bw_out_bps: 10_000_000,
                bw_in_bps: 10_000_000,
            },
        }],
    }
}

fn hyperplane_config() -> HpConfig {
    HpConfig {
        nat_gateways: vec![NatGatewayConfig {
            id: "nat-fuzz".into(),
            port: NATGW,
            mac: [2, 0xaa, 0, 0, 0, 1],
            gateway_mac: [2, 0xaa, 0, 0, 0, 2],
            addresses: vec![Ipv4Addr::new(203, 0, 113, 50)],
        }],
        load_balancers: vec![LoadBalancerConfig {
            id: "net/nlb-fuzz".into(),
            port: NLB,
            mac: [2, 0xbb, 0, 0, 0, 1],
            gateway_mac: [2, 0xbb, 0, 0, 0, 2],
            addresses: vec![Ipv4Addr::new(10, 0, 1, 200)],
            listeners: vec![ListenerConfig {
                protocol: L4::Tcp,
                port: 80,
                target_group: TargetGroupConfig {
                    id: "tg-fuzz".into(),
                    protocol: L4::Tcp,
                    targets: vec![
                        TargetConfig {
                            ip: Ipv4Addr::new(10, 0, 1, 10),
                            port: 8080,
                            draining_since: None,
                        },
                        TargetConfig {
                            ip: Ipv4Addr::new(10, 0, 1, 20),
                            port: 8080,
                            draining_since: None,
                        },
                    ],
                    health_check: HealthCheckConfig::default(),
                    source_ip_stickiness: false,
                    deregistration_delay: Duration::from_secs(1),
                },
            }],
        }],
    }
}

struct Capture(Vec<(u32, Vec<u8>)>);

impl Egress for Capture {
    fn emit(&mut self, port: PortId, _hash: u32, frame: &[u8], _meta: &PacketMeta) -> bool {
        if self.0.len() < 64 {
            self.0.push((port, frame.to_vec()));
        }
        true
    }
}

/// One switch, worker and hyperplane node for the whole run (a node is
/// handed out once), so state (conntrack, NAT flows) carries over between
/// inputs as it would in a long-lived daemon.
struct Rig {
    clock: Arc<AtomicU32>,
    worker: Mutex<SwitchWorker>,
    node: Mutex<Node>,
    start: Instant,
}

fn rig() -> Option<&'static Rig> {
    static RIG: OnceLock<Option<Rig>> = OnceLock::new();
    RIG.get_or_init(|| {
        let clock = Arc::new(AtomicU32::new(0));
        let sw = Switch::with_options(SwitchOptions {
            conntrack_slots: 256,
            manual_clock: Some(clock.clone()),
            ..SwitchOptions::default()
        });
        sw.publish(Snapshot::compile(topology()).ok()?);
        let hp = Hyperplane::new(Options {
            nodes: 1,
            shards: 2,
            flows_per_node: 256,
            replication_inbox: 64,
            maglev_table_size: 251,
            ..Options::default()
        })
        .ok()?;
        hp.publish(hyperplane_config()).ok()?;
        let node = hp.node(0).ok()?;
        Some(Rig {
            clock,
            worker: Mutex::new(sw.worker()),
            node: Mutex::new(node),
            start: Instant::now(),
        })
    })
    .as_ref()
}

/// Ingress choices: switch ports (some unknown), the uplink, the hyperplane.
const INGRESS: [u32; 12] = [1, 2, 3, 4, 5, 6, 7, 9, UPLINK, NATGW, NLB, NATGW];

/// Frames into the switch pipeline and a hyperplane node (the `pipeline`
/// target).
///
/// Input: records `[sel u8][len u8][len bytes]`. `sel` bits 0-3 pick the
/// ingress (a switch port, the uplink, or the hyperplane), bits 4-6 advance
/// the clock by that many minutes; bit 7 feeds every frame the record
/// produced back in once (replies, translations). One switch and node serve
/// every input (state carries over, as in a long-lived daemon).
pub fn pipeline(data: &[u8]) {
    let Some(r) = rig() else { return };
    let mut worker = r.worker.lock().unwrap_or_else(|e| e.into_inner());
    let mut node = r.node.lock().unwrap_or_else(|e| e.into_inner());
    let mut rest = data;
    while let [sel, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (frame, next) = tail.split_at(n);
        rest = next;
        // The clock stops at 2^30 s (34 years): millions of inputs of up to
        // 7 minutes each would otherwise overflow the u32 seconds.
        let step = u32::from((sel >> 4) & 7) * 60;
        let mut now = r.clock.load(Ordering::Relaxed);
        if now < 1 << 30 {
            now += step;
            r.clock.store(now, Ordering::Relaxed);
        }
        let at = r.start + Duration::from_secs(u64::from(now));
        let ingress = INGRESS[usize::from(sel & 0xf) % INGRESS.len()];
        let mut queue = vec![(ingress, frame.to_vec())];
        let rounds = if sel & 0x80 != 0 { 2 } else { 1 };
        for _ in 0..rounds {
            let mut produced = Vec::new();
            for (port, mut f) in queue {
                if port == NATGW || port == NLB {
                    let mut out: Vec<(u32, Vec<u8>)> = Vec::new();
                    node.process(port, &f, at, &mut out);
                    node.tick(at, &mut out);
                    produced.extend(out);
                } else {
                    let mut out = Capture(Vec::new());
                    worker.process(port, &mut f, &PacketMeta::default(), &mut out);
                    produced.extend(out.0);
                }
            }
            queue = produced;
        }
    }
    worker.housekeeping();
}

// ---------------------------------------------------------------------------
// The EC2 Query API
// ---------------------------------------------------------------------------

struct ApiState {
    dir: std::path::PathBuf,
    api: Option<Arc<Api>>,
    calls: u32,
}

static API_STATE: Mutex<Option<ApiState>> = Mutex::new(None);

/// Inputs between fresh stores (a dropped `Api` stops and joins its
/// job-queue threads).
pub const RESET_EVERY: u32 = 100_000;

fn api(st: &mut ApiState) -> Option<Arc<Api>> {
    if st.calls >= RESET_EVERY {
        st.api = None;
        st.calls = 0;
        let _ = std::fs::remove_dir_all(&st.dir);
    }
    st.calls += 1;
    if st.api.is_none() {
        std::fs::create_dir_all(&st.dir).ok()?;
        st.api = Api::open(&st.dir, Config::default(), Arc::new(RecordingDriver)).ok();
    }
    st.api.clone()
}

/// The EC2 Query API (the `api_query` target): form decoding and dispatch
/// to every handler, with the recording driver on a state store in a
/// temporary directory (tmpfs if present; a fresh one every
/// [`RESET_EVERY`] inputs).
///
/// Input: `[split u8]` then bytes; the first `split` bytes are the URI
/// query and the rest the body. If the input names no `Action`, one is
/// picked by `split` so every handler sees fuzzed parameters. Panics only
/// if a reply has a status outside 200 and 400..600 (a finding).
pub fn api_query(data: &[u8]) {
    let [split, rest @ ..] = data else { return };
    let (query, body) = rest.split_at(usize::from(*split).min(rest.len()));
    let Ok(parsed) = Params::parse(&[query, body]) else {
        return;
    };
    let mut params = parsed.clone();
    if parsed.get("Action").is_none() {
        let (name, _) = ACTIONS[usize::from(*split) % ACTIONS.len()];
        let mut pairs: Vec<(&str, &str)> = parsed
            .keys()
            .filter_map(|k| parsed.get(k).map(|v| (k, v)))
            .collect();
        pairs.push(("Action", name));
        pairs.push(("Version", API_VERSION));
        params = Params::from_pairs(pairs);
    }
    let mut guard = API_STATE.lock().unwrap_or_else(|e| e.into_inner());
    let st = guard.get_or_insert_with(|| ApiState {
        // tmpfs when there is one: every mutating call commits to SQLite.
        dir: ["/dev/shm".into(), std::env::temp_dir()]
            .into_iter()
            .find(|d: &std::path::PathBuf| d.is_dir())
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("enilab-fuzz-api-{}", std::process::id())),
        api: None,
        calls: 0,
    });
    let Some(api) = api(st) else { return };
    let reply = api.call(&params);
    assert!(
        reply.status == 200 || (400..600).contains(&reply.status),
        "status {} for {params:?}",
        reply.status
    );
}

/// Drop [`api_query`]'s `Api` (stopping its job threads) and delete its
/// state directory; the next input starts afresh.
pub fn api_query_reset() {
    let mut guard = API_STATE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(st) = guard.take() {
        drop(st.api);
        let _ = std::fs::remove_dir_all(&st.dir);
    }
}

//! A lab: one datapath (switch + backend cards), a topology of subnets and
//! ENIs published to the switch as snapshots, and QEMU instances with their
//! guest agents. The demo, the real-guest tests and (later) the daemon are
//! built on it.
//!
//! A lab may also have an [`Internet`]: a network namespace of its own
//! (203.0.113.1/24 by default) joined to the switch by an uplink port, where
//! test servers stand in for the outside world.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use enilab_backend::{Datapath, DeviceConfig, EniServer, Uplink, UplinkStats};
use enilab_switch::{PortConfig, PortId, Snapshot, SubnetConfig, Switch, Topology, UplinkConfig};

use crate::agent::{AgentClient, AgentError, AgentMux, Output};
use crate::image::Image;
use crate::netns::{Netns, NetnsChild, NetnsError};
use crate::qemu::{
    self, Accel, AccelChoice, Instance, InstanceSpec, NicSpec, QemuBinary, QemuError,
};

/// Errors of a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Backend(#[from] enilab_backend::BackendError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The switch refused the topology.
    #[error("topology rejected: {0}")]
    Topology(String),
    #[error("no such {0}: {1}")]
    NotFound(&'static str, String),
    #[error("{0} already exists")]
    Exists(String),
    /// A subnet has no free address left.
    #[error("subnet {0} has no free address")]
    SubnetFull(String),
    #[error("cannot prepare {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// Something did not happen in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

/// Where a lab keeps its sockets and logs.
pub fn default_run_root() -> PathBuf {
    std::env::var_os("ENILAB_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/enilab"))
}

/// Directory of one instance under a run root; `enilab exec` looks here.
pub fn instance_dir(run_root: &Path, name: &str) -> PathBuf {
    run_root.join("instances").join(name)
}

#[derive(Debug, Clone)]
pub struct LabOptions {
    pub run_root: PathBuf,
    /// Lab name: ENI sockets live under `<run_root>/<name>/`.
    pub name: String,
    pub workers_per_card: usize,
    pub image: Option<Image>,
    /// Force an accelerator instead of probing.
    pub accel: Option<Accel>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            run_root: default_run_root(),
            name: format!("lab-{}", std::process::id()),
            workers_per_card: 1,
            image: None,
            accel: None,
        }
    }
}

struct Subnet {
    cfg: SubnetConfig,
    next_host: u32,
}

struct Eni {
    id: String,
    port: PortId,
    subnet: usize,
    ip: Ipv4Addr,
    mac: [u8; 6],
    server: EniServer,
    #[allow(dead_code)] // reported by `status` once the daemon lands
    card: u32,
    queue_pairs: u16,
    secondary_ips: Vec<Ipv4Addr>,
    security_groups: Vec<String>,
    source_dest_check: bool,
}

pub struct LabInstance {
    pub name: String,
    pub qemu: Instance,
    pub agent: AgentMux,
    pub enis: Vec<String>,
    pub booted_in: Duration,
}

#[derive(Default)]
struct State {
    subnets: Vec<Subnet>,
    enis: BTreeMap<String, Eni>,
    instances: BTreeMap<String, Arc<LabInstance>>,
    next_port: PortId,
    generation: u64,
    internet: Option<Arc<Internet>>,
    /// VPCs, route tables, groups, ACLs, Elastic IPs and flow logs; its
    /// subnets and ports are ignored (they come from `subnets` and `enis`).
    policy: Topology,
}

/// The MAC the switch uses on the uplink (it answers ARP for Elastic IPs).
pub const UPLINK_MAC: [u8; 6] = [0x02, 0xe1, 0x1a, 0x00, 0x00, 0x02];

/// The lab internet's address: TEST-NET-3's .1 (RFC 5737), never routed.
pub const INTERNET_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const INTERNET_PREFIX: u8 = 24;
/// The internet side's MAC: 02:e1 and its address, like an ENI's.
pub const INTERNET_MAC: [u8; 6] = [0x02, 0xe1, 203, 0, 113, 1];
/// Prefix of the internet namespaces: `enilab-inet-<pid>-<n>`.
pub const INTERNET_NETNS_PREFIX: &str = "enilab-inet";

/// How the lab's internet namespace is addressed.
#[derive(Debug, Clone)]
pub struct InternetOptions {
    /// Address of the namespace's interface (the "internet" host).
    pub addr: Ipv4Addr,
    pub prefix: u8,
    /// More addresses on the same interface (other "internet" hosts).
    pub extra_addrs: Vec<(Ipv4Addr, u8)>,
    /// MAC to give the interface; `None` keeps the kernel's random one.
    pub mac: Option<[u8; 6]>,
}

impl Default for InternetOptions {
    fn default() -> Self {
        InternetOptions {
            addr: INTERNET_ADDR,
            prefix: INTERNET_PREFIX,
            extra_addrs: Vec::new(),
            mac: Some(INTERNET_MAC),
        }
    }
}

static NEXT_TAP: AtomicU32 = AtomicU32::new(0);

/// The lab's internet: a network namespace whose interface is the TAP of
/// an uplink port of the switch. Frames the switch sends to [`port`]
/// arrive on that interface, addressed to [`mac`]; whatever the namespace
/// sends on it enters the switch on [`port`].
///
/// [`port`]: Internet::port
/// [`mac`]: Internet::mac
pub struct Internet {
    netns_name: String,
    ifname: String,
    mac: [u8; 6],
    addr: Ipv4Addr,
    prefix: u8,
    port: PortId,
    /// Taken on close: the uplink stops (its TAP goes), then the namespace
    /// is deleted with everything running in it.
    inner: Mutex<Option<(Uplink, Arc<Netns>)>>,
}

impl std::fmt::Debug for Internet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Internet")
            .field("netns", &self.netns_name)
            .field("ifname", &self.ifname)
            .field("addr", &self.addr)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Internet {
    /// Create the internet namespace and its uplink on switch port `port`:
    /// the TAP is created here (in our namespace, down, unaddressed), moved
    /// into the new namespace, then addressed and brought up there. Frames
    /// sent to the port reach the namespace, but the switch decides what it
    /// sends there (it needs an [`UplinkConfig`] naming the port).
    pub fn create(
        datapath: &Datapath,
        port: PortId,
        opts: InternetOptions,
    ) -> Result<Internet, LabError> {
        Netns::sweep_stale(INTERNET_NETNS_PREFIX);
        let netns = Netns::create(INTERNET_NETNS_PREFIX)?;
        let ifname = format!(
            "eup{:x}-{}",
            std::process::id(),
            NEXT_TAP.fetch_add(1, Ordering::Relaxed)
        );
        datapath.switch().reset_counters(port);
        let uplink = datapath.add_uplink(&ifname, port)?;
        netns.disable_ipv6()?;
        netns.move_link(&ifname)?;
        netns.set_up("lo")?;
        if let Some(mac) = opts.mac {
            netns.set_mac(&ifname, mac)?;
        }
        netns.add_addr(&ifname, opts.addr, opts.prefix)?;
        for (a, p) in &opts.extra_addrs {
            netns.add_addr(&ifname, *a, *p)?;
        }
        netns.set_up(&ifname)?;
        let mac = netns.mac(&ifname)?;
        tracing::info!(netns = %netns.name(), port, addr = %opts.addr, "internet added");
        Ok(Internet {
            netns_name: netns.name().to_string(),
            ifname,
            mac,
            addr: opts.addr,
            prefix: opts.prefix,
            port,
            inner: Mutex::new(Some((uplink, Arc::new(netns)))),
        })
    }

    /// The switch's view of this uplink, for [`Topology::uplink`].
    pub fn uplink_config(&self) -> UplinkConfig {
        UplinkConfig {
            port: self.port,
            mac: UPLINK_MAC,
            peer_mac: self.mac,
        }
    }

    /// Name of the network namespace (`ip netns exec <name> ...`).
    pub fn netns(&self) -> &str {
        &self.netns_name
    }

    /// Name of the interface inside the namespace (the uplink's TAP).
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// MAC of the namespace's interface: the destination of every frame
    /// the switch sends to the internet.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The switch port of the uplink.
    pub fn port(&self) -> PortId {
        self.port
    }

    fn ns(&self) -> Result<Arc<Netns>, LabError> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, ns)| ns.clone())
            .ok_or_else(|| LabError::NotFound("internet", self.netns_name.clone()))
    }

    /// Run `argv` in the namespace (killed after `timeout`); the exit
    /// status is the caller's to judge.
    pub fn exec(&self, argv: &[&str], timeout: Duration) -> Result<std::process::Output, LabError> {
        Ok(self.ns()?.exec(argv, timeout)?)
    }

    /// Run `argv` in the namespace and return its stdout; an error if it
    /// fails.
    pub fn run(&self, argv: &[&str], timeout: Duration) -> Result<String, LabError> {
        Ok(self.ns()?.run(argv, timeout)?)
    }

    /// Start a server in the namespace; stopped when the handle is dropped
    /// or the internet is closed.
    pub fn spawn(
        &self,
        argv: &[&str],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<NetnsChild, LabError> {
        Ok(self.ns()?.spawn(argv, stdout, stderr)?)
    }

    /// The uplink's counters (`None` once closed).
    pub fn stats(&self) -> Option<UplinkStats> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(u, _)| u.stats())
    }

    /// Stop the uplink and delete the namespace. Idempotent.
    pub fn close(&self) {
        let taken = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((uplink, ns)) = taken {
            drop(uplink);
            // A command still running in it holds a clone; the namespace
            // goes when that finishes.
            drop(ns);
        }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        self.close();
    }
}

/// A running lab.
pub struct Lab {
    opts: LabOptions,
    dir: PathBuf,
    switch: Arc<Switch>,
    datapath: Datapath,
    qemu: Option<QemuBinary>,
    accel: Option<AccelChoice>,
    image: Option<Image>,
    state: Mutex<State>,
}

impl Lab {
    /// A lab with a datapath only (no QEMU needed): enough for synthetic
    /// frontends such as DPDK's virtio-user.
    pub fn new_datapath(opts: LabOptions) -> Result<Lab, LabError> {
        let dir = opts.run_root.join(&opts.name);
        std::fs::create_dir_all(&dir).map_err(|e| LabError::Io(dir.clone(), e))?;
        let switch = Switch::new();
        let datapath = Datapath::new(switch.clone(), opts.workers_per_card);
        Ok(Lab {
            dir,
            switch,
            datapath,
            qemu: None,
            accel: None,
            image: opts.image.clone(),
            opts,
            state: Mutex::new(State {
                next_port: 1,
                ..Default::default()
            }),
        })
    }

    /// A lab that can boot guests: finds QEMU 10 and the image, and picks the
    /// accelerator (KVM if a probe boot works, else TCG).
    pub fn new(opts: LabOptions) -> Result<Lab, LabError> {
        let mut lab = Lab::new_datapath(opts)?;
        let qemu = qemu::find_qemu()?;
        let image = match lab.image.clone() {
            Some(i) => i,
            None => Image::locate()?,
        };
        let accel = qemu::choose_accel(&qemu, &image.kernel, &image.initrd, lab.opts.accel);
        tracing::info!(accel = %accel.accel, reason = %accel.reason, "accelerator chosen");
        lab.qemu = Some(qemu);
        lab.accel = Some(accel);
        lab.image = Some(image);
        Ok(lab)
    }

    pub fn accel(&self) -> Option<&AccelChoice> {
        self.accel.as_ref()
    }

    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a subnet `cidr` (e.g. 10.0.1.0/24) to VPC `vpc`. Returns its index.
    pub fn add_subnet(
        &self,
        id: &str,
        vpc: &str,
        net: Ipv4Addr,
        prefix: u8,
    ) -> Result<usize, LabError> {
        let mut st = self.state();
        let cfg = SubnetConfig {
            id: id.to_string(),
            vpc_id: vpc.to_string(),
            cidr: (net, prefix),
            dns: None,
            ..Default::default()
        };
        st.subnets.push(Subnet { cfg, next_host: 4 });
        let idx = st.subnets.len() - 1;
        self.publish(&mut st)?;
        Ok(idx)
    }

    /// Create an ENI in `subnet` with a device served on `card`. The address
    /// is the next free one (AWS reserves .0-.3 and the last) unless given.
    pub fn create_eni(
        &self,
        subnet: usize,
        ip: Option<Ipv4Addr>,
        queue_pairs: u16,
        card: u32,
    ) -> Result<String, LabError> {
        let mut st = self.state();
        let port = st.next_port;
        let sub = st
            .subnets
            .get_mut(subnet)
            .ok_or_else(|| LabError::NotFound("subnet", subnet.to_string()))?;
        let ip = match ip {
            Some(ip) => ip,
            None => {
                let (net, prefix) = sub.cfg.cidr;
                let size = 1u32 << (32 - u32::from(prefix));
                if sub.next_host >= size - 1 {
                    return Err(LabError::SubnetFull(sub.cfg.id.clone()));
                }
                let ip = Ipv4Addr::from(u32::from(net) + sub.next_host);
                sub.next_host += 1;
                ip
            }
        };
        let id = format!("eni-{:08x}{:08x}", std::process::id(), port);
        let o = ip.octets();
        let mac = [0x02, 0xe1, o[0], o[1], o[2], o[3]];
        let sock = self.dir.join(format!("{id}.sock"));
        let server = self.datapath.add_eni(
            &sock,
            DeviceConfig {
                eni_id: id.clone(),
                port,
                mac,
                mtu: 1500,
                queue_pairs,
            },
            card,
        )?;
        st.enis.insert(
            id.clone(),
            Eni {
                id: id.clone(),
                port,
                subnet,
                ip,
                mac,
                server,
                card,
                queue_pairs,
                secondary_ips: Vec::new(),
                security_groups: Vec::new(),
                source_dest_check: true,
            },
        );
        st.next_port += 1;
        if let Err(e) = self.publish(&mut st) {
            st.enis.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// Rebuild the switch snapshot from the topology and publish it.
    fn publish(&self, st: &mut State) -> Result<(), LabError> {
        st.generation += 1;
        let subnets = st.subnets.iter().map(|s| s.cfg.clone()).collect();
        let ports = st
            .enis
            .values()
            .map(|e| PortConfig {
                id: e.port,
                eni_id: e.id.clone(),
                mac: e.mac,
                subnet: e.subnet,
                primary_ip: e.ip,
                secondary_ips: e.secondary_ips.clone(),
                mtu: 1500,
                security_groups: e.security_groups.clone(),
                source_dest_check: e.source_dest_check,
                ..Default::default()
            })
            .collect();
        let topo = Topology {
            generation: st.generation,
            subnets,
            ports,
            uplink: st.internet.as_ref().map(|i| i.uplink_config()),
            ..st.policy.clone()
        };
        let snap = Snapshot::compile(topo).map_err(|e| LabError::Topology(e.to_string()))?;
        self.switch.publish(snap);
        Ok(())
    }

    /// Change the lab's VPC policy (VPCs, route tables, security groups,
    /// network ACLs, Elastic IPs, flow logs) and publish it. The change is
    /// rolled back if the result does not compile.
    pub fn update_policy(&self, f: impl FnOnce(&mut Topology)) -> Result<(), LabError> {
        let mut st = self.state();
        let old = st.policy.clone();
        f(&mut st.policy);
        if let Err(e) = self.publish(&mut st) {
            st.policy = old;
            return Err(e);
        }
        Ok(())
    }

    /// Associate a subnet with a route table and a network ACL (`None`: the
    /// VPC's main table; allow-all).
    pub fn set_subnet_policy(
        &self,
        subnet: usize,
        route_table: Option<String>,
        network_acl: Option<String>,
    ) -> Result<(), LabError> {
        self.update_eni_or_subnet(|st| {
            let s = st
                .subnets
                .get_mut(subnet)
                .ok_or_else(|| LabError::NotFound("subnet", subnet.to_string()))?;
            s.cfg.route_table = route_table;
            s.cfg.network_acl = network_acl;
            Ok(())
        })
    }

    /// Put an ENI in these security groups (empty: unfiltered).
    pub fn set_eni_groups(&self, eni: &str, groups: &[&str]) -> Result<(), LabError> {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        self.update_eni_or_subnet(|st| {
            Self::eni_mut(st, eni)?.security_groups = groups;
            Ok(())
        })
    }

    /// Turn an ENI's source/destination check on or off.
    pub fn set_source_dest_check(&self, eni: &str, on: bool) -> Result<(), LabError> {
        self.update_eni_or_subnet(|st| {
            Self::eni_mut(st, eni)?.source_dest_check = on;
            Ok(())
        })
    }

    /// Give an ENI a secondary private address.
    pub fn add_secondary_ip(&self, eni: &str, ip: Ipv4Addr) -> Result<(), LabError> {
        self.update_eni_or_subnet(|st| {
            Self::eni_mut(st, eni)?.secondary_ips.push(ip);
            Ok(())
        })
    }

    fn eni_mut<'s>(st: &'s mut State, eni: &str) -> Result<&'s mut Eni, LabError> {
        st.enis
            .get_mut(eni)
            .ok_or_else(|| LabError::NotFound("ENI", eni.to_string()))
    }

    /// Apply a change to subnets or ENIs and publish; undo it if the
    /// snapshot does not compile.
    fn update_eni_or_subnet(
        &self,
        f: impl FnOnce(&mut State) -> Result<(), LabError>,
    ) -> Result<(), LabError> {
        let mut st = self.state();
        let subnets: Vec<SubnetConfig> = st.subnets.iter().map(|s| s.cfg.clone()).collect();
        let enis: Vec<(String, Vec<Ipv4Addr>, Vec<String>, bool)> = st
            .enis
            .values()
            .map(|e| {
                (
                    e.id.clone(),
                    e.secondary_ips.clone(),
                    e.security_groups.clone(),
                    e.source_dest_check,
                )
            })
            .collect();
        f(&mut st)?;
        if let Err(e) = self.publish(&mut st) {
            for (s, cfg) in st.subnets.iter_mut().zip(subnets) {
                s.cfg = cfg;
            }
            for (id, sec, groups, check) in enis {
                if let Some(e) = st.enis.get_mut(&id) {
                    e.secondary_ips = sec;
                    e.security_groups = groups;
                    e.source_dest_check = check;
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Give the lab an internet with the default addressing
    /// (203.0.113.1/24, MAC 02:e1:cb:00:71:01).
    pub fn add_internet(&self) -> Result<Arc<Internet>, LabError> {
        self.add_internet_with(InternetOptions::default())
    }

    /// Give the lab an internet (see [`Internet::create`]) on the next port
    /// id, and publish the uplink to the switch.
    pub fn add_internet_with(&self, opts: InternetOptions) -> Result<Arc<Internet>, LabError> {
        let mut st = self.state();
        if st.internet.is_some() {
            return Err(LabError::Exists("the lab's internet".into()));
        }
        let port = st.next_port;
        let internet = Arc::new(Internet::create(&self.datapath, port, opts)?);
        st.next_port += 1;
        st.internet = Some(internet.clone());
        self.publish(&mut st)?;
        Ok(internet)
    }

    /// The lab's internet, if it has one.
    pub fn internet(&self) -> Option<Arc<Internet>> {
        self.state().internet.clone()
    }

    /// Close and forget the lab's internet.
    pub fn remove_internet(&self) -> Result<(), LabError> {
        let inet = self
            .state()
            .internet
            .take()
            .ok_or_else(|| LabError::NotFound("internet", self.opts.name.clone()))?;
        inet.close();
        Ok(())
    }

    pub fn eni_ip(&self, eni: &str) -> Option<Ipv4Addr> {
        self.state().enis.get(eni).map(|e| e.ip)
    }

    pub fn eni_mac(&self, eni: &str) -> Option<[u8; 6]> {
        self.state().enis.get(eni).map(|e| e.mac)
    }

    pub fn eni_socket(&self, eni: &str) -> Option<PathBuf> {
        self.state()
            .enis
            .get(eni)
            .map(|e| e.server.path().to_path_buf())
    }

    pub fn eni_port(&self, eni: &str) -> Option<PortId> {
        self.state().enis.get(eni).map(|e| e.port)
    }

    /// Per queue pair counters of an ENI's device.
    pub fn eni_queue_stats(&self, eni: &str) -> Option<Vec<enilab_backend::QueueStats>> {
        self.state()
            .enis
            .get(eni)
            .map(|e| e.server.device().queue_stats())
    }

    /// vhost-user sessions an ENI has served (reconnects included).
    pub fn eni_sessions(&self, eni: &str) -> Option<u64> {
        self.state().enis.get(eni).map(|e| {
            e.server
                .device()
                .sessions
                .load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    fn nic_spec(e: &Eni) -> NicSpec {
        NicSpec {
            id: e.id.trim_start_matches("eni-").to_string(),
            socket_path: e.server.path().to_path_buf(),
            mac: enilab_backend::net::format_mac(&e.mac),
            queue_pairs: e.queue_pairs,
        }
    }

    /// Boot an instance with `enis` (device index = position) and wait for
    /// its agent.
    pub fn launch(
        &self,
        name: &str,
        enis: &[String],
        vcpus: u32,
        memory_mib: u64,
        boot_timeout: Duration,
    ) -> Result<Arc<LabInstance>, LabError> {
        let (Some(qemu), Some(image), Some(accel)) = (&self.qemu, &self.image, &self.accel) else {
            return Err(LabError::Topology(
                "this lab was created without QEMU".into(),
            ));
        };
        if self.state().instances.contains_key(name) {
            return Err(LabError::Exists(format!("instance {name}")));
        }
        let run_dir = instance_dir(&self.opts.run_root, name);
        if run_dir.exists() {
            // A leftover of a lab that died; Instance::launch refuses a live one.
            if qemu::Instance::adopt(&run_dir)?.is_some() {
                return Err(LabError::Exists(format!("instance {name} (running)")));
            }
        }
        std::fs::create_dir_all(&run_dir).map_err(|e| LabError::Io(run_dir.clone(), e))?;
        let mut spec = InstanceSpec::new(name, &image.kernel, &image.initrd, &run_dir);
        spec.vcpus = vcpus;
        spec.memory_mib = memory_mib;
        spec.accel = accel.accel;
        spec.cpu_model = Some(accel.cpu_model.clone());
        spec.cmdline = format!("enilab.instance={name}");
        {
            let st = self.state();
            for id in enis {
                let e = st
                    .enis
                    .get(id)
                    .ok_or_else(|| LabError::NotFound("ENI", id.clone()))?;
                spec.nics.push(Self::nic_spec(e));
            }
        }
        let start = Instant::now();
        let instance = Instance::launch(qemu, &spec)?;
        let paths = spec.paths();
        let mux = AgentMux::start(&paths.agent_socket, run_dir.join("agent.sock"))?;
        if let Err(e) = mux.wait_ready(boot_timeout) {
            let _ = instance.shutdown(Duration::from_secs(2));
            return Err(e.into());
        }
        let li = Arc::new(LabInstance {
            name: name.to_string(),
            qemu: instance,
            agent: mux,
            enis: enis.to_vec(),
            booted_in: start.elapsed(),
        });
        self.state().instances.insert(name.to_string(), li.clone());
        Ok(li)
    }

    pub fn instance(&self, name: &str) -> Option<Arc<LabInstance>> {
        self.state().instances.get(name).cloned()
    }

    /// A fresh agent client for `name`.
    pub fn client(&self, name: &str) -> Result<AgentClient, LabError> {
        let li = self
            .instance(name)
            .ok_or_else(|| LabError::NotFound("instance", name.into()))?;
        Ok(AgentClient::connect(li.agent.socket_path())?)
    }

    /// Run a command in `name` and capture its output.
    pub fn exec(&self, name: &str, argv: &[&str], timeout: Duration) -> Result<Output, LabError> {
        Ok(self.client(name)?.exec_capture(argv, timeout)?)
    }

    /// Wait until `name`'s interface `ifname` carries `ip` (DHCP done).
    pub fn wait_ip(
        &self,
        name: &str,
        ifname: &str,
        ip: Ipv4Addr,
        timeout: Duration,
    ) -> Result<(), LabError> {
        let want = format!("inet {ip}/");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(out) = self.exec(
                name,
                &["ip", "-4", "addr", "show", "dev", ifname],
                Duration::from_secs(10),
            ) {
                if out.stdout_str().contains(&want) {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Err(LabError::Timeout(
            timeout,
            format!("{ip} on {name}/{ifname}"),
        ))
    }

    /// Stop an instance (QMP quit, then signals to its own PID only).
    pub fn stop_instance(&self, name: &str) -> Result<(), LabError> {
        let li = self
            .state()
            .instances
            .remove(name)
            .ok_or_else(|| LabError::NotFound("instance", name.into()))?;
        li.qemu.shutdown(Duration::from_secs(5))?;
        let _ = std::fs::remove_dir_all(instance_dir(&self.opts.run_root, name));
        Ok(())
    }

    /// Stop every instance and ENI.
    pub fn teardown(&self) {
        let names: Vec<String> = self.state().instances.keys().cloned().collect();
        for n in names {
            if let Err(e) = self.stop_instance(&n) {
                tracing::warn!(instance = %n, error = %e, "stop failed");
            }
        }
        let enis = std::mem::take(&mut self.state().enis);
        drop(enis);
        let internet = self.state().internet.take();
        if let Some(i) = internet {
            i.close();
        }
        self.datapath.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod internet_tests {
    use std::io::{Read, Write};
    use std::sync::mpsc;

    use super::*;
    use enilab_backend::{BackendError, UplinkError};
    use enilab_switch::wire::checksum::{finish, sum};

    /// Returns true (after saying so loudly) when the test cannot run here.
    fn skip(reason: &str) -> bool {
        if std::env::var("ENILAB_REQUIRE_GUESTS").as_deref() == Ok("1") {
            panic!("internet test cannot run and ENILAB_REQUIRE_GUESTS=1: {reason}");
        }
        // Straight to stderr: libtest does not capture it, so the skip shows.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: internet test needs root and /dev/net/tun: {reason}"
        );
        true
    }

    /// A datapath-only lab under a run root of its own; remove the root
    /// with [`done`] after dropping the lab.
    fn lab() -> (Lab, PathBuf) {
        let root = std::env::temp_dir().join(format!(
            "enilab-inet-test-{}-{}",
            std::process::id(),
            NEXT_TAP.fetch_add(1, Ordering::Relaxed)
        ));
        let lab = Lab::new_datapath(LabOptions {
            run_root: root.clone(),
            name: "lab".into(),
            ..Default::default()
        })
        .expect("lab");
        (lab, root)
    }

    fn done(lab: Lab, root: PathBuf) {
        drop(lab);
        let _ = std::fs::remove_dir_all(root);
    }

    fn internet(lab: &Lab) -> Option<Arc<Internet>> {
        match lab.add_internet() {
            Ok(i) => Some(i),
            Err(
                e @ (LabError::Netns(NetnsError::NotPermitted)
                | LabError::Backend(BackendError::Uplink(
                    UplinkError::NotPermitted(_) | UplinkError::TunMissing(_),
                ))),
            ) => {
                skip(&e.to_string());
                None
            }
            Err(e) => panic!("add_internet: {e}"),
        }
    }

    fn netns_listed(name: &str) -> bool {
        let out = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
    }

    /// A UDP datagram from 203.0.113.77 to the internet's address.
    fn udp_to(inet: &Internet, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&inet.mac());
        f.extend_from_slice(&[0x02, 0xe1, 0, 0, 0, 0x77]);
        f.extend_from_slice(&[0x08, 0x00]);
        let udp_len = 8 + payload.len() as u16;
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[203, 0, 113, 77]);
        ip[16..20].copy_from_slice(&inet.addr().octets());
        let c = finish(sum(&ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn internet_carries_frames_both_ways_and_goes_away() {
        let (lab, root) = lab();
        let Some(inet) = internet(&lab) else {
            return done(lab, root);
        };
        assert!(inet
            .netns()
            .starts_with(&format!("enilab-inet-{}-", std::process::id())));
        assert!(netns_listed(inet.netns()));
        assert_eq!(inet.mac(), INTERNET_MAC);
        assert_eq!(inet.addr(), INTERNET_ADDR);
        let addrs = inet
            .run(
                &["ip", "-4", "-o", "addr", "show", "dev", inet.ifname()],
                Duration::from_secs(5),
            )
            .unwrap();
        assert!(addrs.contains("203.0.113.1/24"), "{addrs}");
        assert!(matches!(lab.add_internet(), Err(LabError::Exists(_))));

        // Switch -> internet: the TAP was created here and moved; its fd
        // still carries frames into the namespace.
        let mut server = inet
            .spawn(
                &[
                    "socat",
                    "-u",
                    "UDP4-RECVFROM:40003,bind=203.0.113.1",
                    "STDOUT",
                ],
                Stdio::piped(),
                Stdio::null(),
            )
            .unwrap();
        let mut out = server.take_stdout().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            let _ = tx.send(s);
        });
        let frame = udp_to(&inet, 40003, b"from-the-vpc\n");
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            assert!(
                Instant::now() < deadline,
                "nothing reached the namespace; {:?}",
                inet.stats()
            );
            assert!(lab.datapath().inject(inet.port(), &frame));
            if let Ok(s) = rx.recv_timeout(Duration::from_millis(200)) {
                break s;
            }
        };
        assert_eq!(got, "from-the-vpc\n");

        // Internet -> switch: what the namespace sends enters on the port.
        let before = lab.switch().stats(inet.port()).tx_packets;
        let out = inet
            .exec(
                &[
                    "sh",
                    "-c",
                    "echo x | socat -u STDIN UDP4-SENDTO:203.0.113.9:9",
                ],
                Duration::from_secs(5),
            )
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while lab.switch().stats(inet.port()).tx_packets == before {
            assert!(Instant::now() < deadline, "no ingress; {:?}", inet.stats());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(inet.stats().unwrap().read_packets >= 1);

        // Removal takes the namespace, its processes and the TAP.
        let (name, ifname, pid) = (
            inet.netns().to_string(),
            inet.ifname().to_string(),
            server.pid() as i32,
        );
        lab.remove_internet().unwrap();
        assert!(!netns_listed(&name));
        assert!(server.try_wait().unwrap().is_some(), "server survived");
        assert!(!crate::qemu::sys::pid_alive(pid));
        assert!(!Path::new("/sys/class/net").join(&ifname).exists());
        assert!(inet.stats().is_none());
        assert!(matches!(
            inet.run(&["true"], Duration::from_secs(1)),
            Err(LabError::NotFound(..))
        ));
        assert!(lab.internet().is_none());
        done(lab, root);
    }

    #[test]
    fn lab_teardown_removes_its_internet() {
        let (lab, root) = lab();
        let Some(inet) = internet(&lab) else {
            return done(lab, root);
        };
        let name = inet.netns().to_string();
        drop(inet);
        assert!(netns_listed(&name), "the lab still owns its internet");
        done(lab, root);
        assert!(!netns_listed(&name));
    }
}

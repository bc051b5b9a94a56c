//! The QEMU driver: instances are QEMU guests booted from the image in
//! `images/`, ENIs are vhost-user devices served by the backend on the card
//! their attachment names, and every committed change becomes a switch
//! snapshot.
//!
//! * An ENI has a device (a socket, a switch port, a card) while it is
//!   attached to a running instance. Launch and start create the devices of
//!   the instance's ENIs before QEMU starts (they are on its command line);
//!   attach to a running instance creates one and hot-plugs it over QMP
//!   (`chardev-add`, `netdev_add`, `device_add`); detach hot-unplugs it and
//!   waits for the guest to release it, then drops the device. Attach to a
//!   stopped instance only records (the next start plugs it).
//! * Socket paths are a function of the ENI id, so a restarted daemon
//!   serves the same paths and QEMU (`reconnect-ms`) finds them again.
//! * [`InstanceDriver::on_change`] translates the whole state
//!   ([`super::datapath::topology_for_account`]) with the devices' ports and
//!   publishes it; only map lookups happen under the lock it is called with.
//! * When the daemon stops, guests keep running ([`QemuDriver::release`]);
//!   the next daemon adopts them through their QMP sockets
//!   ([`InstanceDriver::adopt`]) or records them as stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use enilab_backend::{Datapath, DeviceConfig, EniServer};
use enilab_switch::{MetadataConfig, PortId, Snapshot, Switch};

use crate::agent::{AgentClient, AgentMux};
use crate::image::Image;
use crate::imds::{ImdsService, MetadataSource};
use crate::lab::{instance_dir, Internet, InternetOptions};
use crate::qemu::{self, AccelChoice, InstanceSpec, NicSpec, QemuBinary};
use crate::store::model::{Eni, Instance};
use crate::store::{State, Store};

use super::config::Config;
use super::datapath::topology_for_account;

use super::driver::{Confirm, DriverError, Health, InstanceDriver};
use super::hyperplane::{self, Tier};

/// The guest never gets more vCPUs than this, whatever the type says: the
/// guests share this host (TCG on a few cores).
pub const GUEST_MAX_VCPUS: u32 = 2;
/// Nor more memory (MiB).
pub const GUEST_MAX_MEMORY_MIB: u32 = 512;
/// How long a detach waits for the guest to release the device; a forced
/// detach waits this long at most before dropping the device anyway.
pub const UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);
pub const FORCED_UNPLUG_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the background half of a forced detach waits for the guest.
pub const BACKGROUND_UNPLUG_TIMEOUT: Duration = Duration::from_secs(120);
/// A guest whose agent has sent heartbeats (every 200 ms) but none for this
/// long (6 missed in a row) is suspected hung; see [`judge_silence`].
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1200);
/// A silent guest whose vCPUs QEMU reports running is judged hung only
/// after this long: a loaded host delays a TCG guest's heartbeats by more
/// than a second, and a false failover costs more than a late one.
pub const RUNNING_SILENCE_TIMEOUT: Duration = Duration::from_millis(2500);
/// Bound on the QMP `query-status` that confirms a silent guest.
const CONFIRM_QMP_TIMEOUT: Duration = Duration::from_millis(800);

/// What QMP said when asked to confirm a silent guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpAnswer {
    /// `query-status`: (status, vCPUs running).
    Status(String, bool),
    /// No answer in time, or an error.
    Error(String),
    /// Another thread holds the QMP session.
    Busy,
}

/// The decision on a guest whose heartbeat has been silent for `silent`
/// (already over [`HEARTBEAT_TIMEOUT`]): QEMU saying the vCPUs do not run
/// (paused, internal-error, guest-panicked, shutdown...) confirms it at
/// once; otherwise (running, or QMP unavailable) only a silence over
/// [`RUNNING_SILENCE_TIMEOUT`] does.
pub fn judge_silence(silent: Duration, qmp: &QmpAnswer) -> Confirm {
    let ms = silent.as_millis();
    if let QmpAnswer::Status(status, false) = qmp {
        return Confirm::Failed(format!(
            "no agent heartbeat for {ms} ms and QEMU reports the guest {status}"
        ));
    }
    let seen = match qmp {
        QmpAnswer::Status(s, _) => format!("QEMU reports it {s}"),
        QmpAnswer::Error(e) => format!("QMP did not answer ({e})"),
        QmpAnswer::Busy => "QMP is busy".to_string(),
    };
    if silent >= RUNNING_SILENCE_TIMEOUT {
        Confirm::Failed(format!("no agent heartbeat for {ms} ms ({seen})"))
    } else {
        Confirm::Suspect(format!(
            "no agent heartbeat for {ms} ms but {seen}: waiting up to {} ms",
            RUNNING_SILENCE_TIMEOUT.as_millis()
        ))
    }
}
/// Port ids stay below this (the metadata service encodes them in 14 bits).
/// Instance ENIs take ports below the hyperplane's interfaces.
const MAX_PORT: PortId = hyperplane::SERVICE_PORT_BASE;

/// What the driver is built from.
#[derive(Debug, Clone)]
pub struct QemuDriverOptions {
    /// Instance run directories (`<run_root>/instances/<id>`, where
    /// `enilab exec` looks) and ENI sockets (`<run_root>/api/eni/`).
    pub run_root: PathBuf,
    pub config: Config,
    pub workers_per_card: usize,
    /// Force an accelerator instead of probing.
    pub accel: Option<qemu::Accel>,
    /// Give the VPC an internet (a namespace behind the uplink) for internet
    /// gateways and Elastic IPs. Needs CAP_NET_ADMIN; without it the daemon
    /// runs with no uplink and says so.
    pub internet: bool,
    /// Serve instance metadata at 169.254.169.254 (a namespace behind the
    /// metadata port). Needs CAP_NET_ADMIN too.
    pub metadata: bool,
    /// Hyperplane nodes for NAT gateways and load balancers (0: none).
    pub hyperplane_nodes: usize,
    pub image: Option<Image>,
}

/// An ENI's device: its vhost-user server on a card, and its switch port.
struct Device {
    port: PortId,
    card: u32,
    queue_pairs: u16,
    instance: String,
    /// The attachment it serves: the socket path names it.
    attachment: String,
    config: DeviceConfig,
    server: EniServer,
}

/// A running guest.
pub struct Vm {
    pub qemu: qemu::Instance,
    pub agent: AgentMux,
    pub started: Instant,
}

#[derive(Default)]
struct Inner {
    devices: BTreeMap<String, Device>,
    vms: BTreeMap<String, Arc<Vm>>,
    free_ports: Vec<PortId>,
    next_port: PortId,
    /// Hot-unplugs left to finish in the background after a forced detach,
    /// by (instance, ENI): a new attach of the same NIC waits for its own.
    unplugs: BTreeMap<(String, String), std::thread::JoinHandle<()>>,
    /// Who owned each (VPC, address) at the last publish, with the MAC:
    /// a change of owner is announced.
    owners: BTreeMap<(String, String), (String, [u8; 6])>,
}

/// Instances as QEMU guests on this host's datapath.
pub struct QemuDriver {
    run_root: PathBuf,
    sockets: PathBuf,
    config: Config,
    qemu: QemuBinary,
    image: Image,
    accel: AccelChoice,
    switch: Arc<Switch>,
    datapath: Datapath,
    internet: Option<Internet>,
    /// Taken (stopped) by [`QemuDriver::release`].
    imds: Mutex<Option<ImdsService>>,
    metadata: Option<MetadataConfig>,
    /// NAT gateways and load balancers.
    tier: Option<Tier>,
    inner: Arc<Mutex<Inner>>,
    store: Arc<OnceLock<Weak<Store>>>,
    generation: AtomicU64,
    /// Gratuitous ARP frames sent for moved addresses.
    announcements: AtomicU64,
}

fn failed(what: impl std::fmt::Display) -> DriverError {
    DriverError::Failed(what.to_string())
}

impl QemuDriver {
    /// Find QEMU and the image, choose the accelerator, start the datapath
    /// (and the internet when asked). Missing QEMU or image is an error
    /// that says what to install or build.
    pub fn new(opts: QemuDriverOptions) -> Result<QemuDriver, DriverError> {
        let qemu = qemu::find_qemu().map_err(failed)?;
        let image = match opts.image {
            Some(i) => i,
            None => Image::locate().map_err(failed)?,
        };
        let accel = qemu::choose_accel(&qemu, &image.kernel, &image.initrd, opts.accel);
        tracing::info!(accel = %accel.accel, reason = %accel.reason, "accelerator chosen");
        let sockets = opts.run_root.join("api").join("eni");
        std::fs::create_dir_all(&sockets)
            .map_err(|e| failed(format!("cannot create {}: {e}", sockets.display())))?;
        let switch = Switch::new();
        let datapath = Datapath::new(switch.clone(), opts.workers_per_card);
        let mut inner = Inner {
            next_port: 1,
            ..Default::default()
        };
        let internet = if opts.internet {
            let port = inner.next_port;
            match Internet::create(&datapath, port, InternetOptions::default()) {
                Ok(i) => {
                    inner.next_port += 1;
                    Some(i)
                }
                Err(e) => {
                    tracing::warn!(
                        "no internet uplink ({e}); internet gateways and Elastic IPs carry no traffic"
                    );
                    None
                }
            }
        } else {
            None
        };
        let inner = Arc::new(Mutex::new(inner));
        let store = Arc::new(OnceLock::new());
        let imds = if opts.metadata {
            let port = {
                let mut g = inner.lock().unwrap_or_else(|e| e.into_inner());
                g.next_port += 1;
                g.next_port - 1
            };
            let source = Arc::new(Source {
                inner: inner.clone(),
                store: store.clone(),
                account: opts.config.account_id.clone(),
            });
            match ImdsService::start(&datapath, port, source) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(
                        "no instance metadata service ({e}); guests cannot reach 169.254.169.254"
                    );
                    None
                }
            }
        } else {
            None
        };
        let metadata = imds.as_ref().map(|m| MetadataConfig {
            port: m.port(),
            peer_mac: m.peer_mac(),
        });
        let tier = match opts.hyperplane_nodes {
            0 => None,
            n => match Tier::start(&datapath, n) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(
                        "no hyperplane ({e}); NAT gateways and load balancers carry no traffic"
                    );
                    None
                }
            },
        };
        Ok(QemuDriver {
            run_root: opts.run_root,
            sockets,
            config: opts.config,
            qemu,
            image,
            accel,
            switch,
            datapath,
            internet,
            imds: Mutex::new(imds),
            metadata,
            tier,
            inner,
            store,
            generation: AtomicU64::new(0),
            announcements: AtomicU64::new(0),
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    pub fn internet(&self) -> Option<&Internet> {
        self.internet.as_ref()
    }

    /// The running guest of instance `id`.
    pub fn vm(&self, id: &str) -> Option<Arc<Vm>> {
        self.inner().vms.get(id).cloned()
    }

    /// The switch port of an ENI with a device.
    pub fn port_of(&self, eni: &str) -> Option<PortId> {
        self.inner().devices.get(eni).map(|d| d.port)
    }

    /// ENI id and card of every device, with its switch port.
    pub fn devices(&self) -> Vec<(String, PortId, u32)> {
        self.inner()
            .devices
            .iter()
            .map(|(id, d)| (id.clone(), d.port, d.card))
            .collect()
    }

    /// Where an ENI's vhost-user socket is for one attachment. The
    /// attachment is in the name so that a failed instance's QEMU, which
    /// keeps reconnecting (`reconnect-ms`) to the path it had, can never
    /// take the session of the ENI's next instance.
    pub fn socket_path(&self, eni: &str, attachment: &str) -> PathBuf {
        let tag = attachment.trim_start_matches("eni-attach-");
        self.sockets.join(format!("{eni}-{tag}.sock"))
    }

    fn eni_socket(&self, eni: &Eni) -> PathBuf {
        let att = eni
            .attachment
            .as_ref()
            .map(|a| a.id.as_str())
            .unwrap_or("none");
        self.socket_path(&eni.id, att)
    }

    fn run_dir(&self, inst: &str) -> PathBuf {
        instance_dir(&self.run_root, inst)
    }

    /// The daemon stops: leave every guest running for the next daemon to
    /// adopt, but take down the internet and metadata namespaces (the next
    /// daemon makes its own).
    pub fn release(&self) {
        for vm in self.inner().vms.values() {
            vm.qemu.leave_running();
        }
        self.stop_services();
    }

    fn stop_services(&self) {
        if let Some(i) = &self.internet {
            i.close();
        }
        drop(self.imds.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(t) = &self.tier {
            t.shutdown();
        }
    }

    fn queue_pairs(&self, inst: &Instance, eni: &Eni) -> u16 {
        let q = eni
            .attachment
            .as_ref()
            .and_then(|a| a.ena_queue_count)
            .unwrap_or_else(|| self.guest_vcpus(inst));
        q.clamp(1, 32) as u16
    }

    fn guest_vcpus(&self, inst: &Instance) -> u32 {
        self.config
            .types
            .get(&inst.instance_type)
            .map(|t| t.vcpus)
            .unwrap_or(1)
            .clamp(1, GUEST_MAX_VCPUS)
    }

    fn nic_spec(&self, eni: &Eni, queue_pairs: u16) -> NicSpec {
        NicSpec {
            id: eni.id.trim_start_matches("eni-").to_string(),
            socket_path: self.eni_socket(eni),
            mac: eni.mac.clone(),
            queue_pairs,
        }
    }

    /// The device of `eni` for `inst`, created (socket listening, port
    /// reserved) if it has none.
    fn ensure_device(&self, inst: &Instance, eni: &Eni) -> Result<NicSpec, DriverError> {
        let card = eni.attachment.as_ref().map(|a| a.card_index).unwrap_or(0);
        let attachment = eni
            .attachment
            .as_ref()
            .map(|a| a.id.clone())
            .unwrap_or_default();
        let queue_pairs = self.queue_pairs(inst, eni);
        let mut g = self.inner();
        if let Some(d) = g.devices.get(&eni.id) {
            if d.card == card
                && d.queue_pairs == queue_pairs
                && d.instance == inst.id
                && d.attachment == attachment
            {
                return Ok(self.nic_spec(eni, queue_pairs));
            }
        }
        if let Some(old) = g.devices.remove(&eni.id) {
            g.free_ports.push(old.port);
        }
        let mac = crate::netns::parse_mac(&eni.mac)
            .ok_or_else(|| failed(format!("bad MAC {}", eni.mac)))?;
        let port = match g.free_ports.pop() {
            Some(p) => p,
            None if g.next_port < MAX_PORT => {
                g.next_port += 1;
                g.next_port - 1
            }
            None => return Err(failed("no free switch port")),
        };
        self.switch.reset_counters(port);
        let socket = self.eni_socket(eni);
        let config = DeviceConfig {
            eni_id: eni.id.clone(),
            port,
            mac,
            mtu: 1500,
            queue_pairs,
        };
        let server = match self.datapath.add_eni(&socket, config.clone(), card) {
            Ok(s) => s,
            Err(e) => {
                g.free_ports.push(port);
                return Err(failed(format!("device for {}: {e}", eni.id)));
            }
        };
        tracing::info!(eni = %eni.id, port, card, queue_pairs, "ENI device up");
        g.devices.insert(
            eni.id.clone(),
            Device {
                port,
                card,
                queue_pairs,
                instance: inst.id.clone(),
                attachment,
                config,
                server,
            },
        );
        Ok(self.nic_spec(eni, queue_pairs))
    }

    fn drop_device(&self, eni: &str) {
        let dev = {
            let mut g = self.inner();
            let d = g.devices.remove(eni);
            if let Some(d) = &d {
                g.free_ports.push(d.port);
            }
            d
        };
        if let Some(mut d) = dev {
            d.server.stop();
            tracing::info!(eni, port = d.port, "ENI device down");
        }
    }

    fn drop_devices_of(&self, inst: &str) {
        let enis: Vec<String> = self
            .inner()
            .devices
            .iter()
            .filter(|(_, d)| d.instance == inst)
            .map(|(id, _)| id.clone())
            .collect();
        for e in enis {
            self.drop_device(&e);
        }
    }

    fn boot(&self, inst: &Instance, enis: &[Eni]) -> Result<(), DriverError> {
        if let Some(vm) = self.vm(&inst.id) {
            if vm.qemu.is_running() {
                return Ok(());
            }
            self.inner().vms.remove(&inst.id);
        }
        let run_dir = self.run_dir(&inst.id);
        if run_dir.exists() {
            if let Ok(Some(q)) = qemu::Instance::adopt(&run_dir) {
                // A guest of ours from before: never two QEMUs per instance.
                let _ = q.shutdown(Duration::from_secs(5));
            }
        }
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", run_dir.display())))?;
        let mut spec =
            InstanceSpec::new(&inst.id, &self.image.kernel, &self.image.initrd, &run_dir);
        spec.vcpus = self.guest_vcpus(inst);
        spec.memory_mib = u64::from(
            self.config
                .types
                .get(&inst.instance_type)
                .map(|t| t.memory_mib)
                .unwrap_or(GUEST_MAX_MEMORY_MIB)
                .clamp(256, GUEST_MAX_MEMORY_MIB),
        );
        spec.accel = self.accel.accel;
        spec.cpu_model = Some(self.accel.cpu_model.clone());
        spec.cmdline = format!("enilab.instance={}", inst.id);
        let max_enis = self
            .config
            .types
            .get(&inst.instance_type)
            .map(|t| t.enis as usize)
            .unwrap_or(qemu::DEFAULT_PCIE_PORTS);
        spec.pcie_ports = max_enis.clamp(enis.len().max(1), qemu::MAX_PCIE_PORTS);
        for e in enis {
            match self.ensure_device(inst, e) {
                Ok(nic) => spec.nics.push(nic),
                Err(err) => {
                    self.drop_devices_of(&inst.id);
                    return Err(err);
                }
            }
        }
        let started = Instant::now();
        let q = match qemu::Instance::launch(&self.qemu, &spec) {
            Ok(q) => q,
            Err(e) => {
                self.drop_devices_of(&inst.id);
                return Err(failed(e));
            }
        };
        let paths = spec.paths();
        let agent = match AgentMux::start(&paths.agent_socket, run_dir.join("agent.sock")) {
            Ok(a) => a,
            Err(e) => {
                let _ = q.shutdown(Duration::from_secs(5));
                self.drop_devices_of(&inst.id);
                return Err(failed(e));
            }
        };
        tracing::info!(instance = %inst.id, pid = q.pid(), accel = %self.accel.accel, "guest started");
        self.inner().vms.insert(
            inst.id.clone(),
            Arc::new(Vm {
                qemu: q,
                agent,
                started,
            }),
        );
        Ok(())
    }

    fn halt(&self, inst: &Instance) -> Result<(), DriverError> {
        let vm = self.inner().vms.remove(&inst.id);
        let res = match &vm {
            Some(vm) => vm.qemu.shutdown(Duration::from_secs(5)).map_err(failed),
            None => Ok(()),
        };
        drop(vm);
        self.drop_devices_of(&inst.id);
        let _ = std::fs::remove_dir_all(self.run_dir(&inst.id));
        res
    }

    /// Publish `state` to the switch.
    fn publish(&self, state: &State) {
        let gen = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let ports: BTreeMap<String, PortId> = self
            .inner()
            .devices
            .iter()
            .map(|(id, d)| (id.clone(), d.port))
            .collect();
        // NAT gateways' and load balancers' interfaces are served by the
        // hyperplane's lanes, on ports of their own.
        let services = match &self.tier {
            Some(t) => t
                .sync_ports(hyperplane::service_enis(state).iter().map(String::as_str))
                .unwrap_or_else(|e| {
                    tracing::error!("hyperplane interfaces: {e}");
                    BTreeMap::new()
                }),
            None => BTreeMap::new(),
        };
        self.announce_moves(state, &ports);
        let mut topo = topology_for_account(
            state,
            &|eni| ports.get(eni).or_else(|| services.get(eni)).copied(),
            gen,
            &self.config.account_id,
        );
        topo.uplink = self.internet.as_ref().map(|i| i.uplink_config());
        topo.metadata = self.metadata;
        // Each instance interface and network card gets its type's allowances.
        super::datapath::apply_allowances(state, &self.config.types, &mut topo);
        if let Some(t) = &self.tier {
            let tr = hyperplane::translate(state, &services);
            for p in &mut topo.ports {
                if let Some(svc) = tr.services.get(&p.eni_id) {
                    p.service = Some(svc.clone());
                    p.source_dest_check = false;
                    p.security_groups.clear();
                }
            }
            topo.service_returns = tr.returns;
            // Before the switch sends the interfaces anything new.
            if let Err(e) = t.hyperplane().publish(tr.config) {
                tracing::error!("the hyperplane refused the configuration: {e}");
            }
        }
        match Snapshot::compile(topo) {
            Ok(snap) => self.switch.publish(snap),
            Err(e) => tracing::error!("the state does not compile into a switch snapshot: {e}"),
        }
    }
}

impl QemuDriver {
    /// Compare who owns each address now with the last publish and, for
    /// every address that changed owner (failover, reassignment), send a
    /// gratuitous ARP with the new owner's MAC to every other port of its
    /// subnet. The switch answers ARP with the owner's MAC and forwards by
    /// destination address (rewriting the MAC), so a stale cache cannot
    /// black-hole traffic; the announcement keeps the peers' caches true.
    /// Queue pushes only: cheap enough under the store lock.
    fn announce_moves(&self, state: &State, ports: &BTreeMap<String, PortId>) {
        let mut now: BTreeMap<(String, String), (String, [u8; 6])> = BTreeMap::new();
        let mut subnet_of: BTreeMap<String, String> = BTreeMap::new();
        for e in state.iter::<Eni>() {
            if !ports.contains_key(&e.id) {
                continue;
            }
            let Some(mac) = crate::netns::parse_mac(&e.mac) else {
                continue;
            };
            subnet_of.insert(e.id.clone(), e.subnet_id.clone());
            for ip in &e.private_ips {
                now.insert((e.vpc_id.clone(), ip.ip.clone()), (e.id.clone(), mac));
            }
        }
        let moved: Vec<(String, String, [u8; 6])> = {
            let mut g = self.inner();
            let moved = now
                .iter()
                .filter(|(k, (eni, _))| g.owners.get(*k).is_some_and(|(old, _)| old != eni))
                .map(|((_, ip), (eni, mac))| (ip.clone(), eni.clone(), *mac))
                .collect();
            // Owners that vanished are kept: an address that comes back on
            // another ENI after a gap (detach, then attach) is a move too.
            g.owners.extend(now);
            moved
        };
        for (ip, eni, mac) in moved {
            let Ok(addr) = ip.parse::<std::net::Ipv4Addr>() else {
                continue;
            };
            let Some(subnet) = subnet_of.get(&eni) else {
                continue;
            };
            let frame = enilab_switch::announcement(addr, mac);
            let mut sent = 0;
            for (peer, port) in ports {
                if *peer != eni
                    && subnet_of.get(peer) == Some(subnet)
                    && self.datapath.inject(*port, &frame)
                {
                    sent += 1;
                }
            }
            self.announcements.fetch_add(sent, Ordering::Relaxed);
            tracing::info!(%ip, %eni, peers = sent, "address moved: gratuitous ARP sent");
        }
    }

    /// Stop every ENI server of the card(s), restart the worker groups,
    /// and serve the same devices (same ports, MACs, socket paths) again.
    fn restart_cards(&self, card: Option<u32>) -> Result<serde_json::Value, DriverError> {
        let t0 = Instant::now();
        let cards: BTreeSet<u32> = match card {
            Some(c) => [c].into(),
            None => self.datapath.cards().iter().map(|c| c.id()).collect(),
        };
        if let Some(c) = card {
            if !self.datapath.cards().iter().any(|x| x.id() == c) {
                return Err(failed(format!("card {c} is not running")));
            }
        }
        // Take the devices out (their ports stay reserved: not freed).
        let mut taken: Vec<(String, Device)> = {
            let mut g = self.inner();
            let ids: Vec<String> = g
                .devices
                .iter()
                .filter(|(_, d)| cards.contains(&d.card))
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| g.devices.remove(&id).map(|d| (id, d)))
                .collect()
        };
        for (_, d) in taken.iter_mut() {
            d.server.stop();
        }
        for c in &cards {
            self.datapath.restart_card(*c);
        }
        let mut errors = Vec::new();
        let n = taken.len();
        for (id, d) in taken {
            let path = d.server.path().to_path_buf();
            match self.datapath.add_eni(&path, d.config.clone(), d.card) {
                Ok(server) => {
                    self.inner().devices.insert(id, Device { server, ..d });
                }
                Err(e) => {
                    self.inner().free_ports.push(d.port);
                    errors.push(format!("{id}: {e}"));
                }
            }
        }
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(?cards, devices = n, ms, "backend restarted");
        if !errors.is_empty() {
            return Err(failed(format!(
                "backend restarted but some devices could not be served again: {}",
                errors.join("; ")
            )));
        }
        Ok(serde_json::json!({"cards": cards, "devices": n, "ms": ms}))
    }
}

/// What the metadata service asks the driver: which instance a client
/// address (the switch's SNAT of a guest's port) belongs to, and the state.
struct Source {
    inner: Arc<Mutex<Inner>>,
    store: Arc<OnceLock<Weak<Store>>>,
    account: String,
}

impl MetadataSource for Source {
    fn instance_of(&self, client: std::net::Ipv4Addr) -> Option<String> {
        let (port, _) = enilab_switch::decode_metadata_client(client)?;
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.devices
            .values()
            .find(|d| d.port == port)
            .map(|d| d.instance.clone())
    }

    fn with_state(&self, f: &mut dyn FnMut(&State)) {
        if let Some(store) = self.store.get().and_then(Weak::upgrade) {
            store.read(|st| f(st));
        }
    }

    fn account_id(&self) -> String {
        self.account.clone()
    }
}

impl Drop for QemuDriver {
    fn drop(&mut self) {
        let devices = std::mem::take(&mut self.inner().devices);
        for (_, mut d) in devices {
            d.server.stop();
        }
        self.stop_services();
        self.datapath.shutdown();
    }
}

impl InstanceDriver for QemuDriver {
    fn on_open(&self, store: &Arc<Store>) {
        let _ = self.store.set(Arc::downgrade(store));
    }

    fn on_change(&self, state: &State) {
        self.publish(state);
    }

    fn launch(&self, inst: &Instance, enis: &[Eni]) -> Result<(), DriverError> {
        self.boot(inst, enis)
    }

    fn hyperplane_nodes(&self) -> Option<Vec<(bool, enilab_hyperplane::NodeStats)>> {
        let t = self.tier.as_ref()?;
        let running = t.running();
        Some(
            t.hyperplane()
                .stats()
                .nodes
                .into_iter()
                .map(|s| (running.get(s.node).copied().unwrap_or(false), s))
                .collect(),
        )
    }

    fn set_hyperplane_node(&self, node: usize, up: bool) -> Result<(), DriverError> {
        let t = self
            .tier
            .as_ref()
            .ok_or_else(|| failed("this daemon runs no hyperplane"))?;
        if up {
            t.start_node(node)
        } else {
            t.stop_node(node)
        }
        .map_err(failed)
    }

    fn target_health(
        &self,
        target_group: &str,
    ) -> Option<Vec<(String, u16, String, Option<String>)>> {
        let t = self.tier.as_ref()?;
        let health = t.hyperplane().target_health();
        let store = self.store.get().and_then(Weak::upgrade)?;
        let mut rows = None;
        store.read(|st| rows = Some(hyperplane::health_rows(st, target_group, &health)));
        rows
    }

    fn status(&self) -> serde_json::Value {
        use serde_json::json;
        let g = self.inner();
        let devices: Vec<_> = g
            .devices
            .iter()
            .map(|(id, d)| {
                json!({
                    "eni": id,
                    "instance": d.instance,
                    "port": d.port,
                    "card": d.card,
                    "queue_pairs": d.queue_pairs,
                    "socket": d.server.path(),
                    "sessions": d.server.device().sessions.load(Ordering::Relaxed),
                    "stats": self.switch.stats(d.port),
                })
            })
            .collect();
        let vms: Vec<_> = g
            .vms
            .iter()
            .map(|(id, vm)| {
                json!({
                    "instance": id,
                    "pid": vm.qemu.pid(),
                    "running": vm.qemu.is_running(),
                    "agent": vm.agent.ready(),
                    "nics": vm.qemu.nics().len(),
                    "heartbeat_ms": vm.agent.last_heartbeat().map(|t| t.elapsed().as_millis() as u64),
                    "up_s": vm.started.elapsed().as_secs(),
                })
            })
            .collect();
        let unplugs = g.unplugs.len();
        drop(g);
        let count = |dir: &str| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let process = json!({
            "fds": count("/proc/self/fd"),
            "threads": count("/proc/self/task"),
            "thread_names": thread_names(),
            "worker_threads": self.datapath.worker_threads(),
            "pending_unplugs": unplugs,
            "announcements": self.announcements.load(Ordering::Relaxed),
        });
        let cards: Vec<_> = self
            .datapath
            .cards()
            .iter()
            .map(|c| {
                let w = c.worker_stats();
                json!({
                    "card": c.id(),
                    "workers": c.workers(),
                    "forwarded": w.iter().map(|s| s.forwarded).sum::<u64>(),
                    "dropped": w.iter().map(|s| s.dropped).sum::<u64>(),
                    "wakeups": w.iter().map(|s| s.wakeups).sum::<u64>(),
                    "flow_cache_hits": w.iter().map(|s| s.flow_cache_hits).sum::<u64>(),
                })
            })
            .collect();
        json!({
            "accel": self.accel.accel.to_string(),
            "accel_reason": self.accel.reason,
            "internet": self.internet.as_ref().map(|i| json!({
                "netns": i.netns(), "addr": i.addr().to_string(), "port": i.port(),
                "stats": self.switch.stats(i.port()),
            })),
            "vms": vms,
            "process": process,
            "devices": devices,
            "cards": cards,
            "hyperplane": self.tier.as_ref().map(|t| t.status()),
        })
    }

    fn card_allowances(&self) -> serde_json::Value {
        serde_json::to_value(self.switch.card_stats()).unwrap_or_default()
    }

    fn stop(&self, inst: &Instance) -> Result<(), DriverError> {
        self.halt(inst)
    }

    fn capture(&self, eni: &str, capacity: usize) -> Result<enilab_switch::Capture, DriverError> {
        // An instance's device, else a NAT gateway's or load balancer's
        // interface (a hyperplane port).
        let device = self.inner().devices.get(eni).map(|d| d.port);
        let port = device
            .or_else(|| {
                let t = self.tier.as_ref()?;
                let p = t.status()["interfaces"][eni].as_u64()?;
                PortId::try_from(p).ok()
            })
            .ok_or_else(|| {
                failed(format!(
                    "{eni} has no device: it is not attached to a running instance"
                ))
            })?;
        self.switch.capture(port, capacity).map_err(failed)
    }

    fn terminate(&self, inst: &Instance) -> Result<(), DriverError> {
        self.halt(inst)
    }

    fn attach(&self, inst: &Instance, eni: &Eni) -> Result<(), DriverError> {
        let Some(vm) = self.vm(&inst.id) else {
            // Stopped (or not yet booted): the next start plugs it.
            return Ok(());
        };
        // The same NIC may still be leaving this guest (a forced detach
        // finishes its unplug in the background): let it finish first.
        let pending = self
            .inner()
            .unplugs
            .remove(&(inst.id.clone(), eni.id.clone()));
        if let Some(h) = pending {
            let _ = h.join();
        }
        let nic = self.ensure_device(inst, eni)?;
        if vm.qemu.nics().iter().any(|(_, id)| *id == nic.id) {
            return Ok(());
        }
        let t = Instant::now();
        match vm.qemu.hotplug_nic(&nic) {
            Ok(bus) => {
                tracing::info!(eni = %eni.id, instance = %inst.id, %bus, ms = t.elapsed().as_millis() as u64, "hot-plugged");
                self.refresh_guest(&inst.id);
                Ok(())
            }
            Err(e) => {
                self.drop_device(&eni.id);
                Err(failed(format!("hot-plug of {}: {e}", eni.id)))
            }
        }
    }

    fn detach(&self, inst: &Instance, eni: &Eni, force: bool) -> Result<(), DriverError> {
        if force {
            // Do not wait for a guest that may be dead or hung: the device
            // goes at once (the ENI can serve its next instance now), and
            // the unplug finishes, or not, in the background.
            self.drop_device(&eni.id);
            if let Some(vm) = self.vm(&inst.id) {
                let id = eni.id.trim_start_matches("eni-").to_string();
                let key = (inst.id.clone(), eni.id.clone());
                let name = format!("unplug-{}", &id[..id.len().min(8)]);
                let spawned = std::thread::Builder::new().name(name).spawn(move || {
                    if vm.qemu.is_running() {
                        // A hung guest may come back (a paused VM resumed)
                        // and release the device then: wait long for it, so
                        // the NIC never stays half-plugged in its QEMU.
                        match vm.qemu.unplug_nic(&id, BACKGROUND_UNPLUG_TIMEOUT) {
                            Ok(()) | Err(qemu::QemuError::NicNotFound(_)) => {}
                            Err(e) => tracing::info!(nic = %id, "background unplug: {e}"),
                        }
                    }
                });
                match spawned {
                    Ok(h) => {
                        let old = self.inner().unplugs.insert(key, h);
                        if let Some(old) = old {
                            let _ = old.join();
                        }
                    }
                    Err(e) => tracing::warn!("cannot start the background unplug: {e}"),
                }
            }
            return Ok(());
        }
        let res = match self.vm(&inst.id) {
            Some(vm) => {
                let id = eni.id.trim_start_matches("eni-");
                let timeout = if force {
                    FORCED_UNPLUG_TIMEOUT
                } else {
                    UNPLUG_TIMEOUT
                };
                match vm.qemu.unplug_nic(id, timeout) {
                    Ok(()) => Ok(()),
                    Err(qemu::QemuError::NicNotFound(_)) => Ok(()),
                    Err(e) => Err(failed(format!("hot-unplug of {}: {e}", eni.id))),
                }
            }
            None => Ok(()),
        };
        if res.is_ok() || force {
            self.drop_device(&eni.id);
        }
        res
    }

    fn is_running(&self, inst: &Instance) -> bool {
        self.vm(&inst.id).is_some_and(|v| v.qemu.is_running())
    }

    fn health(&self, inst: &Instance) -> Health {
        let Some(vm) = self.vm(&inst.id) else {
            return Health::Failed("the instance has no guest".to_string());
        };
        if !vm.qemu.is_running() {
            return Health::Failed(format!("QEMU (pid {}) exited", vm.qemu.pid()));
        }
        match vm.agent.last_heartbeat() {
            None => Health::Unknown,
            Some(t) if t.elapsed() > HEARTBEAT_TIMEOUT => Health::Failed(format!(
                "no agent heartbeat for {} ms",
                t.elapsed().as_millis()
            )),
            Some(_) => Health::Healthy,
        }
    }

    fn confirm_failure(&self, inst: &Instance, why: &str) -> Confirm {
        let Some(vm) = self.vm(&inst.id) else {
            return Confirm::Failed(why.to_string());
        };
        if !vm.qemu.is_running() {
            return Confirm::Failed(format!("QEMU (pid {}) exited", vm.qemu.pid()));
        }
        let Some(silent) = vm.agent.last_heartbeat().map(|t| t.elapsed()) else {
            return Confirm::Suspect("no heartbeat yet".to_string());
        };
        if silent <= HEARTBEAT_TIMEOUT {
            return Confirm::Suspect(format!("the heartbeat is back ({} ms)", silent.as_millis()));
        }
        let qmp = match vm.qemu.try_query_status(CONFIRM_QMP_TIMEOUT) {
            Some(Ok(st)) => QmpAnswer::Status(st.status, st.running),
            Some(Err(e)) => QmpAnswer::Error(e.to_string()),
            None => QmpAnswer::Busy,
        };
        judge_silence(silent, &qmp)
    }

    fn refresh_guest(&self, inst: &str) {
        let Some(vm) = self.vm(inst) else { return };
        let sock = vm.agent.socket_path().to_path_buf();
        let inst = inst.to_string();
        // Off the caller's thread: a hung guest must not hold up the API.
        let _ = std::thread::Builder::new()
            .name("agent-nudge".into())
            .spawn(move || {
                let res = AgentClient::connect(&sock).and_then(|mut c| {
                    c.set_timeout(Duration::from_secs(2));
                    c.reconcile()
                });
                if let Err(e) = res {
                    tracing::debug!(instance = %inst, "reconcile request: {e}");
                }
            });
    }

    fn restart_backend(&self, card: Option<u32>) -> Result<serde_json::Value, DriverError> {
        self.restart_cards(card)
    }

    fn pause(&self, inst: &str, paused: bool) -> Result<(), DriverError> {
        let vm = self
            .vm(inst)
            .ok_or_else(|| failed(format!("{inst} has no running guest")))?;
        let res = if paused {
            vm.qemu.stop()
        } else {
            vm.qemu.cont()
        };
        res.map_err(failed)
    }

    fn adopt(&self, inst: &Instance, enis: &[Eni]) -> bool {
        let run_dir = self.run_dir(&inst.id);
        let q = match qemu::Instance::adopt(&run_dir) {
            Ok(Some(q)) => q,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(instance = %inst.id, "cannot adopt: {e}");
                return false;
            }
        };
        // The same socket paths: QEMU reconnects to them on its own.
        let plugged: Vec<String> = q.nics().into_iter().map(|(_, id)| id).collect();
        for e in enis {
            if !plugged.contains(&e.id.trim_start_matches("eni-").to_string()) {
                continue;
            }
            if let Err(err) = self.ensure_device(inst, e) {
                tracing::warn!(instance = %inst.id, eni = %e.id, "cannot serve adopted NIC: {err}");
            }
        }
        let agent = match AgentMux::start(&q.paths().agent_socket, run_dir.join("agent.sock")) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(instance = %inst.id, "adopted guest without agent: {e}");
                q.leave_running();
                self.drop_devices_of(&inst.id);
                return false;
            }
        };
        tracing::info!(instance = %inst.id, pid = q.pid(), "guest adopted");
        self.inner().vms.insert(
            inst.id.clone(),
            Arc::new(Vm {
                qemu: q,
                agent,
                started: Instant::now(),
            }),
        );
        true
    }
}

/// How many of this process's threads bear each name (for leak hunts).
fn thread_names() -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc/self/task") {
        for t in rd.flatten() {
            let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            *names.entry(name.trim().to_string()).or_insert(0) += 1;
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_guest_is_judged_by_what_qemu_says() {
        let st = |s: &str, run: bool| QmpAnswer::Status(s.into(), run);
        let err = QmpAnswer::Error("timed out".into());
        // (silence ms, QMP answer, failed?, words in the reason)
        let cases: Vec<(u64, QmpAnswer, bool, &str)> = vec![
            (1300, st("paused", false), true, "reports the guest paused"),
            (1300, st("internal-error", false), true, "internal-error"),
            (1300, st("guest-panicked", false), true, "guest-panicked"),
            (1300, st("running", true), false, "waiting up to 2500 ms"),
            (2400, st("running", true), false, "QEMU reports it running"),
            (
                2600,
                st("running", true),
                true,
                "no agent heartbeat for 2600 ms",
            ),
            (1300, err.clone(), false, "QMP did not answer"),
            (3000, err, true, "QMP did not answer"),
            (1300, QmpAnswer::Busy, false, "QMP is busy"),
            (2500, QmpAnswer::Busy, true, "QMP is busy"),
        ];
        for (ms, qmp, failed, words) in cases {
            let c = judge_silence(Duration::from_millis(ms), &qmp);
            let (is_failed, why) = match &c {
                Confirm::Failed(w) => (true, w),
                Confirm::Suspect(w) => (false, w),
            };
            assert_eq!(is_failed, failed, "{ms} ms, {qmp:?}: {c:?}");
            assert!(
                why.contains(words),
                "{ms} ms, {qmp:?}: {why:?} lacks {words:?}"
            );
        }
    }
}

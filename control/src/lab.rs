//! A lab: one datapath (switch + backend cards), a topology of subnets and
//! ENIs published to the switch as snapshots, and QEMU instances with their
//! guest agents. The demo, the real-guest tests and (later) the daemon are
//! built on it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use enilab_backend::{Datapath, DeviceConfig, EniServer};
use enilab_switch::{PortConfig, PortId, Snapshot, SubnetConfig, Switch};

use crate::agent::{AgentClient, AgentError, AgentMux, Output};
use crate::image::Image;
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
        let accel = match lab.opts.accel {
            Some(a) => AccelChoice {
                accel: a,
                cpu_model: a.default_cpu().to_string(),
                reason: "forced".into(),
                cached: false,
            },
            None => qemu::select_accel(
                &qemu,
                &image.kernel,
                &image.initrd,
                Some(&qemu::default_state_dir()),
            ),
        };
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
                secondary_ips: Vec::new(),
                mtu: 1500,
                ..Default::default()
            })
            .collect();
        let snap = Snapshot::build(st.generation, subnets, ports)
            .map_err(|e| LabError::Topology(e.to_string()))?;
        self.switch.publish(snap);
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
        self.datapath.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

//! Instance description and the pure `InstanceSpec -> argv` builder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Accel, QemuError, Result};

/// Kernel parameters every instance gets, before [`InstanceSpec::cmdline`].
/// The caller's parameters come later on the line, so they win for
/// parameters where the last occurrence counts (`panic=`, `loglevel=`).
pub const BASE_KERNEL_CMDLINE: &str = "console=ttyS0 panic=1";

/// Default number of PCIe root ports (one NIC each, cold or hot-plugged).
pub const DEFAULT_PCIE_PORTS: usize = 8;

/// Upper bound of root ports: slots 0x10..=0x1e of `pcie.0`, 8 functions each
/// (0x1f holds the ICH9 functions of q35).
pub const MAX_PCIE_PORTS: usize = 15 * 8;

/// Delay between QEMU's reconnect attempts to a vhost-user backend, in ms.
/// A backend restart serves the sockets again ~10 ms after closing them,
/// so this delay was most of the blackout (100 ms: ~150 ms blackout). A
/// failed attempt is one connect() to a missing path; QEMU reports only the
/// first failure.
pub const NIC_RECONNECT_MS: u64 = 20;

/// Every NIC is created with `status=off` (no VIRTIO_NET_F_STATUS): QEMU
/// sets the link down when the vhost-user socket closes and up when it
/// reconnects, and a guest that sees that flap drops its ARP cache
/// (`neigh_carrier_down`); the next packet's ARP request goes out while the
/// link is still down, is lost, and is only retried after the neighbour
/// retransmit time (1 s): a backend restart cost 1 s instead of ~0.1 s.
/// Without the status bit the guest's carrier stays up: frames sent while
/// the backend is away are dropped by QEMU, ARP entries survive.
const NIC_STATUS: &str = "status=off";

/// First PCI slot on `pcie.0` used for root ports.
const FIRST_PORT_SLOT: usize = 0x10;

/// Longest unix socket path (sun_path is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Largest queue-pair count accepted for one NIC.
const MAX_QUEUE_PAIRS: u16 = 64;

/// Name of the agent's virtio-serial port inside the guest.
pub const AGENT_PORT_NAME: &str = "org.enilab.agent";

/// One ENI as seen by QEMU: a vhost-user netdev whose backend (the server)
/// listens on `socket_path`, exposed to the guest as a `virtio-net-pci`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// Stable id, e.g. `eni-0a1b2c3d`; QEMU objects are named `chr-<id>`,
    /// `net-<id>` and `nic-<id>`. Letters, digits, `-`, `_`, `.` only.
    pub id: String,
    /// The backend's vhost-user socket (the backend is the server).
    pub socket_path: PathBuf,
    /// Guest MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Number of RX/TX queue pairs (1 = single queue).
    pub queue_pairs: u16,
}

impl NicSpec {
    /// QEMU chardev id of this NIC.
    pub fn chardev_id(&self) -> String {
        chardev_id(&self.id)
    }

    /// QEMU netdev id of this NIC.
    pub fn netdev_id(&self) -> String {
        netdev_id(&self.id)
    }

    /// QEMU device id of this NIC.
    pub fn device_id(&self) -> String {
        device_id(&self.id)
    }

    /// MSI-X vectors for `queue_pairs` > 1: one per queue, plus config and
    /// control queue.
    pub fn vectors(&self) -> Option<u32> {
        (self.queue_pairs > 1).then(|| 2 * u32::from(self.queue_pairs) + 2)
    }

    /// Check id, MAC, queue count and socket path length.
    pub fn validate(&self) -> Result<()> {
        if !is_valid_id(&self.id) {
            return Err(QemuError::InvalidSpec(format!(
                "NIC id {:?} must be 1-64 letters, digits, '-', '_' or '.'",
                self.id
            )));
        }
        if !is_valid_mac(&self.mac) {
            return Err(QemuError::InvalidSpec(format!(
                "NIC {}: MAC {:?} is not of the form aa:bb:cc:dd:ee:ff",
                self.id, self.mac
            )));
        }
        if u8::from_str_radix(&self.mac[..2], 16).unwrap_or(1) & 1 != 0 {
            return Err(QemuError::InvalidSpec(format!(
                "NIC {}: MAC {} is a multicast address",
                self.id, self.mac
            )));
        }
        if self.queue_pairs == 0 || self.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(QemuError::InvalidSpec(format!(
                "NIC {}: queue_pairs must be 1..={MAX_QUEUE_PAIRS}, not {}",
                self.id, self.queue_pairs
            )));
        }
        check_socket_path(&self.socket_path)?;
        Ok(())
    }

    /// The three argv options for a NIC cold-plugged on root port `bus`.
    pub fn argv(&self, bus: &str) -> Result<Vec<String>> {
        let path = opt_path(&self.socket_path)?;
        let mut dev = format!(
            "virtio-net-pci,netdev={},mac={},id={},bus={bus},{NIC_STATUS}",
            self.netdev_id(),
            self.mac,
            self.device_id()
        );
        if let Some(v) = self.vectors() {
            dev.push_str(&format!(",mq=on,vectors={v}"));
        }
        Ok(vec![
            "-chardev".into(),
            format!(
                "socket,id={},path={path},reconnect-ms={NIC_RECONNECT_MS}",
                self.chardev_id()
            ),
            "-netdev".into(),
            format!(
                "vhost-user,id={},chardev={},queues={}",
                self.netdev_id(),
                self.chardev_id(),
                self.queue_pairs
            ),
            "-device".into(),
            dev,
        ])
    }

    /// QMP `chardev-add` arguments (client socket with reconnect).
    pub fn qmp_chardev_add(&self) -> Value {
        json!({
            "id": self.chardev_id(),
            "backend": {
                "type": "socket",
                "data": {
                    "addr": { "type": "unix", "data": { "path": self.socket_path } },
                    "server": false,
                    "reconnect-ms": NIC_RECONNECT_MS,
                }
            }
        })
    }

    /// QMP `netdev_add` arguments.
    pub fn qmp_netdev_add(&self) -> Value {
        json!({
            "type": "vhost-user",
            "id": self.netdev_id(),
            "chardev": self.chardev_id(),
            "queues": self.queue_pairs,
        })
    }

    /// QMP `device_add` arguments for root port `bus`.
    pub fn qmp_device_add(&self, bus: &str) -> Value {
        let mut v = json!({
            "driver": "virtio-net-pci",
            "id": self.device_id(),
            "netdev": self.netdev_id(),
            "mac": self.mac,
            "bus": bus,
            // See NIC_STATUS.
            "status": false,
        });
        if let Some(vectors) = self.vectors() {
            v["mq"] = json!(true);
            v["vectors"] = json!(vectors);
        }
        v
    }
}

/// QEMU chardev id for NIC `id`.
pub(crate) fn chardev_id(id: &str) -> String {
    format!("chr-{id}")
}

/// QEMU netdev id for NIC `id`.
pub(crate) fn netdev_id(id: &str) -> String {
    format!("net-{id}")
}

/// QEMU device id for NIC `id`.
pub(crate) fn device_id(id: &str) -> String {
    format!("nic-{id}")
}

/// Id of root port number `index`.
pub(crate) fn root_port_id(index: usize) -> String {
    format!("rp{index}")
}

/// `-device` value of root port number `index`.
fn root_port_device(index: usize) -> String {
    let slot = FIRST_PORT_SLOT + index / 8;
    let func = index % 8;
    let mf = if func == 0 { ",multifunction=on" } else { "" };
    // io-reserve=0: virtio-net on PCIe is modern-only (memory BARs), and
    // reserving 4 KiB of I/O space per port would exhaust the 64 KiB I/O
    // space of the machine after a dozen ports.
    format!(
        "pcie-root-port,id={},bus=pcie.0,chassis={},addr={slot:#04x}.{func}{mf},io-reserve=0",
        root_port_id(index),
        index + 1
    )
}

/// Files of one instance inside its run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    /// The run directory itself.
    pub run_dir: PathBuf,
    /// QMP socket (QEMU is the server).
    pub qmp_socket: PathBuf,
    /// Agent virtio-serial socket (QEMU is the server).
    pub agent_socket: PathBuf,
    /// Guest serial console output.
    pub console_log: PathBuf,
    /// QEMU's own stdout/stderr.
    pub qemu_log: PathBuf,
    /// QEMU's pidfile.
    pub pidfile: PathBuf,
    /// The launch spec as JSON (read back by `Instance::adopt`).
    pub spec_file: PathBuf,
}

impl RunPaths {
    /// Paths for `run_dir`.
    pub fn new(run_dir: &Path) -> Self {
        RunPaths {
            run_dir: run_dir.to_path_buf(),
            qmp_socket: run_dir.join("qmp.sock"),
            agent_socket: run_dir.join("agent-serial.sock"),
            console_log: run_dir.join("console.log"),
            qemu_log: run_dir.join("qemu.log"),
            pidfile: run_dir.join("qemu.pid"),
            spec_file: run_dir.join("instance.json"),
        }
    }
}

/// Everything needed to start one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Instance name/id (`i-...`), shown as the QEMU guest name.
    pub name: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB (shared memfd, as vhost-user needs).
    pub memory_mib: u64,
    /// Guest kernel (bzImage).
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initrd: PathBuf,
    /// Extra kernel parameters (e.g. `enilab.*`), appended after
    /// [`BASE_KERNEL_CMDLINE`].
    pub cmdline: String,
    /// Accelerator, see [`super::select_accel`].
    pub accel: Accel,
    /// CPU model; `None` = [`Accel::default_cpu`] (`host` / `max`).
    pub cpu_model: Option<String>,
    /// Directory for sockets, logs and the pidfile (created if missing).
    pub run_dir: PathBuf,
    /// NICs present at boot, on root ports `rp0`, `rp1`, ... in order.
    pub nics: Vec<NicSpec>,
    /// Number of PCIe root ports; every NIC (cold or hot) takes one, so this
    /// caps the number of ENIs attached at once.
    pub pcie_ports: usize,
}

impl InstanceSpec {
    /// A 1 vCPU / 512 MiB TCG instance with no NICs and
    /// [`DEFAULT_PCIE_PORTS`] root ports.
    pub fn new(
        name: impl Into<String>,
        kernel: impl Into<PathBuf>,
        initrd: impl Into<PathBuf>,
        run_dir: impl Into<PathBuf>,
    ) -> Self {
        InstanceSpec {
            name: name.into(),
            vcpus: 1,
            memory_mib: 512,
            kernel: kernel.into(),
            initrd: initrd.into(),
            cmdline: String::new(),
            accel: Accel::Tcg,
            cpu_model: None,
            run_dir: run_dir.into(),
            nics: Vec::new(),
            pcie_ports: DEFAULT_PCIE_PORTS,
        }
    }

    /// The files of this instance.
    pub fn paths(&self) -> RunPaths {
        RunPaths::new(&self.run_dir)
    }

    /// Full kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let extra = self.cmdline.trim();
        if extra.is_empty() {
            BASE_KERNEL_CMDLINE.to_string()
        } else {
            format!("{BASE_KERNEL_CMDLINE} {extra}")
        }
    }

    /// CPU model actually used.
    pub fn cpu(&self) -> &str {
        self.cpu_model
            .as_deref()
            .unwrap_or_else(|| self.accel.default_cpu())
    }

    /// Structural checks (no file system access).
    pub fn validate(&self) -> Result<()> {
        if !is_valid_id(&self.name) {
            return Err(QemuError::InvalidSpec(format!(
                "instance name {:?} must be 1-64 letters, digits, '-', '_' or '.'",
                self.name
            )));
        }
        if self.vcpus == 0 || self.vcpus > 64 {
            return Err(QemuError::InvalidSpec(format!(
                "vcpus must be 1..=64, not {}",
                self.vcpus
            )));
        }
        if self.memory_mib < 64 {
            return Err(QemuError::InvalidSpec(format!(
                "memory_mib must be at least 64, not {}",
                self.memory_mib
            )));
        }
        if self.pcie_ports == 0 || self.pcie_ports > MAX_PCIE_PORTS {
            return Err(QemuError::InvalidSpec(format!(
                "pcie_ports must be 1..={MAX_PCIE_PORTS}, not {}",
                self.pcie_ports
            )));
        }
        if self.nics.len() > self.pcie_ports {
            return Err(QemuError::InvalidSpec(format!(
                "{} NICs at boot but only {} PCIe root ports",
                self.nics.len(),
                self.pcie_ports
            )));
        }
        for (i, nic) in self.nics.iter().enumerate() {
            nic.validate()?;
            if self.nics[..i].iter().any(|n| n.id == nic.id) {
                return Err(QemuError::InvalidSpec(format!(
                    "NIC id {} appears twice",
                    nic.id
                )));
            }
        }
        if let Some(cpu) = &self.cpu_model {
            if cpu.is_empty() || cpu.contains(char::is_whitespace) {
                return Err(QemuError::InvalidSpec(format!("bad CPU model {cpu:?}")));
            }
        }
        let paths = self.paths();
        check_socket_path(&paths.qmp_socket)?;
        check_socket_path(&paths.agent_socket)?;
        Ok(())
    }
}

/// Build QEMU's argv (without the program name) for `spec`. Pure: touches
/// no file, so it can be unit-tested; [`super::Instance::launch`] does the
/// file system checks.
pub fn build_argv(spec: &InstanceSpec) -> Result<Vec<String>> {
    spec.validate()?;
    let p = spec.paths();
    let mem = spec.memory_mib;
    let mut a: Vec<String> = Vec::with_capacity(64);
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));

    push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
    push(&["-msg", "timestamp=on"]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-vga",
        "none",
    ]);
    push(&["-accel", spec.accel.qemu_accel_arg()]);
    push(&["-cpu", spec.cpu()]);
    push(&["-smp", &spec.vcpus.to_string()]);
    push(&["-m", &format!("{mem}M")]);
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
    ]);
    push(&["-machine", "q35,memory-backend=mem"]);
    push(&["-kernel", &plain_path(&spec.kernel)?]);
    push(&["-initrd", &plain_path(&spec.initrd)?]);
    push(&["-append", &spec.kernel_cmdline()]);
    push(&[
        "-chardev",
        &format!("file,id=serial0,path={}", opt_path(&p.console_log)?),
    ]);
    push(&["-serial", "chardev:serial0"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            opt_path(&p.qmp_socket)?
        ),
    ]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    push(&["-device", "virtio-serial-pci,id=vser0"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=agentchr,path={},server=on,wait=off",
            opt_path(&p.agent_socket)?
        ),
    ]);
    push(&[
        "-device",
        &format!("virtserialport,bus=vser0.0,chardev=agentchr,name={AGENT_PORT_NAME}"),
    ]);
    push(&["-pidfile", &plain_path(&p.pidfile)?]);
    for i in 0..spec.pcie_ports {
        push(&["-device", &root_port_device(i)]);
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        a.extend(nic.argv(&root_port_id(i))?);
    }
    Ok(a)
}

/// A path as a plain argv value (must be UTF-8).
fn plain_path(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| QemuError::InvalidSpec(format!("path {} is not UTF-8", p.display())))
}

/// A path as the value of a QEMU `key=value,...` option: commas doubled.
fn opt_path(p: &Path) -> Result<String> {
    Ok(plain_path(p)?.replace(',', ",,"))
}

fn check_socket_path(p: &Path) -> Result<()> {
    let len = p.as_os_str().len();
    if len == 0 || len > MAX_SOCKET_PATH {
        return Err(QemuError::InvalidSpec(format!(
            "socket path {} is {len} bytes; unix sockets allow 1..={MAX_SOCKET_PATH}",
            p.display()
        )));
    }
    plain_path(p).map(drop)
}

/// QEMU ids: we prefix them with a letter ourselves, so any of
/// `[A-Za-z0-9._-]{1,64}` is fine.
pub(crate) fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        let mut s = InstanceSpec::new(
            "i-0123",
            "/img/vmlinuz",
            "/img/initramfs.img",
            "/run/enilab/i-0123",
        );
        s.cmdline = "enilab.id=i-0123".into();
        s
    }

    fn nic(id: &str, q: u16) -> NicSpec {
        NicSpec {
            id: id.into(),
            socket_path: format!("/run/enilab/eni/{id}.sock").into(),
            mac: "02:00:00:00:00:01".into(),
            queue_pairs: q,
        }
    }

    /// Find `flag` followed by `value` in argv.
    fn has(a: &[String], flag: &str, value: &str) -> bool {
        a.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn base_argv() {
        let a = build_argv(&spec()).unwrap();
        assert!(has(&a, "-name", "guest=i-0123,debug-threads=on"));
        assert!(has(&a, "-accel", "tcg,thread=single"));
        assert!(has(&a, "-cpu", "max"));
        assert!(has(&a, "-smp", "1"));
        assert!(has(&a, "-m", "512M"));
        assert!(has(
            &a,
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on"
        ));
        assert!(has(&a, "-machine", "q35,memory-backend=mem"));
        assert!(has(&a, "-kernel", "/img/vmlinuz"));
        assert!(has(&a, "-initrd", "/img/initramfs.img"));
        assert!(has(&a, "-append", "console=ttyS0 panic=1 enilab.id=i-0123"));
        assert!(has(
            &a,
            "-chardev",
            "file,id=serial0,path=/run/enilab/i-0123/console.log"
        ));
        assert!(has(&a, "-serial", "chardev:serial0"));
        assert!(has(
            &a,
            "-chardev",
            "socket,id=qmp,path=/run/enilab/i-0123/qmp.sock,server=on,wait=off"
        ));
        assert!(has(&a, "-mon", "chardev=qmp,mode=control"));
        assert!(has(&a, "-pidfile", "/run/enilab/i-0123/qemu.pid"));
        for flag in ["-nodefaults", "-no-user-config"] {
            assert!(a.iter().any(|x| x == flag), "{flag}");
        }
        assert!(has(&a, "-display", "none"));
        assert!(has(&a, "-vga", "none"));
        assert!(
            !a.iter().any(|x| x == "-no-reboot"),
            "guest reboot must reset in place"
        );
        assert!(!a.iter().any(|x| x.starts_with("virtio-net-pci")));
    }

    #[test]
    fn agent_port_is_exact() {
        let a = build_argv(&spec()).unwrap().join(" ");
        assert!(a.contains(
            "-device virtio-serial-pci,id=vser0 -chardev socket,id=agentchr,\
             path=/run/enilab/i-0123/agent-serial.sock,server=on,wait=off \
             -device virtserialport,bus=vser0.0,chardev=agentchr,name=org.enilab.agent"
        ));
    }

    #[test]
    fn root_ports() {
        let mut s = spec();
        s.pcie_ports = 10;
        let a = build_argv(&s).unwrap();
        let ports: Vec<&String> = a
            .iter()
            .filter(|x| x.starts_with("pcie-root-port"))
            .collect();
        assert_eq!(ports.len(), 10);
        assert_eq!(
            ports[0],
            "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,addr=0x10.0,multifunction=on,io-reserve=0"
        );
        assert_eq!(
            ports[7],
            "pcie-root-port,id=rp7,bus=pcie.0,chassis=8,addr=0x10.7,io-reserve=0"
        );
        assert_eq!(
            ports[9],
            "pcie-root-port,id=rp9,bus=pcie.0,chassis=10,addr=0x11.1,io-reserve=0"
        );
        assert_eq!(
            root_port_device(MAX_PCIE_PORTS - 1),
            format!("pcie-root-port,id=rp119,bus=pcie.0,chassis=120,addr=0x1e.7,io-reserve=0")
        );
    }

    #[test]
    fn nics_single_and_multi_queue() {
        let mut s = spec();
        s.nics = vec![nic("eni-a", 1), nic("eni-b", 4)];
        let a = build_argv(&s).unwrap();
        assert!(has(
            &a,
            "-chardev",
            "socket,id=chr-eni-a,path=/run/enilab/eni/eni-a.sock,reconnect-ms=20"
        ));
        assert!(has(
            &a,
            "-netdev",
            "vhost-user,id=net-eni-a,chardev=chr-eni-a,queues=1"
        ));
        assert!(has(
            &a,
            "-device",
            "virtio-net-pci,netdev=net-eni-a,mac=02:00:00:00:00:01,id=nic-eni-a,bus=rp0,status=off"
        ));
        assert!(has(
            &a,
            "-netdev",
            "vhost-user,id=net-eni-b,chardev=chr-eni-b,queues=4"
        ));
        assert!(has(
            &a,
            "-device",
            "virtio-net-pci,netdev=net-eni-b,mac=02:00:00:00:00:01,id=nic-eni-b,bus=rp1,status=off,mq=on,vectors=10"
        ));
        // Root ports come before the NICs that sit on them.
        let rp1 = a.iter().position(|x| x.contains("id=rp1,")).unwrap();
        let nic_b = a.iter().position(|x| x.contains("bus=rp1")).unwrap();
        assert!(rp1 < nic_b);
    }

    #[test]
    fn qmp_hotplug_arguments() {
        let n = nic("eni-c", 2);
        assert_eq!(
            n.qmp_chardev_add(),
            json!({"id":"chr-eni-c","backend":{"type":"socket","data":{
                "addr":{"type":"unix","data":{"path":"/run/enilab/eni/eni-c.sock"}},
                "server":false,"reconnect-ms":20}}})
        );
        assert_eq!(
            n.qmp_netdev_add(),
            json!({"type":"vhost-user","id":"net-eni-c","chardev":"chr-eni-c","queues":2})
        );
        assert_eq!(
            n.qmp_device_add("rp3"),
            json!({"driver":"virtio-net-pci","id":"nic-eni-c","netdev":"net-eni-c",
                   "mac":"02:00:00:00:00:01","bus":"rp3","status":false,"mq":true,"vectors":6})
        );
        assert!(nic("x", 1).qmp_device_add("rp0").get("mq").is_none());
    }

    #[test]
    fn kvm_uses_host_cpu_and_override() {
        let mut s = spec();
        s.accel = Accel::Kvm;
        let a = build_argv(&s).unwrap();
        assert!(has(&a, "-accel", "kvm"));
        assert!(has(&a, "-cpu", "host"));
        s.accel = Accel::Tcg;
        s.cpu_model = Some("qemu64".into());
        assert!(has(&build_argv(&s).unwrap(), "-cpu", "qemu64"));
    }

    #[test]
    fn accel_and_cpu_per_spec() {
        // (accelerator, vCPUs, CPU override, expected -accel, expected -cpu)
        let table = [
            (Accel::Tcg, 1, None, "tcg,thread=single", "max"),
            (Accel::Tcg, 2, None, "tcg,thread=single", "max"),
            (Accel::Tcg, 4, Some("qemu64"), "tcg,thread=single", "qemu64"),
            (Accel::Kvm, 2, None, "kvm", "host"),
        ];
        for (accel, vcpus, cpu, want_accel, want_cpu) in table {
            let mut s = spec();
            s.accel = accel;
            s.vcpus = vcpus;
            s.cpu_model = cpu.map(str::to_string);
            let a = build_argv(&s).unwrap();
            let what = format!("{accel} {vcpus} {cpu:?}");
            assert!(has(&a, "-accel", want_accel), "{what}: {a:?}");
            assert!(has(&a, "-cpu", want_cpu), "{what}: {a:?}");
            assert!(has(&a, "-smp", &vcpus.to_string()), "{what}: {a:?}");
            assert!(
                !a.iter().any(|x| x.contains("thread=multi")),
                "{what}: multi-threaded TCG is back: {a:?}"
            );
        }
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut s = spec();
        s.run_dir = "/tmp/a,b".into();
        let a = build_argv(&s).unwrap();
        assert!(has(
            &a,
            "-chardev",
            "socket,id=qmp,path=/tmp/a,,b/qmp.sock,server=on,wait=off"
        ));
        assert!(has(&a, "-pidfile", "/tmp/a,b/qemu.pid"));
    }

    #[test]
    fn rejects_bad_specs() {
        let bad = |f: &dyn Fn(&mut InstanceSpec)| {
            let mut s = spec();
            f(&mut s);
            assert!(
                matches!(build_argv(&s), Err(QemuError::InvalidSpec(_))),
                "{s:?}"
            );
        };
        bad(&|s| s.name = "has space".into());
        bad(&|s| s.vcpus = 0);
        bad(&|s| s.memory_mib = 16);
        bad(&|s| s.pcie_ports = 0);
        bad(&|s| s.pcie_ports = MAX_PCIE_PORTS + 1);
        bad(&|s| s.nics = vec![nic("a", 1), nic("a", 1)]);
        bad(&|s| {
            s.pcie_ports = 1;
            s.nics = vec![nic("a", 1), nic("b", 1)];
        });
        bad(&|s| s.nics = vec![nic("a", 0)]);
        bad(&|s| {
            s.nics = vec![NicSpec {
                mac: "02:00:00:00:00".into(),
                ..nic("a", 1)
            }]
        });
        bad(&|s| {
            s.nics = vec![NicSpec {
                mac: "01:00:5e:00:00:01".into(),
                ..nic("a", 1)
            }]
        });
        bad(&|s| s.nics = vec![nic("a,b", 1)]);
        bad(&|s| s.run_dir = PathBuf::from(format!("/tmp/{}", "x".repeat(100))));
    }

    #[test]
    fn spec_round_trips_through_json() {
        let mut s = spec();
        s.nics = vec![nic("eni-a", 2)];
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<InstanceSpec>(&text).unwrap(), s);
        assert!(text.contains("\"accel\":\"tcg\""));
    }
}

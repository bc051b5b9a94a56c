//! One running QEMU process: launch, adopt, hot-plug bookkeeping, shutdown.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cmdline::{build_argv, root_port_id, InstanceSpec, NicSpec, RunPaths};
use super::qmp::{Qmp, QmpEvent, QmpStatus, DEFAULT_QMP_TIMEOUT};
use super::sys::{
    log_tail, pid_alive, pid_is_qemu_of, read_pidfile, remove_if_exists, signal, unix_socket_state,
    SocketState,
};
use super::{QemuBinary, QemuError, Result};

/// How long QEMU may take to serve QMP after spawn. QEMU opens the monitor
/// only after every cold-plugged vhost-user NIC has connected and
/// negotiated with its backend.
const LAUNCH_QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// A QEMU that dies within this window after spawn is reported as an early
/// exit with the tail of its log.
const EARLY_EXIT_WINDOW: Duration = Duration::from_secs(1);

/// Lines of qemu.log quoted in errors.
const LOG_TAIL_LINES: usize = 20;

/// Slice in which long waits hold the QMP lock, so other threads can issue
/// commands meanwhile.
const WAIT_SLICE: Duration = Duration::from_millis(200);

/// How long an unplug waits for `DEVICE_DELETED` before asking the guest
/// again (see [`super::qmp::Qmp::wait_nic_removed`]): past QEMU's 5 s
/// repeat guard for native PCIe hotplug and pciehp's 5 s cancel window.
const REPRESS_AFTER: Duration = Duration::from_secs(7);

/// A running QEMU instance. `Send + Sync`: share it in an `Arc`; QMP
/// commands are serialised by an internal lock.
///
/// Dropping it SIGKILLs the QEMU (if still running) and removes its
/// sockets and pidfile; use [`Instance::detach`] to leave QEMU running.
#[derive(Debug)]
pub struct Instance {
    name: String,
    paths: RunPaths,
    spec: Option<InstanceSpec>,
    pid: i32,
    /// `Some` when we spawned QEMU (so we reap it); `None` when adopted.
    child: Mutex<Option<Child>>,
    exit_status: Mutex<Option<String>>,
    qmp: Mutex<Qmp>,
    /// NIC id per PCIe root port (`rp<index>`), `None` = free.
    ports: Mutex<Vec<Option<String>>>,
    detached: AtomicBool,
}

impl Instance {
    /// Start QEMU for `spec`: check kernel, initrd, run directory and NIC
    /// backends, spawn QEMU (stdout/stderr to `<run_dir>/qemu.log`), connect
    /// QMP, and report an early exit with the tail of the log.
    pub fn launch(qemu: &QemuBinary, spec: &InstanceSpec) -> Result<Instance> {
        build_argv(spec)?; // validates the spec before touching the disk
        if !spec.kernel.is_file() {
            return Err(QemuError::KernelMissing {
                path: spec.kernel.clone(),
            });
        }
        if !spec.initrd.is_file() {
            return Err(QemuError::InitrdMissing {
                path: spec.initrd.clone(),
            });
        }
        fs::create_dir_all(&spec.run_dir).map_err(|e| {
            QemuError::io(
                format!("cannot create run directory {}", spec.run_dir.display()),
                e,
            )
        })?;
        // Absolute paths everywhere: QEMU's argv is what `adopt` recognises
        // the process by.
        let mut spec = spec.clone();
        spec.run_dir = fs::canonicalize(&spec.run_dir).map_err(|e| {
            QemuError::io(
                format!("cannot resolve run directory {}", spec.run_dir.display()),
                e,
            )
        })?;
        spec.kernel = absolute(&spec.kernel);
        spec.initrd = absolute(&spec.initrd);
        let argv = build_argv(&spec)?;
        let paths = spec.paths();

        if let Some(pid) = read_pidfile(&paths.pidfile) {
            if pid_is_qemu_of(pid, &paths.pidfile) {
                return Err(QemuError::AlreadyRunning {
                    run_dir: paths.run_dir.clone(),
                    pid,
                });
            }
            remove_if_exists(&paths.pidfile);
        }
        for (sock, what) in [
            (&paths.qmp_socket, "QMP socket"),
            (&paths.agent_socket, "agent serial socket"),
        ] {
            match unix_socket_state(sock) {
                SocketState::Missing => {}
                SocketState::Stale => remove_if_exists(sock),
                SocketState::Listening | SocketState::Unknown => {
                    return Err(QemuError::SocketInUse {
                        path: sock.clone(),
                        what: format!("{what} of another process"),
                    })
                }
                SocketState::NotASocket => {
                    return Err(QemuError::SocketInUse {
                        path: sock.clone(),
                        what: format!("a file that is not a socket is in the way of the {what}"),
                    })
                }
            }
        }
        for nic in &spec.nics {
            check_backend(nic)?;
        }
        let spec_json = serde_json::to_string_pretty(&spec)
            .map_err(|e| QemuError::InvalidSpec(format!("cannot serialise spec: {e}")))?;
        fs::write(&paths.spec_file, spec_json)
            .map_err(|e| QemuError::io(format!("cannot write {}", paths.spec_file.display()), e))?;

        let log = fs::File::create(&paths.qemu_log)
            .map_err(|e| QemuError::io(format!("cannot create {}", paths.qemu_log.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| QemuError::io("cannot duplicate the log file handle", e))?;
        tracing::debug!(name = %spec.name, argv = ?argv, "starting QEMU");
        let child = Command::new(&qemu.path)
            .args(&argv)
            .current_dir(&paths.run_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| QemuError::Spawn {
                path: qemu.path.clone(),
                source,
            })?;
        let started = Instant::now();
        let pid = child.id() as i32;
        tracing::info!(
            name = %spec.name, pid, accel = %spec.accel, cpu = spec.cpu(),
            run_dir = %paths.run_dir.display(), "QEMU started"
        );
        let mut child = Some(child);

        let qmp = match connect_launched(&mut child, &paths, started, !spec.nics.is_empty()) {
            Ok(q) => q,
            Err(e) => {
                if let Some(c) = child.as_mut() {
                    // Our own child: kill and reap it.
                    let _ = c.kill();
                    let _ = c.wait();
                }
                cleanup_files(&paths);
                return Err(e);
            }
        };

        let mut ports = vec![None; spec.pcie_ports];
        for (slot, nic) in ports.iter_mut().zip(&spec.nics) {
            *slot = Some(nic.id.clone());
        }
        let inst = Instance {
            name: spec.name.clone(),
            paths,
            spec: Some(spec),
            pid,
            child: Mutex::new(child),
            exit_status: Mutex::new(None),
            qmp: Mutex::new(qmp),
            ports: Mutex::new(ports),
            detached: AtomicBool::new(false),
        };
        // Deaths within the first second (bad device properties realised
        // late, memfd failures) are launch failures.
        while started.elapsed() < EARLY_EXIT_WINDOW {
            if !inst.is_running() {
                let status = inst
                    .exit_status()
                    .unwrap_or_else(|| "unknown status".into());
                inst.detached.store(true, Ordering::SeqCst);
                cleanup_files(&inst.paths);
                return Err(early_exit(&inst.paths, status));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(inst)
    }

    /// Re-attach to a QEMU started earlier in `run_dir` (e.g. by a previous
    /// daemon): the pidfile names the process, `/proc/<pid>/cmdline` proves
    /// it is that QEMU, then QMP is connected and the root-port occupancy is
    /// read back with `query-pci`.
    ///
    /// `Ok(None)` means no QEMU runs there (stale files are removed).
    pub fn adopt(run_dir: &Path) -> Result<Option<Instance>> {
        let run_dir = fs::canonicalize(run_dir).unwrap_or_else(|_| absolute(run_dir));
        let paths = RunPaths::new(&run_dir);
        let pid = match read_pidfile(&paths.pidfile) {
            Some(pid) if pid_is_qemu_of(pid, &paths.pidfile) => pid,
            _ => {
                tracing::info!(run_dir = %run_dir.display(), "no running QEMU to adopt");
                cleanup_files(&paths);
                return Ok(None);
            }
        };
        let spec: Option<InstanceSpec> = fs::read_to_string(&paths.spec_file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let mut qmp = Qmp::connect(&paths.qmp_socket, DEFAULT_QMP_TIMEOUT)?;
        let pci = qmp.query_pci()?;
        let min_ports = spec.as_ref().map(|s| s.pcie_ports).unwrap_or(0);
        let ports = ports_from_query_pci(&pci, min_ports);
        let name = spec
            .as_ref()
            .map(|s| s.name.clone())
            .or_else(|| {
                run_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_default();
        tracing::info!(%name, pid, nics = ?ports.iter().flatten().collect::<Vec<_>>(), "adopted running QEMU");
        Ok(Some(Instance {
            name,
            paths,
            spec,
            pid,
            child: Mutex::new(None),
            exit_status: Mutex::new(None),
            qmp: Mutex::new(qmp),
            ports: Mutex::new(ports),
            detached: AtomicBool::new(false),
        }))
    }

    /// Instance name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Files of this instance (sockets, logs, pidfile).
    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// The spec it was launched with (`None` if adopted without
    /// `instance.json`). NICs hot-plugged later are not in it; see
    /// [`Instance::nics`].
    pub fn spec(&self) -> Option<&InstanceSpec> {
        self.spec.as_ref()
    }

    /// Whether the QEMU process is still alive (reaps it if it exited).
    pub fn is_running(&self) -> bool {
        let mut child = lock(&self.child);
        match child.as_mut() {
            Some(c) => match c.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    *lock(&self.exit_status) = Some(status.to_string());
                    false
                }
                Err(_) => pid_alive(self.pid),
            },
            None => pid_is_qemu_of(self.pid, &self.paths.pidfile),
        }
    }

    /// Exit status text once QEMU has exited (only known for QEMUs we
    /// spawned).
    pub fn exit_status(&self) -> Option<String> {
        lock(&self.exit_status).clone()
    }

    /// Wait up to `timeout` for QEMU to exit; true if it has.
    pub fn wait_for_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Exclusive access to the QMP session for arbitrary commands.
    pub fn qmp(&self) -> MutexGuard<'_, Qmp> {
        lock(&self.qmp)
    }

    /// Run one QMP command.
    pub fn execute(&self, cmd: &str, args: Value) -> Result<Value> {
        self.qmp().execute(cmd, args)
    }

    /// `query-status`.
    pub fn query_status(&self) -> Result<QmpStatus> {
        self.qmp().query_status()
    }

    /// `query-status` bounded by `timeout`, or `None` at once when another
    /// thread holds the QMP session (a background unplug may hold it for
    /// minutes): for a health check that must not wait.
    pub fn try_query_status(&self, timeout: Duration) -> Option<Result<QmpStatus>> {
        let mut q = match self.qmp.try_lock() {
            Ok(q) => q,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(q.query_status_timeout(timeout))
    }

    /// Hard reset (`system_reset`); vhost-user devices renegotiate.
    pub fn system_reset(&self) -> Result<()> {
        self.qmp().system_reset()
    }

    /// ACPI power button (`system_powerdown`).
    pub fn system_powerdown(&self) -> Result<()> {
        self.qmp().system_powerdown()
    }

    /// Pause the vCPUs.
    pub fn stop(&self) -> Result<()> {
        self.qmp().stop()
    }

    /// Resume the vCPUs.
    pub fn cont(&self) -> Result<()> {
        self.qmp().cont()
    }

    /// Wait for a QMP event (see [`Qmp::wait_event`]), holding the QMP lock
    /// only in short slices.
    pub fn wait_event(
        &self,
        name: &str,
        mut pred: impl FnMut(&QmpEvent) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(WAIT_SLICE);
            match self.qmp().wait_event(name, &mut pred, slice) {
                Err(QemuError::Timeout { .. }) if Instant::now() < deadline => {}
                Err(QemuError::Timeout { .. }) => {
                    return Err(QemuError::Timeout {
                        what: format!("QMP event {name}"),
                        after: timeout,
                    })
                }
                r => return r,
            }
        }
    }

    /// NICs currently plugged, as `(root port id, NIC id)`.
    pub fn nics(&self) -> Vec<(String, String)> {
        lock(&self.ports)
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.clone().map(|id| (root_port_id(i), id)))
            .collect()
    }

    /// Number of free PCIe root ports (further NICs that can be hot-plugged).
    pub fn free_ports(&self) -> usize {
        lock(&self.ports).iter().filter(|p| p.is_none()).count()
    }

    /// Hot-plug `nic` on the first free root port; returns the port id.
    /// The backend must be listening (checked first): QEMU's `netdev_add`
    /// blocks until the backend has negotiated.
    pub fn hotplug_nic(&self, nic: &NicSpec) -> Result<String> {
        nic.validate()?;
        let mut ports = lock(&self.ports);
        if ports.iter().any(|p| p.as_deref() == Some(nic.id.as_str())) {
            return Err(QemuError::NicExists(nic.id.clone()));
        }
        let idx = ports
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| QemuError::NoFreePort {
                nic: nic.id.clone(),
                ports: ports.len(),
            })?;
        check_backend(nic)?;
        let bus = root_port_id(idx);
        self.qmp().hotplug_nic(nic, &bus)?;
        ports[idx] = Some(nic.id.clone());
        tracing::info!(instance = %self.name, nic = %nic.id, port = %bus, "NIC hot-plugged");
        Ok(bus)
    }

    /// Unplug NIC `id`: `device_del`, wait up to `timeout` for the guest to
    /// release it (`DEVICE_DELETED`), then remove netdev and chardev and
    /// free the root port. On timeout the removal stays pending in QEMU
    /// and the port stays taken; calling again resumes.
    pub fn unplug_nic(&self, id: &str, timeout: Duration) -> Result<()> {
        let known = lock(&self.ports).iter().any(|p| p.as_deref() == Some(id));
        let present = self.qmp().request_nic_removal(id)?;
        if !present && !known {
            return Err(QemuError::NicNotFound(id.to_string()));
        }
        if present {
            let deadline = Instant::now() + timeout;
            let mut pressed = Instant::now();
            loop {
                let slice = deadline
                    .saturating_duration_since(Instant::now())
                    .min(WAIT_SLICE);
                if self
                    .qmp()
                    .wait_nic_removed(id, slice, &mut pressed, REPRESS_AFTER)?
                {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(QemuError::Timeout {
                        what: format!("the guest to release NIC {id} (DEVICE_DELETED)"),
                        after: timeout,
                    });
                }
            }
        }
        self.qmp().remove_nic_backend(id)?;
        for p in lock(&self.ports).iter_mut() {
            if p.as_deref() == Some(id) {
                *p = None;
            }
        }
        tracing::info!(instance = %self.name, nic = %id, "NIC unplugged");
        Ok(())
    }

    /// Stop QEMU: QMP `quit`, then SIGTERM, then SIGKILL (each to our own
    /// QEMU's pid only), waiting up to `timeout` for the first step. Sockets
    /// and pidfile are removed.
    pub fn shutdown(&self, timeout: Duration) -> Result<()> {
        if self.is_running() {
            match self.qmp.try_lock() {
                Ok(mut q) => {
                    if let Err(e) = q.quit() {
                        tracing::debug!(instance = %self.name, "QMP quit: {e}");
                    }
                }
                Err(_) => tracing::debug!(instance = %self.name, "QMP busy; skipping quit"),
            }
            if !self.wait_for_exit(timeout) {
                tracing::warn!(instance = %self.name, pid = self.pid, "QEMU ignored quit; sending SIGTERM");
                self.send_signal(libc::SIGTERM);
                if !self.wait_for_exit(Duration::from_secs(3)) {
                    tracing::warn!(instance = %self.name, pid = self.pid, "QEMU ignored SIGTERM; sending SIGKILL");
                    self.send_signal(libc::SIGKILL);
                    if !self.wait_for_exit(Duration::from_secs(5)) {
                        return Err(QemuError::Timeout {
                            what: format!("QEMU pid {} to exit after SIGKILL", self.pid),
                            after: Duration::from_secs(5),
                        });
                    }
                }
            }
        }
        cleanup_files(&self.paths);
        tracing::info!(instance = %self.name, status = ?self.exit_status(), "QEMU stopped");
        Ok(())
    }

    /// Forget this instance without stopping QEMU (for a daemon handing
    /// over to its successor, which calls [`Instance::adopt`]). Returns the
    /// pid.
    pub fn detach(self) -> u32 {
        self.detached.store(true, Ordering::SeqCst);
        self.pid()
    }

    /// Like [`Instance::detach`] through a shared reference: when this
    /// handle drops, QEMU keeps running (a daemon stopping for a restart
    /// leaves its guests to its successor).
    pub fn leave_running(&self) {
        self.detached.store(true, Ordering::SeqCst);
    }

    /// Signal our QEMU: the spawned child while it is not reaped, or an
    /// adopted pid whose cmdline still proves it is this run dir's QEMU.
    fn send_signal(&self, sig: i32) {
        let ours = {
            let mut child = lock(&self.child);
            match child.as_mut() {
                Some(c) => matches!(c.try_wait(), Ok(None)),
                None => pid_is_qemu_of(self.pid, &self.paths.pidfile),
            }
        };
        if ours {
            if let Err(e) = signal(self.pid, sig) {
                tracing::debug!(pid = self.pid, sig, "kill: {e}");
            }
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.detached.load(Ordering::SeqCst) {
            return;
        }
        if self.is_running() {
            tracing::info!(instance = %self.name, pid = self.pid, "killing QEMU on drop");
            self.send_signal(libc::SIGKILL);
            if let Some(c) = lock(&self.child).as_mut() {
                let _ = c.wait();
            } else {
                self.wait_for_exit(Duration::from_secs(2));
            }
        }
        cleanup_files(&self.paths);
    }
}

/// Wait for the freshly spawned QEMU's QMP socket and greeting, watching
/// for an early exit.
fn connect_launched(
    child: &mut Option<Child>,
    paths: &RunPaths,
    started: Instant,
    has_nics: bool,
) -> Result<Qmp> {
    let deadline = started + LAUNCH_QMP_TIMEOUT;
    let exited = |child: &mut Option<Child>| -> Option<QemuError> {
        let c = child.as_mut()?;
        match c.try_wait() {
            Ok(Some(status)) => {
                *child = None; // reaped
                Some(early_exit(paths, status.to_string()))
            }
            _ => None,
        }
    };
    let timeout_err = || QemuError::Timeout {
        what: if has_nics {
            "QEMU's QMP greeting (QEMU stays blocked at startup until every NIC's vhost-user \
             backend has connected and negotiated)"
                .into()
        } else {
            "QEMU's QMP greeting".into()
        },
        after: LAUNCH_QMP_TIMEOUT,
    };
    let stream = loop {
        if let Some(e) = exited(child) {
            return Err(e);
        }
        if Instant::now() >= deadline {
            return Err(timeout_err());
        }
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&paths.qmp_socket) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    let mut abort = || exited(child);
    let mut qmp = match Qmp::handshake(stream, remaining, &mut abort) {
        Ok(q) => q,
        Err(QemuError::Timeout { .. }) => return Err(timeout_err()),
        Err(QemuError::QmpClosed { .. }) => {
            // QEMU closed the monitor: most likely it is exiting.
            std::thread::sleep(Duration::from_millis(200));
            return Err(exited(child).unwrap_or(QemuError::QmpClosed {
                context: Some("during the QMP handshake".into()),
            }));
        }
        Err(e) => return Err(e),
    };
    qmp.set_timeout(DEFAULT_QMP_TIMEOUT);
    Ok(qmp)
}

fn early_exit(paths: &RunPaths, status: String) -> QemuError {
    QemuError::EarlyExit {
        status,
        log: paths.qemu_log.clone(),
        tail: log_tail(&paths.qemu_log, LOG_TAIL_LINES),
    }
}

/// The NIC's backend must be listening, or QEMU blocks in its startup /
/// in `netdev_add` retrying the connection.
fn check_backend(nic: &NicSpec) -> Result<()> {
    let detail = match unix_socket_state(&nic.socket_path) {
        SocketState::Listening | SocketState::Unknown => return Ok(()),
        SocketState::Missing => "the socket file does not exist",
        SocketState::NotASocket => "the path is not a unix socket",
        SocketState::Stale => "the socket file is stale, no process listens on it",
    };
    Err(QemuError::BackendNotListening {
        nic: nic.id.clone(),
        path: nic.socket_path.clone(),
        detail: detail.into(),
    })
}

/// Remove QEMU's sockets and pidfile once it is gone (QEMU removes them
/// itself on a clean exit, not on SIGKILL).
fn cleanup_files(paths: &RunPaths) {
    for sock in [&paths.qmp_socket, &paths.agent_socket] {
        if unix_socket_state(sock) == SocketState::Stale {
            remove_if_exists(sock);
        }
    }
    match read_pidfile(&paths.pidfile) {
        Some(pid) if pid_is_qemu_of(pid, &paths.pidfile) => {}
        _ => remove_if_exists(&paths.pidfile),
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Root-port occupancy from `query-pci`: ports are the bridges with qdev id
/// `rp<N>`, a NIC is a device `nic-<id>` behind one. At least `min_ports`
/// entries.
pub(crate) fn ports_from_query_pci(pci: &Value, min_ports: usize) -> Vec<Option<String>> {
    fn walk(devices: &Value, ports: &mut Vec<Option<String>>) {
        for d in devices.as_array().into_iter().flatten() {
            let Some(bridge) = d.get("pci_bridge") else {
                continue;
            };
            let idx = d
                .get("qdev_id")
                .and_then(Value::as_str)
                .and_then(|q| q.strip_prefix("rp"))
                .and_then(|n| n.parse::<usize>().ok());
            if let Some(idx) = idx {
                if ports.len() <= idx {
                    ports.resize(idx + 1, None);
                }
                let nic = bridge
                    .get("devices")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.get("qdev_id").and_then(Value::as_str))
                    .find_map(|q| q.strip_prefix("nic-"))
                    .map(str::to_string);
                ports[idx] = nic;
            }
            walk(bridge.get("devices").unwrap_or(&Value::Null), ports);
        }
    }
    let mut ports = vec![None; min_ports];
    for bus in pci.as_array().into_iter().flatten() {
        walk(bus.get("devices").unwrap_or(&Value::Null), &mut ports);
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ports_from_pci() {
        let pci = json!([{"bus": 0, "devices": [
            {"qdev_id": "", "slot": 0},
            {"qdev_id": "vser0", "slot": 1},
            {"qdev_id": "rp0", "slot": 16, "pci_bridge": {"bus": {"secondary": 1},
                "devices": [{"qdev_id": "nic-eni-a", "bus": 1}]}},
            {"qdev_id": "rp1", "slot": 16, "pci_bridge": {"bus": {"secondary": 2}, "devices": []}},
            {"qdev_id": "rp2", "slot": 16, "pci_bridge": {"bus": {"secondary": 3},
                "devices": [{"qdev_id": "nic-eni-b", "bus": 3}]}}
        ]}]);
        assert_eq!(
            ports_from_query_pci(&pci, 0),
            vec![Some("eni-a".to_string()), None, Some("eni-b".to_string())]
        );
        assert_eq!(ports_from_query_pci(&pci, 5).len(), 5);
    }

    #[test]
    fn launch_reports_missing_kernel_and_initrd() {
        let dir = std::env::temp_dir().join(format!("enilab-inst-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let qemu = QemuBinary {
            path: "/bin/false".into(),
            version: super::super::QemuVersion {
                major: 10,
                minor: 0,
                micro: 2,
            },
            version_line: String::new(),
        };
        let spec = InstanceSpec::new(
            "i-1",
            dir.join("nokernel"),
            dir.join("noinitrd"),
            dir.join("run"),
        );
        let e = Instance::launch(&qemu, &spec).unwrap_err();
        assert!(matches!(e, QemuError::KernelMissing { .. }), "{e:?}");
        assert!(e.to_string().contains("images/build.sh"));
        fs::write(dir.join("nokernel"), b"x").unwrap();
        let e = Instance::launch(&qemu, &spec).unwrap_err();
        assert!(matches!(e, QemuError::InitrdMissing { .. }), "{e:?}");
        fs::write(dir.join("noinitrd"), b"x").unwrap();
        let mut spec2 = spec.clone();
        spec2.nics.push(NicSpec {
            id: "eni-x".into(),
            socket_path: dir.join("absent.sock"),
            mac: "02:00:00:00:00:09".into(),
            queue_pairs: 1,
        });
        let e = Instance::launch(&qemu, &spec2).unwrap_err();
        assert!(matches!(e, QemuError::BackendNotListening { .. }), "{e:?}");
        // /bin/false exits at once: an early exit with the log path.
        let e = Instance::launch(&qemu, &spec).unwrap_err();
        assert!(matches!(e, QemuError::EarlyExit { .. }), "{e:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}

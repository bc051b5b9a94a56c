//! Blocking QMP client over a unix socket, with an event queue.
//!
//! One `Qmp` is one QMP session. QEMU's monitor socket accepts a single
//! client at a time, so whoever holds the `Qmp` owns the monitor. No thread
//! is spawned: events that arrive while a command is waiting for its reply
//! (or during [`Qmp::poll_events`] / [`Qmp::wait_event`]) are queued.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::cmdline::{chardev_id, device_id, netdev_id, NicSpec};
use super::{QemuError, QemuVersion, Result};

/// Default time a command may take.
pub const DEFAULT_QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// `netdev_add` of a vhost-user netdev waits inside QEMU until the backend
/// has connected and answered the feature negotiation.
const NETDEV_ADD_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest event backlog kept; older events are dropped beyond this.
const MAX_QUEUED_EVENTS: usize = 4096;

/// Largest QMP line accepted (query-pci with 120 ports is ~100 KiB).
const MAX_LINE: usize = 16 << 20;

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `DEVICE_DELETED`, `RESET`, `SHUTDOWN`.
    pub name: String,
    /// The `data` member (`Null` when absent).
    pub data: Value,
    /// QEMU's timestamp in microseconds since the epoch.
    pub timestamp_us: u64,
}

/// Result of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpStatus {
    /// Run state, e.g. `running`, `paused`, `shutdown`, `prelaunch`.
    pub status: String,
    /// True when the vCPUs run.
    pub running: bool,
}

/// A QMP session.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    rbuf: Vec<u8>,
    events: VecDeque<QmpEvent>,
    next_id: u64,
    timeout: Duration,
    greeting: Value,
    dropped_events: u64,
}

impl Qmp {
    /// Connect to a QMP socket, read the greeting and enter command mode
    /// (`qmp_capabilities`). `timeout` bounds the handshake and becomes the
    /// default command timeout.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let stream = UnixStream::connect(path).map_err(|e| {
            QemuError::io(
                format!("cannot connect to QMP socket {}", path.display()),
                e,
            )
        })?;
        Qmp::handshake(stream, timeout, &mut || None)
    }

    /// Handshake on an already connected stream.
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Qmp> {
        Qmp::handshake(stream, timeout, &mut || None)
    }

    /// Handshake, calling `abort` between 200 ms waits: an `Some(error)`
    /// from it ends the wait (e.g. "QEMU exited").
    pub(crate) fn handshake(
        stream: UnixStream,
        timeout: Duration,
        abort: &mut dyn FnMut() -> Option<QemuError>,
    ) -> Result<Qmp> {
        let mut q = Qmp {
            stream,
            rbuf: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            timeout,
            greeting: Value::Null,
            dropped_events: 0,
        };
        let deadline = Instant::now() + timeout;
        let greeting = loop {
            if let Some(e) = abort() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(QemuError::Timeout {
                    what: "the QMP greeting".into(),
                    after: timeout,
                });
            }
            let slice = (deadline - now).min(Duration::from_millis(200));
            if let Some(msg) = q.read_message(Instant::now() + slice)? {
                break msg;
            }
        };
        if greeting.get("QMP").is_none() {
            return Err(QemuError::QmpProtocol(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        q.greeting = greeting;
        q.execute("qmp_capabilities", Value::Null)?;
        Ok(q)
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// QEMU version from the greeting.
    pub fn qemu_version(&self) -> Option<QemuVersion> {
        let v = self.greeting.pointer("/QMP/version/qemu")?;
        Some(QemuVersion {
            major: v.get("major")?.as_u64()? as u32,
            minor: v.get("minor")?.as_u64()? as u32,
            micro: v.get("micro")?.as_u64()? as u32,
        })
    }

    /// Default command timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Change the default command timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Run `cmd`; `args` is the `arguments` object (`Value::Null` for none).
    /// Returns the `return` member. QMP errors become [`QemuError::Qmp`].
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        self.execute_timeout(cmd, args, self.timeout)
    }

    /// [`Qmp::execute`] with an explicit timeout.
    pub fn execute_timeout(&mut self, cmd: &str, args: Value, timeout: Duration) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": cmd, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    QemuError::QmpClosed {
                        context: Some(format!("sending {cmd}")),
                    }
                }
                _ => QemuError::io(format!("sending QMP command {cmd}"), e),
            })?;
        tracing::trace!(%line, "qmp ->");
        let deadline = Instant::now() + timeout;
        loop {
            let Some(msg) = self.read_message(deadline).map_err(|e| match e {
                QemuError::QmpClosed { .. } => QemuError::QmpClosed {
                    context: Some(format!("waiting for the reply to {cmd}")),
                },
                e => e,
            })?
            else {
                return Err(QemuError::Timeout {
                    what: format!("the reply to QMP command {cmd}"),
                    after: timeout,
                });
            };
            if self.queue_if_event(&msg) {
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                // A late reply to a command that timed out earlier.
                tracing::debug!(%msg, "discarding stale QMP reply");
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(QemuError::Qmp {
                    command: cmd.to_string(),
                    class: err
                        .get("class")
                        .and_then(Value::as_str)
                        .unwrap_or("GenericError")
                        .to_string(),
                    desc: err
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("(no description)")
                        .to_string(),
                });
            }
            return Err(QemuError::QmpProtocol(format!("unexpected message {msg}")));
        }
    }

    /// Read whatever arrives within `timeout` into the event queue; returns
    /// the number of queued events.
    pub fn poll_events(&mut self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        while let Some(msg) = self.read_message(deadline)? {
            if !self.queue_if_event(&msg) {
                tracing::debug!(%msg, "discarding stale QMP reply");
            }
        }
        Ok(self.events.len())
    }

    /// Remove and return every queued event.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Queued events (not removed).
    pub fn queued_events(&self) -> impl Iterator<Item = &QmpEvent> {
        self.events.iter()
    }

    /// Drop queued events named `name` matching `pred`.
    pub fn discard_events(&mut self, name: &str, mut pred: impl FnMut(&QmpEvent) -> bool) {
        self.events.retain(|e| !(e.name == name && pred(e)));
    }

    /// Wait for an event named `name` for which `pred` holds, first among
    /// the queued ones. Other events stay queued. The match is removed.
    pub fn wait_event(
        &mut self,
        name: &str,
        mut pred: impl FnMut(&QmpEvent) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent> {
        if let Some(ev) = self.take_queued(name, &mut pred) {
            return Ok(ev);
        }
        let deadline = Instant::now() + timeout;
        while let Some(msg) = self.read_message(deadline)? {
            if !self.queue_if_event(&msg) {
                tracing::debug!(%msg, "discarding stale QMP reply");
                continue;
            }
            if let Some(ev) = self.take_queued(name, &mut pred) {
                return Ok(ev);
            }
        }
        Err(QemuError::Timeout {
            what: format!("QMP event {name}"),
            after: timeout,
        })
    }

    fn take_queued(
        &mut self,
        name: &str,
        pred: &mut dyn FnMut(&QmpEvent) -> bool,
    ) -> Option<QmpEvent> {
        let pos = self.events.iter().position(|e| e.name == name && pred(e))?;
        self.events.remove(pos)
    }

    fn queue_if_event(&mut self, msg: &Value) -> bool {
        let Some(name) = msg.get("event").and_then(Value::as_str) else {
            return false;
        };
        let ts = msg.get("timestamp");
        let secs = ts
            .and_then(|t| t.get("seconds"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let usecs = ts
            .and_then(|t| t.get("microseconds"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let ev = QmpEvent {
            name: name.to_string(),
            data: msg.get("data").cloned().unwrap_or(Value::Null),
            timestamp_us: secs.saturating_mul(1_000_000).saturating_add(usecs),
        };
        tracing::debug!(event = %ev.name, data = %ev.data, "qmp event");
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
            self.dropped_events += 1;
            if self.dropped_events == 1 {
                tracing::warn!("QMP event queue full; dropping the oldest events");
            }
        }
        self.events.push_back(ev);
        true
    }

    /// Next JSON message, or `None` when `deadline` passes first.
    fn read_message(&mut self, deadline: Instant) -> Result<Option<Value>> {
        loop {
            if let Some(nl) = self.rbuf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.rbuf.drain(..=nl).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                tracing::trace!(%text, "qmp <-");
                return serde_json::from_str(text).map(Some).map_err(|e| {
                    QemuError::QmpProtocol(format!("bad JSON from QEMU ({e}): {text}"))
                });
            }
            if self.rbuf.len() > MAX_LINE {
                return Err(QemuError::QmpProtocol(format!(
                    "QMP line longer than {MAX_LINE} bytes"
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
                .map_err(|e| QemuError::io("setting the QMP read timeout", e))?;
            let mut buf = [0u8; 8192];
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(QemuError::QmpClosed { context: None }),
                Ok(n) => self.rbuf.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(QemuError::QmpClosed { context: None })
                }
                Err(e) => return Err(QemuError::io("reading from QMP", e)),
            }
        }
    }

    // ----- convenience commands -----

    /// `query-status`.
    pub fn query_status(&mut self) -> Result<QmpStatus> {
        self.query_status_timeout(self.timeout)
    }

    /// `query-status` with its own timeout.
    pub fn query_status_timeout(&mut self, timeout: Duration) -> Result<QmpStatus> {
        let v = self.execute_timeout("query-status", Value::Null, timeout)?;
        Ok(QmpStatus {
            status: v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
            running: v.get("running").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// `system_reset`: hard reset, like pressing the reset button.
    pub fn system_reset(&mut self) -> Result<()> {
        self.execute("system_reset", Value::Null).map(drop)
    }

    /// `system_powerdown`: ACPI power button (the guest decides).
    pub fn system_powerdown(&mut self) -> Result<()> {
        self.execute("system_powerdown", Value::Null).map(drop)
    }

    /// `stop`: pause the vCPUs.
    pub fn stop(&mut self) -> Result<()> {
        self.execute("stop", Value::Null).map(drop)
    }

    /// `cont`: resume the vCPUs.
    pub fn cont(&mut self) -> Result<()> {
        self.execute("cont", Value::Null).map(drop)
    }

    /// `quit`: QEMU exits at once. The connection closing before the reply
    /// arrives counts as success.
    pub fn quit(&mut self) -> Result<()> {
        match self.execute("quit", Value::Null) {
            Ok(_) | Err(QemuError::QmpClosed { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `query-pci`.
    pub fn query_pci(&mut self) -> Result<Value> {
        self.execute("query-pci", Value::Null)
    }

    /// Run a human monitor command (e.g. `info network`) and return its text.
    pub fn hmp(&mut self, command_line: &str) -> Result<String> {
        let v = self.execute(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        )?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Hot-plug `nic` onto root port `bus`: `chardev-add` (unix client with
    /// reconnect-ms), `netdev_add type=vhost-user`, `device_add
    /// virtio-net-pci`. Partial work is rolled back on failure.
    ///
    /// `netdev_add` returns only once the backend has connected and
    /// negotiated, so the backend must be listening.
    pub fn hotplug_nic(&mut self, nic: &NicSpec, bus: &str) -> Result<()> {
        nic.validate()?;
        self.execute("chardev-add", nic.qmp_chardev_add())?;
        let timeout = self.timeout.max(NETDEV_ADD_TIMEOUT);
        if let Err(e) = self.execute_timeout("netdev_add", nic.qmp_netdev_add(), timeout) {
            if !matches!(e, QemuError::Timeout { .. }) {
                self.remove_quietly("chardev-remove", &nic.chardev_id());
            }
            return Err(match e {
                QemuError::Timeout { after, .. } => QemuError::Timeout {
                    what: format!(
                        "netdev_add of NIC {}: QEMU waits for the vhost-user backend at {} \
                         to connect and negotiate",
                        nic.id,
                        nic.socket_path.display()
                    ),
                    after,
                },
                e => e,
            });
        }
        if let Err(e) = self.execute("device_add", nic.qmp_device_add(bus)) {
            // netdev_del of a vhost-user netdev also deletes its chardev.
            self.remove_quietly("netdev_del", &nic.netdev_id());
            self.remove_quietly("chardev-remove", &nic.chardev_id());
            return Err(e);
        }
        Ok(())
    }

    /// Unplug NIC `id` (the [`NicSpec::id`]): `device_del`, wait for the
    /// guest to release it (`DEVICE_DELETED`), then `netdev_del` and
    /// `chardev-remove`. On timeout the device stays pending in QEMU and
    /// the call may be repeated.
    pub fn unplug_nic(&mut self, id: &str, timeout: Duration) -> Result<()> {
        let present = self.request_nic_removal(id)?;
        if present {
            self.wait_device_deleted(id, timeout)?;
        }
        self.remove_nic_backend(id)
    }

    /// First step of an unplug: `device_del nic-<id>`. Returns false when
    /// the device did not exist (nothing to wait for).
    pub fn request_nic_removal(&mut self, id: &str) -> Result<bool> {
        let dev = device_id(id);
        self.discard_events("DEVICE_DELETED", |e| is_device_deleted(e, &dev));
        match self.execute("device_del", json!({ "id": dev })) {
            Ok(_) => Ok(true),
            Err(QemuError::Qmp { class, .. }) if class == "DeviceNotFound" => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One slice of an unplug's wait: true once NIC `id`'s device is gone
    /// (`DEVICE_DELETED` came, or a repeated `device_del` finds no device).
    ///
    /// When `repress_after` has passed since `last_press`, `device_del` is
    /// issued again. A guest can lose the request: an ACPI eject notice
    /// that comes while it is still handling the hot-plug before it (CI
    /// saw this under load), or a pciehp button press while the slot is
    /// still powering on. QEMU allows the repeat (at once for ACPI hotplug,
    /// after 5 s for native PCIe) and refuses it with a `GenericError`
    /// ("already in the process of unplug", "guest is busy") while the
    /// guest is acting on the first request; both mean "keep waiting".
    pub fn wait_nic_removed(
        &mut self,
        id: &str,
        slice: Duration,
        last_press: &mut Instant,
        repress_after: Duration,
    ) -> Result<bool> {
        match self.wait_device_deleted(id, slice) {
            Ok(()) => return Ok(true),
            Err(QemuError::Timeout { .. }) => {}
            Err(e) => return Err(e),
        }
        if last_press.elapsed() < repress_after {
            return Ok(false);
        }
        *last_press = Instant::now();
        match self.request_nic_removal(id) {
            Ok(present) => {
                if present {
                    tracing::info!(nic = %id, "the guest has not released the NIC: device_del again");
                }
                Ok(!present)
            }
            Err(QemuError::Qmp { class, desc, .. }) if class == "GenericError" => {
                tracing::debug!(nic = %id, "device_del again refused: {desc}");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Wait for `DEVICE_DELETED` of NIC `id`'s device.
    pub fn wait_device_deleted(&mut self, id: &str, timeout: Duration) -> Result<()> {
        let dev = device_id(id);
        match self.wait_event("DEVICE_DELETED", |e| is_device_deleted(e, &dev), timeout) {
            Ok(_) => Ok(()),
            Err(QemuError::Timeout { after, .. }) => Err(QemuError::Timeout {
                what: format!("the guest to release NIC {id} (DEVICE_DELETED of {dev})"),
                after,
            }),
            Err(e) => Err(e),
        }
    }

    /// Last step of an unplug: `netdev_del` then `chardev-remove`, each
    /// tolerating "not found" (QEMU deletes a vhost-user netdev's chardev
    /// together with the netdev).
    pub fn remove_nic_backend(&mut self, id: &str) -> Result<()> {
        for (cmd, obj) in [
            ("netdev_del", netdev_id(id)),
            ("chardev-remove", chardev_id(id)),
        ] {
            match self.execute(cmd, json!({ "id": obj })) {
                Ok(_) => {}
                Err(QemuError::Qmp {
                    ref desc,
                    ref class,
                    ..
                }) if class == "DeviceNotFound" || desc.contains("not found") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn remove_quietly(&mut self, cmd: &str, id: &str) {
        if let Err(e) = self.execute(cmd, json!({ "id": id })) {
            tracing::debug!("rollback {cmd} {id}: {e}");
        }
    }
}

fn is_device_deleted(e: &QmpEvent, dev: &str) -> bool {
    e.data.get("device").and_then(Value::as_str) == Some(dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::thread::JoinHandle;

    /// A scripted fake QMP server: sends the greeting, then for each
    /// received command calls `reply(cmd, args, id)` and writes the lines it
    /// returns. Records every command.
    struct FakeQmp {
        path: PathBuf,
        handle: Option<JoinHandle<Vec<Value>>>,
    }

    type Script = Box<dyn FnMut(&str, &Value, &Value) -> Vec<Value> + Send>;

    impl FakeQmp {
        fn start(tag: &str, mut reply: Script) -> FakeQmp {
            let path = std::env::temp_dir()
                .join(format!("enilab-fakeqmp-{}-{tag}.sock", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).unwrap();
            let handle = std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut seen = Vec::new();
                writeln!(
                    s,
                    r#"{{"QMP": {{"version": {{"qemu": {{"micro": 2, "minor": 0, "major": 10}}, "package": "fake"}}, "capabilities": ["oob"]}}}}"#
                )
                .unwrap();
                let r = BufReader::new(s.try_clone().unwrap());
                for line in r.lines() {
                    let Ok(line) = line else { break };
                    let msg: Value = serde_json::from_str(&line).unwrap();
                    let cmd = msg["execute"].as_str().unwrap().to_string();
                    let args = msg.get("arguments").cloned().unwrap_or(Value::Null);
                    let id = msg.get("id").cloned().unwrap_or(Value::Null);
                    seen.push(json!({"execute": cmd, "arguments": args}));
                    let out = if cmd == "qmp_capabilities" {
                        vec![json!({"return": {}, "id": id})]
                    } else {
                        reply(&cmd, &args, &id)
                    };
                    for o in out {
                        if o.is_null() {
                            return seen; // close the connection
                        }
                        writeln!(s, "{o}").unwrap();
                    }
                }
                seen
            });
            FakeQmp {
                path,
                handle: Some(handle),
            }
        }

        fn finish(mut self) -> Vec<Value> {
            self.handle.take().unwrap().join().unwrap()
        }
    }

    impl Drop for FakeQmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn ev(name: &str, data: Value) -> Value {
        json!({"event": name, "data": data, "timestamp": {"seconds": 100, "microseconds": 5}})
    }

    fn ok(id: &Value, ret: Value) -> Value {
        json!({"return": ret, "id": id})
    }

    #[test]
    fn handshake_execute_and_errors() {
        let fake = FakeQmp::start(
            "exec",
            Box::new(|cmd, _args, id| match cmd {
                "query-status" => vec![
                    ev("RTC_CHANGE", json!({"offset": 1})),
                    ok(id, json!({"status": "running", "running": true})),
                ],
                "device_del" => vec![json!({"error": {"class": "DeviceNotFound",
                    "desc": "Device 'nic-x' not found"}, "id": id})],
                "quit" => vec![ok(id, json!({})), Value::Null],
                _ => vec![ok(id, json!({}))],
            }),
        );
        let mut q = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
        assert_eq!(q.qemu_version().unwrap().major, 10);
        let st = q.query_status().unwrap();
        assert_eq!(
            st,
            QmpStatus {
                status: "running".into(),
                running: true
            }
        );
        // The event that arrived before the reply was queued.
        let evs: Vec<_> = q.queued_events().cloned().collect();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].name, "RTC_CHANGE");
        assert_eq!(evs[0].timestamp_us, 100_000_005);
        let err = q.execute("device_del", json!({"id": "nic-x"})).unwrap_err();
        match &err {
            QemuError::Qmp {
                command,
                class,
                desc,
            } => {
                assert_eq!(command, "device_del");
                assert_eq!(class, "DeviceNotFound");
                assert_eq!(desc, "Device 'nic-x' not found");
            }
            e => panic!("unexpected {e:?}"),
        }
        assert!(err.to_string().contains("Device 'nic-x' not found"));
        q.quit().unwrap();
        let seen = fake.finish();
        let cmds: Vec<&str> = seen
            .iter()
            .map(|v| v["execute"].as_str().unwrap())
            .collect();
        assert_eq!(
            cmds,
            ["qmp_capabilities", "query-status", "device_del", "quit"]
        );
    }

    #[test]
    fn wait_event_with_predicate_and_timeout() {
        let fake = FakeQmp::start(
            "events",
            Box::new(|cmd, _args, id| match cmd {
                "system_reset" => vec![
                    ok(id, json!({})),
                    ev(
                        "DEVICE_DELETED",
                        json!({"path": "/machine/peripheral/nic-a/virtio-backend"}),
                    ),
                    ev(
                        "RESET",
                        json!({"guest": false, "reason": "host-qmp-system-reset"}),
                    ),
                    ev(
                        "DEVICE_DELETED",
                        json!({"device": "nic-a", "path": "/machine/peripheral/nic-a"}),
                    ),
                ],
                _ => vec![ok(id, json!({}))],
            }),
        );
        let mut q = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
        q.system_reset().unwrap();
        let e = q
            .wait_event(
                "DEVICE_DELETED",
                |e| e.data["device"] == "nic-a",
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(e.data["path"], "/machine/peripheral/nic-a");
        // The non-matching events stay queued, in order.
        let names: Vec<String> = q.queued_events().map(|e| e.name.clone()).collect();
        assert_eq!(names, ["DEVICE_DELETED", "RESET"]);
        let r = q
            .wait_event("RESET", |_| true, Duration::from_millis(10))
            .unwrap();
        assert_eq!(r.data["reason"], "host-qmp-system-reset");
        let t = Instant::now();
        let err = q
            .wait_event("SHUTDOWN", |_| true, Duration::from_millis(300))
            .unwrap_err();
        assert!(matches!(err, QemuError::Timeout { .. }), "{err:?}");
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert_eq!(q.take_events().len(), 1);
        drop(q);
        fake.finish();
    }

    #[test]
    fn command_timeout_then_stale_reply_is_skipped() {
        let mut slow_once = true;
        let fake = FakeQmp::start(
            "stale",
            Box::new(move |cmd, _args, id| match cmd {
                "stop" if slow_once => {
                    slow_once = false;
                    std::thread::sleep(Duration::from_millis(400));
                    vec![ok(id, json!({}))]
                }
                "query-status" => vec![ok(id, json!({"status": "paused", "running": false}))],
                _ => vec![ok(id, json!({}))],
            }),
        );
        let mut q = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
        let err = q
            .execute_timeout("stop", Value::Null, Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(err, QemuError::Timeout { .. }));
        // The late "stop" reply must not be taken for query-status's.
        assert!(!q.query_status().unwrap().running);
        drop(q);
        fake.finish();
    }

    #[test]
    fn hotplug_and_unplug_sequences() {
        let fake = FakeQmp::start(
            "hotplug",
            Box::new(|cmd, args, id| match cmd {
                "device_del" => vec![
                    ok(id, json!({})),
                    ev(
                        "DEVICE_DELETED",
                        json!({"path": "/machine/peripheral/nic-eni-1/virtio-backend"}),
                    ),
                    ev(
                        "DEVICE_DELETED",
                        json!({"device": args["id"], "path": "/machine/peripheral/nic-eni-1"}),
                    ),
                ],
                "chardev-remove" => vec![json!({"error": {"class": "GenericError",
                    "desc": "Chardev 'chr-eni-1' not found"}, "id": id})],
                _ => vec![ok(id, json!({}))],
            }),
        );
        let nic = NicSpec {
            id: "eni-1".into(),
            socket_path: "/tmp/eni-1.sock".into(),
            mac: "02:00:00:00:00:02".into(),
            queue_pairs: 2,
        };
        let mut q = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
        q.hotplug_nic(&nic, "rp3").unwrap();
        q.unplug_nic("eni-1", Duration::from_secs(5)).unwrap();
        drop(q);
        let seen = fake.finish();
        let cmds: Vec<&str> = seen
            .iter()
            .map(|v| v["execute"].as_str().unwrap())
            .collect();
        assert_eq!(
            cmds,
            [
                "qmp_capabilities",
                "chardev-add",
                "netdev_add",
                "device_add",
                "device_del",
                "netdev_del",
                "chardev-remove"
            ]
        );
        assert_eq!(
            seen[1]["arguments"]["backend"]["data"]["reconnect-ms"],
            crate::qemu::NIC_RECONNECT_MS
        );
        assert_eq!(seen[2]["arguments"]["queues"], 2);
        assert_eq!(seen[3]["arguments"]["bus"], "rp3");
        assert_eq!(seen[3]["arguments"]["vectors"], 6);
        assert_eq!(seen[4]["arguments"]["id"], "nic-eni-1");
    }

    #[test]
    fn unplug_asks_again_when_the_guest_loses_the_request() {
        // The first device_del is lost, the second is refused while the
        // guest is busy, the third is answered with DEVICE_DELETED.
        let mut presses = 0;
        let fake = FakeQmp::start(
            "repress",
            Box::new(move |cmd, args, id| match cmd {
                "device_del" => {
                    presses += 1;
                    match presses {
                        1 => vec![ok(id, json!({}))],
                        2 => vec![json!({"error": {"class": "GenericError",
                            "desc": "Device nic-eni-1 is already in the process of unplug"}, "id": id})],
                        _ => vec![
                            ok(id, json!({})),
                            ev("DEVICE_DELETED", json!({"device": args["id"]})),
                        ],
                    }
                }
                _ => vec![ok(id, json!({}))],
            }),
        );
        let mut q = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
        assert!(q.request_nic_removal("eni-1").unwrap());
        let mut pressed = Instant::now();
        let slice = Duration::from_millis(20);
        let again = Duration::from_millis(100);
        let t = Instant::now();
        let mut slices = 0;
        while !q
            .wait_nic_removed("eni-1", slice, &mut pressed, again)
            .unwrap()
        {
            slices += 1;
            assert!(slices < 100, "never removed");
        }
        // Two repeats, each after `again`.
        assert!(t.elapsed() >= 2 * again, "{:?}", t.elapsed());
        drop(q);
        let dels = fake
            .finish()
            .iter()
            .filter(|v| v["execute"] == "device_del")
            .count();
        assert_eq!(dels, 3);
    }

    #[test]
    fn unplug_stops_asking_once_the_device_is_gone() {
        // The DEVICE_DELETED event was missed; a repeat finds no device.
        let mut presses = 0;
        let fake = FakeQmp::start(
            "gone",
            Box::new(move |cmd, _args, id| match cmd {
                "device_del" => {
                    presses += 1;
                    if presses == 1 {
                        vec![ok(id, json!({}))]
                    } else {
                        vec![json!({"error": {"class": "DeviceNotFound",
                            "desc": "Device 'nic-eni-2' not found"}, "id": id})]
                    }
                }
                _ => vec![ok(id, json!({}))],
            }),
        );
        let mut q = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
        assert!(q.request_nic_removal("eni-2").unwrap());
        let mut pressed = Instant::now();
        let slice = Duration::from_millis(20);
        assert!(!q
            .wait_nic_removed("eni-2", slice, &mut pressed, Duration::from_secs(60))
            .unwrap());
        assert!(q
            .wait_nic_removed("eni-2", slice, &mut pressed, Duration::ZERO)
            .unwrap());
        drop(q);
        fake.finish();
    }

    #[test]
    fn failed_device_add_rolls_back() {
        let fake = FakeQmp::start(
            "rollback",
            Box::new(|cmd, _args, id| match cmd {
                "device_add" => vec![json!({"error": {"class": "GenericError",
                    "desc": "Bus 'rp9' not found"}, "id": id})],
                _ => vec![ok(id, json!({}))],
            }),
        );
        let nic = NicSpec {
            id: "eni-2".into(),
            socket_path: "/tmp/eni-2.sock".into(),
            mac: "02:00:00:00:00:03".into(),
            queue_pairs: 1,
        };
        let mut q = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
        let err = q.hotplug_nic(&nic, "rp9").unwrap_err();
        assert!(err.to_string().contains("Bus 'rp9' not found"), "{err}");
        drop(q);
        let seen = fake.finish();
        let cmds: Vec<&str> = seen
            .iter()
            .map(|v| v["execute"].as_str().unwrap())
            .collect();
        assert_eq!(
            cmds,
            [
                "qmp_capabilities",
                "chardev-add",
                "netdev_add",
                "device_add",
                "netdev_del",
                "chardev-remove"
            ]
        );
    }

    #[test]
    fn closed_connection_is_reported() {
        let fake = FakeQmp::start("closed", Box::new(|_cmd, _args, _id| vec![Value::Null]));
        let mut q = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
        let err = q.query_status().unwrap_err();
        assert!(matches!(err, QemuError::QmpClosed { .. }), "{err:?}");
        fake.finish();
    }
}

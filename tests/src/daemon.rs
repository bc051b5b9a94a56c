//! An `enilab serve` of a test's own, with real guests: the daemon binary
//! runs as a child process (so a restart is a real one) on loopback port 0,
//! under a short run root of its own. [`ApiDaemon`] speaks the EC2 Query
//! API to it with a minimal client and reaches guests through their agent
//! sockets. Its `Drop` kills the daemon and, by PID, every QEMU it left
//! under the run root, then removes the root and stale namespaces.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use enilab_control::agent::{AgentClient, Output};
use enilab_control::api::bench::{extract, Client};

use crate::{kill_if_ours, wait_until, workspace_root, ChildGuard, SEQ};

/// An EC2 error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFault {
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// The `enilab` binary: `$ENILAB_BIN`, else the workspace's debug build.
pub fn enilab_bin() -> Result<PathBuf, String> {
    if let Some(b) = std::env::var_os("ENILAB_BIN") {
        return Ok(PathBuf::from(b));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let b = target.join("debug").join("enilab");
    if b.exists() {
        Ok(b)
    } else {
        Err(format!(
            "{} is not built (cargo build -p enilab-control, or set ENILAB_BIN)",
            b.display()
        ))
    }
}

/// Percent-encode a form value (RFC 3986 unreserved characters stay).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Every text between `<tag>` and `</tag>`.
pub fn extract_all<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut v = Vec::new();
    let mut rest = xml;
    while let Some(s) = rest.find(&open) {
        let from = s + open.len();
        let Some(e) = rest[from..].find(&close) else {
            break;
        };
        v.push(&rest[from..from + e]);
        rest = &rest[from + e + close.len()..];
    }
    v
}

/// A daemon with the QEMU driver, and its directories.
pub struct ApiDaemon {
    root: PathBuf,
    state_dir: PathBuf,
    run_root: PathBuf,
    bin: PathBuf,
    child: Option<ChildGuard>,
    addr: Option<SocketAddr>,
    extra: Vec<String>,
    started: Instant,
    budget: Duration,
}

impl ApiDaemon {
    /// Start a daemon under a fresh root; `extra` arguments go to `serve`.
    pub fn start(bin: PathBuf, tag: &str, budget: Duration, extra: &[&str]) -> ApiDaemon {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let root = PathBuf::from(format!("/tmp/enl-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let state_dir = root.join("state");
        let run_root = root.join("run");
        std::fs::create_dir_all(&state_dir).expect("state dir");
        std::fs::create_dir_all(&run_root).expect("run root");
        eprintln!("[{tag}] daemon root {}", root.display());
        let mut d = ApiDaemon {
            root,
            state_dir,
            run_root,
            bin,
            child: None,
            addr: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            started: Instant::now(),
            budget,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("daemon.log"))
            .expect("daemon log");
        let mut child = Command::new(&self.bin)
            .arg("--run-dir")
            .arg(&self.run_root)
            .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&self.state_dir)
            .args(&self.extra)
            .env(
                "ENILAB_LOG",
                std::env::var("ENILAB_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn enilab serve");
        let out = child.stdout.take().expect("stdout");
        let mut guard = ChildGuard::new(child, "enilab serve");
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .and_then(|a| a.parse().ok());
        let Some(addr) = addr else {
            guard.signal(libc::SIGKILL);
            panic!(
                "the daemon did not start: {line:?}\n{}",
                self.daemon_log_tail(40)
            );
        };
        self.child = Some(guard);
        self.addr = Some(addr);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("daemon running")
    }

    /// The daemon's pid (0 when stopped).
    pub fn daemon_pid(&self) -> u32 {
        self.child.as_ref().map(ChildGuard::id).unwrap_or(0)
    }

    pub fn run_root(&self) -> &Path {
        &self.run_root
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Time left of the scenario's budget (at least one second).
    pub fn left(&self) -> Duration {
        self.budget
            .saturating_sub(self.started.elapsed())
            .max(Duration::from_secs(1))
    }

    /// Stop the daemon with SIGTERM (guests keep running) and wait for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.signal(libc::SIGTERM);
            if c.wait_timeout(Duration::from_secs(20)).is_none() {
                c.signal(libc::SIGKILL);
            }
        }
        self.addr = None;
    }

    /// Start a stopped daemon again on the same state and run root.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the daemon is still running");
        self.spawn();
    }

    /// Stop the daemon and start it again.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// QEMU pid of instance `id` (from its pidfile).
    pub fn qemu_pid(&self, id: &str) -> Option<u32> {
        std::fs::read_to_string(self.run_root.join("instances").join(id).join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Kill instance `id`'s QEMU (a crashed host process), by PID.
    pub fn kill_guest(&self, id: &str) -> bool {
        let marker = self.run_root.to_string_lossy().into_owned();
        self.qemu_pid(id)
            .is_some_and(|pid| kill_if_ours(pid, &marker))
    }

    /// Call `action`; the XML body or EC2's error.
    pub fn call(&self, action: &str, params: &[(&str, &str)]) -> Result<String, ApiFault> {
        self.call_version("2016-11-15", action, params)
    }

    /// A VPC of `cidr` whose default security group lets in everything
    /// from the VPC; its id.
    pub fn open_vpc(&self, cidr: &str) -> String {
        let vpc = self.get("CreateVpc", &[("CidrBlock", cidr)], "vpcId");
        let sg = self.get(
            "DescribeSecurityGroups",
            &[("Filter.1.Name", "vpc-id"), ("Filter.1.Value.1", &vpc)],
            "groupId",
        );
        self.ok(
            "AuthorizeSecurityGroupIngress",
            &[
                ("GroupId", &sg),
                ("IpPermissions.1.IpProtocol", "-1"),
                ("IpPermissions.1.IpRanges.1.CidrIp", cidr),
            ],
        );
        vpc
    }

    /// A subnet of `vpc`; its id.
    pub fn subnet(&self, vpc: &str, cidr: &str) -> String {
        self.get(
            "CreateSubnet",
            &[("VpcId", vpc), ("CidrBlock", cidr)],
            "subnetId",
        )
    }

    /// Launch one t3.micro in `subnet`: its id and primary address (one
    /// call per instance: a reservation repeats privateIpAddress per
    /// interface and address).
    pub fn launch(&self, subnet: &str) -> (String, String) {
        let xml = self.ok(
            "RunInstances",
            &[
                ("ImageId", "ami-0e1ab000000000001"),
                ("InstanceType", "t3.micro"),
                ("MinCount", "1"),
                ("MaxCount", "1"),
                ("SubnetId", subnet),
            ],
        );
        (
            extract_all(&xml, "instanceId")[0].to_string(),
            extract_all(&xml, "privateIpAddress")[0].to_string(),
        )
    }

    /// Launch `n` instances in `subnet` and wait until each agent answers
    /// and holds its primary address.
    pub fn boot(&self, subnet: &str, n: usize, timeout: Duration) -> Vec<(String, String)> {
        let v: Vec<(String, String)> = (0..n).map(|_| self.launch(subnet)).collect();
        for (id, ip) in &v {
            self.wait_guest(id, timeout);
            self.wait(&format!("{ip} on {id}"), timeout, || {
                self.sh(id, "ip -4 -o addr show", Duration::from_secs(30))
                    .stdout_str()
                    .contains(&format!("inet {ip}/"))
            });
        }
        v
    }

    /// Call an ELBv2 (2015-12-01) action.
    pub fn elb(&self, action: &str, params: &[(&str, &str)]) -> String {
        match self.call_version("2015-12-01", action, params) {
            Ok(x) => x,
            Err(f) => panic!("{action} {params:?} failed: {f:?}"),
        }
    }

    /// Call `action` of API `version`; the XML body or the error.
    pub fn call_version(
        &self,
        version: &str,
        action: &str,
        params: &[(&str, &str)],
    ) -> Result<String, ApiFault> {
        let mut body = format!("Action={action}&Version={version}");
        for (k, v) in params {
            body.push('&');
            body.push_str(&encode(k));
            body.push('=');
            body.push_str(&encode(v));
        }
        let mut c = Client::connect(self.addr()).map_err(|e| ApiFault {
            status: 0,
            code: "Connect".into(),
            message: e.to_string(),
        })?;
        let (status, xml) = c.post(&body).map_err(|e| ApiFault {
            status: 0,
            code: "Io".into(),
            message: e.to_string(),
        })?;
        if status == 200 {
            Ok(xml)
        } else {
            Err(ApiFault {
                status,
                code: extract(&xml, "Code").unwrap_or("").to_string(),
                message: extract(&xml, "Message").unwrap_or(&xml).to_string(),
            })
        }
    }

    /// Call `action` and panic with EC2's error if it fails.
    pub fn ok(&self, action: &str, params: &[(&str, &str)]) -> String {
        match self.call(action, params) {
            Ok(x) => x,
            Err(f) => panic!("{action} {params:?} failed: {f:?}"),
        }
    }

    /// Call `action` and return the first `<tag>` of the answer.
    pub fn get(&self, action: &str, params: &[(&str, &str)], tag: &str) -> String {
        let xml = self.ok(action, params);
        extract(&xml, tag)
            .unwrap_or_else(|| panic!("no <{tag}> in the answer to {action}: {xml}"))
            .to_string()
    }

    /// The instance's state name.
    pub fn instance_state(&self, id: &str) -> String {
        let xml = self.ok("DescribeInstances", &[("InstanceId.1", id)]);
        let state = extract(&xml, "instanceState").unwrap_or("");
        extract(state, "name").unwrap_or("").to_string()
    }

    /// The ENI's attachment status ("" when detached).
    pub fn attachment_status(&self, eni: &str) -> String {
        let xml = self.ok(
            "DescribeNetworkInterfaces",
            &[("NetworkInterfaceId.1", eni)],
        );
        extract(&xml, "attachment")
            .and_then(|a| extract(a, "status"))
            .unwrap_or("")
            .to_string()
    }

    /// Wait until `check` holds, polling every 200 ms, or panic.
    pub fn wait(&self, what: &str, timeout: Duration, check: impl FnMut() -> bool) {
        if !wait_until(timeout.min(self.left()), check) {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.daemon_log_tail(30)
            );
        }
    }

    /// The agent socket of instance `id`.
    pub fn agent_socket(&self, id: &str) -> PathBuf {
        self.run_root.join("instances").join(id).join("agent.sock")
    }

    /// Wait until instance `id` is running and its guest agent answers.
    pub fn wait_guest(&self, id: &str, timeout: Duration) {
        self.wait(&format!("{id} running"), timeout, || {
            self.instance_state(id) == "running"
        });
        self.wait(&format!("{id}'s agent"), timeout, || {
            AgentClient::connect(self.agent_socket(id))
                .and_then(|mut c| c.ping())
                .is_ok()
        });
    }

    /// Run `argv` in instance `id`.
    pub fn exec(&self, id: &str, argv: &[&str], timeout: Duration) -> Output {
        let mut c = AgentClient::connect(self.agent_socket(id))
            .unwrap_or_else(|e| panic!("agent of {id}: {e}"));
        c.exec_capture(argv, timeout)
            .unwrap_or_else(|e| panic!("exec {argv:?} in {id}: {e}"))
    }

    /// Run a shell script in instance `id`.
    pub fn sh(&self, id: &str, script: &str, timeout: Duration) -> Output {
        self.exec(id, &["sh", "-c", script], timeout)
    }

    /// Run a shell script in `id` that must succeed; its stdout.
    pub fn sh_ok(&self, id: &str, script: &str, timeout: Duration) -> String {
        let out = self.sh(id, script, timeout);
        assert!(
            out.success(),
            "`{script}` in {id} failed: {}\n{}",
            out.stderr_str(),
            out.stdout_str()
        );
        out.stdout_str()
    }

    /// Whether `id` gets an answer to one ping of `ip` within a second.
    pub fn pings(&self, id: &str, ip: &str) -> bool {
        self.exec(
            id,
            &["ping", "-c", "1", "-W", "1", ip],
            Duration::from_secs(5),
        )
        .success()
    }

    /// The last `lines` of the daemon's log.
    pub fn daemon_log_tail(&self, lines: usize) -> String {
        tail(&self.root.join("daemon.log"), lines)
    }

    fn dump_logs(&self) {
        eprintln!("--- daemon log ---\n{}", self.daemon_log_tail(60));
        if let Ok(rd) = std::fs::read_dir(self.run_root.join("instances")) {
            for e in rd.flatten() {
                eprintln!(
                    "--- console of {} ---\n{}",
                    e.file_name().to_string_lossy(),
                    tail(&e.path().join("console.log"), 30)
                );
            }
        }
    }

    /// The daemon's `GET /enilab/status` document.
    pub fn status(&self) -> serde_json::Value {
        enilab_control::api::status::fetch(self.addr()).unwrap_or_else(|e| panic!("status: {e}"))
    }

    /// `POST` a live operation (`/enilab/...`): its HTTP status and JSON.
    pub fn live(&self, path_and_query: &str) -> (u16, serde_json::Value) {
        enilab_control::api::failover::post_live(self.addr(), path_and_query)
            .unwrap_or_else(|e| panic!("{path_and_query}: {e}"))
    }

    /// Pause (QMP `stop`) or resume a guest through the daemon.
    pub fn pause(&self, id: &str, paused: bool) {
        let (code, v) = self.live(&format!("/enilab/instance/pause?id={id}&paused={paused}"));
        assert_eq!(code, 200, "pause {id}={paused}: {v}");
    }

    /// QEMU pids under the run root (from their pidfiles).
    pub fn qemu_pids(&self) -> Vec<u32> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.run_root.join("instances")) {
            for e in rd.flatten() {
                if let Ok(s) = std::fs::read_to_string(e.path().join("qemu.pid")) {
                    if let Ok(p) = s.trim().parse() {
                        v.push(p);
                    }
                }
            }
        }
        v
    }
}

/// The last `lines` lines of a text file ("" if unreadable).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for ApiDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        if let Some(mut c) = self.child.take() {
            c.signal(libc::SIGKILL);
        }
        let marker = self.run_root.to_string_lossy().into_owned();
        for pid in self.qemu_pids() {
            kill_if_ours(pid, &marker);
        }
        enilab_control::netns::Netns::sweep_stale(enilab_control::lab::INTERNET_NETNS_PREFIX);
        enilab_control::netns::Netns::sweep_stale(enilab_control::imds::NETNS_PREFIX);
        // ENILAB_KEEP_ROOT=1 keeps logs and consoles for a post-mortem.
        if std::env::var_os("ENILAB_KEEP_ROOT").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

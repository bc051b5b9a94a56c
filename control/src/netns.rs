//! Network namespaces this process creates for the lab (its "internet"),
//! driven with `ip netns`.
//!
//! A [`Netns`] is named `<prefix>-<our pid>-<n>`, so it is ours and no one
//! else's; dropping it kills every process it started (by PID) and any
//! other process still inside it, then deletes it. Nothing here addresses
//! an interface outside the namespaces it creates.

use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::qemu::sys;

/// Timeout of the `ip` commands that set a namespace up.
const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a child gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(1);

/// Errors of network namespace handling.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// `ip netns add` was refused.
    #[error("creating a network namespace is not permitted: it needs root (CAP_SYS_ADMIN)")]
    NotPermitted,
    #[error("cannot run {0}")]
    Spawn(String, #[source] io::Error),
    /// A command exited unsuccessfully.
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{0} did not finish within {1:?}")]
    Timeout(String, Duration),
    #[error("{0} printed output that does not parse")]
    Parse(String),
    /// A name or argument that would not be passed to `ip` safely.
    #[error("{0:?} is not a valid {1}")]
    BadArg(String, &'static str),
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Interface and namespace names we pass to `ip`: `[A-Za-z0-9_.-]`, not
/// starting with `-` (never an option), at most `max` bytes.
fn valid_name(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && !s.starts_with('-')
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn check_ifname(dev: &str) -> Result<(), NetnsError> {
    if valid_name(dev, 15) {
        Ok(())
    } else {
        Err(NetnsError::BadArg(dev.to_string(), "interface name"))
    }
}

fn describe(argv: &[&str]) -> String {
    format!("`{}`", argv.join(" "))
}

/// Run `cmd` with a deadline (killed by PID when it passes), collecting its
/// output. The exit status is not checked.
fn run_timed(mut cmd: Command, what: &str, timeout: Duration) -> Result<Output, NetnsError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| NetnsError::Spawn(what.to_string(), e))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NetnsError::Timeout(what.to_string(), timeout));
            }
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NetnsError::Spawn(what.to_string(), e));
            }
        }
    };
    // A process left in the background may hold the pipes open: take what
    // is there without waiting for it.
    let grace = Duration::from_millis(200);
    Ok(Output {
        status,
        stdout: out.recv_timeout(grace).unwrap_or_default(),
        stderr: err.recv_timeout(grace).unwrap_or_default(),
    })
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut r) = r {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            let _ = tx.send(v);
        });
    } else {
        let _ = tx.send(Vec::new());
    }
    rx
}

/// `out` as a string if the command succeeded, else a `Failed` error.
fn checked(what: &str, out: Output) -> Result<String, NetnsError> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetnsError::Failed {
            cmd: what.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Run a host command (an `ip` invocation) and return its stdout.
fn host(argv: &[&str]) -> Result<String, NetnsError> {
    let what = describe(argv);
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    checked(&what, run_timed(cmd, &what, IP_TIMEOUT)?)
}

/// Format a MAC as `ip` takes it.
pub use enilab_backend::net::format_mac;

/// Parse `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// PIDs of the children a namespace started that have not been reaped: a
/// PID in here cannot have been reused, so it is safe to signal.
type Registry = Arc<Mutex<Vec<u32>>>;

/// A network namespace owned by this process. Deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    children: Registry,
}

impl Netns {
    /// Create `<prefix>-<pid>-<n>`. `prefix` is `[A-Za-z0-9_.-]`.
    pub fn create(prefix: &str) -> Result<Netns, NetnsError> {
        if !valid_name(prefix, 40) {
            return Err(NetnsError::BadArg(prefix.to_string(), "namespace prefix"));
        }
        let pid = std::process::id();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("{prefix}-{pid}-{n}");
            let what = describe(&["ip", "netns", "add", &name]);
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "add", &name]);
            let out = run_timed(cmd, &what, IP_TIMEOUT)?;
            if out.status.success() {
                tracing::debug!(netns = %name, "network namespace created");
                return Ok(Netns {
                    name,
                    children: Arc::default(),
                });
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("File exists") {
                // Left by an earlier process that had our PID: take the next.
                continue;
            }
            if stderr.contains("not permitted") || stderr.contains("Permission denied") {
                return Err(NetnsError::NotPermitted);
            }
            return Err(checked(&what, out)
                .err()
                .unwrap_or(NetnsError::NotPermitted));
        }
    }

    /// Delete namespaces `<prefix>-<pid>-<n>` whose process is gone (left by
    /// a run that was killed). Returns how many were removed.
    pub fn sweep_stale(prefix: &str) -> usize {
        let Ok(list) = host(&["ip", "netns", "list"]) else {
            return 0;
        };
        let mut removed = 0;
        for line in list.lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
                continue;
            };
            let Some((pid, n)) = rest.split_once('-') else {
                continue;
            };
            let (Ok(pid), Ok(_)) = (pid.parse::<i32>(), n.parse::<u32>()) else {
                continue;
            };
            if sys::pid_alive(pid) {
                continue;
            }
            tracing::info!(netns = name, "removing a stale namespace");
            drop(Netns {
                name: name.to_string(),
                children: Arc::default(),
            });
            removed += 1;
        }
        removed
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn exec_command(&self, argv: &[&str]) -> Result<Command, NetnsError> {
        let Some(first) = argv.first() else {
            return Err(NetnsError::BadArg(String::new(), "command"));
        };
        if first.is_empty() {
            return Err(NetnsError::BadArg(String::new(), "command"));
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        Ok(cmd)
    }

    /// Run `argv` inside the namespace; killed if it outlives `timeout`.
    /// The exit status is the caller's to judge.
    pub fn exec(&self, argv: &[&str], timeout: Duration) -> Result<Output, NetnsError> {
        let cmd = self.exec_command(argv)?;
        run_timed(cmd, &describe(argv), timeout)
    }

    /// Run `argv` inside the namespace and return its stdout; an error if
    /// it fails.
    pub fn run(&self, argv: &[&str], timeout: Duration) -> Result<String, NetnsError> {
        let what = describe(argv);
        checked(&what, self.exec(argv, timeout)?)
    }

    /// Start a long-running process (a server) inside the namespace. It is
    /// killed when the returned handle or the namespace is dropped.
    pub fn spawn(
        &self,
        argv: &[&str],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<NetnsChild, NetnsError> {
        let mut cmd = self.exec_command(argv)?;
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        // `ip netns exec` execs the command: the PID is the server's own.
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        let child = cmd
            .spawn()
            .map_err(|e| NetnsError::Spawn(describe(argv), e))?;
        children.push(child.id());
        Ok(NetnsChild {
            child,
            registry: self.children.clone(),
            what: describe(argv),
        })
    }

    /// Move host interface `dev` into the namespace. It arrives down and
    /// without addresses; open fds on it (a TAP's) keep working.
    pub fn move_link(&self, dev: &str) -> Result<(), NetnsError> {
        check_ifname(dev)?;
        host(&["ip", "link", "set", "dev", dev, "netns", &self.name]).map(drop)
    }

    fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut argv = vec!["ip", "netns", "exec", &self.name, "ip"];
        argv.extend_from_slice(args);
        host(&argv)
    }

    pub fn set_mac(&self, dev: &str, mac: [u8; 6]) -> Result<(), NetnsError> {
        check_ifname(dev)?;
        let mac = format_mac(&mac);
        self.ip(&["link", "set", "dev", dev, "address", &mac])
            .map(drop)
    }

    pub fn add_addr(&self, dev: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetnsError> {
        check_ifname(dev)?;
        if prefix > 32 {
            return Err(NetnsError::BadArg(prefix.to_string(), "prefix length"));
        }
        let cidr = format!("{addr}/{prefix}");
        self.ip(&["addr", "add", &cidr, "dev", dev]).map(drop)
    }

    pub fn set_up(&self, dev: &str) -> Result<(), NetnsError> {
        check_ifname(dev)?;
        self.ip(&["link", "set", "dev", dev, "up"]).map(drop)
    }

    /// Add a route inside the namespace, e.g. `("0.0.0.0", 0)` via a gateway.
    pub fn add_route(
        &self,
        dst: Ipv4Addr,
        prefix: u8,
        via: Ipv4Addr,
        dev: &str,
    ) -> Result<(), NetnsError> {
        check_ifname(dev)?;
        let dst = format!("{dst}/{prefix}");
        let via = via.to_string();
        self.ip(&["route", "add", &dst, "via", &via, "dev", dev])
            .map(drop)
    }

    /// Turn IPv6 off in the namespace (for interfaces that arrive later
    /// too), so it sends no autoconfiguration traffic.
    pub fn disable_ipv6(&self) -> Result<(), NetnsError> {
        for key in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            self.run(&["sysctl", "-qw", key], IP_TIMEOUT)?;
        }
        Ok(())
    }

    /// The MAC of `dev` in the namespace, as `ip -j link` reports it.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6], NetnsError> {
        check_ifname(dev)?;
        let what = format!("ip -j link show dev {dev}");
        let json = self.ip(&["-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value =
            serde_json::from_str(&json).map_err(|_| NetnsError::Parse(what.clone()))?;
        v.get(0)
            .and_then(|l| l.get("address"))
            .and_then(|a| a.as_str())
            .and_then(parse_mac)
            .ok_or(NetnsError::Parse(what))
    }

    /// PIDs of every process inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        host(&["ip", "netns", "pids", &self.name])
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The namespace's inode, to tell our processes from others'.
    fn inode(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .ok()
            .map(|m| m.ino())
    }
}

/// Whether `pid` lives in the network namespace with inode `ino`.
fn pid_in_netns(pid: i32, ino: u64) -> bool {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|l| l.to_string_lossy() == format!("net:[{ino}]"))
        .unwrap_or(false)
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Our own children first: unreaped, so their PIDs are still theirs.
        for pid in self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if let Ok(pid) = i32::try_from(*pid) {
                let _ = sys::signal(pid, libc::SIGKILL);
            }
        }
        // Then whatever else runs inside (e.g. a server a command left in the
        // background): the namespace is ours, so they are too. Each PID is
        // checked to still be inside it right before the signal.
        if let Some(ino) = self.inode() {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let pids: Vec<i32> = self
                    .pids()
                    .into_iter()
                    .filter(|&p| sys::pid_alive(p) && pid_in_netns(p, ino))
                    .collect();
                if pids.is_empty() || Instant::now() >= deadline {
                    break;
                }
                for p in pids {
                    let _ = sys::signal(p, libc::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        match host(&["ip", "netns", "del", &self.name]) {
            Ok(_) => tracing::debug!(netns = %self.name, "network namespace deleted"),
            Err(e) => tracing::warn!(netns = %self.name, error = %e, "cannot delete namespace"),
        }
    }
}

/// A process started in a [`Netns`]. Dropping it stops it: SIGTERM, then
/// SIGKILL after a second, always by its own PID.
#[derive(Debug)]
pub struct NetnsChild {
    child: Child,
    registry: Registry,
    what: String,
}

impl NetnsChild {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stdout, if it was piped (once).
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// Whether it has exited (reaping it if so).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Stop it now and reap it.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = sys::signal(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + TERM_GRACE;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Ok(None) = self.child.try_wait() {
                tracing::debug!(cmd = %self.what, "SIGKILL after SIGTERM grace");
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        let pid = self.child.id();
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&p| p != pid);
    }
}

impl Drop for NetnsChild {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// Returns true (after saying so loudly) when the test cannot run here.
    pub(crate) fn skip(reason: &str) -> bool {
        if std::env::var("ENILAB_REQUIRE_GUESTS").as_deref() == Ok("1") {
            panic!("namespace test cannot run and ENILAB_REQUIRE_GUESTS=1: {reason}");
        }
        // Straight to stderr: libtest does not capture it, so the skip shows.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: namespace test needs root: {reason}"
        );
        true
    }

    fn netns() -> Option<Netns> {
        // Left by killed test runs (this crate's and the backend's).
        Netns::sweep_stale("enilab-test");
        match Netns::create("enilab-test") {
            Ok(ns) => Some(ns),
            Err(e @ NetnsError::NotPermitted) | Err(e @ NetnsError::Spawn(..)) => {
                skip(&e.to_string());
                None
            }
            Err(e) => panic!("create: {e}"),
        }
    }

    fn listed(name: &str) -> bool {
        host(&["ip", "netns", "list"])
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
    }

    #[test]
    fn names_and_macs() {
        assert!(valid_name("enilab-inet", 40));
        assert!(!valid_name("-n", 40));
        assert!(!valid_name("a b", 40));
        assert!(!valid_name("a/b", 40));
        assert!(!valid_name("sixteen-chars-xx", 15));
        assert_eq!(
            parse_mac("02:e1:cb:00:71:01"),
            Some([2, 0xe1, 0xcb, 0, 0x71, 1])
        );
        assert_eq!(parse_mac("02:e1:cb:00:71"), None);
        assert_eq!(parse_mac("02:e1:cb:00:71:01:02"), None);
        assert_eq!(parse_mac("2:e1:cb:00:71:01"), None);
        assert_eq!(
            format_mac(&[2, 0xe1, 0xcb, 0, 0x71, 1]),
            "02:e1:cb:00:71:01"
        );
    }

    #[test]
    fn namespace_lifecycle_kills_what_it_started() {
        let Some(ns) = netns() else { return };
        let name = ns.name().to_string();
        assert!(name.starts_with(&format!("enilab-test-{}-", std::process::id())));
        assert!(listed(&name));
        let mut server = ns
            .spawn(&["sleep", "1000"], Stdio::null(), Stdio::null())
            .unwrap();
        // A process the namespace did not start itself, left in the
        // background by a command.
        ns.run(
            &["sh", "-c", "sleep 1001 >/dev/null 2>&1 & echo $!"],
            Duration::from_secs(5),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ns.pids().len() < 2 {
            assert!(Instant::now() < deadline, "pids {:?}", ns.pids());
            std::thread::sleep(Duration::from_millis(20));
        }
        let inside = ns.pids();
        assert!(inside.contains(&(server.pid() as i32)), "{inside:?}");
        drop(ns);
        assert!(!listed(&name), "{name} survived its drop");
        assert!(server.try_wait().unwrap().is_some(), "server still runs");
        for p in inside {
            assert!(!sys::pid_alive(p), "pid {p} survived its namespace");
        }
    }

    #[test]
    fn child_dropped_before_namespace_is_stopped() {
        let Some(ns) = netns() else { return };
        let server = ns
            .spawn(&["sleep", "1000"], Stdio::null(), Stdio::null())
            .unwrap();
        let pid = server.pid() as i32;
        assert!(sys::pid_alive(pid));
        drop(server);
        assert!(!sys::pid_alive(pid));
        assert!(ns.children.lock().unwrap().is_empty());
    }

    #[test]
    fn exec_times_out_and_reports_failures() {
        let Some(ns) = netns() else { return };
        let t = Instant::now();
        match ns.exec(&["sleep", "30"], Duration::from_millis(300)) {
            Err(NetnsError::Timeout(..)) => {}
            other => panic!("expected a timeout: {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(ns.pids().is_empty(), "{:?}", ns.pids());
        match ns.run(&["false"], Duration::from_secs(5)) {
            Err(NetnsError::Failed { .. }) => {}
            other => panic!("expected a failure: {other:?}"),
        }
        assert!(matches!(
            ns.exec(&[], Duration::from_secs(1)),
            Err(NetnsError::BadArg(..))
        ));
        assert!(matches!(ns.set_up("-x"), Err(NetnsError::BadArg(..))));
        // The namespace has its own loopback and nothing else.
        let out = ns
            .run(&["ip", "-o", "link"], Duration::from_secs(5))
            .unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        assert_eq!(ns.mac("lo").unwrap(), [0; 6]);
    }

    #[test]
    fn stale_namespaces_are_swept() {
        let Some(ns) = netns() else { return };
        drop(ns);
        // A namespace named after a PID that cannot be alive.
        let stale = format!("enilab-sweep-{}-0", i32::MAX);
        host(&["ip", "netns", "add", &stale]).unwrap();
        let ours = Netns::create("enilab-sweep").unwrap();
        assert_eq!(Netns::sweep_stale("enilab-sweep"), 1);
        assert!(!listed(&stale));
        assert!(listed(ours.name()), "a live process's namespace was swept");
    }
}

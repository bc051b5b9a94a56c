//! The interface watcher: every new `ethN` is brought up and handed to
//! busybox `udhcpc`; interfaces that disappear are forgotten (their udhcpc
//! is stopped) and get DHCP again if they come back.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the watcher looks and what it runs.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// `/sys/class/net`.
    pub sysfs: PathBuf,
    /// The udhcpc event script.
    pub script: PathBuf,
    /// Directory for per-interface logs (`<if>.log`); the script writes
    /// `<if>.lease` there too.
    pub state_dir: PathBuf,
    pub interval: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            sysfs: PathBuf::from("/sys/class/net"),
            script: PathBuf::from("/usr/share/udhcpc/default.script"),
            state_dir: PathBuf::from("/run/enilab/net"),
            interval: Duration::from_millis(300),
        }
    }
}

/// Interfaces the watcher manages: `eth` followed by digits.
pub fn is_managed(name: &str) -> bool {
    name.strip_prefix("eth")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Managed interfaces present now, with their ifindex (a re-plugged
/// interface gets a new one).
pub fn scan(sysfs: &Path) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let Ok(rd) = fs::read_dir(sysfs) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_managed(&name) {
            continue;
        }
        let idx = fs::read_to_string(e.path().join("ifindex"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        out.insert(name, idx);
    }
    out
}

/// What changed between two scans.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

pub fn diff(old: &BTreeMap<String, u32>, new: &BTreeMap<String, u32>) -> Diff {
    let mut d = Diff::default();
    for (name, idx) in old {
        if new.get(name) != Some(idx) {
            d.removed.push(name.clone());
        }
    }
    for (name, idx) in new {
        if old.get(name) != Some(idx) {
            d.added.push(name.clone());
        }
    }
    d
}

struct Managed {
    ifindex: u32,
    dhcp: Option<Child>,
    /// When to (re)start udhcpc if it is not running.
    restart_at: Option<Instant>,
}

fn log(msg: &str) {
    eprintln!("enilab-agent: net: {msg}");
}

fn start_dhcp(cfg: &NetConfig, ifname: &str) -> Option<Child> {
    let _ = Command::new("ip")
        .args(["link", "set", "dev", ifname, "up"])
        .stdin(Stdio::null())
        .status();
    let _ = fs::create_dir_all(&cfg.state_dir);
    let logf = fs::File::create(cfg.state_dir.join(format!("{ifname}.log")));
    let (o, e) = match logf.and_then(|f| Ok((f.try_clone()?, f))) {
        Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
        Err(_) => (Stdio::null(), Stdio::null()),
    };
    let script = cfg.script.to_string_lossy().into_owned();
    let r = Command::new("udhcpc")
        .args([
            "-f", "-i", ifname, "-t", "10", "-T", "1", "-A", "1", "-O", "mtu", "-s", &script,
        ])
        .stdin(Stdio::null())
        .stdout(o)
        .stderr(e)
        .spawn();
    match r {
        Ok(c) => {
            log(&format!("{ifname}: link up, udhcpc pid {}", c.id()));
            Some(c)
        }
        Err(err) => {
            log(&format!("{ifname}: cannot start udhcpc: {err}"));
            None
        }
    }
}

fn stop_dhcp(m: &mut Managed) {
    if let Some(mut c) = m.dhcp.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Runs the watcher until `stop` is set.
pub fn watch(cfg: NetConfig, stop: Arc<AtomicBool>) {
    let mut managed: BTreeMap<String, Managed> = BTreeMap::new();
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        let now = scan(&cfg.sysfs);
        let d = diff(&seen, &now);
        for name in &d.removed {
            if let Some(mut m) = managed.remove(name) {
                log(&format!(
                    "{name}: gone (ifindex {}), forgetting it",
                    m.ifindex
                ));
                stop_dhcp(&mut m);
                let _ = fs::remove_file(cfg.state_dir.join(format!("{name}.lease")));
            }
        }
        for name in &d.added {
            let ifindex = now[name];
            log(&format!("{name}: appeared (ifindex {ifindex})"));
            let dhcp = start_dhcp(&cfg, name);
            let restart_at = dhcp
                .is_none()
                .then(|| Instant::now() + Duration::from_secs(1));
            managed.insert(
                name.clone(),
                Managed {
                    ifindex,
                    dhcp,
                    restart_at,
                },
            );
        }
        seen = now;
        for (name, m) in managed.iter_mut() {
            if let Some(c) = m.dhcp.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    log(&format!("{name}: udhcpc exited ({st}); restarting in 1 s"));
                    m.dhcp = None;
                    m.restart_at = Some(Instant::now() + Duration::from_secs(1));
                }
            } else if m.restart_at.is_some_and(|t| Instant::now() >= t) {
                m.dhcp = start_dhcp(&cfg, name);
                m.restart_at = m
                    .dhcp
                    .is_none()
                    .then(|| Instant::now() + Duration::from_secs(1));
            }
        }
        std::thread::sleep(cfg.interval);
    }
    for m in managed.values_mut() {
        stop_dhcp(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_names() {
        assert!(is_managed("eth0"));
        assert!(is_managed("eth12"));
        assert!(!is_managed("eth"));
        assert!(!is_managed("lo"));
        assert!(!is_managed("eth0.100"));
        assert!(!is_managed("veth0"));
    }

    #[test]
    fn diff_tracks_replug() {
        let a: BTreeMap<String, u32> = [("eth0".to_string(), 2), ("eth1".to_string(), 3)].into();
        let b: BTreeMap<String, u32> = [
            ("eth0".to_string(), 2),
            ("eth1".to_string(), 5),
            ("eth2".to_string(), 6),
        ]
        .into();
        let d = diff(&a, &b);
        assert_eq!(d.removed, vec!["eth1".to_string()]);
        assert_eq!(d.added, vec!["eth1".to_string(), "eth2".to_string()]);
        let d = diff(&b, &BTreeMap::new());
        assert_eq!(d.removed.len(), 3);
        assert!(d.added.is_empty());
    }

    #[test]
    fn scans_fake_sysfs() {
        let dir = std::env::temp_dir().join(format!("enilab-agent-net-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (n, i) in [("lo", 1), ("eth0", 2), ("eth3", 9)] {
            fs::create_dir_all(dir.join(n)).unwrap();
            fs::write(dir.join(n).join("ifindex"), format!("{i}\n")).unwrap();
        }
        let s = scan(&dir);
        assert_eq!(s, [("eth0".to_string(), 2), ("eth3".to_string(), 9)].into());
        fs::remove_dir_all(&dir).unwrap();
    }
}

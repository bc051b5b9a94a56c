//! Accelerator choice: KVM when a short probe boot proves it works, TCG
//! otherwise. The verdict is cached per machine (keyed by QEMU, kernel and
//! initrd identity) so the probe runs once.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::sys::{log_tail, unique_suffix};
use super::QemuBinary;

/// Env var forcing the accelerator (`kvm` or `tcg`).
const ENV_ACCEL: &str = "ENILAB_ACCEL";
/// Env var overriding the state directory (accelerator cache).
const ENV_STATE_DIR: &str = "ENILAB_STATE_DIR";
/// How long the KVM probe boot may take to reach userspace.
const PROBE_TIMEOUT: Duration = Duration::from_secs(8);
/// Name of the cache file inside the state directory.
const CACHE_FILE: &str = "accel.json";
/// Kernel messages showing the probe guest reached userspace.
const USERSPACE_MARKERS: &[&str] = &[" as init process", "Freeing unused kernel image"];

/// QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's translator, one host thread for all vCPUs (see
    /// [`Accel::qemu_accel_arg`]).
    Tcg,
}

impl Accel {
    /// Value of QEMU's `-accel` option. TCG runs single-threaded
    /// (round-robin over the vCPUs): with `thread=multi`, some 2-vCPU
    /// guests under host load kept one vCPU halted for good, deaf to its
    /// local APIC timer (RCU stall, then a boot or agent hang). The runs
    /// are counted in docs/qemu.md, "TCG threading".
    pub fn qemu_accel_arg(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg,thread=single",
        }
    }

    /// CPU model used when the spec names none: `host` under KVM, `max`
    /// under TCG (every feature TCG can emulate).
    pub fn default_cpu(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }

    /// `kvm` / `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?} (expected kvm or tcg)"
            )),
        }
    }
}

/// The accelerator decision with its CPU model and the reason, for logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelChoice {
    /// Chosen accelerator.
    pub accel: Accel,
    /// CPU model to pass with `-cpu` (`host`, `max` or the `qemu64` fallback).
    pub cpu_model: String,
    /// Why, in one sentence.
    pub reason: String,
    /// True when read from the cache instead of probed now.
    #[serde(skip)]
    pub cached: bool,
}

#[derive(Serialize, Deserialize)]
struct CacheEntry {
    key: String,
    choice: AccelChoice,
}

/// Directory for per-machine state such as the accelerator cache:
/// `$ENILAB_STATE_DIR`, else `/var/tmp/enilab`.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os(ENV_STATE_DIR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/enilab"))
}

/// Pick KVM or TCG for `kernel` + `initrd` (see [`select_accel`]), caching
/// the verdict in [`default_state_dir`].
pub fn probe_accel(qemu: &QemuBinary, kernel: &Path, initrd: &Path) -> Accel {
    select_accel(qemu, kernel, initrd, Some(&default_state_dir())).accel
}

/// `forced` if given (no probe), else [`select_accel`] with the verdict
/// cached in [`default_state_dir`]: what a lab or the daemon boots with.
pub fn choose_accel(
    qemu: &QemuBinary,
    kernel: &Path,
    initrd: &Path,
    forced: Option<Accel>,
) -> AccelChoice {
    match forced {
        Some(a) => AccelChoice {
            accel: a,
            cpu_model: a.default_cpu().to_string(),
            reason: "forced".into(),
            cached: false,
        },
        None => select_accel(qemu, kernel, initrd, Some(&default_state_dir())),
    }
}

/// Full accelerator decision.
///
/// * `ENILAB_ACCEL=kvm|tcg` forces the choice (no probe boot).
/// * Otherwise a cached verdict for the same QEMU, kernel and initrd (path,
///   size, mtime) and the same /dev/kvm availability is reused.
/// * Otherwise, when /dev/kvm can be opened, the kernel is booted under
///   `-accel kvm -cpu host` for up to 8 s; KVM is chosen only if it reaches
///   userspace (`Run /init as init process`).
/// * Else TCG with `-cpu max`, or `qemu64` if this QEMU rejects `max`.
///
/// Never fails: anything unexpected means TCG, with the reason logged.
pub fn select_accel(
    qemu: &QemuBinary,
    kernel: &Path,
    initrd: &Path,
    cache_dir: Option<&Path>,
) -> AccelChoice {
    let choice = decide(qemu, kernel, initrd, cache_dir);
    tracing::info!(
        accel = %choice.accel,
        cpu = %choice.cpu_model,
        cached = choice.cached,
        reason = %choice.reason,
        "QEMU accelerator chosen"
    );
    choice
}

fn decide(
    qemu: &QemuBinary,
    kernel: &Path,
    initrd: &Path,
    cache_dir: Option<&Path>,
) -> AccelChoice {
    if let Some(v) = std::env::var_os(ENV_ACCEL).filter(|v| !v.is_empty()) {
        match v.to_string_lossy().parse::<Accel>() {
            Ok(Accel::Kvm) => {
                return AccelChoice {
                    accel: Accel::Kvm,
                    cpu_model: Accel::Kvm.default_cpu().into(),
                    reason: format!("forced by {ENV_ACCEL}=kvm"),
                    cached: false,
                }
            }
            Ok(Accel::Tcg) => {
                let (cpu, note) = tcg_cpu_model(qemu);
                return AccelChoice {
                    accel: Accel::Tcg,
                    cpu_model: cpu,
                    reason: format!("forced by {ENV_ACCEL}=tcg{note}"),
                    cached: false,
                };
            }
            Err(e) => tracing::warn!("ignoring {ENV_ACCEL}: {e}"),
        }
    }

    let kvm_usable = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    let key = cache_key(qemu, kernel, initrd, kvm_usable.is_ok());
    let cache_path = cache_dir.map(|d| d.join(CACHE_FILE));
    if let (Some(path), Some(key)) = (&cache_path, &key) {
        if let Some(choice) = read_cache(path, key) {
            return choice;
        }
    }

    let kvm_verdict = match &kvm_usable {
        Err(e) => Err(format!("/dev/kvm cannot be opened ({e})")),
        Ok(_) if key.is_none() => Err(format!(
            "no probe boot possible: kernel {} or initrd {} missing",
            kernel.display(),
            initrd.display()
        )),
        Ok(_) => probe_kvm_boot(qemu, kernel, initrd, PROBE_TIMEOUT),
    };
    let choice = match kvm_verdict {
        Ok(how) => AccelChoice {
            accel: Accel::Kvm,
            cpu_model: Accel::Kvm.default_cpu().into(),
            reason: format!("KVM probe boot {how}"),
            cached: false,
        },
        Err(why) => {
            let (cpu, note) = tcg_cpu_model(qemu);
            AccelChoice {
                accel: Accel::Tcg,
                cpu_model: cpu,
                reason: format!("{why}; using TCG{note}"),
                cached: false,
            }
        }
    };
    if let (Some(path), Some(key)) = (&cache_path, key) {
        if let Err(e) = write_cache(path, key, &choice) {
            tracing::warn!(
                "could not cache the accelerator choice in {}: {e}",
                path.display()
            );
        }
    }
    choice
}

/// Identity of the probe inputs; `None` when kernel or initrd is missing.
fn cache_key(qemu: &QemuBinary, kernel: &Path, initrd: &Path, kvm: bool) -> Option<String> {
    let ident = |p: &Path| -> Option<String> {
        let m = fs::metadata(p).ok()?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Some(format!("{} size={} mtime={mtime}", p.display(), m.len()))
    };
    Some(format!(
        "qemu={} {}; kernel={}; initrd={}; kvm={kvm}",
        qemu.path.display(),
        qemu.version,
        ident(kernel)?,
        ident(initrd)?
    ))
}

fn read_cache(path: &Path, key: &str) -> Option<AccelChoice> {
    let text = fs::read_to_string(path).ok()?;
    let entry: CacheEntry = serde_json::from_str(&text).ok()?;
    (entry.key == key).then_some(AccelChoice {
        cached: true,
        ..entry.choice
    })
}

fn write_cache(path: &Path, key: String, choice: &AccelChoice) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let entry = CacheEntry {
        key,
        choice: choice.clone(),
    };
    let mut f = fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string_pretty(&entry)?.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Boot `kernel` under KVM with the serial console to a file; `Ok` when the
/// guest reaches userspace within `timeout`, `Err(reason)` otherwise.
fn probe_kvm_boot(
    qemu: &QemuBinary,
    kernel: &Path,
    initrd: &Path,
    timeout: Duration,
) -> Result<String, String> {
    let dir = std::env::temp_dir().join(format!("enilab-accel-probe-{}", unique_suffix()));
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let result = probe_in(qemu, kernel, initrd, timeout, &dir);
    let _ = fs::remove_dir_all(&dir);
    result
}

fn probe_in(
    qemu: &QemuBinary,
    kernel: &Path,
    initrd: &Path,
    timeout: Duration,
    dir: &Path,
) -> Result<String, String> {
    let console = dir.join("console.log");
    let log_path = dir.join("qemu.log");
    let log = fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let console_opt = console.to_string_lossy().replace(',', ",,");
    let mut child = Command::new(&qemu.path)
        .args([
            "-accel", "kvm", "-cpu", "host", "-m", "256", "-machine", "q35",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-vga",
            "none",
        ])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=7"])
        .args(["-chardev", &format!("file,id=probe0,path={console_opt}")])
        .args(["-serial", "chardev:probe0"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.path.display()))?;
    let start = Instant::now();
    let verdict = loop {
        let text = fs::read_to_string(&console).unwrap_or_default();
        if USERSPACE_MARKERS.iter().any(|m| text.contains(m)) {
            break Ok(format!(
                "reached userspace in {:.1} s",
                start.elapsed().as_secs_f64()
            ));
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                let tail = log_tail(&log_path, 3);
                break Err(format!(
                    "KVM probe QEMU exited ({status}) before the guest reached userspace: {}",
                    one_line(&tail)
                ));
            }
            Ok(None) => {}
            Err(e) => break Err(format!("cannot wait for the KVM probe: {e}")),
        }
        if start.elapsed() >= timeout {
            let how = if text.contains("Linux version") {
                "the kernel started but did not reach userspace"
            } else if text.is_empty() {
                "the guest printed nothing (hangs at boot)"
            } else {
                "the guest did not reach userspace"
            };
            break Err(format!(
                "KVM probe boot failed: {how} within {} s",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    kill_child(&mut child);
    verdict
}

/// `("max", "")` when TCG accepts `-cpu max`, else `("qemu64", note)`.
fn tcg_cpu_model(qemu: &QemuBinary) -> (String, String) {
    match check_tcg_cpu(qemu, "max") {
        Ok(()) => ("max".into(), String::new()),
        Err(e) => {
            tracing::warn!("-cpu max rejected under TCG ({e}); falling back to qemu64");
            (
                "qemu64".into(),
                format!(" (-cpu max rejected: {e}; using qemu64)"),
            )
        }
    }
}

/// Start QEMU paused with `-cpu <model>` under TCG and quit over QMP on
/// stdio; the CPU is realised before the monitor runs, so success means the
/// model works.
fn check_tcg_cpu(qemu: &QemuBinary, model: &str) -> Result<(), String> {
    let mut child = Command::new(&qemu.path)
        .args([
            "-accel", "tcg", "-cpu", model, "-machine", "q35", "-m", "64",
        ])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-S"])
        .args(["-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return if status.success() {
                    Ok(())
                } else {
                    Err(one_line(&err))
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                kill_child(&mut child);
                return Err("QEMU did not quit within 10 s".into());
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// SIGKILL and reap a child we spawned.
fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn one_line(s: &str) -> String {
    let s = s.trim().replace('\n', " | ");
    if s.is_empty() {
        "no output".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_strings() {
        assert_eq!("KVM".parse::<Accel>().unwrap(), Accel::Kvm);
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
        assert!("xen".parse::<Accel>().is_err());
        assert_eq!(Accel::Tcg.qemu_accel_arg(), "tcg,thread=single");
        assert_eq!(Accel::Kvm.qemu_accel_arg(), "kvm");
        assert_eq!(Accel::Tcg.default_cpu(), "max");
        assert_eq!(Accel::Kvm.default_cpu(), "host");
    }

    #[test]
    fn cache_round_trip_and_key_mismatch() {
        let dir = std::env::temp_dir().join(format!("enilab-accel-test-{}", unique_suffix()));
        let path = dir.join(CACHE_FILE);
        let choice = AccelChoice {
            accel: Accel::Tcg,
            cpu_model: "max".into(),
            reason: "test".into(),
            cached: false,
        };
        write_cache(&path, "k1".into(), &choice).unwrap();
        let back = read_cache(&path, "k1").unwrap();
        assert!(back.cached);
        assert_eq!(back.accel, Accel::Tcg);
        assert_eq!(back.cpu_model, "max");
        assert!(read_cache(&path, "k2").is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}

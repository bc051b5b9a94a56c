//! Shared infrastructure of enilab's real-guest integration tests (in the
//! manner of cloud-hypervisor's `test_infra`): prerequisite checks with a
//! skip rule, a [`TestLab`] that always cleans up, [`Guest`] helpers around
//! the guest agent, a [`Testpmd`] wrapper for DPDK's virtio-user frontend,
//! and [`wait_until`].
//!
//! # Skip rule
//!
//! A scenario that lacks its prerequisites (QEMU 10 and `images/out` for
//! guests; `dpdk-testpmd` and hugepages for DPDK) prints `skipped: <reason>`
//! and returns, unless `ENILAB_REQUIRE_GUESTS=1` (resp.
//! `ENILAB_REQUIRE_DPDK=1`) is set, in which case it fails with the reason.
//!
//! # Cleanup
//!
//! Every [`TestLab`] lives under its own short run root
//! (`/tmp/enl-<pid>-<n>`; unix socket paths are limited to 108 bytes). Its
//! `Drop` runs even when the test panics: it tears the lab down, kills by
//! PID whatever QEMU or testpmd it started that is still alive, and removes
//! the run root. On failure it first prints each instance's console tail
//! and QEMU log and copies them to [`FAILED_LOGS`]. Leftovers of test
//! processes that died without unwinding are reaped by the next
//! [`TestLab`]. A watchdog bounds every scenario: at
//! its deadline it kills the lab's processes, so blocked calls fail fast.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use enilab_control::agent::Output;
pub use enilab_control::demo::{parse_ping, PingResult};

pub mod daemon;
pub use daemon::{enilab_bin, extract_all, ApiDaemon, ApiFault};
pub mod tools;
use enilab_control::image::Image;
use enilab_control::lab::{Lab, LabOptions};
use enilab_control::qemu::{self, Accel, AccelChoice, QemuBinary};
pub use tools::{
    http_get, prometheus_parse, python_with, sample_value, tshark, tshark_fields, REQUIRE_API,
};

/// Set to `1` to turn a missing guest prerequisite into a failure.
pub const REQUIRE_GUESTS: &str = "ENILAB_REQUIRE_GUESTS";
/// Set to `1` to turn a missing DPDK prerequisite into a failure.
pub const REQUIRE_DPDK: &str = "ENILAB_REQUIRE_DPDK";
/// 2 MiB hugepages a DPDK scenario needs free (two testpmd with `-m 256`).
pub const DPDK_MIN_FREE_HUGEPAGES: u64 = 512;
/// Prefix of every run root (`/tmp/enl-<pid>-<n>`).
const ROOT_PREFIX: &str = "enl-";
/// Where the logs of a failed scenario's instances are copied before its
/// run root is removed.
pub const FAILED_LOGS: &str = "/tmp/enilab-test-logs";

pub(crate) static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Route `tracing` output (filter `ENILAB_LOG`, default `warn`) through the
/// test harness's capture. Idempotent.
pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("ENILAB_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Poll `cond` every 100 ms until it holds or `timeout` passes. Returns
/// whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Prerequisites and the skip rule
// ---------------------------------------------------------------------------

/// Whether `var` is set to `1`.
fn required(var: &str) -> bool {
    std::env::var(var).map(|v| v.trim() == "1").unwrap_or(false)
}

/// Apply the skip rule to a prerequisite check: `Some(value)` when it
/// passed; otherwise panic when `var=1`, else print `skipped: <reason>`
/// and return `None`.
pub fn require<T>(var: &str, check: Result<T, String>) -> Option<T> {
    match check {
        Ok(v) => Some(v),
        Err(reason) if required(var) => panic!("{var}=1 but {reason}"),
        Err(reason) => {
            eprintln!("skipped: {reason} (set {var}=1 to make this a failure)");
            None
        }
    }
}

/// What a guest scenario needs: QEMU 10, the guest image and the
/// accelerator verdict (probed once per process, cached machine-wide).
#[derive(Debug, Clone)]
pub struct GuestEnv {
    pub qemu: QemuBinary,
    pub image: Image,
    pub accel: AccelChoice,
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Check the guest prerequisites without applying the skip rule.
pub fn guest_prereqs() -> Result<GuestEnv, String> {
    static ENV: OnceLock<Result<GuestEnv, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let qemu = qemu::find_qemu().map_err(|e| format!("QEMU 10 is not available: {e}"))?;
        let dir = std::env::var_os("ENILAB_IMAGE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("images/out"));
        let image = Image::in_dir(&dir).ok_or_else(|| {
            format!(
                "the guest image ({}/vmlinuz, initramfs.img) is not built; run ./setup.sh",
                dir.display()
            )
        })?;
        let accel = qemu::select_accel(
            &qemu,
            &image.kernel,
            &image.initrd,
            Some(&qemu::default_state_dir()),
        );
        eprintln!(
            "guests: {} ({}), accelerator {} ({})",
            qemu.version_line,
            qemu.path.display(),
            accel.accel,
            accel.reason
        );
        Ok(GuestEnv { qemu, image, accel })
    })
    .clone()
}

/// The guest prerequisites under the skip rule ([`REQUIRE_GUESTS`]).
pub fn require_guests() -> Option<GuestEnv> {
    init_logging();
    require(REQUIRE_GUESTS, guest_prereqs())
}

/// What a DPDK scenario needs.
#[derive(Debug, Clone)]
pub struct DpdkEnv {
    pub testpmd: PathBuf,
    pub free_hugepages: u64,
    pub hugetlbfs: PathBuf,
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Check the DPDK prerequisites without applying the skip rule.
pub fn dpdk_prereqs() -> Result<DpdkEnv, String> {
    let testpmd = find_on_path("dpdk-testpmd")
        .ok_or("dpdk-testpmd is not on PATH (Debian package dpdk; run ./setup.sh)")?;
    let free = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if free < DPDK_MIN_FREE_HUGEPAGES {
        return Err(format!(
            "only {free} free 2 MiB hugepages, {DPDK_MIN_FREE_HUGEPAGES} needed \
             (echo 1024 > /proc/sys/vm/nr_hugepages, or ./setup.sh)"
        ));
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let hugetlbfs = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && f[2] == "hugetlbfs" && !f[3].contains("pagesize=1G"))
                .then(|| PathBuf::from(f[1]))
        })
        .next()
        .ok_or(
            "no hugetlbfs with 2 MiB pages is mounted (mount -t hugetlbfs nodev /dev/hugepages)",
        )?;
    Ok(DpdkEnv {
        testpmd,
        free_hugepages: free,
        hugetlbfs,
    })
}

/// The DPDK prerequisites under the skip rule ([`REQUIRE_DPDK`]).
pub fn require_dpdk() -> Option<DpdkEnv> {
    init_logging();
    require(REQUIRE_DPDK, dpdk_prereqs())
}

// ---------------------------------------------------------------------------
// Processes we own
// ---------------------------------------------------------------------------

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid as i32, 0) } == 0
}

fn cmdline_of(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether one of `pid`'s arguments is the directory `dir` or a path
/// under it.
fn mentions_dir(pid: u32, dir: &str) -> bool {
    let under = format!("{}/", dir.trim_end_matches('/'));
    cmdline_of(pid)
        .iter()
        .any(|a| a.trim_end_matches('/') == dir.trim_end_matches('/') || a.contains(&under))
}

/// SIGKILL `pid` if it is alive and its command line mentions the
/// directory `marker` (so a recycled PID of some other process is never
/// hit), then reap it if it is our child. Returns whether a signal was sent.
pub fn kill_if_ours(pid: u32, marker: &str) -> bool {
    if !pid_alive(pid) || !mentions_dir(pid, marker) {
        return false;
    }
    // SAFETY: plain syscall on a PID we checked to be one of ours.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: waitpid on a specific PID with a valid status pointer;
        // fails harmlessly (ECHILD) when it is not our child.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        if r == pid as i32 || (r < 0 && !pid_alive(pid)) {
            break;
        }
        if r < 0 && cmdline_of(pid).is_empty() {
            break; // gone (or a zombie of another parent)
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A child process killed (SIGKILL) and reaped on drop unless it already
/// exited.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    label: String,
}

impl ChildGuard {
    pub fn new(child: Child, label: impl Into<String>) -> Self {
        ChildGuard {
            child: Some(child),
            label: label.into(),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until drop")
    }

    /// Wait up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child_mut();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Send `sig` to the process (only while it has not been reaped).
    pub fn signal(&mut self, sig: i32) {
        let c = self.child_mut();
        if let Ok(None) = c.try_wait() {
            // SAFETY: the PID belongs to our unreaped child, so it cannot
            // have been recycled.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                eprintln!("killing {} (pid {})", self.label, c.id());
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// The lab guard
// ---------------------------------------------------------------------------

/// Remove leftovers of test processes that died without unwinding: run
/// roots whose owner PID is gone; QEMUs still running in them are stopped
/// (recognised by pidfile and command line).
fn reap_stale_roots() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(rd) = std::fs::read_dir("/tmp") else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(rest) = name.strip_prefix(ROOT_PREFIX) else {
                continue;
            };
            let Some(owner) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if owner == std::process::id() || pid_alive(owner) {
                continue;
            }
            let root = e.path();
            if let Ok(insts) = std::fs::read_dir(root.join("instances")) {
                for i in insts.flatten() {
                    if let Ok(Some(q)) = qemu::Instance::adopt(&i.path()) {
                        eprintln!(
                            "stopping a leftover QEMU (pid {}) in {}",
                            q.pid(),
                            root.display()
                        );
                        let _ = q.shutdown(Duration::from_secs(2));
                    }
                }
            }
            // testpmd leftovers: their --file-prefix starts with the root name.
            remove_dpdk_files(&name);
            let _ = std::fs::remove_dir_all(&root);
        }
    });
}

/// Remove DPDK's hugepage files and runtime directories of the run root
/// named `root_name` (file prefixes `<root_name>-<what>`, see
/// [`TestLab::unique`]).
fn remove_dpdk_files(root_name: &str) {
    let prefix = format!("{root_name}-");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "hugetlbfs").then(|| PathBuf::from(f[1]))
        })
        .collect();
    dirs.push(PathBuf::from("/var/run/dpdk"));
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let p = e.path();
                if p.is_dir() {
                    let _ = std::fs::remove_dir_all(&p);
                } else {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }
}

struct Tracked {
    /// PIDs to kill if still alive at the end (QEMU, testpmd).
    pids: Mutex<Vec<u32>>,
    /// Marker every tracked process has on its command line.
    marker: String,
}

impl Tracked {
    fn kill_all(&self) -> usize {
        let pids = self.pids.lock().unwrap_or_else(|e| e.into_inner()).clone();
        pids.into_iter()
            .filter(|&p| kill_if_ours(p, &self.marker))
            .count()
    }
}

/// A [`Lab`] under a private run root that is torn down on drop, panic or
/// not; derefs to the lab.
pub struct TestLab {
    lab: Option<Lab>,
    root: PathBuf,
    tag: String,
    tracked: Arc<Tracked>,
    started: Instant,
    done: Arc<AtomicBool>,
    watchdog: Option<JoinHandle<()>>,
}

impl TestLab {
    fn fresh_root(tag: &str) -> (PathBuf, String) {
        reap_stale_roots();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{ROOT_PREFIX}{}-{n}", std::process::id());
        let root = PathBuf::from("/tmp").join(&name);
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("create the test run root");
        eprintln!("[{tag}] run root {}", root.display());
        (root, name)
    }

    fn options(root: &Path, accel: Option<Accel>) -> LabOptions {
        LabOptions {
            run_root: root.to_path_buf(),
            name: "lab".into(),
            workers_per_card: 1,
            image: None,
            accel,
        }
    }

    fn wrap(lab: Lab, root: PathBuf, tag: &str, budget: Duration) -> TestLab {
        let tracked = Arc::new(Tracked {
            pids: Mutex::new(Vec::new()),
            marker: root.to_string_lossy().into_owned(),
        });
        let done = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let (tracked, done, tag) = (tracked.clone(), done.clone(), tag.to_string());
            std::thread::Builder::new()
                .name(format!("watchdog-{tag}"))
                .spawn(move || {
                    let deadline = Instant::now() + budget;
                    while Instant::now() < deadline {
                        if done.load(Ordering::SeqCst) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    eprintln!(
                        "[{tag}] WATCHDOG: scenario exceeded its budget of {budget:?}; \
                         killing its processes so that it fails"
                    );
                    tracked.kill_all();
                })
                .ok()
        };
        TestLab {
            lab: Some(lab),
            root,
            tag: tag.to_string(),
            tracked,
            started: Instant::now(),
            done,
            watchdog,
        }
    }

    /// A lab that can boot guests. `budget` bounds the whole scenario.
    pub fn with_guests(env: &GuestEnv, tag: &str, budget: Duration) -> TestLab {
        let (root, _) = Self::fresh_root(tag);
        let mut opts = Self::options(&root, Some(env.accel.accel));
        opts.image = Some(env.image.clone());
        let lab = match Lab::new(opts) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&root);
                panic!("[{tag}] cannot create the lab: {e}");
            }
        };
        Self::wrap(lab, root, tag, budget)
    }

    /// A datapath-only lab (no QEMU), for synthetic frontends.
    pub fn datapath_only(tag: &str, budget: Duration) -> TestLab {
        let (root, _) = Self::fresh_root(tag);
        let lab = match Lab::new_datapath(Self::options(&root, None)) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&root);
                panic!("[{tag}] cannot create the datapath: {e}");
            }
        };
        Self::wrap(lab, root, tag, budget)
    }

    pub fn lab(&self) -> &Lab {
        self.lab.as_ref().expect("lab present until drop")
    }

    /// The private run root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A name unique to this lab (for DPDK file prefixes and the like);
    /// starts with the run root's name.
    pub fn unique(&self, what: &str) -> String {
        let base = self
            .root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{base}-{what}")
    }

    /// Kill `pid` (by PID, if it is still ours) when the lab goes away.
    pub fn track_pid(&self, pid: u32) {
        self.tracked
            .pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pid);
    }

    /// Log a step with the time since the lab was created.
    pub fn step(&self, msg: impl AsRef<str>) {
        eprintln!(
            "[{} +{:6.1}s] {}",
            self.tag,
            self.started.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }

    /// Add subnet `10.<x>.<y>.0/24` named after the lab's tag.
    pub fn subnet(&self, net: Ipv4Addr, prefix: u8) -> usize {
        self.lab()
            .add_subnet(&format!("subnet-{}", self.tag), "vpc-test", net, prefix)
            .unwrap_or_else(|e| panic!("add subnet {net}/{prefix}: {e}"))
    }

    /// Create an ENI on card 0.
    pub fn eni(&self, subnet: usize, queue_pairs: u16) -> String {
        self.lab()
            .create_eni(subnet, None, queue_pairs, 0)
            .unwrap_or_else(|e| panic!("create ENI: {e}"))
    }

    /// Boot every spec in parallel (one new ENI each in `subnet`), wait for
    /// each agent, then for DHCP on `eth0`.
    pub fn boot(&self, subnet: usize, specs: &[GuestSpec]) -> Vec<Guest<'_>> {
        let placed: Vec<(usize, GuestSpec)> = specs.iter().map(|s| (subnet, s.clone())).collect();
        self.boot_each(&placed)
    }

    /// Boot every spec in parallel, each with one new ENI in its own
    /// subnet; wait for each agent, then for DHCP on `eth0`.
    pub fn boot_each(&self, placed: &[(usize, GuestSpec)]) -> Vec<Guest<'_>> {
        let specs: Vec<&GuestSpec> = placed.iter().map(|(_, s)| s).collect();
        let enis: Vec<String> = placed
            .iter()
            .map(|(subnet, s)| self.eni(*subnet, s.queue_pairs))
            .collect();
        self.step(format!(
            "booting {}",
            specs
                .iter()
                .map(|s| format!("{} ({} vCPU, {} qp)", s.name, s.vcpus, s.queue_pairs))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = specs
                .iter()
                .zip(&enis)
                .map(|(spec, eni)| {
                    s.spawn(move || {
                        self.lab().launch(
                            &spec.name,
                            std::slice::from_ref(eni),
                            spec.vcpus,
                            spec.memory_mib,
                            spec.boot_timeout,
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        let mut guests = Vec::new();
        for ((spec, eni), r) in specs.iter().zip(&enis).zip(results) {
            match r {
                Ok(Ok(li)) => {
                    self.track_pid(li.qemu.pid());
                    self.step(format!(
                        "{} up (pid {}) in {:.1} s",
                        spec.name,
                        li.qemu.pid(),
                        li.booted_in.as_secs_f64()
                    ));
                }
                Ok(Err(e)) => panic!("[{}] boot {}: {e}", self.tag, spec.name),
                Err(_) => panic!("[{}] boot thread of {} panicked", self.tag, spec.name),
            }
            guests.push(Guest::new(self.lab(), &spec.name, eni));
        }
        for g in &guests {
            g.wait_dhcp(Duration::from_secs(90));
        }
        self.step("DHCP done on every guest");
        guests
    }

    /// The last `lines` lines of an instance's serial console (also after
    /// a failed launch).
    pub fn console_tail(&self, name: &str, lines: usize) -> String {
        daemon::tail(
            &enilab_control::lab::instance_dir(&self.root, name).join("console.log"),
            lines,
        )
    }
}

impl Deref for TestLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.lab()
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if std::thread::panicking() {
            let names: Vec<String> = std::fs::read_dir(self.root.join("instances"))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            let keep = PathBuf::from(FAILED_LOGS).join(self.root.file_name().unwrap_or_default());
            for n in names {
                eprintln!(
                    "---- console of {n} (last 40 lines) ----\n{}",
                    self.console_tail(&n, 40)
                );
                let dir = enilab_control::lab::instance_dir(&self.root, &n);
                let qemu_log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
                if !qemu_log.trim().is_empty() {
                    eprintln!("---- qemu.log of {n} ----\n{}", qemu_log.trim_end());
                }
                let to = keep.join(&n);
                if std::fs::create_dir_all(&to).is_ok() {
                    for f in ["console.log", "qemu.log", "instance.json"] {
                        let _ = std::fs::copy(dir.join(f), to.join(f));
                    }
                    eprintln!("logs of {n} kept in {}", to.display());
                }
            }
        }
        if let Some(lab) = self.lab.take() {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(lab)));
            if r.is_err() {
                eprintln!("[{}] lab teardown panicked", self.tag);
            }
        }
        let killed = self.tracked.kill_all();
        if killed > 0 {
            eprintln!("[{}] killed {killed} leftover process(es)", self.tag);
        }
        if let Some(name) = self.root.file_name() {
            remove_dpdk_files(&name.to_string_lossy());
        }
        let _ = std::fs::remove_dir_all(&self.root);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        eprintln!(
            "[{}] {} after {:.1} s (cleanup included)",
            self.tag,
            if std::thread::panicking() {
                "FAILED"
            } else {
                "done"
            },
            self.started.elapsed().as_secs_f64()
        );
    }
}

// ---------------------------------------------------------------------------
// Guests
// ---------------------------------------------------------------------------

/// One guest to boot.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub queue_pairs: u16,
    pub boot_timeout: Duration,
}

impl GuestSpec {
    /// 1 vCPU, 512 MiB, one queue pair, 120 s to boot (TCG on 2 cores).
    pub fn new(name: &str) -> Self {
        GuestSpec {
            name: name.to_string(),
            vcpus: 1,
            memory_mib: 512,
            queue_pairs: 1,
            boot_timeout: Duration::from_secs(120),
        }
    }

    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }

    pub fn queue_pairs(mut self, n: u16) -> Self {
        self.queue_pairs = n;
        self
    }
}

/// A booted guest with one ENI (`eth0`).
#[derive(Clone)]
pub struct Guest<'a> {
    lab: &'a Lab,
    pub name: String,
    pub eni: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub port: enilab_switch::PortId,
}

impl<'a> Guest<'a> {
    pub fn new(lab: &'a Lab, name: &str, eni: &str) -> Self {
        Guest {
            lab,
            name: name.to_string(),
            eni: eni.to_string(),
            ip: lab.eni_ip(eni).expect("ENI has an address"),
            mac: lab.eni_mac(eni).expect("ENI has a MAC"),
            port: lab.eni_port(eni).expect("ENI has a switch port"),
        }
    }

    /// Run `argv` in the guest; panics on agent errors (not on a non-zero
    /// exit code).
    pub fn exec(&self, argv: &[&str], timeout: Duration) -> Output {
        self.lab
            .exec(&self.name, argv, timeout)
            .unwrap_or_else(|e| panic!("{}: `{}`: {e}", self.name, argv.join(" ")))
    }

    /// Run `script` with `sh -c`.
    pub fn sh(&self, script: &str, timeout: Duration) -> Output {
        self.exec(&["sh", "-c", script], timeout)
    }

    /// Run `script` with `sh -c`, assert exit 0, return stdout.
    pub fn sh_ok(&self, script: &str, timeout: Duration) -> String {
        let out = self.sh(script, timeout);
        assert!(
            out.success(),
            "{}: `{script}` exited {} (timed out: {}):\nstdout: {}\nstderr: {}",
            self.name,
            out.code,
            out.timed_out,
            out.stdout_str(),
            out.stderr_str()
        );
        out.stdout_str()
    }

    /// State of the guest's network and of its ENI, for failure messages.
    pub fn net_diagnostics(&self) -> String {
        let inside = self
            .lab
            .exec(
                &self.name,
                &[
                    "sh",
                    "-c",
                    "ip addr; ip -s link; ethtool -l eth0; grep virtio /proc/interrupts; ps",
                ],
                Duration::from_secs(10),
            )
            .map(|o| o.stdout_str())
            .unwrap_or_else(|e| format!("(nothing from the guest: {e})"));
        format!(
            "{inside}\nswitch port {}: {:?}\nqueues: {:?}\nvhost-user sessions: {:?}",
            self.port,
            self.lab.switch().stats(self.port),
            self.lab.eni_queue_stats(&self.eni),
            self.lab.eni_sessions(&self.eni)
        )
    }

    /// Wait until `eth0` carries the ENI's address. After two thirds of
    /// `timeout` the guest's udhcpc is told to renew (SIGUSR1) once, with a
    /// loud warning, and the wait goes on; on failure, panic with the
    /// interface state and the ENI's counters.
    pub fn wait_dhcp(&self, timeout: Duration) {
        let first = timeout * 2 / 3;
        let Err(e) = self.lab.wait_ip(&self.name, "eth0", self.ip, first) else {
            return;
        };
        eprintln!(
            "WARNING {}: no DHCP lease after {first:?} ({e}); asking udhcpc to renew\n{}",
            self.name,
            self.net_diagnostics()
        );
        let _ = self.lab.exec(
            &self.name,
            &["killall", "-USR1", "udhcpc"],
            Duration::from_secs(10),
        );
        if let Err(e) = self
            .lab
            .wait_ip(&self.name, "eth0", self.ip, timeout - first)
        {
            panic!(
                "{}: DHCP: {e} (also after a renew)\n{}",
                self.name,
                self.net_diagnostics()
            );
        }
        eprintln!("WARNING {}: DHCP needed a renew", self.name);
    }

    /// `ping -c count` to `dst` (0.2 s interval); parsed summary.
    pub fn ping(&self, dst: Ipv4Addr, count: u32) -> PingResult {
        let c = count.to_string();
        let timeout = Duration::from_secs(20 + u64::from(count));
        let out = self.exec(
            &["ping", "-c", &c, "-i", "0.2", "-W", "3", &dst.to_string()],
            timeout,
        );
        parse_ping(&out.stdout_str()).unwrap_or_else(|| {
            panic!(
                "{}: cannot parse ping output:\n{}{}",
                self.name,
                out.stdout_str(),
                out.stderr_str()
            )
        })
    }

    /// Milliseconds since the guest kernel started (a fresh hello).
    pub fn uptime_ms(&self, timeout: Duration) -> Result<u64, String> {
        let mut c = self.lab.client(&self.name).map_err(|e| e.to_string())?;
        c.set_timeout(timeout);
        c.hello().map(|h| h.uptime_ms).map_err(|e| e.to_string())
    }
}

// ---------------------------------------------------------------------------
// DPDK testpmd
// ---------------------------------------------------------------------------

/// Format a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn mac_str(m: &[u8; 6]) -> String {
    enilab_backend::net::format_mac(m)
}

/// Port counters from testpmd's output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestpmdStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// Parse the last `RX-packets:` / `TX-packets:` pair of testpmd's output
/// (the per-port block of `show port stats` or of the final forward
/// statistics).
pub fn parse_testpmd_stats(out: &str) -> Option<TestpmdStats> {
    let num_after = |line: &str, key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let mut rx = None;
    let mut tx = None;
    for line in out.lines() {
        if let Some(v) = num_after(line, "RX-packets:") {
            rx = Some(v);
        }
        if let Some(v) = num_after(line, "TX-packets:") {
            tx = Some(v);
        }
    }
    Some(TestpmdStats {
        rx_packets: rx?,
        tx_packets: tx?,
    })
}

/// A running `dpdk-testpmd` in non-interactive mode: it forwards until its
/// stdin is closed, then prints its statistics and exits.
pub struct Testpmd {
    guard: ChildGuard,
    stdin: Option<ChildStdin>,
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    pub label: String,
}

impl Testpmd {
    /// Start testpmd with EAL arguments `eal` and application arguments
    /// `app`; the PID is tracked by `lab`.
    pub fn spawn(
        lab: &TestLab,
        env: &DpdkEnv,
        label: &str,
        eal: &[String],
        app: &[String],
    ) -> Self {
        // testpmd's stdout is a pipe here: without line buffering its
        // progress ("Press enter to exit") would sit in stdio's buffer.
        let mut cmd = match find_on_path("stdbuf") {
            Some(stdbuf) => {
                let mut c = Command::new(stdbuf);
                c.arg("-oL").arg(&env.testpmd);
                c
            }
            None => Command::new(&env.testpmd),
        };
        cmd.args(eal).arg("--").args(app);
        lab.step(format!(
            "{label}: {} {}",
            cmd.get_program().to_string_lossy(),
            cmd.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", env.testpmd.display()));
        lab.track_pid(child.id());
        let output = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("piped"));
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("piped"));
        for pipe in [stdout, stderr] {
            let out = output.clone();
            readers.push(std::thread::spawn(move || {
                let mut r = BufReader::new(pipe);
                let mut line = String::new();
                while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    out.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&line);
                    line.clear();
                }
            }));
        }
        let stdin = child.stdin.take();
        Testpmd {
            guard: ChildGuard::new(child, format!("testpmd {label}")),
            stdin,
            output,
            readers,
            label: label.to_string(),
        }
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// Wait until the output contains `needle` or the process exits.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.output().contains(needle) {
                return true;
            }
            if let Ok(Some(_)) = self.guard.child_mut().try_wait() {
                return self.output().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Stop forwarding (close stdin: testpmd's "Press enter to exit"),
    /// wait for the exit (SIGINT, then SIGKILL, if it lingers) and return
    /// the whole output.
    pub fn stop(mut self, timeout: Duration) -> String {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"\n");
        }
        if self.guard.wait_timeout(timeout).is_none() {
            eprintln!("{}: no exit after closing stdin; SIGINT", self.label);
            self.guard.signal(libc::SIGINT);
            if self.guard.wait_timeout(Duration::from_secs(5)).is_none() {
                self.guard.signal(libc::SIGKILL);
                let _ = self.guard.wait_timeout(Duration::from_secs(5));
            }
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.output()
    }
}

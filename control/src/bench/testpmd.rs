//! One `dpdk-testpmd` process driven through its interactive prompt.
//!
//! Every process gets its own `--file-prefix`, so its hugepage file and
//! runtime directory can be removed after it exits, and is ended by its
//! own PID only.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::BenchError;

/// Hugepage memory per testpmd, MiB.
pub const MEM_MB: u32 = 256;
/// What the interactive prompt prints once ports are up.
const PROMPT: &str = "testpmd>";

/// One of testpmd's output pipes.
type Pipe = Box<dyn Read + Send>;

/// Where testpmd is and whether hugepages are there.
#[derive(Debug, Clone)]
pub struct DpdkEnv {
    pub testpmd: PathBuf,
    pub hugetlbfs: PathBuf,
    pub free_hugepages: u64,
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// Find testpmd and check that `processes` of them fit in free hugepages.
pub fn probe(processes: u32) -> Result<DpdkEnv, BenchError> {
    let testpmd = on_path("dpdk-testpmd").ok_or(BenchError::NoTestpmd)?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |k: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let free = field("HugePages_Free:");
    let page_kb = field("Hugepagesize:").max(1);
    let need = u64::from(processes) * u64::from(MEM_MB) * 1024 / page_kb;
    if free < need {
        return Err(BenchError::NoHugepages { free, need });
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let hugetlbfs = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "hugetlbfs").then(|| PathBuf::from(f[1]))
        })
        .ok_or(BenchError::NoHugetlbfs)?;
    Ok(DpdkEnv {
        testpmd,
        hugetlbfs,
        free_hugepages: free,
    })
}

/// A running interactive testpmd.
pub struct Testpmd {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<Mutex<String>>,
    errors: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    prefix: String,
    hugetlbfs: PathBuf,
    pub label: String,
}

impl Testpmd {
    /// Start testpmd pinned to `core` (main and forwarding lcore on it)
    /// with `vdevs` and application arguments `app` (`-i` is added).
    pub fn spawn(
        env: &DpdkEnv,
        label: &str,
        prefix: &str,
        core: usize,
        vdevs: &[String],
        app: &[String],
    ) -> Result<Testpmd, BenchError> {
        // stdout is a pipe: line-buffer it so prompts and stats arrive.
        let mut cmd = match on_path("stdbuf") {
            Some(s) => {
                let mut c = Command::new(s);
                c.arg("-oL").arg(&env.testpmd);
                c
            }
            None => Command::new(&env.testpmd),
        };
        cmd.arg(format!("--lcores=0@{core},1@{core}"))
            .args(["--no-pci", "--single-file-segments", "--no-telemetry", "-m"])
            .arg(MEM_MB.to_string())
            .arg(format!("--file-prefix={prefix}"));
        for v in vdevs {
            cmd.arg("--vdev").arg(v);
        }
        cmd.arg("--").arg("-i").args(app);
        tracing::info!(label, ?cmd, "starting testpmd");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| BenchError::Spawn(env.testpmd.clone(), e))?;
        // stdout and stderr apart: an EAL warning on stderr must not split
        // the prompt we wait for on stdout.
        let output = Arc::new(Mutex::new(String::new()));
        let errors = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        let pipes: [(Option<Pipe>, &Arc<Mutex<String>>); 2] = [
            (
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
                &output,
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
                &errors,
            ),
        ];
        for (pipe, sink) in pipes {
            let Some(pipe) = pipe else { continue };
            let out = sink.clone();
            readers.push(std::thread::spawn(move || {
                // Raw chunks, not lines: the prompt ends without a newline.
                let mut pipe = pipe;
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    out.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }));
        }
        let stdin = child.stdin.take();
        let mut t = Testpmd {
            child,
            stdin,
            output,
            errors,
            readers,
            prefix: prefix.to_string(),
            hugetlbfs: env.hugetlbfs.clone(),
            label: label.to_string(),
        };
        if !t.wait_for(PROMPT, 0, Duration::from_secs(40)) {
            return Err(BenchError::Testpmd(label.to_string(), t.tail(30)));
        }
        Ok(t)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn out_len(&self) -> usize {
        self.output.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The last `n` lines of stdout and of stderr, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let errs = self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut t = String::new();
        for (name, text) in [("stdout", self.output()), ("stderr", errs)] {
            let lines: Vec<&str> = text.lines().collect();
            t.push_str(&format!("--- {name}\n"));
            t.push_str(&lines[lines.len().saturating_sub(n)..].join("\n"));
            t.push('\n');
        }
        t
    }

    /// Wait until `needle` appears after byte `from` of the output, or
    /// the process exits.
    fn wait_for(&mut self, needle: &str, from: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .output()
                .get(from..)
                .is_some_and(|s| s.contains(needle))
            {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Send one command and wait for the next prompt; returns what it
    /// printed.
    pub fn cmd(&mut self, line: &str, timeout: Duration) -> Result<String, BenchError> {
        let from = self.out_len();
        let sent = self.stdin.as_mut().map(|s| {
            s.write_all(format!("{line}\n").as_bytes())
                .and_then(|_| s.flush())
        });
        if !matches!(sent, Some(Ok(()))) || !self.wait_for(PROMPT, from, timeout) {
            return Err(BenchError::Testpmd(
                format!("{}: `{line}`", self.label),
                self.tail(30),
            ));
        }
        Ok(self.output().get(from..).unwrap_or_default().to_string())
    }

    /// RX packets over all ports.
    pub fn rx_packets(&mut self) -> Result<u64, BenchError> {
        let out = self.cmd("show port stats all", Duration::from_secs(10))?;
        Ok(sum_field(&out, "RX-packets:"))
    }

    /// Quit, then SIGTERM and SIGKILL this PID if it lingers; remove its
    /// hugepage file and runtime directory.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"stop\nquit\n");
        }
        let pid = self.child.id() as libc::pid_t;
        for sig in [0, libc::SIGTERM, libc::SIGKILL] {
            if sig != 0 {
                // SAFETY: kill(2) on the PID of our own child, which is not
                // reaped yet (try_wait below reaps it), so the PID cannot
                // have been reused by another process.
                unsafe { libc::kill(pid, sig) };
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    self.cleanup_files();
                    for r in self.readers.drain(..) {
                        let _ = r.join();
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        tracing::warn!(label = %self.label, "testpmd did not exit");
    }

    fn cleanup_files(&self) {
        remove_prefix_files(&self.hugetlbfs, &self.prefix);
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        if self.stdin.is_some() || matches!(self.child.try_wait(), Ok(None)) {
            self.shutdown();
        }
    }
}

/// Remove the hugepage files and runtime directory of `--file-prefix`.
pub fn remove_prefix_files(hugetlbfs: &Path, prefix: &str) {
    if let Ok(rd) = std::fs::read_dir(hugetlbfs) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    for base in ["/var/run/dpdk", "/run/dpdk"] {
        let _ = std::fs::remove_dir_all(Path::new(base).join(prefix));
    }
}

/// Sum of the number after every `key` in `text`.
pub fn sum_field(text: &str, key: &str) -> u64 {
    let mut total = 0u64;
    for line in text.lines() {
        let mut rest = line;
        while let Some(i) = rest.find(key) {
            rest = &rest[i + key.len()..];
            if let Some(v) = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
            {
                total = total.saturating_add(v);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_stats_fields() {
        let out = "  ######################## NIC statistics for port 0  ########################\n  RX-packets: 3425536    RX-missed: 0          RX-bytes:  219234304\n  Rx-pps:       939695          Rx-bps:    481124016\n  Tx-pps:       939695          Tx-bps:    481124016\n  RX-packets: 10    RX-missed: 0\n  Rx-pps:            5          Rx-bps:            0\n";
        let cases: &[(&str, u64)] = &[
            ("Rx-pps:", 939_700),
            ("Tx-pps:", 939_695),
            ("RX-packets:", 3_425_546),
            ("Rx-bps:", 481_124_016),
            ("Nope:", 0),
        ];
        for (key, want) in cases {
            assert_eq!(sum_field(out, key), *want, "{key}");
        }
    }
}

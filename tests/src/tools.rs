//! Outside tools the observability tests check against: the reference
//! Prometheus parser (Python `prometheus_client`), tshark, and a minimal
//! HTTP GET.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::workspace_root;

/// Makes a missing Python module (prometheus_client) a failure.
pub const REQUIRE_API: &str = "ENILAB_REQUIRE_API";

/// A Python interpreter that can import `module`: $ENILAB_PYTHON, the
/// setup.sh venv (.venv-api), python3.
pub fn python_with(module: &str) -> Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("ENILAB_PYTHON") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(workspace_root().join(".venv-api/bin/python3"));
    candidates.push(PathBuf::from("python3"));
    let mut why = Vec::new();
    for c in candidates {
        match Command::new(&c)
            .args(["-c", &format!("import {module}")])
            .output()
        {
            Ok(o) if o.status.success() => return Ok(c),
            Ok(_) => why.push(format!("{}: no {module}", c.display())),
            Err(e) => why.push(format!("{}: {e}", c.display())),
        }
    }
    Err(format!(
        "no python3 with {module} ({}); run ./setup.sh",
        why.join("; ")
    ))
}

/// Parse `text` with prometheus_client's parser: the families as JSON
/// (`[{"name","type","help","samples":[{"name","labels","value"}]}]`), or
/// the parser's complaint.
pub fn prometheus_parse(python: &Path, text: &str) -> Result<serde_json::Value, String> {
    let script = workspace_root().join("tests/api/check_metrics.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(text.as_bytes())
            .map_err(|e| format!("cannot feed the parser: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("parser: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("parser output: {e}"))
}

/// The value of the sample `name` whose labels include every `labels`
/// pair, in parsed families.
pub fn sample_value(
    families: &serde_json::Value,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    families
        .as_array()?
        .iter()
        .flat_map(|f| f["samples"].as_array().into_iter().flatten())
        .find(|s| {
            s["name"] == name
                && labels
                    .iter()
                    .all(|(k, v)| s["labels"][*k].as_str() == Some(*v))
        })
        .and_then(|s| s["value"].as_f64())
}

/// GET `path` over HTTP/1.0; (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    Ok((status, buf[end + 4..].to_vec()))
}

/// `tshark -r FILE -T fields -e F1 -e F2 …`: one Vec per packet.
pub fn tshark_fields(file: &Path, fields: &[&str]) -> Result<Vec<Vec<String>>, String> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(file).args(["-T", "fields"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().map_err(|e| format!("tshark: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tshark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect())
}

/// Is tshark installed?
pub fn tshark() -> Result<(), String> {
    match Command::new("tshark").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("tshark is not installed (./setup.sh installs it)".into()),
    }
}

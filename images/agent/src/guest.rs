//! Guest-side helpers: the kernel command line, the hello, and finding the
//! virtio-serial port without udev.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::proto::{Hello, PROTOCOL_VERSION};
use crate::sys;

/// Splits a kernel command line into words (double quotes group words).
pub fn cmdline_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

/// Every `enilab.KEY=VALUE` (or bare `enilab.KEY`, value "") on the command
/// line, keyed without the prefix. Later words win.
pub fn enilab_params(cmdline: &str) -> BTreeMap<String, String> {
    cmdline_words(cmdline)
        .into_iter()
        .filter_map(|w| {
            let rest = w.strip_prefix("enilab.")?;
            let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
            (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// `enilab.*` parameters of the running kernel.
pub fn kernel_params() -> BTreeMap<String, String> {
    enilab_params(&fs::read_to_string("/proc/cmdline").unwrap_or_default())
}

/// The hello describing this system; `boot_ms` is the uptime at agent start.
pub fn system_hello(boot_ms: u64) -> Hello {
    let params = kernel_params();
    Hello {
        id: None,
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL_VERSION,
        hostname: sys::hostname(),
        kernel: sys::kernel_release(),
        boot_ms,
        uptime_ms: sys::uptime_ms(),
        instance: params.get("instance").cloned(),
        params,
        pid: std::process::id(),
    }
}

/// Where a named virtio-serial port lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Kernel name, e.g. `vport2p1`.
    pub kname: String,
    pub major: u32,
    pub minor: u32,
}

/// Looks for the port called `name` under `sysfs_ports`
/// (`/sys/class/virtio-ports`).
pub fn find_port(sysfs_ports: &Path, name: &str) -> Option<PortInfo> {
    let mut entries: Vec<PathBuf> = fs::read_dir(sysfs_ports)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for dir in entries {
        let Ok(n) = fs::read_to_string(dir.join("name")) else {
            continue;
        };
        if n.trim() != name {
            continue;
        }
        let dev = fs::read_to_string(dir.join("dev")).ok()?;
        let (ma, mi) = dev.trim().split_once(':')?;
        return Some(PortInfo {
            kname: dir.file_name()?.to_string_lossy().into_owned(),
            major: ma.parse().ok()?,
            minor: mi.parse().ok()?,
        });
    }
    None
}

/// Makes sure `/dev/<kname>` exists (devtmpfs normally creates it) and
/// adds the udev-style `/dev/virtio-ports/<name>` link. Returns the node.
pub fn ensure_node(port: &PortInfo, name: &str) -> io::Result<PathBuf> {
    let node = Path::new("/dev").join(&port.kname);
    if !node.exists() {
        let c = CString::new(node.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let dev = libc::makedev(port.major, port.minor);
        // SAFETY: `c` is a NUL-terminated path; mknod takes plain integers otherwise.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, dev) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
    }
    let _ = fs::create_dir_all("/dev/virtio-ports");
    let link = Path::new("/dev/virtio-ports").join(name);
    if fs::read_link(&link).ok().as_deref() != Some(Path::new(&format!("../{}", port.kname))) {
        let _ = fs::remove_file(&link);
        let _ = std::os::unix::fs::symlink(format!("../{}", port.kname), &link);
    }
    Ok(node)
}

/// Opens a character device read-write, non-blocking, close-on-exec.
pub fn open_rw(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let flags = libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    // SAFETY: `c` is a valid NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Finds, creates if needed and opens the agent port. `Ok(None)` when the
/// port does not exist (yet).
pub fn open_port(name: &str) -> io::Result<Option<(PathBuf, OwnedFd)>> {
    let Some(port) = find_port(Path::new("/sys/class/virtio-ports"), name) else {
        return Ok(None);
    };
    let node = ensure_node(&port, name)?;
    let fd = open_rw(&node)?;
    Ok(Some((node, fd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cmdline() {
        let c = "console=ttyS0 panic=-1 enilab.instance=i-123 enilab.debug quiet enilab.note=\"a b\" enilab.=x\n";
        let p = enilab_params(c);
        assert_eq!(p.get("instance").map(String::as_str), Some("i-123"));
        assert_eq!(p.get("debug").map(String::as_str), Some(""));
        assert_eq!(p.get("note").map(String::as_str), Some("a b"));
        assert_eq!(p.len(), 3);
        assert_eq!(cmdline_words("  a  b\t\"c d\"  "), vec!["a", "b", "c d"]);
    }

    #[test]
    fn finds_port_in_fake_sysfs() {
        let dir = std::env::temp_dir().join(format!("enilab-agent-sysfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (k, n, d) in [
            ("vport1p0", "", "250:0"),
            ("vport1p1", "org.enilab.agent\n", "250:1"),
            ("vport1p2", "other", "250:2"),
        ] {
            fs::create_dir_all(dir.join(k)).unwrap();
            fs::write(dir.join(k).join("name"), n).unwrap();
            fs::write(dir.join(k).join("dev"), format!("{d}\n")).unwrap();
        }
        let p = find_port(&dir, "org.enilab.agent").unwrap();
        assert_eq!(
            p,
            PortInfo {
                kname: "vport1p1".into(),
                major: 250,
                minor: 1
            }
        );
        assert!(find_port(&dir, "nope").is_none());
        assert!(find_port(&dir.join("missing"), "org.enilab.agent").is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}

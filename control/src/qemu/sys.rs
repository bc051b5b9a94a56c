//! Small OS helpers: log tails, unix socket listeners, process identity and
//! signals (only ever to a PID we started or verified).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Last `n` lines of a text file ("" if unreadable).
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    let Ok(bytes) = fs::read(path) else {
        return String::new();
    };
    // Only look at the last 64 KiB.
    let start = bytes.len().saturating_sub(64 * 1024);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Unique suffix for temporary names within this process.
pub(crate) fn unique_suffix() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// State of a unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SocketState {
    /// No file at the path.
    Missing,
    /// A file that is not a socket.
    NotASocket,
    /// A socket file nobody listens on (stale).
    Stale,
    /// A socket with a listener.
    Listening,
    /// A socket; whether anyone listens could not be told.
    Unknown,
}

/// Tell, without connecting, whether someone listens on the unix socket at
/// `path`, from `/proc/net/unix` (listening sockets carry the
/// `__SO_ACCEPTCON` flag 0x10000 and their bind path).
pub(crate) fn unix_socket_state(path: &Path) -> SocketState {
    use std::os::unix::fs::FileTypeExt;
    match fs::symlink_metadata(path) {
        Err(_) => return SocketState::Missing,
        Ok(m) if !m.file_type().is_socket() => return SocketState::NotASocket,
        Ok(_) => {}
    }
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return SocketState::Unknown;
    };
    let wanted = candidates(path);
    let file_name = path.file_name();
    let mut relative_namesake = false;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.splitn(8, ' ').collect();
        if fields.len() < 8 {
            continue;
        }
        let listening = u32::from_str_radix(fields[3], 16)
            .map(|f| f & 0x10000 != 0)
            .unwrap_or(false);
        if !listening {
            continue;
        }
        let bound = Path::new(fields[7].trim_end());
        if wanted.iter().any(|w| w == bound) {
            return SocketState::Listening;
        }
        if bound.is_relative() && bound.file_name() == file_name {
            relative_namesake = true;
        }
    }
    if relative_namesake {
        SocketState::Unknown
    } else {
        SocketState::Stale
    }
}

/// `path`, its absolute form and its canonical form.
fn candidates(path: &Path) -> Vec<PathBuf> {
    let mut v = vec![path.to_path_buf()];
    if path.is_relative() {
        if let Ok(cwd) = std::env::current_dir() {
            v.push(cwd.join(path));
        }
    }
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(c) = fs::canonicalize(dir) {
            v.push(c.join(name));
        }
    }
    v
}

/// Whether process `pid` exists and is not a zombie.
pub(crate) fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .map(|state| state != "Z" && state != "X")
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Whether live process `pid` is a QEMU started with `-pidfile <pidfile>`:
/// the check made before adopting or signalling a process we did not spawn.
pub(crate) fn pid_is_qemu_of(pid: i32, pidfile: &Path) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let want = pidfile.as_os_str().as_encoded_bytes();
    let is_qemu = args
        .first()
        .map(|a| String::from_utf8_lossy(a).contains("qemu"))
        .unwrap_or(false);
    is_qemu && args.windows(2).any(|w| w[0] == b"-pidfile" && w[1] == want)
}

/// Send `sig` to `pid`. Callers guarantee `pid` is the QEMU they started or
/// verified with [`pid_is_qemu_of`].
pub(crate) fn signal(pid: i32, sig: i32) -> std::io::Result<()> {
    if pid <= 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours;
    // pid > 0 so it targets exactly one process, never a group.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Read a pidfile.
pub(crate) fn read_pidfile(path: &Path) -> Option<i32> {
    fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&p: &i32| p > 0)
}

/// Remove a file, ignoring "not found".
pub(crate) fn remove_if_exists(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::debug!("cannot remove {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn socket_states() {
        let dir = std::env::temp_dir().join(format!("enilab-sys-test-{}", unique_suffix()));
        fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        assert_eq!(unix_socket_state(&sock), SocketState::Missing);
        fs::write(&sock, b"x").unwrap();
        assert_eq!(unix_socket_state(&sock), SocketState::NotASocket);
        fs::remove_file(&sock).unwrap();
        let l = UnixListener::bind(&sock).unwrap();
        assert_eq!(unix_socket_state(&sock), SocketState::Listening);
        drop(l); // leaves the file behind
        assert_eq!(unix_socket_state(&sock), SocketState::Stale);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tail_and_pids() {
        let dir = std::env::temp_dir().join(format!("enilab-sys-test-{}", unique_suffix()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("log");
        fs::write(&f, "a\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&f, 2), "c\nd");
        assert_eq!(log_tail(&dir.join("none"), 2), "");
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(0));
        // We are not a QEMU.
        assert!(!pid_is_qemu_of(std::process::id() as i32, &f));
        fs::write(&f, "1234\n").unwrap();
        assert_eq!(read_pidfile(&f), Some(1234));
        fs::remove_dir_all(&dir).unwrap();
    }
}

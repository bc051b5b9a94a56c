//! Locating `qemu-system-x86_64` and checking its version.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{QemuError, Result};

/// Oldest QEMU major version enilab accepts. Bookworm's 7.2 segfaults in
/// `msix_set_vector_notifiers` once a TCG guest starts a vhost-user
/// virtio-net device with MSI-X; 10.0.2 from bookworm-backports works.
pub const MIN_QEMU_MAJOR: u32 = 10;

/// Name of the binary searched on `PATH`.
const BINARY_NAME: &str = "qemu-system-x86_64";

/// Environment variable overriding the binary path.
const ENV_QEMU: &str = "ENILAB_QEMU";

/// A QEMU version triple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.micro != 0 {
            write!(f, ".{}", self.micro)?;
        }
        Ok(())
    }
}

/// A located, version-checked QEMU binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBinary {
    /// Absolute path of `qemu-system-x86_64`.
    pub path: PathBuf,
    /// Parsed version.
    pub version: QemuVersion,
    /// First line of `--version`, e.g. `QEMU emulator version 10.0.2 (Debian ...)`.
    pub version_line: String,
}

impl QemuBinary {
    /// Check a specific binary: run `--version`, parse, enforce the minimum.
    pub fn from_path(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(QemuError::BinaryMissing {
                cause: format!("{} does not exist", path.display()),
            });
        }
        let out = Command::new(path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| QemuError::BinaryUnusable {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(QemuError::BinaryUnusable {
                path: path.to_path_buf(),
                detail: format!(
                    "`--version` exited with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        let version = parse_version(&text).ok_or_else(|| QemuError::BinaryUnusable {
            path: path.to_path_buf(),
            detail: format!("unrecognised `--version` output {:?}", text.trim()),
        })?;
        if version.major < MIN_QEMU_MAJOR {
            let why = if (version.major, version.minor) == (7, 2) {
                "7.2".to_string()
            } else {
                format!("QEMU before {MIN_QEMU_MAJOR} (bookworm's 7.2 for one)")
            };
            return Err(QemuError::VersionTooOld {
                path: path.to_path_buf(),
                found: version,
                why,
            });
        }
        Ok(QemuBinary {
            path: path.to_path_buf(),
            version,
            version_line: text.lines().next().unwrap_or_default().trim().to_string(),
        })
    }
}

/// Locate `qemu-system-x86_64` (`$ENILAB_QEMU` overrides the `PATH` search),
/// run `--version` and refuse anything older than QEMU 10.
pub fn find_qemu() -> Result<QemuBinary> {
    if let Some(p) = std::env::var_os(ENV_QEMU).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(p);
        if !path.exists() {
            return Err(QemuError::BinaryMissing {
                cause: format!("{ENV_QEMU}={} does not exist", path.display()),
            });
        }
        return QemuBinary::from_path(&path);
    }
    let path = search_path(BINARY_NAME).ok_or_else(|| QemuError::BinaryMissing {
        cause: format!("no {BINARY_NAME} on PATH (package qemu-system-x86 is not installed)"),
    })?;
    QemuBinary::from_path(&path)
}

fn search_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Parse QEMU's `--version` output (`QEMU emulator version 10.0.2 (Debian
/// 1:10.0.2+ds-2~bpo12+1)`). Returns `None` when no version is found.
pub fn parse_version(text: &str) -> Option<QemuVersion> {
    let line = text.lines().find(|l| l.contains("version"))?;
    let rest = &line[line.find("version")? + "version".len()..];
    let token = rest.split_whitespace().next()?;
    let mut parts = token
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let micro = parts.next().flatten().unwrap_or(0);
    Some(QemuVersion {
        major,
        minor,
        micro,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_debian_backports_version() {
        let v = parse_version(
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n\
             Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n",
        )
        .unwrap();
        assert_eq!(
            v,
            QemuVersion {
                major: 10,
                minor: 0,
                micro: 2
            }
        );
        assert_eq!(v.to_string(), "10.0.2");
    }

    #[test]
    fn parses_bookworm_version_and_orders() {
        let v =
            parse_version("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u12)").unwrap();
        assert_eq!((v.major, v.minor, v.micro), (7, 2, 15));
        assert!(v.major < MIN_QEMU_MAJOR);
        let v = parse_version("QEMU emulator version 9.2.0").unwrap();
        assert_eq!(v.to_string(), "9.2");
        assert!(parse_version("not qemu").is_none());
    }

    #[test]
    fn too_old_message_is_explicit() {
        let e = QemuError::VersionTooOld {
            path: "/usr/bin/qemu-system-x86_64".into(),
            found: QemuVersion {
                major: 7,
                minor: 2,
                micro: 0,
            },
            why: "7.2".into(),
        };
        assert_eq!(
            e.to_string(),
            "QEMU 7.2 found at /usr/bin/qemu-system-x86_64; enilab needs QEMU 10 \
             (bookworm-backports) because 7.2 crashes with vhost-user and MSI-X under TCG; \
             run ./setup.sh"
        );
    }

    #[test]
    fn missing_override_is_reported() {
        let e = QemuBinary::from_path(Path::new("/nonexistent/qemu-system-x86_64")).unwrap_err();
        assert!(matches!(e, QemuError::BinaryMissing { .. }));
        assert!(e.to_string().contains("./setup.sh"));
    }
}

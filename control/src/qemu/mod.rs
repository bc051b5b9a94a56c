//! QEMU instances: command line, QMP, accelerator probe, hot-plug.
//!
//! Everything here is synchronous `std` code (threads, blocking sockets with
//! timeouts), so it can be used from tests, the demo and the daemon alike
//! without an async runtime. See `docs/qemu.md` for the design note.
//!
//! * [`find_qemu`] locates `qemu-system-x86_64` and refuses anything older
//!   than QEMU 10.
//! * [`probe_accel`] / [`select_accel`] choose KVM or TCG (probe boot, cached).
//! * [`InstanceSpec`] + [`build_argv`] turn a description into QEMU's argv.
//! * [`Qmp`] is a blocking QMP client with an event queue.
//! * [`Instance`] owns one running QEMU process.

mod accel;
mod binary;
mod cmdline;
mod instance;
mod qmp;
pub(crate) mod sys;

#[cfg(test)]
mod real_tests;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use accel::{choose_accel, default_state_dir, probe_accel, select_accel, Accel, AccelChoice};
pub use binary::{find_qemu, parse_version, QemuBinary, QemuVersion, MIN_QEMU_MAJOR};
pub use cmdline::{
    build_argv, InstanceSpec, NicSpec, RunPaths, AGENT_PORT_NAME, BASE_KERNEL_CMDLINE,
    DEFAULT_PCIE_PORTS, MAX_PCIE_PORTS, NIC_RECONNECT_MS,
};
pub use instance::Instance;
pub use qmp::{Qmp, QmpEvent, QmpStatus, DEFAULT_QMP_TIMEOUT};

/// Every failure of the QEMU layer, each as one clear sentence.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// No usable `qemu-system-x86_64` binary.
    #[error("QEMU not found: {cause}; run ./setup.sh to install QEMU 10 from bookworm-backports")]
    BinaryMissing {
        /// What was looked at and why it failed.
        cause: String,
    },

    /// The binary exists but `--version` could not be run or understood.
    #[error("could not get the version of {}: {detail}; run ./setup.sh to install QEMU 10", path.display())]
    BinaryUnusable {
        /// The binary.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },

    /// QEMU is older than [`MIN_QEMU_MAJOR`].
    #[error(
        "QEMU {found} found at {}; enilab needs QEMU 10 (bookworm-backports) \
         because {why} crashes with vhost-user and MSI-X under TCG; run ./setup.sh",
        path.display()
    )]
    VersionTooOld {
        /// The binary.
        path: PathBuf,
        /// Its version.
        found: QemuVersion,
        /// "7.2" for bookworm's QEMU, otherwise a general phrase.
        why: String,
    },

    /// The guest kernel image is missing.
    #[error("guest kernel {} not found; run ./setup.sh or images/build.sh to build the guest image", path.display())]
    KernelMissing {
        /// The path that was looked at.
        path: PathBuf,
    },

    /// The guest initramfs is missing.
    #[error("guest initramfs {} not found; run ./setup.sh or images/build.sh to build the guest image", path.display())]
    InitrdMissing {
        /// The path that was looked at.
        path: PathBuf,
    },

    /// The instance description cannot be turned into a command line.
    #[error("invalid instance spec: {0}")]
    InvalidSpec(String),

    /// A socket QEMU would create is already served by a live process.
    #[error("socket {} is in use by a running process ({what}); stop that instance or choose another run directory", path.display())]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
        /// Which socket this is and what holds it.
        what: String,
    },

    /// A QEMU is already running from this run directory.
    #[error("a QEMU instance (pid {pid}) is already running in {}", run_dir.display())]
    AlreadyRunning {
        /// The run directory.
        run_dir: PathBuf,
        /// The live QEMU's pid.
        pid: i32,
    },

    /// The ENI's vhost-user backend socket is not there / not listening.
    /// QEMU would block (guest frozen, QMP silent) until a backend appears.
    #[error(
        "no vhost-user backend is listening on {} for NIC {nic} ({detail}); start the ENI \
         backend first, otherwise QEMU blocks until one appears",
        path.display()
    )]
    BackendNotListening {
        /// NIC id.
        nic: String,
        /// The socket path.
        path: PathBuf,
        /// Missing file, not a socket, or nobody listening.
        detail: String,
    },

    /// Every PCIe root port is taken.
    #[error("no free PCIe root port for NIC {nic}: all {ports} ports are in use (raise InstanceSpec::pcie_ports)")]
    NoFreePort {
        /// NIC id.
        nic: String,
        /// Number of root ports of the instance.
        ports: usize,
    },

    /// A NIC with that id is already plugged.
    #[error("NIC {0} is already attached to this instance")]
    NicExists(String),

    /// No NIC with that id is plugged.
    #[error("NIC {0} is not attached to this instance")]
    NicNotFound(String),

    /// Spawning QEMU failed.
    #[error("could not start {}: {source}", path.display())]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },

    /// QEMU exited during startup.
    #[error("QEMU exited during startup ({status}); last lines of {}:\n{tail}", log.display())]
    EarlyExit {
        /// Exit status as text.
        status: String,
        /// The log file.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },

    /// The QEMU process is not running (any more).
    #[error("QEMU instance in {} is not running{}", run_dir.display(), detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    NotRunning {
        /// The run directory.
        run_dir: PathBuf,
        /// Extra context.
        detail: Option<String>,
    },

    /// QEMU answered a QMP command with an error.
    #[error("QMP command {command} failed: {desc} ({class})")]
    Qmp {
        /// The command.
        command: String,
        /// QMP error class, e.g. `GenericError`, `DeviceNotFound`.
        class: String,
        /// QEMU's human readable description.
        desc: String,
    },

    /// QMP spoke something we did not expect.
    #[error("QMP protocol error: {0}")]
    QmpProtocol(String),

    /// The QMP connection closed (QEMU exited or another client took over).
    #[error("QMP connection closed by QEMU{}", context.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    QmpClosed {
        /// What we were doing.
        context: Option<String>,
    },

    /// Something did not happen in time.
    #[error("timed out after {:.1} s waiting for {what}", after.as_secs_f64())]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long.
        after: Duration,
    },

    /// Any other I/O failure, with context.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        source: io::Error,
    },
}

impl QemuError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        QemuError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias of this module.
pub type Result<T, E = QemuError> = std::result::Result<T, E>;

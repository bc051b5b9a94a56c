//! The internet uplink: a TAP interface that is one more port of the
//! switch. Frames read from the TAP enter the switch under the uplink's
//! `PortId`, as if a guest had sent them; frames the switch queues for that
//! port are written to the TAP.
//!
//! The TAP is created in the caller's network namespace and may then be
//! moved into another one (`ip link set DEV netns NS`); the fd keeps
//! serving it there. One dedicated thread per uplink (no tokio) epolls the
//! TAP fd and the port's `Waker`.

mod tap;
#[cfg(test)]
mod tests;
mod worker;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use enilab_switch::{PortId, Switch, MAX_PORTS};
use serde::Serialize;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::port::{Pool, PortHandle, PortTable, Waker};
use tap::Tap;
use worker::{UplinkWorker, TAP_TOKEN, WAKE_TOKEN};

/// Errors of an uplink.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The interface name cannot be used.
    #[error("interface name {0:?} is not 1 to 15 characters of [A-Za-z0-9_.-]")]
    BadName(String),
    /// An interface of that name exists already.
    #[error("interface {0} already exists")]
    NameInUse(String),
    /// No TUN/TAP driver.
    #[error("/dev/net/tun is missing: load the tun module or give the container the device")]
    TunMissing(#[source] io::Error),
    /// No CAP_NET_ADMIN (or no access to /dev/net/tun).
    #[error("creating TAP interface {0} is not permitted: it needs CAP_NET_ADMIN")]
    NotPermitted(String),
    #[error("cannot open /dev/net/tun")]
    Open(#[source] io::Error),
    #[error("cannot create TAP interface {0}")]
    Create(String, #[source] io::Error),
    /// The port id already has a receiver (an ENI or another uplink).
    #[error("port {0} is already in use")]
    PortInUse(PortId),
    #[error("port {0} is out of range (the switch has {MAX_PORTS} ports)")]
    PortRange(PortId),
    /// The thread or its epoll/eventfd could not be created.
    #[error("cannot start the uplink thread")]
    Spawn(#[source] io::Error),
}

/// Lock-free counters of one uplink. Named from the TAP's side: `read` is
/// what came in from the TAP (toward the VPC), `written` what went out.
#[derive(Default)]
pub(crate) struct UplinkCounters {
    pub wakeups: AtomicU64,
    pub read_packets: AtomicU64,
    pub read_bytes: AtomicU64,
    pub read_errors: AtomicU64,
    pub forwarded: AtomicU64,
    pub replied: AtomicU64,
    pub dropped: AtomicU64,
    pub written_packets: AtomicU64,
    pub written_bytes: AtomicU64,
    pub write_full: AtomicU64,
    pub write_errors: AtomicU64,
    pub offload_errors: AtomicU64,
    pub tap_gone: AtomicBool,
}

/// A copy of an uplink's counters.
///
/// ```json
/// {"read_packets": 12, "read_bytes": 1180, "read_errors": 0,
///  "forwarded": 9, "replied": 2, "dropped": 1,
///  "written_packets": 11, "written_bytes": 1222, "write_full": 0,
///  "write_errors": 0, "offload_errors": 0, "wakeups": 14, "tap_gone": false}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UplinkStats {
    /// Frames read from the TAP and handed to the switch.
    pub read_packets: u64,
    pub read_bytes: u64,
    /// Reads that failed with something other than "nothing waiting".
    pub read_errors: u64,
    /// Switch verdicts for the frames read.
    pub forwarded: u64,
    pub replied: u64,
    pub dropped: u64,
    /// Frames written to the TAP (after segmentation: one per segment).
    pub written_packets: u64,
    pub written_bytes: u64,
    /// Frames dropped because the TAP refused them for now (EAGAIN).
    pub write_full: u64,
    /// Frames dropped on any other write error (interface down or gone).
    pub write_errors: u64,
    /// Frames whose checksum or segmentation offload could not be finished.
    pub offload_errors: u64,
    pub wakeups: u64,
    /// The TAP fd failed for good (its interface was deleted).
    pub tap_gone: bool,
}

impl UplinkCounters {
    fn stats(&self) -> UplinkStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        UplinkStats {
            read_packets: l(&self.read_packets),
            read_bytes: l(&self.read_bytes),
            read_errors: l(&self.read_errors),
            forwarded: l(&self.forwarded),
            replied: l(&self.replied),
            dropped: l(&self.dropped),
            written_packets: l(&self.written_packets),
            written_bytes: l(&self.written_bytes),
            write_full: l(&self.write_full),
            write_errors: l(&self.write_errors),
            offload_errors: l(&self.offload_errors),
            wakeups: l(&self.wakeups),
            tap_gone: self.tap_gone.load(Ordering::Relaxed),
        }
    }
}

/// What the uplink thread shares with its owner.
pub(crate) struct Shared {
    pub waker: Arc<Waker>,
    pub stop: AtomicBool,
    pub counters: UplinkCounters,
}

/// A running uplink. Dropping it unpublishes the port, stops and joins the
/// thread and closes the TAP (which deletes the interface, wherever it is).
pub struct Uplink {
    name: String,
    port: PortId,
    shared: Arc<Shared>,
    handle: Arc<PortHandle>,
    ports: Arc<PortTable>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink")
            .field("name", &self.name)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Uplink {
    /// Create TAP `name` and serve it as switch port `port`.
    pub(crate) fn start(
        name: &str,
        port: PortId,
        switch: &Arc<Switch>,
        ports: Arc<PortTable>,
        pool: Arc<Pool>,
    ) -> Result<Uplink, UplinkError> {
        if port as usize >= MAX_PORTS {
            return Err(UplinkError::PortRange(port));
        }
        if ports.get(port).is_some() {
            return Err(UplinkError::PortInUse(port));
        }
        let tap = Tap::create(name)?;
        let shared = Arc::new(Shared {
            waker: Arc::new(Waker::new().map_err(UplinkError::Spawn)?),
            stop: AtomicBool::new(false),
            counters: UplinkCounters::default(),
        });
        let epoll = Epoll::new().map_err(UplinkError::Spawn)?;
        epoll
            .ctl(
                ControlOperation::Add,
                shared.waker.fd(),
                EpollEvent::new(EventSet::IN, WAKE_TOKEN),
            )
            .and_then(|()| {
                epoll.ctl(
                    ControlOperation::Add,
                    tap.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TAP_TOKEN),
                )
            })
            .map_err(UplinkError::Spawn)?;
        // One RX queue, always enabled: the TAP takes frames whenever the
        // thread writes them.
        let handle = Arc::new(PortHandle::new(port, std::slice::from_ref(&shared.waker)));
        handle.enabled_rx.store(1, Ordering::Release);
        let worker = UplinkWorker::new(
            tap,
            epoll,
            port,
            shared.clone(),
            handle.clone(),
            switch.worker(),
            ports.clone(),
            pool,
        );
        let thread = std::thread::Builder::new()
            .name(format!("uplink-{name}"))
            .spawn(move || worker.run())
            .map_err(UplinkError::Spawn)?;
        ports.insert(handle.clone());
        tracing::info!(tap = name, port, "uplink started");
        Ok(Uplink {
            name: name.to_string(),
            port,
            shared,
            handle,
            ports,
            thread: Some(thread),
        })
    }

    /// The TAP interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> PortId {
        self.port
    }

    pub fn stats(&self) -> UplinkStats {
        self.shared.counters.stats()
    }

    /// Whether the thread still runs (it stops on drop, or if its epoll
    /// fails).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        // Unpublish first so no new frames are queued, but only our own
        // handle: the slot may have been taken over since.
        if self
            .ports
            .get(self.port)
            .is_some_and(|h| Arc::ptr_eq(&h, &self.handle))
        {
            self.ports.remove(self.port);
        }
        self.shared.stop.store(true, Ordering::Release);
        self.shared.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        tracing::info!(tap = %self.name, port = self.port, "uplink stopped");
    }
}

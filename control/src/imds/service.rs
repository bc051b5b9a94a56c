//! [`ImdsService`]: the metadata server behind a switch port.
//!
//! A TAP port of the switch is moved into a namespace of its own, where it
//! holds 169.254.169.254/16, a permanent neighbour entry for the switch
//! (169.254.0.1 at [`METADATA_MAC`]) and a route to the clients' SNAT
//! range through it. The listening socket is created by a short-lived
//! thread that has entered the namespace; the socket stays there, and the
//! server thread serves it from our own namespace.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use enilab_backend::{Datapath, Uplink};
use enilab_switch::PortId;

use super::http::{Limits, Server, Stats};
use super::{
    ImdsError, MetadataSource, CLIENT_NET, IMDS_ADDR, IMDS_PREFIX, METADATA_GATEWAY, METADATA_MAC,
    NETNS_PREFIX,
};
use crate::netns::{format_mac, Netns};

static NEXT_TAP: AtomicU32 = AtomicU32::new(0);
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// The metadata service: its namespace, its switch port and its server.
/// Dropping it stops the server, removes the TAP and the namespace.
pub struct ImdsService {
    // Drop order matters: the server (listener, connections) first, then
    // the uplink (its TAP goes with the fd), then the namespace.
    server: Option<Server>,
    uplink: Option<Uplink>,
    netns: Option<Netns>,
    netns_name: String,
    ifname: String,
    peer_mac: [u8; 6],
    port: PortId,
}

impl std::fmt::Debug for ImdsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImdsService")
            .field("netns", &self.netns_name)
            .field("ifname", &self.ifname)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Run `f` on a new thread that has entered network namespace `name`; the
/// thread ends with `f`, so no other code of ours runs in the namespace.
pub(crate) fn in_netns<T: Send>(
    name: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> Result<std::io::Result<T>, ImdsError> {
    let path = format!("/run/netns/{name}");
    let ns = std::fs::File::open(&path).map_err(|e| ImdsError::Enter(name.to_string(), e))?;
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("enilab-imds-ns".into())
            .spawn_scoped(s, move || {
                // SAFETY: setns(2) on an fd we own (open for the duration of
                // the call) with CLONE_NEWNET; it changes only this thread's
                // network namespace, and the thread exits after `f`.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if r != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .map_err(ImdsError::Spawn)?;
        match h.join() {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ImdsError::Enter(name.to_string(), e)),
            Err(_) => Err(ImdsError::Enter(
                name.to_string(),
                std::io::Error::other("the namespace thread panicked"),
            )),
        }
    })
}

impl ImdsService {
    /// Create the namespace and the metadata port `port` of `datapath`, and
    /// serve `source` on 169.254.169.254:80 inside it.
    pub fn start(
        datapath: &Datapath,
        port: PortId,
        source: Arc<dyn MetadataSource>,
    ) -> Result<ImdsService, ImdsError> {
        Self::start_with(datapath, port, source, Limits::default())
    }

    /// [`ImdsService::start`] with other limits.
    pub fn start_with(
        datapath: &Datapath,
        port: PortId,
        source: Arc<dyn MetadataSource>,
        limits: Limits,
    ) -> Result<ImdsService, ImdsError> {
        Netns::sweep_stale(NETNS_PREFIX);
        // Locals drop in reverse order: on an error the uplink (and its TAP)
        // goes before the namespace, as in `Drop`.
        let ns = Netns::create(NETNS_PREFIX)?;
        let ifname = format!(
            "emd{:x}-{}",
            std::process::id(),
            NEXT_TAP.fetch_add(1, Ordering::Relaxed)
        );
        let uplink = datapath.add_uplink(&ifname, port)?;
        ns.disable_ipv6()?;
        ns.move_link(&ifname)?;
        ns.set_up("lo")?;
        ns.add_addr(&ifname, IMDS_ADDR, IMDS_PREFIX)?;
        ns.set_up(&ifname)?;
        ns.run(
            &[
                "ip",
                "neigh",
                "replace",
                &METADATA_GATEWAY.to_string(),
                "lladdr",
                &format_mac(&METADATA_MAC),
                "dev",
                &ifname,
                "nud",
                "permanent",
            ],
            IP_TIMEOUT,
        )?;
        ns.add_route(CLIENT_NET.0, CLIENT_NET.1, METADATA_GATEWAY, &ifname)?;
        let peer_mac = ns.mac(&ifname)?;
        let addr = SocketAddr::from((IMDS_ADDR, 80));
        let listener = in_netns(ns.name(), move || TcpListener::bind(addr))?
            .map_err(|e| ImdsError::Bind(ns.name().to_string(), e))?;
        let server = Server::start(listener, source, limits)?;
        tracing::info!(
            netns = %ns.name(),
            tap = %ifname,
            port,
            mac = %format_mac(&peer_mac),
            "metadata service started"
        );
        Ok(ImdsService {
            server: Some(server),
            uplink: Some(uplink),
            netns_name: ns.name().to_string(),
            netns: Some(ns),
            ifname,
            peer_mac,
            port,
        })
    }

    /// The MAC of the service's interface (the switch sends replies' frames
    /// for the clients' requests to it).
    pub fn peer_mac(&self) -> [u8; 6] {
        self.peer_mac
    }

    /// The switch port of the service.
    pub fn port(&self) -> PortId {
        self.port
    }

    /// The namespace's name (`ip netns exec <name> ...`).
    pub fn netns(&self) -> &str {
        &self.netns_name
    }

    /// The interface inside the namespace.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Where the server listens (inside the namespace).
    pub fn addr(&self) -> Ipv4Addr {
        IMDS_ADDR
    }

    pub fn stats(&self) -> Stats {
        self.server.as_ref().map(Server::stats).unwrap_or_default()
    }
}

impl Drop for ImdsService {
    fn drop(&mut self) {
        drop(self.server.take());
        drop(self.uplink.take());
        drop(self.netns.take());
        tracing::info!(netns = %self.netns_name, "metadata service stopped");
    }
}

#[cfg(test)]
mod tests;

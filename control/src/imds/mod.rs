//! The instance metadata service (IMDS) at 169.254.169.254, as EC2 serves
//! it: IMDSv1 and IMDSv2 tokens, the `/latest/meta-data/` tree with one
//! directory per attached interface, user data and the identity document.
//!
//! * [`render`]: the pure part: state, instance and path to an answer.
//! * [`token`]: IMDSv2 session tokens, bound to an instance, with expiry.
//! * [`http`]: the hyper server: methods, headers, tokens, limits.
//! * [`service`]: [`ImdsService`]: a network namespace holding a TAP port
//!   of the switch at 169.254.169.254, and the server inside it.
//!
//! Guests reach the service through the switch, which rewrites each guest's
//! source address to a client address in [`CLIENT_NET`] naming its port;
//! [`MetadataSource::instance_of`] maps that back to an instance. Every
//! request reads the API state afresh, so the tree follows attach, detach
//! and address moves at once. See `docs/imds.md`.

pub mod http;
pub mod render;
pub mod service;
pub mod token;

#[cfg(test)]
mod e2e_tests;
#[cfg(test)]
mod testutil;

use std::net::Ipv4Addr;

pub use http::{Limits, Stats};
pub use service::ImdsService;

/// The switch's constants: one definition of the metadata link.
pub use enilab_switch::{IMDS_ADDR, METADATA_GATEWAY, METADATA_MAC};

/// Prefix length of [`IMDS_ADDR`] on the namespace's interface.
pub const IMDS_PREFIX: u8 = 16;
/// The clients' addresses (the switch's SNAT of each guest) and its length.
pub const CLIENT_NET: (Ipv4Addr, u8) = enilab_switch::METADATA_CLIENT_NET;
/// Prefix of the service's namespace names (`<prefix>-<pid>-<n>`).
pub const NETNS_PREFIX: &str = "enilab-imds";

/// Where the service gets its data. Implemented by whoever knows which
/// switch port (hence client address) belongs to which instance.
pub trait MetadataSource: Send + Sync {
    /// The instance behind a client (post-SNAT) address, if any.
    fn instance_of(&self, client: Ipv4Addr) -> Option<String>;
    /// Run `f` on the current API state (briefly: a shared lock is held).
    fn with_state(&self, f: &mut dyn FnMut(&crate::store::State));
    /// The account that owns the resources (`owner-id`, `accountId`).
    fn account_id(&self) -> String {
        crate::api::Config::default().account_id
    }
}

/// Failures of the metadata service.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("cannot set up the metadata namespace")]
    Netns(#[from] crate::netns::NetnsError),
    #[error("cannot create the metadata port")]
    Backend(#[from] enilab_backend::BackendError),
    /// The namespace's `/run/netns` file could not be opened or entered.
    #[error("cannot enter network namespace {0}")]
    Enter(String, #[source] std::io::Error),
    #[error("cannot listen on {IMDS_ADDR}:80 in namespace {0}")]
    Bind(String, #[source] std::io::Error),
    /// The listening socket could not be prepared (TTL, non-blocking).
    #[error("cannot prepare the metadata server's socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot start the metadata server thread")]
    Spawn(#[source] std::io::Error),
    #[error("cannot start the metadata server's async runtime")]
    Runtime(#[source] std::io::Error),
}

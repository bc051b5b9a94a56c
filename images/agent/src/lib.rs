//! The enilab guest agent: its wire protocol (shared with the host side in
//! `enilab_control::agent`) and the agent itself.
//!
//! * [`proto`]: the newline-delimited JSON protocol types.
//! * [`b64`]: the base64 codec used for byte payloads.
//! * [`server`]: the serve loop, over any pollable descriptor.
//! * [`guest`], [`net`]: guest-only parts (virtio-serial port discovery,
//!   kernel command line, the interface/DHCP watcher).
//! * [`imds`], [`eni`]: the metadata client and the ENI configuration
//!   (addresses, route tables, policy rules) it drives.

pub mod attack;
pub mod b64;
pub mod blast;
pub mod eni;
pub mod guest;
pub mod imds;
pub mod kv;
pub mod net;
pub mod probe;
pub mod proto;
pub mod server;
pub mod sys;

pub use proto::{ExecRequest, Hello, Message, MuxStatus, Request, Stream};
pub use server::{serve, ServeOptions};

//! enilab-control: the control plane, the QEMU instance manager and the
//! `enilab` command's library half.

pub mod agent;
pub mod api;
pub mod bench;
pub mod demo;
pub mod fuzzing;
pub mod graph;
pub mod image;
pub mod imds;
pub mod lab;
pub mod netns;
pub mod qemu;
pub mod store;
pub mod topology;

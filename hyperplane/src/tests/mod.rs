//! Fixture tables and cluster tests (no VM needed).

mod cluster;
mod fuzz;
mod nat;
mod nlb;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::wire::testutil::GW;
use crate::{Config, Hyperplane, Node, Options};

pub const NAT_PORT: u32 = 10;
pub const NAT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
pub const NAT_IP: [u8; 4] = [10, 0, 0, 5];
pub const NAT_IP2: [u8; 4] = [10, 0, 0, 6];
pub const LB_PORT: u32 = 20;
pub const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x20];
pub const VIP: [u8; 4] = [10, 0, 2, 100];

pub fn ip(a: [u8; 4]) -> u32 {
    u32::from_be_bytes(a)
}

pub fn nat_config(addrs: &[[u8; 4]]) -> crate::NatGatewayConfig {
    crate::NatGatewayConfig {
        id: "nat-0123".into(),
        port: NAT_PORT,
        mac: NAT_MAC,
        gateway_mac: GW,
        addresses: addrs.iter().map(|a| Ipv4Addr::from(*a)).collect(),
    }
}

/// A cluster with every node handed out, driven by hand with a virtual clock.
pub struct Lab {
    pub hp: Arc<Hyperplane>,
    pub nodes: Vec<Option<Node>>,
    pub now: Instant,
}

impl Lab {
    pub fn new(opts: Options, cfg: Config) -> Lab {
        let hp = Hyperplane::new(opts).unwrap();
        hp.publish(cfg).unwrap();
        let nodes = (0..hp.slots.len())
            .map(|i| Some(hp.node(i).unwrap()))
            .collect();
        Lab {
            hp,
            nodes,
            now: Instant::now(),
        }
    }

    /// Steers and processes one frame, then ticks every node; returns what was emitted.
    pub fn send(&mut self, port: u32, frame: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        if let Some(n) = self.hp.steer(port, frame) {
            if let Some(node) = self.nodes[n].as_mut() {
                node.process(port, frame, self.now, &mut out);
            }
        }
        self.tick(&mut out);
        out
    }

    pub fn tick(&mut self, out: &mut Vec<(u32, Vec<u8>)>) {
        for n in self.nodes.iter_mut().flatten() {
            n.tick(self.now, out);
        }
    }

    pub fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    pub fn stop(&mut self, i: usize) {
        self.hp.stop_node(i);
        self.nodes[i] = None;
    }

    /// Restarts node `i` in the lead's order: take the state, then start.
    pub fn start(&mut self, i: usize) {
        self.nodes[i] = Some(self.hp.node(i).unwrap());
        self.hp.start_node(i);
    }

    /// Ticks until `f` holds (bounded).
    pub fn settle(&mut self, mut f: impl FnMut(&Lab) -> bool) -> bool {
        for _ in 0..1000 {
            let mut out = Vec::new();
            self.advance(Duration::from_millis(25));
            self.tick(&mut out);
            if f(self) {
                return true;
            }
        }
        false
    }

    pub fn drops(&self, r: crate::DropReason) -> u64 {
        self.hp
            .stats()
            .nodes
            .iter()
            .map(|n| n.drops.iter().find(|d| d.0 == r).map_or(0, |d| d.1))
            .sum()
    }
}

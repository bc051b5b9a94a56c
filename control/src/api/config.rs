//! Daemon configuration: instance types and their limits, the public address
//! pool, availability zones. Built-in defaults, overridden by
//! `<state-dir>/config.json` when it exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::store::net::Cidr;

/// Failures reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is not valid configuration JSON")]
    Parse(PathBuf, #[source] serde_json::Error),
    /// A value that makes no sense.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Limits of one instance type.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceType {
    /// Network interfaces in total, over all cards.
    pub enis: u32,
    /// Network cards.
    pub cards: u32,
    /// IPv4 addresses (and /28 prefixes) per interface.
    pub ipv4_per_eni: u32,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// Network bandwidth allowance of each interface, each way, in Mbit/s
    /// (EC2's "up to" figure for the type); 0: unlimited.
    #[serde(default)]
    pub bandwidth_mbps: u64,
    /// Packets per second allowance of each interface (EC2 does not
    /// publish one; set it to study pps_allowance_exceeded); 0: unlimited.
    #[serde(default)]
    pub pps: u64,
    /// Bandwidth each way shared by an instance's interfaces on one network
    /// card, in Mbit/s; default: `bandwidth_mbps` split evenly over the
    /// cards (EC2's figure for the instance is the sum over its cards).
    #[serde(default)]
    pub card_bandwidth_mbps: Option<u64>,
    /// Packets per second shared by an instance's interfaces on one card;
    /// default: `pps`.
    #[serde(default)]
    pub card_pps: Option<u64>,
    /// Connections each interface may have tracked at once (EC2's
    /// conntrack allowance, which it does not publish; enilab's choice);
    /// 0: unlimited.
    #[serde(default = "default_conntrack")]
    pub conntrack: u64,
}

/// EC2's fixed allowance for link-local services (instance metadata, DNS,
/// time) per interface.
pub const LINKLOCAL_PPS: u64 = 1024;

impl InstanceType {
    /// The allowances of one interface of this type.
    pub fn limits(&self) -> enilab_switch::PortLimits {
        let bps = self.bandwidth_mbps.saturating_mul(1_000_000);
        enilab_switch::PortLimits {
            pps: self.pps,
            bw_out_bps: bps,
            bw_in_bps: bps,
            linklocal_pps: LINKLOCAL_PPS,
            conntrack: self.conntrack,
        }
    }

    /// The aggregate allowances of one network card of an instance of this
    /// type, shared by the instance's interfaces on that card.
    pub fn card_limits(&self) -> enilab_switch::CardLimits {
        let mbps = self
            .card_bandwidth_mbps
            .unwrap_or(self.bandwidth_mbps / u64::from(self.cards.max(1)));
        let bps = mbps.saturating_mul(1_000_000);
        enilab_switch::CardLimits {
            pps: self.card_pps.unwrap_or(self.pps),
            bw_out_bps: bps,
            bw_in_bps: bps,
        }
    }
}

/// Tracked connections per interface when the configuration names none.
pub const DEFAULT_CONNTRACK: u64 = 65_536;

fn default_conntrack() -> u64 {
    DEFAULT_CONNTRACK
}

fn default_vcpus() -> u32 {
    2
}

fn default_memory() -> u32 {
    1024
}

impl InstanceType {
    /// Interfaces one card can hold.
    pub fn enis_per_card(&self) -> u32 {
        (self.enis / self.cards.max(1)).max(1)
    }

    /// Largest EnaQueueCount: one queue pair per vCPU, at most 32.
    pub fn max_queues(&self) -> u32 {
        self.vcpus.clamp(1, 32)
    }
}

/// The configuration file's shape; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    public_pool: Option<String>,
    availability_zones: Option<Vec<String>>,
    account_id: Option<String>,
    instance_types: Option<BTreeMap<String, InstanceType>>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub account_id: String,
    pub zones: Vec<String>,
    pub public_pool: Cidr,
    pub types: BTreeMap<String, InstanceType>,
    /// Largest request body accepted, in bytes.
    pub max_body: usize,
    /// Signature checking and the request-rate limit.
    pub access: std::sync::Arc<super::access::Access>,
}

fn t(enis: u32, cards: u32, ipv4: u32, vcpus: u32, memory_mib: u32, gbps: u64) -> InstanceType {
    InstanceType {
        enis,
        cards,
        ipv4_per_eni: ipv4,
        vcpus,
        memory_mib,
        bandwidth_mbps: gbps * 1000,
        pps: 0,
        card_bandwidth_mbps: None,
        card_pps: None,
        // Bigger instances track more (EC2 scales it with the size too):
        // 32 Ki per vCPU, between 64 Ki and 1 Mi per interface.
        conntrack: (u64::from(vcpus) * 32_768).clamp(DEFAULT_CONNTRACK, 1 << 20),
    }
}

impl Default for Config {
    fn default() -> Self {
        let mut types = BTreeMap::new();
        types.insert("t3.micro".to_string(), t(2, 1, 2, 2, 1024, 5));
        types.insert("m5.large".to_string(), t(3, 1, 10, 2, 8192, 10));
        types.insert("m5.24xlarge".to_string(), t(15, 1, 50, 96, 393_216, 25));
        types.insert("c6in.32xlarge".to_string(), t(16, 2, 50, 128, 262_144, 200));
        types.insert("p4d.24xlarge".to_string(), t(60, 4, 50, 96, 1_179_648, 400));
        types.insert("trn1.32xlarge".to_string(), t(40, 8, 50, 128, 524_288, 800));
        Config {
            account_id: "123456789012".to_string(),
            zones: vec![
                "us-east-1a".to_string(),
                "us-east-1b".to_string(),
                "us-east-1c".to_string(),
            ],
            // TEST-NET-3: never routed; the lab's "internet" is local.
            public_pool: Cidr {
                addr: u32::from(std::net::Ipv4Addr::new(203, 0, 113, 0)),
                len: 24,
            },
            types,
            max_body: 1 << 20,
            access: Default::default(),
        }
    }
}

impl Config {
    /// Defaults plus `<state_dir>/config.json`, when present.
    pub fn load(state_dir: &Path) -> Result<Config, ConfigError> {
        let path = state_dir.join("config.json");
        let mut cfg = Config::default();
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let f: ConfigFile =
                    serde_json::from_str(&s).map_err(|e| ConfigError::Parse(path.clone(), e))?;
                cfg.apply(f)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ConfigError::Read(path, e)),
        }
        Ok(cfg)
    }

    fn apply(&mut self, f: ConfigFile) -> Result<(), ConfigError> {
        if let Some(p) = f.public_pool {
            self.set_pool(&p)?;
        }
        if let Some(z) = f.availability_zones {
            if z.is_empty() || z.iter().any(|s| s.is_empty()) {
                return Err(ConfigError::Invalid(
                    "availability_zones must name at least one zone".into(),
                ));
            }
            self.zones = z;
        }
        if let Some(a) = f.account_id {
            if a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ConfigError::Invalid("account_id must be 12 digits".into()));
            }
            self.account_id = a;
        }
        for (name, ty) in f.instance_types.unwrap_or_default() {
            if ty.enis == 0 || ty.cards == 0 || ty.ipv4_per_eni == 0 || ty.cards > ty.enis {
                return Err(ConfigError::Invalid(format!(
                    "instance type {name}: enis, cards and ipv4_per_eni must be positive and cards <= enis"
                )));
            }
            self.types.insert(name, ty);
        }
        Ok(())
    }

    /// Use `pool` (a CIDR of at most /16 .. /30) for Elastic IPs.
    pub fn set_pool(&mut self, pool: &str) -> Result<(), ConfigError> {
        let c = Cidr::parse(pool).map_err(|e| ConfigError::Invalid(format!("public pool: {e}")))?;
        if c.len < 16 || c.len > 30 {
            return Err(ConfigError::Invalid(
                "public pool must be between /16 and /30".into(),
            ));
        }
        self.public_pool = c;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_adds_types() {
        let dir =
            std::env::temp_dir().join(format!("enilab-cfg-{}", crate::store::ids::random_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"public_pool":"198.51.100.0/24","instance_types":{"lab.tiny":{"enis":4,"cards":2,"ipv4_per_eni":3}}}"#,
        )
        .unwrap();
        let c = Config::load(&dir).unwrap();
        assert_eq!(c.public_pool.to_string(), "198.51.100.0/24");
        assert_eq!(c.types["lab.tiny"].enis_per_card(), 2);
        assert_eq!(c.types["t3.micro"].ipv4_per_eni, 2);
        std::fs::write(dir.join("config.json"), r#"{"bogus":1}"#).unwrap();
        assert!(Config::load(&dir).is_err());
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(Config::default().types["p4d.24xlarge"].enis_per_card(), 15);
    }

    /// (type, per-interface bandwidth, card bandwidth, card pps, conntrack)
    /// from the built-in table and a configuration file.
    #[test]
    fn allowances_per_interface_and_card() {
        let dir =
            std::env::temp_dir().join(format!("enilab-cfg-{}", crate::store::ids::random_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"instance_types":{
                "lab.split":{"enis":4,"cards":2,"ipv4_per_eni":3,"bandwidth_mbps":1000,"pps":5000},
                "lab.set":{"enis":4,"cards":2,"ipv4_per_eni":3,"bandwidth_mbps":1000,"pps":5000,
                           "card_bandwidth_mbps":300,"card_pps":7000,"conntrack":10}}}"#,
        )
        .unwrap();
        let c = Config::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let table: [(&str, u64, u64, u64, u64); 5] = [
            ("t3.micro", 5_000_000_000, 5_000_000_000, 0, 65_536),
            (
                "c6in.32xlarge",
                200_000_000_000,
                100_000_000_000,
                0,
                1 << 20,
            ),
            (
                "trn1.32xlarge",
                800_000_000_000,
                100_000_000_000,
                0,
                1 << 20,
            ),
            (
                "lab.split",
                1_000_000_000,
                500_000_000,
                5000,
                DEFAULT_CONNTRACK,
            ),
            ("lab.set", 1_000_000_000, 300_000_000, 7000, 10),
        ];
        for (name, eni_bps, card_bps, card_pps, conntrack) in table {
            let t = &c.types[name];
            let (l, k) = (t.limits(), t.card_limits());
            assert_eq!((l.bw_in_bps, l.bw_out_bps), (eni_bps, eni_bps), "{name}");
            assert_eq!((k.bw_in_bps, k.bw_out_bps), (card_bps, card_bps), "{name}");
            assert_eq!(k.pps, card_pps, "{name}");
            assert_eq!(l.conntrack, conntrack, "{name}");
            assert_eq!(l.linklocal_pps, LINKLOCAL_PPS, "{name}");
        }
    }
}

//! Declarative topologies: `enilab up FILE.toml` / `enilab down FILE.toml`.
//!
//! A TOML file names VPCs, subnets, route tables, security groups,
//! instances with their ENIs on cards, NAT gateways, target groups and
//! network load balancers. [`apply::up`] makes them exist through the
//! daemon's API (the same Query calls any client sends), matching what is
//! already there by the tag `enilab:name=<name>` (ELBv2 resources by their
//! unique name), so a second `up` writes nothing; [`apply::down`] deletes
//! what `up` made, in reverse order.
//!
//! `up` creates what is missing; it does not reconcile a resource that
//! exists but differs from the file (rules, routes and targets are set when
//! their owner is created).

pub mod apply;

use std::collections::BTreeSet;

use serde::Deserialize;

/// The tag key resources are matched by.
pub const NAME_TAG: &str = "enilab:name";

/// The tag key naming the topology a resource belongs to, so two files
/// may both have a subnet called `public`.
pub const TOPOLOGY_TAG: &str = "enilab:topology";

/// What is wrong with a topology file.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    #[error("{kind} {name:?} is defined twice")]
    Duplicate { kind: &'static str, name: String },
    #[error("{from} refers to {kind} {name:?}, which the file does not define")]
    Unknown {
        from: String,
        kind: &'static str,
        name: String,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The topology's name (default: the file's stem).
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub vpc: Vec<VpcSpec>,
    #[serde(default)]
    pub subnet: Vec<SubnetSpec>,
    #[serde(default)]
    pub security_group: Vec<SecurityGroupSpec>,
    #[serde(default)]
    pub route_table: Vec<RouteTableSpec>,
    #[serde(default)]
    pub instance: Vec<InstanceSpec>,
    #[serde(default)]
    pub nat_gateway: Vec<NatGatewaySpec>,
    #[serde(default)]
    pub target_group: Vec<TargetGroupSpec>,
    #[serde(default)]
    pub load_balancer: Vec<LoadBalancerSpec>,
    /// Failover groups (parsed so a file can carry them; applying them
    /// needs the failover API).
    #[serde(default)]
    pub failover_group: Vec<FailoverGroupSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpcSpec {
    pub name: String,
    pub cidr: String,
    /// Create and attach an internet gateway (tagged with the VPC's name).
    #[serde(default)]
    pub internet_gateway: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetSpec {
    pub name: String,
    pub vpc: String,
    pub cidr: String,
    #[serde(default)]
    pub az: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// `tcp`, `udp`, `icmp` or `all`.
    pub protocol: String,
    /// `"22"`, `"8000-8080"`; absent: every port (ICMP: every type).
    #[serde(default)]
    pub ports: Option<String>,
    #[serde(default)]
    pub cidr: Option<String>,
    /// Another security group of the file.
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupSpec {
    pub name: String,
    pub vpc: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub ingress: Vec<RuleSpec>,
    /// Added to the default allow-all egress rule.
    #[serde(default)]
    pub egress: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub destination: String,
    /// `internet_gateway`, `nat_gateway:<name>` or `eni:<name>`.
    pub target: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTableSpec {
    pub name: String,
    pub vpc: String,
    #[serde(default)]
    pub subnets: Vec<String>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EniSpec {
    pub name: String,
    pub subnet: String,
    /// Device index (1 and up; 0 is the primary interface).
    pub device: u32,
    #[serde(default)]
    pub card: u32,
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// Primary private address (default: the next free one).
    #[serde(default)]
    pub private_ip: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub name: String,
    #[serde(rename = "type", default = "default_type")]
    pub instance_type: String,
    /// The primary interface's subnet.
    pub subnet: String,
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// The primary interface's address (default: the next free one).
    #[serde(default)]
    pub private_ip: Option<String>,
    /// Secondary interfaces, `[[instance.eni]]`.
    #[serde(default)]
    pub eni: Vec<EniSpec>,
}

fn default_type() -> String {
    "t3.micro".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatGatewaySpec {
    pub name: String,
    /// A public subnet (its route table leads to the internet gateway).
    pub subnet: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetGroupSpec {
    pub name: String,
    pub vpc: String,
    pub port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Instance names.
    #[serde(default)]
    pub targets: Vec<String>,
}

fn default_protocol() -> String {
    "TCP".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    pub port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: String,
    pub target_group: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancerSpec {
    pub name: String,
    pub subnets: Vec<String>,
    /// `internet-facing` or `internal`.
    #[serde(default = "default_scheme")]
    pub scheme: String,
    #[serde(default)]
    pub listener: Vec<ListenerSpec>,
}

fn default_scheme() -> String {
    "internet-facing".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverGroupSpec {
    pub name: String,
    /// ENI names of the file, the first one active.
    #[serde(default)]
    pub enis: Vec<String>,
    /// Instance names that take over the ENIs in order.
    #[serde(default)]
    pub instances: Vec<String>,
}

impl Topology {
    /// Read and check a topology file.
    pub fn load(path: &std::path::Path) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TopologyError::Read(path.display().to_string(), e))?;
        let mut t = Topology::parse(&text)?;
        if t.name.is_empty() {
            t.name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        Ok(t)
    }

    /// Parse and check topology text.
    pub fn parse(text: &str) -> Result<Topology, TopologyError> {
        let t: Topology = toml::from_str(text)?;
        t.check()?;
        Ok(t)
    }

    /// Every ENI of the file: (instance, eni).
    pub fn enis(&self) -> impl Iterator<Item = (&InstanceSpec, &EniSpec)> {
        self.instance
            .iter()
            .flat_map(|i| i.eni.iter().map(move |e| (i, e)))
    }

    /// Names unique per kind, every reference defined.
    pub fn check(&self) -> Result<(), TopologyError> {
        fn names<'a>(
            kind: &'static str,
            it: impl Iterator<Item = &'a str>,
        ) -> Result<BTreeSet<&'a str>, TopologyError> {
            let mut set = BTreeSet::new();
            for n in it {
                if n.is_empty() {
                    return Err(TopologyError::Invalid(format!(
                        "a {kind} has an empty name"
                    )));
                }
                if !set.insert(n) {
                    return Err(TopologyError::Duplicate {
                        kind,
                        name: n.to_string(),
                    });
                }
            }
            Ok(set)
        }
        let vpcs = names("vpc", self.vpc.iter().map(|v| v.name.as_str()))?;
        let subnets = names("subnet", self.subnet.iter().map(|v| v.name.as_str()))?;
        let sgs = names(
            "security_group",
            self.security_group.iter().map(|v| v.name.as_str()),
        )?;
        names(
            "route_table",
            self.route_table.iter().map(|v| v.name.as_str()),
        )?;
        let instances = names("instance", self.instance.iter().map(|v| v.name.as_str()))?;
        let enis = names("eni", self.enis().map(|(_, e)| e.name.as_str()))?;
        let nats = names(
            "nat_gateway",
            self.nat_gateway.iter().map(|v| v.name.as_str()),
        )?;
        let tgs = names(
            "target_group",
            self.target_group.iter().map(|v| v.name.as_str()),
        )?;
        names(
            "load_balancer",
            self.load_balancer.iter().map(|v| v.name.as_str()),
        )?;
        names(
            "failover_group",
            self.failover_group.iter().map(|v| v.name.as_str()),
        )?;
        let need = |set: &BTreeSet<&str>, kind: &'static str, name: &str, from: String| {
            if set.contains(name) {
                Ok(())
            } else {
                Err(TopologyError::Unknown {
                    from,
                    kind,
                    name: name.to_string(),
                })
            }
        };
        for s in &self.subnet {
            need(&vpcs, "vpc", &s.vpc, format!("subnet {:?}", s.name))?;
        }
        for g in &self.security_group {
            let from = format!("security_group {:?}", g.name);
            need(&vpcs, "vpc", &g.vpc, from.clone())?;
            for r in g.ingress.iter().chain(&g.egress) {
                if let Some(peer) = &r.group {
                    need(&sgs, "security_group", peer, from.clone())?;
                }
                if r.cidr.is_none() == r.group.is_none() {
                    return Err(TopologyError::Invalid(format!(
                        "{from}: each rule needs exactly one of cidr and group"
                    )));
                }
                if !matches!(r.protocol.as_str(), "tcp" | "udp" | "icmp" | "all" | "-1") {
                    return Err(TopologyError::Invalid(format!(
                        "{from}: protocol {:?} is not tcp, udp, icmp or all",
                        r.protocol
                    )));
                }
            }
        }
        for rt in &self.route_table {
            let from = format!("route_table {:?}", rt.name);
            need(&vpcs, "vpc", &rt.vpc, from.clone())?;
            for s in &rt.subnets {
                need(&subnets, "subnet", s, from.clone())?;
            }
            for r in &rt.routes {
                match r.target.split_once(':') {
                    None if r.target == "internet_gateway" => {
                        let igw = self
                            .vpc
                            .iter()
                            .any(|v| v.name == rt.vpc && v.internet_gateway);
                        if !igw {
                            return Err(TopologyError::Invalid(format!(
                                "{from}: vpc {:?} has no internet_gateway = true",
                                rt.vpc
                            )));
                        }
                    }
                    Some(("nat_gateway", n)) => need(&nats, "nat_gateway", n, from.clone())?,
                    Some(("eni", n)) => need(&enis, "eni", n, from.clone())?,
                    _ => {
                        return Err(TopologyError::Invalid(format!(
                            "{from}: route target {:?} is not internet_gateway, nat_gateway:<name> or eni:<name>",
                            r.target
                        )))
                    }
                }
            }
        }
        for i in &self.instance {
            let from = format!("instance {:?}", i.name);
            need(&subnets, "subnet", &i.subnet, from.clone())?;
            for g in &i.security_groups {
                need(&sgs, "security_group", g, from.clone())?;
            }
            let mut slots = BTreeSet::new();
            for e in &i.eni {
                need(&subnets, "subnet", &e.subnet, from.clone())?;
                for g in &e.security_groups {
                    need(&sgs, "security_group", g, from.clone())?;
                }
                if e.device == 0 && e.card == 0 {
                    return Err(TopologyError::Invalid(format!(
                        "{from}: eni {:?} cannot take device 0 on card 0 (the primary interface's)",
                        e.name
                    )));
                }
                if !slots.insert((e.card, e.device)) {
                    return Err(TopologyError::Invalid(format!(
                        "{from}: two ENIs on card {} device {}",
                        e.card, e.device
                    )));
                }
            }
        }
        for n in &self.nat_gateway {
            need(
                &subnets,
                "subnet",
                &n.subnet,
                format!("nat_gateway {:?}", n.name),
            )?;
        }
        for t in &self.target_group {
            let from = format!("target_group {:?}", t.name);
            need(&vpcs, "vpc", &t.vpc, from.clone())?;
            for i in &t.targets {
                need(&instances, "instance", i, from.clone())?;
            }
        }
        for l in &self.load_balancer {
            let from = format!("load_balancer {:?}", l.name);
            if l.subnets.is_empty() {
                return Err(TopologyError::Invalid(format!("{from} needs a subnet")));
            }
            for s in &l.subnets {
                need(&subnets, "subnet", s, from.clone())?;
            }
            for li in &l.listener {
                need(&tgs, "target_group", &li.target_group, from.clone())?;
            }
        }
        for f in &self.failover_group {
            let from = format!("failover_group {:?}", f.name);
            for e in &f.enis {
                need(&enis, "eni", e, from.clone())?;
            }
            for i in &f.instances {
                need(&instances, "instance", i, from.clone())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[vpc]]
name = "lab"
cidr = "10.0.0.0/16"
internet_gateway = true

[[subnet]]
name = "public"
vpc = "lab"
cidr = "10.0.1.0/24"

[[subnet]]
name = "app"
vpc = "lab"
cidr = "10.0.2.0/24"

[[security_group]]
name = "web"
vpc = "lab"
ingress = [{ protocol = "tcp", ports = "80", cidr = "0.0.0.0/0" }]

[[route_table]]
name = "public"
vpc = "lab"
subnets = ["public"]
routes = [{ destination = "0.0.0.0/0", target = "internet_gateway" }]

[[instance]]
name = "web"
type = "m5.large"
subnet = "public"
security_groups = ["web"]

[[instance.eni]]
name = "web-app"
subnet = "app"
device = 1
"#;

    #[test]
    fn a_good_file_parses() {
        let t = Topology::parse(GOOD).expect("parses");
        assert_eq!(t.instance[0].instance_type, "m5.large");
        assert_eq!(t.instance[0].eni[0].card, 0);
        assert_eq!(t.enis().count(), 1);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let cases: [(&str, &str, &str); 9] = [
            (
                "unknown key",
                "[[vpc]]\nname='a'\ncidr='10.0.0.0/16'\ncolour='red'",
                "unknown field",
            ),
            (
                "duplicate",
                "[[vpc]]\nname='a'\ncidr='10.0.0.0/16'\n[[vpc]]\nname='a'\ncidr='10.1.0.0/16'",
                "vpc \"a\" is defined twice",
            ),
            (
                "dangling vpc",
                "[[subnet]]\nname='s'\nvpc='x'\ncidr='10.0.1.0/24'",
                "refers to vpc \"x\"",
            ),
            (
                "primary slot",
                &format!("{GOOD}\n[[instance.eni]]\nname='p'\nsubnet='app'\ndevice=0"),
                "device 0 on card 0",
            ),
            (
                "same slot",
                &format!("{GOOD}\n[[instance.eni]]\nname='q'\nsubnet='app'\ndevice=1"),
                "two ENIs on card 0 device 1",
            ),
            (
                "bad target",
                &GOOD.replace("target = \"internet_gateway\"", "target = \"pigeon\""),
                "route target",
            ),
            (
                "bad protocol",
                &GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""),
                "protocol \"sctp\"",
            ),
            (
                "rule without peer",
                &GOOD.replace(", cidr = \"0.0.0.0/0\"", ""),
                "exactly one of cidr and group",
            ),
            (
                "no igw",
                &GOOD.replace("internet_gateway = true", ""),
                "no internet_gateway",
            ),
        ];
        for (what, text, want) in cases {
            match Topology::parse(text) {
                Ok(_) => panic!("{what}: accepted"),
                Err(e) => assert!(e.to_string().contains(want), "{what}: {e}"),
            }
        }
    }

    #[test]
    fn the_examples_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("examples/") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "toml") {
                Topology::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 3, "{n} examples");
    }
}

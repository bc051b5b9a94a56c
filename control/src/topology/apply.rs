//! Applying a [`Topology`] through the daemon's Query API.
//!
//! Every resource is looked up first (EC2 resources by the tag
//! [`NAME_TAG`], ELBv2 ones by name) and created only when missing, tagged
//! at creation with `TagSpecification`. Writes are counted, so a caller (and
//! the tests) can see that a second `up` is a no-op.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{RuleSpec, Topology, NAME_TAG, TOPOLOGY_TAG};
use crate::api::bench::{extract, Client};

const EC2: &str = "2016-11-15";
const ELB: &str = "2015-12-01";
const IMAGE: &str = "ami-0e1ab000000000001";

/// Longest wait for one resource to reach a state (a guest boot under TCG
/// takes seconds; a NAT gateway's deletion is a job).
const WAIT: Duration = Duration::from_secs(300);

/// Failures applying a topology.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot reach the daemon at {0} (is `enilab serve` running?)")]
    Connect(SocketAddr, #[source] crate::api::bench::BenchError),
    #[error("{action} failed: {code}: {message}")]
    Api {
        action: String,
        code: String,
        message: String,
    },
    #[error("the answer to {0} has no <{1}>")]
    Answer(String, &'static str),
    #[error("{0} did not become {1} within {2:?}")]
    Timeout(String, &'static str, Duration),
}

/// One change `up` or `down` made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// `created` or `deleted`.
    pub op: &'static str,
    pub kind: &'static str,
    pub name: String,
    pub id: String,
}

/// What a run did.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub changes: Vec<Change>,
    /// API calls that change state (everything but Describe*).
    pub writes: u64,
    pub reads: u64,
}

/// How a run reports instance boots: called with (instance name, id,
/// state) while waiting; `done` true once it is running.
pub type Progress<'a> = &'a dyn Fn(&str, &str, &str, bool);

/// A Query API client that counts its writes.
pub struct Api {
    addr: SocketAddr,
    /// The topology's name, the second tag every lookup filters on.
    topology: String,
    conn: Option<Client>,
    writes: u64,
    reads: u64,
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Every text between `<tag>` and `</tag>`.
fn all<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut v = Vec::new();
    let mut rest = xml;
    while let Some(s) = rest.find(&open) {
        let from = s + open.len();
        let Some(e) = rest[from..].find(&close) else {
            break;
        };
        v.push(&rest[from..from + e]);
        rest = &rest[from + e + close.len()..];
    }
    v
}

type P = Vec<(String, String)>;

fn p(pairs: &[(&str, &str)]) -> P {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `TagSpecification` for a resource type, with the name and topology
/// tags.
fn tagged(mut params: P, rtype: &str, name: &str, topology: &str) -> P {
    params.push(("TagSpecification.1.ResourceType".into(), rtype.into()));
    params.push(("TagSpecification.1.Tag.1.Key".into(), NAME_TAG.into()));
    params.push(("TagSpecification.1.Tag.1.Value".into(), name.into()));
    params.push(("TagSpecification.1.Tag.2.Key".into(), TOPOLOGY_TAG.into()));
    params.push(("TagSpecification.1.Tag.2.Value".into(), topology.into()));
    params
}

/// Filters on the name and topology tags (plus more filters).
fn by_name(name: &str, topology: &str, more: &[(&str, &[&str])]) -> P {
    let mut v = p(&[
        ("Filter.1.Name", &format!("tag:{NAME_TAG}")),
        ("Filter.1.Value.1", name),
        ("Filter.2.Name", &format!("tag:{TOPOLOGY_TAG}")),
        ("Filter.2.Value.1", topology),
    ]);
    for (i, (f, values)) in more.iter().enumerate() {
        v.push((format!("Filter.{}.Name", i + 3), f.to_string()));
        for (j, val) in values.iter().enumerate() {
            v.push((format!("Filter.{}.Value.{}", i + 3, j + 1), val.to_string()));
        }
    }
    v
}

impl Api {
    pub fn new(addr: SocketAddr, topology: &str) -> Api {
        Api {
            addr,
            topology: topology.to_string(),
            conn: None,
            writes: 0,
            reads: 0,
        }
    }

    fn post(&mut self, body: &str) -> Result<(u16, String), ApplyError> {
        // One retry on a fresh connection: the daemon may have closed an
        // idle keep-alive one.
        for attempt in 0..2 {
            if self.conn.is_none() {
                self.conn = Some(
                    Client::connect(self.addr).map_err(|e| ApplyError::Connect(self.addr, e))?,
                );
            }
            let Some(c) = self.conn.as_mut() else {
                continue;
            };
            match c.post(body) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    self.conn = None;
                    if attempt == 1 {
                        return Err(ApplyError::Connect(self.addr, e));
                    }
                }
            }
        }
        Err(ApplyError::Answer("the daemon".into(), "response"))
    }

    /// Call `action`; its XML, or the API's error.
    pub fn call(&mut self, version: &str, action: &str, params: &P) -> Result<String, ApplyError> {
        if action.starts_with("Describe") {
            self.reads += 1;
        } else {
            self.writes += 1;
        }
        let mut body = format!("Action={action}&Version={version}");
        for (k, v) in params {
            body.push('&');
            body.push_str(&encode(k));
            body.push('=');
            body.push_str(&encode(v));
        }
        let (status, xml) = self.post(&body)?;
        if status == 200 {
            Ok(xml)
        } else {
            Err(ApplyError::Api {
                action: action.to_string(),
                code: extract(&xml, "Code").unwrap_or("").to_string(),
                message: extract(&xml, "Message").unwrap_or(&xml).to_string(),
            })
        }
    }

    fn ec2(&mut self, action: &str, params: &P) -> Result<String, ApplyError> {
        self.call(EC2, action, params)
    }

    fn elb(&mut self, action: &str, params: &P) -> Result<String, ApplyError> {
        self.call(ELB, action, params)
    }

    /// The first `<tag>` of `action`'s answer.
    fn get(&mut self, action: &str, params: &P, tag: &'static str) -> Result<String, ApplyError> {
        let xml = self.ec2(action, params)?;
        extract(&xml, tag)
            .map(str::to_string)
            .ok_or_else(|| ApplyError::Answer(action.to_string(), tag))
    }

    /// The id (`<tag>`) of the resource named `name`, if any.
    fn find(
        &mut self,
        action: &str,
        name: &str,
        more: &[(&str, &[&str])],
        tag: &'static str,
    ) -> Result<Option<String>, ApplyError> {
        let xml = self.ec2(action, &by_name(name, &self.topology.clone(), more))?;
        Ok(extract(&xml, tag).map(str::to_string))
    }

    /// The ARN of the ELBv2 resource named `name`, if any.
    fn find_elb(
        &mut self,
        action: &str,
        name: &str,
        tag: &'static str,
    ) -> Result<Option<String>, ApplyError> {
        match self.elb(action, &p(&[("Names.member.1", name)])) {
            Ok(xml) => Ok(extract(&xml, tag).map(str::to_string)),
            Err(ApplyError::Api { code, .. }) if code.ends_with("NotFound") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

const LIVE_INSTANCE: &[&str] = &["pending", "running", "stopping", "stopped"];
const LIVE_NAT: &[&str] = &["pending", "available"];

/// Bring up everything `t` names that does not exist yet.
pub fn up(addr: SocketAddr, t: &Topology, progress: Progress<'_>) -> Result<Report, ApplyError> {
    let mut api = Api::new(addr, &t.name);
    let topo = t.name.clone();
    let mut changes = Vec::new();
    let mut ids: BTreeMap<(&'static str, String), String> = BTreeMap::new();
    let id = |ids: &BTreeMap<(&'static str, String), String>, kind: &'static str, name: &str| {
        ids.get(&(kind, name.to_string()))
            .cloned()
            .unwrap_or_default()
    };
    let created = |changes: &mut Vec<Change>, kind: &'static str, name: &str, id: &str| {
        changes.push(Change {
            op: "created",
            kind,
            name: name.to_string(),
            id: id.to_string(),
        })
    };

    for v in &t.vpc {
        let vid = match api.find("DescribeVpcs", &v.name, &[], "vpcId")? {
            Some(x) => x,
            None => {
                let x = api.get(
                    "CreateVpc",
                    &tagged(p(&[("CidrBlock", &v.cidr)]), "vpc", &v.name, &topo),
                    "vpcId",
                )?;
                created(&mut changes, "vpc", &v.name, &x);
                x
            }
        };
        if v.internet_gateway {
            let gid = match api.find(
                "DescribeInternetGateways",
                &v.name,
                &[],
                "internetGatewayId",
            )? {
                Some(x) => x,
                None => {
                    let x = api.get(
                        "CreateInternetGateway",
                        &tagged(Vec::new(), "internet-gateway", &v.name, &topo),
                        "internetGatewayId",
                    )?;
                    created(&mut changes, "internet_gateway", &v.name, &x);
                    x
                }
            };
            let xml = api.ec2(
                "DescribeInternetGateways",
                &p(&[("InternetGatewayId.1", &gid)]),
            )?;
            if !xml.contains(&format!("<vpcId>{vid}</vpcId>")) {
                api.ec2(
                    "AttachInternetGateway",
                    &p(&[("InternetGatewayId", &gid), ("VpcId", &vid)]),
                )?;
            }
            ids.insert(("igw", v.name.clone()), gid);
        }
        ids.insert(("vpc", v.name.clone()), vid);
    }

    for s in &t.subnet {
        let sid = match api.find("DescribeSubnets", &s.name, &[], "subnetId")? {
            Some(x) => x,
            None => {
                let vpc = id(&ids, "vpc", &s.vpc);
                let mut params = p(&[("VpcId", &vpc), ("CidrBlock", &s.cidr)]);
                if let Some(az) = &s.az {
                    params.push(("AvailabilityZone".into(), az.clone()));
                }
                let x = api.get(
                    "CreateSubnet",
                    &tagged(params, "subnet", &s.name, &topo),
                    "subnetId",
                )?;
                created(&mut changes, "subnet", &s.name, &x);
                x
            }
        };
        ids.insert(("subnet", s.name.clone()), sid);
    }

    // Groups first, rules after: a rule may name a group defined later.
    let mut new_groups = Vec::new();
    for g in &t.security_group {
        let gid = match api.find("DescribeSecurityGroups", &g.name, &[], "groupId")? {
            Some(x) => x,
            None => {
                let vpc = id(&ids, "vpc", &g.vpc);
                let desc = g
                    .description
                    .clone()
                    .unwrap_or_else(|| format!("enilab {}", g.name));
                let x = api.get(
                    "CreateSecurityGroup",
                    &tagged(
                        p(&[
                            ("GroupName", &g.name),
                            ("GroupDescription", &desc),
                            ("VpcId", &vpc),
                        ]),
                        "security-group",
                        &g.name,
                        &topo,
                    ),
                    "groupId",
                )?;
                created(&mut changes, "security_group", &g.name, &x);
                new_groups.push(g);
                x
            }
        };
        ids.insert(("sg", g.name.clone()), gid);
    }
    for g in new_groups {
        let gid = id(&ids, "sg", &g.name);
        for (action, rules) in [
            ("AuthorizeSecurityGroupIngress", &g.ingress),
            ("AuthorizeSecurityGroupEgress", &g.egress),
        ] {
            if rules.is_empty() {
                continue;
            }
            let mut params = p(&[("GroupId", &gid)]);
            for (i, r) in rules.iter().enumerate() {
                rule_params(&mut params, i + 1, r, &|n| id(&ids, "sg", n));
            }
            api.ec2(action, &params)?;
        }
    }

    let groups =
        |ids: &BTreeMap<(&'static str, String), String>, names: &[String], params: &mut P| {
            for (i, n) in names.iter().enumerate() {
                params.push((format!("SecurityGroupId.{}", i + 1), id(ids, "sg", n)));
            }
        };
    let mut booting = Vec::new();
    for i in &t.instance {
        let iid = match api.find(
            "DescribeInstances",
            &i.name,
            &[("instance-state-name", LIVE_INSTANCE)],
            "instanceId",
        )? {
            Some(x) => x,
            None => {
                let mut params = p(&[
                    ("ImageId", IMAGE),
                    ("InstanceType", &i.instance_type),
                    ("MinCount", "1"),
                    ("MaxCount", "1"),
                    ("SubnetId", &id(&ids, "subnet", &i.subnet)),
                ]);
                groups(&ids, &i.security_groups, &mut params);
                if let Some(ip) = &i.private_ip {
                    params.push(("PrivateIpAddress".into(), ip.clone()));
                }
                let x = api.get(
                    "RunInstances",
                    &tagged(params, "instance", &i.name, &topo),
                    "instanceId",
                )?;
                created(&mut changes, "instance", &i.name, &x);
                booting.push((i.name.clone(), x.clone()));
                x
            }
        };
        for e in &i.eni {
            let xml = api.ec2("DescribeNetworkInterfaces", &by_name(&e.name, &topo, &[]))?;
            let eid = match extract(&xml, "networkInterfaceId") {
                Some(x) => x.to_string(),
                None => {
                    let mut params = p(&[("SubnetId", &id(&ids, "subnet", &e.subnet))]);
                    groups(&ids, &e.security_groups, &mut params);
                    if let Some(ip) = &e.private_ip {
                        params.push(("PrivateIpAddress".into(), ip.clone()));
                    }
                    let x = api.get(
                        "CreateNetworkInterface",
                        &tagged(params, "network-interface", &e.name, &topo),
                        "networkInterfaceId",
                    )?;
                    created(&mut changes, "eni", &e.name, &x);
                    x
                }
            };
            if !xml.contains(&format!("<instanceId>{iid}</instanceId>")) {
                api.ec2(
                    "AttachNetworkInterface",
                    &p(&[
                        ("NetworkInterfaceId", &eid),
                        ("InstanceId", &iid),
                        ("DeviceIndex", &e.device.to_string()),
                        ("NetworkCardIndex", &e.card.to_string()),
                    ]),
                )?;
            }
            ids.insert(("eni", e.name.clone()), eid);
        }
        ids.insert(("instance", i.name.clone()), iid);
    }

    for n in &t.nat_gateway {
        let nid = match api.find(
            "DescribeNatGateways",
            &n.name,
            &[("state", LIVE_NAT)],
            "natGatewayId",
        )? {
            Some(x) => x,
            None => {
                let alloc = match api.find("DescribeAddresses", &n.name, &[], "allocationId")? {
                    Some(a) => a,
                    None => {
                        let a = api.get(
                            "AllocateAddress",
                            &tagged(p(&[("Domain", "vpc")]), "elastic-ip", &n.name, &topo),
                            "allocationId",
                        )?;
                        created(&mut changes, "elastic_ip", &n.name, &a);
                        a
                    }
                };
                let x = api.get(
                    "CreateNatGateway",
                    &tagged(
                        p(&[
                            ("SubnetId", &id(&ids, "subnet", &n.subnet)),
                            ("AllocationId", &alloc),
                        ]),
                        "natgateway",
                        &n.name,
                        &topo,
                    ),
                    "natGatewayId",
                )?;
                created(&mut changes, "nat_gateway", &n.name, &x);
                x
            }
        };
        ids.insert(("nat", n.name.clone()), nid);
    }

    for rt in &t.route_table {
        if api
            .find("DescribeRouteTables", &rt.name, &[], "routeTableId")?
            .is_some()
        {
            continue;
        }
        let rid = api.get(
            "CreateRouteTable",
            &tagged(
                p(&[("VpcId", &id(&ids, "vpc", &rt.vpc))]),
                "route-table",
                &rt.name,
                &topo,
            ),
            "routeTableId",
        )?;
        created(&mut changes, "route_table", &rt.name, &rid);
        for r in &rt.routes {
            let (key, target) = match r.target.split_once(':') {
                Some(("nat_gateway", n)) => ("NatGatewayId", id(&ids, "nat", n)),
                Some((_, n)) => ("NetworkInterfaceId", id(&ids, "eni", n)),
                None => ("GatewayId", id(&ids, "igw", &rt.vpc)),
            };
            api.ec2(
                "CreateRoute",
                &p(&[
                    ("RouteTableId", &rid),
                    ("DestinationCidrBlock", &r.destination),
                    (key, &target),
                ]),
            )?;
        }
        for s in &rt.subnets {
            api.ec2(
                "AssociateRouteTable",
                &p(&[("RouteTableId", &rid), ("SubnetId", &id(&ids, "subnet", s))]),
            )?;
        }
    }

    for tg in &t.target_group {
        if let Some(arn) = api.find_elb("DescribeTargetGroups", &tg.name, "TargetGroupArn")? {
            ids.insert(("tg", tg.name.clone()), arn);
            continue;
        }
        let xml = api.elb(
            "CreateTargetGroup",
            &p(&[
                ("Name", &tg.name),
                ("Protocol", &tg.protocol),
                ("Port", &tg.port.to_string()),
                ("VpcId", &id(&ids, "vpc", &tg.vpc)),
                ("TargetType", "instance"),
            ]),
        )?;
        let arn = extract(&xml, "TargetGroupArn")
            .ok_or_else(|| ApplyError::Answer("CreateTargetGroup".into(), "TargetGroupArn"))?
            .to_string();
        created(&mut changes, "target_group", &tg.name, &arn);
        if !tg.targets.is_empty() {
            let mut params = p(&[("TargetGroupArn", &arn)]);
            for (i, name) in tg.targets.iter().enumerate() {
                params.push((
                    format!("Targets.member.{}.Id", i + 1),
                    id(&ids, "instance", name),
                ));
                params.push((
                    format!("Targets.member.{}.Port", i + 1),
                    tg.port.to_string(),
                ));
            }
            api.elb("RegisterTargets", &params)?;
        }
        ids.insert(("tg", tg.name.clone()), arn);
    }

    for lb in &t.load_balancer {
        if api
            .find_elb("DescribeLoadBalancers", &lb.name, "LoadBalancerArn")?
            .is_some()
        {
            continue;
        }
        let mut params = p(&[
            ("Name", &lb.name),
            ("Type", "network"),
            ("Scheme", &lb.scheme),
        ]);
        for (i, s) in lb.subnets.iter().enumerate() {
            params.push((format!("Subnets.member.{}", i + 1), id(&ids, "subnet", s)));
        }
        let xml = api.elb("CreateLoadBalancer", &params)?;
        let arn = extract(&xml, "LoadBalancerArn")
            .ok_or_else(|| ApplyError::Answer("CreateLoadBalancer".into(), "LoadBalancerArn"))?
            .to_string();
        created(&mut changes, "load_balancer", &lb.name, &arn);
        for l in &lb.listener {
            api.elb(
                "CreateListener",
                &p(&[
                    ("LoadBalancerArn", &arn),
                    ("Protocol", &l.protocol),
                    ("Port", &l.port.to_string()),
                    ("DefaultActions.member.1.Type", "forward"),
                    (
                        "DefaultActions.member.1.TargetGroupArn",
                        &id(&ids, "tg", &l.target_group),
                    ),
                ]),
            )?;
        }
    }

    // Wait for the guests (reads only).
    for (name, iid) in &booting {
        let started = Instant::now();
        loop {
            let xml = api.ec2("DescribeInstances", &p(&[("InstanceId.1", iid)]))?;
            let state = extract(&xml, "name").unwrap_or("unknown").to_string();
            let done = state == "running";
            progress(name, iid, &state, done);
            if done {
                break;
            }
            if state == "terminated" || state == "stopped" {
                return Err(ApplyError::Timeout(
                    format!("instance {name} ({iid})"),
                    "running",
                    WAIT,
                ));
            }
            if started.elapsed() > WAIT {
                return Err(ApplyError::Timeout(
                    format!("instance {name} ({iid})"),
                    "running",
                    WAIT,
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    // Failover groups: one per ENI of the group, its standbys the group's
    // instances in order (the holder is skipped by the detector while it
    // holds the ENI). A group already covering the ENI is left alone.
    for f in &t.failover_group {
        let existing = api.ec2("DescribeFailoverGroups", &Vec::new())?;
        for e in &f.enis {
            let eid = id(&ids, "eni", e);
            if eid.is_empty() || group_of(&existing, &eid).is_some() {
                continue;
            }
            let mut params = p(&[("NetworkInterfaceId", &eid)]);
            for (k, i) in f.instances.iter().enumerate() {
                params.push((
                    format!("StandbyInstanceId.{}", k + 1),
                    id(&ids, "instance", i),
                ));
            }
            let gid = api.get("CreateFailoverGroup", &params, "failoverGroupId")?;
            created(&mut changes, "failover_group", &f.name, &gid);
        }
    }
    Ok(Report {
        changes,
        writes: api.writes,
        reads: api.reads,
    })
}

/// The failover group (id) of ENI `eni` in a DescribeFailoverGroups answer.
fn group_of<'a>(xml: &'a str, eni: &str) -> Option<&'a str> {
    // One failoverGroupId and one networkInterfaceId per group, in order.
    all(xml, "failoverGroupId")
        .into_iter()
        .zip(all(xml, "networkInterfaceId"))
        .find(|(_, e)| *e == eni)
        .map(|(g, _)| g)
}

/// `IpPermissions.N.*` for one rule.
fn rule_params(params: &mut P, n: usize, r: &RuleSpec, group: &dyn Fn(&str) -> String) {
    let k = |f: &str| format!("IpPermissions.{n}.{f}");
    let proto = if r.protocol == "all" {
        "-1"
    } else {
        r.protocol.as_str()
    };
    params.push((k("IpProtocol"), proto.to_string()));
    if proto != "-1" {
        let (from, to) = match r.ports.as_deref() {
            Some(ports) => match ports.split_once('-') {
                Some((a, b)) => (a.trim().to_string(), b.trim().to_string()),
                None => (ports.trim().to_string(), ports.trim().to_string()),
            },
            None if proto == "icmp" => ("-1".to_string(), "-1".to_string()),
            None => ("0".to_string(), "65535".to_string()),
        };
        params.push((k("FromPort"), from));
        params.push((k("ToPort"), to));
    }
    if let Some(c) = &r.cidr {
        params.push((k("IpRanges.1.CidrIp"), c.clone()));
    }
    if let Some(g) = &r.group {
        params.push((k("Groups.1.GroupId"), group(g)));
    }
}

/// Wait until `check` says yes (polling every 250 ms) or [`WAIT`] passes.
fn wait_for(
    what: String,
    state: &'static str,
    mut check: impl FnMut() -> Result<bool, ApplyError>,
) -> Result<(), ApplyError> {
    let started = Instant::now();
    while !check()? {
        if started.elapsed() > WAIT {
            return Err(ApplyError::Timeout(what, state, WAIT));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// Delete everything of `t` that `up` made, in reverse order.
pub fn down(addr: SocketAddr, t: &Topology) -> Result<Report, ApplyError> {
    let mut api = Api::new(addr, &t.name);
    let topo = t.name.clone();
    let mut changes = Vec::new();
    let mut deleted = |kind: &'static str, name: &str, id: &str| {
        changes.push(Change {
            op: "deleted",
            kind,
            name: name.to_string(),
            id: id.to_string(),
        })
    };

    // Failover groups of the file's ENIs go first (they name instances).
    if !t.failover_group.is_empty() {
        let existing = api.ec2("DescribeFailoverGroups", &Vec::new())?;
        for f in &t.failover_group {
            for e in &f.enis {
                let Some(eid) =
                    api.find("DescribeNetworkInterfaces", e, &[], "networkInterfaceId")?
                else {
                    continue;
                };
                if let Some(gid) = group_of(&existing, &eid) {
                    api.ec2("DeleteFailoverGroup", &p(&[("FailoverGroupId", gid)]))?;
                    deleted("failover_group", &f.name, gid);
                }
            }
        }
    }
    for lb in &t.load_balancer {
        if let Some(arn) = api.find_elb("DescribeLoadBalancers", &lb.name, "LoadBalancerArn")? {
            let xml = api.elb("DescribeListeners", &p(&[("LoadBalancerArn", &arn)]))?;
            for l in all(&xml, "ListenerArn") {
                api.elb("DeleteListener", &p(&[("ListenerArn", l)]))?;
            }
            api.elb("DeleteLoadBalancer", &p(&[("LoadBalancerArn", &arn)]))?;
            deleted("load_balancer", &lb.name, &arn);
        }
    }
    for tg in &t.target_group {
        if let Some(arn) = api.find_elb("DescribeTargetGroups", &tg.name, "TargetGroupArn")? {
            api.elb("DeleteTargetGroup", &p(&[("TargetGroupArn", &arn)]))?;
            deleted("target_group", &tg.name, &arn);
        }
    }
    for rt in &t.route_table {
        let xml = api.ec2("DescribeRouteTables", &by_name(&rt.name, &topo, &[]))?;
        if let Some(rid) = extract(&xml, "routeTableId").map(str::to_string) {
            for a in all(&xml, "routeTableAssociationId") {
                api.ec2("DisassociateRouteTable", &p(&[("AssociationId", a)]))?;
            }
            api.ec2("DeleteRouteTable", &p(&[("RouteTableId", &rid)]))?;
            deleted("route_table", &rt.name, &rid);
        }
    }
    for n in &t.nat_gateway {
        if let Some(nid) = api.find(
            "DescribeNatGateways",
            &n.name,
            &[("state", LIVE_NAT)],
            "natGatewayId",
        )? {
            api.ec2("DeleteNatGateway", &p(&[("NatGatewayId", &nid)]))?;
            wait_for(format!("nat gateway {}", n.name), "deleted", || {
                let xml = api.ec2("DescribeNatGateways", &p(&[("NatGatewayId.1", &nid)]))?;
                Ok(matches!(extract(&xml, "state"), Some("deleted") | None))
            })?;
            deleted("nat_gateway", &n.name, &nid);
        }
        if let Some(a) = api.find("DescribeAddresses", &n.name, &[], "allocationId")? {
            api.ec2("ReleaseAddress", &p(&[("AllocationId", &a)]))?;
            deleted("elastic_ip", &n.name, &a);
        }
    }
    let mut terminating = Vec::new();
    for i in &t.instance {
        if let Some(iid) = api.find(
            "DescribeInstances",
            &i.name,
            &[("instance-state-name", LIVE_INSTANCE)],
            "instanceId",
        )? {
            api.ec2("TerminateInstances", &p(&[("InstanceId.1", &iid)]))?;
            deleted("instance", &i.name, &iid);
            terminating.push((i.name.clone(), iid));
        }
    }
    for (name, iid) in &terminating {
        wait_for(format!("instance {name}"), "terminated", || {
            let xml = api.ec2("DescribeInstances", &p(&[("InstanceId.1", iid)]))?;
            Ok(matches!(extract(&xml, "name"), Some("terminated") | None))
        })?;
    }
    for (_, e) in t.enis() {
        let xml = api.ec2("DescribeNetworkInterfaces", &by_name(&e.name, &topo, &[]))?;
        if let Some(eid) = extract(&xml, "networkInterfaceId").map(str::to_string) {
            if let Some(att) = extract(&xml, "attachmentId") {
                let att = att.to_string();
                api.ec2(
                    "DetachNetworkInterface",
                    &p(&[("AttachmentId", &att), ("Force", "true")]),
                )?;
                wait_for(format!("eni {}", e.name), "detached", || {
                    let xml = api.ec2(
                        "DescribeNetworkInterfaces",
                        &p(&[("NetworkInterfaceId.1", &eid)]),
                    )?;
                    Ok(extract(&xml, "attachmentId").is_none())
                })?;
            }
            api.ec2(
                "DeleteNetworkInterface",
                &p(&[("NetworkInterfaceId", &eid)]),
            )?;
            deleted("eni", &e.name, &eid);
        }
    }
    // Groups may refer to each other: retry the ones still referenced.
    let mut groups: Vec<(String, String)> = Vec::new();
    for g in &t.security_group {
        if let Some(gid) = api.find("DescribeSecurityGroups", &g.name, &[], "groupId")? {
            groups.push((g.name.clone(), gid));
        }
    }
    // Drop rules naming other groups first so every group can go.
    for (name, gid) in &groups {
        {
            for g in t.security_group.iter().filter(|g| &g.name == name) {
                for (action, rules) in [
                    ("RevokeSecurityGroupIngress", &g.ingress),
                    ("RevokeSecurityGroupEgress", &g.egress),
                ] {
                    let peer: Vec<&RuleSpec> = rules.iter().filter(|r| r.group.is_some()).collect();
                    if peer.is_empty() {
                        continue;
                    }
                    let mut params = p(&[("GroupId", gid)]);
                    for (i, r) in peer.iter().enumerate() {
                        rule_params(&mut params, i + 1, r, &|n| {
                            groups
                                .iter()
                                .find(|(gn, _)| gn == n)
                                .map(|(_, id)| id.clone())
                                .unwrap_or_default()
                        });
                    }
                    // Already gone is fine: the group goes next anyway.
                    let _ = api.ec2(action, &params);
                }
            }
        }
    }
    for (name, gid) in &groups {
        api.ec2("DeleteSecurityGroup", &p(&[("GroupId", gid)]))?;
        deleted("security_group", name, gid);
    }
    for v in t.vpc.iter().filter(|v| v.internet_gateway) {
        let xml = api.ec2("DescribeInternetGateways", &by_name(&v.name, &topo, &[]))?;
        if let Some(gid) = extract(&xml, "internetGatewayId").map(str::to_string) {
            if let Some(vid) = extract(&xml, "vpcId").map(str::to_string) {
                api.ec2(
                    "DetachInternetGateway",
                    &p(&[("InternetGatewayId", &gid), ("VpcId", &vid)]),
                )?;
            }
            api.ec2("DeleteInternetGateway", &p(&[("InternetGatewayId", &gid)]))?;
            deleted("internet_gateway", &v.name, &gid);
        }
    }
    for s in &t.subnet {
        if let Some(sid) = api.find("DescribeSubnets", &s.name, &[], "subnetId")? {
            // A load balancer's node interfaces leave with it, as a job.
            wait_for(format!("subnet {}", s.name), "deletable", || {
                match api.ec2("DeleteSubnet", &p(&[("SubnetId", &sid)])) {
                    Ok(_) => Ok(true),
                    Err(ApplyError::Api { code, .. }) if code == "DependencyViolation" => Ok(false),
                    Err(e) => Err(e),
                }
            })?;
            deleted("subnet", &s.name, &sid);
        }
    }
    for v in &t.vpc {
        if let Some(vid) = api.find("DescribeVpcs", &v.name, &[], "vpcId")? {
            api.ec2("DeleteVpc", &p(&[("VpcId", &vid)]))?;
            deleted("vpc", &v.name, &vid);
        }
    }
    Ok(Report {
        changes,
        writes: api.writes,
        reads: api.reads,
    })
}

/// A report as a table.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    for c in &r.changes {
        out.push_str(&format!(
            "{:<8} {:<16} {:<20} {}\n",
            c.op, c.kind, c.name, c.id
        ));
    }
    out.push_str(&format!(
        "{} change(s), {} API write(s), {} read(s)\n",
        r.changes.len(),
        r.writes,
        r.reads
    ));
    out
}

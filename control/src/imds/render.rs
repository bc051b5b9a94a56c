//! The metadata tree of one instance, rendered from the API state: pure, no
//! I/O, nothing cached (a request after an attach sees the new interface).
//!
//! Listings put one entry per line, directories with a trailing `/`, in
//! name order; values with several items (addresses, groups) put one per
//! line; nothing ends with a newline (as EC2 answers). Only interfaces
//! whose attachment is `attaching` or `attached` appear.

use std::collections::BTreeMap;

use crate::store::model::{Address, AttachmentStatus, Eni, Instance, SecurityGroup, Subnet, Vpc};
use crate::store::State;

/// What a path resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A listing or a value (`text/plain`).
    Text(String),
    /// The identity document (`application/json`).
    Json(String),
    /// User data, decoded (`application/octet-stream`).
    Bytes(Vec<u8>),
    NotFound,
}

impl Answer {
    pub fn content_type(&self) -> &'static str {
        match self {
            Answer::Text(_) | Answer::NotFound => "text/plain",
            Answer::Json(_) => "application/json",
            Answer::Bytes(_) => "application/octet-stream",
        }
    }

    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Answer::Text(s) | Answer::Json(s) => s.into_bytes(),
            Answer::Bytes(b) => b,
            Answer::NotFound => Vec::new(),
        }
    }
}

/// A node of the tree: a directory (entries kept in name order) or a leaf.
#[derive(Debug)]
enum Node {
    Dir(BTreeMap<&'static str, Node>),
    /// A directory whose entry names are data (MACs, public addresses).
    DynDir(BTreeMap<String, Node>),
    Leaf(Answer),
}

fn text(s: impl Into<String>) -> Node {
    Node::Leaf(Answer::Text(s.into()))
}

fn lines<S: AsRef<str>>(items: &[S]) -> Node {
    text(
        items
            .iter()
            .map(|s| s.as_ref())
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

fn dir<const N: usize>(entries: [(&'static str, Node); N]) -> Node {
    Node::Dir(entries.into_iter().collect())
}

impl Node {
    fn child(&self, name: &str) -> Option<&Node> {
        match self {
            Node::Dir(m) => m.get(name),
            Node::DynDir(m) => m.get(name),
            Node::Leaf(_) => None,
        }
    }

    fn listing(&self) -> Answer {
        fn entry(name: &str, n: &Node) -> String {
            match n {
                Node::Leaf(_) => name.to_string(),
                _ => format!("{name}/"),
            }
        }
        let names: Vec<String> = match self {
            Node::Dir(m) => m.iter().map(|(k, v)| entry(k, v)).collect(),
            Node::DynDir(m) => m.iter().map(|(k, v)| entry(k, v)).collect(),
            Node::Leaf(a) => return a.clone(),
        };
        Answer::Text(names.join("\n"))
    }
}

/// The answer to `path` (the request path, query already removed) for
/// `instance_id`. A trailing `/` is optional on directories and allowed on
/// values; empty segments (`//`) do not resolve.
pub fn lookup(state: &State, account_id: &str, instance_id: &str, path: &str) -> Answer {
    let Some(inst) = state.get::<Instance>(instance_id) else {
        return Answer::NotFound;
    };
    let Some(rest) = path.strip_prefix('/') else {
        return Answer::NotFound;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let root = tree(state, account_id, inst);
    let mut node = &root;
    if !rest.is_empty() {
        for seg in rest.split('/') {
            match node.child(seg) {
                Some(n) => node = n,
                None => return Answer::NotFound,
            }
        }
    }
    node.listing()
}

/// `us-east-1` from `us-east-1a`.
pub fn region_of(az: &str) -> &str {
    let b = az.as_bytes();
    match b {
        [.., d, l] if d.is_ascii_digit() && l.is_ascii_lowercase() => &az[..az.len() - 1],
        _ => az,
    }
}

/// EC2's private DNS name: `ip-10-0-1-5.ec2.internal` in us-east-1,
/// `ip-10-0-1-5.<region>.compute.internal` elsewhere.
pub fn private_dns(ip: &str, region: &str) -> String {
    let host = format!("ip-{}", ip.replace('.', "-"));
    if region == "us-east-1" {
        format!("{host}.ec2.internal")
    } else {
        format!("{host}.{region}.compute.internal")
    }
}

/// The instance's interfaces that a guest can see, by (card, device).
pub fn visible_enis<'a>(state: &'a State, instance_id: &str) -> Vec<&'a Eni> {
    let mut v: Vec<&Eni> = state
        .iter::<Eni>()
        .filter(|e| {
            e.attachment.as_ref().is_some_and(|a| {
                a.instance_id == instance_id
                    && matches!(
                        a.status,
                        AttachmentStatus::Attaching | AttachmentStatus::Attached
                    )
            })
        })
        .collect();
    v.sort_by_key(|e| {
        e.attachment
            .as_ref()
            .map(|a| (a.card_index, a.device_index))
    });
    v
}

fn is_primary(e: &Eni) -> bool {
    e.attachment
        .as_ref()
        .is_some_and(|a| a.card_index == 0 && a.device_index == 0)
}

/// (public, private) pairs of an interface, in the order of its private
/// addresses: Elastic IPs, and the launch public IP on the primary address
/// when no Elastic IP took its place.
fn publics(state: &State, eni: &Eni) -> Vec<(String, String)> {
    let eips: BTreeMap<&str, &str> = state
        .iter::<Address>()
        .filter_map(|a| {
            let assoc = a.association.as_ref()?;
            (assoc.eni_id == eni.id).then_some((assoc.private_ip.as_str(), a.public_ip.as_str()))
        })
        .collect();
    let primary = eni.primary_ip();
    eni.private_ips
        .iter()
        .filter_map(|p| {
            let public = eips.get(p.ip.as_str()).copied().or_else(|| {
                (p.ip == primary)
                    .then_some(eni.public_ip.as_deref())
                    .flatten()
            })?;
            Some((public.to_string(), p.ip.clone()))
        })
        .collect()
}

fn group_names(state: &State, eni: &Eni) -> Vec<String> {
    eni.groups
        .iter()
        .filter_map(|g| state.get::<SecurityGroup>(g).map(|sg| sg.name.clone()))
        .collect()
}

fn eni_dir(state: &State, account_id: &str, region: &str, eni: &Eni) -> Node {
    let (device, card) = eni
        .attachment
        .as_ref()
        .map(|a| (a.device_index, a.card_index))
        .unwrap_or_default();
    let subnet = state.get::<Subnet>(&eni.subnet_id);
    let vpc = state.get::<Vpc>(&eni.vpc_id);
    let ips: Vec<&str> = eni.private_ips.iter().map(|p| p.ip.as_str()).collect();
    let publics = publics(state, eni);
    let mut m: BTreeMap<&'static str, Node> = BTreeMap::from([
        ("device-number", text(device.to_string())),
        ("interface-id", text(&eni.id)),
        (
            "local-hostname",
            text(private_dns(eni.primary_ip(), region)),
        ),
        ("local-ipv4s", lines(&ips)),
        ("mac", text(&eni.mac)),
        ("network-card", text(card.to_string())),
        ("owner-id", text(account_id)),
        ("security-group-ids", lines(&eni.groups)),
        ("security-groups", lines(&group_names(state, eni))),
        ("subnet-id", text(&eni.subnet_id)),
        ("vpc-id", text(&eni.vpc_id)),
    ]);
    if let Some(s) = subnet {
        m.insert("subnet-ipv4-cidr-block", text(&s.cidr));
    }
    if let Some(v) = vpc {
        m.insert("vpc-ipv4-cidr-block", text(&v.cidr));
        m.insert("vpc-ipv4-cidr-blocks", text(&v.cidr));
    }
    if !eni.prefixes.is_empty() {
        m.insert("ipv4-prefix", lines(&eni.prefixes));
    }
    if !publics.is_empty() {
        let pubs: Vec<&str> = publics.iter().map(|(p, _)| p.as_str()).collect();
        m.insert("public-ipv4s", lines(&pubs));
        m.insert(
            "ipv4-associations",
            Node::DynDir(
                publics
                    .iter()
                    .map(|(p, private)| (p.clone(), text(private)))
                    .collect(),
            ),
        );
    }
    Node::Dir(m)
}

/// `2024-01-02T03:04:05Z`, as the identity document writes times.
fn iso_seconds(ms: u64) -> String {
    let s = crate::api::common::iso8601(ms - ms % 1000);
    match s.strip_suffix(".000Z") {
        Some(t) => format!("{t}Z"),
        None => s,
    }
}

fn identity_document(account_id: &str, region: &str, inst: &Instance, ip: Option<&str>) -> String {
    let doc = serde_json::json!({
        "accountId": account_id,
        "architecture": "x86_64",
        "availabilityZone": inst.az,
        "billingProducts": null,
        "devpayProductCodes": null,
        "marketplaceProductCodes": null,
        "imageId": inst.image_id,
        "instanceId": inst.id,
        "instanceType": inst.instance_type,
        "kernelId": null,
        "pendingTime": iso_seconds(inst.launch_time),
        "privateIp": ip,
        "ramdiskId": null,
        "region": region,
        "version": "2017-09-30",
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// User data as the guest gets it: stored base64 (as RunInstances takes
/// it), decoded; stored text that is not base64 is served as it is.
fn user_data(inst: &Instance) -> Option<Vec<u8>> {
    let raw = inst.user_data.as_deref().filter(|s| !s.is_empty())?;
    let compact: String = raw.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    Some(enilab_agent::b64::decode(&compact).unwrap_or_else(|_| raw.as_bytes().to_vec()))
}

fn tree(state: &State, account_id: &str, inst: &Instance) -> Node {
    let region = region_of(&inst.az);
    let enis = visible_enis(state, &inst.id);
    let primary = enis.iter().copied().find(|e| is_primary(e));
    let macs: BTreeMap<String, Node> = enis
        .iter()
        .map(|e| (e.mac.clone(), eni_dir(state, account_id, region, e)))
        .collect();

    let mut md: BTreeMap<&'static str, Node> = BTreeMap::from([
        ("ami-id", text(&inst.image_id)),
        ("ami-launch-index", text(inst.launch_index.to_string())),
        ("instance-id", text(&inst.id)),
        ("instance-life-cycle", text("on-demand")),
        ("instance-type", text(&inst.instance_type)),
        (
            "network",
            dir([("interfaces", dir([("macs", Node::DynDir(macs))]))]),
        ),
        (
            "placement",
            dir([
                ("availability-zone", text(&inst.az)),
                ("region", text(region)),
            ]),
        ),
        ("reservation-id", text(&inst.reservation_id)),
        (
            "services",
            dir([
                ("domain", text("amazonaws.com")),
                ("partition", text("aws")),
            ]),
        ),
    ]);
    let primary_ip = primary.map(|p| p.primary_ip().to_string());
    if let (Some(p), Some(ip)) = (primary, &primary_ip) {
        let name = private_dns(ip, region);
        md.insert("hostname", text(&name));
        md.insert("local-hostname", text(name));
        md.insert("local-ipv4", text(ip));
        md.insert("mac", text(&p.mac));
        md.insert("security-groups", lines(&group_names(state, p)));
        if let Some((public, _)) = publics(state, p).into_iter().find(|(_, pr)| pr == ip) {
            md.insert("public-ipv4", text(public));
        }
    }

    let mut latest: BTreeMap<&'static str, Node> = BTreeMap::from([
        ("meta-data", Node::Dir(md)),
        (
            "dynamic",
            dir([(
                "instance-identity",
                dir([(
                    "document",
                    Node::Leaf(Answer::Json(identity_document(
                        account_id,
                        region,
                        inst,
                        primary_ip.as_deref(),
                    ))),
                )]),
            )]),
        ),
    ]);
    if let Some(ud) = user_data(inst) {
        latest.insert("user-data", Node::Leaf(Answer::Bytes(ud)));
    }
    dir([("latest", Node::Dir(latest))])
}

#[cfg(test)]
pub(crate) mod tests;

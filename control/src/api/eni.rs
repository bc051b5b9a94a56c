//! Elastic network interfaces: create, describe, attach and detach, private
//! addresses and /28 prefixes, attributes.

use std::collections::BTreeSet;

use crate::store::ids::{new_id, new_mac};
use crate::store::model::*;
use crate::store::net::{self, Cidr};
use crate::store::{State, Txn};

use super::common::*;
use super::config::{Config, InstanceType};
use super::driver::Job;
use super::query::Params;
use super::sg;
use super::vpc::{fresh, ret_true, used_addresses};
use super::xml::Xml;
use super::{Api, ApiError};

fn insufficient(subnet: &str) -> ApiError {
    ApiError::new(
        "InsufficientFreeAddressesInSubnet",
        format!("The specified subnet {subnet} does not have enough free addresses to satisfy the request."),
    )
}

/// The first free host address of `subnet`, not in `taken`.
pub fn alloc_ip(st: &State, subnet: &Subnet, taken: &BTreeSet<u32>) -> Result<u32, ApiError> {
    let cidr = Cidr::parse(&subnet.cidr)
        .map_err(|_| ApiError::internal("stored subnet CIDR is invalid"))?;
    let used = used_addresses(st, &subnet.id);
    let (lo, hi) = net::usable_range(&cidr);
    (lo..=hi)
        .find(|a| !used.contains(a) && !taken.contains(a))
        .ok_or_else(|| insufficient(&subnet.id))
}

/// The first free, aligned /28 of `subnet` that holds no reserved address.
pub fn alloc_prefix(st: &State, subnet: &Subnet, taken: &BTreeSet<u32>) -> Result<Cidr, ApiError> {
    let cidr = Cidr::parse(&subnet.cidr)
        .map_err(|_| ApiError::internal("stored subnet CIDR is invalid"))?;
    let used = used_addresses(st, &subnet.id);
    let mut base = cidr.network();
    while base.checked_add(15).is_some_and(|end| end <= cidr.last()) {
        let block = Cidr {
            addr: base,
            len: 28,
        };
        let free = (block.network()..=block.last())
            .all(|a| !net::is_reserved(&cidr, a) && !used.contains(&a) && !taken.contains(&a));
        if free {
            return Ok(block);
        }
        base += 16;
    }
    Err(insufficient(&subnet.id))
}

/// Check an explicitly requested address for `subnet`.
pub fn check_requested_ip(
    st: &State,
    subnet: &Subnet,
    ip: &str,
    taken: &BTreeSet<u32>,
) -> Result<u32, ApiError> {
    let a = net::parse_ip(ip)
        .ok_or_else(|| ApiError::invalid(format!("Invalid value '{ip}' for IP address.")))?;
    let cidr = Cidr::parse(&subnet.cidr)
        .map_err(|_| ApiError::internal("stored subnet CIDR is invalid"))?;
    if !cidr.contains(a) {
        return Err(ApiError::invalid(format!(
            "Address {ip} does not fall within the subnet's address range"
        )));
    }
    if net::is_reserved(&cidr, a) {
        return Err(ApiError::invalid(format!(
            "Address {ip} is in subnet's reserved address range"
        )));
    }
    if taken.contains(&a) || used_addresses(st, &subnet.id).contains(&a) {
        return Err(ApiError::new(
            "InvalidIPAddress.InUse",
            format!("The specified address {ip} is already in use."),
        ));
    }
    Ok(a)
}

/// Largest IPv4 count per interface of any type: the cap for an interface
/// that is not attached.
pub fn unattached_ip_limit(cfg: &Config) -> u32 {
    cfg.types
        .values()
        .map(|t| t.ipv4_per_eni)
        .max()
        .unwrap_or(50)
}

/// What a new interface should get.
#[derive(Debug, Default, Clone)]
pub struct EniSpec {
    pub description: String,
    pub primary_ip: Option<String>,
    pub secondary_ips: Vec<String>,
    pub secondary_count: u32,
    pub groups: Vec<String>,
    pub prefixes: Vec<String>,
    pub prefix_count: u32,
    pub tags: Tags,
}

/// Build (but do not store) a new interface in `subnet`.
pub fn build_eni(
    t: &Txn<'_>,
    subnet: &Subnet,
    spec: &EniSpec,
    ip_limit: u32,
) -> Result<Eni, ApiError> {
    let vpc = t
        .get::<Vpc>(&subnet.vpc_id)
        .ok_or_else(|| ApiError::internal("subnet without VPC"))?;
    let groups = if spec.groups.is_empty() {
        vec![vpc.default_sg.clone()]
    } else {
        let ids: Vec<&str> = spec.groups.iter().map(|s| s.as_str()).collect();
        sg::check_groups(t, &ids, &vpc.id)?
    };
    let total = 1
        + spec.secondary_ips.len() as u32
        + spec.secondary_count
        + spec.prefixes.len() as u32
        + spec.prefix_count;
    if total > ip_limit {
        return Err(ApiError::new(
            "PrivateIpAddressLimitExceeded",
            format!("Number of private addresses ({total}) will exceed limit ({ip_limit})."),
        ));
    }
    let mut taken = BTreeSet::new();
    let mut ips = Vec::new();
    let primary = match &spec.primary_ip {
        Some(ip) => check_requested_ip(t, subnet, ip, &taken)?,
        None => alloc_ip(t, subnet, &taken)?,
    };
    taken.insert(primary);
    ips.push(PrivateIp {
        ip: net::ip_string(primary),
        primary: true,
    });
    for ip in &spec.secondary_ips {
        let a = check_requested_ip(t, subnet, ip, &taken)?;
        taken.insert(a);
        ips.push(PrivateIp {
            ip: net::ip_string(a),
            primary: false,
        });
    }
    for _ in 0..spec.secondary_count {
        let a = alloc_ip(t, subnet, &taken)?;
        taken.insert(a);
        ips.push(PrivateIp {
            ip: net::ip_string(a),
            primary: false,
        });
    }
    let mut prefixes = Vec::new();
    for pf in &spec.prefixes {
        let c = check_prefix(t, subnet, pf, &taken)?;
        taken.extend(c.network()..=c.last());
        prefixes.push(c.to_string());
    }
    for _ in 0..spec.prefix_count {
        let c = alloc_prefix(t, subnet, &taken)?;
        taken.extend(c.network()..=c.last());
        prefixes.push(c.to_string());
    }
    Ok(Eni {
        id: fresh(t, "eni-"),
        subnet_id: subnet.id.clone(),
        vpc_id: subnet.vpc_id.clone(),
        az: subnet.az.clone(),
        description: spec.description.clone(),
        mac: new_mac(),
        private_ips: ips,
        prefixes,
        groups,
        source_dest_check: true,
        attachment: None,
        tags: spec.tags.clone(),
        public_ip: None,
        auto_public_ip: false,
    })
}

fn check_prefix(
    st: &State,
    subnet: &Subnet,
    pf: &str,
    taken: &BTreeSet<u32>,
) -> Result<Cidr, ApiError> {
    let c = Cidr::parse(pf)
        .map_err(|_| ApiError::invalid(format!("Invalid value '{pf}' for Ipv4Prefix.")))?;
    let sc = Cidr::parse(&subnet.cidr)
        .map_err(|_| ApiError::internal("stored subnet CIDR is invalid"))?;
    if c.len != 28 {
        return Err(ApiError::invalid(format!("Prefix {pf} must be a /28.")));
    }
    if !sc.covers(&c) {
        return Err(ApiError::invalid(format!(
            "Prefix {pf} does not fall within the subnet's address range"
        )));
    }
    let used = used_addresses(st, &subnet.id);
    if (c.network()..=c.last())
        .any(|a| net::is_reserved(&sc, a) || used.contains(&a) || taken.contains(&a))
    {
        return Err(ApiError::new(
            "InvalidIPAddress.InUse",
            format!("The prefix {pf} overlaps addresses in use."),
        ));
    }
    Ok(c)
}

/// The Elastic IP on (eni, private ip), if any.
pub fn eip_on<'a>(st: &'a State, eni: &str, ip: &str) -> Option<&'a Address> {
    st.iter::<Address>().find(|a| {
        a.association
            .as_ref()
            .is_some_and(|s| s.eni_id == eni && s.private_ip == ip)
    })
}

fn write_association(x: &mut Xml, a: &Address, owner: &str) {
    x.elem("association", |x| {
        x.text("publicIp", &a.public_ip)
            .text("publicDnsName", "")
            .text("ipOwnerId", owner)
            .text("allocationId", &a.id)
            .opt(
                "associationId",
                a.association.as_ref().map(|s| s.id.as_str()),
            );
    });
}

/// The association of a launch public IP (owned by "amazon", no IDs).
fn write_launch_association(x: &mut Xml, ip: &str) {
    x.elem("association", |x| {
        x.text("publicIp", ip)
            .text("publicDnsName", "")
            .text("ipOwnerId", "amazon");
    });
}

/// One NetworkInterface (or InstanceNetworkInterface when `in_instance`).
pub fn write_eni(x: &mut Xml, st: &State, e: &Eni, owner: &str, in_instance: bool) {
    x.text("networkInterfaceId", &e.id)
        .text("subnetId", &e.subnet_id)
        .text("vpcId", &e.vpc_id);
    let managed = super::natgw::managed_interface(st, &e.id);
    if !in_instance {
        x.text("availabilityZone", &e.az)
            .bool("requesterManaged", managed.is_some());
    }
    x.text("description", &e.description)
        .text("ownerId", owner)
        .text(
            "status",
            if e.attachment.is_some() {
                "in-use"
            } else {
                "available"
            },
        )
        .text("macAddress", &e.mac)
        .text("privateIpAddress", e.primary_ip())
        .text("privateDnsName", &dns_name(e.primary_ip()))
        .bool("sourceDestCheck", e.source_dest_check)
        .text("interfaceType", managed.unwrap_or("interface"));
    x.set("groupSet", &e.groups, |x, g| {
        x.text("groupId", g);
        if let Some(sg) = st.get::<SecurityGroup>(g) {
            x.text("groupName", &sg.name);
        }
    });
    if let Some(a) = &e.attachment {
        x.elem("attachment", |x| {
            x.text("attachmentId", &a.id);
            if !in_instance {
                x.text("instanceId", &a.instance_id)
                    .text("instanceOwnerId", owner);
            }
            x.num("deviceIndex", a.device_index)
                .num("networkCardIndex", a.card_index)
                .text("status", a.status.as_str())
                .text("attachTime", &iso8601(a.attach_time))
                .bool("deleteOnTermination", a.delete_on_termination);
            if let Some(q) = a.ena_queue_count {
                x.num("enaQueueCount", q);
            }
        });
    }
    if let Some(a) = eip_on(st, &e.id, e.primary_ip()) {
        write_association(x, a, owner);
    } else if let Some(ip) = &e.public_ip {
        write_launch_association(x, ip);
    }
    x.set("privateIpAddressesSet", &e.private_ips, |x, p| {
        x.text("privateIpAddress", &p.ip)
            .text("privateDnsName", &dns_name(&p.ip))
            .bool("primary", p.primary);
        if let Some(a) = eip_on(st, &e.id, &p.ip) {
            write_association(x, a, owner);
        } else if let Some(ip) = e.public_ip.as_deref().filter(|_| p.ip == e.primary_ip()) {
            write_launch_association(x, ip);
        }
    });
    x.set("ipv4PrefixSet", &e.prefixes, |x, p| {
        x.text("ipv4Prefix", p);
    });
    x.set("ipv6AddressesSet", std::iter::empty::<()>(), |_, _| {});
    if !in_instance {
        x.tags(&e.tags);
    }
}

pub fn dns_name(ip: &str) -> String {
    format!("ip-{}.ec2.internal", ip.replace('.', "-"))
}

fn spec_from(p: &Params) -> Result<EniSpec, ApiError> {
    let mut spec = EniSpec {
        description: p.get("Description").unwrap_or("").to_string(),
        primary_ip: p.get("PrivateIpAddress").map(String::from),
        secondary_count: opt_int_in(p, "SecondaryPrivateIpAddressCount", 1, 49)?.unwrap_or(0)
            as u32,
        groups: list(p, "SecurityGroupId")?
            .into_iter()
            .map(String::from)
            .collect(),
        prefixes: p
            .structs("Ipv4Prefix")
            .iter()
            .filter_map(|s| s.get("Ipv4Prefix").map(String::from))
            .collect(),
        prefix_count: opt_int_in(p, "Ipv4PrefixCount", 1, 49)?.unwrap_or(0) as u32,
        ..Default::default()
    };
    for s in p.structs("PrivateIpAddresses") {
        let ip = s
            .get("PrivateIpAddress")
            .ok_or_else(|| ApiError::missing("PrivateIpAddresses.N.PrivateIpAddress"))?;
        if opt_bool(&s, "Primary")?.unwrap_or(false) {
            if spec.primary_ip.as_deref().is_some_and(|p| p != ip) {
                return Err(ApiError::combination(
                    "Two different primary addresses were specified".to_string(),
                ));
            }
            spec.primary_ip = Some(ip.to_string());
        } else {
            spec.secondary_ips.push(ip.to_string());
        }
    }
    if (!spec.prefixes.is_empty() || spec.prefix_count > 0)
        && (!spec.secondary_ips.is_empty() || spec.secondary_count > 0)
    {
        return Err(ApiError::combination(
            "You cannot specify both secondary IPv4 addresses and IPv4 prefixes".to_string(),
        ));
    }
    if !spec.prefixes.is_empty() && spec.prefix_count > 0 {
        return Err(ApiError::combination(
            "Specify either Ipv4Prefixes or Ipv4PrefixCount, not both".to_string(),
        ));
    }
    if !spec.secondary_ips.is_empty() && spec.secondary_count > 0 {
        return Err(ApiError::combination(
            "Specify either PrivateIpAddresses or SecondaryPrivateIpAddressCount, not both"
                .to_string(),
        ));
    }
    if p.has_prefix("Ipv6Addresses") || p.contains("Ipv6AddressCount") {
        return Err(ApiError::invalid(
            "IPv6 addresses are not supported by enilab: subnets have no IPv6 CIDR block"
                .to_string(),
        ));
    }
    if let Some(t) = p.get("InterfaceType") {
        if t != "interface" {
            return Err(ApiError::invalid(format!(
                "Invalid value '{t}' for InterfaceType; enilab supports 'interface'."
            )));
        }
    }
    Ok(spec)
}

pub fn create_network_interface(api: &Api, p: &Params) -> Result<String, ApiError> {
    let subnet_id = req(p, "SubnetId")?;
    let mut spec = spec_from(p)?;
    spec.tags = tag_spec(p, "network-interface", &["network-interface"])?;
    let limit = unattached_ip_limit(&api.config);
    let eni = api.store.write(|t| {
        let subnet = SUBNET.get::<Subnet>(t, subnet_id)?.clone();
        let eni = build_eni(t, &subnet, &spec, limit)?;
        t.put(eni.clone());
        Ok::<_, ApiError>(eni)
    })?;
    let owner = &api.config.account_id;
    Ok(api.store.read(|st| {
        let mut x = Xml::new();
        x.elem("networkInterface", |x| write_eni(x, st, &eni, owner, false));
        x.finish()
    }))
}

/// Remove an interface and drop the Elastic IP associations on it.
pub fn remove_eni(t: &mut Txn<'_>, id: &str) {
    let eips: Vec<Address> = t
        .iter::<Address>()
        .filter(|a| a.association.as_ref().is_some_and(|s| s.eni_id == id))
        .cloned()
        .collect();
    for mut a in eips {
        a.association = None;
        t.put(a);
    }
    t.remove(id);
}

pub fn delete_network_interface(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "NetworkInterfaceId")?;
    api.store.write(|t| {
        let e = ENI.get::<Eni>(t, id)?;
        if let Some(kind) = super::natgw::managed_interface(t, id) {
            return Err(ApiError::new(
                "OperationNotPermitted",
                format!("The network interface {id} is managed by a {kind} and cannot be deleted directly."),
            ));
        }
        if e.attachment.is_some() {
            return Err(ApiError::new(
                "InvalidNetworkInterface.InUse",
                format!("The network interface '{id}' is currently in use."),
            ));
        }
        remove_eni(t, id);
        Ok(())
    })?;
    Ok(ret_true())
}

const ENI_FILTERS: &[&str] = &[
    "network-interface-id",
    "subnet-id",
    "vpc-id",
    "availability-zone",
    "status",
    "description",
    "mac-address",
    "owner-id",
    "source-dest-check",
    "requester-managed",
    "interface-type",
    "private-ip-address",
    "addresses.private-ip-address",
    "addresses.primary",
    "addresses.association.public-ip",
    "private-dns-name",
    "group-id",
    "group-name",
    "attachment.attachment-id",
    "attachment.instance-id",
    "attachment.instance-owner-id",
    "attachment.device-index",
    "attachment.network-card-index",
    "attachment.status",
    "attachment.attach-time",
    "attachment.delete-on-termination",
    "association.public-ip",
    "association.allocation-id",
    "association.association-id",
    "ipv4-prefix",
];

fn eni_field(st: &State, e: &Eni, n: &str, owner: &str) -> Vec<String> {
    let att =
        |f: fn(&Attachment) -> String| e.attachment.as_ref().map(f).into_iter().collect::<Vec<_>>();
    let eips = || {
        st.iter::<Address>()
            .filter(|a| a.association.as_ref().is_some_and(|s| s.eni_id == e.id))
    };
    match n {
        "network-interface-id" => vec![e.id.clone()],
        "subnet-id" => vec![e.subnet_id.clone()],
        "vpc-id" => vec![e.vpc_id.clone()],
        "availability-zone" => vec![e.az.clone()],
        "status" => vec![if e.attachment.is_some() {
            "in-use"
        } else {
            "available"
        }
        .to_string()],
        "description" => vec![e.description.clone()],
        "mac-address" => vec![e.mac.clone()],
        "owner-id" | "attachment.instance-owner-id" => vec![owner.to_string()],
        "source-dest-check" => vec![e.source_dest_check.to_string()],
        "requester-managed" => vec![super::natgw::managed_interface(st, &e.id)
            .is_some()
            .to_string()],
        "interface-type" => vec![super::natgw::managed_interface(st, &e.id)
            .unwrap_or("interface")
            .to_string()],
        "private-ip-address" | "addresses.private-ip-address" => {
            e.private_ips.iter().map(|p| p.ip.clone()).collect()
        }
        "addresses.primary" => e
            .private_ips
            .iter()
            .map(|p| p.primary.to_string())
            .collect(),
        "private-dns-name" => vec![dns_name(e.primary_ip())],
        "group-id" => e.groups.clone(),
        "group-name" => e
            .groups
            .iter()
            .filter_map(|g| st.get::<SecurityGroup>(g).map(|s| s.name.clone()))
            .collect(),
        "attachment.attachment-id" => att(|a| a.id.clone()),
        "attachment.instance-id" => att(|a| a.instance_id.clone()),
        "attachment.device-index" => att(|a| a.device_index.to_string()),
        "attachment.network-card-index" => att(|a| a.card_index.to_string()),
        "attachment.status" => att(|a| a.status.as_str().to_string()),
        "attachment.attach-time" => att(|a| iso8601(a.attach_time)),
        "attachment.delete-on-termination" => att(|a| a.delete_on_termination.to_string()),
        "association.public-ip" | "addresses.association.public-ip" => eips()
            .map(|a| a.public_ip.clone())
            .chain(e.public_ip.clone())
            .collect(),
        "association.allocation-id" => eips().map(|a| a.id.clone()).collect(),
        "association.association-id" => eips()
            .filter_map(|a| a.association.as_ref().map(|s| s.id.clone()))
            .collect(),
        "ipv4-prefix" => e.prefixes.clone(),
        _ => vec![],
    }
}

pub fn describe_network_interfaces(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "NetworkInterfaceId")?;
    let fl = filters(p, ENI_FILTERS)?;
    let pg = page(p, !ids.is_empty())?;
    let owner = &api.config.account_id;
    api.store.read(|st| {
        let sel: Vec<&Eni> = ENI
            .get_many::<Eni>(st, &ids)?
            .into_iter()
            .filter(|e| filter_match(&fl, &e.tags, |n| eni_field(st, e, n, owner)))
            .collect();
        let (sel, token) = paginate(sel, |e| &e.id, &pg);
        let mut x = Xml::new();
        x.set("networkInterfaceSet", sel, |x, e| {
            write_eni(x, st, e, owner, false)
        });
        x.opt("nextToken", token.as_deref());
        Ok(x.finish())
    })
}

pub fn instance_type<'a>(cfg: &'a Config, inst: &Instance) -> Result<&'a InstanceType, ApiError> {
    cfg.types.get(&inst.instance_type).ok_or_else(|| {
        ApiError::internal("instance has an instance type that is no longer configured")
    })
}

/// May `eni` go to `inst` at (device, card)? Checks VPC/AZ, limits and
/// collisions. `pending` are attachments decided in the same call.
pub fn check_attach(
    st: &State,
    cfg: &Config,
    inst: &Instance,
    eni: &Eni,
    device: u32,
    card: u32,
    pending: &[(u32, u32)],
) -> Result<(), ApiError> {
    let ty = instance_type(cfg, inst)?;
    if eni.vpc_id != inst.vpc_id {
        return Err(ApiError::invalid(format!(
            "The network interface {} and instance {} are not in the same VPC.",
            eni.id, inst.id
        )));
    }
    if eni.az != inst.az {
        return Err(ApiError::combination(
            "You may not attach a network interface to an instance if they are not in the same availability zone".to_string(),
        ));
    }
    if card >= ty.cards {
        return Err(ApiError::invalid(format!(
            "Invalid value '{card}' for NetworkCardIndex: instance type {} has {} network card(s).",
            inst.instance_type, ty.cards
        )));
    }
    let current: Vec<(u32, u32)> = st
        .iter::<Eni>()
        .filter_map(|e| e.attachment.as_ref())
        .filter(|a| a.instance_id == inst.id)
        .map(|a| (a.device_index, a.card_index))
        .chain(pending.iter().copied())
        .collect();
    if current.contains(&(device, card)) {
        return Err(ApiError::invalid(format!(
            "Instance '{}' already has an interface attached at device index '{device}'.",
            inst.id
        )));
    }
    let total = current.len() as u32 + 1;
    let on_card = current.iter().filter(|(_, c)| *c == card).count() as u32 + 1;
    if total > ty.enis || on_card > ty.enis_per_card() {
        return Err(ApiError::new(
            "AttachmentLimitExceeded",
            format!(
                "Interface count {total} exceeds the limit for {} ({} in total, {} per network card)",
                inst.instance_type,
                ty.enis,
                ty.enis_per_card()
            ),
        ));
    }
    if eni.ipv4_count() as u32 > ty.ipv4_per_eni {
        return Err(ApiError::new(
            "PrivateIpAddressLimitExceeded",
            format!(
                "Number of private addresses ({}) exceeds the limit for {} ({} per interface).",
                eni.ipv4_count(),
                inst.instance_type,
                ty.ipv4_per_eni
            ),
        ));
    }
    Ok(())
}

fn check_queues(ty: &InstanceType, q: Option<i64>) -> Result<Option<u32>, ApiError> {
    match q {
        None => Ok(None),
        Some(q) if q >= 1 && q <= i64::from(ty.max_queues()) => Ok(Some(q as u32)),
        Some(q) => Err(ApiError::invalid(format!(
            "Invalid value '{q}' for EnaQueueCount: it must be between 1 and {}.",
            ty.max_queues()
        ))),
    }
}

pub fn attach_network_interface(api: &Api, p: &Params) -> Result<String, ApiError> {
    let eni_id = req(p, "NetworkInterfaceId")?;
    let inst_id = req(p, "InstanceId")?;
    let device = req_int_in(p, "DeviceIndex", 0, 127)? as u32;
    let card = opt_int_in(p, "NetworkCardIndex", 0, 63)?.unwrap_or(0) as u32;
    let queues = opt_int(p, "EnaQueueCount")?;
    let cfg = &api.config;
    let (att, job) = api.store.write(|t| {
        let mut eni = ENI.get::<Eni>(t, eni_id)?.clone();
        let inst = INSTANCE.get::<Instance>(t, inst_id)?.clone();
        if inst.state.gone() {
            return Err(ApiError::new(
                "IncorrectInstanceState",
                format!("The instance '{inst_id}' is not in a valid state for this operation."),
            ));
        }
        if let Some(a) = &eni.attachment {
            return Err(ApiError::new(
                "InvalidNetworkInterface.InUse",
                format!(
                    "Interface: [{eni_id}] in use (attached to {}).",
                    a.instance_id
                ),
            ));
        }
        check_attach(t, cfg, &inst, &eni, device, card, &[])?;
        let ty = instance_type(cfg, &inst)?;
        let att = Attachment {
            id: new_id("eni-attach-"),
            instance_id: inst.id.clone(),
            device_index: device,
            card_index: card,
            status: AttachmentStatus::Attaching,
            attach_time: now_ms(),
            delete_on_termination: false,
            ena_queue_count: check_queues(ty, queues)?,
            force_detach: false,
        };
        eni.attachment = Some(att.clone());
        t.put(eni);
        Ok((
            att,
            Job::Attach {
                eni: eni_id.to_string(),
                instance: inst.id.clone(),
            },
        ))
    })?;
    api.jobs.push(job);
    let mut x = Xml::new();
    x.text("attachmentId", &att.id)
        .num("networkCardIndex", att.card_index);
    Ok(x.finish())
}

fn find_attachment<'a>(st: &'a State, att_id: &str) -> Result<&'a Eni, ApiError> {
    ATTACH.check(att_id)?;
    st.iter::<Eni>()
        .find(|e| e.attachment.as_ref().is_some_and(|a| a.id == att_id))
        .ok_or_else(|| {
            ApiError::new(
                "InvalidAttachmentID.NotFound",
                format!("The attachment ID '{att_id}' does not exist"),
            )
        })
}

pub fn detach_network_interface(api: &Api, p: &Params) -> Result<String, ApiError> {
    let att_id = req(p, "AttachmentId")?;
    let force = opt_bool(p, "Force")?.unwrap_or(false);
    let job = api.store.write(|t| {
        let mut eni = find_attachment(t, att_id)?.clone();
        let Some(a) = eni.attachment.as_mut() else {
            return Err(ApiError::internal("attachment vanished"));
        };
        if a.device_index == 0 && a.card_index == 0 {
            return Err(ApiError::new(
                "OperationNotPermitted",
                "The network interface at device index 0 and networkCard index 0 cannot be detached.".to_string(),
            ));
        }
        if a.status == AttachmentStatus::Detaching && !force {
            return Ok(None);
        }
        a.status = AttachmentStatus::Detaching;
        a.force_detach = force;
        let job = Job::Detach {
            eni: eni.id.clone(),
            instance: a.instance_id.clone(),
            force,
        };
        t.put(eni);
        Ok(Some(job))
    })?;
    if let Some(j) = job {
        api.jobs.push(j);
    }
    Ok(ret_true())
}

pub fn modify_network_interface_attribute(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "NetworkInterfaceId")?;
    let sdc = opt_bool(p, "SourceDestCheck.Value")?;
    let desc = p.get("Description.Value");
    let groups = list(p, "SecurityGroupId")?;
    let att_id = p.get("Attachment.AttachmentId");
    let dot = opt_bool(p, "Attachment.DeleteOnTermination")?;
    let queues = opt_int(p, "Attachment.EnaQueueCount")?;
    let chosen = [
        sdc.is_some(),
        desc.is_some(),
        !groups.is_empty(),
        att_id.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if chosen == 0 {
        return Err(ApiError::missing(
            "SourceDestCheck, Description, SecurityGroupId or Attachment",
        ));
    }
    if chosen > 1 {
        return Err(ApiError::combination(
            "Fields for multiple attribute types specified: only one attribute can be modified at a time".to_string(),
        ));
    }
    let cfg = &api.config;
    api.store.write(|t| {
        let mut eni = ENI.get::<Eni>(t, id)?.clone();
        if let Some(v) = sdc {
            eni.source_dest_check = v;
        }
        if let Some(d) = desc {
            eni.description = d.to_string();
        }
        if !groups.is_empty() {
            eni.groups = sg::check_groups(t, &groups, &eni.vpc_id)?;
        }
        if let Some(aid) = att_id {
            ATTACH.check(aid)?;
            let inst_type = eni
                .attachment
                .as_ref()
                .filter(|a| a.id == aid)
                .and_then(|a| t.get::<Instance>(&a.instance_id))
                .map(|i| i.instance_type.clone());
            let a = eni
                .attachment
                .as_mut()
                .filter(|a| a.id == aid)
                .ok_or_else(|| {
                    ApiError::new(
                        "InvalidAttachmentID.NotFound",
                        format!("The attachment ID '{aid}' does not exist"),
                    )
                })?;
            if dot.is_none() && queues.is_none() {
                return Err(ApiError::missing("Attachment.DeleteOnTermination"));
            }
            if let Some(v) = dot {
                a.delete_on_termination = v;
            }
            if queues.is_some() {
                let ty = inst_type.and_then(|n| cfg.types.get(&n)).ok_or_else(|| {
                    ApiError::internal("attachment without a known instance type")
                })?;
                a.ena_queue_count = check_queues(ty, queues)?;
            }
        }
        t.put(eni);
        Ok(())
    })?;
    Ok(ret_true())
}

fn ip_limit_for(st: &State, cfg: &Config, eni: &Eni) -> u32 {
    eni.attachment
        .as_ref()
        .and_then(|a| st.get::<Instance>(&a.instance_id))
        .and_then(|i| cfg.types.get(&i.instance_type))
        .map(|t| t.ipv4_per_eni)
        .unwrap_or_else(|| unattached_ip_limit(cfg))
}

pub fn assign_private_ip_addresses(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "NetworkInterfaceId")?;
    let ips = list(p, "PrivateIpAddress")?;
    let count = opt_int_in(p, "SecondaryPrivateIpAddressCount", 1, 49)?.unwrap_or(0) as usize;
    let prefixes = list(p, "Ipv4Prefix")?;
    let prefix_count = opt_int_in(p, "Ipv4PrefixCount", 1, 49)?.unwrap_or(0) as usize;
    let reassign = opt_bool(p, "AllowReassignment")?.unwrap_or(false);
    let want_ips = !ips.is_empty() || count > 0;
    let want_pf = !prefixes.is_empty() || prefix_count > 0;
    if want_ips && want_pf {
        return Err(ApiError::combination(
            "You cannot specify both IPv4 addresses and IPv4 prefixes".to_string(),
        ));
    }
    if !ips.is_empty() && count > 0 {
        return Err(ApiError::combination(
            "Specify either PrivateIpAddress or SecondaryPrivateIpAddressCount, not both"
                .to_string(),
        ));
    }
    if !prefixes.is_empty() && prefix_count > 0 {
        return Err(ApiError::combination(
            "Specify either Ipv4Prefix or Ipv4PrefixCount, not both".to_string(),
        ));
    }
    if !want_ips && !want_pf {
        return Err(ApiError::missing(
            "PrivateIpAddress, SecondaryPrivateIpAddressCount, Ipv4Prefix or Ipv4PrefixCount",
        ));
    }
    let cfg = &api.config;
    let mut moved_from: Vec<String> = Vec::new();
    let (new_ips, new_pfs) = api.store.write(|t| {
        let mut eni = ENI.get::<Eni>(t, id)?.clone();
        let subnet = t
            .get::<Subnet>(&eni.subnet_id)
            .cloned()
            .ok_or_else(|| ApiError::internal("interface without subnet"))?;
        let limit = ip_limit_for(t, cfg, &eni) as usize;
        let adding =
            ips.iter().filter(|ip| !eni.has_ip(ip)).count() + count + prefixes.len() + prefix_count;
        if eni.ipv4_count() + adding > limit {
            return Err(ApiError::new(
                "PrivateIpAddressLimitExceeded",
                format!("Number of private addresses will exceed limit ({limit} per interface)."),
            ));
        }
        let mut new_ips = Vec::new();
        let mut new_pfs = Vec::new();
        let mut taken = BTreeSet::new();
        for ip in &ips {
            if eni.has_ip(ip) {
                new_ips.push(ip.to_string());
                continue;
            }
            // Held by another interface of the subnet?
            let holder = t
                .iter::<Eni>()
                .find(|o| o.id != eni.id && o.subnet_id == eni.subnet_id && o.has_ip(ip))
                .cloned();
            match holder {
                Some(mut o) => {
                    if !reassign {
                        return Err(ApiError::new(
                            "InvalidIPAddress.InUse",
                            format!(
                                "Address {ip} is assigned to {}; set AllowReassignment to move it.",
                                o.id
                            ),
                        ));
                    }
                    if o.private_ips.iter().any(|x| x.ip == *ip && x.primary) {
                        return Err(ApiError::invalid(format!(
                            "Address {ip} is the primary address of {} and cannot be reassigned.",
                            o.id
                        )));
                    }
                    o.private_ips.retain(|x| x.ip != *ip);
                    if let Some(a) = &o.attachment {
                        moved_from.push(a.instance_id.clone());
                    }
                    let oid = o.id.clone();
                    t.put(o);
                    // An Elastic IP on the address moves with it.
                    if let Some(mut a) = eip_on(t, &oid, ip).cloned() {
                        if let Some(s) = a.association.as_mut() {
                            s.eni_id = eni.id.clone();
                        }
                        t.put(a);
                    }
                    let a = net::parse_ip(ip).ok_or_else(|| {
                        ApiError::invalid(format!("Invalid value '{ip}' for IP address."))
                    })?;
                    taken.insert(a);
                }
                None => {
                    let a = check_requested_ip(t, &subnet, ip, &taken)?;
                    taken.insert(a);
                }
            }
            eni.private_ips.push(PrivateIp {
                ip: ip.to_string(),
                primary: false,
            });
            new_ips.push(ip.to_string());
        }
        for _ in 0..count {
            let a = alloc_ip(t, &subnet, &taken)?;
            taken.insert(a);
            let ip = net::ip_string(a);
            eni.private_ips.push(PrivateIp {
                ip: ip.clone(),
                primary: false,
            });
            new_ips.push(ip);
        }
        for pf in &prefixes {
            if eni.prefixes.iter().any(|x| x == pf) {
                new_pfs.push(pf.to_string());
                continue;
            }
            let c = check_prefix(t, &subnet, pf, &taken)?;
            taken.extend(c.network()..=c.last());
            eni.prefixes.push(c.to_string());
            new_pfs.push(c.to_string());
        }
        for _ in 0..prefix_count {
            let c = alloc_prefix(t, &subnet, &taken)?;
            taken.extend(c.network()..=c.last());
            eni.prefixes.push(c.to_string());
            new_pfs.push(c.to_string());
        }
        if let Some(a) = &eni.attachment {
            moved_from.push(a.instance_id.clone());
        }
        t.put(eni);
        Ok((new_ips, new_pfs))
    })?;
    // The datapath followed at commit (and announced a moved address);
    // the guests on both sides reconcile now rather than at their next
    // poll: the old one drops the address, the new one adds it.
    moved_from.sort();
    moved_from.dedup();
    for inst in &moved_from {
        api.driver.refresh_guest(inst);
    }
    let mut x = Xml::new();
    x.text("networkInterfaceId", id)
        .set("assignedPrivateIpAddressesSet", &new_ips, |x, ip| {
            x.text("privateIpAddress", ip);
        })
        .set("assignedIpv4PrefixSet", &new_pfs, |x, pf| {
            x.text("ipv4Prefix", pf);
        })
        .text("return", "true");
    Ok(x.finish())
}

pub fn unassign_private_ip_addresses(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "NetworkInterfaceId")?;
    let ips = list(p, "PrivateIpAddress")?;
    let prefixes = list(p, "Ipv4Prefix")?;
    if ips.is_empty() && prefixes.is_empty() {
        return Err(ApiError::missing("PrivateIpAddress or Ipv4Prefix"));
    }
    api.store.write(|t| {
        let mut eni = ENI.get::<Eni>(t, id)?.clone();
        for ip in &ips {
            match eni.private_ips.iter().find(|x| x.ip == *ip) {
                None => {
                    return Err(ApiError::invalid(format!(
                        "Some of the specified addresses are not assigned to interface {id}"
                    )))
                }
                Some(x) if x.primary => {
                    return Err(ApiError::invalid(format!(
                        "The primary address {ip} of interface {id} cannot be unassigned"
                    )))
                }
                Some(_) => {}
            }
            if let Some(mut a) = eip_on(t, id, ip).cloned() {
                a.association = None;
                t.put(a);
            }
            eni.private_ips.retain(|x| x.ip != *ip);
        }
        for pf in &prefixes {
            if !eni.prefixes.iter().any(|x| x == pf) {
                return Err(ApiError::invalid(format!(
                    "Some of the specified prefixes are not assigned to interface {id}"
                )));
            }
            eni.prefixes.retain(|x| x != pf);
        }
        t.put(eni);
        Ok(())
    })?;
    Ok(ret_true())
}

pub fn assign_ipv6_addresses(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "NetworkInterfaceId")?;
    api.store.read(|st| {
        let e = ENI.get::<Eni>(st, id)?;
        Err(ApiError::invalid(format!(
            "The subnet {} of interface {id} has no IPv6 CIDR block (enilab VPCs are IPv4 only).",
            e.subnet_id
        )))
    })
}

pub fn describe_network_interface_attribute(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "NetworkInterfaceId")?;
    let attr = req(p, "Attribute")?;
    let owner = &api.config.account_id;
    api.store.read(|st| {
        let e = ENI.get::<Eni>(st, id)?;
        let mut x = Xml::new();
        x.text("networkInterfaceId", &e.id);
        match attr {
            "description" => {
                x.elem("description", |x| {
                    x.text("value", &e.description);
                });
            }
            "sourceDestCheck" => {
                x.elem("sourceDestCheck", |x| {
                    x.bool("value", e.source_dest_check);
                });
            }
            "groupSet" => {
                x.set("groupSet", &e.groups, |x, g| {
                    x.text("groupId", g);
                    if let Some(s) = st.get::<SecurityGroup>(g) {
                        x.text("groupName", &s.name);
                    }
                });
            }
            "attachment" => {
                if let Some(a) = &e.attachment {
                    x.elem("attachment", |x| {
                        x.text("attachmentId", &a.id)
                            .text("instanceId", &a.instance_id)
                            .text("instanceOwnerId", owner)
                            .num("deviceIndex", a.device_index)
                            .num("networkCardIndex", a.card_index)
                            .text("status", a.status.as_str())
                            .text("attachTime", &iso8601(a.attach_time))
                            .bool("deleteOnTermination", a.delete_on_termination);
                        if let Some(q) = a.ena_queue_count {
                            x.num("enaQueueCount", q);
                        }
                    });
                }
            }
            "associatePublicIpAddress" => {
                x.bool(
                    "associatePublicIpAddress",
                    e.public_ip.is_some() || eip_on(st, &e.id, e.primary_ip()).is_some(),
                );
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "Value ({other}) for parameter attribute is invalid. Expected one of description, groupSet, sourceDestCheck, attachment, associatePublicIpAddress."
                )))
            }
        }
        Ok(x.finish())
    })
}

//! CreateLoadBalancer, DescribeLoadBalancers, DeleteLoadBalancer (network
//! load balancers only).

use std::collections::BTreeSet;

use crate::store::ids::new_id;
use crate::store::model::*;
use crate::store::net;
use crate::store::{State, Txn};

use super::super::common::{iso8601, now_ms, EIPALLOC, SUBNET};
use super::super::driver::Job;
use super::super::eni::{build_eni, remove_eni, EniSpec};
use super::super::pubip;
use super::super::query::Params;
use super::super::xml::Xml;
use super::super::{Api, ApiError};
use super::*;

/// Load balancers per account (AWS's default quota).
pub const MAX_LOAD_BALANCERS: usize = 50;

/// One subnet the request names, with its optional address choices.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    subnet: String,
    allocation: Option<String>,
    private_ip: Option<String>,
}

/// The hosted zone ID AWS uses for NLBs in us-east-1.
const HOSTED_ZONE: &str = "Z26RNL4JYFTOTI";

pub fn write_lb(x: &mut Xml, api: &Api, lb: &LoadBalancer) {
    x.text("LoadBalancerArn", &arn(api, &lb.id))
        .text("DNSName", &lb.dns_name)
        .text("CanonicalHostedZoneId", HOSTED_ZONE)
        .text("CreatedTime", &iso8601(lb.created))
        .text("LoadBalancerName", &lb.name)
        .text("Scheme", &lb.scheme)
        .text("VpcId", &lb.vpc_id)
        .elem("State", |x| {
            x.text("Code", lb.state.as_str());
        })
        .text("Type", "network");
    x.members("AvailabilityZones", &lb.nodes, |x, n| {
        x.text("ZoneName", &n.az).text("SubnetId", &n.subnet_id);
        x.members("LoadBalancerAddresses", [n], |x, n| {
            if let Some(ip) = &n.public_ip {
                x.text("IpAddress", ip);
            }
            x.opt("AllocationId", n.allocation_id.as_deref());
            if lb.scheme == "internal" {
                x.text("PrivateIPv4Address", &n.private_ip);
            }
        });
    });
    x.text("IpAddressType", "ipv4");
}

fn mappings(p: &Params) -> Result<Vec<Mapping>, ApiError> {
    let subnets = members(p, "Subnets")?;
    let maps = member_structs(p, "SubnetMappings")?;
    if !subnets.is_empty() && !maps.is_empty() {
        return Err(validation(
            "You can specify subnets or subnet mappings, not both",
        ));
    }
    let mut out: Vec<Mapping> = subnets
        .into_iter()
        .map(|s| Mapping {
            subnet: s.to_string(),
            allocation: None,
            private_ip: None,
        })
        .collect();
    for m in maps {
        if m.contains("IPv6Address") || m.contains("SourceNatIpv6Prefix") {
            return Err(config_error("IPv6 is not supported by enilab"));
        }
        out.push(Mapping {
            subnet: req(&m, "SubnetId")
                .map_err(|_| missing("SubnetMappings.member.N.SubnetId"))?
                .to_string(),
            allocation: m.get("AllocationId").map(String::from),
            private_ip: m.get("PrivateIPv4Address").map(String::from),
        });
    }
    if out.is_empty() {
        return Err(validation("At least one subnet must be specified"));
    }
    let mut seen = BTreeSet::new();
    for m in &out {
        if !seen.insert(m.subnet.as_str()) {
            return Err(validation(format!(
                "Subnet '{}' is specified more than once",
                m.subnet
            )));
        }
    }
    Ok(out)
}

/// An EC2 error from building the interface, as ELBv2 reports it.
fn as_config_error(e: ApiError) -> ApiError {
    match e {
        ApiError::Client { message, .. } => config_error(message),
        other => other,
    }
}

/// Does an existing load balancer match this request (idempotent create)?
fn same_request(lb: &LoadBalancer, scheme: &str, maps: &[Mapping]) -> bool {
    let mut a: Vec<&str> = lb.nodes.iter().map(|n| n.subnet_id.as_str()).collect();
    let mut b: Vec<&str> = maps.iter().map(|m| m.subnet.as_str()).collect();
    a.sort_unstable();
    b.sort_unstable();
    lb.scheme == scheme && a == b
}

fn create_in(
    api: &Api,
    t: &mut Txn<'_>,
    name: &str,
    scheme: &str,
    maps: &[Mapping],
    tags: &Tags,
) -> Result<(LoadBalancer, bool), ApiError> {
    if let Some(lb) = t.iter::<LoadBalancer>().find(|l| l.name == name) {
        // AWS answers a repeated identical create with the existing one.
        if same_request(lb, scheme, maps) {
            return Ok((lb.clone(), false));
        }
        return Err(ApiError::new(
            "DuplicateLoadBalancerName",
            format!("A load balancer with the name '{name}' already exists"),
        ));
    }
    if t.iter::<LoadBalancer>().count() >= MAX_LOAD_BALANCERS {
        return Err(ApiError::new(
            "TooManyLoadBalancers",
            format!("The maximum number of load balancers ({MAX_LOAD_BALANCERS}) has been reached"),
        ));
    }
    let mut subnets: Vec<Subnet> = Vec::new();
    for m in maps {
        let s = SUBNET
            .get::<Subnet>(t, &m.subnet)
            .map_err(|_| {
                ApiError::new(
                    "SubnetNotFound",
                    format!("The subnet ID '{}' is not valid", m.subnet),
                )
            })?
            .clone();
        if let Some(first) = subnets.first() {
            if first.vpc_id != s.vpc_id {
                return Err(ApiError::new(
                    "InvalidSubnet",
                    "All subnets of a load balancer must be in the same VPC",
                ));
            }
        }
        if subnets.iter().any(|o| o.az == s.az) {
            return Err(ApiError::new(
                "InvalidConfigurationRequest",
                format!(
                    "A load balancer cannot be attached to multiple subnets in the same Availability Zone ({})",
                    s.az
                ),
            ));
        }
        if m.allocation.is_some() && scheme != "internet-facing" {
            return Err(config_error(
                "Elastic IP addresses can only be given to an internet-facing load balancer",
            ));
        }
        if m.private_ip.is_some() && scheme != "internal" {
            return Err(config_error(
                "Private IPv4 addresses can only be given to an internal load balancer",
            ));
        }
        subnets.push(s);
    }
    let Some(vpc_id) = subnets.first().map(|s| s.vpc_id.clone()) else {
        return Err(validation("At least one subnet must be specified"));
    };
    if scheme == "internet-facing"
        && !t
            .iter::<InternetGateway>()
            .any(|g| g.vpc_id.as_deref() == Some(vpc_id.as_str()))
    {
        return Err(ApiError::new(
            "InvalidSubnet",
            format!("VPC {vpc_id} has no internet gateway"),
        ));
    }
    let hex = new_hex();
    let id = format!("loadbalancer/net/{name}/{hex}");
    let mut nodes = Vec::new();
    for (m, s) in maps.iter().zip(&subnets) {
        let spec = EniSpec {
            description: format!("ELB net/{name}/{hex}"),
            primary_ip: m.private_ip.clone(),
            ..Default::default()
        };
        let mut eni = build_eni(t, s, &spec, 1).map_err(as_config_error)?;
        // Requester-managed: no security groups, forwards clients' traffic.
        eni.groups.clear();
        eni.source_dest_check = false;
        let mut node = LbNode {
            subnet_id: s.id.clone(),
            az: s.az.clone(),
            eni_id: eni.id.clone(),
            private_ip: eni.primary_ip().to_string(),
            allocation_id: None,
            public_ip: None,
        };
        match &m.allocation {
            Some(a) => {
                EIPALLOC.check(a).map_err(|_| {
                    ApiError::new(
                        "AllocationIdNotFound",
                        format!("Elastic IP allocation '{a}' not found"),
                    )
                })?;
                let mut addr = t.get::<Address>(a).cloned().ok_or_else(|| {
                    ApiError::new(
                        "AllocationIdNotFound",
                        format!("Elastic IP allocation '{a}' not found"),
                    )
                })?;
                if addr.association.is_some() {
                    return Err(ApiError::new(
                        "ResourceInUse",
                        format!("Elastic IP allocation '{a}' is already associated"),
                    ));
                }
                addr.association = Some(EipAssociation {
                    id: new_id("eipassoc-"),
                    eni_id: eni.id.clone(),
                    private_ip: node.private_ip.clone(),
                });
                node.allocation_id = Some(addr.id.clone());
                node.public_ip = Some(addr.public_ip.clone());
                t.put(addr);
            }
            None if scheme == "internet-facing" => {
                // An AWS-assigned public address from the pool (like a
                // launch public IP: not an allocation).
                let ip = net::ip_string(pubip::free_public(t, api.config.public_pool)?);
                eni.public_ip = Some(ip.clone());
                node.public_ip = Some(ip);
            }
            None => {}
        }
        nodes.push(node);
        t.put(eni);
    }
    let region = arn_prefix(api)
        .split(':')
        .nth(3)
        .unwrap_or("us-east-1")
        .to_string();
    let lb = LoadBalancer {
        id,
        name: name.to_string(),
        scheme: scheme.to_string(),
        vpc_id,
        state: LbState::Provisioning,
        created: now_ms(),
        dns_name: format!("{name}-{hex}.elb.{region}.amazonaws.com"),
        nodes,
        tags: tags.clone(),
    };
    t.put(lb.clone());
    Ok((lb, true))
}

pub fn create_load_balancer(api: &Api, p: &Params) -> Result<String, ApiError> {
    let name = req(p, "Name")?;
    check_name("Load balancer", name)?;
    if name.starts_with("internal-") {
        return Err(validation(
            "Load balancer names cannot start with 'internal-'",
        ));
    }
    match p.get("Type").unwrap_or("application") {
        "network" => {}
        t @ ("application" | "gateway") => {
            return Err(config_error(format!(
                "Load balancer type '{t}' is not supported by enilab; use Type=network"
            )))
        }
        t => return Err(validation(format!("Invalid load balancer type '{t}'"))),
    }
    let scheme = p.get("Scheme").unwrap_or("internet-facing");
    if scheme != "internet-facing" && scheme != "internal" {
        return Err(validation(format!(
            "Invalid Scheme '{scheme}' (internet-facing or internal)"
        )));
    }
    if let Some(t) = p.get("IpAddressType") {
        if t != "ipv4" {
            return Err(config_error(format!(
                "IpAddressType '{t}' is not supported by enilab (ipv4 only)"
            )));
        }
    }
    if !members(p, "SecurityGroups")?.is_empty() {
        return Err(config_error(
            "Security groups on network load balancers are not supported by enilab",
        ));
    }
    let maps = mappings(p)?;
    let tags = tags_of(p)?;
    let (lb, new) = api
        .store
        .write(|t| create_in(api, t, name, scheme, &maps, &tags))?;
    if new {
        api.jobs.push(Job::LoadBalancer(lb.id.clone()));
    }
    let mut x = Xml::new();
    x.members("LoadBalancers", [&lb], |x, lb| write_lb(x, api, lb));
    Ok(x.finish())
}

pub fn describe_load_balancers(api: &Api, p: &Params) -> Result<String, ApiError> {
    let arns = members(p, "LoadBalancerArns")?;
    let names = members(p, "Names")?;
    if !arns.is_empty() && !names.is_empty() {
        return Err(validation(
            "Load balancer ARNs and names cannot be specified at the same time",
        ));
    }
    let pg = marker_page(p)?;
    api.store.read(|st| {
        let mut sel: Vec<&LoadBalancer> = if !arns.is_empty() {
            arns.iter()
                .map(|a| get_lb(api, st, a))
                .collect::<Result<_, _>>()?
        } else if !names.is_empty() {
            let mut v = Vec::new();
            for n in &names {
                let lb = st
                    .iter::<LoadBalancer>()
                    .find(|l| l.name == *n)
                    .ok_or_else(|| {
                        ApiError::new(
                            "LoadBalancerNotFound",
                            format!("Load balancers '[{n}]' not found"),
                        )
                    })?;
                v.push(lb);
            }
            v
        } else {
            st.iter::<LoadBalancer>().collect()
        };
        sel.sort_by(|a, b| a.id.cmp(&b.id));
        sel.dedup_by(|a, b| a.id == b.id);
        let (sel, marker) = paginate(sel, |l| &l.id, &pg);
        let mut x = Xml::new();
        x.members("LoadBalancers", sel, |x, lb| write_lb(x, api, lb));
        x.opt("NextMarker", marker.as_deref());
        Ok(x.finish())
    })
}

/// Remove a load balancer: its listeners, interfaces (their Elastic IPs
/// are disassociated, not released) and itself.
fn remove_lb(t: &mut Txn<'_>, lb: &LoadBalancer) {
    let listeners: Vec<String> = t
        .iter::<Listener>()
        .filter(|l| l.lb_id == lb.id)
        .map(|l| l.id.clone())
        .collect();
    for l in listeners {
        t.remove(&l);
    }
    for n in &lb.nodes {
        if t.contains(&n.eni_id) {
            remove_eni(t, &n.eni_id);
        }
    }
    t.remove(&lb.id);
}

pub fn delete_load_balancer(api: &Api, p: &Params) -> Result<String, ApiError> {
    let a = req(p, "LoadBalancerArn")?;
    api.store.write(|t| {
        // As in AWS, deleting one that does not exist succeeds.
        let lb = match get_lb(api, t, a) {
            Ok(lb) => lb.clone(),
            Err(e) if e.code() == "LoadBalancerNotFound" => return Ok(()),
            Err(e) => return Err(e),
        };
        remove_lb(t, &lb);
        Ok(())
    })?;
    Ok(String::new())
}

/// The load balancers whose listeners forward to `tg`.
pub fn lbs_of_tg<'a>(st: &'a State, tg: &str) -> Vec<&'a str> {
    let mut v: Vec<&str> = st
        .iter::<Listener>()
        .filter(|l| l.target_group == tg)
        .map(|l| l.lb_id.as_str())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

//! Elastic IP addresses from the configured public pool.

use crate::store::ids::new_id;
use crate::store::model::*;
use crate::store::net;
use crate::store::State;

use super::common::*;
use super::eni::eip_on;
use super::pubip;
use super::query::Params;
use super::vpc::{fresh, ret_true};
use super::xml::Xml;
use super::{Api, ApiError};

fn write_address(x: &mut Xml, st: &State, a: &Address, owner: &str) {
    x.text("publicIp", &a.public_ip)
        .text("allocationId", &a.id)
        .text("domain", "vpc")
        .text("publicIpv4Pool", "amazon")
        .text("networkBorderGroup", "us-east-1");
    if let Some(s) = &a.association {
        x.text("associationId", &s.id)
            .text("networkInterfaceId", &s.eni_id)
            .text("networkInterfaceOwnerId", owner)
            .text("privateIpAddress", &s.private_ip);
        if let Some(att) = st.get::<Eni>(&s.eni_id).and_then(|e| e.attachment.as_ref()) {
            x.text("instanceId", &att.instance_id);
        }
    }
    x.tags(&a.tags);
}

pub fn allocate_address(api: &Api, p: &Params) -> Result<String, ApiError> {
    if let Some(d) = p.get("Domain") {
        if d != "vpc" {
            return Err(ApiError::invalid(format!(
                "Invalid value '{d}' for Domain; only 'vpc' is supported."
            )));
        }
    }
    let wanted = p.get("Address");
    let tags = tag_spec(p, "elastic-ip", &["elastic-ip"])?;
    let pool = api.config.public_pool;
    let a = api.store.write(|t| {
        // Launch public IPs come from the same pool.
        let used = pubip::used_public(t);
        let ip = match wanted {
            Some(w) => {
                let ip = net::parse_ip(w).ok_or_else(|| {
                    ApiError::invalid(format!("Invalid value '{w}' for Address."))
                })?;
                if !pool.contains(ip) {
                    return Err(ApiError::invalid(format!(
                        "Address {w} is not in the public address pool {pool}."
                    )));
                }
                if used.contains(&ip) {
                    return Err(ApiError::new(
                        "InvalidAddress.InUse",
                        format!("Address {w} is already allocated."),
                    ));
                }
                ip
            }
            None => pubip::free_public(t, pool).map_err(|_| {
                ApiError::new(
                    "AddressLimitExceeded",
                    "The maximum number of addresses has been reached.".to_string(),
                )
            })?,
        };
        let a = Address {
            id: fresh(t, "eipalloc-"),
            public_ip: net::ip_string(ip),
            association: None,
            tags,
        };
        t.put(a.clone());
        Ok(a)
    })?;
    let mut x = Xml::new();
    x.text("publicIp", &a.public_ip)
        .text("allocationId", &a.id)
        .text("domain", "vpc")
        .text("publicIpv4Pool", "amazon")
        .text("networkBorderGroup", "us-east-1");
    Ok(x.finish())
}

/// Addresses on a NAT gateway's or load balancer's interface are theirs:
/// they change with the gateway or load balancer, not by these calls.
fn refuse_managed(st: &State, eni: &str) -> Result<(), ApiError> {
    match super::natgw::managed_interface(st, eni) {
        Some(kind) => Err(ApiError::new(
            "OperationNotPermitted",
            format!("The network interface {eni} is managed by a {kind} and its addresses cannot be changed directly."),
        )),
        None => Ok(()),
    }
}

/// The address a request names by AllocationId or PublicIp.
fn target<'a>(st: &'a State, p: &Params) -> Result<&'a Address, ApiError> {
    if let Some(id) = p.get("AllocationId") {
        return EIPALLOC.get::<Address>(st, id);
    }
    let ip = p
        .get("PublicIp")
        .ok_or_else(|| ApiError::missing("AllocationId"))?;
    st.iter::<Address>()
        .find(|a| a.public_ip == ip)
        .ok_or_else(|| {
            ApiError::new(
                "InvalidAddress.NotFound",
                format!("Address '{ip}' not found."),
            )
        })
}

pub fn associate_address(api: &Api, p: &Params) -> Result<String, ApiError> {
    let pool = api.config.public_pool;
    let reassoc = opt_bool(p, "AllowReassociation")?.unwrap_or(false);
    let assoc = api.store.write(|t| {
        let mut addr = target(t, p)?.clone();
        let eni = match (p.get("NetworkInterfaceId"), p.get("InstanceId")) {
            (Some(e), _) => ENI.get::<Eni>(t, e)?.clone(),
            (None, Some(i)) => {
                let inst = INSTANCE.get::<Instance>(t, i)?;
                if inst.state.gone() {
                    return Err(ApiError::new(
                        "IncorrectInstanceState",
                        format!("The instance '{i}' is not in a valid state for this operation."),
                    ));
                }
                t.iter::<Eni>()
                    .find(|e| {
                        e.attachment.as_ref().is_some_and(|a| {
                            a.instance_id == inst.id && a.device_index == 0 && a.card_index == 0
                        })
                    })
                    .cloned()
                    .ok_or_else(|| {
                        ApiError::invalid(format!(
                            "The instance '{i}' has no primary network interface."
                        ))
                    })?
            }
            (None, None) => return Err(ApiError::missing("NetworkInterfaceId or InstanceId")),
        };
        refuse_managed(t, &eni.id)?;
        if let Some(s) = &addr.association {
            refuse_managed(t, &s.eni_id)?;
        }
        let private_ip = p
            .get("PrivateIpAddress")
            .unwrap_or(eni.primary_ip())
            .to_string();
        if !eni.has_ip(&private_ip) {
            return Err(ApiError::invalid(format!(
                "The private IP address {private_ip} is not assigned to network interface {}.",
                eni.id
            )));
        }
        if !t
            .iter::<InternetGateway>()
            .any(|g| g.vpc_id.as_deref() == Some(eni.vpc_id.as_str()))
        {
            return Err(ApiError::new(
                "Gateway.NotAttached",
                format!(
                    "Network {} is not attached to any internet gateway",
                    eni.vpc_id
                ),
            ));
        }
        if let Some(s) = &addr.association {
            if s.eni_id == eni.id && s.private_ip == private_ip {
                return Ok(s.id.clone());
            }
            if !reassoc {
                return Err(ApiError::new(
                    "Resource.AlreadyAssociated",
                    format!(
                        "resource {} is already associated with associate-id {}",
                        addr.id, s.id
                    ),
                ));
            }
        }
        // An address already on that private IP is replaced (it stays allocated).
        if let Some(mut other) = eip_on(t, &eni.id, &private_ip).cloned() {
            if other.id != addr.id {
                other.association = None;
                t.put(other);
            }
        }
        let id = new_id("eipassoc-");
        let before = addr.association.as_ref().map(|s| s.eni_id.clone());
        addr.association = Some(EipAssociation {
            id: id.clone(),
            eni_id: eni.id.clone(),
            private_ip,
        });
        t.put(addr);
        // An Elastic IP on the primary address replaces the launch public
        // IP; the interface it was taken from gets a new one (best effort:
        // a full pool leaves it without).
        pubip::sync_eni(t, None, &eni.id)?;
        if let Some(prev) = before.filter(|p| *p != eni.id) {
            if pubip::sync_eni(t, Some(pool), &prev).is_err() {
                pubip::sync_eni(t, None, &prev)?;
            }
        }
        Ok(id)
    })?;
    let mut x = Xml::new();
    x.text("return", "true").text("associationId", &assoc);
    Ok(x.finish())
}

pub fn disassociate_address(api: &Api, p: &Params) -> Result<String, ApiError> {
    let pool = api.config.public_pool;
    api.store.write(|t| {
        let mut addr = match p.get("AssociationId") {
            Some(id) => {
                EIPASSOC.check(id)?;
                t.iter::<Address>()
                    .find(|a| a.association.as_ref().is_some_and(|s| s.id == id))
                    .cloned()
                    .ok_or_else(|| EIPASSOC.not_found(id))?
            }
            None => {
                let a = target(t, p)
                    .map_err(|_| ApiError::missing("AssociationId"))?
                    .clone();
                if a.association.is_none() {
                    return Err(ApiError::new(
                        "InvalidAssociationID.NotFound",
                        format!("Address {} is not associated.", a.public_ip),
                    ));
                }
                a
            }
        };
        if let Some(s) = &addr.association {
            refuse_managed(t, &s.eni_id)?;
        }
        let eni = addr.association.take().map(|s| s.eni_id);
        t.put(addr);
        // An interface launched with a public IP gets a new one (AWS does
        // the same); a full pool leaves it without.
        if let Some(e) = eni {
            let _ = pubip::sync_eni(t, Some(pool), &e);
        }
        Ok(())
    })?;
    Ok(ret_true())
}

pub fn release_address(api: &Api, p: &Params) -> Result<String, ApiError> {
    api.store.write(|t| {
        let a = target(t, p)?.clone();
        if a.association.is_some() {
            return Err(ApiError::new(
                "InvalidIPAddress.InUse",
                format!("Address {} is in use; disassociate it first.", a.public_ip),
            ));
        }
        t.remove(&a.id);
        Ok(())
    })?;
    Ok(ret_true())
}

const EIP_FILTERS: &[&str] = &[
    "allocation-id",
    "association-id",
    "domain",
    "instance-id",
    "network-interface-id",
    "network-interface-owner-id",
    "private-ip-address",
    "public-ip",
];

pub fn describe_addresses(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "AllocationId")?;
    let ips = list(p, "PublicIp")?;
    let fl = filters(p, EIP_FILTERS)?;
    let pg = page(p, !ids.is_empty() || !ips.is_empty())?;
    let owner = &api.config.account_id;
    api.store.read(|st| {
        let mut all = EIPALLOC.get_many::<Address>(st, &ids)?;
        if !ips.is_empty() {
            for ip in &ips {
                if !all.iter().any(|a| a.public_ip == *ip) {
                    return Err(ApiError::new(
                        "InvalidAddress.NotFound",
                        format!("Address '{ip}' not found."),
                    ));
                }
            }
            all.retain(|a| ips.contains(&a.public_ip.as_str()));
        }
        let sel: Vec<&Address> = all
            .into_iter()
            .filter(|a| {
                filter_match(&fl, &a.tags, |n| {
                    let s = a.association.as_ref();
                    match n {
                        "allocation-id" => vec![a.id.clone()],
                        "association-id" => s.map(|s| s.id.clone()).into_iter().collect(),
                        "domain" => vec!["vpc".into()],
                        "instance-id" => s
                            .and_then(|s| st.get::<Eni>(&s.eni_id))
                            .and_then(|e| e.attachment.as_ref())
                            .map(|x| x.instance_id.clone())
                            .into_iter()
                            .collect(),
                        "network-interface-id" => s.map(|s| s.eni_id.clone()).into_iter().collect(),
                        "network-interface-owner-id" => {
                            s.map(|_| owner.clone()).into_iter().collect()
                        }
                        "private-ip-address" => {
                            s.map(|s| s.private_ip.clone()).into_iter().collect()
                        }
                        "public-ip" => vec![a.public_ip.clone()],
                        _ => vec![],
                    }
                })
            })
            .collect();
        let (sel, token) = paginate(sel, |a| &a.id, &pg);
        let mut x = Xml::new();
        x.set("addressesSet", sel, |x, a| write_address(x, st, a, owner));
        x.opt("nextToken", token.as_deref());
        Ok(x.finish())
    })
}

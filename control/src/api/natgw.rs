//! NAT gateways: CreateNatGateway, DeleteNatGateway, DescribeNatGateways.
//!
//! As in AWS a gateway owns a requester-managed interface in its subnet
//! (no security groups, source/destination check off) and, when public,
//! its Elastic IPs are associated with that interface's private addresses
//! (so DescribeAddresses shows them). States: `pending` → `available`
//! (a job, at once here), `deleting` → `deleted` (a job: the interface is
//! deleted, the addresses disassociated). Deleted gateways stay
//! describable for an hour, then are purged. The datapath reads the stored
//! [`NatGateway`] (see `docs/api.md`).

use std::collections::BTreeSet;

use crate::store::ids::new_id;
use crate::store::model::*;
use crate::store::{State, Txn};

use super::common::*;
use super::driver::Job;
use super::eni::{build_eni, remove_eni, EniSpec};
use super::query::Params;
use super::vpc::fresh;
use super::xml::Xml;
use super::{Api, ApiError};

/// How long a deleted gateway stays visible (AWS: about an hour).
pub const DELETED_VISIBLE_MS: u64 = 3_600_000;
/// Secondary Elastic IPs of a public gateway (AWS's default quota: 8 in all).
pub const MAX_SECONDARY_ALLOCATIONS: usize = 7;
/// Secondary private addresses of a private gateway (AWS: 31).
pub const MAX_SECONDARY_PRIVATE: usize = 31;

/// The interface type of a requester-managed interface (`nat_gateway`,
/// `network_load_balancer`), None for an ordinary one. For
/// DescribeNetworkInterfaces (`interfaceType`, `requesterManaged`) and to
/// refuse deleting or attaching such an interface.
pub fn managed_interface(st: &State, eni_id: &str) -> Option<&'static str> {
    if st
        .iter::<NatGateway>()
        .any(|n| n.eni_id == eni_id && !n.state.gone())
    {
        return Some("nat_gateway");
    }
    if st
        .iter::<LoadBalancer>()
        .any(|lb| lb.nodes.iter().any(|n| n.eni_id == eni_id))
    {
        return Some("network_load_balancer");
    }
    None
}

fn address_status(n: &NatGateway) -> &'static str {
    let public = n.connectivity == "public";
    match (n.state, public) {
        (NatState::Pending, true) => "associating",
        (NatState::Pending, false) => "assigning",
        (NatState::Deleting, true) => "disassociating",
        (NatState::Deleting, false) => "unassigning",
        (NatState::Failed, _) => "failed",
        _ => "succeeded",
    }
}

fn write_nat(x: &mut Xml, n: &NatGateway) {
    x.text("createTime", &iso8601(n.create_time));
    if let Some(d) = n.delete_time {
        x.text("deleteTime", &iso8601(d));
    }
    x.set("natGatewayAddressSet", &n.addresses, |x, a| {
        x.opt("allocationId", a.allocation_id.as_deref())
            .text("networkInterfaceId", &n.eni_id)
            .text("privateIp", &a.private_ip)
            .opt("publicIp", a.public_ip.as_deref())
            .opt("associationId", a.association_id.as_deref())
            .bool("isPrimary", a.is_primary)
            .text("status", address_status(n));
    });
    x.text("natGatewayId", &n.id)
        .text("state", n.state.as_str())
        .text("subnetId", &n.subnet_id)
        .text("vpcId", &n.vpc_id)
        .tags(&n.tags);
    x.text("connectivityType", &n.connectivity);
}

/// What CreateNatGateway asks for, read before taking the lock.
struct NatRequest<'a> {
    subnet_id: &'a str,
    public: bool,
    allocation: Option<&'a str>,
    secondary_allocations: Vec<&'a str>,
    private_ip: Option<&'a str>,
    secondary_ips: Vec<&'a str>,
    secondary_count: usize,
    token: Option<&'a str>,
    tags: Tags,
}

fn parse_request(p: &Params) -> Result<NatRequest<'_>, ApiError> {
    let subnet_id = req(p, "SubnetId")?;
    let public = match p.get("ConnectivityType").unwrap_or("public") {
        "public" => true,
        "private" => false,
        o => {
            return Err(ApiError::invalid(format!(
                "Invalid value '{o}' for ConnectivityType. Valid values: public, private."
            )))
        }
    };
    if p.contains("AvailabilityMode") && p.get("AvailabilityMode") != Some("zonal") {
        return Err(ApiError::invalid(
            "enilab supports only zonal NAT gateways (AvailabilityMode=zonal)".to_string(),
        ));
    }
    let allocation = p.get("AllocationId").filter(|a| !a.is_empty());
    let secondary_allocations = list(p, "SecondaryAllocationId")?;
    let secondary_ips = list(p, "SecondaryPrivateIpAddress")?;
    let secondary_count = opt_int_in(
        p,
        "SecondaryPrivateIpAddressCount",
        1,
        MAX_SECONDARY_PRIVATE as i64,
    )?
    .unwrap_or(0) as usize;
    if public && allocation.is_none() {
        return Err(ApiError::missing("AllocationId"));
    }
    if !public && (allocation.is_some() || !secondary_allocations.is_empty()) {
        return Err(ApiError::combination(
            "A private NAT gateway cannot have Elastic IP addresses (AllocationId, SecondaryAllocationId)"
                .to_string(),
        ));
    }
    if !secondary_ips.is_empty() && secondary_count > 0 {
        return Err(ApiError::combination(
            "Specify either SecondaryPrivateIpAddress or SecondaryPrivateIpAddressCount, not both"
                .to_string(),
        ));
    }
    if public {
        if secondary_allocations.len() > MAX_SECONDARY_ALLOCATIONS {
            return Err(ApiError::new(
                "AddressLimitExceeded",
                format!(
                    "A NAT gateway can have at most {} Elastic IP addresses",
                    MAX_SECONDARY_ALLOCATIONS + 1
                ),
            ));
        }
        // Secondary private addresses of a public gateway pair with its
        // secondary Elastic IPs.
        if secondary_count > 0
            || (!secondary_ips.is_empty() && secondary_ips.len() != secondary_allocations.len())
        {
            return Err(ApiError::combination(
                "For a public NAT gateway, give one SecondaryPrivateIpAddress per SecondaryAllocationId or none"
                    .to_string(),
            ));
        }
    } else if secondary_ips.len() > MAX_SECONDARY_PRIVATE {
        return Err(ApiError::new(
            "PrivateIpAddressLimitExceeded",
            format!("A NAT gateway can have at most {MAX_SECONDARY_PRIVATE} secondary addresses"),
        ));
    }
    let mut seen = BTreeSet::new();
    for a in allocation.iter().chain(secondary_allocations.iter()) {
        EIPALLOC.check(a)?;
        if !seen.insert(*a) {
            return Err(ApiError::invalid(format!(
                "The allocation ID '{a}' is given more than once"
            )));
        }
    }
    Ok(NatRequest {
        subnet_id,
        public,
        allocation,
        secondary_allocations,
        private_ip: p.get("PrivateIpAddress").filter(|s| !s.is_empty()),
        secondary_ips,
        secondary_count,
        token: p.get("ClientToken").filter(|t| !t.is_empty()),
        tags: tag_spec(p, "natgateway", &["natgateway"])?,
    })
}

fn create_in(t: &mut Txn<'_>, r: &NatRequest<'_>) -> Result<(NatGateway, bool), ApiError> {
    // Idempotency: the same ClientToken returns the first call's gateway.
    if let Some(tok) = r.token {
        if let Some(n) = t
            .iter::<NatGateway>()
            .find(|n| n.client_token.as_deref() == Some(tok))
        {
            if n.subnet_id != r.subnet_id {
                return Err(ApiError::new(
                    "IdempotentParameterMismatch",
                    format!("The client token '{tok}' was used with different parameters"),
                ));
            }
            return Ok((n.clone(), false));
        }
    }
    purge_deleted(t);
    let subnet = SUBNET.get::<Subnet>(t, r.subnet_id)?.clone();
    if r.public
        && !t
            .iter::<InternetGateway>()
            .any(|g| g.vpc_id.as_deref() == Some(subnet.vpc_id.as_str()))
    {
        return Err(ApiError::new(
            "Gateway.NotAttached",
            format!("Network {} has no Internet gateway attached", subnet.vpc_id),
        ));
    }
    let mut allocs: Vec<Address> = Vec::new();
    for a in r.allocation.iter().chain(r.secondary_allocations.iter()) {
        let addr = EIPALLOC.get::<Address>(t, a)?;
        if let Some(s) = &addr.association {
            return Err(ApiError::new(
                "Resource.AlreadyAssociated",
                format!(
                    "Elastic IP address [{a}] is already associated (association {})",
                    s.id
                ),
            ));
        }
        allocs.push(addr.clone());
    }
    let id = fresh(t, "nat-");
    let spec = EniSpec {
        description: format!("Interface for NAT Gateway {id}"),
        primary_ip: r.private_ip.map(String::from),
        secondary_ips: r.secondary_ips.iter().map(|s| s.to_string()).collect(),
        secondary_count: if r.public {
            // One secondary address per secondary Elastic IP.
            if r.secondary_ips.is_empty() {
                r.secondary_allocations.len() as u32
            } else {
                0
            }
        } else {
            r.secondary_count as u32
        },
        ..Default::default()
    };
    let mut eni = build_eni(t, &subnet, &spec, (MAX_SECONDARY_PRIVATE + 1) as u32)?;
    // Requester-managed: no security groups, forwards others' traffic.
    eni.groups.clear();
    eni.source_dest_check = false;
    let mut addresses = Vec::new();
    for (i, pip) in eni.private_ips.iter().enumerate() {
        let mut a = NatAddress {
            allocation_id: None,
            public_ip: None,
            association_id: None,
            private_ip: pip.ip.clone(),
            is_primary: pip.primary,
        };
        if let Some(mut addr) = allocs.get(i).cloned() {
            let assoc = new_id("eipassoc-");
            addr.association = Some(EipAssociation {
                id: assoc.clone(),
                eni_id: eni.id.clone(),
                private_ip: pip.ip.clone(),
            });
            a.allocation_id = Some(addr.id.clone());
            a.public_ip = Some(addr.public_ip.clone());
            a.association_id = Some(assoc);
            t.put(addr);
        }
        addresses.push(a);
    }
    let n = NatGateway {
        id,
        vpc_id: subnet.vpc_id.clone(),
        subnet_id: subnet.id.clone(),
        eni_id: eni.id.clone(),
        connectivity: if r.public { "public" } else { "private" }.to_string(),
        addresses,
        state: NatState::Pending,
        create_time: now_ms(),
        delete_time: None,
        client_token: r.token.map(String::from),
        tags: r.tags.clone(),
    };
    t.put(eni);
    t.put(n.clone());
    Ok((n, true))
}

pub fn create_nat_gateway(api: &Api, p: &Params) -> Result<String, ApiError> {
    let r = parse_request(p)?;
    let (n, new) = api.store.write(|t| create_in(t, &r))?;
    if new {
        api.jobs.push(Job::NatGateway(n.id.clone()));
    }
    let mut x = Xml::new();
    x.opt("clientToken", r.token);
    x.elem("natGateway", |x| write_nat(x, &n));
    Ok(x.finish())
}

/// Drop gateways deleted more than [`DELETED_VISIBLE_MS`] ago.
fn purge_deleted(t: &mut Txn<'_>) {
    let now = now_ms();
    let old: Vec<String> = t
        .iter::<NatGateway>()
        .filter(|n| {
            n.state == NatState::Deleted
                && n.delete_time
                    .is_some_and(|d| now.saturating_sub(d) > DELETED_VISIBLE_MS)
        })
        .map(|n| n.id.clone())
        .collect();
    for id in old {
        t.remove(&id);
    }
}

pub fn delete_nat_gateway(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "NatGatewayId")?;
    let queued = api.store.write(|t| {
        let mut n = NATGW.get::<NatGateway>(t, id)?.clone();
        match n.state {
            NatState::Deleted => return Err(NATGW.not_found(id)),
            // Asked again while deleting: the same answer.
            NatState::Deleting => return Ok(false),
            _ => {}
        }
        n.state = NatState::Deleting;
        n.delete_time = Some(now_ms());
        t.put(n);
        Ok(true)
    })?;
    if queued {
        api.jobs.push(Job::NatGateway(id.to_string()));
    }
    let mut x = Xml::new();
    x.text("natGatewayId", id);
    Ok(x.finish())
}

/// The job: pending → available; deleting → deleted, releasing the
/// interface and the Elastic IPs.
pub fn finish(t: &mut Txn<'_>, id: &str) -> Result<(), ApiError> {
    let Some(mut n) = t.get::<NatGateway>(id).cloned() else {
        return Ok(());
    };
    match n.state {
        NatState::Pending => {
            n.state = NatState::Available;
            t.put(n);
        }
        NatState::Deleting => {
            if t.contains(&n.eni_id) {
                remove_eni(t, &n.eni_id);
            }
            // remove_eni drops associations on the interface; drop any
            // left pointing at it by ID too (a reassociated address is
            // someone else's now and stays).
            for a in &mut n.addresses {
                a.association_id = None;
            }
            n.state = NatState::Deleted;
            t.put(n);
        }
        _ => {}
    }
    Ok(())
}

const NAT_FILTERS: &[&str] = &["nat-gateway-id", "state", "subnet-id", "vpc-id"];

pub fn describe_nat_gateways(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "NatGatewayId")?;
    let fl = filters(p, NAT_FILTERS)?;
    let pg = page(p, !ids.is_empty())?;
    let now = now_ms();
    api.store.read(|st| {
        let sel: Vec<&NatGateway> = NATGW
            .get_many::<NatGateway>(st, &ids)?
            .into_iter()
            .filter(|n| {
                n.state != NatState::Deleted
                    || n.delete_time
                        .is_none_or(|d| now.saturating_sub(d) <= DELETED_VISIBLE_MS)
            })
            .filter(|n| {
                filter_match(&fl, &n.tags, |f| match f {
                    "nat-gateway-id" => vec![n.id.clone()],
                    "state" => vec![n.state.as_str().to_string()],
                    "subnet-id" => vec![n.subnet_id.clone()],
                    "vpc-id" => vec![n.vpc_id.clone()],
                    _ => vec![],
                })
            })
            .collect();
        let (sel, token) = paginate(sel, |n| &n.id, &pg);
        let mut x = Xml::new();
        x.set("natGatewaySet", sel, write_nat);
        x.opt("nextToken", token.as_deref());
        Ok(x.finish())
    })
}

/// NAT gateways the datapath should serve: available ones, with their
/// interface and addresses (the stored model is the read model).
pub fn active_nat_gateways(st: &State) -> impl Iterator<Item = &NatGateway> + '_ {
    st.iter::<NatGateway>()
        .filter(|n| n.state == NatState::Available)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_parameters_fixture() {
        let a = "eipalloc-0123456789abcdef0";
        let b = "eipalloc-0123456789abcdef1";
        // (parameters, expected error code or "")
        let table: &[(&[(&str, &str)], &str)] = &[
            (&[("SubnetId", "subnet-1"), ("AllocationId", a)], ""),
            (&[("AllocationId", a)], "MissingParameter"),
            (&[("SubnetId", "subnet-1")], "MissingParameter"),
            (
                &[("SubnetId", "subnet-1"), ("ConnectivityType", "private")],
                "",
            ),
            (
                &[
                    ("SubnetId", "subnet-1"),
                    ("ConnectivityType", "private"),
                    ("AllocationId", a),
                ],
                "InvalidParameterCombination",
            ),
            (
                &[("SubnetId", "subnet-1"), ("ConnectivityType", "nope")],
                "InvalidParameterValue",
            ),
            (
                &[("SubnetId", "subnet-1"), ("AllocationId", "x")],
                "InvalidAllocationID.Malformed",
            ),
            (
                &[
                    ("SubnetId", "subnet-1"),
                    ("AllocationId", a),
                    ("SecondaryAllocationId.1", a),
                ],
                "InvalidParameterValue",
            ),
            (
                &[
                    ("SubnetId", "subnet-1"),
                    ("AllocationId", a),
                    ("SecondaryAllocationId.1", b),
                ],
                "",
            ),
            (
                &[
                    ("SubnetId", "subnet-1"),
                    ("AllocationId", a),
                    ("SecondaryAllocationId.1", b),
                    ("SecondaryPrivateIpAddress.1", "10.0.0.9"),
                ],
                "",
            ),
            (
                &[
                    ("SubnetId", "subnet-1"),
                    ("AllocationId", a),
                    ("SecondaryPrivateIpAddressCount", "2"),
                ],
                "InvalidParameterCombination",
            ),
            (
                &[
                    ("SubnetId", "subnet-1"),
                    ("ConnectivityType", "private"),
                    ("SecondaryPrivateIpAddressCount", "31"),
                ],
                "",
            ),
            (
                &[
                    ("SubnetId", "subnet-1"),
                    ("ConnectivityType", "private"),
                    ("SecondaryPrivateIpAddressCount", "32"),
                ],
                "InvalidParameterValue",
            ),
            (
                &[
                    ("SubnetId", "subnet-1"),
                    ("ConnectivityType", "private"),
                    ("SecondaryPrivateIpAddressCount", "1"),
                    ("SecondaryPrivateIpAddress.1", "10.0.0.9"),
                ],
                "InvalidParameterCombination",
            ),
            (
                &[
                    ("SubnetId", "subnet-1"),
                    ("ConnectivityType", "private"),
                    ("AvailabilityMode", "regional"),
                ],
                "InvalidParameterValue",
            ),
            (
                &[
                    ("SubnetId", "subnet-1"),
                    ("AllocationId", a),
                    ("TagSpecification.1.ResourceType", "vpc"),
                ],
                "InvalidParameterValue",
            ),
        ];
        for (params, want) in table {
            let p = Params::from_pairs(params.iter().copied());
            match (parse_request(&p), *want) {
                (Ok(_), "") => {}
                (Err(e), w) if e.code() == w => {}
                (Ok(_), w) => panic!("{params:?}: accepted, want {w}"),
                (Err(e), w) => panic!("{params:?}: got {}, want {w:?}", e.code()),
            }
        }
    }

    #[test]
    fn too_many_secondary_allocations() {
        let ids: Vec<String> = (0..8)
            .map(|i| format!("eipalloc-012345678{i:08x}"))
            .collect();
        let mut pairs = vec![
            ("SubnetId".to_string(), "subnet-1".to_string()),
            (
                "AllocationId".to_string(),
                "eipalloc-0aaaaaaaaaaaaaaaa".to_string(),
            ),
        ];
        for (n, id) in ids.iter().enumerate() {
            pairs.push((format!("SecondaryAllocationId.{}", n + 1), id.clone()));
        }
        let p = Params::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let e = parse_request(&p).err().map(|e| e.code().to_string());
        assert_eq!(e.as_deref(), Some("AddressLimitExceeded"));
        let p = Params::from_pairs(pairs[..9].iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert!(parse_request(&p).is_ok());
    }
}

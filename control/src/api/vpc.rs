//! VPCs and subnets, and the defaults every VPC gets (main route table,
//! default network ACL, default security group).

use crate::store::ids::new_id;
use crate::store::model::*;
use crate::store::net::{self, Cidr};
use crate::store::{State, Txn};

use super::common::{self, *};
use super::query::Params;
use super::xml::Xml;
use super::{acl, sg, Api, ApiError};

pub fn write_vpc(x: &mut Xml, v: &Vpc, owner: &str) {
    x.text("vpcId", &v.id)
        .text("ownerId", owner)
        .text("state", "available")
        .text("cidrBlock", &v.cidr)
        .set("cidrBlockAssociationSet", [v], |x, v| {
            x.text("associationId", &v.cidr_assoc_id)
                .text("cidrBlock", &v.cidr)
                .elem("cidrBlockState", |x| {
                    x.text("state", "associated");
                });
        })
        .text("dhcpOptionsId", "default")
        .text("instanceTenancy", &v.tenancy)
        .bool("isDefault", false)
        .tags(&v.tags);
}

pub fn create_vpc(api: &Api, p: &Params) -> Result<String, ApiError> {
    let cidr_s = req(p, "CidrBlock")?;
    let cidr = Cidr::parse(cidr_s).map_err(|_| {
        ApiError::invalid(format!(
            "Value ({cidr_s}) for parameter cidrBlock is invalid. This is not a valid CIDR block."
        ))
    })?;
    if cidr.len < 16 || cidr.len > 28 {
        return Err(ApiError::new(
            "InvalidVpc.Range",
            format!("The CIDR '{cidr_s}' is invalid."),
        ));
    }
    let tenancy = p.get("InstanceTenancy").unwrap_or("default");
    if tenancy != "default" && tenancy != "dedicated" {
        return Err(ApiError::invalid(format!(
            "Invalid value '{tenancy}' for InstanceTenancy."
        )));
    }
    let tags = tag_spec(p, "vpc", &["vpc"])?;
    let vpc = api.store.write(|t| {
        let vpc = Vpc {
            id: fresh(t, "vpc-"),
            cidr: cidr.to_string(),
            cidr_assoc_id: new_id("vpc-cidr-assoc-"),
            tenancy: tenancy.to_string(),
            main_route_table: fresh(t, "rtb-"),
            default_acl: fresh(t, "acl-"),
            default_sg: fresh(t, "sg-"),
            tags,
        };
        t.put(RouteTable {
            id: vpc.main_route_table.clone(),
            vpc_id: vpc.id.clone(),
            routes: Vec::new(),
            associations: vec![RtbAssociation {
                id: new_id("rtbassoc-"),
                subnet_id: None,
                main: true,
            }],
            tags: Tags::new(),
        });
        t.put(NetworkAcl {
            id: vpc.default_acl.clone(),
            vpc_id: vpc.id.clone(),
            default: true,
            entries: acl::default_entries(),
            associations: Vec::new(),
            tags: Tags::new(),
        });
        t.put(sg::default_group(&vpc.default_sg, &vpc.id));
        t.put(vpc.clone());
        Ok::<_, ApiError>(vpc)
    })?;
    let mut x = Xml::new();
    x.elem("vpc", |x| write_vpc(x, &vpc, &api.config.account_id));
    Ok(x.finish())
}

/// An ID with `prefix` not yet used in the state.
pub fn fresh(st: &State, prefix: &str) -> String {
    loop {
        let id = new_id(prefix);
        if !st.contains(&id) {
            return id;
        }
    }
}

pub fn delete_vpc(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "VpcId")?;
    api.store.write(|t| {
        let vpc = VPC.get::<Vpc>(t, id)?.clone();
        let dep = || {
            ApiError::new(
                "DependencyViolation",
                format!("The vpc '{id}' has dependencies and cannot be deleted."),
            )
        };
        if t.iter::<Subnet>().any(|s| s.vpc_id == vpc.id)
            || t.iter::<Eni>().any(|e| e.vpc_id == vpc.id)
            || t.iter::<InternetGateway>()
                .any(|g| g.vpc_id.as_deref() == Some(id))
            || t.iter::<SecurityGroup>()
                .any(|g| g.vpc_id == vpc.id && g.id != vpc.default_sg)
            || t.iter::<RouteTable>()
                .any(|r| r.vpc_id == vpc.id && r.id != vpc.main_route_table)
            || t.iter::<NetworkAcl>()
                .any(|a| a.vpc_id == vpc.id && a.id != vpc.default_acl)
        {
            return Err(dep());
        }
        t.remove(&vpc.main_route_table);
        t.remove(&vpc.default_acl);
        t.remove(&vpc.default_sg);
        t.remove(&vpc.id);
        Ok(())
    })?;
    Ok(ret_true())
}

pub fn ret_true() -> String {
    "<return>true</return>".to_string()
}

const VPC_FILTERS: &[&str] = &[
    "vpc-id",
    "cidr",
    "cidr-block",
    "cidrBlock",
    "state",
    "is-default",
    "owner-id",
    "dhcp-options-id",
    "cidr-block-association.cidr-block",
];

pub fn describe_vpcs(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "VpcId")?;
    let fl = filters(p, VPC_FILTERS)?;
    let pg = page(p, !ids.is_empty())?;
    let owner = &api.config.account_id;
    api.store.read(|st| {
        let all = VPC.get_many::<Vpc>(st, &ids)?;
        let sel: Vec<&Vpc> = all
            .into_iter()
            .filter(|v| {
                filter_match(&fl, &v.tags, |n| match n {
                    "vpc-id" => vec![v.id.clone()],
                    "cidr" | "cidr-block" | "cidrBlock" | "cidr-block-association.cidr-block" => {
                        vec![v.cidr.clone()]
                    }
                    "state" => vec!["available".into()],
                    "is-default" => vec!["false".into()],
                    "owner-id" => vec![owner.clone()],
                    "dhcp-options-id" => vec!["default".into()],
                    _ => vec![],
                })
            })
            .collect();
        let (sel, token) = paginate(sel, |v| &v.id, &pg);
        let mut x = Xml::new();
        x.set("vpcSet", sel, |x, v| write_vpc(x, v, owner));
        x.opt("nextToken", token.as_deref());
        Ok(x.finish())
    })
}

// ----- subnets -----

/// Addresses in use in a subnet: ENI addresses and delegated prefixes.
pub fn used_addresses(st: &State, subnet_id: &str) -> std::collections::BTreeSet<u32> {
    let mut used = std::collections::BTreeSet::new();
    for e in st.iter::<Eni>().filter(|e| e.subnet_id == subnet_id) {
        for ip in &e.private_ips {
            if let Some(a) = net::parse_ip(&ip.ip) {
                used.insert(a);
            }
        }
        for pf in &e.prefixes {
            if let Ok(c) = Cidr::parse(pf) {
                for a in c.network()..=c.last() {
                    used.insert(a);
                }
            }
        }
    }
    used
}

pub fn available_count(st: &State, s: &Subnet) -> u64 {
    let Ok(c) = Cidr::parse(&s.cidr) else {
        return 0;
    };
    let total = c.size().saturating_sub(5);
    total.saturating_sub(used_addresses(st, &s.id).len() as u64)
}

pub fn write_subnet(x: &mut Xml, st: &State, s: &Subnet, owner: &str) {
    x.text("subnetId", &s.id)
        .text(
            "subnetArn",
            &format!("arn:aws:ec2:{}:{owner}:subnet/{}", region_of(&s.az), s.id),
        )
        .text("state", "available")
        .text("ownerId", owner)
        .text("vpcId", &s.vpc_id)
        .text("cidrBlock", &s.cidr)
        .num("availableIpAddressCount", available_count(st, s))
        .text("availabilityZone", &s.az)
        .text("availabilityZoneId", &az_id(&s.az))
        .bool("defaultForAz", false)
        .bool("mapPublicIpOnLaunch", s.map_public_ip_on_launch)
        .bool("assignIpv6AddressOnCreation", false)
        .tags(&s.tags);
}

pub fn region_of(az: &str) -> &str {
    az.strip_suffix(|c: char| c.is_ascii_lowercase())
        .unwrap_or(az)
}

fn az_id(az: &str) -> String {
    let letter = az
        .chars()
        .last()
        .map(|c| (c as u8).saturating_sub(b'a') + 1)
        .unwrap_or(1);
    format!("use1-az{letter}")
}

pub fn create_subnet(api: &Api, p: &Params) -> Result<String, ApiError> {
    let vpc_id = req(p, "VpcId")?;
    let cidr_s = req(p, "CidrBlock")?;
    let az = match p.get("AvailabilityZone") {
        Some(z) => {
            if !api.config.zones.iter().any(|c| c == z) {
                return Err(ApiError::invalid(format!(
                    "Value ({z}) for parameter availabilityZone is invalid. Subnets can currently only be created in the following availability zones: {}.",
                    api.config.zones.join(", ")
                )));
            }
            z.to_string()
        }
        None => api.config.zones.first().cloned().unwrap_or_default(),
    };
    let cidr = Cidr::parse(cidr_s).map_err(|_| {
        ApiError::invalid(format!(
            "Value ({cidr_s}) for parameter cidrBlock is invalid. This is not a valid CIDR block."
        ))
    })?;
    let tags = tag_spec(p, "subnet", &["subnet"])?;
    let s = api.store.write(|t| {
        let vpc = VPC.get::<Vpc>(t, vpc_id)?.clone();
        let vcidr =
            Cidr::parse(&vpc.cidr).map_err(|_| ApiError::internal("stored VPC CIDR is invalid"))?;
        if cidr.len < 16 || cidr.len > 28 || !vcidr.covers(&cidr) {
            return Err(ApiError::new(
                "InvalidSubnet.Range",
                format!("The CIDR '{cidr_s}' is invalid."),
            ));
        }
        if t.iter::<Subnet>()
            .any(|o| o.vpc_id == vpc.id && Cidr::parse(&o.cidr).is_ok_and(|c| c.overlaps(&cidr)))
        {
            return Err(ApiError::new(
                "InvalidSubnet.Conflict",
                format!("The CIDR '{cidr_s}' conflicts with another subnet"),
            ));
        }
        let s = Subnet {
            id: fresh(t, "subnet-"),
            vpc_id: vpc.id.clone(),
            cidr: cidr.to_string(),
            az,
            map_public_ip_on_launch: false,
            tags,
        };
        let mut nacl = t
            .get::<NetworkAcl>(&vpc.default_acl)
            .cloned()
            .ok_or_else(|| ApiError::internal("the VPC's default network ACL is missing"))?;
        nacl.associations.push(AclAssociation {
            id: new_id("aclassoc-"),
            subnet_id: s.id.clone(),
        });
        t.put(nacl);
        t.put(s.clone());
        Ok(s)
    })?;
    let owner = &api.config.account_id;
    api.store.read(|st| {
        let mut x = Xml::new();
        x.elem("subnet", |x| write_subnet(x, st, &s, owner));
        Ok(x.finish())
    })
}

pub fn delete_subnet(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "SubnetId")?;
    api.store.write(|t| {
        SUBNET.get::<Subnet>(t, id)?;
        if t.iter::<Eni>().any(|e| e.subnet_id == id)
            || t.iter::<Instance>()
                .any(|i| i.subnet_id == id && !matches!(i.state, InstanceState::Terminated))
        {
            return Err(ApiError::new(
                "DependencyViolation",
                format!("The subnet '{id}' has dependencies and cannot be deleted."),
            ));
        }
        let acls: Vec<NetworkAcl> = t
            .iter::<NetworkAcl>()
            .filter(|a| a.associations.iter().any(|s| s.subnet_id == id))
            .cloned()
            .collect();
        for mut a in acls {
            a.associations.retain(|s| s.subnet_id != id);
            t.put(a);
        }
        let rtbs: Vec<RouteTable> = t
            .iter::<RouteTable>()
            .filter(|r| {
                r.associations
                    .iter()
                    .any(|s| s.subnet_id.as_deref() == Some(id))
            })
            .cloned()
            .collect();
        for mut r in rtbs {
            r.associations
                .retain(|s| s.subnet_id.as_deref() != Some(id));
            t.put(r);
        }
        t.remove(id);
        Ok(())
    })?;
    Ok(ret_true())
}

const SUBNET_FILTERS: &[&str] = &[
    "subnet-id",
    "vpc-id",
    "cidr",
    "cidr-block",
    "cidrBlock",
    "availability-zone",
    "availabilityZone",
    "state",
    "map-public-ip-on-launch",
    "default-for-az",
    "owner-id",
    "available-ip-address-count",
];

pub fn describe_subnets(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "SubnetId")?;
    let fl = filters(p, SUBNET_FILTERS)?;
    let pg = page(p, !ids.is_empty())?;
    let owner = &api.config.account_id;
    api.store.read(|st| {
        let sel: Vec<&Subnet> = SUBNET
            .get_many::<Subnet>(st, &ids)?
            .into_iter()
            .filter(|s| {
                filter_match(&fl, &s.tags, |n| match n {
                    "subnet-id" => vec![s.id.clone()],
                    "vpc-id" => vec![s.vpc_id.clone()],
                    "cidr" | "cidr-block" | "cidrBlock" => vec![s.cidr.clone()],
                    "availability-zone" | "availabilityZone" => vec![s.az.clone()],
                    "state" => vec!["available".into()],
                    "map-public-ip-on-launch" => vec![s.map_public_ip_on_launch.to_string()],
                    "default-for-az" => vec!["false".into()],
                    "owner-id" => vec![owner.clone()],
                    "available-ip-address-count" => vec![available_count(st, s).to_string()],
                    _ => vec![],
                })
            })
            .collect();
        let (sel, token) = paginate(sel, |s| &s.id, &pg);
        let mut x = Xml::new();
        x.set("subnetSet", sel, |x, s| write_subnet(x, st, s, owner));
        x.opt("nextToken", token.as_deref());
        Ok(x.finish())
    })
}

pub fn modify_subnet_attribute(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "SubnetId")?;
    let map = common::opt_bool(p, "MapPublicIpOnLaunch.Value")?;
    let others = p.keys().any(|k| {
        k != "MapPublicIpOnLaunch.Value"
            && k != "SubnetId"
            && k != "Action"
            && k != "Version"
            && !k.starts_with("X-")
            && k != "DryRun"
    });
    let Some(map) = map else {
        return Err(if others {
            ApiError::invalid(
                "enilab supports only the MapPublicIpOnLaunch subnet attribute".to_string(),
            )
        } else {
            ApiError::missing("MapPublicIpOnLaunch.Value")
        });
    };
    api.store.write(|t: &mut Txn<'_>| {
        let mut s = SUBNET.get::<Subnet>(t, id)?.clone();
        s.map_public_ip_on_launch = map;
        t.put(s);
        Ok::<_, ApiError>(())
    })?;
    Ok(ret_true())
}

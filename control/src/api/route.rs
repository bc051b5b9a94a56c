//! Route tables, routes, their subnet associations, and internet gateways.

use crate::store::ids::new_id;
use crate::store::model::*;
use crate::store::net::Cidr;
use crate::store::State;

use super::common::*;
use super::query::Params;
use super::vpc::{fresh, ret_true};
use super::xml::Xml;
use super::{Api, ApiError};

pub fn write_route_table(x: &mut Xml, st: &State, r: &RouteTable, owner: &str) {
    let vpc_cidr = st
        .get::<Vpc>(&r.vpc_id)
        .map(|v| v.cidr.clone())
        .unwrap_or_default();
    x.text("routeTableId", &r.id)
        .text("vpcId", &r.vpc_id)
        .text("ownerId", owner);
    let local = Route {
        destination: vpc_cidr,
        target: RouteTarget::Local,
    };
    x.set(
        "routeSet",
        std::iter::once(&local).chain(r.routes.iter()),
        |x, rt| {
            x.text("destinationCidrBlock", &rt.destination);
            let state = match &rt.target {
                RouteTarget::Local => {
                    x.text("gatewayId", "local");
                    "active"
                }
                RouteTarget::Gateway(g) => {
                    x.text("gatewayId", g);
                    if st
                        .get::<InternetGateway>(g)
                        .is_some_and(|i| i.vpc_id.as_deref() == Some(r.vpc_id.as_str()))
                    {
                        "active"
                    } else {
                        "blackhole"
                    }
                }
                RouteTarget::NatGateway(n) => {
                    x.text("natGatewayId", n);
                    // A deleted (or deleting) gateway leaves a blackhole.
                    if st.get::<NatGateway>(n).is_some_and(|g| !g.state.gone()) {
                        "active"
                    } else {
                        "blackhole"
                    }
                }
                RouteTarget::NetworkInterface(e) => {
                    x.text("networkInterfaceId", e);
                    match st.get::<Eni>(e) {
                        Some(eni) => {
                            if let Some(a) = &eni.attachment {
                                x.text("instanceId", &a.instance_id)
                                    .text("instanceOwnerId", owner);
                            }
                            "active"
                        }
                        None => "blackhole",
                    }
                }
            };
            x.text(
                "origin",
                if rt.target == RouteTarget::Local {
                    "CreateRouteTable"
                } else {
                    "CreateRoute"
                },
            )
            .text("state", state);
        },
    );
    x.set("associationSet", &r.associations, |x, a| {
        x.bool("main", a.main)
            .text("routeTableAssociationId", &a.id)
            .text("routeTableId", &r.id)
            .opt("subnetId", a.subnet_id.as_deref())
            .elem("associationState", |x| {
                x.text("state", "associated");
            });
    });
    x.set("propagatingVgwSet", std::iter::empty::<()>(), |_, _| {});
    x.tags(&r.tags);
}

pub fn create_route_table(api: &Api, p: &Params) -> Result<String, ApiError> {
    let vpc_id = req(p, "VpcId")?;
    let tags = tag_spec(p, "route-table", &["route-table"])?;
    let r = api.store.write(|t| {
        VPC.get::<Vpc>(t, vpc_id)?;
        let r = RouteTable {
            id: fresh(t, "rtb-"),
            vpc_id: vpc_id.to_string(),
            routes: Vec::new(),
            associations: Vec::new(),
            tags,
        };
        t.put(r.clone());
        Ok::<_, ApiError>(r)
    })?;
    let owner = &api.config.account_id;
    Ok(api.store.read(|st| {
        let mut x = Xml::new();
        x.elem("routeTable", |x| write_route_table(x, st, &r, owner));
        x.finish()
    }))
}

pub fn delete_route_table(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "RouteTableId")?;
    api.store.write(|t| {
        let r = RTB.get::<RouteTable>(t, id)?;
        if !r.associations.is_empty() {
            return Err(ApiError::new(
                "DependencyViolation",
                format!("The routeTable '{id}' has dependencies and cannot be deleted."),
            ));
        }
        t.remove(id);
        Ok(())
    })?;
    Ok(ret_true())
}

fn destination(p: &Params) -> Result<Cidr, ApiError> {
    let d = req(p, "DestinationCidrBlock")?;
    if p.contains("DestinationIpv6CidrBlock") || p.contains("DestinationPrefixListId") {
        return Err(ApiError::invalid(
            "Only IPv4 destinations are supported by enilab".to_string(),
        ));
    }
    Cidr::parse_loose(d)
        .map(|c| c.normalized())
        .map_err(|_| ApiError::invalid(format!("Value ({d}) for parameter destinationCidrBlock is invalid. This is not a valid CIDR block.")))
}

pub fn create_route(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "RouteTableId")?;
    let dest = destination(p)?;
    let targets: Vec<(&str, &str)> = [
        "GatewayId",
        "NatGatewayId",
        "NetworkInterfaceId",
        "InstanceId",
    ]
    .into_iter()
    .filter_map(|k| p.get(k).map(|v| (k, v)))
    .collect();
    let (kind, target) = match targets.as_slice() {
        [one] => *one,
        [] => {
            return Err(ApiError::missing(
                "GatewayId, NatGatewayId or NetworkInterfaceId",
            ))
        }
        _ => {
            return Err(ApiError::combination(
                "More than one target specified for the route".to_string(),
            ))
        }
    };
    api.store.write(|t| {
        let mut r = RTB.get::<RouteTable>(t, id)?.clone();
        let vpc = t.get::<Vpc>(&r.vpc_id).cloned().ok_or_else(|| ApiError::internal("route table without VPC"))?;
        let vcidr = Cidr::parse(&vpc.cidr).map_err(|_| ApiError::internal("stored VPC CIDR is invalid"))?;
        let target = match kind {
            "GatewayId" => {
                let g = IGW.get::<InternetGateway>(t, target)?;
                if g.vpc_id.as_deref() != Some(vpc.id.as_str()) {
                    return Err(ApiError::invalid(format!(
                        "route table {id} and network gateway {target} belong to different networks"
                    )));
                }
                RouteTarget::Gateway(target.to_string())
            }
            "NatGatewayId" => {
                let n = NAT.get::<NatGateway>(t, target)?;
                if n.state.gone() {
                    return Err(NAT.not_found(target));
                }
                if n.vpc_id != vpc.id {
                    return Err(ApiError::invalid(format!(
                        "route table {id} and NAT gateway {target} belong to different networks"
                    )));
                }
                RouteTarget::NatGateway(target.to_string())
            }
            "NetworkInterfaceId" => {
                let e = ENI.get::<Eni>(t, target)?;
                if e.vpc_id != vpc.id {
                    return Err(ApiError::invalid(format!(
                        "route table {id} and interface {target} belong to different networks"
                    )));
                }
                RouteTarget::NetworkInterface(target.to_string())
            }
            _ => {
                let i = INSTANCE.get::<Instance>(t, target)?;
                let eni = t
                    .iter::<Eni>()
                    .find(|e| e.attachment.as_ref().is_some_and(|a| a.instance_id == i.id && a.device_index == 0 && a.card_index == 0))
                    .ok_or_else(|| ApiError::new("IncorrectInstanceState", format!("The instance '{target}' has no primary network interface.")))?;
                RouteTarget::NetworkInterface(eni.id.clone())
            }
        };
        if dest == vcidr || (vcidr.covers(&dest) && !matches!(target, RouteTarget::NetworkInterface(_))) {
            return Err(ApiError::invalid(format!(
                "The destination CIDR block {dest} is equal to or more specific than one of this VPC's CIDR blocks. This route can target only an interface or an instance."
            )));
        }
        let ds = dest.to_string();
        if r.routes.iter().any(|x| x.destination == ds) {
            return Err(ApiError::new(
                "RouteAlreadyExists",
                format!("The route identified by {ds} already exists."),
            ));
        }
        if r.routes.len() >= 500 {
            return Err(ApiError::new("RouteLimitExceeded", "The maximum number of routes has been reached.".to_string()));
        }
        r.routes.push(Route { destination: ds, target });
        t.put(r);
        Ok(())
    })?;
    Ok(ret_true())
}

pub fn delete_route(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "RouteTableId")?;
    let dest = destination(p)?.to_string();
    api.store.write(|t| {
        let mut r = RTB.get::<RouteTable>(t, id)?.clone();
        if t.get::<Vpc>(&r.vpc_id).is_some_and(|v| v.cidr == dest) {
            return Err(ApiError::invalid(format!(
                "cannot remove local route {dest} in route table {id}"
            )));
        }
        let before = r.routes.len();
        r.routes.retain(|x| x.destination != dest);
        if r.routes.len() == before {
            return Err(ApiError::new(
                "InvalidRoute.NotFound",
                format!("no route with destination-cidr-block {dest} in route table {id}"),
            ));
        }
        t.put(r);
        Ok(())
    })?;
    Ok(ret_true())
}

pub fn associate_route_table(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "RouteTableId")?;
    let subnet_id = req(p, "SubnetId")?;
    let assoc = api.store.write(|t| {
        let mut r = RTB.get::<RouteTable>(t, id)?.clone();
        let s = SUBNET.get::<Subnet>(t, subnet_id)?;
        if s.vpc_id != r.vpc_id {
            return Err(ApiError::invalid(format!(
                "Route table {id} and subnet {subnet_id} belong to different networks"
            )));
        }
        if let Some(o) = t
            .iter::<RouteTable>()
            .find(|o| o.associations.iter().any(|a| a.subnet_id.as_deref() == Some(subnet_id)))
        {
            return Err(ApiError::new(
                "Resource.AlreadyAssociated",
                format!("the specified association for route table {} conflicts with an existing association", o.id),
            ));
        }
        let a = new_id("rtbassoc-");
        r.associations.push(RtbAssociation {
            id: a.clone(),
            subnet_id: Some(subnet_id.to_string()),
            main: false,
        });
        t.put(r);
        Ok(a)
    })?;
    let mut x = Xml::new();
    x.text("associationId", &assoc)
        .elem("associationState", |x| {
            x.text("state", "associated");
        });
    Ok(x.finish())
}

pub fn disassociate_route_table(api: &Api, p: &Params) -> Result<String, ApiError> {
    let aid = req(p, "AssociationId")?;
    RTBASSOC.check(aid)?;
    api.store.write(|t| {
        let mut r = t
            .iter::<RouteTable>()
            .find(|r| r.associations.iter().any(|a| a.id == aid))
            .cloned()
            .ok_or_else(|| RTBASSOC.not_found(aid))?;
        if r.associations.iter().any(|a| a.id == aid && a.main) {
            return Err(ApiError::invalid(format!(
                "cannot disassociate the main route table association {aid}"
            )));
        }
        r.associations.retain(|a| a.id != aid);
        t.put(r);
        Ok(())
    })?;
    Ok(ret_true())
}

const RTB_FILTERS: &[&str] = &[
    "route-table-id",
    "vpc-id",
    "owner-id",
    "association.main",
    "association.subnet-id",
    "association.route-table-association-id",
    "association.route-table-id",
    "route.destination-cidr-block",
    "route.gateway-id",
    "route.nat-gateway-id",
    "route.network-interface-id",
    "route.state",
    "route.origin",
];

pub fn describe_route_tables(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "RouteTableId")?;
    let fl = filters(p, RTB_FILTERS)?;
    let pg = page(p, !ids.is_empty())?;
    let owner = &api.config.account_id;
    api.store.read(|st| {
        let sel: Vec<&RouteTable> = RTB
            .get_many::<RouteTable>(st, &ids)?
            .into_iter()
            .filter(|r| {
                let vpc_cidr = st
                    .get::<Vpc>(&r.vpc_id)
                    .map(|v| v.cidr.clone())
                    .unwrap_or_default();
                filter_match(&fl, &r.tags, |n| match n {
                    "route-table-id" | "association.route-table-id" => vec![r.id.clone()],
                    "vpc-id" => vec![r.vpc_id.clone()],
                    "owner-id" => vec![owner.clone()],
                    "association.main" => {
                        r.associations.iter().map(|a| a.main.to_string()).collect()
                    }
                    "association.subnet-id" => r
                        .associations
                        .iter()
                        .filter_map(|a| a.subnet_id.clone())
                        .collect(),
                    "association.route-table-association-id" => {
                        r.associations.iter().map(|a| a.id.clone()).collect()
                    }
                    "route.destination-cidr-block" => std::iter::once(vpc_cidr.clone())
                        .chain(r.routes.iter().map(|x| x.destination.clone()))
                        .collect(),
                    "route.gateway-id" => std::iter::once("local".to_string())
                        .chain(r.routes.iter().filter_map(|x| match &x.target {
                            RouteTarget::Gateway(g) => Some(g.clone()),
                            _ => None,
                        }))
                        .collect(),
                    "route.nat-gateway-id" => r
                        .routes
                        .iter()
                        .filter_map(|x| match &x.target {
                            RouteTarget::NatGateway(g) => Some(g.clone()),
                            _ => None,
                        })
                        .collect(),
                    "route.network-interface-id" => r
                        .routes
                        .iter()
                        .filter_map(|x| match &x.target {
                            RouteTarget::NetworkInterface(g) => Some(g.clone()),
                            _ => None,
                        })
                        .collect(),
                    "route.state" => vec!["active".into()],
                    "route.origin" => vec!["CreateRouteTable".into(), "CreateRoute".into()],
                    _ => vec![],
                })
            })
            .collect();
        let (sel, token) = paginate(sel, |r| &r.id, &pg);
        let mut x = Xml::new();
        x.set("routeTableSet", sel, |x, r| {
            write_route_table(x, st, r, owner)
        });
        x.opt("nextToken", token.as_deref());
        Ok(x.finish())
    })
}

// ----- internet gateways -----

fn write_igw(x: &mut Xml, g: &InternetGateway, owner: &str) {
    x.text("internetGatewayId", &g.id).text("ownerId", owner);
    x.set("attachmentSet", g.vpc_id.iter(), |x, v| {
        x.text("vpcId", v).text("state", "available");
    });
    x.tags(&g.tags);
}

pub fn create_internet_gateway(api: &Api, p: &Params) -> Result<String, ApiError> {
    let tags = tag_spec(p, "internet-gateway", &["internet-gateway"])?;
    let g = api.store.write(|t| {
        let g = InternetGateway {
            id: fresh(t, "igw-"),
            vpc_id: None,
            tags,
        };
        t.put(g.clone());
        Ok::<_, ApiError>(g)
    })?;
    let mut x = Xml::new();
    x.elem("internetGateway", |x| {
        write_igw(x, &g, &api.config.account_id)
    });
    Ok(x.finish())
}

pub fn attach_internet_gateway(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "InternetGatewayId")?;
    let vpc_id = req(p, "VpcId")?;
    api.store.write(|t| {
        let mut g = IGW.get::<InternetGateway>(t, id)?.clone();
        VPC.get::<Vpc>(t, vpc_id)?;
        if let Some(v) = &g.vpc_id {
            return Err(ApiError::new(
                "Resource.AlreadyAssociated",
                format!("resource {id} is already attached to network {v}"),
            ));
        }
        if t.iter::<InternetGateway>()
            .any(|o| o.vpc_id.as_deref() == Some(vpc_id))
        {
            return Err(ApiError::new(
                "Resource.AlreadyAssociated",
                format!("Network {vpc_id} already has an internet gateway attached"),
            ));
        }
        g.vpc_id = Some(vpc_id.to_string());
        t.put(g);
        Ok(())
    })?;
    Ok(ret_true())
}

pub fn detach_internet_gateway(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "InternetGatewayId")?;
    let vpc_id = req(p, "VpcId")?;
    api.store.write(|t| {
        let mut g = IGW.get::<InternetGateway>(t, id)?.clone();
        VPC.get::<Vpc>(t, vpc_id)?;
        if g.vpc_id.as_deref() != Some(vpc_id) {
            return Err(ApiError::new(
                "Gateway.NotAttached",
                format!("resource {id} is not attached to network {vpc_id}"),
            ));
        }
        let mapped = t.iter::<Address>().any(|a| {
            a.association.as_ref().is_some_and(|s| t.get::<Eni>(&s.eni_id).is_some_and(|e| e.vpc_id == vpc_id))
        });
        if mapped {
            return Err(ApiError::new(
                "DependencyViolation",
                format!("Network {vpc_id} has some mapped public address(es). Please unmap those public address(es) before detaching the gateway."),
            ));
        }
        g.vpc_id = None;
        t.put(g);
        Ok(())
    })?;
    Ok(ret_true())
}

pub fn delete_internet_gateway(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "InternetGatewayId")?;
    api.store.write(|t| {
        let g = IGW.get::<InternetGateway>(t, id)?;
        if g.vpc_id.is_some() {
            return Err(ApiError::new(
                "DependencyViolation",
                format!("The internetGateway '{id}' has dependencies and cannot be deleted."),
            ));
        }
        t.remove(id);
        Ok(())
    })?;
    Ok(ret_true())
}

const IGW_FILTERS: &[&str] = &[
    "internet-gateway-id",
    "attachment.vpc-id",
    "attachment.state",
    "owner-id",
];

pub fn describe_internet_gateways(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "InternetGatewayId")?;
    let fl = filters(p, IGW_FILTERS)?;
    let pg = page(p, !ids.is_empty())?;
    let owner = &api.config.account_id;
    api.store.read(|st| {
        let sel: Vec<&InternetGateway> = IGW
            .get_many::<InternetGateway>(st, &ids)?
            .into_iter()
            .filter(|g| {
                filter_match(&fl, &g.tags, |n| match n {
                    "internet-gateway-id" => vec![g.id.clone()],
                    "attachment.vpc-id" => g.vpc_id.iter().cloned().collect(),
                    "attachment.state" => {
                        g.vpc_id.iter().map(|_| "available".to_string()).collect()
                    }
                    "owner-id" => vec![owner.clone()],
                    _ => vec![],
                })
            })
            .collect();
        let (sel, token) = paginate(sel, |g| &g.id, &pg);
        let mut x = Xml::new();
        x.set("internetGatewaySet", sel, |x, g| write_igw(x, g, owner));
        x.opt("nextToken", token.as_deref());
        Ok(x.finish())
    })
}

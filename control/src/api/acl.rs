//! Network ACLs: numbered stateless rules and one association per subnet.

use crate::store::ids::new_id;
use crate::store::model::*;
use crate::store::net::Cidr;

use super::common::*;
use super::query::Params;
use super::sg::normalize_protocol;
use super::vpc::{fresh, ret_true};
use super::xml::Xml;
use super::{Api, ApiError};

fn entry(rule: u16, egress: bool, allow: bool) -> AclEntry {
    AclEntry {
        rule_number: rule,
        egress,
        protocol: "-1".into(),
        allow,
        cidr: "0.0.0.0/0".into(),
        icmp: None,
        ports: None,
    }
}

/// A default ACL: rule 100 allows everything, `*` denies, both directions.
pub fn default_entries() -> Vec<AclEntry> {
    vec![
        entry(100, false, true),
        entry(ACL_DEFAULT_RULE, false, false),
        entry(100, true, true),
        entry(ACL_DEFAULT_RULE, true, false),
    ]
}

/// A custom ACL: deny everything.
fn custom_entries() -> Vec<AclEntry> {
    vec![
        entry(ACL_DEFAULT_RULE, false, false),
        entry(ACL_DEFAULT_RULE, true, false),
    ]
}

fn write_acl(x: &mut Xml, a: &NetworkAcl, owner: &str) {
    x.text("networkAclId", &a.id)
        .text("vpcId", &a.vpc_id)
        .text("ownerId", owner)
        .bool("default", a.default);
    let mut entries: Vec<&AclEntry> = a.entries.iter().collect();
    entries.sort_by_key(|e| (e.egress, e.rule_number));
    x.set("entrySet", entries, |x, e| {
        x.num("ruleNumber", e.rule_number)
            .text("protocol", &e.protocol)
            .text("ruleAction", if e.allow { "allow" } else { "deny" })
            .bool("egress", e.egress)
            .text("cidrBlock", &e.cidr);
        if let Some((ty, code)) = e.icmp {
            x.elem("icmpTypeCode", |x| {
                x.num("code", code).num("type", ty);
            });
        }
        if let Some((f, t)) = e.ports {
            x.elem("portRange", |x| {
                x.num("from", f).num("to", t);
            });
        }
    });
    x.set("associationSet", &a.associations, |x, s| {
        x.text("networkAclAssociationId", &s.id)
            .text("networkAclId", &a.id)
            .text("subnetId", &s.subnet_id);
    });
    x.tags(&a.tags);
}

pub fn create_network_acl(api: &Api, p: &Params) -> Result<String, ApiError> {
    let vpc_id = req(p, "VpcId")?;
    let tags = tag_spec(p, "network-acl", &["network-acl"])?;
    let a = api.store.write(|t| {
        VPC.get::<Vpc>(t, vpc_id)?;
        let a = NetworkAcl {
            id: fresh(t, "acl-"),
            vpc_id: vpc_id.to_string(),
            default: false,
            entries: custom_entries(),
            associations: Vec::new(),
            tags,
        };
        t.put(a.clone());
        Ok::<_, ApiError>(a)
    })?;
    let mut x = Xml::new();
    x.elem("networkAcl", |x| write_acl(x, &a, &api.config.account_id));
    Ok(x.finish())
}

pub fn delete_network_acl(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "NetworkAclId")?;
    api.store.write(|t| {
        let a = ACL.get::<NetworkAcl>(t, id)?;
        if a.default {
            return Err(ApiError::invalid(format!(
                "cannot delete default network ACL {id}"
            )));
        }
        if !a.associations.is_empty() {
            return Err(ApiError::new(
                "DependencyViolation",
                format!("The networkAcl '{id}' has dependencies and cannot be deleted."),
            ));
        }
        t.remove(id);
        Ok(())
    })?;
    Ok(ret_true())
}

/// Parse the fields of Create/ReplaceNetworkAclEntry.
fn parse_entry(p: &Params) -> Result<AclEntry, ApiError> {
    let rule = req_int_in(p, "RuleNumber", 1, 32766)? as u16;
    let egress = opt_bool(p, "Egress")?.ok_or_else(|| ApiError::missing("Egress"))?;
    let proto = normalize_protocol(req(p, "Protocol")?)?;
    // ACLs show protocols as numbers.
    let proto = match proto.as_str() {
        "tcp" => "6".to_string(),
        "udp" => "17".to_string(),
        "icmp" => "1".to_string(),
        other => other.to_string(),
    };
    let allow = match req(p, "RuleAction")? {
        "allow" => true,
        "deny" => false,
        other => {
            return Err(ApiError::invalid(format!(
                "Invalid value '{other}' for RuleAction. Expected allow or deny."
            )))
        }
    };
    if p.contains("Ipv6CidrBlock") {
        return Err(ApiError::invalid(
            "IPv6 ACL entries are not supported by enilab".to_string(),
        ));
    }
    let c = req(p, "CidrBlock")?;
    let cidr = Cidr::parse_loose(c)
        .map_err(|_| {
            ApiError::invalid(format!(
                "Value ({c}) for parameter cidrBlock is invalid. This is not a valid CIDR block."
            ))
        })?
        .normalized();
    let mut icmp = None;
    let mut ports = None;
    match proto.as_str() {
        "6" | "17" => {
            let f = opt_int_in(p, "PortRange.From", 0, 65535)?;
            let t = opt_int_in(p, "PortRange.To", 0, 65535)?;
            let (Some(f), Some(t)) = (f, t) else {
                return Err(ApiError::missing("PortRange"));
            };
            if f > t {
                return Err(ApiError::invalid(format!(
                    "Invalid value for portRange {f}-{t}: from must not be greater than to."
                )));
            }
            ports = Some((f as i32, t as i32));
        }
        "1" => {
            let ty = opt_int_in(p, "Icmp.Type", -1, 255)?;
            let code = opt_int_in(p, "Icmp.Code", -1, 255)?;
            let (Some(ty), Some(code)) = (ty, code) else {
                return Err(ApiError::missing("Icmp"));
            };
            icmp = Some((ty as i32, code as i32));
        }
        _ => {}
    }
    Ok(AclEntry {
        rule_number: rule,
        egress,
        protocol: proto,
        allow,
        cidr: cidr.to_string(),
        icmp,
        ports,
    })
}

fn not_found(rule: u16) -> ApiError {
    ApiError::new(
        "InvalidNetworkAclEntry.NotFound",
        format!("The network acl entry identified by {rule} does not exist."),
    )
}

pub fn create_network_acl_entry(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "NetworkAclId")?;
    let e = parse_entry(p)?;
    api.store.write(|t| {
        let mut a = ACL.get::<NetworkAcl>(t, id)?.clone();
        if a.entries
            .iter()
            .any(|o| o.egress == e.egress && o.rule_number == e.rule_number)
        {
            return Err(ApiError::new(
                "NetworkAclEntryAlreadyExists",
                format!(
                    "The network acl entry identified by {} already exists.",
                    e.rule_number
                ),
            ));
        }
        if a.entries.iter().filter(|o| o.egress == e.egress).count() > 40 {
            return Err(ApiError::new(
                "NetworkAclEntryLimitExceeded",
                "The maximum number of network ACL entries has been reached.".to_string(),
            ));
        }
        a.entries.push(e);
        t.put(a);
        Ok(())
    })?;
    Ok(ret_true())
}

pub fn replace_network_acl_entry(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "NetworkAclId")?;
    let e = parse_entry(p)?;
    api.store.write(|t| {
        let mut a = ACL.get::<NetworkAcl>(t, id)?.clone();
        let slot = a
            .entries
            .iter_mut()
            .find(|o| o.egress == e.egress && o.rule_number == e.rule_number)
            .ok_or_else(|| not_found(e.rule_number))?;
        *slot = e;
        t.put(a);
        Ok::<_, ApiError>(())
    })?;
    Ok(ret_true())
}

pub fn delete_network_acl_entry(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "NetworkAclId")?;
    let rule = req_int_in(p, "RuleNumber", 1, 32766)? as u16;
    let egress = opt_bool(p, "Egress")?.ok_or_else(|| ApiError::missing("Egress"))?;
    api.store.write(|t| {
        let mut a = ACL.get::<NetworkAcl>(t, id)?.clone();
        let before = a.entries.len();
        a.entries
            .retain(|o| !(o.egress == egress && o.rule_number == rule));
        if a.entries.len() == before {
            return Err(not_found(rule));
        }
        t.put(a);
        Ok(())
    })?;
    Ok(ret_true())
}

pub fn replace_network_acl_association(api: &Api, p: &Params) -> Result<String, ApiError> {
    let aid = req(p, "AssociationId")?;
    let acl_id = req(p, "NetworkAclId")?;
    ACLASSOC.check(aid)?;
    let new = api.store.write(|t| {
        let mut target = ACL.get::<NetworkAcl>(t, acl_id)?.clone();
        let mut old = t
            .iter::<NetworkAcl>()
            .find(|a| a.associations.iter().any(|s| s.id == aid))
            .cloned()
            .ok_or_else(|| ACLASSOC.not_found(aid))?;
        if old.vpc_id != target.vpc_id {
            return Err(ApiError::invalid(format!(
                "Network ACL {acl_id} and association {aid} belong to different networks"
            )));
        }
        let subnet = old
            .associations
            .iter()
            .find(|s| s.id == aid)
            .map(|s| s.subnet_id.clone())
            .unwrap_or_default();
        let new = new_id("aclassoc-");
        if old.id == target.id {
            for s in target.associations.iter_mut().filter(|s| s.id == aid) {
                s.id = new.clone();
            }
        } else {
            old.associations.retain(|s| s.id != aid);
            t.put(old);
            target.associations.push(AclAssociation {
                id: new.clone(),
                subnet_id: subnet,
            });
        }
        t.put(target);
        Ok(new)
    })?;
    let mut x = Xml::new();
    x.text("newAssociationId", &new);
    Ok(x.finish())
}

const ACL_FILTERS: &[&str] = &[
    "network-acl-id",
    "vpc-id",
    "default",
    "owner-id",
    "association.association-id",
    "association.network-acl-id",
    "association.subnet-id",
    "entry.rule-number",
    "entry.rule-action",
    "entry.egress",
    "entry.protocol",
    "entry.cidr",
];

pub fn describe_network_acls(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "NetworkAclId")?;
    let fl = filters(p, ACL_FILTERS)?;
    let pg = page(p, !ids.is_empty())?;
    let owner = &api.config.account_id;
    api.store.read(|st| {
        let sel: Vec<&NetworkAcl> = ACL
            .get_many::<NetworkAcl>(st, &ids)?
            .into_iter()
            .filter(|a| {
                filter_match(&fl, &a.tags, |n| match n {
                    "network-acl-id" | "association.network-acl-id" => vec![a.id.clone()],
                    "vpc-id" => vec![a.vpc_id.clone()],
                    "default" => vec![a.default.to_string()],
                    "owner-id" => vec![owner.clone()],
                    "association.association-id" => {
                        a.associations.iter().map(|s| s.id.clone()).collect()
                    }
                    "association.subnet-id" => {
                        a.associations.iter().map(|s| s.subnet_id.clone()).collect()
                    }
                    "entry.rule-number" => a
                        .entries
                        .iter()
                        .map(|e| e.rule_number.to_string())
                        .collect(),
                    "entry.rule-action" => a
                        .entries
                        .iter()
                        .map(|e| if e.allow { "allow" } else { "deny" }.to_string())
                        .collect(),
                    "entry.egress" => a.entries.iter().map(|e| e.egress.to_string()).collect(),
                    "entry.protocol" => a.entries.iter().map(|e| e.protocol.clone()).collect(),
                    "entry.cidr" => a.entries.iter().map(|e| e.cidr.clone()).collect(),
                    _ => vec![],
                })
            })
            .collect();
        let (sel, token) = paginate(sel, |a| &a.id, &pg);
        let mut x = Xml::new();
        x.set("networkAclSet", sel, |x, a| write_acl(x, a, owner));
        x.opt("nextToken", token.as_deref());
        Ok(x.finish())
    })
}

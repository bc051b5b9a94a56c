//! Security groups and their rules.

use crate::store::model::*;
use crate::store::net::Cidr;
use crate::store::{State, Txn};

use super::common::*;
use super::query::Params;
use super::vpc::{fresh, ret_true};
use super::xml::Xml;
use super::{Api, ApiError};

/// Rules per direction per group (AWS's default quota).
pub const MAX_RULES: usize = 60;
/// Groups per network interface.
pub const MAX_GROUPS_PER_ENI: usize = 5;

fn all_traffic(peer: SgPeer) -> SgRule {
    SgRule {
        protocol: "-1".into(),
        from_port: None,
        to_port: None,
        peer,
        description: None,
    }
}

/// The `default` group: ingress from itself, all egress.
pub fn default_group(id: &str, vpc_id: &str) -> SecurityGroup {
    SecurityGroup {
        id: id.to_string(),
        name: "default".into(),
        description: "default VPC security group".into(),
        vpc_id: vpc_id.to_string(),
        ingress: vec![all_traffic(SgPeer::Group(id.to_string()))],
        egress: vec![all_traffic(SgPeer::Cidr("0.0.0.0/0".into()))],
        tags: Tags::new(),
    }
}

fn write_perms(x: &mut Xml, st: &State, name: &str, rules: &[SgRule]) {
    // AWS groups rules with the same protocol and ports into one permission.
    type Perm<'a> = (&'a str, Option<i32>, Option<i32>, Vec<&'a SgRule>);
    let mut groups: Vec<Perm<'_>> = Vec::new();
    for r in rules {
        match groups
            .iter_mut()
            .find(|g| g.0 == r.protocol && g.1 == r.from_port && g.2 == r.to_port)
        {
            Some(g) => g.3.push(r),
            None => groups.push((&r.protocol, r.from_port, r.to_port, vec![r])),
        }
    }
    x.set(name, groups, |x, (proto, from, to, rs)| {
        x.text("ipProtocol", proto);
        if let Some(f) = from {
            x.num("fromPort", f);
        }
        if let Some(t) = to {
            x.num("toPort", t);
        }
        x.set(
            "groups",
            rs.iter().filter_map(|r| match &r.peer {
                SgPeer::Group(g) => Some((g, r)),
                _ => None,
            }),
            |x, (g, r)| {
                x.text("groupId", g);
                if let Some(o) = st.get::<SecurityGroup>(g) {
                    x.text("groupName", &o.name).text("vpcId", &o.vpc_id);
                }
                x.opt("description", r.description.as_deref());
            },
        );
        x.set(
            "ipRanges",
            rs.iter().filter_map(|r| match &r.peer {
                SgPeer::Cidr(c) => Some((c, r)),
                _ => None,
            }),
            |x, (c, r)| {
                x.text("cidrIp", c);
                x.opt("description", r.description.as_deref());
            },
        );
        x.set("ipv6Ranges", std::iter::empty::<()>(), |_, _| {});
        x.set("prefixListIds", std::iter::empty::<()>(), |_, _| {});
    });
}

pub fn write_group(x: &mut Xml, st: &State, g: &SecurityGroup, owner: &str) {
    x.text("ownerId", owner)
        .text("groupId", &g.id)
        .text("groupName", &g.name)
        .text("groupDescription", &g.description)
        .text("vpcId", &g.vpc_id)
        .text(
            "securityGroupArn",
            &format!("arn:aws:ec2:us-east-1:{owner}:security-group/{}", g.id),
        );
    write_perms(x, st, "ipPermissions", &g.ingress);
    write_perms(x, st, "ipPermissionsEgress", &g.egress);
    x.tags(&g.tags);
}

fn check_text(what: &str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.chars().count() > max {
        return Err(ApiError::invalid(format!(
            "{what} must be at most {max} characters"
        )));
    }
    if !s
        .chars()
        .all(|c| (' '..='~').contains(&c) || c.is_alphanumeric())
    {
        return Err(ApiError::invalid(format!(
            "Value ({s}) for parameter {what} is invalid. Character sets beyond ASCII are not supported."
        )));
    }
    Ok(())
}

pub fn create_security_group(api: &Api, p: &Params) -> Result<String, ApiError> {
    let name = req(p, "GroupName")?;
    let desc = req(p, "GroupDescription")?;
    check_text("GroupName", name, 255)?;
    check_text("GroupDescription", desc, 255)?;
    if name.starts_with("sg-") {
        return Err(ApiError::invalid(
            "Group names may not be in the format sg-*.".to_string(),
        ));
    }
    if name == "default" {
        return Err(ApiError::invalid(
            "The security group name 'default' is reserved.".to_string(),
        ));
    }
    let vpc_id = p.get("VpcId").ok_or_else(|| {
        ApiError::new(
            "VPCIdNotSpecified",
            "No default VPC for this user".to_string(),
        )
    })?;
    let tags = tag_spec(p, "security-group", &["security-group"])?;
    let g = api.store.write(|t| {
        VPC.get::<Vpc>(t, vpc_id)?;
        if t.iter::<SecurityGroup>()
            .any(|g| g.vpc_id == vpc_id && g.name == name)
        {
            return Err(ApiError::new(
                "InvalidGroup.Duplicate",
                format!("The security group '{name}' already exists for VPC '{vpc_id}'"),
            ));
        }
        let g = SecurityGroup {
            id: fresh(t, "sg-"),
            name: name.to_string(),
            description: desc.to_string(),
            vpc_id: vpc_id.to_string(),
            ingress: Vec::new(),
            egress: vec![all_traffic(SgPeer::Cidr("0.0.0.0/0".into()))],
            tags,
        };
        t.put(g.clone());
        Ok(g)
    })?;
    let mut x = Xml::new();
    x.text("return", "true")
        .text("groupId", &g.id)
        .tags(&g.tags);
    Ok(x.finish())
}

/// Find the group a request names by GroupId, or by GroupName when unique.
fn target_group<'a>(st: &'a State, p: &Params) -> Result<&'a SecurityGroup, ApiError> {
    if let Some(id) = p.get("GroupId") {
        return SG.get::<SecurityGroup>(st, id);
    }
    let name = p
        .get("GroupName")
        .ok_or_else(|| ApiError::missing("GroupId"))?;
    let mut it = st.iter::<SecurityGroup>().filter(|g| g.name == name);
    match (it.next(), it.next()) {
        (Some(g), None) => Ok(g),
        (None, _) => Err(ApiError::new(
            "InvalidGroup.NotFound",
            format!("The security group '{name}' does not exist"),
        )),
        (Some(_), Some(_)) => Err(ApiError::invalid(format!(
            "The security group name '{name}' is ambiguous; use GroupId"
        ))),
    }
}

pub fn delete_security_group(api: &Api, p: &Params) -> Result<String, ApiError> {
    let gid = api.store.write(|t| {
        let g = target_group(t, p)?.clone();
        if g.name == "default" {
            return Err(ApiError::new(
                "CannotDelete",
                format!(
                    "the specified group: \"{}\" name: \"default\" cannot be deleted by a user",
                    g.id
                ),
            ));
        }
        let dep = || {
            ApiError::new(
                "DependencyViolation",
                format!("resource {} has a dependent object", g.id),
            )
        };
        if t.iter::<Eni>().any(|e| e.groups.contains(&g.id)) {
            return Err(dep());
        }
        if t.iter::<SecurityGroup>().any(|o| {
            o.id != g.id
                && o.ingress
                    .iter()
                    .chain(o.egress.iter())
                    .any(|r| r.peer == SgPeer::Group(g.id.clone()))
        }) {
            return Err(dep());
        }
        t.remove(&g.id);
        Ok(g.id)
    })?;
    let mut x = Xml::new();
    x.text("return", "true").text("groupId", &gid);
    Ok(x.finish())
}

const SG_FILTERS: &[&str] = &[
    "group-id",
    "group-name",
    "vpc-id",
    "description",
    "owner-id",
    "ip-permission.protocol",
    "ip-permission.from-port",
    "ip-permission.to-port",
    "ip-permission.cidr",
    "ip-permission.group-id",
    "egress.ip-permission.protocol",
    "egress.ip-permission.cidr",
    "egress.ip-permission.group-id",
];

fn rule_values(rules: &[SgRule], field: &str) -> Vec<String> {
    rules
        .iter()
        .filter_map(|r| match field {
            "protocol" => Some(r.protocol.clone()),
            "from-port" => r.from_port.map(|v| v.to_string()),
            "to-port" => r.to_port.map(|v| v.to_string()),
            "cidr" => match &r.peer {
                SgPeer::Cidr(c) => Some(c.clone()),
                _ => None,
            },
            "group-id" => match &r.peer {
                SgPeer::Group(g) => Some(g.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

pub fn describe_security_groups(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "GroupId")?;
    let names = list(p, "GroupName")?;
    let fl = filters(p, SG_FILTERS)?;
    let pg = page(p, !ids.is_empty() || !names.is_empty())?;
    let owner = &api.config.account_id;
    api.store.read(|st| {
        let mut all = SG.get_many::<SecurityGroup>(st, &ids)?;
        if !names.is_empty() {
            for n in &names {
                if !all.iter().any(|g| g.name == *n) {
                    return Err(ApiError::new(
                        "InvalidGroup.NotFound",
                        format!("The security group '{n}' does not exist"),
                    ));
                }
            }
            all.retain(|g| names.contains(&g.name.as_str()));
        }
        let sel: Vec<&SecurityGroup> = all
            .into_iter()
            .filter(|g| {
                filter_match(&fl, &g.tags, |n| match n {
                    "group-id" => vec![g.id.clone()],
                    "group-name" => vec![g.name.clone()],
                    "vpc-id" => vec![g.vpc_id.clone()],
                    "description" => vec![g.description.clone()],
                    "owner-id" => vec![owner.clone()],
                    _ => match n.strip_prefix("egress.ip-permission.") {
                        Some(f) => rule_values(&g.egress, f),
                        None => n
                            .strip_prefix("ip-permission.")
                            .map(|f| rule_values(&g.ingress, f))
                            .unwrap_or_default(),
                    },
                })
            })
            .collect();
        let (sel, token) = paginate(sel, |g| &g.id, &pg);
        let mut x = Xml::new();
        x.set("securityGroupInfo", sel, |x, g| {
            write_group(x, st, g, owner)
        });
        x.opt("nextToken", token.as_deref());
        Ok(x.finish())
    })
}

/// Normalise an IpProtocol value as AWS stores it.
pub fn normalize_protocol(p: &str) -> Result<String, ApiError> {
    let unknown = || {
        ApiError::invalid(format!(
            "Invalid value '{p}' for IP protocol. Unknown protocol."
        ))
    };
    let lower = p.to_ascii_lowercase();
    Ok(match lower.as_str() {
        "tcp" | "6" => "tcp".into(),
        "udp" | "17" => "udp".into(),
        "icmp" | "1" => "icmp".into(),
        "-1" | "all" => "-1".into(),
        "icmpv6" | "58" => "58".into(),
        n => {
            if n.is_empty() || n.len() > 3 || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(unknown());
            }
            let v: u32 = n.parse().map_err(|_| unknown())?;
            if v > 255 {
                return Err(unknown());
            }
            v.to_string()
        }
    })
}

fn port(p: &Params, name: &str) -> Result<Option<i32>, ApiError> {
    opt_int(p, name)?
        .map(|v| {
            i32::try_from(v)
                .map_err(|_| ApiError::invalid(format!("Invalid value '{v}' for {name}.")))
        })
        .transpose()
}

/// Expand `IpPermissions.N` (or the legacy top-level fields) into atomic
/// rules, validating each.
fn parse_rules(st: &State, p: &Params, group: &SecurityGroup) -> Result<Vec<SgRule>, ApiError> {
    let mut perms = p.structs("IpPermissions");
    if perms.is_empty()
        && (p.contains("IpProtocol")
            || p.contains("CidrIp")
            || p.contains("SourceSecurityGroupName"))
    {
        let mut legacy = Vec::new();
        for k in ["IpProtocol", "FromPort", "ToPort"] {
            if let Some(v) = p.get(k) {
                legacy.push((k.to_string(), v.to_string()));
            }
        }
        if let Some(c) = p.get("CidrIp") {
            legacy.push(("IpRanges.1.CidrIp".into(), c.to_string()));
        }
        if let Some(n) = p.get("SourceSecurityGroupName") {
            let g = st
                .iter::<SecurityGroup>()
                .find(|g| g.name == n && g.vpc_id == group.vpc_id)
                .ok_or_else(|| {
                    ApiError::new(
                        "InvalidGroup.NotFound",
                        format!("The security group '{n}' does not exist"),
                    )
                })?;
            legacy.push(("Groups.1.GroupId".into(), g.id.clone()));
        }
        perms.push(Params::from_pairs(
            legacy.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        ));
    }
    if perms.is_empty() {
        return Err(ApiError::missing("IpPermissions"));
    }
    let mut out = Vec::new();
    for perm in perms {
        let proto = normalize_protocol(
            perm.get("IpProtocol")
                .ok_or_else(|| ApiError::missing("IpPermissions.N.IpProtocol"))?,
        )?;
        let (from, to) = match proto.as_str() {
            "tcp" | "udp" => {
                let (Some(f), Some(t)) = (port(&perm, "FromPort")?, port(&perm, "ToPort")?) else {
                    return Err(ApiError::invalid(
                        "Invalid value for portRange. Must specify both from and to ports with TCP/UDP.".to_string(),
                    ));
                };
                if !(0..=65535).contains(&f) || !(0..=65535).contains(&t) {
                    return Err(ApiError::invalid(format!(
                        "Invalid value for portRange {f}-{t}. Ports must be between 0 and 65535."
                    )));
                }
                if f > t {
                    return Err(ApiError::invalid(format!(
                        "Invalid value for portRange. From port ({f}) must not be greater than to port ({t})."
                    )));
                }
                (Some(f), Some(t))
            }
            "icmp" | "58" => {
                let f = port(&perm, "FromPort")?.unwrap_or(-1);
                let t = port(&perm, "ToPort")?.unwrap_or(-1);
                if !(-1..=255).contains(&f) || !(-1..=255).contains(&t) {
                    return Err(ApiError::invalid(format!(
                        "Invalid value for ICMP type/code {f}/{t}."
                    )));
                }
                (Some(f), Some(t))
            }
            _ => (None, None),
        };
        let mut peers = Vec::new();
        for r in perm.structs("IpRanges") {
            let c = r
                .get("CidrIp")
                .ok_or_else(|| ApiError::missing("IpRanges.N.CidrIp"))?;
            let cidr = Cidr::parse_loose(c).map_err(|_| {
                ApiError::invalid(format!(
                    "Value ({c}) for parameter cidrIp is invalid. This is not a valid CIDR block."
                ))
            })?;
            peers.push((
                SgPeer::Cidr(cidr.normalized().to_string()),
                r.get("Description").map(String::from),
            ));
        }
        for g in perm.structs("Groups") {
            let gid = match (g.get("GroupId"), g.get("GroupName")) {
                (Some(id), _) => SG.get::<SecurityGroup>(st, id)?.id.clone(),
                (None, Some(n)) => st
                    .iter::<SecurityGroup>()
                    .find(|o| o.name == n && o.vpc_id == group.vpc_id)
                    .map(|o| o.id.clone())
                    .ok_or_else(|| {
                        ApiError::new(
                            "InvalidGroup.NotFound",
                            format!("The security group '{n}' does not exist"),
                        )
                    })?,
                (None, None) => return Err(ApiError::missing("Groups.N.GroupId")),
            };
            if let Some(o) = st.get::<SecurityGroup>(&gid) {
                if o.vpc_id != group.vpc_id {
                    return Err(ApiError::invalid(format!(
                        "You have specified two resources that belong to different networks: {} and {gid}",
                        group.id
                    )));
                }
            }
            peers.push((SgPeer::Group(gid), g.get("Description").map(String::from)));
        }
        if perm.has_prefix("Ipv6Ranges") || perm.has_prefix("PrefixListIds") {
            return Err(ApiError::invalid(
                "IPv6 ranges and prefix lists are not supported by enilab".to_string(),
            ));
        }
        if peers.is_empty() {
            return Err(ApiError::missing("IpRanges or Groups"));
        }
        for (peer, description) in peers {
            if let Some(d) = &description {
                check_text("Description", d, 255)?;
            }
            out.push(SgRule {
                protocol: proto.clone(),
                from_port: from,
                to_port: to,
                peer,
                description,
            });
        }
    }
    Ok(out)
}

fn change_rules(api: &Api, p: &Params, egress: bool, add: bool) -> Result<String, ApiError> {
    api.store.write(|t: &mut Txn<'_>| {
        let mut g = target_group(t, p)?.clone();
        let rules = parse_rules(t, p, &g)?;
        let set = if egress {
            &mut g.egress
        } else {
            &mut g.ingress
        };
        for r in rules {
            let existing = set.iter().position(|o| o.same_as(&r));
            match (add, existing) {
                (true, Some(_)) => {
                    return Err(ApiError::new(
                        "InvalidPermission.Duplicate",
                        format!(
                            "the specified rule \"peer: {}, {}, ALLOW\" already exists",
                            match &r.peer {
                                SgPeer::Cidr(c) => c.clone(),
                                SgPeer::Group(g) => g.clone(),
                            },
                            describe_rule(&r)
                        ),
                    ))
                }
                (true, None) => {
                    if set.len() >= MAX_RULES {
                        return Err(ApiError::new(
                            "RulesPerSecurityGroupLimitExceeded",
                            "The maximum number of rules per security group has been reached."
                                .to_string(),
                        ));
                    }
                    set.push(r);
                }
                (false, Some(i)) => {
                    set.remove(i);
                }
                (false, None) => {
                    return Err(ApiError::new(
                        "InvalidPermission.NotFound",
                        "The specified rule does not exist in this security group.".to_string(),
                    ))
                }
            }
        }
        t.put(g);
        Ok(())
    })?;
    Ok(ret_true())
}

fn describe_rule(r: &SgRule) -> String {
    match (r.from_port, r.to_port) {
        (Some(f), Some(t)) => format!("{} {f}-{t}", r.protocol.to_uppercase()),
        _ => format!("protocol {}", r.protocol),
    }
}

pub fn authorize_ingress(api: &Api, p: &Params) -> Result<String, ApiError> {
    change_rules(api, p, false, true)
}
pub fn authorize_egress(api: &Api, p: &Params) -> Result<String, ApiError> {
    change_rules(api, p, true, true)
}
pub fn revoke_ingress(api: &Api, p: &Params) -> Result<String, ApiError> {
    change_rules(api, p, false, false)
}
pub fn revoke_egress(api: &Api, p: &Params) -> Result<String, ApiError> {
    change_rules(api, p, true, false)
}

/// Validate a list of group IDs for an ENI in `vpc_id`.
pub fn check_groups(st: &State, ids: &[&str], vpc_id: &str) -> Result<Vec<String>, ApiError> {
    let mut out: Vec<String> = Vec::new();
    for id in ids {
        let g = SG.get::<SecurityGroup>(st, id)?;
        if g.vpc_id != vpc_id {
            return Err(ApiError::invalid(format!(
                "Security group {id} and subnet belong to different networks."
            )));
        }
        if !out.contains(&g.id) {
            out.push(g.id.clone());
        }
    }
    if out.len() > MAX_GROUPS_PER_ENI {
        return Err(ApiError::new(
            "SecurityGroupsPerInterfaceExceeded",
            format!("The maximum number of security groups per interface ({MAX_GROUPS_PER_ENI}) has been reached."),
        ));
    }
    Ok(out)
}

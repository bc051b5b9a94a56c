//! Target groups of network load balancers: create, describe, modify,
//! attributes, targets (register, deregister with a draining delay) and
//! their health.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::store::model::*;
use crate::store::net::{self, Cidr};
use crate::store::{State, Txn};

use super::super::common::{now_ms, VPC};
use super::super::driver::{Job, TargetHealthRow};
use super::super::query::Params;
use super::super::xml::Xml;
use super::super::{Api, ApiError};
use super::lb::lbs_of_tg;
use super::*;

/// Targets per target group (AWS's default quota for NLBs).
pub const MAX_TARGETS: usize = 1000;
/// Target groups per account.
pub const MAX_TARGET_GROUPS: usize = 3000;

/// Attributes of an NLB target group and their defaults; `preserve_client_ip`
/// depends on the target type and protocol (see [`default_attributes`]).
const ATTRIBUTES: &[&str] = &[
    "deregistration_delay.timeout_seconds",
    "deregistration_delay.connection_termination.enabled",
    "stickiness.enabled",
    "stickiness.type",
    "preserve_client_ip.enabled",
    "proxy_protocol_v2.enabled",
    "load_balancing.cross_zone.enabled",
    "target_health_state.unhealthy.connection_termination.enabled",
];

pub fn default_attributes(target_type: &str, protocol: &str) -> BTreeMap<String, String> {
    // AWS: on for instance targets, and for ip targets of UDP / TCP_UDP.
    let preserve = target_type == "instance" || protocol != "TCP";
    [
        ("deregistration_delay.timeout_seconds", "300"),
        (
            "deregistration_delay.connection_termination.enabled",
            "false",
        ),
        ("stickiness.enabled", "false"),
        ("stickiness.type", "source_ip"),
        (
            "preserve_client_ip.enabled",
            if preserve { "true" } else { "false" },
        ),
        ("proxy_protocol_v2.enabled", "false"),
        (
            "load_balancing.cross_zone.enabled",
            "use_load_balancer_configuration",
        ),
        (
            "target_health_state.unhealthy.connection_termination.enabled",
            "true",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Check one attribute change.
fn check_attribute(tg: &TargetGroup, key: &str, value: &str) -> Result<(), ApiError> {
    let boolean = |v: &str| v == "true" || v == "false";
    let ok = match key {
        "deregistration_delay.timeout_seconds" => value.parse::<u32>().is_ok_and(|n| n <= 3600),
        "stickiness.type" => value == "source_ip",
        "load_balancing.cross_zone.enabled" => {
            boolean(value) || value == "use_load_balancer_configuration"
        }
        "proxy_protocol_v2.enabled" => {
            if value == "true" {
                return Err(config_error("proxy_protocol_v2 is not supported by enilab"));
            }
            boolean(value)
        }
        "preserve_client_ip.enabled" => {
            if value == "false" && tg.target_type == "instance" && tg.protocol != "TCP" {
                return Err(config_error(
                    "Client IP preservation cannot be disabled for UDP and TCP_UDP instance target groups",
                ));
            }
            boolean(value)
        }
        k if ATTRIBUTES.contains(&k) => boolean(value),
        _ => {
            return Err(validation(format!(
                "Target group attribute key '{key}' is not recognized"
            )))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(validation(format!(
            "'{value}' is not a valid value for target group attribute '{key}'"
        )))
    }
}

pub fn write_tg(x: &mut Xml, api: &Api, st: &State, tg: &TargetGroup) {
    let hc = &tg.health_check;
    x.text("TargetGroupArn", &arn(api, &tg.id))
        .text("TargetGroupName", &tg.name)
        .text("Protocol", &tg.protocol)
        .num("Port", tg.port)
        .text("VpcId", &tg.vpc_id)
        .text("HealthCheckProtocol", &hc.protocol)
        .text("HealthCheckPort", &hc.port)
        .bool("HealthCheckEnabled", hc.enabled)
        .num("HealthCheckIntervalSeconds", hc.interval_s)
        .num("HealthCheckTimeoutSeconds", hc.timeout_s)
        .num("HealthyThresholdCount", hc.healthy_threshold)
        .num("UnhealthyThresholdCount", hc.unhealthy_threshold);
    if let Some(path) = &hc.path {
        x.text("HealthCheckPath", path).elem("Matcher", |x| {
            x.text("HttpCode", "200-399");
        });
    }
    let lbs: Vec<String> = lbs_of_tg(st, &tg.id)
        .into_iter()
        .map(|l| arn(api, l))
        .collect();
    x.member_strings("LoadBalancerArns", lbs.iter().map(|s| s.as_str()))
        .text("TargetType", &tg.target_type)
        .text("IpAddressType", "ipv4");
}

fn protocol(p: &Params, name: &str) -> Result<Option<String>, ApiError> {
    match p.get(name) {
        None => Ok(None),
        Some(v @ ("TCP" | "UDP" | "TCP_UDP")) => Ok(Some(v.to_string())),
        Some(v @ ("TLS" | "HTTP" | "HTTPS" | "GENEVE")) => Err(ApiError::new(
            "UnsupportedProtocol",
            format!("Protocol '{v}' is not supported by enilab's network load balancers (TCP, UDP, TCP_UDP)"),
        )),
        Some(v) => Err(validation(format!("Invalid value '{v}' for {name}"))),
    }
}

/// Apply the health check parameters of `p` to `hc`.
fn health_check_from(p: &Params, hc: &mut HealthCheck) -> Result<(), ApiError> {
    if let Some(proto) = p.get("HealthCheckProtocol") {
        match proto {
            "TCP" => hc.path = None,
            "HTTP" | "HTTPS" => {
                hc.path.get_or_insert_with(|| "/".to_string());
            }
            o => {
                return Err(validation(format!(
                    "Health check protocol '{o}' is not valid (TCP, HTTP, HTTPS)"
                )))
            }
        }
        hc.protocol = proto.to_string();
    }
    if let Some(port) = p.get("HealthCheckPort") {
        if port != "traffic-port" && !port.parse::<u16>().is_ok_and(|n| n >= 1) {
            return Err(validation(format!(
                "Health check port '{port}' must be 'traffic-port' or 1-65535"
            )));
        }
        hc.port = port.to_string();
    }
    if let Some(path) = p.get("HealthCheckPath") {
        if hc.protocol == "TCP" {
            return Err(config_error(
                "A health check path can only be given for HTTP or HTTPS health checks",
            ));
        }
        if !path.starts_with('/') || path.len() > 1024 {
            return Err(validation(
                "The health check path must start with '/' (at most 1024 characters)",
            ));
        }
        hc.path = Some(path.to_string());
    }
    if let Some(e) = opt_bool(p, "HealthCheckEnabled")? {
        hc.enabled = e;
    }
    if let Some(v) = opt_int(p, "HealthCheckIntervalSeconds", 5, 300)? {
        hc.interval_s = v as u32;
    }
    if let Some(v) = opt_int(p, "HealthCheckTimeoutSeconds", 2, 120)? {
        hc.timeout_s = v as u32;
    }
    if let Some(v) = opt_int(p, "HealthyThresholdCount", 2, 10)? {
        hc.healthy_threshold = v as u32;
    }
    if let Some(v) = opt_int(p, "UnhealthyThresholdCount", 2, 10)? {
        hc.unhealthy_threshold = v as u32;
    }
    if hc.timeout_s >= hc.interval_s {
        return Err(config_error(format!(
            "Health check timeout ({}s) must be smaller than the interval ({}s)",
            hc.timeout_s, hc.interval_s
        )));
    }
    Ok(())
}

pub fn create_target_group(api: &Api, p: &Params) -> Result<String, ApiError> {
    let name = req(p, "Name")?;
    check_name("Target group", name)?;
    let proto = protocol(p, "Protocol")?.ok_or_else(|| missing("Protocol"))?;
    let port = opt_int(p, "Port", 1, 65535)?.ok_or_else(|| missing("Port"))? as u16;
    let vpc_id = req(p, "VpcId")?;
    let target_type = p.get("TargetType").unwrap_or("instance");
    match target_type {
        "instance" | "ip" => {}
        "alb" | "lambda" => {
            return Err(config_error(format!(
                "Target type '{target_type}' is not supported by enilab (instance, ip)"
            )))
        }
        o => return Err(validation(format!("Invalid TargetType '{o}'"))),
    }
    if p.get("IpAddressType").is_some_and(|t| t != "ipv4") {
        return Err(config_error("enilab target groups are IPv4 only"));
    }
    let mut hc = HealthCheck {
        enabled: true,
        protocol: "TCP".into(),
        port: "traffic-port".into(),
        path: None,
        interval_s: 30,
        timeout_s: 10,
        healthy_threshold: 5,
        unhealthy_threshold: 2,
    };
    if matches!(p.get("HealthCheckProtocol"), Some("HTTP" | "HTTPS")) {
        hc.timeout_s = 6;
    }
    health_check_from(p, &mut hc)?;
    let tags = tags_of(p)?;
    let tg = api.store.write(|t| {
        VPC.get::<Vpc>(t, vpc_id)
            .map_err(|_| validation(format!("The VPC ID '{vpc_id}' is not found")))?;
        if let Some(o) = t.iter::<TargetGroup>().find(|g| g.name == name) {
            // A repeated identical create answers with the existing group.
            if o.protocol == proto
                && o.port == port
                && o.vpc_id == vpc_id
                && o.target_type == target_type
                && o.health_check == hc
            {
                return Ok(o.clone());
            }
            return Err(ApiError::new(
                "DuplicateTargetGroupName",
                format!("A target group with the name '{name}' already exists"),
            ));
        }
        if t.iter::<TargetGroup>().count() >= MAX_TARGET_GROUPS {
            return Err(ApiError::new(
                "TooManyTargetGroups",
                "The maximum number of target groups has been reached",
            ));
        }
        let tg = TargetGroup {
            id: format!("targetgroup/{name}/{}", new_hex()),
            name: name.to_string(),
            protocol: proto.clone(),
            port,
            vpc_id: vpc_id.to_string(),
            target_type: target_type.to_string(),
            health_check: hc.clone(),
            attributes: default_attributes(target_type, &proto),
            targets: Vec::new(),
            tags: tags.clone(),
        };
        t.put(tg.clone());
        Ok(tg)
    })?;
    api.store.read(|st| {
        let mut x = Xml::new();
        x.members("TargetGroups", [&tg], |x, g| write_tg(x, api, st, g));
        Ok(x.finish())
    })
}

pub fn describe_target_groups(api: &Api, p: &Params) -> Result<String, ApiError> {
    let lb_arn = p.get("LoadBalancerArn");
    let arns = members(p, "TargetGroupArns")?;
    let names = members(p, "Names")?;
    let given = usize::from(lb_arn.is_some())
        + usize::from(!arns.is_empty())
        + usize::from(!names.is_empty());
    if given > 1 {
        return Err(validation(
            "Specify at most one of LoadBalancerArn, TargetGroupArns and Names",
        ));
    }
    let pg = marker_page(p)?;
    api.store.read(|st| {
        let mut sel: Vec<&TargetGroup> = if let Some(a) = lb_arn {
            let lb = get_lb(api, st, a)?;
            st.iter::<TargetGroup>()
                .filter(|g| lbs_of_tg(st, &g.id).contains(&lb.id.as_str()))
                .collect()
        } else if !arns.is_empty() {
            arns.iter()
                .map(|a| get_tg(api, st, a))
                .collect::<Result<_, _>>()?
        } else if !names.is_empty() {
            let mut v = Vec::new();
            for n in &names {
                v.push(
                    st.iter::<TargetGroup>()
                        .find(|g| g.name == *n)
                        .ok_or_else(|| {
                            ApiError::new(
                                "TargetGroupNotFound",
                                format!("Target groups '[{n}]' not found"),
                            )
                        })?,
                );
            }
            v
        } else {
            st.iter::<TargetGroup>().collect()
        };
        sel.sort_by(|a, b| a.id.cmp(&b.id));
        sel.dedup_by(|a, b| a.id == b.id);
        let (sel, marker) = paginate(sel, |g| &g.id, &pg);
        let mut x = Xml::new();
        x.members("TargetGroups", sel, |x, g| write_tg(x, api, st, g));
        x.opt("NextMarker", marker.as_deref());
        Ok(x.finish())
    })
}

pub fn delete_target_group(api: &Api, p: &Params) -> Result<String, ApiError> {
    let a = req(p, "TargetGroupArn")?;
    api.store.write(|t| {
        let tg = match get_tg(api, t, a) {
            Ok(g) => g.clone(),
            // As in AWS, deleting one that does not exist succeeds.
            Err(e) if e.code() == "TargetGroupNotFound" => return Ok(()),
            Err(e) => return Err(e),
        };
        if t.iter::<Listener>().any(|l| l.target_group == tg.id) {
            return Err(ApiError::new(
                "ResourceInUse",
                format!("Target group '{a}' is currently in use by a listener or a rule"),
            ));
        }
        t.remove(&tg.id);
        Ok(())
    })?;
    Ok(String::new())
}

pub fn modify_target_group(api: &Api, p: &Params) -> Result<String, ApiError> {
    let a = req(p, "TargetGroupArn")?;
    let tg = api.store.write(|t| {
        let mut tg = get_tg(api, t, a)?.clone();
        if p.contains("HealthCheckProtocol")
            && p.get("HealthCheckProtocol") != Some(tg.health_check.protocol.as_str())
            && p.get("HealthCheckProtocol") != Some("TCP")
            && tg.protocol != "TCP"
        {
            return Err(config_error(
                "HTTP health checks are only available for TCP target groups",
            ));
        }
        health_check_from(p, &mut tg.health_check)?;
        t.put(tg.clone());
        Ok::<_, ApiError>(tg)
    })?;
    api.store.read(|st| {
        let mut x = Xml::new();
        x.members("TargetGroups", [&tg], |x, g| write_tg(x, api, st, g));
        Ok(x.finish())
    })
}

fn write_attributes(x: &mut Xml, tg: &TargetGroup) {
    x.members("Attributes", &tg.attributes, |x, (k, v)| {
        x.text("Key", k).text("Value", v);
    });
}

pub fn modify_target_group_attributes(api: &Api, p: &Params) -> Result<String, ApiError> {
    let a = req(p, "TargetGroupArn")?;
    let attrs = member_structs(p, "Attributes")?;
    if attrs.is_empty() {
        return Err(missing("Attributes"));
    }
    let tg = api.store.write(|t| {
        let mut tg = get_tg(api, t, a)?.clone();
        for at in &attrs {
            let k = at.get("Key").unwrap_or("");
            let v = at.get("Value").unwrap_or("");
            check_attribute(&tg, k, v)?;
            tg.attributes.insert(k.to_string(), v.to_string());
        }
        t.put(tg.clone());
        Ok::<_, ApiError>(tg)
    })?;
    let mut x = Xml::new();
    write_attributes(&mut x, &tg);
    Ok(x.finish())
}

pub fn describe_target_group_attributes(api: &Api, p: &Params) -> Result<String, ApiError> {
    let a = req(p, "TargetGroupArn")?;
    api.store.read(|st| {
        let tg = get_tg(api, st, a)?;
        let mut x = Xml::new();
        write_attributes(&mut x, tg);
        Ok(x.finish())
    })
}

/// One `Targets.member.N`: id, port if given, availability zone.
type TargetArg = (String, Option<u16>, Option<String>);

fn targets_of(p: &Params) -> Result<Vec<TargetArg>, ApiError> {
    let mut out = Vec::new();
    for t in member_structs(p, "Targets")? {
        let id = req(&t, "Id").map_err(|_| missing("Targets.member.N.Id"))?;
        let port = opt_int(&t, "Port", 1, 65535)?.map(|v| v as u16);
        out.push((
            id.to_string(),
            port,
            t.get("AvailabilityZone").map(String::from),
        ));
    }
    Ok(out)
}

fn invalid_target(message: String) -> ApiError {
    ApiError::new("InvalidTarget", message)
}

/// Is `ip` an address an ip target may have: in the VPC, or in the
/// private ranges AWS allows (RFC 1918, 100.64.0.0/10)?
fn ip_target_allowed(vpc_cidr: &str, ip: u32) -> bool {
    let allowed = [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
    ];
    Cidr::parse(vpc_cidr).is_ok_and(|c| c.contains(ip))
        || allowed
            .iter()
            .filter_map(|c| Cidr::parse(c).ok())
            .any(|c| c.contains(ip))
}

fn check_target(st: &State, tg: &TargetGroup, id: &str) -> Result<(), ApiError> {
    if tg.target_type == "instance" {
        if !crate::store::ids::well_formed(id, "i-") {
            return Err(invalid_target(format!(
                "The following targets are not valid instance IDs: '{id}'"
            )));
        }
        let inst = st.get::<Instance>(id).ok_or_else(|| {
            invalid_target(format!(
                "The following targets are not valid instances: '{id}'"
            ))
        })?;
        if inst.vpc_id != tg.vpc_id {
            return Err(invalid_target(format!(
                "The following targets are not in the target group VPC '{}': '{id}'",
                tg.vpc_id
            )));
        }
        if inst.state.gone() {
            return Err(invalid_target(format!(
                "The following targets are not in a valid state: '{id}'"
            )));
        }
    } else {
        let ip = net::parse_ip(id).ok_or_else(|| {
            invalid_target(format!("The IP address '{id}' is not a valid IPv4 address"))
        })?;
        let vpc_cidr = st
            .get::<Vpc>(&tg.vpc_id)
            .map(|v| v.cidr.clone())
            .unwrap_or_default();
        if !ip_target_allowed(&vpc_cidr, ip) {
            return Err(invalid_target(format!(
                "The IP address '{id}' is not within the VPC or an allowed private range"
            )));
        }
    }
    Ok(())
}

pub fn register_targets(api: &Api, p: &Params) -> Result<String, ApiError> {
    let a = req(p, "TargetGroupArn")?;
    let targets = targets_of(p)?;
    if targets.is_empty() {
        return Err(missing("Targets"));
    }
    api.store.write(|t| {
        let mut tg = get_tg(api, t, a)?.clone();
        for (id, port, az) in &targets {
            check_target(t, &tg, id)?;
            let port = port.unwrap_or(tg.port);
            match tg
                .targets
                .iter_mut()
                .find(|x| x.id == *id && x.port == port)
            {
                // Registering a draining target again takes it back.
                Some(x) => x.draining_since = None,
                None => tg.targets.push(Target {
                    id: id.clone(),
                    port,
                    az: az.clone(),
                    draining_since: None,
                }),
            }
        }
        if tg.targets.len() > MAX_TARGETS {
            return Err(ApiError::new(
                "TooManyTargets",
                format!("A target group can have at most {MAX_TARGETS} targets"),
            ));
        }
        t.put(tg);
        Ok(())
    })?;
    Ok(String::new())
}

pub fn deregister_targets(api: &Api, p: &Params) -> Result<String, ApiError> {
    let a = req(p, "TargetGroupArn")?;
    let targets = targets_of(p)?;
    if targets.is_empty() {
        return Err(missing("Targets"));
    }
    let (jobs, delay) = api.store.write(|t| {
        let mut tg = get_tg(api, t, a)?.clone();
        let now = now_ms();
        let mut jobs = Vec::new();
        for (id, port, _) in &targets {
            // Without a port: every registration of the target.
            let hit: Vec<&mut Target> = tg
                .targets
                .iter_mut()
                .filter(|x| x.id == *id && port.is_none_or(|p| x.port == p))
                .collect();
            if hit.is_empty() {
                return Err(invalid_target(format!(
                    "The following targets are not registered in target group '{a}': '{id}'"
                )));
            }
            for x in hit {
                if x.draining_since.is_none() {
                    x.draining_since = Some(now);
                    jobs.push(Job::Drain {
                        target_group: tg.id.clone(),
                        target: x.id.clone(),
                        port: x.port,
                        since: now,
                    });
                }
            }
        }
        let delay = Duration::from_secs(u64::from(tg.deregistration_delay_s()));
        t.put(tg);
        Ok::<_, ApiError>((jobs, delay))
    })?;
    for j in jobs {
        api.jobs.push_after(j, delay);
    }
    Ok(String::new())
}

/// (state, reason, description) of one target.
type Health = (String, Option<String>, Option<String>);

fn health_of(
    st: &State,
    tg: &TargetGroup,
    in_use: bool,
    datapath: Option<&[TargetHealthRow]>,
    t: &Target,
) -> Health {
    let h = |s: &str, r: &str, d: &str| (s.to_string(), Some(r.to_string()), Some(d.to_string()));
    if t.draining_since.is_some() {
        return h(
            "draining",
            "Target.DeregistrationInProgress",
            "Target deregistration is in progress",
        );
    }
    if !in_use {
        return h(
            "unused",
            "Target.NotInUse",
            "Target group is not configured to receive traffic from the load balancer",
        );
    }
    if tg.target_type == "instance" {
        let running = st
            .get::<Instance>(&t.id)
            .is_some_and(|i| i.state == InstanceState::Running);
        if !running {
            return h(
                "unused",
                "Target.InvalidState",
                "Target is in the stopped state",
            );
        }
    }
    if !tg.health_check.enabled {
        return h(
            "unavailable",
            "Target.HealthCheckDisabled",
            "Health checks are disabled",
        );
    }
    if let Some(list) = datapath {
        if let Some((_, _, state, reason)) = list
            .iter()
            .find(|(id, port, _, _)| *id == t.id && *port == t.port)
        {
            return (state.clone(), reason.clone(), None);
        }
    }
    h(
        "initial",
        "Elb.RegistrationInProgress",
        "Target registration is in progress",
    )
}

pub fn describe_target_health(api: &Api, p: &Params) -> Result<String, ApiError> {
    let a = req(p, "TargetGroupArn")?;
    let wanted = targets_of(p)?;
    let tg_id = api
        .store
        .read(|st| get_tg(api, st, a).map(|g| g.id.clone()))?;
    // The datapath is asked with nothing locked.
    let datapath = api.driver.target_health(&tg_id);
    api.store.read(|st| {
        let tg = get_tg(api, st, a)?;
        let in_use = !lbs_of_tg(st, &tg.id).is_empty();
        let mut rows: Vec<(Target, Health)> = Vec::new();
        if wanted.is_empty() {
            for t in &tg.targets {
                rows.push((t.clone(), health_of(st, tg, in_use, datapath.as_deref(), t)));
            }
        } else {
            for (id, port, az) in &wanted {
                let found: Vec<&Target> = tg
                    .targets
                    .iter()
                    .filter(|x| x.id == *id && port.is_none_or(|p| x.port == p))
                    .collect();
                if found.is_empty() {
                    if tg.target_type == "instance" && st.get::<Instance>(id).is_none() {
                        return Err(invalid_target(format!(
                            "The following targets are not valid instances: '{id}'"
                        )));
                    }
                    rows.push((
                        Target {
                            id: id.clone(),
                            port: port.unwrap_or(tg.port),
                            az: az.clone(),
                            draining_since: None,
                        },
                        (
                            "unused".into(),
                            Some("Target.NotRegistered".into()),
                            Some("Target is not registered to the target group".into()),
                        ),
                    ));
                }
                for t in found {
                    rows.push((t.clone(), health_of(st, tg, in_use, datapath.as_deref(), t)));
                }
            }
        }
        let hc_port = |t: &Target| {
            if tg.health_check.port == "traffic-port" {
                t.port.to_string()
            } else {
                tg.health_check.port.clone()
            }
        };
        let mut x = Xml::new();
        x.members(
            "TargetHealthDescriptions",
            rows,
            |x, (t, (state, reason, desc))| {
                x.elem("Target", |x| {
                    x.text("Id", &t.id).num("Port", t.port);
                    x.opt("AvailabilityZone", t.az.as_deref());
                })
                .text("HealthCheckPort", &hc_port(&t))
                .elem("TargetHealth", |x| {
                    x.text("State", &state)
                        .opt("Reason", reason.as_deref())
                        .opt("Description", desc.as_deref());
                });
            },
        );
        Ok(x.finish())
    })
}

/// Remove the instance `id` from every target group (it terminated).
pub fn forget_instance(t: &mut Txn<'_>, id: &str) {
    let groups: Vec<TargetGroup> = t
        .iter::<TargetGroup>()
        .filter(|g| g.targets.iter().any(|x| x.id == id))
        .cloned()
        .collect();
    for mut g in groups {
        g.targets.retain(|x| x.id != id);
        t.put(g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(target_type: &str, protocol: &str) -> TargetGroup {
        TargetGroup {
            id: "targetgroup/t/0000000000000001".into(),
            name: "t".into(),
            protocol: protocol.into(),
            port: 80,
            vpc_id: "vpc-1".into(),
            target_type: target_type.into(),
            health_check: HealthCheck {
                enabled: true,
                protocol: "TCP".into(),
                port: "traffic-port".into(),
                path: None,
                interval_s: 30,
                timeout_s: 10,
                healthy_threshold: 5,
                unhealthy_threshold: 2,
            },
            attributes: default_attributes(target_type, protocol),
            targets: Vec::new(),
            tags: Tags::new(),
        }
    }

    #[test]
    fn attribute_changes_fixture() {
        // (target type, protocol, key, value, expected error code or "")
        let table = [
            (
                "instance",
                "TCP",
                "deregistration_delay.timeout_seconds",
                "0",
                "",
            ),
            (
                "instance",
                "TCP",
                "deregistration_delay.timeout_seconds",
                "3600",
                "",
            ),
            (
                "instance",
                "TCP",
                "deregistration_delay.timeout_seconds",
                "3601",
                "ValidationError",
            ),
            (
                "instance",
                "TCP",
                "deregistration_delay.timeout_seconds",
                "-1",
                "ValidationError",
            ),
            ("instance", "TCP", "stickiness.enabled", "true", ""),
            (
                "instance",
                "TCP",
                "stickiness.enabled",
                "yes",
                "ValidationError",
            ),
            ("instance", "TCP", "stickiness.type", "source_ip", ""),
            (
                "instance",
                "TCP",
                "stickiness.type",
                "lb_cookie",
                "ValidationError",
            ),
            (
                "instance",
                "TCP",
                "proxy_protocol_v2.enabled",
                "true",
                "InvalidConfigurationRequest",
            ),
            ("instance", "TCP", "proxy_protocol_v2.enabled", "false", ""),
            (
                "instance",
                "UDP",
                "preserve_client_ip.enabled",
                "false",
                "InvalidConfigurationRequest",
            ),
            ("ip", "UDP", "preserve_client_ip.enabled", "false", ""),
            (
                "instance",
                "TCP",
                "load_balancing.cross_zone.enabled",
                "use_load_balancer_configuration",
                "",
            ),
            ("instance", "TCP", "no.such.key", "1", "ValidationError"),
        ];
        for (tt, proto, k, v, want) in table {
            let got = check_attribute(&group(tt, proto), k, v);
            match (got, want) {
                (Ok(()), "") => {}
                (Err(e), w) if e.code() == w => {}
                (g, w) => panic!("{tt} {proto} {k}={v}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn default_attributes_follow_aws() {
        let a = default_attributes("instance", "TCP");
        assert_eq!(a["deregistration_delay.timeout_seconds"], "300");
        assert_eq!(a["preserve_client_ip.enabled"], "true");
        assert_eq!(
            default_attributes("ip", "TCP")["preserve_client_ip.enabled"],
            "false"
        );
        assert_eq!(
            default_attributes("ip", "UDP")["preserve_client_ip.enabled"],
            "true"
        );
        let mut g = group("ip", "TCP");
        assert_eq!(g.deregistration_delay_s(), 300);
        assert!(!g.sticky_source_ip());
        g.attributes
            .insert("stickiness.enabled".into(), "true".into());
        assert!(g.sticky_source_ip());
        assert_eq!(ATTRIBUTES.len(), a.len());
    }

    #[test]
    fn ip_target_ranges_fixture() {
        let table = [
            ("10.0.0.5", "10.0.0.0/16", true),
            ("172.31.255.1", "10.0.0.0/16", true),
            ("192.168.1.1", "10.0.0.0/16", true),
            ("100.64.0.1", "10.0.0.0/16", true),
            ("100.128.0.1", "10.0.0.0/16", false),
            ("8.8.8.8", "10.0.0.0/16", false),
            ("203.0.113.9", "203.0.113.0/24", true),
        ];
        for (ip, vpc, want) in table {
            let a = net::parse_ip(ip).expect("fixture address");
            assert_eq!(ip_target_allowed(vpc, a), want, "{ip} in {vpc}");
        }
    }

    #[test]
    fn health_check_parameters_fixture() {
        // (parameters, expected error code or "")
        let table: &[(&[(&str, &str)], &str)] = &[
            (
                &[
                    ("HealthCheckIntervalSeconds", "10"),
                    ("HealthCheckTimeoutSeconds", "5"),
                ],
                "",
            ),
            (
                &[
                    ("HealthCheckIntervalSeconds", "10"),
                    ("HealthCheckTimeoutSeconds", "10"),
                ],
                "InvalidConfigurationRequest",
            ),
            (&[("HealthCheckIntervalSeconds", "4")], "ValidationError"),
            (&[("HealthyThresholdCount", "11")], "ValidationError"),
            (&[("HealthCheckPort", "0")], "ValidationError"),
            (&[("HealthCheckPort", "8080")], ""),
            (&[("HealthCheckPath", "/x")], "InvalidConfigurationRequest"),
            (
                &[("HealthCheckProtocol", "HTTP"), ("HealthCheckPath", "/x")],
                "",
            ),
            (
                &[("HealthCheckProtocol", "HTTP"), ("HealthCheckPath", "x")],
                "ValidationError",
            ),
            (&[("HealthCheckProtocol", "UDP")], "ValidationError"),
            (&[("HealthCheckEnabled", "maybe")], "ValidationError"),
        ];
        for (params, want) in table {
            let mut hc = group("instance", "TCP").health_check;
            let got = health_check_from(&Params::from_pairs(params.iter().copied()), &mut hc);
            match (got, *want) {
                (Ok(()), "") => {}
                (Err(e), w) if e.code() == w => {}
                (g, w) => panic!("{params:?}: got {g:?}, want {w:?}"),
            }
        }
    }
}

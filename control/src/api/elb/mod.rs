//! ELBv2 (API version 2015-12-01) on the EC2 endpoint: network load
//! balancers, target groups, targets, listeners and their tags.
//!
//! * The protocol is the same Query protocol as EC2's, but lists are
//!   `Name.member.N`, responses are `<XResponse><XResult>` with
//!   `<ResponseMetadata>`, and errors are `<ErrorResponse><Error><Type>`
//!   with ELBv2's codes (`ValidationError`, `LoadBalancerNotFound`, ...).
//! * Resources are keyed by the resource part of their ARN
//!   (`loadbalancer/net/<name>/<16 hex>`, `targetgroup/<name>/<16 hex>`,
//!   `listener/net/<lb name>/<lb hex>/<16 hex>`); the ARN adds
//!   `arn:aws:elasticloadbalancing:<region>:<account>:`.
//! * [`lb`]: load balancers (one requester-managed interface per subnet,
//!   whose primary address is the VIP); [`tg`]: target groups, targets and
//!   their health; [`listener`]: listeners forwarding to one group.
//! * [`view`] is the read model the datapath translates.

pub mod lb;
pub mod listener;
pub mod tg;

use std::net::Ipv4Addr;

use crate::store::model::*;
use crate::store::{State, Txn};

use super::common::{check_tag, now_ms, Page, MAX_TAGS};
use super::query::Params;
use super::xml::{self, Xml};
use super::{Api, ApiError, Reply};

/// The ELBv2 API version.
pub const VERSION: &str = "2015-12-01";

type Handler = fn(&Api, &Params) -> Result<String, ApiError>;

/// Every ELBv2 action, by name.
pub const ACTIONS: &[(&str, Handler)] = &[
    ("CreateLoadBalancer", lb::create_load_balancer),
    ("DescribeLoadBalancers", lb::describe_load_balancers),
    ("DeleteLoadBalancer", lb::delete_load_balancer),
    ("CreateTargetGroup", tg::create_target_group),
    ("DescribeTargetGroups", tg::describe_target_groups),
    ("DeleteTargetGroup", tg::delete_target_group),
    ("ModifyTargetGroup", tg::modify_target_group),
    (
        "ModifyTargetGroupAttributes",
        tg::modify_target_group_attributes,
    ),
    (
        "DescribeTargetGroupAttributes",
        tg::describe_target_group_attributes,
    ),
    ("RegisterTargets", tg::register_targets),
    ("DeregisterTargets", tg::deregister_targets),
    ("DescribeTargetHealth", tg::describe_target_health),
    ("CreateListener", listener::create_listener),
    ("DescribeListeners", listener::describe_listeners),
    ("DeleteListener", listener::delete_listener),
    ("AddTags", add_tags),
    ("RemoveTags", remove_tags),
    ("DescribeTags", describe_tags),
];

/// Handle one ELBv2 request (Version=2015-12-01).
pub fn call(api: &Api, p: &Params, rid: &str) -> Reply {
    let action = p.get("Action").unwrap_or("");
    let res = if action.is_empty() {
        Err(ApiError::new(
            "MissingAction",
            "The request must contain the parameter Action",
        ))
    } else {
        match ACTIONS.iter().find(|(n, _)| *n == action) {
            Some((_, h)) => h(api, p),
            None => Err(ApiError::new(
                "InvalidAction",
                format!("The action {action} is not valid for this web service."),
            )),
        }
    };
    match res {
        Ok(body) => Reply {
            status: 200,
            body: xml::elbv2_response(action, rid, &body),
        },
        Err(e) => {
            if e.status() >= 500 {
                tracing::error!("ELBv2 request failed: {}", e.message());
            }
            Reply {
                status: e.status(),
                body: xml::elbv2_error(e.code(), &e.message(), rid, e.status() < 500),
            }
        }
    }
}

// ----- errors and parameters -----

pub fn validation(message: impl Into<String>) -> ApiError {
    ApiError::new("ValidationError", message)
}

pub fn config_error(message: impl Into<String>) -> ApiError {
    ApiError::new("InvalidConfigurationRequest", message)
}

pub fn missing(name: &str) -> ApiError {
    validation(format!(
        "1 validation error detected: Value null at '{name}' failed to satisfy constraint: Member must not be null"
    ))
}

/// A required parameter, ELBv2's way.
pub fn req<'a>(p: &'a Params, name: &str) -> Result<&'a str, ApiError> {
    match p.get(name) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(missing(name)),
    }
}

/// An integer parameter within `lo..=hi`.
pub fn opt_int(p: &Params, name: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    let Some(v) = p.get(name) else {
        return Ok(None);
    };
    match v.trim().parse::<i64>() {
        Ok(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
        _ => Err(validation(format!(
            "1 validation error detected: Value '{v}' at '{name}' failed to satisfy constraint: Member must have value between {lo} and {hi}"
        ))),
    }
}

pub fn opt_bool(p: &Params, name: &str) -> Result<Option<bool>, ApiError> {
    match p.get(name) {
        None => Ok(None),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(v) => Err(validation(format!(
            "Value '{v}' at '{name}' is not a boolean (true or false)"
        ))),
    }
}

/// A `Name.member.N` list, refusing bad indexes.
pub fn members<'a>(p: &'a Params, name: &str) -> Result<Vec<&'a str>, ApiError> {
    let prefix = format!("{name}.member");
    if let Some(bad) = p.bad_index(&prefix) {
        return Err(validation(format!(
            "The parameter {bad} is not a valid list member."
        )));
    }
    Ok(p.list(&prefix))
}

/// `Name.member.N.Field...` structures.
pub fn member_structs(p: &Params, name: &str) -> Result<Vec<Params>, ApiError> {
    let prefix = format!("{name}.member");
    if let Some(bad) = p.bad_index(&prefix) {
        return Err(validation(format!(
            "The parameter {bad} is not a valid list member."
        )));
    }
    Ok(p.structs(&prefix))
}

/// A load balancer or target group name: 1..=32 letters, digits and
/// hyphens, not starting or ending with a hyphen.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(validation(format!(
            "{what} name '{name}' must have 1 to 32 alphanumeric characters or hyphens, and must not begin or end with a hyphen"
        )))
    }
}

/// `Tags.member.N.Key/Value`.
pub fn tags_of(p: &Params) -> Result<Tags, ApiError> {
    let mut tags = Tags::new();
    for t in member_structs(p, "Tags")? {
        let k = t.get("Key").unwrap_or("");
        let v = t.get("Value").unwrap_or("");
        check_tag(k, v).map_err(|e| validation(e.message()))?;
        if tags.insert(k.to_string(), v.to_string()).is_some() {
            return Err(ApiError::new(
                "DuplicateTagKeys",
                format!("Tag key '{k}' is given more than once"),
            ));
        }
    }
    if tags.len() > MAX_TAGS {
        return Err(ApiError::new(
            "TooManyTags",
            format!("A resource can have at most {MAX_TAGS} tags"),
        ));
    }
    Ok(tags)
}

/// `Marker` and `PageSize` (1..=400).
pub fn marker_page(p: &Params) -> Result<Page, ApiError> {
    let max = opt_int(p, "PageSize", 1, 400)?.map(|v| v as usize);
    let after = match p.get("Marker") {
        None | Some("") => None,
        Some(m) => Some(
            m.strip_prefix(MARKER_PREFIX)
                .filter(|r| !r.is_empty())
                .ok_or_else(|| validation(format!("Invalid Marker '{m}'")))?
                .to_string(),
        ),
    };
    Ok(Page { max, after })
}

const MARKER_PREFIX: &str = "enilab1.";

/// Cut `items` (sorted by key) to one page and give the NextMarker.
pub fn paginate<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> &str,
    page: &Page,
) -> (Vec<T>, Option<String>) {
    // common::paginate makes the same tokens; reuse it.
    super::common::paginate(items, key, page)
}

// ----- ARNs and lookups -----

/// `arn:aws:elasticloadbalancing:<region>:<account>:`.
pub fn arn_prefix(api: &Api) -> String {
    let region = api
        .config
        .zones
        .first()
        .map(|z| super::vpc::region_of(z))
        .unwrap_or("us-east-1");
    format!(
        "arn:aws:elasticloadbalancing:{region}:{}:",
        api.config.account_id
    )
}

pub fn arn(api: &Api, id: &str) -> String {
    format!("{}{id}", arn_prefix(api))
}

/// The stored ID an ARN names, if it is one of ours of kind `K`; a string
/// that is not an ARN at all is a ValidationError.
pub fn id_of<'a, K: Kind>(api: &Api, arn: &'a str) -> Result<Option<&'a str>, ApiError> {
    if !arn.starts_with("arn:") {
        return Err(validation(format!("'{arn}' is not a valid ARN")));
    }
    Ok(arn
        .strip_prefix(arn_prefix(api).as_str())
        .filter(|id| id.starts_with(K::PREFIX)))
}

pub fn lb_not_found() -> ApiError {
    ApiError::new(
        "LoadBalancerNotFound",
        "One or more load balancers not found",
    )
}

pub fn tg_not_found() -> ApiError {
    ApiError::new("TargetGroupNotFound", "One or more target groups not found")
}

pub fn listener_not_found() -> ApiError {
    ApiError::new("ListenerNotFound", "One or more listeners not found")
}

pub fn get_lb<'a>(api: &Api, st: &'a State, arn: &str) -> Result<&'a LoadBalancer, ApiError> {
    id_of::<LoadBalancer>(api, arn)?
        .and_then(|id| st.get::<LoadBalancer>(id))
        .ok_or_else(lb_not_found)
}

pub fn get_tg<'a>(api: &Api, st: &'a State, arn: &str) -> Result<&'a TargetGroup, ApiError> {
    id_of::<TargetGroup>(api, arn)?
        .and_then(|id| st.get::<TargetGroup>(id))
        .ok_or_else(tg_not_found)
}

pub fn get_listener<'a>(api: &Api, st: &'a State, arn: &str) -> Result<&'a Listener, ApiError> {
    id_of::<Listener>(api, arn)?
        .and_then(|id| st.get::<Listener>(id))
        .ok_or_else(listener_not_found)
}

/// 16 lowercase hex digits for a new ARN.
pub fn new_hex() -> String {
    format!("{:016x}", crate::store::ids::random_u64())
}

// ----- jobs -----

/// The job: provisioning → active.
pub fn finish_load_balancer(t: &mut Txn<'_>, id: &str) -> Result<(), ApiError> {
    if let Some(mut lb) = t.get::<LoadBalancer>(id).cloned() {
        if lb.state == LbState::Provisioning {
            lb.state = LbState::Active;
            t.put(lb);
        }
    }
    Ok(())
}

/// The job at the end of a deregistration delay: remove the target if it
/// is still draining since `since` (not registered again meanwhile).
pub fn finish_drain(
    t: &mut Txn<'_>,
    tg_id: &str,
    target: &str,
    port: u16,
    since: u64,
) -> Result<(), ApiError> {
    if let Some(mut tg) = t.get::<TargetGroup>(tg_id).cloned() {
        let before = tg.targets.len();
        tg.targets
            .retain(|x| !(x.id == target && x.port == port && x.draining_since == Some(since)));
        if tg.targets.len() != before {
            t.put(tg);
        }
    }
    Ok(())
}

// ----- tags -----

/// The tags of the resource an ARN names (any of the three kinds).
fn tagged(api: &Api, t: &State, arn: &str) -> Result<Resource, ApiError> {
    if let Some(id) = id_of::<LoadBalancer>(api, arn)? {
        return t.resource(id).cloned().ok_or_else(lb_not_found);
    }
    if let Some(id) = id_of::<TargetGroup>(api, arn)? {
        return t.resource(id).cloned().ok_or_else(tg_not_found);
    }
    if let Some(id) = id_of::<Listener>(api, arn)? {
        return t.resource(id).cloned().ok_or_else(listener_not_found);
    }
    Err(validation(format!(
        "'{arn}' is not the ARN of a load balancer, target group or listener of this account"
    )))
}

pub fn add_tags(api: &Api, p: &Params) -> Result<String, ApiError> {
    let arns = members(p, "ResourceArns")?;
    if arns.is_empty() {
        return Err(missing("ResourceArns"));
    }
    let tags = tags_of(p)?;
    if tags.is_empty() {
        return Err(missing("Tags"));
    }
    api.store.write(|t| {
        for a in &arns {
            let mut r = tagged(api, t, a)?;
            r.tags_mut().extend(tags.clone());
            if r.tags().len() > MAX_TAGS {
                return Err(ApiError::new(
                    "TooManyTags",
                    format!("'{a}' would have more than {MAX_TAGS} tags"),
                ));
            }
            t.put_resource(r);
        }
        Ok(())
    })?;
    Ok(String::new())
}

pub fn remove_tags(api: &Api, p: &Params) -> Result<String, ApiError> {
    let arns = members(p, "ResourceArns")?;
    if arns.is_empty() {
        return Err(missing("ResourceArns"));
    }
    let keys = members(p, "TagKeys")?;
    api.store.write(|t| {
        for a in &arns {
            let mut r = tagged(api, t, a)?;
            for k in &keys {
                r.tags_mut().remove(*k);
            }
            t.put_resource(r);
        }
        Ok::<_, ApiError>(())
    })?;
    Ok(String::new())
}

pub fn describe_tags(api: &Api, p: &Params) -> Result<String, ApiError> {
    let arns = members(p, "ResourceArns")?;
    if arns.is_empty() {
        return Err(missing("ResourceArns"));
    }
    if arns.len() > 20 {
        return Err(validation(
            "At most 20 resource ARNs can be described at once",
        ));
    }
    api.store.read(|st| {
        let mut x = Xml::new();
        let mut rows = Vec::new();
        for a in &arns {
            let r = tagged(api, st, a)?;
            rows.push((a.to_string(), r.tags().clone()));
        }
        x.members("TagDescriptions", rows, |x, (a, tags)| {
            x.text("ResourceArn", &a);
            write_tags(x, &tags);
        });
        Ok(x.finish())
    })
}

pub fn write_tags(x: &mut Xml, tags: &Tags) {
    x.members("Tags", tags, |x, (k, v)| {
        x.text("Key", k).text("Value", v);
    });
}

pub fn iso_now() -> String {
    super::common::iso8601(now_ms())
}

// ----- the read model -----

/// A target as the datapath needs it: instance targets resolved to the
/// instance's primary private IP (None while it has none, e.g. terminated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTarget {
    pub id: String,
    pub ip: Option<Ipv4Addr>,
    pub port: u16,
    /// Deregistered at (ms since the epoch): still served for existing
    /// flows, no new ones.
    pub draining_since: Option<u64>,
}

/// A target group with its targets resolved.
#[derive(Debug, Clone)]
pub struct TgView<'a> {
    pub tg: &'a TargetGroup,
    pub targets: Vec<ResolvedTarget>,
}

#[derive(Debug, Clone)]
pub struct ListenerView<'a> {
    pub listener: &'a Listener,
    /// None only if the state is inconsistent (the group is gone).
    pub target_group: Option<TgView<'a>>,
}

/// One network load balancer: its nodes (interface and VIP per subnet) are
/// in `lb.nodes`.
#[derive(Debug, Clone)]
pub struct NlbView<'a> {
    pub lb: &'a LoadBalancer,
    pub listeners: Vec<ListenerView<'a>>,
}

/// The primary private IP of an instance (its device 0, card 0 interface).
pub fn instance_ip(st: &State, instance: &str) -> Option<Ipv4Addr> {
    st.iter::<Eni>()
        .find(|e| {
            e.attachment.as_ref().is_some_and(|a| {
                a.instance_id == instance && a.device_index == 0 && a.card_index == 0
            })
        })
        .and_then(|e| e.primary_ip().parse().ok())
}

pub fn tg_view<'a>(st: &'a State, tg: &'a TargetGroup) -> TgView<'a> {
    let targets = tg
        .targets
        .iter()
        .map(|t| ResolvedTarget {
            id: t.id.clone(),
            ip: if tg.target_type == "instance" {
                instance_ip(st, &t.id)
            } else {
                t.id.parse().ok()
            },
            port: t.port,
            draining_since: t.draining_since,
        })
        .collect();
    TgView { tg, targets }
}

/// Every load balancer with its listeners and their target groups, for
/// the datapath (pure; call it from `on_change`).
pub fn view(st: &State) -> Vec<NlbView<'_>> {
    st.iter::<LoadBalancer>()
        .map(|lb| NlbView {
            lb,
            listeners: st
                .iter::<Listener>()
                .filter(|l| l.lb_id == lb.id)
                .map(|l| ListenerView {
                    listener: l,
                    target_group: st
                        .get::<TargetGroup>(&l.target_group)
                        .map(|tg| tg_view(st, tg)),
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::driver::{InstanceDriver, TargetHealthRow};
    use super::super::Config;
    use super::*;

    /// Reports every target of every group on port 80 as unhealthy: the
    /// datapath seam of DescribeTargetHealth.
    struct HealthDriver;

    impl InstanceDriver for HealthDriver {
        fn target_health(&self, _tg: &str) -> Option<Vec<TargetHealthRow>> {
            Some(vec![(
                "10.8.1.50".into(),
                80,
                "unhealthy".into(),
                Some("Target.FailedHealthChecks".into()),
            )])
        }
    }

    struct Lab {
        api: Arc<Api>,
        dir: PathBuf,
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.dir).ok();
        }
    }

    impl Lab {
        fn new(tag: &str) -> Lab {
            let dir = std::env::temp_dir().join(format!(
                "enilab-elb-{tag}-{}",
                crate::store::ids::random_u64()
            ));
            let api = Api::open(&dir, Config::default(), Arc::new(HealthDriver)).expect("open api");
            Lab { api, dir }
        }

        fn call(&self, version: &str, action: &str, args: &[(&str, &str)]) -> String {
            let mut pairs = vec![("Action", action), ("Version", version)];
            pairs.extend_from_slice(args);
            let r = self.api.call(&Params::from_pairs(pairs));
            assert_eq!(r.status, 200, "{action}: {}", r.body);
            r.body
        }

        fn ec2(&self, action: &str, args: &[(&str, &str)]) -> String {
            self.call("2016-11-15", action, args)
        }

        fn elb(&self, action: &str, args: &[(&str, &str)]) -> String {
            self.call(VERSION, action, args)
        }
    }

    use crate::api::bench::field;

    #[test]
    fn read_model_and_health_seam() {
        let lab = Lab::new("view");
        let vpc = field(
            &lab.ec2("CreateVpc", &[("CidrBlock", "10.8.0.0/16")]),
            "vpcId",
        );
        let sub = field(
            &lab.ec2(
                "CreateSubnet",
                &[("VpcId", &vpc), ("CidrBlock", "10.8.1.0/24")],
            ),
            "subnetId",
        );
        let inst = field(
            &lab.ec2(
                "RunInstances",
                &[
                    ("ImageId", "ami-0e1ab000000000001"),
                    ("InstanceType", "t3.micro"),
                    ("MinCount", "1"),
                    ("MaxCount", "1"),
                    ("SubnetId", &sub),
                ],
            ),
            "instanceId",
        );
        let lb = field(
            &lab.elb(
                "CreateLoadBalancer",
                &[
                    ("Name", "m"),
                    ("Type", "network"),
                    ("Scheme", "internal"),
                    ("SubnetMappings.member.1.SubnetId", &sub),
                    ("SubnetMappings.member.1.PrivateIPv4Address", "10.8.1.200"),
                ],
            ),
            "LoadBalancerArn",
        );
        let itg = field(
            &lab.elb(
                "CreateTargetGroup",
                &[
                    ("Name", "i"),
                    ("Protocol", "TCP"),
                    ("Port", "80"),
                    ("VpcId", &vpc),
                ],
            ),
            "TargetGroupArn",
        );
        let ipg = field(
            &lab.elb(
                "CreateTargetGroup",
                &[
                    ("Name", "p"),
                    ("Protocol", "UDP"),
                    ("Port", "80"),
                    ("VpcId", &vpc),
                    ("TargetType", "ip"),
                ],
            ),
            "TargetGroupArn",
        );
        for (tg, proto, port) in [(&itg, "TCP", "80"), (&ipg, "UDP", "80")] {
            lab.elb(
                "CreateListener",
                &[
                    ("LoadBalancerArn", &lb),
                    ("Protocol", proto),
                    ("Port", if proto == "TCP" { port } else { "81" }),
                    ("DefaultActions.member.1.Type", "forward"),
                    ("DefaultActions.member.1.TargetGroupArn", tg),
                ],
            );
        }
        assert!(lab.api.jobs.wait_idle(Duration::from_secs(10)));
        lab.elb(
            "RegisterTargets",
            &[("TargetGroupArn", &itg), ("Targets.member.1.Id", &inst)],
        );
        lab.elb(
            "RegisterTargets",
            &[
                ("TargetGroupArn", &ipg),
                ("Targets.member.1.Id", "10.8.1.50"),
                ("Targets.member.2.Id", "10.8.1.51"),
            ],
        );
        lab.elb(
            "DeregisterTargets",
            &[
                ("TargetGroupArn", &ipg),
                ("Targets.member.1.Id", "10.8.1.51"),
            ],
        );
        let inst_ip = lab.api.store.read(|st| instance_ip(st, &inst));
        assert!(inst_ip.is_some_and(|ip| ip.octets()[..3] == [10, 8, 1]));
        lab.api.store.read(|st| {
            let v = view(st);
            assert_eq!(v.len(), 1);
            let nlb = &v[0];
            assert_eq!(nlb.lb.state, LbState::Active);
            assert_eq!(nlb.lb.nodes.len(), 1);
            assert_eq!(nlb.lb.nodes[0].private_ip, "10.8.1.200");
            assert!(st.get::<Eni>(&nlb.lb.nodes[0].eni_id).is_some());
            assert_eq!(nlb.listeners.len(), 2);
            for l in &nlb.listeners {
                let tg = l.target_group.as_ref().expect("target group");
                match l.listener.protocol.as_str() {
                    "TCP" => {
                        assert_eq!(tg.targets.len(), 1);
                        assert_eq!(tg.targets[0].ip, inst_ip);
                        assert_eq!(tg.targets[0].port, 80);
                    }
                    _ => {
                        let got: Vec<(Option<Ipv4Addr>, bool)> = tg
                            .targets
                            .iter()
                            .map(|t| (t.ip, t.draining_since.is_some()))
                            .collect();
                        assert_eq!(
                            got,
                            vec![
                                (Some(Ipv4Addr::new(10, 8, 1, 50)), false),
                                (Some(Ipv4Addr::new(10, 8, 1, 51)), true),
                            ]
                        );
                    }
                }
            }
        });
        // The driver's health is what DescribeTargetHealth reports; draining
        // wins over it, and targets it does not know are `initial`.
        let body = lab.elb("DescribeTargetHealth", &[("TargetGroupArn", &ipg)]);
        let states: Vec<String> = body
            .split("<State>")
            .skip(1)
            .filter_map(|s| s.split("</State>").next().map(String::from))
            .collect();
        assert_eq!(states, vec!["unhealthy", "draining"]);
        assert!(body.contains("<Reason>Target.FailedHealthChecks</Reason>"));
        let body = lab.elb("DescribeTargetHealth", &[("TargetGroupArn", &itg)]);
        assert_eq!(field(&body, "State"), "initial");
    }

    #[test]
    fn names_fixture() {
        let table = [
            ("a", true),
            ("web-1", true),
            ("x".repeat(32).as_str(), true),
            ("x".repeat(33).as_str(), false),
            ("", false),
            ("-a", false),
            ("a-", false),
            ("a_b", false),
            ("a.b", false),
        ]
        .map(|(n, ok)| (n.to_string(), ok));
        for (n, ok) in table {
            assert_eq!(check_name("Load balancer", &n).is_ok(), ok, "{n:?}");
        }
    }
}

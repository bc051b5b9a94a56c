//! Listeners of network load balancers: TCP, UDP or TCP_UDP on a port,
//! forwarding to one target group.

use crate::store::model::*;

use super::super::query::Params;
use super::super::xml::Xml;
use super::super::{Api, ApiError};
use super::*;

/// Listeners per load balancer (AWS's default quota).
pub const MAX_LISTENERS: usize = 50;

pub fn write_listener(x: &mut Xml, api: &Api, l: &Listener) {
    let tg = arn(api, &l.target_group);
    x.text("ListenerArn", &arn(api, &l.id))
        .text("LoadBalancerArn", &arn(api, &l.lb_id))
        .num("Port", l.port)
        .text("Protocol", &l.protocol);
    x.members("DefaultActions", [&tg], |x, tg| {
        x.text("Type", "forward")
            .text("TargetGroupArn", tg)
            .elem("ForwardConfig", |x| {
                x.members("TargetGroups", [tg], |x, tg| {
                    x.text("TargetGroupArn", tg).num("Weight", 1);
                })
                .elem("TargetGroupStickinessConfig", |x| {
                    x.bool("Enabled", false);
                });
            });
    });
}

/// The one target group `DefaultActions` forwards to.
fn forward_target(p: &Params) -> Result<String, ApiError> {
    let actions = member_structs(p, "DefaultActions")?;
    let [a] = actions.as_slice() else {
        if actions.is_empty() {
            return Err(missing("DefaultActions"));
        }
        return Err(ApiError::new(
            "TooManyActions",
            "A network load balancer listener takes exactly one forward action",
        ));
    };
    match a.get("Type") {
        Some("forward") => {}
        Some(t) => {
            return Err(ApiError::new(
                "InvalidLoadBalancerAction",
                format!("Action type '{t}' is not supported by network load balancers"),
            ))
        }
        None => return Err(missing("DefaultActions.member.N.Type")),
    }
    let direct = a.get("TargetGroupArn").filter(|s| !s.is_empty());
    let groups = member_structs(a, "ForwardConfig.TargetGroups")?;
    let from_config: Vec<&str> = groups
        .iter()
        .filter_map(|g| g.get("TargetGroupArn"))
        .collect();
    match (direct, from_config.as_slice()) {
        (Some(d), []) => Ok(d.to_string()),
        (None, [one]) => Ok(one.to_string()),
        (Some(d), [one]) if d == *one => Ok(d.to_string()),
        (None, []) => Err(missing("DefaultActions.member.N.TargetGroupArn")),
        _ => Err(config_error(
            "A network load balancer listener forwards to exactly one target group",
        )),
    }
}

pub fn create_listener(api: &Api, p: &Params) -> Result<String, ApiError> {
    let lb_arn = req(p, "LoadBalancerArn")?;
    let proto = match req(p, "Protocol")? {
        v @ ("TCP" | "UDP" | "TCP_UDP") => v,
        v @ ("TLS" | "HTTP" | "HTTPS") => {
            return Err(ApiError::new(
                "UnsupportedProtocol",
                format!("Listener protocol '{v}' is not supported by enilab (TCP, UDP, TCP_UDP)"),
            ))
        }
        v => return Err(validation(format!("Invalid listener protocol '{v}'"))),
    };
    let port = opt_int(p, "Port", 1, 65535)?.ok_or_else(|| missing("Port"))? as u16;
    if p.has_prefix("Certificates") || p.contains("SslPolicy") || p.has_prefix("AlpnPolicy") {
        return Err(config_error("TLS listeners are not supported by enilab"));
    }
    let tg_arn = forward_target(p)?;
    let tags = tags_of(p)?;
    let l = api.store.write(|t| {
        let lb = get_lb(api, t, lb_arn)?.clone();
        let tg = get_tg(api, t, &tg_arn)?.clone();
        if let Some(o) = t
            .iter::<Listener>()
            .find(|l| l.lb_id == lb.id && l.port == port)
        {
            // A repeated identical create answers with the existing listener.
            if o.protocol == proto && o.target_group == tg.id {
                return Ok(o.clone());
            }
            return Err(ApiError::new(
                "DuplicateListener",
                format!("A listener already exists on port {port} of this load balancer"),
            ));
        }
        if tg.vpc_id != lb.vpc_id {
            return Err(config_error(format!(
                "Target group '{tg_arn}' is in VPC {} but the load balancer is in VPC {}",
                tg.vpc_id, lb.vpc_id
            )));
        }
        if tg.protocol != proto {
            return Err(ApiError::new(
                "IncompatibleProtocols",
                format!(
                    "The listener protocol {proto} is not compatible with the target group protocol {}",
                    tg.protocol
                ),
            ));
        }
        if t
            .iter::<Listener>()
            .any(|l| l.target_group == tg.id && l.lb_id != lb.id)
        {
            return Err(ApiError::new(
                "TargetGroupAssociationLimit",
                format!(
                    "The following target groups cannot be associated with more than one load balancer: '{tg_arn}'"
                ),
            ));
        }
        if t.iter::<Listener>().filter(|l| l.lb_id == lb.id).count() >= MAX_LISTENERS {
            return Err(ApiError::new(
                "TooManyListeners",
                format!("A load balancer can have at most {MAX_LISTENERS} listeners"),
            ));
        }
        let suffix = lb.id.strip_prefix("loadbalancer/").unwrap_or(&lb.id);
        let l = Listener {
            id: format!("listener/{suffix}/{}", new_hex()),
            lb_id: lb.id.clone(),
            protocol: proto.to_string(),
            port,
            target_group: tg.id.clone(),
            tags: tags.clone(),
        };
        t.put(l.clone());
        Ok(l)
    })?;
    let mut x = Xml::new();
    x.members("Listeners", [&l], |x, l| write_listener(x, api, l));
    Ok(x.finish())
}

pub fn describe_listeners(api: &Api, p: &Params) -> Result<String, ApiError> {
    let lb_arn = p.get("LoadBalancerArn");
    let arns = members(p, "ListenerArns")?;
    if lb_arn.is_some() != arns.is_empty() {
        return Err(validation(
            "Specify either LoadBalancerArn or ListenerArns (one of them)",
        ));
    }
    let pg = marker_page(p)?;
    api.store.read(|st| {
        let mut sel: Vec<&Listener> = match lb_arn {
            Some(a) => {
                let lb = get_lb(api, st, a)?;
                st.iter::<Listener>().filter(|l| l.lb_id == lb.id).collect()
            }
            None => arns
                .iter()
                .map(|a| get_listener(api, st, a))
                .collect::<Result<_, _>>()?,
        };
        sel.sort_by(|a, b| a.id.cmp(&b.id));
        sel.dedup_by(|a, b| a.id == b.id);
        let (sel, marker) = paginate(sel, |l| &l.id, &pg);
        let mut x = Xml::new();
        x.members("Listeners", sel, |x, l| write_listener(x, api, l));
        x.opt("NextMarker", marker.as_deref());
        Ok(x.finish())
    })
}

pub fn delete_listener(api: &Api, p: &Params) -> Result<String, ApiError> {
    let a = req(p, "ListenerArn")?;
    api.store.write(|t| {
        let id = get_listener(api, t, a)?.id.clone();
        t.remove(&id);
        Ok::<_, ApiError>(())
    })?;
    Ok(String::new())
}

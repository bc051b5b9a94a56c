//! Flow logs. Records go to a file: `LogDestinationType=file` (also the
//! default) with `LogDestination` an absolute path on the host. Writing the
//! records is the datapath's job; the API keeps the configuration.

use crate::store::model::*;
use crate::store::State;

use super::common::*;
use super::query::Params;
use super::vpc::fresh;
use super::xml::Xml;
use super::{Api, ApiError};

/// The version 2 default format.
pub const DEFAULT_FORMAT: &str = "${version} ${account-id} ${interface-id} ${srcaddr} ${dstaddr} ${srcport} ${dstport} ${protocol} ${packets} ${bytes} ${start} ${end} ${action} ${log-status}";

fn write_flow_log(x: &mut Xml, f: &FlowLog) {
    x.text("creationTime", &iso8601(f.creation_time))
        .text("deliverLogsStatus", "SUCCESS")
        .text("flowLogId", &f.id)
        .text("flowLogStatus", "ACTIVE")
        .text("resourceId", &f.resource_id)
        .text("trafficType", &f.traffic_type)
        .text("logDestinationType", &f.destination_type)
        .text("logDestination", &f.destination)
        .text("logFormat", &f.log_format)
        .num("maxAggregationInterval", f.max_aggregation_interval)
        .tags(&f.tags);
}

fn unsuccessful(x: &mut Xml, items: &[(String, ApiError)]) {
    x.set("unsuccessful", items, |x, (id, e)| {
        x.elem("error", |x| {
            x.text("code", e.code()).text("message", &e.message());
        })
        .text("resourceId", id);
    });
}

fn resource_exists(st: &State, rtype: &str, id: &str) -> Result<(), ApiError> {
    match rtype {
        "VPC" => VPC.get::<Vpc>(st, id).map(|_| ()),
        "Subnet" => SUBNET.get::<Subnet>(st, id).map(|_| ()),
        _ => ENI.get::<Eni>(st, id).map(|_| ()),
    }
}

pub fn create_flow_logs(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "ResourceId")?;
    if ids.is_empty() {
        return Err(ApiError::missing("ResourceId"));
    }
    if ids.len() > 25 {
        return Err(ApiError::invalid(
            "At most 25 resource IDs can be given.".to_string(),
        ));
    }
    let rtype = req(p, "ResourceType")?;
    if !["VPC", "Subnet", "NetworkInterface"].contains(&rtype) {
        return Err(ApiError::invalid(format!(
            "Invalid value '{rtype}' for ResourceType; expected VPC, Subnet or NetworkInterface (enilab supports those)."
        )));
    }
    let traffic = req(p, "TrafficType")?;
    if !["ACCEPT", "REJECT", "ALL"].contains(&traffic) {
        return Err(ApiError::invalid(format!(
            "Invalid value '{traffic}' for TrafficType; expected ACCEPT, REJECT or ALL."
        )));
    }
    let dtype = p.get("LogDestinationType").unwrap_or("file");
    if dtype != "file" {
        return Err(ApiError::invalid(format!(
            "LogDestinationType '{dtype}' is not supported by enilab; use 'file' with LogDestination set to an absolute path."
        )));
    }
    let dest = req(p, "LogDestination")?;
    if !dest.starts_with('/')
        || dest.contains('\0')
        || dest.len() > 4096
        || dest.split('/').any(|c| c == "..")
    {
        return Err(ApiError::invalid(format!(
            "Invalid value '{dest}' for LogDestination: it must be an absolute path without '..'."
        )));
    }
    let interval = opt_int(p, "MaxAggregationInterval")?.unwrap_or(600);
    if interval != 60 && interval != 600 {
        return Err(ApiError::invalid(format!(
            "Invalid value '{interval}' for MaxAggregationInterval; expected 60 or 600."
        )));
    }
    let format = match p.get("LogFormat") {
        Some(f) if !f.trim().is_empty() => f.to_string(),
        _ => DEFAULT_FORMAT.to_string(),
    };
    let tags = tag_spec(p, "vpc-flow-log", &["vpc-flow-log"])?;
    let (made, failed) = api.store.write(|t| {
        let mut made = Vec::new();
        let mut failed = Vec::new();
        for id in &ids {
            if let Err(e) = resource_exists(t, rtype, id) {
                failed.push((id.to_string(), e));
                continue;
            }
            let dup = t.iter::<FlowLog>().any(|f| {
                f.resource_id == *id && f.traffic_type == traffic && f.destination == dest
            });
            if dup {
                failed.push((
                    id.to_string(),
                    ApiError::new("FlowLogAlreadyExists", "Error. There is an existing Flow Log with the same configuration and log destination.".to_string()),
                ));
                continue;
            }
            let f = FlowLog {
                id: fresh(t, "fl-"),
                resource_id: id.to_string(),
                traffic_type: traffic.to_string(),
                destination_type: dtype.to_string(),
                destination: dest.to_string(),
                max_aggregation_interval: interval as u32,
                log_format: format.clone(),
                creation_time: now_ms(),
                tags: tags.clone(),
            };
            made.push(f.id.clone());
            t.put(f);
        }
        Ok::<_, ApiError>((made, failed))
    })?;
    let mut x = Xml::new();
    if let Some(c) = p.get("ClientToken") {
        x.text("clientToken", c);
    }
    x.string_set("flowLogIdSet", made.iter().map(|s| s.as_str()));
    unsuccessful(&mut x, &failed);
    Ok(x.finish())
}

const FL_FILTERS: &[&str] = &[
    "flow-log-id",
    "resource-id",
    "traffic-type",
    "log-destination-type",
    "deliver-log-status",
    "log-group-name",
];

pub fn describe_flow_logs(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "FlowLogId")?;
    let fl = filters(p, FL_FILTERS)?;
    let pg = page(p, !ids.is_empty())?;
    api.store.read(|st| {
        // Unknown IDs are simply not listed, as AWS does for flow logs.
        for id in &ids {
            FLOWLOG.check(id)?;
        }
        let sel: Vec<&FlowLog> = st
            .iter::<FlowLog>()
            .filter(|f| ids.is_empty() || ids.contains(&f.id.as_str()))
            .filter(|f| {
                filter_match(&fl, &f.tags, |n| match n {
                    "flow-log-id" => vec![f.id.clone()],
                    "resource-id" => vec![f.resource_id.clone()],
                    "traffic-type" => vec![f.traffic_type.clone()],
                    "log-destination-type" => vec![f.destination_type.clone()],
                    "deliver-log-status" => vec!["SUCCESS".into()],
                    _ => vec![],
                })
            })
            .collect();
        let (sel, token) = paginate(sel, |f| &f.id, &pg);
        let mut x = Xml::new();
        x.set("flowLogSet", sel, write_flow_log);
        x.opt("nextToken", token.as_deref());
        Ok(x.finish())
    })
}

pub fn delete_flow_logs(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "FlowLogId")?;
    if ids.is_empty() {
        return Err(ApiError::missing("FlowLogId"));
    }
    let failed = api.store.write(|t| {
        let mut failed = Vec::new();
        for id in &ids {
            match FLOWLOG.get::<FlowLog>(t, id) {
                Ok(_) => t.remove(id),
                Err(e) => failed.push((id.to_string(), e)),
            }
        }
        Ok::<_, ApiError>(failed)
    })?;
    let mut x = Xml::new();
    unsuccessful(&mut x, &failed);
    Ok(x.finish())
}

//! CreateTags, DeleteTags, DescribeTags over every taggable resource.

use crate::store::model::Resource;
use crate::store::State;

use super::common::*;
use super::query::Params;
use super::vpc::ret_true;
use super::xml::Xml;
use super::{Api, ApiError};

const KINDS: &[IdKind] = &[
    VPC, SUBNET, SG, RTB, IGW, ACL, ENI, INSTANCE, EIPALLOC, FLOWLOG, NATGW,
];

/// Find a resource of any taggable kind, with that kind's error codes.
fn resource<'a>(st: &'a State, id: &str) -> Result<&'a Resource, ApiError> {
    // "eni-attach-" is not taggable here; check the longest prefixes first.
    let kind = KINDS
        .iter()
        .filter(|k| id.starts_with(k.prefix))
        .max_by_key(|k| k.prefix.len())
        .ok_or_else(|| ApiError::new("InvalidID", format!("The ID '{id}' is not valid")))?;
    kind.check(id)?;
    st.resource(id).ok_or_else(|| kind.not_found(id))
}

pub fn create_tags(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "ResourceId")?;
    if ids.is_empty() {
        return Err(ApiError::missing("ResourceId"));
    }
    let tags = tags_of(p)?;
    if tags.is_empty() {
        return Err(ApiError::missing("Tag"));
    }
    api.store.write(|t| {
        for id in &ids {
            let mut r = resource(t, id)?.clone();
            r.tags_mut().extend(tags.clone());
            if r.tags().len() > MAX_TAGS {
                return Err(ApiError::new(
                    "TagLimitExceeded",
                    format!("The maximum number of tags per resource ({MAX_TAGS}) has been reached for {id}"),
                ));
            }
            t.put_resource(r);
        }
        Ok(())
    })?;
    Ok(ret_true())
}

pub fn delete_tags(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "ResourceId")?;
    if ids.is_empty() {
        return Err(ApiError::missing("ResourceId"));
    }
    let specs: Vec<(String, Option<String>)> = p
        .structs("Tag")
        .iter()
        .map(|t| {
            (
                t.get("Key").unwrap_or("").to_string(),
                t.get("Value").map(String::from),
            )
        })
        .collect();
    api.store.write(|t| {
        for id in &ids {
            let mut r = resource(t, id)?.clone();
            if specs.is_empty() {
                r.tags_mut().clear();
            }
            for (k, v) in &specs {
                let tags = r.tags_mut();
                if v.as_ref().is_none_or(|v| tags.get(k) == Some(v)) {
                    tags.remove(k);
                }
            }
            t.put_resource(r);
        }
        Ok::<_, ApiError>(())
    })?;
    Ok(ret_true())
}

const TAG_FILTERS: &[&str] = &["key", "value", "resource-id", "resource-type"];

pub fn describe_tags(api: &Api, p: &Params) -> Result<String, ApiError> {
    let fl = filters(p, TAG_FILTERS)?;
    let pg = page(p, false)?;
    api.store.read(|st| {
        let mut rows: Vec<(String, &str, &str, &str)> = Vec::new();
        // ELBv2 resources have their own DescribeTags.
        for r in st.all().filter(|r| r.is_ec2()) {
            for (k, v) in r.tags() {
                let keep = filter_match(&fl, &Default::default(), |n| match n {
                    "key" => vec![k.clone()],
                    "value" => vec![v.clone()],
                    "resource-id" => vec![r.id().to_string()],
                    "resource-type" => vec![r.type_name().to_string()],
                    _ => vec![],
                });
                if keep {
                    rows.push((format!("{} {k}", r.id()), r.id(), r.type_name(), k));
                }
            }
        }
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let (rows, token) = paginate(rows, |r| &r.0, &pg);
        let mut x = Xml::new();
        x.set("tagSet", rows, |x, (_, id, ty, k)| {
            let v = st
                .resource(id)
                .and_then(|r| r.tags().get(k))
                .cloned()
                .unwrap_or_default();
            x.text("resourceId", id)
                .text("resourceType", ty)
                .text("key", k)
                .text("value", &v);
        });
        x.opt("nextToken", token.as_deref());
        Ok(x.finish())
    })
}

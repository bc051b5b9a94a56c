//! Helpers every resource family uses: ID checks, parameters with types,
//! filters, paging, tags and timestamps.

use crate::store::ids;
use crate::store::model::{Kind, Tags};
use crate::store::State;

use super::query::Params;
use super::ApiError;

/// How one kind of ID is checked and reported.
pub struct IdKind {
    pub prefix: &'static str,
    pub malformed: &'static str,
    pub not_found: &'static str,
    pub noun: &'static str,
}

macro_rules! idk {
    ($name:ident, $prefix:literal, $mal:literal, $nf:literal, $noun:literal) => {
        pub const $name: IdKind = IdKind {
            prefix: $prefix,
            malformed: $mal,
            not_found: $nf,
            noun: $noun,
        };
    };
}

idk!(
    VPC,
    "vpc-",
    "InvalidVpcID.Malformed",
    "InvalidVpcID.NotFound",
    "vpc"
);
idk!(
    SUBNET,
    "subnet-",
    "InvalidSubnetID.Malformed",
    "InvalidSubnetID.NotFound",
    "subnet"
);
idk!(
    SG,
    "sg-",
    "InvalidGroupId.Malformed",
    "InvalidGroup.NotFound",
    "security group"
);
idk!(
    RTB,
    "rtb-",
    "InvalidRouteTableId.Malformed",
    "InvalidRouteTableID.NotFound",
    "route table"
);
idk!(
    IGW,
    "igw-",
    "InvalidInternetGatewayId.Malformed",
    "InvalidInternetGatewayID.NotFound",
    "internet gateway"
);
idk!(
    ACL,
    "acl-",
    "InvalidNetworkAclId.Malformed",
    "InvalidNetworkAclID.NotFound",
    "network ACL"
);
idk!(
    ENI,
    "eni-",
    "InvalidNetworkInterfaceId.Malformed",
    "InvalidNetworkInterfaceID.NotFound",
    "network interface"
);
idk!(
    INSTANCE,
    "i-",
    "InvalidInstanceID.Malformed",
    "InvalidInstanceID.NotFound",
    "instance"
);
idk!(
    EIPALLOC,
    "eipalloc-",
    "InvalidAllocationID.Malformed",
    "InvalidAllocationID.NotFound",
    "allocation"
);
idk!(
    EIPASSOC,
    "eipassoc-",
    "InvalidAssociationID.Malformed",
    "InvalidAssociationID.NotFound",
    "association"
);
idk!(
    RTBASSOC,
    "rtbassoc-",
    "InvalidAssociationID.Malformed",
    "InvalidAssociationID.NotFound",
    "association"
);
idk!(
    ACLASSOC,
    "aclassoc-",
    "InvalidAssociationID.Malformed",
    "InvalidAssociationID.NotFound",
    "association"
);
idk!(
    ATTACH,
    "eni-attach-",
    "InvalidAttachmentID.Malformed",
    "InvalidAttachmentID.NotFound",
    "attachment"
);
idk!(
    FLOWLOG,
    "fl-",
    "InvalidFlowLogId.Malformed",
    "InvalidFlowLogId.NotFound",
    "flow log"
);
idk!(
    AMI,
    "ami-",
    "InvalidAMIID.Malformed",
    "InvalidAMIID.NotFound",
    "image"
);
idk!(
    NAT,
    "nat-",
    "InvalidNatGatewayID.Malformed",
    "InvalidNatGatewayID.NotFound",
    "nat gateway"
);
// The NAT gateway actions themselves answer with these codes (AWS's);
// routes keep InvalidNatGatewayID.* above.
idk!(
    NATGW,
    "nat-",
    "NatGatewayMalformed",
    "NatGatewayNotFound",
    "nat gateway"
);

impl IdKind {
    pub fn check(&self, id: &str) -> Result<(), ApiError> {
        if ids::well_formed(id, self.prefix) {
            Ok(())
        } else {
            Err(ApiError::new(
                self.malformed,
                format!("Invalid id: \"{id}\" (expecting \"{}...\")", self.prefix),
            ))
        }
    }

    pub fn not_found(&self, id: &str) -> ApiError {
        ApiError::new(
            self.not_found,
            format!("The {} ID '{id}' does not exist", self.noun),
        )
    }

    /// Check the form of `id`, then find it.
    pub fn get<'a, K: Kind>(&self, st: &'a State, id: &str) -> Result<&'a K, ApiError> {
        self.check(id)?;
        st.get::<K>(id).ok_or_else(|| self.not_found(id))
    }

    /// The resources named by a `Foo.N` list, or all when the list is empty.
    pub fn get_many<'a, K: Kind>(
        &self,
        st: &'a State,
        wanted: &[&str],
    ) -> Result<Vec<&'a K>, ApiError> {
        if wanted.is_empty() {
            return Ok(st.iter::<K>().collect());
        }
        let mut out = Vec::with_capacity(wanted.len());
        for id in wanted {
            let k = self.get::<K>(st, id)?;
            if !out.iter().any(|o: &&K| o.id() == k.id()) {
                out.push(k);
            }
        }
        out.sort_by(|a, b| a.id().cmp(b.id()));
        Ok(out)
    }
}

/// A required string parameter.
pub fn req<'a>(p: &'a Params, name: &str) -> Result<&'a str, ApiError> {
    match p.get(name) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ApiError::missing(name)),
    }
}

pub fn opt_bool(p: &Params, name: &str) -> Result<Option<bool>, ApiError> {
    match p.get(name) {
        None => Ok(None),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(v) => Err(ApiError::invalid(format!(
            "Invalid value '{v}' for {name}. Expected a boolean (true or false)."
        ))),
    }
}

pub fn opt_int(p: &Params, name: &str) -> Result<Option<i64>, ApiError> {
    match p.get(name) {
        None => Ok(None),
        Some(v) => v.trim().parse::<i64>().map(Some).map_err(|_| {
            ApiError::invalid(format!(
                "Invalid value '{v}' for {name}. Expected an integer."
            ))
        }),
    }
}

/// An integer parameter within `lo..=hi`.
pub fn opt_int_in(p: &Params, name: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    match opt_int(p, name)? {
        Some(v) if v < lo || v > hi => Err(ApiError::invalid(format!(
            "Value ({v}) for parameter {name} is invalid. It must be between {lo} and {hi}."
        ))),
        v => Ok(v),
    }
}

pub fn req_int_in(p: &Params, name: &str, lo: i64, hi: i64) -> Result<i64, ApiError> {
    opt_int_in(p, name, lo, hi)?.ok_or_else(|| ApiError::missing(name))
}

/// A `Foo.N` list, refusing indexes that are not positive integers.
pub fn list<'a>(p: &'a Params, name: &str) -> Result<Vec<&'a str>, ApiError> {
    if let Some(bad) = p.bad_index(name) {
        return Err(ApiError::invalid(format!(
            "The parameter {bad} is not a valid list member."
        )));
    }
    Ok(p.list(name))
}

// ----- filters -----

/// One `Filter.N`.
#[derive(Debug, Clone)]
pub struct Filter {
    pub name: String,
    pub values: Vec<String>,
}

/// Parse `Filter.N.Name` / `Filter.N.Value.M`; names must be in `allowed`
/// or be `tag:<key>`, `tag-key`, `tag-value`.
pub fn filters(p: &Params, allowed: &[&str]) -> Result<Vec<Filter>, ApiError> {
    let mut out = Vec::new();
    for f in p.structs("Filter") {
        let name = f
            .get("Name")
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::missing("Filter.N.Name"))?;
        let tagish =
            name.starts_with("tag:") && name.len() > 4 || name == "tag-key" || name == "tag-value";
        if !tagish && !allowed.contains(&name) {
            return Err(ApiError::invalid(format!("The filter '{name}' is invalid")));
        }
        let values: Vec<String> = f.list("Value").into_iter().map(String::from).collect();
        if values.is_empty() {
            return Err(ApiError::invalid(format!(
                "The filter '{name}' must have at least one value"
            )));
        }
        if values.len() > 200 {
            return Err(ApiError::invalid(
                "The maximum number of filter values is 200".to_string(),
            ));
        }
        out.push(Filter {
            name: name.to_string(),
            values,
        });
    }
    if out.len() > 50 {
        return Err(ApiError::invalid(
            "The maximum number of filters is 50".to_string(),
        ));
    }
    Ok(out)
}

/// Glob match with `*` and `?` (AWS filter values), `\` escapes.
pub fn glob(pattern: &str, s: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = s.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        let (pc, lit) = match p.get(pi) {
            Some('\\') => (p.get(pi + 1).copied(), true),
            Some(c) => (Some(*c), false),
            None => (None, false),
        };
        let step = if lit { 2 } else { 1 };
        match pc {
            Some('*') if !lit => {
                star = Some((pi, ti));
                pi += 1;
                continue;
            }
            Some('?') if !lit => {
                pi += 1;
                ti += 1;
                continue;
            }
            Some(c) if c == t[ti] => {
                pi += step;
                ti += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    while p.get(pi) == Some(&'*') {
        pi += 1;
    }
    pi >= p.len()
}

/// Do the resource's values for every filter match? `field` gives the
/// values of a non-tag filter name.
pub fn filter_match(filters: &[Filter], tags: &Tags, field: impl Fn(&str) -> Vec<String>) -> bool {
    filters.iter().all(|f| {
        let values: Vec<String> = if let Some(key) = f.name.strip_prefix("tag:") {
            tags.get(key).cloned().into_iter().collect()
        } else if f.name == "tag-key" {
            tags.keys().cloned().collect()
        } else if f.name == "tag-value" {
            tags.values().cloned().collect()
        } else {
            field(&f.name)
        };
        f.values
            .iter()
            .any(|pat| values.iter().any(|v| glob(pat, v)))
    })
}

// ----- paging -----

const TOKEN_PREFIX: &str = "enilab1.";

/// MaxResults / NextToken of a Describe call.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub max: Option<usize>,
    pub after: Option<String>,
}

/// Read MaxResults (5..=1000) and NextToken. `with_ids`: IDs were listed,
/// which AWS does not allow together with MaxResults.
pub fn page(p: &Params, with_ids: bool) -> Result<Page, ApiError> {
    let max = opt_int_in(p, "MaxResults", 5, 1000)?.map(|v| v as usize);
    if max.is_some() && with_ids {
        return Err(ApiError::combination(
            "The parameter MaxResults cannot be used with the parameter that lists IDs".to_string(),
        ));
    }
    let after = match p.get("NextToken") {
        None | Some("") => None,
        Some(t) => Some(
            t.strip_prefix(TOKEN_PREFIX)
                .filter(|r| !r.is_empty())
                .ok_or_else(|| {
                    ApiError::new(
                        "InvalidPaginationToken",
                        format!("Invalid pagination token: '{t}'"),
                    )
                })?
                .to_string(),
        ),
    };
    Ok(Page { max, after })
}

/// Cut `items` (sorted by key) to one page; the token names the last key.
pub fn paginate<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> &str,
    page: &Page,
) -> (Vec<T>, Option<String>) {
    let mut v: Vec<T> = match &page.after {
        Some(a) => items.into_iter().filter(|x| key(x) > a.as_str()).collect(),
        None => items,
    };
    let mut token = None;
    if let Some(max) = page.max {
        if v.len() > max {
            v.truncate(max);
            token = v.last().map(|x| format!("{TOKEN_PREFIX}{}", key(x)));
        }
    }
    (v, token)
}

// ----- tags -----

pub const MAX_TAGS: usize = 50;

pub fn check_tag(key: &str, value: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.chars().count() > 128 {
        return Err(ApiError::invalid(format!(
            "Tag key '{key}' must be between 1 and 128 characters"
        )));
    }
    if key.to_ascii_lowercase().starts_with("aws:") {
        return Err(ApiError::invalid(
            "Tag keys starting with 'aws:' are reserved for internal use".to_string(),
        ));
    }
    if value.chars().count() > 256 {
        return Err(ApiError::invalid(format!(
            "Tag value for key '{key}' is longer than 256 characters"
        )));
    }
    Ok(())
}

/// `Tag.N.Key` / `Tag.N.Value` of `p` (which may be a TagSpecification).
pub fn tags_of(p: &Params) -> Result<Tags, ApiError> {
    let mut tags = Tags::new();
    for t in p.structs("Tag") {
        let k = t.get("Key").unwrap_or("");
        let v = t.get("Value").unwrap_or("");
        check_tag(k, v)?;
        tags.insert(k.to_string(), v.to_string());
    }
    if tags.len() > MAX_TAGS {
        return Err(ApiError::new(
            "TagLimitExceeded",
            format!("The maximum number of tags per resource is {MAX_TAGS}"),
        ));
    }
    Ok(tags)
}

/// Tags from `TagSpecification.N` for `rtype`; a specification for a type
/// not in `allowed` is refused.
pub fn tag_spec(p: &Params, rtype: &str, allowed: &[&str]) -> Result<Tags, ApiError> {
    let mut out = Tags::new();
    for spec in p.structs("TagSpecification") {
        let t = spec.get("ResourceType").unwrap_or("");
        if !allowed.contains(&t) {
            return Err(ApiError::invalid(format!(
                "'{t}' is not a valid taggable resource type for this operation."
            )));
        }
        if t == rtype {
            out.extend(tags_of(&spec)?);
        }
    }
    if out.len() > MAX_TAGS {
        return Err(ApiError::new(
            "TagLimitExceeded",
            format!("The maximum number of tags per resource is {MAX_TAGS}"),
        ));
    }
    Ok(out)
}

// ----- time -----

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2024-01-02T03:04:05.000Z`.
pub fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globbing() {
        assert!(glob("vpc-*", "vpc-123"));
        assert!(glob("*", ""));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "ac"));
        assert!(glob("*b*", "abc"));
        assert!(!glob("b*", "abc"));
        assert!(glob("a\\*", "a*"));
        assert!(!glob("a\\*", "ab"));
        assert!(glob("10.0.*.5", "10.0.77.5"));
    }

    #[test]
    fn time_format() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_709_251_199_123), "2024-02-29T23:59:59.123Z");
    }

    #[test]
    fn paging_cuts_and_resumes() {
        let items: Vec<String> = (0..12).map(|i| format!("x-{i:02}")).collect();
        let pg = Page {
            max: Some(5),
            after: None,
        };
        let (a, t) = paginate(items.clone(), |s| s.as_str(), &pg);
        assert_eq!(a.len(), 5);
        let t = t.unwrap();
        let p = Params::from_pairs([("NextToken", t.as_str()), ("MaxResults", "5")]);
        let pg = page(&p, false).unwrap();
        let (b, t2) = paginate(items.clone(), |s| s.as_str(), &pg);
        assert_eq!(b[0], "x-05");
        let p = Params::from_pairs([("NextToken", t2.as_deref().unwrap()), ("MaxResults", "5")]);
        let (c, t3) = paginate(items, |s| s.as_str(), &page(&p, false).unwrap());
        assert_eq!(c.len(), 2);
        assert!(t3.is_none());
        assert!(page(&Params::from_pairs([("NextToken", "garbage")]), false).is_err());
        assert!(page(&Params::from_pairs([("MaxResults", "4")]), false).is_err());
        assert!(page(&Params::from_pairs([("MaxResults", "x")]), false).is_err());
        assert!(page(&Params::from_pairs([("MaxResults", "5")]), true).is_err());
    }
}

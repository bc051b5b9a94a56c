//! The EC2 Query protocol's request side: `application/x-www-form-urlencoded`
//! pairs, with lists as `Name.1`, `Name.2` and structures as `Name.1.Field`.
//!
//! Parsing never panics: bad percent escapes and invalid UTF-8 are errors.

use std::collections::BTreeMap;

/// Why a query string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A `%` not followed by two hex digits.
    #[error("bad percent escape at byte {0}")]
    BadEscape(usize),
    /// The decoded bytes are not UTF-8.
    #[error("a parameter is not valid UTF-8")]
    NotUtf8,
    /// A pair with an empty name.
    #[error("a parameter has an empty name")]
    EmptyName,
    /// The same name given twice.
    #[error("parameter {0} is given more than once")]
    Duplicate(String),
    /// Too many parameters.
    #[error("more than {0} parameters")]
    TooMany(usize),
}

/// Most parameters one request may carry.
pub const MAX_PARAMS: usize = 10_000;

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decode one form component (`+` is a space).
pub fn decode(s: &[u8], base: usize) -> Result<String, QueryError> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = s.get(i + 1).copied().and_then(hex);
                let lo = s.get(i + 2).copied().and_then(hex);
                match (hi, lo) {
                    (Some(h), Some(l)) => out.push(h << 4 | l),
                    _ => return Err(QueryError::BadEscape(base + i)),
                }
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| QueryError::NotUtf8)
}

/// Decoded request parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    map: BTreeMap<String, String>,
}

impl Params {
    /// Parse one or more form-encoded strings (URI query, then body).
    pub fn parse(parts: &[&[u8]]) -> Result<Params, QueryError> {
        let mut map = BTreeMap::new();
        for part in parts {
            let mut off = 0;
            for pair in part.split(|b| *b == b'&') {
                let base = off;
                off += pair.len() + 1;
                if pair.is_empty() {
                    continue;
                }
                let (k, v) = match pair.iter().position(|b| *b == b'=') {
                    Some(p) => (&pair[..p], &pair[p + 1..]),
                    None => (pair, &pair[pair.len()..]),
                };
                let k = decode(k, base)?;
                if k.is_empty() {
                    return Err(QueryError::EmptyName);
                }
                let v = decode(v, base + k.len() + 1)?;
                if map.contains_key(&k) {
                    return Err(QueryError::Duplicate(k));
                }
                map.insert(k, v);
                if map.len() > MAX_PARAMS {
                    return Err(QueryError::TooMany(MAX_PARAMS));
                }
            }
        }
        Ok(Params { map })
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Params {
        Params {
            map: pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(|s| s.as_str())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Does any parameter start with `prefix.`?
    pub fn has_prefix(&self, prefix: &str) -> bool {
        let p = format!("{prefix}.");
        self.map
            .range(p.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&p))
    }

    /// Members `prefix.N` as (N, value), ordered by N. Keys whose index is
    /// not a positive integer are returned as errors by [`Params::bad_index`].
    pub fn list(&self, prefix: &str) -> Vec<&str> {
        let p = format!("{prefix}.");
        let mut v: Vec<(u32, &str)> = self
            .map
            .range(p.clone()..)
            .take_while(|(k, _)| k.starts_with(&p))
            .filter_map(|(k, val)| {
                let idx = &k[p.len()..];
                parse_index(idx).map(|n| (n, val.as_str()))
            })
            .collect();
        v.sort_by_key(|(n, _)| *n);
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// Structures `prefix.N.Field...`: one [`Params`] per N (holding
    /// `Field...`), ordered by N.
    pub fn structs(&self, prefix: &str) -> Vec<Params> {
        let p = format!("{prefix}.");
        let mut groups: BTreeMap<u32, Params> = BTreeMap::new();
        for (k, val) in self
            .map
            .range(p.clone()..)
            .take_while(|(k, _)| k.starts_with(&p))
        {
            let rest = &k[p.len()..];
            if let Some((idx, field)) = rest.split_once('.') {
                if let Some(n) = parse_index(idx) {
                    groups
                        .entry(n)
                        .or_default()
                        .map
                        .insert(field.to_string(), val.clone());
                }
            }
        }
        groups.into_values().collect()
    }

    /// A key under `prefix.` whose index is not a positive integer, if any.
    pub fn bad_index(&self, prefix: &str) -> Option<&str> {
        let p = format!("{prefix}.");
        self.map
            .range(p.clone()..)
            .take_while(|(k, _)| k.starts_with(&p))
            .map(|(k, _)| k.as_str())
            .find(|k| {
                let idx = k[p.len()..].split('.').next().unwrap_or("");
                parse_index(idx).is_none()
            })
    }
}

/// A list index: 1..=1_000_000 without sign or leading zeros.
fn parse_index(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 7 || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|n| (1..=1_000_000).contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_form_encoding() {
        let p =
            Params::parse(&[b"Action=DescribeVpcs&Version=2016-11-15&A=a+b%20c%2Fd&Empty=&Flag"])
                .unwrap();
        assert_eq!(p.get("Action"), Some("DescribeVpcs"));
        assert_eq!(p.get("A"), Some("a b c/d"));
        assert_eq!(p.get("Empty"), Some(""));
        assert_eq!(p.get("Flag"), Some(""));
        assert_eq!(p.get("Missing"), None);
    }

    #[test]
    fn merges_query_and_body() {
        let p = Params::parse(&[b"Action=X", b"Version=1&&"]).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            Params::parse(&[b"Action=X", b"Action=Y"]),
            Err(QueryError::Duplicate("Action".into()))
        );
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(Params::parse(&[b"A=%zz"]), Err(QueryError::BadEscape(2)));
        assert_eq!(Params::parse(&[b"A=%4"]), Err(QueryError::BadEscape(2)));
        assert_eq!(Params::parse(&[b"A=%"]), Err(QueryError::BadEscape(2)));
        assert_eq!(Params::parse(&[b"A=%ff%fe"]), Err(QueryError::NotUtf8));
        assert_eq!(Params::parse(&[b"=x"]), Err(QueryError::EmptyName));
        assert_eq!(
            Params::parse(&[&[0xff, b'=', b'1']]),
            Err(QueryError::NotUtf8)
        );
        let many: String = (0..=MAX_PARAMS).map(|i| format!("k{i}=1&")).collect();
        assert_eq!(
            Params::parse(&[many.as_bytes()]),
            Err(QueryError::TooMany(MAX_PARAMS))
        );
    }

    #[test]
    fn lists_and_structs() {
        let p = Params::parse(&[
            b"VpcId.2=b&VpcId.1=a&VpcId.10=c&VpcId.x=bad&Filter.1.Name=vpc-id&Filter.1.Value.1=v1&Filter.1.Value.2=v2&Filter.2.Name=tag:Name&Filter.2.Value.1=n",
        ])
        .unwrap();
        assert_eq!(p.list("VpcId"), vec!["a", "b", "c"]);
        assert_eq!(p.bad_index("VpcId"), Some("VpcId.x"));
        assert_eq!(p.bad_index("Filter"), None);
        let f = p.structs("Filter");
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].get("Name"), Some("vpc-id"));
        assert_eq!(f[0].list("Value"), vec!["v1", "v2"]);
        assert_eq!(f[1].get("Name"), Some("tag:Name"));
        assert!(p.has_prefix("Filter"));
        assert!(!p.has_prefix("Filte"));
        assert!(p.list("Nothing").is_empty());
    }

    #[test]
    fn index_rules() {
        assert_eq!(parse_index("1"), Some(1));
        for bad in ["0", "01", "-1", "+1", "", "99999999", "1a"] {
            assert_eq!(parse_index(bad), None, "{bad}");
        }
    }
}

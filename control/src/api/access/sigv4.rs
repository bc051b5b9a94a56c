//! AWS Signature Version 4 verification, as boto3 and the AWS CLI sign:
//! the Authorization header (POST and GET) or query-string presigning
//! (GET). The canonical request, string to sign and derived key follow
//! AWS's "Create a signed AWS API request" steps.

use std::collections::BTreeMap;

use super::sha256::{hex, hmac_sha256, sha256};

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Allowed distance between the request's X-Amz-Date and our clock.
pub const MAX_SKEW_SECS: i64 = 15 * 60;
/// Longest presigned-URL lifetime AWS accepts (7 days).
const MAX_EXPIRES: i64 = 7 * 24 * 3600;
/// Services whose requests this endpoint serves (ELBv2 shares it).
const SERVICES: &[&str] = &["ec2", "elasticloadbalancing"];

/// Why a request's signature was refused, by EC2's error codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    /// Neither an Authorization header nor presigning parameters.
    #[error("Request is missing Authentication Token")]
    Missing,
    /// The signature parts are malformed or incomplete.
    #[error("{0}")]
    Incomplete(String),
    /// The access key id is unknown.
    #[error("AWS was not able to validate the provided access credentials")]
    UnknownKey,
    /// The signature does not match the one computed with the secret.
    #[error("The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.")]
    Mismatch,
    /// X-Amz-Date outside the skew window, or a presigned URL past its expiry.
    #[error("{0}")]
    Expired(String),
}

impl SigV4Error {
    /// EC2's error code.
    pub fn code(&self) -> &'static str {
        match self {
            SigV4Error::Missing => "MissingAuthenticationToken",
            SigV4Error::Incomplete(_) => "IncompleteSignature",
            SigV4Error::UnknownKey => "AuthFailure",
            SigV4Error::Mismatch => "SignatureDoesNotMatch",
            SigV4Error::Expired(_) => "RequestExpired",
        }
    }

    /// The HTTP status EC2 answers with.
    pub fn status(&self) -> u16 {
        match self {
            SigV4Error::Missing | SigV4Error::Mismatch => 403,
            SigV4Error::UnknownKey => 401,
            SigV4Error::Incomplete(_) | SigV4Error::Expired(_) => 400,
        }
    }
}

/// The parts of an HTTP request a signature covers.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The path as sent (already percent-encoded).
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: &'a str,
    /// Header (lower-case name, value); repeated names appear repeatedly.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

impl SignedRequest<'_> {
    fn header(&self, name: &str) -> Option<String> {
        let vals: Vec<String> = self
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| collapse(v))
            .collect();
        (!vals.is_empty()).then(|| vals.join(","))
    }
}

/// Trim and collapse runs of spaces, as the canonical headers want.
fn collapse(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Percent-decode (no `+` as space: SigV4 clients encode spaces as %20).
fn decode(s: &str) -> Result<String, SigV4Error> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| SigV4Error::Incomplete("Bad percent escape in the query".into()))?;
            out.push(h);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| SigV4Error::Incomplete("The query is not UTF-8".into()))
}

/// RFC 3986 encoding: everything but unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decoded query pairs, in order.
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, SigV4Error> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

fn canonical_query(pairs: &[(String, String)], skip_signature: bool) -> String {
    let mut enc: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| !(skip_signature && k == "X-Amz-Signature"))
        .map(|(k, v)| (encode(k), encode(v)))
        .collect();
    enc.sort();
    enc.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The fields of a signature, from the header or the query.
struct Parts {
    key_id: String,
    date: String,
    region: String,
    service: String,
    signed_headers: Vec<String>,
    signature: String,
    amz_date: String,
    /// Presigned: lifetime in seconds.
    expires: Option<i64>,
}

fn parse_credential(c: &str) -> Result<(String, String, String, String), SigV4Error> {
    let f: Vec<&str> = c.split('/').collect();
    match f.as_slice() {
        [key, date, region, service, "aws4_request"] if !key.is_empty() => Ok((
            key.to_string(),
            date.to_string(),
            region.to_string(),
            service.to_string(),
        )),
        _ => Err(SigV4Error::Incomplete(format!(
            "Credential should be scoped to a valid region and service: KEY/DATE/REGION/SERVICE/aws4_request, not '{c}'"
        ))),
    }
}

fn parse_header(auth: &str, req: &SignedRequest) -> Result<Parts, SigV4Error> {
    let rest = auth
        .strip_prefix(ALGORITHM)
        .filter(|r| r.starts_with(' '))
        .ok_or_else(|| {
            SigV4Error::Incomplete(format!("Authorization header must use {ALGORITHM}"))
        })?;
    let mut fields = BTreeMap::new();
    for f in rest.split(',') {
        let (k, v) = f.trim().split_once('=').ok_or_else(|| {
            SigV4Error::Incomplete(format!(
                "Authorization header field '{}' has no value",
                f.trim()
            ))
        })?;
        fields.insert(k, v);
    }
    let get = |k: &str| {
        fields.get(k).map(|v| v.to_string()).ok_or_else(|| {
            SigV4Error::Incomplete(format!("Authorization header requires a '{k}' parameter"))
        })
    };
    let (key_id, date, region, service) = parse_credential(&get("Credential")?)?;
    let amz_date = req.header("x-amz-date").ok_or_else(|| {
        SigV4Error::Incomplete("Authorization header requires an X-Amz-Date header".into())
    })?;
    Ok(Parts {
        key_id,
        date,
        region,
        service,
        signed_headers: get("SignedHeaders")?
            .split(';')
            .map(str::to_string)
            .collect(),
        signature: get("Signature")?,
        amz_date,
        expires: None,
    })
}

fn parse_presigned(pairs: &[(String, String)]) -> Result<Parts, SigV4Error> {
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| SigV4Error::Incomplete(format!("The query requires a '{k}' parameter")))
    };
    if get("X-Amz-Algorithm")? != ALGORITHM {
        return Err(SigV4Error::Incomplete(format!(
            "X-Amz-Algorithm must be {ALGORITHM}"
        )));
    }
    let (key_id, date, region, service) = parse_credential(&get("X-Amz-Credential")?)?;
    let expires = get("X-Amz-Expires")?
        .parse::<i64>()
        .ok()
        .filter(|e| (0..=MAX_EXPIRES).contains(e))
        .ok_or_else(|| {
            SigV4Error::Incomplete("X-Amz-Expires must be 0 to 604800 seconds".into())
        })?;
    Ok(Parts {
        key_id,
        date,
        region,
        service,
        signed_headers: get("X-Amz-SignedHeaders")?
            .split(';')
            .map(str::to_string)
            .collect(),
        signature: get("X-Amz-Signature")?,
        amz_date: get("X-Amz-Date")?,
        expires: Some(expires),
    })
}

/// Seconds since the epoch of an ISO 8601 basic time (20150830T123600Z).
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, sec) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec)
}

/// The signing key for a scope.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k = hmac_sha256(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac_sha256(&k, region.as_bytes());
    let k = hmac_sha256(&k, service.as_bytes());
    hmac_sha256(&k, b"aws4_request")
}

/// Compare without an early exit, so timing tells nothing of the secret.
fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Check `req`'s signature with the secret `lookup` gives for its access
/// key id, at time `now` (seconds since the epoch). Returns the key id.
pub fn verify(
    req: &SignedRequest,
    lookup: impl Fn(&str) -> Option<String>,
    now: i64,
) -> Result<String, SigV4Error> {
    let pairs = query_pairs(req.query)?;
    let presigned = pairs.iter().any(|(k, _)| k == "X-Amz-Algorithm");
    let parts = match req.header("authorization") {
        Some(a) => parse_header(&a, req)?,
        None if presigned => parse_presigned(&pairs)?,
        None => return Err(SigV4Error::Missing),
    };
    let t = parse_amz_date(&parts.amz_date).ok_or_else(|| {
        SigV4Error::Incomplete(format!(
            "X-Amz-Date '{}' is not an ISO 8601 basic time",
            parts.amz_date
        ))
    })?;
    if parts.amz_date.get(..8) != Some(parts.date.as_str()) {
        return Err(SigV4Error::Incomplete(
            "The credential scope's date does not match X-Amz-Date".into(),
        ));
    }
    if !SERVICES.contains(&parts.service.as_str()) {
        return Err(SigV4Error::Incomplete(format!(
            "Credential should be scoped to a valid service, not '{}'",
            parts.service
        )));
    }
    match parts.expires {
        None if (now - t).abs() > MAX_SKEW_SECS => {
            return Err(SigV4Error::Expired(format!(
                "Request has expired: X-Amz-Date {} is more than 15 minutes from the server's time",
                parts.amz_date
            )))
        }
        Some(e) if now > t + e || t - now > MAX_SKEW_SECS => {
            return Err(SigV4Error::Expired(format!(
                "Request has expired: the presigned URL was valid from {} for {e} seconds",
                parts.amz_date
            )))
        }
        _ => {}
    }
    if !parts.signed_headers.iter().any(|h| h == "host") {
        return Err(SigV4Error::Incomplete(
            "SignedHeaders must include host".into(),
        ));
    }
    let secret = lookup(&parts.key_id).ok_or(SigV4Error::UnknownKey)?;
    let mut canonical_headers = String::new();
    for h in &parts.signed_headers {
        let v = req.header(h).unwrap_or_default();
        canonical_headers.push_str(&format!("{h}:{v}\n"));
    }
    // Header signatures cover the body's hash. Presigned URLs: botocore
    // signs the (empty) body's hash, S3-style signers UNSIGNED-PAYLOAD.
    let body_hash = hex(&sha256(req.body));
    let payloads: Vec<String> = match (parts.expires, req.header("x-amz-content-sha256")) {
        (Some(_), Some(h)) => vec![h],
        (Some(_), None) => vec![body_hash, "UNSIGNED-PAYLOAD".into()],
        (None, _) => vec![body_hash],
    };
    let path = if req.path.is_empty() { "/" } else { req.path };
    let query = canonical_query(&pairs, parts.expires.is_some());
    let scope = format!(
        "{}/{}/{}/aws4_request",
        parts.date, parts.region, parts.service
    );
    let key = signing_key(&secret, &parts.date, &parts.region, &parts.service);
    let given = parts.signature.to_ascii_lowercase();
    let mut matched = false;
    for payload in &payloads {
        let canonical = format!(
            "{}\n{path}\n{query}\n{canonical_headers}\n{}\n{payload}",
            req.method,
            parts.signed_headers.join(";"),
        );
        let to_sign = format!(
            "{ALGORITHM}\n{}\n{scope}\n{}",
            parts.amz_date,
            hex(&sha256(canonical.as_bytes()))
        );
        let want = hex(&hmac_sha256(&key, to_sign.as_bytes()));
        matched |= equal(want.as_bytes(), given.as_bytes());
    }
    if !matched {
        return Err(SigV4Error::Mismatch);
    }
    Ok(parts.key_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn lookup(k: &str) -> Option<String> {
        (k == KEY).then(|| SECRET.to_string())
    }

    /// AWS's documented example: the derived key for 20120215/us-east-1/iam.
    #[test]
    fn derived_key_matches_aws_example() {
        let k = signing_key(SECRET, "20120215", "us-east-1", "iam");
        assert_eq!(
            hex(&k),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }

    #[test]
    fn amz_dates() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(1_440_938_160));
        for bad in [
            "2015083T123600Z",
            "20151330T123600Z",
            "20150830T123600",
            "2015+830T123600Z",
            "",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
    }

    /// Sign the way botocore's SigV4Auth does, to produce fixtures.
    fn sign(body: &str, amz_date: &str, secret: &str) -> Vec<(String, String)> {
        let headers = vec![
            (
                "content-type".to_string(),
                "application/x-www-form-urlencoded; charset=utf-8".to_string(),
            ),
            ("host".to_string(), "127.0.0.1:8990".to_string()),
            ("x-amz-date".to_string(), amz_date.to_string()),
        ];
        let signed = "content-type;host;x-amz-date";
        let mut ch = String::new();
        for (n, v) in &headers {
            ch.push_str(&format!("{n}:{v}\n"));
        }
        let canonical = format!(
            "POST\n/\n\n{ch}\n{signed}\n{}",
            hex(&sha256(body.as_bytes()))
        );
        let date = &amz_date[..8];
        let scope = format!("{date}/us-east-1/ec2/aws4_request");
        let sts = format!(
            "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
            hex(&sha256(canonical.as_bytes()))
        );
        let sig = hex(&hmac_sha256(
            &signing_key(secret, date, "us-east-1", "ec2"),
            sts.as_bytes(),
        ));
        let mut h = headers;
        h.push((
            "authorization".into(),
            format!(
                "{ALGORITHM} Credential={KEY}/{scope}, SignedHeaders={signed}, Signature={sig}"
            ),
        ));
        h
    }

    fn check(
        headers: &[(String, String)],
        body: &str,
        query: &str,
        now: i64,
    ) -> Result<String, SigV4Error> {
        verify(
            &SignedRequest {
                method: "POST",
                path: "/",
                query,
                headers,
                body: body.as_bytes(),
            },
            lookup,
            now,
        )
    }

    #[test]
    fn header_signatures() {
        let body = "Action=DescribeVpcs&Version=2016-11-15";
        let t = parse_amz_date("20261121T143000Z").unwrap();
        let good = sign(body, "20261121T143000Z", SECRET);
        let wrong = sign(body, "20261121T143000Z", "not-the-secret");
        // (what, headers, body, server time, expected code)
        type Row<'a> = (
            &'a str,
            &'a [(String, String)],
            &'a str,
            i64,
            Result<(), &'a str>,
        );
        let rows: &[Row] = &[
            ("good", &good, body, t, Ok(())),
            ("good, 14 minutes of skew", &good, body, t + 14 * 60, Ok(())),
            ("expired", &good, body, t + 16 * 60, Err("RequestExpired")),
            (
                "from the future",
                &good,
                body,
                t - 16 * 60,
                Err("RequestExpired"),
            ),
            (
                "wrong secret",
                &wrong,
                body,
                t,
                Err("SignatureDoesNotMatch"),
            ),
            (
                "body changed",
                &good,
                "Action=DeleteVpc&Version=2016-11-15",
                t,
                Err("SignatureDoesNotMatch"),
            ),
            (
                "no signature",
                &good[..3],
                body,
                t,
                Err("MissingAuthenticationToken"),
            ),
        ];
        for (desc, h, b, now, want) in rows {
            let got = check(h, b, "", *now).map(|_| ()).map_err(|e| e.code());
            assert_eq!(got, *want, "{desc}");
        }
        let mut unknown = good.clone();
        unknown[3].1 = unknown[3].1.replace(KEY, "AKIDOTHER");
        assert_eq!(
            check(&unknown, body, "", t).unwrap_err().code(),
            "AuthFailure"
        );
        let mut torn = good.clone();
        torn[3].1 = format!("{ALGORITHM} Credential=x");
        assert_eq!(
            check(&torn, body, "", t).unwrap_err().code(),
            "IncompleteSignature"
        );
    }

    #[test]
    fn presigned_query() {
        let amz = "20261121T143000Z";
        let t = parse_amz_date(amz).unwrap();
        let base = format!(
            "Action=DescribeVpcs&Version=2016-11-15&X-Amz-Algorithm={ALGORITHM}&X-Amz-Credential={KEY}%2F20261121%2Fus-east-1%2Fec2%2Faws4_request&X-Amz-Date={amz}&X-Amz-Expires=60&X-Amz-SignedHeaders=host"
        );
        let pairs = query_pairs(&base).unwrap();
        let canonical = format!(
            "GET\n/\n{}\nhost:127.0.0.1:8990\n\nhost\nUNSIGNED-PAYLOAD",
            canonical_query(&pairs, true)
        );
        let sts = format!(
            "{ALGORITHM}\n{amz}\n20261121/us-east-1/ec2/aws4_request\n{}",
            hex(&sha256(canonical.as_bytes()))
        );
        let sig = hex(&hmac_sha256(
            &signing_key(SECRET, "20261121", "us-east-1", "ec2"),
            sts.as_bytes(),
        ));
        let query = format!("{base}&X-Amz-Signature={sig}");
        let headers = vec![("host".to_string(), "127.0.0.1:8990".to_string())];
        let run = |q: &str, now: i64| {
            verify(
                &SignedRequest {
                    method: "GET",
                    path: "/",
                    query: q,
                    headers: &headers,
                    body: b"",
                },
                lookup,
                now,
            )
            .map(|_| ())
            .map_err(|e| e.code())
        };
        assert_eq!(run(&query, t + 30), Ok(()));
        assert_eq!(run(&query, t + 61), Err("RequestExpired"));
        assert_eq!(
            run(&query.replace("DescribeVpcs", "DeleteVpc"), t),
            Err("SignatureDoesNotMatch")
        );
    }
}

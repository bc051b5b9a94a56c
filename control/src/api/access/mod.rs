//! Who may call the API, and how often: SigV4 signatures checked against
//! a credentials file, and a request-rate limit per client address.
//!
//! The daemon listens on loopback by default and then checks no signature
//! (any key works, as with the AWS CLI's `x`/`x`). A non-loopback listen
//! address needs `--credentials`; `--require-auth` turns checking on for
//! loopback too (the tests use it). See `docs/threat-model.md`.

pub mod ratelimit;
pub mod sha256;
pub mod sigv4;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub use ratelimit::{RateLimit, RateLimiter};
pub use sigv4::{SigV4Error, SignedRequest};

/// Errors of API access: bad credentials files, refused requests.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read credentials file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("credentials file {0}, line {1}: expected ACCESS_KEY_ID SECRET_ACCESS_KEY")]
    Syntax(PathBuf, usize),
    #[error("credentials file {0} holds no key pair")]
    Empty(PathBuf),
    #[error("listening on {0} (not loopback) requires --credentials FILE")]
    NeedsCredentials(SocketAddr),
    #[error("--require-auth needs --credentials FILE")]
    RequireWithoutCredentials,
    /// A request's signature was refused.
    #[error(transparent)]
    Signature(#[from] SigV4Error),
    /// The client's request rate is over the limit.
    #[error("Request limit exceeded.")]
    RateLimited,
}

impl AccessError {
    /// EC2's error code for a refused request.
    pub fn code(&self) -> &'static str {
        match self {
            AccessError::Signature(e) => e.code(),
            AccessError::RateLimited => "RequestLimitExceeded",
            _ => "InternalError",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            AccessError::Signature(e) => e.status(),
            AccessError::RateLimited => 503,
            _ => 500,
        }
    }
}

/// Access key id -> secret. Debug never shows a secret.
#[derive(Clone, Default)]
pub struct Credentials {
    keys: BTreeMap<String, String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Credentials {
    /// Parse lines of `ACCESS_KEY_ID SECRET_ACCESS_KEY` (blank lines and
    /// `#` comments ignored; a comma may separate the two).
    pub fn parse(path: &Path, text: &str) -> Result<Credentials, AccessError> {
        let mut keys = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .collect();
            match f.as_slice() {
                [id, secret] => {
                    keys.insert(id.to_string(), secret.to_string());
                }
                _ => return Err(AccessError::Syntax(path.to_path_buf(), i + 1)),
            }
        }
        if keys.is_empty() {
            return Err(AccessError::Empty(path.to_path_buf()));
        }
        Ok(Credentials { keys })
    }

    pub fn load(path: &Path) -> Result<Credentials, AccessError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| AccessError::Read(path.to_path_buf(), e))?;
        Credentials::parse(path, &text)
    }

    pub fn secret(&self, key_id: &str) -> Option<String> {
        self.keys.get(key_id).cloned()
    }
}

/// Counters of refused requests, for the status endpoint and tests.
#[derive(Debug, Default)]
pub struct AccessStats {
    pub auth_failures: AtomicU64,
    pub rate_limited: AtomicU64,
}

/// The daemon's access policy.
#[derive(Debug)]
pub struct Access {
    /// Some: every request must be signed with one of these keys.
    pub credentials: Option<Credentials>,
    pub limiter: RateLimiter,
    /// Whether loopback clients (the lab's own CLI, tests, bench-api) are
    /// limited too; by default only remote clients are.
    pub limit_loopback: bool,
    pub stats: AccessStats,
}

impl Default for Access {
    fn default() -> Self {
        Access::new(None, RateLimit::default())
    }
}

impl Access {
    pub fn new(credentials: Option<Credentials>, limit: RateLimit) -> Access {
        Access {
            credentials,
            limiter: RateLimiter::new(limit),
            limit_loopback: false,
            stats: AccessStats::default(),
        }
    }

    /// The policy for a daemon on `listen`: refuses a non-loopback address
    /// without credentials, and `require_auth` without credentials.
    pub fn for_listen(
        listen: SocketAddr,
        credentials: Option<Credentials>,
        require_auth: bool,
        limit: RateLimit,
    ) -> Result<Access, AccessError> {
        if credentials.is_none() {
            if require_auth {
                return Err(AccessError::RequireWithoutCredentials);
            }
            if !listen.ip().is_loopback() {
                return Err(AccessError::NeedsCredentials(listen));
            }
        }
        Ok(Access::new(credentials, limit))
    }

    /// Count a request from `client` against its rate limit.
    pub fn admit(&self, client: IpAddr) -> Result<(), AccessError> {
        if client.is_loopback() && !self.limit_loopback {
            return Ok(());
        }
        if self.limiter.allow(client, Instant::now()) {
            Ok(())
        } else {
            self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            Err(AccessError::RateLimited)
        }
    }

    /// Check a request's signature (when credentials are configured).
    pub fn authenticate(&self, req: &SignedRequest) -> Result<(), AccessError> {
        let Some(creds) = &self.credentials else {
            return Ok(());
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        match sigv4::verify(req, |k| creds.secret(k), now) {
            Ok(_) => Ok(()),
            Err(e) => {
                self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("request refused: {}", e.code());
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_file() {
        let p = Path::new("creds");
        let c = Credentials::parse(p, "# lab keys\nAKID1 secret1\n\nAKID2,secret/2+x\n").unwrap();
        assert_eq!(c.secret("AKID1").as_deref(), Some("secret1"));
        assert_eq!(c.secret("AKID2").as_deref(), Some("secret/2+x"));
        assert_eq!(c.secret("AKID3"), None);
        assert!(!format!("{c:?}").contains("secret1"));
        assert!(matches!(
            Credentials::parse(p, "AKID1\n"),
            Err(AccessError::Syntax(_, 1))
        ));
        assert!(matches!(
            Credentials::parse(p, "# none\n"),
            Err(AccessError::Empty(_))
        ));
    }

    #[test]
    fn listen_rules() {
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let v6: SocketAddr = "[::1]:0".parse().unwrap();
        let creds = Credentials::parse(Path::new("c"), "a b").unwrap();
        let rl = RateLimit::default();
        assert!(Access::for_listen(lo, None, false, rl).is_ok());
        assert!(Access::for_listen(v6, None, false, rl).is_ok());
        assert!(matches!(
            Access::for_listen(any, None, false, rl),
            Err(AccessError::NeedsCredentials(_))
        ));
        assert!(matches!(
            Access::for_listen(lo, None, true, rl),
            Err(AccessError::RequireWithoutCredentials)
        ));
        assert!(Access::for_listen(any, Some(creds), false, rl).is_ok());
    }

    #[test]
    fn refusals_are_counted() {
        let mut a = Access::new(
            Some(Credentials::parse(Path::new("c"), "a b").unwrap()),
            RateLimit {
                rate: 0.0,
                burst: 1,
            },
        );
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let remote: IpAddr = "192.0.2.1".parse().unwrap();
        // Loopback is exempt unless asked for; remote clients are not.
        assert!((0..5).all(|_| a.admit(ip).is_ok()));
        assert!(a.admit(remote).is_ok());
        assert!(a.admit(remote).is_err());
        a.limit_loopback = true;
        assert!(a.admit(ip).is_ok());
        assert_eq!(a.admit(ip).unwrap_err().code(), "RequestLimitExceeded");
        let req = SignedRequest {
            method: "POST",
            path: "/",
            query: "",
            headers: &[],
            body: b"",
        };
        assert_eq!(
            a.authenticate(&req).unwrap_err().code(),
            "MissingAuthenticationToken"
        );
        assert_eq!(a.stats.rate_limited.load(Ordering::Relaxed), 2);
        assert_eq!(a.stats.auth_failures.load(Ordering::Relaxed), 1);
    }
}

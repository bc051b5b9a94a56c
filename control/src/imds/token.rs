//! IMDSv2 session tokens: 256 random bits, bound to the instance that asked
//! and valid until their TTL runs out. Memory is bounded: each instance
//! holds at most [`PER_INSTANCE`] live tokens (a new one evicts its
//! soonest-expiring), so one guest cannot crowd out another's tokens.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The TTL range EC2 accepts, in seconds.
pub const MIN_TTL: u64 = 1;
pub const MAX_TTL: u64 = 21_600;
/// Live tokens kept per instance.
pub const PER_INSTANCE: usize = 64;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The TTL header is missing, not a number, or outside 1..=21600.
    #[error("the token TTL must be an integer from {MIN_TTL} to {MAX_TTL} seconds")]
    BadTtl,
    /// Unknown, expired, or issued to another instance.
    #[error("the token is not valid")]
    Invalid,
    /// The system's random source failed.
    #[error("no random bytes for a token")]
    Random,
}

#[derive(Debug)]
struct Entry {
    instance: String,
    expires: Instant,
}

/// The tokens handed out, by token.
#[derive(Debug, Default)]
pub struct Tokens {
    live: HashMap<String, Entry>,
}

/// The TTL a `X-aws-ec2-metadata-token-ttl-seconds` value asks for.
pub fn parse_ttl(value: Option<&[u8]>) -> Result<Duration, TokenError> {
    let v = value.ok_or(TokenError::BadTtl)?;
    if v.is_empty() || v.len() > 5 || !v.iter().all(u8::is_ascii_digit) {
        return Err(TokenError::BadTtl);
    }
    let n: u64 = std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(TokenError::BadTtl)?;
    if !(MIN_TTL..=MAX_TTL).contains(&n) {
        return Err(TokenError::BadTtl);
    }
    Ok(Duration::from_secs(n))
}

fn random_token() -> Result<String, TokenError> {
    let mut buf = [0u8; 32];
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a writable slice
        // of `buf` that outlives the call; getrandom writes at most that.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(TokenError::Random);
        }
        filled += n as usize;
    }
    Ok(enilab_agent::b64::encode(&buf))
}

impl Tokens {
    /// A new token for `instance`, valid for `ttl` from `now`.
    pub fn issue(
        &mut self,
        instance: &str,
        ttl: Duration,
        now: Instant,
    ) -> Result<String, TokenError> {
        self.live.retain(|_, e| e.expires > now);
        let mine: Vec<(&String, Instant)> = self
            .live
            .iter()
            .filter(|(_, e)| e.instance == instance)
            .map(|(t, e)| (t, e.expires))
            .collect();
        if mine.len() >= PER_INSTANCE {
            if let Some(oldest) = mine
                .iter()
                .min_by_key(|(_, exp)| *exp)
                .map(|(t, _)| (*t).clone())
            {
                self.live.remove(&oldest);
            }
        }
        let token = random_token()?;
        self.live.insert(
            token.clone(),
            Entry {
                instance: instance.to_string(),
                expires: now + ttl,
            },
        );
        Ok(token)
    }

    /// Whether `token` is live at `now` and was issued to `instance`.
    pub fn check(&self, token: &[u8], instance: &str, now: Instant) -> Result<(), TokenError> {
        let t = std::str::from_utf8(token).map_err(|_| TokenError::Invalid)?;
        match self.live.get(t) {
            Some(e) if e.instance == instance && e.expires > now => Ok(()),
            _ => Err(TokenError::Invalid),
        }
    }

    /// Live and expired tokens still held.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_header_values() {
        let cases: &[(Option<&[u8]>, Option<u64>)] = &[
            (Some(b"1"), Some(1)),
            (Some(b"21600"), Some(21_600)),
            (Some(b"300"), Some(300)),
            (Some(b"0"), None),
            (Some(b"21601"), None),
            (Some(b"-1"), None),
            (Some(b" 30"), None),
            (Some(b"30s"), None),
            (Some(b""), None),
            (Some(b"99999999999999999999999"), None),
            (Some(b"\xff"), None),
            (None, None),
        ];
        for (v, want) in cases {
            assert_eq!(parse_ttl(*v).ok(), want.map(Duration::from_secs), "{v:?}");
        }
    }

    #[test]
    fn tokens_are_bound_and_expire() {
        let mut t = Tokens::default();
        let now = Instant::now();
        let a = t.issue("i-a", Duration::from_secs(10), now).unwrap();
        let b = t.issue("i-a", Duration::from_secs(10), now).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 44);
        assert_eq!(t.check(a.as_bytes(), "i-a", now), Ok(()));
        assert_eq!(
            t.check(a.as_bytes(), "i-b", now),
            Err(TokenError::Invalid),
            "another instance's token"
        );
        assert_eq!(
            t.check(a.as_bytes(), "i-a", now + Duration::from_secs(10)),
            Err(TokenError::Invalid),
            "expired"
        );
        assert_eq!(t.check(b"nope", "i-a", now), Err(TokenError::Invalid));
        assert_eq!(t.check(b"\xff\xfe", "i-a", now), Err(TokenError::Invalid));
        // Expired tokens are dropped on the next issue.
        t.issue("i-b", Duration::from_secs(1), now + Duration::from_secs(11))
            .unwrap();
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn an_instance_cannot_hold_more_than_its_share() {
        let mut t = Tokens::default();
        let now = Instant::now();
        let other = t.issue("i-other", Duration::from_secs(100), now).unwrap();
        let first = t.issue("i-greedy", Duration::from_secs(50), now).unwrap();
        for n in 0..(PER_INSTANCE * 3) {
            t.issue("i-greedy", Duration::from_secs(60 + n as u64), now)
                .unwrap();
        }
        assert_eq!(t.len(), PER_INSTANCE + 1);
        assert_eq!(t.check(other.as_bytes(), "i-other", now), Ok(()));
        assert_eq!(
            t.check(first.as_bytes(), "i-greedy", now),
            Err(TokenError::Invalid),
            "the soonest-expiring token is evicted first"
        );
    }
}

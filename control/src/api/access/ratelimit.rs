//! A token bucket per client address: `rate` requests a second refill it
//! up to `burst`. A request finding it empty is refused with EC2's
//! `RequestLimitExceeded`. The table of clients is bounded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Most client addresses tracked; past it, full (idle) buckets are dropped
/// and, if none is, the oldest one.
const MAX_CLIENTS: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests per second, sustained.
    pub rate: f64,
    /// Requests allowed at once after an idle period.
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            rate: 100.0,
            burst: 200,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    clients: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> RateLimiter {
        RateLimiter {
            limit,
            clients: Mutex::new(HashMap::new()),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Take one token for `client` at `now`; false when its bucket is empty.
    pub fn allow(&self, client: IpAddr, now: Instant) -> bool {
        let burst = f64::from(self.limit.burst.max(1));
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&client) {
            let rate = self.limit.rate;
            clients.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if clients.len() >= MAX_CLIENTS {
                if let Some(oldest) = clients.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| *k) {
                    clients.remove(&oldest);
                }
            }
        }
        let b = clients.entry(client).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.limit.rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn clients(&self) -> usize {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_refill_per_client() {
        let l = RateLimiter::new(RateLimit {
            rate: 10.0,
            burst: 5,
        });
        let t = Instant::now();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let allowed = (0..8).filter(|_| l.allow(a, t)).count();
        assert_eq!(allowed, 5);
        // Another client has its own bucket.
        assert!(l.allow(b, t));
        // 10/s: one token after 100 ms, not before.
        assert!(!l.allow(a, t + Duration::from_millis(50)));
        assert!(l.allow(a, t + Duration::from_millis(150)));
        // Refill never exceeds the burst.
        let later = t + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| l.allow(a, later)).count(), 5);
    }

    #[test]
    fn client_table_is_bounded() {
        let l = RateLimiter::new(RateLimit::default());
        let t = Instant::now();
        for i in 0..(MAX_CLIENTS as u32 + 100) {
            assert!(l.allow(IpAddr::from(i.to_be_bytes()), t));
        }
        assert!(l.clients() <= MAX_CLIENTS);
    }
}

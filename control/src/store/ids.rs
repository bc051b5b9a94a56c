//! AWS-style identifiers (`vpc-0123456789abcdef0`: a prefix and 17 hex
//! digits) and request IDs.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static COUNTER: OnceLock<AtomicU64> = OnceLock::new();

fn seed() -> u64 {
    let mut b = [0u8; 8];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if ok {
        u64::from_le_bytes(b)
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ u64::from(std::process::id()).rotate_left(32)
    }
}

/// 64 well-mixed bits, never the same twice in one process.
pub fn random_u64() -> u64 {
    let c = COUNTER.get_or_init(|| AtomicU64::new(seed()));
    let mut z = c.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    // splitmix64 finaliser: a bijection, so distinct inputs stay distinct.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `prefix` + 17 lowercase hex digits (the first is 0, as AWS's are).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}0{:016x}", random_u64())
}

/// A request ID in UUID form.
pub fn request_id() -> String {
    let a = random_u64();
    let b = random_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// Does `s` look like `prefix` followed by 8 or 17 lowercase hex digits?
pub fn well_formed(s: &str, prefix: &str) -> bool {
    match s.strip_prefix(prefix) {
        Some(rest) => {
            (rest.len() == 8 || rest.len() == 17)
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        None => false,
    }
}

/// A locally administered unicast MAC (first octet 0x0e, like some of AWS's).
pub fn new_mac() -> String {
    let r = random_u64();
    let b = r.to_le_bytes();
    format!(
        "0e:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_well_formed_and_distinct() {
        let a = new_id("vpc-");
        let b = new_id("vpc-");
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 17);
        assert!(well_formed(&a, "vpc-"));
        assert!(well_formed("vpc-1a2b3c4d", "vpc-"));
        assert!(!well_formed("vpc-1A2B3C4D", "vpc-"));
        assert!(!well_formed("vpc-123", "vpc-"));
        assert!(!well_formed("subnet-1a2b3c4d", "vpc-"));
        assert_eq!(request_id().len(), 36);
        let m = new_mac();
        assert!(m.starts_with("0e:") && m.len() == 17);
    }
}

//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): each backend
//! walks its own permutation of the table (offset = h1 mod M, skip =
//! h2 mod (M-1) + 1) and backends take turns claiming their next free slot.

/// Why a table could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    /// The table size must be a prime larger than the number of backends.
    #[error("the Maglev table size {0} is not a prime larger than the backend count")]
    BadSize(usize),
    /// At most 65535 backends fit the table's 16-bit entries.
    #[error("{0} backends is more than a Maglev table can hold")]
    TooManyBackends(usize),
}

/// 64-bit finaliser (splitmix64); good avalanche, a few cycles.
#[inline]
pub(crate) fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

pub(crate) fn is_prime(m: usize) -> bool {
    m >= 2 && (2..).take_while(|d| d * d <= m).all(|d| m % d != 0)
}

/// A built lookup table: slot → backend index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Maglev {
    table: Vec<u16>,
}

impl Maglev {
    /// Builds the table for backends identified by stable 64-bit keys (the
    /// same key set gives the same table whatever the order).
    pub fn build(keys: &[u64], size: usize) -> Result<Maglev, MaglevError> {
        if !is_prime(size) || size <= keys.len() {
            return Err(MaglevError::BadSize(size));
        }
        if keys.len() > usize::from(u16::MAX) {
            return Err(MaglevError::TooManyBackends(keys.len()));
        }
        if keys.is_empty() {
            return Ok(Maglev { table: Vec::new() });
        }
        // Claim order follows the sorted keys so the input order does not matter.
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_by_key(|&i| keys[i]);
        let m = size as u64;
        let mut pos: Vec<u64> = Vec::with_capacity(keys.len());
        let mut skip: Vec<u64> = Vec::with_capacity(keys.len());
        for &i in &order {
            let h1 = mix64(keys[i] ^ 0x9e37_79b9_7f4a_7c15);
            let h2 = mix64(keys[i] ^ 0x6a09_e667_f3bc_c909);
            pos.push(h1 % m);
            skip.push(h2 % (m - 1) + 1);
        }
        const EMPTY: u16 = u16::MAX;
        let mut table = vec![EMPTY; size];
        let mut filled = 0;
        'outer: loop {
            for (j, &i) in order.iter().enumerate() {
                let mut p = pos[j];
                while table[p as usize] != EMPTY {
                    p += skip[j];
                    if p >= m {
                        p -= m;
                    }
                }
                table[p as usize] = i as u16;
                p += skip[j];
                if p >= m {
                    p -= m;
                }
                pos[j] = p;
                filled += 1;
                if filled == size {
                    break 'outer;
                }
            }
        }
        Ok(Maglev { table })
    }

    /// The backend index for a flow hash, None when there are no backends.
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        // Multiply-shift maps the hash onto the table without a division.
        let slot = ((hash >> 32) * self.table.len() as u64) >> 32;
        self.table.get(slot as usize).map(|&b| usize::from(b))
    }

    pub fn size(&self) -> usize {
        self.table.len()
    }

    /// How many slots each backend owns.
    pub fn loads(&self, backends: usize) -> Vec<usize> {
        let mut l = vec![0; backends];
        for &b in &self.table {
            if let Some(x) = l.get_mut(usize::from(b)) {
                *x += 1;
            }
        }
        l
    }

    pub(crate) fn slot_backend(&self, slot: usize) -> Option<u16> {
        self.table.get(slot).copied()
    }
}

/// Fraction of slots that change owner (by key) when `before` becomes `after`.
pub fn disruption(before: &Maglev, before_keys: &[u64], after: &Maglev, after_keys: &[u64]) -> f64 {
    let n = before.size().min(after.size());
    if n == 0 {
        return 0.0;
    }
    let moved = (0..n)
        .filter(|&s| {
            let a = before
                .slot_backend(s)
                .and_then(|b| before_keys.get(usize::from(b)));
            let b = after
                .slot_backend(s)
                .and_then(|b| after_keys.get(usize::from(b)));
            a != b
        })
        .count();
    moved as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: u64) -> Vec<u64> {
        (0..n).map(|i| mix64(i + 1)).collect()
    }

    #[test]
    fn deterministic_and_order_free() {
        let k = keys(10);
        let mut r = k.clone();
        r.reverse();
        let a = Maglev::build(&k, 65537).unwrap();
        let b = Maglev::build(&r, 65537).unwrap();
        for s in 0..65537 {
            assert_eq!(
                k[usize::from(a.slot_backend(s).unwrap())],
                r[usize::from(b.slot_backend(s).unwrap())]
            );
        }
    }

    #[test]
    fn balanced_within_a_few_percent() {
        for n in [3u64, 10, 100] {
            let m = Maglev::build(&keys(n), 65537).unwrap();
            let l = m.loads(n as usize);
            let (max, min) = (
                *l.iter().max().unwrap() as f64,
                *l.iter().min().unwrap() as f64,
            );
            assert!(max / min < 1.03, "n={n} max={max} min={min}");
        }
    }

    #[test]
    fn one_of_hundred_leaving_moves_about_one_percent() {
        let before = keys(100);
        let after: Vec<u64> = before
            .iter()
            .copied()
            .filter(|&k| k != before[42])
            .collect();
        let a = Maglev::build(&before, 65537).unwrap();
        let b = Maglev::build(&after, 65537).unwrap();
        let d = disruption(&a, &before, &b, &after);
        assert!((0.009..0.03).contains(&d), "disruption {d}");
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(
            Maglev::build(&keys(3), 65536),
            Err(MaglevError::BadSize(65536))
        );
        assert_eq!(Maglev::build(&keys(13), 13), Err(MaglevError::BadSize(13)));
        assert_eq!(Maglev::build(&[], 7).unwrap().lookup(5), None);
    }
}

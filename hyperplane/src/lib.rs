//! enilab-hyperplane: the NAT gateway and network load balancer tier.
//!
//! Reserved by the foundation issue; the hyperplane issue fills it. The
//! shape it will take is written down in `docs/hyperplane.md`: nodes with no
//! shared mutable state, a flow table sharded by consistent hashing with a
//! primary and a secondary per flow, configuration as whole snapshots, and
//! Maglev hashing for the load balancer. Like the switch, it knows nothing
//! of virtqueues, the API, the database or tokio.
//!
//! Nothing here is wired into the datapath yet.

/// The Maglev lookup-table size the hyperplane issue starts from (prime).
pub const MAGLEV_TABLE_SIZE: usize = 65537;

#[cfg(test)]
mod tests {
    #[test]
    fn table_size_is_prime() {
        let m = super::MAGLEV_TABLE_SIZE;
        assert!((2..).take_while(|d| d * d <= m).all(|d| m % d != 0));
    }
}

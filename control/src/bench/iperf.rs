//! `--scenario iperf`: iperf3 TCP between two TCG guests, through enilab
//! and through DPDK io-forwarding between two vhost ports.

use super::{BenchError, BenchOptions, Row};

pub fn run(_opts: &BenchOptions, _log: &dyn Fn(&str)) -> Result<Vec<Row>, BenchError> {
    Err(BenchError::Option(
        "the iperf scenario is not built yet".into(),
    ))
}

//! Benchmark runner (printed figures; nothing here is asserted).

use std::fmt;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub flows: usize,
    pub packets: usize,
    pub maglev_backends: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            flows: 1_000_000,
            packets: 10_000_000,
            maglev_backends: 1000,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct BenchReport {
    pub lines: Vec<(String, f64, &'static str)>,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, v, unit) in &self.lines {
            writeln!(f, "{name:<55} {v:>12.3} {unit}")?;
        }
        Ok(())
    }
}

pub fn run(_opts: &BenchOptions) -> BenchReport {
    BenchReport::default()
}

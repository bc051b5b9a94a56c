//! Prints the hyperplane's figures: `cargo bench -p enilab-hyperplane --bench hyperplane`
//! (`-- --quick` for 100k flows, `-- --only nat|nlb|replicated|maglev` for one section).
//! Run without `--bench` (as `cargo test --all-targets` does) it makes a tiny smoke run.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut opts = enilab_hyperplane::bench::BenchOptions::default();
    if !args.iter().any(|a| a == "--bench") {
        opts.flows = 10_000;
        opts.packets = 100_000;
        opts.maglev_backends = 100;
    } else if args.iter().any(|a| a == "--quick") {
        opts.flows = 100_000;
        opts.packets = 2_000_000;
    }
    if let Some(i) = args.iter().position(|a| a == "--only") {
        opts.only = args.get(i + 1).cloned();
    }
    print!("{}", enilab_hyperplane::bench::run(&opts));
}

//! Prints the hyperplane's figures: `cargo bench -p enilab-hyperplane`
//! (`-- --quick` for a short run with 100k flows, `-- --only nat|nlb|replicated|maglev`).

fn main() {
    let mut opts = enilab_hyperplane::bench::BenchOptions::default();
    if std::env::args().any(|a| a == "--quick") {
        opts.flows = 100_000;
        opts.packets = 2_000_000;
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--only") {
        opts.only = args.get(i + 1).cloned();
    }
    print!("{}", enilab_hyperplane::bench::run(&opts));
}

//! `cargo bench -p enilab-hyperplane` prints the hyperplane's figures.

fn main() {
    let opts = enilab_hyperplane::bench::BenchOptions::default();
    print!("{}", enilab_hyperplane::bench::run(&opts));
}

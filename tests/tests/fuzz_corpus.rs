//! The fuzz targets' corpora, replayed on stable in the normal test suite
//! through the same library entry points the cargo-fuzz targets call:
//! every file under `fuzz/corpus/<target>/` (the committed seeds, plus any
//! corpus a local run grew) and `fuzz/regressions/<target>/` (inputs of
//! fixed findings, if any). A panic names the file.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files to replay for `target`, sorted.
fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(dir).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

fn replay(target: &str, entry: fn(&[u8])) {
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "no inputs for {target} under {}",
        fuzz_dir().display()
    );
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if std::panic::catch_unwind(|| entry(&data)).is_err() {
            panic!("{target}: {} makes the harness panic", f.display());
        }
    }
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn vhost_user_corpus() {
    replay("vhost_user", |d| {
        enilab_backend::fuzzing::vhost_user_stream(d);
    });
}

#[test]
fn virtqueue_corpus() {
    replay("virtqueue", |d| {
        enilab_backend::fuzzing::virtqueue(d);
    });
}

#[test]
fn pipeline_corpus() {
    replay("pipeline", enilab_control::fuzzing::pipeline);
}

#[test]
fn api_query_corpus() {
    replay("api_query", enilab_control::fuzzing::api_query);
    enilab_control::fuzzing::api_query_reset();
}

/// The replay can fail: a harness that panics on an input fails it.
#[test]
fn a_panicking_input_fails_the_replay() {
    let r = std::panic::catch_unwind(|| {
        replay("pipeline", |_| panic!("boom"));
    });
    assert!(r.is_err());
}

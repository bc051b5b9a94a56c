//! The EC2 Query API request parser and every handler; the harness is
//! `enilab_control::fuzzing::api_query` (its seeds replay in
//! `tests/tests/fuzz_corpus.rs`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    enilab_control::fuzzing::api_query(data);
});

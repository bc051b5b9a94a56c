//! Frames into the switch pipeline and a hyperplane node; the harness is
//! `enilab_control::fuzzing::pipeline` (its seeds replay in
//! `tests/tests/fuzz_corpus.rs`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    enilab_control::fuzzing::pipeline(data);
});

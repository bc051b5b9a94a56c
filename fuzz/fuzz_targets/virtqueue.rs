//! Descriptor tables, rings and buffers from the fuzzer's bytes, through TX and RX.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    enilab_backend::fuzzing::virtqueue(data);
});

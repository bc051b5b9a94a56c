//! The vhost-user message stream into the backend's request loop.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    enilab_backend::fuzzing::vhost_user_stream(data);
});

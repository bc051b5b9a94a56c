//! The EC2 Query API: form decoding (`Params::parse`) and dispatch to every
//! handler's validation and logic, with the recording driver on a state
//! store in a temporary directory (tmpfs if present; reset every 100 000 inputs).
//!
//! Input: `[split u8]` then bytes; the first `split` bytes are the URI query
//! and the rest the body. If the input names no `Action`, one is picked by
//! `split` so every handler sees fuzzed parameters.
#![no_main]

use std::sync::{Arc, Mutex};

use enilab_control::api::{Api, Config, Params, RecordingDriver, ACTIONS};

struct State {
    dir: std::path::PathBuf,
    api: Option<Arc<Api>>,
    calls: u32,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Inputs between fresh stores. Rare: a dropped `Api` leaves its job-queue
/// threads behind (they never exit), so frequent resets leak threads.
const RESET_EVERY: u32 = 100_000;

fn api(st: &mut State) -> Option<Arc<Api>> {
    if st.calls >= RESET_EVERY {
        st.api = None;
        st.calls = 0;
        let _ = std::fs::remove_dir_all(&st.dir);
    }
    st.calls += 1;
    if st.api.is_none() {
        std::fs::create_dir_all(&st.dir).ok()?;
        st.api = Api::open(&st.dir, Config::default(), Arc::new(RecordingDriver)).ok();
    }
    st.api.clone()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let [split, rest @ ..] = data else { return };
    let (query, body) = rest.split_at(usize::from(*split).min(rest.len()));
    let Ok(parsed) = Params::parse(&[query, body]) else {
        return;
    };
    let mut params = parsed.clone();
    if parsed.get("Action").is_none() {
        let (name, _) = ACTIONS[usize::from(*split) % ACTIONS.len()];
        let mut pairs: Vec<(&str, &str)> = parsed
            .keys()
            .filter_map(|k| parsed.get(k).map(|v| (k, v)))
            .collect();
        pairs.push(("Action", name));
        pairs.push(("Version", enilab_control::api::API_VERSION));
        params = Params::from_pairs(pairs);
    }
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let st = guard.get_or_insert_with(|| State {
        // tmpfs when there is one: every mutating call commits to SQLite.
        dir: ["/dev/shm".into(), std::env::temp_dir()]
            .into_iter()
            .find(|d: &std::path::PathBuf| d.is_dir())
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("enilab-fuzz-api-{}", std::process::id())),
        api: None,
        calls: 0,
    });
    let Some(api) = api(st) else { return };
    let reply = api.call(&params);
    assert!(reply.status == 200 || (400..600).contains(&reply.status));
});

//! The busy-poll knob of card workers.
//!
//! A worker with a non-zero budget keeps polling its rings (guest
//! notifications off) for that many microseconds after the last frame it
//! moved, then re-arms notifications and sleeps in epoll as before. Zero
//! (the default) never polls: on a small host the guests need the CPU.
//! Set with [`set_busy_poll`] or `ENILAB_BUSY_POLL_US`; workers re-read it
//! every time they go idle, so it can change at run time.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Upper bound of the budget: one second.
const MAX_US: u32 = 1_000_000;

static BUDGET_US: AtomicU32 = AtomicU32::new(0);
static FROM_ENV: OnceLock<()> = OnceLock::new();

fn init_from_env() {
    FROM_ENV.get_or_init(|| {
        if let Some(us) = std::env::var("ENILAB_BUSY_POLL_US")
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            BUDGET_US.store(us.min(MAX_US), Ordering::Relaxed);
        }
    });
}

/// Set the idle budget of every card worker (0: never busy-poll).
pub fn set_busy_poll(budget: Duration) {
    init_from_env();
    let us = u32::try_from(budget.as_micros()).unwrap_or(MAX_US);
    BUDGET_US.store(us.min(MAX_US), Ordering::Relaxed);
}

/// The current idle budget.
pub fn busy_poll() -> Duration {
    init_from_env();
    Duration::from_micros(u64::from(BUDGET_US.load(Ordering::Relaxed)))
}

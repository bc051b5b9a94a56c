//! Lock-free per-port counters.

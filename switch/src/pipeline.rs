//! The per-packet pipeline.

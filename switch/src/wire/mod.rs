//! Checked wire-format helpers.

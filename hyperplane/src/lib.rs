//! hyperplane

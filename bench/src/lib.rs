//! Shared pieces of Muster's benchmark binaries.

pub mod stats;

//! Shared pieces of Muster's benchmark binaries: simulated agents, percentiles, `/proc`
//! readings and the load benchmark's report.

pub mod report;
pub mod sim;
pub mod stats;
pub mod sys;

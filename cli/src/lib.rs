//! Muster's command lines: `muster`, the operator's CLI (one module per command group, the
//! views in one place, the local lab), and `muster-controller`, the server's. The library part
//! is the admin API client ([`client`]), which the tests and benchmarks use too, and
//! [`terminal::escape`] for showing strings the CLI did not write.
//!
//! Depends on `muster-machinery`, `muster-proto`, `muster-lab`, `muster-images` and (for
//! `muster-controller` only) `muster-controller`.

pub mod client;
pub mod list;
pub mod terminal;

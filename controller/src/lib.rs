//! The Muster controller: fleet state, the agent and admin gRPC APIs, and the certificate signer.
//!
//! - [`pki`]: the CA, server and admin certificates, and the signer for machine certificates.
//! - [`store`]: the state store trait and its embedded SQLite backend.
//! - [`server`]: the gRPC services, per-call authorization and the connected-agent registry.
//! - [`client`]: admin API client used by the `muster` CLI, tests and benchmarks.

pub mod client;
pub mod metrics;
pub mod pki;
pub mod server;
pub mod store;

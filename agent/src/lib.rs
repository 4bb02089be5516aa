//! The Muster node agent.
//!
//! - [`settings`]: flags and the kernel command line, merged into an [`AgentConfig`].
//! - [`identity`]: the state dir (node key, certificate, CA, machine id, last assignment).
//! - [`discovery`] and [`enroll`]: finding the controller's CA by its pin, then enrolling.
//! - [`client`]: CSRs, the TLS channels and the calls to the controller, with the retryable vs
//!   final classification of their failures.
//! - [`agent`]: [`Agent`], the loop that enrolls if needed, keeps one stream open
//!   ([`session`]), reconnects with backoff and full jitter, renews its certificate at ~70 % of
//!   its lifetime ([`renewal`]), and stops for good when the controller revokes it.
//! - [`rollout`]: the config generations on the node (auto, try, staged, drift), a state
//!   machine over [`reconcile`], which changes the node only through [`effects`].
//! - [`inventory`] and [`health`]: what the node reports, read from `/proc` and `/sys`.
//! - [`metrics`]: the agent's own `/metrics` endpoint.
//!
//! Depends on `muster-machinery` (vocabulary) and `muster-proto` (wire); never on the
//! controller, the store or the lab. The lower-level steps ([`connect_pinned`],
//! [`generate_key`], [`csr_pem`], [`enroll_once`] / [`client::enroll_over`], [`mtls_channel`],
//! [`inventory::collect`]) are public so that tests and the benchmark can drive many simulated
//! agents from one process.

pub mod agent;
pub mod backoff;
pub mod baseline;
pub mod client;
pub mod discovery;
pub mod effects;
mod enroll;
pub mod generations;
pub mod health;
pub mod identity;
pub mod install;
pub mod inventory;
pub mod metrics;
pub mod reconcile;
pub mod renewal;
pub mod rollout;
mod session;
pub mod settings;
#[cfg(test)]
mod test_support;

pub use agent::{Agent, AgentError, AgentStatus};
pub use renewal::{renew_at, renew_at_jittered};
pub use settings::{AgentConfig, Hints};

// The steps of the loop, for in-process tests and the benchmark (many simulated agents in one
// process): find the CA by its pin, make a key and a CSR, enroll, open the mutual-TLS channel.
pub use client::{csr_pem, enroll_once, generate_key, mtls_channel, CallError};
pub use discovery::{connect_pinned, DiscoveryError};
pub use identity::Assignment;

/// Installs the ring crypto provider for rustls (once per process; later calls are no-ops).
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

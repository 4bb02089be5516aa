//! The Muster node agent.
//!
//! - [`settings`]: flags and the kernel command line, merged into an [`AgentConfig`].
//! - [`identity`]: the state dir (node key, certificate, CA, machine id, last assignment).
//! - [`discovery`]: finding the controller's CA by its pin before there is any certificate.
//! - [`client`]: enrollment, CSRs and the TLS channels to the controller.
//! - [`inventory`] and [`health`]: what the node reports, read from `/proc` and `/sys`.
//! - [`metrics`]: the agent's own `/metrics` endpoint.
//! - [`Agent`]: the loop that enrolls if needed, keeps one stream open with heartbeats,
//!   reconnects with backoff and full jitter, renews its certificate at ~70 % of its lifetime,
//!   and stops for good when the controller revokes it.
//!
//! The lower-level steps ([`connect_pinned`], [`generate_key`],
//! [`csr_pem`], [`enroll_once`] / [`client::enroll_over`],
//! [`mtls_channel`], [`inventory::collect`]) are public so that tests and the benchmark can
//! drive many simulated agents from one process.

pub mod backoff;
pub mod client;
pub mod discovery;
pub mod effects;
pub mod generations;
pub mod health;
pub mod identity;
pub mod inventory;
pub mod metrics;
pub mod netlink;
pub mod reconcile;
mod run;
pub mod settings;
#[cfg(test)]
mod test_support;

pub use run::{renew_at, renew_at_jittered, Agent, AgentError, AgentStatus};
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

//! The Muster controller, the server only: it holds the fleet's state and serves the agents'
//! and operators' gRPC APIs, the HTTP endpoints (health, metrics, service discovery, network
//! boot) and the certificate signer.
//!
//! - [`fleet`]: the domain core. The controller's state ([`fleet::Controller`]: the machine
//!   cache and open sessions), enrollment admission, tokens, assignment, config rollout,
//!   registration, boot policy, health; every rule lives here, with typed errors
//!   ([`fleet::FleetError`]).
//! - [`api`]: thin transport. gRPC handlers that check the caller and the arguments' shape,
//!   call the fleet and convert; the one exhaustive error → status mapping; the HTTP router.
//! - [`store`]: the state store trait, its embedded SQLite backend and a metered decorator.
//! - [`pki`]: the data dir and its certificates, the machine-certificate signer, caller
//!   identification.
//! - [`metrics`]: the controller's own metrics and the fleet's exposition.
//! - [`serve`]: start-up: data dir, listeners, services, shutdown.
//! - [`supervise`]: every background service restarted with backoff when it dies, its state in
//!   `/readyz` and the metrics.
//!
//! Depends on `muster-machinery`, `muster-proto`, `muster-pxe` and `muster-util`; never on
//! clap, the CLI or the lab.

pub mod api;
pub mod fleet;
pub mod metrics;
pub mod pki;
pub mod serve;
pub mod store;
pub mod supervise;

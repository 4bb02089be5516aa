//! Muster's vocabulary: the pure types every component speaks, with their parsing and
//! validation. Shared by the agent, the controller, the CLI, the lab and the tests.
//!
//! - [`config`]: the machine config model (types, validation with field paths, layer merge,
//!   JSON Schema).
//! - [`model`]: roles, machine states, machine ids, labels, cluster names, MACs.
//! - [`rollout`]: apply modes, generation states, resource outcomes, the try timeout.
//! - [`token`]: join tokens (`<id>.<secret>`), their parsing and hashing.
//! - [`pin`]: the CA pin (`sha256:<hex>` of the CA's SubjectPublicKeyInfo).
//! - [`kernel_args`]: the `muster.*` kernel parameters, built and parsed.
//! - [`health`]: a node's health snapshot.
//! - [`metrics`]: node metric names and a fast Prometheus/OpenMetrics exposition writer.
//! - [`musterconfig`]: the CLI's config file.
//! - [`boot`]: boot asset names.
//!
//! serde and validation only: no I/O, no clocks, and no tokio, tonic or prost (the wire types
//! live in `muster-proto`, which converts to and from these).

pub mod boot;
pub mod config;
pub mod health;
pub mod install;
pub mod k8s;
pub mod kernel_args;
pub mod metrics;
pub mod model;
pub mod musterconfig;
pub mod pin;
pub mod rollout;
pub mod token;

pub use kernel_args::KernelArgs;
pub use model::{LabelError, Labels, MachineId, Role, State};
pub use rollout::{ApplyMode, ConfirmPolicy, GenerationState, Outcome};

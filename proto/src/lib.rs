//! Muster's contract, shared by the agent, the controller and the CLI.
//!
//! - [`pb`]: the gRPC API generated from `proto/muster/v1/*.proto`.
//! - [`token`]: join tokens (`<id>.<secret>`), their parsing and hashing.
//! - [`pin`]: the CA pin (`sha256:<hex>` of the CA's SubjectPublicKeyInfo), as kubeadm's discovery hash.
//! - [`model`]: roles, machine states, labels and ids as validated domain types.
//! - [`musterconfig`]: the CLI's config file.
//!
//! Pure types and computation only: nothing in this crate touches files, sockets or clocks.

pub mod config;
pub mod model;
pub mod musterconfig;
pub mod node_metrics;
pub mod pin;
pub mod token;

/// Generated protobuf and gRPC code.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("muster.v1");
}

pub use model::{LabelError, Labels, MachineId, Role, State};

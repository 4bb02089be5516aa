//! Thin transport: the gRPC services (agent and admin), per-call authorization, the one error →
//! status mapping, the views of fleet records, the TLS listener and the HTTP router. No rule
//! about the fleet lives here; handlers check the caller and the request's shape and call
//! [`crate::fleet`].

pub mod admin;
pub mod agent;
pub mod auth;
mod error;
pub mod http;
pub mod limits;
pub mod tls;
pub mod views;

pub use error::ApiError;

/// Largest gRPC message accepted from agents.
pub const MAX_AGENT_MESSAGE: usize = 256 * 1024;
/// Largest gRPC message accepted from admins.
pub const MAX_ADMIN_MESSAGE: usize = 4 * 1024 * 1024;

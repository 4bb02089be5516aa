//! Why the fleet refused or failed a request: typed, so every rejection is named once here and
//! mapped to a gRPC status once (`api::error`), never re-coded at a call site.

use muster_machinery::model::{MachineId, Role};

use crate::pki::SignError;
use crate::store::{StoreError, TokenRejection};

/// Everything the fleet's operations can fail with.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A value the caller gave is not acceptable.
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    /// Nothing by that name.
    #[error("{0}")]
    NotFound(String),
    /// A machine query that names more than one machine.
    #[error("{query:?} is ambiguous: {count} machines match by {by} ({ids}); use the full id")]
    Ambiguous { query: String, count: usize, by: &'static str, ids: String },
    /// The calling machine may not talk to us any more (it must enroll again).
    #[error("machine {id} was {why}; enroll again with a new join token")]
    Unadmitted { id: MachineId, why: Unadmitted },
    /// An operator asked for something a revoked machine cannot have.
    #[error("machine {0} is revoked")]
    MachineRevoked(MachineId),
    #[error("machine {0} is already revoked")]
    AlreadyRevoked(MachineId),
    #[error("machine {0} is already approved")]
    AlreadyApproved(MachineId),
    #[error("machine {id} already has role {role} in cluster {cluster}")]
    AlreadyAssigned { id: MachineId, role: Role, cluster: String },
    #[error("machine {id} already has role {role} in cluster {cluster}; pass --force to reassign it")]
    AssignedElsewhere { id: MachineId, role: Role, cluster: String },
    #[error("token {0} is already revoked")]
    TokenAlreadyRevoked(String),
    #[error("MAC {mac} is already registered{}; pass --force to replace it", claimed_by.as_ref().map(|m| format!(" (claimed by {m})")).unwrap_or_default())]
    AlreadyRegistered { mac: String, claimed_by: Option<String> },
    /// A config operation that does not fit where the machine's generation stands.
    #[error("machine {id}: {reason}")]
    ConfigState { id: MachineId, reason: String },
    /// An install to disk or a reset that does not fit the machine now.
    #[error("machine {id}: {reason}")]
    Install { id: MachineId, reason: String },
    /// Too many enrollments from one address.
    #[error("too many enrollments from {peer}; try again in {retry_after_s}s")]
    RateLimited { peer: std::net::IpAddr, retry_after_s: u64 },
    /// Too many machines wait for approval.
    #[error("{0}; approve or delete pending machines (`muster machines`) first")]
    TooManyPending(String),
    #[error(transparent)]
    Token(#[from] TokenRejection),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file of the controller's own could not be written.
    #[error("cannot write {path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why a machine is no longer admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unadmitted {
    Revoked,
    Deleted,
}

impl std::fmt::Display for Unadmitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unadmitted::Revoked => "revoked",
            Unadmitted::Deleted => "deleted",
        })
    }
}

impl FleetError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        FleetError::Invalid { field, message: message.into() }
    }
}

//! API errors and their one mapping to gRPC status codes: an exhaustive `match`, no `_` arm, so
//! a new rejection cannot reach a caller with a code nobody chose.

use tonic::Status;

use crate::fleet::FleetError;
use crate::pki::SignError;
use crate::store::StoreError;

/// Everything an API call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No usable client certificate.
    #[error("{0}")]
    Unauthenticated(String),
    /// A certificate of the wrong kind for this service.
    #[error("{0}")]
    WrongCaller(String),
    /// A request that is malformed on the wire (an unknown enum value, a missing message).
    #[error("{field}: {message}")]
    Malformed { field: &'static str, message: String },
    #[error(transparent)]
    Fleet(#[from] FleetError),
}

impl ApiError {
    pub fn malformed(field: &'static str, message: impl Into<String>) -> Self {
        ApiError::Malformed { field, message: message.into() }
    }
}

impl From<muster_proto::WireError> for ApiError {
    fn from(e: muster_proto::WireError) -> Self {
        ApiError::Malformed { field: e.field, message: format!("unknown value {}", e.value) }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Fleet(FleetError::Store(e))
    }
}

fn store_status(e: &StoreError, msg: String) -> Status {
    match e {
        StoreError::NotFound { .. } => Status::not_found(msg),
        StoreError::Duplicate { .. } => Status::already_exists(msg),
        StoreError::Token(_) => Status::unauthenticated(msg),
        StoreError::Aborted | StoreError::Corrupt { .. } => Status::internal(msg),
        StoreError::Backend(_) => Status::unavailable(msg),
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::Unauthenticated(_) => Status::unauthenticated(msg),
            ApiError::WrongCaller(_) => Status::permission_denied(msg),
            ApiError::Malformed { .. } => Status::invalid_argument(msg),
            ApiError::Fleet(f) => match f {
                FleetError::Invalid { .. } | FleetError::Ambiguous { .. } => Status::invalid_argument(msg),
                FleetError::NotFound(_) => Status::not_found(msg),
                // The agent takes PermissionDenied as "revoked": it forgets its identity and stops.
                FleetError::Unadmitted { .. } => Status::permission_denied(msg),
                FleetError::MachineRevoked(_)
                | FleetError::AlreadyRevoked(_)
                | FleetError::AlreadyApproved(_)
                | FleetError::AlreadyAssigned { .. }
                | FleetError::AssignedElsewhere { .. }
                | FleetError::TokenAlreadyRevoked(_)
                | FleetError::ConfigState { .. }
                | FleetError::Install { .. } => Status::failed_precondition(msg),
                FleetError::AlreadyRegistered { .. } => Status::already_exists(msg),
                FleetError::RateLimited { .. } | FleetError::TooManyPending(_) => {
                    Status::resource_exhausted(msg)
                }
                FleetError::Token(_) => Status::unauthenticated(msg),
                FleetError::Sign(SignError::BadCsr(_) | SignError::KeyAlgorithm) => {
                    Status::invalid_argument(msg)
                }
                FleetError::Sign(SignError::Sign(_)) => Status::internal(msg),
                FleetError::Store(s) => store_status(&s, msg),
                FleetError::Io { .. } | FleetError::Internal(_) => Status::internal(msg),
            },
        }
    }
}

impl From<FleetError> for Status {
    fn from(e: FleetError) -> Self {
        ApiError::Fleet(e).into()
    }
}

//! API errors and their one mapping to gRPC status codes.

use tonic::Status;

use crate::pki::SignError;
use crate::store::StoreError;

/// Everything an API call can fail with. Mapped to a [`Status`] by an exhaustive match.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{field}: {message}")]
    InvalidArgument { field: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ApiError::InvalidArgument { field, message: message.into() }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::Unauthenticated(_) => Status::unauthenticated(msg),
            ApiError::PermissionDenied(_) => Status::permission_denied(msg),
            ApiError::InvalidArgument { .. } => Status::invalid_argument(msg),
            ApiError::NotFound(_) => Status::not_found(msg),
            ApiError::AlreadyExists(_) => Status::already_exists(msg),
            ApiError::FailedPrecondition(_) => Status::failed_precondition(msg),
            ApiError::Sign(SignError::BadCsr(_) | SignError::KeyAlgorithm) => Status::invalid_argument(msg),
            ApiError::Sign(SignError::Sign(_)) => Status::internal(msg),
            ApiError::Store(s) => match s {
                StoreError::NotFound { .. } => Status::not_found(msg),
                StoreError::Conflict(_) => Status::already_exists(msg),
                StoreError::Token(_) => Status::unauthenticated(msg),
                StoreError::Corrupt { .. } => Status::internal(msg),
                StoreError::Backend(_) => Status::unavailable(msg),
            },
            ApiError::Internal(_) => Status::internal(msg),
        }
    }
}

//! Per-call authorization: who the verified client certificate says the caller is, and whether
//! that kind of caller may use this service.

use muster_machinery::model::MachineId;
use tonic::Request;

use super::ApiError;
use crate::pki::{identify, Caller};

/// The caller of a request, from its TLS client certificate (verified against our CA by the
/// handshake).
pub fn caller<T>(req: &Request<T>) -> Result<Caller, ApiError> {
    let certs = req.peer_certs().ok_or_else(|| {
        ApiError::Unauthenticated("this call needs a client certificate signed by the controller's CA".into())
    })?;
    let leaf = certs.first().ok_or_else(|| {
        ApiError::Unauthenticated("this call needs a client certificate signed by the controller's CA".into())
    })?;
    identify(leaf).map_err(|e| ApiError::Unauthenticated(e.to_string()))
}

/// Requires an admin certificate.
pub fn require_admin<T>(req: &Request<T>) -> Result<String, ApiError> {
    match caller(req)? {
        Caller::Admin { name } => Ok(name),
        Caller::Machine { .. } => {
            Err(ApiError::WrongCaller("machine certificates cannot call the admin API".into()))
        }
    }
}

/// Requires a machine certificate; returns the machine id it names.
pub fn require_machine<T>(req: &Request<T>) -> Result<MachineId, ApiError> {
    match caller(req)? {
        Caller::Machine { id, .. } => Ok(id),
        Caller::Admin { .. } => {
            Err(ApiError::WrongCaller("admin certificates cannot call the agent API".into()))
        }
    }
}

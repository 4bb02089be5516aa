//! Who a client certificate names. The TLS layer has already verified the chain against our CA;
//! the certificate's organization says what kind of caller it is (an admin or a machine).

use muster_machinery::model::MachineId;

use super::{ORG_ADMINS, ORG_MACHINES};

/// Who is calling, as told by a client certificate the TLS layer verified against our CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin { name: String },
    Machine { id: MachineId, serial_hex: String, not_after_unix: i64 },
}

/// Why a verified certificate does not name a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallerError {
    #[error("client certificate is not parseable: {0}")]
    Parse(String),
    #[error("client certificate has no Muster role (organization {0:?})")]
    UnknownRole(String),
    #[error("machine certificate has an invalid machine id")]
    BadMachineId,
}

/// Identifies the caller from its (already chain-verified) leaf certificate.
pub fn identify(leaf_der: &[u8]) -> Result<Caller, CallerError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf_der).map_err(|e| CallerError::Parse(e.to_string()))?;
    let subject = cert.subject();
    let org = subject.iter_organization().next().and_then(|a| a.as_str().ok()).unwrap_or_default();
    let cn = subject.iter_common_name().next().and_then(|a| a.as_str().ok()).unwrap_or_default();
    match org {
        ORG_ADMINS => Ok(Caller::Admin { name: cn.to_owned() }),
        ORG_MACHINES => Ok(Caller::Machine {
            id: cn.parse().map_err(|_| CallerError::BadMachineId)?,
            serial_hex: hex::encode(cert.raw_serial()),
            not_after_unix: cert.validity().not_after.timestamp(),
        }),
        other => Err(CallerError::UnknownRole(other.to_owned())),
    }
}

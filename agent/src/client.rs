//! Talking to the controller: keys and CSRs, enrollment, and the TLS channels.

use std::time::Duration;

use muster_proto::pb;
use muster_proto::pb::agent_service_client::AgentServiceClient;
use rcgen::KeyPair;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use crate::discovery::host_port;

/// A failed call, classified: worth retrying, or final.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The controller may answer later (down, restarting, overloaded, network).
    #[error("{0}")]
    Retry(String),
    /// The controller said no; asking again will not change that.
    #[error("{0}")]
    Final(String),
    /// The controller revoked or deleted this machine.
    #[error("{0}")]
    Revoked(String),
}

/// Classifies a gRPC status.
pub fn classify(status: &Status) -> CallError {
    let msg = describe(status);
    match status.code() {
        Code::PermissionDenied => CallError::Revoked(msg),
        Code::Unauthenticated
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::NotFound
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::Unimplemented => CallError::Final(msg),
        _ => CallError::Retry(msg),
    }
}

/// A status with its transport cause (under TLS 1.3 a rejected certificate shows up as an
/// `Unknown` "transport error" whose source is the TLS alert).
pub fn describe(status: &Status) -> String {
    let causes = std::error::Error::source(status).map(muster_util::error_chain);
    let mut s = format!("{}: {}", code_name(status.code()), status.message());
    if let Some(c) = causes {
        s.push_str(": ");
        s.push_str(&c);
    }
    s
}

fn code_name(c: Code) -> String {
    format!("{c:?}")
}

/// A new P-256 key for this node.
pub fn generate_key() -> Result<KeyPair, rcgen::Error> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
}

/// A CSR for `key`. Only its public key matters: the controller decides everything else.
pub fn csr_pem(key: &KeyPair) -> Result<String, rcgen::Error> {
    rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(key)?.pem()
}

fn endpoint(url: &str, ca_pem: &str) -> Result<(Endpoint, ClientTlsConfig), CallError> {
    let (host, _) = host_port(url).map_err(|e| CallError::Final(e.to_string()))?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name(host);
    let ep = Endpoint::from_shared(url.to_owned())
        .map_err(|e| CallError::Final(format!("controller URL {url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    Ok((ep, tls))
}

async fn connect(ep: Endpoint, tls: ClientTlsConfig, url: &str) -> Result<Channel, CallError> {
    ep.tls_config(tls).map_err(|e| CallError::Final(format!("TLS config: {e}")))?.connect().await.map_err(
        |e| {
            let mut s = format!("cannot connect to {url}: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(x) = src {
                s.push_str(": ");
                s.push_str(&x.to_string());
                src = x.source();
            }
            CallError::Retry(s)
        },
    )
}

/// A channel that verifies the server against `ca_pem` and presents no certificate.
pub async fn server_tls_channel(url: &str, ca_pem: &str) -> Result<Channel, CallError> {
    let (ep, tls) = endpoint(url, ca_pem)?;
    connect(ep, tls, url).await
}

/// A mutual-TLS channel with this machine's certificate.
pub async fn mtls_channel(
    url: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Channel, CallError> {
    let (ep, tls) = endpoint(url, ca_pem)?;
    connect(ep, tls.identity(Identity::from_pem(cert_pem, key_pem)), url).await
}

/// One enrollment attempt.
pub async fn enroll_once(
    url: &str,
    ca_pem: &str,
    token: &str,
    csr_pem: &str,
    inventory: pb::Inventory,
) -> Result<pb::EnrollResponse, CallError> {
    let channel = server_tls_channel(url, ca_pem).await?;
    AgentServiceClient::new(channel)
        .enroll(pb::EnrollRequest {
            token: token.to_owned(),
            csr_pem: csr_pem.to_owned(),
            inventory: Some(inventory),
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| match classify(&s) {
            // At enrollment there is no machine yet to be revoked: a refusal is final.
            CallError::Revoked(m) => CallError::Final(m),
            other => other,
        })
}

/// Renews the certificate over the mutual-TLS `channel`.
pub async fn renew(channel: Channel, csr_pem: &str) -> Result<pb::RenewResponse, CallError> {
    AgentServiceClient::new(channel)
        .renew(pb::RenewRequest { csr_pem: csr_pem.to_owned() })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| classify(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert!(matches!(classify(&Status::unavailable("down")), CallError::Retry(_)));
        assert!(matches!(classify(&Status::unknown("transport error")), CallError::Retry(_)));
        assert!(
            matches!(classify(&Status::unauthenticated("join token has expired")), CallError::Final(m) if m.contains("expired"))
        );
        assert!(matches!(classify(&Status::permission_denied("revoked")), CallError::Revoked(_)));
    }

    #[test]
    fn csr_is_valid() {
        let key = generate_key().unwrap();
        let csr = csr_pem(&key).unwrap();
        assert!(rcgen::CertificateSigningRequestParams::from_pem(&csr).is_ok());
    }
}

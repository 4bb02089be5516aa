//! Talking to the controller: keys and CSRs, enrollment, and the TLS channels.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_proto::pb;
use muster_proto::pb::agent_service_client::AgentServiceClient;
use rcgen::KeyPair;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
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
///
/// A status whose causes include a TLS error is final: under TLS 1.3 a controller that rejects
/// the client certificate does so after the handshake, so the rejection shows up on the first
/// call as `Unknown("transport error")` with the alert (`UnknownCA`, `CertificateRequired`,
/// ...) only in its sources.
pub fn classify(status: &Status) -> CallError {
    let msg = describe(status);
    if let Some(tls) = tls_failure(status) {
        return CallError::Final(format!(
            "authentication failed at the TLS layer ({tls}); the controller does not accept this \
             machine's certificate, or its own does not verify against our CA: {msg}"
        ));
    }
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

/// The TLS error among the causes of `e`, if any: an alert from the peer, or a peer
/// certificate that failed our checks.
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut causes = Vec::new();
    let mut cur = Some(e);
    while let Some(x) = cur {
        causes.push(x);
        cur = x.source();
    }
    let typed = causes.iter().find_map(|x| {
        x.downcast_ref::<rustls::Error>().or_else(|| {
            x.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref())
        })
    });
    if let Some(t) = typed {
        return Some(t.to_string());
    }
    // Some layers (h2) keep only the text of the TLS error. The outermost error is skipped: a
    // `Status` prints its sources with `Debug`.
    causes.iter().skip(1).find_map(|x| {
        let text = x.to_string();
        ["received fatal alert", "invalid peer certificate", "peer is incompatible"]
            .iter()
            .find_map(|m| text.find(m).map(|at| text[at..].to_owned()))
    })
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
    let ep = ep.tls_config(tls).map_err(|e| CallError::Final(format!("TLS config: {e}")))?;
    ep.connect().await.map_err(|e| {
        let chain = muster_util::error_chain(&e);
        match tls_failure(&e) {
            // The controller's certificate does not verify against our CA (or its name does not
            // match the URL): retrying will not change that.
            Some(tls) => CallError::Final(format!("TLS handshake with {url} failed ({tls}): {chain}")),
            None => CallError::Retry(format!("cannot connect to {url}: {chain}")),
        }
    })
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
    enroll_rpc(channel, token, csr_pem, inventory).await
}

/// Hands a connection made already (and verified) to the gRPC channel, once.
#[derive(Clone)]
struct Established(Arc<Mutex<Option<TlsStream<TcpStream>>>>);

impl tower_service::Service<tonic::transport::Uri> for Established {
    type Response = hyper_util::rt::TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::transport::Uri) -> Self::Future {
        let stream = self.0.lock().ok().and_then(|mut s| s.take());
        std::future::ready(stream.map(hyper_util::rt::TokioIo::new).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotConnected, "the enrollment connection is used up")
        }))
    }
}

/// One enrollment attempt over `stream`, a TLS connection to the controller whose certificate
/// was verified against the pinned CA (see [`crate::discovery::connect_pinned`]).
pub async fn enroll_over(
    stream: TlsStream<TcpStream>,
    url: &str,
    token: &str,
    csr_pem: &str,
    inventory: pb::Inventory,
) -> Result<pb::EnrollResponse, CallError> {
    let (host, port) = host_port(url).map_err(|e| CallError::Final(e.to_string()))?;
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    // TLS is done already: the channel sees a plain stream (the scheme only names it).
    let channel = Endpoint::from_shared(format!("http://{host}:{port}"))
        .map_err(|e| CallError::Final(format!("controller URL {url:?}: {e}")))?
        .connect_with_connector(Established(Arc::new(Mutex::new(Some(stream)))))
        .await
        .map_err(|e| CallError::Retry(format!("cannot talk to {url}: {}", muster_util::error_chain(&e))))?;
    enroll_rpc(channel, token, csr_pem, inventory).await
}

async fn enroll_rpc(
    channel: Channel,
    token: &str,
    csr_pem: &str,
    inventory: pb::Inventory,
) -> Result<pb::EnrollResponse, CallError> {
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
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::test_support::{tls_server, Ca};

    #[test]
    fn classification() {
        assert!(matches!(classify(&Status::unavailable("down")), CallError::Retry(_)));
        assert!(matches!(classify(&Status::unknown("transport error")), CallError::Retry(_)));
        assert!(
            matches!(classify(&Status::unauthenticated("join token has expired")), CallError::Final(m) if m.contains("expired"))
        );
        assert!(matches!(classify(&Status::permission_denied("revoked")), CallError::Revoked(_)));
    }

    /// What a call over `channel` fails with, classified (the connect error if there is one).
    async fn first_call(channel: Result<Channel, CallError>) -> CallError {
        match channel {
            Err(e) => e,
            Ok(ch) => renew(ch, "x").await.expect_err("the TLS server cannot answer"),
        }
    }

    #[tokio::test]
    async fn a_client_certificate_rejected_by_tls_is_a_final_authentication_failure() {
        crate::init_crypto();
        let ca = Ca::new("controller CA");
        let (leaf, key) = ca.server_leaf(&["127.0.0.1"]);
        let addr = tls_server(vec![leaf, ca.der()], key, Some(ca.der())).await;
        let url = format!("https://{addr}");
        let (cert, key) = Ca::new("another CA").client_pem();
        let err = first_call(mtls_channel(&url, &ca.pem(), &cert, &key).await).await;
        match &err {
            CallError::Final(m) => assert!(m.contains("TLS") && m.contains("alert: UnknownCA"), "{m}"),
            other => panic!("want a final TLS failure, got {other:?}"),
        }
        // No certificate at all: the same.
        let err = first_call(server_tls_channel(&url, &ca.pem()).await).await;
        assert!(matches!(&err, CallError::Final(m) if m.contains("TLS")), "{err:?}");
    }

    #[tokio::test]
    async fn a_server_certificate_from_another_ca_is_final() {
        crate::init_crypto();
        let (leaf, key) = Ca::new("impostor").server_leaf(&["127.0.0.1"]);
        let addr = tls_server(vec![leaf], key, None).await;
        let err =
            first_call(server_tls_channel(&format!("https://{addr}"), &Ca::new("ours").pem()).await).await;
        assert!(matches!(&err, CallError::Final(m) if m.contains("invalid peer certificate")), "{err:?}");
    }

    #[tokio::test]
    async fn nothing_listening_is_retried() {
        crate::init_crypto();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err =
            server_tls_channel(&format!("https://127.0.0.1:{port}"), &Ca::new("x").pem()).await.unwrap_err();
        assert!(matches!(err, CallError::Retry(_)), "{err:?}");
    }

    #[test]
    fn csr_is_valid() {
        let key = generate_key().unwrap();
        let csr = csr_pem(&key).unwrap();
        assert!(rcgen::CertificateSigningRequestParams::from_pem(&csr).is_ok());
    }
}

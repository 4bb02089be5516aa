//! Finding the controller's CA before the node has any certificate, by its pin (as kubeadm's
//! discovery hash): one TLS handshake that records the presented chain, then the CA whose
//! SubjectPublicKeyInfo hashes to the pin is taken, and the server certificate is verified
//! against it (signature, validity, name) before the CA is trusted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_machinery::pin::CaPin;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;

/// Why the controller's CA could not be found or trusted.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("controller URL {0:?} has no host")]
    Url(String),
    #[error("cannot reach {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake { addr: String, source: std::io::Error },
    #[error("the controller presented no certificate with CA pin {expected} (it presented {presented}); is this the right controller, and the right --ca-hash?")]
    PinMismatch { expected: CaPin, presented: String },
    #[error("the server certificate does not verify against the pinned CA: {0}")]
    Verify(String),
}

/// Records the chain a server presents and accepts it; only used to look at it.
#[derive(Debug)]
struct Capture {
    chain: Mutex<Vec<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.chain.lock().map_err(|_| rustls::Error::General("lock".into()))? = chain;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Host and port of an `https://HOST:PORT` URL.
pub fn host_port(url: &str) -> Result<(String, u16), DiscoveryError> {
    let uri: tonic::transport::Uri = url.parse().map_err(|_| DiscoveryError::Url(url.to_owned()))?;
    let host = uri.host().ok_or_else(|| DiscoveryError::Url(url.to_owned()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

/// Connects to `url`, finds the CA certificate matching `pin` in the presented chain, verifies
/// the server certificate against it, and returns the CA as PEM with the connection: once the
/// server is verified against the pinned CA it is as good as any, and enrolling over it saves a
/// TCP and TLS handshake (on a slow or emulated node, a good part of its enrollment time).
/// Offers HTTP/2 by ALPN.
pub async fn connect_pinned(
    url: &str,
    pin: &CaPin,
) -> Result<(String, tokio_rustls::client::TlsStream<TcpStream>), DiscoveryError> {
    let (host, port) = host_port(url)?;
    let addr = format!("{host}:{port}");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let capture = Arc::new(Capture { chain: Mutex::new(Vec::new()), provider: provider.clone() });
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DiscoveryError::Verify(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let server_name =
        ServerName::try_from(host.clone()).map_err(|_| DiscoveryError::Url(url.to_owned()))?.to_owned();
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| DiscoveryError::Connect {
            addr: addr.clone(),
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| DiscoveryError::Connect { addr: addr.clone(), source })?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(server_name.clone(), tcp))
        .await
        .map_err(|_| DiscoveryError::Handshake {
            addr: addr.clone(),
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| DiscoveryError::Handshake { addr: addr.clone(), source })?;
    // Nothing is sent over the connection until the checks below pass.
    let chain = capture.chain.lock().map(|c| c.clone()).unwrap_or_default();
    let (leaf, rest) =
        chain.split_first().ok_or_else(|| DiscoveryError::Verify("no certificate presented".into()))?;
    let mut presented = Vec::new();
    let mut ca = None;
    for cert in rest {
        match CaPin::of_cert_der(cert) {
            Ok(p) if p == *pin => ca = Some(cert.clone()),
            Ok(p) => presented.push(p.to_string()),
            Err(_) => presented.push("(unparseable)".into()),
        }
    }
    let ca = ca.ok_or_else(|| DiscoveryError::PinMismatch {
        expected: *pin,
        presented: if presented.is_empty() { "no CA certificate".into() } else { presented.join(", ") },
    })?;
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| DiscoveryError::Verify(e.to_string()))?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| DiscoveryError::Verify(e.to_string()))?;
    verifier
        .verify_server_cert(leaf, rest, &server_name, &[], UnixTime::now())
        .map_err(|e| DiscoveryError::Verify(e.to_string()))?;
    Ok((to_pem("CERTIFICATE", ca.to_vec()), tls))
}

/// PEM with Unix line endings.
pub(crate) fn to_pem(tag: &str, der: Vec<u8>) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(tag, der), config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::test_support::{tls_server, Ca};

    async fn discover_ca(url: &str, pin: &CaPin) -> Result<String, DiscoveryError> {
        Ok(connect_pinned(url, pin).await?.0)
    }

    #[test]
    fn host_port_of_urls() {
        assert_eq!(host_port("https://127.0.0.1:7443").unwrap(), ("127.0.0.1".into(), 7443));
        assert_eq!(host_port("https://ctl.example").unwrap(), ("ctl.example".into(), 443));
        assert_eq!(host_port("https://[::1]:1").unwrap(), ("::1".into(), 1));
        assert!(host_port("not a url").is_err());
    }

    #[tokio::test]
    async fn finds_the_pinned_ca_and_verifies_the_server() {
        crate::init_crypto();
        let ca = Ca::new("muster test CA");
        let (leaf, key) = ca.server_leaf(&["localhost", "127.0.0.1"]);
        let addr = tls_server(vec![leaf, ca.der()], key, None).await;
        let pem = discover_ca(&format!("https://{addr}"), &ca.pin()).await.unwrap();
        assert_eq!(muster_machinery::pin::CaPin::of_cert_pem(&pem).unwrap(), ca.pin());
        assert_eq!(pem.trim(), ca.pem().trim());
    }

    #[tokio::test]
    async fn refuses_a_controller_without_the_pinned_ca_naming_both_pins() {
        crate::init_crypto();
        let ca = Ca::new("muster test CA");
        let (leaf, key) = ca.server_leaf(&["127.0.0.1"]);
        let addr = tls_server(vec![leaf, ca.der()], key, None).await;
        let want = Ca::new("another CA").pin();
        let err = discover_ca(&format!("https://{addr}"), &want).await.unwrap_err();
        assert!(matches!(err, DiscoveryError::PinMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&want.to_string()) && msg.contains(&ca.pin().to_string()), "{msg}");
    }

    #[tokio::test]
    async fn refuses_a_leaf_the_pinned_ca_did_not_sign() {
        crate::init_crypto();
        // An impostor presents the real CA certificate (it is public) next to its own leaf.
        let real = Ca::new("muster test CA");
        let (leaf, key) = Ca::new("impostor").server_leaf(&["127.0.0.1"]);
        let addr = tls_server(vec![leaf, real.der()], key, None).await;
        let err = discover_ca(&format!("https://{addr}"), &real.pin()).await.unwrap_err();
        assert!(matches!(err, DiscoveryError::Verify(_)), "{err}");
    }

    #[tokio::test]
    async fn refuses_a_server_certificate_for_another_name() {
        crate::init_crypto();
        let ca = Ca::new("muster test CA");
        let (leaf, key) = ca.server_leaf(&["ctl.example"]);
        let addr = tls_server(vec![leaf, ca.der()], key, None).await;
        let err = discover_ca(&format!("https://{addr}"), &ca.pin()).await.unwrap_err();
        assert!(matches!(err, DiscoveryError::Verify(_)), "{err}");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = discover_ca(&format!("https://127.0.0.1:{port}"), &Ca::new("x").pin()).await.unwrap_err();
        assert!(matches!(err, DiscoveryError::Connect { .. }), "{err}");
    }
}

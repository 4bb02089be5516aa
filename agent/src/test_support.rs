//! Throwaway PKI and TLS servers on 127.0.0.1 for the crate's unit tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use muster_machinery::pin::CaPin;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// A self-signed CA.
pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Self { issuer: CertifiedIssuer::self_signed(p, key).unwrap() }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn pin(&self) -> CaPin {
        CaPin::of_cert_der(self.issuer.der()).unwrap()
    }

    /// A leaf for `sans` with `eku`: (certificate DER, PKCS#8 key DER).
    fn leaf(&self, sans: &[&str], eku: ExtendedKeyUsagePurpose) -> (CertificateDer<'static>, Vec<u8>) {
        let mut p = CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.der().clone(), key.serialize_der())
    }

    /// A server certificate for `sans`.
    pub fn server_leaf(&self, sans: &[&str]) -> (CertificateDer<'static>, Vec<u8>) {
        self.leaf(sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate and key, both PEM.
    pub fn client_pem(&self) -> (String, String) {
        let (der, key) = self.leaf(&[], ExtendedKeyUsagePurpose::ClientAuth);
        let cert = crate::discovery::to_pem("CERTIFICATE", der.to_vec());
        let key = crate::discovery::to_pem("PRIVATE KEY", key);
        (cert, key)
    }
}

/// Serves TLS on 127.0.0.1 with `chain` (leaf first), speaking ALPN h2; with `client_ca`,
/// client certificates from that CA are required. Each connection is held open until the
/// peer closes it. Returns the address; the server lives as long as the test's runtime.
pub async fn tls_server(
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
    client_ca: Option<CertificateDer<'static>>,
) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca).unwrap();
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(v)
        }
    };
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der));
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 1024];
                    while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
                }
            });
        }
    });
    addr
}

//! The signer of machine certificates. It decides everything a machine certificate says:
//! subject, SAN, key usage, EKU (client-auth only), `CA:FALSE` and validity all come from the
//! controller's own record. From a CSR only the public key is used, after its self-signature is
//! checked (what CVE-2022-36103 in Talos teaches).

use std::time::{Duration, SystemTime};

use muster_machinery::model::MachineId;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    PublicKeyData, SanType,
};

use super::{dn, random_serial, validity, Pki, ORG_MACHINES};

/// Why a CSR was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("csr_pem: not a valid, self-signed PKCS#10 request: {0}")]
    BadCsr(String),
    #[error("csr_pem: key algorithm not accepted (use ECDSA P-256/P-384 or Ed25519)")]
    KeyAlgorithm,
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A checked certificate signing request: its self-signature verified, its key accepted.
pub struct Csr {
    params: CertificateSigningRequestParams,
    /// SHA-256 of the public key (hex): the key's identity across requests.
    pub key_sha256: String,
}

impl Csr {
    /// Parses and checks a PEM CSR.
    pub fn parse(csr_pem: &str) -> Result<Self, SignError> {
        if csr_pem.len() > 16 * 1024 {
            return Err(SignError::BadCsr("larger than 16 KiB".into()));
        }
        let params = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| SignError::BadCsr(e.to_string()))?;
        let alg = params.public_key.algorithm();
        let accepted = [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519];
        if !accepted.contains(&alg) {
            return Err(SignError::KeyAlgorithm);
        }
        let key_sha256 =
            hex::encode(ring::digest::digest(&ring::digest::SHA256, params.public_key.der_bytes()));
        Ok(Self { params, key_sha256 })
    }
}

impl Pki {
    /// Signs a machine client certificate. Everything but the public key comes from `id`,
    /// `now` and `ttl`; whatever else the CSR asks for is ignored.
    pub fn sign_machine(
        &self,
        csr_pem: &str,
        id: &MachineId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<IssuedCert, SignError> {
        self.sign_csr(&Csr::parse(csr_pem)?, id, now, ttl)
    }

    /// Signs a checked CSR's key (see [`Pki::sign_machine`]).
    pub fn sign_csr(
        &self,
        csr: &Csr,
        id: &MachineId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<IssuedCert, SignError> {
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(id.as_str(), ORG_MACHINES);
        let uri = format!("urn:muster:machine:{id}");
        p.subject_alt_names =
            vec![SanType::URI(uri.try_into().map_err(|e: rcgen::Error| SignError::Sign(e.to_string()))?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let serial = random_serial(&self.rng).map_err(|e| SignError::Sign(e.to_string()))?;
        let serial_hex = hex::encode(serial.to_bytes());
        p.serial_number = Some(serial);
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, now, ttl);
        let cert =
            p.signed_by(&csr.params.public_key, &self.issuer).map_err(|e| SignError::Sign(e.to_string()))?;
        Ok(IssuedCert { pem: cert.pem(), serial_hex, not_after: now + ttl })
    }
}

/// A signed machine certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub serial_hex: String,
    pub not_after: SystemTime,
}
